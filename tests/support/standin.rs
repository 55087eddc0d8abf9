//! A stand-in for an integration server's admin hooks, so agents have a
//! real HTTP server to quiesce, resume and ask for in-flight work; a test
//! holds work open by setting the in-flight count.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(Default, Debug)]
pub struct ServerState {
    pub quiesced: bool,
    pub in_flight: u64,
    /// Hook calls in order: "quiesce", "resume".
    pub calls: Vec<String>,
    /// When set, admin hooks answer 401 without this Authorization header.
    pub authorization: Option<String>,
    /// Files served on GET (package archives for url sources).
    pub files: std::collections::BTreeMap<String, Vec<u8>>,
}

/// One stand-in server on a free loopback port; stops with the test.
pub struct StandIn {
    pub address: String,
    pub state: Arc<Mutex<ServerState>>,
}

impl StandIn {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind stand-in");
        let address = listener.local_addr().expect("address").to_string();
        let state = Arc::new(Mutex::new(ServerState::default()));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(answer(&state, &request)) }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { address, state }
    }

    pub fn set_in_flight(&self, n: u64) {
        self.lock().in_flight = n;
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, ServerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn answer<B>(state: &Mutex<ServerState>, request: &Request<B>) -> Response<Full<Bytes>> {
    let mut s = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(file) = s.files.get(request.uri().path()) {
        return Response::new(Full::new(Bytes::from(file.clone())));
    }
    let presented = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if s.authorization.is_some() && s.authorization.as_deref() != presented {
        let mut response = Response::new(Full::new(Bytes::from("unauthorized")));
        *response.status_mut() = hyper::StatusCode::UNAUTHORIZED;
        return response;
    }
    let body = match (request.method().as_str(), request.uri().path()) {
        ("POST", "/quiesce") => {
            s.quiesced = true;
            s.calls.push("quiesce".into());
            String::new()
        }
        ("POST", "/resume") => {
            s.quiesced = false;
            s.calls.push("resume".into());
            String::new()
        }
        ("GET", "/inflight") => s.in_flight.to_string(),
        ("GET", "/health") => "UP".into(),
        _ => {
            let mut response = Response::new(Full::new(Bytes::from(format!(
                "not found: {}",
                request.uri()
            ))));
            *response.status_mut() = hyper::StatusCode::NOT_FOUND;
            return response;
        }
    };
    Response::new(Full::new(Bytes::from(body)))
}
