//! Prometheus metrics of the agent (prometheus-client). One [`Metrics`] is shared by the
//! enforcer, the state store, the JWKS store and the admin server, which encodes it on
//! `/metrics`. Label values are bounded: workloads are `namespace/name`, reasons and
//! decisions are fixed words.

use std::borrow::Cow;
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `nodeward_requests_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `namespace/name` of the destination workload (shared with the snapshot: a request's
    /// labels are built without allocating).
    pub workload: SharedLabel,
    /// `allow` or `deny`.
    pub decision: &'static str,
    pub code: u16,
    /// `allowed`, `no_allow_policies`, `denied_by_policy`, `no_allow_matched`,
    /// `custom_not_supported`, `authn_<error>`, `upstream_error`, ...
    pub reason: Cow<'static, str>,
}

/// A label value shared with the state (a workload's `namespace/name`): cloned without
/// allocating.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SharedLabel(pub Arc<str>);

impl EncodeLabelValue for SharedLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&&*self.0, encoder)
    }
}

/// Labels with one `reason`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Labels with one `protocol` (`http1`, `h2c`, `tls`, `tcp`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

/// Labels with a `result` (`ok`, `error`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// JWKS labels: the issuer(s) and the source URI.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksLabels {
    pub issuer: String,
    pub uri: String,
    pub result: &'static str,
}

/// Labels of an external authorizer's check: the provider's name and `allowed`, `denied` or
/// `error`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
    pub result: &'static str,
}

/// Labels with one `provider`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderNameLabels {
    pub provider: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Requests judged, by workload, decision, status code and reason.
    pub requests: Family<RequestLabels, Counter>,
    /// The enforcer's own time per request (authn + authz + rewrite), seconds; upstream time
    /// is not included.
    pub decision_seconds: Histogram,
    /// Connections currently open on the enforcer.
    pub connections_open: Gauge,
    /// Connections accepted, by detected protocol.
    pub connections: Family<ProtocolLabels, Counter>,
    /// Requests or connections refused before judgement (hostile or malformed clients), by why.
    pub refused: Family<ReasonLabels, Counter>,
    /// Policy and workload reloads, by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// Current number of files or objects that failed to load (last good state serving).
    pub config_errors: Gauge,
    /// JWKS fetches, by issuer, URI and result.
    pub jwks_fetches: Family<JwksLabels, Counter>,
    /// External authorizer checks (CUSTOM policies), by provider and result.
    pub extauthz_checks: Family<ProviderLabels, Counter>,
    /// Time of each external authorizer check, by provider, seconds.
    pub extauthz_seconds: Family<ProviderNameLabels, Histogram>,
}

fn extauthz_buckets() -> Histogram {
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        1e-4, 2.0, 16,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nodeward");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests judged by the enforcer",
            requests.clone(),
        );
        // 10 µs .. ~40 ms: the enforcer's own decision time.
        let decision_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 13),
        );
        registry.register(
            "decision_seconds",
            "Enforcer time per request (authn, authz, rewrite)",
            decision_seconds.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections open on the enforcer",
            connections_open.clone(),
        );
        let connections = Family::<ProtocolLabels, Counter>::default();
        registry.register(
            "connections",
            "Connections accepted by protocol",
            connections.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refused",
            "Requests or connections refused before judgement",
            refused.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Policy and workload reloads",
            reloads.clone(),
        );
        let config_errors = Gauge::default();
        registry.register(
            "config_errors",
            "Files or objects currently failing to load",
            config_errors.clone(),
        );
        let jwks_fetches = Family::<JwksLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "JWKS fetches by issuer, URI and result",
            jwks_fetches.clone(),
        );
        let extauthz_checks = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "extauthz_checks",
            "External authorizer checks (CUSTOM policies) by provider and result",
            extauthz_checks.clone(),
        );
        // 100 µs .. ~3.3 s.
        let extauthz_seconds =
            Family::<ProviderNameLabels, Histogram>::new_with_constructor(extauthz_buckets);
        registry.register(
            "extauthz_check_seconds",
            "Time of each external authorizer check, by provider",
            extauthz_seconds.clone(),
        );
        Self {
            registry,
            requests,
            decision_seconds,
            connections_open,
            connections,
            refused,
            reloads,
            config_errors,
            jwks_fetches,
            extauthz_checks,
            extauthz_seconds,
        }
    }

    /// Counts one external authorizer check.
    pub fn extauthz(&self, result: &crate::extauthz::CheckResult) {
        self.extauthz_checks
            .get_or_create(&ProviderLabels {
                provider: result.provider.clone(),
                result: result.label(),
            })
            .inc();
        self.extauthz_seconds
            .get_or_create(&ProviderNameLabels {
                provider: result.provider.clone(),
            })
            .observe(result.elapsed.as_secs_f64());
    }

    /// Registers a collector or metric owned elsewhere (JWKS ages, datapath counters).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The Prometheus text exposition.
    #[must_use]
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Shared handle.
pub type SharedMetrics = Arc<Metrics>;
