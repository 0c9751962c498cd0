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

use std::time::Duration;

use crate::authn::cache::TokenCache;
use crate::authn::fetch::{FetchConfig, JwksSource, JwksStore, DEFAULT_TIMEOUT};
use crate::authn::rules::{KeyLookup, KeySource, Keys, NoRemoteKeys};
use crate::authn::JwtRules;
use crate::authn::{www_authenticate, AuthnSet, JwtError, Outcome, RequestParts};
use crate::authz::eval::Outcome as ClauseOutcome;
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
    /// A token in the request decides the identity; what-if flags would contradict it.
    #[error("the request carries a token, which is validated for real; --request-principal and --claims are for requests without one")]
    WhatIfWithToken,
    /// The runtime for fetching JWKS could not start.
    #[error("starting the runtime to fetch JWKS: {0}")]
    Runtime(std::io::Error),
    /// The JWKS fetcher could not be built.
    #[error("{0}")]
    Jwks(crate::authn::fetch::FetchError),
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

    let target = normalize(&args.path, args.path_normalization)?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in &args.headers {
        headers.append(name.clone(), value.clone());
    }
    let authn = authenticate(args, &loaded, &labels, &headers, &target)?;
    let what_if = auth_info(args)?;
    let auth = match (&authn.auth, what_if) {
        (Some(_), Some(_)) => return Err(CheckError::WhatIfWithToken),
        (Some(real), None) => Some(real.clone()),
        (None, what_if) => what_if,
    };
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
    let allowed = decision.allow && authn.error.is_none();
    let out = match args.output {
        Output::Json => render_json(
            args,
            &labels,
            &target.path,
            auth.as_ref(),
            &authn,
            &decision,
            &explanation,
        ),
        Output::Text => render_text(
            args,
            &labels,
            &target.path,
            auth.as_ref(),
            &authn,
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
    authn: &AuthnReport,
    decision: &Decision,
    explanation: &Explanation,
) -> String {
    let rejected = authn.error.is_some();
    let value = json!({
        "decision": if decision.allow && !rejected { "allow" } else { "deny" },
        "status": authn.error.map_or_else(|| decision.status(), JwtError::status),
        "reason": authn.error.map_or_else(|| decision.describe(), |e| format!("authentication failed: {e}{}", authn.rule.as_ref().map(|r| format!(" (jwtRules {r})")).unwrap_or_default())),
        "reason_code": if rejected { json!("authentication_failed") } else { json!(decision.reason) },
        "body": authn.error.map(JwtError::body).or_else(|| (!decision.allow).then(|| DENIED_BODY.to_owned())),
        "www_authenticate": authn.www_authenticate,
        "authn": authn,
        "policy": (!rejected).then(|| decision.decided_by.as_ref().map(|m| &m.policy)).flatten(),
        "action": (!rejected).then(|| decision.decided_by.as_ref().map(|m| m.action)).flatten(),
        "rule": (!rejected).then(|| decision.decided_by.as_ref().map(|m| m.rule)).flatten(),
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
    authn: &AuthnReport,
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The real JWT step: tokens in the described request validated against the workload's
/// jwtRules, keys inline or fetched.
fn authenticate(
    args: &CheckArgs,
    loaded: &crate::policy::Loaded,
    labels: &BTreeMap<String, String>,
    headers: &http::HeaderMap,
    target: &crate::authz::path::NormalizedPath,
) -> Result<AuthnReport, CheckError> {
    let set = AuthnSet::compile(&loaded.request_authentications, &args.root_namespace);
    let rules = set.for_workload(&args.namespace, labels);
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
    if args.tcp {
        return Ok(AuthnReport {
            result: "no_rules",
            issuers,
            ..AuthnReport::default()
        });
    }
    let method = http::Method::from_bytes(args.method.as_bytes()).unwrap_or(http::Method::GET);
    let parts = RequestParts {
        method: &method,
        headers,
        query: target.query.as_deref(),
    };
    let (keys, jwks) = remote_keys(&rules, &parts)?;
    let outcome = rules.authenticate(
        &parts,
        keys.as_ref(),
        &TokenCache::new(16),
        args.now.unwrap_or_else(unix_now),
    );
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
    let realm = format!("http://{host}{}", target.path);
    Ok(match outcome {
        Outcome::NoRules => AuthnReport {
            result: "no_rules",
            ..AuthnReport::default()
        },
        Outcome::Preflight => AuthnReport {
            result: "preflight",
            issuers,
            ..AuthnReport::default()
        },
        Outcome::NoToken => AuthnReport {
            result: "no_token",
            issuers,
            ..AuthnReport::default()
        },
        Outcome::Authenticated(a) => AuthnReport {
            result: "authenticated",
            jwks,
            rule: Some(a.rule.origin.clone()),
            location: Some(a.location.to_string()),
            principal: Some(a.verified.auth.principal()),
            auth: Some(a.verified.auth.clone()),
            issuers,
            ..AuthnReport::default()
        },
        Outcome::Rejected {
            error,
            rule,
            location,
        } => AuthnReport {
            result: "rejected",
            jwks,
            rule: rule.map(|r| r.origin.clone()),
            location: Some(location.to_string()),
            error: Some(error),
            www_authenticate: (error.status() == 401).then(|| www_authenticate(&realm, true)),
            issuers,
            ..AuthnReport::default()
        },
    })
}

/// Key sets of the rules' remote sources, fetched once, only when the request carries a
/// token (as the enforcer's store would have them: last good keys, fail closed otherwise).
struct RemoteKeys {
    store: JwksStore,
    /// Keeps the store's refresh tasks alive while the request is judged.
    _runtime: tokio::runtime::Runtime,
}

impl Keys for RemoteKeys {
    fn lookup(&self, source: &str) -> KeyLookup {
        self.store.lookup(source)
    }
}

fn remote_keys(
    rules: &JwtRules,
    parts: &RequestParts<'_>,
) -> Result<(Box<dyn Keys>, Vec<String>), CheckError> {
    let sources: Vec<(JwksSource, Option<Duration>, String)> = rules
        .rules
        .iter()
        .filter_map(|r| match &r.keys {
            KeySource::Remote { source, .. } => Some((source.clone(), r.timeout, r.issuer.clone())),
            _ => None,
        })
        .collect();
    if sources.is_empty() || rules.extract(parts).is_empty() {
        return Ok((Box::new(NoRemoteKeys), Vec::new()));
    }
    let wait = sources
        .iter()
        .filter_map(|(_, t, _)| *t)
        .max()
        .unwrap_or(DEFAULT_TIMEOUT)
        + Duration::from_secs(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    let store = JwksStore::new(FetchConfig::default()).map_err(CheckError::Jwks)?;
    runtime.block_on(async {
        store.set_sources(sources);
        store.wait_ready(wait).await
    });
    let status = store
        .status()
        .into_iter()
        .map(|s| match s.last_error {
            Some(error) if s.kids.is_empty() => format!("{}: {}: {error}", s.key, s.state.as_str()),
            _ => format!(
                "{}: {} (kids {})",
                s.key,
                s.state.as_str(),
                s.kids.join(", ")
            ),
        })
        .collect();
    Ok((
        Box::new(RemoteKeys {
            store,
            _runtime: runtime,
        }),
        status,
    ))
}
