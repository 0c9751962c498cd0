//! `nodeward run`, the real binary, as an operator meets it: the admin endpoints, readiness
//! that waits for JWKS, `nodeward status`, `nodeward check --admin` against the file-based
//! check on Istio's reference scenarios (examples/), hot reload and bad edits, and SIGTERM.
//!
//! Each test starts its own agent (the test kit's agent harness) on loopback ports with copies
//! of `examples/` in a temporary directory; guards stop the agent and remove the directory on
//! drop, also on panic. The
//! enforcer's transparent listener needs `CAP_NET_ADMIN` (root): without it the agent exits 1
//! saying so, and the tests fail with its log.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nodeward_tests::agent::{Agent, Response};
use nodeward_tests::{eventually, free_port, repo_root, TempDir};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nodeward");
const SLEEP: &str = "cluster.local/ns/foo/sa/sleep";
const SLEEP_IP: &str = "10.200.0.20";
const HTTPBIN_GET_IP: &str = "10.200.0.13";
/// The modulus of Istio's sample key (testdata/istio-samples/jwks.json): key material.
const MODULUS_PREFIX: &str = "xAE7eB6qugXyCAG3yhh7pkDkT65pHymX";

fn repo() -> PathBuf {
    repo_root()
}

fn token(file: &str) -> String {
    let path = repo().join("testdata/istio-samples").join(file);
    fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// One HTTP/1.1 exchange with `Connection: close`; `None` when nothing answers.
fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<Response> {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    nodeward_tests::agent::http(addr, method, path, body)
}

/// Runs `nodeward` with `args`.
fn nodeward(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {BIN}: {e}"))
}

fn exit_code(out: &Output) -> i32 {
    out.status.code().expect("an exit code, not a signal")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A running `nodeward run` with copies of `examples/` (the kit's [`Agent`], which it derefs
/// to). Fields drop in order: the agent (stopped), then its directory.
struct Daemon {
    agent: Agent,
    dir: TempDir,
    admin: String,
    listen: String,
}

impl Daemon {
    /// Starts an agent; `setup` may add files to the policies directory first.
    fn start(extra: &[&str], setup: impl FnOnce(&Path)) -> Self {
        let dir = TempDir::new("run");
        let policies = dir.join("policies");
        fs::create_dir_all(&policies).expect("temporary directory");
        let examples = repo().join("examples");
        for entry in fs::read_dir(examples.join("policies")).expect("examples/policies") {
            let entry = entry.expect("directory entry");
            fs::copy(entry.path(), policies.join(entry.file_name())).expect("copy a policy");
        }
        fs::copy(examples.join("workloads.yaml"), dir.join("workloads.yaml"))
            .expect("copy examples/workloads.yaml");
        setup(&policies);

        let admin = format!("127.0.0.1:{}", free_port());
        let listen = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .arg("--policies")
            .arg(&policies)
            .arg("--workloads")
            .arg(dir.join("workloads.yaml"))
            .args(["--listen", &listen, "--admin", &admin])
            // On loopback in the machine's own namespace: never attach kernel programs here
            // (the namespace end-to-end tests run the data path).
            .args(["--datapath", "off"])
            .args(extra)
            .env("NODEWARD_LOG", "info");
        let mut agent = Agent::spawn(
            command,
            admin.parse().expect("admin address"),
            None,
            &dir.join("agent.log"),
        );
        agent.wait_healthy(Duration::from_secs(10));
        Self {
            agent,
            dir,
            admin,
            listen,
        }
    }

    fn policies(&self) -> PathBuf {
        self.dir.join("policies")
    }

    /// `nodeward check --admin` with `args`, JSON output: (exit code, JSON, raw stdout).
    fn check(&self, args: &[&str]) -> (i32, Value, String) {
        let mut all = vec!["check", "--admin", &self.admin, "--output", "json"];
        all.extend_from_slice(args);
        parse_check(&nodeward(&all))
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

fn parse_check(out: &Output) -> (i32, Value, String) {
    let text = stdout(out);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "check printed no JSON ({e}): {text}\nstderr: {}",
            stderr(out)
        )
    });
    (exit_code(out), json, text)
}

/// A JWKS server on loopback: serves Istio's sample JWKS, or (`silent`) accepts connections
/// and never answers. Lives until the test process ends.
fn jwks_server(silent: bool) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the JWKS server");
    let addr = listener.local_addr().expect("address");
    let jwks =
        fs::read_to_string(repo().join("testdata/istio-samples/jwks.json")).expect("jwks.json");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if silent {
                held.push(stream);
                continue;
            }
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{jwks}",
                jwks.len()
            );
            let _ = stream.shutdown(Shutdown::Both);
        }
    });
    format!("http://{addr}/jwks.json")
}

/// `/debug/state` of the examples: the registry, the policies, the issuer and its key id, and
/// no key material or token (`secret` is one that went through the agent).
fn assert_state_shows_no_secrets(agent: &Daemon, secret: &str) {
    let state = agent.state();
    let text = state.to_string();
    assert_eq!(state["generation"], 1);
    assert_eq!(state["ready"], true);
    assert_eq!(state["config"]["failure_mode"], "closed");
    assert_eq!(state["config"]["listen"], agent.listen.as_str());
    let workloads: Vec<&str> = state["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .filter_map(|w| w["id"].as_str())
        .collect();
    assert_eq!(
        workloads,
        [
            "foo/httpbin",
            "foo/httpbin-get",
            "foo/httpbin-groups",
            "foo/httpbin-jwt",
            "foo/sleep"
        ]
    );
    let get = &state["workloads"][1];
    assert_eq!(
        (&get["ip"], &get["serviceAccount"], &get["protected"]),
        (
            &Value::from(HTTPBIN_GET_IP),
            &Value::from("httpbin"),
            &Value::from(true)
        )
    );
    assert_eq!(
        get["policies"]["allow"],
        serde_json::json!(["foo/get-only"])
    );
    assert_eq!(
        get["policies"]["deny"],
        serde_json::json!(["istio-system/deny-admin"])
    );
    assert_eq!(get["jwt_rules"], serde_json::json!(["foo/jwt-example[0]"]));
    let policies: Vec<&str> = state["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    assert_eq!(
        policies,
        [
            "foo/get-only",
            "foo/require-group",
            "foo/require-jwt",
            "istio-system/deny-admin"
        ]
    );
    assert_eq!(state["issuers"][0]["issuer"], "testing@secure.istio.io");
    assert_eq!(
        state["issuers"][0]["kids"],
        serde_json::json!(["DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ"])
    );
    for secret in [
        "\"k\"",
        "\"n\"",
        "\"d\"",
        "\"p\"",
        "\"q\"",
        MODULUS_PREFIX,
        &secret[..40],
    ] {
        assert!(
            !text.contains(secret),
            "/debug/state shows {secret}: {text}"
        );
    }
}

#[test]
fn admin_endpoints_serve_health_readiness_metrics_and_state() {
    let mut agent = Daemon::start(&[], |_| {});
    let (status, _, body) = agent.get("/healthz").expect("/healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    agent.wait_for("/readyz 200", Duration::from_secs(5), |d| {
        d.get("/readyz").is_some_and(|(status, _, _)| status == 200)
    });
    let (_, _, readyz) = agent.get("/readyz").expect("/readyz");
    for check in [
        "[+]config generation 1",
        "[+]jwks",
        "[+]listener",
        "[+]running",
    ] {
        assert!(readyz.contains(check), "{check} in:\n{readyz}");
    }

    // One real request through the enforcer: nothing is registered at the listener's own
    // address, so it fails closed with 503, and is counted and logged.
    let (status, _, body) = http(&agent.listen, "GET", "/probe", "").expect("the enforcer answers");
    assert_eq!(status, 503, "{body}");
    // A check carrying a real token: the token must not show up anywhere afterwards.
    let demo = token("demo.jwt");
    let (code, json, _) = agent.check(&[
        "--namespace",
        "foo",
        "--labels",
        "app=httpbin",
        "-H",
        &format!("Authorization: Bearer {demo}"),
    ]);
    assert_eq!((code, &json["status"]), (0, &Value::from(200)), "{json}");

    let (status, head, metrics) = agent.get("/metrics").expect("/metrics");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    for family in [
        "# TYPE nodeward_requests counter",
        "nodeward_requests_total{workload=\"-\",decision=\"deny\",code=\"503\",reason=\"unknown_destination\"} 1",
        "# TYPE nodeward_decision_seconds histogram",
        "nodeward_connections_open ",
        "nodeward_config_reloads_total{result=\"ok\"} 1",
        "nodeward_config_errors 0",
        "# TYPE nodeward_jwks_fetches counter",
        "# TYPE nodeward_refused counter",
        "# EOF",
    ] {
        assert!(metrics.contains(family), "{family} in:\n{metrics}");
    }

    assert_state_shows_no_secrets(&agent, &demo);

    // The access log: one line for the request, under its own target, without the token.
    let log = agent.log_with("path=/probe");
    let access = log
        .lines()
        .find(|l| l.contains(" access: ") && l.contains("path=/probe"))
        .unwrap_or_else(|| panic!("no access log line for /probe in:\n{log}"));
    for field in [
        "status=503",
        "decision=\"deny\"",
        "reason=unknown_destination",
        "latency_us=",
    ] {
        assert!(access.contains(field), "{field} in {access}");
    }
    assert!(!log.contains(&demo[..40]), "a token in the log:\n{log}");
}

#[test]
fn readiness_waits_for_jwks_and_counts_fetches() {
    let good = jwks_server(false);
    let silent = jwks_server(true);
    let mut agent = Daemon::start(&[], |policies| {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: remote, namespace: bar}}\nspec:\n  jwtRules:\n  - issuer: https://good.test\n    jwksUri: {good}\n  - issuer: https://silent.test\n    jwksUri: {silent}\n    timeout: 2s\n"
        );
        fs::write(policies.join("50-remote.yaml"), yaml).expect("write 50-remote.yaml");
    });
    // The silent source has not answered: not ready, and /readyz says which.
    let (status, _, body) = agent.get("/readyz").expect("/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!("[-]jwks waiting for the first answer of {silent}")),
        "{body}"
    );
    assert!(body.ends_with("not ready\n"), "{body}");
    // Its fetch times out after 2 s: a definitive answer, so ready (its tokens get 401).
    agent.wait_for(
        "/readyz 200 once the silent JWKS timed out",
        Duration::from_secs(6),
        |d| d.get("/readyz").is_some_and(|(status, _, _)| status == 200),
    );

    let state = agent.state();
    let issuer = |uri: &str| {
        state["issuers"]
            .as_array()
            .expect("issuers")
            .iter()
            .find(|i| i["source"] == uri)
            .unwrap_or_else(|| panic!("no issuer {uri} in {state}"))
            .clone()
    };
    let ok = issuer(&good);
    assert_eq!(
        (&ok["state"], &ok["issuer"]),
        (&"ready".into(), &"https://good.test".into())
    );
    assert_eq!(
        ok["kids"],
        serde_json::json!(["DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ"])
    );
    let failed = issuer(&silent);
    assert_eq!(failed["state"], "failed", "{failed}");
    assert!(
        failed["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{failed}"
    );
    assert!(
        !state.to_string().contains(MODULUS_PREFIX),
        "key material in /debug/state"
    );

    let (_, _, metrics) = agent.get("/metrics").expect("/metrics");
    for line in [
        format!("nodeward_jwks_fetches_total{{issuer=\"https://good.test\",uri=\"{good}\",result=\"ok\"}} 1"),
        format!("nodeward_jwks_fetches_total{{issuer=\"https://silent.test\",uri=\"{silent}\",result=\"error\"}} "),
        format!("nodeward_jwks_keys{{issuer=\"https://good.test\",uri=\"{good}\"}} 1"),
        format!("nodeward_jwks_age_seconds{{issuer=\"https://good.test\",uri=\"{good}\"}} "),
        format!("nodeward_jwks_source_state{{issuer=\"https://silent.test\",uri=\"{silent}\",state=\"failed\"}} 1"),
        format!("nodeward_jwks_source_state{{issuer=\"https://good.test\",uri=\"{good}\",state=\"ready\"}} 1"),
    ] {
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
}

/// One of Istio's reference scenarios (as `cargo xtask demo` runs them).
struct Scenario {
    name: &'static str,
    args: &'static [&'static str],
    token: Option<&'static str>,
    status: u16,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "jwt-example, no token",
        args: &["--labels", "app=httpbin"],
        token: None,
        status: 200,
    },
    Scenario {
        name: "jwt-example, garbage token",
        args: &["--labels", "app=httpbin"],
        token: Some("garbage"),
        status: 401,
    },
    Scenario {
        name: "jwt-example, demo.jwt",
        args: &["--labels", "app=httpbin"],
        token: Some("demo.jwt"),
        status: 200,
    },
    Scenario {
        name: "require-jwt, no token",
        args: &["--labels", "app=httpbin-jwt"],
        token: None,
        status: 403,
    },
    Scenario {
        name: "require-jwt, demo.jwt",
        args: &["--labels", "app=httpbin-jwt"],
        token: Some("demo.jwt"),
        status: 200,
    },
    Scenario {
        name: "require-group, groups-scope.jwt",
        args: &["--labels", "app=httpbin-groups"],
        token: Some("groups-scope.jwt"),
        status: 200,
    },
    Scenario {
        name: "require-group, demo.jwt",
        args: &["--labels", "app=httpbin-groups"],
        token: Some("demo.jwt"),
        status: 403,
    },
    Scenario {
        name: "require-group, no token",
        args: &["--labels", "app=httpbin-groups"],
        token: None,
        status: 403,
    },
    Scenario {
        name: "get-only, GET from sleep",
        args: &["--labels", "app=httpbin-get", "--source-principal", SLEEP],
        token: None,
        status: 200,
    },
    Scenario {
        name: "get-only, POST from sleep",
        args: &[
            "--labels",
            "app=httpbin-get",
            "--source-principal",
            SLEEP,
            "--method",
            "POST",
        ],
        token: None,
        status: 403,
    },
    Scenario {
        name: "get-only, unknown source",
        args: &["--labels", "app=httpbin-get", "--source-ip", "10.9.9.9"],
        token: None,
        status: 403,
    },
    Scenario {
        name: "deny-admin, /public/../admin",
        args: &[
            "--labels",
            "app=httpbin-get",
            "--source-principal",
            SLEEP,
            "--path",
            "/public/../admin",
        ],
        token: None,
        status: 403,
    },
];

#[test]
fn check_over_admin_decides_exactly_as_the_file_check() {
    let agent = Daemon::start(&[], |_| {});
    let policies = agent.policies();
    let policies = policies.to_str().expect("a UTF-8 path");
    for s in SCENARIOS {
        let header = s.token.map(|t| {
            let t = match t {
                "garbage" => t.to_owned(),
                file => token(file),
            };
            format!("Authorization: Bearer {t}")
        });
        for output in ["json", "text"] {
            let mut args = vec!["--namespace", "foo", "--output", output];
            args.extend_from_slice(s.args);
            if let Some(header) = &header {
                args.extend(["-H", header.as_str()]);
            }
            let mut live = vec!["check", "--admin", &agent.admin];
            live.extend(&args);
            let mut files = vec!["check", "--policies", policies];
            files.extend(&args);
            let (live, files) = (nodeward(&live), nodeward(&files));
            assert_eq!(
                (exit_code(&live), stdout(&live)),
                (exit_code(&files), stdout(&files)),
                "{}: --admin and --policies differ ({output}); stderr: {} / {}",
                s.name,
                stderr(&live),
                stderr(&files)
            );
            if output == "json" {
                let (code, json, _) = parse_check(&live);
                assert_eq!(json["status"], s.status, "{}: {json}", s.name);
                assert_eq!(code, i32::from(s.status != 200), "{}", s.name);
            }
        }
    }

    // The live state knows the registry: addresses stand for workloads and identities.
    let (code, json, _) = agent.check(&["--dest-ip", HTTPBIN_GET_IP, "--source-ip", SLEEP_IP]);
    assert_eq!(
        (code, &json["policy"]),
        (0, &"foo/get-only".into()),
        "{json}"
    );
    assert_eq!(json["source_principal"], SLEEP);
    assert_eq!(json["workload"]["labels"]["app"], "httpbin-get");
    let (code, json, _) = agent.check(&[
        "--dest-ip",
        HTTPBIN_GET_IP,
        "--source-ip",
        SLEEP_IP,
        "--method",
        "POST",
    ]);
    assert_eq!((code, &json["status"]), (1, &403.into()), "{json}");

    // Bad input is exit 2 with the agent's reason, as with files.
    let out = nodeward(&["check", "--admin", &agent.admin, "--dest-ip", "10.9.9.9"]);
    assert_eq!(exit_code(&out), 2);
    assert!(
        stderr(&out).contains("no workload at this address"),
        "{}",
        stderr(&out)
    );
    let out = nodeward(&[
        "check",
        "--admin",
        &agent.admin,
        "--namespace",
        "foo",
        "--claims",
        "[1]",
    ]);
    assert_eq!(
        (exit_code(&out), stderr(&out).trim()),
        (2, "error: --claims: not a JSON object: expected an object")
    );
    let out = nodeward(&[
        "check",
        "--admin",
        &agent.admin,
        "--policies",
        policies,
        "--namespace",
        "foo",
    ]);
    assert_eq!(exit_code(&out), 2, "--admin and --policies conflict");
}

#[test]
fn status_summarizes_the_live_state() {
    let agent = Daemon::start(&["--failure-mode", "open"], |_| {});
    // Some traffic to count.
    for _ in 0..2 {
        http(&agent.listen, "GET", "/", "").expect("the enforcer answers");
    }
    let out = nodeward(&["status", "--admin", &agent.admin]);
    let text = stdout(&out);
    assert_eq!(exit_code(&out), 0, "{text}{}", stderr(&out));
    for line in [
        &format!("agent:     {} READY", agent.admin),
        "[+]config generation 1",
        "config:    generation 1, loaded ",
        &format!("listen {}, steering in-pod, failure mode open, root namespace istio-system, trust domain cluster.local", agent.listen),
        "errors:    none",
        "workloads: 5 (5 protected)",
        "foo/httpbin-get          10.200.0.13     sa httpbin      protected   jwt foo/jwt-example[0]; DENY istio-system/deny-admin; ALLOW foo/get-only",
        "policies:  4",
        "testing@secure.istio.io  inline jwks (foo/jwt-example[0])  ready  kids DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ",
        "requests:  allow 0, deny 2; refused 0; open connections ",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("- ") && l.ends_with("allow 0, deny 2")),
        "requests of the unknown destination `-` in:\n{text}"
    );
    let out = nodeward(&["status", "--admin", &agent.admin, "--output", "json"]);
    let json: Value = serde_json::from_str(&stdout(&out)).expect("status --output json");
    assert_eq!(
        (&json["ready"], &json["counters"]["requests"]["deny"]),
        (&true.into(), &2.0.into())
    );
    assert_eq!(json["state"]["config"]["failure_mode"], "open");

    let nobody = format!("127.0.0.1:{}", free_port());
    let out = nodeward(&["status", "--admin", &nobody]);
    assert_eq!(exit_code(&out), 2);
    assert!(
        stderr(&out).contains(&format!(
            "no nodeward agent answers on {nobody} (is `nodeward run` running? --admin)"
        )),
        "{}",
        stderr(&out)
    );
}

#[test]
fn edits_apply_within_a_second_and_bad_edits_keep_the_last_good_state() {
    let mut agent = Daemon::start(&[], |_| {});
    let post = [
        "--namespace",
        "foo",
        "--labels",
        "app=httpbin-get",
        "--source-principal",
        SLEEP,
        "--method",
        "POST",
    ];
    assert_eq!(agent.check(&post).1["status"], 403);

    // Allow POST too: the agent answers differently within a second.
    let file = agent.policies().join("40-get-only.yaml");
    let original = fs::read_to_string(&file).expect("40-get-only.yaml");
    let edited = original.replace("methods: [\"GET\"]", "methods: [\"GET\", \"POST\"]");
    assert_ne!(
        edited, original,
        "the example's methods line changed; update this test"
    );
    let written = Instant::now();
    fs::write(&file, &edited).expect("edit the policy");
    assert!(
        eventually(Duration::from_secs(1), || agent.check(&post).1["status"]
            == 200),
        "the edit was not in force within 1 s (after {:?}); log:\n{}",
        written.elapsed(),
        agent.log()
    );
    assert!(agent.state()["generation"].as_u64() >= Some(2));

    // A broken edit: reported, and the last good content keeps serving.
    fs::write(
        &file,
        edited.replace("methods: [\"GET\", \"POST\"]", "methods: [\"GET\""),
    )
    .expect("break the policy");
    agent.wait_for("the error in /debug/state", Duration::from_secs(2), |d| {
        d.state()["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
    });
    let state = agent.state();
    let error = state["errors"][0].as_str().expect("an error message");
    assert!(
        error.contains("40-get-only.yaml") && error.contains("last good content"),
        "{error}"
    );
    let (code, json, _) = agent.check(&post);
    assert_eq!(
        (code, &json["status"], &json["policy"]),
        (0, &200.into(), &"foo/get-only".into())
    );
    let (_, _, metrics) = agent.get("/metrics").expect("/metrics");
    assert!(metrics.contains("nodeward_config_errors 1"), "{metrics}");
    assert!(
        metrics.contains("nodeward_config_reloads_total{result=\"error\"}"),
        "{metrics}"
    );
    let out = nodeward(&["status", "--admin", &agent.admin]);
    assert!(
        stdout(&out).contains("errors:    1 (the last good state serves meanwhile)"),
        "{}",
        stdout(&out)
    );
    assert!(
        agent
            .log_with("40-get-only.yaml")
            .contains("40-get-only.yaml"),
        "the error is logged"
    );

    // Fixed: the error clears; and a workload added to the registry is known at once.
    fs::write(&file, &original).expect("restore the policy");
    let workloads = agent.dir.join("workloads.yaml");
    let mut registry = fs::read_to_string(&workloads).expect("workloads.yaml");
    registry.push_str("  - {name: newcomer, namespace: foo, serviceAccount: sleep, labels: {app: httpbin-get}, ip: 10.200.0.30}\n");
    fs::write(&workloads, registry).expect("add a workload");
    agent.wait_for(
        "the fix and the new workload",
        Duration::from_secs(2),
        |d| {
            let state = d.state();
            state["errors"].as_array().is_some_and(Vec::is_empty)
                && state["workloads"].as_array().is_some_and(|w| w.len() == 6)
        },
    );
    let (code, json, _) = agent.check(&[
        "--dest-ip",
        "10.200.0.30",
        "--source-ip",
        SLEEP_IP,
        "--method",
        "POST",
    ]);
    assert_eq!(
        (code, &json["workload"]["labels"]["app"]),
        (1, &"httpbin-get".into()),
        "{json}"
    );
}

#[test]
fn sigterm_lets_in_flight_requests_finish_then_exits_0() {
    let mut agent = Daemon::start(&["--drain-timeout", "10s"], |_| {});
    // A request in flight: its head is half sent when SIGTERM arrives.
    let mut client = TcpStream::connect(&agent.listen).expect("connect to the enforcer");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    client
        .write_all(b"GET /in-flight HTTP/1.1\r\nHost: httpbin\r\n")
        .expect("half a request");
    std::thread::sleep(Duration::from_millis(300));
    agent.sigterm();
    let sent = Instant::now();

    // Draining: not ready, no new connections, the admin server still answers.
    assert!(
        eventually(Duration::from_secs(2), || agent.get("/readyz").is_some_and(
            |(status, _, body)| status == 503 && body.contains("[-]running shutting down")
        )),
        "/readyz did not turn 503 while draining; log:\n{}",
        agent.log()
    );
    assert!(
        eventually(Duration::from_secs(2), || TcpStream::connect(&agent.listen)
            .is_err()),
        "the listener still accepts after SIGTERM"
    );

    // The request completes and is answered (503: nothing is registered at this address).
    client.write_all(b"\r\n").expect("the rest of the request");
    let mut response = String::new();
    client.read_to_string(&mut response).expect("the response");
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.contains("no workload at"), "{response}");

    // Nothing left in flight: the agent exits 0 long before the 10 s bound.
    let status = agent.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}; log:\n{}", agent.log());
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    let log = agent.log();
    for line in [
        "shutting down: no longer accepting",
        "every connection finished",
        "nodeward stopped",
    ] {
        assert!(log.contains(line), "{line:?} in:\n{log}");
    }
}

#[test]
fn sigterm_cuts_what_outlives_the_drain_bound() {
    let mut agent = Daemon::start(
        &[
            "--drain-timeout",
            "1s",
            "--header-read-timeout",
            "60s",
            "--detect-timeout",
            "60s",
        ],
        |_| {},
    );
    let mut client = TcpStream::connect(&agent.listen).expect("connect to the enforcer");
    client
        .write_all(b"GET /never-finished HTTP/1.1\r\n")
        .expect("half a request");
    std::thread::sleep(Duration::from_millis(300));
    agent.sigterm();
    let sent = Instant::now();
    let status = agent.wait_exit(Duration::from_secs(5));
    let took = sent.elapsed();
    assert!(status.success(), "{status}; log:\n{}", agent.log());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "exit after {took:?}, expected about the 1 s drain bound"
    );
    assert!(
        agent.log().contains("drain timeout reached"),
        "{}",
        agent.log()
    );
}

#[test]
fn startup_errors_name_what_to_fix() {
    let dir = TempDir::new("run-start");
    let policies = repo().join("examples/policies");
    let policies = policies.to_str().expect("UTF-8");
    let missing = dir.join("missing.yaml");
    let missing = missing.to_str().expect("UTF-8");
    let admin = format!("127.0.0.1:{}", free_port());

    // No usable workloads file: exit 2.
    let out = nodeward(&[
        "run",
        "--policies",
        policies,
        "--workloads",
        missing,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        &admin,
        "--datapath",
        "off",
    ]);
    assert_eq!(exit_code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains(missing), "{}", stderr(&out));

    // The listener's address is taken: exit 1, naming it.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let workloads = repo().join("examples/workloads.yaml");
    let out = nodeward(&[
        "run",
        "--policies",
        policies,
        "--workloads",
        workloads.to_str().expect("UTF-8"),
        "--listen",
        &addr,
        "--admin",
        &admin,
        "--datapath",
        "off",
    ]);
    assert_eq!(exit_code(&out), 1, "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("cannot listen on {addr} (--listen)")),
        "{}",
        stderr(&out)
    );
}
