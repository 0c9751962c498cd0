//! Connections that are not HTTP (TLS, or another protocol) on a steered port: Istio's TCP
//! semantics. Authorization runs once per connection with no HTTP attributes (an ALLOW rule
//! that needs them is dropped, a DENY rule ignores them) and `connection.sni` from the TLS
//! ClientHello; allowed bytes are spliced to the pod untouched, denied connections are closed.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::probe::Attempt;
use super::{ConnectionInfo, Enforcer};
use crate::authz::Request;
use crate::metrics::{RequestLabels, SharedLabel};

pub(super) async fn serve(
    enforcer: Arc<Enforcer>,
    mut stream: TcpStream,
    info: ConnectionInfo,
    sni: Option<String>,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let snapshot = enforcer.store.load();
    let workload = snapshot.destination(info.original_dst.ip()).cloned();
    let workload_id = workload
        .as_ref()
        .map_or_else(super::no_workload, |w| w.id.clone());
    let (allow, reason, policy) = match &workload {
        None => (false, "unknown_destination", None),
        Some(view) if sni.is_none() && enforcer.is_probe(&view.workload, &info, Attempt::Tcp) => {
            (true, "probe", None)
        }
        Some(view) => {
            let request = Request {
                source: snapshot.peer(info.peer.ip()),
                destination_ip: Some(info.original_dst.ip()),
                destination_port: info.original_dst.port(),
                sni: sni.as_deref(),
                http: None,
            };
            let decision = view.authz.evaluate(&request);
            let word = if decision.allow { "allowed" } else { "denied" };
            (decision.allow, word, decision.decided_by.map(|m| m.policy))
        }
    };
    enforcer
        .metrics
        .decision_seconds
        .observe(started.elapsed().as_secs_f64());
    let decision = if allow { "allow" } else { "deny" };
    enforcer
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            workload: SharedLabel(workload_id.clone()),
            decision,
            code: 0,
            reason: format!("tcp_{reason}").into(),
        })
        .inc();
    tracing::info!(
        target: "access",
        source = %info.peer,
        destination = %info.original_dst,
        workload = %workload_id,
        protocol = if sni.is_some() { "tls" } else { "tcp" },
        sni = sni.as_deref().unwrap_or("-"),
        decision,
        reason,
        policy = policy.as_deref().unwrap_or("-"),
        latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    );
    drop(snapshot);
    if !allow {
        return; // dropping the stream closes it
    }
    let connect = super::upstream::connect(
        info.original_dst,
        enforcer.config.upstream_mark,
        enforcer.config.connect_timeout,
    )
    .await;
    let mut upstream = match connect {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(dst = %info.original_dst, error = %e, "upstream connect failed");
            return;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut stream, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "TCP splice ended");
            }
        }
        () = shutdown.cancelled() => {}
    }
}
