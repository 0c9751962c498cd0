//! The datapath: nodeward's kernel programs in the node's network namespace, kept in step with
//! the workload registry and policies.
//!
//! What it sets up ([`Datapath::start`]), all in the network namespace of the calling thread (the
//! node's):
//! - the eBPF object embedded by `agent/build.rs` (`ebpf/`), its maps pinned under
//!   [`DatapathConfig::pin_dir`] (adopted when a previous run left them);
//! - `CONFIG`: listener port, marks, failure mode, log level;
//! - policy routing: `ip rule add fwmark <steer_mark>/<steer_mark> lookup <table> pref <prio>`
//!   and `ip route add local 0.0.0.0/0 dev lo table <table>`, so packets `steer` marked are
//!   delivered to the node's stack, where `bpf_sk_assign` put their socket (the enforcer's);
//! - `steer` on the TC ingress of every interface (pods' host-side veths, uplinks, and `lo`,
//!   where `guard` redirects the node's own flows into protected pods), each attachment a pinned
//!   TCX link;
//! - with [`DatapathConfig::fast_path`], the same-node fast path: `fastpath_sockops` on that
//!   cgroup v2 (a pinned cgroup link) and `fastpath_msg` on the `FAST_PATH_SOCKETS` sock hash
//!   (see `fastpath.rs`); without it, none of that stays attached, also from a previous run.
//!
//! What it keeps in step ([`Datapath::sync`], [`Datapath::rescan_interfaces`]): the
//! `PROTECTED_ENDPOINTS` map, `guard` on the TC egress of every protected local pod's host-side
//! interface, `steer` on interfaces that appear, and the removal of attachments whose interface
//! left.
//!
//! With [`Steering::InPod`] (the default) there is no policy routing and no `steer`/`guard`:
//! [`Datapath::sync_pods`] attaches `inpod` inside each protected pod's namespace and
//! `inpod_egress` inside every pod's (see `inpod.rs`), and the agent leaves them attached when
//! it stops (`NodeDatapath::shutdown`), for the next agent or `nodeward uninstall`
//! ([`Datapath::cleanup_leftovers`]).
//!
//! Lifecycle:
//! - [`Datapath::shutdown`] (clean exit, host steering) removes every attachment, pin, rule and
//!   route it made; the bpffs mount stays (other BPF users share it).
//! - Dropping a [`Datapath`] without `shutdown` leaves everything in place, as a crash would:
//!   the pinned links keep the programs attached and the maps in use, so enforcement continues
//!   (with the enforcer's listener gone, per `failure_mode`).
//! - [`Datapath::start`] over such leftovers adopts them: maps by their pins, each pinned link by
//!   swapping the new program into it atomically (no instant without a program), rule and route
//!   when identical. Leftovers it cannot use are replaced (a new link is attached before the old
//!   one is removed). [`Datapath::cleanup_leftovers`] removes them without starting.
//!
//! Needs `CAP_BPF`, `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (bpffs mount, pinning), or root, and
//! Linux >= 6.6 (TCX). Every method touching interfaces, routes or attachments must run in the
//! node's network namespace (the agent runs there as a whole).
//!
//! Counters and reason codes are the stable numbers of [`nodeward_common::counter`] and
//! [`nodeward_common::reason`]; [`Counters`] names them.

mod bpffs;
mod config;
mod counters;
mod error;
mod fastpath;
mod inpod;
mod kernel_log;
mod links;
mod netlink;
pub mod node;
mod object;

use std::{
    collections::BTreeSet,
    fs, io,
    net::Ipv4Addr,
    sync::{Mutex, MutexGuard},
};

use aya::{util::KernelVersion, Ebpf};
use nodeward_common::KernelConfig;

pub use self::bpffs::on_bpffs;
pub use self::config::{
    DatapathConfig, FailureMode, Steering, UnknownFailureMode, DEFAULT_INPOD_MARK,
    DEFAULT_STEER_MARK, DEFAULT_UPSTREAM_MARK,
};
pub use self::counters::Counters;
pub use self::error::DatapathError;
pub use self::fastpath::{
    cgroup2_root, check_cgroup, FAST_PATH_SOCKETS_MAP, MSG_PROGRAM as FAST_PATH_MSG_PROGRAM,
    NODE_NETNS_MAP, SOCKOPS_PROGRAM as FAST_PATH_SOCKOPS_PROGRAM,
};
pub use self::inpod::{PodSyncReport, PodTarget};
pub use self::object::{CONFIG_MAP, COUNTERS_MAP, PROTECTED_ENDPOINTS_MAP};
use self::{
    bpffs::{Hook, PinLayout},
    kernel_log::KernelLog,
    links::Attachments,
    netlink::{Interface, LinkWatch, Netlink, TableDefault},
};

/// Name of the TC ingress program in the object.
pub const STEER_PROGRAM: &str = "steer";
/// Name of the TC egress program in the object.
pub const GUARD_PROGRAM: &str = "guard";

/// What [`Datapath::sync`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Endpoints added to `PROTECTED_ENDPOINTS`.
    pub endpoints_added: usize,
    /// Endpoints removed from it.
    pub endpoints_removed: usize,
    /// Interfaces `guard` was attached to.
    pub guards_attached: Vec<String>,
    /// Interfaces `guard` was detached from.
    pub guards_detached: Vec<String>,
    /// Guarded interfaces asked for that do not exist (the pod left, or a wrong name): traffic
    /// from unhooked paths into those pods is not guarded until they appear.
    pub missing_interfaces: Vec<String>,
}

/// What [`Datapath::rescan_interfaces`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RescanReport {
    /// Interfaces `steer` was attached to.
    pub attached: Vec<String>,
    /// Interfaces that left; their attachments (steer and guard) were removed.
    pub removed: Vec<String>,
    /// Interfaces `steer` could not be attached to, with the error. `guard` still keeps
    /// unsteered traffic out of protected pods.
    pub failed: Vec<(String, String)>,
}

/// What [`Datapath::cleanup_leftovers`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CleanupReport {
    /// Attachment pins removed (each detached its link).
    pub links: usize,
    /// Map pins removed.
    pub maps: usize,
    /// Whether the `fwmark` rule was there and removed.
    pub rule: bool,
    /// Whether the local route was there and removed.
    pub route: bool,
}

/// nodeward's programs, maps, attachments and policy routing in the node's network namespace.
/// See the module documentation for the lifecycle. `Sync`: share it behind an `Arc`.
pub struct Datapath {
    config: DatapathConfig,
    /// (device, inode) of the network namespace it started in.
    netns: (u64, u64),
    layout: PinLayout,
    inner: Mutex<Inner>,
    /// Declared after `inner` so the log thread stops after the object is gone.
    kernel_log: Option<KernelLog>,
}

pub(super) struct Inner {
    ebpf: Ebpf,
    netlink: Netlink,
    attachments: Attachments,
    /// In-pod steering's attachments, by (netns inode, ifindex).
    pod_links: std::collections::BTreeMap<inpod::PodLinkKey, inpod::PodLink>,
    kernel_config: KernelConfig,
    fast_path: Option<fastpath::FastPath>,
}

/// The fast path's state, for `/debug/state` and `nodeward status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastPathState {
    /// The cgroup `fastpath_sockops` is attached to; `None` when the fast path is off.
    pub cgroup: Option<std::path::PathBuf>,
    /// Sockets in `FAST_PATH_SOCKETS` now.
    pub sockets: usize,
}

impl Datapath {
    /// Loads, configures and attaches everything (see the module documentation), adopting what
    /// a previous run left. Call it after the tracing subscriber is installed (for the kernel
    /// programs' log lines) and in the node's network namespace.
    pub fn start(config: DatapathConfig) -> Result<Self, DatapathError> {
        // Everything that can be refused is checked before anything is created.
        config.validate()?;
        require_tcx()?;
        if config.steering == Steering::InPod && !has_sys_admin() {
            return Err(DatapathError::NoSysAdmin);
        }
        if let Some(cgroup) = &config.fast_path {
            fastpath::check_cgroup(cgroup)?;
        }
        let netns = current_netns().map_err(|source| {
            DatapathError::netlink("identifying the network namespace", source)
        })?;
        let mut netlink = Netlink::open()
            .map_err(|source| DatapathError::netlink("opening an rtnetlink socket", source))?;
        let interfaces = list_interfaces(&mut netlink)?;
        for uplink in &config.uplinks {
            if !interfaces.iter().any(|i| &i.name == uplink && !i.loopback) {
                return Err(DatapathError::UplinkMissing {
                    iface: uplink.clone(),
                });
            }
        }
        let table_default = table_default(&mut netlink, config.route_table)?;

        bpffs::ensure_mounted(&config.bpffs, &config.pin_dir)?;
        let layout = PinLayout {
            root: config.pin_dir.clone(),
        };
        layout.create()?;
        if config.fast_path.is_none() {
            // The previous run's sock hash (with its `sk_msg` program) must not be adopted.
            fastpath::retire_map_pin(&layout)?;
        }
        let carried = object::retire_incompatible_pins(&layout.maps())?;
        let mut ebpf = object::load(&layout.maps())?;
        let kernel_config = config.kernel(config.log_level);
        object::write_config(&mut ebpf, kernel_config)?;
        if !carried.is_empty() {
            object::update_endpoints(&mut ebpf, &carried, &[])?;
        }
        let kernel_log = match KernelLog::start(&mut ebpf) {
            Ok(log) => Some(log),
            Err(e) => {
                tracing::warn!(error = %e, "kernel program log lines will not be shown");
                None
            }
        };

        // Routing before programs: a packet marked by a new program is delivered locally.
        if config.steering == Steering::Host {
            install_routing(&mut netlink, &config, table_default)?;
            accept_local_on_loopback();
        }

        let fast_path = if let Some(cgroup) = &config.fast_path {
            Some(fastpath::start(&mut ebpf, &layout, cgroup)?)
        } else {
            fastpath::write_node_netns(&mut ebpf, 0)?;
            if fastpath::remove_link_pin(&layout)? {
                tracing::info!(
                    "removed the fast path a previous run left attached (--fast-path off)"
                );
            }
            None
        };

        let datapath = Self {
            netns,
            layout,
            inner: Mutex::new(Inner {
                ebpf,
                netlink,
                attachments: Attachments::default(),
                pod_links: std::collections::BTreeMap::new(),
                kernel_config,
                fast_path,
            }),
            kernel_log,
            config,
        };
        let report = if datapath.config.steering == Steering::Host {
            // In-pod attachments of an earlier run in in-pod mode would keep dropping new flows
            // into the pods (no listener there any more): host steering takes over.
            for pin in inpod::list_pins(&datapath.layout)? {
                links::unpin(&pin)?;
            }
            datapath.adopt_pinned_links()?;
            datapath.rescan(Strict::Yes)?
        } else {
            // Host-side attachments of an earlier run in host mode would steer to a listener
            // that is not there; in-pod attachments are adopted by the first `sync_pods`.
            for (_, pin) in datapath.layout.link_pins()? {
                links::unpin(&pin)?;
            }
            RescanReport::default()
        };
        tracing::info!(
            pin_dir = %datapath.config.pin_dir.display(),
            listener_port = datapath.config.listener_port,
            steering = datapath.config.steering.as_str(),
            failure_mode = %datapath.config.failure_mode,
            interfaces = report.attached.len(),
            fast_path = ?datapath.config.fast_path,
            "datapath started"
        );
        Ok(datapath)
    }

    /// The configuration it runs with.
    #[must_use]
    pub fn config(&self) -> &DatapathConfig {
        &self.config
    }

    /// Makes the kernel state match: `endpoints` (address, port in host order; port
    /// [`nodeward_common::PORT_ANY`] = every port) are exactly the protected ones, and `guard` is
    /// attached to exactly `guarded_interfaces` (host-side interfaces of protected local pods).
    /// Guards are attached before endpoints are added and detached after endpoints are removed.
    pub fn sync(
        &self,
        endpoints: &[(Ipv4Addr, u16)],
        guarded_interfaces: &[String],
    ) -> Result<SyncReport, DatapathError> {
        self.check_netns("sync")?;
        let mut inner = self.lock();
        let Inner {
            ebpf,
            netlink,
            attachments,
            ..
        } = &mut *inner;
        let mut report = SyncReport::default();

        let interfaces = list_interfaces(netlink)?;
        let mut wanted = BTreeSet::new();
        for name in guarded_interfaces {
            match interfaces.iter().find(|interface| &interface.name == name) {
                Some(interface) => {
                    wanted.insert(interface.index);
                    if !attachments.contains(Hook::Guard, interface.index) {
                        attachments.attach(
                            ebpf,
                            &self.layout,
                            Hook::Guard,
                            interface.index,
                            &interface.name,
                        )?;
                        report.guards_attached.push(interface.name.clone());
                    }
                }
                None => report.missing_interfaces.push(name.clone()),
            }
        }
        if !report.missing_interfaces.is_empty() {
            tracing::warn!(
                interfaces = ?report.missing_interfaces,
                "interfaces of protected pods not found; guard not attached there"
            );
        }

        let current = object::protected_endpoints(ebpf)?;
        let desired: BTreeSet<(Ipv4Addr, u16)> = endpoints.iter().copied().collect();
        let add: Vec<_> = desired.difference(&current).copied().collect();
        let remove: Vec<_> = current.difference(&desired).copied().collect();
        object::update_endpoints(ebpf, &add, &remove)?;
        report.endpoints_added = add.len();
        report.endpoints_removed = remove.len();

        let unwanted: Vec<(u32, String)> = attachments
            .list()
            .filter(|(hook, ifindex, _)| *hook == Hook::Guard && !wanted.contains(ifindex))
            .map(|(_, ifindex, name)| (ifindex, name.to_owned()))
            .collect();
        for (ifindex, name) in unwanted {
            attachments.detach(Hook::Guard, ifindex)?;
            report.guards_detached.push(name);
        }
        Ok(report)
    }

    /// Attaches `steer` to interfaces that appeared and removes attachments (`steer` and
    /// `guard`) of interfaces that left. Call it periodically or on [`LinkEvents`].
    pub fn rescan_interfaces(&self) -> Result<RescanReport, DatapathError> {
        self.rescan(Strict::No)
    }

    fn rescan(&self, strict: Strict) -> Result<RescanReport, DatapathError> {
        self.check_netns("rescan_interfaces")?;
        let mut inner = self.lock();
        let Inner {
            ebpf,
            netlink,
            attachments,
            ..
        } = &mut *inner;
        let mut report = RescanReport::default();
        let interfaces = list_interfaces(netlink)?;

        let gone: Vec<(Hook, u32, String)> = attachments
            .list()
            .filter(|(_, ifindex, _)| !interfaces.iter().any(|i| i.index == *ifindex))
            .map(|(hook, ifindex, name)| (hook, ifindex, name.to_owned()))
            .collect();
        for (hook, ifindex, name) in gone {
            attachments.detach(hook, ifindex)?;
            if hook == Hook::Steer {
                report.removed.push(name);
            }
        }

        // `lo` included: `guard` redirects the node's own flows into protected pods there.
        for interface in &interfaces {
            for hook in [Hook::Steer, Hook::Guard] {
                attachments.rename(hook, interface.index, &interface.name);
            }
            if attachments.contains(Hook::Steer, interface.index) {
                continue;
            }
            match attachments.attach(
                ebpf,
                &self.layout,
                Hook::Steer,
                interface.index,
                &interface.name,
            ) {
                Ok(()) => report.attached.push(interface.name.clone()),
                Err(e) => {
                    // An interface that left meanwhile (a pod deleted) is not a failure.
                    let still_there = list_interfaces(netlink)?
                        .iter()
                        .any(|i| i.index == interface.index);
                    if still_there && strict == Strict::Yes {
                        return Err(e);
                    }
                    if still_there {
                        tracing::error!(iface = %interface.name, error = %e, "steer not attached");
                        report.failed.push((interface.name.clone(), e.to_string()));
                    }
                }
            }
        }
        Ok(report)
    }

    /// A stream of link notifications of the node's namespace: call
    /// [`Datapath::rescan_interfaces`] after each. Call it inside a tokio runtime.
    pub fn link_events(&self) -> Result<LinkEvents, DatapathError> {
        let subscribe_error =
            |source| DatapathError::netlink("subscribing to link notifications", source);
        let watch = LinkWatch::open().map_err(subscribe_error)?;
        // SAFETY: `LinkWatch` owns the socket; its descriptor stays open until the `AsyncFd`
        // has deregistered it and drops the `LinkWatch` with it.
        let watch = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(watch, tokio::io::Interest::READABLE)
        }
        .map_err(|e| subscribe_error(e.into_parts().1))?;
        Ok(LinkEvents { watch })
    }

    /// The host interface the node routes `ip` through (a pod's host-side veth), or `None` when
    /// the address is local, unreachable, or routed through loopback.
    pub fn interface_for(&self, ip: Ipv4Addr) -> Result<Option<String>, DatapathError> {
        self.lock().netlink.interface_for(ip).map_err(|source| {
            DatapathError::netlink(format!("looking up the route to {ip}"), source)
        })
    }

    /// The packet counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        object::read_counters(&self.lock().ebpf)
    }

    /// The protected endpoints the programs currently see, sorted.
    pub fn protected_endpoints(&self) -> Result<Vec<(Ipv4Addr, u16)>, DatapathError> {
        Ok(object::protected_endpoints(&self.lock().ebpf)?
            .into_iter()
            .collect())
    }

    /// Sets `CONFIG.log_level` at run time ([`nodeward_common::config`]: 0 off, 1 drops, 2
    /// every decision on a protected endpoint).
    pub fn set_log_level(&self, level: u32) -> Result<(), DatapathError> {
        let mut inner = self.lock();
        let mut config = inner.kernel_config;
        config.log_level = level;
        object::write_config(&mut inner.ebpf, config)?;
        inner.kernel_config = config;
        Ok(())
    }

    /// Changes the failure mode at run time (written to `CONFIG`; [`Datapath::config`] keeps
    /// showing the mode it started with).
    pub fn set_failure_mode(&self, mode: FailureMode) -> Result<(), DatapathError> {
        let mut inner = self.lock();
        let mut config = inner.kernel_config;
        config.failure_mode = mode.kernel();
        object::write_config(&mut inner.ebpf, config)?;
        inner.kernel_config = config;
        Ok(())
    }

    /// The fast path's cgroup (when on) and the sockets it holds.
    pub fn fast_path(&self) -> Result<FastPathState, DatapathError> {
        let inner = self.lock();
        Ok(FastPathState {
            cgroup: inner.fast_path.as_ref().map(|f| f.cgroup.clone()),
            sockets: fastpath::sockets(&inner.ebpf)?,
        })
    }

    /// The configuration the programs read, as in the map.
    pub fn kernel_config(&self) -> Result<KernelConfig, DatapathError> {
        object::read_config(&self.lock().ebpf)
    }

    /// `(interface, program)` of every attachment, for `nodeward status`; sorted by program,
    /// then interface index.
    #[must_use]
    pub fn attached(&self) -> Vec<(String, &'static str)> {
        let inner = self.lock();
        let host = inner
            .attachments
            .list()
            .map(|(hook, _, name)| (name.to_owned(), hook.program()));
        let pods = inner
            .pod_links
            .values()
            .map(|link| (link.name.clone(), "inpod"));
        host.chain(pods).collect()
    }

    /// Clean exit: detaches every program, removes every pin (and the pin directory), the rule
    /// and the route. Carries on past failures and reports them all.
    pub fn shutdown(self) -> Result<(), DatapathError> {
        let Self {
            config,
            layout,
            inner,
            kernel_log,
            netns: _,
        } = self;
        let Inner {
            ebpf,
            mut netlink,
            mut attachments,
            fast_path,
            pod_links,
            ..
        } = inner
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut failures = fast_path
            .map(|f| fastpath::stop(f, &layout))
            .unwrap_or_default();
        // Programs first: from here on no packet is marked, so the routing can go.
        failures.extend(attachments.detach_all());
        drop(pod_links);
        drop(kernel_log);
        drop(ebpf);
        let report = remove_leftovers(&config, &layout, &mut netlink, &mut failures);
        tracing::info!(?report, "datapath shut down");
        if failures.is_empty() {
            Ok(())
        } else {
            Err(DatapathError::Cleanup { failures })
        }
    }

    /// Removes what a previous run left (attachments, pins, the rule and the route of `config`)
    /// without starting, in the calling thread's network namespace.
    pub fn cleanup_leftovers(config: &DatapathConfig) -> Result<CleanupReport, DatapathError> {
        let layout = PinLayout {
            root: config.pin_dir.clone(),
        };
        let mut netlink = Netlink::open()
            .map_err(|source| DatapathError::netlink("opening an rtnetlink socket", source))?;
        let mut failures = Vec::new();
        let report = remove_leftovers(config, &layout, &mut netlink, &mut failures);
        if failures.is_empty() {
            Ok(report)
        } else {
            Err(DatapathError::Cleanup { failures })
        }
    }

    fn check_netns(&self, operation: &'static str) -> Result<(), DatapathError> {
        match current_netns() {
            Ok(netns) if netns == self.netns => Ok(()),
            Ok(_) => Err(DatapathError::WrongNamespace { operation }),
            Err(source) => Err(DatapathError::netlink(
                "identifying the network namespace",
                source,
            )),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the kernel state as it was; carry on with it.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes over the attachments a previous run pinned: those whose interface still exists get
    /// this run's program swapped in; the others are removed.
    fn adopt_pinned_links(&self) -> Result<(), DatapathError> {
        self.check_netns("start")?;
        let mut inner = self.lock();
        let Inner {
            ebpf,
            netlink,
            attachments,
            ..
        } = &mut *inner;
        let interfaces = list_interfaces(netlink)?;
        for (parsed, path) in self.layout.link_pins()? {
            let interface = parsed.and_then(|(hook, ifindex)| {
                interfaces
                    .iter()
                    .find(|i| i.index == ifindex && (hook == Hook::Steer || !i.loopback))
                    .map(|i| (hook, i))
            });
            if let Some((hook, interface)) = interface {
                attachments.attach(ebpf, &self.layout, hook, interface.index, &interface.name)?;
            } else {
                tracing::info!(
                    pin = %path.display(),
                    "removing an attachment pin whose interface is gone"
                );
                links::unpin(&path)?;
            }
        }
        Ok(())
    }
}

/// Whether an attachment failure on an interface that still exists fails the rescan (at start)
/// or is reported (later rescans).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Strict {
    Yes,
    No,
}

/// Link notifications of the node's network namespace (`RTNLGRP_LINK`).
pub struct LinkEvents {
    watch: tokio::io::unix::AsyncFd<LinkWatch>,
}

impl LinkEvents {
    /// Waits until at least one link was added, changed or removed (or notifications were lost),
    /// then drains what is pending.
    pub async fn changed(&mut self) -> Result<(), DatapathError> {
        loop {
            let mut guard = self.watch.readable().await.map_err(|source| {
                DatapathError::netlink("waiting for link notifications", source)
            })?;
            let drained = guard
                .get_inner()
                .drain()
                .map_err(|source| DatapathError::netlink("reading link notifications", source))?;
            guard.clear_ready();
            if drained > 0 {
                return Ok(());
            }
        }
    }

    /// Reads pending notifications without waiting; returns whether there were any.
    pub fn poll_changed(&mut self) -> Result<bool, DatapathError> {
        self.watch
            .get_ref()
            .drain()
            .map(|count| count > 0)
            .map_err(|source| DatapathError::netlink("reading link notifications", source))
    }
}

/// The host interface the calling thread's namespace routes `ip` through; see
/// [`Datapath::interface_for`]. Opens a netlink socket per call.
pub fn interface_for(ip: Ipv4Addr) -> Result<Option<String>, DatapathError> {
    Netlink::open()
        .and_then(|mut netlink| netlink.interface_for(ip))
        .map_err(|source| DatapathError::netlink(format!("looking up the route to {ip}"), source))
}

/// (device, inode) of the calling thread's network namespace.
fn current_netns() -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = fs::metadata("/proc/thread-self/ns/net")?;
    Ok((meta.dev(), meta.ino()))
}

/// Whether the process has `CAP_SYS_ADMIN` in its effective set (`CapEff` of
/// `/proc/self/status`); unreadable counts as no.
fn has_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

fn require_tcx() -> Result<(), DatapathError> {
    let kernel = KernelVersion::current().map_err(|e| DatapathError::KernelVersion {
        reason: e.to_string(),
    })?;
    if kernel < KernelVersion::new(6, 6, 0) {
        return Err(DatapathError::KernelTooOld {
            found: format!("{kernel:?}"),
        });
    }
    Ok(())
}

fn list_interfaces(netlink: &mut Netlink) -> Result<Vec<Interface>, DatapathError> {
    netlink
        .interfaces()
        .map_err(|source| DatapathError::netlink("listing interfaces", source))
}

/// The default route of `table`; [`DatapathError::RouteTableTaken`] when it is someone else's.
fn table_default(netlink: &mut Netlink, table: u32) -> Result<TableDefault, DatapathError> {
    match netlink.table_default(table) {
        Ok(TableDefault::Other) => Err(DatapathError::RouteTableTaken { table }),
        Ok(found) => Ok(found),
        Err(source) => Err(DatapathError::netlink(
            format!("listing routes of table {table}"),
            source,
        )),
    }
}

/// Where the node's own flows into protected pods become deliverable on `lo` (see below).
const LOOPBACK_ACCEPT_LOCAL: &str = "/proc/sys/net/ipv4/conf/lo/accept_local";

/// Sets `net.ipv4.conf.lo.accept_local=1` in the node's namespace. `guard` redirects the node's
/// own flows into protected pods to `lo` ingress; they arrive there without a route, so the
/// kernel checks their source, a local address, and without `accept_local` drops them as martians
/// (`fib_validate_source`; measured: `in_martian_src` in `/proc/net/stat/rt_cache`). Ordinary
/// loopback packets keep their route and are never checked, so the setting only concerns packets
/// injected into `lo`'s ingress. It stays set after a stop (a crashed run's programs keep
/// redirecting). Where it cannot be set (a read-only `/proc/sys`), the node's own traffic to
/// protected pods is dropped as martian: logged as an error, not fatal.
fn accept_local_on_loopback() {
    match std::fs::read_to_string(LOOPBACK_ACCEPT_LOCAL) {
        Ok(value) if value.trim() == "1" => return,
        Ok(_) | Err(_) => {}
    }
    if let Err(e) = std::fs::write(LOOPBACK_ACCEPT_LOCAL, "1") {
        tracing::error!(
            path = LOOPBACK_ACCEPT_LOCAL,
            error = %e,
            "cannot enable accept_local on lo: connections from the node itself (kubelet probes, host processes) to protected pods will be dropped instead of judged; make /proc/sys writable for the agent or set net.ipv4.conf.lo.accept_local=1 on the node"
        );
    }
}

/// `ip rule add fwmark M/M lookup T pref P` and `ip route add local 0.0.0.0/0 dev lo table T`,
/// adopting identical ones; `table_default` is what [`table_default`] found.
fn install_routing(
    netlink: &mut Netlink,
    config: &DatapathConfig,
    table_default: TableDefault,
) -> Result<(), DatapathError> {
    let rule = config.rule();
    let present = netlink
        .has_rule(rule)
        .map_err(|source| DatapathError::netlink("listing routing rules", source))?;
    if !present {
        netlink.add_rule(rule).map_err(|source| {
            DatapathError::netlink(
                format!(
                    "adding the rule `fwmark {:#x}/{:#x} lookup {} pref {}`",
                    rule.mark, rule.mark, rule.table, rule.priority
                ),
                source,
            )
        })?;
    }
    let table = config.route_table;
    if table_default == TableDefault::Missing {
        netlink.add_local_default_route(table).map_err(|source| {
            DatapathError::netlink(
                format!("adding the route `local 0.0.0.0/0 dev lo table {table}`"),
                source,
            )
        })?;
    }
    Ok(())
}

/// Removes attachment pins, map pins, the pin directory, the rule and the route; records what
/// could not be removed in `failures`.
fn remove_leftovers(
    config: &DatapathConfig,
    layout: &PinLayout,
    netlink: &mut Netlink,
    failures: &mut Vec<String>,
) -> CleanupReport {
    let mut report = CleanupReport::default();
    let mut record = |result: Result<(), DatapathError>| {
        if let Err(e) = result {
            failures.push(e.to_string());
        }
    };
    match layout.link_pins() {
        Ok(pins) => {
            for (_, path) in pins {
                record(links::unpin(&path));
                report.links += 1;
            }
        }
        Err(e) => record(Err(e)),
    }
    match fastpath::remove_link_pin(layout) {
        Ok(removed) => report.links += usize::from(removed),
        Err(e) => record(Err(e)),
    }
    match inpod::list_pins(layout) {
        Ok(pins) => {
            for path in pins {
                record(links::unpin(&path));
                report.links += 1;
            }
        }
        Err(e) => record(Err(e)),
    }
    match layout.map_pins() {
        Ok(pins) => {
            for path in pins {
                record(links::unpin(&path));
                report.maps += 1;
            }
        }
        Err(e) => record(Err(e)),
    }
    for dir in [
        layout.links(),
        layout.maps(),
        layout.fast_path(),
        layout.inpod(),
        layout.root.clone(),
    ] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => record(Err(DatapathError::PinDir {
                operation: "removing",
                path: dir,
                source,
            })),
        }
    }
    let rule = config.rule();
    match netlink.delete_rule(rule) {
        Ok(removed) => report.rule = removed,
        Err(source) => record(Err(DatapathError::netlink(
            format!(
                "removing the rule `fwmark {:#x}/{:#x} lookup {}`",
                rule.mark, rule.mark, rule.table
            ),
            source,
        ))),
    }
    let table = config.route_table;
    match netlink.table_default(table) {
        Ok(TableDefault::Ours) => match netlink.delete_local_default_route(table) {
            Ok(removed) => report.route = removed,
            Err(source) => record(Err(DatapathError::netlink(
                format!("removing the route `local 0.0.0.0/0 dev lo table {table}`"),
                source,
            ))),
        },
        // Someone else's route, or none: not ours to remove.
        Ok(TableDefault::Other | TableDefault::Missing) => {}
        Err(source) => record(Err(DatapathError::netlink(
            format!("listing routes of table {table}"),
            source,
        ))),
    }
    report
}
