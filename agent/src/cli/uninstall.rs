//! `nodeward uninstall`: removes what the data path leaves on a node once no agent runs.
//!
//! A stopped agent leaves its kernel programs attached on purpose (in-pod steering: the pods'
//! new connections get `--failure-mode` until the next agent takes over; a killed agent in either
//! mode), pinned under `--bpf-pin-dir`. This removes every pin (each link detaches with it, each
//! map is freed with its last user), the `fwmark` rule and the local route of host steering. Run
//! it with no agent running on the node, in the node's network namespace: for the DaemonSet,
//! delete it first (`kubectl delete -k deploy/`), then run the command on each node (the image
//! has it: `kubectl debug node/<node> --image=<nodeward image> -- nodeward uninstall`, or from
//! the host); standalone, after stopping `nodeward run`.
//!
//! Exit status: 0 removed (or nothing was there), 1 something could not be removed (named).

use std::path::PathBuf;

use clap::Args;

use crate::datapath::{Datapath, DatapathConfig};

/// `nodeward uninstall`'s flags.
#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The agent's `--bpf-pin-dir`.
    #[arg(
        long,
        env = "NODEWARD_BPF_PIN_DIR",
        default_value = "/sys/fs/bpf/nodeward",
        value_name = "DIR"
    )]
    pub bpf_pin_dir: PathBuf,
}

/// Runs the command; the exit status.
#[must_use]
pub fn run(args: &UninstallArgs) -> u8 {
    let config = DatapathConfig {
        pin_dir: args.bpf_pin_dir.clone(),
        ..DatapathConfig::default()
    };
    match Datapath::cleanup_leftovers(&config) {
        Ok(report) => {
            println!(
                "removed from {}: {} attachment(s), {} map(s){}{}",
                args.bpf_pin_dir.display(),
                report.links,
                report.maps,
                if report.rule { ", the fwmark rule" } else { "" },
                if report.route {
                    ", the local route"
                } else {
                    ""
                },
            );
            0
        }
        Err(e) => {
            eprintln!("nodeward uninstall: {e}");
            1
        }
    }
}
