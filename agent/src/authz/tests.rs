//! Table-driven tests: each row names the Istio behaviour it pins.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde_json::json;
use test_case::test_case;

use super::path::{normalize, Normalization};
use super::{AuthInfo, Decision, Http, Peer, PolicySet, Reason, Request};
use crate::policy::load_str;

/// A request as a test describes it; defaults: HTTP GET / to foo/httpbin on port 80 from an
/// unknown source.
#[derive(Clone)]
struct R {
    method: &'static str,
    path: &'static str,
    host: &'static str,
    port: u16,
    headers: Vec<(&'static str, &'static str)>,
    principal: Option<&'static str>,
    source_ip: Option<&'static str>,
    remote_ip: Option<&'static str>,
    dest_ip: Option<&'static str>,
    sni: Option<&'static str>,
    claims: Option<serde_json::Value>,
    tcp: bool,
}

fn get(path: &'static str) -> R {
    R {
        method: "GET",
        path,
        host: "httpbin.foo",
        port: 80,
        headers: Vec::new(),
        principal: None,
        source_ip: None,
        remote_ip: None,
        dest_ip: None,
        sni: None,
        claims: None,
        tcp: false,
    }
}

impl R {
    fn method(mut self, m: &'static str) -> Self {
        self.method = m;
        self
    }
    fn host(mut self, h: &'static str) -> Self {
        self.host = h;
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.port = p;
        self
    }
    fn header(mut self, n: &'static str, v: &'static str) -> Self {
        self.headers.push((n, v));
        self
    }
    fn from(mut self, principal: &'static str) -> Self {
        self.principal = Some(principal);
        self
    }
    fn ip(mut self, ip: &'static str) -> Self {
        self.source_ip = Some(ip);
        self
    }
    fn remote(mut self, ip: &'static str) -> Self {
        self.remote_ip = Some(ip);
        self
    }
    fn dest(mut self, ip: &'static str) -> Self {
        self.dest_ip = Some(ip);
        self
    }
    fn sni(mut self, s: &'static str) -> Self {
        self.sni = Some(s);
        self
    }
    fn token(mut self, claims: serde_json::Value) -> Self {
        self.claims = Some(claims);
        self
    }
    fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }
}

fn demo_token() -> serde_json::Value {
    json!({"iss": "testing@secure.istio.io", "sub": "testing@secure.istio.io", "groups": ["group1", "group2"], "scope": "read write", "aud": ["app-a", "app-b"], "azp": "web", "org": {"team": "blue", "size": 3, "admin": true}})
}

fn compile(yaml: &str) -> PolicySet {
    let loaded = load_str(Path::new("test.yaml"), yaml);
    assert!(
        loaded.errors.is_empty(),
        "policy did not load: {:?}",
        loaded.errors
    );
    PolicySet::compile(&loaded.authorization_policies, "istio-system")
}

fn decide_in(yaml: &str, namespace: &str, labels: &[(&str, &str)], r: &R) -> Decision {
    evaluate(&compile(yaml), namespace, labels, r, true)
}

/// Evaluates `r` against the policies `set` gives the workload; `custom: false` is the
/// evaluation after an allowing provider (DENY and ALLOW only).
fn evaluate(
    set: &PolicySet,
    namespace: &str,
    labels: &[(&str, &str)],
    r: &R,
    custom: bool,
) -> Decision {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let policies = set.for_workload(namespace, &labels);
    let mut headers = http::HeaderMap::new();
    for (n, v) in &r.headers {
        headers.append(
            http::HeaderName::from_static(n),
            http::HeaderValue::from_static(v),
        );
    }
    let auth = r
        .claims
        .clone()
        .map(|c| AuthInfo::from_claims(c.as_object().expect("claims object").clone(), &[]));
    let target = normalize(r.path, Normalization::Base).expect("test path normalizes");
    let parse = |s: Option<&str>| s.map(|s| s.parse::<IpAddr>().expect("test IP"));
    let (namespace_of, sa_of) = match r
        .principal
        .map(|p| p.split('/').collect::<Vec<_>>())
        .as_deref()
    {
        Some([_, "ns", ns, "sa", sa]) => (Some((*ns).to_owned()), Some(format!("{ns}/{sa}"))),
        _ => (None, None),
    };
    let req = Request {
        source: Peer {
            ip: parse(r.source_ip),
            remote_ip: parse(r.remote_ip),
            principal: r.principal,
            namespace: namespace_of.as_deref(),
            service_account: sa_of.as_deref(),
        },
        destination_ip: parse(r.dest_ip),
        destination_port: r.port,
        sni: r.sni,
        http: (!r.tcp).then_some(Http {
            method: r.method,
            path: &target.path,
            query: target.query.as_deref(),
            host: r.host,
            headers: &headers,
            auth: auth.as_ref(),
        }),
    };
    if custom {
        policies.evaluate(&req)
    } else {
        policies.evaluate_after_custom(&req)
    }
}

/// Status for foo/httpbin (labels app=httpbin, version=v1).
fn status(yaml: &str, r: &R) -> u16 {
    decide_in(yaml, "foo", &[("app", "httpbin"), ("version", "v1")], r).status()
}

/// An ALLOW policy in foo for app=httpbin with the given rules (YAML flow or block).
fn allow(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  action: ALLOW\n  rules: {rules}\n"
    )
}

fn deny(rules: &str) -> String {
    allow(rules).replace("action: ALLOW", "action: DENY")
}

// ---------------------------------------------------------------------------------------
// Which policies apply, and in which order.

#[test_case("", 200 ; "no policy at all: allowed")]
#[test_case("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-nothing, namespace: foo}\nspec: {}\n", 403 ; "spec {} is allow-nothing: denied")]
#[test_case(&allow("[{}]"), 200 ; "ALLOW with one empty rule allows everything")]
#[test_case(&deny("[{}]"), 403 ; "DENY with one empty rule denies everything")]
#[test_case(&format!("{}---\n{}", allow("[{}]"), deny("[{}]").replace("name: p", "name: d")), 403 ; "DENY is evaluated before ALLOW")]
#[test_case(&allow("[{to: [{operation: {paths: [/other]}}]}]"), 403 ; "ALLOW policies apply and none matches: denied")]
#[test_case(&allow("[{}]").replace("app: httpbin", "app: other"), 200 ; "selector that does not match the labels: policy does not apply")]
#[test_case(&allow("[{}]").replace("{app: httpbin}", "{app: httpbin, version: v2}"), 200 ; "selector is a subset match: every label must match")]
#[test_case(&allow("[{to: [{operation: {paths: [/x]}}]}]").replace("  selector: {matchLabels: {app: httpbin}}\n", ""), 403 ; "no selector applies to the whole namespace")]
#[test_case(&deny("[{}]").replace("namespace: foo", "namespace: istio-system").replace("  selector: {matchLabels: {app: httpbin}}\n", ""), 403 ; "a root-namespace policy applies mesh-wide")]
#[test_case(&deny("[{}]").replace("namespace: foo", "namespace: istio-system"), 403 ; "a root-namespace policy with a selector applies to matching workloads of every namespace")]
#[test_case(&deny("[{}]").replace("namespace: foo", "namespace: bar"), 200 ; "a policy of another namespace does not apply")]
#[test_case(&deny("[{}]").replace("  selector: {matchLabels: {app: httpbin}}\n", "  targetRefs: [{kind: Service, group: \"\", name: httpbin}]\n"), 200 ; "targetRefs policies apply to gateways and waypoints, not workloads")]
fn applicability_and_order(yaml: &str, expected: u16) {
    assert_eq!(status(yaml, &get("/")), expected);
}

/// A CUSTOM policy in foo for app=httpbin naming `provider`, for requests to `/ext*`.
fn custom(name: &str, provider: &str) -> String {
    deny("[{to: [{operation: {paths: [/ext*]}}]}]")
        .replace("name: p", &format!("name: {name}"))
        .replace(
            "action: DENY",
            &format!("action: CUSTOM\n  provider: {{name: {provider}}}"),
        )
}

/// The `MeshConfig` of Istio's ext-authz task: one gRPC and one HTTP provider, and one whose
/// port is invalid.
const MESH: &str = "extensionProviders:\n- name: grpc\n  envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 9000}\n- name: http\n  envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8000}\n- name: broken\n  envoyExtAuthzGrpc: {service: ext-authz.foo.svc.cluster.local, port: 0}\n";

fn with_mesh(yaml: &str) -> PolicySet {
    let mesh = crate::extauthz::MeshProviders::parse("mesh", MESH).expect("mesh");
    compile(yaml).with_providers(std::sync::Arc::new(mesh))
}

const HTTPBIN: &[(&str, &str)] = &[("app", "httpbin")];

#[test]
fn a_matching_custom_policy_hands_the_request_to_its_provider() {
    let set = with_mesh(&custom("c", "grpc"));
    let d = evaluate(&set, "foo", HTTPBIN, &get("/ext/a"), true);
    assert_eq!(
        (d.allow, d.reason, d.provider.as_deref()),
        (false, Reason::CustomCheck, Some("grpc"))
    );
    // Istio: only requests the CUSTOM rules match go to the provider; others go on.
    let d = evaluate(&set, "foo", HTTPBIN, &get("/other"), true);
    assert_eq!((d.allow, d.reason), (true, Reason::NoAllowPolicies));
}

#[test]
fn after_an_allowing_provider_deny_then_allow_still_apply() {
    // Envoy's RBAC filters run after ext_authz: a DENY policy still denies.
    let yaml = format!(
        "{}---\n{}",
        custom("c", "grpc"),
        deny("[{to: [{operation: {paths: [/ext/x]}}]}]").replace("name: p", "name: d")
    );
    let set = with_mesh(&yaml);
    let d = evaluate(&set, "foo", HTTPBIN, &get("/ext/x"), false);
    assert_eq!((d.allow, d.reason), (false, Reason::DeniedByPolicy));
    let d = evaluate(&set, "foo", HTTPBIN, &get("/ext/y"), false);
    assert_eq!((d.allow, d.reason), (true, Reason::NoAllowPolicies));
}

// Istio's builder (`getExtAuthz`): "available providers are ... but found", "found errors in
// provider", "only 1 provider can be used per workload": the CUSTOM rules become DENY rules.
#[test_case(&custom("c", "undefined"), "available providers are" ; "an undefined provider")]
#[test_case(&custom("c", "broken"), "found errors in provider broken" ; "an invalid provider")]
#[test_case(&format!("{}---\n{}", custom("a", "grpc"), custom("b", "http")), "only 1 provider" ; "two providers for one workload")]
fn a_custom_policy_whose_provider_cannot_be_called_denies_what_it_matches(yaml: &str, why: &str) {
    let set = with_mesh(yaml);
    let d = evaluate(&set, "foo", HTTPBIN, &get("/ext/a"), true);
    assert_eq!((d.allow, d.reason), (false, Reason::CustomProviderInvalid));
    let problem = d.provider_problem.clone().unwrap_or_default();
    assert!(problem.contains(why), "{problem}");
    assert!(d.describe().contains(why), "{}", d.describe());
    assert!(evaluate(&set, "foo", HTTPBIN, &get("/other"), true).allow);
}

#[test]
fn dry_run_does_not_apply_to_custom() {
    // Istio's validation: the dry-run annotation is refused on a CUSTOM policy, naming it.
    let yaml = custom("c", "grpc").replace(
        "name: c, namespace: foo",
        "name: c, namespace: foo, annotations: {istio.io/dry-run: \"true\"}",
    );
    let loaded = load_str(Path::new("test.yaml"), &yaml);
    let error = loaded
        .errors
        .first()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(error.contains("istio.io/dry-run"), "{error}");
    assert!(loaded.authorization_policies.is_empty());
}

#[test_case("grpc", Reason::CustomCheck ; "a gRPC provider checks TCP connections (Envoy's network ext_authz)")]
#[test_case("http", Reason::NoAllowPolicies ; "an HTTP provider is ignored on TCP, as Istio's builder does")]
#[test_case("undefined", Reason::CustomProviderInvalid ; "an undefined provider denies TCP too")]
fn custom_on_tcp(provider: &str, reason: Reason) {
    // Paths are HTTP-only: ignored in a CUSTOM rule on TCP, so the rule matches the connection.
    let set = with_mesh(&custom("c", provider));
    let d = evaluate(&set, "foo", HTTPBIN, &get("/").tcp(), true);
    assert_eq!(d.reason, reason);
}

#[test]
fn audit_only_marks() {
    let yaml = format!(
        "{}---\n{}",
        allow("[{}]").replace("action: ALLOW", "action: AUDIT"),
        deny("[{to: [{operation: {methods: [POST]}}]}]").replace("name: p", "name: d")
    );
    let d = decide_in(&yaml, "foo", &[("app", "httpbin")], &get("/"));
    assert!(d.allow, "AUDIT never changes the decision");
    assert_eq!(d.audit, vec!["foo/p".to_owned()]);
    let no_rules = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: a, namespace: foo}\nspec: {action: AUDIT}\n";
    let d = decide_in(no_rules, "foo", &[], &get("/"));
    assert!(
        d.allow && d.audit.is_empty(),
        "AUDIT without rules never matches, and is not an ALLOW policy"
    );
}

#[test]
fn dry_run_is_evaluated_and_reported_never_enforced() {
    let dry = |y: String| {
        y.replace(
            "metadata: {name: p, namespace: foo}",
            "metadata: {name: p, namespace: foo, annotations: {istio.io/dry-run: \"true\"}}",
        )
    };
    let d = decide_in(&dry(deny("[{}]")), "foo", &[("app", "httpbin")], &get("/"));
    assert!(d.allow, "a dry-run DENY does not deny");
    assert_eq!(d.dry_run.len(), 1);
    assert_eq!(d.dry_run[0].rule, Some(0));
    assert_eq!(d.shadow[0].result, "denied");
    let d = decide_in(
        &dry(allow("[{to: [{operation: {paths: [/x]}}]}]")),
        "foo",
        &[("app", "httpbin")],
        &get("/"),
    );
    assert!(d.allow, "a dry-run ALLOW does not count as an ALLOW policy");
    assert_eq!((d.dry_run[0].rule, d.shadow[0].result), (None, "denied"));
}

// ---------------------------------------------------------------------------------------
// Source fields. Principals come from the registry of pods by IP at the node.

#[test_case("[{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]", &get("/").from("cluster.local/ns/foo/sa/sleep"), 200 ; "principals exact")]
#[test_case("[{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]", &get("/").from("cluster.local/ns/foo/sa/other"), 403 ; "principals exact mismatch")]
#[test_case("[{from: [{source: {principals: [cluster.local/ns/foo/*]}}]}]", &get("/").from("cluster.local/ns/foo/sa/any"), 200 ; "principals prefix abc*")]
#[test_case("[{from: [{source: {principals: [\"*/sa/sleep\"]}}]}]", &get("/").from("cluster.local/ns/bar/sa/sleep"), 200 ; "principals suffix *abc")]
#[test_case("[{from: [{source: {principals: [\"*\"]}}]}]", &get("/").from("cluster.local/ns/bar/sa/x"), 200 ; "principals * matches any known workload")]
#[test_case("[{from: [{source: {principals: [\"*\"]}}]}]", &get("/"), 403 ; "principals * does not match an unknown source (like plaintext in Istio)")]
#[test_case("[{from: [{source: {notPrincipals: [\"*\"]}}]}]", &get("/"), 200 ; "notPrincipals * matches only unknown sources")]
#[test_case("[{from: [{source: {principals: [\"cluster.local/ns/foo/sa/a*b\"]}}]}]", &get("/").from("cluster.local/ns/foo/sa/aXb"), 403 ; "a star in the middle is a literal exact match")]
#[test_case("[{from: [{source: {principals: [spiffe://cluster.local/ns/foo/sa/sleep]}}]}]", &get("/").from("cluster.local/ns/foo/sa/sleep"), 200 ; "principals accept the spiffe scheme")]
#[test_case("[{from: [{source: {namespaces: [foo]}}]}]", &get("/").from("cluster.local/ns/foo/sa/x"), 200 ; "namespaces exact")]
#[test_case("[{from: [{source: {namespaces: [fo*]}}]}]", &get("/").from("cluster.local/ns/foo/sa/x"), 200 ; "namespaces prefix")]
#[test_case("[{from: [{source: {notNamespaces: [foo]}}]}]", &get("/").from("cluster.local/ns/foo/sa/x"), 403 ; "notNamespaces excludes")]
#[test_case("[{from: [{source: {serviceAccounts: [foo/sleep]}}]}]", &get("/").from("cluster.local/ns/foo/sa/sleep"), 200 ; "serviceAccounts namespace/name")]
#[test_case("[{from: [{source: {serviceAccounts: [sleep]}}]}]", &get("/").from("cluster.local/ns/foo/sa/sleep"), 200 ; "serviceAccounts bare name is in the policy's namespace")]
#[test_case("[{from: [{source: {serviceAccounts: [sleep]}}]}]", &get("/").from("cluster.local/ns/bar/sa/sleep"), 403 ; "serviceAccounts bare name does not match another namespace")]
#[test_case("[{from: [{source: {notServiceAccounts: [foo/sleep]}}]}]", &get("/").from("cluster.local/ns/foo/sa/sleep"), 403 ; "notServiceAccounts excludes")]
#[test_case("[{from: [{source: {ipBlocks: [10.1.0.0/16]}}]}]", &get("/").ip("10.1.2.3"), 200 ; "ipBlocks CIDR")]
#[test_case("[{from: [{source: {ipBlocks: [10.1.2.3]}}]}]", &get("/").ip("10.1.2.4"), 403 ; "ipBlocks single address")]
#[test_case("[{from: [{source: {ipBlocks: [10.1.2.3/8]}}]}]", &get("/").ip("10.9.9.9"), 200 ; "ipBlocks host bits are masked like Go's ParseCIDR")]
#[test_case("[{from: [{source: {notIpBlocks: [10.1.0.0/16]}}]}]", &get("/").ip("10.2.0.1"), 200 ; "notIpBlocks")]
#[test_case("[{from: [{source: {remoteIpBlocks: [192.168.0.0/16]}}]}]", &get("/").ip("10.0.0.1").remote("192.168.1.1"), 200 ; "remoteIpBlocks use the original client")]
#[test_case("[{from: [{source: {remoteIpBlocks: [10.0.0.1]}}]}]", &get("/").ip("10.0.0.1"), 200 ; "remote ip is the peer when no proxy is trusted")]
#[test_case("[{from: [{source: {requestPrincipals: [\"*\"]}}]}]", &get("/"), 403 ; "requestPrincipals * requires a token")]
#[test_case("[{from: [{source: {requestPrincipals: [\"*\"]}}]}]", &get("/").token(demo_token()), 200 ; "requestPrincipals * matches any validated token")]
#[test_case("[{from: [{source: {requestPrincipals: [\"testing@secure.istio.io/*\"]}}]}]", &get("/").token(demo_token()), 200 ; "requestPrincipals issuer with any subject")]
#[test_case("[{from: [{source: {requestPrincipals: [\"testing@secure.istio.io/testing@secure.istio.io\"]}}]}]", &get("/").token(demo_token()), 200 ; "requestPrincipals exact iss/sub")]
#[test_case("[{from: [{source: {requestPrincipals: [\"other/testing@secure.istio.io\"]}}]}]", &get("/").token(demo_token()), 403 ; "requestPrincipals other issuer")]
#[test_case("[{from: [{source: {requestPrincipals: [\"*@secure.istio.io/*\"]}}]}]", &get("/").token(demo_token()), 200 ; "requestPrincipals issuer suffix")]
#[test_case("[{from: [{source: {requestPrincipals: [\"testing@secure.istio.io\"]}}]}]", &get("/").token(demo_token()), 403 ; "requestPrincipals without a slash needs an empty subject: never matches")]
#[test_case("[{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]", &get("/"), 200 ; "notRequestPrincipals * matches requests without a token")]
#[test_case("[{from: [{source: {principals: [\"*\"], namespaces: [bar]}}]}]", &get("/").from("cluster.local/ns/foo/sa/x"), 403 ; "fields of one source are ANDed")]
#[test_case("[{from: [{source: {namespaces: [bar]}}, {source: {namespaces: [foo]}}]}]", &get("/").from("cluster.local/ns/foo/sa/x"), 200 ; "from entries are ORed")]
#[test_case("[{from: [{source: {namespaces: [\"*\"], notNamespaces: [foo]}}]}]", &get("/").from("cluster.local/ns/foo/sa/x"), 403 ; "a field and its not-field are ANDed")]
#[test_case("[{from: [{source: {namespaces: [ns.prod]}}]}]", &get("/").from("cluster.local/ns/ns.prod/sa/admin"), 200 ; "generator_test.go TestNamespaceMatcherRegex_Match exact-match-with-dot")]
#[test_case("[{from: [{source: {namespaces: [ns.prod]}}]}]", &get("/").from("cluster.local/ns/nsXprod/sa/admin"), 403 ; "generator_test.go TestNamespaceMatcherRegex_Match exact-match-with-dot: a dot is no wildcard")]
#[test_case("[{from: [{source: {namespaces: [\"ns.*.prod\"]}}]}]", &get("/").from("cluster.local/ns/ns.any.prod/sa/admin"), 200 ; "generator_test.go TestNamespaceMatcherRegex_Match wildcard-match-with-dot")]
#[test_case("[{from: [{source: {namespaces: [\"ns.*.prod\"]}}]}]", &get("/").from("cluster.local/ns/nsXanyXprod/sa/admin"), 403 ; "generator_test.go TestNamespaceMatcherRegex_Match wildcard-match-with-dot: no match")]
#[test_case("[{from: [{source: {namespaces: [\"ns.*.prod\"]}}]}]", &get("/").from("cluster.local/ns/ns..prod/sa/admin"), 200 ; "a star inside a namespace matches an empty run, as the generator's .*")]
#[test_case("[{from: [{source: {notNamespaces: [\"*-dev-*\"]}}]}]", &get("/").from("cluster.local/ns/team-dev-1/sa/a"), 403 ; "notNamespaces with two stars")]
#[test_case("[{from: [{source: {trustDomains: [cluster.local, another.local]}}]}]", &get("/").from("another.local/ns/a/sa/b"), 200 ; "builder_test.go trust-domains-field: trustDomains exact")]
#[test_case("[{from: [{source: {trustDomains: [cluster.local]}}]}]", &get("/").from("other.local/ns/a/sa/b"), 403 ; "generator_test.go srcTrustDomainGenerator-exact: another trust domain")]
#[test_case("[{from: [{source: {trustDomains: [cluster.local]}}]}]", &get("/").from("cluster.localX/ns/a/sa/b"), 403 ; "generator_test.go srcTrustDomainGenerator-exact: prefix spiffe://cluster.local/ is the whole trust domain")]
#[test_case("[{from: [{source: {trustDomains: [\"*\"]}}]}]", &get("/").from("any.td/ns/a/sa/b"), 200 ; "generator_test.go srcTrustDomainGenerator-wildcard: any identity")]
#[test_case("[{from: [{source: {trustDomains: [\"*\"]}}]}]", &get("/"), 403 ; "generator_test.go srcTrustDomainGenerator-wildcard: no identity, no trust domain")]
#[test_case("[{from: [{source: {trustDomains: [\"cluster.*\"]}}]}]", &get("/").from("cluster.east/ns/a/sa/b"), 200 ; "generator_test.go srcTrustDomainGenerator-prefix-wildcard")]
#[test_case("[{from: [{source: {trustDomains: [\"cluster.*\"]}}]}]", &get("/").from("clusterXeast/ns/a/sa/b"), 403 ; "generator_test.go srcTrustDomainGenerator-prefix-wildcard: the dot is literal")]
#[test_case("[{from: [{source: {trustDomains: [\"*local\"]}}]}]", &get("/").from("cluster.local/ns/a/sa/b"), 200 ; "generator_test.go srcTrustDomainGenerator-suffix-wildcard")]
#[test_case("[{from: [{source: {trustDomains: [\"*local\"]}}]}]", &get("/").from("td/ns/local/sa/b"), 403 ; "generator_test.go srcTrustDomainGenerator-suffix-wildcard: the star stays within the trust domain")]
#[test_case("[{from: [{source: {notTrustDomains: [\"bad*\", untrusted]}}]}]", &get("/").from("bad.example/ns/a/sa/b"), 403 ; "builder_test.go trust-domains-field: notTrustDomains prefix")]
#[test_case("[{from: [{source: {notTrustDomains: [\"bad*\", untrusted]}}]}]", &get("/").from("good.example/ns/a/sa/b"), 200 ; "builder_test.go trust-domains-field: notTrustDomains others pass")]
#[test_case("[{from: [{source: {notTrustDomains: [\"bad*\", untrusted]}}]}]", &get("/"), 200 ; "notTrustDomains: no identity is in no trust domain, as notPrincipals")]
fn source_fields(rules: &str, r: &R, expected: u16) {
    assert_eq!(status(&allow(rules), r), expected);
}

// ---------------------------------------------------------------------------------------
// Operation fields.

#[test_case("[{to: [{operation: {hosts: [HTTPBIN.foo]}}]}]", &get("/"), 200 ; "hosts are case-insensitive")]
#[test_case("[{to: [{operation: {hosts: [\"*.FOO\"]}}]}]", &get("/").host("httpbin.foo"), 200 ; "hosts suffix is case-insensitive")]
#[test_case("[{to: [{operation: {hosts: [httpbin.foo]}}]}]", &get("/").host("httpbin.foo:8000"), 403 ; "hosts do not strip the port")]
#[test_case("[{to: [{operation: {hosts: [httpbin.foo, \"httpbin.foo:*\"]}}]}]", &get("/").host("httpbin.foo:8000"), 200 ; "hosts with a port prefix")]
#[test_case("[{to: [{operation: {notHosts: [httpbin.foo]}}]}]", &get("/"), 403 ; "notHosts")]
#[test_case("[{to: [{operation: {ports: [\"8000\"]}}]}]", &get("/").port(8000), 200 ; "ports")]
#[test_case("[{to: [{operation: {ports: [\"8000\"]}}]}]", &get("/").port(80), 403 ; "ports mismatch")]
#[test_case("[{to: [{operation: {notPorts: [\"80\"]}}]}]", &get("/").port(80), 403 ; "notPorts")]
#[test_case("[{to: [{operation: {methods: [GET, HEAD]}}]}]", &get("/"), 200 ; "methods")]
#[test_case("[{to: [{operation: {methods: [get]}}]}]", &get("/"), 403 ; "methods are case-sensitive")]
#[test_case("[{to: [{operation: {notMethods: [POST]}}]}]", &get("/").method("POST"), 403 ; "notMethods")]
#[test_case("[{to: [{operation: {paths: [/ip]}}]}]", &get("/ip?x=1"), 200 ; "paths ignore the query string")]
#[test_case("[{to: [{operation: {paths: [/ip]}}]}]", &get("/ip/"), 403 ; "paths exact")]
#[test_case("[{to: [{operation: {paths: [/api/*]}}]}]", &get("/api/v1/x"), 200 ; "paths prefix")]
#[test_case("[{to: [{operation: {paths: [\"*.html\"]}}]}]", &get("/a/index.html"), 200 ; "paths suffix")]
#[test_case("[{to: [{operation: {paths: [\"*\"]}}]}]", &get("/anything"), 200 ; "paths presence")]
#[test_case("[{to: [{operation: {paths: [/admin]}}]}]", &get("/public/../admin"), 200 ; "paths are matched after dot-segment normalization")]
#[test_case("[{to: [{operation: {paths: [/admin]}}]}]", &get("/%61dmin"), 200 ; "paths are matched after decoding unreserved characters")]
#[test_case("[{to: [{operation: {paths: [\"/users/{*}/orders\"]}}]}]", &get("/users/42/orders"), 200 ; "path template {*} is one segment")]
#[test_case("[{to: [{operation: {paths: [\"/users/{*}/orders\"]}}]}]", &get("/users/4/2/orders"), 403 ; "path template {*} is not two segments")]
#[test_case("[{to: [{operation: {paths: [\"/users/{*}\"]}}]}]", &get("/users/"), 403 ; "path template {*} is not an empty segment")]
#[test_case("[{to: [{operation: {paths: [\"/files/{**}\"]}}]}]", &get("/files/a/b/c.txt"), 200 ; "path template {**} is any number of segments")]
#[test_case("[{to: [{operation: {paths: [\"/files/{**}\"]}}]}]", &get("/files"), 403 ; "path template {**} last needs the slash before it")]
#[test_case("[{to: [{operation: {paths: [\"/a/{*}\"]}}]}]", &get("/a/x=y"), 403 ; "Envoy OperatorRegexPattern: {*} does not match '='")]
#[test_case("[{to: [{operation: {paths: [\"/a/{**}\"]}}]}]", &get("/a/b/x=y"), 403 ; "Envoy OperatorRegexPattern: {**} does not match '='")]
#[test_case("[{to: [{operation: {paths: [\"/a/{**}\"]}}]}]", &get("/a/b//c"), 200 ; "Envoy TextGlobRegex: {**} spans slashes")]
#[test_case("[{to: [{operation: {paths: [\"/files/{**}/meta\"]}}]}]", &get("/files/a/b/meta"), 200 ; "path template literal after {**}")]
#[test_case("[{to: [{operation: {notPaths: [/healthz]}}]}]", &get("/healthz"), 403 ; "notPaths")]
#[test_case("[{to: [{operation: {methods: [POST]}}, {operation: {paths: [/ip]}}]}]", &get("/ip"), 200 ; "to entries are ORed")]
#[test_case("[{to: [{operation: {methods: [GET], paths: [/x]}}]}]", &get("/ip"), 403 ; "fields of one operation are ANDed")]
#[test_case("[{from: [{source: {namespaces: [foo]}}], to: [{operation: {methods: [GET]}}]}]", &get("/"), 403 ; "from and to of a rule are ANDed")]
#[test_case("[{to: [{operation: {methods: [POST]}}]}, {to: [{operation: {methods: [GET]}}]}]", &get("/"), 200 ; "rules are ORed")]
fn operation_fields(rules: &str, r: &R, expected: u16) {
    assert_eq!(status(&allow(rules), r), expected);
}

/// Istio, `tests/integration/security/authz_test.go` (`TestAuthz_PathTemplating`) with its
/// `testdata/authz/path-templating.yaml.tmpl`: one ALLOW rule with three templates.
#[test_case("/allow/admin/", 200 ; "{**} last matches an empty run")]
#[test_case("/allow/admin", 403 ; "{**} last needs the trailing slash")]
#[test_case("/allow/user/", 403 ; "literal mismatch before {**}")]
#[test_case("/allow/admin?param=value", 403 ; "query is not part of the path")]
#[test_case("/allow", 403 ; "too short")]
#[test_case("/allow/admin/temp", 200 ; "{**} one segment")]
#[test_case("/allow/admin/temp.txt", 200 ; "{**} one segment with a dot")]
#[test_case("/allow/admin/foo/temp.txt", 200 ; "{**} two segments")]
#[test_case("/foo/buzz/bar/bat.txt", 200 ; "{*} then {**}")]
#[test_case("/foo/buzz/bar/bat.temp.txt", 200 ; "{*} then {**} with dots")]
#[test_case("/foo/buzz/bar/bat/fuzz.txt", 200 ; "{*} then {**} of two segments")]
#[test_case("/foo/bar/bat.txt", 403 ; "{*} cannot be skipped")]
#[test_case("/foo//bar/bat.txt", 403 ; "{*} does not match an empty segment")]
#[test_case("/foo/buzz/bar/bat", 200 ; "{*} then {**} without extension")]
#[test_case("/store//cart", 200 ; "{**} in the middle matches an empty run")]
#[test_case("/store/cart", 403 ; "{**} in the middle keeps both slashes")]
#[test_case("/store/foo/cart", 200 ; "{**} in the middle, one segment")]
#[test_case("/store/foo/bar/cart", 200 ; "{**} in the middle, two segments")]
fn istio_path_templating(path: &'static str, expected: u16) {
    let rules = "[{to: [{operation: {paths: [\"/allow/admin/{**}\", \"/foo/{*}/bar/{**}\", \"/store/{**}/cart\"]}}]}]";
    assert_eq!(status(&allow(rules), &get(path)), expected);
}

// ---------------------------------------------------------------------------------------
// `when` conditions.

fn when(key: &str, values: &str) -> String {
    allow(&format!("[{{when: [{{key: \"{key}\", {values}}}]}}]"))
}

#[test_case("request.headers[x-user]", "values: [alice]", &get("/").header("x-user", "alice"), 200 ; "request.headers exact")]
#[test_case("request.headers[X-User]", "values: [alice]", &get("/").header("x-user", "alice"), 200 ; "header names are case-insensitive")]
#[test_case("request.headers[x-user]", "values: [ali*]", &get("/").header("x-user", "alice"), 200 ; "request.headers prefix")]
#[test_case("request.headers[x-user]", "values: [alice]", &get("/").header("x-user", "alice").header("x-user", "bob"), 403 ; "repeated headers are joined with commas before matching")]
#[test_case("request.headers[x-user]", "values: [\"alice,bob\"]", &get("/").header("x-user", "alice").header("x-user", "bob"), 200 ; "joined header value matches exactly")]
#[test_case("request.experimental.inline.headers[x-user]", "values: [bob]", &get("/").header("x-user", "alice").header("x-user", "bob"), 200 ; "inline headers match any comma element")]
#[test_case("request.headers[x-user]", "values: [\"*\"]", &get("/"), 403 ; "request.headers * needs the header")]
#[test_case("request.headers[x-user]", "notValues: [alice]", &get("/"), 200 ; "notValues match when the header is absent")]
#[test_case("request.headers[x-user]", "values: [\"*\"], notValues: [mallory]", &get("/").header("x-user", "mallory"), 403 ; "values and notValues are ANDed")]
#[test_case("source.ip", "values: [10.0.0.0/8]", &get("/").ip("10.3.3.3"), 200 ; "source.ip CIDR")]
#[test_case("remote.ip", "values: [192.168.1.1]", &get("/").ip("10.0.0.1").remote("192.168.1.1"), 200 ; "remote.ip")]
#[test_case("source.namespace", "values: [foo]", &get("/").from("cluster.local/ns/foo/sa/a"), 200 ; "source.namespace")]
#[test_case("source.principal", "values: [cluster.local/ns/foo/sa/a]", &get("/").from("cluster.local/ns/foo/sa/a"), 200 ; "source.principal")]
#[test_case("source.serviceAccount", "values: [foo/a]", &get("/").from("cluster.local/ns/foo/sa/a"), 200 ; "source.serviceAccount")]
#[test_case("request.auth.principal", "values: [testing@secure.istio.io/testing@secure.istio.io]", &get("/").token(demo_token()), 200 ; "request.auth.principal")]
#[test_case("request.auth.audiences", "values: [app-b]", &get("/").token(demo_token()), 200 ; "request.auth.audiences any of the list")]
#[test_case("request.auth.presenter", "values: [web]", &get("/").token(demo_token()), 200 ; "request.auth.presenter is azp")]
#[test_case("request.auth.claims[groups]", "values: [group1]", &get("/").token(demo_token()), 200 ; "claims list matches any element")]
#[test_case("request.auth.claims[groups]", "values: [group3]", &get("/").token(demo_token()), 403 ; "claims list mismatch")]
#[test_case("request.auth.claims[org][team]", "values: [blue]", &get("/").token(demo_token()), 200 ; "nested claims")]
#[test_case("request.auth.claims[org][size]", "values: [\"3\"]", &get("/").token(demo_token()), 403 ; "non-string claims do not match")]
#[test_case("request.auth.claims[scope]", "values: [write]", &get("/").token(demo_token()), 200 ; "scope is always space-delimited")]
#[test_case("request.auth.claims[groups]", "values: [group1]", &get("/"), 403 ; "claims need a token")]
#[test_case("destination.ip", "values: [10.0.0.12]", &get("/").dest("10.0.0.12"), 200 ; "destination.ip")]
#[test_case("destination.port", "values: [\"8080\"]", &get("/").port(8080), 200 ; "destination.port")]
#[test_case("connection.sni", "values: [\"*.foo.svc\"]", &get("/").sni("httpbin.foo.svc"), 200 ; "connection.sni suffix")]
#[test_case("request.headers[:authority]", "values: [httpbin.foo]", &get("/"), 200 ; "validation_test.go good: request.headers[:authority] is the authority")]
#[test_case("request.headers[:authority]", "values: [other.foo]", &get("/"), 403 ; "request.headers[:authority] mismatch")]
#[test_case("request.headers[:AUTHORITY]", "values: [\"httpbin.*\"]", &get("/"), 200 ; "pseudo-header names are case-insensitive")]
#[test_case("request.headers[:method]", "values: [GET]", &get("/"), 200 ; "builder testdata deny-both-http-tcp: request.headers[:method]")]
#[test_case("request.headers[:method]", "values: [POST]", &get("/"), 403 ; "request.headers[:method] mismatch")]
#[test_case("request.headers[:path]", "values: [\"/ip?x=1\"]", &get("/ip?x=1"), 200 ; "request.headers[:path] is the path with its query")]
#[test_case("request.headers[:path]", "values: [/ip]", &get("/ip?x=1"), 403 ; "request.headers[:path] is not the bare path")]
#[test_case("request.headers[:scheme]", "values: [http]", &get("/"), 200 ; "request.headers[:scheme] is http")]
#[test_case("request.headers[:status]", "values: [\"*\"]", &get("/"), 403 ; "another pseudo-header is never present")]
#[test_case("request.headers[:status]", "notValues: [\"200\"]", &get("/"), 200 ; "another pseudo-header: notValues match")]
#[test_case("request.headers[x y]", "values: [\"*\"]", &get("/"), 403 ; "a name no header can have is never present")]
#[test_case("request.headers[x-user]", "values: [\"*\"]", &get("/").header("x-user", ""), 200 ; "matcher/header.go HeaderMatcher: * is present_match, an empty value is present")]
#[test_case("request.headers[x-user]", "values: [\"ali*\"]", &get("/").header("x-user", ""), 403 ; "an empty value does not match a prefix")]
#[test_case("request.headers[x-user]", "values: [\"*\"], notValues: [\"*\"]", &get("/").header("x-user", ""), 403 ; "notValues * excludes a present empty header")]
#[test_case("source.namespace", "values: [\"ns.*.prod\"]", &get("/").from("cluster.local/ns/ns.any.prod/sa/a"), 200 ; "source.namespace uses the namespace generator: a star inside")]
#[test_case("source.trustDomain", "values: [cluster.local]", &get("/").from("cluster.local/ns/foo/sa/a"), 200 ; "model.go attrSrcTrustDomain: source.trustDomain exact")]
#[test_case("source.trustDomain", "values: [\"*.local\"]", &get("/").from("east.local/ns/foo/sa/a"), 200 ; "source.trustDomain suffix")]
#[test_case("source.trustDomain", "notValues: [cluster.local]", &get("/").from("cluster.local/ns/foo/sa/a"), 403 ; "source.trustDomain notValues")]
#[test_case("source.trustDomain", "values: [\"*\"]", &get("/"), 403 ; "source.trustDomain needs an identity")]
fn conditions(key: &str, values: &str, r: &R, expected: u16) {
    assert_eq!(status(&when(key, values), r), expected);
}

#[test]
fn when_entries_are_anded() {
    let yaml = allow("[{when: [{key: source.ip, values: [10.0.0.1]}, {key: \"request.headers[x]\", values: [y]}]}]");
    assert_eq!(status(&yaml, &get("/").ip("10.0.0.1")), 403);
    assert_eq!(
        status(&yaml, &get("/").ip("10.0.0.1").header("x", "y")),
        200
    );
}

// ---------------------------------------------------------------------------------------
// Plain TCP connections: Istio's handling of HTTP-only fields.

#[test_case(&allow("[{to: [{operation: {methods: [GET]}}]}]"), &get("/").tcp(), 403 ; "TCP: an ALLOW rule with HTTP-only fields is dropped")]
#[test_case(&allow("[{to: [{operation: {ports: [\"80\"]}}]}]"), &get("/").tcp(), 200 ; "TCP: an ALLOW rule with only TCP fields applies")]
#[test_case(&allow("[{to: [{operation: {methods: [GET]}}]}, {from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]"), &get("/").tcp().ip("10.0.0.1"), 200 ; "TCP: other ALLOW rules still apply")]
#[test_case(&deny("[{to: [{operation: {methods: [POST]}}]}]"), &get("/").tcp(), 403 ; "TCP: a DENY rule ignores HTTP-only fields and denies all")]
#[test_case(&deny("[{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]"), &get("/").tcp().port(80), 200 ; "TCP: a DENY rule keeps its TCP fields")]
#[test_case(&deny("[{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]"), &get("/").tcp().port(8080), 403 ; "TCP: DENY on the named port")]
#[test_case(&deny("[{from: [{source: {requestPrincipals: [\"*\"]}}]}]"), &get("/").tcp(), 403 ; "TCP: DENY with only requestPrincipals denies all TCP")]
#[test_case(&allow("[{from: [{source: {principals: [\"*\"]}}]}]"), &get("/").tcp().from("cluster.local/ns/a/sa/b"), 200 ; "TCP: principals work without HTTP")]
fn tcp_semantics(yaml: &str, r: &R, expected: u16) {
    assert_eq!(status(yaml, r), expected);
}

#[test_case(&allow("[{when: [{key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [\"[update]\"]}]}]"), 403 ; "Envoy filter metadata: the ALLOW rule never matches")]
#[test_case(&deny("[{when: [{key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [\"[update]\"]}]}]"), 403 ; "Envoy filter metadata: the DENY rule ignores it (fails closed)")]
fn untranslatable_attributes(yaml: &str, expected: u16) {
    assert_eq!(status(yaml, &get("/")), expected);
}

// ---------------------------------------------------------------------------------------
// Path normalization (Istio's BASE default and the other modes).

// Envoy, test/common/http/path_utility_test.cc (PathUtilityTest): BASE is `normalize_path`.
#[test_case("/xyz", "/xyz" ; "Envoy AlreadyNormalPaths: /xyz")]
#[test_case("/x/y/z", "/x/y/z" ; "Envoy AlreadyNormalPaths: /x/y/z")]
#[test_case("/a/b/../c", "/a/c" ; "Envoy NormalizeValidPaths: parent dir")]
#[test_case("/a/b/./c", "/a/b/c" ; "Envoy NormalizeValidPaths: current dir")]
#[test_case("/a/b/../../../../c", "/c" ; "Envoy NormalizeValidPaths: out number parent")]
#[test_case("/a/..\\c", "/c" ; "Envoy NormalizeValidPaths: dot-dot-backslash")]
#[test_case("/%c0%af", "/%c0%af" ; "Envoy NormalizeValidPaths: 2 bytes unicode reserved characters")]
#[test_case("/%5c%25", "/%5c%25" ; "Envoy NormalizeValidPaths: reserved characters")]
#[test_case("/a/b/%2E%2E/c", "/a/c" ; "Envoy NormalizeValidPaths: %2E escape")]
#[test_case("/a/b/%2E./c", "/a/c" ; "Envoy NormalizeValidPaths: %2E. escape")]
#[test_case("/a/b/%2E/c", "/a/b/c" ; "Envoy NormalizeValidPaths: %2E current dir")]
#[test_case("/../a/b", "/a/b" ; "Envoy NormalizeValidPaths: leading parent")]
#[test_case("/./a/b", "/a/b" ; "Envoy NormalizeValidPaths: leading current")]
#[test_case("/A/B/C", "/A/B/C" ; "Envoy NormalizeCasePath: not normalized to lower case")]
#[test_case("/a/b/%2e%2e/c", "/a/c" ; "Envoy NormalizeCasePath: %2e can be normalized to dot")]
#[test_case("/a/%2F%2f/c", "/a/%2F%2f/c" ; "Envoy NormalizeCasePath: %2F is not normalized to %2f")]
// Istio, tests/integration/security/normalization_test.go (TestNormalization, "Base").
#[test_case("/", "/" ; "Istio Base: root")]
#[test_case("/app#foo", "/app" ; "Istio Base: fragment")]
#[test_case("/app/", "/app/" ; "Istio Base: trailing slash")]
#[test_case("/app/../admin", "/admin" ; "Istio Base: dot-dot")]
#[test_case("/app//", "/app//" ; "Istio Base: double slash kept")]
#[test_case("/app/%2f", "/app/%2f" ; "Istio Base: escaped slash keeps its case")]
#[test_case("/app%2f/", "/app%2f/" ; "Istio Base: escaped slash inside a segment")]
#[test_case("/xyz%30..//abc", "/xyz0..//abc" ; "Istio Base: escaped digit decoded")]
#[test_case("/app/%2E./admin", "/admin" ; "Istio Base: mixed escaped dot-dot")]
#[test_case("/app\\admin", "/app/admin" ; "Istio Base: backslash")]
#[test_case("/app/\\/\\/\\admin", "/app//////admin" ; "Istio Base: backslashes and slashes")]
#[test_case("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc" ; "Istio Base: escaped slashes and backslashes kept as written")]
#[test_case("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F..%2fadmin%5c/abc" ; "Istio Base: escaped dots inside a segment decoded")]
#[test_case("/app//../admin", "/app/admin" ; "Istio Base: dot-dot after an empty segment")]
#[test_case("/app//../../admin", "/admin" ; "Istio Base: two dot-dots after an empty segment")]
fn normalization_base(input: &str, expected: &str) {
    assert_eq!(
        normalize(input, Normalization::Base)
            .expect("normalizes")
            .path,
        expected
    );
}

// Istio, normalization_test.go (TestNormalization, "None").
#[test_case("/app#foo", "/app" ; "Istio None: fragment dropped")]
#[test_case("/app/../admin", "/app/../admin" ; "Istio None: dot-dot kept")]
#[test_case("/app/%2f", "/app/%2f" ; "Istio None: escape kept")]
#[test_case("/xyz%30..//abc", "/xyz%30..//abc" ; "Istio None: escaped digit kept")]
#[test_case("/app\\admin", "/app\\admin" ; "Istio None: backslash kept")]
#[test_case("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc" ; "Istio None: everything kept")]
#[test_case("/app//../../admin", "/app//../../admin" ; "Istio None: slashes and dots kept")]
fn normalization_none(input: &str, expected: &str) {
    assert_eq!(
        normalize(input, Normalization::None)
            .expect("normalizes")
            .path,
        expected
    );
}

// Istio, normalization_test.go (TestNormalization, "MergeSlashes"); Envoy,
// path_utility_test.cc (PathUtilityTest.MergeSlashes).
#[test_case("/app//", "/app/" ; "Istio MergeSlashes: trailing double slash")]
#[test_case("/app/%2f", "/app/%2f" ; "Istio MergeSlashes: escaped slash keeps its case")]
#[test_case("/xyz%30..//abc", "/xyz0../abc" ; "Istio MergeSlashes: escaped digit decoded, slashes merged")]
#[test_case("/app/\\/\\/\\admin", "/app/admin" ; "Istio MergeSlashes: backslashes and slashes merged")]
#[test_case("/%2Fapp%5cadmin%5Cabc", "/%2Fapp%5cadmin%5Cabc" ; "Istio MergeSlashes: escaped slashes kept")]
#[test_case("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/%5Capp%2f%5c%2F..%2fadmin%5c/abc" ; "Istio MergeSlashes: escaped dots decoded")]
#[test_case("/app//../admin", "/app/admin" ; "Istio MergeSlashes: dot-dot after an empty segment")]
#[test_case("/a//b/c/", "/a/b/c/" ; "Envoy MergeSlashes: ends with slash")]
#[test_case("//a/b/c", "/a/b/c" ; "Envoy MergeSlashes: double slash start")]
#[test_case("/a/b/c//", "/a/b/c/" ; "Envoy MergeSlashes: double slash end")]
#[test_case("/a///b/c", "/a/b/c" ; "Envoy MergeSlashes: triple slash in the middle")]
#[test_case("/a////b/c", "/a/b/c" ; "Envoy MergeSlashes: quadruple slash in the middle")]
#[test_case("/a//b?a=///c", "/a/b" ; "Envoy MergeSlashes: slashes in the query are ignored")]
fn normalization_merge_slashes(input: &str, expected: &str) {
    assert_eq!(
        normalize(input, Normalization::MergeSlashes)
            .expect("normalizes")
            .path,
        expected
    );
}

// Istio, normalization_test.go (TestNormalization, "DecodeAndMergeSlashes" and
// "NotNormalized", both with DECODE_AND_MERGE_SLASHES).
#[test_case("/app//", "/app/" ; "Istio DecodeAndMergeSlashes: trailing double slash")]
#[test_case("/app/%2f", "/app/" ; "Istio DecodeAndMergeSlashes: escaped slash decoded and merged")]
#[test_case("/app%2f/", "/app/" ; "Istio DecodeAndMergeSlashes: escaped slash inside a segment")]
#[test_case("/xyz%30..//abc", "/xyz0../abc" ; "Istio DecodeAndMergeSlashes: escaped digit")]
#[test_case("/app/%2E./admin", "/admin" ; "Istio DecodeAndMergeSlashes: mixed escaped dot-dot")]
#[test_case("/%2Fapp%5cadmin%5Cabc", "/app/admin/abc" ; "Istio DecodeAndMergeSlashes: escaped slashes and backslashes")]
#[test_case("/%5Capp%2f%5c%2F%2e%2e%2fadmin%5c\\abc", "/app/admin/abc" ; "Istio DecodeAndMergeSlashes: escaped dot-dot between escaped slashes")]
#[test_case("/app//../../admin", "/admin" ; "Istio DecodeAndMergeSlashes: dot-dots")]
#[test_case("/%c0%2e%c0%2e/admin", "/%c0.%c0./admin" ; "Istio DecodeAndMergeSlashes: overlong dots stay escaped")]
#[test_case("/%c0%2fadmin", "/%c0/admin" ; "Istio DecodeAndMergeSlashes: overlong slash stays escaped")]
#[test_case("/0x2e0x2e/admin", "/0x2e0x2e/admin" ; "Istio NotNormalized: 0x2e text")]
#[test_case("/0x2e0x2e0x5cadmin", "/0x2e0x2e0x5cadmin" ; "Istio NotNormalized: 0x5c text")]
#[test_case("/%25c0%25ae%25c1%259cadmin", "/%25c0%25ae%25c1%259cadmin" ; "Istio NotNormalized: double-escaped overlong")]
#[test_case("/%252e%252e/admin", "/%252e%252e/admin" ; "Istio NotNormalized: double-escaped dots")]
#[test_case("/%252e%252e%252fadmin", "/%252e%252e%252fadmin" ; "Istio NotNormalized: double-escaped slash")]
#[test_case("/%c1%9cadmin", "/%c1%9cadmin" ; "Istio NotNormalized: overlong backslash")]
#[test_case("/%c0%ae%c0%ae/admin", "/%c0%ae%c0%ae/admin" ; "Istio NotNormalized: overlong dots")]
#[test_case("/%c0%afadmin", "/%c0%afadmin" ; "Istio NotNormalized: overlong slash")]
#[test_case("/.../admin", "/.../admin" ; "Istio NotNormalized: three dots")]
#[test_case("/..../admin", "/..../admin" ; "Istio NotNormalized: four dots")]
#[test_case("/..;/admin", "/..;/admin" ; "Istio NotNormalized: dot-dot-semicolon")]
#[test_case("/;/admin", "/;/admin" ; "Istio NotNormalized: semicolon segment")]
#[test_case("/admin;a=b", "/admin;a=b" ; "Istio NotNormalized: matrix parameter")]
#[test_case("/admin;a=b/xyz", "/admin;a=b/xyz" ; "Istio NotNormalized: matrix parameter then segment")]
#[test_case("/admin,a=b/xyz", "/admin,a=b/xyz" ; "Istio NotNormalized: comma")]
#[test_case("/Admin", "/Admin" ; "Istio NotNormalized: case kept")]
#[test_case("/ADMIN", "/ADMIN" ; "Istio NotNormalized: upper case kept")]
fn normalization_decode_and_merge_slashes(input: &str, expected: &str) {
    assert_eq!(
        normalize(input, Normalization::DecodeAndMergeSlashes)
            .expect("normalizes")
            .path,
        expected
    );
}

/// Istio, `normalization_test.go` (`TestNormalization`, "PercentEncoded"): `/admin%XX` for every byte
/// 0x01..=0xff with `DECODE_AND_MERGE_SLASHES`. Istio's expectation: decoded when the byte is an
/// unreserved character (`A-Z a-z 0-9 - . _ ~`), `/` or `\` (which becomes `/`); otherwise the
/// path reaches the pod exactly as sent, the case of its hex digits included.
#[test]
fn normalization_percent_encoded_sweep() {
    for byte in 1u8..=0xff {
        for input in [format!("/admin%{byte:02x}"), format!("/admin%{byte:02X}")] {
            let decoded = byte.is_ascii_alphanumeric() || b"-._~/\\".contains(&byte);
            let expected = match byte {
                b'\\' => "/admin/".to_owned(),
                _ if decoded => format!("/admin{}", char::from(byte)),
                _ => input.clone(),
            };
            let got = normalize(&input, Normalization::DecodeAndMergeSlashes)
                .unwrap_or_else(|e| panic!("{input}: {e}"))
                .path;
            assert_eq!(got, expected, "{input}");
        }
    }
}

/// The same sweep in BASE (Envoy, `path_utility_test.cc` `NormalizeCasePath`: "%2F is not
/// normalized to %2f"): only unreserved characters are decoded; `%2f`, `%5c` and every other
/// escape keep their spelling.
#[test]
fn normalization_base_keeps_escapes_as_written() {
    for byte in 1u8..=0xff {
        for input in [format!("/admin%{byte:02x}"), format!("/admin%{byte:02X}")] {
            let decoded = byte.is_ascii_alphanumeric() || b"-._~".contains(&byte);
            let expected = if decoded {
                format!("/admin{}", char::from(byte))
            } else {
                input.clone()
            };
            let got = normalize(&input, Normalization::Base)
                .unwrap_or_else(|e| panic!("{input}: {e}"))
                .path;
            assert_eq!(got, expected, "{input}");
        }
    }
}

// Characters a path cannot hold raw are escaped (Envoy's canonicalizer, the Chromium table it
// carries); a `%` that begins no escape is kept, and cannot combine with a decoded byte into
// an escape the next decoder would read (the canonicalizer's nested-escape rule).
#[test_case("/a b", "/a%20b" ; "raw space escaped")]
#[test_case("/a{b}|c^`", "/a%7Bb%7D%7Cc%5E%60" ; "raw braces, bar, caret, backquote escaped")]
#[test_case("/caf\u{e9}", "/caf%C3%A9" ; "raw UTF-8 escaped byte by byte")]
#[test_case("/a%zz", "/a%zz" ; "a percent that begins no escape is kept")]
#[test_case("/a%%30%30", "/a%2500" ; "nested escapes cannot make a new escape")]
#[test_case("/a%%300", "/a%2500" ; "nested escape with a following digit")]
#[test_case("/a%2", "/a%2" ; "truncated escape kept")]
fn normalization_escapes(input: &str, expected: &str) {
    assert_eq!(
        normalize(input, Normalization::Base)
            .expect("normalizes")
            .path,
        expected
    );
}

#[test_case("/x?q=/../y#frag", Normalization::Base, "/x", Some("q=/../y") ; "query split off unchanged, fragment dropped")]
#[test_case("/a//b?a=///c", Normalization::MergeSlashes, "/a/b", Some("a=///c") ; "Envoy MergeSlashes: query untouched")]
#[test_case("/a//b?", Normalization::MergeSlashes, "/a/b", Some("") ; "Envoy MergeSlashes: empty query")]
#[test_case("//a/?b", Normalization::MergeSlashes, "/a/", Some("b") ; "Envoy MergeSlashes: ends with slash and query")]
fn normalization_query(input: &str, how: Normalization, path: &str, query: Option<&str>) {
    let normalized = normalize(input, how).expect("normalizes");
    assert_eq!(normalized.path, path);
    assert_eq!(normalized.query.as_deref(), query);
}

#[test_case("a/b", Normalization::Base ; "not absolute")]
#[test_case("/xyz/.%00../abc", Normalization::Base ; "Envoy InvalidPaths: escaped NUL between dots")]
#[test_case("/xyz/%00.%00./abc", Normalization::Base ; "Envoy InvalidPaths: escaped NULs")]
#[test_case("/xyz/AAAAA%%0000/abc", Normalization::Base ; "Envoy InvalidPaths: escaped NUL after a stray percent")]
#[test_case("/admin%00", Normalization::DecodeAndMergeSlashes ; "Istio Invalid: %00 is 400")]
#[test_case("/admin%00", Normalization::None ; "NONE refuses %00 too")]
fn path_normalization_refuses(input: &str, how: Normalization) {
    assert!(normalize(input, how).is_err());
}

#[test]
fn exact_lists_are_hashed_not_scanned() {
    // 10,000 principals in one policy: the match is a hash lookup (see benches/authz.rs).
    let list: Vec<String> = (0..10_000)
        .map(|i| format!("cluster.local/ns/n{i}/sa/s{i}"))
        .collect();
    let yaml = allow(&format!(
        "[{{from: [{{source: {{principals: {list:?}}}}}]}}]"
    ));
    assert_eq!(
        status(&yaml, &get("/").from("cluster.local/ns/n9999/sa/s9999")),
        200
    );
    assert_eq!(
        status(&yaml, &get("/").from("cluster.local/ns/n9999/sa/s0")),
        403
    );
}

mod normalization_properties {
    use proptest::prelude::*;

    use super::super::path::{normalize, Normalization};

    /// Paths made of the bytes that matter to normalization: slashes, dots, escapes (valid,
    /// partial and stray), unreserved and other characters.
    fn path() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "/", "\\", ".", "..", "%", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%25", "%30",
            "%3", "%41", "%7e", "%c0", "a", "Z", "0", "-", "~", "{", " ", ";", "=", "é",
        ]);
        prop::collection::vec(piece, 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// What the pod receives is already normal: a second pass (a proxy or the pod's own
        /// server normalizing again) changes nothing, so nothing judged can be re-read otherwise.
        #[test]
        fn normalizing_twice_is_normalizing_once(
            raw in path(),
            how in prop::sample::select(vec![
                Normalization::Base,
                Normalization::MergeSlashes,
                Normalization::DecodeAndMergeSlashes,
            ]),
        ) {
            if let Ok(once) = normalize(&raw, how) {
                let twice = normalize(&once.path, how).expect("a normalized path normalizes");
                prop_assert_eq!(&twice.path, &once.path, "{:?} {:?}", raw, how);
            }
        }
    }
}
