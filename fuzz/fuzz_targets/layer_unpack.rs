//! Layer unpacking: the first byte picks the compression (bit 0: plain tar
//! or gzip) and the claim (bit 1: the SHA-256 of the uncompressed bytes, so
//! that the commit path runs, or a digest of zeros); the rest is the blob,
//! written in one chunk. `LayerStore::{open, begin}`, `Upload::{write,
//! finish}` never panic, a commit happens only for the true diff_id, and
//! nothing is written beside the store root: a sentinel file and an empty
//! directory next to it stay as they were, no other entry appears there, and
//! `.staging` is empty after every upload.
#![no_main]

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use aws_lc_rs::digest::{SHA256, digest};
use capsa_agent::layer::LayerStore;
use capsa_agent::protocol::Compression;
use libfuzzer_sys::fuzz_target;

const SENTINEL_BYTES: &[u8] = b"outside the layer store\n";
/// More than any input can expand to in gzip (libFuzzer's default
/// `-max_len` is 4096 bytes, deflate expands at most about 1032 times).
const MAX_EXPANDED: u64 = 64 << 20;

struct Scratch {
    /// The per-process temp dir: holds the store root and the sentinels.
    parent: PathBuf,
    root: PathBuf,
    sentinel: PathBuf,
    outside: PathBuf,
    /// (mode, uid, gid, nlink, mtime) of the sentinel, the directory and
    /// the parent.
    before: [(u32, u32, u32, u64, i64); 3],
}

fn stat(path: &PathBuf) -> (u32, u32, u32, u64, i64) {
    let m = fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode(), m.uid(), m.gid(), m.nlink(), m.mtime())
}

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let parent = tempfile::Builder::new()
            .prefix("capsa-fuzz-layer_unpack.")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create the temp dir: {e}"))
            .keep();
        let sentinel = parent.join("sentinel");
        let outside = parent.join("outside");
        fs::write(&sentinel, SENTINEL_BYTES).unwrap_or_else(|e| panic!("cannot write the sentinel: {e}"));
        fs::create_dir(&outside).unwrap_or_else(|e| panic!("cannot create the sentinel directory: {e}"));
        let root = parent.join("layers");
        fs::create_dir(&root).unwrap_or_else(|e| panic!("cannot create the store root: {e}"));
        let before = [stat(&sentinel), stat(&outside), stat(&parent)];
        Scratch { parent, root, sentinel, outside, before }
    })
}

/// What the unpacker will hash: the blob itself, or its gzip members
/// decoded (as much as decodes).
fn uncompressed(compression: Compression, blob: &[u8]) -> Vec<u8> {
    match compression {
        Compression::Gzip => {
            let mut out = Vec::new();
            let _ = flate2::read::MultiGzDecoder::new(blob).take(MAX_EXPANDED).read_to_end(&mut out);
            out
        }
        _ => blob.to_vec(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, blob)) = data.split_first() else { return };
    let s = scratch();
    let compression = if mode & 1 == 0 { Compression::None } else { Compression::Gzip };
    let claimed = if mode & 2 == 0 {
        format!("sha256:{}", hex(digest(&SHA256, &uncompressed(compression, blob)).as_ref()))
    } else {
        format!("sha256:{}", "0".repeat(64))
    };

    match fs::remove_dir_all(&s.root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("cannot clean the store root: {e}"),
    }
    let store = LayerStore::open(&s.root).unwrap_or_else(|e| panic!("the store must open: {e}"));
    let result = store.begin(&claimed, compression).and_then(|mut upload| {
        upload.write(blob)?;
        upload.finish()
    });
    match &result {
        Ok(committed) => {
            assert_eq!(committed.diff_id, claimed);
            assert!(mode & 2 == 0, "a layer committed under a digest of zeros");
            if compression == Compression::None {
                assert_eq!(committed.size, blob.len() as u64);
            }
            assert!(store.path(&claimed).is_some(), "a committed layer must be in the store");
        }
        Err(_) => assert!(store.path(&claimed).is_none(), "a failed upload must leave no layer: {result:?}"),
    }

    let staging = fs::read_dir(s.root.join(".staging")).unwrap_or_else(|e| panic!("`.staging` must exist: {e}"));
    let left: Vec<_> = staging.map(|e| e.map(|e| e.file_name())).collect();
    assert!(left.is_empty(), "`.staging` must be empty after an upload ({result:?}): {left:?}");

    let mut beside: Vec<_> = fs::read_dir(&s.parent)
        .unwrap_or_else(|e| panic!("cannot list the temp dir: {e}"))
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()).unwrap_or_default())
        .collect();
    beside.sort();
    assert_eq!(beside, ["layers", "outside", "sentinel"], "entries beside the store root ({result:?})");
    assert_eq!(fs::read(&s.sentinel).ok().as_deref(), Some(SENTINEL_BYTES), "the sentinel changed ({result:?})");
    let outside = fs::read_dir(&s.outside).map(|mut d| d.next().is_none()).unwrap_or(false);
    assert!(outside, "the directory beside the store root must stay empty ({result:?})");
    let after = [stat(&s.sentinel), stat(&s.outside), stat(&s.parent)];
    for (i, (b, a)) in s.before.iter().zip(&after).enumerate() {
        // The parent's mtime changes as the store root is removed and
        // recreated; everything else must not.
        let (b, a) = if i == 2 { ((b.0, b.1, b.2, b.3, 0), (a.0, a.1, a.2, a.3, 0)) } else { (*b, *a) };
        assert_eq!(b, a, "metadata beside the store root changed ({result:?})");
    }
});

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
