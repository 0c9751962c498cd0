//! The state store at Kubernetes scale: rebuild time and memory with 10,000 cluster pods (300
//! of them on this node) and 1,000 policies (900 AuthorizationPolicies, 100
//! RequestAuthentications) over 100 namespaces.
//!
//! Run with `cargo bench -p nodeward --bench state`. Objects are generated as the API server
//! returns them (JSON), decoded into `k8s_openapi` Pods and `DynamicObject`s and fed to the
//! Kubernetes source's mirror through the real projections (`pods::local_workload`,
//! `pods::identity`, `source::project_policy`: translation and validation), outside the timed
//! loop. Measured:
//!
//! - `rebuild/10000_pods_1000_policies`: what every change costs: `Cache::inputs` (the
//!   snapshot's inputs from the mirror) then `Snapshot::build_with_peers` (both policy kinds
//!   compiled, one view per local pod, the source identity of every pod).
//! - `translate/pod`, `translate/authorization_policy`: one object from the API into its
//!   projection (the cost per watch event).
//!
//! Memory is measured with a counting global allocator: the bytes held by the mirror (the
//! projections the watchers keep) and by one built snapshot. Both are printed before the
//! timings.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use k8s_openapi::api::core::v1::Pod;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::watcher::Event;
use nodeward::authn::AuthnSet;
use nodeward::authz::PolicySet;
use nodeward::kubernetes::pods;
use nodeward::kubernetes::source::{project_policy, Cache};
use nodeward::state::Snapshot;
use serde_json::json;

/// Counts the bytes currently allocated.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PODS: usize = 10_000;
const LOCAL_PODS: usize = 300;
const NAMESPACES: usize = 100;
const AUTHORIZATION_POLICIES: usize = 900;
const REQUEST_AUTHENTICATIONS: usize = 100;
const NODE: &str = "node-a";
const ROOT: &str = "istio-system";

fn pod(index: usize) -> Pod {
    let namespace = format!("ns-{}", index % NAMESPACES);
    let app = format!("app-{}", index % 7);
    let node = if index < LOCAL_PODS {
        NODE.to_owned()
    } else {
        format!("node-{}", index % 50 + 1)
    };
    let ip = format!(
        "10.{}.{}.{}",
        64 + index / 65_536,
        (index / 256) % 256,
        index % 256
    );
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("{app}-{index}"), "namespace": namespace, "uid": format!("uid-{index}"),
                     "labels": {"app": app, "version": "v1", "pod-template-hash": "5d8f7c9b6d"},
                     "managedFields": [{"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{}", index % 5),
                 "containers": [{"name": "app", "image": "registry.example/app:1"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "172.18.0.2"}
    }))
    .expect("a Pod")
}

fn resource(kind: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", "v1", kind),
        &format!("{}s", kind.to_lowercase()),
    )
}

fn authorization_policy(index: usize) -> DynamicObject {
    let namespace = if index.is_multiple_of(100) {
        ROOT.to_owned()
    } else {
        format!("ns-{}", index % NAMESPACES)
    };
    let action = if index.is_multiple_of(4) {
        "DENY"
    } else {
        "ALLOW"
    };
    serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("policy-{index}"), "namespace": namespace, "uid": format!("p-{index}"), "resourceVersion": "1"},
        "spec": {
            "selector": {"matchLabels": {"app": format!("app-{}", index % 7)}},
            "action": action,
            "rules": [{
                "from": [{"source": {"principals": [format!("cluster.local/ns/ns-{}/sa/sa-1", index % NAMESPACES), "cluster.local/ns/ingress/sa/gateway"],
                                     "requestPrincipals": ["https://idp.example.com/*"]}}],
                "to": [{"operation": {"methods": ["GET", "POST"], "paths": [format!("/api/v{}/*", index % 3), "/healthz"]}}],
                "when": [{"key": "request.auth.claims[groups]", "values": ["admin", "dev"]}]
            }]
        },
        "status": {}
    }))
    .expect("an AuthorizationPolicy")
}

fn request_authentication(index: usize) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": format!("jwt-{index}"), "namespace": format!("ns-{}", index % NAMESPACES), "uid": format!("r-{index}")},
        "spec": {
            "selector": {"matchLabels": {"app": format!("app-{}", index % 7)}},
            "jwtRules": [{"issuer": "https://idp.example.com", "jwksUri": "https://idp.example.com/.well-known/jwks.json", "audiences": ["api"]}]
        }
    }))
    .expect("a RequestAuthentication")
}

/// The mirror as the watchers leave it after the initial lists.
fn mirror() -> Cache {
    let mut cache = Cache::default();
    let authorization = resource("AuthorizationPolicy");
    let authentication = resource("RequestAuthentication");
    let mut reports = Vec::new();
    for index in 0..PODS {
        let pod = pod(index);
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(NODE) {
            cache.local.apply(Event::Apply(pod.clone()), &mut |p, _| {
                pods::local_pod(p).ok()
            });
        }
        cache
            .cluster
            .apply(Event::Apply(pod), &mut |p, _| pods::identity(p));
    }
    for index in 0..AUTHORIZATION_POLICIES {
        cache.authorization.apply(
            Event::Apply(authorization_policy(index)),
            &mut |o, previous| Some(project_policy(o, previous, &authorization, &mut reports)),
        );
    }
    for index in 0..REQUEST_AUTHENTICATIONS {
        cache.authentication.apply(
            Event::Apply(request_authentication(index)),
            &mut |o, previous| Some(project_policy(o, previous, &authentication, &mut reports)),
        );
    }
    assert!(
        reports.is_empty(),
        "every generated object is valid: {reports:?}"
    );
    cache
}

fn rebuild(cache: &Cache) -> Snapshot {
    let inputs = cache.inputs();
    Snapshot::build_with_peers(
        1,
        "cluster.local",
        ROOT,
        inputs.workloads.into_iter().map(Arc::new).collect(),
        &inputs.peers,
        PolicySet::compile(&inputs.authz, ROOT),
        AuthnSet::compile(&inputs.authn, ROOT),
        inputs.errors,
    )
}

fn bench(c: &mut Criterion) {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let cache = mirror();
    let mirror_bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    let before = ALLOCATED.load(Ordering::Relaxed);
    let snapshot = rebuild(&cache);
    let snapshot_bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    assert_eq!(cache.local.len(), LOCAL_PODS);
    assert_eq!(snapshot.workloads.len(), LOCAL_PODS);
    assert_eq!(snapshot.sources.len(), PODS);
    assert_eq!(snapshot.authz.len(), AUTHORIZATION_POLICIES);
    assert_eq!(snapshot.authn.rules().count(), REQUEST_AUTHENTICATIONS);
    let protected = snapshot.by_ip.values().filter(|v| v.is_protected()).count();
    println!(
        "state memory: mirror (projections of {PODS} pods, {} policies) {:.2} MiB; snapshot ({LOCAL_PODS} local workloads, {protected} protected, {} source identities) {:.2} MiB",
        AUTHORIZATION_POLICIES + REQUEST_AUTHENTICATIONS,
        mib(mirror_bytes),
        snapshot.sources.len(),
        mib(snapshot_bytes),
    );
    drop(snapshot);

    let mut group = c.benchmark_group("rebuild");
    group.sample_size(20);
    group.bench_function("10000_pods_1000_policies", |b| {
        b.iter(|| black_box(rebuild(black_box(&cache))));
    });
    group.finish();

    let mut group = c.benchmark_group("translate");
    let one_pod = pod(7);
    group.bench_function("pod", |b| {
        b.iter(|| black_box(pods::identity(black_box(&one_pod))));
    });
    let policy = authorization_policy(7);
    let authorization = resource("AuthorizationPolicy");
    group.bench_function("authorization_policy", |b| {
        b.iter(|| {
            let mut reports = Vec::new();
            black_box(project_policy(
                black_box(&policy),
                None,
                &authorization,
                &mut reports,
            ))
        });
    });
    group.finish();
}

#[expect(clippy::cast_precision_loss, reason = "a printed size")]
fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

criterion_group!(benches, bench);
criterion_main!(benches);
