//! Real Azure confidential VM evidence from ../shared/testdata/evidence/az-snp-vtpm
//! (see PROVENANCE.md) and tampered variants that must each be refused with
//! their own error.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_tee::AttestationType;
use capsa_tee::azure::{self, AzureAppraisal, AzureError, AzureEvidence};
use capsa_tee::claims::TeeClaims;
use capsa_tee::snp::{RootStore, SnpError, VerifiedChain, Verifier};
use time::macros::datetime;

const EVIDENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/testdata/evidence/az-snp-vtpm");

/// Inside both VCEKs' validity (2025-01-28..2032-01-28 and
/// 2023-05-02..2030-05-02, per openssl) and the Milan ASK's and ARK's.
const AT: time::OffsetDateTime = datetime!(2025-06-01 00:00 UTC);

/// The nonce the sample quote was made for (`tpm2_quote -q challenge`).
const NONCE: &[u8] = b"challenge";

fn read(name: &str) -> Vec<u8> {
    std::fs::read(format!("{EVIDENCE}/{name}")).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn json() -> serde_json::Value {
    serde_json::from_slice(&read("evidence-v1.json")).unwrap()
}

fn evidence_v1(doc: &serde_json::Value) -> AzureEvidence {
    AzureEvidence::from_json(&serde_json::to_vec(doc).unwrap()).unwrap()
}

fn v1_chain(ev: &AzureEvidence) -> VerifiedChain {
    Verifier::new(RootStore::amd()).verify_chain(ev.vcek_der().unwrap(), None, AT).unwrap()
}

fn with_nonce() -> AzureAppraisal {
    AzureAppraisal { nonce: Some(NONCE.to_vec()), ..Default::default() }
}

fn verify_v1(doc: &serde_json::Value, appraisal: &AzureAppraisal) -> Result<capsa_tee::Claims, AzureError> {
    let ev = evidence_v1(doc);
    azure::verify(&ev, &v1_chain(&ev), appraisal)
}

fn hcl_bin_chain() -> VerifiedChain {
    let pem = read("vcek.pem");
    let text = String::from_utf8(pem.clone()).unwrap();
    let second = text[1..].find("-----BEGIN").unwrap() + 1;
    let (vcek, rest) = pem.split_at(second);
    Verifier::new(RootStore::amd()).verify_chain(vcek, Some(rest), AT).unwrap()
}

#[test]
fn azure_evidence_v1_verifies_with_its_vcek_and_pinned_roots() {
    let doc = json();
    let pcr0 = hex::decode(doc["tpm_quote"]["pcrs"][0].as_str().unwrap()).unwrap();
    let appraisal = AzureAppraisal { pcrs: BTreeMap::from([(0, pcr0.clone())]), ..with_nonce() };
    let claims = verify_v1(&doc, &appraisal).unwrap();

    assert_eq!(claims.attestation_type, AttestationType::AzureVm);
    let TeeClaims::AzureVm(az) = &claims.tee else { panic!("not Azure claims: {claims:?}") };
    assert_eq!(az.isolation_tee.attestation_type, AttestationType::SevSnpVm);
    assert_eq!(az.isolation_tee.snp.product, "Milan");
    assert_eq!(az.isolation_tee.snp.vmpl, 0);
    assert_eq!(az.isolation_tee.snp.report_version, 3);
    assert_eq!(az.pcrs.len(), 24);
    assert_eq!(az.pcrs[&0], hex::encode(pcr0));
    assert_eq!(az.pcrs[&8], "0".repeat(64));
    assert_eq!(az.runtime["vm-configuration"]["vmUniqueId"], "26F8BC30-774E-4290-8E7A-535F3B672AEE");
    assert_eq!(az.runtime["keys"][0]["kid"], "HCLAkPub");

    let out = serde_json::to_value(&claims).unwrap();
    assert_eq!(out["x-ms-attestation-type"], "azurevm");
    assert_eq!(out["x-ms-isolation-tee"]["x-ms-attestation-type"], "sevsnpvm");
    assert_eq!(out["x-ms-runtime"]["vm-configuration"]["secure-boot"], true);
    assert_eq!(out["x-ms-azurevm-pcrs"]["23"], "0".repeat(64));
}

#[test]
fn azure_evidence_v1_verifies_without_an_expected_nonce() {
    verify_v1(&json(), &AzureAppraisal::default()).unwrap();
}

#[test]
fn azure_hcl_report_bin_verifies_with_its_vcek_pem_chain() {
    let ev = AzureEvidence::from_hcl_report(&read("hcl-report.bin")).unwrap();
    assert!(ev.vcek_der().is_none());
    assert!(!ev.has_tpm_quote());
    let claims = azure::verify(&ev, &hcl_bin_chain(), &AzureAppraisal::default()).unwrap();
    let TeeClaims::AzureVm(az) = &claims.tee else { panic!("not Azure claims") };
    assert_eq!(az.isolation_tee.snp.report_version, 2);
    assert!(az.pcrs.is_empty());
    assert_eq!(az.runtime["vm-configuration"]["vmUniqueId"], "911B0EF8-9DBA-48B0-B275-4E4DF2D39252");
}

#[test]
fn azure_hcl_report_bin_verifies_with_pinned_roots() {
    let ev = AzureEvidence::from_hcl_report(&read("hcl-report.bin")).unwrap();
    let chain = Verifier::new(RootStore::amd()).verify_chain(&read("vcek.pem"), None, AT).unwrap();
    azure::verify(&ev, &chain, &AzureAppraisal::default()).unwrap();
}

#[test]
fn azure_the_json_hcl_report_alone_verifies_too() {
    let doc = json();
    let hcl = URL_SAFE_NO_PAD.decode(doc["hcl_report"].as_str().unwrap().trim_end_matches('=')).unwrap();
    let alone = AzureEvidence::from_hcl_report(&hcl).unwrap();
    let ev = evidence_v1(&doc);
    assert_eq!(alone.snp_report(), ev.snp_report());
    assert_eq!(alone.runtime_claims(), ev.runtime_claims());
    azure::verify(&alone, &v1_chain(&ev), &AzureAppraisal::default()).unwrap();
}

/// Replaces the first occurrence of `from` in the runtime claims by `to`
/// (same length), keeping the JSON valid so that only the binding can catch it.
fn tamper_runtime_claims(hcl: &mut [u8], from: &[u8], to: &[u8]) {
    let at = hcl.windows(from.len()).position(|w| w == from).unwrap();
    assert!(at > 1236, "the edit must land in the runtime claims");
    hcl[at..at + to.len()].copy_from_slice(to);
}

#[test]
fn azure_tampered_runtime_claims_are_not_bound() {
    let mut hcl = read("hcl-report.bin");
    tamper_runtime_claims(&mut hcl, b"911B0EF8", b"911B0EF9");
    let ev = AzureEvidence::from_hcl_report(&hcl).unwrap();
    let err = azure::verify(&ev, &hcl_bin_chain(), &AzureAppraisal::default()).unwrap_err();
    assert!(matches!(err, AzureError::RuntimeClaimsBinding { .. }), "{err}");
    assert!(!err.is_malformed());
    assert_eq!(
        err.to_string(),
        "runtime claims are not bound to the SNP report: SHA-256 of the runtime data differs from REPORT_DATA"
    );

    // The same in the JSON form, where the claims also carry the quote's key.
    let mut doc = json();
    let mut hcl = URL_SAFE_NO_PAD.decode(doc["hcl_report"].as_str().unwrap().trim_end_matches('=')).unwrap();
    tamper_runtime_claims(&mut hcl, b"26F8BC30", b"26F8BC31");
    doc["hcl_report"] = URL_SAFE_NO_PAD.encode(&hcl).into();
    let err = verify_v1(&doc, &with_nonce()).unwrap_err();
    assert!(matches!(err, AzureError::RuntimeClaimsBinding { .. }), "{err}");
}

#[test]
fn azure_tampered_snp_report_is_refused_by_the_snp_verifier() {
    let mut hcl = read("hcl-report.bin");
    hcl[32 + 0x90] ^= 1; // MEASUREMENT
    let ev = AzureEvidence::from_hcl_report(&hcl).unwrap();
    let err = azure::verify(&ev, &hcl_bin_chain(), &AzureAppraisal::default()).unwrap_err();
    assert!(matches!(err, AzureError::Snp(SnpError::Signature(_))), "{err}");
}

#[test]
fn azure_tampered_pcr_value_does_not_match_the_quoted_digest() {
    let mut doc = json();
    let pcr = doc["tpm_quote"]["pcrs"][5].as_str().unwrap().to_owned();
    let flipped = if pcr.starts_with('8') { "9" } else { "8" };
    doc["tpm_quote"]["pcrs"][5] = format!("{flipped}{}", &pcr[1..]).into();
    let err = verify_v1(&doc, &with_nonce()).unwrap_err();
    assert!(matches!(err, AzureError::PcrDigest), "{err}");
    assert_eq!(err.to_string(), "PCR digest in the TPM quote does not match the PCR values supplied");
}

#[test]
fn azure_missing_pcr_value_is_refused() {
    let mut doc = json();
    doc["tpm_quote"]["pcrs"].as_array_mut().unwrap().pop();
    let err = verify_v1(&doc, &with_nonce()).unwrap_err();
    assert!(matches!(err, AzureError::PcrCount { selected: 24, supplied: 23 }), "{err}");
}

fn flip_hex_byte(doc: &mut serde_json::Value, field: &str, index: usize) {
    let mut bytes = hex::decode(doc["tpm_quote"][field].as_str().unwrap()).unwrap();
    bytes[index] ^= 0x01;
    doc["tpm_quote"][field] = hex::encode(bytes).into();
}

#[test]
fn azure_tampered_quote_signature_is_refused() {
    for index in [0, 100, 255] {
        let mut doc = json();
        flip_hex_byte(&mut doc, "signature", index);
        let err = verify_v1(&doc, &with_nonce()).unwrap_err();
        assert!(matches!(err, AzureError::QuoteSignature), "byte {index}: {err}");
        assert_eq!(
            err.to_string(),
            "TPM quote signature does not verify with the attestation key HCLAkPub from the runtime claims"
        );
    }
}

#[test]
fn azure_tampered_quote_message_is_refused() {
    // Bytes of the clock, the firmware version, the PCR selection and the PCR digest:
    // each still parses, and the signature no longer covers it.
    for index in [60, 72, 86, 100] {
        let mut doc = json();
        flip_hex_byte(&mut doc, "message", index);
        let err = verify_v1(&doc, &with_nonce()).unwrap_err();
        assert!(matches!(err, AzureError::QuoteSignature), "byte {index}: {err}");
    }
}

#[test]
fn azure_wrong_nonce_is_refused() {
    let appraisal = AzureAppraisal { nonce: Some(b"challengf".to_vec()), ..Default::default() };
    let err = verify_v1(&json(), &appraisal).unwrap_err();
    assert!(matches!(err, AzureError::Nonce), "{err}");
    let appraisal = AzureAppraisal { nonce: Some(Vec::new()), ..Default::default() };
    assert!(matches!(verify_v1(&json(), &appraisal), Err(AzureError::Nonce)));
}

#[test]
fn azure_required_pcrs_are_checked() {
    let wrong = AzureAppraisal { pcrs: BTreeMap::from([(7, vec![0; 32])]), ..with_nonce() };
    let err = verify_v1(&json(), &wrong).unwrap_err();
    assert!(matches!(err, AzureError::PcrValue { index: 7, .. }), "{err}");
    let unquoted = AzureAppraisal { pcrs: BTreeMap::from([(24, vec![0; 32])]), ..with_nonce() };
    let err = verify_v1(&json(), &unquoted).unwrap_err();
    assert!(matches!(err, AzureError::PcrNotQuoted { index: 24 }), "{err}");
}

#[test]
fn azure_a_report_without_a_quote_cannot_meet_a_nonce_or_pcrs() {
    let ev = AzureEvidence::from_hcl_report(&read("hcl-report.bin")).unwrap();
    let err = azure::verify(&ev, &hcl_bin_chain(), &with_nonce()).unwrap_err();
    assert!(matches!(err, AzureError::NoQuote { .. }), "{err}");
    let pcrs = AzureAppraisal { pcrs: BTreeMap::from([(0, vec![0; 32])]), ..Default::default() };
    assert!(matches!(azure::verify(&ev, &hcl_bin_chain(), &pcrs), Err(AzureError::NoQuote { .. })));
}

#[test]
fn azure_the_wrong_vcek_is_refused() {
    let ev = evidence_v1(&json());
    let err = azure::verify(&ev, &hcl_bin_chain(), &with_nonce()).unwrap_err();
    assert!(matches!(err, AzureError::Snp(_)), "{err}");
    assert!(!err.is_malformed());
}

#[test]
fn azure_truncated_hcl_reports_are_malformed() {
    let hcl = read("hcl-report.bin");
    for len in 0..2346 {
        let err = AzureEvidence::from_hcl_report(&hcl[..len]).unwrap_err();
        assert!(err.is_malformed(), "length {len}: {err}");
    }
    // Zero padding after report_size is the NV index's and is accepted;
    // anything else there is refused.
    AzureEvidence::from_hcl_report(&hcl[..2346]).unwrap();
    let mut trailing = hcl.clone();
    trailing[2400] = 1;
    let err = AzureEvidence::from_hcl_report(&trailing).unwrap_err();
    assert!(matches!(err, AzureError::TrailingBytes { offset: 2400, .. }), "{err}");
}

#[test]
fn azure_header_fields_are_checked() {
    let hcl = read("hcl-report.bin");
    for (offset, value, field) in [
        (0usize, 0x58u8, "signature"),
        (4, 9, "version"),
        (8, 0x2b, "report_size"),
        (1216, 0x6b, "data_size"),
        (1220, 2, "request data version"),
        (1224, 4, "report_type"),
        (1228, 4, "report_data_hash_type"),
    ] {
        let mut bad = hcl.clone();
        bad[offset] = value;
        match AzureEvidence::from_hcl_report(&bad) {
            Err(AzureError::InvalidField { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: {other:?}"),
        }
    }
    let mut bad = hcl.clone();
    bad[1235] = 0x01; // variable_data_size beyond the input
    assert!(matches!(AzureEvidence::from_hcl_report(&bad), Err(AzureError::Truncated { .. })));
}

#[test]
fn azure_garbage_json_is_malformed() {
    let doc = json();
    let mut cases: Vec<Vec<u8>> = vec![
        b"".to_vec(),
        b"{".to_vec(),
        b"null".to_vec(),
        b"[1,2,3]".to_vec(),
        b"{\"version\":2}".to_vec(),
        b"{\"version\":1}".to_vec(),
        vec![0xff; 64],
    ];
    let mut edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut d = doc.clone();
        f(&mut d);
        cases.push(serde_json::to_vec(&d).unwrap());
    };
    edit(&|d| d["hcl_report"] = "!!!".into());
    edit(&|d| d["vcek"] = "*".into());
    edit(&|d| d["tpm_quote"]["message"] = "zz".into());
    edit(&|d| d["tpm_quote"]["message"] = "ff544347".into());
    edit(&|d| d["tpm_quote"]["signature"] = "0102".into());
    edit(&|d| d["tpm_quote"]["pcrs"][0] = "00".into());
    edit(&|d| d["unexpected"] = 1.into());
    edit(&|d| {
        let m = d["tpm_quote"]["message"].as_str().unwrap().to_owned();
        d["tpm_quote"]["message"] = format!("{m}00").into();
    });
    edit(&|d| {
        let m = d["tpm_quote"]["message"].as_str().unwrap().to_owned();
        d["tpm_quote"]["message"] = m.replacen("8018", "8014", 1).into();
    });
    edit(&|d| {
        let h = d["hcl_report"].as_str().unwrap().to_owned();
        d["hcl_report"] = h[..h.len() / 2].to_owned().into();
    });
    for (i, case) in cases.iter().enumerate() {
        let err = AzureEvidence::from_json(case).unwrap_err();
        assert!(err.is_malformed(), "case {i}: {err}");
    }
    let err = AzureEvidence::from_json(b"{\"version\":2}").unwrap_err();
    assert_eq!(err, AzureError::UnsupportedEvidenceVersion { found: 2 });
}

#[test]
fn azure_random_bytes_never_panic() {
    let hcl = read("hcl-report.bin");
    let message = hex::decode(json()["tpm_quote"]["message"].as_str().unwrap()).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        // Flip a few random bytes of real inputs: deeper than pure noise.
        let mut bad = hcl.clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() % bad.len() as u64) as usize;
            bad[i] = next() as u8;
        }
        let _ = AzureEvidence::from_hcl_report(&bad);
        let mut doc = json();
        let mut m = message.clone();
        let i = (next() % m.len() as u64) as usize;
        m[i] = next() as u8;
        m.truncate((next() % (m.len() as u64 + 1)) as usize);
        doc["tpm_quote"]["message"] = hex::encode(m).into();
        let _ = AzureEvidence::from_json(&serde_json::to_vec(&doc).unwrap());
    }
}

#[test]
fn azure_describe_lists_every_part_without_verifying() {
    let ev = evidence_v1(&json());
    let rows: BTreeMap<String, String> = azure::describe(&ev).into_iter().collect();
    assert_eq!(rows["hcl.signature"], "HCLA");
    assert_eq!(rows["hcl.request_type"], "2 (AK certificate request)");
    assert_eq!(rows["igvm.report_data_hash_type"], "1 (SHA-256)");
    assert_eq!(rows["snp.version"], "3");
    assert!(rows["snp.reported_tcb"].contains("bootloader="), "{}", rows["snp.reported_tcb"]);
    assert_eq!(rows["runtime.vm-configuration.vmUniqueId"], "26F8BC30-774E-4290-8E7A-535F3B672AEE");
    assert!(rows["runtime.keys.HCLAkPub"].starts_with("RSA-2048, e=65537"), "{}", rows["runtime.keys.HCLAkPub"]);
    assert_eq!(rows["tpm.extra_data"], "6368616c6c656e6765 (\"challenge\")");
    assert_eq!(
        rows["tpm.pcr_select[0]"],
        format!("0x000b (SHA-256): {}", (0..24).map(|i| i.to_string()).collect::<Vec<_>>().join(","))
    );
    assert!(rows["tpm.signature.scheme"].starts_with("RSASSA-PKCS1-v1_5 with SHA-256 (bare"));
    assert_eq!(rows["tpm.pcr[17]"], "f".repeat(64));
    assert_eq!(rows["vcek.issuer"], "SEV-Milan");

    let bare = AzureEvidence::from_hcl_report(&read("hcl-report.bin")).unwrap();
    let rows: BTreeMap<String, String> = azure::describe(&bare).into_iter().collect();
    assert_eq!(rows["tpm"], "no TPM quote");
    assert_eq!(rows["vcek"], "not included");
}
