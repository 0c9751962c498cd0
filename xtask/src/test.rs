//! `cargo xtask test`: setup, build, clippy, rustfmt check, then every test, as root.
//!
//! The datapath tests load eBPF programs and build network namespaces, so the whole suite runs
//! as root; without the privileges this fails up front and says which are missing (it never
//! skips the privileged tests).

use std::process::Command;

use anyhow::{bail, Result};

use crate::{setup, system};

/// The checks before the tests, in order. Each must succeed.
const STEPS: [&[&str]; 3] = [
    &["build", "--workspace"],
    &[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    &["fmt", "--all", "--check"],
];

/// The test run; its summaries are totalled into one closing line.
const TEST: &[&str] = &["test", "--workspace"];

pub fn run() -> Result<()> {
    let missing = system::missing_test_privileges()?;
    if !missing.is_empty() {
        bail!(
            "cargo xtask test runs the privileged datapath tests (loading eBPF programs, \
             creating network namespaces) and must run as root; missing: {}",
            missing.join(", ")
        );
    }
    setup::run()?;

    let path = system::path_with_cargo_bin()?;
    for args in STEPS {
        let mut cmd = Command::new("cargo");
        cmd.args(args).env("PATH", &path);
        println!("==> {}", system::describe(&cmd));
        system::run(&mut cmd)?;
    }

    // The agent mounts a BPF filesystem when the machine has none; undo that afterwards.
    let bpffs_before = system::bpffs_mounted(system::BPFFS);
    let mut cmd = Command::new("cargo");
    cmd.args(TEST).env("PATH", &path);
    println!("==> {}", system::describe(&cmd));
    let output = system::run_tee(&mut cmd);
    system::unmount_bpffs_we_caused(bpffs_before);
    let (passed, failed) = totals(
        &output
            .as_ref()
            .map_or_else(|(text, _)| text.clone(), Clone::clone),
    );
    // One closing line for the whole suite: cargo's last summary is often a doctest run of 0.
    println!("tests: {passed} passed, {failed} failed");
    output.map(|_| ()).map_err(|(_, e)| e)
}

/// Sums cargo test's `test result: ... N passed; M failed; ...` lines.
fn totals(output: &str) -> (u64, u64) {
    let count = |line: &str, word: &str| -> u64 {
        line.split([';', '.'])
            .find_map(|part| {
                part.trim()
                    .strip_suffix(word)
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    output
        .lines()
        .filter(|l| l.starts_with("test result:"))
        .fold((0, 0), |(p, f), l| {
            (p + count(l, "passed"), f + count(l, "failed"))
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn totals_sum_every_summary() {
        let out = "test result: ok. 189 passed; 0 failed; 0 ignored\nnoise\ntest result: FAILED. 5 passed; 2 failed; 1 ignored\n";
        assert_eq!(super::totals(out), (194, 2));
    }
}
