//! The execution-policy data: what the host may ask of a sandbox.
//!
//! This is the per-workload half of a policy document (the other half is
//! the fixed Rego rules in `rules.rego`). It is generated from a pod spec,
//! serialised canonically (field order as declared here, maps sorted), and
//! embedded in the document whose digest the hardware reports. Every field
//! is something the rules compare a host request against; nothing here is
//! advisory.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of this data schema; the rules refuse data of another version.
///
/// Still 1 after `sandbox.workload_api` was added: data without it reads as
/// [`WORKLOAD_API_ENDPOINTS`], in the model and in the rules alike.
pub const SCHEMA_VERSION: u32 = 1;

/// The endpoints of the workload API the agent serves on 127.0.0.1 inside
/// the sandbox (the Azure SKR sidecar's REST shape), by the names the policy
/// and `workload_api` requests use: `GET /status`, `POST /attest/raw`,
/// `POST /attest/maa` and `POST /key/release`.
pub const WORKLOAD_API_ENDPOINTS: [&str; 4] = ["status", "attest/raw", "attest/maa", "key/release"];

/// The whole policy data for one sandbox (pod).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyData {
    /// [`SCHEMA_VERSION`].
    pub version: u32,
    /// The containers the sandbox may run, by name (unique).
    pub containers: Vec<ContainerPolicy>,
    /// Sandbox-wide operations.
    pub sandbox: SandboxPolicy,
}

/// What one container may be created with and what may be done to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPolicy {
    /// The container's name in the pod spec; requests name it.
    pub name: String,
    /// The image reference as written in the pod spec (informational).
    pub image: String,
    /// The image manifest digest (`sha256:...`) the reference resolved to.
    pub image_digest: String,
    /// Layer diff_ids (`sha256:...` of the uncompressed tar), bottom first.
    pub layers: Vec<String>,
    /// The process arguments: entrypoint followed by command, exactly.
    pub args: Vec<String>,
    /// Environment rules.
    pub env: EnvPolicy,
    /// The working directory.
    pub working_dir: String,
    /// The user the process runs as.
    pub user: UserPolicy,
    /// Capabilities the process may hold (requests may hold fewer).
    pub capabilities: Vec<String>,
    /// Whether the container may be privileged.
    pub privileged: bool,
    /// Whether no_new_privileges is required (true: the request must set it).
    pub no_new_privileges: bool,
    /// SHA-256 of the seccomp profile the request must carry, if any.
    pub seccomp_profile_sha256: Option<String>,
    /// The mounts the container may have; every requested mount must match one.
    pub mounts: Vec<MountPolicy>,
    /// Whether the root filesystem must be read-only.
    pub read_only_rootfs: bool,
    /// Sysctls the container may set, name to exact value.
    pub sysctls: BTreeMap<String, String>,
    /// Commands `exec_process` may run in this container (none by default).
    pub exec: Vec<Vec<String>>,
    /// Signals `signal_process` may send to this container's processes.
    pub signals: Vec<u32>,
    /// Whether the host may read the container's stdout/stderr.
    pub read_stdio: bool,
    /// Whether the host may write to the container's stdin.
    pub write_stdin: bool,
}

/// Environment variables, as `NAME=value` strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvPolicy {
    /// Entries allowed exactly as written.
    pub exact: Vec<String>,
    /// Entries allowed when a whole `NAME=value` string matches one of these
    /// regular expressions. The rules anchor them (`^(?:...)$`), so a
    /// pattern never matches a substring.
    pub patterns: Vec<String>,
    /// Variable names that must be present.
    pub required: Vec<String>,
}

/// The user and groups of the container process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPolicy {
    /// User ID.
    pub uid: u32,
    /// Primary group ID.
    pub gid: u32,
    /// Supplementary groups (the request's must be a subset).
    pub groups: Vec<u32>,
}

/// One mount the container may have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountPolicy {
    /// Where it appears inside the container.
    pub destination: String,
    /// Filesystem type (`bind`, `tmpfs`, `proc`, ...).
    #[serde(rename = "type")]
    pub fs_type: String,
    /// What the source must be.
    pub source: SourceMatch,
    /// Options the request must carry (e.g. `ro`); a policy `ro` can never
    /// be dropped by the host, while `rw` in the policy permits either.
    pub options: Vec<String>,
}

/// How a mount source is matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceMatch {
    /// The source must be exactly this path.
    Exact(String),
    /// The source must match this regular expression (anchored by the
    /// rules), for paths the runtime chooses, such as per-sandbox directories.
    Pattern(String),
}

/// Sandbox-wide operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPolicy {
    /// Destination paths `copy_file` may write (anchored regexes).
    pub copy_file: Vec<String>,
    /// Whether the host may read container logs.
    pub get_logs: bool,
    /// Whether the host may read sandbox metrics.
    pub get_metrics: bool,
    /// Whether the host may shut the sandbox down.
    pub shutdown: bool,
    /// Whether the policy may be replaced at run time (never by default:
    /// a new policy would not match HOST_DATA).
    pub update_policy: bool,
    /// The workload API endpoints the pod's containers may use, among
    /// [`WORKLOAD_API_ENDPOINTS`]. All of them by default, and when the data
    /// predates the field.
    #[serde(default = "all_workload_api_endpoints")]
    pub workload_api: Vec<String>,
}

impl Default for SandboxPolicy {
    fn default() -> Self {
        Self {
            copy_file: Vec::new(),
            get_logs: true,
            get_metrics: true,
            shutdown: true,
            update_policy: false,
            workload_api: all_workload_api_endpoints(),
        }
    }
}

/// Every endpoint of [`WORKLOAD_API_ENDPOINTS`], in that order.
pub fn all_workload_api_endpoints() -> Vec<String> {
    WORKLOAD_API_ENDPOINTS.iter().map(|e| (*e).to_owned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Data written before `workload_api` existed still reads, with every
    /// endpoint allowed, as the rules read it too (schema version 1).
    #[test]
    fn sandbox_data_without_workload_api_allows_every_endpoint() {
        let old =
            r#"{"copy_file": [], "get_logs": true, "get_metrics": false, "shutdown": true, "update_policy": false}"#;
        let sandbox: SandboxPolicy = serde_json::from_str(old).unwrap();
        assert_eq!(sandbox.workload_api, ["status", "attest/raw", "attest/maa", "key/release"]);
        assert!(!sandbox.get_metrics);
        assert_eq!(SandboxPolicy::default().workload_api, WORKLOAD_API_ENDPOINTS);
    }
}
