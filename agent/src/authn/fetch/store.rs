//! The JWKS store: every remote key source, each refreshed by its own task, its last good key
//! set kept for the request path, which reads it without awaiting.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;

use super::client::{Fetcher, Loaded};
use super::{FetchConfig, FetchError, JwksSource, MIN_DELAY};
use crate::authn::jwks::KeySet;
use crate::authn::keys::{KeyLookup, Keys};

/// What the request path gets for a source.
#[derive(Debug, Clone)]
pub enum KeyState {
    /// The source is not in the store (not configured): fail closed.
    Unknown,
    /// No attempt has completed yet: fail closed.
    Pending,
    /// The last good key set (also while later refreshes fail). `generation` changes whenever
    /// the key set does, store-wide, so caches of verified tokens can tell old entries.
    Ready { keys: Arc<KeySet>, generation: u64 },
    /// Every attempt so far failed; the latest error, for messages.
    Failed { error: Arc<str> },
}

impl KeyState {
    /// The keys, when there are any.
    #[must_use]
    pub fn usable(&self) -> Option<&Arc<KeySet>> {
        match self {
            Self::Ready { keys, .. } => Some(keys),
            _ => None,
        }
    }
}

/// A source's condition, in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// No attempt has completed.
    Pending,
    /// Keys, and the latest attempt succeeded.
    Ready,
    /// Keys from an earlier fetch; the latest attempt failed.
    Stale,
    /// No keys; every attempt failed.
    Failed,
}

impl SourceState {
    /// `pending`, `ready`, `stale` or `failed`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Stale => "stale",
            Self::Failed => "failed",
        }
    }
}

impl fmt::Display for SourceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One source, for `/debug/state`, readiness and `nodeward` commands. No key material.
#[derive(Debug, Clone)]
pub struct SourceStatus {
    /// The store key ([`JwksSource::key`]).
    pub key: String,
    pub source: JwksSource,
    /// The issuers using the source, comma separated.
    pub issuer: String,
    /// The JWKS URI (for discovery: the discovered one, once known).
    pub uri: Option<String>,
    pub state: SourceState,
    pub kids: Vec<String>,
    pub generation: Option<u64>,
    pub last_success: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// Attempts completed.
    pub fetches: u64,
    /// Attempts failed.
    pub failures: u64,
    pub consecutive_failures: u32,
    pub next_attempt: Option<SystemTime>,
}

/// The key set in use for a source.
struct Current {
    keys: Arc<KeySet>,
    generation: u64,
    digest: [u8; 32],
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    uri: Option<String>,
    fetches: u64,
    failures: u64,
    consecutive_failures: u32,
    last_success: Option<SystemTime>,
    last_error: Option<(SystemTime, Arc<str>)>,
    next_attempt: Option<SystemTime>,
}

/// How a source is fetched; updated in place when the rules change.
#[derive(Clone, PartialEq, Eq)]
struct Params {
    issuer: String,
    timeout: Duration,
}

struct Entry {
    source: JwksSource,
    params: Mutex<Params>,
    state: RwLock<State>,
}

struct Running {
    entry: Arc<Entry>,
    task: JoinHandle<()>,
}

/// What refresh tasks share with the store (not the store itself: dropping the store stops them).
struct Shared {
    generation: AtomicU64,
    /// Bumped after every attempt and every change of sources, for waiters.
    changed: watch::Sender<u64>,
}

struct Inner {
    fetcher: Fetcher,
    shared: Arc<Shared>,
    sources: RwLock<HashMap<String, Running>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        for running in write(&self.sources).values() {
            running.task.abort();
        }
    }
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Every remote key source, each refreshed by its own task. Cheap to clone; the request path
/// reads it without awaiting. Dropping the last clone stops the refresh tasks.
#[derive(Clone)]
pub struct JwksStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for JwksStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwksStore")
            .field("sources", &read(&self.inner.sources).len())
            .finish_non_exhaustive()
    }
}

impl JwksStore {
    /// An empty store.
    pub fn new(config: FetchConfig) -> Result<Self, FetchError> {
        Ok(Self::with_fetcher(Fetcher::new(config)?))
    }

    /// An empty store fetching with `fetcher`.
    #[must_use]
    pub fn with_fetcher(fetcher: Fetcher) -> Self {
        let (changed, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            changed,
        });
        Self {
            inner: Arc::new(Inner {
                fetcher,
                shared,
                sources: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// The client the store fetches with, for one-shot fetches.
    #[must_use]
    pub fn fetcher(&self) -> &Fetcher {
        &self.inner.fetcher
    }

    /// Makes the store fetch exactly these sources, given as (source, the rule's `timeout`,
    /// issuer). A new source gets a refresh task that fetches at once; a source no longer
    /// given is dropped and its task stopped; a source already present is left alone (not
    /// refetched), only its timeout and issuers updated. Sources given more than once are
    /// fetched once, with the longest timeout.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the refresh tasks).
    pub fn set_sources<I>(&self, sources: I)
    where
        I: IntoIterator<Item = (JwksSource, Option<Duration>, String)>,
    {
        let default_timeout = self.inner.fetcher.config.default_timeout;
        let mut wanted: HashMap<String, (JwksSource, BTreeSet<String>, Duration)> = HashMap::new();
        for (source, timeout, issuer) in sources {
            let timeout = timeout.unwrap_or(default_timeout);
            let slot = wanted
                .entry(source.key())
                .or_insert_with(|| (source, BTreeSet::new(), timeout));
            slot.1.insert(issuer);
            slot.2 = slot.2.max(timeout);
        }
        let mut running = write(&self.inner.sources);
        running.retain(|key, source| {
            let keep = wanted.contains_key(key);
            if !keep {
                source.task.abort();
                tracing::info!(source = %source.entry.source, "JWKS source no longer used; stopped refreshing it");
            }
            keep
        });
        for (key, (source, issuers, timeout)) in wanted {
            let params = Params {
                issuer: issuers.into_iter().collect::<Vec<_>>().join(", "),
                timeout,
            };
            if let Some(existing) = running.get(&key) {
                *existing
                    .entry
                    .params
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = params;
                continue;
            }
            let entry = Arc::new(Entry {
                source,
                params: Mutex::new(params),
                state: RwLock::new(State::default()),
            });
            let span = tracing::info_span!("jwks", source = %entry.source);
            let task = tokio::spawn(
                refresh(
                    self.inner.fetcher.clone(),
                    Arc::clone(&self.inner.shared),
                    Arc::clone(&entry),
                )
                .instrument(span),
            );
            running.insert(key, Running { entry, task });
        }
        drop(running);
        self.inner
            .shared
            .changed
            .send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The keys of the source with this key ([`JwksSource::key`]). No await, no allocation
    /// when keys are ready.
    #[must_use]
    pub fn keys(&self, key: &str) -> KeyState {
        let sources = read(&self.inner.sources);
        let Some(running) = sources.get(key) else {
            return KeyState::Unknown;
        };
        let state = read(&running.entry.state);
        match (&state.current, &state.last_error) {
            (Some(current), _) => KeyState::Ready {
                keys: Arc::clone(&current.keys),
                generation: current.generation,
            },
            (None, Some((_, error))) if state.fetches > 0 => KeyState::Failed {
                error: Arc::clone(error),
            },
            (None, _) => KeyState::Pending,
        }
    }

    /// Every source, sorted by key.
    #[must_use]
    pub fn status(&self) -> Vec<SourceStatus> {
        let sources = read(&self.inner.sources);
        let mut all: Vec<SourceStatus> = sources
            .iter()
            .map(|(key, running)| {
                let issuer = running
                    .entry
                    .params
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .issuer
                    .clone();
                let state = read(&running.entry.state);
                let word = match (&state.current, state.fetches, state.consecutive_failures) {
                    (_, 0, _) => SourceState::Pending,
                    (Some(_), _, 0) => SourceState::Ready,
                    (Some(_), _, _) => SourceState::Stale,
                    (None, _, _) => SourceState::Failed,
                };
                SourceStatus {
                    key: key.clone(),
                    source: running.entry.source.clone(),
                    issuer,
                    uri: state.uri.clone(),
                    state: word,
                    kids: state
                        .current
                        .as_ref()
                        .map(|c| c.keys.kids())
                        .unwrap_or_default(),
                    generation: state.current.as_ref().map(|c| c.generation),
                    last_success: state.last_success,
                    last_error: state.last_error.as_ref().map(|(_, e)| e.to_string()),
                    last_error_at: state.last_error.as_ref().map(|(at, _)| *at),
                    fetches: state.fetches,
                    failures: state.failures,
                    consecutive_failures: state.consecutive_failures,
                    next_attempt: state.next_attempt,
                }
            })
            .collect();
        all.sort_by(|a, b| a.key.cmp(&b.key));
        all
    }

    /// Whether every source has keys or a definitive answer (at least one completed attempt).
    /// True with no sources.
    #[must_use]
    pub fn ready(&self) -> bool {
        read(&self.inner.sources).values().all(|running| {
            let state = read(&running.entry.state);
            state.current.is_some() || state.fetches > 0
        })
    }

    /// Waits until [`JwksStore::ready`], at most `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        self.wait_until(timeout, Self::ready).await
    }

    /// Waits until `condition` holds, checking it after every attempt and change of sources,
    /// at most `timeout`; returns whether it holds.
    pub async fn wait_until(&self, timeout: Duration, condition: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.inner.shared.changed.subscribe();
        loop {
            if condition(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return condition(self),
            }
        }
    }
}

impl Keys for JwksStore {
    fn lookup(&self, source: &str) -> KeyLookup {
        match self.keys(source) {
            KeyState::Ready { keys, generation } => KeyLookup::Ready(keys, generation),
            KeyState::Unknown | KeyState::Pending | KeyState::Failed { .. } => {
                KeyLookup::Unavailable
            }
        }
    }
}

/// A source's refresh task: fetch, record, wait (refresh interval or backoff), forever.
async fn refresh(fetcher: Fetcher, shared: Arc<Shared>, entry: Arc<Entry>) {
    loop {
        let params = entry
            .params
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let result = fetcher
            .load(&entry.source, &params.issuer, Some(params.timeout))
            .await;
        let delay = record(&entry, &shared, fetcher.config(), &params.issuer, result);
        shared.changed.send_modify(|n| *n = n.wrapping_add(1));
        tokio::time::sleep(delay).await;
    }
}

/// Records an attempt's outcome, logs it, and says how long to wait before the next.
fn record(
    entry: &Entry,
    shared: &Shared,
    config: &FetchConfig,
    issuer: &str,
    result: Result<Loaded, FetchError>,
) -> Duration {
    let now = SystemTime::now();
    let mut state = write(&entry.state);
    state.fetches += 1;
    match result {
        Ok(loaded) => {
            let delay = config.refresh_interval.max(MIN_DELAY);
            state.consecutive_failures = 0;
            state.last_success = Some(now);
            state.next_attempt = Some(now + delay);
            state.uri = Some(loaded.uri.clone());
            let unchanged = state
                .current
                .as_ref()
                .is_some_and(|c| c.digest == loaded.digest);
            if unchanged {
                drop(state);
                tracing::debug!(%issuer, uri = %loaded.uri, "JWKS refreshed, unchanged");
            } else {
                let kids = loaded.keys.kids();
                let skipped = loaded.keys.skipped.clone();
                let generation = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
                let replaced = state
                    .current
                    .replace(Current {
                        keys: Arc::new(loaded.keys),
                        generation,
                        digest: loaded.digest,
                    })
                    .is_some();
                drop(state);
                tracing::info!(%issuer, uri = %loaded.uri, ?kids, count = kids.len(), generation, replaced, "JWKS loaded");
                if !skipped.is_empty() {
                    tracing::warn!(%issuer, uri = %loaded.uri, ?skipped, "JWKS keys left out (unusable)");
                }
            }
            delay
        }
        Err(error) => {
            state.failures += 1;
            state.consecutive_failures = state.consecutive_failures.saturating_add(1);
            let delay = config.retry_delay(state.consecutive_failures);
            state.next_attempt = Some(now + delay);
            if let Some(uri) = error.jwks_uri() {
                // For discovery: the discovered URI, even when its key set failed.
                state.uri = Some(uri.to_owned());
            }
            let message = error.to_string();
            state.last_error = Some((now, Arc::from(message.as_str())));
            let keeping = state.current.as_ref().map(|c| c.generation);
            let consecutive = state.consecutive_failures;
            drop(state);
            match keeping {
                Some(generation) => {
                    tracing::warn!(error = %message, retry_in = ?delay, consecutive, kept_generation = generation, "JWKS refresh failed; keeping the last good keys");
                }
                None => {
                    tracing::warn!(error = %message, retry_in = ?delay, consecutive, "JWKS fetch failed; no keys for this source");
                }
            }
            delay
        }
    }
}
