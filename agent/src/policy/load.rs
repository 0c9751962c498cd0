//! Reading policy YAML: files and directories, multi-document streams, `kind: List`.
//!
//! Every document is looked at on its own, so one malformed object is reported (with file,
//! document number, `namespace/name` and field) and the others still load.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::model::{AuthorizationPolicySpec, ObjectMeta, RequestAuthenticationSpec};
use super::validate::{self, Problem};

/// The API group both kinds live in.
pub const GROUP: &str = "security.istio.io";
/// The versions read; `v1` and `v1beta1` share one schema.
pub const VERSIONS: [&str; 2] = ["v1", "v1beta1"];

/// Where an object came from: a file and its 1-based document number, or (document 0) a
/// source that is not a file, such as `kubernetes:security.istio.io/v1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Origin {
    pub file: PathBuf,
    pub document: usize,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.document == 0 {
            return write!(f, "{}", self.file.display());
        }
        write!(f, "{} (document {})", self.file.display(), self.document)
    }
}

/// A parsed, validated object of one of the two kinds.
#[derive(Debug, Clone, PartialEq)]
pub struct Object<S> {
    pub origin: Origin,
    pub api_version: String,
    pub metadata: ObjectMeta,
    pub spec: S,
}

impl<S> Object<S> {
    /// `metadata.namespace`, `default` when the file leaves it out.
    #[must_use]
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    /// `namespace/name`, the way errors and decisions name an object.
    #[must_use]
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }
}

pub type AuthorizationPolicy = Object<AuthorizationPolicySpec>;
pub type RequestAuthentication = Object<RequestAuthenticationSpec>;

/// A document that is not one of the two kinds; reported as a notice, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub origin: Origin,
    pub api_version: String,
    pub kind: String,
    pub name: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: skipped {} {} ({}): nodeward reads only {GROUP} AuthorizationPolicy and RequestAuthentication",
            self.origin, self.kind, self.name, self.api_version
        )
    }
}

/// Why a file or an object was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A path given on the command line or found in a directory could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A document is not YAML at all; the rest of the file after it cannot be trusted either.
    #[error("{origin}: not valid YAML: {source}")]
    Yaml {
        origin: Origin,
        #[source]
        source: serde_yaml::Error,
    },
    /// The object is one of the two kinds but breaks a rule of its schema or of Istio's
    /// validation; it is left out and the others still apply.
    #[error("{origin}: {kind} {object}: {field}: {problem}")]
    Invalid {
        origin: Origin,
        kind: &'static str,
        object: String,
        field: String,
        problem: Problem,
    },
}

/// Everything read from a set of paths.
#[derive(Debug, Default)]
pub struct Loaded {
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub request_authentications: Vec<RequestAuthentication>,
    pub skipped: Vec<Skipped>,
    pub errors: Vec<LoadError>,
}

impl Loaded {
    fn extend(&mut self, other: Loaded) {
        self.authorization_policies
            .extend(other.authorization_policies);
        self.request_authentications
            .extend(other.request_authentications);
        self.skipped.extend(other.skipped);
        self.errors.extend(other.errors);
    }
}

/// Reads files and directories (recursively; `.yaml`, `.yml` and `.json` files, hidden entries
/// ignored, in name order so results are stable).
#[must_use]
pub fn load_paths<P: AsRef<Path>>(paths: &[P]) -> Loaded {
    let mut out = Loaded::default();
    for path in paths {
        let path = path.as_ref();
        match collect_files(path) {
            Ok(files) => {
                for file in files {
                    match std::fs::read_to_string(&file) {
                        Ok(text) => out.extend(load_str(&file, &text)),
                        Err(source) => out.errors.push(LoadError::Read { path: file, source }),
                    }
                }
            }
            Err(source) => out.errors.push(LoadError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
    out
}

fn collect_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut visited = std::collections::HashSet::new();
    walk(path, &mut files, &mut visited)?;
    Ok(files)
}

/// Depth-first, each directory once (a symlink loop is not followed twice).
fn walk(
    path: &Path,
    files: &mut Vec<PathBuf>,
    visited: &mut std::collections::HashSet<PathBuf>,
) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        files.push(path.to_path_buf());
        return Ok(());
    }
    if !visited.insert(std::fs::canonicalize(path)?) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    entries.sort();
    for entry in entries {
        let name = entry
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('.') {
            continue;
        }
        if entry.is_dir() {
            walk(&entry, files, visited)?;
        } else if matches!(
            entry.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            files.push(entry);
        }
    }
    Ok(())
}

/// Reads one multi-document YAML text; `file` only names where it came from.
#[must_use]
pub fn load_str(file: &Path, text: &str) -> Loaded {
    let mut out = Loaded::default();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file: file.to_path_buf(),
            document: index + 1,
        };
        match serde_yaml::Value::deserialize(document) {
            Ok(value) => load_value(origin, value, &mut out),
            Err(source) => {
                // The YAML stream cannot be resynchronised after a syntax error.
                out.errors.push(LoadError::Yaml { origin, source });
                break;
            }
        }
    }
    out
}

/// Reads one object already parsed (an object from the Kubernetes API, as YAML value): the
/// same schema and validation as a document of a file.
#[must_use]
pub fn load_object(origin: Origin, value: serde_yaml::Value) -> Loaded {
    let mut out = Loaded::default();
    load_value(origin, value, &mut out);
    out
}

fn load_value(origin: Origin, value: serde_yaml::Value, out: &mut Loaded) {
    if value.is_null() {
        return;
    }
    let text = |key: &str| {
        value
            .get(key)
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default()
    };
    let api_version = text("apiVersion").to_owned();
    let kind = text("kind").to_owned();
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or("<unnamed>")
        .to_owned();

    if kind == "List" {
        if let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) {
            for item in items {
                load_value(origin.clone(), item.clone(), out);
            }
        }
        return;
    }
    let ours = api_version
        .split_once('/')
        .is_some_and(|(group, version)| group == GROUP && VERSIONS.contains(&version));
    match (ours, kind.as_str()) {
        (true, "AuthorizationPolicy") => {
            if let Some(policy) = typed(&origin, "AuthorizationPolicy", value, out) {
                let policy: AuthorizationPolicy = policy;
                match validate::authorization_policy(&policy.spec, &policy.metadata) {
                    Ok(()) => out.authorization_policies.push(policy),
                    Err(problems) => {
                        invalid(&origin, "AuthorizationPolicy", &policy.id(), problems, out);
                    }
                }
            }
        }
        (true, "RequestAuthentication") => {
            if let Some(policy) = typed(&origin, "RequestAuthentication", value, out) {
                let policy: RequestAuthentication = policy;
                match validate::request_authentication(&policy.spec, &policy.metadata) {
                    Ok(()) => out.request_authentications.push(policy),
                    Err(problems) => invalid(
                        &origin,
                        "RequestAuthentication",
                        &policy.id(),
                        problems,
                        out,
                    ),
                }
            }
        }
        _ => out.skipped.push(Skipped {
            origin,
            api_version,
            kind,
            name,
        }),
    }
}

fn invalid(
    origin: &Origin,
    kind: &'static str,
    object: &str,
    problems: Vec<validate::FieldError>,
    out: &mut Loaded,
) {
    for e in problems {
        out.errors.push(LoadError::Invalid {
            origin: origin.clone(),
            kind,
            object: object.to_owned(),
            field: e.field,
            problem: e.problem,
        });
    }
}

/// The typed form of a whole object; a schema error names the field path.
fn typed<S: DeserializeOwned>(
    origin: &Origin,
    kind: &'static str,
    value: serde_yaml::Value,
    out: &mut Loaded,
) -> Option<Object<S>> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        api_version: String,
        metadata: ObjectMeta,
        #[serde(default = "empty_spec")]
        spec: serde_yaml::Value,
    }
    fn empty_spec() -> serde_yaml::Value {
        serde_yaml::Value::Mapping(serde_yaml::Mapping::new())
    }

    let object_name = object_name(&value);
    let raw: Raw = match serde_path_to_error::deserialize(value) {
        Ok(raw) => raw,
        Err(e) => {
            out.errors.push(LoadError::Invalid {
                origin: origin.clone(),
                kind,
                object: object_name,
                field: e.path().to_string(),
                problem: Problem::Schema(e.into_inner().to_string()),
            });
            return None;
        }
    };
    let spec = if raw.spec.is_null() {
        empty_spec()
    } else {
        raw.spec
    };
    let spec: S = match serde_path_to_error::deserialize(spec) {
        Ok(spec) => spec,
        Err(e) => {
            out.errors.push(LoadError::Invalid {
                origin: origin.clone(),
                kind,
                object: object_name,
                field: format!("spec.{}", e.path()),
                problem: Problem::Schema(e.into_inner().to_string()),
            });
            return None;
        }
    };
    if raw.metadata.name.is_empty() {
        out.errors.push(LoadError::Invalid {
            origin: origin.clone(),
            kind,
            object: object_name,
            field: "metadata.name".into(),
            problem: Problem::Required,
        });
        return None;
    }
    Some(Object {
        origin: origin.clone(),
        api_version: raw.api_version,
        metadata: raw.metadata,
        spec,
    })
}

fn object_name(value: &serde_yaml::Value) -> String {
    let meta = value.get("metadata");
    let get = |k: &str| {
        meta.and_then(|m| m.get(k))
            .and_then(serde_yaml::Value::as_str)
    };
    format!(
        "{}/{}",
        get("namespace").unwrap_or("default"),
        get("name").unwrap_or("<unnamed>")
    )
}
