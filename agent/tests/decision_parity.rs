//! `nodeward check` (its live mode, as `POST /check` runs it) and the enforcer judge with one
//! decision (`nodeward::decision`): on a table of requests, with the same snapshot, the status
//! the enforcer answers on real sockets is the status `check` reports. Rows cover the probe
//! exemption, the answers given before any policy (400/403), authentication, authorization,
//! and TCP.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use jsonwebtoken::Algorithm;
use nodeward::authn::cache::TokenCache;
use nodeward::authn::fetch::{FetchConfig, JwksStore};
use nodeward::authz::path::Normalization;
use nodeward::cli::check::{decide, CheckRequest, Inputs, Output};
use nodeward::enforcer::Limits;
use nodeward::state::workloads::Probe;
use support::node::*;
use support::rawpod::RawPod;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpSocket;

/// The node's own address on this machine: the probe exemption trusts it.
const NODE_SELF: &str = "127.0.0.1";

struct Row {
    name: &'static str,
    source: &'static str,
    /// The bytes the enforcer gets.
    bytes: &'static [u8],
    /// The same request described to `check`.
    method: &'static str,
    path: &'static str,
    headers: &'static [&'static str],
    tcp: bool,
    /// What both must say (TCP: 200 allowed, 403 denied).
    status: u16,
}

const ROWS: &[Row] = &[
    Row { name: "allowed", source: KNOWN_CLIENT, bytes: b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nConnection: close\r\n\r\n", method: "GET", path: "/ok", headers: &["Host: httpbin.foo"], tcp: false, status: 200 },
    Row { name: "DENY by path", source: KNOWN_CLIENT, bytes: b"GET /admin/x HTTP/1.1\r\nHost: httpbin.foo\r\nConnection: close\r\n\r\n", method: "GET", path: "/admin/x", headers: &["Host: httpbin.foo"], tcp: false, status: 403 },
    Row { name: "no ALLOW matched", source: UNKNOWN_CLIENT, bytes: b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nConnection: close\r\n\r\n", method: "GET", path: "/ok", headers: &["Host: httpbin.foo"], tcp: false, status: 403 },
    Row { name: "bad token", source: UNKNOWN_CLIENT, bytes: b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nAuthorization: Bearer garbage\r\nConnection: close\r\n\r\n", method: "GET", path: "/ok", headers: &["Host: httpbin.foo", "Authorization: Bearer garbage"], tcp: false, status: 401 },
    Row { name: "two Host lines", source: KNOWN_CLIENT, bytes: b"GET /ok HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", method: "GET", path: "/ok", headers: &["Host: a", "Host: b"], tcp: false, status: 400 },
    Row { name: "made-up upgrade", source: KNOWN_CLIENT, bytes: b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n", method: "GET", path: "/ok", headers: &["Host: httpbin.foo", "Upgrade: foo", "Connection: upgrade"], tcp: false, status: 403 },
    Row { name: "CONNECT", source: KNOWN_CLIENT, bytes: b"CONNECT httpbin.foo:80 HTTP/1.1\r\nHost: httpbin.foo:80\r\n\r\n", method: "CONNECT", path: "/", headers: &["Host: httpbin.foo:80"], tcp: false, status: 403 },
    Row { name: "CL with TE", source: KNOWN_CLIENT, bytes: b"POST /ok HTTP/1.1\r\nHost: httpbin.foo\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", method: "POST", path: "/ok", headers: &["Host: httpbin.foo", "Content-Length: 5", "Transfer-Encoding: chunked"], tcp: false, status: 400 },
    Row { name: "bad path", source: KNOWN_CLIENT, bytes: b"GET /a%00 HTTP/1.1\r\nHost: httpbin.foo\r\nConnection: close\r\n\r\n", method: "GET", path: "/a%00", headers: &["Host: httpbin.foo"], tcp: false, status: 400 },
    Row { name: "probe from the node", source: NODE_SELF, bytes: b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1\r\nConnection: close\r\n\r\n", method: "GET", path: "/healthz", headers: &["Host: 10.0.0.1"], tcp: false, status: 200 },
    Row { name: "probe path from a pod", source: UNKNOWN_CLIENT, bytes: b"GET /healthz HTTP/1.1\r\nHost: 10.0.0.1\r\nConnection: close\r\n\r\n", method: "GET", path: "/healthz", headers: &["Host: 10.0.0.1"], tcp: false, status: 403 },
    Row { name: "TCP from a known workload", source: KNOWN_CLIENT, bytes: b"\x00\x01binary", method: "GET", path: "/", headers: &[], tcp: true, status: 200 },
    Row { name: "TCP from an unknown source", source: UNKNOWN_CLIENT, bytes: b"\x00\x01binary", method: "GET", path: "/", headers: &[], tcp: true, status: 403 },
];

/// `support::node::policies()`; for TCP rows without its DENY on `/admin*`: a DENY rule with
/// HTTP-only fields denies every TCP connection (Istio's TCP semantics), which would leave no
/// allowed TCP row.
fn policies_for(tcp: bool) -> String {
    let base = policies();
    if tcp {
        base.split("---")
            .filter(|doc| !doc.contains("deny-admin"))
            .collect::<Vec<_>>()
            .join("---")
    } else {
        base
    }
}

async fn enforcer_status(node: &Node, row: &Row) -> u16 {
    enforcer_answer(node, row.source, row.bytes, row.tcp, row.name).await
}

/// The status the enforcer answers `bytes` from `source` with (TCP: 200 spliced, 403 closed).
async fn enforcer_answer(node: &Node, source: &str, bytes: &[u8], tcp: bool, name: &str) -> u16 {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source.parse::<IpAddr>().expect("ip"), 0))
        .expect("bind");
    let mut stream = socket.connect(node.front).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out);
    if tcp {
        // Spliced to the pod (which answers binary with its own 400), or closed.
        return if text.is_empty() { 403 } else { 200 };
    }
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{name}: no status in {text:?}"))
}

fn check_status(node: &Node, row: &Row, jwks: &JwksStore, cache: &TokenCache) -> u16 {
    let headers: Vec<String> = row.headers.iter().map(|h| (*h).to_owned()).collect();
    let described = Described {
        name: row.name,
        source: row.source,
        method: row.method,
        path: row.path,
        headers: &headers,
        tcp: row.tcp,
    };
    check_answer(node, &described, jwks, cache)
}

/// A request as `check` is told it.
struct Described<'a> {
    name: &'a str,
    source: &'a str,
    method: &'a str,
    path: &'a str,
    headers: &'a [String],
    tcp: bool,
}

fn check_answer(node: &Node, row: &Described<'_>, jwks: &JwksStore, cache: &TokenCache) -> u16 {
    let snapshot = node.enforcer_snapshot();
    let req = CheckRequest {
        method: row.method.into(),
        path: row.path.into(),
        headers: row.headers.to_vec(),
        source_ip: Some(row.source.parse().expect("ip")),
        dest_ip: Some(node.pod.ip()),
        port: node.pod.port(),
        tcp: row.tcp,
        output: Output::Json,
        ..CheckRequest::default()
    };
    let inputs = Inputs::Live {
        snapshot: &snapshot,
        jwks,
        cache,
        normalization: Normalization::Base,
    };
    let checked = decide(&req, &inputs).unwrap_or_else(|e| panic!("{}: {e}", row.name));
    let json: serde_json::Value = serde_json::from_str(&checked.output).expect("json");
    let status = json["status"].as_u64().expect("status");
    u16::try_from(status).expect("a status")
}

#[tokio::test]
async fn check_and_the_enforcer_agree() {
    let jwks = JwksStore::new(FetchConfig::default()).expect("store");
    let cache = TokenCache::default();
    for tcp in [false, true] {
        let pod = RawPod::http().await;
        let node = node_shaped(
            &policies_for(tcp),
            Limits::default(),
            pod.addr,
            Upstream::default(),
            |w| {
                w.probes = vec![Probe::http(pod.addr.port(), "/healthz").expect("probe")];
            },
        )
        .await;
        for row in ROWS.iter().filter(|r| r.tcp == tcp) {
            let enforcer = enforcer_status(&node, row).await;
            let check = check_status(&node, row, &jwks, &cache);
            assert_eq!(
                (enforcer, check),
                (row.status, row.status),
                "{}: (enforcer, check)",
                row.name
            );
        }
    }
}

/// Requests from the peers' conformance tests, judged alike by `check` and the enforcer: the
/// path normalization (Envoy's `NormalizeCasePath`, Istio's normalization test), `{**}` (Istio's
/// `TestAuthz_PathTemplating`), jwtRules of one issuer (Istio's `jwt_test.go` "aud"), pseudo-header
/// and empty-header conditions, and trust domains.
fn conformance_policies() -> String {
    let keys = support::jwks(vec![support::jwk(Algorithm::RS256, "rsa", false)]);
    let ra = |name: &str, audience: &str| {
        format!(
            "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: {name}, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: {ISS}
    jwks: '{keys}'
    audiences: [{audience}]
"
        )
    };
    let policies = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - to: [{operation: {paths: [/app/%2f]}}]
  - when: [{key: \"request.headers[x-debug]\", values: [\"*\"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - to: [{operation: {paths: [\"/app/*\", \"/store/{**}/cart\"]}}]
  - to: [{operation: {paths: [/authority]}}]
    when: [{key: \"request.headers[:authority]\", values: [httpbin.foo]}]
  - from: [{source: {trustDomains: [cluster.local]}}]
    to: [{operation: {paths: [/td]}}]
  - from: [{source: {requestPrincipals: [\"*\"]}}]
    to: [{operation: {paths: [/jwt]}}]
";
    format!(
        "{}---\n{}---\n{policies}",
        ra("part1", "foo"),
        ra("part2", "bar")
    )
}

/// A header a conformance row adds to `Host`.
#[derive(Clone, Copy)]
enum Extra {
    None,
    Header(&'static str),
    /// `Authorization: Bearer` with a token of `ISS` for this audience.
    TokenFor(&'static str),
}

struct Conformance {
    name: &'static str,
    source: &'static str,
    path: &'static str,
    extra: Extra,
    status: u16,
}

const CONFORMANCE: &[Conformance] = &[
    Conformance {
        name: "DENY /app/%2f fires on /app/%2f (its case kept)",
        source: KNOWN_CLIENT,
        path: "/app/%2f",
        extra: Extra::None,
        status: 403,
    },
    Conformance {
        name: "/app/%2F is not /app/%2f",
        source: KNOWN_CLIENT,
        path: "/app/%2F",
        extra: Extra::None,
        status: 200,
    },
    Conformance {
        name: "/%61pp/%2f: the escaped a decoded, %2f kept",
        source: KNOWN_CLIENT,
        path: "/%61pp/%2f",
        extra: Extra::None,
        status: 403,
    },
    Conformance {
        name: "{**} matches an empty run: /store//cart",
        source: UNKNOWN_CLIENT,
        path: "/store//cart",
        extra: Extra::None,
        status: 200,
    },
    Conformance {
        name: "{**} keeps both slashes: /store/cart",
        source: UNKNOWN_CLIENT,
        path: "/store/cart",
        extra: Extra::None,
        status: 403,
    },
    Conformance {
        name: "request.headers[:authority]",
        source: UNKNOWN_CLIENT,
        path: "/authority",
        extra: Extra::None,
        status: 200,
    },
    Conformance {
        name: "an empty header is present for *",
        source: KNOWN_CLIENT,
        path: "/app/x",
        extra: Extra::Header("X-Debug: "),
        status: 403,
    },
    Conformance {
        name: "trustDomains from the source principal",
        source: KNOWN_CLIENT,
        path: "/td",
        extra: Extra::None,
        status: 200,
    },
    Conformance {
        name: "trustDomains: no identity",
        source: UNKNOWN_CLIENT,
        path: "/td",
        extra: Extra::None,
        status: 403,
    },
    Conformance {
        name: "a token failing the first rule of its issuer, passing the second",
        source: UNKNOWN_CLIENT,
        path: "/jwt",
        extra: Extra::TokenFor("bar"),
        status: 200,
    },
    Conformance {
        name: "a token failing both rules of its issuer: the first refusal (403)",
        source: UNKNOWN_CLIENT,
        path: "/jwt",
        extra: Extra::TokenFor("baz"),
        status: 403,
    },
];

fn headers_of(extra: Extra) -> Vec<String> {
    let mut headers = vec!["Host: httpbin.foo".to_owned()];
    match extra {
        Extra::None => {}
        Extra::Header(h) => headers.push(h.to_owned()),
        Extra::TokenFor(aud) => {
            let mut claims = support::claims(ISS, "alice");
            claims["aud"] = serde_json::json!(aud);
            headers.push(format!(
                "Authorization: Bearer {}",
                support::mint(Algorithm::RS256, Some("rsa"), &claims)
            ));
        }
    }
    headers
}

#[tokio::test]
async fn check_and_the_enforcer_agree_on_conformance_cases() {
    let jwks = JwksStore::new(FetchConfig::default()).expect("store");
    let cache = TokenCache::default();
    let pod = RawPod::http().await;
    let node = node_shaped(
        &conformance_policies(),
        Limits::default(),
        pod.addr,
        Upstream::default(),
        |_| {},
    )
    .await;
    for row in CONFORMANCE {
        let headers = headers_of(row.extra);
        let bytes = format!(
            "GET {} HTTP/1.1\r\n{}\r\nConnection: close\r\n\r\n",
            row.path,
            headers.join("\r\n")
        );
        let enforcer = enforcer_answer(&node, row.source, bytes.as_bytes(), false, row.name).await;
        let described = Described {
            name: row.name,
            source: row.source,
            method: "GET",
            path: row.path,
            headers: &headers,
            tcp: false,
        };
        let check = check_answer(&node, &described, &jwks, &cache);
        assert_eq!(
            (enforcer, check),
            (row.status, row.status),
            "{}: (enforcer, check)",
            row.name
        );
    }
}
