//! End to end, in-pod steering (`--steering in-pod`): the enforcer's listener and the `inpod`
//! program inside each protected pod's namespace judge every path into the pod after every NAT
//! the node applies: the pod's address, a Service's ClusterIP and NodePort (DNAT and
//! masquerade as kube-proxy writes them), a hostPort with portmap's 0x2000 mark, the node
//! itself, IPv6; through an agent crash and a rollout (SIGTERM leaves the programs enforcing
//! `--failure-mode`), until `nodeward uninstall`; and a connection opened before the pod was
//! protected never carries a request past the enforcer afterwards.
//!
//! Policies ([`protected_policies`]): `require` wants a JWT principal, `web` any known peer
//! principal (the registered `sleep` is known, the unregistered `stranger` and the node are not).

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::time::Duration;

use nodeward_tests::cluster::{
    install_hostport, install_services, service_ip, service_ip6, uplink_addr, Cluster, ProxyMode,
    Service,
};
use nodeward_tests::e2e::{
    add_probes, bearer, protected_policies, request_authn, sample, seen, start_on, Env,
    PROTECTED_PODS, SHORT,
};
use nodeward_tests::netns::{in_netns, Cni, NodeOptions, TestNode};
use nodeward_tests::{eventually, nodeward};
use test_case::test_case;

const DENIED: (u16, &str) = (403, "RBAC: access denied");

fn start_in_pod(tag: &str, policies: &str, extra: &[&str]) -> Env {
    in_pod_on(TestNode::new(tag), policies, extra)
}

/// The agent on `node` with in-pod steering over the node's pods only (the harness passes
/// `--netns-dir`) and the fast path on the node's own cgroup (never the machine's).
fn in_pod_on(mut node: TestNode, policies: &str, extra: &[&str]) -> Env {
    let cgroup = node.use_cgroup().to_str().expect("utf-8").to_owned();
    let mut args = vec!["--steering", "in-pod", "--cgroup", &cgroup];
    args.extend_from_slice(extra);
    start_on(node, &PROTECTED_PODS, policies, &args)
}

/// `curl` with a short limit from `from` (a pod's name, or `node`) to `url`.
fn get(env: &Env, from: &str, url: &str, headers: &[&str]) -> (u16, String) {
    let netns = if from == "node" {
        env.node.netns.clone()
    } else {
        env.pod(from).netns.clone()
    };
    env.node.curl_within(SHORT + 1, &netns, "GET", url, headers)
}

/// Every path into `web` and `require` is judged, on a dual-stack node of each CNI style with
/// kube-proxy in each mode: the pods' addresses (IPv4 and IPv6), the Services' `ClusterIP`s
/// (both families), the `NodePort`, a pod's own Service (hairpin), the hostPort with portmap's
/// 0x2000 mark (refused outright with host steering), from pods and from the node.
#[test_case(Cni::Routed, ProxyMode::Iptables ; "routed CNI, kube-proxy iptables")]
#[test_case(Cni::Bridge, ProxyMode::Nftables ; "bridge CNI, kube-proxy nftables")]
#[test_case(Cni::Routed, ProxyMode::Nftables ; "routed CNI, kube-proxy nftables")]
#[test_case(Cni::Bridge, ProxyMode::Iptables ; "bridge CNI, kube-proxy iptables")]
fn every_path_into_a_protected_pod_is_judged(cni: Cni, mode: ProxyMode) {
    let tag = format!("inpod-{}-{}", cni_name(cni), mode_name(mode));
    let node = TestNode::with_options(
        &tag,
        NodeOptions {
            cni,
            dual_stack: true,
            index: 0,
        },
    );
    let mut env = in_pod_on(node, &protected_policies(), &[]);
    let (web, require) = (env.pod("web").clone(), env.pod("require").clone());
    // The harness serves IPv4 only; the IPv6 servers (the enforcer dials the address the
    // client asked for).
    let server = nodeward_tests::pod_server_bin();
    for pod in [&web, &require] {
        let ip6 = pod.ip6.expect("dual-stack");
        env.node
            .spawn(&pod.netns, &server, &[&format!("[{ip6}]:8000")]);
    }
    let services = [
        Service::new("foo/web:http", service_ip(12), 80, 8000, &[&web])
            .with_node_port(30080)
            .with_cluster_ip6(service_ip6(12)),
        Service::new("foo/require:http", service_ip(11), 80, 8000, &[&require])
            .with_cluster_ip6(service_ip6(11)),
    ];
    install_services(&env.node, mode, &services);
    install_hostport(&env.node, &web, 18000, 8000);
    let node_addr = env.node.addr();
    let assigned = env.counter("inpod_assigned_listener");

    // (source, url, expected): `sleep` is a known principal by its IPv4 address; `stranger`,
    // the node, and every masqueraded flow (NodePort, hostPort, hairpin, the node's ClusterIP
    // traffic) are not, as Istio sees them.
    let (web4, web6) = (web.ip, web.ip6.expect("v6"));
    let (svc4, svc6) = (service_ip(12), service_ip6(12));
    let rows: Vec<(&str, String, (u16, &str))> = vec![
        ("sleep", format!("http://{web4}:8000/"), (200, "")),
        ("stranger", format!("http://{web4}:8000/"), DENIED),
        ("node", format!("http://{web4}:8000/"), DENIED),
        ("sleep", format!("http://{svc4}/"), (200, "")),
        ("stranger", format!("http://{svc4}/"), DENIED),
        ("node", format!("http://{svc4}/"), DENIED),
        ("web", format!("http://{svc4}/"), DENIED),
        ("stranger", format!("http://{node_addr}:30080/"), DENIED),
        ("stranger", format!("http://{node_addr}:18000/"), DENIED),
        ("node", "http://127.0.0.1:18000/".to_owned(), DENIED),
        ("stranger", format!("http://[{web6}]:8000/"), DENIED),
        ("node", format!("http://[{web6}]:8000/"), DENIED),
        ("stranger", format!("http://[{svc6}]/"), DENIED),
    ];
    for (from, url, expected) in &rows {
        let (status, body) = get(&env, from, url, &[]);
        if expected.0 == 200 {
            assert_eq!(status, 200, "{from} -> {url}: {body}\n{}", env.log());
            let got = seen(&body);
            assert_eq!(got["uri"], "/", "{from} -> {url}: {got}");
            // The enforcer's upstream runs inside the pod: the app sees the pod's own address.
            assert!(
                got["peer"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&format!("{web4}:")),
                "{from} -> {url}: {got}"
            );
        } else {
            assert_eq!(
                (status, body.as_str()),
                *expected,
                "{from} -> {url} was not judged\n{}",
                env.log()
            );
        }
    }
    // A JWT principal through the Services of both families: judged and allowed, the token
    // removed before the pod; a bad token is 401.
    let demo = bearer(&sample("demo.jwt"));
    for url in [
        format!("http://{}/headers", service_ip(11)),
        format!("http://[{}]/headers", service_ip6(11)),
    ] {
        let (status, body) = get(&env, "stranger", &url, &[&demo]);
        assert_eq!(status, 200, "{url}: {body}\n{}", env.log());
        assert!(seen(&body)["headers"].get("authorization").is_none());
        let (status, _) = get(&env, "stranger", &url, &[&bearer("garbage")]);
        assert_eq!(status, 401, "{url}");
    }
    assert!(
        env.counter("inpod_assigned_listener") >= assigned + rows.len() as u64,
        "every row went through an in-pod listener"
    );
    // The fast path carried the bytes of the flows to a pod's own address (client <-> enforcer
    // in the pod, enforcer <-> app on the pod's loopback), with the answers above unchanged.
    assert!(env.counter("fastpath_msgs_redirected") > 0, "{}", env.log());
    assert!(env.counter("fastpath_sockets_added") >= 4);
}

fn cni_name(cni: Cni) -> &'static str {
    match cni {
        Cni::Routed => "routed",
        Cni::Bridge => "bridge",
    }
}

fn mode_name(mode: ProxyMode) -> &'static str {
    match mode {
        ProxyMode::Iptables => "ipt",
        ProxyMode::Nftables => "nft",
    }
}

/// IPv6 to a dual-stack pod is steered and judged exactly like IPv4 (the pod is registered by
/// its IPv4 address; the enforcer knows it by the namespace the flow arrived in).
#[test]
fn ipv6_into_a_protected_pod_is_judged() {
    let mut env = start_in_pod("inpod-ipv6", &protected_policies(), &[]);
    let node = env.node.netns.clone();
    let ip6 = |netns: &str, args: &str| {
        let mut all = vec!["-n", netns, "-6"];
        all.extend(args.split_whitespace());
        nodeward_tests::netns::ip(&all);
    };
    for (pod, index) in [("require", 11), ("web", 12)] {
        let p = env.pod(pod).clone();
        let (pod_v6, node_v6) = (format!("fd00:200::{index}"), format!("fd00:200::1:{index}"));
        ip6(&p.netns, &format!("addr add {pod_v6}/128 dev eth0 nodad"));
        ip6(
            &node,
            &format!("addr add {node_v6}/128 dev {} nodad", p.host_if),
        );
        ip6(&node, &format!("route add {pod_v6}/128 dev {}", p.host_if));
        ip6(&p.netns, &format!("route add {node_v6}/128 dev eth0"));
        ip6(
            &p.netns,
            &format!("route add default via {node_v6} dev eth0"),
        );
    }
    let require = env.pod("require").netns.clone();
    let server = nodeward_tests::pod_server_bin();
    env.node.spawn(&require, &server, &["[fd00:200::11]:8000"]);
    // The agent learns the new addresses within its periodic rescan (2 s); the enforcer then
    // dials the pod's IPv6 address from inside the pod.
    let demo = bearer(&sample("demo.jwt"));
    let allowed = eventually(Duration::from_secs(10), || {
        get(&env, "node", "http://[fd00:200::11]:8000/", &[&demo]).0 == 200
    });
    assert!(
        allowed,
        "a JWT principal over IPv6 is allowed
{}",
        env.log()
    );
    let (status, body) = get(&env, "node", "http://[fd00:200::12]:8000/", &[]);
    assert_eq!(
        (status, body.as_str()),
        DENIED,
        "IPv6 from the node to web was not judged\n{}",
        env.log()
    );
    let (status, _) = get(&env, "node", "http://[fd00:200::11]:8000/", &[]);
    assert_eq!(status, 403, "require without a token over IPv6");
    let (status, _) = get(
        &env,
        "node",
        "http://[fd00:200::11]:8000/",
        &[&bearer("garbage")],
    );
    assert_eq!(status, 401, "a bad token over IPv6");
}

/// A crash, then a rollout (SIGTERM, as a DaemonSet update sends): while no agent runs, new
/// connections get `--failure-mode closed` (no answer); the next agent takes the pinned
/// programs over and judges again; `nodeward uninstall` removes everything, after which the
/// pod is reached directly.
#[test]
fn the_data_path_outlives_the_agent_until_uninstall() {
    let mut env = start_in_pod("inpod-life", &protected_policies(), &[]);
    let web = env.pod("web").ip;
    let url = format!("http://{web}:8000/");
    assert_eq!(get(&env, "sleep", &url, &[]).0, 200);

    env.kill_agent();
    assert_eq!(get(&env, "sleep", &url, &[]).0, 0, "crash: fail closed");
    env.start_agent();
    assert_eq!(get(&env, "sleep", &url, &[]).0, 200, "{}", env.log());

    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert_eq!(
        get(&env, "sleep", &url, &[]).0,
        0,
        "rollout gap: fail closed, never unjudged"
    );
    let pins = env.pin_dir().join("inpod");
    assert!(
        std::fs::read_dir(&pins).map_or(0, Iterator::count) > 0,
        "the in-pod programs stay pinned after SIGTERM"
    );
    env.start_agent();
    assert_eq!(
        get(&env, "stranger", &url, &[]),
        (DENIED.0, DENIED.1.to_owned())
    );
    assert_eq!(env.stop_agent(), Some(0));

    let pin_dir = env.pin_dir();
    let out = env.uninstall();
    assert!(out.status.success(), "uninstall: {out:?}");
    assert!(!pin_dir.exists(), "uninstall removed the pin directory");
    // Nothing is left in the pod: the server answers directly (no enforcer, no token check).
    let (status, body) = get(&env, "stranger", &url, &[]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        seen(&body)["peer"]
            .as_str()
            .map(|p| p.starts_with("10.200.0.21:")),
        Some(true)
    );
    let _ = nodeward(&["--version"]);
}

/// A keep-alive connection opened while `web` was not protected carries no request past the
/// enforcer once a policy protects `web`: Istio judges every request, so the old connection must
/// not keep reaching the pod unjudged.
#[test]
fn a_connection_from_before_the_protection_is_not_delivered() {
    let only_require = format!(
        "{}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-jwt}}}}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"*\"]}}}}]\n",
        request_authn("httpbin-jwt")
    );
    let env = start_in_pod("inpod-old", &only_require, &[]);
    let web = env.pod("web").ip;
    let request = format!("GET /old HTTP/1.1\r\nHost: {web}\r\n\r\n");
    let mut stream = in_netns(&env.pod("stranger").netns, || {
        TcpStream::connect((web, 8000)).expect("connect to the unprotected pod")
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut buf = [0_u8; 4096];
    let n = stream.read(&mut buf).expect("the unprotected pod answers");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );

    // Now `web` is protected: an ALLOW policy that nobody matches.
    let current = std::fs::read_to_string(env.policy_file()).expect("policies");
    let protect = format!(
        "{current}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: web-nobody, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [\"nobody\"]}}}}]\n"
    );
    std::fs::write(env.policy_file(), protect).expect("write policies");
    let url = format!("http://{web}:8000/");
    let applied = eventually(Duration::from_secs(10), || {
        get(&env, "stranger", &url, &[]).0 == 403
    });
    assert!(applied, "the new policy protects web\n{}", env.log());

    // The old connection: its next request must not reach the pod.
    let sent = stream.write_all(request.as_bytes());
    let answer = match (sent, stream.read(&mut buf)) {
        (Ok(()), Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    };
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a request on a connection from before the protection reached the pod unjudged: {answer:?}"
    );
    assert!(env.counter("inpod_dropped_unjudged") > 0);
}

/// A pod cannot send from another pod's address (the enforcer takes a peer's identity from it):
/// `stranger` sends from `sleep`'s address, which `web` would let in; `inpod_egress` drops the
/// SYN in `stranger`'s own namespace, so nothing reaches `web`'s listener.
#[test]
fn a_pod_cannot_send_from_another_pods_address() {
    let env = start_in_pod("inpod-spoof", &protected_policies(), &[]);
    let sleep = env.pod("sleep").ip.to_string();
    let stranger = env.pod("stranger").netns.clone();
    // Root in the pod's namespace adds the address (a pod with CAP_NET_RAW writes it into raw
    // packets instead); loopback addresses are never the pod's own.
    nodeward_tests::netns::ip(&[
        "-n",
        &stranger,
        "addr",
        "add",
        &format!("{sleep}/32"),
        "dev",
        "lo",
    ]);
    let url = format!("http://{}:8000/", env.pod("web").ip);
    let (spoofed, assigned) = (
        env.counter("inpod_dropped_spoofed"),
        env.counter("inpod_assigned_listener"),
    );
    let out = env.node.exec(
        &stranger,
        &[
            "curl",
            "-s",
            "-m",
            "2",
            "--interface",
            &sleep,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000", "{out:?}");
    assert!(
        env.counter("inpod_dropped_spoofed") > spoofed,
        "dropped at the source\n{}",
        env.log()
    );
    assert_eq!(
        env.counter("inpod_assigned_listener"),
        assigned,
        "no spoofed SYN reached web's listener"
    );
    // Its own address still works (and is judged: stranger has no identity).
    let (status, body) = get(&env, "stranger", &url, &[]);
    assert_eq!((status, body.as_str()), DENIED);
}

/// Traffic from another node and from outside the cluster: a pod on node 2 (registered in the
/// workloads file, so it has an identity although it is not on this node) reaches `web` on
/// node 1 by its address and through the Service (node 2's kube-proxy DNATs it, the source
/// stays the pod's): judged and allowed by identity; a host outside the cluster reaches the
/// NodePort of either node (masqueraded): judged and denied.
#[test]
fn traffic_from_other_nodes_and_outside_is_judged() {
    let mut cluster = Cluster::new(
        "inpod-xnode",
        NodeOptions {
            cni: Cni::Routed,
            dual_stack: false,
            index: 0,
        },
        2,
    );
    let env = in_pod_on(cluster.nodes.remove(0), &protected_policies(), &[]);
    let other = &mut cluster.nodes[0];
    let remote = other.add_pod("remote", Ipv4Addr::new(10, 200, 1, 30));
    let workloads = env.dir.join("workloads.yaml");
    let mut text = std::fs::read_to_string(&workloads).expect("workloads");
    writeln!(
        text,
        "  - name: remote\n    namespace: foo\n    serviceAccount: remote\n    labels: {{app: remote}}\n    ip: {}",
        remote.ip
    )
    .expect("a String takes it");
    std::fs::write(&workloads, text).expect("write workloads");
    let web = env.pod("web").clone();
    let service =
        Service::new("foo/web:http", service_ip(12), 80, 8000, &[&web]).with_node_port(30080);
    install_services(
        &env.node,
        ProxyMode::Iptables,
        std::slice::from_ref(&service),
    );
    install_services(&cluster.nodes[0], ProxyMode::Nftables, &[service]);

    let from_remote =
        |url: &str| cluster.nodes[0].curl_within(SHORT + 1, &remote.netns, "GET", url, &[]);
    let pod_url = format!("http://{}:8000/", web.ip);
    let known = eventually(Duration::from_secs(10), || from_remote(&pod_url).0 == 200);
    assert!(
        known,
        "the remote pod, once registered, is a known principal\n{}",
        env.log()
    );
    let (status, body) = from_remote(&format!("http://{}/", service_ip(12)));
    assert_eq!(
        status, 200,
        "remote pod -> its node's ClusterIP -> web: {body}"
    );
    assert_eq!(
        seen(&body)["peer"]
            .as_str()
            .map(|p| p.starts_with(&format!("{}:", web.ip))),
        Some(true),
        "through the in-pod enforcer"
    );
    for node_addr in [uplink_addr(0), uplink_addr(1)] {
        let url = format!("http://{node_addr}:30080/");
        let (status, body) =
            cluster.nodes[0].curl_within(SHORT + 1, &cluster.outside, "GET", &url, &[]);
        assert_eq!(
            (status, body.as_str()),
            DENIED,
            "outside -> NodePort {url}\n{}",
            env.log()
        );
    }
}

/// The kubelet's probes under in-pod steering: the node's request to a declared probe endpoint
/// crosses the pod's interface like any other, is steered, and passes unjudged because it comes
/// from a node address; the same request from a pod is judged.
#[test]
fn probes_from_the_node_pass_and_only_from_the_node() {
    let env = start_in_pod("inpod-probe", &protected_policies(), &[]);
    add_probes(&env);
    let url = format!("http://{}:8000/healthz", env.pod("require").ip);
    let (status, body) = get(&env, "node", &url, &[]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = get(&env, "sleep", &url, &[]);
    assert_eq!(
        (status, body.as_str()),
        DENIED,
        "a pod gets no probe exemption"
    );
    let (status, body) = get(
        &env,
        "node",
        &format!("http://{}:8000/", env.pod("require").ip),
        &[],
    );
    assert_eq!(
        (status, body.as_str()),
        DENIED,
        "only the probe path is exempt"
    );
}

/// A connection opened while no agent ran (`--failure-mode open` let it reach the pod
/// unjudged) carries no request past the enforcer once the next agent is up: its segments are
/// dropped, and a new connection is judged.
#[test]
fn a_connection_opened_while_the_agent_was_down_is_not_delivered_after() {
    let mut env = start_in_pod(
        "inpod-gap",
        &protected_policies(),
        &["--failure-mode", "open"],
    );
    let web = env.pod("web").ip;
    env.kill_agent();
    let request = format!("GET /gap HTTP/1.1\r\nHost: {web}\r\n\r\n");
    let mut stream = in_netns(&env.pod("stranger").netns, || {
        TcpStream::connect((web, 8000)).expect("failing open: the pod is reached")
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let mut buf = [0_u8; 4096];
    let n = stream.read(&mut buf).expect("the pod answers, unjudged");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );

    env.start_agent();
    let url = format!("http://{web}:8000/");
    assert_eq!(
        get(&env, "stranger", &url, &[]).0,
        403,
        "new connections are judged"
    );
    let answer = match (stream.write_all(request.as_bytes()), stream.read(&mut buf)) {
        (Ok(()), Ok(n)) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        _ => String::new(),
    };
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a request on a connection from the agent's downtime reached the pod: {answer:?}"
    );
    assert!(env.counter("inpod_dropped_unjudged") > 0);
}

/// The enforcer's own port is never forwarded: a client steered to a protected pod's port 15006,
/// and the pod's app dialing the listener in its namespace directly, would otherwise be sent to
/// that same listener again, in a loop. Both are closed, counted, and the agent keeps serving.
#[test]
fn the_enforcers_own_port_is_refused_not_looped() {
    let env = start_in_pod("inpod-loop", &protected_policies(), &[]);
    let web = env.pod("web").ip;
    let metric = "nodeward_refused_total{reason=\"enforcer_port\"}";
    let before = env.agent().metric(metric);
    let (status, _) = get(&env, "sleep", &format!("http://{web}:15006/"), &[]);
    assert_eq!(status, 0, "closed without an answer");
    let (status, _) = get(&env, "web", "http://127.0.0.1:15006/", &[]);
    assert_eq!(status, 0, "closed without an answer");
    assert!(
        eventually(Duration::from_secs(3), || env.agent().metric(metric)
            >= before + 2),
        "both refused as the enforcer's port\n{}",
        env.log()
    );
    // Still serving.
    assert_eq!(
        get(&env, "sleep", &format!("http://{web}:8000/"), &[]).0,
        200
    );
}
