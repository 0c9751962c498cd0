//! RequestAuthentication compiled: the jwtRules that apply to a workload, merged (its
//! namespace, its labels, the root namespace), and the authentication of one request with them.
//!
//! Istio: "A request that contains no token is accepted without identity"; a token that is
//! present must validate against a rule whose issuer matches, otherwise the request is
//! rejected (Envoy's requirement: any provider, or missing).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use super::cache::{TokenCache, TokenKey, Verified};
use super::error::JwtError;
use super::jwks::KeySet;
use super::keys::JwksSource;
/// The key-lookup vocabulary lives in [`super::keys`]; named here too for existing callers.
pub use super::keys::{KeyLookup, Keys, NoRemoteKeys};
use super::token;
use super::AuthInfo;
use crate::policy::model::JwtRule;
use crate::policy::validate::parse_duration;
use crate::policy::{scope, RequestAuthentication};

/// Where a token may be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A header; with a prefix (`Bearer `), only values containing it, the token after it.
    Header { name: HeaderName, prefix: String },
    /// A query parameter.
    Param(String),
    /// A cookie.
    Cookie(String),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header { name, prefix } if prefix.is_empty() => write!(f, "header {name}"),
            Self::Header { name, prefix } => write!(f, "header {name} (prefix {prefix:?})"),
            Self::Param(p) => write!(f, "query parameter {p}"),
            Self::Cookie(c) => write!(f, "cookie {c}"),
        }
    }
}

/// Istio's defaults: `Authorization: Bearer <token>`, then `?access_token=<token>`.
fn default_locations() -> Vec<Location> {
    vec![
        Location::Header {
            name: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        },
        Location::Param("access_token".into()),
    ]
}

/// Where a rule's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `jwks` in the rule.
    Inline(Arc<KeySet>),
    /// `jwksUri`, or OIDC discovery of an https issuer: looked up in the JWKS store by `key`
    /// (`source.key()`, computed once).
    Remote { source: JwksSource, key: String },
    /// Neither, and the issuer is not an https URL: no keys, tokens fail closed.
    Missing,
}

/// One `jwtRules` entry ready to use.
#[derive(Debug, Clone)]
pub struct CompiledJwtRule {
    /// Identifies the rule's content for the token cache.
    pub id: u64,
    /// `namespace/name[index]` of the RequestAuthentication it came from.
    pub origin: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    /// The jwksUri or issuer keys come from, for messages.
    pub jwks_uri: Option<String>,
    pub locations: Vec<Location>,
    pub output_payload_to_header: Option<HeaderName>,
    /// Header and the claim's path (`a.b` -> `["a", "b"]`).
    pub output_claims: Vec<(HeaderName, Vec<String>)>,
    pub forward_original_token: bool,
    pub space_delimited_claims: Vec<String>,
    pub timeout: Option<Duration>,
}

impl CompiledJwtRule {
    #[must_use]
    pub fn compile(rule: &JwtRule, origin: String) -> Self {
        let mut locations: Vec<Location> = rule
            .from_headers
            .iter()
            .filter_map(|h| {
                HeaderName::from_bytes(h.name.as_bytes())
                    .ok()
                    .map(|name| Location::Header {
                        name,
                        prefix: h.prefix.clone(),
                    })
            })
            .collect();
        locations.extend(rule.from_params.iter().map(|p| Location::Param(p.clone())));
        locations.extend(
            rule.from_cookies
                .iter()
                .map(|c| Location::Cookie(c.clone())),
        );
        if locations.is_empty() {
            locations = default_locations();
        }
        let keys = match &rule.jwks {
            Some(jwks) => KeySet::parse(jwks.as_bytes())
                .map_or(KeySource::Missing, |set| KeySource::Inline(Arc::new(set))),
            None => JwksSource::for_rule(&rule.issuer, rule.jwks_uri.as_deref()).map_or(
                KeySource::Missing,
                |source| KeySource::Remote {
                    key: source.key(),
                    source,
                },
            ),
        };
        let jwks_uri = match &keys {
            KeySource::Remote { key, .. } => Some(key.clone()),
            _ => None,
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        serde_json::to_string(rule)
            .unwrap_or_default()
            .hash(&mut hasher);
        Self {
            id: hasher.finish(),
            origin,
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys,
            jwks_uri,
            locations,
            output_payload_to_header: rule
                .output_payload_to_header
                .as_ref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            output_claims: rule
                .output_claim_to_headers
                .iter()
                .filter_map(|c| {
                    HeaderName::from_bytes(c.header.as_bytes())
                        .ok()
                        .map(|h| (h, c.claim.split('.').map(str::to_owned).collect()))
                })
                .collect(),
            forward_original_token: rule.forward_original_token,
            space_delimited_claims: rule.space_delimited_claims.clone(),
            timeout: rule.timeout.as_deref().and_then(parse_duration),
        }
    }
}

/// A compiled rule and the selector of the object it came from.
type Selected = (Option<BTreeMap<String, String>>, Arc<CompiledJwtRule>);

/// A key source to fetch, as [`JwksStore::set_sources`](super::fetch::JwksStore::set_sources)
/// takes it: the source, the rule's fetch timeout, the rule's issuer.
pub type RemoteSource = (JwksSource, Option<Duration>, String);

/// The remote key sources of `rules` (rules with inline or no keys have none).
fn remote_sources<'a>(
    rules: impl IntoIterator<Item = &'a Arc<CompiledJwtRule>>,
) -> Vec<RemoteSource> {
    rules
        .into_iter()
        .filter_map(|rule| match &rule.keys {
            KeySource::Remote { source, .. } => {
                Some((source.clone(), rule.timeout, rule.issuer.clone()))
            }
            _ => None,
        })
        .collect()
}

/// All RequestAuthentications, compiled, by namespace.
#[derive(Debug, Clone, Default)]
pub struct AuthnSet {
    root_namespace: String,
    by_namespace: HashMap<String, Vec<Selected>>,
}

impl AuthnSet {
    /// Objects with `targetRef(s)` apply to gateways and waypoints and are left out.
    #[must_use]
    pub fn compile<'a>(
        objects: impl IntoIterator<Item = &'a RequestAuthentication>,
        root_namespace: &str,
    ) -> Self {
        let mut by_namespace: HashMap<String, Vec<_>> = HashMap::new();
        for object in objects {
            if object.spec.target_ref.is_some() || !object.spec.target_refs.is_empty() {
                continue;
            }
            let selector = object
                .spec
                .selector
                .as_ref()
                .map(|s| s.match_labels.clone());
            for (i, rule) in object.spec.jwt_rules.iter().enumerate() {
                let compiled = CompiledJwtRule::compile(rule, format!("{}[{i}]", object.id()));
                by_namespace
                    .entry(object.namespace().to_owned())
                    .or_default()
                    .push((selector.clone(), Arc::new(compiled)));
            }
        }
        Self {
            root_namespace: root_namespace.to_owned(),
            by_namespace,
        }
    }

    /// Every rule, for the JWKS store's list of sources.
    pub fn rules(&self) -> impl Iterator<Item = &Arc<CompiledJwtRule>> {
        self.by_namespace.values().flatten().map(|(_, r)| r)
    }

    /// Every remote key source of every rule, as the JWKS store takes them: the agent gives
    /// it these on each published snapshot.
    #[must_use]
    pub fn remote_sources(&self) -> Vec<RemoteSource> {
        remote_sources(self.rules())
    }

    /// The merged rules of a workload, sorted by issuer (as Istio does).
    #[must_use]
    pub fn for_workload(&self, namespace: &str, labels: &BTreeMap<String, String>) -> JwtRules {
        let mut rules: Vec<Arc<CompiledJwtRule>> =
            scope::in_scope(&self.by_namespace, &self.root_namespace, namespace)
                .filter(|(sel, _)| scope::selects(sel.as_ref(), labels))
                .map(|(_, r)| r.clone())
                .collect();
        rules.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for rule in &rules {
            rule.id.hash(&mut hasher);
        }
        JwtRules {
            rules,
            fingerprint: hasher.finish(),
        }
    }
}

/// The jwtRules that apply to one workload.
#[derive(Debug, Clone, Default)]
pub struct JwtRules {
    pub rules: Vec<Arc<CompiledJwtRule>>,
    /// Identifies this rule set for the token cache.
    fingerprint: u64,
}

/// The parts of a request authentication looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
}

/// A token found in a request, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundToken<'a> {
    /// The token; bytes that are not UTF-8 are replaced by U+FFFD (see [`as_text`]).
    pub token: Cow<'a, str>,
    pub location: Location,
}

/// How authentication went.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// No rule applies to the workload: nothing to do.
    NoRules,
    /// CORS preflight: not asked for a token.
    Preflight,
    /// No token in any location: the request goes on with no identity.
    NoToken,
    /// Every token found validated; the identity is the first's.
    Authenticated(Authenticated),
    /// A token was found and did not validate: 401 (403 for audiences).
    Rejected {
        error: JwtError,
        rule: Option<Arc<CompiledJwtRule>>,
        location: Location,
    },
}

/// A successful authentication and what it changes in the request.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub verified: Arc<Verified>,
    pub rule: Arc<CompiledJwtRule>,
    pub location: Location,
    /// Whether the signature check was saved by the cache.
    pub cached: bool,
    /// Tokens to remove before the request goes on (`forwardOriginalToken: false`).
    pub remove: Vec<Location>,
}

fn is_preflight(parts: &RequestParts<'_>) -> bool {
    parts.method == Method::OPTIONS
        && parts.headers.contains_key(http::header::ORIGIN)
        && parts
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
}

/// Envoy's `ConstantBase64UrlEncodingCharsPlusDot`: base64url (RFC 4648 section 5) and `.`.
fn is_jwt_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')
}

/// The token in one value of a header location, as Envoy's extractor finds it. Without a prefix
/// the whole value is the token. With one, the prefix is searched anywhere in the value, case
/// sensitively (no prefix: not a token); the token starts at the first base64url character or
/// `.` after it and runs to the end of the value (`extractJWT`; anything after a JWT stays
/// in the token and fails it); when there is no such character, the whole value is the token.
fn header_token<'v>(value: &'v [u8], prefix: &str) -> Option<&'v [u8]> {
    let prefix = prefix.as_bytes();
    if prefix.is_empty() {
        return Some(value);
    }
    let after = value.windows(prefix.len()).position(|w| w == prefix)? + prefix.len();
    let rest = value.get(after..).unwrap_or_default();
    Some(
        rest.iter()
            .position(|&b| is_jwt_char(b))
            .map_or(value, |start| &rest[start..]),
    )
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// Envoy's `PercentEncoding::decode`: `%XX` with two hex digits becomes that byte, anything
/// else (a `%` without two hex digits after it, `+`) is kept as it is.
fn percent_decode(text: &[u8]) -> Cow<'_, [u8]> {
    if !text.contains(&b'%') {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        if b == b'%' {
            if let (Some(hi), Some(lo)) = (
                text.get(i + 1).copied().and_then(hex_digit),
                text.get(i + 2).copied().and_then(hex_digit),
            ) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Cow::Owned(out)
}

/// The `&`-separated parameters of a query string as Envoy's `parseParameters` sees them: a
/// trailing `&` (or an empty query) adds none; a parameter without `=` has an empty value.
fn query_pairs(query: &str) -> impl Iterator<Item = (&[u8], &[u8])> {
    let query = query.as_bytes();
    let empty = query.is_empty();
    query
        .strip_suffix(b"&")
        .unwrap_or(query)
        .split(|&b| b == b'&')
        .filter(move |_| !empty)
        .map(|param| match param.iter().position(|&b| b == b'=') {
            Some(eq) => (&param[..eq], &param[eq + 1..]),
            None => (param, &param[param.len()..]),
        })
}

/// The first value of the query parameter `name`, names and values percent-decoded
/// (Envoy: `parseAndDecodeQueryString(path).getFirstValue(name)`).
fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, [u8]>> {
    query_pairs(query)
        .find(|(key, _)| *percent_decode(key) == *name.as_bytes())
        .map(|(_, value)| percent_decode(value))
}

/// The name and value of one `;`-separated cookie as Envoy's `forEachCookie` reads them: the name
/// from the first byte that is not a space to the first `=`, the value all after it; `None`
/// for a cookie without `=`.
fn cookie_pair(cookie: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = cookie.iter().position(|&b| b == b'=')?;
    let start = cookie.iter().position(|&b| b != b' ').unwrap_or(eq).min(eq);
    Some((&cookie[start..eq], &cookie[eq + 1..]))
}

/// The cookie `name` as Envoy's `parseCookies` finds it: every Cookie header in order, the
/// first cookie of that name wins, its value is the rest of the cookie (not trimmed), unquoted
/// when it is wrapped in double quotes. Bytes are bytes: a sibling cookie that is not UTF-8
/// changes nothing.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|line| line.as_bytes().split(|&b| b == b';'))
        .find_map(|cookie| {
            let (key, value) = cookie_pair(cookie)?;
            (key == name.as_bytes()).then_some(match value {
                [b'"', inner @ .., b'"'] => inner,
                _ => value,
            })
        })
}

/// A token's bytes as text. Bytes that are not UTF-8 become U+FFFD, which is not base64url:
/// such a token is still a token and fails decoding where Envoy's would (401), it never
/// disappears.
fn as_text(bytes: Cow<'_, [u8]>) -> Cow<'_, str> {
    match bytes {
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(b) => Cow::Owned(
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
    }
}

impl JwtRules {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The remote key sources of these rules, as the JWKS store takes them.
    #[must_use]
    pub fn remote_sources(&self) -> Vec<RemoteSource> {
        remote_sources(&self.rules)
    }

    /// Tokens in the locations the rules read, each location once, in rule order, found as
    /// Envoy's `jwt_authn` extractor finds them: a header location gives one token per value
    /// of the header ([`header_token`]), a query parameter its first value percent-decoded, a
    /// cookie its first value. A location that is present with an empty value gives an empty
    /// token, which is then refused as Envoy refuses it ("Jwt is not in the form of
    /// Header.Payload.Signature ..."): a token present in any form is verified or rejected.
    #[must_use]
    pub fn extract<'a>(&self, parts: &RequestParts<'a>) -> Vec<FoundToken<'a>> {
        let mut seen: Vec<&Location> = Vec::new();
        let mut found = Vec::new();
        for location in self.rules.iter().flat_map(|r| &r.locations) {
            if seen.contains(&location) {
                continue;
            }
            seen.push(location);
            let mut push = |token: Cow<'a, [u8]>| {
                found.push(FoundToken {
                    token: as_text(token),
                    location: location.clone(),
                });
            };
            match location {
                Location::Header { name, prefix } => {
                    for value in parts.headers.get_all(name) {
                        if let Some(token) = header_token(value.as_bytes(), prefix) {
                            push(Cow::Borrowed(token));
                        }
                    }
                }
                Location::Param(name) => {
                    if let Some(token) = parts.query.and_then(|q| query_param(q, name)) {
                        push(token);
                    }
                }
                Location::Cookie(name) => {
                    if let Some(token) = cookie(parts.headers, name) {
                        push(Cow::Borrowed(token));
                    }
                }
            }
        }
        found
    }

    /// Authenticates one request at `now` (Unix seconds).
    pub fn authenticate(
        &self,
        parts: &RequestParts<'_>,
        keys: &dyn Keys,
        cache: &TokenCache,
        now: u64,
    ) -> Outcome {
        if self.rules.is_empty() {
            return Outcome::NoRules;
        }
        if is_preflight(parts) {
            return Outcome::Preflight;
        }
        let found = self.extract(parts);
        if found.is_empty() {
            return Outcome::NoToken;
        }
        let mut first: Option<Authenticated> = None;
        let mut remove = Vec::new();
        for token in &found {
            match self.verify_one(&token.token, &token.location, keys, cache, now) {
                Ok((verified, rule, cached)) => {
                    if !rule.forward_original_token {
                        remove.push(token.location.clone());
                    }
                    if first.is_none() {
                        first = Some(Authenticated {
                            verified,
                            rule,
                            location: token.location.clone(),
                            cached,
                            remove: Vec::new(),
                        });
                    }
                }
                Err((error, rule)) => {
                    tracing::debug!(location = %token.location, %error, "token rejected");
                    return Outcome::Rejected {
                        error,
                        rule,
                        location: token.location.clone(),
                    };
                }
            }
        }
        match first {
            Some(mut auth) => {
                auth.remove = remove;
                Outcome::Authenticated(auth)
            }
            None => Outcome::NoToken,
        }
    }

    /// The generation of a rule's keys, `None` when it has none usable.
    fn generation(rule: &CompiledJwtRule, keys: &dyn Keys) -> Option<(Arc<KeySet>, u64)> {
        match &rule.keys {
            KeySource::Inline(set) => Some((set.clone(), 0)),
            KeySource::Remote { key, .. } => match keys.lookup(key) {
                KeyLookup::Ready(set, generation) => Some((set, generation)),
                KeyLookup::Unavailable => None,
            },
            KeySource::Missing => None,
        }
    }

    /// One token: a cache hit (same token, location and rule set, same keys, still in time),
    /// or the rule for its issuer among those reading its location, then time, audience, keys
    /// and signature, in Envoy's order.
    #[expect(clippy::type_complexity, reason = "a private helper's pair of results")]
    fn verify_one(
        &self,
        token: &str,
        location: &Location,
        keys: &dyn Keys,
        cache: &TokenCache,
        now: u64,
    ) -> Result<(Arc<Verified>, Arc<CompiledJwtRule>, bool), (JwtError, Option<Arc<CompiledJwtRule>>)>
    {
        let mut scope = std::collections::hash_map::DefaultHasher::new();
        self.fingerprint.hash(&mut scope);
        location.hash(&mut scope);
        let key = TokenKey::new(token, scope.finish());
        if let Some(hit) = cache.get(&key) {
            if let Some(rule) = self.rules.get(hit.rule) {
                let current = Self::generation(rule, keys).map(|(_, g)| g);
                if current == Some(hit.generation) {
                    token::check_time(hit.exp, hit.nbf, now)
                        .map_err(|e| (e, Some(rule.clone())))?;
                    return Ok((hit, rule.clone(), true));
                }
            }
        }
        let decoded = token::decode(token).map_err(|e| (e, None))?;
        let readers = || {
            self.rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.locations.contains(location))
        };
        let mut candidates: Vec<(usize, &Arc<CompiledJwtRule>)> = readers()
            .filter(|(_, r)| r.issuer == decoded.issuer)
            .collect();
        if candidates.is_empty() {
            candidates = readers().filter(|(_, r)| r.issuer.is_empty()).collect();
        }
        // Istio makes each rule a provider and accepts a token any provider accepts: every rule
        // with the token's issuer is tried, in order; when all refuse, the first one's error is
        // the answer (Envoy's `requires_all` of `{provider or allow_missing}` stops there).
        let mut first_error: Option<(JwtError, Option<Arc<CompiledJwtRule>>)> = None;
        let mut accepted = None;
        for (index, rule) in candidates {
            match Self::check_with(&decoded, rule, keys, now) {
                Ok(found) => {
                    accepted = Some((index, rule, found));
                    break;
                }
                Err(e) => {
                    first_error.get_or_insert((e, Some(rule.clone())));
                }
            }
        }
        let Some((index, rule, generation)) = accepted else {
            return Err(first_error.unwrap_or((JwtError::UnknownIssuer, None)));
        };
        tracing::debug!(token = %decoded.describe(), rule = %rule.origin, "token verified");
        let verified = Arc::new(Verified {
            auth: AuthInfo::from_claims(decoded.claims.clone(), &rule.space_delimited_claims),
            exp: decoded.exp,
            nbf: decoded.nbf,
            payload_b64: decoded.payload_b64.to_owned(),
            generation,
            rule: index,
        });
        cache.insert(key, verified.clone());
        Ok((verified, rule.clone(), false))
    }

    /// Time, audiences, keys and signature of a decoded token against one rule, in Envoy's
    /// order; the generation of the keys that verified it.
    fn check_with(
        decoded: &token::Decoded<'_>,
        rule: &CompiledJwtRule,
        keys: &dyn Keys,
        now: u64,
    ) -> Result<u64, JwtError> {
        decoded.check_time(now)?;
        decoded.check_audience(&rule.audiences)?;
        let (set, generation) = Self::generation(rule, keys).ok_or(JwtError::JwksFetchFailed)?;
        decoded.check_signature(&set)?;
        Ok(generation)
    }

    /// Header names the rules write; client-supplied copies are removed from every request so
    /// they cannot be spoofed.
    pub fn output_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.rules.iter().flat_map(|r| {
            r.output_payload_to_header
                .iter()
                .chain(r.output_claims.iter().map(|(h, _)| h))
        })
    }
}

fn claim_value(
    claims: &serde_json::Map<String, serde_json::Value>,
    path: &[String],
) -> Option<String> {
    let (first, rest) = path.split_first()?;
    let value = rest.iter().try_fold(claims.get(first)?, |v, k| v.get(k))?;
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Rewrites a request after authentication: client copies of output headers removed, tokens
/// removed unless `forwardOriginalToken`, output headers added. Returns the new query string
/// (`None` when there is none).
pub fn rewrite(
    rules: &JwtRules,
    outcome: &Outcome,
    headers: &mut HeaderMap,
    query: Option<&str>,
) -> Option<String> {
    for name in rules.output_headers() {
        headers.remove(name);
    }
    let mut query = query.map(str::to_owned);
    let Outcome::Authenticated(auth) = outcome else {
        return query;
    };
    for location in &auth.remove {
        match location {
            Location::Header { name, .. } => {
                headers.remove(name);
            }
            Location::Param(name) => {
                query = query.map(|q| {
                    q.split('&')
                        .filter(|pair| {
                            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
                            *percent_decode(key.as_bytes()) != *name.as_bytes()
                        })
                        .collect::<Vec<_>>()
                        .join("&")
                });
            }
            Location::Cookie(name) => {
                // The other cookies, byte for byte (not UTF-8 included), in one header.
                let kept: Vec<Vec<u8>> = headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .flat_map(|line| line.as_bytes().split(|&b| b == b';'))
                    .map(<[u8]>::trim_ascii)
                    .filter(|c| {
                        !c.is_empty() && cookie_pair(c).is_none_or(|(k, _)| k != name.as_bytes())
                    })
                    .map(<[u8]>::to_vec)
                    .collect();
                headers.remove(http::header::COOKIE);
                if let Ok(v) = HeaderValue::from_bytes(&kept.join(&b"; "[..])) {
                    if !kept.is_empty() {
                        headers.insert(http::header::COOKIE, v);
                    }
                }
            }
        }
    }
    let rule = &auth.rule;
    if let Some(name) = &rule.output_payload_to_header {
        if let Ok(v) = HeaderValue::from_str(&auth.verified.payload_b64) {
            headers.insert(name.clone(), v);
        }
    }
    for (name, path) in &rule.output_claims {
        if let Some(v) = claim_value(&auth.verified.auth.claims, path)
            .and_then(|v| HeaderValue::from_str(&v).ok())
        {
            headers.insert(name.clone(), v);
        }
    }
    query.filter(|q| !q.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use test_case::test_case;

    use crate::policy::model::JwtHeader;

    /// Envoy's `ExampleConfig` (`test/extensions/filters/http/jwt_authn/extractor_test.cc`) as
    /// jwtRules: provider N is the rule of `issuerN`.
    fn example_rules() -> JwtRules {
        let header = |name: &str, prefix: &str| JwtHeader {
            name: name.into(),
            prefix: prefix.into(),
        };
        let rule = |issuer: &str| JwtRule {
            issuer: issuer.into(),
            ..JwtRule::default()
        };
        let rules = [
            rule("issuer1"),
            JwtRule {
                from_headers: vec![header("token-header", "")],
                ..rule("issuer2")
            },
            JwtRule {
                from_params: vec!["token_param".into()],
                ..rule("issuer3")
            },
            JwtRule {
                from_headers: vec![header("token-header", "")],
                from_params: vec!["token_param".into()],
                ..rule("issuer4")
            },
            JwtRule {
                from_headers: vec![header("prefix-header", "AAA")],
                ..rule("issuer5")
            },
            JwtRule {
                from_headers: vec![header("prefix-header", "AAABBB")],
                ..rule("issuer6")
            },
            JwtRule {
                from_headers: vec![header("prefix-header", "CCCDDD")],
                ..rule("issuer7")
            },
            JwtRule {
                from_headers: vec![header("prefix-header", "\"CCCDDD\"")],
                ..rule("issuer8")
            },
            JwtRule {
                from_cookies: vec!["token-cookie".into(), "token-cookie-2".into()],
                ..rule("issuer9")
            },
            JwtRule {
                from_cookies: vec!["token-cookie-3".into()],
                ..rule("issuer10")
            },
        ];
        JwtRules {
            rules: rules
                .iter()
                .map(|r| Arc::new(CompiledJwtRule::compile(r, r.issuer.clone())))
                .collect(),
            fingerprint: 0,
        }
    }

    fn header_map(headers: &[(&str, &[u8])]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                HeaderValue::from_bytes(value).expect("test header value"),
            );
        }
        map
    }

    /// The tokens `rules` find, sorted (Envoy orders them by location; the order does not
    /// matter to these rows).
    fn tokens(rules: &JwtRules, headers: &[(&str, &[u8])], query: Option<&str>) -> Vec<String> {
        let headers = header_map(headers);
        let parts = RequestParts {
            method: &Method::GET,
            headers: &headers,
            query,
        };
        let mut found: Vec<String> = rules
            .extract(&parts)
            .into_iter()
            .map(|t| t.token.into_owned())
            .collect();
        found.sort();
        found
    }

    #[test_case(&[], None, &[] ; "TestNoToken")]
    #[test_case(&[("wrong-token-header", b"jwt_token")], None, &[] ; "TestWrongHeaderToken")]
    #[test_case(&[], Some("wrong_token=jwt_token"), &[] ; "TestWrongParamToken")]
    #[test_case(&[("authorization", b"Bearer jwt_token")], None, &["jwt_token"] ; "TestDefaultHeaderLocation")]
    #[test_case(&[("authorization", b"Bearer aaa.bbb.ccc .jjjjjjjj")], None, &["aaa.bbb.ccc .jjjjjjjj"] ; "TestDefaultHeaderLocationWithValidJWTEndedWithSpaceAndMoreCharachters: the rest of the value is the token")]
    #[test_case(&[], Some("access_token=jwt_token"), &["jwt_token"] ; "TestDefaultParamLocation")]
    #[test_case(&[("token-header", b"jwt_token")], None, &["jwt_token"] ; "TestCustomHeaderToken")]
    #[test_case(&[("token-header", b"jwt_token"), ("token-header", b"foo")], None, &["foo", "jwt_token"] ; "TestDoubleCustomHeaderToken as Envoy does it since it stopped joining values: one token per value")]
    #[test_case(&[("prefix-header", b"jwt_token")], None, &[] ; "TestPrefixHeaderNotMatch")]
    #[test_case(&[("prefix-header", b"AAABBBjwt_token")], None, &["BBBjwt_token", "jwt_token"] ; "TestPrefixHeaderMatch")]
    #[test_case(&[("prefix-header", b"preamble CCCDDD=jwt_token,extra=more")], None, &["jwt_token,extra=more"] ; "TestPrefixHeaderFlexibleMatch1")]
    #[test_case(&[("prefix-header", b"CCCDDD=\"and0X3Rva2Vu\",comment=\"fish tag\"")], None, &["and0X3Rva2Vu\",comment=\"fish tag\""] ; "TestPrefixHeaderFlexibleMatch2")]
    #[test_case(&[("prefix-header", b"creds={\"authLevel\": \"20\", \"CCCDDD\": \"and0X3Rva2Vu\"}")], None, &["and0X3Rva2Vu\"}", "and0X3Rva2Vu\"}"] ; "TestPrefixHeaderFlexibleMatch3")]
    #[test_case(&[], Some("token_param=jwt_token"), &["jwt_token"] ; "TestCustomParamToken: one location for issuer3 and issuer4")]
    #[test_case(&[("cookie", b"token-cookie=token-cookie-value; token-cookie-2=token-cookie-value-2"), ("cookie", b"token-cookie-3=\"token-cookie-value-3\"")], None, &["token-cookie-value", "token-cookie-value-2", "token-cookie-value-3"] ; "TestCookieToken")]
    #[test_case(&[("token-header", b"token2"), ("authorization", b"Bearer token1"), ("prefix-header", b"AAAtoken5")], Some("token_param=token3&access_token=token4"), &["token1", "token2", "token3", "token4", "token5"] ; "TestMultipleTokens")]
    // The bug: a token present in any form is found, whatever bytes surround it.
    #[test_case(&[("authorization", b"Bearer aaa.bbb.ccc\xff")], None, &["aaa.bbb.ccc\u{FFFD}"] ; "a non-ASCII byte after the token keeps it a token")]
    #[test_case(&[("authorization", b"\xe9t\xe9 Bearer aaa.bbb.ccc")], None, &["aaa.bbb.ccc"] ; "non-ASCII bytes before the prefix")]
    #[test_case(&[("authorization", b"Token x, Bearer aaa.bbb.ccc")], None, &["aaa.bbb.ccc"] ; "the prefix is found anywhere in the value")]
    #[test_case(&[("authorization", b"bearer aaa.bbb.ccc")], None, &[] ; "the prefix is case-sensitive: lower-case bearer is not a token")]
    #[test_case(&[("authorization", b"Basic dXNlcjpwdw=="), ("authorization", b"Bearer aaa.bbb.ccc")], None, &["aaa.bbb.ccc"] ; "Basic and Bearer in two values")]
    #[test_case(&[("authorization", b"Bearer   aaa.bbb.ccc")], None, &["aaa.bbb.ccc"] ; "extractJWT skips to the first base64url character")]
    #[test_case(&[("authorization", b"Bearer ")], None, &["Bearer "] ; "extractJWT: nothing after the prefix gives the whole value")]
    #[test_case(&[("authorization", b"Bearer \xff")], None, &["Bearer \u{FFFD}"] ; "extractJWT: no base64url character after the prefix gives the whole value")]
    #[test_case(&[("authorization", b"")], None, &[] ; "an empty Authorization has no Bearer prefix")]
    #[test_case(&[("token-header", b"")], None, &[""] ; "a header location without prefix present and empty is an empty token")]
    #[test_case(&[("token-header", b"\xffjwt")], None, &["\u{FFFD}jwt"] ; "a non-ASCII value without prefix")]
    #[test_case(&[("cookie", b"a=\xff\xfe; token-cookie=aaa.bbb.ccc")], None, &["aaa.bbb.ccc"] ; "a cookie jar with a non-ASCII sibling")]
    #[test_case(&[("cookie", b"a=\xff"), ("cookie", b"token-cookie=aaa.bbb.ccc")], None, &["aaa.bbb.ccc"] ; "a non-ASCII Cookie header before the one with the token")]
    #[test_case(&[("cookie", b"token-cookie=first"), ("cookie", b"token-cookie=second")], None, &["first"] ; "parseCookies: the first cookie of a name wins")]
    #[test_case(&[("cookie", b"token-cookie=")], None, &[""] ; "a cookie present and empty is an empty token")]
    #[test_case(&[("cookie", b"token-cookie=\"\"")], None, &[""] ; "a quoted empty cookie is an empty token")]
    #[test_case(&[("cookie", b"token-cookie")], None, &[] ; "a cookie without = is malformed and skipped")]
    #[test_case(&[("cookie", b"token-cookie =x; token-cookie-2=y ")], None, &["y "] ; "forEachCookie: the name is not right-trimmed, the value is kept as it is")]
    #[test_case(&[("cookie", b"token-cookie=\"x")], None, &["\"x"] ; "a value with one quote is not unquoted")]
    #[test_case(&[], Some("access_token=aaa.bbb.ccc%FF"), &["aaa.bbb.ccc\u{FFFD}"] ; "a percent-encoded non-UTF-8 byte keeps the parameter a token")]
    #[test_case(&[], Some("access_token=a%2Eb+c%zz%4"), &["a.b+c%zz%4"] ; "PercentEncoding::decode: invalid escapes and + are kept")]
    #[test_case(&[], Some("access%5Ftoken=x"), &["x"] ; "the parameter's name is decoded too")]
    #[test_case(&[], Some("access_token=a&access_token=b"), &["a"] ; "getFirstValue: the first value")]
    #[test_case(&[], Some("access_token="), &[""] ; "a parameter present and empty is an empty token")]
    #[test_case(&[], Some("x=1&access_token"), &[""] ; "a parameter without = has an empty value")]
    #[test_case(&[], Some("access_token=%E9t%E9&"), &["\u{FFFD}t\u{FFFD}"] ; "a trailing & adds no parameter")]
    fn extraction_restates_envoy(
        headers: &[(&str, &[u8])],
        query: Option<&str>,
        expected: &[&str],
    ) {
        assert_eq!(tokens(&example_rules(), headers, query), expected);
    }

    /// `TestCookieTokenAndDefault`: a rule with a cookie does not read the default locations.
    #[test]
    fn cookie_location_replaces_the_defaults() {
        let rule = JwtRule {
            issuer: "issuer11".into(),
            from_cookies: vec!["token-cookie".into()],
            ..JwtRule::default()
        };
        let rules = JwtRules {
            rules: vec![Arc::new(CompiledJwtRule::compile(&rule, "r".into()))],
            fingerprint: 0,
        };
        let headers: &[(&str, &[u8])] = &[
            ("authorization", b"Bearer jwt_token"),
            ("cookie", b"token-cookie=\"token-cookie-value\""),
        ];
        assert_eq!(tokens(&rules, headers, None), ["token-cookie-value"]);
    }

    /// `TestExtractParam`: a rule without locations reads `Authorization: Bearer` and
    /// `access_token`; with locations, only those.
    #[test]
    fn default_and_explicit_locations() {
        let headers: &[(&str, &[u8])] = &[
            ("token-header", b"token2"),
            ("authorization", b"Bearer token1"),
            ("prefix-header", b"AAAtoken5"),
        ];
        let query = Some("token_param=token3&access_token=token4");
        let of = |rule: JwtRule| JwtRules {
            rules: vec![Arc::new(CompiledJwtRule::compile(&rule, "r".into()))],
            fingerprint: 0,
        };
        let mut rule = JwtRule {
            issuer: "foo".into(),
            ..JwtRule::default()
        };
        assert_eq!(
            tokens(&of(rule.clone()), headers, query),
            ["token1", "token4"]
        );
        rule.from_headers = vec![JwtHeader {
            name: "prefix-header".into(),
            prefix: "AAA".into(),
        }];
        rule.from_params = vec!["token_param".into()];
        assert_eq!(tokens(&of(rule), headers, query), ["token3", "token5"]);
    }

    #[test_case(&[("authorization", b"Bearer eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJpc3N1ZXIxIn0.c2ln\xff")], None, JwtError::SignatureBadBase64 ; "garbage after a header token")]
    #[test_case(&[("cookie", b"a=\xff; token-cookie=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJpc3N1ZXIxIn0.c2ln")], None, JwtError::UnknownIssuer ; "a cookie token beside a non-ASCII cookie: issuer1 does not read that cookie")]
    #[test_case(&[("cookie", b"a=\xff; token-cookie=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJpc3N1ZXI5In0.c2ln")], None, JwtError::JwksFetchFailed ; "a cookie token of issuer9 beside a non-ASCII cookie: no keys")]
    #[test_case(&[], Some("access_token=eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJpc3N1ZXIxIn0.c2ln%FF"), JwtError::SignatureBadBase64 ; "garbage after a query token")]
    #[test_case(&[], Some("access_token="), JwtError::BadFormat ; "an empty query token")]
    #[test_case(&[("token-header", b"")], None, JwtError::BadFormat ; "an empty header token")]
    fn tokens_in_any_form_are_rejected(
        headers: &[(&str, &[u8])],
        query: Option<&str>,
        expected: JwtError,
    ) {
        let headers = header_map(headers);
        let parts = RequestParts {
            method: &Method::GET,
            headers: &headers,
            query,
        };
        let outcome =
            example_rules().authenticate(&parts, &NoRemoteKeys, &TokenCache::default(), 0);
        let Outcome::Rejected { error, .. } = outcome else {
            panic!("not rejected: {outcome:?}");
        };
        assert_eq!((error, error.status()), (expected, 401));
    }

    #[test]
    fn removing_a_cookie_keeps_non_ascii_siblings() {
        let rules = example_rules();
        let mut headers = header_map(&[("cookie", b"a=\xff; token-cookie=t"), ("cookie", b"b=2")]);
        let outcome = Outcome::Authenticated(Authenticated {
            verified: Arc::new(Verified {
                auth: AuthInfo::from_claims(serde_json::Map::new(), &[]),
                exp: None,
                nbf: None,
                payload_b64: String::new(),
                generation: 0,
                rule: 8,
            }),
            rule: rules.rules[8].clone(),
            location: Location::Cookie("token-cookie".into()),
            cached: false,
            remove: vec![Location::Cookie("token-cookie".into())],
        });
        rewrite(&rules, &outcome, &mut headers, None);
        assert_eq!(headers[http::header::COOKIE].as_bytes(), b"a=\xff; b=2");
        let outcome = Outcome::Authenticated(Authenticated {
            remove: vec![Location::Param("access_token".into())],
            ..match outcome {
                Outcome::Authenticated(a) => a,
                _ => unreachable!("built above"),
            }
        });
        let query = rewrite(
            &rules,
            &outcome,
            &mut headers,
            Some("x=%FF&access%5Ftoken=t%FF&access_token&y=1"),
        );
        assert_eq!(
            query.as_deref(),
            Some("x=%FF&y=1"),
            "every value of the decoded name"
        );
    }

    /// Header bytes `HeaderValue` accepts: tab, visible ASCII and space, obs-text.
    fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(
            prop_oneof![Just(b'\t'), 0x20_u8..0x7f, 0x80_u8..=0xff],
            0..48,
        )
    }

    /// Built once: the property tests run thousands of cases.
    static EXAMPLE: std::sync::LazyLock<(JwtRules, TokenCache)> =
        std::sync::LazyLock::new(|| (example_rules(), TokenCache::default()));

    const JWT_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.";

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Whatever the bytes of headers, cookies and query, extraction, authentication and
        /// rewriting do not panic, and every present location gives its token.
        #[test]
        fn arbitrary_bytes_never_panic(
            authorization in header_bytes(),
            custom in header_bytes(),
            cookies in header_bytes(),
            query in any::<String>(),
        ) {
            let (rules, cache) = &*EXAMPLE;
            let mut headers = header_map(&[
                ("authorization", &authorization),
                ("token-header", &custom),
                ("cookie", &cookies),
            ]);
            let parts = RequestParts { method: &Method::GET, headers: &headers, query: Some(&query) };
            let found = rules.extract(&parts);
            prop_assert!(
                found.iter().any(|t| t.location == Location::Header {
                    name: HeaderName::from_static("token-header"),
                    prefix: String::new(),
                }),
                "a header location without prefix always gives a token"
            );
            let outcome = rules.authenticate(&parts, &NoRemoteKeys, cache, 0);
            prop_assert!(matches!(outcome, Outcome::Rejected { .. }), "no token here verifies");
            rewrite(rules, &outcome, &mut headers, Some(&query));
        }

        /// A value containing `Bearer ` followed by a base64url character (or `.`) always
        /// gives a token from the Authorization location, starting at that character.
        #[test]
        fn bearer_then_a_jwt_character_is_a_token(
            before in header_bytes(),
            first in prop::sample::select(JWT_CHARS),
            after in header_bytes(),
        ) {
            let mut value = before.clone();
            value.extend_from_slice(b"Bearer ");
            value.push(first);
            value.extend_from_slice(&after);
            let headers = header_map(&[("authorization", &value)]);
            let parts = RequestParts { method: &Method::GET, headers: &headers, query: None };
            let found = EXAMPLE.0.extract(&parts);
            prop_assert_eq!(found.len(), 1);
            // From the first `Bearer ` in the value (maybe one in `before`), the token starts at
            // the first base64url character and runs to the end.
            let prefix_end = value.windows(7).position(|w| w == b"Bearer ").expect("inserted") + 7;
            let start = prefix_end
                + value[prefix_end..].iter().position(|&b| is_jwt_char(b)).expect("`first` is one");
            prop_assert_eq!(&*found[0].token, &*String::from_utf8_lossy(&value[start..]));
            prop_assert!(found[0].token.len() > after.len());
        }
    }
}
