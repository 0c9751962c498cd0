//! `cargo xtask bench`: the agent's performance against its targets. One node made of network
//! namespaces, like the end-to-end tests' (`nodeward_tests::netns::TestNode`): nginx in a server
//! pod, wrk in a client pod, and side by side on them, one row each:
//!
//! 1. `direct`: no agent, the client talks to nginx (the physical limit of this machine);
//! 2. `unprotected`: the agent with its kernel data path, the server pod selected by no
//!    policy (steering passes its traffic in the kernel);
//! 3. `enforced`: the agent enforcing a RequestAuthentication (RS256 issuer, inline JWKS) and
//!    an ALLOW policy on `requestPrincipals` with a `request.auth.claims[groups]` condition;
//!    every request carries the same valid token;
//! 4. `haproxy`: HAProxy (Debian's 2.6) in the node namespace, where the agent runs, as an
//!    explicit hop in front of the same server doing the same check (`jwt_verify` RS256, iss,
//!    exp, principal and group ACLs); same veths, same hops, addressed by the client itself;
//! 5. `enforced-cold`: row 3 with a distinct valid token on every request (no cache hits).
//!
//! Each row runs a warm-up, a closed loop at fixed concurrency (throughput) and a paced run at a
//! fixed rate (latency percentiles, CPU seconds of the agent or HAProxy per 1,000 requests from
//! `/proc/<pid>/stat`), and reads the process's peak RSS (`VmHWM`). Every row first checks that
//! the path answers 200 with nginx's body and, for the checking rows, that requests without a
//! token or without the group are refused (so a fast number cannot come from a path that does
//! not check); a run with any non-2xx/3xx answer or socket error fails the bench.
//!
//! Agent rows are [`AgentRow`]s: the policies they load plus extra `nodeward run` arguments,
//! so a variant (e.g. a fast path flag) is one more entry in [`rows`].
//!
//! Output: `<out>/bench.md` and `<out>/bench.json` (default `target/bench/`), the targets
//! (throughput, added latency, CPU and memory, relative to `direct` and `haproxy`; see
//! `report`) as PASS/FAIL ratio lines; `--record` also writes the result into BENCHMARKS.md.
//! Everything made (namespaces, processes, pinned BPF objects, the temp dir) is removed on
//! return, on error and on Ctrl-C. Needs root.
//!
//! By concern: `runner` builds the node and runs and measures the rows, `fixtures` writes what
//! they load (policies, proxy configurations, tokens), `report` turns the results into
//! markdown and JSON with the targets.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, ensure, Context as _, Result};

use crate::{setup, system};

mod fixtures;
mod report;
mod runner;

use report::record;
use runner::Bench;

/// Debian packages the bench needs (not the test suite's: they stay out of `setup`).
const PACKAGES: [(&str, &str); 4] = [
    ("nginx-light", "the server pod's HTTP server"),
    (
        "haproxy",
        "row 4: the JWT-checking proxy a user would otherwise deploy",
    ),
    ("wrk", "the client pod's load generator"),
    ("openssl", "the public key HAProxy verifies with"),
];

/// The server's fixed body.
const BODY: &str = "nodeward bench: small fixed body\n";
/// Server and client pods (addresses 10.200.0.<index>).
const SERVER: (&str, u8) = ("bench-server", 10);
const CLIENT: (&str, u8) = ("bench-client", 20);
const PORT: u16 = 8080;
/// The agent's pinned objects while the bench runs; removed at the end.
const PIN_DIR: &str = "/sys/fs/bpf/nodeward-bench";
/// Istio's sample issuer: its key signs the bench's tokens, its JWKS verifies them.
const ISSUER: &str = "testing@secure.istio.io";
/// Distinct tokens of the cold row's closed loop: it stops early when they are spent.
const COLD_CLOSED_TOKENS: usize = 40_000;
/// Set by SIGINT/SIGTERM: the bench stops at the next step and cleans up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where bench.md and bench.json go (default: <target dir>/bench).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Seconds of each measured run (closed loop, then fixed rate).
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds of warm-up before each row's runs.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Open connections of the closed loop.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Requests per second of the fixed-rate run.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Only these rows (by key: direct, unprotected, enforced, enforced-host, enforced-nofast,
    /// haproxy, enforced-cold).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Also record the agent/HAProxy with `perf record -g` during each closed loop
    /// (<out>/perf-<row>.data).
    #[arg(long)]
    perf: bool,
    /// Write the result into BENCHMARKS.md (between its bench markers).
    #[arg(long)]
    record: bool,
    /// Bench this nodeward binary instead of building `cargo build --release -p nodeward`
    /// (e.g. to compare two builds).
    #[arg(long)]
    agent: Option<PathBuf>,
}

/// The policies an agent row loads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Policies {
    /// The RequestAuthentication and ALLOW policy select the server.
    Enforce,
    /// The same policies are loaded but select no pod on this node: the server is unprotected.
    Unprotected,
}

/// An agent variant: what it enforces and extra `nodeward run` arguments.
struct AgentRow {
    policies: Policies,
    extra_args: &'static [&'static str],
}

enum Proxy {
    None,
    Agent(AgentRow),
    Haproxy,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tokens {
    /// The same valid token on every request (the agent's cache answers after the first).
    Same,
    /// A distinct valid token on every request.
    Distinct,
}

struct Row {
    key: &'static str,
    title: &'static str,
    proxy: Proxy,
    tokens: Tokens,
}

/// The rows, in the order they run and appear. Add agent variants here.
fn rows() -> Vec<Row> {
    vec![
        Row {
            key: "direct",
            title: "1. direct, no agent",
            proxy: Proxy::None,
            tokens: Tokens::Same,
        },
        Row {
            key: "unprotected",
            title: "2. nodeward, pod unprotected",
            proxy: Proxy::Agent(AgentRow {
                policies: Policies::Unprotected,
                extra_args: &[],
            }),
            tokens: Tokens::Same,
        },
        Row {
            key: "enforced",
            title: "3. nodeward enforcing, same token (defaults: in-pod steering)",
            proxy: Proxy::Agent(AgentRow {
                policies: Policies::Enforce,
                extra_args: &[],
            }),
            tokens: Tokens::Same,
        },
        Row {
            key: "enforced-host",
            title: "3b. nodeward enforcing, same token, host steering + fast path",
            proxy: Proxy::Agent(AgentRow {
                policies: Policies::Enforce,
                extra_args: &["--steering", "host"],
            }),
            tokens: Tokens::Same,
        },
        Row {
            key: "enforced-nofast",
            title: "3c. nodeward enforcing, same token, host steering, fast path off",
            proxy: Proxy::Agent(AgentRow {
                policies: Policies::Enforce,
                extra_args: &["--steering", "host", "--fast-path", "off"],
            }),
            tokens: Tokens::Same,
        },
        Row {
            key: "haproxy",
            title: "4. HAProxy jwt_verify, same token",
            proxy: Proxy::Haproxy,
            tokens: Tokens::Same,
        },
        Row {
            key: "enforced-cold",
            title: "5. nodeward enforcing, distinct tokens",
            proxy: Proxy::Agent(AgentRow {
                policies: Policies::Enforce,
                extra_args: &[],
            }),
            tokens: Tokens::Distinct,
        },
    ]
}

pub fn run(args: &Args) -> Result<()> {
    if !system::is_root()? {
        bail!(
            "cargo xtask bench builds network namespaces, loads kernel programs and installs \
             Debian packages: run it as root"
        );
    }
    install_signal_handlers();
    setup::run()?;
    setup::debian_packages("bench packages", &PACKAGES)?;
    let root = workspace_root()?;
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let nodeward = if let Some(agent) = &args.agent {
        ensure!(agent.is_file(), "--agent {}: no such file", agent.display());
        fs::canonicalize(agent)?
    } else {
        let mut build = Command::new("cargo");
        build
            .args(["build", "--release", "-p", "nodeward"])
            .env("PATH", system::path_with_cargo_bin()?)
            .current_dir(&root);
        println!("==> {}", system::describe(&build));
        system::run(&mut build)?;
        target.join("release/nodeward")
    };
    let out = args.out.clone().unwrap_or_else(|| target.join("bench"));
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let bpffs_before = system::bpffs_mounted(system::BPFFS);
    let result = Bench::new(args, &root, &out, nodeward).and_then(|mut bench| bench.run_all());
    // The agent stops cleanly and removes its pins; a killed one would leave them.
    if Path::new(PIN_DIR).exists() {
        let _ = fs::remove_dir_all(PIN_DIR);
    }
    system::unmount_bpffs_we_caused(bpffs_before);
    let report = result?;
    let markdown = report.markdown();
    fs::write(out.join("bench.md"), &markdown)?;
    fs::write(
        out.join("bench.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    println!("\n{markdown}");
    println!(
        "==> written: {} and {}",
        out.join("bench.md").display(),
        out.join("bench.json").display()
    );
    if args.record {
        record(&root.join("BENCHMARKS.md"), &markdown)?;
        println!("==> BENCHMARKS.md updated");
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM) set a flag instead of killing the bench, so it removes its node.
fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted: the bench node is being removed");
    }
    Ok(())
}

/// A directory removed when dropped (also on error and panic).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A count or size as a float, for ratios (all far below 2^52).
#[expect(
    clippy::cast_precision_loss,
    reason = "counts and sizes far below 2^52"
)]
fn float(n: u64) -> f64 {
    n as f64
}

/// A line count as a request count.
fn float_count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// wrk's request count (a float in its JSON) as an integer.
#[expect(
    clippy::cast_sign_loss,
    reason = "checked >= 1 before; wrk counts are integers"
)]
fn count(n: f64) -> u64 {
    n.max(0.0) as u64
}

fn which(program: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let p = Path::new(dir).join(program);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{program} is not installed (the bench's setup should have installed it)")
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
