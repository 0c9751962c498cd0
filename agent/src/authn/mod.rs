//! JWT authentication: Istio RequestAuthentication as Envoy's jwt_authn enforces it.

pub mod jwks;
