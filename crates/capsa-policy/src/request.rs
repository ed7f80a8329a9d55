//! Host requests as the policy sees them: one JSON object with an `op` and
//! that operation's fields. The agent builds these from its RPCs; `capsa
//! policy check` reads them from files. The rules see exactly this shape as
//! `input`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A request from the host to the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Create a container.
    CreateContainer(Box<CreateContainer>),
    /// Run a further process in a container.
    ExecProcess {
        /// Container name.
        container: String,
        /// The process arguments.
        args: Vec<String>,
    },
    /// Send a signal to a container's process.
    SignalProcess {
        /// Container name.
        container: String,
        /// Signal number.
        signal: u32,
    },
    /// Read a container's stdout/stderr.
    ReadStdio {
        /// Container name.
        container: String,
    },
    /// Write to a container's stdin.
    WriteStdin {
        /// Container name.
        container: String,
    },
    /// Copy a file into the sandbox.
    CopyFile {
        /// Destination path in the guest.
        path: String,
    },
    /// Read container logs.
    GetLogs {
        /// Container name.
        container: String,
    },
    /// Read sandbox metrics.
    GetMetrics,
    /// Shut the sandbox down.
    Shutdown,
    /// Replace the policy.
    UpdatePolicy,
}

/// The fields of a `create_container` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateContainer {
    /// Container name, as in the pod spec.
    pub container: String,
    /// Image manifest digest (`sha256:...`).
    pub image: String,
    /// Layer diff_ids, bottom first.
    pub layers: Vec<String>,
    /// Process arguments.
    pub args: Vec<String>,
    /// Environment, as `NAME=value`.
    pub env: Vec<String>,
    /// Working directory.
    pub working_dir: String,
    /// User and groups.
    pub user: User,
    /// Capabilities the process will hold.
    pub capabilities: Vec<String>,
    /// Privileged container.
    pub privileged: bool,
    /// no_new_privileges set.
    pub no_new_privileges: bool,
    /// SHA-256 of the seccomp profile, if one is applied.
    #[serde(default)]
    pub seccomp_profile_sha256: Option<String>,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Read-only root filesystem.
    pub read_only_rootfs: bool,
    /// Sysctls.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
}

/// User and groups of a process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default)]
    pub groups: Vec<u32>,
}

/// A requested mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Source path (or pseudo-source such as `proc`).
    pub source: String,
    /// Destination in the container.
    pub destination: String,
    /// Filesystem type.
    #[serde(rename = "type")]
    pub fs_type: String,
    /// Mount options.
    pub options: Vec<String>,
}

impl Request {
    /// The operation name as it appears in `op`.
    pub fn op(&self) -> &'static str {
        match self {
            Self::CreateContainer(_) => "create_container",
            Self::ExecProcess { .. } => "exec_process",
            Self::SignalProcess { .. } => "signal_process",
            Self::ReadStdio { .. } => "read_stdio",
            Self::WriteStdin { .. } => "write_stdin",
            Self::CopyFile { .. } => "copy_file",
            Self::GetLogs { .. } => "get_logs",
            Self::GetMetrics => "get_metrics",
            Self::Shutdown => "shutdown",
            Self::UpdatePolicy => "update_policy",
        }
    }
}
