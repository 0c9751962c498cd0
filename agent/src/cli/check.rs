//! `nodeward check`: "why was this request denied?" answered from policy files.
//!
//! The interface is fixed (tooling calls it): exit 0 allow, 1 deny, 2 bad input; `--output
//! json` prints one object with `decision`, `status`, `reason`, `policy`, `action`, `rule`,
//! `principal`, `audit` and `dry_run` at least.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde_json::json;

use crate::authz::eval::Outcome;
use crate::authz::explain::{explain, Explanation};
use crate::authz::path::{normalize, Normalization};
use crate::authz::{AuthInfo, Decision, Http, Peer, PolicySet, Request, DENIED_BODY};
use crate::policy::load_paths;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file or directory (YAML, multi-document); repeatable.
    #[arg(long = "policies", required = true, value_name = "PATH")]
    pub policies: Vec<PathBuf>,
    /// Namespace of the destination workload.
    #[arg(long)]
    pub namespace: String,
    /// Labels of the destination workload: k=v[,k=v]...; repeatable.
    #[arg(long, value_name = "K=V[,K=V]...", value_parser = parse_labels)]
    pub labels: Vec<BTreeMap<String, String>>,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// Request target: path and optional query, normalized as the enforcer does.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Host (`:authority`); defaults to the Host header given with -H, if any.
    #[arg(long)]
    pub host: Option<String>,
    /// Destination port.
    #[arg(long, default_value_t = 80)]
    pub port: u16,
    /// Destination (pod) IP.
    #[arg(long, value_name = "IP")]
    pub dest_ip: Option<IpAddr>,
    /// Request header 'Name: value'; repeatable.
    #[arg(short = 'H', long = "header", value_name = "NAME: VALUE", value_parser = parse_header)]
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Source (peer) IP.
    #[arg(long, value_name = "IP")]
    pub source_ip: Option<IpAddr>,
    /// Source workload principal, `<trust-domain>/ns/<ns>/sa/<sa>`.
    #[arg(long, value_name = "P")]
    pub source_principal: Option<String>,
    /// Source namespace (defaults to the one in --source-principal).
    #[arg(long, value_name = "NS")]
    pub source_namespace: Option<String>,
    /// What-if: the request principal (`iss/sub`) a validated token would carry.
    #[arg(long, value_name = "ISS/SUB")]
    pub request_principal: Option<String>,
    /// What-if: the claims (a JSON object) a validated token would carry.
    #[arg(long, value_name = "JSON")]
    pub claims: Option<String>,
    /// Namespace whose policies apply mesh-wide.
    #[arg(long, default_value = "istio-system", value_name = "NS")]
    pub root_namespace: String,
    /// The time to judge tokens at (exp/nbf), Unix seconds; default now.
    #[arg(long, value_name = "UNIX_SECONDS")]
    pub now: Option<u64>,
    /// Evaluate as a plain TCP connection (not HTTP): Istio's TCP semantics.
    #[arg(long, conflicts_with_all = ["method", "headers", "request_principal", "claims"])]
    pub tcp: bool,
    /// TLS server name of the connection (`connection.sni`).
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// Path normalization, as Istio's meshConfig.pathNormalization.
    #[arg(long, value_enum, default_value_t = Normalization::Base)]
    pub path_normalization: Normalization,
    /// Evaluate with the valid objects when some are invalid (as the daemon does), instead of
    /// exiting 2.
    #[arg(long)]
    pub skip_invalid: bool,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| format!("label {kv:?} is not of the form key=value"))
        })
        .collect()
}

fn parse_header(text: &str) -> Result<(http::HeaderName, http::HeaderValue), String> {
    let (name, value) = text
        .split_once(':')
        .ok_or_else(|| format!("header {text:?} is not of the form 'Name: value'"))?;
    let name = http::HeaderName::from_bytes(name.trim().as_bytes())
        .map_err(|e| format!("header name {name:?}: {e}"))?;
    let value = http::HeaderValue::from_str(value.trim())
        .map_err(|e| format!("header value of {name}: {e}"))?;
    Ok((name, value))
}

/// Exit statuses.
pub const EXIT_ALLOW: u8 = 0;
pub const EXIT_DENY: u8 = 1;
pub const EXIT_BAD_INPUT: u8 = 2;

/// Bad input to `check`, reported with exit status 2.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// One or more policy files or objects could not be used.
    #[error("{0} policy error(s); fix them or pass --skip-invalid to evaluate without them")]
    Policies(usize),
    /// `--claims` is not a JSON object.
    #[error("--claims: not a JSON object: {0}")]
    Claims(String),
    /// `--request-principal` has no `/` between issuer and subject.
    #[error("--request-principal {0:?}: expected ISS/SUB")]
    RequestPrincipal(String),
    /// `--path` cannot be normalized.
    #[error("--path: {0}")]
    Path(#[from] crate::authz::path::PathError),
}

/// Runs the command; returns the exit status.
#[must_use]
pub fn run(args: &CheckArgs) -> u8 {
    match check(args) {
        Ok((text, allowed)) => {
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{text}");
            if allowed {
                EXIT_ALLOW
            } else {
                EXIT_DENY
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_BAD_INPUT
        }
    }
}

fn source_parts(principal: &str) -> (Option<String>, Option<String>) {
    // `<td>/ns/<ns>/sa/<sa>`
    let parts: Vec<&str> = principal.split('/').collect();
    match parts.as_slice() {
        [_, "ns", ns, "sa", sa] => (Some((*ns).to_owned()), Some(format!("{ns}/{sa}"))),
        _ => (None, None),
    }
}

/// Decides and renders; `Ok((output, allowed))`.
pub fn check(args: &CheckArgs) -> Result<(String, bool), CheckError> {
    let loaded = load_paths(&args.policies);
    for skipped in &loaded.skipped {
        eprintln!("notice: {skipped}");
    }
    for error in &loaded.errors {
        eprintln!("error: {error}");
    }
    if !loaded.errors.is_empty() && !args.skip_invalid {
        return Err(CheckError::Policies(loaded.errors.len()));
    }
    let set = PolicySet::compile(&loaded.authorization_policies, &args.root_namespace);
    let labels: BTreeMap<String, String> = args
        .labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let policies = set.for_workload(&args.namespace, &labels);

    let auth = auth_info(args)?;
    let target = normalize(&args.path, args.path_normalization)?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &args.headers {
        headers.append(name.clone(), value.clone());
    }
    let host = args
        .host
        .clone()
        .or_else(|| {
            headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let (principal_ns, service_account) = args
        .source_principal
        .as_deref()
        .map_or((None, None), source_parts);
    let source_namespace = args.source_namespace.clone().or(principal_ns);
    let source_principal = args
        .source_principal
        .as_deref()
        .map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
    let request = Request {
        source: Peer {
            ip: args.source_ip,
            remote_ip: args.source_ip,
            principal: source_principal,
            namespace: source_namespace.as_deref(),
            service_account: service_account.as_deref(),
        },
        destination_ip: args.dest_ip,
        destination_port: args.port,
        sni: args.sni.as_deref(),
        http: (!args.tcp).then_some(Http {
            method: &args.method,
            path: &target.path,
            host: &host,
            headers: &headers,
            auth: auth.as_ref(),
        }),
    };
    let decision = policies.evaluate(&request);
    let explanation = explain(&policies, &request);
    let allowed = decision.allow;
    let out = match args.output {
        Output::Json => render_json(
            args,
            &labels,
            &target.path,
            auth.as_ref(),
            &decision,
            &explanation,
        ),
        Output::Text => render_text(
            args,
            &labels,
            &target.path,
            auth.as_ref(),
            &decision,
            &explanation,
        ),
    };
    Ok((out, allowed))
}

fn auth_info(args: &CheckArgs) -> Result<Option<AuthInfo>, CheckError> {
    let mut claims = match &args.claims {
        Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(serde_json::Value::Object(map)) => Some(map),
            Ok(_) => return Err(CheckError::Claims("expected an object".into())),
            Err(e) => return Err(CheckError::Claims(e.to_string())),
        },
        None => None,
    };
    if let Some(principal) = &args.request_principal {
        let (iss, sub) = principal
            .rsplit_once('/')
            .ok_or_else(|| CheckError::RequestPrincipal(principal.clone()))?;
        let map = claims.get_or_insert_with(serde_json::Map::new);
        map.insert("iss".into(), iss.into());
        map.insert("sub".into(), sub.into());
    }
    Ok(claims.map(|c| AuthInfo::from_claims(c, &[])))
}

fn render_json(
    args: &CheckArgs,
    labels: &BTreeMap<String, String>,
    path: &str,
    auth: Option<&AuthInfo>,
    decision: &Decision,
    explanation: &Explanation,
) -> String {
    let value = json!({
        "decision": if decision.allow { "allow" } else { "deny" },
        "status": decision.status(),
        "reason": decision.describe(),
        "reason_code": decision.reason,
        "body": (!decision.allow).then_some(DENIED_BODY),
        "policy": decision.decided_by.as_ref().map(|m| &m.policy),
        "action": decision.decided_by.as_ref().map(|m| m.action),
        "rule": decision.decided_by.as_ref().map(|m| m.rule),
        "principal": auth.map(AuthInfo::principal),
        "source_principal": args.source_principal,
        "audit": decision.audit,
        "dry_run": decision.dry_run,
        "dry_run_result": decision.shadow,
        "workload": { "namespace": args.namespace, "labels": labels },
        "request": {
            "protocol": if args.tcp { "tcp" } else { "http" },
            "method": (!args.tcp).then_some(&args.method),
            "path": (!args.tcp).then_some(path),
            "port": args.port,
        },
        "policies": explanation.policies,
        "not_applied": explanation.not_applied,
    });
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

fn render_text(
    args: &CheckArgs,
    labels: &BTreeMap<String, String>,
    path: &str,
    auth: Option<&AuthInfo>,
    decision: &Decision,
    explanation: &Explanation,
) -> String {
    let mut out = String::new();
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(
        out,
        "workload:  {} {{{}}}",
        args.namespace,
        labels.join(",")
    );
    if args.tcp {
        let _ = writeln!(
            out,
            "request:   TCP port {}{}",
            args.port,
            args.sni
                .as_ref()
                .map(|s| format!(" sni={s}"))
                .unwrap_or_default()
        );
    } else {
        let _ = writeln!(
            out,
            "request:   {} {} port {}",
            args.method, path, args.port
        );
    }
    let _ = writeln!(
        out,
        "source:    principal={} ip={}",
        args.source_principal.as_deref().unwrap_or("(none)"),
        args.source_ip
            .map_or_else(|| "(none)".to_owned(), |ip| ip.to_string())
    );
    let _ = writeln!(
        out,
        "token:     {}",
        auth.map_or_else(
            || "(none)".to_owned(),
            |a| format!("principal {}", a.principal())
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
    let _ = write!(
        out,
        "decision:  {} {} - {}",
        if decision.allow { "ALLOW" } else { "DENY" },
        decision.status(),
        decision.describe()
    );
    out
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
                    Outcome::Matched => "ok  ",
                    Outcome::NotMatched => "FAIL",
                    Outcome::Ignored => "skip",
                };
                let _ = writeln!(out, "           {mark} {}", c.field);
            }
        }
    }
}
