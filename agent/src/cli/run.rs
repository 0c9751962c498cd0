//! `nodeward run`: the agent. Flags (and their `NODEWARD_*` variables) become one
//! [`Config`]; [`crate::app`] starts the agent from it; SIGTERM or SIGINT stops it.
//!
//! Policies and the registry of pods come from files that are watched (standalone mode) or
//! from the Kubernetes API (`--kubernetes`); the enforcer serves steered connections on a
//! transparent listener; the admin server answers health, readiness, metrics, state and
//! checks (`POST /check`, added here).
//!
//! Shutdown (SIGTERM or SIGINT): `/readyz` turns 503, the listener stops accepting, HTTP
//! connections finish their in-flight requests (graceful shutdown) within `--drain-timeout`,
//! then the process exits 0. The handlers are installed before anything starts, so a signal
//! during startup is a clean shutdown too.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tokio::signal::unix::{signal, SignalKind};
use tracing::error;

use super::LogFormat;
use crate::app::{self, App};
use crate::authz::path::Normalization;
use crate::config::{
    Config, DatapathMode, FailureMode, FastPathMode, KubernetesInfo, Steering,
    DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN,
};
use crate::enforcer::Limits;

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
    /// Istio's `MeshConfig` YAML (as in the `mesh` key of `ConfigMap` `istio`): its
    /// `extensionProviders` (`envoyExtAuthzHttp`, `envoyExtAuthzGrpc`) are the external
    /// authorizers CUSTOM policies call. Watched. Kubernetes mode reads the `ConfigMap` instead.
    #[arg(
        long,
        env = "NODEWARD_MESH_CONFIG",
        value_name = "FILE",
        conflicts_with = "kubernetes"
    )]
    pub mesh_config: Option<PathBuf>,
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
    /// through the steering, and every request is still judged. Default: `auto` with
    /// `--datapath on` (`cargo xtask bench` measured it: see BENCHMARKS.md): on where a cgroup
    /// v2 is found, else off with a warning (e.g. under `ip netns exec`, which hides
    /// /sys/fs/cgroup); off without a data path. `on` refuses to start without a cgroup v2 or
    /// with `--datapath off`. `off` leaves none of it attached, also when a previous run left
    /// it.
    #[arg(
        long,
        env = "NODEWARD_FAST_PATH",
        value_enum,
        value_name = "auto|on|off"
    )]
    pub fast_path: Option<FastPathMode>,
    /// The cgroup v2 directory the fast path's `sock_ops` program is attached to (sockets of
    /// processes in it and below are considered; only those of protected endpoints join).
    /// Default: the cgroup v2 root, as Cilium does: /sys/fs/cgroup, or on a hybrid hierarchy
    /// where the `cgroup2` file system is mounted (often /sys/fs/cgroup/unified).
    #[arg(long, env = "NODEWARD_CGROUP", value_name = "DIR")]
    pub cgroup: Option<PathBuf>,
    /// Where new flows into protected pods are steered to the enforcer. `host`: on the node's
    /// interfaces, to the listener of `--listen` (IPv4 to a pod's own address only; Services,
    /// NodePorts and hostPorts into protected pods are refused). `in-pod`: inside each protected
    /// pod's network namespace (found in `--netns-dir`), to a listener of the enforcer's opened
    /// there on the `--listen` port: every path after every NAT (ClusterIP, NodePort, hostPort,
    /// the node itself, other nodes), IPv4 and IPv6, on any CNI.
    #[arg(long, env = "NODEWARD_STEERING", value_enum, default_value_t = Steering::InPod, value_name = "in-pod|host")]
    pub steering: Steering,
    /// Host steering: the packet mark bits `steer` sets on steered packets, matched by the
    /// agent's policy-routing rule. Choose bits nothing else on the node uses (kube-proxy 0x4000
    /// and 0x8000, portmap 0x2000, Calico 0xffff0000, Cilium 0x0f00). Hex (0x...) or decimal.
    #[arg(long, env = "NODEWARD_STEER_MARK", default_value = "0x10", value_parser = parse_mark, value_name = "BITS")]
    pub steer_mark: u32,
    /// Host steering: the mark bits of the enforcer's upstream sockets (`SO_MARK`); `guard` lets a
    /// packet into a protected pod only when it and its sending socket carry them. Must share
    /// no bit with --steer-mark.
    #[arg(long, env = "NODEWARD_UPSTREAM_MARK", default_value = "0x20", value_parser = parse_mark, value_name = "BITS")]
    pub upstream_mark: u32,
    /// In-pod steering: the directory of pods' network namespace files (`ip netns` and
    /// containerd keep them in /run/netns; the DaemonSet mounts the host's).
    #[arg(
        long,
        env = "NODEWARD_NETNS_DIR",
        default_value = "/run/netns",
        value_name = "DIR"
    )]
    pub netns_dir: PathBuf,
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
    /// A part of the agent could not start.
    #[error(transparent)]
    Start(#[from] app::Error),
    /// Kubernetes mode without `--node-name`.
    #[error("--kubernetes needs --node-name (or NODEWARD_NODE_NAME, or NODE_NAME from the Downward API: spec.nodeName)")]
    NodeName,
    /// SIGTERM/SIGINT handlers could not be installed.
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
}

impl RunError {
    /// 2 for a configuration that cannot start, 1 for everything else.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NodeName => 2,
            Self::Start(e) if e.is_configuration() => 2,
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

/// The configuration the flags describe. Paths are made absolute (as `/debug/state` shows
/// them); `--fast-path` defaults to the data path's mode.
pub fn config(args: &RunArgs) -> Result<Config, RunError> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let kubernetes = if args.kubernetes {
        Some(KubernetesInfo {
            node_name: node_name(args).ok_or(RunError::NodeName)?,
            kubeconfig: args.kubeconfig.clone(),
        })
    } else {
        None
    };
    Ok(Config {
        failure_mode: args.failure_mode,
        listen: args.listen,
        admin: args.admin,
        root_namespace: args.root_namespace.clone(),
        trust_domain: args.trust_domain.clone(),
        policies: args.policies.iter().map(|p| absolute(p)).collect(),
        workloads: args.workloads.as_deref().map(absolute),
        mesh_config: args.mesh_config.as_deref().map(absolute),
        kubernetes,
        path_normalization: args.path_normalization,
        drain_timeout: args.drain_timeout,
        max_header_bytes: args.max_header_bytes,
        max_headers: args.max_headers,
        header_read_timeout: args.header_read_timeout,
        detect_timeout: args.detect_timeout,
        datapath: args.datapath,
        fast_path: args.fast_path.unwrap_or(match args.datapath {
            DatapathMode::On => FastPathMode::Auto,
            DatapathMode::Off => FastPathMode::Off,
        }),
        cgroup: args.cgroup.clone(),
        bpf_pin_dir: args.bpf_pin_dir.clone(),
        steering: args.steering,
        netns_dir: args.netns_dir.clone(),
        steer_mark: args.steer_mark,
        upstream_mark: args.upstream_mark,
    })
}

/// A mark: `0x`-prefixed hexadecimal or decimal, not 0.
fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(0) => Err("0 sets no bit".to_owned()),
        Ok(mark) => Ok(mark),
        Err(e) => Err(format!("not a 32-bit mark ({e})")),
    }
}

/// `--node-name`, else `NODE_NAME`.
fn node_name(args: &RunArgs) -> Option<String> {
    args.node_name
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty())
}

fn run_agent(args: &RunArgs) -> Result<(), RunError> {
    let config = config(args)?;
    let mut app = App::new(config)?;
    // Handlers first, so a SIGTERM during startup is a clean shutdown too.
    let (mut terminate, mut interrupt) = {
        let _in_runtime = app.handle().enter();
        (
            signal(SignalKind::terminate()).map_err(RunError::Signal)?,
            signal(SignalKind::interrupt()).map_err(RunError::Signal)?,
        )
    };
    app.add_admin_endpoint(super::check_endpoint::endpoint());
    let bound = app.start()?;
    let name = bound.block_on(async {
        tokio::select! {
            _ = terminate.recv() => "SIGTERM",
            _ = interrupt.recv() => "SIGINT",
        }
    });
    bound.stop(name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> RunArgs {
        match Cli::try_parse_from([&["nodeward", "run"], args].concat()) {
            Ok(Cli {
                command: Command::Run(args),
            }) => *args,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn flag_defaults_are_the_config_defaults() {
        let config =
            config(&parse(&["--policies", "/p", "--workloads", "/w.yaml"])).expect("config");
        assert_eq!(
            config,
            Config {
                policies: vec![PathBuf::from("/p")],
                workloads: Some(PathBuf::from("/w.yaml")),
                ..Config::default()
            }
        );
    }

    #[test]
    fn the_fast_path_follows_the_data_path_unless_given() {
        let off = config(&parse(&[
            "--policies",
            "/p",
            "--workloads",
            "/w",
            "--datapath",
            "off",
        ]))
        .expect("config");
        assert_eq!(off.fast_path, FastPathMode::Off);
        let on = config(&parse(&["--policies", "/p", "--workloads", "/w"])).expect("config");
        assert_eq!(
            on.fast_path,
            FastPathMode::Auto,
            "on where it can be, by default"
        );
        let given = config(&parse(&[
            "--policies",
            "/p",
            "--workloads",
            "/w",
            "--datapath",
            "off",
            "--fast-path",
            "on",
        ]))
        .expect("config");
        assert!(matches!(
            App::new(given),
            Err(app::Error::FastPathWithoutDatapath)
        ));
    }
}

#[cfg(test)]
mod mark_tests {
    use super::parse_mark;

    #[test]
    fn marks_parse_in_hex_or_decimal_and_never_zero() {
        assert_eq!(parse_mark("0x10"), Ok(0x10));
        assert_eq!(parse_mark("0X4000"), Ok(0x4000));
        assert_eq!(parse_mark("32"), Ok(32));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("0x0").is_err());
        assert!(parse_mark("0x1_0000_0000").is_err());
        assert!(parse_mark("0x100000000").is_err());
        assert!(parse_mark("ten").is_err());
    }
}
