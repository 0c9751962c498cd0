//! nodeward's test kit, shared by the agent's integration tests (`agent/tests`) and the
//! end-to-end tests of this crate (`tests/tests`):
//!
//! - [`netns`]: a node made of network namespaces ([`netns::TestNode`]): pods on routed or
//!   bridged veths, IPv4 or dual-stack, the node's address on `lo`, a BPF filesystem and a
//!   cgroup v2 of its own, cleanup on drop and of what killed runs left;
//! - [`cluster`]: what a kind node has around its pods: kube-proxy's Service rules (iptables and
//!   nftables modes), portmap's hostPort rules, nodes on a LAN with an outside host;
//! - [`privilege`]: the one check that a privileged test has what it needs, failing (never
//!   skipping) with the missing capability named;
//! - [`agent`]: the real `nodeward` binary as a process ([`agent::Agent`]): readiness, admin
//!   GETs, its log, signals;
//! - [`e2e`]: a node with pods, policies and a running agent, for the end-to-end scenarios;
//! - `extauthz` (feature `ext-authz`): real external authorizers for the CUSTOM action, HTTP
//!   and gRPC, behaving like Istio's ext-authz sample and recording every check they receive;
//! - [`TempDir`], [`eventually`], [`free_port`], and the paths of the binaries and example files.
//!
//! This crate does not depend on the `nodeward` crate (the agent's tests depend on it), so it
//! knows the agent only as a binary and by its flags.

pub mod agent;
pub mod cluster;
pub mod e2e;
#[cfg(feature = "ext-authz")]
pub mod extauthz;
pub mod netns;
pub mod privilege;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `n` bytes of a fixed, non-repeating-at-small-periods pattern, for bodies checked byte for byte.
#[must_use]
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| ((i.wrapping_mul(31) ^ (i >> 9)) % 251) as u8)
        .collect()
}

/// 64-bit FNV-1a of `bytes` (what `nw-pod-server` reports as `body_fnv`).
#[must_use]
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The repository root.
#[must_use]
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A binary of the same build as the running test (`target/<profile>/<name>`).
fn sibling_bin(name: &str, build: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} does not exist: build it first (`{build}`, or `cargo xtask test`)",
        bin.display()
    );
    bin
}

/// The `nodeward` binary of the same build as this test (`target/<profile>/nodeward`). The
/// agent's own tests pass `env!("CARGO_BIN_EXE_nodeward")` instead, which cargo builds for them.
///
/// # Panics
/// When it has not been built: run `cargo build -p nodeward` (the README's test command does).
#[must_use]
pub fn nodeward_bin() -> PathBuf {
    sibling_bin("nodeward", "cargo build -p nodeward")
}

/// The pod server of the end-to-end tests (`target/<profile>/nw-pod-server`, this crate's
/// binary: cargo builds it for this crate's tests).
#[must_use]
pub fn pod_server_bin() -> PathBuf {
    sibling_bin("nw-pod-server", "cargo build -p nodeward-tests")
}

/// The external authorizers as a process (`target/<profile>/nw-ext-authz`, this crate's
/// binary), for a provider running as a pod.
#[must_use]
pub fn ext_authz_bin() -> PathBuf {
    sibling_bin("nw-ext-authz", "cargo build -p nodeward-tests")
}

/// Runs `nodeward` with `args` from the repository root.
#[must_use]
pub fn nodeward(args: &[&str]) -> Output {
    Command::new(nodeward_bin())
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("nodeward runs")
}

/// Polls `condition` every 20 ms until it holds or `limit` has passed; whether it held. The
/// condition is always evaluated at least once, and once more at the deadline.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback port nothing listens on right now.
#[must_use]
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A directory of its own for one test (`<temp>/nodeward-<tag>-<pid>-<seq>`), removed with
/// everything in it when dropped, also when the test panics.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates the directory; `tag` says which test it belongs to.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("nodeward-{tag}-{}-{seq}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self(path)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `relative` inside the directory.
    #[must_use]
    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.0.join(relative)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
