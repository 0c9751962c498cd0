//! The value of the `CONFIG` map: what the kernel programs need to know about the agent.
//!
//! One element (index 0), written by the agent when it starts and when the operator changes the
//! log level; read by `steer` and `guard` on every packet to a protected endpoint.

use core::mem;

/// `failure_mode`: when the enforcer's listener is missing (the agent is down), traffic that would
/// be steered is dropped. The default: a protected pod is never reached without enforcement.
pub const FAILURE_MODE_CLOSED: u32 = 0;
/// `failure_mode`: when the enforcer's listener is missing, traffic goes straight to the pod, as if
/// it were not protected. Availability over enforcement, chosen by the operator.
pub const FAILURE_MODE_OPEN: u32 = 1;

/// `log_level`: the programs emit no aya-log lines (the default; costs one load and compare).
pub const LOG_OFF: u32 = 0;
/// `log_level`: one line per dropped packet (failure-closed drops, bypass attempts, malformed
/// packets to protected endpoints).
pub const LOG_DROPS: u32 = 1;
/// `log_level`: one line per decision on a packet to a protected endpoint (steered, passed,
/// dropped). Verbose: for debugging a single flow.
pub const LOG_DECISIONS: u32 = 2;

/// Settings of the kernel programs, the single element of the `CONFIG` array map.
///
/// Layout (24 bytes, align 4): `listener_port` at 0, `_pad` at 2, `steer_mark` at 4,
/// `upstream_mark` at 8, `failure_mode` at 12, `log_level` at 16, `inpod_mark` at 20.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// TCP port of the enforcer's transparent listener, in **host** byte order (the programs
    /// convert it when they build a socket-lookup tuple). The listener is bound to `0.0.0.0` in
    /// the node's network namespace.
    pub listener_port: u16,
    /// Explicit padding; always zero.
    _pad: u16,
    /// Bits `steer` ORs into `skb->mark` of packets it steers; the agent's policy-routing rule
    /// (`fwmark steer_mark/steer_mark lookup <table>`) delivers them locally.
    pub steer_mark: u32,
    /// Bits the enforcer sets with `SO_MARK` on its upstream sockets; `guard` lets a packet to a
    /// protected pod through only when all of them are set in `skb->mark`.
    pub upstream_mark: u32,
    /// [`FAILURE_MODE_CLOSED`] or [`FAILURE_MODE_OPEN`]; any other value is treated as closed.
    pub failure_mode: u32,
    /// [`LOG_OFF`], [`LOG_DROPS`] or [`LOG_DECISIONS`]; higher values log as much as
    /// `LOG_DECISIONS`.
    pub log_level: u32,
    /// `SO_MARK` of the enforcer's listeners inside pods' network namespaces (in-pod steering):
    /// `inpod` assigns a new flow only to a listener carrying exactly this mark, so an
    /// application that binds the listener port first never receives steered flows, and it tells
    /// the enforcer's accepted sockets (which inherit the mark) from the application's. 0: no
    /// in-pod steering.
    pub inpod_mark: u32,
}

const _: () = assert!(mem::size_of::<KernelConfig>() == 24);
const _: () = assert!(mem::align_of::<KernelConfig>() == 4);

impl KernelConfig {
    /// Builds a configuration with zeroed padding.
    #[must_use]
    pub const fn new(
        listener_port: u16,
        steer_mark: u32,
        upstream_mark: u32,
        failure_mode: u32,
        log_level: u32,
    ) -> Self {
        Self {
            listener_port,
            _pad: 0,
            steer_mark,
            upstream_mark,
            failure_mode,
            log_level,
            inpod_mark: 0,
        }
    }

    /// The same configuration with in-pod steering's listener mark.
    #[must_use]
    pub const fn with_inpod_mark(mut self, inpod_mark: u32) -> Self {
        self.inpod_mark = inpod_mark;
        self
    }

    /// Whether a missing listener lets traffic through ([`FAILURE_MODE_OPEN`]). Every other value
    /// fails closed.
    #[must_use]
    pub const fn fails_open(&self) -> bool {
        self.failure_mode == FAILURE_MODE_OPEN
    }
}

// SAFETY: `KernelConfig` is `#[repr(C)]`, `Copy`, has no implicit padding (asserted above: 2 + 2 +
// 5 * 4 bytes, align 4) and every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_open_fails_open() {
        assert!(KernelConfig::new(15001, 1, 2, FAILURE_MODE_OPEN, LOG_OFF).fails_open());
        assert!(!KernelConfig::new(15001, 1, 2, FAILURE_MODE_CLOSED, LOG_OFF).fails_open());
        assert!(
            !KernelConfig::new(15001, 1, 2, 7, LOG_OFF).fails_open(),
            "unknown: closed"
        );
    }

    #[test]
    fn field_offsets_are_the_documented_ones() {
        let config =
            KernelConfig::new(0x0102, 0x0304_0506, 0x0708_090a, 1, 2).with_inpod_mark(0x0b0c_0d0e);
        // SAFETY: `KernelConfig` has no implicit padding, so all 24 bytes are initialized.
        let bytes: [u8; 24] = unsafe { mem::transmute(config) };
        assert_eq!(&bytes[0..2], &0x0102_u16.to_ne_bytes());
        assert_eq!(&bytes[2..4], &[0, 0]);
        assert_eq!(&bytes[4..8], &0x0304_0506_u32.to_ne_bytes());
        assert_eq!(&bytes[8..12], &0x0708_090a_u32.to_ne_bytes());
        assert_eq!(&bytes[12..16], &1_u32.to_ne_bytes());
        assert_eq!(&bytes[16..20], &2_u32.to_ne_bytes());
        assert_eq!(&bytes[20..24], &0x0b0c_0d0e_u32.to_ne_bytes());
    }
}
