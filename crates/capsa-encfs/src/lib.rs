//! capsa's encrypted filesystem.
//!
//! Confidential data lives outside the TEE, on a host's disk or in blob
//! storage, where whoever runs the host can read, change, reorder, truncate or
//! roll back any byte. This crate owns the format that makes that useless to
//! them, and the machinery that turns an image into a mounted filesystem:
//!
//! - [`format`]: an authenticated block image. The image is a virtual disk of
//!   4 KiB blocks, each sealed with AES-256-GCM under a fresh random nonce
//!   with its index in the associated data, grouped in chunk objects whose
//!   metadata is hashed into an HMAC'd manifest. It carries an ordinary ext4
//!   filesystem, so names, sizes and directory structure are encrypted with
//!   the contents and only the image's size (and which 1 MiB chunks were never
//!   written) shows.
//! - [`store`] and [`remote`]: where the objects live. Only whole-object
//!   writes and ranged reads are needed, so a local directory, Azure Blob, S3
//!   and plain HTTP all carry the same image.
//! - [`image`]: reads and writes by byte range, every block checked on read,
//!   bounded caches, and commits that are atomic: a crash loses at most what
//!   was not yet committed and never damages what was.
//! - [`fuse`], [`loopdev`] and [`mount`]: the image as one file on a FUSE
//!   mount, a loop device over that file, and ext4 on the loop device, the
//!   same on a developer's host and in the guest.
//! - [`ext4`]: a read-only reader of the ext4 filesystem inside an image, by
//!   inode number with random access into files, and [`files`], which serves
//!   it over FUSE, so that a read-only volume needs neither a loop device nor
//!   the kernel's ext4 (one FUSE hop instead of two, measured in
//!   docs/BENCHMARKS.md).
//!
//! Why a block image and not per-file encryption (gocryptfs, Gramine's
//! protected files) or LUKS2: a block image hides the tree's shape; ext4 gives
//! every POSIX behaviour containers expect without capsa re-implementing a
//! filesystem; and unlike dm-crypt and dm-integrity it authenticates every
//! block against the manifest, so a block replayed from an older version is
//! caught, and it needs no device-mapper, which neither this project's hosts
//! nor object stores offer. docs/encfs.md gives the full reasoning.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod ext4;
pub mod files;
pub mod format;
pub mod fuse;
pub mod image;
pub mod loopdev;
pub mod luks;
pub mod mount;
pub mod remote;
pub mod store;

pub use format::{BLOCK_SIZE, Geometry, MasterKey};
pub use image::{Image, OpenOptions};
pub use luks::{LuksError, LuksHeader, LuksVolume};
pub use store::{LocalStore, Store, StoreError};

/// A virtual disk the FUSE device can serve: a capsa image, or another
/// format read through the same device (a LUKS2 volume).
pub trait Volume: Send + Sync + 'static {
    /// Its size in bytes.
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Reads at `offset`; fewer bytes only at the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error>;
    /// Writes at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Makes the writes so far durable.
    fn commit(&self) -> Result<(), Error>;
}

impl Volume for Image {
    fn size(&self) -> u64 {
        Image::size(self)
    }
    fn read_only(&self) -> bool {
        Image::read_only(self)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        Image::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        Image::write_at(self, offset, data)
    }
    fn commit(&self) -> Result<(), Error> {
        Image::commit(self)
    }
}

/// Why an image could not be created, opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A block failed its check: what was read is not what the image's
    /// owner wrote there. Nothing of it is returned.
    #[error("integrity error in block {block} (bytes {offset}..{end} of the image): {reason}", offset = block * format::BLOCK_SIZE_U64, end = (block + 1) * format::BLOCK_SIZE_U64)]
    Integrity {
        /// The block's index.
        block: u64,
        /// What did not match.
        reason: String,
    },
    /// The manifest failed its check.
    #[error("the image's manifest failed its integrity check: {0}; it was modified, truncated or replaced")]
    ManifestIntegrity(String),
    /// The key is not this image's key.
    #[error("this key does not open this image: check the key name, or that the key released is this image's")]
    WrongKey,
    /// The bytes are not an image this version reads.
    #[error("not a capsa encfs image: {0}")]
    Format(String),
    /// A key of the wrong size.
    #[error("an image key is 32 bytes, not {0}")]
    KeyLength(usize),
    /// The crypto library failed (not the data).
    #[error("{0}")]
    Crypto(&'static str),
    /// The store failed on an object.
    #[error("{location}: {object}: {source}")]
    Store {
        /// The image's location.
        location: String,
        /// The object.
        object: String,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// An image already exists where one was to be created.
    #[error("{0}: an image already exists there; choose another place, or delete it first")]
    Exists(String),
    /// Another process has the image open read-write.
    #[error(
        "{0}: the image is open read-write elsewhere (a `capsa encfs mount` or a sandbox); unmount it there first, or open it read-only"
    )]
    InUse(String),
    /// No image where one was to be opened.
    #[error("{0}: no capsa encfs image there (no manifest)")]
    NotAnImage(String),
    /// A write to a read-only image.
    #[error("the image is open read-only")]
    ReadOnly,
    /// A write past the image's end.
    #[error("bytes {start}..{end} are past the image's end ({size} bytes)")]
    OutOfRange {
        /// First byte asked for.
        start: u64,
        /// One past the last.
        end: u64,
        /// The image's size.
        size: u64,
    },
    /// The key has sealed as many blocks as random nonces allow.
    #[error(
        "this image's key has sealed 2^32 blocks, the safe limit for random AES-GCM nonces: copy the files into a new image with a new key"
    )]
    KeyExhausted,
    /// An earlier commit failed, so later writes could be lost: the image
    /// takes no more writes until it is reopened.
    #[error("a commit failed earlier ({0}); the image takes no more writes until it is remounted")]
    Failed(String),
}
