//! Test hosts for the privileged datapath tests (`datapath_load.rs`, `datapath_steering.rs`).
//!
//! A [`Node`] is a network namespace standing in for a Kubernetes node, wired like a routed CNI
//! (Calico style): each "pod" or "client" is a namespace of its own joined to the node by a veth
//! pair, with a /32 address on its `eth0` and a default route out of it; the node has a /32 route
//! to each and proxy ARP on the host-side veths, forwards between them, and owns the address
//! [`NODE_IP`] (on `lo`), the source of its own connections. Addresses are in 10.200.0.0/16, used
//! only inside these namespaces. Each node gets its own BPF filesystem mount point, which
//! `Datapath::start` mounts, so pins never meet another test's or a real agent's.
//!
//! Everything is removed by `Drop` (namespaces, and with them veths, rules, routes and TCX links;
//! the bpffs mount, and with it every pin), also when the test panics. Names carry the process id
//! and a per-test tag.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    fs::{self, File},
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nodeward::datapath::{on_bpffs, DatapathConfig, FailureMode};

/// The node's own address (on its `lo`): the source of the enforcer's upstream connections.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
/// Port of the stand-in enforcer's transparent listener.
pub const LISTENER_PORT: u16 = 15006;
/// Port the pods serve on.
pub const POD_PORT: u16 = 8080;
/// Mark bits of steered packets.
pub const STEER_MARK: u32 = 0x1000;
/// Mark bits of the enforcer's upstream sockets.
pub const UPSTREAM_MARK: u32 = 0x2000;
/// The datapath's routing table.
pub const ROUTE_TABLE: u32 = 2700;

/// Serializes the tests of one binary: they measure timeouts and counters, and the machine has
/// two cores.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fails (never skips) when the test cannot get what it needs, naming what is missing.
pub fn require_privileges() {
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
        "this test loads eBPF programs, mounts a BPF filesystem and creates network namespaces; \
         missing privileges: {}. Run the suite as root: `cargo xtask test`",
        missing.join(", ")
    );
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => {}
        other => {
            panic!("iproute2's `ip` does not run ({other:?}); install it with `cargo xtask setup`")
        }
    }
}

/// A pod or client: a namespace joined to the node by a veth pair.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its network namespace.
    pub ns: String,
    /// The host-side (node-side) end of its veth.
    pub host_if: String,
    /// Its address.
    pub ip: Ipv4Addr,
}

/// A node made of network namespaces; see the module documentation.
pub struct Node {
    /// The node's namespace.
    pub ns: String,
    /// Mount point of the node's own BPF filesystem.
    pub bpffs: PathBuf,
    tag: char,
    endpoints: Vec<Endpoint>,
}

impl Node {
    /// Creates the node's namespace; `tag` (a lowercase letter) keeps names apart between tests.
    pub fn new(tag: char) -> Self {
        let pid = std::process::id();
        let node = Self {
            ns: format!("nw-{tag}-node-{pid}"),
            bpffs: std::env::temp_dir().join(format!("nw-{tag}-bpffs-{pid}")),
            tag,
            endpoints: Vec::new(),
        };
        ip(&["netns", "add", &node.ns]);
        ip(&["-n", &node.ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &node.ns,
            "addr",
            "add",
            &format!("{NODE_IP}/32"),
            "dev",
            "lo",
        ]);
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            sysctl(&node.ns, key, value);
        }
        node
    }

    /// Adds a pod or client with address `ip`; `role` (a lowercase letter) names its veth.
    pub fn add_endpoint(&mut self, role: char, ip_addr: Ipv4Addr) -> Endpoint {
        let pid = std::process::id();
        let endpoint = Endpoint {
            ns: format!("nw-{}{role}-{pid}", self.tag),
            // At most 15 bytes: 4 + at most 7 digits of a Linux pid.
            host_if: format!("nw{}{role}{pid}", self.tag),
            ip: ip_addr,
        };
        // Recorded first, so a failure half-way is still cleaned up.
        self.endpoints.push(endpoint.clone());
        ip(&["netns", "add", &endpoint.ns]);
        ip(&[
            "-n",
            &self.ns,
            "link",
            "add",
            &endpoint.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &endpoint.ns,
        ]);
        ip(&["-n", &self.ns, "link", "set", &endpoint.host_if, "up"]);
        sysctl(
            &self.ns,
            &format!("net.ipv4.conf.{}.proxy_arp", endpoint.host_if),
            "1",
        );
        sysctl(
            &self.ns,
            &format!("net.ipv4.conf.{}.rp_filter", endpoint.host_if),
            "0",
        );
        // Proxy ARP answers after a random delay of up to 0.8 s by default; a test that expects
        // a drop within a fraction of that would pass without a packet ever being sent.
        sysctl(
            &self.ns,
            &format!("net.ipv4.neigh.{}.proxy_delay", endpoint.host_if),
            "0",
        );
        ip(&[
            "-n",
            &self.ns,
            "route",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            &endpoint.host_if,
        ]);
        ip(&["-n", &endpoint.ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &endpoint.ns,
            "addr",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &endpoint.ns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &endpoint.ns,
            "route",
            "add",
            "default",
            "dev",
            "eth0",
            "scope",
            "link",
        ]);
        endpoint
    }

    /// The datapath configuration for this node: its own bpffs and pin directory.
    pub fn config(&self, failure_mode: FailureMode) -> DatapathConfig {
        DatapathConfig {
            listener_port: LISTENER_PORT,
            failure_mode,
            steer_mark: STEER_MARK,
            upstream_mark: UPSTREAM_MARK,
            route_table: ROUTE_TABLE,
            rule_priority: 50,
            bpffs: self.bpffs.clone(),
            pin_dir: self.bpffs.join("nodeward"),
            uplinks: Vec::new(),
            fast_path: None,
            log_level: 0,
        }
    }

    /// Runs `f` in the node's namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.ns, f)
    }

    /// `ip -n <node> args`, its stdout.
    pub fn ip_out(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.ns.as_str()];
        full.extend_from_slice(args);
        ip_out(&full)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Deleting a namespace deletes its interfaces (a veth pair goes with either end), its
        // rules and routes, and detaches TCX links from its devices.
        let mut failures = Vec::new();
        let namespaces = self
            .endpoints
            .iter()
            .map(|endpoint| endpoint.ns.clone())
            .chain([self.ns.clone()]);
        for ns in namespaces {
            if !netns_path(&ns).exists() {
                continue;
            }
            match Command::new("ip").args(["netns", "del", &ns]).output() {
                Ok(out) if out.status.success() => {}
                other => failures.push(format!("`ip netns del {ns}`: {other:?}")),
            }
        }
        // Unmounting the node's bpffs removes every pin left in it (a test that failed before
        // its shutdown); the links went with the devices.
        if self.bpffs.exists() {
            if on_bpffs(&self.bpffs).unwrap_or(false) {
                let path = std::ffi::CString::new(self.bpffs.as_os_str().as_encoded_bytes())
                    .expect("a path without NUL");
                // SAFETY: a valid NUL-terminated path.
                if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                    failures.push(format!(
                        "unmounting {}: {}",
                        self.bpffs.display(),
                        io::Error::last_os_error()
                    ));
                }
            }
            if let Err(e) = fs::remove_dir(&self.bpffs) {
                failures.push(format!("removing {}: {e}", self.bpffs.display()));
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

pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Runs `ip args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    ip_out(args);
}

/// Runs `ip args` and returns its stdout, panicking with its stderr on failure.
pub fn ip_out(args: &[&str]) -> String {
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Sets a sysctl inside namespace `ns` (`/proc/sys` shows the namespace of the process).
pub fn sysctl(ns: &str, key: &str, value: &str) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ])
        .output()
        .unwrap_or_else(|e| panic!("running sysctl in {ns}: {e}"));
    assert!(
        out.status.success(),
        "sysctl {key}={value} in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Runs `f` on a thread that has entered network namespace `ns` (`setns` affects only the calling
/// thread; threads it spawns start in the same namespace).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    thread::scope(|scope| {
        scope
            .spawn(|| {
                enter_netns(ns);
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into network namespace `ns`.
pub fn enter_netns(ns: &str) {
    let path = netns_path(ns);
    let file = File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    // SAFETY: plain syscall on a valid descriptor; it changes the calling thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "setns into {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// A thread running a loop until stopped, and what it recorded.
struct Stoppable<R> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    record: Arc<Mutex<Vec<R>>>,
}

impl<R> Stoppable<R> {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if let Err(panic) = thread.join() {
                if !thread::panicking() {
                    std::panic::resume_unwind(panic);
                }
            }
        }
    }

    fn recorded(&self) -> Vec<R>
    where
        R: Clone,
    {
        self.record.lock().expect("record lock").clone()
    }
}

/// A pod's server: answers one line `hello` with `pod saw <peer address>`; records each peer.
pub struct PodServer(Stoppable<SocketAddr>);

impl PodServer {
    /// Listens on `ip:port` inside `ns`.
    pub fn start(ns: &str, ip_addr: Ipv4Addr, port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, record, ns) = (Arc::clone(&stop), Arc::clone(&record), ns.to_owned());
            thread::spawn(move || {
                enter_netns(&ns);
                let listener = TcpListener::bind((ip_addr, port))
                    .unwrap_or_else(|e| panic!("pod server bind {ip_addr}:{port}: {e}"));
                listener.set_nonblocking(true).expect("nonblocking");
                ready_tx.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            record.lock().expect("record lock").push(peer);
                            thread::spawn(move || {
                                answer(&stream, &format!("pod saw {}", peer.ip()));
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("pod server accept: {e}"),
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("pod server ready");
        Self(Stoppable {
            stop,
            thread: Some(thread),
            record,
        })
    }

    /// Addresses of the peers that connected.
    pub fn peers(&self) -> Vec<Ipv4Addr> {
        self.0
            .recorded()
            .into_iter()
            .filter_map(|peer| match peer {
                SocketAddr::V4(v4) => Some(*v4.ip()),
                SocketAddr::V6(_) => None,
            })
            .collect()
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// What the stand-in enforcer saw of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The client.
    pub peer: SocketAddr,
    /// `getsockname()` of the accepted socket: the original destination.
    pub local: SocketAddr,
}

/// The enforcer's stand-in: a transparent listener on `0.0.0.0:LISTENER_PORT` in the node's
/// namespace that records each connection and proxies it to its original destination with
/// `SO_MARK = UPSTREAM_MARK`, prefixing the answer with `enforcer|`.
pub struct FakeEnforcer(Stoppable<Accepted>);

impl FakeEnforcer {
    /// Starts listening inside `node_ns`.
    pub fn start(node_ns: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, record, ns) = (Arc::clone(&stop), Arc::clone(&record), node_ns.to_owned());
            thread::spawn(move || {
                enter_netns(&ns);
                let socket = socket2::Socket::new(
                    socket2::Domain::IPV4,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )
                .expect("socket");
                socket.set_reuse_address(true).expect("SO_REUSEADDR");
                socket
                    .set_ip_transparent_v4(true)
                    .expect("IP_TRANSPARENT (needs CAP_NET_ADMIN)");
                socket
                    .bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, LISTENER_PORT)).into())
                    .expect("bind the listener");
                socket.listen(128).expect("listen");
                let listener: TcpListener = socket.into();
                listener.set_nonblocking(true).expect("nonblocking");
                ready_tx.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, peer)) => {
                            let local = stream.local_addr().expect("getsockname");
                            record
                                .lock()
                                .expect("record lock")
                                .push(Accepted { peer, local });
                            // Threads spawned here start in the node's namespace too.
                            thread::spawn(move || proxy(&stream, local));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => panic!("enforcer accept: {e}"),
                    }
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("enforcer ready");
        Self(Stoppable {
            stop,
            thread: Some(thread),
            record,
        })
    }

    /// The connections accepted so far.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.0.recorded()
    }

    /// Closes the listener (as a crashed agent's would be).
    pub fn stop(mut self) {
        self.0.stop();
    }
}

impl Drop for FakeEnforcer {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Answers one line with `reply`.
fn answer(stream: &TcpStream, reply: &str) {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_ok() {
        let _ = { stream }.write_all(format!("{reply}\n").as_bytes());
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Proxies one exchange to `dst` from a socket marked `UPSTREAM_MARK`.
fn proxy(client: &TcpStream, dst: SocketAddr) {
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut line = String::new();
    if BufReader::new(client).read_line(&mut line).is_err() {
        return;
    }
    let upstream = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .expect("socket");
    upstream.set_mark(UPSTREAM_MARK).expect("SO_MARK");
    let reply = upstream
        .connect_timeout(&dst.into(), Duration::from_secs(2))
        .and_then(|()| {
            let mut upstream: TcpStream = upstream.into();
            upstream.set_read_timeout(Some(Duration::from_secs(3)))?;
            upstream.write_all(line.as_bytes())?;
            let mut reply = String::new();
            upstream.read_to_string(&mut reply)?;
            Ok(reply)
        })
        .unwrap_or_else(|e| format!("upstream failed: {e}\n"));
    let _ = { client }.write_all(format!("enforcer|{reply}").as_bytes());
    let _ = client.shutdown(Shutdown::Write);
}

/// Sends `hello` from namespace `ns` to `target` and returns the answer; `mark` sets `SO_MARK`.
pub fn request(
    ns: &str,
    target: SocketAddrV4,
    mark: Option<u32>,
    timeout: Duration,
) -> io::Result<String> {
    in_netns(ns, || {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        socket.connect_timeout(&SocketAddr::V4(target).into(), timeout)?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        stream.write_all(b"hello\n")?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply.trim_end().to_owned())
    })
}

/// Polls `condition` every 10 ms until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if condition() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
