//! In-pod steering's attachments (`--steering in-pod`): `inpod` on the TC ingress of every
//! interface inside each protected pod's network namespace, one pinned TCX link each at
//! `<pin_dir>/inpod/<netns inode>-<ifindex>`.
//!
//! The pin keeps the program attached while no agent runs, so the pod's new flows meet
//! `failure_mode` (closed: dropped) until the next agent's listener is back; that agent swaps its
//! own program into the same link (no instant without a program). A link is attached from the
//! pod's namespace ([`Netns::within`]): a TCX link is bound to the interface index as that
//! namespace resolves it. When the pod's namespace goes away, its interfaces and links go with
//! it; the pin left behind is removed at the next sync.

#[cfg(test)]
use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use aya::programs::links::FdLink;

use super::{
    bpffs::{Hook, PinLayout},
    links, list_interfaces,
    netlink::Netlink,
    Datapath, DatapathError,
};
use crate::netns::Netns;

/// One `inpod` attachment we hold.
pub struct PodLink {
    /// Our descriptor (the pin holds another reference).
    link: FdLink,
    pin: PathBuf,
    /// "<netns file>:<interface>", for logs and status.
    pub name: String,
}

/// What [`Datapath::sync_pods`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodSyncReport {
    /// "<netns file>:<interface>" newly attached (or adopted from a previous run).
    pub attached: Vec<String>,
    /// Attachments removed (the pod is no longer protected, or left).
    pub detached: Vec<String>,
    /// Pods whose interfaces could not all be hooked, with the error. Their new flows are not
    /// steered: the caller reports them (they are not protected on this node).
    pub failed: Vec<(String, String)>,
}

impl PinLayout {
    /// Where in-pod attachments are pinned.
    pub fn inpod(&self) -> PathBuf {
        self.root.join("inpod")
    }

    /// The pin of `inpod`'s attachment to `ifindex` in the namespace with inode `netns`.
    pub fn inpod_link(&self, netns: u64, ifindex: u32) -> PathBuf {
        self.inpod().join(format!("{netns}-{ifindex}"))
    }
}

/// (netns inode, ifindex) of a pin name made by [`PinLayout::inpod_link`].
fn parse_pin(name: &str) -> Option<(u64, u32)> {
    let (netns, ifindex) = name.split_once('-')?;
    Some((netns.parse().ok()?, ifindex.parse().ok()?))
}

impl Datapath {
    /// Makes `inpod` attached to every non-loopback interface of exactly the namespaces in
    /// `pods` (the protected pods of this node), adopting what a previous run pinned, and
    /// removes every other in-pod attachment and pin.
    pub fn sync_pods(&self, pods: &[Netns]) -> Result<PodSyncReport, DatapathError> {
        let mut report = PodSyncReport::default();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut wanted = BTreeSet::new();
        for netns in pods {
            let attached = netns.within(|| -> Result<Vec<(u32, String)>, DatapathError> {
                let mut netlink = Netlink::open().map_err(|source| {
                    DatapathError::netlink("opening an rtnetlink socket in a pod", source)
                })?;
                let mut done = Vec::new();
                for interface in list_interfaces(&mut netlink)? {
                    if interface.loopback {
                        continue;
                    }
                    let key = (netns.inode, interface.index);
                    let name = format!("{}:{}", netns.path.display(), interface.name);
                    if inner.pod_links.contains_key(&key) {
                        done.push((interface.index, String::new()));
                    } else {
                        let pin = self.layout.inpod_link(netns.inode, interface.index);
                        let link = attach(&mut inner.ebpf, &pin, &interface.name)?;
                        inner.pod_links.insert(
                            key,
                            PodLink {
                                link,
                                pin,
                                name: name.clone(),
                            },
                        );
                        done.push((interface.index, name));
                    }
                }
                Ok(done)
            });
            match attached {
                Ok(Ok(done)) => {
                    for (ifindex, name) in done {
                        wanted.insert((netns.inode, ifindex));
                        if !name.is_empty() {
                            tracing::info!(program = "inpod", attachment = %name, "attached inside the pod");
                            report.attached.push(name);
                        }
                    }
                }
                Ok(Err(e)) => report
                    .failed
                    .push((netns.path.display().to_string(), e.to_string())),
                Err(e) => report.failed.push((
                    netns.path.display().to_string(),
                    format!("entering the namespace: {e}"),
                )),
            }
        }
        // A pod that failed keeps whatever it had: its earlier links still steer.
        let failed_inodes: BTreeSet<u64> = pods
            .iter()
            .filter(|n| {
                report
                    .failed
                    .iter()
                    .any(|(p, _)| *p == n.path.display().to_string())
            })
            .map(|n| n.inode)
            .collect();
        let gone: Vec<(u64, u32)> = inner
            .pod_links
            .keys()
            .filter(|key| !wanted.contains(key) && !failed_inodes.contains(&key.0))
            .copied()
            .collect();
        for key in gone {
            if let Some(PodLink { link, pin, name }) = inner.pod_links.remove(&key) {
                links::unpin(&pin)?;
                drop(link);
                tracing::info!(program = "inpod", attachment = %name, "detached");
                report.detached.push(name);
            }
        }
        // Pins of a previous run's pods that are no longer protected here (or gone).
        for path in list_pins(&self.layout)? {
            let held = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_pin)
                .is_some_and(|key| inner.pod_links.contains_key(&key));
            if !held {
                links::unpin(&path)?;
            }
        }
        Ok(report)
    }

    /// "<netns file>:<interface>" of every in-pod attachment.
    pub fn pod_attachments(&self) -> Vec<String> {
        self.lock()
            .pod_links
            .values()
            .map(|l| l.name.clone())
            .collect()
    }
}

/// The in-pod attachment pins present.
pub(super) fn list_pins(layout: &PinLayout) -> Result<Vec<PathBuf>, DatapathError> {
    match fs::read_dir(layout.inpod()) {
        Ok(entries) => Ok(entries.flatten().map(|e| e.path()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(DatapathError::PinDir {
            operation: "listing",
            path: layout.inpod(),
            source,
        }),
    }
}

/// Attaches `inpod` to `iface` of the calling thread's namespace, or takes over the link a
/// previous run pinned at `pin`.
fn attach(
    ebpf: &mut aya::Ebpf,
    pin: &std::path::Path,
    iface: &str,
) -> Result<FdLink, DatapathError> {
    if pin.exists() {
        match links::adopt(ebpf, Hook::InPod, pin) {
            Ok(link) => return Ok(link),
            Err(e) => {
                tracing::warn!(pin = %pin.display(), error = %e, "the in-pod attachment left by a previous run cannot be taken over; attaching anew before removing it");
            }
        }
    }
    let link = links::attach_new(ebpf, Hook::InPod, iface)?;
    links::unpin(pin)?;
    let pinned = link.pin(pin).map_err(|source| DatapathError::PinLink {
        program: Hook::InPod.program(),
        path: pin.to_owned(),
        source: Box::new(source),
    })?;
    Ok(FdLink::from(pinned))
}

/// Keys of the attachments held, for tests of the bookkeeping.
#[cfg(test)]
fn keys(links: &BTreeMap<(u64, u32), PodLink>) -> Vec<(u64, u32)> {
    links.keys().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let layout = PinLayout {
            root: PathBuf::from("/sys/fs/bpf/nodeward"),
        };
        let pin = layout.inpod_link(4_026_532_000, 7);
        let name = pin.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_pin(name), Some((4_026_532_000, 7)));
        assert_eq!(parse_pin("steer-7"), None);
        assert_eq!(parse_pin("12"), None);
        assert!(keys(&BTreeMap::new()).is_empty());
    }
}
