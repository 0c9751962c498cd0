//! The DaemonSet's capabilities, measured: the real `nodeward run` with its kernel data path,
//! started with exactly the capabilities deploy/agent/daemonset.yaml adds (`setpriv` limits the
//! bounding set, as the container runtime does with `drop: [ALL]` + `add`), judges real HTTP
//! from a client pod to a protected pod and cleans up on SIGTERM; with any one of them removed
//! it cannot start. So the list is sufficient and each entry necessary. (`CAP_SYS_ADMIN`, which
//! in-pod steering needs for `setns(2)`, also counts as `CAP_BPF` and `CAP_PERFMON` for the
//! kernel, so those two would be redundant, and this test would say so.)
//!
//! What a container adds on top and this test does not reproduce (no container runtime here):
//! the seccomp and AppArmor profiles (the DaemonSet sets both to Unconfined, see
//! deploy/README.md) and the mount namespace. Like a Kubernetes node, the "host" provides the
//! BPF filesystem: the test node mounts a bpffs instance of its own for the agent's pins (the
//! agent mounts none) and unmounts it at the end.
//!
//! Needs root (namespaces, veths, the bpffs mount); fails, never skips, without it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodeward_tests::agent::Agent;
use nodeward_tests::netns::{pod_ip, TestNode};
use nodeward_tests::privilege::cap_eff;
use nodeward_tests::{nodeward_bin, pod_server_bin, repo_root, TempDir};

/// `securityContext.capabilities.add` of the DaemonSet's container, e.g. `["BPF", ...]`.
fn daemonset_capabilities() -> Vec<String> {
    let path = repo_root().join("deploy/agent/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/agent/daemonset.yaml");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("YAML");
    let add =
        &doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"];
    let caps: Vec<String> = add
        .as_sequence()
        .expect("capabilities.add is a list")
        .iter()
        .map(|c| c.as_str().expect("capability name").to_owned())
        .collect();
    assert!(!caps.is_empty(), "the DaemonSet adds no capability");
    caps
}

/// A node with a protected pod (`httpbin-get`, HTTP on 8000) and a client (`sleep`), the
/// example policies (GET allowed for known workloads, POST denied), a workloads file, and a
/// BPF filesystem of the node's own for the agent's pins (the node's /sys/fs/bpf in a cluster).
/// Fields drop in order: the node (namespaces, bpffs, cgroup), then the files.
struct Env {
    node: TestNode,
    cgroup: PathBuf,
    dir: TempDir,
    target: String,
    client: String,
}

fn env(tag: &str) -> Env {
    let mut node = TestNode::new(tag);
    // The agent's defaults include the fast path: its sock_ops program goes on this node's own
    // cgroup v2 (the DaemonSet's is the node's root), never the machine's.
    let cgroup = node.use_cgroup();
    node.mount_bpffs();
    let dir = TempDir::new(&format!("cap-{tag}"));
    let pod = node.add_pod("httpbin-get", pod_ip(13));
    node.spawn(
        &pod.netns,
        &pod_server_bin(),
        &[&format!("{}:8000", pod.ip)],
    );
    let client = node.add_pod("sleep", pod_ip(20));
    let workloads = format!(
        "workloads:\n  - {{name: httpbin-get, namespace: foo, serviceAccount: httpbin, labels: {{app: httpbin-get}}, ip: {}, interface: {}}}\n  - {{name: sleep, namespace: foo, serviceAccount: sleep, labels: {{app: sleep}}, ip: {}, interface: {}}}\n",
        pod.ip, pod.host_if, client.ip, client.host_if
    );
    std::fs::write(dir.join("workloads.yaml"), workloads).expect("write");
    Env {
        node,
        cgroup,
        dir,
        target: format!("http://{}:8000/get", pod.ip),
        client: client.netns,
    }
}

impl Env {
    fn pin_dir(&self) -> PathBuf {
        self.node.bpffs().join("nodeward")
    }

    /// Starts `nodeward run` in the node namespace with only `caps` (names as in the
    /// DaemonSet) in its bounding set (`setpriv` execs the agent in place).
    fn start_agent(&self, caps: &[String]) -> Agent {
        let bounding = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let policies = repo_root().join("examples/policies");
        let mut command = self.node.command(&self.node.netns, "setpriv");
        command
            .arg(format!("--bounding-set={bounding}"))
            .args(["--inh-caps=-all", "--"])
            .arg(nodeward_bin())
            .arg("run")
            .arg("--policies")
            .arg(policies)
            .arg("--workloads")
            .arg(self.dir.join("workloads.yaml"))
            .arg("--bpf-pin-dir")
            .arg(self.pin_dir())
            .arg("--netns-dir")
            .arg(self.node.netns_dir())
            .arg("--cgroup")
            .arg(&self.cgroup);
        let admin = nodeward_tests::e2e::ADMIN.parse().expect("admin address");
        Agent::spawn(
            command,
            admin,
            Some(&self.node.netns),
            &self.dir.join("agent.log"),
        )
    }
}

/// `/readyz` of the agent's admin server: its status, 0 when none answers.
fn readyz(agent: &Agent) -> u16 {
    agent.get("/readyz").map_or(0, |(status, _, _)| status)
}

/// Bit of a capability name in the kernel's masks (linux/capability.h).
fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its bit to this test"),
    }
}

#[test]
fn the_daemonsets_capabilities_are_enough_to_enforce() {
    let caps = daemonset_capabilities();
    let env = env("enough");
    let mut agent = env.start_agent(&caps);

    let deadline = Instant::now() + Duration::from_secs(20);
    while readyz(&agent) != 200 {
        assert!(
            Instant::now() < deadline,
            "the agent with only {caps:?} did not become ready:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It runs with exactly those capabilities (setpriv execs the agent in place).
    let want: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
    assert_eq!(
        cap_eff(agent.pid()),
        Some(want),
        "effective capabilities of the agent"
    );
    assert!(
        env.pin_dir().join("maps").is_dir(),
        "the agent pinned its maps"
    );

    // Real requests from the client pod, steered by the kernel to the agent.
    let (status, body) = env.node.curl(&env.client, "GET", &env.target, &[]);
    assert_eq!(
        status,
        200,
        "GET from foo/sleep is allowed (get-only): {body}\n{}",
        agent.log()
    );
    assert!(body.contains("\"method\""), "the pod answered: {body}");
    let (status, body) = env.node.curl(&env.client, "POST", &env.target, &[]);
    assert_eq!(status, 403, "POST is denied by the agent: {body}");
    assert_eq!(body, "RBAC: access denied");

    // SIGTERM: drain, exit 0; the programs stay in the pods for the next agent.
    let code = agent.terminate(Duration::from_secs(25));
    assert_eq!(code, Some(0), "clean stop:\n{}", agent.log());
    assert!(env.pin_dir().exists(), "the pins stay after SIGTERM");
}

#[test]
fn each_of_the_daemonsets_capabilities_is_needed() {
    let caps = daemonset_capabilities();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let env = env(&format!("without-{}", missing.to_lowercase()));
        let mut agent = env.start_agent(&fewer);
        // It must fail to start (exit non-zero), never become ready.
        let code = agent.exit_code_within(Duration::from_secs(20));
        assert_ne!(readyz(&agent), 200);
        assert!(
            matches!(code, Some(c) if c != 0),
            "without CAP_{missing} the agent must fail to start; exit {code:?}:\n{}",
            agent.log()
        );
        let log = agent.log();
        assert!(
            log.contains("kernel data path"),
            "without CAP_{missing} the error names the kernel data path:\n{log}"
        );
    }
}
