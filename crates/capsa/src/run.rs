//! `capsa run`, `capsa ps`, `capsa exec`, `capsa logs`, `capsa stop`:
//! sandboxes from the command line. The launcher, the agent protocol and
//! the conforming requests are in `capsa-runtime`; this module wires them
//! to arguments, the terminal and exit codes.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use capsa_agent::protocol::{Call, Compression, ProcessRef, Reply, Stream};
use capsa_oci::image::{ImageSource, ResolveOptions, ResolvedImage, layer_blob_blocking, resolve_blocking};
use capsa_policy::document::{Initdata, PolicyDocument};
use capsa_policy::generate::settings::Settings;
use capsa_policy::generate::{InputKind, Options};
use capsa_policy::model::PolicyData;
use capsa_runtime::control::{self, ControlClient, ControlRequest, SandboxInfo};
use capsa_runtime::pod::{self, LayerSource};
use capsa_runtime::sandbox::{Accel, GuestFiles, LaunchConfig, Sandbox};
use capsa_tee::sim::SimPlatform;
use clap::{Args, ValueEnum};

use crate::output::outln;
use crate::{Refused, UsageError};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TeeKind {
    /// The sim platform: SEV-SNP-format evidence without hardware (no confidentiality).
    Sim,
}

#[derive(Args)]
pub struct RunArgs {
    /// The TEE to run in. Only `sim` exists on hosts without SEV-SNP or TDX.
    #[arg(long, value_enum, default_value = "sim")]
    tee: TeeKind,
    /// A Kubernetes pod spec: the policy is generated from it.
    #[arg(long, conflicts_with = "policy")]
    pod: Option<PathBuf>,
    /// A policy (Rego document or initdata TOML) to run IMAGE under.
    #[arg(long, requires = "image")]
    policy: Option<PathBuf>,
    /// With --policy: the image to run (it must be the one the policy pins).
    image: Option<String>,
    /// The sandbox id (default: derived from the pod's name).
    #[arg(long)]
    name: Option<String>,
    /// The guest image directory (`capsa guest build --out`), default: the cached one.
    #[arg(long)]
    guest: Option<PathBuf>,
    /// Virtual CPUs (default: from the pod's resource limits, at least 1).
    #[arg(long)]
    cpus: Option<u32>,
    /// Guest memory in MiB (default: the pod's memory limits plus 256 MiB for the guest).
    #[arg(long)]
    memory: Option<u32>,
    /// Resolve images from this local OCI layout instead of a registry.
    #[arg(long)]
    oci_layout: Option<PathBuf>,
    /// Allow plain HTTP to this registry (loopback registries always may).
    #[arg(long)]
    insecure_registry: Vec<String>,
    /// Resolve images only from the local cache.
    #[arg(long)]
    offline: bool,
    /// Show the guest's console.
    #[arg(long, short)]
    verbose: bool,
    /// Replace the container's command (the policy decides whether that is allowed).
    #[arg(last = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct ExecArgs {
    /// The sandbox.
    sandbox: String,
    /// The container (default: the sandbox's only container).
    #[arg(long, short)]
    container: Option<String>,
    /// The command.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct LogsArgs {
    /// The sandbox.
    sandbox: String,
    /// The container (default: the sandbox's only container).
    #[arg(long, short)]
    container: Option<String>,
}

#[derive(Args)]
pub struct StopArgs {
    /// The sandbox.
    sandbox: String,
}

#[derive(Args)]
pub struct PsArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The policy a run is under, and the images its containers need.
struct Plan {
    name: String,
    data: PolicyData,
    initdata: Initdata,
    host_data: [u8; 32],
    /// Image reference per container (same order as `data.containers`).
    images: Vec<String>,
    cpus: u32,
    memory_mib: u32,
}

fn resolve_options(args: &RunArgs) -> ResolveOptions {
    ResolveOptions {
        insecure_registries: args.insecure_registry.clone(),
        progress: true,
        offline: args.offline,
        ..ResolveOptions::default()
    }
}

fn image_source(args: &RunArgs) -> ImageSource {
    match &args.oci_layout {
        Some(dir) => ImageSource::OciLayout(dir.clone()),
        None => ImageSource::Registry,
    }
}

fn plan(args: &RunArgs) -> anyhow::Result<Plan> {
    let options = resolve_options(args);
    let source = image_source(args);
    if let Some(pod) = &args.pod {
        let text = crate::policy::text(pod)?;
        let resources = capsa_runtime::pod::resources_from_pod_yaml(&text);
        let attached =
            capsa_runtime::pod::pod_initdata(&text).map_err(|e| UsageError(format!("{}: {e}", pod.display())))?;
        // A pod `capsa policy gen` annotated runs under exactly the initdata
        // it carries (the one a release policy was written for), not a
        // regenerated one.
        if let Some((name, initdata)) = attached {
            let document = initdata.policy().map_err(|e| UsageError(format!("{}: {e}", pod.display())))?;
            let data = document.data().map_err(|e| UsageError(format!("{}: {e}", pod.display())))?;
            let images = data.containers.iter().map(|c| c.image.clone()).collect();
            return Ok(Plan {
                name,
                host_data: initdata.digest(),
                initdata,
                data,
                images,
                cpus: resources.cpus,
                memory_mib: resources.memory_mib,
            });
        }
        let settings = Settings::shipped_and(&[]).map_err(|e| UsageError(e.to_string()))?;
        let mut resolver = crate::policy::OciResolver::new(source, options);
        let generated = capsa_policy::generate::generate(
            InputKind::Kubernetes,
            &pod.display().to_string(),
            &text,
            &mut resolver,
            &settings,
            &Options { allow_unsupported: true, ..Options::default() },
        )
        .map_err(|e| UsageError(e.to_string()))?;
        let [workload] = generated.workloads.as_slice() else {
            return Err(UsageError(format!("{} must hold exactly one pod", pod.display())).into());
        };
        let images = workload.data.containers.iter().map(|c| c.image.clone()).collect();
        return Ok(Plan {
            name: workload.name.clone(),
            data: workload.data.clone(),
            initdata: workload.initdata.clone(),
            host_data: workload.host_data,
            images,
            cpus: resources.cpus,
            memory_mib: resources.memory_mib,
        });
    }
    let (Some(policy), Some(image)) = (&args.policy, &args.image) else {
        return Err(UsageError("give --pod POD.yaml, or --policy FILE and an IMAGE".into()).into());
    };
    let document = PolicyDocument::from_text(&crate::policy::text(policy)?)
        .map_err(|e| UsageError(format!("{}: {e}", policy.display())))?;
    let data = document.data().map_err(|e| UsageError(format!("{}: {e}", policy.display())))?;
    let resolved = resolve_blocking(image, &source, &options).with_context(|| format!("resolving {image}"))?;
    let Some(container) = data.containers.iter().find(|c| c.image_digest == resolved.manifest_digest) else {
        return Err(UsageError(format!(
            "{image} resolves to {}, which no container of {} pins",
            resolved.manifest_digest,
            policy.display()
        ))
        .into());
    };
    let data = PolicyData { containers: vec![container.clone()], ..data };
    let initdata = document.initdata().map_err(|e| UsageError(e.to_string()))?;
    // The whole document is the policy, whichever container runs: the
    // sandbox's HOST_DATA is the digest of the initdata carrying it.
    Ok(Plan {
        name: container.name.clone(),
        host_data: initdata.digest(),
        initdata,
        data,
        images: vec![image.clone()],
        cpus: 1,
        memory_mib: 512,
    })
}

fn sandbox_id(args: &RunArgs, name: &str) -> anyhow::Result<String> {
    if let Some(id) = &args.name {
        if !capsa_runtime::sandbox::valid_id(id) {
            return Err(UsageError(format!("--name {id:?}: use 1-63 lowercase letters, digits or dashes")).into());
        }
        return Ok(id.clone());
    }
    let base: String =
        name.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(40).collect();
    let mut suffix = [0u8; 3];
    aws_lc_rs::rand::fill(&mut suffix).map_err(|_| anyhow::anyhow!("no randomness"))?;
    Ok(format!("{}-{}", base.trim_matches('-'), hex::encode(suffix)))
}

fn guest_files(args: &RunArgs) -> anyhow::Result<GuestFiles> {
    let dir = match &args.guest {
        Some(dir) => dir.clone(),
        None => capsa_runtime::guest::default_out_dir().map_err(|e| UsageError(e.to_string()))?,
    };
    let kernel = dir.join("vmlinuz");
    let initrd = dir.join("initrd.img");
    if !kernel.exists() || !initrd.exists() {
        return Err(UsageError(format!("no guest image in {}: run `capsa guest build` first", dir.display())).into());
    }
    let cmdline = std::fs::read_to_string(dir.join("cmdline"))
        .with_context(|| format!("reading {}", dir.join("cmdline").display()))?;
    Ok(GuestFiles { kernel, initrd, cmdline: cmdline.trim().to_owned() })
}

/// The blobs of `image`'s layers not in `seen` yet, fetched once each;
/// adds their diff_ids to `seen`.
fn new_layers(
    image: &ResolvedImage,
    reference: &str,
    source: &ImageSource,
    options: &ResolveOptions,
    seen: &mut BTreeSet<String>,
) -> anyhow::Result<Vec<LayerSource>> {
    let mut layers = Vec::new();
    for layer in &image.layers {
        if !seen.insert(layer.diff_id.clone()) {
            continue;
        }
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            UsageError(format!("{reference}: layer media type {} is not supported", layer.media_type))
        })?;
        let path = layer_blob_blocking(reference, source, options, layer)
            .with_context(|| format!("fetching layer {} of {reference}", layer.digest))?;
        layers.push(LayerSource { diff_id: layer.diff_id.clone(), compression, path });
    }
    Ok(layers)
}

/// Runs the workload; returns its exit code.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let TeeKind::Sim = args.tee;
    let plan = plan(&args)?;
    let guest = guest_files(&args)?;
    let id = sandbox_id(&args, &plan.name)?;
    let options = resolve_options(&args);
    let source = image_source(&args);

    let mut requests = Vec::new();
    let mut layers: Vec<LayerSource> = Vec::new();
    let (mut seen, mut resolved) = (BTreeSet::new(), BTreeSet::new());
    for (container, reference) in plan.data.containers.iter().zip(&plan.images) {
        // Containers of a pod often share an image: resolve it once.
        if resolved.insert(reference.as_str()) {
            let image =
                resolve_blocking(reference, &source, &options).with_context(|| format!("resolving {reference}"))?;
            layers.extend(new_layers(&image, reference, &source, &options, &mut seen)?);
        }
        let mut request = pod::conforming_request(&id, container)?;
        if !args.command.is_empty() {
            request.args = args.command.clone();
        }
        requests.push(request);
    }

    let settings = plan.initdata.settings().map_err(|e| UsageError(e.to_string()))?;
    let mut forward = Vec::new();
    for trust in &settings.trust {
        forward.push(trust.address().map_err(UsageError)?.endpoint());
    }
    // The object stores of the encrypted filesystems the agent mounts.
    for volume in &settings.encfs {
        let endpoint = volume.address().map_err(UsageError)?.endpoint();
        if !forward.contains(&endpoint) {
            forward.push(endpoint);
        }
    }
    let platform = SimPlatform::init(&SimPlatform::default_dir()?).context("the sim platform")?;
    let config = LaunchConfig {
        id: id.clone(),
        guest,
        cpus: args.cpus.unwrap_or(plan.cpus),
        memory_mib: args.memory.unwrap_or(plan.memory_mib),
        accel: Accel::from_env(),
        host_data: plan.host_data,
        sim: Some(Arc::new(platform)),
        echo_console: args.verbose,
        forward,
        tap: None,
    };
    let sandbox = Arc::new(Mutex::new(Sandbox::launch(&config)?));
    let client = Arc::clone(lock(&sandbox).client());
    let measurement = lock(&sandbox).measurement();
    let interrupted = Arc::new(AtomicBool::new(false));
    on_interrupt(Arc::clone(&sandbox), Arc::clone(&interrupted));
    let mut stderr = std::io::stderr();
    writeln!(stderr, "capsa: sandbox {id} launched (MEASUREMENT {})", hex::encode(measurement))?;

    let result = (|| -> anyhow::Result<Vec<(String, pod::ExitCode)>> {
        let created = client.call(Call::CreateSandbox { initdata: plan.initdata.toml().to_owned() }, &[]);
        let (reply, _) = created.map_err(|e| refused_or(e.into(), &sandbox))?;
        let policy_sha256 = match reply {
            Reply::SandboxCreated { policy_sha256, host_data, measurement } => {
                writeln!(
                    std::io::stderr(),
                    "capsa: policy in force; the sandbox's evidence carries MEASUREMENT {measurement} and HOST_DATA {host_data}"
                )?;
                policy_sha256
            }
            other => anyhow::bail!("create_sandbox answered {other:?}"),
        };
        let info = SandboxInfo {
            id: id.clone(),
            owner_pid: std::process::id(),
            qemu_pid: lock(&sandbox).qemu_pid(),
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            containers: requests.iter().map(|r| r.container.clone()).collect(),
            policy_sha256,
            measurement: hex::encode(measurement),
        };

        for layer in &layers {
            pod::push_layer(&client, layer).map_err(|e| refused_or(e, &sandbox))?;
        }
        for request in &requests {
            client
                .call(Call::CreateContainer(Box::new(request.clone())), &[])
                .map_err(|e| refused_or(e.into(), &sandbox))?;
        }
        let prefix = requests.len() > 1;
        let mut streams = Vec::new();
        for request in &requests {
            let name = request.container.clone();
            client
                .call(Call::StartContainer { container: name.clone() }, &[])
                .map_err(|e| refused_or(e.into(), &sandbox))?;
            let process = ProcessRef { container: name.clone(), exec_id: None };
            for stream in [Stream::Stdout, Stream::Stderr] {
                let (client, process, name) = (Arc::clone(&client), process.clone(), name.clone());
                streams
                    .push(std::thread::spawn(move || copy_stream(&client, &process, stream, prefix.then_some(name))));
            }
        }
        // Listed by `capsa ps` (and reachable by exec, logs, stop) once its
        // containers run.
        let stopper = Arc::clone(&sandbox);
        control::serve(info, Arc::clone(&client), Arc::new(move || stop_soon(&stopper)))?;
        let mut exits = Vec::new();
        for request in &requests {
            let process = ProcessRef { container: request.container.clone(), exec_id: None };
            let exit = pod::wait(&client, &process).map_err(|e| refused_or(e, &sandbox))?;
            exits.push((request.container.clone(), exit));
        }
        for stream in streams {
            let _ = stream.join();
        }
        Ok(exits)
    })();

    lock(&sandbox).stop(Duration::from_secs(10));
    if interrupted.load(Ordering::SeqCst) {
        writeln!(stderr, "capsa: interrupted; sandbox {id} stopped")?;
        return Ok(ExitCode::from(130));
    }
    let exits = result?;
    let mut code = 0;
    for (name, exit) in &exits {
        if exits.len() > 1 || exit.shell() != 0 {
            writeln!(stderr, "capsa: container {name} exited with {}", exit.shell())?;
        }
        if code == 0 {
            code = exit.shell();
        }
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A refusal by the agent exits 1 and says so; anything else carries the
/// guest console's last lines when the channel broke.
fn refused_or(err: pod::PodError, sandbox: &Mutex<Sandbox>) -> anyhow::Error {
    let failure = match &err {
        pod::PodError::Call(call) => call.failure(),
        _ => return anyhow::anyhow!("{err}"),
    };
    match failure {
        Some(failure)
            if matches!(
                failure.kind,
                capsa_agent::protocol::FailureKind::Denied | capsa_agent::protocol::FailureKind::Integrity
            ) =>
        {
            Refused(format!("the sandbox refused: {err}")).into()
        }
        Some(_) => anyhow::anyhow!("{err}"),
        None => anyhow::anyhow!("{err}\n{}", lock(sandbox).console_tail()),
    }
}

fn stop_soon(sandbox: &Arc<Mutex<Sandbox>>) {
    let sandbox = Arc::clone(sandbox);
    std::thread::spawn(move || {
        lock(&sandbox).stop(Duration::from_secs(10));
    });
}

fn on_interrupt(sandbox: Arc<Mutex<Sandbox>>, flag: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        runtime.block_on(async {
            let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                return;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        flag.store(true, Ordering::SeqCst);
        // Killing the VM ends every pending call, and with them the run.
        lock(&sandbox).kill();
    });
}

fn copy_stream(
    client: &capsa_runtime::client::AgentClient,
    process: &ProcessRef,
    stream: Stream,
    prefix: Option<String>,
) {
    let mut sink: Box<dyn std::io::Write> = match stream {
        Stream::Stdout => Box::new(std::io::stdout()),
        Stream::Stderr => Box::new(std::io::stderr()),
    };
    let mut sink: Box<dyn std::io::Write> = match prefix {
        Some(name) => Box::new(LinePrefix { prefix: format!("[{name}] "), inner: sink, at_line_start: true }),
        None => std::mem::replace(&mut sink, Box::new(std::io::sink())),
    };
    if let Err(e) = pod::stream_output(client, process, stream, &mut *sink) {
        // A denied read (the policy keeps this container's output private)
        // is worth saying once; a closed channel is reported by the run.
        if let pod::PodError::Call(call) = &e {
            if call.failure().is_some() {
                eprintln!("capsa: {}: {e}", process.container);
            }
        }
    }
}

/// Prefixes each line with the container's name when a pod has several.
struct LinePrefix {
    prefix: String,
    inner: Box<dyn std::io::Write>,
    at_line_start: bool,
}

impl std::io::Write for LinePrefix {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for line in buf.split_inclusive(|b| *b == b'\n') {
            if self.at_line_start {
                self.inner.write_all(self.prefix.as_bytes())?;
            }
            self.inner.write_all(line)?;
            self.at_line_start = line.ends_with(b"\n");
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn only_container(client: &mut ControlClient, given: Option<String>) -> anyhow::Result<String> {
    if let Some(name) = given {
        return Ok(name);
    }
    let info = client.info()?;
    match info.containers.as_slice() {
        [only] => Ok(only.clone()),
        names => Err(UsageError(format!(
            "sandbox {} has containers {}: choose one with --container",
            info.id,
            names.join(", ")
        ))
        .into()),
    }
}

fn agent_result(result: Result<(Reply, Vec<u8>), capsa_agent::protocol::Failure>) -> anyhow::Result<(Reply, Vec<u8>)> {
    result.map_err(|failure| match failure.kind {
        capsa_agent::protocol::FailureKind::Denied => Refused(format!("the sandbox refused: {failure}")).into(),
        _ => anyhow::anyhow!("{failure}"),
    })
}

/// `capsa exec`: runs a command in a running container; exits with its code.
pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let mut client = ControlClient::connect(&args.sandbox)?;
    let container = only_container(&mut client, args.container)?;
    let (reply, _) =
        agent_result(client.call(Call::ExecProcess { container: container.clone(), args: args.command }, &[])?)?;
    let Reply::ProcessStarted { exec_id, .. } = reply else { anyhow::bail!("exec_process answered {reply:?}") };
    let process = ProcessRef { container, exec_id };
    for (stream, sink) in [(Stream::Stdout, true), (Stream::Stderr, false)] {
        loop {
            let (reply, bytes) = agent_result(client.call(Call::ReadStdio { process: process.clone(), stream }, &[])?)?;
            if sink {
                std::io::stdout().write_all(&bytes)?;
            } else {
                std::io::stderr().write_all(&bytes)?;
            }
            if matches!(reply, Reply::Stdio { eof: true }) {
                break;
            }
        }
    }
    let (reply, _) = agent_result(client.call(Call::WaitProcess { process }, &[])?)?;
    match reply {
        Reply::ProcessExited { code, signal } => {
            let code = pod::ExitCode { code, signal }.shell();
            Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
        }
        other => anyhow::bail!("wait_process answered {other:?}"),
    }
}

/// `capsa logs`: what a container has written.
pub fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let mut client = ControlClient::connect(&args.sandbox)?;
    let container = only_container(&mut client, args.container)?;
    let (_, bytes) = agent_result(client.call(Call::GetLogs { container }, &[])?)?;
    std::io::stdout().write_all(&bytes)?;
    Ok(())
}

/// `capsa stop`: stops a sandbox and waits until it is gone.
pub fn stop(args: StopArgs) -> anyhow::Result<()> {
    let mut client = ControlClient::connect(&args.sandbox)?;
    client.request(&ControlRequest::Stop, &[])?;
    for _ in 0..300 {
        if !control::running().contains(&args.sandbox) {
            outln!("stopped {}", args.sandbox)?;
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    anyhow::bail!("sandbox {} did not stop within 15 s", args.sandbox)
}

/// `capsa ps`: the running sandboxes.
pub fn ps(args: PsArgs) -> anyhow::Result<()> {
    let mut infos = Vec::new();
    for id in control::running() {
        // A sandbox stopping right now may no longer answer.
        if let Ok(info) = ControlClient::connect(&id).and_then(|mut c| c.info()) {
            infos.push(info);
        }
    }
    if args.json {
        return outln!("{}", serde_json::to_string_pretty(&infos)?);
    }
    outln!("{:<32} {:>8} {:<24} POLICY", "SANDBOX", "PID", "CONTAINERS")?;
    for info in infos {
        outln!(
            "{:<32} {:>8} {:<24} {}",
            info.id,
            info.owner_pid,
            info.containers.join(","),
            info.policy_sha256.get(..16).unwrap_or_default()
        )?;
    }
    Ok(())
}
