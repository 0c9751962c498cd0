//! Istio's `MeshConfig` as far as the CUSTOM action goes: the `extensionProviders` list, field for
//! field as istio/api `mesh/v1alpha1/config.proto` (`EnvoyExternalAuthorizationHttpProvider`,
//! `EnvoyExternalAuthorizationGrpcProvider`, `EnvoyExternalAuthorizationRequestBody`), read from
//! the same YAML Istio reads (the `mesh` key of `ConfigMap` `istio`, or `--mesh-config FILE`).
//!
//! Every other `MeshConfig` field, and every other provider kind (tracing, access logs, ...), is
//! accepted and ignored. A provider of either `ext_authz` kind with an unknown field, or one that
//! fails Istio's checks (`pkg/config/validation/agent/extensionprovider.go` and
//! `pilot/pkg/security/authz/builder/extauthz.go`), is kept as invalid with errors naming the
//! field: CUSTOM policies naming it deny what their rules match, as Istio's generated config
//! does, while the other providers serve.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::r#type::v3::StatusCode as Envoy;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

/// Istio's default timeout of a check (`timeoutOrDefault`): 600 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_mins(10);

/// A `MeshConfig` document: only `extensionProviders` is read.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshDocument {
    #[serde(default)]
    extension_providers: Option<Vec<serde_yaml::Value>>,
}

/// `MeshConfig.ExtensionProvider`, with the two `ext_authz` kinds modelled; any other kind is kept
/// as its key so that it can be named and skipped.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawProvider {
    #[serde(default)]
    name: String,
    envoy_ext_authz_http: Option<serde_yaml::Value>,
    envoy_ext_authz_grpc: Option<serde_yaml::Value>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_yaml::Value>,
}

/// `EnvoyExternalAuthorizationRequestBody`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestBody {
    /// The most body bytes held for the check; beyond it the client gets 413 unless
    /// `allow_partial_message`.
    #[serde(default, deserialize_with = "proto_u32")]
    pub max_request_bytes: u32,
    /// Send what fits instead of answering 413 (`x-envoy-auth-partial-body` says so).
    #[serde(default)]
    pub allow_partial_message: bool,
    /// gRPC only: the body goes in `raw_body` (bytes) instead of `body` (UTF-8).
    #[serde(default)]
    pub pack_as_bytes: bool,
}

/// `EnvoyExternalAuthorizationHttpProvider`, every field of the proto.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpProviderSpec {
    #[serde(default)]
    pub service: String,
    #[serde(default, deserialize_with = "proto_u32")]
    pub port: u32,
    /// A protobuf JSON duration (`"0.5s"`).
    pub timeout: Option<String>,
    #[serde(default)]
    pub path_prefix: String,
    #[serde(default)]
    pub fail_open: bool,
    /// Accepted; there are no routes at the node to recompute.
    #[serde(default)]
    pub clear_route_cache: bool,
    #[serde(default)]
    pub status_on_error: String,
    /// Deprecated: read only when `include_request_headers_in_check` is empty (Istio).
    #[serde(default)]
    pub include_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    pub include_request_body_in_check: Option<RequestBody>,
    #[serde(default)]
    pub headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    pub headers_to_downstream_on_allow: Vec<String>,
}

/// `EnvoyExternalAuthorizationGrpcProvider`, every field of the proto.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GrpcProviderSpec {
    #[serde(default)]
    pub service: String,
    #[serde(default, deserialize_with = "proto_u32")]
    pub port: u32,
    pub timeout: Option<String>,
    #[serde(default)]
    pub fail_open: bool,
    #[serde(default)]
    pub clear_route_cache: bool,
    #[serde(default)]
    pub status_on_error: String,
    pub include_request_body_in_check: Option<RequestBody>,
}

/// A protobuf JSON `uint32`: a number, or a string holding one (Istio's own samples write
/// `port: "9000"`).
fn proto_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    let n = match Either::deserialize(d)? {
        Either::Number(n) => n,
        Either::Text(t) => t.parse::<u64>().map_err(|_| {
            serde::de::Error::custom(format!("expected an unsigned integer, found {t:?}"))
        })?,
    };
    // Out of range is the caller's error to name (a port beyond 65535 is refused with its rule).
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// A header name pattern of the provider's lists: exact, `prefix*` or `*suffix`, matched
/// without regard to case (Istio's `generateHeaders`: `IgnoreCase: true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum HeaderPattern {
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl From<HeaderPattern> for String {
    fn from(p: HeaderPattern) -> Self {
        match p {
            HeaderPattern::Exact(v) => v,
            HeaderPattern::Prefix(v) => format!("{v}*"),
            HeaderPattern::Suffix(v) => format!("*{v}"),
        }
    }
}

impl HeaderPattern {
    fn parse(text: &str) -> Self {
        let lower = text.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix('*') {
            Self::Suffix(rest.to_owned())
        } else if let Some(rest) = lower.strip_suffix('*') {
            Self::Prefix(rest.to_owned())
        } else {
            Self::Exact(lower)
        }
    }

    /// `name` is a lower-case header name.
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(v) => name.eq_ignore_ascii_case(v),
            Self::Prefix(v) => name.len() >= v.len() && name[..v.len()].eq_ignore_ascii_case(v),
            Self::Suffix(v) => {
                name.len() >= v.len() && name[name.len() - v.len()..].eq_ignore_ascii_case(v)
            }
        }
    }
}

/// Whether any pattern of `list` matches `name`.
#[must_use]
pub fn any_matches(list: &[HeaderPattern], name: &str) -> bool {
    list.iter().any(|p| p.matches(name))
}

/// What the HTTP kind adds to the common settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpSettings {
    pub path_prefix: String,
    /// Client headers sent in the check, besides Host, Method, Path, Content-Length and
    /// Authorization.
    pub include_request_headers: Vec<HeaderPattern>,
    /// Fixed headers set on the check request (override the client's).
    #[serde(skip)]
    pub additional_headers: Vec<(HeaderName, HeaderValue)>,
    pub headers_to_upstream_on_allow: Vec<HeaderPattern>,
    pub headers_to_downstream_on_deny: Vec<HeaderPattern>,
    pub headers_to_downstream_on_allow: Vec<HeaderPattern>,
}

/// Which protocol the provider speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `envoyExtAuthzHttp`.
    Http(HttpSettings),
    /// `envoyExtAuthzGrpc`.
    Grpc,
}

/// A provider ready to be called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderConfig {
    pub name: String,
    /// The host part of `service` (a `<namespace>/` prefix removed): a host name or an IP.
    pub host: String,
    pub port: u16,
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    pub fail_open: bool,
    /// The status a client gets when the check fails and `fail_open` is off (default 403).
    #[serde(serialize_with = "status_code")]
    pub status_on_error: StatusCode,
    pub body: Option<RequestBody>,
    pub kind: Kind,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's serialize_with passes a reference"
)]
fn status_code<S: serde::Serializer>(s: &StatusCode, ser: S) -> Result<S::Ok, S::Error> {
    ser.serialize_u16(s.as_u16())
}

mod humantime_serde_compat {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl ProviderConfig {
    /// `http` or `grpc`.
    #[must_use]
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Http(_) => "envoyExtAuthzHttp",
            Kind::Grpc => "envoyExtAuthzGrpc",
        }
    }
}

/// One problem with one field of a provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `extensionProviders[1].envoyExtAuthzHttp.port`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// A provider entry of the list: usable, or refused with the reasons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Ready(ProviderConfig),
    Invalid(Vec<FieldError>),
}

/// The `ext_authz` providers of one `MeshConfig`, by name (the first entry of a duplicated name
/// wins; the duplicate is an error, as in Istio).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshProviders {
    pub providers: BTreeMap<String, Entry>,
    /// Problems that belong to no named provider (an entry without a name, a duplicate).
    pub errors: Vec<FieldError>,
    /// Entries of other kinds (tracing, logging, ...), by name: accepted and ignored.
    pub ignored: Vec<String>,
}

/// The file or document is not a `MeshConfig` at all: nothing of it can be used.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{origin}: not a MeshConfig: {message}")]
    Parse { origin: String, message: String },
}

impl MeshProviders {
    /// Reads a `MeshConfig` YAML file.
    pub fn load(path: &Path) -> Result<Self, MeshError> {
        let text = std::fs::read_to_string(path).map_err(|source| MeshError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses a `MeshConfig` YAML document (`origin` names it in errors). An empty document is
    /// an empty `MeshConfig`.
    pub fn parse(origin: &str, text: &str) -> Result<Self, MeshError> {
        let parse = |message: String| MeshError::Parse {
            origin: origin.to_owned(),
            message,
        };
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| parse(e.to_string()))?;
        if value.is_null() {
            return Ok(Self::default());
        }
        if !value.is_mapping() {
            return Err(parse("expected a mapping of MeshConfig fields".into()));
        }
        let doc: MeshDocument = serde_path_to_error::deserialize(value)
            .map_err(|e| parse(format!("{}: {}", e.path(), e.inner())))?;
        let mut out = Self::default();
        for (index, raw) in doc
            .extension_providers
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            out.add(index, raw);
        }
        Ok(out)
    }

    fn add(&mut self, index: usize, raw: serde_yaml::Value) {
        let at = format!("extensionProviders[{index}]");
        let raw: RawProvider = match serde_path_to_error::deserialize(raw) {
            Ok(r) => r,
            Err(e) => {
                self.errors.push(FieldError {
                    field: at,
                    message: format!("{}: {}", e.path(), e.inner()),
                });
                return;
            }
        };
        let mut errors = Vec::new();
        if raw.name.is_empty() {
            self.errors.push(FieldError {
                field: format!("{at}.name"),
                message: "extension provider name must not be empty".into(),
            });
            return;
        }
        if let Err(message) = validate_provider_name(&raw.name) {
            errors.push(FieldError {
                field: format!("{at}.name"),
                message,
            });
        }
        let entry = match (raw.envoy_ext_authz_http, raw.envoy_ext_authz_grpc) {
            (Some(_), Some(_)) => {
                errors.push(FieldError {
                    field: at.clone(),
                    message:
                        "sets both envoyExtAuthzHttp and envoyExtAuthzGrpc; a provider has one kind"
                            .into(),
                });
                None
            }
            (Some(http), None) => Some(http_provider(&raw.name, &at, http, &mut errors)),
            (None, Some(grpc)) => Some(grpc_provider(&raw.name, &at, grpc, &mut errors)),
            (None, None) => {
                // Another kind (zipkin, envoyFileAccessLog, ...): not ours.
                if self.providers.contains_key(&raw.name) || self.ignored.contains(&raw.name) {
                    self.errors.push(duplicate(&at, &raw.name));
                } else {
                    self.ignored.push(raw.name);
                }
                return;
            }
        };
        if self.providers.contains_key(&raw.name) || self.ignored.contains(&raw.name) {
            self.errors.push(duplicate(&at, &raw.name));
            return;
        }
        let entry = match entry.flatten() {
            Some(config) if errors.is_empty() => Entry::Ready(config),
            _ => Entry::Invalid(errors),
        };
        self.providers.insert(raw.name, entry);
    }

    /// Every problem, one line each (the snapshot's errors, `status`, the log).
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut out: Vec<String> = self.errors.iter().map(ToString::to_string).collect();
        for (name, entry) in &self.providers {
            if let Entry::Invalid(errors) = entry {
                for e in errors {
                    out.push(format!("extension provider {name:?}: {e}"));
                }
            }
        }
        out
    }
}

fn duplicate(at: &str, name: &str) -> FieldError {
    FieldError {
        field: format!("{at}.name"),
        message: format!("extension provider name must be unique, found duplicate: {name}"),
    }
}

/// Istio's `validateProviderName`: a DNS-1123 label (lower case, digits, `-`; 63 at most).
fn validate_provider_name(name: &str) -> Result<(), String> {
    if name.len() > 63 {
        return Err(format!(
            "provider name too long (max 63 characters): {}",
            name.len()
        ));
    }
    if let Some((i, c)) = name
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(if c.is_ascii_uppercase() {
            format!(
                "uppercase letters not allowed (use lowercase): character {c:?} at position {i}"
            )
        } else {
            format!("invalid character {c:?} at position {i} (only lowercase letters, digits, and hyphens allowed)")
        });
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("provider name cannot start or end with hyphen".into());
    }
    Ok(())
}

fn err(errors: &mut Vec<FieldError>, field: String, message: impl Into<String>) {
    errors.push(FieldError {
        field,
        message: message.into(),
    });
}

fn parse_spec<T: serde::de::DeserializeOwned>(
    at: &str,
    value: serde_yaml::Value,
    errors: &mut Vec<FieldError>,
) -> Option<T> {
    match serde_path_to_error::deserialize(value) {
        Ok(spec) => Some(spec),
        Err(e) => {
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                at.to_owned()
            } else {
                format!("{at}.{path}")
            };
            err(errors, field, e.inner().to_string());
            None
        }
    }
}

/// What both kinds share, checked as Istio checks it.
struct Common {
    host: String,
    port: u16,
    timeout: Duration,
    status_on_error: StatusCode,
}

fn common(
    at: &str,
    service: &str,
    port: u32,
    timeout: Option<&str>,
    status_on_error: &str,
    body: Option<&RequestBody>,
    errors: &mut Vec<FieldError>,
) -> Option<Common> {
    let before = errors.len();
    let port = match u16::try_from(port) {
        Ok(p) if p >= 1 => p,
        _ => {
            err(
                errors,
                format!("{at}.port"),
                format!("port must be in the range [1, 65535], found: {port}"),
            );
            0
        }
    };
    let host = match validate_service(service) {
        Ok(host) => host,
        Err(message) => {
            err(errors, format!("{at}.service"), message);
            String::new()
        }
    };
    let timeout = match timeout.map(parse_duration) {
        None => DEFAULT_TIMEOUT,
        Some(Ok(d)) => d,
        Some(Err(message)) => {
            err(errors, format!("{at}.timeout"), message);
            DEFAULT_TIMEOUT
        }
    };
    let status_on_error = match parse_status_on_error(status_on_error) {
        Ok(s) => s,
        Err(message) => {
            err(errors, format!("{at}.statusOnError"), message);
            StatusCode::FORBIDDEN
        }
    };
    if let Some(body) = body {
        if body.max_request_bytes == 0 {
            // Envoy's BufferSettings: max_request_bytes must be greater than 0.
            err(
                errors,
                format!("{at}.includeRequestBodyInCheck.maxRequestBytes"),
                "must be greater than 0",
            );
        }
    }
    (errors.len() == before).then_some(Common {
        host,
        port,
        timeout,
        status_on_error,
    })
}

fn http_provider(
    name: &str,
    parent: &str,
    value: serde_yaml::Value,
    errors: &mut Vec<FieldError>,
) -> Option<ProviderConfig> {
    let at = format!("{parent}.envoyExtAuthzHttp");
    let spec: HttpProviderSpec = parse_spec(&at, value, errors)?;
    let common = common(
        &at,
        &spec.service,
        spec.port,
        spec.timeout.as_deref(),
        &spec.status_on_error,
        spec.include_request_body_in_check.as_ref(),
        errors,
    );
    if !spec.path_prefix.is_empty() {
        if !spec.path_prefix.starts_with('/') {
            err(
                errors,
                format!("{at}.pathPrefix"),
                format!(
                    "pathPrefix must begin with `/`, found: {:?}",
                    spec.path_prefix
                ),
            );
        } else if http::uri::PathAndQuery::try_from(spec.path_prefix.as_str()).is_err()
            || spec.path_prefix.contains(['?', '#'])
        {
            err(
                errors,
                format!("{at}.pathPrefix"),
                format!("invalid pathPrefix {:?}: not a URL path", spec.path_prefix),
            );
        }
    }
    check_header_lists(&at, &spec, errors);
    let mut additional = Vec::new();
    for (k, v) in &spec.include_additional_headers_in_check {
        let field = format!("{at}.includeAdditionalHeadersInCheck[{k}]");
        match (
            HeaderName::try_from(k.as_str()),
            HeaderValue::try_from(v.as_str()),
        ) {
            (Ok(k), Ok(v)) => additional.push((k, v)),
            (Err(_), _) => err(errors, field, "not a valid HTTP header name"),
            (_, Err(_)) => err(errors, field, "not a valid HTTP header value"),
        }
    }
    let patterns = |list: &[String]| -> Vec<HeaderPattern> {
        list.iter().map(|v| HeaderPattern::parse(v)).collect()
    };
    // IncludeHeadersInCheck is deprecated; Istio reads it only when the new list is empty.
    let include = if spec.include_request_headers_in_check.is_empty() {
        &spec.include_headers_in_check
    } else {
        &spec.include_request_headers_in_check
    };
    let common = common?;
    Some(ProviderConfig {
        name: name.to_owned(),
        host: common.host,
        port: common.port,
        timeout: common.timeout,
        fail_open: spec.fail_open,
        status_on_error: common.status_on_error,
        body: spec.include_request_body_in_check.clone(),
        kind: Kind::Http(HttpSettings {
            path_prefix: spec.path_prefix.clone(),
            include_request_headers: patterns(include),
            additional_headers: additional,
            headers_to_upstream_on_allow: patterns(&spec.headers_to_upstream_on_allow),
            headers_to_downstream_on_deny: patterns(&spec.headers_to_downstream_on_deny),
            headers_to_downstream_on_allow: patterns(&spec.headers_to_downstream_on_allow),
        }),
    })
}

/// Istio's builder refuses a single `*` in the header lists ("change it to either prefix or
/// suffix match").
fn check_header_lists(at: &str, spec: &HttpProviderSpec, errors: &mut Vec<FieldError>) {
    let lists = [
        (
            "includeRequestHeadersInCheck",
            &spec.include_request_headers_in_check,
        ),
        ("includeHeadersInCheck", &spec.include_headers_in_check),
        (
            "headersToUpstreamOnAllow",
            &spec.headers_to_upstream_on_allow,
        ),
        (
            "headersToDownstreamOnDeny",
            &spec.headers_to_downstream_on_deny,
        ),
        (
            "headersToDownstreamOnAllow",
            &spec.headers_to_downstream_on_allow,
        ),
    ];
    for (field, list) in lists {
        for (i, v) in list.iter().enumerate() {
            if v == "*" {
                err(
                    errors,
                    format!("{at}.{field}[{i}]"),
                    "a single wildcard (\"*\") is not supported, change it to either prefix or suffix match",
                );
            } else if v.is_empty() {
                err(errors, format!("{at}.{field}[{i}]"), "empty header name");
            }
        }
    }
}

fn grpc_provider(
    name: &str,
    parent: &str,
    value: serde_yaml::Value,
    errors: &mut Vec<FieldError>,
) -> Option<ProviderConfig> {
    let at = format!("{parent}.envoyExtAuthzGrpc");
    let spec: GrpcProviderSpec = parse_spec(&at, value, errors)?;
    let common = common(
        &at,
        &spec.service,
        spec.port,
        spec.timeout.as_deref(),
        &spec.status_on_error,
        spec.include_request_body_in_check.as_ref(),
        errors,
    )?;
    Some(ProviderConfig {
        name: name.to_owned(),
        host: common.host,
        port: common.port,
        timeout: common.timeout,
        fail_open: spec.fail_open,
        status_on_error: common.status_on_error,
        body: spec.include_request_body_in_check,
        kind: Kind::Grpc,
    })
}

/// Istio's `validateExtensionProviderService`: `[<namespace>/]<hostname>`, the host a fully
/// qualified name or an IP address. Returns the host to dial.
fn validate_service(service: &str) -> Result<String, String> {
    if service.is_empty() {
        return Err("service must not be empty".into());
    }
    let (namespace, host) = match service.split_once('/') {
        Some((ns, host)) => (Some(ns), host),
        None => (None, service),
    };
    if let Some(ns) = namespace {
        if ns != "*" && ns != "." && !is_dns_label(ns) {
            return Err(format!("invalid namespace {ns:?} in service {service:?}"));
        }
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(host.to_owned());
    }
    if !is_fqdn(host) {
        return Err(format!(
            "invalid service fmt {service}: {host:?} is neither a host name nor an IP address"
        ));
    }
    Ok(host.to_owned())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Istio's `ValidateFQDN`: at most 255 characters, labels of letters, digits and `-`.
fn is_fqdn(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 255
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// A protobuf JSON `Duration`: decimal seconds with an `s` suffix (`"1s"`, `"0.5s"`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad =
        || format!("invalid duration {text:?}: expected seconds with an `s` suffix, e.g. \"0.5s\"");
    let secs = text.strip_suffix('s').ok_or_else(bad)?;
    if secs.is_empty() || secs.starts_with(['-', '+']) {
        return Err(bad());
    }
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 9
    {
        return Err(bad());
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let nanos: u32 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().map_err(|_| bad())?
    };
    let d = Duration::new(whole, nanos);
    if d.is_zero() {
        return Err(format!("invalid duration {text:?}: must be greater than 0"));
    }
    Ok(d)
}

/// Istio's `parseStatusOnError`: an integer that Envoy's `envoy.type.v3.StatusCode` names.
fn parse_status_on_error(text: &str) -> Result<StatusCode, String> {
    if text.is_empty() {
        return Ok(StatusCode::FORBIDDEN);
    }
    let code: i32 = text
        .parse()
        .map_err(|e| format!("invalid statusOnError {text:?}: {e}"))?;
    match Envoy::try_from(code) {
        Ok(c) if c != Envoy::Empty => u16::try_from(code)
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
            .ok_or_else(|| format!("unsupported statusOnError {text}")),
        _ => Err(format!(
            "unsupported statusOnError {text}, supported values: the HTTP status codes of Envoy's StatusCode (100-511)"
        )),
    }
}

#[cfg(test)]
mod tests;
