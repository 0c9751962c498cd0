//! Thousands of concurrent keep-alive connections through the enforcer (loopback only, bounded
//! in count and time): every request answered, nothing lost, and afterwards no connection
//! task or descriptor left behind. In its own test binary so the descriptor count is its own.

mod support;

use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::StatusCode;
use nodeward::enforcer::Limits;
use support::node::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_keep_alive_connections_leave_nothing_behind() {
    const CONNECTIONS: usize = 2000;
    const REQUESTS: usize = 3;
    let node = node_with(&policies(), Limits::default()).await;
    let fds_before = open_fds();
    let started = std::time::Instant::now();
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(http1(&node, KNOWN_CLIENT).await);
    }
    let mut tasks = tokio::task::JoinSet::new();
    for mut client in clients {
        tasks.spawn(async move {
            let mut ok = 0;
            for i in 0..REQUESTS {
                let req = get(&format!("/load/{i}"))
                    .body(Full::default())
                    .expect("request");
                if let Ok(res) = client.send_request(req).await {
                    let status = res.status();
                    let _ = res.into_body().collect().await;
                    if status == StatusCode::OK {
                        ok += 1;
                    }
                }
            }
            ok
        });
    }
    let mut ok = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_mins(2);
    while let Ok(Some(result)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        ok += result.expect("client task");
    }
    assert_eq!(
        ok,
        CONNECTIONS * REQUESTS,
        "every request answered 200 (took {:?})",
        started.elapsed()
    );
    assert_eq!(
        node.upstream.seen().len(),
        CONNECTIONS * REQUESTS,
        "nothing lost"
    );
    // Clients are gone (their connections dropped with the tasks): the enforcer's side drains.
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if node
                .metrics
                .encode()
                .contains("nodeward_connections_open 0")
                && node.tracker.is_empty()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "open connections left: {} tasks",
        node.tracker.len()
    );
    // Pooled upstream connections may stay open (bounded by the pool's idle timeout); the
    // client-facing descriptors must all be closed.
    // The pool keeps at most MAX_IDLE_PER_POD idle upstream connections (two descriptors each
    // here, since the pod lives in this process); extra ones close as they go idle.
    let limit = fds_before + 2 * nodeward::enforcer::upstream::MAX_IDLE_PER_POD + 16;
    let settled = tokio::time::timeout(Duration::from_secs(10), async {
        while open_fds() > limit {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        settled.is_ok(),
        "descriptors: {fds_before} before, {} after (limit {limit})",
        open_fds()
    );
}
