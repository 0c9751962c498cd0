//! The standalone source of truth: `nodeward run --policies DIR... --workloads FILE`.
//!
//! [`Standalone`] reads the policy files and the workloads file, compiles them into a
//! [`Snapshot`](super::Snapshot) and publishes it in the [`StateStore`]; [`Standalone::watch`] then follows
//! changes (inotify through `notify`, debounced, plus a slow periodic rescan in case an event
//! is missed) and publishes a new snapshot whenever what is in force changes.
//!
//! What a bad edit leaves in force:
//! - **Policy files change as a whole.** While nothing of a file is in force (a file seen for
//!   the first time, at startup or added later, or one that held no object so far), its valid
//!   objects apply and its errors are reported. Once a file has content in force, that content
//!   changes only when the file loads without any error: an edit with an error (YAML syntax, an
//!   invalid object, unreadable) is reported and the last good content of that file keeps
//!   serving. An edit that changes an ALLOW and a DENY policy together is applied together or
//!   not at all, never half.
//! - A file removed from a policy directory drops its objects. A path given with `--policies`
//!   that disappears, or a directory that cannot be listed, is an error, and what was loaded
//!   from it keeps serving.
//! - **The workloads file**: when it cannot be read or is not a workloads file at all, the last
//!   good registry keeps serving. Otherwise every entry stands alone: valid entries apply (a
//!   new pod is not held back by another pod's typo); an invalid entry is skipped, unless a
//!   version of it (same `namespace/name`) was in force, which then keeps serving, so a typo
//!   never unprotects a running pod.
//! - A snapshot is published when what is in force or the list of errors changes; otherwise
//!   the generation does not move.
//! - Reading a file while it is being written in place could see half of it. Event-driven
//!   reloads wait for a quiet period ([`StandaloneConfig::debounce`]); the periodic rescan
//!   defers itself while a file was written less than one quiet period ago. Writing a
//!   temporary file and renaming it over the target avoids the question altogether.
//!
//! Every error is logged at `warn` (with file, object and field) when something changed, and
//! is in [`Snapshot::errors`](super::Snapshot::errors) and the `nodeward_config_errors` gauge while it lasts.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::publish::{Inputs, Publisher};
pub use super::publish::{OnPublish, ReloadOutcome};
use super::workloads::{
    load_workloads, Workload, WorkloadError, WorkloadsFileError, WorkloadsLoad,
};
use super::StateStore;
use super::DEFAULT_TRUST_DOMAIN;
use crate::extauthz::{MeshError, MeshProviders};
use crate::metrics::Metrics;
use crate::policy::{
    load_str, AuthorizationPolicy, LoadError, RequestAuthentication, DEFAULT_ROOT_NAMESPACE,
};

/// Quiet time after the last file event before a reload (editors write a temp file and
/// rename it, or write in several steps).
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(150);
/// Period of the full rescan that catches changes whose events were missed.
pub const DEFAULT_RESCAN: Duration = Duration::from_secs(30);
/// A stream of events holds a reload back at most this many debounce periods.
const MAX_DEBOUNCE_PERIODS: u32 = 10;

/// What `nodeward run` was told to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandaloneConfig {
    /// Policy files and directories (read recursively: `.yaml`, `.yml`, `.json`, hidden
    /// entries ignored), as `nodeward check` reads them.
    pub policies: Vec<PathBuf>,
    /// The workloads file ([`super::workloads`]).
    pub workloads: PathBuf,
    /// Istio's `MeshConfig` (`--mesh-config`): its `extensionProviders` serve CUSTOM policies.
    pub mesh_config: Option<PathBuf>,
    pub root_namespace: String,
    pub trust_domain: String,
    /// Quiet time after the last file event before a reload.
    pub debounce: Duration,
    /// Period of the full rescan (safety net for missed events).
    pub rescan: Duration,
}

impl StandaloneConfig {
    /// A configuration with Istio's defaults and the default timings.
    #[must_use]
    pub fn new(policies: Vec<PathBuf>, workloads: PathBuf) -> Self {
        Self {
            policies,
            workloads,
            mesh_config: None,
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            debounce: DEFAULT_DEBOUNCE,
            rescan: DEFAULT_RESCAN,
        }
    }
}

/// Why the standalone source cannot start; the daemon should refuse to run.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The workloads file cannot be read or is not a workloads file; there is no last good
    /// registry to serve with.
    #[error("{0}; nodeward needs a valid workloads file to start (an empty registry is `workloads: []`)")]
    Workloads(#[source] WorkloadsFileError),
    /// A path given with `--policies` cannot be read; starting without its policies would
    /// leave the workloads they protect open.
    #[error("cannot read policy path {}: {source}; check --policies", path.display())]
    Policies {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The `--mesh-config` file cannot be read or is no `MeshConfig`; starting without its
    /// providers would deny every request CUSTOM policies match.
    #[error("{0}; check --mesh-config")]
    MeshConfig(#[source] MeshError),
}

/// What started a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Start,
    /// [`Standalone::reload`].
    Call,
    /// A file event.
    Event,
    /// The periodic rescan: silent unless something changed.
    Rescan,
}

/// The objects one policy file contributes.
#[derive(Debug, Default, Clone, PartialEq)]
struct FileContent {
    authz: Vec<AuthorizationPolicy>,
    authn: Vec<RequestAuthentication>,
}

/// The standalone source: the content in force of every file, and the store it publishes to.
pub struct Standalone {
    config: StandaloneConfig,
    publisher: Publisher,
    /// Policy files seen, with the content in force (last good, or first seen).
    files: BTreeMap<PathBuf, FileContent>,
    /// The registry in force.
    workloads: Vec<Workload>,
    /// The `MeshConfig`'s providers in force (last good).
    mesh: Arc<MeshProviders>,
}

impl fmt::Debug for Standalone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Standalone")
            .field("config", &self.config)
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .field("workloads", &self.workloads.len())
            .finish_non_exhaustive()
    }
}

impl Standalone {
    /// Reads everything and publishes the first snapshot (the store's generation + 1).
    ///
    /// Fails when the workloads file cannot be used at all, or a `--policies` path cannot be
    /// read; errors inside policy files or workload entries are reported, not fatal.
    pub fn start(
        config: StandaloneConfig,
        store: Arc<StateStore>,
        metrics: Arc<Metrics>,
        on_publish: OnPublish,
    ) -> Result<Self, StartError> {
        let config = StandaloneConfig {
            policies: config.policies.iter().map(|p| absolute(p)).collect(),
            workloads: absolute(&config.workloads),
            ..config
        };
        let config = StandaloneConfig {
            mesh_config: config.mesh_config.as_deref().map(absolute),
            ..config
        };
        let registry = load_workloads(&config.workloads).map_err(StartError::Workloads)?;
        let mesh = match &config.mesh_config {
            Some(path) => MeshProviders::load(path).map_err(StartError::MeshConfig)?,
            None => MeshProviders::default(),
        };
        let mut scan = scan(&config.policies);
        if let Some(at) = scan
            .failed
            .iter()
            .position(|(path, _)| config.policies.contains(path))
        {
            let (path, source) = scan.failed.swap_remove(at);
            return Err(StartError::Policies { path, source });
        }
        let publisher = Publisher::new(
            store,
            metrics,
            on_publish,
            &config.trust_domain,
            &config.root_namespace,
        );
        let mut this = Self {
            config,
            publisher,
            files: BTreeMap::new(),
            workloads: Vec::new(),
            mesh: Arc::new(mesh),
        };
        this.reload_from(Trigger::Start, scan, Ok(registry));
        Ok(this)
    }

    /// The configuration, with paths made absolute.
    #[must_use]
    pub fn config(&self) -> &StandaloneConfig {
        &self.config
    }

    /// Reads every file again and publishes a snapshot if anything changed. Blocking (file
    /// reads and compilation); [`Standalone::watch`] calls it off the async workers.
    pub fn reload(&mut self) -> ReloadOutcome {
        self.reload_with(Trigger::Call)
    }

    /// Follows file changes until `shutdown`: each burst of events is debounced into one
    /// reload, and everything is rescanned every [`StandaloneConfig::rescan`].
    pub async fn watch(self, shutdown: CancellationToken) {
        let debounce = self.config.debounce;
        let rescan = self.config.rescan;
        let targets = Arc::new(WatchTargets::new(&self.config));
        let wake = Arc::new(Notify::new());
        let mut watcher = start_watcher(&targets, &wake);
        if let Some(watcher) = watcher.as_mut() {
            targets.watch(watcher, true);
        }
        let this = Arc::new(Mutex::new(self));
        // A rescan right away catches a change made before the watches were in place; a
        // deferred rescan (a file being written) is retried after one debounce period.
        let mut retry = Some(Instant::now());
        let mut tick = tokio::time::interval_at(Instant::now() + rescan, rescan);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let trigger = tokio::select! {
                () = shutdown.cancelled() => return,
                () = wake.notified() => {
                    if !super::publish::settle(&wake, debounce, debounce * MAX_DEBOUNCE_PERIODS, &shutdown)
                        .await
                    {
                        return;
                    }
                    Trigger::Event
                }
                () = at(retry) => Trigger::Rescan,
                _ = tick.tick() => {
                    // Watches are lost when a watched directory is removed and created again.
                    match watcher.as_mut() {
                        Some(watcher) => targets.watch(watcher, false),
                        None => watcher = start_watcher(&targets, &wake),
                    }
                    Trigger::Rescan
                }
            };
            let this = Arc::clone(&this);
            let reload = tokio::task::spawn_blocking(move || {
                let mut this = this.lock().unwrap_or_else(PoisonError::into_inner);
                if trigger == Trigger::Rescan {
                    this.rescan()
                } else {
                    this.reload_with(trigger);
                    true
                }
            });
            retry = match reload.await {
                Ok(true) => None,
                Ok(false) => Some(Instant::now() + debounce),
                Err(e) => {
                    error!(error = %e, "configuration reload failed; the state in force keeps serving");
                    None
                }
            };
        }
    }

    /// The periodic rescan; `false` when it was deferred because a file was written less than
    /// one debounce period ago: reading it now could see it half-written, and its events will
    /// trigger a reload anyway.
    fn rescan(&mut self) -> bool {
        let scan = scan(&self.config.policies);
        let now = SystemTime::now();
        let recent = scan
            .files
            .iter()
            .chain(std::iter::once(&self.config.workloads))
            .chain(self.config.mesh_config.as_ref())
            .filter_map(|file| std::fs::metadata(file).and_then(|m| m.modified()).ok())
            // A time in the future (clock skew) tells nothing: not recent.
            .any(|written| {
                now.duration_since(written)
                    .is_ok_and(|age| age < self.config.debounce)
            });
        if recent {
            debug!("rescan deferred: a file is being written");
            return false;
        }
        let registry = load_workloads(&self.config.workloads);
        self.reload_from(Trigger::Rescan, scan, registry);
        true
    }

    fn reload_with(&mut self, trigger: Trigger) -> ReloadOutcome {
        let scan = scan(&self.config.policies);
        let registry = load_workloads(&self.config.workloads);
        self.reload_from(trigger, scan, registry)
    }

    fn reload_from(
        &mut self,
        trigger: Trigger,
        scan: Scan,
        registry: Result<WorkloadsLoad, WorkloadsFileError>,
    ) -> ReloadOutcome {
        let mut issues = Vec::new();
        let removed = self.apply_policies(scan, &mut issues);
        self.apply_workloads(registry, &mut issues);
        self.apply_mesh(trigger, &mut issues);
        let inputs = Inputs {
            authz: self
                .files
                .values()
                .flat_map(|c| c.authz.iter().cloned())
                .collect(),
            authn: self
                .files
                .values()
                .flat_map(|c| c.authn.iter().cloned())
                .collect(),
            workloads: self.workloads.clone(),
            peers: Vec::new(),
            mesh: self.mesh.clone(),
            errors: issues.iter().map(Issue::message).collect(),
        };
        let files = self.files.len();
        self.publisher
            .offer(inputs, trigger == Trigger::Rescan, &trigger, || {
                for file in &removed {
                    info!(file = %file.display(), "policy file removed: its objects no longer apply");
                }
                for issue in &issues {
                    issue.log();
                }
                debug!(policy_files = files, "policy files in force");
            })
    }

    /// Brings every policy file's content in force up to date; returns the files dropped.
    fn apply_policies(&mut self, scan: Scan, issues: &mut Vec<Issue>) -> Vec<PathBuf> {
        // Files under a path that could not be listed keep their content.
        let unlisted = |file: &Path| scan.failed.iter().any(|(dir, _)| file.starts_with(dir));
        let removed: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|file| !scan.files.contains(*file) && !unlisted(file))
            .cloned()
            .collect();
        for file in &removed {
            self.files.remove(file);
        }
        for path in scan.files {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // Removed between listing and reading, like a file not listed at all; a path
                // named on the command line is kept, as if it could not be listed.
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        && !self.config.policies.contains(&path) =>
                {
                    self.files.remove(&path);
                    continue;
                }
                Err(source) => {
                    let kept = self
                        .files
                        .get(&path)
                        .is_some_and(|c| !c.authz.is_empty() || !c.authn.is_empty());
                    issues.push(Issue::PolicyRead { path, source, kept });
                    continue;
                }
            };
            let loaded = load_str(&path, &text);
            for skipped in &loaded.skipped {
                debug!("{skipped}");
            }
            let content = FileContent {
                authz: loaded.authorization_policies,
                authn: loaded.request_authentications,
            };
            if loaded.errors.is_empty() {
                self.files.insert(path, content);
                continue;
            }
            // A file with nothing in force (new, or empty so far, maybe read mid-write)
            // contributes its valid objects; one with content keeps it.
            let kept = self
                .files
                .get(&path)
                .is_some_and(|c| !c.authz.is_empty() || !c.authn.is_empty());
            if !kept {
                self.files.insert(path, content);
            }
            issues.extend(
                loaded
                    .errors
                    .into_iter()
                    .map(|error| Issue::Policy { error, kept }),
            );
        }
        for (path, source) in scan.failed {
            issues.push(Issue::PolicyPath { path, source });
        }
        removed
    }

    /// Brings the `MeshConfig`'s providers up to date (the start already read them); a file that
    /// cannot be read or parsed leaves the last good providers serving.
    fn apply_mesh(&mut self, trigger: Trigger, issues: &mut Vec<Issue>) {
        let Some(path) = &self.config.mesh_config else {
            return;
        };
        if trigger != Trigger::Start {
            match MeshProviders::load(path) {
                Ok(mesh) => {
                    if *self.mesh != mesh {
                        self.mesh = Arc::new(mesh);
                    }
                }
                Err(error) => issues.push(Issue::MeshFile { error }),
            }
        }
        for problem in self.mesh.problems() {
            issues.push(Issue::MeshProvider {
                path: path.clone(),
                problem,
            });
        }
    }

    /// Brings the registry in force up to date.
    fn apply_workloads(
        &mut self,
        registry: Result<WorkloadsLoad, WorkloadsFileError>,
        issues: &mut Vec<Issue>,
    ) {
        let load = match registry {
            Ok(load) => load,
            Err(error) => {
                issues.push(Issue::WorkloadsFile { error });
                return;
            }
        };
        let mut next = load.workloads;
        let ips: HashSet<IpAddr> = next.iter().map(|w| w.ip).collect();
        let ids: HashSet<(&str, &str)> = next
            .iter()
            .map(|w| (w.namespace.as_str(), w.name.as_str()))
            .collect();
        let mut kept: Vec<Workload> = Vec::new();
        for error in load.errors {
            // The version in force of a broken entry keeps serving, unless the new list has
            // its name or its address for another entry.
            let previous = error.id().and_then(|(namespace, name)| {
                self.workloads.iter().find(|w| {
                    w.namespace == namespace
                        && w.name == name
                        && !ids.contains(&(namespace, name))
                        && !ips.contains(&w.ip)
                })
            });
            if let Some(previous) = previous {
                if !kept.contains(previous) {
                    kept.push(previous.clone());
                }
            }
            issues.push(Issue::Workload {
                error,
                kept: previous.is_some(),
            });
        }
        next.extend(kept);
        self.workloads = next;
    }
}

/// One problem found by a reload.
#[derive(Debug)]
enum Issue {
    /// A `--policies` path, or a directory under it, cannot be listed.
    PolicyPath { path: PathBuf, source: io::Error },
    /// A policy file cannot be read.
    PolicyRead {
        path: PathBuf,
        source: io::Error,
        kept: bool,
    },
    /// A policy file has a YAML error or an invalid object.
    Policy { error: LoadError, kept: bool },
    /// The workloads file cannot be used at all.
    WorkloadsFile { error: WorkloadsFileError },
    /// One workload entry is invalid.
    Workload { error: WorkloadError, kept: bool },
    /// The `--mesh-config` file cannot be read or is no `MeshConfig`.
    MeshFile { error: MeshError },
    /// One extension provider of the `MeshConfig` is invalid.
    MeshProvider { path: PathBuf, problem: String },
}

const FILE_KEPT: &str =
    " (edit not applied: the last good content of this file keeps serving until it loads without errors)";
const FILE_NEW: &str = " (left out; the file's other objects apply)";

impl Issue {
    /// The operator's sentence, as it appears in [`Snapshot::errors`](super::Snapshot::errors).
    fn message(&self) -> String {
        match self {
            Self::PolicyPath { path, source } => format!(
                "cannot read policy path {}: {source}; the policies loaded from it keep serving",
                path.display()
            ),
            Self::PolicyRead { path, source, kept } => format!(
                "cannot read {}: {source}{}",
                path.display(),
                if *kept { FILE_KEPT } else { "" }
            ),
            Self::Policy { error, kept } => {
                format!("{error}{}", if *kept { FILE_KEPT } else { FILE_NEW })
            }
            Self::WorkloadsFile { error } => {
                format!("{error}; the last good registry keeps serving")
            }
            Self::MeshFile { error } => {
                format!("{error}; the last good extension providers keep serving")
            }
            Self::MeshProvider { path, problem } => format!(
                "{}: {problem}; CUSTOM policies naming it deny the requests they match",
                path.display()
            ),
            Self::Workload { error, kept } => format!(
                "{error}; {}",
                if *kept {
                    "its last good version keeps serving"
                } else {
                    "entry skipped"
                }
            ),
        }
    }

    fn log(&self) {
        let message = self.message();
        match self {
            Self::PolicyPath { path, .. } | Self::PolicyRead { path, .. } => {
                warn!(file = %path.display(), "{message}");
            }
            Self::Policy { error, kept } => match error {
                LoadError::Invalid {
                    origin,
                    kind,
                    object,
                    field,
                    ..
                } => warn!(
                    file = %origin.file.display(),
                    document = origin.document,
                    kind,
                    object = %object,
                    field = %field,
                    kept,
                    "{message}"
                ),
                LoadError::Yaml { origin, .. } => warn!(
                    file = %origin.file.display(),
                    document = origin.document,
                    kept,
                    "{message}"
                ),
                LoadError::Read { path, .. } => warn!(file = %path.display(), kept, "{message}"),
            },
            Self::WorkloadsFile { error } => {
                let path = match error {
                    WorkloadsFileError::Read { path, .. }
                    | WorkloadsFileError::Yaml { path, .. }
                    | WorkloadsFileError::MissingKey { path }
                    | WorkloadsFileError::NotAList { path }
                    | WorkloadsFileError::UnknownKey { path, .. } => path,
                };
                warn!(file = %path.display(), "{message}");
            }
            Self::MeshFile { error } => {
                let file = match error {
                    MeshError::Read { path, .. } => path.clone(),
                    MeshError::Parse { origin, .. } => origin.clone(),
                };
                warn!(file = %file, "{message}");
            }
            Self::MeshProvider { path, .. } => warn!(file = %path.display(), "{message}"),
            Self::Workload { error, kept } => warn!(
                file = %error.file.display(),
                index = error.index,
                object = %error.entry(),
                field = %error.field,
                kept,
                "{message}"
            ),
        }
    }
}

/// The policy files found under the configured paths, and the paths that could not be listed.
#[derive(Debug, Default)]
struct Scan {
    files: BTreeSet<PathBuf>,
    failed: Vec<(PathBuf, io::Error)>,
}

/// Lists the policy files the way `policy::load_paths` does (recursively; `.yaml`, `.yml`,
/// `.json`; hidden entries ignored; a path named directly is read whatever its extension),
/// but keeps going past a directory that cannot be listed and visits each directory once
/// (symbolic link loops).
fn scan(roots: &[PathBuf]) -> Scan {
    let mut out = Scan::default();
    let mut visited = HashSet::new();
    for root in roots {
        match std::fs::metadata(root) {
            Ok(meta) if meta.is_dir() => walk(root, &mut visited, &mut out),
            Ok(_) => {
                out.files.insert(root.clone());
            }
            Err(e) => out.failed.push((root.clone(), e)),
        }
    }
    out
}

fn walk(dir: &Path, visited: &mut HashSet<PathBuf>, out: &mut Scan) {
    if let Ok(real) = std::fs::canonicalize(dir) {
        if !visited.insert(real) {
            return;
        }
    }
    let listed = std::fs::read_dir(dir).and_then(|entries| {
        entries
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<Vec<_>>>()
    });
    let mut entries = match listed {
        Ok(entries) => entries,
        Err(e) => {
            out.failed.push((dir.to_path_buf(), e));
            return;
        }
    };
    entries.sort();
    for entry in entries {
        if hidden(&entry) {
            continue;
        }
        match std::fs::metadata(&entry) {
            Ok(meta) if meta.is_dir() => walk(&entry, visited, out),
            // A dangling link, or a file removed since it was listed, is no file.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // A file, or one we cannot look at (its read error is reported).
            Ok(_) | Err(_) => {
                if policy_extension(&entry) {
                    out.files.insert(entry);
                }
            }
        }
    }
}

fn hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn policy_extension(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Resolves at `deadline`, never without one.
async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// What to watch, and which events matter.
#[derive(Debug)]
struct WatchTargets {
    /// Policy directories, watched recursively.
    trees: Vec<PathBuf>,
    /// Files named directly (the workloads file, policy files given as paths); their
    /// directories are watched so that a rename onto them is seen.
    files: Vec<PathBuf>,
}

impl WatchTargets {
    fn new(config: &StandaloneConfig) -> Self {
        let (trees, mut files): (Vec<PathBuf>, Vec<PathBuf>) =
            config.policies.iter().cloned().partition(|p| p.is_dir());
        files.push(config.workloads.clone());
        files.extend(config.mesh_config.clone());
        Self { trees, files }
    }

    /// Directories of the named files that no tree covers.
    fn file_dirs(&self) -> BTreeSet<&Path> {
        self.files
            .iter()
            .filter_map(|f| f.parent())
            .filter(|dir| !self.trees.iter().any(|t| dir.starts_with(t)))
            .collect()
    }

    /// Adds (or renews) every watch; a failure leaves the periodic rescan to see changes.
    fn watch(&self, watcher: &mut RecommendedWatcher, first: bool) {
        let trees = self
            .trees
            .iter()
            .map(|t| (t.as_path(), RecursiveMode::Recursive));
        let dirs = self
            .file_dirs()
            .into_iter()
            .map(|d| (d, RecursiveMode::NonRecursive));
        for (path, mode) in trees.chain(dirs) {
            if let Err(e) = watcher.watch(path, mode) {
                if first {
                    warn!(path = %path.display(), error = %e, "cannot watch for changes; the periodic rescan will see them");
                } else {
                    debug!(path = %path.display(), error = %e, "cannot renew watch");
                }
            }
        }
    }

    /// An event that may change what is loaded. Our own reads (open, close without writing)
    /// do not count.
    fn relevant(&self, event: &Event) -> bool {
        if event.need_rescan() {
            return true;
        }
        if let EventKind::Access(kind) = event.kind {
            if kind != AccessKind::Close(AccessMode::Write) {
                return false;
            }
        }
        event.paths.is_empty() || event.paths.iter().any(|p| self.matters(p))
    }

    fn matters(&self, path: &Path) -> bool {
        if self.files.iter().any(|f| f == path) {
            return true;
        }
        // Kubernetes ConfigMap and Secret volumes swap a `..data` symbolic link.
        let swap = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(".."));
        if swap && self.files.iter().any(|f| f.parent() == path.parent()) {
            return true;
        }
        self.trees.iter().any(|tree| {
            let Ok(rest) = path.strip_prefix(tree) else {
                return false;
            };
            let hidden = rest.components().any(|c| {
                c.as_os_str()
                    .to_str()
                    .is_some_and(|s| s.starts_with('.') && !s.starts_with(".."))
            });
            // A directory, or a path gone (maybe a directory), may hold policy files.
            !hidden && (swap || policy_extension(path) || !path.is_file())
        })
    }
}

fn start_watcher(targets: &Arc<WatchTargets>, wake: &Arc<Notify>) -> Option<RecommendedWatcher> {
    let filter = Arc::clone(targets);
    let wake = Arc::clone(wake);
    let handler = move |event: notify::Result<Event>| match event {
        Ok(event) => {
            if filter.relevant(&event) {
                wake.notify_one();
            }
        }
        Err(e) => {
            warn!(error = %e, "file watcher error; reloading to be safe");
            wake.notify_one();
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            warn!(error = %e, "cannot watch files for changes; the periodic rescan will see them");
            None
        }
    }
}
