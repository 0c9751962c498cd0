//! JWT authentication, table-driven: each row names the Envoy/Istio behaviour it pins. Tokens
//! are minted at test time with the keys under `testdata/`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::Algorithm;
use nodeward::authn::cache::TokenCache;
use nodeward::authn::jwks::KeySet;
use nodeward::authn::rules::{rewrite, KeyLookup, Keys, NoRemoteKeys};
use nodeward::authn::{AuthnSet, JwtError, JwtRules, Outcome, RequestParts};
use nodeward::policy::load_str;
use serde_json::json;
use support::{claims, jwk, jwks, mint, mint_with, now};
use test_case::test_case;

const ISS: &str = "https://issuer.test";
const ISTIO_ISS: &str = "testing@secure.istio.io";

/// A RequestAuthentication for foo with one rule of issuer `ISS` and the given extra fields,
/// keys inline for every test algorithm.
fn ra(extra: &str) -> String {
    let keys = jwks(
        [
            (Algorithm::RS256, "rsa"),
            (Algorithm::ES256, "ec256"),
            (Algorithm::ES384, "ec384"),
            (Algorithm::EdDSA, "ed"),
            (Algorithm::HS256, "hmac"),
        ]
        .into_iter()
        .map(|(alg, kid)| {
            let mut k = jwk(alg, kid, false);
            k.common.key_algorithm = None; // the key's type decides, not a stated alg
            k
        })
        .collect(),
    );
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwks: '{keys}'\n{extra}"
    )
}

fn rules(yaml: &str) -> JwtRules {
    let loaded = load_str(Path::new("ra.yaml"), yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    AuthnSet::compile(&loaded.request_authentications, "istio-system")
        .for_workload("foo", &BTreeMap::new())
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

fn run(rules: &JwtRules, headers: &HeaderMap, query: Option<&str>) -> Outcome {
    let parts = RequestParts {
        method: &Method::GET,
        headers,
        query,
    };
    rules.authenticate(&parts, &NoRemoteKeys, &TokenCache::default(), now())
}

fn error_of(outcome: &Outcome) -> Option<JwtError> {
    match outcome {
        Outcome::Rejected { error, .. } => Some(*error),
        _ => None,
    }
}

fn principal_of(outcome: &Outcome) -> Option<String> {
    match outcome {
        Outcome::Authenticated(a) => Some(a.verified.auth.principal()),
        _ => None,
    }
}

#[test_case(Algorithm::RS256 ; "RS256")]
#[test_case(Algorithm::RS384 ; "RS384")]
#[test_case(Algorithm::RS512 ; "RS512")]
#[test_case(Algorithm::PS256 ; "PS256")]
#[test_case(Algorithm::PS384 ; "PS384")]
#[test_case(Algorithm::PS512 ; "PS512")]
#[test_case(Algorithm::ES256 ; "ES256")]
#[test_case(Algorithm::ES384 ; "ES384")]
#[test_case(Algorithm::EdDSA ; "EdDSA")]
#[test_case(Algorithm::HS256 ; "HS256 with an oct key")]
#[test_case(Algorithm::HS384 ; "HS384 with an oct key")]
#[test_case(Algorithm::HS512 ; "HS512 with an oct key")]
fn every_algorithm_verifies_without_kid(alg: Algorithm) {
    let token = mint(alg, None, &claims(ISS, "alice"));
    assert_eq!(
        principal_of(&run(&rules(&ra("")), &bearer(&token), None)).as_deref(),
        Some("https://issuer.test/alice")
    );
}

fn raw_token(header: &serde_json::Value, payload: &serde_json::Value) -> String {
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!("{}.{}.c2ln", b64(header), b64(payload))
}

#[test_case("garbage", JwtError::BadFormat ; "garbage is not three sections")]
#[test_case("a.b.c.d", JwtError::BadFormat ; "four sections")]
#[test_case("e3!.e30.c2ln", JwtError::HeaderBadBase64 ; "header not base64url")]
#[test_case("!!.e30.c2ln", JwtError::BadFormat ; "extractJWT starts the token at the first base64url character: .e30.c2ln")]
#[test_case("bm90IGpzb24.e30.c2ln", JwtError::HeaderBadJson ; "header not JSON")]
#[test_case(&raw_token(&json!({"typ": "JWT"}), &json!({})), JwtError::HeaderBadAlg ; "alg missing")]
#[test_case(&raw_token(&json!({"alg": "none"}), &json!({"iss": ISS})), JwtError::HeaderUnsupportedAlg ; "alg none is rejected")]
#[test_case(&raw_token(&json!({"alg": "XS999"}), &json!({"iss": ISS})), JwtError::HeaderUnsupportedAlg ; "unknown alg is rejected")]
#[test_case(&raw_token(&json!({"alg": "RS256", "kid": 7}), &json!({"iss": ISS})), JwtError::HeaderBadKid ; "kid not a string")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "iat": "123456789"})), JwtError::IatNotInteger ; "jwt_test.cc TestParsePayloadIatNotInteger")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "iat": -12345})), JwtError::IatOutOfRange ; "jwt_test.cc TestParsePayloadIatNotPositive")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "iat": 2.001e206})), JwtError::IatOutOfRange ; "jwt_test.cc TestParsePayloadIatTooBig")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "nbf": "123456789"})), JwtError::NbfNotInteger ; "jwt_test.cc TestParsePayloadNbfNotInteger")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "nbf": -12345})), JwtError::NbfOutOfRange ; "jwt_test.cc TestParsePayloadNbfNotPositive")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "nbf": 2.001e206})), JwtError::NbfOutOfRange ; "jwt_test.cc TestParsePayloadNbfTooBig")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "exp": "soon"})), JwtError::ExpNotInteger ; "jwt_test.cc TestParsePayloadExpNotInteger")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "exp": -12345})), JwtError::ExpOutOfRange ; "jwt_test.cc TestParsePayloadExpNotPositive")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "exp": 2.001e206})), JwtError::ExpOutOfRange ; "jwt_test.cc TestParsePayloadExpTooBig")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "exp": 18_446_744_073_709_551_615_u64})), JwtError::ExpOutOfRange ; "exp of 2^64 - 1 is 2^64 as a double: out of range")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "iat": -1, "exp": "soon"})), JwtError::IatOutOfRange ; "iat is read before nbf and exp")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "jti": 1_234_567})), JwtError::JtiNotString ; "jwt_test.cc TestParsePayloadJtiNotString")]
#[test_case("eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOjd9.!!", JwtError::IssNotString ; "payload fields are read before the signature's encoding")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": ISS, "aud": [1]})), JwtError::AudNotString ; "aud not strings")]
#[test_case(&raw_token(&json!({"alg": "RS256"}), &json!({"iss": "https://other"})), JwtError::UnknownIssuer ; "issuer not configured")]
#[test_case(&raw_token(&json!({"alg": "RS256", "kid": "rsa"}), &json!({"iss": ISS, "exp": now() + 60})), JwtError::VerificationFailed ; "bad signature")]
fn malformed_tokens_get_envoys_answer(token: &str, expected: JwtError) {
    let outcome = run(&rules(&ra("")), &bearer(token), None);
    assert_eq!(error_of(&outcome), Some(expected));
    assert_eq!(expected.status(), 401);
}

/// `now()` as the JSON double a token may carry.
fn now_f64() -> f64 {
    f64::from(u32::try_from(now()).expect("a Unix time before 2106"))
}

#[test_case(json!({"iss": ISS, "sub": "a", "exp": now() - 61}), Some(JwtError::Expired) ; "expired beyond the 60 s skew")]
#[test_case(json!({"iss": ISS, "sub": "a", "exp": now() - 50}), None ; "expired within the skew is accepted")]
#[test_case(json!({"iss": ISS, "sub": "a", "nbf": now() + 61}), Some(JwtError::NotYetValid) ; "not yet valid beyond the skew")]
#[test_case(json!({"iss": ISS, "sub": "a", "nbf": now() + 50}), None ; "nbf within the skew is accepted")]
#[test_case(json!({"iss": ISS, "sub": "a"}), None ; "no exp never expires")]
#[test_case(json!({"iss": ISS, "sub": "a", "exp": 0}), None ; "exp 0 is no exp (jwt_time_test.cc NotTimeConstraint)")]
#[test_case(json!({"iss": ISS, "sub": "a", "exp": 1.5e9}), Some(JwtError::Expired) ; "a float exp is read (1.5e9 is in the past)")]
#[test_case(json!({"iss": ISS, "sub": "a", "exp": now_f64() + 3600.5}), None ; "a float exp in the future is accepted, truncated (jwt_test.cc TestParsePayloadIatDecimalsDrop)")]
#[test_case(json!({"iss": ISS, "sub": "a", "exp": now_f64() - 61.5}), Some(JwtError::Expired) ; "a float exp beyond the skew")]
#[test_case(json!({"iss": ISS, "sub": "a", "nbf": now_f64() + 61.5}), Some(JwtError::NotYetValid) ; "a float nbf beyond the skew")]
#[test_case(json!({"iss": ISS, "sub": "a", "iat": 1234.5678}), None ; "a float iat is accepted")]
fn time_constraints(claims: serde_json::Value, expected: Option<JwtError>) {
    let token = mint(Algorithm::ES256, Some("ec256"), &{ claims });
    assert_eq!(
        error_of(&run(&rules(&ra("")), &bearer(&token), None)),
        expected
    );
}

#[test_case("", json!("anything"), None ; "no audiences configured accepts any")]
#[test_case("    audiences: [api.test]\n", json!(["x", "api.test"]), None ; "one of the token's audiences is allowed")]
#[test_case("    audiences: [api.test]\n", json!("https://api.test/"), None ; "scheme and trailing slash are ignored")]
#[test_case("    audiences: [api.test]\n", json!("other"), Some(JwtError::AudienceNotAllowed) ; "audience mismatch")]
#[test_case("    audiences: [api.test]\n", serde_json::Value::Null, Some(JwtError::AudienceNotAllowed) ; "no aud when audiences are configured")]
fn audiences(extra: &str, aud: serde_json::Value, expected: Option<JwtError>) {
    let mut c = claims(ISS, "a");
    if !aud.is_null() {
        c["aud"] = aud;
    }
    let token = mint(Algorithm::RS256, Some("rsa"), &c);
    assert_eq!(
        error_of(&run(&rules(&ra(extra)), &bearer(&token), None)),
        expected
    );
    assert_eq!(
        JwtError::AudienceNotAllowed.status(),
        403,
        "audience mismatch answers 403"
    );
}

#[test]
fn key_selection_by_kid_and_type() {
    let r = rules(&ra(""));
    let kid_unknown = mint(Algorithm::RS256, Some("nope"), &claims(ISS, "a"));
    assert_eq!(
        error_of(&run(&r, &bearer(&kid_unknown), None)),
        Some(JwtError::KidAlgMismatch)
    );
    // An RS256 token whose kid names the EC key: the key type must fit alg.
    let wrong_type = mint(Algorithm::RS256, Some("ec256"), &claims(ISS, "a"));
    assert_eq!(
        error_of(&run(&r, &bearer(&wrong_type), None)),
        Some(JwtError::KidAlgMismatch)
    );
    // jwt_verify_lib compares kids only when both are non-empty: "kid": "" tries every key.
    let empty_kid = mint(Algorithm::RS256, Some(""), &claims(ISS, "a"));
    assert_eq!(
        principal_of(&run(&r, &bearer(&empty_kid), None)).as_deref(),
        Some("https://issuer.test/a"),
        "an empty kid matches any key"
    );
    // Signed by another RSA key under the same kid.
    let other_key = mint_with(Algorithm::RS256, Some("rsa"), &claims(ISS, "a"), true);
    assert_eq!(
        error_of(&run(&r, &bearer(&other_key), None)),
        Some(JwtError::VerificationFailed)
    );
}

#[test]
fn keys_unavailable_fail_closed_only_for_tokens() {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwksUri: http://127.0.0.1:9/keys\n"
    );
    let r = rules(&yaml);
    let token = mint(Algorithm::RS256, Some("rsa"), &claims(ISS, "a"));
    assert_eq!(
        error_of(&run(&r, &bearer(&token), None)),
        Some(JwtError::JwksFetchFailed)
    );
    assert_eq!(
        JwtError::JwksFetchFailed.body(),
        "Jwks remote fetch is failed"
    );
    assert!(
        matches!(run(&r, &HeaderMap::new(), None), Outcome::NoToken),
        "requests without a token are not affected"
    );
}

#[test]
fn istio_sample_tokens_validate() {
    let keys = std::fs::read_to_string(support::testdata("istio-samples/jwks.json")).expect("jwks");
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: jwt-example, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: {ISTIO_ISS}\n    jwks: '{}'\n",
        keys.trim().replace('\n', "")
    );
    let r = rules(&yaml);
    for file in ["demo.jwt", "groups-scope.jwt"] {
        let token = std::fs::read_to_string(support::testdata(&format!("istio-samples/{file}")))
            .expect("token");
        let outcome = run(&r, &bearer(token.trim()), None);
        assert_eq!(
            principal_of(&outcome).as_deref(),
            Some("testing@secure.istio.io/testing@secure.istio.io"),
            "{file}"
        );
        if let (Outcome::Authenticated(a), "groups-scope.jwt") = (&outcome, file) {
            assert_eq!(
                a.verified.auth.claims["groups"],
                json!(["group1", "group2"])
            );
        }
    }
}

#[test]
fn locations() {
    let token = mint(Algorithm::ES256, Some("ec256"), &claims(ISS, "a"));
    let r = rules(&ra(""));
    let mut lower = HeaderMap::new();
    lower.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("bearer {token}")).expect("h"),
    );
    assert!(
        matches!(run(&r, &lower, None), Outcome::NoToken),
        "Envoy searches the prefix case-sensitively: lower-case bearer is not a token"
    );
    let query = format!("x=1&access_token={token}");
    assert!(
        principal_of(&run(&r, &HeaderMap::new(), Some(&query))).is_some(),
        "access_token query parameter by default"
    );
    let mut basic = HeaderMap::new();
    basic.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_static("Basic dXNlcjpwdw=="),
    );
    assert!(
        matches!(run(&r, &basic, None), Outcome::NoToken),
        "another scheme is not a token"
    );

    let explicit = rules(&ra(
        "    fromHeaders: [{name: x-jwt}]\n    fromCookies: [session]\n",
    ));
    assert!(
        matches!(run(&explicit, &bearer(&token), None), Outcome::NoToken),
        "explicit locations replace the defaults"
    );
    let mut h = HeaderMap::new();
    h.insert("x-jwt", HeaderValue::from_str(&token).expect("h"));
    assert!(principal_of(&run(&explicit, &h, None)).is_some());
    let mut c = HeaderMap::new();
    c.insert(
        http::header::COOKIE,
        HeaderValue::from_str(&format!("a=b; session={token}")).expect("h"),
    );
    assert!(
        principal_of(&run(&explicit, &c, None)).is_some(),
        "fromCookies"
    );
}

/// What a request with a token in some form comes to.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Rejected(JwtError),
    NoToken,
    Authenticated,
}

/// A token present in any form is verified or rejected, never ignored (Envoy's extractor works
/// on bytes). `{jwt}` in a header value or the query is replaced by the token: `forged` is
/// signed by another key under the rule's kid.
#[test_case(b"authorization", b"Bearer {jwt}\xff", None, true, Expect::Rejected(JwtError::SignatureBadBase64) ; "a non-ASCII byte after a forged header token")]
#[test_case(b"authorization", b"Bearer {jwt}\xff", None, false, Expect::Rejected(JwtError::SignatureBadBase64) ; "a non-ASCII byte after a good header token")]
#[test_case(b"authorization", b"Bearer {jwt} trailing", None, false, Expect::Rejected(JwtError::SignatureBadBase64) ; "text after a good header token (Envoy's extractJWT keeps it)")]
#[test_case(b"authorization", b"Token x, Bearer {jwt}", None, true, Expect::Rejected(JwtError::VerificationFailed) ; "a forged token after another scheme")]
#[test_case(b"authorization", b"bearer {jwt}", None, true, Expect::NoToken ; "lower-case bearer is not a token")]
#[test_case(b"cookie", b"a=\xff\xfe; session={jwt}", None, true, Expect::Rejected(JwtError::VerificationFailed) ; "a forged cookie token beside a non-ASCII cookie")]
#[test_case(b"cookie", b"a=\xff\xfe; session={jwt}", None, false, Expect::Authenticated ; "a good cookie token beside a non-ASCII cookie")]
#[test_case(b"cookie", b"session=\"{jwt}\"", None, false, Expect::Authenticated ; "a quoted cookie token")]
#[test_case(b"x-other", b"", Some("access_token={jwt}%FF"), true, Expect::Rejected(JwtError::SignatureBadBase64) ; "a percent-encoded non-UTF-8 byte after a forged query token")]
#[test_case(b"x-other", b"", Some("access_token={jwt}%ZZ"), false, Expect::Rejected(JwtError::SignatureBadBase64) ; "an invalid escape after a query token is kept")]
#[test_case(b"x-other", b"", Some("access_token="), false, Expect::Rejected(JwtError::BadFormat) ; "an empty query token")]
fn tokens_in_any_form_are_verified_or_rejected(
    name: &[u8],
    value: &[u8],
    query: Option<&str>,
    forged: bool,
    expected: Expect,
) {
    let token = mint_with(Algorithm::RS256, Some("rsa"), &claims(ISS, "a"), forged);
    let fill = |template: &[u8]| -> Vec<u8> {
        match template.windows(5).position(|w| w == b"{jwt}") {
            Some(at) => [&template[..at], token.as_bytes(), &template[at + 5..]].concat(),
            None => template.to_vec(),
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert(
        http::HeaderName::from_bytes(name).expect("name"),
        HeaderValue::from_bytes(&fill(value)).expect("value"),
    );
    let query = query.map(|q| String::from_utf8(fill(q.as_bytes())).expect("ASCII query"));
    let r = rules(&ra(
        "    fromHeaders: [{name: authorization, prefix: \"Bearer \"}]\n    fromParams: [access_token]\n    fromCookies: [session]\n",
    ));
    let outcome = run(&r, &headers, query.as_deref());
    let got = match &outcome {
        Outcome::Rejected { error, .. } => {
            assert_eq!(error.status(), 401);
            Expect::Rejected(*error)
        }
        Outcome::NoToken => Expect::NoToken,
        Outcome::Authenticated(_) => Expect::Authenticated,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(got, expected);
}

#[test]
fn rules_of_several_objects_merge() {
    let second = format!(
        "---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: mesh, namespace: istio-system}}\nspec:\n  jwtRules:\n  - issuer: https://mesh.test\n    jwks: '{}'\n",
        jwks(vec![jwk(Algorithm::EdDSA, "ed", false)])
    );
    let r = rules(&format!("{}{second}", ra("")));
    assert_eq!(r.rules.len(), 2, "the root namespace's rules apply too");
    let a = mint(Algorithm::RS256, Some("rsa"), &claims(ISS, "a"));
    let b = mint(
        Algorithm::EdDSA,
        Some("ed"),
        &claims("https://mesh.test", "b"),
    );
    assert!(principal_of(&run(&r, &bearer(&a), None)).is_some());
    assert_eq!(
        principal_of(&run(&r, &bearer(&b), None)).as_deref(),
        Some("https://mesh.test/b")
    );
    let other = AuthnSet::compile(
        &load_str(Path::new("x"), &ra("").replace("app", "x")).request_authentications,
        "istio-system",
    );
    let labels = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
    assert_eq!(
        other.for_workload("bar", &labels).rules.len(),
        0,
        "another namespace's rules do not apply"
    );
}

#[test]
fn one_bad_token_rejects_even_with_a_good_one() {
    let good = mint(Algorithm::RS256, Some("rsa"), &claims(ISS, "a"));
    let query = "access_token=garbage";
    assert_eq!(
        error_of(&run(&rules(&ra("")), &bearer(&good), Some(query))),
        Some(JwtError::BadFormat)
    );
}

#[test]
fn cors_preflight_is_not_asked_for_a_token() {
    let mut h = bearer("garbage");
    h.insert(
        http::header::ORIGIN,
        HeaderValue::from_static("https://web.test"),
    );
    h.insert(
        http::header::ACCESS_CONTROL_REQUEST_METHOD,
        HeaderValue::from_static("POST"),
    );
    let parts = RequestParts {
        method: &Method::OPTIONS,
        headers: &h,
        query: None,
    };
    assert!(matches!(
        rules(&ra("")).authenticate(&parts, &NoRemoteKeys, &TokenCache::default(), now()),
        Outcome::Preflight
    ));
}

#[test]
fn space_delimited_claims() {
    let mut c = claims(ISS, "a");
    c["scope"] = json!("read write");
    c["roles"] = json!("admin ops");
    let token = mint(Algorithm::RS256, Some("rsa"), &c);
    let outcome = run(
        &rules(&ra("    spaceDelimitedClaims: [roles]\n")),
        &bearer(&token),
        None,
    );
    let Outcome::Authenticated(a) = outcome else {
        panic!("not authenticated: {outcome:?}")
    };
    assert_eq!(
        a.verified.auth.claims["scope"],
        json!(["read", "write"]),
        "scope is always split"
    );
    assert_eq!(a.verified.auth.claims["roles"], json!(["admin", "ops"]));
}

#[test]
fn rewrite_removes_tokens_adds_outputs_and_strips_spoofs() {
    let mut c = claims(ISS, "alice");
    c["org"] = json!({"team": "blue", "size": 3, "admin": true});
    let token = mint(Algorithm::RS256, Some("rsa"), &c);
    let extra = "    outputPayloadToHeader: x-jwt-payload\n    outputClaimToHeaders: [{header: x-team, claim: org.team}, {header: x-size, claim: org.size}, {header: x-admin, claim: org.admin}]\n";
    let r = rules(&ra(extra));
    let mut headers = bearer(&token);
    headers.insert("x-team", HeaderValue::from_static("spoofed"));
    let outcome = run(&r, &headers, Some("a=1"));
    let query = rewrite(&r, &outcome, &mut headers, Some("a=1"));
    assert!(
        headers.get(http::header::AUTHORIZATION).is_none(),
        "forwardOriginalToken defaults to false"
    );
    assert_eq!(headers["x-team"], "blue");
    assert_eq!(
        (
            headers["x-size"].to_str().ok(),
            headers["x-admin"].to_str().ok()
        ),
        (Some("3"), Some("true"))
    );
    let payload = token.split('.').nth(1).expect("payload");
    assert_eq!(
        headers["x-jwt-payload"], payload,
        "the payload, base64url as in the token"
    );
    assert_eq!(query.as_deref(), Some("a=1"));

    // No token: a client-supplied output header is still removed.
    let mut spoof = HeaderMap::new();
    spoof.insert("x-team", HeaderValue::from_static("spoofed"));
    let outcome = run(&r, &spoof, None);
    rewrite(&r, &outcome, &mut spoof, None);
    assert!(spoof.get("x-team").is_none());

    // Query parameter and cookie tokens are removed from where they were; kept when forwarding.
    let r = rules(&ra("    fromParams: [t]\n    fromCookies: [s]\n"));
    let mut h = HeaderMap::new();
    h.insert(
        http::header::COOKIE,
        HeaderValue::from_str(&format!("a=b; s={token}")).expect("h"),
    );
    let q = format!("x=1&t={token}&y=2");
    let outcome = run(&r, &h, Some(&q));
    let new_query = rewrite(&r, &outcome, &mut h, Some(&q));
    assert_eq!(new_query.as_deref(), Some("x=1&y=2"));
    assert_eq!(h[http::header::COOKIE], "a=b");
    let r = rules(&ra("    forwardOriginalToken: true\n"));
    let mut h = bearer(&token);
    let outcome = run(&r, &h, None);
    rewrite(&r, &outcome, &mut h, None);
    assert!(
        h.get(http::header::AUTHORIZATION).is_some(),
        "forwardOriginalToken keeps it"
    );
}

/// Keys whose generation the test controls.
struct Rotating(Arc<KeySet>, std::sync::atomic::AtomicU64);

impl Keys for Rotating {
    fn lookup(&self, _: &str) -> KeyLookup {
        KeyLookup::Ready(
            self.0.clone(),
            self.1.load(std::sync::atomic::Ordering::SeqCst),
        )
    }
}

#[test]
fn verified_tokens_are_cached_until_the_keys_change() {
    let keys = jwks(vec![jwk(Algorithm::RS256, "rsa", false)]);
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwksUri: http://127.0.0.1:9/keys\n"
    );
    let r = rules(&yaml);
    let store = Rotating(
        Arc::new(KeySet::parse(keys.as_bytes()).expect("keys")),
        1.into(),
    );
    let cache = TokenCache::default();
    let headers = bearer(&mint(Algorithm::RS256, Some("rsa"), &claims(ISS, "a")));
    let parts = RequestParts {
        method: &Method::GET,
        headers: &headers,
        query: None,
    };
    let cached = |o: Outcome| match o {
        Outcome::Authenticated(a) => a.cached,
        other => panic!("not authenticated: {other:?}"),
    };
    assert!(!cached(r.authenticate(&parts, &store, &cache, now())));
    assert!(
        cached(r.authenticate(&parts, &store, &cache, now())),
        "the second time is a cache hit"
    );
    store.1.store(2, std::sync::atomic::Ordering::SeqCst);
    assert!(
        !cached(r.authenticate(&parts, &store, &cache, now())),
        "new keys: verified again"
    );
    // Time is checked before the cache: a cached token past exp is refused.
    assert_eq!(
        error_of(&r.authenticate(&parts, &store, &cache, now() + 7200)),
        Some(JwtError::Expired)
    );
}

/// Istio, `tests/integration/security/jwt_test.go`, subtest "aud" with
/// `testdata/requestauthn/aud.yaml.tmpl`: two RequestAuthentications select the workload; the
/// first has issuer 1 (audiences `foo`) and issuer 2 (audiences `bar`), the second issuer 2 with
/// no audiences. Istio makes each rule a provider and accepts a token any of them accepts.
fn combined_rules() -> JwtRules {
    let keys = jwks(vec![jwk(Algorithm::RS256, "rsa", false)]);
    let object = |name: &str, rules: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  jwtRules:\n{rules}"
        )
    };
    let rule = |issuer: &str, audiences: &str| {
        format!("  - issuer: {issuer}\n    jwks: '{keys}'\n{audiences}")
    };
    let part1 = object(
        "part1",
        &(rule("test-issuer-1@istio.io", "    audiences: [foo]\n")
            + &rule("test-issuer-2@istio.io", "    audiences: [bar]\n")),
    );
    let part2 = object("part2", &rule("test-issuer-2@istio.io", ""));
    rules(&format!("{part1}---\n{part2}"))
}

#[test_case("test-issuer-1@istio.io", None, Some(JwtError::AudienceNotAllowed) ; "jwt_test.go aud/invalid-aud: issuer 1 without aud is 403")]
#[test_case("test-issuer-1@istio.io", Some("foo"), None ; "jwt_test.go aud/valid-aud: issuer 1 with aud foo")]
#[test_case("test-issuer-2@istio.io", None, None ; "jwt_test.go aud/verify-policies-are-combined: issuer 2 fails part1's audiences, passes part2")]
#[test_case("test-issuer-2@istio.io", Some("bar"), None ; "issuer 2 with aud bar passes the first of its rules")]
fn rules_of_one_issuer_are_all_tried(issuer: &str, aud: Option<&str>, expected: Option<JwtError>) {
    let mut c = claims(issuer, "sub-1");
    if let Some(aud) = aud {
        c["aud"] = json!(aud);
    }
    let token = mint(Algorithm::RS256, Some("rsa"), &c);
    let outcome = run(&combined_rules(), &bearer(&token), None);
    assert_eq!(error_of(&outcome), expected);
    if expected.is_none() {
        assert_eq!(
            principal_of(&outcome),
            Some(format!("{issuer}/sub-1")),
            "the token's identity is the request's"
        );
    }
}

#[test]
fn when_every_rule_of_the_issuer_refuses_the_first_refusal_answers() {
    // Two rules of one issuer: the first wants audience `a`, the second has keys that did not
    // sign the token. Envoy's `requires_all` of `{provider or allow_missing}` stops at the first
    // provider that refuses: the audience error (403), not the signature error.
    let good = jwks(vec![jwk(Algorithm::RS256, "rsa", false)]);
    let other = jwks(vec![jwk(Algorithm::RS256, "rsa", true)]);
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwks: '{good}'\n    audiences: [a]\n  - issuer: {ISS}\n    jwks: '{other}'\n"
    );
    let r = rules(&yaml);
    let token = mint(Algorithm::RS256, Some("rsa"), &claims(ISS, "x"));
    assert_eq!(
        error_of(&run(&r, &bearer(&token), None)),
        Some(JwtError::AudienceNotAllowed)
    );
    // The same token with audience `a` passes the first rule.
    let mut c = claims(ISS, "x");
    c["aud"] = json!("a");
    let token = mint(Algorithm::RS256, Some("rsa"), &c);
    assert_eq!(error_of(&run(&r, &bearer(&token), None)), None);
}

/// `text` (base64url of a length that is not a multiple of 3) with the unused low bits of its
/// last character set: the same bytes, a non-canonical spelling.
fn non_canonical(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    assert!(!text.len().is_multiple_of(4), "{text} has no unused bits");
    let (head, last) = text.split_at(text.len() - 1);
    let index = ALPHABET
        .iter()
        .position(|&c| c == last.as_bytes()[0])
        .expect("base64url character");
    format!("{head}{}", char::from(ALPHABET[index + 1]))
}

#[test]
fn base64url_is_decoded_as_jwt_verify_lib_decodes_it() {
    // jwt_verify_lib decodes each section with absl's WebSafeBase64Unescape, which ignores the
    // unused low bits of the last character (they need not be zero).
    let r = rules(&ra(""));
    let token = mint(Algorithm::RS256, Some("rsa"), &claims(ISS, "a"));
    let (signed, signature) = token.rsplit_once('.').expect("three sections");
    let altered = format!("{signed}.{}", non_canonical(signature));
    assert_ne!(altered, token);
    assert_eq!(
        principal_of(&run(&r, &bearer(&altered), None)).as_deref(),
        Some("https://issuer.test/a"),
        "a signature with non-canonical trailing bits verifies"
    );
    // A header spelled non-canonically decodes (the signature, over the text, then fails).
    let header = {
        use base64::Engine as _;
        // 28 bytes: the last character carries 4 unused bits.
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"rsa" }"#)
    };
    let (_, rest) = token.split_once('.').expect("three sections");
    let respelled = format!("{}.{rest}", non_canonical(&header));
    assert_eq!(
        error_of(&run(&r, &bearer(&respelled), None)),
        Some(JwtError::VerificationFailed),
        "not HeaderBadBase64"
    );
}

#[test_case("{t}.", true ; "jwt.cc parseFromString splits with SkipEmpty: a trailing dot")]
#[test_case(".{t}", true ; "jwt.cc parseFromString splits with SkipEmpty: a leading dot")]
#[test_case("{h}..{p}.{s}", true ; "jwt.cc parseFromString splits with SkipEmpty: an empty section, the signature covers h.p")]
#[test_case("{h}.{p}..", false ; "jwt.cc parseFromString: two non-empty sections are a bad format")]
fn empty_sections_are_skipped(shape: &str, verifies: bool) {
    let r = rules(&ra(""));
    let t = mint(Algorithm::RS256, Some("rsa"), &claims(ISS, "a"));
    let parts: Vec<&str> = t.split('.').collect();
    let token = shape
        .replace("{t}", &t)
        .replace("{h}", parts[0])
        .replace("{p}", parts[1])
        .replace("{s}", parts[2]);
    let outcome = run(&r, &bearer(&token), None);
    if verifies {
        assert_eq!(
            principal_of(&outcome).as_deref(),
            Some("https://issuer.test/a")
        );
    } else {
        assert_eq!(error_of(&outcome), Some(JwtError::BadFormat));
    }
}
