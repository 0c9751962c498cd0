//! The operator side of the admin API: `nodeward status` and `nodeward check --admin` ask a
//! running agent over plain HTTP/1.1 (the admin server listens on loopback by default). One
//! request per connection, bounded in time.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Time allowed to connect to the agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Time allowed for the whole answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the agent answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    /// The body (UTF-8; anything else replaced).
    pub body: String,
}

impl Answer {
    /// A response header as text, when present and readable.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Why the agent could not be asked; commands exit 2 with the message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing accepts connections at the address, or it does not resolve.
    #[error("no nodeward agent answers on {addr} (is `nodeward run` running? --admin): {source}")]
    NoAgent {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The agent accepted the connection but did not answer in time.
    #[error("the agent at {addr} did not answer within {} s", timeout.as_secs())]
    Timeout { addr: String, timeout: Duration },
    /// The HTTP exchange failed (the peer is not a nodeward admin server, or closed).
    #[error("talking to the agent at {addr}: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    /// The runtime for the request could not start.
    #[error("starting the runtime for the admin request: {0}")]
    Runtime(#[source] io::Error),
}

/// `GET path` on the agent at `addr` (`host:port`).
pub fn get(addr: &str, path: &'static str) -> Result<Answer, ClientError> {
    request(addr, Method::GET, path, Bytes::new())
}

/// `POST path` with a JSON body on the agent at `addr` (`host:port`).
pub fn post_json(addr: &str, path: &'static str, body: String) -> Result<Answer, ClientError> {
    request(addr, Method::POST, path, Bytes::from(body))
}

fn request(
    addr: &str,
    method: Method,
    path: &'static str,
    body: Bytes,
) -> Result<Answer, ClientError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    runtime.block_on(exchange(addr, method, path, body))
}

async fn exchange(
    addr: &str,
    method: Method,
    path: &'static str,
    body: Bytes,
) -> Result<Answer, ClientError> {
    let no_agent = |source| ClientError::NoAgent {
        addr: addr.to_owned(),
        source,
    };
    let http = |source| ClientError::Http {
        addr: addr.to_owned(),
        source,
    };
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(no_agent(e)),
        Err(_) => {
            return Err(no_agent(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()),
            )))
        }
    };
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = Uri::from_static(path);
    request.headers_mut().insert(
        HOST,
        HeaderValue::from_str(addr).unwrap_or(HeaderValue::from_static("localhost")),
    );
    request
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let driver = tokio::spawn(connection);
        let response = sender.send_request(request).await.map_err(http)?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(http)?.to_bytes();
        driver.abort();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(ANSWER_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(ClientError::Timeout {
                addr: addr.to_owned(),
                timeout: ANSWER_TIMEOUT,
            })
        })
}
