//! Containers: an overlay of verified layers, in their own mount, PID, IPC
//! and UTS namespaces, running as the user with the capabilities the policy
//! allowed.
//!
//! This module owns a container's bundle (`<root>/<name>/` with `spec.json`,
//! the overlay's `upper/` and `work/`, and the `rootfs/` mount point) and the
//! processes that turn a bundle into a running workload.
//!
//! # Why the agent re-executes itself
//!
//! The agent is multithreaded, and `fork` in a multithreaded process may
//! only call async-signal-safe functions until it execs; Rust cannot promise
//! that without `unsafe`, which the workspace denies. So every step that
//! changes a process's namespaces or credentials runs in a fresh,
//! single-threaded copy of the agent (`/proc/self/exe` with a stage marker
//! as its first argument, dispatched by [`run_stage_if_requested`]):
//!
//! 1. `__container-stage1 <bundle>` unshares mount, PID, IPC and UTS
//!    namespaces, makes its mount tree private, mounts the overlay of the
//!    layers at `rootfs/`, starts stage 2, and once stage 2 has exec'd the
//!    workload (or failed) records its PID in `<bundle>/pid`; it then exits
//!    with the workload's status (128 + signal if a signal ended it). The PID
//!    is published only after the exec so that nobody can signal or join a
//!    container whose namespaces are still being set up.
//! 2. `__container-stage2 <bundle>` is PID 1 of the new PID namespace. It
//!    mounts `/dev` and the spec's mounts inside `rootfs/`, masks the kernel
//!    interfaces an unprivileged container must not reach, writes sysctls,
//!    sets the hostname, pivots into `rootfs/`, makes it read-only if asked,
//!    drops to the spec's user, groups and capabilities, and execs the
//!    workload, which thereby is PID 1 of its namespace.
//! 3. `__container-exec <bundle> <exec-spec.json> <pid>` joins the running
//!    container's namespaces, drops privileges and spawns the process (a
//!    joined PID namespace applies only to children), records its PID and
//!    exits with its status.
//!
//! Every mount a container makes lives in stage 1's mount namespace, which
//! disappears with the container's last process: no unmount is ever needed,
//! and none can be forgotten. Mount points inside the container's root are
//! resolved with `openat2(RESOLVE_IN_ROOT)` and mounted through
//! `/proc/self/fd`, so a symlink in an image cannot aim a mount at the
//! guest's own filesystem.
//!
//! # Exit codes
//!
//! A stage that fails prints one line naming what failed on the container's
//! stderr (`capsa container init: cannot mount proc at /proc: ...`) and
//! exits with [`EXIT_SETUP_FAILED`], [`EXIT_CANNOT_EXECUTE`] or
//! [`EXIT_NOT_FOUND`], the codes shells and container runtimes use for the
//! same failures. A workload may of course exit with these codes too; the
//! stderr line tells them apart.

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::fs::{Gid, Mode, OFlags, ResolveFlags, Uid};
use rustix::io::Errno;
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::process::{Pid, Signal, WaitId, WaitIdOptions};
use rustix::thread::{CapabilitySet, CapabilitySets, LinkNameSpaceType, UnshareFlags};
use serde::{Deserialize, Serialize};

use crate::protocol::{Mount, User};

/// Exit code of a stage that could not set the container up (spec,
/// namespaces, mounts, privileges).
pub const EXIT_SETUP_FAILED: u8 = 125;
/// Exit code when the workload's program exists but cannot be executed.
pub const EXIT_CANNOT_EXECUTE: u8 = 126;
/// Exit code when the workload's program is not in the container.
pub const EXIT_NOT_FOUND: u8 = 127;

/// The program the agent runs for container stages: itself.
pub const SELF_EXE: &str = "/proc/self/exe";

const STAGE1: &str = "__container-stage1";
const STAGE2: &str = "__container-stage2";
const STAGE_EXEC: &str = "__container-exec";

const SPEC_FILE: &str = "spec.json";
const PID_FILE: &str = "pid";
/// Where stage 1 leaves its failure for the agent, whose copy of the
/// container's stderr may be nowhere near a person.
const ERROR_FILE: &str = "error";
/// The FIFO through which stage 1 learns that stage 2 has exec'd the
/// workload (or died): only then is the PID worth publishing.
const READY_FIFO: &str = "ready";
const UPPER: &str = "upper";
const WORK: &str = "work";
const ROOTFS: &str = "rootfs";

/// How long a stage may take to report the workload's PID; mounting an
/// overlay and starting a process take milliseconds, so this only fires
/// when something is badly wrong.
const PID_TIMEOUT: Duration = Duration::from_secs(30);
/// The PATH used to find a program when the spec's environment has none
/// (the OCI runtimes' default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The highest capability number rustix knows (CAP_CHECKPOINT_RESTORE),
/// used when the kernel does not say.
const DEFAULT_LAST_CAP: u32 = 40;
/// The longest container name: long enough for any Kubernetes name.
const MAX_NAME: usize = 253;
/// Characters that cannot appear in overlayfs' lowerdir/upperdir options
/// without escaping.
const OVERLAY_SPECIAL: &[u8] = b",:\\\n";
/// The guest's device nodes every container gets in its `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];
/// Kernel interfaces hidden from unprivileged containers (the defaults of
/// containerd and runc).
const MASKED_PATHS: [&str; 11] = [
    "proc/acpi",
    "proc/asound",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/timer_list",
    "proc/timer_stats",
    "proc/sched_debug",
    "proc/scsi",
    "sys/firmware",
    "sys/devices/virtual/powercap",
];
/// Kernel interfaces an unprivileged container may read but not write:
/// writable `/proc/sys` alone would let container root reconfigure the
/// guest kernel (`kernel.core_pattern` runs a program as guest root).
const READONLY_PATHS: [&str; 5] = ["proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger"];

/// Why a container could not be created, started or entered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    /// The spec cannot describe a container; the message names the field
    /// (never an environment value).
    #[error("invalid container spec: {0}")]
    Invalid(String),
    /// A bundle of that name exists.
    #[error("container {name:?} already exists; remove it first")]
    Exists {
        /// The container's name.
        name: String,
    },
    /// A file operation on the bundle failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was attempted, on which path.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The bundle's spec file is unreadable.
    #[error("cannot parse the container spec {path}: {source}")]
    Spec {
        /// The spec file.
        path: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// A stage process could not be started.
    #[error("cannot start the container's {stage} ({program}): {source}")]
    Spawn {
        /// Which stage.
        stage: &'static str,
        /// The program that was run.
        program: PathBuf,
        /// Why it did not start.
        source: io::Error,
    },
    /// A stage ended before the workload was running.
    #[error("the container's {stage} ended ({status}) before the workload started: {reason}")]
    StageExited {
        /// Which stage.
        stage: &'static str,
        /// How it ended.
        status: String,
        /// What the stage reported.
        reason: String,
    },
    /// A stage did not report the workload's PID in time.
    #[error("the container's {stage} did not report the workload's PID within {} s; it was killed", PID_TIMEOUT.as_secs())]
    Timeout {
        /// Which stage.
        stage: &'static str,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> ContainerError {
    move |source| ContainerError::Io { what: what.into(), source }
}

/// Everything a container's stages need, written as `spec.json` into the
/// bundle. Built by the agent from a `create_container` request the policy
/// allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// The container's name: one path component (letters, digits, `.`, `_`,
    /// `-`), also the bundle's directory name.
    pub name: String,
    /// The hostname inside the container (at most 64 bytes).
    pub hostname: String,
    /// Committed layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// The workload's arguments; the first is the program, looked up in the
    /// PATH of `env` when it has no `/`.
    pub args: Vec<String>,
    /// The workload's whole environment, as `NAME=value`.
    pub env: Vec<String>,
    /// The workload's working directory (created if missing); empty means `/`.
    pub working_dir: String,
    /// User, primary group and supplementary groups.
    pub user: User,
    /// Capabilities the workload keeps (`CAP_CHOWN` or `CHOWN`); every other
    /// one is dropped from all sets, including the bounding set.
    pub capabilities: Vec<String>,
    /// Sets no_new_privs, so set-id and file-capability programs cannot
    /// gain privileges.
    pub no_new_privileges: bool,
    /// Keeps every capability and leaves `/proc` and `/sys` unmasked and
    /// writable.
    pub privileged: bool,
    /// Makes the container's root filesystem read-only once set up.
    pub read_only_rootfs: bool,
    /// Mounts, in order: `proc`, `tmpfs`, `devpts`, `mqueue`, `sysfs` or
    /// `bind` (whose source is a guest path). `/dev` is always provided.
    pub mounts: Vec<Mount>,
    /// Sysctls (`net.core.somaxconn` or `net/core/somaxconn`) and values.
    pub sysctls: BTreeMap<String, String>,
}

/// A further process to run in a running container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecSpec {
    /// The arguments; the first is the program, looked up in the PATH of
    /// `env` when it has no `/`.
    pub args: Vec<String>,
    /// The whole environment, as `NAME=value`.
    pub env: Vec<String>,
    /// The working directory; empty means `/`.
    pub working_dir: String,
    /// User, primary group and supplementary groups.
    pub user: User,
    /// Capabilities the process keeps; all others are dropped.
    pub capabilities: Vec<String>,
    /// Sets no_new_privs.
    pub no_new_privileges: bool,
}

impl ContainerSpec {
    /// Checks what the stages would otherwise discover too late.
    pub fn validate(&self) -> Result<(), ContainerError> {
        validate_name(&self.name)?;
        if self.hostname.len() > 64 {
            return invalid("the hostname is longer than 64 bytes");
        }
        if self.layers.is_empty() {
            return invalid("a container needs at least one layer");
        }
        for layer in &self.layers {
            let bytes = layer.as_os_str().as_bytes();
            if !layer.is_absolute() || bytes.iter().any(|b| OVERLAY_SPECIAL.contains(b) || *b == 0) {
                return invalid(format!(
                    "layer directory {} must be an absolute path without ',', ':', '\\' or newlines",
                    layer.display()
                ));
            }
        }
        for (index, mount) in self.mounts.iter().enumerate() {
            container_path(&mount.destination)
                .map_err(|reason| ContainerError::Invalid(format!("mount {index}: destination {reason}")))?;
            if mount.destination.trim_matches('/').is_empty() {
                return invalid(format!("mount {index} would cover the container's root directory"));
            }
            let bind = mount.fs_type == "bind" || mount.options.iter().any(|o| o == "bind" || o == "rbind");
            if !bind && !["proc", "tmpfs", "devpts", "mqueue", "sysfs"].contains(&mount.fs_type.as_str()) {
                return invalid(format!("mount {index} has unsupported type {:?}", mount.fs_type));
            }
            if bind && !Path::new(&mount.source).is_absolute() {
                return invalid(format!("bind mount {index} needs an absolute guest source path"));
            }
        }
        for key in self.sysctls.keys() {
            sysctl_path(key).map_err(ContainerError::Invalid)?;
        }
        self.process().validate()
    }

    /// The workload as a process description.
    fn process(&self) -> ExecSpec {
        ExecSpec {
            args: self.args.clone(),
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            user: self.user.clone(),
            capabilities: self.capabilities.clone(),
            no_new_privileges: self.no_new_privileges,
        }
    }
}

impl ExecSpec {
    /// Checks the arguments, environment, user and capabilities.
    pub fn validate(&self) -> Result<(), ContainerError> {
        match self.args.first() {
            None => return invalid("the process has no arguments; the first names the program"),
            Some(program) if program.is_empty() => return invalid("the program name is empty"),
            Some(_) => {}
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return invalid("an argument contains a NUL byte");
        }
        for (index, entry) in self.env.iter().enumerate() {
            // Only the position is named: values may be secrets.
            match entry.split_once('=') {
                Some((name, _)) if !name.is_empty() && !entry.contains('\0') => {}
                _ => return invalid(format!("environment entry {index} is not NAME=value")),
            }
        }
        if !self.working_dir.is_empty() {
            container_path(&self.working_dir).map_err(|r| ContainerError::Invalid(format!("working_dir {r}")))?;
        }
        let User { uid, gid, groups } = &self.user;
        if *uid == u32::MAX || *gid == u32::MAX || groups.contains(&u32::MAX) {
            return invalid("4294967295 is not a valid user or group ID");
        }
        if groups.len() > 65536 {
            return invalid("more than 65536 supplementary groups");
        }
        capability_set(&self.capabilities, false, DEFAULT_LAST_CAP).map_err(ContainerError::Invalid)?;
        Ok(())
    }
}

fn invalid<T>(message: impl Into<String>) -> Result<T, ContainerError> {
    Err(ContainerError::Invalid(message.into()))
}

fn validate_name(name: &str) -> Result<(), ContainerError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        invalid(format!(
            "container name {:?} must be 1 to {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.'",
            name.chars().take(MAX_NAME).collect::<String>()
        ))
    }
}

/// An absolute path inside the container, as a relative path below its
/// root; `..` is refused rather than interpreted.
fn container_path(path: &str) -> Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err(format!("{path:?} is not absolute"));
    }
    let mut rel = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return Err(format!("{path:?} contains `..`")),
        }
    }
    Ok(rel)
}

/// A container's directory: its spec, the overlay's upper and work
/// directories and the mount point of its root.
#[derive(Debug)]
pub struct Bundle {
    dir: PathBuf,
}

impl Bundle {
    /// Creates `<root>/<spec.name>/` and writes the spec into it (mode 0600:
    /// the environment may hold secrets).
    pub fn create(root: &Path, spec: &ContainerSpec) -> Result<Self, ContainerError> {
        spec.validate()?;
        fs::create_dir_all(root).map_err(io_error(format!("create {}", root.display())))?;
        // Stage 1 changes directory before it uses the bundle's paths.
        let root = std::path::absolute(root).map_err(io_error(format!("resolve {}", root.display())))?;
        let dir = root.join(&spec.name);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(ContainerError::Exists { name: spec.name.clone() });
            }
            Err(e) => return Err(io_error(format!("create {}", dir.display()))(e)),
        }
        let bundle = Self { dir };
        match bundle.populate(spec) {
            Ok(()) => Ok(bundle),
            Err(e) => {
                let _ = bundle.remove();
                Err(e)
            }
        }
    }

    /// Opens the bundle directory of an existing container.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ContainerError> {
        let dir = dir.as_ref();
        let dir = std::path::absolute(dir).map_err(io_error(format!("resolve {}", dir.display())))?;
        let bundle = Self { dir };
        bundle.spec()?;
        Ok(bundle)
    }

    fn populate(&self, spec: &ContainerSpec) -> Result<(), ContainerError> {
        let upper = self.dir.join(UPPER);
        DirBuilder::new().mode(0o755).create(&upper).map_err(io_error(format!("create {}", upper.display())))?;
        // The upper directory is the container's `/`: it must look like the
        // top layer's root, or a non-root user could not even enter it.
        if let Some(top) = spec.layers.last() {
            let meta = fs::metadata(top).map_err(io_error(format!("inspect layer {}", top.display())))?;
            std::os::unix::fs::chown(&upper, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_error(format!("chown {}", upper.display())))?;
            fs::set_permissions(&upper, fs::Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(io_error(format!("chmod {}", upper.display())))?;
        }
        for (name, mode) in [(WORK, 0o700), (ROOTFS, 0o755)] {
            let path = self.dir.join(name);
            DirBuilder::new().mode(mode).create(&path).map_err(io_error(format!("create {}", path.display())))?;
        }
        let json = serde_json::to_vec_pretty(spec)
            .map_err(|source| ContainerError::Spec { path: self.dir.join(SPEC_FILE), source })?;
        write_new_file(&self.dir.join(SPEC_FILE), &json)
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the spec back.
    pub fn spec(&self) -> Result<ContainerSpec, ContainerError> {
        read_json(&self.dir.join(SPEC_FILE))
    }

    /// Removes the bundle. Its mounts need no unmounting: they live in the
    /// container's mount namespace, which ended with its last process.
    /// Call this only after the container has stopped.
    pub fn remove(self) -> Result<(), ContainerError> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(format!("remove {}", self.dir.display()))(e)),
        }
    }
}

fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), ContainerError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(format!("create {}", path.display())))?;
    file.write_all(bytes).map_err(io_error(format!("write {}", path.display())))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ContainerError> {
    let bytes = fs::read(path).map_err(io_error(format!("read {}", path.display())))?;
    serde_json::from_slice(&bytes).map_err(|source| ContainerError::Spec { path: path.to_path_buf(), source })
}

/// A started container or exec'd process.
#[derive(Debug)]
pub struct Started {
    /// The stage process the agent spawned; its exit status is the
    /// workload's (128 + signal when a signal ended it), or one of the
    /// `EXIT_*` codes when setting up failed.
    pub child: Child,
    /// The workload's PID in the agent's PID namespace, to signal it.
    pub pid: u32,
}

/// Starts a created container, running the stages from the agent's own
/// executable.
pub fn start(bundle: &Bundle, stdin: Stdio, stdout: Stdio, stderr: Stdio) -> Result<Started, ContainerError> {
    start_with(Path::new(SELF_EXE), bundle, stdin, stdout, stderr)
}

/// [`start`], with the stages run from `stage_exe` (a `capsa-agent` binary;
/// tests use the one cargo built).
pub fn start_with(
    stage_exe: &Path,
    bundle: &Bundle,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Started, ContainerError> {
    let pid_file = bundle.dir.join(PID_FILE);
    let error_file = bundle.dir.join(ERROR_FILE);
    for stale in [&pid_file, &error_file] {
        match fs::remove_file(stale) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(format!("remove {}", stale.display()))(e)),
        }
    }
    let mut child = Command::new(stage_exe)
        .arg(STAGE1)
        .arg(&bundle.dir)
        .env_clear()
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|source| ContainerError::Spawn { stage: "stage 1", program: stage_exe.to_path_buf(), source })?;
    let pid = wait_for_pid(&mut child, &pid_file, &error_file, "stage 1")?;
    Ok(Started { child, pid })
}

/// Runs a further process in the running container whose workload is
/// `container_pid`, running the exec stage from the agent's own executable.
pub fn exec(
    bundle: &Bundle,
    container_pid: u32,
    process: &ExecSpec,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Started, ContainerError> {
    exec_with(Path::new(SELF_EXE), bundle, container_pid, process, stdin, stdout, stderr)
}

/// [`exec`], with the stage run from `stage_exe`.
pub fn exec_with(
    stage_exe: &Path,
    bundle: &Bundle,
    container_pid: u32,
    process: &ExecSpec,
    stdin: Stdio,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Started, ContainerError> {
    static NEXT_EXEC: AtomicU64 = AtomicU64::new(0);
    process.validate()?;
    let json = serde_json::to_vec(process)
        .map_err(|source| ContainerError::Spec { path: bundle.dir.join("exec.json"), source })?;
    let spec_file = loop {
        let n = NEXT_EXEC.fetch_add(1, Ordering::Relaxed);
        let path = bundle.dir.join(format!("exec-{n}.json"));
        match write_new_file(&path, &json) {
            Ok(()) => break path,
            Err(ContainerError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    };
    let pid_file = spec_file.with_extension("pid");
    let error_file = spec_file.with_extension("error");
    let spawned = Command::new(stage_exe)
        .arg(STAGE_EXEC)
        .arg(&bundle.dir)
        .arg(&spec_file)
        .arg(container_pid.to_string())
        .env_clear()
        .stdin(stdin)
        .stdout(stdout)
        .stderr(stderr)
        .spawn();
    let result = spawned
        .map_err(|source| ContainerError::Spawn { stage: "exec stage", program: stage_exe.to_path_buf(), source })
        .and_then(|mut child| {
            let pid = wait_for_pid(&mut child, &pid_file, &error_file, "exec stage")?;
            Ok(Started { child, pid })
        });
    for file in [&spec_file, &pid_file, &error_file] {
        let _ = fs::remove_file(file);
    }
    result
}

/// Waits until a stage has written a PID, without reaping the stage: in
/// the guest the agent's reaper owns every exit status.
fn wait_for_pid(
    child: &mut Child,
    pid_file: &Path,
    error_file: &Path,
    stage: &'static str,
) -> Result<u32, ContainerError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(pid) = read_pid(pid_file) {
            return Ok(pid);
        }
        if let Some(status) = peek_exit(child.id()) {
            // The stage may have written the PID just before it ended.
            if let Some(pid) = read_pid(pid_file) {
                return Ok(pid);
            }
            // Nobody will track a stage that failed to start its process, so
            // reap it here (a PID 1 reaper that got there first is fine too).
            let _ = child.wait();
            let reason = fs::read_to_string(error_file)
                .ok()
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "its stderr says why".to_owned());
            return Err(ContainerError::StageExited { stage, status, reason });
        }
        if started.elapsed() > PID_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ContainerError::Timeout { stage });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// A PID file's value once completely written (a number and a newline).
fn read_pid(path: &Path) -> Option<u32> {
    let text = fs::read_to_string(path).ok()?;
    text.strip_suffix('\n')?.parse().ok()
}

/// How a child ended, if it has, leaving it for whoever reaps it.
fn peek_exit(pid: u32) -> Option<String> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?)?;
    match rustix::process::waitid(
        WaitId::Pid(pid),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
    ) {
        Ok(Some(status)) => Some(describe_exit(status.exit_status(), status.terminating_signal())),
        Ok(None) => None,
        // Already reaped (by the agent's reaper): it has ended.
        Err(_) => Some("it has exited".to_owned()),
    }
}

fn describe_exit(code: Option<i32>, signal: Option<i32>) -> String {
    match (code, signal) {
        (Some(code), _) => {
            let meaning = match u8::try_from(code) {
                Ok(EXIT_SETUP_FAILED) => ": the container could not be set up",
                Ok(EXIT_CANNOT_EXECUTE) => ": the program could not be executed",
                Ok(EXIT_NOT_FOUND) => ": the program was not found",
                _ => "",
            };
            format!("exit code {code}{meaning}")
        }
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "unknown status".to_owned(),
    }
}

/// Runs the container stage named by the first argument, if there is one,
/// and returns its exit code; `None` when this process is not a stage.
/// `main` calls this before anything else.
pub fn run_stage_if_requested() -> Option<ExitCode> {
    let mut args = std::env::args_os().skip(1);
    let stage = args.next()?;
    let rest: Vec<OsString> = args.collect();
    let (name, result) = match stage.to_str()? {
        STAGE1 => ("setup", stage1(&rest)),
        STAGE2 => ("init", stage2(&rest)),
        STAGE_EXEC => ("exec", exec_stage(&rest)),
        _ => return None,
    };
    Some(ExitCode::from(match result {
        Ok(code) => code,
        Err(failure) => {
            // One line on the container's stderr, where its logs go.
            eprintln!("capsa container {name}: {}", failure.message);
            failure.code
        }
    }))
}

/// Why a stage gave up, and the code it exits with.
#[derive(Debug)]
struct StageFailure {
    message: String,
    code: u8,
}

impl StageFailure {
    fn setup(message: impl Into<String>) -> Self {
        Self { message: message.into(), code: EXIT_SETUP_FAILED }
    }
}

impl From<ContainerError> for StageFailure {
    fn from(e: ContainerError) -> Self {
        Self::setup(e.to_string())
    }
}

/// `cannot <what>: <error>` as a setup failure.
fn cannot<E: std::fmt::Display>(what: impl std::fmt::Display) -> impl FnOnce(E) -> StageFailure {
    move |e| StageFailure::setup(format!("cannot {what}: {e}"))
}

fn stage_args<const N: usize>(args: &[OsString]) -> Result<[&OsStr; N], StageFailure> {
    let refs: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    refs.try_into().map_err(|_| StageFailure::setup(format!("expected {N} arguments after the stage name")))
}

fn read_bundle_spec(bundle: &Path) -> Result<ContainerSpec, StageFailure> {
    let spec: ContainerSpec = read_json(&bundle.join(SPEC_FILE))?;
    spec.validate()?;
    Ok(spec)
}

/// Stage 1: namespaces and the overlay, then stage 2, then its status.
fn stage1(args: &[OsString]) -> Result<u8, StageFailure> {
    let [bundle] = stage_args(args)?;
    let bundle = Path::new(bundle);
    // Stage 2's pivot_root moves the root of every process in the mount
    // namespace, this one included; the bundle stays reachable only
    // through a descriptor opened before.
    let dir = rustix::fs::open(bundle, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(cannot(format!("open the bundle {}", bundle.display())))?;
    stage1_in(bundle, &dir).inspect_err(|failure| {
        let _ = replace_file_at(&dir, ERROR_FILE, failure.message.as_bytes());
    })
}

/// Writes `name` in `dir` atomically (a temporary file, then a rename).
fn replace_file_at(dir: &OwnedFd, name: &str, contents: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    let flags = OFlags::CREATE | OFlags::TRUNC | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut file = File::from(rustix::fs::openat(dir, &tmp, flags, Mode::from_raw_mode(0o600))?);
    file.write_all(contents)?;
    drop(file);
    Ok(rustix::fs::renameat(dir, &tmp, dir, name)?)
}

fn stage1_in(bundle: &Path, dir: &OwnedFd) -> Result<u8, StageFailure> {
    let spec = read_bundle_spec(bundle)?;
    if bundle.as_os_str().as_bytes().iter().any(|b| OVERLAY_SPECIAL.contains(b)) {
        return Err(StageFailure::setup("the bundle path contains characters overlayfs options cannot carry"));
    }
    let flags = UnshareFlags::NEWNS | UnshareFlags::NEWPID | UnshareFlags::NEWIPC | UnshareFlags::NEWUTS;
    // SAFETY: `unshare_unsafe` is unsafe only because of CLONE_FILES, which
    // would give threads different file descriptor tables; it is not among
    // these flags, and this freshly executed stage has a single thread.
    #[allow(unsafe_code)]
    let unshared = unsafe { rustix::thread::unshare_unsafe(flags) };
    unshared.map_err(cannot("create the container's namespaces"))?;
    // Nothing mounted from here on may propagate back to the guest.
    rustix::mount::mount_change("/", MountPropagationFlags::REC | MountPropagationFlags::PRIVATE)
        .map_err(cannot("make the mount tree private"))?;
    mount_overlay(bundle, &spec)?;

    let fifo = bundle.join(READY_FIFO);
    let _ = fs::remove_file(&fifo);
    rustix::fs::mknodat(rustix::fs::CWD, &fifo, rustix::fs::FileType::Fifo, Mode::from_raw_mode(0o600), 0)
        .map_err(cannot(format!("create {}", fifo.display())))?;
    let ready = rustix::fs::open(&fifo, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC, Mode::empty())
        .map_err(cannot(format!("open {}", fifo.display())))?;
    // Holding a write end of our own keeps the FIFO from reading as closed
    // before stage 2 has opened it.
    let guard = rustix::fs::open(&fifo, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(cannot(format!("open {}", fifo.display())))?;
    let mut child = Command::new(SELF_EXE)
        .arg(STAGE2)
        .arg(bundle)
        .env_clear()
        .spawn()
        .map_err(cannot("start the container's init"))?;
    let waited = wait_for_exec(&ready, guard, &mut child);
    let _ = rustix::fs::unlinkat(dir, READY_FIFO, rustix::fs::AtFlags::empty());
    let written = waited.and_then(|()| {
        replace_file_at(dir, PID_FILE, format!("{}\n", child.id()).as_bytes())
            .map_err(cannot(format!("record the workload's PID in {}", bundle.join(PID_FILE).display())))
    });
    if let Err(failure) = written {
        let _ = child.kill();
        let _ = child.wait();
        return Err(failure);
    }
    let status = child.wait().map_err(cannot("wait for the container's init"))?;
    Ok(exit_code(status))
}

/// Returns once stage 2 has exec'd the workload or died: stage 2 writes a
/// byte when it has opened the FIFO, and its write end (close-on-exec)
/// closes when it execs or exits.
fn wait_for_exec(ready: &OwnedFd, guard: OwnedFd, child: &mut Child) -> Result<(), StageFailure> {
    let mut byte = [0u8; 1];
    let mut pause = Duration::from_millis(1);
    loop {
        match rustix::io::read(ready, &mut byte) {
            Ok(n) if n > 0 => break,
            Ok(_) | Err(Errno::AGAIN) | Err(Errno::INTR) => {}
            Err(e) => return Err(cannot("read the readiness FIFO")(e)),
        }
        // Died before it opened the FIFO.
        if child.try_wait().map_err(cannot("check on the container's init"))?.is_some() {
            return Ok(());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(10));
    }
    drop(guard);
    rustix::fs::fcntl_setfl(ready, OFlags::empty()).map_err(cannot("wait on the readiness FIFO"))?;
    loop {
        match rustix::io::read(ready, &mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(cannot("read the readiness FIFO")(e)),
        }
    }
}

fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(u8::MAX),
        (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(u8::MAX),
        (None, None) => u8::MAX,
    }
}

/// Mounts the overlay of the layers, top first, at `<bundle>/rootfs`.
fn mount_overlay(bundle: &Path, spec: &ContainerSpec) -> Result<(), StageFailure> {
    // Committed layers share a directory; naming them relative to it keeps
    // the options within the kernel's one-page limit for many more layers.
    let parent = spec.layers.first().and_then(|l| l.parent());
    let shared_parent = parent.filter(|p| spec.layers.iter().all(|l| l.parent() == Some(*p)));
    if let Some(parent) = shared_parent {
        rustix::process::chdir(parent).map_err(cannot(format!("enter the layer directory {}", parent.display())))?;
    }
    let mut options = b"lowerdir=".to_vec();
    for (i, layer) in spec.layers.iter().rev().enumerate() {
        if i > 0 {
            options.push(b':');
        }
        let name = match (shared_parent, layer.file_name()) {
            (Some(_), Some(name)) => name,
            _ => layer.as_os_str(),
        };
        options.extend_from_slice(name.as_bytes());
    }
    for (key, dir) in [(",upperdir=", UPPER), (",workdir=", WORK)] {
        options.extend_from_slice(key.as_bytes());
        options.extend_from_slice(bundle.join(dir).as_os_str().as_bytes());
    }
    let options = CString::new(options).map_err(cannot("build the overlay options"))?;
    let rootfs = bundle.join(ROOTFS);
    rustix::mount::mount("overlay", &rootfs, "overlay", MountFlags::empty(), options.as_c_str())
        .map_err(cannot(format!("mount the overlay of {} layers at {}", spec.layers.len(), rootfs.display())))?;
    rustix::process::chdir("/").map_err(cannot("return to /"))?;
    Ok(())
}

/// Stage 2: PID 1 of the container. Returns only on failure.
fn stage2(args: &[OsString]) -> Result<u8, StageFailure> {
    let [bundle] = stage_args(args)?;
    let bundle = Path::new(bundle);
    // Tell stage 1 we are running; the descriptor closes when the workload
    // is exec'd (or this stage exits), which is what stage 1 waits for.
    let fifo = bundle.join(READY_FIFO);
    let ready = rustix::fs::open(&fifo, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(cannot(format!("open {}", fifo.display())))?;
    rustix::io::write(&ready, b"r").map_err(cannot(format!("write {}", fifo.display())))?;
    // If stage 1 dies, the container must not live on unsupervised.
    rustix::process::set_parent_process_death_signal(Some(Signal::KILL))
        .map_err(cannot("tie the container to its stage 1"))?;
    let spec = read_bundle_spec(bundle)?;
    let last_cap = last_capability();
    let allowed = capability_set(&spec.capabilities, spec.privileged, last_cap).map_err(StageFailure::setup)?;

    let rootfs = bundle.join(ROOTFS);
    let root = rustix::fs::open(&rootfs, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(cannot(format!("open the container root {}", rootfs.display())))?;
    mount_dev(&root)?;
    for mount in &spec.mounts {
        mount_one(&root, mount, spec.privileged)?;
    }
    if !spec.privileged {
        mask_kernel_interfaces(&root)?;
    }
    // Sysctls apply to the namespaces of the writer, so the guest's /proc
    // works before the pivot whether or not the container mounts its own.
    for (key, value) in &spec.sysctls {
        let path = sysctl_path(key).map_err(StageFailure::setup)?;
        fs::write(&path, value).map_err(cannot(format!("set sysctl {key}")))?;
    }
    rustix::system::sethostname(spec.hostname.as_bytes()).map_err(cannot("set the hostname"))?;
    pivot_into(&rootfs)?;
    let process = spec.process();
    let working_dir = if process.working_dir.is_empty() { "/" } else { process.working_dir.as_str() };
    // Created as root like other runtimes do; a failure shows at chdir.
    let _ = fs::create_dir_all(working_dir);
    if spec.read_only_rootfs {
        rustix::mount::mount_remount("/", MountFlags::BIND | MountFlags::RDONLY, "")
            .map_err(cannot("make the root filesystem read-only"))?;
    }
    let program = resolve_program(&process)?;
    drop_privileges(&process, allowed, last_cap)?;
    rustix::process::chdir(working_dir).map_err(cannot(format!("enter the working directory {working_dir}")))?;
    let err = command(&program, &process).exec();
    drop(ready);
    Err(exec_failure(&program, &err))
}

/// The highest capability number the kernel knows.
fn last_capability() -> u32 {
    fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_LAST_CAP)
        .min(63)
}

/// The capabilities `names` allow (all of them for a privileged
/// container). An unknown name is an error, not ignored: a policy that
/// grants a capability the agent cannot name must not pass unnoticed.
fn capability_set(names: &[String], privileged: bool, last_cap: u32) -> Result<CapabilitySet, String> {
    let all = (0..=last_cap.min(63)).fold(CapabilitySet::empty(), |set, n| set | single_cap(n));
    if privileged {
        return Ok(all);
    }
    let mut set = CapabilitySet::empty();
    for name in names {
        let upper = name.to_ascii_uppercase();
        let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
        if bare == "ALL" {
            set |= all;
            continue;
        }
        set |= CapabilitySet::from_name(bare).ok_or_else(|| format!("unknown capability {name:?}"))?;
    }
    Ok(set)
}

fn single_cap(n: u32) -> CapabilitySet {
    CapabilitySet::from_bits_retain(1u64.checked_shl(n).unwrap_or(0))
}

/// `dev/`, then the guest's harmless device nodes bound into it.
fn mount_dev(root: &OwnedFd) -> Result<(), StageFailure> {
    let dev = ensure_dir(root, Path::new("dev")).map_err(cannot("create the mount point /dev"))?;
    rustix::mount::mount(
        "tmpfs",
        fd_path(&dev),
        "tmpfs",
        MountFlags::NOSUID | MountFlags::STRICTATIME,
        c"mode=755,size=65536k",
    )
    .map_err(cannot("mount tmpfs at /dev"))?;
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let rel = Path::new("dev").join(name);
        let target = ensure_file(root, &rel).map_err(cannot(format!("create /dev/{name}")))?;
        rustix::mount::mount_bind(&host, fd_path(&target)).map_err(cannot(format!("bind /dev/{name}")))?;
    }
    let dev = resolve(root, Path::new("dev"), OFlags::DIRECTORY).map_err(cannot("open /dev"))?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        rustix::fs::symlinkat(target, &dev, link).map_err(cannot(format!("create /dev/{link}")))?;
    }
    Ok(())
}

/// Mount flags, propagation and filesystem data parsed from OCI options.
#[derive(Debug)]
struct MountOptions {
    flags: MountFlags,
    propagation: Option<MountPropagationFlags>,
    bind: bool,
    recursive: bool,
    data: Vec<String>,
}

impl MountOptions {
    fn parse(options: &[String]) -> Self {
        let mut parsed =
            Self { flags: MountFlags::empty(), propagation: None, bind: false, recursive: false, data: Vec::new() };
        for option in options {
            let (set, clear) = match option.as_str() {
                "ro" => (MountFlags::RDONLY, MountFlags::empty()),
                "rw" => (MountFlags::empty(), MountFlags::RDONLY),
                "nosuid" => (MountFlags::NOSUID, MountFlags::empty()),
                "suid" => (MountFlags::empty(), MountFlags::NOSUID),
                "nodev" => (MountFlags::NODEV, MountFlags::empty()),
                "dev" => (MountFlags::empty(), MountFlags::NODEV),
                "noexec" => (MountFlags::NOEXEC, MountFlags::empty()),
                "exec" => (MountFlags::empty(), MountFlags::NOEXEC),
                "sync" => (MountFlags::SYNCHRONOUS, MountFlags::empty()),
                "async" => (MountFlags::empty(), MountFlags::SYNCHRONOUS),
                "dirsync" => (MountFlags::DIRSYNC, MountFlags::empty()),
                "noatime" => (MountFlags::NOATIME, MountFlags::empty()),
                "atime" => (MountFlags::empty(), MountFlags::NOATIME),
                "nodiratime" => (MountFlags::NODIRATIME, MountFlags::empty()),
                "diratime" => (MountFlags::empty(), MountFlags::NODIRATIME),
                "relatime" => (MountFlags::RELATIME, MountFlags::empty()),
                "norelatime" => (MountFlags::empty(), MountFlags::RELATIME),
                "strictatime" => (MountFlags::STRICTATIME, MountFlags::empty()),
                "nostrictatime" => (MountFlags::empty(), MountFlags::STRICTATIME),
                "bind" => {
                    parsed.bind = true;
                    continue;
                }
                "rbind" => {
                    parsed.bind = true;
                    parsed.recursive = true;
                    continue;
                }
                "defaults" | "remount" => continue,
                other => {
                    if let Some(p) = propagation(other) {
                        parsed.propagation = Some(p);
                    } else {
                        parsed.data.push(other.to_owned());
                    }
                    continue;
                }
            };
            parsed.flags.insert(set);
            parsed.flags.remove(clear);
        }
        parsed
    }
}

fn propagation(option: &str) -> Option<MountPropagationFlags> {
    use MountPropagationFlags as P;
    Some(match option {
        "private" => P::PRIVATE,
        "rprivate" => P::PRIVATE | P::REC,
        "shared" => P::SHARED,
        "rshared" => P::SHARED | P::REC,
        "slave" => P::DOWNSTREAM,
        "rslave" => P::DOWNSTREAM | P::REC,
        "unbindable" => P::UNBINDABLE,
        "runbindable" => P::UNBINDABLE | P::REC,
        _ => return None,
    })
}

/// One mount of the spec, inside the container's root.
fn mount_one(root: &OwnedFd, mount: &Mount, privileged: bool) -> Result<(), StageFailure> {
    let rel = container_path(&mount.destination).map_err(StageFailure::setup)?;
    let kind = mount.fs_type.as_str();
    let dest = &mount.destination;
    if rel == Path::new("dev") {
        // The sandbox provides /dev; a tmpfs there is what it already is.
        return if kind == "tmpfs" {
            Ok(())
        } else {
            Err(StageFailure::setup(format!("cannot mount {kind} at /dev: /dev is provided by the sandbox")))
        };
    }
    let options = MountOptions::parse(&mount.options);
    if kind == "bind" || options.bind {
        let source = Path::new(&mount.source);
        let is_dir = fs::metadata(source).map_err(cannot(format!("bind {}: its source", source.display())))?.is_dir();
        let target = if is_dir { ensure_dir(root, &rel) } else { ensure_file(root, &rel) }
            .map_err(cannot(format!("create the mount point {dest}")))?;
        let bound = if options.recursive {
            rustix::mount::mount_bind_recursive(source, fd_path(&target))
        } else {
            rustix::mount::mount_bind(source, fd_path(&target))
        };
        bound.map_err(cannot(format!("bind {} at {dest}", source.display())))?;
        if !options.flags.is_empty() {
            // A bind mount ignores flags until remounted; through a fresh
            // handle, since the old one names the directory underneath.
            let mounted = resolve(root, &rel, OFlags::empty()).map_err(cannot(format!("open {dest}")))?;
            rustix::mount::mount_remount(fd_path(&mounted), MountFlags::BIND | options.flags, "")
                .map_err(cannot(format!("apply {:?} to the bind mount at {dest}", mount.options)))?;
        }
    } else {
        if !["proc", "tmpfs", "devpts", "mqueue", "sysfs"].contains(&kind) {
            return Err(StageFailure::setup(format!("cannot mount {kind} at {dest}: unsupported filesystem type")));
        }
        let mut flags = options.flags;
        if kind == "sysfs" && !privileged {
            flags |= MountFlags::RDONLY;
        }
        let target = ensure_dir(root, &rel).map_err(cannot(format!("create the mount point {dest}")))?;
        let data = CString::new(options.data.join(",")).map_err(cannot(format!("mount {kind} at {dest}")))?;
        let source = if mount.source.is_empty() { kind } else { mount.source.as_str() };
        let data = (!data.as_bytes().is_empty()).then_some(data.as_c_str());
        rustix::mount::mount(source, fd_path(&target), kind, flags, data)
            .map_err(cannot(format!("mount {kind} at {dest}")))?;
    }
    if let Some(propagation) = options.propagation {
        let mounted = resolve(root, &rel, OFlags::empty()).map_err(cannot(format!("open {dest}")))?;
        rustix::mount::mount_change(fd_path(&mounted), propagation)
            .map_err(cannot(format!("set the propagation of {dest}")))?;
    }
    Ok(())
}

/// Hides or freezes the kernel interfaces that would let an unprivileged
/// container reach past its namespaces.
fn mask_kernel_interfaces(root: &OwnedFd) -> Result<(), StageFailure> {
    for path in MASKED_PATHS {
        let Some(fd) = resolve_existing(root, path)? else { continue };
        let is_dir = rustix::fs::fstat(&fd)
            .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory);
        let masked = if is_dir {
            rustix::mount::mount("tmpfs", fd_path(&fd), "tmpfs", MountFlags::RDONLY, None)
        } else {
            rustix::mount::mount_bind("/dev/null", fd_path(&fd))
        };
        masked.map_err(cannot(format!("mask /{path}")))?;
    }
    for path in READONLY_PATHS {
        let Some(fd) = resolve_existing(root, path)? else { continue };
        rustix::mount::mount_bind_recursive(fd_path(&fd), fd_path(&fd))
            .map_err(cannot(format!("bind /{path} read-only")))?;
        let mounted = resolve(root, Path::new(path), OFlags::empty()).map_err(cannot(format!("open /{path}")))?;
        let flags = MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        rustix::mount::mount_remount(fd_path(&mounted), flags, "")
            .map_err(cannot(format!("make /{path} read-only")))?;
    }
    Ok(())
}

fn resolve_existing(root: &OwnedFd, path: &str) -> Result<Option<OwnedFd>, StageFailure> {
    match resolve(root, Path::new(path), OFlags::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(cannot(format!("open /{path}"))(e)),
    }
}

/// The path through which mount(2) reaches what `fd` refers to.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Opens `rel` inside the container's root with every symlink resolved as
/// the container would resolve it, never beyond its root.
fn resolve(root: &OwnedFd, rel: &Path, flags: OFlags) -> Result<OwnedFd, Errno> {
    let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    rustix::fs::openat2(
        root,
        rel,
        OFlags::PATH | OFlags::CLOEXEC | flags,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens directory `rel` inside the root, creating what is missing (0755).
fn ensure_dir(root: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    let mut dir = resolve(root, Path::new(""), OFlags::DIRECTORY)?;
    let mut prefix = PathBuf::new();
    for component in rel.components() {
        let Component::Normal(name) = component else { continue };
        prefix.push(name);
        dir = match resolve(root, &prefix, OFlags::DIRECTORY) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                resolve(root, &prefix, OFlags::DIRECTORY)?
            }
            Err(e) => return Err(e.into()),
        };
    }
    Ok(dir)
}

/// Opens `rel` inside the root, creating an empty file (and its parents)
/// if nothing is there: the mount point for a file bind.
fn ensure_file(root: &OwnedFd, rel: &Path) -> io::Result<OwnedFd> {
    match resolve(root, rel, OFlags::empty()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(e) => return Err(e.into()),
    }
    let parent = ensure_dir(root, rel.parent().unwrap_or(Path::new("")))?;
    let name = rel.file_name().ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let flags = OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    match rustix::fs::openat(&parent, name, flags, Mode::from_raw_mode(0o644)) {
        Ok(_) | Err(Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(resolve(root, rel, OFlags::empty())?)
}

/// `/proc/sys/...` for a sysctl name in either notation.
fn sysctl_path(key: &str) -> Result<PathBuf, String> {
    let rel = if key.contains('/') { key.to_owned() } else { key.replace('.', "/") };
    let valid = !rel.is_empty()
        && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && rel.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b));
    if valid { Ok(Path::new("/proc/sys").join(rel)) } else { Err(format!("sysctl name {key:?} is not valid")) }
}

/// Makes `rootfs` the root: `pivot_root(".", ".")` stacks the old root on
/// the new one, so it can be detached without a directory for it in the
/// container's filesystem.
fn pivot_into(rootfs: &Path) -> Result<(), StageFailure> {
    rustix::process::chdir(rootfs).map_err(cannot(format!("enter {}", rootfs.display())))?;
    rustix::process::pivot_root(".", ".").map_err(cannot("pivot into the container root"))?;
    rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(cannot("detach the guest's root"))?;
    rustix::process::chdir("/").map_err(cannot("enter the container root"))?;
    Ok(())
}

/// The program to run: `args[0]` itself if it has a `/`, else the first
/// executable match in the PATH of the process's own environment.
fn resolve_program(process: &ExecSpec) -> Result<PathBuf, StageFailure> {
    let name = process.args.first().map(String::as_str).unwrap_or_default();
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = process.env.iter().rev().find_map(|e| e.strip_prefix("PATH=")).unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|candidate| fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0))
        .ok_or_else(|| StageFailure {
            message: format!("cannot find {name:?} in the container's PATH"),
            code: EXIT_NOT_FOUND,
        })
}

fn command(program: &Path, process: &ExecSpec) -> Command {
    let mut command = Command::new(program);
    if let Some((arg0, rest)) = process.args.split_first() {
        command.arg0(arg0).args(rest);
    }
    command.env_clear();
    for entry in &process.env {
        if let Some((name, value)) = entry.split_once('=') {
            command.env(name, value);
        }
    }
    command
}

fn exec_failure(program: &Path, err: &io::Error) -> StageFailure {
    let code = if err.kind() == io::ErrorKind::NotFound { EXIT_NOT_FOUND } else { EXIT_CANNOT_EXECUTE };
    StageFailure { message: format!("cannot execute {}: {err}", program.display()), code }
}

/// Becomes the process's user with exactly the allowed capabilities. The
/// calling process must be single-threaded: these calls change only the
/// calling thread's credentials.
fn drop_privileges(process: &ExecSpec, allowed: CapabilitySet, last_cap: u32) -> Result<(), StageFailure> {
    let User { uid, gid, groups } = &process.user;
    // The bounding set limits what any later execve can regain (for root,
    // execve grants the whole bounding set), so it is cut first.
    for n in 0..=last_cap {
        let cap = single_cap(n);
        if allowed.contains(cap) {
            continue;
        }
        match rustix::thread::remove_capability_from_bounding_set(cap) {
            // EINVAL: a capability this kernel does not have.
            Ok(()) | Err(Errno::INVAL) => {}
            Err(e) => return Err(cannot(format!("drop capability {n} from the bounding set"))(e)),
        }
    }
    let keep = *uid != 0 && !allowed.is_empty();
    if keep {
        rustix::thread::set_keep_capabilities(true).map_err(cannot("keep capabilities across setuid"))?;
    }
    let groups: Vec<Gid> = groups.iter().map(|g| Gid::from_raw_unchecked(*g)).collect();
    rustix::thread::set_thread_groups(&groups).map_err(cannot("set the supplementary groups"))?;
    let gid = Gid::from_raw_unchecked(*gid);
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(cannot(format!("set group {}", gid.as_raw())))?;
    let uid = Uid::from_raw_unchecked(*uid);
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(cannot(format!("set user {}", uid.as_raw())))?;
    if keep {
        rustix::thread::set_keep_capabilities(false).map_err(cannot("reset keep-capabilities"))?;
    }
    let sets = CapabilitySets { effective: allowed, permitted: allowed, inheritable: allowed };
    rustix::thread::set_capabilities(None, sets).map_err(cannot("set the capabilities"))?;
    if !uid.is_root() {
        // A non-root user's execve drops permitted capabilities unless
        // they are ambient.
        for n in (0..=last_cap).filter(|n| allowed.contains(single_cap(*n))) {
            rustix::thread::configure_capability_in_ambient_set(single_cap(n), true)
                .map_err(cannot(format!("raise ambient capability {n}")))?;
        }
    }
    if process.no_new_privileges {
        rustix::thread::set_no_new_privs(true).map_err(cannot("set no_new_privs"))?;
    }
    Ok(())
}

/// The exec stage: join a running container, then run one process in it.
fn exec_stage(args: &[OsString]) -> Result<u8, StageFailure> {
    let [_bundle, spec_file, pid] = stage_args(args)?;
    let spec_file = Path::new(spec_file);
    // Opened now, while the bundle is reachable and writable: after joining
    // the container's mount namespace and dropping privileges it is neither.
    let error_path = spec_file.with_extension("error");
    let mut error_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&error_path)
        .map_err(cannot(format!("create {}", error_path.display())))?;
    exec_in(spec_file, pid).inspect_err(|failure| {
        let _ = error_file.write_all(failure.message.as_bytes());
    })
}

fn exec_in(spec_file: &Path, pid: &OsStr) -> Result<u8, StageFailure> {
    let process: ExecSpec = read_json(spec_file)?;
    process.validate()?;
    let pid: u32 = pid.to_str().and_then(|p| p.parse().ok()).ok_or_else(|| StageFailure::setup("bad container PID"))?;
    let pid_path = spec_file.with_extension("pid");
    let mut pid_file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&pid_path)
        .map_err(cannot(format!("create {}", pid_path.display())))?;
    let last_cap = last_capability();
    let allowed = capability_set(&process.capabilities, false, last_cap).map_err(StageFailure::setup)?;

    // All handles first: once in the container's mount namespace, the
    // guest's /proc is out of reach. The mount namespace is joined last.
    let namespaces = [
        ("ipc", LinkNameSpaceType::InterProcessCommunication),
        ("uts", LinkNameSpaceType::HostNameAndNISDomainName),
        ("pid", LinkNameSpaceType::ProcessID),
        ("mnt", LinkNameSpaceType::Mount),
    ];
    let mut handles = Vec::with_capacity(namespaces.len());
    for (name, kind) in namespaces {
        let path = format!("/proc/{pid}/ns/{name}");
        let file = File::open(&path).map_err(cannot(format!("open {path} (is the container running?)")))?;
        handles.push((name, kind, file));
    }
    for (name, kind, file) in &handles {
        rustix::thread::move_into_link_name_space(file.as_fd(), Some(*kind))
            .map_err(cannot(format!("join the container's {name} namespace")))?;
    }
    drop(handles);

    let program = resolve_program(&process)?;
    drop_privileges(&process, allowed, last_cap)?;
    let working_dir = if process.working_dir.is_empty() { "/" } else { process.working_dir.as_str() };
    let mut child =
        command(&program, &process).current_dir(working_dir).spawn().map_err(|e| exec_failure(&program, &e))?;
    if let Err(e) = pid_file.write_all(format!("{}\n", child.id()).as_bytes()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(cannot("record the process's PID")(e));
    }
    drop(pid_file);
    let status = child.wait().map_err(cannot("wait for the process"))?;
    Ok(exit_code(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "web".into(),
            hostname: "web".into(),
            layers: vec![PathBuf::from("/run/capsa/layers/aa"), PathBuf::from("/run/capsa/layers/bb")],
            args: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into(), "SECRET=hunter2".into()],
            working_dir: "/".into(),
            user: User { uid: 1000, gid: 1000, groups: vec![] },
            capabilities: vec!["CAP_CHOWN".into(), "net_bind_service".into()],
            no_new_privileges: true,
            privileged: false,
            read_only_rootfs: true,
            mounts: vec![Mount {
                source: "proc".into(),
                destination: "/proc".into(),
                fs_type: "proc".into(),
                options: vec!["nosuid".into()],
            }],
            sysctls: BTreeMap::from([("net.core.somaxconn".into(), "1024".into())]),
        }
    }

    #[test]
    fn valid_spec_passes_and_round_trips() {
        let spec = spec();
        spec.validate().unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<ContainerSpec>(&json).unwrap(), spec);
    }

    #[test]
    fn bad_specs_are_refused_without_leaking_env_values() {
        type Mutation = Box<dyn Fn(&mut ContainerSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|s| s.name = "../etc".into())),
            ("name", Box::new(|s| s.name = ".hidden".into())),
            ("layer", Box::new(|s| s.layers = vec![PathBuf::from("/a,upperdir=/x")])),
            ("at least one layer", Box::new(|s| s.layers.clear())),
            ("capability", Box::new(|s| s.capabilities.push("CAP_TELEPORT".into()))),
            ("environment entry 1", Box::new(|s| s.env[1] = "hunter2".into())),
            ("`..`", Box::new(|s| s.mounts[0].destination = "/proc/../etc".into())),
            ("root directory", Box::new(|s| s.mounts[0].destination = "/".into())),
            ("unsupported type", Box::new(|s| s.mounts[0].fs_type = "ext4".into())),
            ("sysctl", Box::new(|s| s.sysctls = BTreeMap::from([("../../etc/x".into(), "1".into())]))),
            ("no arguments", Box::new(|s| s.args.clear())),
        ];
        for (needle, mutate) in cases {
            let mut spec = spec();
            mutate(&mut spec);
            let message = spec.validate().unwrap_err().to_string();
            assert!(message.contains(needle), "{needle}: {message}");
            assert!(!message.contains("hunter2"), "{message}");
        }
    }

    #[test]
    fn capabilities_parse_with_or_without_prefix() {
        let set = capability_set(&["CAP_CHOWN".into(), "net_bind_service".into()], false, 40).unwrap();
        assert_eq!(set, CapabilitySet::CHOWN | CapabilitySet::NET_BIND_SERVICE);
        assert_eq!(capability_set(&[], true, 40).unwrap().bits(), (1u64 << 41) - 1);
        assert!(capability_set(&["CAP_NOPE".into()], false, 40).is_err());
    }

    #[test]
    fn mount_options_split_into_flags_propagation_and_data() {
        let options: Vec<String> =
            ["nosuid", "ro", "rbind", "rprivate", "mode=755", "size=65536k", "rw"].map(String::from).to_vec();
        let parsed = MountOptions::parse(&options);
        assert_eq!(parsed.flags, MountFlags::NOSUID);
        assert!(parsed.bind && parsed.recursive);
        assert_eq!(parsed.propagation, Some(MountPropagationFlags::PRIVATE | MountPropagationFlags::REC));
        assert_eq!(parsed.data, ["mode=755", "size=65536k"]);
    }

    #[test]
    fn sysctl_names_map_to_proc_sys() {
        assert_eq!(sysctl_path("net.ipv4.ip_forward").unwrap(), Path::new("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(
            sysctl_path("net/ipv4/conf/eth0.1/rp_filter").unwrap(),
            Path::new("/proc/sys/net/ipv4/conf/eth0.1/rp_filter")
        );
        assert!(sysctl_path("kernel/../../etc").is_err());
        assert!(sysctl_path("").is_err());
    }

    #[test]
    fn exit_statuses_map_like_a_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(42 << 8)), 42);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert!(describe_exit(Some(127), None).contains("not found"));
    }

    #[test]
    fn bundle_is_created_private_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("layer");
        fs::create_dir(&layer).unwrap();
        fs::set_permissions(&layer, fs::Permissions::from_mode(0o751)).unwrap();
        let mut spec = spec();
        spec.layers = vec![layer];
        let root = dir.path().join("containers");
        let bundle = Bundle::create(&root, &spec).unwrap();
        assert_eq!(bundle.spec().unwrap(), spec);
        assert_eq!(fs::metadata(bundle.dir()).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(bundle.dir().join(SPEC_FILE)).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(bundle.dir().join(UPPER)).unwrap().mode() & 0o777, 0o751);
        assert!(matches!(Bundle::create(&root, &spec), Err(ContainerError::Exists { .. })));
        let path = bundle.dir().to_path_buf();
        bundle.remove().unwrap();
        assert!(!path.exists());
    }
}
