//! The resolution cache: layer `diff_id`s keyed by compressed digest,
//! content-addressed manifests and configs, and the digest each reference
//! last resolved to. Layout in the parent module's docs.
//!
//! The cache is an optimisation and a fallback, never an authority: blobs are
//! re-hashed on every read, and a record that does not parse is ignored (and
//! recomputed). Failures to write are logged, not fatal.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::manifest::Digest;

/// What the cache remembers about one layer blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    /// The digest of the uncompressed tar.
    pub(crate) diff_id: String,
    /// The blob's (compressed) size.
    pub(crate) size: u64,
    /// The media type it was decompressed as.
    pub(crate) media_type: String,
}

/// The last resolution of a reference.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RefRecord {
    /// The normalized reference (`registry/repository:tag`).
    pub(crate) reference: String,
    /// The digest of the manifest or index the reference pointed to.
    pub(crate) digest: String,
    /// When, in seconds since the Unix epoch.
    pub(crate) resolved_at: u64,
}

/// A cache rooted at a directory (created on first write).
#[derive(Debug, Clone)]
pub(crate) struct Cache {
    root: PathBuf,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, fsynced, renamed over `path`, then the directory fsynced.
/// Readers see the old file or the new one, never a torn one.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (staged, mut f) = Staged::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    staged.persist()
}

/// A temporary file beside its destination, renamed into place once
/// complete. Dropped before [`Staged::persist`] (an error, a panic, a
/// cancelled download), it removes the temporary file, so that nothing
/// partial is left behind and nothing partial is ever at the destination.
#[derive(Debug)]
pub(crate) struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    persisted: bool,
}

impl Staged {
    /// Creates the directory of `dest` and a new, empty temporary file in it.
    pub(crate) fn create(dest: &Path) -> io::Result<(Self, File)> {
        let dir = dest.parent().ok_or_else(|| io::Error::other("path has no parent directory"))?;
        fs::create_dir_all(dir)?;
        let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("blob");
        let tmp =
            dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), TMP_COUNTER.fetch_add(1, Ordering::Relaxed)));
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        Ok((Self { tmp, dest: dest.to_path_buf(), persisted: false }, file))
    }

    /// The temporary file, for error messages.
    pub(crate) fn tmp(&self) -> &Path {
        &self.tmp
    }

    /// Renames the temporary file over the destination, then fsyncs the
    /// directory. The caller has written, fsynced and closed the file.
    pub(crate) fn persist(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.dest)?;
        self.persisted = true;
        // Make the rename itself durable. Some filesystems refuse to fsync a
        // directory; the data is already safe then, so that is not an error.
        if let Some(dir) = self.dest.parent() {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Reads at most `limit` bytes of `path`; `None` if absent, unreadable or
/// longer.
fn read_limited(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    let mut bytes = Vec::new();
    f.take(limit.saturating_add(1)).read_to_end(&mut bytes).ok()?;
    (bytes.len() as u64 <= limit).then_some(bytes)
}

impl Cache {
    /// A cache in `root`.
    pub(crate) fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The cache directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn layer_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(format!("{}.json", digest.hex()))
    }

    /// Where a blob with this digest lives: manifests, indexes and configs
    /// (see [`Cache::blob`]) and the layer blobs `layer_blob` fetches.
    pub(crate) fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join("sha256").join(digest.hex())
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root.join("refs").join(format!("{}.json", Digest::of(reference.as_bytes()).hex()))
    }

    /// The record of a layer, if cached and well-formed.
    pub(crate) fn layer(&self, digest: &Digest) -> Option<LayerRecord> {
        let bytes = read_limited(&self.layer_path(digest), 64 << 10)?;
        let record: LayerRecord = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "ignoring a malformed layer record in the cache");
                return None;
            }
        };
        Digest::parse(&record.diff_id).ok()?;
        Some(record)
    }

    /// Remembers a layer's record.
    pub(crate) fn put_layer(&self, digest: &Digest, record: &LayerRecord) {
        let path = self.layer_path(digest);
        let result = serde_json::to_vec_pretty(record).map_err(io::Error::other).and_then(|b| write_atomic(&path, &b));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write to the layer cache");
        }
    }

    /// A cached blob, if present and hashing to `digest` (a corrupt one is
    /// removed).
    pub(crate) fn blob(&self, digest: &Digest, limit: u64) -> Option<Vec<u8>> {
        let path = self.blob_path(digest);
        let bytes = read_limited(&path, limit)?;
        if Digest::of(&bytes) != *digest {
            tracing::warn!(path = %path.display(), "removing a cached blob that does not match its digest");
            let _ = fs::remove_file(&path);
            return None;
        }
        Some(bytes)
    }

    /// Stores a blob whose digest the caller has verified.
    pub(crate) fn put_blob(&self, digest: &Digest, bytes: &[u8]) {
        let path = self.blob_path(digest);
        if path.exists() {
            return;
        }
        if let Err(e) = write_atomic(&path, bytes) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write to the blob cache");
        }
    }

    /// The last resolution of a normalized reference.
    pub(crate) fn reference(&self, reference: &str) -> Option<RefRecord> {
        let bytes = read_limited(&self.ref_path(reference), 64 << 10)?;
        let record: RefRecord = serde_json::from_slice(&bytes).ok()?;
        (record.reference == reference && Digest::parse(&record.digest).is_ok()).then_some(record)
    }

    /// Remembers what a normalized reference resolved to.
    pub(crate) fn put_reference(&self, reference: &str, digest: &Digest) {
        let resolved_at =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let record = RefRecord { reference: reference.to_owned(), digest: digest.to_string(), resolved_at };
        let path = self.ref_path(reference);
        let result = serde_json::to_vec_pretty(&record).map_err(io::Error::other).and_then(|b| write_atomic(&path, &b));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write to the reference cache");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("capsa-oci-cache-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trips_and_verifies() {
        let root = tmpdir("rt");
        let cache = Cache::new(root.clone());
        let blob = b"{\"schemaVersion\":2}".to_vec();
        let d = Digest::of(&blob);
        assert!(cache.blob(&d, 1 << 20).is_none());
        cache.put_blob(&d, &blob);
        assert_eq!(cache.blob(&d, 1 << 20).unwrap(), blob);
        assert!(cache.blob(&d, 3).is_none(), "limit applies");

        // A tampered blob is not served, and is removed.
        fs::write(root.join("blobs/sha256").join(d.hex()), b"tampered").unwrap();
        assert!(cache.blob(&d, 1 << 20).is_none());
        assert!(!root.join("blobs/sha256").join(d.hex()).exists());

        let rec = LayerRecord { diff_id: Digest::of(b"x").to_string(), size: 5, media_type: "m".into() };
        cache.put_layer(&d, &rec);
        assert_eq!(cache.layer(&d).unwrap(), rec);
        assert!(root.join("sha256").join(format!("{}.json", d.hex())).is_file());
        fs::write(root.join("sha256").join(format!("{}.json", d.hex())), b"{").unwrap();
        assert!(cache.layer(&d).is_none());

        cache.put_reference("r/x:1", &d);
        assert_eq!(cache.reference("r/x:1").unwrap().digest, d.to_string());
        assert!(cache.reference("r/x:2").is_none());

        // No temporary files are left behind.
        for dir in ["sha256", "blobs/sha256", "refs"] {
            for e in fs::read_dir(root.join(dir)).unwrap() {
                assert!(!e.unwrap().file_name().to_string_lossy().ends_with(".tmp"));
            }
        }
        fs::remove_dir_all(root).unwrap();
    }
}
