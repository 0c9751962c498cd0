//! Privileged tests of the datapath's setup against the real kernel, without steering traffic
//! (that is `datapath_steering.rs`): the BPF filesystem, pins, `CONFIG`, policy routing, TCX
//! attachments, the protected-endpoint map, guards, interfaces coming and going, link events,
//! route lookups, refusals before anything is created, and the kernel log switch.
//!
//! Needs `CAP_BPF`, `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (root) and iproute2: without them each test
//! FAILS, saying what is missing. Everything is removed by guards, also on panic.

mod datapath_support;

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use datapath_support::{
    config, request, serial, FakeEnforcer, PodServer, LISTENER_PORT, POD_PORT, ROUTE_TABLE,
    STEER_MARK, UPSTREAM_MARK,
};
use nodeward::datapath::{
    interface_for, on_bpffs, Datapath, DatapathConfig, DatapathError, FailureMode,
};
use nodeward_common::{
    config::{FAILURE_MODE_CLOSED, LOG_DECISIONS},
    EndpointKey, ENDPOINT_FLAGS_NONE, PORT_ANY,
};
use nodeward_tests::eventually;
use nodeward_tests::netns::{ip, TestNode, NODE_ADDR};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 2);
const LATE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 5, 2);
const ELSEWHERE: Ipv4Addr = Ipv4Addr::new(10, 200, 9, 9);

fn start(node: &TestNode, config: DatapathConfig) -> Datapath {
    node.run(|| Datapath::start(config))
        .unwrap_or_else(|e| panic!("Datapath::start: {e}"))
}

/// Names of the programs on `iface`'s TCX hook in the node.
fn tcx_program_names(node: &TestNode, iface: &str, attach_type: TcAttachType) -> Vec<String> {
    node.run(|| SchedClassifier::query_tcx(iface, attach_type))
        .unwrap_or_else(|e| panic!("querying TCX on {iface}: {e}"))
        .1
        .iter()
        .map(|info| info.name_as_str().unwrap_or("?").to_owned())
        .collect()
}

fn ifindex(node: &TestNode, iface: &str) -> u32 {
    let out = node.ip_out(&["-o", "link", "show", iface]);
    out.split(':')
        .next()
        .and_then(|index| index.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ifindex in `{out}`"))
}

#[test]
fn start_pins_configures_routes_and_attaches() {
    let _serial = serial();
    let mut node = TestNode::new("start");
    let pod = node.add_pod("pod", POD_IP);
    let config = config(&node, FailureMode::Closed);
    assert!(
        !on_bpffs(&config.pin_dir).expect("statfs"),
        "the test's bpffs is not mounted yet"
    );

    let datapath = start(&node, config.clone());

    // The BPF filesystem was mounted, maps and the link are pinned.
    assert!(on_bpffs(&config.pin_dir).expect("statfs"));
    for map in ["PROTECTED_ENDPOINTS", "CONFIG", "COUNTERS"] {
        assert!(
            config.pin_dir.join("maps").join(map).exists(),
            "{map} pinned"
        );
    }
    let pod_index = ifindex(&node, &pod.host_if);
    assert!(config
        .pin_dir
        .join(format!("links/steer-{pod_index}"))
        .exists());

    // CONFIG holds what the programs need.
    let kernel = datapath
        .kernel_config()
        .unwrap_or_else(|e| panic!("kernel_config: {e}"));
    assert_eq!(kernel.listener_port, LISTENER_PORT);
    assert_eq!(kernel.steer_mark, STEER_MARK);
    assert_eq!(kernel.upstream_mark, UPSTREAM_MARK);
    assert_eq!(kernel.failure_mode, FAILURE_MODE_CLOSED);
    assert_eq!(kernel.log_level, 0, "kernel log lines are off by default");

    // Policy routing, installed through netlink.
    let rules = node.ip_out(&["rule"]);
    assert!(
        rules.contains("50:\tfrom all fwmark 0x1000/0x1000 lookup 2700"),
        "{rules}"
    );
    let routes = node.ip_out(&["route", "show", "table", &ROUTE_TABLE.to_string()]);
    assert!(routes.contains("local default dev lo"), "{routes}");

    // steer on the veth's TCX ingress (bpftool does not list TCX links; the kernel does).
    assert_eq!(
        tcx_program_names(&node, &pod.host_if, TcAttachType::Ingress),
        vec!["steer"]
    );
    assert!(tcx_program_names(&node, &pod.host_if, TcAttachType::Egress).is_empty());

    // The log level is switched at run time.
    datapath
        .set_log_level(LOG_DECISIONS)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        datapath.kernel_config().expect("config").log_level,
        LOG_DECISIONS
    );

    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
    assert!(!config.pin_dir.exists());
}

#[test]
fn sync_writes_the_endpoint_map_and_guards_protected_pods() {
    let _serial = serial();
    let mut node = TestNode::new("sync");
    let pod = node.add_pod("pod", POD_IP);
    let config = config(&node, FailureMode::Closed);
    let datapath = start(&node, config.clone());
    let pod_index = ifindex(&node, &pod.host_if);

    // The protected-endpoint map: written as a diff, read back, raw keys in network order.
    let endpoints = [(POD_IP, PORT_ANY), (ELSEWHERE, 443)];
    let report = node
        .run(|| datapath.sync(&endpoints, std::slice::from_ref(&pod.host_if)))
        .unwrap_or_else(|e| panic!("sync: {e}"));
    assert_eq!(report.endpoints_added, 2);
    assert_eq!(report.guards_attached, vec![pod.host_if.clone()]);
    assert_eq!(
        datapath
            .protected_endpoints()
            .unwrap_or_else(|e| panic!("{e}")),
        vec![(POD_IP, PORT_ANY), (ELSEWHERE, 443)]
    );
    {
        let pinned = MapData::from_pin(config.pin_dir.join("maps/PROTECTED_ENDPOINTS"))
            .unwrap_or_else(|e| panic!("opening the pinned map: {e}"));
        let map: HashMap<MapData, EndpointKey, u32> =
            HashMap::try_from(aya::maps::Map::HashMap(pinned))
                .unwrap_or_else(|e| panic!("typing the pinned map: {e}"));
        let raw_key = EndpointKey::from_network_order(
            u32::from_ne_bytes(ELSEWHERE.octets()),
            u16::from_ne_bytes(443_u16.to_be_bytes()),
        );
        assert_eq!(
            map.get(&raw_key, 0)
                .unwrap_or_else(|e| panic!("raw key: {e}")),
            ENDPOINT_FLAGS_NONE
        );
    }
    assert_eq!(
        tcx_program_names(&node, &pod.host_if, TcAttachType::Egress),
        vec!["guard"]
    );
    let report = node
        .run(|| datapath.sync(&endpoints, std::slice::from_ref(&pod.host_if)))
        .unwrap_or_else(|e| panic!("sync: {e}"));
    assert_eq!(
        (report.endpoints_added, report.endpoints_removed),
        (0, 0),
        "idempotent"
    );
    assert!(report.guards_attached.is_empty());
    let report = node
        .run(|| datapath.sync(&[(ELSEWHERE, 443)], &["nw-no-such".to_owned()]))
        .unwrap_or_else(|e| panic!("sync: {e}"));
    assert_eq!(report.endpoints_removed, 1);
    assert_eq!(report.guards_detached, vec![pod.host_if.clone()]);
    assert_eq!(report.missing_interfaces, vec!["nw-no-such".to_owned()]);
    assert!(tcx_program_names(&node, &pod.host_if, TcAttachType::Egress).is_empty());
    assert!(!config
        .pin_dir
        .join(format!("links/guard-{pod_index}"))
        .exists());

    // Attaching from another network namespace than the node's is refused, not misapplied.
    match datapath.sync(&[], &[]) {
        Err(DatapathError::WrongNamespace { operation }) => assert_eq!(operation, "sync"),
        other => panic!("sync from the test's namespace: {other:?}"),
    }

    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
}

#[test]
fn interfaces_come_and_go_and_routes_name_them() {
    let _serial = serial();
    let mut node = TestNode::new("interfaces");
    let pod = node.add_pod("pod", POD_IP);
    let config = config(&node, FailureMode::Closed);
    let datapath = start(&node, config.clone());

    // Route lookups for the registry: a pod's host interface; none for local or unknown.
    assert_eq!(
        datapath
            .interface_for(POD_IP)
            .unwrap_or_else(|e| panic!("{e}")),
        Some(pod.host_if.clone())
    );
    assert_eq!(
        datapath
            .interface_for(NODE_ADDR)
            .unwrap_or_else(|e| panic!("{e}")),
        None
    );
    assert_eq!(
        node.run(|| interface_for(Ipv4Addr::new(192, 0, 2, 1)))
            .unwrap_or_else(|e| panic!("{e}")),
        None,
        "no route"
    );

    // Interfaces come and go.
    let late = node.add_pod("late", LATE_IP);
    let report = node
        .run(|| datapath.rescan_interfaces())
        .unwrap_or_else(|e| panic!("rescan: {e}"));
    assert_eq!(report.attached, vec![late.host_if.clone()]);
    let late_index = ifindex(&node, &late.host_if);
    // Deleting the node's end removes the pair at once (deleting the pod's namespace would, but
    // the kernel tears namespaces down asynchronously).
    ip(&["-n", &node.netns, "link", "del", &late.host_if]);
    let report = node
        .run(|| datapath.rescan_interfaces())
        .unwrap_or_else(|e| panic!("rescan: {e}"));
    assert_eq!(report.removed, vec![late.host_if.clone()]);
    assert!(!config
        .pin_dir
        .join(format!("links/steer-{late_index}"))
        .exists());

    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
    assert!(!config.pin_dir.exists());
}

#[test]
fn start_replaces_leftovers_it_cannot_adopt() {
    let _serial = serial();
    let mut node = TestNode::new("leftovers");
    let pod = node.add_pod("pod", POD_IP);
    let config = config(&node, FailureMode::Closed);
    drop(start(&node, config.clone())); // a crash: pins left behind
    let pod_index = ifindex(&node, &pod.host_if);
    let link_pin = config.pin_dir.join(format!("links/steer-{pod_index}"));

    // The attachment pin is replaced by something that is not a link (a map), and a pin with a
    // name nodeward never makes appears.
    std::fs::remove_file(&link_pin).expect("remove the link pin");
    let counters = MapData::from_pin(config.pin_dir.join("maps/COUNTERS")).expect("open a map");
    counters
        .pin(&link_pin)
        .expect("pin a map where the link was");
    counters
        .pin(config.pin_dir.join("links/stray"))
        .expect("pin a stray object");
    drop(counters);

    let datapath = start(&node, config.clone());
    assert_eq!(
        tcx_program_names(&node, &pod.host_if, TcAttachType::Ingress),
        vec!["steer"],
        "a new link was attached where the old pin could not be adopted"
    );
    let pinned = aya::programs::links::PinnedLink::from_pin(&link_pin)
        .unwrap_or_else(|e| panic!("the new link is pinned where the old pin was: {e}"));
    aya::programs::tc::SchedClassifierLink::try_from(aya::programs::links::FdLink::from(pinned))
        .unwrap_or_else(|e| panic!("the pin holds a TCX link: {e}"));
    assert!(
        !config.pin_dir.join("links/stray").exists(),
        "a pin nodeward does not know is removed"
    );
    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
    assert!(!config.pin_dir.exists());
}

#[test]
fn start_refuses_before_creating_anything() {
    let _serial = serial();
    let node = TestNode::new("refuses");
    let base = config(&node, FailureMode::Closed);

    let refusals: [(DatapathConfig, &str); 3] = [
        (
            DatapathConfig {
                upstream_mark: STEER_MARK,
                ..base.clone()
            },
            "upstream_mark",
        ),
        (
            DatapathConfig {
                uplinks: vec!["nw-no-uplink".to_owned()],
                ..base.clone()
            },
            "uplink interface `nw-no-uplink` does not exist",
        ),
        (
            base.clone(),
            "routing table 2700 already has a default route",
        ),
    ];
    for (index, (config, expected)) in refusals.into_iter().enumerate() {
        if index == 2 {
            // Someone else's default route in the configured table.
            ip(&[
                "-n",
                &node.netns,
                "route",
                "add",
                "unreachable",
                "default",
                "table",
                &ROUTE_TABLE.to_string(),
            ]);
        }
        let error = match node.run(|| Datapath::start(config)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("start must refuse: {expected}"),
        };
        assert!(
            error.contains(expected),
            "`{error}` should say `{expected}`"
        );
        assert!(!base.pin_dir.exists(), "nothing pinned after: {error}");
        assert!(
            !node.ip_out(&["rule"]).contains("fwmark"),
            "no rule after: {error}"
        );
    }
}

#[test]
fn link_events_announce_new_interfaces() {
    let _serial = serial();
    let mut node = TestNode::new("link-events");
    let _pod = node.add_pod("pod", POD_IP);
    let datapath = start(&node, config(&node, FailureMode::Closed));
    let ns = node.netns.clone();
    let late_if = node.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut events = datapath
                .link_events()
                .unwrap_or_else(|e| panic!("link_events: {e}"));
            assert!(!events.poll_changed().expect("poll"), "nothing pending yet");
            // A new pod's veth appears (created from another thread: `ip` is a process).
            let name = format!("nwkx{}", std::process::id());
            let (ns2, name2) = (ns.clone(), name.clone());
            std::thread::spawn(move || {
                ip(&[
                    "-n",
                    &ns2,
                    "link",
                    "add",
                    &name2,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("{name2}b"),
                ]);
            })
            .join()
            .expect("ip link add");
            tokio::time::timeout(Duration::from_secs(2), events.changed())
                .await
                .expect("a link event within 2 s")
                .unwrap_or_else(|e| panic!("changed: {e}"));
            let report = datapath
                .rescan_interfaces()
                .unwrap_or_else(|e| panic!("rescan: {e}"));
            assert!(report.attached.contains(&name), "{report:?}");
            assert!(report.attached.contains(&format!("{name}b")), "{report:?}");
            name
        })
    });
    assert!(datapath.attached().contains(&(late_if, "steer")));
    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
}

/// Captures what the tracing subscriber writes.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("capture")).into_owned()
    }
}

#[test]
fn kernel_log_lines_follow_the_run_time_level() {
    let _serial = serial();
    // The subscriber (with its `log` bridge) before the datapath: the log thread binds the `log`
    // crate's logger when it starts.
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .try_init()
        .expect("the only subscriber of this test binary");

    let mut node = TestNode::new("kernel-log");
    let client = node.add_pod("client", CLIENT_IP);
    let pod = node.add_pod("pod", POD_IP);
    let _pod_server = PodServer::start(&pod.netns, POD_IP, POD_PORT);
    let _enforcer = FakeEnforcer::start(&node.netns);
    let datapath = start(&node, config(&node, FailureMode::Closed));
    node.run(|| datapath.sync(&[(POD_IP, PORT_ANY)], std::slice::from_ref(&pod.host_if)))
        .unwrap_or_else(|e| panic!("sync: {e}"));
    let target = SocketAddrV4::new(POD_IP, POD_PORT);

    request(&client.netns, target, None, Duration::from_secs(3)).expect("steered, quiet");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !capture.text().contains("steer: "),
        "log level 0: no kernel lines: {}",
        capture.text()
    );

    datapath
        .set_log_level(LOG_DECISIONS)
        .unwrap_or_else(|e| panic!("{e}"));
    request(&client.netns, target, None, Duration::from_secs(3)).expect("steered, logged");
    let line = format!("steer: {CLIENT_IP}:");
    assert!(
        eventually(Duration::from_secs(2), || capture.text().contains(&line)
            && capture
                .text()
                .contains(&format!("-> {POD_IP}:{POD_PORT} flags 2 reason 4"))),
        "log level 2: the SYN's decision (reason 4, STEER_LISTENER) is logged: {}",
        capture.text()
    );
    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
}
