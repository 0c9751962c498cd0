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
use super::fetch::JwksSource;
use super::jwks::KeySet;
use super::token;
use crate::authz::AuthInfo;
use crate::policy::model::JwtRule;
use crate::policy::validate::parse_duration;
use crate::policy::{scope, RequestAuthentication};

/// Where a token may be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Location {
    /// A header, with a prefix (`Bearer `) stripped when present.
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

/// The answer of a key store for a source.
pub enum KeyLookup {
    Ready(Arc<KeySet>, u64),
    /// No usable keys yet, or fetching failed with no earlier good set.
    Unavailable,
}

/// Where remote key sets are looked up (the JWKS store).
pub trait Keys {
    fn lookup(&self, source: &str) -> KeyLookup;
}

/// No remote keys at all (every remote source is unavailable).
pub struct NoRemoteKeys;

impl Keys for NoRemoteKeys {
    fn lookup(&self, _: &str) -> KeyLookup {
        KeyLookup::Unavailable
    }
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

/// `name=value` pairs of a query string, percent-decoded.
fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k).as_deref() == Some(name))
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains(['%', '+']) {
        return Some(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|line| {
            line.split(';').find_map(|pair| {
                let (k, v) = pair.trim().split_once('=')?;
                (k == name).then_some(v)
            })
        })
}

impl JwtRules {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Tokens in the locations the rules read, each location once, in rule order.
    #[must_use]
    pub fn extract<'a>(&self, parts: &RequestParts<'a>) -> Vec<FoundToken<'a>> {
        let mut seen: Vec<&Location> = Vec::new();
        let mut found = Vec::new();
        for location in self.rules.iter().flat_map(|r| &r.locations) {
            if seen.contains(&location) {
                continue;
            }
            seen.push(location);
            let token: Option<Cow<'a, str>> = match location {
                Location::Header { name, prefix } => {
                    parts.headers.get_all(name).iter().find_map(|v| {
                        let v = v.to_str().ok()?.trim();
                        let rest = if prefix.is_empty() {
                            v
                        } else {
                            let head = v.get(..prefix.len())?;
                            if !head.eq_ignore_ascii_case(prefix) {
                                return None;
                            }
                            &v[prefix.len()..]
                        };
                        let rest = rest.trim();
                        (!rest.is_empty()).then_some(Cow::Borrowed(rest))
                    })
                }
                Location::Param(name) => parts
                    .query
                    .and_then(|q| query_param(q, name))
                    .filter(|t| !t.is_empty()),
                Location::Cookie(name) => cookie(parts.headers, name)
                    .filter(|t| !t.is_empty())
                    .map(Cow::Borrowed),
            };
            if let Some(token) = token {
                found.push(FoundToken {
                    token,
                    location: location.clone(),
                });
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
        let (index, rule) = readers()
            .find(|(_, r)| r.issuer == decoded.issuer)
            .or_else(|| readers().find(|(_, r)| r.issuer.is_empty()))
            .ok_or((JwtError::UnknownIssuer, None))?;
        let fail = |e| (e, Some(rule.clone()));
        decoded.check_time(now).map_err(fail)?;
        decoded.check_audience(&rule.audiences).map_err(fail)?;
        let (set, generation) =
            Self::generation(rule, keys).ok_or_else(|| fail(JwtError::JwksFetchFailed))?;
        decoded.check_signature(&set).map_err(fail)?;
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
                            percent_decode(pair.split_once('=').map_or(pair, |(k, _)| k)).as_deref()
                                != Some(name)
                        })
                        .collect::<Vec<_>>()
                        .join("&")
                });
            }
            Location::Cookie(name) => {
                let kept: Vec<String> = headers
                    .get_all(http::header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|line| line.split(';').map(str::trim))
                    .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
                    .map(str::to_owned)
                    .collect();
                headers.remove(http::header::COOKIE);
                if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
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
