//! A node made of network namespaces, for end-to-end tests: a `node` namespace (where the
//! agent runs, never in the machine's own namespace) and pod namespaces joined to it by veth
//! pairs, routed like a CNI would (pod /32 routes on the node, proxy ARP on the host side, the
//! pod's default route on its `eth0`). Addresses are in 10.200.0.0/16 and exist only
//! inside these namespaces.
//!
//! A [`TestNode`] removes everything it made when dropped, also on panic: its processes, then
//! its namespaces (which takes their veths and routes with them). Namespaces left by a test
//! process that was killed are removed when the next `TestNode` starts.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

/// Prefix of every namespace a test makes: `nwt-<pid>-<seq>-<name>`.
pub const PREFIX: &str = "nwt-";
/// The node's own address (on its loopback), the source of the agent's connections to pods.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 255, 1);

/// Nodes made by this process so far (tests of one binary run in parallel).
static SEQUENCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Panics, naming what is missing, unless the test can create namespaces and load programs.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "this end-to-end test needs root (CAP_SYS_ADMIN for network namespaces, CAP_NET_ADMIN for \
         veths and routes, CAP_BPF for the kernel programs); effective uid is {euid}. Run it via \
         `cargo xtask test` as root."
    );
    assert!(Path::new("/sys/fs/cgroup").exists() && Path::new("/proc/self/ns/net").exists());
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`{}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

fn ip(args: &[&str]) -> Output {
    let mut full = vec!["ip"];
    full.extend_from_slice(args);
    run(&full)
}

/// A pod: its namespace, address and the node-side end of its veth.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The host-side interface in the node namespace.
    pub host_if: String,
}

/// The node and its pods.
pub struct TestNode {
    pub netns: String,
    /// `<pid>-<seq>`: makes this node's names unique on the machine.
    id: String,
    /// Short form for interface names (15 bytes at most).
    tag: String,
    pods: Vec<Pod>,
    namespaces: Vec<String>,
    children: Vec<Child>,
}

impl TestNode {
    /// Creates the node namespace after removing leftovers of killed test runs.
    #[must_use]
    pub fn new() -> Self {
        require_root();
        remove_leftovers();
        let pid = std::process::id();
        let seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let id = format!("{pid}-{seq}");
        let tag = format!("{}{seq}", pid % 10_000);
        let netns = format!("{PREFIX}{id}-node");
        let mut node = Self {
            netns: netns.clone(),
            id,
            tag,
            pods: Vec::new(),
            namespaces: Vec::new(),
            children: Vec::new(),
        };
        ip(&["netns", "add", &netns]);
        node.namespaces.push(netns.clone());
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{NODE_ADDR}/32"),
            "dev",
            "lo",
        ]);
        node.sysctl("net.ipv4.ip_forward", "1");
        node
    }

    fn sysctl(&self, key: &str, value: &str) {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.netns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ]);
    }

    /// Adds a pod with address `10.200.0.<index>`.
    pub fn add_pod(&mut self, name: &str, index: u8) -> Pod {
        let netns = format!("{PREFIX}{}-{name}", self.id);
        let host_if = format!("nw{}p{index}", self.tag);
        let pod_ip = Ipv4Addr::new(10, 200, 0, index);
        ip(&["netns", "add", &netns]);
        self.namespaces.push(netns.clone());
        ip(&[
            "-n",
            &self.netns,
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &netns,
        ]);
        ip(&["-n", &self.netns, "link", "set", &host_if, "up"]);
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "route", "add", "default", "dev", "eth0"]);
        ip(&[
            "-n",
            &self.netns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &host_if,
        ]);
        self.sysctl(&format!("net.ipv4.conf.{host_if}.proxy_arp"), "1");
        let pod = Pod {
            name: name.to_owned(),
            netns,
            ip: pod_ip,
            host_if,
        };
        self.pods.push(pod.clone());
        pod
    }

    /// Starts `program args` inside `netns`, keeping the machine's mounts (`nsenter --net`),
    /// so bpffs and cgroup2 stay visible. Killed when the node is dropped.
    pub fn spawn(&mut self, netns: &str, program: &Path, args: &[&str]) -> u32 {
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {} in {netns}: {e}", program.display()));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Like [`TestNode::spawn`], with the program's stdout and stderr appended to `log` (a
    /// pipe nobody reads could fill up and block a chatty program).
    pub fn spawn_logged(&mut self, netns: &str, program: &Path, args: &[&str], log: &Path) -> u32 {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        let err = file.try_clone().expect("log file handle");
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
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

    /// Runs a command inside `netns` and returns its output (whatever its exit status).
    #[must_use]
    pub fn exec(&self, netns: &str, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {args:?} in {netns}: {e}"))
    }

    /// Stops a process started with [`TestNode::spawn`] with SIGTERM and returns its exit code
    /// (`None` if it had to be killed after `wait`).
    pub fn terminate(&mut self, pid: u32, wait: std::time::Duration) -> Option<i32> {
        let child = self.children.iter_mut().find(|c| c.id() == pid)?;
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = std::time::Instant::now() + wait;
        let code = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status.code();
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        // Reaped: its pid may be reused, so the node's Drop must not signal it again.
        self.children.retain(|c| c.id() != pid);
        code
    }

    /// `curl` from a namespace: (HTTP status, body); status 0 when no answer came.
    #[must_use]
    pub fn curl(&self, netns: &str, method: &str, url: &str, headers: &[&str]) -> (u16, String) {
        let mut args = vec![
            "curl",
            "-s",
            "-m",
            "5",
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

    #[must_use]
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }
}

impl Default for TestNode {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // SIGTERM first so an agent removes what it made; SIGKILL what is still there after 5 s.
        for child in &self.children {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        for child in &mut self.children {
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            delete_namespace(ns);
        }
    }
}

/// Kills what still runs in a namespace, then deletes it.
fn delete_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).status();
}

/// Namespaces of test processes that no longer exist (a killed run).
fn remove_leftovers() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            delete_namespace(name);
        }
    }
}
