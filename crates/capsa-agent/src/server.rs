//! The RPC server: every host request, decided by the policy before it
//! changes anything.
//!
//! The order of checks is the security argument, so it is spelled out:
//!
//! 1. Until `create_sandbox` there is no policy, and nothing but
//!    `create_sandbox` is answered.
//! 2. `create_sandbox` asks the guest's own evidence for HOST_DATA and
//!    accepts the initdata only if its SHA-256 is exactly that value. The
//!    host chose the initdata but cannot choose HOST_DATA after launch, so
//!    the policy in force is the one the evidence names. It happens once.
//! 3. Every later call is turned into a policy request and decided first;
//!    a denial returns the engine's explanation (which never shows an
//!    environment value) and the call has no effect.
//! 4. Layers are kept only if their bytes hash to their diff_id
//!    ([`crate::layer`]), and `create_container` uses only kept layers.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use capsa_policy::document::{Initdata, SandboxSettings};
use capsa_policy::engine::Engine;
use capsa_policy::request::{CreateContainer, Request};

use crate::container::{self, Bundle, ContainerSpec, ExecSpec};
use crate::evidence::GuestAttester;
use crate::forward::Forwarder;
use crate::layer::{LayerStore, Upload};
use crate::protocol::{
    self, Call, ContainerStatus, Failure, FailureKind, Frame, FrameError, Message, Metrics, ProcessRef, Reply, Stream,
};
use crate::reaper::{Exit, Reaper};
use crate::service::WorkloadService;

/// How much unread output a process may have before the oldest is dropped.
const UNREAD_LIMIT: usize = 4 << 20;
/// How much of a container's output `get_logs` keeps.
const LOG_LIMIT: usize = 1 << 20;
/// How long a `read_stdio` waits for output before answering empty.
const READ_WAIT: Duration = Duration::from_secs(20);

type Answer = Result<(Reply, Vec<u8>), Failure>;

fn fail(kind: FailureKind, message: impl Into<String>) -> Failure {
    Failure::new(kind, message)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where the agent keeps sandbox state in guest memory.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Committed layers.
    pub layers: PathBuf,
    /// Container bundles.
    pub containers: PathBuf,
    /// The program run for container stages (the agent itself).
    pub stage_exe: PathBuf,
    /// Serve the workload API (and bring `lo` up for it) once the sandbox
    /// has its policy: inside a guest, not in tests on a host.
    pub workload_api: bool,
}

impl Paths {
    /// The layout inside a sandbox.
    pub fn guest() -> Self {
        Self {
            layers: PathBuf::from("/run/capsa/layers"),
            containers: PathBuf::from("/run/capsa/containers"),
            stage_exe: PathBuf::from("/proc/self/exe"),
            workload_api: true,
        }
    }
}

/// The policy in force.
struct Policy {
    engine: Engine,
}

/// The agent's state.
pub struct Agent {
    policy: Mutex<Option<Policy>>,
    attester: Option<Box<dyn GuestAttester>>,
    layers: LayerStore,
    uploads: Mutex<HashMap<u64, Upload>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
    next_id: AtomicU64,
    reaper: Reaper,
    paths: Paths,
    shutting_down: AtomicBool,
    /// Encrypted filesystems mounted for the sandbox.
    volumes: Mutex<Vec<crate::encfs::MountedVolume>>,
}

/// Buffered output of one stream of one process.
#[derive(Default)]
struct Output {
    state: Mutex<OutputState>,
    cond: Condvar,
}

#[derive(Default)]
struct OutputState {
    unread: VecDeque<u8>,
    eof: bool,
}

struct Process {
    stage_pid: u32,
    pid: u32,
    stdin: Mutex<Option<ChildStdin>>,
    stdout: Arc<Output>,
    stderr: Arc<Output>,
    exit: Mutex<Option<Exit>>,
    exited: Condvar,
}

struct Container {
    request: CreateContainer,
    bundle: Mutex<Option<Bundle>>,
    main: Mutex<Option<Arc<Process>>>,
    execs: Mutex<HashMap<u64, Arc<Process>>>,
    logs: Arc<Mutex<VecDeque<u8>>>,
}

impl Agent {
    /// An agent with no policy yet.
    pub fn new(
        paths: Paths,
        attester: Option<Box<dyn GuestAttester>>,
        reaper: Reaper,
    ) -> Result<Self, crate::layer::LayerError> {
        fs::create_dir_all(&paths.containers).map_err(|e| crate::layer::LayerError::Io {
            what: format!("create {}", paths.containers.display()),
            source: e,
        })?;
        Ok(Self {
            policy: Mutex::new(None),
            attester,
            layers: LayerStore::open(&paths.layers)?,
            uploads: Mutex::new(HashMap::new()),
            containers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            reaper,
            paths,
            shutting_down: AtomicBool::new(false),
            volumes: Mutex::new(Vec::new()),
        })
    }

    /// Whether a `shutdown` was accepted.
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Answers one call.
    pub fn handle(self: &Arc<Self>, call: Call, payload: Vec<u8>) -> Answer {
        if let Call::CreateSandbox { initdata } = call {
            return self.create_sandbox(initdata);
        }
        self.decide(&call)?;
        match call {
            Call::CreateSandbox { .. } => Err(fail(FailureKind::Internal, "create_sandbox reached dispatch")),
            Call::AddLayer { diff_id, compression } => {
                let upload = self
                    .layers
                    .begin(&diff_id, compression)
                    .map_err(|e| fail(FailureKind::Integrity, e.to_string()))?;
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                lock(&self.uploads).insert(id, upload);
                Ok((Reply::UploadOpened { upload: id }, Vec::new()))
            }
            Call::LayerChunk { upload, last } => self.layer_chunk(upload, last, &payload),
            Call::CreateContainer(request) => self.create_container(*request),
            Call::StartContainer { container } => self.start_container(&container),
            Call::ExecProcess { container, args } => self.exec_process(&container, args),
            Call::WaitProcess { process } => {
                let process = self.process(&process)?;
                let exit = wait_exit(&process);
                Ok((Reply::ProcessExited { code: exit.code, signal: exit.signal }, Vec::new()))
            }
            Call::SignalProcess { process, signal } => {
                let process = self.process(&process)?;
                let signal = i32::try_from(signal)
                    .ok()
                    .and_then(rustix::process::Signal::from_named_raw)
                    .ok_or_else(|| fail(FailureKind::Invalid, format!("{signal} is not a signal number")))?;
                if lock(&process.exit).is_none() {
                    let pid = i32::try_from(process.pid)
                        .ok()
                        .and_then(rustix::process::Pid::from_raw)
                        .ok_or_else(|| fail(FailureKind::Internal, "process has no PID"))?;
                    rustix::process::kill_process(pid, signal)
                        .map_err(|e| fail(FailureKind::Internal, format!("cannot signal PID {}: {e}", process.pid)))?;
                }
                Ok((Reply::Done, Vec::new()))
            }
            Call::ReadStdio { process, stream } => {
                let process = self.process(&process)?;
                let output = match stream {
                    Stream::Stdout => &process.stdout,
                    Stream::Stderr => &process.stderr,
                };
                let (bytes, eof) = read_output(output);
                Ok((Reply::Stdio { eof }, bytes))
            }
            Call::WriteStdin { process, close } => {
                let process = self.process(&process)?;
                let mut stdin = lock(&process.stdin);
                if let Some(pipe) = stdin.as_mut() {
                    pipe.write_all(&payload).map_err(|e| fail(FailureKind::Invalid, format!("stdin: {e}")))?;
                } else if !payload.is_empty() {
                    return Err(fail(FailureKind::Invalid, "the process's stdin is closed"));
                }
                if close {
                    *stdin = None;
                }
                Ok((Reply::Done, Vec::new()))
            }
            Call::CopyFile { path, mode, offset, last } => copy_file(&path, mode, offset, last, &payload),
            Call::GetLogs { container } => {
                let container = self.container(&container)?;
                let logs: Vec<u8> = lock(&container.logs).iter().copied().collect();
                Ok((Reply::Logs, logs))
            }
            Call::GetMetrics => Ok((Reply::Metrics(self.metrics()), Vec::new())),
            Call::RemoveContainer { container } => self.remove_container(&container),
            Call::Shutdown => {
                self.shutting_down.store(true, Ordering::SeqCst);
                Ok((Reply::Done, Vec::new()))
            }
        }
    }

    /// The guest's source of evidence.
    pub fn attester(&self) -> Option<&dyn GuestAttester> {
        self.attester.as_deref()
    }

    /// Step 2: initdata against the hardware's HOST_DATA.
    fn create_sandbox(self: &Arc<Self>, initdata: String) -> Answer {
        let mut policy = lock(&self.policy);
        if policy.is_some() {
            return Err(fail(
                FailureKind::Invalid,
                "the sandbox already has its policy; create_sandbox is accepted once",
            ));
        }
        let attester = self.attester.as_ref().ok_or_else(|| {
            fail(
                FailureKind::Evidence,
                "this guest has no source of evidence (no /dev/sev-guest, configfs-tsm or sim port)",
            )
        })?;
        let mut nonce = [0u8; 64];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| fail(FailureKind::Internal, "no randomness"))?;
        let evidence = attester.evidence(&nonce).map_err(|e| fail(FailureKind::Evidence, e.to_string()))?;
        let launch =
            crate::evidence::launch_values(&evidence).map_err(|e| fail(FailureKind::Evidence, e.to_string()))?;
        if launch.report_data != nonce {
            return Err(fail(FailureKind::Evidence, "the evidence does not carry the REPORT_DATA the agent asked for"));
        }
        let initdata = Initdata::from_toml(initdata);
        let digest = initdata.digest();
        // HOST_DATA is 32 bytes on SNP; TDX's MRCONFIGID is 48, the digest
        // zero-extended.
        let (head, tail) = launch.host_data.split_at(launch.host_data.len().min(32));
        let matches =
            aws_lc_rs::constant_time::verify_slices_are_equal(head, &digest).is_ok() && tail.iter().all(|b| *b == 0);
        if !matches {
            return Err(fail(
                FailureKind::Denied,
                format!(
                    "the initdata's SHA-256 is {}, but this sandbox was launched with HOST_DATA {}: the host must launch the sandbox with the digest of the initdata it sends (capsa policy gen prints it)",
                    hex::encode(digest),
                    hex::encode(&launch.host_data)
                ),
            ));
        }
        let document = initdata.policy().map_err(|e| fail(FailureKind::Invalid, e.to_string()))?;
        let settings = initdata.settings().map_err(|e| fail(FailureKind::Invalid, e.to_string()))?;
        let engine = Engine::from_document(document.rego()).map_err(|e| fail(FailureKind::Invalid, e.to_string()))?;
        let policy_sha256 = hex::encode(document.sha256());
        *policy = Some(Policy { engine });
        drop(policy);
        eprintln!("capsa-agent: policy {policy_sha256} in force (HOST_DATA matches the initdata)");
        if self.paths.workload_api {
            let service = self
                .start_workload_api(&settings)
                .map_err(|e| fail(FailureKind::Internal, format!("cannot start the workload API: {e}")))?;
            let volumes = crate::encfs::mount_all(&service, &settings)
                .map_err(|e| fail(if e.refused { FailureKind::Denied } else { FailureKind::Internal }, e.message))?;
            lock(&self.volumes).extend(volumes);
        }
        Ok((
            Reply::SandboxCreated {
                policy_sha256,
                host_data: hex::encode(&launch.host_data),
                measurement: hex::encode(&launch.measurement),
            },
            Vec::new(),
        ))
    }

    /// The workload API on the guest's loopback, and the forwarded ports
    /// to the trust services the initdata names.
    fn start_workload_api(self: &Arc<Self>, settings: &SandboxSettings) -> Result<Arc<WorkloadService>, String> {
        crate::net::loopback_up().map_err(|e| format!("cannot bring lo up: {e}"))?;
        let mut endpoints = Vec::new();
        for trust in &settings.trust {
            endpoints.push(trust.address()?.endpoint());
        }
        // The encrypted filesystems' object stores, reached the same way.
        for volume in &settings.encfs {
            let endpoint = volume.address()?.endpoint();
            if !endpoints.contains(&endpoint) {
                endpoints.push(endpoint);
            }
        }
        let forwarder = if endpoints.is_empty() {
            Forwarder::default()
        } else {
            let port = crate::init::port_device(protocol::FORWARD_PORT).ok_or_else(|| {
                format!("no {} port: the launcher cannot forward to {}", protocol::FORWARD_PORT, endpoints.join(", "))
            })?;
            Forwarder::start(&port, &endpoints).map_err(|e| format!("forwarding: {e}"))?
        };
        let listener = crate::workload::bind_loopback(settings.workload_api_port)
            .map_err(|e| format!("127.0.0.1:{}: {e}", settings.workload_api_port))?;
        let port = settings.workload_api_port;
        let service = Arc::new(WorkloadService::new(Arc::clone(self), settings.clone(), forwarder));
        let backend: Arc<dyn crate::workload::WorkloadBackend> = service.clone();
        crate::workload::serve(listener, backend).map_err(|e| e.to_string())?;
        eprintln!("capsa-agent: workload API on 127.0.0.1:{port}");
        Ok(service)
    }

    /// The policy's decision on `request`; `Err` holds its explanation.
    pub fn decide_request(&self, request: &Request) -> Result<(), String> {
        self.judge(request).map_err(|failure| failure.message)
    }

    /// The decision as a failure to answer: no policy yet, or a denial.
    fn judge(&self, request: &Request) -> Result<(), Failure> {
        let mut policy = lock(&self.policy);
        let policy = policy
            .as_mut()
            .ok_or_else(|| fail(FailureKind::Invalid, "the sandbox has no policy yet: send create_sandbox first"))?;
        let decision = policy.engine.decide_request(request);
        if decision.allowed {
            Ok(())
        } else {
            let message = format!("{} {decision}", request.op());
            eprintln!("capsa-agent: refused {}", message.trim_end());
            Err(fail(FailureKind::Denied, message.trim_end()))
        }
    }

    /// Step 3: the policy decides.
    fn decide(&self, call: &Call) -> Result<(), Failure> {
        let Some(request) = policy_request(call) else { return Ok(()) };
        self.judge(&request)
    }

    fn layer_chunk(&self, id: u64, last: bool, payload: &[u8]) -> Answer {
        let mut upload = lock(&self.uploads)
            .remove(&id)
            .ok_or_else(|| fail(FailureKind::NotFound, format!("no open layer upload {id}")))?;
        // A failed write drops the upload, and with it the staging directory.
        upload.write(payload).map_err(|e| fail(FailureKind::Integrity, e.to_string()))?;
        if last {
            let committed = upload.finish().map_err(|e| fail(FailureKind::Integrity, e.to_string()))?;
            return Ok((Reply::LayerCommitted { diff_id: committed.diff_id, size: committed.size }, Vec::new()));
        }
        lock(&self.uploads).insert(id, upload);
        Ok((Reply::ChunkAccepted, Vec::new()))
    }

    fn create_container(&self, request: CreateContainer) -> Answer {
        let mut containers = lock(&self.containers);
        if containers.contains_key(&request.container) {
            return Err(fail(FailureKind::Invalid, format!("container {:?} already exists", request.container)));
        }
        let mut layers = Vec::with_capacity(request.layers.len());
        for diff_id in &request.layers {
            let path = self.layers.path(diff_id).ok_or_else(|| {
                fail(FailureKind::NotFound, format!("layer {diff_id} has not been added (add_layer it first)"))
            })?;
            layers.push(path);
        }
        for mount in request.mounts.iter().filter(|m| m.fs_type == "bind") {
            provide_sandbox_source(&mount.source).map_err(|e| {
                fail(FailureKind::Internal, format!("cannot create the sandbox path {}: {e}", mount.source))
            })?;
        }
        let spec = ContainerSpec {
            name: request.container.clone(),
            hostname: request.container.clone(),
            layers,
            args: request.args.clone(),
            env: request.env.clone(),
            working_dir: request.working_dir.clone(),
            user: request.user.clone(),
            capabilities: request.capabilities.clone(),
            no_new_privileges: request.no_new_privileges,
            privileged: request.privileged,
            read_only_rootfs: request.read_only_rootfs,
            mounts: request.mounts.clone(),
            sysctls: request.sysctls.clone(),
        };
        let bundle =
            Bundle::create(&self.paths.containers, &spec).map_err(|e| fail(FailureKind::Internal, e.to_string()))?;
        let name = request.container.clone();
        containers.insert(
            name,
            Arc::new(Container {
                request,
                bundle: Mutex::new(Some(bundle)),
                main: Mutex::new(None),
                execs: Mutex::new(HashMap::new()),
                logs: Arc::new(Mutex::new(VecDeque::new())),
            }),
        );
        Ok((Reply::Done, Vec::new()))
    }

    fn start_container(&self, name: &str) -> Answer {
        let container = self.container(name)?;
        let mut main = lock(&container.main);
        if main.is_some() {
            return Err(fail(FailureKind::Invalid, format!("container {name:?} was already started")));
        }
        let bundle = lock(&container.bundle);
        let bundle =
            bundle.as_ref().ok_or_else(|| fail(FailureKind::Invalid, format!("container {name:?} was removed")))?;
        let started =
            container::start_with(&self.paths.stage_exe, bundle, Stdio::piped(), Stdio::piped(), Stdio::piped())
                .map_err(|e| fail(FailureKind::Internal, e.to_string()))?;
        let process = self.track(started, Some(Arc::clone(&container.logs)));
        let pid = process.pid;
        *main = Some(process);
        eprintln!("capsa-agent: started container {name} (PID {pid})");
        Ok((Reply::ProcessStarted { exec_id: None, pid }, Vec::new()))
    }

    fn exec_process(&self, name: &str, args: Vec<String>) -> Answer {
        let container = self.container(name)?;
        let main = lock(&container.main).clone();
        let main = main
            .filter(|p| lock(&p.exit).is_none())
            .ok_or_else(|| fail(FailureKind::Invalid, format!("container {name:?} is not running")))?;
        let request = &container.request;
        let spec = ExecSpec {
            args,
            env: request.env.clone(),
            working_dir: request.working_dir.clone(),
            user: request.user.clone(),
            capabilities: request.capabilities.clone(),
            no_new_privileges: request.no_new_privileges,
        };
        let bundle = lock(&container.bundle);
        let bundle =
            bundle.as_ref().ok_or_else(|| fail(FailureKind::Invalid, format!("container {name:?} was removed")))?;
        let started = container::exec_with(
            &self.paths.stage_exe,
            bundle,
            main.pid,
            &spec,
            Stdio::piped(),
            Stdio::piped(),
            Stdio::piped(),
        )
        .map_err(|e| fail(FailureKind::Internal, e.to_string()))?;
        let process = self.track(started, None);
        let exec_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pid = process.pid;
        lock(&container.execs).insert(exec_id, process);
        Ok((Reply::ProcessStarted { exec_id: Some(exec_id), pid }, Vec::new()))
    }

    /// Pumps a started process's output and records its exit.
    fn track(&self, mut started: container::Started, logs: Option<Arc<Mutex<VecDeque<u8>>>>) -> Arc<Process> {
        let stage_pid = started.child.id();
        let process = Arc::new(Process {
            stage_pid,
            pid: started.pid,
            stdin: Mutex::new(started.child.stdin.take()),
            stdout: Arc::new(Output::default()),
            stderr: Arc::new(Output::default()),
            exit: Mutex::new(None),
            exited: Condvar::new(),
        });
        if let Some(out) = started.child.stdout.take() {
            pump(out, Arc::clone(&process.stdout), logs.clone());
        } else {
            close_output(&process.stdout);
        }
        if let Some(err) = started.child.stderr.take() {
            pump(err, Arc::clone(&process.stderr), logs);
        } else {
            close_output(&process.stderr);
        }
        let reaper = self.reaper.clone();
        let waiting = Arc::clone(&process);
        // The Child is dropped without waiting: the reaper owns every exit.
        drop(started.child);
        std::thread::spawn(move || {
            let exit = reaper.wait(waiting.stage_pid);
            *lock(&waiting.exit) = Some(exit);
            waiting.exited.notify_all();
        });
        process
    }

    fn container(&self, name: &str) -> Result<Arc<Container>, Failure> {
        lock(&self.containers)
            .get(name)
            .cloned()
            .ok_or_else(|| fail(FailureKind::NotFound, format!("no container {name:?} in this sandbox")))
    }

    fn process(&self, process: &ProcessRef) -> Result<Arc<Process>, Failure> {
        let container = self.container(&process.container)?;
        let found = match process.exec_id {
            None => lock(&container.main).clone(),
            Some(id) => lock(&container.execs).get(&id).cloned(),
        };
        found.ok_or_else(|| {
            fail(
                FailureKind::NotFound,
                match process.exec_id {
                    None => format!("container {:?} has not been started", process.container),
                    Some(id) => format!("container {:?} has no exec {id}", process.container),
                },
            )
        })
    }

    fn remove_container(&self, name: &str) -> Answer {
        let container = lock(&self.containers)
            .remove(name)
            .ok_or_else(|| fail(FailureKind::NotFound, format!("no container {name:?} in this sandbox")))?;
        stop_container(&container);
        if let Some(bundle) = lock(&container.bundle).take() {
            bundle.remove().map_err(|e| fail(FailureKind::Internal, e.to_string()))?;
        }
        Ok((Reply::Done, Vec::new()))
    }

    /// Kills every container (for shutdown).
    pub fn stop_all(&self) {
        let containers: Vec<_> = lock(&self.containers).drain().map(|(_, c)| c).collect();
        for container in containers {
            stop_container(&container);
            if let Some(bundle) = lock(&container.bundle).take() {
                let _ = bundle.remove();
            }
        }
        // Then the encrypted filesystems, which commit what is still dirty:
        // no container holds them any more.
        let volumes: Vec<_> = lock(&self.volumes).drain(..).collect();
        for volume in volumes {
            volume.unmount();
        }
    }

    fn metrics(&self) -> Metrics {
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let containers = lock(&self.containers)
            .iter()
            .map(|(name, c)| {
                let main = lock(&c.main).clone();
                let (state, pid) = match main {
                    None => ("created", None),
                    Some(p) if lock(&p.exit).is_some() => ("exited", Some(p.pid)),
                    Some(p) => ("running", Some(p.pid)),
                };
                ContainerStatus { name: name.clone(), state: state.to_owned(), pid }
            })
            .collect();
        Metrics {
            mem_total_kib: kib_field(&meminfo, "MemTotal:"),
            mem_available_kib: kib_field(&meminfo, "MemAvailable:"),
            agent_rss_kib: kib_field(&status, "VmRSS:"),
            shmem_kib: kib_field(&meminfo, "Shmem:"),
            containers,
        }
    }
}

/// Where the runtime keeps per-sandbox files the policy lets containers
/// mount (their sources are policy patterns under this directory).
const SANDBOX_FILES: &str = "/run/capsa/sandboxes/";

/// Creates a missing per-sandbox mount source in guest memory: pod volumes
/// and the service-account directory are empty directories, the other
/// runtime files (hosts, hostname, resolv.conf, termination logs) empty
/// files, unless the host copied them in first. Sources elsewhere are left
/// alone: a missing one makes the mount fail.
fn provide_sandbox_source(source: &str) -> io::Result<()> {
    let path = Path::new(source);
    if !source.starts_with(SANDBOX_FILES) || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Ok(());
    }
    if fs::symlink_metadata(path).is_ok() {
        return Ok(());
    }
    if source.contains("/volumes/") || source.ends_with("/serviceaccount") {
        fs::create_dir_all(path)
    } else {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        OpenOptions::new().write(true).create_new(true).mode(0o644).open(path).map(drop)
    }
}

fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn stop_container(container: &Container) {
    let mut processes: Vec<Arc<Process>> = lock(&container.execs).values().cloned().collect();
    processes.extend(lock(&container.main).clone());
    for process in &processes {
        for pid in [process.pid, process.stage_pid] {
            if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    for process in &processes {
        wait_exit(process);
    }
}

fn wait_exit(process: &Process) -> Exit {
    let mut exit = lock(&process.exit);
    loop {
        if let Some(e) = *exit {
            return e;
        }
        exit = process.exited.wait(exit).unwrap_or_else(PoisonError::into_inner);
    }
}

/// The policy's view of a call; `None` for calls the policy authorised
/// earlier in the same exchange (a layer chunk belongs to its `add_layer`).
fn policy_request(call: &Call) -> Option<Request> {
    Some(match call {
        Call::CreateSandbox { .. } | Call::LayerChunk { .. } => return None,
        Call::AddLayer { diff_id, .. } => Request::AddLayer { diff_id: diff_id.clone() },
        Call::CreateContainer(c) => Request::CreateContainer(c.clone()),
        Call::StartContainer { container } => Request::StartContainer { container: container.clone() },
        Call::ExecProcess { container, args } => {
            Request::ExecProcess { container: container.clone(), args: args.clone() }
        }
        Call::WaitProcess { process } => Request::WaitProcess { container: process.container.clone() },
        Call::SignalProcess { process, signal } => {
            Request::SignalProcess { container: process.container.clone(), signal: *signal }
        }
        Call::ReadStdio { process, .. } => Request::ReadStdio { container: process.container.clone() },
        Call::WriteStdin { process, .. } => Request::WriteStdin { container: process.container.clone() },
        Call::CopyFile { path, .. } => Request::CopyFile { path: path.clone() },
        Call::GetLogs { container } => Request::GetLogs { container: container.clone() },
        Call::GetMetrics => Request::GetMetrics,
        Call::RemoveContainer { container } => Request::RemoveContainer { container: container.clone() },
        Call::Shutdown => Request::Shutdown,
    })
}

fn pump(mut from: impl Read + Send + 'static, to: Arc<Output>, logs: Option<Arc<Mutex<VecDeque<u8>>>>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let chunk = buf.get(..n).unwrap_or_default();
            if let Some(logs) = &logs {
                let mut logs = lock(logs);
                logs.extend(chunk);
                let excess = logs.len().saturating_sub(LOG_LIMIT);
                logs.drain(..excess);
            }
            let mut state = lock(&to.state);
            state.unread.extend(chunk);
            let excess = state.unread.len().saturating_sub(UNREAD_LIMIT);
            state.unread.drain(..excess);
            to.cond.notify_all();
        }
        close_output(&to);
    });
}

fn close_output(output: &Output) {
    lock(&output.state).eof = true;
    output.cond.notify_all();
}

fn read_output(output: &Output) -> (Vec<u8>, bool) {
    let mut state = lock(&output.state);
    if state.unread.is_empty() && !state.eof {
        state = output.cond.wait_timeout(state, READ_WAIT).unwrap_or_else(PoisonError::into_inner).0;
    }
    let take = state.unread.len().min(protocol::MAX_PAYLOAD);
    let bytes: Vec<u8> = state.unread.drain(..take).collect();
    let eof = state.eof && state.unread.is_empty();
    (bytes, eof)
}

fn copy_file(path: &str, mode: u32, offset: u64, last: bool, payload: &[u8]) -> Answer {
    let target = Path::new(path);
    if !target.is_absolute() || target.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(fail(FailureKind::Invalid, format!("copy_file needs an absolute path without '..', not {path:?}")));
    }
    let partial = PathBuf::from(format!("{path}.capsa-partial"));
    let io_fail = |what: &str, e: io::Error| fail(FailureKind::Internal, format!("{what} {}: {e}", partial.display()));
    let mut file = if offset == 0 {
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| io_fail("create the directory of", e))?;
        }
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode & 0o7777)
            .open(&partial)
            .map_err(|e| io_fail("create", e))?
    } else {
        let file = OpenOptions::new().append(true).open(&partial).map_err(|e| io_fail("open", e))?;
        let len = file.metadata().map_err(|e| io_fail("stat", e))?.len();
        if len != offset {
            return Err(fail(
                FailureKind::Invalid,
                format!("copy_file chunk at offset {offset}, but {len} bytes of {path} have arrived"),
            ));
        }
        file
    };
    file.write_all(payload).map_err(|e| io_fail("write", e))?;
    if last {
        file.sync_all().map_err(|e| io_fail("sync", e))?;
        fs::rename(&partial, target).map_err(|e| io_fail("rename", e))?;
    }
    Ok((Reply::Done, Vec::new()))
}

/// Serves the RPC port until the host closes it or a `shutdown` is
/// answered. Each request runs on its own thread, so a long-polling read
/// does not hold up the others; the host keeps a layer's chunks in order
/// by waiting for each answer.
pub fn serve(agent: Arc<Agent>, mut input: impl Read, output: impl Write + Send + 'static) -> Result<(), FrameError> {
    let output = Arc::new(Mutex::new(output));
    loop {
        let frame: Frame<Message> = match protocol::read_frame(&mut input) {
            Ok(frame) => frame,
            Err(FrameError::Closed) => return Ok(()),
            Err(e) => return Err(e),
        };
        let Message::Request { id, call } = frame.header else {
            eprintln!("capsa-agent: ignoring a response sent to the agent");
            continue;
        };
        let worker_agent = Arc::clone(&agent);
        let output = Arc::clone(&output);
        let is_shutdown = matches!(call, Call::Shutdown);
        let worker = std::thread::spawn(move || {
            let result = worker_agent.handle(call, frame.payload);
            let (result, payload) = match result {
                Ok((reply, payload)) => (Ok(reply), payload),
                Err(failure) => (Err(failure), Vec::new()),
            };
            let message = Message::Response { id, result };
            if let Err(e) = protocol::write_frame(&mut *lock(&output), &message, &payload) {
                eprintln!("capsa-agent: cannot answer request {id}: {e}");
            }
        });
        if is_shutdown {
            let _ = worker.join();
            if agent.shutting_down() {
                return Ok(());
            }
        }
    }
}

/// Opens the port device for reading and writing.
pub fn open_port(path: &Path) -> io::Result<(File, File)> {
    let file = OpenOptions::new().read(true).write(true).open(path)?;
    let writer = file.try_clone()?;
    Ok((file, writer))
}
