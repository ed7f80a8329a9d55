//! Azure CVM evidence: the evidence-v1 JSON and raw HCL reports parse or are
//! refused, parsed evidence can be described, and verification against the
//! genuine VCEK chains of both fixture machines never panics.
#![no_main]

use std::sync::OnceLock;

use capsa_tee::azure::{AzureEvidence, describe, verify};
use capsa_tee::snp::{RootStore, VerifiedChain, Verifier};
use libfuzzer_sys::fuzz_target;
use time::OffsetDateTime;
use time::macros::datetime;

const EVIDENCE_V1: &[u8] = include_bytes!("../../../shared/testdata/evidence/az-snp-vtpm/evidence-v1.json");
const HCL_VCEK_PEM: &[u8] = include_bytes!("../../../shared/testdata/evidence/az-snp-vtpm/vcek.pem");
/// Inside both VCEKs' validity.
const AT: OffsetDateTime = datetime!(2025-06-01 00:00 UTC);

fn chains() -> Vec<VerifiedChain> {
    let verifier = Verifier::new(RootStore::amd());
    let evidence =
        AzureEvidence::from_json(EVIDENCE_V1).unwrap_or_else(|e| panic!("the fixture evidence must parse: {e}"));
    let v1_vcek = evidence.vcek_der().unwrap_or_else(|| panic!("the fixture evidence carries its VCEK"));
    [v1_vcek, HCL_VCEK_PEM]
        .into_iter()
        .map(|vcek| {
            verifier.verify_chain(vcek, None, AT).unwrap_or_else(|e| panic!("the fixture VCEK must verify: {e}"))
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    static CHAINS: OnceLock<Vec<VerifiedChain>> = OnceLock::new();
    let chains = CHAINS.get_or_init(chains);
    for evidence in [AzureEvidence::from_json(data), AzureEvidence::from_hcl_report(data)].into_iter().flatten() {
        let _ = describe(&evidence);
        for chain in chains {
            let _ = verify(&evidence, chain, &Default::default());
        }
    }
});
