//! Policies compiled once per change: each rule becomes lists of clauses with hashed value
//! sets, and a [`PolicySet`] answers which policies apply to a workload.
//!
//! Istio's spec: "If not set, the selector will match all workloads in the namespace"; a
//! policy in the root namespace "applies to all namespaces in a mesh".

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::matcher::{IpSet, PathSet, RequestPrincipalSet, StringSet, TrustDomainSet};
use crate::extauthz::mesh::{Entry, MeshProviders, ProviderConfig};
use crate::policy::attribute::{parse_port, Attribute};
use crate::policy::model::{Condition, Operation, Source};
use crate::policy::{scope, validate};
use crate::policy::{Action, AuthorizationPolicy, Origin};

/// What a clause reads from the request.
#[derive(Debug, Clone)]
pub enum Field {
    /// `principals`: the source workload's principal (from its IP at the node).
    Principal,
    /// `requestPrincipals`: `iss/sub` of the validated JWT. HTTP only.
    RequestPrincipal,
    /// `namespaces`: the source workload's namespace.
    Namespace,
    /// `serviceAccounts`: the source workload's `<ns>/<sa>`.
    ServiceAccount,
    /// `trustDomains`: the trust domain of the source workload's principal.
    TrustDomain,
    /// `ipBlocks`: the connection's peer address.
    SourceIp,
    /// `remoteIpBlocks`: the original client address.
    RemoteIp,
    /// `hosts`: the Host/`:authority` header, case-insensitive. HTTP only.
    Host,
    /// `ports`: the destination port.
    Port,
    /// `methods`: HTTP only.
    Method,
    /// `paths`: the normalized path without query. HTTP only.
    Path,
    /// A `when` key.
    Attribute(Attribute),
}

impl Field {
    /// Fields that only exist for HTTP requests (Istio's "HTTP-only fields").
    #[must_use]
    pub fn is_http_only(&self) -> bool {
        match self {
            Self::RequestPrincipal | Self::Host | Self::Method | Self::Path => true,
            Self::Attribute(a) => a.is_http_only(),
            _ => false,
        }
    }
}

/// The compiled values a clause compares with.
#[derive(Debug, Clone)]
pub enum Matcher {
    Strings(StringSet),
    RequestPrincipals(RequestPrincipalSet),
    Ips(IpSet),
    Ports(HashSet<u16>),
    Paths(PathSet),
    TrustDomains(TrustDomainSet),
}

/// One field test: `principals`, `notPaths`, one `when` key's `values`, ...
#[derive(Debug, Clone)]
pub struct Clause {
    /// Where it came from, for explanations: `from[0].source.principals`.
    pub label: Box<str>,
    pub field: Field,
    /// `not*` fields and `notValues`: matches when the value matches none.
    pub negate: bool,
    pub matcher: Matcher,
}

/// One rule: any `from`, any `to`, every `when`.
#[derive(Debug, Clone, Default)]
pub struct CompiledRule {
    pub from: Vec<Vec<Clause>>,
    pub to: Vec<Vec<Clause>>,
    pub when: Vec<Clause>,
    /// The rule uses at least one HTTP-only field.
    pub http_only: bool,
    /// The rule uses an attribute that does not exist at the node (Envoy filter metadata).
    pub unsupported: bool,
}

/// An AuthorizationPolicy ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    /// `namespace/name`.
    pub id: String,
    pub namespace: String,
    pub action: Action,
    pub provider: Option<String>,
    pub dry_run: bool,
    pub selector: Option<BTreeMap<String, String>>,
    /// The policy uses `targetRef(s)`: it applies to gateways/waypoints, not workloads.
    pub targets_refs: bool,
    pub rules: Vec<CompiledRule>,
    pub origin: Origin,
}

impl CompiledPolicy {
    #[must_use]
    pub fn compile(policy: &AuthorizationPolicy) -> Self {
        let spec = &policy.spec;
        let action = Action::parse(spec.action.as_deref()).unwrap_or(Action::Allow);
        let rules = spec
            .rules
            .iter()
            .map(|rule| {
                let from: Vec<Vec<Clause>> = rule
                    .from
                    .iter()
                    .flatten()
                    .enumerate()
                    .filter_map(|(i, f)| {
                        f.source
                            .as_ref()
                            .map(|s| source_clauses(s, i, policy.namespace()))
                    })
                    .collect();
                let to: Vec<Vec<Clause>> = rule
                    .to
                    .iter()
                    .flatten()
                    .enumerate()
                    .filter_map(|(i, t)| t.operation.as_ref().map(|o| operation_clauses(o, i)))
                    .collect();
                let when: Vec<Clause> = rule
                    .when
                    .iter()
                    .enumerate()
                    .flat_map(|(i, c)| condition_clauses(c, i, policy.namespace()))
                    .collect();
                let clauses = || from.iter().chain(&to).flatten().chain(&when);
                let http_only = clauses().any(|c| c.field.is_http_only());
                let unsupported = clauses().any(|c| {
                    matches!(c.field, Field::Attribute(Attribute::EnvoyFilterMetadata(_)))
                });
                CompiledRule {
                    from,
                    to,
                    when,
                    http_only,
                    unsupported,
                }
            })
            .collect();
        Self {
            id: policy.id(),
            namespace: policy.namespace().to_owned(),
            action,
            provider: spec.provider.as_ref().map(|p| p.name.clone()),
            dry_run: validate::dry_run(&policy.metadata),
            selector: spec.selector.as_ref().map(|s| s.match_labels.clone()),
            targets_refs: spec.target_ref.is_some() || !spec.target_refs.is_empty(),
            rules,
            origin: policy.origin.clone(),
        }
    }

    /// Istio: labels "must match" every `matchLabels` entry; no selector selects every workload.
    #[must_use]
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        scope::selects(self.selector.as_ref(), labels)
    }
}

fn strings(
    label: String,
    field: Field,
    negate: bool,
    values: &[String],
    ignore_case: bool,
) -> Clause {
    Clause {
        label: label.into(),
        field,
        negate,
        matcher: Matcher::Strings(StringSet::new(
            values.iter().map(String::as_str),
            ignore_case,
        )),
    }
}

fn push_pair(
    out: &mut Vec<Clause>,
    base: &str,
    names: (&str, &str),
    lists: (&[String], &[String]),
    make: impl Fn(String, bool, &[String]) -> Clause,
) {
    if !lists.0.is_empty() {
        out.push(make(format!("{base}.{}", names.0), false, lists.0));
    }
    if !lists.1.is_empty() {
        out.push(make(format!("{base}.{}", names.1), true, lists.1));
    }
}

/// Istio's namespace generator: each `*` of a value matches any run of characters.
fn namespaces(label: String, field: Field, negate: bool, values: &[String]) -> Clause {
    Clause {
        label: label.into(),
        field,
        negate,
        matcher: Matcher::Strings(StringSet::with_globs(values.iter().map(String::as_str))),
    }
}

fn trust_domains(label: String, field: Field, negate: bool, values: &[String]) -> Clause {
    Clause {
        label: label.into(),
        field,
        negate,
        matcher: Matcher::TrustDomains(TrustDomainSet::new(values.iter().map(String::as_str))),
    }
}

/// Istio principals are written without `spiffe://`; both forms are accepted.
fn strip_spiffe(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|v| v.strip_prefix("spiffe://").unwrap_or(v).to_owned())
        .collect()
}

/// Istio: a service account written without namespace is in the policy's namespace.
fn qualify_service_accounts(values: &[String], namespace: &str) -> Vec<String> {
    values
        .iter()
        .map(|v| {
            if v.contains('/') {
                v.clone()
            } else {
                format!("{namespace}/{v}")
            }
        })
        .collect()
}

fn source_clauses(s: &Source, index: usize, namespace: &str) -> Vec<Clause> {
    let base = format!("from[{index}].source");
    let mut out = Vec::new();
    let (p, np) = (strip_spiffe(&s.principals), strip_spiffe(&s.not_principals));
    push_pair(
        &mut out,
        &base,
        ("principals", "notPrincipals"),
        (&p, &np),
        |l, n, v| strings(l, Field::Principal, n, v, false),
    );
    push_pair(
        &mut out,
        &base,
        ("requestPrincipals", "notRequestPrincipals"),
        (&s.request_principals, &s.not_request_principals),
        |l, n, v| Clause {
            label: l.into(),
            field: Field::RequestPrincipal,
            negate: n,
            matcher: Matcher::RequestPrincipals(RequestPrincipalSet::new(
                v.iter().map(String::as_str),
            )),
        },
    );
    push_pair(
        &mut out,
        &base,
        ("namespaces", "notNamespaces"),
        (&s.namespaces, &s.not_namespaces),
        |l, n, v| namespaces(l, Field::Namespace, n, v),
    );
    push_pair(
        &mut out,
        &base,
        ("serviceAccounts", "notServiceAccounts"),
        (
            &qualify_service_accounts(&s.service_accounts, namespace),
            &qualify_service_accounts(&s.not_service_accounts, namespace),
        ),
        |l, n, v| strings(l, Field::ServiceAccount, n, v, false),
    );
    push_pair(
        &mut out,
        &base,
        ("trustDomains", "notTrustDomains"),
        (&s.trust_domains, &s.not_trust_domains),
        |l, n, v| trust_domains(l, Field::TrustDomain, n, v),
    );
    let ips = |field: fn() -> Field| {
        move |l: String, n: bool, v: &[String]| Clause {
            label: l.into(),
            field: field(),
            negate: n,
            matcher: Matcher::Ips(IpSet::new(v.iter().map(String::as_str))),
        }
    };
    push_pair(
        &mut out,
        &base,
        ("ipBlocks", "notIpBlocks"),
        (&s.ip_blocks, &s.not_ip_blocks),
        ips(|| Field::SourceIp),
    );
    push_pair(
        &mut out,
        &base,
        ("remoteIpBlocks", "notRemoteIpBlocks"),
        (&s.remote_ip_blocks, &s.not_remote_ip_blocks),
        ips(|| Field::RemoteIp),
    );
    out
}

fn port_clause(label: String, field: Field, negate: bool, values: &[String]) -> Clause {
    Clause {
        label: label.into(),
        field,
        negate,
        matcher: Matcher::Ports(values.iter().filter_map(|p| parse_port(p)).collect()),
    }
}

fn operation_clauses(o: &Operation, index: usize) -> Vec<Clause> {
    let base = format!("to[{index}].operation");
    let mut out = Vec::new();
    push_pair(
        &mut out,
        &base,
        ("hosts", "notHosts"),
        (&o.hosts, &o.not_hosts),
        |l, n, v| strings(l, Field::Host, n, v, true),
    );
    push_pair(
        &mut out,
        &base,
        ("ports", "notPorts"),
        (&o.ports, &o.not_ports),
        |l, n, v| port_clause(l, Field::Port, n, v),
    );
    push_pair(
        &mut out,
        &base,
        ("methods", "notMethods"),
        (&o.methods, &o.not_methods),
        |l, n, v| strings(l, Field::Method, n, v, false),
    );
    push_pair(
        &mut out,
        &base,
        ("paths", "notPaths"),
        (&o.paths, &o.not_paths),
        |l, n, v| Clause {
            label: l.into(),
            field: Field::Path,
            negate: n,
            matcher: Matcher::Paths(PathSet::new(v.iter().map(String::as_str))),
        },
    );
    out
}

fn condition_clauses(c: &Condition, index: usize, namespace: &str) -> Vec<Clause> {
    let Ok(attribute) = Attribute::parse(&c.key) else {
        return Vec::new();
    };
    let base = format!("when[{index}]");
    let mut out = Vec::new();
    let (values, not_values) = if attribute == Attribute::SourceServiceAccount {
        (
            qualify_service_accounts(&c.values, namespace),
            qualify_service_accounts(&c.not_values, namespace),
        )
    } else {
        (c.values.clone(), c.not_values.clone())
    };
    push_pair(
        &mut out,
        &base,
        ("values", "notValues"),
        (&values, &not_values),
        |l, n, v| {
            let label = format!("{l} ({})", c.key);
            match attribute {
                Attribute::SourceIp | Attribute::RemoteIp | Attribute::DestinationIp => Clause {
                    label: label.into(),
                    field: Field::Attribute(attribute.clone()),
                    negate: n,
                    matcher: Matcher::Ips(IpSet::new(v.iter().map(String::as_str))),
                },
                Attribute::DestinationPort => {
                    port_clause(label, Field::Attribute(attribute.clone()), n, v)
                }
                Attribute::SourceNamespace => {
                    namespaces(label, Field::Attribute(attribute.clone()), n, v)
                }
                Attribute::SourceTrustDomain => {
                    trust_domains(label, Field::Attribute(attribute.clone()), n, v)
                }
                Attribute::RequestAuthPrincipal => Clause {
                    label: label.into(),
                    field: Field::Attribute(attribute.clone()),
                    negate: n,
                    matcher: Matcher::RequestPrincipals(RequestPrincipalSet::new(
                        v.iter().map(String::as_str),
                    )),
                },
                _ => strings(label, Field::Attribute(attribute.clone()), n, v, false),
            }
        },
    );
    out
}

/// The policies that apply to one workload, grouped by action in evaluation order.
#[derive(Debug, Clone, Default)]
pub struct WorkloadPolicies {
    pub custom: Vec<Arc<CompiledPolicy>>,
    pub deny: Vec<Arc<CompiledPolicy>>,
    pub allow: Vec<Arc<CompiledPolicy>>,
    pub audit: Vec<Arc<CompiledPolicy>>,
    /// Policies with `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: Vec<Arc<CompiledPolicy>>,
    /// Policies in scope by namespace that use `targetRef(s)`: reported as not applying.
    pub targeted: Vec<Arc<CompiledPolicy>>,
    /// The external authorizer the CUSTOM policies name, resolved against the `MeshConfig`.
    pub provider: CustomProvider,
}

/// The external authorizer of a workload's CUSTOM policies.
#[derive(Debug, Clone, Default)]
pub enum CustomProvider {
    /// No CUSTOM policy selects the workload.
    #[default]
    None,
    /// The one provider the CUSTOM policies name, ready to be called.
    Ready(Arc<ProviderConfig>),
    /// The provider cannot be called: CUSTOM policies deny what their rules match (Istio
    /// generates DENY rules "-deny-due-to-bad-CUSTOM-action"). Says why.
    Invalid(String),
}

impl CustomProvider {
    /// Istio's `getExtAuthz` for one workload: the providers named by its CUSTOM policies
    /// must all be the same one, defined in the `MeshConfig` and valid. (A dry-run CUSTOM policy
    /// never loads: validation refuses the annotation on CUSTOM.)
    fn resolve(policies: &[&Arc<CompiledPolicy>], mesh: &MeshProviders) -> Self {
        let mut names: Vec<&str> = policies
            .iter()
            .map(|p| p.provider.as_deref().unwrap_or_default())
            .collect();
        let Some(first) = names.first().copied() else {
            return Self::None;
        };
        names.sort_unstable();
        names.dedup();
        if names.len() > 1 {
            return Self::Invalid(format!(
                "only 1 provider can be used per workload, found multiple providers: {names:?}"
            ));
        }
        match mesh.providers.get(first) {
            Some(Entry::Ready(config)) => Self::Ready(Arc::new(config.clone())),
            Some(Entry::Invalid(errors)) => Self::Invalid(format!(
                "found errors in provider {first}: {}",
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
            None => Self::Invalid(format!(
                "available providers are {:?} but found {first:?}",
                mesh.providers.keys().collect::<Vec<_>>()
            )),
        }
    }

    /// The provider's name, when one is resolved.
    #[must_use]
    pub fn name(&self) -> Option<&str> {
        match self {
            Self::Ready(p) => Some(&p.name),
            _ => None,
        }
    }
}

impl WorkloadPolicies {
    /// Every policy in scope, enforced ones first in evaluation order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<CompiledPolicy>> {
        self.custom
            .iter()
            .chain(&self.deny)
            .chain(&self.allow)
            .chain(&self.audit)
            .chain(&self.dry_run)
    }

    /// No enforced policy applies.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.custom.is_empty()
            && self.deny.is_empty()
            && self.allow.is_empty()
            && self.audit.is_empty()
    }
}

/// All compiled AuthorizationPolicies, by namespace.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    root_namespace: String,
    by_namespace: HashMap<String, Vec<Arc<CompiledPolicy>>>,
    /// The `MeshConfig`'s `ext_authz` providers, for CUSTOM policies.
    providers: Arc<MeshProviders>,
}

impl PolicySet {
    #[must_use]
    pub fn compile<'a>(
        policies: impl IntoIterator<Item = &'a AuthorizationPolicy>,
        root_namespace: &str,
    ) -> Self {
        let mut by_namespace: HashMap<String, Vec<Arc<CompiledPolicy>>> = HashMap::new();
        for policy in policies {
            let compiled = CompiledPolicy::compile(policy);
            by_namespace
                .entry(compiled.namespace.clone())
                .or_default()
                .push(Arc::new(compiled));
        }
        for list in by_namespace.values_mut() {
            list.sort_by(|a, b| a.id.cmp(&b.id));
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            by_namespace,
            providers: Arc::default(),
        }
    }

    /// The set with the `MeshConfig`'s `ext_authz` providers, which CUSTOM policies call.
    #[must_use]
    pub fn with_providers(mut self, providers: Arc<MeshProviders>) -> Self {
        self.providers = providers;
        self
    }

    /// The `MeshConfig`'s `ext_authz` providers in force.
    #[must_use]
    pub fn providers(&self) -> &MeshProviders {
        &self.providers
    }

    #[must_use]
    pub fn root_namespace(&self) -> &str {
        &self.root_namespace
    }

    /// Every compiled policy, in no particular order (the admin server's `/debug/state`).
    pub fn policies(&self) -> impl Iterator<Item = &Arc<CompiledPolicy>> {
        self.by_namespace.values().flatten()
    }

    /// Number of compiled policies.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_namespace.values().map(Vec::len).sum()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The policies of the workload's namespace and of the root namespace whose selector its
    /// labels satisfy.
    #[must_use]
    pub fn for_workload(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> WorkloadPolicies {
        let mut out = WorkloadPolicies::default();
        for policy in scope::in_scope(&self.by_namespace, &self.root_namespace, namespace) {
            if policy.targets_refs {
                out.targeted.push(policy.clone());
                continue;
            }
            if !policy.selects(labels) {
                continue;
            }
            let list = if policy.dry_run {
                &mut out.dry_run
            } else {
                match policy.action {
                    Action::Custom => &mut out.custom,
                    Action::Deny => &mut out.deny,
                    Action::Allow => &mut out.allow,
                    Action::Audit => &mut out.audit,
                }
            };
            list.push(policy.clone());
        }
        let custom: Vec<&Arc<CompiledPolicy>> = out.custom.iter().collect();
        out.provider = CustomProvider::resolve(&custom, &self.providers);
        out
    }
}
