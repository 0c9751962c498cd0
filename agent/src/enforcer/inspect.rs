//! Request smuggling guard for HTTP/1.1: hyper accepts a request with both
//! `Transfer-Encoding` and `Content-Length` (it drops the length and closes afterwards), but a
//! proxy must refuse it (RFC 9112 6.3: "ought to be handled as an error"). This reader sits
//! under hyper, frames the byte stream the way hyper does (heads with `httparse`, bodies by
//! length or chunks) and records, per request head, whether it carried that conflict; the
//! service answers 400 for such a request. It never changes the bytes.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::decision::upgrade::{self, Upgrade};

/// Heads longer than this are left to hyper's own limit; inspection stops.
const MAX_HEAD: usize = 128 * 1024;
const MAX_HEADERS: usize = 256;

/// One flag per request head, in order, shared between the reader and the service.
#[derive(Debug, Clone, Default)]
pub struct HeadFlags(Arc<Mutex<VecDeque<bool>>>);

impl HeadFlags {
    fn push(&self, conflict: bool) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(conflict);
    }

    /// Whether the next request (in arrival order) had both `Transfer-Encoding` and
    /// `Content-Length`.
    #[must_use]
    pub fn next_request_conflicts(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
            .unwrap_or(false)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head, line by line.
    Head,
    /// Skipping a body of known length.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until an empty one.
    Trailers,
    /// Not HTTP framing any more (upgrade, CONNECT, or something hyper will refuse).
    Off,
}

/// The framer.
#[derive(Debug)]
struct Framer {
    state: State,
    /// The current line (up to its `\n`).
    line: Vec<u8>,
    /// The current head's lines.
    head: Vec<u8>,
    flags: HeadFlags,
}

impl Framer {
    fn new(flags: HeadFlags) -> Self {
        Self {
            state: State::Head,
            line: Vec::new(),
            head: Vec::new(),
            flags,
        }
    }

    fn feed(&mut self, input: &[u8]) {
        let mut i = 0;
        while i < input.len() {
            match self.state {
                State::Off => return,
                State::Body(left) | State::ChunkData(left) => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    i += n;
                    let left = left - n as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), l) => State::Body(l),
                        // Chunk data is followed by CRLF, read as a line before the next size.
                        (_, 0) => State::ChunkSize,
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let rest = &input[i..];
                    match rest.iter().position(|b| *b == b'\n') {
                        None => {
                            self.line.extend_from_slice(rest);
                            if self.line.len() + self.head.len() > MAX_HEAD {
                                self.state = State::Off;
                            }
                            return;
                        }
                        Some(p) => {
                            self.line.extend_from_slice(&rest[..=p]);
                            i += p + 1;
                            let line = std::mem::take(&mut self.line);
                            self.line_done(&line);
                        }
                    }
                }
            }
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let empty = line == b"\r\n" || line == b"\n";
        match self.state {
            State::Head if empty && self.head.is_empty() => {} // tolerated before a request line
            State::Head if empty => {
                self.head.extend_from_slice(line);
                let head = std::mem::take(&mut self.head);
                self.state = self.on_head(&head);
            }
            State::Head => {
                self.head.extend_from_slice(line);
                if self.head.len() > MAX_HEAD {
                    self.state = State::Off;
                }
            }
            // The CRLF that ends chunk data.
            State::ChunkSize if empty => {}
            State::ChunkSize => {
                let text = std::str::from_utf8(line).unwrap_or_default();
                let size = text
                    .split(';')
                    .next()
                    .map(str::trim)
                    .and_then(|s| u64::from_str_radix(s, 16).ok());
                self.state = match size {
                    None => State::Off,
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                };
            }
            State::Trailers if empty => self.state = State::Head,
            _ => {}
        }
    }

    /// A complete head: record its flag and pick the body framing.
    fn on_head(&self, head: &[u8]) -> State {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = req.parse(head) else {
            return State::Off;
        };
        let mut te = None;
        let mut lengths = Vec::new();
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = Some(h.value);
            } else if h.name.eq_ignore_ascii_case("content-length") {
                lengths.push(h.value);
            }
        }
        self.flags.push(te.is_some() && !lengths.is_empty());
        // Where the service ends HTTP on this connection (a WebSocket splice, or a refused
        // upgrade or CONNECT answered and closed), framing stops; an h2c offer is removed and
        // the connection goes on as HTTP/1.1.
        let upgrade = upgrade::classify(
            req.method.unwrap_or_default().as_bytes(),
            req.version == Some(1),
            req.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
        );
        if matches!(upgrade, Upgrade::WebSocket | Upgrade::Refused(_)) {
            return State::Off;
        }
        if let Some(value) = te {
            return if value
                .trim_ascii()
                .to_ascii_lowercase()
                .ends_with(b"chunked")
            {
                State::ChunkSize
            } else {
                State::Off
            };
        }
        let parsed: Option<Vec<u64>> = lengths
            .iter()
            .map(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|v| v.trim().parse().ok())
            })
            .collect();
        match parsed.as_deref() {
            Some([] | [0]) => State::Head,
            Some([n]) => State::Body(*n),
            // Several or malformed lengths: hyper answers 400 and closes.
            _ => State::Off,
        }
    }
}

/// A reader that watches request framing; writes pass through.
#[derive(Debug)]
pub struct Inspect<T> {
    inner: T,
    framer: Option<Framer>,
}

impl<T> Inspect<T> {
    /// `active` false (HTTP/2): bytes pass untouched and nothing is recorded.
    pub fn new(inner: T, flags: HeadFlags, active: bool) -> Self {
        Self {
            inner,
            framer: active.then(|| Framer::new(flags)),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Inspect<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(framer)) = (&result, self.framer.as_mut()) {
            framer.feed(&buf.filled()[before..]);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Inspect<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_of(chunks: &[&[u8]]) -> Vec<bool> {
        let flags = HeadFlags::default();
        let mut framer = Framer::new(flags.clone());
        for c in chunks {
            framer.feed(c);
        }
        let v: Vec<bool> = flags.0.lock().expect("lock").iter().copied().collect();
        v
    }

    #[test]
    fn plain_requests_are_not_flagged() {
        assert_eq!(
            flags_of(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"]),
            [false, false]
        );
    }

    #[test]
    fn bodies_are_skipped_even_when_they_look_like_heads() {
        let body = b"GET /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        let head = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        assert_eq!(
            flags_of(&[head.as_bytes(), body, b"GET / HTTP/1.1\r\n\r\n"]),
            [false, false]
        );
        let chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        assert_eq!(flags_of(&[chunked]), [false, false]);
    }

    #[test]
    fn transfer_encoding_with_content_length_is_flagged_in_either_order() {
        assert_eq!(flags_of(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"]), [true]);
        assert_eq!(flags_of(&[b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n"]), [true]);
    }

    #[test]
    fn framing_goes_on_after_an_h2c_offer_and_stops_at_websocket() {
        // The h2c offer is stripped and the connection stays HTTP/1.1: the next head is read.
        let h2c = b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(flags_of(&[h2c]), [false, true]);
        // After a WebSocket offer the bytes may be frames: nothing more is read as heads.
        let ws = b"GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(flags_of(&[ws]), [false]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes in arbitrary pieces never panic.
        #[test]
        fn any_bytes_any_split(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            split in 1usize..64,
        ) {
            let pieces: Vec<&[u8]> = bytes.chunks(split).collect();
            let _ = flags_of(&pieces);
        }

        /// A stream of well-formed requests (bodies by length or chunks, some with the
        /// CL+TE conflict) yields one flag per request, the same however it is split.
        #[test]
        fn flags_do_not_depend_on_how_bytes_arrive(
            requests in proptest::collection::vec((0usize..3, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40)), 1..8),
            split in 1usize..32,
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (kind, body) in &requests {
                match kind {
                    0 => {
                        stream.extend_from_slice(format!("POST /l HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes());
                        stream.extend_from_slice(body);
                        expected.push(false);
                    }
                    1 => {
                        stream.extend_from_slice(b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
                        if !body.is_empty() {
                            stream.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                            stream.extend_from_slice(body);
                            stream.extend_from_slice(b"\r\n");
                        }
                        stream.extend_from_slice(b"0\r\n\r\n");
                        expected.push(false);
                    }
                    _ => {
                        stream.extend_from_slice(b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n");
                        expected.push(true);
                    }
                }
            }
            let whole = flags_of(&[&stream]);
            let pieces: Vec<&[u8]> = stream.chunks(split).collect();
            proptest::prop_assert_eq!(&whole, &expected);
            proptest::prop_assert_eq!(flags_of(&pieces), expected);
        }
    }

    #[test]
    fn bytes_split_anywhere() {
        let stream = b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nokGET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n";
        let single: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(flags_of(&single), [false, true]);
        let sevens: Vec<&[u8]> = stream.chunks(7).collect();
        assert_eq!(flags_of(&sevens), [false, true]);
    }
}
