//! A file's block map, loaded once: from its extent tree (ext4) or its
//! indirect blocks (ext2/ext3), into one sorted vector of extents, so that a
//! random read is a binary search and not a walk from the file's start.

use std::collections::HashSet;

use super::{
    EXT4_ENCRYPT_FL, EXT4_EXTENTS_FL, EXT4_INLINE_DATA_FL, Ext4, Ext4Error, FileKind, I_BLOCK_LEN, Inode,
    MAX_EXTENT_DEPTH, Raw, corrupt,
};

const EXTENT_MAGIC: u16 = 0xF30A;
/// An extent header, index or leaf entry: 12 bytes each.
const ENTRY_LEN: usize = 12;
/// Lengths above this mark an unwritten (preallocated) extent.
const MAX_INITIALIZED_LEN: u16 = 32768;
/// Logical block numbers are 32 bits wide.
const LOGICAL_LIMIT: u64 = 1 << 32;
/// Block map: 12 direct pointers, then single, double and triple indirect.
const DIRECT_BLOCKS: u64 = 12;

/// A run of a file's blocks that are contiguous both in the file and on the
/// volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// The first block in the file.
    pub logical_block: u64,
    /// Where that block is on the volume (in filesystem blocks).
    pub physical_block: u64,
    /// How many blocks, at least 1.
    pub blocks: u64,
    /// False for an unwritten (preallocated) extent, which reads as zeros.
    pub initialized: bool,
}

/// What a file holds from one logical block on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// `blocks` blocks stored contiguously from `physical_block`: one volume
    /// read covers them.
    Data {
        /// Where the run starts on the volume (in filesystem blocks).
        physical_block: u64,
        /// How many blocks, at least 1, none past the file's end.
        blocks: u64,
    },
    /// `blocks` blocks that read as zeros: a hole or an unwritten extent.
    Zeros {
        /// How many blocks, at least 1, none past the file's end.
        blocks: u64,
    },
}

/// Where a file's bytes are: its extents sorted by logical block, never
/// overlapping, adjacent runs merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMap {
    ino: u64,
    size: u64,
    block_size: u32,
    extents: Vec<Extent>,
    extent_tree_depth: Option<u16>,
}

impl FileMap {
    pub(super) fn load(fs: &Ext4, inode: &Inode) -> Result<FileMap, Ext4Error> {
        let ino = inode.ino;
        match inode.kind {
            FileKind::Regular | FileKind::Directory => {}
            FileKind::Symlink if inode.size >= I_BLOCK_LEN as u64 => {}
            kind => return Err(Ext4Error::NoData { ino, kind }),
        }
        if inode.flags & (EXT4_INLINE_DATA_FL | EXT4_ENCRYPT_FL) != 0 {
            return Err(corrupt(
                format!("inode {ino}"),
                "inline-data or encryption flag set on a filesystem without that feature",
            ));
        }
        let block_size = fs.sb.block_size;
        let mut builder = Builder::new(fs, ino);
        let extent_tree_depth = if inode.flags & EXT4_EXTENTS_FL != 0 {
            Some(builder.extent_tree(&inode.i_block)?)
        } else {
            builder.block_map(&inode.i_block, inode.size.div_ceil(u64::from(block_size)))?;
            None
        };
        let extents = builder.extents;
        // Two logical blocks on one physical block never happens in a sound
        // filesystem (outside `shared_blocks`), and refusing it bounds a
        // directory, which is read whole, by the filesystem's size.
        if !fs.sb.shared_blocks || inode.kind != FileKind::Regular {
            check_no_shared_blocks(ino, &extents)?;
        }
        Ok(FileMap { ino, size: inode.size, block_size, extents, extent_tree_depth })
    }

    /// The inode this maps.
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// The file's size in bytes: reads stop there.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The filesystem's block size, the unit of the extents.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// The extents, sorted by logical block; gaps between them are holes.
    /// They may reach past the file's size (preallocated space).
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The depth of the file's extent tree (0: the extents fit in the
    /// inode), or `None` for a file mapped by ext2/ext3 indirect blocks.
    pub fn extent_tree_depth(&self) -> Option<u16> {
        self.extent_tree_depth
    }

    /// What the file holds from `logical_block` on, up to the next change
    /// (or the file's end); `None` at or past the end.
    pub fn run_at(&self, logical_block: u64) -> Option<Run> {
        let file_blocks = self.size.div_ceil(u64::from(self.block_size));
        if logical_block >= file_blocks {
            return None;
        }
        let after = self.extents.partition_point(|e| e.logical_block <= logical_block);
        if let Some(extent) = after.checked_sub(1).and_then(|i| self.extents.get(i)) {
            let end = extent.logical_block.saturating_add(extent.blocks);
            if logical_block < end {
                let blocks = end.min(file_blocks) - logical_block;
                return Some(if extent.initialized {
                    Run::Data { physical_block: extent.physical_block + (logical_block - extent.logical_block), blocks }
                } else {
                    Run::Zeros { blocks }
                });
            }
        }
        let next = self.extents.get(after).map_or(file_blocks, |e| e.logical_block.min(file_blocks));
        Some(Run::Zeros { blocks: next - logical_block })
    }

    /// Reads the file's bytes at `offset`: holes and unwritten extents as
    /// zeros, nothing past the file's size, one volume read per
    /// physically contiguous run. Returns how many bytes were read, fewer
    /// than `buf.len()` only at the file's end. `fs` must be the filesystem
    /// this map came from.
    pub fn read_at(&self, fs: &Ext4, offset: u64, buf: &mut [u8]) -> Result<usize, Ext4Error> {
        if offset >= self.size {
            return Ok(0);
        }
        // Bounded by buf.len().
        let want = (self.size - offset).min(buf.len() as u64) as usize;
        let block_size = u64::from(self.block_size);
        let mut done = 0usize;
        while done < want {
            let pos = offset + done as u64;
            let within = pos % block_size;
            let Some(run) = self.run_at(pos / block_size) else { break };
            let (blocks, physical) = match run {
                Run::Data { physical_block, blocks } => (blocks, Some(physical_block)),
                Run::Zeros { blocks } => (blocks, None),
            };
            // At least 1 byte: a run has at least one block and `within`
            // is inside the first.
            let run_bytes = blocks.saturating_mul(block_size) - within;
            let n = usize::try_from(run_bytes).unwrap_or(usize::MAX).min(want - done);
            let Some(dst) = buf.get_mut(done..done + n) else { break };
            match physical {
                // The run was checked against the block count, which
                // `open` checked against the volume: no overflow.
                Some(physical_block) => fs.read_exact_at(physical_block * block_size + within, dst, "file data")?,
                None => dst.fill(0),
            }
            done += n;
        }
        Ok(done)
    }
}

fn check_no_shared_blocks(ino: u64, extents: &[Extent]) -> Result<(), Ext4Error> {
    let mut by_physical: Vec<(u64, u64)> = extents.iter().map(|e| (e.physical_block, e.blocks)).collect();
    by_physical.sort_unstable();
    for pair in by_physical.windows(2) {
        if let [(a, a_len), (b, _)] = pair
            && a.saturating_add(*a_len) > *b
        {
            return Err(corrupt(
                format!("block map of inode {ino}"),
                format!("physical block {b} is mapped twice (also by the run from block {a})"),
            ));
        }
    }
    Ok(())
}

/// Collects a file's extents in logical order, checking each against the
/// ones before it and against the filesystem's size.
struct Builder<'a> {
    fs: &'a Ext4,
    ino: u64,
    extents: Vec<Extent>,
    /// Blocks mapped so far: a sound file maps at most the filesystem.
    mapped: u64,
    /// Indirect blocks read so far: each may be read once, so a block map
    /// that points back into itself fails instead of multiplying work.
    indirect_seen: HashSet<u64>,
}

impl<'a> Builder<'a> {
    fn new(fs: &'a Ext4, ino: u64) -> Self {
        Builder { fs, ino, extents: Vec::new(), mapped: 0, indirect_seen: HashSet::new() }
    }

    fn what(&self) -> String {
        format!("block map of inode {}", self.ino)
    }

    /// Appends a run that must start at or after the end of the last one.
    fn push(
        &mut self,
        logical_block: u64,
        physical_block: u64,
        blocks: u64,
        initialized: bool,
    ) -> Result<(), Ext4Error> {
        let blocks_count = self.fs.sb.blocks_count;
        if physical_block.checked_add(blocks).is_none_or(|end| end > blocks_count) || blocks == 0 {
            return Err(corrupt(
                self.what(),
                format!(
                    "blocks {physical_block}..+{blocks} at file block {logical_block} are outside the filesystem ({blocks_count} blocks)"
                ),
            ));
        }
        self.mapped = self.mapped.saturating_add(blocks);
        if self.mapped > blocks_count {
            return Err(corrupt(self.what(), format!("maps more blocks than the filesystem's {blocks_count}")));
        }
        if let Some(last) = self.extents.last_mut() {
            let last_end = last.logical_block + last.blocks;
            if logical_block < last_end {
                return Err(corrupt(
                    self.what(),
                    format!(
                        "extents out of order or overlapping at file block {logical_block} (the one before ends at {last_end})"
                    ),
                ));
            }
            if logical_block == last_end
                && last.initialized == initialized
                && last.physical_block + last.blocks == physical_block
            {
                last.blocks += blocks;
                return Ok(());
            }
        }
        self.extents.push(Extent { logical_block, physical_block, blocks, initialized });
        Ok(())
    }

    fn read_block(&self, block: u64, what: &str) -> Result<Vec<u8>, Ext4Error> {
        let blocks_count = self.fs.sb.blocks_count;
        if block >= blocks_count || block <= u64::from(self.fs.sb.first_data_block) {
            let first = u64::from(self.fs.sb.first_data_block) + 1;
            return Err(corrupt(
                what,
                format!("block {block} is outside the filesystem's data blocks ({first} to {})", blocks_count - 1),
            ));
        }
        let block_size = u64::from(self.fs.sb.block_size);
        let mut buf = vec![0u8; self.fs.sb.block_size as usize];
        self.fs.read_exact_at(block * block_size, &mut buf, what)?;
        Ok(buf)
    }

    /// Loads the extent tree rooted in `i_block`; returns its depth.
    fn extent_tree(&mut self, i_block: &[u8]) -> Result<u16, Ext4Error> {
        let what = format!("extent tree root of inode {}", self.ino);
        self.extent_node(i_block, None, 0, LOGICAL_LIMIT, &what)
    }

    /// Walks one node. Children must have exactly one level less (so the
    /// walk ends after at most 5 levels), must not be empty, and hold only
    /// extents inside their index entry's range: together with the order
    /// check in `push`, a node reached twice fails instead of being
    /// walked again.
    fn extent_node(
        &mut self,
        node: &[u8],
        expected_depth: Option<u16>,
        lo: u64,
        hi: u64,
        what: &str,
    ) -> Result<u16, Ext4Error> {
        let r = Raw::new(node, what);
        let magic = r.u16(0)?;
        let entries = usize::from(r.u16(2)?);
        let max = usize::from(r.u16(4)?);
        let depth = r.u16(6)?;
        let capacity = node.len().saturating_sub(ENTRY_LEN) / ENTRY_LEN;
        if magic != EXTENT_MAGIC {
            return Err(corrupt(what, format!("extent header magic {magic:#06x}, not 0xf30a")));
        }
        if max > capacity || entries > max {
            return Err(corrupt(what, format!("{entries} entries of at most {max}, in room for {capacity}")));
        }
        if depth > MAX_EXTENT_DEPTH {
            return Err(corrupt(what, format!("depth {depth} (at most {MAX_EXTENT_DEPTH})")));
        }
        if let Some(expected) = expected_depth {
            if depth != expected {
                return Err(corrupt(what, format!("depth {depth} under a node that expects {expected}")));
            }
            if entries == 0 {
                return Err(corrupt(what, "an empty node below the root"));
            }
        }
        for index in 0..entries {
            let at = ENTRY_LEN * (index + 1);
            let first = u64::from(r.u32(at)?);
            if first < lo || first >= hi {
                return Err(corrupt(what, format!("entry {index} starts at file block {first}, outside {lo}..{hi}")));
            }
            if depth == 0 {
                let raw_len = r.u16(at + 4)?;
                let physical = u64::from(r.u32(at + 8)?) | (u64::from(r.u16(at + 6)?) << 32);
                let (blocks, initialized) = if raw_len > MAX_INITIALIZED_LEN {
                    (u64::from(raw_len - MAX_INITIALIZED_LEN), false)
                } else {
                    (u64::from(raw_len), true)
                };
                if blocks == 0 || first + blocks > hi {
                    return Err(corrupt(
                        what,
                        format!("extent {index}: {blocks} blocks from file block {first}, past {hi}"),
                    ));
                }
                self.push(first, physical, blocks, initialized)?;
            } else {
                let child_hi = if index + 1 < entries { u64::from(r.u32(at + ENTRY_LEN)?) } else { hi };
                if child_hi <= first {
                    return Err(corrupt(what, format!("index entries out of order at entry {index}")));
                }
                let child = u64::from(r.u32(at + 4)?) | (u64::from(r.u16(at + 8)?) << 32);
                let child_what = format!("extent tree block {child} of inode {} (depth {})", self.ino, depth - 1);
                let block = self.read_block(child, &child_what)?;
                self.extent_node(&block, Some(depth - 1), first, child_hi, &child_what)?;
            }
        }
        Ok(depth)
    }

    /// Loads an ext2/ext3 block map: 12 direct pointers, then single,
    /// double and triple indirect blocks, up to the file's last block.
    fn block_map(&mut self, i_block: &[u8], file_blocks: u64) -> Result<(), Ext4Error> {
        let what = self.what();
        let r = Raw::new(i_block, &what);
        for index in 0..DIRECT_BLOCKS.min(file_blocks) {
            let pointer = u64::from(r.u32(index as usize * 4)?);
            if pointer != 0 {
                self.push(index, pointer, 1, true)?;
            }
        }
        let per_block = u64::from(self.fs.sb.block_size / 4);
        let mut base = DIRECT_BLOCKS;
        let mut span = per_block;
        for level in 1..=3u32 {
            if base >= file_blocks {
                break;
            }
            let pointer = u64::from(r.u32((DIRECT_BLOCKS as usize - 1 + level as usize) * 4)?);
            self.indirect(pointer, level, base, file_blocks)?;
            base = base.saturating_add(span);
            span = span.saturating_mul(per_block);
        }
        Ok(())
    }

    fn indirect(&mut self, block: u64, level: u32, base: u64, file_blocks: u64) -> Result<(), Ext4Error> {
        if block == 0 || base >= file_blocks {
            // A hole as large as the whole subtree.
            return Ok(());
        }
        let what = format!("indirect block {block} of inode {} (level {level})", self.ino);
        if !self.indirect_seen.insert(block) {
            return Err(corrupt(what, "referenced twice"));
        }
        let data = self.read_block(block, &what)?;
        let per_block = u64::from(self.fs.sb.block_size / 4);
        // Each pointer here covers per_block^(level-1) file blocks.
        let child_span = per_block.saturating_pow(level - 1);
        let words = Raw::new(&data, &what);
        for index in 0..per_block {
            let child_base = base.saturating_add(index.saturating_mul(child_span));
            if child_base >= file_blocks {
                break;
            }
            // index < block_size / 4: inside the block.
            let pointer = u64::from(words.u32(index as usize * 4)?);
            if level == 1 {
                if pointer != 0 {
                    self.push(child_base, pointer, 1, true)?;
                }
            } else {
                self.indirect(pointer, level - 1, child_base, file_blocks)?;
            }
        }
        Ok(())
    }
}
