//! The cluster kit without the agent: every path into a pod that a kind cluster has (kube-proxy
//! Services in iptables and nftables mode, NodePorts from outside, portmap hostPorts, a pod's
//! own Service, IPv6, a bridged CNI, a pod on another node) reaches the pod's server through
//! the kit's rules and routes alone, and the namespaces are gone afterwards. These are the
//! baselines the agent's end-to-end tests build on: a path that fails here is the kit's fault.

use std::time::Duration;

use nodeward_tests::cluster::{
    get_until_ok, install_hostport, serve, service_ip, service_ip6, uplink_addr, uplink_addr6,
    Cluster, ProxyMode, Service, OUTSIDE_ADDR, OUTSIDE_ADDR6,
};
use nodeward_tests::netns::{pod_ip, Cni, NodeOptions, Pod, TestNode, NODE_ADDR, PREFIX};

/// How long a path may take to answer the first time.
const LIMIT: Duration = Duration::from_secs(10);

fn namespaces() -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect()
}

/// `GET url` from `netns` answers 200 from a pod server; what the server saw.
fn reaches(node: &TestNode, netns: &str, url: &str, path: &str) -> serde_json::Value {
    let (status, body) = get_until_ok(node, netns, url, LIMIT);
    assert_eq!(status, 200, "{path}: GET {url} from {netns}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: pod server JSON: {e}: {body}"))
}

/// The address part of the server's `peer` (`ip:port` or `[ip]:port`).
fn peer(seen: &serde_json::Value) -> String {
    let peer = seen["peer"].as_str().unwrap_or_default();
    let (host, _) = peer.rsplit_once(':').unwrap_or((peer, ""));
    host.trim_matches(['[', ']']).to_owned()
}

/// Drops the cluster and asserts that none of its namespaces is left.
fn drop_and_check(cluster: Cluster) {
    let made = cluster.namespaces();
    assert!(made.len() >= 4, "{made:?}");
    assert!(made.iter().all(|n| namespaces().contains(n)), "{made:?}");
    drop(cluster);
    let left: Vec<String> = made
        .into_iter()
        .filter(|n| namespaces().contains(n))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

fn dual_stack(cni: Cni) -> NodeOptions {
    NodeOptions {
        cni,
        dual_stack: true,
        index: 0,
    }
}

/// One dual-stack node with two `web` endpoints and a client; the Service `default/web:http`
/// (`10.96.0.10:80`, `[fd00:10:96::a]:80`, NodePort 30080) → the webs' 8000, in `mode`.
fn service_paths(tag: &str, cni: Cni, mode: ProxyMode) {
    let mut cluster = Cluster::new(tag, dual_stack(cni), 1);
    let node = cluster.node_mut(0);
    let web = node.add_pod("web", pod_ip(10));
    let web2 = node.add_pod("web2", pod_ip(12));
    let client = node.add_pod("client", pod_ip(11));
    serve(node, &web, 8000);
    serve(node, &web2, 8000);
    let service = Service::new("default/web:http", service_ip(10), 80, 8000, &[&web, &web2])
        .with_node_port(30080)
        .with_cluster_ip6(service_ip6(10));
    cluster.install_services(mode, &[service]);
    let node = cluster.node(0);
    let endpoints = [web.ip.to_string(), web2.ip.to_string()];

    let seen = reaches(
        node,
        &client.netns,
        "http://10.96.0.10/",
        "pod -> ClusterIP",
    );
    assert_eq!(
        peer(&seen),
        client.ip.to_string(),
        "pod traffic is not masqueraded"
    );

    let seen = reaches(node, &node.netns, "http://10.96.0.10/", "node -> ClusterIP");
    assert!(!endpoints.contains(&peer(&seen)), "masqueraded: {seen}");

    let url = format!("http://{}:30080/", uplink_addr(0));
    let seen = reaches(node, &cluster.outside, &url, "outside -> NodePort");
    assert_ne!(
        peer(&seen),
        OUTSIDE_ADDR.to_string(),
        "NodePort traffic is masqueraded"
    );

    let url = format!("http://{NODE_ADDR}:30080/");
    reaches(
        node,
        &client.netns,
        &url,
        "pod -> NodePort on the node's address",
    );
    let url = format!("http://[{}]:30080/", uplink_addr6(0));
    let seen = reaches(node, &cluster.outside, &url, "outside -> IPv6 NodePort");
    assert_ne!(peer(&seen), OUTSIDE_ADDR6.to_string(), "masqueraded");

    // A pod reaching itself through its Service: masqueraded (hairpin), or its own reply would
    // never be un-DNATed. Retried until the random choice picks itself.
    let own = (0..40).find_map(|_| {
        let seen = reaches(node, &web.netns, "http://10.96.0.10/", "pod -> own Service");
        (peer(&seen) != web.ip.to_string()).then_some(seen)
    });
    assert!(own.is_some(), "a pod's own Service answers it");

    let seen = reaches(
        node,
        &client.netns,
        "http://[fd00:10:96::a]/",
        "pod -> IPv6 ClusterIP",
    );
    assert_eq!(peer(&seen), client.ip6.expect("dual-stack").to_string());
    let url = format!("http://[{}]:8000/", web.ip6.expect("dual-stack"));
    let seen = reaches(node, &client.netns, &url, "IPv6 pod -> pod");
    assert_eq!(peer(&seen), client.ip6.expect("dual-stack").to_string());
    reaches(
        node,
        &node.netns,
        "http://[fd00:10:96::a]/",
        "node -> IPv6 ClusterIP",
    );
    drop_and_check(cluster);
}

#[test]
fn kube_proxy_iptables_mode_routed() {
    service_paths("kit-ipt", Cni::Routed, ProxyMode::Iptables);
}

#[test]
fn kube_proxy_nftables_mode_routed() {
    service_paths("kit-nft", Cni::Routed, ProxyMode::Nftables);
}

#[test]
fn kube_proxy_iptables_mode_bridged() {
    service_paths("kit-bri", Cni::Bridge, ProxyMode::Iptables);
}

#[test]
fn kube_proxy_nftables_mode_bridged() {
    service_paths("kit-brn", Cni::Bridge, ProxyMode::Nftables);
}

/// portmap's `hostPort: 18080` → web's 8000: from another pod, from web itself (hairpin), from
/// the node's `127.0.0.1`, and from outside on the node's uplink address.
fn hostport_paths(tag: &str, cni: Cni) {
    let mut cluster = Cluster::new(tag, dual_stack(cni), 1);
    let node = cluster.node_mut(0);
    let web = node.add_pod("web", pod_ip(10));
    let client = node.add_pod("client", pod_ip(11));
    serve(node, &web, 8000);
    install_hostport(node, &web, 18080, 8000);
    let node = cluster.node(0);
    let addr = node.addr();

    let seen = reaches(
        node,
        &client.netns,
        &format!("http://{addr}:18080/"),
        "pod -> hostPort",
    );
    // portmap marks for masquerading whatever comes from the node's pod subnet, not only the
    // pod itself.
    assert_eq!(
        peer(&seen),
        node.addr_to_pods().to_string(),
        "masqueraded to the node's address"
    );
    let seen = reaches(
        node,
        &web.netns,
        &format!("http://{addr}:18080/"),
        "pod -> own hostPort",
    );
    assert_ne!(peer(&seen), web.ip.to_string(), "hairpin is masqueraded");
    reaches(
        node,
        &node.netns,
        "http://127.0.0.1:18080/",
        "node -> 127.0.0.1:hostPort",
    );
    let url = format!("http://{}:18080/", uplink_addr(0));
    let seen = reaches(node, &cluster.outside, &url, "outside -> hostPort");
    assert_eq!(peer(&seen), OUTSIDE_ADDR.to_string(), "not masqueraded");
    let url = format!("http://[{}]:18080/", node.addr6().expect("dual-stack"));
    reaches(node, &client.netns, &url, "IPv6 pod -> hostPort");
    let url = format!("http://[{}]:18080/", uplink_addr6(0));
    let seen = reaches(node, &cluster.outside, &url, "outside -> IPv6 hostPort");
    assert_eq!(peer(&seen), OUTSIDE_ADDR6.to_string(), "not masqueraded");
    drop_and_check(cluster);
}

#[test]
fn portmap_hostport_routed() {
    hostport_paths("kit-hp", Cni::Routed);
}

#[test]
fn portmap_hostport_bridged() {
    hostport_paths("kit-hpb", Cni::Bridge);
}

/// Pods on a bridged node reach each other over the bridge, on both families.
#[test]
fn bridged_pods_talk_over_the_bridge() {
    let mut cluster = Cluster::new("kit-br", dual_stack(Cni::Bridge), 1);
    let node = cluster.node_mut(0);
    let web = node.add_pod("web", pod_ip(10));
    let client = node.add_pod("client", pod_ip(11));
    let urls = serve(node, &web, 8000);
    let node = cluster.node(0);
    for url in &urls {
        let seen = reaches(
            node,
            &client.netns,
            &format!("{url}/"),
            "bridged pod -> pod",
        );
        assert!(
            [
                client.ip.to_string(),
                client.ip6.expect("dual-stack").to_string()
            ]
            .contains(&peer(&seen)),
            "{seen}"
        );
    }
    drop_and_check(cluster);
}

/// Two nodes: a pod on node 1 reaches a pod on node 0 directly (routed over the LAN, both
/// families) and through a Service whose endpoint is on node 0 (node 1's kube-proxy DNATs), and
/// the outside host reaches that Service's NodePort on node 1.
fn cross_node(tag: &str, cni: Cni, mode: ProxyMode) {
    let mut cluster = Cluster::new(tag, dual_stack(cni), 2);
    let web: Pod = cluster.node_mut(0).add_pod("web", pod_ip(10));
    let remote = cluster
        .node_mut(1)
        .add_pod("remote", std::net::Ipv4Addr::new(10, 200, 1, 10));
    serve(cluster.node_mut(0), &web, 8000);
    let service = Service::new("default/web:http", service_ip(10), 80, 8000, &[&web])
        .with_node_port(30080)
        .with_cluster_ip6(service_ip6(10));
    cluster.install_services(mode, &[service]);
    let node1 = cluster.node(1);
    let seen = reaches(
        node1,
        &remote.netns,
        &format!("http://{}:8000/", web.ip),
        "remote pod -> pod",
    );
    assert_eq!(
        peer(&seen),
        remote.ip.to_string(),
        "pod to pod keeps its source"
    );
    let url = format!("http://[{}]:8000/", web.ip6.expect("dual-stack"));
    let seen = reaches(node1, &remote.netns, &url, "remote IPv6 pod -> pod");
    assert_eq!(peer(&seen), remote.ip6.expect("dual-stack").to_string());
    let seen = reaches(
        node1,
        &remote.netns,
        "http://10.96.0.10/",
        "remote pod -> ClusterIP",
    );
    assert_eq!(peer(&seen), remote.ip.to_string());
    let seen = reaches(
        node1,
        &remote.netns,
        "http://[fd00:10:96::a]/",
        "remote IPv6 pod -> IPv6 ClusterIP",
    );
    assert_eq!(peer(&seen), remote.ip6.expect("dual-stack").to_string());
    let url = format!("http://{}:30080/", uplink_addr(1));
    reaches(
        node1,
        &cluster.outside,
        &url,
        "outside -> NodePort on the other node",
    );
    drop_and_check(cluster);
}

#[test]
fn cross_node_routed_iptables() {
    cross_node("kit-x", Cni::Routed, ProxyMode::Iptables);
}

#[test]
fn cross_node_bridged_nftables() {
    cross_node("kit-xb", Cni::Bridge, ProxyMode::Nftables);
}

/// The default node is unchanged: routed, IPv4 only, no IPv6 on its pods.
#[test]
fn the_default_node_is_routed_ipv4_only() {
    let mut node = TestNode::new("kit-default");
    let pod = node.add_pod("pod", pod_ip(10));
    assert_eq!(pod.ip6, None);
    assert_eq!(node.addr(), NODE_ADDR);
    assert_eq!(node.addr6(), None);
    let addrs = node.ip_out(&["-6", "-o", "addr", "show", "scope", "global"]);
    assert!(addrs.trim().is_empty(), "{addrs}");
}

#[test]
fn a_cluster_is_removed_on_panic() {
    let made = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let mut cluster = Cluster::new("kit-panic", dual_stack(Cni::Bridge), 2);
        cluster
            .node_mut(1)
            .add_pod("doomed", std::net::Ipv4Addr::new(10, 200, 1, 10));
        let web = cluster.node_mut(0).add_pod("web", pod_ip(10));
        install_hostport(cluster.node(0), &web, 18080, 8000);
        made.lock().expect("lock").extend(cluster.namespaces());
        panic!("test failure inside the cluster");
    });
    assert!(result.is_err());
    let made = made.into_inner().expect("lock");
    assert_eq!(
        made.len(),
        6,
        "2 nodes, 2 pods, the LAN, the outside host: {made:?}"
    );
    let left: Vec<&String> = made.iter().filter(|n| namespaces().contains(n)).collect();
    assert!(left.is_empty(), "namespaces left after a panic: {left:?}");
}
