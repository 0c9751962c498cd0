//! Packet counters of the kernel programs, summed over CPUs and named.

use nodeward_common::counter;

/// Packet counts summed over all CPUs, one field per [`nodeward_common::counter`] slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// `steer`: packets it ran on.
    pub seen: u64,
    /// `steer`: not IPv4/TCP, or a later fragment (no opinion).
    pub not_ipv4_tcp: u64,
    /// `steer`: IPv4/TCP to unprotected destinations (no opinion).
    pub not_protected: u64,
    /// `steer`: packets to protected destinations, whatever their verdict.
    pub protected: u64,
    /// `steer`: headers unreadable, destination not known to be protected (no opinion).
    pub malformed: u64,
    /// `steer`: packets marked and assigned to the enforcer (listener + established).
    pub steered: u64,
    /// `steer`: new flows assigned to the enforcer's listener.
    pub assigned_listener: u64,
    /// `steer`: packets assigned to the enforcer's socket of their flow.
    pub assigned_established: u64,
    /// `steer`: packets to protected pods that are not new flows and no enforcer socket holds
    /// (replies to the pod's own connections), passed.
    pub passed_not_new: u64,
    /// `steer` and `guard`: lookups that found no enforcer listener.
    pub listener_missing: u64,
    /// `steer`: `bpf_sk_assign` refusals.
    pub assign_failed: u64,
    /// `steer`: new flows dropped for want of a listener (failure mode closed).
    pub dropped_failure_closed: u64,
    /// `steer`: new flows passed to the pod for want of a listener (failure mode open).
    pub passed_failure_open: u64,
    /// `steer`: packets to protected endpoints with a cut-short TCP header, dropped.
    pub dropped_malformed: u64,
    /// `guard`: packets it ran on.
    pub guard_seen: u64,
    /// `guard`: not IPv4/TCP (no opinion).
    pub guard_not_ipv4_tcp: u64,
    /// `guard`: unprotected destinations (no opinion).
    pub guard_not_protected: u64,
    /// `guard`: headers unreadable, destination not known to be protected (no opinion).
    pub guard_malformed: u64,
    /// `guard`: the enforcer's upstream packets (upstream mark), passed.
    pub guard_passed_enforcer: u64,
    /// `guard`: packets that are not new flows, passed.
    pub guard_passed_not_new: u64,
    /// `guard`: new flows forwarded from an interface `steer` is not on while the enforcer is up:
    /// bypass attempts, dropped (also a refused redirect to `lo`).
    pub guard_dropped_bypass: u64,
    /// `guard`: new flows from the node itself while the enforcer is up, redirected to `lo`
    /// ingress where `steer` steers them.
    pub guard_redirected_listener: u64,
    /// `guard`: packets of flows the enforcer holds, redirected to `lo` ingress.
    pub guard_redirected_established: u64,
    /// `guard`: new flows dropped for want of a listener (failure mode closed).
    pub guard_dropped_failure_closed: u64,
    /// `guard`: new flows passed for want of a listener (failure mode open).
    pub guard_passed_failure_open: u64,
    /// `guard`: packets to protected endpoints with a cut-short TCP header, dropped.
    pub guard_dropped_malformed: u64,
    /// `fastpath_sockops`: sockets of protected endpoints added to the fast path.
    pub fastpath_sockets_added: u64,
    /// `fastpath_sockops`: sockets of protected endpoints not added (key taken, map full).
    pub fastpath_sockets_failed: u64,
    /// `fastpath_sockops`: pods' sockets whose 4-tuple did not open through steer/guard, kept out.
    pub fastpath_sockets_unsteered: u64,
    /// `fastpath_msg`: messages handed to the peer socket of their connection.
    pub fastpath_msgs_redirected: u64,
    /// `fastpath_msg`: messages without a peer in the map, sent through TCP.
    pub fastpath_msgs_passed: u64,
    /// `inpod`: packets it ran on (inside protected pods).
    pub inpod_seen: u64,
    /// `inpod`: not TCP (no opinion).
    pub inpod_not_tcp: u64,
    /// `inpod`: new flows assigned to the enforcer's listener in the pod.
    pub inpod_assigned_listener: u64,
    /// `inpod`: new flows dropped for want of a listener (failure mode closed).
    pub inpod_dropped_failure_closed: u64,
    /// `inpod`: new flows passed for want of a listener (failure mode open).
    pub inpod_passed_failure_open: u64,
    /// `inpod`: segments of existing flows passed (the enforcer's, replies, strays).
    pub inpod_passed_flow: u64,
    /// `inpod`: segments of inbound connections the enforcer never judged, dropped.
    pub inpod_dropped_unjudged: u64,
    /// `inpod`: unjudgeable TCP (cut-short header, IPv6 extension headers), dropped.
    pub inpod_dropped_malformed: u64,
    /// `inpod_egress`: packets leaving a pod from an address it does not own, dropped.
    pub inpod_dropped_spoofed: u64,
    /// `inpod_egress`: packets leaving a pod from its own address (or exempt, or not IP).
    pub inpod_passed_own_source: u64,
}

impl Counters {
    pub(super) fn from_slots(slots: &[u64; counter::LEN as usize]) -> Self {
        let at = |slot: u32| slots[slot as usize];
        Self {
            seen: at(counter::SEEN),
            not_ipv4_tcp: at(counter::NOT_IPV4_TCP),
            not_protected: at(counter::NOT_PROTECTED),
            protected: at(counter::PROTECTED),
            malformed: at(counter::MALFORMED),
            steered: at(counter::STEERED),
            assigned_listener: at(counter::ASSIGNED_LISTENER),
            assigned_established: at(counter::ASSIGNED_ESTABLISHED),
            passed_not_new: at(counter::PASSED_NOT_NEW),
            listener_missing: at(counter::LISTENER_MISSING),
            assign_failed: at(counter::ASSIGN_FAILED),
            dropped_failure_closed: at(counter::DROPPED_FAILURE_CLOSED),
            passed_failure_open: at(counter::PASSED_FAILURE_OPEN),
            dropped_malformed: at(counter::DROPPED_MALFORMED),
            guard_seen: at(counter::GUARD_SEEN),
            guard_not_ipv4_tcp: at(counter::GUARD_NOT_IPV4_TCP),
            guard_not_protected: at(counter::GUARD_NOT_PROTECTED),
            guard_malformed: at(counter::GUARD_MALFORMED),
            guard_passed_enforcer: at(counter::GUARD_PASSED_ENFORCER),
            guard_passed_not_new: at(counter::GUARD_PASSED_NOT_NEW),
            guard_dropped_bypass: at(counter::GUARD_DROPPED_BYPASS),
            guard_redirected_listener: at(counter::GUARD_REDIRECTED_LISTENER),
            guard_redirected_established: at(counter::GUARD_REDIRECTED_ESTABLISHED),
            guard_dropped_failure_closed: at(counter::GUARD_DROPPED_FAILURE_CLOSED),
            guard_passed_failure_open: at(counter::GUARD_PASSED_FAILURE_OPEN),
            guard_dropped_malformed: at(counter::GUARD_DROPPED_MALFORMED),
            fastpath_sockets_added: at(counter::FASTPATH_SOCKETS_ADDED),
            fastpath_sockets_failed: at(counter::FASTPATH_SOCKETS_FAILED),
            fastpath_msgs_redirected: at(counter::FASTPATH_MSGS_REDIRECTED),
            fastpath_msgs_passed: at(counter::FASTPATH_MSGS_PASSED),
            fastpath_sockets_unsteered: at(counter::FASTPATH_SOCKETS_UNSTEERED),
            inpod_seen: at(counter::INPOD_SEEN),
            inpod_not_tcp: at(counter::INPOD_NOT_TCP),
            inpod_assigned_listener: at(counter::INPOD_ASSIGNED_LISTENER),
            inpod_dropped_failure_closed: at(counter::INPOD_DROPPED_FAILURE_CLOSED),
            inpod_passed_failure_open: at(counter::INPOD_PASSED_FAILURE_OPEN),
            inpod_passed_flow: at(counter::INPOD_PASSED_FLOW),
            inpod_dropped_unjudged: at(counter::INPOD_DROPPED_UNJUDGED),
            inpod_dropped_malformed: at(counter::INPOD_DROPPED_MALFORMED),
            inpod_dropped_spoofed: at(counter::INPOD_DROPPED_SPOOFED),
            inpod_passed_own_source: at(counter::INPOD_PASSED_OWN_SOURCE),
        }
    }

    /// Packets dropped by either program, for every reason.
    #[must_use]
    pub const fn dropped(&self) -> u64 {
        self.dropped_failure_closed
            + self.dropped_malformed
            + self.guard_dropped_bypass
            + self.guard_dropped_failure_closed
            + self.guard_dropped_malformed
            + self.inpod_dropped_failure_closed
            + self.inpod_dropped_unjudged
            + self.inpod_dropped_malformed
            + self.inpod_dropped_spoofed
    }

    /// Packets to protected endpoints passed to the pod without the enforcer (not new flows,
    /// failure mode open), by either program.
    #[must_use]
    pub const fn passed_protected(&self) -> u64 {
        self.passed_not_new
            + self.passed_failure_open
            + self.guard_passed_not_new
            + self.guard_passed_failure_open
            + self.inpod_passed_failure_open
    }

    /// `(metric suffix, value)` of every counter, for `/metrics` (e.g.
    /// `nodeward_datapath_packets_total{counter="assigned_listener"}`).
    #[must_use]
    pub fn named(&self) -> [(&'static str, u64); counter::LEN as usize] {
        [
            ("seen", self.seen),
            ("not_ipv4_tcp", self.not_ipv4_tcp),
            ("not_protected", self.not_protected),
            ("protected", self.protected),
            ("malformed", self.malformed),
            ("steered", self.steered),
            ("assigned_listener", self.assigned_listener),
            ("assigned_established", self.assigned_established),
            ("passed_not_new", self.passed_not_new),
            ("listener_missing", self.listener_missing),
            ("assign_failed", self.assign_failed),
            ("dropped_failure_closed", self.dropped_failure_closed),
            ("passed_failure_open", self.passed_failure_open),
            ("dropped_malformed", self.dropped_malformed),
            ("guard_seen", self.guard_seen),
            ("guard_not_ipv4_tcp", self.guard_not_ipv4_tcp),
            ("guard_not_protected", self.guard_not_protected),
            ("guard_malformed", self.guard_malformed),
            ("guard_passed_enforcer", self.guard_passed_enforcer),
            ("guard_passed_not_new", self.guard_passed_not_new),
            ("guard_dropped_bypass", self.guard_dropped_bypass),
            (
                "guard_dropped_failure_closed",
                self.guard_dropped_failure_closed,
            ),
            ("guard_passed_failure_open", self.guard_passed_failure_open),
            ("guard_dropped_malformed", self.guard_dropped_malformed),
            ("fastpath_sockets_added", self.fastpath_sockets_added),
            ("fastpath_sockets_failed", self.fastpath_sockets_failed),
            ("fastpath_msgs_redirected", self.fastpath_msgs_redirected),
            ("fastpath_msgs_passed", self.fastpath_msgs_passed),
            (
                "fastpath_sockets_unsteered",
                self.fastpath_sockets_unsteered,
            ),
            ("guard_redirected_listener", self.guard_redirected_listener),
            (
                "guard_redirected_established",
                self.guard_redirected_established,
            ),
            ("inpod_seen", self.inpod_seen),
            ("inpod_not_tcp", self.inpod_not_tcp),
            ("inpod_assigned_listener", self.inpod_assigned_listener),
            (
                "inpod_dropped_failure_closed",
                self.inpod_dropped_failure_closed,
            ),
            ("inpod_passed_failure_open", self.inpod_passed_failure_open),
            ("inpod_passed_flow", self.inpod_passed_flow),
            ("inpod_dropped_unjudged", self.inpod_dropped_unjudged),
            ("inpod_dropped_malformed", self.inpod_dropped_malformed),
            ("inpod_dropped_spoofed", self.inpod_dropped_spoofed),
            ("inpod_passed_own_source", self.inpod_passed_own_source),
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn counters_name_every_slot_once() {
        let mut slots = [0_u64; counter::LEN as usize];
        for (slot, value) in slots.iter_mut().enumerate() {
            *value = slot as u64 + 1;
        }
        let counters = Counters::from_slots(&slots);
        let named = counters.named();
        let mut seen = BTreeSet::new();
        for (name, value) in named {
            assert!(seen.insert(value), "{name} repeats a slot");
        }
        assert_eq!(seen.len(), counter::LEN as usize);
        assert_eq!(
            counters.assigned_listener,
            u64::from(counter::ASSIGNED_LISTENER) + 1
        );
        assert_eq!(
            counters.guard_dropped_bypass,
            u64::from(counter::GUARD_DROPPED_BYPASS) + 1
        );
    }
}
