//! TCX attachments of `steer` and `guard`: created, pinned, adopted from a previous run, removed.
//!
//! Every attachment is a TCX link pinned at `<pin_dir>/links/<program>-<ifindex>`: the pin keeps
//! it attached (and the program loaded) when the agent dies. A restarted agent opens the pin and
//! swaps its own, freshly loaded program into the same link (`BPF_LINK_UPDATE`, atomic: at every
//! instant exactly one version runs). Removing the pin and closing the last descriptor detaches
//! it. Links are attached first in the hook's chain (`LinkOrder::first()`), so a program of
//! another tool that ends the chain cannot skip nodeward's.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, TcAttachType,
    },
    Ebpf,
};

use super::{
    bpffs::{Hook, PinLayout},
    object::classifier,
    DatapathError,
};

/// One attachment we hold.
pub struct Attachment {
    /// Our descriptor of the link (the pin holds another reference).
    link: FdLink,
    /// Where it is pinned.
    pin: PathBuf,
    /// The interface's name when last seen.
    pub iface: String,
}

/// The attachments, by hook and interface index.
#[derive(Default)]
pub struct Attachments {
    links: BTreeMap<(Hook, u32), Attachment>,
}

impl Attachments {
    /// Whether `hook` is attached to `ifindex`.
    pub fn contains(&self, hook: Hook, ifindex: u32) -> bool {
        self.links.contains_key(&(hook, ifindex))
    }

    /// (hook, ifindex, interface name) of every attachment.
    pub fn list(&self) -> impl Iterator<Item = (Hook, u32, &str)> {
        self.links
            .iter()
            .map(|(&(hook, ifindex), attachment)| (hook, ifindex, attachment.iface.as_str()))
    }

    /// Records the interface's current name.
    pub fn rename(&mut self, hook: Hook, ifindex: u32, name: &str) {
        if let Some(attachment) = self.links.get_mut(&(hook, ifindex)) {
            if attachment.iface != name {
                name.clone_into(&mut attachment.iface);
            }
        }
    }

    /// Attaches `hook`'s program to `iface` (index `ifindex`) and pins the link. When a pin for
    /// this hook and interface exists (left by a previous run), the program is swapped into that
    /// link instead; if that fails, a new link is attached before the old one is removed.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        layout: &PinLayout,
        hook: Hook,
        ifindex: u32,
        iface: &str,
    ) -> Result<(), DatapathError> {
        if self.contains(hook, ifindex) {
            return Ok(());
        }
        let pin = layout.link(hook, ifindex);
        if pin.exists() {
            match adopt(ebpf, hook, &pin) {
                Ok(link) => {
                    tracing::info!(program = hook.program(), %iface, "adopted the attachment left by a previous run");
                    self.insert(hook, ifindex, link, pin, iface);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(
                        program = hook.program(),
                        %iface,
                        error = %e,
                        "the attachment left by a previous run cannot be taken over; attaching anew before removing it"
                    );
                }
            }
        }
        let link = attach_new(ebpf, hook, iface)?;
        // A previous run's link, if any, stays attached until here: the new one runs first.
        match fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DatapathError::PinDir {
                    operation: "removing",
                    path: pin,
                    source,
                })
            }
        }
        let pinned = link.pin(&pin).map_err(|source| DatapathError::PinLink {
            program: hook.program(),
            path: pin.clone(),
            source: Box::new(source),
        })?;
        self.insert(hook, ifindex, FdLink::from(pinned), pin, iface);
        tracing::info!(program = hook.program(), direction = hook.direction(), %iface, "attached");
        Ok(())
    }

    /// Detaches `hook` from `ifindex`: removes the pin and closes our descriptor.
    pub fn detach(&mut self, hook: Hook, ifindex: u32) -> Result<(), DatapathError> {
        let Some(attachment) = self.links.remove(&(hook, ifindex)) else {
            return Ok(());
        };
        let Attachment { link, pin, iface } = attachment;
        let removed = unpin(&pin);
        drop(link);
        tracing::info!(program = hook.program(), %iface, "detached");
        removed
    }

    /// Detaches everything; returns what could not be removed.
    pub fn detach_all(&mut self) -> Vec<String> {
        let keys: Vec<_> = self.links.keys().copied().collect();
        keys.into_iter()
            .filter_map(|(hook, ifindex)| self.detach(hook, ifindex).err())
            .map(|e| e.to_string())
            .collect()
    }

    fn insert(&mut self, hook: Hook, ifindex: u32, link: FdLink, pin: PathBuf, iface: &str) {
        self.links.insert(
            (hook, ifindex),
            Attachment {
                link,
                pin,
                iface: iface.to_owned(),
            },
        );
    }
}

/// Removes a link's pin; a missing pin is fine.
pub fn unpin(pin: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::PinDir {
            operation: "removing",
            path: pin.to_owned(),
            source,
        }),
    }
}

/// Swaps `hook`'s freshly loaded program into the link pinned at `pin` (`BPF_LINK_UPDATE`).
pub(super) fn adopt(ebpf: &mut Ebpf, hook: Hook, pin: &Path) -> Result<FdLink, DatapathError> {
    let open_error = |source| DatapathError::OpenLink {
        path: pin.to_owned(),
        source: Box::new(source),
    };
    let pinned = PinnedLink::from_pin(pin).map_err(open_error)?;
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(open_error)?;
    let program = classifier(ebpf, hook)?;
    let attach_error = |source| DatapathError::Attach {
        program: hook.program(),
        direction: hook.direction(),
        iface: pin.display().to_string(),
        source: Box::new(source),
    };
    let id = program.attach_to_link(link).map_err(attach_error)?;
    let link = program.take_link(id).map_err(attach_error)?;
    FdLink::try_from(link).map_err(open_error)
}

/// Attaches `hook`'s program to `iface` as a new TCX link, first in the chain.
pub(super) fn attach_new(
    ebpf: &mut Ebpf,
    hook: Hook,
    iface: &str,
) -> Result<FdLink, DatapathError> {
    let attach_type = match hook {
        Hook::Steer | Hook::InPod => TcAttachType::Ingress,
        Hook::Guard | Hook::InPodEgress => TcAttachType::Egress,
    };
    let program = classifier(ebpf, hook)?;
    let attach_error = |source| DatapathError::Attach {
        program: hook.program(),
        direction: hook.direction(),
        iface: iface.to_owned(),
        source: Box::new(source),
    };
    let id = program
        .attach_with_options(
            iface,
            attach_type,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )
        .map_err(attach_error)?;
    let link = program.take_link(id).map_err(attach_error)?;
    FdLink::try_from(link).map_err(|source| DatapathError::OpenLink {
        path: PathBuf::from(iface),
        source: Box::new(source),
    })
}
