//! `nodeward check`: "why was this request denied?" answered from policy files, or from the
//! live state of a running agent (`--admin ADDR`).
//!
//! The interface is fixed (tooling calls it): exit 0 allow, 1 deny, 2 bad input; `--output
//! json` prints one object with `decision`, `status`, `reason`, `policy`, `action`, `rule`,
//! `principal`, `audit` and `dry_run` at least.
//!
//! One core, [`decide`], judges a [`CheckRequest`] against [`Inputs`]: policy files (keys
//! fetched on demand) or the agent's live snapshot, JWKS store and token cache. The agent's
//! `POST /check` runs the same function and returns the same rendering, so `check --admin`
//! prints exactly what the file-based check would for the same policies.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::admin::client::{self, ClientError};
use crate::authn::cache::TokenCache;
use crate::authn::fetch::{FetchConfig, JwksStore, SourceStatus, DEFAULT_TIMEOUT};
use crate::authn::rules::{KeyLookup, Keys, NoRemoteKeys};
use crate::authn::token::unix_now;
use crate::authn::JwtRules;
use crate::authn::{AuthnSet, JwtError, Outcome, RequestParts};
use crate::authz::eval::Outcome as ClauseOutcome;
use crate::authz::explain::Explanation;
use crate::authz::path::Normalization;
use crate::authz::{AuthInfo, Decision, Peer, PolicySet};
use crate::decision::probe::NodeAddresses;
use crate::decision::{
    decide_http, decide_tcp, Destination, HttpRequest, HttpVerdict, Judge, Reason, TcpVerdict,
};
use crate::policy::{load_paths, DEFAULT_ROOT_NAMESPACE};
use crate::state::workloads::Probe;
use crate::state::Snapshot;

/// Output formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file or directory (YAML, multi-document); repeatable. Not with --admin.
    #[arg(
        long = "policies",
        value_name = "PATH",
        required_unless_present = "admin",
        conflicts_with = "admin"
    )]
    pub policies: Vec<PathBuf>,
    /// Ask the running agent whose admin server is at ADDR (`nodeward run --admin`): its live
    /// policies, registry and JWKS decide. --dest-ip of a known workload may stand for
    /// --namespace/--labels, and --source-ip of one gives its identity.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<String>,
    /// Namespace of the destination workload.
    #[arg(long, required_unless_present = "admin")]
    pub namespace: Option<String>,
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
    /// Namespace whose policies apply mesh-wide [default: istio-system]. Not with --admin
    /// (the agent's is used).
    #[arg(long, value_name = "NS", conflicts_with = "admin")]
    pub root_namespace: Option<String>,
    /// The time to judge tokens at (exp/nbf), Unix seconds; default now.
    #[arg(long, value_name = "UNIX_SECONDS")]
    pub now: Option<u64>,
    /// Evaluate as a plain TCP connection (not HTTP): Istio's TCP semantics.
    #[arg(long, conflicts_with_all = ["method", "headers", "request_principal", "claims"])]
    pub tcp: bool,
    /// TLS server name of the connection (`connection.sni`).
    #[arg(long, value_name = "NAME")]
    pub sni: Option<String>,
    /// Path normalization, as Istio's meshConfig.pathNormalization [default: base; with
    /// --admin: the agent's].
    #[arg(long, value_enum)]
    pub path_normalization: Option<Normalization>,
    /// Evaluate with the valid objects when some are invalid (as the daemon does), instead of
    /// exiting 2. Not with --admin (the agent always does).
    #[arg(long, conflicts_with = "admin")]
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

/// The response header of `POST /check` that carries the decision (`allow` or `deny`), so the
/// client sets its exit status without reading the rendering.
pub const DECISION_HEADER: &str = "nodeward-decision";
/// The response header of `POST /check` with the number of configuration errors the agent
/// reports (its last good state serves meanwhile).
pub const CONFIG_ERRORS_HEADER: &str = "nodeward-config-errors";

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
    /// `--method` is not an HTTP method token.
    #[error("--method {0:?}: not an HTTP method")]
    Method(String),
    /// A header of a `POST /check` body is not `Name: value`.
    #[error("-H: {0}")]
    Header(String),
    /// `path_normalization` of a `POST /check` body is not one of the known names.
    #[error("--path-normalization {0:?}: expected none, base, merge-slashes or decode-and-merge-slashes")]
    PathNormalization(String),
    /// No destination workload: neither a namespace nor (with the live state) a destination IP.
    #[error("no destination workload: give --namespace (and --labels), or with --admin a --dest-ip of a workload the agent knows")]
    NoDestination,
    /// The destination IP is not in the agent's registry.
    #[error("--dest-ip {0}: no workload at this address in the agent's registry; give --namespace and --labels, or see `nodeward status`")]
    UnknownDestination(IpAddr),
    /// Labels without a namespace would be silently replaced by the registry's.
    #[error("--labels needs --namespace (without them, --dest-ip's workload is used)")]
    LabelsWithoutNamespace,
    /// The agent could not be asked.
    #[error("{0}")]
    Admin(#[from] ClientError),
    /// The agent refused the described request (its message says why).
    #[error("{0}")]
    Refused(String),
    /// The agent answered something `check` does not understand.
    #[error("unexpected answer from the agent at {addr}: HTTP {status}: {body}")]
    Answer {
        addr: String,
        status: u16,
        body: String,
    },
}

/// A described request: what `check`'s flags say, and the JSON body of the agent's
/// `POST /check` (every field optional, defaults as the flags'; unknown fields refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckRequest {
    /// Namespace of the destination workload; with the live state, optional when `dest_ip`
    /// is a known workload's.
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub port: u16,
    pub dest_ip: Option<IpAddr>,
    /// `Name: value`, as `-H` takes them.
    pub headers: Vec<String>,
    pub source_ip: Option<IpAddr>,
    pub source_principal: Option<String>,
    pub source_namespace: Option<String>,
    pub request_principal: Option<String>,
    /// A JSON object, or its text (as `--claims` takes it).
    pub claims: Option<serde_json::Value>,
    pub now: Option<u64>,
    pub tcp: bool,
    pub sni: Option<String>,
    /// `none`, `base`, `merge-slashes` or `decode-and-merge-slashes`; default `base` for files,
    /// the agent's own for the live state.
    pub path_normalization: Option<String>,
    pub output: Output,
}

impl Default for CheckRequest {
    fn default() -> Self {
        Self {
            namespace: None,
            labels: BTreeMap::new(),
            method: "GET".into(),
            path: "/".into(),
            host: None,
            port: 80,
            dest_ip: None,
            headers: Vec::new(),
            source_ip: None,
            source_principal: None,
            source_namespace: None,
            request_principal: None,
            claims: None,
            now: None,
            tcp: false,
            sni: None,
            path_normalization: None,
            output: Output::Json,
        }
    }
}

impl CheckRequest {
    /// The request `check`'s flags describe.
    #[must_use]
    pub fn from_args(args: &CheckArgs) -> Self {
        Self {
            namespace: args.namespace.clone(),
            labels: args
                .labels
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            method: args.method.clone(),
            path: args.path.clone(),
            host: args.host.clone(),
            port: args.port,
            dest_ip: args.dest_ip,
            headers: args
                .headers
                .iter()
                .map(|(name, value)| {
                    format!("{name}: {}", String::from_utf8_lossy(value.as_bytes()))
                })
                .collect(),
            source_ip: args.source_ip,
            source_principal: args.source_principal.clone(),
            source_namespace: args.source_namespace.clone(),
            request_principal: args.request_principal.clone(),
            claims: args.claims.clone().map(serde_json::Value::String),
            now: args.now,
            tcp: args.tcp,
            sni: args.sni.clone(),
            path_normalization: args
                .path_normalization
                .and_then(|n| n.to_possible_value())
                .map(|v| v.get_name().to_owned()),
            output: args.output,
        }
    }
}

/// What [`decide`] judges with.
pub enum Inputs<'a> {
    /// Policies read from files; remote JWKS fetched once when the request carries a token.
    Files {
        authz: &'a PolicySet,
        authn: &'a AuthnSet,
    },
    /// A running agent's state: its snapshot (policies and registry), JWKS store and token
    /// cache, and the path normalization its enforcer applies.
    Live {
        snapshot: &'a Snapshot,
        jwks: &'a JwksStore,
        cache: &'a TokenCache,
        normalization: Normalization,
    },
}

/// A judged request: the rendering asked for, and the decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub output: String,
    pub allowed: bool,
}

/// Runs the command; returns the exit status.
#[must_use]
pub fn run(args: &CheckArgs) -> u8 {
    let result = match &args.admin {
        Some(addr) => check_remote(addr, args),
        None => check(args),
    };
    match result {
        Ok(checked) => {
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = writeln!(std::io::stdout(), "{}", checked.output);
            if checked.allowed {
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

/// Decides from policy files and renders.
pub fn check(args: &CheckArgs) -> Result<Checked, CheckError> {
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
    let root = args
        .root_namespace
        .as_deref()
        .unwrap_or(DEFAULT_ROOT_NAMESPACE);
    let policy_set = PolicySet::compile(&loaded.authorization_policies, root);
    let jwt_set = AuthnSet::compile(&loaded.request_authentications, root);
    decide(
        &CheckRequest::from_args(args),
        &Inputs::Files {
            authz: &policy_set,
            authn: &jwt_set,
        },
    )
}

/// Asks the agent at `addr` (`POST /check`) and returns its rendering and decision.
fn check_remote(addr: &str, args: &CheckArgs) -> Result<Checked, CheckError> {
    let body = serde_json::to_string(&CheckRequest::from_args(args)).unwrap_or_default();
    let answer = client::post_json(addr, "/check", body)?;
    let errors = answer
        .header(CONFIG_ERRORS_HEADER)
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    if errors > 0 {
        eprintln!("notice: the agent reports {errors} configuration error(s) and serves its last good state for them; see `nodeward status --admin {addr}`");
    }
    match (answer.status, answer.header(DECISION_HEADER)) {
        (200, Some(decision)) => Ok(Checked {
            allowed: decision == "allow",
            output: answer.body.trim_end_matches('\n').to_owned(),
        }),
        (400, _) => Err(CheckError::Refused(
            answer
                .body
                .trim_end()
                .trim_start_matches("error: ")
                .to_owned(),
        )),
        (status, _) => Err(CheckError::Answer {
            addr: addr.to_owned(),
            status,
            body: answer.body.trim_end().to_owned(),
        }),
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

/// The source of the request as judged.
struct Source {
    /// As shown (`source_principal` in the JSON).
    shown: Option<String>,
    /// As matched (without `spiffe://`).
    principal: Option<String>,
    namespace: Option<String>,
    service_account: Option<String>,
}

fn source(req: &CheckRequest, inputs: &Inputs<'_>) -> Source {
    let registry = match (inputs, &req.source_principal, req.source_ip) {
        (Inputs::Live { snapshot, .. }, None, Some(ip)) => snapshot.source(ip),
        _ => None,
    };
    if let Some(known) = registry {
        return Source {
            shown: Some(known.principal.clone()),
            principal: Some(known.principal.clone()),
            namespace: req
                .source_namespace
                .clone()
                .or_else(|| Some(known.namespace.clone())),
            service_account: Some(known.service_account.clone()),
        };
    }
    let (principal_ns, service_account) = req
        .source_principal
        .as_deref()
        .map_or((None, None), source_parts);
    Source {
        shown: req.source_principal.clone(),
        principal: req
            .source_principal
            .as_deref()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_owned()),
        namespace: req.source_namespace.clone().or(principal_ns),
        service_account,
    }
}

/// The destination workload's namespace and labels.
fn destination(
    req: &CheckRequest,
    inputs: &Inputs<'_>,
) -> Result<(String, BTreeMap<String, String>), CheckError> {
    if let Some(namespace) = &req.namespace {
        return Ok((namespace.clone(), req.labels.clone()));
    }
    if !req.labels.is_empty() {
        return Err(CheckError::LabelsWithoutNamespace);
    }
    match (inputs, req.dest_ip) {
        (Inputs::Live { snapshot, .. }, Some(ip)) => snapshot
            .destination(ip)
            .map(|view| {
                (
                    view.workload.namespace.clone(),
                    view.workload.labels.clone(),
                )
            })
            .ok_or(CheckError::UnknownDestination(ip)),
        _ => Err(CheckError::NoDestination),
    }
}

fn normalization(req: &CheckRequest, inputs: &Inputs<'_>) -> Result<Normalization, CheckError> {
    match (&req.path_normalization, inputs) {
        (Some(name), _) => Normalization::from_str(name, true)
            .map_err(|_| CheckError::PathNormalization(name.clone())),
        (None, Inputs::Live { normalization, .. }) => Ok(*normalization),
        (None, Inputs::Files { .. }) => Ok(Normalization::Base),
    }
}

/// The request as the renderers show it.
struct Shown<'a> {
    req: &'a CheckRequest,
    namespace: &'a str,
    labels: &'a BTreeMap<String, String>,
    path: &'a str,
    source_principal: Option<&'a str>,
}

/// A verdict of [`crate::decision`], HTTP or TCP, as the renderers use it.
struct Judgement {
    allowed: bool,
    status: u16,
    reason: Reason,
    /// What the agent answers itself (`None` when the request goes to the pod).
    body: Option<String>,
    decision: Option<Decision>,
    explanation: Option<Explanation>,
    authn: Option<Outcome>,
    /// The path as judged: normalized, or as written when normalization refused it.
    path: Option<String>,
    /// `WWW-Authenticate` of a 401, as the enforcer sends it.
    www_authenticate: Option<String>,
}

impl Judgement {
    fn of_http(verdict: HttpVerdict) -> Self {
        Self {
            allowed: verdict.allowed(),
            status: verdict.status(),
            reason: verdict.reason,
            www_authenticate: verdict
                .answer
                .as_ref()
                .and_then(|a| a.www_authenticate.clone()),
            body: verdict.answer.map(|a| a.body.into_owned()),
            decision: verdict.decision,
            explanation: verdict.explanation,
            authn: verdict.authn,
            path: verdict.path.map(|p| p.path),
        }
    }

    fn of_tcp(verdict: TcpVerdict) -> Self {
        Self {
            allowed: verdict.allow,
            status: if verdict.allow { 200 } else { 403 },
            reason: verdict.reason,
            body: None,
            decision: verdict.decision,
            explanation: verdict.explanation,
            authn: None,
            path: None,
            www_authenticate: None,
        }
    }

    /// One line saying why: the authentication failure, the deciding policy, or the step
    /// that answered before policies were looked at.
    fn describe(&self, authn: &AuthnReport) -> String {
        if let Some(e) = authn.error {
            let rule = authn
                .rule
                .as_ref()
                .map(|r| format!(" (jwtRules {r})"))
                .unwrap_or_default();
            return format!("authentication failed: {e}{rule}");
        }
        match (&self.decision, self.reason) {
            (Some(decision), _) => decision.describe(),
            (None, Reason::Probe) => {
                "probe: one of the workload's probe endpoints, from the node; not judged".into()
            }
            (None, reason) => format!(
                "{reason}: {}",
                self.body.as_deref().unwrap_or_default().trim_end()
            ),
        }
    }
}

/// The workload's probe endpoints, known only from the live registry.
fn live_probes(req: &CheckRequest, inputs: &Inputs<'_>) -> Vec<Probe> {
    match (inputs, req.dest_ip) {
        (Inputs::Live { snapshot, .. }, Some(ip)) => snapshot
            .destination(ip)
            .map(|view| view.workload.probes.clone())
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Keys to verify with, the token cache, and a line per key set consulted.
type CheckKeys<'a> = (Box<dyn Keys + 'a>, &'a TokenCache, Vec<String>);

/// The keys, token cache and key-set report a check uses: none for TCP; fetched on demand
/// for files (with a fresh cache); the agent's own store and cache for the live state.
fn keys_for<'a>(
    req: &CheckRequest,
    inputs: &Inputs<'a>,
    rules: &JwtRules,
    parts: &RequestParts<'_>,
    fresh: &'a TokenCache,
) -> Result<CheckKeys<'a>, CheckError> {
    Ok(match inputs {
        _ if req.tcp => (Box::new(NoRemoteKeys), fresh, Vec::new()),
        Inputs::Files { .. } => {
            let (keys, jwks) = remote_keys(rules, parts)?;
            (keys, fresh, jwks)
        }
        Inputs::Live { jwks, cache, .. } => (
            Box::new(LiveKeys(jwks)),
            *cache,
            live_jwks_status(jwks, rules, parts),
        ),
    })
}

/// Decides a described request with `inputs` and renders it as `req.output` asks. The
/// decision is the enforcer's own ([`crate::decision`]).
pub fn decide(req: &CheckRequest, inputs: &Inputs<'_>) -> Result<Checked, CheckError> {
    let (namespace, labels) = destination(req, inputs)?;
    let (policy_set, jwt_set) = match inputs {
        Inputs::Files { authz, authn } => (*authz, *authn),
        Inputs::Live { snapshot, .. } => (&snapshot.authz, &snapshot.authn),
    };
    let policies = policy_set.for_workload(&namespace, &labels);
    let rules = jwt_set.for_workload(&namespace, &labels);
    let probes = live_probes(req, inputs);
    let normalization = normalization(req, inputs)?;
    let mut headers = http::HeaderMap::new();
    for text in &req.headers {
        let (name, value) = parse_header(text).map_err(CheckError::Header)?;
        headers.append(name, value);
    }
    let method = http::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| CheckError::Method(req.method.clone()))?;
    let what_if = auth_info(req)?;
    let source = source(req, inputs);
    let raw_query = req
        .path
        .split('#')
        .next()
        .and_then(|p| p.split_once('?'))
        .map(|(_, q)| q);
    let parts = RequestParts {
        method: &method,
        headers: &headers,
        query: raw_query,
    };
    let fresh = TokenCache::new(64 * 1024);
    let (keys, cache, jwks) = keys_for(req, inputs, &rules, &parts, &fresh)?;
    let node = NodeAddresses::default();
    let judge = Judge {
        destination: Some(Destination {
            rules: &rules,
            policies: &policies,
            probes: &probes,
        }),
        source: Peer {
            ip: req.source_ip,
            remote_ip: req.source_ip,
            principal: source.principal.as_deref(),
            namespace: source.namespace.as_deref(),
            service_account: source.service_account.as_deref(),
        },
        destination_ip: req.dest_ip,
        destination_port: req.port,
        node: Some(&node),
        keys: keys.as_ref(),
        cache,
        now: req.now.unwrap_or_else(unix_now),
        normalization,
        assumed: what_if.as_ref(),
        explain: true,
    };
    let judged = if req.tcp {
        Judgement::of_tcp(decide_tcp(req.sni.as_deref(), &judge))
    } else {
        // A described request without a host is judged with an empty authority.
        let uri_authority = req
            .host
            .as_deref()
            .or_else(|| (!headers.contains_key(http::header::HOST)).then_some(""));
        let request = HttpRequest {
            method: &method,
            version: http::Version::HTTP_11,
            h2: false,
            target: &req.path,
            uri_authority,
            headers: &headers,
            framing_conflict: false,
        };
        Judgement::of_http(decide_http(&request, &judge))
    };
    let mut authn = authn_report(req, &rules, judged.authn.as_ref(), jwks);
    authn.www_authenticate.clone_from(&judged.www_authenticate);
    if what_if.is_some() && authn.auth.is_some() {
        return Err(CheckError::WhatIfWithToken);
    }
    let auth = authn.auth.clone().or(what_if);
    let shown = Shown {
        req,
        namespace: &namespace,
        labels: &labels,
        path: judged.path.as_deref().unwrap_or(&req.path),
        source_principal: source.shown.as_deref(),
    };
    let output = match req.output {
        Output::Json => render_json(&shown, auth.as_ref(), &authn, &judged),
        Output::Text => render_text(&shown, auth.as_ref(), &authn, &judged),
    };
    Ok(Checked {
        output,
        allowed: judged.allowed,
    })
}

fn auth_info(req: &CheckRequest) -> Result<Option<AuthInfo>, CheckError> {
    let mut claims = match &req.claims {
        None => None,
        Some(serde_json::Value::Object(map)) => Some(map.clone()),
        Some(serde_json::Value::String(text)) => {
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(map)) => Some(map),
                Ok(_) => return Err(CheckError::Claims("expected an object".into())),
                Err(e) => return Err(CheckError::Claims(e.to_string())),
            }
        }
        Some(_) => return Err(CheckError::Claims("expected an object".into())),
    };
    if let Some(principal) = &req.request_principal {
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
    });
    serde_json::to_string_pretty(&value).unwrap_or_default()
}

fn render_text(
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
fn authn_report(
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

/// The agent's own store, borrowed.
struct LiveKeys<'a>(&'a JwksStore);

impl Keys for LiveKeys<'_> {
    fn lookup(&self, source: &str) -> KeyLookup {
        self.0.lookup(source)
    }
}

/// One line per fetched key set: source, state, key ids or the fetch error.
fn describe_source(s: SourceStatus) -> String {
    match s.last_error {
        Some(error) if s.kids.is_empty() => format!("{}: {}: {error}", s.key, s.state.as_str()),
        _ => format!(
            "{}: {} (kids {})",
            s.key,
            s.state.as_str(),
            s.kids.join(", ")
        ),
    }
}

/// The agent's key sets for the rules' remote sources, reported as the file-based check
/// reports its own fetches: only when the request carries a token.
fn live_jwks_status(store: &JwksStore, rules: &JwtRules, parts: &RequestParts<'_>) -> Vec<String> {
    let wanted: HashSet<String> = rules
        .remote_sources()
        .into_iter()
        .map(|(source, _, _)| source.key())
        .collect();
    if wanted.is_empty() || rules.extract(parts).is_empty() {
        return Vec::new();
    }
    store
        .status()
        .into_iter()
        .filter(|s| wanted.contains(&s.key))
        .map(describe_source)
        .collect()
}

fn remote_keys(
    rules: &JwtRules,
    parts: &RequestParts<'_>,
) -> Result<(Box<dyn Keys>, Vec<String>), CheckError> {
    let sources = rules.remote_sources();
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
    let status = store.status().into_iter().map(describe_source).collect();
    Ok((
        Box::new(RemoteKeys {
            store,
            _runtime: runtime,
        }),
        status,
    ))
}
