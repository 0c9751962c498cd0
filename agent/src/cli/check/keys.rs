//! The keys a check verifies tokens with: fetched once on demand (files), or the running
//! agent's own store (live), and a line per key set consulted.

use std::collections::HashSet;
use std::time::Duration;

use crate::authn::fetch::{FetchConfig, JwksStore, SourceStatus, DEFAULT_TIMEOUT};
use crate::authn::rules::{KeyLookup, Keys, NoRemoteKeys};
use crate::authn::JwtRules;
use crate::authn::RequestParts;

use super::CheckError;

/// Key sets of the rules' remote sources, fetched once, only when the request carries a
/// token (as the enforcer's store would have them: last good keys, fail closed otherwise).
struct RemoteKeys {
    store: JwksStore,
    /// Keeps the store's refresh tasks alive while the request is judged.
    _runtime: tokio::runtime::Runtime,
}

impl Keys for RemoteKeys {
    fn lookup(&self, source: &str) -> KeyLookup {
        self.store.lookup(source)
    }
}

/// The agent's own store, borrowed.
pub(super) struct LiveKeys<'a>(pub(super) &'a JwksStore);

impl Keys for LiveKeys<'_> {
    fn lookup(&self, source: &str) -> KeyLookup {
        self.0.lookup(source)
    }
}

/// One line per fetched key set: source, state, key ids or the fetch error.
fn describe_source(s: SourceStatus) -> String {
    match s.last_error {
        Some(error) if s.kids.is_empty() => format!("{}: {}: {error}", s.key, s.state.as_str()),
        _ => format!(
            "{}: {} (kids {})",
            s.key,
            s.state.as_str(),
            s.kids.join(", ")
        ),
    }
}

/// The agent's key sets for the rules' remote sources, reported as the file-based check
/// reports its own fetches: only when the request carries a token.
pub(super) fn live_jwks_status(
    store: &JwksStore,
    rules: &JwtRules,
    parts: &RequestParts<'_>,
) -> Vec<String> {
    let wanted: HashSet<String> = rules
        .remote_sources()
        .into_iter()
        .map(|(source, _, _)| source.key())
        .collect();
    if wanted.is_empty() || rules.extract(parts).is_empty() {
        return Vec::new();
    }
    store
        .status()
        .into_iter()
        .filter(|s| wanted.contains(&s.key))
        .map(describe_source)
        .collect()
}

pub(super) fn remote_keys(
    rules: &JwtRules,
    parts: &RequestParts<'_>,
) -> Result<(Box<dyn Keys>, Vec<String>), CheckError> {
    let sources = rules.remote_sources();
    if sources.is_empty() || rules.extract(parts).is_empty() {
        return Ok((Box::new(NoRemoteKeys), Vec::new()));
    }
    let wait = sources
        .iter()
        .filter_map(|(_, t, _)| *t)
        .max()
        .unwrap_or(DEFAULT_TIMEOUT)
        + Duration::from_secs(1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    let store = JwksStore::new(FetchConfig::default()).map_err(CheckError::Jwks)?;
    runtime.block_on(async {
        store.set_sources(sources);
        store.wait_ready(wait).await
    });
    let status = store.status().into_iter().map(describe_source).collect();
    Ok((
        Box::new(RemoteKeys {
            store,
            _runtime: runtime,
        }),
        status,
    ))
}
