//! Slots of the `COUNTERS` per-CPU array (`u64` packet counts per slot).
//!
//! Stable indices, like the reason codes: a slot's meaning never changes and a retired slot stays
//! reserved. Each verdict reason has exactly one slot ([`for_reason`]); a few more slots count
//! events on the way to a verdict (`SEEN`, `PROTECTED`, `STEERED`, `LISTENER_MISSING`,
//! `ASSIGN_FAILED`, `GUARD_SEEN`, and the fast path's `FASTPATH_*`). The agent sums each slot over all CPUs.

use crate::reason;

/// `steer`: every packet the program ran on.
pub const SEEN: u32 = 0;
/// `steer`: packets with [`reason::PASS_NOT_IPV4_TCP`].
pub const NOT_IPV4_TCP: u32 = 1;
/// `steer`: packets with [`reason::PASS_NOT_PROTECTED`].
pub const NOT_PROTECTED: u32 = 2;
/// `steer`: packets to a protected destination, whatever their verdict (an event).
pub const PROTECTED: u32 = 3;
/// `steer`: packets with [`reason::PASS_MALFORMED`].
pub const MALFORMED: u32 = 4;
/// `steer`: packets whose mark got `steer_mark` (an event: [`ASSIGNED_LISTENER`] +
/// [`ASSIGNED_ESTABLISHED`]).
pub const STEERED: u32 = 5;
/// `steer`: packets with [`reason::STEER_LISTENER`].
pub const ASSIGNED_LISTENER: u32 = 6;
/// `steer`: packets with [`reason::STEER_ESTABLISHED`].
pub const ASSIGNED_ESTABLISHED: u32 = 7;
/// `steer`: packets with [`reason::PASS_NOT_NEW`].
pub const PASSED_NOT_NEW: u32 = 8;
/// `steer` and `guard`: the enforcer's listener was looked up and not found (an event; the verdict
/// then follows `failure_mode`).
pub const LISTENER_MISSING: u32 = 9;
/// `steer`: `bpf_sk_assign` refused a socket that was found (an event). For the listener the
/// verdict then follows `failure_mode`; for an established flow the packet is still steered by
/// its mark and found by the node's own socket lookup.
pub const ASSIGN_FAILED: u32 = 10;
/// `steer`: packets with [`reason::DROP_NO_LISTENER`].
pub const DROPPED_FAILURE_CLOSED: u32 = 11;
/// `steer`: packets with [`reason::PASS_NO_LISTENER`].
pub const PASSED_FAILURE_OPEN: u32 = 12;
/// `steer`: packets with [`reason::DROP_MALFORMED_PROTECTED`].
pub const DROPPED_MALFORMED: u32 = 13;
/// `guard`: every packet the program ran on.
pub const GUARD_SEEN: u32 = 14;
/// `guard`: packets with [`reason::GUARD_PASS_NOT_IPV4_TCP`].
pub const GUARD_NOT_IPV4_TCP: u32 = 15;
/// `guard`: packets with [`reason::GUARD_PASS_NOT_PROTECTED`].
pub const GUARD_NOT_PROTECTED: u32 = 16;
/// `guard`: packets with [`reason::GUARD_PASS_MALFORMED`].
pub const GUARD_MALFORMED: u32 = 17;
/// `guard`: packets with [`reason::GUARD_PASS_ENFORCER`].
pub const GUARD_PASSED_ENFORCER: u32 = 18;
/// `guard`: packets with [`reason::GUARD_PASS_NOT_NEW`].
pub const GUARD_PASSED_NOT_NEW: u32 = 19;
/// `guard`: packets with [`reason::GUARD_DROP_BYPASS`].
pub const GUARD_DROPPED_BYPASS: u32 = 20;
/// `guard`: packets with [`reason::GUARD_DROP_NO_LISTENER`].
pub const GUARD_DROPPED_FAILURE_CLOSED: u32 = 21;
/// `guard`: packets with [`reason::GUARD_PASS_NO_LISTENER`].
pub const GUARD_PASSED_FAILURE_OPEN: u32 = 22;
/// `guard`: packets with [`reason::GUARD_DROP_MALFORMED_PROTECTED`].
pub const GUARD_DROPPED_MALFORMED: u32 = 23;

/// `fastpath_sockops`: sockets of protected endpoints added to `FAST_PATH_SOCKETS` when their
/// connection was established (an event).
pub const FASTPATH_SOCKETS_ADDED: u32 = 24;
/// `fastpath_sockops`: sockets of protected endpoints that could not be added (the key was
/// taken by another socket, or the map was full); they keep the TCP path (an event).
pub const FASTPATH_SOCKETS_FAILED: u32 = 25;
/// `fastpath_msg`: messages handed straight to the peer socket of their own connection (an
/// event).
pub const FASTPATH_MSGS_REDIRECTED: u32 = 26;
/// `fastpath_msg`: messages whose peer socket is not in the map; they take the TCP path (an
/// event).
pub const FASTPATH_MSGS_PASSED: u32 = 27;

/// `fastpath_sockops`: sockets of pods whose 4-tuple did not open through `steer` or `guard`
/// (not in `OPENED_FLOWS`), kept out of the fast path (an event).
pub const FASTPATH_SOCKETS_UNSTEERED: u32 = 28;

/// `guard`: packets with [`reason::GUARD_REDIRECT_LISTENER`] (new flows from the node, or through
/// an interface `steer` is not attached to, sent to `lo` ingress).
pub const GUARD_REDIRECTED_LISTENER: u32 = 29;
/// `guard`: packets with [`reason::GUARD_REDIRECT_ESTABLISHED`].
pub const GUARD_REDIRECTED_ESTABLISHED: u32 = 30;

/// `inpod`: packets it ran on (an event).
pub const INPOD_SEEN: u32 = 31;
/// `inpod`: packets with [`reason::INPOD_PASS_NOT_TCP`].
pub const INPOD_NOT_TCP: u32 = 32;
/// `inpod`: packets with [`reason::INPOD_STEER_LISTENER`].
pub const INPOD_ASSIGNED_LISTENER: u32 = 33;
/// `inpod`: packets with [`reason::INPOD_DROP_NO_LISTENER`].
pub const INPOD_DROPPED_FAILURE_CLOSED: u32 = 34;
/// `inpod`: packets with [`reason::INPOD_PASS_NO_LISTENER`].
pub const INPOD_PASSED_FAILURE_OPEN: u32 = 35;
/// `inpod`: packets with [`reason::INPOD_PASS_FLOW`].
pub const INPOD_PASSED_FLOW: u32 = 36;
/// `inpod`: packets with [`reason::INPOD_DROP_UNJUDGED`].
pub const INPOD_DROPPED_UNJUDGED: u32 = 37;
/// `inpod`: packets with [`reason::INPOD_DROP_MALFORMED`].
pub const INPOD_DROPPED_MALFORMED: u32 = 38;

/// `inpod_egress`: packets with [`reason::INPOD_DROP_SPOOFED`].
pub const INPOD_DROPPED_SPOOFED: u32 = 39;
/// `inpod_egress`: packets with [`reason::INPOD_PASS_OWN_SOURCE`].
pub const INPOD_PASSED_OWN_SOURCE: u32 = 40;

/// Number of slots: the `max_entries` of `COUNTERS`.
pub const LEN: u32 = 41;

/// Slots that count events rather than one reason's verdicts.
pub const EVENTS: [u32; 12] = [
    INPOD_SEEN,
    SEEN,
    PROTECTED,
    STEERED,
    LISTENER_MISSING,
    ASSIGN_FAILED,
    GUARD_SEEN,
    FASTPATH_SOCKETS_ADDED,
    FASTPATH_SOCKETS_FAILED,
    FASTPATH_MSGS_REDIRECTED,
    FASTPATH_MSGS_PASSED,
    FASTPATH_SOCKETS_UNSTEERED,
];

/// The slot that counts packets decided with `reason`, or `None` for a retired or unknown code.
#[must_use]
pub const fn for_reason(reason: u32) -> Option<u32> {
    match reason {
        reason::PASS_NOT_PROTECTED => Some(NOT_PROTECTED),
        reason::PASS_NOT_IPV4_TCP => Some(NOT_IPV4_TCP),
        reason::PASS_MALFORMED => Some(MALFORMED),
        reason::STEER_LISTENER => Some(ASSIGNED_LISTENER),
        reason::STEER_ESTABLISHED => Some(ASSIGNED_ESTABLISHED),
        reason::DROP_NO_LISTENER => Some(DROPPED_FAILURE_CLOSED),
        reason::PASS_NO_LISTENER => Some(PASSED_FAILURE_OPEN),
        reason::PASS_NOT_NEW => Some(PASSED_NOT_NEW),
        reason::DROP_MALFORMED_PROTECTED => Some(DROPPED_MALFORMED),
        reason::GUARD_PASS_ENFORCER => Some(GUARD_PASSED_ENFORCER),
        reason::GUARD_DROP_BYPASS => Some(GUARD_DROPPED_BYPASS),
        reason::GUARD_DROP_NO_LISTENER => Some(GUARD_DROPPED_FAILURE_CLOSED),
        reason::GUARD_PASS_NO_LISTENER => Some(GUARD_PASSED_FAILURE_OPEN),
        reason::GUARD_PASS_NOT_NEW => Some(GUARD_PASSED_NOT_NEW),
        reason::GUARD_PASS_NOT_PROTECTED => Some(GUARD_NOT_PROTECTED),
        reason::GUARD_PASS_NOT_IPV4_TCP => Some(GUARD_NOT_IPV4_TCP),
        reason::GUARD_PASS_MALFORMED => Some(GUARD_MALFORMED),
        reason::GUARD_DROP_MALFORMED_PROTECTED => Some(GUARD_DROPPED_MALFORMED),
        reason::GUARD_REDIRECT_LISTENER => Some(GUARD_REDIRECTED_LISTENER),
        reason::GUARD_REDIRECT_ESTABLISHED => Some(GUARD_REDIRECTED_ESTABLISHED),
        reason::INPOD_PASS_NOT_TCP => Some(INPOD_NOT_TCP),
        reason::INPOD_STEER_LISTENER => Some(INPOD_ASSIGNED_LISTENER),
        reason::INPOD_DROP_NO_LISTENER => Some(INPOD_DROPPED_FAILURE_CLOSED),
        reason::INPOD_PASS_NO_LISTENER => Some(INPOD_PASSED_FAILURE_OPEN),
        reason::INPOD_PASS_FLOW => Some(INPOD_PASSED_FLOW),
        reason::INPOD_DROP_UNJUDGED => Some(INPOD_DROPPED_UNJUDGED),
        reason::INPOD_DROP_MALFORMED => Some(INPOD_DROPPED_MALFORMED),
        reason::INPOD_DROP_SPOOFED => Some(INPOD_DROPPED_SPOOFED),
        reason::INPOD_PASS_OWN_SOURCE => Some(INPOD_PASSED_OWN_SOURCE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_and_every_slot_a_meaning() {
        let mut used = [false; LEN as usize];
        for slot in EVENTS {
            assert!(!used[slot as usize], "event slot {slot} listed twice");
            used[slot as usize] = true;
        }
        for code in 0..reason::COUNT {
            let Some(slot) = for_reason(code) else {
                assert!(
                    reason::RETIRED.contains(&code),
                    "reason {code} in use has no slot"
                );
                continue;
            };
            assert!(slot < LEN);
            assert!(!used[slot as usize], "slot {slot} shared by two meanings");
            used[slot as usize] = true;
        }
        assert!(used.iter().all(|u| *u), "a slot below LEN has no meaning");
    }
}
