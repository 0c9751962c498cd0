//! The kubelet's probes: the one exemption from authentication and authorization.
//!
//! Since `guard` sends the node's own connections into protected pods through the enforcer,
//! the kubelet's liveness/readiness/startup probes arrive here like any other request, with no
//! token and no identity; a policy that requires a principal would deny them and Kubernetes would
//! restart the pod forever. Istio's sidecar mode solves this by rewriting each probe so that only
//! that exact endpoint passes unjudged; this module does the same at the node. A connection or
//! request passes unjudged only when ALL hold:
//! - the destination port is the port of one of the workload's [`Probe`]s;
//! - HTTP: the method is `GET` and the normalized path equals that probe's path exactly (the
//!   query is not looked at); TCP: the probe has no path and the connection is plain TCP (not
//!   TLS, not HTTP);
//! - the peer is one of the node's own addresses ([`NodeAddresses`]). The kernel refuses a packet
//!   from any other interface that claims a local source address (a *martian*:
//!   `fib_validate_source`, unless `accept_local` is set on that interface), so only the node
//!   itself — which reaches the pod through `guard` and `lo` — has such a peer address.
//!
//! Everything else from the node is judged like any other source: it has no identity, so an
//! ALLOW policy that requires a principal denies it.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::state::workloads::Probe;

/// How long a read of the node's addresses is used before it is read again.
const REFRESH: Duration = Duration::from_secs(1);

/// What arrived on a connection, as far as probes care.
#[derive(Debug, Clone, Copy)]
pub enum Attempt<'a> {
    /// An HTTP request: its method and normalized path (without query).
    Http {
        method: &'a http::Method,
        path: &'a str,
    },
    /// A plain TCP connection (not HTTP, not TLS).
    Tcp,
}

/// Whether `attempt` from `peer` to `port` is one of `probes` and `peer` is the node itself:
/// the request (connection) passes without authentication and authorization.
pub fn exempt(
    probes: &[Probe],
    node: &NodeAddresses,
    peer: IpAddr,
    port: u16,
    attempt: Attempt<'_>,
) -> bool {
    let listed = probes.iter().any(|probe| {
        probe.port == port
            && match (probe.path.as_deref(), attempt) {
                (Some(path), Attempt::Http { method, path: got }) => {
                    method == http::Method::GET && path == got
                }
                (None, Attempt::Tcp) => true,
                _ => false,
            }
    });
    // The address check only for a listed endpoint: no cost for other requests.
    listed && node.contains(peer)
}

/// The addresses of the node's network namespace (the agent's), read with `getifaddrs(3)` (a
/// netlink dump) at most once per second, on demand: only requests that match a probe ask.
/// An address added since the last read is not trusted until the next one (fails closed); one
/// removed stays trusted for at most a second.
#[derive(Debug, Default)]
pub struct NodeAddresses {
    /// The last read and when it was made; `None` before the first.
    cache: Mutex<Option<(Instant, HashSet<IpAddr>)>>,
    /// Tests: a fixed set, never read from the system.
    fixed: Option<HashSet<IpAddr>>,
}

impl NodeAddresses {
    /// A fixed set of addresses (tests of the exemption without touching the system).
    #[cfg(test)]
    fn fixed(addrs: impl IntoIterator<Item = IpAddr>) -> Self {
        Self {
            cache: Mutex::new(None),
            fixed: Some(addrs.into_iter().collect()),
        }
    }

    /// Whether `ip` is an address of one of the node's interfaces. A failed read trusts nothing.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = crate::state::normalize_ip(ip);
        if let Some(fixed) = &self.fixed {
            return fixed.contains(&ip);
        }
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let fresh = cache
            .as_ref()
            .is_some_and(|(read, _)| read.elapsed() < REFRESH);
        if !fresh {
            match local_addresses() {
                Ok(addrs) => *cache = Some((Instant::now(), addrs)),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the node's addresses (getifaddrs); probe exemptions refused");
                    *cache = None;
                }
            }
        }
        cache.as_ref().is_some_and(|(_, addrs)| addrs.contains(&ip))
    }
}

/// Every IPv4 and IPv6 address of every interface of the calling thread's network namespace.
fn local_addresses() -> std::io::Result<HashSet<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)?;
    Ok(addrs
        .filter_map(|ifa| ifa.address)
        .filter_map(|addr| {
            addr.as_sockaddr_in()
                .map(|sin| IpAddr::V4(sin.ip()))
                .or_else(|| addr.as_sockaddr_in6().map(|sin6| IpAddr::V6(sin6.ip())))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use http::Method;
    use test_case::test_case;

    use super::*;

    const NODE: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 255, 1));
    const POD: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 20));

    fn probes() -> Vec<Probe> {
        vec![
            Probe::http(8080, "/healthz").expect("valid"),
            Probe::tcp(9000).expect("valid"),
        ]
    }

    fn http(method: &'static Method, path: &'static str) -> Attempt<'static> {
        Attempt::Http { method, path }
    }

    #[test_case(NODE, 8080, http(&Method::GET, "/healthz"), true ; "the node GETs the probe path: exempt")]
    #[test_case(POD, 8080, http(&Method::GET, "/healthz"), false ; "a pod GETs the probe path: judged (node only)")]
    #[test_case(NODE, 8080, http(&Method::POST, "/healthz"), false ; "another method: judged")]
    #[test_case(NODE, 8080, http(&Method::HEAD, "/healthz"), false ; "HEAD is not the kubelet's GET")]
    #[test_case(NODE, 8080, http(&Method::GET, "/healthz/x"), false ; "a longer path: judged (exact match)")]
    #[test_case(NODE, 8080, http(&Method::GET, "/health"), false ; "a prefix of it: judged")]
    #[test_case(NODE, 8080, http(&Method::GET, "/"), false ; "another path from the node: judged")]
    #[test_case(NODE, 8081, http(&Method::GET, "/healthz"), false ; "the probe path on another port: judged")]
    #[test_case(NODE, 9000, Attempt::Tcp, true ; "plain TCP to the TCP probe port from the node: exempt")]
    #[test_case(POD, 9000, Attempt::Tcp, false ; "plain TCP from a pod: judged")]
    #[test_case(NODE, 8080, Attempt::Tcp, false ; "plain TCP to an HTTP probe's port: judged")]
    #[test_case(NODE, 9000, http(&Method::GET, "/healthz"), false ; "HTTP to a TCP probe's port: judged")]
    #[test_case(IpAddr::V6(Ipv4Addr::new(10, 200, 255, 1).to_ipv6_mapped()), 9000, Attempt::Tcp, true ; "an IPv4-mapped node address is the node")]
    fn exemption(peer: IpAddr, port: u16, attempt: Attempt<'_>, want: bool) {
        let node = NodeAddresses::fixed([NODE]);
        assert_eq!(exempt(&probes(), &node, peer, port, attempt), want);
    }

    #[test]
    fn no_probes_no_exemption() {
        let node = NodeAddresses::fixed([NODE]);
        assert!(!exempt(
            &[],
            &node,
            NODE,
            8080,
            http(&Method::GET, "/healthz")
        ));
    }

    #[test]
    fn the_system_read_knows_loopback() {
        // Every network namespace has `lo` with 127.0.0.1 once it is up; the test host's is.
        let node = NodeAddresses::default();
        assert!(node.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        assert!(
            !node.contains(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77))),
            "TEST-NET-1 is nobody's"
        );
    }
}
