//! A body far larger than any buffer goes through the enforcer streamed: in its own test
//! binary so the process's memory is this test's alone.

mod support;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use nodeward::enforcer::Limits;
use support::node::*;

#[tokio::test]
async fn bodies_stream_without_being_buffered() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 256; // 256 MiB through the enforcer
    let node = node_with(&policies(), Limits::default()).await;
    let stream = connect_from(&node, KNOWN_CLIENT).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let rss_before = rss_kib();
    let req = Request::post("/upload")
        .header("host", "httpbin.foo")
        .body(chunked_body(CHUNK, CHUNKS))
        .expect("request");
    let res = tokio::time::timeout(Duration::from_mins(1), sender.send_request(req))
        .await
        .expect("within a minute")
        .expect("response");
    assert_eq!(res.status(), StatusCode::OK);
    let seen = node.upstream.seen();
    assert_eq!(seen[0].body_len, CHUNK * CHUNKS);
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "the test process grew by {grown} KiB while 256 MiB went through: bodies must stream"
    );

    // A GET with a chunked body keeps its body (hyper would drop it without explicit framing).
    let stream = connect_from(&node, KNOWN_CLIENT).await;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = get("/search")
        .header("transfer-encoding", "chunked")
        .body(chunked_body(10, 3))
        .expect("request");
    let res = sender.send_request(req).await.expect("response");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(node.upstream.seen()[1].body_len, 30);
}

/// A body of `count` chunks of `chunk` bytes, produced as it is sent.
fn chunked_body(
    chunk: usize,
    count: usize,
) -> StreamBody<tokio_stream::wrappers::ReceiverStream<Result<Frame<Bytes>, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    tokio::spawn(async move {
        let data = Bytes::from(vec![b'x'; chunk]);
        for _ in 0..count {
            if tx.send(Ok(Frame::data(data.clone()))).await.is_err() {
                return;
            }
        }
    });
    StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
