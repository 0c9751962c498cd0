//! Slots of the `COUNTERS` per-CPU array (`u64` packet counts per slot).
//!
//! Stable indices, like the reason codes: a slot's meaning never changes and a retired slot stays
//! reserved. The agent sums each slot over all CPUs.

use crate::reason;

/// Every packet the classifier ran on.
pub const SEEN: u32 = 0;
/// Packets passed with [`reason::PASS_NOT_IPV4_TCP`].
pub const NOT_IPV4_TCP: u32 = 1;
/// Packets passed with [`reason::PASS_NOT_PROTECTED`].
pub const NOT_PROTECTED: u32 = 2;
/// Packets to a protected destination ([`reason::PASS_PROTECTED_NOT_STEERED`] today).
pub const PROTECTED: u32 = 3;
/// Packets passed with [`reason::PASS_MALFORMED`].
pub const MALFORMED: u32 = 4;

/// Number of slots: the `max_entries` of `COUNTERS`.
pub const LEN: u32 = 5;

/// The slot that counts packets decided with `reason`, or `None` for a code with no slot.
#[must_use]
pub const fn for_reason(reason: u32) -> Option<u32> {
    match reason {
        reason::PASS_NOT_PROTECTED => Some(NOT_PROTECTED),
        reason::PASS_NOT_IPV4_TCP => Some(NOT_IPV4_TCP),
        reason::PASS_PROTECTED_NOT_STEERED => Some(PROTECTED),
        reason::PASS_MALFORMED => Some(MALFORMED),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_slot_below_len() {
        let mut used = [false; LEN as usize];
        used[SEEN as usize] = true;
        for code in 0..reason::COUNT {
            let slot = for_reason(code).expect("every reason code in use has a slot");
            assert!(slot < LEN);
            assert!(!used[slot as usize], "slot {slot} shared by two meanings");
            used[slot as usize] = true;
        }
        assert!(used.iter().all(|u| *u), "a slot below LEN has no meaning");
    }
}
