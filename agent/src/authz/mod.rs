//! The authorization engine: Istio AuthorizationPolicy semantics, compiled per change and
//! evaluated per request without re-parsing.
//!
//! [`compile`] turns loaded policies into a [`PolicySet`]; [`PolicySet::for_workload`] picks the
//! ones that apply to a workload; [`WorkloadPolicies::evaluate`] decides a [`Request`];
//! [`explain`] says why, clause by clause.

pub mod compile;
pub mod eval;
pub mod explain;
pub mod matcher;
pub mod path;

/// Made by authentication; named here too because requests carry it.
pub use crate::authn::AuthInfo;
pub use compile::{CompiledPolicy, CustomProvider, PolicySet, WorkloadPolicies};
pub use eval::{Decision, Http, Peer, Reason, Request, DENIED_BODY};
#[cfg(test)]
mod tests;
