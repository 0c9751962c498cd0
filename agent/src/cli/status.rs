//! `nodeward status`: the live state of a running agent, for an operator. Reads `/readyz`,
//! `/debug/state` and `/metrics` from the admin server and prints readiness (with the failing
//! checks), the configuration in force and its errors, the workloads and what protects them,
//! the issuers and their key ids, and the request counters.
//!
//! Exit status: 0 ready, 1 answering but not ready, 2 no agent (or not one this version reads).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::time::Duration;

use clap::{Args, ValueEnum as _};
use serde::Serialize;

use super::check::Output;
use crate::admin::client::{self, ClientError};
use crate::admin::state::{DebugState, WorkloadState};

pub const EXIT_READY: u8 = 0;
pub const EXIT_NOT_READY: u8 = 1;
pub const EXIT_NO_AGENT: u8 = 2;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The agent's admin address (`nodeward run --admin`).
    #[arg(long, default_value = "127.0.0.1:15000", value_name = "ADDR")]
    pub admin: String,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Why the status could not be shown (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The agent could not be asked.
    #[error("{0}")]
    Admin(#[from] ClientError),
    /// `/debug/state` is not the document this version reads (another program on the port,
    /// or an agent of another version).
    #[error("the agent at {addr} answered /debug/state with something this nodeward does not read (HTTP {status}): {error}")]
    State {
        addr: String,
        status: u16,
        error: String,
    },
}

/// Counters read from `/metrics`.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct Counters {
    /// `nodeward_requests_total` summed by decision.
    pub requests: BTreeMap<String, f64>,
    /// `nodeward_requests_total` by workload, then decision.
    pub requests_by_workload: BTreeMap<String, BTreeMap<String, f64>>,
    /// `nodeward_refused_total` by reason.
    pub refused: BTreeMap<String, f64>,
    /// `nodeward_connections_open`.
    pub connections_open: f64,
    /// `nodeward_config_reloads_total` by result.
    pub reloads: BTreeMap<String, f64>,
    /// `nodeward_datapath_packets_total` by counter (kernel programs).
    pub datapath: BTreeMap<String, f64>,
}

/// Everything `status` shows; its JSON output.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub admin: String,
    pub ready: bool,
    /// The `/readyz` body, one line per check.
    pub readyz: String,
    pub state: DebugState,
    pub counters: Counters,
}

/// Runs the command; returns the exit status.
#[must_use]
pub fn run(args: &StatusArgs) -> u8 {
    match fetch(&args.admin) {
        Ok(status) => {
            let out = match args.output {
                Output::Json => serde_json::to_string_pretty(&status).unwrap_or_default(),
                Output::Text => render(&status),
            };
            let _ = writeln!(std::io::stdout(), "{out}");
            if status.ready {
                EXIT_READY
            } else {
                EXIT_NOT_READY
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_NO_AGENT
        }
    }
}

/// Asks the agent at `addr`.
pub fn fetch(addr: &str) -> Result<Status, StatusError> {
    let readyz = client::get(addr, "/readyz")?;
    let state = client::get(addr, "/debug/state")?;
    let parsed: DebugState = match (state.status, serde_json::from_str(&state.body)) {
        (200, Ok(parsed)) => parsed,
        (status, Err(e)) => {
            return Err(StatusError::State {
                addr: addr.to_owned(),
                status,
                error: e.to_string(),
            })
        }
        (status, Ok(_)) => {
            return Err(StatusError::State {
                addr: addr.to_owned(),
                status,
                error: state.body.trim().to_owned(),
            })
        }
    };
    let metrics = client::get(addr, "/metrics")?;
    Ok(Status {
        admin: addr.to_owned(),
        ready: readyz.status == 200,
        readyz: readyz.body.trim_end().to_owned(),
        state: parsed,
        counters: counters(&metrics.body),
    })
}

/// One sample line of the text exposition: name, labels, value.
fn sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') || line.is_empty() {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        };
        rest = &body[end + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, labels, value))
}

/// The counters `status` shows, from the `/metrics` text.
#[must_use]
pub fn counters(text: &str) -> Counters {
    let mut out = Counters::default();
    for (name, labels, value) in text.lines().filter_map(sample) {
        let label = |key: &str| labels.get(key).cloned().unwrap_or_default();
        match name {
            "nodeward_requests_total" => {
                *out.requests.entry(label("decision")).or_default() += value;
                *out.requests_by_workload
                    .entry(label("workload"))
                    .or_default()
                    .entry(label("decision"))
                    .or_default() += value;
            }
            "nodeward_refused_total" => *out.refused.entry(label("reason")).or_default() += value,
            "nodeward_connections_open" => out.connections_open = value,
            "nodeward_config_reloads_total" => {
                *out.reloads.entry(label("result")).or_default() += value;
            }
            "nodeward_datapath_packets_total" => {
                *out.datapath.entry(label("counter")).or_default() += value;
            }
            _ => {}
        }
    }
    out
}

fn count(map: &BTreeMap<String, f64>, key: &str) -> String {
    number(map.get(key).copied().unwrap_or(0.0))
}

fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value}")
    }
}

fn workload_line(w: &WorkloadState) -> String {
    let mut parts = Vec::new();
    if !w.jwt_rules.is_empty() {
        parts.push(format!("jwt {}", w.jwt_rules.join(", ")));
    }
    let p = &w.policies;
    for (action, ids) in [
        ("CUSTOM", &p.custom),
        ("DENY", &p.deny),
        ("ALLOW", &p.allow),
        ("AUDIT", &p.audit),
        ("dry-run", &p.dry_run),
    ] {
        if !ids.is_empty() {
            parts.push(format!("{action} {}", ids.join(", ")));
        }
    }
    format!(
        "  {:<24} {:<15} sa {:<12} {:<11} {}",
        w.id,
        w.ip,
        w.service_account,
        if w.protected {
            "protected"
        } else {
            "unprotected"
        },
        parts.join("; ")
    )
    .trim_end()
    .to_owned()
}

/// The operator's summary.
#[must_use]
pub fn render(status: &Status) -> String {
    let s = &status.state;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent:     {} {}",
        status.admin,
        if status.ready { "READY" } else { "NOT READY" }
    );
    for line in status.readyz.lines().filter(|l| l.starts_with('[')) {
        let _ = writeln!(out, "           {line}");
    }
    let c = &s.config;
    let _ = writeln!(
        out,
        "config:    generation {}, loaded {} ago ({})",
        s.generation,
        humantime::format_duration(Duration::from_secs(s.age_seconds)),
        s.loaded_at
    );
    let _ = writeln!(
        out,
        "           listen {}, steering {}, failure mode {}, root namespace {}, trust domain {}, path normalization {}",
        c.listen,
        c.steering.as_str(),
        c.failure_mode.as_str(),
        c.root_namespace,
        c.trust_domain,
        c.path_normalization
            .to_possible_value()
            .as_ref()
            .map_or("", clap::builder::PossibleValue::get_name)
    );
    if let Some(k) = &c.kubernetes {
        let _ = writeln!(out, "           Kubernetes mode, node {}", k.node_name);
    } else {
        let policies: Vec<String> = c.policies.iter().map(|p| p.display().to_string()).collect();
        let _ = writeln!(
            out,
            "           policies {}; workloads {}{}",
            policies.join(", "),
            c.workloads.as_deref().unwrap_or(Path::new("")).display(),
            c.mesh_config
                .as_ref()
                .map(|m| format!("; mesh config {}", m.display()))
                .unwrap_or_default()
        );
    }
    if s.errors.is_empty() {
        let _ = writeln!(out, "errors:    none");
    } else {
        let _ = writeln!(
            out,
            "errors:    {} (the last good state serves meanwhile)",
            s.errors.len()
        );
        for error in &s.errors {
            let _ = writeln!(out, "  - {error}");
        }
    }
    render_registry(&mut out, s);
    render_counters(&mut out, &status.counters);
    if let Some(f) = &s.fast_path {
        let k = &status.counters.datapath;
        let cgroup = f
            .cgroup
            .as_ref()
            .map(|c| format!(" (cgroup {})", c.display()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "fast path: {}{cgroup}, {} sockets; added {} (key taken {}, not opened through steer/guard {}); messages redirected {}, passed to TCP {}",
            f.mode,
            f.sockets,
            count(k, "fastpath_sockets_added"),
            count(k, "fastpath_sockets_failed"),
            count(k, "fastpath_sockets_unsteered"),
            count(k, "fastpath_msgs_redirected"),
            count(k, "fastpath_msgs_passed"),
        );
    }
    out.trim_end().to_owned()
}

/// Workloads, policies and issuers.
fn render_registry(out: &mut String, s: &DebugState) {
    let protected = s.workloads.iter().filter(|w| w.protected).count();
    let _ = writeln!(
        out,
        "workloads: {} ({protected} protected)",
        s.workloads.len()
    );
    for w in &s.workloads {
        let _ = writeln!(out, "{}", workload_line(w));
    }
    let _ = writeln!(out, "policies:  {}", s.policies.len());
    for p in &s.policies {
        let applies = if p.workloads.is_empty() {
            "no workload of the registry".to_owned()
        } else {
            p.workloads.join(", ")
        };
        let _ = writeln!(
            out,
            "  {:<6} {}{} -> {applies}  ({})",
            p.action,
            p.id,
            if p.dry_run { " [dry-run]" } else { "" },
            p.file
        );
    }
    if !s.providers.is_empty() {
        let _ = writeln!(out, "providers: {}", s.providers.len());
    }
    for p in &s.providers {
        if p.errors.is_empty() {
            let _ = writeln!(
                out,
                "  {}  {} {}  timeout {}  {}",
                p.name,
                p.kind.as_deref().unwrap_or_default(),
                p.service.as_deref().unwrap_or_default(),
                p.timeout.as_deref().unwrap_or_default(),
                if p.fail_open {
                    "failOpen".to_owned()
                } else {
                    format!("statusOnError {}", p.status_on_error.unwrap_or(403))
                }
            );
        } else {
            let _ = writeln!(
                out,
                "  {}  INVALID (CUSTOM policies naming it deny): {}",
                p.name,
                p.errors.join("; ")
            );
        }
    }
    let _ = writeln!(out, "issuers:   {}", s.issuers.len());
    for i in &s.issuers {
        let kids = if i.kids.is_empty() {
            "no keys".to_owned()
        } else {
            format!("kids {}", i.kids.join(", "))
        };
        let _ = writeln!(out, "  {}  {}  {}  {kids}", i.issuer, i.source, i.state);
        if let Some(error) = &i.last_error {
            let _ = writeln!(out, "      last error: {error}");
        }
        if let Some(age) = i.age_seconds {
            let _ = writeln!(
                out,
                "      fetched {} ago; {} fetch(es), {} failed",
                humantime::format_duration(Duration::from_secs(age)),
                i.fetches,
                i.failures
            );
        }
    }
}

fn render_counters(out: &mut String, k: &Counters) {
    let refused = k.refused.values().fold(0.0, |sum, v| sum + v);
    let _ = writeln!(
        out,
        "requests:  allow {}, deny {}; refused {}; open connections {}; reloads ok {}, error {}",
        count(&k.requests, "allow"),
        count(&k.requests, "deny"),
        number(refused),
        number(k.connections_open),
        count(&k.reloads, "ok"),
        count(&k.reloads, "error"),
    );
    if count(&k.datapath, "inpod_seen") != "0" {
        let _ = writeln!(
            out,
            "in-pod:    steered {} new flows; dropped closed {}, unjudged {}, spoofed {}, malformed {}; passed open {}",
            count(&k.datapath, "inpod_assigned_listener"),
            count(&k.datapath, "inpod_dropped_failure_closed"),
            count(&k.datapath, "inpod_dropped_unjudged"),
            count(&k.datapath, "inpod_dropped_spoofed"),
            count(&k.datapath, "inpod_dropped_malformed"),
            count(&k.datapath, "inpod_passed_failure_open"),
        );
    } else if !k.datapath.is_empty() {
        let _ = writeln!(
            out,
            "datapath:  steered {} (new flows {}, established {}); dropped closed {}, guard dropped {} bypass; passed open {}",
            count(&k.datapath, "steered"),
            count(&k.datapath, "assigned_listener"),
            count(&k.datapath, "assigned_established"),
            count(&k.datapath, "dropped_failure_closed"),
            count(&k.datapath, "guard_dropped_bypass"),
            count(&k.datapath, "passed_failure_open"),
        );
    }

    for (workload, decisions) in &k.requests_by_workload {
        let _ = writeln!(
            out,
            "  {workload:<24} allow {}, deny {}",
            count(decisions, "allow"),
            count(decisions, "deny")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_from_the_text_exposition() {
        let text = "# HELP nodeward_requests Requests judged by the enforcer\n\
            # TYPE nodeward_requests counter\n\
            nodeward_requests_total{workload=\"foo/httpbin\",decision=\"allow\",code=\"200\",reason=\"allowed\"} 3\n\
            nodeward_requests_total{workload=\"foo/httpbin\",decision=\"deny\",code=\"403\",reason=\"no_allow_matched\"} 2\n\
            nodeward_requests_total{workload=\"-\",decision=\"deny\",code=\"503\",reason=\"a \\\"quoted\\\" } reason\"} 1\n\
            nodeward_refused_total{reason=\"header_too_large\"} 4\n\
            nodeward_connections_open 7\n\
            nodeward_config_reloads_total{result=\"ok\"} 1\n\
            # EOF\n";
        let c = counters(text);
        assert_eq!(count(&c.requests, "allow"), "3");
        assert_eq!(count(&c.requests, "deny"), "3");
        assert_eq!(count(&c.requests_by_workload["foo/httpbin"], "deny"), "2");
        assert_eq!(count(&c.requests_by_workload["-"], "deny"), "1");
        assert_eq!(count(&c.refused, "header_too_large"), "4");
        assert_eq!(number(c.connections_open), "7");
        assert_eq!(count(&c.reloads, "ok"), "1");
        assert_eq!(count(&c.reloads, "error"), "0");
    }
}
