//! The `nodeward` command line: one subcommand per module.

pub mod check;
pub mod jwt;

use clap::{Parser, Subcommand};

/// nodeward: Istio RequestAuthentication and AuthorizationPolicy enforced at the node.
#[derive(Debug, Parser)]
#[command(name = "nodeward", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decide a described request against policy files and explain the decision.
    ///
    /// Exit status: 0 allowed, 1 denied, 2 bad input.
    Check(Box<check::CheckArgs>),
    /// Look inside a JWT, or verify one against a JWKS.
    #[command(subcommand)]
    Jwt(jwt::JwtCommand),
}
