//! Loading and Istio's validation: each row names the check it pins.

use std::path::Path;

use test_case::test_case;

use super::load::LoadError;
use super::load_str;

fn errors(yaml: &str) -> Vec<String> {
    load_str(Path::new("p.yaml"), yaml)
        .errors
        .iter()
        .map(ToString::to_string)
        .collect()
}

fn ap(spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: foo}}\nspec: {spec}\n")
}

fn ra(spec: &str) -> String {
    format!("apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: foo}}\nspec: {spec}\n")
}

#[test_case(&ap("{action: MAYBE, rules: [{}]}"), "spec.action", "unknown action \"MAYBE\"" ; "unknown action")]
#[test_case(&ap("{action: CUSTOM, rules: [{}]}"), "spec.provider.name", "CUSTOM policy must set provider" ; "CUSTOM without provider")]
#[test_case(&ap("{action: DENY, provider: {name: x}, rules: [{}]}"), "spec.provider", "only be used with the CUSTOM" ; "provider without CUSTOM")]
#[test_case(&ap("{action: DENY}"), "spec.rules", "DENY action without rules is meaningless" ; "DENY without rules")]
#[test_case(&ap("{action: CUSTOM, provider: {name: x}}"), "spec.rules", "CUSTOM action without rules" ; "CUSTOM without rules")]
#[test_case(&ap("{action: CUSTOM, provider: {name: x}, rules: [{from: [{source: {principals: [a]}}]}]}"), "spec.rules[0].from[0].source.principals", "not supported with CUSTOM" ; "CUSTOM with principals")]
#[test_case(&ap("{action: CUSTOM, provider: {name: x}, rules: [{when: [{key: request.auth.principal, values: [a]}]}]}"), "spec.rules[0].when[0].key", "not supported with CUSTOM" ; "CUSTOM with request.auth")]
#[test_case(&ap("{rules: [{from: [{source: {serviceAccounts: [foo/a], principals: [b]}}]}]}"), "source.serviceAccounts", "cannot set serviceAccounts with namespaces or principals" ; "serviceAccounts with principals")]
#[test_case(&ap("{rules: [{from: [{source: {notServiceAccounts: [foo/a], namespaces: [b]}}]}]}"), "source.notServiceAccounts", "cannot set serviceAccounts" ; "notServiceAccounts with namespaces")]
#[test_case(&ap("{rules: [{from: [{source: {serviceAccounts: [\"foo/*\"]}}]}]}"), "serviceAccounts[0]", "wildcards are not allowed" ; "serviceAccounts wildcard")]
#[test_case(&ap("{rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]}"), "serviceAccounts[0]", "expected 'serviceAccount' or 'namespace/serviceAccount'" ; "serviceAccounts format")]
#[test_case(&ap("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}"), "source.ipBlocks[0]", "not a valid IP address or CIDR" ; "bad CIDR")]
#[test_case(&ap("{rules: [{from: [{source: {remoteIpBlocks: [not-an-ip]}}]}]}"), "source.remoteIpBlocks[0]", "not a valid IP" ; "bad IP")]
#[test_case(&ap("{rules: [{to: [{operation: {ports: [\"70000\"]}}]}]}"), "operation.ports[0]", "not a valid port" ; "port out of range")]
#[test_case(&ap("{rules: [{to: [{operation: {ports: [http]}}]}]}"), "operation.ports[0]", "not a valid port" ; "named port")]
#[test_case(&ap("{rules: [{to: [{operation: {paths: [\"/a/{**}/{*}\"]}}]}]}"), "operation.paths[0]", "{**} is not the last operator" ; "template after {**}")]
#[test_case(&ap("{rules: [{to: [{operation: {paths: [\"/a/{*}/b*\"]}}]}]}"), "operation.paths[0]", "cannot be mixed" ; "wildcard mixed with template")]
#[test_case(&ap("{rules: [{to: [{operation: {paths: [\"/a/{id}\"]}}]}]}"), "operation.paths[0]", "only {*} and {**}" ; "named template variable")]
#[test_case(&ap("{rules: [{to: [{operation: {paths: [\"/a/x{*}\"]}}]}]}"), "operation.paths[0]", "only {*} and {**}" ; "partial segment template")]
#[test_case(&ap("{rules: [{to: [{operation: {paths: [\"/a//{*}\"]}}]}]}"), "operation.paths[0]", "literal segment is empty" ; "empty segment in a template")]
#[test_case(&ap("{selector: {matchLabels: {app: a}}, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}], rules: [{}]}"), "spec.selector", "only one of selector, targetRef or targetRefs" ; "selector and targetRefs")]
#[test_case(&ap("{targetRefs: [{kind: Pod, group: \"\", name: g}], rules: [{}]}"), "spec.targetRefs[0].kind", "targetRef must be to one of" ; "targetRef kind")]
#[test_case(&ap("{selector: {matchLabels: {app: \"a*\"}}, rules: [{}]}"), "spec.selector.matchLabels[app]", "wildcard is not supported" ; "selector wildcard")]
#[test_case(&ap("{rules: [{from: []}]}"), "spec.rules[0].from", "must not be empty" ; "empty from list")]
#[test_case(&ap("{rules: [{to: [{}]}]}"), "spec.rules[0].to[0].operation", "must be set" ; "to without operation")]
#[test_case(&ap("{rules: [{from: [{source: {}}]}]}"), "spec.rules[0].from[0].source", "must not be empty" ; "empty source")]
#[test_case(&ap("{rules: [{from: [{source: {principals: [\"\"]}}]}]}"), "source.principals[0]", "empty string" ; "empty value")]
#[test_case(&ap("{rules: [{when: [{key: \"request.auth.claims[groups]\"}]}]}"), "spec.rules[0].when[0]", "at least one of values or notValues" ; "condition without values")]
#[test_case(&ap("{rules: [{when: [{key: request.colour, values: [a]}]}]}"), "spec.rules[0].when[0].key", "unknown attribute" ; "unknown condition key")]
#[test_case(&ap("{rules: [{when: [{key: \"request.headers[]\", values: [a]}]}]}"), "spec.rules[0].when[0].key", "invalid key" ; "empty header name")]
#[test_case(&ap("{rules: [{when: [{key: destination.namespace, values: [a]}]}]}"), "spec.rules[0].when[0].key", "replaced by" ; "retired destination.namespace")]
#[test_case(&ap("{rules: [{when: [{key: source.ip, values: [300.1.1.1]}]}]}"), "when[0].values[0]", "not a valid IP address or CIDR" ; "condition IP value")]
#[test_case(&ap("{rules: [{when: [{key: destination.port, notValues: [\"-1\"]}]}]}"), "when[0].notValues[0]", "not a valid port" ; "condition port value")]
#[test_case(&ap("{rules: [{from: [{source: {principal: [a]}}]}]}"), "spec.rules[0].from[0].source", "unknown field `principal`" ; "misspelt field is refused, not pruned")]
#[test_case(&ap("{rules: {}}"), "spec.rules", "invalid type" ; "wrong type")]
#[test_case(&ap("{rules: [{}]}").replace("metadata: {", "metadata: {annotations: {istio.io/dry-run: maybe}, "), "metadata.annotations[istio.io/dry-run]", "expected true or false" ; "dry-run value")]
#[test_case(&ap("{action: AUDIT, rules: [{}]}").replace("metadata: {", "metadata: {annotations: {istio.io/dry-run: \"true\"}, "), "metadata.annotations[istio.io/dry-run]", "only supports action ALLOW/DENY" ; "dry-run on AUDIT")]
#[test_case(&ra("{jwtRules: [{audiences: [a]}]}"), "spec.jwtRules[0].issuer", "issuer or jwksUri must be non-empty" ; "jwt rule without issuer or jwksUri")]
#[test_case(&ra("{jwtRules: [{issuer: i, jwksUri: \"ftp://x/keys\"}]}"), "spec.jwtRules[0].jwksUri", "not a valid http or https URL" ; "jwksUri scheme")]
#[test_case(&ra("{jwtRules: [{issuer: i, jwksUri: \"https://x/k\", jwks: \"{\\\"keys\\\": []}\"}]}"), "spec.jwtRules[0].jwks", "only one of jwks or jwksUri" ; "jwks and jwksUri")]
#[test_case(&ra("{jwtRules: [{issuer: i, jwks: \"not json\"}]}"), "spec.jwtRules[0].jwks", "not a JSON Web Key Set" ; "inline jwks not JSON")]
#[test_case(&ra("{jwtRules: [{issuer: i, fromHeaders: [{prefix: \"Bearer \"}]}]}"), "spec.jwtRules[0].fromHeaders[0].name", "must be set" ; "fromHeaders without name")]
#[test_case(&ra("{jwtRules: [{issuer: i, outputClaimToHeaders: [{header: x_y, claim: sub}]}]}"), "outputClaimToHeaders[0].header", "not a valid HTTP header name" ; "output header name")]
#[test_case(&ra("{jwtRules: [{issuer: i, outputClaimToHeaders: [{header: x-sub}]}]}"), "outputClaimToHeaders[0].claim", "must be set" ; "output claim missing")]
#[test_case(&ra("{jwtRules: [{issuer: i, timeout: soon}]}"), "spec.jwtRules[0].timeout", "not a valid duration" ; "timeout")]
#[test_case(&ra("{jwtRules: [{issuer: i}]}").replace("metadata: {", "metadata: {annotations: {istio.io/dry-run: \"true\"}, "), "metadata.annotations[istio.io/dry-run]", "unsupported annotation" ; "dry-run on RequestAuthentication")]
#[test_case(&ap("{rules: [{when: [{key: \"request.headers[:authority]\", values: [v1, \"\"]}]}]}"), "when[0].values[1]", "empty string" ; "validation_test.go TestValidateAuthorizationPolicy value-empty")]
#[test_case(&ap("{rules: [{from: [{source: {trustDomains: [\"fo*-bar\"]}}]}]}"), "source.trustDomains[0]", "only allowed at the start or the end" ; "security_test.go TestCheckTrustDomainValues: middle wildcard")]
#[test_case(&ap("{rules: [{from: [{source: {notTrustDomains: [\"fo*bar*\"]}}]}]}"), "source.notTrustDomains[0]", "at most one wildcard" ; "security_test.go TestCheckWildcardValues: multiple wildcards")]
#[test_case(&ap("{rules: [{from: [{source: {trustDomains: [cluster.local/ns/foo]}}]}]}"), "source.trustDomains[0]", "must not contain '/'" ; "security_test.go TestCheckTrustDomainValues: slash")]
#[test_case(&ap("{rules: [{from: [{source: {trustDomains: [\"spiffe://cluster.local\"]}}]}]}"), "source.trustDomains[0]", "must not contain '/'" ; "security_test.go TestCheckTrustDomainValues: spiffe uri")]
#[test_case(&ap("{rules: [{from: [{source: {trustDomains: [\"\"]}}]}]}"), "source.trustDomains[0]", "empty string" ; "security_test.go TestCheckTrustDomainValues: empty")]
#[test_case(&ap("{rules: [{when: [{key: source.trustDomain, values: [\"fo*-bar\"]}]}]}"), "when[0].values[0]", "not a valid trust domain" ; "security_test.go TestValidateCondition: source.trustDomain fo*-bar")]
#[test_case(&ap("{rules: [{when: [{key: source.trustDomain, values: [\"fo*bar*\"]}]}]}"), "when[0].values[0]", "not a valid trust domain" ; "security_test.go TestValidateCondition: source.trustDomain fo*bar*")]
#[test_case(&ap("{action: CUSTOM, provider: {name: x}, rules: [{from: [{source: {trustDomains: [a]}}]}]}"), "spec.rules[0].from[0].source.trustDomains", "not supported with CUSTOM" ; "validation.go: From.TrustDomains is not supported with CUSTOM")]
#[test_case(&ap("{action: CUSTOM, provider: {name: x}, rules: [{when: [{key: source.trustDomain, values: [a]}]}]}"), "spec.rules[0].when[0].key", "not supported with CUSTOM" ; "validation.go: source.trustDomain is not supported with CUSTOM")]
fn validation(yaml: &str, field: &str, message: &str) {
    let errors = errors(yaml);
    assert!(
        errors
            .iter()
            .any(|e| e.contains(field) && e.contains(message)),
        "expected an error naming {field:?} with {message:?}, got {errors:#?}"
    );
    assert!(
        errors
            .iter()
            .all(|e| e.starts_with("p.yaml (document 1): ")),
        "errors name the file: {errors:?}"
    );
    assert!(
        errors.iter().all(|e| e.contains("foo/")),
        "errors name the object: {errors:?}"
    );
}

#[test_case(&ap("{}") ; "allow-nothing")]
#[test_case(&ap("{rules: [{from: [{source: {ipBlocks: [10.0.0.1/8], ports: []}}]}]}").replace(", ports: []", "") ; "CIDR with host bits")]
#[test_case(&ap("{rules: [{to: [{operation: {ports: [\"0\"]}}]}]}") ; "port 0 is accepted like Istio")]
#[test_case(&ap("{rules: [{to: [{operation: {paths: [\"/a/{**}/b\", \"/c/{*}/\"]}}]}]}") ; "literal after {**} and trailing slash")]
#[test_case(&ap("{rules: [{from: [{source: {principals: [\"a*b\"]}}]}]}") ; "a star in the middle is accepted as a literal")]
#[test_case(&ap("{action: AUDIT}") ; "AUDIT without rules")]
#[test_case(&ap("{rules: [{when: [{key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [\"[update]\"]}]}]}") ; "Envoy filter metadata keys are accepted")]
#[test_case(&ra("{jwtRules: [{jwksUri: \"https://example.com/keys\"}]}") ; "jwksUri without issuer")]
#[test_case(&ra("{jwtRules: [{issuer: a, jwksUri: \"http://127.0.0.1:8080/jwks\"}, {issuer: a, timeout: 1.5s}]}") ; "duplicate issuers are not refused by Istio")]
#[test_case(&ap("{rules: [{when: [{key: source.ip, values: [1.2.3.4, 5.6.7.0/24]}, {key: \"request.headers[:authority]\", values: [v1, v2]}]}]}") ; "validation_test.go TestValidateAuthorizationPolicy good: request.headers[:authority]")]
#[test_case(&ap("{rules: [{when: [{key: \"request.headers[:method]\", values: [GET]}]}]}") ; "builder testdata deny-both-http-tcp-in.yaml: request.headers[:method]")]
#[test_case(&ap("{rules: [{when: [{key: \"request.headers[x y]\", values: [a]}]}]}") ; "validateMapKey only needs a non-empty name in brackets")]
#[test_case(&ap("{rules: [{from: [{source: {trustDomains: [cluster.local, \"cluster-prefix-*\", \"*-suffix-cluster\", \"*\"], notTrustDomains: [not-cluster.local, \"not-cluster-prefix-*\", \"*-not-suffix-cluster\", \"*\"]}}]}]}") ; "validation testdata crds/authz-valid.yaml: trustDomains and notTrustDomains")]
#[test_case(&ap("{rules: [{when: [{key: source.trustDomain, values: [cluster.local, \"*\", \"foo*\", \"*bar\"]}]}]}") ; "security_test.go TestValidateCondition: source.trustDomain values")]
#[test_case(&ap("{rules: [{from: [{source: {namespaces: [\"ns.*.prod\"]}}]}]}") ; "generator_test.go TestNamespaceMatcherRegex_Match: a star inside a namespace")]
fn valid(yaml: &str) {
    assert_eq!(errors(yaml), Vec::<String>::new());
}

#[test]
fn one_bad_object_never_takes_the_others_down() {
    let text = format!(
        "{}---\n{}---\n{}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm}}\n---\n{}",
        ap("{rules: [{}]}"),
        ap("{action: NOPE}").replace("name: p", "name: bad"),
        ra("{jwtRules: [{issuer: i}]}"),
        ap("{action: DENY, rules: [{}]}")
            .replace("name: p", "name: q")
            .replace("security.istio.io/v1", "security.istio.io/v1beta1"),
    );
    let loaded = load_str(Path::new("many.yaml"), &text);
    let names: Vec<String> = loaded
        .authorization_policies
        .iter()
        .map(super::Object::id)
        .collect();
    assert_eq!(names, ["foo/p", "foo/q"]);
    assert_eq!(loaded.request_authentications.len(), 1);
    assert_eq!(loaded.errors.len(), 1, "{:?}", loaded.errors);
    assert!(
        matches!(&loaded.errors[0], LoadError::Invalid { object, origin, .. } if object == "foo/bad" && origin.document == 2)
    );
    assert_eq!(
        loaded.skipped.len(),
        1,
        "other kinds are skipped with a notice"
    );
    assert!(loaded.skipped[0]
        .to_string()
        .contains("skipped ConfigMap cm"));
}

#[test]
fn yaml_syntax_error_names_file_and_document() {
    let loaded = load_str(
        Path::new("broken.yaml"),
        &format!("{}---\nkind: [unclosed\n", ap("{}")),
    );
    assert_eq!(
        loaded.authorization_policies.len(),
        1,
        "documents before the error still load"
    );
    let e = loaded.errors[0].to_string();
    assert!(
        e.starts_with("broken.yaml (document 2): not valid YAML"),
        "{e}"
    );
}

#[test]
fn list_kind_and_missing_namespace() {
    let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.istio.io/v1\n  kind: AuthorizationPolicy\n  metadata: {name: a}\n  spec: {}\n";
    let loaded = load_str(Path::new("list.yaml"), text);
    assert_eq!(loaded.authorization_policies[0].id(), "default/a");
}

#[test]
fn directories_are_read_recursively_in_name_order() {
    let dir = std::env::temp_dir().join(format!("nodeward-load-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());
    std::fs::create_dir_all(dir.join("sub")).expect("temp dir");
    std::fs::write(dir.join("b.yaml"), ap("{}").replace("name: p", "name: b")).expect("write");
    std::fs::write(
        dir.join("sub/a.yml"),
        ap("{}").replace("name: p", "name: a"),
    )
    .expect("write");
    std::fs::write(dir.join("notes.txt"), "not yaml").expect("write");
    std::fs::write(dir.join(".hidden.yaml"), "garbage: [").expect("write");
    let loaded = super::load_paths(&[&dir]);
    let names: Vec<String> = loaded
        .authorization_policies
        .iter()
        .map(super::Object::id)
        .collect();
    assert_eq!(names, ["foo/b", "foo/a"]);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    std::os::unix::fs::symlink(&dir, dir.join("sub/loop")).expect("symlink");
    let looped = super::load_paths(&[&dir]);
    assert_eq!(
        looped.authorization_policies.len(),
        2,
        "a symlink loop is followed once"
    );
    let missing = super::load_paths(&[dir.join("nope")]);
    assert!(
        missing.errors[0].to_string().starts_with("cannot read "),
        "{:?}",
        missing.errors
    );
}

struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn jwks_uri_is_read_in_both_spellings_istio_accepts_but_not_twice() {
    for spelling in ["jwksUri", "jwks_uri"] {
        let yaml = ra(&format!(
            "{{jwtRules: [{{issuer: i, {spelling}: \"https://i.example/jwks\"}}]}}"
        ));
        let loaded = load_str(Path::new("p.yaml"), &yaml);
        assert!(loaded.errors.is_empty(), "{spelling}: {:?}", loaded.errors);
        assert_eq!(
            loaded.request_authentications[0].spec.jwt_rules[0]
                .jwks_uri
                .as_deref(),
            Some("https://i.example/jwks"),
        );
    }
    let both = ra("{jwtRules: [{issuer: i, jwksUri: \"https://a/\", jwks_uri: \"https://b/\"}]}");
    let found = errors(&both);
    assert!(
        found.iter().any(|e| e.contains("duplicate field")),
        "{found:?}"
    );
}
