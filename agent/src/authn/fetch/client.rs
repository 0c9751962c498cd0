//! The guarded HTTP client: fetches one JWKS or OIDC discovery document within the limits of
//! [`FetchConfig`] (address guard, size, time) and parses it, with errors that name the issuer
//! and URI.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use reqwest::Url;
use sha2::{Digest as _, Sha256};

use super::guard::{check_url, redirect_policy, GuardedResolver, Lookup, Refused, UrlProblem};
use super::{discovery_url, Document, FetchConfig, FetchError, JwksSource};
use crate::authn::jwks::KeySet;

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
    pub(super) digest: [u8; 32],
}

/// An HTTP client with the guards of [`FetchConfig`]; cheap to clone. One-shot fetches (the
/// CLI) use it directly; [`JwksStore`] uses it for its refreshes.
#[derive(Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    pub(super) config: FetchConfig,
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::IpAddr;
    use std::sync::Arc;

    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
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
}
