//! Attestation requests: any body parses or is refused, and a parsed request
//! attested as SevSnpVm and as TdxVm under the default policy (sim evidence
//! allowed) gives claims or an error, never a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use capsa_trust::attestation::{AttestRequest, Attestation, EvidenceKind};
use capsa_trust::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static ATTESTATION: OnceLock<Attestation> = OnceLock::new();
    let Ok(request) = serde_json::from_slice::<AttestRequest>(data) else { return };
    let attestation = ATTESTATION.get_or_init(|| Attestation::new(Arc::new(Config::default()), true));
    let _ = attestation.attest(EvidenceKind::SevSnpVm, None, &request);
    let _ = attestation.attest(EvidenceKind::TdxVm, None, &request);
});
