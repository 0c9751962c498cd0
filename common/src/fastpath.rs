//! The key of the `FAST_PATH_SOCKETS` sock hash (the same-node fast path, `sock_ops` + `sk_msg`)
//! and the side a socket is on.
//!
//! A socket's key is its own 4-tuple as the socket sees it (local, then remote) and the side of
//! the node it lives on: the node's network namespace (the enforcer's sockets) or any other
//! (pods). `sk_msg` redirects a message to the key with local and remote swapped and the *other*
//! side: a pod's socket only ever reaches a socket of the node's namespace and the other way
//! round, never a pod's socket another pod's.

use core::{mem, net::Ipv4Addr};

/// [`SocketKey::side`]: the socket lives outside the node's network namespace (a pod).
pub const SIDE_POD: u32 = 0;
/// [`SocketKey::side`]: the socket lives in the node's network namespace (the enforcer's).
pub const SIDE_NODE: u32 = 1;

/// A socket of the fast path: its 4-tuple and side. Addresses and ports in network byte order.
///
/// Layout (16 bytes, align 4): `local_addr` at 0, `remote_addr` at 4, `local_port` at 8,
/// `remote_port` at 10, `side` at 12. No implicit padding: the kernel hashes all 16 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketKey {
    /// The socket's local IPv4 address, network byte order.
    pub local_addr: u32,
    /// The peer's IPv4 address, network byte order.
    pub remote_addr: u32,
    /// The socket's local TCP port, network byte order.
    pub local_port: u16,
    /// The peer's TCP port, network byte order.
    pub remote_port: u16,
    /// [`SIDE_POD`] or [`SIDE_NODE`].
    pub side: u32,
}

const _: () = assert!(mem::size_of::<SocketKey>() == 16);
const _: () = assert!(mem::align_of::<SocketKey>() == 4);

impl SocketKey {
    /// The key of the other end of the same connection: addresses and ports swapped, other side.
    #[must_use]
    pub const fn peer(&self) -> Self {
        Self {
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            side: if self.side == SIDE_NODE {
                SIDE_POD
            } else {
                SIDE_NODE
            },
        }
    }

    /// The local address.
    #[must_use]
    pub const fn local_ip(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.local_addr.to_ne_bytes();
        Ipv4Addr::new(a, b, c, d)
    }

    /// The remote address.
    #[must_use]
    pub const fn remote_ip(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.remote_addr.to_ne_bytes();
        Ipv4Addr::new(a, b, c, d)
    }
}

/// The port in network byte order from `bpf_sock_ops.remote_port` / `sk_msg_md.remote_port`:
/// documented as network byte order in a `u32`, which on little-endian machines the kernel loads
/// into the upper 16 bits (older kernels) or the lower 16 bits (newer ones, 16-bit loads). A TCP
/// port of an established socket is never 0, so whichever half is non-zero holds it.
#[must_use]
pub const fn remote_port_network_order(raw: u32) -> u16 {
    if raw >> 16 == 0 {
        raw as u16
    } else {
        (raw >> 16) as u16
    }
}

/// The port in network byte order from `bpf_sock_ops.local_port` / `sk_msg_md.local_port`
/// (host byte order in a `u32`).
#[must_use]
pub const fn local_port_network_order(raw: u32) -> u16 {
    (raw as u16).to_be()
}

// SAFETY: `SocketKey` is `#[repr(C)]`, `Copy`, has no implicit padding (asserted above: 4 + 4 + 2
// + 2 + 4 bytes, align 4) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for SocketKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_swaps_ends_and_side() {
        let key = SocketKey {
            local_addr: 1,
            remote_addr: 2,
            local_port: 3,
            remote_port: 4,
            side: SIDE_POD,
        };
        let peer = key.peer();
        assert_eq!(
            (
                peer.local_addr,
                peer.remote_addr,
                peer.local_port,
                peer.remote_port
            ),
            (2, 1, 4, 3)
        );
        assert_eq!(peer.side, SIDE_NODE);
        assert_eq!(peer.peer(), key);
    }

    #[test]
    fn ports_from_the_context_fields() {
        // 8080 = 0x1f90; network order in memory is [0x1f, 0x90], a little-endian u16 0x901f.
        let be = 8080_u16.to_be();
        assert_eq!(
            remote_port_network_order(u32::from(be) << 16),
            be,
            "upper half"
        );
        assert_eq!(remote_port_network_order(u32::from(be)), be, "lower half");
        assert_eq!(local_port_network_order(8080), be);
    }
}
