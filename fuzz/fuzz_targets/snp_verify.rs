//! Report verification with a genuine, already verified VCEK chain: whatever
//! the report bytes, the answer is claims or an error, never a panic.
#![no_main]

use std::sync::OnceLock;

use capsa_tee::snp::{Appraisal, RootStore, VerifiedChain, Verifier};
use libfuzzer_sys::fuzz_target;
use time::macros::datetime;

const VCEK: &[u8] = include_bytes!("../../../shared/testdata/evidence/snp/milan-v2-vcek.der");

fuzz_target!(|data: &[u8]| {
    static CHAIN: OnceLock<VerifiedChain> = OnceLock::new();
    let chain = CHAIN.get_or_init(|| {
        Verifier::new(RootStore::amd())
            .verify_chain(VCEK, None, datetime!(2025-06-01 00:00 UTC))
            .unwrap_or_else(|e| panic!("the fixture VCEK must verify: {e}"))
    });
    let _ = chain.verify_report(data, &Appraisal::default());
});
