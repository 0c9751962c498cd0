//! Stand-ins of the privileged datapath tests (`datapath_load.rs`, `datapath_steering.rs`),
//! which run the datapath in-process on a namespace node of the test kit
//! ([`nodeward_tests::netns::TestNode`]): the datapath configuration for such a node, a pod's
//! line server ([`PodServer`]), a stand-in enforcer ([`FakeEnforcer`]: a transparent listener
//! that proxies with the upstream mark) and a client ([`request`]).
//!
//! The node's own bpffs holds the pins (`Datapath::start` mounts it); the node removes it with
//! everything else when dropped. The stand-ins stop their threads when dropped.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use nodeward::datapath::{DatapathConfig, FailureMode};
use nodeward_tests::netns::{enter_netns, in_netns, TestNode};

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

/// The datapath configuration for `node`: its own bpffs and pin directory.
pub fn config(node: &TestNode, failure_mode: FailureMode) -> DatapathConfig {
    DatapathConfig {
        listener_port: LISTENER_PORT,
        failure_mode,
        steer_mark: STEER_MARK,
        upstream_mark: UPSTREAM_MARK,
        route_table: ROUTE_TABLE,
        rule_priority: 50,
        bpffs: node.bpffs().to_owned(),
        pin_dir: node.bpffs().join("nodeward"),
        uplinks: Vec::new(),
        fast_path: None,
        log_level: 0,
        ..DatapathConfig::default()
    }
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
