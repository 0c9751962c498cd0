//! From a reason code to the TC action returned, with its counter and (when enabled) its log line.
//! Shared by `steer` and `guard`, so a reason means the same verdict wherever it is produced.
//!
//! The table of reasons and verdicts is [`nodeward_common::reason::verdict`]; this module only
//! translates it into TC actions:
//! - no opinion: `TC_ACT_UNSPEC` (`TCX_NEXT`): the next program on the hook decides; at the end of
//!   the chain the packet passes, untouched;
//! - steered: `TC_ACT_OK` (`TCX_PASS`): ends the chain, the packet goes to the local stack with the
//!   socket it was assigned;
//! - dropped: `TC_ACT_SHOT`;
//! - redirected to the node: `TC_ACT_REDIRECT`, the program having called `bpf_redirect` (`guard`,
//!   to the node's loopback ingress).

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC},
    programs::TcContext,
};
use aya_log_ebpf::{info, warn};
use nodeward_common::{
    config::{LOG_DECISIONS, LOG_DROPS},
    counter,
    reason::{self, Verdict},
    KernelConfig,
};

use crate::{maps::count, packet::Flow};

/// Which program decided, for the log line.
#[derive(Clone, Copy)]
pub enum Program {
    /// `steer`, TC ingress.
    Steer,
    /// `guard`, TC egress of a protected pod's host-side interface.
    Guard,
}

/// `TC_ACT_OK` as a program's return value (the bindings type it `u32` for the BPF target).
#[expect(
    clippy::unnecessary_cast,
    reason = "u32 in the BPF target's bindings, i32 in the host's"
)]
pub const ACT_OK: i32 = TC_ACT_OK as i32;
/// `TC_ACT_SHOT` as a program's return value.
#[expect(
    clippy::unnecessary_cast,
    reason = "u32 in the BPF target's bindings, i32 in the host's"
)]
pub const ACT_SHOT: i32 = TC_ACT_SHOT as i32;
/// `TC_ACT_REDIRECT` as a program's return value.
#[expect(
    clippy::unnecessary_cast,
    reason = "u32 in the BPF target's bindings, i32 in the host's"
)]
const ACT_REDIRECT: i32 = TC_ACT_REDIRECT as i32;

/// Counts `reason` in its slot and returns its TC action. `flow` and `config` are given for packets
/// to protected endpoints, which are the only ones logged.
#[inline]
pub fn finish(
    ctx: &TcContext,
    reason: u32,
    judged: Option<(&Flow, &KernelConfig)>,
    program: Program,
) -> i32 {
    if let Some(slot) = counter::for_reason(reason) {
        count(slot);
    }
    let verdict = reason::verdict(reason);
    if let Some((flow, config)) = judged {
        log(ctx, program, reason, verdict, flow, config);
    }
    match verdict {
        Some(Verdict::Steered) => {
            count(counter::STEERED);
            ACT_OK
        }
        Some(Verdict::Dropped) => ACT_SHOT,
        Some(Verdict::RedirectedToNode) => ACT_REDIRECT,
        // Every code in use has a verdict; an unknown one (impossible) has no opinion, like
        // packets nodeward does not judge.
        Some(Verdict::NoOpinion) | None => TC_ACT_UNSPEC,
    }
}

/// One aya-log line per decision on a protected endpoint, when `CONFIG.log_level` asks for it:
/// drops at [`LOG_DROPS`], every decision at [`LOG_DECISIONS`]. Off by default; the check costs a
/// compare.
#[inline]
fn log(
    ctx: &TcContext,
    program: Program,
    reason: u32,
    verdict: Option<Verdict>,
    flow: &Flow,
    config: &KernelConfig,
) {
    let dropped = matches!(verdict, Some(Verdict::Dropped));
    let wanted = config.log_level >= LOG_DECISIONS || (dropped && config.log_level >= LOG_DROPS);
    if !wanted {
        return;
    }
    let (saddr, daddr) = (u32::from_be(flow.saddr), u32::from_be(flow.daddr));
    let (sport, dport) = (u16::from_be(flow.sport), u16::from_be(flow.dport));
    let flags = flow.flags;
    match (program, dropped) {
        (Program::Steer, true) => warn!(
            ctx,
            "steer: drop {:i}:{} -> {:i}:{} flags {:x} reason {}",
            saddr,
            sport,
            daddr,
            dport,
            flags,
            reason
        ),
        (Program::Steer, false) => info!(
            ctx,
            "steer: {:i}:{} -> {:i}:{} flags {:x} reason {}",
            saddr,
            sport,
            daddr,
            dport,
            flags,
            reason
        ),
        (Program::Guard, true) => warn!(
            ctx,
            "guard: drop {:i}:{} -> {:i}:{} flags {:x} reason {}",
            saddr,
            sport,
            daddr,
            dport,
            flags,
            reason
        ),
        (Program::Guard, false) => info!(
            ctx,
            "guard: {:i}:{} -> {:i}:{} flags {:x} reason {}",
            saddr,
            sport,
            daddr,
            dport,
            flags,
            reason
        ),
    }
}
