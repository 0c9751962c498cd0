//! End to end, the node's own traffic (a host process, the kubelet) into protected pods: it
//! goes through the enforcer and is judged, with only the declared probe endpoints exempt and
//! only from the node; a pod cannot pose as the node; without the agent it follows
//! `--failure-mode` like a pod's.

use nodeward_tests::cluster::install_hostport;
use nodeward_tests::e2e::{
    add_probes, bypass_refused, node_traffic_answers, protected_policies, seen, start, Env,
    PROTECTED_PODS, SHORT,
};
use nodeward_tests::netns::NODE_ADDR;
use test_case::test_case;

fn start_node_traffic(tag: &str, extra: &[&str]) -> Env {
    // Host steering: these check `guard` on the pods' host-side interfaces (in-pod steering's
    // node paths are in e2e_inpod.rs).
    let mut args = vec!["--steering", "host"];
    args.extend_from_slice(extra);
    start(tag, &PROTECTED_PODS, &protected_policies(), &args)
}

/// The node's own traffic into protected pods goes through the enforcer: judged, with only the
/// declared probe endpoints exempt, only from the node.
#[test]
fn node_traffic_is_judged_and_only_probes_pass() {
    let env = start_node_traffic("node-traffic", &[]);
    add_probes(&env);
    node_traffic_answers(&env);
    bypass_refused(&env);
    a_pod_cannot_pose_as_the_node(&env);
}

/// A pod that sends from the node's address (it owns it inside its own namespace) does not get
/// the probe exemption: the node's kernel drops a packet with a local source address that
/// arrives on a pod's interface (a martian), before any socket sees it.
fn a_pod_cannot_pose_as_the_node(env: &Env) {
    let node_addr = NODE_ADDR.to_string();
    let stranger = env.pod("stranger").netns.clone();
    nodeward_tests::netns::ip(&[
        "-n",
        &stranger,
        "addr",
        "add",
        &format!("{node_addr}/32"),
        "dev",
        "lo",
    ]);
    let target = nodeward_tests::e2e::url(env.pod("require"), "/healthz");
    let limit = SHORT.to_string();
    let out = env.node.exec(
        &stranger,
        &[
            "curl",
            "-s",
            "-m",
            &limit,
            "--interface",
            &node_addr,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &target,
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "000",
        "a pod spoofing the node's address got an answer to the probe path"
    );
    assert_eq!(
        out.status.code(),
        Some(28),
        "curl timed out (its SYN went unanswered), rather than failing to bind: {out:?}"
    );
}

/// What the node's request to a protected pod gets while the agent is down, and the counter
/// that shows `guard` decided it.
#[derive(Debug, Clone, Copy)]
enum WhileDown {
    /// No answer (status 0): `guard` dropped the node's SYNs.
    NoAnswer,
    /// The pod answers 200 unjudged.
    Unjudged,
}

/// With the agent killed, the node's traffic follows `--failure-mode` like a pod's: closed
/// drops it, open lets it through unjudged; a restart judges it again.
#[test_case("closed", WhileDown::NoAnswer, "guard_dropped_failure_closed" ; "node traffic fails closed without the agent")]
#[test_case("open", WhileDown::Unjudged, "guard_passed_failure_open" ; "node traffic fails open without the agent")]
fn node_traffic_without_agent(mode: &str, while_down: WhileDown, counter: &str) {
    let mut env = start_node_traffic(&format!("node-down-{mode}"), &["--failure-mode", mode]);
    add_probes(&env);
    env.kill_agent();
    let (status, body) = env.curl_from_node("GET", "require", "/", &[]);
    match while_down {
        WhileDown::NoAnswer => {
            assert_eq!(status, 0, "fail closed: no answer, got {status} {body}");
        }
        WhileDown::Unjudged => {
            assert_eq!(status, 200, "fail open: the pod answers: {body}");
            let got = seen(&body);
            assert_eq!(got["uri"], "/", "{got}");
        }
    }
    env.start_agent();
    // The pinned counters survived the crash.
    assert!(env.counter(counter) > 0, "{counter}");
    let (status, body) = env.curl_from_node("GET", "require", "/", &[]);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
}

/// The CNI portmap plugin marks hostPort traffic 0x2000 (`CNI-HOSTPORT-SETMARK`) and never
/// clears it, the bit of the enforcer's default upstream mark: `guard` must not take a packet's
/// mark as proof that the enforcer sent it. Here portmap's rules for `hostPort: 18000` on the node
/// (not a protected endpoint, so `steer` passes it) lead into a protected pod; the client is a
/// pod of the node's subnet, so its SYN is marked (and masqueraded): the flow is refused, never
/// delivered unjudged.
#[test]
fn a_hostport_flow_with_portmaps_mark_does_not_pass_guard() {
    let env = start_node_traffic("mark-forgery", &[]);
    install_hostport(&env.node, env.pod("web"), 18000, 8000);
    let dropped = env.counter("guard_dropped_bypass");
    let url = format!("http://{NODE_ADDR}:18000/");
    let (status, _) = env
        .node
        .curl_within(SHORT, &env.pod("stranger").netns, "GET", &url, &[]);
    assert_eq!(status, 0, "the pod answered a flow nothing judged");
    assert!(
        env.counter("guard_dropped_bypass") > dropped,
        "guard refused it as a bypass"
    );
}

/// IPv6 is not steered or judged yet: a dual-stack protected pod must refuse new IPv6
/// connections rather than receive them unjudged. The pod `web` gets an IPv6 address and a
/// server on it; the node connects to it directly.
#[test]
fn ipv6_into_a_protected_pod_is_refused_not_delivered_unjudged() {
    let mut env = start_node_traffic("ipv6", &[]);
    let node = env.node.netns.clone();
    let web = env.pod("web").clone();
    let (pod_v6, node_v6) = ("fd00:200::12", "fd00:200::1");
    let ip = |netns: &str, args: &[&str]| {
        let mut all = vec!["-n", netns, "-6"];
        all.extend_from_slice(args);
        nodeward_tests::netns::ip(&all);
    };
    ip(
        &web.netns,
        &[
            "addr",
            "add",
            &format!("{pod_v6}/128"),
            "dev",
            "eth0",
            "nodad",
        ],
    );
    ip(
        &node,
        &[
            "addr",
            "add",
            &format!("{node_v6}/128"),
            "dev",
            &web.host_if,
            "nodad",
        ],
    );
    ip(
        &node,
        &[
            "route",
            "add",
            &format!("{pod_v6}/128"),
            "dev",
            &web.host_if,
        ],
    );
    ip(
        &web.netns,
        &["route", "add", &format!("{node_v6}/128"), "dev", "eth0"],
    );
    let server = nodeward_tests::pod_server_bin();
    env.node
        .spawn(&web.netns, &server, &[&format!("[{pod_v6}]:8000")]);
    // The server listens (a connection from inside the pod works): the refusal below is guard's.
    let url = format!("http://[{pod_v6}]:8000/");
    let (inside, _) = env.node.curl_within(5, &web.netns, "GET", &url, &[]);
    assert_eq!(inside, 200, "the pod's own IPv6 server");

    let dropped = env.counter("guard_dropped_bypass");
    let (status, _) = env.node.curl_within(SHORT, &node, "GET", &url, &[]);
    assert_eq!(
        status, 0,
        "an IPv6 connection reached the protected pod unjudged"
    );
    assert!(
        env.counter("guard_dropped_bypass") > dropped,
        "guard refused it"
    );
}
