//! Maps shared between the kernel programs and the agent.
//!
//! Map names are the static names below; the agent looks them up by these names
//! (`agent/src/datapath`), so renaming one is a change on both sides.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use nodeward_common::{counter, EndpointKey};

/// Destinations nodeward enforces for.
///
/// - Written by: the agent (`datapath::protect` / `unprotect`), from its state store.
/// - Read by: the `steer` TC classifier, on every IPv4/TCP packet.
/// - Key: [`EndpointKey`], destination IPv4 address and TCP port, network byte order.
/// - Value: `u32` endpoint flags, [`nodeward_common::ENDPOINT_FLAGS_NONE`] today; the classifier
///   tests only the key's presence.
#[map]
pub static PROTECTED_ENDPOINTS: HashMap<EndpointKey, u32> = HashMap::with_max_entries(4096, 0);

/// Packet counters, one `u64` per slot and CPU.
///
/// - Written by: the `steer` TC classifier (increments its own CPU's slot; no atomics needed).
/// - Read by: the agent (`datapath::read_counters`), which sums the CPUs.
/// - Key: slot index, the constants in [`nodeward_common::counter`].
/// - Value: `u64` number of packets.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Adds one to this CPU's counter `slot`. An index past `counter::LEN` is a bug, and the kernel's
/// bounds check makes it a no-op rather than a fault.
#[inline]
pub fn count(slot: u32) {
    if let Some(value) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a successful lookup in a per-CPU array, whose
        // elements live as long as the map; programs on this CPU do not run concurrently
        // with each other, so nothing else writes this slot meanwhile.
        unsafe { *value += 1 };
    }
}
