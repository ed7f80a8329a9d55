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
