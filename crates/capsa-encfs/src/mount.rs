//! An image mounted as a filesystem: the FUSE device, a loop device over its
//! file, ext4 on the loop device; or, read-only, its files served over FUSE
//! by capsa's own ext4 reader ([`crate::files`]). Used by `capsa encfs mount`
//! on a host and by the agent in the guest; both need root (mount(2),
//! /dev/loop-control).

use std::fs::OpenOptions as FileOptions;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rustix::mount::{MountFlags, UnmountFlags};

use crate::files::{FileServer, MountedFiles};
use crate::fuse::MountedDevice;
use crate::loopdev::LoopDevice;
use crate::{Error, Volume};

/// Why a mount or unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// A step of mounting failed.
    #[error("{step}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The image failed (its last commit, typically).
    #[error(transparent)]
    Image(#[from] Error),
    /// A program run to format the image failed.
    #[error("{program} failed: {detail}")]
    Program {
        /// The program.
        program: String,
        /// Its exit status and what it printed.
        detail: String,
    },
}

fn step(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> MountError {
    let step = step.into();
    move |source| MountError::Step { step, source }
}

/// The FUSE device of an image, mounted in a private directory of `work`,
/// with nothing on top: what `mkfs.ext4` formats.
pub struct Device {
    device: Option<MountedDevice>,
    dir: PathBuf,
}

impl Device {
    /// Serves `image` as `<work>/<random>/disk`.
    pub fn serve(image: Arc<dyn Volume>, work: &Path) -> Result<Self, MountError> {
        let mut suffix = [0u8; 6];
        aws_lc_rs::rand::fill(&mut suffix).map_err(|_| Error::Crypto("the system random generator failed"))?;
        let dir = work.join(format!("encfs-{}", hex::encode(suffix)));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(step(format!("creating {}", dir.display())))?;
        let device = MountedDevice::mount(image, &dir).map_err(|e| {
            let _ = std::fs::remove_dir(&dir);
            MountError::Step {
                step: format!("mounting the FUSE device on {} (is /dev/fuse there?)", dir.display()),
                source: e,
            }
        })?;
        Ok(Self { device: Some(device), dir })
    }

    /// The decrypted image's file.
    pub fn disk(&self) -> PathBuf {
        self.dir.join(crate::fuse::DISK_FILE)
    }

    /// Commits, unmounts the device and removes its directory.
    pub fn close(mut self) -> Result<(), MountError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), MountError> {
        let Some(device) = self.device.take() else { return Ok(()) };
        let result = device.unmount();
        let _ = std::fs::remove_dir(&self.dir);
        Ok(result?)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!(error = %e, "closing the encfs device");
        }
    }
}

/// An image mounted as a filesystem on `target`.
pub struct Mounted {
    via: Via,
    target: PathBuf,
}

/// How a mount reaches the image.
enum Via {
    /// The kernel's ext4 on a loop device over the image's FUSE file.
    Kernel { device: Option<Device>, loop_device: LoopDevice, mounted: bool },
    /// The image's files over FUSE, read by [`crate::ext4`].
    Files(Option<MountedFiles>),
}

impl Mounted {
    /// Mounts `image` on `target` (an existing directory). A read-only image
    /// whose ext4 capsa's reader accepts is served file by file; anything
    /// else, or what the reader refuses, goes through the kernel's ext4 on a
    /// loop device, with the FUSE device in a private directory under `work`.
    pub fn mount(image: Arc<dyn Volume>, target: &Path, work: &Path) -> Result<Self, MountError> {
        if image.read_only() {
            match FileServer::new(image.clone()) {
                Ok(server) => {
                    let files = MountedFiles::mount(server, target).map_err(step(format!(
                        "mounting the image's files on {} (is /dev/fuse there?)",
                        target.display()
                    )))?;
                    return Ok(Self { via: Via::Files(Some(files)), target: target.to_path_buf() });
                }
                Err(e) => {
                    tracing::info!(error = %e, "capsa's ext4 reader declined the image: mounting it through the kernel")
                }
            }
        }
        Self::mount_through_kernel(image, target, work)
    }

    /// Mounts `image` on `target` through the kernel's ext4 on a loop device
    /// even if it is read-only: for what only the kernel serves (extended
    /// attributes), and to compare.
    pub fn mount_through_kernel(image: Arc<dyn Volume>, target: &Path, work: &Path) -> Result<Self, MountError> {
        let read_only = image.read_only();
        let device = Device::serve(image, work)?;
        let disk = FileOptions::new()
            .read(true)
            .write(!read_only)
            .open(device.disk())
            .map_err(step(format!("opening {}", device.disk().display())))?;
        let mut loop_device = LoopDevice::attach(&disk, read_only).map_err(step("attaching a loop device"))?;
        drop(disk);
        loop_device.set_read_ahead(1024);
        let mut flags = MountFlags::NODEV | MountFlags::NOSUID;
        if read_only {
            flags |= MountFlags::RDONLY;
        }
        // noinit_itable: blocks never written read as zeros, so the inode
        // tables need no zeroing pass (which would write them all).
        let data = if read_only { c"" } else { c"noinit_itable" };
        let what = format!("mounting ext4 from {} on {}", loop_device.path().display(), target.display());
        let mounted = rustix::mount::mount(loop_device.path(), target, "ext4", flags, Some(data)).map_err(|e| {
            let hint = if read_only && e == rustix::io::Errno::ROFS {
                ": its journal needs replaying (it was not unmounted cleanly, e.g. its sandbox was killed); mount it \
                 read-write once"
            } else {
                ""
            };
            MountError::Step {
                step: format!("{what}{hint}"),
                source: std::io::Error::from_raw_os_error(e.raw_os_error()),
            }
        });
        // The mount (or its failure) settles who holds the device: from here
        // it detaches when the filesystem is unmounted.
        loop_device.let_go();
        let mut this = Self {
            via: Via::Kernel { device: Some(device), loop_device, mounted: false },
            target: target.to_path_buf(),
        };
        mounted?;
        if let Via::Kernel { mounted, .. } = &mut this.via {
            *mounted = true;
        }
        Ok(this)
    }

    /// Where the filesystem is mounted.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The loop device under the filesystem, if it goes through the kernel's
    /// ext4.
    pub fn loop_device(&self) -> Option<&Path> {
        match &self.via {
            Via::Kernel { loop_device, .. } => Some(loop_device.path()),
            Via::Files(_) => None,
        }
    }

    /// Whether the filesystem is still mounted (someone may have unmounted
    /// it by hand).
    pub fn still_mounted(&self) -> bool {
        match &self.via {
            Via::Kernel { loop_device, .. } => loop_device.attached(),
            Via::Files(files) => files.as_ref().is_some_and(MountedFiles::still_mounted),
        }
    }

    /// Unmounts the filesystem, then commits and unmounts the device.
    pub fn unmount(mut self) -> Result<(), MountError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), MountError> {
        match &mut self.via {
            Via::Files(files) => {
                if let Some(files) = files.take() {
                    files.unmount();
                }
                Ok(())
            }
            Via::Kernel { device, loop_device, mounted } => {
                if *mounted {
                    *mounted = false;
                    if let Err(e) = rustix::mount::unmount(&self.target, UnmountFlags::empty()) {
                        if e != rustix::io::Errno::INVAL {
                            // Busy: detach it now, finish when the last user
                            // leaves; the loop device keeps the image open
                            // until then.
                            tracing::warn!(target = %self.target.display(), error = %e, "unmount busy; detaching lazily");
                            let _ = rustix::mount::unmount(&self.target, UnmountFlags::DETACH);
                        }
                    }
                }
                if !loop_device.wait_detached(Duration::from_secs(30)) {
                    tracing::warn!(device = %loop_device.path().display(), "the loop device is still attached");
                }
                match device.take() {
                    Some(device) => device.close(),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            tracing::error!(error = %e, "unmounting the encfs image");
        }
    }
}

/// Formats the image's device as ext4 holding a copy of `source`'s tree
/// (`mkfs.ext4 -d`), owned as in `source`.
pub fn format_ext4(device: &Device, source: &Path, label: &str) -> Result<(), MountError> {
    let output = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-m", "0", "-L", label])
        // Blocks never written read as zeros: nothing needs zeroing now, and
        // nothing needs discarding.
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
        .arg("-d")
        .arg(source)
        .arg(device.disk())
        .output()
        .map_err(step("running mkfs.ext4 (install e2fsprogs)"))?;
    if !output.status.success() {
        return Err(MountError::Program {
            program: "mkfs.ext4".into(),
            detail: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(())
}

/// An image size that holds `source`'s tree with room to spare: the files'
/// sizes in whole blocks, a block per entry for inodes and directories, an
/// eighth more, and 32 MiB for the journal and metadata. Blocks never
/// written cost nothing, so erring large is cheap.
pub fn size_for(source: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut pending = vec![source.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.metadata()?;
            total += 4096 + meta.len().div_ceil(4096) * 4096;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    let size = total + total / 8 + (32 << 20);
    Ok(size.div_ceil(1 << 20) * (1 << 20))
}
