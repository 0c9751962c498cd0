//! The `nodeward` binary: the agent daemon and the operator CLI.

use std::process::ExitCode;

use clap::Parser;
use nodeward::cli::{init_logging, Cli, Command, LogFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kept to the end: dropping it flushes the log.
    let _log = match &cli.command {
        Command::Run(args) => init_logging(args.log_format, "info", true),
        _ => init_logging(LogFormat::Text, "warn", false),
    };
    let code = match cli.command {
        Command::Run(args) => nodeward::cli::run::run(&args),
        Command::Status(args) => nodeward::cli::status::run(&args),
        Command::Check(args) => nodeward::cli::check::run(&args),
        Command::Jwt(command) => nodeward::cli::jwt::run(&command),
        Command::Uninstall(args) => nodeward::cli::uninstall::run(&args),
    };
    ExitCode::from(code)
}
