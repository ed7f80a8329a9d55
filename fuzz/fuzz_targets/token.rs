//! Token verification: any string verifies or is refused, against a fixed
//! JWKS (the ES384 key and an RSA-2048 key that signed the seeds), and its
//! issuer can be peeked at without a panic.
#![no_main]

use std::sync::OnceLock;

use aws_lc_rs::rsa::PrivateDecryptingKey;
use capsa_trust::token::{Jwk, Jwks, SigningKey, peek_issuer, verify};
use capsa_trust::wrap::rsa_public_jwk;
use libfuzzer_sys::fuzz_target;

const ES384_PKCS8: &[u8] = include_bytes!("../keys/es384.pk8");
const RSA_PKCS8: &[u8] = include_bytes!("../keys/rsa2048.pk8");
/// Inside the seed tokens' validity (they were issued at this instant).
const NOW: i64 = 1_800_000_000;

fn jwks() -> Jwks {
    let es = SigningKey::from_pkcs8(ES384_PKCS8, NOW).unwrap_or_else(|e| panic!("the fixture key must load: {e}"));
    let rsa = PrivateDecryptingKey::from_pkcs8(RSA_PKCS8).unwrap_or_else(|e| panic!("the fixture key must load: {e}"));
    let rsa = rsa_public_jwk(&rsa.public_key()).unwrap_or_else(|e| panic!("the fixture key must encode: {e}"));
    let rsa = Jwk {
        kty: "RSA".into(),
        crv: None,
        x: None,
        y: None,
        n: Some(rsa.n),
        e: Some(rsa.e),
        kid: Some("rsa-1".into()),
        alg: None,
        key_use: Some("sig".into()),
    };
    Jwks { keys: vec![es.public_jwk(), rsa] }
}

fuzz_target!(|data: &[u8]| {
    static JWKS: OnceLock<Jwks> = OnceLock::new();
    let token = String::from_utf8_lossy(data);
    let _ = verify(&token, JWKS.get_or_init(jwks), NOW, 60);
    let _ = peek_issuer(&token);
});
