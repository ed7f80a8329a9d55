//! An open image: reads and writes by byte range over the sealed blocks.
//!
//! Reads check every block against the manifest held in memory, which is
//! trusted from the moment its MAC was checked and changes only through this
//! process's own commits; so within a mount, a block the host rolls back to
//! an older version fails like any other modification.
//!
//! Writes stay in memory until a commit, which happens on fsync, when the
//! dirty set grows past its bound, and in the background (see
//! [`Image::start_writeback`]). A commit writes each changed chunk as a new
//! object, makes them durable, then replaces the manifest: the manifest is
//! the only object ever overwritten, so the image on the store is always
//! some committed state, whatever moment a crash picks.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, Weak};
use std::time::Duration;

use lru::LruCache;

use crate::Error;
use crate::format::{
    self, BLOCK_SIZE, BLOCK_SIZE_U64, ChunkRef, Entry, Geometry, ImageKeys, MANIFEST_OBJECT, MAX_BLOCK_WRITES,
    MAX_BLOCKS, Manifest, ManifestHeader, MasterKey, MetaTable,
};
use crate::store::{Store, StoreError};

/// How an image is opened.
#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// Plaintext blocks kept in memory (each 4 KiB).
    pub cache_blocks: usize,
    /// Verified chunk metadata tables kept in memory.
    pub cache_tables: usize,
    /// Dirty bytes at which a write waits for a commit.
    pub dirty_limit: usize,
    /// Blocks fetched around a small read that misses the cache (aligned,
    /// within its chunk): fetching 32 KiB costs a disk or an object store
    /// about what 4 KiB does, and neighbours are often next. From a store
    /// that caches reads itself (local files) only the blocks asked for are
    /// decrypted, since the rest stay in the page cache; from a remote
    /// store the whole window is decrypted and cached.
    pub read_around: u32,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self { read_only: false, cache_blocks: 16 * 1024, cache_tables: 1024, dirty_limit: 256 << 20, read_around: 8 }
    }
}

type Blocks = BTreeMap<u64, Box<[u8]>>;

/// Reads of up to this many blocks go through the plaintext cache.
const CACHED_READ_BLOCKS: u64 = 16;

struct State {
    /// The last committed manifest: what every read is checked against.
    manifest: Manifest,
    /// Blocks written since the last commit began.
    dirty: Blocks,
    /// Blocks the running commit is writing; still served to reads.
    committing: Arc<Blocks>,
    tables: LruCache<(u64, u64), Arc<MetaTable>>,
    blocks: LruCache<u64, Box<[u8]>>,
    /// The next generation a commit may use: never reused, even when a
    /// commit fails half-way and leaves objects of its generation behind.
    next_generation: u64,
    failed: Option<String>,
}

/// An open image.
pub struct Image {
    store: Arc<dyn Store>,
    keys: ImageKeys,
    geometry: Geometry,
    options: OpenOptions,
    state: Mutex<State>,
    /// Serializes commits.
    commit: Mutex<()>,
    /// Readers of chunk objects hold it shared; deleting superseded objects
    /// holds it exclusively, so a read never loses its object mid-way.
    objects: RwLock<()>,
    writeback: Writeback,
    /// Bytes of chunk objects read from the store (see `fetched_bytes`).
    fetched: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Writeback {
    stop: AtomicBool,
    wake: Condvar,
    /// A commit is wanted now, not at the next interval.
    lock: Mutex<bool>,
}

impl Image {
    /// Creates an empty image of `size` bytes (rounded up to whole blocks) in
    /// an empty store, and opens it read-write.
    pub fn create(
        store: Arc<dyn Store>,
        key: &MasterKey,
        size: u64,
        blocks_per_chunk: u32,
        options: OpenOptions,
    ) -> Result<Self, Error> {
        let block_count = size.div_ceil(BLOCK_SIZE_U64);
        if block_count == 0 || block_count > MAX_BLOCKS {
            return Err(Error::Format(format!("an image holds 4 KiB to 16 TiB, not {size} bytes")));
        }
        format::check_blocks_per_chunk(blocks_per_chunk)?;
        match store.size(MANIFEST_OBJECT) {
            Err(StoreError::NotFound) => {}
            Ok(_) => return Err(Error::Exists(store.describe())),
            Err(source) => return Err(store_error(&*store, MANIFEST_OBJECT, source)),
        }
        claim_writer(&*store, true)?;
        let mut image_id = [0u8; 16];
        aws_lc_rs::rand::fill(&mut image_id).map_err(|_| Error::Crypto("the system random generator failed"))?;
        let geometry = Geometry { image_id, block_count, blocks_per_chunk };
        let keys = ImageKeys::derive(key, &image_id)?;
        let chunk_count =
            usize::try_from(geometry.chunk_count()).map_err(|_| Error::Format("too many chunks".into()))?;
        let manifest =
            Manifest { geometry, generation: 0, block_writes: 0, chunks: vec![ChunkRef::ABSENT; chunk_count] };
        store
            .put(MANIFEST_OBJECT, &manifest.encode(&keys))
            .map_err(|source| store_error(&*store, MANIFEST_OBJECT, source))?;
        Ok(Self::with(store, keys, manifest, options))
    }

    /// Opens the image in `store` with its key. Read-write opens also remove
    /// objects a crashed commit left behind.
    pub fn open(store: Arc<dyn Store>, key: &MasterKey, options: OpenOptions) -> Result<Self, Error> {
        // A writer claims the image before it reads the manifest, so that
        // what it reads is what no other writer will commit over.
        if !options.read_only {
            claim_writer(&*store, false)?;
        }
        let bytes = match store.get(MANIFEST_OBJECT) {
            Ok(bytes) => bytes,
            Err(StoreError::NotFound) => return Err(Error::NotAnImage(store.describe())),
            Err(StoreError::WriterPresent) => return Err(Error::InUse(store.describe())),
            Err(source) => return Err(store_error(&*store, MANIFEST_OBJECT, source)),
        };
        let header = ManifestHeader::peek(&bytes)?;
        let keys = ImageKeys::derive(key, &header.geometry.image_id)?;
        let manifest = Manifest::decode(&bytes, &keys)?;
        let image = Self::with(store, keys, manifest, options);
        if !image.options.read_only {
            image.sweep()?;
        }
        Ok(image)
    }

    fn with(store: Arc<dyn Store>, keys: ImageKeys, manifest: Manifest, options: OpenOptions) -> Self {
        let cap = |n: usize| NonZeroUsize::new(n).unwrap_or(NonZeroUsize::MIN);
        let state = State {
            next_generation: manifest.generation + 1,
            manifest,
            dirty: BTreeMap::new(),
            committing: Arc::new(BTreeMap::new()),
            tables: LruCache::new(cap(options.cache_tables)),
            blocks: LruCache::new(cap(options.cache_blocks)),
            failed: None,
        };
        let geometry = state.manifest.geometry;
        Self {
            store,
            keys,
            geometry,
            options,
            state: Mutex::new(state),
            commit: Mutex::new(()),
            objects: RwLock::new(()),
            writeback: Writeback::default(),
            fetched: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The image's geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The image's size in bytes.
    pub fn size(&self) -> u64 {
        self.geometry.size()
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.options.read_only
    }

    /// Bytes of chunk objects read from the store so far (blocks and
    /// metadata tables; not the manifest).
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// The last committed generation.
    pub fn generation(&self) -> u64 {
        self.lock().manifest.generation
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads `buf.len()` bytes at `offset`, or fewer at the image's end.
    /// Every byte returned comes from a block that passed its check.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        let size = self.size();
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(size - offset) as usize;
        let first = offset / BLOCK_SIZE_U64;
        let end = (offset + len as u64).div_ceil(BLOCK_SIZE_U64);
        let target = buf.get_mut(..len).ok_or(Error::Crypto("read buffer arithmetic"))?;
        if offset % BLOCK_SIZE_U64 == 0 && len % BLOCK_SIZE == 0 {
            // The kernel's reads are whole blocks: decrypt straight into
            // the caller's buffer.
            self.read_blocks(first, end, target)?;
        } else {
            let mut blocks = vec![0u8; (end - first) as usize * BLOCK_SIZE];
            self.read_blocks(first, end, &mut blocks)?;
            let skip = (offset - first * BLOCK_SIZE_U64) as usize;
            target.copy_from_slice(blocks.get(skip..skip + len).ok_or(Error::Crypto("read buffer arithmetic"))?);
        }
        Ok(len)
    }

    /// Reads blocks `first..end` into `out`. On error `out` holds zeros.
    fn read_blocks(&self, first: u64, end: u64, out: &mut [u8]) -> Result<(), Error> {
        let result = self.read_blocks_unzeroed(first, end, out);
        if result.is_err() {
            out.fill(0);
        }
        result
    }

    fn read_blocks_unzeroed(&self, first: u64, end: u64, out: &mut [u8]) -> Result<(), Error> {
        // Small reads are what gets read again (ext4's metadata, random
        // reads); streams are cached by the page cache above, and would
        // only push those out.
        let cache = end - first <= CACHED_READ_BLOCKS;
        let mut missing: Vec<u64> = Vec::new();
        {
            let mut state = self.lock();
            for block in first..end {
                let at = (block - first) as usize * BLOCK_SIZE;
                let slot = out.get_mut(at..at + BLOCK_SIZE).ok_or(Error::Crypto("read buffer arithmetic"))?;
                if let Some(data) = state.dirty.get(&block).or_else(|| state.committing.get(&block)) {
                    slot.copy_from_slice(data);
                } else if let Some(data) = state.blocks.get(&block) {
                    slot.copy_from_slice(data);
                } else {
                    missing.push(block);
                }
            }
        }
        // Fetch the rest chunk by chunk, each run of consecutive blocks in one
        // ranged read.
        let per_chunk = u64::from(self.geometry.blocks_per_chunk);
        let mut i = 0;
        while let Some(&start) = missing.get(i) {
            let chunk = start / per_chunk;
            let mut stop = start + 1;
            while missing.get(i + (stop - start) as usize) == Some(&stop) && stop / per_chunk == chunk {
                stop += 1;
            }
            let at = (start - first) as usize * BLOCK_SIZE;
            let target = out
                .get_mut(at..at + (stop - start) as usize * BLOCK_SIZE)
                .ok_or(Error::Crypto("read buffer arithmetic"))?;
            let around = u64::from(self.options.read_around.max(1));
            if cache && stop - start < around {
                self.fetch_around(chunk, start, stop, target, around)?;
            } else {
                self.fetch_run(chunk, start, stop, target, cache)?;
            }
            i += (stop - start) as usize;
        }
        Ok(())
    }

    /// Reads the aligned window of `around` blocks holding `start..stop`
    /// (clipped to the chunk and the image) and copies out what was asked
    /// for. The neighbours are decrypted and cached only when nothing below
    /// keeps their ciphertext.
    fn fetch_around(&self, chunk: u64, start: u64, stop: u64, out: &mut [u8], around: u64) -> Result<(), Error> {
        let per_chunk = u64::from(self.geometry.blocks_per_chunk);
        let chunk_end = chunk * per_chunk + self.geometry.blocks_in_chunk(chunk);
        let window_start = (start / around * around).max(chunk * per_chunk);
        let window_stop = (stop.div_ceil(around) * around).min(chunk_end);
        // When the blocks asked for are in the page cache, no disk read is
        // due: read just these, and spare copying the rest of the window.
        if self.store.caches_reads()
            && self.fetch_window(chunk, start..stop, start..stop, out, true, Fetch::CachedOnly)?
        {
            return Ok(());
        }
        let mut window = vec![0u8; (window_stop - window_start) as usize * BLOCK_SIZE];
        let open = if self.store.caches_reads() { start..stop } else { window_start..window_stop };
        match self.fetch_window(chunk, window_start..window_stop, open, &mut window, true, Fetch::Always) {
            Ok(_) => {
                let at = (start - window_start) as usize * BLOCK_SIZE;
                out.copy_from_slice(window.get(at..at + out.len()).ok_or(Error::Crypto("read buffer arithmetic"))?);
                Ok(())
            }
            // A bad neighbour must not fail a read of good blocks: read just
            // what was asked, which names the bad block if it is among them.
            Err(Error::Integrity { .. }) => self.fetch_run(chunk, start, stop, out, true),
            Err(e) => Err(e),
        }
    }

    /// Reads blocks `start..stop` of one chunk from the store into `out`,
    /// checking each, and caches them if asked.
    fn fetch_run(&self, chunk: u64, start: u64, stop: u64, out: &mut [u8], cache: bool) -> Result<(), Error> {
        self.fetch_window(chunk, start..stop, start..stop, out, cache, Fetch::Always).map(drop)
    }

    /// Reads the ciphertext of blocks `window` of one chunk from the store
    /// into `out`, then decrypts and checks the blocks `open` (within
    /// `window`) in place, and caches those if asked. The rest of `out` is
    /// left as ciphertext. With [`Fetch::CachedOnly`] it reads only what
    /// is in memory below the store, and returns false if that is not all.
    fn fetch_window(
        &self,
        chunk: u64,
        window: Range<u64>,
        open: Range<u64>,
        out: &mut [u8],
        cache: bool,
        fetch: Fetch,
    ) -> Result<bool, Error> {
        let _objects = self.objects.read().unwrap_or_else(|p| p.into_inner());
        let chunk_ref = self.chunk_ref(chunk)?;
        if chunk_ref.generation == 0 {
            out.fill(0);
            return Ok(true);
        }
        let table = self.table(chunk, chunk_ref, open.start)?;
        let per_chunk = u64::from(self.geometry.blocks_per_chunk);
        let name = format::chunk_object(chunk, chunk_ref.generation);
        let data_start = format::meta_table_len(self.geometry.blocks_per_chunk) as u64;
        let from = data_start + (window.start - chunk * per_chunk) * BLOCK_SIZE_U64;
        let read = match fetch {
            Fetch::Always => self.store.get_range_into(&name, from, out),
            Fetch::CachedOnly => match self.store.get_cached_range_into(&name, from, out) {
                Ok(Some(read)) => Ok(read),
                Ok(None) => return Ok(false),
                Err(e) => Err(e),
            },
        }
        .map_err(|source| self.block_store_error(open.start, &name, source))?;
        self.fetched.fetch_add(read as u64, Ordering::Relaxed);
        let complete = (read / BLOCK_SIZE) as u64;
        for block in open.clone() {
            if block - window.start >= complete {
                return Err(Error::Integrity {
                    block,
                    reason: format!("its chunk object {name} ends before it: the image was truncated"),
                });
            }
            let at = (block - window.start) as usize * BLOCK_SIZE;
            let slot = out.get_mut(at..at + BLOCK_SIZE).ok_or(Error::Crypto("read buffer arithmetic"))?;
            let entry = table.entry((block - chunk * per_chunk) as usize).ok_or(Error::Crypto("table arithmetic"))?;
            if !self.keys.open_block(&self.geometry.image_id, block, entry, slot) {
                return Err(Error::Integrity {
                    block,
                    reason: "its ciphertext does not match its tag: it was modified, moved from another block, or \
                             replayed from an older version"
                        .into(),
                });
            }
        }
        if cache {
            let mut state = self.lock();
            if state.manifest.chunks.get(chunk as usize) == Some(&chunk_ref) {
                for block in open {
                    if !state.dirty.contains_key(&block) && !state.committing.contains_key(&block) {
                        let at = (block - window.start) as usize * BLOCK_SIZE;
                        if let Some(data) = out.get(at..at + BLOCK_SIZE) {
                            state.blocks.put(block, data.into());
                        }
                    }
                }
            }
        }
        Ok(true)
    }

    fn chunk_ref(&self, chunk: u64) -> Result<ChunkRef, Error> {
        self.lock().manifest.chunks.get(chunk as usize).copied().ok_or(Error::Crypto("chunk index arithmetic"))
    }

    /// The chunk's metadata table, checked against the manifest.
    fn table(&self, chunk: u64, chunk_ref: ChunkRef, block: u64) -> Result<Arc<MetaTable>, Error> {
        if let Some(table) = self.lock().tables.get(&(chunk, chunk_ref.generation)) {
            return Ok(table.clone());
        }
        let name = format::chunk_object(chunk, chunk_ref.generation);
        let len = format::meta_table_len(self.geometry.blocks_per_chunk);
        let bytes = self
            .store
            .get_range(&name, 0..len as u64)
            .map_err(|source| self.block_store_error(block, &name, source))?;
        self.fetched.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let table = self.check_table(chunk, chunk_ref, &name, &bytes, block)?;
        let table = Arc::new(table);
        self.lock().tables.put((chunk, chunk_ref.generation), table.clone());
        Ok(table)
    }

    fn check_table(
        &self,
        chunk: u64,
        chunk_ref: ChunkRef,
        name: &str,
        bytes: &[u8],
        block: u64,
    ) -> Result<MetaTable, Error> {
        let len = format::meta_table_len(self.geometry.blocks_per_chunk);
        if bytes.len() < len {
            return Err(Error::Integrity {
                block,
                reason: format!("its chunk object {name} is truncated inside its metadata table"),
            });
        }
        let table = bytes.get(..len).ok_or(Error::Crypto("table arithmetic"))?;
        let hash = format::meta_hash(&self.geometry.image_id, chunk, chunk_ref.generation, table);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&hash[..], &chunk_ref.meta_hash[..])) {
            return Err(Error::Integrity {
                block,
                reason: format!(
                    "the metadata table of its chunk object {name} does not match the manifest: the object was \
                     modified, replaced by an older version, or swapped with another chunk's"
                ),
            });
        }
        MetaTable::parse(table, self.geometry.blocks_per_chunk)
            .ok_or_else(|| Error::Integrity { block, reason: format!("{name}: unreadable metadata table") })
    }

    fn block_store_error(&self, block: u64, name: &str, source: StoreError) -> Error {
        match source {
            StoreError::NotFound => Error::Integrity {
                block,
                reason: format!("its chunk object {name}, which the manifest names, is missing"),
            },
            source => store_error(&*self.store, name, source),
        }
    }

    /// Writes `data` at `offset`. The write is in memory until the next
    /// commit; [`Image::commit`] makes it durable.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        if self.options.read_only {
            return Err(Error::ReadOnly);
        }
        let end = offset.saturating_add(data.len() as u64);
        if end > self.size() {
            return Err(Error::OutOfRange { start: offset, end, size: self.size() });
        }
        if data.is_empty() {
            return Ok(());
        }
        if let Some(failed) = self.lock().failed.clone() {
            return Err(Error::Failed(failed));
        }
        let first = offset / BLOCK_SIZE_U64;
        let last = (end - 1) / BLOCK_SIZE_U64;
        // Partial blocks at either end are read, patched and written whole.
        let head_partial = offset % BLOCK_SIZE_U64 != 0;
        let tail_partial = end % BLOCK_SIZE_U64 != 0;
        let read_one = |block: u64| -> Result<Vec<u8>, Error> {
            let mut buf = vec![0u8; BLOCK_SIZE];
            self.read_blocks(block, block + 1, &mut buf)?;
            Ok(buf)
        };
        let head = if head_partial { Some(read_one(first)?) } else { None };
        let tail = if tail_partial && (last != first || head.is_none()) { Some(read_one(last)?) } else { None };
        let mut consumed = 0usize;
        let mut updates: Vec<(u64, Box<[u8]>)> = Vec::with_capacity((last - first + 1) as usize);
        for block in first..=last {
            let block_start = block * BLOCK_SIZE_U64;
            let within = offset.max(block_start) - block_start;
            let take = ((BLOCK_SIZE_U64 - within).min(end - block_start - within)) as usize;
            let source = data.get(consumed..consumed + take).ok_or(Error::Crypto("write arithmetic"))?;
            consumed += take;
            if take == BLOCK_SIZE {
                updates.push((block, Box::from(source)));
                continue;
            }
            let mut buf: Box<[u8]> = if block == first && head.is_some() {
                head.clone().unwrap_or_default().into_boxed_slice()
            } else {
                tail.clone().unwrap_or_default().into_boxed_slice()
            };
            let within = within as usize;
            buf.get_mut(within..within + take).ok_or(Error::Crypto("write arithmetic"))?.copy_from_slice(source);
            updates.push((block, buf));
        }
        let dirty_bytes = {
            let mut state = self.lock();
            for (block, buf) in updates {
                state.blocks.pop(&block);
                state.dirty.insert(block, buf);
            }
            state.dirty.len() * BLOCK_SIZE
        };
        if dirty_bytes > self.options.dirty_limit {
            self.commit()?;
        } else if dirty_bytes > self.options.dirty_limit / 8 {
            // Past an eighth of the bound, the background writer starts: a
            // stream's sealing and storing overlap with its writing.
            *self.writeback.lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.writeback.wake.notify_one();
        }
        Ok(())
    }

    /// Whether writes are waiting for a commit.
    pub fn is_dirty(&self) -> bool {
        !self.lock().dirty.is_empty()
    }

    /// Makes every write so far durable: writes the changed chunks as new
    /// objects, then the manifest that names them, then removes the objects
    /// they replace.
    pub fn commit(&self) -> Result<(), Error> {
        let _commit = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        let (snapshot, base, generation) = {
            let mut state = self.lock();
            if let Some(failed) = state.failed.clone() {
                return Err(Error::Failed(failed));
            }
            if state.dirty.is_empty() {
                return Ok(());
            }
            let snapshot = Arc::new(std::mem::take(&mut state.dirty));
            state.committing = snapshot.clone();
            let generation = state.next_generation;
            state.next_generation += 1;
            (snapshot, state.manifest.clone(), generation)
        };
        match self.write_commit(&snapshot, &base, generation) {
            Ok(replaced) => {
                {
                    let mut state = self.lock();
                    state.manifest = replaced.manifest;
                    for (block, data) in snapshot.iter() {
                        if !state.dirty.contains_key(block) {
                            state.blocks.put(*block, data.clone());
                        }
                    }
                    state.committing = Arc::new(BTreeMap::new());
                }
                // Readers that took an object's name from the old manifest
                // hold `objects` while they read it: wait them out, then
                // delete without holding anything, so that a slow store's
                // deletes stall no read or write. Later readers see the new
                // manifest.
                drop(self.objects.write().unwrap_or_else(|p| p.into_inner()));
                for name in &replaced.superseded {
                    // Best effort: what is left is swept at the next
                    // read-write open.
                    if let Err(e) = self.store.delete(name) {
                        tracing::warn!(object = %name, error = %e, "could not remove a superseded chunk object");
                    }
                }
                Ok(())
            }
            Err(e) => {
                // The writes stay in memory and readable, but a commit that
                // failed may fail again and lose them at unmount: say so
                // to every later writer rather than pretend.
                let mut state = self.lock();
                let newer = std::mem::take(&mut state.dirty);
                let mut restored: Blocks = (*snapshot).clone();
                restored.extend(newer);
                state.dirty = restored;
                state.committing = Arc::new(BTreeMap::new());
                state.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn write_commit(&self, dirty: &Blocks, base: &Manifest, generation: u64) -> Result<Committed, Error> {
        let per_chunk = u64::from(self.geometry.blocks_per_chunk);
        let chunks: Vec<u64> =
            dirty.keys().map(|block| block / per_chunk).collect::<BTreeSet<_>>().into_iter().collect();
        // Checked before sealing anything: at worst every block of every
        // chunk touched is sealed afresh.
        let most: u64 = chunks.iter().map(|chunk| self.geometry.blocks_in_chunk(*chunk)).sum();
        if base.block_writes.saturating_add(most) > MAX_BLOCK_WRITES {
            return Err(Error::KeyExhausted);
        }
        // Sealing and writing chunks is independent work: spread it over the
        // cores, the store's latency overlapping with the other's sealing.
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4).min(chunks.len());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let built: Mutex<Vec<(u64, [u8; 32], u64)>> = Mutex::new(Vec::with_capacity(chunks.len()));
        let failure: Mutex<Option<Error>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers {
                scope.spawn(|| {
                    loop {
                        let Some(&chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
                        if failure.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                            return;
                        }
                        match self.write_chunk(chunk, base, dirty, generation) {
                            Ok(done) => built.lock().unwrap_or_else(|p| p.into_inner()).push(done),
                            Err(e) => {
                                failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e);
        }
        let mut manifest = base.clone();
        manifest.generation = generation;
        let mut superseded = Vec::new();
        let mut sealed_blocks = 0u64;
        for (chunk, table_hash, sealed) in built.into_inner().unwrap_or_else(|p| p.into_inner()) {
            sealed_blocks += sealed;
            let slot = manifest.chunks.get_mut(chunk as usize).ok_or(Error::Crypto("chunk index arithmetic"))?;
            if slot.generation != 0 {
                superseded.push(format::chunk_object(chunk, slot.generation));
            }
            *slot = ChunkRef { generation, meta_hash: table_hash };
        }
        manifest.block_writes = base.block_writes + sealed_blocks;
        self.store.sync().map_err(|source| store_error(&*self.store, "chunks/", source))?;
        self.store
            .put(MANIFEST_OBJECT, &manifest.encode(&self.keys))
            .map_err(|source| store_error(&*self.store, MANIFEST_OBJECT, source))?;
        Ok(Committed { manifest, superseded })
    }

    /// Builds and stores one chunk's new object; returns its table's hash
    /// and how many blocks were sealed.
    fn write_chunk(
        &self,
        chunk: u64,
        base: &Manifest,
        dirty: &Blocks,
        generation: u64,
    ) -> Result<(u64, [u8; 32], u64), Error> {
        let old = *base.chunks.get(chunk as usize).ok_or(Error::Crypto("chunk index arithmetic"))?;
        let (object, table_hash, sealed) = self.build_chunk(chunk, old, dirty, generation)?;
        let name = format::chunk_object(chunk, generation);
        self.store.put_new(&name, &object).map_err(|source| store_error(&*self.store, &name, source))?;
        Ok((chunk, table_hash, sealed))
    }

    /// The new object of one chunk: dirty blocks sealed afresh, the others'
    /// ciphertexts carried over unchanged (they need no new nonce, and their
    /// tags still check against the new table).
    fn build_chunk(
        &self,
        chunk: u64,
        old: ChunkRef,
        dirty: &Blocks,
        generation: u64,
    ) -> Result<(Vec<u8>, [u8; 32], u64), Error> {
        let per_chunk = u64::from(self.geometry.blocks_per_chunk);
        let first = chunk * per_chunk;
        let in_chunk = self.geometry.blocks_in_chunk(chunk);
        let table_len = format::meta_table_len(self.geometry.blocks_per_chunk);
        // A chunk rewritten whole (a stream, a file written over) keeps
        // nothing of its old object: reading that would cost as much as
        // writing the new one.
        let rewritten_whole = dirty.range(first..first + in_chunk).count() as u64 == in_chunk;
        let previous = if old.generation == 0 || rewritten_whole {
            None
        } else {
            let name = format::chunk_object(chunk, old.generation);
            let bytes = self.store.get(&name).map_err(|source| self.block_store_error(first, &name, source))?;
            let table = self.check_table(chunk, old, &name, &bytes, first)?;
            Some((bytes, table))
        };
        let mut object = vec![0u8; table_len + in_chunk as usize * BLOCK_SIZE];
        let mut entries = Vec::with_capacity(self.geometry.blocks_per_chunk as usize);
        let mut sealed = 0u64;
        for slot in 0..in_chunk {
            let block = first + slot;
            let at = table_len + slot as usize * BLOCK_SIZE;
            let target = object.get_mut(at..at + BLOCK_SIZE).ok_or(Error::Crypto("chunk arithmetic"))?;
            match (dirty.get(&block), &previous) {
                (None, Some((bytes, table))) => {
                    let Some(ciphertext) = bytes.get(at..at + BLOCK_SIZE) else {
                        return Err(Error::Integrity {
                            block,
                            reason: format!(
                                "its chunk object {} ends before it: the image was truncated",
                                format::chunk_object(chunk, old.generation)
                            ),
                        });
                    };
                    target.copy_from_slice(ciphertext);
                    entries.push(*table.entry(slot as usize).ok_or(Error::Crypto("table arithmetic"))?);
                }
                // Written, or never stored (zeros): sealed afresh.
                (data, _) => {
                    if let Some(data) = data {
                        target.copy_from_slice(data);
                    }
                    entries.push(self.keys.seal_block(&self.geometry.image_id, block, target)?);
                    sealed += 1;
                }
            }
        }
        entries.resize(self.geometry.blocks_per_chunk as usize, Entry { nonce: [0; 12], tag: [0; 16] });
        let table = MetaTable::new(entries).encode(self.geometry.blocks_per_chunk);
        let hash = format::meta_hash(&self.geometry.image_id, chunk, generation, &table);
        object.get_mut(..table_len).ok_or(Error::Crypto("chunk arithmetic"))?.copy_from_slice(&table);
        Ok((object, hash, sealed))
    }

    /// Removes chunk objects the manifest does not name: what a crashed or
    /// failed commit left behind.
    fn sweep(&self) -> Result<(), Error> {
        let names = self.store.list("chunks/").map_err(|source| store_error(&*self.store, "chunks/", source))?;
        let live: BTreeSet<String> = {
            let state = self.lock();
            state
                .manifest
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, c)| c.generation != 0)
                .map(|(i, c)| format::chunk_object(i as u64, c.generation))
                .collect()
        };
        for name in names.iter().filter(|name| !live.contains(*name)) {
            if let Err(e) = self.store.delete(name) {
                tracing::warn!(object = %name, error = %e, "could not remove an unreferenced chunk object");
            }
        }
        Ok(())
    }

    /// Blocks the image stores, from the manifest (the others were never
    /// written and read as zeros); [`Image::check`] reads them.
    pub fn stored_blocks(&self) -> u64 {
        let state = self.lock();
        (0u64..)
            .zip(&state.manifest.chunks)
            .filter(|(_, c)| c.generation != 0)
            .map(|(chunk, _)| self.geometry.blocks_in_chunk(chunk))
            .sum()
    }

    /// Reads and checks every block of the image; returns the number of
    /// blocks stored (the others were never written and read as zeros).
    pub fn check(&self) -> Result<u64, Error> {
        let per_chunk = u64::from(self.geometry.blocks_per_chunk);
        let mut stored = 0;
        for chunk in 0..self.geometry.chunk_count() {
            let chunk_ref = self.chunk_ref(chunk)?;
            if chunk_ref.generation == 0 {
                continue;
            }
            let first = chunk * per_chunk;
            let end = first + self.geometry.blocks_in_chunk(chunk);
            let mut scratch = vec![0u8; (end - first) as usize * BLOCK_SIZE];
            self.fetch_run(chunk, first, end, &mut scratch, false)?;
            stored += end - first;
        }
        Ok(stored)
    }

    /// Commits in the background every `interval` while writes are waiting,
    /// until the image is dropped or [`Image::stop_writeback`] is called.
    pub fn start_writeback(self: &Arc<Self>, interval: Duration) -> std::io::Result<std::thread::JoinHandle<()>> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new().name("encfs-writeback".into()).spawn(move || {
            loop {
                let Some(image) = weak.upgrade() else { return };
                if image.writeback.stop.load(Ordering::Acquire) {
                    return;
                }
                let mut pending = image.writeback.lock.lock().unwrap_or_else(|p| p.into_inner());
                if !*pending {
                    pending = image
                        .writeback
                        .wake
                        .wait_timeout(pending, interval)
                        .map_or_else(|p| p.into_inner().0, |(g, _)| g);
                }
                *pending = false;
                drop(pending);
                if image.is_dirty() {
                    if let Err(e) = image.commit() {
                        tracing::error!(error = %e, "background commit failed");
                    }
                }
            }
        })
    }

    /// Stops the background writer (the caller commits what is left).
    pub fn stop_writeback(&self) {
        self.writeback.stop.store(true, Ordering::Release);
        self.writeback.wake.notify_all();
    }
}

/// Deletes the image in `store`, best effort; the manifest last, so that an
/// interrupted removal still stops `create` there rather than leaving
/// chunks for a new image to sweep.
pub fn remove(store: &dyn Store) {
    for name in store.list("chunks/").unwrap_or_default() {
        let _ = store.delete(&name);
    }
    let _ = store.delete(MANIFEST_OBJECT);
}

struct Committed {
    manifest: Manifest,
    superseded: Vec<String>,
}

/// Whether a fetch may go out to the store's backing medium.
#[derive(Clone, Copy)]
enum Fetch {
    Always,
    /// Only bytes already in memory below the store (the page cache).
    CachedOnly,
}

/// Claims `store` for this image's one writer (see [`Store::claim_writer`]).
fn claim_writer(store: &dyn Store, creating: bool) -> Result<(), Error> {
    match store.claim_writer(MANIFEST_OBJECT, creating) {
        Ok(()) | Err(StoreError::NotFound) => Ok(()),
        Err(StoreError::WriterPresent) => Err(Error::InUse(store.describe())),
        Err(source) => Err(store_error(store, "(the writer's lock)", source)),
    }
}

fn store_error(store: &dyn Store, object: &str, source: StoreError) -> Error {
    Error::Store { location: store.describe(), object: object.to_string(), source }
}

#[cfg(test)]
mod tests;
