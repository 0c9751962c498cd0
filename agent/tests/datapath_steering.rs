//! Privileged end-to-end tests of the datapath: real kernel programs on a node made of network
//! namespaces (the test kit's `TestNode`), real TCP through a stand-in enforcer
//! (`datapath_support`).
//!
//! The stand-in enforcer is a transparent listener in the node's namespace that records
//! `getsockname()` of each accepted connection (it must be the pod's address and port) and proxies
//! it to the pod from a socket marked with the upstream mark, prefixing the answer with
//! `enforcer|`. The pods answer `pod saw <peer>`, so each answer says which way it came:
//! `enforcer|pod saw 10.200.255.1` (through the enforcer, whose upstream source is the node's
//! address) or `pod saw 10.200.1.2` (straight from the client).
//!
//! No bypass is tested like a security property: every path into a protected pod that does not
//! go through the enforcer must fail, and the pod must never see the client's address.
//!
//! Needs `CAP_BPF`, `CAP_NET_ADMIN` and `CAP_SYS_ADMIN` (root) and iproute2: without them each test
//! FAILS, saying what is missing. Everything is removed by guards, also on panic.

mod datapath_support;

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use datapath_support::{
    config, request, serial, Accepted, FakeEnforcer, PodServer, POD_PORT, ROUTE_TABLE,
    UPSTREAM_MARK,
};
use nodeward::datapath::{Counters, Datapath, FailureMode};
use nodeward_common::PORT_ANY;
use nodeward_tests::eventually;
use nodeward_tests::netns::{TestNode, NODE_ADDR};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 2);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 2);
const OTHER_POD_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 3, 2);
const ROGUE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 4, 2);

const POD: SocketAddrV4 = SocketAddrV4::new(POD_IP, POD_PORT);
const OTHER_POD: SocketAddrV4 = SocketAddrV4::new(OTHER_POD_IP, POD_PORT);

/// Time a connection that must succeed gets.
const OK_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a connection that must fail (its SYN dropped) gets before we call it dropped.
const DROP_TIMEOUT: Duration = Duration::from_millis(400);

fn through_enforcer() -> String {
    format!("enforcer|pod saw {NODE_ADDR}")
}

fn direct_from(ip: Ipv4Addr) -> String {
    format!("pod saw {ip}")
}

fn counters(datapath: &Datapath) -> Counters {
    datapath
        .counters()
        .unwrap_or_else(|e| panic!("reading counters: {e}"))
}

fn start(node: &TestNode, mode: FailureMode) -> Datapath {
    node.run(|| Datapath::start(config(node, mode)))
        .unwrap_or_else(|e| panic!("Datapath::start: {e}"))
}

fn protect(node: &TestNode, datapath: &Datapath, guarded: &[&str]) {
    let guarded: Vec<String> = guarded.iter().map(|s| (*s).to_owned()).collect();
    let report = node
        .run(|| datapath.sync(&[(POD_IP, PORT_ANY)], &guarded))
        .unwrap_or_else(|e| panic!("sync: {e}"));
    assert!(report.missing_interfaces.is_empty(), "{report:?}");
}

/// Asserts that a connection from `ns` to `target` fails (its SYN is dropped).
fn assert_dropped(ns: &str, target: SocketAddrV4, mark: Option<u32>, what: &str) {
    match request(ns, target, mark, DROP_TIMEOUT) {
        Err(_) => {}
        Ok(reply) => panic!("{what}: the connection to {target} must be dropped, got `{reply}`"),
    }
}

fn assert_reply(ns: &str, target: SocketAddrV4, mark: Option<u32>, expected: &str, what: &str) {
    match request(ns, target, mark, OK_TIMEOUT) {
        Ok(reply) => assert_eq!(reply, expected, "{what}"),
        Err(e) => panic!("{what}: connecting to {target} failed: {e}"),
    }
}

/// Programs attached to `iface`'s TCX hook in the node, by id.
fn tcx_programs(node: &TestNode, iface: &str, attach_type: TcAttachType) -> Vec<u32> {
    node.run(|| SchedClassifier::query_tcx(iface, attach_type))
        .unwrap_or_else(|e| panic!("querying TCX on {iface}: {e}"))
        .1
        .iter()
        .map(aya::programs::ProgramInfo::id)
        .collect()
}

/// (3) No bypass: every path into the protected pod that skips `steer` meets `guard`: the node's
/// own flows are sent through `lo` to the enforcer, forwarded ones from an unhooked interface are
/// dropped; and a rescan hooks a new interface.
fn assert_no_bypass(
    node: &mut TestNode,
    datapath: &Datapath,
    enforcer: &FakeEnforcer,
    pod_server: &PodServer,
) {
    // (3) No bypass. (a) A client on an interface added after start, not rescanned: no steer
    // there, so its SYN is forwarded to the pod, and guard drops it.
    let rogue = node.add_pod("rogue", ROGUE_IP);
    let before = counters(datapath);
    assert_dropped(
        &rogue.netns,
        POD,
        None,
        "unhooked interface to the protected pod",
    );
    let after = counters(datapath);
    assert!(
        after.guard_dropped_bypass > before.guard_dropped_bypass,
        "guard counted the bypass attempt: {after:?}"
    );
    assert_eq!(
        after.guard_redirected_listener, before.guard_redirected_listener,
        "a forwarded flow is not sent to lo: {after:?}"
    );
    assert_reply(
        &rogue.netns,
        OTHER_POD,
        None,
        &direct_from(ROGUE_IP),
        "the unhooked client still reaches unprotected pods",
    );
    // (b) A client in the node's namespace itself (never crosses a TC ingress hook): through
    // the enforcer too, which sees the node's address as the peer.
    let before = counters(datapath);
    assert_reply(
        &node.netns,
        POD,
        None,
        &through_enforcer(),
        "node-local client to the protected pod: judged by the enforcer",
    );
    let after = counters(datapath);
    assert!(
        after.guard_redirected_listener > before.guard_redirected_listener
            && after.guard_redirected_established > before.guard_redirected_established,
        "guard sent the node's flow to lo: {after:?}"
    );
    assert_eq!(after.guard_dropped_bypass, before.guard_dropped_bypass);
    assert_eq!(
        enforcer.accepted().last().map(|a| (a.peer.ip(), a.local)),
        Some((NODE_ADDR.into(), SocketAddr::V4(POD))),
        "the enforcer got the node's connection with the pod's address"
    );
    // (c) The same path with the enforcer's upstream mark is the enforcer's own, and passes.
    assert_reply(
        &node.netns,
        POD,
        Some(UPSTREAM_MARK),
        &direct_from(NODE_ADDR),
        "marked like the enforcer's upstream",
    );
    assert!(
        !pod_server.peers().contains(&ROGUE_IP) && !pod_server.peers().contains(&CLIENT_IP),
        "no client reached the protected pod directly: {:?}",
        pod_server.peers()
    );
    // (d) After a rescan the new interface is steered too.
    let report = node
        .run(|| datapath.rescan_interfaces())
        .unwrap_or_else(|e| panic!("rescan: {e}"));
    assert_eq!(report.attached, vec![rogue.host_if.clone()], "{report:?}");
    assert_reply(
        &rogue.netns,
        POD,
        None,
        &through_enforcer(),
        "rescanned interface",
    );
    assert_eq!(
        enforcer.accepted().last().map(|a| a.peer.ip()),
        Some(ROGUE_IP.into())
    );
}

#[test]
fn protected_pod_is_reached_only_through_the_enforcer() {
    let _serial = serial();
    let started = Instant::now();
    let mut node = TestNode::new("steering");
    let client = node.add_pod("client", CLIENT_IP);
    let pod = node.add_pod("pod", POD_IP);
    let other = node.add_pod("other", OTHER_POD_IP);
    let pod_server = PodServer::start(&pod.netns, POD_IP, POD_PORT);
    let other_server = PodServer::start(&other.netns, OTHER_POD_IP, POD_PORT);
    let enforcer = FakeEnforcer::start(&node.netns);

    let datapath = start(&node, FailureMode::Closed);
    protect(&node, &datapath, &[&pod.host_if]);
    let attached = datapath.attached();
    for iface in [&client.host_if, &pod.host_if, &other.host_if] {
        assert!(
            attached.contains(&(iface.clone(), "steer")),
            "steer on every interface: {attached:?}"
        );
    }
    assert!(
        attached.contains(&(pod.host_if.clone(), "guard")),
        "guard on the protected pod's interface: {attached:?}"
    );
    assert!(
        attached.contains(&("lo".to_owned(), "steer")),
        "steer on lo, where guard redirects the node's own flows: {attached:?}"
    );
    assert!(
        !attached.contains(&("lo".to_owned(), "guard")),
        "{attached:?}"
    );

    // (1) A client's connection to the protected pod arrives at the enforcer's listener with the
    // pod as original destination, and the pod's answer comes back through the enforcer.
    let before = counters(&datapath);
    assert_reply(
        &client.netns,
        POD,
        None,
        &through_enforcer(),
        "protected pod via the enforcer",
    );
    let accepted = enforcer.accepted();
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    let Accepted { peer, local } = accepted[0];
    assert_eq!(peer.ip(), CLIENT_IP, "the enforcer sees the real client");
    assert_eq!(
        local,
        SocketAddr::V4(POD),
        "getsockname() on the accepted socket is the original destination"
    );
    assert_eq!(
        pod_server.peers(),
        vec![NODE_ADDR],
        "the pod sees only the enforcer"
    );
    let after = counters(&datapath);
    assert!(
        after.assigned_listener > before.assigned_listener,
        "SYN assigned to the listener: {before:?} -> {after:?}"
    );
    assert!(
        after.assigned_established > before.assigned_established,
        "later segments assigned to the enforcer's socket: {after:?}"
    );
    assert_eq!(
        after.steered - before.steered,
        (after.assigned_listener - before.assigned_listener)
            + (after.assigned_established - before.assigned_established)
    );
    assert!(
        after.guard_passed_enforcer > before.guard_passed_enforcer,
        "SO_MARK of the enforcer's upstream socket is seen in skb->mark at the veth's TC egress: \
         {after:?}"
    );
    assert_eq!(
        after.dropped(),
        0,
        "steered client packets never reach the pod's egress: {after:?}"
    );

    // (2) An unprotected pod costs a lookup and is reached directly; the enforcer sees nothing.
    let before = counters(&datapath);
    assert_reply(
        &client.netns,
        OTHER_POD,
        None,
        &direct_from(CLIENT_IP),
        "unprotected pod, directly",
    );
    let after = counters(&datapath);
    assert!(after.not_protected > before.not_protected, "{after:?}");
    assert_eq!(after.steered, before.steered, "nothing steered");
    assert_eq!(enforcer.accepted().len(), 1, "the enforcer saw nothing new");
    assert_eq!(other_server.peers(), vec![CLIENT_IP]);

    assert_no_bypass(&mut node, &datapath, &enforcer, &pod_server);

    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
    eprintln!(
        "protected_pod_is_reached_only_through_the_enforcer: {:?}",
        started.elapsed()
    );
}

#[test]
fn failure_mode_closed_drops_and_open_passes_when_the_listener_is_gone() {
    let _serial = serial();
    let started = Instant::now();
    let mut node = TestNode::new("failure-mode");
    let client = node.add_pod("client", CLIENT_IP);
    let pod = node.add_pod("pod", POD_IP);
    let pod_server = PodServer::start(&pod.netns, POD_IP, POD_PORT);

    // No enforcer listening: the agent is down.
    let datapath = start(&node, FailureMode::Closed);
    protect(&node, &datapath, &[&pod.host_if]);

    let before = counters(&datapath);
    assert_dropped(&client.netns, POD, None, "closed mode, steered path");
    assert_dropped(&node.netns, POD, None, "closed mode, node-local path");
    let after = counters(&datapath);
    assert!(
        after.dropped_failure_closed > before.dropped_failure_closed,
        "{after:?}"
    );
    assert!(
        after.guard_dropped_failure_closed > before.guard_dropped_failure_closed,
        "{after:?}"
    );
    assert!(after.listener_missing > before.listener_missing);
    assert!(pod_server.peers().is_empty(), "{:?}", pod_server.peers());

    datapath
        .set_failure_mode(FailureMode::Open)
        .unwrap_or_else(|e| panic!("set_failure_mode: {e}"));
    let before = counters(&datapath);
    assert_reply(
        &client.netns,
        POD,
        None,
        &direct_from(CLIENT_IP),
        "open mode: straight to the pod",
    );
    let after = counters(&datapath);
    assert!(
        after.passed_failure_open > before.passed_failure_open,
        "{after:?}"
    );
    assert!(
        after.guard_passed_failure_open > before.guard_passed_failure_open,
        "{after:?}"
    );
    assert_eq!(after.steered, before.steered);

    // The listener is back: open mode steers like closed mode.
    let enforcer = FakeEnforcer::start(&node.netns);
    assert_reply(
        &client.netns,
        POD,
        None,
        &through_enforcer(),
        "open mode with the enforcer up",
    );
    assert_eq!(enforcer.accepted().len(), 1);

    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));
    eprintln!(
        "failure_mode_closed_drops_and_open_passes_when_the_listener_is_gone: {:?}",
        started.elapsed()
    );
}

#[test]
fn clean_shutdown_leaves_no_pin_rule_route_or_link() {
    let _serial = serial();
    let started = Instant::now();
    let mut node = TestNode::new("shutdown");
    let client = node.add_pod("client", CLIENT_IP);
    let pod = node.add_pod("pod", POD_IP);
    let _pod_server = PodServer::start(&pod.netns, POD_IP, POD_PORT);
    let enforcer = FakeEnforcer::start(&node.netns);
    let config = config(&node, FailureMode::Closed);

    let datapath = start(&node, FailureMode::Closed);
    protect(&node, &datapath, &[&pod.host_if]);
    assert!(config
        .pin_dir
        .join("links")
        .read_dir()
        .is_ok_and(|mut d| d.next().is_some()));
    assert!(node
        .ip_out(&["rule"])
        .contains("fwmark 0x1000/0x1000 lookup 2700"));
    assert!(node
        .ip_out(&["route", "show", "table", &ROUTE_TABLE.to_string()])
        .contains("local default dev lo"));
    assert_reply(
        &client.netns,
        POD,
        None,
        &through_enforcer(),
        "before shutdown",
    );

    datapath
        .shutdown()
        .unwrap_or_else(|e| panic!("shutdown: {e}"));

    assert!(
        !config.pin_dir.exists(),
        "{} must be gone",
        config.pin_dir.display()
    );
    let rules = node.ip_out(&["rule"]);
    assert!(!rules.contains("fwmark"), "rules left: {rules}");
    let routes = node.ip_out(&["route", "show", "table", &ROUTE_TABLE.to_string()]);
    assert!(routes.trim().is_empty(), "routes left: {routes}");
    for iface in [&client.host_if, &pod.host_if] {
        for attach_type in [TcAttachType::Ingress, TcAttachType::Egress] {
            let programs = tcx_programs(&node, iface, attach_type);
            assert!(
                programs.is_empty(),
                "{iface} {attach_type:?} still has {programs:?}"
            );
        }
    }
    // Nothing steers any more: the client reaches the pod directly (a clean exit ends
    // enforcement, by definition).
    assert_reply(
        &client.netns,
        POD,
        None,
        &direct_from(CLIENT_IP),
        "after shutdown",
    );
    assert_eq!(enforcer.accepted().len(), 1);
    eprintln!(
        "clean_shutdown_leaves_no_pin_rule_route_or_link: {:?}",
        started.elapsed()
    );
}

/// (C) Leftovers of a crash can be removed without starting.
fn assert_leftovers_removed(
    node: &TestNode,
    datapath: Datapath,
    config: &nodeward::datapath::DatapathConfig,
    client_if: &str,
) {
    drop(datapath);
    let report = node
        .run(|| Datapath::cleanup_leftovers(config))
        .unwrap_or_else(|e| panic!("cleanup_leftovers: {e}"));
    // Maps: PROTECTED_ENDPOINTS, CONFIG, COUNTERS, the fast path's FAST_PATH_SOCKETS,
    // OPENED_FLOWS and NODE_NETNS, and in-pod steering's POD_ADDRESSES (the object pins them
    // all whatever runs).
    assert!(
        report.links >= 3 && report.maps == 7 && report.rule && report.route,
        "{report:?}"
    );
    assert!(!config.pin_dir.exists());
    assert!(tcx_programs(node, client_if, TcAttachType::Ingress).is_empty());
    assert!(!node.ip_out(&["rule"]).contains("fwmark"));
}

/// Connects from a namespace to the protected pod over and over until stopped; keeps every
/// outcome.
struct Prober {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Vec<Result<String, String>>>,
}

impl Prober {
    fn start(ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (stop, ns) = (Arc::clone(&stop), ns.to_owned());
            thread::spawn(move || {
                let mut outcomes = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    outcomes.push(
                        request(&ns, POD, None, Duration::from_secs(1)).map_err(|e| e.to_string()),
                    );
                    thread::sleep(Duration::from_millis(5));
                }
                outcomes
            })
        };
        Self { stop, thread }
    }

    fn stop(self) -> Vec<Result<String, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("prober")
    }
}

#[test]
fn restart_over_a_crash_adopts_the_pins_without_a_gap() {
    let _serial = serial();
    let started = Instant::now();
    let mut node = TestNode::new("restart");
    let client = node.add_pod("client", CLIENT_IP);
    let pod = node.add_pod("pod", POD_IP);
    let pod_server = PodServer::start(&pod.netns, POD_IP, POD_PORT);
    let enforcer = FakeEnforcer::start(&node.netns);
    let config = config(&node, FailureMode::Closed);

    let datapath = start(&node, FailureMode::Closed);
    protect(&node, &datapath, &[&pod.host_if]);
    assert_reply(&client.netns, POD, None, &through_enforcer(), "first run");
    let first_programs = tcx_programs(&node, &client.host_if, TcAttachType::Ingress);
    assert_eq!(first_programs.len(), 1, "{first_programs:?}");

    // (A) The datapath restarts while the enforcer keeps listening (an upgrade, or a crash of
    // the datapath's owner alone): probes run the whole time, and every one must go through the
    // enforcer: no instant without a program, no packet straight to the pod.
    let prober = Prober::start(&client.netns);
    assert!(eventually(Duration::from_secs(2), || enforcer
        .accepted()
        .len()
        > 3));
    drop(datapath); // a crash: nothing removed
    assert!(config.pin_dir.join("maps/PROTECTED_ENDPOINTS").exists());
    assert_eq!(
        tcx_programs(&node, &client.host_if, TcAttachType::Ingress),
        first_programs,
        "the pinned link keeps the program attached after the crash"
    );
    thread::sleep(Duration::from_millis(100));
    let datapath = start(&node, FailureMode::Closed);
    let accepted_at_restart = enforcer.accepted().len();
    assert!(eventually(Duration::from_secs(2), || enforcer
        .accepted()
        .len()
        > accepted_at_restart + 3));
    let outcomes = prober.stop();
    assert!(outcomes.len() > 6, "{outcomes:?}");
    for outcome in &outcomes {
        assert_eq!(
            outcome.as_deref(),
            Ok(through_enforcer().as_str()),
            "every probe across the restart goes through the enforcer: {outcomes:?}"
        );
    }
    let second_programs = tcx_programs(&node, &client.host_if, TcAttachType::Ingress);
    assert_eq!(
        second_programs.len(),
        1,
        "one link, updated in place: {second_programs:?}"
    );
    assert_ne!(
        second_programs, first_programs,
        "the new run's program was swapped in"
    );
    assert_eq!(
        datapath
            .protected_endpoints()
            .unwrap_or_else(|e| panic!("{e}")),
        vec![(POD_IP, PORT_ANY)],
        "the pinned map was adopted with its content, before any sync"
    );
    assert!(
        datapath
            .attached()
            .contains(&(pod.host_if.clone(), "guard")),
        "the guard attachment was adopted: {:?}",
        datapath.attached()
    );

    // (B) A full crash: the datapath and the enforcer's listener are gone. Enforcement stays:
    // in closed mode the client's SYN is dropped, never delivered to the pod.
    let dropped_before = counters(&datapath).dropped_failure_closed;
    drop(datapath);
    enforcer.stop();
    assert_dropped(&client.netns, POD, None, "between crash and restart");
    let node_ns = &node.netns;
    assert_dropped(node_ns, POD, None, "node-local, between crash and restart");
    let enforcer = FakeEnforcer::start(&node.netns);
    let datapath = start(&node, FailureMode::Closed);
    let after = counters(&datapath);
    assert!(
        after.dropped_failure_closed > dropped_before,
        "the pinned counters kept counting while the agent was down: {after:?}"
    );
    assert!(after.guard_dropped_failure_closed > 0, "{after:?}");
    let client_ns = &client.netns;
    assert_reply(client_ns, POD, None, &through_enforcer(), "after restart");
    assert_eq!(enforcer.accepted().len(), 1);
    assert!(
        !pod_server.peers().contains(&CLIENT_IP),
        "the client never reached the pod directly: {:?}",
        pod_server.peers()
    );

    assert_leftovers_removed(&node, datapath, &config, &client.host_if);
    eprintln!(
        "restart_over_a_crash_adopts_the_pins_without_a_gap: {:?}",
        started.elapsed()
    );
}
