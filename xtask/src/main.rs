//! nodeward's developer tasks, run as `cargo xtask <command>` (alias in `.cargo/config.toml`).
//!
//! - `cargo xtask setup`: installs what building and testing need on a Debian 12 machine
//!   (Debian packages, rustup components, bpf-linker built against the nightly's LLVM).
//!   Idempotent and fast when everything is present; one line per step.
//! - `cargo xtask test`: setup, then build, clippy, rustfmt check and the whole test suite,
//!   including the privileged datapath tests (must run as root).
//! - `cargo xtask demo`: setup, build, then the README's main job: Istio's reference scenarios
//!   decided by nodeward.
//! - `cargo xtask kind [--keep]`: deploy/README.md's quick start on a kind cluster (image,
//!   `kubectl apply -k deploy/`, the scenarios with `kubectl exec` + curl, uninstall); needs a
//!   Docker daemon, kind and kubectl and fails before changing anything without them.

mod bench;
mod demo;
mod kind;
mod setup;
mod system;
mod test;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "nodeward's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the build and test prerequisites (as root on a fresh machine); fast when present.
    Setup,
    /// Run setup, then build, clippy (-D warnings), rustfmt --check and all tests, as root.
    Test,
    /// Run setup, build, and show Istio's reference scenarios decided by nodeward.
    Demo,
    /// Build the image, install on a kind cluster, run the scenarios, uninstall (Docker + kind).
    Kind {
        /// Keep the kind cluster afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Run the benchmark (as root): direct, nodeward and HAProxy side by side; writes
    /// target/bench/bench.{md,json}.
    Bench(bench::Args),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::run(),
        Command::Test => test::run(),
        Command::Demo => demo::run(),
        Command::Kind { keep } => kind::run(keep),
        Command::Bench(args) => bench::run(&args),
    }
}
