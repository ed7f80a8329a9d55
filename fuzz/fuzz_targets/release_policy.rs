//! Azure Key Vault release policies: any input parses or is refused; a parsed
//! policy's canonical JSON parses back to an equal policy, and evaluation
//! against a fixed Azure-style claims set never panics.
#![no_main]

use std::sync::OnceLock;

use capsa_trust::release_policy::ReleasePolicy;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value, json};

const ISSUER: &str = "https://sharedeus.eus.attest.azure.net";

fn claims() -> Map<String, Value> {
    let claims = json!({
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-sevsnpvm-hostdata": "73973b78d70cc68353426de188db5dfc57e5b766e399935fb73a61127ea26d20",
        "x-ms-sevsnpvm-is-debuggable": false,
        "x-ms-sevsnpvm-guestsvn": 3,
        "x-ms-sevsnpvm-bootloader-svn": 4.5,
        "x-ms-runtime": {"client-payload": {"nonce": "bm9uY2U"}, "keys": []},
        "x-ms-ver": "1.0",
        "iat": 1_800_000_000u64,
        "nothing": null,
    });
    let Value::Object(map) = claims else { unreachable!() };
    map
}

fuzz_target!(|data: &[u8]| {
    static CLAIMS: OnceLock<Map<String, Value>> = OnceLock::new();
    let Ok(policy) = ReleasePolicy::parse(data) else { return };
    let canonical = policy.to_json().to_string();
    let again = ReleasePolicy::parse(canonical.as_bytes())
        .unwrap_or_else(|e| panic!("the canonical form must parse: {e}\n{canonical}"));
    assert_eq!(again, policy, "the canonical form must parse to an equal policy: {canonical}");
    let _ = policy.evaluate(ISSUER, CLAIMS.get_or_init(claims));
});
