//! `ApiStandIn`: a minimal in-process stand-in for the Kubernetes API server, because no real
//! API server can run on the test machines. It serves only what nodeward's watchers use, over
//! plain HTTP on 127.0.0.1:
//!
//! - discovery: `GET /apis` and `GET /apis/security.istio.io/<v>` (serving `v1` and `v1beta1`,
//!   or only `v1beta1`, or nothing);
//! - `GET /api/v1/<pods|services|configmaps>` (also under `/namespaces/<ns>/`) and
//!   `GET /apis/security.istio.io/<v>/<plural>`: a list (JSON with `metadata.resourceVersion`;
//!   a `fieldSelector` of `spec.nodeName`, `metadata.name` and `metadata.namespace` equalities
//!   honoured, any other field refused with 400 as the API server refuses it) or, with
//!   `watch=true`, newline-delimited JSON watch events from the given `resourceVersion`;
//! - `POST`/`PATCH /apis/events.k8s.io/v1/namespaces/<ns>/events[/<name>]`, recorded;
//! - faults on demand: the next N list/watch requests answer 500, or every one of a collection
//!   until it is released; open watches end with a `410 Gone` ERROR event (the client must
//!   relist); the server stops (connection refused) and starts again on the same port, keeping
//!   its objects.
//!
//! What it cannot prove: anything a real API server adds: authentication and RBAC, admission
//! and CRD schema pruning, pagination (`limit`/`continue`: everything comes in one page),
//! bookmarks, watch timeouts, server-side field validation, HTTP/2 and TLS, the exact
//! resourceVersion semantics of etcd, and the load of a real cluster. Those are for a real
//! cluster (kind, see deploy/).
//!
//! Every server thread stops when the stand-in is dropped.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

type Body = BoxBody<Bytes, Infallible>;

/// The collections the stand-in serves.
pub const PODS: &str = "pods";
pub const SERVICES: &str = "services";
pub const AUTHZ: &str = "authorizationpolicies";
pub const AUTHN: &str = "requestauthentications";
pub const CONFIGMAPS: &str = "configmaps";

/// One stored change, for watches resuming from a resourceVersion.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    object: Value,
}

/// Which objects of a collection a list or watch asked for: the namespace of its path and the
/// equalities of its `fieldSelector`.
#[derive(Debug, Clone, Default)]
struct Selector {
    namespace: Option<String>,
    fields: Vec<(String, String)>,
}

impl Selector {
    /// The namespace from the path, the fields from the query; `Err` names a field selector
    /// the stand-in (like the API server for most kinds) does not support.
    fn parse(namespace: Option<&str>, query: &HashMap<String, String>) -> Result<Self, String> {
        let mut fields = Vec::new();
        for term in query
            .get("fieldSelector")
            .map(String::as_str)
            .unwrap_or_default()
            .split(',')
            .filter(|t| !t.is_empty())
        {
            let (field, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .ok_or_else(|| format!("unsupported field selector term {term:?}"))?;
            if !["spec.nodeName", "metadata.name", "metadata.namespace"].contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            fields.push((field.to_owned(), value.to_owned()));
        }
        Ok(Self {
            namespace: namespace.map(str::to_owned),
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let namespace = object["metadata"]["namespace"].as_str();
        if self.namespace.is_some() && self.namespace.as_deref() != namespace {
            return false;
        }
        self.fields.iter().all(|(field, value)| {
            let actual = match field.as_str() {
                "spec.nodeName" => node_of(object),
                "metadata.name" => object["metadata"]["name"].as_str(),
                _ => namespace,
            };
            actual.unwrap_or_default() == value
        })
    }
}

struct Watch {
    collection: String,
    selector: Selector,
    sender: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    /// collection -> `ns/name` -> object.
    objects: HashMap<String, BTreeMap<String, Value>>,
    history: HashMap<String, Vec<Change>>,
    watches: Vec<Watch>,
    /// Versions of security.istio.io served.
    versions: Vec<&'static str>,
    /// The next this many list/watch requests answer 500.
    fail_next: usize,
    /// Collections whose list/watch requests answer 500 until released.
    withheld: Vec<String>,
    /// The body of every event created (POST) or updated (PATCH).
    events: Vec<Value>,
    /// `METHOD path?query` of every request.
    requests: Vec<String>,
}

/// The stand-in; see the module documentation.
pub struct ApiStandIn {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    /// Its own runtime, so it serves whatever the test does (sync or async); shut down in
    /// the background on drop (allowed inside an async test).
    runtime: Option<tokio::runtime::Runtime>,
    serving: Mutex<Option<CancellationToken>>,
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(PoisonError::into_inner)
}

fn key_of(object: &Value) -> String {
    format!(
        "{}/{}",
        object["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default"),
        object["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn node_of(object: &Value) -> Option<&str> {
    object["spec"]["nodeName"].as_str()
}

impl ApiStandIn {
    /// Serves `security.istio.io` at `versions` (e.g. `&["v1", "v1beta1"]`, `&["v1beta1"]`).
    pub fn start(versions: &[&'static str]) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("the stand-in's runtime");
        let listener = bind("127.0.0.1:0".parse().expect("an address"))
            .expect("a loopback port for the API stand-in");
        let addr = listener.local_addr().expect("its address");
        let inner = Arc::new(Mutex::new(Inner {
            versions: versions.to_vec(),
            ..Inner::default()
        }));
        let this = Self {
            addr,
            inner,
            runtime: Some(runtime),
            serving: Mutex::new(None),
        };
        this.serve(listener);
        this
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("the stand-in's runtime runs until drop")
    }

    fn serve(&self, listener: std::net::TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let listener = {
            let _in_runtime = self.runtime().enter();
            tokio::net::TcpListener::from_std(listener).expect("a tokio listener")
        };
        let token = CancellationToken::new();
        let inner = Arc::clone(&self.inner);
        let stop = token.clone();
        self.runtime().spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((stream, _)) = accepted else { continue };
                let inner = Arc::clone(&inner);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let inner = Arc::clone(&inner);
                        async move { Ok::<_, Infallible>(handle(&inner, request).await) }
                    });
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = connection => {}
                    }
                });
            }
        });
        *self.serving.lock().unwrap_or_else(PoisonError::into_inner) = Some(token);
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for the stand-in.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().expect("a URL"));
        kube::Client::try_from(config).expect("a client for the stand-in")
    }

    /// A kubeconfig file content pointing at the stand-in.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\ncontexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: nobody\nusers:\n- name: nobody\n  user: {{}}\ncurrent-context: stand-in\n",
            self.url()
        )
    }

    /// Creates or replaces an object (`kind` picks the collection).
    pub fn apply(&self, object: Value) {
        let collection = collection_of(&object);
        let mut inner = lock(&self.inner);
        inner.rv += 1;
        let rv = inner.rv;
        let mut object = object;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{}", key_of(&object)));
        }
        let key = key_of(&object);
        let existed = inner
            .objects
            .entry(collection.clone())
            .or_default()
            .insert(key, object.clone())
            .is_some();
        let kind = if existed { "MODIFIED" } else { "ADDED" };
        inner.record(&collection, rv, kind, object);
    }

    /// Deletes `ns/name` from `collection`.
    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        let mut inner = lock(&self.inner);
        let Some(mut object) = inner
            .objects
            .get_mut(collection)
            .and_then(|c| c.remove(&format!("{namespace}/{name}")))
        else {
            panic!("{collection} {namespace}/{name} does not exist in the stand-in");
        };
        inner.rv += 1;
        let rv = inner.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        inner.record(collection, rv, "DELETED", object);
    }

    /// The next `n` list and watch requests answer 500.
    pub fn fail_next(&self, n: usize) {
        lock(&self.inner).fail_next = n;
    }

    /// Every list and watch request of `collection` answers 500 until [`Self::release`].
    pub fn withhold(&self, collection: &str) {
        lock(&self.inner).withheld.push(collection.to_owned());
    }

    /// Serves `collection` again.
    pub fn release(&self, collection: &str) {
        lock(&self.inner).withheld.retain(|c| c != collection);
    }

    /// Ends every open watch with a `410 Gone` ERROR event and forgets the history, so the
    /// client must list again.
    pub fn expire_watches(&self) {
        let mut inner = lock(&self.inner);
        inner.history.clear();
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
        for watch in inner.watches.drain(..) {
            let _ = watch.sender.send(line(&gone));
        }
    }

    /// Stops serving: the port refuses connections and open connections close.
    pub fn stop(&self) {
        if let Some(token) = self
            .serving
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            token.cancel();
        }
        lock(&self.inner).watches.clear();
    }

    /// Serves again on the same port, with the same objects.
    pub fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match bind(self.addr) {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("cannot bind {} again: {e}", self.addr),
            }
        };
        self.serve(listener);
    }

    /// Every event recorded (POST and PATCH bodies).
    pub fn events(&self) -> Vec<Value> {
        lock(&self.inner).events.clone()
    }

    /// Every request so far, `METHOD path?query`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.inner).requests.clone()
    }
}

impl Drop for ApiStandIn {
    fn drop(&mut self) {
        self.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Inner {
    fn record(&mut self, collection: &str, rv: u64, kind: &'static str, object: Value) {
        let event = line(&json!({"type": kind, "object": &object}));
        self.watches.retain(|w| {
            if w.collection != collection || !w.selector.matches(&object) {
                return true;
            }
            w.sender.send(event.clone()).is_ok()
        });
        self.history
            .entry(collection.to_owned())
            .or_default()
            .push(Change { rv, kind, object });
    }
}

/// A listener with `SO_REUSEADDR`, so a restart can take the port back while closed
/// connections linger in `TIME_WAIT`.
fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn collection_of(object: &Value) -> String {
    match object["kind"].as_str() {
        Some("Pod") => PODS.into(),
        Some("Service") => SERVICES.into(),
        Some("AuthorizationPolicy") => AUTHZ.into(),
        Some("RequestAuthentication") => AUTHN.into(),
        Some("ConfigMap") => CONFIGMAPS.into(),
        other => panic!("the stand-in does not serve kind {other:?}"),
    }
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .expect("a response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    full(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "message": message, "code": code.as_u16()}),
    )
}

fn query(request: &Request<Incoming>) -> HashMap<String, String> {
    request
        .uri()
        .query()
        .map(|q| {
            url_pairs(q)
                .into_iter()
                .collect::<HashMap<String, String>>()
        })
        .unwrap_or_default()
}

fn url_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(inner: &Mutex<Inner>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let target = format!(
        "{method} {}",
        request
            .uri()
            .path_and_query()
            .map_or(path.as_str(), |p| p.as_str())
    );
    lock(inner).requests.push(target);
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (&method, segments.as_slice()) {
        (&Method::GET, ["apis"]) => {
            let versions = lock(inner).versions.clone();
            let groups = if versions.is_empty() {
                json!([])
            } else {
                let list: Vec<Value> = versions
                    .iter()
                    .map(
                        |v| json!({"groupVersion": format!("security.istio.io/{v}"), "version": v}),
                    )
                    .collect();
                json!([{"name": "security.istio.io", "versions": list, "preferredVersion": list[0]}])
            };
            full(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
            )
        }
        (&Method::GET, ["apis", "security.istio.io", version]) => {
            if !lock(inner).versions.contains(version) {
                return status(StatusCode::NOT_FOUND, "NotFound", "version not served");
            }
            let resource = |plural: &str, singular: &str, kind: &str| {
                json!({"name": plural, "singularName": singular, "namespaced": true, "kind": kind,
                       "verbs": ["delete", "deletecollection", "get", "list", "patch", "create", "update", "watch"]})
            };
            full(
                StatusCode::OK,
                &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": format!("security.istio.io/{version}"),
                        "resources": [resource(AUTHZ, "authorizationpolicy", "AuthorizationPolicy"),
                                      resource(AUTHN, "requestauthentication", "RequestAuthentication")]}),
            )
        }
        (&Method::GET, ["api", "v1", rest @ ..]) => core(inner, &request, rest),
        (&Method::GET, ["apis", "security.istio.io", version, plural @ (AUTHZ | AUTHN)]) => {
            if !lock(inner).versions.contains(version) {
                return status(StatusCode::NOT_FOUND, "NotFound", "version not served");
            }
            let list = if *plural == AUTHZ {
                "AuthorizationPolicyList"
            } else {
                "RequestAuthenticationList"
            };
            collection(
                inner,
                &request,
                None,
                plural,
                &format!("security.istio.io/{version}"),
                list,
            )
        }
        (
            &Method::POST | &Method::PATCH,
            ["apis", "events.k8s.io", "v1", "namespaces", _, "events", ..],
        ) => {
            let body = match request.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(e) => return status(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
            };
            let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            lock(inner).events.push(event.clone());
            let code = if method == Method::POST {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            full(code, &event)
        }
        _ => not_served(),
    }
}

fn not_served() -> Response<Body> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the stand-in does not serve this",
    )
}

/// The core group's collections, of every namespace (`/api/v1/<plural>`) or of one
/// (`/api/v1/namespaces/<ns>/<plural>`).
fn core(inner: &Mutex<Inner>, request: &Request<Incoming>, rest: &[&str]) -> Response<Body> {
    let (namespace, plural) = match rest {
        [plural] => (None, *plural),
        ["namespaces", namespace, plural] => (Some(*namespace), *plural),
        _ => return not_served(),
    };
    let list_kind = match plural {
        PODS => "PodList",
        SERVICES => "ServiceList",
        CONFIGMAPS => "ConfigMapList",
        _ => return not_served(),
    };
    collection(inner, request, namespace, plural, "v1", list_kind)
}

/// A list, or a watch from a resourceVersion, of `name` (in `namespace` only when given).
fn collection(
    inner: &Mutex<Inner>,
    request: &Request<Incoming>,
    namespace: Option<&str>,
    name: &str,
    api_version: &str,
    list_kind: &str,
) -> Response<Body> {
    let query = query(request);
    let selector = match Selector::parse(namespace, &query) {
        Ok(selector) => selector,
        Err(message) => return status(StatusCode::BAD_REQUEST, "BadRequest", &message),
    };
    let mut state = lock(inner);
    if state.withheld.iter().any(|c| c == name) {
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "the stand-in withholds this collection",
        );
    }
    if state.fail_next > 0 {
        state.fail_next -= 1;
        return status(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "the stand-in was told to fail",
        );
    }
    let selected = |object: &Value| selector.matches(object);
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    if !watching {
        let items: Vec<Value> = state
            .objects
            .get(name)
            .map(|c| c.values().filter(|o| selected(o)).cloned().collect())
            .unwrap_or_default();
        return full(
            StatusCode::OK,
            &json!({"kind": list_kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": state.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let (sender, receiver) = mpsc::unbounded_channel();
    let history = state.history.get(name).cloned().unwrap_or_default();
    let oldest = history.first().map_or(state.rv, |c| c.rv.saturating_sub(1));
    if from < oldest {
        let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired", "message": "too old resource version", "code": 410}});
        let _ = sender.send(line(&gone));
    } else {
        for change in history
            .iter()
            .filter(|c| c.rv > from && selected(&c.object))
        {
            let _ = sender.send(line(&json!({"type": change.kind, "object": change.object})));
        }
        state.watches.push(Watch {
            collection: name.to_owned(),
            selector,
            sender,
        });
    }
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(receiver);
    let body = StreamBody::new(futures_util::StreamExt::map(stream, |bytes| {
        Ok::<_, Infallible>(Frame::data(bytes))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(body.boxed())
        .expect("a response")
}
