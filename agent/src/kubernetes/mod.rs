//! Kubernetes mode (`nodeward run --kubernetes`): the API server is the source of truth.
//!
//! | module | owns |
//! | --- | --- |
//! | [`pods`] | Pod → projection: this node's steerable pods, every pod's source identity |
//! | [`services`] | Service → projection; the port protocols the Services selecting a pod declare (Istio's rules) |
//! | [`policies`] | discovery of `security.istio.io` (`v1`, else `v1beta1`), object → policy model |
//! | [`mesh`] | the `MeshConfig` (`mesh` key of `ConfigMap` `istio` in the root namespace) → the extension providers CUSTOM policies call; last good kept on a bad edit |
//! | [`events`] | `InvalidPolicy` and `InvalidMeshConfig` Events on objects that fail validation |
//! | [`health`] | per-watcher sync and staleness for `/readyz` and `/metrics` |
//! | [`source`] | the watchers, the mirror of projections, publishing through the state store |
//!
//! The client comes from `--kubeconfig` when given, else kube's inference: `KUBECONFIG`,
//! `~/.kube/config`, then the in-cluster service account.

pub mod events;
pub mod health;
pub mod mesh;
pub mod pods;
pub mod policies;
pub mod services;
pub mod source;

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

pub use health::{Health, KubernetesMetrics};
pub use source::{Kubernetes, KubernetesConfig};

/// Why no client to the API server could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--kubeconfig` cannot be read or used.
    #[error("cannot use kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    /// Neither `KUBECONFIG`, `~/.kube/config` nor the in-cluster service account is usable.
    #[error("no Kubernetes configuration found (tried KUBECONFIG, ~/.kube/config, in-cluster): {0}; give --kubeconfig")]
    Infer(#[source] kube::config::InferConfigError),
    /// The configuration is there, but a client cannot be built from it (TLS, proxy).
    #[error("cannot build the Kubernetes client: {0}")]
    Build(#[source] kube::Error),
}

/// The kube configuration: `kubeconfig` when given, else inferred.
pub async fn config(kubeconfig: Option<&Path>) -> Result<Config, ClientError> {
    match kubeconfig {
        Some(path) => {
            let error = |source| ClientError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(error)
        }
        None => Config::infer().await.map_err(ClientError::Infer),
    }
}

/// A client for `kubeconfig` (or the inferred configuration).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    Client::try_from(config(kubeconfig).await?).map_err(ClientError::Build)
}
