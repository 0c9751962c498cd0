//! A node made of network namespaces, for end-to-end tests: a `node` namespace (where the
//! agent runs, never in the machine's own namespace) and pod namespaces joined to it by veth
//! pairs, routed like a CNI would (pod /32 routes on the node, proxy ARP on the host side, the
//! pod's default route on its `eth0`). Addresses are in 10.200.0.0/16 and exist only
//! inside these namespaces.
//!
//! A [`TestNode`] removes everything it made when dropped, also on panic: its processes, then
//! its namespaces (which takes their veths and routes with them). Namespaces left by a test
//! process that was killed are removed when the next `TestNode` starts.
//!
//! [`TestNode::use_cgroup`] gives the node a cgroup v2 of its own ([`TestCgroup`],
//! `<cgroup2 mount>/nodeward-test-<pid>-<seq>`): every process the node starts from then on
//! (agent, pod servers, clients) joins it before it runs, so programs attached to that cgroup
//! (the fast path's `sock_ops`) see exactly the node's sockets and never the machine's. It is
//! removed after the processes; cgroups of killed test runs are removed at the next start.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Prefix of every namespace a test makes: `nwt-<pid>-<seq>-<name>`.
pub const PREFIX: &str = "nwt-";
/// The node's own address (on its loopback), the source of the agent's connections to pods.
pub const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(10, 200, 255, 1);

/// Nodes made by this process so far (tests of one binary run in parallel).
static SEQUENCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Prefix of every cgroup a test makes: `nodeward-test-<pid>-<seq>`.
pub const CGROUP_PREFIX: &str = "nodeward-test-";

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
            "no cgroup2 file system is mounted (needed for the fast path's sock_ops programs):              `mount -t cgroup2 none /sys/fs/cgroup/unified`",
        )
}

/// A cgroup v2 made for one test, removed (its processes killed first) when dropped.
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

/// Kills what runs in `path` (bounded: 5 s), then removes the directory.
fn remove_cgroup(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = std::fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        if pids.trim().is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_dir(path);
}

/// Cgroups of test processes that no longer exist (a killed run).
fn remove_leftover_cgroups(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(CGROUP_PREFIX)) else {
            continue;
        };
        let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if owner.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            remove_cgroup(&entry.path());
        }
    }
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
    let dir = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // `union bpf_attr`'s `query` member: target_fd at 0, attach_type at 4, query_flags at 8,
    // attach_flags at 12, prog_ids at 16, prog_cnt at 24; the rest stays zero. u64s keep the
    // 8-byte alignment the kernel's struct has.
    let mut attr = [0_u64; 9];
    let fd = u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&dir)).expect("a valid descriptor");
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
        std::io::Error::last_os_error()
    );
    (attr[3] & 0xffff_ffff) as u32
}

/// Makes `command`'s process join the cgroup whose `cgroup.procs` is `procs` before it execs, so
/// every socket it opens belongs to that cgroup.
fn join_cgroup(command: &mut Command, procs: &Path) {
    let procs = CString::new(procs.as_os_str().as_bytes()).expect("cgroup path without NUL");
    // SAFETY: the closure only calls async-signal-safe functions (open, write, close) on data
    // prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // "0": the writing process itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            if written == 1 {
                Ok(())
            } else {
                Err(error)
            }
        });
    }
}

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
    /// Declared last: removed after the processes and namespaces.
    cgroup: Option<TestCgroup>,
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
            cgroup: None,
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

    /// `nsenter --net=<netns> -- <program>`, joining the node's cgroup if it has one.
    fn command(&self, netns: &str, program: &std::ffi::OsStr) -> Command {
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
        let child = self
            .command(netns, program.as_os_str())
            .args(args)
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
        let child = self
            .command(netns, program.as_os_str())
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

    /// Runs a command inside `netns` and returns its output (whatever its exit status).
    #[must_use]
    pub fn exec(&self, netns: &str, args: &[&str]) -> Output {
        self.command(netns, std::ffi::OsStr::new(args[0]))
            .args(&args[1..])
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

    /// Waits up to `limit` for a process started with [`TestNode::spawn`] to exit by itself and
    /// returns its exit code; `None` if it was still running (it is then killed) or was killed
    /// by a signal. The process is reaped and forgotten, so nothing signals its pid later.
    pub fn wait_exit(&mut self, pid: u32, limit: std::time::Duration) -> Option<i32> {
        let index = self.children.iter().position(|c| c.id() == pid)?;
        let mut child = self.children.remove(index);
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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
