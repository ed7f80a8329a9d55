//! `capsa guest build` and `capsa measure`: argument types and rendering;
//! the work is in `capsa_runtime::guest` and `capsa_runtime::measure`.

use std::path::PathBuf;

use capsa_runtime::guest::{self, DEFAULT_CMDLINE, GuestError, GuestInputs};
use capsa_runtime::measure::{self, HASHES_PAGE_GPA, HASHES_TABLE_OFFSET, SevHashes};
use clap::{Args, Subcommand};

use crate::output::{self, outln};
use crate::{UsageError, read};

#[derive(Subcommand)]
pub enum GuestCommand {
    /// Build the guest image (kernel, initramfs with capsa-agent as /init, cmdline) and print its measurement.
    Build(BuildArgs),
}

#[derive(Args)]
pub struct BuildArgs {
    /// Where to write vmlinuz, initrd.img, cmdline and guest.json (default: $XDG_CACHE_HOME/capsa/guest or ~/.cache/capsa/guest).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The guest kernel (default: $CAPSA_GUEST_KERNEL, or the newest /boot/vmlinuz-*).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The kernel's module tree (default: $CAPSA_GUEST_MODULES, or /lib/modules/<kernel release>).
    #[arg(long)]
    modules: Option<PathBuf>,
    /// The static capsa-agent (default: $CAPSA_AGENT, or capsa-agent next to capsa; see scripts/build-agent).
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
}

#[derive(Args)]
pub struct MeasureArgs {
    /// The kernel the sandbox boots.
    #[arg(long)]
    kernel: PathBuf,
    /// The initrd it boots with.
    #[arg(long)]
    initrd: PathBuf,
    /// The kernel command line, exactly as the launcher passes it.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Print the digest and the hashes it covers as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: GuestCommand) -> anyhow::Result<()> {
    match cmd {
        GuestCommand::Build(args) => build(args),
    }
}

/// Missing or unusable inputs are the user's to fix (exit code 2, like
/// every other error here); the library's message says how.
fn usage(err: GuestError) -> anyhow::Error {
    UsageError(err.to_string()).into()
}

fn build(args: BuildArgs) -> anyhow::Result<()> {
    let kernel = guest::locate_kernel(args.kernel.as_deref(), args.modules.as_deref()).map_err(usage)?;
    let agent = guest::locate_agent(args.agent.as_deref()).map_err(usage)?;
    let out = match args.out {
        Some(out) => out,
        None => guest::default_out_dir().map_err(usage)?,
    };
    let inputs = GuestInputs { kernel: kernel.kernel, modules_root: kernel.modules_root, agent, cmdline: args.cmdline };
    let image = guest::build(&inputs).map_err(usage)?;
    let written = image.write(&out)?;
    outln!("guest image for kernel {} in {}", image.kernel_release, out.display())?;
    for path in &written {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        outln!("  wrote {} ({size} bytes)", path.display())?;
    }
    output::table(&[
        ("kernel".to_owned(), inputs.kernel.display().to_string()),
        ("modules".to_owned(), format!("{} ({})", image.modules.join(" "), inputs.modules_root.display())),
        ("agent".to_owned(), inputs.agent.display().to_string()),
        ("cmdline".to_owned(), image.cmdline.clone()),
        ("measurement".to_owned(), hex::encode(image.measurement)),
    ])?;
    Ok(())
}

pub fn measure(args: MeasureArgs) -> anyhow::Result<()> {
    let (kernel, initrd) = (read(&args.kernel)?, read(&args.initrd)?);
    let digest = measure::launch_digest(&kernel, &initrd, &args.cmdline);
    if !args.json {
        outln!("{}", hex::encode(digest))?;
        return Ok(());
    }
    let hashes = SevHashes::new(&kernel, &initrd, &args.cmdline);
    let report = serde_json::json!({
        "measurement": hex::encode(digest),
        "kernel_sha256": hex::encode(hashes.kernel),
        "initrd_sha256": hex::encode(hashes.initrd),
        "cmdline_sha256": hex::encode(hashes.cmdline),
        "cmdline": args.cmdline,
        "hashes_table_gpa": format!("{:#x}", HASHES_PAGE_GPA + HASHES_TABLE_OFFSET as u64),
    });
    outln!("{}", serde_json::to_string_pretty(&report)?)?;
    Ok(())
}
