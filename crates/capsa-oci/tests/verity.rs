//! capsa's dm-verity root hashes and hash trees against `veritysetup format`
//! (cryptsetup-bin) on the same files: 0, 1, 4095, 4096, 4097 bytes, 1 MiB
//! and 300 MiB of pseudo-random data, with and without a salt.
//!
//! veritysetup must be installed (`apt-get install cryptsetup-bin`); the
//! tests fail, rather than skip, without it.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use capsa_oci::verity::{VerityError, VerityParams, hash_tree_file, root_hash_file, root_hash_reader};

const VERITYSETUP: &str = "veritysetup";
const SALT: &str = "5f3a1c0e9b7d2468ace0fdb97531eca86420bdf13579ace02468bdf13579ace0";
const MIB: u64 = 1024 * 1024;

/// A directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("capsa-verity-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes `len` bytes of xorshift64* output, seeded by `seed`: fast enough for
/// hundreds of MiB, and different for every size.
fn write_random(path: &Path, len: u64, seed: u64) {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = len;
    while left > 0 {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let word = state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let n = left.min(8) as usize;
        out.write_all(&word[..n]).unwrap();
        left -= n as u64;
    }
    out.flush().unwrap();
}

/// What `veritysetup format` made of a data file.
enum Veritysetup {
    /// It succeeded: the root hash it printed and the hash device it wrote.
    Formatted { root: String, data_blocks: u64, hash_device: Vec<u8> },
    /// It refused, with this output.
    Refused(String),
}

fn veritysetup() -> Command {
    let found = Command::new(VERITYSETUP).arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|out| out.status.success()),
        "veritysetup is not installed or does not run ({found:?}): apt-get install cryptsetup-bin"
    );
    Command::new(VERITYSETUP)
}

fn salt_arg(salt: Option<&str>) -> &str {
    salt.unwrap_or("-")
}

/// `veritysetup format --no-superblock`, so that its hash device is
/// comparable byte for byte with capsa's tree.
fn veritysetup_format(data: &Path, hash: &Path, salt: Option<&str>) -> Veritysetup {
    let _ = fs::remove_file(hash);
    let out = veritysetup()
        .args(["format", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096"])
        .args(["--format", "1", "--no-superblock", "--salt", salt_arg(salt)])
        .arg(data)
        .arg(hash)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Veritysetup::Refused(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
    }
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name:?} in veritysetup output:\n{stdout}"))
            .trim()
            .to_owned()
    };
    Veritysetup::Formatted {
        root: field("Root hash:"),
        data_blocks: field("Data blocks:").parse().unwrap(),
        hash_device: fs::read(hash).unwrap(),
    }
}

fn veritysetup_verify(data: &Path, hash: &Path, root: &str, salt: Option<&str>) -> bool {
    veritysetup()
        .args(["verify", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096"])
        .args(["--format", "1", "--no-superblock", "--salt", salt_arg(salt)])
        .arg(data)
        .arg(hash)
        .arg(root)
        .status()
        .unwrap()
        .success()
}

fn params(salt: Option<&str>) -> VerityParams {
    VerityParams { salt: salt.map(|salt| hex::decode(salt).unwrap()).unwrap_or_default() }
}

/// Hashes a file of `len` random bytes with both tools, with and without a
/// salt, and checks they agree: same root, same hash device, and veritysetup
/// verifies capsa's tree; or both refuse.
fn compare(len: u64) {
    let dir = TempDir::new(&len.to_string());
    let data = dir.path("data");
    write_random(&data, len, len);
    for salt in [None, Some(SALT)] {
        let what = format!("{len} bytes, salt {}", salt_arg(salt));
        let theirs = veritysetup_format(&data, &dir.path("theirs"), salt);
        let ours = hash_tree_file(&data, &params(salt));
        match (theirs, ours) {
            (Veritysetup::Formatted { root, data_blocks, hash_device }, Ok(tree)) => {
                assert_eq!(hex::encode(tree.root_hash), root, "root hash, {what}");
                assert_eq!(tree.data_blocks, data_blocks, "data blocks, {what}");
                assert!(tree.hash_tree == hash_device, "hash device differs from veritysetup's, {what}");
                assert_eq!(root_hash_file(&data, &params(salt)).unwrap(), tree.root_hash, "{what}");
                let ours_path = dir.path("ours");
                fs::write(&ours_path, &tree.hash_tree).unwrap();
                assert!(veritysetup_verify(&data, &ours_path, &root, salt), "veritysetup rejects capsa's tree, {what}");
            }
            (Veritysetup::Refused(why), Err(error)) => {
                assert!(matches!(error, VerityError::Empty | VerityError::UnalignedSize { .. }), "{what}: {error}");
                eprintln!("{what}: both refuse; veritysetup: {}; capsa: {error}", why.trim());
            }
            (Veritysetup::Formatted { root, data_blocks, .. }, Err(error)) => {
                // veritysetup hashes only the whole blocks of an unaligned
                // file; capsa refuses it, and hashing the whole blocks through
                // the reader API gives veritysetup's root.
                assert!(
                    matches!(error, VerityError::UnalignedSize { len: l, tail } if l == len && tail == len % 4096),
                    "{what}: capsa refused what veritysetup hashed: {error}"
                );
                assert_eq!(data_blocks, len / 4096, "{what}");
                let whole = data_blocks * 4096;
                let truncated = root_hash_reader(File::open(&data).unwrap(), whole, &params(salt)).unwrap();
                assert_eq!(hex::encode(truncated), root, "whole blocks only, {what}");
                eprintln!(
                    "{what}: veritysetup hashes the first {data_blocks} blocks and drops the tail; capsa: {error}"
                );
            }
            (Veritysetup::Refused(why), Ok(tree)) => {
                panic!("{what}: veritysetup refused ({why}) but capsa hashed it to {}", hex::encode(tree.root_hash))
            }
        }
    }
}

#[test]
fn empty() {
    compare(0);
}

#[test]
fn one_byte() {
    compare(1);
}

#[test]
fn one_byte_short_of_a_block() {
    compare(4095);
}

#[test]
fn one_block() {
    compare(4096);
}

#[test]
fn one_byte_past_a_block() {
    compare(4097);
}

#[test]
fn one_mib() {
    compare(MIB);
}

#[test]
fn three_hundred_mib() {
    compare(300 * MIB);
}

/// A flipped data byte changes the root, and veritysetup then rejects the
/// tree capsa built for the original.
#[test]
fn tampered_data_is_caught() {
    let dir = TempDir::new("tampered");
    let data = dir.path("data");
    write_random(&data, MIB, 7);
    let tree = hash_tree_file(&data, &params(Some(SALT))).unwrap();
    let hash = dir.path("hash");
    fs::write(&hash, &tree.hash_tree).unwrap();
    let root = hex::encode(tree.root_hash);
    assert!(veritysetup_verify(&data, &hash, &root, Some(SALT)));

    let mut bytes = fs::read(&data).unwrap();
    bytes[123_456] ^= 1;
    fs::write(&data, &bytes).unwrap();
    assert_ne!(root_hash_file(&data, &params(Some(SALT))).unwrap(), tree.root_hash);
    assert!(!veritysetup_verify(&data, &hash, &root, Some(SALT)), "veritysetup accepted tampered data");
}
