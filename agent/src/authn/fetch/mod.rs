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
//!
//! By concern: `guard` refuses forbidden targets (URLs, DNS answers, redirects); `client` is
//! the guarded HTTP client ([`Fetcher`]) that fetches and parses one document; `store` keeps
//! every source's key set fresh ([`JwksStore`]). This module holds what they share: the
//! configuration and the errors.

use std::fmt;
use std::time::Duration;

use super::jwks::JwksError;
pub use super::keys::{discovery_url, JwksSource};

mod client;
mod guard;
mod store;

pub use client::{Fetcher, Loaded};
pub use store::{JwksStore, KeyState, SourceState, SourceStatus};

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

#[cfg(test)]
mod tests {
    use super::*;

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
