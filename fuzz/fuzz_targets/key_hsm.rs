//! Wrapped keys: `key_hsm` envelopes parse or are refused, and
//! `RSA_AES_KEY_WRAP_256` ciphertext (the input itself, and a parsed
//! envelope's) unwraps with a fixed RSA-2048 key or is refused.
#![no_main]

use std::sync::OnceLock;

use aws_lc_rs::rsa::PrivateDecryptingKey;
use capsa_trust::wrap::{KeyHsm, unwrap_key};
use libfuzzer_sys::fuzz_target;

/// The key the seeds were wrapped to.
const RSA_PKCS8: &[u8] = include_bytes!("../keys/rsa2048.pk8");

fuzz_target!(|data: &[u8]| {
    static KEY: OnceLock<PrivateDecryptingKey> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        PrivateDecryptingKey::from_pkcs8(RSA_PKCS8).unwrap_or_else(|e| panic!("the fixture key must load: {e}"))
    });
    if let Ok(key_hsm) = KeyHsm::parse(&String::from_utf8_lossy(data)) {
        let _ = unwrap_key(key, &key_hsm.ciphertext);
    }
    let _ = unwrap_key(key, data);
});
