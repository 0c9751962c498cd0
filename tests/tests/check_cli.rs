//! `nodeward check` on Istio's reference scenarios (the `examples/policies` directory), through
//! the real binary: exit codes, JSON fields and text explanations.

use nodeward_tests::nodeward;
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
    let out = nodeward(&args);
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
    let dir = TempDir::new("nodeward-cli");
    let file = dir.0.join("bad.yaml");
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
            "--path",
            "/a%zz",
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

/// A directory removed when the test ends, also when it fails.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
