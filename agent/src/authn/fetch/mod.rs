//! Remote JSON Web Key Sets: `jwksUri` fetched over HTTP(S) (reqwest, rustls), OIDC
//! discovery for a rule that names only an https issuer, and [`JwksStore`], which keeps every
//! source's last good key set fresh for the request path.
//!
//! What the store promises (Istio's behaviour for `jwksUri`):
//! - a source is fetched when it first appears, then every [`FetchConfig::refresh_interval`]
//!   (20 minutes, Istio's default); after a failure it is retried with exponential backoff from
//!   [`FetchConfig::retry_initial`] up to [`FetchConfig::retry_max`] (at most a minute apart);
//! - a failed refresh (no answer, bad status, malformed JWKS) keeps the last good key set;
//! - fail closed: while a source has no usable keys, tokens of its issuer are refused with 401
//!   [`FETCH_FAILED_BODY`]. Keys are never invented.
//!
//! Guards on every fetch, configured by [`FetchConfig`]: link-local and cloud-metadata
//! addresses are refused (IP literals before connecting, host names by a resolver that filters
//! every DNS answer, redirect targets by the redirect policy); the body is read up to
//! `max_bytes` and no further; the whole exchange is bounded by the rule's `timeout`. Proxies
//! from the environment are not used, so the address checks see the real peer.
//!
//! Key material is never logged or shown; key ids are.

use std::collections::{BTreeSet, HashMap};
use std::error::Error as StdError;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::redirect;
use reqwest::Url;
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::jwks::{JwksError, KeySet};
pub use super::keys::{discovery_url, JwksSource};
use super::keys::{KeyLookup, Keys};

/// The body of the 401 a token gets while its issuer has no usable keys (Envoy's words).
pub const FETCH_FAILED_BODY: &str = "Jwks remote fetch is failed";

/// Istio's JWKS refresh interval (`PILOT_JWT_PUB_KEY_REFRESH_INTERVAL`).
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_mins(20);
/// Istio's default `timeout` of a jwtRule's JWKS fetch.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// First retry after a failure.
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(2);
/// Longest wait between retries after failures.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_mins(1);
/// Largest JWKS or discovery document accepted. Real key sets are a few KiB.
pub const DEFAULT_MAX_BYTES: usize = 512 * 1024;
/// Redirects followed per fetch.
pub const MAX_REDIRECTS: usize = 3;
/// No wait between two attempts is shorter than this, whatever the configuration says.
const MIN_DELAY: Duration = Duration::from_millis(10);

/// How keys are fetched and refreshed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchConfig {
    /// Time between refreshes after a successful fetch.
    pub refresh_interval: Duration,
    /// Wait before the first retry after a failure; doubled on each further failure.
    pub retry_initial: Duration,
    /// Cap of the retry wait; keep it at most a minute so a fixed server is noticed soon.
    pub retry_max: Duration,
    /// Largest document read; a longer body is refused (Content-Length or streamed count).
    pub max_bytes: usize,
    /// Time bound of a whole fetch when the rule sets no `timeout`.
    pub default_timeout: Duration,
    /// Fetch from link-local and cloud-metadata addresses too (refused by default: SSRF).
    pub allow_link_local: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            refresh_interval: DEFAULT_REFRESH_INTERVAL,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
            max_bytes: DEFAULT_MAX_BYTES,
            default_timeout: DEFAULT_TIMEOUT,
            allow_link_local: false,
        }
    }
}

impl FetchConfig {
    /// The wait before the next attempt after `consecutive_failures` failures in a row:
    /// `retry_initial`, doubled per further failure, capped at `retry_max`.
    #[must_use]
    pub fn retry_delay(&self, consecutive_failures: u32) -> Duration {
        let doublings = consecutive_failures.saturating_sub(1).min(31);
        self.retry_initial
            .saturating_mul(1 << doublings)
            .min(self.retry_max)
            .max(MIN_DELAY)
    }
}

/// Which document a fetch was for, in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// A JSON Web Key Set.
    Jwks,
    /// `<issuer>/.well-known/openid-configuration`.
    Discovery,
}

impl fmt::Display for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Jwks => "JWKS",
            Self::Discovery => "OpenID discovery document",
        })
    }
}

/// Why keys could not be fetched. Each message names the issuer and URI and says what the
/// operator can check; `issuer` may list several issuers that share the source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The URI is not an absolute http(s) URL with a host.
    #[error("{what} for issuer {issuer} cannot be fetched from {uri:?}: {reason}; requests with tokens from {issuer} get 401 until the URI is fixed")]
    BadUri {
        what: Document,
        issuer: String,
        uri: String,
        reason: String,
    },
    /// The URI, a redirect or a DNS answer points at a link-local or cloud-metadata address.
    #[error(
        "{what} for issuer {issuer} was not fetched from {uri}: {target} is {reason}, refused to protect the node \
         (allow_link_local permits it); requests with tokens from {issuer} get 401 until the keys are served elsewhere"
    )]
    Forbidden {
        what: Document,
        issuer: String,
        uri: String,
        target: String,
        reason: &'static str,
    },
    /// No complete answer within the rule's `timeout`.
    #[error(
        "{what} for issuer {issuer} could not be fetched from {uri}: no complete answer within {timeout:?} (the rule's timeout); \
         requests with tokens from {issuer} get 401 until it is"
    )]
    Timeout {
        what: Document,
        issuer: String,
        uri: String,
        timeout: Duration,
    },
    /// DNS, connection, TLS, redirect or body read failed.
    #[error("{what} for issuer {issuer} could not be fetched from {uri}: {detail}; requests with tokens from {issuer} get 401 until it is")]
    Transport {
        what: Document,
        issuer: String,
        uri: String,
        detail: String,
    },
    /// The server answered with a status other than 2xx.
    #[error("{what} for issuer {issuer} could not be fetched from {uri}: the server answered HTTP {status}; requests with tokens from {issuer} get 401 until it is")]
    Status {
        what: Document,
        issuer: String,
        uri: String,
        status: u16,
    },
    /// The body is longer than `max_bytes`.
    #[error(
        "{what} for issuer {issuer} from {uri} was refused: longer than {limit} bytes (max_bytes); \
         requests with tokens from {issuer} get 401 until it is fetched"
    )]
    TooLarge {
        what: Document,
        issuer: String,
        uri: String,
        limit: usize,
    },
    /// The body is not a key set with a usable key; the last good keys stay in use.
    #[error(
        "JWKS for issuer {issuer} from {uri} is malformed: {source}; the last good keys, if any, stay in use, \
         and requests with tokens from {issuer} get 401 while there are none"
    )]
    Malformed {
        issuer: String,
        uri: String,
        #[source]
        source: JwksError,
    },
    /// The discovery document is not JSON or has no `jwks_uri` string.
    #[error(
        "OpenID discovery document for issuer {issuer} at {uri} is unusable: {reason}; \
         requests with tokens from {issuer} get 401 until it names a jwks_uri (or the rule sets jwksUri)"
    )]
    Discovery {
        issuer: String,
        uri: String,
        reason: String,
    },
    /// The HTTP client could not be built (TLS set-up); nothing can be fetched.
    #[error("the HTTP client for fetching JWKS could not be built: {detail}; every issuer without inline jwks gets 401")]
    Client { detail: String },
}

impl FetchError {
    /// The key set's URI when the failure was fetching or parsing a key set (not discovery).
    fn jwks_uri(&self) -> Option<&str> {
        match self {
            Self::BadUri {
                what: Document::Jwks,
                uri,
                ..
            }
            | Self::Forbidden {
                what: Document::Jwks,
                uri,
                ..
            }
            | Self::Timeout {
                what: Document::Jwks,
                uri,
                ..
            }
            | Self::Transport {
                what: Document::Jwks,
                uri,
                ..
            }
            | Self::Status {
                what: Document::Jwks,
                uri,
                ..
            }
            | Self::TooLarge {
                what: Document::Jwks,
                uri,
                ..
            }
            | Self::Malformed { uri, .. } => Some(uri),
            _ => None,
        }
    }

    /// The URI the failed fetch was for, if it got that far.
    #[must_use]
    pub fn uri(&self) -> Option<&str> {
        match self {
            Self::Client { .. } => None,
            Self::BadUri { uri, .. }
            | Self::Forbidden { uri, .. }
            | Self::Timeout { uri, .. }
            | Self::Transport { uri, .. }
            | Self::Status { uri, .. }
            | Self::TooLarge { uri, .. }
            | Self::Malformed { uri, .. }
            | Self::Discovery { uri, .. } => Some(uri),
        }
    }
}

/// Why an address or host is refused, when it is.
fn forbidden_ip(ip: IpAddr) -> Option<&'static str> {
    const METADATA: &str = "a cloud metadata address";
    const LINK_LOCAL: &str = "a link-local address";
    let v4 = match ip.to_canonical() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => {
            if v6 == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
                return Some(METADATA);
            }
            if v6.is_unicast_link_local() {
                return Some(LINK_LOCAL);
            }
            // NAT64 (RFC 6052 well-known prefix) reaches the embedded IPv4 address.
            let s = v6.segments();
            (s[..6] == [0x64, 0xff9b, 0, 0, 0, 0])
                .then(|| Ipv4Addr::from(u32::from(s[6]) << 16 | u32::from(s[7])))
        }
    };
    let v4 = v4?;
    // AWS, GCP, Azure, OpenStack and others; Alibaba Cloud.
    if v4 == Ipv4Addr::new(169, 254, 169, 254) || v4 == Ipv4Addr::new(100, 100, 100, 200) {
        Some(METADATA)
    } else if v4.is_link_local() {
        Some(LINK_LOCAL)
    } else {
        None
    }
}

fn forbidden_name(host: &str) -> Option<&'static str> {
    host.trim_end_matches('.')
        .eq_ignore_ascii_case("metadata.google.internal")
        .then_some("the cloud metadata host name")
}

/// A refused target; carried through reqwest's error chain from the resolver and the
/// redirect policy, and found again by [`Fetcher`].
#[derive(Debug)]
struct Refused {
    target: String,
    reason: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is {}", self.target, self.reason)
    }
}

impl StdError for Refused {}

/// Why a URL cannot be fetched before any connection is made.
enum UrlProblem {
    Bad(String),
    Refused(Refused),
}

/// Scheme and host checks; IP literals are checked here because the connector does not ask
/// the resolver about them.
fn check_url(url: &Url, allow_link_local: bool) -> Result<(), UrlProblem> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlProblem::Bad(format!(
            "scheme {:?} is not http or https",
            url.scheme()
        )));
    }
    let host = match url.host_str() {
        Some(host) if !host.is_empty() => host,
        _ => return Err(UrlProblem::Bad("no host".into())),
    };
    if allow_link_local {
        return Ok(());
    }
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let reason = match literal.parse::<IpAddr>() {
        Ok(ip) => forbidden_ip(ip),
        Err(_) => forbidden_name(host),
    };
    match reason {
        Some(reason) => Err(UrlProblem::Refused(Refused {
            target: host.to_owned(),
            reason,
        })),
        None => Ok(()),
    }
}

/// Keeps forbidden addresses out of DNS answers, on every connection.
struct GuardedResolver {
    allow_link_local: bool,
    lookup: Lookup,
}

enum Lookup {
    /// The system resolver (tokio's `lookup_host`).
    System,
    /// Fixed answers, for tests of the guard that must not touch the network.
    #[cfg(test)]
    Fixed(Arc<HashMap<String, Vec<IpAddr>>>),
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_owned();
        let allow = self.allow_link_local;
        let answers: Option<Vec<IpAddr>> = match &self.lookup {
            Lookup::System => None,
            #[cfg(test)]
            Lookup::Fixed(fixed) => Some(fixed.get(&host).cloned().unwrap_or_default()),
        };
        Box::pin(async move {
            if let Some(reason) = forbidden_name(&host).filter(|_| !allow) {
                return Err(Box::new(Refused {
                    target: host,
                    reason,
                }) as Box<dyn StdError + Send + Sync>);
            }
            let addrs: Vec<SocketAddr> = match answers {
                Some(ips) => ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect(),
                None => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let allowed = filter_addrs(&host, addrs, allow)?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The answers that may be connected to; an error naming a refused one when none is left.
fn filter_addrs(
    host: &str,
    addrs: Vec<SocketAddr>,
    allow_link_local: bool,
) -> Result<Vec<SocketAddr>, Box<dyn StdError + Send + Sync>> {
    if allow_link_local {
        return Ok(addrs);
    }
    let mut refused = None;
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|addr| match forbidden_ip(addr.ip()) {
            Some(reason) => {
                refused.get_or_insert(Refused {
                    target: format!("{host} ({})", addr.ip()),
                    reason,
                });
                false
            }
            None => true,
        })
        .collect();
    match (allowed.is_empty(), refused) {
        (true, Some(refused)) => Err(Box::new(refused)),
        (true, None) => Err(format!("{host} has no addresses").into()),
        (false, _) => Ok(allowed),
    }
}

/// A redirect policy that re-checks every target and refuses https-to-http downgrades.
fn redirect_policy(allow_link_local: bool) -> redirect::Policy {
    redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        if attempt
            .previous()
            .last()
            .is_some_and(|from| from.scheme() == "https")
            && attempt.url().scheme() != "https"
        {
            let message = format!("redirect from https to {} refused", attempt.url());
            return attempt.error(message);
        }
        match check_url(attempt.url(), allow_link_local) {
            Ok(()) => attempt.follow(),
            Err(UrlProblem::Bad(reason)) => {
                let message = format!("redirect to {}: {reason}", attempt.url());
                attempt.error(message)
            }
            Err(UrlProblem::Refused(refused)) => attempt.error(refused),
        }
    })
}

/// What the error messages of one fetch name.
struct Target<'a> {
    what: Document,
    issuer: &'a str,
    uri: &'a str,
}

impl Target<'_> {
    fn bad_uri(&self, reason: String) -> FetchError {
        FetchError::BadUri {
            what: self.what,
            issuer: self.issuer.to_owned(),
            uri: self.uri.to_owned(),
            reason,
        }
    }

    fn refused(&self, refused: &Refused) -> FetchError {
        FetchError::Forbidden {
            what: self.what,
            issuer: self.issuer.to_owned(),
            uri: self.uri.to_owned(),
            target: refused.target.clone(),
            reason: refused.reason,
        }
    }

    fn timeout(&self, timeout: Duration) -> FetchError {
        FetchError::Timeout {
            what: self.what,
            issuer: self.issuer.to_owned(),
            uri: self.uri.to_owned(),
            timeout,
        }
    }

    fn too_large(&self, limit: usize) -> FetchError {
        FetchError::TooLarge {
            what: self.what,
            issuer: self.issuer.to_owned(),
            uri: self.uri.to_owned(),
            limit,
        }
    }

    fn status(&self, status: u16) -> FetchError {
        FetchError::Status {
            what: self.what,
            issuer: self.issuer.to_owned(),
            uri: self.uri.to_owned(),
            status,
        }
    }

    /// A reqwest error: a refusal from the resolver or redirect policy, a timeout, or the
    /// transport failure with its causes.
    fn request(&self, error: reqwest::Error, timeout: Duration) -> FetchError {
        let error = error.without_url();
        let mut cause: Option<&(dyn StdError + 'static)> = Some(&error);
        while let Some(e) = cause {
            if let Some(refused) = e.downcast_ref::<Refused>() {
                return self.refused(refused);
            }
            cause = e.source();
        }
        if error.is_timeout() {
            return self.timeout(timeout);
        }
        let mut detail = error.to_string();
        let mut cause = error.source();
        while let Some(e) = cause {
            let text = e.to_string();
            if !detail.contains(&text) {
                detail.push_str(": ");
                detail.push_str(&text);
            }
            cause = e.source();
        }
        FetchError::Transport {
            what: self.what,
            issuer: self.issuer.to_owned(),
            uri: self.uri.to_owned(),
            detail,
        }
    }
}

/// Keys fetched from a source.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The JWKS URI (the discovered one for discovery).
    pub uri: String,
    pub keys: KeySet,
    /// SHA-256 of the document, to tell a changed key set from a refetch of the same one.
    digest: [u8; 32],
}

/// An HTTP client with the guards of [`FetchConfig`]; cheap to clone. One-shot fetches (the
/// CLI) use it directly; [`JwksStore`] uses it for its refreshes.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    config: FetchConfig,
}

impl fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fetcher")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A client with the SSRF guard (resolver and redirect policy), no proxies, HTTP/1.1.
    pub fn new(config: FetchConfig) -> Result<Self, FetchError> {
        Self::build(config, Lookup::System)
    }

    fn build(config: FetchConfig, lookup: Lookup) -> Result<Self, FetchError> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("nodeward/", env!("CARGO_PKG_VERSION")))
            .no_proxy()
            .redirect(redirect_policy(config.allow_link_local))
            .dns_resolver(GuardedResolver {
                allow_link_local: config.allow_link_local,
                lookup,
            })
            .build()
            .map_err(|e| FetchError::Client {
                detail: e.to_string(),
            })?;
        Ok(Self { client, config })
    }

    /// The configuration the client was built with.
    #[must_use]
    pub fn config(&self) -> &FetchConfig {
        &self.config
    }

    /// Fetches and parses the key set at `uri`. `timeout` is the rule's (`None`: the default)
    /// and bounds the whole exchange.
    pub async fn fetch_keys(
        &self,
        issuer: &str,
        uri: &str,
        timeout: Option<Duration>,
    ) -> Result<KeySet, FetchError> {
        self.fetch_jwks(issuer, uri, timeout)
            .await
            .map(|loaded| loaded.keys)
    }

    /// Reads `jwks_uri` from the issuer's OIDC discovery document. Does not insist on https
    /// (that is [`JwksSource::for_rule`]'s decision), so tests can serve it on loopback.
    pub async fn discover(
        &self,
        issuer: &str,
        timeout: Option<Duration>,
    ) -> Result<String, FetchError> {
        let uri = discovery_url(issuer);
        let target = Target {
            what: Document::Discovery,
            issuer,
            uri: &uri,
        };
        let body = self.get(&target, timeout).await?;
        let discovery_error = |reason: String| FetchError::Discovery {
            issuer: issuer.to_owned(),
            uri: uri.clone(),
            reason,
        };
        let document: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| discovery_error(format!("not JSON: {e}")))?;
        match document.get("jwks_uri").and_then(serde_json::Value::as_str) {
            Some(jwks_uri) if !jwks_uri.is_empty() => Ok(jwks_uri.to_owned()),
            _ => Err(discovery_error("no \"jwks_uri\" string".into())),
        }
    }

    /// The keys of a source: discovery first when it is one, then the key set.
    pub async fn load(
        &self,
        source: &JwksSource,
        issuer: &str,
        timeout: Option<Duration>,
    ) -> Result<Loaded, FetchError> {
        match source {
            JwksSource::Uri(uri) => self.fetch_jwks(issuer, uri, timeout).await,
            JwksSource::Discovery {
                issuer: discovered_issuer,
            } => {
                let uri = self.discover(discovered_issuer, timeout).await?;
                self.fetch_jwks(issuer, &uri, timeout).await
            }
        }
    }

    async fn fetch_jwks(
        &self,
        issuer: &str,
        uri: &str,
        timeout: Option<Duration>,
    ) -> Result<Loaded, FetchError> {
        let target = Target {
            what: Document::Jwks,
            issuer,
            uri,
        };
        let body = self.get(&target, timeout).await?;
        let keys = KeySet::parse(&body).map_err(|source| FetchError::Malformed {
            issuer: issuer.to_owned(),
            uri: uri.to_owned(),
            source,
        })?;
        Ok(Loaded {
            uri: uri.to_owned(),
            keys,
            digest: Sha256::digest(&body).into(),
        })
    }

    /// GET with the address checks, the size bound and the time bound.
    async fn get(
        &self,
        target: &Target<'_>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>, FetchError> {
        let timeout = timeout.unwrap_or(self.config.default_timeout);
        let url = Url::parse(target.uri).map_err(|e| target.bad_uri(e.to_string()))?;
        match check_url(&url, self.config.allow_link_local) {
            Ok(()) => {}
            Err(UrlProblem::Bad(reason)) => return Err(target.bad_uri(reason)),
            Err(UrlProblem::Refused(refused)) => return Err(target.refused(&refused)),
        }
        let limit = self.config.max_bytes;
        let exchange = async {
            let mut response = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| target.request(e, timeout))?;
            let status = response.status();
            if !status.is_success() {
                return Err(target.status(status.as_u16()));
            }
            if response
                .content_length()
                .is_some_and(|length| length > limit as u64)
            {
                return Err(target.too_large(limit));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| target.request(e, timeout))?
            {
                if body.len() + chunk.len() > limit {
                    return Err(target.too_large(limit));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| Err(target.timeout(timeout)))
    }
}

/// What the request path gets for a source.
#[derive(Debug, Clone)]
pub enum KeyState {
    /// The source is not in the store (not configured): fail closed.
    Unknown,
    /// No attempt has completed yet: fail closed.
    Pending,
    /// The last good key set (also while later refreshes fail). `generation` changes whenever
    /// the key set does, store-wide, so caches of verified tokens can tell old entries.
    Ready { keys: Arc<KeySet>, generation: u64 },
    /// Every attempt so far failed; the latest error, for messages.
    Failed { error: Arc<str> },
}

impl KeyState {
    /// The keys, when there are any.
    #[must_use]
    pub fn usable(&self) -> Option<&Arc<KeySet>> {
        match self {
            Self::Ready { keys, .. } => Some(keys),
            _ => None,
        }
    }
}

/// A source's condition, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// No attempt has completed.
    Pending,
    /// Keys, and the latest attempt succeeded.
    Ready,
    /// Keys from an earlier fetch; the latest attempt failed.
    Stale,
    /// No keys; every attempt failed.
    Failed,
}

impl SourceState {
    /// `pending`, `ready`, `stale` or `failed`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Stale => "stale",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for SourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One source, for `/debug/state`, readiness and `nodeward` commands. No key material.
#[derive(Debug, Clone)]
pub struct SourceStatus {
    /// The store key ([`JwksSource::key`]).
    pub key: String,
    pub source: JwksSource,
    /// The issuers using the source, comma separated.
    pub issuer: String,
    /// The JWKS URI (for discovery: the discovered one, once known).
    pub uri: Option<String>,
    pub state: SourceState,
    pub kids: Vec<String>,
    pub generation: Option<u64>,
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// Attempts completed.
    pub fetches: u64,
    /// Attempts failed.
    pub failures: u64,
    pub consecutive_failures: u32,
    pub next_attempt: Option<SystemTime>,
}

/// The key set in use for a source.
struct Current {
    keys: Arc<KeySet>,
    generation: u64,
    digest: [u8; 32],
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    uri: Option<String>,
    fetches: u64,
    failures: u64,
    consecutive_failures: u32,
    last_success: Option<SystemTime>,
    last_error: Option<(SystemTime, Arc<str>)>,
    next_attempt: Option<SystemTime>,
}

/// How a source is fetched; updated in place when the rules change.
#[derive(Clone, PartialEq, Eq)]
struct Params {
    issuer: String,
    timeout: Duration,
}

struct Entry {
    source: JwksSource,
    params: Mutex<Params>,
    state: RwLock<State>,
}

struct Running {
    entry: Arc<Entry>,
    task: JoinHandle<()>,
}

/// What refresh tasks share with the store (not the store itself: dropping the store stops them).
struct Shared {
    generation: AtomicU64,
    /// Bumped after every attempt and every change of sources, for waiters.
    changed: watch::Sender<u64>,
}

struct Inner {
    fetcher: Fetcher,
    shared: Arc<Shared>,
    sources: RwLock<HashMap<String, Running>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for running in write(&self.sources).values() {
            running.task.abort();
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Every remote key source, each refreshed by its own task. Cheap to clone; the request path
/// reads it without awaiting. Dropping the last clone stops the refresh tasks.
#[derive(Clone)]
pub struct JwksStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for JwksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksStore")
            .field("sources", &read(&self.inner.sources).len())
            .finish_non_exhaustive()
    }
}

impl JwksStore {
    /// An empty store.
    pub fn new(config: FetchConfig) -> Result<Self, FetchError> {
        Ok(Self::with_fetcher(Fetcher::new(config)?))
    }

    /// An empty store fetching with `fetcher`.
    #[must_use]
    pub fn with_fetcher(fetcher: Fetcher) -> Self {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            changed,
        });
        Self {
            inner: Arc::new(Inner {
                fetcher,
                shared,
                sources: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// The client the store fetches with, for one-shot fetches.
    #[must_use]
    pub fn fetcher(&self) -> &Fetcher {
        &self.inner.fetcher
    }

    /// Makes the store fetch exactly these sources, given as (source, the rule's `timeout`,
    /// issuer). A new source gets a refresh task that fetches at once; a source no longer
    /// given is dropped and its task stopped; a source already present is left alone (not
    /// refetched), only its timeout and issuers updated. Sources given more than once are
    /// fetched once, with the longest timeout.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the refresh tasks).
    pub fn set_sources<I>(&self, sources: I)
    where
        I: IntoIterator<Item = (JwksSource, Option<Duration>, String)>,
    {
        let default_timeout = self.inner.fetcher.config.default_timeout;
        let mut wanted: HashMap<String, (JwksSource, BTreeSet<String>, Duration)> = HashMap::new();
        for (source, timeout, issuer) in sources {
            let timeout = timeout.unwrap_or(default_timeout);
            let slot = wanted
                .entry(source.key())
                .or_insert_with(|| (source, BTreeSet::new(), timeout));
            slot.1.insert(issuer);
            slot.2 = slot.2.max(timeout);
        }
        let mut running = write(&self.inner.sources);
        running.retain(|key, source| {
            let keep = wanted.contains_key(key);
            if !keep {
                source.task.abort();
                tracing::info!(source = %source.entry.source, "JWKS source no longer used; stopped refreshing it");
            }
            keep
        });
        for (key, (source, issuers, timeout)) in wanted {
            let params = Params {
                issuer: issuers.into_iter().collect::<Vec<_>>().join(", "),
                timeout,
            };
            if let Some(existing) = running.get(&key) {
                *existing
                    .entry
                    .params
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = params;
                continue;
            }
            let entry = Arc::new(Entry {
                source,
                params: Mutex::new(params),
                state: RwLock::new(State::default()),
            });
            let span = tracing::info_span!("jwks", source = %entry.source);
            let task = tokio::spawn(
                refresh(
                    self.inner.fetcher.clone(),
                    Arc::clone(&self.inner.shared),
                    Arc::clone(&entry),
                )
                .instrument(span),
            );
            running.insert(key, Running { entry, task });
        }
        drop(running);
        self.inner
            .shared
            .changed
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The keys of the source with this key ([`JwksSource::key`]). No await, no allocation
    /// when keys are ready.
    #[must_use]
    pub fn keys(&self, key: &str) -> KeyState {
        let sources = read(&self.inner.sources);
        let Some(running) = sources.get(key) else {
            return KeyState::Unknown;
        };
        let state = read(&running.entry.state);
        match (&state.current, &state.last_error) {
            (Some(current), _) => KeyState::Ready {
                keys: Arc::clone(&current.keys),
                generation: current.generation,
            },
            (None, Some((_, error))) if state.fetches > 0 => KeyState::Failed {
                error: Arc::clone(error),
            },
            (None, _) => KeyState::Pending,
        }
    }

    /// Every source, sorted by key.
    #[must_use]
    pub fn status(&self) -> Vec<SourceStatus> {
        let sources = read(&self.inner.sources);
        let mut all: Vec<SourceStatus> = sources
            .iter()
            .map(|(key, running)| {
                let issuer = running
                    .entry
                    .params
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .issuer
                    .clone();
                let state = read(&running.entry.state);
                let word = match (&state.current, state.fetches, state.consecutive_failures) {
                    (_, 0, _) => SourceState::Pending,
                    (Some(_), _, 0) => SourceState::Ready,
                    (Some(_), _, _) => SourceState::Stale,
                    (None, _, _) => SourceState::Failed,
                };
                SourceStatus {
                    key: key.clone(),
                    source: running.entry.source.clone(),
                    issuer,
                    uri: state.uri.clone(),
                    state: word,
                    kids: state
                        .current
                        .as_ref()
                        .map(|c| c.keys.kids())
                        .unwrap_or_default(),
                    generation: state.current.as_ref().map(|c| c.generation),
                    last_success: state.last_success,
                    last_error: state.last_error.as_ref().map(|(_, e)| e.to_string()),
                    last_error_at: state.last_error.as_ref().map(|(at, _)| *at),
                    fetches: state.fetches,
                    failures: state.failures,
                    consecutive_failures: state.consecutive_failures,
                    next_attempt: state.next_attempt,
                }
            })
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    /// Whether every source has keys or a definitive answer (at least one completed attempt).
    /// True with no sources.
    #[must_use]
    pub fn ready(&self) -> bool {
        read(&self.inner.sources).values().all(|running| {
            let state = read(&running.entry.state);
            state.current.is_some() || state.fetches > 0
        })
    }

    /// Waits until [`JwksStore::ready`], at most `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, Self::ready).await
    }

    /// Waits until `condition` holds, checking it after every attempt and change of sources,
    /// at most `timeout`; returns whether it holds.
    pub async fn wait_until(&self, timeout: Duration, condition: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.shared.changed.subscribe();
        loop {
            if condition(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return condition(self),
            }
        }
    }
}

impl Keys for JwksStore {
    fn lookup(&self, source: &str) -> KeyLookup {
        match self.keys(source) {
            KeyState::Ready { keys, generation } => KeyLookup::Ready(keys, generation),
            KeyState::Unknown | KeyState::Pending | KeyState::Failed { .. } => {
                KeyLookup::Unavailable
            }
        }
    }
}

/// A source's refresh task: fetch, record, wait (refresh interval or backoff), forever.
async fn refresh(fetcher: Fetcher, shared: Arc<Shared>, entry: Arc<Entry>) {
    loop {
        let params = entry
            .params
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let result = fetcher
            .load(&entry.source, &params.issuer, Some(params.timeout))
            .await;
        let delay = record(&entry, &shared, fetcher.config(), &params.issuer, result);
        shared.changed.send_modify(|n| *n = n.wrapping_add(1));
        tokio::time::sleep(delay).await;
    }
}

/// Records an attempt's outcome, logs it, and says how long to wait before the next.
fn record(
    entry: &Entry,
    shared: &Shared,
    config: &FetchConfig,
    issuer: &str,
    result: Result<Loaded, FetchError>,
) -> Duration {
    let now = SystemTime::now();
    let mut state = write(&entry.state);
    state.fetches += 1;
    match result {
        Ok(loaded) => {
            let delay = config.refresh_interval.max(MIN_DELAY);
            state.consecutive_failures = 0;
            state.last_success = Some(now);
            state.next_attempt = Some(now + delay);
            state.uri = Some(loaded.uri.clone());
            let unchanged = state
                .current
                .as_ref()
                .is_some_and(|c| c.digest == loaded.digest);
            if unchanged {
                drop(state);
                tracing::debug!(%issuer, uri = %loaded.uri, "JWKS refreshed, unchanged");
            } else {
                let kids = loaded.keys.kids();
                let skipped = loaded.keys.skipped.clone();
                let generation = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
                let replaced = state
                    .current
                    .replace(Current {
                        keys: Arc::new(loaded.keys),
                        generation,
                        digest: loaded.digest,
                    })
                    .is_some();
                drop(state);
                tracing::info!(%issuer, uri = %loaded.uri, ?kids, count = kids.len(), generation, replaced, "JWKS loaded");
                if !skipped.is_empty() {
                    tracing::warn!(%issuer, uri = %loaded.uri, ?skipped, "JWKS keys left out (unusable)");
                }
            }
            delay
        }
        Err(error) => {
            state.failures += 1;
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            let delay = config.retry_delay(state.consecutive_failures);
            state.next_attempt = Some(now + delay);
            if let Some(uri) = error.jwks_uri() {
                // For discovery: the discovered URI, even when its key set failed.
                state.uri = Some(uri.to_owned());
            }
            let message = error.to_string();
            state.last_error = Some((now, Arc::from(message.as_str())));
            let keeping = state.current.as_ref().map(|c| c.generation);
            let consecutive = state.consecutive_failures;
            drop(state);
            match keeping {
                Some(generation) => {
                    tracing::warn!(error = %message, retry_in = ?delay, consecutive, kept_generation = generation, "JWKS refresh failed; keeping the last good keys");
                }
                None => {
                    tracing::warn!(error = %message, retry_in = ?delay, consecutive, "JWKS fetch failed; no keys for this source");
                }
            }
            delay
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn link_local_and_metadata_addresses_are_refused() {
        for (address, reason) in [
            ("169.254.169.254", Some("a cloud metadata address")),
            ("100.100.100.200", Some("a cloud metadata address")),
            ("fd00:ec2::254", Some("a cloud metadata address")),
            ("::ffff:169.254.169.254", Some("a cloud metadata address")),
            ("64:ff9b::a9fe:a9fe", Some("a cloud metadata address")),
            ("169.254.0.1", Some("a link-local address")),
            ("169.254.255.255", Some("a link-local address")),
            ("fe80::1", Some("a link-local address")),
            ("febf::1", Some("a link-local address")),
            ("127.0.0.1", None),
            ("::1", None),
            ("10.0.0.1", None),
            ("169.253.255.255", None),
            ("169.255.0.0", None),
            ("fec0::1", None),
            ("2001:db8::1", None),
            ("100.100.100.201", None),
        ] {
            assert_eq!(forbidden_ip(ip(address)), reason, "{address}");
        }
    }

    #[test]
    fn urls_are_checked_before_connecting() {
        let check = |uri: &str, allow| check_url(&Url::parse(uri).expect("test URL"), allow);
        for refused in [
            "http://169.254.169.254/latest",
            "http://[fe80::1]:8080/",
            "http://[::ffff:a9fe:a9fe]/",
            "https://metadata.google.internal/computeMetadata/v1/",
            "http://METADATA.google.internal./",
            // The URL parser normalizes other IPv4 spellings.
            "http://2852039166/",
            "http://0xa9.0xfe.0xa9.0xfe/",
        ] {
            assert!(
                matches!(check(refused, false), Err(UrlProblem::Refused(_))),
                "{refused}"
            );
            assert!(
                check(refused, true).is_ok(),
                "allow_link_local permits {refused}"
            );
        }
        for allowed in [
            "http://127.0.0.1:1234/jwks",
            "https://[::1]/",
            "https://example.com/.well-known/jwks.json",
        ] {
            assert!(check(allowed, false).is_ok(), "{allowed}");
        }
        for bad in ["file:///etc/passwd", "ftp://example.com/jwks"] {
            assert!(
                matches!(check(bad, false), Err(UrlProblem::Bad(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn dns_answers_are_filtered() {
        let addrs = |list: &[&str]| {
            list.iter()
                .map(|a| SocketAddr::new(ip(a), 0))
                .collect::<Vec<_>>()
        };
        let kept = filter_addrs(
            "mixed.test",
            addrs(&["169.254.169.254", "127.0.0.1", "fe80::2"]),
            false,
        )
        .expect("one left");
        assert_eq!(kept, addrs(&["127.0.0.1"]));
        let error =
            filter_addrs("evil.test", addrs(&["169.254.169.254"]), false).expect_err("none left");
        assert_eq!(
            error.to_string(),
            "evil.test (169.254.169.254) is a cloud metadata address"
        );
        assert!(filter_addrs("empty.test", Vec::new(), false).is_err());
        assert_eq!(
            filter_addrs("evil.test", addrs(&["169.254.1.1"]), true)
                .expect("allowed")
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn names_resolving_to_forbidden_addresses_are_refused_without_connecting() {
        let fixed = HashMap::from([("evil.test".to_owned(), vec![ip("169.254.169.254")])]);
        let fetcher =
            Fetcher::build(FetchConfig::default(), Lookup::Fixed(Arc::new(fixed))).expect("client");
        let error = fetcher
            .fetch_keys("https://issuer.test", "http://evil.test:8080/jwks", None)
            .await
            .expect_err("refused");
        match &error {
            FetchError::Forbidden {
                target,
                reason,
                uri,
                issuer,
                ..
            } => {
                assert_eq!(target, "evil.test (169.254.169.254)");
                assert_eq!(*reason, "a cloud metadata address");
                assert_eq!(uri, "http://evil.test:8080/jwks");
                assert_eq!(issuer, "https://issuer.test");
            }
            other => panic!("expected Forbidden, got {other:?}"),
        }
        let message = error.to_string();
        assert!(
            message.contains("https://issuer.test")
                && message.contains("http://evil.test:8080/jwks"),
            "{message}"
        );
    }

    #[test]
    fn backoff_doubles_from_the_first_retry_up_to_the_cap() {
        let config = FetchConfig::default();
        let seconds: Vec<u64> = (1..=9).map(|n| config.retry_delay(n).as_secs()).collect();
        assert_eq!(seconds, [2, 4, 8, 16, 32, 60, 60, 60, 60]);
        assert!(
            config.retry_delay(1) <= Duration::from_mins(1),
            "first retry within a minute"
        );
        assert_eq!(
            config.retry_delay(u32::MAX),
            Duration::from_mins(1),
            "no overflow"
        );
        let zero = FetchConfig {
            retry_initial: Duration::ZERO,
            ..config
        };
        assert_eq!(zero.retry_delay(1), MIN_DELAY, "never a busy loop");
        let short = FetchConfig {
            retry_initial: Duration::from_millis(50),
            retry_max: Duration::from_millis(120),
            ..config
        };
        assert_eq!(short.retry_delay(1), Duration::from_millis(50));
        assert_eq!(short.retry_delay(2), Duration::from_millis(100));
        assert_eq!(short.retry_delay(3), Duration::from_millis(120));
    }

    #[test]
    fn defaults_follow_istio() {
        let config = FetchConfig::default();
        assert_eq!(config.refresh_interval, Duration::from_mins(20));
        assert_eq!(config.default_timeout, Duration::from_secs(5));
        assert!(!config.allow_link_local);
        assert!(config.retry_max <= Duration::from_mins(1));
    }
}
