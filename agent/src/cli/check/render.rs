//! `check`'s two renderings of a verdict: JSON (the fixed interface tooling reads) and text
//! (every policy, rule and clause with its outcome).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::json;

use crate::authn::JwtRules;
use crate::authn::{JwtError, Outcome};
use crate::authz::eval::Outcome as ClauseOutcome;
use crate::authz::explain::Explanation;
use crate::authz::AuthInfo;

use super::request::{CheckRequest, Judgement};

/// The request as the renderers show it.
pub(super) struct Shown<'a> {
    pub(super) req: &'a CheckRequest,
    pub(super) namespace: &'a str,
    pub(super) labels: &'a BTreeMap<String, String>,
    pub(super) path: &'a str,
    pub(super) source_principal: Option<&'a str>,
}

pub(super) fn render_json(
    shown: &Shown<'_>,
    auth: Option<&AuthInfo>,
    authn: &AuthnReport,
    judged: &Judgement,
) -> String {
    let req = shown.req;
    let rejected = authn.error.is_some();
    let decided_by = judged
        .decision
        .as_ref()
        .and_then(|d| d.decided_by.as_ref())
        .filter(|_| !rejected);
    let empty = Explanation::default();
    let explanation = judged.explanation.as_ref().unwrap_or(&empty);
    let value = json!({
        "decision": if judged.allowed { "allow" } else { "deny" },
        "status": judged.status,
        "reason": judged.describe(authn),
        "reason_code": judged.reason.label(),
        "body": judged.body,
        "www_authenticate": authn.www_authenticate,
        "authn": authn,
        "policy": decided_by.map(|m| &m.policy),
        "action": decided_by.map(|m| m.action),
        "rule": decided_by.map(|m| m.rule),
        "principal": auth.map(AuthInfo::principal),
        "source_principal": shown.source_principal,
        "audit": judged.decision.as_ref().map_or(&Vec::new(), |d| &d.audit),
        "dry_run": judged.decision.as_ref().map_or(&Vec::new(), |d| &d.dry_run),
        "dry_run_result": judged.decision.as_ref().map_or(&Vec::new(), |d| &d.shadow),
        "workload": { "namespace": shown.namespace, "labels": shown.labels },
        "request": {
            "protocol": if req.tcp { "tcp" } else { "http" },
            "method": (!req.tcp).then_some(&req.method),
            "path": (!req.tcp).then_some(shown.path),
            "port": req.port,
        },
        "policies": explanation.policies,
        "not_applied": explanation.not_applied,
        "provider": judged.check.as_ref().map(crate::extauthz::CheckResult::report),
    });
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

pub(super) fn render_text(
    shown: &Shown<'_>,
    auth: Option<&AuthInfo>,
    authn: &AuthnReport,
    judged: &Judgement,
) -> String {
    let req = shown.req;
    let empty = Explanation::default();
    let explanation = judged.explanation.as_ref().unwrap_or(&empty);
    let mut out = String::new();
    let labels: Vec<String> = shown
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        out,
        "workload:  {} {{{}}}",
        shown.namespace,
        labels.join(",")
    );
    if req.tcp {
        let _ = writeln!(
            out,
            "request:   TCP port {}{}",
            req.port,
            req.sni
                .as_ref()
                .map(|s| format!(" sni={s}"))
                .unwrap_or_default()
        );
    } else {
        let _ = writeln!(
            out,
            "request:   {} {} port {}",
            req.method, shown.path, req.port
        );
    }
    let _ = writeln!(
        out,
        "source:    principal={} ip={}",
        shown.source_principal.unwrap_or("(none)"),
        req.source_ip
            .map_or_else(|| "(none)".to_owned(), |ip| ip.to_string())
    );
    let _ = writeln!(out, "authn:     {}", authn.describe());
    for line in &authn.jwks {
        let _ = writeln!(out, "jwks:      {line}");
    }
    let _ = writeln!(
        out,
        "identity:  {}",
        auth.map_or_else(
            || "(no request principal)".to_owned(),
            |a| format!("request principal {}", a.principal())
        )
    );
    if explanation.policies.is_empty() {
        let _ = writeln!(out, "policies:  none apply to this workload");
    } else {
        let _ = writeln!(out, "policies:  {} apply", explanation.policies.len());
    }
    render_policies(&mut out, explanation);
    for id in &explanation.not_applied {
        let _ = writeln!(
            out,
            "  not applied: {id} uses targetRefs (applies to gateways/waypoints, not workloads)"
        );
    }
    if let Some(decision) = &judged.decision {
        if !decision.audit.is_empty() {
            let _ = writeln!(out, "audit:     {}", decision.audit.join(", "));
        }
        for s in &decision.shadow {
            let _ = writeln!(
                out,
                "dry-run:   {} policies would have {} the request{}",
                s.action.as_str(),
                s.result,
                s.effective_policy
                    .as_ref()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(check) = &judged.check {
        render_check(&mut out, check);
    }
    if let Some(error) = authn.error {
        let _ = write!(
            out,
            "decision:  DENY {} - authentication failed: {error}; authorization was not evaluated (Envoy's jwt_authn runs first)",
            error.status()
        );
        return out;
    }
    let _ = write!(
        out,
        "decision:  {} {} - {}",
        if judged.allowed { "ALLOW" } else { "DENY" },
        judged.status,
        judged.describe(authn)
    );
    out
}

/// The external authorizer's answer: one line, then what it changes.
fn render_check(out: &mut String, check: &crate::extauthz::CheckResult) {
    let _ = writeln!(out, "provider:  {}", check.describe());
    let report = check.report();
    for line in &report.headers_to_upstream {
        let _ = writeln!(out, "  to the pod: {line}");
    }
    for name in &report.headers_removed {
        let _ = writeln!(out, "  removed: {name}");
    }
    for line in &report.headers_to_client {
        let _ = writeln!(out, "  to the client: {line}");
    }
    if let Some(body) = report.body.filter(|b| !b.is_empty()) {
        let _ = writeln!(out, "  body: {}", body.trim_end());
    }
}

/// Each applied policy, each rule, each clause with its outcome.
fn render_policies(out: &mut String, explanation: &Explanation) {
    for p in &explanation.policies {
        let verdict = match p.matched_rule {
            Some(r) => format!("MATCHED rule {r}"),
            None if p.rules.is_empty() => "matches nothing (no rules)".into(),
            None => "no rule matched".into(),
        };
        let dry = if p.dry_run {
            " [dry-run: reported, not enforced]"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {:<6} {}{}: {}  ({})",
            p.action.as_str(),
            p.policy,
            dry,
            verdict,
            p.file
        );
        for rule in &p.rules {
            let _ = writeln!(
                out,
                "         rule {}: {}",
                rule.index,
                if rule.matched {
                    "matched"
                } else {
                    "not matched"
                }
            );
            if let Some(why) = rule.dropped {
                let _ = writeln!(out, "           dropped: {why}");
            }
            for c in &rule.clauses {
                let mark = match c.outcome {
                    ClauseOutcome::Matched => "ok  ",
                    ClauseOutcome::NotMatched => "FAIL",
                    ClauseOutcome::Ignored => "skip",
                };
                let _ = writeln!(out, "           {mark} {}", c.field);
            }
        }
    }
}

/// What authentication made of the request, for both outputs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AuthnReport {
    /// `no_rules`, `no_token`, `preflight`, `authenticated` or `rejected`.
    pub result: &'static str,
    /// The jwtRules entry (`ns/name[index]`) that validated or refused the token.
    pub rule: Option<String>,
    /// Where the token was found.
    pub location: Option<String>,
    pub principal: Option<String>,
    pub error: Option<JwtError>,
    /// The header a 401 carries.
    pub www_authenticate: Option<String>,
    /// Rules that apply to the workload: issuer and where its keys come from.
    pub issuers: Vec<String>,
    /// Fetched key sets: source, state, key ids or the fetch error.
    pub jwks: Vec<String>,
    #[serde(skip)]
    pub auth: Option<AuthInfo>,
}

impl AuthnReport {
    fn describe(&self) -> String {
        let rule = self
            .rule
            .as_ref()
            .map(|r| format!(" by jwtRules {r}"))
            .unwrap_or_default();
        let at = self
            .location
            .as_ref()
            .map(|l| format!(" (token in {l})"))
            .unwrap_or_default();
        match (self.result, self.error) {
            (_, Some(e)) => format!("REJECTED {} {e:?}: {e}{rule}{at}", e.status()),
            ("authenticated", None) => format!(
                "token valid{rule}{at}: {}",
                self.principal.as_deref().unwrap_or_default()
            ),
            ("no_rules", None) => "no RequestAuthentication applies to the workload".into(),
            ("preflight", None) => "CORS preflight: not asked for a token".into(),
            _ => format!(
                "no token; the request goes on without identity (rules: {})",
                self.issuers.join(", ")
            ),
        }
    }
}

/// What authentication made of the request (`outcome`: `None` when it did not run: TCP, or an
/// answer before it), with the rules' issuers and the key sets consulted. Its
/// `www_authenticate` is the verdict's.
pub(super) fn authn_report(
    req: &CheckRequest,
    rules: &JwtRules,
    outcome: Option<&Outcome>,
    jwks: Vec<String>,
) -> AuthnReport {
    let issuers = rules
        .rules
        .iter()
        .map(|r| {
            format!(
                "{} ({})",
                r.issuer,
                r.jwks_uri.as_deref().unwrap_or("inline jwks")
            )
        })
        .collect();
    match outcome {
        None if req.tcp || rules.is_empty() => AuthnReport {
            result: "no_rules",
            issuers,
            ..AuthnReport::default()
        },
        None | Some(Outcome::NoToken) => AuthnReport {
            result: "no_token",
            issuers,
            ..AuthnReport::default()
        },
        Some(Outcome::NoRules) => AuthnReport {
            result: "no_rules",
            ..AuthnReport::default()
        },
        Some(Outcome::Preflight) => AuthnReport {
            result: "preflight",
            issuers,
            ..AuthnReport::default()
        },
        Some(Outcome::Authenticated(a)) => AuthnReport {
            result: "authenticated",
            jwks,
            rule: Some(a.rule.origin.clone()),
            location: Some(a.location.to_string()),
            principal: Some(a.verified.auth.principal()),
            auth: Some(a.verified.auth.clone()),
            issuers,
            ..AuthnReport::default()
        },
        Some(Outcome::Rejected {
            error,
            rule,
            location,
        }) => AuthnReport {
            result: "rejected",
            jwks,
            rule: rule.as_ref().map(|r| r.origin.clone()),
            location: Some(location.to_string()),
            error: Some(*error),
            issuers,
            ..AuthnReport::default()
        },
    }
}
