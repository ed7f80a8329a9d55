//! Real SEV-SNP evidence from ../shared/testdata/evidence (see its
//! PROVENANCE.md) and every tampered variant of it that must be refused.

use capsa_tee::AttestationType;
use capsa_tee::snp::{Appraisal, AppraisalError, CertError, ChainError, RootStore, SIGNED_LEN, SnpError, Verifier};
use time::macros::datetime;

const EVIDENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/testdata/evidence");

fn read(path: &str) -> Vec<u8> {
    std::fs::read(format!("{EVIDENCE}/{path}")).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn verifier() -> Verifier {
    Verifier::new(RootStore::amd())
}

const WITHIN_VALIDITY: time::OffsetDateTime = datetime!(2025-06-01 00:00 UTC);

#[test]
fn milan_v2_report_verifies_with_pinned_roots() {
    let chain = verifier().verify_chain(&read("snp/milan-v2-vcek.der"), None, WITHIN_VALIDITY).unwrap();
    let verified = chain.verify_report(&read("snp/milan-v2-report.bin"), &Appraisal::default()).unwrap();
    let claims = verified.claims();
    assert_eq!(claims.attestation_type, AttestationType::SevSnpVm);
    let snp = claims.snp().unwrap();
    assert_eq!(snp.product, "Milan");
    assert_eq!(snp.bootloader_svn, 3);
    assert_eq!(snp.microcode_svn, 0x73);
    assert!(!snp.is_debuggable);
    let json = serde_json::to_value(claims).unwrap();
    assert_eq!(json["x-ms-attestation-type"], "sevsnpvm");
    assert_eq!(json["x-ms-sevsnpvm-launchmeasurement"].as_str().unwrap().len(), 96);
}

#[test]
fn milan_chain_given_explicitly_verifies() {
    let chain_pem = read("snp/amd/milan_ask_ark_asvk.pem");
    let chain = verifier().verify_chain(&read("snp/milan-v2-vcek.der"), Some(&chain_pem), WITHIN_VALIDITY).unwrap();
    chain.verify_report(&read("snp/milan-v2-report.bin"), &Appraisal::default()).unwrap();
}

#[test]
fn vlek_v3_report_verifies_through_the_asvk() {
    let chain = verifier().verify_chain(&read("snp/vlek.der"), None, WITHIN_VALIDITY).unwrap();
    let verified = chain.verify_report(&read("snp/vlek-v3-report.bin"), &Appraisal::default()).unwrap();
    assert_eq!(verified.claims().snp().unwrap().signing_key, "vlek");
    assert_eq!(verified.report().version, 3);
}

#[test]
fn every_flipped_byte_of_the_signed_region_is_refused() {
    let chain = verifier().verify_chain(&read("snp/milan-v2-vcek.der"), None, WITHIN_VALIDITY).unwrap();
    let report = read("snp/milan-v2-report.bin");
    assert_eq!(SIGNED_LEN, 672);
    for i in 0..SIGNED_LEN {
        let mut tampered = report.clone();
        tampered[i] ^= 0x01;
        let result = chain.verify_report(&tampered, &Appraisal::default());
        assert!(result.is_err(), "flipping byte {i:#x} was accepted");
    }
}

#[test]
fn every_flipped_signature_or_trailing_byte_is_refused() {
    let chain = verifier().verify_chain(&read("snp/milan-v2-vcek.der"), None, WITHIN_VALIDITY).unwrap();
    let report = read("snp/milan-v2-report.bin");
    for i in SIGNED_LEN..report.len() {
        let mut tampered = report.clone();
        tampered[i] ^= 0x80;
        assert!(chain.verify_report(&tampered, &Appraisal::default()).is_err(), "flipping byte {i:#x} was accepted");
    }
    let mut tampered = report.clone();
    tampered[0x2A0] ^= 1;
    assert_eq!(
        chain.verify_report(&tampered, &Appraisal::default()).unwrap_err().to_string(),
        "report signature does not verify with the VCEK"
    );
}

#[test]
fn invalid_vceks_are_refused() {
    for name in ["snp/vcek-invalid-legacy.der", "snp/vcek-invalid-new.der"] {
        let err = verifier().verify_chain(&read(name), None, WITHIN_VALIDITY).unwrap_err();
        assert!(matches!(err, ChainError::Cert(CertError::Signature { role: "VCEK", .. })), "{name}: unexpected {err}");
    }
}

#[test]
fn a_vcek_with_another_products_chain_is_refused() {
    let genoa = read("snp/amd/genoa_ask_ark_asvk.pem");
    let err = verifier().verify_chain(&read("snp/milan-v2-vcek.der"), Some(&genoa), WITHIN_VALIDITY).unwrap_err();
    assert!(matches!(err, ChainError::MissingCert { role: "ASK", .. }), "{err}");
}

#[test]
fn a_chain_whose_ask_is_swapped_for_another_products_is_refused() {
    // Genoa's ASK renamed cannot be built, but an ASK under the right name
    // with the wrong key can: splice Genoa's ASK and ARK around Milan's names
    // by offering Milan's ASK with Genoa's ARK.
    let milan = capsa_tee::snp::parse_pem_certs(&read("snp/amd/milan_ask_ark_asvk.pem")).unwrap();
    let genoa = capsa_tee::snp::parse_pem_certs(&read("snp/amd/genoa_ask_ark_asvk.pem")).unwrap();
    let pem = |der: &[u8]| {
        use base64::Engine as _;
        format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::engine::general_purpose::STANDARD.encode(der)
        )
    };
    let mixed = format!("{}{}", pem(&milan[0]), pem(&genoa[1]));
    let err =
        verifier().verify_chain(&read("snp/milan-v2-vcek.der"), Some(mixed.as_bytes()), WITHIN_VALIDITY).unwrap_err();
    assert!(matches!(err, ChainError::MissingCert { role: "ARK", .. }), "{err}");
}

#[test]
fn a_report_checked_after_the_vceks_validity_is_refused() {
    let err =
        verifier().verify_chain(&read("snp/milan-v2-vcek.der"), None, datetime!(2030-01-25 00:00 UTC)).unwrap_err();
    assert!(matches!(err, ChainError::Cert(CertError::Validity { role: "VCEK", .. })), "{err}");
    let err = verifier().verify_chain(&read("snp/vlek.der"), None, datetime!(2025-12-11 00:00 UTC)).unwrap_err();
    assert!(matches!(err, ChainError::Cert(CertError::Validity { role: "VLEK", .. })), "{err}");
}

#[test]
fn a_report_signed_by_another_key_kind_is_refused() {
    let chain = verifier().verify_chain(&read("snp/milan-v2-vcek.der"), None, WITHIN_VALIDITY).unwrap();
    let err = chain.verify_report(&read("snp/vlek-v3-report.bin"), &Appraisal::default()).unwrap_err();
    assert!(matches!(err, SnpError::SigningKeyMismatch { .. }), "{err}");
}

#[test]
fn appraisal_rules_refuse_what_they_should() {
    let chain = verifier().verify_chain(&read("snp/milan-v2-vcek.der"), None, WITHIN_VALIDITY).unwrap();
    let report = read("snp/milan-v2-report.bin");
    let refused = |a: Appraisal| chain.verify_report(&report, &a).unwrap_err();

    let min_tcb = Some(capsa_tee::snp::TcbVersion::new(None, 4, 0, 8, 0x73));
    assert!(matches!(
        refused(Appraisal { min_tcb, ..Default::default() }),
        SnpError::Appraisal(AppraisalError::TcbTooOld { component: "bootloader", reported: 3, minimum: 4 })
    ));
    assert!(matches!(
        refused(Appraisal { required_vmpl: Some(1), ..Default::default() }),
        SnpError::Appraisal(AppraisalError::Vmpl { .. })
    ));
    assert!(matches!(
        refused(Appraisal { min_guest_svn: Some(5), ..Default::default() }),
        SnpError::Appraisal(AppraisalError::GuestSvn { .. })
    ));
    assert!(matches!(
        refused(Appraisal { measurements: vec![[0; 48]], ..Default::default() }),
        SnpError::Appraisal(AppraisalError::Measurement { .. })
    ));
    assert!(matches!(
        refused(Appraisal { host_data: Some([1; 32]), ..Default::default() }),
        SnpError::Appraisal(AppraisalError::HostData { .. })
    ));
    assert!(matches!(
        refused(Appraisal { report_data: Some([1; 64]), ..Default::default() }),
        SnpError::Appraisal(AppraisalError::ReportData)
    ));

    let parsed = capsa_tee::snp::Report::parse(&report).unwrap();
    let accepted = Appraisal {
        min_tcb: Some(capsa_tee::snp::TcbVersion::new(None, 3, 0, 8, 0x73)),
        refuse_debug: true,
        refuse_migration_agent: !parsed.policy.migrate_ma_allowed(),
        required_vmpl: Some(parsed.vmpl),
        min_guest_svn: Some(parsed.guest_svn),
        measurements: vec![[0; 48], parsed.measurement],
        host_data: Some(parsed.host_data),
        report_data: Some(parsed.report_data),
    };
    chain.verify_report(&report, &accepted).unwrap();
}
