//! `capsa trust`: run the trust service, and talk to it as an admin, a
//! workload or a relying party.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_tee::evidence::Tee;
use capsa_trust::attestation::EvidenceKind;
use capsa_trust::client::{self, Client, ClientError, Method, RuntimeKey};
use capsa_trust::config::Config;
use capsa_trust::server::{self, ServeError, ServeOptions};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::output::{self, outln};
use crate::{Refused, UsageError, read};

const DEFAULT_URL: &str = "http://127.0.0.1:8443";

#[derive(Subcommand)]
pub(crate) enum TrustCommand {
    /// Run the trust service (attestation, tokens, key broker) on one data directory.
    Serve(ServeArgs),
    /// Make the workload's runtime key (RSA-2048) and print the REPORT_DATA (hex) its evidence must carry.
    RuntimeKey(RuntimeKeyArgs),
    /// Get a fresh server nonce (for attestation policies that require freshness).
    Nonce(ServerArgs),
    /// Attest evidence; print the token.
    Attest(AttestArgs),
    /// Release a key to the holder of a token and unwrap it with the runtime key.
    Release(ReleaseArgs),
    /// Manage keys and secrets (admin).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Rotate a token signing key (admin).
    RotateSigningKey {
        /// `production` or `sim`.
        #[arg(long, default_value = "production")]
        issuer: String,
        #[command(flatten)]
        server: AdminArgs,
    },
    /// Read or verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The data directory (database, master key, local admin token).
    #[arg(long)]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// Accept evidence from capsa's sim platform (tokens under `<issuer>/sim`). Development only.
    #[arg(long)]
    allow_sim: bool,
    /// Configuration file (TOML): issuer, attestation policies, external issuers, admins.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ServerArgs {
    /// The trust service's URL (or CAPSA_TRUST_URL).
    #[arg(long, env = "CAPSA_TRUST_URL", default_value = DEFAULT_URL)]
    server: String,
}

#[derive(Args)]
pub(crate) struct AdminArgs {
    /// The trust service's URL (or CAPSA_TRUST_URL).
    #[arg(long, env = "CAPSA_TRUST_URL", default_value = DEFAULT_URL)]
    pub(crate) server: String,
    /// A file holding an admin bearer token (a local server writes `<data-dir>/admin.token`).
    #[arg(long, env = "CAPSA_TRUST_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: PathBuf,
}

#[derive(Args)]
pub(crate) struct RuntimeKeyArgs {
    /// Where to write the private key (PKCS#8 DER, mode 0600).
    #[arg(long)]
    out: PathBuf,
    /// A server nonce to bind as well.
    #[arg(long)]
    nonce: Option<String>,
}

#[derive(Args)]
pub(crate) struct AttestArgs {
    /// The evidence file (SEV-SNP report, TDX/SGX quote, Azure vTPM evidence).
    evidence: PathBuf,
    /// The kind of evidence: snp, tdx, sgx or az-snp-vtpm.
    #[arg(long, value_parser = crate::parse_tee)]
    tee: Tee,
    /// SEV-SNP: the VCEK (PEM), optionally followed by its chain.
    #[arg(long)]
    vcek: Option<PathBuf>,
    /// SEV-SNP: the ASK/ARK chain (PEM), appended to the VCEK.
    #[arg(long)]
    chain: Option<PathBuf>,
    /// TDX/SGX: the PCS collateral (JSON).
    #[arg(long)]
    collateral: Option<PathBuf>,
    /// The runtime key whose public half the evidence binds (`capsa trust runtime-key`).
    #[arg(long)]
    runtime_key: Option<PathBuf>,
    /// The nonce the evidence binds.
    #[arg(long)]
    nonce: Option<String>,
    /// The attestation policy to apply (default: `default`).
    #[arg(long)]
    policy: Option<String>,
    /// Write the token here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the request body (JSON) here, to inspect or replay it.
    #[arg(long)]
    save_request: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Args)]
pub(crate) struct ReleaseArgs {
    /// The key's name.
    #[arg(long)]
    key: String,
    /// A version (default: the current one).
    #[arg(long)]
    version: Option<String>,
    /// A file holding the token.
    #[arg(long)]
    token: PathBuf,
    /// The runtime key the token's `x-ms-runtime.keys` names, to unwrap the
    /// key with. Without it, the signed answer (`{"value": JWS}`) is printed
    /// as it came, for the workload that holds the key to open.
    #[arg(long)]
    runtime_key: Option<PathBuf>,
    /// Write the key material here (mode 0600) instead of printing it as base64url.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    server: ServerArgs,
}

#[derive(Subcommand)]
pub(crate) enum KeyCommand {
    /// Create (generate, or import with --value-file) a key with a release policy.
    Create(CreateArgs),
    /// List keys (metadata only).
    List(AdminArgs),
    /// Show one key.
    Show {
        /// Its name.
        name: String,
        #[command(flatten)]
        server: AdminArgs,
    },
    /// Add a new version.
    Rotate {
        /// Its name.
        name: String,
        #[command(flatten)]
        server: AdminArgs,
    },
    /// Disable a key (or --version).
    Disable(EnableArgs),
    /// Enable a key (or --version).
    Enable(EnableArgs),
    /// Replace the release policy (refused when immutable).
    SetPolicy {
        /// Its name.
        name: String,
        /// The policy file (JSON, Azure Key Vault grammar).
        #[arg(long)]
        policy: PathBuf,
        #[command(flatten)]
        server: AdminArgs,
    },
    /// Delete a key and all its versions.
    Delete {
        /// Its name.
        name: String,
        #[command(flatten)]
        server: AdminArgs,
    },
}

#[derive(Args)]
pub(crate) struct CreateArgs {
    /// The key's name.
    #[arg(long)]
    name: String,
    /// The release policy file (JSON, Azure Key Vault grammar).
    #[arg(long)]
    policy: PathBuf,
    /// oct, RSA, EC or secret.
    #[arg(long, default_value = "oct")]
    kty: String,
    /// Bits: oct 128/192/256 (default 256), RSA 2048/3072/4096 (default 2048).
    #[arg(long)]
    bits: Option<u16>,
    /// EC curve: P-256 or P-384.
    #[arg(long, default_value = "P-256")]
    curve: String,
    /// The policy can never be changed.
    #[arg(long)]
    immutable: bool,
    /// Import this material instead of generating: raw bytes for oct and secret, PKCS#8 DER for RSA and EC.
    #[arg(long)]
    value_file: Option<PathBuf>,
    #[command(flatten)]
    server: AdminArgs,
}

#[derive(Args)]
pub(crate) struct EnableArgs {
    /// The key's name.
    name: String,
    /// Only this version.
    #[arg(long)]
    version: Option<String>,
    #[command(flatten)]
    server: AdminArgs,
}

#[derive(Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify the hash chain: offline on a stopped server's data directory, or by asking the server.
    Verify {
        /// A data directory (the server must be stopped; uses its master key).
        #[arg(long, conflicts_with = "server")]
        data_dir: Option<PathBuf>,
        /// Ask this server instead (needs an audit-read admin token).
        #[arg(long)]
        server: Option<String>,
        /// The admin token file, with --server.
        #[arg(long, env = "CAPSA_TRUST_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
    },
    /// Print audit entries as JSON lines.
    List {
        /// From this entry on.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        server: AdminArgs,
    },
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

pub(crate) fn admin_client(args: &AdminArgs) -> anyhow::Result<Client> {
    let token = std::fs::read_to_string(&args.admin_token_file)
        .map_err(|e| UsageError(format!("cannot read the admin token {}: {e}", args.admin_token_file.display())))?;
    Ok(Client::new(&args.server)?.with_admin_token(token.trim()))
}

/// Maps a client error to the CLI's exit codes: refusals are 1, the rest 2.
pub(crate) fn client_error(e: ClientError) -> anyhow::Error {
    match e.status() {
        Some(401 | 403 | 409) => Refused(e.to_string()).into(),
        _ => UsageError(e.to_string()).into(),
    }
}

fn kind_of(tee: Tee) -> EvidenceKind {
    match tee {
        Tee::Snp => EvidenceKind::SevSnpVm,
        Tee::Tdx => EvidenceKind::TdxVm,
        Tee::Sgx => EvidenceKind::SgxEnclave,
        Tee::AzSnpVtpm => EvidenceKind::AzSnpVtpm,
    }
}

pub(crate) fn run(cmd: TrustCommand) -> anyhow::Result<()> {
    match cmd {
        TrustCommand::Serve(args) => serve(args),
        TrustCommand::RuntimeKey(args) => {
            let key = RuntimeKey::generate()?;
            key.save(&args.out).with_context(|| format!("cannot write {}", args.out.display()))?;
            let report_data = client::report_data_for(&key.runtime_data()?, args.nonce.as_deref())?;
            outln!("{}", hex::encode(report_data))?;
            Ok(())
        }
        TrustCommand::Nonce(args) => {
            let nonce = runtime()?.block_on(Client::new(&args.server)?.nonce()).map_err(client_error)?;
            outln!("{nonce}")?;
            Ok(())
        }
        TrustCommand::Attest(args) => attest(args),
        TrustCommand::Release(args) => release(args),
        TrustCommand::Key(cmd) => key(cmd),
        TrustCommand::RotateSigningKey { issuer, server } => {
            let client = admin_client(&server)?;
            let path = format!("/signing-keys/rotate?issuer={issuer}");
            let v = runtime()?.block_on(client.admin(Method::POST, &path, None)).map_err(client_error)?;
            outln!("{}", serde_json::to_string_pretty(&v)?)?;
            Ok(())
        }
        TrustCommand::Audit(cmd) => audit(cmd),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| UsageError(e.to_string()))?,
        None => Config::default(),
    };
    let options = ServeOptions {
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        allow_sim: args.allow_sim,
        tls: match (args.tls_cert, args.tls_key) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(UsageError("--tls-cert and --tls-key go together".into()).into()),
        },
        config,
    };
    if options.config.issuer.is_none() && options.listen.ip().is_unspecified() {
        let _ = writeln!(
            std::io::stderr(),
            "capsa trust: warning: listening on {} with no `issuer` in the config: tokens will name http(s)://{} as their issuer, which relying parties cannot reach; set issuer = \"https://<public name>\"",
            options.listen,
            options.listen
        );
    }
    let allow_sim = args.allow_sim;
    let data_dir = args.data_dir;
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    runtime()?.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|source| ServeError::Io { what: "cannot handle SIGTERM".into(), source })?;
        let shutdown = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        server::serve(
            options,
            move |addr| {
                let _ = writeln!(std::io::stderr(), "capsa trust: listening on {scheme}://{addr} (data in {})", data_dir.display());
                if allow_sim {
                    let _ = writeln!(
                        std::io::stderr(),
                        "capsa trust: warning: --allow-sim: sim evidence is accepted and its tokens are issued under <issuer>/sim; it proves nothing about confidentiality"
                    );
                }
            },
            shutdown,
        )
        .await
    })?;
    Ok(())
}

fn attest(args: AttestArgs) -> anyhow::Result<()> {
    let evidence = read(&args.evidence)?;
    let runtime_data = match &args.runtime_key {
        Some(path) => Some(RuntimeKey::load(path).map_err(|e| UsageError(e.to_string()))?.runtime_data()?),
        None => None,
    };
    let report = match args.tee {
        Tee::Snp => {
            let mut chain = match &args.vcek {
                Some(p) => read(p)?,
                None => Vec::new(),
            };
            if let Some(p) = &args.chain {
                chain.extend_from_slice(&read(p)?);
            }
            let mut envelope = json!({"SnpReport": URL_SAFE_NO_PAD.encode(&evidence)});
            if !chain.is_empty() {
                envelope["VcekCertChain"] = Value::String(URL_SAFE_NO_PAD.encode(&chain));
            }
            envelope.to_string().into_bytes()
        }
        Tee::Tdx | Tee::Sgx => match &args.collateral {
            Some(p) => {
                let collateral: Value = serde_json::from_slice(&read(p)?)
                    .map_err(|e| UsageError(format!("{}: not JSON: {e}", p.display())))?;
                json!({"Quote": URL_SAFE_NO_PAD.encode(&evidence), "Collateral": collateral}).to_string().into_bytes()
            }
            None => evidence,
        },
        Tee::AzSnpVtpm => evidence,
    };
    let mut body = json!({"report": URL_SAFE_NO_PAD.encode(&report)});
    if let Some(runtime_data) = &runtime_data {
        body["runtimeData"] = json!({"data": URL_SAFE_NO_PAD.encode(runtime_data.to_string()), "dataType": "JSON"});
    }
    if let Some(nonce) = &args.nonce {
        body["nonce"] = Value::String(nonce.clone());
    }
    if let Some(path) = &args.save_request {
        output::write_atomic(path, body.to_string().as_bytes())?;
    }
    let client = Client::new(&args.server.server)?;
    let token =
        runtime()?.block_on(client.attest(kind_of(args.tee), args.policy.as_deref(), &body)).map_err(client_error)?;
    match &args.out {
        Some(out) => {
            output::write_atomic(out, token.as_bytes())?;
            let _ = writeln!(std::io::stderr(), "capsa trust: wrote the token to {}", out.display());
        }
        None => outln!("{token}")?,
    }
    Ok(())
}

fn release(args: ReleaseArgs) -> anyhow::Result<()> {
    let token = String::from_utf8(read(&args.token)?).map_err(|_| UsageError("the token file is not text".into()))?;
    let key = args.runtime_key.as_deref().map(RuntimeKey::load).transpose().map_err(|e| UsageError(e.to_string()))?;
    let client = Client::new(&args.server.server)?;
    let rt = runtime()?;
    let response =
        rt.block_on(client.release(&args.key, args.version.as_deref(), token.trim())).map_err(client_error)?;
    let Some(key) = key else {
        let answer = serde_json::to_vec(&response)?;
        match &args.out {
            Some(out) => output::write_atomic(out, &answer)?,
            None => outln!("{}", String::from_utf8_lossy(&answer))?,
        }
        return Ok(());
    };
    let server_keys = rt.block_on(client.jwks(false)).map_err(client_error)?;
    let released = client::open_release(&response, &server_keys, key.private()).map_err(client_error)?;
    match &args.out {
        Some(out) => {
            capsa_trust::seal::write_private(out, &released.material)
                .with_context(|| format!("cannot write {}", out.display()))?;
            let _ = writeln!(
                std::io::stderr(),
                "capsa trust: released {} ({}, {} bytes) to {}",
                released.kid,
                released.kty,
                released.material.len(),
                out.display()
            );
        }
        None => outln!("{}", URL_SAFE_NO_PAD.encode(released.material.as_slice()))?,
    }
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn key(cmd: KeyCommand) -> anyhow::Result<()> {
    let rt = runtime()?;
    match cmd {
        KeyCommand::Create(args) => {
            let policy: Value = serde_json::from_slice(&read(&args.policy)?)
                .map_err(|e| UsageError(format!("{}: not JSON: {e}", args.policy.display())))?;
            let mut body =
                json!({"name": args.name, "kty": args.kty, "release_policy": policy, "immutable": args.immutable});
            match args.kty.as_str() {
                "oct" => body["bits"] = json!(args.bits.unwrap_or(256)),
                "RSA" => body["bits"] = json!(args.bits.unwrap_or(2048)),
                "EC" => body["crv"] = json!(args.curve),
                "secret" => {}
                other => return Err(UsageError(format!("--kty {other}: expected oct, RSA, EC or secret")).into()),
            }
            if let Some(p) = &args.value_file {
                body["value"] = Value::String(URL_SAFE_NO_PAD.encode(read(p)?));
            }
            let info = rt.block_on(admin_client(&args.server)?.create_key(&body)).map_err(client_error)?;
            print_json(&info)
        }
        KeyCommand::List(server) => print_json(&rt.block_on(admin_client(&server)?.list_keys()).map_err(client_error)?),
        KeyCommand::Show { name, server } => print_json(
            &rt.block_on(admin_client(&server)?.admin(Method::GET, &format!("/keys/{name}"), None))
                .map_err(client_error)?,
        ),
        KeyCommand::Rotate { name, server } => print_json(
            &rt.block_on(admin_client(&server)?.admin(Method::POST, &format!("/keys/{name}/rotate"), None))
                .map_err(client_error)?,
        ),
        KeyCommand::Disable(args) => set_enabled(&rt, args, false),
        KeyCommand::Enable(args) => set_enabled(&rt, args, true),
        KeyCommand::SetPolicy { name, policy, server } => {
            let policy: Value = serde_json::from_slice(&read(&policy)?)
                .map_err(|e| UsageError(format!("{}: not JSON: {e}", policy.display())))?;
            print_json(&rt.block_on(admin_client(&server)?.set_policy(&name, &policy)).map_err(client_error)?)
        }
        KeyCommand::Delete { name, server } => {
            rt.block_on(admin_client(&server)?.admin(Method::DELETE, &format!("/keys/{name}"), None))
                .map_err(client_error)?;
            outln!("deleted {name}")?;
            Ok(())
        }
    }
}

fn set_enabled(rt: &tokio::runtime::Runtime, args: EnableArgs, enabled: bool) -> anyhow::Result<()> {
    let body = json!({"enabled": enabled, "version": args.version});
    let client = admin_client(&args.server)?;
    print_json(
        &rt.block_on(client.admin(Method::PATCH, &format!("/keys/{}", args.name), Some(&body)))
            .map_err(client_error)?,
    )
}

fn audit(cmd: AuditCommand) -> anyhow::Result<()> {
    match cmd {
        AuditCommand::Verify { data_dir: Some(dir), .. } => {
            let verified = capsa_trust::server::verify_audit_offline(&dir).map_err(|e| UsageError(e.to_string()))?;
            match verified {
                Ok(v) => {
                    outln!("audit log intact: {} entries, head {}", v.entries, v.head)?;
                    Ok(())
                }
                Err(problem) => Err(Refused(format!("audit log NOT intact: {problem}")).into()),
            }
        }
        AuditCommand::Verify { server: Some(server), admin_token_file, .. } => {
            let admin_token_file = admin_token_file
                .ok_or_else(|| UsageError("--server needs --admin-token-file (an audit-read admin)".into()))?;
            let client = admin_client(&AdminArgs { server, admin_token_file })?;
            let v = runtime()?.block_on(client.admin(Method::GET, "/audit/verify", None)).map_err(client_error)?;
            if v.get("intact") == Some(&Value::Bool(true)) {
                outln!("audit log intact: {} entries, head {}", v["entries"], v["head"].as_str().unwrap_or(""))?;
                Ok(())
            } else {
                Err(Refused(format!("audit log NOT intact: {}", v["problem"].as_str().unwrap_or("unknown"))).into())
            }
        }
        AuditCommand::Verify { .. } => Err(UsageError("give --data-dir DIR (offline) or --server URL".into()).into()),
        AuditCommand::List { from, limit, server } => {
            let client = admin_client(&server)?;
            let v = runtime()?
                .block_on(client.admin(Method::GET, &format!("/audit?from={from}&limit={limit}"), None))
                .map_err(client_error)?;
            for entry in v["entries"].as_array().into_iter().flatten() {
                outln!("{}", serde_json::to_string(entry)?)?;
            }
            Ok(())
        }
    }
}
