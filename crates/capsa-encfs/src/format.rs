//! The image's bytes: the manifest, the chunk objects, and the keys derived
//! from an image's master key.
//!
//! An image is a set of objects under one prefix (a directory, or a prefix in
//! a bucket):
//!
//! - `manifest`: the image's identity and geometry, and for every chunk the
//!   generation of the object that holds it and the SHA-256 of that object's
//!   metadata table, closed by an HMAC-SHA256 under a key derived from the
//!   master key. It is the only object ever replaced; it is replaced whole,
//!   atomically, so it is also the commit point.
//! - `chunks/<index>-<generation>`: a chunk of `blocks_per_chunk` 4 KiB
//!   blocks: a metadata table of one (nonce, tag) pair per block, then the
//!   blocks' AES-256-GCM ciphertexts. A chunk object is written once and never
//!   modified: a commit writes new objects under a new generation, then the
//!   manifest that names them.
//!
//! What authenticates what: a block's tag covers its ciphertext, the image id
//! and the block's index (so a block moved elsewhere, or into another image,
//! fails); the manifest's hash of the metadata table covers every tag of the
//! chunk and the object's generation (so an older object, or another chunk's,
//! fails); the manifest's MAC covers the hashes and the geometry (so a changed,
//! shortened or lengthened manifest fails). Rolling the whole image back to an
//! older manifest with its objects cannot be told from the image alone: that
//! needs state outside it (docs/encfs.md).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::{digest, hkdf, hmac, rand};
use zeroize::Zeroizing;

use crate::Error;

/// Bytes in a block: the unit of encryption and of authentication.
pub const BLOCK_SIZE: usize = 4096;
/// [`BLOCK_SIZE`] as the u64 offsets are computed in.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Bytes of a block's AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes of one metadata entry: the block's nonce, then its tag.
pub const ENTRY_LEN: usize = NONCE_LEN + TAG_LEN;
/// Blocks per chunk unless `capsa encfs create` is told otherwise: 1 MiB
/// chunks keep a commit's rewrite small and a 10 GiB manifest at 400 KiB.
pub const DEFAULT_BLOCKS_PER_CHUNK: u32 = 256;
/// The most blocks an image may have (16 TiB): block indexes fit in a u32 in
/// the names and every count below fits comfortably.
pub const MAX_BLOCKS: u64 = 1 << 32;
/// Encryptions allowed under one key. Nonces are random 96-bit values, so
/// after 2^32 of them the chance of a repeat is no longer negligible (NIST SP
/// 800-38D, 8.3); past it the image refuses writes and must be re-keyed.
pub const MAX_BLOCK_WRITES: u64 = 1 << 32;

const MAGIC: &[u8; 8] = b"CAPSAEF1";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 4 + 4 + 4 + 16 + 8 + 8 + 8 + 8 + 16;
const MANIFEST_ENTRY_LEN: usize = 8 + 32;
const MAC_LEN: usize = 32;

/// A 256-bit image key, as released by the trust service. Zeroized on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, Error> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::fill(key.as_mut_slice()).map_err(|_| Error::Crypto("the system random generator failed"))?;
        Ok(Self(key))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, Error> {
        let array: [u8; 32] = bytes.try_into().map_err(|_| Error::KeyLength(bytes.len()))?;
        Ok(Self(Zeroizing::new(array)))
    }

    /// The key's bytes, to hand to the trust service.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

/// The keys one image uses, derived from its master key and image id with
/// HKDF-SHA256, so that one master key never encrypts two images' blocks
/// under the same AES key.
pub(crate) struct ImageKeys {
    blocks: LessSafeKey,
    manifest: hmac::Key,
    check: [u8; 16],
}

impl ImageKeys {
    pub(crate) fn derive(master: &MasterKey, image_id: &[u8; 16]) -> Result<Self, Error> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, image_id).extract(master.as_bytes());
        let expand = |label: &[u8]| -> Result<Zeroizing<[u8; 32]>, Error> {
            let mut out = Zeroizing::new([0u8; 32]);
            prk.expand(&[label], hkdf::HKDF_SHA256)
                .and_then(|okm| okm.fill(out.as_mut_slice()))
                .map_err(|_| Error::Crypto("key derivation failed"))?;
            Ok(out)
        };
        let block_key = expand(b"capsa-encfs v1 block encryption")?;
        let mac_key = expand(b"capsa-encfs v1 manifest authentication")?;
        let check_key = expand(b"capsa-encfs v1 key check")?;
        let blocks = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, block_key.as_slice()).map_err(|_| Error::Crypto("AES-256-GCM key"))?,
        );
        // The check value is derived output, not the key: it tells "wrong
        // key" from "modified manifest" and reveals nothing usable.
        let mut check = [0u8; 16];
        check.iter_mut().zip(check_key.iter()).for_each(|(c, k)| *c = *k);
        Ok(Self { blocks, manifest: hmac::Key::new(hmac::HMAC_SHA256, mac_key.as_slice()), check })
    }

    /// Encrypts a block in place with a fresh random nonce; returns its
    /// metadata entry.
    pub(crate) fn seal_block(&self, image_id: &[u8; 16], index: u64, block: &mut [u8]) -> Result<Entry, Error> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::fill(&mut nonce).map_err(|_| Error::Crypto("the system random generator failed"))?;
        let tag = self
            .blocks
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(block_aad(image_id, index)),
                block,
            )
            .map_err(|_| Error::Crypto("block encryption failed"))?;
        let mut entry = Entry { nonce, tag: [0u8; TAG_LEN] };
        entry.tag.copy_from_slice(tag.as_ref());
        Ok(entry)
    }

    /// Decrypts a block in place; on failure the block is zeroed, never
    /// handed on.
    pub(crate) fn open_block(&self, image_id: &[u8; 16], index: u64, entry: &Entry, block: &mut [u8]) -> bool {
        let opened = self.blocks.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(entry.nonce),
            Aad::from(block_aad(image_id, index)),
            &entry.tag,
            block,
        );
        if opened.is_err() {
            block.fill(0);
            return false;
        }
        true
    }
}

fn block_aad(image_id: &[u8; 16], index: u64) -> [u8; 24] {
    let mut aad = [0u8; 24];
    aad[..16].copy_from_slice(image_id);
    aad[16..].copy_from_slice(&index.to_le_bytes());
    aad
}

/// One block's nonce and tag, as kept in its chunk's metadata table.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) nonce: [u8; NONCE_LEN],
    pub(crate) tag: [u8; TAG_LEN],
}

/// The bytes of a chunk's metadata table: one entry per block slot, padded to
/// whole blocks so that the ciphertexts after it stay block-aligned.
pub(crate) fn meta_table_len(blocks_per_chunk: u32) -> usize {
    let raw = blocks_per_chunk as usize * ENTRY_LEN;
    raw.div_ceil(BLOCK_SIZE) * BLOCK_SIZE
}

/// A chunk's verified metadata table.
pub(crate) struct MetaTable {
    entries: Vec<Entry>,
}

impl MetaTable {
    pub(crate) fn new(entries: Vec<Entry>) -> Self {
        Self { entries }
    }

    /// Parses a table whose hash was already checked against the manifest.
    pub(crate) fn parse(bytes: &[u8], blocks_per_chunk: u32) -> Option<Self> {
        let entries = bytes
            .chunks_exact(ENTRY_LEN)
            .take(blocks_per_chunk as usize)
            .map(|raw| {
                let (nonce, tag) = raw.split_at(NONCE_LEN);
                Some(Entry { nonce: nonce.try_into().ok()?, tag: tag.try_into().ok()? })
            })
            .collect::<Option<Vec<_>>>()?;
        (entries.len() == blocks_per_chunk as usize).then_some(Self { entries })
    }

    pub(crate) fn entry(&self, slot: usize) -> Option<&Entry> {
        self.entries.get(slot)
    }

    pub(crate) fn encode(&self, blocks_per_chunk: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(meta_table_len(blocks_per_chunk));
        for entry in &self.entries {
            out.extend_from_slice(&entry.nonce);
            out.extend_from_slice(&entry.tag);
        }
        out.resize(meta_table_len(blocks_per_chunk), 0);
        out
    }
}

/// The hash the manifest keeps of a chunk object's metadata table: binds the
/// table to the image, the chunk's index and the object's generation.
pub(crate) fn meta_hash(image_id: &[u8; 16], chunk: u64, generation: u64, table: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"capsa-encfs v1 chunk");
    ctx.update(image_id);
    ctx.update(&chunk.to_le_bytes());
    ctx.update(&generation.to_le_bytes());
    ctx.update(table);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Where one chunk lives: the generation of its object and its table's hash.
/// Generation 0 means never written: every block reads as zeros, and no
/// object exists.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct ChunkRef {
    pub(crate) generation: u64,
    pub(crate) meta_hash: [u8; 32],
}

impl ChunkRef {
    pub(crate) const ABSENT: Self = Self { generation: 0, meta_hash: [0u8; 32] };
}

/// The object name of a chunk's object of one generation.
pub(crate) fn chunk_object(chunk: u64, generation: u64) -> String {
    format!("chunks/{chunk:08x}-{generation:016x}")
}

/// The object name of the manifest.
pub(crate) const MANIFEST_OBJECT: &str = "manifest";

/// The image's geometry and identity: what never changes after creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Random at creation; binds every block and table to this image.
    pub image_id: [u8; 16],
    /// Blocks in the image (its size is this times 4096).
    pub block_count: u64,
    /// Blocks per chunk object.
    pub blocks_per_chunk: u32,
}

impl Geometry {
    /// Chunks in the image.
    pub fn chunk_count(&self) -> u64 {
        self.block_count.div_ceil(u64::from(self.blocks_per_chunk))
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.block_count * BLOCK_SIZE_U64
    }

    /// Blocks in a chunk (the last may be short).
    pub(crate) fn blocks_in_chunk(&self, chunk: u64) -> u64 {
        let first = chunk * u64::from(self.blocks_per_chunk);
        self.block_count.saturating_sub(first).min(u64::from(self.blocks_per_chunk))
    }
}

/// A decoded, authenticated manifest.
#[derive(Clone, Debug)]
pub(crate) struct Manifest {
    pub(crate) geometry: Geometry,
    /// Increases by one at every commit; names the objects it wrote.
    pub(crate) generation: u64,
    /// Blocks encrypted under this key so far (see [`MAX_BLOCK_WRITES`]).
    pub(crate) block_writes: u64,
    pub(crate) chunks: Vec<ChunkRef>,
}

/// What the manifest says before its MAC is checked: enough to derive the
/// keys and to say which image it is.
pub struct ManifestHeader {
    /// The image's geometry.
    pub geometry: Geometry,
    /// The commit generation.
    pub generation: u64,
    block_writes: u64,
    key_check: [u8; 16],
}

impl ManifestHeader {
    /// Reads the header of manifest bytes without authenticating them.
    pub fn peek(bytes: &[u8]) -> Result<Self, Error> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r.take(8)?;
        if magic != MAGIC {
            return Err(Error::Format("not a capsa encfs manifest (bad magic)".into()));
        }
        let version = r.u32()?;
        if version != FORMAT_VERSION {
            return Err(Error::Format(format!("manifest format version {version}; this capsa reads version 1")));
        }
        let block_size = r.u32()?;
        if block_size as usize != BLOCK_SIZE {
            return Err(Error::Format(format!("block size {block_size}; capsa encfs images use 4096")));
        }
        let blocks_per_chunk = r.u32()?;
        check_blocks_per_chunk(blocks_per_chunk)?;
        let _reserved = r.u32()?;
        let image_id: [u8; 16] = r.array()?;
        let block_count = r.u64()?;
        if block_count == 0 || block_count > MAX_BLOCKS {
            return Err(Error::Format(format!("{block_count} blocks: expected 1 to 2^32")));
        }
        let generation = r.u64()?;
        let block_writes = r.u64()?;
        let chunk_count = r.u64()?;
        let key_check: [u8; 16] = r.array()?;
        let geometry = Geometry { image_id, block_count, blocks_per_chunk };
        if chunk_count != geometry.chunk_count() {
            return Err(Error::Format(format!(
                "{chunk_count} chunks listed; {block_count} blocks of {blocks_per_chunk} per chunk need {}",
                geometry.chunk_count()
            )));
        }
        Ok(Self { geometry, generation, block_writes, key_check })
    }
}

impl Manifest {
    /// Decodes and authenticates manifest bytes.
    pub(crate) fn decode(bytes: &[u8], keys: &ImageKeys) -> Result<Self, Error> {
        let header = ManifestHeader::peek(bytes)?;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&header.key_check[..], &keys.check[..])) {
            return Err(Error::WrongKey);
        }
        let chunk_count = usize::try_from(header.geometry.chunk_count())
            .map_err(|_| Error::Format("too many chunks for this machine".into()))?;
        let body_len = chunk_count
            .checked_mul(MANIFEST_ENTRY_LEN)
            .and_then(|n| n.checked_add(HEADER_LEN))
            .ok_or_else(|| Error::Format("manifest length overflows".into()))?;
        if bytes.len() != body_len + MAC_LEN {
            return Err(Error::ManifestIntegrity(format!(
                "{} bytes where {} chunks need {}",
                bytes.len(),
                chunk_count,
                body_len + MAC_LEN
            )));
        }
        let (body, mac) = bytes.split_at(body_len);
        hmac::verify(&keys.manifest, body, mac)
            .map_err(|_| Error::ManifestIntegrity("its MAC does not match its contents".into()))?;
        let mut r = Reader { bytes: body, at: HEADER_LEN };
        let mut chunks = Vec::with_capacity(chunk_count);
        for _ in 0..chunk_count {
            let generation = r.u64()?;
            let meta_hash: [u8; 32] = r.array()?;
            if generation > header.generation {
                return Err(Error::ManifestIntegrity(format!(
                    "a chunk of generation {generation} in a manifest of generation {}",
                    header.generation
                )));
            }
            chunks.push(ChunkRef { generation, meta_hash });
        }
        Ok(Self { geometry: header.geometry, generation: header.generation, block_writes: header.block_writes, chunks })
    }

    pub(crate) fn encode(&self, keys: &ImageKeys) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.chunks.len() * MANIFEST_ENTRY_LEN + MAC_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        out.extend_from_slice(&self.geometry.blocks_per_chunk.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.geometry.image_id);
        out.extend_from_slice(&self.geometry.block_count.to_le_bytes());
        out.extend_from_slice(&self.generation.to_le_bytes());
        out.extend_from_slice(&self.block_writes.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        out.extend_from_slice(&keys.check);
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.generation.to_le_bytes());
            out.extend_from_slice(&chunk.meta_hash);
        }
        let mac = hmac::sign(&keys.manifest, &out);
        out.extend_from_slice(mac.as_ref());
        out
    }
}

/// Chunks hold a power of two of blocks, up to 65536 (256 MiB).
pub(crate) fn check_blocks_per_chunk(blocks_per_chunk: u32) -> Result<(), Error> {
    if !(1..=65536).contains(&blocks_per_chunk) || !blocks_per_chunk.is_power_of_two() {
        return Err(Error::Format(format!("{blocks_per_chunk} blocks per chunk: expected a power of two up to 65536")));
    }
    Ok(())
}

/// What an authenticated manifest says: the image's geometry, its commit
/// generation, and how many blocks its chunks store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ManifestSummary {
    /// The geometry.
    pub geometry: Geometry,
    /// The commit generation.
    pub generation: u64,
    /// Chunks that have an object (the others were never written).
    pub stored_chunks: u64,
}

/// Authenticates manifest bytes (untrusted: they come from the store) with
/// the image's key, without opening the image.
pub fn authenticate_manifest(bytes: &[u8], key: &MasterKey) -> Result<ManifestSummary, Error> {
    let header = ManifestHeader::peek(bytes)?;
    let keys = ImageKeys::derive(key, &header.geometry.image_id)?;
    let manifest = Manifest::decode(bytes, &keys)?;
    Ok(ManifestSummary {
        geometry: manifest.geometry,
        generation: manifest.generation,
        stored_chunks: manifest.chunks.iter().filter(|c| c.generation != 0).count() as u64,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Error> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(Error::Format("the manifest is truncated".into()));
        };
        let out = self.bytes.get(self.at..end).ok_or_else(|| Error::Format("the manifest is truncated".into()))?;
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        self.take(N)?.try_into().map_err(|_| Error::Format("the manifest is truncated".into()))
    }

    fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(id: &[u8; 16]) -> ImageKeys {
        ImageKeys::derive(&MasterKey::from_bytes(&[7u8; 32]).unwrap(), id).unwrap()
    }

    fn manifest() -> Manifest {
        let geometry = Geometry { image_id: [1u8; 16], block_count: 1000, blocks_per_chunk: 256 };
        let mut chunks = vec![ChunkRef::ABSENT; 4];
        chunks[2] = ChunkRef { generation: 3, meta_hash: [9u8; 32] };
        Manifest { geometry, generation: 3, block_writes: 77, chunks }
    }

    #[test]
    fn manifest_round_trips_and_every_byte_is_authenticated() {
        let m = manifest();
        let k = keys(&m.geometry.image_id);
        let bytes = m.encode(&k);
        let back = Manifest::decode(&bytes, &k).unwrap();
        assert_eq!(back.chunks, m.chunks);
        assert_eq!((back.generation, back.block_writes), (3, 77));
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x01;
            assert!(Manifest::decode(&bad, &k).is_err(), "flipping byte {at} went unnoticed");
        }
        for len in 0..bytes.len() {
            assert!(Manifest::decode(&bytes[..len], &k).is_err(), "truncation to {len} went unnoticed");
        }
    }

    #[test]
    fn another_key_is_named_as_the_wrong_key() {
        let m = manifest();
        let bytes = m.encode(&keys(&m.geometry.image_id));
        let other = ImageKeys::derive(&MasterKey::from_bytes(&[8u8; 32]).unwrap(), &m.geometry.image_id).unwrap();
        assert!(matches!(Manifest::decode(&bytes, &other), Err(Error::WrongKey)));
    }

    #[test]
    fn a_block_opens_only_at_its_own_index_in_its_own_image() {
        let id = [5u8; 16];
        let k = keys(&id);
        let mut block = vec![0xabu8; BLOCK_SIZE];
        let entry = k.seal_block(&id, 42, &mut block).unwrap();
        let sealed = block.clone();
        assert!(k.open_block(&id, 42, &entry, &mut block));
        assert_eq!(block, vec![0xabu8; BLOCK_SIZE]);
        let mut moved = sealed.clone();
        assert!(!k.open_block(&id, 43, &entry, &mut moved));
        assert!(moved.iter().all(|b| *b == 0), "a failed block is zeroed");
        let mut elsewhere = sealed.clone();
        assert!(!k.open_block(&[6u8; 16], 42, &entry, &mut elsewhere));
    }

    #[test]
    fn meta_tables_are_block_aligned() {
        assert_eq!(meta_table_len(256), 8192);
        assert_eq!(meta_table_len(1), 4096);
        assert_eq!(meta_table_len(146), 4096);
        assert_eq!(meta_table_len(147), 8192);
    }
}
