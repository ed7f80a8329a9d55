//! What every input format is reduced to before a policy is built: a
//! workload of containers, each with what its spec says (not yet merged
//! with its image or the platform).

use std::collections::BTreeMap;

use crate::document::EncfsVolume;

/// The platform a workload comes from; decides which platform settings apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// A Kubernetes pod (kubelet mounts and service variables).
    Kubernetes,
    /// An Azure container group.
    AzureContainerInstances,
    /// A compose service.
    Compose,
}

/// One sandbox's worth of containers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Where it comes from.
    pub platform: Platform,
    /// A name for messages (pod or group name).
    pub name: String,
    /// The containers, init containers first.
    pub containers: Vec<ContainerSpec>,
    /// The workload API endpoints the containers may use, when the input
    /// restricts them (a Kubernetes pod's `capsa.dev/workload-api`
    /// annotation); `None` allows every endpoint.
    pub workload_api: Option<Vec<String>>,
    /// The encrypted filesystems (capsa-encfs images) the sandbox mounts
    /// before any container starts; a [`VolumeSource::Encfs`] names one of
    /// them. They go into this workload's initdata, added to the sandbox
    /// settings every workload gets, and so are measured with its policy.
    /// Only Kubernetes pods declare them (Azure Container Instances do not
    /// measure initdata, and compose has no counterpart).
    pub encfs: Vec<EncfsVolume>,
}

/// An environment entry as the spec gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvSpec {
    /// A literal `NAME=value`.
    Literal {
        /// Variable name.
        name: String,
        /// Its value.
        value: String,
    },
    /// A variable whose value the platform decides at run time (downward
    /// API, secure values): allowed as `NAME=<pattern>`.
    RuntimeValue {
        /// Variable name.
        name: String,
        /// Pattern for the value.
        value_pattern: String,
    },
}

/// A volume mount as the spec gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Mount point in the container.
    pub destination: String,
    /// Where the source comes from.
    pub source: VolumeSource,
    /// Mounted read-only.
    pub read_only: bool,
}

/// Where a volume's content comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A path on the host (Kubernetes hostPath, compose bind mount).
    HostPath(String),
    /// Storage the runtime creates for the sandbox (emptyDir, configMap,
    /// secret, projected, named volumes), identified by volume name.
    Sandbox(String),
    /// A tmpfs.
    Tmpfs,
    /// An encrypted filesystem of the workload's [`Workload::encfs`], by
    /// name: the agent mounts it at `/run/capsa/encfs/<name>` in the guest
    /// and the container gets a bind mount of that path.
    Encfs(String),
}

/// One container as its spec describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    /// Name (unique in the workload).
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Overrides the image's entrypoint.
    pub command: Option<Vec<String>>,
    /// Overrides the image's cmd.
    pub args: Option<Vec<String>>,
    /// Environment, in spec order.
    pub env: Vec<EnvSpec>,
    /// Overrides the image's working directory.
    pub working_dir: Option<String>,
    /// Overrides the image's user ID.
    pub run_as_user: Option<u32>,
    /// Overrides the image's group ID.
    pub run_as_group: Option<u32>,
    /// Supplementary groups.
    pub supplemental_groups: Vec<u32>,
    /// Privileged.
    pub privileged: bool,
    /// `Some(false)` sets no_new_privileges.
    pub allow_privilege_escalation: Option<bool>,
    /// Read-only root filesystem.
    pub read_only_rootfs: bool,
    /// Capabilities added to the default set (`CAP_` prefix optional).
    pub cap_add: Vec<String>,
    /// Capabilities dropped (`ALL` drops every default).
    pub cap_drop: Vec<String>,
    /// Volume mounts.
    pub mounts: Vec<MountSpec>,
    /// Sysctls.
    pub sysctls: BTreeMap<String, String>,
    /// SHA-256 of a seccomp profile the runtime will apply.
    pub seccomp_profile_sha256: Option<String>,
    /// Commands the platform itself runs in the container (exec probes,
    /// lifecycle hooks): allowed for `exec_process`.
    pub exec: Vec<Vec<String>>,
    /// Whether stdin is attached (allows write_stdin).
    pub stdin: bool,
    /// Whether a TTY is attached.
    pub tty: bool,
}
