//! The HTTP-level paths around judgement, attacked with raw bytes against the real enforcer on
//! loopback, each asserting the exact bytes the pod received (`support/rawpod.rs`): upgrade
//! smuggling, protocol detection (leading empty lines, slow clients, odd request lines,
//! declared ports), authority confusion, and malformed framing. Each row cites the peer
//! behaviour or RFC it restates.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeward::enforcer::Limits;
use nodeward::state::workloads::{DeclaredPort, PortProtocol};
use support::node::*;
use support::rawpod::RawPod;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// `policies()` plus a DENY on the host `admin.foo`, to see which authority was judged.
fn host_policies() -> String {
    format!(
        "{}---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin-host, namespace: foo}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{hosts: [admin.foo, 'admin.foo:*']}}}}]}}]
",
        policies()
    )
}

/// Istio's TCP semantics need policies without HTTP-only DENY rules (those deny every TCP
/// connection they select): the known workload may connect, nobody else.
fn tcp_policies() -> String {
    "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-workloads, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules: [{from: [{source: {principals: ['*']}}]}]
"
    .to_owned()
}

async fn raw_node(limits: Limits, ports: Vec<DeclaredPort>) -> (Node, RawPod) {
    let pod = RawPod::http().await;
    let node = node_at(
        &host_policies(),
        limits,
        ports,
        pod.addr,
        Upstream::default(),
    )
    .await;
    (node, pod)
}

/// Reads until the peer closes or `wait` passes; returns everything.
async fn read_all(stream: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends `bytes` in one write, then reads everything until close or `wait`.
async fn exchange(node: &Node, source: &str, bytes: &[u8], wait: Duration) -> String {
    let mut stream = connect_from(node, source).await;
    stream.write_all(bytes).await.expect("write");
    read_all(&mut stream, wait).await
}

/// The status codes of the responses in `answer`, in order (bodies here never hold a status
/// line).
fn statuses(answer: &str) -> Vec<&str> {
    answer
        .match_indices("HTTP/1.")
        .filter_map(|(at, _)| answer.get(at + 9..at + 12))
        .collect()
}

/// Sends `bytes` from the known workload and checks the enforcer's one answer and that the pod
/// saw no connection at all.
async fn refused_before_the_pod(bytes: &[u8], status: &str) {
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let answer = exchange(&node, KNOWN_CLIENT, bytes, SHORT).await;
    assert_eq!(statuses(&answer), [status], "{answer}");
    assert_eq!(pod.connections(), 0, "{}", pod.received());
}

const SHORT: Duration = Duration::from_secs(2);

// --- 1. Upgrade smuggling -------------------------------------------------------------------

#[tokio::test]
async fn h2c_upgrade_offer_is_stripped_and_the_next_request_is_judged() {
    // Envoy's HTTP/1 codec removes `Upgrade: h2c` and `HTTP2-Settings` and serves the request as
    // HTTP/1.1; the pod never sees the offer, so it cannot switch, and a request sent after it
    // is a request like any other (here denied by the /admin* DENY).
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let answer = exchange(
        &node,
        KNOWN_CLIENT,
        b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n\
          PUT /admin HTTP/1.1\r\nHost: httpbin.foo\r\nContent-Length: 0\r\n\r\n",
        SHORT,
    )
    .await;
    assert_eq!(statuses(&answer), ["200", "403"], "{answer}");
    let received = pod.received();
    assert_eq!(pod.request_lines(), ["GET /ok HTTP/1.1"], "{received}");
    let lower = received.to_ascii_lowercase();
    assert!(
        !lower.contains("upgrade") && !lower.contains("http2-settings"),
        "the offer never reaches the pod: {received}"
    );
}

#[test_case::test_case(b"GET / HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: foo/2\r\nConnection: upgrade\r\n\r\nPUT /admin HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n", "upgrade_refused" ; "made-up upgrade token")]
#[test_case::test_case(b"POST / HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 0\r\n\r\nPUT /admin HTTP/1.1\r\n\r\n", "upgrade_refused" ; "WebSocket on POST (RFC 6455 4.1 says GET)")]
#[test_case::test_case(b"GET / HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: websocket, h2c\r\nConnection: upgrade\r\n\r\nPUT /admin HTTP/1.1\r\n\r\n", "upgrade_refused" ; "a list of protocols is not WebSocket")]
#[test_case::test_case(b"CONNECT httpbin.foo:8000 HTTP/1.1\r\nHost: httpbin.foo:8000\r\n\r\nPUT /admin HTTP/1.1\r\n\r\n", "connect_refused" ; "CONNECT is refused")]
#[tokio::test]
async fn other_upgrades_get_403_and_close_and_nothing_reaches_the_pod(bytes: &[u8], reason: &str) {
    // Istio configures Envoy to upgrade only `websocket`; Envoy answers an upgrade type with
    // no upgrade_configs entry (CONNECT included) 403 and closes.
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let answer = exchange(&node, KNOWN_CLIENT, bytes, SHORT).await;
    assert_eq!(statuses(&answer), ["403"], "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(pod.connections(), 0, "the pod saw: {}", pod.received());
    assert!(
        node.metrics
            .encode()
            .contains(&format!("reason=\"{reason}\"")),
        "counted as {reason}"
    );
}

#[tokio::test]
async fn websocket_is_spliced_only_after_judgement() {
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    // Denied: never forwarded.
    let answer = exchange(
        &node,
        UNKNOWN_CLIENT,
        b"GET /chat HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw frames",
        SHORT,
    )
    .await;
    assert_eq!(statuses(&answer), ["403"], "{answer}");
    assert_eq!(pod.connections(), 0, "{}", pod.received());
    // Allowed: the pod switches and bytes flow both ways.
    let mut stream = connect_from(&node, KNOWN_CLIENT).await;
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .await
        .expect("write");
    let mut head = vec![0u8; 512];
    let n = tokio::time::timeout(SHORT, stream.read(&mut head))
        .await
        .expect("101 in time")
        .expect("read");
    assert!(
        head[..n].starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    stream.write_all(b"frame").await.expect("write");
    let mut echo = [0u8; 5];
    tokio::time::timeout(SHORT, stream.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"frame");
    assert!(pod.received().contains("GET /chat HTTP/1.1"));
}

#[tokio::test]
async fn h2_connect_is_refused() {
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let stream = connect_from(&node, KNOWN_CLIENT).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::connect("httpbin.foo:8000")
        .body(Full::<Bytes>::default())
        .expect("request");
    let res = sender.send_request(req).await.expect("answer");
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(pod.connections(), 0);
}

// --- 2. Protocol detection --------------------------------------------------------------------

#[test_case::test_case(b"\r\nGET /admin HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n", "403" ; "one empty line first (RFC 9112 2.2)")]
#[test_case::test_case(b"\r\n\r\n\n\r\nGET /admin HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n", "403" ; "several empty lines first")]
#[test_case::test_case(b"GETTHEADMINPAGEWITHAVERYLONGMETHODNAME /admin HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n", "403" ; "a long extension method is still HTTP")]
#[test_case::test_case(b"GET  /admin  HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n", "400" ; "runs of spaces: HTTP for lenient servers, refused by the enforcer")]
#[test_case::test_case(b"GET\t/admin\tHTTP/1.1\r\nHost: httpbin.foo\r\n\r\n", "400" ; "tabs between the parts")]
#[tokio::test]
async fn request_lines_that_lenient_servers_read_are_judged_as_http(bytes: &[u8], status: &str) {
    refused_before_the_pod(bytes, status).await;
}

#[tokio::test]
async fn leading_empty_lines_do_not_let_output_headers_through() {
    // Client copies of the JWT output headers are removed from every judged request.
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let answer = exchange(
        &node,
        KNOWN_CLIENT,
        b"\r\nGET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nx-user: admin\r\nx-jwt-payload: forged\r\nConnection: close\r\n\r\n",
        SHORT,
    )
    .await;
    assert_eq!(statuses(&answer), ["200"], "{answer}");
    let received = pod.received().to_ascii_lowercase();
    assert!(received.contains("get /ok http/1.1"), "{received}");
    assert!(
        !received.contains("x-user") && !received.contains("x-jwt-payload"),
        "{received}"
    );
}

fn slow_limits() -> Limits {
    Limits {
        detect_timeout: Duration::from_millis(200),
        ..Limits::default()
    }
}

#[tokio::test]
async fn a_client_that_waits_is_still_judged_as_http() {
    // Istio waits for the first bytes (protocolDetectionTimeout 0s); here the detection
    // timeout is short and the client waits well past it before each request.
    let (node, pod) = raw_node(slow_limits(), Vec::new()).await;
    let cases: [(&str, &[u8], &str); 3] = [
        (
            KNOWN_CLIENT,
            b"GET /admin HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n",
            "403",
        ),
        (
            KNOWN_CLIENT,
            b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nAuthorization: Bearer not.a.jwt\r\n\r\n",
            "401",
        ),
        (
            KNOWN_CLIENT,
            b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nx-user: admin\r\nConnection: close\r\n\r\n",
            "200",
        ),
    ];
    for (source, bytes, status) in cases {
        let mut stream = connect_from(&node, source).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream.write_all(bytes).await.expect("write");
        let answer = read_all(&mut stream, SHORT).await;
        assert_eq!(statuses(&answer), [status], "{answer}");
    }
    let received = pod.received();
    assert_eq!(pod.request_lines(), ["GET /ok HTTP/1.1"], "{received}");
    assert!(
        !received.to_ascii_lowercase().contains("x-user"),
        "{received}"
    );
}

#[tokio::test]
async fn a_server_first_protocol_is_judged_as_tcp_and_spliced() {
    // The pod speaks first (a MySQL- or SMTP-like banner): after the detection timeout the
    // connection is judged with Istio's TCP semantics; the unknown source is denied before the
    // banner reaches it, the known one talks to the pod.
    let pod = RawPod::server_first(b"220 pod ready\r\n").await;
    let node = node_at(
        &tcp_policies(),
        slow_limits(),
        Vec::new(),
        pod.addr,
        Upstream::default(),
    )
    .await;
    let mut known = connect_from(&node, KNOWN_CLIENT).await;
    let mut banner = [0u8; 15];
    tokio::time::timeout(SHORT, known.read_exact(&mut banner))
        .await
        .expect("banner in time")
        .expect("banner");
    assert_eq!(&banner, b"220 pod ready\r\n");
    known.write_all(b"HELO x\r\n").await.expect("write");
    let mut echo = [0u8; 8];
    tokio::time::timeout(SHORT, known.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"HELO x\r\n");

    let mut unknown = connect_from(&node, UNKNOWN_CLIENT).await;
    let got = read_all(&mut unknown, SHORT).await;
    assert_eq!(got, "", "a denied client gets nothing of the pod's");
    assert!(node
        .metrics
        .encode()
        .contains("decision=\"deny\",code=\"0\",reason=\"no_allow_matched\""));
}

#[tokio::test]
async fn a_silent_client_that_then_speaks_http_closes_the_early_pod_connection() {
    let (node, pod) = raw_node(slow_limits(), Vec::new()).await;
    let mut stream = connect_from(&node, UNKNOWN_CLIENT).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // The enforcer opened a pod connection to see who speaks first; nothing passed on it.
    assert_eq!(pod.received(), "");
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nx-user: admin\r\n\r\n")
        .await
        .expect("write");
    let answer = read_all(&mut stream, SHORT).await;
    assert_eq!(
        statuses(&answer),
        ["403"],
        "judged as HTTP: no token, unknown source: {answer}"
    );
    assert_eq!(pod.received(), "", "nothing reached the pod");
}

fn declared(node_port: u16, protocol: PortProtocol) -> Vec<DeclaredPort> {
    vec![DeclaredPort {
        port: node_port,
        protocol,
    }]
}

#[test_case::test_case(b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00" ; "a TLS record")]
#[test_case::test_case(b"SSH-2.0-OpenSSH_9.2\r\n" ; "another protocol's greeting")]
#[test_case::test_case(b"\x00\x01\x02garbage\r\n\r\n" ; "binary")]
#[tokio::test]
async fn a_port_declared_http_answers_400_to_bytes_that_are_not_http(bytes: &[u8]) {
    let pod = RawPod::http().await;
    let ports = declared(pod.addr.port(), PortProtocol::Http);
    let node = node_at(
        &host_policies(),
        Limits::default(),
        ports,
        pod.addr,
        Upstream::default(),
    )
    .await;
    let answer = exchange(&node, KNOWN_CLIENT, bytes, SHORT).await;
    assert_eq!(statuses(&answer), ["400"], "{answer}");
    assert_eq!(pod.connections(), 0, "{}", pod.received());
}

#[tokio::test]
async fn a_port_declared_http_never_waits_for_the_pod_to_speak() {
    let pod = RawPod::server_first(b"220 banner\r\n").await;
    let ports = declared(pod.addr.port(), PortProtocol::Http);
    let node = node_at(
        &host_policies(),
        slow_limits(),
        ports,
        pod.addr,
        Upstream::default(),
    )
    .await;
    let mut stream = connect_from(&node, KNOWN_CLIENT).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        pod.connections(),
        0,
        "no early pod connection on an HTTP port"
    );
    stream
        .write_all(b"GET /admin HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n")
        .await
        .expect("write");
    let answer = read_all(&mut stream, SHORT).await;
    assert_eq!(statuses(&answer), ["403"], "{answer}");
}

#[tokio::test]
async fn a_port_declared_tcp_gets_tcp_semantics_from_the_first_byte() {
    // Istio: a port declared TCP is never parsed as HTTP; its policies apply with TCP
    // semantics (here: the known source is allowed, the unknown one is not).
    let pod = RawPod::server_first(b"+OK\r\n").await;
    let ports = declared(pod.addr.port(), PortProtocol::Redis);
    let node = node_at(
        &tcp_policies(),
        slow_limits(),
        ports,
        pod.addr,
        Upstream::default(),
    )
    .await;
    let mut known = connect_from(&node, KNOWN_CLIENT).await;
    let mut banner = [0u8; 5];
    tokio::time::timeout(Duration::from_millis(150), known.read_exact(&mut banner))
        .await
        .expect("the banner comes before the detection timeout: no waiting")
        .expect("banner");
    assert_eq!(&banner, b"+OK\r\n");
    let unknown = exchange(&node, UNKNOWN_CLIENT, b"PING\r\n", SHORT).await;
    assert_eq!(unknown, "");
}

// --- 4. Authority -----------------------------------------------------------------------------

#[test_case::test_case(b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nHost: admin.foo\r\n\r\n" ; "two Host lines (RFC 9112 3.2: 400)")]
#[test_case::test_case(b"GET /ok HTTP/1.1\r\n\r\n" ; "HTTP/1.1 without Host (RFC 9112 3.2: 400)")]
#[test_case::test_case(b"GET /ok HTTP/1.1\r\nHost: user@httpbin.foo\r\n\r\n" ; "user info in Host")]
#[test_case::test_case(b"GET /ok HTTP/1.1\r\nHost: httpbin.foo/admin\r\n\r\n" ; "a path in Host")]
#[tokio::test]
async fn bad_host_headers_get_400(bytes: &[u8]) {
    refused_before_the_pod(bytes, "400").await;
}

#[tokio::test]
async fn absolute_form_authority_wins_over_host() {
    // RFC 9112 3.2.2: the target URI's authority replaces Host; the pod gets exactly it.
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let denied = exchange(
        &node,
        KNOWN_CLIENT,
        b"GET http://admin.foo/ok HTTP/1.1\r\nHost: httpbin.foo\r\n\r\n",
        SHORT,
    )
    .await;
    assert_eq!(statuses(&denied), ["403"], "judged on admin.foo: {denied}");
    let allowed = exchange(
        &node,
        KNOWN_CLIENT,
        b"GET http://httpbin.foo/ok HTTP/1.1\r\nHost: admin.foo\r\nConnection: close\r\n\r\n",
        SHORT,
    )
    .await;
    assert_eq!(statuses(&allowed), ["200"], "{allowed}");
    let received = pod.received();
    assert!(
        received.starts_with("GET /ok HTTP/1.1\r\n"),
        "origin form to the pod: {received}"
    );
    let hosts: Vec<&str> = received
        .split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with("host:"))
        .collect();
    assert_eq!(hosts, ["host: httpbin.foo"], "{received}");
}

#[tokio::test]
async fn http10_keeps_its_version_and_its_missing_host() {
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let answer = exchange(&node, KNOWN_CLIENT, b"GET /ok HTTP/1.0\r\n\r\n", SHORT).await;
    assert_eq!(statuses(&answer), ["200"], "{answer}");
    let received = pod.received();
    assert!(received.starts_with("GET /ok HTTP/1.0\r\n"), "{received}");
    assert!(
        !received.to_ascii_lowercase().contains("host:"),
        "{received}"
    );
}

#[tokio::test]
async fn h2_host_beside_authority_is_discarded() {
    // Envoy discards `host` when `:authority` is present; host rules judge `:authority`, and
    // the pod receives only it.
    let node = node_with(&host_policies(), Limits::default()).await;
    let stream = connect_from(&node, KNOWN_CLIENT).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get("http://httpbin.foo/ok")
        .header("host", "admin.foo")
        .body(Full::<Bytes>::default())
        .expect("request");
    let res = sender.send_request(req).await.expect("answer");
    assert_eq!(res.status(), StatusCode::OK);
    let req = Request::get("http://admin.foo/ok")
        .header("host", "httpbin.foo")
        .body(Full::<Bytes>::default())
        .expect("request");
    let res = sender.send_request(req).await.expect("answer");
    assert_eq!(res.status(), StatusCode::FORBIDDEN, "judged on :authority");
    let seen = node.upstream.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "http://httpbin.foo/ok");
    assert!(
        seen[0].headers.get("host").is_none(),
        "{:?}",
        seen[0].headers
    );
}

// --- 5. Framing -------------------------------------------------------------------------------

#[tokio::test]
async fn a_bad_chunk_size_is_the_clients_fault() {
    let (node, _pod) = raw_node(Limits::default(), Vec::new()).await;
    let answer = exchange(
        &node,
        KNOWN_CLIENT,
        b"POST /ok HTTP/1.1\r\nHost: httpbin.foo\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        SHORT,
    )
    .await;
    assert_eq!(statuses(&answer), ["400"], "{answer}");
}

#[tokio::test]
async fn an_http_pod_timing_out_a_silent_client_is_not_a_server_first_protocol() {
    // Apache and Node answer an idle connection `408` before closing it; that must not turn
    // the connection into a spliced TCP one that a late request could use unjudged.
    let pod =
        RawPod::server_first(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\r\n").await;
    let node = node_at(
        &tcp_policies(),
        slow_limits(),
        Vec::new(),
        pod.addr,
        Upstream::default(),
    )
    .await;
    let mut stream = connect_from(&node, KNOWN_CLIENT).await;
    let got = read_all(&mut stream, SHORT).await;
    assert_eq!(
        got, "",
        "the pod's 408 is not passed on; the connection closes"
    );
}

#[tokio::test]
async fn http10_chunked_request_is_refused() {
    // RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means the framing is faulty.
    refused_before_the_pod(
        b"POST /ok HTTP/1.0\r\nHost: httpbin.foo\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "400",
    )
    .await;
}

// --- 3. Tokens that do not decode are still tokens --------------------------------------------

/// `host_policies()` plus a jwtRule reading the `session` cookie (same issuer and keys).
fn cookie_policies() -> String {
    let keys = support::jwks(vec![support::jwk(
        jsonwebtoken::Algorithm::RS256,
        "rsa",
        false,
    )]);
    format!(
        "{}---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt-cookie, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: {ISS}
    jwks: '{keys}'
    fromCookies: [session]
",
        host_policies()
    )
}

#[tokio::test]
async fn tokens_with_undecodable_bytes_are_verified_and_rejected() {
    // Envoy's extractor takes the token after the prefix and verifies it: a forged token with a
    // non-ASCII byte, beside a non-ASCII cookie, or with `%FF` in the query is a bad token (401),
    // never a missing one.
    let pod = RawPod::http().await;
    let node = node_at(
        &cookie_policies(),
        Limits::default(),
        Vec::new(),
        pod.addr,
        Upstream::default(),
    )
    .await;
    let forged = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2ln";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "header, non-ASCII byte after the token",
            [
                format!("GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nAuthorization: Bearer {forged}").as_bytes(),
                b"\xff\r\nConnection: close\r\n\r\n",
            ]
            .concat(),
        ),
        (
            "header, valid token then a non-ASCII byte",
            [
                format!("GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nAuthorization: Bearer {}", token()).as_bytes(),
                b"\xe9\r\nConnection: close\r\n\r\n",
            ]
            .concat(),
        ),
        (
            "cookie beside a non-ASCII sibling",
            [
                format!("GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nCookie: session={forged}; name=").as_bytes(),
                b"J\xe9r\xf4me\r\nConnection: close\r\n\r\n",
            ]
            .concat(),
        ),
        (
            "query parameter with %FF",
            format!("GET /ok?access_token={forged}%FF HTTP/1.1\r\nHost: httpbin.foo\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        ),
        (
            "prefix after another scheme's value (Envoy finds it anywhere)",
            format!("GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nAuthorization: Token x, Bearer {forged}\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        ),
    ];
    for (case, bytes) in cases {
        let answer = exchange(&node, UNKNOWN_CLIENT, &bytes, SHORT).await;
        assert_eq!(statuses(&answer), ["401"], "{case}: {answer}");
    }
    assert_eq!(pod.connections(), 0, "{}", pod.received());
}

#[tokio::test]
async fn a_valid_cookie_token_beside_a_non_ascii_sibling_is_used_and_removed() {
    let pod = RawPod::http().await;
    let node = node_at(
        &cookie_policies(),
        Limits::default(),
        Vec::new(),
        pod.addr,
        Upstream::default(),
    )
    .await;
    let bytes = [
        format!(
            "GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nCookie: session={}; name=",
            token()
        )
        .as_bytes(),
        b"J\xe9r\xf4me\r\nConnection: close\r\n\r\n",
    ]
    .concat();
    let answer = exchange(&node, UNKNOWN_CLIENT, &bytes, SHORT).await;
    assert_eq!(
        statuses(&answer),
        ["200"],
        "a valid token: the request principal is allowed: {answer}"
    );
    let received = pod.received();
    assert!(
        !received.contains("session="),
        "the token is removed: {received}"
    );
    assert!(
        received.contains("name=J"),
        "the sibling cookie is kept: {received}"
    );
}

#[tokio::test]
async fn lower_case_bearer_is_not_a_token() {
    // Envoy's prefix match is case-sensitive: `bearer <garbage>` is ignored, the request is
    // anonymous (here: the known workload is allowed by its principal) and the value passes.
    let (node, pod) = raw_node(Limits::default(), Vec::new()).await;
    let answer = exchange(
        &node,
        KNOWN_CLIENT,
        b"GET /ok HTTP/1.1\r\nHost: httpbin.foo\r\nAuthorization: bearer garbage\r\nConnection: close\r\n\r\n",
        SHORT,
    )
    .await;
    assert_eq!(statuses(&answer), ["200"], "{answer}");
    assert!(
        pod.received().contains("bearer garbage"),
        "{}",
        pod.received()
    );
}
