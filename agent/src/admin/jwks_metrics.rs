//! JWKS metrics, read from [`JwksStore::status`] at scrape time (the store keeps the numbers;
//! nothing on the request path counts):
//!
//! - `nodeward_jwks_age_seconds{issuer,uri}`: seconds since the source's last successful fetch
//!   (sources that never had one are absent);
//! - `nodeward_jwks_keys{issuer,uri}`: keys in the set in use (0 while there is none);
//! - `nodeward_jwks_source_state{issuer,uri,state}`: 1 for the source's state (`pending`,
//!   `ready`, `stale`, `failed`), 0 for the others;
//! - `nodeward_jwks_fetches_total{issuer,uri,result}` ([`Metrics::jwks_fetches`]): brought up
//!   to the store's per-source attempt counts by [`JwksMetrics::sync_fetches`] before each
//!   scrape. A source dropped and added again starts counting from zero in the store; the
//!   counter then stays put until the store's count passes it (counters never go down).
//!
//! `uri` is the source's key: the `jwksUri`, or the issuer's OIDC discovery URL.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::authn::fetch::{JwksStore, SourceState, SourceStatus};
use crate::metrics::{JwksLabels, Metrics};

/// Labels of one source.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    issuer: String,
    uri: String,
}

/// Labels of one source and a state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    issuer: String,
    uri: String,
    state: &'static str,
}

const STATES: [SourceState; 4] = [
    SourceState::Pending,
    SourceState::Ready,
    SourceState::Stale,
    SourceState::Failed,
];

/// The JWKS collector; clones share the store. Register one clone with
/// [`Metrics::registry_mut`] and keep another for [`JwksMetrics::sync_fetches`].
#[derive(Debug, Clone)]
pub struct JwksMetrics {
    store: JwksStore,
    /// Serializes [`JwksMetrics::sync_fetches`], so two scrapes never add the same attempts.
    sync: Arc<Mutex<()>>,
}

impl JwksMetrics {
    #[must_use]
    pub fn new(store: JwksStore) -> Self {
        Self {
            store,
            sync: Arc::new(Mutex::new(())),
        }
    }

    /// Brings `nodeward_jwks_fetches_total` up to the store's counts.
    pub fn sync_fetches(&self, metrics: &Metrics) {
        let _one = self.sync.lock().unwrap_or_else(PoisonError::into_inner);
        for s in self.store.status() {
            let ok = s.fetches.saturating_sub(s.failures);
            for (result, count) in [("ok", ok), ("error", s.failures)] {
                let counter = metrics.jwks_fetches.get_or_create(&JwksLabels {
                    issuer: s.issuer.clone(),
                    uri: s.key.clone(),
                    result,
                });
                let seen = counter.get();
                if count > seen {
                    counter.inc_by(count - seen);
                }
            }
        }
    }
}

fn labels(s: &SourceStatus) -> SourceLabels {
    SourceLabels {
        issuer: s.issuer.clone(),
        uri: s.key.clone(),
    }
}

impl Collector for JwksMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.store.status();
        if status.is_empty() {
            return Ok(());
        }
        let now = SystemTime::now();
        {
            let mut family = encoder.encode_descriptor(
                "jwks_age_seconds",
                "Seconds since the JWKS source's last successful fetch",
                None,
                MetricType::Gauge,
            )?;
            for s in &status {
                let Some(success) = s.last_success else {
                    continue;
                };
                let age = now.duration_since(success).map_or(0.0, |d| d.as_secs_f64());
                let labels = labels(s);
                ConstGauge::new(age).encode(family.encode_family(&labels)?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "jwks_keys",
                "Keys in the JWKS in use for the source",
                None,
                MetricType::Gauge,
            )?;
            for s in &status {
                let labels = labels(s);
                let keys = i64::try_from(s.kids.len()).unwrap_or(i64::MAX);
                ConstGauge::new(keys).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "jwks_source_state",
            "State of the JWKS source (1 for the current one)",
            None,
            MetricType::Gauge,
        )?;
        for s in &status {
            for state in STATES {
                let labels = StateLabels {
                    issuer: s.issuer.clone(),
                    uri: s.key.clone(),
                    state: state.as_str(),
                };
                ConstGauge::new(i64::from(s.state == state))
                    .encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
