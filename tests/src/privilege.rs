//! The one privilege check of the privileged tests. A test that builds a namespace node or loads
//! kernel programs calls [`require_privileges`] first: without what it needs it FAILS, naming
//! each missing privilege; it never returns early and passes.
//!
//! Checked is what the kernel checks, the effective capability set (`CapEff` of
//! `/proc/self/status`), not the user id: a root process in a container without
//! `CAP_SYS_ADMIN` cannot make namespaces, and a non-root process with the capabilities can.

use std::path::Path;
use std::process::Command;

/// A capability the privileged tests need, with its bit in the kernel's masks
/// (linux/capability.h) and what it is needed for.
#[derive(Debug, Clone, Copy)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
    pub needed_for: &'static str,
}

pub const CAP_DAC_OVERRIDE: Capability = Capability {
    name: "CAP_DAC_OVERRIDE",
    bit: 1,
    needed_for: "writing root-owned /run/netns, the cgroup2 root and /proc/sys when not uid 0",
};
pub const CAP_NET_ADMIN: Capability = Capability {
    name: "CAP_NET_ADMIN",
    bit: 12,
    needed_for: "veths, addresses, routes, rules, sysctls, TC programs, IP_TRANSPARENT and SO_MARK",
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    name: "CAP_SYS_ADMIN",
    bit: 21,
    needed_for: "network namespaces (setns), mounting a BPF filesystem",
};
pub const CAP_BPF: Capability = Capability {
    name: "CAP_BPF",
    bit: 39,
    needed_for: "loading eBPF programs and maps",
};

/// What a namespace node and the kernel data path need.
pub const NODE: [Capability; 3] = [CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF];

/// The effective capability mask of process `pid` (`CapEff` of `/proc/<pid>/status`); `None`
/// when the process is gone.
#[must_use]
pub fn cap_eff(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The capabilities of `wanted` this process does not have in its effective set.
#[must_use]
pub fn missing(wanted: &[Capability]) -> Vec<Capability> {
    let eff = cap_eff(std::process::id()).expect("/proc/self/status has CapEff");
    wanted
        .iter()
        .filter(|cap| eff & (1 << cap.bit) == 0)
        .copied()
        .collect()
}

/// Fails, naming every missing privilege and what it is for, unless this process can build a
/// namespace node and load the data path: [`NODE`]'s capabilities, write access to the root-owned
/// paths (uid 0 or `CAP_DAC_OVERRIDE`), and iproute2, util-linux's `nsenter` and curl.
pub fn require_privileges() {
    let mut wanted = NODE.to_vec();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        wanted.push(CAP_DAC_OVERRIDE);
    }
    let missing = missing(&wanted);
    assert!(
        missing.is_empty(),
        "this test builds network namespaces and loads eBPF programs; missing: {}. Run the \
         suite as root: `cargo xtask test`",
        missing
            .iter()
            .map(|cap| format!("{} ({})", cap.name, cap.needed_for))
            .collect::<Vec<_>>()
            .join("; ")
    );
    for (tool, arg, package) in [
        ("ip", "-V", "iproute2"),
        ("nsenter", "--version", "util-linux"),
        ("curl", "--version", "curl"),
    ] {
        match Command::new(tool).arg(arg).output() {
            Ok(out) if out.status.success() => {}
            other => panic!(
                "`{tool}` ({package}) does not run ({other:?}); install it with `cargo xtask setup`"
            ),
        }
    }
    assert!(
        Path::new("/proc/self/ns/net").exists(),
        "/proc/self/ns/net is missing: the kernel has no network namespaces"
    );
}
