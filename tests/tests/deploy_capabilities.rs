//! The DaemonSet's capabilities, measured: the real `nodeward run` with its kernel data path,
//! started with exactly the capabilities deploy/agent/daemonset.yaml adds (`setpriv` limits the
//! bounding set, as the container runtime does with `drop: [ALL]` + `add`), judges real HTTP
//! from a client pod to a protected pod and cleans up on SIGTERM; with any one of them removed
//! it cannot start. So the list is sufficient and each entry necessary.
//!
//! What a container adds on top and this test does not reproduce (no container runtime here):
//! the seccomp and AppArmor profiles (the DaemonSet sets both to Unconfined, see
//! deploy/README.md) and the mount namespace. Like a Kubernetes node, the "host" provides the
//! BPF filesystem: the test mounts a private bpffs instance for the agent's pins (mounting one
//! needs `CAP_SYS_ADMIN`, which the agent is not given) and unmounts it at the end.
//!
//! Needs root (namespaces, veths, the bpffs mount); fails, never skips, without it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nodeward_tests::netns::TestNode;
use nodeward_tests::{nodeward_bin, repo_root};

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

/// A private BPF filesystem (the node's /sys/fs/bpf in a cluster) for one test: mounted in a
/// temp dir, unmounted and removed when dropped, also on panic.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("nodeward-capfs-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bpffs mount point");
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a bpffs at {} failed (needs root)",
            dir.display()
        );
        Self(dir)
    }

    fn pin_dir(&self) -> PathBuf {
        self.0.join("nodeward")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Pins left by an agent that failed to start go with the mount.
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node with a protected pod (`httpbin-get`, HTTP on 8000) and a client (`sleep`), the
/// example policies (GET allowed for known workloads, POST denied) and a workloads file.
struct Env {
    node: TestNode,
    cgroup: PathBuf,
    bpffs: Bpffs,
    dir: TempDir,
    target: String,
    client: String,
}

fn env(name: &str) -> Env {
    let mut node = TestNode::new();
    // The agent's defaults include the fast path: its sock_ops program goes on this node's own
    // cgroup v2 (the DaemonSet's is the node's root), never the machine's.
    let cgroup = node.use_cgroup();
    let bpffs = Bpffs::mount(name);
    let dir =
        TempDir(std::env::temp_dir().join(format!("nodeward-cap-{}-{name}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let server = PathBuf::from(env!("CARGO_BIN_EXE_nw-pod-server"));
    let pod = node.add_pod("httpbin-get", 13);
    node.spawn(&pod.netns, &server, &[&format!("{}:8000", pod.ip)]);
    let client = node.add_pod("sleep", 20);
    let workloads = format!(
        "workloads:\n  - {{name: httpbin-get, namespace: foo, serviceAccount: httpbin, labels: {{app: httpbin-get}}, ip: {}, interface: {}}}\n  - {{name: sleep, namespace: foo, serviceAccount: sleep, labels: {{app: sleep}}, ip: {}, interface: {}}}\n",
        pod.ip, pod.host_if, client.ip, client.host_if
    );
    std::fs::write(dir.0.join("workloads.yaml"), workloads).expect("write");
    Env {
        node,
        cgroup,
        bpffs,
        dir,
        target: format!("http://{}:8000/get", pod.ip),
        client: client.netns,
    }
}

impl Env {
    /// Starts `nodeward run` in the node namespace with only `caps` (names as in the
    /// DaemonSet) in its bounding set; returns its pid.
    fn start_agent(&mut self, caps: &[String]) -> u32 {
        let bounding = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        let policies = repo_root().join("examples/policies");
        let args = [
            format!("--bounding-set={bounding}"),
            "--inh-caps=-all".to_owned(),
            "--".to_owned(),
            nodeward_bin().display().to_string(),
            "run".to_owned(),
            "--policies".to_owned(),
            policies.display().to_string(),
            "--workloads".to_owned(),
            self.dir.0.join("workloads.yaml").display().to_string(),
            "--bpf-pin-dir".to_owned(),
            self.bpffs.pin_dir().display().to_string(),
            "--cgroup".to_owned(),
            self.cgroup.display().to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let netns = self.node.netns.clone();
        self.node
            .spawn_logged(&netns, Path::new("setpriv"), &args, &self.log_path())
    }

    fn log_path(&self) -> PathBuf {
        self.dir.0.join("agent.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `/readyz` of the admin server in the node namespace: its status, 0 when none answers.
    fn readyz(&self) -> u16 {
        let out = self.node.exec(
            &self.node.netns,
            &[
                "curl",
                "-s",
                "-m",
                "1",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15000/readyz",
            ],
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }

    /// The effective capabilities of process `pid` (`CapEff` of `/proc/<pid>/status`) as a mask.
    fn cap_eff(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        u64::from_str_radix(hex.trim(), 16).ok()
    }
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
    let mut env = env("enough");
    let agent = env.start_agent(&caps);

    let deadline = Instant::now() + Duration::from_secs(20);
    while env.readyz() != 200 {
        assert!(
            Instant::now() < deadline,
            "the agent with only {caps:?} did not become ready:\n{}",
            env.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // It runs with exactly those capabilities (setpriv execs the agent in place).
    let want: u64 = caps.iter().map(|c| 1u64 << cap_bit(c)).sum();
    assert_eq!(
        Env::cap_eff(agent),
        Some(want),
        "effective capabilities of the agent"
    );
    assert!(
        env.bpffs.pin_dir().join("maps").is_dir(),
        "the agent pinned its maps"
    );

    // Real requests from the client pod, steered by the kernel to the agent.
    let (status, body) = env.node.curl(&env.client, "GET", &env.target, &[]);
    assert_eq!(
        status,
        200,
        "GET from foo/sleep is allowed (get-only): {body}\n{}",
        env.log()
    );
    assert!(body.contains("\"method\""), "the pod answered: {body}");
    let (status, body) = env.node.curl(&env.client, "POST", &env.target, &[]);
    assert_eq!(status, 403, "POST is denied by the agent: {body}");
    assert_eq!(body, "RBAC: access denied");

    // SIGTERM: drain, remove programs, pins, rule and route, exit 0.
    let code = env.node.terminate(agent, Duration::from_secs(25));
    assert_eq!(code, Some(0), "clean stop:\n{}", env.log());
    assert!(
        !env.bpffs.pin_dir().exists(),
        "the pins were removed on SIGTERM"
    );
}

#[test]
fn each_of_the_daemonsets_capabilities_is_needed() {
    let caps = daemonset_capabilities();
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let mut env = env(&format!("without-{}", missing.to_lowercase()));
        let agent = env.start_agent(&fewer);
        // It must fail to start (exit non-zero), never become ready.
        let code = env.node.wait_exit(agent, Duration::from_secs(20));
        assert_ne!(env.readyz(), 200);
        assert!(
            matches!(code, Some(c) if c != 0),
            "without CAP_{missing} the agent must fail to start; exit {code:?}:\n{}",
            env.log()
        );
        let log = env.log();
        assert!(
            log.contains("kernel data path"),
            "without CAP_{missing} the error names the kernel data path:\n{log}"
        );
    }
}
