//! `capsa-unseal`: decrypts a sealed file inside a capsa sandbox with a key
//! released through the workload API, and seals files for it on the data
//! owner's machine.
//!
//! ```text
//! capsa-unseal --maa URL --akv URL --kid KID FILE        # in the sandbox
//! capsa-unseal seal --key-file RAWKEY --in PLAIN --out FILE  # on the owner's machine
//! ```
//!
//! The plaintext goes to standard output and nowhere else; every failure is
//! one line on standard error naming the step that failed.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use capsa_sdk::{ClientError, WorkloadClient, seal};
use clap::{Parser, Subcommand};
use zeroize::Zeroizing;

/// Decrypts FILE with a key released through the capsa workload API and
/// prints the plaintext; or, with `seal`, seals a file for it.
#[derive(Parser)]
#[command(name = "capsa-unseal", version, args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The attestation service that vouches for this sandbox.
    #[arg(long, value_name = "URL", required = true)]
    maa: Option<String>,
    /// The key broker that holds the key.
    #[arg(long, value_name = "URL", required = true)]
    akv: Option<String>,
    /// The key's identifier at the key broker.
    #[arg(long, value_name = "KID", required = true)]
    kid: Option<String>,
    /// The workload API's host:port [default: $CAPSA_WORKLOAD_API, else 127.0.0.1:8080].
    #[arg(long, value_name = "HOST:PORT")]
    api: Option<String>,
    /// The sealed file: a 12-byte nonce, then AES-256-GCM ciphertext and tag.
    #[arg(value_name = "FILE", required = true)]
    file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Seals a file under a raw 32-byte key, for the data owner.
    Seal {
        /// The raw 32-byte AES-256 key (the one imported into the key broker).
        #[arg(long, value_name = "RAWKEY")]
        key_file: PathBuf,
        /// The plaintext to seal.
        #[arg(long = "in", value_name = "PLAIN")]
        input: PathBuf,
        /// Where to write the sealed file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Seal { key_file, input, out }) => seal_file(&key_file, &input, &out),
        None => match (cli.maa, cli.akv, cli.kid, cli.file) {
            (Some(maa), Some(akv), Some(kid), Some(file)) => {
                let client = cli.api.map_or_else(WorkloadClient::from_env, WorkloadClient::new);
                unseal_file(&client, &maa, &akv, &kid, &file)
            }
            // clap requires all four without a subcommand.
            _ => Err("--maa, --akv, --kid and FILE are required".to_owned()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("capsa-unseal: {message}");
            ExitCode::FAILURE
        }
    }
}

fn unseal_file(client: &WorkloadClient, maa: &str, akv: &str, kid: &str, file: &Path) -> Result<(), String> {
    // Read first: a missing file should not cost a key release.
    let sealed = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let key = client.release_key(maa, akv, kid).map_err(|e| release_failure(kid, &e))?;
    let octets = key
        .octets()
        .ok_or_else(|| format!("key {kid} is a {} key; sealed files need a 32-byte oct (symmetric) key", key.kty()))?;
    let plain = seal::unseal(octets, &sealed).map_err(|e| format!("cannot unseal {}: {e}", file.display()))?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&plain).and_then(|()| stdout.flush()).map_err(|e| format!("cannot write the plaintext: {e}"))
}

/// One line for a failed release, naming the step: the API's message
/// already begins with it (`release policy: ...`).
fn release_failure(kid: &str, e: &ClientError) -> String {
    match e {
        ClientError::Api { status: 403, message } => format!("key release refused (403): {message}"),
        ClientError::Api { status, message } => format!("key release failed ({status}): {message}"),
        other => format!("key release of {kid} failed: {other}"),
    }
}

fn seal_file(key_file: &Path, input: &Path, out: &Path) -> Result<(), String> {
    let key = Zeroizing::new(std::fs::read(key_file).map_err(|e| format!("cannot read {}: {e}", key_file.display()))?);
    let plain = Zeroizing::new(std::fs::read(input).map_err(|e| format!("cannot read {}: {e}", input.display()))?);
    let sealed = seal::seal(&key, &plain).map_err(|e| format!("cannot seal with {}: {e}", key_file.display()))?;
    std::fs::write(out, sealed).map_err(|e| format!("cannot write {}: {e}", out.display()))
}
