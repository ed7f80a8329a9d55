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

/// A mount source the policy leaves to a pattern capsa's runtime has no
/// path for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnresolvedMount {
    /// The mount's destination.
    pub destination: String,
    /// The policy's pattern.
    pub pattern: String,
}

impl CreateContainer {
    /// The request that conforms to `policy` in the sandbox `sandbox_id`:
    /// the policy's own values, and for mount sources the policy leaves to
    /// the runtime (patterns), the paths capsa's runtime uses. What an
    /// honest host sends, and so what the policy's tests check against.
    pub fn conforming(sandbox_id: &str, policy: &crate::model::ContainerPolicy) -> Result<Self, UnresolvedMount> {
        use crate::model::SourceMatch;
        let mut mounts = Vec::with_capacity(policy.mounts.len());
        for m in &policy.mounts {
            let source = match &m.source {
                SourceMatch::Exact(s) => s.clone(),
                SourceMatch::Pattern(p) => runtime_path(p, sandbox_id, &policy.name)
                    .ok_or_else(|| UnresolvedMount { destination: m.destination.clone(), pattern: p.clone() })?,
            };
            mounts.push(Mount {
                source,
                destination: m.destination.clone(),
                fs_type: m.fs_type.clone(),
                options: m.options.clone(),
            });
        }
        Ok(Self {
            container: policy.name.clone(),
            image: policy.image_digest.clone(),
            layers: policy.layers.clone(),
            args: policy.args.clone(),
            env: policy.env.exact.clone(),
            working_dir: policy.working_dir.clone(),
            user: User { uid: policy.user.uid, gid: policy.user.gid, groups: policy.user.groups.clone() },
            capabilities: policy.capabilities.clone(),
            privileged: policy.privileged,
            no_new_privileges: policy.no_new_privileges,
            seccomp_profile_sha256: policy.seccomp_profile_sha256.clone(),
            mounts,
            read_only_rootfs: policy.read_only_rootfs,
            sysctls: policy.sysctls.clone(),
        })
    }
}

/// The path the runtime uses where the policy allows a pattern: the
/// per-sandbox segment (`[a-z0-9-]+`) is the sandbox id, a second such
/// segment the container's name, escapes are removed; the result must match
/// the pattern, or there is no such path.
fn runtime_path(pattern: &str, sandbox_id: &str, container: &str) -> Option<String> {
    const SEGMENT: &str = "[a-z0-9-]+";
    let with_id = pattern.replacen(SEGMENT, sandbox_id, 1);
    let with_name = with_id.replacen(SEGMENT, container, 1);
    let mut path = String::with_capacity(with_name.len());
    let mut chars = with_name.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            path.extend(chars.next());
        } else {
            path.push(c);
        }
    }
    // What is left must be a plain path: a pattern the runtime has no
    // convention for (`/data/.*`) would otherwise "match" its own text.
    if path.contains(['*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '^', '$']) {
        return None;
    }
    let anchored = regex::Regex::new(&format!("^(?:{pattern})$")).ok()?;
    anchored.is_match(&path).then_some(path)
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

    #[test]
    fn pattern_sources_become_the_runtime_paths() {
        assert_eq!(
            runtime_path("/run/capsa/sandboxes/[a-z0-9-]+/resolv\\.conf", "pod-1", "web").as_deref(),
            Some("/run/capsa/sandboxes/pod-1/resolv.conf")
        );
        assert_eq!(
            runtime_path("/run/capsa/sandboxes/[a-z0-9-]+/termination-log/[a-z0-9-]+", "pod-1", "web").as_deref(),
            Some("/run/capsa/sandboxes/pod-1/termination-log/web")
        );
        assert_eq!(
            runtime_path("/run/capsa/sandboxes/[a-z0-9-]+/volumes/cache", "p", "c").as_deref(),
            Some("/run/capsa/sandboxes/p/volumes/cache")
        );
        assert_eq!(runtime_path("/data/.*", "p", "c"), None);
    }
}
