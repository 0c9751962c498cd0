//! `inpod`: TC ingress on the interfaces of a protected pod, **inside the pod's network
//! namespace** (in-pod steering, `--steering in-pod`). Every packet into the pod crosses it after
//! every NAT the node applied: to the pod's IP, to a Service's ClusterIP or NodePort (kube-proxy's
//! DNAT, iptables or nftables), to a hostPort (portmap), from the node itself, from another node,
//! over IPv4 or IPv6, whatever the CNI (routed veths, a bridge, `bpf_redirect_peer`).
//!
//! For a TCP segment (IPv4, or IPv6 without extension headers):
//! 1. a new flow (SYN without ACK) goes to the enforcer's listener in the pod's namespace: the
//!    socket listening on `listener_port` that carries `inpod_mark` as its `SO_MARK`
//!    (`bpf_sk_assign`; [`reason::INPOD_STEER_LISTENER`]). The accepted socket keeps the
//!    original destination as its local address. A listener without the mark is not the
//!    enforcer's (an application bound the port) and never gets a flow. Without the enforcer's
//!    listener, `failure_mode` decides ([`reason::INPOD_DROP_NO_LISTENER`],
//!    [`reason::INPOD_PASS_NO_LISTENER`]);
//! 2. any other segment goes where the pod's stack sends it, unless it belongs to an inbound
//!    connection the application holds that the enforcer never judged: a full socket for the
//!    4-tuple without `inpod_mark` (the enforcer's accepted sockets inherit it from the
//!    listener) whose local port has a listener (so it was accepted, not opened by the pod).
//!    Such a connection predates the pod's protection (opened before the agent started, while
//!    it was down failing open, or before a policy selected the pod) and is dropped
//!    ([`reason::INPOD_DROP_UNJUDGED`]); failing open, only once the enforcer's listener is
//!    back. Replies to the pod's own
//!    connections, request and TIME-WAIT sockets, and segments of no connection pass
//!    ([`reason::INPOD_PASS_FLOW`]).
//!
//! The enforcer's own connection to the application stays on the pod's loopback and never
//! crosses this hook, so no mark or address has to prove where a packet came from: there is
//! no node-side path into the pod that skips the hook. Not TCP passes
//! ([`reason::INPOD_PASS_NOT_TCP`]); TCP that cannot be judged is dropped
//! ([`reason::INPOD_DROP_MALFORMED`]).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2, TC_ACT_UNSPEC,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::classifier,
    programs::TcContext,
};
use nodeward_common::{
    counter,
    podaddr::{ipv6_source_exempt, PodAddressKey},
    reason::{self, Verdict},
    KernelConfig,
};
use nodeward_ebpf::net::{
    ipv4_header_len, is_first_fragment, is_new_flow, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP,
    IPV4_DADDR_OFFSET, IPV4_FLAGS_FRAG_OFFSET, IPV4_PROTOCOL_OFFSET, IPV4_SADDR_OFFSET,
    IPV4_VERSION_IHL_OFFSET, IPV6_HEADER_LEN, IPV6_NEXT_HEADER_OFFSET, TCP_FLAGS_OFFSET,
    TCP_LISTEN, TCP_PORTS_OFFSET,
};

use crate::{
    maps::{config, count, record_opened, POD_ADDRESSES},
    sock::Socket,
    verdict::{ACT_OK, ACT_SHOT},
};

/// Offset of the source address in an IPv6 header (the destination follows it).
const IPV6_SADDR_OFFSET: usize = 8;

/// A TCP segment's socket-lookup tuple (network byte order, as in the headers) and flags.
struct Segment {
    tuple: bpf_sock_tuple,
    ipv6: bool,
    flags: u8,
}

impl Segment {
    /// The socket the pod's stack would deliver this tuple to (see [`Socket::lookup_tuple`]).
    /// The size passed is a constant on each branch, as the verifier demands.
    #[inline]
    fn lookup(&mut self, ctx: &TcContext) -> Option<Socket> {
        if self.ipv6 {
            Socket::lookup_tuple(ctx, &mut self.tuple, V6_TUPLE)
        } else {
            Socket::lookup_tuple(ctx, &mut self.tuple, V4_TUPLE)
        }
    }
}

/// Size of the `ipv4` member of a socket tuple.
const V4_TUPLE: u32 = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32;
/// Size of the `ipv6` member of a socket tuple.
const V6_TUPLE: u32 = size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2>() as u32;

/// A header the program needed could not be read.
struct Unreadable;

/// Entry point; see the module documentation.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn inpod(ctx: TcContext) -> i32 {
    count(counter::INPOD_SEEN);
    let reason = match segment(&ctx) {
        Ok(Some(mut segment)) => decide(&ctx, &mut segment, &config()),
        Ok(None) => reason::INPOD_PASS_NOT_TCP,
        Err(Unreadable) => reason::INPOD_DROP_MALFORMED,
    };
    verdict(reason)
}

/// Counts `reason` and returns its TC action (no log line: `finish`'s lines are IPv4 flows).
#[inline]
fn verdict(reason: u32) -> i32 {
    if let Some(slot) = counter::for_reason(reason) {
        count(slot);
    }
    match reason::verdict(reason) {
        Some(Verdict::Steered) => {
            count(counter::STEERED);
            ACT_OK
        }
        Some(Verdict::Dropped) => ACT_SHOT,
        // `inpod` never redirects; every code in use has a verdict.
        Some(Verdict::NoOpinion | Verdict::RedirectedToNode) | None => TC_ACT_UNSPEC,
    }
}

#[inline]
fn decide(ctx: &TcContext, segment: &mut Segment, config: &KernelConfig) -> u32 {
    if is_new_flow(segment.flags) {
        // The 4-tuple as sent (the listener lookup below rewrites the port).
        let sent = if segment.ipv6 {
            None
        } else {
            // SAFETY: an IPv4 segment's tuple holds its `ipv4` member.
            Some(unsafe { segment.tuple.__bindgen_anon_1.ipv4 })
        };
        set_dport(segment, config.listener_port.to_be());
        let listener = segment.lookup(ctx).filter(|sk| {
            sk.state() == TCP_LISTEN
                && config.inpod_mark != 0
                && sk.mark() == Some(config.inpod_mark)
        });
        match listener {
            Some(listener) => {
                if listener.assign(ctx).is_ok() {
                    if let Some(v4) = sent {
                        // The client's end may join the fast path (while it is on).
                        record_opened(v4.saddr, v4.sport, v4.daddr, v4.dport);
                    }
                    return reason::INPOD_STEER_LISTENER;
                }
                count(counter::ASSIGN_FAILED);
            }
            None => count(counter::LISTENER_MISSING),
        }
        return if config.fails_open() {
            reason::INPOD_PASS_NO_LISTENER
        } else {
            reason::INPOD_DROP_NO_LISTENER
        };
    }
    let Some(sk) = segment.lookup(ctx) else {
        return reason::INPOD_PASS_FLOW;
    };
    let unjudged = match sk.mark() {
        // A request or TIME-WAIT socket: a handshake the listener it was assigned to is doing,
        // or a closed flow.
        None => false,
        Some(mark) => sk.state() != TCP_LISTEN && mark != config.inpod_mark,
    };
    drop(sk);
    if !unjudged || !accepted_here(ctx, segment) {
        return reason::INPOD_PASS_FLOW;
    }
    if config.fails_open() {
        // Failing open, connections opened while no agent ran keep working while none runs;
        // once the enforcer's listener is back they are cut off like any other.
        // (`accepted_here` left the tuple's source zeroed: only a listener can match.)
        set_dport(segment, config.listener_port.to_be());
        let enforcer_up = segment
            .lookup(ctx)
            .is_some_and(|sk| sk.state() == TCP_LISTEN && sk.mark() == Some(config.inpod_mark));
        if !enforcer_up {
            return reason::INPOD_PASS_FLOW;
        }
    }
    reason::INPOD_DROP_UNJUDGED
}

/// Whether a socket listens on the segment's destination port (address or wildcard): the
/// application's connection with this 4-tuple was accepted there, not opened by the pod. The
/// lookup uses a source no connection has (address and port zero), so only a listener matches.
#[inline]
fn accepted_here(ctx: &TcContext, segment: &mut Segment) -> bool {
    // SAFETY: the union member written is the one the family uses (`segment.ipv6`).
    unsafe {
        if segment.ipv6 {
            let v6 = &mut segment.tuple.__bindgen_anon_1.ipv6;
            v6.saddr = [0; 4];
            v6.sport = 0;
        } else {
            let v4 = &mut segment.tuple.__bindgen_anon_1.ipv4;
            v4.saddr = 0;
            v4.sport = 0;
        }
    }
    segment
        .lookup(ctx)
        .is_some_and(|sk| sk.state() == TCP_LISTEN)
}

/// Replaces the tuple's destination port (network byte order).
#[inline]
fn set_dport(segment: &mut Segment, port: u16) {
    // Writing a union's field is safe; the member written is the one the family uses.
    if segment.ipv6 {
        segment.tuple.__bindgen_anon_1.ipv6.dport = port;
    } else {
        segment.tuple.__bindgen_anon_1.ipv4.dport = port;
    }
}

/// The packet's TCP segment, `None` when it is not TCP (or a later IPv4 fragment).
#[inline]
fn segment(ctx: &TcContext) -> Result<Option<Segment>, Unreadable> {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    if protocol == ETH_P_IP {
        let ip_len =
            ipv4_header_len(load::<u8>(ctx, IPV4_VERSION_IHL_OFFSET)?).ok_or(Unreadable)?;
        if load::<u8>(ctx, IPV4_PROTOCOL_OFFSET)? != IPPROTO_TCP
            || !is_first_fragment(u16::from_be(load::<u16>(ctx, IPV4_FLAGS_FRAG_OFFSET)?))
        {
            return Ok(None);
        }
        let [sport, dport] = load::<[u16; 2]>(ctx, ip_len + TCP_PORTS_OFFSET)?;
        let flags = load::<u8>(ctx, ip_len + TCP_FLAGS_OFFSET)?;
        let tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr: load::<u32>(ctx, IPV4_SADDR_OFFSET)?,
                    daddr: load::<u32>(ctx, IPV4_DADDR_OFFSET)?,
                    sport,
                    dport,
                },
            },
        };
        return Ok(Some(Segment {
            tuple,
            ipv6: false,
            flags,
        }));
    }
    if protocol != ETH_P_IPV6 {
        return Ok(None);
    }
    match load::<u8>(ctx, IPV6_NEXT_HEADER_OFFSET)? {
        IPPROTO_TCP => {}
        // Extension headers (hop-by-hop, routing, fragment, destination options, AH, ESP,
        // mobility, HIP, shim6): walking them is not done, and they may carry a SYN.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 => return Err(Unreadable),
        _ => return Ok(None),
    }
    let [sport, dport] = load::<[u16; 2]>(ctx, IPV6_HEADER_LEN + TCP_PORTS_OFFSET)?;
    let flags = load::<u8>(ctx, IPV6_HEADER_LEN + TCP_FLAGS_OFFSET)?;
    let tuple = bpf_sock_tuple {
        __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
            ipv6: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
                saddr: load::<[u32; 4]>(ctx, IPV6_SADDR_OFFSET)?,
                daddr: load::<[u32; 4]>(ctx, IPV6_SADDR_OFFSET + 16)?,
                sport,
                dport,
            },
        },
    };
    Ok(Some(Segment {
        tuple,
        ipv6: true,
        flags,
    }))
}

/// Reads a `T` (raw, network byte order) at `offset` from the start of the network header
/// (`packet::load`, shared with `steer` and `guard`).
#[inline]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Unreadable> {
    crate::packet::load(ctx, offset).map_err(|_| Unreadable)
}

/// `inpod_egress`: TC egress on a pod's interfaces, inside its namespace (every pod the agent
/// finds, protected or not). A packet leaving the pod from a source address the pod does not own
/// (`POD_ADDRESSES`, keyed by the pod's namespace cookie) is dropped
/// ([`reason::INPOD_DROP_SPOOFED`]): the enforcer takes a peer's identity from its source
/// address, and raw sockets (`CAP_NET_RAW`, in the default set of container runtimes) let a pod
/// write any. IPv6 link-local and unspecified sources (neighbour discovery) are exempt; what is
/// not IP (ARP) passes ([`reason::INPOD_PASS_OWN_SOURCE`]). A header that cannot be read is
/// dropped.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn inpod_egress(ctx: TcContext) -> i32 {
    verdict(match own_source(&ctx) {
        Ok(true) => reason::INPOD_PASS_OWN_SOURCE,
        Ok(false) | Err(Unreadable) => reason::INPOD_DROP_SPOOFED,
    })
}

#[inline]
fn own_source(ctx: &TcContext) -> Result<bool, Unreadable> {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let protocol = u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16);
    // SAFETY: the program's own context, as the helper takes it.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.skb.skb.cast::<c_void>()) };
    let key = if protocol == ETH_P_IP {
        PodAddressKey::from_ipv4_header(cookie, load::<[u8; 4]>(ctx, IPV4_SADDR_OFFSET)?)
    } else if protocol == ETH_P_IPV6 {
        let addr = load::<[u8; 16]>(ctx, IPV6_SADDR_OFFSET)?;
        if ipv6_source_exempt(&addr) {
            return Ok(true);
        }
        PodAddressKey {
            netns_cookie: cookie,
            addr,
        }
    } else {
        return Ok(true);
    };
    Ok(POD_ADDRESSES.get_ptr(key).is_some())
}
