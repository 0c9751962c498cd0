//! Istio's admission checks for the two kinds (istio/istio `pkg/config/validation`), so that
//! a policy Istio would refuse is refused here too, with the field it is about.

use std::collections::BTreeMap;

use super::attribute::{self, AttributeError};
use super::model::{
    AuthorizationPolicySpec, Condition, JwtRule, ObjectMeta, Operation, PolicyTargetReference,
    RequestAuthenticationSpec, Source,
};
use super::path_pattern::{PathPattern, TemplateError};

/// The most rules one AuthorizationPolicy may carry, and the most `from` entries of a rule
/// (Istio's CRD schema: `maxItems: 512`).
pub const MAX_RULES: usize = 512;
/// Istio's limit on `serviceAccounts` values.
pub const MAX_SERVICE_ACCOUNTS: usize = 16;
/// Istio's schema limit on `spaceDelimitedClaims`.
pub const MAX_SPACE_DELIMITED_CLAIMS: usize = 64;

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// The object does not fit the kind's schema (wrong type, unknown field, ...).
    #[error("{0}")]
    Schema(String),
    /// A required field is missing or empty.
    #[error("must be set")]
    Required,
    /// `action` is not one of ALLOW, DENY, AUDIT, CUSTOM.
    #[error("unknown action {0:?}: expected ALLOW, DENY, AUDIT or CUSTOM")]
    UnknownAction(String),
    /// A CUSTOM policy must name its external authorizer.
    #[error("a CUSTOM policy must set provider.name")]
    CustomWithoutProvider,
    /// `provider` means nothing for other actions.
    #[error("provider can only be used with the CUSTOM action")]
    ProviderWithoutCustom,
    /// A policy selects workloads by labels or targets resources, not both.
    #[error("only one of selector, targetRef or targetRefs can be set")]
    SelectorAndTargetRefs,
    /// `from`, `to`, `source` or `operation` present but with nothing in it.
    #[error("must not be empty")]
    Empty,
    /// Istio: "cannot set serviceAccounts with namespaces or principals".
    #[error("cannot set serviceAccounts with namespaces or principals")]
    ServiceAccountsExclusive,
    /// Not `sa` or `namespace/sa`, a wildcard, or too long.
    #[error("{0:?}: {1}")]
    ServiceAccount(String, &'static str),
    /// Istio's `CheckTrustDomainValues`: one wildcard at most, at the start or the end; no `/`.
    #[error("{0:?}: {1}")]
    TrustDomain(String, &'static str),
    /// DENY and CUSTOM policies without rules would never trigger; Istio refuses them.
    #[error("{} action without rules is meaningless as it will never be triggered, add an empty rule {{}} if you want it be triggered for every request", .0.as_str())]
    RulesRequired(Action),
    /// The field cannot be used in a CUSTOM policy (Istio: "not supported with CUSTOM action").
    #[error("is currently not supported with CUSTOM action")]
    NotWithCustom,
    /// `istio.io/dry-run` must be a boolean.
    #[error("invalid value {0:?}: expected true or false")]
    DryRunValue(String),
    /// `istio.io/dry-run` is for ALLOW and DENY only.
    #[error("the annotation only supports action ALLOW/DENY, found action {}", .0.as_str())]
    DryRunAction(Action),
    /// Selector labels match exactly.
    #[error("wildcard is not supported in selector")]
    SelectorWildcard,
    /// `targetRef.namespace` would reference across namespaces.
    #[error("cross namespace referencing is not supported")]
    CrossNamespaceTarget,
    /// Policies may target a Service, ServiceEntry, Gateway or GatewayClass.
    #[error(
        "targetRef must be to one of Service, ServiceEntry, Gateway, GatewayClass but was {0}"
    )]
    TargetKind(String),
    /// Not an IPv4/IPv6 address or CIDR.
    #[error("{0:?} is not a valid IP address or CIDR")]
    IpBlock(String),
    /// Not a port number 1-65535.
    #[error("{0:?} is not a valid port (1-65535)")]
    Port(String),
    /// A path template Istio would refuse.
    #[error("path {path:?}: {error}")]
    PathTemplate { path: String, error: TemplateError },
    /// A list longer than Istio's schema allows.
    #[error("{0} entries: at most {1} are allowed")]
    TooMany(usize, usize),
    /// A `when` key or one of its values is not valid.
    #[error(transparent)]
    Attribute(#[from] AttributeError),
    /// A `when` entry needs something to compare with.
    #[error("at least one of values or notValues must be set for key {0:?}")]
    NoValues(String),
    /// An empty string in a list of values.
    #[error("must not contain an empty string")]
    EmptyValue,
    /// `jwksUri` must be an absolute http(s) URL.
    #[error("jwksUri {0:?} is not a valid http or https URL")]
    JwksUri(String),
    /// Inline `jwks` must be a JSON Web Key Set.
    #[error("jwks is not a JSON Web Key Set: {0}")]
    Jwks(String),
    /// Not a valid HTTP header name.
    #[error("{0:?} is not a valid HTTP header name")]
    HeaderName(String),
    /// `timeout` must be a duration greater than 1ms, such as `5s`.
    #[error("timeout {0:?} is not a valid duration greater than 1ms, such as \"5s\"")]
    Timeout(String),
    /// `istio.io/dry-run` is only for AuthorizationPolicy.
    #[error("unsupported annotation on a RequestAuthentication, please remove it")]
    DryRunKind,
    /// Istio: "issuer or jwksUri must be non-empty string".
    #[error("issuer or jwksUri must be non-empty string")]
    IssuerOrJwksUri,
    /// Istio's schema: "only one of jwks or jwksUri can be set".
    #[error("only one of jwks or jwksUri can be set")]
    JwksAndJwksUri,
}

/// A problem and the field path it is about (`spec.rules[0].from[1].source.ipBlocks[2]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: Problem,
}

fn err(field: impl Into<String>, problem: Problem) -> FieldError {
    FieldError {
        field: field.into(),
        problem,
    }
}

/// The policy's action, as the engine uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

impl Action {
    /// Istio: "ALLOW" when unset.
    pub fn parse(action: Option<&str>) -> Result<Self, Problem> {
        match action.unwrap_or("ALLOW") {
            "" | "ALLOW" => Ok(Self::Allow),
            "DENY" => Ok(Self::Deny),
            "AUDIT" => Ok(Self::Audit),
            "CUSTOM" => Ok(Self::Custom),
            other => Err(Problem::UnknownAction(other.to_owned())),
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        }
    }
}

/// The values `istio.io/dry-run` may take (Go's `strconv.ParseBool`).
fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// `istio.io/dry-run` as Istio reads it; `false` when absent.
#[must_use]
pub fn dry_run(meta: &ObjectMeta) -> bool {
    meta.annotations
        .get(DRY_RUN_ANNOTATION)
        .and_then(|v| parse_bool(v))
        .unwrap_or(false)
}

/// The annotation that makes a policy evaluated and reported but never enforced.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// Checks an AuthorizationPolicy the way Istio's admission webhook and CRD schema do.
pub fn authorization_policy(
    spec: &AuthorizationPolicySpec,
    meta: &ObjectMeta,
) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    selector_and_targets(
        spec.selector.as_ref().map(|s| &s.match_labels),
        spec.target_ref.iter().chain(&spec.target_refs),
        spec.target_ref.is_some(),
        !spec.target_refs.is_empty(),
        &mut errors,
    );

    let action = Action::parse(spec.action.as_deref());
    match action {
        Ok(Action::Custom) => {
            if spec.provider.as_ref().is_none_or(|p| p.name.is_empty()) {
                errors.push(err("spec.provider.name", Problem::CustomWithoutProvider));
            }
        }
        Ok(_) => {
            if spec.provider.is_some() {
                errors.push(err("spec.provider", Problem::ProviderWithoutCustom));
            }
        }
        Err(ref problem) => errors.push(err("spec.action", problem.clone())),
    }
    if let Ok(action @ (Action::Custom | Action::Deny)) = action {
        if spec.rules.is_empty() {
            errors.push(err("spec.rules", Problem::RulesRequired(action)));
        }
    }
    if let Some(value) = meta.annotations.get(DRY_RUN_ANNOTATION) {
        let field = format!("metadata.annotations[{DRY_RUN_ANNOTATION}]");
        if parse_bool(value).is_none() {
            errors.push(err(field, Problem::DryRunValue(value.clone())));
        } else if let Ok(action @ (Action::Custom | Action::Audit)) = action {
            errors.push(err(field, Problem::DryRunAction(action)));
        }
    }

    if spec.rules.len() > MAX_RULES {
        errors.push(err(
            "spec.rules",
            Problem::TooMany(spec.rules.len(), MAX_RULES),
        ));
    }
    let custom = matches!(action, Ok(Action::Custom));
    for (r, rule) in spec.rules.iter().enumerate() {
        if let Some(from) = &rule.from {
            let field = format!("spec.rules[{r}].from");
            if from.is_empty() {
                errors.push(err(&field, Problem::Empty));
            }
            if from.len() > MAX_RULES {
                errors.push(err(&field, Problem::TooMany(from.len(), MAX_RULES)));
            }
            for (i, from) in from.iter().enumerate() {
                let field = format!("{field}[{i}].source");
                match &from.source {
                    None => errors.push(err(field, Problem::Required)),
                    Some(source) => validate_source(source, &field, custom, &mut errors),
                }
            }
        }
        if let Some(to) = &rule.to {
            let field = format!("spec.rules[{r}].to");
            if to.is_empty() {
                errors.push(err(&field, Problem::Empty));
            }
            for (i, to) in to.iter().enumerate() {
                let field = format!("{field}[{i}].operation");
                match &to.operation {
                    None => errors.push(err(field, Problem::Required)),
                    Some(operation) => validate_operation(operation, &field, &mut errors),
                }
            }
        }
        for (i, condition) in rule.when.iter().enumerate() {
            validate_condition(
                condition,
                &format!("spec.rules[{r}].when[{i}]"),
                custom,
                &mut errors,
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Target kinds Istio accepts: `(group, kind)`, the empty group being core.
const TARGET_KINDS: [(&str, &str); 4] = [
    ("", "Service"),
    ("networking.istio.io", "ServiceEntry"),
    ("gateway.networking.k8s.io", "Gateway"),
    ("gateway.networking.k8s.io", "GatewayClass"),
];

fn selector_and_targets<'a>(
    selector: Option<&BTreeMap<String, String>>,
    targets: impl Iterator<Item = &'a PolicyTargetReference>,
    target_ref: bool,
    target_refs: bool,
    errors: &mut Vec<FieldError>,
) {
    let set = usize::from(selector.is_some()) + usize::from(target_ref) + usize::from(target_refs);
    if set > 1 {
        errors.push(err("spec.selector", Problem::SelectorAndTargetRefs));
    }
    for (key, value) in selector.into_iter().flatten() {
        let field = format!("spec.selector.matchLabels[{key}]");
        if key.is_empty() {
            errors.push(err(field, Problem::Required));
        } else if key.contains('*') || value.contains('*') {
            errors.push(err(field, Problem::SelectorWildcard));
        }
    }
    for (i, t) in targets.enumerate() {
        let field = format!("spec.targetRefs[{i}]");
        if t.name.is_empty() {
            errors.push(err(format!("{field}.name"), Problem::Required));
        }
        if !t.namespace.is_empty() {
            errors.push(err(
                format!("{field}.namespace"),
                Problem::CrossNamespaceTarget,
            ));
        }
        if !TARGET_KINDS
            .iter()
            .any(|(g, k)| *g == t.group && *k == t.kind)
        {
            errors.push(err(
                format!("{field}.kind"),
                Problem::TargetKind(format!("{}/{}", t.group, t.kind)),
            ));
        }
    }
}

fn validate_source(s: &Source, field: &str, custom: bool, errors: &mut Vec<FieldError>) {
    let lists: [(&str, &Vec<String>); 14] = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ];
    if !some_values(&lists, field, errors) {
        return;
    }
    if custom {
        // Istio: "%s is currently not supported with CUSTOM action".
        for (name, list) in &lists[..10] {
            if !list.is_empty() {
                errors.push(err(format!("{field}.{name}"), Problem::NotWithCustom));
            }
        }
    }
    let identity = !(s.principals.is_empty()
        && s.not_principals.is_empty()
        && s.namespaces.is_empty()
        && s.not_namespaces.is_empty());
    for (name, list) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        if list.is_empty() {
            continue;
        }
        if identity {
            errors.push(err(
                format!("{field}.{name}"),
                Problem::ServiceAccountsExclusive,
            ));
        }
        if list.len() > MAX_SERVICE_ACCOUNTS {
            errors.push(err(
                format!("{field}.{name}"),
                Problem::TooMany(list.len(), MAX_SERVICE_ACCOUNTS),
            ));
        }
        for (i, sa) in list.iter().enumerate() {
            if let Err(why) = attribute::check_service_account(sa) {
                errors.push(err(
                    format!("{field}.{name}[{i}]"),
                    Problem::ServiceAccount(sa.clone(), why),
                ));
            }
        }
    }
    for (name, list) in [
        ("trustDomains", &s.trust_domains),
        ("notTrustDomains", &s.not_trust_domains),
    ] {
        for (i, domain) in list.iter().enumerate() {
            if let Err(why) = attribute::check_trust_domain(domain) {
                errors.push(err(
                    format!("{field}.{name}[{i}]"),
                    Problem::TrustDomain(domain.clone(), why),
                ));
            }
        }
    }
    for (name, list) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        for (i, block) in list.iter().enumerate() {
            if attribute::parse_ip_block(block).is_none() {
                errors.push(err(
                    format!("{field}.{name}[{i}]"),
                    Problem::IpBlock(block.clone()),
                ));
            }
        }
    }
}

fn validate_operation(o: &Operation, field: &str, errors: &mut Vec<FieldError>) {
    let lists: [(&str, &Vec<String>); 8] = [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("ports", &o.ports),
        ("notPorts", &o.not_ports),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ];
    if !some_values(&lists, field, errors) {
        return;
    }
    for (name, list) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        for (i, port) in list.iter().enumerate() {
            if attribute::parse_port(port).is_none() {
                errors.push(err(
                    format!("{field}.{name}[{i}]"),
                    Problem::Port(port.clone()),
                ));
            }
        }
    }
    for (name, list) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (i, p) in list.iter().enumerate() {
            if let Err(error) = PathPattern::parse(p) {
                errors.push(err(
                    format!("{field}.{name}[{i}]"),
                    Problem::PathTemplate {
                        path: p.clone(),
                        error,
                    },
                ));
            }
        }
    }
}

fn validate_condition(c: &Condition, field: &str, custom: bool, errors: &mut Vec<FieldError>) {
    if c.key.is_empty() {
        errors.push(err(format!("{field}.key"), Problem::Required));
        return;
    }
    if custom
        && (matches!(
            c.key.as_str(),
            "source.namespace"
                | "source.serviceAccount"
                | "source.trustDomain"
                | "source.principal"
        ) || c.key.starts_with("request.auth."))
    {
        errors.push(err(format!("{field}.key"), Problem::NotWithCustom));
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        errors.push(err(field, Problem::NoValues(c.key.clone())));
        return;
    }
    match attribute::Attribute::parse(&c.key) {
        Err(e) => errors.push(err(format!("{field}.key"), Problem::Attribute(e))),
        Ok(attr) => {
            for (name, list) in [("values", &c.values), ("notValues", &c.not_values)] {
                non_empty_values(list, &format!("{field}.{name}"), errors);
                for (i, value) in list.iter().enumerate() {
                    if let Err(e) = attr.check_value(value) {
                        errors.push(err(format!("{field}.{name}[{i}]"), Problem::Attribute(e)));
                    }
                }
            }
        }
    }
}

/// Istio: a `source` or `operation` must set at least one of its lists, and no list may hold
/// an empty string. `false` when nothing is set (the error is recorded).
fn some_values(lists: &[(&str, &Vec<String>)], field: &str, errors: &mut Vec<FieldError>) -> bool {
    if lists.iter().all(|(_, l)| l.is_empty()) {
        errors.push(err(field, Problem::Empty));
        return false;
    }
    for (name, list) in lists {
        non_empty_values(list, &format!("{field}.{name}"), errors);
    }
    true
}

fn non_empty_values(list: &[String], field: &str, errors: &mut Vec<FieldError>) {
    if let Some(i) = list.iter().position(String::is_empty) {
        errors.push(err(format!("{field}[{i}]"), Problem::EmptyValue));
    }
}

/// Checks a RequestAuthentication the way Istio's admission webhook and CRD schema do.
pub fn request_authentication(
    spec: &RequestAuthenticationSpec,
    meta: &ObjectMeta,
) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    selector_and_targets(
        spec.selector.as_ref().map(|s| &s.match_labels),
        spec.target_ref.iter().chain(&spec.target_refs),
        spec.target_ref.is_some(),
        !spec.target_refs.is_empty(),
        &mut errors,
    );
    if meta.annotations.contains_key(DRY_RUN_ANNOTATION) {
        errors.push(err(
            format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
            Problem::DryRunKind,
        ));
    }
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        validate_jwt_rule(rule, &format!("spec.jwtRules[{i}]"), &mut errors);
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Istio's `ValidateStrictHTTPHeaderName`: `^[-A-Za-z0-9]+$`.
fn strict_header_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn validate_jwt_rule(rule: &JwtRule, field: &str, errors: &mut Vec<FieldError>) {
    if rule.issuer.is_empty() && rule.jwks_uri.as_deref().unwrap_or_default().is_empty() {
        errors.push(err(format!("{field}.issuer"), Problem::IssuerOrJwksUri));
    }
    non_empty_values(&rule.audiences, &format!("{field}.audiences"), errors);
    if rule.jwks_uri.is_some() && rule.jwks.is_some() {
        errors.push(err(format!("{field}.jwks"), Problem::JwksAndJwksUri));
    }
    if let Some(uri) = &rule.jwks_uri {
        if !is_http_url(uri) {
            errors.push(err(
                format!("{field}.jwksUri"),
                Problem::JwksUri(uri.clone()),
            ));
        }
    }
    if let Some(jwks) = &rule.jwks {
        if let Err(e) = check_jwks_shape(jwks) {
            errors.push(err(format!("{field}.jwks"), Problem::Jwks(e)));
        }
    }
    for (i, header) in rule.from_headers.iter().enumerate() {
        let f = format!("{field}.fromHeaders[{i}].name");
        if header.name.is_empty() {
            errors.push(err(f, Problem::Required));
        } else if http::HeaderName::from_bytes(header.name.as_bytes()).is_err() {
            errors.push(err(f, Problem::HeaderName(header.name.clone())));
        }
    }
    non_empty_values(&rule.from_params, &format!("{field}.fromParams"), errors);
    non_empty_values(&rule.from_cookies, &format!("{field}.fromCookies"), errors);
    if let Some(header) = &rule.output_payload_to_header {
        if http::HeaderName::from_bytes(header.as_bytes()).is_err() {
            errors.push(err(
                format!("{field}.outputPayloadToHeader"),
                Problem::HeaderName(header.clone()),
            ));
        }
    }
    for (i, c) in rule.output_claim_to_headers.iter().enumerate() {
        let f = format!("{field}.outputClaimToHeaders[{i}]");
        if c.header.is_empty() {
            errors.push(err(format!("{f}.header"), Problem::Required));
        } else if !strict_header_name(&c.header) {
            errors.push(err(
                format!("{f}.header"),
                Problem::HeaderName(c.header.clone()),
            ));
        }
        if c.claim.is_empty() {
            errors.push(err(format!("{f}.claim"), Problem::Required));
        }
    }
    non_empty_values(
        &rule.space_delimited_claims,
        &format!("{field}.spaceDelimitedClaims"),
        errors,
    );
    if rule.space_delimited_claims.len() > MAX_SPACE_DELIMITED_CLAIMS {
        errors.push(err(
            format!("{field}.spaceDelimitedClaims"),
            Problem::TooMany(
                rule.space_delimited_claims.len(),
                MAX_SPACE_DELIMITED_CLAIMS,
            ),
        ));
    }
    if let Some(timeout) = &rule.timeout {
        if parse_duration(timeout).is_none_or(|d| d <= std::time::Duration::from_millis(1)) {
            errors.push(err(
                format!("{field}.timeout"),
                Problem::Timeout(timeout.clone()),
            ));
        }
    }
}

fn is_http_url(uri: &str) -> bool {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    matches!(scheme.to_ascii_lowercase().as_str(), "http" | "https") && !host.is_empty()
}

/// Only the shape here (a JSON object with a `keys` array); the keys themselves are read by
/// the JWT layer, which reports each unusable key.
fn check_jwks_shape(jwks: &str) -> Result<(), String> {
    let value: serde_json::Value = serde_json::from_str(jwks).map_err(|e| e.to_string())?;
    match value.get("keys") {
        Some(serde_json::Value::Array(_)) => Ok(()),
        _ => Err("no \"keys\" array".into()),
    }
}

/// A protobuf JSON duration (`"5s"`, `"0.5s"`) or a Go duration (`"1m30s"`, `"500ms"`).
#[must_use]
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    std::time::Duration::try_from_secs_f64(total).ok()
}
