//! Maps shared between the kernel programs and the agent.
//!
//! Map names are the static names below; the agent looks them up by these names
//! (`agent/src/datapath`), so renaming one is a change on both sides. Every map is pinned by name
//! (`PinningType::ByName`) under the agent's pin directory (`<pin_dir>/maps/<NAME>`), so a
//! restarted agent adopts the same maps and the programs left attached by a crashed one keep
//! reading the same state.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use nodeward_common::{
    config::{FAILURE_MODE_CLOSED, LOG_OFF},
    counter, EndpointKey, KernelConfig, PORT_ANY,
};

/// Destinations nodeward enforces for.
///
/// - Written by: the agent (`Datapath::sync`), from its workload registry and compiled policies.
/// - Read by: `steer` and `guard`, on every IPv4/TCP packet: (address, port), then (address,
///   [`PORT_ANY`]).
/// - Key: [`EndpointKey`], destination IPv4 address and TCP port, network byte order; port
///   [`PORT_ANY`] (0) protects every port of the address.
/// - Value: `u32` endpoint flags, [`nodeward_common::ENDPOINT_FLAGS_NONE`] today; the programs
///   test only the key's presence.
#[map]
pub static PROTECTED_ENDPOINTS: HashMap<EndpointKey, u32> = HashMap::pinned(16_384, 0);

/// Settings of the programs: one element, index 0.
///
/// - Written by: the agent, when it starts (`Datapath::start`) and when the log level changes
///   (`Datapath::set_log_level`).
/// - Read by: `steer` and `guard`, for packets to protected endpoints (listener port, marks,
///   failure mode) and before logging.
/// - Key: `u32` index 0.
/// - Value: [`KernelConfig`].
#[map]
pub static CONFIG: Array<KernelConfig> = Array::pinned(1, 0);

/// Packet counters, one `u64` per slot and CPU.
///
/// - Written by: `steer` and `guard` (each increments its own CPU's slot; no atomics needed).
/// - Read by: the agent (`Datapath::counters`), which sums the CPUs.
/// - Key: slot index, the constants in [`nodeward_common::counter`].
/// - Value: `u64` number of packets.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);

/// What the programs do when `CONFIG` cannot be read (never for an array with one element, but the
/// lookup is fallible): no listener port, no marks, fail closed, no logs. A packet to a protected
/// endpoint is then dropped, never passed unjudged.
const UNCONFIGURED: KernelConfig = KernelConfig::new(0, 0, 0, FAILURE_MODE_CLOSED, LOG_OFF);

/// The current settings (a copy: the agent may rewrite the element at any time).
#[inline]
pub fn config() -> KernelConfig {
    CONFIG.get(0).copied().unwrap_or(UNCONFIGURED)
}

/// Whether traffic to (`addr`, `port`), both in network byte order, is protected: that exact
/// endpoint, or every port of `addr`.
#[inline]
pub fn is_protected(addr: u32, port: u16) -> bool {
    PROTECTED_ENDPOINTS
        .get_ptr(EndpointKey::from_network_order(addr, port))
        .is_some()
        || is_protected_on_every_port(addr)
}

/// Whether every port of `addr` (network byte order) is protected.
#[inline]
pub fn is_protected_on_every_port(addr: u32) -> bool {
    PROTECTED_ENDPOINTS
        .get_ptr(EndpointKey::from_network_order(addr, PORT_ANY))
        .is_some()
}

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
