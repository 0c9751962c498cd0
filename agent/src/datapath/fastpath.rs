//! The same-node fast path as the agent runs it (`--fast-path on`): `fastpath_sockops` attached
//! to a cgroup v2 through a pinned cgroup link, `fastpath_msg` attached to the pinned
//! `FAST_PATH_SOCKETS` sock hash, and the node's network namespace cookie in `NODE_NETNS`.
//!
//! Lifecycle, as for the TC attachments:
//! - start (on): the new `sock_ops` link is attached *before* a previous
//!   run's pinned link is removed, so some program adds sockets at every instant; the sock hash is
//!   adopted by its pin, so sockets already in it keep their fast path; `fastpath_msg` replaces
//!   the map's previous `sk_msg` program (`BPF_PROG_ATTACH` on a sock map swaps it).
//! - start (off): a previous run's link pin and sock hash pin are removed before loading, so the
//!   old programs and map are released (a sock map that is freed releases its sockets, which go
//!   back to plain TCP) and nothing of the fast path stays attached.
//! - clean stop: `fastpath_msg` detached, the link unpinned and closed; the map pins go with the
//!   others.
//! - crash: the pinned link keeps `fastpath_sockops` on the cgroup and the map (with
//!   `fastpath_msg` on it) alive, so established connections keep their fast path.

use std::{
    fs, io,
    mem::ManuallyDrop,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData, SockHash},
    programs::{links::FdLink, sk_msg::SkMsgLink, CgroupAttachMode, SkMsg, SockOps},
    Ebpf,
};
use nodeward_common::{fastpath::SocketKey, maps};

use super::{bpffs::PinLayout, links, DatapathError};

/// Name of the `sock_ops` program in the object.
pub const SOCKOPS_PROGRAM: &str = "fastpath_sockops";
/// Name of the `sk_msg` program in the object.
pub const MSG_PROGRAM: &str = "fastpath_msg";
/// Name of the sock hash: key [`SocketKey`], value a socket.
pub const FAST_PATH_SOCKETS_MAP: &str = maps::FAST_PATH_SOCKETS.name;
/// Name of the single-element array holding the node's network namespace cookie.
pub const NODE_NETNS_MAP: &str = maps::NODE_NETNS.name;

/// `CGROUP2_SUPER_MAGIC` (`include/uapi/linux/magic.h`).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The fast path's attachments, held while the agent runs.
pub struct FastPath {
    /// The cgroup `fastpath_sockops` is attached to.
    pub cgroup: PathBuf,
    /// Our descriptor of the cgroup link (the pin holds another reference).
    sockops: FdLink,
    /// `fastpath_msg` on the sock hash. Not dropped unless [`stop`] runs: dropping detaches it,
    /// and a run that ends without a clean stop must leave it in place, as a crash does.
    msg: ManuallyDrop<SkMsgLink>,
}

/// The root of the cgroup v2 hierarchy: /sys/fs/cgroup when it is a cgroup2 file system
/// (unified hierarchy, every current distribution and Kubernetes node), else the first
/// `cgroup2` mount in /proc/self/mountinfo (hybrid hierarchy: /sys/fs/cgroup/unified). When
/// neither exists, /sys/fs/cgroup, which [`check_cgroup`] then refuses with the fix.
#[must_use]
pub fn cgroup2_root() -> PathBuf {
    let unified = PathBuf::from("/sys/fs/cgroup");
    if check_cgroup(&unified).is_ok() {
        return unified;
    }
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|text| cgroup2_mount(&text))
        .unwrap_or(unified)
}

/// The mount point of the first `cgroup2` file system in a mountinfo text.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // `id parent major:minor root mount-point options [optional...] - fstype source ...`
        let (before, after) = line.split_once(" - ")?;
        (after.split_whitespace().next()? == "cgroup2")
            .then(|| before.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Whether `path` is a cgroup v2 directory.
pub fn check_cgroup(path: &Path) -> Result<(), DatapathError> {
    let not_cgroup2 = |found: String| DatapathError::NotCgroup2 {
        path: path.to_owned(),
        found,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| not_cgroup2("a path with a NUL byte".to_owned()))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the size `statfs` writes.
    if unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(not_cgroup2(io::Error::last_os_error().to_string()));
    }
    // SAFETY: `statfs` returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    #[expect(
        clippy::unnecessary_cast,
        reason = "f_type's integer type differs between libc targets"
    )]
    let f_type = stat.f_type as i64;
    if f_type == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(not_cgroup2(format!("filesystem type {f_type:#x}")))
    }
}

/// The calling thread's network namespace cookie (`SO_NETNS_COOKIE`, Linux >= 5.14).
pub fn netns_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie = 0_u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket and an output buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Before loading with the fast path off: removes the pinned sock hash, so the loader makes an
/// empty one and the previous run's map (with its `sk_msg` program and sockets) is released with
/// its last program.
pub fn retire_map_pin(layout: &PinLayout) -> Result<(), DatapathError> {
    links::unpin(&layout.maps().join(FAST_PATH_SOCKETS_MAP))
}

/// Removes a previous run's pinned `sock_ops` link (detaching it); returns whether there was one.
pub fn remove_link_pin(layout: &PinLayout) -> Result<bool, DatapathError> {
    let pin = layout.fast_path_link();
    let existed = pin.exists();
    links::unpin(&pin)?;
    Ok(existed)
}

/// Writes the node's network namespace cookie (0: the fast path adds no socket).
pub fn write_node_netns(ebpf: &mut Ebpf, cookie: u64) -> Result<(), DatapathError> {
    let map = ebpf.map_mut(NODE_NETNS_MAP).ok_or(DatapathError::Missing {
        kind: "map",
        name: NODE_NETNS_MAP,
    })?;
    let mut array: Array<&mut MapData, u64> = Array::try_from(map)
        .map_err(|source| DatapathError::map(NODE_NETNS_MAP, "open", source))?;
    array
        .set(0, cookie, 0)
        .map_err(|source| DatapathError::map(NODE_NETNS_MAP, "write", source))
}

/// Loads both programs, attaches `fastpath_msg` to the sock hash and `fastpath_sockops` to
/// `cgroup` (pinned), replacing what a previous run left. Call it in the node's network namespace.
pub fn start(
    ebpf: &mut Ebpf,
    layout: &PinLayout,
    cgroup: &Path,
) -> Result<FastPath, DatapathError> {
    check_cgroup(cgroup)?;
    let cookie = netns_cookie().map_err(|e| {
        DatapathError::fast_path(
            "reading the node's network namespace cookie (SO_NETNS_COOKIE, Linux >= 5.14)",
            e,
        )
    })?;
    write_node_netns(ebpf, cookie)?;

    let map_fd = {
        let map = ebpf
            .map(FAST_PATH_SOCKETS_MAP)
            .ok_or(DatapathError::Missing {
                kind: "map",
                name: FAST_PATH_SOCKETS_MAP,
            })?;
        let hash: SockHash<&MapData, SocketKey> = SockHash::try_from(map)
            .map_err(|source| DatapathError::map(FAST_PATH_SOCKETS_MAP, "open", source))?;
        hash.fd()
            .try_clone()
            .map_err(|e| DatapathError::fast_path("duplicating the sock hash descriptor", e))?
    };

    let msg: &mut SkMsg = super::object::program(ebpf, MSG_PROGRAM)?;
    msg.load()
        .map_err(|e| DatapathError::fast_path(format!("loading `{MSG_PROGRAM}`"), e))?;
    let attach_msg = |e| {
        DatapathError::fast_path(
            format!("attaching `{MSG_PROGRAM}` to {FAST_PATH_SOCKETS_MAP}"),
            e,
        )
    };
    let id = msg.attach(&map_fd).map_err(attach_msg)?;
    let msg_link = msg.take_link(id).map_err(attach_msg)?;
    let msg_link = ManuallyDrop::new(msg_link);

    let sockops: &mut SockOps = super::object::program(ebpf, SOCKOPS_PROGRAM)?;
    sockops
        .load()
        .map_err(|e| DatapathError::fast_path(format!("loading `{SOCKOPS_PROGRAM}`"), e))?;
    let cgroup_dir = fs::File::open(cgroup).map_err(|source| DatapathError::NotCgroup2 {
        path: cgroup.to_owned(),
        found: source.to_string(),
    })?;
    let attach_error = |e| {
        DatapathError::fast_path(
            format!(
                "attaching `{SOCKOPS_PROGRAM}` to the cgroup {}",
                cgroup.display()
            ),
            e,
        )
    };
    // A cgroup BPF link takes no attach flags (the kernel refuses BPF_F_ALLOW_MULTI there with
    // EINVAL); links on one cgroup always coexist, which the takeover relies on.
    let id = sockops
        .attach(&cgroup_dir, CgroupAttachMode::Single)
        .map_err(attach_error)?;
    let link = sockops.take_link(id).map_err(attach_error)?;
    let link = FdLink::try_from(link).map_err(|e| {
        DatapathError::fast_path("the cgroup attachment is not a BPF link (Linux >= 5.7)", e)
    })?;
    // The new link runs from here on; only now does the previous run's go.
    if remove_link_pin(layout)? {
        tracing::info!("replaced the fast path's cgroup attachment left by a previous run");
    }
    let pin = layout.fast_path_link();
    let pinned = link.pin(&pin).map_err(|source| DatapathError::PinLink {
        program: SOCKOPS_PROGRAM,
        path: pin.clone(),
        source: Box::new(source),
    })?;
    tracing::info!(cgroup = %cgroup.display(), "fast path attached");
    Ok(FastPath {
        cgroup: cgroup.to_owned(),
        sockops: FdLink::from(pinned),
        msg: msg_link,
    })
}

/// Clean stop: detaches `fastpath_msg` from the sock hash and the cgroup link; returns what
/// could not be removed.
pub fn stop(fast_path: FastPath, layout: &PinLayout) -> Vec<String> {
    let FastPath {
        sockops,
        msg,
        cgroup,
        ..
    } = fast_path;
    // Dropping the link wrapper detaches the program from the map (`BPF_PROG_DETACH`).
    drop(ManuallyDrop::into_inner(msg));
    let mut failures = Vec::new();
    if let Err(e) = remove_link_pin(layout) {
        failures.push(e.to_string());
    }
    drop(sockops);
    tracing::info!(cgroup = %cgroup.display(), "fast path detached");
    failures
}

/// Sockets in the sock hash now.
pub fn sockets(ebpf: &Ebpf) -> Result<usize, DatapathError> {
    let map = ebpf
        .map(FAST_PATH_SOCKETS_MAP)
        .ok_or(DatapathError::Missing {
            kind: "map",
            name: FAST_PATH_SOCKETS_MAP,
        })?;
    let hash: SockHash<&MapData, SocketKey> = SockHash::try_from(map)
        .map_err(|source| DatapathError::map(FAST_PATH_SOCKETS_MAP, "open", source))?;
    Ok(hash.keys().flatten().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cgroup2_root_is_found_in_unified_and_hybrid_mount_tables() {
        let hybrid = "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n\
                      27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_mount(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(cgroup2_mount("31 1 0:27 / /proc rw - proc proc rw\n"), None);
        // On this machine, whatever its layout, the answer is a cgroup v2 directory.
        check_cgroup(&cgroup2_root()).expect("the machine's cgroup v2 root");
    }

    #[test]
    fn a_directory_that_is_not_cgroup2_is_refused_with_the_flag_to_fix_it() {
        let error = check_cgroup(&std::env::temp_dir()).expect_err("tmp is not a cgroup v2");
        let message = error.to_string();
        assert!(message.contains("--cgroup"), "{message}");
        assert!(
            message.contains("is not one (filesystem type 0x"),
            "{message}"
        );
        let missing = check_cgroup(Path::new("/nonexistent/nodeward")).expect_err("missing");
        assert!(missing.to_string().contains("No such file"), "{missing}");
    }

    #[test]
    fn the_node_netns_cookie_is_readable_and_stable() {
        let cookie = netns_cookie().expect("SO_NETNS_COOKIE (Linux >= 5.14)");
        assert_ne!(cookie, 0);
        assert_eq!(netns_cookie().expect("again"), cookie);
    }
}
