//! A stand-in integration server for end-to-end tests in real containers
//! (`localhost/integration-standin:dev`, built by `hack/images/build`).
//!
//! It answers what the operator's pods and agents call on webMethods
//! Microservices Runtime and on a generic server, and writes every request
//! and every state change as one JSON line on stdout, so a test can assert
//! from `kubectl logs` the order in which things happened to each server:
//!
//! ```text
//! {"unix_ms":1732850000123,"pod":"orders-0","port":9999,"method":"POST","path":"/quiesce","event":"quiesce","status":200}
//! ```
//!
//! Health probe lines are shorter (no pod or method) since there are many.
//!
//! Routes (every route answers on both ports; client work only on the
//! primary port):
//!
//! | route | event |
//! |---|---|
//! | `GET /health/readiness`, `/health` (503 while switched off or draining), `/health/liveness` | `health` |
//! | `/invoke/wm.server.quiesce/setQuiesceMode?isQuiesceMode=true`, `POST /quiesce` | `quiesce` |
//! | `.../setQuiesceMode?isQuiesceMode=false`, `/invoke/wm.server.quiesce/setActiveMode`, `POST /resume` | `resume` |
//! | `GET /inflight`: client requests in progress plus held work, as a decimal | `inflight` |
//! | `/invoke/pub.art.listener/enableListener?listenerName=X`, `disableListener`, `/listener/{enable,renew,disable}?listener=X`, each with `epoch` and optional `until` (unix ms) | `listener-enable`, `listener-renew`, `listener-disable` |
//! | `POST /standin/readiness?ok=false\|true` switches readiness | `readiness` |
//! | `POST /standin/hold?n=N` sets the held work (0 releases) | `hold` |
//! | `GET /files/<name>` from `STANDIN_FILES_DIR` | `files` |
//! | any other `GET` on the primary port: client work, `?ms=N` long; 503 while quiesced | `client` |
//!
//! Quiesce, resume and listener routes take GET or POST, as MSR's `/invoke`
//! services do. When `username` and `password` files are in
//! `STANDIN_ADMIN_SECRET_DIR` (where the operator mounts `configFrom`
//! Secrets), every route but health, files and client work needs
//! `Authorization: Basic base64(username:password)`, else 401
//! (`unauthorized`). The files are read at every request, so a rotated
//! Secret takes effect as it would on a server that rereads its
//! credentials. Files and client work stay open because the agent's init
//! container downloads packages without credentials, and clients of a real
//! server do not hold admin credentials.
//!
//! On SIGTERM or SIGINT (`sigterm`) it stops accepting connections on the
//! primary port, lets the requests in progress finish (at most
//! `STANDIN_DRAIN_SECONDS`), logs `exit` and exits 0. The diagnostic port
//! keeps answering until then: the agent receives SIGTERM at the same time
//! and still disables its listeners through it, which a test wants to see.
//!
//! Environment: `POD_NAME`, `PRIMARY_PORT` (5555), `DIAGNOSTIC_PORT` (9999),
//! `STANDIN_ADMIN_SECRET_DIR` (/etc/secrets), `STANDIN_FILES_DIR`
//! (/srv/files), `STANDIN_WORK_MS` (50), `STANDIN_DRAIN_SECONDS` (30).
//! It writes nothing to disk, so it runs as any user on a read-only root.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

struct Config {
    pod: String,
    primary: u16,
    diagnostic: u16,
    secret_dir: PathBuf,
    files_dir: PathBuf,
    work: Duration,
    drain: Duration,
}

impl Config {
    fn from_env() -> anyhow::Result<Self> {
        fn var(name: &str, default: &str) -> String {
            std::env::var(name).unwrap_or_else(|_| default.to_owned())
        }
        fn number<T: std::str::FromStr>(name: &str, default: &str) -> anyhow::Result<T> {
            let value = var(name, default);
            value
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={value:?} is not a number"))
        }
        Ok(Self {
            pod: var("POD_NAME", "standin"),
            primary: number("PRIMARY_PORT", "5555")?,
            diagnostic: number("DIAGNOSTIC_PORT", "9999")?,
            secret_dir: var("STANDIN_ADMIN_SECRET_DIR", "/etc/secrets").into(),
            files_dir: var("STANDIN_FILES_DIR", "/srv/files").into(),
            work: Duration::from_millis(number("STANDIN_WORK_MS", "50")?),
            drain: Duration::from_secs(number("STANDIN_DRAIN_SECONDS", "30")?),
        })
    }
}

#[derive(Clone, Debug)]
struct ListenerState {
    enabled: bool,
    epoch: Option<i64>,
    until: Option<u64>,
}

#[derive(Default)]
struct State {
    quiesced: bool,
    not_ready: bool,
    draining: bool,
    held: u64,
    listeners: BTreeMap<String, ListenerState>,
}

struct Server {
    config: Config,
    state: Mutex<State>,
    /// Client requests being served.
    clients: AtomicU64,
    /// Open connections on the primary port; the drain waits for them, so
    /// the last response is written before the process exits.
    primary_connections: AtomicU64,
}

impl Server {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the health endpoints down with it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn in_flight(&self) -> u64 {
        self.clients.load(Ordering::SeqCst) + self.state().held
    }

    /// `None` when no credentials are configured; read at every request so
    /// that a rotated Secret is honoured.
    fn credentials(&self) -> Option<Vec<u8>> {
        let read = |name| std::fs::read(self.config.secret_dir.join(name)).ok();
        let (username, password) = (read("username")?, read("password")?);
        Some([username.as_slice(), b":", password.as_slice()].concat())
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        use base64::Engine;
        let Some(expected) = self.credentials() else {
            return true;
        };
        request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
            .and_then(|(_, token)| {
                base64::engine::general_purpose::STANDARD
                    .decode(token.trim())
                    .ok()
            })
            .is_some_and(|presented| presented == expected)
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes one log line with the fields in the given order (a map would sort
/// them), flushed at once so that `kubectl logs` sees it before the next
/// event happens.
fn log(fields: &[(&str, Value)]) {
    let mut line = String::from("{");
    for (i, (key, value)) in fields.iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        line.push_str(&json!(key).to_string());
        line.push(':');
        line.push_str(&value.to_string());
    }
    line.push_str("}\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

fn event(server: &Server, fields: Vec<(&str, Value)>) {
    let mut line = vec![
        ("unix_ms", json!(unix_ms())),
        ("pod", json!(server.config.pod)),
    ];
    line.extend(fields);
    log(&line);
}

/// What the server does with one request.
enum Route {
    Health { readiness: bool },
    Quiesce,
    Resume,
    InFlight,
    Listener(&'static str),
    SetReadiness,
    Hold,
    File(String),
    Client,
    NotFound,
    MethodNotAllowed,
}

impl Route {
    fn event(&self) -> &'static str {
        match self {
            Route::Health { .. } => "health",
            Route::Quiesce => "quiesce",
            Route::Resume => "resume",
            Route::InFlight => "inflight",
            Route::Listener(action) => action,
            Route::SetReadiness => "readiness",
            Route::Hold => "hold",
            Route::File(_) => "files",
            Route::Client => "client",
            Route::NotFound | Route::MethodNotAllowed => "not-found",
        }
    }

    fn needs_credentials(&self) -> bool {
        !matches!(
            self,
            Route::Health { .. }
                | Route::File(_)
                | Route::Client
                | Route::NotFound
                | Route::MethodNotAllowed
        )
    }
}

fn route(method: &Method, path: &str, query: &Query, primary: bool) -> Route {
    let get = method == Method::GET;
    let get_or_post = get || method == Method::POST;
    let post = method == Method::POST;
    let only = |allowed: bool, route: Route| {
        if allowed {
            route
        } else {
            Route::MethodNotAllowed
        }
    };
    match path {
        "/health/readiness" | "/health" => only(get, Route::Health { readiness: true }),
        "/health/liveness" => only(get, Route::Health { readiness: false }),
        "/invoke/wm.server.quiesce/setQuiesceMode" => {
            let quiesce = query.get("isQuiesceMode") != Some("false");
            only(
                get_or_post,
                if quiesce {
                    Route::Quiesce
                } else {
                    Route::Resume
                },
            )
        }
        "/quiesce" => only(get_or_post, Route::Quiesce),
        "/invoke/wm.server.quiesce/setActiveMode" | "/resume" => only(get_or_post, Route::Resume),
        "/inflight" => only(get, Route::InFlight),
        "/invoke/pub.art.listener/enableListener" | "/listener/enable" => {
            only(get_or_post, Route::Listener("listener-enable"))
        }
        "/listener/renew" => only(get_or_post, Route::Listener("listener-renew")),
        "/invoke/pub.art.listener/disableListener" | "/listener/disable" => {
            only(get_or_post, Route::Listener("listener-disable"))
        }
        "/standin/readiness" => only(post, Route::SetReadiness),
        "/standin/hold" => only(post, Route::Hold),
        _ => match path.strip_prefix("/files/") {
            Some(name) => only(get, Route::File(name.to_owned())),
            None if get && primary => Route::Client,
            None => Route::NotFound,
        },
    }
}

/// The decoded query parameters; the first of repeated keys wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Self {
        Self(
            form_urlencoded::parse(query.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

struct Answer {
    status: StatusCode,
    body: Bytes,
    content_type: &'static str,
    /// Fields for the log line beyond the common ones.
    fields: Vec<(&'static str, Value)>,
}

impl Answer {
    fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            body: Bytes::from(body.into() + "\n"),
            content_type: "text/plain; charset=utf-8",
            fields: Vec::new(),
        }
    }

    fn json(status: StatusCode, body: &Value) -> Self {
        Self {
            status,
            body: Bytes::from(body.to_string() + "\n"),
            content_type: "application/json",
            fields: Vec::new(),
        }
    }

    fn with(mut self, key: &'static str, value: Value) -> Self {
        self.fields.push((key, value));
        self
    }
}

async fn handle(
    server: Arc<Server>,
    port: u16,
    request: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let full_path = request
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_owned());
    let query = Query::parse(request.uri().query());
    let primary = port == server.config.primary;
    let route = route(&method, &path, &query, primary);
    let event_name = route.event();
    let compact = matches!(route, Route::Health { .. });

    let answer = if route.needs_credentials() && !server.authorized(&request) {
        Answer::text(StatusCode::UNAUTHORIZED, "unauthorized")
            .with("event", json!("unauthorized"))
            .with("wanted", json!(event_name))
    } else {
        answer(&server, route, &query).await
    };

    let mut fields = if compact {
        vec![("unix_ms", json!(unix_ms()))]
    } else {
        vec![
            ("unix_ms", json!(unix_ms())),
            ("pod", json!(server.config.pod)),
        ]
    };
    fields.push(("port", json!(port)));
    if !compact {
        fields.push(("method", json!(method.as_str())));
    }
    fields.push(("path", json!(full_path)));
    // An unauthorized answer names its own event.
    if !answer.fields.iter().any(|(k, _)| *k == "event") {
        fields.push(("event", json!(event_name)));
    }
    fields.extend(answer.fields.iter().cloned());
    fields.push(("status", json!(answer.status.as_u16())));
    log(&fields);

    let mut response = Response::new(Full::new(answer.body));
    *response.status_mut() = answer.status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(answer.content_type));
    response
}

async fn answer(server: &Server, route: Route, query: &Query) -> Answer {
    match route {
        Route::Health { readiness } => {
            let state = server.state();
            if readiness && (state.not_ready || state.draining) {
                Answer::json(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "DOWN"}))
            } else {
                Answer::json(StatusCode::OK, &json!({"status": "UP"}))
            }
        }
        Route::Quiesce | Route::Resume => {
            let quiesced = matches!(route, Route::Quiesce);
            server.state().quiesced = quiesced;
            Answer::json(StatusCode::OK, &json!({"quiesced": quiesced}))
                .with("quiesced", json!(quiesced))
        }
        Route::InFlight => {
            let n = server.in_flight();
            Answer::text(StatusCode::OK, n.to_string()).with("in_flight", json!(n))
        }
        Route::Listener(action) => listener(server, action, query),
        Route::SetReadiness => match query.get("ok").map(str::parse::<bool>) {
            Some(Ok(ok)) => {
                server.state().not_ready = !ok;
                Answer::json(StatusCode::OK, &json!({"ready": ok})).with("ready", json!(ok))
            }
            _ => Answer::text(StatusCode::BAD_REQUEST, "expected ok=true or ok=false"),
        },
        Route::Hold => match query.get("n").map(str::parse::<u64>) {
            Some(Ok(n)) => {
                server.state().held = n;
                Answer::text(StatusCode::OK, n.to_string()).with("held", json!(n))
            }
            _ => Answer::text(StatusCode::BAD_REQUEST, "expected n=<count>"),
        },
        Route::File(name) => file(server, name).await,
        Route::Client => client(server, query).await,
        Route::NotFound => Answer::text(StatusCode::NOT_FOUND, "not found"),
        Route::MethodNotAllowed => {
            Answer::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
        }
    }
}

fn listener(server: &Server, action: &'static str, query: &Query) -> Answer {
    let Some(name) = query.get("listenerName").or_else(|| query.get("listener")) else {
        return Answer::text(StatusCode::BAD_REQUEST, "expected listener or listenerName");
    };
    let epoch = query.get("epoch").map(str::parse::<i64>);
    let until = query.get("until").map(str::parse::<u64>);
    let (epoch, until) = match (epoch, until) {
        (Some(Err(_)), _) | (_, Some(Err(_))) => {
            return Answer::text(StatusCode::BAD_REQUEST, "epoch and until must be numbers");
        }
        (epoch, until) => (epoch.and_then(Result::ok), until.and_then(Result::ok)),
    };
    let enabled = action != "listener-disable";
    let previous = server.state().listeners.insert(
        name.to_owned(),
        ListenerState {
            enabled,
            epoch,
            until,
        },
    );
    let mut answer = Answer::json(
        StatusCode::OK,
        &json!({"listener": name, "enabled": enabled, "epoch": epoch, "until": until}),
    )
    .with("listener", json!(name))
    .with("epoch", json!(epoch))
    .with("until", json!(until));
    // A server that honours `until` stops listening on its own once it
    // passes; a renewal after that, or an epoch going backwards, is what a
    // fencing test looks for.
    if let Some(previous) = previous {
        let lapsed = previous.until.is_some_and(|until| until < unix_ms());
        answer = answer
            .with("was_listening", json!(previous.enabled && !lapsed))
            .with("previous_epoch", json!(previous.epoch));
    }
    answer
}

/// Serves a plain file name from the files directory; anything that could
/// name another directory is refused.
async fn file(server: &Server, name: String) -> Answer {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && !name.contains('%');
    if !plain {
        return Answer::text(StatusCode::NOT_FOUND, "not found");
    }
    let path: PathBuf = server.config.files_dir.join(&name);
    let read = tokio::task::spawn_blocking(move || read_regular_file(&path)).await;
    match read {
        Ok(Some(bytes)) => {
            let size = bytes.len();
            Answer {
                status: StatusCode::OK,
                body: Bytes::from(bytes),
                content_type: "application/octet-stream",
                fields: Vec::new(),
            }
            .with("bytes", json!(size))
        }
        _ => Answer::text(StatusCode::NOT_FOUND, "not found"),
    }
}

fn read_regular_file(path: &Path) -> Option<Vec<u8>> {
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() {
        return None;
    }
    std::fs::read(path).ok()
}

/// Counts a client request as in flight for as long as it lives.
struct ClientGuard<'a>(&'a AtomicU64);

impl<'a> ClientGuard<'a> {
    fn new(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Self(counter)
    }
}

impl Drop for ClientGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn client(server: &Server, query: &Query) -> Answer {
    let work = match query.get("ms").map(str::parse::<u64>) {
        None => server.config.work,
        Some(Ok(ms)) => Duration::from_millis(ms),
        Some(Err(_)) => return Answer::text(StatusCode::BAD_REQUEST, "ms must be a number"),
    };
    let ms = json!(u64::try_from(work.as_millis()).unwrap_or(u64::MAX));
    if server.state().quiesced {
        return Answer::text(StatusCode::SERVICE_UNAVAILABLE, "quiesced").with("ms", ms);
    }
    let _guard = ClientGuard::new(&server.clients);
    tokio::time::sleep(work).await;
    Answer::text(StatusCode::OK, format!("served by {}", server.config.pod)).with("ms", ms)
}

/// Counts an open primary-port connection for as long as it lives.
struct ConnectionGuard(Arc<Server>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.primary_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Resolves once `stop` turns true (or its sender is gone, which does not
/// happen before exit).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Accepts connections on one port until `stop` turns true; open
/// connections then finish the request in progress and close.
async fn serve(
    server: Arc<Server>,
    listener: TcpListener,
    port: u16,
    mut stop: watch::Receiver<bool>,
) {
    let primary = port == server.config.primary;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stopped(&mut stop) => return,
        };
        let Ok((stream, _)) = accepted else {
            continue;
        };
        let guard = primary.then(|| {
            server.primary_connections.fetch_add(1, Ordering::SeqCst);
            ConnectionGuard(server.clone())
        });
        let server = server.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let service = hyper::service::service_fn(move |request| {
                let server = server.clone();
                async move { Ok::<_, Infallible>(handle(server, port, request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopped(&mut stop), if primary => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
}

async fn terminated() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let mut ports = vec![config.primary];
    if config.diagnostic != config.primary {
        ports.push(config.diagnostic);
    }
    let mut listeners = Vec::new();
    for port in &ports {
        let listener = TcpListener::bind(("0.0.0.0", *port))
            .await
            .with_context(|| format!("listening on port {port}"))?;
        listeners.push((*port, listener));
    }
    let server = Arc::new(Server {
        config,
        state: Mutex::new(State::default()),
        clients: AtomicU64::new(0),
        primary_connections: AtomicU64::new(0),
    });
    event(
        &server,
        vec![
            ("event", json!("start")),
            ("primary_port", json!(server.config.primary)),
            ("diagnostic_port", json!(server.config.diagnostic)),
            ("auth", json!(server.credentials().is_some())),
            ("files", json!(server.config.files_dir.is_dir())),
        ],
    );

    let (stop_primary, stopped) = watch::channel(false);
    // The diagnostic port's sender lives until exit: see the module doc.
    let (_keep_diagnostic, never) = watch::channel(false);
    for (port, listener) in listeners {
        let stop = if port == server.config.primary {
            stopped.clone()
        } else {
            never.clone()
        };
        tokio::spawn(serve(server.clone(), listener, port, stop));
    }

    let signal = terminated().await?;
    server.state().draining = true;
    event(
        &server,
        vec![
            ("event", json!("sigterm")),
            ("signal", json!(signal)),
            ("in_flight", json!(server.clients.load(Ordering::SeqCst))),
        ],
    );
    let _ = stop_primary.send(true);
    let deadline = tokio::time::Instant::now() + server.config.drain;
    let drained = loop {
        let busy = server.clients.load(Ordering::SeqCst) > 0
            || server.primary_connections.load(Ordering::SeqCst) > 0;
        if !busy {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    event(
        &server,
        vec![
            ("event", json!("exit")),
            ("drained", json!(drained)),
            ("in_flight", json!(server.clients.load(Ordering::SeqCst))),
        ],
    );
    std::process::exit(0);
}
