//! IPv4 and TCP header layout, TCP socket states: offsets, constants and the arithmetic on header
//! fields.
//!
//! Offsets are in bytes from the start of their own header; the programs read the IPv4 header
//! relative to the network header the kernel found (`BPF_HDR_START_NET`), so the same code works on
//! Ethernet devices (veths, NICs) and on layer-3 devices without a link-layer header (`wireguard`,
//! `ipip`, `tun`). Multi-byte fields are read from the packet as raw network-order integers; the
//! helpers here take them already converted to host order where they do arithmetic
//! (`u16::from_be`), and say so.

/// `EtherType` of IPv4 (host order), as found in `skb->protocol` (network order there).
pub const ETH_P_IP: u16 = 0x0800;
/// `EtherType` of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// Offset of the Next Header field in the IPv6 header.
pub const IPV6_NEXT_HEADER_OFFSET: usize = 6;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;

/// Offset of the version/IHL byte in the IPv4 header.
pub const IPV4_VERSION_IHL_OFFSET: usize = 0;
/// Offset of the flags/fragment-offset field in the IPv4 header.
pub const IPV4_FLAGS_FRAG_OFFSET: usize = 6;
/// The fragment-offset bits of that field (host order); the top three bits are flags.
pub const IPV4_FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
/// Offset of the protocol field in the IPv4 header.
pub const IPV4_PROTOCOL_OFFSET: usize = 9;
/// Offset of the source address in the IPv4 header.
pub const IPV4_SADDR_OFFSET: usize = 12;
/// Offset of the destination address in the IPv4 header.
pub const IPV4_DADDR_OFFSET: usize = 16;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;

/// Offset of the source port in the TCP header (the destination port follows at 2).
pub const TCP_PORTS_OFFSET: usize = 0;
/// Offset of the flags byte (CWR ECE URG ACK PSH RST SYN FIN) in the TCP header.
pub const TCP_FLAGS_OFFSET: usize = 13;
/// The SYN bit of the flags byte.
pub const TCP_FLAG_SYN: u8 = 0x02;
/// The ACK bit of the flags byte.
pub const TCP_FLAG_ACK: u8 = 0x10;

/// `sk_state` of a listening socket (`TCP_LISTEN` in the kernel's `include/net/tcp_states.h`).
pub const TCP_LISTEN: u32 = 10;
/// The loopback device's interface index: 1 in every network namespace (`LOOPBACK_IFINDEX` in
/// the kernel), so the programs need not be told.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// `skb->pkt_type` of a frame addressed to this host (`PACKET_HOST`).
pub const PACKET_HOST: u32 = 0;

/// `sk_state` of a socket in TIME-WAIT (`TCP_TIME_WAIT`).
pub const TCP_TIME_WAIT: u32 = 6;

/// Whether a TCP segment opens a new flow: SYN set, ACK clear. A SYN+ACK answers a connection the
/// receiver opened; every other segment belongs to a flow that already exists (or to none).
#[must_use]
pub const fn is_new_flow(flags: u8) -> bool {
    flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN
}

/// Whether a socket found by a 4-tuple lookup is a flow's own socket that packets can be assigned
/// to: any state but listening (a listener matched by address and port, not the flow) and
/// TIME-WAIT (a closed flow; its 4-tuple may open a new one, which the listener must get).
#[must_use]
pub const fn is_flow_socket(state: u32) -> bool {
    state != TCP_LISTEN && state != TCP_TIME_WAIT
}

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
    fn new_flows_are_syn_without_ack() {
        assert!(is_new_flow(TCP_FLAG_SYN), "SYN");
        assert!(is_new_flow(TCP_FLAG_SYN | 0x40), "SYN with ECE (ECN setup)");
        assert!(
            !is_new_flow(TCP_FLAG_SYN | TCP_FLAG_ACK),
            "SYN+ACK answers our own SYN"
        );
        assert!(!is_new_flow(TCP_FLAG_ACK), "ACK");
        assert!(!is_new_flow(0x04), "RST");
        assert!(!is_new_flow(0x11), "FIN+ACK");
    }

    #[test]
    fn flow_sockets() {
        assert!(is_flow_socket(1), "ESTABLISHED");
        assert!(
            is_flow_socket(12),
            "NEW_SYN_RECV: the handshake's request socket"
        );
        assert!(is_flow_socket(8), "CLOSE_WAIT");
        assert!(!is_flow_socket(TCP_LISTEN));
        assert!(!is_flow_socket(TCP_TIME_WAIT));
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
