//! The decrypted image as one file, `disk`, on a FUSE mount: what the loop
//! device reads and writes, and what `mkfs.ext4` formats.
//!
//! The file is opened in direct-I/O mode: the kernel keeps no second copy of
//! its pages (ext4 above it already caches plaintext), and every read reaches
//! the volume's `read_at` ([`crate::Image::read_at`]), so every byte the kernel sees passed its check. A block
//! that fails is an EIO to the reader and an error in the log naming it.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use crate::{Error, Volume};

/// The name of the image's file on the FUSE mount.
pub const DISK_FILE: &str = "disk";

const ROOT: INodeNo = INodeNo(1);
const DISK: INodeNo = INodeNo(2);
/// Attributes never change but for the size, which never changes either.
const TTL: Duration = Duration::from_secs(3600);

/// The FUSE filesystem serving one volume.
pub struct ImageDevice {
    image: Arc<dyn Volume>,
    created: SystemTime,
}

impl ImageDevice {
    /// Serves `image`.
    pub fn new(image: Arc<dyn Volume>) -> Self {
        Self { image, created: SystemTime::now() }
    }

    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o500, 0, 2)
        } else {
            (FileType::RegularFile, if self.image.read_only() { 0o400 } else { 0o600 }, self.image.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size / 512,
            atime: self.created,
            mtime: self.created,
            ctime: self.created,
            crtime: self.created,
            kind,
            perm,
            nlink,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            rdev: 0,
            blksize: crate::BLOCK_SIZE as u32,
            flags: 0,
        }
    }

    fn commit(&self) -> Result<(), Errno> {
        self.image.commit().map_err(|e| errno(&e))
    }
}

/// Reports what failed on stderr (where an integrity error's block number
/// goes: the kernel passes on only EIO, so the reader sees an I/O error and
/// the operator the block) and maps it to what the caller sees.
fn errno(error: &Error) -> Errno {
    match error {
        Error::ReadOnly => Errno::EROFS,
        Error::OutOfRange { .. } => Errno::ENOSPC,
        _ => {
            eprintln!("capsa-encfs: {error}");
            Errno::EIO
        }
    }
}

impl Filesystem for ImageDevice {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // 1 MiB writes, the kernel's largest: one request per chunk when
        // ext4 streams. (Reads are direct I/O: readahead does not apply.)
        let _ = config.set_max_write(1 << 20);
        // The loop device submits its requests asynchronously: let several
        // be in flight at once, one per serving thread and more queued.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == DISK_FILE {
            reply.entry(&TTL, &self.attr(DISK), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT || ino == DISK {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk has a fixed size: opening it with O_TRUNC, or truncating it
        // to its own size, is harmless and allowed; anything else is not.
        match size {
            Some(size) if ino == DISK && size != self.image.size() => reply.error(Errno::EPERM),
            _ => reply.attr(&TTL, &self.attr(ino)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK {
            reply.error(Errno::EISDIR);
            return;
        }
        let writing = flags.0 & libc_accmode() != rustix::fs::OFlags::RDONLY.bits() as i32;
        if writing && self.image.read_only() {
            reply.error(Errno::EROFS);
            return;
        }
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut buf = vec![0u8; size as usize];
        match self.image.read_at(offset, &mut buf) {
            Ok(n) => reply.data(buf.get(..n).unwrap_or_default()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.image.write_at(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        match self.commit() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.commit() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.commit() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, DISK_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.image.size() / crate::format::BLOCK_SIZE_U64;
        reply.statfs(blocks, 0, 0, 2, 0, crate::BLOCK_SIZE as u32, 255, crate::BLOCK_SIZE as u32);
    }
}

fn libc_accmode() -> i32 {
    rustix::fs::OFlags::ACCMODE.bits() as i32
}

/// How capsa-encfs' FUSE mounts are named and served: never device nodes
/// nor setuid, two serving threads with a queue each; `options` adds the
/// rest.
pub(crate) fn serving_config(options: impl IntoIterator<Item = MountOption>) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("capsa-encfs".into()),
        MountOption::Subtype("capsa-encfs".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    config.mount_options.extend(options);
    config.n_threads = Some(2);
    config.clone_fd = true;
    config
}

/// A mounted [`ImageDevice`]: dropping it commits what is dirty and
/// unmounts.
pub struct MountedDevice {
    session: Option<fuser::BackgroundSession>,
    image: Arc<dyn Volume>,
    disk: std::path::PathBuf,
}

impl MountedDevice {
    /// Mounts the image's device on `dir` (an empty directory), served by
    /// two threads.
    pub fn mount(image: Arc<dyn Volume>, dir: &Path) -> Result<Self, std::io::Error> {
        let config =
            serving_config([MountOption::NoExec, if image.read_only() { MountOption::RO } else { MountOption::RW }]);
        let session = fuser::spawn_mount(ImageDevice::new(image.clone()), dir, &config)?;
        Ok(Self { session: Some(session), image, disk: dir.join(DISK_FILE) })
    }

    /// The path of the image's file.
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The volume served.
    pub fn image(&self) -> &Arc<dyn Volume> {
        &self.image
    }

    /// Commits what is dirty, then unmounts.
    pub fn unmount(mut self) -> Result<(), Error> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), Error> {
        let committed = if self.image.read_only() { Ok(()) } else { self.image.commit() };
        if let Some(session) = self.session.take() {
            if let Err(e) = session.umount_and_join() {
                tracing::warn!(error = %e, "unmounting the encfs device");
            }
        }
        committed
    }
}

impl Drop for MountedDevice {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!(error = %e, "the last commit before unmounting failed");
        }
    }
}
