//! The agent's duties as the guest's PID 1: a root that containers can
//! pivot away from, the kernel's pseudo-filesystems, the guest image's
//! kernel modules, the RPC port, and a clean power-off.
//!
//! The guest image is an initramfs (`capsa guest build` writes it), whose
//! root is the kernel's `rootfs`. `pivot_root(2)` refuses to move away from
//! `rootfs`, and a container that only `chroot`s can climb out again, so
//! the first thing PID 1 does is what `switch_root` does: copy the image
//! into a fresh tmpfs, move that over `/`, and run itself again from there.

use std::ffi::CStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::mount::{MountFlags, mount, mount_move};

/// The argument PID 1 passes to itself after the switch to tmpfs.
pub const SWITCHED: &str = "--switched-root";
/// The list of modules to load, in order, one absolute path per line.
pub const MODULES_LOAD: &str = "/etc/capsa/modules.load";

/// Why the guest could not be brought up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// A step of the bring-up failed.
    #[error("{step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// The OS error.
        source: io::Error,
    },
    /// The RPC port did not appear.
    #[error(
        "no virtio-serial port named {name} appeared within {secs} s: is the sandbox launched with `-device virtserialport,name={name}` and is virtio_console loaded?"
    )]
    NoPort {
        /// The port name.
        name: String,
        /// How long we waited.
        secs: u64,
    },
}

fn step<T>(what: impl Into<String>, result: io::Result<T>) -> Result<T, InitError> {
    result.map_err(|source| InitError::Step { step: what.into(), source })
}

fn errno<T>(r: rustix::io::Result<T>) -> io::Result<T> {
    r.map_err(io::Error::from)
}

/// Moves the initramfs into a tmpfs mounted over `/`, then re-executes the
/// agent from it with [`SWITCHED`]. Returns only on failure.
pub fn switch_root(self_exe: &Path) -> InitError {
    match switch_root_inner(self_exe) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

enum Never {}

fn switch_root_inner(self_exe: &Path) -> Result<Never, InitError> {
    let new_root = Path::new("/.capsa-root");
    step("create /.capsa-root", fs::create_dir_all(new_root))?;
    step(
        "mount a tmpfs for the guest root",
        errno(mount("tmpfs", new_root, "tmpfs", MountFlags::NOSUID, Some(c"mode=0755"))),
    )?;
    // Copy everything but the new root itself: the image holds the agent,
    // its modules and a few empty directories.
    for entry in step("read /", fs::read_dir("/"))? {
        let entry = step("read /", entry)?;
        let path = entry.path();
        if path == new_root {
            continue;
        }
        let target = new_root.join(entry.file_name());
        step(format!("copy {} to the new root", path.display()), copy_tree(&path, &target))?;
        // Free the initramfs copy: rootfs memory is never given back otherwise.
        let _ = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
    }
    step("enter the new root", std::env::set_current_dir(new_root))?;
    step("move the new root over /", errno(mount_move(".", "/")))?;
    step("chroot into the new root", errno(rustix::process::chroot(".")))?;
    step("enter /", std::env::set_current_dir("/"))?;
    let exe = Path::new("/").join(self_exe.strip_prefix("/").unwrap_or(self_exe));
    use std::os::unix::process::CommandExt as _;
    let err = std::process::Command::new(&exe).arg(SWITCHED).exec();
    Err(InitError::Step { step: format!("re-execute {}", exe.display()), source: err })
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(from)?;
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)
    } else if meta.is_dir() {
        fs::create_dir_all(to)?;
        fs::set_permissions(to, meta.permissions())?;
        for entry in fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        Ok(())
    } else if meta.is_file() {
        fs::copy(from, to).map(|_| ())
    } else {
        // Device nodes (dev/console): devtmpfs provides them after the switch.
        Ok(())
    }
}

/// Mounts the pseudo-filesystems the agent and containers need.
pub fn mount_basics() -> Result<(), InitError> {
    let mounts: [(&str, &str, &str, MountFlags, &CStr); 7] = [
        ("proc", "/proc", "proc", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, c""),
        ("sysfs", "/sys", "sysfs", MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC, c""),
        ("devtmpfs", "/dev", "devtmpfs", MountFlags::NOSUID, c"mode=0755"),
        ("devpts", "/dev/pts", "devpts", MountFlags::NOSUID | MountFlags::NOEXEC, c"newinstance,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=1777"),
        ("tmpfs", "/run", "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", MountFlags::NOSUID | MountFlags::NODEV, c"mode=1777"),
    ];
    for (source, target, fs_type, flags, data) in mounts {
        step(format!("create {target}"), fs::create_dir_all(target))?;
        step(
            format!("mount {fs_type} at {target}"),
            errno(mount(source, target, fs_type, flags, Some(data).filter(|d| !d.is_empty()))),
        )?;
    }
    Ok(())
}

/// Loads the modules listed in [`MODULES_LOAD`], in order. A module the
/// kernel already has (built in, or loaded) is fine.
pub fn load_modules() -> Result<Vec<String>, InitError> {
    let list = match fs::read_to_string(MODULES_LOAD) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return step(format!("read {MODULES_LOAD}"), Err(e)),
    };
    let mut loaded = Vec::new();
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let file = step(format!("open module {path}"), fs::File::open(path))?;
        match rustix::system::finit_module(&file, c"", 0) {
            Ok(()) => loaded.push(path.to_owned()),
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return step(format!("load module {path}"), Err(e.into())),
        }
    }
    Ok(loaded)
}

/// Finds the device node of the virtio-serial port called `name`, waiting
/// for the kernel to create it.
pub fn find_port(name: &str, timeout: Duration) -> Result<PathBuf, InitError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(dev) = port_device(name) {
            if dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() > deadline {
            return Err(InitError::NoPort { name: name.to_owned(), secs: timeout.as_secs() });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The `/dev` node of the port called `name`, if the kernel knows one.
pub fn port_device(name: &str) -> Option<PathBuf> {
    let ports = fs::read_dir("/sys/class/virtio-ports").ok()?;
    for port in ports.flatten() {
        let port_name = fs::read_to_string(port.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(port.file_name()));
        }
    }
    None
}

/// Flushes filesystems and powers the guest off. QEMU, started with
/// `-no-reboot`, exits.
pub fn power_off() -> ! {
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    // Only reachable when not PID 1 (tests): nothing left to do but leave.
    std::process::exit(0)
}
