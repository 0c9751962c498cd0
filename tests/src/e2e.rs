//! The end-to-end harness: a [`TestNode`] with pods running real HTTP servers
//! (`nw-pod-server`), a client pod (`sleep`) with curl, JWKS served by a pod over HTTP, the
//! workloads and policy files in a [`TempDir`], and the real `nodeward run` with its kernel
//! data path in the node namespace ([`start`]). Tests check the status at the client and what
//! the pod received.
//!
//! Every [`Env`] has its own node (namespaces, bpffs with the agent's pins, cgroup) and
//! directory, so the tests run in parallel; dropping it stops the agent (SIGTERM), then removes
//! the node and the directory, also on panic.
//!
//! The checks shared by several scenario files (the node's own traffic, bypass attempts) are
//! here too, next to the policies they assume.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::agent::Agent;
use crate::netns::{pod_ip, Pod, TestNode, NODE_ADDR};
use crate::{eventually, nodeward_bin, pod_server_bin, repo_root, TempDir};

/// The agent's admin server inside the node namespace.
pub const ADMIN: &str = "127.0.0.1:15000";
/// A bounded request from a pod: no answer within it is status 0.
pub const SHORT: u32 = 2;

/// An Istio sample token from `testdata/istio-samples`.
#[must_use]
pub fn sample(file: &str) -> String {
    std::fs::read_to_string(repo_root().join("testdata/istio-samples").join(file))
        .expect("sample")
        .trim()
        .to_owned()
}

#[must_use]
pub fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// `http://<pod>:8000<path>`.
#[must_use]
pub fn url(pod: &Pod, path: &str) -> String {
    format!("http://{}:8000{path}", pod.ip)
}

/// What the pod received, from its JSON answer.
#[must_use]
pub fn seen(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("pod JSON: {e}: {body}"))
}

fn workload(name: &str, app: &str, pod: &Pod) -> String {
    format!("  - name: {name}\n    namespace: foo\n    serviceAccount: {name}\n    labels: {{app: {app}}}\n    ip: {}\n    interface: {}\n", pod.ip, pod.host_if)
}

/// A pod of a test node: name, last address byte, and its `app` label when it is in the
/// workloads file (`None`: a pod the agent does not know).
pub type PodSpec<'a> = (&'a str, u8, Option<&'a str>);

/// A node with pods, its policy files and a running agent. Fields drop in order: the agent
/// (SIGTERM: it removes what it made), the node (pod servers, namespaces, the bpffs with any pin
/// left, the cgroup), then the files.
pub struct Env {
    agent: Option<Agent>,
    pub node: TestNode,
    pub dir: TempDir,
    pub pods: Vec<Pod>,
    /// `nodeward run`'s arguments; [`Env::start_agent`] starts it again with them.
    pub args: Vec<String>,
}

impl Env {
    #[must_use]
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// The client pod's namespace.
    #[must_use]
    pub fn client(&self) -> String {
        self.pod("sleep").netns.clone()
    }

    /// The running agent.
    #[must_use]
    pub fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("the agent was started")
    }

    /// `curl` from the client pod (5 s limit).
    #[must_use]
    pub fn curl(&self, method: &str, pod: &str, path: &str, headers: &[&str]) -> (u16, String) {
        self.node
            .curl(&self.client(), method, &url(self.pod(pod), path), headers)
    }

    /// `curl -m 2` from `from`'s namespace: status 0 when no answer came.
    #[must_use]
    pub fn curl_short(&self, from: &str, method: &str, pod: &str, path: &str) -> (u16, String) {
        let target = url(self.pod(pod), path);
        self.node
            .curl_within(SHORT, &self.pod(from).netns, method, &target, &[])
    }

    /// `curl` from the node itself (a host process, the kubelet).
    #[must_use]
    pub fn curl_from_node(
        &self,
        method: &str,
        pod: &str,
        path: &str,
        headers: &[&str],
    ) -> (u16, String) {
        self.node
            .curl(&self.node.netns, method, &url(self.pod(pod), path), headers)
    }

    #[must_use]
    pub fn policy_file(&self) -> PathBuf {
        self.dir.join("policies/policies.yaml")
    }

    /// The agent's pin directory, on the node's own bpffs.
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        self.node.bpffs().join("nodeward")
    }

    /// The agent's log (all its runs).
    #[must_use]
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// `nodeward_datapath_packets_total{counter="<name>"}`.
    #[must_use]
    pub fn counter(&self, name: &str) -> u64 {
        self.agent().metric(&format!(
            "nodeward_datapath_packets_total{{counter=\"{name}\"}}"
        ))
    }

    /// Starts the agent (again: same arguments, same pins) and waits for /readyz.
    pub fn start_agent(&mut self) {
        let mut command = self.node.command(&self.node.netns, nodeward_bin());
        command.args(&self.args);
        let admin: SocketAddr = ADMIN.parse().expect("admin address");
        let mut agent = Agent::spawn(
            command,
            admin,
            Some(&self.node.netns),
            &self.dir.join("agent.log"),
        );
        // Ready: data path attached, policies loaded, JWKS fetched.
        agent.wait_ready(Duration::from_secs(20));
        self.agent = Some(agent);
    }

    /// `nodeward uninstall --bpf-pin-dir <the agent's>` in the node's namespace (no agent
    /// running); its output.
    #[must_use]
    pub fn uninstall(&self) -> std::process::Output {
        let pin_dir = self.pin_dir();
        self.node.exec(
            &self.node.netns,
            &[
                nodeward_bin().to_str().expect("utf-8"),
                "uninstall",
                "--bpf-pin-dir",
                pin_dir.to_str().expect("utf-8"),
            ],
        )
    }

    /// SIGKILL: a crash, the data path's pins stay.
    pub fn kill_agent(&mut self) {
        if let Some(agent) = &mut self.agent {
            agent.kill();
        }
    }

    /// SIGTERM and the exit code (`None`: it had to be killed).
    pub fn stop_agent(&mut self) -> Option<i32> {
        self.agent
            .as_mut()
            .and_then(|agent| agent.terminate(Duration::from_secs(25)))
    }
}

/// Builds a node for test `tag` with the JWKS pod (`jwks`, .5, serving
/// `http://<ip>:8080/jwks.json`), the client pod (`sleep`, .20, in the workloads file) and
/// `pods` (HTTP servers on port 8000); writes the workloads and `policies` (`{JWKS}` stands for
/// the JWKS URI) into a temp dir; starts `nodeward run` with the node's bpffs for its pins plus
/// `extra` arguments; waits for /readyz.
/// The agent runs with its defaults, the fast path included: its `sock_ops` program goes on a
/// cgroup v2 made for the node (every process of the node joins it), never the machine's root.
#[must_use]
pub fn start(tag: &str, pods: &[PodSpec], policies: &str, extra: &[&str]) -> Env {
    let mut node = TestNode::new(tag);
    let cgroup = node.use_cgroup();
    let cgroup = cgroup.to_str().expect("utf-8").to_owned();
    let extra: Vec<&str> = ["--cgroup", cgroup.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    start_on(node, pods, policies, &extra)
}

/// [`start`] on a node made by the caller (e.g. one whose cgroup it passes itself).
#[must_use]
pub fn start_on(mut node: TestNode, pods: &[PodSpec], policies: &str, extra: &[&str]) -> Env {
    node.mount_bpffs();
    let dir = TempDir::new("e2e");
    std::fs::create_dir_all(dir.join("policies")).expect("dir");
    let mut env = Env {
        agent: None,
        node,
        dir,
        pods: Vec::new(),
        args: Vec::new(),
    };
    let server = pod_server_bin();
    let jwks = env.node.add_pod("jwks", pod_ip(5));
    let jwks_file = repo_root().join("testdata/istio-samples/jwks.json");
    env.node.spawn(
        &jwks.netns,
        &server,
        &[
            &format!("{}:8080", jwks.ip),
            "--jwks",
            jwks_file.to_str().expect("utf-8"),
        ],
    );
    let mut workloads = String::from("workloads:\n");
    let client = env.node.add_pod("sleep", pod_ip(20));
    workloads.push_str(&workload("sleep", "sleep", &client));
    env.pods.extend([jwks.clone(), client]);
    for &(name, index, app) in pods {
        let pod = env.node.add_pod(name, pod_ip(index));
        env.node
            .spawn(&pod.netns, &server, &[&format!("{}:8000", pod.ip)]);
        if let Some(app) = app {
            workloads.push_str(&workload(name, app, &pod));
        }
        env.pods.push(pod);
    }
    std::fs::write(env.dir.join("workloads.yaml"), workloads).expect("write");
    let policies = policies.replace("{JWKS}", &format!("http://{}:8080/jwks.json", jwks.ip));
    std::fs::write(env.policy_file(), policies).expect("write");
    let path = |p: &Path| p.to_str().expect("utf-8").to_owned();
    env.args = [
        "run",
        "--policies",
        &path(&env.dir.join("policies")),
        "--workloads",
        &path(&env.dir.join("workloads.yaml")),
        "--admin",
        ADMIN,
        "--listen",
        "0.0.0.0:15006",
        "--bpf-pin-dir",
        &path(&env.pin_dir()),
        "--netns-dir",
        &path(env.node.netns_dir()),
    ]
    .iter()
    .chain(extra)
    .map(|s| (*s).to_owned())
    .collect();
    env.start_agent();
    env
}

/// A `RequestAuthentication` for the pods labelled `app`, tokens of testing@secure.istio.io.
#[must_use]
pub fn request_authn(app: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt-{app}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwksUri: \"{{JWKS}}\"\n---\n"
    )
}

/// Pods and policies of the fast-path and node-traffic scenarios: `require` (.11) needs a JWT
/// principal, `web` (.12) lets any known principal in, `stranger` (.21) is not in the registry.
pub const PROTECTED_PODS: [PodSpec<'static>; 3] = [
    ("require", 11, Some("httpbin-jwt")),
    ("web", 12, Some("web")),
    ("stranger", 21, None),
];

/// The policies of [`PROTECTED_PODS`]: `require` needs a JWT (scenario 2), `web` lets any known
/// principal in (scenario 4).
#[must_use]
pub fn protected_policies() -> String {
    format!(
        "{}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-jwt}}}}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"testing@secure.istio.io/*\"]}}}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: known, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [\"*\"]}}}}]\n",
        request_authn("httpbin-jwt"),
    )
}

/// No bypass (policies: [`protected_policies`]): the node itself connecting to a protected pod
/// is sent through the enforcer by `guard` (judged: `web` wants a known principal, the node has
/// none); an unregistered pod is steered and judged (403).
pub fn bypass_refused(env: &Env) {
    let redirected = env.counter("guard_redirected_listener");
    let (status, body) = env.curl_from_node("GET", "web", "/", &[]);
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "the node reached a protected pod without the enforcer"
    );
    assert!(env.counter("guard_redirected_listener") > redirected);
    let (status, body) = env.curl_short("stranger", "GET", "web", "/");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
}

/// Gives `require` an HTTP probe (`GET /healthz` on 8000) and `web` a TCP probe (8000) in the
/// workloads file, and waits until the agent applied it (the node's probe answered 200).
pub fn add_probes(env: &Env) {
    let file = env.dir.join("workloads.yaml");
    let mut text = std::fs::read_to_string(&file).expect("workloads file");
    for (pod, probes) in [
        ("require", "[{port: 8000, path: /healthz}]"),
        ("web", "[{port: 8000}]"),
    ] {
        let line = format!("    interface: {}\n", env.pod(pod).host_if);
        assert!(text.contains(&line), "{pod} in the workloads file");
        text = text.replace(&line, &format!("{line}    probes: {probes}\n"));
    }
    std::fs::write(&file, text).expect("write workloads");
    let applied = eventually(Duration::from_secs(10), || {
        env.curl_from_node("GET", "require", "/healthz", &[]).0 == 200
    });
    assert!(
        applied,
        "the probe was not exempt 10 s after the workloads file changed:\n{}",
        env.log()
    );
}

/// Plain TCP (not HTTP) from `netns` to `pod`:8000: what came back within 3 s.
#[must_use]
pub fn raw_tcp(env: &Env, netns: &str, pod: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{}/8000 || exit 0; printf 'hello\\r\\n\\r\\n' >&3; cat <&3",
        env.pod(pod).ip
    );
    let out = env
        .node
        .exec(netns, &["timeout", "3", "bash", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node's requests into protected pods (policies: [`protected_policies`]; probes from
/// [`add_probes`]): judged like any source without identity, except exactly the probe
/// endpoints, and those only from the node.
pub fn node_traffic_answers(env: &Env) {
    let node = env.node.netns.clone();
    let redirected = env.counter("guard_redirected_listener");

    // Judged: no token -> 403, a bad token -> 401, demo.jwt -> 200, through the enforcer (token
    // removed before the pod).
    let (status, body) = env.curl_from_node("GET", "require", "/", &[]);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = env.curl_from_node("GET", "require", "/", &[&bearer("garbage")]);
    assert_eq!(status, 401);
    let demo = bearer(&sample("demo.jwt"));
    let (status, body) = env.curl_from_node("GET", "require", "/headers", &[&demo]);
    assert_eq!(status, 200, "{body}");
    let got = seen(&body);
    assert_eq!(got["uri"], "/headers", "{got}");
    assert!(
        got["headers"].get("authorization").is_none(),
        "the enforcer removed the token: {got}"
    );
    assert!(
        got["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{NODE_ADDR}:")),
        "{got}"
    );

    // The probe path from the node: 200 without a token; the query does not matter.
    for path in ["/healthz", "/healthz?verbose=1"] {
        let (status, body) = env.curl_from_node("GET", "require", path, &[]);
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(seen(&body)["uri"], path, "the pod got the probe as sent");
    }
    // Anything else from the node is judged: another method, a longer path, another path.
    for (method, path) in [
        ("POST", "/healthz"),
        ("GET", "/healthz/x"),
        ("GET", "/metrics"),
    ] {
        let (status, body) = env.curl_from_node(method, "require", path, &[]);
        assert_eq!(
            (status, body.as_str()),
            (403, "RBAC: access denied"),
            "{method} {path}"
        );
    }
    // The same probe path from a pod is judged (the exemption is the node's only).
    let (status, body) = env.curl_short("sleep", "GET", "require", "/healthz");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert!(env.counter("guard_redirected_listener") > redirected);

    // A TCP probe port: plain TCP from the node reaches the pod (its HTTP server answers the
    // garbage with 400); from a pod the enforcer closes it (an ALLOW on principals; `sleep` is
    // known, so use the unregistered `stranger`).
    let answer = raw_tcp(env, &node, "web");
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "node, TCP probe: {answer:?}"
    );
    let answer = raw_tcp(env, &env.pod("stranger").netns, "web");
    assert_eq!(
        answer, "",
        "a pod's plain TCP to the probe port is judged and closed"
    );

    // The agent's log writer flushes every 100 ms: wait for the lines, bounded.
    let probe_lines = |log: &str| {
        log.lines()
            .filter(|l| l.contains("reason=probe") && l.contains(&format!("source={NODE_ADDR}:")))
            .count()
    };
    let flushed = crate::eventually(Duration::from_secs(3), || probe_lines(&env.log()) >= 3);
    let log = env.log();
    assert!(
        flushed,
        "access log lines with reason=probe from the node: {}\n{log}",
        probe_lines(&log)
    );
}
