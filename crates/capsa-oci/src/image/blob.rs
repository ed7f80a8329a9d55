//! Local copies of layer blobs, as stored (compressed), for streaming into a
//! sandbox: downloaded from a registry or extracted from an archive into the
//! cache's content-addressed `blobs/sha256/<hex>`, or found in place in a
//! directory. Every file returned has just been checked to hold exactly the
//! bytes the layer's digest names.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};

use aws_lc_rs::digest::{Context, SHA256};
use tokio::io::AsyncWriteExt;

use super::archive::{self, TarTree};
use super::cache::{Cache, Staged};
use super::hash::{HashFailure, LayerHasher, Progress};
use super::layout::{self, DirTree, Tree};
use super::manifest::{self, Digest, MAX_CONFIG_BYTES};
use super::registry::RegistryClient;
use super::resolve::parse_reference;
use super::{ImageError, ImageSource, Layer, ResolveOptions, default_cache_dir};

/// Read size when hashing a file.
const CHUNK: usize = 256 << 10;

/// What a file that should hold a blob holds.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// Exactly the blob.
    Valid,
    /// Nothing: there is no such file.
    Absent,
    /// Something that is not a regular file.
    NotFile,
    /// A file of this many bytes instead of the blob's size.
    Size(u64),
    /// A file of the right size hashing to this digest instead.
    Digest(Digest),
}

impl Found {
    /// How a cached copy is wrong, for messages.
    fn describe(&self, size: u64) -> String {
        match self {
            Self::Valid => "is valid".to_owned(),
            Self::Absent => "is absent".to_owned(),
            Self::NotFile => "is not a regular file".to_owned(),
            Self::Size(found) => format!("is {found} bytes, not {size}"),
            Self::Digest(found) => format!("hashes to {found}"),
        }
    }
}

/// Checks that `path` holds exactly `size` bytes hashing to `digest`. The
/// size is checked first: it costs nothing and catches a truncated copy; the
/// hash catches everything else. Hashing a layer costs far less than
/// streaming it into a sandbox, so a cached copy is hashed on every use.
fn check_file(path: &Path, digest: &Digest, size: u64) -> io::Result<Found> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Found::Absent),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Found::NotFile);
    }
    if meta.len() != size {
        return Ok(Found::Size(meta.len()));
    }
    // At most one byte past the size: a file that grows while read is wrong
    // anyway, and must not be read for ever.
    let mut reader = file.take(size.saturating_add(1));
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(buf.get(..n).unwrap_or_default());
        total = total.saturating_add(n as u64);
    }
    if total != size {
        return Ok(Found::Size(total));
    }
    let found = Digest::finish(ctx);
    Ok(if found == *digest { Found::Valid } else { Found::Digest(found) })
}

/// Writes to a file and hashes what was written (with the hasher's size
/// limit), so that a blob is checked in the same pass that stores it.
struct Tee<F> {
    file: F,
    hasher: LayerHasher,
}

impl<F: Write> Write for Tee<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        Write::write_all(&mut self.hasher, buf.get(..n).unwrap_or_default())?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl<F: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tee<F> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.file).poll_write(cx, buf))?;
        // Only what the file took is hashed: the rest is offered again.
        Write::write_all(&mut this.hasher, buf.get(..n).unwrap_or_default())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().file).poll_shutdown(cx)
    }
}

/// One request for a layer blob.
struct Want<'a> {
    reference: &'a str,
    opts: &'a ResolveOptions,
    digest: Digest,
    size: u64,
    diff_id: &'a str,
}

impl Want<'_> {
    fn what(&self) -> String {
        format!("layer blob {}", self.digest)
    }

    fn label(&self) -> String {
        format!("layer {}", self.digest.hex().get(..12).unwrap_or_default())
    }

    fn cache(&self) -> Result<Cache, ImageError> {
        self.opts.cache_dir.clone().or_else(default_cache_dir).map(Cache::new).ok_or_else(|| ImageError::NoBlobCache {
            reference: self.reference.to_owned(),
            digest: self.digest.to_string(),
        })
    }

    /// The error for a file holding something else than the blob.
    fn wrong(&self, found: Found, path: &Path, source_desc: &str, kind: &str) -> ImageError {
        match found {
            Found::Size(actual) => self.size_mismatch(actual),
            Found::Digest(actual) => self.digest_mismatch(&actual),
            Found::Valid | Found::Absent | Found::NotFile => ImageError::InvalidLocalSource {
                source_desc: source_desc.to_owned(),
                kind: kind.to_owned(),
                reason: format!("{} at {} {}", self.what(), path.display(), found.describe(self.size)),
            },
        }
    }

    fn size_mismatch(&self, actual: u64) -> ImageError {
        ImageError::SizeMismatch {
            reference: self.reference.to_owned(),
            what: self.what(),
            expected: self.size,
            actual,
        }
    }

    fn digest_mismatch(&self, actual: &Digest) -> ImageError {
        ImageError::DigestMismatch {
            reference: self.reference.to_owned(),
            what: self.what(),
            expected: self.digest.to_string(),
            actual: actual.to_string(),
        }
    }

    fn too_long(&self, failure: HashFailure) -> ImageError {
        let HashFailure::TooLong { limit } = failure;
        ImageError::SizeMismatch {
            reference: self.reference.to_owned(),
            what: self.what(),
            expected: limit,
            actual: limit.saturating_add(1),
        }
    }

    /// Checks what a stream stored against the layer.
    fn check_stored(&self, hasher: LayerHasher) -> Result<(), ImageError> {
        let digests = hasher.finish().map_err(|f| self.too_long(f))?;
        // The digest first: bytes that do not match it were tampered with,
        // the more useful diagnosis.
        if digests.digest != self.digest {
            return Err(self.digest_mismatch(&digests.digest));
        }
        if digests.size != self.size {
            return Err(self.size_mismatch(digests.size));
        }
        Ok(())
    }

    /// Copies `reader` (the blob, `size` bytes as its source says) into the
    /// cache at `path`, checking it on the way.
    fn store(&self, path: &Path, mut reader: impl Read, size: u64) -> Result<(), ImageError> {
        if size != self.size {
            return Err(self.size_mismatch(size));
        }
        let (staged, file) = Staged::create(path).map_err(io_error(path))?;
        let bar = Progress::new(self.opts.progress).bar(self.size, format!("extracting {}", self.label()));
        let hasher = LayerHasher::new(None, self.size, bar).map_err(|e| ImageError::Internal(e.to_string()))?;
        let mut tee = Tee { file, hasher };
        if let Err(e) = io::copy(&mut reader, &mut tee) {
            return Err(match tee.hasher.failure().cloned() {
                Some(f) => self.too_long(f),
                None => io_error(staged.tmp())(e),
            });
        }
        let Tee { file, hasher } = tee;
        self.check_stored(hasher)?;
        file.sync_all().map_err(io_error(staged.tmp()))?;
        drop(file);
        staged.persist().map_err(io_error(path))
    }
}

/// A cached copy of a blob.
#[derive(Debug, PartialEq, Eq)]
enum Cached {
    /// Present and valid.
    Valid,
    /// Not there.
    Absent,
    /// There but wrong, as said.
    Wrong(String),
}

/// Looks for a valid copy of the blob at `path` in the cache. A wrong copy
/// is left where it is, to be replaced by the rename of a fetched one:
/// removing it could remove a valid copy that another process renamed
/// into place since the check, and a wrong copy is never used anyway.
fn cached(path: &Path, digest: &Digest, size: u64) -> Result<Cached, ImageError> {
    match check_file(path, digest, size).map_err(io_error(path))? {
        Found::Valid => {
            tracing::debug!(%digest, "layer blob from the cache");
            Ok(Cached::Valid)
        }
        Found::Absent => Ok(Cached::Absent),
        found => {
            let why = found.describe(size);
            tracing::warn!(path = %path.display(), why, "a cached layer blob does not match its digest");
            Ok(Cached::Wrong(why))
        }
    }
}

fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { path, source }
}

/// Runs blocking file work (hashing a layer) off tokio's async worker
/// threads when there is a runtime.
async fn off_runtime<T, F>(f: F) -> Result<T, ImageError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    match tokio::runtime::Handle::try_current() {
        Ok(_) => tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| ImageError::Internal(format!("layer blob task failed: {e}"))),
        Err(_) => Ok(f()),
    }
}

/// See [`super::layer_blob`].
pub(crate) async fn layer_blob(
    reference: &str,
    source: &ImageSource,
    opts: &ResolveOptions,
    layer: &Layer,
) -> Result<PathBuf, ImageError> {
    let digest = Digest::parse_in(&layer.digest, reference, "the layer's digest")?;
    match source {
        ImageSource::Registry => {
            let want = Want { reference, opts, digest, size: layer.size, diff_id: &layer.diff_id };
            from_registry(&want).await
        }
        local => {
            let (reference, local, opts, layer) = (reference.to_owned(), local.clone(), opts.clone(), layer.clone());
            off_runtime(move || {
                let want =
                    Want { reference: &reference, opts: &opts, digest, size: layer.size, diff_id: &layer.diff_id };
                from_local(&want, &local)
            })
            .await?
        }
    }
}

/// From the cache, or else downloaded into it.
async fn from_registry(want: &Want<'_>) -> Result<PathBuf, ImageError> {
    let parsed = parse_reference(want.reference)?;
    let cache = want.cache()?;
    let path = cache.blob_path(&want.digest);
    let found = {
        let (path, digest, size) = (path.clone(), want.digest.clone(), want.size);
        off_runtime(move || cached(&path, &digest, size)).await??
    };
    let why = match found {
        Cached::Valid => return Ok(path),
        Cached::Absent => None,
        Cached::Wrong(why) => Some(why),
    };
    if want.opts.offline {
        return Err(ImageError::BlobNotCached {
            reference: want.reference.to_owned(),
            digest: want.digest.to_string(),
            cache: cache.root().to_path_buf(),
            detail: match why {
                None => "it is not cached".to_owned(),
                Some(why) => format!("the cached copy {why}"),
            },
        });
    }

    let client = RegistryClient::new(&parsed, want.opts)?;
    let (staged, file) = Staged::create(&path).map_err(io_error(&path))?;
    let bar = Progress::new(want.opts.progress).bar(want.size, format!("downloading {}", want.label()));
    let hasher = LayerHasher::new(None, want.size, bar).map_err(|e| ImageError::Internal(e.to_string()))?;
    let mut tee = Tee { file: tokio::fs::File::from_std(file), hasher };
    tracing::info!(digest = %want.digest, size = want.size, "downloading a layer blob of {}", want.reference);
    if let Err(f) = client.blob(&parsed, &want.digest, &mut tee).await {
        if let Some(failure) = tee.hasher.failure().cloned() {
            return Err(want.too_long(failure));
        }
        return Err(f.into_error(&client.registry, want.reference, &want.what()));
    }
    // Flushes tokio's buffer, then makes the data durable before the rename
    // publishes it.
    tee.file.flush().await.map_err(io_error(staged.tmp()))?;
    tee.file.sync_all().await.map_err(io_error(staged.tmp()))?;
    let Tee { file, hasher } = tee;
    drop(file);
    want.check_stored(hasher)?;
    staged.persist().map_err(io_error(&path))?;
    Ok(path)
}

/// From a layout or archive: in place for directories, through the cache for
/// tar archives (a file inside a tar has no path of its own).
fn from_local(want: &Want<'_>, source: &ImageSource) -> Result<PathBuf, ImageError> {
    let source_desc = source.to_string();
    match source {
        ImageSource::OciLayout(dir) => {
            if !dir.is_dir() {
                return Err(ImageError::InvalidLocalSource {
                    source_desc,
                    kind: "OCI image layout".into(),
                    reason: "it is not a directory".into(),
                });
            }
            in_place(want, dir, &layout::blob_path(&want.digest), &source_desc, "OCI image layout")
        }
        ImageSource::OciArchive(file) => {
            let cache = want.cache()?;
            let path = cache.blob_path(&want.digest);
            if cached(&path, &want.digest, want.size)? == Cached::Valid {
                return Ok(path);
            }
            let tree = TarTree::open(file, source_desc.clone())?;
            let inner = layout::blob_path(&want.digest);
            let Some((reader, size)) = tree.open(&inner).map_err(io_error(format!("{source_desc}: {inner}")))? else {
                return Err(ImageError::InvalidLocalSource {
                    source_desc,
                    kind: "OCI image layout".into(),
                    reason: format!("{} is missing from blobs/", want.what()),
                });
            };
            want.store(&path, reader, size)?;
            Ok(path)
        }
        ImageSource::DockerArchive(dir) if dir.is_dir() => {
            let tree = DirTree::new(dir.clone(), source_desc.clone());
            let mut last = None;
            for inner in docker_layer_paths(want, &tree)? {
                match in_place(want, dir, &inner, &source_desc, "docker-archive") {
                    Ok(path) => return Ok(path),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| ImageError::Internal("no candidate layer file".into())))
        }
        ImageSource::DockerArchive(file) => {
            let cache = want.cache()?;
            let path = cache.blob_path(&want.digest);
            if cached(&path, &want.digest, want.size)? == Cached::Valid {
                return Ok(path);
            }
            let tree = TarTree::open(file, source_desc.clone())?;
            let mut last = None;
            for inner in docker_layer_paths(want, &tree)? {
                let Some((reader, size)) = tree.open(&inner).map_err(io_error(format!("{source_desc}: {inner}")))?
                else {
                    last = Some(ImageError::InvalidLocalSource {
                        source_desc: source_desc.clone(),
                        kind: "docker-archive".into(),
                        reason: format!("layer {inner} is missing"),
                    });
                    continue;
                };
                match want.store(&path, reader, size) {
                    Ok(()) => return Ok(path),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| ImageError::Internal("no candidate layer file".into())))
        }
        ImageSource::Registry => Err(ImageError::Internal("registry source passed to from_local".into())),
    }
}

/// The blob at `inner` in the directory `root`, checked in place and
/// returned there: copying a layer out of a directory would only double the
/// disk it takes. The check cannot stop the file changing after it; the
/// sandbox checks every layer's diff_id against the policy as it unpacks,
/// so a change is refused there rather than run.
fn in_place(want: &Want<'_>, root: &Path, inner: &str, source_desc: &str, kind: &str) -> Result<PathBuf, ImageError> {
    if !layout::is_contained(inner) {
        return Err(ImageError::InvalidLocalSource {
            source_desc: source_desc.to_owned(),
            kind: kind.to_owned(),
            reason: format!("layer path {inner:?} leaves the directory"),
        });
    }
    let path = root.join(inner);
    match check_file(&path, &want.digest, want.size).map_err(io_error(&path))? {
        Found::Valid => Ok(path),
        Found::Absent => Err(ImageError::InvalidLocalSource {
            source_desc: source_desc.to_owned(),
            kind: kind.to_owned(),
            reason: format!("{} is missing ({inner})", want.what()),
        }),
        found => Err(want.wrong(found, &path, source_desc, kind)),
    }
}

/// The files of a docker archive's image that hold the layer: those whose
/// position in `manifest.json`'s `Layers` has the layer's diff_id in the
/// config (a docker archive names layers by path, not by digest).
fn docker_layer_paths(want: &Want<'_>, tree: &dyn Tree) -> Result<Vec<String>, ImageError> {
    let image = archive::find_docker(tree, want.reference)?;
    let config = layout::read_small(tree, &image.config, MAX_CONFIG_BYTES, want.reference)?.ok_or_else(|| {
        ImageError::InvalidLocalSource {
            source_desc: tree.describe(),
            kind: "docker-archive".into(),
            reason: format!("config {} is missing", image.config),
        }
    })?;
    let config = manifest::parse_config(&config, want.reference)?;
    let paths: Vec<String> = image
        .layers
        .into_iter()
        .zip(&config.diff_ids)
        .filter(|(_, d)| d.as_str() == want.diff_id)
        .map(|(path, _)| path)
        .collect();
    if paths.is_empty() {
        return Err(ImageError::LayerNotInImage {
            reference: want.reference.to_owned(),
            source_desc: tree.describe(),
            digest: want.digest.to_string(),
            diff_id: want.diff_id.to_owned(),
        });
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn check_file_tells_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("capsa-oci-blob-check-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let blob = b"layer bytes".repeat(50_000);
        let digest = Digest::of(&blob);
        let size = blob.len() as u64;
        let path = dir.join("blob");
        assert_eq!(check_file(&path, &digest, size).unwrap(), Found::Absent);
        fs::write(&path, &blob).unwrap();
        assert_eq!(check_file(&path, &digest, size).unwrap(), Found::Valid);
        fs::write(&path, &blob[1..]).unwrap();
        assert_eq!(check_file(&path, &digest, size).unwrap(), Found::Size(size - 1));
        let mut flipped = blob.clone();
        flipped[70_000] ^= 1;
        fs::write(&path, &flipped).unwrap();
        assert_eq!(check_file(&path, &digest, size).unwrap(), Found::Digest(Digest::of(&flipped)));
        assert_eq!(check_file(&dir, &digest, size).unwrap(), Found::NotFile);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stored_blobs_are_checked_and_nothing_partial_is_left() {
        let dir = std::env::temp_dir().join(format!("capsa-oci-blob-store-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let blob = b"compressed layer".repeat(1000);
        let opts = ResolveOptions { cache_dir: Some(dir.clone()), ..ResolveOptions::default() };
        let want =
            Want { reference: "r", opts: &opts, digest: Digest::of(&blob), size: blob.len() as u64, diff_id: "" };
        let path = want.cache().unwrap().blob_path(&want.digest);

        // Wrong bytes of the right size, too many bytes, too few: refused,
        // nothing at the destination, no temporary file left.
        let mut wrong = blob.clone();
        wrong[5] ^= 1;
        let err = want.store(&path, &wrong[..], want.size).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
        let longer = [&blob[..], b"x"].concat();
        let err = want.store(&path, &longer[..], want.size).unwrap_err();
        assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
        let err = want.store(&path, &blob[1..], want.size).unwrap_err();
        assert!(matches!(err, ImageError::DigestMismatch { .. } | ImageError::SizeMismatch { .. }), "{err}");
        assert!(!path.exists());
        let blobs = path.parent().unwrap();
        assert_eq!(fs::read_dir(blobs).unwrap().count(), 0, "a temporary file was left behind");

        want.store(&path, &blob[..], want.size).unwrap();
        assert_eq!(fs::read(&path).unwrap(), blob);
        assert_eq!(cached(&path, &want.digest, want.size).unwrap(), Cached::Valid);
        // A corrupt cached copy is reported, then replaced by a good one.
        fs::write(&path, &wrong).unwrap();
        let Cached::Wrong(why) = cached(&path, &want.digest, want.size).unwrap() else { panic!("not reported") };
        assert!(why.starts_with("hashes to sha256:"), "{why}");
        want.store(&path, &blob[..], want.size).unwrap();
        assert_eq!(cached(&path, &want.digest, want.size).unwrap(), Cached::Valid);
        assert_eq!(fs::read_dir(blobs).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
