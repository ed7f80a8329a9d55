//! Host requests as the policy sees them: one JSON object with an `op` and
//! that operation's fields. The agent builds these from its RPCs (and a
//! `workload_api` request for each call a container makes to the workload
//! API); `capsa policy check` reads them from files. The rules see exactly this shape as
//! `input`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A request from the host to the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Stream a layer into the sandbox. The agent keeps it only if its
    /// uncompressed bytes hash to `diff_id`; the policy admits only the
    /// layers of its own containers.
    AddLayer {
        /// The layer's diff_id (`sha256:...` of the uncompressed tar).
        diff_id: String,
    },
    /// Create a container.
    CreateContainer(Box<CreateContainer>),
    /// Start a created container's main process.
    StartContainer {
        /// Container name.
        container: String,
    },
    /// Run a further process in a container.
    ExecProcess {
        /// Container name.
        container: String,
        /// The process arguments.
        args: Vec<String>,
    },
    /// Wait until a container's process exits.
    WaitProcess {
        /// Container name.
        container: String,
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
    /// Stop a container's processes and remove its root filesystem.
    RemoveContainer {
        /// Container name.
        container: String,
    },
    /// Shut the sandbox down.
    Shutdown,
    /// Replace the policy.
    UpdatePolicy,
    /// A container calls the workload API the agent serves on 127.0.0.1
    /// (`{"op":"workload_api","endpoint":"key/release"}`). The agent, not
    /// the host, makes this request, for each call it serves; the policy
    /// lists the endpoints the pod may use.
    WorkloadApi {
        /// The endpoint, one of [`crate::model::WORKLOAD_API_ENDPOINTS`]
        /// (`status`, `attest/raw`, `attest/maa`, `key/release`).
        endpoint: String,
    },
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
            Self::AddLayer { .. } => "add_layer",
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
            Self::UpdatePolicy => "update_policy",
            Self::WorkloadApi { .. } => "workload_api",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `op()` names each request as its JSON does, which the rules match on.
    #[test]
    fn op_is_the_json_tag() {
        let container = || "app".to_owned();
        let requests = [
            Request::AddLayer { diff_id: "sha256:01".into() },
            Request::StartContainer { container: container() },
            Request::ExecProcess { container: container(), args: vec![] },
            Request::WaitProcess { container: container() },
            Request::SignalProcess { container: container(), signal: 15 },
            Request::ReadStdio { container: container() },
            Request::WriteStdin { container: container() },
            Request::CopyFile { path: "/x".into() },
            Request::GetLogs { container: container() },
            Request::GetMetrics,
            Request::RemoveContainer { container: container() },
            Request::Shutdown,
            Request::UpdatePolicy,
            Request::WorkloadApi { endpoint: "key/release".into() },
        ];
        for request in requests {
            let json = serde_json::to_value(&request).unwrap();
            assert_eq!(json["op"], request.op(), "{json}");
            assert_eq!(serde_json::from_value::<Request>(json).unwrap(), request);
        }
        let json = serde_json::json!({"op": "add_layer", "diff_id": "sha256:01"});
        assert_eq!(serde_json::from_value::<Request>(json).unwrap(), Request::AddLayer { diff_id: "sha256:01".into() });
        let json = serde_json::json!({"op": "workload_api", "endpoint": "key/release"});
        let typed = Request::WorkloadApi { endpoint: "key/release".into() };
        assert_eq!(serde_json::from_value::<Request>(json.clone()).unwrap(), typed);
        assert_eq!(serde_json::to_value(&typed).unwrap(), json);
    }
}
