//! A node made of network namespaces, for privileged tests: a node namespace (where the agent
//! or the data path under test runs, never in the machine's own namespace) and pod namespaces
//! joined to it by veth pairs, in one of two CNI styles ([`Cni`]):
//!
//! - [`Cni::Routed`] (the default; Calico, kindnet, ptp style): each pod has a /32 address on its
//!   `eth0` and a default route out of it; the node has a /32 route to each pod and proxy ARP
//!   (answering at once) on the host-side veths;
//! - [`Cni::Bridge`] (flannel, the bridge plugin): the host-side veths are ports of a Linux bridge
//!   [`BRIDGE`] that holds the gateway address `10.200.<n>.1/24`; pods have a /24 address on one
//!   subnet and a default route via the gateway; hairpin mode is on on every port and bridged
//!   IPv4/IPv6 go through netfilter (`bridge-nf-call-ip{,6}tables`), as kubeadm requires, so
//!   kube-proxy's and portmap's NAT sees pod-to-pod traffic on the bridge.
//!
//! Either way the node forwards, has reverse-path filtering off, and owns its address
//! ([`TestNode::addr`], [`NODE_ADDR`] for the first node) on `lo`. Pods of node `n`
//! ([`NodeOptions::index`]) are in `10.200.<n>.0/24`; addresses exist only inside these
//! namespaces. A dual-stack node ([`NodeOptions::dual_stack`]) also gives every pod the IPv6
//! address [`pod_ip6`] of its IPv4 one (`fd00:200:0:<n>::<host>`) and itself
//! `fd00:200:ff::<n+1>` on `lo`; routed pods reach the node through the link-local gateway
//! `fe80::1` on their host-side veth, bridged ones through `fd00:200:0:<n>::1` on the bridge.
//! IPv4 only, routed, is the default, and what [`TestNode::new`] builds.
//!
//! Each node also has a BPF filesystem mount point of its own ([`TestNode::bpffs`]; mounted by
//! [`TestNode::mount_bpffs`] or by the data path itself), so pins never meet another test's or a
//! real agent's, and on request a cgroup v2 of its own ([`TestNode::use_cgroup`]): every process
//! the node starts from then on joins it, so programs attached to it (the fast path's
//! `sock_ops`) see exactly the node's sockets and never the machine's.
//!
//! Names carry the test process's id, a per-process sequence number and the test's tag
//! (`nwt-<pid>-<seq>-<tag>-node`), so tests of one binary run in parallel and several developers'
//! runs share a machine. A [`TestNode`] removes everything it made when dropped, also on panic:
//! its processes, its namespaces (and with them veths, bridges, iptables and nftables rules,
//! routes and TC links), its bpffs mount (and with it every pin) and its cgroup. What a killed
//! test process left (its pid no longer exists) is removed when the next node starts; nothing of
//! a live process is touched.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Prefix of every namespace and bpffs mount point a node makes: `nwt-<pid>-<seq>-<tag>-…`.
pub const PREFIX: &str = "nwt-";
/// Prefix of every cgroup a node makes: `nodeward-test-<pid>-<seq>-<tag>`.
pub const CGROUP_PREFIX: &str = "nodeward-test-";
/// The first node's own address (on its `lo`): the source of the node's, and the enforcer's
/// upstream, connections to routed pods. Node `n` has `10.200.255.<n+1>` ([`TestNode::addr`]).
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 255, 1);
/// The first dual-stack node's own IPv6 address (on its `lo`); node `n` has `fd00:200:ff::<n+1>`.
pub const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0xff, 0, 0, 0, 0, 1);
/// The bridge of a [`Cni::Bridge`] node, in its namespace (flannel's and the bridge plugin's name).
pub const BRIDGE: &str = "cni0";
/// The link-local gateway of routed IPv6 pods: every routed pod's host-side veth holds it.
pub const ROUTED_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// `BPF_FS_MAGIC` of statfs(2).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Nodes made by this process so far.
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// The address `10.200.0.<index>`: where the end-to-end tests put their pods (on the first
/// node; `.1` is the gateway of a bridged node, so pods start at `.2`).
#[must_use]
pub const fn pod_ip(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, 0, index)
}

/// The IPv6 address a dual-stack node gives the pod `10.200.<n>.<host>`:
/// `fd00:200:0:<n>::<host>` (so `pod_ip6(pod_ip(10))` is `fd00:200::a`).
#[must_use]
pub const fn pod_ip6(ip: Ipv4Addr) -> Ipv6Addr {
    let [_, _, subnet, host] = ip.octets();
    Ipv6Addr::new(0xfd00, 0x200, 0, subnet as u16, 0, 0, 0, host as u16)
}

/// How pods are wired to the node: see the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Cni {
    /// /32 pods, a route per pod on the node, proxy ARP on the host-side veths.
    #[default]
    Routed,
    /// Host-side veths enslaved to the bridge [`BRIDGE`], which holds the pods' gateway.
    Bridge,
}

/// What [`TestNode::with_options`] builds; the default is [`TestNode::new`]'s node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeOptions {
    pub cni: Cni,
    /// Pods also get IPv6 ([`pod_ip6`]), the node `fd00:200:ff::<index+1>` and IPv6 forwarding.
    pub dual_stack: bool,
    /// The node's number in a cluster (below 128): its pods are in `10.200.<index>.0/24`, its
    /// own address is `10.200.255.<index+1>`.
    pub index: u8,
}

/// A pod (or a client): its namespace, addresses and the node-side end of its veth.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack node ([`pod_ip6`] of `ip`).
    pub ip6: Option<Ipv6Addr>,
    /// The host-side interface, in the node namespace.
    pub host_if: String,
}

/// The node and its pods; see the module documentation.
pub struct TestNode {
    /// The node's namespace.
    pub netns: String,
    /// `nwt-<pid>-<seq>-<tag>-`: the start of every name of this node.
    stem: String,
    /// `<pid>-<seq>-<tag>`.
    id: String,
    options: NodeOptions,
    bpffs: PathBuf,
    /// A directory with one symlink per pod to its namespace file: what `/run/netns` is on a
    /// real node, holding this node's pods only (the agent's `--netns-dir`).
    netns_dir: PathBuf,
    pods: Vec<Pod>,
    /// Every namespace made, the node's first.
    namespaces: Vec<String>,
    children: Vec<Child>,
    /// Declared last: removed after the processes, namespaces and mount.
    cgroup: Option<TestCgroup>,
}

impl TestNode {
    /// Checks the privileges ([`crate::privilege::require_privileges`]), removes leftovers of
    /// killed runs and creates the node namespace: routed, IPv4 only, the first node of its
    /// cluster. `tag` (short, `[a-z0-9-]`) says which test it belongs to.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        Self::with_options(tag, NodeOptions::default())
    }

    /// Like [`TestNode::new`], with the CNI style, the address families and the node's number
    /// in its cluster of `options`.
    ///
    /// # Panics
    /// When `options.index` is 128 or more, or a namespace, address or sysctl cannot be set.
    #[must_use]
    pub fn with_options(tag: &str, options: NodeOptions) -> Self {
        assert!(options.index < 128, "node index {} >= 128", options.index);
        crate::privilege::require_privileges();
        remove_leftovers();
        let seq = SEQUENCE.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}-{seq}-{tag}", std::process::id());
        let stem = format!("{PREFIX}{id}-");
        let netns = format!("{stem}node");
        let mut node = Self {
            netns: netns.clone(),
            bpffs: std::env::temp_dir().join(format!("{stem}bpffs")),
            netns_dir: std::env::temp_dir().join(format!("{stem}netns")),
            stem,
            id,
            options,
            pods: Vec::new(),
            namespaces: Vec::new(),
            children: Vec::new(),
            cgroup: None,
        };
        // Recorded before it exists, so a failure half-way is still cleaned up.
        node.namespaces.push(netns.clone());
        ip(&["netns", "add", &netns]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        let addr = node.addr();
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{addr}/32"),
            "dev",
            "lo",
        ]);
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ] {
            sysctl(&netns, key, value);
        }
        if let Some(addr6) = node.addr6() {
            for (key, value) in [
                ("net.ipv6.conf.all.forwarding", "1"),
                // Addresses usable at once: no duplicate address detection on new interfaces.
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ] {
                sysctl(&netns, key, value);
            }
            ip(&[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{addr6}/128"),
                "dev",
                "lo",
            ]);
        }
        if options.cni == Cni::Bridge {
            node.add_bridge();
        }
        node
    }

    /// The bridge and its gateway addresses; bridged IP through netfilter, as kubeadm requires.
    fn add_bridge(&self) {
        let node = self.netns.as_str();
        ip(&["-n", node, "link", "add", BRIDGE, "type", "bridge"]);
        let gateway = self.gateway();
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            BRIDGE,
        ]);
        if let Some(gateway6) = self.gateway6() {
            ip(&[
                "-n",
                node,
                "addr",
                "add",
                &format!("{gateway6}/64"),
                "dev",
                BRIDGE,
                "nodad",
            ]);
        }
        ip(&["-n", node, "link", "set", BRIDGE, "up"]);
        assert!(
            Path::new("/proc/sys/net/bridge").exists(),
            "a bridged test node needs br_netfilter (kernel CONFIG_BRIDGE_NETFILTER, or \
             `modprobe br_netfilter`): without it pods on one bridge bypass kube-proxy's NAT"
        );
        sysctl(node, "net.bridge.bridge-nf-call-iptables", "1");
        sysctl(node, "net.bridge.bridge-nf-call-ip6tables", "1");
    }

    /// What the node was built with.
    #[must_use]
    pub fn options(&self) -> NodeOptions {
        self.options
    }

    /// The node's own address, on its `lo`: `10.200.255.<index+1>` ([`NODE_ADDR`] on the first
    /// node).
    #[must_use]
    pub fn addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 255, self.options.index + 1)
    }

    /// The node's own IPv6 address on a dual-stack node, on its `lo`: `fd00:200:ff::<index+1>`.
    #[must_use]
    pub fn addr6(&self) -> Option<Ipv6Addr> {
        self.options.dual_stack.then(|| {
            Ipv6Addr::new(
                0xfd00,
                0x200,
                0xff,
                0,
                0,
                0,
                0,
                u16::from(self.options.index) + 1,
            )
        })
    }

    /// The address the node's connections to its pods come from, and what it masquerades
    /// pod-bound traffic to: its own address ([`TestNode::addr`]) on a routed node, the
    /// bridge's (`10.200.<index>.1`) on a bridged one.
    #[must_use]
    pub fn addr_to_pods(&self) -> Ipv4Addr {
        match self.options.cni {
            Cni::Routed => self.addr(),
            Cni::Bridge => self.gateway(),
        }
    }

    /// The node's pod subnet, `10.200.<index>.0/24`, as (network, prefix length).
    #[must_use]
    pub fn pod_subnet(&self) -> (Ipv4Addr, u8) {
        (Ipv4Addr::new(10, 200, self.options.index, 0), 24)
    }

    /// The node's IPv6 pod subnet on a dual-stack node, `fd00:200:0:<index>::/64`.
    #[must_use]
    pub fn pod_subnet6(&self) -> Option<(Ipv6Addr, u8)> {
        self.options.dual_stack.then(|| {
            (
                Ipv6Addr::new(0xfd00, 0x200, 0, u16::from(self.options.index), 0, 0, 0, 0),
                64,
            )
        })
    }

    /// The pods' IPv4 gateway on a bridged node (the bridge's address, `10.200.<index>.1`).
    fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, self.options.index, 1)
    }

    /// The pods' IPv6 gateway on a dual-stack bridged node (`fd00:200:0:<index>::1`).
    fn gateway6(&self) -> Option<Ipv6Addr> {
        self.pod_subnet6().map(|(net, _)| {
            let mut segments = net.segments();
            segments[7] = 1;
            Ipv6Addr::from(segments)
        })
    }

    /// Creates a namespace `nwt-<pid>-<seq>-<tag>-<name>` (its `lo` up) that belongs to this
    /// node: removed with it. For hosts that are not pods (an outside client, a switch).
    pub fn add_namespace(&mut self, name: &str) -> String {
        let netns = format!("{}{name}", self.stem);
        self.namespaces.push(netns.clone());
        ip(&["netns", "add", &netns]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        netns
    }

    /// Adds a pod `name` with address `ip_addr` (on a bridged node, in
    /// [`TestNode::pod_subnet`] and not its `.1`), wired in the node's CNI style; on a
    /// dual-stack node it also gets [`pod_ip6`] of `ip_addr`.
    pub fn add_pod(&mut self, name: &str, ip_addr: Ipv4Addr) -> Pod {
        let pod = Pod {
            name: name.to_owned(),
            netns: format!("{}{name}", self.stem),
            ip: ip_addr,
            ip6: self.options.dual_stack.then(|| pod_ip6(ip_addr)),
            // Unique inside the node's namespace, at most 15 bytes.
            host_if: format!("nwp{}", self.pods.len()),
        };
        self.namespaces.push(pod.netns.clone());
        self.pods.push(pod.clone());
        let (node, netns, host_if) = (&self.netns, &pod.netns, &pod.host_if);
        ip(&["netns", "add", netns]);
        std::fs::create_dir_all(&self.netns_dir).expect("the node's netns directory");
        std::os::unix::fs::symlink(netns_path(netns), self.netns_dir.join(netns))
            .expect("a pod's netns link");
        ip(&[
            "-n", node, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns",
            netns,
        ]);
        if pod.ip6.is_some() {
            sysctl(netns, "net.ipv6.conf.eth0.accept_dad", "0");
        }
        ip(&["-n", netns, "link", "set", "lo", "up"]);
        match self.options.cni {
            Cni::Routed => self.wire_routed(&pod),
            Cni::Bridge => self.wire_bridged(&pod),
        }
        pod
    }

    /// Routed: a /32 (/128) route per pod on the node, proxy ARP and a link-local IPv6 gateway
    /// on the host-side veth; the pod's default routes leave `eth0`.
    fn wire_routed(&self, pod: &Pod) {
        let (node, netns, host_if) = (&self.netns, &pod.netns, &pod.host_if);
        sysctl(node, &format!("net.ipv4.conf.{host_if}.proxy_arp"), "1");
        sysctl(node, &format!("net.ipv4.conf.{host_if}.rp_filter"), "0");
        // Proxy ARP answers after a random delay of up to 0.8 s by default; a test that expects
        // a drop within a fraction of that would pass without a packet ever being sent.
        sysctl(node, &format!("net.ipv4.neigh.{host_if}.proxy_delay"), "0");
        if let Some(ip6) = pod.ip6 {
            sysctl(node, &format!("net.ipv6.conf.{host_if}.accept_dad"), "0");
            ip(&[
                "-n",
                node,
                "addr",
                "add",
                &format!("{ROUTED_GATEWAY6}/64"),
                "dev",
                host_if,
                "nodad",
            ]);
            ip(&["-n", node, "link", "set", host_if, "up"]);
            ip(&[
                "-n",
                node,
                "-6",
                "route",
                "add",
                &format!("{ip6}/128"),
                "dev",
                host_if,
            ]);
        } else {
            ip(&["-n", node, "link", "set", host_if, "up"]);
        }
        let ip_addr = pod.ip;
        ip(&[
            "-n",
            node,
            "route",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            host_if,
        ]);
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{ip_addr}/32"),
            "dev",
            "eth0",
        ]);
        if let Some(ip6) = pod.ip6 {
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{ip6}/128"),
                "dev",
                "eth0",
                "nodad",
            ]);
        }
        ip(&["-n", netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n", netns, "route", "add", "default", "dev", "eth0", "scope", "link",
        ]);
        if pod.ip6.is_some() {
            ip(&[
                "-n",
                netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &ROUTED_GATEWAY6.to_string(),
                "dev",
                "eth0",
            ]);
        }
    }

    /// Bridged: the host-side veth is a port (hairpin on) of [`BRIDGE`]; the pod has an address
    /// on the node's subnet and its default routes via the bridge's addresses.
    fn wire_bridged(&self, pod: &Pod) {
        let (node, netns, host_if) = (&self.netns, &pod.netns, &pod.host_if);
        let (net, prefix) = self.pod_subnet();
        assert!(
            pod.ip.octets()[..3] == net.octets()[..3] && pod.ip != self.gateway(),
            "a bridged pod's address must be in {net}/{prefix} and not the gateway: {}",
            pod.ip
        );
        ip(&["-n", node, "link", "set", host_if, "master", BRIDGE]);
        ip(&["-n", node, "link", "set", host_if, "up"]);
        let out = Command::new("bridge")
            .args(["-n", node, "link", "set", "dev", host_if, "hairpin", "on"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running `bridge` (iproute2): {e}"));
        assert!(
            out.status.success(),
            "`bridge link set dev {host_if} hairpin on` in {node} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        ip(&[
            "-n",
            netns,
            "addr",
            "add",
            &format!("{}/{prefix}", pod.ip),
            "dev",
            "eth0",
        ]);
        if let (Some(ip6), Some((_, prefix6))) = (pod.ip6, self.pod_subnet6()) {
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{ip6}/{prefix6}"),
                "dev",
                "eth0",
                "nodad",
            ]);
        }
        ip(&["-n", netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            netns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ]);
        if let Some(gateway6) = self.gateway6() {
            ip(&[
                "-n",
                netns,
                "-6",
                "route",
                "add",
                "default",
                "via",
                &gateway6.to_string(),
            ]);
        }
    }

    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// This node's pods' network namespaces, one symlink each (the agent's `--netns-dir`);
    /// removed with the node.
    #[must_use]
    pub fn netns_dir(&self) -> &Path {
        &self.netns_dir
    }

    /// Every namespace the node made (its own first); all are removed when it is dropped.
    #[must_use]
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The node's BPF filesystem mount point (not mounted until [`TestNode::mount_bpffs`] or the
    /// data path mounts it); unmounted and removed when the node is dropped.
    #[must_use]
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// Mounts a BPF filesystem instance of the node's own at [`TestNode::bpffs`] (what the
    /// node's `/sys/fs/bpf` is in a cluster) and returns the mount point.
    pub fn mount_bpffs(&mut self) -> PathBuf {
        std::fs::create_dir_all(&self.bpffs)
            .unwrap_or_else(|e| panic!("creating {}: {e}", self.bpffs.display()));
        if !on_bpffs(&self.bpffs) {
            let target = c_path(&self.bpffs);
            // SAFETY: NUL-terminated strings that outlive the call; no mount data.
            let rc = unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    target.as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            assert!(
                rc == 0,
                "mounting a BPF filesystem at {}: {} (needs CAP_SYS_ADMIN)",
                self.bpffs.display(),
                io::Error::last_os_error()
            );
        }
        self.bpffs.clone()
    }

    /// Gives the node a cgroup v2 of its own; every process it starts from now on joins it.
    /// Returns its directory (for the agent's `--cgroup`).
    pub fn use_cgroup(&mut self) -> PathBuf {
        let cgroup = self.cgroup.get_or_insert_with(|| TestCgroup::new(&self.id));
        cgroup.path.clone()
    }

    /// The node's cgroup, when [`TestNode::use_cgroup`] made one.
    #[must_use]
    pub fn cgroup(&self) -> Option<&TestCgroup> {
        self.cgroup.as_ref()
    }

    /// Runs `f` on a thread of this process that has entered the node's namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.netns, f)
    }

    /// `ip -n <node> args`, its stdout.
    #[must_use]
    pub fn ip_out(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        ip_out(&full)
    }

    /// `nsenter --net=<netns> -- <program>`, keeping the machine's mounts (bpffs and cgroup2
    /// stay visible) and joining the node's cgroup if it has one. For processes the caller
    /// owns (the agent harness); [`TestNode::spawn`] for those the node owns.
    #[must_use]
    pub fn command(&self, netns: &str, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(program)
            .stdin(Stdio::null());
        if let Some(cgroup) = &self.cgroup {
            join_cgroup(&mut command, &cgroup.path.join("cgroup.procs"));
        }
        command
    }

    /// Starts `program args` inside `netns`; it is stopped when the node is dropped.
    pub fn spawn(&mut self, netns: &str, program: &Path, args: &[&str]) -> u32 {
        let child = self
            .command(netns, program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} in {netns}: {e}", program.display()));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Like [`TestNode::spawn`], with the program's stdout and stderr appended to `log`.
    pub fn spawn_logged(&mut self, netns: &str, program: &Path, args: &[&str], log: &Path) -> u32 {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = file.try_clone().expect("log file handle");
        let child = self
            .command(netns, program)
            .args(args)
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} in {netns}: {e}", program.display()));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Kills a process started with [`TestNode::spawn`] with SIGKILL (a crash: it cleans
    /// nothing up) and waits for it.
    pub fn kill(&mut self, pid: u32) {
        if let Some(child) = self.children.iter_mut().find(|c| c.id() == pid) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.retain(|c| c.id() != pid);
    }

    /// Stops a process started with [`TestNode::spawn`] with SIGTERM and returns its exit code
    /// (`None` if it had to be killed after `wait`).
    pub fn terminate(&mut self, pid: u32, wait: Duration) -> Option<i32> {
        if self.children.iter().any(|c| c.id() == pid) {
            signal(pid, libc::SIGTERM);
        }
        self.wait_exit(pid, wait)
    }

    /// Waits up to `limit` for a process started with [`TestNode::spawn`] to exit by itself and
    /// returns its exit code; `None` if it was still running (it is then killed) or was killed
    /// by a signal. The process is reaped and forgotten, so nothing signals its pid later.
    pub fn wait_exit(&mut self, pid: u32, limit: Duration) -> Option<i32> {
        let index = self.children.iter().position(|c| c.id() == pid)?;
        let mut child = self.children.remove(index);
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a command inside `netns` and returns its output (whatever its exit status).
    #[must_use]
    pub fn exec(&self, netns: &str, args: &[&str]) -> Output {
        self.command(netns, args[0])
            .args(&args[1..])
            .output()
            .unwrap_or_else(|e| panic!("running {args:?} in {netns}: {e}"))
    }

    /// `curl` from a namespace with a limit of `seconds`: (HTTP status, body); status 0 when no
    /// answer came.
    #[must_use]
    pub fn curl_within(
        &self,
        seconds: u32,
        netns: &str,
        method: &str,
        url: &str,
        headers: &[&str],
    ) -> (u16, String) {
        let limit = seconds.to_string();
        let mut args = vec![
            "curl",
            "-s",
            "-m",
            &limit,
            "-X",
            method,
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            url,
        ];
        for h in headers {
            args.extend(["-H", h]);
        }
        let out = self.exec(netns, &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (code.trim().parse().unwrap_or(0), body.to_owned())
    }

    /// [`TestNode::curl_within`] 5 s.
    #[must_use]
    pub fn curl(&self, netns: &str, method: &str, url: &str, headers: &[&str]) -> (u16, String) {
        self.curl_within(5, netns, method, url, headers)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // SIGTERM first so an agent removes what it made; SIGKILL what is still there after 5 s.
        for child in &self.children {
            signal(child.id(), libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for child in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting a namespace deletes its interfaces (a veth pair goes with either end), its
        // rules and routes, and detaches TC links from its devices.
        let mut failures = Vec::new();
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = delete_namespace(ns) {
                failures.push(e);
            }
        }
        // Unmounting the node's bpffs removes every pin left in it (a test that failed before
        // its shutdown, an agent that was killed).
        if let Err(e) = remove_bpffs(&self.bpffs) {
            failures.push(e);
        }
        match std::fs::remove_dir_all(&self.netns_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => failures.push(format!("removing {}: {e}", self.netns_dir.display())),
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

/// A cgroup v2 made for one node, removed (its processes killed first) when dropped.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    /// Creates `<cgroup2 mount>/nodeward-test-<id>` after removing leftovers of killed runs.
    #[must_use]
    pub fn new(id: &str) -> Self {
        let root = cgroup2_mount();
        remove_leftover_cgroups(&root);
        let path = root.join(format!("{CGROUP_PREFIX}{id}"));
        std::fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("creating the test cgroup {}: {e}", path.display()));
        Self { path }
    }

    /// Pids in it now.
    #[must_use]
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// Where cgroup v2 is mounted on this machine (`/sys/fs/cgroup` on a unified hierarchy,
/// often `/sys/fs/cgroup/unified` on a hybrid one), from `/proc/self/mountinfo`.
///
/// # Panics
/// When no cgroup2 file system is mounted: the fast-path tests need one, and fail naming it.
#[must_use]
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })
        .expect(
            "no cgroup2 file system is mounted (needed for the fast path's sock_ops programs): \
             `mount -t cgroup2 none /sys/fs/cgroup/unified`",
        )
}

/// `BPF_PROG_QUERY`: how many programs are attached to the cgroup `path` for `attach_type`
/// (`BPF_CGROUP_SOCK_OPS` is 3), counting every attachment mode. Read straight from the kernel,
/// without bpftool.
///
/// # Panics
/// When the cgroup cannot be opened or the kernel refuses the query (the message names it).
#[must_use]
pub fn cgroup_attached_programs(path: &Path, attach_type: u32) -> u32 {
    const BPF_PROG_QUERY: libc::c_long = 16;
    let dir = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // `union bpf_attr`'s `query` member: target_fd at 0, attach_type at 4, query_flags at 8,
    // attach_flags at 12, prog_ids at 16, prog_cnt at 24; the rest stays zero. u64s keep the
    // 8-byte alignment the kernel's struct has.
    let mut attr = [0_u64; 9];
    let fd = u32::try_from(dir.as_raw_fd()).expect("a valid descriptor");
    attr[0] = u64::from(fd) | (u64::from(attach_type) << 32);
    // SAFETY: `attr` is a zeroed `bpf_attr` prefix of the size passed; prog_ids is null, so the
    // kernel only writes prog_cnt (and attach_flags) inside it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        rc == 0,
        "BPF_PROG_QUERY on {} failed: {} (needs CAP_NET_ADMIN/CAP_BPF)",
        path.display(),
        io::Error::last_os_error()
    );
    (attr[3] & 0xffff_ffff) as u32
}

/// Whether `path` is the root of a BPF filesystem (statfs(2) `f_type`).
#[must_use]
pub fn on_bpffs(path: &Path) -> bool {
    let c = c_path(path);
    // SAFETY: an all-zero statfs is a valid out-parameter; `c` is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; the kernel writes into `stat` only.
    let rc = unsafe { libc::statfs(c.as_ptr(), &raw mut stat) };
    #[expect(
        clippy::useless_conversion,
        reason = "`f_type` is an i64 here, a u32 on some other architectures"
    )]
    let magic = i64::from(stat.f_type);
    rc == 0 && magic == BPF_FS_MAGIC
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

/// Where `ip netns` keeps namespace `ns`.
#[must_use]
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new("/run/netns").join(ns)
}

/// Runs `ip args`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let _ = ip_out(args);
}

/// Runs `ip args` and returns its stdout, panicking with its stderr on failure.
#[must_use]
pub fn ip_out(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
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
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running sysctl in {ns}: {e}"));
    assert!(
        out.status.success(),
        "sysctl {key}={value} in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("a path without NUL")
}

fn signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory preconditions.
        unsafe { libc::kill(pid, signal) };
    }
}

/// Makes `command`'s process join the cgroup whose `cgroup.procs` is `procs` before it execs, so
/// every socket it opens belongs to that cgroup.
fn join_cgroup(command: &mut Command, procs: &Path) {
    let procs = c_path(procs);
    // SAFETY: the closure only calls async-signal-safe functions (open, write, close) on data
    // prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written == 1 {
                Ok(())
            } else {
                Err(error)
            }
        });
    }
}

/// Kills what still runs in namespace `ns` (never this process), then deletes it. Nothing to do
/// when it does not exist (a node that failed half-way).
fn delete_namespace(ns: &str) -> Result<(), String> {
    if !netns_path(ns).exists() {
        return Ok(());
    }
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        let me = std::process::id();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            match pid.parse::<u32>() {
                Ok(pid) if pid != me => signal(pid, libc::SIGKILL),
                _ => {}
            }
        }
    }
    match Command::new("ip").args(["netns", "del", ns]).output() {
        Ok(out) if out.status.success() => Ok(()),
        other => Err(format!("`ip netns del {ns}`: {other:?}")),
    }
}

/// Unmounts the bpffs at `path` if mounted (its pins go with it) and removes the directory.
fn remove_bpffs(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    if on_bpffs(path) {
        let c = c_path(path);
        // SAFETY: a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(format!(
                "unmounting {}: {}",
                path.display(),
                io::Error::last_os_error()
            ));
        }
    }
    std::fs::remove_dir(path).map_err(|e| format!("removing {}: {e}", path.display()))
}

/// Kills what runs in `path` (bounded: 5 s), then removes the directory.
fn remove_cgroup(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if pids.trim().is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            signal(pid, libc::SIGKILL);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(path);
}

/// Whether `name` (after `prefix`) belongs to a test process that no longer exists.
fn owner_is_gone(name: &str, prefix: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// Namespaces and bpffs mount points of test processes that no longer exist (a killed run).
fn remove_leftovers() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line.split_whitespace().next() {
                if owner_is_gone(name, PREFIX) {
                    let _ = delete_namespace(name);
                }
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with("-bpffs") && owner_is_gone(&name, PREFIX) {
                let _ = remove_bpffs(&entry.path());
            }
            if name.ends_with("-netns") && owner_is_gone(&name, PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Cgroups of test processes that no longer exist (a killed run).
fn remove_leftover_cgroups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if owner_is_gone(&entry.file_name().to_string_lossy(), CGROUP_PREFIX) {
            remove_cgroup(&entry.path());
        }
    }
}
