//! The state store: one immutable [`Snapshot`] of everything the enforcer reads (workloads,
//! compiled policies, per-workload views), swapped atomically on every change. Sources of
//! truth (standalone files in [`standalone`], the Kubernetes API in [`crate::kubernetes`]) build
//! snapshots through one [`publish::Publisher`]; readers never lock.

pub mod publish;
pub mod standalone;
pub mod workloads;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;

use crate::authn::{AuthnSet, JwtRules};
use crate::authz::{PolicySet, WorkloadPolicies};
pub use workloads::Workload;

/// Istio's default trust domain: source principals are `cluster.local/ns/<ns>/sa/<sa>`.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// What the enforcer needs about one destination workload, computed once per snapshot.
#[derive(Debug)]
pub struct WorkloadView {
    pub workload: Arc<Workload>,
    /// `namespace/name`, the metric and log label.
    pub id: Arc<str>,
    pub authz: WorkloadPolicies,
    pub authn: JwtRules,
}

impl WorkloadView {
    /// A workload is protected when any RequestAuthentication or AuthorizationPolicy applies.
    #[must_use]
    pub fn is_protected(&self) -> bool {
        !self.authn.is_empty() || !self.authz.is_empty() || !self.authz.dry_run.is_empty()
    }
}

/// Source identity of a peer address: a known workload's namespace, service account and
/// principal.
#[derive(Debug, Clone)]
pub struct SourceIdentity {
    pub namespace: String,
    /// `<ns>/<sa>`.
    pub service_account: String,
    /// `<trust-domain>/ns/<ns>/sa/<sa>`.
    pub principal: String,
}

/// A pod known only as a source of traffic (in Kubernetes mode, every pod of the cluster): its
/// address gives its traffic a namespace and a service account.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodIdentity {
    pub ip: IpAddr,
    pub namespace: String,
    /// The service account's name (without the namespace).
    pub service_account: String,
}

/// One consistent view of the node's configuration.
#[derive(Debug)]
pub struct Snapshot {
    /// Increments with every swap.
    pub generation: u64,
    pub loaded_at: SystemTime,
    pub trust_domain: String,
    pub root_namespace: String,
    pub workloads: Vec<Arc<Workload>>,
    pub authz: PolicySet,
    pub authn: AuthnSet,
    /// Destination views by workload IP.
    pub by_ip: HashMap<IpAddr, Arc<WorkloadView>>,
    /// Source identities by workload IP (every known workload, local or not, and every pod
    /// known only as a source); one shared identity per namespace and service account.
    pub sources: HashMap<IpAddr, Arc<SourceIdentity>>,
    /// Problems with the inputs right now (the last good content of each bad file serves).
    pub errors: Vec<String>,
}

impl Snapshot {
    /// Builds the per-workload views and source identities.
    #[must_use]
    pub fn build(
        generation: u64,
        trust_domain: &str,
        root_namespace: &str,
        workloads: Vec<Arc<Workload>>,
        authorization: PolicySet,
        authentication: AuthnSet,
        errors: Vec<String>,
    ) -> Self {
        Self::build_with_peers(
            generation,
            trust_domain,
            root_namespace,
            workloads,
            &[],
            authorization,
            authentication,
            errors,
        )
    }

    /// [`Snapshot::build`] with pods known only as sources (`peers`). `workloads` are the
    /// destinations (views are computed for them only); both give source identity, a workload
    /// winning over a peer with the same address.
    #[expect(
        clippy::too_many_arguments,
        reason = "every part of a snapshot, named at the call site"
    )]
    #[must_use]
    pub fn build_with_peers(
        generation: u64,
        trust_domain: &str,
        root_namespace: &str,
        workloads: Vec<Arc<Workload>>,
        peers: &[PodIdentity],
        authorization: PolicySet,
        authentication: AuthnSet,
        errors: Vec<String>,
    ) -> Self {
        let sources = source_identities(trust_domain, &workloads, peers);
        let mut by_ip = HashMap::with_capacity(workloads.len());
        for w in &workloads {
            let view = WorkloadView {
                workload: w.clone(),
                id: format!("{}/{}", w.namespace, w.name).into(),
                authz: authorization.for_workload(&w.namespace, &w.labels),
                authn: authentication.for_workload(&w.namespace, &w.labels),
            };
            let view = Arc::new(view);
            for ip in w.addresses() {
                by_ip.insert(ip, Arc::clone(&view));
            }
        }
        Self {
            generation,
            loaded_at: SystemTime::now(),
            trust_domain: trust_domain.to_owned(),
            root_namespace: root_namespace.to_owned(),
            workloads,
            authz: authorization,
            authn: authentication,
            by_ip,
            sources,
            errors,
        }
    }

    /// A workload's principal, `<trust-domain>/ns/<ns>/sa/<sa>` (the destination of an
    /// external authorizer's check).
    #[must_use]
    pub fn principal_of(&self, w: &Workload) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, w.namespace, w.service_account
        )
    }

    /// An empty snapshot: nothing known, nothing protected.
    #[must_use]
    pub fn empty(trust_domain: &str, root_namespace: &str) -> Self {
        Self::build(
            0,
            trust_domain,
            root_namespace,
            Vec::new(),
            PolicySet::default(),
            AuthnSet::default(),
            Vec::new(),
        )
    }

    /// The view of the destination workload at `ip`.
    #[must_use]
    pub fn destination(&self, ip: IpAddr) -> Option<&Arc<WorkloadView>> {
        self.by_ip.get(&normalize_ip(ip))
    }

    /// The identity of a source address, when it is a known workload.
    #[must_use]
    pub fn source(&self, ip: IpAddr) -> Option<&SourceIdentity> {
        self.sources.get(&normalize_ip(ip)).map(AsRef::as_ref)
    }

    /// The authorization view of a connection's peer: its address (also the remote address: no
    /// proxy is trusted at the node) and, when it is a known workload, its identity.
    #[must_use]
    pub fn peer(&self, ip: IpAddr) -> crate::authz::Peer<'_> {
        let source = self.source(ip);
        crate::authz::Peer {
            ip: Some(ip),
            remote_ip: Some(ip),
            principal: source.map(|s| s.principal.as_str()),
            namespace: source.map(|s| s.namespace.as_str()),
            service_account: source.map(|s| s.service_account.as_str()),
        }
    }

    /// Labels of a workload, for `check --admin`.
    #[must_use]
    pub fn labels_of(&self, ip: IpAddr) -> Option<&BTreeMap<String, String>> {
        self.destination(ip).map(|v| &v.workload.labels)
    }
}

/// Every known address's identity; one shared [`SourceIdentity`] per namespace and service
/// account (10,000 pods of a few hundred service accounts share a few hundred).
fn source_identities(
    trust_domain: &str,
    workloads: &[Arc<Workload>],
    peers: &[PodIdentity],
) -> HashMap<IpAddr, Arc<SourceIdentity>> {
    let mut sources = HashMap::with_capacity(workloads.len() + peers.len());
    let mut identities: HashMap<(&str, &str), Arc<SourceIdentity>> = HashMap::new();
    let peers = peers.iter().map(|p| {
        (
            normalize_ip(p.ip),
            p.namespace.as_str(),
            p.service_account.as_str(),
        )
    });
    let workloads = workloads.iter().flat_map(|w| {
        w.addresses()
            .map(move |ip| (ip, w.namespace.as_str(), w.service_account.as_str()))
    });
    // Workloads last: they win over a peer with the same address.
    for (ip, namespace, service_account) in peers.chain(workloads) {
        let identity = identities
            .entry((namespace, service_account))
            .or_insert_with(|| {
                Arc::new(SourceIdentity {
                    namespace: namespace.to_owned(),
                    service_account: format!("{namespace}/{service_account}"),
                    principal: format!("{trust_domain}/ns/{namespace}/sa/{service_account}"),
                })
            });
        sources.insert(ip, Arc::clone(identity));
    }
    sources
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) as IPv4.
#[must_use]
pub fn normalize_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The live state: readers `load()` a snapshot without locking; writers `publish()` a new one.
#[derive(Debug)]
pub struct StateStore {
    current: ArcSwap<Snapshot>,
}

impl StateStore {
    #[must_use]
    pub fn new(initial: Snapshot) -> Self {
        Self {
            current: ArcSwap::from_pointee(initial),
        }
    }

    /// The current snapshot.
    #[must_use]
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Swaps in a new snapshot atomically.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_stack_pod_is_one_workload_by_either_address() {
        let v4: IpAddr = "10.0.0.12".parse().unwrap();
        let v6: IpAddr = "fd00::12".parse().unwrap();
        let workload = Arc::new(Workload {
            name: "web".into(),
            namespace: "foo".into(),
            service_account: "web".into(),
            labels: BTreeMap::new(),
            ip: v4,
            ips: vec![v6],
            interface: None,
            probes: Vec::new(),
            ports: Vec::new(),
        });
        let snapshot = Snapshot::build(
            1,
            "cluster.local",
            "istio-system",
            vec![workload],
            PolicySet::default(),
            AuthnSet::default(),
            Vec::new(),
        );
        for ip in [v4, v6] {
            assert_eq!(
                snapshot.destination(ip).map(|v| v.id.to_string()),
                Some("foo/web".to_owned()),
                "{ip}"
            );
            assert_eq!(
                snapshot.source(ip).map(|s| s.principal.as_str()),
                Some("cluster.local/ns/foo/sa/web"),
                "{ip}"
            );
        }
    }
}
