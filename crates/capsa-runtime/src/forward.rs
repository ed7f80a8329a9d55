//! The host's end of the forwarding port: connections the guest opens to
//! the trust-service endpoints its initdata names, and to nothing else.
//!
//! The host relays bytes; it cannot read them when the guest speaks TLS to
//! the endpoint, and the key broker wraps every released key to a key that
//! never leaves the guest. A [`Tap`] records every byte that crosses, for
//! tests that check exactly that.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use capsa_agent::protocol::{self, Forward};

/// Every byte relayed in either direction, in order.
pub type Tap = Arc<Mutex<Vec<u8>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const CHUNK: usize = 64 << 10;

/// Serves the forwarding port on `channel` (QEMU's connection), opening
/// only `allowed` endpoints (`host:port`).
pub fn serve(channel: UnixStream, allowed: Vec<String>, tap: Option<Tap>) {
    std::thread::spawn(move || {
        let Ok(writer) = channel.try_clone() else { return };
        let writer = Arc::new(Mutex::new(writer));
        let mut reader = channel;
        let mut sockets: HashMap<u64, TcpStream> = HashMap::new();
        loop {
            let Ok(frame) = protocol::read_frame::<Forward>(&mut reader) else { return };
            match frame.header {
                Forward::Open { stream, endpoint } => {
                    let answer = if allowed.contains(&endpoint) {
                        connect(&endpoint)
                    } else {
                        Err(format!(
                            "{endpoint} is not a trust-service endpoint named in the sandbox's initdata; the host forwards only those"
                        ))
                    };
                    match answer {
                        Ok(socket) => {
                            let Ok(from_endpoint) = socket.try_clone() else { continue };
                            sockets.insert(stream, socket);
                            send(&writer, &Forward::Opened { stream }, &[]);
                            copy_out(from_endpoint, stream, Arc::clone(&writer), tap.clone());
                        }
                        Err(error) => send(&writer, &Forward::Close { stream, error: Some(error) }, &[]),
                    }
                }
                Forward::Data { stream } => {
                    if let Some(tap) = &tap {
                        lock(tap).extend_from_slice(&frame.payload);
                    }
                    let failed = sockets.get_mut(&stream).is_some_and(|s| s.write_all(&frame.payload).is_err());
                    if failed {
                        sockets.remove(&stream);
                        send(&writer, &Forward::Close { stream, error: Some("the endpoint closed".into()) }, &[]);
                    }
                }
                Forward::Close { stream, .. } => {
                    if let Some(socket) = sockets.remove(&stream) {
                        let _ = socket.shutdown(Shutdown::Write);
                    }
                }
                Forward::Opened { .. } => {}
            }
        }
    });
}

fn connect(endpoint: &str) -> Result<TcpStream, String> {
    let addrs = endpoint.to_socket_addrs().map_err(|e| format!("cannot resolve {endpoint}: {e}"))?;
    let mut last = format!("{endpoint} resolves to no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(socket) => return Ok(socket),
            Err(e) => last = format!("cannot connect to {endpoint} ({addr}): {e}"),
        }
    }
    Err(last)
}

fn send(writer: &Mutex<UnixStream>, message: &Forward, payload: &[u8]) {
    let _ = protocol::write_frame(&mut *lock(writer), message, payload);
}

/// Endpoint bytes to the guest, then a close.
fn copy_out(mut socket: TcpStream, stream: u64, writer: Arc<Mutex<UnixStream>>, tap: Option<Tap>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match socket.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = buf.get(..n).unwrap_or_default();
            if let Some(tap) = &tap {
                lock(tap).extend_from_slice(chunk);
            }
            send(&writer, &Forward::Data { stream }, chunk);
        }
        send(&writer, &Forward::Close { stream, error: None }, &[]);
    });
}
