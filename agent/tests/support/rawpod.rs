//! A pod that records the exact bytes it receives, per connection, for tests that must prove
//! what reached the pod (nothing, or only what was judged). It answers like a permissive HTTP
//! server: 200 to every request it can frame (`Content-Length` or chunked), `101` to ANY
//! upgrade offer followed by an echo of everything after it (the worst pod to smuggle through),
//! or, in banner mode, speaks first and echoes (a server-first protocol).
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::node::POD;

#[derive(Clone)]
pub struct RawPod {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawPod {
    /// An HTTP pod on [`POD`].
    pub async fn http() -> Self {
        Self::start(None).await
    }

    /// A pod that sends `banner` as soon as a connection opens, then echoes.
    pub async fn server_first(banner: &'static [u8]) -> Self {
        Self::start(Some(banner)).await
    }

    async fn start(banner: Option<&'static [u8]>) -> Self {
        let listener = TcpListener::bind((POD, 0)).await.expect("bind pod");
        let addr = listener.local_addr().expect("addr");
        let log: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let record = log.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let index = {
                    let mut log = record.lock().expect("lock");
                    log.push(Vec::new());
                    log.len() - 1
                };
                tokio::spawn(serve(stream, record.clone(), index, banner));
            }
        });
        Self { addr, log }
    }

    /// Connections the pod accepted.
    pub fn connections(&self) -> usize {
        self.log.lock().expect("lock").len()
    }

    /// Every byte received, all connections in order of opening.
    pub fn received(&self) -> String {
        let log = self.log.lock().expect("lock");
        String::from_utf8_lossy(&log.concat()).into_owned()
    }

    /// The request lines received (lines that end in ` HTTP/1.x`).
    pub fn request_lines(&self) -> Vec<String> {
        self.received()
            .split("\r\n")
            .filter(|l| l.ends_with(" HTTP/1.1") || l.ends_with(" HTTP/1.0"))
            .map(str::to_owned)
            .collect()
    }
}

async fn serve(
    mut stream: TcpStream,
    log: Arc<Mutex<Vec<Vec<u8>>>>,
    index: usize,
    banner: Option<&'static [u8]>,
) {
    let mut echo = false;
    if let Some(banner) = banner {
        if stream.write_all(banner).await.is_err() {
            return;
        }
        echo = true;
    }
    let mut pending = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        log.lock().expect("lock")[index].extend_from_slice(&buf[..n]);
        if echo {
            if stream.write_all(&buf[..n]).await.is_err() {
                return;
            }
            continue;
        }
        pending.extend_from_slice(&buf[..n]);
        loop {
            match frame(&pending) {
                Framed::Partial => break,
                Framed::Bad => {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .await;
                    return;
                }
                Framed::Request { len, upgrade } => {
                    pending.drain(..len);
                    let answer = match &upgrade {
                        Some(protocol) => format!(
                            "HTTP/1.1 101 Switching Protocols\r\nupgrade: {protocol}\r\nconnection: upgrade\r\n\r\n"
                        ),
                        None => "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\npod".to_owned(),
                    };
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if upgrade.is_some() {
                        echo = true;
                        if !pending.is_empty() && stream.write_all(&pending).await.is_err() {
                            return;
                        }
                        pending.clear();
                        break;
                    }
                }
            }
        }
    }
}

enum Framed {
    Partial,
    Bad,
    /// A whole request of `len` bytes; `upgrade` when it offered one (with `Connection: upgrade`).
    Request {
        len: usize,
        upgrade: Option<String>,
    },
}

fn frame(buf: &[u8]) -> Framed {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Framed::Partial,
        Err(_) => return Framed::Bad,
    };
    let value = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    let upgrade = value("upgrade").filter(|_| {
        value("connection").is_some_and(|c| c.to_ascii_lowercase().contains("upgrade"))
    });
    if upgrade.is_some() {
        return Framed::Request { len: head, upgrade };
    }
    if value("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        let mut at = head;
        loop {
            let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
                return Framed::Partial;
            };
            let line = String::from_utf8_lossy(&buf[at..at + eol]);
            let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            else {
                return Framed::Bad;
            };
            at += eol + 2;
            if size == 0 {
                // No trailers in these tests: the final CRLF.
                return if buf.len() >= at + 2 {
                    Framed::Request {
                        len: at + 2,
                        upgrade: None,
                    }
                } else {
                    Framed::Partial
                };
            }
            if buf.len() < at + size + 2 {
                return Framed::Partial;
            }
            at += size + 2;
        }
    }
    let length = value("content-length").map_or(Some(0), |v| v.parse::<usize>().ok());
    match length {
        None => Framed::Bad,
        Some(n) if buf.len() >= head + n => Framed::Request {
            len: head + n,
            upgrade: None,
        },
        Some(_) => Framed::Partial,
    }
}
