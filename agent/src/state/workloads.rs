//! The registry of pods when there is no Kubernetes: the `--workloads` file of `nodeward run`.
//!
//! ```yaml
//! workloads:
//!   - name: httpbin                # pod name (required)
//!     namespace: foo               # required: it decides which policies apply
//!     serviceAccount: httpbin      # default "default"
//!     labels: {app: httpbin, version: v1}
//!     ip: 10.0.0.12                # IPv4 or IPv6 (required)
//!     interface: veth-httpbin      # host-side interface of the pod; optional
//!     probes:                      # optional: the kubelet's probe endpoints (see below)
//!       - {port: 8080, path: /healthz}   # HTTP: GET of exactly this path
//!       - {port: 9000}                   # TCP: a plain TCP connection to this port
//!     ports:                       # optional: declared protocols (see below)
//!       - {port: 8080, protocol: HTTP}
//!       - {port: 5432, protocol: TCP}
//! ```
//!
//! `ports` declares what a port speaks, with Istio's protocol names (`HTTP`, `HTTP2`, `GRPC`,
//! `GRPC-Web`, `HTTP_PROXY`, `HTTPS`, `TLS`, `TCP`, `Mongo`, `Redis`, `MySQL`; any case), as a
//! Kubernetes Service port's `appProtocol` or name prefix does. A port declared HTTP is never
//! sniffed: bytes that are not HTTP get 400. A port declared TCP-like is judged with TCP
//! semantics from the first byte (server-first protocols need no detection wait). Undeclared
//! ports are sniffed (`enforcer::sniff`).
//!
//! `probes` are the only requests the enforcer lets through without authentication and
//! authorization, and only from the node's own addresses (`enforcer::probe`): what the kubelet
//! needs to keep the pod alive. A path is written in normal form (as the enforcer normalizes
//! requests: `.`/`..` resolved, no `%`-escapes of unreserved characters), without query or
//! fragment; it is compared exactly.
//!
//! Entries whose IP is not on this node still give source identity (namespace, service
//! account) to their traffic. Every entry is checked on its own: an entry that breaks a rule
//! (unknown field, bad IP, a name Kubernetes would refuse, an IP or `namespace/name` already
//! listed) is reported with the file, its index, its name and the field, and the other entries
//! still load. A file that is not YAML, or has no `workloads:` list, is bad as a whole
//! ([`WorkloadsFileError`]).
//!
//! `namespace` is required rather than defaulted to `default`: a forgotten namespace would
//! silently give the pod another namespace's policies and a wrong principal.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::normalize_ip;

/// The only top-level key of a workloads file.
pub const KEY: &str = "workloads";
/// The service account of an entry that names none (Kubernetes' default).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// One pod: who it is (namespace, service account, labels) and where (IP, interface).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// The pod's name.
    pub name: String,
    pub namespace: String,
    /// The service account's name (without the namespace).
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// The pod's address; IPv4-mapped IPv6 addresses are stored as IPv4.
    pub ip: IpAddr,
    /// The host-side interface of the pod, when the file names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The pod's probe endpoints (standalone: the file's `probes`; Kubernetes: the pod's
    /// httpGet/tcpSocket liveness, readiness and startup probes). Empty: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<Probe>,
    /// Ports whose protocol is declared (standalone: the file's `ports`; Kubernetes: the
    /// `appProtocol` or name prefix of the Service ports that select the pod). At most one
    /// entry per port. Undeclared ports are sniffed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<DeclaredPort>,
}

/// A port's declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct DeclaredPort {
    pub port: u16,
    pub protocol: PortProtocol,
}

/// Istio's protocol names (`pkg/config/protocol`), as a Service port declares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PortProtocol {
    #[serde(rename = "HTTP")]
    Http,
    #[serde(rename = "HTTP2")]
    Http2,
    #[serde(rename = "HTTP_PROXY")]
    HttpProxy,
    #[serde(rename = "GRPC")]
    Grpc,
    #[serde(rename = "GRPC-Web")]
    GrpcWeb,
    #[serde(rename = "HTTPS")]
    Https,
    #[serde(rename = "TLS")]
    Tls,
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "Mongo")]
    Mongo,
    #[serde(rename = "Redis")]
    Redis,
    #[serde(rename = "MySQL")]
    MySql,
    /// UDP: never reaches the enforcer (TCP only); kept so a declaration is not lost.
    #[serde(rename = "UDP")]
    Udp,
}

impl PortProtocol {
    /// Istio's `protocol.Parse`: the name in any case; `None` for a name Istio does not know
    /// (its `Unsupported`: such a port is sniffed).
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "http" => Self::Http,
            "http2" => Self::Http2,
            "http_proxy" => Self::HttpProxy,
            "grpc" => Self::Grpc,
            "grpc-web" => Self::GrpcWeb,
            "https" => Self::Https,
            "tls" => Self::Tls,
            "tcp" => Self::Tcp,
            "mongo" => Self::Mongo,
            "redis" => Self::Redis,
            "mysql" => Self::MySql,
            "udp" => Self::Udp,
            _ => return None,
        })
    }

    /// HTTP, HTTP2, `HTTP_PROXY`, GRPC and GRPC-Web: parsed as HTTP, never sniffed (Istio's
    /// `IsHTTP`).
    #[must_use]
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Self::Http | Self::Http2 | Self::HttpProxy | Self::Grpc | Self::GrpcWeb
        )
    }

    /// HTTPS and TLS: the ClientHello is read for `connection.sni` (Istio's `IsTLS`).
    #[must_use]
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Https | Self::Tls)
    }
}

impl fmt::Display for PortProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Self::Http => "HTTP",
            Self::Http2 => "HTTP2",
            Self::HttpProxy => "HTTP_PROXY",
            Self::Grpc => "GRPC",
            Self::GrpcWeb => "GRPC-Web",
            Self::Https => "HTTPS",
            Self::Tls => "TLS",
            Self::Tcp => "TCP",
            Self::Mongo => "Mongo",
            Self::Redis => "Redis",
            Self::MySql => "MySQL",
            Self::Udp => "UDP",
        };
        f.write_str(name)
    }
}

/// One probe endpoint of a pod: an HTTP `GET` of `path` on `port`, or (no `path`) a plain TCP
/// connection to `port`. Build it with [`Probe::http`] or [`Probe::tcp`], which check it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Probe {
    /// The pod's TCP port the probe connects to (1-65535).
    pub port: u16,
    /// The HTTP path, in normal form, without query; `None` for a TCP probe.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl Probe {
    /// A TCP probe of `port`; port 0 is refused.
    pub fn tcp(port: u16) -> Result<Self, ProbeProblem> {
        if port == 0 {
            return Err(ProbeProblem::Port);
        }
        Ok(Self { port, path: None })
    }

    /// An HTTP probe: `GET path` on `port`. The path must start with `/`, have no query,
    /// fragment, whitespace or control characters, and be in normal form (what
    /// [`crate::authz::path::normalize`] with Istio's default `BASE` makes of it), since requests
    /// are compared with it exactly after normalization.
    pub fn http(port: u16, path: &str) -> Result<Self, ProbeProblem> {
        let tcp = Self::tcp(port)?;
        let bad = |why: &'static str| ProbeProblem::Path {
            path: path.to_owned(),
            why,
        };
        if !path.starts_with('/') {
            return Err(bad("must start with '/'"));
        }
        if path.contains(['?', '#']) {
            return Err(bad(
                "no query or fragment: the query of a probe request is ignored when matching",
            ));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad("no whitespace or control characters"));
        }
        match crate::authz::path::normalize(path, crate::authz::path::Normalization::Base) {
            Ok(normal) if normal.path == path => Ok(Self {
                path: Some(path.to_owned()),
                ..tcp
            }),
            Ok(_) => Err(bad(
                "not in normal form ('.'/'..' segments, '\\', or %-escapes the enforcer rewrites)",
            )),
            Err(_) => Err(bad("not a valid request path")),
        }
    }
}

/// What is wrong with one `probes` entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeProblem {
    /// Port 0 (the schema already refuses values outside 0-65535).
    #[error("port must be 1 to 65535")]
    Port,
    /// An HTTP path that cannot be compared with normalized requests.
    #[error("path {path:?}: {why}")]
    Path { path: String, why: &'static str },
}

impl Workload {
    /// `namespace/name`, the way errors, logs and metrics name a workload.
    #[must_use]
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The declared protocol of `port`, if any.
    #[must_use]
    pub fn port_protocol(&self, port: u16) -> Option<PortProtocol> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.protocol)
    }
}

/// A workloads file that cannot be used at all.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadsFileError {
    /// The file could not be read (missing, permissions, not UTF-8).
    #[error("cannot read workloads file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not YAML (or holds more than one document); nothing in it can be trusted.
    #[error("workloads file {}: not valid YAML: {source}", path.display())]
    Yaml {
        path: PathBuf,
        #[source]
        source: serde_yaml::Error,
    },
    /// The top level is not a mapping with a `workloads` key (an empty file included).
    #[error(
        "workloads file {}: no `workloads:` list at the top level (an empty registry is `workloads: []`)",
        path.display()
    )]
    MissingKey { path: PathBuf },
    /// `workloads` is there but is not a list of entries.
    #[error("workloads file {}: `workloads` must be a list of entries", path.display())]
    NotAList { path: PathBuf },
    /// A top-level key other than `workloads` (often a typo).
    #[error("workloads file {}: unknown top-level key {key:?} (only `workloads` is read)", path.display())]
    UnknownKey { path: PathBuf, key: String },
}

/// What is wrong with one field of an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkloadProblem {
    /// The entry is not a mapping of fields.
    #[error("an entry must be a mapping of fields (name, namespace, ip, ...)")]
    NotAMapping,
    /// The entry does not fit the schema: an unknown field (often a typo) or a value of the
    /// wrong type (label values must be strings: quote `"1"` and `"true"`).
    #[error("{0}")]
    Schema(String),
    /// A required field is missing or empty.
    #[error("must be set")]
    Required,
    /// `ip` is not an IPv4 or IPv6 address.
    #[error("{0:?} is not an IP address (write one address, without a prefix length or zone)")]
    Ip(String),
    /// `ip` can never be a pod's address (unspecified, multicast, broadcast).
    #[error("{0} is not a unicast address, so it cannot be a pod's")]
    NotUnicast(IpAddr),
    /// A name, label or interface breaks the syntax Kubernetes or Linux would enforce.
    #[error("{value:?} is not a valid {what}: {why}")]
    Syntax {
        value: String,
        what: &'static str,
        why: &'static str,
    },
    /// A `probes` entry is invalid.
    #[error("{0}")]
    Probe(ProbeProblem),
    /// A `ports` entry's port is 0.
    #[error("port must be 1 to 65535")]
    Port,
    /// A `ports` entry's protocol is not one of Istio's names.
    #[error("{0:?} is not a protocol Istio knows (HTTP, HTTP2, HTTP_PROXY, GRPC, GRPC-Web, HTTPS, TLS, TCP, Mongo, Redis, MySQL, UDP)")]
    Protocol(String),
    /// A port declared twice in `ports`; the first declaration is kept.
    #[error("port {0} is already declared")]
    DuplicatePort(u16),
    /// An earlier entry already has this IP; the earlier one is kept.
    #[error("{ip} is already the address of workloads[{index}] ({entry})")]
    DuplicateIp {
        ip: IpAddr,
        index: usize,
        entry: String,
    },
    /// An earlier entry already has this `namespace/name`; the earlier one is kept.
    #[error("{entry} is already listed as workloads[{index}]")]
    DuplicateName { entry: String, index: usize },
}

/// One problem with one entry; the entry is left out and the others still load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadError {
    pub file: PathBuf,
    /// 0-based position in the `workloads` list.
    pub index: usize,
    /// `namespace` of the entry as written, when it is a string.
    pub namespace: Option<String>,
    /// `name` of the entry as written, when it is a string.
    pub name: Option<String>,
    /// The field at fault (`ip`, `labels.app`, ...); empty for the entry as a whole.
    pub field: String,
    pub problem: WorkloadProblem,
}

impl WorkloadError {
    /// `namespace/name` as far as the entry says it, for messages.
    #[must_use]
    pub fn entry(&self) -> String {
        entry_label(self.namespace.as_deref(), self.name.as_deref())
    }

    /// `(namespace, name)` when the entry states both, to match it with an earlier version.
    #[must_use]
    pub fn id(&self) -> Option<(&str, &str)> {
        Some((self.namespace.as_deref()?, self.name.as_deref()?))
    }
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: workloads[{}] ({}): ",
            self.file.display(),
            self.index,
            self.entry()
        )?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.problem)
    }
}

impl std::error::Error for WorkloadError {}

/// What a workloads file yields: the entries that passed, and a report for each that did not.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkloadsLoad {
    pub workloads: Vec<Workload>,
    pub errors: Vec<WorkloadError>,
}

/// Reads and parses a workloads file.
pub fn load_workloads(path: &Path) -> Result<WorkloadsLoad, WorkloadsFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadsFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_workloads(path, &text)
}

/// Parses the text of a workloads file; `file` only names where it came from.
///
/// Errors of the file as a whole come back as `Err`; errors of single entries are in
/// [`WorkloadsLoad::errors`] and those entries are left out.
pub fn parse_workloads(file: &Path, text: &str) -> Result<WorkloadsLoad, WorkloadsFileError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|source| WorkloadsFileError::Yaml {
            path: file.to_path_buf(),
            source,
        })?;
    let Some(top) = value.as_mapping() else {
        return Err(WorkloadsFileError::MissingKey {
            path: file.to_path_buf(),
        });
    };
    if let Some(key) = top.keys().find(|k| k.as_str() != Some(KEY)) {
        return Err(WorkloadsFileError::UnknownKey {
            path: file.to_path_buf(),
            key: key_text(key),
        });
    }
    let entries = match top.get(KEY) {
        None => {
            return Err(WorkloadsFileError::MissingKey {
                path: file.to_path_buf(),
            })
        }
        Some(serde_yaml::Value::Null) => &[][..],
        Some(serde_yaml::Value::Sequence(entries)) => &entries[..],
        Some(_) => {
            return Err(WorkloadsFileError::NotAList {
                path: file.to_path_buf(),
            })
        }
    };

    let mut out = WorkloadsLoad::default();
    // Accepted entries by IP and by `namespace/name`, with their index, for duplicates.
    let mut by_ip: HashMap<IpAddr, (usize, String)> = HashMap::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (index, value) in entries.iter().enumerate() {
        let fail = |field: &str, problem: WorkloadProblem| WorkloadError {
            file: file.to_path_buf(),
            index,
            namespace: string_field(value, "namespace"),
            name: string_field(value, "name"),
            field: field.to_owned(),
            problem,
        };
        let workload = match entry(value) {
            Ok(workload) => workload,
            Err(problems) => {
                out.errors
                    .extend(problems.into_iter().map(|(field, p)| fail(&field, p)));
                continue;
            }
        };
        let id = workload.id();
        if let Some((first, first_id)) = by_ip.get(&workload.ip) {
            out.errors.push(fail(
                "ip",
                WorkloadProblem::DuplicateIp {
                    ip: workload.ip,
                    index: *first,
                    entry: first_id.clone(),
                },
            ));
            continue;
        }
        if let Some(first) = by_name.get(&id) {
            out.errors.push(fail(
                "name",
                WorkloadProblem::DuplicateName {
                    entry: id,
                    index: *first,
                },
            ));
            continue;
        }
        by_ip.insert(workload.ip, (index, id.clone()));
        by_name.insert(id, index);
        out.workloads.push(workload);
    }
    Ok(out)
}

/// An entry as written; every field optional so that each missing one is reported by name.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEntry {
    name: Option<String>,
    namespace: Option<String>,
    service_account: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    ip: Option<String>,
    interface: Option<String>,
    probes: Option<Vec<RawProbe>>,
    ports: Option<Vec<RawPort>>,
}

/// A `ports` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: u16,
    protocol: String,
}

/// A `probes` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    port: u16,
    path: Option<String>,
}

/// One entry checked; every problem it has, each with its field.
fn entry(value: &serde_yaml::Value) -> Result<Workload, Vec<(String, WorkloadProblem)>> {
    if !value.is_mapping() {
        return Err(vec![(String::new(), WorkloadProblem::NotAMapping)]);
    }
    let raw: RawEntry = serde_path_to_error::deserialize(value.clone()).map_err(|e| {
        let field = match e.path().to_string() {
            path if path == "." => String::new(),
            path => path,
        };
        vec![(field, WorkloadProblem::Schema(e.into_inner().to_string()))]
    })?;

    let mut problems = Vec::new();
    let mut required = |field: &str, value: Option<String>| match value {
        Some(v) if !v.is_empty() => Some(v),
        _ => {
            problems.push((field.to_owned(), WorkloadProblem::Required));
            None
        }
    };
    let name = required("name", raw.name);
    let namespace = required("namespace", raw.namespace);
    let ip_text = required("ip", raw.ip);

    let mut check =
        |field: String, value: &str, what, rule: fn(&str) -> Result<(), &'static str>| {
            if let Err(why) = rule(value) {
                problems.push((
                    field,
                    WorkloadProblem::Syntax {
                        value: value.to_owned(),
                        what,
                        why,
                    },
                ));
            }
        };
    if let Some(name) = &name {
        check("name".into(), name, "pod name", dns_subdomain);
    }
    if let Some(namespace) = &namespace {
        check("namespace".into(), namespace, "namespace", dns_label);
    }
    let service_account = raw
        .service_account
        .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_owned());
    check(
        "serviceAccount".into(),
        &service_account,
        "service account name",
        dns_subdomain,
    );
    let labels = raw.labels.unwrap_or_default();
    for (key, value) in &labels {
        check(format!("labels.{key}"), key, "label key", label_key);
        check(format!("labels.{key}"), value, "label value", label_value);
    }
    if let Some(interface) = &raw.interface {
        check(
            "interface".into(),
            interface,
            "interface name",
            interface_name,
        );
    }

    let probes = probes(raw.probes.unwrap_or_default(), &mut problems);
    let ports = ports(raw.ports.unwrap_or_default(), &mut problems);

    let ip = ip_text.and_then(|text| match text.parse::<IpAddr>() {
        Err(_) => {
            problems.push(("ip".into(), WorkloadProblem::Ip(text)));
            None
        }
        Ok(ip) => {
            let ip = normalize_ip(ip);
            if unicast(ip) {
                Some(ip)
            } else {
                problems.push(("ip".into(), WorkloadProblem::NotUnicast(ip)));
                None
            }
        }
    });

    match (name, namespace, ip) {
        (Some(name), Some(namespace), Some(ip)) if problems.is_empty() => Ok(Workload {
            name,
            namespace,
            service_account,
            labels,
            ip,
            interface: raw.interface,
            probes,
            ports,
        }),
        _ => Err(problems),
    }
}

/// The `probes` of an entry checked: the valid ones, and a problem (with its field) for each
/// other.
fn probes(raw: Vec<RawProbe>, problems: &mut Vec<(String, WorkloadProblem)>) -> Vec<Probe> {
    let mut probes = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        let probe = match &raw.path {
            Some(path) => Probe::http(raw.port, path),
            None => Probe::tcp(raw.port),
        };
        match probe {
            Ok(probe) => probes.push(probe),
            Err(problem) => {
                let field = match problem {
                    ProbeProblem::Port => format!("probes[{i}].port"),
                    ProbeProblem::Path { .. } => format!("probes[{i}].path"),
                };
                problems.push((field, WorkloadProblem::Probe(problem)));
            }
        }
    }
    probes
}

/// The `ports` of an entry checked: port 1-65535, a protocol Istio knows, each port once.
fn ports(raw: Vec<RawPort>, problems: &mut Vec<(String, WorkloadProblem)>) -> Vec<DeclaredPort> {
    let mut ports: Vec<DeclaredPort> = Vec::new();
    for (i, raw) in raw.into_iter().enumerate() {
        if raw.port == 0 {
            problems.push((format!("ports[{i}].port"), WorkloadProblem::Port));
            continue;
        }
        let Some(protocol) = PortProtocol::parse(&raw.protocol) else {
            problems.push((
                format!("ports[{i}].protocol"),
                WorkloadProblem::Protocol(raw.protocol),
            ));
            continue;
        };
        if ports.iter().any(|p| p.port == raw.port) {
            problems.push((
                format!("ports[{i}].port"),
                WorkloadProblem::DuplicatePort(raw.port),
            ));
            continue;
        }
        ports.push(DeclaredPort {
            port: raw.port,
            protocol,
        });
    }
    ports
}

fn unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

fn string_field(value: &serde_yaml::Value, key: &str) -> Option<String> {
    value
        .get(key)
        .and_then(serde_yaml::Value::as_str)
        .map(str::to_owned)
}

fn key_text(key: &serde_yaml::Value) -> String {
    match key {
        serde_yaml::Value::String(s) => s.clone(),
        other => serde_yaml::to_string(other).map_or_else(
            |_| "<non-string key>".to_owned(),
            |s| s.trim_end().to_owned(),
        ),
    }
}

fn entry_label(namespace: Option<&str>, name: Option<&str>) -> String {
    match (namespace, name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.to_owned(),
        (Some(ns), None) => format!("{ns}/<unnamed>"),
        (None, None) => "<unnamed>".to_owned(),
    }
}

/// RFC 1123 label, as Kubernetes checks namespaces: at most 63 characters, lower-case
/// letters, digits and `-`, starting and ending with a letter or digit.
fn dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lower-case letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// RFC 1123 subdomain, as Kubernetes checks pod and service account names: at most 253
/// characters, dot-separated RFC 1123 labels.
fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1 to 253 characters");
    }
    s.split('.').try_for_each(|part| {
        dns_label(part).map_err(|_| {
            "only lower-case letters, digits, '-' and '.' are allowed, each dot-separated part starting and ending with a letter or digit"
        })
    })
}

/// A label name or value body: at most 63 of `[A-Za-z0-9-_.]`, starting and ending with a
/// letter or digit.
fn label_name(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("at most 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err("only letters, digits, '-', '_' and '.' are allowed");
    }
    let edge = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge(s.bytes().next()) || !edge(s.bytes().last()) {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Kubernetes label key: `[prefix/]name`, the prefix an RFC 1123 subdomain.
fn label_key(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("must not be empty");
    }
    match s.split_once('/') {
        Some((prefix, name)) => {
            dns_subdomain(prefix).map_err(|_| "the prefix before '/' must be a DNS subdomain")?;
            if name.is_empty() {
                return Err("the name after '/' must not be empty");
            }
            label_name(name)
        }
        None => label_name(s),
    }
}

/// Kubernetes label value: empty, or a label name.
fn label_value(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        Ok(())
    } else {
        label_name(s)
    }
}

/// Linux interface name (the kernel's `dev_valid_name`): 1 to 15 bytes, not `.` or `..`,
/// no `/`, `:` or whitespace.
fn interface_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be 1 to 15 bytes");
    }
    if s == "." || s == ".." {
        return Err("'.' and '..' are not interface names");
    }
    if s.chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c == '\0')
    {
        return Err("'/', ':' and whitespace are not allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use test_case::test_case;

    use super::*;

    fn parse(text: &str) -> WorkloadsLoad {
        parse_workloads(Path::new("w.yaml"), text).expect("file-level parse")
    }

    /// One entry's fields (YAML flow mapping body), the problem expected or `None`.
    fn one(fields: &str) -> WorkloadsLoad {
        parse(&format!("workloads:\n- {{{fields}}}\n"))
    }

    const BASE: &str = "name: httpbin, namespace: foo, ip: 10.0.0.12";

    #[test]
    fn full_entry() {
        let load = parse(
            "workloads:\n- name: httpbin\n  namespace: foo\n  serviceAccount: httpbin\n  labels: {app: httpbin, version: v1}\n  ip: 10.0.0.12\n  interface: veth-httpbin\n",
        );
        assert_eq!(load.errors, vec![]);
        assert_eq!(
            load.workloads,
            vec![Workload {
                name: "httpbin".into(),
                namespace: "foo".into(),
                service_account: "httpbin".into(),
                labels: [("app", "httpbin"), ("version", "v1")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12)),
                interface: Some("veth-httpbin".into()),
                probes: vec![],
                ports: vec![],
            }]
        );
    }

    #[test_case("", "default", None ; "serviceAccount defaults to Kubernetes' default")]
    #[test_case(", serviceAccount: sleep", "sleep", None ; "serviceAccount as written")]
    #[test_case(", interface: eth0", "default", Some("eth0") ; "interface kept")]
    fn defaults(extra: &str, sa: &str, interface: Option<&str>) {
        let load = one(&format!("{BASE}{extra}"));
        assert_eq!(load.errors, vec![]);
        assert_eq!(load.workloads[0].service_account, sa);
        assert_eq!(load.workloads[0].interface.as_deref(), interface);
        assert!(load.workloads[0].labels.is_empty());
    }

    #[test_case("10.0.0.12", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12)) ; "IPv4")]
    #[test_case("fd00::12", IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x12)) ; "IPv6")]
    #[test_case("\"::ffff:10.0.0.12\"", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 12)) ; "IPv4-mapped IPv6 stored as IPv4, as sockets report peers")]
    #[test_case("\"FD00:0:0::12\"", IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x12)) ; "IPv6 in any spelling")]
    fn ip_forms(ip: &str, want: IpAddr) {
        let load = one(&format!("name: a, namespace: foo, ip: {ip}"));
        assert_eq!(load.errors, vec![]);
        assert_eq!(load.workloads[0].ip, want);
    }

    #[test_case("namespace: foo, ip: 10.0.0.1", "name", &WorkloadProblem::Required ; "name is required")]
    #[test_case("name: '', namespace: foo, ip: 10.0.0.1", "name", &WorkloadProblem::Required ; "empty name is missing")]
    #[test_case("name: a, ip: 10.0.0.1", "namespace", &WorkloadProblem::Required ; "namespace is required, not defaulted")]
    #[test_case("name: a, namespace: foo", "ip", &WorkloadProblem::Required ; "ip is required")]
    #[test_case("name: a, namespace: foo, ip: 10.0.0.256", "ip", &WorkloadProblem::Ip("10.0.0.256".into()) ; "IPv4 octet out of range")]
    #[test_case("name: a, namespace: foo, ip: 10.0.0.0/24", "ip", &WorkloadProblem::Ip("10.0.0.0/24".into()) ; "a CIDR is not an address")]
    #[test_case("name: a, namespace: foo, ip: 0.0.0.0", "ip", &WorkloadProblem::NotUnicast(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) ; "unspecified address")]
    #[test_case("name: a, namespace: foo, ip: 224.0.0.1", "ip", &WorkloadProblem::NotUnicast(IpAddr::V4(Ipv4Addr::new(224, 0, 0, 1))) ; "multicast address")]
    fn required_and_ip(fields: &str, field: &str, problem: &WorkloadProblem) {
        let load = one(fields);
        assert!(load.workloads.is_empty());
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        assert_eq!(load.errors[0].field, field);
        assert_eq!(&load.errors[0].problem, problem);
    }

    #[test_case("ip: 10", "ip" ; "ip written as a number")]
    #[test_case("lables: {app: a}", "lables" ; "unknown field (typo) is an error, named")]
    #[test_case("labels: {version: 1}", "labels.version" ; "label values must be strings")]
    #[test_case("labels: [app]", "labels" ; "labels must be a mapping")]
    fn schema(fields: &str, field: &str) {
        let load = one(&format!("name: a, namespace: foo, {fields}"));
        assert!(load.workloads.is_empty());
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        assert_eq!(load.errors[0].field, field, "{}", load.errors[0]);
        assert!(matches!(load.errors[0].problem, WorkloadProblem::Schema(_)));
    }

    #[test_case("name: Httpbin", "name", "pod name" ; "pod names are lower case")]
    #[test_case("namespace: foo.bar", "namespace", "namespace" ; "namespaces are DNS labels, no dots")]
    #[test_case("namespace: foo/sa/admin", "namespace", "namespace" ; "no slash that could forge a principal")]
    #[test_case("serviceAccount: a/b", "serviceAccount", "service account name" ; "service account without slash")]
    #[test_case("labels: {'': x}", "labels.", "label key" ; "label key must not be empty")]
    #[test_case("labels: {'-app': x}", "labels.-app", "label key" ; "label key starts with a letter or digit")]
    #[test_case("labels: {'example.com/': x}", "labels.example.com/", "label key" ; "label key prefix without a name")]
    #[test_case("labels: {app: 'a b'}", "labels.app", "label value" ; "label value without spaces")]
    #[test_case("interface: veth-with-a-long-name", "interface", "interface name" ; "interface names are at most 15 bytes")]
    #[test_case("interface: 'eth/0'", "interface", "interface name" ; "no slash in an interface name")]
    #[test_case("interface: 'eth 0'", "interface", "interface name" ; "no whitespace in an interface name")]
    #[test_case("interface: ''", "interface", "interface name" ; "empty interface name")]
    fn syntax(fields: &str, field: &str, what: &str) {
        // Later keys of a YAML mapping may not repeat earlier ones, so build the entry.
        let mut entry: BTreeMap<&str, &str> =
            [("name", "a"), ("namespace", "foo"), ("ip", "10.0.0.1")].into();
        let (key, value) = fields.split_once(": ").expect("key: value");
        entry.insert(key, value);
        let body: Vec<String> = entry.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let load = one(&body.join(", "));
        assert!(load.workloads.is_empty(), "{:?}", load.workloads);
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        assert_eq!(load.errors[0].field, field);
        match &load.errors[0].problem {
            WorkloadProblem::Syntax { what: w, .. } => assert_eq!(*w, what),
            other => panic!("expected a syntax problem, got {other:?}"),
        }
    }

    #[test_case("labels: {app.kubernetes.io/name: x, version: ''}" ; "prefixed key and empty value")]
    #[test_case("labels: {A_b.c-D: X_y.Z}" ; "upper case, underscores and dots")]
    #[test_case("name: a.b-c, serviceAccount: sa.1" ; "dotted pod and service account names")]
    #[test_case("interface: vethABC123@x" ; "interface with other punctuation")]
    fn accepted(extra: &str) {
        let load = one(&format!(
            "ip: 10.0.0.1, namespace: foo, {extra}{}",
            if extra.starts_with("name:") {
                ""
            } else {
                ", name: a"
            }
        ));
        assert_eq!(load.errors, vec![]);
        assert_eq!(load.workloads.len(), 1);
    }

    #[test]
    fn probes_http_and_tcp() {
        let load = one(&format!(
            "{BASE}, probes: [{{port: 8080, path: /healthz}}, {{port: 9000}}, {{port: 8080, path: '/ready/now'}}]"
        ));
        assert_eq!(load.errors, vec![]);
        assert_eq!(
            load.workloads[0].probes,
            vec![
                Probe::http(8080, "/healthz").expect("valid"),
                Probe::tcp(9000).expect("valid"),
                Probe {
                    port: 8080,
                    path: Some("/ready/now".into())
                },
            ]
        );
        assert_eq!(
            load.workloads[0].probes[1].path, None,
            "no path: a TCP probe"
        );
        assert!(
            one(BASE).workloads[0].probes.is_empty(),
            "probes default to none"
        );
    }

    #[test_case("{port: 0}", "probes[0].port", None ; "port 0 is not a port")]
    #[test_case("{port: 8080, path: healthz}", "probes[0].path", Some("must start with '/'") ; "relative path")]
    #[test_case("{port: 8080, path: '/healthz?full=1'}", "probes[0].path", Some("no query or fragment: the query of a probe request is ignored when matching") ; "query refused: it is ignored when matching")]
    #[test_case("{port: 8080, path: '/a#b'}", "probes[0].path", Some("no query or fragment: the query of a probe request is ignored when matching") ; "fragment refused")]
    #[test_case("{port: 8080, path: '/a/../healthz'}", "probes[0].path", Some("not in normal form ('.'/'..' segments, '\\', or %-escapes the enforcer rewrites)") ; "dot segments: never equal to a normalized request")]
    #[test_case("{port: 8080, path: '/%68ealthz'}", "probes[0].path", Some("not in normal form ('.'/'..' segments, '\\', or %-escapes the enforcer rewrites)") ; "escaped unreserved character")]
    #[test_case("{port: 8080, path: '/a b'}", "probes[0].path", Some("no whitespace or control characters") ; "whitespace")]
    #[test_case("{port: 8080, path: '/a%00'}", "probes[0].path", Some("not a valid request path") ; "NUL escape refused like in requests")]
    fn probe_problems(probe: &str, field: &str, why: Option<&str>) {
        let load =
            one(&format!("{BASE}, probes: [{{port: 9000}}, {probe}]")
                .replace("probes[0]", "probes[1]"));
        assert!(
            load.workloads.is_empty(),
            "a bad probe rejects its entry: {:?}",
            load.workloads
        );
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        assert_eq!(
            load.errors[0].field,
            field.replace("probes[0]", "probes[1]"),
            "{}",
            load.errors[0]
        );
        match (&load.errors[0].problem, why) {
            (WorkloadProblem::Probe(ProbeProblem::Port), None) => {}
            (WorkloadProblem::Probe(ProbeProblem::Path { why: w, .. }), Some(why)) => {
                assert_eq!(*w, why);
            }
            (other, _) => panic!("unexpected problem {other:?}"),
        }
    }

    #[test_case("probes: [{port: 70000}]", "probes[0].port" ; "port beyond 65535")]
    #[test_case("probes: [{port: 80, method: POST}]", "probes[0].method" ; "unknown field in a probe, named")]
    #[test_case("probes: [{path: /healthz}]", "probes[0]" ; "port is required")]
    #[test_case("probes: {port: 80}", "probes" ; "probes must be a list")]
    fn probe_schema(fields: &str, field: &str) {
        let load = one(&format!("{BASE}, {fields}"));
        assert!(load.workloads.is_empty());
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        assert_eq!(load.errors[0].field, field, "{}", load.errors[0]);
        assert!(matches!(load.errors[0].problem, WorkloadProblem::Schema(_)));
    }

    #[test]
    fn all_problems_of_an_entry_are_reported() {
        let load = one("name: a, namespace: Foo, ip: nope, interface: a/b");
        let fields: Vec<&str> = load.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["namespace", "interface", "ip"]);
    }

    #[test]
    fn one_bad_entry_does_not_take_the_others_down() {
        let load = parse(
            "workloads:\n- {name: a, namespace: foo, ip: 10.0.0.1}\n- {name: b, namespace: foo, ip: bad}\n- {name: c, namespace: foo, ip: 10.0.0.3}\n",
        );
        let names: Vec<&str> = load.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(load.errors.len(), 1);
        assert_eq!(
            load.errors[0].to_string(),
            "w.yaml: workloads[1] (foo/b): ip: \"bad\" is not an IP address (write one address, without a prefix length or zone)"
        );
    }

    #[test]
    fn duplicate_ip_names_both_entries_and_keeps_the_first() {
        let load = parse(
            "workloads:\n- {name: a, namespace: foo, ip: 10.0.0.1}\n- {name: b, namespace: bar, ip: '::ffff:10.0.0.1'}\n",
        );
        assert_eq!(load.workloads.len(), 1);
        assert_eq!(load.workloads[0].name, "a");
        assert_eq!(
            load.errors[0].to_string(),
            "w.yaml: workloads[1] (bar/b): ip: 10.0.0.1 is already the address of workloads[0] (foo/a)"
        );
    }

    #[test]
    fn duplicate_namespace_and_name() {
        let load = parse(
            "workloads:\n- {name: a, namespace: foo, ip: 10.0.0.1}\n- {name: a, namespace: foo, ip: 10.0.0.2}\n- {name: a, namespace: bar, ip: 10.0.0.3}\n",
        );
        assert_eq!(load.workloads.len(), 2);
        assert_eq!(
            load.errors[0].problem,
            WorkloadProblem::DuplicateName {
                entry: "foo/a".into(),
                index: 0
            }
        );
    }

    #[test]
    fn entry_that_is_not_a_mapping() {
        let load = parse("workloads:\n- just-a-name\n");
        assert_eq!(
            load.errors[0].to_string(),
            "w.yaml: workloads[0] (<unnamed>): an entry must be a mapping of fields (name, namespace, ip, ...)"
        );
    }

    #[test_case("workloads: []\n", 0 ; "empty list")]
    #[test_case("workloads:\n", 0 ; "empty key")]
    #[test_case("{\"workloads\": [{\"name\": \"a\", \"namespace\": \"foo\", \"ip\": \"10.0.0.1\"}]}", 1 ; "JSON")]
    fn file_shapes_accepted(text: &str, count: usize) {
        assert_eq!(parse(text).workloads.len(), count);
    }

    #[test_case("", "no `workloads:` list" ; "empty file")]
    #[test_case("- name: a\n", "no `workloads:` list" ; "a bare list")]
    #[test_case("workload:\n- {name: a}\n", "unknown top-level key \"workload\"" ; "typo of the key")]
    #[test_case("workloads: {a: b}\n", "must be a list" ; "not a list")]
    #[test_case("workloads: [\n", "not valid YAML" ; "YAML syntax error")]
    #[test_case("workloads: []\n---\nworkloads: []\n", "not valid YAML" ; "more than one document")]
    fn file_level_errors(text: &str, message: &str) {
        let err = parse_workloads(Path::new("w.yaml"), text).expect_err("file-level error");
        let shown = err.to_string();
        assert!(shown.contains("w.yaml"), "{shown}");
        assert!(shown.contains(message), "{shown}");
    }

    #[test]
    fn unreadable_file_names_it() {
        let err = load_workloads(Path::new("/nonexistent/nodeward/w.yaml")).expect_err("missing");
        assert!(matches!(err, WorkloadsFileError::Read { .. }));
        assert!(err.to_string().contains("/nonexistent/nodeward/w.yaml"));
    }

    #[test]
    fn serializes_for_debug_state() {
        let load = one(BASE);
        let json = serde_json::to_value(&load.workloads[0]).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!({"name": "httpbin", "namespace": "foo", "serviceAccount": "default", "labels": {}, "ip": "10.0.0.12"})
        );
    }
}
