//! Where a jwtRule's keys come from, and how the request path asks for them: the vocabulary
//! shared by the compiled rules ([`super::rules`]) and the key store that fetches remote key
//! sets ([`super::fetch`]). Neither needs the other to name a source or look one up.

use std::fmt;
use std::sync::Arc;

use reqwest::Url;

use super::jwks::KeySet;

/// Why a rule has no source of keys.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeysError {
    /// The rule has no `jwksUri` and its issuer is not an https URL to discover keys from.
    #[error(
        "issuer {issuer} has no jwksUri and is not an https URL, so its keys cannot be discovered \
         (OpenID discovery needs https://); requests with tokens from {issuer} get 401 until jwksUri or jwks is set"
    )]
    NoSource { issuer: String },
}

/// Where a rule's remote keys come from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum JwksSource {
    /// The rule's `jwksUri`.
    Uri(String),
    /// No `jwksUri`: the issuer's OIDC discovery document names the key set.
    Discovery { issuer: String },
}

impl JwksSource {
    /// The source of a rule without inline `jwks`: its `jwksUri`, else OIDC discovery when
    /// the issuer is an https URL, else an error (its tokens fail closed).
    pub fn for_rule(issuer: &str, jwks_uri: Option<&str>) -> Result<Self, KeysError> {
        if let Some(uri) = jwks_uri.filter(|u| !u.is_empty()) {
            return Ok(Self::Uri(uri.to_owned()));
        }
        match Url::parse(issuer) {
            Ok(url) if url.scheme() == "https" && url.host_str().is_some_and(|h| !h.is_empty()) => {
                Ok(Self::Discovery {
                    issuer: issuer.to_owned(),
                })
            }
            _ => Err(KeysError::NoSource {
                issuer: issuer.to_owned(),
            }),
        }
    }

    /// The key the store and the rules know the source by: the `jwksUri`, or the discovery
    /// document's URL (`<issuer>/.well-known/openid-configuration`).
    #[must_use]
    pub fn key(&self) -> String {
        match self {
            Self::Uri(uri) => uri.clone(),
            Self::Discovery { issuer } => discovery_url(issuer),
        }
    }
}

impl fmt::Display for JwksSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Uri(uri) => f.write_str(uri),
            Self::Discovery { issuer } => write!(f, "OpenID discovery of {issuer}"),
        }
    }
}

/// The OIDC discovery document's URL of an issuer.
#[must_use]
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovery_applies_only_to_https_issuers_without_jwks_uri() {
        assert_eq!(
            JwksSource::for_rule(
                "https://accounts.example.com",
                Some("https://keys.example.com/jwks")
            ),
            Ok(JwksSource::Uri("https://keys.example.com/jwks".into()))
        );
        let discovered =
            JwksSource::for_rule("https://accounts.example.com/", None).expect("https issuer");
        assert_eq!(
            discovered,
            JwksSource::Discovery {
                issuer: "https://accounts.example.com/".into()
            }
        );
        assert_eq!(
            discovered.key(),
            "https://accounts.example.com/.well-known/openid-configuration"
        );
        assert_eq!(
            JwksSource::for_rule("https://accounts.example.com", Some("")),
            Ok(JwksSource::Discovery {
                issuer: "https://accounts.example.com".into()
            })
        );
        for issuer in [
            "http://accounts.example.com",
            "testing@secure.istio.io",
            "",
            "https://",
        ] {
            let error = JwksSource::for_rule(issuer, None).expect_err(issuer);
            assert!(
                matches!(error, KeysError::NoSource { .. }),
                "{issuer}: {error:?}"
            );
        }
    }
}
