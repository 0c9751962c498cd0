//! Authorization cost per request, and what it grows with.
//!
//! Run from the workspace root with `cargo bench -p nodeward --bench authz` (add a filter such
//! as `-- evaluate/principals` to run one group). Criterion prints a confidence interval for
//! the time per call; medians are in `target/criterion/<group>/<n>/new/estimates.json`.
//!
//! What is measured (policies are generated as YAML text, read with `policy::load_str` and
//! compiled once, outside the timed loop; only the call named in the ID is timed):
//!
//! - `evaluate/policies/{1,100,1000}`: one `WorkloadPolicies::evaluate` for a workload that
//!   N policies select, three ALLOW to one DENY, each with principals, requestPrincipals,
//!   methods, paths and `when` conditions on a header and a JWT claim. The request matches
//!   only the last ALLOW policy, so every DENY and every ALLOW policy is tried: this is the
//!   worst case, and it grows with N (policies are tried in order): linearly, or a little
//!   worse once the compiled policies no longer fit in the CPU caches.
//!   Non-matching policies fail at different points (source, operation, `when`) so that the
//!   walk is not just one failed lookup per policy.
//! - `evaluate/policies_no_match/{1,100,1000}`: the same policies and a request that none
//!   matches (denied after the whole list), also linear in N.
//! - `evaluate/principals/{10,10000}`: one ALLOW policy whose `principals` lists N exact
//!   identities; the request comes from the last one listed. `evaluate/principals_miss/..`:
//!   from an identity that is not listed. Both must be *flat*: the 10,000-principal time the
//!   same as the 10-principal time within measurement noise, because exact values are hashed
//!   at compile time and a request costs one lookup. A scan of the list would make the
//!   10,000 case about a thousand times slower (tens of microseconds instead of ~100 ns).
//! - `for_workload/{1,100,1000}`: picking the policies that apply to one workload out of N
//!   spread over namespaces (ten per namespace, half of them selecting the workload, plus
//!   one mesh-wide policy in the root namespace). This depends on the policies of the
//!   workload's namespace, not on N: 100 and 1000 (ten policies in the namespace each) are
//!   expected to be close; 1 has a single policy in the namespace and is cheaper.
//! - `compile/1000`: `PolicySet::compile` of the 1,000 policies of `evaluate/policies/1000`
//!   (the cost paid once per policy change, not per request).
//!
//! Before timing, each case checks that the decision is the one it is meant to measure, so a
//! change in matching semantics cannot make a benchmark silently measure something else.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use nodeward::authz::{
    AuthInfo, Decision, Http, Peer, PolicySet, Reason, Request, WorkloadPolicies,
};
use nodeward::policy::{load_str, AuthorizationPolicy};

/// The mesh root namespace: its policies apply to every namespace.
const ROOT_NAMESPACE: &str = "istio-system";
/// The namespace of the workload under test.
const NAMESPACE: &str = "shop";
/// The `app` label of the workload under test.
const APP: &str = "checkout";
/// The source workload's principal in the requests that should match.
const CALLER: &str = "cluster.local/ns/frontend/sa/web";
/// The JWT issuer of every request.
const ISSUER: &str = "https://idp.example.com";

const POLICY_COUNTS: [usize; 3] = [1, 100, 1000];
const PRINCIPAL_COUNTS: [usize; 2] = [10, 10_000];

/// One `AuthorizationPolicy` document selecting `app: <app>` in `namespace`; `rules` is the
/// YAML of `spec.rules`, indented for its place.
fn document(name: &str, namespace: &str, app: Option<&str>, action: &str, rules: &str) -> String {
    let selector = app.map_or_else(String::new, |app| {
        format!("  selector:\n    matchLabels:\n      app: {app}\n")
    });
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  \
         namespace: {namespace}\nspec:\n{selector}  action: {action}\n  rules:\n{rules}"
    )
}

/// An ALLOW rule of the kind a service owner writes: who (mTLS identity and JWT issuer), what
/// (methods, paths) and a tenant header plus a group claim.
fn allow_rules(principal: &str, path: &str, tenant: &str) -> String {
    format!(
        r#"  - from:
    - source:
        principals: ["{principal}"]
        requestPrincipals: ["{ISSUER}/*"]
    to:
    - operation:
        methods: ["GET", "POST"]
        paths: ["{path}", "/healthz"]
    when:
    - key: request.headers[x-tenant]
      values: ["{tenant}"]
    - key: request.auth.claims[groups]
      values: ["shoppers"]
"#
    )
}

/// DENY rules that the benchmark requests never match, failing at different points: in
/// `from` (namespace), in `to` (path) or only at the last `when` (a claim lookup).
fn deny_rules(i: usize) -> String {
    match i % 3 {
        0 => format!(
            r#"  - from:
    - source:
        namespaces: ["blocked-{i}"]
    to:
    - operation:
        methods: ["DELETE"]
"#
        ),
        1 => format!(
            r#"  - from:
    - source:
        notNamespaces: ["{ROOT_NAMESPACE}"]
    to:
    - operation:
        paths: ["/admin/{i}/*"]
"#
        ),
        _ => format!(
            r#"  - from:
    - source:
        requestPrincipals: ["*"]
    to:
    - operation:
        paths: ["/api/*"]
    when:
    - key: request.auth.claims[groups]
      values: ["banned-{i}"]
"#
        ),
    }
}

fn policy_name(i: usize) -> String {
    // Zero-padded so that name order (the evaluation order) is index order.
    format!("p-{i:05}")
}

/// `n` policies in [`NAMESPACE`], all selecting the workload: every fourth one DENY, the
/// rest ALLOW, the last always ALLOW. Only the last ALLOW policy matches
/// [`Fixture::matching_last`]: the others differ in principal (`i % 3 == 0`), path
/// (`i % 3 == 1`) or tenant (`i % 3 == 2`).
fn many_policies(n: usize) -> String {
    let docs: Vec<String> = (0..n)
        .map(|i| {
            let last = i + 1 == n;
            if i % 4 == 2 && !last {
                return document(
                    &policy_name(i),
                    NAMESPACE,
                    Some(APP),
                    "DENY",
                    &deny_rules(i),
                );
            }
            let other = format!("cluster.local/ns/ns-{i}/sa/sa-{i}");
            let principal = if i % 3 == 0 && !last {
                other.as_str()
            } else {
                CALLER
            };
            let path = if i % 3 == 2 && !last {
                "/api/*".to_owned()
            } else {
                format!("/api/v{i}/*")
            };
            let rules = allow_rules(principal, &path, &format!("tenant-{i}"));
            document(&policy_name(i), NAMESPACE, Some(APP), "ALLOW", &rules)
        })
        .collect();
    docs.join("---\n")
}

/// One ALLOW policy listing `n` exact principals `cluster.local/ns/ns-<i>/sa/sa-<i>`.
fn many_principals(n: usize) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| format!("\"{}\"", listed_principal(i)))
        .collect();
    let rules = format!(
        "  - from:\n    - source:\n        principals: [{}]\n",
        list.join(", ")
    );
    document("principals", NAMESPACE, Some(APP), "ALLOW", &rules)
}

fn listed_principal(i: usize) -> String {
    format!("cluster.local/ns/ns-{i}/sa/sa-{i}")
}

/// `n` policies spread over `max(1, n / 10)` namespaces (`ns-0`, ...), ten per namespace
/// (fewer for small `n`), alternately selecting `app: app-0` and `app: app-1` within each
/// namespace, plus one mesh-wide DENY policy in the root namespace.
fn spread_policies(n: usize) -> String {
    let namespaces = (n / 10).max(1);
    let mut docs: Vec<String> = (0..n)
        .map(|i| {
            let namespace = format!("ns-{}", i % namespaces);
            let app = format!("app-{}", (i / namespaces) % 2);
            let rules = allow_rules(CALLER, &format!("/api/v{i}/*"), &format!("tenant-{i}"));
            document(&policy_name(i), &namespace, Some(&app), "ALLOW", &rules)
        })
        .collect();
    docs.push(document(
        "mesh-wide",
        ROOT_NAMESPACE,
        None,
        "DENY",
        &deny_rules(0),
    ));
    docs.join("---\n")
}

/// Parses `yaml` the way the agent reads policy files; every document must be accepted.
fn load(yaml: &str, expected: usize) -> Vec<AuthorizationPolicy> {
    let loaded = load_str(Path::new("bench.yaml"), yaml);
    assert!(
        loaded.errors.is_empty(),
        "benchmark policies must load: {:?}",
        loaded.errors
    );
    assert_eq!(loaded.authorization_policies.len(), expected);
    loaded.authorization_policies
}

/// The workload under test's policies out of `yaml`.
fn workload(yaml: &str, expected: usize) -> WorkloadPolicies {
    let set = PolicySet::compile(&load(yaml, expected), ROOT_NAMESPACE);
    set.for_workload(NAMESPACE, &labels(APP))
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app".to_owned(), app.to_owned()),
        ("version".to_owned(), "v1".to_owned()),
    ])
}

/// What a request borrows: headers, the validated JWT's identity, path and principal.
struct Fixture {
    principal: String,
    path: String,
    headers: http::HeaderMap,
    auth: AuthInfo,
}

impl Fixture {
    fn new(principal: &str, path: &str, tenant: &str) -> Self {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-tenant",
            http::HeaderValue::from_str(tenant).expect("a valid header value"),
        );
        headers.insert(
            http::header::USER_AGENT,
            http::HeaderValue::from_static("bench/1.0"),
        );
        headers.insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/json"),
        );
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": "user-1",
            "aud": ["checkout"],
            "groups": ["customers", "shoppers"],
            "scope": "read write",
        });
        let serde_json::Value::Object(claims) = claims else {
            unreachable!("a JSON object literal")
        };
        Self {
            principal: principal.to_owned(),
            path: path.to_owned(),
            headers,
            auth: AuthInfo::from_claims(claims, &[]),
        }
    }

    /// The request that the last ALLOW policy of `many_policies(n)` matches, and no other does.
    fn matching_last(n: usize) -> Self {
        let last = n - 1;
        Self::new(
            CALLER,
            &format!("/api/v{last}/orders"),
            &format!("tenant-{last}"),
        )
    }

    /// A request like [`Fixture::matching_last`] that no policy matches (wrong tenant).
    fn matching_none(n: usize) -> Self {
        let last = n - 1;
        Self::new(CALLER, &format!("/api/v{last}/orders"), "tenant-none")
    }

    fn request(&self) -> Request<'_> {
        Request {
            source: Peer {
                ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 7))),
                remote_ip: None,
                principal: Some(&self.principal),
                namespace: Some("frontend"),
                service_account: Some("frontend/web"),
            },
            destination_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 9))),
            destination_port: 8080,
            sni: None,
            http: Some(Http {
                method: "GET",
                path: &self.path,
                query: None,
                host: "checkout.shop.svc.cluster.local",
                headers: &self.headers,
                auth: Some(&self.auth),
            }),
        }
    }
}

fn assert_allowed_by(decision: &Decision, policy: &str) {
    assert_eq!(
        decision.reason,
        Reason::AllowedByPolicy,
        "{}",
        decision.describe()
    );
    assert_eq!(
        decision.decided_by.as_ref().map(|m| m.policy.as_str()),
        Some(policy)
    );
}

fn assert_no_allow_matched(decision: &Decision) {
    assert_eq!(
        decision.reason,
        Reason::NoAllowMatched,
        "{}",
        decision.describe()
    );
}

fn evaluate_policies(c: &mut Criterion) {
    let mut group = c.benchmark_group("evaluate/policies");
    let mut misses = Vec::new();
    for n in POLICY_COUNTS {
        let policies = workload(&many_policies(n), n);
        assert_eq!(
            policies.deny.len() + policies.allow.len(),
            n,
            "every policy selects the workload"
        );

        let hit = Fixture::matching_last(n);
        let request = hit.request();
        assert_allowed_by(
            &policies.evaluate(&request),
            &format!("{NAMESPACE}/{}", policy_name(n - 1)),
        );
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(&policies).evaluate(black_box(&request)));
        });

        let miss = Fixture::matching_none(n);
        assert_no_allow_matched(&policies.evaluate(&miss.request()));
        misses.push((n, policies, miss));
    }
    group.finish();

    let mut group = c.benchmark_group("evaluate/policies_no_match");
    for (n, policies, miss) in &misses {
        let request = miss.request();
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(policies).evaluate(black_box(&request)));
        });
    }
    group.finish();
}

fn evaluate_principals(c: &mut Criterion) {
    let cases: Vec<(usize, WorkloadPolicies)> = PRINCIPAL_COUNTS
        .iter()
        .map(|&n| (n, workload(&many_principals(n), 1)))
        .collect();
    let policy_id = format!("{NAMESPACE}/principals");

    let mut group = c.benchmark_group("evaluate/principals");
    for (n, policies) in &cases {
        let last = Fixture::new(&listed_principal(n - 1), "/", "tenant-0");
        let request = last.request();
        assert_allowed_by(&policies.evaluate(&request), &policy_id);
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(policies).evaluate(black_box(&request)));
        });
    }
    group.finish();

    let mut group = c.benchmark_group("evaluate/principals_miss");
    for (n, policies) in &cases {
        let stranger = Fixture::new(&listed_principal(*n), "/", "tenant-0");
        let request = stranger.request();
        assert_no_allow_matched(&policies.evaluate(&request));
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(policies).evaluate(black_box(&request)));
        });
    }
    group.finish();
}

fn select(c: &mut Criterion) {
    let mut group = c.benchmark_group("for_workload");
    let workload_labels = labels("app-0");
    for n in POLICY_COUNTS {
        let set = PolicySet::compile(&load(&spread_policies(n), n + 1), ROOT_NAMESPACE);
        let selected = set.for_workload("ns-0", &workload_labels);
        // Half of ns-0's (at most ten) policies, and the mesh-wide one.
        assert_eq!(selected.allow.len(), n.min(10).div_ceil(2));
        assert_eq!(selected.deny.len(), 1);
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| black_box(&set).for_workload(black_box("ns-0"), black_box(&workload_labels)));
        });
    }
    group.finish();
}

fn compile(c: &mut Criterion) {
    let mut group = c.benchmark_group("compile");
    // Milliseconds per iteration: fewer samples keep the run short.
    group.sample_size(10);
    let n = 1000;
    let policies = load(&many_policies(n), n);
    group.bench_function(BenchmarkId::from_parameter(n), |b| {
        b.iter(|| PolicySet::compile(black_box(&policies), ROOT_NAMESPACE));
    });
    group.finish();
}

fn config() -> Criterion {
    // About three seconds per benchmark ID, under a minute in all on a small machine.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = evaluate_policies, evaluate_principals, select, compile
}
criterion_main!(benches);
