//! Verified tokens, so a client that sends the same token on every request pays for the
//! signature once: a hit skips decoding too. Keyed by a SHA-256 of the token and a scope (the
//! workload's rule set and where the token was found; the token itself is never stored),
//! bounded, each entry dropped at the token's `exp` (plus skew) and ignored once the issuer's
//! keys changed (the key-set generation differs).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;
use moka::Expiry;
use sha2::{Digest, Sha256};

use super::token::CLOCK_SKEW_SECS;
use super::AuthInfo;

/// Memory the cache may hold, in bytes as [`weight`] estimates them: about 4,000 tokens of a
/// typical size (a payload of 300 characters), 40,000 small ones. Bounded by bytes, not
/// entries, so large tokens cannot grow the agent: a miss only costs one verification.
pub const DEFAULT_CAPACITY: u64 = 6 * 1024 * 1024;

/// An entry's estimated heap size: the payload kept for `outputPayloadToHeader`, its decoded
/// claims (a JSON map: about twice the payload's size with its strings and nodes) and the
/// fixed parts (key, identity strings, moka's bookkeeping).
fn weight(_: &TokenKey, value: &Arc<Verified>) -> u32 {
    let payload = u32::try_from(value.payload_b64.len()).unwrap_or(u32::MAX);
    payload.saturating_mul(3).saturating_add(512)
}
/// How long a token without `exp` stays cached.
pub const NO_EXP_TTL: Duration = Duration::from_mins(5);

/// Cache key: which token, found where, under which rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenKey {
    digest: [u8; 32],
    scope: u64,
}

impl TokenKey {
    #[must_use]
    pub fn new(token: &str, scope: u64) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
            scope,
        }
    }
}

/// What a verification established.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub auth: AuthInfo,
    pub exp: Option<u64>,
    pub nbf: Option<u64>,
    /// The payload section as sent, for `outputPayloadToHeader`.
    pub payload_b64: String,
    /// The key-set generation the signature was checked against.
    pub generation: u64,
    /// Which rule of the scope's rule set verified it.
    pub rule: usize,
}

struct UntilExp;

impl Expiry<TokenKey, Arc<Verified>> for UntilExp {
    fn expire_after_create(
        &self,
        _: &TokenKey,
        value: &Arc<Verified>,
        _: Instant,
    ) -> Option<Duration> {
        Some(value.exp.map_or(NO_EXP_TTL, |exp| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Duration::from_secs(exp.saturating_add(CLOCK_SKEW_SECS).saturating_sub(now))
        }))
    }
}

/// The verified-token cache, shared by every workload.
#[derive(Clone)]
pub struct TokenCache {
    inner: Cache<TokenKey, Arc<Verified>>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl TokenCache {
    /// A cache holding at most `capacity_bytes` (estimated: see [`DEFAULT_CAPACITY`]).
    #[must_use]
    pub fn new(capacity_bytes: u64) -> Self {
        Self {
            inner: Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(weight)
                .expire_after(UntilExp)
                .build(),
        }
    }

    /// A hit, whatever key-set generation verified it; the caller compares generations.
    #[must_use]
    pub fn get(&self, key: &TokenKey) -> Option<Arc<Verified>> {
        self.inner.get(key)
    }

    pub fn insert(&self, key: TokenKey, verified: Arc<Verified>) {
        self.inner.insert(key, verified);
    }

    /// Entries held (approximate until pending maintenance runs).
    #[must_use]
    pub fn len(&self) -> u64 {
        self.inner.run_pending_tasks();
        self.inner.entry_count()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verified(payload_len: usize) -> Arc<Verified> {
        Arc::new(Verified {
            auth: AuthInfo::default(),
            exp: None,
            nbf: None,
            payload_b64: "a".repeat(payload_len),
            generation: 1,
            rule: 0,
        })
    }

    #[test]
    fn the_cache_is_bounded_by_bytes_not_entries() {
        // 64 KiB hold at most 46 entries of a 300-character payload (1,412 bytes each) and 2 of
        // a 10,000-character one, whatever moka's admission policy keeps.
        let capacity = 64 * 1024;
        let cache = TokenCache::new(capacity);
        for i in 0..500 {
            cache.insert(TokenKey::new(&format!("small-{i}"), 0), verified(300));
        }
        assert!(cache.len() <= 46, "{} entries of 1.4 KB", cache.len());
        for i in 0..500 {
            cache.insert(TokenKey::new(&format!("big-{i}"), 0), verified(10_000));
        }
        cache.inner.run_pending_tasks();
        assert!(
            cache.inner.weighted_size() <= capacity,
            "{} bytes held",
            cache.inner.weighted_size()
        );
        let key = TokenKey::new("again", 0);
        let cache = TokenCache::new(capacity);
        cache.insert(key, verified(300));
        assert_eq!(cache.get(&key).map(|v| v.payload_b64.len()), Some(300));
    }
}
