//! End to end, the same-node fast path (`--fast-path on`: `sock_ops` + `sk_msg` on the node's
//! own cgroup): the answers are those of the plain path, messages go socket to socket, bypass
//! attempts and impostors stay refused, large bodies arrive intact, a crash fails closed and a
//! restart takes over, `--fast-path off` attaches nothing, and a clean stop leaves nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nodeward_tests::e2e::{
    add_probes, bearer, bypass_refused, node_traffic_answers, protected_policies, sample, seen,
    start_on, url, Env, PROTECTED_PODS, SHORT,
};
use nodeward_tests::netns::{cgroup_attached_programs, TestNode, NODE_ADDR};
use nodeward_tests::{eventually, nodeward_bin, pod_server_bin};

/// `BPF_CGROUP_SOCK_OPS`.
const SOCK_OPS: u32 = 3;

fn cgroup_attached(cgroup: &Path) -> u32 {
    cgroup_attached_programs(cgroup, SOCK_OPS)
}

fn fast_path_state(env: &Env) -> serde_json::Value {
    env.agent().state()["fastPath"].clone()
}

/// A node with its own cgroup, the agent started with `--fast-path <mode> --cgroup <it>`.
fn start_fast_path(tag: &str, mode: &str) -> (Env, PathBuf) {
    let mut node = TestNode::new(tag);
    let cgroup = node.use_cgroup();
    let cgroup_arg = cgroup.to_str().expect("utf-8").to_owned();
    let env = start_on(
        node,
        &PROTECTED_PODS,
        &protected_policies(),
        // The fast path pairs the node's listener with pods' sockets: host steering only.
        &[
            "--steering",
            "host",
            "--fast-path",
            mode,
            "--cgroup",
            &cgroup_arg,
        ],
    );
    (env, cgroup)
}

/// The reference answers, as without the fast path: 403 without a token, 401 with garbage,
/// 200 with demo.jwt (token removed, path normalized, reached by the enforcer); a known client
/// may GET web, a stranger may not.
fn reference_answers(env: &Env) {
    let (status, body) = env.curl_short("sleep", "GET", "require", "/");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = env.curl("GET", "require", "/", &[&bearer("garbage")]);
    assert_eq!(status, 401);
    let demo = bearer(&sample("demo.jwt"));
    let (status, body) = env.curl("GET", "require", "/a/../headers", &[&demo]);
    assert_eq!(status, 200, "{body}");
    let got = seen(&body);
    assert_eq!(got["uri"], "/headers", "normalized path: {got}");
    assert!(
        got["headers"].get("authorization").is_none(),
        "token removed: {got}"
    );
    assert!(
        got["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&NODE_ADDR.to_string()),
        "reached by the enforcer: {got}"
    );
    let (status, body) = env.curl("GET", "web", "/", &[]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = env.curl_short("stranger", "GET", "web", "/");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
}

/// A pod that gives itself the protected pod's address and connects to it inside its own
/// namespace makes two sockets with protected endpoints whose handshake never crossed the node:
/// neither joins the fast path (the key binding to flows `steer`/`guard` opened).
fn impostor_stays_on_tcp(env: &mut Env) {
    let web = env.pod("web").ip;
    let stranger = env.pod("stranger").netns.clone();
    nodeward_tests::netns::ip(&[
        "-n",
        &stranger,
        "addr",
        "add",
        &format!("{web}/32"),
        "dev",
        "lo",
    ]);
    env.node
        .spawn(&stranger, &pod_server_bin(), &[&format!("{web}:8000")]);
    let (added, unsteered) = (
        env.counter("fastpath_sockets_added"),
        env.counter("fastpath_sockets_unsteered"),
    );
    let target = url(env.pod("web"), "/impostor");
    let limit = SHORT.to_string();
    let answered = eventually(Duration::from_secs(5), || {
        let out = env.node.exec(
            &stranger,
            &[
                "curl",
                "-s",
                "-m",
                &limit,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &target,
            ],
        );
        String::from_utf8_lossy(&out.stdout) == "200"
    });
    assert!(answered, "the impostor's own server did not answer locally");
    assert_eq!(
        env.counter("fastpath_sockets_added"),
        added,
        "a socket whose handshake never crossed the node joined the fast path"
    );
    assert!(env.counter("fastpath_sockets_unsteered") >= unsteered + 2);
}

/// `size` bytes up (POST, hashed by the pod) and down (`/bytes/<size>`, compared byte for byte).
fn large_bodies(env: &Env, size: usize) {
    let upload = env.dir.join("upload.bin");
    let body = nodeward_tests::pattern(size);
    std::fs::write(&upload, &body).expect("write");
    let at = format!("@{}", upload.display());
    let target = url(env.pod("web"), "/upload");
    let out = env.node.exec(
        &env.client(),
        &[
            "curl",
            "-s",
            "-m",
            "30",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &at,
            &target,
        ],
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "upload answer: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(got["body_len"], size, "{got}");
    assert_eq!(
        got["body_fnv"],
        format!("{:016x}", nodeward_tests::fnv1a(&body)),
        "the pod received the body intact"
    );
    let download = env.dir.join("download.bin");
    let target = url(env.pod("web"), &format!("/bytes/{size}"));
    let out = env.node.exec(
        &env.client(),
        &[
            "curl",
            "-s",
            "-m",
            "30",
            "-o",
            download.to_str().expect("utf-8"),
            "-w",
            "%{http_code}",
            &target,
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let received = std::fs::read(&download).expect("download");
    assert_eq!(received.len(), size);
    assert!(received == body, "the client received the body intact");
}

/// `--fast-path on`: the reference answers are the same, messages are redirected socket to
/// socket (counters), bypass attempts are still refused, large bodies arrive intact both ways,
/// and a clean stop leaves nothing attached to the cgroup and no pin.
#[test]
fn fast_path_keeps_every_answer_and_leaves_nothing_behind() {
    let (mut env, cgroup) = start_fast_path("fastpath", "on");
    assert_eq!(
        cgroup_attached(&cgroup),
        1,
        "fastpath_sockops on the cgroup"
    );
    let state = fast_path_state(&env);
    assert_eq!(state["mode"], "on", "{state}");
    assert_eq!(state["cgroup"], cgroup.to_str().expect("utf-8"), "{state}");

    reference_answers(&env);
    assert!(
        env.counter("fastpath_sockets_added") >= 4,
        "client, enforcer (both legs) and pod sockets joined: {}",
        env.counter("fastpath_sockets_added")
    );
    let redirected = env.counter("fastpath_msgs_redirected");
    assert!(redirected > 0, "no message took the fast path");

    let status = env.node.exec(
        &env.node.netns,
        &[
            nodeward_bin().to_str().expect("utf-8"),
            "status",
            "--admin",
            nodeward_tests::e2e::ADMIN,
        ],
    );
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let line = status
        .lines()
        .find(|l| l.starts_with("fast path:"))
        .unwrap_or_else(|| panic!("no fast path line in `nodeward status`:\n{status}"));
    eprintln!("{line}");
    assert!(
        line.starts_with(&format!("fast path: on (cgroup {})", cgroup.display())),
        "{line}"
    );

    bypass_refused(&env);
    add_probes(&env);
    node_traffic_answers(&env);
    impostor_stays_on_tcp(&mut env);
    large_bodies(&env, 8 << 20);
    assert!(env.counter("fastpath_msgs_redirected") > redirected);

    eprintln!(
        "fast path: sockets added {}, unsteered {}, messages redirected {}, passed {}",
        env.counter("fastpath_sockets_added"),
        env.counter("fastpath_sockets_unsteered"),
        env.counter("fastpath_msgs_redirected"),
        env.counter("fastpath_msgs_passed"),
    );
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert_eq!(
        cgroup_attached(&cgroup),
        0,
        "a clean stop detaches sock_ops"
    );
    assert!(
        !env.pin_dir().exists(),
        "pins left in {}",
        env.pin_dir().display()
    );
}

/// A crash (SIGKILL) leaves the fast path attached and the kernel failing closed; a restart
/// takes it over (one attachment, not two) and enforces again through it.
#[test]
fn fast_path_survives_a_crash_and_restart() {
    let (mut env, cgroup) = start_fast_path("fastpath-crash", "on");
    reference_answers(&env);
    env.kill_agent();
    assert!(
        env.pin_dir().join("fastpath/sockops").exists(),
        "a crash leaves the pinned link"
    );
    assert_eq!(cgroup_attached(&cgroup), 1);
    assert_eq!(
        env.curl_short("sleep", "GET", "require", "/").0,
        0,
        "fail closed while the agent is down"
    );

    env.start_agent();
    assert_eq!(cgroup_attached(&cgroup), 1, "the restart replaced the link");
    let redirected = env.counter("fastpath_msgs_redirected");
    reference_answers(&env);
    bypass_refused(&env);
    assert!(env.counter("fastpath_msgs_redirected") > redirected);
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert_eq!(cgroup_attached(&cgroup), 0);
    assert!(!env.pin_dir().exists());
}

/// `--fast-path off` attaches nothing to the cgroup, also after a crashed `on` run left its
/// fast path attached: the restart with `off` detaches it and enforcement is unchanged.
#[test]
fn fast_path_off_attaches_nothing_even_after_a_crashed_on() {
    let (mut env, cgroup) = start_fast_path("fastpath-off", "on");
    assert_eq!(cgroup_attached(&cgroup), 1);
    env.kill_agent();
    for arg in &mut env.args {
        if arg == "on" {
            "off".clone_into(arg);
        }
    }
    env.start_agent();
    assert_eq!(
        cgroup_attached(&cgroup),
        0,
        "--fast-path off left sock_ops attached"
    );
    assert!(!env.pin_dir().join("fastpath/sockops").exists());
    assert_eq!(fast_path_state(&env)["mode"], "off");
    let redirected = env.counter("fastpath_msgs_redirected");
    reference_answers(&env);
    bypass_refused(&env);
    large_bodies(&env, 1 << 20);
    assert_eq!(
        env.counter("fastpath_msgs_redirected"),
        redirected,
        "no message took a fast path that is off"
    );
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert!(!env.pin_dir().exists());
}

/// Under `ip netns exec` (which mounts a fresh /sys, hiding /sys/fs/cgroup) there is no cgroup
/// v2: by default (`auto`) the agent starts with the fast path off and says so; `--fast-path
/// on` given explicitly still refuses to start.
#[test]
fn without_a_cgroup_v2_the_fast_path_degrades_unless_asked_for() {
    let mut node = TestNode::new("nocgroup");
    let bpffs = node.mount_bpffs();
    let dir = nodeward_tests::TempDir::new("nocgroup");
    std::fs::create_dir_all(dir.join("policies")).expect("dir");
    std::fs::write(
        dir.join("policies/allow.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow, namespace: foo}\nspec:\n  rules: [{from: [{source: {principals: ['*']}}]}]\n",
    )
    .expect("policy");
    std::fs::write(
        dir.join("workloads.yaml"),
        "workloads:\n- {name: web, namespace: foo, ip: 10.200.0.12}\n",
    )
    .expect("workloads");
    let run = |extra: &[&str], log: &str| {
        let mut command = std::process::Command::new("ip");
        command
            .args(["netns", "exec", &node.netns])
            .arg(nodeward_bin())
            .args(["run", "--policies"])
            .arg(dir.join("policies"))
            .arg("--workloads")
            .arg(dir.join("workloads.yaml"))
            .arg("--bpf-pin-dir")
            .arg(bpffs.join("nodeward"))
            .args(["--steering", "host"])
            .args(extra);
        nodeward_tests::agent::Agent::spawn(
            command,
            "127.0.0.1:15000".parse().expect("addr"),
            Some(&node.netns),
            &dir.join(log),
        )
    };

    let mut agent = run(&[], "auto.log");
    agent.wait_ready(Duration::from_secs(20));
    assert!(
        agent
            .state()
            .get("fastPath")
            .is_none_or(|f| f["cgroup"].is_null()),
        "{}",
        agent.state()
    );
    assert_eq!(agent.metric("nodeward_datapath_fast_path"), 0);
    assert!(
        agent.log().contains("no cgroup v2 found"),
        "the agent says why: {}",
        agent.log()
    );
    assert_eq!(agent.terminate(Duration::from_secs(25)), Some(0));

    let mut strict = run(&["--fast-path", "on"], "on.log");
    let code = strict.exit_code_within(Duration::from_secs(20));
    assert_ne!(
        code,
        Some(0),
        "--fast-path on without a cgroup v2 must refuse: {}",
        strict.log()
    );
    assert!(strict.log().contains("cgroup"), "{}", strict.log());
}
