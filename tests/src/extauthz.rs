//! Real external authorizers for the CUSTOM action's tests, behaving like Istio's ext-authz
//! sample (istio/istio `samples/extauthz/cmd/extauthz/main.go`), over both protocols Envoy's
//! `ext_authz` filter speaks:
//!
//! - HTTP (Envoy's raw HTTP `ext_authz` client calls it): a request with `x-ext-authz: allow`
//!   is allowed (200, `x-ext-authz-check-result: allowed`); any other is denied (403, body
//!   [`DENY_BODY`], `x-ext-authz-check-result: denied`). Either answer carries
//!   `x-ext-authz-check-received` (the check as received, as the sample echoes it) and
//!   `x-ext-authz-additional-header-override` (the value received in the check);
//! - gRPC (`envoy.service.auth.v3.Authorization/Check`, served by tonic with `envoy-types`'
//!   protos): `x-ext-authz: allow` allows and another value denies; without the header, a
//!   source principal ending in `/sa/<allow_service_account>` (`a` by default) allows. An
//!   allow sets `x-ext-authz-check-result: allowed`, `x-ext-authz-check-received` and
//!   `x-ext-authz-additional-header-override: grpc-additional-header-override-value` on the
//!   request; a denial is `PERMISSION_DENIED` with a 403 `denied_response` carrying the body
//!   and `x-ext-authz-check-result: denied`.
//!
//! [`Behavior`] adds what the sample cannot do, for the tests' rows: a fixed delay (timeouts),
//! failures (a status such as 5xx, a closed connection, a failed RPC), more headers on allow
//! (for the request to the pod, to remove from it, for the client) and on deny, another deny
//! status and body. Every check received is recorded as a [`Check`] (method, path, headers,
//! body; for gRPC the peers too) so a test can assert what the provider saw.
//!
//! [`ExtAuthz`] runs the servers on a thread of their own with their own tokio runtime, on
//! listeners the caller bound (in any network namespace: [`bind_in`]); dropping it stops them.
//! The `nw-ext-authz` binary runs the same servers as a process (a provider pod), writing each
//! check as a JSON line ([`Check::to_json`], read back with [`read_checks`]).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{
    address, HeaderValue as EnvoyHeader, HeaderValueOption, QueryParameter,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// The header the sample decides on, and the value that allows.
pub const CHECK_HEADER: &str = "x-ext-authz";
pub const ALLOWED_VALUE: &str = "allow";
/// The sample's answer header: `allowed` or `denied`.
pub const RESULT_HEADER: &str = "x-ext-authz-check-result";
/// The sample's echo of the check it received.
pub const RECEIVED_HEADER: &str = "x-ext-authz-check-received";
/// The sample's header that the HTTP server mirrors and the gRPC one sets to a constant.
pub const OVERRIDE_HEADER: &str = "x-ext-authz-additional-header-override";
/// The gRPC server's value of [`OVERRIDE_HEADER`].
pub const OVERRIDE_GRPC_VALUE: &str = "grpc-additional-header-override-value";
/// The sample's denial body.
pub const DENY_BODY: &str =
    "denied by ext_authz for not found header `x-ext-authz: allow` in the request";
/// The body of a failure's answer ([`Failure::Status`]), with `x-ext-authz-check-result: error`.
pub const FAILURE_BODY: &str = "ext_authz failure on purpose";
/// Envoy's header by which an HTTP provider names request headers to remove on allow.
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// gRPC status codes used here (google.rpc.Code).
const GRPC_OK: i32 = 0;
const GRPC_PERMISSION_DENIED: i32 = 7;
const GRPC_INTERNAL: i32 = 13;

/// The most body a check may carry that is recorded.
const MAX_BODY: usize = 1 << 20;

/// A way to fail a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// HTTP: answers this status (a 5xx is an error to Envoy); gRPC: a `CheckResponse` with
    /// status `INTERNAL` and an `error_response` of this status. Either answer has the body
    /// [`FAILURE_BODY`] and `x-ext-authz-check-result: error`.
    Status(u16),
    /// HTTP: closes the connection without an answer; gRPC: fails the RPC with `UNAVAILABLE`.
    Close,
}

/// How the authorizers answer; [`Behavior::default`] is Istio's sample.
#[derive(Debug, Clone)]
pub struct Behavior {
    /// Waited before answering (after the check is recorded).
    pub delay: Duration,
    /// Fail every check this way instead of deciding.
    pub failure: Option<Failure>,
    /// gRPC: without `x-ext-authz`, a source principal ending in `/sa/<this>` is allowed.
    pub allow_service_account: String,
    /// On allow, headers for the request to the pod (HTTP: answer headers, which the agent
    /// passes when `headersToUpstreamOnAllow` lists them; gRPC: `ok_response.headers`, set).
    pub upstream_on_allow: Vec<(String, String)>,
    /// gRPC: on allow, headers appended to the request (`append: true`).
    pub append_on_allow: Vec<(String, String)>,
    /// On allow, request headers to remove (HTTP: `x-envoy-auth-headers-to-remove`; gRPC:
    /// `ok_response.headers_to_remove`).
    pub remove_on_allow: Vec<String>,
    /// On allow, headers for the client (HTTP: answer headers that `headersToDownstreamOnAllow`
    /// must list; gRPC: `ok_response.response_headers_to_add`).
    pub downstream_on_allow: Vec<(String, String)>,
    /// gRPC: on allow, query parameters to set on / remove from the request
    /// (`ok_response.query_parameters_to_set` / `query_parameters_to_remove`).
    pub query_set: Vec<(String, String)>,
    pub query_remove: Vec<String>,
    /// The status of a denial (default 403).
    pub deny_status: u16,
    /// More headers on a denial.
    pub deny_headers: Vec<(String, String)>,
    /// The body of a denial (default [`DENY_BODY`]).
    pub deny_body: String,
}

impl Default for Behavior {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            failure: None,
            allow_service_account: "a".into(),
            upstream_on_allow: Vec::new(),
            append_on_allow: Vec::new(),
            remove_on_allow: Vec::new(),
            downstream_on_allow: Vec::new(),
            query_set: Vec::new(),
            query_remove: Vec::new(),
            deny_status: 403,
            deny_headers: Vec::new(),
            deny_body: DENY_BODY.into(),
        }
    }
}

/// Which server received a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// A peer of a gRPC `CheckRequest` (`attributes.source` / `attributes.destination`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckPeer {
    /// `ip:port` of `address.socket_address`.
    pub address: String,
    pub principal: String,
}

/// One check as the authorizer received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub protocol: Protocol,
    /// HTTP: the check request's method; gRPC: `attributes.request.http.method`.
    pub method: String,
    /// HTTP: the check request's path and query; gRPC: `attributes.request.http.path`.
    pub path: String,
    /// HTTP: `Host`; gRPC: `attributes.request.http.host`.
    pub host: String,
    /// Lower-case names, in the order received (gRPC: the `headers` map, sorted by name).
    pub headers: Vec<(String, String)>,
    /// HTTP: the check request's body; gRPC: `body`, or `raw_body` when that is set.
    pub body: Vec<u8>,
    /// gRPC: the body came in `raw_body` (`packAsBytes`).
    pub raw_body: bool,
    /// gRPC: `attributes.request.http.size` and `.protocol`.
    pub size: i64,
    pub http_protocol: String,
    /// gRPC: `attributes.source` and `attributes.destination`.
    pub source: Option<CheckPeer>,
    pub destination: Option<CheckPeer>,
    /// gRPC: the check has no HTTP request (a TCP connection, Envoy's network filter).
    pub tcp: bool,
}

impl Check {
    /// The first value of header `name` (lower case).
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The header names, in order.
    #[must_use]
    pub fn header_names(&self) -> Vec<&str> {
        self.headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// One JSON object (the binary's log line).
    #[must_use]
    pub fn to_json(&self) -> Value {
        let peer = |p: &Option<CheckPeer>| {
            p.as_ref()
                .map(|p| json!({"address": p.address, "principal": p.principal}))
        };
        json!({
            "check": match self.protocol { Protocol::Http => "http", Protocol::Grpc => "grpc" },
            "method": self.method,
            "path": self.path,
            "host": self.host,
            "headers": self.headers.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(),
            "body": String::from_utf8_lossy(&self.body),
            "raw_body": self.raw_body,
            "size": self.size,
            "http_protocol": self.http_protocol,
            "source": peer(&self.source),
            "destination": peer(&self.destination),
            "tcp": self.tcp,
        })
    }

    /// The inverse of [`Check::to_json`] (bodies as UTF-8); `None` for another object.
    #[must_use]
    pub fn from_json(value: &Value) -> Option<Self> {
        let text = |key: &str| value.get(key)?.as_str().map(str::to_owned);
        let protocol = match value.get("check")?.as_str()? {
            "http" => Protocol::Http,
            "grpc" => Protocol::Grpc,
            _ => return None,
        };
        let peer = |key: &str| {
            let p = value.get(key)?;
            Some(CheckPeer {
                address: p.get("address")?.as_str()?.to_owned(),
                principal: p.get("principal")?.as_str()?.to_owned(),
            })
        };
        let headers = value
            .get("headers")?
            .as_array()?
            .iter()
            .filter_map(|pair| {
                Some((
                    pair.get(0)?.as_str()?.to_owned(),
                    pair.get(1)?.as_str()?.to_owned(),
                ))
            })
            .collect();
        Some(Self {
            protocol,
            method: text("method")?,
            path: text("path")?,
            host: text("host")?,
            headers,
            body: text("body")?.into_bytes(),
            raw_body: value.get("raw_body")?.as_bool()?,
            size: value.get("size")?.as_i64()?,
            http_protocol: text("http_protocol")?,
            source: peer("source"),
            destination: peer("destination"),
            tcp: value.get("tcp")?.as_bool()?,
        })
    }

    /// A one-line description for [`RECEIVED_HEADER`]: printable ASCII only, bounded (the
    /// sample replaces what is too long for a header).
    fn received(&self) -> String {
        let text = self.to_json().to_string();
        let text: String = text
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() || c == ' ' {
                    c
                } else {
                    '?'
                }
            })
            .collect();
        if text.len() > 8000 {
            "<too-long>".into()
        } else {
            text
        }
    }
}

/// The checks of a binary's log (`nw-ext-authz`'s stdout), in order; other lines are skipped.
#[must_use]
pub fn read_checks(log: &Path) -> Vec<Check> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Check::from_json(&v))
        .collect()
}

/// Binds `addr` inside network namespace `netns` (the socket stays in it wherever it is used).
#[must_use]
pub fn bind_in(netns: &str, addr: SocketAddr) -> TcpListener {
    crate::netns::in_netns(netns, || {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("binding {addr} in {netns}: {e}"))
    })
}

type Hook = Box<dyn Fn(&Check) + Send + Sync>;

/// What both servers share: the behavior, the record, an optional hook per check.
struct Shared {
    behavior: Mutex<Behavior>,
    checks: Mutex<Vec<Check>>,
    hook: Option<Hook>,
}

impl Shared {
    fn behavior(&self) -> Behavior {
        self.behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn record(&self, check: &Check) {
        if let Some(hook) = &self.hook {
            hook(check);
        }
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(check.clone());
    }
}

/// The authorizers, running; see the module documentation. Dropping it stops them.
pub struct ExtAuthz {
    http: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ExtAuthz {
    /// Serves HTTP checks on `http` and gRPC checks on `grpc` (either may be absent).
    #[must_use]
    pub fn start(http: Option<TcpListener>, grpc: Option<TcpListener>, behavior: Behavior) -> Self {
        Self::start_with(http, grpc, behavior, None)
    }

    /// [`ExtAuthz::start`], calling `hook` with every check as it is recorded.
    #[must_use]
    pub fn start_with(
        http: Option<TcpListener>,
        grpc: Option<TcpListener>,
        behavior: Behavior,
        hook: Option<Hook>,
    ) -> Self {
        let addr = |l: &Option<TcpListener>| {
            l.as_ref()
                .map(|l| l.local_addr().expect("a bound listener's address"))
        };
        let (http_addr, grpc_addr) = (addr(&http), addr(&grpc));
        for l in http.iter().chain(grpc.iter()) {
            l.set_nonblocking(true).expect("non-blocking listener");
        }
        let shared = Arc::new(Shared {
            behavior: Mutex::new(behavior),
            checks: Mutex::new(Vec::new()),
            hook,
        });
        let (stop, stopped) = oneshot::channel();
        let (ready, is_ready) = std::sync::mpsc::channel();
        let serving = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ext-authz".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the authorizers' runtime");
                runtime.block_on(async move {
                    if let Some(l) = http {
                        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                        tokio::spawn(serve_http(l, serving.clone()));
                    }
                    if let Some(l) = grpc {
                        let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                        tokio::spawn(serve_grpc(l, serving.clone()));
                    }
                    let _ = ready.send(());
                    let _ = stopped.await;
                });
                // Connections and delayed answers still open are dropped with the runtime.
                runtime.shutdown_timeout(Duration::from_millis(200));
            })
            .expect("the authorizers' thread");
        is_ready
            .recv_timeout(Duration::from_secs(5))
            .expect("the authorizers started");
        Self {
            http: http_addr,
            grpc: grpc_addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The HTTP server's address.
    #[must_use]
    pub fn http_addr(&self) -> SocketAddr {
        self.http.expect("the HTTP authorizer was started")
    }

    /// The gRPC server's address.
    #[must_use]
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc.expect("the gRPC authorizer was started")
    }

    /// Every check received so far, in order.
    #[must_use]
    pub fn checks(&self) -> Vec<Check> {
        self.shared
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many checks were received so far.
    #[must_use]
    pub fn count(&self) -> usize {
        self.shared
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The last check received.
    #[must_use]
    pub fn last(&self) -> Option<Check> {
        self.checks().pop()
    }

    /// Changes how the next checks are answered.
    pub fn set_behavior(&self, behavior: Behavior) {
        *self
            .shared
            .behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = behavior;
    }
}

impl Drop for ExtAuthz {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The HTTP server: HTTP/1.1 and h2c on every connection.
async fn serve_http(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                async move { http_check(req, &shared).await }
            });
            // A service error (Failure::Close) ends the connection without an answer.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The connection is closed without an answer.
#[derive(Debug)]
struct Closed;

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed on purpose")
    }
}

impl std::error::Error for Closed {}

fn response(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

fn add_header(r: &mut Response<Full<Bytes>>, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        hyper::header::HeaderName::from_bytes(name.as_bytes()),
        hyper::header::HeaderValue::from_str(value),
    ) {
        r.headers_mut().append(n, v);
    }
}

/// One HTTP check: the sample's decision (`x-ext-authz: allow`) or the configured failure.
async fn http_check(
    req: Request<Incoming>,
    shared: &Shared,
) -> Result<Response<Full<Bytes>>, Closed> {
    let (parts, body) = req.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let check = Check {
        protocol: Protocol::Http,
        method: parts.method.as_str().to_owned(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str)
            .to_owned(),
        host: parts
            .headers
            .get(hyper::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        headers: parts
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
        raw_body: false,
        size: i64::try_from(body.len()).unwrap_or(-1),
        http_protocol: format!("{:?}", parts.version),
        source: None,
        destination: None,
        tcp: false,
    };
    shared.record(&check);
    let behavior = shared.behavior();
    tokio::time::sleep(behavior.delay).await;
    match behavior.failure {
        Some(Failure::Close) => return Err(Closed),
        Some(Failure::Status(status)) => {
            let mut r = response(status, FAILURE_BODY);
            add_header(&mut r, RESULT_HEADER, "error");
            return Ok(r);
        }
        None => {}
    }
    let override_value = check.header(OVERRIDE_HEADER).unwrap_or_default().to_owned();
    let received = check.received();
    let mut r = if check.header(CHECK_HEADER) == Some(ALLOWED_VALUE) {
        let mut r = response(200, Bytes::new());
        add_header(&mut r, RESULT_HEADER, "allowed");
        for (n, v) in behavior
            .upstream_on_allow
            .iter()
            .chain(&behavior.downstream_on_allow)
        {
            add_header(&mut r, n, v);
        }
        if !behavior.remove_on_allow.is_empty() {
            add_header(
                &mut r,
                HEADERS_TO_REMOVE,
                &behavior.remove_on_allow.join(","),
            );
        }
        r
    } else {
        let mut r = response(behavior.deny_status, behavior.deny_body.clone());
        add_header(&mut r, RESULT_HEADER, "denied");
        for (n, v) in &behavior.deny_headers {
            add_header(&mut r, n, v);
        }
        r
    };
    add_header(&mut r, OVERRIDE_HEADER, &override_value);
    add_header(&mut r, RECEIVED_HEADER, &received);
    Ok(r)
}

/// The gRPC server: `envoy.service.auth.v3.Authorization` only.
async fn serve_grpc(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    // No Nagle: an answer waiting for the client's delayed ACK would add 40 ms to each check.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let _ = tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            AuthorizationServer::new(Grpc { shared }),
            incoming,
            std::future::pending::<()>(),
        )
        .await;
}

struct Grpc {
    shared: Arc<Shared>,
}

fn peer(p: Option<&Peer>) -> Option<CheckPeer> {
    let p = p?;
    let address = match p.address.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => {
            let port = match s.port_specifier {
                Some(
                    envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                        port,
                    ),
                ) => port,
                _ => 0,
            };
            if s.address.contains(':') {
                format!("[{}]:{port}", s.address)
            } else {
                format!("{}:{port}", s.address)
            }
        }
        _ => String::new(),
    };
    Some(CheckPeer {
        address,
        principal: p.principal.clone(),
    })
}

fn option(name: &str, value: &str, append: Option<bool>) -> HeaderValueOption {
    #[expect(
        deprecated,
        reason = "`append` is what the sample and many providers still send"
    )]
    HeaderValueOption {
        header: Some(EnvoyHeader {
            key: name.to_owned(),
            value: value.to_owned(),
            ..EnvoyHeader::default()
        }),
        append: append.map(|value| envoy_types::pb::google::protobuf::BoolValue { value }),
        ..HeaderValueOption::default()
    }
}

fn grpc_check(request: &CheckRequest) -> Check {
    let attributes = request.attributes.clone().unwrap_or_default();
    let http = attributes.request.and_then(|r| r.http);
    let mut headers: Vec<(String, String)> = http
        .as_ref()
        .map(|h| h.headers.clone().into_iter().collect())
        .unwrap_or_default();
    headers.sort();
    let h = http.clone().unwrap_or_default();
    let raw_body = !h.raw_body.is_empty();
    Check {
        protocol: Protocol::Grpc,
        method: h.method,
        path: h.path,
        host: h.host,
        headers,
        body: if raw_body {
            h.raw_body
        } else {
            h.body.into_bytes()
        },
        raw_body,
        size: h.size,
        http_protocol: h.protocol,
        source: peer(attributes.source.as_ref()),
        destination: peer(attributes.destination.as_ref()),
        tcp: http.is_none(),
    }
}

#[tonic::async_trait]
impl Authorization for Grpc {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let check = grpc_check(request.get_ref());
        self.shared.record(&check);
        let behavior = self.shared.behavior();
        tokio::time::sleep(behavior.delay).await;
        let received = check.received();
        let answer = match behavior.failure {
            Some(Failure::Close) => {
                return Err(tonic::Status::unavailable(FAILURE_BODY));
            }
            Some(Failure::Status(status)) => CheckResponse {
                status: Some(RpcStatus {
                    code: GRPC_INTERNAL,
                    message: FAILURE_BODY.into(),
                    ..RpcStatus::default()
                }),
                http_response: Some(HttpResponse::ErrorResponse(DeniedHttpResponse {
                    status: Some(HttpStatus {
                        code: i32::from(status),
                    }),
                    headers: vec![option(RESULT_HEADER, "error", None)],
                    body: FAILURE_BODY.into(),
                })),
                ..CheckResponse::default()
            },
            None => {
                let allow = match check.header(CHECK_HEADER) {
                    Some(value) => value == ALLOWED_VALUE,
                    None => check.source.as_ref().is_some_and(|s| {
                        s.principal
                            .ends_with(&format!("/sa/{}", behavior.allow_service_account))
                    }),
                };
                if allow {
                    allowed(&behavior, &received)
                } else {
                    denied(&behavior, &received)
                }
            }
        };
        Ok(tonic::Response::new(answer))
    }
}

/// The sample's allow, with the behavior's additions.
fn allowed(behavior: &Behavior, received: &str) -> CheckResponse {
    let mut headers = vec![
        option(RESULT_HEADER, "allowed", None),
        option(RECEIVED_HEADER, received, None),
        option(OVERRIDE_HEADER, OVERRIDE_GRPC_VALUE, None),
    ];
    headers.extend(
        behavior
            .upstream_on_allow
            .iter()
            .map(|(n, v)| option(n, v, Some(false))),
    );
    headers.extend(
        behavior
            .append_on_allow
            .iter()
            .map(|(n, v)| option(n, v, Some(true))),
    );
    CheckResponse {
        status: Some(RpcStatus {
            code: GRPC_OK,
            ..RpcStatus::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: behavior.remove_on_allow.clone(),
            response_headers_to_add: behavior
                .downstream_on_allow
                .iter()
                .map(|(n, v)| option(n, v, None))
                .collect(),
            query_parameters_to_set: behavior
                .query_set
                .iter()
                .map(|(key, value)| QueryParameter {
                    key: key.clone(),
                    value: value.clone(),
                })
                .collect(),
            query_parameters_to_remove: behavior.query_remove.clone(),
            ..OkHttpResponse::default()
        })),
        ..CheckResponse::default()
    }
}

/// The sample's denial, with the behavior's status, headers and body.
fn denied(behavior: &Behavior, received: &str) -> CheckResponse {
    let mut headers = vec![
        option(RESULT_HEADER, "denied", None),
        option(RECEIVED_HEADER, received, None),
        option(OVERRIDE_HEADER, OVERRIDE_GRPC_VALUE, None),
    ];
    headers.extend(
        behavior
            .deny_headers
            .iter()
            .map(|(n, v)| option(n, v, None)),
    );
    CheckResponse {
        status: Some(RpcStatus {
            code: GRPC_PERMISSION_DENIED,
            ..RpcStatus::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(behavior.deny_status),
            }),
            headers,
            body: behavior.deny_body.clone(),
        })),
        ..CheckResponse::default()
    }
}
