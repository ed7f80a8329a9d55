//! How evidence and endorsements arrive: hex or binary evidence; DER, PEM or
//! Azure certificate-cache JSON endorsements.
#![no_main]

use capsa_tee::encoding::{endorsement, evidence_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = evidence_bytes(data);
    let _ = endorsement(data);
});
