//! Services as the agent keeps them, and the port protocols they declare for the pods they
//! select: Istio's protocol selection, read the way istiod reads it.
//!
//! - [`project`]: a Service → [`ServiceProjection`] (namespace, name, selector, and per port its
//!   number, `targetPort`, name, `appProtocol` and `protocol`); never the whole object.
//! - [`convert_protocol`]: one Service port → its protocol, Istio's `ConvertProtocol`
//!   (`pkg/config/kube/conversion.go`): `protocol: UDP` is UDP; else `appProtocol` when set
//!   (with Kubernetes' standard names `kubernetes.io/h2c` → HTTP2, `kubernetes.io/ws` → HTTP,
//!   `kubernetes.io/wss` → HTTPS), else the port name; a name starting with `grpc-web` is
//!   GRPC-Web, otherwise its prefix before the first `-` is parsed as a protocol name (any case).
//!   A name Istio does not know declares nothing (the port is sniffed), except on the
//!   well-known Service ports 25, 53, 3306 and 27017, which are TCP.
//! - [`declared_ports`]: a pod → the [`DeclaredPort`]s of the Services of its namespace whose
//!   selector matches its labels, with each Service port's `targetPort` resolved against the
//!   pod as Kubernetes' endpoints do (Istio's `FindPort`).

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::state::workloads::{DeclaredPort, PortProtocol};

/// Kubernetes' default `protocol` of Service and container ports.
const TCP: &str = "TCP";

/// Service ports that Istio treats as TCP when their name declares nothing (its
/// `wellKnownPorts`: SMTP, DNS, `MySQL`, `MongoDB`): sniffing would break servers that speak first.
const WELL_KNOWN_TCP_PORTS: [i32; 4] = [25, 53, 3306, 27017];

/// A Service as the agent keeps it: only what protocol selection needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceProjection {
    pub namespace: String,
    pub name: String,
    /// `spec.selector`; never empty (a Service without one selects no pods and is not kept).
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<ServicePort>,
}

/// One entry of a Service's `spec.ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// The Service's port (`port`): the number Istio's well-known-ports rule looks at.
    pub port: i32,
    /// `targetPort`; `None` means the Service port itself.
    pub target_port: Option<TargetPort>,
    /// `name`; empty when the Service has a single unnamed port.
    pub name: String,
    /// `appProtocol`, as written.
    pub app_protocol: Option<String>,
    /// `protocol`: `TCP` (the default), `UDP` or `SCTP`.
    pub protocol: String,
}

/// A Service port's `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(i32),
    /// The name of a container port of the selected pods.
    Name(String),
}

/// A named container port of a pod, for resolving a `targetPort` given by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    /// `TCP` (the default), `UDP` or `SCTP`.
    pub protocol: String,
    pub port: u16,
}

/// `namespace/name` of a Service.
#[must_use]
pub fn key(service: &Service) -> String {
    format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or("default"),
        service.metadata.name.as_deref().unwrap_or_default()
    )
}

/// The projection of a Service that can select pods; `None` for one that cannot: no (or an
/// empty) selector, whose endpoints are managed by hand, or `type: ExternalName`, which names
/// another host.
#[must_use]
pub fn project(service: &Service) -> Option<ServiceProjection> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let selector = spec.selector.clone().filter(|s| !s.is_empty())?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| ServicePort {
            port: p.port,
            target_port: p.target_port.as_ref().map(|t| match t {
                IntOrString::Int(number) => TargetPort::Number(*number),
                IntOrString::String(name) => TargetPort::Name(name.clone()),
            }),
            name: p.name.clone().unwrap_or_default(),
            app_protocol: p.app_protocol.clone(),
            protocol: p.protocol.clone().unwrap_or_else(|| TCP.to_owned()),
        })
        .collect();
    Some(ServiceProjection {
        namespace: service
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
        name: service.metadata.name.clone().unwrap_or_default(),
        selector,
        ports,
    })
}

/// Istio's `ConvertProtocol(port, name, protocol, appProtocol)`; `None` is its `Unsupported`:
/// the port declares nothing and is sniffed.
#[must_use]
pub fn convert_protocol(
    port: i32,
    name: &str,
    protocol: &str,
    app_protocol: Option<&str>,
) -> Option<PortProtocol> {
    if protocol == "UDP" {
        return Some(PortProtocol::Udp);
    }
    let name = match app_protocol {
        // Kubernetes' standard application protocols; a port name cannot hold a `/`.
        Some("kubernetes.io/h2c") => return Some(PortProtocol::Http2),
        Some("kubernetes.io/ws") => return Some(PortProtocol::Http),
        Some("kubernetes.io/wss") => return Some(PortProtocol::Https),
        Some(app_protocol) => app_protocol,
        None => name,
    };
    // Before the prefix split, since the name holds a `-`.
    if name
        .get(.."grpc-web".len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case("grpc-web"))
    {
        return Some(PortProtocol::GrpcWeb);
    }
    let prefix = name.split_once('-').map_or(name, |(prefix, _)| prefix);
    PortProtocol::parse(prefix).or_else(|| {
        WELL_KNOWN_TCP_PORTS
            .contains(&port)
            .then_some(PortProtocol::Tcp)
    })
}

impl ServicePort {
    /// The protocol this port declares ([`convert_protocol`]).
    #[must_use]
    pub fn declared_protocol(&self) -> Option<PortProtocol> {
        convert_protocol(
            self.port,
            &self.name,
            &self.protocol,
            self.app_protocol.as_deref(),
        )
    }

    /// The pod port this Service port sends to (Istio's `FindPort`): a numeric `targetPort`
    /// as is; a named one is the container port of that name and the same `protocol` (`None`
    /// when the pod has none); no `targetPort` is the Service port. Ports outside 1-65535 are
    /// `None`.
    #[must_use]
    pub fn target_on(&self, pod_ports: &[NamedPort]) -> Option<u16> {
        let number = match &self.target_port {
            None => self.port,
            Some(TargetPort::Number(number)) => *number,
            Some(TargetPort::Name(name)) => {
                return pod_ports
                    .iter()
                    .find(|p| &p.name == name && p.protocol == self.protocol)
                    .map(|p| p.port)
                    .filter(|port| *port != 0);
            }
        };
        u16::try_from(number).ok().filter(|port| *port != 0)
    }
}

impl ServiceProjection {
    /// Whether the Service selects a pod of its namespace with these labels (every selector
    /// entry present with the same value).
    #[must_use]
    pub fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        self.namespace == namespace
            && !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    }
}

/// The named ports of a pod's containers and native sidecars (init containers with
/// `restartPolicy: Always`), in that order: what a `targetPort` name can refer to.
#[must_use]
pub fn named_ports(pod: &Pod) -> Vec<NamedPort> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(|c: &Container| c.ports.iter().flatten())
        .filter_map(|p| {
            Some(NamedPort {
                name: p.name.clone().filter(|n| !n.is_empty())?,
                protocol: p.protocol.clone().unwrap_or_else(|| TCP.to_owned()),
                port: u16::try_from(p.container_port).ok()?,
            })
        })
        .collect()
}

/// The protocols declared for a pod's ports by the Services that select it (the Services of
/// its `namespace` whose non-empty selector its `labels` match), one entry per pod port, in
/// port order. Service ports that declare nothing, or whose `targetPort` names no port of the
/// pod, contribute nothing.
///
/// When Services (or two ports of one Service) declare the same pod port differently, an
/// HTTP-family declaration (HTTP, HTTP2, `HTTP_PROXY`, GRPC, GRPC-Web) wins: judging the port as
/// HTTP is the safer choice, since HTTP rules then apply instead of being skipped. Otherwise,
/// and among HTTP-family declarations, the first wins in Service `namespace/name` order, then
/// in the order of the Service's ports.
#[must_use]
pub fn declared_ports<'a>(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    pod_ports: &[NamedPort],
    services: impl IntoIterator<Item = &'a ServiceProjection>,
) -> Vec<DeclaredPort> {
    let mut selecting: Vec<&ServiceProjection> = services
        .into_iter()
        .filter(|s| s.selects(namespace, labels))
        .collect();
    selecting.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut declared: BTreeMap<u16, PortProtocol> = BTreeMap::new();
    for port in selecting.iter().flat_map(|s| &s.ports) {
        let (Some(protocol), Some(target)) = (port.declared_protocol(), port.target_on(pod_ports))
        else {
            continue;
        };
        match declared.entry(target) {
            Entry::Vacant(entry) => {
                entry.insert(protocol);
            }
            Entry::Occupied(mut entry) => {
                if protocol.is_http() && !entry.get().is_http() {
                    entry.insert(protocol);
                }
            }
        }
    }
    declared
        .into_iter()
        .map(|(port, protocol)| DeclaredPort { port, protocol })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;
    use PortProtocol::{Grpc, GrpcWeb, Http, Http2, Https, MySql, Tcp, Udp};
    use TargetPort::{Name, Number};

    // Rows of Istio's TestConvertProtocol (pkg/config/kube/conversion_test.go), by its names.
    #[test_case(0, "", "TCP", None, None ; "istio: resolves empty")]
    #[test_case(0, "", "UDP", None, Some(Udp) ; "istio: resolves from protocol directly")]
    #[test_case(0, "http-something", "TCP", None, Some(Http) ; "istio: resolves from port name")]
    #[test_case(0, "http-something", "TCP", Some("https"), Some(Https) ; "istio: prefers appProto over portName")]
    #[test_case(0, "something-httpx", "TCP", Some("https"), Some(Https) ; "istio: resolves from appProto")]
    #[test_case(0, "grpc-web-x", "TCP", None, Some(GrpcWeb) ; "istio: resolves grpc-web")]
    #[test_case(0, "grpcweb-x", "TCP", None, None ; "istio: makes sure grpc-web is not resolved incorrectly")]
    #[test_case(3306, "random-name", "TCP", None, Some(Tcp) ; "istio: resolves based on known ports")]
    #[test_case(3306, "random-name", "TCP", Some("kubernetes.io/h2c"), Some(Http2) ; "istio: standard app protocol")]
    // The rest of ConvertProtocol, read from its code.
    #[test_case(80, "web", "TCP", Some("kubernetes.io/ws"), Some(Http) ; "kubernetes.io/ws is HTTP")]
    #[test_case(443, "web", "TCP", Some("kubernetes.io/wss"), Some(Https) ; "kubernetes.io/wss is HTTPS")]
    #[test_case(80, "http", "UDP", Some("http"), Some(Udp) ; "UDP wins over appProtocol and name")]
    #[test_case(80, "HTTP-Web", "TCP", None, Some(Http) ; "the prefix is parsed in any case")]
    #[test_case(80, "GRPC-WEB", "TCP", None, Some(GrpcWeb) ; "grpc-web in any case")]
    #[test_case(80, "grpc", "TCP", None, Some(Grpc) ; "a name without dash is its own prefix")]
    #[test_case(80, "mysql-primary", "TCP", None, Some(MySql) ; "mysql prefix")]
    #[test_case(80, "tcp-db", "TCP", None, Some(Tcp) ; "tcp prefix")]
    #[test_case(80, "udp-x", "TCP", None, Some(Udp) ; "a udp prefix parses as UDP even on a TCP port")]
    #[test_case(80, "http-web", "TCP", Some(""), None ; "an empty appProtocol replaces the name")]
    #[test_case(80, "http-web", "TCP", Some("kubernetes.io/h2"), None ; "other kubernetes.io names are unknown")]
    #[test_case(80, "web", "TCP", Some("HTTP2"), Some(Http2) ; "appProtocol parsed in any case")]
    #[test_case(80, "web", "SCTP", Some("http"), Some(Http) ; "only UDP is special-cased; SCTP reads the name")]
    #[test_case(8080, "metrics", "TCP", None, None ; "unknown name, not a well-known port: sniffed")]
    #[test_case(25, "", "TCP", None, Some(Tcp) ; "well-known SMTP")]
    #[test_case(53, "dns-tcp", "TCP", None, Some(Tcp) ; "well-known DNS")]
    #[test_case(27017, "mongo-x", "TCP", None, Some(PortProtocol::Mongo) ; "a known name wins over the well-known port")]
    #[test_case(5432, "grpc-w", "TCP", None, Some(Grpc) ; "shorter than grpc-web: prefix grpc")]
    fn convert_protocol_is_istios(
        port: i32,
        name: &str,
        protocol: &str,
        app_protocol: Option<&str>,
        expected: Option<PortProtocol>,
    ) {
        assert_eq!(
            convert_protocol(port, name, protocol, app_protocol),
            expected
        );
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn port(number: i32, target: Option<TargetPort>, name: &str, app: Option<&str>) -> ServicePort {
        ServicePort {
            port: number,
            target_port: target,
            name: name.to_owned(),
            app_protocol: app.map(str::to_owned),
            protocol: TCP.to_owned(),
        }
    }

    fn service(namespace: &str, name: &str, ports: Vec<ServicePort>) -> ServiceProjection {
        ServiceProjection {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            selector: labels(&[("app", "web")]),
            ports,
        }
    }

    fn named(name: &str, protocol: &str, port: u16) -> NamedPort {
        NamedPort {
            name: name.to_owned(),
            protocol: protocol.to_owned(),
            port,
        }
    }

    fn declared(pairs: &[(u16, PortProtocol)]) -> Vec<DeclaredPort> {
        pairs
            .iter()
            .map(|&(port, protocol)| DeclaredPort { port, protocol })
            .collect()
    }

    #[test_case(&[service("foo", "a", vec![port(80, Some(Number(8080)), "http", None)])], &[(8080, Http)] ; "numeric targetPort is the pod port")]
    #[test_case(&[service("foo", "a", vec![port(80, None, "http", None)])], &[(80, Http)] ; "no targetPort is the Service port")]
    #[test_case(&[service("foo", "a", vec![port(80, Some(Name("web".into())), "", Some("http"))])], &[(9080, Http)] ; "named targetPort resolves against the containers")]
    #[test_case(&[service("foo", "a", vec![port(80, Some(Name("nope".into())), "http", None)])], &[] ; "an unresolvable targetPort name is skipped")]
    #[test_case(&[service("foo", "a", vec![port(80, Some(Name("dns".into())), "http", None)])], &[] ; "a targetPort name resolves only to a port of the same protocol")]
    #[test_case(&[service("foo", "a", vec![port(80, Some(Number(8080)), "metrics", None)])], &[] ; "a name that declares nothing: undeclared, sniffed")]
    #[test_case(&[service("foo", "a", vec![port(80, Some(Number(0)), "http", None), port(81, Some(Number(70000)), "http", None)])], &[] ; "target ports outside 1-65535 are skipped")]
    #[test_case(&[service("bar", "a", vec![port(80, None, "http", None)])], &[] ; "a Service of another namespace does not apply")]
    #[test_case(&[ServiceProjection { selector: labels(&[("app", "other")]), ..service("foo", "a", vec![port(80, None, "http", None)]) }], &[] ; "a selector the labels do not match")]
    #[test_case(&[ServiceProjection { selector: labels(&[("app", "web"), ("tier", "db")]), ..service("foo", "a", vec![port(80, None, "http", None)]) }], &[] ; "every selector entry must match")]
    #[test_case(&[ServiceProjection { selector: BTreeMap::new(), ..service("foo", "a", vec![port(80, None, "http", None)]) }], &[] ; "an empty selector selects nothing")]
    #[test_case(&[service("foo", "b", vec![port(80, None, "tcp", None)]), service("foo", "a", vec![port(80, None, "http", None)])], &[(80, Http)] ; "conflict: HTTP wins over TCP")]
    #[test_case(&[service("foo", "a", vec![port(80, None, "tls", None)]), service("foo", "b", vec![port(80, None, "grpc", None)])], &[(80, Grpc)] ; "conflict: a later HTTP-family declaration wins over TLS")]
    #[test_case(&[service("foo", "b", vec![port(80, None, "tcp", None)]), service("foo", "a", vec![port(80, None, "tls", None)])], &[(80, PortProtocol::Tls)] ; "conflict without HTTP: first by namespace/name")]
    #[test_case(&[service("foo", "b", vec![port(80, None, "http2", None)]), service("foo", "a", vec![port(80, None, "http", None)])], &[(80, Http)] ; "conflict among HTTP-family: first by namespace/name")]
    #[test_case(&[service("foo", "a", vec![port(80, Some(Number(8080)), "tcp", None), port(81, Some(Number(8080)), "http", None)])], &[(8080, Http)] ; "two ports of one Service on one pod port: HTTP wins")]
    #[test_case(&[service("foo", "a", vec![port(80, Some(Number(8080)), "metrics", None)]), service("foo", "b", vec![port(80, Some(Number(8080)), "tcp", None)])], &[(8080, Tcp)] ; "an undeclared port does not hide a declaration")]
    #[test_case(&[service("foo", "a", vec![port(9000, None, "http", None), port(3306, Some(Number(3306)), "db", None), port(53, Some(Name("dns".into())), "", None)])], &[(3306, Tcp), (9000, Http)] ; "several ports, in port order")]
    fn declared_ports_of_a_pod(services: &[ServiceProjection], expected: &[(u16, PortProtocol)]) {
        let pod_ports = [named("web", "TCP", 9080), named("dns", "UDP", 5353)];
        assert_eq!(
            declared_ports(
                "foo",
                &labels(&[("app", "web"), ("pod-template-hash", "1")]),
                &pod_ports,
                services
            ),
            declared(expected)
        );
    }

    #[test]
    fn a_udp_service_port_resolves_a_udp_container_port() {
        let mut dns = port(53, Some(Name("dns".into())), "dns", None);
        dns.protocol = "UDP".to_owned();
        let services = [service("foo", "a", vec![dns])];
        assert_eq!(
            declared_ports(
                "foo",
                &labels(&[("app", "web")]),
                &[named("dns", "UDP", 5353)],
                &services
            ),
            declared(&[(5353, Udp)])
        );
    }

    fn parse_service(value: serde_json::Value) -> Service {
        serde_json::from_value(value).expect("a Service")
    }

    #[test]
    fn projection_keeps_what_protocol_selection_needs() {
        let projected = project(&parse_service(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "foo", "uid": "1"},
            "spec": {
                "type": "ClusterIP", "clusterIP": "10.96.0.10",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http-web", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                    {"name": "grpc", "port": 9090, "targetPort": "grpc", "appProtocol": "kubernetes.io/h2c"},
                    {"name": "dns", "port": 53, "protocol": "UDP"}
                ]
            }
        })))
        .expect("a Service with a selector is kept");
        assert_eq!(
            projected,
            ServiceProjection {
                namespace: "foo".into(),
                name: "web".into(),
                selector: labels(&[("app", "web")]),
                ports: vec![
                    ServicePort {
                        port: 80,
                        target_port: Some(Number(8080)),
                        name: "http-web".into(),
                        app_protocol: None,
                        protocol: "TCP".into(),
                    },
                    ServicePort {
                        port: 9090,
                        target_port: Some(Name("grpc".into())),
                        name: "grpc".into(),
                        app_protocol: Some("kubernetes.io/h2c".into()),
                        protocol: "TCP".into(),
                    },
                    ServicePort {
                        port: 53,
                        target_port: None,
                        name: "dns".into(),
                        app_protocol: None,
                        protocol: "UDP".into(),
                    },
                ],
            }
        );
    }

    #[test_case(&serde_json::json!({"ports": [{"port": 80}]}) ; "no selector: endpoints managed by hand")]
    #[test_case(&serde_json::json!({"selector": {}, "ports": [{"port": 80}]}) ; "an empty selector")]
    #[test_case(&serde_json::json!({"type": "ExternalName", "externalName": "example.com", "selector": {"app": "web"}}) ; "ExternalName names another host")]
    fn services_that_select_no_pods_are_not_kept(spec: &serde_json::Value) {
        let service = parse_service(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "foo"},
            "spec": spec
        }));
        assert_eq!(project(&service), None);
    }

    #[test]
    fn named_ports_come_from_containers_and_native_sidecars() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "foo"},
            "spec": {
                "initContainers": [
                    {"name": "setup", "ports": [{"name": "setup", "containerPort": 1000}]},
                    {"name": "proxy", "restartPolicy": "Always", "ports": [{"name": "proxy", "containerPort": 15001}]}
                ],
                "containers": [
                    {"name": "app", "ports": [
                        {"name": "http", "containerPort": 8080},
                        {"containerPort": 8081},
                        {"name": "dns", "containerPort": 5353, "protocol": "UDP"}
                    ]}
                ]
            }
        }))
        .expect("a Pod");
        assert_eq!(
            named_ports(&pod),
            [
                named("http", "TCP", 8080),
                named("dns", "UDP", 5353),
                named("proxy", "TCP", 15001)
            ]
        );
    }
}
