//! What a steered connection speaks, from its first bytes, without consuming them (`peek`):
//! HTTP/1.x (a request line), HTTP/2 with prior knowledge (the connection preface), TLS (a
//! handshake record; the ClientHello's server name is read for `connection.sni`), or anything
//! else (plain TCP).
//!
//! Judging a connection as TCP skips JWT validation and the HTTP rules, so the sniffer decides
//! "TCP" only when the bytes cannot be the start of an HTTP request; everything that still
//! could be is HTTP, and hyper (strict) refuses what is malformed with 400. In particular:
//! - empty lines before the request line are skipped (RFC 9112 2.2: a server SHOULD ignore at
//!   least one), as are leading spaces and tabs;
//! - the request line is recognised by its shape (`token SP target SP HTTP/`), whatever the
//!   method's length, with runs of spaces or tabs between the parts (RFC 9112 3: recipients
//!   MAY split on whitespace), so a lenient server behind the agent never gets an HTTP request
//!   judged as TCP;
//! - bytes that stop before the shape is decided are HTTP when they could still be HTTP;
//! - a client that sends nothing before the detection timeout is not "TCP": the enforcer waits
//!   for whichever side speaks first (`Detected::Silent`, see `enforcer::tcp`).
//!
//! A port whose protocol is declared is not sniffed ([`Expect`]): HTTP ports are HTTP (only the
//! HTTP/2 preface is looked for), TCP-like ports are TCP from the first byte, TLS ports only
//! have their ClientHello read.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::state::workloads::PortProtocol;

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The protocol of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2c,
    /// TLS, with the ClientHello's server name when it has one.
    Tls {
        sni: Option<String>,
    },
    /// Anything else.
    Tcp,
}

impl Protocol {
    /// The metric label.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::H2c => "h2c",
            Self::Tls { .. } => "tls",
            Self::Tcp => "tcp",
        }
    }
}

/// What the port is declared to speak, which decides how much sniffing is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Undeclared: sniffed.
    Sniff,
    /// HTTP, HTTP2, GRPC, ...: always HTTP; HTTP/1 or h2c by the preface.
    Http,
    /// HTTPS, TLS: TCP semantics with the ClientHello's server name.
    Tls,
    /// TCP, Mongo, `MySQL`, Redis, ...: TCP semantics, no waiting for the client.
    Tcp,
}

impl Expect {
    /// What a declared protocol (or none) means for detection.
    #[must_use]
    pub fn of(declared: Option<PortProtocol>) -> Self {
        match declared {
            None => Self::Sniff,
            Some(p) if p.is_http() => Self::Http,
            Some(p) if p.is_tls() => Self::Tls,
            Some(_) => Self::Tcp,
        }
    }
}

/// The outcome of detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    Protocol(Protocol),
    /// Nothing arrived before the detection timeout (undeclared port): maybe a protocol in
    /// which the server speaks first, maybe a slow client.
    Silent,
}

/// What the first bytes say so far.
#[derive(Debug, PartialEq, Eq)]
enum Guess {
    Done(Protocol),
    /// Need at least this many bytes.
    More(usize),
}

/// Largest prefix looked at: a TLS record (16 KiB) and its header. A request line still
/// undecided at this length is HTTP (hyper applies its own limits).
const MAX_PEEK: usize = 16 * 1024 + 5;

/// RFC 9110 5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_blank(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// How far a buffer fits the shape of an HTTP/1 request line.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// `method SP target SP HTTP/` seen.
    Http,
    /// Cannot be a request line.
    Not,
    /// Could still be one.
    Partial,
}

/// Matches `*(CR / LF / SP / HTAB) token 1*(SP / HTAB) target 1*(SP / HTAB) "HTTP/"`, where the
/// target is any run of bytes other than whitespace and control characters.
fn request_line(buf: &[u8]) -> Line {
    let mut i = 0;
    while i < buf.len() && matches!(buf[i], b'\r' | b'\n' | b' ' | b'\t') {
        i += 1;
    }
    let method = i;
    while i < buf.len() && is_tchar(buf[i]) {
        i += 1;
    }
    if i == buf.len() {
        return Line::Partial;
    }
    if i == method || !is_blank(buf[i]) {
        return Line::Not;
    }
    while i < buf.len() && is_blank(buf[i]) {
        i += 1;
    }
    let target = i;
    while i < buf.len() && buf[i] > b' ' && buf[i] != 0x7f {
        i += 1;
    }
    if i == buf.len() {
        return Line::Partial;
    }
    if i == target || !is_blank(buf[i]) {
        return Line::Not;
    }
    while i < buf.len() && is_blank(buf[i]) {
        i += 1;
    }
    let version = &buf[i..];
    let want = b"HTTP/";
    let n = version.len().min(want.len());
    if version[..n] != want[..n] {
        Line::Not
    } else if n == want.len() {
        Line::Http
    } else {
        Line::Partial
    }
}

/// Classifies a prefix of an undeclared port's stream.
fn classify(buf: &[u8]) -> Guess {
    if buf.is_empty() {
        return Guess::More(1);
    }
    if buf[0] == 0x16 {
        return tls(buf);
    }
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return if buf.len() >= H2_PREFACE.len() {
            Guess::Done(Protocol::H2c)
        } else {
            Guess::More(H2_PREFACE.len())
        };
    }
    match request_line(buf) {
        Line::Http => Guess::Done(Protocol::Http1),
        Line::Not => Guess::Done(Protocol::Tcp),
        Line::Partial if buf.len() >= MAX_PEEK => Guess::Done(Protocol::Http1),
        Line::Partial => Guess::More(buf.len() + 1),
    }
}

/// An undeclared port's bytes that stopped arriving before [`classify`] could decide: HTTP if
/// they could still be HTTP, TLS if they start a handshake record, else TCP.
fn settle(buf: &[u8]) -> Protocol {
    if buf.first() == Some(&0x16) && buf.get(1).is_none_or(|b| *b == 0x03) {
        return Protocol::Tls { sni: None };
    }
    if H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
        return Protocol::H2c;
    }
    match request_line(buf) {
        Line::Http | Line::Partial => Protocol::Http1,
        Line::Not => Protocol::Tcp,
    }
}

/// Classifies a prefix of a port declared HTTP: h2c when it is the preface, else HTTP/1 (which
/// answers 400 to bytes that are not HTTP).
fn classify_http(buf: &[u8]) -> Guess {
    if buf.is_empty() {
        return Guess::More(1);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] != H2_PREFACE[..n] {
        Guess::Done(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Guess::Done(Protocol::H2c)
    } else {
        Guess::More(H2_PREFACE.len())
    }
}

/// Classifies a prefix of a port declared TLS: the ClientHello's name, or TCP.
fn classify_tls(buf: &[u8]) -> Guess {
    match buf.first() {
        None => Guess::More(1),
        Some(0x16) => tls(buf),
        Some(_) => Guess::Done(Protocol::Tcp),
    }
}

/// A TLS handshake record holding a ClientHello: the server name, if any.
fn tls(buf: &[u8]) -> Guess {
    if buf.len() < 5 {
        return Guess::More(5);
    }
    if buf[1] != 0x03 {
        return Guess::Done(Protocol::Tcp);
    }
    let record_len = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    if buf.len() < 5 + record_len {
        return Guess::More(5 + record_len);
    }
    Guess::Done(Protocol::Tls {
        sni: client_hello_sni(&buf[5..5 + record_len]),
    })
}
/// Reads `server_name` from a ClientHello handshake message (RFC 8446 4.1.2, RFC 6066 3).
fn client_hello_sni(msg: &[u8]) -> Option<String> {
    let mut r = Reader(msg);
    if r.u8()? != 1 {
        return None; // not a ClientHello
    }
    let len = r.u24()?;
    let body = r.take(len)?;
    let mut r = Reader(body);
    r.take(2 + 32)?; // legacy_version, random
    let session = usize::from(r.u8()?);
    r.take(session)?;
    let suites = usize::from(r.u16()?);
    r.take(suites)?;
    let compression = usize::from(r.u8()?);
    r.take(compression)?;
    let extensions_len = usize::from(r.u16()?);
    let mut ext = Reader(r.take(extensions_len)?);
    while !ext.0.is_empty() {
        let kind = ext.u16()?;
        let len = usize::from(ext.u16()?);
        let data = ext.take(len)?;
        if kind != 0 {
            continue;
        }
        let mut names = Reader(data);
        let len = usize::from(names.u16()?);
        let list = names.take(len)?;
        let mut list = Reader(list);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let len = usize::from(list.u16()?);
            let name = list.take(len)?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
            }
        }
    }
    None
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

/// Peeks at the stream until the protocol is known, the client stops sending, or a timeout:
/// `first_byte` for the first byte (zero: as long as it takes, Istio's
/// `protocolDetectionTimeout: 0s`), then `rest` for the bytes that decide.
///
/// - [`Expect::Tcp`]: no peeking, TCP at once.
/// - [`Expect::Http`] and [`Expect::Tls`]: bytes that stop arriving are decided as they are
///   (HTTP/1, TCP); a client that sends nothing gets HTTP/1 (hyper's header read timeout) or
///   TCP.
/// - [`Expect::Sniff`]: bytes that stop arriving are decided by [`settle`]; nothing at all is
///   [`Detected::Silent`].
pub async fn detect(
    stream: &TcpStream,
    expect: Expect,
    first_byte: Duration,
    rest: Duration,
) -> std::io::Result<Detected> {
    let classify: fn(&[u8]) -> Guess = match expect {
        Expect::Tcp => return Ok(Detected::Protocol(Protocol::Tcp)),
        Expect::Http => classify_http,
        Expect::Tls => classify_tls,
        Expect::Sniff => classify,
    };
    let undecided = |buf: &[u8]| match expect {
        Expect::Sniff if buf.is_empty() => Detected::Silent,
        Expect::Sniff => Detected::Protocol(settle(buf)),
        Expect::Http => Detected::Protocol(Protocol::Http1),
        Expect::Tls | Expect::Tcp => Detected::Protocol(Protocol::Tcp),
    };
    let mut deadline = (!first_byte.is_zero()).then(|| tokio::time::Instant::now() + first_byte);
    let mut buf = vec![0u8; 64];
    let mut seen = 0;
    loop {
        let peek = stream.peek(&mut buf);
        let peeked = match deadline {
            None => peek.await?,
            Some(deadline) => match tokio::time::timeout_at(deadline, peek).await {
                Ok(result) => result?,
                Err(_) => return Ok(undecided(&buf[..seen])),
            },
        };
        if peeked == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if seen == 0 {
            // The first bytes are here: the rest of the decision is bounded by `rest`.
            let now = tokio::time::Instant::now();
            deadline = Some(deadline.map_or(now + rest, |d| d.max(now + rest)));
        }
        match classify(&buf[..peeked]) {
            Guess::Done(protocol) => return Ok(Detected::Protocol(protocol)),
            Guess::More(need) if need > MAX_PEEK => return Ok(undecided(&buf[..peeked])),
            Guess::More(need) => {
                if buf.len() < need {
                    buf.resize(need, 0);
                } else if peeked == seen {
                    // Nothing new arrived: wait a little before peeking again.
                    let nap = tokio::time::sleep(Duration::from_millis(5));
                    if let Some(deadline) = deadline {
                        if tokio::time::timeout_at(deadline, nap).await.is_err() {
                            return Ok(undecided(&buf[..peeked]));
                        }
                    }
                }
                seen = peeked;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_methods_and_preface() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n"),
            Guess::Done(Protocol::Http1)
        );
        assert_eq!(
            classify(b"PROPFIND / HTTP/1.1"),
            Guess::Done(Protocol::Http1)
        );
        assert_eq!(classify(b"GE"), Guess::More(3));
        assert_eq!(classify(H2_PREFACE), Guess::Done(Protocol::H2c));
        assert_eq!(classify(b"PRI * HTTP/2.0"), Guess::More(H2_PREFACE.len()));
        assert_eq!(classify(b"\x00\x01binary"), Guess::Done(Protocol::Tcp));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Guess::Done(Protocol::Tcp));
    }

    /// A minimal TLS 1.2 ClientHello with `server_name` `api.Example.test`.
    fn client_hello(name: &str) -> Vec<u8> {
        let name = name.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&u16::try_from(name.len() + 3).expect("short").to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&u16::try_from(name.len()).expect("short").to_be_bytes());
        sni.extend_from_slice(name);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&u16::try_from(sni.len()).expect("short").to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // compression
        body.extend_from_slice(&u16::try_from(ext.len()).expect("short").to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&u32::try_from(body.len()).expect("short").to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&u16::try_from(hs.len()).expect("short").to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn tls_client_hello_server_name() {
        let hello = client_hello("api.Example.test");
        assert_eq!(
            classify(&hello),
            Guess::Done(Protocol::Tls {
                sni: Some("api.example.test".into())
            })
        );
        assert_eq!(classify(&hello[..10]), Guess::More(hello.len()));
        let mut broken = hello.clone();
        broken[5] = 2; // not a ClientHello
        assert_eq!(classify(&broken), Guess::Done(Protocol::Tls { sni: None }));
    }
}
