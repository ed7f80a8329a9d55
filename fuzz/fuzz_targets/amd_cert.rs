//! AMD certificates: DER and PEM parsing, the endorsement-key extensions, the
//! P-384 key, and the whole chain check a VCEK or VLEK from a guest goes
//! through.
#![no_main]

use std::sync::OnceLock;

use capsa_tee::snp::{AmdCert, Product, RootStore, Verifier, parse_pem_certs};
use libfuzzer_sys::fuzz_target;
use time::macros::datetime;

fuzz_target!(|data: &[u8]| {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    if let Ok(cert) = AmdCert::from_der("VCEK", data) {
        let _ = cert.endorsement_extensions(Product::Milan);
        let _ = cert.endorsement_extensions(Product::Turin);
        let _ = cert.p384_public_key();
    }
    let _ = parse_pem_certs(data);
    let verifier = VERIFIER.get_or_init(|| Verifier::new(RootStore::amd()));
    let _ = verifier.verify_chain(data, None, datetime!(2025-06-01 00:00 UTC));
});
