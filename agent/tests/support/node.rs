//! A node for enforcer tests, with real sockets on loopback: a real upstream HTTP server (the
//! "pod", on 127.0.0.2) records what it receives; clients connect from 127.0.0.3 (a known
//! workload) or 127.0.0.4 (unknown). A listener of the test's own hands each accepted
//! connection to the enforcer with the pod as original destination, as transparent steering
//! would.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use jsonwebtoken::Algorithm;
use nodeward::authn::cache::TokenCache;
use nodeward::authn::rules::NoRemoteKeys;
use nodeward::authn::AuthnSet;
use nodeward::authz::PolicySet;
use nodeward::enforcer::{ConnectionInfo, Enforcer, EnforcerConfig, Limits};
use nodeward::metrics::Metrics;
use nodeward::policy::load_str;
use nodeward::state::workloads::DeclaredPort;
use nodeward::state::{Snapshot, StateStore, Workload};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub const POD: &str = "127.0.0.2";
pub const KNOWN_CLIENT: &str = "127.0.0.3";
pub const UNKNOWN_CLIENT: &str = "127.0.0.4";
pub const ISS: &str = "https://issuer.test";

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub version: hyper::Version,
    pub headers: hyper::HeaderMap,
    pub body_len: usize,
}

#[derive(Clone, Default)]
pub struct Upstream(pub Arc<Mutex<Vec<Seen>>>);

impl Upstream {
    pub fn seen(&self) -> Vec<Seen> {
        self.0.lock().expect("lock").clone()
    }
}

/// Starts the pod's HTTP server (HTTP/1.1 and h2c; `Upgrade` answered 101 then echo).
pub async fn start_upstream(port: u16) -> (SocketAddr, Upstream) {
    let listener = TcpListener::bind((POD, port))
        .await
        .expect("bind pod address");
    let addr = listener.local_addr().expect("addr");
    let seen = Upstream::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
                        let on_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
                        let (parts, body) = req.into_parts();
                        let mut len = 0;
                        let mut body = body;
                        while let Some(frame) = body.frame().await {
                            if let Ok(data) = frame.map(hyper::body::Frame::into_data) {
                                len += data.map_or(0, |d| d.len());
                            }
                        }
                        record.0.lock().expect("lock").push(Seen {
                            method: parts.method.to_string(),
                            uri: parts.uri.to_string(),
                            version: parts.version,
                            headers: parts.headers.clone(),
                            body_len: len,
                        });
                        if let Some(on_upgrade) = on_upgrade {
                            tokio::spawn(async move {
                                if let Ok(upgraded) = on_upgrade.await {
                                    let mut io = TokioIo::new(upgraded);
                                    let mut buf = [0u8; 1024];
                                    while let Ok(n) = io.read(&mut buf).await {
                                        if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                            break;
                                        }
                                    }
                                }
                            });
                            let mut res = Response::new(Full::new(Bytes::new()));
                            *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            res.headers_mut()
                                .insert(hyper::header::UPGRADE, "websocket".parse().expect("v"));
                            res.headers_mut()
                                .insert(hyper::header::CONNECTION, "upgrade".parse().expect("v"));
                            return Ok::<_, Infallible>(res);
                        }
                        Ok(Response::new(Full::new(Bytes::from(format!(
                            "pod saw {len} bytes"
                        )))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// The node: state with the pod and a known client, the enforcer, and the steering stand-in.
pub struct Node {
    pub front: SocketAddr,
    pub enforcer: Arc<Enforcer>,
    /// The pod's address (the original destination of every connection).
    pub pod: SocketAddr,
    pub upstream: Upstream,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// The state the enforcer reads.
    pub store: Arc<StateStore>,
}

impl Node {
    /// The snapshot the enforcer judges with now.
    pub fn enforcer_snapshot(&self) -> Arc<Snapshot> {
        self.store.load()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn workload(name: &str, ip: &str, labels: &[(&str, &str)]) -> Arc<Workload> {
    Arc::new(Workload {
        name: name.into(),
        namespace: "foo".into(),
        service_account: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>(),
        ip: ip.parse().expect("ip"),
        ips: Vec::new(),
        interface: None,
        probes: Vec::new(),
        ports: Vec::new(),
    })
}

pub async fn node_with(policies: &str, limits: Limits) -> Node {
    let (pod, upstream) = start_upstream(0).await;
    node_at(policies, limits, Vec::new(), pod, upstream).await
}

/// A node whose pod (at `pod`, which must be on [`POD`]) declares `ports`, with `upstream` as
/// the record of what the hyper pod saw (empty for a pod of the test's own).
pub async fn node_at(
    policies: &str,
    limits: Limits,
    ports: Vec<DeclaredPort>,
    pod: SocketAddr,
    upstream: Upstream,
) -> Node {
    node_shaped(policies, limits, pod, upstream, |w| w.ports = ports).await
}

/// A node whose pod workload `shape` adjusts (ports, probes, ...).
pub async fn node_shaped(
    policies: &str,
    limits: Limits,
    pod: SocketAddr,
    upstream: Upstream,
    shape: impl FnOnce(&mut Workload),
) -> Node {
    let loaded = load_str(Path::new("policies.yaml"), policies);
    assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
    let mut httpbin = workload("httpbin", POD, &[("app", "httpbin")]);
    shape(Arc::make_mut(&mut httpbin));
    let workloads = vec![
        httpbin,
        workload("sleep", KNOWN_CLIENT, &[("app", "sleep")]),
    ];
    let snapshot = Snapshot::build(
        1,
        "cluster.local",
        "istio-system",
        workloads,
        PolicySet::compile(&loaded.authorization_policies, "istio-system"),
        AuthnSet::compile(&loaded.request_authentications, "istio-system"),
        Vec::new(),
    );
    let store = Arc::new(StateStore::new(snapshot));
    let metrics = Arc::new(Metrics::new());
    let config = EnforcerConfig {
        limits,
        ..EnforcerConfig::default()
    };
    let enforcer = Enforcer::new(
        store.clone(),
        Arc::new(NoRemoteKeys),
        TokenCache::default(),
        metrics.clone(),
        config,
    );
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let front = steer(&enforcer, pod, &shutdown, &tracker).await;
    Node {
        front,
        enforcer,
        pod,
        upstream,
        metrics,
        shutdown,
        tracker,
        store,
    }
}

/// The steering stand-in: a listener whose connections reach the enforcer with `dst` as their
/// original destination.
pub async fn steer(
    enforcer: &Arc<Enforcer>,
    dst: SocketAddr,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
    let front = listener.local_addr().expect("addr");
    let (enforcer, stop, track) = (enforcer.clone(), shutdown.clone(), tracker.clone());
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((stream, peer)) = accepted else { return };
            let info = ConnectionInfo {
                peer,
                original_dst: dst,
                pod: None,
            };
            track.spawn(
                enforcer
                    .clone()
                    .serve_connection(stream, info, stop.clone()),
            );
        }
    });
    front
}

pub async fn connect_from(node: &Node, source: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source.parse::<IpAddr>().expect("ip"), 0))
        .expect("bind client address");
    socket
        .connect(node.front)
        .await
        .expect("connect to the enforcer")
}

pub type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub async fn http1(node: &Node, source: &str) -> Sender {
    let stream = connect_from(node, source).await;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

pub async fn send(
    sender: &mut Sender,
    req: Request<Full<Bytes>>,
) -> (StatusCode, hyper::HeaderMap, String) {
    let res = sender.send_request(req).await.expect("response");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

pub fn get(path: &str) -> hyper::http::request::Builder {
    Request::get(path).header(hyper::header::HOST, "httpbin.foo:8000")
}

pub fn policies() -> String {
    let keys = super::jwks(vec![super::jwk(Algorithm::RS256, "rsa", false)]);
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: {ISS}
    jwks: '{keys}'
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{{header: x-user, claim: sub}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: foo}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/admin*]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  rules:
  - from: [{{source: {{principals: [\"*\"]}}}}]
  - from: [{{source: {{requestPrincipals: [\"{ISS}/*\"]}}}}]
"
    )
}

pub fn token() -> String {
    super::mint(Algorithm::RS256, Some("rsa"), &super::claims(ISS, "alice"))
}
