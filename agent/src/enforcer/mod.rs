//! The enforcer: the userspace half of the data path. Connections the kernel programs steer
//! to the agent arrive on a transparent listener; the accepted socket's local address is the
//! original destination (pod IP and port), which selects the workload. Each HTTP request is
//! authenticated ([`crate::authn`]), authorized ([`crate::authz`]) and answered 401/403 here or
//! forwarded to the pod; other protocols get Istio's TCP semantics and are spliced or closed.
//!
//! One task per connection; no lock is held across an await; the state is a lock-free
//! snapshot loaded per request.

mod http;
mod inspect;
pub mod sniff;
mod tcp;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::authn::cache::TokenCache;
use crate::authn::rules::Keys;
use crate::authz::path::Normalization;
use crate::metrics::{Metrics, ProtocolLabels, ReasonLabels};
use crate::state::StateStore;
use sniff::Protocol;
use upstream::Upstream;

/// Limits against hostile or broken clients; each refusal is counted in
/// `nodeward_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers), bytes. Envoy's default: 60 KiB.
    pub max_header_bytes: usize,
    /// Most header fields in a request. Envoy's default: 100.
    pub max_headers: usize,
    /// Time allowed to send a request head, also while a keep-alive connection waits for the
    /// next request (slowloris).
    pub header_read_timeout: Duration,
    /// Time a client on a port of undeclared protocol has to send its first byte before the
    /// enforcer also listens for the pod speaking first (zero: wait as long as it takes).
    /// Waiting never turns HTTP into TCP: see `enforcer::tcp::first_speaker`.
    pub detect_timeout: Duration,
    /// HTTP/2 connections: ping interval for idle detection.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header_bytes: 60 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_mins(1),
        }
    }
}

/// How the enforcer runs.
#[derive(Debug, Clone)]
pub struct EnforcerConfig {
    pub limits: Limits,
    pub path_normalization: Normalization,
    pub connect_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub drain_timeout: Duration,
    /// `SO_MARK` on every connection to a pod, so the kernel's guard lets it in (0: none).
    pub upstream_mark: u32,
    /// Pods steered in their own namespace: the enforcer dials them from there.
    pub pod_namespaces: Option<Arc<crate::inpod::PodNamespaces>>,
}

impl Default for EnforcerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            path_normalization: Normalization::Base,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
            upstream_mark: 0,
            pod_namespaces: None,
        }
    }
}

/// Everything a connection needs; shared by all connection tasks.
pub struct Enforcer {
    pub(crate) store: Arc<StateStore>,
    pub(crate) keys: Arc<dyn Keys + Send + Sync>,
    pub(crate) cache: TokenCache,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: EnforcerConfig,
    pub(crate) upstream: Upstream,
    /// The node's own addresses, for the probe exemption ([`probe`]).
    pub(crate) node: crate::decision::probe::NodeAddresses,
    /// Calls the external authorizers of CUSTOM policies.
    pub(crate) extauthz: crate::extauthz::Client,
}

/// Logs a failed external authorizer check (the access log line carries every result).
fn log_check(result: &crate::extauthz::CheckResult, info: ConnectionInfo) {
    if let Some(e) = result.outcome.error() {
        tracing::warn!(
            provider = %result.provider,
            source = %info.peer,
            destination = %info.original_dst,
            fail_open = result.fail_open,
            error = %e,
            "external authorizer check failed"
        );
    }
}

/// One accepted connection as the enforcer sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionInfo {
    /// The client.
    pub peer: SocketAddr,
    /// Where the client was going: the pod's address and port.
    pub original_dst: SocketAddr,
    /// The registered address of the pod the connection was steered into, when the listener
    /// serves one pod (in-pod steering): a dual-stack pod is registered by one address and
    /// reached by either.
    pub pod: Option<std::net::IpAddr>,
}

impl ConnectionInfo {
    /// The address the destination workload is looked up by.
    #[must_use]
    pub fn workload_ip(&self) -> std::net::IpAddr {
        self.pod.unwrap_or_else(|| self.original_dst.ip())
    }
}

/// The workload label of a connection to an address no workload has: `-`, shared so a
/// request's metric labels never allocate.
fn no_workload() -> Arc<str> {
    static NONE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("-"));
    NONE.clone()
}

impl Enforcer {
    #[must_use]
    pub fn new(
        store: Arc<StateStore>,
        keys: Arc<dyn Keys + Send + Sync>,
        cache: TokenCache,
        metrics: Arc<Metrics>,
        config: EnforcerConfig,
    ) -> Arc<Self> {
        let upstream = Upstream::new(
            upstream::Dial {
                mark: config.upstream_mark,
                timeout: config.connect_timeout,
                namespaces: config.pod_namespaces.clone(),
            },
            config.limits.idle_timeout,
        );
        Arc::new(Self {
            store,
            keys,
            cache,
            metrics,
            config,
            upstream,
            node: crate::decision::probe::NodeAddresses::default(),
            extauthz: crate::extauthz::Client::new(),
        })
    }

    /// Serves one connection whose original destination is known. The listener path calls
    /// this with the accepted socket's local address.
    pub async fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        info: ConnectionInfo,
        shutdown: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        self.metrics.connections_open.inc();
        let _open = OpenGuard(self.metrics.clone());
        let declared = self
            .store
            .load()
            .destination(info.workload_ip())
            .and_then(|view| view.workload.port_protocol(info.original_dst.port()));
        let expect = sniff::Expect::of(declared);
        let limits = self.config.limits;
        let mut detected = sniff::detect(
            &stream,
            expect,
            limits.detect_timeout,
            limits.header_read_timeout,
        )
        .await;
        if matches!(detected, Ok(sniff::Detected::Silent)) {
            // Nothing from the client yet: whoever speaks first decides (enforcer::tcp).
            let span = tracing::debug_span!("conn", peer = %info.peer, dst = %info.original_dst, protocol = "silent");
            match tcp::first_speaker(&self, &stream, info, &shutdown)
                .instrument(span.clone())
                .await
            {
                tcp::FirstSpeaker::Server(upstream) => {
                    self.count_connection(Protocol::Tcp.label());
                    tcp::serve_server_first(self, stream, upstream, info, shutdown)
                        .instrument(span)
                        .await;
                    return;
                }
                tcp::FirstSpeaker::Client => {
                    detected = sniff::detect(
                        &stream,
                        expect,
                        limits.header_read_timeout,
                        limits.header_read_timeout,
                    )
                    .await;
                }
                tcp::FirstSpeaker::Gone => return,
            }
        }
        let protocol = match detected {
            Ok(sniff::Detected::Protocol(p)) => p,
            // Only possible when the client went quiet again after speaking first: it did send
            // bytes, so they are judged as HTTP would judge them (hyper's timeouts apply).
            Ok(sniff::Detected::Silent) => Protocol::Http1,
            Err(e) => {
                tracing::debug!(peer = %info.peer, error = %e, "connection closed before its protocol was known");
                return;
            }
        };
        self.count_connection(protocol.label());
        let span = tracing::debug_span!("conn", peer = %info.peer, dst = %info.original_dst, protocol = protocol.label());
        match protocol {
            Protocol::Http1 | Protocol::H2c => {
                http::serve(self, stream, info, protocol, shutdown)
                    .instrument(span)
                    .await;
            }
            Protocol::Tls { sni } => {
                tcp::serve(self, stream, info, sni, shutdown)
                    .instrument(span)
                    .await;
            }
            Protocol::Tcp => {
                tcp::serve(self, stream, info, None, shutdown)
                    .instrument(span)
                    .await;
            }
        }
    }

    fn count_connection(&self, protocol: &'static str) {
        self.metrics
            .connections
            .get_or_create(&ProtocolLabels { protocol })
            .inc();
    }

    /// Accepts connections until `shutdown`, each served on its own task tracked by
    /// `tracker` (so shutdown can wait for them).
    pub async fn run_listener(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        self.accept(listener, None, shutdown.clone(), shutdown, tracker)
            .await;
    }

    /// Accepts steered connections from `listener` until `stop_accepting`; each is served
    /// until done or `shutdown`. `pod`: the registered address of the one pod the listener
    /// serves (in-pod steering), `None` for the node's listener.
    pub async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        pod: Option<std::net::IpAddr>,
        stop_accepting: CancellationToken,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        // A connection addressed to the enforcer's own port (a pod dialing its listener
        // directly, or a client steered to that port) would be forwarded to that same port:
        // to the listener again, a loop. It is refused.
        let own_port = listener.local_addr().map(|a| a.port()).ok();
        loop {
            let accepted = tokio::select! {
                () = stop_accepting.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    self.metrics
                        .refused
                        .get_or_create(&ReasonLabels {
                            reason: "accept_error",
                        })
                        .inc();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Steered (bpf_sk_assign): the local address is where the client was going.
            let original_dst = match stream.local_addr() {
                Ok(addr) => addr,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no local address");
                    continue;
                }
            };
            // Only for a pod's listener: the node's listener also takes direct connections
            // (`--datapath off`), whose destination is its own port by design.
            if pod.is_some() && Some(original_dst.port()) == own_port {
                tracing::debug!(%peer, dst = %original_dst, "connection to the enforcer's own port refused");
                self.metrics
                    .refused
                    .get_or_create(&ReasonLabels {
                        reason: "enforcer_port",
                    })
                    .inc();
                continue;
            }
            let info = ConnectionInfo {
                peer: unmapped(peer),
                original_dst: unmapped(original_dst),
                pod,
            };
            if let (Some(pod), Some(namespaces)) = (pod, &self.config.pod_namespaces) {
                namespaces.learn(info.original_dst.ip(), pod);
            }
            tracker.spawn(
                self.clone()
                    .serve_connection(stream, info, shutdown.clone()),
            );
        }
    }
}

/// An IPv4-mapped IPv6 socket address as the IPv4 one it stands for.
fn unmapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

struct OpenGuard(Arc<Metrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

/// A listener for steered connections: `IP_TRANSPARENT` so it accepts connections addressed to
/// pods (assigned to it by `bpf_sk_assign`), whose local address is then the pod's.
pub fn transparent_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true)?;
    } else {
        socket.set_ip_transparent_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}
