//! `/debug/state`: what the agent enforces right now, for operators and `nodeward status`.
//! Workloads, policy ids, jwtRules origins, issuers and key ids; never key material, never a
//! token. The same types serialize on the agent and deserialize in `nodeward status`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::Admin;
use crate::authn::fetch::SourceStatus;
use crate::authn::rules::{CompiledJwtRule, KeySource};
use crate::config::Config;
use crate::readiness::CheckResult;
use crate::state::{Snapshot, WorkloadView};

/// The whole `/debug/state` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DebugState {
    /// The snapshot in force; 0 before the first one is published.
    pub generation: u64,
    /// When it was built (RFC 3339, UTC).
    pub loaded_at: String,
    /// Seconds since then.
    pub age_seconds: u64,
    pub ready: bool,
    pub readiness: Vec<CheckResult>,
    /// Problems with the inputs right now; the last good content of each bad file serves.
    pub errors: Vec<String>,
    /// The configuration the agent runs with.
    pub config: Config,
    pub workloads: Vec<WorkloadState>,
    pub policies: Vec<PolicyState>,
    pub jwt_rules: Vec<JwtRuleState>,
    pub issuers: Vec<IssuerState>,
    /// The same-node fast path; absent with `--datapath off` (and from older agents).
    #[serde(default, rename = "fastPath", skip_serializing_if = "Option::is_none")]
    pub fast_path: Option<FastPathStatus>,
    /// `MeshConfig`'s `ext_authz` providers, which CUSTOM policies call.
    #[serde(default)]
    pub providers: Vec<ProviderState>,
}

/// One `extensionProviders` entry: where it is and how it fails, or why it cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderState {
    pub name: String,
    /// `envoyExtAuthzHttp` or `envoyExtAuthzGrpc`; absent when invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_on_error: Option<u16>,
    /// Why it is refused (CUSTOM policies naming it deny).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

fn provider_states(mesh: &crate::extauthz::MeshProviders) -> Vec<ProviderState> {
    use crate::extauthz::mesh::Entry;
    mesh.providers
        .iter()
        .map(|(name, entry)| match entry {
            Entry::Ready(p) => ProviderState {
                name: name.clone(),
                kind: Some(
                    match p.kind {
                        crate::extauthz::Kind::Http(_) => "envoyExtAuthzHttp",
                        crate::extauthz::Kind::Grpc => "envoyExtAuthzGrpc",
                    }
                    .to_owned(),
                ),
                service: Some(crate::extauthz::authority(&p.host, p.port)),
                timeout: Some(humantime::format_duration(p.timeout).to_string()),
                fail_open: p.fail_open,
                status_on_error: Some(p.status_on_error.as_u16()),
                errors: Vec::new(),
            },
            Entry::Invalid(errors) => ProviderState {
                name: name.clone(),
                kind: None,
                service: None,
                timeout: None,
                fail_open: false,
                status_on_error: None,
                errors: errors.iter().map(ToString::to_string).collect(),
            },
        })
        .collect()
}

/// The same-node fast path (`--fast-path`), as the data path runs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastPathStatus {
    /// `on` or `off`.
    pub mode: String,
    /// The cgroup v2 directory `fastpath_sockops` is attached to, when on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// Sockets in the fast path's sock hash now.
    pub sockets: usize,
}

/// One workload of the registry and what protects it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadState {
    /// `namespace/name`.
    pub id: String,
    pub name: String,
    pub namespace: String,
    #[serde(rename = "serviceAccount")]
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The principal its traffic carries as a source.
    pub principal: String,
    /// Any RequestAuthentication or AuthorizationPolicy applies to it.
    pub protected: bool,
    pub policies: AppliedPolicies,
    /// `namespace/name[index]` of every jwtRules entry that applies.
    pub jwt_rules: Vec<String>,
}

/// AuthorizationPolicy ids applying to a workload, by action, in evaluation order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedPolicies {
    pub custom: Vec<String>,
    pub deny: Vec<String>,
    pub allow: Vec<String>,
    pub audit: Vec<String>,
    /// Evaluated and reported, never enforced.
    pub dry_run: Vec<String>,
    /// In scope by namespace but using `targetRef(s)`: they do not apply to workloads.
    pub not_applied: Vec<String>,
}

/// One compiled AuthorizationPolicy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyState {
    /// `namespace/name`.
    pub id: String,
    /// `ALLOW`, `DENY`, `AUDIT` or `CUSTOM`.
    pub action: String,
    pub dry_run: bool,
    /// File and document it came from.
    pub file: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub target_refs: bool,
    pub rules: usize,
    /// Workloads of the registry it applies to.
    pub workloads: Vec<String>,
}

/// One jwtRules entry of a RequestAuthentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtRuleState {
    /// `namespace/name[index]`.
    pub origin: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    /// `inline`, `remote` or `missing` (no usable keys: its tokens get 401).
    pub keys: String,
    /// The JWKS store's key of a remote source (the `jwksUri` or the discovery URL).
    pub source: Option<String>,
    /// Workloads of the registry it applies to.
    pub workloads: Vec<String>,
}

/// One key source: a fetched JWKS, or a rule's inline `jwks`. Key ids only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerState {
    /// The issuer(s) using the source, comma separated.
    pub issuer: String,
    /// The `jwksUri`, `OpenID discovery of <issuer>`, or `inline jwks (<rule>)`.
    pub source: String,
    /// The JWKS URI fetched (for discovery: once discovered).
    pub uri: Option<String>,
    /// `pending`, `ready`, `stale` (keys from an earlier fetch, the last one failed) or
    /// `failed` (no keys).
    pub state: String,
    pub kids: Vec<String>,
    /// Key-set generation (changes whenever the keys do).
    pub generation: Option<u64>,
    pub last_success: Option<String>,
    /// Seconds since the last success.
    pub age_seconds: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub fetches: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    pub next_attempt: Option<String>,
}

/// RFC 3339 in UTC, seconds precision.
fn rfc3339(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn age(now: SystemTime, at: SystemTime) -> u64 {
    now.duration_since(at).map_or(0, |d| d.as_secs())
}

fn ids<'a>(
    policies: impl IntoIterator<Item = &'a std::sync::Arc<crate::authz::CompiledPolicy>>,
) -> Vec<String> {
    policies.into_iter().map(|p| p.id.clone()).collect()
}

fn workload_state(view: &WorkloadView, snapshot: &Snapshot) -> WorkloadState {
    let w = &view.workload;
    let authz = &view.authz;
    WorkloadState {
        id: view.id.to_string(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        labels: w.labels.clone(),
        ip: w.ip,
        interface: w.interface.clone(),
        principal: snapshot
            .source(w.ip)
            .map(|s| s.principal.clone())
            .unwrap_or_default(),
        protected: view.is_protected(),
        policies: AppliedPolicies {
            custom: ids(&authz.custom),
            deny: ids(&authz.deny),
            allow: ids(&authz.allow),
            audit: ids(&authz.audit),
            dry_run: ids(&authz.dry_run),
            not_applied: ids(&authz.targeted),
        },
        jwt_rules: view.authn.rules.iter().map(|r| r.origin.clone()).collect(),
    }
}

fn jwt_rule_state(rule: &CompiledJwtRule, views: &[&WorkloadView]) -> JwtRuleState {
    let (keys, source) = match &rule.keys {
        KeySource::Inline(_) => ("inline", None),
        KeySource::Remote { key, .. } => ("remote", Some(key.clone())),
        KeySource::Missing => ("missing", None),
    };
    JwtRuleState {
        origin: rule.origin.clone(),
        issuer: rule.issuer.clone(),
        audiences: rule.audiences.clone(),
        keys: keys.to_owned(),
        source,
        workloads: views
            .iter()
            .filter(|v| v.authn.rules.iter().any(|r| r.origin == rule.origin))
            .map(|v| v.id.to_string())
            .collect(),
    }
}

fn fetched_issuer(s: SourceStatus, now: SystemTime) -> IssuerState {
    IssuerState {
        issuer: s.issuer,
        source: s.source.to_string(),
        uri: s.uri,
        state: s.state.as_str().to_owned(),
        kids: s.kids,
        generation: s.generation,
        last_success: s.last_success.map(rfc3339),
        age_seconds: s.last_success.map(|at| age(now, at)),
        last_error: s.last_error,
        last_error_at: s.last_error_at.map(rfc3339),
        fetches: s.fetches,
        failures: s.failures,
        consecutive_failures: s.consecutive_failures,
        next_attempt: s.next_attempt.map(rfc3339),
    }
}

/// The key source of a rule that is not fetched (inline, or none at all).
fn local_issuer(rule: &CompiledJwtRule) -> Option<IssuerState> {
    let (state, kids, error) = match &rule.keys {
        KeySource::Remote { .. } => return None,
        KeySource::Inline(set) => ("ready", set.kids(), None),
        KeySource::Missing => (
            "failed",
            Vec::new(),
            Some(
                "no usable keys: the inline jwks does not parse, or there is neither jwks nor \
                 jwksUri and the issuer is not an https URL to discover keys from; tokens of \
                 this issuer get 401"
                    .to_owned(),
            ),
        ),
    };
    Some(IssuerState {
        issuer: rule.issuer.clone(),
        source: format!("inline jwks ({})", rule.origin),
        uri: None,
        state: state.to_owned(),
        kids,
        generation: None,
        last_success: None,
        age_seconds: None,
        last_error: error,
        last_error_at: None,
        fetches: 0,
        failures: 0,
        consecutive_failures: 0,
        next_attempt: None,
    })
}

/// The document `/debug/state` serves.
#[must_use]
pub fn debug_state(admin: &Admin) -> DebugState {
    let snapshot = admin.store.load();
    let now = SystemTime::now();
    let mut views: Vec<&WorkloadView> = snapshot.by_ip.values().map(AsRef::as_ref).collect();
    views.sort_by(|a, b| a.id.cmp(&b.id));

    let mut policies: Vec<PolicyState> = snapshot
        .authz
        .policies()
        .map(|p| PolicyState {
            id: p.id.clone(),
            action: p.action.as_str().to_owned(),
            dry_run: p.dry_run,
            file: p.origin.to_string(),
            selector: p.selector.clone(),
            target_refs: p.targets_refs,
            rules: p.rules.len(),
            workloads: views
                .iter()
                .filter(|v| v.authz.all().any(|applied| applied.id == p.id))
                .map(|v| v.id.to_string())
                .collect(),
        })
        .collect();
    policies.sort_by(|a, b| a.id.cmp(&b.id));

    let mut rules: Vec<&CompiledJwtRule> = snapshot.authn.rules().map(AsRef::as_ref).collect();
    rules.sort_by(|a, b| a.origin.cmp(&b.origin));
    let jwt_rules = rules.iter().map(|r| jwt_rule_state(r, &views)).collect();
    let mut issuers: Vec<IssuerState> = rules.iter().filter_map(|r| local_issuer(r)).collect();
    issuers.extend(
        admin
            .jwks
            .status()
            .into_iter()
            .map(|s| fetched_issuer(s, now)),
    );

    let readiness = admin.readiness.evaluate();
    DebugState {
        generation: snapshot.generation,
        loaded_at: rfc3339(snapshot.loaded_at),
        age_seconds: age(now, snapshot.loaded_at),
        ready: readiness.iter().all(|r| r.ok),
        readiness,
        errors: snapshot.errors.clone(),
        config: admin.config.clone(),
        workloads: views.iter().map(|v| workload_state(v, &snapshot)).collect(),
        policies,
        jwt_rules,
        issuers,
        fast_path: admin
            .datapath
            .as_ref()
            .and_then(|d| d.fast_path())
            .map(|f| FastPathStatus {
                mode: if f.cgroup.is_some() { "on" } else { "off" }.to_owned(),
                cgroup: f.cgroup,
                sockets: f.sockets,
            }),
        providers: provider_states(snapshot.authz.providers()),
    }
}
