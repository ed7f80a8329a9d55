//! The sim platform's state directory on disk.
//!
//! A state directory is created whole or not at all: every file is written
//! into a private sibling directory, each file fsynced, then that directory
//! is renamed onto the final path and the parent fsynced. A crash therefore
//! leaves either no state or complete state (never an ARK from one run and a
//! VCEK from another), and two concurrent `capsa sim init` runs cannot mix
//! their files: `rename(2)` onto a non-empty directory fails, and the loser
//! loads the winner's platform.
//!
//! Private keys are created with mode 0600 at open time, inside a directory
//! created 0700, so they are never readable by anyone else, not even for the
//! instant between creation and a later chmod.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{SecretBytes, SimError, Tcb};

pub(crate) const ARK_KEY: &str = "ark.key";
pub(crate) const ASK_KEY: &str = "ask.key";
pub(crate) const VCEK_KEY: &str = "vcek.key";
pub(crate) const ARK_PEM: &str = "ark.pem";
pub(crate) const ASK_PEM: &str = "ask.pem";
pub(crate) const VCEK_PEM: &str = "vcek.pem";
pub(crate) const PLATFORM_JSON: &str = "platform.json";

pub(crate) const DIR_MODE: u32 = 0o700;
pub(crate) const KEY_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

/// Upper bounds on what is read back: far above what the sim writes (an
/// RSA-4096 PKCS#8 key is about 2.4 KiB), low enough that a stray large
/// file is an error rather than an allocation.
const MAX_KEY_LEN: usize = 16 * 1024;
const MAX_PUBLIC_LEN: usize = 64 * 1024;

/// Format version of `platform.json`.
pub(crate) const PLATFORM_FORMAT: u32 = 1;

/// `platform.json`: the sim chip's identity, which the VCEK certifies and
/// every report repeats.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlatformFile {
    /// Format version of this file; 1.
    pub(crate) format: u32,
    /// Processor line imitated; "Genoa".
    pub(crate) product: String,
    /// CHIP_ID of every report and hwID of the VCEK: 64 bytes, lower-case hex.
    pub(crate) chip_id: String,
    /// The TCB (security patch levels) reported and certified.
    pub(crate) tcb: TcbFile,
}

/// The TCB as `platform.json` stores it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TcbFile {
    /// Bootloader SPL.
    pub(crate) bootloader: u8,
    /// TEE (PSP OS) SPL.
    pub(crate) tee: u8,
    /// SNP firmware SPL.
    pub(crate) snp: u8,
    /// Microcode SPL.
    pub(crate) microcode: u8,
}

impl From<Tcb> for TcbFile {
    fn from(t: Tcb) -> Self {
        Self { bootloader: t.bootloader, tee: t.tee, snp: t.snp, microcode: t.microcode }
    }
}

impl From<&TcbFile> for Tcb {
    fn from(t: &TcbFile) -> Self {
        Self { bootloader: t.bootloader, tee: t.tee, snp: t.snp, microcode: t.microcode }
    }
}

/// One file of a state directory about to be created.
pub(crate) struct NewFile<'a> {
    pub(crate) name: &'static str,
    pub(crate) contents: &'a [u8],
    pub(crate) private: bool,
}

/// What [`create_dir_atomically`] found.
pub(crate) enum Created {
    /// The state directory now holds exactly `files`.
    Ours,
    /// Another process created a state directory first; ours was discarded.
    Theirs,
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SimError {
    let path = path.to_path_buf();
    move |source| SimError::Io { op, path, source }
}

/// Creates `dir` holding `files`, all or nothing (see the module docs).
/// `dir` may already exist if it is empty; a non-empty `dir` is another
/// process's completed state (reported as [`Created::Theirs`]) or an error.
pub(crate) fn create_dir_atomically(dir: &Path, files: &[NewFile<'_>]) -> Result<Created, SimError> {
    let name = dir.file_name().ok_or_else(|| SimError::BadDirectory { dir: dir.to_path_buf() })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    // Ancestors the sim creates hold nothing of others' concern; 0700 keeps
    // the state's existence private too. Existing ancestors are untouched.
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(&parent).map_err(io_error("create", &parent))?;

    let mut suffix = [0u8; 8];
    aws_lc_rs::rand::fill(&mut suffix).map_err(|_| SimError::Crypto("naming a temporary directory"))?;
    let staging = parent.join(format!(".{}.init-{}", name.to_string_lossy(), hex::encode(suffix)));
    DirBuilder::new().mode(DIR_MODE).create(&staging).map_err(io_error("create", &staging))?;

    let result = populate_and_rename(&staging, dir, &parent, files);
    if !matches!(result, Ok(Created::Ours)) {
        // Best effort: the staging directory is useless now, and an error
        // from removing it would hide the error that matters.
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

fn populate_and_rename(staging: &Path, dir: &Path, parent: &Path, files: &[NewFile<'_>]) -> Result<Created, SimError> {
    // A umask can only clear bits from the mode given at creation; set it
    // exactly so the directory is usable whatever the umask.
    fs::set_permissions(staging, fs::Permissions::from_mode(DIR_MODE))
        .map_err(io_error("set permissions on", staging))?;
    for file in files {
        let mode = if file.private { KEY_MODE } else { PUBLIC_MODE };
        write_new_file(&staging.join(file.name), file.contents, mode)?;
    }
    sync_dir(staging)?;
    match fs::rename(staging, dir) {
        Ok(()) => {
            sync_dir(parent)?;
            Ok(Created::Ours)
        }
        // rename(2) reports a non-empty target as ENOTEMPTY or EEXIST.
        Err(e) if matches!(e.kind(), io::ErrorKind::DirectoryNotEmpty | io::ErrorKind::AlreadyExists) => {
            if dir.join(PLATFORM_JSON).exists() {
                Ok(Created::Theirs)
            } else {
                Err(SimError::Incomplete { dir: dir.to_path_buf(), missing: PLATFORM_JSON })
            }
        }
        Err(source) => Err(SimError::Io { op: "move into place", path: dir.to_path_buf(), source }),
    }
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), SimError> {
    let mut file =
        OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io_error("create", path))?;
    // The umask may have cleared bits; fchmod to the exact mode (never
    // more than was requested at open).
    file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_error("set permissions on", path))?;
    file.write_all(contents).map_err(io_error("write", path))?;
    file.sync_all().map_err(io_error("sync", path))
}

fn sync_dir(dir: &Path) -> Result<(), SimError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("sync", dir))
}

/// Reads a public file of the state directory.
pub(crate) fn read_public(dir: &Path, name: &'static str) -> Result<Vec<u8>, SimError> {
    let path = dir.join(name);
    let file = open_existing(dir, &path, name)?;
    let mut buf = Vec::new();
    read_bounded(file, &path, MAX_PUBLIC_LEN, &mut buf)?;
    Ok(buf)
}

/// Reads a private key, refusing it if group or others can access it.
///
/// The buffer is allocated once at its maximum size so that no reallocation
/// leaves a copy of the key in freed memory.
pub(crate) fn read_private(dir: &Path, name: &'static str) -> Result<SecretBytes, SimError> {
    let path = dir.join(name);
    let file = open_private(dir, &path, name)?;
    let mut secret = SecretBytes::with_capacity(MAX_KEY_LEN + 1);
    read_bounded(file, &path, MAX_KEY_LEN, secret.as_mut_vec())?;
    Ok(secret)
}

/// Checks that a private key exists and that group and others cannot
/// access it, without reading it.
pub(crate) fn check_private(dir: &Path, name: &'static str) -> Result<(), SimError> {
    open_private(dir, &dir.join(name), name).map(drop)
}

/// Opens a private key file and checks the mode of the opened file, not of
/// the path, so that the file checked is the file read.
fn open_private(dir: &Path, path: &Path, name: &'static str) -> Result<File, SimError> {
    let file = open_existing(dir, path, name)?;
    let mode = file.metadata().map_err(io_error("inspect", path))?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(SimError::KeyPermissions { path: path.to_path_buf(), mode: mode & 0o777 });
    }
    Ok(file)
}

fn open_existing(dir: &Path, path: &Path, name: &'static str) -> Result<File, SimError> {
    File::open(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            SimError::Incomplete { dir: dir.to_path_buf(), missing: name }
        } else {
            SimError::Io { op: "open", path: path.to_path_buf(), source }
        }
    })
}

fn read_bounded(file: File, path: &Path, limit: usize, buf: &mut Vec<u8>) -> Result<(), SimError> {
    let cap = u64::try_from(limit).unwrap_or(u64::MAX).saturating_add(1);
    file.take(cap).read_to_end(buf).map_err(io_error("read", path))?;
    if buf.len() > limit {
        return Err(SimError::TooLarge { path: path.to_path_buf(), limit });
    }
    Ok(())
}
