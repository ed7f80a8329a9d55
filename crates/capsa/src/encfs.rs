//! `capsa encfs`: create, check and (for development) mount encrypted
//! filesystem images.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_encfs::format::{DEFAULT_BLOCKS_PER_CHUNK, ManifestHeader};
use capsa_encfs::luks::{LuksError, LuksHeader, LuksLocation, LuksVolume};
use capsa_encfs::mount::{self, Device, Mounted};
use capsa_encfs::{Image, MasterKey, OpenOptions, Store, remote};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::output::outln;
use crate::trust::{AdminArgs, admin_client, client_error, runtime};
use crate::{UsageError, read};

#[derive(Subcommand)]
pub(crate) enum EncfsCommand {
    /// Make an encrypted, integrity-protected image of a directory tree.
    Create(CreateArgs),
    /// Mount an image on a directory (root; for development: the key comes from a file).
    /// A LUKS2 image file or blob (Azure's encfs recipe) mounts read-only.
    Mount(MountArgs),
    /// Read and check every block of an image (of a LUKS2 image: its header and key).
    Check(CheckArgs),
    /// Print an image's geometry and generation (needs no key).
    Info {
        /// The image: a directory, or a URL (az://, s3://, https://, file://).
        image: String,
    },
}

#[derive(Args)]
pub(crate) struct CreateArgs {
    /// The directory tree to put in the image.
    source: PathBuf,
    /// Where to create the image: a new directory, or a URL (az://, s3://, ...).
    #[arg(long)]
    out: String,
    /// The image's size (e.g. 512M, 10G); default: the tree's size with room to spare.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Generate the key and import it into the trust service under this name.
    #[arg(long, requires = "release_policy", conflicts_with = "key_file")]
    key_name: Option<String>,
    /// The key's release policy (JSON, Azure Key Vault grammar), with --key-name.
    #[arg(long)]
    release_policy: Option<PathBuf>,
    /// For development: use the 32-byte key in this file instead.
    #[arg(long)]
    key_file: Option<PathBuf>,
    #[command(flatten)]
    trust: OptionalAdminArgs,
    /// The filesystem's label.
    #[arg(long, default_value = "capsa-encfs")]
    label: String,
    /// Where to mount the image's device while formatting it.
    #[arg(long, default_value = "/run/capsa")]
    work_dir: PathBuf,
}

/// The trust service, needed only with --key-name.
#[derive(Args)]
pub(crate) struct OptionalAdminArgs {
    /// The trust service's URL (or CAPSA_TRUST_URL).
    #[arg(long = "trust", env = "CAPSA_TRUST_URL", default_value = "http://127.0.0.1:8443")]
    server: String,
    /// A file holding an admin bearer token (a local server writes `<data-dir>/admin.token`).
    #[arg(long, env = "CAPSA_TRUST_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct MountArgs {
    /// The image: a directory, or a URL (az://, s3://, https://, file://).
    image: String,
    /// Where to mount it.
    dir: PathBuf,
    /// The 32-byte key.
    #[arg(long)]
    key_file: PathBuf,
    /// Mount read-only. Its files are then served by capsa's own ext4 reader,
    /// without a loop device, when the reader accepts the filesystem.
    #[arg(long)]
    read_only: bool,
    /// Mount through the kernel's ext4 on a loop device even when read-only:
    /// it serves extended attributes (ACLs, file capabilities), which
    /// capsa's reader does not.
    #[arg(long)]
    kernel_ext4: bool,
    /// Plaintext cache, in MiB.
    #[arg(long, default_value_t = 64)]
    cache_mib: usize,
    /// Commit writes in the background this often (seconds); fsync commits at once.
    #[arg(long, default_value_t = 5)]
    writeback_secs: u64,
    /// Where to mount the image's device.
    #[arg(long, default_value = "/run/capsa")]
    work_dir: PathBuf,
}

#[derive(Args)]
pub(crate) struct CheckArgs {
    /// The image: a directory, or a URL.
    image: String,
    /// The 32-byte key.
    #[arg(long)]
    key_file: PathBuf,
}

pub(crate) fn run(cmd: EncfsCommand) -> anyhow::Result<()> {
    match cmd {
        EncfsCommand::Create(args) => create(args),
        EncfsCommand::Mount(args) => mount_image(args),
        EncfsCommand::Check(args) => check(args),
        EncfsCommand::Info { image } => info(&image),
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{text:?}: expected a size such as 512M or 10G"))?;
    let shift = match unit.trim_end_matches(['i', 'B']) {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(format!("{text:?}: the unit must be K, M, G or T")),
    };
    n.checked_mul(1 << shift).ok_or_else(|| format!("{text:?} is too large"))
}

fn key_from_file(path: &Path) -> anyhow::Result<MasterKey> {
    let bytes = zeroize::Zeroizing::new(read(path)?);
    MasterKey::from_bytes(&bytes).map_err(|e| {
        UsageError(format!("{}: {e} (make one with: head -c 32 /dev/urandom > {})", path.display(), path.display()))
            .into()
    })
}

fn store_for(location: &str, create: bool) -> anyhow::Result<Arc<dyn Store>> {
    let store = if create { remote::create(location) } else { remote::open(location) };
    store.map_err(|e| UsageError(format!("{location}: {e}")).into())
}

fn create(args: CreateArgs) -> anyhow::Result<()> {
    if !args.source.is_dir() {
        return Err(UsageError(format!("{}: not a directory", args.source.display())).into());
    }
    let (key, import) = match (&args.key_file, &args.key_name) {
        (Some(file), None) => (key_from_file(file)?, None),
        (None, Some(name)) => {
            let policy_path =
                args.release_policy.as_ref().ok_or_else(|| UsageError("--key-name needs --release-policy".into()))?;
            let policy: Value = serde_json::from_slice(&read(policy_path)?)
                .map_err(|e| UsageError(format!("{}: not JSON: {e}", policy_path.display())))?;
            let token_file = args.trust.admin_token_file.clone().ok_or_else(|| {
                UsageError(
                    "--key-name needs --admin-token-file (or CAPSA_TRUST_ADMIN_TOKEN_FILE) to import the key".into(),
                )
            })?;
            let admin = AdminArgs { server: args.trust.server.clone(), admin_token_file: token_file };
            (MasterKey::generate()?, Some((name.clone(), policy, admin)))
        }
        _ => {
            return Err(
                UsageError("give --key-name with --release-policy, or --key-file for development".into()).into()
            );
        }
    };
    let size = match args.size {
        Some(size) => size,
        None => mount::size_for(&args.source).map_err(|e| UsageError(format!("{}: {e}", args.source.display())))?,
    };
    let store = store_for(&args.out, true)?;
    let image = Arc::new(Image::create(store.clone(), &key, size, DEFAULT_BLOCKS_PER_CHUNK, OpenOptions::default())?);
    let formatted = Device::serve(image.clone(), &args.work_dir)
        .and_then(|device| mount::format_ext4(&device, &args.source, &args.label).and_then(|()| device.close()));
    if let Err(e) = formatted {
        capsa_encfs::image::remove(&*store);
        return Err(anyhow::Error::new(e).context(format!(
            "formatting the image (if it ran out of space, give a larger --size than {size} bytes)"
        )));
    }
    let stored = image.stored_blocks();
    if let Some((name, policy, admin)) = import {
        // The key leaves this process only here, to the trust service; if it
        // cannot, the image is unreadable and is removed.
        let body = json!({
            "name": name,
            "kty": "oct",
            "bits": 256,
            "release_policy": policy,
            "value": URL_SAFE_NO_PAD.encode(key.as_bytes()),
        });
        let imported =
            runtime()?.block_on(async { admin_client(&admin)?.create_key(&body).await.map_err(client_error) });
        if let Err(e) = imported {
            capsa_encfs::image::remove(&*store);
            return Err(e.context(format!("importing the key {name}; the image was removed")));
        }
    }
    let geometry = image.geometry();
    let _ = writeln!(
        std::io::stderr(),
        "capsa encfs: {} ({} MiB, {} of {} blocks stored){}",
        args.out,
        geometry.size() >> 20,
        stored,
        geometry.block_count,
        args.key_name.as_ref().map(|n| format!("; key {n} imported into {}", args.trust.server)).unwrap_or_default()
    );
    Ok(())
}

fn open_image(location: &str, key_file: &Path, options: OpenOptions) -> anyhow::Result<Image> {
    let key = key_from_file(key_file)?;
    Ok(Image::open(store_for(location, false)?, &key, options)?)
}

fn mount_image(args: MountArgs) -> anyhow::Result<()> {
    if let Some(luks) = LuksLocation::detect(&args.image) {
        return mount_luks(args, luks);
    }
    let options =
        OpenOptions { read_only: args.read_only, cache_blocks: args.cache_mib * 256, ..OpenOptions::default() };
    let image = Arc::new(open_image(&args.image, &args.key_file, options)?);
    let writeback = if args.read_only {
        None
    } else {
        Some(image.start_writeback(Duration::from_secs(args.writeback_secs.max(1))).context("the writeback thread")?)
    };
    let mounted = mount_volume(image.clone(), &args)?;
    let _ = writeln!(
        std::io::stderr(),
        "capsa encfs: {} mounted on {} ({}{}); Ctrl-C or `umount {}` unmounts",
        args.image,
        args.dir.display(),
        served_by(&mounted),
        if args.read_only { ", read-only" } else { "" },
        args.dir.display()
    );
    wait_until_unmounted(&mounted)?;
    image.stop_writeback();
    let result = mounted.unmount();
    if let Some(handle) = writeback {
        let _ = handle.join();
    }
    result?;
    let _ = writeln!(
        std::io::stderr(),
        "capsa encfs: unmounted {} (generation {})",
        args.dir.display(),
        image.generation()
    );
    Ok(())
}

fn mount_volume(volume: Arc<dyn capsa_encfs::Volume>, args: &MountArgs) -> anyhow::Result<Mounted> {
    Ok(if args.kernel_ext4 {
        Mounted::mount_through_kernel(volume, &args.dir, &args.work_dir)?
    } else {
        Mounted::mount(volume, &args.dir, &args.work_dir)?
    })
}

/// What serves a mount's files, for the message that says it is mounted.
fn served_by(mounted: &Mounted) -> String {
    match mounted.loop_device() {
        Some(device) => format!("ext4 on {}", device.display()),
        None => "files served by capsa's ext4 reader".into(),
    }
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    if let Some(luks) = LuksLocation::detect(&args.image) {
        return check_luks(&args, luks);
    }
    let image = open_image(&args.image, &args.key_file, OpenOptions { read_only: true, ..OpenOptions::default() })?;
    let stored = image.check()?;
    let geometry = image.geometry();
    outln!(
        "{}: ok: {} of {} blocks stored and checked, generation {}",
        args.image,
        stored,
        geometry.block_count,
        image.generation()
    )?;
    Ok(())
}

fn info(location: &str) -> anyhow::Result<()> {
    if let Some(luks) = LuksLocation::detect(location) {
        return info_luks(location, &luks);
    }
    let store = store_for(location, false)?;
    let bytes = store.get("manifest").map_err(|e| UsageError(format!("{location}: manifest: {e}")))?;
    let header = ManifestHeader::peek(&bytes)?;
    let g = header.geometry;
    let value = json!({
        "location": store.describe(),
        "image_id": hex::encode(g.image_id),
        "size": g.size(),
        "block_size": capsa_encfs::BLOCK_SIZE,
        "blocks": g.block_count,
        "blocks_per_chunk": g.blocks_per_chunk,
        "generation": header.generation,
        "authenticated": false,
    });
    outln!("{}", serde_json::to_string_pretty(&value)?)?;
    Ok(())
}

// LUKS2 images (Azure's encfs recipe): a single file or blob, mounted
// read-only through the same FUSE and loop devices.

/// Opens a LUKS2 image with the key file's bytes as the passphrase.
fn open_luks(location: &str, luks: LuksLocation, key_file: &Path) -> anyhow::Result<LuksVolume> {
    let passphrase = zeroize::Zeroizing::new(read(key_file)?);
    LuksVolume::open(luks.store, &luks.object, &passphrase, luks.size).map_err(|e| match e {
        LuksError::Store { .. } | LuksError::Crypto(_) => anyhow::Error::new(e).context(location.to_string()),
        e => UsageError(format!("{location}: {e}")).into(),
    })
}

fn mount_luks(args: MountArgs, luks: LuksLocation) -> anyhow::Result<()> {
    let volume = open_luks(&args.image, luks, &args.key_file)?;
    let keyslot = volume.keyslot();
    let mounted = mount_volume(Arc::new(volume), &args)?;
    let _ = writeln!(
        std::io::stderr(),
        "capsa encfs: {} (LUKS2, keyslot {keyslot}) mounted on {} ({}, read-only{}); LUKS2 has no integrity protection: \
         changed sectors read as garbage, undetected; Ctrl-C or `umount {}` unmounts",
        args.image,
        args.dir.display(),
        served_by(&mounted),
        if args.read_only { "" } else { ": capsa does not write LUKS2 images" },
        args.dir.display()
    );
    wait_until_unmounted(&mounted)?;
    mounted.unmount()?;
    let _ = writeln!(std::io::stderr(), "capsa encfs: unmounted {}", args.dir.display());
    Ok(())
}

/// Until Ctrl-C, SIGTERM, or someone unmounting the directory by hand.
fn wait_until_unmounted(mounted: &Mounted) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                _ = tick.tick() => if !mounted.still_mounted() { break },
            }
        }
        anyhow::Ok(())
    })
}

fn check_luks(args: &CheckArgs, luks: LuksLocation) -> anyhow::Result<()> {
    let volume = open_luks(&args.image, luks, &args.key_file)?;
    let read = volume.check()?;
    outln!(
        "{}: ok: LUKS2 header and key (keyslot {}) checked, {} MiB of data read; no integrity protection: only the header and key were checked",
        args.image,
        volume.keyslot(),
        read >> 20
    )?;
    Ok(())
}

fn info_luks(location: &str, luks: &LuksLocation) -> anyhow::Result<()> {
    let header = LuksHeader::read(&*luks.store, &luks.object).map_err(|e| UsageError(format!("{location}: {e}")))?;
    let value = json!({
        "location": location,
        "format": "luks2",
        "uuid": header.uuid(),
        "label": header.label(),
        "cipher": header.cipher(),
        "key_bits": header.key_bits(),
        "sector_size": header.sector_size(),
        "data_offset": header.data_offset(),
        "data_size": header.data_size().map_or(json!("dynamic"), |size| json!(size)),
        "keyslots": header.keyslots(),
        "seqid": header.seqid(),
        "authenticated": false,
    });
    outln!("{}", serde_json::to_string_pretty(&value)?)?;
    Ok(())
}
