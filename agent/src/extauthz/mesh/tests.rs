//! Rows from Istio: `pkg/config/validation/agent/extensionprovider_test.go` (service, port,
//! `statusOnError`, `pathPrefix`), `pilot/pkg/security/authz/builder/extauthz.go` (names, duplicates,
//! the single wildcard, the 600 s default timeout) and the `MeshConfig` proto's field names.

use std::time::Duration;

use http::StatusCode;
use test_case::test_case;

use super::*;

fn one(yaml_provider: &str) -> Entry {
    let text = format!("extensionProviders:\n{yaml_provider}");
    let mesh = MeshProviders::parse("test", &text).expect("a MeshConfig");
    assert!(mesh.errors.is_empty(), "{:?}", mesh.errors);
    mesh.providers.into_values().next().expect("one provider")
}

fn invalid_field(yaml_provider: &str) -> String {
    match one(yaml_provider) {
        Entry::Invalid(errors) => errors
            .iter()
            .map(|e| e.field.clone())
            .collect::<Vec<_>>()
            .join(","),
        Entry::Ready(p) => panic!("accepted: {p:?}"),
    }
}

#[test]
fn istios_sample_providers_parse_with_every_field() {
    // The MeshConfig of Istio's "External Authorization" task, plus every other field.
    let text = r#"
accessLogFile: /dev/stdout
defaultConfig: {holdApplicationUntilProxyStarts: true}
extensionProviders:
- name: "sample-ext-authz-grpc"
  envoyExtAuthzGrpc:
    service: "ext-authz.foo.svc.cluster.local"
    port: "9000"
- name: "sample-ext-authz-http"
  envoyExtAuthzHttp:
    service: "foo/ext-authz.foo.svc.cluster.local"
    port: 8000
    timeout: 0.5s
    pathPrefix: /check
    failOpen: true
    clearRouteCache: true
    statusOnError: "503"
    includeRequestHeadersInCheck: ["x-ext-authz"]
    includeAdditionalHeadersInCheck: {x-added: "1"}
    includeRequestBodyInCheck: {maxRequestBytes: 1024, allowPartialMessage: true, packAsBytes: false}
    headersToUpstreamOnAllow: ["x-ext-authz-*"]
    headersToDownstreamOnDeny: ["*-check-result"]
    headersToDownstreamOnAllow: ["x-note"]
- name: otel
  opentelemetry: {service: otel.istio-system.svc.cluster.local, port: 4317}
"#;
    // `port: "9000"`: protobuf JSON spells a uint32 either way; Istio's task quotes it.
    let mesh = MeshProviders::parse("mesh", text).expect("parse");
    assert!(
        matches!(mesh.providers.get("sample-ext-authz-grpc"), Some(Entry::Ready(p)) if p.port == 9000)
    );
    assert_eq!(mesh.ignored, ["otel"]);
    let Some(Entry::Ready(http)) = mesh.providers.get("sample-ext-authz-http") else {
        panic!("{:?}", mesh.providers);
    };
    assert_eq!(http.host, "ext-authz.foo.svc.cluster.local");
    assert_eq!(http.port, 8000);
    assert_eq!(http.timeout, Duration::from_millis(500));
    assert!(http.fail_open);
    assert_eq!(http.status_on_error, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(http.body.as_ref().map(|b| b.max_request_bytes), Some(1024));
    let Kind::Http(settings) = &http.kind else {
        panic!()
    };
    assert_eq!(settings.path_prefix, "/check");
    assert!(any_matches(
        &settings.headers_to_upstream_on_allow,
        "x-ext-authz-check-result"
    ));
    assert!(any_matches(
        &settings.headers_to_downstream_on_deny,
        "x-ext-authz-check-result"
    ));
    assert!(!any_matches(
        &settings.headers_to_downstream_on_deny,
        "x-ext-authz"
    ));
}

#[test]
fn a_port_that_is_not_a_number_is_refused_naming_the_field() {
    let field = invalid_field("- name: g\n  envoyExtAuthzGrpc: {service: a.b, port: \"http\"}\n");
    assert!(field.ends_with("envoyExtAuthzGrpc.port"), "{field}");
}

#[test]
fn defaults_are_istios() {
    let Entry::Ready(p) = one("- name: g\n  envoyExtAuthzGrpc: {service: 10.0.0.1, port: 9000}\n")
    else {
        panic!()
    };
    // timeoutOrDefault: 600 s; statusOnError: 403; failOpen: false.
    assert_eq!(p.timeout, DEFAULT_TIMEOUT);
    assert_eq!(p.status_on_error, StatusCode::FORBIDDEN);
    assert!(!p.fail_open);
    assert_eq!(p.kind, Kind::Grpc);
}

#[test_case("service: \"\"\n    port: 9000", "envoyExtAuthzGrpc.service" ; "empty service")]
#[test_case("service: a.b\n    port: 0", "envoyExtAuthzGrpc.port" ; "port 0")]
#[test_case("service: a.b\n    port: 65536", "envoyExtAuthzGrpc.port" ; "port beyond 65535")]
#[test_case("service: \"a b\"\n    port: 1", "envoyExtAuthzGrpc.service" ; "service with a space")]
#[test_case("service: \"foo/a_b\"\n    port: 1", "envoyExtAuthzGrpc.service" ; "host with an underscore")]
#[test_case("service: a.b\n    port: 1\n    statusOnError: \"abc\"", "envoyExtAuthzGrpc.statusOnError" ; "status not a number")]
#[test_case("service: a.b\n    port: 1\n    statusOnError: \"600\"", "envoyExtAuthzGrpc.statusOnError" ; "status Envoy does not name")]
#[test_case("service: a.b\n    port: 1\n    timeout: 10", "envoyExtAuthzGrpc.timeout" ; "timeout without unit")]
#[test_case("service: a.b\n    port: 1\n    timeout: 1m", "envoyExtAuthzGrpc.timeout" ; "timeout in minutes is not protobuf JSON")]
#[test_case("service: a.b\n    port: 1\n    timeout: 0s", "envoyExtAuthzGrpc.timeout" ; "zero timeout")]
#[test_case("service: a.b\n    port: 1\n    includeRequestBodyInCheck: {maxRequestBytes: 0}", "envoyExtAuthzGrpc.includeRequestBodyInCheck.maxRequestBytes" ; "zero body size")]
#[test_case("service: a.b\n    port: 1\n    pathPrefix: /x", "envoyExtAuthzGrpc" ; "an HTTP field on the gRPC kind")]
fn grpc_provider_errors_name_the_field(fields: &str, expected: &str) {
    let field = invalid_field(&format!("- name: g\n  envoyExtAuthzGrpc:\n    {fields}\n"));
    assert!(field.contains(expected), "{field} lacks {expected}");
}

#[test_case("pathPrefix: check", "pathPrefix" ; "path prefix without a slash")]
#[test_case("pathPrefix: \"/a b\"", "pathPrefix" ; "path prefix with a space")]
#[test_case("includeRequestHeadersInCheck: [\"*\"]", "includeRequestHeadersInCheck[0]" ; "single wildcard in request headers")]
#[test_case("headersToUpstreamOnAllow: [\"a\", \"*\"]", "headersToUpstreamOnAllow[1]" ; "single wildcard upstream")]
#[test_case("headersToDownstreamOnDeny: [\"*\"]", "headersToDownstreamOnDeny[0]" ; "single wildcard downstream on deny")]
#[test_case("headersToDownstreamOnAllow: [\"*\"]", "headersToDownstreamOnAllow[0]" ; "single wildcard downstream on allow")]
#[test_case("includeAdditionalHeadersInCheck: {\"bad name\": x}", "includeAdditionalHeadersInCheck[bad name]" ; "bad additional header name")]
#[test_case("headersToUpstreamOnDeny: [\"x\"]", "envoyExtAuthzHttp" ; "unknown field")]
fn http_provider_errors_name_the_field(field_yaml: &str, expected: &str) {
    let field = invalid_field(&format!(
        "- name: h\n  envoyExtAuthzHttp:\n    service: a.b\n    port: 1\n    {field_yaml}\n"
    ));
    assert!(field.contains(expected), "{field} lacks {expected}");
}

#[test_case("Upper" ; "uppercase")]
#[test_case("-lead" ; "leading hyphen")]
#[test_case("a.b" ; "dot")]
fn provider_names_are_dns_labels(name: &str) {
    let field = invalid_field(&format!(
        "- name: {name:?}\n  envoyExtAuthzGrpc: {{service: a.b, port: 1}}\n"
    ));
    assert_eq!(field.rsplit('.').next(), Some("name"), "{field}");
}

#[test]
fn duplicates_and_nameless_entries_are_errors_and_the_first_wins() {
    let mesh = MeshProviders::parse(
        "m",
        "extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: one.x, port: 1}\n- name: a\n  envoyExtAuthzGrpc: {service: two.x, port: 2}\n- envoyExtAuthzGrpc: {service: three.x, port: 3}\n",
    )
    .expect("parse");
    let Some(Entry::Ready(a)) = mesh.providers.get("a") else {
        panic!()
    };
    assert_eq!(a.host, "one.x");
    let problems = mesh.problems().join("\n");
    assert!(
        problems.contains("must be unique, found duplicate: a"),
        "{problems}"
    );
    assert!(
        problems.contains("extensionProviders[2].name"),
        "{problems}"
    );
}

#[test]
fn both_kinds_in_one_entry_is_an_error() {
    let field = invalid_field(
        "- name: x\n  envoyExtAuthzGrpc: {service: a.b, port: 1}\n  envoyExtAuthzHttp: {service: a.b, port: 1}\n",
    );
    assert_eq!(field, "extensionProviders[0]");
}

#[test_case("" ; "empty document")]
#[test_case("defaultConfig: {}\n" ; "no providers")]
fn a_meshconfig_without_providers_is_empty(text: &str) {
    let mesh = MeshProviders::parse("m", text).expect("parse");
    assert!(mesh.providers.is_empty() && mesh.errors.is_empty());
}

#[test_case("- a\n- b\n" ; "a list")]
#[test_case("extensionProviders: {name: x}\n" ; "providers not a list")]
#[test_case("a: [\n" ; "not YAML")]
fn a_document_that_is_not_a_meshconfig_is_refused_whole(text: &str) {
    let e = MeshProviders::parse("mesh.yaml", text).expect_err("refused");
    assert!(
        e.to_string().starts_with("mesh.yaml: not a MeshConfig"),
        "{e}"
    );
}

#[test_case("x-ext-authz", "x-ext-authz", true ; "exact")]
#[test_case("X-Ext-Authz", "x-ext-authz", true ; "exact ignores case")]
#[test_case("x-ext-authz", "x-ext-authz-2", false ; "exact is not a prefix")]
#[test_case("x-ext-*", "x-ext-authz", true ; "prefix")]
#[test_case("x-ext-*", "x-ext-", true ; "prefix matches itself")]
#[test_case("*-user", "x-auth-user", true ; "suffix")]
#[test_case("*-USER", "x-auth-user", true ; "suffix ignores case")]
#[test_case("*-user", "user", false ; "suffix longer than the name")]
fn header_patterns_match_as_istio_generates_them(pattern: &str, name: &str, hit: bool) {
    assert_eq!(HeaderPattern::parse(pattern).matches(name), hit);
}

#[test_case("1s", Duration::from_secs(1))]
#[test_case("0.5s", Duration::from_millis(500))]
#[test_case("1.000000001s", Duration::new(1, 1))]
#[test_case("600s", Duration::from_mins(10))]
fn durations_are_protobuf_json(text: &str, expected: Duration) {
    assert_eq!(parse_duration(text), Ok(expected));
}
