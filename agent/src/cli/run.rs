//! `nodeward run`: the agent. Policies and the registry of pods come from files that are
//! watched (standalone mode) or from the Kubernetes API (`--kubernetes`); the enforcer serves
//! steered connections on a transparent listener; the admin server answers health, readiness,
//! metrics, state and checks.
//!
//! Runtimes (ztunnel's rule: admin off the data plane):
//!
//! | thread / runtime | runs |
//! | --- | --- |
//! | data plane: multi-thread tokio (`nodeward-data`) | transparent listener, one task per connection; file watcher or Kubernetes watchers; JWKS refresh |
//! | admin: current-thread tokio on its own OS thread (`nodeward-admin`) | `/healthz`, `/readyz`, `/metrics`, `/debug/state`, `POST /check` |
//!
//! Startup order: metrics, state store and JWKS store (every published snapshot tells the
//! JWKS store its sources), the standalone source (a configuration that cannot start exits 2)
//! or the Kubernetes client (no usable configuration exits 2; its first snapshot is published
//! once every initial list is complete), its watcher, the enforcer's listener (exit 1 when it cannot bind), the admin server.
//!
//! Shutdown (SIGTERM or SIGINT): `/readyz` turns 503, the listener stops accepting, HTTP
//! connections finish their in-flight requests (graceful shutdown) within `--drain-timeout`,
//! then the process exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::LogFormat;
use crate::admin::{Admin, AdminServer, AgentConfig, JwksMetrics};
use crate::authn::cache::TokenCache;
use crate::authn::fetch::{FetchConfig, FetchError, JwksStore, SourceState};
use crate::authz::path::Normalization;
use crate::datapath::node::{DatapathMetrics, NodeDatapath};
use crate::datapath::DatapathConfig;
use crate::enforcer::{transparent_listener, Enforcer, EnforcerConfig, Limits};
use crate::kubernetes::{self, Health, Kubernetes, KubernetesConfig, KubernetesMetrics};
use crate::metrics::Metrics;
use crate::policy::DEFAULT_ROOT_NAMESPACE;
use crate::readiness::Readiness;
use crate::state::standalone::{OnPublish, Standalone, StandaloneConfig, StartError};
use crate::state::{Snapshot, StateStore, DEFAULT_TRUST_DOMAIN};

/// What the kernel datapath does with traffic to a protected workload while the enforcer
/// cannot take it (agent stopped or restarting). Carried in the configuration and shown by
/// `/debug/state` and `nodeward status`; the datapath applies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Refuse it: nothing reaches a protected pod unjudged.
    Closed,
    /// Let it through unjudged: availability over enforcement.
    Open,
}

impl FailureMode {
    /// `closed` or `open`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }
}

/// Whether `nodeward run` drives the kernel data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatapathMode {
    On,
    Off,
}

/// Whether the data path runs the same-node fast path (`sock_ops` + `sk_msg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file or directory (YAML, read recursively); repeatable (comma-separated in
    /// `NODEWARD_POLICIES`). Watched: a change is applied at once, a bad edit is reported and the file's last good content keeps serving.
    #[arg(
        long = "policies",
        env = "NODEWARD_POLICIES",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes",
        value_name = "DIR",
        value_delimiter = ','
    )]
    pub policies: Vec<PathBuf>,
    /// The registry of pods (`workloads:` list; see examples/workloads.yaml). Watched.
    #[arg(
        long,
        env = "NODEWARD_WORKLOADS",
        value_name = "FILE",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub workloads: Option<PathBuf>,
    /// Kubernetes mode: pods and policies come from the API server (watched) instead of
    /// `--policies`/`--workloads`.
    #[arg(long, env = "NODEWARD_KUBERNETES")]
    pub kubernetes: bool,
    /// This node's name, whose pods the agent protects (with `--kubernetes`; required). Also
    /// read from `NODE_NAME` (the Downward API's usual name) when `NODEWARD_NODE_NAME` is unset.
    #[arg(
        long,
        env = "NODEWARD_NODE_NAME",
        value_name = "NAME",
        requires = "kubernetes"
    )]
    pub node_name: Option<String>,
    /// Kubeconfig file (with `--kubernetes`); without it: `KUBECONFIG`, `~/.kube/config`, then
    /// the in-cluster service account.
    #[arg(
        long,
        env = "NODEWARD_KUBECONFIG",
        value_name = "FILE",
        requires = "kubernetes"
    )]
    pub kubeconfig: Option<PathBuf>,
    /// Admin server address (/healthz, /readyz, /metrics, /debug/state, /check). It has no
    /// authentication: keep it on loopback.
    #[arg(
        long,
        env = "NODEWARD_ADMIN",
        default_value = "127.0.0.1:15000",
        value_name = "ADDR"
    )]
    pub admin: SocketAddr,
    /// The enforcer's transparent listener, where the datapath steers pod-bound connections
    /// (`IP_TRANSPARENT`: needs `CAP_NET_ADMIN`).
    #[arg(
        long,
        env = "NODEWARD_LISTEN",
        default_value = "0.0.0.0:15006",
        value_name = "ADDR"
    )]
    pub listen: SocketAddr,
    /// What steered traffic gets while the enforcer cannot take it.
    #[arg(long, env = "NODEWARD_FAILURE_MODE", value_enum, default_value_t = FailureMode::Closed)]
    pub failure_mode: FailureMode,
    /// The kernel data path: `on` loads and attaches the steering programs in this network
    /// namespace (the node's); `off` runs the enforcer alone, for when connections reach its
    /// listener some other way (tests on loopback, a demo without pods).
    #[arg(long, env = "NODEWARD_DATAPATH", value_enum, default_value_t = DatapathMode::On)]
    pub datapath: DatapathMode,
    /// The same-node fast path: bytes between the enforcer and pods of this node go from socket
    /// to socket (`sock_ops` + `sk_msg`), skipping the TCP/IP stack; connections still open
    /// through the steering, and every request is still judged. Default: `on` with
    /// `--datapath on` (`cargo xtask bench` measured it: see BENCHMARKS.md), off without a
    /// data path; `on` with `--datapath off` is refused. `off` leaves none of it attached, also
    /// when a previous run left it.
    #[arg(long, env = "NODEWARD_FAST_PATH", value_enum, value_name = "on|off")]
    pub fast_path: Option<FastPathMode>,
    /// The cgroup v2 directory the fast path's `sock_ops` program is attached to (sockets of
    /// processes in it and below are considered; only those of protected endpoints join).
    /// Default: the cgroup v2 root, as Cilium does: /sys/fs/cgroup, or on a hybrid hierarchy
    /// where the `cgroup2` file system is mounted (often /sys/fs/cgroup/unified).
    #[arg(long, env = "NODEWARD_CGROUP", value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Where the data path pins its programs and maps on the BPF filesystem (a restarted agent
    /// takes them over from there).
    #[arg(
        long,
        env = "NODEWARD_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/nodeward",
        value_name = "DIR"
    )]
    pub bpf_pin_dir: PathBuf,
    /// Namespace whose policies apply mesh-wide.
    #[arg(long, env = "NODEWARD_ROOT_NAMESPACE", default_value = DEFAULT_ROOT_NAMESPACE, value_name = "NS")]
    pub root_namespace: String,
    /// Trust domain of source principals (`<td>/ns/<ns>/sa/<sa>`).
    #[arg(long, env = "NODEWARD_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN, value_name = "DOMAIN")]
    pub trust_domain: String,
    /// Path normalization, as Istio's meshConfig.pathNormalization; the normalized path is
    /// what the pod receives.
    #[arg(long, env = "NODEWARD_PATH_NORMALIZATION", value_enum, default_value_t = Normalization::Base)]
    pub path_normalization: Normalization,
    /// Largest request head (request line and headers), bytes.
    #[arg(long, env = "NODEWARD_MAX_HEADER_BYTES", default_value_t = Limits::default().max_header_bytes, value_name = "BYTES")]
    pub max_header_bytes: usize,
    /// Most header fields in a request.
    #[arg(long, env = "NODEWARD_MAX_HEADERS", default_value_t = Limits::default().max_headers, value_name = "N")]
    pub max_headers: usize,
    /// Time a client has to send a request head (also between keep-alive requests).
    #[arg(long, env = "NODEWARD_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Duration,
    /// Time a client on a port of undeclared protocol has to send its first byte before the pod
    /// may speak first (server-first protocols); `0s` waits forever. A late HTTP request is
    /// still judged as HTTP.
    #[arg(long, env = "NODEWARD_DETECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub detect_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish before the agent exits.
    #[arg(long, env = "NODEWARD_DRAIN_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration, value_name = "DURATION")]
    pub drain_timeout: Duration,
    /// Log format of every log line, the access log (target `access`) included. Filter with
    /// `NODEWARD_LOG` (default `info`; the access log stays on unless the filter names `access`,
    /// e.g. `warn,access=off`).
    #[arg(long, env = "NODEWARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Why the agent could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A tokio runtime could not be built (thread or file-descriptor limits).
    #[error("starting the data-plane runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The JWKS fetcher could not be built (TLS roots).
    #[error("{0}")]
    Jwks(#[source] FetchError),
    /// The kernel data path could not start (the message says what to check).
    #[error("starting the kernel data path: {0}")]
    Datapath(#[source] crate::datapath::DatapathError),
    /// The standalone configuration cannot be used at all.
    #[error("{0}")]
    Config(#[source] StartError),
    /// Standalone mode without its inputs (clap cannot tell `NODEWARD_KUBERNETES=false` from
    /// `--kubernetes` when it checks required flags).
    #[error("--policies and --workloads are required without --kubernetes")]
    MissingInputs,
    /// Kubernetes mode without `--node-name`.
    #[error("--kubernetes needs --node-name (or NODEWARD_NODE_NAME, or NODE_NAME from the Downward API: spec.nodeName)")]
    NodeName,
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
    /// `--fast-path on` without the data path it rides on.
    #[error("--fast-path on needs --datapath on: the fast path only carries connections the kernel data path steered")]
    FastPathWithoutDatapath,
    /// SIGTERM/SIGINT handlers could not be installed.
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
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

impl RunError {
    /// 2 for a configuration that cannot start, 1 for everything else.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_)
            | Self::FastPathWithoutDatapath
            | Self::MissingInputs
            | Self::NodeName
            | Self::Kubernetes(_) => 2,
            _ => 1,
        }
    }
}

/// Runs the agent until SIGTERM/SIGINT; returns the exit status.
#[must_use]
pub fn run(args: &RunArgs) -> u8 {
    match run_agent(args) {
        Ok(()) => 0,
        Err(e) => {
            error!("{e}");
            e.exit_code()
        }
    }
}

fn agent_config(args: &RunArgs) -> AgentConfig {
    let name = |n: Normalization| {
        n.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    };
    AgentConfig {
        failure_mode: args.failure_mode,
        listen: args.listen,
        admin: args.admin,
        root_namespace: args.root_namespace.clone(),
        trust_domain: args.trust_domain.clone(),
        policies: args
            .policies
            .iter()
            .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
            .collect(),
        workloads: args
            .workloads
            .as_ref()
            .map(|w| std::path::absolute(w).unwrap_or_else(|_| w.clone()))
            .unwrap_or_default(),
        kubernetes: node_name(args).map(|node| crate::admin::state::KubernetesInfo {
            node_name: node,
            kubeconfig: args.kubeconfig.clone(),
        }),
        path_normalization: name(args.path_normalization),
        drain_timeout: humantime::format_duration(args.drain_timeout).to_string(),
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        header_read_timeout: humantime::format_duration(args.header_read_timeout).to_string(),
        detect_timeout: humantime::format_duration(args.detect_timeout).to_string(),
    }
}

/// `--node-name`, else `NODE_NAME`, in Kubernetes mode.
fn node_name(args: &RunArgs) -> Option<String> {
    if !args.kubernetes {
        return None;
    }
    args.node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty())
}

/// The readiness checks of the standalone agent: `config`, `jwks`, `listener`, `running`.
/// Returns the flags of the last two.
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
    args: &RunArgs,
    handle: &tokio::runtime::Handle,
    datapath: Option<&Arc<NodeDatapath>>,
) -> Result<State, RunError> {
    let mut metrics = Metrics::new();
    if let Some(datapath) = datapath {
        metrics
            .registry_mut()
            .register_collector(Box::new(DatapathMetrics(Arc::clone(datapath))));
    }
    let jwks = {
        let _in_runtime = handle.enter();
        JwksStore::new(FetchConfig::default()).map_err(RunError::Jwks)?
    };
    let jwks_metrics = JwksMetrics::new(jwks.clone());
    metrics
        .registry_mut()
        .register_collector(Box::new(jwks_metrics.clone()));
    let health = args.kubernetes.then(|| Arc::new(Health::new()));
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
        &args.trust_domain,
        &args.root_namespace,
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
    if let Some(health) = health {
        let node_name = node_name(args).ok_or(RunError::NodeName)?;
        let client = handle
            .block_on(kubernetes::client(args.kubeconfig.as_deref()))
            .map_err(RunError::Kubernetes)?;
        info!(node = %node_name, "Kubernetes mode: waiting for the initial lists of pods and policies");
        let config = KubernetesConfig {
            node_name,
            root_namespace: args.root_namespace.clone(),
            trust_domain: args.trust_domain.clone(),
            debounce: kubernetes::source::DEFAULT_DEBOUNCE,
        };
        let source = Kubernetes::new(
            client,
            config,
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
    let Some(workloads) = args.workloads.clone().filter(|_| !args.policies.is_empty()) else {
        return Err(RunError::MissingInputs);
    };
    let config = StandaloneConfig {
        root_namespace: args.root_namespace.clone(),
        trust_domain: args.trust_domain.clone(),
        ..StandaloneConfig::new(args.policies.clone(), workloads)
    };
    let standalone =
        Standalone::start(config, Arc::clone(&store), Arc::clone(&metrics), on_publish)
            .map_err(RunError::Config)?;
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

/// `--fast-path` as given, else on exactly when the data path is.
fn fast_path_mode(args: &RunArgs) -> FastPathMode {
    args.fast_path.unwrap_or(match args.datapath {
        DatapathMode::On => FastPathMode::On,
        DatapathMode::Off => FastPathMode::Off,
    })
}

fn datapath_config(args: &RunArgs) -> DatapathConfig {
    DatapathConfig {
        listener_port: args.listen.port(),
        pin_dir: args.bpf_pin_dir.clone(),
        failure_mode: match args.failure_mode {
            FailureMode::Closed => crate::datapath::FailureMode::Closed,
            FailureMode::Open => crate::datapath::FailureMode::Open,
        },
        fast_path: match fast_path_mode(args) {
            FastPathMode::On => Some(
                args.cgroup
                    .clone()
                    .unwrap_or_else(crate::datapath::cgroup2_root),
            ),
            FastPathMode::Off => None,
        },
        ..DatapathConfig::default()
    }
}

fn enforcer_config(args: &RunArgs) -> EnforcerConfig {
    EnforcerConfig {
        limits: Limits {
            max_header_bytes: args.max_header_bytes,
            max_headers: args.max_headers,
            header_read_timeout: args.header_read_timeout,
            detect_timeout: args.detect_timeout,
            ..Limits::default()
        },
        path_normalization: args.path_normalization,
        drain_timeout: args.drain_timeout,
        // The kernel's guard lets into a protected pod only what carries this mark.
        upstream_mark: match args.datapath {
            DatapathMode::On => datapath_config(args).upstream_mark,
            DatapathMode::Off => 0,
        },
        ..EnforcerConfig::default()
    }
}

/// What shutdown stops, in order.
struct Running {
    shutdown: CancellationToken,
    accepting: tokio::task::JoinHandle<()>,
    tracker: TaskTracker,
    watcher: tokio::task::JoinHandle<()>,
    stopping: Arc<AtomicBool>,
}

/// Waits for SIGTERM or SIGINT, then: `/readyz` 503, no more accepting, in-flight requests
/// finish within `drain`, the watcher stops.
async fn drain_on_signal(
    mut terminate: Signal,
    mut interrupt: Signal,
    running: Running,
    drain: Duration,
) {
    let name = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    running.stopping.store(true, Ordering::Release);
    info!(
        signal = name,
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

#[expect(
    clippy::too_many_lines,
    reason = "the agent's startup order, step by step"
)]
fn run_agent(args: &RunArgs) -> Result<(), RunError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("nodeward-data")
        .build()
        .map_err(RunError::Runtime)?;
    let handle = runtime.handle().clone();
    // Handlers first, so a SIGTERM during startup is a clean shutdown too.
    let (terminate, interrupt) = {
        let _in_runtime = handle.enter();
        (
            signal(SignalKind::terminate()).map_err(RunError::Signal)?,
            signal(SignalKind::interrupt()).map_err(RunError::Signal)?,
        )
    };

    if args.fast_path == Some(FastPathMode::On) && args.datapath == DatapathMode::Off {
        return Err(RunError::FastPathWithoutDatapath);
    }
    let datapath = match args.datapath {
        DatapathMode::On => {
            let config = datapath_config(args);
            let datapath = NodeDatapath::start(config).map_err(RunError::Datapath)?;
            info!(
                listener_port = args.listen.port(),
                failure_mode = args.failure_mode.as_str(),
                fast_path = ?fast_path_mode(args),
                "kernel data path attached"
            );
            Some(datapath)
        }
        DatapathMode::Off => {
            info!("kernel data path off: the enforcer runs alone");
            None
        }
    };
    let state = match start_state(args, &handle, datapath.as_ref()) {
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
        let datapath = Arc::clone(datapath);
        readiness.add_check("datapath", move || {
            if datapath.attached() {
                Ok("programs attached".into())
            } else {
                Err("no kernel program attached".into())
            }
        });
    }

    let shutdown = CancellationToken::new();
    let watcher = runtime.spawn(state.source.watch(shutdown.clone()));
    if let Some(datapath) = &datapath {
        runtime.spawn(follow_interfaces(
            Arc::clone(datapath),
            Arc::clone(&state.store),
            shutdown.clone(),
        ));
    }

    let listener = {
        let _in_runtime = handle.enter();
        transparent_listener(args.listen).map_err(|source| RunError::Listen {
            addr: args.listen,
            source,
        })?
    };
    let listen_addr = listener.local_addr().unwrap_or(args.listen);
    let cache = TokenCache::default();
    let enforcer = Enforcer::new(
        Arc::clone(&state.store),
        Arc::new(state.jwks.clone()),
        cache.clone(),
        Arc::clone(&state.metrics),
        enforcer_config(args),
    );
    let tracker = TaskTracker::new();
    let accepting =
        runtime.spawn(enforcer.run_listener(listener, shutdown.clone(), tracker.clone()));
    listening.store(true, Ordering::Release);
    info!(listen = %listen_addr, failure_mode = args.failure_mode.as_str(), "enforcer listening");

    let admin_error = |source| RunError::Admin {
        addr: args.admin,
        source,
    };
    let admin_listener = std::net::TcpListener::bind(args.admin).map_err(admin_error)?;
    let admin = AdminServer::start(
        admin_listener,
        Arc::new(Admin {
            store: state.store,
            jwks: state.jwks,
            jwks_metrics: state.jwks_metrics,
            cache,
            metrics: state.metrics,
            readiness,
            config: agent_config(args),
            normalization: args.path_normalization,
            datapath: datapath.clone(),
        }),
    )
    .map_err(admin_error)?;
    info!(admin = %admin.local_addr(), "admin server listening");

    runtime.block_on(drain_on_signal(
        terminate,
        interrupt,
        Running {
            shutdown,
            accepting,
            tracker,
            watcher,
            stopping,
        },
        args.drain_timeout,
    ));
    admin.stop();
    runtime.shutdown_timeout(Duration::from_secs(1));
    stop_datapath(datapath.as_ref());
    info!("nodeward stopped");
    Ok(())
}

/// A clean stop removes every program, pin, rule and route the agent made.
fn stop_datapath(datapath: Option<&Arc<NodeDatapath>>) {
    if let Some(datapath) = datapath {
        match datapath.shutdown() {
            Ok(()) => info!("kernel data path removed"),
            Err(e) => warn!(error = %e, "removing the kernel data path"),
        }
    }
}

/// Interfaces come and go with pods: on every netlink link event, attach `steer` to new
/// interfaces and re-sync the endpoints and guards.
async fn follow_interfaces(
    datapath: Arc<NodeDatapath>,
    store: Arc<StateStore>,
    shutdown: CancellationToken,
) {
    let events = {
        let guard = datapath.link_events();
        match guard {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "no link events; interfaces are picked up on the next reload only");
                return;
            }
        }
    };
    let mut events = events;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            changed = events.changed() => {
                if let Err(e) = changed {
                    warn!(error = %e, "link events ended");
                    return;
                }
                let snapshot = store.load();
                let datapath = Arc::clone(&datapath);
                let _ = tokio::task::spawn_blocking(move || datapath.rescan(&snapshot)).await;
            }
        }
    }
}
