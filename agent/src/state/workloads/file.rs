//! Reading a workloads file: the YAML schema, each entry checked on its own (required
//! fields, IP, names, probes, ports, duplicates), problems reported with file, index, name and
//! field while the other entries still load.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::names::{dns_label, dns_subdomain, interface_name, label_key, label_value};
use super::{
    DeclaredPort, PortProtocol, Probe, ProbeProblem, Workload, DEFAULT_SERVICE_ACCOUNT, KEY,
};
use crate::state::normalize_ip;

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
        let taken = workload
            .addresses()
            .enumerate()
            .find_map(|(i, ip)| by_ip.get(&ip).map(|first| (i, ip, first)));
        if let Some((i, ip, (first, first_id))) = taken {
            let field = if i == 0 {
                "ip".to_owned()
            } else {
                format!("ips[{}]", i - 1)
            };
            out.errors.push(fail(
                &field,
                WorkloadProblem::DuplicateIp {
                    ip,
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
        for ip in workload.addresses() {
            by_ip.insert(ip, (index, id.clone()));
        }
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
    ips: Option<Vec<String>>,
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

    let ips = other_ips(raw.ips.unwrap_or_default(), ip, &mut problems);

    match (name, namespace, ip) {
        (Some(name), Some(namespace), Some(ip)) if problems.is_empty() => Ok(Workload {
            name,
            namespace,
            service_account,
            labels,
            ip,
            ips,
            interface: raw.interface,
            probes,
            ports,
        }),
        _ => Err(problems),
    }
}

/// The `ips` of an entry checked: the addresses other than `primary`, a problem (with its
/// field) for each bad one.
fn other_ips(
    written: Vec<String>,
    primary: Option<IpAddr>,
    problems: &mut Vec<(String, WorkloadProblem)>,
) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for (i, text) in written.into_iter().enumerate() {
        let field = format!("ips[{i}]");
        match text.parse::<IpAddr>().map(normalize_ip) {
            Err(_) => problems.push((field, WorkloadProblem::Ip(text))),
            Ok(other) if !unicast(other) => {
                problems.push((field, WorkloadProblem::NotUnicast(other)));
            }
            // The primary address repeated, as Kubernetes' podIPs lists it: nothing to add.
            Ok(other) if Some(other) == primary || ips.contains(&other) => {}
            Ok(other) => ips.push(other),
        }
    }
    ips
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
                ips: vec![],
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

    #[test]
    fn ports_declare_protocols_by_istios_names() {
        let load = one(&format!(
            "{BASE}, ports: [{{port: 8000, protocol: http}}, {{port: 9000, protocol: GRPC-Web}}, {{port: 3306, protocol: MySQL}}, {{port: 443, protocol: HTTPS}}]"
        ));
        assert_eq!(load.errors, vec![]);
        let w = &load.workloads[0];
        assert_eq!(
            w.port_protocol(8000),
            Some(PortProtocol::Http),
            "any case, as Istio's Parse"
        );
        assert!(w.port_protocol(9000).is_some_and(PortProtocol::is_http));
        assert_eq!(w.port_protocol(3306), Some(PortProtocol::MySql));
        assert!(w.port_protocol(443).is_some_and(PortProtocol::is_tls));
        assert_eq!(w.port_protocol(80), None, "undeclared: sniffed");
        assert!(
            one(BASE).workloads[0].ports.is_empty(),
            "ports default to none"
        );
    }

    #[test]
    fn a_dual_stack_pod_lists_its_other_address() {
        // As Kubernetes' status.podIPs: the primary may be repeated; one per family.
        let load = one(&format!("{BASE}, ips: [10.0.0.12, \"fd00::12\"]"));
        assert_eq!(load.errors, vec![]);
        let w = &load.workloads[0];
        assert_eq!(w.ips, vec!["fd00::12".parse::<IpAddr>().unwrap()]);
        assert_eq!(w.addresses().count(), 2);
        // Another entry cannot take it.
        let load = parse(
            "workloads:\n- {name: a, namespace: foo, ip: 10.0.0.1, ips: [\"fd00::1\"]}\n- {name: b, namespace: foo, ip: 10.0.0.2, ips: [\"fd00::1\"]}\n",
        );
        assert_eq!(load.workloads.len(), 1);
        assert_eq!(load.errors[0].field, "ips[0]", "{}", load.errors[0]);
    }

    #[test_case("ips: [nope]", "ips[0]" ; "not an address")]
    #[test_case("ips: [\"fd00::1\", 224.0.0.1]", "ips[1]" ; "not unicast")]
    fn other_address_problems(fields: &str, field: &str) {
        let load = one(&format!("{BASE}, {fields}"));
        assert!(load.workloads.is_empty());
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        assert_eq!(load.errors[0].field, field, "{}", load.errors[0]);
    }

    #[test_case("ports: [{port: 0, protocol: HTTP}]", "ports[0].port", "port must be 1 to 65535" ; "port 0")]
    #[test_case("ports: [{port: 80, protocol: HTTP}, {port: 80, protocol: TCP}]", "ports[1].port", "port 80 is already declared" ; "a port declared twice")]
    #[test_case("ports: [{port: 80, protocol: quic}]", "ports[0].protocol", "\"quic\" is not a protocol Istio knows" ; "unknown protocol named")]
    fn port_problems(fields: &str, field: &str, message: &str) {
        let load = one(&format!("{BASE}, {fields}"));
        assert!(load.workloads.is_empty());
        assert_eq!(load.errors.len(), 1, "{:?}", load.errors);
        assert_eq!(load.errors[0].field, field, "{}", load.errors[0]);
        assert!(
            load.errors[0].to_string().contains(message),
            "{}",
            load.errors[0]
        );
    }

    #[test_case("ports: [{port: 80}]", "ports[0]" ; "protocol is required")]
    #[test_case("ports: [{port: 80, protocol: HTTP, name: web}]", "ports[0].name" ; "unknown field in a port, named")]
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
