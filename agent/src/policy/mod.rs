//! The policy model: Istio's `security.istio.io` objects read from YAML and validated.
//!
//! [`load`] reads files and directories into typed objects ([`model`]), [`validate`] applies
//! Istio's admission checks, with the value grammars of conditions ([`attribute`]) and of
//! `paths` ([`path_pattern`]). The authorization engine ([`crate::authz`]) compiles what loads;
//! nothing here depends on it.

pub mod attribute;
pub mod load;
pub mod model;
pub mod path_pattern;
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
