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

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use nodeward_tests::e2e::{
    bearer, protected_policies, request_authn, sample, seen, start_on, Env, PROTECTED_PODS, SHORT,
};
use nodeward_tests::netns::{in_netns, TestNode, NODE_ADDR};
use nodeward_tests::{eventually, nodeward};

const DENIED: (u16, &str) = (403, "RBAC: access denied");

fn start_in_pod(tag: &str, policies: &str, extra: &[&str]) -> Env {
    let node = TestNode::new(tag);
    let dir = node.netns_dir().to_str().expect("utf-8").to_owned();
    let mut args = vec!["--steering", "in-pod", "--netns-dir", &dir];
    args.extend_from_slice(extra);
    start_on(node, &PROTECTED_PODS, policies, &args)
}

/// Runs `iptables` (or `ip6tables`) in the node with `rule`'s words.
fn iptables(env: &Env, program: &str, rule: &str) {
    let mut args = vec![program, "-w"];
    args.extend(rule.split_whitespace());
    let out = env.node.exec(&env.node.netns, &args);
    assert!(
        out.status.success(),
        "{program} {rule}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A ClusterIP Service 10.96.0.12:80 and a NodePort <node>:30080 for `web`:8000, as
/// kube-proxy's iptables mode writes them: DNAT in PREROUTING (pods, other nodes) and OUTPUT
/// (the node), masquerade for what does not come from a pod (`KUBE-MARK-MASQ` 0x4000, cleared
/// in POSTROUTING before MASQUERADE) and for every NodePort flow.
fn kube_proxy_service(env: &Env) {
    let web = env.pod("web").ip;
    // The Service range is routed off the node (its default route on a real node), so that
    // the node answers pods' ARP for ClusterIPs (proxy ARP needs a route).
    let node = env.node.netns.as_str();
    nodeward_tests::netns::ip(&[
        "-n", node, "link", "add", "svc0", "type", "veth", "peer", "name", "svc1",
    ]);
    nodeward_tests::netns::ip(&["-n", node, "link", "set", "svc0", "up"]);
    nodeward_tests::netns::ip(&["-n", node, "route", "add", "10.96.0.0/12", "dev", "svc0"]);
    for rule in [
        "-t nat -N KUBE-SERVICES",
        "-t nat -N KUBE-MARK-MASQ",
        "-t nat -N KUBE-POSTROUTING",
        "-t nat -N KUBE-SEP-WEB",
        "-t nat -N KUBE-SVC-WEB",
        "-t nat -N KUBE-NODEPORTS",
        "-t nat -A PREROUTING -j KUBE-SERVICES",
        "-t nat -A OUTPUT -j KUBE-SERVICES",
        "-t nat -A POSTROUTING -j KUBE-POSTROUTING",
        "-t nat -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
        "-t nat -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-t nat -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
        "-t nat -A KUBE-POSTROUTING -j MASQUERADE --random-fully",
        "-t nat -A KUBE-SERVICES -d 10.96.0.12/32 -p tcp --dport 80 -j KUBE-SVC-WEB",
        "-t nat -A KUBE-SVC-WEB -d 10.96.0.12/32 -p tcp --dport 80 ! -s 10.200.0.0/24 -j KUBE-MARK-MASQ",
        "-t nat -A KUBE-SVC-WEB -j KUBE-SEP-WEB",
        "-t nat -A KUBE-NODEPORTS -p tcp --dport 30080 -j KUBE-MARK-MASQ",
        "-t nat -A KUBE-NODEPORTS -p tcp --dport 30080 -j KUBE-SEP-WEB",
        "-t nat -A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS",
    ] {
        iptables(env, "iptables", rule);
    }
    iptables(
        env,
        "iptables",
        &format!("-t nat -A KUBE-SEP-WEB -s {web}/32 -j KUBE-MARK-MASQ"),
    );
    iptables(
        env,
        "iptables",
        &format!("-t nat -A KUBE-SEP-WEB -p tcp -j DNAT --to-destination {web}:8000"),
    );
}

/// portmap's rules for `hostPort: 18000` of `web` (`CNI-HOSTPORT-DNAT`, the 0x2000 mark it
/// never clears, masquerade on the mark).
fn portmap_hostport(env: &Env) {
    let web = env.pod("web").ip;
    // portmap lets 127.0.0.1 be DNATed out of the node (`route_localnet` on the pod's side).
    nodeward_tests::netns::sysctl(
        &env.node.netns,
        &format!("net.ipv4.conf.{}.route_localnet", env.pod("web").host_if),
        "1",
    );
    for rule in [
        "-t nat -N CNI-HOSTPORT-DNAT".to_owned(),
        "-t nat -N CNI-HOSTPORT-SETMARK".to_owned(),
        "-t nat -N CNI-HOSTPORT-MASQ".to_owned(),
        "-t nat -A CNI-HOSTPORT-SETMARK -j MARK --set-xmark 0x2000/0x2000".to_owned(),
        "-t nat -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE".to_owned(),
        "-t nat -I POSTROUTING 1 -j CNI-HOSTPORT-MASQ".to_owned(),
        "-t nat -I PREROUTING 1 -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT".to_owned(),
        "-t nat -I OUTPUT 1 -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT".to_owned(),
        "-t nat -A CNI-HOSTPORT-DNAT -p tcp --dport 18000 -s 10.200.0.0/24 -j CNI-HOSTPORT-SETMARK"
            .to_owned(),
        "-t nat -A CNI-HOSTPORT-DNAT -p tcp --dport 18000 -s 127.0.0.1/32 -j CNI-HOSTPORT-SETMARK"
            .to_owned(),
        format!(
            "-t nat -A CNI-HOSTPORT-DNAT -p tcp --dport 18000 -j DNAT --to-destination {web}:8000"
        ),
    ] {
        iptables(env, "iptables", &rule);
    }
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

/// Every path into `web` and `require` is judged: the pod's address, the ClusterIP, the
/// NodePort, the hostPort (with portmap's mark: refused outright with host steering), from pods
/// and from the node.
#[test]
fn every_path_into_a_protected_pod_is_judged() {
    let env = start_in_pod("inpod-paths", &protected_policies(), &[]);
    kube_proxy_service(&env);
    portmap_hostport(&env);
    let web = env.pod("web").ip;
    let demo = bearer(&sample("demo.jwt"));
    let assigned = env.counter("inpod_assigned_listener");

    // (source, url, expected): `sleep` is a known principal; `stranger` and the node are not;
    // NodePort and hostPort flows are masqueraded to the node's address, as Istio sees them.
    let rows: [(&str, String, (u16, &str)); 9] = [
        ("sleep", format!("http://{web}:8000/"), (200, "")),
        ("stranger", format!("http://{web}:8000/"), DENIED),
        ("node", format!("http://{web}:8000/"), DENIED),
        ("sleep", "http://10.96.0.12/".to_owned(), (200, "")),
        ("stranger", "http://10.96.0.12/".to_owned(), DENIED),
        ("node", "http://10.96.0.12/".to_owned(), DENIED),
        ("stranger", format!("http://{NODE_ADDR}:30080/"), DENIED),
        ("stranger", format!("http://{NODE_ADDR}:18000/"), DENIED),
        ("node", "http://127.0.0.1:18000/".to_owned(), DENIED),
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
                    .starts_with(&format!("{web}:")),
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
    // A JWT principal through the Service: judged and allowed, the token removed.
    let require = env.pod("require").ip;
    iptables(
        &env,
        "iptables",
        &format!("-t nat -I OUTPUT 1 -d 10.96.0.11 -p tcp --dport 80 -j DNAT --to-destination {require}:8000"),
    );
    let (status, body) = get(&env, "node", "http://10.96.0.11/headers", &[&demo]);
    assert_eq!(status, 200, "{body}");
    assert!(seen(&body)["headers"].get("authorization").is_none());
    let (status, _) = get(&env, "node", "http://10.96.0.11/", &[&bearer("garbage")]);
    assert_eq!(status, 401);
    assert!(
        env.counter("inpod_assigned_listener") >= assigned + rows.len() as u64,
        "every row went through the in-pod listener"
    );
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
    let out = env.node.exec(
        &env.node.netns,
        &[
            nodeward_tests::nodeward_bin().to_str().expect("utf-8"),
            "uninstall",
            "--bpf-pin-dir",
            pin_dir.to_str().expect("utf-8"),
        ],
    );
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
