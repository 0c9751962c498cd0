//! What a steered connection speaks, from its first bytes, without consuming them (`peek`):
//! HTTP/1.x (a method token and a space), HTTP/2 with prior knowledge (the connection
//! preface), TLS (a handshake record; the ClientHello's server name is read for
//! `connection.sni`), or anything else (plain TCP).

use std::time::Duration;

use tokio::net::TcpStream;

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
    /// Anything else, including a client that sent nothing before the detection timeout.
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

/// What the first bytes say so far.
#[derive(Debug, PartialEq, Eq)]
enum Guess {
    Done(Protocol),
    /// Need at least this many bytes.
    More(usize),
}

/// Classifies a prefix of the stream.
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
    // An HTTP/1 request line starts with a method token (RFC 9110 tchar) and a space.
    let is_tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    match buf.iter().position(|&b| !is_tchar(b)) {
        Some(0) => Guess::Done(Protocol::Tcp),
        Some(i) if buf[i] == b' ' => Guess::Done(Protocol::Http1),
        Some(_) => Guess::Done(Protocol::Tcp),
        // Methods are short; a longer token is not HTTP.
        None if buf.len() >= 24 => Guess::Done(Protocol::Tcp),
        None => Guess::More(buf.len() + 1),
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

/// Largest prefix looked at: a TLS record (16 KiB) and its header.
const MAX_PEEK: usize = 16 * 1024 + 5;

/// Peeks at the stream until the protocol is known, the client stops sending, or `timeout`.
pub async fn detect(stream: &TcpStream, timeout: Duration) -> std::io::Result<Protocol> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; 64];
    let mut seen = 0;
    loop {
        let peeked = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(result) => result?,
            Err(_) => return Ok(Protocol::Tcp),
        };
        if peeked == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match classify(&buf[..peeked]) {
            Guess::Done(protocol) => return Ok(protocol),
            Guess::More(need) if need > MAX_PEEK => return Ok(Protocol::Tcp),
            Guess::More(need) => {
                if buf.len() < need {
                    buf.resize(need, 0);
                } else if peeked == seen {
                    // Nothing new arrived: wait a little before peeking again.
                    if tokio::time::timeout_at(
                        deadline,
                        tokio::time::sleep(Duration::from_millis(5)),
                    )
                    .await
                    .is_err()
                    {
                        return Ok(Protocol::Tcp);
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
