//! Small helpers around processes, privileges and paths shared by the tasks.

use std::{
    env, fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Runs `cmd` with inherited stdio (its output is the user's progress report); fails with the
/// command line when it exits unsuccessfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd`, echoing its stdout as it comes and keeping a copy; `Err` carries the copy too.
pub fn run_tee(cmd: &mut Command) -> std::result::Result<String, (String, anyhow::Error)> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut child = match cmd.stdin(Stdio::null()).stdout(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => {
            return Err((
                String::new(),
                anyhow::anyhow!("could not start {}: {e}", describe(cmd)),
            ))
        }
    };
    let mut copy = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
        {
            println!("{line}");
            let _ = std::io::stdout().flush();
            copy.push_str(&line);
            copy.push('\n');
        }
    }
    match child.wait() {
        Ok(status) if status.success() => Ok(copy),
        Ok(status) => Err((copy, anyhow::anyhow!("{} failed ({status})", describe(cmd)))),
        Err(e) => Err((copy, anyhow::anyhow!("waiting for {}: {e}", describe(cmd)))),
    }
}

/// Runs `cmd` and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{} printed non-UTF-8", describe(cmd)))
}

/// `program arg1 arg2`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    format!("`{line}`")
}

/// Cargo's home (`$CARGO_HOME`, else `~/.cargo`): `cargo install` puts binaries in its `bin/`.
pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// `PATH` with cargo's `bin/` in front, for children that must find `bpf-linker`.
pub fn path_with_cargo_bin() -> Result<std::ffi::OsString> {
    let bin = cargo_home()?.join("bin");
    let rest = env::var_os("PATH").unwrap_or_default();
    env::join_paths(std::iter::once(bin).chain(env::split_paths(&rest)))
        .context("PATH cannot hold cargo's bin directory")
}

/// Whether the effective user is root.
pub fn is_root() -> Result<bool> {
    Ok(status_field("Uid")?.split_whitespace().nth(1) == Some("0"))
}

/// Linux capabilities the privileged tests use, by number (linux/capability.h).
const NEEDED_CAPS: [(&str, u32); 3] = [
    ("CAP_NET_ADMIN", 12),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_BPF", 39),
];

/// What the privileged tests need and this process lacks: "root" and capability names.
pub fn missing_test_privileges() -> Result<Vec<&'static str>> {
    let mut missing = Vec::new();
    if !is_root()? {
        missing.push("root (effective uid 0)");
    }
    let cap_eff = status_field("CapEff")?;
    let cap_eff = u64::from_str_radix(cap_eff.trim(), 16)
        .with_context(|| format!("CapEff in /proc/self/status is not hex: {cap_eff}"))?;
    for (name, bit) in NEEDED_CAPS {
        if cap_eff & (1 << bit) == 0 {
            missing.push(name);
        }
    }
    Ok(missing)
}

/// The value of `field:` in `/proc/self/status`.
fn status_field(field: &str) -> Result<String> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(|value| value.trim().to_owned())
        .with_context(|| format!("/proc/self/status has no {field} line"))
}

/// Where the agent mounts a BPF filesystem when the machine has none.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Whether a BPF filesystem is mounted at `path` (from /proc/self/mountinfo).
#[must_use]
pub fn bpffs_mounted(path: &str) -> bool {
    fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines().any(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.get(4) == Some(&path) && l.contains(" - bpf ")
        })
    })
}

/// Undoes a BPF filesystem mount that our runs caused (the agent mounts one when the machine
/// has none): unmounted only when nothing but the kernel's own iterators (`maps.debug`,
/// `progs.debug`) is left in it, so nobody's pins are lost.
pub fn unmount_bpffs_we_caused(was_mounted: bool) {
    if was_mounted || !bpffs_mounted(BPFFS) {
        return;
    }
    let Ok(entries) = fs::read_dir(BPFFS) else {
        return;
    };
    let names: Vec<String> = entries
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    if names
        .iter()
        .all(|n| n == "maps.debug" || n == "progs.debug")
    {
        let ok = Command::new("umount")
            .arg(BPFFS)
            .status()
            .is_ok_and(|s| s.success());
        println!(
            "==> {BPFFS}: the BPF filesystem our runs mounted is {}",
            if ok {
                "unmounted again"
            } else {
                "still mounted (umount failed)"
            }
        );
    } else {
        println!(
            "==> {BPFFS}: left mounted, it holds pins: {}",
            names.join(", ")
        );
    }
}
