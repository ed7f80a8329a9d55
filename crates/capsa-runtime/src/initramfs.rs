//! A reproducible initramfs: the newc cpio archive the kernel unpacks into
//! its root filesystem before it runs `/init`, compressed with gzip.
//!
//! The sandbox's launch measurement covers these bytes, so they must depend
//! on the inputs alone: entries are sorted by path, every parent directory
//! is present, inode numbers are assigned in that order, owners are root,
//! times are zero, and the gzip header carries no time or name. Hand-written
//! because the format is a 110-byte ASCII header per entry, and the cpio
//! crates on crates.io copy metadata from the build machine's files, which
//! is what must not leak in.

use std::collections::BTreeMap;
use std::io::Write;

/// Why an archive could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InitramfsError {
    /// A path is not a clean relative path.
    #[error("initramfs path {path:?}: {reason}")]
    BadPath {
        /// The path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two entries at one path, or an entry below a non-directory.
    #[error("initramfs path {path:?}: {reason}")]
    Conflict {
        /// The path.
        path: String,
        /// What clashes.
        reason: &'static str,
    },
    /// A file is larger than newc can describe (4 GiB).
    #[error("initramfs file {path:?} is {size} bytes; newc holds at most 4 GiB per file")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size.
        size: usize,
    },
    /// Writing or compressing failed.
    #[error("writing the initramfs: {0}")]
    Io(#[from] std::io::Error),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Directory,
    File { contents: Vec<u8>, executable: bool },
    Symlink { target: String },
    CharDevice { major: u32, minor: u32 },
}

/// An initramfs being assembled. Paths are relative to the guest's root
/// (`init`, `lib/modules/virtio.ko`), without `.` or `..` components.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Node>,
}

fn check_path(path: &str) -> Result<(), InitramfsError> {
    let bad = |reason| Err(InitramfsError::BadPath { path: path.to_owned(), reason });
    if path.is_empty() {
        return bad("empty");
    }
    if path.starts_with('/') || path.ends_with('/') {
        return bad("must be relative, without a leading or trailing slash");
    }
    if path.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return bad("has an empty, `.` or `..` component");
    }
    if path.bytes().any(|b| b == 0) {
        return bad("contains a NUL byte");
    }
    Ok(())
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&mut self, path: &str, node: Node) -> Result<(), InitramfsError> {
        check_path(path)?;
        // Parents become directories; a parent that is something else clashes.
        let mut parent = String::new();
        for component in path.split('/').collect::<Vec<_>>().split_last().map(|(_, p)| p.to_vec()).unwrap_or_default() {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), Node::Directory);
                }
                Some(Node::Directory) => {}
                Some(_) => {
                    return Err(InitramfsError::Conflict {
                        path: path.to_owned(),
                        reason: "a parent is not a directory",
                    });
                }
            }
        }
        match self.entries.get(path) {
            Some(Node::Directory) if node == Node::Directory => Ok(()),
            Some(_) => Err(InitramfsError::Conflict { path: path.to_owned(), reason: "added twice" }),
            None => {
                self.entries.insert(path.to_owned(), node);
                Ok(())
            }
        }
    }

    /// A directory (mode 0755).
    pub fn directory(&mut self, path: &str) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::Directory)?;
        Ok(self)
    }

    /// A regular file: mode 0755 when `executable`, 0644 otherwise.
    pub fn file(&mut self, path: &str, contents: Vec<u8>, executable: bool) -> Result<&mut Self, InitramfsError> {
        if u32::try_from(contents.len()).is_err() {
            return Err(InitramfsError::TooLarge { path: path.to_owned(), size: contents.len() });
        }
        self.insert(path, Node::File { contents, executable })?;
        Ok(self)
    }

    /// A symbolic link to `target` (stored as given).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, InitramfsError> {
        if target.is_empty() || target.bytes().any(|b| b == 0) {
            return Err(InitramfsError::BadPath {
                path: path.to_owned(),
                reason: "the link target is empty or has a NUL",
            });
        }
        self.insert(path, Node::Symlink { target: target.to_owned() })?;
        Ok(self)
    }

    /// A character device node (mode 0600), such as `dev/console` (5, 1),
    /// which the kernel opens for `/init`'s standard streams before any
    /// devtmpfs is mounted.
    pub fn char_device(&mut self, path: &str, major: u32, minor: u32) -> Result<&mut Self, InitramfsError> {
        self.insert(path, Node::CharDevice { major, minor })?;
        Ok(self)
    }

    /// The paths, in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The uncompressed newc archive.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, node)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Directory => (0o040_755, 2, &[], (0, 0)),
                Node::File { contents, executable } => {
                    (if *executable { 0o100_755 } else { 0o100_644 }, 1, contents.as_slice(), (0, 0))
                }
                Node::Symlink { target } => (0o120_777, 1, target.as_bytes(), (0, 0)),
                Node::CharDevice { major, minor } => (0o020_600, 1, &[], (*major, *minor)),
            };
            header(&mut out, ino, mode, nlink, data.len(), rdev, path);
            out.extend_from_slice(data);
            pad4(&mut out);
        }
        header(&mut out, 0, 0, 1, 0, (0, 0), "TRAILER!!!");
        out
    }

    /// The gzip-compressed archive, as the kernel takes it: no time, no
    /// name, the "unknown" OS byte.
    pub fn to_gzip(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut encoder =
            flate2::GzBuilder::new().mtime(0).operating_system(255).write(Vec::new(), flate2::Compression::best());
        encoder.write_all(&self.to_cpio())?;
        Ok(encoder.finish()?)
    }
}

/// One newc header (`070701`, thirteen 8-digit hex fields) and the name,
/// NUL-terminated and padded to four bytes.
fn header(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, size: usize, rdev: (u32, u32), name: &str) {
    let name_size = name.len() + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(size).unwrap_or(u32::MAX),
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        u32::try_from(name_size).unwrap_or(u32::MAX),
        0, // check (newc without CRC)
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One entry read back: name, mode, rdev (major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Reads a newc archive back.
    fn read(mut bytes: &[u8]) -> Vec<Entry> {
        let total = bytes.len();
        let mut entries = Vec::new();
        loop {
            assert_eq!(&bytes[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&bytes[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
            };
            let (mode, size, rdev, name_size) =
                (field(1), field(6) as usize, (field(9), field(10)), field(11) as usize);
            assert_eq!(field(5), 0, "mtime");
            let name = std::str::from_utf8(&bytes[110..110 + name_size - 1]).unwrap().to_owned();
            let data_at = (110 + name_size).next_multiple_of(4);
            assert_eq!((total - bytes.len() + data_at) % 4, 0);
            let data = bytes[data_at..data_at + size].to_vec();
            bytes = &bytes[(data_at + size).next_multiple_of(4)..];
            if name == "TRAILER!!!" {
                assert!(bytes.is_empty());
                return entries;
            }
            entries.push((name, mode, rdev, data));
        }
    }

    fn sample() -> Initramfs {
        let mut i = Initramfs::new();
        i.file("init", b"#!agent".to_vec(), true).unwrap();
        i.file("lib/modules/6.1/kernel/drivers/virtio/virtio.ko", vec![1, 2, 3], false).unwrap();
        i.symlink("sbin/init", "/init").unwrap();
        i.char_device("dev/console", 5, 1).unwrap();
        i
    }

    #[test]
    fn entries_come_sorted_with_their_parents_and_fixed_metadata() {
        let entries = read(&sample().to_cpio());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/kernel/drivers",
                "lib/modules/6.1/kernel/drivers/virtio",
                "lib/modules/6.1/kernel/drivers/virtio/virtio.ko",
                "sbin",
                "sbin/init"
            ]
        );
        let by_name = |n: &str| entries.iter().find(|e| e.0 == n).unwrap().clone();
        assert_eq!(by_name("init").1, 0o100_755);
        assert_eq!(by_name("init").3, b"#!agent");
        assert_eq!(by_name("sbin/init").1, 0o120_777);
        assert_eq!(by_name("sbin/init").3, b"/init");
        assert_eq!((by_name("dev/console").1, by_name("dev/console").2), (0o020_600, (5, 1)));
        assert_eq!(by_name("lib").1, 0o040_755);
    }

    #[test]
    fn the_same_inputs_give_the_same_bytes_in_any_order() {
        let mut other = Initramfs::new();
        other.char_device("dev/console", 5, 1).unwrap();
        other.symlink("sbin/init", "/init").unwrap();
        other.file("lib/modules/6.1/kernel/drivers/virtio/virtio.ko", vec![1, 2, 3], false).unwrap();
        other.file("init", b"#!agent".to_vec(), true).unwrap();
        assert_eq!(sample().to_cpio(), other.to_cpio());
        assert_eq!(sample().to_gzip().unwrap(), other.to_gzip().unwrap());
        let gz = sample().to_gzip().unwrap();
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "gzip MTIME");
        assert_eq!(gz[9], 255, "gzip OS");
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut plain).unwrap();
        assert_eq!(plain, sample().to_cpio());
    }

    #[test]
    fn unclean_paths_and_clashes_are_refused() {
        let mut i = Initramfs::new();
        for bad in ["", "/init", "a/../b", "./a", "a//b", "a/"] {
            assert!(matches!(i.file(bad, vec![], false), Err(InitramfsError::BadPath { .. })), "{bad:?}");
        }
        i.file("a", vec![], false).unwrap();
        assert!(matches!(i.file("a", vec![], false), Err(InitramfsError::Conflict { .. })));
        assert!(matches!(i.file("a/b", vec![], false), Err(InitramfsError::Conflict { .. })));
        i.directory("d").unwrap().directory("d").unwrap();
    }

    #[test]
    fn gnu_cpio_reads_it_back() {
        if !capsa_testkit::have("cpio") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("initrd.cpio");
        std::fs::write(&archive, sample().to_cpio()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-i", "-d", "--no-absolute-filenames", "--quiet", "-F"])
            .arg(&archive)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(dir.path().join("init")).unwrap(), b"#!agent");
        assert_eq!(std::fs::read_link(dir.path().join("sbin/init")).unwrap(), std::path::Path::new("/init"));
        let listing =
            std::process::Command::new("cpio").args(["-t", "-v", "--quiet", "-F"]).arg(&archive).output().unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(listing.lines().any(|l| l.starts_with("crw-------") && l.contains("dev/console")), "{listing}");
    }
}
