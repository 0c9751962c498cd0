//! Kubernetes mode: the translation of real-looking Pod, AuthorizationPolicy and
//! RequestAuthentication JSON into the state store, and the watchers (kube-rs, for real)
//! against `ApiStandIn`, an in-process stand-in for the API server (no real API server can run
//! on the test machines; see `kubernetes_support` for what it cannot prove): adds, updates,
//! deletes, invalid objects (Events, last valid version kept), 500s, 410 Gone, the server
//! going away and coming back, the `v1beta1` fallback, the port protocols that Services
//! declare for the pods they select, and Istio's `MeshConfig` from `ConfigMap` `istio` of the
//! root namespace (the extension providers CUSTOM policies call).

mod kubernetes_support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use nodeward::authz::CustomProvider;
use nodeward::kubernetes::health::{self, Health};
use nodeward::kubernetes::pods::{self, NotSteered};
use nodeward::kubernetes::policies::{self, Policy};
use nodeward::kubernetes::{Kubernetes, KubernetesConfig};
use nodeward::metrics::Metrics;
use nodeward::policy::load_str;
use nodeward::readiness::Readiness;
use nodeward::state::publish::OnPublish;
use nodeward::state::workloads::PortProtocol;
use nodeward::state::{Snapshot, StateStore};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use kubernetes_support::{ApiStandIn, AUTHN, AUTHZ, CONFIGMAPS, PODS, SERVICES};

const NODE: &str = "node-a";
/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(20);

/// A Pod as the API server returns it: metadata with managedFields and owner references,
/// a full spec and status.
fn pod(namespace: &str, name: &str, node: &str, ip: Option<&str>, phase: &str) -> Value {
    let mut status = json!({
        "phase": phase,
        "hostIP": "172.18.0.2",
        "hostIPs": [{"ip": "172.18.0.2"}],
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "docker.io/kennethreitz/httpbin", "imageID": "", "started": true, "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}],
        "qosClass": "BestEffort",
        "startTime": "2025-01-01T00:00:00Z"
    });
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
        status["podIPs"] = json!([{"ip": ip}]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("0f7c-{namespace}-{name}"),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "generateName": format!("{name}-"),
            "labels": {"app": name, "pod-template-hash": "5d8f7c9b6d"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{name}-5d8f7c9b6d"), "uid": "a1b2", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": name,
            "serviceAccount": name,
            "containers": [{"name": "app", "image": "docker.io/kennethreitz/httpbin", "ports": [{"containerPort": 80, "protocol": "TCP"}], "resources": {}, "imagePullPolicy": "IfNotPresent"}],
            "restartPolicy": "Always",
            "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler",
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": status
    })
}

fn policy(kind: &str, version: &str, namespace: &str, name: &str, spec: &Value) -> Value {
    json!({
        "apiVersion": format!("security.istio.io/{version}"),
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("uid-{namespace}-{name}"),
            "generation": 1,
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"security.istio.io/v1\"}"
            },
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": format!("security.istio.io/{version}"), "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        },
        "spec": spec,
        "status": {"validationMessages": [], "observedGeneration": "1"}
    })
}

fn authz(namespace: &str, name: &str, spec: &Value) -> Value {
    policy("AuthorizationPolicy", "v1", namespace, name, spec)
}

/// A Service as the API server returns it: defaulted fields, a cluster IP, managedFields.
fn service(namespace: &str, name: &str, selector: &Value, ports: &Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": format!("svc-{namespace}-{name}"),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {"app": name},
            "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update", "apiVersion": "v1", "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]
        },
        "spec": {
            "type": "ClusterIP",
            "clusterIP": "10.96.0.20",
            "clusterIPs": ["10.96.0.20"],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": selector,
            "ports": ports
        },
        "status": {"loadBalancer": {}}
    })
}

fn resource(kind: &str, version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("security.istio.io", version, kind),
        &format!("{}s", kind.to_lowercase()),
    )
}

fn dynamic(value: Value) -> DynamicObject {
    serde_json::from_value(value).expect("a DynamicObject")
}

fn typed_pod(value: Value) -> Pod {
    serde_json::from_value(value).expect("a Pod")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP")
}

#[test]
fn pods_translate_to_steered_workloads_and_identities() {
    let running = typed_pod(pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running"));
    let workload = pods::local_workload(&running).expect("a Running pod with an IP is steered");
    assert_eq!(workload.name, "httpbin");
    assert_eq!(workload.namespace, "foo");
    assert_eq!(workload.service_account, "httpbin");
    assert_eq!(workload.ip, ip("10.244.1.7"));
    assert_eq!(workload.labels["app"], "httpbin");
    assert_eq!(workload.labels.len(), 2);
    assert_eq!(
        workload.interface, None,
        "the datapath finds it from the route"
    );
    let identity = pods::identity(&running).expect("an identity");
    assert_eq!(
        (
            identity.namespace.as_str(),
            identity.service_account.as_str(),
            identity.ips.as_slice()
        ),
        ("foo", "httpbin", &[ip("10.244.1.7")][..])
    );

    let pending = typed_pod(pod("foo", "starting", NODE, Some("10.244.1.8"), "Pending"));
    assert_eq!(
        pods::local_workload(&pending),
        Err(NotSteered::NotRunning("Pending".into()))
    );
    assert!(
        pods::identity(&pending).is_some(),
        "a Pending pod with an IP already sends traffic (init containers)"
    );
    let no_ip = typed_pod(pod("foo", "scheduled", NODE, None, "Pending"));
    assert_eq!(
        pods::local_workload(&no_ip),
        Err(NotSteered::NotRunning("Pending".into()))
    );
    assert!(pods::identity(&no_ip).is_none());
    let mut running_no_ip = pod("foo", "odd", NODE, None, "Running");
    running_no_ip["status"]["podIP"] = json!("not-an-ip");
    assert_eq!(
        pods::local_workload(&typed_pod(running_no_ip)),
        Err(NotSteered::NoIp)
    );
    let done = typed_pod(pod("foo", "job", NODE, Some("10.244.1.9"), "Succeeded"));
    assert!(
        pods::identity(&done).is_none(),
        "a finished pod's IP may already be another pod's"
    );
    let mut host = pod(
        "kube-system",
        "kube-proxy",
        NODE,
        Some("172.18.0.2"),
        "Running",
    );
    host["spec"]["hostNetwork"] = json!(true);
    let host = typed_pod(host);
    assert_eq!(pods::local_workload(&host), Err(NotSteered::HostNetwork));
    assert!(
        pods::identity(&host).is_none(),
        "the node's address is nobody's identity"
    );
    let mut no_sa = pod("bar", "legacy", NODE, Some("10.244.1.10"), "Running");
    no_sa["spec"]
        .as_object_mut()
        .expect("a spec")
        .remove("serviceAccountName");
    assert_eq!(
        pods::local_workload(&typed_pod(no_sa))
            .expect("steered")
            .service_account,
        "default"
    );
}

#[test]
fn the_kubelets_plain_http_and_tcp_probes_become_the_workloads_probes() {
    let mut value = pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running");
    let running = typed_pod(pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running"));
    assert!(pods::local_workload(&running)
        .expect("steered")
        .probes
        .is_empty());
    value["spec"]["initContainers"] = json!([{
        "name": "sidecar", "image": "proxy", "restartPolicy": "Always",
        "ports": [{"name": "admin", "containerPort": 9901}],
        "startupProbe": {"tcpSocket": {"port": "admin"}}
    }]);
    value["spec"]["containers"][0]["ports"] =
        json!([{"name": "http", "containerPort": 80}, {"name": "grpc", "containerPort": 9090}]);
    value["spec"]["containers"][0]["livenessProbe"] =
        json!({"httpGet": {"path": "/healthz?deep=1", "port": "http"}, "periodSeconds": 10});
    value["spec"]["containers"][0]["readinessProbe"] =
        json!({"httpGet": {"path": "/ready", "port": 80, "scheme": "HTTP"}});
    // Repeated, HTTPS, another host, gRPC, a port name nobody declares: not exempt.
    value["spec"]["containers"][0]["startupProbe"] =
        json!({"httpGet": {"path": "/healthz", "port": 80}});
    value["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "other", "image": "x",
            "livenessProbe": {"httpGet": {"path": "/tls", "port": 8443, "scheme": "HTTPS"}},
            "readinessProbe": {"httpGet": {"path": "/far", "port": 8080, "host": "10.0.0.9"}},
            "startupProbe": {"grpc": {"port": 9090}}
        }));
    value["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({
            "name": "third", "image": "x",
            "livenessProbe": {"tcpSocket": {"port": "undeclared"}}
        }));
    let workload = pods::local_workload(&typed_pod(value)).expect("steered");
    let probes: Vec<(u16, Option<&str>)> = workload
        .probes
        .iter()
        .map(|p| (p.port, p.path.as_deref()))
        .collect();
    assert_eq!(
        probes,
        [(9901, None), (80, Some("/healthz")), (80, Some("/ready"))]
    );
}

#[test]
fn policies_translate_like_the_same_policy_in_a_file() {
    let spec = json!({
        "selector": {"matchLabels": {"app": "httpbin"}},
        "action": "DENY",
        "rules": [{"from": [{"source": {"notRequestPrincipals": ["*"]}}], "to": [{"operation": {"paths": ["/headers"]}}]}]
    });
    let mut object = authz("foo", "require-jwt", &spec);
    object["metadata"]["annotations"]["istio.io/dry-run"] = json!("true");
    let translated = policies::translate(&dynamic(object), &resource("AuthorizationPolicy", "v1"))
        .expect("a valid policy");
    let Policy::Authorization(translated) = translated else {
        panic!("an AuthorizationPolicy: {translated:?}");
    };
    let file = load_str(
        std::path::Path::new("same.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: require-jwt\n  namespace: foo\n  annotations:\n    istio.io/dry-run: \"true\"\nspec:\n  selector:\n    matchLabels: {app: httpbin}\n  action: DENY\n  rules:\n  - from: [{source: {notRequestPrincipals: [\"*\"]}}]\n    to: [{operation: {paths: [/headers]}}]\n",
    );
    assert!(file.errors.is_empty(), "{:?}", file.errors);
    let from_file = &file.authorization_policies[0];
    assert_eq!(translated.spec, from_file.spec);
    assert_eq!(translated.metadata.name, "require-jwt");
    assert_eq!(translated.namespace(), "foo");
    assert_eq!(
        translated.metadata.annotations, from_file.metadata.annotations,
        "istio.io/dry-run kept, kubectl's copy dropped"
    );
    assert!(
        translated.metadata.other.is_empty(),
        "no uid, resourceVersion or managedFields kept: {:?}",
        translated.metadata.other
    );
    assert_eq!(
        translated.origin.to_string(),
        "kubernetes:security.istio.io/v1"
    );

    let ra = policy(
        "RequestAuthentication",
        "v1beta1",
        "foo",
        "jwt-example",
        &json!({"selector": {"matchLabels": {"app": "httpbin"}}, "jwtRules": [{"issuer": "testing@secure.istio.io", "jwksUri": "https://raw.githubusercontent.com/istio/istio/release-1.24/security/tools/jwt/samples/jwks.json"}]}),
    );
    let translated =
        policies::translate(&dynamic(ra), &resource("RequestAuthentication", "v1beta1"))
            .expect("a valid policy");
    let Policy::Authentication(ra) = translated else {
        panic!("a RequestAuthentication: {translated:?}");
    };
    assert_eq!(ra.api_version, "security.istio.io/v1beta1");
    assert_eq!(ra.spec.jwt_rules[0].issuer, "testing@secure.istio.io");
}

#[test]
fn invalid_policies_name_the_object_and_the_field() {
    let cases = [
        (
            json!({"action": "DENY"}),
            "spec.rules: DENY action without rules",
            "DENY without rules",
        ),
        (
            json!({"rules": [{"from": [{"source": {"principal": ["x"]}}]}]}),
            "spec.rules[0].from[0].source.principal: unknown field `principal`",
            "unknown field (a newer Istio schema, or a typo the API server did not prune)",
        ),
        (
            json!({"action": "MAYBE"}),
            "spec.action: unknown action \"MAYBE\"",
            "unknown action",
        ),
    ];
    for (spec, field, why) in cases {
        let errors = policies::translate(
            &dynamic(authz("foo", "broken", &spec)),
            &resource("AuthorizationPolicy", "v1"),
        )
        .expect_err(why);
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let joined = text.join("\n");
        let note = policies::note(&errors);
        assert!(
            note.starts_with(field),
            "{why}: the note {note:?} starts with {field:?}"
        );
        assert!(
            joined.starts_with(&format!(
                "kubernetes:security.istio.io/v1: AuthorizationPolicy foo/broken: {field}"
            )),
            "{why}: {joined}"
        );
    }
}

/// The source under test, with its store, health and readiness.
struct Source {
    store: Arc<StateStore>,
    health: Arc<Health>,
    readiness: Readiness,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Source {
    fn start(api: &ApiStandIn) -> Self {
        let store = Arc::new(StateStore::new(Snapshot::empty(
            "cluster.local",
            "istio-system",
        )));
        let health = Arc::new(Health::new());
        let readiness = Readiness::new();
        health.add_checks(&readiness);
        let on_publish: OnPublish = Arc::new(|_| {});
        let source = Kubernetes::new(
            api.client(),
            KubernetesConfig {
                node_name: NODE.into(),
                root_namespace: "istio-system".into(),
                trust_domain: "cluster.local".into(),
                debounce: Duration::from_millis(20),
            },
            Arc::clone(&store),
            Arc::new(Metrics::new()),
            Arc::clone(&health),
            on_publish,
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(shutdown.clone()));
        Self {
            store,
            health,
            readiness,
            shutdown,
            task,
        }
    }

    /// Waits (bounded) until the snapshot in force satisfies `what`.
    async fn until(&self, what: &str, ok: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
        let deadline = Instant::now() + WAIT;
        loop {
            let snapshot = self.store.load();
            if snapshot.generation > 0 && ok(&snapshot) {
                return snapshot;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}; generation {}, workloads {:?}, policies {:?}, errors {:?}, readiness {:?}",
                snapshot.generation,
                snapshot.workloads.iter().map(|w| w.id()).collect::<Vec<_>>(),
                snapshot.authz.policies().map(|p| p.id.clone()).collect::<Vec<_>>(),
                snapshot.errors,
                self.readiness.report().1
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("the source stops within 10 s")
            .expect("the source task does not panic");
    }
}

fn workload_ids(snapshot: &Snapshot) -> Vec<String> {
    let mut ids: Vec<String> = snapshot.workloads.iter().map(|w| w.id()).collect();
    ids.sort();
    ids
}

fn policy_ids(snapshot: &Snapshot) -> Vec<String> {
    let mut ids: Vec<String> = snapshot.authz.policies().map(|p| p.id.clone()).collect();
    ids.sort();
    ids
}

fn principal(snapshot: &Snapshot, address: &str) -> Option<String> {
    snapshot.source(ip(address)).map(|s| s.principal.clone())
}

async fn wait_events(api: &ApiStandIn, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let events = api.events();
        if events.len() >= count {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {count} event(s): {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn seed(api: &ApiStandIn) {
    api.apply(pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running"));
    api.apply(pod("foo", "starting", NODE, Some("10.244.1.8"), "Pending"));
    api.apply(pod("foo", "sleep", "node-b", Some("10.244.2.5"), "Running"));
    api.apply(pod(
        "bar",
        "client",
        "node-c",
        Some("10.244.3.5"),
        "Running",
    ));
    let mut host = pod(
        "kube-system",
        "kube-proxy",
        NODE,
        Some("172.18.0.2"),
        "Running",
    );
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(host);
    api.apply(authz(
        "foo",
        "allow-sleep",
        &json!({"selector": {"matchLabels": {"app": "httpbin"}}, "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/foo/sa/sleep"]}}]}]}),
    ));
    api.apply(policy(
        "RequestAuthentication",
        "v1",
        "foo",
        "jwt",
        &json!({"selector": {"matchLabels": {"app": "httpbin"}}, "jwtRules": [{"issuer": "testing@secure.istio.io", "jwks": "{\"keys\":[]}"}]}),
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_follow_adds_updates_and_deletes() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    let source = Source::start(&api);

    let first = source
        .until("the initial lists", |s| !s.workloads.is_empty())
        .await;
    assert_eq!(
        workload_ids(&first),
        ["foo/httpbin"],
        "only Running pods of this node, not on the host network"
    );
    assert_eq!(policy_ids(&first), ["foo/allow-sleep"]);
    assert_eq!(first.authn.rules().count(), 1);
    assert_eq!(
        principal(&first, "10.244.2.5").as_deref(),
        Some("cluster.local/ns/foo/sa/sleep"),
        "a pod of another node is a known source"
    );
    assert_eq!(
        principal(&first, "10.244.1.8").as_deref(),
        Some("cluster.local/ns/foo/sa/starting")
    );
    assert_eq!(
        principal(&first, "172.18.0.2"),
        None,
        "host-network pods give no identity"
    );
    let view = first
        .destination(ip("10.244.1.7"))
        .expect("httpbin is a destination");
    assert!(view.is_protected());
    assert!(
        first.destination(ip("10.244.2.5")).is_none(),
        "pods of other nodes are not destinations"
    );
    let (ready, report) = source.readiness.report();
    assert!(ready, "{report}");
    assert!(
        report.contains("[+]kubernetes-pods-on-node synced"),
        "{report}"
    );

    // Add: the Pending pod starts running; a new policy.
    api.apply(pod("foo", "starting", NODE, Some("10.244.1.8"), "Running"));
    api.apply(authz(
        "foo",
        "deny-all-post",
        &json!({"action": "DENY", "rules": [{"to": [{"operation": {"methods": ["POST"]}}]}]}),
    ));
    let snapshot = source
        .until("the started pod and the new policy", |s| {
            workload_ids(s).len() == 2 && policy_ids(s).len() == 2
        })
        .await;
    assert_eq!(workload_ids(&snapshot), ["foo/httpbin", "foo/starting"]);

    // Update: labels change which policies apply.
    let mut relabelled = pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running");
    relabelled["metadata"]["labels"]["app"] = json!("other");
    api.apply(relabelled);
    let snapshot = source
        .until("httpbin relabelled", |s| {
            s.destination(ip("10.244.1.7"))
                .is_some_and(|v| v.workload.labels["app"] == "other")
        })
        .await;
    let view = snapshot
        .destination(ip("10.244.1.7"))
        .expect("still a destination");
    assert!(
        view.authn.is_empty(),
        "the RequestAuthentication selects app=httpbin"
    );

    // Delete: a pod and a policy.
    api.delete(PODS, "foo", "starting");
    api.delete(AUTHZ, "foo", "deny-all-post");
    api.delete(AUTHN, "foo", "jwt");
    let snapshot = source
        .until("the deletions", |s| {
            workload_ids(s).len() == 1 && policy_ids(s).len() == 1 && s.authn.rules().count() == 0
        })
        .await;
    assert_eq!(
        principal(&snapshot, "10.244.1.8"),
        None,
        "a deleted pod's address has no identity"
    );

    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_become_one_event_and_keep_the_last_valid_version() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    let source = Source::start(&api);
    source
        .until("the initial lists", |s| !s.workloads.is_empty())
        .await;

    // An invalid new object: reported once as an Event, skipped; the others still apply.
    api.apply(authz("foo", "broken", &json!({"action": "DENY"})));
    let snapshot = source
        .until("the invalid object reported", |s| !s.errors.is_empty())
        .await;
    assert_eq!(policy_ids(&snapshot), ["foo/allow-sleep"]);
    assert!(
        snapshot.errors[0].contains("AuthorizationPolicy foo/broken"),
        "{:?}",
        snapshot.errors
    );
    let events = wait_events(&api, 1).await;
    let event = &events[0];
    assert_eq!(event["reason"], "InvalidPolicy");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "AuthorizationPolicy");
    assert_eq!(event["regarding"]["name"], "broken");
    assert_eq!(event["regarding"]["namespace"], "foo");
    assert_eq!(event["regarding"]["uid"], "uid-foo-broken");
    assert!(
        event["note"].as_str().is_some_and(|n| n.contains("spec")),
        "{event}"
    );
    assert_eq!(event["reportingController"], "nodeward");

    // A bad edit of a valid policy: reported, its last valid version keeps serving.
    api.apply(authz("foo", "allow-sleep", &json!({"selector": {"matchLabels": {"app": "httpbin"}}, "rules": [{"from": [{"source": {"principal": ["typo"]}}]}]})));
    let snapshot = source
        .until("the bad edit reported", |s| s.errors.len() == 2)
        .await;
    assert_eq!(
        policy_ids(&snapshot),
        ["foo/allow-sleep"],
        "the last valid version keeps serving"
    );
    assert!(
        snapshot.errors.iter().any(
            |e| e.contains("foo/allow-sleep") && e.contains("last valid version keeps serving")
        ),
        "{:?}",
        snapshot.errors
    );
    let events = wait_events(&api, 2).await;
    assert_eq!(events[1]["regarding"]["name"], "allow-sleep");

    // A relist (410 Gone) sees the same invalid objects again: no new Event.
    let lists_before = api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch="))
        .count();
    api.expire_watches();
    let deadline = Instant::now() + WAIT;
    while api
        .requests()
        .iter()
        .filter(|r| !r.contains("watch="))
        .count()
        < lists_before + 4
    {
        assert!(
            Instant::now() < deadline,
            "the watchers did not relist after 410: {:?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        api.events().len(),
        2,
        "no duplicate Event on a relist: {:?}",
        api.events()
    );
    let snapshot = source.store.load();
    assert_eq!(policy_ids(&snapshot), ["foo/allow-sleep"]);
    assert_eq!(snapshot.errors.len(), 2);

    // Fixing the objects clears the errors.
    api.delete(AUTHZ, "foo", "broken");
    api.apply(authz(
        "foo",
        "allow-sleep",
        &json!({"selector": {"matchLabels": {"app": "other"}}}),
    ));
    let snapshot = source.until("the fixes", |s| s.errors.is_empty()).await;
    assert_eq!(policy_ids(&snapshot), ["foo/allow-sleep"]);
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_errors_keep_the_last_state_and_say_how_stale() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    // The first lists fail: nothing is published, readiness says why.
    api.fail_next(6);
    let source = Source::start(&api);
    let deadline = Instant::now() + WAIT;
    loop {
        let (ready, report) = source.readiness.report();
        assert!(!ready, "not ready before the first lists: {report}");
        assert_eq!(
            source.store.load().generation,
            0,
            "nothing published before every list"
        );
        if report.contains("[-]kubernetes-pods initial list failing") {
            assert!(report.contains("500"), "{report}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failing list reported: {report}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let snapshot = source
        .until("recovery after the 500s", |s| !s.workloads.is_empty())
        .await;
    assert_eq!(workload_ids(&snapshot), ["foo/httpbin"]);
    let generation = snapshot.generation;
    assert!(
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/pods?"))
            .count()
            >= 3,
        "the failed lists were retried: {:?}",
        api.requests()
    );

    // The API server goes away: the state keeps serving, readiness stays up and says stale.
    api.stop();
    let deadline = Instant::now() + WAIT;
    while source.health.watcher(health::CLUSTER_PODS).stale_seconds() < 1.0 {
        assert!(
            Instant::now() < deadline,
            "staleness never reported: {}",
            source.readiness.report().1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ready, report) = source.readiness.report();
    assert!(ready, "the last known state keeps being enforced: {report}");
    assert!(report.contains("stale; watch failing"), "{report}");
    assert_eq!(source.store.load().generation, generation);
    assert_eq!(workload_ids(&source.store.load()), ["foo/httpbin"]);

    // Changes made while it was away are seen once it is back (a relist, since the watch
    // history is gone too).
    api.delete(PODS, "foo", "httpbin");
    api.apply(pod("foo", "new", NODE, Some("10.244.1.20"), "Running"));
    api.expire_watches();
    api.restart();
    let snapshot = source
        .until("the changes made while the API was away", |s| {
            workload_ids(s) == ["foo/new"]
        })
        .await;
    assert!(snapshot.generation > generation);
    let deadline = Instant::now() + WAIT;
    while source.health.watcher(health::CLUSTER_PODS).stale_seconds() > 0.0 {
        assert!(
            Instant::now() < deadline,
            "staleness not cleared: {}",
            source.readiness.report().1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_fall_back_to_v1beta1_when_v1_is_not_served() {
    let api = ApiStandIn::start(&["v1beta1"]);
    api.apply(pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running"));
    api.apply(policy(
        "AuthorizationPolicy",
        "v1beta1",
        "foo",
        "old-style",
        &json!({"action": "ALLOW", "rules": [{}]}),
    ));
    let source = Source::start(&api);
    let snapshot = source
        .until("the v1beta1 policy", |s| policy_ids(s) == ["foo/old-style"])
        .await;
    assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("GET /apis/security.istio.io/v1beta1/authorizationpolicies")),
        "{:?}",
        api.requests()
    );
    assert!(!api
        .requests()
        .iter()
        .any(|r| r.starts_with("GET /apis/security.istio.io/v1/")));
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_istio_crds_nothing_is_published_and_readiness_says_why() {
    let api = ApiStandIn::start(&[]);
    api.apply(pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running"));
    let source = Source::start(&api);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut report = String::new();
    while Instant::now() < deadline {
        report = source.readiness.report().1;
        if report.contains("install Istio's CRDs") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        report.contains("[-]kubernetes-authorizationpolicies initial list failing"),
        "{report}"
    );
    assert!(report.contains("install Istio's CRDs"), "{report}");
    assert_eq!(
        source.store.load().generation,
        0,
        "no snapshot without the policies: it would unprotect pods"
    );
    source.stop().await;
}

/// The declared port protocols of the workload at `address`.
fn declared(snapshot: &Snapshot, address: &str) -> Vec<(u16, PortProtocol)> {
    snapshot
        .destination(ip(address))
        .map(|view| {
            view.workload
                .ports
                .iter()
                .map(|p| (p.port, p.protocol))
                .collect()
        })
        .unwrap_or_default()
}

/// httpbin with an unnamed container port 80 and a port named `grpc` (9090), and the Services
/// of the Kubernetes-mode contract: each way a Service port declares a protocol, and one in
/// another namespace whose selector matches httpbin's labels.
fn seed_services(api: &ApiStandIn) {
    let mut httpbin = pod("foo", "httpbin", NODE, Some("10.244.1.7"), "Running");
    httpbin["spec"]["containers"][0]["ports"] = json!([
        {"containerPort": 80, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 9090, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9100, "protocol": "TCP"}
    ]);
    api.apply(httpbin);
    let selector = json!({"app": "httpbin"});
    // appProtocol first (Istio: "resolves from appProto"); its port name says nothing.
    api.apply(service(
        "foo",
        "web",
        &selector,
        &json!([{"name": "web", "port": 8000, "targetPort": 80, "protocol": "TCP", "appProtocol": "http"}]),
    ));
    // The name's prefix (Istio: "resolves from port name").
    api.apply(service(
        "foo",
        "admin",
        &selector,
        &json!([{"name": "http-admin", "port": 8080, "targetPort": 8080, "protocol": "TCP"}]),
    ));
    api.apply(service(
        "foo",
        "db",
        &selector,
        &json!([{"name": "tcp-db", "port": 5432, "targetPort": 5432, "protocol": "TCP"}]),
    ));
    // An unnamed port (a Service's only port may be) targeting a named container port, with
    // Kubernetes' standard appProtocol (Istio: "standard app protocol"); a port whose name
    // declares nothing stays sniffed.
    api.apply(service(
        "foo",
        "rpc",
        &selector,
        &json!([{"port": 9000, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "kubernetes.io/h2c"}]),
    ));
    api.apply(service(
        "foo",
        "monitoring",
        &selector,
        &json!([{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]),
    ));
    // Same labels, another namespace: a Service selects pods of its own namespace only.
    api.apply(service(
        "bar",
        "lookalike",
        &selector,
        &json!([{"name": "http-x", "port": 7000, "targetPort": 7000, "protocol": "TCP"}]),
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_declare_the_port_protocols_of_the_pods_they_select() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    seed_services(&api);
    let source = Source::start(&api);

    let first = source
        .until("the initial lists", |s| !s.workloads.is_empty())
        .await;
    assert_eq!(
        declared(&first, "10.244.1.7"),
        [
            (80, PortProtocol::Http),
            (5432, PortProtocol::Tcp),
            (8080, PortProtocol::Http),
            (9090, PortProtocol::Http2),
        ],
        "appProtocol, name prefix, a named targetPort; not 9100 (undeclared), not 7000 (bar's)"
    );
    let (_, report) = source.readiness.report();
    assert!(report.contains("[+]kubernetes-services synced"), "{report}");

    // An edit of a Service changes the declaration.
    api.apply(service(
        "foo",
        "db",
        &json!({"app": "httpbin"}),
        &json!([{"name": "http-db", "port": 5432, "targetPort": 5432, "protocol": "TCP"}]),
    ));
    source
        .until("db declared HTTP", |s| {
            declared(s, "10.244.1.7").contains(&(5432, PortProtocol::Http))
        })
        .await;

    // Deleting it removes it; the others stay.
    api.delete(SERVICES, "foo", "db");
    let snapshot = source
        .until("db gone", |s| {
            !declared(s, "10.244.1.7")
                .iter()
                .any(|(port, _)| *port == 5432)
        })
        .await;
    assert_eq!(
        declared(&snapshot, "10.244.1.7"),
        [
            (80, PortProtocol::Http),
            (8080, PortProtocol::Http),
            (9090, PortProtocol::Http2),
        ]
    );

    // A Service that stops selecting the pod stops declaring its ports.
    api.apply(service(
        "foo",
        "web",
        &json!({"app": "other"}),
        &json!([{"name": "web", "port": 8000, "targetPort": 80, "protocol": "TCP", "appProtocol": "http"}]),
    ));
    source
        .until("web no longer selects httpbin", |s| {
            declared(s, "10.244.1.7") == [(8080, PortProtocol::Http), (9090, PortProtocol::Http2)]
        })
        .await;
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_published_before_the_services_are_listed() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    seed_services(&api);
    api.withhold(SERVICES);
    let source = Source::start(&api);
    let deadline = Instant::now() + WAIT;
    loop {
        let (ready, report) = source.readiness.report();
        assert!(!ready, "not ready before the Services are listed: {report}");
        if report.contains("[-]kubernetes-services initial list failing")
            && report.contains("[+]kubernetes-pods-on-node synced")
            && report.contains("[+]kubernetes-authorizationpolicies synced")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other lists never completed: {report}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        source.store.load().generation,
        0,
        "no snapshot that would sniff ports the Services declare"
    );

    api.release(SERVICES);
    let first = source
        .until("the first snapshot", |s| !s.workloads.is_empty())
        .await;
    assert_eq!(
        first.generation, 1,
        "the first snapshot already has the Services"
    );
    assert_eq!(declared(&first, "10.244.1.7").len(), 4);
    source.stop().await;
}

/// `ConfigMap` `istio` as Istio's chart installs it (labels of `istio-discovery`, the
/// `meshNetworks` key beside `mesh`), in `namespace`, with `mesh` as its `mesh` key.
fn istio_config_map(namespace: &str, mesh: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "istio",
            "namespace": namespace,
            "uid": format!("cm-{namespace}-istio"),
            "creationTimestamp": "2025-01-01T00:00:00Z",
            "labels": {
                "app.kubernetes.io/managed-by": "Helm",
                "app.kubernetes.io/name": "istiod",
                "install.operator.istio.io/owning-resource": "unknown",
                "istio.io/rev": "default",
                "operator.istio.io/component": "Pilot",
                "release": "istio"
            },
            "annotations": {"meta.helm.sh/release-name": "istiod", "meta.helm.sh/release-namespace": "istio-system"}
        },
        "data": {"mesh": mesh, "meshNetworks": "networks: {}"}
    })
}

/// Istio's default profile: the `mesh` key istio/istio renders for it
/// (operator/cmd/mesh/testdata/manifest-generate/output/pilot_default.golden.yaml, whose input
/// sets `rootNamespace: istio-control`; nodeward takes its root namespace from its own flag).
const ISTIO_DEFAULT_MESH: &str = "defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
defaultProviders:
  metrics:
  - prometheus
enablePrometheusMerge: true
rootNamespace: istio-control
trustDomain: cluster.local";

/// Istio's demo profile as `istio-discovery` renders it (its `mesh` template merged with
/// manifests/helm-profiles/demo.yaml's `meshConfig`, keys sorted by `toYaml`): tracing and
/// access-log providers, no `ext_authz` one.
const ISTIO_DEMO_MESH: &str = "accessLogFile: /dev/stdout
defaultConfig:
  discoveryAddress: istiod.istio-system.svc:15012
defaultProviders:
  metrics:
  - prometheus
enablePrometheusMerge: true
extensionProviders:
- envoyOtelAls:
    port: 4317
    service: opentelemetry-collector.observability.svc.cluster.local
  name: otel
- name: skywalking
  skywalking:
    port: 11800
    service: tracing.istio-system.svc.cluster.local
- name: otel-tracing
  opentelemetry:
    port: 4317
    service: opentelemetry-collector.observability.svc.cluster.local
- name: jaeger
  opentelemetry:
    port: 4317
    service: jaeger-collector.istio-system.svc.cluster.local
rootNamespace: istio-system
trustDomain: cluster.local";

/// The demo profile's mesh after Istio's external authorization task
/// (istio.io/latest/docs/tasks/security/authorization/authz-custom/) added the sample's two
/// providers with `kubectl edit configmap istio -n istio-system` (quoted ports as the task
/// writes them).
fn ext_authz_task_mesh() -> String {
    ISTIO_DEMO_MESH.replace(
        "extensionProviders:\n",
        "extensionProviders:
- name: \"sample-ext-authz-grpc\"
  envoyExtAuthzGrpc:
    service: \"ext-authz.foo.svc.cluster.local\"
    port: \"9000\"
- name: \"sample-ext-authz-http\"
  envoyExtAuthzHttp:
    service: \"ext-authz.foo.svc.cluster.local\"
    port: \"8000\"
    includeRequestHeadersInCheck: [\"x-ext-authz\"]
",
    )
}

/// A CUSTOM policy on httpbin naming `provider`.
fn custom_policy(provider: &str) -> Value {
    authz(
        "foo",
        "ext-authz",
        &json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "CUSTOM",
                "provider": {"name": provider}, "rules": [{"to": [{"operation": {"paths": ["/headers"]}}]}]}),
    )
}

/// What httpbin's CUSTOM policies resolve to: `Ok(provider name)` or `Err(why it denies)`.
fn custom_provider(snapshot: &Snapshot) -> Result<String, String> {
    let view = snapshot
        .destination(ip("10.244.1.7"))
        .expect("httpbin is a destination");
    match &view.authz.provider {
        CustomProvider::Ready(provider) => Ok(provider.name.clone()),
        CustomProvider::Invalid(why) => Err(why.clone()),
        CustomProvider::None => Err("no CUSTOM policy".into()),
    }
}

/// The extension providers in force: (`ext_authz` ones, ignored ones), by name.
fn providers(snapshot: &Snapshot) -> (Vec<String>, Vec<String>) {
    let mesh = snapshot.authz.providers();
    (
        mesh.providers.keys().cloned().collect(),
        mesh.ignored.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_policies_call_the_providers_of_the_istio_config_map() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    api.apply(custom_policy("sample-ext-authz-grpc"));
    // The same ConfigMap in another namespace is not the MeshConfig.
    api.apply(istio_config_map("foo", &ext_authz_task_mesh()));
    let source = Source::start(&api);

    let first = source
        .until("the initial lists", |s| !s.workloads.is_empty())
        .await;
    assert_eq!(
        custom_provider(&first),
        Err("available providers are [] but found \"sample-ext-authz-grpc\"".into()),
        "no ConfigMap in the root namespace: Istio's undefined provider, CUSTOM denies"
    );
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    let (ready, report) = source.readiness.report();
    assert!(ready, "{report}");
    assert!(
        report.contains("[+]kubernetes-meshconfig synced, watching"),
        "{report}"
    );

    // Created: the providers serve.
    api.apply(istio_config_map("istio-system", &ext_authz_task_mesh()));
    let snapshot = source
        .until("the providers of istio-system/istio", |s| {
            custom_provider(s).is_ok()
        })
        .await;
    assert_eq!(
        custom_provider(&snapshot),
        Ok("sample-ext-authz-grpc".into())
    );
    assert_eq!(
        providers(&snapshot).0,
        ["sample-ext-authz-grpc", "sample-ext-authz-http"]
    );
    assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);

    // Deleted: Istio's default MeshConfig, no providers; the one in foo still does not count.
    api.delete(CONFIGMAPS, "istio-system", "istio");
    let snapshot = source
        .until("the providers gone", |s| providers(s).0.is_empty())
        .await;
    assert!(snapshot.errors.is_empty(), "{:?}", snapshot.errors);
    assert_eq!(
        custom_provider(&snapshot),
        Err("available providers are [] but found \"sample-ext-authz-grpc\"".into())
    );

    // The agent asked for that one object of the root namespace only.
    let asked: Vec<String> = api
        .requests()
        .into_iter()
        .filter(|r| r.contains("configmaps"))
        .collect();
    assert!(!asked.is_empty());
    for request in &asked {
        assert!(
            request.starts_with("GET /api/v1/namespaces/istio-system/configmaps?")
                && request.contains("fieldSelector=metadata.name%3Distio"),
            "{asked:?}"
        );
    }
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_mesh_config_edit_keeps_the_last_good_providers_and_is_reported() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    api.apply(custom_policy("sample-ext-authz-grpc"));
    api.apply(istio_config_map("istio-system", &ext_authz_task_mesh()));
    let source = Source::start(&api);
    source
        .until("the providers of istio-system/istio", |s| {
            custom_provider(s) == Ok("sample-ext-authz-grpc".into())
        })
        .await;

    // A bad edit (not a MeshConfig): reported once as an Event on the ConfigMap, the last good
    // providers keep serving.
    api.apply(istio_config_map(
        "istio-system",
        "extensionProviders:\n- name: sample-ext-authz-grpc\n  envoyExtAuthzGrpc: {service: [",
    ));
    let snapshot = source
        .until("the bad edit reported", |s| !s.errors.is_empty())
        .await;
    assert_eq!(
        custom_provider(&snapshot),
        Ok("sample-ext-authz-grpc".into()),
        "the last good providers keep serving"
    );
    assert_eq!(snapshot.errors.len(), 1, "{:?}", snapshot.errors);
    assert!(
        snapshot.errors[0].starts_with("ConfigMap istio-system/istio key mesh: not a MeshConfig: ")
            && snapshot.errors[0].ends_with("; the last good extension providers keep serving"),
        "{:?}",
        snapshot.errors
    );
    let events = wait_events(&api, 1).await;
    let event = &events[0];
    assert_eq!(event["reason"], "InvalidMeshConfig");
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["regarding"]["kind"], "ConfigMap");
    assert_eq!(event["regarding"]["namespace"], "istio-system");
    assert_eq!(event["regarding"]["name"], "istio");
    assert_eq!(event["regarding"]["uid"], "cm-istio-system-istio");
    assert!(
        event["note"]
            .as_str()
            .is_some_and(|n| n.contains("not a MeshConfig")),
        "{event}"
    );

    // An edit that parses with one invalid provider: it is listed (as standalone mode lists
    // it), the valid ones serve.
    let mesh = ext_authz_task_mesh().replace(
        "- name: skywalking",
        "- name: broken\n  envoyExtAuthzHttp: {service: ext-authz.foo.svc.cluster.local, port: 8000, timeout: soon}\n- name: skywalking",
    );
    api.apply(istio_config_map("istio-system", &mesh));
    let snapshot = source
        .until("the invalid provider listed", |s| {
            s.errors.len() == 1 && s.errors[0].contains("\"broken\"")
        })
        .await;
    assert!(
        snapshot.errors[0].starts_with(
            "ConfigMap istio-system/istio key mesh: extension provider \"broken\": extensionProviders["
        ) && snapshot.errors[0].contains("envoyExtAuthzHttp.timeout")
            && snapshot.errors[0]
                .ends_with("; CUSTOM policies naming it deny the requests they match"),
        "{:?}",
        snapshot.errors
    );
    assert_eq!(
        custom_provider(&snapshot),
        Ok("sample-ext-authz-grpc".into())
    );
    let events = wait_events(&api, 2).await;
    assert_eq!(events[1]["reason"], "InvalidMeshConfig");

    // A policy naming the invalid provider denies, saying why.
    api.apply(custom_policy("broken"));
    let snapshot = source
        .until("the CUSTOM policy on the invalid provider", |s| {
            custom_provider(s).is_err_and(|why| why.contains("broken"))
        })
        .await;
    assert!(
        custom_provider(&snapshot)
            .is_err_and(|why| why.starts_with("found errors in provider broken: ")),
        "{:?}",
        custom_provider(&snapshot)
    );

    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istios_own_mesh_config_values_parse() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    let source = Source::start(&api);
    source
        .until("the initial lists", |s| !s.workloads.is_empty())
        .await;
    let rows: [(&str, String, &[&str], &[&str]); 3] = [
        (
            "Istio's default profile: no extension providers",
            ISTIO_DEFAULT_MESH.to_owned(),
            &[],
            &[],
        ),
        (
            "the demo profile: tracing and access-log providers, none of them ext_authz",
            ISTIO_DEMO_MESH.to_owned(),
            &[],
            &["otel", "skywalking", "otel-tracing", "jaeger"],
        ),
        (
            "the demo profile with the ext-authz task's providers",
            ext_authz_task_mesh(),
            &["sample-ext-authz-grpc", "sample-ext-authz-http"],
            &["otel", "skywalking", "otel-tracing", "jaeger"],
        ),
    ];
    // From the last row back, so that every row changes what is in force.
    for (why, mesh, ext_authz, ignored) in rows.iter().rev() {
        api.apply(istio_config_map("istio-system", mesh));
        let snapshot = source
            .until(why, |s| {
                let (names, others) = providers(s);
                names == *ext_authz && others == *ignored
            })
            .await;
        assert!(snapshot.errors.is_empty(), "{why}: {:?}", snapshot.errors);
    }
    source.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_mesh_config_neither_blocks_readiness_nor_publishing() {
    let api = ApiStandIn::start(&["v1", "v1beta1"]);
    seed(&api);
    api.apply(custom_policy("sample-ext-authz-grpc"));
    api.apply(istio_config_map("istio-system", &ext_authz_task_mesh()));
    // As when RBAC does not let the agent read the ConfigMap: every list fails.
    api.withhold(CONFIGMAPS);
    let source = Source::start(&api);
    let first = source
        .until("a snapshot without the MeshConfig", |s| {
            !s.workloads.is_empty()
        })
        .await;
    assert_eq!(
        custom_provider(&first),
        Err("available providers are [] but found \"sample-ext-authz-grpc\"".into()),
        "without the MeshConfig CUSTOM policies deny"
    );
    let (ready, report) = source.readiness.report();
    assert!(ready, "{report}");
    assert!(
        report.contains("[+]kubernetes-meshconfig initial list failing")
            && report.contains("(not required; until it succeeds no extension provider is defined: CUSTOM policies deny the requests they match)"),
        "{report}"
    );

    // Once it can be read, its providers serve.
    api.release(CONFIGMAPS);
    source
        .until("the providers once the list succeeds", |s| {
            custom_provider(s) == Ok("sample-ext-authz-grpc".into())
        })
        .await;
    source.stop().await;
}
