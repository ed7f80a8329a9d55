//! A LUKS2 image made by Azure's encfs recipe (real cryptsetup, dm-crypt and
//! mkfs.ext4 in a QEMU guest: tests/fixtures/PROVENANCE.md), mounted
//! read-only through capsa's FUSE device and loop device, from a local file
//! and from a blob in Azurite; every file must be what
//! scripts/make-luks-fixture wrote, byte for byte.
//!
//! Mounting needs root, /dev/fuse and /dev/loop-control: without them the
//! tests skip (loudly), or fail under CAPSA_REQUIRE_TOOLS.

use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::digest::{SHA256, digest};
use capsa_encfs::luks::LuksLocation;
use capsa_encfs::mount::Mounted;
use capsa_encfs::remote::Config;
use capsa_encfs::{LocalStore, LuksError, LuksVolume, Store, Volume};
use capsa_testkit::Azurite;

const IMAGE_ZST: &[u8] = include_bytes!("fixtures/luks2-azure.img.zst");
const KEY: &[u8] = include_bytes!("fixtures/luks2-azure.key");

/// `random.bin` as the script makes it: SHA-256("capsa-luks-fixture" ||
/// u32 BE i) for i = 0, 1, ..., cut to 300 KiB.
fn random_bin() -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0u32..9600 {
        let mut input = b"capsa-luks-fixture".to_vec();
        input.extend_from_slice(&i.to_be_bytes());
        out.extend_from_slice(digest(&SHA256, &input).as_ref());
    }
    out.truncate(307_200);
    out
}

/// Every regular file under `root`, relative, sorted.
fn files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                pending.push(entry.path());
            } else {
                found.push(entry.path().strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    found.sort();
    found
}

fn can_mount() -> bool {
    let missing = if !rustix::process::geteuid().is_root() {
        Some("root")
    } else if !Path::new("/dev/fuse").exists() {
        Some("/dev/fuse")
    } else if !Path::new("/dev/loop-control").exists() {
        Some("/dev/loop-control")
    } else {
        None
    };
    match missing {
        None => true,
        Some(what) if std::env::var_os("CAPSA_REQUIRE_TOOLS").is_some() => {
            panic!("mounting needs {what} (CAPSA_REQUIRE_TOOLS is set)")
        }
        Some(what) => {
            eprintln!("SKIPPED: mounting needs {what}");
            false
        }
    }
}

/// Mounts `volume` and checks the tree against what the script wrote.
fn mount_and_compare(volume: LuksVolume) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("mnt");
    std::fs::create_dir(&target).unwrap();
    let mounted = Mounted::mount(Arc::new(volume), &target, &dir.path().join("work")).unwrap();

    assert_eq!(files(&target), vec!["nested/deeper/note.txt", "random.bin", "test.txt"]);
    assert_eq!(
        std::fs::read(target.join("test.txt")).unwrap(),
        b"Hello from a LUKS2 image made the Azure encfs way.\n"
    );
    assert_eq!(std::fs::read(target.join("nested/deeper/note.txt")).unwrap(), b"a file two directories down\n");
    let random = std::fs::read(target.join("random.bin")).unwrap();
    assert_eq!(random.len(), 307_200);
    assert!(random == random_bin(), "random.bin differs from what the script wrote");
    assert!(target.join("lost+found").is_dir(), "mkfs.ext4's own directory");

    // Read-only all the way down.
    let err = std::fs::write(target.join("new.txt"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    mounted.unmount().unwrap();
}

#[test]
fn the_azure_fixture_mounts_read_only_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("encfs.img");
    std::fs::write(&image, zstd::decode_all(IMAGE_ZST).unwrap()).unwrap();

    // As `capsa encfs mount` finds it: a single file that starts with the magic.
    let location = LuksLocation::detect(image.to_str().unwrap()).expect("detected as LUKS");
    assert_eq!(location.size, Some(64 << 20));
    let err = LuksVolume::open(location.store.clone(), &location.object, b"not the key", location.size).err().unwrap();
    assert!(matches!(err, LuksError::WrongKey { tried: 1, skipped: 0 }), "{err}");
    let volume = LuksVolume::open(location.store, &location.object, KEY, location.size).unwrap();
    assert_eq!(volume.size(), 48 << 20);
    assert!(volume.read_only());
    if can_mount() {
        mount_and_compare(volume);
    }
}

#[test]
fn the_azure_fixture_mounts_read_only_from_a_blob() {
    let Some(azurite) = Azurite::start() else { return };
    azurite.create_container("images");
    let config = Config::from_vars(azurite.env());
    let url = azurite.url("images", "luks");
    let store = config.open(&url).unwrap();
    let image = zstd::decode_all(IMAGE_ZST).unwrap();
    store.put("encfs.img", &image).unwrap();

    // No size given: found with ranged reads, as for any blob.
    let volume = LuksVolume::open(store.clone(), "encfs.img", KEY, None).unwrap();
    assert_eq!(volume.size(), 48 << 20);
    // The same plaintext as from the file, every sector.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("encfs.img"), &image).unwrap();
    let local: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()));
    let from_file = LuksVolume::open(local, "encfs.img", KEY, Some(image.len() as u64)).unwrap();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for offset in (0..volume.size()).step_by(1 << 20) {
        assert_eq!(volume.read_at(offset, &mut a).unwrap(), from_file.read_at(offset, &mut b).unwrap());
        assert!(a == b, "the blob and the file differ at {offset}");
    }
    if can_mount() {
        mount_and_compare(volume);
    }
}
