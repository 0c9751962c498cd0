//! `security.istio.io` objects from the API server: which version to watch (discovery: `v1`,
//! else `v1beta1`) and the translation of an object into the policy model.
//!
//! Translation keeps what the model reads (`apiVersion`, `kind`, `metadata.name`,
//! `metadata.namespace`, `metadata.annotations` such as `istio.io/dry-run`,
//! `metadata.labels`, `spec`) and drops the rest (`status`, `managedFields`, `uid`,
//! `resourceVersion`, ...), then runs the same schema and validation as a policy file
//! ([`crate::policy::load_object`]): an invalid object gets the same error, naming
//! `namespace/name` and the field.
//!
//! Unknown fields in `spec`: Istio's CRDs are structural, so the API server prunes or refuses
//! fields its schema does not know (depending on the client's field validation); a field
//! unknown to nodeward that still arrives comes from a newer Istio schema. Like a policy file,
//! such an object is invalid (reported, its last good version kept): a field silently ignored
//! could widen an ALLOW rule.

use std::path::PathBuf;

use kube::core::{ApiResource, DynamicObject};
use kube::discovery::ApiGroup;
use kube::Client;
use serde_json::{json, Map, Value};

use crate::policy::load::{GROUP, VERSIONS};
use crate::policy::{load_object, AuthorizationPolicy, LoadError, Origin, RequestAuthentication};

/// The two kinds nodeward watches.
pub const KINDS: [&str; 2] = ["AuthorizationPolicy", "RequestAuthentication"];

/// A translated, valid policy object of either kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    Authorization(AuthorizationPolicy),
    Authentication(RequestAuthentication),
}

/// The served resources of both kinds, at one version.
#[derive(Debug, Clone)]
pub struct PolicyApis {
    /// `v1` or `v1beta1`.
    pub version: String,
    pub authorization: ApiResource,
    pub authentication: ApiResource,
}

/// Why the policy resources cannot be watched (yet).
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The API server could not be asked.
    #[error("discovery of {GROUP} failed: {0}")]
    Api(#[source] kube::Error),
    /// The group is not served: Istio's CRDs are not installed.
    #[error("{GROUP} is not served by the API server: install Istio's CRDs (AuthorizationPolicy, RequestAuthentication)")]
    NotServed,
    /// The group is served, but not both kinds at `v1` or `v1beta1`.
    #[error("{GROUP} serves neither v1 nor v1beta1 with both AuthorizationPolicy and RequestAuthentication (versions served: {0})")]
    NoVersion(String),
}

/// Picks `v1` when the group serves both kinds there, else `v1beta1`.
pub async fn discover(client: &Client) -> Result<PolicyApis, DiscoveryError> {
    let group = match kube::discovery::group(client, GROUP).await {
        Ok(group) => group,
        Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => {
            return Err(DiscoveryError::NotServed)
        }
        Err(e) => return Err(DiscoveryError::Api(e)),
    };
    choose(&group)
}

fn choose(group: &ApiGroup) -> Result<PolicyApis, DiscoveryError> {
    for version in VERSIONS {
        let resources = group.versioned_resources(version);
        let find = |kind: &str| {
            resources
                .iter()
                .find(|(resource, _)| resource.kind == kind)
                .map(|(resource, _)| resource.clone())
        };
        if let (Some(authorization), Some(authentication)) = (find(KINDS[0]), find(KINDS[1])) {
            return Ok(PolicyApis {
                version: version.to_owned(),
                authorization,
                authentication,
            });
        }
    }
    Err(DiscoveryError::NoVersion(
        group.versions().collect::<Vec<_>>().join(", "),
    ))
}

/// Where objects from the API server come from, in error messages and `/debug/state`.
#[must_use]
pub fn origin(resource: &ApiResource) -> Origin {
    Origin {
        file: PathBuf::from(format!("kubernetes:{}", resource.api_version)),
        document: 0,
    }
}

/// The model's view of an API object: the fields it reads, nothing else.
fn projection(object: &DynamicObject, resource: &ApiResource) -> Value {
    let meta = &object.metadata;
    let mut metadata = Map::new();
    metadata.insert("name".into(), json!(meta.name.clone().unwrap_or_default()));
    if let Some(namespace) = &meta.namespace {
        metadata.insert("namespace".into(), json!(namespace));
    }
    if let Some(annotations) = &meta.annotations {
        // `kubectl apply` keeps a copy of the whole object here: not the model's business.
        let kept: Map<String, Value> = annotations
            .iter()
            .filter(|(k, _)| *k != "kubectl.kubernetes.io/last-applied-configuration")
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        metadata.insert("annotations".into(), Value::Object(kept));
    }
    if let Some(labels) = &meta.labels {
        metadata.insert("labels".into(), json!(labels));
    }
    let mut out = Map::new();
    out.insert("apiVersion".into(), json!(resource.api_version));
    out.insert("kind".into(), json!(resource.kind));
    out.insert("metadata".into(), Value::Object(metadata));
    if let Some(spec) = object.data.get("spec") {
        out.insert("spec".into(), spec.clone());
    }
    Value::Object(out)
}

/// An API object into the policy model, validated as a policy file's object is.
pub fn translate(object: &DynamicObject, resource: &ApiResource) -> Result<Policy, Vec<LoadError>> {
    let value = match serde_yaml::to_value(projection(object, resource)) {
        Ok(value) => value,
        // JSON always converts; kept as an error rather than a panic on outside input.
        Err(source) => {
            return Err(vec![LoadError::Yaml {
                origin: origin(resource),
                source,
            }])
        }
    };
    let mut loaded = load_object(origin(resource), value);
    if !loaded.errors.is_empty() {
        return Err(loaded.errors);
    }
    if let Some(policy) = loaded.authorization_policies.pop() {
        return Ok(Policy::Authorization(policy));
    }
    if let Some(policy) = loaded.request_authentications.pop() {
        return Ok(Policy::Authentication(policy));
    }
    // Discovery only hands out the two kinds; anything else is skipped by the loader.
    Err(Vec::new())
}

/// The `field: problem` part of load errors, for an Event's note.
#[must_use]
pub fn note(errors: &[LoadError]) -> String {
    let parts: Vec<String> = errors
        .iter()
        .map(|e| match e {
            LoadError::Invalid { field, problem, .. } => format!("{field}: {problem}"),
            other => other.to_string(),
        })
        .collect();
    if parts.is_empty() {
        "not an AuthorizationPolicy or RequestAuthentication".to_owned()
    } else {
        parts.join("; ")
    }
}
