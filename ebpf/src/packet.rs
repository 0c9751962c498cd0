//! Reading a packet's IPv4 and TCP headers and deciding whether its destination is protected.
//! Shared by `steer` and `guard`.
//!
//! Headers are read with `bpf_skb_load_bytes_relative(.., BPF_HDR_START_NET)`: relative to the
//! network header the kernel found, so Ethernet devices and layer-3 devices (`wireguard`, `ipip`, `tun`)
//! read alike, and every read is checked against the packet's length, including its non-linear
//! part, so a short packet yields an error instead of an out-of-bounds read. The IP version comes
//! from `skb->protocol`, which the kernel set from the link layer (with VLAN tags already
//! stripped by hardware offload or the VLAN device).

use core::{ffi::c_void, mem::MaybeUninit};

use aya_ebpf::{
    bindings::bpf_hdr_start_off::BPF_HDR_START_NET,
    helpers::generated::bpf_skb_load_bytes_relative, programs::TcContext,
};
use nodeward_ebpf::net::{
    ipv4_header_len, is_first_fragment, is_new_flow, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP,
    IPV4_DADDR_OFFSET, IPV4_FLAGS_FRAG_OFFSET, IPV4_PROTOCOL_OFFSET, IPV4_SADDR_OFFSET,
    IPV4_VERSION_IHL_OFFSET, IPV6_HEADER_LEN, IPV6_NEXT_HEADER_OFFSET, TCP_FLAGS_OFFSET,
    TCP_PORTS_OFFSET,
};

use crate::maps::{is_protected, is_protected_on_every_port};

/// A header the program needed could not be read, and the destination is not known to be
/// protected: the packet is shorter than its headers claim, or its IPv4 header length is invalid.
pub struct Malformed;

/// A TCP segment to a protected endpoint: its 4-tuple (network byte order, as in the headers) and
/// flags.
pub struct Flow {
    /// Source IPv4 address.
    pub saddr: u32,
    /// Destination IPv4 address.
    pub daddr: u32,
    /// Source TCP port.
    pub sport: u16,
    /// Destination TCP port.
    pub dport: u16,
    /// The TCP flags byte.
    pub flags: u8,
}

/// What a packet is, as far as the programs care.
pub enum Target {
    /// Not IPv4/TCP, or a later IPv4 fragment: not judged.
    NotIpv4Tcp,
    /// IPv4/TCP to an endpoint that is not protected.
    NotProtected,
    /// IPv4/TCP to a protected endpoint.
    Protected(Flow),
    /// To a protected endpoint (known from the address and, when readable, the port), but the
    /// TCP header is cut short: its flags, or its ports, are not in this packet.
    MalformedProtected,
}

/// Whether an IPv6 packet may open a TCP connection: a TCP segment that is a new flow (SYN
/// without ACK), or a packet whose first header after the fixed one is an extension header
/// (hop-by-hop, routing, fragment, destination options, AH, ESP, mobility, HIP, shim6) that
/// would have to be walked to find what it carries: IPv6 is not judged yet, so what might open
/// a connection into a protected pod is refused rather than delivered unjudged. `ICMPv6`
/// (neighbour discovery), UDP and replies pass.
#[inline]
pub fn ipv6_may_open_tcp(ctx: &TcContext) -> Result<bool, Malformed> {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    if u16::from_be(protocol as u16) != ETH_P_IPV6 {
        return Ok(false);
    }
    Ok(match load::<u8>(ctx, IPV6_NEXT_HEADER_OFFSET)? {
        IPPROTO_TCP => is_new_flow(load::<u8>(ctx, IPV6_HEADER_LEN + TCP_FLAGS_OFFSET)?),
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 => true,
        _ => false,
    })
}

/// Reads the headers and looks the destination up in `PROTECTED_ENDPOINTS`.
#[inline]
pub fn classify(ctx: &TcContext) -> Result<Target, Malformed> {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let protocol = unsafe { (*ctx.skb.skb).protocol };
    // `skb->protocol` holds the EtherType in network byte order in the low 16 bits.
    if u16::from_be(protocol as u16) != ETH_P_IP {
        return Ok(Target::NotIpv4Tcp);
    }

    let ip_len = ipv4_header_len(load::<u8>(ctx, IPV4_VERSION_IHL_OFFSET)?).ok_or(Malformed)?;
    if load::<u8>(ctx, IPV4_PROTOCOL_OFFSET)? != IPPROTO_TCP {
        return Ok(Target::NotIpv4Tcp);
    }
    if !is_first_fragment(u16::from_be(load::<u16>(ctx, IPV4_FLAGS_FRAG_OFFSET)?)) {
        // Later fragments carry no TCP header; the first fragment was judged, and without it the
        // receiver cannot reassemble the datagram.
        return Ok(Target::NotIpv4Tcp);
    }
    let saddr = load::<u32>(ctx, IPV4_SADDR_OFFSET)?;
    let daddr = load::<u32>(ctx, IPV4_DADDR_OFFSET)?;

    let tcp = ip_len;
    // Source and destination port, read together: 4 bytes, network order each.
    let Ok(ports) = load::<[u16; 2]>(ctx, tcp + TCP_PORTS_OFFSET) else {
        return if is_protected_on_every_port(daddr) {
            Ok(Target::MalformedProtected)
        } else {
            Err(Malformed)
        };
    };
    let [sport, dport] = ports;
    if !is_protected(daddr, dport) {
        return Ok(Target::NotProtected);
    }
    let Ok(flags) = load::<u8>(ctx, tcp + TCP_FLAGS_OFFSET) else {
        return Ok(Target::MalformedProtected);
    };
    Ok(Target::Protected(Flow {
        saddr,
        daddr,
        sport,
        dport,
        flags,
    }))
}

/// Reads a `T` (raw, network byte order) at `offset` from the start of the network header.
#[inline]
pub fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    let mut value = MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes at most `size_of::<T>()` bytes into `value`, which has room for
    // exactly that many, and reports through its return value whether it wrote them all.
    let ret = unsafe {
        bpf_skb_load_bytes_relative(
            ctx.skb.skb as *const c_void,
            offset as u32,
            value.as_mut_ptr().cast::<c_void>(),
            size_of::<T>() as u32,
            BPF_HDR_START_NET,
        )
    };
    if ret == 0 {
        // SAFETY: a zero return means all `size_of::<T>()` bytes were written; the `T`s read
        // here are integers, valid for every bit pattern.
        Ok(unsafe { value.assume_init() })
    } else {
        Err(Malformed)
    }
}
