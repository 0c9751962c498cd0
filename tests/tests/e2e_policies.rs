//! End to end, the reference scenarios 1–7 through the kernel data path: JWT
//! authentication and authorization, claim conditions, principals from the registry, DENY over
//! ALLOW and the root namespace, an unprotected pod that is not steered, and live policy edits.
//! Each test builds its own node ([`nodeward_tests::e2e::start`]); see there for what it holds.

use std::time::{Duration, Instant};

use nodeward_tests::e2e::{bearer, request_authn, sample, seen, start, Env};
use nodeward_tests::eventually;

const DENIED: &str = "RBAC: access denied";

/// One request of a scenario and the answer it must get.
#[derive(Clone, Copy)]
struct Row {
    /// The pod that sends it: `sleep` (known, 5 s limit) or another (2 s limit).
    from: &'static str,
    method: &'static str,
    pod: &'static str,
    path: &'static str,
    /// An Istio sample token sent as a bearer token.
    token: Option<&'static str>,
    status: u16,
    /// The body, when the answer is the agent's own.
    body: Option<&'static str>,
    /// The Istio behaviour the row pins.
    why: &'static str,
}

/// `method pod path` from `sleep` without a token must get `status`.
const fn row(
    method: &'static str,
    pod: &'static str,
    path: &'static str,
    status: u16,
    why: &'static str,
) -> Row {
    Row {
        from: "sleep",
        method,
        pod,
        path,
        token: None,
        status,
        body: None,
        why,
    }
}

impl Row {
    /// The answer is the agent's denial.
    const fn denied(self) -> Self {
        Self {
            body: Some(DENIED),
            ..self
        }
    }

    const fn from(self, pod: &'static str) -> Self {
        Self { from: pod, ..self }
    }

    const fn token(self, file: &'static str) -> Self {
        Self {
            token: Some(file),
            ..self
        }
    }
}

/// Sends every row's request and checks its answer.
fn check(env: &Env, rows: &[Row]) {
    for row in rows {
        let Row {
            from,
            method,
            pod,
            path,
            why,
            ..
        } = *row;
        let header = row.token.map(|file| bearer(&sample(file)));
        let (status, body) = if from == "sleep" {
            let headers: Vec<&str> = header.iter().map(String::as_str).collect();
            env.curl(method, pod, path, &headers)
        } else {
            assert!(header.is_none(), "a token is sent from sleep only");
            env.curl_short(from, method, pod, path)
        };
        assert_eq!(
            status, row.status,
            "{method} {pod}{path} from {from}: {why}: {body}"
        );
        if let Some(want) = row.body {
            assert_eq!(body, want, "{method} {pod}{path} from {from}: {why}");
        }
    }
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
    let got = seen(&body);
    assert_eq!(
        got["uri"], "/headers",
        "the pod received the normalized path"
    );
    assert!(
        got["headers"].get("authorization").is_none(),
        "the token was removed: {got}"
    );
    // In-pod steering: the enforcer dials the app from inside the pod, over its loopback.
    assert!(
        got["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{}:", env.pod("httpbin").ip)),
        "the pod was reached by the enforcer: {got}"
    );
    // 2. Plus ALLOW requestPrincipals: no token 403, demo.jwt 200.
    let (status, body) = env.curl("GET", "require", "/", &[]);
    assert_eq!((status, body.as_str()), (403, DENIED));
    let (status, _) = env.curl("GET", "require", "/", &[&demo]);
    assert_eq!(status, 200);
    // 6. A pod with no policy is not steered and answers directly.
    let steered = env.counter("steered");
    let (status, body) = env.curl("GET", "open", "/", &[]);
    assert_eq!(status, 200);
    let got = seen(&body);
    let client_ip = env.pod("sleep").ip.to_string();
    assert!(
        got["peer"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&client_ip),
        "direct: {got}"
    );
    assert_eq!(
        env.counter("steered"),
        steered,
        "no packet of it was steered"
    );
    assert!(steered > 0);

    // A clean stop leaves the programs enforcing for the next agent; `nodeward uninstall`
    // removes every pin.
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0");
    assert!(env.pin_dir().exists(), "pins kept for the next agent");
    let out = env.uninstall();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !env.pin_dir().exists(),
        "pins left in {}",
        env.pin_dir().display()
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
    check(
        &env,
        &[
            row("GET", "groups", "/", 200, "groups-scope.jwt carries group1")
                .token("groups-scope.jwt"),
            row("GET", "groups", "/", 403, "demo.jwt has no groups claim")
                .token("demo.jwt")
                .denied(),
            row("GET", "groups", "/", 403, "no token"),
        ],
    );
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
    check(
        &env,
        &[
            row("GET", "web", "/", 200, "a known client may GET"),
            row("POST", "web", "/", 403, "a known client may only GET").denied(),
            row(
                "GET",
                "web",
                "/",
                403,
                "a source not in the registry has no principal",
            )
            .from("stranger")
            .denied(),
        ],
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
    let mesh_wide_deny = "the mesh-wide DENY applies to every workload";
    check(
        &env,
        &[
            row("GET", "web", "/ip", 200, "ALLOW {} allows web"),
            row("GET", "web", "/admin", 403, mesh_wide_deny).denied(),
            row("GET", "web", "/admin/users", 403, mesh_wide_deny).denied(),
            row(
                "GET",
                "other",
                "/ip",
                200,
                "no ALLOW selects other: allowed",
            ),
            row("GET", "other", "/admin", 403, mesh_wide_deny).denied(),
            row("GET", "other", "/admin/users", 403, mesh_wide_deny).denied(),
            row(
                "POST",
                "web",
                "/anything",
                200,
                "ALLOW {} allows everything else",
            ),
            row(
                "DELETE",
                "web",
                "/anything",
                403,
                "the DENY of the same workload beats its ALLOW",
            ),
            row(
                "DELETE",
                "other",
                "/anything",
                200,
                "the DENY of web does not select other",
            ),
        ],
    );
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
    let generation = |env: &Env| env.agent().state()["generation"].as_u64().unwrap_or(0);
    let errors = |env: &Env| {
        env.agent().state()["errors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
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
    assert!(env.agent().metric("nodeward_config_errors") >= 1);
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
    assert_eq!(env.agent().metric("nodeward_config_errors"), 0);
    eprintln!("first edit applied in {took:?}");
}
