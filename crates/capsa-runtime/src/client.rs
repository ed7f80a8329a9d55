//! The host's end of the RPC port: calls to the guest agent, many at once
//! over one stream.
//!
//! A reader thread matches each response to its request by id and hands it
//! to the caller waiting for it, so a `read_stdio` that waits for output
//! does not hold up an `exec_process` on the same port.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};

use capsa_agent::protocol::{self, Call, Failure, Frame, FrameError, Message, Reply};

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The agent refused or failed the call; its message says why.
    #[error("{call}: {failure}")]
    Failed {
        /// The call's name.
        call: &'static str,
        /// The agent's answer.
        failure: Failure,
    },
    /// The channel to the agent is gone (the sandbox stopped).
    #[error("{call}: the sandbox's RPC channel is closed ({reason})")]
    Channel {
        /// The call's name.
        call: &'static str,
        /// What happened to the channel.
        reason: String,
    },
}

impl CallError {
    /// The agent's failure, when it answered with one.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Self::Failed { failure, .. } => Some(failure),
            Self::Channel { .. } => None,
        }
    }
}

type Pending = Arc<Mutex<PendingState>>;
/// An answer as the reader hands it to the caller: outcome and payload.
type Answer = (Result<Reply, Failure>, Vec<u8>);

#[derive(Default)]
struct PendingState {
    waiting: HashMap<u64, Sender<Answer>>,
    closed: Option<String>,
}

/// A connection to a sandbox's agent.
pub struct AgentClient {
    writer: Mutex<Box<dyn Write + Send>>,
    pending: Pending,
    next_id: AtomicU64,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient").finish_non_exhaustive()
    }
}

impl AgentClient {
    /// A client over a connected stream (read and write halves).
    pub fn new(reader: impl Read + Send + 'static, writer: impl Write + Send + 'static) -> Arc<Self> {
        let pending: Pending = Arc::default();
        let client = Arc::new(Self {
            writer: Mutex::new(Box::new(writer)),
            pending: Arc::clone(&pending),
            next_id: AtomicU64::new(1),
        });
        std::thread::Builder::new()
            .name("agent-rpc".into())
            .spawn(move || read_responses(reader, pending))
            .map_err(|e| eprintln!("capsa: cannot start the RPC reader: {e}"))
            .ok();
        client
    }

    /// Makes one call and waits for its answer.
    pub fn call(&self, call: Call, payload: &[u8]) -> Result<(Reply, Vec<u8>), CallError> {
        let name = call.name();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        {
            let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(reason) = &pending.closed {
                return Err(CallError::Channel { call: name, reason: reason.clone() });
            }
            pending.waiting.insert(id, tx);
        }
        let message = Message::Request { id, call };
        let written =
            protocol::write_frame(&mut *self.writer.lock().unwrap_or_else(PoisonError::into_inner), &message, payload);
        if let Err(e) = written {
            self.pending.lock().unwrap_or_else(PoisonError::into_inner).waiting.remove(&id);
            return Err(CallError::Channel { call: name, reason: e.to_string() });
        }
        match rx.recv() {
            Ok((Ok(reply), payload)) => Ok((reply, payload)),
            Ok((Err(failure), _)) => Err(CallError::Failed { call: name, failure }),
            Err(_) => {
                let reason = self.pending.lock().unwrap_or_else(PoisonError::into_inner).closed.clone();
                Err(CallError::Channel { call: name, reason: reason.unwrap_or_else(|| "closed".into()) })
            }
        }
    }
}

fn read_responses(mut reader: impl Read, pending: Pending) {
    let reason = loop {
        let frame: Frame<Message> = match protocol::read_frame(&mut reader) {
            Ok(frame) => frame,
            Err(FrameError::Closed) => break "the sandbox closed it".to_owned(),
            Err(e) => break e.to_string(),
        };
        let Message::Response { id, result } = frame.header else {
            break "the agent sent a request to the host".to_owned();
        };
        let waiter = pending.lock().unwrap_or_else(PoisonError::into_inner).waiting.remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send((result, frame.payload));
        }
    };
    let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
    pending.closed = Some(reason);
    // Dropping the senders wakes every waiting caller with an error.
    pending.waiting.clear();
}
