//! Which protocol upgrades the enforcer lets through. After a `101 Switching Protocols` the
//! connection is spliced and no later byte is judged, so only what Istio configures Envoy to
//! upgrade is ever spliced: WebSocket (RFC 6455 4.1: an HTTP/1.1 `GET`). Envoy removes an h2c
//! upgrade offer (RFC 9113 drops it; Envoy's HTTP/1 codec strips `Upgrade: h2c` and
//! `HTTP2-Settings`) and forwards the request as plain HTTP/1.1; any other upgrade, and
//! `CONNECT`, gets 403 and the connection is closed, as Envoy answers an upgrade type its
//! listener has no `upgrade_configs` entry for.
//!
//! The same rule decides in two places that must agree: the decision ([`super::decide_http`])
//! and the enforcer's framer under hyper (`enforcer::inspect`), which stops reading requests
//! only where the decision ends HTTP on the connection.

/// What a request's upgrade offer amounts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// No upgrade offered (an `Upgrade` header without `Connection: upgrade` is not an offer).
    None,
    /// `GET` on HTTP/1.1 with `Upgrade: websocket`: judged like any request, then spliced if
    /// the pod answers 101.
    WebSocket,
    /// `Upgrade: h2c`: the offer is removed and the request forwarded as HTTP/1.1.
    H2c,
    /// Anything else: 403, connection closed.
    Refused(Refusal),
}

/// Why an upgrade is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `CONNECT` (a tunnel).
    Connect,
    /// An upgrade type other than WebSocket, or WebSocket not on an HTTP/1.1 `GET`.
    Upgrade,
}

impl Refusal {
    /// The metric and access-log reason.
    #[must_use]
    pub fn reason(self) -> &'static str {
        match self {
            Self::Connect => "connect_refused",
            Self::Upgrade => "upgrade_refused",
        }
    }
}

/// Classifies a request from its method, version and header fields (name, value).
pub fn classify<'h>(
    method: &[u8],
    http11: bool,
    headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
) -> Upgrade {
    if method == b"CONNECT" {
        return Upgrade::Refused(Refusal::Connect);
    }
    let mut offered: Vec<&[u8]> = Vec::new();
    let mut connection_upgrade = false;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(b"upgrade") {
            offered.extend(tokens(value));
        } else if name.eq_ignore_ascii_case(b"connection") {
            connection_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
        }
    }
    if offered.is_empty() || !connection_upgrade {
        return Upgrade::None;
    }
    match offered.as_slice() {
        [one] if one.eq_ignore_ascii_case(b"h2c") => Upgrade::H2c,
        [one] if one.eq_ignore_ascii_case(b"websocket") && method == b"GET" && http11 => {
            Upgrade::WebSocket
        }
        _ => Upgrade::Refused(Refusal::Upgrade),
    }
}

/// The comma-separated, trimmed, non-empty elements of a list header (RFC 9110 5.6.1).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn of(method: &str, http11: bool, headers: &[(&str, &str)]) -> Upgrade {
        classify(
            method.as_bytes(),
            http11,
            headers.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        )
    }

    #[test_case("GET", true, &[("Upgrade", "websocket"), ("Connection", "Upgrade")], Upgrade::WebSocket ; "RFC 6455 4.1 handshake")]
    #[test_case("GET", true, &[("upgrade", "WebSocket"), ("connection", "keep-alive, upgrade")], Upgrade::WebSocket ; "tokens are case-insensitive and listed")]
    #[test_case("POST", true, &[("Upgrade", "websocket"), ("Connection", "upgrade")], Upgrade::Refused(Refusal::Upgrade) ; "WebSocket only on GET")]
    #[test_case("GET", false, &[("Upgrade", "websocket"), ("Connection", "upgrade")], Upgrade::Refused(Refusal::Upgrade) ; "no upgrade on HTTP 1.0")]
    #[test_case("GET", true, &[("Upgrade", "h2c"), ("Connection", "Upgrade, HTTP2-Settings"), ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA")], Upgrade::H2c ; "Envoy strips an h2c offer")]
    #[test_case("GET", true, &[("Upgrade", "foo/2"), ("Connection", "upgrade")], Upgrade::Refused(Refusal::Upgrade) ; "a made-up protocol is refused")]
    #[test_case("GET", true, &[("Upgrade", "websocket, h2c"), ("Connection", "upgrade")], Upgrade::Refused(Refusal::Upgrade) ; "a list is not WebSocket")]
    #[test_case("GET", true, &[("Upgrade", "websocket"), ("Upgrade", "foo"), ("Connection", "upgrade")], Upgrade::Refused(Refusal::Upgrade) ; "two Upgrade lines are a list")]
    #[test_case("GET", true, &[("Upgrade", "websocket")], Upgrade::None ; "no Connection upgrade: not an offer")]
    #[test_case("GET", true, &[("Connection", "upgrade")], Upgrade::None ; "Connection upgrade alone: nothing offered")]
    #[test_case("CONNECT", true, &[], Upgrade::Refused(Refusal::Connect) ; "CONNECT is a tunnel")]
    #[test_case("GET", true, &[], Upgrade::None ; "plain request")]
    fn upgrade_offers(method: &str, http11: bool, headers: &[(&str, &str)], expected: Upgrade) {
        assert_eq!(of(method, http11, headers), expected);
    }
}
