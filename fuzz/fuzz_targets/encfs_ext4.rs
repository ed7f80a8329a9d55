//! capsa-encfs's ext4 reader on arbitrary bytes as the image: opening,
//! walking the tree from the root (bounded in entries and depth), stating
//! every inode and reading every file and symlink never panics nor hangs.
#![no_main]

use std::collections::HashSet;
use std::sync::Arc;

use capsa_encfs::ext4::{Ext4, FileKind, ROOT};
use capsa_encfs::{Error, Volume};
use libfuzzer_sys::fuzz_target;

/// The input as a volume.
struct Bytes(Vec<u8>);

impl Volume for Bytes {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        let Some(src) = usize::try_from(offset).ok().and_then(|start| self.0.get(start..)) else { return Ok(0) };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), Error> {
        Err(Error::ReadOnly)
    }
    fn commit(&self) -> Result<(), Error> {
        Ok(())
    }
}

const MAX_ENTRIES: usize = 4096;
const MAX_DEPTH: u32 = 16;
/// Per file: holes read as zeros, so a forged size must not make the
/// target, rather than the reader, slow.
const MAX_FILE_BYTES: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(fs) = Ext4::open(Arc::new(Bytes(data.to_vec()))) else { return };
    let _ = fs.statfs();
    let mut seen = HashSet::new();
    let mut stack = vec![(ROOT, 0u32)];
    let mut entries = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while let Some((ino, depth)) = stack.pop() {
        if depth > MAX_DEPTH || !seen.insert(ino) {
            continue;
        }
        let Ok(inode) = fs.inode(ino) else { continue };
        match inode.kind() {
            FileKind::Directory => {
                let Ok(list) = fs.read_dir(ino) else { continue };
                for entry in list {
                    entries += 1;
                    if entries > MAX_ENTRIES {
                        return;
                    }
                    if entries % 16 == 0 {
                        let _ = fs.lookup(ino, &entry.name);
                    }
                    stack.push((entry.ino, depth + 1));
                }
            }
            FileKind::Symlink => {
                let _ = fs.read_link(ino);
            }
            _ => {
                let Ok(map) = fs.file_map(ino) else { continue };
                let _ = map.run_at(0);
                let mut offset = 0u64;
                while offset < map.size().min(MAX_FILE_BYTES) {
                    match map.read_at(&fs, offset, &mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => offset += n as u64,
                    }
                }
            }
        }
    }
});
