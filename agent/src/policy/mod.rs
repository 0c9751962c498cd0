//! The policy model: Istio's `security.istio.io` objects read from YAML and validated.
//!
//! [`load`] reads files and directories into typed objects ([`model`]), [`validate`] applies
//! Istio's admission checks. The authorization engine ([`crate::authz`]) compiles what loads.

pub mod load;
pub mod model;
pub mod scope;
pub mod validate;

pub use load::{
    load_object, load_paths, load_str, AuthorizationPolicy, LoadError, Loaded, Object, Origin,
    RequestAuthentication,
};
pub use scope::DEFAULT_ROOT_NAMESPACE;
pub use validate::Action;

#[cfg(test)]
mod tests;
