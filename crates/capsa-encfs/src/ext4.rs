//! A read-only ext4 reader over a [`Volume`], by inode number.
//!
//! This module owns the parsing of the ext4 filesystem inside an image: the
//! superblock, group descriptors, inodes, extent trees (and ext2/ext3 block
//! maps) and directories, so that a FUSE server can serve the image's files
//! directly, without a loop device and the kernel's ext4 in between.
//!
//! It is hand-written because the `ext4-view` crate does not fit: it is
//! path-based, built on `Rc` (not `Send`/`Sync`), and its `File::seek_to`
//! walks every block from the start of the file. Here a file's whole extent
//! tree is loaded once into a sorted [`FileMap`], so a random read is a binary
//! search and one volume read per physically contiguous run.
//!
//! The bytes come from an authenticated image, but they are parsed as
//! untrusted anyway: every offset, count and block number is checked before
//! use, extent trees must be strictly ordered with a strictly decreasing depth
//! (so there can be no cycle), and what one call allocates is bounded by what
//! the image's size can hold. Checksums (`metadata_csum`) are not verified:
//! every block was already authenticated by the image format, and a CRC adds
//! nothing to that; the structural checks are what keep the parser safe.
//!
//! What is read: what Debian 12's `mkfs.ext4` makes by default (`filetype`,
//! `extents`, `64bit`, `flex_bg`, `sparse_super`, `large_file`, `huge_file`,
//! `dir_nlink`, `extra_isize`, `metadata_csum`, `has_journal`, `dir_index`,
//! `ext_attr`, `resize_inode`), images without `64bit` or `metadata_csum`,
//! ext2/ext3 images (files mapped by indirect blocks), and block sizes from
//! 1 KiB to 64 KiB. Refused when opening, with an error naming the feature:
//! `inline_data`, `encrypt`, `casefold`, `meta_bg`, `mmp`, `compression`,
//! `dirdata`, external journal devices, unknown incompatible features, and a
//! journal that needs recovery. Every read-only-compatible feature is
//! accepted, as the format intends for a reader that does not write.

mod map;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

pub use map::{Extent, FileMap, Run};

use crate::Volume;

/// The root directory's inode number.
pub const ROOT: u64 = 2;

/// The superblock's place, whatever the block size.
const SUPERBLOCK_OFFSET: u64 = 1024;
const SUPERBLOCK_SIZE: usize = 1024;
const MAGIC: u16 = 0xEF53;

/// The deepest extent tree the kernel builds (`EXT4_MAX_EXTENT_DEPTH`).
const MAX_EXTENT_DEPTH: u16 = 5;

/// `i_block`: 15 32-bit words, the extent tree's root, a block map, a fast
/// symlink's target or a device number.
const I_BLOCK_OFFSET: usize = 0x28;
const I_BLOCK_LEN: usize = 60;

/// The part of an inode this module reads: the 128-byte base and the extra
/// fields up to `i_crtime_extra`.
const INODE_READ_LEN: usize = 0x98;

// Incompatible features: a reader that does not know one must refuse.
const INCOMPAT_COMPRESSION: u32 = 0x1;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_META_BG: u32 = 0x10;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_MMP: u32 = 0x100;
const INCOMPAT_FLEX_BG: u32 = 0x200;
const INCOMPAT_EA_INODE: u32 = 0x400;
const INCOMPAT_DIRDATA: u32 = 0x1000;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_LARGEDIR: u32 = 0x4000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const INCOMPAT_ENCRYPT: u32 = 0x10000;
const INCOMPAT_CASEFOLD: u32 = 0x20000;

/// What this reader implements. `ea_inode` only moves extended attributes,
/// which are not read; `csum_seed` only changes checksums, which are not
/// verified; `largedir` only allows deeper hash trees, read linearly here.
const INCOMPAT_SUPPORTED: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR;

const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_GDT_CSUM: u32 = 0x10;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const RO_COMPAT_SHARED_BLOCKS: u32 = 0x4000;

/// Group descriptor flag: the group's inode table was never initialized.
const BG_INODE_UNINIT: u16 = 0x1;

// Inode flags.
const EXT4_ENCRYPT_FL: u32 = 0x800;
const EXT4_INDEX_FL: u32 = 0x1000;
const EXT4_HUGE_FILE_FL: u32 = 0x40000;
const EXT4_EXTENTS_FL: u32 = 0x80000;
const EXT4_INLINE_DATA_FL: u32 = 0x1000_0000;

/// Why the filesystem, an inode or a file could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Ext4Error {
    /// The volume under the filesystem failed.
    #[error("reading the volume under the ext4 filesystem: {0}")]
    Volume(#[from] crate::Error),
    /// No ext4 superblock.
    #[error("not an ext2/3/4 filesystem: no magic 0xef53 at byte 1080 (found {found:#06x})")]
    NotExt4 {
        /// The 16 bits where the magic should be.
        found: u16,
    },
    /// The volume is smaller than the filesystem says it is.
    #[error(
        "the volume holds {volume} bytes but its ext4 filesystem needs {filesystem}: the image is truncated, or not the one the filesystem was made on"
    )]
    Truncated {
        /// The volume's size in bytes.
        volume: u64,
        /// The filesystem's size in bytes, from its superblock.
        filesystem: u64,
    },
    /// The journal holds changes that were never written to their place.
    #[error(
        "the ext4 filesystem was not unmounted cleanly: its journal must be replayed first (needs_recovery); mount the image read-write once through the kernel, or run e2fsck on it, then open it again"
    )]
    NeedsRecovery,
    /// A feature this reader does not implement.
    #[error("the ext4 filesystem uses {feature}, which capsa's ext4 reader does not support: {hint}")]
    Unsupported {
        /// The feature.
        feature: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// A structure that breaks the format's rules.
    #[error("corrupt ext4 {structure}: {reason}; check the filesystem with `e2fsck -fn`")]
    Corrupt {
        /// Which structure: the superblock, an inode, a block of a file.
        structure: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An inode number outside the filesystem's inode table.
    #[error("inode {ino} is out of range: the filesystem has inodes 1 to {count}")]
    InodeOutOfRange {
        /// The number asked for.
        ino: u64,
        /// The filesystem's inode count.
        count: u32,
    },
    /// A directory operation on something else.
    #[error("inode {ino} is not a directory but a {kind}")]
    NotADirectory {
        /// The inode.
        ino: u64,
        /// What it is.
        kind: FileKind,
    },
    /// `read_link` on something else.
    #[error("inode {ino} is not a symbolic link but a {kind}")]
    NotASymlink {
        /// The inode.
        ino: u64,
        /// What it is.
        kind: FileKind,
    },
    /// A file map asked for an inode that has no data (a device, a fifo, a
    /// socket, or a symlink stored in its inode).
    #[error("inode {ino} is a {kind}, which has no data blocks to map")]
    NoData {
        /// The inode.
        ino: u64,
        /// What it is.
        kind: FileKind,
    },
}

fn corrupt(structure: impl Into<String>, reason: impl Into<String>) -> Ext4Error {
    Ext4Error::Corrupt { structure: structure.into(), reason: reason.into() }
}

/// Little-endian fields of an on-disk structure, read without panicking:
/// a field past the end is an error naming the structure.
#[derive(Clone, Copy)]
struct Raw<'a> {
    bytes: &'a [u8],
    what: &'a str,
}

impl<'a> Raw<'a> {
    fn new(bytes: &'a [u8], what: &'a str) -> Self {
        Raw { bytes, what }
    }

    fn array<const N: usize>(&self, offset: usize) -> Result<[u8; N], Ext4Error> {
        offset
            .checked_add(N)
            .and_then(|end| self.bytes.get(offset..end))
            .and_then(|slice| <[u8; N]>::try_from(slice).ok())
            .ok_or_else(|| {
                corrupt(self.what, format!("a field at byte {offset} is past its end ({} bytes)", self.bytes.len()))
            })
    }

    fn u8(&self, offset: usize) -> Result<u8, Ext4Error> {
        Ok(self.array::<1>(offset)?[0])
    }

    fn u16(&self, offset: usize) -> Result<u16, Ext4Error> {
        Ok(u16::from_le_bytes(self.array(offset)?))
    }

    fn u32(&self, offset: usize) -> Result<u32, Ext4Error> {
        Ok(u32::from_le_bytes(self.array(offset)?))
    }
}

/// What an inode is, from the top bits of its mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A regular file.
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
    /// A Unix socket.
    Socket,
}

impl FileKind {
    fn from_mode(mode: u16) -> Option<FileKind> {
        Some(match mode & 0o170000 {
            0o100000 => FileKind::Regular,
            0o040000 => FileKind::Directory,
            0o120000 => FileKind::Symlink,
            0o020000 => FileKind::CharDevice,
            0o060000 => FileKind::BlockDevice,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            _ => return None,
        })
    }

    /// The `file_type` byte of a directory entry (`filetype` feature).
    fn from_dirent_type(file_type: u8) -> Option<FileKind> {
        Some(match file_type {
            1 => FileKind::Regular,
            2 => FileKind::Directory,
            3 => FileKind::CharDevice,
            4 => FileKind::BlockDevice,
            5 => FileKind::Fifo,
            6 => FileKind::Socket,
            7 => FileKind::Symlink,
            _ => return None,
        })
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Regular => "regular file",
            FileKind::Directory => "directory",
            FileKind::Symlink => "symbolic link",
            FileKind::CharDevice => "character device",
            FileKind::BlockDevice => "block device",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
        })
    }
}

/// A point in time, as ext4 stores it: seconds since the Unix epoch (before
/// it when negative) and nanoseconds, always below one second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    seconds: i64,
    nanoseconds: u32,
}

impl Timestamp {
    /// Decodes a 32-bit time and, when the inode has it, its `_extra` word:
    /// 2 bits that extend the seconds past 2038 and 30 bits of nanoseconds.
    fn decode(seconds: u32, extra: Option<u32>) -> Timestamp {
        // The base is signed, so that times before 1970 survive.
        let base = i64::from(seconds as i32);
        match extra {
            None => Timestamp { seconds: base, nanoseconds: 0 },
            Some(extra) => Timestamp {
                seconds: base + (i64::from(extra & 3) << 32),
                // 30 bits reach 1,073,741,823: clamp a value no kernel writes,
                // so that the invariant holds for every image.
                nanoseconds: (extra >> 2).min(999_999_999),
            },
        }
    }

    /// Seconds since the Unix epoch.
    pub fn seconds(&self) -> i64 {
        self.seconds
    }

    /// Nanoseconds past `seconds`, below 1,000,000,000.
    pub fn nanoseconds(&self) -> u32 {
        self.nanoseconds
    }

    /// As a `SystemTime`.
    pub fn to_system_time(&self) -> std::time::SystemTime {
        let nanos = std::time::Duration::from_nanos(u64::from(self.nanoseconds));
        if self.seconds >= 0 {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(self.seconds.unsigned_abs()) + nanos
        } else {
            std::time::UNIX_EPOCH - std::time::Duration::from_secs(self.seconds.unsigned_abs()) + nanos
        }
    }
}

/// A device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Device {
    /// The major number (12 bits in ext4's encoding).
    pub major: u32,
    /// The minor number (20 bits in ext4's encoding).
    pub minor: u32,
}

impl Device {
    /// As Linux's 32-bit `dev_t` encoding (`new_encode_dev`), what a FUSE
    /// reply's `rdev` carries.
    pub fn to_rdev(&self) -> u32 {
        (self.minor & 0xff) | ((self.major & 0xfff) << 8) | ((self.minor & !0xff) << 12)
    }
}

/// An inode's attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    ino: u64,
    kind: FileKind,
    mode: u16,
    uid: u32,
    gid: u32,
    size: u64,
    links: u16,
    blocks: u64,
    atime: Timestamp,
    mtime: Timestamp,
    ctime: Timestamp,
    device: Option<Device>,
    generation: u32,
    flags: u32,
    i_block: [u8; I_BLOCK_LEN],
}

impl Inode {
    /// Its number.
    pub fn ino(&self) -> u64 {
        self.ino
    }
    /// What it is.
    pub fn kind(&self) -> FileKind {
        self.kind
    }
    /// The full mode: the file type bits and the permissions (setuid,
    /// setgid and sticky included).
    pub fn mode(&self) -> u16 {
        self.mode
    }
    /// The permission bits alone (`mode & 0o7777`).
    pub fn permissions(&self) -> u16 {
        self.mode & 0o7777
    }
    /// The owner, all 32 bits.
    pub fn uid(&self) -> u32 {
        self.uid
    }
    /// The group, all 32 bits.
    pub fn gid(&self) -> u32 {
        self.gid
    }
    /// The size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The hard link count. With `dir_nlink`, a directory with more than
    /// 65,000 subdirectories counts 1.
    pub fn links(&self) -> u16 {
        self.links
    }
    /// Space allocated, in 512-byte units (what `stat` calls `st_blocks`).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }
    /// Last access.
    pub fn atime(&self) -> Timestamp {
        self.atime
    }
    /// Last change of the contents.
    pub fn mtime(&self) -> Timestamp {
        self.mtime
    }
    /// Last change of the inode.
    pub fn ctime(&self) -> Timestamp {
        self.ctime
    }
    /// The device number of a character or block device; `None` for every
    /// other kind.
    pub fn device(&self) -> Option<Device> {
        self.device
    }
    /// The generation number (for NFS-style file handles).
    pub fn generation(&self) -> u32 {
        self.generation
    }
    /// Whether a directory has a hash-tree index (`dir_index`); it is read
    /// linearly either way.
    pub fn has_hash_index(&self) -> bool {
        self.kind == FileKind::Directory && self.flags & EXT4_INDEX_FL != 0
    }
    /// Whether the data is mapped by an extent tree (rather than by ext2/ext3
    /// indirect blocks).
    pub fn uses_extents(&self) -> bool {
        self.flags & EXT4_EXTENTS_FL != 0
    }
}

/// One entry of a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The inode it names.
    pub ino: u64,
    /// The name: any bytes but `/` and NUL, 1 to 255 of them.
    pub name: Vec<u8>,
    /// What the inode is.
    pub kind: FileKind,
}

/// Filesystem-wide counts, for `statfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Statfs {
    /// The block size in bytes.
    pub block_size: u32,
    /// Blocks in the filesystem.
    pub blocks: u64,
    /// Free blocks, as the superblock last recorded them.
    pub free_blocks: u64,
    /// Inodes in the filesystem.
    pub inodes: u32,
    /// Free inodes, as the superblock last recorded them.
    pub free_inodes: u32,
}

/// What `open` keeps of the superblock.
#[derive(Debug, Clone)]
struct Superblock {
    block_size: u32,
    blocks_count: u64,
    free_blocks: u64,
    inodes_count: u32,
    free_inodes: u32,
    inodes_per_group: u32,
    inode_size: u32,
    first_data_block: u32,
    has_filetype: bool,
    huge_file: bool,
    /// Group descriptor flags mean something only with group checksums.
    uninit_flags_valid: bool,
    /// Blocks may be shared between (and within) files, so mapping the same
    /// block twice is not corruption.
    shared_blocks: bool,
}

/// What the reader needs of a group descriptor.
#[derive(Debug, Clone, Copy)]
struct Group {
    inode_table: u64,
    flags: u16,
    itable_unused: u32,
}

/// A read-only ext4 filesystem on a volume.
pub struct Ext4 {
    volume: Arc<dyn Volume>,
    sb: Superblock,
    groups: Vec<Group>,
}

impl fmt::Debug for Ext4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ext4").field("superblock", &self.sb).field("groups", &self.groups.len()).finish()
    }
}

/// Refuses the incompatible features this reader does not implement, each
/// with what to do instead.
fn check_incompat(incompat: u32) -> Result<(), Ext4Error> {
    if incompat & INCOMPAT_RECOVER != 0 {
        return Err(Ext4Error::NeedsRecovery);
    }
    let refused: [(u32, &str, &'static str); 8] = [
        (INCOMPAT_JOURNAL_DEV, "journal_dev", "this volume is an external ext4 journal, not a filesystem"),
        (
            INCOMPAT_INLINE_DATA,
            "inline_data",
            "re-create the filesystem without `-O inline_data` (not a mkfs.ext4 default)",
        ),
        (
            INCOMPAT_ENCRYPT,
            "encrypt (fscrypt)",
            "the image is already encrypted: copy the files into a filesystem made without `-O encrypt`",
        ),
        (INCOMPAT_CASEFOLD, "casefold", "re-create the filesystem without `-O casefold`"),
        (INCOMPAT_META_BG, "meta_bg", "re-create the filesystem without `-O meta_bg` (not a mkfs.ext4 default)"),
        (INCOMPAT_MMP, "mmp (multiple mount protection)", "turn it off with `tune2fs -O ^mmp IMAGE`"),
        (
            INCOMPAT_COMPRESSION,
            "compression",
            "ext2 compression was never part of Linux: copy the files into a new filesystem",
        ),
        (INCOMPAT_DIRDATA, "dirdata", "a Lustre feature: copy the files into a filesystem made by mkfs.ext4"),
    ];
    for (bit, feature, hint) in refused {
        if incompat & bit != 0 {
            return Err(Ext4Error::Unsupported { feature: feature.to_string(), hint });
        }
    }
    let unknown = incompat & !(INCOMPAT_SUPPORTED | refused.iter().fold(0, |all, (bit, _, _)| all | bit));
    if unknown != 0 {
        return Err(Ext4Error::Unsupported {
            feature: format!("unknown incompatible features {unknown:#x}"),
            hint: "the filesystem was made by a newer mkfs.ext4 than this reader knows: re-create it with Debian 12's defaults",
        });
    }
    Ok(())
}

impl Ext4 {
    /// Opens the filesystem on `volume`: reads and checks the superblock and
    /// the group descriptors.
    pub fn open(volume: Arc<dyn Volume>) -> Result<Ext4, Ext4Error> {
        let volume_size = volume.size();
        let mut raw_sb = vec![0u8; SUPERBLOCK_SIZE];
        let got = read_full(volume.as_ref(), SUPERBLOCK_OFFSET, &mut raw_sb)?;
        if got < SUPERBLOCK_SIZE {
            return Err(Ext4Error::NotExt4 { found: 0 });
        }
        let sb = Raw::new(&raw_sb, "superblock");
        let magic = sb.u16(0x38)?;
        if magic != MAGIC {
            return Err(Ext4Error::NotExt4 { found: magic });
        }
        let incompat = sb.u32(0x60)?;
        check_incompat(incompat)?;
        let ro_compat = sb.u32(0x64)?;
        let is_64bit = incompat & INCOMPAT_64BIT != 0;

        let log_block_size = sb.u32(0x18)?;
        // 1 KiB to 64 KiB, as the kernel allows.
        if log_block_size > 6 {
            return Err(corrupt("superblock", format!("block size 2^(10+{log_block_size}) is over 64 KiB")));
        }
        let block_size: u32 = 1024 << log_block_size;
        let block_size_u64 = u64::from(block_size);

        let blocks_lo = u64::from(sb.u32(0x4)?);
        let blocks_hi = if is_64bit { u64::from(sb.u32(0x150)?) } else { 0 };
        let blocks_count = blocks_lo | (blocks_hi << 32);
        let free_lo = u64::from(sb.u32(0xC)?);
        let free_hi = if is_64bit { u64::from(sb.u32(0x158)?) } else { 0 };
        let first_data_block = sb.u32(0x14)?;
        if u64::from(first_data_block) >= blocks_count {
            return Err(corrupt(
                "superblock",
                format!("first data block {first_data_block} is not below the block count {blocks_count}"),
            ));
        }
        let fs_bytes = blocks_count
            .checked_mul(block_size_u64)
            .ok_or_else(|| corrupt("superblock", format!("{blocks_count} blocks of {block_size} bytes overflow")))?;
        if fs_bytes > volume_size {
            return Err(Ext4Error::Truncated { volume: volume_size, filesystem: fs_bytes });
        }

        let rev_level = sb.u32(0x4C)?;
        let inode_size = if rev_level == 0 { 128 } else { u32::from(sb.u16(0x58)?) };
        if !inode_size.is_power_of_two() || inode_size < 128 || inode_size > block_size {
            return Err(corrupt(
                "superblock",
                format!("inode size {inode_size} is not a power of two from 128 to the block size"),
            ));
        }
        let inodes_count = sb.u32(0x0)?;
        let inodes_per_group = sb.u32(0x28)?;
        let blocks_per_group = sb.u32(0x20)?;
        // An inode bitmap is one block, so a group holds at most 8 inodes per
        // byte of block.
        if inodes_per_group == 0 || inodes_per_group > block_size * 8 {
            return Err(corrupt(
                "superblock",
                format!("{inodes_per_group} inodes per group (1 to {} allowed)", block_size * 8),
            ));
        }
        if blocks_per_group == 0 {
            return Err(corrupt("superblock", "0 blocks per group"));
        }
        let group_count = (blocks_count - u64::from(first_data_block)).div_ceil(u64::from(blocks_per_group));
        let max_inodes = group_count.saturating_mul(u64::from(inodes_per_group));
        if inodes_count == 0 || u64::from(inodes_count) > max_inodes {
            return Err(corrupt(
                "superblock",
                format!("{inodes_count} inodes, but {group_count} groups of {inodes_per_group} hold {max_inodes}"),
            ));
        }
        // Only the groups that hold inodes matter to this reader.
        let groups_needed = u64::from(inodes_count).div_ceil(u64::from(inodes_per_group));

        let desc_size = if is_64bit { u32::from(sb.u16(0xFE)?) } else { 32 };
        if is_64bit && (!(64..=1024).contains(&desc_size) || !desc_size.is_power_of_two()) {
            return Err(corrupt(
                "superblock",
                format!("64-bit group descriptor size {desc_size} (64 to 1024, a power of two)"),
            ));
        }
        // The descriptors start in the block after the superblock's (block 1
        // of 1 KiB, 0 otherwise), whatever s_first_data_block says (bigalloc
        // sets it to 0 with 1 KiB blocks); meta_bg, which moves them, is
        // refused.
        let gdt_offset = (SUPERBLOCK_OFFSET / block_size_u64 + 1) * block_size_u64;
        let gdt_len = groups_needed * u64::from(desc_size);
        if gdt_offset.saturating_add(gdt_len) > fs_bytes {
            return Err(corrupt(
                "superblock",
                format!("{groups_needed} group descriptors do not fit in the filesystem"),
            ));
        }
        // Bounded by the check above: the table fits in the volume.
        let mut gdt =
            vec![0u8; usize::try_from(gdt_len).map_err(|_| corrupt("superblock", "group descriptor table too large"))?];
        read_exact(volume.as_ref(), gdt_offset, &mut gdt, "group descriptor table")?;
        let desc_len = desc_size as usize;
        let mut groups = Vec::with_capacity(gdt.len() / desc_len);
        for (index, desc) in gdt.chunks_exact(desc_len).enumerate() {
            let what = format!("group descriptor {index}");
            let d = Raw::new(desc, &what);
            let table_lo = u64::from(d.u32(0x8)?);
            let table_hi = if is_64bit { u64::from(d.u32(0x28)?) } else { 0 };
            let unused_lo = u32::from(d.u16(0x1C)?);
            let unused_hi = if is_64bit { u32::from(d.u16(0x32)?) } else { 0 };
            groups.push(Group {
                inode_table: table_lo | (table_hi << 32),
                flags: d.u16(0x12)?,
                itable_unused: unused_lo | (unused_hi << 16),
            });
        }

        let sb = Superblock {
            block_size,
            blocks_count,
            free_blocks: free_lo | (free_hi << 32),
            inodes_count,
            free_inodes: sb.u32(0x10)?,
            inodes_per_group,
            inode_size,
            first_data_block,
            has_filetype: incompat & INCOMPAT_FILETYPE != 0,
            huge_file: ro_compat & RO_COMPAT_HUGE_FILE != 0,
            uninit_flags_valid: ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0,
            shared_blocks: ro_compat & RO_COMPAT_SHARED_BLOCKS != 0,
        };
        Ok(Ext4 { volume, sb, groups })
    }

    /// The block size in bytes (1 KiB to 64 KiB).
    pub fn block_size(&self) -> u32 {
        self.sb.block_size
    }

    /// Filesystem-wide counts.
    pub fn statfs(&self) -> Statfs {
        Statfs {
            block_size: self.sb.block_size,
            blocks: self.sb.blocks_count,
            free_blocks: self.sb.free_blocks.min(self.sb.blocks_count),
            inodes: self.sb.inodes_count,
            free_inodes: self.sb.free_inodes.min(self.sb.inodes_count),
        }
    }

    /// Reads an inode's attributes.
    pub fn inode(&self, ino: u64) -> Result<Inode, Ext4Error> {
        let count = self.sb.inodes_count;
        let index =
            ino.checked_sub(1).filter(|_| ino <= u64::from(count)).ok_or(Ext4Error::InodeOutOfRange { ino, count })?;
        let per_group = u64::from(self.sb.inodes_per_group);
        let group_index = index / per_group;
        let in_group = index % per_group;
        let what = format!("inode {ino}");
        let group = usize::try_from(group_index)
            .ok()
            .and_then(|g| self.groups.get(g))
            .ok_or_else(|| corrupt(what.as_str(), format!("group {group_index} has no descriptor")))?;
        if self.sb.uninit_flags_valid {
            let used = per_group.saturating_sub(u64::from(group.itable_unused));
            if group.flags & BG_INODE_UNINIT != 0 || in_group >= used {
                return Err(corrupt(
                    what.as_str(),
                    format!(
                        "group {group_index} marks it as never used, yet it was asked for (from a directory entry?)"
                    ),
                ));
            }
        }
        let inode_size = u64::from(self.sb.inode_size);
        let table_bytes = per_group * inode_size;
        let table_blocks = table_bytes.div_ceil(u64::from(self.sb.block_size));
        if group.inode_table.checked_add(table_blocks).is_none_or(|end| end > self.sb.blocks_count) {
            return Err(corrupt(
                what.as_str(),
                format!(
                    "group {group_index}'s inode table at block {} is past the filesystem's end",
                    group.inode_table
                ),
            ));
        }
        let offset = group.inode_table * u64::from(self.sb.block_size) + in_group * inode_size;
        let len = INODE_READ_LEN.min(self.sb.inode_size as usize);
        let mut buf = vec![0u8; len];
        read_exact(self.volume.as_ref(), offset, &mut buf, &what)?;
        self.parse_inode(ino, &buf, &what)
    }

    fn parse_inode(&self, ino: u64, buf: &[u8], what: &str) -> Result<Inode, Ext4Error> {
        let r = Raw::new(buf, what);
        let mode = r.u16(0x0)?;
        let kind = FileKind::from_mode(mode).ok_or_else(|| {
            corrupt(
                what,
                if mode == 0 {
                    "it is not in use (mode 0)".to_string()
                } else {
                    format!("unknown file type in mode {mode:#o}")
                },
            )
        })?;
        let flags = r.u32(0x20)?;
        // Extra fields exist when the inode is larger than 128 bytes and
        // `i_extra_isize` says they were written.
        let extra_isize = if buf.len() > 128 { usize::from(r.u16(0x80)?) } else { 0 };
        if extra_isize > (self.sb.inode_size as usize).saturating_sub(128) || extra_isize % 4 != 0 {
            return Err(corrupt(
                what,
                format!("i_extra_isize {extra_isize} does not fit its {}-byte inode", self.sb.inode_size),
            ));
        }
        let extra = |offset: usize| -> Result<Option<u32>, Ext4Error> {
            if 128 + extra_isize >= offset + 4 { r.u32(offset).map(Some) } else { Ok(None) }
        };
        let uid = u32::from(r.u16(0x2)?) | (u32::from(r.u16(0x78)?) << 16);
        let gid = u32::from(r.u16(0x18)?) | (u32::from(r.u16(0x7A)?) << 16);
        let size = u64::from(r.u32(0x4)?) | (u64::from(r.u32(0x6C)?) << 32);
        let blocks_lo = u64::from(r.u32(0x1C)?);
        let blocks = if self.sb.huge_file {
            let raw = blocks_lo | (u64::from(r.u16(0x74)?) << 32);
            // With EXT4_HUGE_FILE_FL the count is in filesystem blocks.
            if flags & EXT4_HUGE_FILE_FL != 0 { raw.saturating_mul(u64::from(self.sb.block_size / 512)) } else { raw }
        } else {
            blocks_lo
        };
        let i_block: [u8; I_BLOCK_LEN] = r.array(I_BLOCK_OFFSET)?;
        let device = match kind {
            FileKind::CharDevice | FileKind::BlockDevice => {
                let old = r.u32(I_BLOCK_OFFSET)?;
                Some(if old != 0 {
                    Device { major: (old >> 8) & 0xff, minor: old & 0xff }
                } else {
                    let new = r.u32(I_BLOCK_OFFSET + 4)?;
                    Device { major: (new & 0xfff00) >> 8, minor: (new & 0xff) | ((new >> 12) & 0xfff00) }
                })
            }
            _ => None,
        };
        Ok(Inode {
            ino,
            kind,
            mode,
            uid,
            gid,
            size,
            links: r.u16(0x1A)?,
            blocks,
            atime: Timestamp::decode(r.u32(0x8)?, extra(0x8C)?),
            ctime: Timestamp::decode(r.u32(0xC)?, extra(0x84)?),
            mtime: Timestamp::decode(r.u32(0x10)?, extra(0x88)?),
            device,
            generation: r.u32(0x64)?,
            flags,
            i_block,
        })
    }

    /// Loads the whole block mapping of a regular file, a directory or a
    /// symlink stored in blocks: once, so that reads are binary searches.
    pub fn file_map(&self, ino: u64) -> Result<FileMap, Ext4Error> {
        let inode = self.inode(ino)?;
        FileMap::load(self, &inode)
    }

    /// The target of a symbolic link.
    pub fn read_link(&self, ino: u64) -> Result<Vec<u8>, Ext4Error> {
        let inode = self.inode(ino)?;
        if inode.kind != FileKind::Symlink {
            return Err(Ext4Error::NotASymlink { ino, kind: inode.kind });
        }
        let what = format!("symlink inode {ino}");
        if inode.flags & (EXT4_INLINE_DATA_FL | EXT4_ENCRYPT_FL) != 0 {
            return Err(corrupt(what, "inline-data or encryption flag set on a filesystem without that feature"));
        }
        // The kernel's PATH_MAX, and a slow symlink is one block.
        let max = u64::from(self.sb.block_size).min(4096);
        if inode.size == 0 || inode.size >= max {
            return Err(corrupt(what, format!("target length {} (1 to {} allowed)", inode.size, max - 1)));
        }
        // Bounded just above.
        let len = inode.size as usize;
        let target = if inode.size < I_BLOCK_LEN as u64 {
            // A fast symlink: the target is in i_block (how e2fsprogs and
            // current kernels decide, by size alone).
            inode.i_block.get(..len).ok_or_else(|| corrupt(what.as_str(), "fast symlink target"))?.to_vec()
        } else {
            let map = FileMap::load(self, &inode)?;
            let mut buf = vec![0u8; len];
            let got = map.read_at(self, 0, &mut buf)?;
            if got != len {
                return Err(corrupt(what, format!("read {got} of its {len} bytes")));
            }
            buf
        };
        if target.contains(&0) {
            return Err(corrupt(what, "the target contains a NUL byte"));
        }
        Ok(target)
    }

    /// Every entry of directory `dir`, in on-disk order, `.` and `..`
    /// included as stored; deleted entries and checksum tails left out.
    pub fn read_dir(&self, dir: u64) -> Result<Vec<DirEntry>, Ext4Error> {
        let mut entries = Vec::new();
        self.scan_dir(dir, |entry| -> Result<Option<()>, Ext4Error> {
            let kind = match entry.kind {
                Some(kind) => kind,
                None => self.inode(entry.ino)?.kind,
            };
            entries.push(DirEntry { ino: entry.ino, name: entry.name.to_vec(), kind });
            Ok(None)
        })?;
        Ok(entries)
    }

    /// The inode that `name` names in directory `dir`, if any. A linear scan:
    /// hash-tree directories are read as plain ones.
    pub fn lookup(&self, dir: u64, name: &[u8]) -> Result<Option<u64>, Ext4Error> {
        self.scan_dir(dir, |entry| Ok((entry.name == name).then_some(entry.ino)))
    }

    /// Calls `visit` on each live entry of `dir` until it returns a value.
    fn scan_dir<T>(
        &self,
        dir: u64,
        mut visit: impl FnMut(RawEntry<'_>) -> Result<Option<T>, Ext4Error>,
    ) -> Result<Option<T>, Ext4Error> {
        let inode = self.inode(dir)?;
        if inode.kind != FileKind::Directory {
            return Err(Ext4Error::NotADirectory { ino: dir, kind: inode.kind });
        }
        let map = FileMap::load(self, &inode)?;
        let block_size = u64::from(self.sb.block_size);
        if inode.size % block_size != 0 {
            return Err(corrupt(
                format!("directory inode {dir}"),
                format!("size {} is not a whole number of {block_size}-byte blocks", inode.size),
            ));
        }
        // The map's physical blocks never overlap (FileMap::load checks),
        // so the directory is at most as large as the filesystem: the scan
        // is bounded by the image, and `entries` by what it holds.
        let mut block = vec![0u8; self.sb.block_size as usize];
        for index in 0..inode.size / block_size {
            let what = format!("directory inode {dir}, block {index}");
            if map.run_at(index).is_none_or(|run| matches!(run, Run::Zeros { .. })) {
                return Err(corrupt(what, "a hole or unwritten extent in a directory"));
            }
            let got = map.read_at(self, index * block_size, &mut block)?;
            if got != block.len() {
                return Err(corrupt(what, "short read"));
            }
            let mut offset = 0usize;
            while offset < block.len() {
                let (entry, rec_len) = self.parse_dirent(&block, offset, &what)?;
                if let Some(entry) = entry
                    && let Some(found) = visit(entry)?
                {
                    return Ok(Some(found));
                }
                offset += rec_len;
            }
        }
        Ok(None)
    }

    /// Parses the entry at `offset` of a directory block: the entry if it is
    /// live, and its record length (at least 12, so every scan advances).
    fn parse_dirent<'b>(
        &self,
        block: &'b [u8],
        offset: usize,
        what: &str,
    ) -> Result<(Option<RawEntry<'b>>, usize), Ext4Error> {
        let r = Raw::new(block, what);
        let ino = r.u32(offset)?;
        let raw_rec_len = r.u16(offset + 4)?;
        // 64 KiB blocks store a whole-block record length in 16 bits.
        let rec_len = if self.sb.block_size == 65536 && (raw_rec_len == 0 || raw_rec_len == 65535) {
            65536
        } else {
            usize::from(raw_rec_len & 0xFFFC) | (usize::from(raw_rec_len & 3) << 16)
        };
        let name_len =
            if self.sb.has_filetype { usize::from(r.u8(offset + 6)?) } else { usize::from(r.u16(offset + 6)?) };
        let at = || format!("{what}, entry at byte {offset}");
        if rec_len < 12 || rec_len % 4 != 0 || rec_len < 8 + name_len || offset + rec_len > block.len() {
            return Err(corrupt(
                at(),
                format!(
                    "record length {rec_len} for a {name_len}-byte name (at least 12, 4-aligned, inside the block)"
                ),
            ));
        }
        if ino == 0 {
            // Deleted, an htree node's empty entry, or the checksum tail.
            return Ok((None, rec_len));
        }
        if ino > self.sb.inodes_count {
            return Err(corrupt(at(), format!("inode {ino} is out of range (1 to {})", self.sb.inodes_count)));
        }
        if name_len == 0 || name_len > 255 {
            return Err(corrupt(at(), format!("name length {name_len} (1 to 255)")));
        }
        // Inside the block: rec_len >= 8 + name_len was checked above.
        let name =
            block.get(offset + 8..offset + 8 + name_len).ok_or_else(|| corrupt(at(), "the name is past the block"))?;
        // A name with a slash or a NUL would let a server's caller walk
        // somewhere else than it asked.
        if name.contains(&b'/') || name.contains(&0) {
            return Err(corrupt(at(), "the name contains '/' or a NUL byte"));
        }
        let kind = if self.sb.has_filetype { FileKind::from_dirent_type(r.u8(offset + 7)?) } else { None };
        Ok((Some(RawEntry { ino: u64::from(ino), name, kind }), rec_len))
    }

    /// Reads exactly `buf.len()` bytes of the filesystem at `offset`.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8], what: &str) -> Result<(), Ext4Error> {
        read_exact(self.volume.as_ref(), offset, buf, what)
    }
}

/// A live directory entry, borrowed from its block.
struct RawEntry<'b> {
    ino: u64,
    name: &'b [u8],
    /// `None` without the `filetype` feature, or for a type byte it does
    /// not know: the inode says.
    kind: Option<FileKind>,
}

/// Reads until `buf` is full or the volume ends; returns how much was read.
/// One call does it: a [`Volume`] reads short only at its end.
fn read_full(volume: &dyn Volume, offset: u64, buf: &mut [u8]) -> Result<usize, Ext4Error> {
    Ok(volume.read_at(offset, buf)?.min(buf.len()))
}

fn read_exact(volume: &dyn Volume, offset: u64, buf: &mut [u8], what: &str) -> Result<(), Ext4Error> {
    let got = read_full(volume, offset, buf)?;
    if got < buf.len() {
        return Err(corrupt(what, format!("bytes {offset}..+{} are past the volume's end", buf.len())));
    }
    Ok(())
}
