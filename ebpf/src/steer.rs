//! `steer`: TC ingress on every interface of the node (the host side of pods' veths, uplinks,
//! and `lo`, where `guard` redirects what the node itself sends to protected pods).
//! Sends every TCP flow into a protected pod to the enforcer.
//!
//! For an IPv4/TCP packet whose destination is in `PROTECTED_ENDPOINTS` ((address, port), then
//! (address, any port)):
//! 1. a socket of the node's namespace for the packet's exact 4-tuple, not listening and not in
//!    TIME-WAIT, is the enforcer's own socket of this flow (only a transparent socket can have the
//!    pod's address as its local address): mark the packet with `steer_mark` and
//!    `bpf_sk_assign` it there ([`reason::STEER_ESTABLISHED`]);
//! 2. a new flow (SYN without ACK) goes to the enforcer's transparent listener (LISTEN on
//!    `listener_port` of the wildcard or the pod's address): mark, assign
//!    ([`reason::STEER_LISTENER`]). The policy routing the agent installs (`fwmark steer_mark`
//!    -> table with `local 0.0.0.0/0 dev lo`) makes marked packets local deliveries, where the
//!    assigned socket receives them; `getsockname()` on the accepted socket is the pod's address;
//! 3. without a listener (the agent is down) the new flow follows `failure_mode`: dropped
//!    ([`reason::DROP_NO_LISTENER`]) or passed to the pod unmarked ([`reason::PASS_NO_LISTENER`]);
//! 4. any other segment (ACK, SYN+ACK, RST, data) with no enforcer socket is not part of a flow
//!    into the pod: it answers a connection the pod opened itself, so it goes to the pod
//!    ([`reason::PASS_NOT_NEW`]); a connection into the pod can only begin with a SYN, and every
//!    SYN is steered. `guard` checks the same on the way into the pod.
//!
//! Everything else gets no opinion (`TC_ACT_UNSPEC`): a packet to an unprotected pod costs the
//! header reads and one or two hash lookups. On `lo` that is the cost for the node's ordinary
//! loopback traffic (127.0.0.0/8, the node's own addresses): its destinations are never pods'.
//!
//! On `lo` the steered packets are the ones `guard` redirected there (`bpf_redirect` to ingress):
//! their Ethernet header still names the pod's interface, so the kernel typed them
//! `PACKET_OTHERHOST`, which IP would drop; `steer` retypes a packet it steers on `lo` as
//! `PACKET_HOST`. Flows opened on `lo` are not recorded for the fast path (their client is a node
//! socket, never a pod's).

use aya_ebpf::{helpers::generated::bpf_skb_change_type, macros::classifier, programs::TcContext};
use nodeward_common::{counter, reason, KernelConfig};
use nodeward_ebpf::net::{is_flow_socket, is_new_flow, LOOPBACK_IFINDEX, PACKET_HOST};

use crate::{
    maps::{config, count, record_opened},
    packet::{classify, Flow, Malformed, Target},
    sock::Socket,
    verdict::{finish, Program},
};

/// Entry point. A packet whose headers cannot be read, to a destination not known to be protected,
/// gets the documented default: no opinion (`TC_ACT_UNSPEC`) with reason
/// [`reason::PASS_MALFORMED`], counted in `COUNTERS[MALFORMED]`; the kernel's stack drops
/// malformed packets. (One to a protected destination is dropped: see `classify`.)
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn steer(ctx: TcContext) -> i32 {
    match try_steer(&ctx) {
        Ok(verdict) => verdict,
        Err(Malformed) => finish(&ctx, reason::PASS_MALFORMED, None, Program::Steer),
    }
}

fn try_steer(ctx: &TcContext) -> Result<i32, Malformed> {
    count(counter::SEEN);
    let verdict = match classify(ctx)? {
        Target::NotIpv4Tcp => finish(ctx, reason::PASS_NOT_IPV4_TCP, None, Program::Steer),
        Target::NotProtected => finish(ctx, reason::PASS_NOT_PROTECTED, None, Program::Steer),
        Target::MalformedProtected => {
            count(counter::PROTECTED);
            finish(ctx, reason::DROP_MALFORMED_PROTECTED, None, Program::Steer)
        }
        Target::Protected(flow) => {
            count(counter::PROTECTED);
            let config = config();
            let reason = decide(ctx, &flow, &config);
            finish(ctx, reason, Some((&flow, &config)), Program::Steer)
        }
    };
    Ok(verdict)
}

/// The reason code for a packet to a protected endpoint; marks and assigns the packet when it is
/// steered (and only then).
#[inline]
fn decide(ctx: &TcContext, flow: &Flow, config: &KernelConfig) -> u32 {
    if let Some(sk) = Socket::of_flow(ctx, flow) {
        if is_flow_socket(sk.state()) {
            mark(ctx, config.steer_mark);
            retype_on_loopback(ctx);
            if sk.assign(ctx).is_err() {
                // The mark alone still delivers the packet locally, where the node's own lookup
                // finds the same socket by its 4-tuple.
                count(counter::ASSIGN_FAILED);
            }
            return reason::STEER_ESTABLISHED;
        }
    }
    if !is_new_flow(flow.flags) {
        return reason::PASS_NOT_NEW;
    }
    match Socket::listener(ctx, flow, config.listener_port) {
        Some(listener) => {
            if listener.assign(ctx).is_ok() {
                mark(ctx, config.steer_mark);
                if !retype_on_loopback(ctx) {
                    record_opened(flow.saddr, flow.sport, flow.daddr, flow.dport);
                }
                return reason::STEER_LISTENER;
            }
            count(counter::ASSIGN_FAILED);
        }
        None => count(counter::LISTENER_MISSING),
    }
    if config.fails_open() {
        reason::PASS_NO_LISTENER
    } else {
        reason::DROP_NO_LISTENER
    }
}

/// ORs `steer_mark` into `skb->mark`, keeping bits others set.
#[inline]
fn mark(ctx: &TcContext, steer_mark: u32) {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let current = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(current | steer_mark);
}

/// On `lo` ingress, makes a steered packet `PACKET_HOST` (see the module doc) and returns `true`;
/// elsewhere returns `false` and changes nothing.
#[inline]
fn retype_on_loopback(ctx: &TcContext) -> bool {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex != LOOPBACK_IFINDEX {
        return false;
    }
    // SAFETY: the program's own context; the helper only sets `pkt_type` (it refuses nothing
    // between `PACKET_HOST` and `PACKET_OTHERHOST`).
    let _ = unsafe { bpf_skb_change_type(ctx.skb.skb, PACKET_HOST) };
    true
}
