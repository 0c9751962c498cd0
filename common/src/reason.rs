//! Reason codes: why a kernel program returned the verdict it returned.
//!
//! Stable numbers: a code's meaning never changes, and a retired code stays reserved (listed here
//! as such) so that counters, logs and dashboards from older agents keep meaning what they meant.
//! Each code belongs to one program (`steer` on TC ingress, `guard` on TC egress of a protected
//! pod's host-side interface) and comes with one verdict, given with the code:
//!
//! - *no opinion*: `TC_ACT_UNSPEC` (TCX: go on with the next program on the hook; at the end of
//!   the chain the packet passes). Packets nodeward does not judge are left to whatever else is
//!   attached, untouched.
//! - *steered*: `TC_ACT_OK`, after `skb->mark |= steer_mark` and `bpf_sk_assign` (ends the TCX
//!   chain: no later program may send the packet elsewhere).
//! - *dropped*: `TC_ACT_SHOT`.
//! - *redirected to the node*: `TC_ACT_REDIRECT` after `bpf_redirect(lo, BPF_F_INGRESS)`: `guard`
//!   hands a node-originated packet to the node's loopback ingress, where `steer` steers it.

/// `steer`, no opinion: IPv4/TCP, but the destination (address, port) and (address, any port)
/// are not in `PROTECTED_ENDPOINTS`. Costs one or two hash lookups.
pub const PASS_NOT_PROTECTED: u32 = 0;

/// `steer`, no opinion: not something the programs judge (not IPv4, not TCP, or a non-first IP
/// fragment, which carries no TCP header).
pub const PASS_NOT_IPV4_TCP: u32 = 1;

/// Retired (reserved): protected destination passed because the classifier did not steer yet.
/// Replaced by the steering codes below.
pub const PASS_PROTECTED_NOT_STEERED: u32 = 2;

/// `steer`, no opinion: the headers could not be read (a frame cut short, an IPv4 header length
/// below 20 bytes) and the destination is not known to be protected. Malformed packets are for the
/// kernel's stack to drop; nodeward counts them.
pub const PASS_MALFORMED: u32 = 3;

/// `steer`, steered: a new flow (SYN without ACK) to a protected endpoint, assigned to the
/// enforcer's transparent listener.
pub const STEER_LISTENER: u32 = 4;

/// `steer`, steered: a packet of a flow the enforcer already holds (its socket for this 4-tuple
/// exists in the node's namespace), assigned to that socket.
pub const STEER_ESTABLISHED: u32 = 5;

/// `steer`, dropped: a new flow to a protected endpoint while the enforcer's listener is missing
/// (or could not be assigned), with `failure_mode` closed.
pub const DROP_NO_LISTENER: u32 = 6;

/// `steer`, no opinion: a new flow to a protected endpoint while the enforcer's listener is
/// missing, with `failure_mode` open: it goes straight to the pod.
pub const PASS_NO_LISTENER: u32 = 7;

/// `steer`, no opinion: a packet to a protected endpoint that is not a new flow (no SYN, or
/// SYN+ACK) and belongs to no enforcer socket: a reply to a connection the pod opened itself (the
/// pod is protected on every port). It goes to the pod, whose stack answers a stray one with RST;
/// a connection into the pod can only start with a SYN, and every SYN is steered.
pub const PASS_NOT_NEW: u32 = 8;

/// `steer`, dropped: the destination is protected but the TCP header is cut short (the flags are
/// not in this packet: a tiny first fragment, or garbage). Dropped in both failure modes: no
/// legitimate client sends it, and passing it would let a fragmented SYN reach the pod unjudged.
pub const DROP_MALFORMED_PROTECTED: u32 = 9;

/// `guard`, no opinion: a packet to a protected pod carrying the enforcer's `upstream_mark`: the
/// enforcer's own upstream connection.
pub const GUARD_PASS_ENFORCER: u32 = 10;

/// `guard`, dropped: a new flow to a protected pod without the upstream mark while the enforcer is
/// up, forwarded from an interface `steer` is not attached to (an unregistered path, a veth
/// created since the last rescan): a bypass attempt. Also a packet the node sent that `guard`
/// would redirect to `lo` ([`GUARD_REDIRECT_LISTENER`], [`GUARD_REDIRECT_ESTABLISHED`]) when
/// `bpf_redirect` refuses. (Before code 19, the node's own new flows got this code too.)
pub const GUARD_DROP_BYPASS: u32 = 11;

/// `guard`, dropped: a new flow to a protected pod without the upstream mark while the enforcer's
/// listener is missing, with `failure_mode` closed.
pub const GUARD_DROP_NO_LISTENER: u32 = 12;

/// `guard`, no opinion: as [`GUARD_DROP_NO_LISTENER`] with `failure_mode` open.
pub const GUARD_PASS_NO_LISTENER: u32 = 13;

/// `guard`, no opinion: a packet to a protected pod that is not a new flow (see
/// [`PASS_NOT_NEW`]).
pub const GUARD_PASS_NOT_NEW: u32 = 14;

/// `guard`, no opinion: the destination is not protected.
pub const GUARD_PASS_NOT_PROTECTED: u32 = 15;

/// `guard`, no opinion: not IPv4/TCP, or a non-first fragment.
pub const GUARD_PASS_NOT_IPV4_TCP: u32 = 16;

/// `guard`, no opinion: headers unreadable, destination not known to be protected.
pub const GUARD_PASS_MALFORMED: u32 = 17;

/// `guard`, dropped: as [`DROP_MALFORMED_PROTECTED`], on the way into the pod.
pub const GUARD_DROP_MALFORMED_PROTECTED: u32 = 18;

/// `guard`, redirected to the node: a new flow (SYN) to a protected pod without the upstream mark,
/// sent by the node itself (a host process, a host-network pod, the kubelet's probes: `skb->sk`
/// is a local socket), while the enforcer's listener exists. It never crossed `steer`, so it goes
/// to the node's loopback ingress, where `steer` (attached to `lo`) assigns it to the enforcer
/// like any other new flow.
pub const GUARD_REDIRECT_LISTENER: u32 = 19;

/// `guard`, redirected to the node: a packet the node sent, of a flow the enforcer holds (its
/// socket for the 4-tuple, not listening and not in TIME-WAIT), without the upstream mark: the rest of a flow
/// [`GUARD_REDIRECT_LISTENER`] sent to the enforcer. `steer` on `lo` assigns it to that socket.
pub const GUARD_REDIRECT_ESTABLISHED: u32 = 20;

/// `inpod` (TC ingress on a protected pod's own interfaces, inside the pod's namespace), no
/// opinion: not TCP (ARP, ICMP, neighbour discovery, UDP), or a later IPv4 fragment.
pub const INPOD_PASS_NOT_TCP: u32 = 21;

/// `inpod`, steered: a new flow (SYN without ACK) into the pod, assigned to the enforcer's
/// listener in the pod's namespace (a socket carrying `inpod_mark`). Ends the chain.
pub const INPOD_STEER_LISTENER: u32 = 22;

/// `inpod`, dropped: a new flow into the pod while the enforcer's listener in the pod is missing
/// (the agent is down) or could not be assigned, with `failure_mode` closed.
pub const INPOD_DROP_NO_LISTENER: u32 = 23;

/// `inpod`, no opinion: as [`INPOD_DROP_NO_LISTENER`] with `failure_mode` open: the pod's own
/// socket gets it.
pub const INPOD_PASS_NO_LISTENER: u32 = 24;

/// `inpod`, no opinion: a segment that is not a new flow, of a flow the enforcer holds (its
/// socket carries `inpod_mark`), of the pod's own outgoing connection (a reply), or of no
/// connection at all (the pod's stack answers RST).
pub const INPOD_PASS_FLOW: u32 = 25;

/// `inpod`, dropped: a segment of an inbound connection the pod's own application holds and the
/// enforcer never judged: it was opened before the pod was protected (before the agent started,
/// while it was down with `failure_mode` open, or before a policy selected the pod). Never
/// delivered; the connection stalls and the client opens a new one, which is judged. With
/// `failure_mode` open such segments pass ([`INPOD_PASS_FLOW`]) only while the enforcer's
/// listener is missing (no agent runs).
pub const INPOD_DROP_UNJUDGED: u32 = 26;

/// `inpod`, dropped: TCP into the pod that cannot be judged: the TCP header is cut short, or an
/// IPv6 packet carries extension headers before its payload (it may hide a SYN).
pub const INPOD_DROP_MALFORMED: u32 = 27;

/// `inpod_egress` (TC egress on a pod's interfaces, inside its namespace), dropped: the source
/// address is not one the pod owns (`POD_ADDRESSES`): a pod posing as another, whose identity
/// the enforcer would take from the address. IPv6 link-local and unspecified sources are exempt.
pub const INPOD_DROP_SPOOFED: u32 = 28;

/// `inpod_egress`, no opinion: the source is the pod's own address, exempt, or not IP (ARP).
pub const INPOD_PASS_OWN_SOURCE: u32 = 29;

/// One past the highest code in use.
pub const COUNT: u32 = 30;

/// The verdict a code comes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `TC_ACT_UNSPEC`: nodeward has no opinion; the next program on the hook decides, and at the
    /// end of the chain the packet passes.
    NoOpinion,
    /// `TC_ACT_OK`: steered to the enforcer; ends the chain.
    Steered,
    /// `TC_ACT_SHOT`.
    Dropped,
    /// `TC_ACT_REDIRECT`: the program called `bpf_redirect` to the node's loopback ingress.
    RedirectedToNode,
}

/// The verdict of `reason`, or `None` for a retired or unknown code.
#[must_use]
pub const fn verdict(reason: u32) -> Option<Verdict> {
    match reason {
        PASS_NOT_PROTECTED
        | PASS_NOT_IPV4_TCP
        | PASS_MALFORMED
        | PASS_NO_LISTENER
        | PASS_NOT_NEW
        | GUARD_PASS_ENFORCER
        | GUARD_PASS_NO_LISTENER
        | GUARD_PASS_NOT_NEW
        | GUARD_PASS_NOT_PROTECTED
        | GUARD_PASS_NOT_IPV4_TCP
        | GUARD_PASS_MALFORMED
        | INPOD_PASS_NOT_TCP
        | INPOD_PASS_NO_LISTENER
        | INPOD_PASS_FLOW
        | INPOD_PASS_OWN_SOURCE => Some(Verdict::NoOpinion),
        STEER_LISTENER | STEER_ESTABLISHED | INPOD_STEER_LISTENER => Some(Verdict::Steered),
        DROP_NO_LISTENER
        | DROP_MALFORMED_PROTECTED
        | GUARD_DROP_BYPASS
        | GUARD_DROP_NO_LISTENER
        | GUARD_DROP_MALFORMED_PROTECTED
        | INPOD_DROP_NO_LISTENER
        | INPOD_DROP_UNJUDGED
        | INPOD_DROP_MALFORMED
        | INPOD_DROP_SPOOFED => Some(Verdict::Dropped),
        GUARD_REDIRECT_LISTENER | GUARD_REDIRECT_ESTABLISHED => Some(Verdict::RedirectedToNode),
        _ => None,
    }
}

/// Codes retired from use; their numbers are never given another meaning.
pub const RETIRED: [u32; 1] = [PASS_PROTECTED_NOT_STEERED];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_in_use_has_a_verdict_and_retired_ones_have_none() {
        for code in 0..COUNT {
            assert_eq!(
                verdict(code).is_none(),
                RETIRED.contains(&code),
                "code {code}"
            );
        }
        assert_eq!(verdict(COUNT), None);
    }
}
