//! A loop device over the image's FUSE file, so that the kernel's ext4 can
//! mount it.
//!
//! Hand-written: the maintained loop-device crates generate their bindings
//! with bindgen at build time (libclang on every build machine) for what is
//! two ioctls and one fixed struct. These are the only `unsafe` calls in the
//! crate, each with the reason it is sound.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>` (Linux 5.8+).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// An attached loop device. It detaches itself when the last user lets go:
/// the kernel's autoclear. Until [`LoopDevice::let_go`], this handle is a
/// user, so the device lives until something else (a mount) holds it.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    number: u32,
    handle: Option<File>,
}

impl LoopDevice {
    /// Attaches a free loop device to `backing`, with 4 KiB logical blocks.
    pub fn attach(backing: &File, read_only: bool) -> std::io::Result<Self> {
        let control = OpenOptions::new().read(true).write(true).open("/dev/loop-control").map_err(|e| {
            std::io::Error::new(e.kind(), format!("/dev/loop-control: {e} (is the loop module loaded?)"))
        })?;
        // A device another process takes between GET_FREE and CONFIGURE
        // answers EBUSY: ask again.
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a
            // device number or -1; `control` is an open descriptor.
            #[allow(unsafe_code)]
            let number = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if number < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let path = PathBuf::from(format!("/dev/loop{number}"));
            let device = open_device(&path, read_only)?;
            // Direct I/O: the loop device submits reads and writes to the
            // backing file asynchronously, several at a time, instead of one
            // after another from its worker, and keeps no page cache of it.
            let mut flags = LO_FLAGS_AUTOCLEAR | LO_FLAGS_DIRECT_IO;
            if read_only {
                flags |= LO_FLAGS_READ_ONLY;
            }
            let config = LoopConfig {
                fd: u32::try_from(backing.as_raw_fd()).map_err(|_| std::io::Error::other("bad descriptor"))?,
                block_size: crate::BLOCK_SIZE as u32,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: flags,
                    lo_file_name: file_name(backing),
                    lo_crypt_name: [0; 64],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which
            // `config` is (layout checked above), alive for the call; the
            // kernel takes its own reference to the backing descriptor.
            #[allow(unsafe_code)]
            let configured = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config as *const LoopConfig) };
            if configured == 0 {
                return Ok(Self { path, number: number as u32, handle: Some(device) });
            }
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::EBUSY) {
                return Err(std::io::Error::new(error.kind(), format!("{}: LOOP_CONFIGURE: {error}", path.display())));
            }
        }
        Err(std::io::Error::other("no free loop device after 16 tries"))
    }

    /// The device node, `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops this handle's hold: from now on the device detaches when the
    /// filesystem on it is unmounted.
    pub fn let_go(&mut self) {
        self.handle = None;
    }

    /// Sets the device's read-ahead: larger requests to the image, fewer
    /// round trips, when ext4 streams a file.
    pub fn set_read_ahead(&self, kib: u32) {
        let path = format!("/sys/block/loop{}/queue/read_ahead_kb", self.number);
        if let Err(e) = std::fs::write(&path, kib.to_string()) {
            tracing::debug!(path, error = %e, "could not set the loop device's read-ahead");
        }
    }

    /// Whether direct I/O is in use (the kernel falls back to buffered I/O
    /// when the backing file cannot do it).
    pub fn direct_io(&self) -> bool {
        std::fs::read_to_string(format!("/sys/block/loop{}/loop/dio", self.number)).is_ok_and(|v| v.trim() == "1")
    }

    /// Whether the device still has a backing file.
    pub fn attached(&self) -> bool {
        Path::new(&format!("/sys/block/loop{}/loop/backing_file", self.number)).exists()
    }

    /// Waits until autoclear has detached the device (after the filesystem
    /// on it was unmounted), so that its backing file is closed.
    pub fn wait_detached(&self, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.attached() {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

fn open_device(path: &Path, read_only: bool) -> std::io::Result<File> {
    // The node may appear a moment after GET_FREE creates the device.
    let start = Instant::now();
    loop {
        match OpenOptions::new().read(true).write(!read_only).open(path) {
            Ok(file) => return Ok(file),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && start.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        }
    }
}

/// The backing file's name, for `losetup -l` and /sys: informational only.
fn file_name(backing: &File) -> [u8; 64] {
    let mut name = [0u8; 64];
    if let Ok(path) = std::fs::read_link(format!("/proc/self/fd/{}", backing.as_raw_fd())) {
        let bytes = path.as_os_str().as_encoded_bytes();
        let n = bytes.len().min(63);
        if let (Some(target), Some(source)) = (name.get_mut(..n), bytes.get(..n)) {
            target.copy_from_slice(source);
        }
    }
    name
}
