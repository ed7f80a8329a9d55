//! Images as filesystems on this host: formatted with `mkfs.ext4 -d` through
//! the FUSE device, mounted through a loop device, read back byte for byte;
//! and a block tampered with between mounts fails the read that reaches it
//! with EIO instead of returning anything.
//!
//! Needs root, /dev/fuse, /dev/loop-control and mkfs.ext4; skipped without
//! them, failed instead under `CAPSA_REQUIRE_TOOLS=1`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::path::Path;
use std::sync::Arc;

use capsa_encfs::mount::{Device, Mounted, format_ext4};
use capsa_encfs::{BLOCK_SIZE, Image, LocalStore, MasterKey, OpenOptions, Store};

fn can_mount() -> bool {
    let ok = rustix::process::geteuid().is_root()
        && Path::new("/dev/fuse").exists()
        && Path::new("/dev/loop-control").exists()
        && capsa_testkit::have("mkfs.ext4");
    if !ok {
        assert!(std::env::var_os("CAPSA_REQUIRE_TOOLS").is_none(), "mount tests need root, /dev/fuse and loop devices");
        eprintln!("SKIPPED: not root, or no /dev/fuse or /dev/loop-control");
    }
    ok
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i / BLOCK_SIZE) as u8).wrapping_mul(13) ^ (i as u8)).collect()
}

fn key() -> MasterKey {
    MasterKey::from_bytes(&[0x11; 32]).unwrap()
}

/// An image of a tree with a 2 MiB file, made as `capsa encfs create` does.
fn image_of_tree(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("sub/big.bin"), pattern(2 << 20)).unwrap();
    std::fs::write(tree.join("small.txt"), b"small\n").unwrap();
    let images = dir.join("image");
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(&images).unwrap());
    let image = Arc::new(Image::create(store, &key(), 32 << 20, 256, OpenOptions::default()).unwrap());
    let device = Device::serve(image, &dir.join("run")).unwrap();
    format_ext4(&device, &tree, "test").unwrap();
    device.close().unwrap();
    images
}

fn mount(dir: &Path, images: &Path, read_only: bool) -> Mounted {
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(images));
    let image = Image::open(store, &key(), OpenOptions { read_only, ..OpenOptions::default() }).unwrap();
    let target = dir.join("mnt");
    std::fs::create_dir_all(&target).unwrap();
    Mounted::mount(Arc::new(image), &target, &dir.join("run")).unwrap()
}

#[test]
fn a_tree_round_trips_through_an_image() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = image_of_tree(dir.path());
    let mounted = mount(dir.path(), &images, false);
    assert_eq!(std::fs::read(mounted.target().join("sub/big.bin")).unwrap(), pattern(2 << 20));
    assert_eq!(std::fs::read(mounted.target().join("small.txt")).unwrap(), b"small\n");
    std::fs::write(mounted.target().join("new.txt"), b"written in the mount\n").unwrap();
    mounted.unmount().unwrap();

    let mounted = mount(dir.path(), &images, true);
    assert_eq!(std::fs::read(mounted.target().join("new.txt")).unwrap(), b"written in the mount\n");
    let refused = std::fs::write(mounted.target().join("other.txt"), b"x").unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(30), "EROFS: {refused}");
    mounted.unmount().unwrap();
}

#[test]
fn a_tampered_block_is_an_io_error_not_data() {
    if !can_mount() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = image_of_tree(dir.path());

    // Find a block of the big file in the decrypted image, then flip a byte
    // of its ciphertext in its chunk object.
    let store: Arc<dyn Store> = Arc::new(LocalStore::open(&images));
    let image = Image::open(store, &key(), OpenOptions { read_only: true, ..OpenOptions::default() }).unwrap();
    let wanted = &pattern(2 << 20)[100 * BLOCK_SIZE..101 * BLOCK_SIZE];
    let mut block = vec![0u8; BLOCK_SIZE];
    let index = (0..image.geometry().block_count)
        .find(|b| {
            image.read_at(b * BLOCK_SIZE as u64, &mut block).unwrap();
            block == wanted
        })
        .expect("the file's block 100 is in the image");
    drop(image);
    let chunk = index / 256;
    let object = std::fs::read_dir(images.join("chunks"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&format!("{chunk:08x}-")))
        .unwrap();
    let mut bytes = std::fs::read(&object).unwrap();
    let at = 8192 + (index % 256) as usize * BLOCK_SIZE + 77;
    bytes[at] ^= 0x40;
    std::fs::write(&object, bytes).unwrap();

    let mounted = mount(dir.path(), &images, true);
    let error = std::fs::read(mounted.target().join("sub/big.bin")).unwrap_err();
    assert_eq!(error.raw_os_error(), Some(5), "EIO, not data: {error}");
    assert_eq!(std::fs::read(mounted.target().join("small.txt")).unwrap(), b"small\n", "other files still read");
    mounted.unmount().unwrap();
}

/// Everything `stat` and `read` show of a tree, path by path: what two
/// mounts of one image must agree on.
fn survey(root: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
        names.sort();
        for path in names {
            let m = std::fs::symlink_metadata(&path).unwrap();
            let what = if m.file_type().is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                pending.push(path.clone());
                "dir".into()
            } else if m.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                format!("{} bytes, sum {}", bytes.len(), bytes.iter().map(|&b| u64::from(b)).sum::<u64>())
            } else {
                format!("rdev {}", m.rdev())
            };
            seen.push(format!(
                "{} mode {:o} uid {} gid {} nlink {} size {} mtime {}.{} ino {} {what}",
                path.strip_prefix(root).unwrap().display(),
                m.mode(),
                m.uid(),
                m.gid(),
                m.nlink(),
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ino(),
            ));
        }
    }
    seen
}

#[test]
fn read_only_files_served_by_capsa_match_the_kernels_ext4() {
    if !can_mount() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("many")).unwrap();
    for i in 0..1500 {
        std::fs::write(tree.join("many").join(format!("entry-{i:04}")), format!("{i}\n")).unwrap();
    }
    std::fs::write(tree.join("big.bin"), pattern(3 << 20)).unwrap();
    let sparse = std::fs::File::create(tree.join("sparse")).unwrap();
    for i in 0..40u64 {
        std::os::unix::fs::FileExt::write_all_at(&sparse, &[i as u8 + 1; 4096], i * (1 << 20)).unwrap();
    }
    drop(sparse);
    std::fs::write(tree.join("setuid"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(tree.join("setuid"), std::fs::Permissions::from_mode(0o4750)).unwrap();
    std::os::unix::fs::chown(tree.join("setuid"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::symlink("big.bin", tree.join("short-link")).unwrap();
    std::os::unix::fs::symlink("a/".repeat(60) + "target", tree.join("long-link")).unwrap();
    std::fs::hard_link(tree.join("big.bin"), tree.join("many/hard-link")).unwrap();
    std::fs::write(tree.join("naïve ☃"), b"unicode\n").unwrap();

    let images = dir.path().join("image");
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(&images).unwrap());
    let image = Arc::new(Image::create(store, &key(), 96 << 20, 256, OpenOptions::default()).unwrap());
    let device = Device::serve(image, &dir.path().join("run")).unwrap();
    format_ext4(&device, &tree, "test").unwrap();
    device.close().unwrap();

    let open = || {
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(&images));
        Arc::new(Image::open(store, &key(), OpenOptions { read_only: true, ..OpenOptions::default() }).unwrap())
    };
    let target = dir.path().join("mnt");
    std::fs::create_dir_all(&target).unwrap();
    let files = Mounted::mount(open(), &target, &dir.path().join("run")).unwrap();
    assert!(files.loop_device().is_none(), "a read-only image is served by capsa's reader");
    let dev = rustix::fs::stat(&target).unwrap().st_dev;
    let readahead = format!("/sys/class/bdi/{}:{}/read_ahead_kb", rustix::fs::major(dev), rustix::fs::minor(dev));
    assert_eq!(std::fs::read_to_string(readahead).unwrap().trim(), "1024", "streamed reads come in 1 MiB requests");
    let served = survey(&target);
    assert_eq!(std::fs::read(target.join("big.bin")).unwrap(), pattern(3 << 20));
    let mut sparse = vec![0u8; 40 << 20];
    for i in 0..40usize {
        sparse[i << 20..(i << 20) + 4096].fill(i as u8 + 1);
    }
    assert!(std::fs::read(target.join("sparse")).unwrap()[..] == sparse[..(39 << 20) + 4096], "holes read as zeros");
    let refused = std::fs::OpenOptions::new().write(true).open(target.join("big.bin")).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(30), "EROFS: {refused}");
    files.unmount().unwrap();

    let kernel = Mounted::mount_through_kernel(open(), &target, &dir.path().join("run")).unwrap();
    assert!(kernel.loop_device().is_some());
    let through_kernel = survey(&target);
    kernel.unmount().unwrap();

    assert_eq!(served.len(), through_kernel.len());
    for (ours, theirs) in served.iter().zip(&through_kernel) {
        assert_eq!(ours, theirs);
    }
    assert!(served.len() > 1500, "the survey saw the tree: {} entries", served.len());
}
