//! A described request ([`CheckRequest`]), what it is judged with ([`Inputs`]), and [`decide`]:
//! the enforcer's own decision (`crate::decision`) on it, rendered by [`super::render`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::authn::cache::TokenCache;
use crate::authn::fetch::JwksStore;
use crate::authn::rules::{Keys, NoRemoteKeys};
use crate::authn::token::unix_now;
use crate::authn::JwtRules;
use crate::authn::{AuthnSet, Outcome, RequestParts};
use crate::authz::explain::Explanation;
use crate::authz::path::Normalization;
use crate::authz::{AuthInfo, Decision, Peer, PolicySet};
use crate::decision::probe::NodeAddresses;
use crate::decision::{
    after_custom, decide_http, decide_tcp, tcp_after_custom, CustomCall, Destination, HttpRequest,
    HttpVerdict, Judge, Reason, TcpVerdict,
};
use crate::extauthz::{CheckInput, CheckResult, HttpInput, Outcome as CheckOutcome};
use crate::state::workloads::Probe;
use crate::state::Snapshot;

use super::keys::{live_jwks_status, remote_keys, LiveKeys};
use super::render::{authn_report, render_json, render_text, Shown};
use super::{parse_header, CheckArgs, CheckError, Output};

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

/// A verdict of [`crate::decision`], HTTP or TCP, as the renderers use it.
pub(super) struct Judgement {
    pub(super) allowed: bool,
    pub(super) status: u16,
    pub(super) reason: Reason,
    /// What the agent answers itself (`None` when the request goes to the pod).
    pub(super) body: Option<String>,
    pub(super) decision: Option<Decision>,
    pub(super) explanation: Option<Explanation>,
    pub(super) authn: Option<Outcome>,
    /// The path as judged: normalized, or as written when normalization refused it.
    pub(super) path: Option<String>,
    /// `WWW-Authenticate` of a 401, as the enforcer sends it.
    pub(super) www_authenticate: Option<String>,
    /// The external authorizer's answer, when a CUSTOM policy matched and it was asked.
    pub(super) check: Option<CheckResult>,
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
            check: verdict.check,
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
            check: verdict.check,
        }
    }

    /// One line saying why: the authentication failure, the deciding policy, or the step
    /// that answered before policies were looked at.
    pub(super) fn describe(&self, authn: &super::render::AuthnReport) -> String {
        if let Some(e) = authn.error {
            let rule = authn
                .rule
                .as_ref()
                .map(|r| format!(" (jwtRules {r})"))
                .unwrap_or_default();
            return format!("authentication failed: {e}{rule}");
        }
        match (&self.decision, self.reason, &self.check) {
            (_, Reason::DeniedByProvider | Reason::ProviderError, Some(check)) => {
                format!("CUSTOM: {}", check.describe())
            }
            (Some(decision), _, _) => decision.describe(),
            (None, Reason::Probe, _) => {
                "probe: one of the workload's probe endpoints, from the node; not judged".into()
            }
            (None, reason, _) => format!(
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
    let (method, headers) = method_and_headers(req)?;
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
    let asking = Asking::new(req, &source, inputs);
    let judged = if req.tcp {
        let mut verdict = decide_tcp(req.sni.as_deref(), &judge);
        if let Some(call) = verdict.custom.take() {
            let result = asking.ask(&call, None);
            verdict = tcp_after_custom(verdict, req.sni.as_deref(), &judge, result);
        }
        Judgement::of_tcp(verdict)
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
        let mut verdict = decide_http(&request, &judge);
        if let Some(call) = verdict.custom.clone() {
            verdict = asking.ask_http(verdict, &call, &rules, &request, &judge);
        }
        Judgement::of_http(verdict)
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

/// The described request's method and headers.
fn method_and_headers(req: &CheckRequest) -> Result<(http::Method, http::HeaderMap), CheckError> {
    let mut headers = http::HeaderMap::new();
    for text in &req.headers {
        let (name, value) = parse_header(text).map_err(CheckError::Header)?;
        headers.append(name, value);
    }
    let method = http::Method::from_bytes(req.method.as_bytes())
        .map_err(|_| CheckError::Method(req.method.clone()))?;
    Ok((method, headers))
}

/// Who asks an external authorizer, as the enforcer would describe the connection.
struct Asking<'a> {
    source: SocketAddr,
    source_principal: Option<&'a str>,
    destination: SocketAddr,
    destination_principal: Option<String>,
}

impl<'a> Asking<'a> {
    fn new(req: &CheckRequest, source: &'a Source, inputs: &Inputs<'_>) -> Self {
        Self {
            source: SocketAddr::new(req.source_ip.unwrap_or(Ipv4Addr::UNSPECIFIED.into()), 0),
            source_principal: source.principal.as_deref(),
            destination: SocketAddr::new(
                req.dest_ip.unwrap_or(Ipv4Addr::UNSPECIFIED.into()),
                req.port,
            ),
            destination_principal: destination_principal(req, inputs),
        }
    }

    /// Asks `call`'s provider for real (a fresh client, on a thread of its own: `check` is
    /// synchronous, and the agent's `POST /check` runs off its admin runtime).
    fn ask(&self, call: &CustomCall, http: Option<HttpInput<'_>>) -> CheckResult {
        let input = CheckInput {
            source: self.source,
            source_principal: self.source_principal,
            destination: self.destination,
            destination_principal: self.destination_principal.as_deref(),
            http,
        };
        CheckResult::blocking(&crate::extauthz::Client::new(), &call.provider, &input)
    }

    /// Asks for an HTTP request as the enforcer does: after authentication's rewrite (the
    /// token the pod would not get is not sent), with the provider's headers applied before
    /// DENY/ALLOW.
    fn ask_http(
        &self,
        mut verdict: HttpVerdict,
        call: &CustomCall,
        rules: &JwtRules,
        request: &HttpRequest<'_>,
        judge: &Judge<'_>,
    ) -> HttpVerdict {
        let mut headers = request.headers.clone();
        verdict.rewrite_authn(rules, &mut headers);
        let target = verdict.target();
        let empty = bytes::Bytes::new();
        let http = HttpInput {
            method: request.method.as_str(),
            path: &target,
            host: verdict.authority.as_deref().unwrap_or_default(),
            headers: &headers,
            protocol: "HTTP/1.1",
            // A described request has no body: an empty one when the provider wants it.
            body: call.provider.body.as_ref().map(|_| (&empty, false)),
            size: 0,
        };
        let result = self.ask(call, Some(http));
        if let CheckOutcome::Allowed(allowed) = &result.outcome {
            allowed.apply(&mut headers);
        }
        let request = HttpRequest {
            headers: &headers,
            ..*request
        };
        after_custom(verdict, &request, judge, result)
    }
}

/// The destination workload's principal, known only from the live registry.
fn destination_principal(req: &CheckRequest, inputs: &Inputs<'_>) -> Option<String> {
    match (inputs, req.dest_ip) {
        (Inputs::Live { snapshot, .. }, Some(ip)) => snapshot
            .destination(ip)
            .map(|view| snapshot.principal_of(&view.workload)),
        _ => None,
    }
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
