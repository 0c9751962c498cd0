//! `cargo xtask demo`: the README's main job. Sets up, builds the agent, starts it in
//! standalone mode on the examples (`nodeward run --policies examples/policies --workloads
//! examples/workloads.yaml`), and shows Istio's reference scenarios decided by the running
//! agent (`nodeward check --admin`: its live state, its JWKS, its token cache), then its
//! `nodeward status`, then stops it with SIGTERM.
//!
//! Until the kernel data path lands (issue 5), the scenarios are asked through the admin API;
//! the same table will then come from real HTTP through the steered data path.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _, Result};

use crate::{setup, system};

const SLEEP: &str = "cluster.local/ns/foo/sa/sleep";

/// One row: what is asked and the status Istio answers.
struct Scenario {
    name: &'static str,
    request: &'static str,
    args: &'static [&'static str],
    /// A token sent as `Authorization: Bearer`: Istio's sample token file, or literal text.
    token: Option<Token>,
    expected: u16,
}

#[derive(Clone, Copy)]
enum Token {
    File(&'static str),
    Text(&'static str),
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "authn: jwt-example",
        request: "GET /, no token",
        args: &["--labels", "app=httpbin"],
        token: None,
        expected: 200,
    },
    Scenario {
        name: "authn: jwt-example",
        request: "GET /, garbage token",
        args: &["--labels", "app=httpbin"],
        token: Some(Token::Text("garbage")),
        expected: 401,
    },
    Scenario {
        name: "authn: jwt-example",
        request: "GET /, demo.jwt",
        args: &["--labels", "app=httpbin"],
        token: Some(Token::File("demo.jwt")),
        expected: 200,
    },
    Scenario {
        name: "authz-jwt: require-jwt",
        request: "GET /, no token",
        args: &["--labels", "app=httpbin-jwt"],
        token: None,
        expected: 403,
    },
    Scenario {
        name: "authz-jwt: require-jwt",
        request: "GET /, demo.jwt",
        args: &["--labels", "app=httpbin-jwt"],
        token: Some(Token::File("demo.jwt")),
        expected: 200,
    },
    Scenario {
        name: "authz-jwt: require-group",
        request: "GET /, groups-scope.jwt",
        args: &["--labels", "app=httpbin-groups"],
        token: Some(Token::File("groups-scope.jwt")),
        expected: 200,
    },
    Scenario {
        name: "authz-jwt: require-group",
        request: "GET /, demo.jwt (no groups)",
        args: &["--labels", "app=httpbin-groups"],
        token: Some(Token::File("demo.jwt")),
        expected: 403,
    },
    Scenario {
        name: "authz-jwt: require-group",
        request: "GET /, no token",
        args: &["--labels", "app=httpbin-groups"],
        token: None,
        expected: 403,
    },
    Scenario {
        name: "authz-http: get-only",
        request: "GET / from foo/sleep",
        args: &["--labels", "app=httpbin-get", "--source-principal", SLEEP],
        token: None,
        expected: 200,
    },
    Scenario {
        name: "authz-http: get-only",
        request: "POST / from foo/sleep",
        args: &[
            "--labels",
            "app=httpbin-get",
            "--source-principal",
            SLEEP,
            "--method",
            "POST",
        ],
        token: None,
        expected: 403,
    },
    Scenario {
        name: "authz-http: get-only",
        request: "GET / from an unknown source",
        args: &["--labels", "app=httpbin-get", "--source-ip", "10.9.9.9"],
        token: None,
        expected: 403,
    },
    Scenario {
        name: "mesh-wide deny-admin",
        request: "GET /public/../admin from foo/sleep",
        args: &[
            "--labels",
            "app=httpbin-get",
            "--source-principal",
            SLEEP,
            "--path",
            "/public/../admin",
        ],
        token: None,
        expected: 403,
    },
];

#[expect(clippy::too_many_lines, reason = "the demo's script, step by step")]
pub fn run() -> Result<()> {
    setup::run()?;
    let root = workspace_root()?;
    let path = system::path_with_cargo_bin()?;
    let mut build = Command::new("cargo");
    build
        .args(["build", "-p", "nodeward"])
        .env("PATH", &path)
        .current_dir(&root);
    println!("==> {}", system::describe(&build));
    system::run(&mut build)?;
    let bin = target_dir(&root).join("debug").join("nodeward");

    let admin = format!("127.0.0.1:{}", free_port()?);
    let listen = format!("127.0.0.1:{}", free_port()?);
    println!("==> nodeward run --policies examples/policies --workloads examples/workloads.yaml --admin {admin} --listen {listen} --datapath off");
    let agent = Agent(
        Command::new(&bin)
            .args([
                "run",
                "--policies",
                "examples/policies",
                "--workloads",
                "examples/workloads.yaml",
            ])
            .args(["--admin", &admin, "--listen", &listen])
            // This demo runs in the machine's own namespace: no kernel programs here.
            .args(["--datapath", "off"])
            .current_dir(&root)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting nodeward run (needs root: the listener is IP_TRANSPARENT)")?,
    );
    wait_ready(&bin, &admin)?;

    println!("\nIstio's reference scenarios (examples/policies), decided by the running agent (`nodeward check --admin {admin}`):\n");
    println!(
        "{:<26} {:<36} {:>8} {:>4}  decided by",
        "scenario", "request", "expected", "got"
    );
    let mut failed = 0;
    for s in SCENARIOS {
        let mut cmd = Command::new(&bin);
        cmd.args([
            "check",
            "--admin",
            &admin,
            "--namespace",
            "foo",
            "--output",
            "json",
        ])
        .args(s.args)
        .current_dir(&root);
        if let Some(token) = s.token {
            let token = match token {
                Token::Text(text) => text.to_owned(),
                Token::File(file) => {
                    let path = root.join("testdata/istio-samples").join(file);
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?
                        .trim()
                        .to_owned()
                }
            };
            cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
        }
        let out = cmd
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "nodeward check gave no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        let got = json["status"].as_u64().unwrap_or_default();
        let by = json["policy"].as_str().map(str::to_owned).or_else(|| {
            json["authn"]["error"]
                .as_str()
                .map(|_| format!("authn: {}", json["body"].as_str().unwrap_or_default()))
        });
        let by = by.as_deref().unwrap_or("-");
        let mark = if got == u64::from(s.expected) {
            ""
        } else {
            "  <-- MISMATCH"
        };
        if !mark.is_empty() {
            failed += 1;
        }
        println!(
            "{:<26} {:<36} {:>8} {:>4}  {by}{mark}",
            s.name, s.request, s.expected, got
        );
    }
    println!("\n{} passed, {failed} failed", SCENARIOS.len() - failed);
    println!("\n==> nodeward status --admin {admin}\n");
    let mut status = Command::new(&bin);
    status
        .args(["status", "--admin", &admin])
        .current_dir(&root);
    let _ = status.status();
    agent.stop();
    println!("Explain any row with the same files: target/debug/nodeward check --policies examples/policies --namespace foo <args>");
    if failed > 0 {
        bail!("{failed} scenario(s) did not get Istio's answer");
    }
    Ok(())
}

/// The agent process: SIGTERM on `stop`, killed if the demo fails before.
struct Agent(std::process::Child);

impl Agent {
    fn stop(mut self) {
        let pid = self.0.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let _ = self.0.wait();
        println!("\nagent stopped (SIGTERM)");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Waits (at most 15 s) for `nodeward status` to report the agent ready.
fn wait_ready(bin: &Path, admin: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        let ok = Command::new(bin)
            .args(["status", "--admin", admin])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    bail!("the agent did not become ready on {admin} within 15 s; run it by hand to see why: target/debug/nodeward run --policies examples/policies --workloads examples/workloads.yaml --admin {admin}")
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
