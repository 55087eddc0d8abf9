//! A stand-in for an integration server's admin hooks, so agents have a
//! real HTTP server to quiesce, resume and ask for in-flight work; a test
//! holds work open by setting the in-flight count.

#![allow(dead_code)] // each test binary uses a different subset

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

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
    /// Listener hook calls, in order of arrival.
    pub listener: Vec<ListenerCall>,
    /// When set, the disable hook answers 503 and the listener keeps
    /// listening (a server that cannot be reached or refuses to stop).
    pub refuse_disable: bool,
    /// Messages of multi-node listeners this server processed (claimed).
    pub processed: Vec<String>,
}

/// What a listener hook call asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerAction {
    Enable,
    Renew,
    Disable,
}

/// One listener hook call as the server received it.
#[derive(Clone, Debug)]
pub struct ListenerCall {
    pub at: SystemTime,
    pub action: ListenerAction,
    pub listener: String,
    pub epoch: i64,
    /// Until when the server may listen without another renewal.
    pub until: Option<SystemTime>,
    /// The server refused the call (see `refuse_disable`): nothing changed.
    pub refused: bool,
}

/// A span during which a server listened.
#[derive(Clone, Debug)]
pub struct Listening {
    pub server: usize,
    pub from: SystemTime,
    pub to: SystemTime,
    pub epoch: i64,
}

/// When each server listened, as a server that honours `until` would:
/// from an enable to the earlier of the next disable and the last `until`
/// (renewals extend it). An open span ends at `now`.
pub fn timeline(servers: &[&StandIn], now: SystemTime) -> Vec<Listening> {
    let mut spans = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        let calls = server.lock().listener.clone();
        let mut open: Option<(SystemTime, Option<SystemTime>, i64)> = None;
        let close =
            |from, until: Option<SystemTime>, at: SystemTime, epoch, spans: &mut Vec<Listening>| {
                let to = until.map_or(at, |u| u.min(at));
                spans.push(Listening {
                    server: i,
                    from,
                    to: to.max(from),
                    epoch,
                });
            };
        for call in calls.into_iter().filter(|c| !c.refused) {
            match (call.action, open) {
                (ListenerAction::Enable, None) => open = Some((call.at, call.until, call.epoch)),
                (ListenerAction::Enable | ListenerAction::Renew, Some((from, until, epoch))) => {
                    // A renewal that comes after the permission ran out
                    // starts a new span.
                    if until.is_some_and(|u| u < call.at) {
                        close(from, until, call.at, epoch, &mut spans);
                        open = Some((call.at, call.until, call.epoch));
                    } else {
                        open = Some((from, call.until, call.epoch));
                    }
                }
                (ListenerAction::Disable, Some((from, until, epoch))) => {
                    close(from, until, call.at, epoch, &mut spans);
                    open = None;
                }
                (ListenerAction::Renew | ListenerAction::Disable, None) => {}
            }
        }
        if let Some((from, until, epoch)) = open {
            close(from, until, now, epoch, &mut spans);
        }
    }
    spans.sort_by_key(|s| s.from);
    spans
}

/// Pairs of spans of different servers that overlap, with the overlap.
pub fn overlaps(spans: &[Listening]) -> Vec<(Listening, Listening, Duration)> {
    let mut found = Vec::new();
    for (i, a) in spans.iter().enumerate() {
        for b in &spans[i + 1..] {
            if a.server == b.server {
                continue;
            }
            let start = a.from.max(b.from);
            let end = a.to.min(b.to);
            if let Ok(d) = end.duration_since(start)
                && !d.is_zero()
            {
                found.push((a.clone(), b.clone(), d));
            }
        }
    }
    found
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
        ("POST", path @ ("/listener/enable" | "/listener/renew" | "/listener/disable")) => {
            let query = request.uri().query().unwrap_or_default();
            let param = |key: &str| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_owned())
            };
            let action = match path {
                "/listener/enable" => ListenerAction::Enable,
                "/listener/renew" => ListenerAction::Renew,
                _ => ListenerAction::Disable,
            };
            let refused = action == ListenerAction::Disable && s.refuse_disable;
            s.listener.push(ListenerCall {
                at: SystemTime::now(),
                action,
                listener: param("listener").unwrap_or_default(),
                epoch: param("epoch").and_then(|e| e.parse().ok()).unwrap_or(-1),
                until: param("until")
                    .and_then(|u| u.parse::<u64>().ok())
                    .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms)),
                refused,
            });
            if refused {
                let mut response = Response::new(Full::new(Bytes::from("cannot disable")));
                *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                return response;
            }
            String::new()
        }
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

/// A server's side of the multi-node claim protocol: the agent's claim
/// endpoint on the pod's loopback (`--claim-address`).
#[derive(Clone)]
pub struct Claims {
    pub address: String,
    http: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Empty<Bytes>,
    >,
}

/// What a claim or complete call answered.
#[derive(Clone, Debug)]
pub struct ClaimAnswer {
    pub status: u16,
    pub body: String,
}

impl ClaimAnswer {
    /// A field of the JSON answer.
    pub fn field(&self, key: &str) -> Option<serde_json::Value> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()?
            .get(key)
            .cloned()
    }
}

impl Claims {
    pub fn new(address: &str) -> Self {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Self {
            address: address.to_owned(),
            http,
        }
    }

    async fn post(&self, path_and_query: &str) -> ClaimAnswer {
        use http_body_util::BodyExt;
        let uri: hyper::Uri = format!("http://{}{path_and_query}", self.address)
            .parse()
            .expect("uri");
        let request = hyper::Request::post(uri)
            .body(http_body_util::Empty::new())
            .expect("request");
        let response = match self.http.request(request).await {
            Ok(response) => response,
            // Not listening (yet): status 0, as no HTTP status is.
            Err(e) => {
                return ClaimAnswer {
                    status: 0,
                    body: e.to_string(),
                };
            }
        };
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
            .unwrap_or_default();
        ClaimAnswer { status, body }
    }

    /// Claims message `id` of `listener`, for `lease` if given.
    pub async fn claim(&self, listener: &str, id: &str, lease: Option<u64>) -> ClaimAnswer {
        let lease = lease.map_or_else(String::new, |s| format!("&leaseSeconds={s}"));
        self.post(&format!("/claim?listener={listener}&id={id}{lease}"))
            .await
    }

    /// Reports message `id` processed under the claim's `attempt`.
    pub async fn complete(&self, listener: &str, id: &str, attempt: i64) -> ClaimAnswer {
        self.post(&format!(
            "/complete?listener={listener}&id={id}&attempt={attempt}"
        ))
        .await
    }
}

impl StandIn {
    /// A message of `listener` delivered to this server: it claims the
    /// message, processes it (records it) and completes the claim, as a
    /// server of a multi-node listener does. Returns the claim's answer.
    pub async fn deliver(&self, claims: &Claims, listener: &str, id: &str) -> ClaimAnswer {
        let claimed = claims.claim(listener, id, None).await;
        if claimed.status != 200 {
            return claimed;
        }
        self.lock().processed.push(id.to_owned());
        let attempt = claimed
            .field("attempt")
            .and_then(|a| a.as_i64())
            .expect("a granted claim names its attempt");
        let completed = claims.complete(listener, id, attempt).await;
        assert_eq!(completed.status, 200, "completing {id}: {completed:?}");
        claimed
    }
}
