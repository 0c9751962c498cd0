//! End to end on a node made of namespaces: the real `nodeward run` with its kernel data path
//! in the node namespace, pods with real HTTP servers, a client pod with curl, JWKS served by a
//! pod over HTTP. Checked by status at the client and by what the pod received.
//!
//! Every test builds its own node ([`start`]): its namespaces, temp dir and BPF pin dir are
//! unique to it, so the tests run in parallel; guards remove them all, also on panic.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodeward_tests::netns::{Pod, TestNode, PREFIX};
use nodeward_tests::{nodeward_bin, repo_root};

/// Every pin dir of these tests is `<PIN_ROOT>/nodeward-test-<pid>-<test>`.
const PIN_PREFIX: &str = "nodeward-test-";
const PIN_ROOT: &str = "/sys/fs/bpf";
/// A bounded request: no answer within it is status 0.
const SHORT: &str = "2";

fn sample(file: &str) -> String {
    std::fs::read_to_string(repo_root().join("testdata/istio-samples").join(file))
        .expect("sample")
        .trim()
        .to_owned()
}

/// A directory removed when the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A BPF pin dir, removed when the test ends if the agent left it (a killed agent does).
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.0.exists() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Pin dirs of test processes that no longer exist (a killed run).
fn remove_leftover_pins() {
    let Ok(entries) = std::fs::read_dir(PIN_ROOT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(PIN_PREFIX)) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn workload(name: &str, app: &str, pod: &Pod) -> String {
    format!("  - name: {name}\n    namespace: foo\n    serviceAccount: {name}\n    labels: {{app: {app}}}\n    ip: {}\n    interface: {}\n", pod.ip, pod.host_if)
}

/// Polls `f` every 100 ms until it returns true or `limit` passes.
fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// `GET http://127.0.0.1:15000<path>` from the node namespace (the admin server).
fn admin(node: &TestNode, path: &str) -> String {
    let url = format!("http://127.0.0.1:15000{path}");
    let out = node.exec(&node.netns, &["curl", "-s", "-m", SHORT, &url]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn metric(node: &TestNode, name: &str) -> u64 {
    admin(node, "/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

fn url(pod: &Pod, path: &str) -> String {
    format!("http://{}:8000{path}", pod.ip)
}

/// A pod of a test node: name, last address byte, and its `app` label when it is in the
/// workloads file (`None`: a pod the agent does not know).
type PodSpec<'a> = (&'a str, u8, Option<&'a str>);

/// A node with pods, its policy files and a running agent. Fields drop in order: the node
/// (the agent gets SIGTERM, namespaces go), then the pin dir if still there, then the files.
struct Env {
    node: TestNode,
    pins: PinDir,
    dir: TempDir,
    pods: Vec<Pod>,
    args: Vec<String>,
    agent: u32,
}

impl Env {
    fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    fn client(&self) -> String {
        self.pod("sleep").netns.clone()
    }

    /// `curl` from the client pod (5 s limit).
    fn curl(&self, method: &str, pod: &str, path: &str, headers: &[&str]) -> (u16, String) {
        self.node
            .curl(&self.client(), method, &url(self.pod(pod), path), headers)
    }

    /// `curl -m 2` from `from`'s namespace: status 0 when no answer came.
    fn curl_short(&self, from: &str, method: &str, pod: &str, path: &str) -> (u16, String) {
        let target = url(self.pod(pod), path);
        let out = self.node.exec(
            &self.pod(from).netns,
            &[
                "curl",
                "-s",
                "-m",
                SHORT,
                "-X",
                method,
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                &target,
            ],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    fn policy_file(&self) -> PathBuf {
        self.dir.0.join("policies/policies.yaml")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("agent.log")).unwrap_or_default()
    }

    /// Starts the agent (again: same arguments, same pin dir) and waits for /readyz.
    fn start_agent(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let netns = self.node.netns.clone();
        self.agent = self.node.spawn_logged(
            &netns,
            &nodeward_bin(),
            &args,
            &self.dir.0.join("agent.log"),
        );
        let node = &self.node;
        let ready = eventually(Duration::from_secs(20), || {
            let out = node.exec(
                &node.netns,
                &[
                    "curl",
                    "-s",
                    "-m",
                    SHORT,
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15000/readyz",
                ],
            );
            String::from_utf8_lossy(&out.stdout) == "200"
        });
        assert!(
            ready,
            "the agent did not become ready (datapath attached, JWKS fetched):\n{}",
            self.log()
        );
    }

    /// SIGKILL: a crash, the data path's pins stay.
    fn kill_agent(&mut self) {
        self.node.kill(self.agent);
    }

    /// SIGTERM and the exit code (`None`: it had to be killed).
    fn stop_agent(&mut self) -> Option<i32> {
        self.node.terminate(self.agent, Duration::from_secs(25))
    }
}

/// Builds a node for test `test` with the JWKS pod (`jwks`, .5, serving
/// `http://<ip>:8080/jwks.json`), the client pod (`sleep`, .20, in the workloads file) and
/// `pods` (HTTP servers on port 8000); writes the workloads and `policies` (`{JWKS}` stands for
/// the JWKS URI) into a temp dir; starts `nodeward run` with a pin dir of its own plus `extra`
/// arguments; waits for /readyz.
/// The agent runs with its defaults, the fast path included: its `sock_ops` program goes on a
/// cgroup v2 made for the node (every process of the node joins it), never the machine's root.
fn start(test: &str, pods: &[PodSpec], policies: &str, extra: &[&str]) -> Env {
    let mut node = TestNode::new();
    let cgroup = node.use_cgroup();
    let cgroup = cgroup.to_str().expect("utf-8").to_owned();
    let extra: Vec<&str> = ["--cgroup", cgroup.as_str()]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    start_on(node, test, pods, policies, &extra)
}

/// [`start`] on a node made by the caller (e.g. one with its own cgroup).
fn start_on(node: TestNode, test: &str, pods: &[PodSpec], policies: &str, extra: &[&str]) -> Env {
    remove_leftover_pins();
    let pid = std::process::id();
    let pins = PinDir(PathBuf::from(format!(
        "{PIN_ROOT}/{PIN_PREFIX}{pid}-{test}"
    )));
    let dir = TempDir(std::env::temp_dir().join(format!("nodeward-e2e-{pid}-{test}")));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(dir.0.join("policies")).expect("dir");
    let mut env = Env {
        node,
        pins,
        dir,
        pods: Vec::new(),
        args: Vec::new(),
        agent: 0,
    };
    let server = PathBuf::from(env!("CARGO_BIN_EXE_nw-pod-server"));
    let jwks = env.node.add_pod("jwks", 5);
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
    let client = env.node.add_pod("sleep", 20);
    workloads.push_str(&workload("sleep", "sleep", &client));
    env.pods.extend([jwks.clone(), client]);
    for &(name, index, app) in pods {
        let pod = env.node.add_pod(name, index);
        env.node
            .spawn(&pod.netns, &server, &[&format!("{}:8000", pod.ip)]);
        if let Some(app) = app {
            workloads.push_str(&workload(name, app, &pod));
        }
        env.pods.push(pod);
    }
    std::fs::write(env.dir.0.join("workloads.yaml"), workloads).expect("write");
    let policies = policies.replace("{JWKS}", &format!("http://{}:8080/jwks.json", jwks.ip));
    std::fs::write(env.policy_file(), policies).expect("write");
    let path = |p: PathBuf| p.to_str().expect("utf-8").to_owned();
    env.args = [
        "run",
        "--policies",
        &path(env.dir.0.join("policies")),
        "--workloads",
        &path(env.dir.0.join("workloads.yaml")),
        "--admin",
        "127.0.0.1:15000",
        "--listen",
        "0.0.0.0:15006",
        "--bpf-pin-dir",
        &path(env.pins.0.clone()),
    ]
    .iter()
    .chain(extra)
    .map(|s| (*s).to_owned())
    .collect();
    env.start_agent();
    env
}

/// A `RequestAuthentication` for the pods labelled `app`, tokens of testing@secure.istio.io.
fn request_authn(app: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt-{app}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwksUri: \"{{JWKS}}\"\n---\n"
    )
}

/// Scenarios 1, 2 and 6: JWT authentication and authorization, and an unprotected pod.
#[test]
fn jwt_and_authorization_through_the_kernel_data_path() {
    let policies = format!(
        "{}{}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-jwt}}}}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"testing@secure.istio.io/*\"]}}}}]\n",
        request_authn("httpbin"),
        request_authn("httpbin-jwt"),
    );
    let mut env = start(
        "jwt",
        &[
            ("httpbin", 10, Some("httpbin")),
            ("require", 11, Some("httpbin-jwt")),
            ("open", 30, Some("open")),
        ],
        &policies,
        &[],
    );
    let demo = bearer(&sample("demo.jwt"));
    // 1. RequestAuthentication alone: no token 200, garbage 401, demo.jwt 200 (token removed).
    let (status, body) = env.curl("GET", "httpbin", "/ip", &[]);
    assert_eq!(status, 200, "{body}");
    let (status, _) = env.curl("GET", "httpbin", "/ip", &[&bearer("garbage")]);
    assert_eq!(status, 401);
    let (status, body) = env.curl("GET", "httpbin", "/a/../headers", &[&demo]);
    assert_eq!(status, 200, "{body}");
    let seen: serde_json::Value = serde_json::from_str(&body).expect("pod JSON");
    assert_eq!(
        seen["uri"], "/headers",
        "the pod received the normalized path"
    );
    assert!(
        seen["headers"].get("authorization").is_none(),
        "the token was removed: {seen}"
    );
    assert!(
        seen["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with("10.200.255.1"),
        "the pod was reached by the enforcer: {seen}"
    );
    // 2. Plus ALLOW requestPrincipals: no token 403, demo.jwt 200.
    let (status, body) = env.curl("GET", "require", "/", &[]);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = env.curl("GET", "require", "/", &[&demo]);
    assert_eq!(status, 200);
    // 6. A pod with no policy is not steered and answers directly.
    let steered_counter = "nodeward_datapath_packets_total{counter=\"steered\"}";
    let steered = metric(&env.node, steered_counter);
    let (status, body) = env.curl("GET", "open", "/", &[]);
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_str(&body).expect("pod JSON");
    let client_ip = env.pod("sleep").ip.to_string();
    assert!(
        seen["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&client_ip),
        "direct: {seen}"
    );
    assert_eq!(
        metric(&env.node, steered_counter),
        steered,
        "no packet of it was steered"
    );
    assert!(steered > 0);

    // A clean stop leaves no pins behind.
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0");
    assert!(
        !env.pins.0.exists(),
        "pins left in {}",
        env.pins.0.display()
    );
}

/// Scenario 3: ALLOW an exact requestPrincipal with `when: request.auth.claims[groups]`.
#[test]
fn jwt_claim_condition_through_the_kernel_data_path() {
    let policies = format!(
        "{}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-group, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-groups}}}}\n  action: ALLOW\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"testing@secure.istio.io/testing@secure.istio.io\"]}}}}]\n    when:\n    - key: request.auth.claims[groups]\n      values: [\"group1\"]\n",
        request_authn("httpbin-groups"),
    );
    let env = start(
        "groups",
        &[("groups", 12, Some("httpbin-groups"))],
        &policies,
        &[],
    );
    let (status, body) = env.curl(
        "GET",
        "groups",
        "/",
        &[&bearer(&sample("groups-scope.jwt"))],
    );
    assert_eq!(status, 200, "groups-scope.jwt carries group1: {body}");
    let (status, body) = env.curl("GET", "groups", "/", &[&bearer(&sample("demo.jwt"))]);
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "demo.jwt has no groups claim"
    );
    let (status, _) = env.curl("GET", "groups", "/", &[]);
    assert_eq!(status, 403, "no token");
}

/// Scenario 4: ALLOW `principals: ["*"]` + GET; principals come from the registry by source
/// address.
#[test]
fn any_known_principal_may_get() {
    let policies = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: get-only, namespace: foo}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [\"*\"]}}]\n    to: [{operation: {methods: [\"GET\"]}}]\n";
    let env = start(
        "getonly",
        &[("web", 10, Some("web")), ("stranger", 21, None)],
        policies,
        &[],
    );
    let (status, body) = env.curl("GET", "web", "/", &[]);
    assert_eq!(status, 200, "a known client may GET: {body}");
    let (status, body) = env.curl("POST", "web", "/", &[]);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, body) = env.curl_short("stranger", "GET", "web", "/");
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "a source not in the registry has no principal"
    );
}

/// Scenario 5: DENY beats ALLOW; a policy of the root namespace applies to every workload.
#[test]
fn deny_beats_allow_and_root_namespace_applies_everywhere() {
    let policies = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-admin, namespace: istio-system}\nspec:\n  action: DENY\n  rules:\n  - to: [{operation: {paths: [\"/admin*\"]}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-all, namespace: foo}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - {}\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-delete, namespace: foo}\nspec:\n  selector: {matchLabels: {app: web}}\n  action: DENY\n  rules:\n  - to: [{operation: {methods: [\"DELETE\"]}}]\n";
    let env = start(
        "deny",
        &[("web", 10, Some("web")), ("other", 11, Some("other"))],
        policies,
        &[],
    );
    for pod in ["web", "other"] {
        let (status, body) = env.curl("GET", pod, "/ip", &[]);
        assert_eq!(status, 200, "{pod} /ip: {body}");
        for path in ["/admin", "/admin/users"] {
            let (status, body) = env.curl("GET", pod, path, &[]);
            assert_eq!(
                (status, body.as_str()),
                (403, "RBAC: access denied"),
                "the mesh-wide DENY applies to {pod} {path}"
            );
        }
    }
    let (status, _) = env.curl("POST", "web", "/anything", &[]);
    assert_eq!(status, 200, "ALLOW {{}} allows everything else");
    let (status, _) = env.curl("DELETE", "web", "/anything", &[]);
    assert_eq!(status, 403, "the DENY of the same workload beats its ALLOW");
    let (status, _) = env.curl("DELETE", "other", "/anything", &[]);
    assert_eq!(status, 200, "the DENY of web does not select other");
}

fn get_only(methods: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: methods, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: ALLOW\n  rules:\n  - to: [{{operation: {{methods: [{methods}]}}}}]\n")
}

/// Scenario 7: edits of the policy directory apply within a second without restart; a broken
/// edit changes nothing and is reported.
#[test]
fn policy_edits_apply_live_and_broken_edits_change_nothing() {
    let env = start(
        "reload",
        &[("web", 10, Some("web"))],
        &get_only("\"GET\""),
        &[],
    );
    let post = || env.curl("POST", "web", "/", &[]).0;
    assert_eq!(post(), 403);
    let generation = |env: &Env| -> u64 {
        let state: serde_json::Value =
            serde_json::from_str(&admin(&env.node, "/debug/state")).expect("state JSON");
        state["generation"].as_u64().unwrap_or(0)
    };
    let errors = |env: &Env| -> Vec<serde_json::Value> {
        let state: serde_json::Value =
            serde_json::from_str(&admin(&env.node, "/debug/state")).expect("state JSON");
        state["errors"].as_array().cloned().unwrap_or_default()
    };
    assert!(errors(&env).is_empty(), "{:?}", errors(&env));

    // Allow POST too: 200 within a second.
    std::fs::write(env.policy_file(), get_only("\"GET\", \"POST\"")).expect("write");
    let edited = Instant::now();
    assert!(
        eventually(Duration::from_secs(1), || post() == 200),
        "the edit did not apply within a second"
    );
    let took = edited.elapsed();

    // A broken edit: reported, and the last good content keeps serving.
    let before = generation(&env);
    std::fs::write(
        env.policy_file(),
        "kind: AuthorizationPolicy\nspec: [unclosed\n",
    )
    .expect("write");
    assert!(
        eventually(Duration::from_secs(2), || !errors(&env).is_empty()),
        "the broken file is not reported in /debug/state"
    );
    assert!(metric(&env.node, "nodeward_config_errors") >= 1);
    for _ in 0..5 {
        assert_eq!(post(), 200, "the broken edit changed the answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(generation(&env) >= before);

    // Fixing it applies again and clears the error.
    std::fs::write(env.policy_file(), get_only("\"GET\"")).expect("write");
    assert!(
        eventually(Duration::from_secs(1), || post() == 403),
        "the fixed file did not apply within a second"
    );
    assert!(eventually(Duration::from_secs(1), || errors(&env).is_empty()));
    assert_eq!(metric(&env.node, "nodeward_config_errors"), 0);
    eprintln!("first edit applied in {took:?}");
}

/// Scenario 8: a crashed agent (SIGKILL) leaves its programs attached: per `--failure-mode`,
/// requests to protected pods fail or pass unjudged; a restart over the same pins enforces
/// again; a clean stop leaves no pins, and the node leaves no namespaces.
fn crash_and_restart(mode: &str) {
    let policies = format!(
        "{}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-jwt}}}}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"testing@secure.istio.io/*\"]}}}}]\n",
        request_authn("httpbin-jwt"),
    );
    let mut env = start(
        &format!("crash-{mode}"),
        &[("require", 11, Some("httpbin-jwt"))],
        &policies,
        &["--failure-mode", mode],
    );
    let client_ip = env.pod("sleep").ip.to_string();
    assert_eq!(env.curl_short("sleep", "GET", "require", "/").0, 403);

    env.kill_agent();
    assert!(env.pins.0.exists(), "a crash leaves the pins");
    let (status, body) = env.curl_short("sleep", "GET", "require", "/");
    if mode == "closed" {
        assert_eq!(status, 0, "fail closed: no answer, got {body}");
    } else {
        assert_eq!(status, 200, "fail open: the pod answers: {body}");
        let seen: serde_json::Value = serde_json::from_str(&body).expect("pod JSON");
        assert!(
            seen["peer"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&client_ip),
            "unjudged, straight from the client: {seen}"
        );
    }

    env.start_agent();
    let (status, body) = env.curl_short("sleep", "GET", "require", "/");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = env.curl("GET", "require", "/", &[&bearer("garbage")]);
    assert_eq!(status, 401);
    let (status, _) = env.curl("GET", "require", "/", &[&bearer(&sample("demo.jwt"))]);
    assert_eq!(status, 200);

    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert!(
        !env.pins.0.exists(),
        "pins left in {}",
        env.pins.0.display()
    );

    let ours = env
        .node
        .netns
        .strip_suffix("node")
        .expect("node namespace name")
        .to_owned();
    assert!(ours.starts_with(PREFIX));
    drop(env);
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let left: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(&ours))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[test]
fn crash_fails_closed_and_restart_enforces_again() {
    crash_and_restart("closed");
}

#[test]
fn crash_fails_open_and_restart_enforces_again() {
    crash_and_restart("open");
}

// --- The same-node fast path (`--fast-path on`): sock_ops + sk_msg on the node's own cgroup. ---

/// `BPF_CGROUP_SOCK_OPS`.
const SOCK_OPS: u32 = 3;

fn counter(env: &Env, name: &str) -> u64 {
    metric(
        &env.node,
        &format!("nodeward_datapath_packets_total{{counter=\"{name}\"}}"),
    )
}

fn fast_path_state(env: &Env) -> serde_json::Value {
    let state: serde_json::Value =
        serde_json::from_str(&admin(&env.node, "/debug/state")).expect("state JSON");
    state["fastPath"].clone()
}

/// Policies of the fast-path tests: `require` needs a JWT (scenario 2), `web` lets any known
/// principal in (scenario 4).
fn fast_path_policies() -> String {
    format!(
        "{}apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-jwt}}}}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"testing@secure.istio.io/*\"]}}}}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: known, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  rules:\n  - from: [{{source: {{principals: [\"*\"]}}}}]\n",
        request_authn("httpbin-jwt"),
    )
}

/// A node with its own cgroup, the agent started with `--fast-path <mode> --cgroup <it>`.
fn start_fast_path(test: &str, mode: &str) -> (Env, PathBuf) {
    let mut node = TestNode::new();
    let cgroup = node.use_cgroup();
    let cgroup_arg = cgroup.to_str().expect("utf-8").to_owned();
    let env = start_on(
        node,
        test,
        &[
            ("require", 11, Some("httpbin-jwt")),
            ("web", 12, Some("web")),
            ("stranger", 21, None),
        ],
        &fast_path_policies(),
        &["--fast-path", mode, "--cgroup", &cgroup_arg],
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
    let seen: serde_json::Value = serde_json::from_str(&body).expect("pod JSON");
    assert_eq!(seen["uri"], "/headers", "normalized path: {seen}");
    assert!(
        seen["headers"].get("authorization").is_none(),
        "token removed: {seen}"
    );
    assert!(
        seen["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with("10.200.255.1"),
        "reached by the enforcer: {seen}"
    );
    let (status, body) = env.curl("GET", "web", "/", &[]);
    assert_eq!(status, 200, "{body}");
    let (status, body) = env.curl_short("stranger", "GET", "web", "/");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
}

/// No bypass with the fast path on: the node itself connecting to a protected pod is sent
/// through the enforcer by `guard` (judged: `web` wants a known principal, the node has none);
/// an unregistered pod is steered and judged (403).
fn bypass_refused(env: &Env) {
    let redirected = counter(env, "guard_redirected_listener");
    let (status, body) = env
        .node
        .curl(&env.node.netns, "GET", &url(env.pod("web"), "/"), &[]);
    assert_eq!(
        (status, body.as_str()),
        (403, "RBAC: access denied"),
        "the node reached a protected pod without the enforcer"
    );
    assert!(counter(env, "guard_redirected_listener") > redirected);
    let (status, body) = env.curl_short("stranger", "GET", "web", "/");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
}

/// A pod that gives itself the protected pod's address and connects to it inside its own
/// namespace makes two sockets with protected endpoints whose handshake never crossed the node:
/// neither joins the fast path (the key binding to flows `steer`/`guard` opened).
fn impostor_stays_on_tcp(env: &mut Env) {
    let web = env.pod("web").ip;
    let stranger = env.pod("stranger").netns.clone();
    let status = std::process::Command::new("ip")
        .args([
            "-n",
            &stranger,
            "addr",
            "add",
            &format!("{web}/32"),
            "dev",
            "lo",
        ])
        .status()
        .expect("ip addr add");
    assert!(status.success());
    let server = PathBuf::from(env!("CARGO_BIN_EXE_nw-pod-server"));
    env.node
        .spawn(&stranger, &server, &[&format!("{web}:8000")]);
    let (added, unsteered) = (
        counter(env, "fastpath_sockets_added"),
        counter(env, "fastpath_sockets_unsteered"),
    );
    let target = url(env.pod("web"), "/impostor");
    let answered = eventually(Duration::from_secs(5), || {
        let out = env.node.exec(
            &stranger,
            &[
                "curl",
                "-s",
                "-m",
                SHORT,
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
        counter(env, "fastpath_sockets_added"),
        added,
        "a socket whose handshake never crossed the node joined the fast path"
    );
    assert!(counter(env, "fastpath_sockets_unsteered") >= unsteered + 2);
}

/// `size` bytes up (POST, hashed by the pod) and down (`/bytes/<size>`, compared byte for byte).
fn large_bodies(env: &Env, size: usize) {
    let upload = env.dir.0.join("upload.bin");
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
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "upload answer: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(seen["body_len"], size, "{seen}");
    assert_eq!(
        seen["body_fnv"],
        format!("{:016x}", nodeward_tests::fnv1a(&body)),
        "the pod received the body intact"
    );
    let download = env.dir.0.join("download.bin");
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
    let got = std::fs::read(&download).expect("download");
    assert_eq!(got.len(), size);
    assert!(got == body, "the client received the body intact");
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
        counter(&env, "fastpath_sockets_added") >= 4,
        "client, enforcer (both legs) and pod sockets joined: {}",
        counter(&env, "fastpath_sockets_added")
    );
    let redirected = counter(&env, "fastpath_msgs_redirected");
    assert!(redirected > 0, "no message took the fast path");

    let status = env.node.exec(
        &env.node.netns,
        &[
            nodeward_bin().to_str().expect("utf-8"),
            "status",
            "--admin",
            "127.0.0.1:15000",
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
    assert!(counter(&env, "fastpath_msgs_redirected") > redirected);

    eprintln!(
        "fast path: sockets added {}, unsteered {}, messages redirected {}, passed {}",
        counter(&env, "fastpath_sockets_added"),
        counter(&env, "fastpath_sockets_unsteered"),
        counter(&env, "fastpath_msgs_redirected"),
        counter(&env, "fastpath_msgs_passed"),
    );
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert_eq!(
        cgroup_attached(&cgroup),
        0,
        "a clean stop detaches sock_ops"
    );
    assert!(
        !env.pins.0.exists(),
        "pins left in {}",
        env.pins.0.display()
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
        env.pins.0.join("fastpath/sockops").exists(),
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
    let redirected = counter(&env, "fastpath_msgs_redirected");
    reference_answers(&env);
    bypass_refused(&env);
    assert!(counter(&env, "fastpath_msgs_redirected") > redirected);
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert_eq!(cgroup_attached(&cgroup), 0);
    assert!(!env.pins.0.exists());
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
    assert!(!env.pins.0.join("fastpath/sockops").exists());
    assert_eq!(fast_path_state(&env)["mode"], "off");
    let redirected = counter(&env, "fastpath_msgs_redirected");
    reference_answers(&env);
    bypass_refused(&env);
    large_bodies(&env, 1 << 20);
    assert_eq!(
        counter(&env, "fastpath_msgs_redirected"),
        redirected,
        "no message took a fast path that is off"
    );
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert!(!env.pins.0.exists());
}

fn cgroup_attached(cgroup: &Path) -> u32 {
    nodeward_tests::netns::cgroup_attached_programs(cgroup, SOCK_OPS)
}

// --- Traffic from the node itself: judged by the enforcer, probes exempt. ---

/// Gives `require` an HTTP probe (`GET /healthz` on 8000) and `web` a TCP probe (8000) in the
/// workloads file, and waits until the agent applied it (the node's probe answered 200).
fn add_probes(env: &Env) {
    let file = env.dir.0.join("workloads.yaml");
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
    let target = url(env.pod("require"), "/healthz");
    let applied = eventually(Duration::from_secs(10), || {
        env.node.curl(&env.node.netns, "GET", &target, &[]).0 == 200
    });
    assert!(
        applied,
        "the probe was not exempt 10 s after the workloads file changed:\n{}",
        env.log()
    );
}

/// What the pod received, from its JSON answer.
fn seen(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("pod JSON: {e}: {body}"))
}

/// Plain TCP (not HTTP) from `netns` to `pod`:8000: what came back within 3 s.
fn raw_tcp(env: &Env, netns: &str, pod: &str) -> String {
    let script = format!(
        "exec 3<>/dev/tcp/{}/8000 || exit 0; printf 'hello\\r\\n\\r\\n' >&3; cat <&3",
        env.pod(pod).ip
    );
    let out = env
        .node
        .exec(netns, &["timeout", "3", "bash", "-c", &script]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The node's requests into protected pods (policies: `require` wants a JWT principal, `web` a
/// known principal; probes from [`add_probes`]): judged like any source without identity, except
/// exactly the probe endpoints, and those only from the node.
fn node_traffic_answers(env: &Env) {
    let node = env.node.netns.clone();
    let require = |path: &str| url(env.pod("require"), path);
    let redirected = counter(env, "guard_redirected_listener");

    // Judged: no token -> 403, a bad token -> 401, demo.jwt -> 200, through the enforcer (token
    // removed before the pod).
    let (status, body) = env.node.curl(&node, "GET", &require("/"), &[]);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = env
        .node
        .curl(&node, "GET", &require("/"), &[&bearer("garbage")]);
    assert_eq!(status, 401);
    let demo = bearer(&sample("demo.jwt"));
    let (status, body) = env.node.curl(&node, "GET", &require("/headers"), &[&demo]);
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
            .starts_with(&format!("{}:", nodeward_tests::netns::NODE_ADDR)),
        "{got}"
    );

    // The probe path from the node: 200 without a token; the query does not matter.
    for path in ["/healthz", "/healthz?verbose=1"] {
        let (status, body) = env.node.curl(&node, "GET", &require(path), &[]);
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(seen(&body)["uri"], path, "the pod got the probe as sent");
    }
    // Anything else from the node is judged: another method, a longer path, another path.
    for (method, path) in [
        ("POST", "/healthz"),
        ("GET", "/healthz/x"),
        ("GET", "/metrics"),
    ] {
        let (status, body) = env.node.curl(&node, method, &require(path), &[]);
        assert_eq!(
            (status, body.as_str()),
            (403, "RBAC: access denied"),
            "{method} {path}"
        );
    }
    // The same probe path from a pod is judged (the exemption is the node's only).
    let (status, body) = env.curl_short("sleep", "GET", "require", "/healthz");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert!(counter(env, "guard_redirected_listener") > redirected);

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

    let log = env.log();
    let probe_lines = log
        .lines()
        .filter(|l| {
            l.contains("reason=probe")
                && l.contains(&format!("source={}:", nodeward_tests::netns::NODE_ADDR))
        })
        .count();
    assert!(
        probe_lines >= 3,
        "access log lines with reason=probe from the node: {probe_lines}\n{log}"
    );
}

/// Policies of the node-traffic tests: as [`fast_path_policies`].
fn start_node_traffic(test: &str, extra: &[&str]) -> Env {
    start(
        test,
        &[
            ("require", 11, Some("httpbin-jwt")),
            ("web", 12, Some("web")),
            ("stranger", 21, None),
        ],
        &fast_path_policies(),
        extra,
    )
}

/// The node's own traffic (a host process, the kubelet) into protected pods goes through the
/// enforcer: judged, with only the declared probe endpoints exempt, only from the node.
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
    let node_addr = nodeward_tests::netns::NODE_ADDR.to_string();
    let stranger = env.pod("stranger").netns.clone();
    let status = std::process::Command::new("ip")
        .args([
            "-n",
            &stranger,
            "addr",
            "add",
            &format!("{node_addr}/32"),
            "dev",
            "lo",
        ])
        .status()
        .expect("ip addr add");
    assert!(status.success());
    let target = url(env.pod("require"), "/healthz");
    let out = env.node.exec(
        &stranger,
        &[
            "curl",
            "-s",
            "-m",
            SHORT,
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

/// With the agent killed, the node's traffic follows `--failure-mode` like a pod's: closed
/// drops it, open lets it through unjudged; a restart judges it again.
fn node_traffic_without_agent(mode: &str) {
    let mut env = start_node_traffic(&format!("node-down-{mode}"), &["--failure-mode", mode]);
    add_probes(&env);
    let target = url(env.pod("require"), "/");
    env.kill_agent();
    let (status, body) = env.node.curl(&env.node.netns, "GET", &target, &[]);
    if mode == "closed" {
        assert_eq!(status, 0, "fail closed: no answer, got {status} {body}");
    } else {
        assert_eq!(status, 200, "fail open: the pod answers: {body}");
        let got = seen(&body);
        assert_eq!(got["uri"], "/", "{got}");
    }
    env.start_agent();
    if mode == "closed" {
        // The pinned counters survived the crash: guard dropped the node's SYNs.
        assert!(counter(&env, "guard_dropped_failure_closed") > 0);
    } else {
        assert!(counter(&env, "guard_passed_failure_open") > 0);
    }
    let (status, body) = env.node.curl(&env.node.netns, "GET", &target, &[]);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
}

#[test]
fn node_traffic_fails_closed_without_the_agent() {
    node_traffic_without_agent("closed");
}

#[test]
fn node_traffic_fails_open_without_the_agent() {
    node_traffic_without_agent("open");
}
