//! A read-only image's files served over FUSE straight from the ext4 inside
//! it ([`crate::ext4`]), with no loop device and no kernel ext4 between the
//! reader and the image.
//!
//! Why a second way to mount: every 4 KiB read through kernel ext4 on the
//! loop device on the image's FUSE file crosses three queues (ext4, the loop
//! device's worker, FUSE) where this crosses one, which is most of what a
//! random read costs (docs/BENCHMARKS.md, issue 7). A read-only mount needs
//! nothing kernel ext4 adds: no journal, no allocator, no writeback. What it
//! gives up: extended attributes (ACLs, file capabilities) are not served,
//! and a filesystem the reader does not accept (a journal that needs
//! replaying, a feature it does not implement) mounts through the kernel
//! instead ([`crate::mount::Mounted::mount`] decides).
//!
//! Permissions are the kernel's to check (`default_permissions`), against
//! the inodes' own modes and owners, and any user may look (`allow_other`),
//! as on a kernel mount. Nothing changes under a mount, so the kernel may
//! cache entries, attributes and file pages for as long as it likes.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::num::NonZeroUsize;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request,
};
use lru::LruCache;

use crate::Volume;
use crate::ext4::{self, DirEntry, Ext4, Ext4Error, FileKind, FileMap, Inode};

/// The filesystem never changes under a mount.
const TTL: Duration = Duration::from_secs(24 * 3600);
/// Files whose extent maps are kept: a map is loaded once per file, not per
/// read.
const CACHED_MAPS: usize = 4096;

/// FUSE calls the root 1, ext4 calls it 2 (1 is ext4's bad-blocks inode):
/// swapping the two keeps every inode reachable under one number.
fn to_fuse(ino: u64) -> INodeNo {
    match ino {
        ext4::ROOT => INodeNo(1),
        1 => INodeNo(ext4::ROOT),
        other => INodeNo(other),
    }
}

fn to_ext4(ino: INodeNo) -> u64 {
    match ino.0 {
        1 => ext4::ROOT,
        ext4::ROOT => 1,
        other => other,
    }
}

/// Reports what failed on stderr, where an integrity error's block number
/// goes (the reader sees only EIO), and maps it to what the caller sees.
fn errno(error: &Ext4Error) -> Errno {
    match error {
        Ext4Error::NotADirectory { .. } => Errno::ENOTDIR,
        Ext4Error::NotASymlink { .. } => Errno::EINVAL,
        _ => {
            eprintln!("capsa-encfs: {error}");
            Errno::EIO
        }
    }
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn attr(inode: &Inode, block_size: u32) -> FileAttr {
    FileAttr {
        ino: to_fuse(inode.ino()),
        size: inode.size(),
        blocks: inode.blocks(),
        atime: inode.atime().to_system_time(),
        mtime: inode.mtime().to_system_time(),
        ctime: inode.ctime().to_system_time(),
        crtime: inode.ctime().to_system_time(),
        kind: file_type(inode.kind()),
        perm: inode.permissions(),
        nlink: u32::from(inode.links()),
        uid: inode.uid(),
        gid: inode.gid(),
        rdev: inode.device().map_or(0, |device| device.to_rdev()),
        blksize: block_size,
        flags: 0,
    }
}

/// The FUSE filesystem serving one ext4 filesystem's files, read-only.
pub struct FileServer {
    fs: Ext4,
    maps: Mutex<LruCache<u64, Arc<FileMap>>>,
    /// Directories being listed, by handle: read once at `opendir`, so that
    /// a listing in many calls is consistent and costs one pass.
    listings: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_handle: AtomicU64,
}

impl FileServer {
    /// Serves the ext4 filesystem on `volume`. Fails if the reader does not
    /// accept it (the error says why: mount it through the kernel then).
    pub fn new(volume: Arc<dyn Volume>) -> Result<Self, Ext4Error> {
        let fs = Ext4::open(volume)?;
        // The root must be a readable directory, or the mount is useless.
        let root = fs.inode(ext4::ROOT)?;
        if root.kind() != FileKind::Directory {
            return Err(Ext4Error::NotADirectory { ino: ext4::ROOT, kind: root.kind() });
        }
        let capacity = NonZeroUsize::new(CACHED_MAPS).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            fs,
            maps: Mutex::new(LruCache::new(capacity)),
            listings: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        })
    }

    fn maps(&self) -> MutexGuard<'_, LruCache<u64, Arc<FileMap>>> {
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn listings(&self) -> MutexGuard<'_, HashMap<u64, Arc<Vec<DirEntry>>>> {
        self.listings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr_of(&self, ino: u64) -> Result<FileAttr, Ext4Error> {
        Ok(attr(&self.fs.inode(ino)?, self.fs.block_size()))
    }

    fn map(&self, ino: u64) -> Result<Arc<FileMap>, Ext4Error> {
        if let Some(map) = self.maps().get(&ino) {
            return Ok(map.clone());
        }
        let map = Arc::new(self.fs.file_map(ino)?);
        self.maps().put(ino, map.clone());
        Ok(map)
    }
}

// No `init`: the INIT reply can only lower the kernel's readahead, so the
// mount raises it afterwards instead (`widen_readahead`).
impl Filesystem for FileServer {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = self
            .fs
            .lookup(to_ext4(parent), name.as_bytes())
            .and_then(|ino| ino.map(|ino| self.attr_of(ino)).transpose());
        match found {
            Ok(Some(attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Ok(None) => reply.error(Errno::ENOENT),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(to_ext4(ino)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.read_link(to_ext4(ino)) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let access = flags.0 & rustix::fs::OFlags::ACCMODE.bits() as i32;
        if access != rustix::fs::OFlags::RDONLY.bits() as i32 {
            reply.error(Errno::EROFS);
            return;
        }
        // Loading the map here keeps the first read as cheap as the rest, and
        // fails the open, not a read, if the file cannot be mapped.
        match self.map(to_ext4(ino)) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let ino = to_ext4(ino);
        let mut buf = vec![0u8; size as usize];
        match self.map(ino).and_then(|map| map.read_at(&self.fs, offset, &mut buf)) {
            Ok(n) => reply.data(buf.get(..n).unwrap_or_default()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.read_dir(to_ext4(ino)) {
            Ok(entries) => {
                let handle = self.next_handle.fetch_add(1, Ordering::Relaxed);
                self.listings().insert(handle, Arc::new(entries));
                reply.opened(FileHandle(handle), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(entries) = self.listings().get(&fh.0).cloned() else {
            reply.error(Errno::EBADF);
            return;
        };
        let skip = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, entry) in entries.iter().enumerate().skip(skip) {
            if reply.add(to_fuse(entry.ino), (i + 1) as u64, file_type(entry.kind), OsStr::from_bytes(&entry.name)) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.listings().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks,
            s.free_blocks,
            s.free_blocks,
            u64::from(s.inodes),
            u64::from(s.free_inodes),
            s.block_size,
            255,
            s.block_size,
        );
    }

    // Extended attributes are not served (see the module doc): say so, rather
    // than claim a file has none.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOTSUP);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOTSUP);
    }
}

/// A mounted [`FileServer`]; dropping it unmounts.
pub struct MountedFiles {
    session: Option<fuser::BackgroundSession>,
}

impl MountedFiles {
    /// Mounts `server` on `target` (an existing directory), served by two
    /// threads.
    pub fn mount(server: FileServer, target: &Path) -> Result<Self, std::io::Error> {
        let mut config = crate::fuse::serving_config([MountOption::RO, MountOption::DefaultPermissions]);
        config.acl = fuser::SessionACL::All;
        let session = fuser::spawn_mount(server, target, &config)?;
        widen_readahead(target);
        Ok(Self { session: Some(session) })
    }

    /// Whether it is still mounted: the session ends when someone unmounts
    /// it by hand.
    pub fn still_mounted(&self) -> bool {
        self.session.as_ref().is_some_and(|session| !session.guard.is_finished())
    }

    /// Unmounts.
    pub fn unmount(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                tracing::warn!(error = %e, "unmounting the encfs files");
            }
        }
    }
}

impl Drop for MountedFiles {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Raises the mount's readahead to [`READAHEAD_KIB`], best effort.
///
/// The kernel starts a FUSE mount at 128 KiB of readahead, and the INIT
/// reply can only lower it, so a streamed file reaches the server as 128 KiB
/// requests. The mount's backing device info in sysfs is the one place to
/// raise it; at 1 MiB, cold sequential reads ran 1.79x faster (800 against
/// 1,432 MB/s, docs/BENCHMARKS.md). Where sysfs is not writable the mount
/// works as before, only slower.
fn widen_readahead(target: &Path) {
    let setting = match rustix::fs::stat(target) {
        Ok(stat) => {
            let dev = stat.st_dev;
            format!("/sys/class/bdi/{}:{}/read_ahead_kb", rustix::fs::major(dev), rustix::fs::minor(dev))
        }
        Err(e) => {
            tracing::debug!(error = %e, "encfs files: no readahead setting: stat of the mount point");
            return;
        }
    };
    if let Err(e) = std::fs::write(&setting, READAHEAD_KIB.to_string()) {
        tracing::debug!(error = %e, setting, "encfs files: readahead stays at the kernel's default");
    }
}

/// Readahead of a read-only mount, matching the 1 MiB requests FUSE allows.
const READAHEAD_KIB: u32 = 1024;
