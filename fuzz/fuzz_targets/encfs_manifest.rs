//! capsa-encfs manifests, which come from the store (the host): parsing and
//! authenticating never panics, and nothing but a manifest this key made
//! authenticates. The first input byte picks the mode: raw bytes, or a
//! genuine manifest (made here, for geometry from the input) with the rest
//! of the input XORed over it, so that mutations reach past the magic.
#![no_main]

use std::sync::Arc;

use capsa_encfs::format::{ManifestHeader, authenticate_manifest};
use capsa_encfs::{Image, MasterKey, OpenOptions, Store};
use libfuzzer_sys::fuzz_target;

/// A store holding one manifest, written through the real code.
struct OneObject(std::sync::Mutex<Vec<u8>>);

impl Store for OneObject {
    fn get(&self, _name: &str) -> Result<Vec<u8>, capsa_encfs::StoreError> {
        let bytes = self.0.lock().unwrap().clone();
        if bytes.is_empty() { Err(capsa_encfs::StoreError::NotFound) } else { Ok(bytes) }
    }
    fn get_range(&self, _name: &str, _range: std::ops::Range<u64>) -> Result<Vec<u8>, capsa_encfs::StoreError> {
        Err(capsa_encfs::StoreError::NotFound)
    }
    fn put(&self, _name: &str, bytes: &[u8]) -> Result<(), capsa_encfs::StoreError> {
        *self.0.lock().unwrap() = bytes.to_vec();
        Ok(())
    }
    fn size(&self, _name: &str) -> Result<u64, capsa_encfs::StoreError> {
        let len = self.0.lock().unwrap().len() as u64;
        if len == 0 { Err(capsa_encfs::StoreError::NotFound) } else { Ok(len) }
    }
    fn delete(&self, _name: &str) -> Result<(), capsa_encfs::StoreError> {
        Ok(())
    }
    fn list(&self, _prefix: &str) -> Result<Vec<String>, capsa_encfs::StoreError> {
        Ok(Vec::new())
    }
    fn describe(&self) -> String {
        "fuzz".into()
    }
}

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes(&[0x42; 32]).unwrap();
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        let blocks = 1 + u64::from(rest.first().copied().unwrap_or(0)) * 97;
        let store = Arc::new(OneObject(std::sync::Mutex::new(Vec::new())));
        let created = Image::create(store.clone(), &key, blocks * 4096, 8, OpenOptions::default()).unwrap();
        drop(created);
        let mut manifest = store.get("manifest").unwrap();
        for (byte, flip) in manifest.iter_mut().zip(rest.iter().skip(1)) {
            *byte ^= flip;
        }
        let changed = rest.iter().skip(1).take(manifest.len()).any(|b| *b != 0);
        let result = authenticate_manifest(&manifest, &key);
        assert_eq!(result.is_ok(), !changed, "a changed manifest authenticated, or an unchanged one did not");
        manifest
    };
    let _ = ManifestHeader::peek(&bytes);
    let _ = authenticate_manifest(&bytes, &key);
});
