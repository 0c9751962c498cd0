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
use super::sniff::Protocol;
use super::upstream::Watched;
use super::{ConnectionInfo, Enforcer};
use crate::authn::token::unix_now;
use crate::decision::upgrade::Upgrade;
use crate::decision::{
    after_custom, decide_http, Answer, CustomCall, Destination, HttpRequest, HttpVerdict, Judge,
    Reason,
};
use crate::extauthz::{CheckInput, HttpInput, Outcome as CheckOutcome};
use crate::metrics::{ReasonLabels, RequestLabels, SharedLabel};
use crate::state::{Snapshot, WorkloadView};

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

/// The request as the decision sees it (`method` and `uri` are the request's, held apart so
/// that the request itself can change afterwards).
fn described<'a>(
    method: &'a hyper::Method,
    uri: &'a hyper::Uri,
    req: &'a Request<Incoming>,
    h2: bool,
    conflict: bool,
) -> HttpRequest<'a> {
    HttpRequest {
        method,
        version: req.version(),
        h2,
        target: uri
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str),
        uri_authority: uri.authority().map(hyper::http::uri::Authority::as_str),
        headers: req.headers(),
        framing_conflict: conflict,
    }
}

/// Reads the body until it ends or holds more than `limit` bytes: the bytes read, and whether
/// the body ended. `Err`: the body broke its framing.
async fn gather(body: &mut Incoming, limit: usize) -> Result<(Bytes, bool), ()> {
    let mut buf = bytes::BytesMut::new();
    while buf.len() <= limit {
        match body.frame().await {
            None => return Ok((buf.freeze(), true)),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => return Err(()),
        }
    }
    Ok((buf.freeze(), hyper::body::Body::is_end_stream(body)))
}

fn answer(answer: &Answer) -> Response<Body> {
    let mut res = full(answer.status, answer.body.clone().into_owned());
    let mut replaced = std::collections::HashSet::new();
    for (name, value) in &answer.headers {
        if replaced.insert(name.clone()) {
            res.headers_mut().insert(name.clone(), value.clone());
        } else {
            res.headers_mut().append(name.clone(), value.clone());
        }
    }
    if let Some(v) = answer
        .www_authenticate
        .as_deref()
        .and_then(|w| HeaderValue::from_str(w).ok())
    {
        res.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    if answer.close {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

impl Enforcer {
    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        info: ConnectionInfo,
        h2: bool,
        conflict: bool,
    ) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        // For the access log; a Uri clone shares its bytes.
        let uri = req.uri().clone();
        let snapshot = self.store.load();
        let view = snapshot.destination(info.workload_ip()).cloned();
        let workload_id = view
            .as_ref()
            .map_or_else(super::no_workload, |w| w.id.clone());
        let mut verdict = decide_http(
            &described(&method, &uri, &req, h2, conflict),
            &self.judge(&snapshot, view.as_deref(), info),
        );
        // The body bytes read for an external authorizer, sent to the pod ahead of the rest.
        let mut read_ahead = None;
        if let Some(call) = verdict.custom.clone() {
            let asked = self
                .ask_provider(
                    &mut req,
                    verdict,
                    &call,
                    &snapshot,
                    view.as_deref(),
                    info,
                    h2,
                    conflict,
                )
                .await;
            verdict = asked.0;
            read_ahead = asked.1;
        }
        if let Some(reason) = verdict.reason.refusal() {
            self.metrics
                .refused
                .get_or_create(&ReasonLabels { reason })
                .inc();
        } else {
            self.metrics
                .decision_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        let mut judged = Judged {
            decision: if verdict.allowed() { "allow" } else { "deny" },
            status: verdict.answer.as_ref().map_or(0, |a| a.status.as_u16()),
            reason: verdict.reason.label(),
            policy: verdict.policy.take(),
            principal: verdict.principal.take(),
        };
        let response_headers = std::mem::take(&mut verdict.response_headers);
        let check = verdict.check.take();
        let mut response = match (&verdict.answer, view.as_deref()) {
            (Some(refused), _) => answer(refused),
            (None, Some(view)) => {
                // What was judged is what the pod receives.
                let path_and_query = verdict.rewrite(&view.authn, req.headers_mut(), h2);
                let upgrade =
                    verdict.upgrade == Upgrade::WebSocket && verdict.reason != Reason::Probe;
                strip_hop_by_hop(req.headers_mut(), upgrade);
                let host = verdict.authority.as_deref().unwrap_or_default();
                let (response, forwarded) = self
                    .forward(
                        req,
                        read_ahead,
                        info,
                        h2,
                        upgrade,
                        host,
                        &path_and_query,
                        judged,
                    )
                    .await;
                judged = forwarded;
                response
            }
            // The decision answers 503 for an unknown destination; should that ever change, the
            // request still fails closed here rather than reaching a pod nothing judged.
            (None, None) => {
                judged.decision = "deny";
                judged.status = 503;
                full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no workload at {}\n", info.original_dst),
                )
            }
        };
        drop(snapshot);
        // An allowing provider's headers for the client, on whatever answer it gets (Envoy adds
        // them as the response passes its ext_authz filter).
        for (name, value) in response_headers {
            response.headers_mut().append(name, value);
        }
        self.account(
            &workload_id,
            &judged,
            &method,
            &uri,
            info,
            check.as_ref(),
            started.elapsed(),
        );
        response
    }

    /// Counts and logs one judged request (the access log line).
    #[expect(clippy::too_many_arguments, reason = "every field of the access log")]
    fn account(
        &self,
        workload_id: &Arc<str>,
        judged: &Judged,
        method: &hyper::Method,
        uri: &hyper::Uri,
        info: ConnectionInfo,
        check: Option<&crate::extauthz::CheckResult>,
        elapsed: std::time::Duration,
    ) {
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
            provider = check.as_ref().map_or("-", |c| c.provider.as_str()),
            provider_result = check.as_ref().map_or("-", |c| c.label()),
            provider_us = check
                .as_ref()
                .map_or(0, |c| u64::try_from(c.elapsed.as_micros()).unwrap_or(u64::MAX)),
            latency_us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// Reads the body a provider wants (`includeRequestBodyInCheck`) as Envoy buffers it: up
    /// to `maxRequestBytes`; beyond, 413 unless `allowPartialMessage`. Returns the body for the
    /// check (and whether it is partial) and every byte read, or the client's answer.
    async fn read_for_check(
        &self,
        req: &mut Request<Incoming>,
        settings: &crate::extauthz::mesh::RequestBody,
    ) -> Result<((Bytes, bool), Bytes), (Reason, Answer)> {
        let limit = usize::try_from(settings.max_request_bytes).unwrap_or(usize::MAX);
        let gathered = tokio::time::timeout(
            self.config.limits.idle_timeout,
            gather(req.body_mut(), limit),
        )
        .await;
        let refuse = |reason, status, body: &'static str| {
            Err((
                reason,
                Answer {
                    status,
                    body: body.into(),
                    www_authenticate: None,
                    headers: Vec::new(),
                    close: true,
                },
            ))
        };
        let Ok(Ok((all, ended))) = gathered else {
            return refuse(
                Reason::MalformedBody,
                StatusCode::BAD_REQUEST,
                "Bad Request: the body could not be read\n",
            );
        };
        let partial = !ended || all.len() > limit;
        if partial && !settings.allow_partial_message {
            // Envoy: 413 before the check, whatever `failOpen` says.
            return refuse(
                Reason::PayloadTooLarge,
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload Too Large",
            );
        }
        Ok(((all.slice(..all.len().min(limit)), partial), all))
    }

    /// Asks the provider of the CUSTOM policy that matched (reading the body first when it
    /// wants it) and finishes the decision with its answer. Returns the verdict and the body
    /// bytes already read, which go to the pod ahead of the rest.
    #[expect(clippy::too_many_arguments, reason = "the request and its context")]
    async fn ask_provider(
        &self,
        req: &mut Request<Incoming>,
        mut verdict: HttpVerdict,
        call: &CustomCall,
        snapshot: &Snapshot,
        view: Option<&WorkloadView>,
        info: ConnectionInfo,
        h2: bool,
        conflict: bool,
    ) -> (HttpVerdict, Option<Bytes>) {
        let provider = &call.provider;
        let (check_body, read_ahead) = match &provider.body {
            None => (None, None),
            Some(settings) => match self.read_for_check(req, settings).await {
                Ok((check, all)) => (Some(check), Some(all)),
                Err(answer) => {
                    verdict.custom = None;
                    verdict.reason = answer.0;
                    verdict.answer = Some(answer.1);
                    return (verdict, None);
                }
            },
        };
        // Envoy's jwt_authn runs before ext_authz: the provider never sees a verified token
        // that is not forwarded, and sees the output headers.
        if let Some(view) = view {
            verdict.rewrite_authn(&view.authn, req.headers_mut());
        }
        let target = verdict.target();
        let size = match &check_body {
            Some((b, false)) => i64::try_from(b.len()).unwrap_or(-1),
            _ => req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .unwrap_or(-1),
        };
        let protocol = match (h2, req.version()) {
            (true, _) => "HTTP/2",
            (false, hyper::Version::HTTP_10) => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        let destination_principal = view.map(|v| snapshot.principal_of(&v.workload));
        let result = {
            let input = CheckInput {
                source: info.peer,
                source_principal: snapshot
                    .source(info.peer.ip())
                    .map(|s| s.principal.as_str()),
                destination: info.original_dst,
                destination_principal: destination_principal.as_deref(),
                http: Some(HttpInput {
                    method: req.method().as_str(),
                    path: &target,
                    host: verdict.authority.as_deref().unwrap_or_default(),
                    headers: req.headers(),
                    protocol,
                    body: check_body.as_ref().map(|(b, partial)| (b, *partial)),
                    size,
                }),
            };
            self.extauthz.check(provider, &input).await
        };
        self.metrics.extauthz(&result);
        super::log_check(&result, info);
        if let CheckOutcome::Allowed(allowed) = &result.outcome {
            allowed.apply(req.headers_mut());
        }
        let uri = req.uri().clone();
        let method = req.method().clone();
        let judge = self.judge(snapshot, view, info);
        let request = described(&method, &uri, req, h2, conflict);
        (after_custom(verdict, &request, &judge, result), read_ahead)
    }

    /// The decision's inputs for a connection into the workload `view` (if any).
    pub(super) fn judge<'a>(
        &'a self,
        snapshot: &'a Snapshot,
        view: Option<&'a WorkloadView>,
        info: ConnectionInfo,
    ) -> Judge<'a> {
        Judge {
            destination: view.map(|v| Destination {
                rules: &v.authn,
                policies: &v.authz,
                probes: &v.workload.probes,
            }),
            source: snapshot.peer(info.peer.ip()),
            destination_ip: Some(info.original_dst.ip()),
            destination_port: info.original_dst.port(),
            node: Some(&self.node),
            keys: self.keys.as_ref(),
            cache: &self.cache,
            now: unix_now(),
            normalization: self.config.path_normalization,
            assumed: None,
            explain: false,
        }
    }

    #[expect(clippy::too_many_arguments, reason = "the request and where it goes")]
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        read_ahead: Option<Bytes>,
        info: ConnectionInfo,
        h2: bool,
        upgrade: bool,
        host: &str,
        path_and_query: &str,
        mut judged: Judged,
    ) -> (Response<Body>, Judged) {
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let (body, body_failed) = Watched::new(body, read_ahead);
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
