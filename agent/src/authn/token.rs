//! One token: split, decoded and checked in Envoy's order: format, issuer, time, audience,
//! keys, signature. A token is decoded once; the signature check is the only costly step and
//! the verified-token cache ([`super::cache`]) saves it on repeat.

use std::borrow::Cow;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use base64::engine::DecodePaddingMode;
use base64::{alphabet, Engine as _};
use jsonwebtoken::Algorithm;

use super::error::JwtError;
use super::jwks::KeySet;

/// Seconds since the Unix epoch: the clock token times are checked against.
#[must_use]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Envoy's default clock skew for `exp` and `nbf`.
pub const CLOCK_SKEW_SECS: u64 = 60;

/// base64url as `jwt_verify_lib` decodes it (absl's `WebSafeBase64Unescape`): padding optional
/// (tokens omit it; some issuers add it), and the unused low bits of the last character are
/// ignored, not required to be zero.
pub const B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// A token split and decoded, not yet verified.
#[derive(Debug, Clone)]
pub struct Decoded<'t> {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub header: serde_json::Map<String, serde_json::Value>,
    pub claims: serde_json::Map<String, serde_json::Value>,
    pub issuer: String,
    pub subject: String,
    pub audiences: Vec<String>,
    pub exp: Option<u64>,
    pub nbf: Option<u64>,
    pub iat: Option<u64>,
    /// `header.payload`: what the signature covers.
    pub signed: Cow<'t, str>,
    /// The signature in canonical base64url (the verifier below wants that spelling).
    pub signature: Cow<'t, str>,
    /// The payload as sent (base64url), for `outputPayloadToHeader`.
    pub payload_b64: &'t str,
}

fn object(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(bytes) {
        Ok(serde_json::Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// How `jwt_verify_lib` reads a field it wants as a number.
enum NumberError {
    /// Present and not a number.
    NotNumber,
    /// Negative, or at least 2^64.
    OutOfRange,
}

/// A time claim as `jwt_verify_lib`'s `StructUtils::GetUInt64` reads it: any JSON number (the
/// JSON is parsed into doubles), refused when negative or at least 2^64, else truncated
/// (`1893456000.5` -> 1893456000, `1.5e9` -> 1500000000).
fn time_claim(
    claims: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<u64>, NumberError> {
    let Some(value) = claims.get(name) else {
        return Ok(None);
    };
    let number = value.as_f64().ok_or(NumberError::NotNumber)?;
    // `u64::MAX as f64` is 2^64: the same bound as the C++ `static_cast<double>`.
    #[expect(
        clippy::cast_precision_loss,
        reason = "the bound is the double jwt_verify_lib compares with"
    )]
    let limit = u64::MAX as f64;
    if number < 0.0 || number >= limit {
        return Err(NumberError::OutOfRange);
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "in [0, 2^64): truncation is what GetUInt64's static_cast does"
    )]
    Ok(Some(number as u64))
}

/// Splits and decodes `token`; no key is involved. Sections are split at `.` with empty ones
/// skipped, as `jwt_verify_lib`'s `absl::StrSplit(jwt, '.', absl::SkipEmpty())` does: `h.p.s.`
/// and `h..p.s` are the token `h.p.s`, and the signature covers `h.p`.
pub fn decode(token: &str) -> Result<Decoded<'_>, JwtError> {
    let mut parts = token.split('.').filter(|s| !s.is_empty());
    let (Some(header_b64), Some(payload_b64), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::BadFormat);
    };
    let header_bytes = B64
        .decode(header_b64)
        .map_err(|_| JwtError::HeaderBadBase64)?;
    let header = object(&header_bytes).ok_or(JwtError::HeaderBadJson)?;
    let alg = match header.get("alg") {
        Some(serde_json::Value::String(alg)) => alg
            .parse::<Algorithm>()
            .map_err(|_| JwtError::HeaderUnsupportedAlg)?,
        _ => return Err(JwtError::HeaderBadAlg),
    };
    let kid = match header.get("kid") {
        None => None,
        Some(serde_json::Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(JwtError::HeaderBadKid),
    };
    let payload_bytes = B64
        .decode(payload_b64)
        .map_err(|_| JwtError::PayloadBadBase64)?;
    let claims = object(&payload_bytes).ok_or(JwtError::PayloadBadJson)?;
    // The payload's fields in jwt_verify_lib's order (`Jwt::parseFromString`), then the
    // signature's encoding.
    let string = |name: &str, error| match claims.get(name) {
        None => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(error),
    };
    let issuer = string("iss", JwtError::IssNotString)?;
    let subject = string("sub", JwtError::SubNotString)?;
    let time = |name, not_number, out_of_range| {
        time_claim(&claims, name).map_err(|e| match e {
            NumberError::NotNumber => not_number,
            NumberError::OutOfRange => out_of_range,
        })
    };
    let iat = time("iat", JwtError::IatNotInteger, JwtError::IatOutOfRange)?;
    let nbf = time("nbf", JwtError::NbfNotInteger, JwtError::NbfOutOfRange)?;
    // jwt_verify_lib keeps a missing `exp` as 0 and checks expiry only when it is not 0
    // (`verifyTimeConstraint`): an `exp` of 0 (or 0.5, truncated) never expires there either.
    let exp = time("exp", JwtError::ExpNotInteger, JwtError::ExpOutOfRange)?.filter(|&e| e != 0);
    string("jti", JwtError::JtiNotString)?;
    let audiences = match claims.get("aud") {
        None => Vec::new(),
        Some(serde_json::Value::String(a)) => vec![a.clone()],
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or(JwtError::AudNotString)?,
        Some(_) => return Err(JwtError::AudNotString),
    };
    let signature_bytes = B64
        .decode(signature)
        .map_err(|_| JwtError::SignatureBadBase64)?;
    let canonical = URL_SAFE_NO_PAD.encode(signature_bytes);
    let signature = if canonical == signature {
        Cow::Borrowed(signature)
    } else {
        Cow::Owned(canonical)
    };
    let adjacent = token.strip_prefix(header_b64).and_then(|rest| {
        rest.strip_prefix('.')
            .is_some_and(|rest| rest.starts_with(payload_b64))
            .then(|| &token[..header_b64.len() + 1 + payload_b64.len()])
    });
    let signed = adjacent.map_or_else(
        || Cow::Owned(format!("{header_b64}.{payload_b64}")),
        Cow::Borrowed,
    );
    Ok(Decoded {
        alg,
        kid,
        header,
        claims,
        issuer,
        subject,
        audiences,
        exp,
        nbf,
        iat,
        signed,
        signature,
        payload_b64,
    })
}

/// `exp`/`nbf` against `now` (Unix seconds) with Envoy's 60 s skew. No `exp`: never expires.
pub fn check_time(exp: Option<u64>, nbf: Option<u64>, now: u64) -> Result<(), JwtError> {
    if exp.is_some_and(|exp| now > exp.saturating_add(CLOCK_SKEW_SECS)) {
        return Err(JwtError::Expired);
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(CLOCK_SKEW_SECS)) {
        return Err(JwtError::NotYetValid);
    }
    Ok(())
}

impl Decoded<'_> {
    /// `exp`/`nbf` against `now` (Unix seconds) with Envoy's 60 s skew. No `exp`: never expires.
    pub fn check_time(&self, now: u64) -> Result<(), JwtError> {
        if self
            .exp
            .is_some_and(|exp| now > exp.saturating_add(CLOCK_SKEW_SECS))
        {
            return Err(JwtError::Expired);
        }
        if self
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(CLOCK_SKEW_SECS))
        {
            return Err(JwtError::NotYetValid);
        }
        Ok(())
    }

    /// `aud` against a rule's `audiences` (none configured: any). Compared as Envoy does, with
    /// an `http://`/`https://` scheme and a trailing `/` ignored.
    pub fn check_audience(&self, allowed: &[String]) -> Result<(), JwtError> {
        if allowed.is_empty() {
            return Ok(());
        }
        let norm = |a: &str| {
            let a = a
                .strip_prefix("https://")
                .or_else(|| a.strip_prefix("http://"))
                .unwrap_or(a);
            a.strip_suffix('/').unwrap_or(a).to_owned()
        };
        let allowed: Vec<String> = allowed.iter().map(|a| norm(a)).collect();
        if self.audiences.iter().any(|a| allowed.contains(&norm(a))) {
            Ok(())
        } else {
            Err(JwtError::AudienceNotAllowed)
        }
    }

    /// The signature against the set's candidate keys (Envoy: `kid` and `alg` must fit; none
    /// fits -> [`JwtError::KidAlgMismatch`]; some fit and none verifies ->
    /// [`JwtError::VerificationFailed`]).
    pub fn check_signature(&self, keys: &KeySet) -> Result<(), JwtError> {
        let mut tried = false;
        for key in keys
            .keys
            .iter()
            .filter(|k| k.is_candidate(self.kid.as_deref(), self.alg))
        {
            tried = true;
            if jsonwebtoken::crypto::verify(
                &self.signature,
                self.signed.as_bytes(),
                &key.decoding,
                self.alg,
            )
            .unwrap_or(false)
            {
                return Ok(());
            }
        }
        Err(if tried {
            JwtError::VerificationFailed
        } else {
            JwtError::KidAlgMismatch
        })
    }

    /// What operators may see of a token: never the token or the signature.
    #[must_use]
    pub fn describe(&self) -> String {
        format!(
            "iss={:?} sub={:?} kid={:?} alg={:?} exp={:?}",
            self.issuer,
            self.subject,
            self.kid.as_deref().unwrap_or("-"),
            self.alg,
            self.exp
        )
    }
}
