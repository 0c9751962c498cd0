//! Socket lookup and assignment in the node's network namespace. Shared by `steer` and `guard`.
//!
//! A [`Socket`] is a reference the kernel counted for us (`bpf_skc_lookup_tcp`); dropping it
//! releases the reference (`bpf_sk_release`), so every path releases it, as the verifier demands.

use core::{ffi::c_void, ptr::NonNull};

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
    },
    helpers::generated::{bpf_sk_assign, bpf_sk_fullsock, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use nodeward_ebpf::net::TCP_LISTEN;

use crate::packet::Flow;

/// `BPF_F_CURRENT_NETNS` as the helpers' `u64` argument: -1, all ones.
const CURRENT_NETNS: u64 = u64::MAX;

/// `bpf_sk_assign` refused the socket (not at TC ingress, another namespace, an unhashed socket).
pub struct AssignFailed;

/// A TCP socket (or request socket, or TIME-WAIT socket) of the node's network namespace.
pub struct Socket(NonNull<bpf_sock>);

impl Socket {
    /// The socket the node's stack would deliver a segment with this 4-tuple to (network byte
    /// order): an established or request socket for the exact 4-tuple, else a listener on the
    /// destination address (or the wildcard address) and port.
    #[inline]
    pub fn lookup(ctx: &TcContext, saddr: u32, daddr: u32, sport: u16, dport: u16) -> Option<Self> {
        let mut tuple = bpf_sock_tuple {
            __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 {
                ipv4: bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
                    saddr,
                    daddr,
                    sport,
                    dport,
                },
            },
        };
        // SAFETY: `tuple` is a valid IPv4 tuple on the stack of the size we pass; the context
        // pointer is the program's own. The returned reference is released by `Drop`.
        let sk = unsafe {
            bpf_skc_lookup_tcp(
                ctx.skb.skb.cast::<c_void>(),
                &raw mut tuple,
                size_of::<bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1>() as u32,
                // `BPF_F_CURRENT_NETNS` (-1, all ones): the namespace of the packet's device,
                // the node's.
                CURRENT_NETNS,
                0,
            )
        };
        NonNull::new(sk).map(Self)
    }

    /// As [`Self::lookup`], for a tuple of either family: `size` is the size of the tuple's
    /// `ipv4` or `ipv6` member, which tells the helper the family.
    #[inline]
    pub fn lookup_tuple(ctx: &TcContext, tuple: &mut bpf_sock_tuple, size: u32) -> Option<Self> {
        // SAFETY: `tuple` is a valid tuple of at least `size` bytes (the caller built it for its
        // family); the context pointer is the program's own. `Drop` releases the reference.
        let sk = unsafe {
            bpf_skc_lookup_tcp(
                ctx.skb.skb.cast::<c_void>(),
                core::ptr::from_mut(tuple),
                size,
                CURRENT_NETNS,
                0,
            )
        };
        NonNull::new(sk).map(Self)
    }

    /// The socket's own mark (`SO_MARK`), when it is a full socket (not a request or TIME-WAIT
    /// socket, which have none).
    #[inline]
    pub fn mark(&self) -> Option<u32> {
        // SAFETY: a referenced socket from a lookup, as `bpf_sk_fullsock` takes it.
        let full = unsafe { bpf_sk_fullsock(self.0.as_ptr()) };
        if full.is_null() {
            return None;
        }
        // SAFETY: `bpf_sk_fullsock` returned a full socket, whose `mark` the verifier lets us
        // read.
        Some(unsafe { (*full).mark })
    }

    /// The socket of the flow `flow` belongs to, whatever its state (see [`Self::lookup`]).
    #[inline]
    pub fn of_flow(ctx: &TcContext, flow: &Flow) -> Option<Self> {
        Self::lookup(ctx, flow.saddr, flow.daddr, flow.sport, flow.dport)
    }

    /// The enforcer's transparent listener for `flow`: a socket in LISTEN on `listener_port`
    /// (host byte order) of the flow's destination address or of the wildcard address.
    #[inline]
    pub fn listener(ctx: &TcContext, flow: &Flow, listener_port: u16) -> Option<Self> {
        Self::lookup(
            ctx,
            flow.saddr,
            flow.daddr,
            flow.sport,
            listener_port.to_be(),
        )
        .filter(|sk| sk.state() == TCP_LISTEN)
    }

    /// The socket's TCP state (`sk_state`: `TCP_ESTABLISHED` = 1, ... `TCP_NEW_SYN_RECV` = 12).
    #[inline]
    pub fn state(&self) -> u32 {
        // SAFETY: a non-null socket from a lookup; `state` is readable from any socket kind.
        unsafe { (*self.0.as_ptr()).state }
    }

    /// Delivers the packet in `ctx` to this socket (`bpf_sk_assign`): the node's stack skips its
    /// own socket lookup. The packet must still be routed to local delivery (the steer mark).
    #[inline]
    pub fn assign(&self, ctx: &TcContext) -> Result<(), AssignFailed> {
        // SAFETY: both pointers are valid: the program's context and a referenced socket.
        let ret = unsafe {
            bpf_sk_assign(
                ctx.skb.skb.cast::<c_void>(),
                self.0.as_ptr().cast::<c_void>(),
                0,
            )
        };
        if ret == 0 {
            Ok(())
        } else {
            Err(AssignFailed)
        }
    }
}

impl Drop for Socket {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the pointer is a reference from `bpf_skc_lookup_tcp`, released exactly once.
        unsafe { bpf_sk_release(self.0.as_ptr().cast::<c_void>()) };
    }
}
