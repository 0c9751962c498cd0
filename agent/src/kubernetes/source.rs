//! The Kubernetes source of truth: six watchers (pods of this node, every pod, every Service,
//! both policy kinds, the `MeshConfig`'s `ConfigMap`) mirror what the agent needs into a
//! [`Cache`] of projections, and one loop publishes snapshots from it through the same
//! [`Publisher`] as standalone mode.
//!
//! - Nothing is published until every initial list is complete: a snapshot without the
//!   policies would unprotect pods (the datapath keeps what a previous run pinned meanwhile),
//!   one without the Services would sniff ports they declare. The `MeshConfig`'s list is
//!   awaited too unless it fails (a cluster may not let the agent read it): then snapshots go
//!   without extension providers, CUSTOM policies deny, and the providers come with the first
//!   list that succeeds ([`super::mesh`]).
//! - A local pod's declared port protocols are computed when a snapshot is built, from the
//!   Services mirrored then ([`services::declared_ports`]): a Service added, edited or deleted
//!   changes the mirror, which rebuilds and republishes like any other change.
//! - Each watcher is `kube::runtime::watcher` with its default backoff (800 ms doubling to
//!   30 s, with jitter): an API server that is slow, restarting or refusing is retried; a
//!   `410 Gone` relists. A relist replaces the mirror atomically when it completes, so
//!   objects deleted while the watch was down go. Meanwhile the last snapshot keeps being
//!   enforced; [`super::health`] says how stale it is.
//! - A policy object that fails validation is reported (log, `/debug/state`,
//!   `nodeward_config_errors`, and an `InvalidPolicy` Event on the object, once per problem)
//!   and skipped; if a valid version of the same object (same uid) was in force, that version
//!   keeps serving, so a bad edit never unprotects a pod.
//! - Bursts of changes are debounced into one rebuild.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::core::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt as _;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::events::{self, Report, Reports};
use super::health::{self, Health, WatchHealth};
use super::mesh::{self, MeshEntry};
use super::pods::{self, ClusterPod, LocalPod};
use super::policies::{self, Policy, PolicyApis};
use super::services::{self, ServiceProjection};
use crate::metrics::Metrics;
use crate::state::publish::{Inputs, OnPublish, Publisher};
use crate::state::{PodIdentity, StateStore};

/// Quiet time after the last change before a rebuild.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// A stream of changes holds a rebuild back at most this long.
const MAX_DEBOUNCE: Duration = Duration::from_secs(1);
/// First retry of a failed discovery; doubles to [`DISCOVERY_RETRY_MAX`].
const DISCOVERY_RETRY: Duration = Duration::from_millis(500);
const DISCOVERY_RETRY_MAX: Duration = Duration::from_secs(30);

/// What the Kubernetes source watches and how it names things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesConfig {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    pub root_namespace: String,
    pub trust_domain: String,
    /// Quiet time after the last change before a rebuild.
    pub debounce: Duration,
}

/// A mirror of one watched collection, keyed by `namespace/name`: what is in force, and the
/// buffer of a relist in progress.
#[derive(Debug)]
pub struct Mirror<V> {
    items: BTreeMap<String, V>,
    relist: Option<BTreeMap<String, V>>,
}

impl<V> Default for Mirror<V> {
    fn default() -> Self {
        Self {
            items: BTreeMap::new(),
            relist: None,
        }
    }
}

impl<V: PartialEq> Mirror<V> {
    /// Applies one watcher event; `project` gives the value of an object (or `None`: not kept),
    /// seeing the version in force. Returns whether what is in force changed.
    pub fn apply<K: Resource>(
        &mut self,
        event: Event<K>,
        project: &mut dyn FnMut(&K, Option<&V>) -> Option<V>,
    ) -> bool {
        let key = |object: &K| {
            format!(
                "{}/{}",
                object.meta().namespace.as_deref().unwrap_or_default(),
                object.meta().name.as_deref().unwrap_or_default()
            )
        };
        match event {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let key = key(&object);
                if let Some(value) = project(&object, self.items.get(&key)) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key, value);
                }
                false
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                let changed = listed != self.items;
                self.items = listed;
                changed
            }
            Event::Apply(object) => {
                let key = key(&object);
                match project(&object, self.items.get(&key)) {
                    Some(value) => {
                        let changed = self.items.get(&key) != Some(&value);
                        self.items.insert(key, value);
                        changed
                    }
                    None => self.items.remove(&key).is_some(),
                }
            }
            Event::Delete(object) => self.items.remove(&key(&object)).is_some(),
        }
    }

    /// What is in force.
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.items.values()
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.items.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// A policy object as the source keeps it: the version in force (the last valid one of this
/// object), and its current problem.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyEntry {
    uid: Option<String>,
    in_force: Option<Policy>,
    /// The operator's sentences, as in `Snapshot::errors`.
    errors: Vec<String>,
    /// The problem last reported as an Event (`field: problem`).
    note: Option<String>,
}

/// Everything the watchers mirror.
#[derive(Debug, Default)]
pub struct Cache {
    /// Steerable pods of this node.
    pub local: Mirror<LocalPod>,
    /// Every pod of the cluster that can be a source.
    pub cluster: Mirror<ClusterPod>,
    /// Every Service that can select pods.
    pub services: Mirror<ServiceProjection>,
    pub authorization: Mirror<PolicyEntry>,
    pub authentication: Mirror<PolicyEntry>,
    /// The `MeshConfig`'s `ConfigMap` (at most one).
    pub mesh: Mirror<MeshEntry>,
}

impl Cache {
    /// The inputs of a snapshot. An address claimed by two pods with different identities
    /// (a moment of IP reuse) gives no identity: an unknown source, never a wrong one. Each
    /// local pod's `ports` are those the Services of its namespace that select it declare.
    #[must_use]
    pub fn inputs(&self) -> Inputs {
        let mut inputs = Inputs::default();
        for entry in self
            .authorization
            .values()
            .chain(self.authentication.values())
        {
            match &entry.in_force {
                Some(Policy::Authorization(p)) => inputs.authz.push(p.clone()),
                Some(Policy::Authentication(p)) => inputs.authn.push(p.clone()),
                None => {}
            }
            inputs.errors.extend(entry.errors.iter().cloned());
        }
        // No ConfigMap: Istio's default MeshConfig, without extension providers.
        if let Some(entry) = self.mesh.values().next() {
            inputs.mesh = Arc::clone(&entry.in_force);
            inputs.errors.extend(entry.errors.iter().cloned());
        }
        let mut by_namespace: HashMap<&str, Vec<&ServiceProjection>> = HashMap::new();
        for service in self.services.values() {
            by_namespace
                .entry(service.namespace.as_str())
                .or_default()
                .push(service);
        }
        inputs.workloads = self
            .local
            .values()
            .map(|pod| {
                let mut workload = pod.workload.clone();
                let candidates = by_namespace
                    .get(workload.namespace.as_str())
                    .map_or(&[][..], Vec::as_slice);
                workload.ports = services::declared_ports(
                    &workload.namespace,
                    &workload.labels,
                    &pod.named_ports,
                    candidates.iter().copied(),
                );
                workload
            })
            .collect();
        let mut claims: HashMap<IpAddr, (&str, &str, bool)> = HashMap::new();
        for pod in self.cluster.values() {
            for ip in &pod.ips {
                let who = (pod.namespace.as_str(), pod.service_account.as_str());
                claims
                    .entry(*ip)
                    .and_modify(|c| c.2 |= (c.0, c.1) != who)
                    .or_insert((who.0, who.1, false));
            }
        }
        let mut peers: Vec<PodIdentity> = claims
            .into_iter()
            .filter(|(ip, (_, _, conflict))| {
                if *conflict {
                    debug!(%ip, "address claimed by pods of different identities: no identity");
                }
                !conflict
            })
            .map(|(ip, (namespace, service_account, _))| PodIdentity {
                ip,
                namespace: namespace.to_owned(),
                service_account: service_account.to_owned(),
            })
            .collect();
        peers.sort_unstable();
        inputs.peers = peers;
        inputs
    }
}

/// Projects a policy object (public for the state benchmark): its valid translation, or its problem with the version of the
/// same object in force kept. A new problem is logged and queued as an Event.
pub fn project_policy(
    object: &DynamicObject,
    previous: Option<&PolicyEntry>,
    resource: &ApiResource,
    reports: &mut Vec<Report>,
) -> PolicyEntry {
    let uid = object.metadata.uid.clone();
    match policies::translate(object, resource) {
        Ok(policy) => PolicyEntry {
            uid,
            in_force: Some(policy),
            errors: Vec::new(),
            note: None,
        },
        Err(errors) => {
            let same = previous.filter(|p| p.uid == uid);
            let kept = same.and_then(|p| p.in_force.clone());
            let suffix = if kept.is_some() {
                " (edit not applied: its last valid version keeps serving)"
            } else {
                " (skipped; the other objects apply)"
            };
            let messages: Vec<String> = errors.iter().map(|e| format!("{e}{suffix}")).collect();
            let note = policies::note(&errors);
            let id = format!(
                "{}/{}",
                object.namespace().unwrap_or_default(),
                object.name_any()
            );
            if same.and_then(|p| p.note.as_ref()) == Some(&note) {
                debug!(kind = %resource.kind, object = %id, "still invalid: {note}");
            } else {
                for message in &messages {
                    warn!(kind = %resource.kind, object = %id, kept = kept.is_some(), "{message}");
                }
                reports.push(Report {
                    reference: object.object_ref(resource),
                    reason: events::INVALID_POLICY,
                    note: format!("{} {id} is not enforced as written: {note}", resource.kind),
                });
            }
            PolicyEntry {
                uid,
                in_force: kept,
                errors: messages,
                note: Some(note),
            }
        }
    }
}

/// The Kubernetes source: builds nothing itself until [`Kubernetes::run`].
pub struct Kubernetes {
    client: Client,
    config: KubernetesConfig,
    health: Arc<Health>,
    publisher: Publisher,
}

impl Debug for Kubernetes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubernetes")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the watch tasks share.
#[derive(Clone)]
struct Shared {
    cache: Arc<Mutex<Cache>>,
    wake: Arc<Notify>,
    reports: Reports,
    shutdown: CancellationToken,
}

impl Kubernetes {
    /// A source publishing into `store`; `health` is what readiness and metrics read.
    #[must_use]
    pub fn new(
        client: Client,
        config: KubernetesConfig,
        store: Arc<StateStore>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
        on_publish: OnPublish,
    ) -> Self {
        let publisher = Publisher::new(
            store,
            metrics,
            on_publish,
            &config.trust_domain,
            &config.root_namespace,
        );
        Self {
            client,
            config,
            health,
            publisher,
        }
    }

    /// Watches until `shutdown`, publishing a snapshot after every change once every initial
    /// list is complete.
    pub async fn run(self, shutdown: CancellationToken) {
        let (reports, received) = mpsc::unbounded_channel();
        let shared = Shared {
            cache: Arc::new(Mutex::new(Cache::default())),
            wake: Arc::new(Notify::new()),
            reports,
            shutdown: shutdown.clone(),
        };
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(events::publish(
            self.client.clone(),
            self.config.node_name.clone(),
            received,
            Arc::clone(&self.health),
            shutdown.clone(),
        ));
        let local =
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.config.node_name));
        tasks.spawn(follow(
            Api::<Pod>::all(self.client.clone()),
            local,
            self.health.watcher(health::LOCAL_PODS),
            shared.clone(),
            |cache| &mut cache.local,
            |pod: &Pod, _: Option<&LocalPod>, _: &mut Vec<Report>| match pods::local_pod(pod) {
                Ok(local) => Some(local),
                Err(why) => {
                    debug!(pod = %pods::key(pod), reason = %why, "not steered");
                    None
                }
            },
        ));
        tasks.spawn(follow(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default(),
            self.health.watcher(health::CLUSTER_PODS),
            shared.clone(),
            |cache| &mut cache.cluster,
            |pod: &Pod, _: Option<&ClusterPod>, _: &mut Vec<Report>| pods::identity(pod),
        ));
        tasks.spawn(follow(
            Api::<Service>::all(self.client.clone()),
            watcher::Config::default(),
            self.health.watcher(health::SERVICES),
            shared.clone(),
            |cache| &mut cache.services,
            |service: &Service, _: Option<&ServiceProjection>, _: &mut Vec<Report>| {
                let projected = services::project(service);
                if projected.is_none() {
                    debug!(service = %services::key(service), "selects no pods: not kept");
                }
                projected
            },
        ));
        let root = self.config.root_namespace.clone();
        tasks.spawn(follow(
            Api::<ConfigMap>::namespaced(self.client.clone(), &self.config.root_namespace),
            mesh::watcher_config(),
            self.health.watcher(health::MESH_CONFIG),
            shared.clone(),
            |cache| &mut cache.mesh,
            move |config_map: &ConfigMap,
                  previous: Option<&MeshEntry>,
                  reports: &mut Vec<Report>| {
                mesh::project(config_map, &root, previous, reports)
            },
        ));
        tasks.spawn(watch_policies(
            self.client.clone(),
            Arc::clone(&self.health),
            shared.clone(),
        ));
        self.publish_loop(&shared).await;
        tasks.shutdown().await;
    }

    /// Debounces changes into rebuilds; publishes once every watcher has listed.
    async fn publish_loop(self, shared: &Shared) {
        let publisher = Arc::new(Mutex::new(self.publisher));
        let debounce = self.config.debounce;
        loop {
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                () = shared.wake.notified() => {}
            }
            if !crate::state::publish::settle(
                &shared.wake,
                debounce,
                MAX_DEBOUNCE,
                &shared.shutdown,
            )
            .await
            {
                return;
            }
            if !self.health.all_synced() {
                debug!("waiting for every initial list before publishing");
                continue;
            }
            let cache = Arc::clone(&shared.cache);
            let publisher = Arc::clone(&publisher);
            let rebuild = tokio::task::spawn_blocking(move || {
                let inputs = cache
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .inputs();
                publisher
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .offer(inputs, true, &"kubernetes", || {});
            });
            if let Err(e) = rebuild.await {
                warn!(error = %e, "rebuilding the state failed; the state in force keeps serving");
            }
        }
    }
}

/// Follows one collection into its mirror until shutdown.
async fn follow<K, V>(
    api: Api<K>,
    config: watcher::Config,
    health: Arc<WatchHealth>,
    shared: Shared,
    mirror: fn(&mut Cache) -> &mut Mirror<V>,
    mut project: impl FnMut(&K, Option<&V>, &mut Vec<Report>) -> Option<V> + Send,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    V: PartialEq + Send,
{
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    loop {
        let item = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            item = stream.next() => item,
        };
        let Some(item) = item else {
            warn!(watcher = health.name(), "watch stream ended");
            return;
        };
        match item {
            Ok(event) => {
                health.ok();
                let done = matches!(event, Event::InitDone);
                let mut reports = Vec::new();
                let changed = {
                    let mut cache = shared.cache.lock().unwrap_or_else(PoisonError::into_inner);
                    mirror(&mut cache).apply(event, &mut |object, previous| {
                        project(object, previous, &mut reports)
                    })
                };
                for report in reports {
                    // The publisher task is gone only at shutdown.
                    let _ = shared.reports.send(report);
                }
                if done && !health.is_synced() {
                    health.synced();
                    info!(watcher = health.name(), "initial list complete");
                    shared.wake.notify_one();
                } else if changed {
                    shared.wake.notify_one();
                }
            }
            Err(e) => {
                warn!(watcher = health.name(), error = %e, "watch failed; retrying with backoff, the last known state keeps serving");
                health.error(e.to_string());
                if !health.is_synced() {
                    // An optional watcher's failed first list lets the publication go ahead.
                    shared.wake.notify_one();
                }
            }
        }
    }
}

/// Discovers the policy version (retrying with backoff), then follows both kinds.
async fn watch_policies(client: Client, health: Arc<Health>, shared: Shared) {
    let authorization = health.watcher(health::AUTHORIZATION_POLICIES);
    let authentication = health.watcher(health::REQUEST_AUTHENTICATIONS);
    let mut retry = DISCOVERY_RETRY;
    let apis: PolicyApis = loop {
        match policies::discover(&client).await {
            Ok(apis) => break apis,
            Err(e) => {
                warn!(error = %e, retry = ?retry, "cannot watch policies yet");
                authorization.error(e.to_string());
                authentication.error(e.to_string());
            }
        }
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        retry = (retry * 2).min(DISCOVERY_RETRY_MAX);
    };
    info!(version = %apis.version, "watching security.istio.io policies");
    let follow_kind = |resource: ApiResource,
                       health: Arc<WatchHealth>,
                       mirror: fn(&mut Cache) -> &mut Mirror<PolicyEntry>| {
        let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
        follow(
            api,
            watcher::Config::default(),
            health,
            shared.clone(),
            mirror,
            move |object: &DynamicObject,
                  previous: Option<&PolicyEntry>,
                  reports: &mut Vec<Report>| {
                Some(project_policy(object, previous, &resource, reports))
            },
        )
    };
    tokio::join!(
        follow_kind(apis.authorization, authorization, |cache| &mut cache
            .authorization),
        follow_kind(apis.authentication, authentication, |cache| &mut cache
            .authentication),
    );
}
