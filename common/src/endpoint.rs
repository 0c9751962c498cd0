//! The key (and value) of the `PROTECTED_ENDPOINTS` map: an IPv4 destination and TCP port
//! ([`PORT_ANY`]: every port).
//!
//! Both fields are kept in network byte order, exactly as they appear in the packet headers, so the
//! kernel program can build a key from header bytes without byte swapping. Use
//! [`EndpointKey::from_ipv4`] and the accessors on the host side to stay out of byte-order trouble.

use core::{mem, net::Ipv4Addr};

/// A protected destination: IPv4 address and TCP port, both in network byte order.
///
/// Layout (8 bytes, align 4): `addr` at offset 0, `port` at 4, `_pad` at 6. The padding is a real,
/// always-zero field so that every byte of the key is defined: the kernel hashes all 8 bytes, and a
/// key with garbage in its padding would never match.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv4 destination address in network byte order (the 4 bytes of the IP header's `daddr`).
    pub addr: u32,
    /// TCP destination port in network byte order (the 2 bytes of the TCP header's `dest`).
    pub port: u16,
    /// Explicit padding; always zero. Private so a key can only be built with zeroed padding.
    _pad: u16,
}

const _: () = assert!(mem::size_of::<EndpointKey>() == 8);
const _: () = assert!(mem::align_of::<EndpointKey>() == 4);

/// Value stored for a protected endpoint today: no flags.
///
/// The map value is a `u32` of flags, reserved; the programs test only whether the key is present.
/// Writers store this value until flags exist.
pub const ENDPOINT_FLAGS_NONE: u32 = 0;

/// The port of a key that protects every TCP port of its address. The programs look up
/// (address, port) first, then (address, `PORT_ANY`). A workload without declared ports (every
/// standalone workload) is protected as (IP, `PORT_ANY`). Port 0 is not a valid TCP destination,
/// so the value cannot collide with a real port.
pub const PORT_ANY: u16 = 0;

impl EndpointKey {
    /// Builds a key from an address and port that are already in network byte order, as read
    /// from packet headers (`u32`/`u16` loaded straight from the packet bytes).
    #[must_use]
    pub const fn from_network_order(addr: u32, port: u16) -> Self {
        Self {
            addr,
            port,
            _pad: 0,
        }
    }

    /// Builds a key from a host-side address and a port in host byte order.
    #[must_use]
    pub const fn from_ipv4(ip: Ipv4Addr, port: u16) -> Self {
        // The octets in memory order *are* network byte order.
        Self::from_network_order(u32::from_ne_bytes(ip.octets()), port.to_be())
    }

    /// The destination address.
    #[must_use]
    pub const fn ip(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.addr.to_ne_bytes();
        Ipv4Addr::new(a, b, c, d)
    }

    /// The destination port in host byte order.
    #[must_use]
    pub const fn port(&self) -> u16 {
        u16::from_be(self.port)
    }
}

// SAFETY: `EndpointKey` is `#[repr(C)]`, `Copy`, has no implicit padding (asserted above: 4 + 2 +
// 2 bytes, align 4) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for EndpointKey {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values_round_trip_through_network_order() {
        let key = EndpointKey::from_ipv4(Ipv4Addr::new(10, 1, 2, 3), 8080);
        assert_eq!(key.ip(), Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(key.port(), 8080);
    }

    #[test]
    fn fields_hold_the_packet_bytes() {
        let key = EndpointKey::from_ipv4(Ipv4Addr::new(10, 1, 2, 3), 0x1f90);
        // What the kernel loads from the headers: the raw bytes, reinterpreted natively.
        assert_eq!(key.addr.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(key.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(key, EndpointKey::from_network_order(key.addr, key.port));
    }
}
