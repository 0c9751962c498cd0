//! Connections that are not HTTP (TLS, or another protocol) on a steered port: Istio's TCP
//! semantics. Authorization runs once per connection with no HTTP attributes (an ALLOW rule
//! that needs them is dropped, a DENY rule ignores them) and `connection.sni` from the TLS
//! ClientHello; allowed bytes are spliced to the pod untouched, denied connections are closed.
//!
//! A client that sends nothing within the detection timeout (undeclared port) may be speaking a
//! protocol in which the server speaks first (`MySQL`, SMTP, ...), or may be an HTTP client that
//! waits on purpose. Treating the wait as "TCP" would let an HTTP request skip JWT checks and
//! HTTP rules, so [`first_speaker`] opens the pod connection and watches both sides, passing no
//! byte either way: if the pod speaks first, the connection is judged as TCP and spliced
//! ([`serve_server_first`]); if the client speaks first, the pod connection is closed and the
//! client's bytes are sniffed as usual, so an HTTP request is judged as HTTP however late it
//! comes. An HTTP server never speaks first, so a client cannot make its request look like a
//! server-first protocol.

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::{ConnectionInfo, Enforcer};
use crate::decision::{decide_tcp, tcp_after_custom};
use crate::extauthz::CheckInput;
use crate::metrics::{RequestLabels, SharedLabel};

/// Whether an allowed TCP connection goes on, after it was judged, counted and logged.
async fn authorize(
    enforcer: &Enforcer,
    info: ConnectionInfo,
    sni: Option<&str>,
    server_first: bool,
) -> bool {
    let started = Instant::now();
    let snapshot = enforcer.store.load();
    let view = snapshot.destination(info.workload_ip()).cloned();
    let workload_id = view
        .as_ref()
        .map_or_else(super::no_workload, |w| w.id.clone());
    let mut verdict = decide_tcp(sni, &enforcer.judge(&snapshot, view.as_deref(), info));
    enforcer
        .metrics
        .decision_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Some(call) = verdict.custom.clone() {
        // Envoy's network ext_authz filter: a gRPC check with the peers only.
        let destination_principal = view.as_deref().map(|v| snapshot.principal_of(&v.workload));
        let input = CheckInput {
            source: info.peer,
            source_principal: snapshot
                .source(info.peer.ip())
                .map(|s| s.principal.as_str()),
            destination: info.original_dst,
            destination_principal: destination_principal.as_deref(),
            http: None,
        };
        let result = enforcer.extauthz.check(&call.provider, &input).await;
        enforcer.metrics.extauthz(&result);
        super::log_check(&result, info);
        let judge = enforcer.judge(&snapshot, view.as_deref(), info);
        verdict = tcp_after_custom(verdict, sni, &judge, result);
    }
    let decision = if verdict.allow { "allow" } else { "deny" };
    enforcer
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            workload: SharedLabel(workload_id.clone()),
            decision,
            code: 0,
            reason: verdict.reason.label(),
        })
        .inc();
    let protocol = match (sni.is_some(), server_first) {
        (true, _) => "tls",
        (false, true) => "tcp_server_first",
        (false, false) => "tcp",
    };
    tracing::info!(
        target: "access",
        source = %info.peer,
        destination = %info.original_dst,
        workload = %workload_id,
        protocol,
        sni = sni.unwrap_or("-"),
        decision,
        reason = %verdict.reason,
        policy = verdict.policy.as_deref().unwrap_or("-"),
        provider = verdict.check.as_ref().map_or("-", |c| c.provider.as_str()),
        provider_result = verdict.check.as_ref().map_or("-", |c| c.label()),
        provider_us = verdict
            .check
            .as_ref()
            .map_or(0, |c| u64::try_from(c.elapsed.as_micros()).unwrap_or(u64::MAX)),
        latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
    );
    verdict.allow
}

/// Copies both ways until either side is done, or shutdown.
async fn splice(mut client: TcpStream, mut upstream: TcpStream, shutdown: CancellationToken) {
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "TCP splice ended");
            }
        }
        () = shutdown.cancelled() => {}
    }
}

pub(super) async fn serve(
    enforcer: Arc<Enforcer>,
    stream: TcpStream,
    info: ConnectionInfo,
    sni: Option<String>,
    shutdown: CancellationToken,
) {
    if !authorize(&enforcer, info, sni.as_deref(), false).await {
        return; // dropping the stream closes it
    }
    let connect = super::upstream::connect(info.original_dst, enforcer.upstream.dial()).await;
    let upstream = match connect {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(dst = %info.original_dst, error = %e, "upstream connect failed");
            return;
        }
    };
    splice(stream, upstream, shutdown).await;
}

/// Who spoke first on a connection whose client was silent through the detection timeout.
pub(super) enum FirstSpeaker {
    /// The pod: its connection, with its first bytes unread.
    Server(TcpStream),
    /// The client: its bytes are unread; the pod connection is closed.
    Client,
    /// Either side closed, the pod could not be reached, or shutdown.
    Gone,
}

/// Opens the pod connection and waits, passing nothing, until one side sends a byte.
pub(super) async fn first_speaker(
    enforcer: &Enforcer,
    client: &TcpStream,
    info: ConnectionInfo,
    shutdown: &CancellationToken,
) -> FirstSpeaker {
    let upstream = match super::upstream::connect(info.original_dst, enforcer.upstream.dial()).await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(dst = %info.original_dst, error = %e, "upstream connect failed");
            return FirstSpeaker::Gone;
        }
    };
    let (mut a, mut b) = ([0u8; 5], [0u8; 1]);
    tokio::select! {
        biased;
        () = shutdown.cancelled() => FirstSpeaker::Gone,
        // The pod is looked at first: when both spoke, the protocol is server-first. An HTTP
        // server that speaks first is timing the connection out (`408`): that is no
        // server-first protocol, and the connection ends rather than going unjudged.
        r = upstream.peek(&mut a) => match r {
            Ok(n) if n > 0 && !b"HTTP/".starts_with(&a[..n]) => FirstSpeaker::Server(upstream),
            _ => FirstSpeaker::Gone,
        },
        r = client.peek(&mut b) => match r {
            Ok(n) if n > 0 => FirstSpeaker::Client,
            _ => FirstSpeaker::Gone,
        },
    }
}

/// A connection in which the pod spoke first: judged as TCP, then spliced (the pod's first
/// bytes included) or closed.
pub(super) async fn serve_server_first(
    enforcer: Arc<Enforcer>,
    stream: TcpStream,
    upstream: TcpStream,
    info: ConnectionInfo,
    shutdown: CancellationToken,
) {
    if !authorize(&enforcer, info, None, true).await {
        return;
    }
    splice(stream, upstream, shutdown).await;
}
