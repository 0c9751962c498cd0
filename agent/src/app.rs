//! The agent, started from one [`Config`]: [`start`] (or [`App::new`], then [`App::start`])
//! starts every part and returns a [`Bound`] with what it bound (the listener's and the admin
//! server's addresses) and what stops it. `nodeward run` is this plus flags and signals;
//! tests start the agent in-process the same way.
//!
//! Runtimes (ztunnel's rule: admin off the data plane):
//!
//! | thread / runtime | runs |
//! | --- | --- |
//! | data plane: multi-thread tokio (`nodeward-data`) | transparent listener, one task per connection; file watcher or Kubernetes watchers; JWKS refresh; netlink link events |
//! | admin: current-thread tokio on its own OS thread (`nodeward-admin`) | `/healthz`, `/readyz`, `/metrics`, `/debug/state`, added endpoints |
//!
//! Startup order: the kernel data path (when on), metrics, state store and JWKS store (every
//! published snapshot tells the JWKS store its sources and the data path its endpoints), the
//! standalone source's first snapshot or the Kubernetes client (its first snapshot is
//! published once every initial list is complete), readiness checks, the source's watcher,
//! interface following, the enforcer's listener, the admin server.
//!
//! [`Bound::stop`]: `/readyz` turns 503, the listener stops accepting, HTTP connections finish
//! their in-flight requests (graceful shutdown) within the drain timeout, the watcher stops,
//! the admin server stops, the data path is removed.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::{Admin, AdminServer, Endpoint, JwksMetrics};
use crate::authn::cache::TokenCache;
use crate::authn::fetch::{FetchConfig, FetchError, JwksStore, SourceState};
use crate::config::{Config, DatapathMode, FastPathMode, Steering};
use crate::datapath::node::{DatapathMetrics, NodeDatapath};
use crate::datapath::{DatapathConfig, DatapathError, DEFAULT_INPOD_MARK};
use crate::enforcer::{transparent_listener, Enforcer, EnforcerConfig, Limits};
use crate::inpod::PodListeners;
use crate::kubernetes::{self, Health, Kubernetes, KubernetesConfig, KubernetesMetrics};
use crate::metrics::Metrics;
use crate::readiness::Readiness;
use crate::state::standalone::{OnPublish, Standalone, StandaloneConfig, StartError};
use crate::state::{Snapshot, StateStore};

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tokio runtime could not be built (thread or file-descriptor limits).
    #[error("starting the data-plane runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The JWKS fetcher could not be built (TLS roots).
    #[error("{0}")]
    Jwks(#[source] FetchError),
    /// The kernel data path could not start (the message says what to check).
    #[error("starting the kernel data path: {0}")]
    Datapath(#[source] DatapathError),
    /// The standalone configuration cannot be used at all.
    #[error("{0}")]
    Config(#[source] StartError),
    /// Standalone mode without its inputs.
    #[error("--policies and --workloads are required without --kubernetes")]
    MissingInputs,
    /// Kubernetes mode without a usable client configuration.
    #[error("{0}")]
    Kubernetes(#[source] kubernetes::ClientError),
    /// The enforcer's transparent listener could not be opened.
    #[error("cannot listen on {addr} (--listen): {source}{}", listen_hint(source))]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The admin server could not bind or start.
    #[error("cannot serve the admin API on {addr} (--admin): {source}")]
    Admin {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The fast path without the data path it rides on.
    #[error("--fast-path on needs --datapath on: the fast path only carries connections the kernel data path steered")]
    FastPathWithoutDatapath,
}

fn listen_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "; the transparent listener sets IP_TRANSPARENT, which needs CAP_NET_ADMIN (run as root or grant the capability)"
        }
        std::io::ErrorKind::AddrInUse => "; another process listens there",
        std::io::ErrorKind::AddrNotAvailable => "; the address is not one of this host's",
        _ => "",
    }
}

impl Error {
    /// The configuration cannot start as given (as opposed to a failure at run time).
    #[must_use]
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            Self::Config(_)
                | Self::FastPathWithoutDatapath
                | Self::MissingInputs
                | Self::Kubernetes(_)
        )
    }
}

/// Starts the agent from `config`.
pub fn start(config: Config) -> Result<Bound, Error> {
    App::new(config)?.start()
}

/// The agent before it starts: the configuration is checked and the data-plane runtime built,
/// nothing runs yet.
#[derive(Debug)]
pub struct App {
    config: Config,
    runtime: Runtime,
    endpoints: Vec<Endpoint>,
}

impl App {
    /// Checks `config` (an input-less standalone mode, a fast path without data path) and
    /// builds the data-plane runtime.
    pub fn new(config: Config) -> Result<Self, Error> {
        if config.fast_path == FastPathMode::On && config.datapath == DatapathMode::Off {
            // `auto` without a data path is simply off.
            return Err(Error::FastPathWithoutDatapath);
        }

        if config.kubernetes.is_none() && (config.policies.is_empty() || config.workloads.is_none())
        {
            return Err(Error::MissingInputs);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("nodeward-data")
            .build()
            .map_err(Error::Runtime)?;
        Ok(Self {
            config,
            runtime,
            endpoints: Vec::new(),
        })
    }

    /// The data-plane runtime (signal handlers are installed there before the agent starts).
    #[must_use]
    pub fn handle(&self) -> &Handle {
        self.runtime.handle()
    }

    /// Adds an endpoint to the admin server.
    pub fn add_admin_endpoint(&mut self, endpoint: Endpoint) {
        self.endpoints.push(endpoint);
    }

    /// Starts every part, in the order of the module documentation.
    pub fn start(self) -> Result<Bound, Error> {
        let Self {
            config,
            runtime,
            endpoints,
        } = self;
        let (pods, opened) = pod_listeners(&config);
        let datapath = start_datapath(&config, pods.clone())?;
        let state = match start_state(&config, runtime.handle(), datapath.as_ref()) {
            Ok(state) => state,
            Err(e) => {
                stop_datapath(datapath.as_ref());
                return Err(e);
            }
        };
        let readiness = Arc::new(Readiness::new());
        let (listening, stopping) = readiness_checks(&readiness, &state.store, &state.jwks);
        if let Source::Kubernetes(_, health) = &state.source {
            health.add_checks(&readiness);
        }
        if let Some(datapath) = &datapath {
            datapath.add_readiness(&readiness);
        }

        let shutdown = CancellationToken::new();
        let watcher = runtime.spawn(state.source.watch(shutdown.clone()));
        if let Some(datapath) = &datapath {
            let follow =
                Arc::clone(datapath).follow_interfaces(Arc::clone(&state.store), shutdown.clone());
            runtime.spawn(follow);
        }

        let listener = {
            let _in_runtime = runtime.enter();
            transparent_listener(config.listen).map_err(|source| Error::Listen {
                addr: config.listen,
                source,
            })?
        };
        let listen = listener.local_addr().unwrap_or(config.listen);
        let cache = TokenCache::default();
        let stores = (&state.store, &state.jwks, &state.metrics);
        let enforcer = new_enforcer(&config, stores, &cache, pods.as_deref());
        let tracker = TaskTracker::new();
        if let Some(opened) = opened {
            let pods = crate::inpod::serve(
                Arc::clone(&enforcer),
                opened,
                shutdown.clone(),
                tracker.clone(),
            );
            runtime.spawn(pods);
        }
        let accepting =
            runtime.spawn(enforcer.run_listener(listener, shutdown.clone(), tracker.clone()));
        listening.store(true, Ordering::Release);
        info!(%listen, failure_mode = config.failure_mode.as_str(), "enforcer listening");

        let admin_addr = config.admin;
        let admin_error = move |source| Error::Admin {
            addr: admin_addr,
            source,
        };
        let admin_listener = std::net::TcpListener::bind(config.admin).map_err(admin_error)?;
        let drain_timeout = config.drain_timeout;
        let store = Arc::clone(&state.store);
        let admin = AdminServer::start(
            admin_listener,
            Arc::new(Admin {
                store: state.store,
                jwks: state.jwks,
                jwks_metrics: state.jwks_metrics,
                cache,
                metrics: state.metrics,
                readiness: Arc::clone(&readiness),
                normalization: config.path_normalization,
                config,
                datapath: datapath.clone(),
                endpoints,
            }),
        )
        .map_err(admin_error)?;
        info!(admin = %admin.local_addr(), "admin server listening");

        Ok(Bound {
            listen,
            store,
            readiness,
            runtime,
            admin,
            running: Running {
                shutdown,
                accepting,
                tracker,
                watcher,
                stopping,
            },
            datapath,
            drain_timeout,
        })
    }
}

/// A running agent: what it bound, and [`Bound::stop`].
///
/// Dropping it without `stop` ends the tasks and the admin server but leaves the kernel data
/// path attached (the next run takes it over).
#[derive(Debug)]
pub struct Bound {
    listen: SocketAddr,
    store: Arc<StateStore>,
    readiness: Arc<Readiness>,
    runtime: Runtime,
    admin: AdminServer,
    running: Running,
    datapath: Option<Arc<NodeDatapath>>,
    drain_timeout: Duration,
}

impl Bound {
    /// The enforcer's transparent listener (the port chosen when the configuration said 0).
    #[must_use]
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The admin server.
    #[must_use]
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.local_addr()
    }

    /// The state in force.
    #[must_use]
    pub fn store(&self) -> &Arc<StateStore> {
        &self.store
    }

    /// The readiness checks `/readyz` evaluates.
    #[must_use]
    pub fn readiness(&self) -> &Arc<Readiness> {
        &self.readiness
    }

    /// Runs `future` on the data-plane runtime until it completes (`nodeward run` waits for a
    /// signal this way).
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Stops the agent, `cause` naming why in the log: `/readyz` 503, no more accepting,
    /// in-flight requests finish within the drain timeout, the watcher and the admin server
    /// stop, the data path is removed.
    pub fn stop(self, cause: &str) {
        self.runtime
            .block_on(drain(self.running, cause, self.drain_timeout));
        self.admin.stop();
        self.runtime.shutdown_timeout(Duration::from_secs(1));
        stop_datapath(self.datapath.as_ref());
        info!("nodeward stopped");
    }
}

/// The `listener` and `running` flags are the app's own; `config` and `jwks` read the stores.
/// Returns the flags of `listener` and `running`.
fn readiness_checks(
    readiness: &Readiness,
    store: &Arc<StateStore>,
    jwks: &JwksStore,
) -> (Arc<AtomicBool>, Arc<AtomicBool>) {
    let config = Arc::clone(store);
    readiness.add_check("config", move || {
        let snapshot = config.load();
        if snapshot.generation >= 1 {
            Ok(format!(
                "generation {}, {} error(s)",
                snapshot.generation,
                snapshot.errors.len()
            ))
        } else {
            Err("no configuration published yet".into())
        }
    });
    let keys = jwks.clone();
    readiness.add_check("jwks", move || {
        let status = keys.status();
        if keys.ready() {
            let failed = status
                .iter()
                .filter(|s| s.state == SourceState::Failed)
                .count();
            Ok(format!(
                "{} source(s) answered, {failed} without keys",
                status.len()
            ))
        } else {
            let pending: Vec<&str> = status
                .iter()
                .filter(|s| s.state == SourceState::Pending)
                .map(|s| s.key.as_str())
                .collect();
            Err(format!(
                "waiting for the first answer of {}",
                pending.join(", ")
            ))
        }
    });
    let listening = readiness.add_flag("listener", "the enforcer is not listening yet");
    let stopping = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&stopping);
    readiness.add_check("running", move || {
        if seen.load(Ordering::Acquire) {
            Err("shutting down: draining connections".into())
        } else {
            Ok("ok".into())
        }
    });
    (listening, stopping)
}

/// Where the state comes from.
enum Source {
    Standalone(Standalone),
    Kubernetes(Kubernetes, Arc<Health>),
}

impl Source {
    /// Follows changes until `shutdown`.
    async fn watch(self, shutdown: CancellationToken) {
        match self {
            Self::Standalone(standalone) => standalone.watch(shutdown).await,
            Self::Kubernetes(kubernetes, _) => kubernetes.run(shutdown).await,
        }
    }
}

/// The state side of the agent: metrics, the state store fed by the source, and the JWKS
/// store fed by every published snapshot.
struct State {
    metrics: Arc<Metrics>,
    jwks: JwksStore,
    jwks_metrics: JwksMetrics,
    store: Arc<StateStore>,
    source: Source,
}

/// Metrics first (every part registers or counts into them), then the stores, then the
/// standalone source's first snapshot (or the Kubernetes client).
fn start_state(
    config: &Config,
    handle: &Handle,
    datapath: Option<&Arc<NodeDatapath>>,
) -> Result<State, Error> {
    let mut metrics = Metrics::new();
    if let Some(datapath) = datapath {
        metrics
            .registry_mut()
            .register_collector(Box::new(DatapathMetrics(Arc::clone(datapath))));
    }
    let jwks = {
        let _in_runtime = handle.enter();
        JwksStore::new(FetchConfig::default()).map_err(Error::Jwks)?
    };
    let jwks_metrics = JwksMetrics::new(jwks.clone());
    metrics
        .registry_mut()
        .register_collector(Box::new(jwks_metrics.clone()));
    let health = config.kubernetes.as_ref().map(|_| Arc::new(Health::new()));
    if let Some(health) = &health {
        metrics
            .registry_mut()
            .register_collector(Box::new(KubernetesMetrics(Arc::clone(health))));
    }
    let metrics = Arc::new(metrics);

    // Every published snapshot tells the JWKS store its sources. The hook runs on the thread
    // that reloaded (this one at start, a blocking-pool thread later): enter the data-plane
    // runtime, where the refresh tasks live.
    let store = Arc::new(StateStore::new(Snapshot::empty(
        &config.trust_domain,
        &config.root_namespace,
    )));
    let on_publish: OnPublish = {
        let jwks = jwks.clone();
        let handle = handle.clone();
        let datapath = datapath.cloned();
        Arc::new(move |snapshot: &Arc<Snapshot>| {
            let _in_runtime = handle.enter();
            jwks.set_sources(snapshot.authn.remote_sources());
            // The kernel's endpoint map follows every change of what is protected.
            if let Some(datapath) = &datapath {
                datapath.sync(snapshot);
            }
        })
    };
    if let (Some(kubernetes), Some(health)) = (&config.kubernetes, health) {
        let client = handle
            .block_on(kubernetes::client(kubernetes.kubeconfig.as_deref()))
            .map_err(Error::Kubernetes)?;
        info!(node = %kubernetes.node_name, "Kubernetes mode: waiting for the initial lists of pods and policies");
        let source_config = KubernetesConfig {
            node_name: kubernetes.node_name.clone(),
            root_namespace: config.root_namespace.clone(),
            trust_domain: config.trust_domain.clone(),
            debounce: kubernetes::source::DEFAULT_DEBOUNCE,
        };
        let source = Kubernetes::new(
            client,
            source_config,
            Arc::clone(&store),
            Arc::clone(&metrics),
            Arc::clone(&health),
            on_publish,
        );
        return Ok(State {
            metrics,
            jwks,
            jwks_metrics,
            store,
            source: Source::Kubernetes(source, health),
        });
    }
    let Some(workloads) = config
        .workloads
        .clone()
        .filter(|_| !config.policies.is_empty())
    else {
        return Err(Error::MissingInputs);
    };
    let standalone_config = StandaloneConfig {
        root_namespace: config.root_namespace.clone(),
        trust_domain: config.trust_domain.clone(),
        mesh_config: config.mesh_config.clone(),
        ..StandaloneConfig::new(config.policies.clone(), workloads)
    };
    let standalone = Standalone::start(
        standalone_config,
        Arc::clone(&store),
        Arc::clone(&metrics),
        on_publish,
    )
    .map_err(Error::Config)?;
    let first = store.load();
    info!(
        generation = first.generation,
        workloads = first.workloads.len(),
        authorization_policies = first.authz.len(),
        errors = first.errors.len(),
        "configuration loaded"
    );
    Ok(State {
        metrics,
        jwks,
        jwks_metrics,
        store,
        source: Source::Standalone(standalone),
    })
}

/// The enforcer over the state's stores; under in-pod steering it dials pods from their own
/// namespaces.
fn new_enforcer(
    config: &Config,
    (store, jwks, metrics): (&Arc<StateStore>, &JwksStore, &Arc<Metrics>),
    cache: &TokenCache,
    pods: Option<&PodListeners>,
) -> Arc<Enforcer> {
    Enforcer::new(
        Arc::clone(store),
        Arc::new(jwks.clone()),
        cache.clone(),
        Arc::clone(metrics),
        EnforcerConfig {
            pod_namespaces: pods.map(PodListeners::namespaces),
            ..enforcer_config(config)
        },
    )
}

/// In-pod steering's listeners and the receiver of each pod's, when the configuration has it.
fn pod_listeners(
    config: &Config,
) -> (
    Option<Arc<PodListeners>>,
    Option<tokio::sync::mpsc::UnboundedReceiver<crate::inpod::Opened>>,
) {
    match (config.datapath, config.steering) {
        (DatapathMode::On, Steering::InPod) => {
            let (pods, opened) = PodListeners::new(
                config.netns_dir.clone(),
                config.listen.port(),
                DEFAULT_INPOD_MARK,
            );
            (Some(pods), Some(opened))
        }
        _ => (None, None),
    }
}

/// The kernel data path, attached, when the configuration has it on.
fn start_datapath(
    config: &Config,
    pods: Option<Arc<PodListeners>>,
) -> Result<Option<Arc<NodeDatapath>>, Error> {
    let Some(datapath_config) = datapath_config(config) else {
        info!("kernel data path off: the enforcer runs alone");
        return Ok(None);
    };
    let datapath = NodeDatapath::start(datapath_config, pods).map_err(Error::Datapath)?;
    info!(
        listener_port = config.listen.port(),
        steering = config.steering.as_str(),
        failure_mode = config.failure_mode.as_str(),
        fast_path = ?config.fast_path,
        "kernel data path attached"
    );
    Ok(Some(datapath))
}

/// The data path's settings; `None` with the data path off.
fn datapath_config(config: &Config) -> Option<DatapathConfig> {
    (config.datapath == DatapathMode::On).then(|| DatapathConfig {
        listener_port: config.listen.port(),
        pin_dir: config.bpf_pin_dir.clone(),
        failure_mode: config.failure_mode,
        fast_path: fast_path_cgroup(config, crate::datapath::cgroup2_root, |p| {
            crate::datapath::check_cgroup(p).is_ok()
        }),
        steering: config.steering,
        steer_mark: config.steer_mark,
        upstream_mark: config.upstream_mark,
        ..DatapathConfig::default()
    })
}

/// The cgroup v2 the fast path attaches to, `None` for no fast path. `on`, or an explicit
/// `--cgroup`, is taken as given (the data path refuses what is not a cgroup v2, with the
/// fix); `auto` without `--cgroup` uses the cgroup v2 root when there is one and otherwise
/// runs without the fast path, saying so.
fn fast_path_cgroup(
    config: &Config,
    root: impl FnOnce() -> PathBuf,
    is_cgroup2: impl FnOnce(&Path) -> bool,
) -> Option<PathBuf> {
    match (config.fast_path, &config.cgroup) {
        (FastPathMode::Off, _) => None,
        (FastPathMode::On | FastPathMode::Auto, Some(cgroup)) => Some(cgroup.clone()),
        (FastPathMode::On, None) => Some(root()),
        (FastPathMode::Auto, None) => {
            let root = root();
            if is_cgroup2(&root) {
                Some(root)
            } else {
                warn!(
                    cgroup = %root.display(),
                    "no cgroup v2 found (is /sys/fs/cgroup hidden, as under `ip netns exec`?): the \
                     same-node fast path is off; requests are judged as always. Pass --cgroup DIR \
                     to use one, or --fast-path off to silence this"
                );
                None
            }
        }
    }
}

fn enforcer_config(config: &Config) -> EnforcerConfig {
    EnforcerConfig {
        limits: Limits {
            max_header_bytes: config.max_header_bytes,
            max_headers: config.max_headers,
            header_read_timeout: config.header_read_timeout,
            detect_timeout: config.detect_timeout,
            ..Limits::default()
        },
        path_normalization: config.path_normalization,
        drain_timeout: config.drain_timeout,
        // Host steering: the kernel's guard lets into a protected pod only what carries this
        // mark. In-pod steering: the enforcer's sockets carry the in-pod mark (the fast path
        // knows them by it).
        upstream_mark: datapath_config(config).map_or(0, |d| match d.steering {
            Steering::Host => d.upstream_mark,
            Steering::InPod => d.inpod_mark,
        }),
        ..EnforcerConfig::default()
    }
}

/// What stopping stops, in order.
#[derive(Debug)]
struct Running {
    shutdown: CancellationToken,
    accepting: tokio::task::JoinHandle<()>,
    tracker: TaskTracker,
    watcher: tokio::task::JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

/// `/readyz` 503, no more accepting, in-flight requests finish within `drain`, the watcher
/// stops.
async fn drain(running: Running, cause: &str, drain: Duration) {
    running.stopping.store(true, Ordering::Release);
    info!(
        signal = cause,
        open = running.tracker.len(),
        drain_timeout = %humantime::format_duration(drain),
        "shutting down: no longer accepting; letting in-flight requests finish"
    );
    running.shutdown.cancel();
    if let Err(e) = running.accepting.await {
        warn!(error = %e, "the listener task ended abnormally");
    }
    running.tracker.close();
    if tokio::time::timeout(drain, running.tracker.wait())
        .await
        .is_ok()
    {
        info!("every connection finished");
    } else {
        warn!(
            cut = running.tracker.len(),
            "drain timeout reached; closing the connections still open"
        );
    }
    if let Err(e) = running.watcher.await {
        warn!(error = %e, "the file watcher ended abnormally");
    }
}

/// A clean stop removes every program, pin, rule and route the agent made (host steering), or
/// leaves the in-pod programs enforcing `--failure-mode` for the next agent.
fn stop_datapath(datapath: Option<&Arc<NodeDatapath>>) {
    if let Some(datapath) = datapath {
        match datapath.shutdown() {
            Ok(true) => info!("kernel data path removed"),
            Ok(false) => info!("kernel data path left attached in the pods: new connections get --failure-mode until the next agent takes over; `nodeward uninstall` removes it"),
            Err(e) => warn!(error = %e, "removing the kernel data path"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(fast_path: FastPathMode, cgroup: Option<&str>) -> Config {
        Config {
            fast_path,
            cgroup: cgroup.map(PathBuf::from),
            ..Config::default()
        }
    }

    #[test]
    fn the_fast_path_degrades_only_when_not_asked_for() {
        let root = || PathBuf::from("/sys/fs/cgroup");
        let found = |_: &Path| true;
        let none = |_: &Path| false;
        // auto: on where there is a cgroup v2, else off (the agent still starts).
        assert_eq!(
            fast_path_cgroup(&with(FastPathMode::Auto, None), root, found),
            Some(root())
        );
        assert_eq!(
            fast_path_cgroup(&with(FastPathMode::Auto, None), root, none),
            None
        );
        // on: taken as given; the data path refuses a directory that is not a cgroup v2.
        assert_eq!(
            fast_path_cgroup(&with(FastPathMode::On, None), root, none),
            Some(root())
        );
        // An explicit --cgroup is a request: never silently dropped.
        assert_eq!(
            fast_path_cgroup(&with(FastPathMode::Auto, Some("/x")), root, none),
            Some(PathBuf::from("/x"))
        );
        assert_eq!(
            fast_path_cgroup(&with(FastPathMode::Off, Some("/x")), root, found),
            None
        );
    }
}
