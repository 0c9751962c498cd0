//! HTTP/1.1 and HTTP/2 (h2c) on a steered connection: every request is judged on its own,
//! answered here (400/401/403/503) or forwarded to the pod with the normalized path, tokens
//! removed unless forwarded on purpose, the JWT output headers set, hop-by-hop headers
//! dropped. Bodies stream both ways; an allowed Upgrade (WebSocket) is spliced.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::inspect::{HeadFlags, Inspect};
use super::probe;
use super::sniff::Protocol;
use super::upgrade::{self, Upgrade};
use super::upstream::Watched;
use super::{unix_now, ConnectionInfo, Enforcer};
use crate::authn::rules::rewrite;
use crate::authn::{www_authenticate, Outcome, RequestParts};
use crate::authz::path::normalize;
use crate::authz::{Http, Request as AuthzRequest, DENIED_BODY};
use crate::metrics::{ReasonLabels, RequestLabels, SharedLabel};

type Body = BoxBody<Bytes, hyper::Error>;

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), besides those named in
/// `Connection`.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(
        Full::new(body.into())
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    res
}

/// Serves the connection until the client is done, a limit is hit, or shutdown.
pub(super) async fn serve(
    enforcer: Arc<Enforcer>,
    stream: TcpStream,
    info: ConnectionInfo,
    protocol: Protocol,
    shutdown: CancellationToken,
) {
    let limits = enforcer.config.limits;
    let h2 = protocol == Protocol::H2c;
    let flags = HeadFlags::default();
    let io = TokioIo::new(Inspect::new(stream, flags.clone(), !h2));
    let metrics = enforcer.metrics.clone();
    let service = {
        let flags = flags.clone();
        hyper::service::service_fn(move |req| {
            let enforcer = enforcer.clone();
            let conflict = !h2 && flags.next_request_conflicts();
            async move { Ok::<_, Infallible>(enforcer.handle(req, info, h2, conflict).await) }
        })
    };
    let result = if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .keep_alive_interval(limits.idle_timeout)
            .keep_alive_timeout(limits.header_read_timeout);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_header_size(limits.max_header_bytes)
            .max_headers(limits.max_headers)
            .keep_alive(true);
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        let reason = if e.is_parse_too_large() {
            "header_too_large"
        } else if e.is_parse() || e.is_parse_status() {
            "malformed_request"
        } else if e.is_timeout() {
            "header_read_timeout"
        } else {
            "connection_error"
        };
        if reason != "connection_error" {
            metrics
                .refused
                .get_or_create(&ReasonLabels { reason })
                .inc();
        }
        tracing::debug!(peer = %info.peer, error = %e, reason, "HTTP connection ended with an error");
    }
}

/// What the access log and the metrics say about one request.
struct Judged {
    decision: &'static str,
    status: u16,
    reason: Cow<'static, str>,
    policy: Option<String>,
    principal: Option<String>,
}

impl Enforcer {
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        info: ConnectionInfo,
        h2: bool,
        conflict: bool,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        // For the access log; a Uri clone shares its bytes.
        let uri = req.uri().clone();
        let snapshot = self.store.load();
        let workload = snapshot.destination(info.original_dst.ip()).cloned();
        let workload_id = workload
            .as_ref()
            .map_or_else(super::no_workload, |w| w.id.clone());
        let (response, judged) = self
            .judge(
                req,
                info,
                h2,
                conflict,
                &snapshot,
                workload.as_deref(),
                started,
            )
            .await;
        let elapsed = started.elapsed();
        self.metrics
            .requests
            .get_or_create(&RequestLabels {
                workload: SharedLabel(workload_id.clone()),
                decision: judged.decision,
                code: judged.status,
                reason: judged.reason.clone(),
            })
            .inc();
        tracing::info!(
            target: "access",
            source = %info.peer,
            destination = %info.original_dst,
            workload = %workload_id,
            method = %method,
            path = %uri.path(),
            status = judged.status,
            decision = judged.decision,
            reason = %judged.reason,
            policy = judged.policy.as_deref().unwrap_or("-"),
            principal = judged.principal.as_deref().unwrap_or("-"),
            latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        );
        response
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one request's judgement, step by step in Envoy's order"
    )]
    #[expect(
        clippy::too_many_arguments,
        reason = "the request and its connection's context"
    )]
    async fn judge(
        &self,
        mut req: Request<Incoming>,
        info: ConnectionInfo,
        h2: bool,
        conflict: bool,
        snapshot: &crate::state::Snapshot,
        workload: Option<&crate::state::WorkloadView>,
        started: Instant,
    ) -> (Response<Body>, Judged) {
        let deny = |status: StatusCode, reason: Cow<'static, str>, body: String| {
            (
                full(status, body),
                Judged {
                    decision: "deny",
                    status: status.as_u16(),
                    reason,
                    policy: None,
                    principal: None,
                },
            )
        };
        if conflict || conflicting_lengths(req.headers()) {
            self.metrics
                .refused
                .get_or_create(&ReasonLabels {
                    reason: "content_length_conflict",
                })
                .inc();
            let (mut res, judged) = deny(
                StatusCode::BAD_REQUEST,
                "bad_request".into(),
                "Bad Request: conflicting Content-Length / Transfer-Encoding\n".into(),
            );
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return (res, judged);
        }
        let offer = upgrade::classify(
            req.method().as_str().as_bytes(),
            req.version() == hyper::Version::HTTP_11,
            req.headers()
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes())),
        );
        if let Upgrade::Refused(refusal) = offer {
            // Envoy's answer to an upgrade type it was not configured for: 403, no body.
            self.metrics
                .refused
                .get_or_create(&ReasonLabels {
                    reason: refusal.reason(),
                })
                .inc();
            let (mut res, judged) = deny(
                StatusCode::FORBIDDEN,
                refusal.reason().into(),
                String::new(),
            );
            res.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return (res, judged);
        }
        let host = match authority(&req, h2) {
            Ok(host) => host,
            Err(why) => {
                self.metrics
                    .refused
                    .get_or_create(&ReasonLabels { reason: "bad_host" })
                    .inc();
                let (mut res, judged) = deny(
                    StatusCode::BAD_REQUEST,
                    "bad_host".into(),
                    format!("Bad Request: {why}\n"),
                );
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return (res, judged);
            }
        };
        set_authority(&mut req, h2, host.as_deref());
        let host = host.unwrap_or_default();
        let Some(workload) = workload else {
            // Steered here, yet no workload is known at this address: fail closed.
            return deny(
                StatusCode::SERVICE_UNAVAILABLE,
                "unknown_destination".into(),
                format!("no workload at {}\n", info.original_dst),
            );
        };
        let target = req
            .uri()
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str)
            .to_owned();
        let normalized = match normalize(&target, self.config.path_normalization) {
            Ok(n) => n,
            Err(e) => {
                self.metrics
                    .refused
                    .get_or_create(&ReasonLabels { reason: "bad_path" })
                    .inc();
                return deny(
                    StatusCode::BAD_REQUEST,
                    "bad_path".into(),
                    format!("Bad Request: {e}\n"),
                );
            }
        };

        // Authentication (Envoy's jwt_authn runs before RBAC).
        let method = req.method().clone();
        let attempt = probe::Attempt::Http {
            method: &method,
            path: &normalized.path,
        };
        if self.is_probe(&workload.workload, &info, attempt) {
            let judged = Judged {
                decision: "allow",
                status: 0,
                reason: "probe".into(),
                policy: None,
                principal: None,
            };
            strip_hop_by_hop(req.headers_mut(), false);
            let target = normalized.path_and_query();
            return self
                .forward(req, info, h2, false, &host, &target, judged)
                .await;
        }
        let parts = RequestParts {
            method: &method,
            headers: req.headers(),
            query: normalized.query.as_deref(),
        };
        let outcome =
            workload
                .authn
                .authenticate(&parts, self.keys.as_ref(), &self.cache, unix_now());
        if let Outcome::Rejected { error, rule, .. } = &outcome {
            let (mut res, mut judged) = deny(
                StatusCode::from_u16(error.status()).unwrap_or(StatusCode::UNAUTHORIZED),
                format!("authn_{}", error_word(*error)).into(),
                error.body(),
            );
            if error.status() == 401 {
                let realm = format!("http://{host}{}", normalized.path);
                if let Ok(v) = HeaderValue::from_str(&www_authenticate(&realm, true)) {
                    res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
            }
            judged.policy = rule.as_ref().map(|r| r.origin.clone());
            self.metrics
                .decision_seconds
                .observe(started.elapsed().as_secs_f64());
            return (res, judged);
        }
        // Borrowed from the verified token (shared with the cache): no copy of the claims.
        let auth = match &outcome {
            Outcome::Authenticated(a) => Some(&a.verified.auth),
            _ => None,
        };

        // Authorization.
        let request = AuthzRequest {
            source: snapshot.peer(info.peer.ip()),
            destination_ip: Some(info.original_dst.ip()),
            destination_port: info.original_dst.port(),
            sni: None,
            http: Some(Http {
                method: method.as_str(),
                path: &normalized.path,
                host: &host,
                headers: req.headers(),
                auth,
            }),
        };
        let decision = workload.authz.evaluate(&request);
        let principal = auth.map(crate::authz::AuthInfo::principal);
        let policy = decision.decided_by.as_ref().map(|m| m.policy.clone());
        if !decision.allow {
            self.metrics
                .decision_seconds
                .observe(started.elapsed().as_secs_f64());
            let (res, mut judged) = deny(
                StatusCode::FORBIDDEN,
                reason_word(decision.reason).into(),
                DENIED_BODY.to_owned(),
            );
            judged.policy = policy;
            judged.principal = principal;
            return (res, judged);
        }

        // Rewrite what goes to the pod: what was judged is what it receives.
        let query = rewrite(
            &workload.authn,
            &outcome,
            req.headers_mut(),
            normalized.query.as_deref(),
        );
        let path_and_query = match &query {
            Some(q) => format!("{}?{q}", normalized.path),
            None => normalized.path.clone(),
        };
        let upgrade = !h2 && offer == Upgrade::WebSocket;
        strip_hop_by_hop(req.headers_mut(), upgrade);
        self.metrics
            .decision_seconds
            .observe(started.elapsed().as_secs_f64());
        let judged = Judged {
            decision: "allow",
            status: 0,
            reason: reason_word(decision.reason).into(),
            policy,
            principal,
        };
        self.forward(req, info, h2, upgrade, &host, &path_and_query, judged)
            .await
    }

    #[expect(clippy::too_many_arguments, reason = "the request and where it goes")]
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        info: ConnectionInfo,
        h2: bool,
        upgrade: bool,
        host: &str,
        path_and_query: &str,
        mut judged: Judged,
    ) -> (Response<Body>, Judged) {
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let (body, body_failed) = Watched::new(body);
        let mut req = Request::from_parts(parts, body);
        let result = if h2 {
            let scheme = req.uri().scheme_str().unwrap_or("http").to_owned();
            let Ok(uri) = format!("{scheme}://{host}{path_and_query}").parse() else {
                judged.status = 400;
                judged.decision = "deny";
                judged.reason = "bad_authority".into();
                return (
                    full(StatusCode::BAD_REQUEST, "Bad Request: authority\n"),
                    judged,
                );
            };
            *req.uri_mut() = uri;
            self.upstream.send_http2(info.original_dst, req).await
        } else {
            // The client's framing was dropped with the hop-by-hop headers. hyper sends no body
            // for a GET/HEAD of unknown length unless told, so say chunked when a body follows.
            if !hyper::body::Body::is_end_stream(req.body())
                && hyper::body::Body::size_hint(req.body()).exact().is_none()
                && !req.headers().contains_key(header::CONTENT_LENGTH)
            {
                req.headers_mut().insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            // Absolute, with the pod's address: the upstream pool is keyed by it (never by
            // the Host header, which is sent as the client wrote it).
            let Ok(uri) = format!("http://{}{path_and_query}", info.original_dst).parse() else {
                judged.status = 400;
                judged.decision = "deny";
                judged.reason = "bad_path".into();
                return (full(StatusCode::BAD_REQUEST, "Bad Request: path\n"), judged);
            };
            *req.uri_mut() = uri;
            self.upstream.send_http1(info.original_dst, req).await
        };
        let mut res = match result {
            Ok(res) => res,
            Err(e) if body_failed.load(std::sync::atomic::Ordering::Relaxed) => {
                // The client's body broke its framing (a bad chunk size, say): its fault.
                tracing::debug!(dst = %info.original_dst, error = %e, "request body unreadable");
                self.metrics
                    .refused
                    .get_or_create(&ReasonLabels {
                        reason: "malformed_body",
                    })
                    .inc();
                judged.status = 400;
                judged.decision = "deny";
                judged.reason = "malformed_body".into();
                let mut res = full(StatusCode::BAD_REQUEST, "Bad Request: malformed body\n");
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return (res, judged);
            }
            Err(e) => {
                tracing::warn!(dst = %info.original_dst, error = %e, "upstream request failed");
                judged.status = 503;
                judged.reason = "upstream_error".into();
                return (
                    full(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error or disconnect/reset before headers\n",
                    ),
                    judged,
                );
            }
        };
        judged.status = res.status().as_u16();
        if res.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Err(refused) = splice_websocket(&mut res, downstream_upgrade) {
                tracing::warn!(dst = %info.original_dst, "the pod switched protocols without a WebSocket offer; answered 502");
                judged.status = 502;
                judged.reason = "upstream_bad_upgrade".into();
                return (*refused, judged);
            }
        } else {
            strip_hop_by_hop(res.headers_mut(), false);
            if upgrade {
                // A WebSocket offer the pod declined: the framer under hyper stopped at the
                // offer, so the connection ends with this answer.
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        (res.map(http_body_util::BodyExt::boxed), judged)
    }
}

/// Splices the client and the pod after the pod's 101, only when WebSocket was offered (and
/// judged) and the pod switched to it; any other 101 would hand the connection over unjudged,
/// so it is answered 502 (`Err`) and both connections close.
fn splice_websocket(
    res: &mut Response<Incoming>,
    downstream: Option<hyper::upgrade::OnUpgrade>,
) -> Result<(), Box<Response<Body>>> {
    let switched_to_websocket = res
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    let Some(downstream) = downstream.filter(|_| switched_to_websocket) else {
        let mut refused = full(
            StatusCode::BAD_GATEWAY,
            "upstream switched protocols unexpectedly\n",
        );
        refused
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return Err(Box::new(refused));
    };
    let upstream = hyper::upgrade::on(res);
    tokio::spawn(async move {
        match tokio::try_join!(downstream, upstream) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
            Err(e) => tracing::debug!(error = %e, "upgrade failed"),
        }
    });
    Ok(())
}

/// The request's authority: what host rules judge and exactly what the pod receives.
///
/// - HTTP/1.1 (RFC 9112 3.2): more than one `Host` field line, a missing `Host`, or an
///   invalid one is answered 400. An absolute-form target's authority wins over `Host`
///   (RFC 9112 3.2.2), as in Envoy.
/// - HTTP/1.0: `Host` is optional; without it the authority is empty (`None`).
/// - HTTP/2: `:authority`; a `host` field beside it is discarded, as Envoy does; without
///   `:authority`, a single `host` field stands in for it (RFC 9113 8.3.1); neither is 400.
fn authority(req: &Request<Incoming>, h2: bool) -> Result<Option<String>, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let (first, second) = (hosts.next(), hosts.next());
    if let Some(authority) = req.uri().authority() {
        return valid_authority(authority.as_str().as_bytes()).map(Some);
    }
    if second.is_some() {
        return Err("more than one Host header");
    }
    match first {
        Some(host) => valid_authority(host.as_bytes()).map(Some),
        None if h2 => Err("no :authority or Host"),
        None if req.version() == hyper::Version::HTTP_10 => Ok(None),
        None => Err("no Host header (required in HTTP/1.1)"),
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 7.2; empty allowed): no user info, path, whitespace or
/// control characters.
fn valid_authority(value: &[u8]) -> Result<String, &'static str> {
    const INVALID: &str = "invalid Host";
    if value.is_empty() {
        return Ok(String::new());
    }
    let text = std::str::from_utf8(value).map_err(|_| INVALID)?;
    let parsed: hyper::http::uri::Authority = text.parse().map_err(|_| INVALID)?;
    if text.contains('@') || parsed.as_str() != text {
        return Err(INVALID);
    }
    Ok(text.to_owned())
}

/// Makes the request carry exactly `authority`: HTTP/1 one `Host` line (none for an HTTP/1.0
/// request without one); HTTP/2 no `host` field (the authority goes in `:authority`).
fn set_authority(req: &mut Request<Incoming>, h2: bool, authority: Option<&str>) {
    let headers = req.headers_mut();
    headers.remove(header::HOST);
    if h2 {
        return;
    }
    if let Some(value) = authority.and_then(|a| HeaderValue::from_str(a).ok()) {
        headers.insert(header::HOST, value);
    }
}

/// Removes hop-by-hop headers and those `Connection` names; keeps `Connection: upgrade` and
/// `Upgrade` for an upgrade.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        if upgrade && name == "connection" {
            continue;
        }
        headers.remove(name);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
        headers.remove("http2-settings");
    }
}

/// Content-Length values that disagree (hyper refuses most; this also covers HTTP/2).
fn conflicting_lengths(headers: &HeaderMap) -> bool {
    let mut values = headers
        .get_all(header::CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','));
    let Some(first) = values.next() else {
        return false;
    };
    let first = first.trim_ascii();
    values.any(|v| v.trim_ascii() != first)
        || (headers.contains_key(header::TRANSFER_ENCODING)
            && headers.contains_key(header::CONTENT_LENGTH))
}

fn reason_word(reason: crate::authz::Reason) -> &'static str {
    use crate::authz::Reason as R;
    match reason {
        R::CustomNotSupported => "custom_not_supported",
        R::DeniedByPolicy => "denied_by_policy",
        R::NoAllowPolicies => "no_allow_policies",
        R::AllowedByPolicy => "allowed_by_policy",
        R::NoAllowMatched => "no_allow_matched",
    }
}

fn error_word(error: crate::authn::JwtError) -> String {
    serde_json::to_value(error)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "error".into())
}
