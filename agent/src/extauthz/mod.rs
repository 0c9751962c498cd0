//! The CUSTOM action's external authorizers, called as Envoy's `ext_authz` filter calls them
//! under Istio's configuration: [`mesh`] reads the `MeshConfig` `extensionProviders`; [`Client`]
//! sends one check to a provider over HTTP ([`http`], Envoy's raw HTTP client) or gRPC
//! ([`grpc`], `envoy.service.auth.v3.Authorization/Check`) and returns a [`CheckResult`]:
//! allowed (with the request and response changes the provider asked for), denied (the
//! provider's status, headers and body for the client) or an error (timeout, connection
//! refused, a 5xx from an HTTP provider, a failed RPC), which `failOpen` and `statusOnError`
//! turn into the client's answer ([`CheckResult::failure`]).

pub mod grpc;
pub mod http;
pub mod mesh;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use bytes::Bytes;

pub use mesh::{Kind, MeshError, MeshProviders, ProviderConfig};

/// The request header that says whether the body in the check is partial (Envoy's
/// `x-envoy-auth-partial-body`).
pub const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// What a check describes: the connection, and the HTTP request when there is one (a TCP
/// connection is checked by gRPC providers only, as Envoy's network `ext_authz` filter does).
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    pub source: SocketAddr,
    /// `<trust-domain>/ns/<ns>/sa/<sa>` of the client workload; sent as `spiffe://...`.
    pub source_principal: Option<&'a str>,
    pub destination: SocketAddr,
    /// The destination workload's principal, same form.
    pub destination_principal: Option<&'a str>,
    pub http: Option<HttpInput<'a>>,
}

/// The HTTP request as the provider sees it.
#[derive(Debug, Clone, Copy)]
pub struct HttpInput<'a> {
    pub method: &'a str,
    /// The normalized path with its query, as the pod would receive it.
    pub path: &'a str,
    /// The authority (`Host` / `:authority`).
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    /// `HTTP/1.1`, `HTTP/1.0` or `HTTP/2`.
    pub protocol: &'a str,
    /// The body gathered for the check (only when the provider asks for it) and whether it is
    /// partial.
    pub body: Option<(&'a Bytes, bool)>,
    /// The body's full size when known (`Content-Length`), else -1.
    pub size: i64,
}

/// What an allowing provider asks to change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowed {
    /// Set on the request to the pod (replacing values of the same name).
    pub upstream_set: Vec<(HeaderName, HeaderValue)>,
    /// Appended to the request to the pod.
    pub upstream_append: Vec<(HeaderName, HeaderValue)>,
    /// Added to the request to the pod when it has no header of that name.
    pub upstream_add_if_absent: Vec<(HeaderName, HeaderValue)>,
    /// Removed from the request to the pod.
    pub upstream_remove: Vec<HeaderName>,
    /// Added to the response to the client.
    pub downstream_add: Vec<(HeaderName, HeaderValue)>,
    /// Query parameters set on / removed from the request to the pod (gRPC providers).
    pub query_set: Vec<(String, String)>,
    pub query_remove: Vec<String>,
}

/// A provider's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allowed(Allowed),
    /// The client gets this answer.
    Denied {
        status: StatusCode,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
    /// The check failed (timeout, connection, 5xx, RPC error); says what.
    Error(String),
    /// The provider reported its own failure with an answer for the client (gRPC
    /// `error_response`): a failed check for `failOpen`; without it the client gets this
    /// status (else `statusOnError`), these headers and this body, as Envoy sends them.
    ErrorAnswer {
        message: String,
        status: Option<StatusCode>,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
}

impl Outcome {
    /// What failed, for a failed check.
    #[must_use]
    pub fn error(&self) -> Option<&str> {
        match self {
            Self::Error(e) | Self::ErrorAnswer { message: e, .. } => Some(e),
            _ => None,
        }
    }
}

/// One check: which provider, what it said, how long it took.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub provider: String,
    pub outcome: Outcome,
    pub elapsed: Duration,
    /// The provider's `failOpen`.
    pub fail_open: bool,
    /// The provider's `statusOnError`.
    pub status_on_error: StatusCode,
}

impl CheckResult {
    /// `allowed`, `denied` or `error`: the `result` label and the access log's word.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self.outcome {
            Outcome::Allowed(_) => "allowed",
            Outcome::Denied { .. } => "denied",
            Outcome::Error(_) | Outcome::ErrorAnswer { .. } => "error",
        }
    }

    /// For a failed check: `None` when `failOpen` lets the request go on, else the status the
    /// client gets (Envoy answers `status_on_error` with an empty body).
    #[must_use]
    pub fn failure(&self) -> Option<Option<StatusCode>> {
        match &self.outcome {
            Outcome::Error(_) | Outcome::ErrorAnswer { .. } if self.fail_open => Some(None),
            Outcome::Error(_) => Some(Some(self.status_on_error)),
            Outcome::ErrorAnswer { status, .. } => {
                Some(Some(status.unwrap_or(self.status_on_error)))
            }
            _ => None,
        }
    }
}

/// Calls providers; one per agent (and one per `nodeward check`). HTTP connections are pooled
/// per provider address; gRPC channels are kept per provider address and multiplexed.
#[derive(Debug, Clone, Default)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    http: std::sync::OnceLock<http::HttpClient>,
    grpc: Mutex<HashMap<(String, u16), tonic::transport::Channel>>,
}

impl Client {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks `provider` about one request or connection, within its `timeout`.
    pub async fn check(&self, provider: &ProviderConfig, input: &CheckInput<'_>) -> CheckResult {
        let started = Instant::now();
        let call = async {
            match &provider.kind {
                Kind::Http(settings) => {
                    let Some(http) = input.http else {
                        // Istio never calls an HTTP provider for a TCP connection; the
                        // evaluation skips it, so this is only a guard.
                        return Outcome::Error(
                            "an HTTP provider cannot check a TCP connection".into(),
                        );
                    };
                    let client = self.inner.http.get_or_init(http::HttpClient::new);
                    client.check(provider, settings, &http).await
                }
                Kind::Grpc => {
                    let channel = self.channel(provider);
                    match channel {
                        Ok(channel) => grpc::check(channel, provider, input).await,
                        Err(e) => Outcome::Error(e),
                    }
                }
            }
        };
        let outcome = match tokio::time::timeout(provider.timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Error(format!(
                "no answer within the timeout ({})",
                humantime::format_duration(provider.timeout)
            )),
        };
        CheckResult {
            provider: provider.name.clone(),
            outcome,
            elapsed: started.elapsed(),
            fail_open: provider.fail_open,
            status_on_error: provider.status_on_error,
        }
    }

    fn channel(&self, provider: &ProviderConfig) -> Result<tonic::transport::Channel, String> {
        let key = (provider.host.clone(), provider.port);
        let mut channels = self
            .inner
            .grpc
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = channels.get(&key) {
            return Ok(c.clone());
        }
        let uri = format!("http://{}", authority(&provider.host, provider.port));
        let endpoint = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| format!("bad provider address: {e}"))?
            .connect_timeout(provider.timeout)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        channels.insert(key, channel.clone());
        Ok(channel)
    }
}

/// `host:port`, an IPv6 address in brackets.
#[must_use]
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Headers a provider may never set or remove on the request to the pod: the framing and the
/// hop (RFC 9110 7.6.1), and the authority that was judged.
#[must_use]
pub fn protected_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
    ) || name.starts_with(':')
}

impl Allowed {
    /// Applies the header changes to the request that goes to the pod (Envoy's order: set,
    /// append, add-if-absent, then remove).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.upstream_set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.upstream_append {
            headers.append(name.clone(), value.clone());
        }
        for (name, value) in &self.upstream_add_if_absent {
            if !headers.contains_key(name) {
                headers.insert(name.clone(), value.clone());
            }
        }
        for name in &self.upstream_remove {
            headers.remove(name);
        }
    }

    /// Applies the query changes to `query` (without `?`); `None` when nothing changes.
    #[must_use]
    pub fn apply_query(&self, query: Option<&str>) -> Option<Option<String>> {
        if self.query_set.is_empty() && self.query_remove.is_empty() {
            return None;
        }
        let mut pairs: Vec<(String, String)> = query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (p.to_owned(), String::new()),
            })
            .filter(|(k, _)| !self.query_remove.contains(k))
            .collect();
        for (k, v) in &self.query_set {
            let encoded = encode_query_component(v);
            match pairs.iter_mut().find(|(key, _)| key == k) {
                Some(pair) => pair.1 = encoded,
                None => pairs.push((encode_query_component(k), encoded)),
            }
        }
        let text: Vec<String> = pairs
            .into_iter()
            .map(|(k, v)| if v.is_empty() { k } else { format!("{k}={v}") })
            .collect();
        Some((!text.is_empty()).then(|| text.join("&")))
    }
}

/// Percent-encodes what may not appear raw in a query component (RFC 3986 3.4), and `&`, `=`,
/// `#`, `+`.
fn encode_query_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$'()*,;:@/?".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A check as `nodeward check` shows it (JSON, and one line of text).
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckReport {
    pub provider: String,
    /// `allowed`, `denied` or `error`.
    pub result: &'static str,
    pub elapsed_ms: f64,
    /// A denial's status and body.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Headers for the client (a denial's, or an allow's `headersToDownstreamOnAllow`).
    pub headers_to_client: Vec<String>,
    /// Headers set or appended on the request to the pod.
    pub headers_to_upstream: Vec<String>,
    pub headers_removed: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With an error: whether `failOpen` let the request go on.
    pub fail_open: bool,
}

fn lines(headers: &[(HeaderName, HeaderValue)]) -> Vec<String> {
    headers
        .iter()
        .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

impl CheckResult {
    #[must_use]
    pub fn report(&self) -> CheckReport {
        let mut r = CheckReport {
            provider: self.provider.clone(),
            result: self.label(),
            elapsed_ms: self.elapsed.as_secs_f64() * 1000.0,
            status: None,
            body: None,
            headers_to_client: Vec::new(),
            headers_to_upstream: Vec::new(),
            headers_removed: Vec::new(),
            error: None,
            fail_open: self.fail_open,
        };
        match &self.outcome {
            Outcome::Allowed(a) => {
                r.headers_to_client = lines(&a.downstream_add);
                r.headers_to_upstream = lines(&a.upstream_set);
                r.headers_to_upstream.extend(lines(&a.upstream_append));
                r.headers_to_upstream
                    .extend(lines(&a.upstream_add_if_absent));
                r.headers_removed = a.upstream_remove.iter().map(ToString::to_string).collect();
            }
            Outcome::Denied {
                status,
                headers,
                body,
            } => {
                r.status = Some(status.as_u16());
                r.body = Some(String::from_utf8_lossy(body).into_owned());
                r.headers_to_client = lines(headers);
            }
            Outcome::Error(e) => r.error = Some(e.clone()),
            Outcome::ErrorAnswer {
                message,
                status,
                headers,
                body,
            } => {
                r.error = Some(message.clone());
                r.status = status.map(|s| s.as_u16());
                r.body = Some(String::from_utf8_lossy(body).into_owned());
                r.headers_to_client = lines(headers);
            }
        }
        r
    }

    /// One line: what the provider said and how long it took.
    #[must_use]
    pub fn describe(&self) -> String {
        let ms = self.elapsed.as_secs_f64() * 1000.0;
        match &self.outcome {
            Outcome::Allowed(_) => format!("provider {} allowed ({ms:.1} ms)", self.provider),
            Outcome::Denied { status, .. } => format!(
                "provider {} denied with {} ({ms:.1} ms)",
                self.provider,
                status.as_u16()
            ),
            Outcome::Error(e) | Outcome::ErrorAnswer { message: e, .. } => format!(
                "provider {} failed: {e} ({ms:.1} ms); {}",
                self.provider,
                match self.failure() {
                    Some(Some(status)) => format!("failOpen is off: {}", status.as_u16()),
                    _ => "failOpen: the request goes on".to_owned(),
                }
            ),
        }
    }

    /// Asks from code that may or may not run inside a runtime (`nodeward check`, the agent's
    /// `POST /check`): the call runs on a thread of its own, with its own runtime.
    #[must_use]
    pub fn blocking(client: &Client, provider: &ProviderConfig, input: &CheckInput<'_>) -> Self {
        std::thread::scope(|s| {
            s.spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(rt) => rt.block_on(client.check(provider, input)),
                    Err(e) => Self::failed(provider, format!("cannot start a runtime: {e}")),
                }
            })
            .join()
            .unwrap_or_else(|_| Self::failed(provider, "the check panicked".into()))
        })
    }

    /// A check that failed before `provider` could be asked.
    fn failed(provider: &ProviderConfig, message: String) -> Self {
        Self {
            provider: provider.name.clone(),
            outcome: Outcome::Error(message),
            elapsed: Duration::ZERO,
            fail_open: provider.fail_open,
            status_on_error: provider.status_on_error,
        }
    }
}
