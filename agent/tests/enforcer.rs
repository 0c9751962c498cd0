//! The enforcer with real sockets on loopback (harness in `support/node.rs`): what reaches
//! the pod, what never does, HTTP/2, upgrades, hostile clients, TCP and TLS, and a load of
//! thousands of keep-alive connections.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nodeward::enforcer::Limits;
use support::node::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[tokio::test]
async fn allowed_requests_arrive_as_judged() {
    let node = node_with(&policies(), Limits::default()).await;
    let mut client = http1(&node, UNKNOWN_CLIENT).await;
    let req = get("/a/./b/../c?x=1")
        .header("authorization", format!("Bearer {}", token()))
        .header("x-user", "spoofed")
        .header("x-custom", "kept")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "dropped")
        .body(Full::new(Bytes::from_static(b"hello")))
        .expect("request");
    let (status, _, body) = send(&mut client, req).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "pod saw 5 bytes"));
    let seen = node.upstream.seen();
    assert_eq!(seen.len(), 1);
    let s = &seen[0];
    assert_eq!(
        (s.method.as_str(), s.uri.as_str()),
        ("GET", "/a/c?x=1"),
        "the normalized path is forwarded"
    );
    assert_eq!(
        s.headers["host"], "httpbin.foo:8000",
        "Host is the client's"
    );
    assert!(
        s.headers.get("authorization").is_none(),
        "the token is removed"
    );
    assert_eq!(
        s.headers["x-user"], "alice",
        "the output claim replaces the client's copy"
    );
    assert!(s.headers.contains_key("x-jwt-payload"));
    assert_eq!(s.headers["x-custom"], "kept");
    assert!(
        s.headers.get("x-hop").is_none() && s.headers.get("keep-alive").is_none(),
        "hop-by-hop headers are dropped"
    );
    assert_eq!(s.body_len, 5);

    // Keep-alive: the next request on the same connection is judged on its own.
    let (status, _, body) = send(
        &mut client,
        get("/admin/users").body(Full::default()).expect("request"),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied")
    );
    assert_eq!(
        node.upstream.seen().len(),
        1,
        "a denied request never reaches the pod"
    );
}

#[tokio::test]
async fn denied_requests_get_istios_answers_and_never_arrive() {
    let node = node_with(&policies(), Limits::default()).await;
    let mut unknown = http1(&node, UNKNOWN_CLIENT).await;
    let (status, _, body) = send(
        &mut unknown,
        get("/").body(Full::default()).expect("request"),
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::FORBIDDEN, "RBAC: access denied"),
        "no token, unknown source"
    );
    let req = get("/ip")
        .header("authorization", "Bearer garbage")
        .body(Full::default())
        .expect("request");
    let (status, headers, body) = send(&mut unknown, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        body,
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    );
    assert_eq!(
        headers["www-authenticate"],
        "Bearer realm=\"http://httpbin.foo:8000/ip\", error=\"invalid_token\""
    );
    assert!(node.upstream.seen().is_empty());

    let mut known = http1(&node, KNOWN_CLIENT).await;
    let (status, _, _) = send(&mut known, get("/").body(Full::default()).expect("request")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a known workload matches principals [*]"
    );
    assert_eq!(node.upstream.seen().len(), 1);
    let text = node.metrics.encode();
    assert!(text.contains("nodeward_requests_total{workload=\"foo/httpbin\",decision=\"deny\",code=\"401\",reason=\"authn_bad_format\"} 1"), "{text}");
}

#[tokio::test]
async fn http2_prior_knowledge() {
    let node = node_with(&policies(), Limits::default()).await;
    let stream = connect_from(&node, KNOWN_CLIENT).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    for (path, expected) in [
        ("/ok", StatusCode::OK),
        ("/admin", StatusCode::FORBIDDEN),
        ("/again", StatusCode::OK),
    ] {
        let req = Request::get(format!("http://httpbin.foo:8000{path}"))
            .body(Full::<Bytes>::default())
            .expect("request");
        let res = sender.send_request(req).await.expect("response");
        assert_eq!(res.status(), expected, "{path}");
    }
    let seen = node.upstream.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[0].version,
        hyper::Version::HTTP_2,
        "h2c is forwarded as HTTP/2"
    );
    assert_eq!(
        seen[0].uri, "http://httpbin.foo:8000/ok",
        "the client's :authority reaches the pod"
    );
}

/// Sends raw bytes from `source` and returns what the enforcer answered (until it closes, a
/// complete head arrives, or `wait`).
async fn raw(node: &Node, source: &str, bytes: &[u8], wait: Duration) -> String {
    let mut stream = connect_from(node, source).await;
    stream.write_all(bytes).await.expect("write");
    read_some(&mut stream, wait).await
}

async fn read_some(stream: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn refused(node: &Node, reason: &str) -> u64 {
    let text = node.metrics.encode();
    let needle = format!("nodeward_refused_total{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn websocket_upgrade_goes_through_after_the_request_was_allowed() {
    let node = node_with(&policies(), Limits::default()).await;
    let mut stream = connect_from(&node, KNOWN_CLIENT).await;
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .await
        .expect("write");
    let head = read_some(&mut stream, Duration::from_secs(5)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let ping = b"ping over the upgraded connection";
    stream.write_all(ping).await.expect("write");
    let mut echo = vec![0u8; ping.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(echo, ping);

    let denied = raw(&node, KNOWN_CLIENT, b"GET /admin HTTP/1.1\r\nHost: httpbin.foo\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", Duration::from_secs(5)).await;
    assert!(
        denied.starts_with("HTTP/1.1 403"),
        "a denied upgrade is not forwarded: {denied}"
    );
    assert_eq!(node.upstream.seen().len(), 1);
}

#[tokio::test]
#[expect(
    clippy::too_many_lines,
    reason = "one table of hostile inputs and their counters"
)]
async fn hostile_clients_are_refused_before_the_pod() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let node = node_with(&policies(), limits).await;
    let wait = Duration::from_secs(3);
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert!(
        raw(&node, KNOWN_CLIENT, big.as_bytes(), wait)
            .await
            .starts_with("HTTP/1.1 431"),
        "header too large"
    );
    let many = (0..150).fold(String::new(), |mut out, i| {
        use std::fmt::Write as _;
        let _ = write!(out, "X-H{i}: v\r\n");
        out
    });
    let many = format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    assert!(
        raw(&node, KNOWN_CLIENT, many.as_bytes(), wait)
            .await
            .starts_with("HTTP/1.1 431"),
        "too many headers"
    );
    for smuggle in [
        &b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
        &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"[..],
    ] {
        let answer = raw(&node, KNOWN_CLIENT, smuggle, wait).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "Content-Length with Transfer-Encoding: {answer}");
    }
    let conflicting =
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde";
    assert!(
        raw(&node, KNOWN_CLIENT, conflicting, wait)
            .await
            .starts_with("HTTP/1.1 400"),
        "conflicting lengths"
    );
    assert!(
        raw(
            &node,
            KNOWN_CLIENT,
            b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
            wait
        )
        .await
        .starts_with("HTTP/1.1 400"),
        "malformed header"
    );
    assert!(
        raw(
            &node,
            KNOWN_CLIENT,
            b"GET /a%00 HTTP/1.1\r\nHost: a\r\n\r\n",
            wait
        )
        .await
        .starts_with("HTTP/1.1 400"),
        "bad path"
    );

    // Slowloris: a head that never ends is cut at the header-read timeout.
    let started = std::time::Instant::now();
    let answer = raw(&node, KNOWN_CLIENT, b"GET / HTTP/1.1\r\nHost: a\r\n", wait).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "closed after {:?}: {answer}",
        started.elapsed()
    );
    // Idle keep-alive connections are closed too.
    let mut stream = connect_from(&node, KNOWN_CLIENT).await;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    assert!(read_some(&mut stream, wait)
        .await
        .starts_with("HTTP/1.1 200"));
    let mut rest = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match stream.read(&mut rest).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an idle keep-alive connection is closed");

    assert_eq!(
        node.upstream.seen().len(),
        1,
        "only the one valid request reached the pod"
    );
    assert_eq!(refused(&node, "header_too_large"), 2);
    assert_eq!(refused(&node, "content_length_conflict"), 2);
    assert!(
        refused(&node, "malformed_request") >= 2,
        "{}",
        node.metrics.encode()
    );
    assert_eq!(refused(&node, "bad_path"), 1);
    assert!(
        refused(&node, "header_read_timeout") >= 1,
        "{}",
        node.metrics.encode()
    );
}

/// A TCP echo server on the pod address.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind((POD, 0)).await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn client_hello(name: &str) -> Vec<u8> {
    let name = name.as_bytes();
    let len16 = |n: usize| u16::try_from(n).expect("short").to_be_bytes();
    let mut sni = len16(name.len() + 3).to_vec();
    sni.push(0);
    sni.extend_from_slice(&len16(name.len()));
    sni.extend_from_slice(name);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&len16(sni.len()));
    ext.extend_from_slice(&sni);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&len16(ext.len()));
    body.extend_from_slice(&ext);
    let mut hs = vec![1];
    hs.extend_from_slice(&u32::try_from(body.len()).expect("short").to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 3, 1];
    rec.extend_from_slice(&len16(hs.len()));
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test]
async fn tcp_and_tls_get_istios_tcp_semantics() {
    let tcp_policies = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: known-only, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from: [{source: {principals: [\"*\"]}}]
  - to: [{operation: {methods: [GET]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sni, namespace: foo}
spec:
  action: DENY
  rules: [{when: [{key: connection.sni, values: [blocked.example]}]}]
";
    let node = node_with(
        tcp_policies,
        Limits {
            detect_timeout: Duration::from_millis(200),
            ..Limits::default()
        },
    )
    .await;
    let echo = echo_server().await;
    let front = steer(&node.enforcer, echo, &node.shutdown, &node.tracker).await;
    let connect = |source: &'static str| async move {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source.parse().expect("ip"), 0))
            .expect("bind");
        socket.connect(front).await.expect("connect")
    };
    // Binary protocol from a known workload: allowed, spliced both ways.
    let mut known = connect(KNOWN_CLIENT).await;
    known
        .write_all(b"\x00\x01binary protocol")
        .await
        .expect("write");
    let mut buf = [0u8; 17];
    tokio::time::timeout(Duration::from_secs(5), known.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("echo");
    assert_eq!(&buf, b"\x00\x01binary protocol");
    // From an unknown source the only matching rule needs HTTP (methods): dropped, so denied.
    let mut unknown = connect(UNKNOWN_CLIENT).await;
    unknown
        .write_all(b"\x00\x01binary protocol")
        .await
        .expect("write");
    let n = tokio::time::timeout(Duration::from_secs(5), unknown.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "a denied TCP connection is closed");
    // A client silent past the detection timeout whose first bytes cannot be HTTP: judged as
    // TCP and spliced (a late HTTP request is judged as HTTP: enforcer_bypass.rs).
    let mut silent = connect(KNOWN_CLIENT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    silent.write_all(b"\x00late").await.expect("write");
    let mut late = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), silent.read_exact(&mut late))
        .await
        .expect("in time")
        .expect("echo");
    // TLS: the ClientHello's server name is connection.sni.
    for (name, allowed) in [("api.example", true), ("blocked.example", false)] {
        let mut tls = connect(KNOWN_CLIENT).await;
        let hello = client_hello(name);
        tls.write_all(&hello).await.expect("write");
        let mut back = vec![0u8; hello.len()];
        let got = tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut back))
            .await
            .expect("in time");
        assert_eq!(got.is_ok(), allowed, "{name}");
        if allowed {
            assert_eq!(back, hello, "allowed TLS bytes are spliced untouched");
        }
    }
}

#[tokio::test]
async fn pipelined_requests_are_each_judged_in_order() {
    let node = node_with(&policies(), Limits::default()).await;
    let mut stream = connect_from(&node, KNOWN_CLIENT).await;
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\nGET /third HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while text.matches("HTTP/1.1 ").count() < 3 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => break,
        }
    }
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "403", "200"], "{text}");
    let uris: Vec<String> = node.upstream.seen().iter().map(|s| s.uri.clone()).collect();
    assert_eq!(
        uris,
        ["/first", "/third"],
        "the denied one in the middle never reached the pod"
    );
}
