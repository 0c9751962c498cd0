//! The BPF maps the kernel programs and the agent share, in one table: each map's name and
//! capacity (`max_entries`).
//!
//! The kernel side declares each map as a static named exactly [`MapDef::name`] and sized with
//! [`MapDef::max_entries`] (`nodeward-ebpf`'s `maps.rs`); the agent looks maps up by these names,
//! checks a pinned map's capacity against these numbers before adopting it, and refuses to
//! start when the object lacks a map of [`ALL`]. Every map is pinned by name, so changing a
//! capacity makes the next agent replace the pinned map (its entries are re-written from the
//! agent's state; those of `PROTECTED_ENDPOINTS` are carried over).

use crate::counter;

/// A map as both sides name and size it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapDef {
    /// The map's name in the object and its pin's file name (`<pin_dir>/maps/<name>`).
    pub name: &'static str,
    /// The most entries the map holds.
    pub max_entries: u32,
}

/// Destinations nodeward enforces for: key [`crate::EndpointKey`], value `u32` flags.
pub const PROTECTED_ENDPOINTS: MapDef = MapDef {
    name: "PROTECTED_ENDPOINTS",
    max_entries: 16_384,
};

/// Settings of the programs: one element, [`crate::KernelConfig`].
pub const CONFIG: MapDef = MapDef {
    name: "CONFIG",
    max_entries: 1,
};

/// Per-CPU packet counters: one `u64` per slot of [`counter`].
pub const COUNTERS: MapDef = MapDef {
    name: "COUNTERS",
    max_entries: counter::LEN,
};

/// Sockets of the same-node fast path (sock hash keyed by [`crate::fastpath::SocketKey`]).
pub const FAST_PATH_SOCKETS: MapDef = MapDef {
    name: "FAST_PATH_SOCKETS",
    max_entries: 65_536,
};

/// Flows opened through the TC data path, by their pod-side 4-tuple (LRU hash).
pub const OPENED_FLOWS: MapDef = MapDef {
    name: "OPENED_FLOWS",
    max_entries: 65_536,
};

/// The node's network namespace cookie: one `u64` element.
pub const NODE_NETNS: MapDef = MapDef {
    name: "NODE_NETNS",
    max_entries: 1,
};

/// Addresses each pod owns, by the pod's namespace cookie (key [`crate::podaddr::PodAddressKey`],
/// value `u32` 0): in-pod steering's anti-spoofing.
pub const POD_ADDRESSES: MapDef = MapDef {
    name: "POD_ADDRESSES",
    max_entries: 16_384,
};

/// Every map of the object.
pub const ALL: [MapDef; 7] = [
    POD_ADDRESSES,
    PROTECTED_ENDPOINTS,
    CONFIG,
    COUNTERS,
    FAST_PATH_SOCKETS,
    OPENED_FLOWS,
    NODE_NETNS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_capacities_non_zero() {
        for (i, map) in ALL.iter().enumerate() {
            assert!(map.max_entries > 0, "{}", map.name);
            assert!(
                ALL[i + 1..].iter().all(|other| other.name != map.name),
                "{} is listed twice",
                map.name
            );
        }
    }
}
