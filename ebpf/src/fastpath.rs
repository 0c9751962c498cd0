//! The same-node fast path: `fastpath_sockops` (`sock_ops`, attached to a cgroup v2) and
//! `fastpath_msg` (`sk_msg`, attached to the `FAST_PATH_SOCKETS` sock hash).
//!
//! `fastpath_sockops` runs when a TCP connection of a socket in the cgroup is established
//! (`BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB` on the connecting side, `..._PASSIVE_ESTABLISHED_CB` on
//! the accepting side). An IPv4 socket whose local or remote (address, port) is a protected
//! endpoint (`PROTECTED_ENDPOINTS`, the map `steer` and `guard` read) is added to
//! `FAST_PATH_SOCKETS` under its own 4-tuple and side ([`SocketKey`]: the node's network namespace
//! or a pod's); the first socket with a key keeps it (`BPF_NOEXIST`). A pod's socket joins only
//! when its 4-tuple is in `OPENED_FLOWS` (written by `steer`/`guard` when the connection's SYN
//! crossed them), and consumes that entry. Every other socket costs the lookups and nothing else. A socket leaves the map by itself when it closes (the kernel
//! unhashes it from every sock map).
//!
//! `fastpath_msg` runs on every `sendmsg` of a socket in that map and hands the bytes straight to
//! the receive queue of the socket with the swapped 4-tuple on the *other* side
//! (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`): the other end of the same connection, skipping
//! the TCP/IP stack. A pod's socket only reaches a socket of the node's namespace (the
//! enforcer's) and back; when the peer is not in the map the message takes the TCP path. Nothing
//! is ever dropped here.
//!
//! Connections only exist through the TC data path (their SYN crossed `steer`/`guard`), so the
//! peers are the ends that path made: client pod <-> enforcer, enforcer <-> protected pod.
//! ARCHITECTURE.md explains why this opens no bypass.

use aya_ebpf::{
    bindings::{
        bpf_sock, sk_action::SK_PASS, BPF_F_INGRESS, BPF_NOEXIST,
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    },
    helpers::generated::bpf_get_netns_cookie,
    macros::{sk_msg, sock_ops},
    programs::{SkMsgContext, SockOpsContext},
    EbpfContext as _,
};
use nodeward_common::{
    counter,
    fastpath::{
        local_port_network_order, remote_port_network_order, SocketKey, SIDE_NODE, SIDE_POD,
    },
};

use crate::maps::{
    config, count, is_protected, node_netns_cookie, FAST_PATH_SOCKETS, OPENED_FLOWS,
};

/// `AF_INET`.
const AF_INET: u32 = 2;

/// What `sock_ops` programs return for callbacks that take no answer.
const SOCK_OPS_DONE: u32 = 1;

/// Entry point of the `sock_ops` program. Always returns [`SOCK_OPS_DONE`]: the established
/// callbacks take no answer, and a socket not added keeps the ordinary TCP path.
#[sock_ops]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[sock_ops] hands the context over by value"
)]
pub fn fastpath_sockops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return SOCK_OPS_DONE;
    }
    if ctx.family() != AF_INET {
        return SOCK_OPS_DONE;
    }
    let key = SocketKey {
        local_addr: ctx.local_ip4(),
        remote_addr: ctx.remote_ip4(),
        local_port: local_port_network_order(ctx.local_port()),
        remote_port: remote_port_network_order(ctx.remote_port()),
        side: SIDE_POD,
    };
    let inpod_mark = config().inpod_mark;
    if inpod_mark != 0 {
        // SAFETY: `ctx.ops` is the context pointer the kernel passed to the program.
        let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
        return inpod_sockops(&ctx, key, op, socket_mark(sk) == Some(inpod_mark));
    }
    if !is_protected(key.local_addr, key.local_port)
        && !is_protected(key.remote_addr, key.remote_port)
    {
        return SOCK_OPS_DONE;
    }
    let Some(node) = node_netns_cookie() else {
        // Not configured (0): nothing joins the fast path.
        return SOCK_OPS_DONE;
    };
    // SAFETY: the context pointer is the program's own; the helper reads the socket's namespace.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = SocketKey {
        side: if cookie == node { SIDE_NODE } else { SIDE_POD },
        ..key
    };
    if key.side == SIDE_POD {
        // A pod's socket joins only for a flow the node's routing delivered through `steer`
        // (client end) or `guard` (pod end), once: a socket with the same 4-tuple made inside
        // some other namespace cannot take the connection's key.
        if OPENED_FLOWS.get_ptr(key).is_none() {
            count(counter::FASTPATH_SOCKETS_UNSTEERED);
            return SOCK_OPS_DONE;
        }
        let _ = OPENED_FLOWS.remove(key);
    }
    // SAFETY: `ctx.ops` is the context pointer the kernel passed to the program.
    let ops = unsafe { &mut *ctx.ops };
    match FAST_PATH_SOCKETS.update(key, ops, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(counter::FASTPATH_SOCKETS_ADDED),
        Err(_) => count(counter::FASTPATH_SOCKETS_FAILED),
    }
    SOCK_OPS_DONE
}

/// In-pod steering (`CONFIG.inpod_mark` set): the enforcer's sockets are the ones carrying
/// `inpod_mark` (the listeners' in the pods pass it to every accepted socket; the upstream
/// sockets are given it), side [`SIDE_NODE`]; every other socket is a pod's, side [`SIDE_POD`],
/// and joins only when its 4-tuple is in `OPENED_FLOWS`: written by `inpod` for the client end
/// of a flow it assigned to the enforcer, and here for the application's end of an upstream
/// connection the enforcer opened (on the pod's loopback its `ACTIVE_ESTABLISHED` comes before
/// the application's `PASSIVE_ESTABLISHED`).
#[inline]
fn inpod_sockops(ctx: &SockOpsContext, key: SocketKey, op: u32, enforcer: bool) -> u32 {
    if node_netns_cookie().is_none() {
        return SOCK_OPS_DONE;
    }
    let key = if enforcer {
        let key = SocketKey {
            side: SIDE_NODE,
            ..key
        };
        if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            // The enforcer's upstream connection: its other end is the application's socket.
            let _ = OPENED_FLOWS.insert(key.peer(), 0, 0);
        }
        key
    } else {
        if OPENED_FLOWS.get_ptr(key).is_none() {
            count(counter::FASTPATH_SOCKETS_UNSTEERED);
            return SOCK_OPS_DONE;
        }
        let _ = OPENED_FLOWS.remove(key);
        key
    };
    // SAFETY: `ctx.ops` is the context pointer the kernel passed to the program.
    let ops = unsafe { &mut *ctx.ops };
    match FAST_PATH_SOCKETS.update(key, ops, u64::from(BPF_NOEXIST)) {
        Ok(()) => count(counter::FASTPATH_SOCKETS_ADDED),
        Err(_) => count(counter::FASTPATH_SOCKETS_FAILED),
    }
    SOCK_OPS_DONE
}

/// A socket's own mark (`SO_MARK`); `None` without a socket.
#[inline]
fn socket_mark(sk: *mut bpf_sock) -> Option<u32> {
    if sk.is_null() {
        return None;
    }
    // SAFETY: a non-null socket pointer from the context, a full socket in these programs;
    // `mark` is one of its readable fields.
    Some(unsafe { (*sk).mark })
}

/// Entry point of the `sk_msg` program. Always `SK_PASS`: either redirected to the peer socket
/// (the helper's `SK_PASS` plus the redirect it recorded) or sent on the socket's own TCP path.
#[sk_msg]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[sk_msg] hands the context over by value"
)]
pub fn fastpath_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: `ctx.msg` is the context pointer the kernel passed to the program; these fields are
    // readable in every sk_msg program.
    let (family, local_addr, remote_addr, local_port, remote_port) = unsafe {
        let md = &*ctx.msg;
        (
            md.family,
            md.local_ip4,
            md.remote_ip4,
            md.local_port,
            md.remote_port,
        )
    };
    if family != AF_INET {
        count(counter::FASTPATH_MSGS_PASSED);
        return SK_PASS;
    }
    let Some(node) = node_netns_cookie() else {
        count(counter::FASTPATH_MSGS_PASSED);
        return SK_PASS;
    };
    let inpod_mark = config().inpod_mark;
    let enforcer = if inpod_mark == 0 {
        // SAFETY: the context pointer is the program's own.
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) == node }
    } else {
        // SAFETY: `ctx.msg` is the context pointer the kernel passed to the program.
        socket_mark(unsafe { (*ctx.msg).__bindgen_anon_3.sk }) == Some(inpod_mark)
    };
    let own = SocketKey {
        local_addr,
        remote_addr,
        local_port: local_port_network_order(local_port),
        remote_port: remote_port_network_order(remote_port),
        side: if enforcer { SIDE_NODE } else { SIDE_POD },
    };
    let verdict = FAST_PATH_SOCKETS.redirect_msg(&ctx, own.peer(), u64::from(BPF_F_INGRESS));
    if verdict == i64::from(SK_PASS) {
        count(counter::FASTPATH_MSGS_REDIRECTED);
    } else {
        // No peer in the map: the helper answers SK_DROP, which would lose the bytes; they take
        // the TCP path instead.
        count(counter::FASTPATH_MSGS_PASSED);
    }
    SK_PASS
}
