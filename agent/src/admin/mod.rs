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
//! | `POST /check` | a JSON [`CheckRequest`] judged against the live state; the body `nodeward check` prints |
//!
//! [`client`] is the other end, used by `nodeward status` and `nodeward check --admin`.

pub mod client;
pub mod jwks_metrics;
pub mod state;

use std::convert::Infallible;
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
use crate::cli::check::{
    decide, CheckRequest, Inputs, Output, CONFIG_ERRORS_HEADER, DECISION_HEADER,
};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::state::StateStore;
pub use jwks_metrics::JwksMetrics;
pub use state::{AgentConfig, DebugState};

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
    pub config: AgentConfig,
    /// The enforcer's path normalization, which `POST /check` applies by default.
    pub normalization: Normalization,
    /// The kernel data path, when the agent runs it (`POST /debug/datapath/log`).
    pub datapath: Option<Arc<crate::datapath::node::NodeDatapath>>,
}

type Body = Full<Bytes>;

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
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
    POST /check        judge a described request against the live state (JSON body, as `nodeward check` flags)\n\
    POST /debug/datapath/log  kernel programs' log level (body: 0 off, 1 decisions, 2 every protected packet)\n";

/// Answers one request; `body` is the request body (empty but for `POST`).
#[must_use]
pub fn route(admin: &Admin, method: &Method, path: &str, body: &[u8]) -> Response<Body> {
    let get = method == Method::GET || method == Method::HEAD;
    match path {
        "/" if get => text(StatusCode::OK, INDEX),
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
        "/check" if method == Method::POST => check(admin, body),
        "/debug/datapath/log" if method == Method::POST => datapath_log(admin, body),
        "/" | "/healthz" | "/readyz" | "/metrics" | "/debug/state" => method_not_allowed("GET"),
        "/check" => method_not_allowed("POST"),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {path}\n\n{INDEX}"),
        ),
    }
}

/// `POST /check`: the answer `nodeward check` prints, judged against the live state. 200 with
/// the decision in [`DECISION_HEADER`]; 400 with `error: ...` for a request `check` would
/// refuse with exit status 2.
fn check(admin: &Admin, body: &[u8]) -> Response<Body> {
    let request: CheckRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CheckRequest::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("error: not a check request (a JSON object of check's fields): {e}\n"),
                )
            }
        }
    };
    let snapshot = admin.store.load();
    let inputs = Inputs::Live {
        snapshot: &snapshot,
        jwks: &admin.jwks,
        cache: &admin.cache,
        normalization: admin.normalization,
    };
    match decide(&request, &inputs) {
        Ok(checked) => {
            let mut response = text(StatusCode::OK, checked.output + "\n");
            let headers = response.headers_mut();
            if request.output == Output::Json {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            headers.insert(
                DECISION_HEADER,
                HeaderValue::from_static(if checked.allowed { "allow" } else { "deny" }),
            );
            headers.insert(
                CONFIG_ERRORS_HEADER,
                HeaderValue::from(snapshot.errors.len()),
            );
            response
        }
        Err(e) => text(StatusCode::BAD_REQUEST, format!("error: {e}\n")),
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

async fn handle(admin: &Admin, request: hyper::Request<Incoming>) -> Response<Body> {
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
    route(admin, &parts.method, parts.uri.path(), &body)
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
mod tests {
    use std::path::Path;
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::authz::PolicySet;
    use crate::cli::run::FailureMode;
    use crate::state::workloads::load_workloads;
    use crate::state::Snapshot;

    /// An admin over the examples (`examples/policies`, `examples/workloads.yaml`).
    fn admin() -> Admin {
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
            config: AgentConfig {
                failure_mode: FailureMode::Closed,
                listen: "127.0.0.1:15006".parse().expect("addr"),
                admin: "127.0.0.1:15000".parse().expect("addr"),
                root_namespace: "istio-system".into(),
                trust_domain: "cluster.local".into(),
                policies: vec![examples.join("policies")],
                workloads: examples.join("workloads.yaml"),
                path_normalization: "base".into(),
                drain_timeout: "20s".into(),
                max_header_bytes: 61_440,
                max_headers: 100,
                header_read_timeout: "10s".into(),
                detect_timeout: "5s".into(),
                kubernetes: None,
            },
            normalization: Normalization::Base,
            datapath: None,
        }
    }

    fn body(response: &Response<Body>) -> String {
        let collected = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(response.body().clone().collect())
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        String::from_utf8_lossy(&collected).into_owned()
    }

    fn header<'a>(response: &'a Response<Body>, name: &str) -> &'a str {
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
        let wrong = route(&admin, &Method::GET, "/check", b"");
        assert_eq!(
            (wrong.status(), header(&wrong, "allow")),
            (StatusCode::METHOD_NOT_ALLOWED, "POST")
        );
        let wrong = route(&admin, &Method::POST, "/metrics", b"");
        assert_eq!(
            (wrong.status(), header(&wrong, "allow")),
            (StatusCode::METHOD_NOT_ALLOWED, "GET")
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
    fn check_uses_the_registry_for_addresses() {
        let admin = admin();
        let request = br#"{"dest_ip": "10.200.0.13", "source_ip": "10.200.0.20"}"#;
        let response = route(&admin, &Method::POST, "/check", request);
        assert_eq!(response.status(), StatusCode::OK, "{}", body(&response));
        assert_eq!(header(&response, DECISION_HEADER), "allow");
        assert_eq!(header(&response, CONFIG_ERRORS_HEADER), "0");
        let json: serde_json::Value = serde_json::from_str(&body(&response)).expect("JSON");
        assert_eq!(json["policy"], "foo/get-only");
        assert_eq!(json["source_principal"], "cluster.local/ns/foo/sa/sleep");

        let text = route(
            &admin,
            &Method::POST,
            "/check",
            br#"{"namespace": "foo", "labels": {"app": "httpbin-get"}, "method": "POST", "output": "text"}"#,
        );
        assert_eq!(header(&text, DECISION_HEADER), "deny");
        assert!(
            body(&text).starts_with("workload:  foo {app=httpbin-get}\n"),
            "{}",
            body(&text)
        );
    }

    #[test]
    fn bad_check_requests_are_400_with_the_reason() {
        let admin = admin();
        for (request, reason) in [
            (&b"{"[..], "not a check request"),
            (br#"{"namespaec": "foo"}"#, "unknown field `namespaec`"),
            (b"", "no destination workload"),
            (br#"{"dest_ip": "10.9.9.9"}"#, "no workload at this address"),
            (
                br#"{"namespace": "foo", "claims": [1]}"#,
                "--claims: not a JSON object",
            ),
            (
                br#"{"namespace": "foo", "headers": ["no colon"]}"#,
                "-H: header",
            ),
            (
                br#"{"namespace": "foo", "path_normalization": "weird"}"#,
                "--path-normalization",
            ),
        ] {
            let response = route(&admin, &Method::POST, "/check", request);
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let text = body(&response);
            assert!(
                text.starts_with("error: ") && text.contains(reason),
                "{reason}: {text}"
            );
        }
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
