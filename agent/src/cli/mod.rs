//! The `nodeward` command line: one subcommand per module, and the logging every command sets
//! up.

pub mod check;
pub mod check_endpoint;
pub mod jwt;
pub mod logbuf;
pub mod run;
pub mod status;
pub mod uninstall;

use std::io::IsTerminal as _;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::EnvFilter;

/// nodeward: Istio RequestAuthentication and AuthorizationPolicy enforced at the node.
#[derive(Debug, Parser)]
#[command(name = "nodeward", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: watch policy and workload files, enforce on the transparent listener,
    /// serve the admin API. SIGTERM drains and exits 0.
    ///
    /// Every flag can also be given by its environment variable, `NODEWARD_<FLAG>` (for
    /// example `NODEWARD_FAILURE_MODE=open`); a flag on the command line wins.
    ///
    /// Exit status: 0 after a clean shutdown, 1 runtime error (a listener that cannot bind),
    /// 2 configuration that cannot start.
    Run(Box<run::RunArgs>),
    /// Show the live state of a running agent: readiness, configuration, workloads, issuers,
    /// counters.
    ///
    /// Exit status: 0 ready, 1 not ready, 2 no agent answers.
    Status(status::StatusArgs),
    /// Decide a described request against policy files (or a running agent's live state with
    /// --admin) and explain the decision.
    ///
    /// Exit status: 0 allowed, 1 denied, 2 bad input.
    Check(Box<check::CheckArgs>),
    /// Look inside a JWT, or verify one against a JWKS.
    #[command(subcommand)]
    Jwt(jwt::JwtCommand),
    /// Remove the kernel data path a stopped agent left on this node (programs, pins, routing).
    ///
    /// Run it in the node's network namespace with no agent running. Exit status: 0 removed
    /// (or nothing there), 1 something could not be removed.
    Uninstall(uninstall::UninstallArgs),
}

/// Log line formats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, event fields at the top level.
    Json,
}

/// The environment variable with the log filter (`tracing_subscriber::EnvFilter` syntax).
pub const LOG_ENV: &str = "NODEWARD_LOG";
/// The tracing target of the access log: one line per request or connection judged.
pub const ACCESS_TARGET: &str = "access";

/// The filter in force: [`LOG_ENV`] when set, else `default`; with `access_log`, the access log
/// target is added at `info` unless the filter names it (`warn,access=off` silences it).
#[must_use]
pub fn log_filter(env: Option<&str>, default: &str, access_log: bool) -> String {
    let spec = env
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(default);
    if access_log && !spec.contains(ACCESS_TARGET) {
        format!("{spec},{ACCESS_TARGET}=info")
    } else {
        spec.to_owned()
    }
}

/// Logs to standard error in `format` (colours only on a terminal), filtered by
/// [`log_filter`]. A filter that does not
/// parse is reported and `default` used instead.
///
/// With the access log (the daemon), lines are buffered and written every 100 ms
/// ([`logbuf`]): a request never waits for a `write(2)` to standard error. Keep the returned
/// guard until exit; dropping it writes out what is buffered. One-shot commands write directly.
#[must_use = "dropping the guard stops the log writer"]
pub fn init_logging(
    format: LogFormat,
    default: &str,
    access_log: bool,
) -> Option<logbuf::FlushGuard> {
    let env = std::env::var(LOG_ENV).ok();
    let spec = log_filter(env.as_deref(), default, access_log);
    let (filter, bad) = match EnvFilter::try_new(&spec) {
        Ok(filter) => (filter, None),
        Err(e) => (
            EnvFilter::new(log_filter(None, default, access_log)),
            Some(e),
        ),
    };
    let (writer, guard) = if access_log {
        let (buffer, guard) = logbuf::LogBuffer::start();
        (BoxMakeWriter::new(buffer), Some(guard))
    } else {
        (BoxMakeWriter::new(std::io::stderr), None)
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    if let Some(e) = bad {
        tracing::warn!(filter = %spec, error = %e, "{LOG_ENV} does not parse; using the default filter");
    }
    guard
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn access_log_stays_on_unless_named() {
        assert_eq!(log_filter(None, "info", true), "info,access=info");
        assert_eq!(log_filter(Some("warn"), "info", true), "warn,access=info");
        assert_eq!(
            log_filter(Some("warn,access=off"), "info", true),
            "warn,access=off"
        );
        assert_eq!(log_filter(Some(" "), "warn", false), "warn");
        assert_eq!(log_filter(Some("debug"), "warn", false), "debug");
    }
}
