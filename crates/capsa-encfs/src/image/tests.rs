use std::path::Path;
use std::sync::atomic::AtomicUsize;

use super::*;
use crate::store::LocalStore;

const SMALL: OpenOptions =
    OpenOptions { read_only: false, cache_blocks: 1, cache_tables: 1, dirty_limit: 64 << 20, read_around: 8 };

fn key() -> MasterKey {
    MasterKey::from_bytes(&[0x42; 32]).unwrap()
}

fn block_of(byte: u8) -> Vec<u8> {
    vec![byte; BLOCK_SIZE]
}

/// A fresh image of 40 blocks in chunks of 8, in a temporary directory.
fn fresh() -> (tempfile::TempDir, Image) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path()).unwrap());
    let image = Image::create(store, &key(), 40 * BLOCK_SIZE_U64, 8, SMALL).unwrap();
    (dir, image)
}

fn reopen(dir: &Path) -> Image {
    Image::open(Arc::new(LocalStore::open(dir)), &key(), SMALL).unwrap()
}

fn read_block(image: &Image, block: u64) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    image.read_at(block * BLOCK_SIZE_U64, &mut buf).map(|_| buf)
}

/// The path of the object holding `block` now.
fn object_of(dir: &Path, image: &Image, block: u64) -> std::path::PathBuf {
    let chunk = block / 8;
    let generation = image.chunk_ref(chunk).unwrap().generation;
    dir.join(format::chunk_object(chunk, generation))
}

fn data_offset(block: u64) -> usize {
    format::meta_table_len(8) + (block % 8) as usize * BLOCK_SIZE
}

/// Evicts cached plaintext so that the next read goes to the store, as a
/// read would once the cache has moved on.
fn evict(image: &Image) {
    let mut state = image.lock();
    state.blocks.clear();
    state.tables.clear();
}

fn assert_integrity_error(result: Result<Vec<u8>, Error>, block: u64) {
    match result {
        Err(Error::Integrity { block: named, reason }) => {
            assert_eq!(named, block, "the error names block {named}, not {block}: {reason}")
        }
        other => panic!("expected an integrity error naming block {block}, got {:?}", other.map(|_| "data")),
    }
}

#[test]
fn a_new_image_reads_as_zeros_and_stores_nothing() {
    let (dir, image) = fresh();
    assert_eq!(image.size(), 40 * BLOCK_SIZE_U64);
    assert_eq!(read_block(&image, 39).unwrap(), block_of(0));
    let mut past = [0u8; 10];
    assert_eq!(image.read_at(image.size(), &mut past).unwrap(), 0);
    assert_eq!(std::fs::read_dir(dir.path().join("chunks")).unwrap().count(), 0);
    assert_eq!(image.check().unwrap(), 0);
}

#[test]
fn committed_writes_survive_a_reopen_and_uncommitted_ones_do_not() {
    let (dir, image) = fresh();
    image.write_at(0, &block_of(1)).unwrap();
    image.write_at(9 * BLOCK_SIZE_U64, &[2u8; 3 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    image.write_at(20 * BLOCK_SIZE_U64, &block_of(3)).unwrap();
    assert_eq!(read_block(&image, 20).unwrap(), block_of(3), "a dirty block reads back before its commit");
    drop(image);

    let image = reopen(dir.path());
    assert_eq!(read_block(&image, 0).unwrap(), block_of(1));
    for block in 9..12 {
        assert_eq!(read_block(&image, block).unwrap(), block_of(2));
    }
    assert_eq!(read_block(&image, 20).unwrap(), block_of(0), "never committed");
    assert_eq!(image.check().unwrap(), 16, "two chunks of 8 are stored");
}

#[test]
fn unaligned_writes_patch_their_blocks() {
    let (dir, image) = fresh();
    image.write_at(0, &vec![7u8; 3 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    image.write_at(BLOCK_SIZE_U64 - 5, b"0123456789").unwrap();
    image.write_at(2 * BLOCK_SIZE_U64 + 100, b"x").unwrap();
    image.commit().unwrap();
    drop(image);
    let image = reopen(dir.path());
    let mut all = vec![0u8; 3 * BLOCK_SIZE];
    assert_eq!(image.read_at(0, &mut all).unwrap(), all.len());
    let mut expected = vec![7u8; 3 * BLOCK_SIZE];
    expected[BLOCK_SIZE - 5..BLOCK_SIZE + 5].copy_from_slice(b"0123456789");
    expected[2 * BLOCK_SIZE + 100] = b'x';
    assert_eq!(all, expected);
    let mut odd = [0u8; 7];
    image.read_at(BLOCK_SIZE_U64 - 3, &mut odd).unwrap();
    assert_eq!(&odd, b"2345678");
}

#[test]
fn writes_past_the_end_and_to_read_only_images_are_refused() {
    let (dir, image) = fresh();
    assert!(matches!(image.write_at(image.size() - 1, b"ab"), Err(Error::OutOfRange { .. })));
    drop(image);
    let ro =
        Image::open(Arc::new(LocalStore::open(dir.path())), &key(), OpenOptions { read_only: true, ..SMALL }).unwrap();
    assert!(matches!(ro.write_at(0, b"a"), Err(Error::ReadOnly)));
}

#[test]
fn another_key_and_another_store_are_refused_clearly() {
    let (dir, image) = fresh();
    drop(image);
    let other = MasterKey::from_bytes(&[1u8; 32]).unwrap();
    let e = Image::open(Arc::new(LocalStore::open(dir.path())), &other, SMALL).err().unwrap();
    assert!(matches!(e, Error::WrongKey), "{e}");
    let empty = tempfile::tempdir().unwrap();
    let e = Image::open(Arc::new(LocalStore::open(empty.path())), &key(), SMALL).err().unwrap();
    assert!(matches!(e, Error::NotAnImage(_)), "{e}");
    let e = Image::create(Arc::new(LocalStore::open(dir.path())), &key(), 4096, 8, SMALL).err().unwrap();
    assert!(matches!(e, Error::Exists(_)), "{e}");
}

#[test]
fn a_second_writer_is_refused_until_the_first_is_gone() {
    let (dir, image) = fresh();
    image.write_at(0, &block_of(7)).unwrap();
    image.commit().unwrap();
    let e = Image::open(Arc::new(LocalStore::open(dir.path())), &key(), SMALL).err().unwrap();
    assert!(matches!(e, Error::InUse(_)), "{e}");
    assert!(e.to_string().contains("open read-write elsewhere"), "{e}");
    let reader =
        Image::open(Arc::new(LocalStore::open(dir.path())), &key(), OpenOptions { read_only: true, ..SMALL }).unwrap();
    assert_eq!(read_block(&reader, 0).unwrap(), block_of(7));
    drop(image);
    let writer = reopen(dir.path());
    assert_eq!(read_block(&writer, 0).unwrap(), block_of(7));
}

#[test]
fn a_flipped_byte_fails_the_block_it_is_in() {
    let (dir, image) = fresh();
    image.write_at(0, &vec![5u8; 16 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    let path = object_of(dir.path(), &image, 3);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[data_offset(3) + 1234] ^= 0x20;
    std::fs::write(&path, &bytes).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 3), 3);
    assert_eq!(read_block(&image, 2).unwrap(), block_of(5), "its neighbours still read");
    drop(image);
    let reopened = reopen(dir.path());
    assert_integrity_error(read_block(&reopened, 3), 3);
    assert!(matches!(reopened.check(), Err(Error::Integrity { block: 3, .. })));
}

#[test]
fn a_missed_read_fetches_its_window_and_decrypts_what_nothing_below_keeps() {
    let options = OpenOptions { cache_blocks: 64, ..SMALL };
    let (dir, image) = fresh();
    image.write_at(0, &(0..16).flat_map(block_of).collect::<Vec<u8>>()).unwrap();
    image.commit().unwrap();
    drop(image);
    let cached = |image: &Image| -> Vec<u64> {
        let mut blocks: Vec<u64> = image.lock().blocks.iter().map(|(block, _)| *block).collect();
        blocks.sort_unstable();
        blocks
    };

    // A local file's ciphertext in the page cache (it was just written):
    // only the block asked for is read and decrypted.
    let local = Image::open(Arc::new(LocalStore::open(dir.path())), &key(), options.clone()).unwrap();
    let before = local.fetched_bytes();
    assert_eq!(read_block(&local, 11).unwrap(), block_of(11));
    let table = format::meta_table_len(8) as u64;
    assert_eq!(local.fetched_bytes() - before, BLOCK_SIZE_U64 + table, "just the block, from the page cache");
    assert_eq!(cached(&local), [11]);

    // Out of the page cache: the whole window is read, so that the page
    // cache has the neighbours next time, and still only the block is
    // decrypted. (tmpfs never drops its pages.)
    let object = std::fs::File::open(object_of(dir.path(), &local, 12)).unwrap();
    object.sync_all().unwrap();
    rustix::fs::fadvise(&object, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    if rustix::fs::statfs(dir.path()).unwrap().f_type != 0x0102_1994 {
        let before = local.fetched_bytes();
        assert_eq!(read_block(&local, 12).unwrap(), block_of(12));
        assert_eq!(local.fetched_bytes() - before, 8 * BLOCK_SIZE_U64, "the whole window (its table is cached)");
        assert_eq!(cached(&local), [11, 12]);
    }
    let window_and_table = 8 * BLOCK_SIZE_U64 + table;

    // A store that keeps nothing below it (Failing, with writes to spare):
    // the whole window is decrypted and cached.
    let remote = Failing { inner: LocalStore::open(dir.path()), allowed: AtomicUsize::new(usize::MAX) };
    let remote = Image::open(Arc::new(remote), &key(), options).unwrap();
    let before = remote.fetched_bytes();
    assert_eq!(read_block(&remote, 11).unwrap(), block_of(11));
    assert_eq!(remote.fetched_bytes() - before, window_and_table);
    assert_eq!(cached(&remote), (8..16).collect::<Vec<u64>>());
    for block in 8..16 {
        assert_eq!(read_block(&remote, block).unwrap(), block_of(block as u8));
    }
}

#[test]
fn a_bad_neighbour_in_the_window_fails_only_its_own_reads() {
    for caches_reads in [true, false] {
        let (dir, image) = fresh();
        image.write_at(0, &vec![5u8; 16 * BLOCK_SIZE]).unwrap();
        image.commit().unwrap();
        let path = object_of(dir.path(), &image, 13);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[data_offset(13) + 7] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        drop(image);
        let store: Arc<dyn Store> = if caches_reads {
            Arc::new(LocalStore::open(dir.path()))
        } else {
            Arc::new(Failing { inner: LocalStore::open(dir.path()), allowed: AtomicUsize::new(usize::MAX) })
        };
        let image = Image::open(store, &key(), SMALL).unwrap();
        assert_eq!(read_block(&image, 12).unwrap(), block_of(5), "caches_reads {caches_reads}");
        assert_integrity_error(read_block(&image, 13), 13);
        assert_eq!(read_block(&image, 14).unwrap(), block_of(5), "caches_reads {caches_reads}");
    }
}

#[test]
fn a_flipped_byte_in_a_metadata_table_fails_its_chunk() {
    let (dir, image) = fresh();
    image.write_at(8 * BLOCK_SIZE_U64, &vec![5u8; 8 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    let path = object_of(dir.path(), &image, 8);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3 * format::ENTRY_LEN + 2] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 13), 13);
}

#[test]
fn swapped_blocks_fail_at_both_places() {
    let (dir, image) = fresh();
    for block in 0..8u64 {
        image.write_at(block * BLOCK_SIZE_U64, &block_of(block as u8 + 1)).unwrap();
    }
    image.commit().unwrap();
    let path = object_of(dir.path(), &image, 2);
    let mut bytes = std::fs::read(&path).unwrap();
    let (a, b) = (data_offset(2), data_offset(5));
    let block2 = bytes[a..a + BLOCK_SIZE].to_vec();
    let block5 = bytes[b..b + BLOCK_SIZE].to_vec();
    bytes[a..a + BLOCK_SIZE].copy_from_slice(&block5);
    bytes[b..b + BLOCK_SIZE].copy_from_slice(&block2);
    // Even with the metadata entries swapped along, the index in each tag's
    // associated data gives the move away.
    let entries = |i: usize| i * format::ENTRY_LEN..(i + 1) * format::ENTRY_LEN;
    let entry2 = bytes[entries(2)].to_vec();
    let entry5 = bytes[entries(5)].to_vec();
    bytes[entries(2)].copy_from_slice(&entry5);
    bytes[entries(5)].copy_from_slice(&entry2);
    std::fs::write(&path, &bytes).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 2), 2);
    assert_integrity_error(read_block(&image, 5), 5);
}

#[test]
fn swapped_chunk_objects_fail() {
    let (dir, image) = fresh();
    image.write_at(0, &vec![1u8; 16 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    let (a, b) = (object_of(dir.path(), &image, 0), object_of(dir.path(), &image, 8));
    let bytes_a = std::fs::read(&a).unwrap();
    std::fs::write(&a, std::fs::read(&b).unwrap()).unwrap();
    std::fs::write(&b, bytes_a).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 1), 1);
    assert_integrity_error(read_block(&image, 9), 9);
}

#[test]
fn truncation_fails_the_first_block_cut_off() {
    let (dir, image) = fresh();
    image.write_at(0, &vec![1u8; 8 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    let path = object_of(dir.path(), &image, 0);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - BLOCK_SIZE_U64 - 1).unwrap();
    evict(&image);
    assert_eq!(read_block(&image, 5).unwrap(), block_of(1));
    assert_integrity_error(read_block(&image, 6), 6);
    assert_integrity_error(read_block(&image, 7), 7);
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(100).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 0), 0);
    drop(image);

    let manifest = dir.path().join("manifest");
    let len = std::fs::metadata(&manifest).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&manifest).unwrap().set_len(len - 40).unwrap();
    let e = Image::open(Arc::new(LocalStore::open(dir.path())), &key(), SMALL).err().unwrap();
    assert!(matches!(e, Error::ManifestIntegrity(_)), "{e}");
}

#[test]
fn a_deleted_chunk_object_fails_its_blocks() {
    let (dir, image) = fresh();
    image.write_at(0, &block_of(1)).unwrap();
    image.commit().unwrap();
    std::fs::remove_file(object_of(dir.path(), &image, 0)).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 0), 0);
}

#[test]
fn a_chunk_rewritten_whole_never_reads_its_old_object() {
    let (dir, image) = fresh();
    image.write_at(0, &vec![1u8; 16 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    // Without their old objects, a commit can only build chunks that owe
    // them nothing.
    std::fs::remove_file(object_of(dir.path(), &image, 0)).unwrap();
    std::fs::remove_file(object_of(dir.path(), &image, 8)).unwrap();
    image.write_at(0, &vec![2u8; 8 * BLOCK_SIZE]).unwrap();
    image.commit().unwrap();
    evict(&image);
    assert_eq!(read_block(&image, 7).unwrap(), block_of(2));

    image.write_at(8 * BLOCK_SIZE_U64, &block_of(3)).unwrap();
    let e = image.commit().unwrap_err();
    assert!(e.to_string().contains("block 8"), "the partly rewritten chunk needs its old object: {e}");
}

#[test]
fn an_older_block_replayed_during_a_mount_is_caught() {
    let (dir, image) = fresh();
    image.write_at(4 * BLOCK_SIZE_U64, &block_of(1)).unwrap();
    image.commit().unwrap();
    let old_object = std::fs::read(object_of(dir.path(), &image, 4)).unwrap();
    image.write_at(4 * BLOCK_SIZE_U64, &block_of(2)).unwrap();
    image.commit().unwrap();
    let path = object_of(dir.path(), &image, 4);

    // The whole older object under the current name: its table no longer
    // matches what the manifest in memory says.
    let current = std::fs::read(&path).unwrap();
    std::fs::write(&path, &old_object).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 4), 4);

    // Only the older ciphertext, the table left current: the tag catches it.
    let mut mixed = current.clone();
    let at = data_offset(4);
    mixed[at..at + BLOCK_SIZE].copy_from_slice(&old_object[at..at + BLOCK_SIZE]);
    std::fs::write(&path, &mixed).unwrap();
    evict(&image);
    assert_integrity_error(read_block(&image, 4), 4);

    std::fs::write(&path, &current).unwrap();
    evict(&image);
    assert_eq!(read_block(&image, 4).unwrap(), block_of(2));
}

/// A store that fails every write after the first `allowed`, as a crash or
/// a lost connection would in the middle of a commit.
struct Failing {
    inner: LocalStore,
    allowed: AtomicUsize,
}

impl Failing {
    fn spend(&self) -> Result<(), StoreError> {
        let left = self.allowed.load(Ordering::SeqCst);
        if left == 0 {
            return Err(StoreError::Io(std::io::Error::other("the store went away")));
        }
        self.allowed.store(left - 1, Ordering::SeqCst);
        Ok(())
    }
}

impl Store for Failing {
    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        self.inner.get(name)
    }
    fn get_range(&self, name: &str, range: std::ops::Range<u64>) -> Result<Vec<u8>, StoreError> {
        self.inner.get_range(name, range)
    }
    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.spend()?;
        self.inner.put(name, bytes)
    }
    fn put_new(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.spend()?;
        self.inner.put_new(name, bytes)
    }
    fn size(&self, name: &str) -> Result<u64, StoreError> {
        self.inner.size(name)
    }
    fn delete(&self, name: &str) -> Result<(), StoreError> {
        self.inner.delete(name)
    }
    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.inner.list(prefix)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn a_commit_cut_short_at_any_write_leaves_the_last_committed_image() {
    for allowed in 0..3 {
        let (dir, image) = fresh();
        image.write_at(0, &vec![1u8; 24 * BLOCK_SIZE]).unwrap();
        image.commit().unwrap();
        drop(image);

        let failing = Arc::new(Failing { inner: LocalStore::open(dir.path()), allowed: AtomicUsize::new(allowed) });
        let image = Image::open(failing, &key(), SMALL).unwrap();
        // Three chunks and the manifest: four writes; the store dies after
        // `allowed` of them.
        image.write_at(0, &vec![2u8; 24 * BLOCK_SIZE]).unwrap();
        assert!(image.commit().is_err());
        assert_eq!(read_block(&image, 3).unwrap(), block_of(2), "the writes are still readable in memory");
        assert!(matches!(image.write_at(0, b"x"), Err(Error::Failed(_))), "and later writes are refused");
        drop(image);

        let image = reopen(dir.path());
        for block in 0..24 {
            assert_eq!(read_block(&image, block).unwrap(), block_of(1), "block {block} after {allowed} writes");
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("chunks")).unwrap().count(),
            3,
            "the torn commit's objects are swept"
        );
        assert_eq!(image.check().unwrap(), 24);
    }
}

#[test]
fn superseded_objects_are_removed_after_a_commit() {
    let (dir, image) = fresh();
    for round in 0..3u8 {
        image.write_at(0, &block_of(round)).unwrap();
        image.commit().unwrap();
    }
    assert_eq!(std::fs::read_dir(dir.path().join("chunks")).unwrap().count(), 1);
    assert_eq!(image.generation(), 3);
}

#[test]
fn background_writeback_commits_without_an_fsync() {
    let (dir, image) = fresh();
    let image = Arc::new(image);
    let handle = image.start_writeback(Duration::from_millis(20)).unwrap();
    image.write_at(0, &block_of(9)).unwrap();
    for _ in 0..500 {
        if !image.is_dirty() && image.generation() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    image.stop_writeback();
    handle.join().unwrap();
    drop(image);
    assert_eq!(read_block(&reopen(dir.path()), 0).unwrap(), block_of(9));
}

#[test]
fn the_dirty_limit_forces_a_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(LocalStore::create(dir.path()).unwrap());
    let options = OpenOptions { dirty_limit: 4 * BLOCK_SIZE, ..SMALL };
    let image = Image::create(store, &key(), 40 * BLOCK_SIZE_U64, 8, options).unwrap();
    image.write_at(0, &vec![3u8; 5 * BLOCK_SIZE]).unwrap();
    assert!(!image.is_dirty());
    assert_eq!(image.generation(), 1);
}
