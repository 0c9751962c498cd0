//! `cargo xtask kind`: deploy/README.md's quick start, end to end, on a kind cluster.
//!
//! 1. checks that a Docker daemon answers and that `kind` and `kubectl` exist — before doing
//!    anything, and naming everything that is missing;
//! 2. creates the cluster of deploy/kind-config.yaml (kept when it exists), makes sure every
//!    node has a BPF filesystem at /sys/fs/bpf;
//! 3. builds the image (deploy/Dockerfile, the tag deploy/agent/kustomization.yaml deploys) and
//!    loads it into the nodes with `kind load docker-image`;
//! 4. `kubectl apply -k deploy/`, waits for the `DaemonSet`; applies `deploy/examples` and waits for
//!    its pods;
//! 5. runs Istio's reference scenarios with `kubectl exec` + curl from the `sleep` pod to each
//!    httpbin pod's IP, and compares each status with Istio's;
//! 6. uninstalls (`kubectl delete -k`, then `nodeward uninstall` on each node) and checks that
//!    no node kept the agent's pins; deletes
//!    the cluster unless `--keep`.
//!
//! Where Docker or kind are missing (these development machines: a docker CLI without a
//! daemon, no kind) it fails at step 1 and changes nothing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::system::{output, run as run_cmd};

/// `name` in deploy/kind-config.yaml.
const CLUSTER: &str = "nodeward";
/// The kubeconfig context kind creates for it.
const CONTEXT: &str = "kind-nodeward";
/// Where the agent pins (`NODEWARD_BPF_PIN_DIR` in `deploy/agent/configmap.yaml`).
const PIN_DIR: &str = "/sys/fs/bpf/nodeward";
/// Port of the sample httpbin Services (deploy/examples/workloads.yaml).
const SERVICE_PORT: u16 = 8000;
/// Bound on every wait for the cluster.
const WAIT: &str = "300s";

/// One reference scenario: the httpbin pod asked (by its `app` label), the request, the token
/// (a file of testdata/istio-samples or literal text) and the status Istio answers.
struct Scenario {
    name: &'static str,
    app: &'static str,
    method: &'static str,
    path: &'static str,
    token: Option<&'static str>,
    expected: u16,
}

const fn s(
    name: &'static str,
    (app, method, path): (&'static str, &'static str, &'static str),
    token: Option<&'static str>,
    expected: u16,
) -> Scenario {
    Scenario {
        name,
        app,
        method,
        path,
        token,
        expected,
    }
}

/// The demo's scenarios (xtask/src/demo.rs) as they run on a cluster: every request comes from
/// foo/sleep.
const SCENARIOS: &[Scenario] = &[
    s("authn: no token", ("httpbin", "GET", "/ip"), None, 200),
    s(
        "authn: garbage token",
        ("httpbin", "GET", "/ip"),
        Some("text:garbage"),
        401,
    ),
    s(
        "authn: demo.jwt",
        ("httpbin", "GET", "/ip"),
        Some("demo.jwt"),
        200,
    ),
    s(
        "require-jwt: no token",
        ("httpbin-jwt", "GET", "/headers"),
        None,
        403,
    ),
    s(
        "require-jwt: demo.jwt",
        ("httpbin-jwt", "GET", "/headers"),
        Some("demo.jwt"),
        200,
    ),
    s(
        "require-group: groups-scope.jwt",
        ("httpbin-groups", "GET", "/headers"),
        Some("groups-scope.jwt"),
        200,
    ),
    s(
        "require-group: demo.jwt (no groups)",
        ("httpbin-groups", "GET", "/headers"),
        Some("demo.jwt"),
        403,
    ),
    s(
        "get-only: GET from foo/sleep",
        ("httpbin-get", "GET", "/get"),
        None,
        200,
    ),
    s(
        "get-only: POST from foo/sleep",
        ("httpbin-get", "POST", "/post"),
        None,
        403,
    ),
    s(
        "deny-admin: GET /public/../admin",
        ("httpbin-get", "GET", "/public/../admin"),
        None,
        403,
    ),
];

pub fn run(keep: bool) -> Result<()> {
    check_tools()?;
    let root = workspace_root()?;
    let image = image(&root)?;
    quick_start(&root, &image, keep).with_context(|| {
        format!(
            "`cargo xtask kind` stopped; the kind cluster `{CLUSTER}` (if created) is left as it is \
             for inspection: `kind delete cluster --name {CLUSTER}` removes it"
        )
    })
}

fn quick_start(root: &Path, image: &str, keep: bool) -> Result<()> {
    if cluster_exists()? {
        println!("==> kind cluster `{CLUSTER}` exists: using it");
    } else {
        println!("==> creating kind cluster `{CLUSTER}`");
        run_cmd(
            Command::new("kind")
                .args(["create", "cluster", "--config"])
                .arg(root.join("deploy/kind-config.yaml")),
        )?;
    }
    mount_bpffs_on_nodes()?;

    println!("==> building {image}");
    run_cmd(
        Command::new("docker")
            .args(["build", "-f", "deploy/Dockerfile", "-t", image, "."])
            .current_dir(root),
    )?;
    run_cmd(Command::new("kind").args(["load", "docker-image", image, "--name", CLUSTER]))?;

    // The root namespace, before the agent: its Role for ConfigMap `istio` lives there and the
    // examples' mesh-wide policy too; removed again at the end only if this run created it.
    let created_root_namespace =
        output(kubectl(root).args(["get", "namespace", "istio-system", "-o", "name"])).is_err();
    if created_root_namespace {
        run_cmd(kubectl(root).args(["create", "namespace", "istio-system"]))?;
    }
    println!("==> installing nodeward (kubectl apply -k deploy/)");
    run_cmd(kubectl(root).args(["apply", "-k", "deploy/"]))?;
    run_cmd(kubectl(root).args([
        "rollout",
        "status",
        "daemonset/nodeward",
        "-n",
        "nodeward-system",
        &format!("--timeout={WAIT}"),
    ]))?;

    println!("==> sample workloads and policies (deploy/examples)");
    run_cmd(kubectl(root).args(["apply", "-k", "deploy/examples"]))?;
    run_cmd(kubectl(root).args([
        "wait",
        "--for=condition=Available",
        "deployment",
        "--all",
        "-n",
        "foo",
        &format!("--timeout={WAIT}"),
    ]))?;

    let failures = scenarios(root)?;

    println!("==> uninstalling");
    run_cmd(kubectl(root).args(["delete", "-k", "deploy/examples", "--wait=true"]))?;
    run_cmd(kubectl(root).args(["delete", "-k", "deploy/", "--wait=true"]))?;
    if created_root_namespace {
        run_cmd(kubectl(root).args(["delete", "namespace", "istio-system", "--wait=true"]))?;
    }
    // A stopped agent leaves its programs in the pods on purpose (a rollout must not open a
    // gap); `nodeward uninstall` on each node removes them, as deploy/README.md says.
    uninstall_on_nodes(image)?;
    let leftovers = pins_left_on_nodes()?;
    if keep {
        println!("==> cluster `{CLUSTER}` kept (--keep); `kind delete cluster --name {CLUSTER}` removes it");
    } else {
        run_cmd(Command::new("kind").args(["delete", "cluster", "--name", CLUSTER]))?;
    }
    if !leftovers.is_empty() {
        bail!(
            "after uninstalling, nodes still hold {PIN_DIR}: {} (`nodeward uninstall` did not remove it)",
            leftovers.join(", ")
        );
    }
    if failures > 0 {
        bail!(
            "{failures} of {} scenarios did not answer as Istio does",
            SCENARIOS.len()
        );
    }
    println!(
        "==> all {} scenarios answered as Istio does; uninstall left nothing behind",
        SCENARIOS.len()
    );
    Ok(())
}

/// Fails, before anything is changed, naming every missing tool or daemon.
fn check_tools() -> Result<()> {
    let mut missing = Vec::new();
    match Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
    {
        Err(e) => missing.push(format!("the `docker` CLI ({e})")),
        Ok(out) if !out.status.success() => missing.push(format!(
            "a Docker daemon: `docker version` reached none ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => {}
    }
    for (tool, args) in [
        ("kind", ["version"].as_slice()),
        ("kubectl", ["version", "--client"].as_slice()),
    ] {
        if let Err(e) = Command::new(tool).args(args).output() {
            missing.push(format!("`{tool}` ({e})"));
        }
    }
    if !missing.is_empty() {
        bail!(
            "`cargo xtask kind` needs a running Docker daemon, kind and kubectl; missing: {}. \
             Nothing was changed. Install Docker (and start it), kind \
             (https://kind.sigs.k8s.io) and kubectl, then run it again.",
            missing.join("; ")
        );
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask/ has no parent directory")
}

/// The image the kustomization deploys: `images[0]` of deploy/agent/kustomization.yaml.
fn image(root: &Path) -> Result<String> {
    let path = root.join("deploy/agent/kustomization.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    let entry = doc
        .get("images")
        .and_then(|images| images.get(0))
        .with_context(|| format!("{} has no images entry", path.display()))?;
    let field = |name: &str| entry.get(name).and_then(serde_yaml::Value::as_str);
    let name = field("newName")
        .or_else(|| field("name"))
        .with_context(|| format!("images[0] of {} has no name", path.display()))?;
    let tag = field("newTag").unwrap_or("latest");
    Ok(format!("{name}:{tag}"))
}

fn cluster_exists() -> Result<bool> {
    let clusters = output(Command::new("kind").args(["get", "clusters"]))?;
    Ok(clusters.lines().any(|line| line.trim() == CLUSTER))
}

fn nodes() -> Result<Vec<String>> {
    let nodes = output(Command::new("kind").args(["get", "nodes", "--name", CLUSTER]))?;
    Ok(nodes
        .lines()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .collect())
}

/// The agent mounts nothing: each node must have a bpffs at /sys/fs/bpf (systemd in kind's
/// nodes mounts one; this makes sure).
fn mount_bpffs_on_nodes() -> Result<()> {
    for node in nodes()? {
        run_cmd(Command::new("docker").args([
            "exec",
            &node,
            "sh",
            "-c",
            "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        ]))?;
    }
    Ok(())
}

/// Runs `nodeward uninstall` on every node, with the binary of the image (copied out of it).
fn uninstall_on_nodes(image: &str) -> Result<()> {
    let container = output(Command::new("docker").args(["create", image]))?;
    let container = container.trim();
    let copied = run_cmd(Command::new("docker").args([
        "cp",
        &format!("{container}:/usr/local/bin/nodeward"),
        "target/kind-nodeward",
    ]));
    run_cmd(Command::new("docker").args(["rm", container]))?;
    copied?;
    for node in nodes()? {
        run_cmd(Command::new("docker").args([
            "cp",
            "target/kind-nodeward",
            &format!("{node}:/usr/local/bin/nodeward"),
        ]))?;
        run_cmd(Command::new("docker").args([
            "exec",
            &node,
            "nodeward",
            "uninstall",
            "--bpf-pin-dir",
            PIN_DIR,
        ]))?;
    }
    Ok(())
}

/// Nodes on which the agent's pin directory still exists.
fn pins_left_on_nodes() -> Result<Vec<String>> {
    let mut left = Vec::new();
    for node in nodes()? {
        let status = Command::new("docker")
            .args(["exec", &node, "test", "-e", PIN_DIR])
            .status()
            .context("running `docker exec`")?;
        if status.success() {
            left.push(node);
        }
    }
    Ok(left)
}

fn kubectl(root: &Path) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.args(["--context", CONTEXT]).current_dir(root);
    cmd
}

/// Runs every scenario (retrying for up to 30 s while the agent picks up the policies) and
/// prints one row each; returns how many did not match.
fn scenarios(root: &Path) -> Result<usize> {
    let samples = root.join("testdata/istio-samples");
    let mut failures = 0;
    println!(
        "{:<40} {:<32} {:>8} {:>4}",
        "scenario", "request", "expected", "got"
    );
    for sc in SCENARIOS {
        let token = match sc.token {
            None => None,
            Some(text) if text.starts_with("text:") => Some(text["text:".len()..].to_owned()),
            Some(file) => Some(
                std::fs::read_to_string(samples.join(file))
                    .with_context(|| format!("reading testdata/istio-samples/{file}"))?
                    .trim()
                    .to_owned(),
            ),
        };
        // Through the app's Service, as Istio's tasks call `httpbin.foo:8000`.
        let url = format!("http://{}.foo:{SERVICE_PORT}{}", sc.app, sc.path);
        let deadline = Instant::now() + Duration::from_secs(30);
        let got = loop {
            let got = ask(root, sc.method, &url, token.as_deref())?;
            if got == sc.expected || Instant::now() >= deadline {
                break got;
            }
            std::thread::sleep(Duration::from_secs(1));
        };
        let mark = if got == sc.expected {
            ""
        } else {
            "  <-- differs"
        };
        if got != sc.expected {
            failures += 1;
        }
        println!(
            "{:<40} {:<32} {:>8} {:>4}{mark}",
            sc.name,
            format!("{} {} ({})", sc.method, sc.path, sc.app),
            sc.expected,
            got
        );
    }
    Ok(failures)
}

/// `curl` from foo/sleep: the status, 0 when no answer came within 5 s.
fn ask(root: &Path, method: &str, url: &str, token: Option<&str>) -> Result<u16> {
    let mut cmd = kubectl(root);
    cmd.args([
        "exec",
        "-n",
        "foo",
        "deploy/sleep",
        "--",
        "curl",
        "-s",
        "-m",
        "5",
    ])
    // The request carries the path as written; the agent normalizes it.
    .args([
        "--path-as-is",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        method,
    ]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    cmd.arg(url);
    // curl exits non-zero when no answer came; its printed code is then 000.
    let out = cmd.output().context("running `kubectl exec`")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}
