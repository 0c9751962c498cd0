//! nodeward: Istio's end-user security (RequestAuthentication, AuthorizationPolicy) enforced
//! at the node.
//!
//! Data path: datapath (eBPF loader) -> enforcer (proxy) -> authn (JWT) -> [`authz`] (policy)
//! -> upstream. Sources of truth ([`policy`] files, [`kubernetes`] watchers) feed one state store.
//! [`admin`] serves health, [`readiness`], metrics, state and checks off the data plane.
//! [`app`] starts all of it from one [`config::Config`]; [`cli`] turns flags into that
//! configuration and runs the one-shot commands.

pub mod admin;
pub mod app;
pub mod authn;
pub mod authz;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod decision;
pub mod enforcer;
pub mod extauthz;
pub mod inpod;
pub mod kubernetes;
pub mod metrics;
pub mod netns;
pub mod policy;
pub mod readiness;
pub mod state;
