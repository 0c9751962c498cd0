//! Pods as the agent keeps them: a projection, never the whole object.
//!
//! - Pods of this node ([`local_workload`]): name, namespace, service account, labels and IP,
//!   as a [`Workload`] the enforcer protects. Only Running pods with an IP and their own
//!   network namespace are steered; the host-side interface is left to the datapath, which
//!   finds it from the route to the pod's IP (`Datapath::interface_for`).
//! - Every pod of the cluster ([`identity`]): its IPs, namespace and service account, for the
//!   source identity of its traffic.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Pod;

use crate::state::workloads::DEFAULT_SERVICE_ACCOUNT;
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
/// The primary address (`status.podIP`) is the workload's.
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
        ip,
        interface: None,
    })
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
