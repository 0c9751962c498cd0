//! The agent started in-process from a `Config` (`nodeward::app`), as `nodeward run` starts
//! it: on loopback ports the kernel picks, without the kernel data path, over `examples/`.
//! The enforcer's transparent listener needs `CAP_NET_ADMIN` (root): without it the start
//! fails saying so, and so does the test.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use nodeward::app;
use nodeward::config::{Config, DatapathMode, FastPathMode};

/// `GET path` with `Connection: close`; the status and body.
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("sending the request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("reading the answer");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    (status, body.to_owned())
}

#[test]
fn the_agent_starts_in_process_and_reports_what_it_bound() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("address"),
        admin: "127.0.0.1:0".parse().expect("address"),
        policies: vec![examples.join("policies")],
        workloads: Some(examples.join("workloads.yaml")),
        datapath: DatapathMode::Off,
        fast_path: FastPathMode::Off,
        ..Config::default()
    };
    let bound = app::start(config.clone()).unwrap_or_else(|e| panic!("starting the agent: {e}"));
    assert_ne!(bound.listen_addr().port(), 0, "the listener's port");
    assert_ne!(bound.admin_addr().port(), 0, "the admin server's port");
    assert_eq!(bound.store().load().generation, 1, "the first snapshot");

    let (status, body) = get(bound.admin_addr(), "/readyz");
    assert!(body.contains("[+]config generation 1"), "{status}: {body}");
    assert!(body.contains("[+]listener"), "{status}: {body}");
    let (status, state) = get(bound.admin_addr(), "/debug/state");
    assert_eq!(status, 200, "{state}");
    let state: serde_json::Value = serde_json::from_str(&state).expect("JSON");
    let shown: Config = serde_json::from_value(state["config"].clone()).expect("a Config");
    assert_eq!(shown, config, "/debug/state shows the configuration as is");
    // Added by `nodeward run`, not by the app.
    let (status, _) = get(bound.admin_addr(), "/check");
    assert_eq!(status, 404);

    let admin = bound.admin_addr();
    bound.stop("test");
    assert!(
        TcpStream::connect_timeout(&admin, Duration::from_millis(500)).is_err(),
        "the admin server still answers after stop"
    );
}
