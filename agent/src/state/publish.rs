//! Building and publishing snapshots, shared by every source of truth (standalone files,
//! Kubernetes watchers): a source hands its [`Inputs`] in force to a [`Publisher`], which
//! compiles and publishes a [`Snapshot`] only when they changed, counts the reload and its
//! errors in the metrics, and calls the source's [`OnPublish`] hook.

use std::sync::Arc;

use tracing::info;

use super::{PodIdentity, Snapshot, StateStore, Workload};
use crate::authn::AuthnSet;
use crate::authz::PolicySet;
use crate::extauthz::MeshProviders;
use crate::metrics::{Metrics, ResultLabels};
use crate::policy::{AuthorizationPolicy, RequestAuthentication};

/// Called with every snapshot published (the runner tells the JWKS store the key sources and
/// syncs the datapath). It runs on the thread that published (a blocking-pool thread once the
/// agent runs) while the source is locked: keep it short, and do not call back into the source.
pub type OnPublish = Arc<dyn Fn(&Arc<Snapshot>) + Send + Sync>;

/// Everything a snapshot is built from; equal inputs give an equal snapshot.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Inputs {
    pub authz: Vec<AuthorizationPolicy>,
    pub authn: Vec<RequestAuthentication>,
    /// Destinations (standalone: the whole registry; Kubernetes: the steerable pods of this
    /// node).
    pub workloads: Vec<Workload>,
    /// Pods known only as sources (Kubernetes: every pod of the cluster).
    pub peers: Vec<PodIdentity>,
    /// The `MeshConfig`'s `ext_authz` providers in force (CUSTOM policies call them).
    pub mesh: Arc<MeshProviders>,
    /// Problems with the inputs right now, as [`Snapshot::errors`].
    pub errors: Vec<String>,
}

/// The result of offering inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    /// The generation in force afterwards.
    pub generation: u64,
    /// A new snapshot was published (something in force, or the list of errors, changed).
    pub published: bool,
    /// The problems found, as in [`Snapshot::errors`].
    pub errors: Vec<String>,
}

/// Compiles and publishes snapshots for one source.
pub struct Publisher {
    store: Arc<StateStore>,
    metrics: Arc<Metrics>,
    on_publish: OnPublish,
    trust_domain: String,
    root_namespace: String,
    /// What the snapshot this publisher published last was built from.
    published: Option<Inputs>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("trust_domain", &self.trust_domain)
            .field("root_namespace", &self.root_namespace)
            .field("published", &self.published.is_some())
            .finish_non_exhaustive()
    }
}

impl Publisher {
    #[must_use]
    pub fn new(
        store: Arc<StateStore>,
        metrics: Arc<Metrics>,
        on_publish: OnPublish,
        trust_domain: &str,
        root_namespace: &str,
    ) -> Self {
        Self {
            store,
            metrics,
            on_publish,
            trust_domain: trust_domain.to_owned(),
            root_namespace: root_namespace.to_owned(),
            published: None,
        }
    }

    /// Whether `inputs` differ from what was published last.
    #[must_use]
    pub fn changed(&self, inputs: &Inputs) -> bool {
        self.published.as_ref() != Some(inputs)
    }

    /// Publishes a snapshot of `inputs` when they changed (the store's generation + 1).
    ///
    /// `quiet`: unchanged inputs are not counted as a reload (periodic rescans, resyncs).
    /// `log_changes` runs only when a snapshot is about to be published (the source logs what
    /// changed and its errors then, not on every unchanged reload). `what` names the trigger
    /// in the log.
    pub fn offer(
        &mut self,
        inputs: Inputs,
        quiet: bool,
        what: &dyn std::fmt::Debug,
        log_changes: impl FnOnce(),
    ) -> ReloadOutcome {
        let changed = self.changed(&inputs);
        let current = self.store.load().generation;
        if quiet && !changed {
            return ReloadOutcome {
                generation: current,
                published: false,
                errors: inputs.errors,
            };
        }
        let result = if inputs.errors.is_empty() {
            "ok"
        } else {
            "error"
        };
        self.metrics
            .reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        self.metrics
            .config_errors
            .set(i64::try_from(inputs.errors.len()).unwrap_or(i64::MAX));
        if !changed {
            info!(
                generation = current,
                errors = inputs.errors.len(),
                trigger = ?what,
                "configuration reloaded: nothing changed"
            );
            return ReloadOutcome {
                generation: current,
                published: false,
                errors: inputs.errors,
            };
        }
        log_changes();

        let generation = current + 1;
        let root = &self.root_namespace;
        let snapshot = Snapshot::build_with_peers(
            generation,
            &self.trust_domain,
            root,
            inputs.workloads.iter().cloned().map(Arc::new).collect(),
            &inputs.peers,
            PolicySet::compile(&inputs.authz, root).with_providers(inputs.mesh.clone()),
            AuthnSet::compile(&inputs.authn, root),
            inputs.errors.clone(),
        );
        self.store.publish(snapshot);
        info!(
            generation,
            workloads = inputs.workloads.len(),
            peers = inputs.peers.len(),
            authorization_policies = inputs.authz.len(),
            request_authentications = inputs.authn.len(),
            errors = inputs.errors.len(),
            trigger = ?what,
            "configuration published"
        );
        let published = self.store.load();
        (self.on_publish)(&published);
        let errors = inputs.errors.clone();
        self.published = Some(inputs);
        ReloadOutcome {
            generation: published.generation,
            published: true,
            errors,
        }
    }
}

/// Waits until no change was signalled on `wake` for `debounce`, or until `max_wait` passed
/// since the call (a steady stream of changes still publishes); `false` when shut down
/// meanwhile. Both sources (files, Kubernetes watchers) batch their changes with it.
pub async fn settle(
    wake: &tokio::sync::Notify,
    debounce: std::time::Duration,
    max_wait: std::time::Duration,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    let deadline = tokio::time::Instant::now() + max_wait;
    loop {
        let quiet =
            tokio::time::sleep_until((tokio::time::Instant::now() + debounce).min(deadline));
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = quiet => return true,
            () = wake.notified() => {
                if tokio::time::Instant::now() >= deadline {
                    return true;
                }
            }
        }
    }
}
