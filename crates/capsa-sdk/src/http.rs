//! One HTTP exchange with the workload API over loopback.
//!
//! A minimal client over `std::net` rather than ureq: ureq keeps answers in
//! buffers of its own that are never zeroized, and a released key passes
//! through them. Here the whole answer lands in one buffer allocated once
//! and zeroized on drop.
//!
//! Requests are HTTP/1.0, so that the server delimits its answer by closing
//! the connection and never by chunks: Go's net/http, which the Azure
//! sidecar runs on, chunks answers over 2 KiB to HTTP/1.1 clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::client::ClientError;

/// The largest answer read: evidence in hex and tokens are tens of KiB.
pub(crate) const MAX_ANSWER: usize = 1 << 20;
/// How many answer headers are parsed.
const MAX_HEADERS: usize = 32;

/// An answer: its status and body.
pub(crate) struct Answer {
    pub(crate) status: u16,
    /// The whole answer as received; the body is `bytes[body_start..]`.
    bytes: Zeroizing<Vec<u8>>,
    body_start: usize,
}

impl Answer {
    pub(crate) fn body(&self) -> &[u8] {
        self.bytes.get(self.body_start..).unwrap_or_default()
    }
}

/// Sends one request to `addr` and reads the whole answer.
pub(crate) fn exchange(
    addr: &str,
    timeouts: (Duration, Duration),
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<Answer, ClientError> {
    let (connect_timeout, io_timeout) = timeouts;
    let mut stream = connect(addr, connect_timeout)?;
    let io = |source| ClientError::Io { addr: addr.to_owned(), source };
    stream.set_read_timeout(Some(io_timeout)).map_err(io)?;
    stream.set_write_timeout(Some(io_timeout)).map_err(io)?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(body).map_err(io)?;
    stream.flush().map_err(io)?;

    // Allocated once at its limit so that no reallocation leaves a copy of
    // a released key behind.
    let mut bytes = Zeroizing::new(vec![0_u8; MAX_ANSWER]);
    let mut filled = 0;
    loop {
        let Some(free) = bytes.get_mut(filled..).filter(|free| !free.is_empty()) else {
            return Err(ClientError::Answer(format!("the answer exceeds {MAX_ANSWER} bytes")));
        };
        match stream.read(free) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    bytes.truncate(filled);
    parse(bytes)
}

fn connect(addr: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let unreachable = |source| ClientError::Connect { addr: addr.to_owned(), source };
    let candidates: Vec<SocketAddr> = addr.to_socket_addrs().map_err(unreachable)?.collect();
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolves to nothing");
    for candidate in candidates {
        match TcpStream::connect_timeout(&candidate, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(unreachable(last))
}

fn parse(bytes: Zeroizing<Vec<u8>>) -> Result<Answer, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let body_start = match response.parse(&bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ClientError::Answer("the answer ended inside its headers".into())),
        Err(e) => return Err(ClientError::Answer(format!("the answer is not http: {e}"))),
    };
    let status = response.code.unwrap_or_default();
    let mut content_length = None;
    for header in response.headers.iter() {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ClientError::Answer("the answer is chunked, which an http/1.0 request forbids".into()));
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse::<usize>().ok());
            content_length = Some(length.ok_or_else(|| ClientError::Answer("bad content-length".into()))?);
        }
    }
    let received = bytes.len() - body_start;
    if let Some(length) = content_length {
        if length != received {
            return Err(ClientError::Answer(format!("the answer declared {length} body bytes and sent {received}")));
        }
    }
    Ok(Answer { status, bytes, body_start })
}
