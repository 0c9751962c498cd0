//! Pods as the agent keeps them: a projection, never the whole object.
//!
//! - Pods of this node ([`local_workload`]): name, namespace, service account, labels and IP,
//!   as a [`Workload`] the enforcer protects. Only Running pods with an IP and their own
//!   network namespace are steered; the host-side interface is left to the datapath, which
//!   finds it from the route to the pod's IP (`Datapath::interface_for`).
//!   Its kubelet probes (`httpGet` over HTTP and `tcpSocket` of every container's liveness,
//!   readiness and startup probe) become the workload's `probes`: the only requests from the
//!   node itself that the enforcer lets through unjudged, as Istio's sidecar does with its
//!   probe rewrite. HTTPS and gRPC probes, and probes sent to another `host`, are not exempt.
//!   With it the source keeps the pod's named container ports ([`LocalPod`]), which the
//!   `targetPort` names of the Services selecting it resolve against
//!   ([`super::services::declared_ports`] fills the workload's `ports`).
//! - Every pod of the cluster ([`identity`]): its IPs, namespace and service account, for the
//!   source identity of its traffic.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Container, Pod, Probe as PodProbe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::services::{self, NamedPort};
use crate::state::workloads::{Probe, DEFAULT_SERVICE_ACCOUNT};
use crate::state::{normalize_ip, Workload};

/// Why a pod of this node is not steered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotSteered {
    /// Only Running pods are steered (Pending ones are not serving, finished ones may have
    /// given their IP to another pod).
    #[error("phase {0:?} is not Running")]
    NotRunning(String),
    /// `status.podIP` is not set yet (or not an address).
    #[error("no pod IP yet")]
    NoIp,
    /// `spec.hostNetwork`: the pod shares the node's address; its traffic cannot be told apart.
    #[error("host network")]
    HostNetwork,
}

/// A steered pod of this node as the source keeps it: its workload, whose `ports` stay empty
/// here (the Services selecting it declare them when a snapshot is built), and its named
/// container ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPod {
    pub workload: Workload,
    pub named_ports: Vec<NamedPort>,
}

/// A pod of this node as the source keeps it, or why it is not steered.
pub fn local_pod(pod: &Pod) -> Result<LocalPod, NotSteered> {
    Ok(LocalPod {
        workload: local_workload(pod)?,
        named_ports: services::named_ports(pod),
    })
}

/// A pod of the cluster as a source of traffic: its addresses and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPod {
    pub namespace: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
}

/// `namespace/name`, the key of every projection.
#[must_use]
pub fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn host_network(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Unknown")
}

fn service_account(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.service_account_name.clone())
        .filter(|sa| !sa.is_empty())
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned())
}

/// `status.podIPs` (every family), else `status.podIP`; unparsable entries left out.
fn ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .map(normalize_ip)
        .collect();
    if out.is_empty() {
        out.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .map(normalize_ip),
        );
    }
    out
}

/// A pod of this node as the workload the enforcer protects, or why it is not steered.
/// The primary address (`status.podIP`) is the workload's; `ports` is left empty (see
/// [`LocalPod`]).
pub fn local_workload(pod: &Pod) -> Result<Workload, NotSteered> {
    if host_network(pod) {
        return Err(NotSteered::HostNetwork);
    }
    let phase = phase(pod);
    if phase != "Running" {
        return Err(NotSteered::NotRunning(phase.to_owned()));
    }
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok())
        .map(normalize_ip)
        .ok_or(NotSteered::NoIp)?;
    Ok(Workload {
        name: pod.metadata.name.clone().unwrap_or_default(),
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        service_account: service_account(pod),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ips: ips(pod).into_iter().filter(|other| *other != ip).collect(),
        ip,
        interface: None,
        probes: probes(pod),
        ports: Vec::new(),
    })
}

/// The kubelet's probes of the pod that the enforcer can recognise: `httpGet` with scheme HTTP
/// (path without its query) and `tcpSocket`, on a numeric port or a port named by the
/// container, without a `host` of their own; in the order the spec lists them, duplicates
/// removed.
fn probes(pod: &Pod) -> Vec<Probe> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers);
    let mut out: Vec<Probe> = Vec::new();
    for container in containers {
        let kinds = [
            &container.liveness_probe,
            &container.readiness_probe,
            &container.startup_probe,
        ];
        for probe in kinds.into_iter().flatten() {
            if let Some(probe) = probe_of(container, probe) {
                if !out.contains(&probe) {
                    out.push(probe);
                }
            }
        }
    }
    out
}

fn probe_of(container: &Container, probe: &PodProbe) -> Option<Probe> {
    if let Some(get) = &probe.http_get {
        let plain = get
            .scheme
            .as_deref()
            .is_none_or(|s| s.eq_ignore_ascii_case("HTTP"));
        if !plain || get.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        let port = port_of(container, &get.port)?;
        let path = get.path.as_deref().unwrap_or("/");
        let path = path.split_once('?').map_or(path, |(path, _)| path);
        return Probe::http(port, if path.is_empty() { "/" } else { path }).ok();
    }
    if let Some(tcp) = &probe.tcp_socket {
        if tcp.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        return Probe::tcp(port_of(container, &tcp.port)?).ok();
    }
    None
}

/// A probe's port: a number, or the name of one of the container's ports.
fn port_of(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(number) => u16::try_from(*number).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// A pod of the cluster as a source identity, when its addresses are its own: Pending
/// (init containers already send traffic) or Running, with an IP, not on the host network.
/// Finished pods are left out: their addresses may already be another pod's.
#[must_use]
pub fn identity(pod: &Pod) -> Option<ClusterPod> {
    if host_network(pod) || !matches!(phase(pod), "Pending" | "Running") {
        return None;
    }
    let ips = ips(pod);
    if ips.is_empty() {
        return None;
    }
    Some(ClusterPod {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        service_account: service_account(pod),
        ips,
    })
}
