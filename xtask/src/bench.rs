//! `cargo xtask bench`: issue 7's benchmark. One node made of network namespaces, like the
//! end-to-end tests' (`nodeward_tests::netns::TestNode`): nginx in a server pod, wrk in a client
//! pod, and side by side on them, one row each:
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
//! Output: `<out>/bench.md` and `<out>/bench.json` (default `target/bench/`), the targets of
//! issue 7 as PASS/FAIL ratio lines; `--record` also writes the result into BENCHMARKS.md.
//! Everything made (namespaces, processes, pinned BPF objects, the temp dir) is removed on
//! return, on error and on Ctrl-C. Needs root.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use nodeward_tests::netns::{pod_ip, Pod, TestNode, NODE_ADDR};
use serde_json::{json, Value};

use crate::{setup, system};

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
    /// Only these rows (by key: direct, unprotected, enforced, enforced-nofast, haproxy,
    /// enforced-cold).
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
            title: "3. nodeward enforcing, same token (defaults: fast path on)",
            proxy: Proxy::Agent(AgentRow {
                policies: Policies::Enforce,
                extra_args: &[],
            }),
            tokens: Tokens::Same,
        },
        Row {
            key: "enforced-nofast",
            title: "3b. nodeward enforcing, same token, fast path off",
            proxy: Proxy::Agent(AgentRow {
                policies: Policies::Enforce,
                extra_args: &["--fast-path", "off"],
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

struct Bench<'a> {
    args: &'a Args,
    root: PathBuf,
    out: PathBuf,
    nodeward: PathBuf,
    // Dropped before `dir` (fields drop in order): processes and namespaces first.
    node: TestNode,
    /// The node's cgroup v2, the agent's `--cgroup`.
    cgroup: PathBuf,
    dir: TempDir,
    server: Pod,
    client: Pod,
}

/// One wrk run's numbers (from its `done()` hook).
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    requests: u64,
    seconds: f64,
    rate: f64,
    /// The distinct tokens ran out before the end: wrk's clock runs to the end of the run,
    /// so `rate` is a lower bound.
    spent: bool,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
}

struct RowResult {
    key: &'static str,
    title: &'static str,
    agent_args: Vec<String>,
    closed: Run,
    paced: Run,
    /// CPU seconds of the agent / HAProxy per 1,000 requests of the paced run.
    cpu_per_1k: Option<f64>,
    /// Peak and current RSS of the agent / HAProxy, KiB.
    rss_kib: Option<(u64, u64)>,
    process: &'static str,
}

impl<'a> Bench<'a> {
    fn new(args: &'a Args, root: &Path, out: &Path, nodeward: PathBuf) -> Result<Self> {
        let dir = out.join(format!("tmp-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        println!("==> building the bench node: a node namespace, a server pod, a client pod");
        let mut node = TestNode::new("bench");
        // Every process of the bench (nginx, wrk, HAProxy, the agent) runs in a cgroup v2 of
        // the node's own, so the fast-path rows attach `sock_ops` there, never to the
        // machine's root cgroup, and every row runs under the same accounting.
        let cgroup = node.use_cgroup();
        let server = node.add_pod(SERVER.0, pod_ip(SERVER.1));
        let client = node.add_pod(CLIENT.0, pod_ip(CLIENT.1));
        let conf = write_nginx_conf(&dir.0, &server)?;
        let nginx = which("nginx")?;
        node.spawn_logged(
            &server.netns,
            &nginx,
            &[
                "-c",
                path_str(&conf)?,
                "-e",
                path_str(&dir.0.join("nginx.err"))?,
            ],
            &dir.0.join("nginx.log"),
        );
        let bench = Self {
            args,
            root: root.to_path_buf(),
            out: out.to_path_buf(),
            nodeward,
            node,
            cgroup,
            dir,
            server,
            client,
        };
        bench.write_inputs()?;
        Ok(bench)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Policies, workloads, tokens, HAProxy's config and key.
    fn write_inputs(&self) -> Result<()> {
        let istio = self.root.join("testdata/istio-samples");
        let jwks_text = fs::read_to_string(istio.join("jwks.json"))?;
        let jwks: Value = serde_json::from_str(&jwks_text)?;
        let kid = jwks["keys"][0]["kid"]
            .as_str()
            .context("testdata/istio-samples/jwks.json has no kid")?;
        // The agent watches its inputs' directories: nothing else is written there (a log
        // file next to them would wake its watcher on every line).
        for (dir, app) in [
            ("inputs/policies-enforce", "bench-server"),
            ("inputs/policies-unprotected", "not-on-this-node"),
        ] {
            fs::create_dir_all(self.path(dir))?;
            fs::write(
                self.path(dir).join("bench.yaml"),
                policies_yaml(app, &serde_json::to_string(&jwks)?),
            )?;
        }
        fs::write(self.path("inputs/workloads.yaml"), self.workloads_yaml())?;

        println!(
            "==> minting RS256 tokens with Istio's sample key (testdata/istio-samples/key.pem)"
        );
        let started = Instant::now();
        let key = Signer::new(&fs::read_to_string(istio.join("key.pem"))?, kid)?;
        let same = mint(&key, "same", 0..1)?;
        fs::write(self.path("token-same"), &same[0])?;
        if self.runs_row("enforced-cold") {
            let paced = usize::try_from(u64::from(self.args.rate) * self.args.duration * 12 / 10)?;
            let warm = usize::try_from(u64::from(self.args.rate) * self.args.warmup.max(1))?;
            let batches = [
                ("tokens-warmup", warm),
                ("tokens-closed", COLD_CLOSED_TOKENS),
                ("tokens-paced", paced),
            ];
            let mut next = 0;
            for (file, count) in batches {
                let tokens = mint_parallel(&key, file, next..next + count)?;
                next += count;
                fs::write(self.path(file), tokens.join("\n") + "\n")?;
            }
            println!(
                "    {next} distinct tokens in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }

        let public = system::output(
            Command::new("openssl")
                .args(["pkey", "-pubout", "-in"])
                .arg(istio.join("key.pem")),
        )?;
        fs::write(self.path("haproxy-pub.pem"), public)?;
        fs::write(
            self.path("haproxy.cfg"),
            haproxy_cfg(&self.path("haproxy-pub.pem"), &self.server)?,
        )?;
        Ok(())
    }

    fn workloads_yaml(&self) -> String {
        format!(
            "workloads:\n\
             - name: {server}\n  namespace: bench\n  serviceAccount: server\n  labels: {{app: bench-server}}\n  ip: {server_ip}\n\
             - name: {client}\n  namespace: bench\n  serviceAccount: client\n  labels: {{app: bench-client}}\n  ip: {client_ip}\n",
            server = self.server.name,
            server_ip = self.server.ip,
            client = self.client.name,
            client_ip = self.client.ip,
        )
    }

    fn runs_row(&self, key: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|k| k == key)
    }

    fn run_all(&mut self) -> Result<Report> {
        self.wait_http(
            &format!("http://{}:{PORT}/", self.server.ip),
            "nginx in the server pod",
        )?;
        let load_before = fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let mut results = Vec::new();
        for row in rows() {
            if !self.runs_row(row.key) {
                continue;
            }
            check_interrupted()?;
            println!("\n==> row {}", row.title);
            results.push(self.run_row(&row)?);
        }
        ensure!(!results.is_empty(), "--only selected no row");
        Ok(Report {
            machine: machine()?,
            load_before: load_before.trim().to_owned(),
            load_after: fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            command: command_line(self.args),
            date: system::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))?
                .trim()
                .to_owned(),
            duration: self.args.duration,
            connections: self.args.connections,
            rate: self.args.rate,
            rows: results,
        })
    }

    fn run_row(&mut self, row: &Row) -> Result<RowResult> {
        let (pid, url, agent_args, process) = match &row.proxy {
            Proxy::None => (
                None,
                format!("http://{}:{PORT}/", self.server.ip),
                vec![],
                "-",
            ),
            Proxy::Agent(agent) => {
                let (pid, args) = self.start_agent(row.key, agent)?;
                (
                    Some(pid),
                    format!("http://{}:{PORT}/", self.server.ip),
                    args,
                    "agent",
                )
            }
            Proxy::Haproxy => (
                Some(self.start_haproxy()?),
                format!("http://{NODE_ADDR}:{PORT}/"),
                vec![],
                "haproxy",
            ),
        };
        let result = self.measure(row, pid, &url, agent_args, process);
        if let Some(pid) = pid {
            let code = self.node.terminate(pid, Duration::from_secs(25));
            if result.is_ok() && matches!(row.proxy, Proxy::Agent(_)) && code != Some(0) {
                bail!(
                    "the agent of row {} did not stop cleanly (exit {code:?}); see {}",
                    row.key,
                    self.path(&format!("agent-{}.log", row.key)).display()
                );
            }
        }
        result
    }

    fn measure(
        &mut self,
        row: &Row,
        pid: Option<u32>,
        url: &str,
        agent_args: Vec<String>,
        process: &'static str,
    ) -> Result<RowResult> {
        self.check_answers(row, url)?;
        let tokens = |phase: &str| match row.tokens {
            Tokens::Same => None,
            Tokens::Distinct => Some(format!("tokens-{phase}")),
        };
        let warm = self.wrk(
            row.key,
            "warmup",
            url,
            Load::Closed,
            self.args.warmup,
            tokens("warmup"),
        )?;
        println!("    warm-up: {:.0} req/s", warm.rate);
        let perf = match (self.args.perf, pid) {
            (true, Some(pid)) => Some(self.start_perf(row.key, pid)),
            _ => None,
        };
        // Distinct tokens: a shorter closed loop, so the minted ones last at up to 13,000/s.
        let closed_seconds = match row.tokens {
            Tokens::Same => self.args.duration,
            Tokens::Distinct => self.args.duration.min(3),
        };
        let closed = self.wrk(
            row.key,
            "closed",
            url,
            Load::Closed,
            closed_seconds,
            tokens("closed"),
        );
        if let Some(perf) = perf {
            let _ = self.node.terminate(perf, Duration::from_secs(30));
        }
        let closed = closed?;
        println!(
            "    closed loop, {} connections: {:.0} req/s, p50 {:.0} µs, p99 {:.0} µs ({} requests)",
            self.args.connections, closed.rate, closed.p50_us, closed.p99_us, closed.requests
        );
        let cpu_before = pid.map(cpu_seconds).transpose()?;
        let paced = self.wrk(
            row.key,
            "paced",
            url,
            Load::Paced,
            self.args.duration,
            tokens("paced"),
        )?;
        let cpu_after = pid.map(cpu_seconds).transpose()?;
        let cpu_per_1k = cpu_before
            .zip(cpu_after)
            .map(|(b, a)| (a - b) / (float(paced.requests) / 1000.0));
        let rss_kib = pid.map(rss_kib).transpose()?;
        println!(
            "    fixed rate: {:.0} req/s, p50 {:.0} µs, p90 {:.0} µs, p99 {:.0} µs{}{}",
            paced.rate,
            paced.p50_us,
            paced.p90_us,
            paced.p99_us,
            cpu_per_1k.map_or(String::new(), |c| format!(
                ", {process} CPU {c:.4} s per 1,000 requests"
            )),
            rss_kib.map_or(String::new(), |(hwm, _)| format!(
                ", peak RSS {:.1} MB",
                float(hwm) / 1024.0
            )),
        );
        Ok(RowResult {
            key: row.key,
            title: row.title,
            agent_args,
            closed,
            paced,
            cpu_per_1k,
            rss_kib,
            process,
        })
    }

    fn start_agent(&mut self, key: &str, agent: &AgentRow) -> Result<(u32, Vec<String>)> {
        let policies = self.path(match agent.policies {
            Policies::Enforce => "inputs/policies-enforce",
            Policies::Unprotected => "inputs/policies-unprotected",
        });
        let mut command: Vec<String> = vec![
            "run".into(),
            "--policies".into(),
            path_str(&policies)?.to_owned(),
            "--workloads".into(),
            path_str(&self.path("inputs/workloads.yaml"))?.to_owned(),
            "--bpf-pin-dir".into(),
            PIN_DIR.into(),
            "--cgroup".into(),
            path_str(&self.cgroup)?.to_owned(),
        ];
        command.extend(agent.extra_args.iter().map(|&a| a.to_owned()));
        println!("    nodeward {}", command.join(" "));
        let argv: Vec<&str> = command.iter().map(String::as_str).collect();
        let node_ns = self.node.netns.clone();
        let log = self.path(&format!("agent-{key}.log"));
        let pid = self
            .node
            .spawn_logged(&node_ns, &self.nodeward, &argv, &log);
        self.wait_ready(&log)?;
        // What the table shows: the row's own arguments, not the temp paths.
        Ok((
            pid,
            agent.extra_args.iter().map(|&a| a.to_owned()).collect(),
        ))
    }

    fn start_haproxy(&mut self) -> Result<u32> {
        let haproxy = which("haproxy")?;
        let cfg = self.path("haproxy.cfg");
        system::output(Command::new(&haproxy).arg("-c").arg("-f").arg(&cfg))
            .context("HAProxy refused the bench's configuration")?;
        let node_ns = self.node.netns.clone();
        let pid = self.node.spawn_logged(
            &node_ns,
            &haproxy,
            &["-db", "-f", path_str(&cfg)?],
            &self.path("haproxy.log"),
        );
        let token = fs::read_to_string(self.path("token-same"))?;
        self.wait_status(
            &format!("http://{NODE_ADDR}:{PORT}/"),
            Some(&token),
            200,
            "HAProxy in the node namespace",
        )
        .with_context(|| format!("HAProxy's log:\n{}", tail(&self.path("haproxy.log"), 20)))?;
        Ok(pid)
    }

    fn start_perf(&mut self, key: &str, pid: u32) -> u32 {
        let data = self.out.join(format!("perf-{key}.data"));
        let node_ns = self.node.netns.clone();
        let secs = self.args.duration.to_string();
        self.node.spawn_logged(
            &node_ns,
            Path::new("/usr/bin/perf"),
            &[
                "record",
                "-F",
                "999",
                "-g",
                "-p",
                &pid.to_string(),
                "-o",
                data.to_str().unwrap_or("perf.data"),
                "--",
                "sleep",
                &secs,
            ],
            &self.path(&format!("perf-{key}.log")),
        )
    }

    /// Every row: the path answers 200 with nginx's body. Checking rows: no token and a token
    /// without the group get 403, a garbage token 401 (the agent answers as Envoy does).
    fn check_answers(&self, row: &Row, url: &str) -> Result<()> {
        let token = fs::read_to_string(self.path("token-same"))?;
        let (status, body) = self.curl(url, Some(&token));
        ensure!(
            status == 200 && body == BODY,
            "row {}: a request with a valid token got {status} {body:?}, not 200 with nginx's body",
            row.key
        );
        let checks = match row.proxy {
            Proxy::Agent(AgentRow {
                policies: Policies::Enforce,
                ..
            })
            | Proxy::Haproxy => true,
            Proxy::Agent(_) | Proxy::None => false,
        };
        if checks {
            let no_group = fs::read_to_string(self.root.join("testdata/istio-samples/demo.jwt"))?;
            for (token, expected, what) in [
                (None, 403, "no token"),
                (
                    Some(no_group.trim()),
                    403,
                    "a token without groups: [group1]",
                ),
                (Some("garbage"), 401, "a garbage token"),
            ] {
                let (status, _) = self.curl(url, token);
                ensure!(
                    status == expected,
                    "row {}: {what} got {status}, expected {expected}: the path does not check \
                     what the bench measures",
                    row.key
                );
            }
            println!("    checked: valid token 200; no token 403; no group 403; garbage 401");
        } else {
            println!("    checked: 200 with nginx's body");
        }
        Ok(())
    }

    fn curl(&self, url: &str, token: Option<&str>) -> (u16, String) {
        let header = token.map(|t| format!("Authorization: Bearer {}", t.trim()));
        let headers: Vec<&str> = header.iter().map(String::as_str).collect();
        self.node.curl(&self.client.netns, "GET", url, &headers)
    }

    fn wait_status(&self, url: &str, token: Option<&str>, expected: u16, what: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = (0, String::new());
        while Instant::now() < deadline {
            check_interrupted()?;
            last = self.curl(url, token);
            if last.0 == expected {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "{what} did not answer {expected} within 15 s (last: {} {:?})",
            last.0,
            last.1
        )
    }

    fn wait_http(&self, url: &str, what: &str) -> Result<()> {
        let token = fs::read_to_string(self.path("token-same"))?;
        self.wait_status(url, Some(&token), 200, what)
    }

    /// Waits (at most 30 s) for the agent's /readyz in the node namespace.
    fn wait_ready(&self, log: &Path) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            check_interrupted()?;
            let (status, _) = self.node.curl(
                &self.node.netns,
                "GET",
                "http://127.0.0.1:15000/readyz",
                &[],
            );
            if status == 200 {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        bail!(
            "the agent did not become ready within 30 s; its log ({}):\n{}",
            log.display(),
            tail(log, 20)
        )
    }

    /// One wrk run from the client pod, bounded in time; fails on any error or refused answer.
    fn wrk(
        &self,
        key: &str,
        phase: &str,
        url: &str,
        load: Load,
        seconds: u64,
        tokens: Option<String>,
    ) -> Result<Run> {
        check_interrupted()?;
        let result = self.path(&format!("wrk-{key}-{phase}.json"));
        let _ = fs::remove_file(&result);
        let (connections, delay_ms) = match load {
            Load::Closed => (self.args.connections, None),
            // Each connection waits about connections/rate seconds between requests.
            // About 0.7 ms of each cycle is the answer and the event loop's timer granularity.
            Load::Paced => {
                let connections = (self.args.rate / 50).max(1);
                let cycle_ms = 1000.0 * f64::from(connections) / f64::from(self.args.rate);
                (connections, Some((cycle_ms - 0.7).max(0.0)))
            }
        };
        let token_file = tokens.map(|f| self.path(&f));
        let script = self.path(&format!("wrk-{key}-{phase}.lua"));
        let token = fs::read_to_string(self.path("token-same"))?;
        fs::write(
            &script,
            wrk_script(&result, delay_ms, token_file.as_deref(), token.trim())?,
        )?;
        let secs = seconds.max(1).to_string();
        let limit = (seconds + 20).to_string();
        let conns = connections.to_string();
        let out = self.node.exec(
            &self.client.netns,
            &[
                "timeout",
                "-k",
                "5",
                &limit,
                "wrk",
                "-t1",
                "-c",
                &conns,
                "-d",
                &secs,
                "--timeout",
                "5s",
                "-s",
                path_str(&script)?,
                url,
            ],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "wrk ({key}, {phase}) failed ({}): {}{}",
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text = fs::read_to_string(&result)
            .with_context(|| format!("wrk wrote no result ({key}, {phase}): {stdout}"))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("wrk's result is not JSON: {text}"))?;
        let num = |p: &str| v.pointer(p).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let errors = ["connect", "read", "write", "status", "timeout"]
            .map(|e| (e, num(&format!("/errors/{e}"))));
        let requests = num("/requests");
        if errors.iter().any(|(_, n)| *n != 0.0) || requests.is_nan() || requests < 1.0 {
            bail!(
                "row {key}, {phase}: {requests} requests with errors {errors:?}: a refused or \
                 failed request makes the numbers meaningless (agent log: {})",
                self.path(&format!("agent-{key}.log")).display()
            );
        }
        let seconds = num("/duration_us") / 1e6;
        let spent = match &token_file {
            // Answers still in flight when the thread stopped are not counted by wrk.
            Some(file) => {
                count(requests) + u64::from(connections)
                    >= float_count(fs::read_to_string(file)?.lines().count())
            }
            None => false,
        };
        Ok(Run {
            requests: count(requests),
            seconds,
            rate: requests / seconds,
            spent,
            p50_us: num("/latency_us/p50"),
            p90_us: num("/latency_us/p90"),
            p99_us: num("/latency_us/p99"),
        })
    }
}

#[derive(Clone, Copy)]
enum Load {
    /// Each connection sends its next request as soon as the answer arrives.
    Closed,
    /// Each connection waits between requests so the total is about `--rate`.
    Paced,
}

/// The wrk script of one run: the Authorization header (one token, or the next of a file per
/// request), optional pacing, and a `done()` writing JSON (a status >= 400 counts as an error).
fn wrk_script(
    result: &Path,
    delay_ms: Option<f64>,
    tokens: Option<&Path>,
    token: &str,
) -> Result<String> {
    let mut s = String::from("-- written by cargo xtask bench\n");
    if let Some(file) = tokens {
        // Distinct tokens: each request takes the next one; when they are spent the thread
        // stops (the run ends early; its rate is requests over the time it actually took).
        writeln!(
            s,
            r#"local tokens = {{}}
for line in io.lines("{}") do tokens[#tokens + 1] = line end
local next_token = 1
function request()
  local t = tokens[next_token]
  if t == nil then
    wrk.thread:stop()
    t = tokens[#tokens]
  else
    next_token = next_token + 1
  end
  return wrk.format(nil, nil, {{["Authorization"] = "Bearer " .. t}})
end"#,
            path_str(file)?
        )?;
    } else {
        writeln!(s, r#"wrk.headers["Authorization"] = "Bearer {token}""#)?;
    }
    if let Some(ms) = delay_ms {
        // Uniform jitter around the mean so connections do not fire in lockstep.
        writeln!(
            s,
            "math.randomseed(os.time())\nfunction delay()\n  return math.floor({ms} * (0.5 + math.random()) + 0.5)\nend"
        )?;
    }
    writeln!(
        s,
        r#"function done(summary, latency, requests)
  local f = assert(io.open("{}", "w"))
  local e = summary.errors
  f:write(string.format('{{"requests":%d,"duration_us":%d,"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},"latency_us":{{"p50":%d,"p90":%d,"p99":%d,"max":%d}}}}',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
  f:close()
end"#,
        path_str(result)?
    )?;
    Ok(s)
}

fn policies_yaml(app: &str, jwks: &str) -> String {
    format!(
        "# cargo xtask bench: RS256 issuer (Istio's sample JWKS inline) and an ALLOW policy on\n\
         # requestPrincipals with a groups claim condition.\n\
         apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {{name: bench-jwt, namespace: bench}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n\
         \x20 jwtRules:\n  - issuer: {ISSUER}\n    jwks: '{jwks}'\n\
         ---\n\
         apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: bench-require-group, namespace: bench}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: ALLOW\n  rules:\n\
         \x20 - from:\n    - source:\n        requestPrincipals: [\"{ISSUER}/{ISSUER}\"]\n\
         \x20   when:\n    - key: request.auth.claims[groups]\n      values: [\"group1\"]\n"
    )
}

/// HAProxy doing what the agent does in row 3: a Bearer token is required to pass the ALLOW
/// policy (403 without, like Istio), RS256 signature with the issuer's key, issuer, `exp`
/// (HAProxy has no skew setting), principal iss/sub and `group1` among the first four entries
/// of `groups` (HAProxy 2.6's `json_query` returns scalars only, so an array is read by index).
/// Two threads, like the agent's two data-plane workers on this machine; upstream connections
/// are reused (`http-reuse always`), like the agent's pool.
fn haproxy_cfg(public_key: &Path, server: &Pod) -> Result<String> {
    let key = path_str(public_key)?;
    let mut groups = String::new();
    for i in 0..4 {
        writeln!(
            groups,
            "  acl in_group var(txn.bearer),jwt_payload_query('$.groups[{i}]') -m str group1"
        )?;
    }
    Ok(format!(
        "# cargo xtask bench, row 4\n\
         global\n  nbthread 2\n  maxconn 4096\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
         frontend bench\n  bind {NODE_ADDR}:{PORT}\n\
         \x20 http-request set-var(txn.bearer) http_auth_bearer\n\
         \x20 http-request deny deny_status 403 unless {{ var(txn.bearer) -m found }}\n\
         \x20 http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')\n\
         \x20 http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}\n\
         \x20 http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,\"{key}\") -m int 1 }}\n\
         \x20 http-request set-var(txn.iss) var(txn.bearer),jwt_payload_query('$.iss')\n\
         \x20 http-request deny deny_status 401 unless {{ var(txn.iss) -m str {ISSUER} }}\n\
         \x20 http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n\
         \x20 http-request set-var(txn.now) date\n\
         \x20 http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int lt 0 }}\n\
         \x20 acl principal var(txn.bearer),jwt_payload_query('$.sub') -m str {ISSUER}\n\
         {groups}\
         \x20 http-request deny deny_status 403 unless principal in_group\n\
         \x20 default_backend pod\n\
         backend pod\n  server pod {ip}:{PORT}\n",
        ip = server.ip
    ))
}

fn write_nginx_conf(dir: &Path, server: &Pod) -> Result<PathBuf> {
    let d = path_str(dir)?;
    let conf = format!(
        "# cargo xtask bench: one worker, no access log, a small fixed body\n\
         daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 60s;\n\
         \x20 client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n\
         \x20 fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n\
         \x20 server {{\n    listen {ip}:{PORT};\n    location / {{ default_type text/plain; return 200 \"{body}\"; }}\n  }}\n}}\n",
        ip = server.ip,
        body = BODY.replace('\n', "\\n"),
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf)?;
    Ok(path)
}

/// Signs RS256 tokens: Istio's sample key (PKCS#1 PEM), parsed once.
struct Signer {
    key: RsaKeyPair,
    header: String,
}

impl Signer {
    fn new(pem: &str, kid: &str) -> Result<Self> {
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body.trim()).context("key.pem is not PEM")?;
        let key = RsaKeyPair::from_der(&der)
            .map_err(|e| anyhow::anyhow!("key.pem is not an RSA private key: {e}"))?;
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": kid});
        Ok(Self {
            key,
            header: URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
        })
    }

    fn sign(&self, claims: &Value, rng: &SystemRandom) -> Result<String> {
        let input = format!(
            "{}.{}",
            self.header,
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
        );
        let mut signature = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, rng, input.as_bytes(), &mut signature)
            .map_err(|e| anyhow::anyhow!("signing a bench token: {e}"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// RS256 tokens of Istio's sample issuer with `groups: [group1, group2]`, one per index (the
/// index is the `jti`, so each is distinct), valid for two hours.
fn mint(key: &Signer, tag: &str, range: std::ops::Range<usize>) -> Result<Vec<String>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let rng = SystemRandom::new();
    range
        .map(|i| {
            let claims = json!({
                "iss": ISSUER, "sub": ISSUER, "groups": ["group1", "group2"],
                "iat": now, "exp": now + 7200, "jti": format!("bench-{tag}-{i}"),
            });
            key.sign(&claims, &rng)
        })
        .collect()
}

/// [`mint`] on every core.
fn mint_parallel(key: &Signer, tag: &str, range: std::ops::Range<usize>) -> Result<Vec<String>> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let chunk = range.len().div_ceil(cores).max(1);
    let parts: Vec<std::ops::Range<usize>> = (range.start..range.end)
        .step_by(chunk)
        .map(|s| s..(s + chunk).min(range.end))
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| scope.spawn(move || mint(key, tag, part)))
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a minting thread panicked"))??,
            );
        }
        Ok(all)
    })
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat: the measured process is gone"))?;
    // Fields after the command (which may hold spaces) start at field 3.
    let rest = stat
        .rsplit_once(')')
        .context("malformed /proc/<pid>/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(float(ticks) / float(u64::try_from(hz)?))
}

/// (`VmHWM`, `VmRSS`) in KiB.
fn rss_kib(pid: u32) -> Result<(u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmHWM:")?, field("VmRSS:")?))
}

struct Report {
    machine: Machine,
    load_before: String,
    load_after: String,
    command: String,
    date: String,
    duration: u64,
    connections: u32,
    rate: u32,
    rows: Vec<RowResult>,
}

struct Machine {
    cpu: String,
    cores: usize,
    memory_gib: f64,
    kernel: String,
}

fn machine() -> Result<Machine> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo")?;
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
    let meminfo = fs::read_to_string("/proc/meminfo")?;
    let mem_kib: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    Ok(Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get),
        memory_gib: mem_kib / 1024.0 / 1024.0,
        kernel: system::output(Command::new("uname").arg("-r"))?
            .trim()
            .to_owned(),
    })
}

/// One of issue 7's targets, as a ratio within this run.
struct Target {
    what: &'static str,
    value: String,
    limit: &'static str,
    pass: bool,
}

impl Report {
    fn row(&self, key: &str) -> Option<&RowResult> {
        self.rows.iter().find(|r| r.key == key)
    }

    fn targets(&self) -> Vec<Target> {
        let mut t = Vec::new();
        let (direct, unprotected, enforced, haproxy) = (
            self.row("direct"),
            self.row("unprotected"),
            self.row("enforced"),
            self.row("haproxy"),
        );
        if let (Some(d), Some(u)) = (direct, unprotected) {
            let ratio = u.closed.rate / d.closed.rate;
            t.push(Target {
                what: "unprotected throughput / direct",
                value: format!("{:.1}%", ratio * 100.0),
                limit: ">= 97%",
                pass: ratio >= 0.97,
            });
        }
        if let (Some(e), Some(h)) = (enforced, haproxy) {
            let ratio = e.closed.rate / h.closed.rate;
            t.push(Target {
                what: "enforced throughput / HAProxy",
                value: format!("{ratio:.2}x"),
                limit: ">= 1.00x",
                pass: ratio >= 1.0,
            });
            t.push(Target {
                what: "enforced p99 at fixed rate vs HAProxy",
                value: format!("{:.0} µs vs {:.0} µs", e.paced.p99_us, h.paced.p99_us),
                limit: "<=",
                pass: e.paced.p99_us <= h.paced.p99_us,
            });
        }
        if let (Some(d), Some(e)) = (direct, enforced) {
            let added = e.paced.p50_us - d.paced.p50_us;
            t.push(Target {
                what: "enforced p50 added at fixed rate",
                value: format!("{added:.0} µs"),
                limit: "<= 60 µs",
                pass: added <= 60.0,
            });
        }
        if let Some(cpu) = enforced.and_then(|e| e.cpu_per_1k) {
            t.push(Target {
                what: "agent CPU per 1,000 req/s, enforced",
                value: format!("{cpu:.3} core"),
                limit: "<= 0.05 core",
                pass: cpu <= 0.05,
            });
        }
        let rss = self
            .rows
            .iter()
            .filter(|r| r.process == "agent")
            .filter_map(|r| r.rss_kib.map(|(hwm, _)| (hwm, r.key)))
            .max();
        if let Some((hwm, key)) = rss {
            let mb = float(hwm) / 1024.0;
            t.push(Target {
                what: "agent peak RSS (VmHWM), largest row",
                value: format!("{mb:.1} MB ({key})"),
                limit: "<= 30 MB",
                pass: mb <= 30.0,
            });
        }
        t
    }

    fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(s, "Command: `{}`  ", self.command);
        let _ = writeln!(s, "Date: {}  ", self.date);
        let _ = writeln!(
            s,
            "Machine: {} cores, {}, {:.1} GiB, kernel {}; load average before {} / after {}  ",
            m.cores, m.cpu, m.memory_gib, m.kernel, self.load_before, self.load_after
        );
        let _ = writeln!(
            s,
            "Runs: closed loop {} connections for {} s (distinct tokens: at most 3 s, {COLD_CLOSED_TOKENS} tokens); fixed rate {} req/s for {} s (wrk, 1 thread, in the client pod); nginx, 1 worker, in the server pod\n",
            self.connections, self.duration, self.rate, self.duration
        );
        s.push_str("| scenario | closed loop req/s | closed p99 µs | fixed-rate req/s | p50 µs | p90 µs | p99 µs | CPU s / 1,000 req | peak RSS MB |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for r in &self.rows {
            let args = if r.agent_args.is_empty() {
                String::new()
            } else {
                format!(" (`{}`)", r.agent_args.join(" "))
            };
            let _ = writeln!(
                s,
                "| {}{args} | {}{:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                r.title,
                if r.closed.spent { "≥ " } else { "" },
                r.closed.rate,
                r.closed.p99_us,
                r.paced.rate,
                r.paced.p50_us,
                r.paced.p90_us,
                r.paced.p99_us,
                r.cpu_per_1k
                    .map_or("-".into(), |c| format!("{c:.3} ({})", r.process)),
                r.rss_kib
                    .map_or("-".into(), |(hwm, _)| format!("{:.1}", float(hwm) / 1024.0)),
            );
        }
        if self.rows.iter().any(|r| r.closed.spent) {
            s.push_str(
                "\n≥: the row's distinct tokens ran out before the end of its closed loop (a lower bound).\n",
            );
        }
        s.push_str("\nTargets (issue 7), as ratios within this run:\n\n");
        for t in self.targets() {
            let _ = writeln!(
                s,
                "- {}: {}: {} (target {})",
                if t.pass { "PASS" } else { "FAIL" },
                t.what,
                t.value,
                t.limit
            );
        }
        s
    }

    fn json(&self) -> Value {
        let run = |r: &Run| {
            json!({
                "requests": r.requests, "seconds": r.seconds, "rate": r.rate,
                "rate_is_lower_bound": r.spent,
                "p50_us": r.p50_us, "p90_us": r.p90_us, "p99_us": r.p99_us,
            })
        };
        json!({
            "command": self.command,
            "date": self.date,
            "machine": {
                "cpu": self.machine.cpu, "cores": self.machine.cores,
                "memory_gib": self.machine.memory_gib, "kernel": self.machine.kernel,
                "loadavg_before": self.load_before, "loadavg_after": self.load_after,
            },
            "config": {"duration_s": self.duration, "connections": self.connections, "rate": self.rate},
            "rows": self.rows.iter().map(|r| json!({
                "key": r.key, "title": r.title, "agent_args": r.agent_args,
                "closed": run(&r.closed), "paced": run(&r.paced),
                "process": r.process,
                "cpu_seconds_per_1000": r.cpu_per_1k,
                "vm_hwm_kib": r.rss_kib.map(|x| x.0), "vm_rss_kib": r.rss_kib.map(|x| x.1),
            })).collect::<Vec<_>>(),
            "targets": self.targets().iter().map(|t| json!({
                "what": t.what, "value": t.value, "target": t.limit, "pass": t.pass,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Replaces what is between the bench markers of BENCHMARKS.md (the prose around stays).
fn record(path: &Path, markdown: &str) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let new = between_markers(&text, markdown).with_context(|| path.display().to_string())?;
    fs::write(path, new)?;
    Ok(())
}

fn between_markers(text: &str, markdown: &str) -> Result<String> {
    const BEGIN: &str = "<!-- bench:begin -->";
    const END: &str = "<!-- bench:end -->";
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("no {BEGIN} ... {END} markers");
    };
    ensure!(b < e, "{END} comes before {BEGIN}");
    Ok(format!("{}{BEGIN}\n{markdown}{}", &text[..b], &text[e..]))
}

fn command_line(args: &Args) -> String {
    let mut c = format!(
        "cargo xtask bench --duration {} --warmup {} --connections {} --rate {}",
        args.duration, args.warmup, args.connections, args.rate
    );
    if !args.only.is_empty() {
        let _ = write!(c, " --only {}", args.only.join(","));
    }
    if let Some(agent) = &args.agent {
        let _ = write!(c, " --agent {}", agent.display());
    }
    c
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_replaces_only_what_is_between_the_markers() {
        let text =
            "# Benchmarks\nprose\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nnotes\n";
        let new = between_markers(text, "new table\n").unwrap();
        assert_eq!(
            new,
            "# Benchmarks\nprose\n<!-- bench:begin -->\nnew table\n<!-- bench:end -->\nnotes\n"
        );
        assert!(between_markers("no markers", "x").is_err());
    }

    #[test]
    fn cpu_and_rss_of_a_live_process_are_read() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        let (hwm, rss) = rss_kib(pid).unwrap();
        assert!(hwm >= rss && rss > 0, "VmHWM {hwm} VmRSS {rss}");
    }

    #[test]
    fn the_wrk_script_paces_and_rotates_tokens_only_when_asked() {
        let closed = wrk_script(Path::new("/r.json"), None, None, "T").unwrap();
        assert!(closed.contains(r#"wrk.headers["Authorization"] = "Bearer T""#));
        assert!(!closed.contains("function delay") && !closed.contains("function request"));
        let paced =
            wrk_script(Path::new("/r.json"), Some(10.0), Some(Path::new("/t")), "T").unwrap();
        assert!(paced.contains("function delay") && paced.contains("function request"));
        assert!(paced.contains(r#"io.lines("/t")"#));
    }
}
