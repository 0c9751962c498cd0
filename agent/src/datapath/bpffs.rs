//! The BPF filesystem and the layout of nodeward's pin directory.
//!
//! ```text
//! <pin_dir>/                      (default /sys/fs/bpf/nodeward)
//!   maps/PROTECTED_ENDPOINTS      the maps, pinned by name (adopted by the next start)
//!   maps/CONFIG
//!   maps/COUNTERS
//!   links/steer-<ifindex>         one TCX link per attachment (keeps the program attached and
//!   links/guard-<ifindex>         loaded while the agent is down)
//!   fastpath/sockops              the fast path's cgroup link (`--fast-path on`)
//!   inpod/<netns inode>-<ifindex> `inpod` in a protected pod's namespace (`--steering in-pod`)
//! ```
//!
//! An attachment pin is named by the interface's index, which stays the same while the interface
//! exists (its name may change); a pin whose interface is gone belongs to a link the kernel
//! already detached, and is removed.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use super::DatapathError;

/// `BPF_FS_MAGIC` (`include/uapi/linux/magic.h`): `statfs(2)`'s `f_type` on a bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The program an attachment pin is for, and where it is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// `steer` on TC ingress.
    Steer,
    /// `guard` on TC egress.
    Guard,
    /// `inpod` on TC ingress inside a pod's namespace (pinned under `inpod/`, never `links/`).
    InPod,
    /// `inpod_egress` on TC egress inside a pod's namespace (pinned under `inpod/` too).
    InPodEgress,
}

impl Hook {
    /// The program's name in the object (and the prefix of its pins).
    pub const fn program(self) -> &'static str {
        match self {
            Self::Steer => "steer",
            Self::Guard => "guard",
            Self::InPod => "inpod",
            Self::InPodEgress => "inpod_egress",
        }
    }

    /// `"ingress"` or `"egress"`.
    pub const fn direction(self) -> &'static str {
        match self {
            Self::Steer | Self::InPod => "ingress",
            Self::Guard | Self::InPodEgress => "egress",
        }
    }

    /// The pin file name of this hook's attachment to interface `ifindex`.
    pub fn pin_name(self, ifindex: u32) -> String {
        format!("{}-{ifindex}", self.program())
    }

    /// Parses a pin file name made by [`Self::pin_name`].
    pub fn parse_pin_name(name: &str) -> Option<(Self, u32)> {
        let (program, ifindex) = name.split_once('-')?;
        let hook = match program {
            "steer" => Self::Steer,
            "guard" => Self::Guard,
            _ => return None,
        };
        Some((hook, ifindex.parse().ok()?))
    }
}

/// An attachment pin found on disk: what its name says (hook, interface index), and its path.
pub type LinkPin = (Option<(Hook, u32)>, PathBuf);

/// Paths under the pin directory.
#[derive(Debug, Clone)]
pub struct PinLayout {
    /// The pin directory itself.
    pub root: PathBuf,
}

impl PinLayout {
    /// Where the maps are pinned (aya's `default_map_pin_directory`).
    pub fn maps(&self) -> PathBuf {
        self.root.join("maps")
    }

    /// Where the attachments are pinned.
    pub fn links(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Where the fast path's cgroup link is pinned.
    pub fn fast_path(&self) -> PathBuf {
        self.root.join("fastpath")
    }

    /// The pin of the fast path's `sock_ops` cgroup link.
    pub fn fast_path_link(&self) -> PathBuf {
        self.fast_path().join("sockops")
    }

    /// The pin of `hook`'s attachment to `ifindex`.
    pub fn link(&self, hook: Hook, ifindex: u32) -> PathBuf {
        self.links().join(hook.pin_name(ifindex))
    }

    /// Creates the directories.
    pub fn create(&self) -> Result<(), DatapathError> {
        for dir in [
            self.root.clone(),
            self.maps(),
            self.links(),
            self.fast_path(),
            self.inpod(),
        ] {
            fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
                operation: "creating",
                path: dir,
                source,
            })?;
        }
        Ok(())
    }

    /// The attachment pins present: (hook, ifindex, path); files with other names are returned
    /// with `None`.
    pub fn link_pins(&self) -> Result<Vec<LinkPin>, DatapathError> {
        list(&self.links()).map(|paths| {
            paths
                .into_iter()
                .map(|path| {
                    let parsed = path
                        .file_name()
                        .and_then(|name| name.to_str())
                        .and_then(Hook::parse_pin_name);
                    (parsed, path)
                })
                .collect()
        })
    }

    /// The map pins present.
    pub fn map_pins(&self) -> Result<Vec<PathBuf>, DatapathError> {
        list(&self.maps())
    }
}

/// Entries of `dir`; none when it does not exist.
fn list(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DatapathError::PinDir {
                operation: "listing",
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DatapathError::PinDir {
            operation: "listing",
            path: dir.to_owned(),
            source,
        })?;
        paths.push(entry.path());
    }
    paths.sort();
    Ok(paths)
}

/// Makes sure `pin_dir` is on a BPF filesystem: when it is not and it lies under `mount_point`,
/// mounts a bpffs at `mount_point` (creating the directory). Returns whether it mounted one.
///
/// The agent runs in the node's network namespace entered with `nsenter --net=...`, which keeps
/// the machine's mounts; a machine without systemd may have no bpffs mounted at all.
pub fn ensure_mounted(mount_point: &Path, pin_dir: &Path) -> Result<bool, DatapathError> {
    if on_bpffs(pin_dir).map_err(|source| DatapathError::Bpffs {
        path: pin_dir.to_owned(),
        source,
    })? {
        return Ok(false);
    }
    if !pin_dir.starts_with(mount_point) {
        return Err(DatapathError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    let bpffs_error = |source| DatapathError::Bpffs {
        path: mount_point.to_owned(),
        source,
    };
    fs::create_dir_all(mount_point).map_err(bpffs_error)?;
    let target = CString::new(mount_point.as_os_str().as_bytes())
        .map_err(|e| bpffs_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: every pointer is a valid NUL-terminated string (or null for `data`) that outlives
    // the call.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(bpffs_error(io::Error::last_os_error()));
    }
    tracing::info!(path = %mount_point.display(), "mounted a BPF filesystem");
    if on_bpffs(pin_dir).map_err(bpffs_error)? {
        Ok(true)
    } else {
        Err(DatapathError::NotBpffs {
            path: pin_dir.to_owned(),
        })
    }
}

/// Whether `path`, or its nearest existing ancestor, is on a bpffs.
pub fn on_bpffs(path: &Path) -> io::Result<bool> {
    let mut existing = path;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) => existing = parent,
            None => return Ok(false),
        }
    }
    let c_path = CString::new(existing.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a valid NUL-terminated path and a buffer of the size `statfs` writes.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `statfs` returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    #[expect(
        clippy::unnecessary_cast,
        reason = "f_type's integer type differs between libc targets"
    )]
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        for hook in [Hook::Steer, Hook::Guard] {
            assert_eq!(Hook::parse_pin_name(&hook.pin_name(42)), Some((hook, 42)));
        }
        assert_eq!(Hook::parse_pin_name("steer-x"), None);
        assert_eq!(Hook::parse_pin_name("other-1"), None);
        assert_eq!(Hook::parse_pin_name("steer"), None);
    }

    #[test]
    fn tmp_is_not_bpffs() {
        assert!(!on_bpffs(&std::env::temp_dir().join("nodeward-no-such-dir")).unwrap());
    }
}
