//! In-pod steering, the agent's side (`--steering in-pod`): for every protected pod of this node,
//! the enforcer's listeners inside the pod's network namespace, and the namespace the enforcer's
//! upstream sockets to that pod are created in.
//!
//! On every published snapshot and every link change ([`PodListeners::sync`]):
//! 1. the protected workloads are matched to namespaces (`--netns-dir`, default `/run/netns`) by
//!    their address ([`crate::netns::scan`]);
//! 2. a newly protected pod gets its listeners first: TCP on `0.0.0.0:<port>` and
//!    `[::]:<port>` (IPv6 only, when the pod has IPv6), created inside its namespace, carrying
//!    `SO_MARK` = the in-pod mark, by which the kernel's `inpod` program knows them. They are
//!    handed to the enforcer ([`serve`]), which accepts from them like from the node's listener;
//!    an accepted socket's local address is where the client was going;
//! 3. then the data path attaches `inpod` in the pod ([`Datapath::sync_pods`]);
//! 4. a pod no longer protected (or gone) loses the program first, then its listeners.
//!
//! The enforcer's connection to the application is made from inside the pod's namespace
//! ([`PodNamespaces::netns_of`]) to the pod's address: it stays on the pod's loopback, never
//! crosses `inpod`, and the application sees the pod's own address as its peer.
//!
//! [`Datapath::sync_pods`]: crate::datapath::Datapath::sync_pods

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::datapath::PodTarget;
use crate::enforcer::Enforcer;
use crate::netns::{self, Netns};
use crate::state::Snapshot;

/// Addresses of protected pods, each with its namespace and its registered address.
#[derive(Debug, Default)]
pub struct PodNamespaces {
    by_ip: RwLock<HashMap<IpAddr, (Netns, IpAddr)>>,
}

impl PodNamespaces {
    /// The namespace of the pod that owns `ip`, when in-pod steering protects it.
    #[must_use]
    pub fn netns_of(&self, ip: IpAddr) -> Option<Netns> {
        self.read().get(&ip).map(|(netns, _)| netns.clone())
    }

    /// The address the registry knows the pod owning `ip` by (its other family's address for a
    /// dual-stack pod registered by one address).
    #[must_use]
    pub fn workload_ip(&self, ip: IpAddr) -> Option<IpAddr> {
        self.read().get(&ip).map(|(_, registered)| *registered)
    }

    /// Records that `ip` belongs to the pod registered as `registered`: a connection to `ip`
    /// arrived through that pod's listener before a rescan saw the address (one added to the
    /// pod since). Without it the enforcer would dial `ip` from the node, into the pod's own
    /// steering.
    pub fn learn(&self, ip: IpAddr, registered: IpAddr) {
        if self.read().contains_key(&ip) {
            return;
        }
        let mut by_ip = self.write();
        let netns = by_ip
            .values()
            .find(|(_, r)| *r == registered)
            .map(|(netns, _)| netns.clone());
        if let Some(netns) = netns {
            by_ip.insert(ip, (netns, registered));
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<IpAddr, (Netns, IpAddr)>> {
        self.by_ip
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<IpAddr, (Netns, IpAddr)>> {
        self.by_ip
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A pod's listeners, on their way to the enforcer.
#[derive(Debug)]
pub struct Opened {
    /// The pod's registered address.
    pub pod: IpAddr,
    /// The namespace file, for logs.
    pub netns: PathBuf,
    pub listeners: Vec<std::net::TcpListener>,
    /// Cancelled when the pod stops being protected here.
    pub stop: CancellationToken,
}

struct Pod {
    netns: Netns,
    registered: IpAddr,
    addresses: Vec<IpAddr>,
    stop: CancellationToken,
}

/// The protected pods of this node and their listeners; see the module documentation.
pub struct PodListeners {
    netns_dir: PathBuf,
    port: u16,
    mark: u32,
    namespaces: Arc<PodNamespaces>,
    pods: Mutex<BTreeMap<u64, Pod>>,
    opened: mpsc::UnboundedSender<Opened>,
}

impl std::fmt::Debug for PodListeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodListeners")
            .field("netns_dir", &self.netns_dir)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// What [`PodListeners::sync`] found, for the caller's log and status.
#[derive(Debug, Default)]
pub struct Matched {
    /// Every pod found on this node, protected or not, for the data path.
    pub pods: Vec<PodTarget>,
    /// Namespaces of the protected pods among them.
    pub namespaces: Vec<Netns>,
    /// Protected workloads whose namespace is not on this node.
    pub elsewhere: usize,
    /// Pods whose listeners could not be opened (not protected: reported).
    pub failed: Vec<(String, String)>,
}

impl PodListeners {
    /// `port` and `mark`: the listeners' port and `SO_MARK` in every pod. The receiver gets
    /// every pod's listeners; hand it to [`serve`].
    #[must_use]
    pub fn new(
        netns_dir: PathBuf,
        port: u16,
        mark: u32,
    ) -> (Arc<Self>, mpsc::UnboundedReceiver<Opened>) {
        let (opened, receiver) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                netns_dir,
                port,
                mark,
                namespaces: Arc::new(PodNamespaces::default()),
                pods: Mutex::new(BTreeMap::new()),
                opened,
            }),
            receiver,
        )
    }

    /// Where the enforcer creates upstream sockets.
    #[must_use]
    pub fn namespaces(&self) -> Arc<PodNamespaces> {
        Arc::clone(&self.namespaces)
    }

    /// Matches the snapshot's protected workloads to namespaces and opens the listeners of newly
    /// protected pods. Returns the namespaces the data path must hook; call [`Self::retire`]
    /// after the data path is in step.
    pub fn sync(&self, snapshot: &Snapshot) -> Matched {
        let mut matched = Matched::default();
        let protected: std::collections::HashSet<IpAddr> = snapshot
            .by_ip
            .values()
            .filter(|view| view.is_protected())
            .map(|view| view.workload.ip)
            .collect();
        let found = match netns::scan(&self.netns_dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::error!(dir = %self.netns_dir.display(), error = %e, "cannot list pods' network namespaces; in-pod steering keeps its pods as they are");
                let pods = self.lock();
                return Matched {
                    pods: pods
                        .values()
                        .map(|p| PodTarget {
                            netns: p.netns.clone(),
                            addresses: p.addresses.clone(),
                            protected: true,
                        })
                        .collect(),
                    namespaces: pods.values().map(|p| p.netns.clone()).collect(),
                    ..Matched::default()
                };
            }
        };
        let mut pods = self.lock();
        let mut seen = 0;
        for (ns, addresses) in found {
            let Some(registered) = addresses.iter().copied().find(|a| protected.contains(a)) else {
                // Not protected: only its sources are checked.
                matched.pods.push(PodTarget {
                    netns: ns,
                    addresses,
                    protected: false,
                });
                continue;
            };
            seen += 1;
            if let Some(pod) = pods.get_mut(&ns.inode) {
                if pod.addresses != addresses {
                    // Addresses come and go (a dual-stack pod gets its IPv6 one later).
                    let mut by_ip = self.namespaces.write();
                    for address in &pod.addresses {
                        by_ip.remove(address);
                    }
                    for address in &addresses {
                        by_ip.insert(*address, (ns.clone(), registered));
                    }
                    pod.addresses.clone_from(&addresses);
                }
            } else {
                match self.open(&ns) {
                    Ok(listeners) => {
                        let stop = CancellationToken::new();
                        let _ = self.opened.send(Opened {
                            pod: registered,
                            netns: ns.path.clone(),
                            listeners,
                            stop: stop.clone(),
                        });
                        let mut by_ip = self.namespaces.write();
                        for address in &addresses {
                            by_ip.insert(*address, (ns.clone(), registered));
                        }
                        drop(by_ip);
                        tracing::info!(pod = %registered, netns = %ns.path.display(), port = self.port, "enforcer listening inside the pod");
                        pods.insert(
                            ns.inode,
                            Pod {
                                netns: ns.clone(),
                                registered,
                                addresses: addresses.clone(),
                                stop,
                            },
                        );
                    }
                    Err(e) => {
                        // The program still goes in: without the enforcer's listener the
                        // pod's new flows get --failure-mode, never the application unjudged.
                        tracing::error!(pod = %registered, netns = %ns.path.display(), error = %e, "cannot open the enforcer's listener inside the pod; its new connections get --failure-mode");
                        matched
                            .failed
                            .push((ns.path.display().to_string(), e.to_string()));
                    }
                }
            }
            matched.pods.push(PodTarget {
                netns: ns.clone(),
                addresses,
                protected: true,
            });
            matched.namespaces.push(ns);
        }
        matched.elsewhere = protected.len().saturating_sub(seen);
        matched
    }

    /// Closes the listeners of pods not in `kept` (after the data path stopped steering to
    /// them).
    pub fn retire(&self, kept: &[Netns]) {
        let mut pods = self.lock();
        let gone: Vec<u64> = pods
            .keys()
            .filter(|inode| !kept.iter().any(|k| k.inode == **inode))
            .copied()
            .collect();
        for inode in gone {
            if let Some(pod) = pods.remove(&inode) {
                pod.stop.cancel();
                let mut by_ip = self.namespaces.write();
                for address in &pod.addresses {
                    by_ip.remove(address);
                }
                tracing::info!(pod = %pod.registered, netns = %pod.netns.path.display(), "no longer protected here; listeners closed");
            }
        }
    }

    /// The listeners of a pod: IPv4, and IPv6 unless the pod's namespace has IPv6 disabled (an
    /// address it gets later is served at once).
    fn open(&self, ns: &Netns) -> io::Result<Vec<std::net::TcpListener>> {
        let (v4, v6) = ns.within(|| {
            (
                listener(
                    SocketAddr::from((Ipv4Addr::UNSPECIFIED, self.port)),
                    self.mark,
                ),
                listener(
                    SocketAddr::from((Ipv6Addr::UNSPECIFIED, self.port)),
                    self.mark,
                ),
            )
        })?;
        let mut listeners = vec![v4?];
        match v6 {
            Ok(v6) => listeners.push(v6),
            Err(e) => {
                tracing::warn!(netns = %ns.path.display(), error = %e, "no IPv6 listener in the pod: its IPv6 connections get --failure-mode");
            }
        }
        Ok(listeners)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Pod>> {
        self.pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A listener in the calling thread's namespace with `SO_MARK` = `mark` (inherited by every
/// accepted socket), non-blocking.
fn listener(addr: SocketAddr, mark: u32) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_mark(mark)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Serves every pod's listeners with `enforcer` until `shutdown`: one accept task per listener,
/// ended when its pod stops being protected.
pub async fn serve(
    enforcer: Arc<Enforcer>,
    mut opened: mpsc::UnboundedReceiver<Opened>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let accepting = TaskTracker::new();
    loop {
        let pod = tokio::select! {
            () = shutdown.cancelled() => break,
            pod = opened.recv() => match pod {
                Some(pod) => pod,
                None => break,
            },
        };
        for listener in pod.listeners {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::error!(netns = %pod.netns.display(), error = %e, "cannot serve a pod's listener");
                    continue;
                }
            };
            // Accepting stops when the pod is no longer protected or the agent stops; the
            // connections already accepted drain with the agent's.
            let stop_accepting = CancellationToken::new();
            let (stop, agent_stops, relay) =
                (pod.stop.clone(), shutdown.clone(), stop_accepting.clone());
            accepting.spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {},
                    () = agent_stops.cancelled() => {},
                }
                relay.cancel();
            });
            accepting.spawn(Arc::clone(&enforcer).accept(
                listener,
                Some(pod.pod),
                stop_accepting,
                shutdown.clone(),
                tracker.clone(),
            ));
        }
    }
    accepting.close();
    accepting.wait().await;
}
