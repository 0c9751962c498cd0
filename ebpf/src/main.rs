//! nodeward's kernel programs, one module per attach point, shared helpers by concern.
//!
//! Attach points:
//! - [`steer`]: TC ingress on every interface of the node: steers TCP flows into protected pods
//!   to the enforcer's transparent listener (`bpf_sk_assign`).
//! - [`guard`]: TC egress on each protected pod's host-side interface: drops what reaches the pod
//!   without having been steered (no bypass).
//! - [`inpod`]: TC ingress on a protected pod's interfaces inside its network namespace
//!   (`--steering in-pod`): steers every new TCP flow into the pod, after every NAT, to the
//!   enforcer's listener in the pod.
//! - [`fastpath`]: `sock_ops` on the agent's cgroup and `sk_msg` on the `FAST_PATH_SOCKETS` sock
//!   hash: bytes between the enforcer and local pods skip the TCP/IP stack (`--fast-path on`).
//!
//! Helpers:
//! - [`maps`]: the maps shared with the agent (`agent/src/datapath`), each documented.
//! - [`packet`]: header reads and the protected-endpoint lookup.
//! - [`sock`]: socket lookup and assignment.
//! - [`verdict`]: reason code -> counter, log line, TC action.
//!
//! Built by `agent/build.rs` (aya-build, nightly, `-Z build-std=core`) for `bpfel-unknown-none`;
//! the agent embeds the object. On the host (`cargo check/clippy/build --workspace`) this crate
//! builds as an empty program so workspace-wide commands work; the kernel code is still compiled
//! and linted there, only never run.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod fastpath;
mod guard;
mod inpod;
mod maps;
mod packet;
mod sock;
mod steer;
mod verdict;

/// Kernel programs cannot unwind. The programs have no panicking paths (no indexing, no unwrap);
/// should one slip in, this loop makes the verifier reject the program at load time (it refuses
/// infinite loops), so the mistake is loud instead of silent.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// License of the programs; GPL-compatible so the kernel allows GPL-only helpers.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host builds only: the programs run in the kernel, never as a host process.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
