//! The JWKS fetcher and store against real HTTP servers on 127.0.0.1 (hyper, ephemeral ports):
//! loading, rotation, failures and recovery, hanging servers, malformed and oversized
//! documents, the SSRF guard, and OIDC discovery.
//!
//! Each test starts its own server and store; the server stops when its guard is dropped. No
//! traffic leaves loopback: forbidden addresses are refused before any connection is made.
//! Every wait is bounded; intervals are shortened to milliseconds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use nodeward::authn::fetch::{
    FetchConfig, FetchError, Fetcher, JwksSource, JwksStore, KeyState, SourceState, SourceStatus,
};
use nodeward::authn::jwks::JwksError;
use nodeward::authn::rules::{KeyLookup, Keys as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

const ISTIO_JWKS: &str = include_str!("../../testdata/istio-samples/jwks.json");
const ISTIO_KID: &str = "DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ";
const ISSUER: &str = "testing@secure.istio.io";
/// Bound of every wait for the store.
const WAIT: Duration = Duration::from_secs(5);

/// A key set of HS256 keys with these kids.
fn oct_jwks(kids: &[&str]) -> String {
    let keys: Vec<String> = kids
        .iter()
        .map(|kid| format!(r#"{{"kty":"oct","kid":"{kid}","k":"c2VjcmV0","alg":"HS256"}}"#))
        .collect();
    format!(r#"{{"keys":[{}]}}"#, keys.join(","))
}

/// Short retries and a long refresh, so tests see retries and control refreshes.
fn fast() -> FetchConfig {
    FetchConfig {
        retry_initial: Duration::from_millis(50),
        retry_max: Duration::from_millis(200),
        default_timeout: Duration::from_secs(2),
        ..FetchConfig::default()
    }
}

#[derive(Clone)]
enum Reply {
    /// 200 with this JSON (or not JSON) body and its Content-Length.
    Body(String),
    /// This status, empty body.
    Status(u16),
    /// 302 to this location.
    Redirect(String),
    /// Accept the request and never answer.
    Hang,
}

#[derive(Default)]
struct Routes {
    replies: HashMap<String, Reply>,
    hits: HashMap<String, usize>,
}

/// A hyper HTTP/1 server on 127.0.0.1 answering per path; stopped (with its connections) on drop.
struct Server {
    addr: SocketAddr,
    routes: Arc<Mutex<Routes>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let routes = Arc::new(Mutex::new(Routes::default()));
        let shared = Arc::clone(&routes);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while connections.try_join_next().is_some() {}
                let routes = Arc::clone(&shared);
                connections.spawn(async move {
                    let service = service_fn(move |request| answer(Arc::clone(&routes), request));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, routes, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn set(&self, path: &str, reply: Reply) {
        self.routes
            .lock()
            .expect("routes")
            .replies
            .insert(path.to_owned(), reply);
    }

    fn hits(&self, path: &str) -> usize {
        self.routes
            .lock()
            .expect("routes")
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping the task drops the JoinSet, which aborts every connection (hanging ones too).
        self.task.abort();
    }
}

async fn answer(
    routes: Arc<Mutex<Routes>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path().to_owned();
    let reply = {
        let mut routes = routes.lock().expect("routes");
        *routes.hits.entry(path.clone()).or_default() += 1;
        routes.replies.get(&path).cloned()
    };
    let response = match reply {
        None => Response::builder()
            .status(404)
            .body(Full::new(Bytes::new())),
        Some(Reply::Body(body)) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body))),
        Some(Reply::Status(status)) => Response::builder()
            .status(status)
            .body(Full::new(Bytes::new())),
        Some(Reply::Redirect(location)) => Response::builder()
            .status(302)
            .header("location", location)
            .body(Full::new(Bytes::new())),
        Some(Reply::Hang) => std::future::pending().await,
    };
    Ok(response.expect("test response"))
}

fn status_of(store: &JwksStore, key: &str) -> SourceStatus {
    store
        .status()
        .into_iter()
        .find(|s| s.key == key)
        .unwrap_or_else(|| panic!("no status for {key}: {:?}", store.status()))
}

/// Waits (bounded) until `condition`, or panics with the store's status.
async fn until(store: &JwksStore, what: &str, condition: impl Fn(&JwksStore) -> bool) {
    assert!(
        store.wait_until(WAIT, condition).await,
        "not {what} within {WAIT:?}: {:#?}",
        store.status()
    );
}

fn ready_keys(store: &JwksStore, key: &str) -> (Vec<String>, u64) {
    match store.keys(key) {
        KeyState::Ready { keys, generation } => (keys.kids(), generation),
        other => panic!("{key}: expected Ready, got {other:?}"),
    }
}

fn is_ready(store: &JwksStore, key: &str) -> bool {
    matches!(store.keys(key), KeyState::Ready { .. })
}

fn failed_error(store: &JwksStore, key: &str) -> Option<String> {
    match store.keys(key) {
        KeyState::Failed { error } => Some(error.to_string()),
        _ => None,
    }
}

#[tokio::test]
async fn a_served_jwks_becomes_ready_with_its_kids() {
    let server = Server::start().await;
    server.set("/jwks", Reply::Body(ISTIO_JWKS.into()));
    let uri = server.url("/jwks");
    let store = JwksStore::new(fast()).expect("store");
    store.set_sources([(JwksSource::Uri(uri.clone()), None, ISSUER.to_owned())]);
    assert!(
        matches!(store.keys(&uri), KeyState::Pending),
        "nothing fetched before the task runs"
    );
    assert!(!store.ready());

    assert!(store.wait_ready(WAIT).await, "{:#?}", store.status());
    let (kids, generation) = ready_keys(&store, &uri);
    assert_eq!(kids, [ISTIO_KID]);
    assert!(generation >= 1);
    assert!(
        matches!(store.lookup(&uri), KeyLookup::Ready(_, g) if g == generation),
        "the rules' Keys view agrees"
    );
    assert!(matches!(
        store.keys("http://127.0.0.1:1/other"),
        KeyState::Unknown
    ));
    assert!(matches!(
        store.lookup("http://127.0.0.1:1/other"),
        KeyLookup::Unavailable
    ));

    let status = status_of(&store, &uri);
    assert_eq!(status.state, SourceState::Ready);
    assert_eq!(status.state.as_str(), "ready");
    assert_eq!(status.issuer, ISSUER);
    assert_eq!(status.uri.as_deref(), Some(uri.as_str()));
    assert_eq!(status.kids, [ISTIO_KID]);
    assert_eq!(
        (status.fetches, status.failures, status.consecutive_failures),
        (1, 0, 0)
    );
    assert!(status.last_success.is_some() && status.last_error.is_none());
    let next = status.next_attempt.expect("next refresh scheduled");
    assert!(
        next > SystemTime::now() + Duration::from_mins(19),
        "refresh in 20 minutes by default"
    );
    assert!(
        !format!("{status:?}").contains("AQAB"),
        "no key material in the status"
    );
    assert_eq!(server.hits("/jwks"), 1);
}

#[tokio::test]
async fn rotated_keys_are_picked_up_on_refresh_and_change_the_generation() {
    let server = Server::start().await;
    server.set("/jwks", Reply::Body(oct_jwks(&["k1"])));
    let uri = server.url("/jwks");
    let store = JwksStore::new(FetchConfig {
        refresh_interval: Duration::from_millis(200),
        ..fast()
    })
    .expect("store");
    store.set_sources([(JwksSource::Uri(uri.clone()), None, ISSUER.to_owned())]);
    until(&store, "ready", |s| is_ready(s, &uri)).await;
    let (kids, first) = ready_keys(&store, &uri);
    assert_eq!(kids, ["k1"]);

    until(&store, "refreshed twice", |s| {
        status_of(s, &uri).fetches >= 3
    })
    .await;
    assert_eq!(
        ready_keys(&store, &uri).1,
        first,
        "an unchanged key set keeps its generation (token caches stay valid)"
    );

    server.set("/jwks", Reply::Body(oct_jwks(&["k2", "k3"])));
    until(&store, "rotated", |s| ready_keys(s, &uri).0 == ["k2", "k3"]).await;
    let (_, rotated) = ready_keys(&store, &uri);
    assert!(rotated > first, "generation {rotated} after {first}");
    assert_eq!(status_of(&store, &uri).failures, 0);
}

#[tokio::test]
async fn a_failing_server_gives_failed_then_ready_after_a_retry() {
    let server = Server::start().await;
    server.set("/jwks", Reply::Status(500));
    let uri = server.url("/jwks");
    let store = JwksStore::new(fast()).expect("store");
    store.set_sources([(JwksSource::Uri(uri.clone()), None, ISSUER.to_owned())]);

    until(&store, "failed", |s| failed_error(s, &uri).is_some()).await;
    let error = failed_error(&store, &uri).expect("failed");
    assert!(
        error.contains("HTTP 500") && error.contains(ISSUER) && error.contains(&uri),
        "{error}"
    );
    assert!(
        error.contains("get 401"),
        "says what it means for requests: {error}"
    );
    assert!(
        store.ready(),
        "a definitive first failure counts for readiness"
    );
    assert_eq!(status_of(&store, &uri).state, SourceState::Failed);

    server.set("/jwks", Reply::Body(oct_jwks(&["k1"])));
    until(&store, "recovered", |s| is_ready(s, &uri)).await;
    let status = status_of(&store, &uri);
    assert_eq!(status.state, SourceState::Ready);
    assert!(
        status.failures >= 1 && status.consecutive_failures == 0,
        "{status:?}"
    );
    assert!(
        status.last_error.is_some_and(|e| e.contains("HTTP 500")),
        "the last error stays visible"
    );
}

#[tokio::test]
async fn a_hanging_server_times_out_within_the_rule_timeout_and_recovery_follows() {
    let server = Server::start().await;
    server.set("/jwks", Reply::Hang);
    let uri = server.url("/jwks");
    let timeout = Duration::from_millis(300);

    let fetcher = Fetcher::new(fast()).expect("client");
    let started = Instant::now();
    let error = fetcher
        .fetch_keys(ISSUER, &uri, Some(timeout))
        .await
        .expect_err("hangs");
    let took = started.elapsed();
    assert!(
        matches!(error, FetchError::Timeout { timeout: t, .. } if t == timeout),
        "{error:?}"
    );
    assert!(
        took >= timeout && took < Duration::from_secs(2),
        "took {took:?}"
    );

    let store = JwksStore::new(fast()).expect("store");
    let started = Instant::now();
    store.set_sources([(
        JwksSource::Uri(uri.clone()),
        Some(timeout),
        ISSUER.to_owned(),
    )]);
    assert!(!store.ready());
    until(&store, "failed", |s| failed_error(s, &uri).is_some()).await;
    let took = started.elapsed();
    assert!(
        took >= timeout && took < Duration::from_secs(2),
        "took {took:?}"
    );
    let error = failed_error(&store, &uri).expect("failed");
    assert!(
        error.contains("no complete answer within 300ms") && error.contains(&uri),
        "{error}"
    );
    assert!(store.ready());

    server.set("/jwks", Reply::Body(oct_jwks(&["late"])));
    until(&store, "recovered", |s| is_ready(s, &uri)).await;
    assert_eq!(ready_keys(&store, &uri).0, ["late"]);
}

#[tokio::test]
async fn a_closed_port_is_a_transport_error_that_says_why() {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let uri = format!(
        "http://{}/jwks",
        listener.local_addr().expect("local address")
    );
    drop(listener);
    let fetcher = Fetcher::new(fast()).expect("client");
    let error = fetcher
        .fetch_keys(ISSUER, &uri, None)
        .await
        .expect_err("nothing listens");
    let FetchError::Transport { detail, .. } = &error else {
        panic!("expected Transport, got {error:?}");
    };
    assert!(detail.contains("Connection refused"), "{detail}");
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "JWKS for issuer {ISSUER} could not be fetched from {uri}: "
        )),
        "{message}"
    );
    assert!(
        message.ends_with(&format!(
            "requests with tokens from {ISSUER} get 401 until it is"
        )),
        "{message}"
    );
}

#[tokio::test]
async fn a_malformed_jwks_is_an_error_naming_issuer_and_uri() {
    let server = Server::start().await;
    server.set("/jwks", Reply::Body("<html>not a key set</html>".into()));
    let uri = server.url("/jwks");

    let fetcher = Fetcher::new(fast()).expect("client");
    let error = fetcher
        .fetch_keys(ISSUER, &uri, None)
        .await
        .expect_err("garbage");
    assert!(
        matches!(&error, FetchError::Malformed { source: JwksError::Json(_), issuer, uri: u } if issuer == ISSUER && *u == uri),
        "{error:?}"
    );

    let store = JwksStore::new(fast()).expect("store");
    store.set_sources([(JwksSource::Uri(uri.clone()), None, ISSUER.to_owned())]);
    until(&store, "failed", |s| failed_error(s, &uri).is_some()).await;
    let message = failed_error(&store, &uri).expect("failed");
    assert!(
        message.contains("malformed") && message.contains(ISSUER) && message.contains(&uri),
        "{message}"
    );
}

#[tokio::test]
async fn a_malformed_refresh_keeps_the_last_good_keys() {
    let server = Server::start().await;
    server.set("/jwks", Reply::Body(oct_jwks(&["good"])));
    let uri = server.url("/jwks");
    let store = JwksStore::new(FetchConfig {
        refresh_interval: Duration::from_millis(100),
        ..fast()
    })
    .expect("store");
    store.set_sources([(JwksSource::Uri(uri.clone()), None, ISSUER.to_owned())]);
    until(&store, "ready", |s| is_ready(s, &uri)).await;
    let (_, generation) = ready_keys(&store, &uri);

    server.set(
        "/jwks",
        Reply::Body(r#"{"keys":[{"kty":"XYZ","kid":"odd"}]}"#.into()),
    );
    until(&store, "a failed refresh", |s| {
        status_of(s, &uri).consecutive_failures >= 1
    })
    .await;
    assert_eq!(
        ready_keys(&store, &uri),
        (vec!["good".to_owned()], generation),
        "old keys, same generation"
    );
    let status = status_of(&store, &uri);
    assert_eq!(status.state, SourceState::Stale);
    assert_eq!(status.kids, ["good"]);
    let last_error = status.last_error.expect("recorded");
    assert!(
        last_error.contains("malformed")
            && last_error.contains("none of its 1 key(s) can be used")
            && last_error.contains(&uri),
        "{last_error}"
    );

    server.set("/jwks", Reply::Body(oct_jwks(&["good"])));
    until(&store, "fresh again", |s| {
        status_of(s, &uri).state == SourceState::Ready
    })
    .await;
    assert_eq!(
        ready_keys(&store, &uri).1,
        generation,
        "the same key set again: same generation"
    );
}

#[tokio::test]
async fn a_body_longer_than_max_bytes_is_refused() {
    let config = FetchConfig {
        max_bytes: 1024,
        ..fast()
    };
    let fetcher = Fetcher::new(config).expect("client");

    // With a Content-Length.
    let server = Server::start().await;
    let padded = format!("{}{}", oct_jwks(&["big"]), " ".repeat(4096));
    server.set("/big", Reply::Body(padded));
    server.set("/small", Reply::Body(ISTIO_JWKS.into()));
    let error = fetcher
        .fetch_keys(ISSUER, &server.url("/big"), None)
        .await
        .expect_err("too large");
    assert!(
        matches!(error, FetchError::TooLarge { limit: 1024, .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("longer than 1024 bytes"),
        "{error}"
    );
    assert_eq!(
        fetcher
            .fetch_keys(ISSUER, &server.url("/small"), None)
            .await
            .expect("under the limit")
            .kids(),
        [ISTIO_KID]
    );

    // Chunked, no Content-Length, and a body that would never end: the count stops it.
    let endless = endless_chunked_server().await;
    let started = Instant::now();
    let error = fetcher
        .fetch_keys(ISSUER, &format!("http://{}/jwks", endless.0), None)
        .await
        .expect_err("too large");
    assert!(
        matches!(error, FetchError::TooLarge { limit: 1024, .. }),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "stopped early: {:?}",
        started.elapsed()
    );

    let store = JwksStore::with_fetcher(fetcher);
    let uri = server.url("/big");
    store.set_sources([(JwksSource::Uri(uri.clone()), None, ISSUER.to_owned())]);
    until(&store, "failed", |s| failed_error(s, &uri).is_some()).await;
}

/// A raw HTTP/1.1 server that answers every request with chunks of spaces until the client
/// goes away (at most 16 MiB); stopped on drop.
struct Endless(SocketAddr, JoinHandle<()>);

impl Drop for Endless {
    fn drop(&mut self) {
        self.1.abort();
    }
}

async fn endless_chunked_server() -> Endless {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        let mut connections = JoinSet::new();
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            connections.spawn(async move {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request).await;
                let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                if stream.write_all(head).await.is_err() {
                    return;
                }
                let chunk = format!("200\r\n{}\r\n", " ".repeat(512));
                for _ in 0..32 * 1024 {
                    if stream.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Endless(addr, task)
}

#[tokio::test]
async fn link_local_and_metadata_targets_are_refused_without_connecting() {
    let fetcher = Fetcher::new(FetchConfig {
        default_timeout: Duration::from_secs(3),
        ..fast()
    })
    .expect("client");
    for (uri, target) in [
        (
            "http://169.254.169.254/latest/meta-data/jwks",
            "169.254.169.254",
        ),
        ("http://[fd00:ec2::254]/jwks", "[fd00:ec2::254]"),
        ("http://[fe80::1]:8080/jwks", "[fe80::1]"),
        ("http://[::ffff:169.254.169.254]/jwks", "[::ffff:a9fe:a9fe]"),
        (
            "http://metadata.google.internal/computeMetadata/v1/jwks",
            "metadata.google.internal",
        ),
    ] {
        let started = Instant::now();
        let error = fetcher.fetch_keys(ISSUER, uri, None).await.expect_err(uri);
        assert!(
            matches!(&error, FetchError::Forbidden { target: t, .. } if t == target),
            "{uri}: {error:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(200),
            "{uri}: refused before any connection attempt"
        );
        let message = error.to_string();
        assert!(
            message.contains(uri)
                && message.contains(ISSUER)
                && message.contains("allow_link_local"),
            "{message}"
        );
    }

    // Redirects are checked too: to a forbidden address refused, to loopback followed.
    let server = Server::start().await;
    server.set("/jwks", Reply::Body(oct_jwks(&["k1"])));
    server.set(
        "/to-metadata",
        Reply::Redirect("http://169.254.169.254/latest/jwks".into()),
    );
    server.set("/to-jwks", Reply::Redirect(server.url("/jwks")));
    server.set("/loop", Reply::Redirect(server.url("/loop")));
    let error = fetcher
        .fetch_keys(ISSUER, &server.url("/to-metadata"), None)
        .await
        .expect_err("refused");
    assert!(
        matches!(&error, FetchError::Forbidden { target, .. } if target == "169.254.169.254"),
        "{error:?}"
    );
    assert_eq!(
        fetcher
            .fetch_keys(ISSUER, &server.url("/to-jwks"), None)
            .await
            .expect("followed")
            .kids(),
        ["k1"]
    );
    let error = fetcher
        .fetch_keys(ISSUER, &server.url("/loop"), None)
        .await
        .expect_err("redirect loop");
    assert!(
        matches!(&error, FetchError::Transport { detail, .. } if detail.contains("more than 3 redirects")),
        "{error:?}"
    );
    assert_eq!(
        server.hits("/loop"),
        4,
        "the first request and three redirects"
    );

    // The store fails closed on them.
    let store = JwksStore::with_fetcher(fetcher);
    let uri = "http://169.254.169.254/latest/jwks";
    store.set_sources([(JwksSource::Uri(uri.into()), None, ISSUER.to_owned())]);
    until(&store, "refused", |s| failed_error(s, uri).is_some()).await;
    assert!(failed_error(&store, uri).is_some_and(|e| e.contains("a cloud metadata address")));
    // allow_link_local = true is checked in the unit tests (fetch.rs), which need no traffic.
}

#[tokio::test]
async fn keys_are_found_by_openid_discovery() {
    let server = Server::start().await;
    let issuer = server.url("");
    server.set(
        "/.well-known/openid-configuration",
        Reply::Body(format!(
            r#"{{"issuer":"{issuer}","jwks_uri":"{}"}}"#,
            server.url("/keys")
        )),
    );
    server.set("/keys", Reply::Body(oct_jwks(&["discovered"])));

    let fetcher = Fetcher::new(fast()).expect("client");
    assert_eq!(
        fetcher.discover(&issuer, None).await.expect("discovered"),
        server.url("/keys")
    );
    assert_eq!(
        fetcher
            .discover(&format!("{issuer}/"), None)
            .await
            .expect("trailing slash"),
        server.url("/keys")
    );

    // `for_rule` decides discovery applies only to https issuers; the store fetches what it is given.
    assert!(matches!(
        JwksSource::for_rule(&issuer, None),
        Err(nodeward::authn::keys::KeysError::NoSource { .. })
    ));
    let source = JwksSource::Discovery {
        issuer: issuer.clone(),
    };
    let key = source.key();
    assert_eq!(key, server.url("/.well-known/openid-configuration"));
    let store = JwksStore::with_fetcher(fetcher.clone());
    store.set_sources([(source, None, issuer.clone())]);
    until(&store, "ready", |s| is_ready(s, &key)).await;
    assert_eq!(ready_keys(&store, &key).0, ["discovered"]);
    assert_eq!(
        status_of(&store, &key).uri,
        Some(server.url("/keys")),
        "the discovered URI is shown"
    );

    server.set(
        "/.well-known/openid-configuration",
        Reply::Body(r#"{"issuer":"x"}"#.into()),
    );
    let error = fetcher
        .discover(&issuer, None)
        .await
        .expect_err("no jwks_uri");
    assert!(
        matches!(&error, FetchError::Discovery { reason, .. } if reason.contains("jwks_uri")),
        "{error:?}"
    );
    assert!(error.to_string().contains(&issuer));
    server.set("/.well-known/openid-configuration", Reply::Status(404));
    let error = fetcher.discover(&issuer, None).await.expect_err("404");
    assert!(
        error
            .to_string()
            .starts_with("OpenID discovery document for issuer"),
        "{error}"
    );
}

#[tokio::test]
async fn set_sources_starts_new_sources_keeps_unchanged_ones_and_stops_removed_ones() {
    let server = Server::start().await;
    server.set("/a", Reply::Body(oct_jwks(&["a"])));
    server.set("/b", Reply::Body(oct_jwks(&["b"])));
    let (a, b) = (server.url("/a"), server.url("/b"));
    let store = JwksStore::new(fast()).expect("store");

    store.set_sources([
        (JwksSource::Uri(a.clone()), None, "one".to_owned()),
        (JwksSource::Uri(a.clone()), None, "two".to_owned()),
    ]);
    assert!(store.wait_ready(WAIT).await);
    assert_eq!(store.status().len(), 1, "one source for two issuers");
    assert_eq!(status_of(&store, &a).issuer, "one, two");
    let generation = ready_keys(&store, &a).1;

    store.set_sources([
        (
            JwksSource::Uri(a.clone()),
            Some(Duration::from_secs(1)),
            "one".to_owned(),
        ),
        (JwksSource::Uri(b.clone()), None, "three".to_owned()),
    ]);
    assert!(!store.ready(), "the new source is pending");
    assert!(is_ready(&store, &a), "the unchanged source keeps its keys");
    until(&store, "b ready", |s| is_ready(s, &b)).await;
    assert_eq!(
        (server.hits("/a"), status_of(&store, &a).fetches),
        (1, 1),
        "the unchanged source was not refetched"
    );
    assert_eq!(status_of(&store, &a).issuer, "one");
    assert_eq!(ready_keys(&store, &a).1, generation);

    store.set_sources([(JwksSource::Uri(b.clone()), None, "three".to_owned())]);
    assert!(matches!(store.keys(&a), KeyState::Unknown));
    assert_eq!(
        store
            .status()
            .iter()
            .map(|s| s.key.as_str())
            .collect::<Vec<_>>(),
        [b.as_str()]
    );
    store.set_sources([]);
    assert!(store.status().is_empty() && store.ready());
}

#[tokio::test]
async fn dropping_the_store_stops_refreshing() {
    let server = Server::start().await;
    server.set("/jwks", Reply::Body(oct_jwks(&["k"])));
    let uri = server.url("/jwks");
    let store = JwksStore::new(FetchConfig {
        refresh_interval: Duration::from_millis(50),
        ..fast()
    })
    .expect("store");
    store.set_sources([(JwksSource::Uri(uri.clone()), None, ISSUER.to_owned())]);
    until(&store, "refreshed", |s| status_of(s, &uri).fetches >= 2).await;
    drop(store);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let hits = server.hits("/jwks");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        server.hits("/jwks"),
        hits,
        "no fetch after the store is gone"
    );
}
