//! Network namespaces of pods: found by address, entered for a moment by the calling thread.
//!
//! In-pod steering (`--steering in-pod`) opens the enforcer's listeners, attaches the `inpod`
//! program and creates the enforcer's upstream sockets *inside* each protected pod's network
//! namespace. A socket belongs to the namespace it was created in for its whole life, and a TCX
//! link to the namespace its interface index was resolved in, so each of those is done by the
//! calling thread after `setns(2)` into the pod and before switching back ([`within`]). The
//! switch is per thread (`CLONE_NEWNET` may be entered by one thread of a multi-threaded
//! process) and takes two system calls.
//!
//! Pods are found the way istio-cni's node agent finds them after a restart: the namespaces
//! named in a directory of namespace files (`/run/netns`, where `ip netns`, CNI runtimes such as
//! containerd's and the kind node keep them, or the workloads file's `netns`), entered one by
//! one, matched by the pod's address on one of their interfaces.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One network namespace, held open (the descriptor keeps it alive while we use it).
#[derive(Debug, Clone)]
pub struct Netns {
    /// The namespace file it was opened from.
    pub path: PathBuf,
    /// Its inode: the namespace's identity while it exists.
    pub inode: u64,
    file: Arc<File>,
}

impl Netns {
    /// Opens the namespace file at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = File::open(path)?;
        let inode = file.metadata()?.ino();
        Ok(Self {
            path: path.to_owned(),
            inode,
            file: Arc::new(file),
        })
    }

    /// The namespace's cookie (`SO_NETNS_COOKIE` of a socket made in it), what
    /// `bpf_get_netns_cookie` returns to programs running there.
    pub fn cookie(&self) -> io::Result<u64> {
        self.within(|| {
            let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
            let mut cookie: u64 = 0;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: a valid socket and a buffer of `len` bytes that outlives the call.
            let rc = unsafe {
                libc::getsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_NETNS_COOKIE,
                    std::ptr::from_mut(&mut cookie).cast(),
                    &raw mut len,
                )
            };
            if rc == 0 {
                Ok(cookie)
            } else {
                Err(io::Error::last_os_error())
            }
        })?
    }

    /// The calling thread's own namespace.
    pub fn current() -> io::Result<Self> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Runs `f` with the calling thread inside this namespace, then switches back. Sockets
    /// created by `f` stay in this namespace. The process aborts if switching back fails: a
    /// thread left in a pod's namespace would create the node's sockets there.
    pub fn within<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = Self::current()?;
        if home.inode == self.inode {
            return Ok(f());
        }
        setns(&self.file)?;
        let back = Restore(home);
        let result = f();
        drop(back);
        Ok(result)
    }
}

/// Switches the thread back to its namespace when dropped (also while unwinding).
struct Restore(Netns);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.0.file) {
            eprintln!(
                "nodeward: cannot return to the node's network namespace ({e}); aborting rather than serving from a pod's namespace"
            );
            std::process::abort();
        }
    }
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: a valid, open namespace descriptor; `setns` only reads it.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The addresses on the non-loopback interfaces of the calling thread's namespace: what the CNI
/// gave the pod (a loopback address never legitimately leaves it).
fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
    Ok(addrs
        .filter(|a| {
            !a.flags
                .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
        })
        .filter_map(|a| a.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect())
}

/// The network namespaces in `dir` (each file a namespace, as `ip netns add` and CNI runtimes
/// make them) other than the caller's own, with the addresses found on their non-loopback
/// interfaces, sorted.
/// Files that are not namespaces, or vanish meanwhile, are skipped.
pub fn scan(dir: &Path) -> io::Result<Vec<(Netns, Vec<IpAddr>)>> {
    let home = Netns::current()?;
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut seen = BTreeMap::new();
    for entry in entries.flatten() {
        let Ok(netns) = Netns::open(&entry.path()) else {
            continue;
        };
        if netns.inode == home.inode || seen.contains_key(&netns.inode) {
            continue;
        }
        match netns.within(local_addresses) {
            Ok(Ok(mut addresses)) => {
                addresses.sort_unstable();
                addresses.dedup();
                seen.insert(netns.inode, (netns, addresses));
            }
            Ok(Err(e)) | Err(e) => {
                tracing::debug!(path = %entry.path().display(), error = %e, "not a network namespace we can read");
            }
        }
    }
    Ok(seen.into_values().collect())
}
