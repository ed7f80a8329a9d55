//! The guest image: what a sandbox boots, built from the host's kernel, its
//! modules and the static `capsa-agent`, with its launch digest.
//!
//! `capsa guest build` writes four files: `vmlinuz` (the kernel, as is),
//! `initrd.img` (a reproducible initramfs, see [`crate::initramfs`]),
//! `cmdline`, and `guest.json` (what went in and the measurement). The
//! same inputs give byte-identical files, so the measurement is a reference
//! value anyone can rebuild and check.
//!
//! The initramfs layout is a contract with the agent, which reads exactly
//! this (there is no modprobe, udev or shell in the guest):
//!
//! - `/init`: the agent (0755), statically linked, since nothing else is
//!   there to load it;
//! - `/lib/modules/<name>.ko`: each kernel module, named as the kernel
//!   names it (`dm_verity`), flat;
//! - `/etc/capsa/modules.load`: one absolute module path per line, in the
//!   order to load them (dependencies first, built-ins left out);
//! - `/dev/console` (char 5:1), for `/init`'s standard streams before the
//!   agent mounts devtmpfs;
//! - empty `/proc`, `/sys`, `/dev`, `/run`, `/tmp`, `/etc/capsa` to mount on.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use aws_lc_rs::digest::{SHA256, digest};
use object::read::elf::{FileHeader as _, ProgramHeader as _};
use object::{Object as _, ObjectSection as _};

use crate::initramfs::{Initramfs, InitramfsError};
use crate::measure::{self, DIGEST_LEN};
use crate::modules::{ModuleIndex, ModulesError};

/// The kernel command line unless one is given: the microVM's serial
/// console, a fixed TSC frequency (TCG guests otherwise spend seconds
/// calibrating it), reboot (which the launcher turns into exit) on panic,
/// and no PCI probing (a microVM has no PCI bus; probing only prints an
/// error).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 tsc_early_khz=2000000 panic=-1 pci=off quiet";

/// The modules the guest loads, by name; their dependencies are added.
///
/// `virtio_mmio` and `virtio_console` give the microVM's devices and the
/// host↔guest port; `vmw_vsock_virtio_transport` vsock where the host has
/// it; `overlay`, `erofs`, `dm_verity` container layers; `fuse`, `loop` and
/// `ext4` encrypted filesystems (capsa-encfs: the image on FUSE, a loop
/// device over it, ext4 on that), `dm_crypt` LUKS volumes. Three more are named because the kernel
/// would otherwise ask modprobe for them at run time, and the guest has
/// none: `crc32c_generic`, which `libcrc32c` (needed by `erofs`) allocates
/// when it loads (its modules.softdep), and `ecb` and `xts`, which
/// dm-crypt's default cipher `aes-xts-plain64` instantiates.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_console",
    "vmw_vsock_virtio_transport",
    "overlay",
    "dm_verity",
    "ecb",
    "xts",
    "dm_crypt",
    "crc32c_generic",
    "erofs",
    "fuse",
    "loop",
    "ext4",
];

/// Where the agent finds the load order, inside the initramfs.
pub const MODULES_LOAD: &str = "/etc/capsa/modules.load";
/// Environment variable naming the guest kernel (overrides `/boot`).
pub const KERNEL_ENV: &str = "CAPSA_GUEST_KERNEL";
/// Environment variable naming the module tree (overrides `/lib/modules/<release>`).
pub const MODULES_ENV: &str = "CAPSA_GUEST_MODULES";
/// Environment variable naming the agent binary.
pub const AGENT_ENV: &str = "CAPSA_AGENT";
/// The agent's file name, looked for next to the running `capsa`.
pub const AGENT_FILE_NAME: &str = "capsa-agent";

/// Why a guest image could not be built or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GuestError {
    /// An input file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// Which input.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel is not an x86 bzImage with a version string.
    #[error("{} is not a bzImage kernel with a version string; pass the vmlinuz from /boot", path.display())]
    NotAKernel {
        /// The file.
        path: PathBuf,
    },
    /// No kernel in `/boot`.
    #[error("no kernel found in {} (no vmlinuz-*): install linux-image-amd64, or pass --kernel or set {KERNEL_ENV}", dir.display())]
    NoKernel {
        /// The directory searched.
        dir: PathBuf,
    },
    /// The module tree for the kernel is not there.
    #[error("no module tree at {} for kernel {release}: install that kernel's modules, or pass --modules or set {MODULES_ENV}", dir.display())]
    NoModules {
        /// The directory expected.
        dir: PathBuf,
        /// The kernel's release.
        release: String,
    },
    /// The module tree could not be resolved.
    #[error("kernel modules in {}: {source}", root.display())]
    Modules {
        /// The module tree.
        root: PathBuf,
        /// Why.
        source: ModulesError,
    },
    /// A module file cannot be packed as is.
    #[error("kernel module {name} ({}): {reason}", path.display())]
    Module {
        /// The module's name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The modules were built for another kernel than the one given.
    #[error(
        "kernel module {name} is for kernel {module_release}, but the kernel is {kernel_release}: pass the matching --modules (/lib/modules/{kernel_release})"
    )]
    KernelMismatch {
        /// The module's name.
        name: String,
        /// The release in the module's vermagic.
        module_release: String,
        /// The release in the kernel's header.
        kernel_release: String,
    },
    /// The agent binary cannot be `/init`.
    #[error("the agent {} cannot be /init: {reason}; build a static one with scripts/build-agent", path.display())]
    Agent {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// No agent was given and none was found.
    #[error("no capsa-agent found{}: build it with scripts/build-agent, then pass --agent PATH or set {AGENT_ENV}", looked.as_ref().map(|p| format!(" (looked at {})", p.display())).unwrap_or_default())]
    NoAgent {
        /// Where it was looked for, next to `capsa`.
        looked: Option<PathBuf>,
    },
    /// The command line cannot be passed to a kernel.
    #[error("the kernel command line {cmdline:?} {reason}")]
    Cmdline {
        /// The command line.
        cmdline: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Neither `XDG_CACHE_HOME` nor `HOME` is set.
    #[error("no cache directory: neither XDG_CACHE_HOME nor HOME is set; pass --out DIR")]
    NoCacheDir,
    /// The initramfs could not be assembled.
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    /// An output file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// What a guest image is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInputs {
    /// The kernel (a bzImage, such as `/boot/vmlinuz-<release>`).
    pub kernel: PathBuf,
    /// Its module tree (`/lib/modules/<release>`).
    pub modules_root: PathBuf,
    /// The static `capsa-agent` binary, which becomes `/init`.
    pub agent: PathBuf,
    /// The kernel command line (normally [`DEFAULT_CMDLINE`]).
    pub cmdline: String,
}

/// A built guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The kernel image, unchanged.
    pub kernel: Vec<u8>,
    /// The kernel's release (`6.1.0-56-amd64`), from its header.
    pub kernel_release: String,
    /// The gzip-compressed initramfs.
    pub initrd: Vec<u8>,
    /// The kernel command line.
    pub cmdline: String,
    /// The modules packed, by name, in load order.
    pub modules: Vec<String>,
    /// SHA-256 of the agent binary.
    pub agent_sha256: [u8; 32],
    /// The launch digest ([`measure::launch_digest`]).
    pub measurement: [u8; DIGEST_LEN],
}

/// `guest.json`: what an image was built from, and its measurement.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestManifest {
    /// The kernel's release.
    pub kernel_version: String,
    /// SHA-256 of `vmlinuz`, hex.
    pub kernel_sha256: String,
    /// SHA-256 of `initrd.img`, hex.
    pub initrd_sha256: String,
    /// SHA-256 of the agent (`/init`), hex.
    pub agent_sha256: String,
    /// The kernel command line (also in `cmdline`, without a newline).
    pub cmdline: String,
    /// The modules, by name, in load order.
    pub modules: Vec<String>,
    /// The launch digest, hex: what `capsa measure` prints for these files.
    pub measurement: String,
}

/// The files [`GuestImage::write`] writes, in the order it writes them.
pub const IMAGE_FILES: [&str; 4] = ["vmlinuz", "initrd.img", "cmdline", "guest.json"];

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (slot, byte) in out.iter_mut().zip(digest(&SHA256, bytes).as_ref()) {
        *slot = *byte;
    }
    out
}

impl GuestImage {
    /// The manifest written as `guest.json`.
    pub fn manifest(&self) -> GuestManifest {
        GuestManifest {
            kernel_version: self.kernel_release.clone(),
            kernel_sha256: hex::encode(sha256(&self.kernel)),
            initrd_sha256: hex::encode(sha256(&self.initrd)),
            agent_sha256: hex::encode(self.agent_sha256),
            cmdline: self.cmdline.clone(),
            modules: self.modules.clone(),
            measurement: hex::encode(self.measurement),
        }
    }

    /// Writes [`IMAGE_FILES`] into `out_dir` (created if missing), each
    /// atomically: a temporary sibling, fsynced, renamed over the target.
    /// `guest.json` comes last, so a crash leaves either the old manifest
    /// or one whose hashes match the files. Returns the paths written.
    pub fn write(&self, out_dir: &Path) -> Result<Vec<PathBuf>, GuestError> {
        std::fs::create_dir_all(out_dir).map_err(|source| GuestError::Write { path: out_dir.to_path_buf(), source })?;
        let mut manifest = serde_json::to_vec_pretty(&self.manifest())
            .map_err(|e| GuestError::Write { path: out_dir.join("guest.json"), source: e.into() })?;
        manifest.push(b'\n');
        let contents: [&[u8]; 4] = [&self.kernel, &self.initrd, self.cmdline.as_bytes(), &manifest];
        let mut written = Vec::new();
        for (name, bytes) in IMAGE_FILES.iter().zip(contents) {
            let path = out_dir.join(name);
            write_atomic(out_dir, name, bytes).map_err(|source| GuestError::Write { path: path.clone(), source })?;
            written.push(path);
        }
        // The renames themselves are durable once the directory is synced.
        std::fs::File::open(out_dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| GuestError::Write { path: out_dir.to_path_buf(), source })?;
        Ok(written)
    }
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Builds the guest image: reads the kernel, resolves [`GUEST_MODULES`]
/// in the module tree, packs them with the agent, and measures the result.
pub fn build(inputs: &GuestInputs) -> Result<GuestImage, GuestError> {
    check_cmdline(&inputs.cmdline)?;
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| GuestError::Read { what, path: path.to_path_buf(), source })
    };
    let kernel = read("kernel", &inputs.kernel)?;
    let kernel_release =
        kernel_release(&kernel).ok_or_else(|| GuestError::NotAKernel { path: inputs.kernel.clone() })?;

    let agent = std::fs::read(&inputs.agent)
        .map_err(|e| GuestError::Agent { path: inputs.agent.clone(), reason: format!("cannot read it: {e}") })?;
    check_static_executable(&agent).map_err(|reason| GuestError::Agent { path: inputs.agent.clone(), reason })?;
    let agent_sha256 = sha256(&agent);

    let root = &inputs.modules_root;
    let modules_error = |source| GuestError::Modules { root: root.clone(), source };
    let order =
        ModuleIndex::from_tree(root).and_then(|index| index.load_order(GUEST_MODULES)).map_err(modules_error)?;
    let mut modules = Vec::with_capacity(order.len());
    for module in order {
        let path = root.join(&module.path);
        let bad =
            |reason: &str| GuestError::Module { name: module.name.clone(), path: path.clone(), reason: reason.into() };
        if !module.path.ends_with(".ko") {
            // The layout promises plain `<name>.ko` files: the guest has no decompressor.
            return Err(bad(
                "is compressed; the guest loads plain .ko files: decompress the module tree (unxz, zstd -d) and run depmod",
            ));
        }
        let bytes = read("kernel module", &path)?;
        let module_release =
            vermagic_release(&bytes).ok_or_else(|| bad("has no vermagic in .modinfo; is it a kernel module?"))?;
        if module_release != kernel_release {
            return Err(GuestError::KernelMismatch { name: module.name, module_release, kernel_release });
        }
        modules.push((module.name, bytes));
    }

    let names = modules.iter().map(|(name, _)| name.clone()).collect();
    let initrd = layout(agent, modules)?.to_gzip()?;
    let measurement = measure::launch_digest(&kernel, &initrd, &inputs.cmdline);
    Ok(GuestImage {
        kernel,
        kernel_release,
        initrd,
        cmdline: inputs.cmdline.clone(),
        modules: names,
        agent_sha256,
        measurement,
    })
}

fn check_cmdline(cmdline: &str) -> Result<(), GuestError> {
    let bad = |reason| Err(GuestError::Cmdline { cmdline: cmdline.to_owned(), reason });
    if cmdline.bytes().any(|b| b == 0) {
        return bad("contains a NUL byte, where the kernel would stop reading");
    }
    if cmdline.contains('\n') {
        return bad("contains a newline; separate parameters with spaces");
    }
    Ok(())
}

/// The initramfs for `agent` and `modules` (name, contents) in load order.
fn layout(agent: Vec<u8>, modules: Vec<(String, Vec<u8>)>) -> Result<Initramfs, GuestError> {
    let mut image = Initramfs::new();
    image.file("init", agent, true)?.char_device("dev/console", 5, 1)?;
    for dir in ["proc", "sys", "dev", "run", "tmp", "etc/capsa", "lib/modules"] {
        image.directory(dir)?;
    }
    let mut load = String::new();
    for (name, bytes) in modules {
        let path = format!("lib/modules/{name}.ko");
        load.push('/');
        load.push_str(&path);
        load.push('\n');
        image.file(&path, bytes, false)?;
    }
    image.file(MODULES_LOAD.trim_start_matches('/'), load.into_bytes(), false)?;
    Ok(image)
}

/// The release (`6.1.0-56-amd64`) of an x86 bzImage: the first word of the
/// version string its setup header points to (boot protocol 2.00+,
/// `kernel_version` at 0x20E, relative to 0x200).
pub fn kernel_release(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let offset = u16::from_le_bytes([*image.get(0x20E)?, *image.get(0x20F)?]);
    if offset == 0 {
        return None;
    }
    let text = image.get(usize::from(offset) + 0x200..)?;
    // The string is short; a missing NUL within 256 bytes means garbage.
    let end = text.iter().take(256).position(|b| *b == 0)?;
    let text = std::str::from_utf8(text.get(..end)?).ok()?;
    text.split_whitespace().next().map(str::to_owned)
}

/// The kernel release a module was built for: the first word of its
/// `.modinfo` `vermagic=`, which the kernel checks before it loads it.
fn vermagic_release(module: &[u8]) -> Option<String> {
    let elf = object::File::parse(module).ok()?;
    let modinfo = elf.section_by_name(".modinfo")?.data().ok()?;
    let value = modinfo.split(|b| *b == 0).find_map(|field| field.strip_prefix(b"vermagic="))?;
    std::str::from_utf8(value).ok()?.split_whitespace().next().map(str::to_owned)
}

/// Checks that `bytes` is an x86-64 ELF executable that needs no dynamic
/// loader: it has loadable segments and no `PT_INTERP`.
fn check_static_executable(bytes: &[u8]) -> Result<(), String> {
    use object::elf;
    let header = elf::FileHeader64::<object::Endianness>::parse(bytes).map_err(|_| "it is not a 64-bit ELF file")?;
    let endian = header.endian().map_err(|e| format!("its ELF header: {e}"))?;
    if header.e_machine(endian) != elf::EM_X86_64 {
        return Err("it is not an x86-64 program".into());
    }
    if !matches!(header.e_type(endian), elf::ET_EXEC | elf::ET_DYN) {
        return Err("it is not an executable".into());
    }
    let segments = header.program_headers(endian, bytes).map_err(|e| format!("its program headers: {e}"))?;
    if segments.iter().any(|s| s.p_type(endian) == elf::PT_INTERP) {
        return Err(
            "it is dynamically linked (it names an ELF interpreter) and the initramfs has no loader or libraries"
                .into(),
        );
    }
    if !segments.iter().any(|s| s.p_type(endian) == elf::PT_LOAD) {
        return Err("it has no loadable segments".into());
    }
    Ok(())
}

/// Where the guest kernel and its modules are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPaths {
    /// The kernel image.
    pub kernel: PathBuf,
    /// Its module tree.
    pub modules_root: PathBuf,
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// The kernel and module tree to build from: each as given, else from the
/// environment ([`KERNEL_ENV`], [`MODULES_ENV`]), else the newest
/// `/boot/vmlinuz-*` and `/lib/modules/<its release>`.
pub fn locate_kernel(kernel: Option<&Path>, modules_root: Option<&Path>) -> Result<KernelPaths, GuestError> {
    locate_kernel_in(
        kernel.map(Path::to_path_buf).or_else(|| env_path(KERNEL_ENV)),
        modules_root.map(Path::to_path_buf).or_else(|| env_path(MODULES_ENV)),
        Path::new("/boot"),
        Path::new("/lib/modules"),
    )
}

fn locate_kernel_in(
    kernel: Option<PathBuf>,
    modules_root: Option<PathBuf>,
    boot: &Path,
    lib_modules: &Path,
) -> Result<KernelPaths, GuestError> {
    let kernel = match kernel {
        Some(kernel) => kernel,
        None => newest_kernel(boot)?,
    };
    let modules_root = match modules_root {
        Some(root) => root,
        None => {
            let release = release_of_file(&kernel)?;
            let root = lib_modules.join(&release);
            if !root.is_dir() {
                return Err(GuestError::NoModules { dir: root, release });
            }
            root
        }
    };
    Ok(KernelPaths { kernel, modules_root })
}

/// The newest `vmlinuz-<release>` in `boot`, comparing releases as
/// versions (`6.1.0-10` is newer than `6.1.0-9`).
fn newest_kernel(boot: &Path) -> Result<PathBuf, GuestError> {
    let none = || GuestError::NoKernel { dir: boot.to_path_buf() };
    let entries = std::fs::read_dir(boot).map_err(|_| none())?;
    entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.is_file())
        .filter_map(|path| {
            let release = path.file_name()?.to_str()?.strip_prefix("vmlinuz-")?.to_owned();
            Some((version_key(&release), path))
        })
        .max()
        .map(|(_, path)| path)
        .ok_or_else(none)
}

/// A piece of a version string: numbers compare as numbers.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum VersionPart {
    Number(u64),
    Text(String),
}

fn version_key(version: &str) -> Vec<VersionPart> {
    let mut parts = Vec::new();
    let mut rest = version;
    while let Some(first) = rest.chars().next() {
        let digits = first.is_ascii_digit();
        let end = rest.find(|c: char| c.is_ascii_digit() != digits).unwrap_or(rest.len());
        let (part, tail) = rest.split_at(end);
        parts.push(match part.parse() {
            Ok(n) if digits => VersionPart::Number(n),
            _ => VersionPart::Text(part.to_owned()),
        });
        rest = tail;
    }
    parts
}

/// A kernel file's release: from its header, else its `vmlinuz-<release>`
/// name.
fn release_of_file(kernel: &Path) -> Result<String, GuestError> {
    // The version string sits within the setup code: 0x200 + a u16 offset.
    const HEADER_SPAN: u64 = 0x200 + 0x1_0000 + 256;
    let mut head = Vec::new();
    std::fs::File::open(kernel)
        .and_then(|f| f.take(HEADER_SPAN).read_to_end(&mut head))
        .map_err(|source| GuestError::Read { what: "kernel", path: kernel.to_path_buf(), source })?;
    kernel_release(&head)
        .or_else(|| Some(kernel.file_name()?.to_str()?.strip_prefix("vmlinuz-")?.to_owned()))
        .ok_or_else(|| GuestError::NotAKernel { path: kernel.to_path_buf() })
}

/// The agent to pack: `explicit` (`--agent`), else [`AGENT_ENV`], else
/// [`AGENT_FILE_NAME`] next to the running executable.
pub fn locate_agent(explicit: Option<&Path>) -> Result<PathBuf, GuestError> {
    let beside_exe = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join(AGENT_FILE_NAME)));
    locate_agent_in(explicit.map(Path::to_path_buf).or_else(|| env_path(AGENT_ENV)), beside_exe)
}

fn locate_agent_in(given: Option<PathBuf>, beside_exe: Option<PathBuf>) -> Result<PathBuf, GuestError> {
    if let Some(path) = given {
        // A path the user named is used as is: if it is wrong, reading it
        // says so, rather than silently falling back to another agent.
        return Ok(path);
    }
    match beside_exe {
        Some(path) if path.is_file() => Ok(path),
        looked => Err(GuestError::NoAgent { looked }),
    }
}

/// Where `capsa guest build` writes by default: `$XDG_CACHE_HOME/capsa/guest`,
/// or `~/.cache/capsa/guest`.
pub fn default_out_dir() -> Result<PathBuf, GuestError> {
    out_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

fn out_dir_from(
    xdg_cache: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> Result<PathBuf, GuestError> {
    // The XDG spec says a relative XDG_CACHE_HOME is to be ignored.
    let base = match (xdg_cache.map(PathBuf::from).filter(|p| p.is_absolute()), home.filter(|h| !h.is_empty())) {
        (Some(cache), _) => cache,
        (None, Some(home)) => PathBuf::from(home).join(".cache"),
        (None, None) => return Err(GuestError::NoCacheDir),
    };
    Ok(base.join("capsa").join("guest"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest x86-64 ELF executable header the checks accept: the ELF
    /// header and one program header of type `segment`.
    fn elf(segment: u32) -> Vec<u8> {
        let mut out = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        out.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        out.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
        out.extend_from_slice(&0x40_1000u64.to_le_bytes()); // entry
        out.extend_from_slice(&64u64.to_le_bytes()); // phoff
        out.extend_from_slice(&0u64.to_le_bytes()); // shoff
        out.extend_from_slice(&0u32.to_le_bytes()); // flags
        for half in [64u16, 56, 1, 64, 0, 0] {
            // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
            out.extend_from_slice(&half.to_le_bytes());
        }
        out.extend_from_slice(&segment.to_le_bytes());
        out.extend_from_slice(&[0u8; 52]);
        out
    }

    /// A bzImage-shaped file whose header names `release`.
    fn fake_kernel(release: &str) -> Vec<u8> {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20E..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let version = format!("{release} (builder@example) #1 SMP\0");
        image[0x300..0x300 + version.len()].copy_from_slice(version.as_bytes());
        image
    }

    #[test]
    fn the_initramfs_has_the_layout_the_agent_reads() {
        let modules = vec![("virtio".to_owned(), vec![1]), ("virtio_console".to_owned(), vec![2])];
        let image = layout(b"agent".to_vec(), modules).unwrap();
        let paths: Vec<&str> = image.paths().collect();
        assert_eq!(
            paths,
            [
                "dev",
                "dev/console",
                "etc",
                "etc/capsa",
                "etc/capsa/modules.load",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/virtio.ko",
                "lib/modules/virtio_console.ko",
                "proc",
                "run",
                "sys",
                "tmp"
            ]
        );
        let cpio = image.to_cpio();
        let load = b"/lib/modules/virtio.ko\n/lib/modules/virtio_console.ko\n";
        assert!(cpio.windows(load.len()).any(|w| w == load), "modules.load holds the load order");
        // /init is 0755 (mode 100755 in the newc header of the `init` entry).
        let init_at = cpio.windows(5).position(|w| w == b"init\0").unwrap();
        assert_eq!(&cpio[init_at - 110 + 14..init_at - 110 + 22], b"000081ed");
    }

    #[test]
    fn the_kernel_release_comes_from_the_bzimage_header() {
        assert_eq!(kernel_release(&fake_kernel("6.1.0-56-amd64")).as_deref(), Some("6.1.0-56-amd64"));
        assert_eq!(kernel_release(b"not a kernel"), None);
        let mut no_nul = fake_kernel("6.1");
        no_nul[0x300..].fill(b'x');
        assert_eq!(kernel_release(&no_nul), None);
    }

    #[test]
    fn only_static_x86_64_executables_can_be_init() {
        check_static_executable(&elf(object::elf::PT_LOAD)).unwrap();
        let dynamic = check_static_executable(&elf(object::elf::PT_INTERP)).unwrap_err();
        assert!(dynamic.contains("dynamically linked"), "{dynamic}");
        assert!(check_static_executable(b"#!/bin/sh\n").unwrap_err().contains("not a 64-bit ELF"));
        let mut arm = elf(object::elf::PT_LOAD);
        arm[18] = 183; // EM_AARCH64
        assert!(check_static_executable(&arm).unwrap_err().contains("x86-64"));
    }

    #[test]
    fn bad_command_lines_are_refused() {
        check_cmdline(DEFAULT_CMDLINE).unwrap();
        assert!(matches!(check_cmdline("a\0b"), Err(GuestError::Cmdline { .. })));
        assert!(matches!(check_cmdline("a\nb"), Err(GuestError::Cmdline { .. })));
    }

    #[test]
    fn the_newest_kernel_and_its_modules_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let (boot, lib) = (dir.path().join("boot"), dir.path().join("lib/modules"));
        std::fs::create_dir_all(&boot).unwrap();
        assert!(matches!(locate_kernel_in(None, None, &boot, &lib), Err(GuestError::NoKernel { .. })));
        for release in ["6.1.0-9-amd64", "6.1.0-10-amd64", "5.10.0-30-amd64"] {
            std::fs::write(boot.join(format!("vmlinuz-{release}")), fake_kernel(release)).unwrap();
        }
        std::fs::write(boot.join("config-6.1.0-99-amd64"), b"").unwrap();
        let err = locate_kernel_in(None, None, &boot, &lib).unwrap_err().to_string();
        assert!(err.contains("6.1.0-10-amd64") && err.contains("--modules"), "{err}");
        std::fs::create_dir_all(lib.join("6.1.0-10-amd64")).unwrap();
        let found = locate_kernel_in(None, None, &boot, &lib).unwrap();
        assert_eq!(found.kernel, boot.join("vmlinuz-6.1.0-10-amd64"));
        assert_eq!(found.modules_root, lib.join("6.1.0-10-amd64"));
        // A kernel named explicitly wins, and its modules follow its release.
        std::fs::create_dir_all(lib.join("6.1.0-9-amd64")).unwrap();
        let chosen = boot.join("vmlinuz-6.1.0-9-amd64");
        assert_eq!(locate_kernel_in(Some(chosen), None, &boot, &lib).unwrap().modules_root, lib.join("6.1.0-9-amd64"));
    }

    #[test]
    fn the_agent_is_found_or_the_error_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let beside = dir.path().join(AGENT_FILE_NAME);
        let err = locate_agent_in(None, Some(beside.clone())).unwrap_err().to_string();
        assert!(err.contains("scripts/build-agent") && err.contains(&beside.display().to_string()), "{err}");
        std::fs::write(&beside, elf(object::elf::PT_LOAD)).unwrap();
        assert_eq!(locate_agent_in(None, Some(beside.clone())).unwrap(), beside);
        let given = dir.path().join("elsewhere");
        assert_eq!(locate_agent_in(Some(given.clone()), Some(beside)).unwrap(), given);
    }

    #[test]
    fn the_cache_directory_follows_xdg() {
        let out = |x: Option<&str>, h: Option<&str>| out_dir_from(x.map(Into::into), h.map(Into::into));
        assert_eq!(out(Some("/c"), Some("/h")).unwrap(), Path::new("/c/capsa/guest"));
        assert_eq!(out(Some("relative"), Some("/h")).unwrap(), Path::new("/h/.cache/capsa/guest"));
        assert!(matches!(out(None, None), Err(GuestError::NoCacheDir)));
    }

    /// Debian's kernel and modules (`CAPSA_GUEST_KERNEL`/`CAPSA_GUEST_MODULES`
    /// or the newest in /boot): a real build, twice.
    #[test]
    fn a_real_kernel_builds_the_same_image_twice() {
        let paths = match locate_kernel(None, None) {
            Ok(paths) => paths,
            Err(e) => {
                assert!(std::env::var_os("CAPSA_REQUIRE_TOOLS").is_none(), "{e} (CAPSA_REQUIRE_TOOLS is set)");
                eprintln!("SKIPPED: {e}");
                return;
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("capsa-agent");
        std::fs::write(&agent, elf(object::elf::PT_LOAD)).unwrap();
        let inputs = GuestInputs {
            kernel: paths.kernel.clone(),
            modules_root: paths.modules_root.clone(),
            agent,
            cmdline: DEFAULT_CMDLINE.into(),
        };
        let first = build(&inputs).unwrap();
        let second = build(&inputs).unwrap();
        assert_eq!(first.initrd, second.initrd, "the initrd is reproducible");
        assert_eq!(first.measurement, second.measurement);
        assert_eq!(first.measurement, measure::launch_digest(&first.kernel, &first.initrd, DEFAULT_CMDLINE));
        let position = |name: &str| first.modules.iter().position(|m| m == name);
        let console = position("virtio_console").expect("virtio_console is packed");
        for dependency in ["virtio", "virtio_ring"] {
            // Built-in on some kernels, a module (to load first) on Debian's.
            if let Some(at) = position(dependency) {
                assert!(at < console, "{dependency} before virtio_console: {:?}", first.modules);
            }
        }
        eprintln!("{} modules: {:?}", first.modules.len(), first.modules);

        let out = dir.path().join("out");
        let written = first.write(&out).unwrap();
        assert_eq!(written.len(), 4);
        assert_eq!(std::fs::read(out.join("initrd.img")).unwrap(), first.initrd);
        assert_eq!(std::fs::read_to_string(out.join("cmdline")).unwrap(), DEFAULT_CMDLINE);
        let manifest: GuestManifest = serde_json::from_slice(&std::fs::read(out.join("guest.json")).unwrap()).unwrap();
        assert_eq!(manifest, first.manifest());
        assert_eq!(manifest.kernel_version, first.kernel_release);
        assert_eq!(
            measure::launch_digest_of_files(&out.join("vmlinuz"), &out.join("initrd.img"), &manifest.cmdline).unwrap(),
            first.measurement
        );
        // Nothing but the four files is left behind.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 4);

        // A missing agent says how to build one.
        let missing = GuestInputs { agent: dir.path().join("nope"), ..inputs.clone() };
        let err = build(&missing).unwrap_err().to_string();
        assert!(err.contains("scripts/build-agent"), "{err}");

        // Modules for another kernel are refused by name.
        let other = dir.path().join("vmlinuz-other");
        std::fs::write(&other, fake_kernel("9.9.9-other")).unwrap();
        let err = build(&GuestInputs { kernel: other, ..inputs }).unwrap_err();
        assert!(matches!(err, GuestError::KernelMismatch { .. }), "{err}");
    }
}
