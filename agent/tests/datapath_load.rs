//! Privileged test of the datapath loader against the real kernel.
//!
//! Builds a tiny node: two network namespaces made for this test, "node" and "pod", joined by a
//! veth pair (192.0.2.1/24 on the node side, 192.0.2.2/24 on the pod side: a documentation range,
//! used only inside these namespaces). It loads the embedded eBPF object, attaches `steer` to the
//! ingress of the node-side veth (traffic leaving the pod), protects one endpoint, and checks:
//! - the kernel lists the program on the interface's TCX ingress hook;
//! - the protected endpoint round-trips through `PROTECTED_ENDPOINTS`, in network byte order;
//! - real TCP connection attempts from the pod are classified and counted, and pass (the node's
//!   stack answers them, so the classifier returned `TC_ACT_OK`).
//!
//! Needs root (`CAP_BPF`, `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`) and iproute2: without them it
//! FAILS, saying what is missing. Everything it creates is removed by a guard's `Drop`, also when
//! it panics. Names carry the process id, so parallel runs do not collide.

use std::{
    fs::{self, File},
    io,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    path::Path,
    process::Command,
    thread,
    time::Duration,
};

use aya::{
    maps::{HashMap, MapData},
    programs::{SchedClassifier, TcAttachType},
};
use nodeward::datapath::{self, Counters};
use nodeward_common::{EndpointKey, ENDPOINT_FLAGS_NONE};

const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const POD_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const PROTECTED_PORT: u16 = 8080;
const UNPROTECTED_PORT: u16 = 8081;

#[test]
fn loads_attaches_and_counts_on_a_veth() {
    require_privileges();
    // Declared before the eBPF object so it is dropped after it: programs detach first.
    let net = TestNet::create();

    let mut ebpf = datapath::load().unwrap_or_else(|e| panic!("datapath::load: {e}"));
    in_netns(&net.node_ns, || {
        datapath::attach_tc(&mut ebpf, &net.node_if)
    })
    .unwrap_or_else(|e| panic!("datapath::attach_tc on {}: {e}", net.node_if));

    // The kernel lists our program on the interface's ingress hook (TCX on Linux >= 6.6).
    let program_id = ebpf
        .program(datapath::TC_PROGRAM)
        .expect("the object has the TC program")
        .info()
        .unwrap_or_else(|e| panic!("reading the loaded program's info: {e}"))
        .id();
    let (_revision, attached) = in_netns(&net.node_ns, || {
        SchedClassifier::query_tcx(&net.node_if, TcAttachType::Ingress)
    })
    .unwrap_or_else(|e| panic!("querying TCX ingress programs on {}: {e}", net.node_if));
    let attached_ids: Vec<u32> = attached
        .iter()
        .map(aya::programs::ProgramInfo::id)
        .collect();
    assert!(
        attached_ids.contains(&program_id),
        "program {program_id} not attached to {} ingress; attached: {attached_ids:?}",
        net.node_if
    );

    // The map write round-trips, through the API and as raw key bytes in network order.
    let protected = SocketAddrV4::new(NODE_ADDR, PROTECTED_PORT);
    datapath::protect(&mut ebpf, protected).unwrap_or_else(|e| panic!("protect: {e}"));
    assert_eq!(
        datapath::protected_endpoints(&ebpf).unwrap_or_else(|e| panic!("listing: {e}")),
        vec![protected]
    );
    {
        let map = ebpf
            .map(datapath::PROTECTED_ENDPOINTS_MAP)
            .expect("the object has the map");
        let map: HashMap<&MapData, EndpointKey, u32> =
            HashMap::try_from(map).unwrap_or_else(|e| panic!("opening the map: {e}"));
        let raw_key = EndpointKey::from_network_order(
            u32::from_ne_bytes(NODE_ADDR.octets()),
            u16::from_ne_bytes(PROTECTED_PORT.to_be_bytes()),
        );
        assert_eq!(
            map.get(&raw_key, 0)
                .unwrap_or_else(|e| panic!("looking up the raw key: {e}")),
            ENDPOINT_FLAGS_NONE
        );
    }

    // Real traffic from the pod: one SYN to the protected port, one to another port. No one
    // listens on the node, so each SYN gets a RST; a refused connection proves it passed.
    let before = counters(&ebpf);
    for port in [PROTECTED_PORT, UNPROTECTED_PORT] {
        let target = SocketAddr::from((NODE_ADDR, port));
        let result = in_netns(&net.pod_ns, || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        });
        match result {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            other => panic!(
                "connecting from the pod to {target} should be refused by the node's stack \
                 (proof the classifier passed the SYN), got {other:?}"
            ),
        }
    }
    let after = counters(&ebpf);
    assert_eq!(
        after.protected - before.protected,
        1,
        "one SYN to the protected endpoint: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.not_protected - before.not_protected,
        1,
        "one SYN to an unprotected port: {before:?} -> {after:?}"
    );
    assert!(
        after.seen - before.seen >= 2,
        "SEEN counts every packet: {before:?} -> {after:?}"
    );
    assert_eq!(
        after.malformed, 0,
        "no malformed packets were sent: {after:?}"
    );

    assert!(datapath::unprotect(&mut ebpf, protected).unwrap_or_else(|e| panic!("{e}")));
    assert!(!datapath::unprotect(&mut ebpf, protected).unwrap_or_else(|e| panic!("{e}")));
    assert_eq!(
        datapath::protected_endpoints(&ebpf).unwrap_or_else(|e| panic!("listing: {e}")),
        vec![]
    );

    drop(ebpf);
    let namespaces = [net.node_ns.clone(), net.pod_ns.clone()];
    drop(net);
    for ns in namespaces {
        assert!(
            !netns_path(&ns).exists(),
            "namespace {ns} still exists after cleanup"
        );
    }
}

fn counters(ebpf: &aya::Ebpf) -> Counters {
    datapath::read_counters(ebpf).unwrap_or_else(|e| panic!("read_counters: {e}"))
}

/// Fails (never skips) when the test cannot get what it needs, naming what is missing.
fn require_privileges() {
    const CAPS: [(&str, u32); 3] = [
        ("CAP_NET_ADMIN", 12),
        ("CAP_SYS_ADMIN", 21),
        ("CAP_BPF", 39),
    ];
    let status = fs::read_to_string("/proc/self/status")
        .unwrap_or_else(|e| panic!("reading /proc/self/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("/proc/self/status has no {name}"))
            .trim()
            .to_owned()
    };
    let mut missing = Vec::new();
    if field("Uid").split_whitespace().nth(1) != Some("0") {
        missing.push("root (effective uid 0)");
    }
    let cap_eff = u64::from_str_radix(&field("CapEff"), 16).expect("CapEff is hex");
    for (name, bit) in CAPS {
        if cap_eff & (1 << bit) == 0 {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "this test loads eBPF programs and creates network namespaces; missing privileges: {}. \
         Run the suite as root: `cargo xtask test`",
        missing.join(", ")
    );
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        other => {
            panic!("iproute2's `ip` does not run ({other:?}); install it with `cargo xtask setup`")
        }
    }
}

/// Two network namespaces joined by a veth pair; removed on drop, also during a panic.
struct TestNet {
    node_ns: String,
    pod_ns: String,
    node_if: String,
    pod_if: String,
}

impl TestNet {
    fn create() -> Self {
        let pid = std::process::id();
        // The guard exists before anything is created, so a failure half-way is cleaned up too.
        let net = Self {
            node_ns: format!("nw-dp-node-{pid}"),
            pod_ns: format!("nw-dp-pod-{pid}"),
            // Interface names have at most 15 bytes: 3 + at most 7 digits of a Linux pid.
            node_if: format!("nwh{pid}"),
            pod_if: format!("nwp{pid}"),
        };
        ip(&["netns", "add", &net.node_ns]);
        ip(&["netns", "add", &net.pod_ns]);
        ip(&[
            "-n",
            &net.node_ns,
            "link",
            "add",
            &net.node_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.pod_if,
            "netns",
            &net.pod_ns,
        ]);
        for (ns, dev, addr) in [
            (&net.node_ns, &net.node_if, NODE_ADDR),
            (&net.pod_ns, &net.pod_if, POD_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        net
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces; a veth pair goes with either end.
        let mut failures = Vec::new();
        for ns in [&self.pod_ns, &self.node_ns] {
            if !netns_path(ns).exists() {
                continue;
            }
            match Command::new("ip").args(["netns", "del", ns]).output() {
                Ok(out) if out.status.success() => {}
                other => failures.push(format!("`ip netns del {ns}`: {other:?}")),
            }
        }
        if !failures.is_empty() {
            let message = format!("cleanup failed: {}", failures.join("; "));
            if thread::panicking() {
                eprintln!("{message}");
            } else {
                panic!("{message}");
            }
        }
    }
}

fn netns_path(ns: &str) -> std::path::PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Runs `ip args`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running `ip {}`: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `f` on a thread that has entered network namespace `ns` (`setns` affects only the calling
/// thread, so the test's own thread and other tests stay where they are).
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = netns_path(ns);
    thread::scope(|scope| {
        scope
            .spawn(|| {
                let file =
                    File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                // SAFETY: plain syscall on a valid descriptor; it changes the network namespace
                // of this short-lived thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(
                    rc,
                    0,
                    "setns into {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                );
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
