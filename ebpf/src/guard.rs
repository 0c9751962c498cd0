//! `guard`: TC egress on the host-side interface of each protected local pod, i.e. on packets
//! going *into* the pod. Closes every path that skips `steer`.
//!
//! `steer` judges packets on the interfaces it is attached to. A packet can still reach a pod
//! without crossing one: from the node itself (a host process, a host-network pod), or from an
//! interface nobody hooked yet (a veth created since the last rescan, an unregistered pod). On the
//! way into the pod every such path meets `guard`. For an IPv4/TCP packet to a protected endpoint:
//! - `skb->mark` carries every bit of `upstream_mark`: the enforcer's own upstream connection
//!   (`SO_MARK` on its sockets), passed ([`reason::GUARD_PASS_ENFORCER`]);
//! - not a new flow (no SYN, or SYN+ACK): passed ([`reason::GUARD_PASS_NOT_NEW`]); as in `steer`,
//!   only a SYN can open a connection into the pod;
//! - a new flow while the enforcer's listener exists: it was not steered, so it is a bypass
//!   attempt, dropped ([`reason::GUARD_DROP_BYPASS`]);
//! - a new flow while the listener is missing: `failure_mode` decides
//!   ([`reason::GUARD_DROP_NO_LISTENER`] or [`reason::GUARD_PASS_NO_LISTENER`]).
//!
//! Packets that `steer` assigned to the enforcer never get here: they are delivered to the node's
//! stack, not forwarded to the pod.

use aya_ebpf::{macros::classifier, programs::TcContext};
use nodeward_common::{counter, reason, KernelConfig};
use nodeward_ebpf::net::is_new_flow;

use crate::{
    maps::{config, count, record_opened},
    packet::{classify, Flow, Malformed, Target},
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

/// The reason code for a packet on its way into a protected pod.
#[inline]
fn decide(ctx: &TcContext, flow: &Flow, config: &KernelConfig) -> u32 {
    // SAFETY: `ctx.skb.skb` is the context pointer the kernel passed to the program.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if config.upstream_mark != 0 && mark & config.upstream_mark == config.upstream_mark {
        if is_new_flow(flow.flags) {
            record_opened(flow.daddr, flow.dport, flow.saddr, flow.sport);
        }
        return reason::GUARD_PASS_ENFORCER;
    }
    if !is_new_flow(flow.flags) {
        return reason::GUARD_PASS_NOT_NEW;
    }
    if Socket::listener(ctx, flow, config.listener_port).is_some() {
        return reason::GUARD_DROP_BYPASS;
    }
    count(counter::LISTENER_MISSING);
    if config.fails_open() {
        reason::GUARD_PASS_NO_LISTENER
    } else {
        reason::GUARD_DROP_NO_LISTENER
    }
}
