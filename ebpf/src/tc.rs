//! `steer`: the TC classifier on the host side of a pod's veth (ingress, i.e. traffic leaving the
//! pod).
//!
//! It judges whether a packet is for a protected endpoint: Ethernet -> IPv4 -> TCP, destination
//! (address, port) looked up in `PROTECTED_ENDPOINTS`. Every packet counts in `COUNTERS`.
//!
//! Verdict today: `TC_ACT_OK` (pass) for every reason code, including protected destinations;
//! steering protected traffic to the enforcer (mark + `bpf_sk_assign`) comes with the datapath
//! work, with its own reason code. The verdict [`verdict_for`] computes is the one returned.
//!
//! Headers are read with `bpf_skb_load_bytes` (`TcContext::load`): the kernel checks every read
//! against the packet's length, including its non-linear part, so a short packet yields an error
//! instead of an out-of-bounds read.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use nodeward_common::{counter, reason, EndpointKey};
use nodeward_ebpf::net::{
    ipv4_header_len, is_first_fragment, ETH_HLEN, ETH_P_IP, ETH_TYPE_OFFSET, IPPROTO_TCP,
    IPV4_DADDR_OFFSET, IPV4_FLAGS_FRAG_OFFSET, IPV4_PROTOCOL_OFFSET, IPV4_VERSION_IHL_OFFSET,
    TCP_DEST_OFFSET,
};

use crate::maps::{count, PROTECTED_ENDPOINTS};

/// A header the classifier needed could not be read: the packet is shorter than its headers
/// claim, or its IPv4 header length is invalid.
struct Malformed;

/// Entry point. A packet whose headers cannot be read gets the documented default: `TC_ACT_OK`
/// with reason [`reason::PASS_MALFORMED`] (the kernel's own stack drops malformed packets;
/// nodeward does not judge them). Counted in `COUNTERS[MALFORMED]`.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn steer(ctx: TcContext) -> i32 {
    match try_steer(&ctx) {
        Ok(verdict) => verdict,
        Err(Malformed) => pass_malformed(),
    }
}

/// The documented default for a packet whose headers cannot be read: counted, then passed.
fn pass_malformed() -> i32 {
    count(counter::MALFORMED);
    verdict_for(reason::PASS_MALFORMED)
}

fn try_steer(ctx: &TcContext) -> Result<i32, Malformed> {
    count(counter::SEEN);
    let reason = classify(ctx)?;
    if let Some(slot) = counter::for_reason(reason) {
        count(slot);
    }
    Ok(verdict_for(reason))
}

/// The TC verdict for a reason code. Every code passes today (see the module doc).
#[expect(
    clippy::match_same_arms,
    reason = "one arm per meaning: steering changes the protected arm only"
)]
fn verdict_for(reason: u32) -> i32 {
    match reason {
        // Steering protected traffic to the enforcer is the datapath work; until then it passes.
        reason::PASS_PROTECTED_NOT_STEERED => TC_ACT_OK,
        // Not protected, not IPv4/TCP, malformed, or a code `classify` does not produce:
        // nodeward has no opinion on the packet.
        _ => TC_ACT_OK,
    }
}

/// Parses the headers and returns the reason code that decides the packet.
#[inline]
fn classify(ctx: &TcContext) -> Result<u32, Malformed> {
    let ether_type = u16::from_be(load::<u16>(ctx, ETH_TYPE_OFFSET)?);
    if ether_type != ETH_P_IP {
        return Ok(reason::PASS_NOT_IPV4_TCP);
    }

    let ip = ETH_HLEN;
    let ip_len =
        ipv4_header_len(load::<u8>(ctx, ip + IPV4_VERSION_IHL_OFFSET)?).ok_or(Malformed)?;
    if load::<u8>(ctx, ip + IPV4_PROTOCOL_OFFSET)? != IPPROTO_TCP {
        return Ok(reason::PASS_NOT_IPV4_TCP);
    }
    if !is_first_fragment(u16::from_be(load::<u16>(ctx, ip + IPV4_FLAGS_FRAG_OFFSET)?)) {
        // Later fragments carry no TCP header; the first fragment was judged.
        return Ok(reason::PASS_NOT_IPV4_TCP);
    }
    let daddr = load::<u32>(ctx, ip + IPV4_DADDR_OFFSET)?;

    let tcp = ip + ip_len;
    let dport = load::<u16>(ctx, tcp + TCP_DEST_OFFSET)?;

    let key = EndpointKey::from_network_order(daddr, dport);
    if PROTECTED_ENDPOINTS.get_ptr(key).is_some() {
        Ok(reason::PASS_PROTECTED_NOT_STEERED)
    } else {
        Ok(reason::PASS_NOT_PROTECTED)
    }
}

/// Reads a `T` (raw, network byte order) at `offset` from the start of the frame.
#[inline]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    ctx.load::<T>(offset).map_err(|_| Malformed)
}
