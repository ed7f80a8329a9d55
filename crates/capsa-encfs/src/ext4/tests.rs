//! Real images made by e2fsprogs from a source tree, read back and compared
//! with the tree through std::fs; tampered copies; seeded random mutations of
//! the metadata.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::{Error, Volume};

/// An image in memory.
struct MemVolume(Vec<u8>);

impl MemVolume {
    fn read_from(bytes: &[u8], offset: u64, buf: &mut [u8]) -> usize {
        let Ok(start) = usize::try_from(offset) else { return 0 };
        let Some(src) = bytes.get(start..) else { return 0 };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        n
    }
}

impl Volume for MemVolume {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        Ok(MemVolume::read_from(&self.0, offset, buf))
    }
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), Error> {
        Err(Error::ReadOnly)
    }
    fn commit(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// xorshift64*: reproducible content and mutations without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// An e2fsprogs tool, or None (the caller skips) when e2fsprogs is missing.
fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn run(tool_path: &Path, args: &[&str], ok_codes: &[i32]) {
    let out = Command::new(tool_path).args(args).output().unwrap();
    let code = out.status.code().unwrap_or(-1);
    assert!(
        ok_codes.contains(&code),
        "{} {args:?} exited {code}: {}{}",
        tool_path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn debugfs_write(image: &Path, request: &str) {
    let debugfs = tool("debugfs").unwrap();
    run(&debugfs, &["-w", "-R", request, image.to_str().unwrap()], &[0]);
}

fn debugfs_stat(image: &Path, path: &str) -> String {
    let debugfs = tool("debugfs").unwrap();
    let out = Command::new(debugfs).args(["-R", &format!("stat {path}"), image.to_str().unwrap()]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const PIECES: u64 = 40;
const PIECE: usize = 4096;
const HOLE: u64 = 1 << 20;
const BIG_DIR_ENTRIES: usize = 3000;
const NON_ASCII: &str = "données-ünïcødé-日本語.txt";

fn set_mtime(path: &Path, seconds: u64) {
    fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::from_secs(seconds))
        .unwrap();
}

/// The source tree every image is made from.
fn make_tree(root: &Path, rng: &mut Rng) {
    fs::create_dir_all(root.join("a/b/c/d")).unwrap();
    fs::write(root.join("a/b/c/d/deep.txt"), b"deep\n").unwrap();
    fs::write(root.join("a/one.txt"), b"one").unwrap();
    fs::create_dir(root.join("big")).unwrap();
    for index in 0..BIG_DIR_ENTRIES {
        let path = root.join(format!("big/entry-{index:04}-with-a-longer-name"));
        fs::write(&path, if index % 100 == 0 { format!("{index}\n").into_bytes() } else { Vec::new() }).unwrap();
    }
    fs::write(root.join("empty"), b"").unwrap();
    // Preallocated (unwritten) by debugfs in Fixture::new.
    fs::write(root.join("prealloc"), b"").unwrap();
    fs::write(root.join("small.txt"), b"hello, ext4\n").unwrap();
    fs::write(root.join("random.bin"), rng.bytes(3 * 1024 * 1024 + 123)).unwrap();

    // Data, a hole, data, and a trailing hole; mkfs -d keeps holes (its
    // copy skips zero blocks), which `sparse_file_keeps_holes` checks.
    let sparse = fs::File::create(root.join("sparse")).unwrap();
    use std::os::unix::fs::FileExt;
    sparse.write_all_at(&rng.bytes(8192), 0).unwrap();
    sparse.write_all_at(&rng.bytes(12288), 3 << 20).unwrap();
    sparse.set_len(8 << 20).unwrap();

    // 40 pieces between 1 MiB holes: more extents than the inode's 4, so
    // the tree has depth 1 at least.
    let fragmented = fs::File::create(root.join("fragmented")).unwrap();
    for piece in 0..PIECES {
        fragmented.write_all_at(&rng.bytes(PIECE), piece * (HOLE + PIECE as u64)).unwrap();
    }

    symlink("small.txt", root.join("short-link")).unwrap();
    let long_target = format!("a/b/c/{}", "long-name-".repeat(12));
    assert!(long_target.len() > 60);
    symlink(&long_target, root.join("long-link")).unwrap();
    symlink("a/b", root.join("dir-link")).unwrap();
    fs::hard_link(root.join("small.txt"), root.join("hard-link")).unwrap();
    rustix::fs::mknodat(rustix::fs::CWD, root.join("fifo"), rustix::fs::FileType::Fifo, 0o640.into(), 0).unwrap();
    fs::create_dir(root.join("répertoire")).unwrap();
    fs::write(root.join("répertoire").join(NON_ASCII), "ünïcødé\n").unwrap();
    fs::write(root.join("setuid"), b"#!/bin/sh\n").unwrap();
    fs::set_permissions(root.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::create_dir(root.join("sticky")).unwrap();
    fs::set_permissions(root.join("sticky"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(root.join("private"), b"secret").unwrap();
    fs::set_permissions(root.join("private"), fs::Permissions::from_mode(0o600)).unwrap();

    set_mtime(&root.join("small.txt"), 1_234_567_890);
    set_mtime(&root.join("random.bin"), 1_700_000_000);
    set_mtime(&root.join("a/one.txt"), 86_400);
}

/// An image made by mkfs.ext4 from the tree, indexed by e2fsck -D (so
/// `big` is a hash-tree directory), with what only debugfs can set: 32-bit
/// owners, nanoseconds, devices.
struct Fixture {
    _dir: tempfile::TempDir,
    src: PathBuf,
    image: PathBuf,
}

impl Fixture {
    fn new(mkfs_args: &[&str], size: &str) -> Option<Fixture> {
        let Some(mkfs) = tool("mkfs.ext4") else {
            eprintln!("skipped: mkfs.ext4 (e2fsprogs) is not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        make_tree(&src, &mut Rng(0x5EED_0001));
        let image = dir.path().join("image");
        let mut args = vec!["-q", "-F", "-d", src.to_str().unwrap()];
        args.extend_from_slice(mkfs_args);
        args.extend_from_slice(&[image.to_str().unwrap(), size]);
        run(&mkfs, &args, &[0]);
        // 1: the filesystem was changed (indexed), which is the point.
        run(&tool("e2fsck").unwrap(), &["-f", "-y", "-D", image.to_str().unwrap()], &[0, 1]);
        debugfs_write(&image, "sif /small.txt uid 100000");
        debugfs_write(&image, "sif /small.txt gid 200001");
        debugfs_write(&image, &format!("sif /small.txt mtime_extra {:#x}", 123_456_789u32 << 2));
        // mkfs -d (1.47.0) keeps 32 bits of seconds: set the epoch bit here.
        debugfs_write(&image, "sif /random.bin mtime_extra 1");
        debugfs_write(&image, "mknod chardev c 4 64");
        debugfs_write(&image, "mknod blockdev b 259 65000");
        debugfs_write(&image, "fallocate /prealloc 0 3");
        debugfs_write(&image, "sif /prealloc size 4096");
        Some(Fixture { _dir: dir, src, image })
    }

    fn open(&self) -> Ext4 {
        Ext4::open(Arc::new(MemVolume(fs::read(&self.image).unwrap()))).unwrap()
    }
}

fn kind_of(meta: &fs::Metadata) -> FileKind {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        FileKind::Directory
    } else if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_fifo() {
        FileKind::Fifo
    } else if t.is_socket() {
        FileKind::Socket
    } else if t.is_char_device() {
        FileKind::CharDevice
    } else if t.is_block_device() {
        FileKind::BlockDevice
    } else {
        FileKind::Regular
    }
}

fn read_whole(fs: &Ext4, ino: u64) -> Vec<u8> {
    let map = fs.file_map(ino).unwrap();
    let mut out = vec![0xAAu8; usize::try_from(map.size()).unwrap() + 100];
    let n = map.read_at(fs, 0, &mut out).unwrap();
    assert_eq!(n as u64, map.size(), "inode {ino}: a read from 0 stops at the size");
    out.truncate(n);
    out
}

/// Compares inode `ino` with `path`, recursively for directories.
fn compare(fs: &Ext4, ino: u64, path: &Path, parent: u64, is_root: bool, rng: &mut Rng, seen: &mut usize) {
    *seen += 1;
    let inode = fs.inode(ino).unwrap();
    let meta = fs::symlink_metadata(path).unwrap();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let kind = kind_of(&meta);
    assert_eq!(inode.kind(), kind, "{}", path.display());
    assert_eq!(u32::from(inode.mode()), meta.mode(), "{}", path.display());
    assert_eq!(inode.permissions(), (meta.mode() & 0o7777) as u16);
    if name != "small.txt" && name != "hard-link" {
        assert_eq!((inode.uid(), inode.gid()), (meta.uid(), meta.gid()), "{}", path.display());
    }
    // debugfs changed these (the root gets the devices).
    if !is_root && name != "small.txt" && name != "hard-link" && name != "random.bin" {
        assert_eq!(inode.mtime().seconds(), meta.mtime(), "{}", path.display());
    }
    assert_eq!(inode.device(), None);
    match kind {
        // Checked in check_image: debugfs changed it.
        FileKind::Regular if name == "prealloc" => {}
        FileKind::Regular => {
            assert_eq!(inode.size(), meta.len(), "{}", path.display());
            assert_eq!(u64::from(inode.links()), meta.nlink(), "{}", path.display());
            let expected = fs::read(path).unwrap();
            let whole = read_whole(fs, ino);
            assert!(whole == expected, "{}: contents differ", path.display());
            // Random ranges, some across the end.
            let map = fs.file_map(ino).unwrap();
            for _ in 0..20 {
                let offset = rng.below(map.size() + 10);
                let len = rng.below(300_000) as usize;
                let mut buf = vec![0x55u8; len];
                let n = map.read_at(fs, offset, &mut buf).unwrap();
                let start = (offset as usize).min(expected.len());
                let end = (start + len).min(expected.len());
                assert_eq!(n, end - start, "{} at {offset}+{len}", path.display());
                assert!(buf[..n] == expected[start..end], "{} at {offset}+{len}", path.display());
            }
            let mut buf = [0u8; 16];
            assert_eq!(map.read_at(fs, map.size(), &mut buf).unwrap(), 0);
        }
        FileKind::Symlink => {
            assert_eq!(inode.size(), meta.len());
            let target = fs::read_link(path).unwrap();
            assert_eq!(fs.read_link(ino).unwrap(), target.as_os_str().as_bytes(), "{}", path.display());
        }
        FileKind::Directory => {
            let entries = fs.read_dir(ino).unwrap();
            let mut on_image: BTreeMap<Vec<u8>, (u64, FileKind)> = BTreeMap::new();
            for entry in &entries {
                assert!(on_image.insert(entry.name.clone(), (entry.ino, entry.kind)).is_none(), "duplicate name");
            }
            assert_eq!(on_image.remove(b".".as_slice()).map(|e| e.0), Some(ino));
            assert_eq!(on_image.remove(b"..".as_slice()).map(|e| e.0), Some(parent));
            if is_root {
                assert_eq!(on_image.remove(b"lost+found".as_slice()).map(|e| e.1), Some(FileKind::Directory));
                // Made by debugfs, not in the source tree.
                assert_eq!(on_image.remove(b"chardev".as_slice()).map(|e| e.1), Some(FileKind::CharDevice));
                assert_eq!(on_image.remove(b"blockdev".as_slice()).map(|e| e.1), Some(FileKind::BlockDevice));
            }
            let mut subdirs = 0u64;
            let mut on_disk = Vec::new();
            for child in fs::read_dir(path).unwrap() {
                let child = child.unwrap();
                let child_meta = fs::symlink_metadata(child.path()).unwrap();
                if child_meta.is_dir() {
                    subdirs += 1;
                }
                on_disk.push(child.file_name().as_bytes().to_vec());
            }
            on_disk.sort();
            assert_eq!(on_image.keys().cloned().collect::<Vec<_>>(), on_disk, "{}", path.display());
            // ext4 counts "." and each subdirectory's "..", plus lost+found.
            assert_eq!(u64::from(inode.links()), 2 + subdirs + u64::from(is_root), "{}", path.display());
            for (child_name, (child_ino, child_kind)) in &on_image {
                assert_eq!(fs.lookup(ino, child_name).unwrap(), Some(*child_ino));
                let child_path = path.join(std::ffi::OsStr::from_bytes(child_name));
                assert_eq!(*child_kind, kind_of(&fs::symlink_metadata(&child_path).unwrap()));
                compare(fs, *child_ino, &child_path, ino, false, rng, seen);
            }
            assert_eq!(fs.lookup(ino, b"no such name").unwrap(), None);
        }
        FileKind::Fifo | FileKind::Socket => {
            assert!(matches!(fs.file_map(ino), Err(Ext4Error::NoData { .. })));
        }
        FileKind::CharDevice | FileKind::BlockDevice => unreachable!("the source tree has no devices"),
    }
}

/// Everything a variant checks; `extents` says whether files are
/// extent-mapped (ext4) or block-mapped (ext3).
fn check_image(fixture: &Fixture, block_size: u32, extents: bool) {
    let fs = fixture.open();
    assert_eq!(fs.block_size(), block_size);
    let root = fs.inode(ROOT).unwrap();
    assert_eq!(root.kind(), FileKind::Directory);
    let mut seen = 0;
    compare(&fs, ROOT, &fixture.src, ROOT, true, &mut Rng(7), &mut seen);
    assert!(seen > BIG_DIR_ENTRIES + 20, "walked only {seen} inodes");

    let small = fs.lookup(ROOT, b"small.txt").unwrap().unwrap();
    assert_eq!(fs.lookup(ROOT, b"hard-link").unwrap(), Some(small));
    let small = fs.inode(small).unwrap();
    assert_eq!((small.uid(), small.gid()), (100_000, 200_001), "the high 16 bits of the owner");
    assert_eq!(small.links(), 2);
    // Inodes of 128 bytes (ext3's default on small filesystems) have no
    // nanoseconds.
    let extra_fields = debugfs_stat(&fixture.image, "/small.txt").contains("Size of extra inode fields");
    let nanos = if extra_fields { 123_456_789 } else { 0 };
    assert_eq!((small.mtime().seconds(), small.mtime().nanoseconds()), (1_234_567_890, nanos));
    assert_eq!(small.mtime().to_system_time(), UNIX_EPOCH + Duration::new(1_234_567_890, nanos));
    assert!(small.ctime().to_system_time() > SystemTime::now() - Duration::from_secs(3600));

    let random = fs.inode(fs.lookup(ROOT, b"random.bin").unwrap().unwrap()).unwrap();
    let epoch = if extra_fields { 1 << 32 } else { 0 };
    assert_eq!(random.mtime().seconds(), 1_700_000_000 + epoch, "seconds past 2038 need the epoch bits");
    assert!(random.blocks() >= random.size() / 512);

    let chardev = fs.inode(fs.lookup(ROOT, b"chardev").unwrap().unwrap()).unwrap();
    assert_eq!(chardev.device(), Some(Device { major: 4, minor: 64 }));
    assert_eq!(chardev.device().unwrap().to_rdev(), (4 << 8) | 64);
    let blockdev = fs.inode(fs.lookup(ROOT, b"blockdev").unwrap().unwrap()).unwrap();
    assert_eq!(blockdev.kind(), FileKind::BlockDevice);
    assert_eq!(blockdev.device(), Some(Device { major: 259, minor: 65000 }));

    let big = fs.inode(fs.lookup(ROOT, b"big").unwrap().unwrap()).unwrap();
    assert!(big.has_hash_index(), "e2fsck -D must have indexed the 3000-entry directory");
    assert_eq!(fs.read_dir(big.ino()).unwrap().len(), BIG_DIR_ENTRIES + 2);

    // The fragmented file: one extent per piece, in a tree below the inode.
    let fragmented = fs.lookup(ROOT, b"fragmented").unwrap().unwrap();
    let map = fs.file_map(fragmented).unwrap();
    let piece_blocks = PIECE as u64 / u64::from(block_size);
    let stride = (HOLE + PIECE as u64) / u64::from(block_size);
    if extents {
        assert!(map.extent_tree_depth().unwrap() >= 1, "40 extents need a tree below the inode");
        assert!(fs.inode(fragmented).unwrap().uses_extents());
    } else {
        assert_eq!(map.extent_tree_depth(), None);
    }
    // One extent per piece, unless the allocator split a piece around a
    // metadata block (it does with 1 KiB blocks).
    assert!(map.extents().len() as u64 >= PIECES, "{:?}", map.extents());
    let mut per_piece = vec![0u64; PIECES as usize];
    for extent in map.extents() {
        let piece = extent.logical_block / stride;
        assert!(extent.logical_block + extent.blocks <= piece * stride + piece_blocks, "{extent:?} spans a hole");
        assert!(extent.initialized);
        per_piece[piece as usize] += extent.blocks;
    }
    assert_eq!(per_piece, vec![piece_blocks; PIECES as usize]);
    let first = map.extents()[0];
    assert_eq!(map.run_at(0), Some(Run::Data { physical_block: first.physical_block, blocks: first.blocks }));
    assert_eq!(map.run_at(piece_blocks), Some(Run::Zeros { blocks: stride - piece_blocks }));
    let file_blocks = map.size().div_ceil(u64::from(block_size));
    assert_eq!(map.run_at(file_blocks), None);
    assert!(matches!(map.run_at(file_blocks - 1), Some(Run::Data { blocks: 1, .. })));

    // The sparse file kept its holes, which read as zeros.
    let sparse = fs.lookup(ROOT, b"sparse").unwrap().unwrap();
    let map = fs.file_map(sparse).unwrap();
    let mapped: u64 = map.extents().iter().map(|e| e.blocks).sum();
    assert_eq!(mapped * u64::from(block_size), 8192 + 12288, "{:?}", map.extents());
    assert_eq!(map.size(), 8 << 20);
    let hole_block = (1 << 20) / u64::from(block_size);
    assert!(matches!(map.run_at(hole_block), Some(Run::Zeros { .. })));
    let mut buf = vec![0xFFu8; 1 << 20];
    assert_eq!(map.read_at(&fs, 7 << 20, &mut buf).unwrap(), 1 << 20);
    assert!(buf.iter().all(|b| *b == 0), "the trailing hole reads as zeros");

    // Preallocated blocks read as zeros.
    let prealloc = fs.lookup(ROOT, b"prealloc").unwrap().unwrap();
    let map = fs.file_map(prealloc).unwrap();
    assert_eq!(map.size(), 4096);
    if extents {
        assert_eq!(map.extents().len(), 1, "{:?}", map.extents());
        assert!(!map.extents()[0].initialized, "debugfs fallocate makes unwritten extents");
        assert_eq!(map.run_at(0), Some(Run::Zeros { blocks: 4096 / u64::from(block_size) }));
    }
    let mut buf = vec![0xFFu8; 8192];
    assert_eq!(map.read_at(&fs, 0, &mut buf).unwrap(), 4096);
    assert!(buf[..4096].iter().all(|b| *b == 0));

    // Typed errors for the wrong kind or number.
    let fifo = fs.lookup(ROOT, b"fifo").unwrap().unwrap();
    assert!(matches!(fs.read_dir(small.ino()), Err(Ext4Error::NotADirectory { kind: FileKind::Regular, .. })));
    assert!(matches!(fs.lookup(fifo, b"x"), Err(Ext4Error::NotADirectory { kind: FileKind::Fifo, .. })));
    assert!(matches!(fs.read_link(small.ino()), Err(Ext4Error::NotASymlink { .. })));
    assert!(matches!(fs.file_map(chardev.ino()), Err(Ext4Error::NoData { .. })));
    let short_link = fs.lookup(ROOT, b"short-link").unwrap().unwrap();
    assert!(matches!(fs.file_map(short_link), Err(Ext4Error::NoData { kind: FileKind::Symlink, .. })));
    let count = fs.statfs().inodes;
    assert!(matches!(fs.inode(0), Err(Ext4Error::InodeOutOfRange { ino: 0, .. })));
    assert!(matches!(fs.inode(u64::from(count) + 1), Err(Ext4Error::InodeOutOfRange { .. })));
    assert!(fs.statfs().free_blocks < fs.statfs().blocks);
}

#[test]
fn ext4_default_features() {
    let Some(fixture) = Fixture::new(&["-b", "4096"], "96M") else { return };
    let features =
        Command::new(tool("dumpe2fs").unwrap()).args(["-h", fixture.image.to_str().unwrap()]).output().unwrap();
    let features = String::from_utf8_lossy(&features.stdout);
    for feature in
        ["metadata_csum", "64bit", "extent", "flex_bg", "huge_file", "dir_nlink", "extra_isize", "has_journal"]
    {
        assert!(features.contains(feature), "mkfs.ext4 default {feature} missing: {features}");
    }
    check_image(&fixture, 4096, true);
}

#[test]
fn ext4_without_metadata_csum_and_64bit() {
    let Some(fixture) = Fixture::new(&["-b", "4096", "-O", "^metadata_csum,^64bit"], "96M") else { return };
    check_image(&fixture, 4096, true);
}

#[test]
fn ext4_block_size_1024() {
    let Some(fixture) = Fixture::new(&["-b", "1024"], "96M") else { return };
    check_image(&fixture, 1024, true);
}

#[test]
fn ext4_reads_ext3_block_maps() {
    let Some(fixture) = Fixture::new(&["-t", "ext3", "-b", "4096"], "96M") else { return };
    let fs = fixture.open();
    let random = fs.lookup(ROOT, b"random.bin").unwrap().unwrap();
    assert!(!fs.inode(random).unwrap().uses_extents());
    check_image(&fixture, 4096, false);
}

#[test]
fn ext4_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Ext4>();
    shared::<FileMap>();
}

#[test]
fn ext4_timestamp_and_device_encodings() {
    assert_eq!(Timestamp::decode(u32::MAX, None).seconds(), -1, "the base is signed");
    let late = Timestamp::decode(0x3a7b_8372, Some((5 << 2) | 1));
    assert_eq!((late.seconds(), late.nanoseconds()), (0x3a7b_8372 + (1 << 32), 5));
    assert_eq!(Timestamp::decode(0, Some(u32::MAX)).nanoseconds(), 999_999_999);
    assert_eq!(Timestamp::decode(u32::MAX, Some(0)).to_system_time(), UNIX_EPOCH - Duration::from_secs(1));
    assert_eq!(Device { major: 259, minor: 65000 }.to_rdev(), (65000 & 0xff) | (259 << 8) | ((65000 & !0xff) << 12));
}

fn image_bytes(mkfs_args: &[&str], size: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    let mkfs = tool("mkfs.ext4").or_else(|| {
        eprintln!("skipped: mkfs.ext4 (e2fsprogs) is not installed");
        None
    })?;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir(&src).unwrap();
    fs::write(src.join("file"), b"data").unwrap();
    let image = dir.path().join("image");
    let mut args = vec!["-q", "-F", "-d", src.to_str().unwrap()];
    args.extend_from_slice(mkfs_args);
    args.extend_from_slice(&[image.to_str().unwrap(), size]);
    run(&mkfs, &args, &[0]);
    Some((dir, image))
}

fn open_file(image: &Path) -> Result<Ext4, Ext4Error> {
    Ext4::open(Arc::new(MemVolume(fs::read(image).unwrap())))
}

#[test]
fn ext4_refuses_what_it_does_not_implement() {
    for (feature, name) in
        [("inline_data", "inline_data"), ("encrypt", "encrypt"), ("casefold", "casefold"), ("mmp", "mmp")]
    {
        let Some((_dir, image)) = image_bytes(&["-O", feature], "8M") else { return };
        let err = open_file(&image).unwrap_err();
        assert!(
            matches!(&err, Ext4Error::Unsupported { feature, .. } if feature.starts_with(name)),
            "{feature}: {err}"
        );
    }
    let Some((_dir, image)) = image_bytes(&[], "8M") else { return };
    debugfs_write(&image, "feature needs_recovery");
    let err = open_file(&image).unwrap_err();
    assert!(matches!(err, Ext4Error::NeedsRecovery));
    assert!(err.to_string().contains("not unmounted cleanly"), "{err}");
    assert!(err.to_string().contains("mount the image read-write once"), "{err}");
}

#[test]
fn ext4_refuses_what_is_not_ext4() {
    let err = Ext4::open(Arc::new(MemVolume(vec![0; 1 << 20]))).unwrap_err();
    assert!(matches!(err, Ext4Error::NotExt4 { found: 0 }), "{err}");
    let err = Ext4::open(Arc::new(MemVolume(vec![0; 100]))).unwrap_err();
    assert!(matches!(err, Ext4Error::NotExt4 { .. }), "{err}");
    let Some((_dir, image)) = image_bytes(&[], "8M") else { return };
    let mut bytes = fs::read(&image).unwrap();
    bytes.truncate(4 << 20);
    let err = Ext4::open(Arc::new(MemVolume(bytes))).unwrap_err();
    assert!(matches!(err, Ext4Error::Truncated { volume: 4194304, filesystem: 8388608 }), "{err}");
}

/// The physical block of the first index entry's child, from i_block.
fn first_tree_block(inode: &Inode) -> u64 {
    let r = Raw::new(&inode.i_block, "test");
    assert!(r.u16(6).unwrap() >= 1, "a tree with an index level");
    u64::from(r.u32(16).unwrap()) | (u64::from(r.u16(20).unwrap()) << 32)
}

#[test]
fn ext4_tampered_extent_trees_fail() {
    let Some(fixture) = Fixture::new(&["-b", "4096"], "96M") else { return };
    let pristine = fs::read(&fixture.image).unwrap();
    let fs = fixture.open();
    let ino = fs.lookup(ROOT, b"fragmented").unwrap().unwrap();
    let inode = fs.inode(ino).unwrap();
    let leaf = usize::try_from(first_tree_block(&inode) * 4096).unwrap();
    let open = |bytes: Vec<u8>| Ext4::open(Arc::new(MemVolume(bytes))).unwrap();

    let expect_corrupt = |bytes: Vec<u8>, why: &str| {
        let fs = open(bytes);
        let err = fs.file_map(ino).unwrap_err();
        assert!(matches!(err, Ext4Error::Corrupt { .. }), "{why}: {err}");
        assert!(err.to_string().contains(&format!("inode {ino}")), "{why}: {err}");
    };
    // Bad magic.
    let mut bytes = pristine.clone();
    bytes[leaf] ^= 1;
    expect_corrupt(bytes, "magic");
    // A leaf that claims to be an index pointing at itself: the depth must
    // decrease, so this cannot loop.
    let mut bytes = pristine.clone();
    bytes[leaf + 6..leaf + 8].copy_from_slice(&1u16.to_le_bytes());
    let self_block = u32::try_from(leaf / 4096).unwrap();
    bytes[leaf + 16..leaf + 20].copy_from_slice(&self_block.to_le_bytes());
    expect_corrupt(bytes, "self-reference");
    // Two extents swapped: out of order.
    let mut bytes = pristine.clone();
    let (first, second) = (leaf + 12, leaf + 24);
    let a = bytes[first..first + 12].to_vec();
    let b = bytes[second..second + 12].to_vec();
    bytes[first..first + 12].copy_from_slice(&b);
    bytes[second..second + 12].copy_from_slice(&a);
    expect_corrupt(bytes, "order");
    // An extent past the filesystem's end.
    let mut bytes = pristine.clone();
    bytes[leaf + 20..leaf + 24].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_corrupt(bytes, "past the end");
    // More entries than the header allows.
    let mut bytes = pristine.clone();
    bytes[leaf + 2..leaf + 4].copy_from_slice(&1000u16.to_le_bytes());
    expect_corrupt(bytes, "entries");
    // Two extents on one physical block.
    let mut bytes = pristine.clone();
    let start = bytes[leaf + 20..leaf + 24].to_vec();
    bytes[leaf + 32..leaf + 36].copy_from_slice(&start);
    expect_corrupt(bytes, "shared block");

    // A directory entry whose record length runs past its block.
    let big = fs.lookup(ROOT, b"a").unwrap().unwrap();
    let map = fs.file_map(big).unwrap();
    let block = usize::try_from(map.extents()[0].physical_block * 4096).unwrap();
    let mut bytes = pristine.clone();
    // "." is first: 12 bytes; give it a record length of 8000.
    bytes[block + 4..block + 6].copy_from_slice(&8000u16.to_le_bytes());
    let err = open(bytes).read_dir(big).unwrap_err();
    assert!(err.to_string().contains("record length 8000"), "{err}");
    // A name with a slash.
    let mut bytes = pristine;
    bytes[block + 8] = b'/';
    let err = open(bytes).read_dir(big).unwrap_err();
    assert!(err.to_string().contains("'/'"), "{err}");
}

/// Walks the whole tree from the root, with bounds on entries, depth and
/// bytes read, reading every file and symlink; errors are fine, panics and
/// hangs are not.
fn walk_bounded(fs: &Ext4) -> usize {
    let mut visited = HashSet::new();
    let mut stack = vec![(ROOT, 0u32)];
    let mut entries = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    while let Some((dir, depth)) = stack.pop() {
        if !visited.insert(dir) || depth > 32 {
            continue;
        }
        let Ok(list) = fs.read_dir(dir) else { continue };
        for entry in list {
            entries += 1;
            if entries > 20_000 {
                return entries;
            }
            if entry.name == b"." || entry.name == b".." {
                continue;
            }
            if entries % 64 == 0 {
                let _ = fs.lookup(dir, &entry.name);
            }
            let Ok(inode) = fs.inode(entry.ino) else { continue };
            match inode.kind() {
                FileKind::Directory => stack.push((entry.ino, depth + 1)),
                FileKind::Symlink => {
                    let _ = fs.read_link(entry.ino);
                }
                _ => {
                    if let Ok(map) = fs.file_map(entry.ino) {
                        let mut offset = 0u64;
                        while offset < map.size().min(8 << 20) {
                            match map.read_at(fs, offset, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => offset += n as u64,
                            }
                        }
                        for block in [0, 1, map.size() / u64::from(map.block_size()), u64::MAX] {
                            let _ = map.run_at(block);
                        }
                    }
                }
            }
        }
    }
    entries
}

/// Seeded random byte mutations in the metadata (superblock, group
/// descriptors, inode table, directory and extent blocks) of a real image:
/// whatever the result, no panic and no hang.
#[test]
fn ext4_survives_metadata_mutations() {
    let Some(fixture) = Fixture::new(&["-b", "4096"], "96M") else { return };
    let pristine = fs::read(&fixture.image).unwrap();
    let fs = fixture.open();
    let mut metadata: Vec<(u64, u64)> = vec![(1024, 2048), (4096, 8192)];
    let table = fs.groups[0].inode_table * 4096;
    let used = u64::from(fs.sb.inodes_per_group - fs.groups[0].itable_unused) * u64::from(fs.sb.inode_size);
    metadata.push((table, table + used.max(4096)));
    let mut dirs = vec![ROOT];
    while let Some(dir) = dirs.pop() {
        for extent in fs.file_map(dir).unwrap().extents() {
            let start = extent.physical_block * 4096;
            metadata.push((start, start + extent.blocks * 4096));
        }
        for entry in fs.read_dir(dir).unwrap() {
            if entry.kind == FileKind::Directory && entry.name != b"." && entry.name != b".." {
                dirs.push(entry.ino);
            }
        }
    }
    let fragmented = fs.inode(fs.lookup(ROOT, b"fragmented").unwrap().unwrap()).unwrap();
    let tree = first_tree_block(&fragmented) * 4096;
    metadata.push((tree, tree + 4096));
    assert!(walk_bounded(&fs) > BIG_DIR_ENTRIES);

    let base = Arc::new(pristine);
    let mut rng = Rng(0xBAD_5EED);
    let mut mutations = 0;
    let mut opened = 0;
    let mut cut_short = 0;
    for _round in 0..300 {
        let mut patches = BTreeMap::new();
        for _ in 0..1 + rng.below(20) {
            let (start, end) = metadata[rng.below(metadata.len() as u64) as usize];
            let at = start + rng.below(end - start);
            let old = patches.get(&at).copied().unwrap_or(base[at as usize]);
            let new = match rng.below(3) {
                0 => old ^ (1 << rng.below(8)),
                1 => rng.next() as u8,
                _ => [0, 0xFF, 0x80, 1][rng.below(4) as usize],
            };
            patches.insert(at, new);
            mutations += 1;
        }
        if let Ok(fs) = Ext4::open(Arc::new(Patched { base: base.clone(), patches })) {
            opened += 1;
            if walk_bounded(&fs) < BIG_DIR_ENTRIES {
                cut_short += 1;
            }
            for _ in 0..50 {
                let _ = fs.inode(1 + rng.below(u64::from(fs.statfs().inodes)));
            }
        }
    }
    assert!(mutations >= 3000, "{mutations} mutations");
    assert!(cut_short > 50, "only {cut_short} walks ended early: the mutations miss the directories");
    assert!(
        opened > 100,
        "only {opened} mutated images opened: the mutations miss the structures behind the superblock"
    );
}

/// An image with a few bytes changed, without copying it.
struct Patched {
    base: Arc<Vec<u8>>,
    patches: BTreeMap<u64, u8>,
}

impl Volume for Patched {
    fn size(&self) -> u64 {
        self.base.len() as u64
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        let n = MemVolume::read_from(&self.base, offset, buf);
        for (at, byte) in self.patches.range(offset..offset + n as u64) {
            buf[(at - offset) as usize] = *byte;
        }
        Ok(n)
    }
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), Error> {
        Err(Error::ReadOnly)
    }
    fn commit(&self) -> Result<(), Error> {
        Ok(())
    }
}
