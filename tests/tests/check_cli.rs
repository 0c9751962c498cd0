//! `nodeward check` on Istio's reference scenarios (the `examples/policies` directory), through
//! the real binary: exit codes, JSON fields and text explanations.

use nodeward_tests::{nodeward, TempDir};
use serde_json::Value;

const POLICIES: &str = "examples/policies";
const ISTIO_PRINCIPAL: &str = "testing@secure.istio.io/testing@secure.istio.io";

fn check_json(extra: &[&str]) -> (i32, Value) {
    let mut args = vec![
        "check",
        "--policies",
        POLICIES,
        "--namespace",
        "foo",
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    run_json(&args)
}

/// Runs `nodeward args` whose stdout must be JSON: (exit code, JSON).
fn run_json(args: &[&str]) -> (i32, Value) {
    let out = nodeward(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit code"), json)
}

#[test]
fn require_jwt_denies_without_principal_and_allows_with_one() {
    // Istio authz-jwt: ALLOW requestPrincipals ["testing@secure.istio.io/*"].
    let (code, json) = check_json(&["--labels", "app=httpbin-jwt"]);
    assert_eq!(
        (code, &json["decision"], &json["status"]),
        (1, &"deny".into(), &403.into())
    );
    assert_eq!(json["body"], "RBAC: access denied");
    assert_eq!(
        json["policy"],
        Value::Null,
        "no policy decided: none of the ALLOW policies matched"
    );
    assert!(
        json["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("none matched"),
        "{json}"
    );

    let (code, json) = check_json(&[
        "--labels",
        "app=httpbin-jwt",
        "--request-principal",
        ISTIO_PRINCIPAL,
    ]);
    assert_eq!(
        (code, &json["decision"], &json["status"]),
        (0, &"allow".into(), &200.into())
    );
    assert_eq!(
        (&json["policy"], &json["action"], &json["rule"]),
        (&"foo/require-jwt".into(), &"ALLOW".into(), &0.into())
    );
    assert_eq!(json["principal"], ISTIO_PRINCIPAL);
    assert_eq!(json["audit"], Value::Array(vec![]));
    assert_eq!(json["dry_run"], Value::Array(vec![]));
}

#[test]
fn principals_star_and_get_only() {
    // Istio authz-http: ALLOW principals ["*"] + methods ["GET"].
    let known = [
        "--labels",
        "app=httpbin-get",
        "--source-principal",
        "cluster.local/ns/foo/sa/sleep",
    ];
    let (code, json) = check_json(&known);
    assert_eq!((code, &json["status"]), (0, &200.into()), "{json}");
    let (code, json) = check_json(&[&known[..], &["--method", "POST"]].concat());
    assert_eq!((code, &json["status"]), (1, &403.into()), "{json}");
    let (code, json) = check_json(&["--labels", "app=httpbin-get", "--source-ip", "10.9.9.9"]);
    assert_eq!(
        (code, &json["status"]),
        (1, &403.into()),
        "an unknown source has no principal: {json}"
    );
}

#[test]
fn groups_claim_condition() {
    // Istio authz-jwt: requestPrincipals exact + when request.auth.claims[groups] = group1.
    let base = [
        "--labels",
        "app=httpbin-groups",
        "--request-principal",
        ISTIO_PRINCIPAL,
    ];
    let (code, json) = check_json(
        &[
            &base[..],
            &["--claims", r#"{"groups":["group1","group2"]}"#],
        ]
        .concat(),
    );
    assert_eq!(
        (code, &json["status"], &json["policy"]),
        (0, &200.into(), &"foo/require-group".into()),
        "{json}"
    );
    let (code, json) = check_json(&base);
    assert_eq!(
        (code, &json["status"]),
        (1, &403.into()),
        "demo.jwt carries no groups: {json}"
    );
    let (code, _) = check_json(&["--labels", "app=httpbin-groups"]);
    assert_eq!(code, 1, "no token: denied");
}

#[test]
fn mesh_wide_deny_wins_and_text_explains_it() {
    let out = nodeward(&[
        "check",
        "--policies",
        POLICIES,
        "--namespace",
        "foo",
        "--labels",
        "app=httpbin-get",
        "--source-principal",
        "cluster.local/ns/foo/sa/sleep",
        "--path",
        "/public/../admin/users",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("request:   GET /admin/users"),
        "the normalized path is what is judged: {text}"
    );
    assert!(
        text.contains("DENY   istio-system/deny-admin: MATCHED rule 0"),
        "{text}"
    );
    assert!(
        text.contains("ok   to[0].operation.paths"),
        "the deciding field is named: {text}"
    );
    assert!(
        text.contains(
            "decision:  DENY 403 - denied by DENY policy istio-system/deny-admin (rule 0)"
        ),
        "{text}"
    );
}

#[test]
fn tcp_connection_uses_istio_tcp_semantics() {
    // The GET-only ALLOW rule uses an HTTP-only field: dropped for a TCP connection.
    let (code, json) = check_json(&[
        "--labels",
        "app=httpbin-get",
        "--tcp",
        "--source-principal",
        "cluster.local/ns/foo/sa/sleep",
    ]);
    assert_eq!(code, 1, "{json}");
    let rule = &json["policies"][1]["rules"][0];
    assert_eq!(
        rule["dropped"], "uses HTTP-only fields and the connection is not HTTP",
        "{json}"
    );
}

#[test]
fn bad_input_exits_2_naming_file_object_and_field() {
    let dir = TempDir::new("cli");
    let file = dir.join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: broken, namespace: foo}\nspec:\n  rules:\n  - from:\n    - source: {ipBlocks: [10.0.0.0/40]}\n",
    )
    .expect("write");
    let path = file.to_str().expect("utf-8 path");
    let out = nodeward(&[
        "check",
        "--policies",
        POLICIES,
        "--policies",
        path,
        "--namespace",
        "foo",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{path} (document 1): AuthorizationPolicy foo/broken: spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/40\" is not a valid IP address or CIDR")),
        "{stderr}"
    );
    // --skip-invalid evaluates with the valid objects, as the daemon would.
    let out = nodeward(&[
        "check",
        "--policies",
        POLICIES,
        "--policies",
        path,
        "--namespace",
        "foo",
        "--labels",
        "app=httpbin-jwt",
        "--skip-invalid",
    ]);
    assert_eq!(out.status.code(), Some(1));

    for args in [
        vec![
            "check",
            "--policies",
            "does/not/exist",
            "--namespace",
            "foo",
        ],
        vec![
            "check",
            "--policies",
            POLICIES,
            "--namespace",
            "foo",
            "--claims",
            "[1]",
        ],
        vec![
            "check",
            "--policies",
            POLICIES,
            "--namespace",
            "foo",
            "--labels",
            "novalue",
        ],
        vec![
            "check",
            "--policies",
            POLICIES,
            "--namespace",
            "foo",
            "--method",
            "GE T",
        ],
    ] {
        let out = nodeward(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn requests_the_enforcer_refuses_are_denied_with_its_answer() {
    // `check` judges with the enforcer's own decision: what the enforcer answers 400/403 before
    // any policy is looked at is a deny with that status, not a bad invocation.
    for (extra, status, reason) in [
        (vec!["--path", "/a%00"], 400, "bad_path"),
        (vec!["-H", "Host: a", "-H", "Host: b"], 400, "bad_host"),
        (
            vec!["-H", "Upgrade: h2c-made-up", "-H", "Connection: upgrade"],
            403,
            "upgrade_refused",
        ),
        (vec!["--method", "CONNECT"], 403, "connect_refused"),
        (
            vec![
                "-H",
                "Content-Length: 1",
                "-H",
                "Transfer-Encoding: chunked",
            ],
            400,
            "content_length_conflict",
        ),
    ] {
        let (code, json) = check_json(&extra);
        assert_eq!(
            (code, &json["status"], &json["reason_code"]),
            (1, &status.into(), &reason.into()),
            "{extra:?}: {json}"
        );
    }
}

fn sample(file: &str) -> String {
    std::fs::read_to_string(
        nodeward_tests::repo_root()
            .join("testdata/istio-samples")
            .join(file),
    )
    .expect("Istio sample token")
    .trim()
    .to_owned()
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

#[test]
fn request_authentication_alone_with_istio_sample_tokens() {
    // Istio authn-policy: RequestAuthentication only. No token -> 200, garbage -> 401, demo.jwt -> 200.
    let (code, json) = check_json(&["--labels", "app=httpbin"]);
    assert_eq!(
        (code, &json["status"], &json["authn"]["result"]),
        (0, &200.into(), &"no_token".into()),
        "{json}"
    );

    let (code, json) = check_json(&["--labels", "app=httpbin", "-H", &bearer("garbage")]);
    assert_eq!(
        (code, &json["status"], &json["decision"]),
        (1, &401.into(), &"deny".into()),
        "{json}"
    );
    assert_eq!(
        json["body"],
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    );
    assert_eq!(
        json["www_authenticate"],
        "Bearer realm=\"http:///\", error=\"invalid_token\""
    );

    let (code, json) = check_json(&[
        "--labels",
        "app=httpbin",
        "-H",
        &bearer(&sample("demo.jwt")),
    ]);
    assert_eq!((code, &json["status"]), (0, &200.into()), "{json}");
    assert_eq!(json["authn"]["principal"], ISTIO_PRINCIPAL);
    assert_eq!(json["principal"], ISTIO_PRINCIPAL);
    assert_eq!(json["authn"]["rule"], "foo/jwt-example[0]");
}

#[test]
fn groups_condition_with_istio_sample_tokens() {
    let groups = ["--labels", "app=httpbin-groups"];
    let (code, json) =
        check_json(&[&groups[..], &["-H", &bearer(&sample("groups-scope.jwt"))]].concat());
    assert_eq!(
        (code, &json["status"], &json["policy"]),
        (0, &200.into(), &"foo/require-group".into()),
        "{json}"
    );
    let (code, json) = check_json(&[&groups[..], &["-H", &bearer(&sample("demo.jwt"))]].concat());
    assert_eq!(
        (code, &json["status"]),
        (1, &403.into()),
        "demo.jwt has no groups claim: {json}"
    );
    let (code, json) = check_json(&groups);
    assert_eq!((code, &json["status"]), (1, &403.into()), "{json}");
}

#[test]
fn token_time_is_judged_at_now() {
    // demo.jwt expires at 4685989700; judged a day after, it is expired (401).
    let token = bearer(&sample("demo.jwt"));
    let (code, json) = check_json(&[
        "--labels",
        "app=httpbin",
        "-H",
        &token,
        "--now",
        "4686076100",
    ]);
    assert_eq!(
        (code, &json["status"], &json["body"]),
        (1, &401.into(), &"Jwt is expired".into()),
        "{json}"
    );
    let (_, json) = check_json(&[
        "--labels",
        "app=httpbin",
        "--path",
        &format!("/ip?access_token={}", sample("demo.jwt")),
    ]);
    assert_eq!(
        json["authn"]["result"], "authenticated",
        "the access_token query parameter is read: {json}"
    );
}

#[test]
fn what_if_flags_conflict_with_a_real_token() {
    let out = nodeward(&[
        "check",
        "--policies",
        POLICIES,
        "--namespace",
        "foo",
        "--labels",
        "app=httpbin",
        "-H",
        &bearer(&sample("demo.jwt")),
        "--request-principal",
        "a/b",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn jwt_decode_and_verify() {
    let out = nodeward(&["jwt", "decode", &sample("groups-scope.jwt")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text.starts_with("NOT VERIFIED"),
        "decode says it does not verify: {text}"
    );
    assert!(
        text.contains("principal: testing@secure.istio.io/testing@secure.istio.io"),
        "{text}"
    );
    assert!(text.contains("expires:   2082-02-04T00:38:24Z"), "{text}");

    let jwks = "testdata/istio-samples/jwks.json";
    let out = nodeward(&["jwt", "verify", &sample("demo.jwt"), "--jwks", jwks]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = nodeward(&[
        "jwt",
        "verify",
        &sample("demo.jwt"),
        "--jwks",
        jwks,
        "--issuer",
        "someone-else",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Jwt issuer is not configured"));
    let out = nodeward(&[
        "jwt",
        "verify",
        &sample("demo.jwt"),
        "--jwks",
        jwks,
        "--audience",
        "api",
        "--output",
        "json",
    ]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        (&json["valid"], &json["status"]),
        (&false.into(), &403.into())
    );
    let out = nodeward(&[
        "jwt",
        "verify",
        &sample("demo.jwt"),
        "--jwks",
        "testdata/istio-samples/README.md",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a file that is not a JWKS is bad input"
    );
}

/// A JWKS server on 127.0.0.1: answers every request with `status` and `body`, until dropped.
struct JwksServer {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start(status: &'static str, body: String) -> Self {
        use std::io::{Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + std::time::Duration::from_mins(1);
            while !flag.load(std::sync::atomic::Ordering::SeqCst)
                && std::time::Instant::now() < deadline
            {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = conn.read(&mut buf);
                        let response = format!(
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = conn.write_all(response.as_bytes());
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        });
        Self {
            port,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn remote_policies(dir: &TempDir, port: u16) -> String {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: remote, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: testing@secure.istio.io\n    jwksUri: http://127.0.0.1:{port}/jwks.json\n    timeout: 2s\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: require-group, namespace: foo}}\nspec:\n  rules:\n  - from:\n    - source:\n        requestPrincipals: [testing@secure.istio.io/testing@secure.istio.io]\n    when:\n    - key: request.auth.claims[groups]\n      values: [group1]\n"
    );
    let file = dir.join("remote.yaml");
    std::fs::write(&file, yaml).expect("write policy");
    file.to_str().expect("utf-8").to_owned()
}

fn check_remote(policies: &str, token: Option<&str>) -> (i32, Value) {
    let header = token.map(bearer);
    let mut args = vec![
        "check",
        "--policies",
        policies,
        "--namespace",
        "foo",
        "--output",
        "json",
    ];
    if let Some(h) = &header {
        args.extend(["-H", h.as_str()]);
    }
    let out = nodeward(&args);
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().expect("exit code"), json)
}

#[test]
fn jwks_fetched_over_http_from_jwks_uri() {
    let jwks = std::fs::read_to_string(
        nodeward_tests::repo_root().join("testdata/istio-samples/jwks.json"),
    )
    .expect("jwks");
    let server = JwksServer::start("200 OK", jwks);
    let dir = TempDir::new("remote-jwks");
    let policies = remote_policies(&dir, server.port);
    let (code, json) = check_remote(&policies, Some(&sample("groups-scope.jwt")));
    assert_eq!((code, &json["status"]), (0, &200.into()), "{json}");
    assert!(
        json["authn"]["jwks"][0]
            .as_str()
            .unwrap_or_default()
            .contains("ready (kids DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ)"),
        "{json}"
    );
    let (code, json) = check_remote(&policies, Some(&sample("demo.jwt")));
    assert_eq!((code, &json["status"]), (1, &403.into()), "{json}");
    let (code, json) = check_remote(&policies, None);
    assert_eq!(
        (code, &json["status"]),
        (1, &403.into()),
        "no token: denied by the ALLOW policy: {json}"
    );
    let (code, json) = check_remote(&policies, Some("garbage"));
    assert_eq!((code, &json["status"]), (1, &401.into()), "{json}");
}

#[test]
fn failing_jwks_server_fails_closed_for_tokens_only() {
    let server = JwksServer::start("500 Internal Server Error", "oops".into());
    let dir = TempDir::new("failing-jwks");
    let policies = remote_policies(&dir, server.port);
    let (code, json) = check_remote(&policies, Some(&sample("groups-scope.jwt")));
    assert_eq!(
        (code, &json["status"], &json["body"]),
        (1, &401.into(), &"Jwks remote fetch is failed".into()),
        "{json}"
    );
    assert!(
        json["authn"]["jwks"][0]
            .as_str()
            .unwrap_or_default()
            .contains("500"),
        "the fetch error says why: {json}"
    );
    let (_, json) = check_remote(&policies, None);
    assert_eq!(
        json["authn"]["result"], "no_token",
        "a request without a token is not affected: {json}"
    );
}

/// `--mesh-config`: the CUSTOM provider is asked for real (Istio's CUSTOM task, with the tests'
/// ext-authz servers answering as Istio's sample does), and its answer is shown.
mod custom {
    use std::fmt::Write as _;
    use std::net::TcpListener;

    use nodeward_tests::extauthz::{Behavior, ExtAuthz, Protocol, DENY_BODY};
    use nodeward_tests::{nodeward, TempDir};
    use serde_json::Value;

    const TOKEN_FILE: &str = "testdata/istio-samples/demo.jwt";

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").expect("bind on loopback")
    }

    /// The task's policy on `foo/httpbin` `/headers`, naming `provider`, and a mesh config with
    /// an HTTP and a gRPC provider at `authz`, plus one pointing at a closed port.
    fn files(dir: &TempDir, authz: &ExtAuthz, closed: u16) -> (String, String) {
        let policy = dir.path().join("custom.yaml");
        let mut yaml = String::new();
        for (name, provider) in [
            ("ext-authz-http", "sample-http"),
            ("ext-authz-grpc", "sample-grpc"),
            ("ext-authz-down", "down"),
        ] {
            let app = name.trim_start_matches("ext-authz-");
            let _ = write!(
                yaml,
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: {name}, namespace: foo}}\n\
                 spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  action: CUSTOM\n\
                 \x20 provider: {{name: {provider}}}\n  rules:\n  - to:\n    - operation:\n\
                 \x20       paths: [\"/headers\"]\n---\n"
            );
        }
        std::fs::write(&policy, yaml).expect("write policy");
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(
            &mesh,
            format!(
                "extensionProviders:\n\
                 - name: sample-http\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {}\n\
                 \x20   includeRequestHeadersInCheck: [x-ext-authz]\n\
                 \x20   headersToUpstreamOnAllow: [x-ext-authz-check-result]\n\
                 \x20   headersToDownstreamOnDeny: [x-ext-authz-check-result]\n\
                 - name: sample-grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {}\n\
                 - name: down\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {closed}\n\
                 \x20   statusOnError: \"503\"\n",
                authz.http_addr().port(),
                authz.grpc_addr().port(),
            ),
        )
        .expect("write mesh config");
        (policy.display().to_string(), mesh.display().to_string())
    }

    fn check(policy: &str, mesh: &str, extra: &[&str]) -> (i32, Value) {
        let mut args = vec![
            "check",
            "--policies",
            "examples/policies",
            "--policies",
            policy,
            "--mesh-config",
            mesh,
            "--namespace",
            "foo",
            "--path",
            "/headers",
            "--output",
            "json",
        ];
        args.extend_from_slice(extra);
        super::run_json(&args)
    }

    #[test]
    fn the_provider_is_asked_and_its_answer_shown() {
        let dir = TempDir::new("check-custom");
        let authz = ExtAuthz::start(Some(listener()), Some(listener()), Behavior::default());
        let closed = listener().local_addr().expect("addr").port();
        let (policy, mesh) = files(&dir, &authz, closed);

        // Istio's task: `x-ext-authz: allow` is allowed, with the header the pod would get.
        let (code, json) = check(
            &policy,
            &mesh,
            &["--labels", "app=http", "-H", "x-ext-authz: allow"],
        );
        assert_eq!((code, &json["decision"]), (0, &"allow".into()), "{json}");
        assert_eq!(json["provider"]["provider"], "sample-http");
        assert_eq!(json["provider"]["result"], "allowed");
        assert!(
            json["provider"]["headers_to_upstream"]
                .to_string()
                .contains("x-ext-authz-check-result: allowed"),
            "{json}"
        );
        let seen = authz.last().expect("the HTTP provider was asked");
        assert_eq!(
            (seen.protocol, seen.path.as_str()),
            (Protocol::Http, "/headers")
        );

        // Anything else: the provider's 403 and body, as the client would get them.
        let (code, json) = check(
            &policy,
            &mesh,
            &["--labels", "app=http", "-H", "x-ext-authz: deny"],
        );
        assert_eq!((code, &json["status"]), (1, &403.into()), "{json}");
        assert_eq!(json["reason_code"], "denied_by_provider");
        assert_eq!(json["body"], DENY_BODY);
        assert_eq!(json["provider"]["result"], "denied");

        // gRPC, the same answers.
        let (code, json) = check(
            &policy,
            &mesh,
            &["--labels", "app=grpc", "-H", "x-ext-authz: allow"],
        );
        assert_eq!(
            (code, &json["provider"]["result"]),
            (0, &"allowed".into()),
            "{json}"
        );
        assert_eq!(authz.last().expect("asked").protocol, Protocol::Grpc);
        let (code, json) = check(&policy, &mesh, &["--labels", "app=grpc"]);
        assert_eq!((code, &json["status"]), (1, &403.into()), "{json}");

        // A path the CUSTOM rule does not match: the provider is not asked.
        let before = authz.count();
        let out = nodeward(&[
            "check",
            "--policies",
            "examples/policies",
            "--policies",
            &policy,
            "--mesh-config",
            &mesh,
            "--namespace",
            "foo",
            "--labels",
            "app=http",
            "--path",
            "/ip",
            "--output",
            "json",
        ]);
        assert_eq!(out.status.code(), Some(0));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("\"provider\": {"));
        assert_eq!(authz.count(), before, "the provider was asked for /ip");

        // A provider that cannot be reached: statusOnError, and the text says why.
        let (code, json) = check(&policy, &mesh, &["--labels", "app=down"]);
        assert_eq!((code, &json["status"]), (1, &503.into()), "{json}");
        assert_eq!(json["reason_code"], "provider_error");
        assert_eq!(json["provider"]["result"], "error");
        let text = nodeward(&[
            "check",
            "--policies",
            "examples/policies",
            "--policies",
            &policy,
            "--mesh-config",
            &mesh,
            "--namespace",
            "foo",
            "--labels",
            "app=down",
            "--path",
            "/headers",
        ]);
        let text = String::from_utf8_lossy(&text.stdout);
        assert!(text.contains("provider:  provider down failed"), "{text}");
        assert!(text.contains("failOpen is off: 503"), "{text}");
    }

    #[test]
    fn a_verified_token_is_not_sent_to_the_provider() {
        // examples/policies' jwt-example (RequestAuthentication on app=httpbin in foo) with
        // forwardOriginalToken unset: Envoy's jwt_authn removes the token before ext_authz.
        let dir = TempDir::new("check-custom-token");
        let authz = ExtAuthz::start(Some(listener()), Some(listener()), Behavior::default());
        let (_, mesh) = files(&dir, &authz, 1);
        let policy = dir.path().join("httpbin.yaml");
        std::fs::write(
            &policy,
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: ext-authz, namespace: foo}\n\
             spec:\n  selector: {matchLabels: {app: httpbin}}\n  action: CUSTOM\n\
             \x20 provider: {name: sample-http}\n  rules:\n  - to:\n    - operation:\n\
             \x20       paths: [\"/headers\"]\n",
        )
        .expect("write policy");
        let token = std::fs::read_to_string(nodeward_tests::repo_root().join(TOKEN_FILE))
            .expect("the sample token");
        let bearer = format!("Authorization: Bearer {}", token.trim());
        let (code, json) = check(
            &policy.display().to_string(),
            &mesh,
            &[
                "--labels",
                "app=httpbin",
                "-H",
                &bearer,
                "-H",
                "x-ext-authz: allow",
            ],
        );
        assert_eq!(code, 0, "{json}");
        assert_eq!(json["authn"]["result"], "authenticated", "{json}");
        let seen = authz.last().expect("the provider was asked");
        assert_eq!(
            seen.header("authorization"),
            None,
            "the verified token reached the provider"
        );
    }

    #[test]
    fn a_mesh_config_that_is_not_one_is_bad_input() {
        let dir = TempDir::new("check-custom-bad");
        let mesh = dir.path().join("mesh.yaml");
        std::fs::write(&mesh, "extensionProviders: {not: a list}\n").expect("write");
        let out = nodeward(&[
            "check",
            "--policies",
            "examples/policies",
            "--mesh-config",
            &mesh.display().to_string(),
            "--namespace",
            "foo",
        ]);
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--mesh-config"), "{stderr}");
    }
}
