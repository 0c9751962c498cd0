//! Connections from the enforcer to pods. HTTP/1.1 goes through hyper-util's pooled client,
//! keyed by the pod's address (the client's Host header is kept as is). HTTP/2 (h2c) keeps one
//! multiplexed connection per pod address, with the client's `:authority` in the request, so
//! two pods behind the same host name never share a connection. Every upstream socket carries
//! `SO_MARK` = the upstream mark, by which the kernel's guard program tells the enforcer's own
//! traffic into a protected pod from a bypass.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
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

/// A client's request body on its way to the pod, remembering whether reading it failed (a
/// malformed chunk, a body cut short), so that the client is answered 400, not 503: the fault
/// was the request's, not the pod's.
#[derive(Debug)]
pub struct Watched {
    /// Bytes of the body read before forwarding began (for an external authorizer), sent
    /// first.
    ahead: Option<bytes::Bytes>,
    inner: Incoming,
    failed: Arc<AtomicBool>,
}

impl Watched {
    /// The body (after `ahead`, the bytes of it already read), and the flag set when reading
    /// it fails.
    #[must_use]
    pub fn new(inner: Incoming, ahead: Option<bytes::Bytes>) -> (Self, Arc<AtomicBool>) {
        let failed = Arc::new(AtomicBool::new(false));
        (
            Self {
                ahead: ahead.filter(|b| !b.is_empty()),
                inner,
                failed: failed.clone(),
            },
            failed,
        )
    }
}

impl hyper::body::Body for Watched {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        if let Some(ahead) = self.ahead.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(ahead))));
        }
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Err(_))) = &polled {
            self.failed.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let ahead = self.ahead.as_ref().map_or(0, |b| b.len() as u64);
        let inner = self.inner.size_hint();
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower() + ahead);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

/// How the enforcer dials pods.
#[derive(Debug, Clone, Default)]
pub struct Dial {
    /// `SO_MARK` of every upstream socket (0: none).
    pub mark: u32,
    /// Bound on each connection attempt.
    pub timeout: Duration,
    /// Pods whose enforcer runs in their own namespace (in-pod steering): a connection to one
    /// of their addresses is made from inside that namespace, over the pod's loopback.
    pub namespaces: Option<Arc<crate::inpod::PodNamespaces>>,
}

/// Opens a TCP connection to a pod as `dial` says: `SO_MARK` set (when not 0), `TCP_NODELAY`,
/// created in the pod's own namespace under in-pod steering, bounded by the timeout.
pub async fn connect(addr: SocketAddr, dial: &Dial) -> Result<TcpStream, UpstreamError> {
    let connect_error = |source| UpstreamError::Connect { addr, source };
    let netns = dial
        .namespaces
        .as_ref()
        .and_then(|namespaces| namespaces.netns_of(addr.ip()));
    let socket = match netns {
        Some(netns) => {
            let domain = socket2::Domain::for_address(addr);
            let created = netns
                .within(|| {
                    socket2::Socket::new(
                        domain,
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    )
                })
                .and_then(|socket| socket)
                .map_err(connect_error)?;
            created.set_nonblocking(true).map_err(connect_error)?;
            tokio::net::TcpSocket::from_std_stream(created.into())
        }
        None if addr.is_ipv4() => tokio::net::TcpSocket::new_v4().map_err(connect_error)?,
        None => tokio::net::TcpSocket::new_v6().map_err(connect_error)?,
    };
    if dial.mark != 0 {
        socket2::SockRef::from(&socket)
            .set_mark(dial.mark)
            .map_err(connect_error)?;
    }
    socket.set_nodelay(true).map_err(connect_error)?;
    let timeout = dial.timeout;
    tokio::time::timeout(timeout, socket.connect(addr))
        .await
        .map_err(|_| UpstreamError::ConnectTimeout { addr, timeout })?
        .map_err(connect_error)
}

/// hyper-util's connector for the HTTP/1.1 pool: the URI's authority is the pod's address.
#[derive(Debug, Clone)]
struct MarkedConnector {
    dial: Dial,
}

impl tower_service::Service<hyper::Uri> for MarkedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = UpstreamError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: hyper::Uri) -> Self::Future {
        let dial = self.dial.clone();
        Box::pin(async move {
            let addr: SocketAddr = uri
                .authority()
                .and_then(|a| a.as_str().parse().ok())
                .ok_or(UpstreamError::Connect {
                    addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                    source: std::io::ErrorKind::InvalidInput.into(),
                })?;
            connect(addr, &dial).await.map(TokioIo::new)
        })
    }
}

/// The enforcer's connections to pods.
pub struct Upstream {
    http1: Client<MarkedConnector, Watched>,
    http2: Mutex<HashMap<SocketAddr, SendRequest<Watched>>>,
    dial: Dial,
}

impl Upstream {
    /// Connections made as `dial` says; idle HTTP/1.1 connections closed after `idle_timeout`.
    #[must_use]
    pub fn new(dial: Dial, idle_timeout: Duration) -> Self {
        let connector = MarkedConnector { dial: dial.clone() };
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
            dial,
        }
    }

    /// How it dials pods (for connections outside the HTTP pool: TCP splicing).
    #[must_use]
    pub fn dial(&self) -> &Dial {
        &self.dial
    }

    /// Sends an HTTP/1.1 request to `dst`; `req`'s URI is absolute with `dst` as its
    /// authority (`http://<pod address><path>`: the pool is keyed by it, never by the Host
    /// header), its Host header the client's. The request line carries the origin form.
    pub async fn send_http1(
        &self,
        dst: SocketAddr,
        mut req: Request<Watched>,
    ) -> Result<Response<Incoming>, UpstreamError> {
        debug_assert_eq!(
            req.uri()
                .authority()
                .map(hyper::http::uri::Authority::as_str),
            Some(dst.to_string()).as_deref()
        );
        // HTTP/1.0 stays 1.0 (it may have no Host); everything else goes as HTTP/1.1.
        if req.version() != hyper::Version::HTTP_10 {
            *req.version_mut() = hyper::Version::HTTP_11;
        }
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
        req: Request<Watched>,
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

    async fn h2_sender(&self, dst: SocketAddr) -> Result<SendRequest<Watched>, UpstreamError> {
        if let Some(sender) = self.lock().get(&dst).filter(|s| !s.is_closed()).cloned() {
            return Ok(sender);
        }
        let stream = connect(dst, &self.dial).await?;
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, SendRequest<Watched>>> {
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
