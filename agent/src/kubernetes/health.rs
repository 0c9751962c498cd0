//! How fresh the Kubernetes state is: per watcher, whether its initial list is done, when it
//! last had a successful list/watch event, and whether it is failing now. Read by `/readyz`
//! (one named check per watcher) and `/metrics`.
//!
//! The watchers of [`WATCHERS`] are required: nothing is published and the agent is not ready
//! until each has listed once. The `MeshConfig` watcher ([`MESH_CONFIG`]) is optional: a
//! cluster without the `ConfigMap`, or an agent not allowed to read it, still enforces every
//! policy but CUSTOM ones (which then deny, as Istio's undefined provider does); its check
//! always passes and says what is missing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::readiness::Readiness;

/// The watchers, by the name readiness and metrics use.
pub const LOCAL_PODS: &str = "pods-on-node";
pub const CLUSTER_PODS: &str = "pods";
pub const SERVICES: &str = "services";
pub const AUTHORIZATION_POLICIES: &str = "authorizationpolicies";
pub const REQUEST_AUTHENTICATIONS: &str = "requestauthentications";
/// The `MeshConfig` (`ConfigMap` `istio` of the root namespace): optional.
pub const MESH_CONFIG: &str = "meshconfig";
/// Every required watcher, in readiness order.
pub const WATCHERS: [&str; 5] = [
    LOCAL_PODS,
    CLUSTER_PODS,
    SERVICES,
    AUTHORIZATION_POLICIES,
    REQUEST_AUTHENTICATIONS,
];

#[derive(Debug)]
struct WatchState {
    /// The first complete list arrived.
    synced: bool,
    /// The last successful list or watch event.
    last_ok: Option<Instant>,
    /// The last error, while the watcher is failing (cleared by the next success).
    failing: Option<String>,
    errors: u64,
}

/// Whether the agent waits for a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Not ready, nothing published, until its initial list is complete.
    Required,
    /// Its state is used when there is one; readiness and publishing do not wait for a list
    /// that fails. Says what the agent does without it.
    Optional { without: &'static str },
}

/// One watcher's health.
#[derive(Debug)]
pub struct WatchHealth {
    name: &'static str,
    need: Need,
    started: Instant,
    state: Mutex<WatchState>,
}

impl WatchHealth {
    fn new(name: &'static str, need: Need) -> Self {
        Self {
            name,
            need,
            started: Instant::now(),
            state: Mutex::new(WatchState {
                synced: false,
                last_ok: None,
                failing: None,
                errors: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[must_use]
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// A successful list or watch event.
    pub fn ok(&self) {
        let mut state = self.lock();
        state.last_ok = Some(Instant::now());
        state.failing = None;
    }

    /// The initial list is complete.
    pub fn synced(&self) {
        self.lock().synced = true;
    }

    /// The watch or list failed (it resumes with backoff).
    pub fn error(&self, error: String) {
        let mut state = self.lock();
        state.failing = Some(error);
        state.errors += 1;
    }

    /// Whether the initial list is complete.
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    /// Whether a publication may go ahead without more from this watcher: required watchers
    /// once their initial list is complete; optional ones also once their list has failed
    /// (the snapshot then goes without their state, and gets it when the list succeeds).
    #[must_use]
    pub fn settled(&self) -> bool {
        let state = self.lock();
        state.synced || (matches!(self.need, Need::Optional { .. }) && state.errors > 0)
    }

    /// Seconds the state may have missed changes: 0 while the watcher is healthy, else the
    /// time since its last success (since start when it never had one).
    #[must_use]
    pub fn stale_seconds(&self) -> f64 {
        let state = self.lock();
        if state.failing.is_none() {
            return 0.0;
        }
        state
            .last_ok
            .unwrap_or(self.started)
            .elapsed()
            .as_secs_f64()
    }

    /// The readiness check: a required watcher fails until the initial list is done;
    /// afterwards it passes (the last known state keeps being enforced) and says how stale it
    /// is. An optional watcher always passes and says the same.
    pub fn check(&self) -> Result<String, String> {
        let age = self.stale_seconds();
        let state = self.lock();
        let result = match (&state.failing, state.synced) {
            (None, true) => Ok("synced, watching".to_owned()),
            (Some(error), true) => Ok(format!(
                "serving the last known state, {age:.0}s stale; watch failing: {error}"
            )),
            (None, false) => Err("waiting for the initial list".to_owned()),
            (Some(error), false) => Err(format!("initial list failing: {error}")),
        };
        match self.need {
            Need::Required => result,
            Need::Optional { without } => Ok(result.unwrap_or_else(|why| {
                format!("{why} (not required; until it succeeds {without})")
            })),
        }
    }

    fn errors(&self) -> u64 {
        self.lock().errors
    }
}

/// Every watcher's health, and the count of Events published.
#[derive(Debug)]
pub struct Health {
    watchers: Vec<Arc<WatchHealth>>,
    pub events_published: AtomicU64,
    pub events_failed: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    #[must_use]
    pub fn new() -> Self {
        Self {
            watchers: WATCHERS
                .iter()
                .map(|name| Arc::new(WatchHealth::new(name, Need::Required)))
                .chain([Arc::new(WatchHealth::new(
                    MESH_CONFIG,
                    Need::Optional {
                        without: "no extension provider is defined: CUSTOM policies deny the requests they match",
                    },
                ))])
                .collect(),
            events_published: AtomicU64::new(0),
            events_failed: AtomicU64::new(0),
        }
    }

    /// The watcher named `name` (one of [`WATCHERS`], or [`MESH_CONFIG`]).
    #[must_use]
    pub fn watcher(&self, name: &str) -> Arc<WatchHealth> {
        let found = self.watchers.iter().find(|w| w.name == name);
        Arc::clone(found.unwrap_or(&self.watchers[0]))
    }

    /// Every initial list is complete (an optional watcher's may have failed instead; see
    /// [`WatchHealth::settled`]).
    #[must_use]
    pub fn all_synced(&self) -> bool {
        self.watchers.iter().all(|w| w.settled())
    }

    /// Adds one readiness check per watcher, `kubernetes-<watcher>`.
    pub fn add_checks(self: &Arc<Self>, readiness: &Readiness) {
        for watcher in &self.watchers {
            let watcher = Arc::clone(watcher);
            readiness.add_check(&format!("kubernetes-{}", watcher.name), move || {
                watcher.check()
            });
        }
    }
}

/// `/metrics`: `nodeward_kubernetes_watch_stale_seconds{watcher}`,
/// `nodeward_kubernetes_watch_synced{watcher}`, `nodeward_kubernetes_watch_errors_total{watcher}`,
/// `nodeward_kubernetes_events_total{result}`.
#[derive(Debug, Clone)]
pub struct KubernetesMetrics(pub Arc<Health>);

impl Collector for KubernetesMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let watchers = &self.0.watchers;
        let mut family = encoder.encode_descriptor(
            "kubernetes_watch_stale_seconds",
            "Seconds the watcher's state may have missed changes (0 while it is healthy)",
            None,
            MetricType::Gauge,
        )?;
        for w in watchers {
            ConstGauge::new(w.stale_seconds())
                .encode(family.encode_family(&[("watcher", w.name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "kubernetes_watch_synced",
            "1 once the watcher's initial list is complete",
            None,
            MetricType::Gauge,
        )?;
        for w in watchers {
            ConstGauge::new(i64::from(w.is_synced()))
                .encode(family.encode_family(&[("watcher", w.name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "kubernetes_watch_errors",
            "List and watch errors (each retried with backoff)",
            None,
            MetricType::Counter,
        )?;
        for w in watchers {
            ConstCounter::new(w.errors()).encode(family.encode_family(&[("watcher", w.name)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "kubernetes_events",
            "Kubernetes Events published about invalid objects, by result",
            None,
            MetricType::Counter,
        )?;
        for (result, count) in [
            ("ok", &self.0.events_published),
            ("error", &self.0.events_failed),
        ] {
            ConstCounter::new(count.load(Ordering::Relaxed))
                .encode(family.encode_family(&[("result", result)])?)?;
        }
        Ok(())
    }
}
