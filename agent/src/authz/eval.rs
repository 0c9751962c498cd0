//! Evaluation: a request against the policies of its destination workload, in Istio's order.
//!
//! Istio's spec: "CUSTOM, DENY and ALLOW actions for the same workload are evaluated in that
//! order: if any CUSTOM policy matches the request, evaluate the CUSTOM policy; if any DENY
//! policy matches the request, deny the request; if there are no ALLOW policies for the
//! workload, allow the request; if any of the ALLOW policies match the request, allow the
//! request; deny the request." AUDIT only marks.
//!
//! Evaluating the CUSTOM policy means asking its external authorizer, which this synchronous
//! evaluation cannot do: a matching CUSTOM policy gives [`Reason::CustomCheck`], the caller asks
//! the provider (`crate::extauthz`) and, when it allows, evaluates again with
//! [`WorkloadPolicies::evaluate_after_custom`] (DENY and ALLOW, over the request as the
//! provider left it, as Envoy's RBAC filters run after its `ext_authz` filter).

use std::borrow::Cow;
use std::net::IpAddr;

use serde::Serialize;

use super::compile::{
    Clause, CompiledPolicy, CompiledRule, CustomProvider, Field, Matcher, WorkloadPolicies,
};
use crate::authn::AuthInfo;
use crate::extauthz::mesh::Kind;
use crate::policy::attribute::{Attribute, HeaderKey};
use crate::policy::Action;

/// The body Envoy's RBAC filter answers a denied request with.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// Who sent the request, as the node knows it (the registry of pods by IP).
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer<'a> {
    pub ip: Option<IpAddr>,
    /// The original client; the peer address at the node.
    pub remote_ip: Option<IpAddr>,
    /// `<trust-domain>/ns/<ns>/sa/<sa>`; `None` for an unknown source.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    /// `<ns>/<sa>`.
    pub service_account: Option<&'a str>,
}

/// The HTTP part of a request; absent for plain TCP connections.
#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    /// Normalized, without query.
    pub path: &'a str,
    /// The query, without `?` (read only by `request.headers[:path]`).
    pub query: Option<&'a str>,
    /// Host or `:authority`.
    pub host: &'a str,
    pub headers: &'a http::HeaderMap,
    pub auth: Option<&'a AuthInfo>,
}

/// Everything a policy can look at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub source: Peer<'a>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    pub sni: Option<&'a str>,
    pub http: Option<Http<'a>>,
}

/// Why the decision is what it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A CUSTOM policy matched: its provider decides (not final; `allow` is false until the
    /// provider answers).
    CustomCheck,
    /// A CUSTOM policy matched and its provider cannot be called (undefined, invalid, or
    /// several providers for one workload): denied, as Istio's generated DENY rules do.
    CustomProviderInvalid,
    /// A DENY policy matched.
    DeniedByPolicy,
    /// No ALLOW policy applies to the workload.
    NoAllowPolicies,
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
}

/// A policy and the rule of it that matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyMatch {
    pub policy: String,
    pub action: Action,
    pub rule: usize,
}

/// A dry-run policy's result: what it would have done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DryRun {
    pub policy: String,
    pub action: Action,
    /// The index of the rule that matched, if any.
    pub rule: Option<usize>,
}

/// The shadow result of one action's dry-run policies, as Envoy's shadow engine gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ShadowResult {
    pub action: Action,
    /// `allowed` or `denied`.
    pub result: &'static str,
    pub effective_policy: Option<String>,
}

/// The authorization decision for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    /// The deciding policy and rule; `None` when no policy decided (no ALLOW policies, or
    /// none matched).
    pub decided_by: Option<PolicyMatch>,
    /// The provider of the CUSTOM policy that matched.
    pub provider: Option<String>,
    /// Why the CUSTOM policy's provider cannot be called ([`Reason::CustomProviderInvalid`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider_problem: Option<String>,
    /// AUDIT policies that matched.
    pub audit: Vec<String>,
    /// Dry-run policies and whether they matched.
    pub dry_run: Vec<DryRun>,
    pub shadow: Vec<ShadowResult>,
}

impl Decision {
    /// 200 or 403.
    #[must_use]
    pub fn status(&self) -> u16 {
        if self.allow {
            200
        } else {
            403
        }
    }

    /// One line for logs and the CLI.
    #[must_use]
    pub fn describe(&self) -> String {
        let by = self.decided_by.as_ref().map(|m| {
            format!(
                "{} policy {} (rule {})",
                m.action.as_str(),
                m.policy,
                m.rule
            )
        });
        match self.reason {
            Reason::CustomCheck => format!(
                "{} matched: its external authorizer {:?} decides",
                by.unwrap_or_default(),
                self.provider.as_deref().unwrap_or_default()
            ),
            Reason::CustomProviderInvalid => format!(
                "denied: {} matched and its external authorizer cannot be called ({}), so the request is denied",
                by.unwrap_or_default(),
                self.provider_problem.as_deref().unwrap_or_default()
            ),
            Reason::DeniedByPolicy => format!("denied by {}", by.unwrap_or_default()),
            Reason::NoAllowPolicies => "allowed: no ALLOW policy applies to the workload".into(),
            Reason::AllowedByPolicy => format!("allowed by {}", by.unwrap_or_default()),
            Reason::NoAllowMatched => "denied: ALLOW policies apply to the workload and none matched".into(),
        }
    }
}

/// How a clause came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Matched,
    NotMatched,
    /// HTTP-only on a TCP connection, or an attribute the node does not have: ignored (the
    /// rule matches more) in DENY/AUDIT/CUSTOM policies.
    Ignored,
}

/// Collects per-clause outcomes for explanations; the enforcer's path uses [`NoTrace`].
pub trait Trace {
    /// Evaluate every clause instead of stopping at the first that decides.
    const FULL: bool;
    fn clause(&mut self, label: &str, outcome: Outcome);
}

/// No tracing: clauses short-circuit.
pub struct NoTrace;

impl Trace for NoTrace {
    const FULL: bool = false;
    fn clause(&mut self, _: &str, _: Outcome) {}
}

impl Clause {
    /// `None` when the attribute does not exist for this request (HTTP-only on TCP, or Envoy
    /// metadata).
    fn eval(&self, req: &Request<'_>) -> Option<bool> {
        let hit = match &self.field {
            Field::Principal | Field::Attribute(Attribute::SourcePrincipal) => {
                self.str_opt(req.source.principal)
            }
            Field::Namespace | Field::Attribute(Attribute::SourceNamespace) => {
                self.str_opt(req.source.namespace)
            }
            Field::ServiceAccount | Field::Attribute(Attribute::SourceServiceAccount) => {
                self.str_opt(req.source.service_account)
            }
            Field::TrustDomain | Field::Attribute(Attribute::SourceTrustDomain) => {
                match (&self.matcher, req.source.principal) {
                    (Matcher::TrustDomains(set), Some(principal)) => set.matches(principal),
                    _ => false,
                }
            }
            Field::SourceIp | Field::Attribute(Attribute::SourceIp) => self.ip(req.source.ip),
            Field::RemoteIp | Field::Attribute(Attribute::RemoteIp) => {
                self.ip(req.source.remote_ip.or(req.source.ip))
            }
            Field::Port | Field::Attribute(Attribute::DestinationPort) => match &self.matcher {
                Matcher::Ports(ports) => ports.contains(&req.destination_port),
                _ => false,
            },
            Field::Attribute(Attribute::DestinationIp) => self.ip(req.destination_ip),
            Field::Attribute(Attribute::ConnectionSni) => self.str_opt(req.sni),
            Field::Attribute(Attribute::EnvoyFilterMetadata(_)) => return None,
            Field::Host => self.str_opt(Some(req.http?.host)),
            Field::Method => self.str_opt(Some(req.http?.method)),
            Field::Path => match &self.matcher {
                Matcher::Paths(paths) => paths.matches(req.http?.path),
                _ => false,
            },
            Field::RequestPrincipal | Field::Attribute(Attribute::RequestAuthPrincipal) => {
                let auth = req.http?.auth;
                match (&self.matcher, auth) {
                    (Matcher::RequestPrincipals(set), Some(a)) => {
                        set.matches(&a.issuer, &a.subject)
                    }
                    _ => false,
                }
            }
            Field::Attribute(Attribute::RequestAuthAudiences) => req
                .http?
                .auth
                .is_some_and(|a| a.audiences.iter().any(|aud| self.str_opt(Some(aud)))),
            Field::Attribute(Attribute::RequestAuthPresenter) => {
                self.str_opt(req.http?.auth.and_then(|a| a.presenter.as_deref()))
            }
            Field::Attribute(Attribute::RequestAuthClaim(path)) => {
                let claim = req.http?.auth.and_then(|a| claim_at(&a.claims, path));
                match claim {
                    Some(serde_json::Value::String(s)) => self.str_opt(Some(s)),
                    Some(serde_json::Value::Array(list)) => list
                        .iter()
                        .any(|v| v.as_str().is_some_and(|s| self.str_opt(Some(s)))),
                    _ => false,
                }
            }
            Field::Attribute(Attribute::RequestHeader(key)) => {
                let value = header_value(req.http?, key);
                match (&self.matcher, value) {
                    (Matcher::Strings(set), Some(v)) => set.matches_present(&v),
                    _ => false,
                }
            }
            Field::Attribute(Attribute::RequestInlineHeader(key)) => header_value(req.http?, key)
                .is_some_and(|v| v.split(',').any(|e| self.str_opt(Some(e)))),
        };
        Some(hit != self.negate)
    }

    fn str_opt(&self, value: Option<&str>) -> bool {
        match (&self.matcher, value) {
            (Matcher::Strings(set), Some(v)) => set.matches(v),
            _ => false,
        }
    }

    fn ip(&self, ip: Option<IpAddr>) -> bool {
        match (&self.matcher, ip) {
            (Matcher::Ips(set), Some(ip)) => set.contains(ip),
            _ => false,
        }
    }
}

/// What Envoy's header matcher reads for `key`: a pseudo-header's value, or all values of a
/// header joined with `,`; lossy for non-UTF-8. `None`: not present.
fn header_value<'h>(http: Http<'h>, key: &HeaderKey) -> Option<Cow<'h, str>> {
    let name = match key {
        HeaderKey::Name(name) => name,
        HeaderKey::Authority => return Some(Cow::Borrowed(http.host)),
        HeaderKey::Method => return Some(Cow::Borrowed(http.method)),
        HeaderKey::Path => {
            return Some(match http.query {
                Some(query) => Cow::Owned(format!("{}?{query}", http.path)),
                None => Cow::Borrowed(http.path),
            })
        }
        HeaderKey::Scheme => return Some(Cow::Borrowed("http")),
        HeaderKey::Absent(_) => return None,
    };
    let mut values = http.headers.get_all(name).iter();
    let first = values.next()?;
    let first = String::from_utf8_lossy(first.as_bytes());
    let Some(second) = values.next() else {
        return Some(first);
    };
    let mut joined = first.into_owned();
    for v in std::iter::once(second).chain(values) {
        joined.push(',');
        joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
    }
    Some(Cow::Owned(joined))
}

fn claim_at<'c>(
    claims: &'c serde_json::Map<String, serde_json::Value>,
    path: &[String],
) -> Option<&'c serde_json::Value> {
    let (first, rest) = path.split_first()?;
    rest.iter()
        .try_fold(claims.get(first)?, |value, key| value.get(key))
}

/// A list of clauses that must all match. HTTP-only clauses on TCP count as matching here;
/// ALLOW rules that hold any were dropped before.
fn all_match<T: Trace>(clauses: &[Clause], req: &Request<'_>, trace: &mut T) -> bool {
    let mut all = true;
    for clause in clauses {
        let outcome = match clause.eval(req) {
            Some(true) => Outcome::Matched,
            Some(false) => Outcome::NotMatched,
            None => Outcome::Ignored,
        };
        trace.clause(&clause.label, outcome);
        if outcome == Outcome::NotMatched {
            all = false;
            if !T::FULL {
                return false;
            }
        }
    }
    all
}

fn any_group<T: Trace>(groups: &[Vec<Clause>], req: &Request<'_>, trace: &mut T) -> bool {
    if groups.is_empty() {
        return true;
    }
    let mut any = false;
    for group in groups {
        if all_match(group, req, trace) {
            any = true;
            if !T::FULL {
                return true;
            }
        }
    }
    any
}

impl CompiledRule {
    /// Istio's rule semantics, including its treatment of HTTP-only fields on TCP: an ALLOW
    /// rule that uses one is dropped; other actions ignore those fields.
    pub fn matches<T: Trace>(&self, action: Action, req: &Request<'_>, trace: &mut T) -> bool {
        if action == Action::Allow && (self.unsupported || (req.http.is_none() && self.http_only)) {
            return false;
        }
        let from = any_group(&self.from, req, trace);
        if !from && !T::FULL {
            return false;
        }
        let to = any_group(&self.to, req, trace);
        if !to && !T::FULL {
            return false;
        }
        let when = all_match(&self.when, req, trace);
        from && to && when
    }

    /// Why the rule can never match this request, if that is so.
    #[must_use]
    pub fn dropped(&self, action: Action, req: &Request<'_>) -> Option<&'static str> {
        if action != Action::Allow {
            return None;
        }
        if self.unsupported {
            Some("uses experimental.envoy.filters metadata, which the node does not have")
        } else if req.http.is_none() && self.http_only {
            Some("uses HTTP-only fields and the connection is not HTTP")
        } else {
            None
        }
    }
}

impl CompiledPolicy {
    /// The index of the first rule that matches. A policy without rules matches nothing.
    pub fn first_match<T: Trace>(&self, req: &Request<'_>, trace: &mut T) -> Option<usize> {
        self.rules
            .iter()
            .position(|rule| rule.matches(self.action, req, trace))
    }
}

fn first_matching(
    policies: &[std::sync::Arc<CompiledPolicy>],
    req: &Request<'_>,
) -> Option<PolicyMatch> {
    policies.iter().find_map(|p| {
        p.first_match(req, &mut NoTrace).map(|rule| PolicyMatch {
            policy: p.id.clone(),
            action: p.action,
            rule,
        })
    })
}

impl WorkloadPolicies {
    /// Decides one request, CUSTOM first.
    #[must_use]
    pub fn evaluate(&self, req: &Request<'_>) -> Decision {
        self.evaluate_from(req, true)
    }

    /// DENY then ALLOW: the rest of the evaluation once the CUSTOM policy's provider allowed.
    #[must_use]
    pub fn evaluate_after_custom(&self, req: &Request<'_>) -> Decision {
        self.evaluate_from(req, false)
    }

    fn evaluate_from(&self, req: &Request<'_>, custom: bool) -> Decision {
        let audit = self
            .audit
            .iter()
            .filter(|p| p.first_match(req, &mut NoTrace).is_some())
            .map(|p| p.id.clone())
            .collect();
        let (dry_run, shadow) = self.dry_run_results(req);
        let decide = |allow, reason, decided_by: Option<PolicyMatch>, provider| Decision {
            allow,
            reason,
            decided_by,
            provider,
            provider_problem: None,
            audit,
            dry_run,
            shadow,
        };
        if let Some(m) = custom.then(|| first_matching(&self.custom, req)).flatten() {
            match &self.provider {
                CustomProvider::Ready(p) => {
                    // Istio: "ignored CUSTOM action with HTTP provider on TCP filter chain".
                    let ignored = req.http.is_none() && matches!(p.kind, Kind::Http(_));
                    if !ignored {
                        let name = Some(p.name.clone());
                        return decide(false, Reason::CustomCheck, Some(m), name);
                    }
                }
                CustomProvider::Invalid(why) => {
                    let mut d = decide(false, Reason::CustomProviderInvalid, Some(m), None);
                    d.provider_problem = Some(why.clone());
                    return d;
                }
                // Unreachable: a CUSTOM policy in the list resolves a provider or a reason.
                CustomProvider::None => {
                    let mut d = decide(false, Reason::CustomProviderInvalid, Some(m), None);
                    d.provider_problem = Some("no provider resolved".into());
                    return d;
                }
            }
        }
        if let Some(m) = first_matching(&self.deny, req) {
            return decide(false, Reason::DeniedByPolicy, Some(m), None);
        }
        if self.allow.is_empty() {
            return decide(true, Reason::NoAllowPolicies, None, None);
        }
        match first_matching(&self.allow, req) {
            Some(m) => decide(true, Reason::AllowedByPolicy, Some(m), None),
            None => decide(false, Reason::NoAllowMatched, None, None),
        }
    }

    /// Dry-run policies, each on its own, and the shadow result per action over only that
    /// action's dry-run policies (Envoy's shadow rules).
    fn dry_run_results(&self, req: &Request<'_>) -> (Vec<DryRun>, Vec<ShadowResult>) {
        if self.dry_run.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let runs: Vec<DryRun> = self
            .dry_run
            .iter()
            .map(|p| DryRun {
                policy: p.id.clone(),
                action: p.action,
                rule: p.first_match(req, &mut NoTrace),
            })
            .collect();
        let mut shadow = Vec::new();
        for action in [Action::Deny, Action::Allow] {
            let mut of_action = runs.iter().filter(|r| r.action == action).peekable();
            if of_action.peek().is_none() {
                continue;
            }
            let hit = of_action
                .find(|r| r.rule.is_some())
                .map(|r| r.policy.clone());
            let allowed = match action {
                Action::Deny => hit.is_none(),
                _ => hit.is_some(),
            };
            shadow.push(ShadowResult {
                action,
                result: if allowed { "allowed" } else { "denied" },
                effective_policy: hit,
            });
        }
        (runs, shadow)
    }
}
