//! `capsa`: the command line for confidential containers.
//!
//! Thin by design: each subcommand parses its arguments, calls one library
//! function, and renders the result. Exit codes are decided in one place,
//! [`exit_code`]: 0 success, 1 the evidence (or request) was refused, 2 the
//! input or arguments could not be used.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use capsa_tee::evidence::{self, EvidenceError, Inputs, Tee};
use capsa_tee::sim::{ReportRequest, SimPlatform};
use clap::{Args, Parser, Subcommand};

mod output;
use output::outln;
mod encfs;
mod guest;
mod policy;
mod run;
mod trust;

#[derive(Parser)]
#[command(name = "capsa", version, about = "Confidential containers: policies, sandboxes, attestation, key release")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify or inspect TEE evidence (SEV-SNP, TDX, SGX, Azure vTPM).
    #[command(subcommand)]
    Evidence(EvidenceCommand),
    /// The sim platform: SEV-SNP-format evidence without TEE hardware (no confidentiality).
    #[command(subcommand)]
    Sim(SimCommand),
    /// Execution policies: generate, check a request, diff.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Print the dm-verity root hash of a file (as `veritysetup format` computes it).
    Verity(policy::VerityArgs),
    /// The trust service: attestation, tokens, and a key broker with secure key release.
    #[command(subcommand)]
    Trust(trust::TrustCommand),
    /// The guest image a sandbox boots: kernel, initramfs with capsa-agent as /init, command line.
    #[command(subcommand)]
    Guest(guest::GuestCommand),
    /// Print the launch digest (the sim platform's MEASUREMENT) of a kernel, initrd and command line.
    Measure(guest::MeasureArgs),
    /// Run a pod (or one image under a policy) in a confidential sandbox; exits with the workload's code.
    Run(run::RunArgs),
    /// List running sandboxes.
    Ps(run::PsArgs),
    /// Run a command in a running container (if its policy allows).
    Exec(run::ExecArgs),
    /// Print what a sandbox's container has written (if its policy allows).
    Logs(run::LogsArgs),
    /// Stop a running sandbox.
    Stop(run::StopArgs),
    /// Encrypted filesystem images: create, check, mount.
    #[command(subcommand)]
    Encfs(encfs::EncfsCommand),
}

#[derive(Subcommand)]
enum EvidenceCommand {
    /// Verify evidence offline; print its claims.
    Verify(VerifyArgs),
    /// Print every field of the evidence, without verifying it.
    Show(ShowArgs),
}

#[derive(Args)]
struct VerifyArgs {
    /// The evidence: raw binary or hex text.
    file: PathBuf,
    /// The kind of evidence.
    #[arg(long, value_parser = parse_tee)]
    tee: Tee,
    /// The VCEK or VLEK: DER, PEM (optionally followed by its chain) or Azure certificate-cache JSON.
    #[arg(long)]
    vcek: Option<PathBuf>,
    /// The ASK/ASVK and ARK (PEM); default: AMD's pinned roots.
    #[arg(long)]
    chain: Option<PathBuf>,
    /// DCAP collateral (JSON) for TDX and SGX quotes.
    #[arg(long)]
    collateral: Option<PathBuf>,
    /// Verify as of this instant (RFC 3339) instead of now.
    #[arg(long, value_parser = parse_instant)]
    at: Option<time::OffsetDateTime>,
    /// Trust a capsa sim platform root. Sim evidence has no hardware protection.
    #[arg(long)]
    allow_sim: bool,
    /// Print the claims as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ShowArgs {
    /// The evidence: raw binary or hex text.
    file: PathBuf,
    /// The kind of evidence.
    #[arg(long, value_parser = parse_tee)]
    tee: Tee,
}

#[derive(Subcommand)]
enum SimCommand {
    /// Create the sim platform's root of trust (idempotent).
    Init(SimDir),
    /// Write the sim VCEK (vcek.pem) and its chain (chain.pem) to a directory.
    Certs {
        /// Where to write vcek.pem and chain.pem.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        dir: SimDir,
    },
    /// Produce a sim report in SEV-SNP layout, signed by the sim VCEK.
    Report {
        /// MEASUREMENT (48 bytes, hex).
        #[arg(long)]
        measurement: String,
        /// HOST_DATA (32 bytes, hex).
        #[arg(long)]
        host_data: String,
        /// REPORT_DATA (64 bytes, hex).
        #[arg(long)]
        report_data: String,
        /// Set the guest policy's DEBUG bit.
        #[arg(long)]
        policy_debug: bool,
        /// Where to write the 1184-byte report.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        dir: SimDir,
    },
}

#[derive(Args)]
struct SimDir {
    /// The sim platform's state directory (default: $CAPSA_SIM_DIR, or ~/.local/state/capsa/sim).
    #[arg(long)]
    dir: Option<PathBuf>,
}

impl SimDir {
    fn resolve(&self) -> anyhow::Result<PathBuf> {
        match &self.dir {
            Some(d) => Ok(d.clone()),
            None => Ok(SimPlatform::default_dir()?),
        }
    }
}

fn hex_arg<const N: usize>(what: &str, text: &str) -> anyhow::Result<[u8; N]> {
    capsa_tee::encoding::hex_exact(what, text).map_err(|e| UsageError(e).into())
}

fn parse_tee(s: &str) -> Result<Tee, String> {
    s.parse()
}

fn parse_instant(s: &str) -> Result<time::OffsetDateTime, String> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("not an RFC 3339 instant such as 2025-06-01T00:00:00Z: {e}"))
}

/// Input that could not be used: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct UsageError(pub(crate) String);

/// Evidence or a request refused: exit code 1.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that pass on a workload's exit code return it themselves.
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Exec(args) => run::exec(args),
        command => run(Cli { command }).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "capsa: {}", one_line(&err));
            ExitCode::from(exit_code(&err))
        }
    }
}

/// The one place errors become exit codes.
fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Refused>().is_some() {
        return 1;
    }
    if let Some(e) = err.downcast_ref::<EvidenceError>() {
        return if e.is_malformed() { 2 } else { 1 };
    }
    2
}

/// Errors print on one line: the context chain joined with ": ".
fn one_line(err: &anyhow::Error) -> String {
    err.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Evidence(EvidenceCommand::Verify(args)) => verify(args),
        Command::Evidence(EvidenceCommand::Show(args)) => {
            let bytes = read(&args.file)?;
            let rows = evidence::describe(args.tee, &bytes)?;
            output::table(&rows)?;
            Ok(())
        }
        Command::Sim(cmd) => sim(cmd),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Verity(args) => policy::verity(args),
        Command::Trust(cmd) => trust::run(cmd),
        Command::Guest(cmd) => guest::run(cmd),
        Command::Measure(args) => guest::measure(args),
        Command::Run(_) | Command::Exec(_) => Err(anyhow::anyhow!("handled in main")),
        Command::Ps(args) => run::ps(args),
        Command::Logs(args) => run::logs(args),
        Command::Stop(args) => run::stop(args),
        Command::Encfs(cmd) => encfs::run(cmd),
    }
}

pub(crate) fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| UsageError(format!("cannot read {}: {e}", path.display())).into())
}

fn read_opt(path: Option<&PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    path.map(|p| read(p)).transpose()
}

fn verify(args: VerifyArgs) -> anyhow::Result<()> {
    let evidence_bytes = read(&args.file)?;
    let vcek = read_opt(args.vcek.as_ref())?;
    let chain = read_opt(args.chain.as_ref())?;
    let collateral = read_opt(args.collateral.as_ref())?;
    let inputs = Inputs {
        tee: args.tee,
        evidence: &evidence_bytes,
        vcek: vcek.as_deref(),
        chain: chain.as_deref(),
        collateral: collateral.as_deref(),
        at: args.at.unwrap_or_else(time::OffsetDateTime::now_utc),
        allow_sim: args.allow_sim,
    };
    let claims = evidence::verify(&inputs, &evidence::Policy::default())?;
    if !claims.attestation_type.is_hardware() {
        let _ = writeln!(
            std::io::stderr(),
            "capsa: warning: sim evidence: signed by the capsa sim platform, not TEE hardware; it proves nothing about confidentiality"
        );
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&claims)?)?;
    } else {
        output::claims_table(&claims)?;
    }
    Ok(())
}

fn sim(cmd: SimCommand) -> anyhow::Result<()> {
    match cmd {
        SimCommand::Init(dir) => {
            let dir = dir.resolve()?;
            let platform = SimPlatform::init(&dir)?;
            outln!("sim platform ready in {}", platform.dir().display())?;
            outln!("  it has no hardware protection: use it for development, CI and demos only")?;
            Ok(())
        }
        SimCommand::Certs { out, dir } => {
            let platform = SimPlatform::load(&dir.resolve()?)?;
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            output::write_atomic(&out.join("vcek.pem"), platform.vcek_pem().as_bytes())?;
            output::write_atomic(&out.join("chain.pem"), platform.chain_pem().as_bytes())?;
            outln!("wrote {0}/vcek.pem and {0}/chain.pem", out.display())?;
            Ok(())
        }
        SimCommand::Report { measurement, host_data, report_data, policy_debug, out, dir } => {
            let request = ReportRequest {
                measurement: hex_arg("--measurement", &measurement)?,
                host_data: hex_arg("--host-data", &host_data)?,
                report_data: hex_arg("--report-data", &report_data)?,
                policy_debug,
                vmpl: 0,
            };
            let platform = SimPlatform::load(&dir.resolve()?)?;
            let report = platform.report(&request)?;
            output::write_atomic(&out, &report)?;
            outln!("wrote sim report ({} bytes) to {}", report.len(), out.display())?;
            Ok(())
        }
    }
}
