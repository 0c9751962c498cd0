//! Library side of `nodeward-ebpf`: the packet header layout the kernel programs parse.
//!
//! The kernel programs themselves live in the `nodeward-ebpf` binary (`main.rs`), which
//! `agent/build.rs` builds for `bpfel-unknown-none` and the agent embeds. This library target
//! exists so the agent can name this crate as a build-dependency (cargo then rebuilds the agent
//! when the kernel side changes), and it keeps the header arithmetic in plain functions that host
//! unit tests can check.
#![no_std]

pub mod net;
