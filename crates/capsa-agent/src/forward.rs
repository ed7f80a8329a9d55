//! The guest's way out to its trust services: a local port per endpoint the
//! initdata names, each connection carried over the `capsa.fwd` port.
//!
//! A sandbox has no network of its own. The agent listens on 127.0.0.1 for
//! each trust-service endpoint, and every connection accepted there becomes
//! a stream on the forwarding port, which the launcher connects to that
//! endpoint and nothing else. Clients in the guest keep the endpoint's real
//! name for TLS (they resolve it to the local port), so TLS terminates in
//! the guest and the host relays bytes it cannot read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::protocol::{self, Forward};

/// How long the host may take to open a connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);
/// The largest chunk one data frame carries.
const CHUNK: usize = 64 << 10;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct StreamState {
    /// The guest-side connection, for bytes from the host.
    socket: TcpStream,
    /// Told once the host answered `open`.
    opened: Option<Sender<Result<(), String>>>,
}

struct Shared {
    port: Mutex<File>,
    streams: Mutex<HashMap<u64, StreamState>>,
    next: AtomicU64,
}

impl Shared {
    fn send(&self, message: &Forward, payload: &[u8]) -> io::Result<()> {
        protocol::write_frame(&mut *lock(&self.port), message, payload).map_err(|e| io::Error::other(e.to_string()))
    }
}

/// The local ports, by endpoint (`host:port`).
#[derive(Debug, Clone, Default)]
pub struct Forwarder {
    local: HashMap<String, SocketAddr>,
}

impl Forwarder {
    /// Opens a local listener for each endpoint and starts relaying over the
    /// forwarding port at `port` (its device node).
    pub fn start(port: &std::path::Path, endpoints: &[String]) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new().read(true).write(true).open(port)?;
        let reader = file.try_clone()?;
        let shared =
            Arc::new(Shared { port: Mutex::new(file), streams: Mutex::new(HashMap::new()), next: AtomicU64::new(1) });
        let from_host = Arc::clone(&shared);
        std::thread::Builder::new().name("forward-in".into()).spawn(move || read_host(reader, &from_host))?;
        let mut local = HashMap::new();
        for endpoint in endpoints {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            local.insert(endpoint.clone(), listener.local_addr()?);
            let (shared, endpoint) = (Arc::clone(&shared), endpoint.clone());
            std::thread::Builder::new().name("forward-accept".into()).spawn(move || {
                for socket in listener.incoming().flatten() {
                    let (shared, endpoint) = (Arc::clone(&shared), endpoint.clone());
                    std::thread::spawn(move || {
                        if let Err(e) = relay(&shared, &endpoint, socket) {
                            eprintln!("capsa-agent: forwarding to {endpoint}: {e}");
                        }
                    });
                }
            })?;
        }
        Ok(Self { local })
    }

    /// The local address that reaches `endpoint` (`host:port`), if the
    /// initdata names it.
    pub fn local(&self, endpoint: &str) -> Option<SocketAddr> {
        self.local.get(endpoint).copied()
    }
}

/// One accepted connection: open the stream, then copy guest bytes out.
fn relay(shared: &Shared, endpoint: &str, mut socket: TcpStream) -> io::Result<()> {
    let stream = shared.next.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = channel();
    lock(&shared.streams).insert(stream, StreamState { socket: socket.try_clone()?, opened: Some(tx) });
    shared.send(&Forward::Open { stream, endpoint: endpoint.to_owned() }, &[])?;
    let opened = rx.recv_timeout(OPEN_TIMEOUT).unwrap_or_else(|_| Err("the host did not answer".into()));
    if let Err(reason) = opened {
        lock(&shared.streams).remove(&stream);
        return Err(io::Error::other(format!("the host could not open the connection: {reason}")));
    }
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        shared.send(&Forward::Data { stream }, buf.get(..n).unwrap_or_default())?;
    }
    shared.send(&Forward::Close { stream, error: None }, &[])
}

/// Bytes and answers from the host, to the streams they belong to.
fn read_host(mut port: File, shared: &Shared) {
    loop {
        let frame = match protocol::read_frame::<Forward>(&mut port) {
            Ok(frame) => frame,
            Err(e) => {
                eprintln!("capsa-agent: the forwarding port failed: {e}");
                return;
            }
        };
        let mut streams = lock(&shared.streams);
        match frame.header {
            Forward::Opened { stream } => {
                if let Some(tx) = streams.get_mut(&stream).and_then(|s| s.opened.take()) {
                    let _ = tx.send(Ok(()));
                }
            }
            Forward::Data { stream } => {
                let failed = match streams.get_mut(&stream) {
                    Some(state) => state.socket.write_all(&frame.payload).is_err(),
                    None => false,
                };
                if failed {
                    streams.remove(&stream);
                }
            }
            Forward::Close { stream, error } => {
                if let Some(mut state) = streams.remove(&stream) {
                    match state.opened.take() {
                        Some(tx) => {
                            let _ = tx.send(Err(error.unwrap_or_else(|| "closed".into())));
                        }
                        None => {
                            let _ = state.socket.shutdown(Shutdown::Write);
                        }
                    }
                }
            }
            Forward::Open { .. } => {
                eprintln!("capsa-agent: the host tried to open a connection into the guest; ignored")
            }
        }
    }
}
