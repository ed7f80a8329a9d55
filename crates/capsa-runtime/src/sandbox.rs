//! The launcher: one QEMU microVM per sandbox, its RPC port, and on sim
//! hosts the sim platform's report service.
//!
//! Nothing of a sandbox lives in the file system. The host ends of the
//! guest's virtio-serial ports are abstract Unix sockets, which vanish with
//! the processes holding them; QEMU runs under `setpriv --pdeathsig KILL`,
//! so the kernel kills it when the launcher dies however it dies; and the
//! agent powers the guest off when its port closes. That is how a SIGKILL
//! of `capsa run` leaves no process, mount or file behind.
//!
//! On sim hosts MEASUREMENT and HOST_DATA are fixed here, at launch, as a
//! security processor would fix them: MEASUREMENT is
//! [`crate::measure::launch_digest`] of exactly the kernel, initrd and
//! command line handed to QEMU, and HOST_DATA is what the caller says the
//! initdata digest is. The guest can ask for reports; it cannot change
//! either value.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use capsa_agent::protocol::{self, Call, SimRequest, SimResponse};
use capsa_tee::sim::{ReportRequest, SimPlatform};

use crate::client::AgentClient;

/// How many console lines a sandbox keeps for error messages.
const CONSOLE_LINES: usize = 200;

/// The files a sandbox boots.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
}

/// How QEMU runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation: works everywhere, about 5 s to boot.
    Tcg,
    /// Hardware virtualisation through /dev/kvm.
    Kvm,
}

impl Accel {
    /// `CAPSA_ACCEL` (`kvm` or `tcg`), else TCG. KVM is opt-in because some
    /// hosts expose a /dev/kvm on which stock guest kernels hang at boot
    /// (see DEVELOPERS.md); a hang is worse than a slow boot.
    pub fn from_env() -> Self {
        match std::env::var("CAPSA_ACCEL").as_deref() {
            Ok("kvm") => Self::Kvm,
            _ => Self::Tcg,
        }
    }
}

/// What to launch.
#[derive(Debug, Clone)]
pub struct LaunchConfig {
    /// The sandbox id: lowercase letters, digits and dashes.
    pub id: String,
    /// What to boot.
    pub guest: GuestFiles,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// TCG or KVM.
    pub accel: Accel,
    /// HOST_DATA: the digest of the initdata the sandbox will be given.
    pub host_data: [u8; 32],
    /// The sim platform answering the guest's report requests; `None` on
    /// hardware, where the security processor does.
    pub sim: Option<Arc<SimPlatform>>,
    /// Copy the guest console to stderr as it comes.
    pub echo_console: bool,
    /// The endpoints (`host:port`) the guest may reach through the
    /// forwarding port: the trust services its initdata names.
    pub forward: Vec<String>,
    /// Records every byte forwarded, for tests.
    pub tap: Option<crate::forward::Tap>,
}

/// Why a sandbox could not be launched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The id has characters outside `[a-z0-9-]` or is empty or too long.
    #[error("sandbox id {0:?} must be 1-63 lowercase letters, digits or dashes")]
    BadId(String),
    /// A guest file could not be read.
    #[error("cannot read {path}: {source}; build the guest image with `capsa guest build`")]
    Guest {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A socket could not be set up.
    #[error("cannot set up the sandbox's {what}: {source}")]
    Socket {
        /// Which socket.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU could not be started, or exited at once.
    #[error("QEMU failed to start the sandbox: {0}")]
    Qemu(String),
}

/// A running sandbox. Dropping it kills the VM.
pub struct Sandbox {
    id: String,
    qemu: Child,
    client: Arc<AgentClient>,
    measurement: [u8; 48],
    console: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox").field("id", &self.id).field("qemu", &self.qemu.id()).finish_non_exhaustive()
    }
}

fn abstract_name(id: &str, port: &str) -> String {
    format!("capsa/{id}/{port}")
}

fn listen(name: &str, what: &'static str) -> Result<UnixListener, LaunchError> {
    let addr =
        SocketAddr::from_abstract_name(name.as_bytes()).map_err(|source| LaunchError::Socket { what, source })?;
    UnixListener::bind_addr(&addr).map_err(|source| LaunchError::Socket { what, source })
}

/// A valid sandbox id.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 63 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Sandbox {
    /// Boots the guest and connects to its RPC port. Returns as soon as
    /// QEMU has connected; the agent answers once the guest has booted
    /// (calls made before then wait).
    pub fn launch(config: &LaunchConfig) -> Result<Self, LaunchError> {
        if !valid_id(&config.id) {
            return Err(LaunchError::BadId(config.id.clone()));
        }
        let measurement =
            crate::measure::launch_digest_of_files(&config.guest.kernel, &config.guest.initrd, &config.guest.cmdline)
                .map_err(|crate::measure::MeasureError::Read { path, source, .. }| LaunchError::Guest {
                path: path.display().to_string(),
                source,
            })?;
        let rpc_name = abstract_name(&config.id, "rpc");
        let sim_name = abstract_name(&config.id, "sim");
        let fwd_name = abstract_name(&config.id, "fwd");
        let rpc = listen(&rpc_name, "RPC socket")?;
        let fwd = listen(&fwd_name, "forwarding socket")?;
        let sim = match &config.sim {
            Some(_) => Some(listen(&sim_name, "sim platform socket")?),
            None => None,
        };

        let mut qemu = qemu_command(config, &rpc_name, &fwd_name, config.sim.as_ref().map(|_| sim_name.as_str()));
        let mut qemu = qemu.spawn().map_err(|e| {
            LaunchError::Qemu(format!(
                "cannot run setpriv/qemu-system-x86_64: {e}; install util-linux and qemu-system-x86"
            ))
        })?;
        let console = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(out) = qemu.stdout.take() {
            keep_console(out, Arc::clone(&console), config.echo_console);
        }
        if let Some(err) = qemu.stderr.take() {
            keep_console(err, Arc::clone(&console), true);
        }

        let rpc_stream = match accept(&rpc, &mut qemu) {
            Ok(s) => s,
            Err(e) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(LaunchError::Qemu(format!("{e}\n{}", tail(&console))));
            }
        };
        match accept(&fwd, &mut qemu) {
            Ok(stream) => crate::forward::serve(stream, config.forward.clone(), config.tap.clone()),
            Err(e) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(LaunchError::Qemu(format!("{e}\n{}", tail(&console))));
            }
        }
        if let (Some(listener), Some(platform)) = (sim, &config.sim) {
            let stream = match accept(&listener, &mut qemu) {
                Ok(s) => s,
                Err(e) => {
                    let _ = qemu.kill();
                    let _ = qemu.wait();
                    return Err(LaunchError::Qemu(format!("{e}\n{}", tail(&console))));
                }
            };
            serve_sim(stream, Arc::clone(platform), measurement, config.host_data);
        }
        let writer = rpc_stream.try_clone().map_err(|source| LaunchError::Socket { what: "RPC socket", source })?;
        let client = AgentClient::new(rpc_stream, writer);
        Ok(Self { id: config.id.clone(), qemu, client, measurement, console })
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The PID of its QEMU process.
    pub fn qemu_pid(&self) -> u32 {
        self.qemu.id()
    }

    /// The agent.
    pub fn client(&self) -> &Arc<AgentClient> {
        &self.client
    }

    /// MEASUREMENT as launched.
    pub fn measurement(&self) -> [u8; 48] {
        self.measurement
    }

    /// The last lines the guest console printed.
    pub fn console_tail(&self) -> String {
        tail(&self.console)
    }

    /// Whether QEMU is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.qemu.try_wait(), Ok(None))
    }

    /// Asks the agent to shut down (if the policy lets it), waits up to
    /// `grace` for the VM to power off, then kills it.
    pub fn stop(&mut self, grace: Duration) -> ExitStatus {
        let client = Arc::clone(&self.client);
        // The answer may never come if the guest is wedged: ask from a
        // thread and judge by QEMU's exit instead.
        std::thread::spawn(move || {
            let _ = client.call(Call::Shutdown, &[]);
        });
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.qemu.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill()
    }

    /// Kills the VM at once.
    pub fn kill(&mut self) -> ExitStatus {
        let _ = self.qemu.kill();
        match self.qemu.wait() {
            Ok(status) => status,
            Err(_) => std::os::unix::process::ExitStatusExt::from_raw(0),
        }
    }

    /// Waits until the VM has exited.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.qemu.wait()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
        }
    }
}

fn qemu_command(config: &LaunchConfig, rpc: &str, fwd: &str, sim: Option<&str>) -> Command {
    // setpriv sets the parent-death signal and execs QEMU: if the launcher
    // dies, so does its VM.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--", "qemu-system-x86_64"]);
    let (machine, cpu) = match config.accel {
        Accel::Tcg => ("microvm,accel=tcg", "max"),
        Accel::Kvm => ("microvm,accel=kvm", "host"),
    };
    cmd.args(["-M", machine, "-cpu", cpu])
        .args(["-smp", &config.cpus.max(1).to_string(), "-m", &format!("{}M", config.memory_mib.max(64))])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&config.guest.kernel)
        .arg("-initrd")
        .arg(&config.guest.initrd)
        .args(["-append", &config.guest.cmdline])
        .args(["-device", "virtio-serial-device"])
        .args(["-chardev", &format!("socket,id=rpc,path={rpc},abstract=on")])
        .args(["-device", &format!("virtserialport,chardev=rpc,name={}", protocol::RPC_PORT)])
        .args(["-chardev", &format!("socket,id=fwd,path={fwd},abstract=on")])
        .args(["-device", &format!("virtserialport,chardev=fwd,name={}", protocol::FORWARD_PORT)]);
    if let Some(sim) = sim {
        cmd.args(["-chardev", &format!("socket,id=sim,path={sim},abstract=on")])
            .args(["-device", &format!("virtserialport,chardev=sim,name={}", protocol::SIM_PORT)]);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

/// Accepts QEMU's connection, giving up if QEMU exits first.
fn accept(listener: &UnixListener, qemu: &mut Child) -> Result<UnixStream, String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accepting QEMU's connection: {e}")),
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(format!("QEMU exited ({status}) before connecting to the sandbox's ports"));
        }
        if Instant::now() > deadline {
            return Err("QEMU did not connect to the sandbox's ports within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn keep_console(from: impl Read + Send + 'static, console: Arc<Mutex<VecDeque<String>>>, echo: bool) {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            if echo {
                eprintln!("[guest] {line}");
            }
            let mut console = console.lock().unwrap_or_else(PoisonError::into_inner);
            console.push_back(line);
            if console.len() > CONSOLE_LINES {
                console.pop_front();
            }
        }
    });
}

fn tail(console: &Mutex<VecDeque<String>>) -> String {
    let console = console.lock().unwrap_or_else(PoisonError::into_inner);
    let lines: Vec<&str> = console.iter().rev().take(30).map(String::as_str).collect();
    let mut out = String::from("guest console (last lines):");
    for line in lines.iter().rev() {
        out.push_str("\n  ");
        out.push_str(line);
    }
    out
}

/// Answers the guest's report requests with the launch values fixed here.
fn serve_sim(stream: UnixStream, platform: Arc<SimPlatform>, measurement: [u8; 48], host_data: [u8; 32]) {
    std::thread::spawn(move || {
        let Ok(mut writer) = stream.try_clone() else { return };
        let mut reader = stream;
        loop {
            let Ok(frame) = protocol::read_frame::<SimRequest>(&mut reader) else { return };
            let answer = decode_report_data(&frame.header.report_data).and_then(|report_data| {
                platform
                    .report(&ReportRequest { measurement, host_data, report_data, policy_debug: false, vmpl: 0 })
                    .map_err(|e| e.to_string())
            });
            let written = match answer {
                Ok(report) => {
                    let chain = format!("{}{}", platform.vcek_pem(), platform.chain_pem());
                    let response = SimResponse { error: None, vcek_chain_pem: Some(chain) };
                    protocol::write_frame(&mut writer, &response, &report)
                }
                Err(error) => {
                    protocol::write_frame(&mut writer, &SimResponse { error: Some(error), vcek_chain_pem: None }, &[])
                }
            };
            if written.is_err() {
                return;
            }
        }
    });
}

fn decode_report_data(text: &str) -> Result<[u8; 64], String> {
    let bytes = hex::decode(text).map_err(|e| format!("REPORT_DATA is not hex: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| format!("REPORT_DATA must be 64 bytes, not {}", b.len()))
}
