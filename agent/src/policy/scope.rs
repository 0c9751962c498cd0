//! Which objects are in scope of a workload, for both kinds. Istio: a policy in the root
//! namespace "applies to all namespaces in a mesh"; otherwise to its own namespace; a selector
//! narrows it to workloads whose labels contain every `matchLabels` entry.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// Istio's default root namespace: policies there apply to every namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The objects of the root namespace, then those of `namespace` (once when they are the same).
pub fn in_scope<'a, T, S: BuildHasher>(
    by_namespace: &'a HashMap<String, Vec<T>, S>,
    root_namespace: &str,
    namespace: &str,
) -> impl Iterator<Item = &'a T> {
    let root = (namespace != root_namespace)
        .then(|| by_namespace.get(root_namespace))
        .flatten()
        .into_iter()
        .flatten();
    root.chain(by_namespace.get(namespace).into_iter().flatten())
}

/// No selector selects every workload; a selector needs each of its labels.
#[must_use]
pub fn selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}
