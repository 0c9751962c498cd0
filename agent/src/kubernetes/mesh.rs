//! Istio's `MeshConfig` in Kubernetes mode, read where istiod reads it: the `mesh` key of
//! `ConfigMap` `istio` in the root namespace. Its `extensionProviders` are the external
//! authorizers CUSTOM policies call (parsed and validated by [`crate::extauthz::MeshProviders`],
//! as `--mesh-config` is in standalone mode).
//!
//! - One object is watched: a namespaced watch of the root namespace with the field selector
//!   `metadata.name=istio`, so the agent needs to read `ConfigMap`s of that namespace only.
//! - A `mesh` value that is not a `MeshConfig` (bad YAML, a field of the wrong type) is
//!   reported and the last good providers keep serving, as istiod keeps its last good mesh.
//!   Invalid providers are reported one problem per line; CUSTOM policies naming them deny
//!   what their rules match, the other providers serve.
//! - No `ConfigMap` (never created, or deleted), or one without a `mesh` key, is Istio's
//!   default `MeshConfig`: no extension providers, so CUSTOM policies deny what their rules
//!   match (Istio's undefined provider). That is not an error, and the agent does not wait
//!   for it to be ready (see [`super::health::MESH_CONFIG`]).
//!
//! Istio's revisioned `ConfigMap`s (`istio-<revision>`) and the `istio-user` overlay are not
//! read.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::watcher;
use kube::{Resource as _, ResourceExt as _};
use tracing::{debug, info, warn};

use super::events::{self, Report};
use crate::extauthz::MeshProviders;

/// The `ConfigMap`'s name.
pub const CONFIG_MAP: &str = "istio";
/// The key holding the `MeshConfig` YAML.
pub const KEY: &str = "mesh";

/// The watch: the one `ConfigMap` named [`CONFIG_MAP`] (the caller makes the `Api` namespaced
/// to the root namespace).
#[must_use]
pub fn watcher_config() -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={CONFIG_MAP}"))
}

/// The `MeshConfig` as the source keeps it: the providers in force (from the last `mesh` value
/// that parsed) and the current problems.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshEntry {
    pub in_force: Arc<MeshProviders>,
    /// The operator's sentences, as in `Snapshot::errors`.
    pub errors: Vec<String>,
    /// The problem last reported as an Event.
    note: Option<String>,
}

/// Projects the `ConfigMap` (`root_namespace`/[`CONFIG_MAP`]; any other object is not kept): its
/// providers, or, when its `mesh` does not parse, the providers of the version in force. A new
/// problem is logged and queued as an `InvalidMeshConfig` Event on the `ConfigMap`.
pub fn project(
    config_map: &ConfigMap,
    root_namespace: &str,
    previous: Option<&MeshEntry>,
    reports: &mut Vec<Report>,
) -> Option<MeshEntry> {
    let id = format!(
        "{}/{}",
        config_map.namespace().unwrap_or_default(),
        config_map.name_any()
    );
    if id != format!("{root_namespace}/{CONFIG_MAP}") {
        debug!(config_map = %id, "not the MeshConfig: not kept");
        return None;
    }
    let origin = format!("ConfigMap {id} key {KEY}");
    let text = config_map
        .data
        .as_ref()
        .and_then(|data| data.get(KEY))
        .map_or("", String::as_str);
    let mut errors = Vec::new();
    let in_force = match MeshProviders::parse(&origin, text) {
        Ok(mesh) => Arc::new(mesh),
        Err(error) => {
            if let Some(previous) = previous {
                errors.push(format!(
                    "{error}; the last good extension providers keep serving"
                ));
                Arc::clone(&previous.in_force)
            } else {
                errors.push(format!(
                    "{error}; no extension provider is defined until it parses: CUSTOM policies deny the requests they match"
                ));
                Arc::default()
            }
        }
    };
    errors.extend(in_force.problems().into_iter().map(|problem| {
        format!("{origin}: {problem}; CUSTOM policies naming it deny the requests they match")
    }));
    let note = (!errors.is_empty()).then(|| errors.join("; "));
    if previous.map(|p| &p.in_force) != Some(&in_force) {
        let providers: Vec<&String> = in_force.providers.keys().collect();
        info!(config_map = %id, ?providers, "MeshConfig extension providers read");
    }
    match &note {
        Some(note) if previous.and_then(|p| p.note.as_ref()) == Some(note) => {
            debug!(config_map = %id, "still invalid: {note}");
        }
        Some(note) => {
            for message in &errors {
                warn!(config_map = %id, "{message}");
            }
            reports.push(Report {
                reference: config_map.object_ref(&()),
                reason: events::INVALID_MESH_CONFIG,
                note: note.clone(),
            });
        }
        None => {}
    }
    Some(MeshEntry {
        in_force,
        errors,
        note,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::extauthz::mesh::Entry;

    fn config_map(namespace: &str, name: &str, mesh: Option<&str>) -> ConfigMap {
        let mut config_map = ConfigMap::default();
        config_map.metadata.namespace = Some(namespace.to_owned());
        config_map.metadata.name = Some(name.to_owned());
        config_map.metadata.uid = Some(format!("uid-{name}"));
        config_map.data = mesh.map(|m| BTreeMap::from([(KEY.to_owned(), m.to_owned())]));
        config_map
    }

    const GOOD: &str = "extensionProviders:\n- name: ext\n  envoyExtAuthzGrpc: {service: ext.foo.svc.cluster.local, port: 9000}\n";

    fn names(entry: &MeshEntry) -> Vec<&str> {
        entry
            .in_force
            .providers
            .keys()
            .map(String::as_str)
            .collect()
    }

    #[test]
    fn a_bad_edit_keeps_the_last_good_providers_and_reports_once() {
        let mut reports = Vec::new();
        let good = project(
            &config_map("istio-system", "istio", Some(GOOD)),
            "istio-system",
            None,
            &mut reports,
        )
        .expect("kept");
        assert_eq!(names(&good), ["ext"]);
        assert!(good.errors.is_empty() && reports.is_empty());

        let bad = config_map(
            "istio-system",
            "istio",
            Some("extensionProviders: {not: a list}"),
        );
        let kept = project(&bad, "istio-system", Some(&good), &mut reports).expect("kept");
        assert_eq!(
            names(&kept),
            ["ext"],
            "the last good providers keep serving"
        );
        assert_eq!(kept.errors.len(), 1, "{:?}", kept.errors);
        assert!(
            kept.errors[0].starts_with(
                "ConfigMap istio-system/istio key mesh: not a MeshConfig: extensionProviders"
            ) && kept.errors[0].ends_with("the last good extension providers keep serving"),
            "{:?}",
            kept.errors
        );
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].reason, "InvalidMeshConfig");
        assert_eq!(reports[0].reference.kind.as_deref(), Some("ConfigMap"));
        assert_eq!(reports[0].reference.name.as_deref(), Some("istio"));

        // The same problem again (a resync, a relist): no second Event.
        let again = project(&bad, "istio-system", Some(&kept), &mut reports).expect("kept");
        assert_eq!(again, kept);
        assert_eq!(reports.len(), 1);
    }

    #[test]
    fn without_a_good_version_a_bad_mesh_defines_no_provider() {
        let mut reports = Vec::new();
        let entry = project(
            &config_map("istio-system", "istio", Some("- a list")),
            "istio-system",
            None,
            &mut reports,
        )
        .expect("kept");
        assert!(entry.in_force.providers.is_empty());
        assert!(
            entry.errors[0].contains("no extension provider is defined until it parses"),
            "{:?}",
            entry.errors
        );
        assert_eq!(reports.len(), 1);
    }

    #[test]
    fn invalid_providers_are_listed_and_the_others_serve() {
        let mut reports = Vec::new();
        let mesh = format!("{GOOD}- name: broken\n  envoyExtAuthzHttp: {{service: ext.foo.svc.cluster.local, port: 70000}}\n");
        let entry = project(
            &config_map("istio-system", "istio", Some(&mesh)),
            "istio-system",
            None,
            &mut reports,
        )
        .expect("kept");
        assert!(matches!(
            entry.in_force.providers.get("ext"),
            Some(Entry::Ready(_))
        ));
        assert!(matches!(
            entry.in_force.providers.get("broken"),
            Some(Entry::Invalid(_))
        ));
        assert_eq!(entry.errors.len(), 1, "{:?}", entry.errors);
        assert!(
            entry.errors[0].starts_with("ConfigMap istio-system/istio key mesh: extension provider \"broken\": extensionProviders[1].envoyExtAuthzHttp.port")
                && entry.errors[0].ends_with("CUSTOM policies naming it deny the requests they match"),
            "{:?}",
            entry.errors
        );
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].note, entry.errors[0]);
    }

    #[test]
    fn no_mesh_key_is_the_default_mesh_config_and_other_objects_are_not_kept() {
        let mut reports = Vec::new();
        let entry = project(
            &config_map("istio-system", "istio", None),
            "istio-system",
            None,
            &mut reports,
        )
        .expect("kept");
        assert!(entry.in_force.providers.is_empty() && entry.errors.is_empty());
        for (namespace, name) in [("foo", "istio"), ("istio-system", "istio-sidecar-injector")] {
            assert_eq!(
                project(
                    &config_map(namespace, name, Some(GOOD)),
                    "istio-system",
                    None,
                    &mut reports
                ),
                None,
                "{namespace}/{name}"
            );
        }
        assert!(reports.is_empty());
    }
}
