//! End to end, the agent's life cycle on a node (reference scenario 8): a crashed agent
//! (SIGKILL) leaves its programs attached and requests to protected pods fail or pass unjudged
//! per `--failure-mode`; a restart over the same pins enforces again; a clean stop keeps the
//! pins for the next agent and `nodeward uninstall` removes them; the node leaves no namespaces.

use nodeward_tests::e2e::{bearer, request_authn, sample, seen, start};
use nodeward_tests::netns::PREFIX;
use test_case::test_case;

/// What a request to a protected pod gets while the agent is down, per `--failure-mode`.
#[derive(Debug, Clone, Copy)]
enum WhileDown {
    /// No answer (status 0): the kernel drops it.
    NoAnswer,
    /// The pod answers 200, reached straight from the client (unjudged).
    Unjudged,
}

#[test_case("closed", WhileDown::NoAnswer ; "crash fails closed and restart enforces again")]
#[test_case("open", WhileDown::Unjudged ; "crash fails open and restart enforces again")]
fn crash_and_restart(mode: &str, while_down: WhileDown) {
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
    assert!(env.pin_dir().exists(), "a crash leaves the pins");
    let (status, body) = env.curl_short("sleep", "GET", "require", "/");
    match while_down {
        WhileDown::NoAnswer => assert_eq!(status, 0, "fail closed: no answer, got {body}"),
        WhileDown::Unjudged => {
            assert_eq!(status, 200, "fail open: the pod answers: {body}");
            let got = seen(&body);
            assert!(
                got["peer"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with(&client_ip),
                "unjudged, straight from the client: {got}"
            );
        }
    }

    env.start_agent();
    let (status, body) = env.curl_short("sleep", "GET", "require", "/");
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));
    let (status, _) = env.curl("GET", "require", "/", &[&bearer("garbage")]);
    assert_eq!(status, 401);
    let (status, _) = env.curl("GET", "require", "/", &[&bearer(&sample("demo.jwt"))]);
    assert_eq!(status, 200);

    // A clean stop (a rollout) keeps the programs in the pods for the next agent; only
    // `nodeward uninstall` removes them.
    assert_eq!(env.stop_agent(), Some(0), "SIGTERM: exit 0\n{}", env.log());
    assert!(env.pin_dir().exists(), "SIGTERM keeps the pins");
    let out = env.uninstall();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !env.pin_dir().exists(),
        "pins left in {}",
        env.pin_dir().display()
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
