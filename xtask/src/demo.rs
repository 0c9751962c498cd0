//! `cargo xtask demo`: the README's main job. Sets up, builds, and starts a demo node like the
//! end-to-end harness's: a `node` network namespace running the agent with its kernel data path
//! (`nodeward run --policies examples/policies --workloads examples/workloads.yaml`, in-pod
//! steering; with Istio's CUSTOM task from `examples/custom/`, the tests' ext-authz server in
//! the node namespace as its provider), pod namespaces for the workloads of `examples/workloads.yaml` each running a real
//! HTTP server behind a Service (kube-proxy's iptables rules: ClusterIP `10.96.0.<n>:8000`),
//! and client pods. Each of Istio's reference scenarios is a real HTTP request (curl) from a
//! client pod to the Service, the way Istio's tasks reach `httpbin.foo:8000`, steered by the
//! kernel inside the pod to the agent and answered by it or by the pod. Then the agent's
//! `nodeward status`, a SIGTERM (the programs stay, enforcing `--failure-mode`), `nodeward
//! uninstall`, and the node is taken down. Needs root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use nodeward_tests::cluster::{install_services, service_ip, ProxyMode, Service};
use nodeward_tests::netns::{pod_ip, Pod, TestNode};

use crate::{setup, system};

const SLEEP: &str = "sleep";
const STRANGER: &str = "stranger";

/// One row: which pod asks what, and the status Istio answers.
struct Scenario {
    name: &'static str,
    request: &'static str,
    from: &'static str,
    to: &'static str,
    method: &'static str,
    path: &'static str,
    /// A token sent as `Authorization: Bearer`: Istio's sample token file, or literal text.
    token: Option<Token>,
    expected: u16,
}

#[derive(Clone, Copy)]
enum Token {
    File(&'static str),
    Text(&'static str),
    /// Not a token: a request header, `Name: value` (the CUSTOM task's `x-ext-authz`).
    Header(&'static str),
}

const fn s(
    name: &'static str,
    request: &'static str,
    (from, to, method, path): (&'static str, &'static str, &'static str, &'static str),
    token: Option<Token>,
    expected: u16,
) -> Scenario {
    Scenario {
        name,
        request,
        from,
        to,
        method,
        path,
        token,
        expected,
    }
}

const SCENARIOS: &[Scenario] = &[
    s(
        "authn: jwt-example",
        "GET /ip, no token",
        (SLEEP, "httpbin", "GET", "/ip"),
        None,
        200,
    ),
    s(
        "authn: jwt-example",
        "GET /ip, garbage token",
        (SLEEP, "httpbin", "GET", "/ip"),
        Some(Token::Text("garbage")),
        401,
    ),
    s(
        "authn: jwt-example",
        "GET /ip, demo.jwt",
        (SLEEP, "httpbin", "GET", "/ip"),
        Some(Token::File("demo.jwt")),
        200,
    ),
    s(
        "authz-jwt: require-jwt",
        "GET /, no token",
        (SLEEP, "httpbin-jwt", "GET", "/"),
        None,
        403,
    ),
    s(
        "authz-jwt: require-jwt",
        "GET /, demo.jwt",
        (SLEEP, "httpbin-jwt", "GET", "/"),
        Some(Token::File("demo.jwt")),
        200,
    ),
    s(
        "authz-jwt: require-group",
        "GET /, groups-scope.jwt",
        (SLEEP, "httpbin-groups", "GET", "/"),
        Some(Token::File("groups-scope.jwt")),
        200,
    ),
    s(
        "authz-jwt: require-group",
        "GET /, demo.jwt (no groups)",
        (SLEEP, "httpbin-groups", "GET", "/"),
        Some(Token::File("demo.jwt")),
        403,
    ),
    s(
        "authz-http: get-only",
        "GET / from foo/sleep",
        (SLEEP, "httpbin-get", "GET", "/"),
        None,
        200,
    ),
    s(
        "authz-http: get-only",
        "POST / from foo/sleep",
        (SLEEP, "httpbin-get", "POST", "/"),
        None,
        403,
    ),
    s(
        "authz-http: get-only",
        "GET / from an unregistered pod",
        (STRANGER, "httpbin-get", "GET", "/"),
        None,
        403,
    ),
    s(
        "custom: ext-authz (HTTP)",
        "GET /headers, x-ext-authz: allow",
        (SLEEP, "httpbin", "GET", "/headers"),
        Some(Token::Header("x-ext-authz: allow")),
        200,
    ),
    s(
        "custom: ext-authz (HTTP)",
        "GET /headers, x-ext-authz: deny",
        (SLEEP, "httpbin", "GET", "/headers"),
        Some(Token::Header("x-ext-authz: deny")),
        403,
    ),
    s(
        "mesh-wide deny-admin",
        "GET /public/../admin",
        (SLEEP, "httpbin-get", "GET", "/public/../admin"),
        None,
        403,
    ),
];

/// The pods: the workloads of examples/workloads.yaml (same names and addresses) and a client
/// the registry does not know.
const PODS: &[(&str, u8)] = &[
    ("httpbin", 10),
    ("httpbin-jwt", 11),
    ("httpbin-groups", 12),
    ("httpbin-get", 13),
    (SLEEP, 20),
    (STRANGER, 21),
];

pub fn run() -> Result<()> {
    setup::run()?;
    if !system::is_root()? {
        bail!("the demo builds network namespaces and loads kernel programs: run it as root");
    }
    let root = workspace_root()?;
    let path = system::path_with_cargo_bin()?;
    let mut build = Command::new("cargo");
    build
        .args(["build", "--workspace"])
        .env("PATH", &path)
        .current_dir(&root);
    println!("==> {}", system::describe(&build));
    system::run(&mut build)?;
    let target = target_dir(&root).join("debug");
    let (nodeward, pod_server) = (target.join("nodeward"), target.join("nw-pod-server"));

    let bpffs_before = system::bpffs_mounted(system::BPFFS);
    let (mut node, pods) = demo_node(&pod_server);
    let netns_dir = node.netns_dir().to_owned();
    // The demo node's processes share a cgroup v2 of their own: the agent's fast path
    // (`sock_ops`, on by default) attaches there, not to this machine's root cgroup.
    let cgroup = node.use_cgroup();
    let pin_dir = "/sys/fs/bpf/nodeward-demo";
    let node_ns = node.netns.clone();
    let agent = start_agent(&mut node, &root, &target, pin_dir, &netns_dir, &cgroup)?;
    wait_ready(&node)?;

    println!("\nIstio's reference scenarios: real requests from client pods to the Services, steered by the kernel in each pod to the agent:\n");
    println!(
        "{:<26} {:<36} {:>8} {:>4}  answer",
        "scenario", "request", "expected", "got"
    );
    let mut failed = scenarios(&node, &pods, &root)?;
    println!("\n{} passed, {failed} failed", SCENARIOS.len() - failed);
    println!("\n==> nodeward status (in the node namespace)\n");
    let status = node.exec(
        &node_ns,
        &[
            nodeward.to_str().context("binary path is not UTF-8")?,
            "status",
        ],
    );
    print!("{}", String::from_utf8_lossy(&status.stdout));
    let code = node.terminate(agent, Duration::from_secs(25));
    println!("\nagent stopped with SIGTERM (exit {code:?}); its programs stay in the pods, enforcing --failure-mode closed until the next agent");
    let (status, _) = ask(&node, &pods, &SCENARIOS[0], &root)?;
    println!(
        "  {} while no agent runs: {}",
        SCENARIOS[0].request,
        describe(status, "")
    );
    println!("==> nodeward uninstall --bpf-pin-dir {pin_dir}");
    let uninstall = node.exec(
        &node_ns,
        &[
            nodeward.to_str().context("binary path is not UTF-8")?,
            "uninstall",
            "--bpf-pin-dir",
            pin_dir,
        ],
    );
    print!("{}", String::from_utf8_lossy(&uninstall.stdout));
    println!("removing the demo node");
    drop(node);
    if Path::new(pin_dir).exists() {
        bail!("uninstall left pins in {pin_dir}");
    }
    if !uninstall.status.success() {
        bail!(
            "nodeward uninstall failed: {}",
            String::from_utf8_lossy(&uninstall.stderr)
        );
    }
    if status != 0 {
        failed += 1;
        println!("  <-- a request got an answer while no agent ran (failure mode closed)");
    }
    system::unmount_bpffs_we_caused(bpffs_before);
    if failed > 0 {
        bail!("{failed} scenario(s) did not get Istio's answer");
    }
    Ok(())
}

/// Starts the CUSTOM task's external authorizer and the agent in the node namespace; returns
/// the agent's pid.
fn start_agent(
    node: &mut TestNode,
    root: &Path,
    target: &Path,
    pin_dir: &str,
    netns_dir: &Path,
    cgroup: &Path,
) -> Result<u32> {
    let utf8 = |p: &Path| -> Result<String> {
        p.to_str()
            .map(str::to_owned)
            .with_context(|| format!("{} is not UTF-8", p.display()))
    };
    let node_ns = node.netns.clone();
    println!("==> nw-ext-authz --http 127.0.0.1:8000 --grpc 127.0.0.1:9000 (in the node namespace: the external authorizer of Istio's CUSTOM task, answering as its ext-authz sample)");
    node.spawn(
        &node_ns,
        &target.join("nw-ext-authz"),
        &["--http", "127.0.0.1:8000", "--grpc", "127.0.0.1:9000"],
    );
    println!("==> nodeward run --policies examples/policies --policies examples/custom/policy.yaml --workloads examples/workloads.yaml --mesh-config examples/custom/mesh-config.yaml (in the node namespace, in-pod steering and the fast path; --netns-dir: the demo pods' namespaces, --cgroup: the node's own)");
    let args = [
        "run".to_owned(),
        "--policies".into(),
        utf8(&root.join("examples/policies"))?,
        "--policies".into(),
        utf8(&root.join("examples/custom/policy.yaml"))?,
        "--mesh-config".into(),
        utf8(&root.join("examples/custom/mesh-config.yaml"))?,
        "--workloads".into(),
        utf8(&root.join("examples/workloads.yaml"))?,
        "--bpf-pin-dir".into(),
        pin_dir.into(),
        "--netns-dir".into(),
        utf8(netns_dir)?,
        "--cgroup".into(),
        utf8(cgroup)?,
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(node.spawn(&node_ns, &target.join("nodeward"), &args))
}

/// The demo node: a pod per entry of [`PODS`], servers on 8000 with a Service each (ClusterIP
/// `10.96.0.<n>:8000`, kube-proxy's iptables rules).
fn demo_node(pod_server: &Path) -> (TestNode, Vec<Pod>) {
    println!("==> building the demo node: a node namespace and pods on veths (10.200.0.0/24), a Service per server (kube-proxy iptables rules, 10.96.0.0/16)");
    let mut node = TestNode::new("demo");
    let mut pods = Vec::new();
    let mut services = Vec::new();
    for (name, index) in PODS {
        let pod = node.add_pod(name, pod_ip(*index));
        if ![SLEEP, STRANGER].contains(name) {
            node.spawn(&pod.netns, pod_server, &[&format!("{}:8000", pod.ip)]);
            services.push(Service::new(
                &format!("foo/{name}:http"),
                service_ip(*index),
                8000,
                8000,
                &[&pod],
            ));
        }
        pods.push(pod);
    }
    install_services(&node, ProxyMode::Iptables, &services);
    (node, pods)
}

/// Runs and prints every scenario; how many did not get Istio's answer.
fn scenarios(node: &TestNode, pods: &[Pod], root: &Path) -> Result<usize> {
    let mut failed = 0;
    for sc in SCENARIOS {
        let (status, body) = ask(node, pods, sc, root)?;
        let answer = describe(status, &body);
        let mark = if status == sc.expected {
            ""
        } else {
            "  <-- MISMATCH"
        };
        if !mark.is_empty() {
            failed += 1;
        }
        println!(
            "{:<26} {:<36} {:>8} {status:>4}  {answer}{mark}",
            sc.name, sc.request, sc.expected
        );
    }
    Ok(failed)
}

fn ask(node: &TestNode, pods: &[Pod], sc: &Scenario, root: &Path) -> Result<(u16, String)> {
    let pod = |name: &str| pods.iter().find(|p| p.name == name).context("demo pod");
    let (from, to) = (pod(sc.from)?, pod(sc.to)?);
    let token = match sc.token {
        None | Some(Token::Header(_)) => None,
        Some(Token::Text(text)) => Some(text.to_owned()),
        Some(Token::File(file)) => {
            let path = root.join("testdata/istio-samples").join(file);
            Some(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_owned(),
            )
        }
    };
    let header = match sc.token {
        Some(Token::Header(line)) => Some(line.to_owned()),
        _ => token.map(|t| format!("Authorization: Bearer {t}")),
    };
    let headers: Vec<&str> = header.iter().map(String::as_str).collect();
    // The pod's Service (ClusterIP 10.96.0.<n>, as the demo installs them), as Istio's tasks
    // call `httpbin.foo:8000`. --path-as-is: the request carries the path as written; the agent
    // normalizes it.
    let [_, _, _, index] = to.ip.octets();
    let url = format!("http://{}:8000{}", service_ip(index), sc.path);
    let mut args = vec![
        "curl",
        "-s",
        "--path-as-is",
        "-m",
        "5",
        "-X",
        sc.method,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        url.as_str(),
    ];
    for h in &headers {
        args.extend(["-H", h]);
    }
    let out = node.exec(&from.netns, &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

/// What answered: the pod (with what it received) or the agent (with its body).
fn describe(status: u16, body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(seen) => format!(
            "pod answered; it received {} {}{}",
            seen["method"].as_str().unwrap_or("?"),
            seen["uri"].as_str().unwrap_or("?"),
            // What an allowing external authorizer added to the request.
            seen["headers"]["x-ext-authz-check-result"]
                .as_str()
                .map(|v| format!(" with x-ext-authz-check-result: {v}"))
                .unwrap_or_default()
        ),
        Err(_) if status == 0 => "no answer".into(),
        Err(_) => format!("agent: {}", body.trim()),
    }
}

/// Waits (at most 30 s) for the agent's /readyz in the node namespace.
fn wait_ready(node: &TestNode) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
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
        if String::from_utf8_lossy(&out.stdout) == "200" {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("the agent did not become ready within 30 s")
}

fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}
