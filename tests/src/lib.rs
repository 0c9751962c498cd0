//! Shared helpers of nodeward's end-to-end tests: finding the built `nodeward` binary and the
//! repository's example files; [`netns`] builds a node out of network namespaces.

pub mod netns;

use std::path::PathBuf;
use std::process::{Command, Output};

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

/// The `nodeward` binary of the same build as this test (`target/<profile>/nodeward`).
///
/// # Panics
/// When it has not been built: run `cargo build -p nodeward` (the README's test command does).
#[must_use]
pub fn nodeward_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/nodeward
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("nodeward");
    assert!(
        bin.is_file(),
        "{} does not exist: build the agent first (`cargo build -p nodeward`, or `cargo xtask test`)",
        bin.display()
    );
    bin
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
