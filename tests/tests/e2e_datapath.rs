//! End to end on a node made of namespaces: the real `nodeward run` with its kernel data path
//! in the node namespace, pods with real HTTP servers, a client pod with curl, JWKS served by a
//! pod over HTTP. Checked by status at the client and by what the pod received.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodeward_tests::netns::{Pod, TestNode};
use nodeward_tests::{nodeward_bin, repo_root};

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

fn metric(node: &TestNode, name: &str) -> u64 {
    let out = node.exec(
        &node.netns,
        &["curl", "-s", "-m", "2", "http://127.0.0.1:15000/metrics"],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one node, its pods and the scenarios run on it"
)]
fn jwt_and_authorization_through_the_kernel_data_path() {
    let mut node = TestNode::new();
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/nodeward-test-{}", std::process::id()));
    let jwks = node.add_pod("jwks", 5);
    let httpbin = node.add_pod("httpbin", 10);
    let require = node.add_pod("require", 11);
    let open = node.add_pod("open", 30);
    let client = node.add_pod("sleep", 20);
    let server = PathBuf::from(env!("CARGO_BIN_EXE_nw-pod-server"));
    let jwks_file = repo_root().join("testdata/istio-samples/jwks.json");
    node.spawn(
        &jwks.netns,
        &server,
        &[
            &format!("{}:8080", jwks.ip),
            "--jwks",
            jwks_file.to_str().expect("utf-8"),
        ],
    );
    for pod in [&httpbin, &require, &open] {
        node.spawn(&pod.netns, &server, &[&format!("{}:8000", pod.ip)]);
    }

    let dir = TempDir(std::env::temp_dir().join(format!("nodeward-e2e-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("policies")).expect("dir");
    let workloads = format!(
        "workloads:\n{}{}{}{}",
        workload("httpbin", "httpbin", &httpbin),
        workload("httpbin-jwt", "httpbin-jwt", &require),
        workload("open", "open", &open),
        workload("sleep", "sleep", &client)
    );
    std::fs::write(dir.0.join("workloads.yaml"), workloads).expect("write");
    let policies = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt-example, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwksUri: http://{}:8080/jwks.json\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt-jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-jwt}}}}\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwksUri: http://{}:8080/jwks.json\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-jwt, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin-jwt}}}}\n  rules:\n  - from: [{{source: {{requestPrincipals: [\"testing@secure.istio.io/*\"]}}}}]\n",
        jwks.ip, jwks.ip
    );
    std::fs::write(dir.0.join("policies/policies.yaml"), policies).expect("write");

    let bin = nodeward_bin();
    let agent = node.spawn(
        &node.netns.clone(),
        &bin,
        &[
            "run",
            "--policies",
            dir.0.join("policies").to_str().expect("utf-8"),
            "--workloads",
            dir.0.join("workloads.yaml").to_str().expect("utf-8"),
            "--admin",
            "127.0.0.1:15000",
            "--listen",
            "0.0.0.0:15006",
            "--bpf-pin-dir",
            pin_dir.to_str().expect("utf-8"),
        ],
    );
    let ready = eventually(Duration::from_secs(20), || {
        let out = node.exec(
            &node.netns,
            &[
                "curl",
                "-s",
                "-m",
                "2",
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
        "the agent did not become ready (datapath attached, JWKS fetched)"
    );

    let url = |pod: &Pod, path: &str| format!("http://{}:8000{path}", pod.ip);
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    // 1. RequestAuthentication alone: no token 200, garbage 401, demo.jwt 200 (token removed).
    let (status, body) = node.curl(&client.netns, "GET", &url(&httpbin, "/ip"), &[]);
    assert_eq!(status, 200, "{body}");
    let (status, _) = node.curl(
        &client.netns,
        "GET",
        &url(&httpbin, "/ip"),
        &[&bearer("garbage")],
    );
    assert_eq!(status, 401);
    let (status, body) = node.curl(
        &client.netns,
        "GET",
        &url(&httpbin, "/a/../headers"),
        &[&bearer(&sample("demo.jwt"))],
    );
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
    let (status, body) = node.curl(&client.netns, "GET", &url(&require, "/"), &[]);
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = node.curl(
        &client.netns,
        "GET",
        &url(&require, "/"),
        &[&bearer(&sample("demo.jwt"))],
    );
    assert_eq!(status, 200);
    // 6. A pod with no policy is not steered and answers directly.
    let steered = metric(
        &node,
        "nodeward_datapath_packets_total{counter=\"steered\"}",
    );
    let (status, body) = node.curl(&client.netns, "GET", &url(&open, "/"), &[]);
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_str(&body).expect("pod JSON");
    assert!(
        seen["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&client.ip.to_string()),
        "direct: {seen}"
    );
    assert_eq!(
        metric(
            &node,
            "nodeward_datapath_packets_total{counter=\"steered\"}"
        ),
        steered,
        "no packet of it was steered"
    );
    assert!(steered > 0);

    // A clean stop leaves no pins behind.
    assert_eq!(
        node.terminate(agent, Duration::from_secs(25)),
        Some(0),
        "SIGTERM: exit 0"
    );
    assert!(
        !Path::new(&pin_dir).exists(),
        "pins left in {}",
        pin_dir.display()
    );
}
