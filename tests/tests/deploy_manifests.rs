//! The Kubernetes manifests of `deploy/`: every document parses into its k8s-openapi type with
//! no field lost (a misspelt field would be dropped by the API server, or refused by kubectl's
//! strict validation), and the invariants the agent relies on hold: RBAC grants exactly what
//! the agent's watchers and Events use, the probes reach the admin server, the image is the one
//! built, every kustomization resource exists, the ConfigMap sets only flags the binary has, and
//! the CRDs are Istio's (names, versions, columns) and accept every example policy while
//! refusing malformed ones.
//!
//! The CRD schemas are checked with the `jsonschema` crate (draft 4, the closest to OpenAPI v3)
//! plus two walks of our own: unknown fields (what the API server prunes, or refuses with
//! `kubectl apply`'s default strict field validation) and the structural-schema rule that every
//! field has a type. Not checked here, and checked by the API server only: the CEL rules
//! (`x-kubernetes-validations`: wildcards in labels, selector vs targetRef, jwks vs jwksUri,
//! URL schemes, durations), `x-kubernetes-int-or-string` beyond its `anyOf`, list types, and the
//! other structural-schema rules (no `type`/`description` inside `oneOf`/`anyOf`/`not`, ...).
//! The agent's own validation refuses the CEL-only cases, which the last test shows with the
//! real binary.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use nodeward_tests::{nodeward_bin, repo_root, TempDir};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::Value;

/// What the agent's Kubernetes mode reads and writes in every namespace (API group,
/// resource, verbs): the ClusterRole must grant exactly this, nothing more.
///
/// The agent also discovers the `security.istio.io` group (GET /apis/security.istio.io): the
/// built-in `system:discovery` ClusterRole grants discovery to every authenticated client, so
/// our ClusterRole has no `nonResourceURLs`.
const AGENT_API_ACCESS: &[(&str, &str, &[&str])] = &[
    // Pods of every namespace; the agent narrows the watch to its node with a field selector.
    ("", "pods", &["list", "watch"]),
    // Services of every namespace: their ports declare the protocols of the pods they select.
    ("", "services", &["list", "watch"]),
    (
        "security.istio.io",
        "requestauthentications",
        &["list", "watch"],
    ),
    (
        "security.istio.io",
        "authorizationpolicies",
        &["list", "watch"],
    ),
    // events.k8s.io/v1 Events about the objects the agent judges.
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// What it reads in the root namespace only (API group, resource, the one object's name,
/// verbs): Istio's `MeshConfig`, ConfigMap `istio`, listed and watched with the field selector
/// `metadata.name=istio` (agent/src/kubernetes/mesh.rs), which lets `resourceNames` apply to a
/// list or watch. A Role in that namespace must grant exactly this.
const AGENT_ROOT_NAMESPACE_ACCESS: &[(&str, &str, &str, &[&str])] =
    &[("", "configmaps", "istio", &["list", "watch"])];

/// The capabilities the DaemonSet adds (deploy/README.md, "Capabilities", says why for each;
/// `tests/tests/deploy_capabilities.rs` runs the agent with exactly these).
const CAPABILITIES: &[&str] = &["NET_ADMIN", "SYS_ADMIN"];

const NAMESPACE: &str = "nodeward-system";

fn deploy() -> PathBuf {
    repo_root().join("deploy")
}

/// The YAML documents of a file as JSON values (comment-only documents left out).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .enumerate()
        .filter_map(|(i, doc)| {
            let value = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {}: not YAML: {e}", path.display(), i + 1));
            (!value.is_null()).then(|| {
                serde_json::to_value(&value).unwrap_or_else(|e| {
                    panic!(
                        "{} document {}: not JSON-compatible: {e}",
                        path.display(),
                        i + 1
                    )
                })
            })
        })
        .collect()
}

/// Every `.yaml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Kubernetes objects of deploy/: every YAML document but the kustomizations and kind's config,
/// with where it came from.
fn manifests() -> Vec<(String, Value)> {
    yaml_files(&deploy())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name != "kustomization.yaml" && name != "kind-config.yaml"
        })
        .flat_map(|path| {
            let rel = path
                .strip_prefix(repo_root())
                .unwrap_or(&path)
                .display()
                .to_string();
            documents(&path)
                .into_iter()
                .enumerate()
                .map(move |(i, doc)| (format!("{rel} document {}", i + 1), doc))
        })
        .collect()
}

/// The one object of `kind` named `name` in deploy/ (outside deploy/examples).
fn object(kind: &str, name: &str) -> Value {
    let found: Vec<Value> = manifests()
        .into_iter()
        .filter(|(origin, doc)| {
            !origin.starts_with("deploy/examples")
                && doc["kind"] == kind
                && doc["metadata"]["name"] == name
        })
        .map(|(_, doc)| doc)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name} in deploy/, found {}",
        found.len()
    );
    found.into_iter().next().expect("one")
}

/// Parses `doc` into `T`, then checks that serializing `T` gives back every field of `doc`:
/// k8s-openapi ignores fields it does not know, so a misspelt field would vanish silently.
fn parse_exact<T: DeserializeOwned + Serialize>(origin: &str, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{origin}: does not parse as {}: {e}",
            std::any::type_name::<T>()
        )
    });
    let back = serde_json::to_value(&typed).expect("serializes");
    let mut lost = Vec::new();
    lost_fields(doc, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{origin}: fields unknown to {} (misspelt or misplaced?): {lost:?}",
        std::any::type_name::<T>()
    );
    typed
}

/// Paths of `original` that `round_trip` lacks or holds with another value.
fn lost_fields(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &format!("{path}.{key}"), out),
                    None => out.push(format!("{path}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path}: {a} became {b}")),
    }
}

#[test]
fn every_manifest_parses_into_its_api_type_with_no_field_lost() {
    let mut kinds = BTreeMap::<String, usize>::new();
    for (origin, doc) in manifests() {
        let api_version = doc["apiVersion"].as_str().unwrap_or_default();
        let kind = doc["kind"].as_str().unwrap_or_default();
        match (api_version, kind) {
            ("v1", "Namespace") => drop(parse_exact::<Namespace>(&origin, &doc)),
            ("v1", "ServiceAccount") => drop(parse_exact::<ServiceAccount>(&origin, &doc)),
            ("v1", "ConfigMap") => drop(parse_exact::<ConfigMap>(&origin, &doc)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                drop(parse_exact::<ClusterRole>(&origin, &doc));
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                drop(parse_exact::<ClusterRoleBinding>(&origin, &doc));
            }
            ("rbac.authorization.k8s.io/v1", "Role") => drop(parse_exact::<Role>(&origin, &doc)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
                drop(parse_exact::<RoleBinding>(&origin, &doc));
            }
            ("apps/v1", "DaemonSet") => drop(parse_exact::<DaemonSet>(&origin, &doc)),
            ("apps/v1", "Deployment") => drop(parse_exact::<Deployment>(&origin, &doc)),
            ("v1", "Service") => drop(parse_exact::<Service>(&origin, &doc)),
            ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
                drop(parse_exact::<CustomResourceDefinition>(&origin, &doc));
            }
            // Checked against the CRDs' schemas below.
            (
                "security.istio.io/v1" | "security.istio.io/v1beta1",
                "AuthorizationPolicy" | "RequestAuthentication",
            ) => {}
            _ => panic!("{origin}: {api_version} {kind} is not a kind this test knows: add it"),
        }
        *kinds.entry(kind.to_owned()).or_default() += 1;
    }
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
        "CustomResourceDefinition",
        "Deployment",
        "Service",
        "AuthorizationPolicy",
        "RequestAuthentication",
    ] {
        assert!(
            kinds.contains_key(kind),
            "no {kind} found in deploy/: {kinds:?}"
        );
    }
    assert_eq!(kinds["CustomResourceDefinition"], 2, "{kinds:?}");
}

/// `resources` of the kustomization in `dir`.
fn kustomization_resources(dir: &Path) -> Vec<String> {
    let docs = documents(&dir.join("kustomization.yaml"));
    let doc = &docs[0];
    assert_eq!(doc["kind"], "Kustomization", "{}", dir.display());
    doc["resources"]
        .as_array()
        .unwrap_or_else(|| panic!("{}/kustomization.yaml has no resources", dir.display()))
        .iter()
        .map(|r| r.as_str().expect("resource is a string").to_owned())
        .collect()
}

#[test]
fn kustomizations_name_existing_files_and_every_manifest() {
    // Every file reachable from the three kustomizations, each resource existing.
    let mut reached = BTreeSet::new();
    let mut pending = vec![deploy(), deploy().join("examples")];
    while let Some(dir) = pending.pop() {
        for resource in kustomization_resources(&dir) {
            let path = dir.join(&resource);
            assert!(
                path.exists(),
                "{}/kustomization.yaml names {resource}, which does not exist",
                dir.display()
            );
            if path.is_dir() {
                assert!(
                    path.join("kustomization.yaml").is_file(),
                    "{} is a directory without kustomization.yaml",
                    path.display()
                );
                pending.push(path);
            } else {
                reached.insert(path.canonicalize().expect("canonical path"));
            }
        }
    }
    for file in yaml_files(&deploy()) {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "kustomization.yaml" || name == "kind-config.yaml" {
            continue;
        }
        assert!(
            reached.contains(&file.canonicalize().expect("canonical path")),
            "{} is in deploy/ but no kustomization installs it",
            file.display()
        );
    }
    // The agent without the CRDs, for clusters where Istio installed them.
    let agent = kustomization_resources(&deploy().join("agent"));
    assert!(agent.iter().all(|r| !r.contains("crd")), "{agent:?}");
}

/// Every (group, resource, name or "", verb) a rule grants; wildcards refused.
fn grants(rules: &[PolicyRule]) -> BTreeSet<(String, String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert!(
            rule.non_resource_urls.is_none(),
            "discovery is granted by system:discovery; no nonResourceURLs: {rule:?}"
        );
        let names = rule
            .resource_names
            .clone()
            .unwrap_or_else(|| vec![String::new()]);
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                for name in &names {
                    for verb in &rule.verbs {
                        assert!(
                            group != "*" && resource != "*" && verb != "*",
                            "wildcards grant more than the agent uses: {rule:?}"
                        );
                        granted.insert((
                            group.clone(),
                            resource.clone(),
                            name.clone(),
                            verb.clone(),
                        ));
                    }
                }
            }
        }
    }
    granted
}

fn assert_exactly(
    what: &str,
    granted: &BTreeSet<(String, String, String, String)>,
    needed: &BTreeSet<(String, String, String, String)>,
) {
    let missing: Vec<_> = needed.difference(granted).collect();
    let extra: Vec<_> = granted.difference(needed).collect();
    assert!(
        missing.is_empty(),
        "{what}: the agent needs, RBAC lacks: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "{what}: RBAC grants what the agent does not use: {extra:?}"
    );
}

/// The ServiceAccount of the DaemonSet, as a binding's subjects must name it.
fn assert_binds_the_agent(subjects: Option<Vec<Subject>>) {
    let subjects = subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(subjects[0].name, "nodeward");
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
}

#[test]
fn rbac_grants_exactly_what_the_agent_uses() {
    let role: ClusterRole = parse_exact("ClusterRole nodeward", &object("ClusterRole", "nodeward"));
    let rules = role.rules.unwrap_or_default();
    assert!(
        rules.iter().all(|r| r.resource_names.is_none()),
        "the agent watches whole collections cluster-wide: {rules:?}"
    );
    let needed = AGENT_API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs.iter().map(|verb| {
                (
                    (*group).to_owned(),
                    (*resource).to_owned(),
                    String::new(),
                    (*verb).to_owned(),
                )
            })
        })
        .collect();
    assert_exactly("ClusterRole nodeward", &grants(&rules), &needed);

    let binding: ClusterRoleBinding = parse_exact(
        "ClusterRoleBinding nodeward",
        &object("ClusterRoleBinding", "nodeward"),
    );
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, "nodeward");
    assert_binds_the_agent(binding.subjects);
    let _: ServiceAccount = parse_exact("ServiceAccount", &object("ServiceAccount", "nodeward"));
    let pod = daemonset()
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    assert_eq!(pod.service_account_name.as_deref(), Some("nodeward"));
}

#[test]
fn rbac_reads_only_the_mesh_config_of_the_root_namespace() {
    // The agent's root namespace: the ConfigMap's setting, else the flag's default.
    let root = config()
        .get("NODEWARD_ROOT_NAMESPACE")
        .cloned()
        .unwrap_or_else(|| "istio-system".to_owned());
    let role: Role = parse_exact(
        "Role nodeward-mesh-config",
        &object("Role", "nodeward-mesh-config"),
    );
    assert_eq!(
        role.metadata.namespace.as_deref(),
        Some(root.as_str()),
        "the Role must be in the agent's root namespace"
    );
    let needed = AGENT_ROOT_NAMESPACE_ACCESS
        .iter()
        .flat_map(|(group, resource, name, verbs)| {
            verbs.iter().map(|verb| {
                (
                    (*group).to_owned(),
                    (*resource).to_owned(),
                    (*name).to_owned(),
                    (*verb).to_owned(),
                )
            })
        })
        .collect();
    assert_exactly(
        "Role nodeward-mesh-config",
        &grants(role.rules.as_deref().unwrap_or_default()),
        &needed,
    );

    let binding: RoleBinding = parse_exact(
        "RoleBinding nodeward-mesh-config",
        &object("RoleBinding", "nodeward-mesh-config"),
    );
    assert_eq!(binding.metadata.namespace.as_deref(), Some(root.as_str()));
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(binding.role_ref.name, "nodeward-mesh-config");
    assert_binds_the_agent(binding.subjects);

    // The agent's other objects all live in its own namespace: the Role and its binding are
    // the only ones in Istio's.
    for (origin, doc) in manifests() {
        if origin.starts_with("deploy/examples") || origin.starts_with("deploy/crds") {
            continue;
        }
        let namespace = doc["metadata"]["namespace"].as_str().unwrap_or_default();
        if doc["kind"] == "Role" || doc["kind"] == "RoleBinding" {
            assert_eq!(namespace, root, "{origin}");
        } else if !namespace.is_empty() {
            assert_eq!(namespace, NAMESPACE, "{origin}");
        }
    }
}

fn daemonset() -> DaemonSet {
    parse_exact("DaemonSet nodeward", &object("DaemonSet", "nodeward"))
}

fn agent_container(ds: &DaemonSet) -> Container {
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod spec");
    assert_eq!(pod.containers.len(), 1, "one container");
    pod.containers[0].clone()
}

fn config() -> BTreeMap<String, String> {
    let cm: ConfigMap = parse_exact("ConfigMap", &object("ConfigMap", "nodeward-config"));
    cm.data.unwrap_or_default()
}

/// A Go/humantime-style duration of whole seconds (`20s`, `1m`).
fn seconds(text: &str) -> i64 {
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: i64 = number.parse().unwrap_or_else(|_| panic!("duration {text}"));
    match unit {
        "s" | "" => n,
        "m" => n * 60,
        _ => panic!("duration {text}: unit {unit} not handled here"),
    }
}

#[test]
fn daemonset_runs_the_agent_as_the_contract_says() {
    let ds = daemonset();
    assert_eq!(ds.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = ds.spec.clone().expect("spec");
    let pod = spec.template.spec.clone().expect("pod spec");
    let c = agent_container(&ds);

    assert_eq!(
        pod.host_network,
        Some(true),
        "the programs and listener live in the node's netns"
    );
    assert_eq!(
        c.args.as_deref(),
        Some(&["run".to_owned(), "--kubernetes".to_owned()][..])
    );

    // NODE_NAME from the downward API.
    let env = c.env.clone().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    // Settings from the ConfigMap.
    let env_from = c.env_from.clone().unwrap_or_default();
    assert!(
        env_from.iter().any(|e| e
            .config_map_ref
            .as_ref()
            .is_some_and(|r| r.name == "nodeward-config")),
        "envFrom the ConfigMap: {env_from:?}"
    );

    // Rolling update one node at a time; time to drain on SIGTERM.
    let strategy = spec.update_strategy.expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.expect("rollingUpdate");
    assert_eq!(
        rolling.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );
    assert_eq!(
        rolling.max_surge,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
    );
    let drain = seconds(
        config()
            .get("NODEWARD_DRAIN_TIMEOUT")
            .map_or("20s", String::as_str),
    );
    let grace = pod
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace >= drain + 5,
        "grace period {grace}s must exceed the drain timeout {drain}s"
    );

    // Requests and limits for CPU and memory.
    let resources = c.resources.clone().expect("resources");
    for (what, list) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        let list = list.clone().unwrap_or_default();
        assert!(
            list.contains_key("cpu") && list.contains_key("memory"),
            "{what}: {list:?}"
        );
    }
}

#[test]
fn daemonset_has_exactly_the_capabilities_and_mounts_the_agent_needs() {
    let ds = daemonset();
    let pod = ds
        .spec
        .clone()
        .and_then(|s| s.template.spec)
        .expect("pod spec");
    let c = agent_container(&ds);
    // Capabilities: exactly the named ones, everything else dropped, not privileged.
    let sc = c.security_context.clone().expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps
        .add
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(String::as_str)
        .collect();
    assert_eq!(added, CAPABILITIES.iter().copied().collect());
    // The API server refuses `allowPrivilegeEscalation: false` with CAP_SYS_ADMIN added.
    assert_ne!(sc.allow_privilege_escalation, Some(false));

    // Mounts: the BPF filesystem (where the pins are) and the cgroup v2 root.
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path = |mount_path: &str| {
        let mount = mounts
            .iter()
            .find(|m| m.mount_path == mount_path)
            .unwrap_or_else(|| panic!("no mount at {mount_path}"));
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .expect("volume of the mount");
        (
            mount.clone(),
            volume.host_path.clone().expect("hostPath").path,
        )
    };
    let (bpffs, path) = host_path("/sys/fs/bpf");
    assert_eq!(path, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(bpffs.read_only, Some(true), "pins are written there");
    let (cgroup, path) = host_path("/sys/fs/cgroup");
    assert_eq!(path, "/sys/fs/cgroup");
    assert_eq!(cgroup.read_only, Some(true));
    // In-pod steering opens the pods' namespace files, including those of pods started later.
    let (netns, path) = host_path("/run/netns");
    assert_eq!(path, "/run/netns");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(netns.read_only, Some(true));
    let config = config();
    assert_eq!(config["NODEWARD_STEERING"], "in-pod");
    assert_eq!(config["NODEWARD_NETNS_DIR"], "/run/netns");

    assert!(
        config["NODEWARD_BPF_PIN_DIR"].starts_with("/sys/fs/bpf/"),
        "the pin dir must be on the mounted bpffs"
    );
}

#[test]
fn probes_point_at_the_admin_port() {
    let config = config();
    let admin: std::net::SocketAddr = config["NODEWARD_ADMIN"]
        .parse()
        .expect("NODEWARD_ADMIN is ip:port");
    assert!(
        admin.ip().is_loopback(),
        "the admin server has no authentication: keep it on loopback"
    );
    let c = agent_container(&daemonset());
    for (which, probe, path) in [
        ("liveness", &c.liveness_probe, "/healthz"),
        ("readiness", &c.readiness_probe, "/readyz"),
        ("startup", &c.startup_probe, "/healthz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .unwrap_or_else(|| panic!("{which} probe is an httpGet"));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(admin.port())),
            "{which} probe port"
        );
        // hostNetwork: the kubelet probes the node IP unless told otherwise; the admin server
        // listens on the node's loopback only.
        assert_eq!(
            get.host.as_deref(),
            Some(admin.ip().to_string().as_str()),
            "{which} probe host"
        );
        assert_eq!(get.path.as_deref(), Some(path), "{which} probe path");
    }
    let ports = c.ports.unwrap_or_default();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("admin")
                && p.container_port == i32::from(admin.port()))
    );
}

#[test]
fn image_names_agree() {
    let kustomization = &documents(&deploy().join("agent/kustomization.yaml"))[0];
    let entry = &kustomization["images"][0];
    let name = entry["name"].as_str().expect("images[0].name");
    let built = format!(
        "{}:{}",
        entry["newName"].as_str().unwrap_or(name),
        entry["newTag"].as_str().expect("images[0].newTag")
    );
    let c = agent_container(&daemonset());
    let image = c.image.clone().expect("image");
    let (image_name, _) = image.rsplit_once(':').unwrap_or((&image, ""));
    assert_eq!(
        image_name, name,
        "the kustomization's images entry must name the DaemonSet's image"
    );
    assert_eq!(
        image, built,
        "the DaemonSet names the image the kustomization deploys"
    );

    let build_command = format!("docker build -f deploy/Dockerfile -t {built} .");
    let dockerfile = std::fs::read_to_string(deploy().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains(&build_command),
        "deploy/Dockerfile documents `{build_command}`"
    );
    let readme = std::fs::read_to_string(deploy().join("README.md")).expect("deploy/README.md");
    assert!(
        readme.contains(&build_command),
        "deploy/README.md says `{build_command}`"
    );
    assert!(
        readme.contains(&format!("kind load docker-image {built}")),
        "deploy/README.md loads {built}"
    );

    // The binary the DaemonSet runs is where the image puts it.
    let command = c.command.unwrap_or_default();
    let binary = command.first().expect("command");
    assert!(
        dockerfile.contains(&format!("ENTRYPOINT [\"{binary}\"]")),
        "deploy/Dockerfile's ENTRYPOINT is {binary}"
    );
    assert!(dockerfile.contains(&format!("COPY --from=build /out/nodeward {binary}")));
}

#[test]
fn configmap_sets_only_flags_the_agent_has() {
    let out = Command::new(nodeward_bin())
        .args(["run", "--help"])
        .output()
        .expect("nodeward runs");
    assert!(out.status.success(), "nodeward run --help failed");
    let help = String::from_utf8_lossy(&out.stdout);
    let known: BTreeSet<&str> = help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split('=').next())
        .collect();
    assert!(
        known.contains("NODEWARD_ADMIN"),
        "--help lists env vars: {known:?}"
    );
    for (key, value) in config() {
        if key == "NODEWARD_LOG" {
            continue; // the log filter, not a flag
        }
        assert!(
            known.contains(key.as_str()),
            "ConfigMap key {key} is no `nodeward run` flag's variable: {known:?}"
        );
        assert!(!value.is_empty(), "{key} is empty");
    }
}

/// Istio's plural resource name of `kind`.
fn plural(kind: &str) -> String {
    match kind {
        "AuthorizationPolicy" => "authorizationpolicies".to_owned(),
        "RequestAuthentication" => "requestauthentications".to_owned(),
        other => panic!("{other} is not a security.istio.io kind nodeward reads"),
    }
}

/// The CRD of `kind` (AuthorizationPolicy or RequestAuthentication), as JSON.
fn crd(kind: &str) -> Value {
    let plural = plural(kind);
    let doc = object(
        "CustomResourceDefinition",
        &format!("{plural}.security.istio.io"),
    );
    let _: CustomResourceDefinition = parse_exact(kind, &doc);
    doc
}

#[test]
fn crds_have_istios_names_versions_and_columns() {
    for (kind, short, columns) in [
        (
            "AuthorizationPolicy",
            "ap",
            vec![
                ("Action", ".spec.action"),
                ("Age", ".metadata.creationTimestamp"),
            ],
        ),
        ("RequestAuthentication", "ra", vec![]),
    ] {
        let c: CustomResourceDefinition = serde_json::from_value(crd(kind)).expect("CRD");
        let plural = plural(kind);
        assert_eq!(c.spec.group, "security.istio.io");
        assert_eq!(c.spec.scope, "Namespaced");
        assert_eq!(c.spec.names.kind, kind);
        assert_eq!(
            c.spec.names.list_kind.as_deref(),
            Some(format!("{kind}List").as_str())
        );
        assert_eq!(c.spec.names.plural, plural);
        assert_eq!(
            c.spec.names.singular.as_deref(),
            Some(kind.to_lowercase().as_str())
        );
        assert_eq!(c.spec.names.short_names, Some(vec![short.to_owned()]));
        assert_eq!(
            c.spec.names.categories,
            Some(vec!["istio-io".to_owned(), "security-istio-io".to_owned()])
        );
        // Istio: v1 and v1beta1 served, v1beta1 stored, same schema.
        let versions: Vec<(&str, bool, bool)> = c
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.served, v.storage))
            .collect();
        assert_eq!(
            versions,
            vec![("v1", true, false), ("v1beta1", true, true)],
            "{kind}"
        );
        let schemas: Vec<Value> = c
            .spec
            .versions
            .iter()
            .map(|v| serde_json::to_value(&v.schema).expect("schema"))
            .collect();
        assert_eq!(schemas[0], schemas[1], "{kind}: versions share one schema");
        for v in &c.spec.versions {
            assert!(
                v.subresources.as_ref().is_some_and(|s| s.status.is_some()),
                "{kind} {}: status subresource",
                v.name
            );
            let got: Vec<(String, String)> = v
                .additional_printer_columns
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|c| (c.name, c.json_path))
                .collect();
            let want: Vec<(String, String)> = columns
                .iter()
                .map(|(n, p)| ((*n).to_owned(), (*p).to_owned()))
                .collect();
            assert_eq!(got, want, "{kind} {}: printer columns", v.name);
        }
        let mut untyped = Vec::new();
        untyped_fields(&schemas[0]["openAPIV3Schema"], "", &mut untyped);
        assert!(
            untyped.is_empty(),
            "{kind}: structural schemas type every field: {untyped:?}"
        );
    }
}

/// Structural-schema rule (partly): every node under `properties`, `items` and
/// `additionalProperties` has a `type`, unless it is int-or-string or preserves unknown fields.
fn untyped_fields(schema: &Value, path: &str, out: &mut Vec<String>) {
    let exempt = schema["x-kubernetes-int-or-string"] == true
        || schema["x-kubernetes-preserve-unknown-fields"] == true;
    if schema.get("type").is_none() && !exempt {
        out.push(if path.is_empty() {
            "<root>".to_owned()
        } else {
            path.to_owned()
        });
    }
    if let Some(props) = schema["properties"].as_object() {
        for (name, sub) in props {
            untyped_fields(sub, &format!("{path}.{name}"), out);
        }
    }
    if schema["items"].is_object() {
        untyped_fields(&schema["items"], &format!("{path}[]"), out);
    }
    if schema["additionalProperties"].is_object() {
        untyped_fields(&schema["additionalProperties"], &format!("{path}.*"), out);
    }
}

/// Fields of `value` the schema does not declare: the API server prunes them (or refuses them
/// under strict field validation, kubectl's default). apiVersion, kind and metadata are the API
/// server's own at the root.
fn unknown_fields(schema: &Value, value: &Value, path: &str, out: &mut Vec<String>) {
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == true;
    match value {
        Value::Object(map) => {
            for (key, sub) in map {
                let here = format!("{path}.{key}");
                if let Some(declared) = schema["properties"].get(key) {
                    unknown_fields(declared, sub, &here, out);
                } else if schema["additionalProperties"].is_object() {
                    unknown_fields(&schema["additionalProperties"], sub, &here, out);
                } else if !(preserve
                    || path.is_empty()
                        && ["apiVersion", "kind", "metadata"].contains(&key.as_str()))
                {
                    out.push(here);
                }
            }
        }
        Value::Array(items) if schema["items"].is_object() => {
            for (i, item) in items.iter().enumerate() {
                unknown_fields(&schema["items"], item, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// What the CRD schema says about `policy`: one line per error (empty: accepted). The version
/// of its apiVersion must be served.
fn schema_errors(policy: &Value) -> Vec<String> {
    let kind = policy["kind"].as_str().expect("kind");
    let version = policy["apiVersion"]
        .as_str()
        .and_then(|v| v.strip_prefix("security.istio.io/"))
        .expect("apiVersion security.istio.io/...");
    let crd = crd(kind);
    let entry = crd["spec"]["versions"]
        .as_array()
        .expect("versions")
        .iter()
        .find(|v| v["name"] == version && v["served"] == true)
        .unwrap_or_else(|| panic!("{kind} {version} is not served"));
    let schema = &entry["schema"]["openAPIV3Schema"];
    let validator = jsonschema::draft4::new(schema).expect("the CRD schema is a valid JSON schema");
    let mut errors: Vec<String> = validator
        .iter_errors(policy)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect();
    let mut unknown = Vec::new();
    unknown_fields(schema, policy, "", &mut unknown);
    errors.extend(unknown.into_iter().map(|f| format!("{f}: unknown field")));
    errors
}

/// Every policy of examples/policies/ and deploy/examples/, with where it came from.
fn example_policies() -> Vec<(String, Value)> {
    let mut files = yaml_files(&repo_root().join("examples/policies"));
    files.push(deploy().join("examples/policies.yaml"));
    files
        .iter()
        .flat_map(|path| {
            documents(path)
                .into_iter()
                .enumerate()
                .map(move |(i, doc)| (format!("{} document {}", path.display(), i + 1), doc))
        })
        .collect()
}

#[test]
fn crd_schemas_accept_every_example_policy() {
    let policies = example_policies();
    assert!(
        policies.len() >= 10,
        "examples/policies and deploy/examples: {}",
        policies.len()
    );
    for (origin, policy) in policies {
        let errors = schema_errors(&policy);
        assert!(
            errors.is_empty(),
            "{origin} is refused by its CRD schema: {errors:#?}"
        );
        // And by the other served version, as a client of either version would write it.
        let mut other = policy.clone();
        let swapped = if policy["apiVersion"] == "security.istio.io/v1" {
            "security.istio.io/v1beta1"
        } else {
            "security.istio.io/v1"
        };
        other["apiVersion"] = swapped.into();
        let errors = schema_errors(&other);
        assert!(errors.is_empty(), "{origin} as {swapped}: {errors:#?}");
    }
}

#[test]
fn deploy_examples_hold_the_examples_policies() {
    let mut reference: Vec<Value> = yaml_files(&repo_root().join("examples/policies"))
        .iter()
        .flat_map(|p| documents(p))
        .collect();
    let mut cluster = documents(&deploy().join("examples/policies.yaml"));
    let key = |v: &Value| {
        format!(
            "{}/{}/{}",
            v["kind"], v["metadata"]["namespace"], v["metadata"]["name"]
        )
    };
    reference.sort_by_key(key);
    cluster.sort_by_key(key);
    assert_eq!(
        cluster, reference,
        "deploy/examples/policies.yaml drifted from examples/policies/"
    );
}

/// A valid AuthorizationPolicy or RequestAuthentication with `spec` replaced.
fn policy(kind: &str, spec: &str) -> Value {
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: bad, namespace: foo}}\nspec:\n{spec}"
    );
    let value: serde_yaml::Value =
        serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
    serde_json::to_value(value).expect("JSON")
}

/// Malformed policies, each with the rule of Istio's CRD it breaks and where the error must be
/// reported: (kind, spec, rule, error location).
const MALFORMED: &[(&str, &str, &str, &str)] = &[
    (
        "AuthorizationPolicy",
        "  action: PERMIT\n",
        "action is one of ALLOW, DENY, AUDIT, CUSTOM",
        "/spec/action:",
    ),
    (
        "AuthorizationPolicy",
        "  rules: {from: []}\n",
        "rules is a list",
        "/spec/rules:",
    ),
    (
        "AuthorizationPolicy",
        "  rules:\n  - when:\n    - values: [a]\n",
        "a condition needs a key",
        "/spec/rules/0/when/0:",
    ),
    (
        "AuthorizationPolicy",
        "  rules:\n  - from:\n    - source:\n        serviceAccounts: [a,b,c,d,e,f,g,h,i,j,k,l,m,n,o,p,q]\n",
        "at most 16 serviceAccounts",
        "/spec/rules/0/from/0/source/serviceAccounts:",
    ),
    (
        "AuthorizationPolicy",
        "  rules:\n  - form:\n    - source: {principals: ['*']}\n",
        "no unknown fields (`form`, a typo of `from`): pruned by the API server, refused by strict validation",
        ".spec.rules[0].form: unknown field",
    ),
    (
        "AuthorizationPolicy",
        "  selector: {matchLabels: {app: 7}}\n",
        "label values are strings",
        "/spec/selector/matchLabels/app:",
    ),
    (
        "AuthorizationPolicy",
        "  targetRef: {kind: Service}\n",
        "a targetRef needs a name",
        "/spec/targetRef:",
    ),
    (
        "AuthorizationPolicy",
        "  action: CUSTOM\n  provider: {name: ext, timeout: 1s}\n",
        "provider has only a name",
        ".spec.provider.timeout: unknown field",
    ),
    (
        "RequestAuthentication",
        "  jwtRules:\n  - issuer: a\n    jwksUri: ''\n",
        "jwksUri is not empty",
        "/spec/jwtRules/0/jwksUri:",
    ),
    (
        "RequestAuthentication",
        "  jwtRules:\n  - issuer: a\n    fromHeaders: [{prefix: 'Bearer '}]\n",
        "a header location needs a name",
        "/spec/jwtRules/0/fromHeaders/0:",
    ),
    (
        "RequestAuthentication",
        "  jwtRules:\n  - issuer: a\n    outputClaimToHeaders: [{header: 'x bad', claim: sub}]\n",
        "header names are tokens",
        "/spec/jwtRules/0/outputClaimToHeaders/0/header:",
    ),
    (
        "RequestAuthentication",
        "  jwtRules:\n  - issuer: a\n    forwardOriginalToken: 'yes'\n",
        "forwardOriginalToken is a boolean",
        "/spec/jwtRules/0/forwardOriginalToken:",
    ),
    (
        "RequestAuthentication",
        "  jwtRules:\n  - issuer: ''\n",
        "issuer is not empty",
        "/spec/jwtRules/0/issuer:",
    ),
];

#[test]
fn crd_schemas_reject_malformed_policies() {
    for (kind, spec, rule, location) in MALFORMED {
        let errors = schema_errors(&policy(kind, spec));
        assert!(
            errors.iter().any(|e| e.starts_with(location)),
            "{kind}: {rule}; expected an error at {location}, got {errors:?} for:\n{spec}"
        );
    }
}

/// Rules Istio's CRDs state in CEL, which `jsonschema` does not evaluate: the schema accepts
/// these, and the agent's own validation refuses them (exit 2 of `nodeward check`), so a policy
/// a cluster would refuse is never enforced differently by the agent.
const CEL_ONLY: &[(&str, &str, &str)] = &[
    (
        "AuthorizationPolicy",
        "  selector: {matchLabels: {app: 'http*'}}\n",
        "wildcard not allowed in label value match",
    ),
    (
        "AuthorizationPolicy",
        "  selector: {matchLabels: {app: a}}\n  targetRef: {kind: Service, name: a}\n",
        "only one of targetRefs or selector can be set",
    ),
    (
        "RequestAuthentication",
        "  jwtRules:\n  - issuer: a\n    jwks: '{\"keys\": []}'\n    jwksUri: https://example.com/jwks\n",
        "only one of jwks or jwksUri can be set",
    ),
];

#[test]
fn cel_only_rules_are_enforced_by_the_agent() {
    let dir = TempDir::new("deploy-cel");
    for (i, (kind, spec, rule)) in CEL_ONLY.iter().enumerate() {
        let value = policy(kind, spec);
        assert!(
            schema_errors(&value).is_empty(),
            "the JSON schema alone accepts this ({rule})"
        );
        let file = dir.join(format!("{i}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(&value).expect("YAML")).expect("write");
        let out = Command::new(nodeward_bin())
            .args(["check", "--policies"])
            .arg(&file)
            .args(["--namespace", "foo", "--labels", "app=a"])
            .output()
            .expect("nodeward check runs");
        assert_eq!(
            out.status.code(),
            Some(2),
            "nodeward check must refuse a policy breaking `{rule}`: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn deploy_examples_run_the_workloads_of_examples() {
    // examples/workloads.yaml (standalone registry) and deploy/examples/workloads.yaml (the
    // cluster's Deployments) describe the same pods: name, namespace, service account, labels.
    let registry = &documents(&repo_root().join("examples/workloads.yaml"))[0]["workloads"];
    let deployments: Vec<Value> = documents(&deploy().join("examples/workloads.yaml"))
        .into_iter()
        .filter(|d| d["kind"] == "Deployment")
        .collect();
    let registry = registry.as_array().expect("workloads list");
    assert_eq!(
        deployments.len(),
        registry.len(),
        "one Deployment per workload"
    );
    for workload in registry {
        let name = workload["name"].as_str().expect("name");
        let deployment = deployments
            .iter()
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("deploy/examples has no Deployment {name}"));
        let typed: Deployment = parse_exact(name, deployment);
        assert_eq!(
            typed.metadata.namespace.as_deref(),
            workload["namespace"].as_str()
        );
        let pod = typed.spec.expect("spec").template;
        let labels = serde_json::to_value(pod.metadata.and_then(|m| m.labels)).expect("labels");
        assert_eq!(labels, workload["labels"], "{name}: labels");
        let spec = pod.spec.expect("pod spec");
        assert_eq!(
            spec.service_account_name.as_deref(),
            workload["serviceAccount"].as_str(),
            "{name}: service account"
        );
        // guard drops the node's own connections to protected pods: no kubelet network probes.
        for c in &spec.containers {
            assert!(
                c.liveness_probe.is_none()
                    && c.readiness_probe.is_none()
                    && c.startup_probe.is_none(),
                "{name}: kubelet probes would be dropped by guard"
            );
        }
    }
}
