//! What a well-behaved host asks of a sandbox: the requests that conform
//! to the policy, layers streamed in, output streamed out.
//!
//! The host is not trusted, so nothing here is a check: the agent decides.
//! This module is the host doing its honest best, which is also what tests
//! start from when they play a dishonest host.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;

use capsa_agent::protocol::{self, Call, Compression, CreateContainer, ProcessRef, Reply, Stream};
use capsa_policy::document::Initdata;
use capsa_policy::generate::k8s::INITDATA_ANNOTATION;
use capsa_policy::model::ContainerPolicy;

use crate::client::{AgentClient, CallError};

/// Why a pod step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PodError {
    /// The agent refused or failed a call.
    #[error(transparent)]
    Call(#[from] CallError),
    /// A local file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A mount source pattern in the policy names no path this runtime
    /// provides.
    #[error(
        "mount {destination}: the policy's source pattern {pattern:?} does not name a path capsa's runtime provides"
    )]
    MountSource {
        /// The mount's destination.
        destination: String,
        /// The policy's pattern.
        pattern: String,
    },
    /// The agent answered with something other than what the call returns.
    #[error("the agent answered {call} with {reply:?}")]
    Unexpected {
        /// The call.
        call: &'static str,
        /// The reply.
        reply: Box<Reply>,
    },
    /// Writing output failed.
    #[error("cannot write the container's output: {0}")]
    Output(std::io::Error),
}

/// A layer blob on the host, ready to stream in.
#[derive(Debug, Clone)]
pub struct LayerSource {
    /// Its diff_id.
    pub diff_id: String,
    /// How the blob is compressed.
    pub compression: Compression,
    /// The compressed blob.
    pub path: PathBuf,
}

/// The `create_container` request that conforms to `policy` in the sandbox
/// `sandbox_id` ([`CreateContainer::conforming`]).
pub fn conforming_request(sandbox_id: &str, policy: &ContainerPolicy) -> Result<CreateContainer, PodError> {
    CreateContainer::conforming(sandbox_id, policy)
        .map_err(|m| PodError::MountSource { destination: m.destination, pattern: m.pattern })
}

/// Streams a layer into the sandbox; returns the size the agent verified.
pub fn push_layer(client: &AgentClient, layer: &LayerSource) -> Result<u64, PodError> {
    let read_err = |source| PodError::Read { path: layer.path.display().to_string(), source };
    let mut file = File::open(&layer.path).map_err(read_err)?;
    let (reply, _) =
        client.call(Call::AddLayer { diff_id: layer.diff_id.clone(), compression: layer.compression }, &[])?;
    let Reply::UploadOpened { upload } = reply else {
        return Err(PodError::Unexpected { call: "add_layer", reply: Box::new(reply) });
    };
    let mut chunk = vec![0u8; protocol::CHUNK];
    let mut next = read_full(&mut file, &mut chunk).map_err(read_err)?;
    loop {
        let current = chunk.get(..next).unwrap_or_default().to_vec();
        let following = if next == chunk.len() { read_full(&mut file, &mut chunk).map_err(read_err)? } else { 0 };
        let last = following == 0;
        let (reply, _) = client.call(Call::LayerChunk { upload, last }, &current)?;
        match reply {
            Reply::ChunkAccepted if !last => {}
            Reply::LayerCommitted { size, .. } if last => return Ok(size),
            other => return Err(PodError::Unexpected { call: "layer_chunk", reply: Box::new(other) }),
        }
        next = following;
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        let Some(rest) = buf.get_mut(filled..) else { break };
        match file.read(rest)? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Writes `bytes` to `path` in the guest.
pub fn copy_file(client: &AgentClient, path: &str, bytes: &[u8], mode: u32) -> Result<(), PodError> {
    let mut offset = 0u64;
    let mut chunks = bytes.chunks(protocol::CHUNK).peekable();
    if chunks.peek().is_none() {
        client.call(Call::CopyFile { path: path.to_owned(), mode, offset: 0, last: true }, &[])?;
        return Ok(());
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        client.call(Call::CopyFile { path: path.to_owned(), mode, offset, last }, chunk)?;
        offset += chunk.len() as u64;
    }
    Ok(())
}

/// Copies a process's output stream to `sink` until it ends.
pub fn stream_output(
    client: &AgentClient,
    process: &ProcessRef,
    stream: Stream,
    sink: &mut dyn Write,
) -> Result<(), PodError> {
    loop {
        let (reply, bytes) = client.call(Call::ReadStdio { process: process.clone(), stream }, &[])?;
        let Reply::Stdio { eof } = reply else {
            return Err(PodError::Unexpected { call: "read_stdio", reply: Box::new(reply) });
        };
        sink.write_all(&bytes).map_err(PodError::Output)?;
        sink.flush().map_err(PodError::Output)?;
        if eof {
            return Ok(());
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCode {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
}

impl ExitCode {
    /// The shell's view: the code, or 128 + the signal.
    pub fn shell(self) -> i32 {
        self.code.or(self.signal.map(|s| 128 + s)).unwrap_or(255)
    }
}

/// Waits for a process to exit.
pub fn wait(client: &AgentClient, process: &ProcessRef) -> Result<ExitCode, PodError> {
    let (reply, _) = client.call(Call::WaitProcess { process: process.clone() }, &[])?;
    match reply {
        Reply::ProcessExited { code, signal } => Ok(ExitCode { code, signal }),
        other => Err(PodError::Unexpected { call: "wait_process", reply: Box::new(other) }),
    }
}

/// The initdata a pod manifest carries (what `capsa policy gen` attached:
/// the base64 TOML in the Confidential Containers initdata annotation of
/// the pod or its template), with the pod's name. `Ok(None)` when it
/// carries none.
pub fn pod_initdata(text: &str) -> Result<Option<(String, Initdata)>, String> {
    use base64::Engine as _;
    let pod: serde_norway::Value = serde_norway::from_str(text).map_err(|e| format!("not YAML: {e}"))?;
    let metadata = pod.get("spec").and_then(|s| s.get("template")).and_then(|t| t.get("metadata"));
    let metadata = metadata.or_else(|| pod.get("metadata"));
    let name = pod.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("pod").to_owned();
    let annotation = metadata.and_then(|m| m.get("annotations")).and_then(|a| a.get(INITDATA_ANNOTATION));
    let Some(annotation) = annotation else { return Ok(None) };
    let encoded = annotation.as_str().ok_or_else(|| format!("annotation {INITDATA_ANNOTATION} is not a string"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| format!("annotation {INITDATA_ANNOTATION} is not base64: {e}"))?;
    let toml = String::from_utf8(bytes).map_err(|_| format!("annotation {INITDATA_ANNOTATION} is not UTF-8 TOML"))?;
    Ok(Some((name, Initdata::from_toml(toml))))
}

/// The size of a sandbox, from its pod's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Virtual CPUs: the containers' CPU limits (else requests) added up
    /// and rounded up, at least 1.
    pub cpus: u32,
    /// Guest memory in MiB: the containers' memory limits (else requests)
    /// plus [`GUEST_OVERHEAD_MIB`] for the guest kernel, agent and layers.
    pub memory_mib: u32,
}

/// Memory a sandbox gets beyond its containers' limits.
pub const GUEST_OVERHEAD_MIB: u32 = 256;

/// Reads `spec.containers[*].resources` of a pod manifest. A pod without
/// limits gets 1 CPU and 512 MiB (the overhead plus 256 MiB). Values that
/// do not parse are ignored: sizing is the host's business, not a check.
pub fn resources_from_pod_yaml(text: &str) -> Resources {
    let mut millicpus = 0u64;
    let mut memory = 0u64;
    let mut any_memory = false;
    let pod: serde_norway::Value = serde_norway::from_str(text).unwrap_or(serde_norway::Value::Null);
    let containers = pod.get("spec").and_then(|s| s.get("containers")).and_then(|c| c.as_sequence());
    for container in containers.into_iter().flatten() {
        let resources = container.get("resources");
        let pick = |key: &str| {
            let limits = resources.and_then(|r| r.get("limits")).and_then(|l| l.get(key));
            let requests = resources.and_then(|r| r.get("requests")).and_then(|l| l.get(key));
            limits.or(requests).and_then(quantity_text)
        };
        if let Some(cpu) = pick("cpu").and_then(|q| parse_cpu(&q)) {
            millicpus = millicpus.saturating_add(cpu);
        }
        if let Some(bytes) = pick("memory").and_then(|q| parse_memory(&q)) {
            memory = memory.saturating_add(bytes);
            any_memory = true;
        }
    }
    let cpus = u32::try_from(millicpus.div_ceil(1000)).unwrap_or(u32::MAX).max(1);
    let workload_mib = if any_memory { memory.div_ceil(1 << 20) } else { 256 };
    let memory_mib = u32::try_from(workload_mib).unwrap_or(u32::MAX).saturating_add(GUEST_OVERHEAD_MIB);
    Resources { cpus, memory_mib }
}

fn quantity_text(value: &serde_norway::Value) -> Option<String> {
    match value {
        serde_norway::Value::String(s) => Some(s.clone()),
        serde_norway::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Kubernetes CPU quantity in millicores: `500m`, `2`, `0.5`.
fn parse_cpu(q: &str) -> Option<u64> {
    if let Some(milli) = q.strip_suffix('m') {
        return milli.parse().ok();
    }
    let cores: f64 = q.parse().ok()?;
    (cores.is_finite() && cores >= 0.0).then(|| (cores * 1000.0).ceil() as u64)
}

/// Kubernetes memory quantity in bytes: `128Mi`, `1Gi`, `500M`, `1e9`, `4096`.
fn parse_memory(q: &str) -> Option<u64> {
    const SUFFIXES: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    for (suffix, unit) in SUFFIXES {
        if let Some(number) = q.strip_suffix(suffix) {
            if let Ok(n) = number.parse::<u64>() {
                return n.checked_mul(unit);
            }
            if suffix.is_empty() {
                let n: f64 = number.parse().ok()?;
                return (n.is_finite() && n >= 0.0).then_some(n as u64);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_resources_size_the_sandbox() {
        let pod = "spec:\n  containers:\n  - name: a\n    resources:\n      limits: {cpu: 500m, memory: 128Mi}\n  - name: b\n    resources:\n      requests: {cpu: '1', memory: 64Mi}\n";
        assert_eq!(resources_from_pod_yaml(pod), Resources { cpus: 2, memory_mib: 128 + 64 + GUEST_OVERHEAD_MIB });
        assert_eq!(resources_from_pod_yaml("spec: {containers: [{name: a}]}"), Resources { cpus: 1, memory_mib: 512 });
        assert_eq!(parse_memory("1Gi"), Some(1 << 30));
        assert_eq!(parse_memory("1e9"), Some(1_000_000_000));
        assert_eq!(parse_cpu("0.25"), Some(250));
        assert_eq!(parse_memory("lots"), None);
        // Sums saturate (found by reading, confirmed with fuzz/pod_resources).
        let huge = "spec: {containers: [{resources: {limits: {memory: 1e19, cpu: 1e300}}}, {resources: {limits: {memory: 1e19, cpu: 1}}}]}";
        assert_eq!(resources_from_pod_yaml(huge).cpus, u32::MAX);
    }
}
