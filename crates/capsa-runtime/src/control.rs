//! The control socket of a running sandbox: how `capsa ps`, `capsa exec`,
//! `capsa logs` and `capsa stop` reach the `capsa run` that owns it.
//!
//! Each sandbox's owner listens on the abstract Unix socket
//! `capsa/sandboxes/<id>`: abstract, so it vanishes with its owner and a
//! crashed `capsa run` leaves no stale entry; `capsa ps` lists sandboxes by
//! reading the kernel's table of them. Only root (or the owner's user) may
//! connect: the owner checks the peer's credentials. Agent calls are
//! forwarded as they are; the agent, not this socket, decides them.

use std::io::BufRead as _;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Arc;

use capsa_agent::protocol::{self, Call, Failure, FailureKind, Reply};
use serde::{Deserialize, Serialize};

use crate::client::{AgentClient, CallError};

const PREFIX: &str = "capsa/sandboxes/";

/// What `capsa ps` shows about a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxInfo {
    /// The sandbox id.
    pub id: String,
    /// The PID of its owner (`capsa run`).
    pub owner_pid: u32,
    /// The PID of its QEMU.
    pub qemu_pid: u32,
    /// When it was launched (Unix seconds).
    pub started: u64,
    /// Its containers.
    pub containers: Vec<String>,
    /// SHA-256 of the policy document in force (hex).
    pub policy_sha256: String,
    /// MEASUREMENT as launched (hex).
    pub measurement: String,
}

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "control", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Describe the sandbox.
    Info,
    /// Forward a call to the agent.
    Agent {
        /// The call.
        call: Call,
    },
    /// Stop the sandbox.
    Stop,
}

/// The answer on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "control", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlResponse {
    /// The description.
    Info(SandboxInfo),
    /// The agent's answer (its payload follows in the frame).
    Agent {
        /// The outcome.
        result: Result<Reply, Failure>,
    },
    /// The sandbox is stopping.
    Stopping,
}

/// Why the control socket could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No sandbox with that id is running.
    #[error("no running sandbox {0:?} (see `capsa ps`)")]
    NotRunning(String),
    /// The socket failed.
    #[error("sandbox {id}: control socket: {reason}")]
    Socket {
        /// The sandbox.
        id: String,
        /// What went wrong.
        reason: String,
    },
}

fn addr(id: &str) -> std::io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("{PREFIX}{id}").as_bytes())
}

/// Listens for control connections of sandbox `id`; `stop` is called when
/// a client asks for a stop. Returns once listening; serves on threads.
pub fn serve(
    info: SandboxInfo,
    client: Arc<AgentClient>,
    stop: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), ControlError> {
    let id = info.id.clone();
    let socket_err = |e: std::io::Error| ControlError::Socket { id: id.clone(), reason: e.to_string() };
    let listener = UnixListener::bind_addr(&addr(&info.id).map_err(socket_err)?).map_err(socket_err)?;
    let info = Arc::new(info);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (info, client, stop) = (Arc::clone(&info), Arc::clone(&client), Arc::clone(&stop));
            std::thread::spawn(move || serve_one(stream, &info, &client, &*stop));
        }
    });
    Ok(())
}

fn peer_allowed(stream: &UnixStream) -> bool {
    let Ok(peer) = rustix::net::sockopt::socket_peercred(stream) else { return false };
    let ours = rustix::process::geteuid();
    peer.uid.is_root() || peer.uid == ours
}

fn serve_one(mut stream: UnixStream, info: &SandboxInfo, client: &AgentClient, stop: &(dyn Fn() + Send + Sync)) {
    if !peer_allowed(&stream) {
        return;
    }
    while let Ok(frame) = protocol::read_frame::<ControlRequest>(&mut stream) {
        let (response, payload) = match frame.header {
            ControlRequest::Info => (ControlResponse::Info(info.clone()), Vec::new()),
            ControlRequest::Agent { call } => match client.call(call, &frame.payload) {
                Ok((reply, payload)) => (ControlResponse::Agent { result: Ok(reply) }, payload),
                Err(CallError::Failed { failure, .. }) => (ControlResponse::Agent { result: Err(failure) }, Vec::new()),
                Err(e) => (
                    ControlResponse::Agent { result: Err(Failure::new(FailureKind::Internal, e.to_string())) },
                    Vec::new(),
                ),
            },
            ControlRequest::Stop => {
                stop();
                (ControlResponse::Stopping, Vec::new())
            }
        };
        if protocol::write_frame(&mut stream, &response, &payload).is_err() {
            return;
        }
    }
}

/// A connection to a running sandbox's owner.
#[derive(Debug)]
pub struct ControlClient {
    id: String,
    stream: UnixStream,
}

impl ControlClient {
    /// Connects to sandbox `id`.
    pub fn connect(id: &str) -> Result<Self, ControlError> {
        let address = addr(id).map_err(|e| ControlError::Socket { id: id.to_owned(), reason: e.to_string() })?;
        let stream = UnixStream::connect_addr(&address).map_err(|_| ControlError::NotRunning(id.to_owned()))?;
        Ok(Self { id: id.to_owned(), stream })
    }

    /// Sends one request and reads its answer.
    pub fn request(
        &mut self,
        request: &ControlRequest,
        payload: &[u8],
    ) -> Result<(ControlResponse, Vec<u8>), ControlError> {
        let socket_err = |e: protocol::FrameError| ControlError::Socket { id: self.id.clone(), reason: e.to_string() };
        protocol::write_frame(&mut self.stream, request, payload).map_err(socket_err)?;
        let frame = protocol::read_frame::<ControlResponse>(&mut self.stream).map_err(socket_err)?;
        Ok((frame.header, frame.payload))
    }

    /// The sandbox's description.
    pub fn info(&mut self) -> Result<SandboxInfo, ControlError> {
        match self.request(&ControlRequest::Info, &[])? {
            (ControlResponse::Info(info), _) => Ok(info),
            (other, _) => {
                Err(ControlError::Socket { id: self.id.clone(), reason: format!("unexpected answer {other:?}") })
            }
        }
    }

    /// Forwards a call to the agent.
    pub fn call(&mut self, call: Call, payload: &[u8]) -> Result<Result<(Reply, Vec<u8>), Failure>, ControlError> {
        match self.request(&ControlRequest::Agent { call }, payload)? {
            (ControlResponse::Agent { result: Ok(reply) }, payload) => Ok(Ok((reply, payload))),
            (ControlResponse::Agent { result: Err(failure) }, _) => Ok(Err(failure)),
            (other, _) => {
                Err(ControlError::Socket { id: self.id.clone(), reason: format!("unexpected answer {other:?}") })
            }
        }
    }
}

/// The ids of running sandboxes, from the kernel's list of abstract Unix
/// sockets (`/proc/net/unix`), sorted.
pub fn running() -> Vec<String> {
    let Ok(file) = std::fs::File::open("/proc/net/unix") else { return Vec::new() };
    let needle = format!("@{PREFIX}");
    let mut ids: Vec<String> = std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let path = line.split_whitespace().nth(7)?;
            let id = path.strip_prefix(&needle)?;
            crate::sandbox::valid_id(id).then(|| id.to_owned())
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}
