//! The admin server: what an operator, a kubelet or Prometheus asks a running agent. It runs
//! on its own OS thread with a current-thread tokio runtime, off the data plane (ztunnel's
//! rule: a scrape or a debug dump never competes with proxied requests), and listens only
//! where it is told (`127.0.0.1:15000` by default).
//!
//! | endpoint | answer |
//! | --- | --- |
//! | `GET /healthz` | 200 `ok` while the process runs |
//! | `GET /readyz` | 200 when every [`Readiness`] check passes, else 503; one `[+]`/`[-]` line per check |
//! | `GET /metrics` | `OpenMetrics` text ([`crate::metrics`], JWKS gauges from [`jwks_metrics`]) |
//! | `GET /debug/state` | JSON [`state::DebugState`]: workloads, policies, jwtRules, issuers and key ids |
//! | `POST /debug/datapath/log` | the kernel programs' log level |
//! | `POST <path>` | an [`Endpoint`] another part of the agent added (`nodeward run` adds `/check`) |
//!
//! [`client`] is the other end, used by `nodeward status` and `nodeward check --admin`.

pub mod client;
pub mod jwks_metrics;
pub mod state;

use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authn::cache::TokenCache;
use crate::authn::fetch::JwksStore;
use crate::authz::path::Normalization;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::state::StateStore;
pub use jwks_metrics::JwksMetrics;
pub use state::DebugState;

/// Largest `POST /check` body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Time a client may take to send a request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Time open admin connections get to finish when the server stops.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// The `OpenMetrics` content type (what `prometheus-client` encodes).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Everything the admin server reads. The data plane shares the store, the JWKS store, the
/// token cache and the metrics; the admin server never writes them (a check may add a
/// verified token to the cache, as a request would).
pub struct Admin {
    pub store: Arc<StateStore>,
    pub jwks: JwksStore,
    pub jwks_metrics: JwksMetrics,
    pub cache: TokenCache,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    pub config: Config,
    /// The enforcer's path normalization, which `POST /check` applies by default.
    pub normalization: Normalization,
    /// The kernel data path, when the agent runs it (`POST /debug/datapath/log`).
    pub datapath: Option<Arc<crate::datapath::node::NodeDatapath>>,
    /// Endpoints other parts of the agent added.
    pub endpoints: Vec<Endpoint>,
}

/// What a `POST` endpoint answers with.
pub type Handler = Box<dyn Fn(&Admin, &[u8]) -> Response<Body> + Send + Sync>;

/// A `POST` endpoint added by another part of the agent: the admin server serves it without
/// knowing what it does.
pub struct Endpoint {
    /// Its path; answered for `POST` only (any other method gets 405).
    pub path: &'static str,
    /// Its line on the index page.
    pub about: &'static str,
    /// Called with the request body.
    pub handler: Handler,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("path", &self.path)
            .field("about", &self.about)
            .finish_non_exhaustive()
    }
}

/// The body of every admin answer.
pub type Body = Full<Bytes>;

/// A plain-text answer.
#[must_use]
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = text(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allow}\n"),
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

const INDEX: &str = "nodeward admin\n\
    GET  /healthz      liveness\n\
    GET  /readyz       readiness, one line per check\n\
    GET  /metrics      OpenMetrics\n\
    GET  /debug/state  workloads, policies, issuers and key ids (JSON)\n\
    POST /debug/datapath/log  kernel programs' log level (body: 0 off, 1 decisions, 2 every protected packet)\n";

/// The index page: the built-in endpoints, then the added ones.
fn index(admin: &Admin) -> String {
    let mut index = INDEX.to_owned();
    for endpoint in &admin.endpoints {
        let _ = writeln!(index, "POST {:<13} {}", endpoint.path, endpoint.about);
    }
    index
}

/// Answers one request; `body` is the request body (empty but for `POST`).
#[must_use]
pub fn route(admin: &Admin, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    let get = method == Method::GET || method == Method::HEAD;
    if let Some(endpoint) = admin.endpoints.iter().find(|e| e.path == path) {
        return if method == Method::POST {
            (endpoint.handler)(admin, body)
        } else {
            method_not_allowed("POST")
        };
    }
    match path {
        "/" if get => text(StatusCode::OK, index(admin)),
        "/healthz" if get => text(StatusCode::OK, "ok\n"),
        "/readyz" if get => {
            let (ready, report) = admin.readiness.report();
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, report)
        }
        "/metrics" if get => {
            admin.jwks_metrics.sync_fetches(&admin.metrics);
            let mut response = text(StatusCode::OK, admin.metrics.encode());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        "/debug/state" if get => json(
            StatusCode::OK,
            serde_json::to_string_pretty(&state::debug_state(admin)).unwrap_or_default() + "\n",
        ),
        "/debug/datapath/log" if method == Method::POST => datapath_log(admin, body),
        "/" | "/healthz" | "/readyz" | "/metrics" | "/debug/state" => method_not_allowed("GET"),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {path}\n\n{}", index(admin)),
        ),
    }
}

/// Turns the kernel programs' log lines on or off at run time (off by default).
fn datapath_log(admin: &Admin, body: &[u8]) -> Response<Body> {
    let Some(datapath) = &admin.datapath else {
        return text(
            StatusCode::CONFLICT,
            "the kernel data path is off (--datapath off)\n",
        );
    };
    let Some(level) = std::str::from_utf8(body)
        .ok()
        .and_then(|b| b.trim().parse::<u32>().ok())
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "body: the log level, a number (0 off)\n",
        );
    };
    match datapath.set_log_level(level) {
        Ok(()) => text(StatusCode::OK, format!("kernel log level {level}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("error: {e}\n")),
    }
}

async fn handle(admin: &Arc<Admin>, request: hyper::Request<Incoming>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = if parts.method == Method::POST {
        match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body larger than {MAX_BODY_BYTES} bytes\n"),
                )
            }
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading the body: {e}\n")),
        }
    } else {
        Bytes::new()
    };
    let path = parts.uri.path();
    if parts.method == Method::POST && admin.endpoints.iter().any(|e| e.path == path) {
        // An added endpoint may wait (`POST /check` asks external authorizers): off this
        // current-thread runtime, so `/healthz` and `/readyz` keep answering meanwhile.
        let admin = Arc::clone(admin);
        let path = path.to_owned();
        return tokio::task::spawn_blocking(move || route(&admin, &Method::POST, &path, &body))
            .await
            .unwrap_or_else(|_| {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the endpoint failed (panicked)\n",
                )
            });
    }
    route(admin, &parts.method, path, &body)
}

/// Serves admin requests on `listener` until `shutdown`, then gives open connections
/// [`STOP_GRACE`] to finish.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "admin server: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(handle(&admin, request).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
    tracker.close();
    if tokio::time::timeout(STOP_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::debug!(open = tracker.len(), "admin connections cut at stop");
    }
}

/// The admin server running on its own thread and runtime.
#[derive(Debug)]
pub struct AdminServer {
    addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AdminServer {
    /// Starts serving on a bound `listener`, on a new OS thread (`nodeward-admin`) with a
    /// current-thread runtime.
    pub fn start(listener: std::net::TcpListener, admin: Arc<Admin>) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name("nodeward-admin".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, admin, token).await,
                        Err(e) => tracing::error!(%addr, error = %e, "admin server cannot use its listener"),
                    }
                });
            })?;
        Ok(Self {
            addr,
            shutdown,
            thread: Some(thread),
        })
    }

    /// The address it listens on.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open admin requests finish (briefly), and joins the thread.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the admin server thread panicked");
            }
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.halt();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::authz::PolicySet;
    use crate::state::workloads::load_workloads;
    use crate::state::Snapshot;

    /// An admin over the examples (`examples/policies`, `examples/workloads.yaml`).
    pub(crate) fn admin() -> Admin {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let loaded = crate::policy::load_paths(&[examples.join("policies")]);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let registry = load_workloads(&examples.join("workloads.yaml")).expect("workloads");
        let snapshot = Snapshot::build(
            1,
            "cluster.local",
            "istio-system",
            registry.workloads.into_iter().map(Arc::new).collect(),
            PolicySet::compile(&loaded.authorization_policies, "istio-system"),
            crate::authn::AuthnSet::compile(&loaded.request_authentications, "istio-system"),
            Vec::new(),
        );
        let jwks = JwksStore::new(crate::authn::fetch::FetchConfig::default()).expect("jwks");
        Admin {
            store: Arc::new(StateStore::new(snapshot)),
            jwks_metrics: JwksMetrics::new(jwks.clone()),
            jwks,
            cache: TokenCache::new(64 * 1024),
            metrics: Arc::new(Metrics::new()),
            readiness: Arc::new(Readiness::new()),
            config: Config {
                listen: "127.0.0.1:15006".parse().expect("addr"),
                policies: vec![examples.join("policies")],
                workloads: Some(examples.join("workloads.yaml")),
                ..Config::default()
            },
            normalization: Normalization::Base,
            datapath: None,
            endpoints: Vec::new(),
        }
    }

    pub(crate) fn body(response: &Response<Body>) -> String {
        let collected = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(response.body().clone().collect())
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        String::from_utf8_lossy(&collected).into_owned()
    }

    pub(crate) fn header<'a>(response: &'a Response<Body>, name: &str) -> &'a str {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    #[test]
    fn health_readiness_and_unknown_paths() {
        let admin = admin();
        let ok = route(&admin, &Method::GET, "/healthz", b"");
        assert_eq!((ok.status(), body(&ok).as_str()), (StatusCode::OK, "ok\n"));

        let attached = admin
            .readiness
            .add_flag("datapath", "programs not attached");
        let waiting = route(&admin, &Method::GET, "/readyz", b"");
        assert_eq!(waiting.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body(&waiting),
            "[-]datapath programs not attached\nnot ready\n"
        );
        attached.store(true, Ordering::Release);
        assert_eq!(
            route(&admin, &Method::GET, "/readyz", b"").status(),
            StatusCode::OK
        );

        let missing = route(&admin, &Method::GET, "/nope", b"");
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        let wrong = route(&admin, &Method::POST, "/metrics", b"");
        assert_eq!(
            (wrong.status(), header(&wrong, "allow")),
            (StatusCode::METHOD_NOT_ALLOWED, "GET")
        );
    }

    #[test]
    fn added_endpoints_answer_post_only_and_are_listed() {
        let mut admin = admin();
        admin.endpoints.push(Endpoint {
            path: "/echo",
            about: "says the body back",
            handler: Box::new(|_, body| text(StatusCode::OK, body.to_vec())),
        });
        let echo = route(&admin, &Method::POST, "/echo", b"hello");
        assert_eq!(
            (echo.status(), body(&echo).as_str()),
            (StatusCode::OK, "hello")
        );
        let wrong = route(&admin, &Method::GET, "/echo", b"");
        assert_eq!(
            (wrong.status(), header(&wrong, "allow")),
            (StatusCode::METHOD_NOT_ALLOWED, "POST")
        );
        let index = route(&admin, &Method::GET, "/", b"");
        assert!(
            body(&index).ends_with("POST /echo         says the body back\n"),
            "{}",
            body(&index)
        );
    }

    #[test]
    fn datapath_log_level_needs_the_data_path_and_a_number() {
        let admin = admin();
        let off = route(&admin, &Method::POST, "/debug/datapath/log", b"2");
        assert_eq!(
            off.status(),
            StatusCode::CONFLICT,
            "--datapath off: nothing to switch"
        );
        let wrong = route(&admin, &Method::GET, "/debug/datapath/log", b"");
        assert_eq!(wrong.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn metrics_are_openmetrics() {
        let admin = admin();
        let metrics = route(&admin, &Method::GET, "/metrics", b"");
        assert_eq!(header(&metrics, "content-type"), OPENMETRICS);
        let text = body(&metrics);
        assert!(text.contains("# TYPE nodeward_requests counter"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn debug_state_lists_the_registry_and_no_key_material() {
        let admin = admin();
        let response = route(&admin, &Method::GET, "/debug/state", b"");
        let text = body(&response);
        let state: DebugState = serde_json::from_str(&text).expect("a DebugState");
        assert_eq!(state.workloads.len(), 5);
        assert_eq!(state.policies.len(), 4);
        let get_only = state
            .policies
            .iter()
            .find(|p| p.id == "foo/get-only")
            .expect("foo/get-only");
        assert_eq!(get_only.workloads, ["foo/httpbin-get"]);
        assert_eq!(
            state.issuers[0].kids,
            ["DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ"]
        );
        assert!(
            !text.contains("xAE7eB6qugXyCAG3yhh7pkDkT65p"),
            "the modulus: {text}"
        );
        assert!(!text.contains("\"n\""), "{text}");
    }
}
