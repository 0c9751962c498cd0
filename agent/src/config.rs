//! The agent's configuration: everything `nodeward run` takes, in one [`Config`].
//!
//! The command line builds it from flags and `NODEWARD_*` variables; the app module starts
//! the agent from it; the admin server's `/debug/state` serializes it as is, and
//! `nodeward status` reads it back. Durations are humantime strings (`20s`), the path
//! normalization is its flag value (`base`), the failure mode `closed` or `open`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::authz::path::Normalization;
pub use crate::datapath::{FailureMode, Steering};
use crate::enforcer::Limits;
pub use crate::policy::DEFAULT_ROOT_NAMESPACE;
pub use crate::state::DEFAULT_TRUST_DOMAIN;

/// Whether the agent drives the kernel data path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatapathMode {
    /// Load and attach the steering programs in this network namespace (the node's).
    #[default]
    On,
    /// The enforcer alone, for when connections reach its listener some other way.
    Off,
}

/// Whether the data path runs the same-node fast path (`sock_ops` + `sk_msg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    /// On where a cgroup v2 is found (or `--cgroup` names one), else off, said in the log,
    /// `status` and `nodeward_datapath_fast_path`: the default with the data path.
    #[default]
    Auto,
    /// On, or the agent refuses to start (no cgroup v2, or no data path).
    On,
    Off,
}

/// Kubernetes mode: pods and policies come from the API server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesInfo {
    /// The node whose pods the agent protects.
    pub node_name: String,
    /// `--kubeconfig`; `None`: inferred (KUBECONFIG, ~/.kube/config, in-cluster).
    pub kubeconfig: Option<PathBuf>,
}

/// Everything the agent runs with. [`Config::default`] is `nodeward run`'s defaults, without
/// inputs: set `policies` and `workloads` (standalone mode) or `kubernetes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// What steered traffic gets while the enforcer cannot take it.
    pub failure_mode: FailureMode,
    /// The enforcer's transparent listener (port 0: any free port; the running agent reports
    /// the one it bound).
    pub listen: SocketAddr,
    /// The admin server (port 0: any free port).
    pub admin: SocketAddr,
    /// Namespace whose policies apply mesh-wide.
    pub root_namespace: String,
    /// Trust domain of source principals.
    pub trust_domain: String,
    /// Standalone mode: policy files and directories, watched.
    pub policies: Vec<PathBuf>,
    /// Standalone mode: the registry of pods, watched. Serialized as `""` when absent.
    #[serde(with = "empty_path")]
    pub workloads: Option<PathBuf>,
    /// Standalone mode: Istio's `MeshConfig` (`extensionProviders` for CUSTOM policies),
    /// watched. Serialized as `""` when absent. (Kubernetes mode reads the `mesh` key of
    /// `ConfigMap` `istio` in the root namespace.)
    #[serde(with = "empty_path")]
    pub mesh_config: Option<PathBuf>,
    /// Kubernetes mode; `None` in standalone mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesInfo>,
    /// `none`, `base`, `merge-slashes` or `decode-and-merge-slashes`.
    #[serde(with = "value_name")]
    pub path_normalization: Normalization,
    /// How long in-flight requests may take to finish once the agent stops.
    #[serde(with = "humantime_string")]
    pub drain_timeout: Duration,
    /// Largest request head, bytes.
    pub max_header_bytes: usize,
    /// Most header fields in a request.
    pub max_headers: usize,
    /// Time a client has to send a request head.
    #[serde(with = "humantime_string")]
    pub header_read_timeout: Duration,
    /// Time a client on a port of undeclared protocol has to send its first byte; zero waits
    /// forever.
    #[serde(with = "humantime_string")]
    pub detect_timeout: Duration,
    /// The kernel data path.
    pub datapath: DatapathMode,
    /// The same-node fast path; `on` needs the data path and a cgroup v2, `auto` uses it when
    /// both are there.
    pub fast_path: FastPathMode,
    /// The cgroup v2 directory of the fast path's `sock_ops` program; `None`: the cgroup v2
    /// root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Where the data path pins its programs and maps.
    pub bpf_pin_dir: PathBuf,
    /// Where new flows into protected pods are steered: `host` or `in-pod`.
    pub steering: Steering,
    /// In-pod steering: the directory of pods' network namespace files.
    pub netns_dir: PathBuf,
    /// Host steering: the packet mark of steered packets (the policy-routing rule's).
    pub steer_mark: u32,
    /// Host steering: the mark of the enforcer's upstream sockets, which `guard` lets in.
    pub upstream_mark: u32,
}

impl Default for Config {
    fn default() -> Self {
        let limits = Limits::default();
        Self {
            failure_mode: FailureMode::Closed,
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15006)),
            // Loopback: the admin server has no authentication.
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            policies: Vec::new(),
            workloads: None,
            mesh_config: None,
            kubernetes: None,
            path_normalization: Normalization::Base,
            drain_timeout: Duration::from_secs(20),
            max_header_bytes: limits.max_header_bytes,
            max_headers: limits.max_headers,
            header_read_timeout: Duration::from_secs(10),
            detect_timeout: Duration::from_secs(5),
            datapath: DatapathMode::On,
            fast_path: FastPathMode::Auto,
            cgroup: None,
            bpf_pin_dir: PathBuf::from("/sys/fs/bpf/nodeward"),
            steering: Steering::InPod,
            netns_dir: PathBuf::from("/run/netns"),
            steer_mark: crate::datapath::DEFAULT_STEER_MARK,
            upstream_mark: crate::datapath::DEFAULT_UPSTREAM_MARK,
        }
    }
}

/// A `Duration` as a humantime string (`20s`, `1m 30s`).
mod humantime_string {
    use std::time::Duration;

    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A `clap::ValueEnum` as its flag value.
mod value_name {
    use clap::ValueEnum;
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<T: ValueEnum, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let name = value.to_possible_value();
        serializer.serialize_str(name.as_ref().map_or("", |v| v.get_name()))
    }

    pub fn deserialize<'de, T: ValueEnum, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let text = String::deserialize(deserializer)?;
        T::from_str(&text, false).map_err(serde::de::Error::custom)
    }
}

/// An optional path, absent written as `""`.
mod empty_path {
    use std::path::{Path, PathBuf};

    use serde::{Deserialize as _, Deserializer, Serialize as _, Serializer};

    #[expect(
        clippy::ref_option,
        reason = "serde's `with` passes a reference to the field"
    )]
    pub fn serialize<S: Serializer>(
        value: &Option<PathBuf>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value
            .as_deref()
            .unwrap_or(Path::new(""))
            .serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        let path = PathBuf::deserialize(deserializer)?;
        Ok((!path.as_os_str().is_empty()).then_some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_with_the_names_status_reads() {
        let config = Config {
            policies: vec![PathBuf::from("/etc/nodeward/policies")],
            workloads: Some(PathBuf::from("/etc/nodeward/workloads.yaml")),
            path_normalization: Normalization::MergeSlashes,
            ..Config::default()
        };
        let json = serde_json::to_value(&config).expect("serializes");
        assert_eq!(json["failure_mode"], "closed");
        assert_eq!(json["listen"], "0.0.0.0:15006");
        assert_eq!(json["admin"], "127.0.0.1:15000");
        assert_eq!(json["root_namespace"], "istio-system");
        assert_eq!(json["trust_domain"], "cluster.local");
        assert_eq!(json["workloads"], "/etc/nodeward/workloads.yaml");
        assert_eq!(json["path_normalization"], "merge-slashes");
        assert_eq!(json["drain_timeout"], "20s");
        assert_eq!(json["header_read_timeout"], "10s");
        assert_eq!(json["detect_timeout"], "5s");
        assert!(json.get("kubernetes").is_none(), "{json}");
        let back: Config = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, config);
    }

    #[test]
    fn kubernetes_mode_has_no_workloads_file() {
        let config = Config {
            kubernetes: Some(KubernetesInfo {
                node_name: "node-a".into(),
                kubeconfig: None,
            }),
            ..Config::default()
        };
        let json = serde_json::to_value(&config).expect("serializes");
        assert_eq!(json["workloads"], "");
        assert_eq!(json["kubernetes"]["node_name"], "node-a");
        let back: Config = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, config);
    }
}
