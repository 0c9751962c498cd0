//! Kubernetes Events (`events.k8s.io/v1`) on objects that fail validation: reason
//! `InvalidPolicy` on a policy, `InvalidMeshConfig` on the `ConfigMap` holding the
//! `MeshConfig`, the note naming the field and the problem. Published off the watchers' path
//! by one task; the source sends a report only when an object's problem changes (a resync or
//! a relist of the same invalid object sends nothing).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::health::Health;

/// The Event reason on an invalid policy.
pub const INVALID_POLICY: &str = "InvalidPolicy";
/// The Event reason on a `MeshConfig` that does not parse, or has invalid extension providers.
pub const INVALID_MESH_CONFIG: &str = "InvalidMeshConfig";
/// The reporting controller.
pub const CONTROLLER: &str = "nodeward";
/// Notes are at most 1 kB (the API's limit).
const MAX_NOTE: usize = 1024;

/// One invalid object to report.
#[derive(Debug, Clone)]
pub struct Report {
    pub reference: ObjectReference,
    /// [`INVALID_POLICY`] or [`INVALID_MESH_CONFIG`].
    pub reason: &'static str,
    /// `field: problem` (several joined with `; `).
    pub note: String,
}

/// Where the source sends reports.
pub type Reports = mpsc::UnboundedSender<Report>;

/// Publishes reports until `shutdown` or the source is gone; a failure is logged and counted
/// (`nodeward_kubernetes_events_total{result="error"}`), never retried in a loop.
pub async fn publish(
    client: Client,
    node: String,
    mut reports: mpsc::UnboundedReceiver<Report>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: CONTROLLER.to_owned(),
            instance: Some(format!("{CONTROLLER}-{node}")),
        },
    );
    loop {
        let report = tokio::select! {
            () = shutdown.cancelled() => return,
            report = reports.recv() => match report {
                Some(report) => report,
                None => return,
            },
        };
        let event = Event {
            type_: EventType::Warning,
            reason: report.reason.to_owned(),
            note: Some(truncate(&report.note)),
            action: "Validate".to_owned(),
            secondary: None,
        };
        let object = format!(
            "{}/{}",
            report.reference.namespace.as_deref().unwrap_or_default(),
            report.reference.name.as_deref().unwrap_or_default()
        );
        match recorder.publish(&event, &report.reference).await {
            Ok(()) => {
                health.events_published.fetch_add(1, Ordering::Relaxed);
                debug!(object, reason = report.reason, "event published");
            }
            Err(e) => {
                health.events_failed.fetch_add(1, Ordering::Relaxed);
                warn!(object, reason = report.reason, error = %e, "cannot publish the event (check the events.k8s.io create permission); the problem is in the log and /debug/state");
            }
        }
    }
}

fn truncate(note: &str) -> String {
    if note.len() <= MAX_NOTE {
        return note.to_owned();
    }
    let mut end = MAX_NOTE - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}
