//! Errors of the datapath. Each message says what the operator should check.

use std::{io, path::PathBuf};

use aya::{
    maps::MapError,
    pin::PinError,
    programs::{links::LinkError, ProgramError},
    EbpfError,
};

/// What went wrong putting nodeward's programs into the kernel or keeping them in step.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The data path was already removed (the agent is stopping).
    #[error("the kernel data path was already removed")]
    Stopped,
    /// A setting of [`super::DatapathConfig`] cannot work.
    #[error("datapath setting `{field}` is invalid: {problem}")]
    Config {
        /// The setting's name.
        field: &'static str,
        /// Why it cannot work.
        problem: &'static str,
    },

    /// In-pod steering without `CAP_SYS_ADMIN`: it enters pods' network namespaces.
    #[error(
        "in-pod steering enters each pod's network namespace (setns(2)), which needs \
         CAP_SYS_ADMIN; the agent does not have it (run as root, add SYS_ADMIN to the \
         container's capabilities, or use --steering host)"
    )]
    NoSysAdmin,

    /// The kernel has no TCX (Linux < 6.6), which the datapath needs to pin its attachments.
    #[error(
        "the kernel is {found}; nodeward attaches its TC programs through TCX links, which need \
         Linux >= 6.6"
    )]
    KernelTooOld {
        /// The running kernel's version.
        found: String,
    },

    /// The running kernel's version could not be determined.
    #[error("reading the kernel version (uname) failed: {reason}")]
    KernelVersion {
        /// What aya reported, as text: aya returns an unnameable `impl Error` here.
        reason: String,
    },

    /// The BPF filesystem could not be checked or mounted.
    #[error(
        "the BPF filesystem at {path} is not usable: {source}; mount it (`mount -t bpf bpf \
         {path}`) or run the agent with CAP_SYS_ADMIN so it can"
    )]
    Bpffs {
        /// The mount point.
        path: PathBuf,
        /// What the system reported.
        #[source]
        source: io::Error,
    },

    /// The pin directory is not on a BPF filesystem.
    #[error(
        "the pin directory {path} is not on a BPF filesystem (bpffs); choose one under the bpffs \
         mount point (normally /sys/fs/bpf)"
    )]
    NotBpffs {
        /// The pin directory.
        path: PathBuf,
    },

    /// A file or directory under the pin directory could not be created, read or removed.
    #[error(
        "{operation} {path} failed: {source}; check the BPF filesystem and the agent's rights"
    )]
    PinDir {
        /// What was attempted, e.g. "creating".
        operation: &'static str,
        /// The path.
        path: PathBuf,
        /// What the system reported.
        #[source]
        source: io::Error,
    },

    /// The kernel refused the object as a whole (map creation, BTF, relocations).
    #[error(
        "loading nodeward's eBPF object into the kernel failed: {source}; the agent needs \
         CAP_BPF and CAP_NET_ADMIN (or root) and a kernel with BTF (/sys/kernel/btf/vmlinux)"
    )]
    Load {
        /// What aya reported.
        #[source]
        source: Box<EbpfError>,
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
        source: Box<ProgramError>,
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
        source: Box<ProgramError>,
    },

    /// Attaching a program to an interface failed.
    #[error(
        "TCX attach of `{program}` to {direction} of `{iface}` failed: {source}; is the kernel \
         >= 6.6, do we have CAP_NET_ADMIN, and does `{iface}` still exist (`ip link show {iface}`)?"
    )]
    Attach {
        /// The program's name.
        program: &'static str,
        /// `"ingress"` or `"egress"`.
        direction: &'static str,
        /// The interface.
        iface: String,
        /// What aya reported.
        #[source]
        source: Box<ProgramError>,
    },

    /// A new attachment could not be pinned, so it would not survive a crash of the agent.
    #[error(
        "pinning the attachment of `{program}` at {path} failed: {source}; check that the pin \
         directory is on a BPF filesystem and writable"
    )]
    PinLink {
        /// The program's name.
        program: &'static str,
        /// The pin path.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: Box<PinError>,
    },

    /// A link left pinned by a previous run could not be opened.
    #[error(
        "opening the attachment pinned at {path} failed: {source}; if the agent cannot remove \
         it, `rm {path}` detaches it"
    )]
    OpenLink {
        /// The pin path.
        path: PathBuf,
        /// What aya reported.
        #[source]
        source: Box<LinkError>,
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
        source: Box<MapError>,
    },

    /// An rtnetlink request (interfaces, policy routing, route lookup) failed.
    #[error("{operation} failed: {source}; the agent needs CAP_NET_ADMIN in the node's network namespace")]
    Netlink {
        /// What was attempted, e.g. "adding the rule `fwmark 0x100/0x100 lookup 100`".
        operation: String,
        /// What the kernel answered.
        #[source]
        source: io::Error,
    },

    /// The routing table nodeward was told to use has another default route.
    #[error(
        "routing table {table} already has a default route that is not nodeward's \
         `local 0.0.0.0/0 dev lo` (`ip route show table {table}`); choose a free table for the \
         datapath's route_table setting"
    )]
    RouteTableTaken {
        /// The table.
        table: u32,
    },

    /// An interface named as an uplink does not exist.
    #[error(
        "uplink interface `{iface}` does not exist in the agent's network namespace \
         (`ip link show {iface}`); traffic from other nodes would not be steered"
    )]
    UplinkMissing {
        /// The interface's name.
        iface: String,
    },

    /// Reading the kernel programs' log ring buffer could not be set up.
    #[error("setting up the kernel programs' log reader failed: {source}")]
    Logger {
        /// What aya-log reported.
        #[source]
        source: aya_log::Error,
    },

    /// The thread that forwards the kernel programs' log lines could not be started.
    #[error("starting the kernel log thread failed: {source}; check the agent's thread limits")]
    LogThread {
        /// What the system reported.
        #[source]
        source: io::Error,
    },

    /// A method that attaches programs was called from a thread in another network namespace
    /// than the one the datapath started in (interfaces are resolved per namespace).
    #[error(
        "the datapath started in one network namespace and `{operation}` was called from \
         another; every datapath call must run in the node's network namespace"
    )]
    WrongNamespace {
        /// The method.
        operation: &'static str,
    },

    /// `--cgroup` is not the directory of a cgroup v2 (the fast path's `sock_ops` attaches there).
    #[error(
        "the fast path attaches to a cgroup v2 directory, and {path} is not one ({found}); pass \
         `--cgroup` with the cgroup2 mount (`mount -t cgroup2`; on a hybrid hierarchy often \
         /sys/fs/cgroup/unified) or a directory under it"
    )]
    NotCgroup2 {
        /// The directory given.
        path: PathBuf,
        /// What it is instead.
        found: String,
    },

    /// The kernel refused a fast-path program or attachment.
    #[error(
        "the kernel refused the fast path ({step}): {detail}; it needs BPF_PROG_TYPE_SOCK_OPS \
         with bpf_sock_hash_update and BPF_PROG_TYPE_SK_MSG with bpf_msg_redirect_hash (Linux \
         >= 4.17), bpf_get_netns_cookie in both (Linux >= 5.15), cgroup BPF links (Linux >= \
         5.7) and CAP_BPF/CAP_NET_ADMIN; run with `--fast-path off` where these are missing"
    )]
    FastPath {
        /// What was being done: loading `fastpath_sockops`, attaching to the cgroup, ...
        step: String,
        /// What aya or the system reported, with every cause (the errno is the last one).
        detail: String,
    },

    /// Cleaning up (on shutdown or over leftovers) left some things behind; each is listed.
    #[error("cleaning up the datapath left things behind: {}", .failures.join("; "))]
    Cleanup {
        /// One line per thing that could not be removed, with the reason.
        failures: Vec<String>,
    },
}

impl DatapathError {
    pub(crate) fn map(map: &'static str, operation: &'static str, source: MapError) -> Self {
        Self::Map {
            map,
            operation,
            source: Box::new(source),
        }
    }

    pub(crate) fn fast_path(
        step: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        let mut detail = source.to_string();
        let mut cause = std::error::Error::source(&source);
        while let Some(e) = cause {
            detail.push_str(": ");
            detail.push_str(&e.to_string());
            cause = e.source();
        }
        Self::FastPath {
            step: step.into(),
            detail,
        }
    }

    pub(crate) fn netlink(operation: impl Into<String>, source: io::Error) -> Self {
        Self::Netlink {
            operation: operation.into(),
            source,
        }
    }
}
