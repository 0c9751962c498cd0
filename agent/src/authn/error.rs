//! Why a token was refused, with Envoy's `jwt_authn` answers (`jwt_verify_lib` `status.cc`), so a
//! client sees the same body and status as behind an Istio sidecar.

use serde::Serialize;

/// A token failure. Every variant answers 401 except [`JwtError::AudienceNotAllowed`] (403).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum JwtError {
    /// No token where one is required (`nodeward jwt verify` without a token).
    #[error("Jwt is missing")]
    Missing,
    /// Not three base64url sections separated by two dots.
    #[error("Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections")]
    BadFormat,
    /// The header section is not base64url.
    #[error("Jwt header is an invalid Base64url encoded")]
    HeaderBadBase64,
    /// The header is not a JSON object.
    #[error("Jwt header is an invalid JSON")]
    HeaderBadJson,
    /// `alg` is missing or not a string.
    #[error("Jwt header [alg] field is required and must be a string")]
    HeaderBadAlg,
    /// `alg` is `none` or an algorithm nodeward does not implement.
    #[error("Jwt header [alg] is not supported")]
    HeaderUnsupportedAlg,
    /// `kid` is present and not a string.
    #[error("Jwt header [kid] field is not a string")]
    HeaderBadKid,
    /// The payload section is not base64url.
    #[error("Jwt payload is an invalid Base64url encoded")]
    PayloadBadBase64,
    /// The payload is not a JSON object.
    #[error("Jwt payload is an invalid JSON")]
    PayloadBadJson,
    /// `iss` present and not a string.
    #[error("Jwt payload [iss] field is not a string")]
    IssNotString,
    /// `sub` present and not a string.
    #[error("Jwt payload [sub] field is not a string")]
    SubNotString,
    /// `iat` present and not a number.
    #[error("Jwt payload [iat] field is not an integer")]
    IatNotInteger,
    /// `iat` negative or at least 2^64.
    #[error("Jwt payload [iat] field is not a positive 64 bit integer")]
    IatOutOfRange,
    /// `nbf` present and not a number.
    #[error("Jwt payload [nbf] field is not an integer")]
    NbfNotInteger,
    /// `nbf` negative or at least 2^64.
    #[error("Jwt payload [nbf] field is not a positive 64 bit integer")]
    NbfOutOfRange,
    /// `exp` present and not a number.
    #[error("Jwt payload [exp] field is not an integer")]
    ExpNotInteger,
    /// `exp` negative or at least 2^64.
    #[error("Jwt payload [exp] field is not a positive 64 bit integer")]
    ExpOutOfRange,
    /// `jti` present and not a string.
    #[error("Jwt payload [jti] field is not a string")]
    JtiNotString,
    /// `aud` present and neither a string nor a list of strings.
    #[error("Jwt payload [aud] field is not a string or string list")]
    AudNotString,
    /// The signature section is not base64url.
    #[error("Jwt signature is an invalid Base64url encoded")]
    SignatureBadBase64,
    /// `exp` is more than the clock skew in the past.
    #[error("Jwt is expired")]
    Expired,
    /// `nbf` is more than the clock skew in the future.
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// No jwtRules entry of the workload has the token's issuer.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    /// `aud` shares nothing with the rule's `audiences` (403, not 401).
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    /// No key of the issuer's set fits the token's `kid` and `alg`.
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    KidAlgMismatch,
    /// The issuer has no usable keys (fetch failed or pending): fail closed.
    #[error("Jwks remote fetch is failed")]
    JwksFetchFailed,
    /// A fitting key exists and the signature does not verify with any.
    #[error("Jwt verification fails")]
    VerificationFailed,
}

impl JwtError {
    /// The HTTP status Envoy answers with.
    #[must_use]
    pub fn status(self) -> u16 {
        if self == Self::AudienceNotAllowed {
            403
        } else {
            401
        }
    }

    /// The response body: Envoy's message.
    #[must_use]
    pub fn body(self) -> String {
        self.to_string()
    }
}
