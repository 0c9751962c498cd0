//! The datapath loader: puts nodeward's kernel programs into the kernel and talks to their maps.
//!
//! The eBPF object is built by `agent/build.rs` from the `nodeward-ebpf` crate and embedded in the
//! agent binary, so the agent and its kernel programs always come from the same sources.
//!
//! What is there today (see `ebpf/src/tc.rs`):
//! - the TC classifier [`TC_PROGRAM`] (`steer`), attached to the ingress of an interface (the host
//!   side of a pod's veth) with [`attach_tc`]. It judges whether a packet goes to a protected
//!   endpoint and counts it; it passes every packet (steering comes with the datapath work);
//! - the map [`PROTECTED_ENDPOINTS_MAP`], written with [`protect`] / [`unprotect`];
//! - the per-CPU map [`COUNTERS_MAP`], read with [`read_counters`].
//!
//! Loading and attaching need `CAP_BPF` and `CAP_NET_ADMIN` (or root). The returned [`Ebpf`]
//! owns the programs, maps and attachments: dropping it detaches and unloads everything.

use std::{io, net::SocketAddrV4};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{
        tc::{self, SchedClassifierLinkId, TcError},
        ProgramError, SchedClassifier, TcAttachType,
    },
    sys::SyscallError,
    util::KernelVersion,
    Ebpf, EbpfError,
};
use nodeward_common::{counter, EndpointKey, ENDPOINT_FLAGS_NONE};

/// The eBPF object built by `build.rs` (`nodeward-ebpf`'s binary target of the same name).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeward-ebpf"));

/// Name of the TC classifier in the object.
pub const TC_PROGRAM: &str = "steer";
/// Name of the protected-endpoints map: key [`EndpointKey`], value `u32` flags.
pub const PROTECTED_ENDPOINTS_MAP: &str = "PROTECTED_ENDPOINTS";
/// Name of the per-CPU counters map: index [`nodeward_common::counter`], value `u64`.
pub const COUNTERS_MAP: &str = "COUNTERS";

/// Errors of the datapath loader. Each message says what the operator should check.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The kernel refused the object as a whole (map creation, BTF, relocations).
    #[error(
        "loading nodeward's eBPF object into the kernel failed: {source}; the agent needs \
         CAP_BPF and CAP_NET_ADMIN (or root) and a kernel with BTF (/sys/kernel/btf/vmlinux)"
    )]
    Load {
        /// What aya reported.
        #[source]
        source: EbpfError,
    },

    /// The embedded object lacks a program or map this agent expects: the agent was built from
    /// sources where `ebpf/` and `agent/` disagree.
    #[error(
        "the embedded eBPF object has no {kind} `{name}`; the agent and its eBPF object \
         disagree, rebuild the agent from one source tree"
    )]
    Missing {
        /// `"program"` or `"map"`.
        kind: &'static str,
        /// The name looked up.
        name: &'static str,
    },

    /// A program of the object has another type than this agent expects.
    #[error(
        "program `{name}` in the embedded eBPF object is not a TC classifier: {source}; \
         rebuild the agent from one source tree"
    )]
    ProgramType {
        /// The program's name.
        name: &'static str,
        /// What aya reported.
        #[source]
        source: ProgramError,
    },

    /// The verifier (or the kernel's permission check) rejected a program.
    #[error(
        "the kernel refused to load program `{name}`: {source}; with EPERM the agent lacks \
         CAP_BPF/CAP_NET_ADMIN, otherwise the verifier output in this message says which \
         instruction it rejected (a bug in nodeward-ebpf, or a kernel too old for it)"
    )]
    Verify {
        /// The program's name.
        name: &'static str,
        /// What aya reported, with the verifier log.
        #[source]
        source: ProgramError,
    },

    /// Attaching the TC classifier to an interface failed.
    #[error(
        "attaching `{program}` to the ingress of interface `{iface}` failed: {source}; check \
         that `{iface}` exists in the agent's network namespace (`ip link show {iface}`) and that \
         no other TC program there refuses to share the hook"
    )]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The interface.
        iface: String,
        /// What aya reported.
        #[source]
        source: ProgramError,
    },

    /// Preparing a legacy (pre-6.6, netlink) TC attachment failed: the `clsact` qdisc could not
    /// be added.
    #[error(
        "adding the clsact qdisc to interface `{iface}` failed: {source}; this kernel has no TCX \
         (Linux < 6.6), so TC programs need clsact: check `tc qdisc show dev {iface}`"
    )]
    Clsact {
        /// The interface.
        iface: String,
        /// What aya reported.
        #[source]
        source: TcError,
    },

    /// The running kernel's version could not be determined (to choose TCX or netlink).
    #[error("reading the kernel version (uname) failed: {reason}; cannot choose how to attach TC")]
    KernelVersion {
        /// What aya reported, as text: aya returns an unnameable `impl Error` here.
        reason: String,
    },

    /// A map operation failed.
    #[error("{operation} on map `{map}` failed: {source}; the agent needs CAP_BPF (or root)")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was attempted, e.g. "insert".
        operation: &'static str,
        /// What aya reported.
        #[source]
        source: MapError,
    },
}

/// Packet counts summed over all CPUs, one field per [`nodeward_common::counter`] slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets the classifier ran on.
    pub seen: u64,
    /// Packets not judged: not IPv4/TCP, or a later IPv4 fragment.
    pub not_ipv4_tcp: u64,
    /// IPv4/TCP packets to destinations that are not protected.
    pub not_protected: u64,
    /// Packets to protected destinations.
    pub protected: u64,
    /// Packets whose headers could not be read.
    pub malformed: u64,
}

/// Loads the embedded object into the kernel: creates its maps and loads (verifies) the TC
/// classifier, without attaching it anywhere.
pub fn load() -> Result<Ebpf, DatapathError> {
    let mut ebpf = Ebpf::load(OBJECT).map_err(|source| DatapathError::Load { source })?;
    classifier(&mut ebpf)?
        .load()
        .map_err(|source| DatapathError::Verify {
            name: TC_PROGRAM,
            source,
        })?;
    Ok(ebpf)
}

/// Attaches the TC classifier to the ingress of `iface` (in the caller's network namespace).
///
/// On Linux >= 6.6 the attachment is a TCX link: no qdisc is created and `tc filter show` does
/// not list it (nor does bpftool 7.1); `SchedClassifier::query_tcx` does. On older kernels the
/// `clsact` qdisc is added if missing and the program is attached through netlink. The attachment lives as long as
/// `ebpf`; the returned id detaches it earlier through aya.
pub fn attach_tc(ebpf: &mut Ebpf, iface: &str) -> Result<SchedClassifierLinkId, DatapathError> {
    let kernel = KernelVersion::current().map_err(|e| DatapathError::KernelVersion {
        reason: e.to_string(),
    })?;
    if kernel < KernelVersion::new(6, 6, 0) {
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => {}
            // EEXIST: the qdisc is already there, from us or from another TC user.
            Err(TcError::NetlinkError(e))
                if e.raw_os_error()
                    .map(io::Error::from_raw_os_error)
                    .map(|e| e.kind())
                    == Some(io::ErrorKind::AlreadyExists) => {}
            Err(source) => {
                return Err(DatapathError::Clsact {
                    iface: iface.to_owned(),
                    source,
                })
            }
        }
    }
    classifier(ebpf)?
        .attach(iface, TcAttachType::Ingress)
        .map_err(|source| DatapathError::Attach {
            program: TC_PROGRAM,
            iface: iface.to_owned(),
            source,
        })
}

/// Marks `endpoint` (destination address and TCP port) as protected: the classifier will judge
/// traffic to it. Replaces an existing entry.
pub fn protect(ebpf: &mut Ebpf, endpoint: SocketAddrV4) -> Result<(), DatapathError> {
    protected_endpoints_mut(ebpf)?
        .insert(key(endpoint), ENDPOINT_FLAGS_NONE, 0)
        .map_err(|source| map_error(PROTECTED_ENDPOINTS_MAP, "insert", source))
}

/// Removes `endpoint` from the protected endpoints. Returns whether it was there.
pub fn unprotect(ebpf: &mut Ebpf, endpoint: SocketAddrV4) -> Result<bool, DatapathError> {
    match protected_endpoints_mut(ebpf)?.remove(&key(endpoint)) {
        Ok(()) => Ok(true),
        Err(MapError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(false)
        }
        Err(source) => Err(map_error(PROTECTED_ENDPOINTS_MAP, "remove", source)),
    }
}

/// The endpoints currently marked as protected, in the map's (unspecified) order.
pub fn protected_endpoints(ebpf: &Ebpf) -> Result<Vec<SocketAddrV4>, DatapathError> {
    let map = ebpf
        .map(PROTECTED_ENDPOINTS_MAP)
        .ok_or(DatapathError::Missing {
            kind: "map",
            name: PROTECTED_ENDPOINTS_MAP,
        })?;
    let map: HashMap<&MapData, EndpointKey, u32> = HashMap::try_from(map)
        .map_err(|source| map_error(PROTECTED_ENDPOINTS_MAP, "open", source))?;
    map.keys()
        .map(|key| {
            key.map(|key| SocketAddrV4::new(key.ip(), key.port()))
                .map_err(|source| map_error(PROTECTED_ENDPOINTS_MAP, "iterate", source))
        })
        .collect()
}

/// Reads the packet counters, summed over all CPUs.
pub fn read_counters(ebpf: &Ebpf) -> Result<Counters, DatapathError> {
    let map = ebpf.map(COUNTERS_MAP).ok_or(DatapathError::Missing {
        kind: "map",
        name: COUNTERS_MAP,
    })?;
    let map: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(map).map_err(|source| map_error(COUNTERS_MAP, "open", source))?;
    let read = |slot: u32| -> Result<u64, DatapathError> {
        let per_cpu = map
            .get(&slot, 0)
            .map_err(|source| map_error(COUNTERS_MAP, "read", source))?;
        Ok(per_cpu.iter().copied().fold(0, u64::wrapping_add))
    };
    Ok(Counters {
        seen: read(counter::SEEN)?,
        not_ipv4_tcp: read(counter::NOT_IPV4_TCP)?,
        not_protected: read(counter::NOT_PROTECTED)?,
        protected: read(counter::PROTECTED)?,
        malformed: read(counter::MALFORMED)?,
    })
}

/// The TC classifier of the object.
fn classifier(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    ebpf.program_mut(TC_PROGRAM)
        .ok_or(DatapathError::Missing {
            kind: "program",
            name: TC_PROGRAM,
        })?
        .try_into()
        .map_err(|source| DatapathError::ProgramType {
            name: TC_PROGRAM,
            source,
        })
}

/// The protected-endpoints map, writable.
fn protected_endpoints_mut(
    ebpf: &mut Ebpf,
) -> Result<HashMap<&mut MapData, EndpointKey, u32>, DatapathError> {
    let map = ebpf
        .map_mut(PROTECTED_ENDPOINTS_MAP)
        .ok_or(DatapathError::Missing {
            kind: "map",
            name: PROTECTED_ENDPOINTS_MAP,
        })?;
    HashMap::try_from(map).map_err(|source| map_error(PROTECTED_ENDPOINTS_MAP, "open", source))
}

fn key(endpoint: SocketAddrV4) -> EndpointKey {
    EndpointKey::from_ipv4(*endpoint.ip(), endpoint.port())
}

fn map_error(map: &'static str, operation: &'static str, source: MapError) -> DatapathError {
    DatapathError::Map {
        map,
        operation,
        source,
    }
}
