//! JWT authentication cost per request: a token verified (signature checked) against a token
//! served from the verified-token cache, for RS256 and ES256, and token extraction.
//!
//! `verify/<alg>/uncached` is the whole `authenticate` path with a cache miss forced by a new
//! key-set generation on every call (decode, issuer, time, audience, signature, cache insert);
//! `verify/<alg>/cached` is the same call when the cache holds the token (decode, issuer,
//! time, audience, SHA-256 of the token, lookup). The target: cached at least 20x
//! faster than uncached RS256, in the same run.
//!
//! Run: `cargo bench -p nodeward --bench authn`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method};
use jsonwebtoken::Algorithm;
use nodeward::authn::cache::TokenCache;
use nodeward::authn::jwks::KeySet;
use nodeward::authn::rules::{KeyLookup, Keys};
use nodeward::authn::{AuthnSet, JwtRules, Outcome, RequestParts};
use nodeward::policy::load_str;

const ISS: &str = "https://issuer.bench";

/// Keys whose generation moves on every lookup when `rotate` (forcing cache misses).
struct BenchKeys {
    set: Arc<KeySet>,
    generation: AtomicU64,
    rotate: bool,
}

impl Keys for BenchKeys {
    fn lookup(&self, _: &str) -> KeyLookup {
        let generation = if self.rotate {
            self.generation.fetch_add(1, Ordering::Relaxed)
        } else {
            self.generation.load(Ordering::Relaxed)
        };
        KeyLookup::Ready(self.set.clone(), generation)
    }
}

fn rules() -> JwtRules {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: ra, namespace: foo}}\nspec:\n  jwtRules:\n  - issuer: {ISS}\n    jwksUri: http://127.0.0.1:9/keys\n    audiences: [api]\n"
    );
    let loaded = load_str(Path::new("bench.yaml"), &yaml);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    AuthnSet::compile(&loaded.request_authentications, "istio-system")
        .for_workload("foo", &BTreeMap::new())
}

fn keys(rotate: bool) -> BenchKeys {
    let doc = support::jwks(vec![
        support::jwk(Algorithm::RS256, "rsa", false),
        support::jwk(Algorithm::ES256, "ec", false),
    ]);
    BenchKeys {
        set: Arc::new(KeySet::parse(doc.as_bytes()).expect("keys")),
        generation: AtomicU64::new(1),
        rotate,
    }
}

fn headers(alg: Algorithm, kid: &str) -> HeaderMap {
    let mut claims = support::claims(ISS, "user-1");
    claims["aud"] = "api".into();
    claims["groups"] = serde_json::json!(["group1", "group2"]);
    let token = support::mint(alg, Some(kid), &claims);
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).expect("header"),
    );
    h
}

fn verify(c: &mut Criterion) {
    let rules = rules();
    let now = support::now();
    let mut group = c.benchmark_group("verify");
    for (alg, kid, name) in [
        (Algorithm::RS256, "rsa", "rs256"),
        (Algorithm::ES256, "ec", "es256"),
    ] {
        let headers = headers(alg, kid);
        let parts = RequestParts {
            method: &Method::GET,
            headers: &headers,
            query: None,
        };
        for (rotate, mode) in [(true, "uncached"), (false, "cached")] {
            let keys = keys(rotate);
            let cache = TokenCache::default();
            assert!(matches!(
                rules.authenticate(&parts, &keys, &cache, now),
                Outcome::Authenticated(_)
            ));
            group.bench_function(format!("{name}/{mode}"), |b| {
                b.iter(|| {
                    let outcome = rules.authenticate(black_box(&parts), &keys, &cache, now);
                    assert!(matches!(&outcome, Outcome::Authenticated(a) if a.cached != rotate));
                    black_box(outcome)
                });
            });
        }
    }
    group.finish();
}

fn extraction(c: &mut Criterion) {
    let rules = rules();
    let bearer = headers(Algorithm::RS256, "rsa");
    let token =
        bearer[http::header::AUTHORIZATION].to_str().expect("ascii")["Bearer ".len()..].to_owned();
    let query = format!("a=1&b=2&access_token={token}");
    let empty = HeaderMap::new();
    let mut group = c.benchmark_group("extract");
    group.bench_function("authorization_header", |b| {
        let parts = RequestParts {
            method: &Method::GET,
            headers: &bearer,
            query: None,
        };
        b.iter(|| black_box(rules.extract(black_box(&parts))));
    });
    group.bench_function("query_parameter", |b| {
        let parts = RequestParts {
            method: &Method::GET,
            headers: &empty,
            query: Some(&query),
        };
        b.iter(|| black_box(rules.extract(black_box(&parts))));
    });
    group.bench_function("no_token", |b| {
        let parts = RequestParts {
            method: &Method::GET,
            headers: &empty,
            query: None,
        };
        b.iter(|| black_box(rules.extract(black_box(&parts))));
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = verify, extraction
}
criterion_main!(benches);
