//! dm-verity root hashes and hash trees, bit-identical to what
//! `veritysetup format --format 1 --hash sha256 --data-block-size 4096
//! --hash-block-size 4096` computes (cryptsetup's `lib/verity/verity_hash.c`,
//! the kernel's `Documentation/admin-guide/device-mapper/verity.rst`).
//!
//! The tree, as format 1 defines it:
//!
//! - every 4096-byte data block is hashed as `SHA-256(salt || block)` (format
//!   1 puts the salt first; format 0, not supported here, puts it last);
//! - the 32-byte digests are packed 128 to a 4096-byte hash block, the last
//!   block of a level zero-padded, and each hash block is hashed the same way
//!   to form the level above, until a level fits in one hash block;
//! - the root hash is the digest of that single top hash block, or of the data
//!   block itself when there is only one data block (the tree is then empty);
//! - on the hash device the levels are stored top level first, each level's
//!   blocks in data order.
//!
//! Sizes. `veritysetup` refuses an empty data device, and one smaller than a
//! block, but on a device whose size is not a multiple of 4096 it silently
//! hashes only the whole blocks: the tail is left out of the tree and a
//! dm-verity device built on it would not expose it. capsa refuses such data
//! instead ([`VerityError::UnalignedSize`]), because unverified bytes in a
//! confidential container's image are a hole, not a convenience: pad the image
//! to a multiple of 4096 bytes (`truncate -s %4096 FILE`) before hashing it
//! with either tool. [`root_hash_file_like_veritysetup`] reproduces
//! veritysetup exactly, tail and all, for `capsa verity` and other tools
//! that must agree with it; it reports how many bytes it left out.
//!
//! Speed. One sequential pass over the data: the calling thread reads chunks
//! of [`CHUNK_SIZE`] bytes into a small pool of buffers and worker threads (as
//! many as the machine has cores, at most [`MAX_WORKERS`]) hash the data
//! blocks with aws-lc-rs; the upper levels, 1/128 of the work, are folded in
//! on the calling thread as the leaf digests arrive in order. Memory is
//! bounded by the buffer pool and one hash block per level, whatever the size
//! of the data, unless the whole tree is asked for ([`hash_tree_file`]), which
//! keeps the tree: about 1/127 of the data size.
//!
//! ```no_run
//! use capsa_oci::verity::{VerityParams, root_hash_file};
//!
//! let root = root_hash_file("rootfs.img".as_ref(), &VerityParams::default())?;
//! println!("{}", hex::encode(root));
//! # Ok::<(), capsa_oci::verity::VerityError>(())
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;

use aws_lc_rs::digest;

/// Size in bytes of a data block and of a hash block (`--data-block-size`,
/// `--hash-block-size`).
pub const BLOCK_SIZE: usize = 4096;
/// Size in bytes of a SHA-256 digest, and of the root hash.
pub const DIGEST_SIZE: usize = 32;
/// The dm-verity hash format (`--format`): 1, salt before the data.
pub const HASH_FORMAT: u32 = 1;
/// The hash algorithm (`--hash`), as veritysetup and the kernel name it.
pub const HASH_ALGORITHM: &str = "sha256";
/// The longest salt veritysetup accepts (its superblock has room for 256
/// bytes).
pub const MAX_SALT_SIZE: usize = 256;
/// Bytes read and handed to a worker at a time: 64 data blocks.
pub const CHUNK_SIZE: usize = 64 * BLOCK_SIZE;
/// The most hashing threads used, however many cores there are: past this
/// the single reading thread is the bottleneck.
pub const MAX_WORKERS: usize = 8;

/// Digests per hash block.
const FANOUT: usize = BLOCK_SIZE / DIGEST_SIZE;
/// `BLOCK_SIZE` as a `u64`, for file offsets.
const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;

/// A 32-byte SHA-256 digest.
type Digest = [u8; DIGEST_SIZE];

/// What may vary between dm-verity trees capsa builds; the rest is fixed by
/// the constants of this module (format 1, SHA-256, 4096-byte blocks).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerityParams {
    /// The salt, at most [`MAX_SALT_SIZE`] bytes; empty for no salt
    /// (`veritysetup --salt -`).
    pub salt: Vec<u8>,
}

/// A complete dm-verity hash tree over some data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerityTree {
    /// The root hash, to give to dm-verity (`veritysetup open ... ROOT_HASH`).
    pub root_hash: [u8; DIGEST_SIZE],
    /// The number of 4096-byte data blocks the tree covers
    /// (`--data-blocks`).
    pub data_blocks: u64,
    /// The hash device, without a superblock: byte for byte what
    /// `veritysetup format --no-superblock` writes at hash offset 0, and what
    /// `veritysetup open --no-superblock` (or a dm-verity table with hash
    /// start block 0) reads. Empty when there is a single data block. capsa
    /// writes no superblock because veritysetup's holds a random UUID: the
    /// parameters are all fixed here, so the guest passes them explicitly.
    pub hash_tree: Vec<u8>,
}

impl VerityTree {
    /// The number of 4096-byte hash blocks in [`VerityTree::hash_tree`].
    pub fn hash_blocks(&self) -> u64 {
        // A usize always fits in a u64 on the platforms capsa supports.
        (self.hash_tree.len() / BLOCK_SIZE) as u64
    }
}

/// Why a dm-verity root hash or tree could not be computed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerityError {
    /// The data is empty.
    #[error("the data is empty: dm-verity needs at least one 4096-byte block (veritysetup refuses empty devices too)")]
    Empty,
    /// The data size is not a multiple of the data block size.
    #[error(
        "the data is {len} bytes, not a multiple of 4096: dm-verity covers whole blocks only (veritysetup silently \
         leaves the last {tail} bytes out, or refuses data under one block); pad the image to a multiple of 4096 \
         bytes (`truncate -s %4096 FILE`) and hash it again"
    )]
    UnalignedSize {
        /// The data size in bytes.
        len: u64,
        /// The bytes past the last whole block.
        tail: u64,
    },
    /// The salt is longer than veritysetup allows.
    #[error("the salt is {len} bytes, more than the {MAX_SALT_SIZE} bytes veritysetup accepts: use a shorter salt")]
    SaltTooLong {
        /// The salt length in bytes.
        len: usize,
    },
    /// A file system operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Reading the data failed.
    #[error("cannot read the data at byte {offset}: {source}")]
    Read {
        /// Where the read started.
        offset: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The data ended before the length given.
    #[error(
        "the data ended after {found} of the {expected} bytes expected: was the file truncated while it was hashed? \
         hash it again once nothing writes to it"
    )]
    Truncated {
        /// The length given.
        expected: u64,
        /// The bytes actually read.
        found: u64,
    },
    /// The file grew while it was hashed.
    #[error(
        "{} grew past {len} bytes while it was hashed: hash it again once nothing writes to it",
        path.display()
    )]
    Grew {
        /// The file.
        path: PathBuf,
        /// Its size when hashing started.
        len: u64,
    },
    /// A bug in capsa: an invariant of the tree builder did not hold.
    #[error("internal error computing the dm-verity tree ({reason}): this is a bug in capsa, please report it")]
    Internal {
        /// Which invariant broke.
        reason: &'static str,
    },
}

/// The dm-verity root hash of the file at `path`, which must be a regular file
/// whose size is a non-zero multiple of 4096. Reads the file once, with
/// bounded memory.
pub fn root_hash_file(path: &Path, params: &VerityParams) -> Result<[u8; DIGEST_SIZE], VerityError> {
    build_file(path, params, false).map(|tree| tree.root_hash)
}

/// What `veritysetup format` computes for the file at `path`: the root hash
/// of its whole 4096-byte blocks, and how many trailing bytes that leaves out
/// (they are not part of the tree, and a dm-verity device built on it does
/// not expose them). For tools that must agree with veritysetup byte for
/// byte; capsa's own images use [`root_hash_file`], which refuses a tail.
pub fn root_hash_file_like_veritysetup(
    path: &Path,
    params: &VerityParams,
) -> Result<([u8; DIGEST_SIZE], u64), VerityError> {
    let file = File::open(path).map_err(|source| VerityError::Io { op: "open", path: path.to_owned(), source })?;
    let len = file.metadata().map_err(|source| VerityError::Io { op: "stat", path: path.to_owned(), source })?.len();
    let tail = len % BLOCK_SIZE_U64;
    if len < BLOCK_SIZE_U64 {
        // veritysetup refuses devices under one block as well.
        return Err(if len == 0 { VerityError::Empty } else { VerityError::UnalignedSize { len, tail } });
    }
    root_hash_reader(file, len - tail, params).map(|root| (root, tail))
}

/// The dm-verity root hash of the first `len` bytes of `reader`; `len` must be
/// a non-zero multiple of 4096. Bytes past `len` are not read (as
/// `veritysetup --data-blocks` does): to match veritysetup on a file whose
/// size is not a multiple of 4096, pass the size rounded down.
pub fn root_hash_reader(reader: impl Read, len: u64, params: &VerityParams) -> Result<[u8; DIGEST_SIZE], VerityError> {
    build(reader, len, params, false).map(|tree| tree.root_hash)
}

/// The whole dm-verity tree of the file at `path`: the root hash and the hash
/// device the guest needs to open it. Same rules as [`root_hash_file`]; keeps
/// the tree, about 1/127 of the file size, in memory.
pub fn hash_tree_file(path: &Path, params: &VerityParams) -> Result<VerityTree, VerityError> {
    build_file(path, params, true)
}

/// The whole dm-verity tree of the first `len` bytes of `reader`. Same rules
/// as [`root_hash_reader`]; keeps the tree, about 1/127 of `len`, in memory.
pub fn hash_tree_reader(reader: impl Read, len: u64, params: &VerityParams) -> Result<VerityTree, VerityError> {
    build(reader, len, params, true)
}

fn build_file(path: &Path, params: &VerityParams, keep_tree: bool) -> Result<VerityTree, VerityError> {
    let io_error = |op| move |source| VerityError::Io { op, path: path.to_owned(), source };
    let mut file = File::open(path).map_err(io_error("open"))?;
    let len = file.metadata().map_err(io_error("stat"))?.len();
    let tree = build(&mut file, len, params, keep_tree)?;
    // A file that grew while it was read hashes to nothing anyone can check.
    let mut probe = [0u8; 1];
    loop {
        match file.read(&mut probe) {
            Ok(0) => return Ok(tree),
            Ok(_) => return Err(VerityError::Grew { path: path.to_owned(), len }),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(VerityError::Read { offset: len, source }),
        }
    }
}

/// Checks the parameters and the length, then reads `len` bytes of `reader`
/// in chunks on this thread while workers hash the chunks' blocks, folding
/// the leaf digests into the tree in order as they come back.
fn build(mut reader: impl Read, len: u64, params: &VerityParams, keep_tree: bool) -> Result<VerityTree, VerityError> {
    if params.salt.len() > MAX_SALT_SIZE {
        return Err(VerityError::SaltTooLong { len: params.salt.len() });
    }
    if len == 0 {
        return Err(VerityError::Empty);
    }
    let tail = len % BLOCK_SIZE_U64;
    if tail != 0 {
        return Err(VerityError::UnalignedSize { len, tail });
    }
    let data_blocks = len / BLOCK_SIZE_U64;
    let chunks = usize::try_from(len.div_ceil(CHUNK_SIZE as u64)).unwrap_or(MAX_WORKERS);
    let workers = thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_WORKERS).min(chunks);
    tracing::debug!(data_blocks, workers, keep_tree, salt_len = params.salt.len(), "computing dm-verity tree");
    // One buffer per worker, one being filled, one spare to absorb jitter.
    let buffers = workers + 2;
    let salt = params.salt.as_slice();
    let mut tree = TreeBuilder::new(data_blocks, salt, keep_tree);

    let (job_tx, job_rx) = mpsc::sync_channel::<Job>(buffers);
    let job_rx = Mutex::new(job_rx);
    let (done_tx, done_rx) = mpsc::channel::<Result<Done, VerityError>>();
    thread::scope(|scope| {
        let mut handles = Vec::with_capacity(workers);
        for _ in 0..workers {
            let done_tx = done_tx.clone();
            let job_rx = &job_rx;
            handles.push(scope.spawn(move || hash_jobs(job_rx, &done_tx, salt)));
        }
        drop(done_tx);

        let mut order = InOrder { next: 0, pending: BTreeMap::new() };
        let read = read_all(&mut reader, len, buffers, &job_tx, &done_rx, &mut order, &mut tree);
        // Closing the job channel stops the workers once the queue is empty;
        // join them all by hand so that a panicking worker is an error here,
        // not a panic of the scope.
        drop(job_tx);
        drop(done_rx);
        let mut joined = Ok(());
        for handle in handles {
            if handle.join().is_err() {
                joined = Err(VerityError::Internal { reason: "a hashing thread panicked" });
            }
        }
        read.and(joined)
    })?;
    tree.finish()
}

/// A chunk of data for a worker: its sequence number, the buffer and how
/// many bytes of it are data.
struct Job {
    seq: u64,
    buf: Vec<u8>,
    len: usize,
}

/// A hashed chunk: its sequence number, the digests of its blocks and the
/// buffer, back for reuse.
struct Done {
    seq: u64,
    digests: Vec<Digest>,
    buf: Vec<u8>,
}

/// Reorders hashed chunks, which workers finish in any order, into data
/// order. Holds at most one entry per buffer.
struct InOrder {
    next: u64,
    pending: BTreeMap<u64, Vec<Digest>>,
}

impl InOrder {
    fn accept(&mut self, seq: u64, digests: Vec<Digest>, tree: &mut TreeBuilder<'_>) -> Result<(), VerityError> {
        self.pending.insert(seq, digests);
        while let Some(digests) = self.pending.remove(&self.next) {
            for digest in digests {
                tree.push_leaf(digest)?;
            }
            self.next += 1;
        }
        Ok(())
    }
}

/// The reading side: fills free buffers from `reader` and queues them,
/// taking buffers back (and their digests) from the workers when none is
/// free, until `len` bytes are read and every chunk is hashed.
fn read_all(
    reader: &mut impl Read,
    len: u64,
    buffers: usize,
    jobs: &mpsc::SyncSender<Job>,
    done: &Receiver<Result<Done, VerityError>>,
    order: &mut InOrder,
    tree: &mut TreeBuilder<'_>,
) -> Result<(), VerityError> {
    let worker_gone = || VerityError::Internal { reason: "the hashing threads stopped early" };
    let mut free: Vec<Vec<u8>> = Vec::with_capacity(buffers);
    let mut allocated = 0;
    let mut offset = 0u64;
    let mut sent = 0u64;
    let mut received = 0u64;
    while offset < len {
        let mut buf = match free.pop() {
            Some(buf) => buf,
            None if allocated < buffers => {
                allocated += 1;
                vec![0u8; CHUNK_SIZE]
            }
            None => {
                let Done { seq, digests, buf } = done.recv().map_err(|_| worker_gone())??;
                received += 1;
                order.accept(seq, digests, tree)?;
                buf
            }
        };
        // Both are at most CHUNK_SIZE, so the conversion cannot fail.
        let want = usize::try_from((len - offset).min(CHUNK_SIZE as u64)).unwrap_or(CHUNK_SIZE);
        let chunk = buf.get_mut(..want).ok_or(VerityError::Internal { reason: "a buffer is smaller than a chunk" })?;
        let got = read_full(reader, chunk).map_err(|source| VerityError::Read { offset, source })?;
        if got < want {
            return Err(VerityError::Truncated { expected: len, found: offset + got as u64 });
        }
        jobs.send(Job { seq: sent, buf, len: want }).map_err(|_| worker_gone())?;
        sent += 1;
        offset += want as u64;
    }
    while received < sent {
        let Done { seq, digests, .. } = done.recv().map_err(|_| worker_gone())??;
        received += 1;
        order.accept(seq, digests, tree)?;
    }
    Ok(())
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while let Some(rest) = buf.get_mut(filled..).filter(|rest| !rest.is_empty()) {
        match reader.read(rest) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

/// A worker: hashes the blocks of each chunk it is given until the job
/// channel closes or nobody listens for results.
fn hash_jobs(jobs: &Mutex<Receiver<Job>>, done: &Sender<Result<Done, VerityError>>, salt: &[u8]) {
    let _guard = PanicGuard(done);
    let mut hasher = BlockHasher::new(salt);
    loop {
        // A poisoned lock only means another worker panicked while waiting;
        // the receiver itself is intact.
        let job = jobs.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
        let Ok(Job { seq, buf, len }) = job else { return };
        let digests = match buf.get(..len) {
            Some(data) => Ok(data.chunks_exact(BLOCK_SIZE).map(|block| hasher.hash(block)).collect()),
            None => Err(VerityError::Internal { reason: "a job is longer than its buffer" }),
        };
        if done.send(digests.map(|digests| Done { seq, digests, buf })).is_err() {
            return;
        }
    }
}

/// Tells the reading side if its worker panics: the chunk that worker held
/// will never come back, and waiting for it would hang.
struct PanicGuard<'a>(&'a Sender<Result<Done, VerityError>>);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            // If nobody listens any more, there is nobody left to tell.
            let _ = self.0.send(Err(VerityError::Internal { reason: "a hashing thread panicked" }));
        }
    }
}

/// `SHA-256(salt || block)`, the format 1 digest of a data or hash block.
struct BlockHasher<'a> {
    salt: &'a [u8],
    /// The salt followed by room for a block, so that a salted block is
    /// hashed in one call (cheaper than a streaming context per block).
    scratch: Vec<u8>,
}

impl<'a> BlockHasher<'a> {
    fn new(salt: &'a [u8]) -> Self {
        let mut scratch = Vec::with_capacity(salt.len() + BLOCK_SIZE);
        scratch.extend_from_slice(salt);
        Self { salt, scratch }
    }

    fn hash(&mut self, block: &[u8]) -> Digest {
        let digest = if self.salt.is_empty() {
            digest::digest(&digest::SHA256, block)
        } else {
            self.scratch.truncate(self.salt.len());
            self.scratch.extend_from_slice(block);
            digest::digest(&digest::SHA256, &self.scratch)
        };
        let mut out = [0u8; DIGEST_SIZE];
        for (out, byte) in out.iter_mut().zip(digest.as_ref()) {
            *out = *byte;
        }
        out
    }
}

/// One level of the tree being built: the hash block being filled and, when
/// the tree is kept, the blocks already sealed.
struct Level {
    block: Vec<u8>,
    fill: usize,
    sealed: Vec<u8>,
    sealed_blocks: u64,
    expected_blocks: u64,
}

/// Builds the tree bottom-up from leaf digests given in data order, keeping
/// one open hash block per level; each full block is hashed into the level
/// above at once, and `finish` zero-pads and seals the partial ones.
struct TreeBuilder<'a> {
    /// Level 0 holds the leaf digests; the last level is a single block.
    levels: Vec<Level>,
    root: Option<Digest>,
    leaves: u64,
    data_blocks: u64,
    keep_tree: bool,
    hasher: BlockHasher<'a>,
}

impl<'a> TreeBuilder<'a> {
    fn new(data_blocks: u64, salt: &'a [u8], keep_tree: bool) -> Self {
        // Level i has ceil(n / 128^(i+1)) blocks; levels are added until one
        // block holds a level, as veritysetup counts them. One data block
        // needs no level: its digest is the root.
        let mut levels = Vec::new();
        let mut digests = data_blocks;
        while digests > 1 {
            let blocks = digests.div_ceil(FANOUT as u64);
            let sealed_capacity =
                if keep_tree { usize::try_from(blocks).unwrap_or(0).saturating_mul(BLOCK_SIZE) } else { 0 };
            levels.push(Level {
                block: vec![0u8; BLOCK_SIZE],
                fill: 0,
                sealed: Vec::with_capacity(sealed_capacity),
                sealed_blocks: 0,
                expected_blocks: blocks,
            });
            digests = blocks;
        }
        Self { levels, root: None, leaves: 0, data_blocks, keep_tree, hasher: BlockHasher::new(salt) }
    }

    fn push_leaf(&mut self, digest: Digest) -> Result<(), VerityError> {
        self.leaves += 1;
        if self.leaves > self.data_blocks {
            return Err(VerityError::Internal { reason: "more leaf digests than data blocks" });
        }
        self.push(0, digest)
    }

    /// Appends `digest` to level `index`, sealing and carrying up full blocks;
    /// past the top level the digest is the root.
    fn push(&mut self, mut index: usize, mut digest: Digest) -> Result<(), VerityError> {
        loop {
            let Some(level) = self.levels.get_mut(index) else {
                if self.root.replace(digest).is_some() {
                    return Err(VerityError::Internal { reason: "the top level sealed twice" });
                }
                return Ok(());
            };
            let slot = level
                .block
                .get_mut(level.fill..level.fill + DIGEST_SIZE)
                .ok_or(VerityError::Internal { reason: "a hash block overflowed" })?;
            slot.copy_from_slice(&digest);
            level.fill += DIGEST_SIZE;
            if level.fill < BLOCK_SIZE {
                return Ok(());
            }
            digest = seal(level, &mut self.hasher, self.keep_tree)?;
            index += 1;
        }
    }

    /// Seals the partial blocks bottom-up and returns the tree, checking
    /// every level has the size veritysetup gives it.
    fn finish(mut self) -> Result<VerityTree, VerityError> {
        if self.leaves != self.data_blocks {
            return Err(VerityError::Internal { reason: "fewer leaf digests than data blocks" });
        }
        for index in 0..self.levels.len() {
            let Some(level) = self.levels.get_mut(index) else { break };
            if level.fill > 0 {
                let digest = seal(level, &mut self.hasher, self.keep_tree)?;
                self.push(index + 1, digest)?;
            }
        }
        if self.levels.iter().any(|level| level.sealed_blocks != level.expected_blocks) {
            return Err(VerityError::Internal { reason: "a level has the wrong number of blocks" });
        }
        let root_hash = self.root.ok_or(VerityError::Internal { reason: "no root hash" })?;
        let mut hash_tree = Vec::new();
        if self.keep_tree {
            hash_tree.reserve_exact(self.levels.iter().map(|level| level.sealed.len()).sum());
            for level in self.levels.iter().rev() {
                hash_tree.extend_from_slice(&level.sealed);
            }
        }
        Ok(VerityTree { root_hash, data_blocks: self.data_blocks, hash_tree })
    }
}

/// Zero-pads the level's open block, hashes it, keeps it if asked, and
/// empties it for the next one.
fn seal(level: &mut Level, hasher: &mut BlockHasher<'_>, keep_tree: bool) -> Result<Digest, VerityError> {
    let padding =
        level.block.get_mut(level.fill..).ok_or(VerityError::Internal { reason: "a hash block overflowed" })?;
    padding.fill(0);
    let digest = hasher.hash(&level.block);
    if keep_tree {
        level.sealed.extend_from_slice(&level.block);
    }
    level.sealed_blocks += 1;
    level.fill = 0;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha256(parts: &[&[u8]]) -> Digest {
        let mut context = digest::Context::new(&digest::SHA256);
        for part in parts {
            context.update(part);
        }
        context.finish().as_ref().try_into().unwrap()
    }

    fn data(blocks: usize) -> Vec<u8> {
        (0..blocks * BLOCK_SIZE).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// The tree written out the slow way, straight from verity_hash.c's
    /// description, for small sizes.
    fn reference(data: &[u8], salt: &[u8]) -> (Digest, Vec<u8>) {
        let mut level: Vec<Digest> = data.chunks(BLOCK_SIZE).map(|block| sha256(&[salt, block])).collect();
        if level.len() == 1 {
            return (level[0], Vec::new());
        }
        let mut stored: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut bytes: Vec<u8> = level.concat();
            bytes.resize(bytes.len().div_ceil(BLOCK_SIZE) * BLOCK_SIZE, 0);
            level = bytes.chunks(BLOCK_SIZE).map(|block| sha256(&[salt, block])).collect();
            stored.push(bytes);
            if level.len() == 1 {
                break;
            }
        }
        stored.reverse();
        (level[0], stored.concat())
    }

    #[test]
    fn matches_the_reference_around_level_boundaries() {
        for blocks in [1, 2, 3, 127, 128, 129, 130, 255, 256, 257, 16_384, 16_385] {
            let data = data(blocks);
            for salt in [&b""[..], &[0xA5; 32][..], &[1; MAX_SALT_SIZE][..]] {
                let params = VerityParams { salt: salt.to_vec() };
                let tree = hash_tree_reader(&data[..], data.len() as u64, &params).unwrap();
                let (root, stored) = reference(&data, salt);
                assert_eq!(tree.root_hash, root, "{blocks} blocks, {} byte salt", salt.len());
                assert_eq!(tree.hash_tree, stored, "{blocks} blocks, {} byte salt", salt.len());
                assert_eq!(tree.data_blocks, blocks as u64);
                let only_root = root_hash_reader(&data[..], data.len() as u64, &params).unwrap();
                assert_eq!(only_root, root);
            }
        }
    }

    #[test]
    fn one_block_is_its_own_root() {
        let zeros = [0u8; BLOCK_SIZE];
        let root = root_hash_reader(&zeros[..], BLOCK_SIZE as u64, &VerityParams::default()).unwrap();
        // veritysetup format --salt - on 4096 zero bytes, and sha256sum of them.
        assert_eq!(hex::encode(root), "ad7facb2586fc6e966c004d7d1d16b024f5805ff7cb47c7a85dabd8b48892ca7");
        let salted = root_hash_reader(&zeros[..], BLOCK_SIZE as u64, &VerityParams { salt: vec![1, 2] }).unwrap();
        // veritysetup format --salt 0102: the salt goes first.
        assert_eq!(hex::encode(salted), "f79c96411ae4291478f6617315031b54ef4b3e468c2cedaaf233c00a3c51422f");
    }

    #[test]
    fn refuses_what_veritysetup_refuses_or_would_truncate() {
        let params = VerityParams::default();
        let data = [0u8; 2 * BLOCK_SIZE];
        assert!(matches!(root_hash_reader(&data[..], 0, &params), Err(VerityError::Empty)));
        for len in [1, 4095, 4097, 8191] {
            assert!(matches!(
                root_hash_reader(&data[..], len, &params),
                Err(VerityError::UnalignedSize { len: l, tail }) if l == len && tail == len % 4096
            ));
        }
        let long = VerityParams { salt: vec![0; MAX_SALT_SIZE + 1] };
        assert!(matches!(root_hash_reader(&data[..], 4096, &long), Err(VerityError::SaltTooLong { len: 257 })));
    }

    #[test]
    fn a_short_reader_is_an_error() {
        let data = [0u8; BLOCK_SIZE];
        let error = root_hash_reader(&data[..], 3 * CHUNK_SIZE as u64, &VerityParams::default()).unwrap_err();
        assert!(matches!(error, VerityError::Truncated { expected, found: 4096 } if expected == 3 * CHUNK_SIZE as u64));
    }

    #[test]
    fn a_reader_error_is_reported_with_its_offset() {
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(0);
                self.0 -= n;
                Ok(n)
            }
        }
        let len = 40 * CHUNK_SIZE as u64;
        let error = root_hash_reader(Failing(5 * CHUNK_SIZE), len, &VerityParams::default()).unwrap_err();
        assert!(matches!(error, VerityError::Read { offset, .. } if offset == 5 * CHUNK_SIZE as u64), "{error}");
    }

    #[test]
    fn bytes_past_len_are_not_read() {
        let mut data = data(3);
        let root = root_hash_reader(&data[..], 2 * BLOCK_SIZE as u64, &VerityParams::default()).unwrap();
        data.truncate(2 * BLOCK_SIZE);
        assert_eq!(root, root_hash_reader(&data[..], data.len() as u64, &VerityParams::default()).unwrap());
    }
}
