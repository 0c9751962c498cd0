//! `cargo xtask setup`: installs the build and test prerequisites, one line per step.
//!
//! Steps (each prints `ok` when already satisfied, `installed` when it had to act):
//! 1. Debian packages the tests need (`apt-get update` only when one is missing);
//! 2. clippy and rustfmt for the toolchain that builds the workspace;
//! 3. the nightly toolchain (checked only: it cannot be downloaded on these machines);
//! 4. `rust-src` for nightly (`-Z build-std=core` for the BPF target);
//! 5. bpf-linker 0.13.0, linked against the nightly's own libLLVM (a plain `cargo install`
//!    builds against the system's LLVM, which is too old). A stamp file next to the binary records the nightly it was
//!    built for; a different nightly, or a binary that no longer runs, triggers a reinstall.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::system::{self, output, run as run_cmd};

/// Debian packages, with what needs them.
const DEBIAN_PACKAGES: [(&str, &str); 6] = [
    (
        "iproute2",
        "`ip`: the datapath tests build network namespaces and veths",
    ),
    (
        "build-essential",
        "`cc`: links host binaries, build scripts and bpf-linker",
    ),
    (
        "curl",
        "the HTTP client of the end-to-end tests' client pods",
    ),
    (
        "util-linux",
        "`nsenter`: runs the agent and pods inside test namespaces",
    ),
    (
        "iptables",
        "the test kit installs portmap's and kube-proxy's (iptables mode) rules on test nodes",
    ),
    (
        "nftables",
        "`nft`: the test kit installs kube-proxy's nftables-mode rules on test nodes",
    ),
];

/// The bpf-linker release that works with aya 0.14 on these machines.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Stamp next to the bpf-linker binary: which nightly it was linked against.
const BPF_LINKER_STAMP: &str = ".bpf-linker-nightly-stamp";

pub fn run() -> Result<()> {
    debian_packages("debian packages", &DEBIAN_PACKAGES)?;
    toolchain_components()?;
    nightly_toolchain()?;
    nightly_rust_src()?;
    bpf_linker()?;
    Ok(())
}

fn report(step: &str, installed: bool) {
    println!(
        "setup: {step}: {}",
        if installed { "installed" } else { "ok" }
    );
}

/// Installs the missing ones of `packages` (name, what needs it); `apt-get update` only when
/// one is missing.
pub fn debian_packages(what: &str, packages: &[(&str, &str)]) -> Result<()> {
    let names: Vec<&str> = packages.iter().map(|(name, _)| *name).collect();
    let step = format!("{what} ({})", names.join(", "));
    let mut missing = Vec::new();
    for &(package, _) in packages {
        if !deb_installed(package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        report(&step, false);
        return Ok(());
    }
    if !system::is_root()? {
        let why: Vec<String> = packages
            .iter()
            .filter(|(name, _)| missing.contains(name))
            .map(|(name, why)| format!("{name} ({why})"))
            .collect();
        bail!(
            "missing Debian packages: {}; installing them needs root: run `cargo xtask setup` as \
             root, or `apt-get install {}`",
            why.join(", "),
            missing.join(" ")
        );
    }
    run_cmd(apt_get().arg("update"))?;
    run_cmd(
        apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    report(&step, true);
    Ok(())
}

fn deb_installed(package: &str) -> Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .context(
            "could not run dpkg-query: `cargo xtask setup` installs packages on Debian 12 only; \
             on another system install iproute2 and a C toolchain yourself",
        )?;
    // dpkg-query fails for a package it has never heard of: not installed.
    Ok(out.status.success() && out.stdout == b"installed")
}

fn apt_get() -> Command {
    let mut cmd = Command::new("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    cmd
}

/// clippy and rustfmt for the toolchain cargo uses in this workspace (stable).
fn toolchain_components() -> Result<()> {
    let step = "rust components (clippy, rustfmt)";
    let installed = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|component| !has_component(&installed, component))
        .collect();
    if missing.is_empty() {
        report(step, false);
        return Ok(());
    }
    run_cmd(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )?;
    report(step, true);
    Ok(())
}

fn nightly_toolchain() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|line| line.starts_with("nightly")) {
        bail!(
            "the nightly toolchain is not installed; it builds the eBPF object \
             (`-Z build-std`). Install it with `rustup toolchain install nightly` (this needs \
             the Rust distribution server, which these machines cannot reach: use a machine \
             image that ships nightly)"
        );
    }
    report("nightly toolchain", false);
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let step = "nightly rust-src";
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if has_component(&installed, "rust-src") {
        report(step, false);
        return Ok(());
    }
    run_cmd(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    report(step, true);
    Ok(())
}

/// `rustup component list --installed` prints `clippy-x86_64-unknown-linux-gnu`, `rust-src`.
fn has_component(list: &str, component: &str) -> bool {
    list.lines().any(|line| {
        line == component
            || line
                .strip_prefix(component)
                .is_some_and(|rest| rest.starts_with('-'))
    })
}

/// What `rustc +nightly --version --verbose` says that matters to bpf-linker.
struct Nightly {
    commit_hash: String,
    llvm_major: String,
}

fn nightly() -> Result<Nightly> {
    let verbose = output(Command::new("rustc").args(["+nightly", "--version", "--verbose"]))?;
    let field = |name: &str| {
        verbose
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(": "))
            .map(str::to_owned)
            .with_context(|| format!("`rustc +nightly --version --verbose` has no {name}"))
    };
    let llvm = field("LLVM version")?;
    Ok(Nightly {
        commit_hash: field("commit-hash")?,
        llvm_major: llvm.split('.').next().unwrap_or(&llvm).to_owned(),
    })
}

fn bpf_linker() -> Result<()> {
    let nightly = nightly()?;
    let root = system::cargo_home()?;
    let binary = root.join("bin").join("bpf-linker");
    let stamp_path = root.join("bin").join(BPF_LINKER_STAMP);
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION} nightly {} llvm {}\n",
        nightly.commit_hash, nightly.llvm_major
    );
    let step = format!(
        "bpf-linker {BPF_LINKER_VERSION} (LLVM {})",
        nightly.llvm_major
    );

    let stamp_matches = fs::read_to_string(&stamp_path).is_ok_and(|found| found == stamp);
    if stamp_matches && bpf_linker_runs(&binary).is_ok() {
        report(&step, false);
        return Ok(());
    }

    install_bpf_linker(&root, &nightly)?;
    bpf_linker_runs(&binary).context("bpf-linker was installed but does not run")?;
    fs::write(&stamp_path, stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    report(&step, true);
    Ok(())
}

/// `bpf-linker --version` runs (its libLLVM is still there) and is the pinned release.
fn bpf_linker_runs(binary: &Path) -> Result<()> {
    let version = output(Command::new(binary).arg("--version"))?;
    if !version.contains(BPF_LINKER_VERSION) {
        bail!(
            "{} reports `{}`, expected {BPF_LINKER_VERSION}",
            binary.display(),
            version.trim()
        );
    }
    Ok(())
}

/// Links bpf-linker against the nightly's
/// `libLLVM-<major>-rust-*.so` (rpath to the nightly's lib dir), without linking LLVM statically.
fn install_bpf_linker(root: &Path, nightly: &Nightly) -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm_lib = nightly_libllvm(&lib_dir)?;
    let rustflags = format!(
        "-L native={dir} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{dir}",
        dir = lib_dir.display()
    );
    let mut cmd = Command::new("cargo");
    cmd.args(["install", &format!("bpf-linker@{BPF_LINKER_VERSION}")])
        .args(["--locked", "--force", "--no-default-features"])
        .args([
            "--features",
            &format!("llvm-{},no-llvm-linking", nightly.llvm_major),
        ])
        .arg("--root")
        .arg(root)
        .env("RUSTFLAGS", rustflags)
        // Flags or a target dir meant for the workspace must not leak into this build.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    println!(
        "setup: building {} (about a minute)",
        system::describe(&cmd)
    );
    run_cmd(&mut cmd)
}

/// The linker name of the nightly's LLVM library: `LLVM-22-rust-1.97.0-nightly` for
/// `libLLVM-22-rust-1.97.0-nightly.so`.
fn nightly_libllvm(lib_dir: &Path) -> Result<String> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("listing {}", lib_dir.display()))?;
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stem) = name
            .strip_prefix("lib")
            .and_then(|rest| rest.strip_suffix(".so"))
        {
            if stem.starts_with("LLVM-") && stem.contains("-rust-") {
                return Ok(stem.to_owned());
            }
        }
    }
    bail!(
        "no libLLVM-*-rust-*.so in {}: the nightly toolchain ships no shared LLVM to link \
         bpf-linker against",
        lib_dir.display()
    )
}

#[cfg(test)]
mod tests {
    use super::has_component;

    #[test]
    fn component_names_match_whole_names() {
        let list = "cargo-x86_64-unknown-linux-gnu\nclippy-x86_64-unknown-linux-gnu\nrust-src\n";
        assert!(has_component(list, "clippy"));
        assert!(has_component(list, "rust-src"));
        assert!(!has_component(list, "rustfmt"));
        assert!(!has_component(list, "clip"), "a prefix is not a component");
    }
}
