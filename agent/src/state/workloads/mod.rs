//! The registry of pods when there is no Kubernetes: the `--workloads` file of `nodeward run`.
//!
//! ```yaml
//! workloads:
//!   - name: httpbin                # pod name (required)
//!     namespace: foo               # required: it decides which policies apply
//!     serviceAccount: httpbin      # default "default"
//!     labels: {app: httpbin, version: v1}
//!     ip: 10.0.0.12                # IPv4 or IPv6 (required)
//!     ips: [fd00::12]              # its other addresses (a dual-stack pod's), optional
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
//!
//! By concern: this module holds the types ([`Workload`], [`Probe`], [`DeclaredPort`]);
//! [`file`] reads and checks a workloads file; `names` holds the name rules Kubernetes
//! applies (DNS labels and subdomains, label keys and values, interface names).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

pub mod file;
mod names;

pub use file::{
    load_workloads, parse_workloads, WorkloadError, WorkloadProblem, WorkloadsFileError,
    WorkloadsLoad,
};

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
    /// The pod's other addresses (a dual-stack pod's other family: Kubernetes' `podIPs`
    /// beyond `podIP`; standalone: the file's `ips`). They name the same workload as
    /// destination and source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpAddr>,
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
    /// Every address of the pod, the primary first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.ips.iter().copied())
    }

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
