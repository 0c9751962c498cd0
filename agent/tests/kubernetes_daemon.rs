//! `nodeward run --kubernetes`, the real binary, against `ApiStandIn` (an in-process stand-in
//! for the API server; see `kubernetes_support` for what it cannot prove) through a kubeconfig
//! file: `/readyz` waits for every watcher's initial list and names them, `/debug/state` shows
//! this node's pods and the policies, `nodeward check --admin` decides with a pod of another
//! node as the source, `/metrics` has the watchers' staleness, and an invalid policy becomes
//! an Event. Flags: `--policies` conflicts with `--kubernetes`, and `--node-name` is required.
//!
//! The agent runs with `--datapath off` on loopback ports (its transparent listener needs
//! `CAP_NET_ADMIN`: run as root; without it the agent exits 1 saying so and the test fails
//! with its log). The test kit's agent harness stops it and a guard removes its directory on
//! drop, also on panic.

mod kubernetes_support;

use std::ops::{Deref, DerefMut};
use std::process::Command;
use std::time::Duration;

use nodeward_tests::agent::Agent;
use nodeward_tests::{free_port, TempDir};
use serde_json::{json, Value};

use kubernetes_support::ApiStandIn;

const BIN: &str = env!("CARGO_BIN_EXE_nodeward");

/// A running `nodeward run --kubernetes` (the kit's [`Agent`], which it derefs to). Fields drop
/// in order: the agent (stopped), then its directory.
struct Daemon {
    agent: Agent,
    /// The kubeconfig and the log; removed after the agent stopped.
    _dir: TempDir,
    admin: String,
}

impl Daemon {
    fn start(api: &ApiStandIn) -> Self {
        let dir = TempDir::new("kube");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(&kubeconfig, api.kubeconfig()).expect("writing the kubeconfig");
        let admin = format!("127.0.0.1:{}", free_port());
        let listen = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(BIN);
        command
            .args(["run", "--kubernetes", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--listen", &listen, "--admin", &admin, "--datapath", "off"])
            // The Downward API's variable, as the DaemonSet sets it.
            .env("NODE_NAME", "node-a")
            .env_remove("NODEWARD_NODE_NAME")
            .env("NODEWARD_LOG", "info");
        let agent = Agent::spawn(
            command,
            admin.parse().expect("admin address"),
            None,
            &dir.join("agent.log"),
        );
        Self {
            agent,
            _dir: dir,
            admin,
        }
    }

    /// `GET path` from the admin server: (status, body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        self.agent.get(path).map(|(status, _, body)| (status, body))
    }

    /// Panics with the agent's log when `condition` does not hold within 20 s, or the agent
    /// exits meanwhile.
    fn wait_for(&mut self, what: &str, condition: impl FnMut(&Agent) -> bool) {
        self.agent
            .wait_for(what, Duration::from_secs(20), condition);
    }
}

impl Deref for Daemon {
    type Target = Agent;

    fn deref(&self) -> &Agent {
        &self.agent
    }
}

impl DerefMut for Daemon {
    fn deref_mut(&mut self) -> &mut Agent {
        &mut self.agent
    }
}

fn pod(namespace: &str, name: &str, node: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}"), "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "httpbin"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn authz(name: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "foo", "uid": format!("uid-{name}"), "generation": 1},
        "spec": spec, "status": {}
    })
}

/// `/debug/state`: this node's pod only, the valid policy, the invalid one as an error.
fn assert_state(state: &Value) {
    let workloads: Vec<&str> = state["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(
        workloads,
        ["foo/httpbin"],
        "only this node's pods are destinations: {state}"
    );
    assert_eq!(state["workloads"][0]["protected"], true);
    assert_eq!(
        state["workloads"][0]["policies"]["allow"],
        json!(["foo/allow-sleep"])
    );
    let policies: Vec<&str> = state["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(policies, ["foo/allow-sleep"], "{state}");
    assert_eq!(
        state["policies"][0]["file"],
        "kubernetes:security.istio.io/v1"
    );
    let errors = state["errors"].to_string();
    assert!(
        errors.contains("AuthorizationPolicy foo/broken") && errors.contains("spec.rules"),
        "{errors}"
    );
    assert_eq!(state["config"]["kubernetes"]["node_name"], "node-a");
}

#[test]
fn the_agent_follows_the_api_server() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    api.apply(pod("foo", "httpbin", "node-a", "10.244.1.7"));
    api.apply(pod("foo", "sleep", "node-b", "10.244.2.5"));
    api.apply(pod("foo", "intruder", "node-c", "10.244.3.5"));
    api.apply(authz(
        "allow-sleep",
        &json!({"selector": {"matchLabels": {"app": "httpbin"}}, "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/foo/sa/sleep"]}}]}]}),
    ));
    api.apply(authz("broken", &json!({"action": "DENY"})));
    // The policy lists fail at first: readiness names the watchers that are not synced.
    api.fail_next(2);
    let mut agent = Daemon::start(&api);
    agent.wait_for("/healthz", |d| {
        d.get("/healthz").is_some_and(|(s, _, _)| s == 200)
    });
    agent.wait_for("/readyz 200", |d| {
        d.get("/readyz").is_some_and(|(s, _, _)| s == 200)
    });
    // Which lists the two failures hit depends on the order the watchers
    // start in. The mesh config watcher is not required for readiness, so
    // /readyz can be 200 while it still retries: wait for every watcher.
    let watchers = [
        "pods-on-node",
        "pods",
        "services",
        "authorizationpolicies",
        "requestauthentications",
        // No ConfigMap istio: an empty list, synced.
        "meshconfig",
    ];
    agent.wait_for("every watcher synced", |d| {
        d.get("/readyz").is_some_and(|(_, _, readyz)| {
            watchers
                .iter()
                .all(|w| readyz.contains(&format!("[+]kubernetes-{w} synced, watching")))
        })
    });

    assert_state(&agent.state());

    // The running agent decides: sources on other nodes have identities from the API.
    for (source, expected) in [("10.244.2.5", 0), ("10.244.3.5", 1)] {
        let out = Command::new(BIN)
            .args([
                "check",
                "--admin",
                &agent.admin,
                "--output",
                "json",
                "--dest-ip",
                "10.244.1.7",
                "--source-ip",
                source,
            ])
            .output()
            .expect("running nodeward check");
        assert_eq!(
            out.status.code(),
            Some(expected),
            "check from {source}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let (status, metrics) = agent.get("/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    assert!(
        metrics.contains("nodeward_kubernetes_watch_stale_seconds{watcher=\"pods\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodeward_kubernetes_watch_synced{watcher=\"pods-on-node\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("nodeward_config_errors 1"), "{metrics}");

    // The invalid policy became one Event on it.
    agent.wait_for("the InvalidPolicy event", |_| !api.events().is_empty());
    let events = api.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["reason"], "InvalidPolicy");
    assert_eq!(events[0]["regarding"]["name"], "broken");

    // A change through the API reaches the agent.
    api.delete(kubernetes_support::AUTHZ, "foo", "allow-sleep");
    agent.wait_for("the deleted policy gone", |d| {
        d.state()["policies"].as_array().is_some_and(Vec::is_empty)
    });

    // SIGTERM stops the watchers and exits 0.
    agent.sigterm();
    let status = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "its log:\n{}", agent.log());
}

#[test]
fn kubernetes_flags_are_checked() {
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .args(args)
            .env_remove("NODE_NAME")
            .env_remove("NODEWARD_NODE_NAME");
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().expect("running nodeward run")
    };
    let out = run(&["--kubernetes", "--policies", "examples/policies"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--policies") && stderr.contains("--kubernetes"),
        "{stderr}"
    );

    let dir = TempDir::new("kube-flags");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, ApiStandIn::start(&[]).kubeconfig()).expect("a kubeconfig");
    let kubeconfig = kubeconfig.to_string_lossy().into_owned();
    let admin = format!("127.0.0.1:{}", free_port());
    let out = run(
        &[
            "--kubernetes",
            "--kubeconfig",
            &kubeconfig,
            "--datapath",
            "off",
            "--admin",
            &admin,
        ],
        &[],
    );
    drop(dir);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--kubernetes needs --node-name"),
        "{stderr}"
    );

    let out = run(&["--datapath", "off"], &[("NODEWARD_KUBERNETES", "false")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--policies and --workloads are required without --kubernetes"),
        "{stderr}"
    );

    let out = run(
        &[
            "--kubernetes",
            "--kubeconfig",
            "/nonexistent/kubeconfig",
            "--datapath",
            "off",
        ],
        &[("NODE_NAME", "node-a")],
    );
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot use kubeconfig /nonexistent/kubeconfig"),
        "{stderr}"
    );
}
