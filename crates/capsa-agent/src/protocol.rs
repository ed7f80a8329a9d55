//! The host↔guest wire protocol: what travels over the sandbox's
//! virtio-serial ports.
//!
//! A frame is two big-endian `u32` lengths, a JSON header of the first
//! length and a binary payload of the second. Headers carry the typed
//! message; payloads carry bytes that would be wasteful as JSON (layer
//! chunks, stdio, files, evidence). Requests carry an id chosen by the host
//! and every response names the id it answers, so one channel carries many
//! calls at once: a long-polling `read_stdio` does not hold up an `exec`.
//!
//! The same framing carries the sim platform's port, where the guest asks
//! and the host answers ([`SimRequest`], [`SimResponse`]).
//!
//! Everything here is parsed from an untrusted peer (the guest does not
//! trust the host, and the host does not trust the guest's answers more than
//! their evidence): lengths are bounded before anything is allocated, and a
//! malformed frame is an error, never a panic.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

pub use capsa_policy::request::{CreateContainer, Mount, User};

/// The largest JSON header a peer may send.
pub const MAX_HEADER: usize = 1 << 20;
/// The largest payload one frame may carry; layers and files travel in
/// chunks of at most this size.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// The chunk size the host uses for layers and files.
pub const CHUNK: usize = 1 << 20;

/// The virtio-serial port name of the RPC channel.
pub const RPC_PORT: &str = "capsa.rpc";
/// The virtio-serial port name of the sim platform's report service.
pub const SIM_PORT: &str = "capsa.sim";
/// The virtio-serial port name of the forwarded connections to the trust
/// services the initdata names.
pub const FORWARD_PORT: &str = "capsa.fwd";

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The peer closed the channel between frames.
    #[error("the channel was closed")]
    Closed,
    /// Reading or writing failed.
    #[error("channel I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A length exceeds its bound.
    #[error("frame {what} of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Header or payload.
        what: &'static str,
        /// The announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The header is not the JSON of a message.
    #[error("frame header is not a valid message: {0}")]
    Header(String),
}

/// A decoded frame: its typed header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<T> {
    /// The message.
    pub header: T,
    /// The bytes that came with it (often empty).
    pub payload: Vec<u8>,
}

/// Writes one frame. Header and payload go out in one `write_all` so
/// concurrent writers that share a lock never interleave partial frames.
pub fn write_frame<T: Serialize>(out: &mut impl Write, header: &T, payload: &[u8]) -> Result<(), FrameError> {
    let json = serde_json::to_vec(header).map_err(|e| FrameError::Header(e.to_string()))?;
    if json.len() > MAX_HEADER {
        return Err(FrameError::TooLarge { what: "header", len: json.len(), max: MAX_HEADER });
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { what: "payload", len: payload.len(), max: MAX_PAYLOAD });
    }
    let mut buf = Vec::with_capacity(8 + json.len() + payload.len());
    buf.extend_from_slice(&len_u32(json.len()).to_be_bytes());
    buf.extend_from_slice(&len_u32(payload.len()).to_be_bytes());
    buf.extend_from_slice(&json);
    buf.extend_from_slice(payload);
    out.write_all(&buf)?;
    out.flush()?;
    Ok(())
}

fn len_u32(len: usize) -> u32 {
    // Both lengths were checked against limits far below u32::MAX.
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// Reads one frame; [`FrameError::Closed`] when the peer closed the channel
/// cleanly before a frame began.
pub fn read_frame<T: for<'de> Deserialize<'de>>(input: &mut impl Read) -> Result<Frame<T>, FrameError> {
    let mut lengths = [0u8; 8];
    let mut filled = 0;
    while filled < lengths.len() {
        let Some(rest) = lengths.get_mut(filled..) else { break };
        match input.read(rest) {
            Ok(0) if filled == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let [h0, h1, h2, h3, p0, p1, p2, p3] = lengths;
    let header_len = u32::from_be_bytes([h0, h1, h2, h3]) as usize;
    let payload_len = u32::from_be_bytes([p0, p1, p2, p3]) as usize;
    if header_len > MAX_HEADER {
        return Err(FrameError::TooLarge { what: "header", len: header_len, max: MAX_HEADER });
    }
    if payload_len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { what: "payload", len: payload_len, max: MAX_PAYLOAD });
    }
    let mut json = vec![0u8; header_len];
    input.read_exact(&mut json)?;
    let mut payload = vec![0u8; payload_len];
    input.read_exact(&mut payload)?;
    let header = serde_json::from_slice(&json).map_err(|e| FrameError::Header(e.to_string()))?;
    Ok(Frame { header, payload })
}

/// A message on the RPC port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Host to guest.
    Request {
        /// Chosen by the host, unique among its outstanding requests.
        id: u64,
        /// What is asked.
        call: Call,
    },
    /// Guest to host.
    Response {
        /// The request this answers.
        id: u64,
        /// The outcome.
        result: Result<Reply, Failure>,
    },
}

/// Which process of a container: its main process, or one started by
/// `exec_process`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRef {
    /// The container's name.
    pub container: String,
    /// `None` for the container's main process, else the id `exec_process`
    /// returned.
    #[serde(default)]
    pub exec_id: Option<u64>,
}

/// One of a process's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// The compression an OCI or Docker layer media type declares.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        if media_type.ends_with("+gzip")
            || media_type.ends_with(".tar.gzip")
            || media_type.ends_with("rootfs.diff.tar.gzip")
        {
            Some(Self::Gzip)
        } else if media_type.ends_with("+zstd") {
            Some(Self::Zstd)
        } else if media_type.ends_with(".tar") || media_type.ends_with("layer.v1.tar") {
            Some(Self::None)
        } else {
            None
        }
    }
}

/// A request from the host. Every call except `create_sandbox` is decided
/// by the policy the sandbox was created with before it changes anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case", deny_unknown_fields)]
pub enum Call {
    /// Hands the sandbox its initdata. The agent accepts it only if its
    /// SHA-256 equals HOST_DATA in the guest's own evidence; then the policy
    /// in it governs every later request. Once only.
    CreateSandbox {
        /// The initdata TOML.
        initdata: String,
    },
    /// Starts streaming a layer into the guest; the chunks follow as
    /// `layer_chunk` calls. The agent unpacks to staging and keeps the layer
    /// only if the uncompressed bytes hash to `diff_id`.
    AddLayer {
        /// The diff_id the host claims (`sha256:<hex>`).
        diff_id: String,
        /// How the blob is compressed.
        compression: Compression,
    },
    /// The next chunk of an upload (the payload); `last` finishes it.
    LayerChunk {
        /// The upload `add_layer` opened.
        upload: u64,
        /// Whether this is the final chunk.
        last: bool,
    },
    /// Creates a container on an overlay of its (already added) layers.
    CreateContainer(Box<CreateContainer>),
    /// Starts a created container's main process.
    StartContainer {
        /// The container.
        container: String,
    },
    /// Starts a further process in a running container.
    ExecProcess {
        /// The container.
        container: String,
        /// The process arguments.
        args: Vec<String>,
    },
    /// Waits until a process exits.
    WaitProcess {
        /// The process.
        process: ProcessRef,
    },
    /// Sends a signal to a process.
    SignalProcess {
        /// The process.
        process: ProcessRef,
        /// The signal number.
        signal: u32,
    },
    /// Reads output a process wrote since the last read: waits until there
    /// is some or the stream ends.
    ReadStdio {
        /// The process.
        process: ProcessRef,
        /// Which stream.
        stream: Stream,
    },
    /// Writes the payload to a process's stdin; `close` closes it after.
    WriteStdin {
        /// The process.
        process: ProcessRef,
        /// Close stdin after writing.
        close: bool,
    },
    /// Writes the payload to a file in the guest (created or replaced
    /// atomically once `last` arrives).
    CopyFile {
        /// The absolute destination path in the guest.
        path: String,
        /// The file mode.
        mode: u32,
        /// The byte offset of this chunk.
        offset: u64,
        /// Whether this chunk completes the file.
        last: bool,
    },
    /// The output a container's main process wrote (the last part of it,
    /// bounded by the agent).
    GetLogs {
        /// The container.
        container: String,
    },
    /// Memory and process figures of the sandbox.
    GetMetrics,
    /// Stops a container's processes and removes its root filesystem.
    RemoveContainer {
        /// The container.
        container: String,
    },
    /// Stops every container and powers the sandbox off.
    Shutdown,
}

impl Call {
    /// The call's name as the protocol spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CreateSandbox { .. } => "create_sandbox",
            Self::AddLayer { .. } => "add_layer",
            Self::LayerChunk { .. } => "layer_chunk",
            Self::CreateContainer(_) => "create_container",
            Self::StartContainer { .. } => "start_container",
            Self::ExecProcess { .. } => "exec_process",
            Self::WaitProcess { .. } => "wait_process",
            Self::SignalProcess { .. } => "signal_process",
            Self::ReadStdio { .. } => "read_stdio",
            Self::WriteStdin { .. } => "write_stdin",
            Self::CopyFile { .. } => "copy_file",
            Self::GetLogs { .. } => "get_logs",
            Self::GetMetrics => "get_metrics",
            Self::RemoveContainer { .. } => "remove_container",
            Self::Shutdown => "shutdown",
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// The call succeeded and has nothing to say (payload empty).
    Done,
    /// `create_sandbox` accepted the initdata.
    SandboxCreated {
        /// SHA-256 of the policy document now in force (hex).
        policy_sha256: String,
        /// HOST_DATA as the evidence reported it (hex).
        host_data: String,
        /// MEASUREMENT as the evidence reported it (hex).
        measurement: String,
    },
    /// `add_layer` opened an upload.
    UploadOpened {
        /// Its id, for `layer_chunk`.
        upload: u64,
    },
    /// A chunk arrived; the upload continues.
    ChunkAccepted,
    /// The last chunk arrived and the layer's hash matched: it is committed.
    LayerCommitted {
        /// The verified diff_id.
        diff_id: String,
        /// Uncompressed bytes.
        size: u64,
    },
    /// A process was started.
    ProcessStarted {
        /// `None` for a container's main process.
        exec_id: Option<u64>,
        /// Its PID in the guest's PID namespace.
        pid: u32,
    },
    /// A process exited.
    ProcessExited {
        /// The exit code, if it exited normally.
        code: Option<i32>,
        /// The signal that ended it, if one did.
        signal: Option<i32>,
    },
    /// Output bytes are in the payload; `eof` when the stream has ended and
    /// nothing more will come.
    Stdio {
        /// The stream ended.
        eof: bool,
    },
    /// The logs are in the payload.
    Logs,
    /// Sandbox metrics.
    Metrics(Metrics),
}

/// Memory and process figures of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Guest memory in KiB (MemTotal).
    pub mem_total_kib: u64,
    /// Memory available in KiB (MemAvailable).
    pub mem_available_kib: u64,
    /// Memory held by the agent itself, in KiB (its VmRSS).
    pub agent_rss_kib: u64,
    /// Memory held by shared memory and tmpfs (layers unpacked into guest
    /// memory live here), in KiB.
    pub shmem_kib: u64,
    /// Containers and whether each is running.
    pub containers: Vec<ContainerStatus>,
}

/// One container in [`Metrics`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerStatus {
    /// Its name.
    pub name: String,
    /// `created`, `running` or `exited`.
    pub state: String,
    /// Its main process's PID in the guest, once started.
    pub pid: Option<u32>,
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{kind}: {message}")]
pub struct Failure {
    /// The class of failure.
    pub kind: FailureKind,
    /// What happened and what to do, for a person; never contains secrets.
    pub message: String,
}

/// The class of a [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The policy refused the request; the message is its explanation.
    Denied,
    /// The request was malformed or does not fit the sandbox's state.
    Invalid,
    /// What the request names does not exist.
    NotFound,
    /// Layer bytes did not hash to what was claimed, or a tar entry was unsafe.
    Integrity,
    /// The sandbox could not obtain or trust its own evidence.
    Evidence,
    /// Something failed inside the guest.
    Internal,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Denied => "denied by policy",
            Self::Invalid => "invalid request",
            Self::NotFound => "not found",
            Self::Integrity => "integrity check failed",
            Self::Evidence => "evidence",
            Self::Internal => "internal error",
        })
    }
}

impl Failure {
    /// A failure of `kind` with `message`.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into() }
    }
}

/// The guest asks the host's sim platform for a report carrying its
/// REPORT_DATA. On hardware this request goes to the security processor
/// instead, and MEASUREMENT and HOST_DATA are whatever launch fixed; the sim
/// host service mirrors that by fixing both when the sandbox is launched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimRequest {
    /// REPORT_DATA, hex (64 bytes).
    pub report_data: String,
}

/// The host's answer to a [`SimRequest`]: the report in the payload, or why
/// there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimResponse {
    /// Why no report was produced; `None` when the payload holds one.
    pub error: Option<String>,
    /// The sim VCEK and its chain (PEM, VCEK first), which a verifier
    /// needs beside the report, as hardware guests get from an extended
    /// report.
    #[serde(default)]
    pub vcek_chain_pem: Option<String>,
}

/// A message on the forwarding port: TCP connections from the guest to the
/// trust-service endpoints its initdata names, carried over the host. TLS
/// terminates in the guest, so the host relays bytes it cannot read; it
/// opens only endpoints the initdata names, and the guest's own TLS and the
/// key broker's wrapping make a relay to anywhere else useless anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Forward {
    /// Guest to host: open a connection to `endpoint` (`host:port`).
    Open {
        /// Chosen by the guest, unique among its open streams.
        stream: u64,
        /// Where to connect.
        endpoint: String,
    },
    /// Host to guest: the connection is open.
    Opened {
        /// The stream.
        stream: u64,
    },
    /// Either way: the payload is the stream's next bytes.
    Data {
        /// The stream.
        stream: u64,
    },
    /// Either way: the sender will send no more on this stream (and why,
    /// when it failed).
    Close {
        /// The stream.
        stream: u64,
        /// What went wrong, if anything.
        error: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut wire = Vec::new();
        let msg = Message::Request { id: 7, call: Call::LayerChunk { upload: 3, last: true } };
        write_frame(&mut wire, &msg, b"bytes").unwrap();
        let frame: Frame<Message> = read_frame(&mut wire.as_slice()).unwrap();
        assert_eq!(frame.header, msg);
        assert_eq!(frame.payload, b"bytes");
    }

    #[test]
    fn closed_truncated_and_oversized_frames_are_errors() {
        assert!(matches!(read_frame::<Message>(&mut [].as_slice()), Err(FrameError::Closed)));
        assert!(matches!(read_frame::<Message>(&mut [0, 0, 0].as_slice()), Err(FrameError::Io(_))));
        let huge = [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0];
        assert!(matches!(read_frame::<Message>(&mut huge.as_slice()), Err(FrameError::TooLarge { .. })));
        let mut garbage = Vec::new();
        garbage.extend_from_slice(&2u32.to_be_bytes());
        garbage.extend_from_slice(&0u32.to_be_bytes());
        garbage.extend_from_slice(b"{]");
        assert!(matches!(read_frame::<Message>(&mut garbage.as_slice()), Err(FrameError::Header(_))));
    }

    #[test]
    fn media_types_map_to_compression() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_media_type("application/vnd.oci.image.layer.v1.tar"), Some(Compression::None));
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(Compression::from_media_type("application/octet-stream"), None);
    }
}
