//! `guard`: TC egress on the host-side interface of each protected local pod, i.e. on packets
//! going *into* the pod. Sends every path that skips `steer` through the enforcer.
//!
//! `steer` judges packets on the interfaces it is attached to. A packet can still reach a pod
//! without crossing one: from the node itself (a host process, a host-network pod, the kubelet's
//! probes: such packets enter no interface), or from an interface nobody hooked yet (a veth
//! created since the last rescan, an unregistered pod). On the way into the pod every such path
//! meets `guard`. For an IPv4/TCP packet to a protected endpoint:
//! - `skb->mark` carries every bit of `upstream_mark` AND the packet's sending socket (`skb->sk`,
//!   a full socket of the node) has them as its own mark: the enforcer's own upstream connection
//!   (`SO_MARK` on its sockets), passed ([`reason::GUARD_PASS_ENFORCER`]). The packet's mark alone
//!   proves nothing: iptables rules set mark bits on packets they did not send (the CNI portmap
//!   plugin marks hairpinned and `127.0.0.1` hostPort traffic 0x2000 and never clears it), while
//!   a socket's mark is set only by its owner (`SO_MARK`, `CAP_NET_ADMIN` in the node) and a
//!   forwarded packet has no sending socket at all;
//! - a packet the node itself sent (`skb->sk` set: a local socket's) of a flow the enforcer holds
//!   (its socket for the 4-tuple, not listening, not in TIME-WAIT: its accepted socket has the
//!   pod's address as local address): redirected to the node's loopback ingress
//!   ([`reason::GUARD_REDIRECT_ESTABLISHED`]);
//! - not a new flow (no SYN, or SYN+ACK) with no enforcer socket: passed
//!   ([`reason::GUARD_PASS_NOT_NEW`]); it answers a connection the pod opened, and as in `steer`
//!   only a SYN can open a connection into the pod;
//! - a new flow while the enforcer's listener exists: it was not steered. Sent by the node
//!   itself, it is redirected to the node's loopback ingress ([`reason::GUARD_REDIRECT_LISTENER`]);
//!   forwarded from an interface `steer` is not attached to (yet), it is dropped
//!   ([`reason::GUARD_DROP_BYPASS`]): such a flow cannot be judged through `lo`, because the
//!   node's stack drops forwarded packets that early demux matched to a local socket (the
//!   enforcer's), so the rest of the flow would never arrive;
//! - a new flow while the listener is missing: `failure_mode` decides
//!   ([`reason::GUARD_DROP_NO_LISTENER`] or [`reason::GUARD_PASS_NO_LISTENER`]).
//!
//! IPv6 is not steered or judged yet, so an IPv6 packet that may open a TCP connection into the
//! pod (a SYN, or a packet behind extension headers) is dropped unless the enforcer's own socket
//! sent it ([`reason::GUARD_DROP_BYPASS`]): a dual-stack pod refuses new IPv6 connections instead
//! of receiving them unjudged. Replies, `ICMPv6` and UDP pass.
//!
//! Redirected packets (`bpf_redirect(lo, BPF_F_INGRESS)`) meet `steer`, which the agent attaches
//! to `lo` ingress too: it marks them and `bpf_sk_assign`s them to the enforcer exactly as it does
//! for a pod's packets, and the `fwmark` rule makes them local deliveries. The enforcer's answers
//! to a node address are local deliveries already (`accept_local` on `lo`, which the agent sets,
//! lets the redirected packets, whose source is a local address, be delivered). A redirect the
//! helper refuses is dropped ([`reason::GUARD_DROP_BYPASS`]): nothing reaches the pod unjudged.
//!
//! Packets that `steer` assigned to the enforcer never get here: they are delivered to the node's
//! stack, not forwarded to the pod.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT},
    helpers::generated::{bpf_redirect, bpf_sk_fullsock},
    macros::classifier,
    programs::TcContext,
};
use nodeward_common::{counter, reason, KernelConfig};
use nodeward_ebpf::net::{is_flow_socket, is_new_flow, LOOPBACK_IFINDEX};

use crate::{
    maps::{config, count, record_opened},
    packet::{classify, ipv6_may_open_tcp, Flow, Malformed, Target},
    sock::Socket,
    verdict::{finish, Program},
};

/// Entry point. A packet whose headers cannot be read, to a destination not known to be protected,
/// gets the documented default: no opinion (`TC_ACT_UNSPEC`) with reason
/// [`reason::GUARD_PASS_MALFORMED`], counted in `COUNTERS[GUARD_MALFORMED]`.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn guard(ctx: TcContext) -> i32 {
    match try_guard(&ctx) {
        Ok(verdict) => verdict,
        Err(Malformed) => finish(&ctx, reason::GUARD_PASS_MALFORMED, None, Program::Guard),
    }
}

fn try_guard(ctx: &TcContext) -> Result<i32, Malformed> {
    count(counter::GUARD_SEEN);
    let verdict = match classify(ctx)? {
        Target::NotIpv4Tcp if ipv6_may_open_tcp(ctx)? => {
            let config = config();
            if config.upstream_mark != 0
                && sender_mark(ctx) & config.upstream_mark == config.upstream_mark
            {
                finish(ctx, reason::GUARD_PASS_ENFORCER, None, Program::Guard)
            } else {
                finish(ctx, reason::GUARD_DROP_BYPASS, None, Program::Guard)
            }
        }
        Target::NotIpv4Tcp => finish(ctx, reason::GUARD_PASS_NOT_IPV4_TCP, None, Program::Guard),
        Target::NotProtected => finish(ctx, reason::GUARD_PASS_NOT_PROTECTED, None, Program::Guard),
        Target::MalformedProtected => finish(
            ctx,
            reason::GUARD_DROP_MALFORMED_PROTECTED,
            None,
            Program::Guard,
        ),
        Target::Protected(flow) => {
            let config = config();
            let reason = decide(ctx, &flow, &config);
            finish(ctx, reason, Some((&flow, &config)), Program::Guard)
        }
    };
    Ok(verdict)
}

/// `SO_MARK` of the node's socket that sent the packet; 0 for a forwarded packet (no sending
/// socket) or a socket that is not a full one (a request or TIME-WAIT socket).
#[inline]
fn sender_mark(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program; `sk` is
    // checked for null before use, as the verifier demands.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: a non-null socket pointer from the context, as `bpf_sk_fullsock` takes it.
    let full = unsafe { bpf_sk_fullsock(sk) };
    if full.is_null() {
        return 0;
    }
    // SAFETY: `bpf_sk_fullsock` returned a full socket, whose `mark` the verifier lets us read.
    unsafe { (*full).mark }
}

/// The reason code for a packet on its way into a protected pod.
#[inline]
fn decide(ctx: &TcContext, flow: &Flow, config: &KernelConfig) -> u32 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if config.upstream_mark != 0
        && mark & config.upstream_mark == config.upstream_mark
        && sender_mark(ctx) & config.upstream_mark == config.upstream_mark
    {
        if is_new_flow(flow.flags) {
            record_opened(flow.daddr, flow.dport, flow.saddr, flow.sport);
        }
        return reason::GUARD_PASS_ENFORCER;
    }
    // SAFETY: as above; `sk` is the sending socket of a packet the node made, null for a
    // forwarded one. Only compared with null here.
    let from_node = unsafe { !(*ctx.skb.skb).__bindgen_anon_2.sk.is_null() };
    if from_node && Socket::of_flow(ctx, flow).is_some_and(|sk| is_flow_socket(sk.state())) {
        return redirect_to_node(reason::GUARD_REDIRECT_ESTABLISHED);
    }
    if !is_new_flow(flow.flags) {
        return reason::GUARD_PASS_NOT_NEW;
    }
    if Socket::listener(ctx, flow, config.listener_port).is_some() {
        return if from_node {
            redirect_to_node(reason::GUARD_REDIRECT_LISTENER)
        } else {
            reason::GUARD_DROP_BYPASS
        };
    }
    count(counter::LISTENER_MISSING);
    if config.fails_open() {
        reason::GUARD_PASS_NO_LISTENER
    } else {
        reason::GUARD_DROP_NO_LISTENER
    }
}

/// Asks the kernel to hand the packet to the node's loopback ingress once the program returns
/// `TC_ACT_REDIRECT`; `reason` when it accepted, [`reason::GUARD_DROP_BYPASS`] when it refused.
#[inline]
fn redirect_to_node(reason: u32) -> u32 {
    // SAFETY: a helper without pointers; it only records the target for after the program.
    let action = unsafe { bpf_redirect(LOOPBACK_IFINDEX, u64::from(BPF_F_INGRESS)) };
    if action == i64::from(TC_ACT_REDIRECT) {
        reason
    } else {
        reason::GUARD_DROP_BYPASS
    }
}
