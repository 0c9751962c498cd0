//! The datapath's settings and the failure mode.

use std::{fmt, path::PathBuf, str::FromStr};

use nodeward_common::{
    config::{FAILURE_MODE_CLOSED, FAILURE_MODE_OPEN, LOG_OFF},
    KernelConfig,
};

use super::{netlink::MarkRule, DatapathError};

/// What steered traffic gets while the enforcer's listener is missing (the agent is down).
/// `nodeward run --failure-mode`, shown by `/debug/state` and `nodeward status` as
/// `closed`/`open`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// Dropped: a protected pod is never reached unjudged.
    #[default]
    Closed,
    /// Passed straight to the pod: availability over enforcement.
    Open,
}

impl FailureMode {
    /// `closed` or `open`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
        }
    }

    pub(super) const fn kernel(self) -> u32 {
        match self {
            Self::Closed => FAILURE_MODE_CLOSED,
            Self::Open => FAILURE_MODE_OPEN,
        }
    }
}

impl fmt::Display for FailureMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failure mode that is neither `closed` nor `open`.
#[derive(Debug, thiserror::Error)]
#[error("failure mode `{0}` is neither `closed` nor `open`")]
pub struct UnknownFailureMode(String);

impl FromStr for FailureMode {
    type Err = UnknownFailureMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "closed" => Ok(Self::Closed),
            "open" => Ok(Self::Open),
            other => Err(UnknownFailureMode(other.to_owned())),
        }
    }
}

/// Where new flows into protected pods are steered to the enforcer (`nodeward run --steering`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Steering {
    /// On the node: `steer` on every interface's ingress, `guard` on protected pods' host-side
    /// interfaces, a transparent listener in the node's namespace. Sees only traffic to a pod's
    /// own IPv4 address that no NAT rewrote.
    #[default]
    Host,
    /// Inside each protected pod's network namespace: `inpod` on the pod's interfaces, a
    /// listener of the enforcer's in the pod. Sees every path after every NAT, IPv4 and IPv6.
    #[value(name = "in-pod")]
    InPod,
}

impl Steering {
    /// `host` or `in-pod`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::InPod => "in-pod",
        }
    }
}

/// Default [`DatapathConfig::steer_mark`].
pub const DEFAULT_STEER_MARK: u32 = 0x10;
/// Default [`DatapathConfig::upstream_mark`].
pub const DEFAULT_UPSTREAM_MARK: u32 = 0x20;
/// Default [`DatapathConfig::inpod_mark`].
pub const DEFAULT_INPOD_MARK: u32 = 0x4e57_0000;

/// How the datapath runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// TCP port of the enforcer's transparent listener (`0.0.0.0:<port>` in the node's
    /// namespace). Default 15006, the agent's `--listen` default.
    pub listener_port: u16,
    /// What steered traffic gets while that listener is missing. Default closed.
    pub failure_mode: FailureMode,
    /// Mark bits `steer` sets on steered packets; the policy-routing rule matches them. Must not
    /// be used by anything else on the node (kube-proxy uses 0x4000/0x8000, Calico 0xffff0000,
    /// Cilium 0x0f00). Host steering only (`--steer-mark`). Default 0x10: outside kube-proxy's
    /// 0x4000/0x8000, portmap's 0x2000, Calico's 0xffff0000 and Cilium's 0x0f00 magic values
    /// (Cilium may use any bit for its identities: in-pod steering needs no packet mark).
    pub steer_mark: u32,
    /// Mark bits the enforcer sets (`SO_MARK`) on its upstream sockets; `guard` lets packets
    /// carrying all of them into protected pods. Must share no bit with `steer_mark`, and no
    /// other component may set them on forwarded packets (guard also requires the sending
    /// socket's own mark). Host steering only (`--upstream-mark`). Default 0x20, chosen as
    /// `steer_mark` is.
    pub upstream_mark: u32,
    /// Routing table holding `local 0.0.0.0/0 dev lo`. Default 2700.
    pub route_table: u32,
    /// Priority (`pref`) of the `fwmark` rule; it must come before any rule that routes pod
    /// addresses. It only matches packets `steer` marked. Default 50.
    pub rule_priority: u32,
    /// Where the BPF filesystem is (mounted there when `pin_dir` is not on one). Default
    /// `/sys/fs/bpf`.
    pub bpffs: PathBuf,
    /// Where programs' links and maps are pinned. Default `/sys/fs/bpf/nodeward`.
    pub pin_dir: PathBuf,
    /// Interfaces that carry traffic from other nodes. `steer` is attached to every interface
    /// but loopback anyway; naming the uplinks makes
    /// [`Datapath::start`](super::Datapath::start) fail when one is missing.
    pub uplinks: Vec<String>,
    /// The same-node fast path (`sock_ops` + `sk_msg`): `Some(cgroup v2 directory)` attaches it
    /// there, `None` (default) leaves nothing of it attached.
    pub fast_path: Option<PathBuf>,
    /// Where new flows are steered. Default [`Steering::Host`].
    pub steering: Steering,
    /// `SO_MARK` of the enforcer's listeners in pods (in-pod steering), by which `inpod` knows
    /// them. Only sockets inside pods carry it, and only routing rules inside a pod could see
    /// it. Default `0x4e57_0000`.
    pub inpod_mark: u32,
    /// Initial `CONFIG.log_level` ([`nodeward_common::config`]): 0 off (default), 1 drops, 2
    /// every decision on a protected endpoint.
    pub log_level: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            listener_port: 15006,
            failure_mode: FailureMode::Closed,
            steer_mark: DEFAULT_STEER_MARK,
            upstream_mark: DEFAULT_UPSTREAM_MARK,
            steering: Steering::Host,
            inpod_mark: DEFAULT_INPOD_MARK,
            route_table: 2700,
            rule_priority: 50,
            bpffs: PathBuf::from("/sys/fs/bpf"),
            pin_dir: PathBuf::from("/sys/fs/bpf/nodeward"),
            uplinks: Vec::new(),
            fast_path: None,
            log_level: LOG_OFF,
        }
    }
}

impl DatapathConfig {
    pub(super) fn validate(&self) -> Result<(), DatapathError> {
        let invalid = |field, problem| Err(DatapathError::Config { field, problem });
        if self.listener_port == 0 {
            return invalid("listener_port", "port 0 cannot be listened on");
        }
        if self.steer_mark == 0 {
            return invalid("steer_mark", "0 marks nothing");
        }
        if self.upstream_mark == 0 {
            return invalid(
                "upstream_mark",
                "0 would let every packet into protected pods",
            );
        }
        if self.steer_mark & self.upstream_mark != 0 {
            return invalid(
                "upstream_mark",
                "shares bits with steer_mark: the enforcer's upstream packets would be routed back to the node",
            );
        }
        if self.steering == Steering::InPod && self.inpod_mark == 0 {
            return invalid(
                "inpod_mark",
                "0 is every socket's mark: an application's listener could receive steered flows",
            );
        }
        if matches!(self.route_table, 0 | 253..=255) {
            return invalid(
                "route_table",
                "0, 253 (default), 254 (main) and 255 (local) are the kernel's tables",
            );
        }
        if self.rule_priority == 0 {
            return invalid(
                "rule_priority",
                "0 is the local table's rule, which must stay first",
            );
        }
        Ok(())
    }

    pub(super) fn kernel(&self, log_level: u32) -> KernelConfig {
        KernelConfig::new(
            self.listener_port,
            self.steer_mark,
            self.upstream_mark,
            self.failure_mode.kernel(),
            log_level,
        )
        .with_inpod_mark(match self.steering {
            Steering::InPod => self.inpod_mark,
            Steering::Host => 0,
        })
    }

    pub(super) fn rule(&self) -> MarkRule {
        MarkRule {
            mark: self.steer_mark,
            table: self.route_table,
            priority: self.rule_priority,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_is_valid() {
        DatapathConfig::default().validate().unwrap();
    }

    #[test]
    fn invalid_configs_name_the_setting() {
        let base = DatapathConfig::default();
        let cases = [
            (
                DatapathConfig {
                    listener_port: 0,
                    ..base.clone()
                },
                "listener_port",
            ),
            (
                DatapathConfig {
                    steer_mark: 0,
                    ..base.clone()
                },
                "steer_mark",
            ),
            (
                DatapathConfig {
                    upstream_mark: 0,
                    ..base.clone()
                },
                "upstream_mark",
            ),
            (
                DatapathConfig {
                    upstream_mark: base.steer_mark | 1,
                    ..base.clone()
                },
                "upstream_mark",
            ),
            (
                DatapathConfig {
                    route_table: 254,
                    ..base.clone()
                },
                "route_table",
            ),
            (
                DatapathConfig {
                    rule_priority: 0,
                    ..base.clone()
                },
                "rule_priority",
            ),
        ];
        for (config, expected) in cases {
            match config.validate() {
                Err(DatapathError::Config { field, .. }) => assert_eq!(field, expected),
                other => panic!("{expected}: {other:?}"),
            }
        }
    }

    #[test]
    fn failure_mode_parses_and_prints() {
        for mode in [FailureMode::Closed, FailureMode::Open] {
            assert_eq!(mode.to_string().parse::<FailureMode>().unwrap(), mode);
        }
        assert!("half-open".parse::<FailureMode>().is_err());
    }
}
