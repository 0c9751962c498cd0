//! The `nodeward` binary: the agent daemon and the operator CLI.

use std::process::ExitCode;

use clap::Parser;
use nodeward::cli::{Cli, Command};

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODEWARD_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => ExitCode::from(nodeward::cli::check::run(&args)),
        Command::Jwt(command) => ExitCode::from(nodeward::cli::jwt::run(&command)),
    }
}
