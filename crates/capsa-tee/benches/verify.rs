//! SEV-SNP verification throughput (issue 2): reports verified per second on
//! one core with the chain already verified, beside a bare aws-lc-rs P-384
//! verify of the same signed bytes, measured in the same process so that
//! both see the same machine state.
//!
//! ```text
//! taskset -c 1 cargo bench -p capsa-tee --bench verify
//! ```
//!
//! Results and how to read them: `docs/BENCHMARKS.md`.

use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED, ParsedPublicKey};
use capsa_tee::snp::{AmdCert, Appraisal, Report, RootStore, VerifiedChain, Verifier};
use divan::{Bencher, black_box};
use time::OffsetDateTime;
use time::macros::datetime;

const REPORT: &[u8] = include_bytes!("../../../../shared/testdata/evidence/snp/milan-v2-report.bin");
const VCEK: &[u8] = include_bytes!("../../../../shared/testdata/evidence/snp/milan-v2-vcek.der");
/// Inside the VCEK's and AMD's certificates' validity.
const AT: OffsetDateTime = datetime!(2025-06-01 00:00 UTC);
/// The signed region, and the offsets of the little-endian signature
/// components R and S (SEV-SNP ABI, table "ATTESTATION_REPORT structure"),
/// written out here rather than taken from capsa so that the bare verify
/// depends on nothing but aws-lc-rs.
const SIGNED: usize = 0x2A0;
const SIG_R: usize = 0x2A0;
const SIG_S: usize = 0x2E8;
const P384_SCALAR: usize = 48;

fn main() {
    divan::main();
}

fn verified_chain() -> VerifiedChain {
    let chain = Verifier::new(RootStore::amd()).verify_chain(VCEK, None, AT).expect("the fixture VCEK verifies");
    chain.verify_report(REPORT, &Appraisal::default()).expect("the fixture report verifies");
    chain
}

/// What capsa does per report once the chain is cached: parse, P-384
/// verify, bind to the VCEK (TCB, chip ID), appraise, build claims.
#[divan::bench(sample_count = 2000)]
fn capsa_snp_verify_report(bencher: Bencher) {
    let chain = verified_chain();
    let appraisal = Appraisal::default();
    bencher.bench_local(|| chain.verify_report(black_box(REPORT), black_box(&appraisal)).is_ok());
}

/// The floor: one aws-lc-rs ECDSA P-384/SHA-384 verify of the same 672
/// signed bytes with the same key, nothing else.
#[divan::bench(sample_count = 2000)]
fn bare_aws_lc_p384_verify(bencher: Bencher) {
    let vcek = AmdCert::from_der("VCEK", VCEK).expect("the fixture VCEK parses");
    let point = vcek.p384_public_key().expect("the VCEK has a P-384 key").as_ref().to_vec();
    let key = ParsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &point).expect("the point is on P-384");
    let mut signature = Vec::with_capacity(2 * P384_SCALAR);
    for offset in [SIG_R, SIG_S] {
        signature.extend(REPORT[offset..offset + P384_SCALAR].iter().rev());
    }
    let signed = &REPORT[..SIGNED];
    assert!(key.verify_sig(signed, &signature).is_ok(), "the fixture signature verifies");
    bencher.bench_local(|| key.verify_sig(black_box(signed), black_box(&signature)).is_ok());
}

/// The uncached cost, for reference: three RSA-4096 PSS verifies (ARK self
/// signature, ASK, VCEK), certificate parsing, validity and extensions.
#[divan::bench(sample_count = 500)]
fn chain_verification(bencher: Bencher) {
    let verifier = Verifier::new(RootStore::amd());
    bencher.bench_local(|| verifier.verify_chain(black_box(VCEK), None, black_box(AT)).is_ok());
}

/// Report framing alone: length, version, algorithm, zero padding, fields.
#[divan::bench(sample_count = 2000)]
fn report_parse(bencher: Bencher) {
    bencher.bench_local(|| Report::parse(black_box(REPORT)).is_ok());
}
