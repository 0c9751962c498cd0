//! In-pod steering's attachments (`--steering in-pod`): `inpod` on the TC ingress of every
//! interface inside each protected pod's network namespace, and `inpod_egress` (anti-spoofing)
//! on the TC egress of every interface of every pod found, one pinned TCX link each at
//! `<pin_dir>/inpod/<netns inode>-<ifindex>` and `<pin_dir>/inpod/egress-<netns inode>-<ifindex>`.
//!
//! The pin keeps the program attached while no agent runs, so the pod's new flows meet
//! `failure_mode` (closed: dropped) until the next agent's listener is back; that agent swaps its
//! own program into the same link (no instant without a program). A link is attached from the
//! pod's namespace ([`Netns::within`]): a TCX link is bound to the interface index as that
//! namespace resolves it. When the pod's namespace goes away, its interfaces and links go with
//! it; the pin left behind is removed at the next sync.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use aya::programs::links::FdLink;

use super::{
    bpffs::{Hook, PinLayout},
    links, list_interfaces,
    netlink::Netlink,
    object, Datapath, DatapathError,
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

    /// The pin of `hook`'s attachment to `ifindex` in the namespace with inode `netns`:
    /// `<netns>-<ifindex>` (`inpod`) or `egress-<netns>-<ifindex>` (`inpod_egress`).
    pub fn inpod_link(&self, hook: Hook, netns: u64, ifindex: u32) -> PathBuf {
        let name = match hook {
            Hook::InPodEgress => format!("egress-{netns}-{ifindex}"),
            _ => format!("{netns}-{ifindex}"),
        };
        self.inpod().join(name)
    }
}

/// (hook, netns inode, ifindex) of a pin name made by [`PinLayout::inpod_link`].
fn parse_pin(name: &str) -> Option<(Hook, u64, u32)> {
    let (hook, rest) = match name.strip_prefix("egress-") {
        Some(rest) => (Hook::InPodEgress, rest),
        None => (Hook::InPod, name),
    };
    let (netns, ifindex) = rest.split_once('-')?;
    Some((hook, netns.parse().ok()?, ifindex.parse().ok()?))
}

/// A pod of this node as [`Datapath::sync_pods`] takes it.
#[derive(Debug, Clone)]
pub struct PodTarget {
    pub netns: Netns,
    /// The addresses on its interfaces: the only sources it may send from.
    pub addresses: Vec<std::net::IpAddr>,
    /// Whether new flows into it are steered (`inpod`); every pod gets `inpod_egress`.
    pub protected: bool,
}

/// Key of an in-pod attachment: hook, netns inode, ifindex.
pub type PodLinkKey = (Hook, u64, u32);

impl Datapath {
    /// Makes the pods' attachments match `pods`: `inpod_egress` on every non-loopback interface
    /// of every pod with the pod's addresses in `POD_ADDRESSES`, and `inpod` on those of the
    /// protected ones; adopts what a previous run pinned, removes every other in-pod
    /// attachment and pin. The addresses are written before the egress program is attached.
    pub fn sync_pods(&self, pods: &[PodTarget]) -> Result<PodSyncReport, DatapathError> {
        let mut report = PodSyncReport::default();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut addresses = BTreeSet::new();
        let mut cookies = Vec::with_capacity(pods.len());
        for pod in pods {
            match pod.netns.cookie() {
                Ok(cookie) => {
                    addresses.extend(pod.addresses.iter().map(|a| (cookie, *a)));
                    cookies.push(Some(cookie));
                }
                Err(e) => {
                    report.failed.push((
                        pod.netns.path.display().to_string(),
                        format!("reading the namespace's cookie: {e}"),
                    ));
                    cookies.push(None);
                }
            }
        }
        object::sync_pod_addresses(&mut inner.ebpf, &addresses)?;

        let mut wanted = BTreeSet::new();
        let mut failed_inodes = BTreeSet::new();
        for (pod, cookie) in pods.iter().zip(&cookies) {
            if cookie.is_none() {
                failed_inodes.insert(pod.netns.inode);
                continue;
            }
            let mut hooks = vec![Hook::InPodEgress];
            if pod.protected {
                hooks.push(Hook::InPod);
            }
            let attached = pod
                .netns
                .within(|| attach_pod(&self.layout, inner, pod, &hooks));
            match attached {
                Ok(Ok(done)) => {
                    for (key, name) in done {
                        wanted.insert(key);
                        if !name.is_empty() {
                            tracing::info!(attachment = %name, "attached inside the pod");
                            report.attached.push(name);
                        }
                    }
                }
                Ok(Err(e)) => {
                    failed_inodes.insert(pod.netns.inode);
                    report
                        .failed
                        .push((pod.netns.path.display().to_string(), e.to_string()));
                }
                Err(e) => {
                    failed_inodes.insert(pod.netns.inode);
                    report.failed.push((
                        pod.netns.path.display().to_string(),
                        format!("entering the namespace: {e}"),
                    ));
                }
            }
        }
        // A pod that failed keeps whatever it had: its earlier links still apply.
        let gone: Vec<PodLinkKey> = inner
            .pod_links
            .keys()
            .filter(|key| !wanted.contains(*key) && !failed_inodes.contains(&key.1))
            .copied()
            .collect();
        for key in gone {
            if let Some(PodLink { link, pin, name }) = inner.pod_links.remove(&key) {
                links::unpin(&pin)?;
                drop(link);
                tracing::info!(attachment = %name, "detached");
                report.detached.push(name);
            }
        }
        // Pins of a previous run's pods that are no longer here, or no longer protected.
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

    /// "<netns file>:<interface>:<program>" of every in-pod attachment.
    pub fn pod_attachments(&self) -> Vec<String> {
        self.lock()
            .pod_links
            .values()
            .map(|l| l.name.clone())
            .collect()
    }
}

/// Attaches `hooks` to every non-loopback interface of `pod`, from inside its namespace (the
/// calling thread is there); the keys it holds, each with its name when newly attached.
fn attach_pod(
    layout: &PinLayout,
    inner: &mut super::Inner,
    pod: &PodTarget,
    hooks: &[Hook],
) -> Result<Vec<(PodLinkKey, String)>, DatapathError> {
    let mut netlink = Netlink::open()
        .map_err(|source| DatapathError::netlink("opening an rtnetlink socket in a pod", source))?;
    let mut done = Vec::new();
    for interface in list_interfaces(&mut netlink)? {
        if interface.loopback {
            continue;
        }
        for &hook in hooks {
            let key = (hook, pod.netns.inode, interface.index);
            if inner.pod_links.contains_key(&key) {
                done.push((key, String::new()));
                continue;
            }
            let name = format!(
                "{}:{}:{}",
                pod.netns.path.display(),
                interface.name,
                hook.program()
            );
            let pin = layout.inpod_link(hook, pod.netns.inode, interface.index);
            let link = attach(&mut inner.ebpf, hook, &pin, &interface.name)?;
            inner.pod_links.insert(
                key,
                PodLink {
                    link,
                    pin,
                    name: name.clone(),
                },
            );
            done.push((key, name));
        }
    }
    Ok(done)
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

/// Attaches `hook`'s program to `iface` of the calling thread's namespace, or takes over the
/// link a previous run pinned at `pin`.
fn attach(
    ebpf: &mut aya::Ebpf,
    hook: Hook,
    pin: &std::path::Path,
    iface: &str,
) -> Result<FdLink, DatapathError> {
    if pin.exists() {
        match links::adopt(ebpf, hook, pin) {
            Ok(link) => return Ok(link),
            Err(e) => {
                tracing::warn!(pin = %pin.display(), error = %e, "the in-pod attachment left by a previous run cannot be taken over; attaching anew before removing it");
            }
        }
    }
    let link = links::attach_new(ebpf, hook, iface)?;
    links::unpin(pin)?;
    let pinned = link.pin(pin).map_err(|source| DatapathError::PinLink {
        program: hook.program(),
        path: pin.to_owned(),
        source: Box::new(source),
    })?;
    Ok(FdLink::from(pinned))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip() {
        let layout = PinLayout {
            root: PathBuf::from("/sys/fs/bpf/nodeward"),
        };
        for hook in [Hook::InPod, Hook::InPodEgress] {
            let pin = layout.inpod_link(hook, 4_026_532_000, 7);
            let name = pin.file_name().unwrap().to_str().unwrap();
            assert_eq!(parse_pin(name), Some((hook, 4_026_532_000, 7)));
        }
        assert_eq!(parse_pin("steer-7"), None);
        assert_eq!(parse_pin("12"), None);
        assert_eq!(parse_pin("egress-12"), None);
    }
}
