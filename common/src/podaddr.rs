//! The key of the `POD_ADDRESSES` map (in-pod steering's anti-spoofing): a pod's network
//! namespace, by its cookie, and one address the pod owns.
//!
//! `inpod_egress` drops a packet leaving a pod whose source address is not one of the pod's own:
//! the enforcer takes a peer's identity from its source address, so a pod must not send from
//! another's.

use core::{
    mem,
    net::{IpAddr, Ipv6Addr},
};

/// A pod's address: the pod's namespace cookie and the address, IPv6 or IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`), in network byte order.
///
/// Layout (24 bytes, align 8): `netns_cookie` at 0, `addr` at 8.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodAddressKey {
    /// `SO_NETNS_COOKIE` of the pod's network namespace (`bpf_get_netns_cookie` in the programs).
    pub netns_cookie: u64,
    /// The 16 address bytes, as in an IPv6 header (IPv4 mapped).
    pub addr: [u8; 16],
}

const _: () = assert!(mem::size_of::<PodAddressKey>() == 24);
const _: () = assert!(mem::align_of::<PodAddressKey>() == 8);

impl PodAddressKey {
    /// The key of `addr` in the namespace `netns_cookie`.
    #[must_use]
    pub const fn new(netns_cookie: u64, addr: IpAddr) -> Self {
        let addr = match addr {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Self { netns_cookie, addr }
    }

    /// The key of an IPv4 source address as read from a header (network byte order).
    #[must_use]
    pub const fn from_ipv4_header(netns_cookie: u64, saddr: [u8; 4]) -> Self {
        let [a, b, c, d] = saddr;
        Self {
            netns_cookie,
            addr: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d],
        }
    }

    /// The address.
    #[must_use]
    pub fn ip(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.addr);
        v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
    }
}

/// Whether an IPv6 source address needs no ownership: unspecified (`::`, duplicate address
/// detection) or link-local (`fe80::/10`, neighbour discovery), which the pod's own interface
/// uses and no identity is taken from.
#[must_use]
pub const fn ipv6_source_exempt(addr: &[u8; 16]) -> bool {
    let unspecified = u128::from_be_bytes(*addr) == 0;
    let link_local = addr[0] == 0xfe && addr[1] & 0xc0 == 0x80;
    unspecified || link_local
}

// SAFETY: `PodAddressKey` is `#[repr(C)]`, `Copy`, has no implicit padding (8 + 16 bytes, align
// 8, asserted above) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PodAddressKey {}

#[cfg(test)]
mod tests {
    use core::net::Ipv4Addr;

    use super::*;

    #[test]
    fn ipv4_from_a_header_is_the_mapped_address() {
        let key = PodAddressKey::new(7, IpAddr::V4(Ipv4Addr::new(10, 200, 0, 12)));
        assert_eq!(key, PodAddressKey::from_ipv4_header(7, [10, 200, 0, 12]));
        assert_eq!(key.ip(), IpAddr::V4(Ipv4Addr::new(10, 200, 0, 12)));
        let v6: IpAddr = "fd00:200::c".parse().unwrap();
        assert_eq!(PodAddressKey::new(7, v6).ip(), v6);
    }

    #[test]
    fn only_link_local_and_unspecified_ipv6_are_exempt() {
        let exempt = |s: &str| ipv6_source_exempt(&s.parse::<Ipv6Addr>().unwrap().octets());
        assert!(exempt("::"));
        assert!(exempt("fe80::1"));
        assert!(exempt("febf::1"));
        assert!(!exempt("fec0::1"));
        assert!(!exempt("fd00:200::c"));
        assert!(!exempt("::1"));
        assert!(!exempt("::ffff:10.0.0.1"));
    }
}
