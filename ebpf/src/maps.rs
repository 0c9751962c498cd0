//! Maps shared between the kernel programs and the agent.
//!
//! Each static is named and sized as its entry in [`nodeward_common::maps`], the table the agent
//! reads too: a static's name must be that entry's `name` (the agent refuses an object that
//! lacks one), and its capacity is that entry's `max_entries`. Every map is pinned by name
//! (`PinningType::ByName`) under the agent's pin directory (`<pin_dir>/maps/<NAME>`), so a
//! restarted agent adopts the same maps and the programs left attached by a crashed one keep
//! reading the same state.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
};
use nodeward_common::{
    config::{FAILURE_MODE_CLOSED, LOG_OFF},
    fastpath::SocketKey,
    maps as table,
    podaddr::PodAddressKey,
    EndpointKey, KernelConfig, PORT_ANY,
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
pub static PROTECTED_ENDPOINTS: HashMap<EndpointKey, u32> =
    HashMap::pinned(table::PROTECTED_ENDPOINTS.max_entries, 0);

/// Addresses each pod owns (in-pod steering's anti-spoofing).
///
/// - Written by: the agent (`Datapath::sync_pods`), from the addresses it finds in every pod's
///   namespace at each sync.
/// - Read by: `inpod_egress`, on every IP packet leaving a pod: the pod's namespace cookie and
///   the packet's source address.
/// - Key: [`PodAddressKey`]. Value: `u32` 0.
#[map]
pub static POD_ADDRESSES: HashMap<PodAddressKey, u32> =
    HashMap::pinned(table::POD_ADDRESSES.max_entries, 0);

/// Settings of the programs: one element, index 0.
///
/// - Written by: the agent, when it starts (`Datapath::start`) and when the log level changes
///   (`Datapath::set_log_level`).
/// - Read by: `steer` and `guard`, for packets to protected endpoints (listener port, marks,
///   failure mode) and before logging.
/// - Key: `u32` index 0.
/// - Value: [`KernelConfig`].
#[map]
pub static CONFIG: Array<KernelConfig> = Array::pinned(table::CONFIG.max_entries, 0);

/// Packet counters, one `u64` per slot and CPU.
///
/// - Written by: `steer` and `guard` (each increments its own CPU's slot; no atomics needed).
/// - Read by: the agent (`Datapath::counters`), which sums the CPUs.
/// - Key: slot index, the constants in [`nodeward_common::counter`].
/// - Value: `u64` number of packets.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(table::COUNTERS.max_entries, 0);

/// Sockets of the same-node fast path.
///
/// - Written by: `fastpath_sockops`, when a connection of a socket in the agent's cgroup whose
///   local or remote endpoint is protected is established (`BPF_NOEXIST`: the first socket with a
///   key keeps it). The kernel removes a socket when it closes. The agent never writes it.
/// - Read by: `fastpath_msg` (attached to this map), which redirects each message to the peer.
/// - Key: [`SocketKey`], the socket's own 4-tuple and side (node namespace or pod).
/// - Value: the socket (the kernel's reference; `u32` in user space).
#[map]
pub static FAST_PATH_SOCKETS: SockHash<SocketKey> =
    SockHash::pinned(table::FAST_PATH_SOCKETS.max_entries, 0);

/// Connections that opened through the TC data path, by the 4-tuple their pod-side end has: what
/// binds a pod's socket in `FAST_PATH_SOCKETS` to a flow the node's routing delivered.
///
/// - Written by: `steer` (a SYN assigned to the enforcer's listener: the client's end, local =
///   source) and `guard` (the enforcer's upstream SYN into a pod: the pod's end, local =
///   destination), only while the fast path is on (`NODE_NETNS` set).
/// - Read by: `fastpath_sockops`, which lets a pod's socket in only when its key is here, and
///   removes the entry (one socket per opened flow). LRU: entries of flows that never completed
///   age out.
/// - Key: [`SocketKey`] of the pod-side socket, side [`SIDE_POD`](nodeward_common::fastpath::SIDE_POD).
/// - Value: `u32`, 0.
#[map]
pub static OPENED_FLOWS: LruHashMap<SocketKey, u32> =
    LruHashMap::pinned(table::OPENED_FLOWS.max_entries, 0);

/// Records that a connection whose pod-side end is (`local`, `remote`) (network byte order)
/// opened through the TC data path; nothing while the fast path is off.
#[inline]
pub fn record_opened(local_addr: u32, local_port: u16, remote_addr: u32, remote_port: u16) {
    if node_netns_cookie().is_none() {
        return;
    }
    let key = SocketKey {
        local_addr,
        remote_addr,
        local_port,
        remote_port,
        side: nodeward_common::fastpath::SIDE_POD,
    };
    // A full LRU evicts its oldest entry; a failure only keeps that socket on TCP.
    let _ = OPENED_FLOWS.insert(key, 0, 0);
}

/// The network namespace of the node (the enforcer's): one element, index 0.
///
/// - Written by: the agent when it starts with the fast path on (its own `SO_NETNS_COOKIE`).
/// - Read by: `fastpath_sockops` and `fastpath_msg`, to tell the enforcer's sockets from pods'.
/// - Key: `u32` index 0.
/// - Value: `u64` network namespace cookie; 0 (unset) keeps every socket out of the fast path.
#[map]
pub static NODE_NETNS: Array<u64> = Array::pinned(table::NODE_NETNS.max_entries, 0);

/// The node's network namespace cookie, or `None` while the agent has not written it.
#[inline]
pub fn node_netns_cookie() -> Option<u64> {
    NODE_NETNS.get(0).copied().filter(|cookie| *cookie != 0)
}

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
