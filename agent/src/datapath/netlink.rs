//! rtnetlink for the datapath: interfaces, the policy-routing rule and local route that deliver
//! steered packets to the node's stack, route lookups, and link events.
//!
//! A blocking `NETLINK_ROUTE` socket (`netlink-sys`) with messages from `netlink-packet-route`.
//! A netlink socket belongs to the network namespace of the thread that opened it, so a
//! [`Netlink`] speaks for the namespace it was opened in for its whole life.

use std::{io, net::Ipv4Addr};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_MULTIPART, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlags, LinkMessage},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `RTNLGRP_LINK` (`include/uapi/linux/rtnetlink.h`): notifications of links added, changed and
/// removed.
const RTNLGRP_LINK: u32 = 1;

/// An interface of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// `ifindex`, stable while the interface exists.
    pub index: u32,
    /// Current name.
    pub name: String,
    /// Whether it is a loopback device.
    pub loopback: bool,
}

/// The default route of a routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableDefault {
    /// No default route.
    Missing,
    /// `local 0.0.0.0/0 dev lo`: nodeward's (or identical to it).
    Ours,
    /// Another default route: the table belongs to someone else.
    Other,
}

/// The policy-routing rule: `fwmark <mark>/<mark> lookup <table> pref <priority>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkRule {
    /// Mark and mask: the rule matches packets with all these bits set.
    pub mark: u32,
    /// Routing table.
    pub table: u32,
    /// Rule priority (`pref`).
    pub priority: u32,
}

/// A request/response rtnetlink socket.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            sequence: 0,
        })
    }

    /// Every interface of the namespace.
    pub fn interfaces(&mut self) -> io::Result<Vec<Interface>> {
        let mut request = LinkMessage::default();
        request.header.interface_family = AddressFamily::Unspec;
        let replies = self.request(RouteNetlinkMessage::GetLink(request), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|message| match message {
                RouteNetlinkMessage::NewLink(link) => interface(&link),
                _ => None,
            })
            .collect())
    }

    /// The interface the main routing table sends packets for `ip` through, or `None` when the
    /// address is local to the namespace, unreachable, or routed through loopback.
    pub fn interface_for(&mut self, ip: Ipv4Addr) -> io::Result<Option<String>> {
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        request.header.destination_prefix_length = 32;
        request
            .attributes
            .push(RouteAttribute::Destination(RouteAddress::Inet(ip)));
        let replies = match self.request(RouteNetlinkMessage::GetRoute(request), 0) {
            Ok(replies) => replies,
            // No route to the address (ENETUNREACH, EHOSTUNREACH).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ENETUNREACH | libc::EHOSTUNREACH)
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let Some(route) = replies.into_iter().find_map(|message| match message {
            RouteNetlinkMessage::NewRoute(route) => Some(route),
            _ => None,
        }) else {
            return Ok(None);
        };
        if route.header.kind != RouteType::Unicast {
            return Ok(None);
        }
        let Some(oif) = route
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            })
        else {
            return Ok(None);
        };
        Ok(self
            .interfaces()?
            .into_iter()
            .find(|interface| interface.index == oif && !interface.loopback)
            .map(|interface| interface.name))
    }

    /// Whether `rule` exists (same mark, mask, table and priority).
    pub fn has_rule(&mut self, rule: MarkRule) -> io::Result<bool> {
        let mut request = RuleMessage::default();
        request.header.family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRule(request), NLM_F_DUMP)?;
        Ok(replies.iter().any(|message| match message {
            RouteNetlinkMessage::NewRule(found) => rule_matches(found, rule),
            _ => false,
        }))
    }

    /// Adds `rule`. Returns `false` when an identical rule was already there (adopted).
    pub fn add_rule(&mut self, rule: MarkRule) -> io::Result<bool> {
        match self.request(
            RouteNetlinkMessage::NewRule(rule_message(rule)),
            NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
        ) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes `rule`. Returns `false` when it was not there.
    pub fn delete_rule(&mut self, rule: MarkRule) -> io::Result<bool> {
        match self.request(RouteNetlinkMessage::DelRule(rule_message(rule)), NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// What the default route of `table` is.
    pub fn table_default(&mut self, table: u32) -> io::Result<TableDefault> {
        let loopback = self.loopback_index()?;
        let mut request = RouteMessage::default();
        request.header.address_family = AddressFamily::Inet;
        let replies = self.request(RouteNetlinkMessage::GetRoute(request), NLM_F_DUMP)?;
        let mut found = TableDefault::Missing;
        for message in replies {
            let RouteNetlinkMessage::NewRoute(route) = message else {
                continue;
            };
            if route_table(&route) != table || route.header.destination_prefix_length != 0 {
                continue;
            }
            let via_loopback = route.attributes.contains(&RouteAttribute::Oif(loopback));
            if route.header.kind == RouteType::Local && via_loopback {
                found = TableDefault::Ours;
            } else {
                return Ok(TableDefault::Other);
            }
        }
        Ok(found)
    }

    /// Adds `local 0.0.0.0/0 dev lo table <table>`. The caller checked with
    /// [`Self::table_default`] that the table has no other default route.
    pub fn add_local_default_route(&mut self, table: u32) -> io::Result<()> {
        let message = self.local_route_message(table)?;
        self.request(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK,
        )
        .map(drop)
    }

    /// Removes `local 0.0.0.0/0 dev lo table <table>`. Returns `false` when it was not there.
    pub fn delete_local_default_route(&mut self, table: u32) -> io::Result<bool> {
        let message = self.local_route_message(table)?;
        match self.request(RouteNetlinkMessage::DelRoute(message), NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn local_route_message(&mut self, table: u32) -> io::Result<RouteMessage> {
        let loopback = self.loopback_index()?;
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = 0;
        message.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
        message.header.protocol = RouteProtocol::Static;
        message.header.scope = RouteScope::Host;
        message.header.kind = RouteType::Local;
        message.attributes = vec![
            RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::UNSPECIFIED)),
            RouteAttribute::Table(table),
            RouteAttribute::Oif(loopback),
        ];
        Ok(message)
    }

    fn loopback_index(&mut self) -> io::Result<u32> {
        self.interfaces()?
            .into_iter()
            .find(|interface| interface.loopback)
            .map(|interface| interface.index)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "the network namespace has no loopback interface",
                )
            })
    }

    /// Sends one request and collects the replies: until `NLMSG_DONE` for a dump, until the ACK
    /// (or the single reply) otherwise. A netlink error becomes the `io::Error` of its errno.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        self.sequence = self.sequence.wrapping_add(1);
        let sequence = self.sequence;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buffer = vec![0; packet.buffer_len()];
        packet.serialize(&mut buffer);
        self.socket.send(&buffer, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let wants_ack = flags & NLM_F_ACK != 0;
        let mut replies = Vec::new();
        loop {
            let (datagram, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < datagram.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                let length = match &reply {
                    Ok(reply) => reply.header.length as usize,
                    // Skip a message this library cannot parse (its length is in the first 4
                    // bytes of every netlink message), rather than lose the whole answer.
                    Err(_) => datagram
                        .get(offset..offset + 4)
                        .and_then(|bytes| bytes.try_into().ok())
                        .map_or(0, |bytes: [u8; 4]| u32::from_ne_bytes(bytes) as usize),
                };
                if length == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink reply with a zero length",
                    ));
                }
                offset += (length + 3) & !3;
                let Ok(reply) = reply else {
                    tracing::debug!("skipping an rtnetlink message that could not be parsed");
                    continue;
                };
                if reply.header.sequence_number != sequence {
                    continue;
                }
                let multipart = reply.header.flags & NLM_F_MULTIPART != 0;
                match reply.payload {
                    NetlinkPayload::Done(_) => return Ok(replies),
                    NetlinkPayload::Error(error) => match error.code {
                        None => return Ok(replies),
                        Some(_) => return Err(error.to_io()),
                    },
                    NetlinkPayload::InnerMessage(inner) => {
                        replies.push(inner);
                        if !dump && !multipart && !wants_ack {
                            return Ok(replies);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A socket that hears about links added and removed in its namespace (`RTNLGRP_LINK`).
pub struct LinkWatch {
    socket: Socket,
}

impl LinkWatch {
    /// Subscribes, in the calling thread's network namespace. Non-blocking.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.add_membership(RTNLGRP_LINK)?;
        socket.set_non_blocking(true)?;
        Ok(Self { socket })
    }

    /// Reads every pending notification; returns how many datagrams there were. `ENOBUFS`
    /// (notifications lost) counts as one: the caller rescans anyway.
    pub fn drain(&self) -> io::Result<usize> {
        let mut buffer = vec![0; 64 * 1024];
        let mut count = 0;
        loop {
            match self.socket.recv(&mut &mut buffer[..], 0) {
                Ok(_) => count += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(count),
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => count += 1,
                Err(e) => return Err(e),
            }
        }
    }
}

impl std::os::fd::AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

fn interface(link: &LinkMessage) -> Option<Interface> {
    let name = link
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })?;
    Some(Interface {
        index: link.header.index,
        name,
        loopback: link.header.flags.contains(LinkFlags::Loopback),
    })
}

fn rule_message(rule: MarkRule) -> RuleMessage {
    let mut message = RuleMessage::default();
    message.header.family = AddressFamily::Inet;
    message.header.table = u8::try_from(rule.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    message.header.action = RuleAction::ToTable;
    message.attributes = vec![
        RuleAttribute::Priority(rule.priority),
        RuleAttribute::FwMark(rule.mark),
        RuleAttribute::FwMask(rule.mark),
        RuleAttribute::Table(rule.table),
    ];
    message
}

fn rule_matches(found: &RuleMessage, rule: MarkRule) -> bool {
    let mut found_fwmark = None;
    let mut found_mask = None;
    let mut table = u32::from(found.header.table);
    let mut priority = 0;
    for attribute in &found.attributes {
        match attribute {
            RuleAttribute::FwMark(value) => found_fwmark = Some(*value),
            RuleAttribute::FwMask(value) => found_mask = Some(*value),
            RuleAttribute::Table(value) => table = *value,
            RuleAttribute::Priority(value) => priority = *value,
            _ => {}
        }
    }
    found.header.action == RuleAction::ToTable
        && found_fwmark == Some(rule.mark)
        && found_mask == Some(rule.mark)
        && table == rule.table
        && priority == rule.priority
}

fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attribute| match attribute {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or_else(|| u32::from(route.header.table))
}

/// `ENOENT` or `ESRCH`: what the kernel answers when asked to delete a rule or route that is not
/// there.
fn is_missing(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_message_round_trips_through_the_matcher() {
        let rule = MarkRule {
            mark: 0x100,
            table: 1337,
            priority: 100,
        };
        let message = rule_message(rule);
        assert!(rule_matches(&message, rule));
        assert!(!rule_matches(
            &message,
            MarkRule {
                priority: 101,
                ..rule
            }
        ));
        assert!(!rule_matches(
            &message,
            MarkRule {
                mark: 0x200,
                ..rule
            }
        ));
        assert_eq!(
            message.header.table,
            RouteHeader::RT_TABLE_UNSPEC,
            "tables above 255 go in the attribute only"
        );
    }
}
