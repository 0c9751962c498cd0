//! Connections from the enforcer to pods. HTTP/1.1 goes through hyper-util's pooled client,
//! keyed by the pod's address (the client's Host header is kept as is). HTTP/2 (h2c) keeps one
//! multiplexed connection per pod address, with the client's `:authority` in the request, so
//! two pods behind the same host name never share a connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

/// Idle HTTP/1.1 connections kept per pod; a burst above it closes its extra connections when
/// they go idle instead of holding thousands of descriptors.
pub const MAX_IDLE_PER_POD: usize = 64;

/// Why a request could not be delivered to the pod (answered 503 to the client).
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No TCP connection to the pod within the connect timeout.
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The connection attempt took longer than the connect timeout.
    #[error("connecting to {addr}: timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    /// The HTTP/2 handshake with the pod failed.
    #[error("HTTP/2 handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The HTTP/1.1 exchange failed (connection refused, reset, malformed response, ...).
    #[error("HTTP/1.1 to {addr}: {source}")]
    Http1 {
        addr: SocketAddr,
        source: hyper_util::client::legacy::Error,
    },
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2 to {addr}: {source}")]
    Http2 {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// The enforcer's connections to pods.
pub struct Upstream {
    http1: Client<HttpConnector, Incoming>,
    http2: Mutex<HashMap<SocketAddr, SendRequest<Incoming>>>,
    connect_timeout: Duration,
}

impl Upstream {
    #[must_use]
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(idle_timeout)
            .pool_max_idle_per_host(MAX_IDLE_PER_POD)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .set_host(false)
            .build(connector);
        Self {
            http1,
            http2: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// Sends an HTTP/1.1 request to `dst`; `req`'s URI is the path and query (origin form),
    /// its Host header the client's.
    pub async fn send_http1(
        &self,
        dst: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str)
            .to_owned();
        // The pool is keyed by the URI's authority: the pod's address, never the Host header.
        let uri = format!("http://{dst}{path}");
        *req.uri_mut() = uri.parse().map_err(|_| UpstreamError::Connect {
            addr: dst,
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        *req.version_mut() = hyper::Version::HTTP_11;
        self.http1
            .request(req)
            .await
            .map_err(|source| UpstreamError::Http1 { addr: dst, source })
    }

    /// Sends an HTTP/2 request to `dst` on its shared connection; `req`'s URI carries the
    /// client's scheme and authority.
    pub async fn send_http2(
        &self,
        dst: SocketAddr,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut sender = self.h2_sender(dst).await?;
        sender
            .ready()
            .await
            .map_err(|source| UpstreamError::Http2 { addr: dst, source })?;
        sender
            .send_request(req)
            .await
            .map_err(|source| UpstreamError::Http2 { addr: dst, source })
    }

    async fn h2_sender(&self, dst: SocketAddr) -> Result<SendRequest<Incoming>, UpstreamError> {
        if let Some(sender) = self.lock().get(&dst).filter(|s| !s.is_closed()).cloned() {
            return Ok(sender);
        }
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(dst))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout {
                addr: dst,
                timeout: self.connect_timeout,
            })?
            .map_err(|source| UpstreamError::Connect { addr: dst, source })?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake { addr: dst, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%dst, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        self.lock().insert(dst, sender.clone());
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SendRequest<Incoming>>> {
        // A poisoned map only holds senders; keep using it.
        self.http2
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets HTTP/2 connections to pods that went away.
    pub fn prune(&self) {
        self.lock().retain(|_, s| !s.is_closed());
    }

    /// Open HTTP/2 connections (for tests and `/debug/state`).
    #[must_use]
    pub fn http2_connections(&self) -> usize {
        self.lock().values().filter(|s| !s.is_closed()).count()
    }

    /// Arc for sharing.
    #[must_use]
    pub fn shared(self) -> Arc<Self> {
        Arc::new(self)
    }
}
