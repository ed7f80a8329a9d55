//! The object-store backend against a real Azurite on 127.0.0.1: every
//! operation of the `Store` trait, both URL forms, and that no key shows.
//!
//! Settings are passed with `Config::from_vars`, never through the process
//! environment: tests run in parallel.

use std::sync::Arc;

use capsa_encfs::remote::Config;
use capsa_encfs::{Store, StoreError};
use capsa_testkit::Azurite;

fn check(store: &dyn Store) {
    assert!(matches!(store.get("manifest"), Err(StoreError::NotFound)));
    assert!(matches!(store.get_range("manifest", 0..4), Err(StoreError::NotFound)));
    assert_eq!(store.list("chunks/").unwrap(), Vec::<String>::new());

    store.put("manifest", b"first").unwrap();
    store.put("manifest", b"second, longer").unwrap();
    assert_eq!(store.get("manifest").unwrap(), b"second, longer", "put replaces");

    let chunk: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    store.put_new("chunks/00000000-0000000000000001", &chunk).unwrap();
    store.put_new("chunks/00000000-0000000000000000", b"zero").unwrap();
    store.put_new("chunks/00000001-0000000000000000", b"").unwrap();
    store.put_new("chunks/deeper/x", b"not listed at chunks/").unwrap();
    store.sync().unwrap();

    let name = "chunks/00000000-0000000000000001";
    assert_eq!(store.get(name).unwrap(), chunk);
    assert_eq!(store.get_range(name, 4096..8192).unwrap(), chunk[4096..8192]);
    assert_eq!(store.get_range(name, 8192..12288).unwrap(), chunk[8192..], "short at the end");
    assert_eq!(store.get_range(name, 10_000..14_096).unwrap(), Vec::<u8>::new(), "starts at the end");
    assert_eq!(store.get_range(name, 20_000..24_096).unwrap(), Vec::<u8>::new(), "starts past the end");
    assert_eq!(store.get_range(name, 5..5).unwrap(), Vec::<u8>::new(), "empty range");
    assert_eq!(store.get_range("chunks/00000001-0000000000000000", 0..4096).unwrap(), Vec::<u8>::new());

    assert_eq!(
        store.list("chunks/").unwrap(),
        vec![
            "chunks/00000000-0000000000000000",
            "chunks/00000000-0000000000000001",
            "chunks/00000001-0000000000000000",
        ]
    );
    assert_eq!(
        store.list("chunks/00000000-").unwrap(),
        vec!["chunks/00000000-0000000000000000", "chunks/00000000-0000000000000001"]
    );
    assert_eq!(store.list("").unwrap(), vec!["manifest"]);

    store.delete(name).unwrap();
    store.delete(name).unwrap();
    assert!(matches!(store.get(name), Err(StoreError::NotFound)));
    assert!(matches!(store.get_range(name, 0..1), Err(StoreError::NotFound)));
    assert!(store.get("../manifest").is_err(), "names cannot leave the prefix");
}

#[test]
fn a_path_style_azurite_url() {
    let Some(azurite) = Azurite::start() else { return };
    azurite.create_container("images");
    let config = Config::from_vars(azurite.env());
    let url = azurite.url("images", "some/prefix");
    let store = config.create(&url).unwrap();
    assert_eq!(store.describe(), url);
    check(store.as_ref());

    // Every name is under the prefix: another prefix sees none of them.
    let other = config.open(&azurite.url("images", "other")).unwrap();
    assert!(matches!(other.get("manifest"), Err(StoreError::NotFound)));
    assert_eq!(other.list("").unwrap(), Vec::<String>::new());
    let whole = config.open(&azurite.url("images", "")).unwrap();
    assert_eq!(whole.get("some/prefix/manifest").unwrap(), b"second, longer");
}

#[test]
fn az_urls_with_the_emulator_settings() {
    let Some(azurite) = Azurite::start() else { return };
    azurite.create_container("boxes");
    let store = Config::from_vars(azurite.env()).open("az://boxes/one").unwrap();
    assert_eq!(store.describe(), "az://boxes/one");
    check(store.as_ref());
    // The same objects by the path-style URL.
    let same = Config::from_vars(azurite.env()).open(&azurite.url("boxes", "one")).unwrap();
    assert_eq!(same.get("manifest").unwrap(), b"second, longer");
}

#[test]
fn the_key_never_shows() {
    let Some(azurite) = Azurite::start() else { return };
    azurite.create_container("secret");
    let env = azurite.env();
    let store = Config::from_vars(env.clone()).open(&azurite.url("secret", "p")).unwrap();
    store.put("manifest", b"x").unwrap();
    assert!(!store.describe().contains(azurite.key()));
    assert!(!format!("{:?}", Config::from_vars(env.clone())).contains(azurite.key()));

    // A wrong key: refused, and the message names neither key.
    let wrong = "V3JvbmcgYnV0IHdlbGwtZm9ybWVkIGtleSwgbG9uZyBlbm91Z2ggdG8gc2lnbiB3aXRoIQ==";
    let vars = env
        .iter()
        .map(|(k, v)| (k.clone(), if k == "AZURE_STORAGE_ACCOUNT_KEY" { wrong.to_string() } else { v.clone() }));
    let store = Config::from_vars(vars).open(&azurite.url("secret", "p")).unwrap();
    let err = store.get("manifest").unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, StoreError::Remote(_)), "{text}");
    assert!(text.contains("manifest"), "the message names the object: {text}");
    assert!(!text.contains(wrong) && !text.contains(azurite.key()), "{text}");

    // A container that does not exist: an error, not a panic or a hang.
    let missing = Config::from_vars(env).open(&azurite.url("nosuchcontainer", "p")).unwrap();
    let err = missing.put("manifest", b"x").unwrap_err();
    assert!(matches!(err, StoreError::Remote(_)), "{err:?}");
    assert!(err.to_string().contains("does not exist"), "{err}");
    let err = missing.list("chunks/").unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_inside_an_async_runtime() {
    let Some(azurite) = Azurite::start() else { return };
    azurite.create_container("async");
    // Opened on a runtime thread, used from blocking tasks of this runtime.
    let store: Arc<dyn Store> = Config::from_vars(azurite.env()).open(&azurite.url("async", "p")).unwrap();
    let s = store.clone();
    let got = tokio::task::spawn_blocking(move || {
        s.put("manifest", b"from a blocking task").unwrap();
        s.get("manifest").unwrap()
    })
    .await
    .unwrap();
    assert_eq!(got, b"from a blocking task");
    let s = store.clone();
    let listed = tokio::task::spawn_blocking(move || s.list("").unwrap()).await.unwrap();
    assert_eq!(listed, vec!["manifest"]);
    // Dropped on a runtime thread: must not panic.
    drop(store);
}

#[test]
fn a_second_writer_takes_the_image_over_and_the_first_cannot_commit() {
    use capsa_encfs::{BLOCK_SIZE, Error, Image, MasterKey, OpenOptions};
    let Some(azurite) = Azurite::start() else { return };
    azurite.create_container("shared");
    let config = Config::from_vars(azurite.env());
    let url = azurite.url("shared", "image");
    let key = MasterKey::from_bytes(&[7; 32]).unwrap();
    let block = |byte: u8| vec![byte; BLOCK_SIZE];

    let first =
        Image::create(config.create(&url).unwrap(), &key, 64 * BLOCK_SIZE as u64, 8, OpenOptions::default()).unwrap();
    first.write_at(0, &block(1)).unwrap();
    first.commit().unwrap();

    // The second writer's open rewrites the manifest on condition: from then
    // on the first one's commits are refused, before they name anything.
    let second = Image::open(config.open(&url).unwrap(), &key, OpenOptions::default()).unwrap();
    first.write_at(0, &block(2)).unwrap();
    let refused = first.commit().unwrap_err();
    assert!(refused.to_string().contains("another writer has the image open read-write"), "{refused}");
    assert!(matches!(first.write_at(0, &block(3)), Err(Error::Failed(_))), "it takes no more writes");

    let mut read = block(0);
    second.read_at(0, &mut read).unwrap();
    assert_eq!(read, block(1), "the second writer sees the last commit");
    second.write_at(BLOCK_SIZE as u64, &block(4)).unwrap();
    second.commit().unwrap();
    drop((first, second));

    let reader =
        Image::open(config.open(&url).unwrap(), &key, OpenOptions { read_only: true, ..OpenOptions::default() })
            .unwrap();
    reader.check().unwrap();
    reader.read_at(BLOCK_SIZE as u64, &mut read).unwrap();
    assert_eq!(read, block(4));
}
