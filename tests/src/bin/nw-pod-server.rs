//! The HTTP server of a test pod: answers every request with a JSON description of what it
//! received (method, path and query, headers, body length and FNV-1a hash), so tests can check
//! what reached the pod; `GET /bytes/<n>` answers `n` bytes of [`nodeward_tests::pattern`]
//! instead (large downloads checked byte for byte); with `--jwks FILE` it also serves that file at
//! `/jwks.json` (a JWKS server pod).
//!
//! Usage: `nw-pod-server ADDR [--jwks FILE]`; runs until killed.

use std::convert::Infallible;
use std::net::SocketAddr;

use http_body_util::{BodyExt as _, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| std::io::Error::other("usage: nw-pod-server ADDR [--jwks FILE]"))?;
    let jwks = match (args.next().as_deref(), args.next()) {
        (Some("--jwks"), Some(file)) => Some(std::fs::read(file)?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(addr, jwks))
}

async fn serve(addr: SocketAddr, jwks: Option<Vec<u8>>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let jwks = jwks.map(Bytes::from);
    loop {
        let (stream, peer) = listener.accept().await?;
        let jwks = jwks.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let jwks = jwks.clone();
                async move { Ok::<_, Infallible>(answer(req, peer, jwks).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    jwks: Option<Bytes>,
) -> Response<Full<Bytes>> {
    if let (Some(jwks), "/jwks.json") = (jwks, req.uri().path()) {
        return Response::new(Full::new(jwks));
    }
    if let Some(n) = req
        .uri()
        .path()
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        return Response::new(Full::new(Bytes::from(nodeward_tests::pattern(n))));
    }
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let body_len = body.len();
    let body_fnv = nodeward_tests::fnv1a(&body);
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
            )
        })
        .collect();
    let seen = serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body_len": body_len,
        "body_fnv": format!("{body_fnv:016x}"),
        "peer": peer.to_string(),
    });
    Response::new(Full::new(Bytes::from(seen.to_string())))
}
