//! JSON Web Key Sets: parsed once per fetch into keys ready to verify with.
//!
//! Envoy's rules (`jwt_verify_lib`): a key is a candidate for a token when its `kid` (if both
//! have a non-empty one) equals the token's, its `alg` (if it has one) equals the token's, and its type fits
//! the token's algorithm (RSA for RS*/PS*, EC P-256/P-384 for ES256/ES384, OKP Ed25519 for
//! `EdDSA`, `oct` for HS*). Keys that cannot be used are reported and left out; the rest serve.

use std::fmt;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Why a JWKS document was refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    Json(String),
    /// JSON, but no `keys` array.
    #[error("no \"keys\" array")]
    NoKeys,
    /// A `keys` array in which no key can be used.
    #[error("none of its {total} key(s) can be used: {reasons}")]
    NoUsableKey { total: usize, reasons: String },
}

/// The key types a JWK can have, as far as verification goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
    Oct,
}

impl KeyType {
    /// Whether a key of this type can verify `alg`.
    #[must_use]
    pub fn fits(self, alg: Algorithm) -> bool {
        use Algorithm as A;
        match self {
            Self::Rsa => matches!(
                alg,
                A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512
            ),
            Self::EcP256 => alg == A::ES256,
            Self::EcP384 => alg == A::ES384,
            Self::Ed25519 => alg == A::EdDSA,
            Self::Oct => matches!(alg, A::HS256 | A::HS384 | A::HS512),
        }
    }
}

/// One usable key.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The key's own `alg`, when the JWK states one.
    pub alg: Option<Algorithm>,
    pub key_type: KeyType,
    pub decoding: DecodingKey,
}

impl fmt::Debug for Key {
    // Never print key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Envoy's candidate rule for a token with `kid` and `alg`. The kids must be equal only
    /// when both are non-empty (`jwt_verify_lib` `verifyJwtWithoutTimeChecking`): a token with
    /// `"kid": ""` is tried against every key, as one without `kid` is.
    #[must_use]
    pub fn is_candidate(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        let kid_ok = match (kid, self.kid.as_deref()) {
            (Some(want), Some(have)) if !want.is_empty() && !have.is_empty() => want == have,
            _ => true,
        };
        kid_ok && self.alg.is_none_or(|a| a == alg) && self.key_type.fits(alg)
    }
}

/// A parsed key set and the keys it had to leave out.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
    /// `kid or index: reason` for each key left out.
    pub skipped: Vec<String>,
}

impl KeySet {
    /// Parses a JWKS document. Fails when it is not a key set or has no usable key.
    pub fn parse(document: &[u8]) -> Result<Self, JwksError> {
        let value: serde_json::Value =
            serde_json::from_slice(document).map_err(|e| JwksError::Json(e.to_string()))?;
        let Some(serde_json::Value::Array(entries)) = value.get("keys") else {
            return Err(JwksError::NoKeys);
        };
        let mut set = Self::default();
        for (index, entry) in entries.iter().enumerate() {
            let name = entry
                .get("kid")
                .and_then(serde_json::Value::as_str)
                .map_or_else(|| format!("key {index}"), |k| format!("kid {k:?}"));
            match parse_key(entry) {
                Ok(key) => set.keys.push(key),
                Err(why) => set.skipped.push(format!("{name}: {why}")),
            }
        }
        if set.keys.is_empty() {
            return Err(JwksError::NoUsableKey {
                total: entries.len(),
                reasons: set.skipped.join("; "),
            });
        }
        Ok(set)
    }

    /// The key ids, for operators (`/debug/state`, `nodeward check`); never key material.
    #[must_use]
    pub fn kids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.kid.clone().unwrap_or_else(|| "(no kid)".into()))
            .collect()
    }
}

fn parse_key(entry: &serde_json::Value) -> Result<Key, String> {
    if entry
        .get("use")
        .and_then(serde_json::Value::as_str)
        .is_some_and(|u| u != "sig")
    {
        return Err("\"use\" is not \"sig\"".into());
    }
    let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    let key_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyType::Rsa,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => KeyType::EcP256,
            EllipticCurve::P384 => KeyType::EcP384,
            ref other => return Err(format!("unsupported EC curve {other:?}")),
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => KeyType::Ed25519,
            ref other => return Err(format!("unsupported OKP curve {other:?}")),
        },
        AlgorithmParameters::OctetKey(_) => KeyType::Oct,
        _ => return Err("unsupported key type".into()),
    };
    let alg = match entry.get("alg").and_then(serde_json::Value::as_str) {
        None => None,
        Some(text) => Some(
            text.parse::<Algorithm>()
                .map_err(|_| format!("unsupported alg {text:?}"))?,
        ),
    };
    if let Some(alg) = alg {
        if !key_type.fits(alg) {
            return Err(format!("alg {alg:?} does not fit a {key_type:?} key"));
        }
    }
    let decoding = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key_type,
        decoding,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISTIO_JWKS: &str = include_str!("../../../testdata/istio-samples/jwks.json");

    #[test]
    fn istio_sample_jwks_parses() {
        let set = KeySet::parse(ISTIO_JWKS.as_bytes()).expect("Istio's sample JWKS");
        assert_eq!(set.kids(), ["DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ"]);
        assert_eq!(set.keys[0].key_type, KeyType::Rsa);
        assert!(set.keys[0].is_candidate(
            Some("DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ"),
            Algorithm::RS256
        ));
        assert!(
            set.keys[0].is_candidate(None, Algorithm::PS384),
            "no kid in the token: keys of a fitting type"
        );
        assert!(!set.keys[0].is_candidate(Some("other"), Algorithm::RS256));
        assert!(
            set.keys[0].is_candidate(Some(""), Algorithm::RS256),
            "an empty kid in the token matches any key (jwt_verify_lib: both must be non-empty)"
        );
        assert!(
            !set.keys[0].is_candidate(None, Algorithm::ES256),
            "the key type must fit alg"
        );
        assert!(
            !format!("{:?}", set.keys[0]).contains("AQAB"),
            "Debug never prints key material"
        );
    }

    #[test]
    fn unusable_keys_are_left_out_with_a_reason() {
        let doc = r#"{"keys":[{"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"},{"kty":"XYZ","kid":"odd"},{"kty":"oct","kid":"h","k":"c2VjcmV0","alg":"HS256"},{"kty":"oct","kid":"mismatch","k":"c2VjcmV0","alg":"RS256"}]}"#;
        let set = KeySet::parse(doc.as_bytes()).expect("one usable key");
        assert_eq!(set.kids(), ["h"]);
        assert_eq!(set.skipped.len(), 3, "{:?}", set.skipped);
        assert!(set.skipped[0].starts_with("kid \"enc\": \"use\" is not \"sig\""));
        assert!(set.skipped[2].contains("does not fit"));
    }

    #[test]
    fn malformed_documents_are_refused() {
        assert!(matches!(KeySet::parse(b"<html>"), Err(JwksError::Json(_))));
        assert_eq!(
            KeySet::parse(b"{\"kty\":\"RSA\"}").err(),
            Some(JwksError::NoKeys)
        );
        assert!(matches!(
            KeySet::parse(b"{\"keys\":[]}"),
            Err(JwksError::NoUsableKey { total: 0, .. })
        ));
    }
}
