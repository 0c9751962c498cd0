//! Ethernet, IPv4 and TCP header layout: offsets, constants and the arithmetic on header fields.
//!
//! Offsets are in bytes from the start of their own header. Multi-byte fields are read from the
//! packet as raw network-order integers; the helpers here take them already converted to host
//! order where they do arithmetic (`u16::from_be`), and say so.

/// Length of an Ethernet II header without VLAN tags.
pub const ETH_HLEN: usize = 14;
/// Offset of the `EtherType` field in the Ethernet header.
pub const ETH_TYPE_OFFSET: usize = 12;
/// `EtherType` of IPv4 (host order). 802.1Q-tagged frames carry another `EtherType` here and are
/// not judged (pods' veths carry untagged frames).
pub const ETH_P_IP: u16 = 0x0800;

/// Offset of the version/IHL byte in the IPv4 header.
pub const IPV4_VERSION_IHL_OFFSET: usize = 0;
/// Offset of the flags/fragment-offset field in the IPv4 header.
pub const IPV4_FLAGS_FRAG_OFFSET: usize = 6;
/// The fragment-offset bits of that field (host order); the top three bits are flags.
pub const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// Offset of the protocol field in the IPv4 header.
pub const IPV4_PROTOCOL_OFFSET: usize = 9;
/// Offset of the destination address in the IPv4 header.
pub const IPV4_DADDR_OFFSET: usize = 16;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;

/// Offset of the destination port in the TCP header.
pub const TCP_DEST_OFFSET: usize = 2;

/// The IPv4 header length in bytes from the version/IHL byte, or `None` when the byte does not
/// describe a valid IPv4 header (version other than 4, or IHL below 5 words).
#[must_use]
pub const fn ipv4_header_len(version_ihl: u8) -> Option<usize> {
    let version = version_ihl >> 4;
    let ihl = (version_ihl & 0x0f) as usize;
    if version != 4 || ihl < 5 {
        return None;
    }
    Some(ihl * 4)
}

/// Whether an IPv4 packet carries the start of its payload (and so the TCP header), given the
/// flags/fragment-offset field in host order. Later fragments have a non-zero fragment offset.
#[must_use]
pub const fn is_first_fragment(flags_frag_offset: u16) -> bool {
    flags_frag_offset & IPV4_FRAGMENT_OFFSET_MASK == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_len_from_version_ihl() {
        assert_eq!(ipv4_header_len(0x45), Some(20), "no options");
        assert_eq!(ipv4_header_len(0x4f), Some(60), "maximum options");
        assert_eq!(ipv4_header_len(0x44), None, "IHL below 5 is malformed");
        assert_eq!(ipv4_header_len(0x65), None, "version 6 is not IPv4");
    }

    #[test]
    fn fragments() {
        assert!(is_first_fragment(0x0000), "unfragmented");
        assert!(is_first_fragment(0x4000), "DF set");
        assert!(is_first_fragment(0x2000), "first fragment, MF set");
        assert!(!is_first_fragment(0x2001), "later fragment, MF set");
        assert!(!is_first_fragment(0x0010), "last fragment");
    }
}
