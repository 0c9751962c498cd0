//! The datapath as the running agent uses it: kept in step with every published snapshot
//! (protected local workloads in the endpoint map, `guard` on their interfaces), rescanned
//! when interfaces come and go, exported to `/metrics`, and removed on a clean stop.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tokio_util::sync::CancellationToken;

use super::{Counters, Datapath, DatapathConfig, DatapathError};
use crate::readiness::Readiness;
use crate::state::{Snapshot, StateStore};
use nodeward_common::endpoint::PORT_ANY;

/// How often in-pod steering looks for protected pods' namespaces besides link events.
const POD_RESCAN: std::time::Duration = std::time::Duration::from_secs(2);

/// A started datapath, shareable; `shutdown` takes it out once.
pub struct NodeDatapath {
    inner: Mutex<Option<Datapath>>,
    /// In-pod steering's pods and listeners; `None` with host steering.
    pods: Option<Arc<crate::inpod::PodListeners>>,
}

impl std::fmt::Debug for NodeDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeDatapath")
            .field("running", &self.lock().is_some())
            .finish()
    }
}

impl NodeDatapath {
    /// Starts the kernel side (see [`Datapath::start`]). `pods`: in-pod steering's listeners
    /// (required with [`super::Steering::InPod`]).
    pub fn start(
        config: DatapathConfig,
        pods: Option<Arc<crate::inpod::PodListeners>>,
    ) -> Result<Arc<Self>, DatapathError> {
        Ok(Arc::new(Self {
            inner: Mutex::new(Some(Datapath::start(config)?)),
            pods,
        }))
    }

    /// In-pod steering: listeners first, then `inpod` in every protected pod found, then the
    /// listeners of pods no longer protected are closed.
    fn sync_pods(datapath: &Datapath, pods: &crate::inpod::PodListeners, snapshot: &Snapshot) {
        let matched = pods.sync(snapshot);
        match datapath.sync_pods(&matched.pods) {
            Ok(report) => {
                for (netns, error) in &report.failed {
                    tracing::error!(%netns, %error, "inpod not attached: this pod's new flows are not steered");
                }
                if report == crate::datapath::PodSyncReport::default() {
                    tracing::debug!(
                        generation = snapshot.generation,
                        pods = matched.namespaces.len(),
                        "in-pod steering in step"
                    );
                } else {
                    tracing::info!(generation = snapshot.generation, pods = matched.namespaces.len(), elsewhere = matched.elsewhere, report = ?report, "in-pod steering in step");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "in-pod steering sync failed; the previous attachments stay in force");
            }
        }
        pods.retire(&matched.namespaces);
    }

    fn lock(&self) -> MutexGuard<'_, Option<Datapath>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes what `snapshot` protects: every protected workload with an IPv4 address reached
    /// through a local interface (its `interface`, else the route to it) is an endpoint on every
    /// port, and its interface gets `guard`. Workloads on other nodes are left to their nodes.
    pub fn sync(&self, snapshot: &Snapshot) {
        let guard = self.lock();
        let Some(datapath) = guard.as_ref() else {
            return;
        };
        if let Some(pods) = &self.pods {
            Self::sync_pods(datapath, pods, snapshot);
            return;
        }
        let mut endpoints = Vec::new();
        let mut guarded = Vec::new();
        for view in snapshot.by_ip.values() {
            if !view.is_protected() {
                continue;
            }
            let IpAddr::V4(ip) = view.workload.ip else {
                continue;
            };
            let interface = view
                .workload
                .interface
                .clone()
                .or_else(|| datapath.interface_for(ip).ok().flatten());
            match interface {
                Some(iface) if iface != "lo" => {
                    endpoints.push((ip, PORT_ANY));
                    if !guarded.contains(&iface) {
                        guarded.push(iface);
                    }
                }
                _ => {
                    tracing::debug!(workload = %view.id, %ip, "not on this node: not steered here");
                }
            }
        }
        endpoints.sort_unstable();
        match datapath.sync(&endpoints, &guarded) {
            Ok(report) => {
                tracing::info!(generation = snapshot.generation, endpoints = endpoints.len(), interfaces = guarded.len(), report = ?report, "datapath in step");
            }
            Err(e) => {
                tracing::error!(error = %e, "datapath sync failed; the previous endpoints stay in force");
            }
        }
    }

    /// Attaches `steer` to new interfaces and forgets gone ones, then re-syncs.
    pub fn rescan(&self, snapshot: &Snapshot) {
        if self.pods.is_some() {
            self.sync(snapshot);
            return;
        }
        if let Some(datapath) = self.lock().as_ref() {
            if let Err(e) = datapath.rescan_interfaces() {
                tracing::warn!(error = %e, "interface rescan failed");
            }
        }
        self.sync(snapshot);
    }

    /// The kernel counters, summed over CPUs.
    #[must_use]
    pub fn counters(&self) -> Option<Counters> {
        self.lock().as_ref().and_then(|d| d.counters().ok())
    }

    /// Whether the programs are attached (for readiness).
    #[must_use]
    pub fn attached(&self) -> bool {
        self.lock()
            .as_ref()
            .is_some_and(|d| !d.attached().is_empty())
    }

    /// Adds the `datapath` readiness check: ready while the programs are attached.
    pub fn add_readiness(self: &Arc<Self>, readiness: &Readiness) {
        let datapath = Arc::clone(self);
        readiness.add_check("datapath", move || {
            if datapath.pods.is_some() && datapath.lock().is_some() {
                Ok("programs loaded (in-pod steering)".into())
            } else if datapath.attached() {
                Ok("programs attached".into())
            } else {
                Err("no kernel program attached".into())
            }
        });
    }

    /// Netlink link notifications (interfaces appearing or leaving); inside a tokio runtime.
    pub fn link_events(&self) -> Result<super::LinkEvents, DatapathError> {
        match self.lock().as_ref() {
            Some(datapath) => datapath.link_events(),
            None => Err(DatapathError::Stopped),
        }
    }

    /// The kernel programs' log level (0 off), at run time.
    pub fn set_log_level(&self, level: u32) -> Result<(), DatapathError> {
        match self.lock().as_ref() {
            Some(datapath) => datapath.set_log_level(level),
            None => Err(DatapathError::Stopped),
        }
    }

    /// The fast path's state (for `/debug/state`); `None` once stopped or unreadable.
    #[must_use]
    pub fn fast_path(&self) -> Option<super::FastPathState> {
        self.lock().as_ref().and_then(|d| d.fast_path().ok())
    }

    /// The endpoints in the map (for status).
    #[must_use]
    pub fn endpoints(&self) -> Vec<(Ipv4Addr, u16)> {
        self.lock()
            .as_ref()
            .and_then(|d| d.protected_endpoints().ok())
            .unwrap_or_default()
    }

    /// Follows interfaces as they come and go with pods, until `shutdown`: on every netlink
    /// link event, attaches `steer` to new interfaces and re-syncs the endpoints and guards
    /// with the snapshot in force.
    pub async fn follow_interfaces(
        self: Arc<Self>,
        store: Arc<StateStore>,
        shutdown: CancellationToken,
    ) {
        let mut events = match self.link_events() {
            Ok(events) => events,
            Err(e) => {
                tracing::warn!(error = %e, "no link events; interfaces are picked up on the next reload only");
                return;
            }
        };
        // In-pod steering also looks for pods' namespaces periodically: an address is added to
        // a pod after its interface appears.
        let mut tick = tokio::time::interval(POD_RESCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick(), if self.pods.is_some() => {
                    let snapshot = store.load();
                    let datapath = Arc::clone(&self);
                    let _ = tokio::task::spawn_blocking(move || datapath.sync(&snapshot)).await;
                }
                changed = events.changed() => {
                    if let Err(e) = changed {
                        tracing::warn!(error = %e, "link events ended");
                        return;
                    }
                    let snapshot = store.load();
                    let datapath = Arc::clone(&self);
                    let _ = tokio::task::spawn_blocking(move || datapath.rescan(&snapshot)).await;
                }
            }
        }
    }

    /// A clean stop. Host steering removes every program, pin, rule and route. In-pod steering
    /// leaves its pinned programs in the pods, so that `failure_mode` holds until the next agent
    /// takes them over (a DaemonSet rollout); `nodeward uninstall` removes them. Returns whether
    /// the data path was removed.
    pub fn shutdown(&self) -> Result<bool, DatapathError> {
        match self.lock().take() {
            Some(datapath) if self.pods.is_some() => {
                drop(datapath);
                Ok(false)
            }
            Some(datapath) => datapath.shutdown().map(|()| true),
            None => Ok(false),
        }
    }
}

/// `/metrics`: the kernel counters as `nodeward_datapath_packets_total{counter=...}`.
#[derive(Debug, Clone)]
pub struct DatapathMetrics(pub Arc<NodeDatapath>);

impl Collector for DatapathMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(counters) = self.0.counters() else {
            return Ok(());
        };
        let mut family = encoder.encode_descriptor(
            "datapath_packets",
            "Events counted by the kernel programs, by counter: packets (steer, guard), sockets and messages (fastpath_*)",
            None,
            MetricType::Counter,
        )?;
        for (name, value) in counters.named() {
            ConstCounter::new(value).encode(family.encode_family(&[("counter", name)])?)?;
        }
        if let Some(fast_path) = self.0.fast_path() {
            let on = encoder.encode_descriptor(
                "datapath_fast_path",
                "1 when the same-node fast path (sock_ops + sk_msg) is attached, else 0",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::from(fast_path.cgroup.is_some())).encode(on)?;
            let sockets = encoder.encode_descriptor(
                "datapath_fast_path_sockets",
                "Sockets in the fast path's sock hash now",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(i64::try_from(fast_path.sockets).unwrap_or(i64::MAX))
                .encode(sockets)?;
        }
        Ok(())
    }
}
