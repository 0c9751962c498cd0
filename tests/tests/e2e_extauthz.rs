//! End to end, the CUSTOM action with real external authorizers (the kit's
//! [`nodeward_tests::extauthz`], Istio's ext-authz sample over HTTP and gRPC), through the
//! kernel data path: `nodeward run --mesh-config FILE` with the `MeshConfig`'s
//! `extensionProviders`.
//!
//! The rows come from Istio's task "External Authorization"
//! (istio.io/latest/docs/tasks/security/authorization/authz-custom/: the sample's
//! `sample-ext-authz-grpc` and `sample-ext-authz-http` providers, a CUSTOM policy on `/headers`,
//! `x-ext-authz: allow` allowed and other values denied with the sample's body) and from
//! Envoy's `ext_authz` filter documentation (envoyproxy.io, HTTP filter "External
//! Authorization" and its API `extensions.filters.http.ext_authz.v3`): what the check request
//! carries, `failure_mode_allow` and `status_on_error` on a timeout, a refused connection or a
//! 5xx, `allowed_upstream_headers`, `allowed_client_headers` (on deny) and
//! `allowed_client_headers_on_success`, `with_request_body`, `path_prefix`; and Istio's
//! `EnvoyExternalAuthorizationHttpProvider` / `...GrpcProvider` fields that map onto them.
//!
//! Every test builds one node and one agent and groups its rows on it. Providers run on the
//! node namespace's loopback (in this process, [`ExtAuthz`]) or as a pod of the node (the
//! `nw-ext-authz` binary, its checks read from its log).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nodeward_tests::cluster::{
    install_hostport, install_services, service_ip, service_ip6, ProxyMode, Service,
};
use nodeward_tests::e2e::{
    bearer, raw_tcp, request_authn, sample, seen, start_on, url, Env, PodSpec, SHORT,
};
use nodeward_tests::extauthz::{
    bind_in, read_checks, Behavior, Check, ExtAuthz, Failure, Protocol, DENY_BODY, FAILURE_BODY,
    OVERRIDE_GRPC_VALUE, OVERRIDE_HEADER, RECEIVED_HEADER, RESULT_HEADER,
};
use nodeward_tests::netns::{pod_ip, Cni, NodeOptions, TestNode};
use nodeward_tests::{eventually, ext_authz_bin, TempDir};
use serde_json::Value;

/// The agent's own denial (Envoy's RBAC filter).
const DENIED: &str = "RBAC: access denied";
/// The sample's header, allowing and denying.
const ALLOW: &str = "x-ext-authz: allow";
const DENY: &str = "x-ext-authz: deny";

/// One answer as the client got it.
#[derive(Debug)]
struct Reply {
    /// 0 when no answer came within 5 s.
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// What the pod received (its JSON answer); panics unless the pod answered.
    fn seen(&self) -> Value {
        assert_eq!(self.status, 200, "the pod answered: {self:?}");
        seen(&self.body)
    }

    /// `(status, body)`, for the agent's and the providers' answers.
    fn answer(&self) -> (u16, &str) {
        (self.status, self.body.as_str())
    }
}

/// A request from pod `from` to `pod`:8000`path` with `curl -i`: `curl` arguments, the
/// method, the headers and, when given, `data` as the body.
struct Call<'a> {
    from: &'a str,
    curl: &'a [&'a str],
    method: &'a str,
    data: Option<&'a str>,
}

/// `GET` from `sleep`.
const GET: Call<'static> = Call {
    from: "sleep",
    curl: &[],
    method: "GET",
    data: None,
};

impl Call<'_> {
    /// Sends it; the answer with its headers.
    fn send(&self, env: &Env, pod: &str, path: &str, headers: &[&str]) -> Reply {
        let target = url(env.pod(pod), path);
        let mut args = vec!["curl", "-s", "-i", "-m", "5", "-X", self.method, &target];
        args.extend_from_slice(self.curl);
        for h in headers {
            args.extend(["-H", h]);
        }
        if let Some(d) = self.data {
            args.extend(["--data-binary", d]);
        }
        let out = env.node.exec(&env.pod(self.from).netns, &args);
        parse(&String::from_utf8_lossy(&out.stdout))
    }
}

/// `curl -i`'s output: the last head (after any `100 Continue`) and the body.
fn parse(mut text: &str) -> Reply {
    loop {
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return Reply {
                status: 0,
                headers: Vec::new(),
                body: text.to_owned(),
            };
        };
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if status == 100 {
            text = body;
            continue;
        }
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        return Reply {
            status,
            headers,
            body: body.to_owned(),
        };
    }
}

/// `GET pod path` from `sleep` with `headers`.
fn get(env: &Env, pod: &str, path: &str, headers: &[&str]) -> Reply {
    GET.send(env, pod, path, headers)
}

/// An `AuthorizationPolicy` of `action` for the pods labelled `app` (every workload of the
/// namespace when `app` is empty); `extra` is added under `spec` (e.g. the provider), `paths`
/// is the one rule's operation and `when` its conditions (YAML flow list, may be empty).
fn policy(name: &str, app: &str, action: &str, extra: &str, paths: &[&str], when: &str) -> String {
    let selector = if app.is_empty() {
        String::new()
    } else {
        format!("  selector: {{matchLabels: {{app: {app}}}}}\n")
    };
    let when = if when.is_empty() {
        String::new()
    } else {
        format!("    when: {when}\n")
    };
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n{selector}  action: {action}\n{extra}  rules:\n  - to: [{{operation: {{paths: {paths:?}}}}}]\n{when}---\n"
    )
}

/// A CUSTOM policy for `app` naming `provider`, on `paths` (Istio's task: `ext-authz`, on
/// `/headers`).
fn custom(app: &str, provider: &str, paths: &[&str]) -> String {
    let provider = format!("  provider: {{name: {provider}}}\n");
    policy(
        &format!("ext-authz-{app}"),
        app,
        "CUSTOM",
        &provider,
        paths,
        "",
    )
}

/// One pod per name, labelled with its name, from address `.11` on.
fn pods<'a>(names: &[&'a str]) -> Vec<PodSpec<'a>> {
    names
        .iter()
        .zip(11..)
        .map(|(name, index)| (*name, index, Some(*name)))
        .collect()
}

/// Starts an authorizer on the loopback of `node`'s namespace: HTTP, or gRPC when `grpc`.
fn on_loopback(node: &TestNode, grpc: bool, behavior: Behavior) -> ExtAuthz {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let listener = Some(bind_in(&node.netns, addr));
    if grpc {
        ExtAuthz::start(None, listener, behavior)
    } else {
        ExtAuthz::start(listener, None, behavior)
    }
}

/// A node for test `tag` with its cgroup and a directory for the mesh config (and logs).
fn node(tag: &str) -> (TestNode, String, TempDir) {
    let mut node = TestNode::new(tag);
    let cgroup = node.use_cgroup().to_str().expect("utf-8").to_owned();
    (node, cgroup, TempDir::new(tag))
}

/// Starts the agent on `node` with `pods`, `policies` and the mesh config `mesh`.
fn start(node: TestNode, cgroup: &str, mesh: &Path, pods: &[PodSpec], policies: &str) -> Env {
    let mesh = mesh.to_str().expect("utf-8");
    start_on(
        node,
        pods,
        policies,
        &["--cgroup", cgroup, "--mesh-config", mesh],
    )
}

/// The agent's access log lines that contain every one of `needles`, once there are `count`
/// (the log is written every 100 ms) or after 3 s.
fn access_lines(env: &Env, needles: &[&str], count: usize) -> Vec<String> {
    let matching = || -> Vec<String> {
        env.log()
            .lines()
            .filter(|l| l.contains(" access: ") && needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    };
    eventually(Duration::from_secs(3), || matching().len() >= count);
    matching()
}

/// `nodeward_extauthz_checks_total` of `provider` and `result`.
fn checks_total(env: &Env, provider: &str, result: &str) -> u64 {
    env.agent().metric(&format!(
        "nodeward_extauthz_checks_total{{provider=\"{provider}\",result=\"{result}\"}}"
    ))
}

/// The node of Istio's task: the sample as a pod (`ext-authz`, its address as the providers'
/// `service`) and two providers on the node's loopback. Fields drop in order: the agent and
/// the node (the sample pod with them), then the loopback authorizers, then the files.
struct Task {
    env: Env,
    lo_grpc: ExtAuthz,
    lo_http: ExtAuthz,
    /// The sample pod's stdout: its checks.
    sample_log: PathBuf,
    _files: TempDir,
}

impl Task {
    fn start() -> Self {
        let (mut node, cgroup, files) = node("xa-task");
        // The sample's Deployment (samples/extauthz/ext-authz.yaml: HTTP 8000, gRPC 9000).
        let sample_pod = node.add_pod("ext-authz", pod_ip(30));
        let sample_log = files.join("ext-authz.log");
        let (http, grpc) = (
            format!("{}:8000", sample_pod.ip),
            format!("{}:9000", sample_pod.ip),
        );
        let args = ["--http", http.as_str(), "--grpc", grpc.as_str()];
        node.spawn_logged(&sample_pod.netns, &ext_authz_bin(), &args, &sample_log);
        let log = || std::fs::read_to_string(&sample_log).unwrap_or_default();
        let listening = eventually(Duration::from_secs(5), || log().contains("listening"));
        assert!(listening, "nw-ext-authz did not start: {}", log());
        let lo_grpc = on_loopback(&node, true, Behavior::default());
        let lo_http = on_loopback(&node, false, Behavior::default());
        // The task's MeshConfig, the service given as the pod's address (no DNS on the node).
        let mesh = files.join("mesh.yaml");
        let text = format!(
            "extensionProviders:\n- name: \"sample-ext-authz-grpc\"\n  envoyExtAuthzGrpc:\n    service: \"{ip}\"\n    port: \"9000\"\n- name: \"sample-ext-authz-http\"\n  envoyExtAuthzHttp:\n    service: \"{ip}\"\n    port: \"8000\"\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n- name: loopback-grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {grpc}\n- name: loopback-http\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {http}\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n    headersToUpstreamOnAllow: [\"x-ext-authz-check-result\"]\n",
            ip = sample_pod.ip,
            grpc = lo_grpc.grpc_addr().port(),
            http = lo_http.http_addr().port(),
        );
        std::fs::write(&mesh, text).expect("write mesh config");
        let ordered = ["/headers", "/forbidden", "/other"];
        let policies = [
            custom("httpbin", "sample-ext-authz-grpc", &["/headers"]),
            custom("httpbin-http", "sample-ext-authz-http", &["/headers"]),
            custom("loop-grpc", "loopback-grpc", &["/headers"]),
            custom("loop-http", "loopback-http", &["/headers"]),
            request_authn("loop-http"),
            custom("ordered", "loopback-http", &ordered),
            policy("no-forbidden", "ordered", "DENY", "", &["/forbidden"], ""),
            policy("headers-only", "ordered", "ALLOW", "", &["/headers"], ""),
            custom("unknown", "no-such-provider", &["/headers"]),
        ]
        .concat();
        // `a`: a client with service account `a`, which the gRPC sample allows without the
        // header.
        let names = [
            "httpbin",
            "httpbin-http",
            "loop-grpc",
            "loop-http",
            "ordered",
            "unknown",
            "a",
        ];
        let env = start(node, &cgroup, &mesh, &pods(&names), &policies);
        Self {
            env,
            lo_grpc,
            lo_http,
            sample_log,
            _files: files,
        }
    }

    /// The checks the sample pod received so far.
    fn sample_checks(&self) -> Vec<Check> {
        read_checks(&self.sample_log)
    }
}

/// The sample's checks as Istio's task runs them, with the sample as a pod of the node and on
/// the node's loopback; CUSTOM then DENY then ALLOW; a provider the mesh config lacks; plain
/// TCP; JWT authentication before the check; counters and the access log.
#[test]
fn istio_custom_task_with_the_sample_as_a_pod_and_on_loopback() {
    let task = Task::start();
    the_task_with_the_grpc_provider(&task);
    the_task_with_the_http_provider(&task);
    providers_on_loopback(&task);
    custom_then_deny_then_allow(&task);
    undefined_provider_and_plain_tcp(&task);
    counters_and_access_log(&task.env);
}

/// `x-ext-authz: deny` gets the sample's 403, body and `denied_response` headers; `allow`
/// reaches the pod with the `ok_response` headers set; a path the CUSTOM rule does not match is
/// never checked; without the header the sample allows service account `a`.
fn the_task_with_the_grpc_provider(task: &Task) {
    let env = &task.env;
    let before = task.sample_checks().len();
    let r = get(env, "httpbin", "/headers", &[DENY]);
    assert_eq!(r.answer(), (403, DENY_BODY), "{r:?}");
    assert_eq!(r.header(RESULT_HEADER), Some("denied"), "{r:?}");
    let got = get(env, "httpbin", "/headers", &[ALLOW]).seen();
    let h = &got["headers"];
    assert_eq!(h[RESULT_HEADER], "allowed", "{got}");
    assert_eq!(h[OVERRIDE_HEADER], OVERRIDE_GRPC_VALUE, "{got}");
    assert!(h.get(RECEIVED_HEADER).is_some(), "{got}");
    let r = get(env, "httpbin", "/ip", &[DENY]);
    assert_eq!(r.status, 200, "/ip is not checked: {r:?}");
    let from_a = Call { from: "a", ..GET };
    let r = from_a.send(env, "httpbin", "/headers", &[]);
    assert_eq!(r.status, 200, "from sa/a: {r:?}");
    let r = get(env, "httpbin", "/headers", &[]);
    assert_eq!(r.answer(), (403, DENY_BODY), "from sa/sleep: {r:?}");
    let checks = task.sample_checks();
    let grpc = &checks[before..];
    assert_eq!(
        grpc.len(),
        4,
        "one check per request on /headers: {grpc:#?}"
    );
    assert!(grpc
        .iter()
        .all(|c| c.protocol == Protocol::Grpc && c.path == "/headers"));
    let a = grpc[2].source.as_ref().map(|s| s.principal.as_str());
    assert_eq!(a, Some("spiffe://cluster.local/ns/foo/sa/a"), "{grpc:#?}");
}

/// The same answers over HTTP. The check carries Envoy's headers and only the listed client
/// headers; without `headersToUpstreamOnAllow` nothing of the answer reaches the pod; with an
/// empty `headersToDownstreamOnDeny` a denial passes every answer header but Host.
fn the_task_with_the_http_provider(task: &Task) {
    let env = &task.env;
    let before = task.sample_checks().len();
    let got = get(env, "httpbin-http", "/headers", &[ALLOW]).seen();
    assert!(got["headers"].get(RESULT_HEADER).is_none(), "{got}");
    let r = get(env, "httpbin-http", "/headers", &[DENY]);
    assert_eq!(r.answer(), (403, DENY_BODY), "{r:?}");
    assert_eq!(r.header(RESULT_HEADER), Some("denied"), "{r:?}");
    assert_eq!(get(env, "httpbin-http", "/ip", &[DENY]).status, 200);
    let checks = task.sample_checks();
    let http = &checks[before..];
    assert_eq!(http.len(), 2, "{http:#?}");
    let c = &http[0];
    assert_eq!(c.protocol, Protocol::Http);
    assert_eq!((c.method.as_str(), c.path.as_str()), ("GET", "/headers"));
    assert_eq!(c.host, format!("{}:8000", env.pod("httpbin-http").ip));
    assert_eq!(c.header("x-ext-authz"), Some("allow"));
    assert_eq!(c.header("content-length"), Some("0"));
    for absent in ["user-agent", "accept"] {
        assert!(c.header(absent).is_none(), "{absent} is not listed: {c:#?}");
    }
}

/// Providers on the node's loopback. The gRPC check carries the peers (addresses and
/// `spiffe://` principals) and the request (every header, the pseudo-headers, the protocol,
/// also over h2c). Over HTTP, `headersToUpstreamOnAllow` passes the sample's result header; JWT
/// authentication comes first (Istio's filter order): a bad token is 401 and the provider is
/// not asked.
fn providers_on_loopback(task: &Task) {
    let env = &task.env;
    let got = get(env, "loop-grpc", "/headers?x=1", &[ALLOW]).seen();
    assert_eq!(got["headers"][RESULT_HEADER], "allowed", "{got}");
    let c = task.lo_grpc.last().expect("a gRPC check");
    let (client, target) = (env.pod("sleep").ip, env.pod("loop-grpc").ip);
    let target = format!("{target}:8000");
    let source = c.source.clone().expect("attributes.source");
    let destination = c.destination.clone().expect("attributes.destination");
    assert_eq!(source.principal, "spiffe://cluster.local/ns/foo/sa/sleep");
    assert!(source.address.starts_with(&format!("{client}:")), "{c:#?}");
    let loop_grpc = "spiffe://cluster.local/ns/foo/sa/loop-grpc";
    assert_eq!(destination.principal, loop_grpc);
    assert_eq!(destination.address, target);
    assert_eq!(
        (c.method.as_str(), c.path.as_str()),
        ("GET", "/headers?x=1")
    );
    assert_eq!(c.host, target);
    assert_eq!(c.header(":path"), Some("/headers?x=1"));
    assert_eq!(c.header(":method"), Some("GET"));
    let curl = c
        .header("user-agent")
        .is_some_and(|v| v.starts_with("curl"));
    assert!(curl, "every header: {c:#?}");
    assert_eq!(c.http_protocol, "HTTP/1.1");
    assert!(!c.tcp);
    let r = get(env, "loop-grpc", "/headers", &[DENY]);
    assert_eq!(r.answer(), (403, DENY_BODY), "{r:?}");
    let h2 = Call {
        curl: &["--http2-prior-knowledge"],
        ..GET
    };
    let got = h2.send(env, "loop-grpc", "/headers", &[ALLOW]).seen();
    assert_eq!(got["headers"][RESULT_HEADER], "allowed", "{got}");
    let c = task.lo_grpc.last().expect("a gRPC check");
    assert_eq!(c.http_protocol, "HTTP/2", "{c:#?}");
    assert_eq!(c.header(":authority"), Some(target.as_str()), "{c:#?}");

    // The provider gets the normalized path (Istio's path normalization comes before every
    // filter), which the CUSTOM rule matched.
    let as_is = Call {
        curl: &["--path-as-is"],
        ..GET
    };
    let got = as_is
        .send(env, "loop-grpc", "/a/../headers", &[ALLOW])
        .seen();
    assert_eq!(got["uri"], "/headers", "{got}");
    let c = task.lo_grpc.last().expect("a gRPC check");
    assert_eq!(
        (c.path.as_str(), c.header(":path")),
        ("/headers", Some("/headers"))
    );

    let got = get(env, "loop-http", "/headers", &[ALLOW]).seen();
    assert_eq!(got["headers"][RESULT_HEADER], "allowed", "{got}");
    let asked = task.lo_http.count();
    let garbage = bearer("garbage");
    let r = get(env, "loop-http", "/headers", &[ALLOW, &garbage]);
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(
        task.lo_http.count(),
        asked,
        "a rejected token is not checked"
    );
    let demo = bearer(&sample("demo.jwt"));
    let r = get(env, "loop-http", "/headers", &[ALLOW, &demo]);
    assert_eq!(r.status, 200, "{r:?}");
}

/// Istio's order: the provider allows, then a DENY policy denies; the provider allows and no
/// ALLOW policy matches: denied; the provider's denial comes first.
fn custom_then_deny_then_allow(task: &Task) {
    let asked = task.lo_http.count();
    for (path, header, status, body, why) in [
        ("/forbidden", ALLOW, 403, DENIED, "allowed, then DENY"),
        ("/headers", ALLOW, 200, "", "allowed, then ALLOW matches"),
        ("/other", ALLOW, 403, DENIED, "allowed, no ALLOW matches"),
        ("/forbidden", DENY, 403, DENY_BODY, "the provider first"),
    ] {
        let r = get(&task.env, "ordered", path, &[header]);
        assert_eq!(r.status, status, "{why}: {r:?}");
        if status != 200 {
            assert_eq!(r.body, body, "{why}");
        }
    }
    let asked = task.lo_http.count() - asked;
    assert_eq!(asked, 4, "the provider was asked before DENY and ALLOW");
}

/// A CUSTOM policy naming a provider the mesh config does not define denies what its rules
/// match (Istio replaces it with a deny rule). Plain TCP (Envoy's network `ext_authz` filter):
/// a gRPC provider is asked with the peers only (the rule's HTTP fields do not apply to TCP);
/// the sample allows sa/a, and a denied connection is closed. An HTTP provider does not apply
/// to TCP (Istio: "ignored CUSTOM action with HTTP provider on TCP filter chain").
fn undefined_provider_and_plain_tcp(task: &Task) {
    let env = &task.env;
    let r = get(env, "unknown", "/headers", &[ALLOW]);
    assert_eq!(r.answer(), (403, DENIED), "{r:?}");
    assert_eq!(get(env, "unknown", "/ip", &[ALLOW]).status, 200);

    let before = task.sample_checks().len();
    let answer = raw_tcp(env, &env.pod("a").netns, "httpbin");
    assert!(answer.starts_with("HTTP/1.1 400"), "sa/a, TCP: {answer:?}");
    assert_eq!(raw_tcp(env, &env.client(), "httpbin"), "", "sa/sleep, TCP");
    let answer = raw_tcp(env, &env.client(), "httpbin-http");
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "HTTP provider, TCP: {answer:?}"
    );
    let checks = task.sample_checks();
    let tcp = &checks[before..];
    assert_eq!(tcp.len(), 2, "{tcp:#?}");
    let peers_only = tcp.iter().all(|c| c.tcp && c.protocol == Protocol::Grpc);
    assert!(peers_only, "{tcp:#?}");
}

/// Counters and the access log name the provider and its result.
fn counters_and_access_log(env: &Env) {
    assert_eq!(checks_total(env, "sample-ext-authz-grpc", "allowed"), 3);
    assert_eq!(checks_total(env, "sample-ext-authz-grpc", "denied"), 3);
    assert_eq!(checks_total(env, "sample-ext-authz-http", "allowed"), 1);
    assert_eq!(checks_total(env, "sample-ext-authz-http", "denied"), 1);
    assert_eq!(checks_total(env, "loopback-http", "allowed"), 5);
    let seconds = "nodeward_extauthz_check_seconds_count{provider=\"sample-ext-authz-grpc\"}";
    assert_eq!(env.agent().metric(seconds), 6);
    let denied = [
        "provider=\"sample-ext-authz-grpc\"",
        "provider_result=\"denied\"",
        "status=403",
        "reason=denied_by_provider",
    ];
    // Two HTTP requests (the TCP connection's line has no status).
    let lines = access_lines(env, &denied, 2);
    assert_eq!(lines.len(), 2, "{}", env.log());
    assert!(lines[0].contains(" provider_us="), "{}", lines[0]);
    // httpbin, httpbin-http and unknown.
    let lines = access_lines(env, &["path=/ip ", "provider=\"-\""], 3);
    assert_eq!(lines.len(), 3, "/ip was never checked: {}", env.log());
}

/// The answers of one failure phase on `/headers`, `/deny-after`, `/other`: status and body
/// (`None`: the pod answered).
type Answers = [(u16, Option<&'static str>); 3];

/// Envoy's failure handling for each way a check can fail (no answer within `timeout`, a
/// refused connection, a 5xx or a closed connection from an HTTP provider, a failed RPC from a
/// gRPC one): `failOpen: false` answers `statusOnError` (default 403) with an empty body (the
/// 5xx answer's body and headers are not the client's); `failOpen: true` lets the request go on
/// to DENY and ALLOW. The mesh config is edited between the three phases (the agent watches
/// it).
#[test]
fn failed_checks_follow_fail_open_and_status_on_error() {
    let (node, cgroup, files) = node("xa-fail");
    let failing = |failure| Behavior {
        failure: Some(failure),
        ..Behavior::default()
    };
    // Slower than the providers' timeout (0.5 s): if the timeout did not apply, the sample
    // would allow (`x-ext-authz: allow` is sent) and the pod would answer 200.
    let slow = Behavior {
        delay: Duration::from_secs(3),
        ..Behavior::default()
    };
    let authorizer = |kind: &str, behavior| on_loopback(&node, kind == "Grpc", behavior);
    let failures = [
        ("timeout-http", "Http", slow.clone()),
        ("timeout-grpc", "Grpc", slow),
        ("status-500", "Http", failing(Failure::Status(500))),
        ("closed-http", "Http", failing(Failure::Close)),
        ("rpc-error", "Grpc", failing(Failure::Close)),
    ]
    .map(|(name, kind, behavior)| (name, kind, authorizer(kind, behavior)));
    // Bound, then closed at once: nothing listens there.
    let refused = authorizer("Http", Behavior::default()).http_addr().port();
    let mut providers: Vec<(&str, &str, u16)> = failures
        .iter()
        .map(|(name, kind, a)| {
            let addr = if *kind == "Grpc" {
                a.grpc_addr()
            } else {
                a.http_addr()
            };
            (*name, *kind, addr.port())
        })
        .collect();
    providers.extend([
        ("refused-http", "Http", refused),
        ("refused-grpc", "Grpc", refused),
    ]);
    let mesh = files.join("mesh.yaml");
    let write_mesh = |mode: &str| {
        let mut text = String::from("extensionProviders:\n");
        for (name, kind, port) in &providers {
            let _ = write!(
                text,
                "- name: {name}\n  envoyExtAuthz{kind}:\n    service: 127.0.0.1\n    port: {port}\n    timeout: 0.5s\n{mode}"
            );
        }
        std::fs::write(&mesh, text).expect("write mesh config");
    };
    write_mesh("");
    let paths = ["/headers", "/deny-after", "/other"];
    let names: Vec<&str> = providers.iter().map(|(name, _, _)| *name).collect();
    let mut policies: String = names
        .iter()
        .map(|name| custom(name, name, &paths))
        .collect();
    // Namespace-wide: DENY /deny-after; ALLOW /headers and /deny-after (DENY wins there).
    policies.push_str(&policy("deny-after", "", "DENY", "", &["/deny-after"], ""));
    let allowed = ["/headers", "/deny-after"];
    policies.push_str(&policy("allow-headers", "", "ALLOW", "", &allowed, ""));
    let env = start(node, &cgroup, &mesh, &pods(&names), &policies);

    let phases: [(&str, Answers); 3] = [
        ("", [(403, Some("")); 3]),
        ("    statusOnError: \"503\"\n", [(503, Some("")); 3]),
        (
            "    failOpen: true\n",
            [(200, None), (403, Some(DENIED)), (403, Some(DENIED))],
        ),
    ];
    for (phase, (mode, want)) in phases.iter().enumerate() {
        if phase > 0 {
            write_mesh(mode);
            // The refused provider fails at once: poll it until the edit applies.
            let applied = eventually(Duration::from_secs(10), || {
                get(&env, "refused-http", "/headers", &[ALLOW]).status == want[0].0
            });
            assert!(applied, "mode {mode:?} was not applied: {}", env.log());
        }
        for name in &names {
            for (path, (status, body)) in paths.iter().zip(want) {
                let started = Instant::now();
                let r = get(&env, name, path, &[ALLOW]);
                let took = started.elapsed();
                let row = format!("{name} {path}, mode {mode:?}");
                assert_eq!(r.status, *status, "{row}: {r:?}");
                match body {
                    Some(body) => assert_eq!(r.body, *body, "{row}"),
                    None => assert_eq!(r.seen()["uri"], *path, "{row}"),
                }
                assert!(took < Duration::from_millis(2500), "{row}: {took:?}");
            }
        }
    }
    mesh_config_edits(&env, &mesh, refused);
    // Every failing provider received each request and each was counted as an error.
    for (name, _, authorizer) in &failures {
        assert_eq!(authorizer.count(), 9, "{name}");
        assert_eq!(checks_total(&env, name, "error"), 9, "{name}");
    }
    let error = [
        "provider=\"timeout-grpc\"",
        "provider_result=\"error\"",
        "status=503",
        "reason=provider_error",
    ];
    assert_eq!(access_lines(&env, &error, 3).len(), 3, "{}", env.log());
}

/// Edits of the mesh config after the `failOpen: true` phase. A file that is not a
/// `MeshConfig` is reported and the last good providers keep serving; a provider that fails
/// validation (a port out of range) makes the CUSTOM policies naming it deny what they match,
/// as Istio does, while the other providers serve.
fn mesh_config_edits(env: &Env, mesh: &Path, refused: u16) {
    let errors = || env.agent().metric("nodeward_config_errors");
    assert_eq!(errors(), 0, "{}", env.log());
    let good = std::fs::read_to_string(mesh).expect("mesh config");
    std::fs::write(mesh, "extensionProviders: [\n").expect("write mesh config");
    let reported = eventually(Duration::from_secs(10), || errors() > 0);
    assert!(
        reported,
        "a broken mesh config was not reported: {}",
        env.log()
    );
    for pod in ["refused-http", "refused-grpc"] {
        let r = get(env, pod, "/headers", &[ALLOW]);
        assert_eq!(r.status, 200, "{pod}, last good (failOpen): {r:?}");
    }
    let from = format!(
        "- name: refused-http\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {refused}\n"
    );
    assert!(good.contains(&from), "{good}");
    let to = from.replace(&format!("port: {refused}"), "port: 70000");
    std::fs::write(mesh, good.replace(&from, &to)).expect("write mesh config");
    let applied = eventually(Duration::from_secs(10), || {
        get(env, "refused-http", "/headers", &[ALLOW]).status == 403
    });
    assert!(applied, "the invalid provider still serves: {}", env.log());
    let r = get(env, "refused-http", "/headers", &[ALLOW]);
    assert_eq!(r.answer(), (403, DENIED), "{r:?}");
    let r = get(env, "refused-grpc", "/headers", &[ALLOW]);
    assert_eq!(r.status, 200, "the other providers serve: {r:?}");
    assert!(errors() > 0, "the invalid provider is reported");
}

/// The node of the header and body rows: one authorizer per provider on the node's loopback.
/// Fields drop in order: the agent and the node, the authorizers, the files.
struct Changes {
    env: Env,
    hdr_http: ExtAuthz,
    hdr_grpc: ExtAuthz,
    body_http: ExtAuthz,
    body_grpc: ExtAuthz,
    _files: TempDir,
}

/// The client headers of the header rows.
const CLIENT_HEADERS: [&str; 6] = [
    ALLOW,
    "x-include-a: 1",
    "x-not-included: 2",
    "x-remove-me: bye",
    "x-replace: old",
    "authorization: Basic dXNlcjpwYXNz",
];

/// The header rows' authorizers: more headers on allow (for the pod, to remove, for the
/// client), query changes (gRPC), and a 401 denial with its own headers and body.
fn changes_behavior() -> Behavior {
    let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    };
    Behavior {
        upstream_on_allow: pairs(&[
            ("x-up-user", "alice"),
            ("x-not-listed", "no"),
            ("x-replace", "new"),
        ]),
        append_on_allow: pairs(&[("x-append", "two")]),
        remove_on_allow: vec!["x-remove-me".into()],
        downstream_on_allow: pairs(&[("x-down-allow", "yes")]),
        query_set: pairs(&[("added", "yes")]),
        query_remove: vec!["drop".into()],
        deny_status: 401,
        deny_headers: pairs(&[
            ("x-down-deny", "yes"),
            ("x-other-deny", "no"),
            ("www-authenticate", "Basic realm=\"ext\""),
        ]),
        deny_body: "custom denial".into(),
        ..Behavior::default()
    }
}

impl Changes {
    fn start() -> Self {
        let (node, cgroup, files) = node("xa-hdr");
        let changes = changes_behavior();
        let hdr_http = on_loopback(&node, false, changes.clone());
        let hdr_grpc = on_loopback(&node, true, changes);
        let body_http = on_loopback(&node, false, Behavior::default());
        let body_grpc = on_loopback(&node, true, Behavior::default());
        let mesh = files.join("mesh.yaml");
        let text = format!(
            "extensionProviders:\n\
- name: hdr-http\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {hh}\n    pathPrefix: /check\n    includeRequestHeadersInCheck: [\"x-ext-authz\", \"x-include-*\"]\n    includeAdditionalHeadersInCheck: {{x-fixed: one, x-ext-authz-additional-header-override: from-mesh}}\n    headersToUpstreamOnAllow: [\"x-ext-authz-check-result\", \"x-up-*\", \"x-replace\"]\n    headersToDownstreamOnAllow: [\"x-down-allow\"]\n    headersToDownstreamOnDeny: [\"x-down-deny\", \"x-ext-authz-check-result\"]\n\
- name: hdr-grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {hg}\n\
- name: body-strict\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {bh}\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n    includeRequestBodyInCheck: {{maxRequestBytes: 16}}\n\
- name: body-partial\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {bh}\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n    includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: true}}\n\
- name: body-grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {bg}\n    includeRequestBodyInCheck: {{maxRequestBytes: 16, allowPartialMessage: true, packAsBytes: true}}\n",
            hh = hdr_http.http_addr().port(),
            hg = hdr_grpc.grpc_addr().port(),
            bh = body_http.http_addr().port(),
            bg = body_grpc.grpc_addr().port(),
        );
        std::fs::write(&mesh, text).expect("write mesh config");
        let names = [
            "hdr-http",
            "hdr-grpc",
            "body-strict",
            "body-partial",
            "body-grpc",
        ];
        let paths = ["/headers", "/post", "/deny-alice"];
        let mut policies: String = names
            .iter()
            .map(|name| custom(name, name, &paths))
            .collect();
        // DENY on a header that only the provider sets.
        let alice = "[{key: \"request.headers[x-up-user]\", values: [\"alice\"]}]";
        let deny_alice = policy(
            "deny-alice",
            "hdr-http",
            "DENY",
            "",
            &["/deny-alice"],
            alice,
        );
        policies.push_str(&deny_alice);
        let env = start(node, &cgroup, &mesh, &pods(&names), &policies);
        Self {
            env,
            hdr_http,
            hdr_grpc,
            body_http,
            body_grpc,
            _files: files,
        }
    }
}

/// The request and answer changes a provider asks for, and what the check carries, as
/// Istio's provider fields configure Envoy: `pathPrefix`, `includeRequestHeadersInCheck`,
/// `includeAdditionalHeadersInCheck`, `headersToUpstreamOnAllow`, `headersToDownstreamOnAllow`,
/// `headersToDownstreamOnDeny`, `includeRequestBodyInCheck` (`maxRequestBytes`,
/// `allowPartialMessage`, `packAsBytes`); gRPC `ok_response` (headers set, appended and
/// removed, `response_headers_to_add`, query parameters) and `denied_response`.
#[test]
fn provider_headers_and_bodies() {
    let changes = Changes::start();
    http_provider_headers(&changes);
    grpc_provider_headers(&changes);
    request_bodies(&changes);
}

/// The HTTP check: `pathPrefix` + the path with its query; Host, Authorization and
/// Content-Length always (Envoy adds them to the allowed headers); the listed client headers
/// by exact name and prefix, no others; the additional headers, overriding. The answer: the
/// headers `headersToUpstreamOnAllow` lists set on the request (replacing), those named by
/// `x-envoy-auth-headers-to-remove` removed, `headersToDownstreamOnAllow` for the client; a
/// denial's status, body, listed headers and `WWW-Authenticate`. DENY sees the request as the
/// provider left it (Envoy's RBAC filter runs after `ext_authz`).
fn http_provider_headers(changes: &Changes) {
    let env = &changes.env;
    let r = get(env, "hdr-http", "/headers?q=1", &CLIENT_HEADERS);
    let got = r.seen();
    let c = changes.hdr_http.last().expect("a check");
    let path = (c.method.as_str(), c.path.as_str());
    assert_eq!(path, ("GET", "/check/headers?q=1"));
    assert_eq!(c.host, format!("{}:8000", env.pod("hdr-http").ip));
    for (name, value) in [
        ("x-ext-authz", "allow"),
        ("x-include-a", "1"),
        ("authorization", "Basic dXNlcjpwYXNz"),
        ("content-length", "0"),
        ("x-fixed", "one"),
        (OVERRIDE_HEADER, "from-mesh"),
    ] {
        assert_eq!(c.header(name), Some(value), "{name}: {c:#?}");
    }
    for absent in ["x-not-included", "x-remove-me", "user-agent", "accept"] {
        assert!(c.header(absent).is_none(), "{absent} in the check: {c:#?}");
    }
    let h = &got["headers"];
    for (name, value) in [
        (RESULT_HEADER, "allowed"),
        ("x-up-user", "alice"),
        ("x-replace", "new"),
        ("x-include-a", "1"),
    ] {
        assert_eq!(h[name], value, "{name}: {got}");
    }
    for absent in [
        "x-not-listed",
        "x-remove-me",
        "x-down-allow",
        RECEIVED_HEADER,
    ] {
        assert!(h.get(absent).is_none(), "{absent} reached the pod: {got}");
    }
    assert_eq!(r.header("x-down-allow"), Some("yes"), "{r:?}");
    assert!(r.header("x-up-user").is_none(), "{r:?}");

    let r = get(env, "hdr-http", "/headers", &[DENY]);
    assert_eq!(r.answer(), (401, "custom denial"), "{r:?}");
    assert_eq!(r.header("x-down-deny"), Some("yes"), "{r:?}");
    assert_eq!(r.header(RESULT_HEADER), Some("denied"), "{r:?}");
    let basic = Some("Basic realm=\"ext\"");
    assert_eq!(r.header("www-authenticate"), basic, "{r:?}");
    assert!(r.header("x-other-deny").is_none(), "{r:?}");

    let r = get(env, "hdr-http", "/deny-alice", &[ALLOW]);
    assert_eq!(r.answer(), (403, DENIED), "{r:?}");

    // A login redirect (oauth2-proxy's way): the 302 and its Location reach the client, which
    // `headersToDownstreamOnDeny` does not need to list.
    let redirect = Behavior {
        deny_status: 302,
        deny_headers: vec![("location".into(), "https://login.example/?rd=/".into())],
        deny_body: String::new(),
        ..Behavior::default()
    };
    changes.hdr_http.set_behavior(redirect);
    let r = get(env, "hdr-http", "/headers", &[DENY]);
    changes.hdr_http.set_behavior(changes_behavior());
    assert_eq!(r.status, 302, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some("https://login.example/?rd=/"),
        "{r:?}"
    );
}

/// The gRPC check carries every client header; `ok_response` headers are set (replacing) or
/// appended, `headers_to_remove` removed, `response_headers_to_add` given to the client, query
/// parameters removed then set; `denied_response` is the client's answer.
fn grpc_provider_headers(changes: &Changes) {
    let env = &changes.env;
    let r = get(env, "hdr-grpc", "/headers?keep=1&drop=2", &CLIENT_HEADERS);
    let got = r.seen();
    let c = changes.hdr_grpc.last().expect("a check");
    assert_eq!(c.path, "/headers?keep=1&drop=2");
    for present in [
        "x-include-a",
        "x-not-included",
        "x-remove-me",
        "authorization",
        "user-agent",
    ] {
        assert!(
            c.header(present).is_some(),
            "{present} is not in the check: {c:#?}"
        );
    }
    assert_eq!(got["uri"], "/headers?keep=1&added=yes", "{got}");
    let h = &got["headers"];
    for (name, value) in [
        (RESULT_HEADER, "allowed"),
        (OVERRIDE_HEADER, OVERRIDE_GRPC_VALUE),
        ("x-up-user", "alice"),
        // Every header of a gRPC answer applies (no list filters them).
        ("x-not-listed", "no"),
        ("x-replace", "new"),
        // Appended to a header the client did not send (the pod's JSON keeps one value per
        // name, so an append to an existing header cannot be told from a replacement here).
        ("x-append", "two"),
    ] {
        assert_eq!(h[name], value, "{name}: {got}");
    }
    assert!(h.get("x-remove-me").is_none(), "{got}");
    assert_eq!(r.header("x-down-allow"), Some("yes"), "{r:?}");

    let r = get(env, "hdr-grpc", "/headers", &[DENY]);
    assert_eq!(r.answer(), (401, "custom denial"), "{r:?}");
    assert_eq!(r.header("x-down-deny"), Some("yes"), "{r:?}");
}

/// `includeRequestBodyInCheck`. Within `maxRequestBytes`: the whole body in the check, with
/// its Content-Length and `x-envoy-auth-partial-body: false`. Beyond it without
/// `allowPartialMessage`: 413 before any check. With it: the first `maxRequestBytes` in the
/// check, marked partial. gRPC with `packAsBytes`: `raw_body`, and the size of the whole
/// request. The pod always gets the whole body.
fn request_bodies(changes: &Changes) {
    let env = &changes.env;
    let (small, large) = ("0123456789", "abcdefghij".repeat(10));
    let post = |pod: &str, body: &str| {
        let call = Call {
            method: "POST",
            data: Some(body),
            ..GET
        };
        call.send(env, pod, "/post", &[ALLOW])
    };
    let pod_body = |r: &Reply| r.seen()["body_len"].as_u64().unwrap_or(u64::MAX);
    let partial = |c: &Check| c.header("x-envoy-auth-partial-body").map(str::to_owned);

    let r = post("body-strict", small);
    assert_eq!(pod_body(&r), 10, "{r:?}");
    let c = changes.body_http.last().expect("a check");
    assert_eq!(c.body, small.as_bytes());
    assert_eq!(c.header("content-length"), Some("10"));
    assert_eq!(partial(&c).as_deref(), Some("false"));

    let asked = changes.body_http.count();
    let r = post("body-strict", &large);
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(
        changes.body_http.count(),
        asked,
        "no check over maxRequestBytes"
    );

    let r = post("body-partial", &large);
    assert_eq!(pod_body(&r), 100, "{r:?}");
    let c = changes.body_http.last().expect("a check");
    assert_eq!(c.body, &large.as_bytes()[..16]);
    assert_eq!(partial(&c).as_deref(), Some("true"));

    let r = post("body-grpc", &large);
    assert_eq!(pod_body(&r), 100, "{r:?}");
    let c = changes.body_grpc.last().expect("a check");
    assert!(c.raw_body, "{c:#?}");
    assert_eq!(c.body, &large.as_bytes()[..16]);
    assert_eq!(c.size, 100);
    assert_eq!(partial(&c).as_deref(), Some("true"));

    // Beyond 1 KiB curl waits for `100 Continue`, which the enforcer gives when it reads the
    // body for the check.
    let huge = "0123456789abcdef".repeat(250);
    let r = post("body-partial", &huge);
    assert_eq!(pod_body(&r), 4000, "{r:?}");
    let c = changes.body_http.last().expect("a check");
    assert_eq!(c.body, &huge.as_bytes()[..16]);
    assert_eq!(post("body-strict", &huge).status, 413);
    // A chunked body (no Content-Length) within the limit.
    let chunked = Call {
        curl: &["-H", "Transfer-Encoding: chunked"],
        method: "POST",
        data: Some(small),
        ..GET
    };
    let r = chunked.send(env, "body-strict", "/post", &[ALLOW]);
    assert_eq!(pod_body(&r), 10, "{r:?}");
    let c = changes.body_http.last().expect("a check");
    assert_eq!(c.body, small.as_bytes());
    assert_eq!(partial(&c).as_deref(), Some("false"));
    // The same over h2c: the body read from the stream for the check, then sent on whole.
    let h2 = Call {
        curl: &["--http2-prior-knowledge"],
        method: "POST",
        data: Some(&large),
        ..GET
    };
    let r = h2.send(env, "body-partial", "/post", &[ALLOW]);
    assert_eq!(pod_body(&r), 100, "{r:?}");
    let c = changes.body_http.last().expect("a check");
    assert_eq!(c.body, &large.as_bytes()[..16]);
    assert_eq!(h2.send(env, "body-strict", "/post", &[ALLOW]).status, 413);
    // A provider without `includeRequestBodyInCheck`: an empty check, the body to the pod.
    let r = post("hdr-http", small);
    assert_eq!(pod_body(&r), 10, "{r:?}");
    let c = changes.hdr_http.last().expect("a check");
    assert!(c.body.is_empty(), "{c:#?}");
    assert_eq!(c.header("content-length"), Some("0"));

    let r = get(env, "body-strict", "/headers", &[ALLOW]);
    assert_eq!(pod_body(&r), 0, "{r:?}");
    let c = changes.body_http.last().expect("a check");
    assert!(c.body.is_empty(), "{c:#?}");
    assert_eq!(partial(&c).as_deref(), Some("false"));
}

/// A verified JWT is not forwarded to the provider: Istio runs `jwt_authn` (which removes the
/// token, `forwardOriginalToken: false` by default) before `ext_authz`, so neither an HTTP
/// provider (to which Envoy always sends `Authorization`) nor a gRPC one sees the token.
#[test]
fn a_verified_token_is_not_forwarded_to_the_provider() {
    let (node, cgroup, files) = node("xa-jwt");
    let http = on_loopback(&node, false, Behavior::default());
    let grpc = on_loopback(&node, true, Behavior::default());
    let mesh = files.join("mesh.yaml");
    let text = format!(
        "extensionProviders:\n- name: jwt-http\n  envoyExtAuthzHttp:\n    service: 127.0.0.1\n    port: {}\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n- name: jwt-grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {}\n",
        http.http_addr().port(),
        grpc.grpc_addr().port()
    );
    std::fs::write(&mesh, text).expect("write mesh config");
    let policies = [
        request_authn("jwt-http"),
        request_authn("jwt-grpc"),
        custom("jwt-http", "jwt-http", &["/headers"]),
        custom("jwt-grpc", "jwt-grpc", &["/headers"]),
    ]
    .concat();
    let env = start(
        node,
        &cgroup,
        &mesh,
        &pods(&["jwt-http", "jwt-grpc"]),
        &policies,
    );
    let demo = bearer(&sample("demo.jwt"));
    for (pod, authorizer) in [("jwt-http", &http), ("jwt-grpc", &grpc)] {
        let got = get(&env, pod, "/headers", &[ALLOW, &demo]).seen();
        assert!(got["headers"].get("authorization").is_none(), "{got}");
        let c = authorizer.last().expect("a check");
        let seen = c.header("authorization");
        assert!(seen.is_none(), "{pod}: the provider saw the token: {c:#?}");
    }
}

/// A gRPC provider's `error_response`, as Envoy's `CheckResponse` documents it: "When
/// `error_response` is set, the `ext_authz` filter increments the `ext_authz_error` stat and
/// respects the `failure_mode_allow` configuration. The HTTP status code, headers, and body are
/// taken from the `DeniedHttpResponse` message. If the status field is not set, Envoy sends the
/// status code configured via `status_on_error`". So with `failOpen: false` the client gets the
/// provider's 502, body and headers, not `statusOnError` with an empty body; with
/// `failOpen: true` the request goes on.
#[test]
fn a_grpc_error_response_is_the_clients_answer_unless_fail_open() {
    let (node, cgroup, files) = node("xa-err");
    let failing = Behavior {
        failure: Some(Failure::Status(502)),
        ..Behavior::default()
    };
    let grpc = on_loopback(&node, true, failing);
    let mesh = files.join("mesh.yaml");
    let port = grpc.grpc_addr().port();
    let text = format!(
        "extensionProviders:\n- name: error-closed\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {port}\n- name: error-open\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {port}\n    failOpen: true\n"
    );
    std::fs::write(&mesh, text).expect("write mesh config");
    let policies = [
        custom("error-closed", "error-closed", &["/headers"]),
        custom("error-open", "error-open", &["/headers"]),
    ]
    .concat();
    let names = ["error-closed", "error-open"];
    let env = start(node, &cgroup, &mesh, &pods(&names), &policies);
    let r = get(&env, "error-open", "/headers", &[ALLOW]);
    assert_eq!(r.seen()["uri"], "/headers", "failOpen: the request goes on");
    let r = get(&env, "error-closed", "/headers", &[ALLOW]);
    assert_eq!(checks_total(&env, "error-closed", "error"), 1);
    assert_eq!(r.answer(), (502, FAILURE_BODY), "{r:?}");
    assert_eq!(r.header(RESULT_HEADER), Some("error"), "{r:?}");
}

/// CUSTOM holds on every path a kind node has into the pod, not only its address: a dual-stack
/// node (routed veths) with kube-proxy's iptables Service rules and portmap's hostPort rules,
/// the provider asked for the `ClusterIP` (both families), the `NodePort`, the hostPort (also
/// from the node's `127.0.0.1`, portmap's 0x2000 mark), and the pod's IPv6 address, from a
/// registered pod, an unregistered one and the node. Each answer is the provider's (Istio's
/// task: `deny` gets the sample's 403 and body, `allow` reaches the pod with the sample's
/// header), and each check names the pod's own address after every NAT as the destination.
#[test]
fn custom_holds_on_every_path_into_the_pod() {
    let mut node = TestNode::with_options(
        "xa-paths",
        NodeOptions {
            cni: Cni::Routed,
            dual_stack: true,
            index: 0,
        },
    );
    let cgroup = node.use_cgroup().to_str().expect("utf-8").to_owned();
    let files = TempDir::new("xa-paths");
    let grpc = on_loopback(&node, true, Behavior::default());
    let mesh = files.join("mesh.yaml");
    let text = format!(
        "extensionProviders:\n- name: paths-grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {}\n",
        grpc.grpc_addr().port()
    );
    std::fs::write(&mesh, text).expect("write mesh config");
    let policies = custom("web", "paths-grpc", &["/headers"]);
    let specs = [("web", 12, Some("web")), ("stranger", 21, None)];
    let mut env = start(node, &cgroup, &mesh, &specs, &policies);
    let web = env.pod("web").clone();
    let (web4, web6) = (web.ip, web.ip6.expect("dual-stack"));
    // The harness serves IPv4 only.
    let server = nodeward_tests::pod_server_bin();
    env.node
        .spawn(&web.netns, &server, &[&format!("[{web6}]:8000")]);
    let service = Service::new("foo/web:http", service_ip(12), 80, 8000, &[&web])
        .with_node_port(30080)
        .with_cluster_ip6(service_ip6(12));
    install_services(&env.node, ProxyMode::Iptables, &[service]);
    install_hostport(&env.node, &web, 18000, 8000);
    let node_addr = env.node.addr();

    let (svc4, svc6) = (service_ip(12), service_ip6(12));
    let rows = [
        ("sleep", format!("http://{svc4}/headers"), web4.to_string()),
        (
            "stranger",
            format!("http://{svc4}/headers"),
            web4.to_string(),
        ),
        ("node", format!("http://{svc4}/headers"), web4.to_string()),
        ("web", format!("http://{svc4}/headers"), web4.to_string()),
        (
            "sleep",
            format!("http://[{svc6}]/headers"),
            format!("[{web6}]"),
        ),
        (
            "stranger",
            format!("http://{node_addr}:30080/headers"),
            web4.to_string(),
        ),
        (
            "stranger",
            format!("http://{node_addr}:18000/headers"),
            web4.to_string(),
        ),
        (
            "node",
            "http://127.0.0.1:18000/headers".to_owned(),
            web4.to_string(),
        ),
        (
            "stranger",
            format!("http://[{web6}]:8000/headers"),
            format!("[{web6}]"),
        ),
        (
            "node",
            format!("http://[{web6}]:8000/headers"),
            format!("[{web6}]"),
        ),
    ];
    for (from, url, destination) in &rows {
        provider_answers(&env, &grpc, from, url, destination);
    }
}

/// `from` (a pod's name, or `node`) → `url`: the provider denies `deny` and allows `allow`,
/// one check each, for the pod's address `destination` (`ip` or `[ip6]`) port 8000.
fn provider_answers(env: &Env, grpc: &ExtAuthz, from: &str, url: &str, destination: &str) {
    let netns = if from == "node" {
        env.node.netns.clone()
    } else {
        env.pod(from).netns.clone()
    };
    let asked = grpc.count();
    let (status, body) = env.node.curl_within(SHORT + 1, &netns, "GET", url, &[DENY]);
    assert_eq!(
        (status, body.as_str()),
        (403, DENY_BODY),
        "{from} -> {url}: not the provider's denial\n{}",
        env.log()
    );
    assert_eq!(grpc.count(), asked + 1, "{from} -> {url}: one check");
    let c = grpc.last().expect("a check");
    let to = c.destination.as_ref().map(|d| d.address.as_str());
    assert_eq!(
        to,
        Some(format!("{destination}:8000").as_str()),
        "{from} -> {url}: the destination after NAT: {c:#?}"
    );
    assert_eq!(c.path, "/headers", "{from} -> {url}");

    let (status, body) = env
        .node
        .curl_within(SHORT + 1, &netns, "GET", url, &[ALLOW]);
    assert_eq!(status, 200, "{from} -> {url}: {body}\n{}", env.log());
    let got = seen(&body);
    assert_eq!(
        got["headers"][RESULT_HEADER], "allowed",
        "{from} -> {url}: {got}"
    );
    assert_eq!(grpc.count(), asked + 2, "{from} -> {url}: one check each");
}

/// One HTTP/1.1 answer read from `stream` (head and a `Content-Length` body); what came when
/// the peer closes or stays silent for 2 s.
fn read_answer(stream: &mut std::net::TcpStream) -> String {
    use std::io::Read as _;
    let mut got = Vec::new();
    let mut buf = [0_u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return text;
            }
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return text,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A keep-alive connection opened before a CUSTOM policy existed: its next request is checked
/// by the provider, as Envoy evaluates every request of a connection with the configuration in
/// force (Istio pushes a new filter chain; the old connection's requests are not grandfathered).
#[test]
fn a_connection_from_before_the_custom_policy_is_checked() {
    use std::io::Write as _;
    let (node, cgroup, files) = node("xa-old");
    let grpc = on_loopback(&node, true, Behavior::default());
    let mesh = files.join("mesh.yaml");
    let text = format!(
        "extensionProviders:\n- name: later-grpc\n  envoyExtAuthzGrpc:\n    service: 127.0.0.1\n    port: {}\n",
        grpc.grpc_addr().port()
    );
    std::fs::write(&mesh, text).expect("write mesh config");
    // `web` is protected from the start (an ALLOW policy everyone matches), without CUSTOM.
    let allow_all = policy("allow-all", "web", "ALLOW", "", &["*"], "");
    let env = start(node, &cgroup, &mesh, &pods(&["web"]), &allow_all);
    let web = env.pod("web").ip;
    let request = format!("GET /headers HTTP/1.1\r\nHost: {web}:8000\r\n{DENY}\r\n\r\n");
    let mut stream = nodeward_tests::netns::in_netns(&env.pod("sleep").netns, || {
        std::net::TcpStream::connect((web, 8000)).expect("connect to web")
    });
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("write");
    let answer = read_answer(&mut stream);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(grpc.count(), 0, "no CUSTOM policy yet");

    let current = std::fs::read_to_string(env.policy_file()).expect("policies");
    let with_custom = format!("{current}{}", custom("web", "later-grpc", &["/headers"]));
    std::fs::write(env.policy_file(), with_custom).expect("write policies");
    let applied = eventually(Duration::from_secs(10), || {
        get(&env, "web", "/headers", &[DENY]).status == 403
    });
    assert!(applied, "the CUSTOM policy applies\n{}", env.log());

    let asked = grpc.count();
    let sent = stream.write_all(request.as_bytes());
    let answer = if sent.is_ok() {
        read_answer(&mut stream)
    } else {
        String::new()
    };
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.ends_with(DENY_BODY),
        "the old connection's request was not the provider's to decide: {answer:?}"
    );
    assert_eq!(grpc.count(), asked + 1, "the provider was asked");
}
