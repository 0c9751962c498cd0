//! JWT authentication: Istio RequestAuthentication as Envoy's `jwt_authn` enforces it.
//!
//! [`rules::AuthnSet`] compiles RequestAuthentications and picks the merged jwtRules of a
//! workload; [`rules::JwtRules::authenticate`] finds tokens, decodes them ([`token`]), checks
//! issuer, time, audience and signature against key sets ([`jwks`], inline or fetched by
//! [`fetch`], named and looked up through [`keys`]) and remembers verified tokens ([`cache`]).
//! A verified token gives the request an [`AuthInfo`] ([`identity`]), which authorization
//! reads. Failures carry Envoy's answers ([`error`]).

pub mod cache;
pub mod error;
pub mod fetch;
pub mod identity;
pub mod jwks;
pub mod keys;
pub mod rules;
pub mod token;

pub use error::JwtError;
pub use identity::AuthInfo;
pub use rules::{AuthnSet, JwtRules, Outcome, RequestParts};

/// `WWW-Authenticate` for a 401, as Envoy writes it: `Bearer realm="<url>"`, plus
/// `error="invalid_token"` when a token was present and refused.
#[must_use]
pub fn www_authenticate(realm: &str, invalid_token: bool) -> String {
    if invalid_token {
        format!("Bearer realm=\"{realm}\", error=\"invalid_token\"")
    } else {
        format!("Bearer realm=\"{realm}\"")
    }
}
