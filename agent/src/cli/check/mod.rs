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
//!
//! A matching CUSTOM policy's provider (`--mesh-config`, or the agent's) is asked for real,
//! as the enforcer asks it; its answer is shown (`provider` in JSON).

mod keys;
mod render;
mod request;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::admin::client::{self, ClientError};
use crate::authn::AuthnSet;
use crate::authz::path::Normalization;
use crate::authz::PolicySet;
use crate::extauthz::MeshProviders;
use crate::policy::{load_paths, DEFAULT_ROOT_NAMESPACE};

pub use render::AuthnReport;
pub use request::{decide, CheckRequest, Checked, Inputs};

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
    /// Istio's `MeshConfig` (YAML, as `nodeward run --mesh-config` takes it): its
    /// `extensionProviders` answer CUSTOM policies, and are asked for real. Not with --admin
    /// (the agent's are used).
    #[arg(long, value_name = "FILE", conflicts_with = "admin")]
    pub mesh_config: Option<PathBuf>,
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
    /// `--mesh-config` cannot be read or is no `MeshConfig`.
    #[error("--mesh-config: {0}")]
    Mesh(#[from] crate::extauthz::MeshError),
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
    let mesh = match &args.mesh_config {
        Some(path) => MeshProviders::load(path)?,
        None => MeshProviders::default(),
    };
    for problem in mesh.problems() {
        eprintln!("notice: {problem} (CUSTOM policies naming it deny)");
    }
    let policy_set = PolicySet::compile(&loaded.authorization_policies, root)
        .with_providers(std::sync::Arc::new(mesh));
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
