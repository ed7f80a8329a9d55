//! Layers the untrusted host streams into the guest: unpacked while they
//! arrive, kept only if they are the bytes the policy pinned.
//!
//! The host pushes a compressed layer blob in chunks and claims its diff_id
//! (the SHA-256 of the uncompressed tar). The policy pins diff_ids, so the
//! claim is worthless until the guest has computed the hash itself. This
//! module owns that check and the layer store it guards:
//!
//! - [`LayerStore::begin`] starts a worker thread that decompresses the
//!   stream, hashes every uncompressed byte (up to and past the end of the
//!   archive) and unpacks the tar into a private staging directory at the
//!   same time, so a layer never has to be held in memory twice;
//! - [`Upload::finish`] compares the computed diff_id with the claim in
//!   constant time and only then renames the staging directory to
//!   `<root>/<hex>`. Nothing of a layer is ever visible at
//!   [`LayerStore::path`] unless its hash matched, and an abandoned or failed
//!   upload leaves nothing behind.
//!
//! Hashing alone does not make a layer safe to unpack: the bytes may be
//! exactly what the policy pinned and still be hostile to the unpacker. So
//! every entry that could write outside the layer is refused, naming the
//! entry: `..` components, absolute paths, hard links that leave the layer,
//! anything beneath a symlink (a symlink entry must never redirect a later
//! write), and device nodes (the sandbox provides the container's `/dev`).
//! OCI whiteouts become overlayfs whiteouts, because containers see their
//! layers through overlayfs.

use std::fs::{self, DirBuilder};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use aws_lc_rs::{constant_time, digest};
use rustix::fs::{AtFlags, CWD, FileType, Gid, Mode, Timespec, Timestamps, Uid, XattrFlags};

use crate::protocol::{Compression, FailureKind};

/// The most entries one layer may hold. Real images stay far below; a
/// layer above it is treated as an attempt to exhaust the guest.
pub const MAX_ENTRIES: u64 = 1 << 20;
/// The most uncompressed bytes one layer may hold (64 GiB), so that a small
/// compressed blob cannot expand without bound.
pub const MAX_UNCOMPRESSED_BYTES: u64 = 64 << 30;

/// Chunks queued between the RPC thread and the unpacking thread: enough to
/// overlap network and disk, few enough to bound memory per upload.
const CHANNEL_DEPTH: usize = 4;
/// The directory under the store root where uploads are unpacked before
/// their hash is known.
const STAGING: &str = ".staging";
/// The xattr overlayfs reads to treat a directory as opaque.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// OCI's whiteout prefix and its opaque-directory marker.
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const WHITEOUT_META_PREFIX: &[u8] = b".wh..wh.";
const WHITEOUT_OPAQUE: &[u8] = b".wh..wh..opq";
/// The longest claimed diff_id quoted back in an error.
const MAX_QUOTED: usize = 80;

/// Why a layer could not be added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayerError {
    /// The claimed diff_id is malformed.
    #[error("layer diff_id {claimed:?} is not of the form sha256:<64 lowercase hex digits>: send the layer's diff_id")]
    InvalidDiffId {
        /// The claim, shortened.
        claimed: String,
    },
    /// The layer store itself could not be used.
    #[error("cannot {what}: {source}; check that the layer store is on a writable filesystem")]
    Io {
        /// What was attempted, on which path.
        what: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The uncompressed bytes do not hash to the claimed diff_id.
    #[error("layer bytes hash to {computed}, not the claimed {claimed}: the host sent different bytes")]
    Mismatch {
        /// What the bytes hash to.
        computed: String,
        /// What the host claimed.
        claimed: String,
    },
    /// A tar entry could write outside the layer or create what a layer may
    /// not contain; the whole layer is refused.
    #[error("layer entry {entry:?} refused: {reason}")]
    UnsafeEntry {
        /// The entry's path as the tar names it.
        entry: String,
        /// Why it is refused.
        reason: String,
    },
    /// A tar entry could not be written to the staging directory.
    #[error("cannot unpack layer entry {entry:?}: {source}")]
    Unpack {
        /// The entry's path as the tar names it.
        entry: String,
        /// Why writing failed.
        source: io::Error,
    },
    /// The stream is not a valid compressed tar.
    #[error("layer stream is not a valid {compression} tar: {source}")]
    Stream {
        /// The compression the host declared.
        compression: &'static str,
        /// What the decoder or tar reader reported.
        source: io::Error,
    },
    /// More entries than [`MAX_ENTRIES`].
    #[error("layer has more than {max} entries: refused as a likely decompression bomb")]
    TooManyEntries {
        /// The limit.
        max: u64,
    },
    /// More uncompressed bytes than [`MAX_UNCOMPRESSED_BYTES`].
    #[error("layer expands to more than {max} bytes: refused as a likely decompression bomb")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// Bytes kept arriving after the compressed stream had ended.
    #[error("the layer stream continued after its end: the host sent extra bytes")]
    TrailingData,
    /// A chunk or `finish` arrived for an upload that had already failed.
    #[error("the layer upload already failed; start it again with add_layer")]
    AlreadyFailed,
    /// The upload was dropped before it finished.
    #[error("the layer upload was abandoned before its last chunk")]
    Abandoned,
    /// The unpacking thread ended without a result.
    #[error("the layer unpacking thread stopped unexpectedly: this is a bug in the agent")]
    Worker,
}

impl LayerError {
    /// The protocol's class for this error: integrity failures are the
    /// host's bytes, invalid ones its request, internal ones the guest's.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::InvalidDiffId { .. } | Self::AlreadyFailed => FailureKind::Invalid,
            Self::Mismatch { .. }
            | Self::UnsafeEntry { .. }
            | Self::Stream { .. }
            | Self::TooManyEntries { .. }
            | Self::TooLarge { .. }
            | Self::TrailingData => FailureKind::Integrity,
            Self::Io { .. } | Self::Unpack { .. } | Self::Abandoned | Self::Worker => FailureKind::Internal,
        }
    }
}

/// A layer whose bytes matched its claimed diff_id and that is now in the
/// store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedLayer {
    /// The verified diff_id (`sha256:<hex>`).
    pub diff_id: String,
    /// Uncompressed bytes (the whole tar stream).
    pub size: u64,
}

/// The directory that holds committed layers, one directory per diff_id.
#[derive(Debug)]
pub struct LayerStore {
    root: PathBuf,
    next_staging: AtomicU64,
}

impl LayerStore {
    /// Opens (creating it, mode 0700) the store at `root`, and removes what
    /// interrupted uploads left in its staging directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, LayerError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|source| store_error("create", &root, source))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
            .map_err(|source| store_error("restrict permissions of", &root, source))?;
        let staging = root.join(STAGING);
        match fs::remove_dir_all(&staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(store_error("clear", &staging, source)),
        }
        DirBuilder::new().mode(0o700).create(&staging).map_err(|source| store_error("create", &staging, source))?;
        Ok(Self { root, next_staging: AtomicU64::new(0) })
    }

    /// Starts an upload of the layer the host claims is `claimed_diff_id`.
    pub fn begin(&self, claimed_diff_id: &str, compression: Compression) -> Result<Upload, LayerError> {
        let claimed = parse_diff_id(claimed_diff_id)?;
        let staging = self.create_staging()?;
        let (tx, rx) = sync_channel(CHANNEL_DEPTH);
        let abandoned = Arc::new(AtomicBool::new(false));
        let reader = ChannelReader { rx, chunk: Vec::new(), pos: 0, abandoned: Arc::clone(&abandoned) };
        let dir = staging.clone();
        let worker = std::thread::Builder::new()
            .name("layer-unpack".into())
            .spawn(move || unpack_stream(reader, compression, &dir))
            .map_err(|source| {
                let _ = fs::remove_dir_all(&staging);
                store_error("start the unpacking thread for", &staging, source)
            })?;
        Ok(Upload {
            claimed,
            committed: self.root.join(hex::encode(claimed)),
            staging,
            tx: Some(tx),
            worker: Some(worker),
            abandoned,
            failed: false,
        })
    }

    /// The directory of a committed layer, if `diff_id` is one.
    pub fn path(&self, diff_id: &str) -> Option<PathBuf> {
        let digest = parse_diff_id(diff_id).ok()?;
        let path = self.root.join(hex::encode(digest));
        path.is_dir().then_some(path)
    }

    fn create_staging(&self) -> Result<PathBuf, LayerError> {
        loop {
            let n = self.next_staging.fetch_add(1, Ordering::Relaxed);
            let path = self.root.join(STAGING).join(n.to_string());
            // The staging directory becomes the layer's root directory, which
            // a non-root container user must be able to traverse.
            match DirBuilder::new().mode(0o755).create(&path) {
                Ok(()) => {
                    fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                        .map_err(|source| store_error("set permissions of", &path, source))?;
                    return Ok(path);
                }
                // Another store over the same root raced us to this number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(store_error("create", &path, source)),
            }
        }
    }
}

/// A layer being streamed in. Dropping it without [`Upload::finish`]
/// abandons it and removes everything it unpacked.
#[derive(Debug)]
pub struct Upload {
    claimed: [u8; 32],
    committed: PathBuf,
    staging: PathBuf,
    tx: Option<SyncSender<Vec<u8>>>,
    worker: Option<JoinHandle<Result<Unpacked, LayerError>>>,
    abandoned: Arc<AtomicBool>,
    failed: bool,
}

impl Upload {
    /// Feeds the next bytes of the compressed blob. Returns the unpacking
    /// error as soon as unpacking has failed; the upload is then dead.
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), LayerError> {
        if self.failed {
            return Err(LayerError::AlreadyFailed);
        }
        if chunk.is_empty() {
            return Ok(());
        }
        let finished = self.worker.as_ref().is_none_or(JoinHandle::is_finished);
        let sent = match (&self.tx, finished) {
            (Some(tx), false) => tx.send(chunk.to_vec()).is_ok(),
            _ => false,
        };
        if sent {
            return Ok(());
        }
        // The worker no longer reads: it failed, or the stream already ended.
        self.failed = true;
        self.tx = None;
        Err(match self.join_worker() {
            Ok(_) => LayerError::TrailingData,
            Err(e) => e,
        })
    }

    /// Ends the stream, waits for unpacking, checks the hash and commits the
    /// layer. A layer that is already committed is not replaced: the
    /// verified duplicate is discarded.
    pub fn finish(mut self) -> Result<CommittedLayer, LayerError> {
        self.tx = None;
        if self.failed {
            return Err(LayerError::AlreadyFailed);
        }
        let unpacked = self.join_worker()?;
        if constant_time::verify_slices_are_equal(&unpacked.digest, &self.claimed).is_err() {
            return Err(LayerError::Mismatch {
                computed: format!("sha256:{}", hex::encode(unpacked.digest)),
                claimed: format!("sha256:{}", hex::encode(self.claimed)),
            });
        }
        let diff_id = format!("sha256:{}", hex::encode(self.claimed));
        match fs::rename(&self.staging, &self.committed) {
            Ok(()) => {}
            // Committed by an earlier or concurrent upload of the same bytes;
            // `Drop` removes this copy.
            Err(_) if self.committed.is_dir() => {}
            Err(source) => return Err(store_error("commit the layer to", &self.committed, source)),
        }
        Ok(CommittedLayer { diff_id, size: unpacked.size })
    }

    fn join_worker(&mut self) -> Result<Unpacked, LayerError> {
        let worker = self.worker.take().ok_or(LayerError::AlreadyFailed)?;
        let result = worker.join().map_err(|_| LayerError::Worker).and_then(|r| r);
        if result.is_err() {
            self.failed = true;
        }
        result
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.worker.is_some() {
            // Tell the reader the end of the stream is an abandonment, not the
            // end of the layer, so the worker stops instead of verifying.
            self.abandoned.store(true, Ordering::SeqCst);
        }
        self.tx = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        // After a commit the staging directory is gone; otherwise this is what
        // guarantees that a failed upload leaves nothing behind.
        let _ = fs::remove_dir_all(&self.staging);
    }
}

/// What the worker computed.
#[derive(Debug)]
struct Unpacked {
    digest: [u8; 32],
    size: u64,
}

/// Parses `sha256:<64 lowercase hex>`; uppercase is refused so that one
/// layer has exactly one name.
fn parse_diff_id(diff_id: &str) -> Result<[u8; 32], LayerError> {
    let invalid = || LayerError::InvalidDiffId { claimed: diff_id.chars().take(MAX_QUOTED).collect() };
    let hex_digits = diff_id.strip_prefix("sha256:").ok_or_else(invalid)?;
    if hex_digits.len() != 64 || !hex_digits.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid());
    }
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut digest).map_err(|_| invalid())?;
    Ok(digest)
}

fn store_error(action: &str, path: &Path, source: io::Error) -> LayerError {
    LayerError::Io { what: format!("{action} {}", path.display()), source }
}

/// The receiving end of an upload as a byte stream.
struct ChannelReader {
    rx: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    abandoned: Arc<AtomicBool>,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.abandoned.load(Ordering::SeqCst) {
                return Err(io::Error::other("the upload was abandoned"));
            }
            if let Some(rest) = self.chunk.get(self.pos..).filter(|rest| !rest.is_empty()) {
                let n = rest.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), rest.get(..n)) {
                    dst.copy_from_slice(src);
                }
                self.pos += n;
                return Ok(n);
            }
            match self.rx.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                // All senders are gone: `finish` (end of stream) or `Drop`
                // (abandoned, caught at the top of the loop).
                Err(_) if self.abandoned.load(Ordering::SeqCst) => {}
                Err(_) => return Ok(0),
            }
        }
    }
}

/// Hashes and counts every byte read through it, and stops the stream at
/// [`MAX_UNCOMPRESSED_BYTES`].
struct HashingReader<R> {
    inner: R,
    context: digest::Context,
    size: u64,
    over_limit: bool,
    read_failed: bool,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf).inspect_err(|_| self.read_failed = true)?;
        let data = buf.get(..n).unwrap_or_default();
        self.size = self.size.saturating_add(n as u64);
        if self.size > MAX_UNCOMPRESSED_BYTES {
            self.over_limit = true;
            return Err(io::Error::other("the uncompressed layer exceeds its size limit"));
        }
        self.context.update(data);
        Ok(n)
    }
}

fn compression_name(compression: Compression) -> &'static str {
    match compression {
        Compression::None => "uncompressed",
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    }
}

/// The worker: decompress, hash and unpack until the stream ends.
fn unpack_stream(reader: ChannelReader, compression: Compression, dir: &Path) -> Result<Unpacked, LayerError> {
    let name = compression_name(compression);
    let stream_error = |source| LayerError::Stream { compression: name, source };
    let decoded: Box<dyn Read> = match compression {
        Compression::None => Box::new(reader),
        // Multi-member, like Go's reader that computed the diff_id upstream.
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(reader).map_err(stream_error)?),
    };
    let mut hashing = HashingReader {
        inner: decoded,
        context: digest::Context::new(&digest::SHA256),
        size: 0,
        over_limit: false,
        read_failed: false,
    };
    let result = unpack_tar(&mut hashing, dir, name).and_then(|()| {
        // The diff_id covers the whole stream, including the end-of-archive
        // blocks and any padding after them.
        io::copy(&mut hashing, &mut io::sink()).map(|_| ()).map_err(stream_error)
    });
    if hashing.over_limit {
        return Err(LayerError::TooLarge { max: MAX_UNCOMPRESSED_BYTES });
    }
    match result {
        Ok(()) => {}
        // A corrupt stream surfaces while an entry's data is copied; it is
        // the host's bytes, not the guest's disk, that failed.
        Err(LayerError::Unpack { source, .. }) if hashing.read_failed => return Err(stream_error(source)),
        Err(e) => return Err(e),
    }
    let size = hashing.size;
    let digest = hashing.context.finish();
    let mut out = [0u8; 32];
    if digest.as_ref().len() != out.len() {
        return Err(LayerError::Worker);
    }
    out.copy_from_slice(digest.as_ref());
    Ok(Unpacked { digest: out, size })
}

fn unpack_tar(input: &mut impl Read, dir: &Path, compression: &'static str) -> Result<(), LayerError> {
    let mut archive = tar::Archive::new(input);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    // Xattrs are applied by `apply_xattrs`, which filters them.
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let stream_error = |source| LayerError::Stream { compression, source };
    let mut count = 0u64;
    for entry in archive.entries().map_err(stream_error)? {
        let mut entry = entry.map_err(stream_error)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(LayerError::TooManyEntries { max: MAX_ENTRIES });
        }
        unpack_entry(&mut entry, dir)?;
    }
    Ok(())
}

fn refuse(entry: &str, reason: impl Into<String>) -> LayerError {
    LayerError::UnsafeEntry { entry: entry.to_owned(), reason: reason.into() }
}

fn unpack_error(entry: &str) -> impl Fn(io::Error) -> LayerError + '_ {
    move |source| LayerError::Unpack { entry: entry.to_owned(), source }
}

/// A tar path as a relative path of plain components; `./` is harmless,
/// `..` and absolute paths are refused.
fn relative_path(raw: &[u8], what: &str) -> Result<PathBuf, String> {
    if raw.first() == Some(&b'/') {
        return Err(format!("{what} is absolute; layer paths must be relative to the layer root"));
    }
    let mut rel = PathBuf::new();
    for component in Path::new(std::ffi::OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(part) => rel.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("{what} contains `..`, which could escape the layer")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{what} is absolute; layer paths must be relative to the layer root"));
            }
        }
    }
    Ok(rel)
}

fn unpack_entry<R: Read>(entry: &mut tar::Entry<'_, R>, root: &Path) -> Result<(), LayerError> {
    let kind = entry.header().entry_type();
    // The tar reader folds these into the entry they describe; a stray
    // global header carries nothing we use.
    if kind.is_pax_global_extensions()
        || kind.is_pax_local_extensions()
        || kind.is_gnu_longname()
        || kind.is_gnu_longlink()
    {
        return Ok(());
    }
    let raw_path = entry.path_bytes().into_owned();
    let name = String::from_utf8_lossy(&raw_path).into_owned();
    let rel = relative_path(&raw_path, "the path").map_err(|reason| refuse(&name, reason))?;

    if kind.is_character_special() || kind.is_block_special() {
        return Err(refuse(
            &name,
            "device nodes are not allowed in layers; the container's /dev is provided by the sandbox",
        ));
    }
    let regular = kind.is_file() || kind.is_contiguous();
    if !(regular || kind.is_dir() || kind.is_symlink() || kind.is_hard_link() || kind.is_fifo()) {
        return Err(refuse(
            &name,
            format!("tar entry type {:?} is not allowed in layers (only files, directories, links and fifos)", kind),
        ));
    }

    let Some(file_name) = rel.file_name().map(|f| f.as_bytes().to_vec()) else {
        // The layer root itself (`./`): only its metadata can be set.
        if !kind.is_dir() {
            return Err(refuse(&name, "the layer root can only be a directory"));
        }
        entry.unpack(root).map_err(unpack_error(&name))?;
        return Ok(());
    };
    let parent = prepare_parent(root, &rel, &name)?;

    if let Some(whited_out) = file_name.strip_prefix(WHITEOUT_PREFIX) {
        return whiteout(&parent, &file_name, whited_out, &name);
    }

    let dst = parent.join(std::ffi::OsStr::from_bytes(&file_name));
    let xattrs = wanted_xattrs(entry);
    if kind.is_hard_link() {
        let target = hard_link_target(entry, root, &name)?;
        remove_non_directory(&dst, &name)?;
        fs::hard_link(&target, &dst).map_err(unpack_error(&name))?;
    } else if kind.is_fifo() {
        remove_non_directory(&dst, &name)?;
        make_fifo(entry.header(), &dst).map_err(unpack_error(&name))?;
    } else {
        // Regular files, directories and symlinks: the tar crate replaces
        // (never writes through) whatever is at `dst`, and its parents are
        // known to be real directories inside the layer.
        entry.unpack(&dst).map_err(unpack_error(&name))?;
    }
    if regular || kind.is_dir() {
        for (key, value) in xattrs {
            rustix::fs::lsetxattr(&dst, key.as_slice(), &value, XattrFlags::empty())
                .map_err(|e| unpack_error(&name)(e.into()))?;
        }
    }
    Ok(())
}

/// Makes sure every ancestor of `rel` below `root` is a real directory,
/// creating missing ones, and returns the parent's path. A symlinked
/// ancestor is refused: resolving it here, outside the container's root,
/// could write anywhere in the guest.
fn prepare_parent(root: &Path, rel: &Path, name: &str) -> Result<PathBuf, LayerError> {
    let mut current = root.to_path_buf();
    for component in rel.parent().map(Path::components).into_iter().flatten() {
        current.push(component);
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(refuse(
                    name,
                    format!(
                        "its parent {:?} is a symlink, and writing through it could escape the layer",
                        current.strip_prefix(root).unwrap_or(&current)
                    ),
                ));
            }
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(refuse(
                    name,
                    format!("its parent {:?} is not a directory", current.strip_prefix(root).unwrap_or(&current)),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new().mode(0o755).create(&current).map_err(unpack_error(name))?;
            }
            Err(e) => return Err(unpack_error(name)(e)),
        }
    }
    Ok(current)
}

/// Converts an OCI whiteout into what overlayfs understands.
fn whiteout(parent: &Path, file_name: &[u8], whited_out: &[u8], name: &str) -> Result<(), LayerError> {
    if file_name == WHITEOUT_OPAQUE {
        return rustix::fs::lsetxattr(parent, OPAQUE_XATTR, b"y", XattrFlags::empty())
            .map_err(|e| unpack_error(name)(e.into()));
    }
    if file_name.starts_with(WHITEOUT_META_PREFIX) {
        // Other `.wh..wh.` names are AUFS bookkeeping with no meaning here.
        return Ok(());
    }
    if whited_out.is_empty() || whited_out == b"." || whited_out == b".." {
        return Err(refuse(name, "a whiteout must name the file it removes"));
    }
    // A 0:0 character device is overlayfs' whiteout; the one device node a
    // layer may contain, made by us rather than taken from the tar.
    let target = parent.join(std::ffi::OsStr::from_bytes(whited_out));
    rustix::fs::mknodat(CWD, &target, FileType::CharacterDevice, Mode::empty(), rustix::fs::makedev(0, 0))
        .map_err(|e| unpack_error(name)(e.into()))
}

/// The extended attributes worth keeping: file capabilities and user
/// attributes. `trusted.*` is refused silently because `trusted.overlay.*`
/// would let a layer steer overlayfs (redirects, opaque directories) beyond
/// what its whiteouts say.
fn wanted_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Ok(Some(extensions)) = entry.pax_extensions() else { return Vec::new() };
    extensions
        .filter_map(Result::ok)
        .filter_map(|ext| {
            let key = ext.key_bytes().strip_prefix(b"SCHILY.xattr.")?;
            let wanted = key == b"security.capability" || key.starts_with(b"user.");
            wanted.then(|| (key.to_vec(), ext.value_bytes().to_vec()))
        })
        .collect()
}

/// Where a hard link entry points, checked to stay inside the layer.
fn hard_link_target<R: Read>(entry: &tar::Entry<'_, R>, root: &Path, name: &str) -> Result<PathBuf, LayerError> {
    let raw = entry.link_name_bytes().map(|l| l.into_owned()).unwrap_or_default();
    let rel = relative_path(&raw, "the hard link target").map_err(|reason| refuse(name, reason))?;
    if rel.as_os_str().is_empty() {
        return Err(refuse(name, "the hard link has no target"));
    }
    let mut current = root.to_path_buf();
    for component in rel.parent().map(Path::components).into_iter().flatten() {
        current.push(component);
        let real_dir = fs::symlink_metadata(&current).map(|m| m.is_dir()).unwrap_or(false);
        if !real_dir {
            return Err(refuse(name, "the hard link target is not beneath real directories of this layer"));
        }
    }
    let target = root.join(&rel);
    match fs::symlink_metadata(&target) {
        Ok(meta) if !meta.is_dir() => Ok(target),
        Ok(_) => Err(refuse(name, "hard links to directories are not allowed")),
        Err(_) => Err(refuse(name, "the hard link target is not an earlier entry of this layer")),
    }
}

/// Clears the way for a non-directory entry; a directory in the way is an
/// error rather than something to delete recursively.
fn remove_non_directory(dst: &Path, name: &str) -> Result<(), LayerError> {
    match fs::symlink_metadata(dst) {
        Ok(meta) if meta.is_dir() => Err(refuse(name, "a directory of the same name is in the way")),
        Ok(_) => fs::remove_file(dst).map_err(unpack_error(name)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(unpack_error(name)(e)),
    }
}

fn make_fifo(header: &tar::Header, dst: &Path) -> io::Result<()> {
    let mode = header.mode()? & 0o7777;
    let uid = u32::try_from(header.uid()?).map_err(|_| io::Error::other("uid does not fit 32 bits"))?;
    let gid = u32::try_from(header.gid()?).map_err(|_| io::Error::other("gid does not fit 32 bits"))?;
    rustix::fs::mknodat(CWD, dst, FileType::Fifo, Mode::from_raw_mode(mode), 0)?;
    rustix::fs::chownat(
        CWD,
        dst,
        Some(Uid::from_raw_unchecked(uid)),
        Some(Gid::from_raw_unchecked(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    // After chown, which clears set-id bits, and without the umask.
    rustix::fs::chmodat(CWD, dst, Mode::from_raw_mode(mode), AtFlags::empty())?;
    let mtime = i64::try_from(header.mtime()?).unwrap_or(i64::MAX);
    let time = Timespec { tv_sec: mtime, tv_nsec: 0 };
    rustix::fs::utimensat(
        CWD,
        dst,
        &Timestamps { last_access: time, last_modification: time },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use tar::{EntryType, Header};

    use super::*;

    fn diff_id(tar: &[u8]) -> String {
        format!("sha256:{}", hex::encode(digest::digest(&digest::SHA256, tar)))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    /// Appends an entry with a raw name and link name, bypassing the
    /// builder's path checks so hostile archives can be built.
    fn raw(builder: &mut tar::Builder<Vec<u8>>, name: &[u8], kind: EntryType, link: &[u8], data: &[u8], mode: u32) {
        let mut header = Header::new_gnu();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        header.set_entry_type(kind);
        header.set_size(data.len() as u64);
        header.set_mode(mode);
        header.set_uid(1234);
        header.set_gid(5678);
        header.set_mtime(1_600_000_000);
        header.set_cksum();
        builder.append(&header, data).unwrap();
    }

    fn build(f: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        f(&mut builder);
        builder.into_inner().unwrap()
    }

    fn simple_layer() -> Vec<u8> {
        build(|b| {
            raw(b, b"etc/", EntryType::Directory, b"", b"", 0o755);
            raw(b, b"etc/hello", EntryType::Regular, b"", b"hello world\n", 0o640);
            raw(b, b"bin/tool", EntryType::Regular, b"", b"#!/bin/sh\n", 0o4755);
            raw(b, b"etc/link", EntryType::Symlink, b"/etc/hello", b"", 0o777);
            raw(b, b"etc/hard", EntryType::Link, b"etc/hello", b"", 0o640);
            raw(b, b"run/pipe", EntryType::Fifo, b"", b"", 0o600);
        })
    }

    /// Streams `blob` in small chunks and finishes.
    fn upload(
        store: &LayerStore,
        claimed: &str,
        compression: Compression,
        blob: &[u8],
    ) -> Result<CommittedLayer, LayerError> {
        let mut upload = store.begin(claimed, compression)?;
        for chunk in blob.chunks(1000) {
            upload.write(chunk)?;
        }
        upload.finish()
    }

    fn new_store() -> (tempfile::TempDir, LayerStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LayerStore::open(dir.path().join("layers")).unwrap();
        (dir, store)
    }

    fn staging_is_empty(store: &LayerStore) -> bool {
        fs::read_dir(store.root.join(STAGING)).unwrap().next().is_none()
    }

    fn assert_refused(tar: &[u8], needle: &str) {
        let (_dir, store) = new_store();
        let id = diff_id(tar);
        let err = upload(&store, &id, Compression::None, tar).unwrap_err();
        assert!(matches!(err, LayerError::UnsafeEntry { .. }), "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert_eq!(err.kind(), FailureKind::Integrity);
        assert!(store.path(&id).is_none());
        assert!(staging_is_empty(&store));
    }

    #[test]
    fn gzip_layer_commits_with_modes_owners_and_links() {
        let (_dir, store) = new_store();
        let tar = simple_layer();
        let id = diff_id(&tar);
        let committed = upload(&store, &id, Compression::Gzip, &gzip(&tar)).unwrap();
        assert_eq!(committed, CommittedLayer { diff_id: id.clone(), size: tar.len() as u64 });
        let path = store.path(&id).unwrap();
        assert_eq!(fs::read(path.join("etc/hello")).unwrap(), b"hello world\n");
        let meta = fs::metadata(path.join("etc/hello")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!((meta.uid(), meta.gid(), meta.mtime()), (1234, 5678, 1_600_000_000));
        assert_eq!(fs::metadata(path.join("bin/tool")).unwrap().mode() & 0o7777, 0o4755);
        assert_eq!(fs::read_link(path.join("etc/link")).unwrap(), Path::new("/etc/hello"));
        assert_eq!(fs::metadata(path.join("etc/hard")).unwrap().ino(), meta.ino());
        assert!(fs::symlink_metadata(path.join("run/pipe")).unwrap().file_type().is_fifo());
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o755);
        assert!(staging_is_empty(&store));
        // The same layer again succeeds and keeps the first copy.
        assert_eq!(upload(&store, &id, Compression::Gzip, &gzip(&tar)).unwrap().diff_id, id);
        assert!(staging_is_empty(&store));
    }

    #[test]
    fn zstd_and_plain_layers_commit() {
        let (_dir, store) = new_store();
        let tar = simple_layer();
        let id = diff_id(&tar);
        let zstd = zstd::encode_all(tar.as_slice(), 3).unwrap();
        upload(&store, &id, Compression::Zstd, &zstd).unwrap();
        assert!(store.path(&id).unwrap().join("etc/hello").is_file());

        let (_dir, store) = new_store();
        upload(&store, &id, Compression::None, &tar).unwrap();
        assert!(store.path(&id).unwrap().join("etc/hello").is_file());
    }

    #[test]
    fn changed_byte_is_a_mismatch_and_nothing_is_kept() {
        let (_dir, store) = new_store();
        let tar = simple_layer();
        let id = diff_id(&tar);
        let mut tampered = tar.clone();
        // A byte of the file content: the tar stays valid, only the hash differs.
        let at = tampered.windows(11).position(|w| w == b"hello world").unwrap();
        tampered[at] = b'j';
        let err = upload(&store, &id, Compression::None, &tampered).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&diff_id(&tampered)) && message.contains(&id), "{message}");
        assert!(message.contains("the host sent different bytes"));
        assert_eq!(err.kind(), FailureKind::Integrity);
        assert!(store.path(&id).is_none());
        assert!(staging_is_empty(&store));
    }

    #[test]
    fn another_layers_bytes_are_refused() {
        let (_dir, store) = new_store();
        let first = simple_layer();
        let second = build(|b| raw(b, b"other", EntryType::Regular, b"", b"x", 0o644));
        let err = upload(&store, &diff_id(&first), Compression::None, &second).unwrap_err();
        assert!(matches!(err, LayerError::Mismatch { .. }), "{err}");
        assert!(store.path(&diff_id(&first)).is_none());
        assert!(store.path(&diff_id(&second)).is_none());
    }

    #[test]
    fn malformed_diff_ids_are_refused() {
        let (_dir, store) = new_store();
        for bad in ["sha256:abc", "sha512:00", &format!("sha256:{}", "A".repeat(64)), ""] {
            assert!(matches!(store.begin(bad, Compression::None), Err(LayerError::InvalidDiffId { .. })), "{bad}");
        }
        assert!(store.path("sha256:zz").is_none());
    }

    #[test]
    fn parent_dir_entry_is_refused() {
        assert_refused(&build(|b| raw(b, b"../x", EntryType::Regular, b"", b"x", 0o644)), "`..`");
        assert_refused(&build(|b| raw(b, b"a/../../x", EntryType::Regular, b"", b"x", 0o644)), "`..`");
    }

    #[test]
    fn absolute_path_is_refused() {
        assert_refused(&build(|b| raw(b, b"/etc/passwd", EntryType::Regular, b"", b"x", 0o644)), "absolute");
    }

    #[test]
    fn hard_link_out_of_the_layer_is_refused() {
        assert_refused(&build(|b| raw(b, b"passwd", EntryType::Link, b"../etc/passwd", b"", 0o644)), "`..`");
        assert_refused(&build(|b| raw(b, b"passwd", EntryType::Link, b"/etc/passwd", b"", 0o644)), "absolute");
    }

    #[test]
    fn hard_link_through_a_symlink_is_refused() {
        assert_refused(
            &build(|b| {
                raw(b, b"a", EntryType::Symlink, b"/etc", b"", 0o777);
                raw(b, b"passwd", EntryType::Link, b"a/passwd", b"", 0o644);
            }),
            "hard link target",
        );
    }

    #[test]
    fn write_through_a_symlink_is_refused() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().as_bytes().to_vec();
        let tar = build(|b| {
            raw(b, b"a", EntryType::Symlink, &target, b"", 0o777);
            raw(b, b"a/passwd", EntryType::Regular, b"", b"root::0:0::/:/bin/sh\n", 0o644);
        });
        assert_refused(&tar, "symlink");
        assert!(fs::read_dir(outside.path()).unwrap().next().is_none());

        let tar = build(|b| {
            raw(b, b"a", EntryType::Symlink, b"/etc", b"", 0o777);
            raw(b, b"a/passwd", EntryType::Regular, b"", b"root::0:0::/:/bin/sh\n", 0o644);
        });
        let before = fs::read("/etc/passwd").unwrap();
        assert_refused(&tar, "symlink");
        assert_eq!(fs::read("/etc/passwd").unwrap(), before);
    }

    #[test]
    fn device_nodes_and_odd_types_are_refused() {
        assert_refused(&build(|b| raw(b, b"dev/mem", EntryType::Char, b"", b"", 0o600)), "device nodes");
        assert_refused(&build(|b| raw(b, b"dev/sda", EntryType::Block, b"", b"", 0o600)), "device nodes");
        assert_refused(&build(|b| raw(b, b"label", EntryType::new(b'V'), b"", b"", 0o600)), "entry type");
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let (_dir, store) = new_store();
        let tar = build(|b| {
            raw(b, b"etc/", EntryType::Directory, b"", b"", 0o755);
            raw(b, b"etc/.wh.shadow", EntryType::Regular, b"", b"", 0o644);
            raw(b, b"var/cache/", EntryType::Directory, b"", b"", 0o755);
            raw(b, b"var/cache/.wh..wh..opq", EntryType::Regular, b"", b"", 0o644);
        });
        let id = diff_id(&tar);
        upload(&store, &id, Compression::None, &tar).unwrap();
        let path = store.path(&id).unwrap();
        let whiteout = fs::symlink_metadata(path.join("etc/shadow")).unwrap();
        assert!(whiteout.file_type().is_char_device());
        assert_eq!(whiteout.rdev(), 0);
        assert!(!path.join("etc/.wh.shadow").exists());
        let mut value = [0u8; 4];
        let n = rustix::fs::lgetxattr(path.join("var/cache"), OPAQUE_XATTR, &mut value).unwrap();
        assert_eq!(&value[..n], b"y");
        assert!(!path.join("var/cache/.wh..wh..opq").exists());
    }

    #[test]
    fn abandoned_upload_leaves_nothing() {
        let (_dir, store) = new_store();
        let tar = simple_layer();
        let id = diff_id(&tar);
        let mut upload = store.begin(&id, Compression::None).unwrap();
        upload.write(&tar[..tar.len() / 2]).unwrap();
        drop(upload);
        assert!(staging_is_empty(&store));
        assert!(store.path(&id).is_none());
    }

    #[test]
    fn unpack_errors_arrive_early_and_stick() {
        let (_dir, store) = new_store();
        let tar = build(|b| raw(b, b"../x", EntryType::Regular, b"", b"x", 0o644));
        let mut upload = store.begin(&diff_id(&tar), Compression::None).unwrap();
        upload.write(&tar).unwrap();
        // Keep writing until the worker's refusal surfaces.
        let err = (0..100)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(10));
                upload.write(&[0u8; 512]).err()
            })
            .unwrap();
        assert!(matches!(err, LayerError::UnsafeEntry { .. }), "{err}");
        assert!(matches!(upload.write(b"more"), Err(LayerError::AlreadyFailed)));
        assert!(matches!(upload.finish(), Err(LayerError::AlreadyFailed)));
        assert!(staging_is_empty(&store));
    }

    #[test]
    fn leftovers_in_staging_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("layers");
        fs::create_dir_all(root.join(STAGING).join("7/etc")).unwrap();
        let store = LayerStore::open(&root).unwrap();
        assert!(staging_is_empty(&store));
        assert_eq!(fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn corrupt_gzip_is_a_stream_error() {
        let (_dir, store) = new_store();
        let tar = simple_layer();
        let mut blob = gzip(&tar);
        let len = blob.len();
        blob[len / 2] ^= 0xff;
        let err = upload(&store, &diff_id(&tar), Compression::Gzip, &blob).unwrap_err();
        assert_eq!(err.kind(), FailureKind::Integrity, "{err}");
        assert!(staging_is_empty(&store));
    }
}
