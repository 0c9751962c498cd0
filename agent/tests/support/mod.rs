//! Test support: tokens minted at test time with the keys under `testdata/`, and key sets
//! for them. Shared by the integration tests and the benchmarks (`#[path]`).
#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod node;
pub mod rawpod;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

pub fn testdata(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(path)
}

fn read(path: &str) -> Vec<u8> {
    std::fs::read(testdata(path)).unwrap_or_else(|e| panic!("reading testdata/{path}: {e}"))
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The test key for an algorithm (`istio` selects Istio's sample RSA key).
pub fn encoding_key(alg: Algorithm, istio: bool) -> EncodingKey {
    use Algorithm as A;
    match alg {
        A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512 => {
            let pem = if istio {
                read("istio-samples/key.pem")
            } else {
                read("keys/rsa2048.pem")
            };
            EncodingKey::from_rsa_pem(&pem).expect("RSA test key")
        }
        A::ES256 => EncodingKey::from_ec_pem(&read("keys/ec256.pem")).expect("P-256 test key"),
        A::ES384 => EncodingKey::from_ec_pem(&read("keys/ec384.pem")).expect("P-384 test key"),
        A::EdDSA => EncodingKey::from_ed_pem(&read("keys/ed25519.pem")).expect("Ed25519 test key"),
        A::HS256 | A::HS384 | A::HS512 => {
            let text = String::from_utf8(read("keys/hmac.txt")).expect("utf-8");
            EncodingKey::from_base64_secret(text.trim()).expect("HMAC test key")
        }
        other => panic!("no test key for {other:?}"),
    }
}

/// A JWK for the test key of `alg`, with `kid`.
pub fn jwk(alg: Algorithm, kid: &str, istio: bool) -> Jwk {
    let mut jwk =
        Jwk::from_encoding_key(&encoding_key(alg, istio), alg).expect("JWK from test key");
    jwk.common.key_id = Some(kid.to_owned());
    jwk
}

/// A JWKS document with the given keys.
pub fn jwks(keys: Vec<Jwk>) -> String {
    serde_json::to_string(&JwkSet { keys }).expect("JWKS serializes")
}

/// Signs `claims` with the test key of `alg`.
pub fn mint(alg: Algorithm, kid: Option<&str>, claims: &serde_json::Value) -> String {
    mint_with(alg, kid, claims, false)
}

pub fn mint_with(
    alg: Algorithm,
    kid: Option<&str>,
    claims: &serde_json::Value,
    istio: bool,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg, istio)).expect("token signs")
}

/// Claims with `iss`, `sub`, `exp` one hour ahead.
pub fn claims(iss: &str, sub: &str) -> serde_json::Value {
    serde_json::json!({"iss": iss, "sub": sub, "iat": now(), "exp": now() + 3600})
}
