//! What a kind cluster's node has around its pods, on top of [`crate::netns::TestNode`], so
//! end-to-end tests can send traffic into a pod by every path a real cluster has:
//!
//! - kube-proxy's Service rules ([`install_services`]), in either of its modes ([`ProxyMode`]):
//!   iptables (`KUBE-SERVICES` → `KUBE-SVC-*` → `KUBE-SEP-*` DNAT, `KUBE-MARK-MASQ` 0x4000,
//!   `KUBE-POSTROUTING` masquerading with the bit cleared, `KUBE-NODEPORTS` → `KUBE-EXT-*`,
//!   hairpin masquerading) or nftables (table `ip kube-proxy` / `ip6 kube-proxy`: the
//!   `service-ips` and `service-nodeports` verdict maps, `service-*` and `endpoint-*` chains,
//!   `mark-for-masquerade` 0x4000 and `masquerading`), for IPv4 and, on a dual-stack node, IPv6;
//! - the CNI portmap plugin's hostPort rules ([`install_hostport`]): `CNI-HOSTPORT-DNAT` →
//!   `CNI-DN-*` DNAT, `CNI-HOSTPORT-SETMARK` 0x2000 (never cleared) for hairpin and
//!   `127.0.0.1` sources, `CNI-HOSTPORT-MASQ`, and `route_localnet` on the pod's host interface;
//! - a [`Cluster`]: nodes on one LAN (each node's `eth0` uplink, `10.201.0.<index+2>/24`), routes
//!   between their pod subnets as kindnet writes them, and an outside host
//!   ([`OUTSIDE_ADDR`]) that is the nodes' default gateway and reaches NodePorts and hostPorts
//!   on a node's uplink address.
//!
//! The rules are written in the shapes kube-proxy and portmap write (chains, marks, comments,
//! maps), as the programs' own tools load them (`iptables-restore --noflush`, `nft -f`), only for
//! TCP and without the filter-table parts that only refuse (no-endpoint rejects, firewall
//! checks). Everything lives in namespaces the nodes made and is removed with them.
//!
//! Addresses: pods of node `n` in `10.200.<n>.0/24` (`fd00:200:0:<n>::/64`), so the cluster
//! CIDR kube-proxy masquerades from outside of is [`CLUSTER_CIDR`] (`10.200.0.0/17`,
//! [`CLUSTER_CIDR6`]); the nodes' own addresses `10.200.255.<n+1>` are outside it, like a real
//! node's. Services in [`SERVICE_CIDR`] ([`service_ip`]) and [`SERVICE_CIDR6`]
//! ([`service_ip6`]).

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::netns::{ip, sysctl, Cni, NodeOptions, Pod, TestNode, BRIDGE};

/// The pods of every node (node `n`'s are `10.200.<n>.0/24`): kube-proxy's `--cluster-cidr`.
pub const CLUSTER_CIDR: &str = "10.200.0.0/17";
/// The IPv6 pods of every node (node `n`'s are `fd00:200:0:<n>::/64`).
pub const CLUSTER_CIDR6: &str = "fd00:200::/48";
/// ClusterIPs ([`service_ip`]); each node routes it to `lo` (a real node sends it to its default
/// gateway; kube-proxy's DNAT in OUTPUT re-routes it either way), so the node's own connections
/// to a ClusterIP come from its address on `lo`.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// IPv6 ClusterIPs ([`service_ip6`]), kind's range.
pub const SERVICE_CIDR6: &str = "fd00:10:96::/112";
/// The outside host's address on the nodes' LAN: the nodes' default gateway.
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
/// The outside host's IPv6 address on the nodes' LAN.
pub const OUTSIDE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1);
/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14), in both modes.
pub const KUBE_MASQ_MARK: u32 = 0x4000;
/// portmap's masquerade mark (`markMasqBit` 13), left set on the packet.
pub const PORTMAP_MARK: u32 = 0x2000;

/// The ClusterIP `10.96.0.<n>`.
#[must_use]
pub const fn service_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, n)
}

/// The IPv6 ClusterIP `fd00:10:96::<n>`.
#[must_use]
pub const fn service_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x96, 0, 0, 0, 0, n as u16)
}

/// Node `index`'s address on the LAN, on its `eth0`: `10.201.0.<index+2>`.
#[must_use]
pub const fn uplink_addr(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, index + 2)
}

/// Node `index`'s IPv6 address on the LAN (dual-stack nodes): `fd00:201::<index+2>`.
#[must_use]
pub const fn uplink_addr6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, index as u16 + 2)
}

/// How kube-proxy implements Services on the node (`--proxy-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// iptables rules in table `nat` (loaded through iptables-nft, as on Debian 12 and kind).
    Iptables,
    /// An nftables table of its own, `ip kube-proxy` / `ip6 kube-proxy`.
    Nftables,
}

/// One TCP port of a Service and its ready endpoints (pods).
#[derive(Debug, Clone)]
pub struct Service {
    /// `namespace/name:port-name`: kube-proxy's service port name, in chain names and comments.
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    /// The IPv6 ClusterIP of a dual-stack Service; its endpoints are the pods' IPv6 addresses.
    pub cluster_ip6: Option<Ipv6Addr>,
    pub port: u16,
    /// The NodePort, on every node address (`addrtype LOCAL` in iptables mode, the node's
    /// addresses on `lo` and `eth0` in nftables mode).
    pub node_port: Option<u16>,
    /// The pods' port.
    pub target_port: u16,
    pub endpoints: Vec<Pod>,
}

impl Service {
    /// A ClusterIP Service `name` (`namespace/name:port-name`) with `cluster_ip:port` → the
    /// `endpoints`' `target_port`.
    #[must_use]
    pub fn new(
        name: &str,
        cluster_ip: Ipv4Addr,
        port: u16,
        target_port: u16,
        endpoints: &[&Pod],
    ) -> Self {
        Self {
            name: name.to_owned(),
            cluster_ip,
            cluster_ip6: None,
            port,
            node_port: None,
            target_port,
            endpoints: endpoints.iter().map(|&p| p.clone()).collect(),
        }
    }

    /// The same Service as type NodePort, on `node_port`.
    #[must_use]
    pub fn with_node_port(mut self, node_port: u16) -> Self {
        self.node_port = Some(node_port);
        self
    }

    /// The same Service dual-stack, with the IPv6 ClusterIP `cluster_ip6`.
    #[must_use]
    pub fn with_cluster_ip6(mut self, cluster_ip6: Ipv6Addr) -> Self {
        self.cluster_ip6 = Some(cluster_ip6);
        self
    }

    /// `namespace/name` and the port name.
    fn parts(&self) -> (&str, &str) {
        self.name.rsplit_once(':').unwrap_or((&self.name, "p"))
    }
}

/// One address family of kube-proxy's and portmap's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// nftables' family, and its address match and type keywords.
    fn nft(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Self::V4 => ("ip", "ip", "ipv4_addr"),
            Self::V6 => ("ip6", "ip6", "ipv6_addr"),
        }
    }

    fn cluster_cidr(self) -> &'static str {
        match self {
            Self::V4 => CLUSTER_CIDR,
            Self::V6 => CLUSTER_CIDR6,
        }
    }

    fn host_prefix(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

/// `addr:port`, bracketed for IPv6 (DNAT targets).
fn socket(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A Service in one family: its ClusterIP and its endpoints' addresses.
struct FamilyService<'a> {
    service: &'a Service,
    cluster_ip: IpAddr,
    endpoints: Vec<IpAddr>,
}

fn family_services(services: &[Service], family: Family) -> Vec<FamilyService<'_>> {
    services
        .iter()
        .filter_map(|service| {
            let (cluster_ip, endpoints) = match family {
                Family::V4 => (
                    IpAddr::V4(service.cluster_ip),
                    service.endpoints.iter().map(|p| IpAddr::V4(p.ip)).collect(),
                ),
                Family::V6 => (
                    IpAddr::V6(service.cluster_ip6?),
                    service
                        .endpoints
                        .iter()
                        .filter_map(|p| p.ip6.map(IpAddr::V6))
                        .collect(),
                ),
            };
            Some(FamilyService {
                service,
                cluster_ip,
                endpoints,
            })
        })
        .collect()
}

/// kube-proxy names its chains by a hash of the service port (and endpoint): base32 of a
/// digest, upper case. The digest here is FNV-1a (the names only need to be stable and
/// distinct), `len` characters of it.
fn chain_hash(input: &str, len: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let first = crate::fnv1a(input.as_bytes());
    let second = crate::fnv1a(format!("{input}#").as_bytes());
    let bits = (u128::from(first) << 64) | u128::from(second);
    (0..len)
        .map(|i| char::from(ALPHABET[((bits >> (5 * i)) & 31) as usize]))
        .collect()
}

/// Installs (or replaces: kube-proxy rewrites its rules whole on every sync) kube-proxy's rules
/// for `services` on `node`, in `mode`, for IPv4 and, when any Service has an IPv6 ClusterIP,
/// IPv6; routes the Service ranges to the node's `lo` (see [`SERVICE_CIDR`]).
///
/// # Panics
/// When `iptables-restore`, `iptables`, `nft` or `ip` fail (the message has their stderr), a
/// Service has no endpoint in a family it has a ClusterIP of, or an IPv6 ClusterIP on a node
/// that is not dual-stack.
pub fn install_services(node: &TestNode, mode: ProxyMode, services: &[Service]) {
    let dual = services.iter().any(|s| s.cluster_ip6.is_some());
    assert!(
        !dual || node.options().dual_stack,
        "IPv6 ClusterIPs need a dual-stack node"
    );
    let families: &[Family] = if dual {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &family in families {
        let services = family_services(services, family);
        for fs in &services {
            assert!(
                !fs.endpoints.is_empty(),
                "{}: no {family:?} endpoint (the kit writes no rules for Services without \
                 endpoints, which kube-proxy rejects)",
                fs.service.name
            );
        }
        match mode {
            ProxyMode::Iptables => {
                let rules = kube_proxy_iptables(family, &services);
                restore(node, family, &rules);
                for (chain, comment, target) in [
                    ("PREROUTING", "kubernetes service portals", "KUBE-SERVICES"),
                    ("OUTPUT", "kubernetes service portals", "KUBE-SERVICES"),
                    (
                        "POSTROUTING",
                        "kubernetes postrouting rules",
                        "KUBE-POSTROUTING",
                    ),
                ] {
                    ensure_first_rule(
                        node,
                        family,
                        chain,
                        &["-m", "comment", "--comment", comment, "-j", target],
                    );
                }
            }
            ProxyMode::Nftables => {
                let ruleset = kube_proxy_nftables(family, &node_ips(node, family), &services);
                nft(node, &ruleset);
            }
        }
        let (flag, cidr) = match family {
            Family::V4 => ("-4", SERVICE_CIDR),
            Family::V6 => ("-6", SERVICE_CIDR6),
        };
        ip(&[
            "-n",
            &node.netns,
            flag,
            "route",
            "replace",
            cidr,
            "dev",
            "lo",
        ]);
    }
}

/// The node's addresses that take NodePorts in nftables mode: its own on `lo` and its uplink's.
fn node_ips(node: &TestNode, family: Family) -> Vec<IpAddr> {
    let flag = match family {
        Family::V4 => "-4",
        Family::V6 => "-6",
    };
    // `<n>: <dev>    inet <addr>/<prefix> ...`, one address a line.
    node.ip_out(&[flag, "-o", "addr", "show", "scope", "global"])
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let dev = *words.get(1)?;
            let addr = words.get(3)?.split('/').next()?;
            ["lo", "eth0"]
                .contains(&dev)
                .then(|| addr.parse().ok())
                .flatten()
        })
        .collect()
}

/// kube-proxy's iptables-mode `nat` table for `services`, as `iptables-restore` input.
fn kube_proxy_iptables(family: Family, services: &[FamilyService<'_>]) -> String {
    let cidr = family.cluster_cidr();
    let prefix = family.host_prefix();
    let mut chains = vec![
        "KUBE-SERVICES".to_owned(),
        "KUBE-NODEPORTS".to_owned(),
        "KUBE-POSTROUTING".to_owned(),
        "KUBE-MARK-MASQ".to_owned(),
    ];
    let mut rules = vec![
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {KUBE_MASQ_MARK:#x}"),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {KUBE_MASQ_MARK:#x}/{KUBE_MASQ_MARK:#x} -j RETURN"),
        // The bit is cleared before the packet leaves, so nothing downstream sees it.
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {KUBE_MASQ_MARK:#x}"),
        "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".to_owned(),
    ];
    for fs in services {
        let s = fs.service;
        let name = &s.name;
        let hash = chain_hash(&format!("{name}tcp"), 16);
        let svc = format!("KUBE-SVC-{hash}");
        let ext = format!("KUBE-EXT-{hash}");
        chains.push(svc.clone());
        let portal = format!(
            "-m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {}/{prefix} --dport {}",
            fs.cluster_ip, s.port
        );
        rules.push(format!("-A KUBE-SERVICES {portal} -j {svc}"));
        rules.push(format!("-A {svc} {portal} ! -s {cidr} -j KUBE-MARK-MASQ"));
        let count = fs.endpoints.len();
        for (i, &endpoint) in fs.endpoints.iter().enumerate() {
            let target = socket(endpoint, s.target_port);
            let sep = format!("KUBE-SEP-{}", chain_hash(&format!("{name}tcp{target}"), 16));
            chains.push(sep.clone());
            let comment = format!("-m comment --comment \"{name} -> {target}\"");
            // Each endpoint takes an equal share of what the ones before it left.
            let chance = if i + 1 < count {
                format!(
                    " -m statistic --mode random --probability {:.10}",
                    1.0 / f64::from((count - i) as u32)
                )
            } else {
                String::new()
            };
            rules.push(format!("-A {svc} {comment}{chance} -j {sep}"));
            rules.push(format!(
                "-A {sep} -m comment --comment \"{name}\" -s {endpoint}/{prefix} -j KUBE-MARK-MASQ"
            ));
            rules.push(format!(
                "-A {sep} -m comment --comment \"{name}\" -m tcp -p tcp -j DNAT --to-destination {target}"
            ));
        }
        if let Some(node_port) = s.node_port {
            chains.push(ext.clone());
            rules.push(format!(
                "-A KUBE-NODEPORTS -m comment --comment \"{name}\" -m tcp -p tcp --dport {node_port} -j {ext}"
            ));
            rules.push(format!(
                "-A {ext} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            ));
            rules.push(format!("-A {ext} -j {svc}"));
        }
    }
    // IPv6 has no route_localnet: kube-proxy takes no NodePorts on ::1.
    let not_localhost = match family {
        Family::V4 => "",
        Family::V6 => "! -d ::1/128 ",
    };
    rules.push(format!(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" {not_localhost}-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    ));
    let mut out = String::from("*nat\n");
    for chain in &chains {
        // With --noflush, a declared chain is created or flushed; others are left alone.
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for rule in &rules {
        let _ = writeln!(out, "{rule}");
    }
    out.push_str("COMMIT\n");
    out
}

/// kube-proxy's nftables-mode table for `services` (replacing the table if it exists), as
/// `nft -f` input; `node_ips` take the NodePorts.
fn kube_proxy_nftables(
    family: Family,
    node_ips: &[IpAddr],
    services: &[FamilyService<'_>],
) -> String {
    let (fam, addr, addr_type) = family.nft();
    let table = format!("{fam} kube-proxy");
    let mut out = String::new();
    let mut line = |text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    // Created, deleted and made anew in one transaction: a whole sync.
    line(format!(
        "add table {table} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    line(format!("delete table {table}"));
    line(format!(
        "add table {table} {{ comment \"rules for kube-proxy\" ; }}"
    ));
    line(format!(
        "add set {table} cluster-ips {{ type {addr_type} ; comment \"Active ClusterIPs\" ; }}"
    ));
    line(format!(
        "add set {table} nodeport-ips {{ type {addr_type} ; comment \"IPs that accept NodePort traffic\" ; }}"
    ));
    line(format!(
        "add map {table} service-ips {{ type {addr_type} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}"
    ));
    line(format!(
        "add map {table} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}"
    ));
    for chain in ["mark-for-masquerade", "masquerading", "services"] {
        line(format!("add chain {table} {chain}"));
    }
    line(format!(
        "add chain {table} nat-prerouting {{ type nat hook prerouting priority -100 ; }}"
    ));
    line(format!(
        "add chain {table} nat-output {{ type nat hook output priority -100 ; }}"
    ));
    line(format!(
        "add chain {table} nat-postrouting {{ type nat hook postrouting priority 100 ; }}"
    ));
    line(format!(
        "add rule {table} mark-for-masquerade mark set mark or {KUBE_MASQ_MARK:#x}"
    ));
    line(format!(
        "add rule {table} masquerading mark and {KUBE_MASQ_MARK:#x} == 0 return"
    ));
    line(format!(
        "add rule {table} masquerading mark set mark xor {KUBE_MASQ_MARK:#x}"
    ));
    line(format!(
        "add rule {table} masquerading masquerade fully-random"
    ));
    line(format!("add rule {table} nat-output jump services"));
    line(format!(
        "add rule {table} nat-postrouting jump masquerading"
    ));
    line(format!("add rule {table} nat-prerouting jump services"));
    line(format!(
        "add rule {table} services {addr} daddr . meta l4proto . th dport vmap @service-ips"
    ));
    line(format!(
        "add rule {table} services {addr} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"
    ));
    for ip in node_ips {
        line(format!("add element {table} nodeport-ips {{ {ip} }}"));
    }
    for fs in services {
        nftables_service(family, fs, &mut line);
    }
    out
}

/// The chains and map elements of one Service in [`kube_proxy_nftables`]'s table.
fn nftables_service(family: Family, fs: &FamilyService<'_>, line: &mut impl FnMut(String)) {
    let (fam, addr, _) = family.nft();
    let cidr = family.cluster_cidr();
    let table = format!("{fam} kube-proxy");
    let s = fs.service;
    let (namespaced, port_name) = s.parts();
    let base = format!("{namespaced}/tcp/{port_name}");
    let hash = chain_hash(&format!("{}tcp", s.name), 8);
    let svc = format!("service-{hash}-{base}");
    line(format!("add chain {table} {svc}"));
    line(format!(
        "add rule {table} {svc} {addr} daddr {} {addr} saddr != {cidr} jump mark-for-masquerade",
        fs.cluster_ip
    ));
    let mut arms = Vec::new();
    for (i, &endpoint) in fs.endpoints.iter().enumerate() {
        // nft names take no ':' or brackets: an IPv6 endpoint is written with dots.
        let shown = endpoint.to_string().replace(':', ".");
        let target = socket(endpoint, s.target_port);
        let chain = format!(
            "endpoint-{}-{base}__{shown}/{}",
            chain_hash(&format!("{}tcp{target}", s.name), 8),
            s.target_port
        );
        line(format!("add chain {table} {chain}"));
        line(format!(
            "add rule {table} {chain} {addr} saddr {endpoint} jump mark-for-masquerade"
        ));
        line(format!(
            "add rule {table} {chain} meta l4proto tcp dnat to {target}"
        ));
        arms.push(format!("{i} : goto {chain}"));
    }
    line(format!(
        "add rule {table} {svc} numgen random mod {} vmap {{ {} }}",
        fs.endpoints.len(),
        arms.join(" , ")
    ));
    line(format!(
        "add element {table} cluster-ips {{ {} }}",
        fs.cluster_ip
    ));
    line(format!(
        "add element {table} service-ips {{ {} . tcp . {} : goto {svc} }}",
        fs.cluster_ip, s.port
    ));
    if let Some(node_port) = s.node_port {
        let ext = format!("external-{hash}-{base}");
        line(format!("add chain {table} {ext}"));
        line(format!("add rule {table} {ext} jump mark-for-masquerade"));
        line(format!("add rule {table} {ext} goto {svc}"));
        line(format!(
            "add element {table} service-nodeports {{ tcp . {node_port} : goto {ext} }}"
        ));
    }
}

/// Installs portmap's rules for `hostPort: host_port` → `pod`'s `container_port` (TCP) on
/// `node`, for IPv4 and, when the pod has one, IPv6: traffic to any local address of the node
/// on `host_port` goes (DNAT) to the pod; from the pod subnet (hairpin) and from `127.0.0.1` it is
/// also marked [`PORTMAP_MARK`] and masqueraded. Sets `route_localnet` on the interface that
/// routes to the pod (its veth, or the bridge), as portmap does, so `127.0.0.1:host_port` on the
/// node works.
///
/// # Panics
/// When `iptables`/`iptables-restore` fail (the message has their stderr).
pub fn install_hostport(node: &TestNode, pod: &Pod, host_port: u16, container_port: u16) {
    let mut families = vec![(Family::V4, IpAddr::V4(pod.ip))];
    if let Some(ip6) = pod.ip6 {
        families.push((Family::V6, IpAddr::V6(ip6)));
    }
    for (family, pod_addr) in families {
        portmap_chains(node, family);
        portmap_container_chain(node, family, pod, pod_addr, host_port, container_port);
    }
    let host_if = match node.options().cni {
        Cni::Routed => pod.host_if.as_str(),
        Cni::Bridge => BRIDGE,
    };
    sysctl(
        &node.netns,
        &format!("net.ipv4.conf.{host_if}.route_localnet"),
        "1",
    );
}

/// portmap's shared chains and their hooks, made once per node and family.
fn portmap_chains(node: &TestNode, family: Family) {
    for chain in [
        "CNI-HOSTPORT-DNAT",
        "CNI-HOSTPORT-SETMARK",
        "CNI-HOSTPORT-MASQ",
    ] {
        ensure_chain(node, family, chain);
    }
    ensure_rule(
        node,
        family,
        "CNI-HOSTPORT-SETMARK",
        &[
            "-m",
            "comment",
            "--comment",
            "CNI portfwd masquerade mark",
            "-j",
            "MARK",
            "--set-xmark",
            &format!("{PORTMAP_MARK:#x}/{PORTMAP_MARK:#x}"),
        ],
    );
    ensure_rule(
        node,
        family,
        "CNI-HOSTPORT-MASQ",
        &[
            "-m",
            "mark",
            "--mark",
            &format!("{PORTMAP_MARK:#x}/{PORTMAP_MARK:#x}"),
            "-j",
            "MASQUERADE",
        ],
    );
    for chain in ["PREROUTING", "OUTPUT"] {
        ensure_first_rule(
            node,
            family,
            chain,
            &[
                "-m",
                "addrtype",
                "--dst-type",
                "LOCAL",
                "-j",
                "CNI-HOSTPORT-DNAT",
            ],
        );
    }
    ensure_first_rule(
        node,
        family,
        "POSTROUTING",
        &[
            "-m",
            "comment",
            "--comment",
            "CNI portfwd requiring masquerade",
            "-j",
            "CNI-HOSTPORT-MASQ",
        ],
    );
}

/// portmap's chain for one container's hostPort (named by a hash of the container's id) and its
/// hook in `CNI-HOSTPORT-DNAT`.
fn portmap_container_chain(
    node: &TestNode,
    family: Family,
    pod: &Pod,
    pod_addr: IpAddr,
    host_port: u16,
    container_port: u16,
) {
    let id = format!("{}-{}", pod.netns, host_port);
    let chain = format!(
        "CNI-DN-{:016x}{:05x}",
        crate::fnv1a(id.as_bytes()),
        crate::fnv1a(format!("{id}#").as_bytes()) & 0xf_ffff
    );
    let subnet = match family {
        Family::V4 => {
            let (net, prefix) = node.pod_subnet();
            format!("{net}/{prefix}")
        }
        Family::V6 => {
            let (net, prefix) = node
                .pod_subnet6()
                .expect("a pod with IPv6 is on a dual-stack node");
            format!("{net}/{prefix}")
        }
    };
    let match_port = format!("-p tcp --dport {host_port}");
    let mut rules = format!(
        "*nat\n:{chain} - [0:0]\n\
         -A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"kindnet\\\" id: \\\"{id}\\\"\" -m multiport --destination-ports {host_port} -j {chain}\n\
         -A {chain} -s {subnet} {match_port} -j CNI-HOSTPORT-SETMARK\n"
    );
    if family == Family::V4 {
        let _ = writeln!(
            rules,
            "-A {chain} -s 127.0.0.1/32 {match_port} -j CNI-HOSTPORT-SETMARK"
        );
    }
    let _ = writeln!(
        rules,
        "-A {chain} {match_port} -j DNAT --to-destination {}\nCOMMIT",
        socket(pod_addr, container_port)
    );
    restore(node, family, &rules);
}

/// `iptables-restore --noflush` (or ip6tables) of `rules` in the node's namespace.
fn restore(node: &TestNode, family: Family, rules: &str) {
    let program = format!("{}-restore", family.iptables());
    let mut child = node
        .command(&node.netns, &program)
        .args(["--noflush", "-w", "5"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {program} in {}: {e}", node.netns));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(rules.as_bytes())
        .unwrap_or_else(|e| panic!("writing to {program}: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} failed: {}\ninput:\n{rules}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `nft -f -` of `ruleset` in the node's namespace.
fn nft(node: &TestNode, ruleset: &str) {
    let mut child = node
        .command(&node.netns, "nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running nft in {} (package nftables): {e}", node.netns));
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(ruleset.as_bytes())
        .unwrap_or_else(|e| panic!("writing to nft: {e}"));
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for nft: {e}"));
    assert!(
        out.status.success(),
        "nft -f failed: {}\ninput:\n{ruleset}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// `iptables -w 5 -t nat args` in the node's namespace: whether it succeeded, and its stderr.
fn iptables_nat(node: &TestNode, family: Family, args: &[&str]) -> (bool, String) {
    let mut full = vec![family.iptables(), "-w", "5", "-t", "nat"];
    full.extend_from_slice(args);
    let out = node.exec(&node.netns, &full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

fn ensure_chain(node: &TestNode, family: Family, chain: &str) {
    if !iptables_nat(node, family, &["-S", chain]).0 {
        let (ok, err) = iptables_nat(node, family, &["-N", chain]);
        assert!(ok, "{} -t nat -N {chain}: {err}", family.iptables());
    }
}

/// Appends `rule` to `chain` unless it is there.
fn ensure_rule(node: &TestNode, family: Family, chain: &str, rule: &[&str]) {
    ensure(node, family, "-A", chain, rule);
}

/// Inserts `rule` first in `chain` unless it is there (how kube-proxy and portmap hook their
/// chains into the built-in ones).
fn ensure_first_rule(node: &TestNode, family: Family, chain: &str, rule: &[&str]) {
    ensure(node, family, "-I", chain, rule);
}

fn ensure(node: &TestNode, family: Family, how: &str, chain: &str, rule: &[&str]) {
    let mut check = vec!["-C", chain];
    check.extend_from_slice(rule);
    if iptables_nat(node, family, &check).0 {
        return;
    }
    let mut add = vec![how, chain];
    add.extend_from_slice(rule);
    let (ok, err) = iptables_nat(node, family, &add);
    assert!(ok, "{} -t nat {}: {err}", family.iptables(), add.join(" "));
}

/// Nodes on one LAN with an outside host: see the module documentation. Node `i` is
/// `nodes[i]`, built with [`NodeOptions::index`] `i`; the LAN's switch and the outside host are
/// namespaces of the first node, so everything goes when the cluster is dropped, also on panic.
pub struct Cluster {
    pub nodes: Vec<TestNode>,
    /// The outside host's namespace: [`OUTSIDE_ADDR`] (and [`OUTSIDE_ADDR6`] when dual-stack)
    /// on its `eth0`, on the LAN and routed nowhere else.
    pub outside: String,
}

impl Cluster {
    /// `count` nodes (at least 1) built with `options` (its `index` is replaced by each node's
    /// number), each with an `eth0` on the LAN ([`uplink_addr`]), a default route via the
    /// outside host, and routes to every other node's pod subnet and own address via that
    /// node's uplink address.
    ///
    /// # Panics
    /// When `count` is 0 or more than 100, or a namespace, link, address or route fails.
    #[must_use]
    pub fn new(tag: &str, options: NodeOptions, count: u8) -> Self {
        assert!((1..=100).contains(&count), "1 to 100 nodes, not {count}");
        let mut nodes: Vec<TestNode> = (0..count)
            .map(|index| TestNode::with_options(tag, NodeOptions { index, ..options }))
            .collect();
        let lan = nodes[0].add_namespace("lan");
        let outside = nodes[0].add_namespace("outside");
        ip(&[
            "-n",
            &lan,
            "link",
            "add",
            "lan0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &lan, "link", "set", "lan0", "up"]);
        let dual = options.dual_stack;
        plug(&lan, "out0", &outside);
        address(&outside, OUTSIDE_ADDR, dual.then_some(OUTSIDE_ADDR6));
        for node in &nodes {
            let index = node.options().index;
            plug(&lan, &format!("up{index}"), &node.netns);
            address(
                &node.netns,
                uplink_addr(index),
                dual.then(|| uplink_addr6(index)),
            );
            let ns = node.netns.as_str();
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                "default",
                "via",
                &OUTSIDE_ADDR.to_string(),
            ]);
            if dual {
                ip(&[
                    "-n",
                    ns,
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &OUTSIDE_ADDR6.to_string(),
                ]);
            }
            for other in nodes.iter().filter(|n| n.options().index != index) {
                let other_index = other.options().index;
                let via = uplink_addr(other_index).to_string();
                let (net, prefix) = other.pod_subnet();
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("{net}/{prefix}"),
                    "via",
                    &via,
                ]);
                ip(&[
                    "-n",
                    ns,
                    "route",
                    "add",
                    &format!("{}/32", other.addr()),
                    "via",
                    &via,
                ]);
                if let (Some((net6, prefix6)), Some(addr6)) = (other.pod_subnet6(), other.addr6()) {
                    let via6 = uplink_addr6(other_index).to_string();
                    for dest in [format!("{net6}/{prefix6}"), format!("{addr6}/128")] {
                        ip(&["-n", ns, "-6", "route", "add", &dest, "via", &via6]);
                    }
                }
            }
        }
        Self { nodes, outside }
    }

    /// Node `index`.
    #[must_use]
    pub fn node(&self, index: usize) -> &TestNode {
        &self.nodes[index]
    }

    /// Node `index`, to add pods or start processes.
    pub fn node_mut(&mut self, index: usize) -> &mut TestNode {
        &mut self.nodes[index]
    }

    /// [`install_services`] on every node: kube-proxy runs on each.
    pub fn install_services(&self, mode: ProxyMode, services: &[Service]) {
        for node in &self.nodes {
            install_services(node, mode, services);
        }
    }

    /// Every namespace of the cluster that exists now (for cleanup checks).
    #[must_use]
    pub fn namespaces(&self) -> Vec<String> {
        let mut all = Vec::new();
        for node in &self.nodes {
            all.extend(node.namespaces().iter().cloned());
        }
        all
    }
}

/// A veth from the LAN's bridge (`lan_if`, in `lan`) to `eth0` in `netns`.
fn plug(lan: &str, lan_if: &str, netns: &str) {
    ip(&[
        "-n", lan, "link", "add", lan_if, "type", "veth", "peer", "name", "eth0", "netns", netns,
    ]);
    ip(&["-n", lan, "link", "set", lan_if, "master", "lan0"]);
    ip(&["-n", lan, "link", "set", lan_if, "up"]);
}

/// `addr/24` (and `addr6/64`) on `eth0` in `netns`, which is then brought up.
fn address(netns: &str, addr: Ipv4Addr, addr6: Option<Ipv6Addr>) {
    ip(&[
        "-n",
        netns,
        "addr",
        "add",
        &format!("{addr}/24"),
        "dev",
        "eth0",
    ]);
    if let Some(addr6) = addr6 {
        sysctl(netns, "net.ipv6.conf.eth0.accept_dad", "0");
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{addr6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
    }
    ip(&["-n", netns, "link", "set", "eth0", "up"]);
}

/// Starts `nw-pod-server` in `pod` on `port`, on its IPv4 address and, when it has one, its IPv6
/// address (stopped with the node); returns the URLs `http://<addr>:<port>`.
pub fn serve(node: &mut TestNode, pod: &Pod, port: u16) -> Vec<String> {
    let server = crate::pod_server_bin();
    let mut addrs = vec![IpAddr::V4(pod.ip)];
    addrs.extend(pod.ip6.map(IpAddr::V6));
    addrs
        .into_iter()
        .map(|addr| {
            let listen = socket(addr, port);
            node.spawn(&pod.netns, &server, &[&listen]);
            format!("http://{listen}")
        })
        .collect()
}

/// `curl` `url` from `netns` until it answers 200 or `limit` has passed (each try up to 2 s);
/// the last answer (status 0: none).
#[must_use]
pub fn get_until_ok(node: &TestNode, netns: &str, url: &str, limit: Duration) -> (u16, String) {
    let deadline = Instant::now() + limit;
    loop {
        let answer = node.curl_within(2, netns, "GET", url, &[]);
        if answer.0 == 200 || Instant::now() >= deadline {
            return answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use super::{
        family_services, kube_proxy_iptables, kube_proxy_nftables, service_ip, service_ip6, Family,
        Service,
    };
    use crate::netns::{pod_ip, pod_ip6, Pod};

    fn pod(name: &str, index: u8) -> Pod {
        Pod {
            name: name.to_owned(),
            netns: format!("ns-{name}"),
            ip: pod_ip(index),
            ip6: Some(pod_ip6(pod_ip(index))),
            host_if: format!("nwp{index}"),
        }
    }

    fn two_endpoints() -> Vec<Service> {
        let (a, b) = (pod("a", 10), pod("b", 11));
        vec![
            Service::new("default/web:http", service_ip(10), 80, 8000, &[&a, &b])
                .with_node_port(30080)
                .with_cluster_ip6(service_ip6(10)),
        ]
    }

    /// The rules kube-proxy's iptables mode writes for a NodePort Service with two endpoints.
    #[test]
    fn iptables_mode_has_kube_proxys_chains_marks_and_dnat() {
        let services = two_endpoints();
        let rules = kube_proxy_iptables(Family::V4, &family_services(&services, Family::V4));
        for expected in [
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-j MASQUERADE --random-fully",
            "-d 10.96.0.10/32 --dport 80 -j KUBE-SVC-",
            "--dport 80 ! -s 10.200.0.0/17 -j KUBE-MARK-MASQ",
            "-m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-",
            "-s 10.200.0.10/32 -j KUBE-MARK-MASQ",
            "-j DNAT --to-destination 10.200.0.10:8000",
            "-j DNAT --to-destination 10.200.0.11:8000",
            "--dport 30080 -j KUBE-EXT-",
            "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        ] {
            assert!(rules.contains(expected), "{expected} missing in\n{rules}");
        }
        assert!(
            rules.trim_end().ends_with("KUBE-NODEPORTS\nCOMMIT"),
            "the NodePort jump is the last rule of KUBE-SERVICES:\n{rules}"
        );
        let v6 = kube_proxy_iptables(Family::V6, &family_services(&services, Family::V6));
        for expected in [
            "-d fd00:10:96::a/128 --dport 80 -j KUBE-SVC-",
            "! -s fd00:200::/48 -j KUBE-MARK-MASQ",
            "-j DNAT --to-destination [fd00:200::b]:8000",
            "! -d ::1/128 -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
        ] {
            assert!(v6.contains(expected), "{expected} missing in\n{v6}");
        }
    }

    /// The table kube-proxy's nftables mode writes for the same Service.
    #[test]
    fn nftables_mode_has_kube_proxys_maps_and_chains() {
        let services = two_endpoints();
        let ips = ["10.200.255.1".parse().expect("an address")];
        let ruleset =
            kube_proxy_nftables(Family::V4, &ips, &family_services(&services, Family::V4));
        for expected in [
            "add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000",
            "add rule ip kube-proxy masquerading mark and 0x4000 == 0 return",
            "add rule ip kube-proxy masquerading mark set mark xor 0x4000",
            "add rule ip kube-proxy masquerading masquerade fully-random",
            "add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips",
            "ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports",
            "add element ip kube-proxy nodeport-ips { 10.200.255.1 }",
            "ip daddr 10.96.0.10 ip saddr != 10.200.0.0/17 jump mark-for-masquerade",
            "numgen random mod 2 vmap { 0 : goto endpoint-",
            "-default/web/tcp/http__10.200.0.11/8000 meta l4proto tcp dnat to 10.200.0.11:8000",
            "ip saddr 10.200.0.10 jump mark-for-masquerade",
            "add element ip kube-proxy service-ips { 10.96.0.10 . tcp . 80 : goto service-",
            "add element ip kube-proxy service-nodeports { tcp . 30080 : goto external-",
        ] {
            assert!(
                ruleset.contains(expected),
                "{expected} missing in\n{ruleset}"
            );
        }
        let v6 = kube_proxy_nftables(Family::V6, &[], &family_services(&services, Family::V6));
        for expected in [
            "add table ip6 kube-proxy",
            "ip6 daddr fd00:10:96::a ip6 saddr != fd00:200::/48 jump mark-for-masquerade",
            "meta l4proto tcp dnat to [fd00:200::a]:8000",
            "type ipv6_addr . inet_proto . inet_service : verdict",
        ] {
            assert!(v6.contains(expected), "{expected} missing in\n{v6}");
        }
    }
}
