//! `envoyExtAuthzHttp`: the check is an HTTP request to the provider, as Envoy's raw HTTP
//! `ext_authz` client (`ext_authz_http_impl.cc`) builds it under Istio's configuration:
//!
//! - the client's method, and `pathPrefix` + the path (with its query);
//! - headers: the client's `Host`, `Authorization`, and those matching
//!   `includeRequestHeadersInCheck`; then `includeAdditionalHeadersInCheck` (overriding);
//!   `Content-Length` is the size of the body sent (0 without `includeRequestBodyInCheck`);
//! - the answer: a 5xx is an error (`failOpen` / `statusOnError` decide); 200 allows, the
//!   headers matching `headersToUpstreamOnAllow` set on the request to the pod, those named
//!   by `x-envoy-auth-headers-to-remove` removed from it, those matching
//!   `headersToDownstreamOnAllow` added to the client's response; any other status denies, and
//!   the client gets that status, the body, and the headers matching
//!   `headersToDownstreamOnDeny` (with `WWW-Authenticate` and `Location`), or every header but
//!   `Host` when that list is empty.

use ::http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::mesh::{any_matches, HttpSettings, ProviderConfig};
use super::{authority, protected_header, Allowed, HttpInput, Outcome, PARTIAL_BODY_HEADER};

/// Envoy's header naming the request headers an allowing provider wants removed.
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// The most body of a provider's answer kept for the client (a denial page).
const MAX_ANSWER_BODY: usize = 1 << 20;

/// Pooled HTTP/1.1 connections to providers.
#[derive(Debug, Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    #[must_use]
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .build(connector);
        Self { client }
    }

    pub async fn check(
        &self,
        provider: &ProviderConfig,
        settings: &HttpSettings,
        input: &HttpInput<'_>,
    ) -> Outcome {
        let request = match build(provider, settings, input) {
            Ok(r) => r,
            Err(e) => return Outcome::Error(e),
        };
        let response = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => return Outcome::Error(format!("request failed: {}", error_chain(&e))),
        };
        let status = response.status();
        if status.is_server_error() {
            return Outcome::Error(format!("provider answered {status}"));
        }
        let (parts, body) = response.into_parts();
        let body = match Limited::new(body, MAX_ANSWER_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return Outcome::Error(format!("reading the answer failed: {e}")),
        };
        interpret(settings, status, &parts.headers, body)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The check request.
fn build(
    provider: &ProviderConfig,
    settings: &HttpSettings,
    input: &HttpInput<'_>,
) -> Result<Request<Full<Bytes>>, String> {
    let method = Method::from_bytes(input.method.as_bytes()).map_err(|e| e.to_string())?;
    let uri = format!(
        "http://{}{}{}",
        authority(&provider.host, provider.port),
        settings.path_prefix,
        input.path
    );
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(
            input.body.map(|(b, _)| b.clone()).unwrap_or_default(),
        ))
        .map_err(|e| format!("cannot build the check request: {e}"))?;
    let headers = request.headers_mut();
    for (name, value) in input.headers {
        let n = name.as_str();
        let wanted = n == "authorization" || any_matches(&settings.include_request_headers, n);
        if wanted && !protected_header(n) {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Ok(host) = HeaderValue::from_str(input.host) {
        headers.insert(header::HOST, host);
    }
    if let Some((_, partial)) = input.body {
        headers.insert(
            HeaderName::from_static(PARTIAL_BODY_HEADER),
            HeaderValue::from_static(if partial { "true" } else { "false" }),
        );
    }
    for (name, value) in &settings.additional_headers {
        headers.insert(name.clone(), value.clone());
    }
    let length = input.body.map_or(0, |(b, _)| b.len());
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok(request)
}

/// The provider's non-5xx answer, as Envoy reads it.
fn interpret(
    settings: &HttpSettings,
    status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
) -> Outcome {
    if status == StatusCode::OK {
        let mut allowed = Allowed::default();
        for value in headers.get_all(HEADERS_TO_REMOVE) {
            let Ok(value) = value.to_str() else { continue };
            for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                match HeaderName::from_bytes(name.as_bytes()) {
                    Ok(n) if !protected_header(n.as_str()) => allowed.upstream_remove.push(n),
                    _ => {}
                }
            }
        }
        for (name, value) in headers {
            let n = name.as_str();
            if n == HEADERS_TO_REMOVE {
                continue;
            }
            if any_matches(&settings.headers_to_upstream_on_allow, n) && !protected_header(n) {
                allowed.upstream_set.push((name.clone(), value.clone()));
            }
            if any_matches(&settings.headers_to_downstream_on_allow, n) && !hop(n) {
                allowed.downstream_add.push((name.clone(), value.clone()));
            }
        }
        return Outcome::Allowed(allowed);
    }
    let mut out = Vec::new();
    for (name, value) in headers {
        let n = name.as_str();
        if hop(n) || n == HEADERS_TO_REMOVE {
            continue;
        }
        let keep = if settings.headers_to_downstream_on_deny.is_empty() {
            n != "host"
        } else {
            any_matches(&settings.headers_to_downstream_on_deny, n)
                || n == "www-authenticate"
                || n == "location"
        };
        if keep {
            out.push((name.clone(), value.clone()));
        }
    }
    Outcome::Denied {
        status,
        headers: out,
        body,
    }
}

/// Headers of the provider's answer that belong to its own message, never copied to the
/// client's (the answer is framed anew).
fn hop(name: &str) -> bool {
    matches!(
        name,
        "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extauthz::mesh::MeshProviders;
    use crate::extauthz::mesh::{Entry, Kind};

    fn settings(yaml: &str) -> (ProviderConfig, HttpSettings) {
        let mesh = MeshProviders::parse("test", yaml).expect("parse");
        let Some(Entry::Ready(p)) = mesh.providers.values().next().cloned() else {
            panic!("not ready: {mesh:?}");
        };
        let Kind::Http(s) = p.kind.clone() else {
            panic!("not http")
        };
        (p, s)
    }

    const SAMPLE: &str = "extensionProviders:\n- name: sample\n  envoyExtAuthzHttp:\n    service: ext-authz.foo.svc.cluster.local\n    port: 8000\n    pathPrefix: /check\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n    includeAdditionalHeadersInCheck: {x-fixed: one, x-ext-authz: overridden}\n    headersToUpstreamOnAllow: [\"x-ext-authz-*\", \"*-user\"]\n    headersToDownstreamOnAllow: [\"x-allow-note\"]\n";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_check_request_carries_what_envoy_sends() {
        let (p, s) = settings(SAMPLE);
        let client = headers(&[
            ("x-ext-authz", "allow"),
            ("authorization", "Bearer t"),
            ("cookie", "secret"),
            ("x-other", "1"),
            ("content-length", "5"),
        ]);
        let input = HttpInput {
            method: "POST",
            path: "/admin?x=1",
            host: "httpbin.foo:8000",
            headers: &client,
            protocol: "HTTP/1.1",
            body: None,
            size: 5,
        };
        let r = build(&p, &s, &input).expect("build");
        assert_eq!(r.method(), Method::POST);
        // Istio's proto: "/check" + "/admin" → "/check/admin"; the query stays.
        assert_eq!(
            r.uri().path_and_query().unwrap().as_str(),
            "/check/admin?x=1"
        );
        let h = r.headers();
        assert_eq!(h["host"], "httpbin.foo:8000");
        assert_eq!(h["authorization"], "Bearer t");
        // includeAdditionalHeadersInCheck overrides the client's value.
        assert_eq!(h["x-ext-authz"], "overridden");
        assert_eq!(h["x-fixed"], "one");
        assert!(!h.contains_key("cookie"));
        assert!(!h.contains_key("x-other"));
        // Content-Length is the size of what is sent, not the client's.
        assert_eq!(h["content-length"], "0");
    }

    #[test]
    fn a_200_sets_the_listed_headers_upstream_and_removes_those_named() {
        let (_, s) = settings(SAMPLE);
        let answer = headers(&[
            ("x-ext-authz-check-result", "allowed"),
            ("x-auth-user", "alice"),
            ("x-unlisted", "no"),
            ("x-allow-note", "hi"),
            ("x-envoy-auth-headers-to-remove", "cookie, x-secret"),
            ("x-envoy-auth-headers-to-remove", "host"),
        ]);
        let Outcome::Allowed(a) = interpret(&s, StatusCode::OK, &answer, Bytes::new()) else {
            panic!("not allowed");
        };
        let set: Vec<_> = a.upstream_set.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(set, ["x-ext-authz-check-result", "x-auth-user"]);
        let removed: Vec<_> = a.upstream_remove.iter().map(HeaderName::as_str).collect();
        // `host` is never removed: the judged authority is what the pod receives.
        assert_eq!(removed, ["cookie", "x-secret"]);
        assert_eq!(a.downstream_add.len(), 1);
    }

    #[test]
    fn another_2xx_denies_with_that_status_as_envoy_does() {
        let (_, s) = settings(SAMPLE);
        let out = interpret(&s, StatusCode::NO_CONTENT, &HeaderMap::new(), Bytes::new());
        assert!(matches!(out, Outcome::Denied { status, .. } if status == StatusCode::NO_CONTENT));
    }

    #[test]
    fn a_denial_passes_every_header_but_host_when_no_list_is_set() {
        let (_, s) = settings(SAMPLE);
        let answer = headers(&[
            ("host", "x"),
            ("x-ext-authz-check-result", "denied"),
            ("content-length", "3"),
            ("location", "/login"),
        ]);
        let Outcome::Denied {
            status,
            headers,
            body,
        } = interpret(&s, StatusCode::FOUND, &answer, Bytes::from_static(b"bye"))
        else {
            panic!("not denied");
        };
        assert_eq!(status, StatusCode::FOUND);
        let names: Vec<_> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x-ext-authz-check-result", "location"]);
        assert_eq!(body, "bye");
    }

    #[test]
    fn a_denial_passes_only_the_listed_headers_and_the_defaults_when_a_list_is_set() {
        let (_, s) = settings(
            "extensionProviders:\n- name: s\n  envoyExtAuthzHttp:\n    service: a.b\n    port: 1\n    headersToDownstreamOnDeny: [\"x-ext-authz-check-result\"]\n",
        );
        let answer = headers(&[
            ("x-ext-authz-check-result", "denied"),
            ("x-other", "1"),
            ("www-authenticate", "Bearer"),
            ("location", "/l"),
        ]);
        let Outcome::Denied { headers, .. } =
            interpret(&s, StatusCode::UNAUTHORIZED, &answer, Bytes::new())
        else {
            panic!("not denied");
        };
        let names: Vec<_> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["x-ext-authz-check-result", "www-authenticate", "location"]
        );
    }
}
