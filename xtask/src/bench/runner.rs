//! Running the rows: the node (namespaces, nginx, wrk), the agent or HAProxy under test, the
//! answers each row must give before it is measured, the wrk runs (closed loop and paced), and
//! the CPU and memory of the process under test.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use nodeward_tests::netns::{pod_ip, Pod, TestNode, NODE_ADDR};
use serde_json::Value;

use crate::system;

use super::fixtures::{haproxy_cfg, mint, mint_parallel, policies_yaml, write_nginx_conf, Signer};
use super::report::{command_line, machine, Report};
use super::{
    check_interrupted, count, float, float_count, path_str, rows, tail, which, AgentRow, Args,
    Policies, Proxy, Row, TempDir, Tokens, BODY, CLIENT, COLD_CLOSED_TOKENS, PIN_DIR, PORT, SERVER,
};

pub(super) struct Bench<'a> {
    pub(super) args: &'a Args,
    pub(super) root: PathBuf,
    pub(super) out: PathBuf,
    pub(super) nodeward: PathBuf,
    // Dropped before `dir` (fields drop in order): processes and namespaces first.
    pub(super) node: TestNode,
    /// The node's cgroup v2, the agent's `--cgroup`.
    pub(super) cgroup: PathBuf,
    pub(super) dir: TempDir,
    pub(super) server: Pod,
    pub(super) client: Pod,
}

/// One wrk run's numbers (from its `done()` hook).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Run {
    pub(super) requests: u64,
    pub(super) seconds: f64,
    pub(super) rate: f64,
    /// The distinct tokens ran out before the end: wrk's clock runs to the end of the run,
    /// so `rate` is a lower bound.
    pub(super) spent: bool,
    pub(super) p50_us: f64,
    pub(super) p90_us: f64,
    pub(super) p99_us: f64,
}

pub(super) struct RowResult {
    pub(super) key: &'static str,
    pub(super) title: &'static str,
    pub(super) agent_args: Vec<String>,
    pub(super) closed: Run,
    pub(super) paced: Run,
    /// CPU seconds of the agent / HAProxy per 1,000 requests of the paced run.
    pub(super) cpu_per_1k: Option<f64>,
    /// Peak and current RSS of the agent / HAProxy, KiB.
    pub(super) rss_kib: Option<(u64, u64)>,
    pub(super) process: &'static str,
}

impl<'a> Bench<'a> {
    pub(super) fn new(args: &'a Args, root: &Path, out: &Path, nodeward: PathBuf) -> Result<Self> {
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

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Policies, workloads, tokens, HAProxy's config and key.
    pub(super) fn write_inputs(&self) -> Result<()> {
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

    pub(super) fn workloads_yaml(&self) -> String {
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

    pub(super) fn runs_row(&self, key: &str) -> bool {
        self.args.only.is_empty() || self.args.only.iter().any(|k| k == key)
    }

    pub(super) fn run_all(&mut self) -> Result<Report> {
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

    pub(super) fn run_row(&mut self, row: &Row) -> Result<RowResult> {
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

    pub(super) fn measure(
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

    pub(super) fn start_agent(
        &mut self,
        key: &str,
        agent: &AgentRow,
    ) -> Result<(u32, Vec<String>)> {
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
            "--netns-dir".into(),
            path_str(self.node.netns_dir())?.to_owned(),
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

    pub(super) fn start_haproxy(&mut self) -> Result<u32> {
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

    pub(super) fn start_perf(&mut self, key: &str, pid: u32) -> u32 {
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
    pub(super) fn check_answers(&self, row: &Row, url: &str) -> Result<()> {
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

    pub(super) fn curl(&self, url: &str, token: Option<&str>) -> (u16, String) {
        let header = token.map(|t| format!("Authorization: Bearer {}", t.trim()));
        let headers: Vec<&str> = header.iter().map(String::as_str).collect();
        self.node.curl(&self.client.netns, "GET", url, &headers)
    }

    pub(super) fn wait_status(
        &self,
        url: &str,
        token: Option<&str>,
        expected: u16,
        what: &str,
    ) -> Result<()> {
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

    pub(super) fn wait_http(&self, url: &str, what: &str) -> Result<()> {
        let token = fs::read_to_string(self.path("token-same"))?;
        self.wait_status(url, Some(&token), 200, what)
    }

    /// Waits (at most 30 s) for the agent's /readyz in the node namespace.
    pub(super) fn wait_ready(&self, log: &Path) -> Result<()> {
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
    pub(super) fn wrk(
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
pub(super) enum Load {
    /// Each connection sends its next request as soon as the answer arrives.
    Closed,
    /// Each connection waits between requests so the total is about `--rate`.
    Paced,
}

/// The wrk script of one run: the Authorization header (one token, or the next of a file per
/// request), optional pacing, and a `done()` writing JSON (a status >= 400 counts as an error).
pub(super) fn wrk_script(
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

/// utime + stime of a process, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64> {
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
pub(super) fn rss_kib(pid: u32) -> Result<(u64, u64)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
