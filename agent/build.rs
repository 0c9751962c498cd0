//! Builds nodeward's kernel programs (`../ebpf`, crate `nodeward-ebpf`) so that a plain
//! `cargo build` on stable produces an agent with its eBPF object embedded.
//!
//! aya-build runs `rustup run nightly cargo build -Z build-std=core --target bpfel-unknown-none`
//! on the eBPF crate and copies each binary target to `$OUT_DIR/<bin name>`; the agent embeds
//! `$OUT_DIR/nodeward-ebpf` (`src/datapath/mod.rs`). The nightly toolchain with `rust-src` and
//! `bpf-linker` are installed by `cargo xtask setup`.

use std::{env, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya_build::{Package, Toolchain};

/// Name of the eBPF package, as in `ebpf/Cargo.toml`.
const EBPF_PACKAGE: &str = "nodeward-ebpf";

fn main() -> anyhow::Result<()> {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let ebpf_dir = manifest_dir
        .parent()
        .context("agent crate has no parent directory")?
        .join("ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .with_context(|| format!("path {} is not UTF-8", ebpf_dir.display()))?;

    // rustc links BPF objects with `bpf-linker`; say what to do before cargo says "linker not
    // found" in the middle of the nested build. Rebuild when it is reinstalled (new nightly).
    let linker = find_on_path("bpf-linker").ok_or_else(|| {
        anyhow!(
            "bpf-linker is not on PATH: the eBPF object cannot be linked. \
             Run `cargo xtask setup` (installs bpf-linker 0.13.0 against the nightly's LLVM) \
             and make sure ~/.cargo/bin is on PATH"
        )
    })?;
    println!("cargo:rerun-if-changed={}", linker.display());

    // aya-build relays every stderr line of the nested cargo as a `cargo:warning`; keep its
    // progress lines ("Compiling ...") out of every build's output. Errors still come through.
    env::set_var("CARGO_TERM_QUIET", "true");

    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            ..Package::default()
        }],
        Toolchain::Custom("nightly"),
    )
    .with_context(|| {
        format!(
            "building the eBPF object ({EBPF_PACKAGE}) failed; the compiler output is in the \
             warnings above. If it is about rust-src or bpf-linker, run `cargo xtask setup`"
        )
    })
}

/// The first executable named `name` in `PATH`.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}
