//! The attributes a `when` condition can test (Istio's "Authorization Policy Conditions"
//! reference), with the value checks Istio's validation applies to each.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

/// The name in `request.headers[name]`, as Envoy's header matcher reads the request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HeaderKey {
    /// A header, by name (case-insensitive).
    Name(http::HeaderName),
    /// `:authority`: the request's authority (`Host`).
    Authority,
    /// `:method`.
    Method,
    /// `:path`: the normalized path and the query, as forwarded.
    Path,
    /// `:scheme`: `http` (the enforcer receives plain-text HTTP).
    Scheme,
    /// Another pseudo-header, or a name no header can have: Istio accepts the key, and no
    /// request carries it (it is never present).
    Absent(String),
}

impl HeaderKey {
    /// Istio accepts any non-empty name in brackets; Envoy lower-cases it.
    fn parse(name: &str) -> Self {
        match name.to_ascii_lowercase().as_str() {
            ":authority" => Self::Authority,
            ":method" => Self::Method,
            ":path" => Self::Path,
            ":scheme" => Self::Scheme,
            other => http::HeaderName::from_bytes(other.as_bytes())
                .map_or_else(|_| Self::Absent(other.to_owned()), Self::Name),
        }
    }
}

/// A condition key, parsed once at compile time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Attribute {
    /// `request.headers[Name]`: the header's value; several values are joined with `,`.
    RequestHeader(HeaderKey),
    /// `request.experimental.inline.headers[Name]`: matches when any comma-separated element
    /// of the header's value matches.
    RequestInlineHeader(HeaderKey),
    /// `experimental.envoy.filters.*[..]`: Envoy filter metadata, which does not exist at the
    /// node. Accepted as Istio accepts it; a rule using it never matches in an ALLOW policy and
    /// ignores it in DENY/AUDIT/CUSTOM (Istio's treatment of values it cannot translate).
    EnvoyFilterMetadata(String),
    /// `source.ip`: the peer address of the connection.
    SourceIp,
    /// `remote.ip`: the original client address; the peer address at the node (no trusted proxies).
    RemoteIp,
    /// `source.namespace`: the namespace of the source workload.
    SourceNamespace,
    /// `source.principal`: `<trust-domain>/ns/<ns>/sa/<sa>` of the source workload.
    SourcePrincipal,
    /// `source.serviceAccount`: `<ns>/<sa>` of the source workload.
    SourceServiceAccount,
    /// `source.trustDomain`: the trust domain of the source principal (`<td>/ns/..`).
    SourceTrustDomain,
    /// `request.auth.principal`: `iss/sub` of the validated JWT.
    RequestAuthPrincipal,
    /// `request.auth.audiences`: the JWT's `aud`.
    RequestAuthAudiences,
    /// `request.auth.presenter`: the JWT's `azp`.
    RequestAuthPresenter,
    /// `request.auth.claims[a][b]`: a (nested) claim: a string, or any string of a list.
    RequestAuthClaim(Vec<String>),
    /// `destination.ip`: the pod address the connection was sent to.
    DestinationIp,
    /// `destination.port`: the pod port the connection was sent to.
    DestinationPort,
    /// `connection.sni`: the server name of a TLS ClientHello.
    ConnectionSni,
}

/// Why a key or a value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttributeError {
    /// Not an attribute Istio documents.
    #[error("unknown attribute {0:?}")]
    Unknown(String),
    /// `request.headers[..]` or `request.auth.claims[..]` without a proper `[name]`.
    #[error("invalid key {0:?}: expected {1}[name]")]
    MapKey(String, &'static str),
    /// Attributes Istio retired in favour of another field.
    #[error("attribute {0:?} is replaced by {1}")]
    Replaced(String, &'static str),
    /// A value that cannot be what the attribute holds.
    #[error("{key}: {value:?} is not a valid {expected}")]
    Value {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl Attribute {
    pub fn parse(key: &str) -> Result<Self, AttributeError> {
        if let Some(rest) = key.strip_prefix("request.experimental.inline.headers") {
            let name = single_map_key(rest).ok_or_else(|| {
                AttributeError::MapKey(key.into(), "request.experimental.inline.headers")
            })?;
            return Ok(Self::RequestInlineHeader(HeaderKey::parse(name)));
        }
        if let Some(rest) = key.strip_prefix("request.headers") {
            let name = single_map_key(rest)
                .ok_or_else(|| AttributeError::MapKey(key.into(), "request.headers"))?;
            return Ok(Self::RequestHeader(HeaderKey::parse(name)));
        }
        if let Some(rest) = key.strip_prefix("request.auth.claims") {
            let path = map_keys(rest)
                .ok_or_else(|| AttributeError::MapKey(key.into(), "request.auth.claims"))?;
            return Ok(Self::RequestAuthClaim(path));
        }
        if let Some(rest) = key.strip_prefix("experimental.envoy.filters.") {
            let ok = rest
                .find('[')
                .is_some_and(|i| i > 0 && rest.ends_with(']') && rest.len() > i + 2);
            if !ok {
                return Err(AttributeError::MapKey(
                    key.into(),
                    "experimental.envoy.filters.<filter>",
                ));
            }
            return Ok(Self::EnvoyFilterMetadata(key.into()));
        }
        if key == "destination.namespace" {
            return Err(AttributeError::Replaced(
                key.into(),
                "the policy's metadata.namespace",
            ));
        }
        if key.starts_with("destination.labels") {
            return Err(AttributeError::Replaced(
                key.into(),
                "the workload selector",
            ));
        }
        Ok(match key {
            "source.ip" => Self::SourceIp,
            "remote.ip" => Self::RemoteIp,
            "source.namespace" => Self::SourceNamespace,
            "source.principal" => Self::SourcePrincipal,
            "source.serviceAccount" => Self::SourceServiceAccount,
            "source.trustDomain" => Self::SourceTrustDomain,
            "request.auth.principal" => Self::RequestAuthPrincipal,
            "request.auth.audiences" => Self::RequestAuthAudiences,
            "request.auth.presenter" => Self::RequestAuthPresenter,
            "destination.ip" => Self::DestinationIp,
            "destination.port" => Self::DestinationPort,
            "connection.sni" => Self::ConnectionSni,
            _ => return Err(AttributeError::Unknown(key.into())),
        })
    }

    /// Attributes that exist only for HTTP requests; on a plain TCP connection Istio drops an
    /// ALLOW rule that uses one and treats it as matching in a DENY rule.
    #[must_use]
    pub fn is_http_only(&self) -> bool {
        matches!(
            self,
            Self::RequestHeader(_)
                | Self::RequestInlineHeader(_)
                | Self::RequestAuthPrincipal
                | Self::RequestAuthAudiences
                | Self::RequestAuthPresenter
                | Self::RequestAuthClaim(_)
        )
    }

    /// Checks one value the way Istio's `ValidateAttribute` does.
    pub fn check_value(&self, value: &str) -> Result<(), AttributeError> {
        let expected = match self {
            Self::SourceIp | Self::RemoteIp | Self::DestinationIp
                if parse_ip_block(value).is_none() =>
            {
                "IP address or CIDR"
            }
            Self::DestinationPort if parse_port(value).is_none() => "port (0-65535)",
            Self::SourceServiceAccount => match check_service_account(value) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
            Self::SourceTrustDomain if check_wildcard(value).is_err() => {
                "trust domain (exact, prefix*, *suffix or *)"
            }
            _ => return Ok(()),
        };
        Err(AttributeError::Value {
            key: self.key_name(),
            value: value.into(),
            expected,
        })
    }

    fn key_name(&self) -> &'static str {
        match self {
            Self::RequestHeader(_) => "request.headers",
            Self::RequestInlineHeader(_) => "request.experimental.inline.headers",
            Self::EnvoyFilterMetadata(_) => "experimental.envoy.filters",
            Self::SourceIp => "source.ip",
            Self::RemoteIp => "remote.ip",
            Self::SourceNamespace => "source.namespace",
            Self::SourcePrincipal => "source.principal",
            Self::SourceServiceAccount => "source.serviceAccount",
            Self::SourceTrustDomain => "source.trustDomain",
            Self::RequestAuthPrincipal => "request.auth.principal",
            Self::RequestAuthAudiences => "request.auth.audiences",
            Self::RequestAuthPresenter => "request.auth.presenter",
            Self::RequestAuthClaim(_) => "request.auth.claims",
            Self::DestinationIp => "destination.ip",
            Self::DestinationPort => "destination.port",
            Self::ConnectionSni => "connection.sni",
        }
    }
}

/// `[name]` exactly once.
fn single_map_key(rest: &str) -> Option<&str> {
    let inner = rest.strip_prefix('[')?.strip_suffix(']')?;
    (!inner.is_empty() && !inner.contains(['[', ']'])).then_some(inner)
}

/// `[a][b]...`, at least one, none empty.
fn map_keys(mut rest: &str) -> Option<Vec<String>> {
    let mut keys = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let key = &inner[..end];
        if key.is_empty() || key.contains('[') {
            return None;
        }
        keys.push(key.to_owned());
        rest = &inner[end + 1..];
    }
    (!keys.is_empty()).then_some(keys)
}

/// An address or CIDR as Istio accepts it in `ipBlocks` and IP conditions (host bits allowed,
/// masked away like Go's `net.ParseCIDR`).
#[must_use]
pub fn parse_ip_block(text: &str) -> Option<IpNet> {
    if text.contains('/') {
        IpNet::from_str(text).ok().map(|net| net.trunc())
    } else {
        IpAddr::from_str(text).ok().map(IpNet::from)
    }
}

/// A port number 0-65535 written in decimal digits only (Istio accepts `0`, which matches
/// nothing).
#[must_use]
pub fn parse_port(text: &str) -> Option<u16> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse::<u16>().ok()
}

/// Istio's `CheckWildcardValues` for one trust domain value: exact, `prefix*`, `*suffix` or `*`.
pub fn check_wildcard(value: &str) -> Result<(), &'static str> {
    match value.matches('*').count() {
        0 => Ok(()),
        1 if value.starts_with('*') || value.ends_with('*') => Ok(()),
        1 => Err("trust domain: a wildcard is only allowed at the start or the end"),
        _ => Err("trust domain: at most one wildcard is allowed"),
    }
}

/// Istio's `CheckTrustDomainValues` for one value of `trustDomains`/`notTrustDomains`: a
/// wildcard value as [`check_wildcard`] has it, without `/`.
pub fn check_trust_domain(value: &str) -> Result<(), &'static str> {
    check_wildcard(value)?;
    if value.contains('/') {
        return Err("trust domain: must not contain '/'");
    }
    Ok(())
}

/// Istio's `CheckServiceAccount` for one value: `sa` or `namespace/sa`, no wildcard, at
/// most 320 characters.
pub fn check_service_account(value: &str) -> Result<(), &'static str> {
    if value.contains('*') {
        return Err("service account: wildcards are not allowed");
    }
    if value.len() > 320 {
        return Err("service account: at most 320 characters");
    }
    match value.split('/').collect::<Vec<_>>().as_slice() {
        [sa] if !sa.is_empty() => Ok(()),
        [ns, sa] if !ns.is_empty() && !sa.is_empty() => Ok(()),
        _ => Err("service account: expected 'serviceAccount' or 'namespace/serviceAccount'"),
    }
}
