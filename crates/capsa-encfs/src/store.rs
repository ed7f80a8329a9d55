//! Where an image's objects live: a local directory, or (in `remote`) any
//! object store. The image needs only whole-object writes and ranged reads,
//! which every object store offers, so one format serves local disks, Azure
//! Blob, S3 and HTTP alike.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Why a store could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such object.
    #[error("no such object")]
    NotFound,
    /// The store refused or failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An object store's own error, as text (it may name the URL).
    #[error("{0}")]
    Remote(String),
    /// Another writer has the image: it holds the lock, or replaced the
    /// object this writer last wrote.
    #[error("another writer has the image open read-write")]
    WriterPresent,
}

/// The objects of one image. Names are relative (`manifest`,
/// `chunks/00000003-0000000000000007`).
pub trait Store: Send + Sync + 'static {
    /// A whole object.
    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError>;
    /// The bytes of `range`; fewer if the object ends inside it (so that the
    /// caller can say which block a truncation cut off).
    fn get_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError>;
    /// Reads the bytes at `offset` into `buf`; returns how many there were
    /// (fewer than `buf.len()` if the object ends first). Stores that can
    /// read into the caller's buffer spare a copy on the read path.
    fn get_range_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let bytes = self.get_range(name, offset..offset + buf.len() as u64)?;
        let n = bytes.len().min(buf.len());
        if let (Some(target), Some(source)) = (buf.get_mut(..n), bytes.get(..n)) {
            target.copy_from_slice(source);
        }
        Ok(n)
    }
    /// Like [`Store::get_range_into`], but only from memory: `None` unless
    /// every byte asked for is already cached below the store, so that the
    /// caller can choose to fetch more than it needs when it must go out.
    fn get_cached_range_into(&self, _name: &str, _offset: u64, _buf: &mut [u8]) -> Result<Option<usize>, StoreError> {
        Ok(None)
    }
    /// Replaces an object atomically and durably: readers see the old bytes
    /// or the new, and once this returns the new ones survive a crash.
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// Writes an object that nothing refers to yet, durably. A crash may
    /// leave it torn; it is unreachable until the manifest names it.
    fn put_new(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.put(name, bytes)
    }
    /// Makes every `put_new` so far durable, names included: called once per
    /// commit, before the manifest that names the new objects.
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// An object's size in bytes.
    fn size(&self, name: &str) -> Result<u64, StoreError>;
    /// Removes an object; one that does not exist is not an error.
    fn delete(&self, name: &str) -> Result<(), StoreError>;
    /// Names of the objects under a prefix.
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Where the image is, for messages.
    fn describe(&self) -> String;
    /// Claims the store for one writer, until the store is dropped. Two
    /// writers would each remove, at open, the objects the other's commit is
    /// about to name, and the image would lose them. `lease` is the object
    /// the writer replaces to commit (the manifest); `creating` says that it
    /// does not exist yet.
    ///
    /// A local directory is locked: a second claim fails with
    /// [`StoreError::WriterPresent`]. An object store has no lock, so the
    /// newest claim wins instead: it rewrites `lease` unchanged, and from
    /// then on every replacement of `lease` is conditional on the last one,
    /// so an older writer's next commit fails rather than naming objects
    /// the newer one removed.
    fn claim_writer(&self, _lease: &str, _creating: bool) -> Result<(), StoreError> {
        Ok(())
    }
    /// Whether bytes read once are kept below this store (the kernel's page
    /// cache keeps a local file's), so that reading them again is cheap.
    fn caches_reads(&self) -> bool {
        false
    }
}

/// An image in a local directory: one file per object.
pub struct LocalStore {
    root: PathBuf,
    /// Open chunk files: a 4 KiB random read should cost one pread, not an
    /// open and a close as well.
    open: Mutex<HashMap<String, Arc<File>>>,
    /// The image directory, held with an exclusive `flock` by a writer.
    writer: Mutex<Option<File>>,
}

const MAX_OPEN_FILES: usize = 512;

impl LocalStore {
    /// The store in `root`, which is created if missing.
    pub fn create(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join("chunks"))?;
        Ok(Self::open(root))
    }

    /// The store in an existing directory.
    pub fn open(root: &Path) -> Self {
        Self { root: root.to_path_buf(), open: Mutex::new(HashMap::new()), writer: Mutex::new(None) }
    }

    fn path(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }

    fn file(&self, name: &str) -> Result<Arc<File>, StoreError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = open.get(name) {
            return Ok(file.clone());
        }
        let file = match File::open(self.path(name)?) {
            Ok(file) => Arc::new(file),
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(e) => return Err(e.into()),
        };
        if open.len() >= MAX_OPEN_FILES {
            open.clear();
        }
        open.insert(name.to_string(), file.clone());
        Ok(file)
    }

    fn forget(&self, name: &str) {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}

/// Checks an object's name: non-empty `/`-separated parts of ASCII letters,
/// digits, `-`, `.` and `_`, none of them `.` or `..`. Every store takes the
/// same names, so an image moves between them unchanged.
pub(crate) fn check_name(name: &str) -> Result<(), StoreError> {
    let valid = !name.is_empty()
        && name.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        });
    if valid {
        Ok(())
    } else {
        Err(StoreError::Io(std::io::Error::new(ErrorKind::InvalidInput, format!("bad object name {name:?}"))))
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store for LocalStore {
    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        match std::fs::read(self.path(name)?) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StoreError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    fn get_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| StoreError::Io(std::io::Error::new(ErrorKind::InvalidInput, "range too large")))?;
        let mut buf = vec![0u8; len];
        let filled = self.get_range_into(name, range.start, &mut buf)?;
        buf.truncate(filled);
        Ok(buf)
    }

    fn get_range_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<usize, StoreError> {
        let file = self.file(name)?;
        let mut filled = 0;
        while filled < buf.len() {
            let Some(rest) = buf.get_mut(filled..) else { break };
            match file.read_at(rest, offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(filled)
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(name)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let mut nonce = [0u8; 8];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| StoreError::Remote("the system random generator failed".into()))?;
        let tmp = dir.join(format!(
            ".{}.tmp-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("object"),
            hex::encode(nonce)
        ));
        let written = (|| {
            let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            sync_dir(&dir)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        self.forget(name);
        Ok(written?)
    }

    fn put_new(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        // Not synced here: `sync` makes all of a commit's objects durable at
        // once, before the manifest names them.
        let path = self.path(name)?;
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
        file.write_all(bytes)?;
        self.forget(name);
        Ok(())
    }

    fn size(&self, name: &str) -> Result<u64, StoreError> {
        match std::fs::metadata(self.path(name)?) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(StoreError::NotFound),
            Err(e) => Err(e.into()),
        }
    }

    fn sync(&self) -> Result<(), StoreError> {
        // One syncfs instead of an fsync per object: a commit of 256 chunks
        // then waits for one journal commit, not 256.
        let dir = File::open(self.root.join("chunks"))?;
        rustix::fs::syncfs(&dir).map_err(|e| StoreError::Io(e.into()))?;
        Ok(())
    }

    fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.forget(name);
        match std::fs::remove_file(self.path(name)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = match prefix.rsplit_once('/') {
            Some((dir, _)) => self.root.join(dir),
            None => self.root.clone(),
        };
        let base = prefix.rsplit_once('/').map(|(dir, _)| format!("{dir}/")).unwrap_or_default();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry?;
            if let Some(file) = entry.file_name().to_str() {
                let name = format!("{base}{file}");
                if name.starts_with(prefix) && entry.file_type()?.is_file() {
                    names.push(name);
                }
            }
        }
        names.sort();
        Ok(names)
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }
    fn get_cached_range_into(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<Option<usize>, StoreError> {
        let file = self.file(name)?;
        let wanted = buf.len();
        // RWF_NOWAIT: the page cache's bytes or EAGAIN, never a disk read.
        match rustix::io::preadv2(
            &*file,
            &mut [std::io::IoSliceMut::new(buf)],
            offset,
            rustix::io::ReadWriteFlags::NOWAIT,
        ) {
            Ok(n) if n == wanted => Ok(Some(n)),
            // Partly cached, past the end, or a kernel without RWF_NOWAIT for
            // this file: the ordinary read decides.
            Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INTR) => Ok(None),
            Err(e) => Err(StoreError::Io(e.into())),
        }
    }

    fn claim_writer(&self, _lease: &str, _creating: bool) -> Result<(), StoreError> {
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if writer.is_some() {
            return Ok(());
        }
        // The lock is on the directory itself, so the image holds no lock
        // file, and the kernel drops it when the writer's process dies.
        let dir = File::open(&self.root)?;
        match rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                *writer = Some(dir);
                Ok(())
            }
            Err(rustix::io::Errno::WOULDBLOCK) => Err(StoreError::WriterPresent),
            Err(e) => Err(StoreError::Io(e.into())),
        }
    }

    fn caches_reads(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_round_trip_and_ranges_stop_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path()).unwrap();
        store.put("manifest", b"hello").unwrap();
        store.put("manifest", b"hello world").unwrap();
        assert_eq!(store.get("manifest").unwrap(), b"hello world");
        store.put_new("chunks/0-1", &[1, 2, 3, 4]).unwrap();
        assert_eq!(store.get_range("chunks/0-1", 1..3).unwrap(), vec![2, 3]);
        assert_eq!(store.get_range("chunks/0-1", 2..10).unwrap(), vec![3, 4]);
        assert_eq!(store.list("chunks/").unwrap(), vec!["chunks/0-1".to_string()]);
        assert!(matches!(store.get("chunks/9-9"), Err(StoreError::NotFound)));
        store.delete("chunks/0-1").unwrap();
        store.delete("chunks/0-1").unwrap();
        assert!(matches!(store.get_range("chunks/0-1", 0..1), Err(StoreError::NotFound)));
        assert!(store.get("../escape").is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 2, "no temporary files are left: {names:?}");
    }

    #[test]
    fn a_cached_read_comes_from_memory_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::create(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..=255u8).cycle().take(64 << 10).collect();
        store.put_new("chunks/0-1", &bytes).unwrap();
        let mut buf = vec![0u8; 4096];
        assert_eq!(store.get_cached_range_into("chunks/0-1", 8192, &mut buf).unwrap(), Some(4096), "just written");
        assert_eq!(buf, bytes[8192..12288]);
        assert_eq!(store.get_cached_range_into("chunks/0-1", 62 << 10, &mut buf).unwrap(), None, "past the end");
        assert!(matches!(store.get_cached_range_into("chunks/9-9", 0, &mut buf), Err(StoreError::NotFound)));

        // Written back and dropped from the page cache: only a disk read has it.
        let file = File::open(dir.path().join("chunks/0-1")).unwrap();
        file.sync_all().unwrap();
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let in_memory = rustix::fs::statfs(dir.path()).unwrap().f_type == 0x0102_1994; // tmpfs keeps its pages
        if !in_memory {
            assert_eq!(store.get_cached_range_into("chunks/0-1", 8192, &mut buf).unwrap(), None, "evicted");
        }
        assert_eq!(store.get_range("chunks/0-1", 8192..12288).unwrap(), bytes[8192..12288]);
    }
}
