//! Types shared by nodeward's kernel programs (`nodeward-ebpf`) and its agent (`nodeward`).
//!
//! Everything here crosses the user/kernel boundary through a BPF map, so layout is part of the
//! contract: structs are `#[repr(C)]`, `Copy`, have explicit padding fields and a compile-time size
//! assertion; codes are plain `u32` constants whose numbers never change meaning (a retired number
//! stays reserved, as in cilium's `drop_reasons.h`).
//!
//! The crate is `no_std` so the eBPF crate can use it. The `user` feature, for the agent, adds
//! `aya::Pod` implementations so the types can be read from and written to maps.
//!
//! - [`endpoint`]: the key of the `PROTECTED_ENDPOINTS` map (which destinations nodeward enforces).
//! - [`config`]: the value of the `CONFIG` map (listener port, marks, failure mode, log level).
//! - [`reason`]: why a kernel program decided what it decided, and the verdict of each reason.
//! - [`counter`]: slots of the `COUNTERS` per-CPU array.
//! - [`fastpath`]: the key of the `FAST_PATH_SOCKETS` sock hash (same-node fast path).
//! - [`maps`]: the name and capacity of every map, one table for both sides.
//! - [`podaddr`]: the key of the `POD_ADDRESSES` map (in-pod steering's anti-spoofing).
#![no_std]

pub mod config;
pub mod counter;
pub mod endpoint;
pub mod fastpath;
pub mod maps;
pub mod podaddr;
pub mod reason;

pub use config::KernelConfig;
pub use endpoint::{EndpointKey, ENDPOINT_FLAGS_NONE, PORT_ANY};
