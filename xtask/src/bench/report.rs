//! The report of a bench: each row's numbers and the targets as PASS/FAIL ratio lines, as
//! markdown (`bench.md`, and BENCHMARKS.md with `--record`) and JSON (`bench.json`).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};

use crate::system;

use super::runner::{RowResult, Run};
use super::{float, Args, COLD_CLOSED_TOKENS};

pub(super) struct Report {
    pub(super) machine: Machine,
    pub(super) load_before: String,
    pub(super) load_after: String,
    pub(super) command: String,
    pub(super) date: String,
    pub(super) duration: u64,
    pub(super) connections: u32,
    pub(super) rate: u32,
    pub(super) rows: Vec<RowResult>,
}

pub(super) struct Machine {
    pub(super) cpu: String,
    pub(super) cores: usize,
    pub(super) memory_gib: f64,
    pub(super) kernel: String,
}

pub(super) fn machine() -> Result<Machine> {
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

/// One of the bench's targets (throughput, added latency, CPU, memory), as a ratio within this
/// run.
pub(super) struct Target {
    pub(super) what: &'static str,
    pub(super) value: String,
    pub(super) limit: &'static str,
    pub(super) pass: bool,
}

impl Report {
    pub(super) fn row(&self, key: &str) -> Option<&RowResult> {
        self.rows.iter().find(|r| r.key == key)
    }

    pub(super) fn targets(&self) -> Vec<Target> {
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

    pub(super) fn markdown(&self) -> String {
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
        s.push_str("\nTargets, as ratios within this run:\n\n");
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

    pub(super) fn json(&self) -> Value {
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
pub(super) fn record(path: &Path, markdown: &str) -> Result<()> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let new = between_markers(&text, markdown).with_context(|| path.display().to_string())?;
    fs::write(path, new)?;
    Ok(())
}

pub(super) fn between_markers(text: &str, markdown: &str) -> Result<String> {
    const BEGIN: &str = "<!-- bench:begin -->";
    const END: &str = "<!-- bench:end -->";
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("no {BEGIN} ... {END} markers");
    };
    ensure!(b < e, "{END} comes before {BEGIN}");
    Ok(format!("{}{BEGIN}\n{markdown}{}", &text[..b], &text[e..]))
}

pub(super) fn command_line(args: &Args) -> String {
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
}
