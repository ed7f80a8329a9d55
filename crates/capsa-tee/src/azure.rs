//! Azure confidential VM evidence: an SEV-SNP report made by the paravisor,
//! bound to vTPM runtime claims, and a TPM quote signed by the vTPM's
//! attestation key.
//!
//! This module owns the parsing and verification of that evidence. The SNP
//! report itself is verified by [`crate::snp`]; what is added here is the
//! chain of bindings from the SNP report to the TPM's PCRs.
//!
//! # Format
//!
//! An Azure CVM runs a paravisor (the HCL) at VMPL 0 below the guest. At
//! boot it asks the SNP firmware for a report and stores, in the vTPM's NV
//! index `0x01400001`, an *HCL report* (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | signature `"HCLA"` |
//! | 4 | 4 | version (1 or 2) |
//! | 8 | 4 | report_size: bytes from offset 0 to the end of the runtime claims |
//! | 12 | 4 | request_type (2: AK certificate request) |
//! | 16 | 4 | status |
//! | 20 | 12 | reserved |
//! | 32 | 1184 | the SEV-SNP attestation report |
//! | 1216 | 4 | data_size: 20 + variable_data_size |
//! | 1220 | 4 | IGVM request data version (1) |
//! | 1224 | 4 | report_type (2: SNP; 4 would be TDX, not supported) |
//! | 1228 | 4 | report_data_hash_type (1: SHA-256, 2: SHA-384, 3: SHA-512) |
//! | 1232 | 4 | variable_data_size |
//! | 1236 | n | the runtime claims: a JSON object (`keys`, `vm-configuration`, `user-data`) |
//!
//! The NV index is larger than the report, so zero bytes may follow it.
//! Anything else after the runtime claims is refused: one report has one
//! accepted byte representation.
//!
//! The runtime claims' `keys` hold the vTPM attestation key as an RSA JWK
//! with `kid` `HCLAkPub`. A TPM2 quote (`TPMS_ATTEST` of type
//! `TPM_ST_ATTEST_QUOTE`, big-endian) signed by that key carries the caller's
//! nonce in `extraData` and a digest of the quoted PCRs.
//!
//! The self-contained JSON form (`evidence-v1`) is
//! `{"version": 1, "hcl_report": <base64url>, "tpm_quote": {"message": <hex
//! TPMS_ATTEST>, "pcrs": [<hex>, ...], "signature": <hex>}, "vcek":
//! <base64url DER>}`. `pcrs` lists the values of the PCRs the quote selects,
//! in selection order (banks in order, PCR indices ascending), exactly the
//! bytes the TPM hashed into the quote's PCR digest. `signature` is either a
//! marshalled `TPMT_SIGNATURE` or, as `az-cvm-vtpm` stores it, the bare
//! RSASSA-PKCS1-v1_5 signature bytes.
//!
//! # Binding rule
//!
//! The header and the IGVM request data are unmeasured: nothing signs them.
//! Only two things are trusted, in this order:
//!
//! 1. the SNP report, through [`crate::snp::VerifiedChain::verify_report`],
//!    and only if it was requested at VMPL 0, where the paravisor runs (a
//!    report from the guest at a higher VMPL could carry the digest of any
//!    claims the guest likes);
//! 2. the runtime claims, only because REPORT_DATA begins with
//!    `H(runtime claims bytes)`, `H` being the hash the IGVM request data
//!    names, and every REPORT_DATA byte after the digest is zero. Trusting
//!    the unmeasured hash type is safe: passing with another `H` would take
//!    a preimage of the signed REPORT_DATA under that hash.
//!
//! Then the quote is believed only if `HCLAkPub` from those claims verifies
//! its signature (RSASSA or RSAPSS, SHA-256), and the PCR values only if
//! SHA-256 over their concatenation equals the quote's PCR digest. The
//! nonce and required PCR values are compared last, against the appraisal.

use std::collections::{BTreeMap, BTreeSet};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{
    RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256, RsaParameters, RsaPublicKeyComponents,
};
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::claims::{AttestationType, AzureVmClaims, Claims, IsolationTee, TeeClaims};
use crate::snp::{self, Product, REPORT_LEN, Report, SnpError, VerifiedChain};

/// Largest evidence-v1 JSON document accepted, in bytes.
pub const MAX_EVIDENCE_JSON_LEN: usize = 1 << 20;
/// Largest raw HCL report accepted, in bytes (the NV index holding it is a
/// few KiB; this leaves room for larger runtime claims).
pub const MAX_HCL_REPORT_LEN: usize = 256 << 10;

/// The VMPL the paravisor runs at; only its reports speak for the runtime claims.
const PARAVISOR_VMPL: u32 = 0;

const HCL_SIGNATURE: [u8; 4] = *b"HCLA";
const HCL_VERSIONS: std::ops::RangeInclusive<u32> = 1..=2;
const HCL_HEADER_LEN: usize = 32;
const IGVM_REQUEST_DATA_LEN: usize = 20;
const IGVM_REQUEST_DATA_VERSION: u32 = 1;
const IGVM_REPORT_TYPE_SNP: u32 = 2;
const REPORT_DATA_LEN: usize = 64;

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_ALG_RSASSA: u16 = 0x0014;
const TPM_ALG_RSAPSS: u16 = 0x0016;
const TPM_ALG_SHA256: u16 = 0x000b;
/// sizeof(TPMT_HA) with SHA-512: the largest TPM2B_NAME / TPM2B_DATA buffer.
const MAX_TPM2B_NAME: usize = 66;
/// Largest TPM2B_DIGEST buffer (SHA-512).
const MAX_TPM2B_DIGEST: usize = 64;
/// More banks than any TPM has.
const MAX_PCR_SELECTIONS: u32 = 16;
/// 32 bytes of select bits keeps every PCR index within a `u8`.
const MAX_PCR_SELECT: usize = 32;
/// RSA-8192, the largest key the verification algorithms accept.
const MAX_RSA_BYTES: usize = 1024;
const MIN_RSA_BYTES: usize = 256;
const SHA256_LEN: usize = 32;

const AK_KID: &str = "HCLAkPub";

/// base64url as Azure emits it (no padding), tolerating padding.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why Azure CVM evidence is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AzureError {
    /// The input exceeds a size limit.
    #[error("the {what} is {found} bytes, more than the {limit} accepted")]
    TooLarge {
        /// What was too large.
        what: &'static str,
        /// The limit.
        limit: usize,
        /// The size found.
        found: usize,
    },
    /// The evidence JSON does not have the evidence-v1 shape.
    #[error("the Azure evidence is not evidence-v1 JSON: {reason}")]
    Json {
        /// What serde found wrong.
        reason: String,
    },
    /// The evidence JSON has another version.
    #[error("Azure evidence version {found} is not supported (capsa understands version 1)")]
    UnsupportedEvidenceVersion {
        /// The version found.
        found: u64,
    },
    /// A JSON field does not decode.
    #[error("evidence field {field} is not valid {encoding}: {reason}")]
    Encoding {
        /// The field.
        field: &'static str,
        /// `hex` or `base64url`.
        encoding: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// A binary structure ends before one of its fields.
    #[error("the {structure} is truncated: {field} at offset {offset} needs {needed} bytes, {available} remain")]
    Truncated {
        /// The structure (`HCL report`, `TPMS_ATTEST`, ...).
        structure: &'static str,
        /// The field being read.
        field: &'static str,
        /// Its offset.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// A binary structure has bytes after its end.
    #[error("the {structure} has unexpected bytes from offset {offset} on: it was altered or is not a {structure}")]
    TrailingBytes {
        /// The structure.
        structure: &'static str,
        /// Offset of the first unexpected byte.
        offset: usize,
    },
    /// A field holds a value this parser does not accept.
    #[error("the {structure}'s {field} is {found}, expected {expected}")]
    InvalidField {
        /// The structure.
        structure: &'static str,
        /// The field.
        field: &'static str,
        /// The value found.
        found: String,
        /// What was expected.
        expected: String,
    },
    /// The runtime claims are not a JSON object.
    #[error("the runtime claims (the HCL report's variable data) are not a JSON object: {reason}")]
    RuntimeClaimsJson {
        /// Why.
        reason: String,
    },
    /// A supplied PCR value is not a SHA-256 digest.
    #[error("tpm_quote.pcrs[{position}] is {found} bytes, a SHA-256 PCR value is 32")]
    PcrValueLength {
        /// Position in the list.
        position: usize,
        /// Its length.
        found: usize,
    },
    /// The SNP report or its chain was refused.
    #[error(transparent)]
    Snp(#[from] SnpError),
    /// The SNP report was not made by the paravisor.
    #[error(
        "the SNP report was requested at VMPL {found}, not by the paravisor at VMPL 0: it cannot vouch for the runtime claims"
    )]
    ParavisorVmpl {
        /// The report's VMPL.
        found: u32,
    },
    /// The runtime claims digest differs from REPORT_DATA.
    #[error("runtime claims are not bound to the SNP report: {hash} of the runtime data differs from REPORT_DATA")]
    RuntimeClaimsBinding {
        /// The hash the HCL report declares.
        hash: RuntimeClaimsHash,
    },
    /// REPORT_DATA has non-zero bytes after the digest.
    #[error(
        "runtime claims are not bound to the SNP report: REPORT_DATA byte {offset}, after the {hash} digest of the runtime data, is not zero"
    )]
    ReportDataPadding {
        /// The hash the HCL report declares.
        hash: RuntimeClaimsHash,
        /// The first non-zero byte.
        offset: usize,
    },
    /// The runtime claims hold no usable attestation key.
    #[error("the runtime claims hold no usable attestation key HCLAkPub: {reason}")]
    AttestationKey {
        /// Why.
        reason: String,
    },
    /// The quote is signed with a scheme capsa does not verify.
    #[error(
        "the TPM quote is signed with scheme {sig_alg:#06x} and hash {hash_alg:#06x}: only RSASSA (0x0014) or RSAPSS (0x0016) with SHA-256 (0x000b) are accepted"
    )]
    SignatureScheme {
        /// TPMT_SIGNATURE.sigAlg.
        sig_alg: u16,
        /// The signature's hash algorithm.
        hash_alg: u16,
    },
    /// The quote signature is wrong.
    #[error("TPM quote signature does not verify with the attestation key HCLAkPub from the runtime claims")]
    QuoteSignature,
    /// The quote selects PCRs in a way capsa does not accept.
    #[error("the TPM quote's PCR selection is not supported: {reason}")]
    PcrSelection {
        /// Why.
        reason: String,
    },
    /// The number of PCR values supplied differs from the number quoted.
    #[error("the TPM quote selects {selected} PCRs but {supplied} PCR values were supplied")]
    PcrCount {
        /// PCRs the quote selects.
        selected: usize,
        /// Values in the evidence.
        supplied: usize,
    },
    /// The PCR values do not hash to the quote's PCR digest.
    #[error("PCR digest in the TPM quote does not match the PCR values supplied")]
    PcrDigest,
    /// The quote's extraData is not the expected nonce.
    #[error(
        "the TPM quote's nonce (extraData) differs from the expected nonce: the quote was not made for this challenge"
    )]
    Nonce,
    /// The appraisal needs a quote the evidence lacks.
    #[error("the evidence has no TPM quote, but the appraisal requires {required}: pass evidence with a quote")]
    NoQuote {
        /// What the appraisal requires.
        required: &'static str,
    },
    /// A required PCR is not in the quote.
    #[error("PCR {index} is required but the TPM quote does not select it")]
    PcrNotQuoted {
        /// The PCR index.
        index: u8,
    },
    /// A PCR value differs from the one required.
    #[error("PCR {index} is {found}, expected {expected}")]
    PcrValue {
        /// The PCR index.
        index: u8,
        /// Expected, hex.
        expected: String,
        /// Found, hex.
        found: String,
    },
    /// A bug in capsa, not a problem with the evidence.
    #[error("internal error verifying Azure evidence (a capsa bug): {reason}")]
    Internal {
        /// What went wrong.
        reason: &'static str,
    },
}

impl AzureError {
    /// Whether the input could not be read at all, as opposed to read and
    /// refused.
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::TooLarge { .. }
            | Self::Json { .. }
            | Self::UnsupportedEvidenceVersion { .. }
            | Self::Encoding { .. }
            | Self::Truncated { .. }
            | Self::TrailingBytes { .. }
            | Self::InvalidField { .. }
            | Self::RuntimeClaimsJson { .. }
            | Self::PcrValueLength { .. } => true,
            Self::Snp(e) => e.is_malformed(),
            _ => false,
        }
    }
}

/// The hash whose digest of the runtime claims REPORT_DATA carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeClaimsHash {
    /// SHA-256: REPORT_DATA is the digest and 32 zero bytes.
    Sha256,
    /// SHA-384: REPORT_DATA is the digest and 16 zero bytes.
    Sha384,
    /// SHA-512: REPORT_DATA is the digest.
    Sha512,
}

impl RuntimeClaimsHash {
    fn from_wire(value: u32) -> Option<Self> {
        match value {
            1 => Some(Self::Sha256),
            2 => Some(Self::Sha384),
            3 => Some(Self::Sha512),
            _ => None,
        }
    }

    fn wire(self) -> u32 {
        match self {
            Self::Sha256 => 1,
            Self::Sha384 => 2,
            Self::Sha512 => 3,
        }
    }

    fn algorithm(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha256 => &digest::SHA256,
            Self::Sha384 => &digest::SHA384,
            Self::Sha512 => &digest::SHA512,
        }
    }

    /// The hash's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "SHA-256",
            Self::Sha384 => "SHA-384",
            Self::Sha512 => "SHA-512",
        }
    }
}

impl std::fmt::Display for RuntimeClaimsHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The HCL report, framed but not verified.
#[derive(Debug, Clone)]
struct HclReport {
    version: u32,
    report_size: u32,
    request_type: u32,
    status: u32,
    snp: Vec<u8>,
    data_size: u32,
    request_data_version: u32,
    report_type: u32,
    hash: RuntimeClaimsHash,
    runtime_data: Vec<u8>,
    runtime_claims: serde_json::Value,
}

/// TPMS_ATTEST of a quote, framed but not verified.
#[derive(Debug, Clone)]
struct Attest {
    qualified_signer: Vec<u8>,
    extra_data: Vec<u8>,
    clock: u64,
    reset_count: u32,
    restart_count: u32,
    safe: bool,
    firmware_version: u64,
    selections: Vec<PcrSelection>,
    pcr_digest: Vec<u8>,
}

/// One TPMS_PCR_SELECTION.
#[derive(Debug, Clone)]
struct PcrSelection {
    hash: u16,
    select: Vec<u8>,
}

/// The quote's signature, as marshalled or bare.
#[derive(Debug, Clone)]
struct QuoteSignature {
    sig_alg: u16,
    hash_alg: u16,
    /// Whether the evidence held the bare signature (az-cvm-vtpm's format),
    /// which is RSASSA with SHA-256 by construction.
    bare: bool,
    bytes: Vec<u8>,
}

#[derive(Debug, Clone)]
struct TpmQuote {
    message: Vec<u8>,
    attest: Attest,
    signature: QuoteSignature,
    pcr_values: Vec<[u8; SHA256_LEN]>,
}

/// Azure confidential VM evidence, parsed but not verified: nothing it says
/// is believed until [`verify`] returns claims.
#[derive(Debug, Clone)]
pub struct AzureEvidence {
    hcl: HclReport,
    quote: Option<TpmQuote>,
    vcek: Option<Vec<u8>>,
}

/// The evidence-v1 JSON document.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EvidenceV1 {
    /// Always 1.
    #[allow(dead_code)]
    version: u64,
    /// The HCL report, base64url.
    hcl_report: String,
    /// The TPM quote.
    tpm_quote: QuoteV1,
    /// The VCEK, base64url DER.
    #[serde(default)]
    vcek: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteV1 {
    /// TPMS_ATTEST, hex.
    message: String,
    /// Values of the selected PCRs, hex.
    pcrs: Vec<String>,
    /// The signature, hex.
    signature: String,
}

/// Read first, alone, so that a future version is named as such rather than
/// reported as an unknown field.
#[derive(Deserialize)]
struct VersionOnly {
    version: u64,
}

impl AzureEvidence {
    /// The self-contained JSON (evidence-v1 format).
    pub fn from_json(bytes: &[u8]) -> Result<Self, AzureError> {
        if bytes.len() > MAX_EVIDENCE_JSON_LEN {
            return Err(AzureError::TooLarge {
                what: "evidence JSON",
                limit: MAX_EVIDENCE_JSON_LEN,
                found: bytes.len(),
            });
        }
        let json_err = |e: serde_json::Error| AzureError::Json { reason: e.to_string() };
        let VersionOnly { version } = serde_json::from_slice(bytes).map_err(json_err)?;
        if version != 1 {
            return Err(AzureError::UnsupportedEvidenceVersion { found: version });
        }
        let doc: EvidenceV1 = serde_json::from_slice(bytes).map_err(json_err)?;
        let hcl_bytes = base64url("hcl_report", &doc.hcl_report)?;
        let hcl = parse_hcl(&hcl_bytes)?;
        let vcek = doc.vcek.as_deref().map(|v| base64url("vcek", v)).transpose()?;

        let message = hex_field("tpm_quote.message", &doc.tpm_quote.message)?;
        let attest = parse_attest(&message)?;
        let signature = parse_signature(&hex_field("tpm_quote.signature", &doc.tpm_quote.signature)?)?;
        let pcr_values = doc
            .tpm_quote
            .pcrs
            .iter()
            .enumerate()
            .map(|(position, value)| {
                let bytes = hex_field("tpm_quote.pcrs", value)?;
                <[u8; SHA256_LEN]>::try_from(bytes.as_slice())
                    .map_err(|_| AzureError::PcrValueLength { position, found: bytes.len() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { hcl, quote: Some(TpmQuote { message, attest, signature, pcr_values }), vcek })
    }

    /// A raw HCL report alone (no TPM quote): verifies only the SNP report
    /// and the runtime-claims binding.
    pub fn from_hcl_report(bytes: &[u8]) -> Result<Self, AzureError> {
        Ok(Self { hcl: parse_hcl(bytes)?, quote: None, vcek: None })
    }

    /// The SEV-SNP attestation report inside the HCL report (1184 bytes).
    pub fn snp_report(&self) -> &[u8] {
        &self.hcl.snp
    }

    /// The VCEK certificate (DER) carried by the JSON's `vcek`, if any.
    pub fn vcek_der(&self) -> Option<&[u8]> {
        self.vcek.as_deref()
    }

    /// The runtime claims JSON object, unverified until [`verify`] succeeds.
    pub fn runtime_claims(&self) -> &serde_json::Value {
        &self.hcl.runtime_claims
    }

    /// Whether the evidence carries a TPM quote.
    pub fn has_tpm_quote(&self) -> bool {
        self.quote.is_some()
    }
}

/// Appraisal beyond SNP's: optional expected TPM nonce, required PCR values.
#[derive(Debug, Default, Clone)]
pub struct AzureAppraisal {
    /// Reference values for the SNP report.
    pub snp: snp::Appraisal,
    /// The quote's extraData must equal this (the verifier's challenge).
    pub nonce: Option<Vec<u8>>,
    /// Each PCR (SHA-256 bank) listed must be quoted with exactly this value.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
}

/// Verifies Azure CVM evidence whose SNP report was signed by `chain`'s key,
/// in the order the module documentation gives, and returns its claims.
pub fn verify(
    evidence: &AzureEvidence,
    chain: &VerifiedChain,
    appraisal: &AzureAppraisal,
) -> Result<Claims, AzureError> {
    let verified = chain.verify_report(&evidence.hcl.snp, &appraisal.snp)?;
    let vmpl = verified.report().vmpl;
    if vmpl != PARAVISOR_VMPL {
        return Err(AzureError::ParavisorVmpl { found: vmpl });
    }
    check_binding(evidence.hcl.hash, &evidence.hcl.runtime_data, &verified.report().report_data)?;

    let pcrs = match &evidence.quote {
        Some(quote) => verify_quote(quote, &evidence.hcl.runtime_claims, appraisal)?,
        None => {
            // Fail closed: a requirement the evidence cannot meet is a refusal.
            if appraisal.nonce.is_some() {
                return Err(AzureError::NoQuote { required: "a nonce" });
            }
            if !appraisal.pcrs.is_empty() {
                return Err(AzureError::NoQuote { required: "PCR values" });
            }
            BTreeMap::new()
        }
    };

    let claims = verified.into_claims();
    let TeeClaims::SevSnp(snp) = claims.tee else {
        return Err(AzureError::Internal { reason: "the SNP verifier returned claims of another TEE" });
    };
    // Sim must show at the top level too: a release policy that checks only
    // `x-ms-attestation-type` must never mistake sim evidence for hardware.
    let attestation_type =
        if claims.attestation_type.is_hardware() { AttestationType::AzureVm } else { AttestationType::Sim };
    Ok(Claims {
        attestation_type,
        tee: TeeClaims::AzureVm(AzureVmClaims {
            isolation_tee: IsolationTee { attestation_type: claims.attestation_type, snp },
            runtime: evidence.hcl.runtime_claims.clone(),
            pcrs,
        }),
    })
}

/// REPORT_DATA must be `H(runtime data)` followed by zeros.
fn check_binding(
    hash: RuntimeClaimsHash,
    runtime_data: &[u8],
    report_data: &[u8; REPORT_DATA_LEN],
) -> Result<(), AzureError> {
    let computed = digest::digest(hash.algorithm(), runtime_data);
    let computed = computed.as_ref();
    let (head, tail) = report_data
        .split_at_checked(computed.len())
        .ok_or(AzureError::Internal { reason: "a runtime claims digest is longer than REPORT_DATA" })?;
    if !bool::from(head.ct_eq(computed)) {
        return Err(AzureError::RuntimeClaimsBinding { hash });
    }
    if let Some(pos) = tail.iter().position(|&b| b != 0) {
        return Err(AzureError::ReportDataPadding { hash, offset: computed.len() + pos });
    }
    Ok(())
}

/// Checks the quote against the (already bound) runtime claims and returns
/// the quoted PCR values by index.
fn verify_quote(
    quote: &TpmQuote,
    runtime_claims: &serde_json::Value,
    appraisal: &AzureAppraisal,
) -> Result<BTreeMap<u8, String>, AzureError> {
    let (n, e) = attestation_key(runtime_claims)?;
    let sig = &quote.signature;
    if sig.hash_alg != TPM_ALG_SHA256 {
        return Err(AzureError::SignatureScheme { sig_alg: sig.sig_alg, hash_alg: sig.hash_alg });
    }
    let params: &RsaParameters = match sig.sig_alg {
        TPM_ALG_RSASSA => &RSA_PKCS1_2048_8192_SHA256,
        // TPMs since spec 1.38 use a salt as long as the digest, which is
        // what this algorithm requires.
        TPM_ALG_RSAPSS => &RSA_PSS_2048_8192_SHA256,
        other => return Err(AzureError::SignatureScheme { sig_alg: other, hash_alg: sig.hash_alg }),
    };
    RsaPublicKeyComponents { n: n.as_slice(), e: e.as_slice() }
        .verify(params, &quote.message, &sig.bytes)
        .map_err(|_| AzureError::QuoteSignature)?;

    // The attest structure is signed now; its selection tells which PCRs the values are.
    let attest = &quote.attest;
    let indices = selected_pcrs(&attest.selections)?;
    if indices.len() != quote.pcr_values.len() {
        return Err(AzureError::PcrCount { selected: indices.len(), supplied: quote.pcr_values.len() });
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    for value in &quote.pcr_values {
        ctx.update(value);
    }
    if !bool::from(ctx.finish().as_ref().ct_eq(&attest.pcr_digest)) {
        return Err(AzureError::PcrDigest);
    }
    if let Some(nonce) = &appraisal.nonce {
        if !bool::from(nonce.as_slice().ct_eq(&attest.extra_data)) {
            return Err(AzureError::Nonce);
        }
    }
    let quoted: BTreeMap<u8, &[u8; SHA256_LEN]> = indices.into_iter().zip(&quote.pcr_values).collect();
    for (&index, expected) in &appraisal.pcrs {
        let found = quoted.get(&index).ok_or(AzureError::PcrNotQuoted { index })?;
        if !bool::from(found.as_slice().ct_eq(expected)) {
            return Err(AzureError::PcrValue { index, expected: hex::encode(expected), found: hex::encode(found) });
        }
    }
    Ok(quoted.into_iter().map(|(i, v)| (i, hex::encode(v))).collect())
}

/// The PCR indices a quote selects, in the order the TPM hashes them.
fn selected_pcrs(selections: &[PcrSelection]) -> Result<Vec<u8>, AzureError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for sel in selections {
        // The claims carry SHA-256 values only; another bank would need
        // values of another length and a place to put them.
        if sel.hash != TPM_ALG_SHA256 {
            return Err(AzureError::PcrSelection { reason: format!("bank {:#06x} is not SHA-256 (0x000b)", sel.hash) });
        }
        for (byte_index, byte) in sel.select.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) == 0 {
                    continue;
                }
                let index = u8::try_from(byte_index * 8 + bit)
                    .map_err(|_| AzureError::PcrSelection { reason: "a PCR index above 255".to_owned() })?;
                if !seen.insert(index) {
                    return Err(AzureError::PcrSelection { reason: format!("PCR {index} is selected twice") });
                }
                out.push(index);
            }
        }
    }
    Ok(out)
}

/// The `HCLAkPub` JWK of the runtime claims as RSA (n, e), big-endian
/// without leading zeros.
fn attestation_key(runtime_claims: &serde_json::Value) -> Result<(Vec<u8>, Vec<u8>), AzureError> {
    let reason = |r: &str| AzureError::AttestationKey { reason: r.to_owned() };
    let keys = runtime_claims
        .get("keys")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| reason("the runtime claims have no \"keys\" array"))?;
    let mut matching = keys.iter().filter(|k| k.get("kid").and_then(serde_json::Value::as_str) == Some(AK_KID));
    let jwk = matching.next().ok_or_else(|| reason("no key has kid \"HCLAkPub\""))?;
    // Two candidates would let a verifier and a reader of the claims pick differently.
    if matching.next().is_some() {
        return Err(reason("more than one key has kid \"HCLAkPub\""));
    }
    if jwk.get("kty").and_then(serde_json::Value::as_str) != Some("RSA") {
        return Err(reason("its kty is not \"RSA\""));
    }
    let component = |name: &str| -> Result<Vec<u8>, AzureError> {
        let text = jwk
            .get(name)
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| reason(&format!("it has no \"{name}\"")))?;
        let bytes = BASE64URL.decode(text).map_err(|e| reason(&format!("its \"{name}\" is not base64url: {e}")))?;
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        Ok(bytes.get(start..).unwrap_or_default().to_vec())
    };
    let n = component("n")?;
    let e = component("e")?;
    if !(MIN_RSA_BYTES..=MAX_RSA_BYTES).contains(&n.len()) {
        return Err(reason(&format!("its modulus is {} bits, 2048 to 8192 are accepted", n.len() * 8)));
    }
    if e.is_empty() {
        return Err(reason("its exponent is zero"));
    }
    Ok((n, e))
}

// ---------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------

fn base64url(field: &'static str, text: &str) -> Result<Vec<u8>, AzureError> {
    BASE64URL.decode(text).map_err(|e| AzureError::Encoding { field, encoding: "base64url", reason: e.to_string() })
}

fn hex_field(field: &'static str, text: &str) -> Result<Vec<u8>, AzureError> {
    hex::decode(text).map_err(|e| AzureError::Encoding { field, encoding: "hex", reason: e.to_string() })
}

/// A cursor over untrusted bytes that returns errors instead of panicking.
struct Reader<'a> {
    structure: &'static str,
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn new(structure: &'static str, bytes: &'a [u8]) -> Self {
        Self { structure, bytes, offset: 0 }
    }

    fn take(&mut self, field: &'static str, len: usize) -> Result<&'a [u8], AzureError> {
        let rest = self.bytes.get(self.offset..).unwrap_or_default();
        let taken = rest.get(..len).ok_or(AzureError::Truncated {
            structure: self.structure,
            field,
            offset: self.offset,
            needed: len,
            available: rest.len(),
        })?;
        self.offset += len;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], AzureError> {
        let offset = self.offset;
        let bytes = self.take(field, N)?;
        <[u8; N]>::try_from(bytes).map_err(|_| AzureError::Truncated {
            structure: self.structure,
            field,
            offset,
            needed: N,
            available: bytes.len(),
        })
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, AzureError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }
    fn u16_be(&mut self, field: &'static str) -> Result<u16, AzureError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }
    fn u32_be(&mut self, field: &'static str) -> Result<u32, AzureError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }
    fn u64_be(&mut self, field: &'static str) -> Result<u64, AzureError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }
    fn u32_le(&mut self, field: &'static str) -> Result<u32, AzureError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    /// A TPM2B: a big-endian u16 size, then that many bytes, at most `max`.
    fn tpm2b(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], AzureError> {
        let len = usize::from(self.u16_be(field)?);
        if len > max {
            return Err(self.invalid(field, len.to_string(), format!("a size of at most {max}")));
        }
        self.take(field, len)
    }

    fn invalid(&self, field: &'static str, found: String, expected: String) -> AzureError {
        AzureError::InvalidField { structure: self.structure, field, found, expected }
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.offset)
    }

    /// The structure must end here.
    fn finish(self) -> Result<(), AzureError> {
        if self.offset != self.bytes.len() {
            return Err(AzureError::TrailingBytes { structure: self.structure, offset: self.offset });
        }
        Ok(())
    }

    /// The structure ends here, followed only by zero padding.
    fn finish_zero_padded(self) -> Result<(), AzureError> {
        let rest = self.bytes.get(self.offset..).unwrap_or_default();
        match rest.iter().position(|&b| b != 0) {
            Some(pos) => Err(AzureError::TrailingBytes { structure: self.structure, offset: self.offset + pos }),
            None => Ok(()),
        }
    }
}

fn parse_hcl(bytes: &[u8]) -> Result<HclReport, AzureError> {
    const S: &str = "HCL report";
    if bytes.len() > MAX_HCL_REPORT_LEN {
        return Err(AzureError::TooLarge { what: S, limit: MAX_HCL_REPORT_LEN, found: bytes.len() });
    }
    let mut r = Reader::new(S, bytes);
    let signature: [u8; 4] = r.array("signature")?;
    if signature != HCL_SIGNATURE {
        return Err(r.invalid("signature", format!("{:?}", String::from_utf8_lossy(&signature)), "\"HCLA\"".into()));
    }
    let version = r.u32_le("version")?;
    if !HCL_VERSIONS.contains(&version) {
        return Err(r.invalid("version", version.to_string(), "1 or 2".into()));
    }
    let report_size = r.u32_le("report_size")?;
    let request_type = r.u32_le("request_type")?;
    let status = r.u32_le("status")?;
    r.take("reserved", HCL_HEADER_LEN - 20)?;
    let snp = r.take("SNP report", REPORT_LEN)?.to_vec();
    let data_size = r.u32_le("data_size")?;
    let request_data_version = r.u32_le("request data version")?;
    if request_data_version != IGVM_REQUEST_DATA_VERSION {
        return Err(r.invalid("request data version", request_data_version.to_string(), "1".into()));
    }
    let report_type = r.u32_le("report_type")?;
    if report_type != IGVM_REPORT_TYPE_SNP {
        return Err(r.invalid(
            "report_type",
            report_type_name(report_type),
            "2 (SNP): only SEV-SNP CVMs are supported".into(),
        ));
    }
    let hash_wire = r.u32_le("report_data_hash_type")?;
    let hash = RuntimeClaimsHash::from_wire(hash_wire).ok_or_else(|| {
        r.invalid("report_data_hash_type", hash_wire.to_string(), "1, 2 or 3 (SHA-256, -384, -512)".into())
    })?;
    let variable_size = r.u32_le("variable_data_size")?;
    let variable_len =
        usize::try_from(variable_size).ok().filter(|&len| len <= r.remaining()).ok_or(AzureError::Truncated {
            structure: S,
            field: "runtime claims",
            offset: r.offset,
            needed: usize::try_from(variable_size).unwrap_or(usize::MAX),
            available: r.remaining(),
        })?;
    // The sizes are unmeasured; they must still agree, so that one report
    // has one reading.
    let expected_data_size = IGVM_REQUEST_DATA_LEN + variable_len;
    if usize::try_from(data_size).ok() != Some(expected_data_size) {
        return Err(r.invalid(
            "data_size",
            data_size.to_string(),
            format!("{expected_data_size} (20 + variable_data_size)"),
        ));
    }
    let runtime_data = r.take("runtime claims", variable_len)?.to_vec();
    if usize::try_from(report_size).ok() != Some(r.offset) {
        return Err(r.invalid(
            "report_size",
            report_size.to_string(),
            format!("{} (the end of the runtime claims)", r.offset),
        ));
    }
    r.finish_zero_padded()?;

    let runtime_claims: serde_json::Value =
        serde_json::from_slice(&runtime_data).map_err(|e| AzureError::RuntimeClaimsJson { reason: e.to_string() })?;
    if !runtime_claims.is_object() {
        return Err(AzureError::RuntimeClaimsJson { reason: "it is JSON, but not an object".into() });
    }
    Ok(HclReport {
        version,
        report_size,
        request_type,
        status,
        snp,
        data_size,
        request_data_version,
        report_type,
        hash,
        runtime_data,
        runtime_claims,
    })
}

fn parse_attest(bytes: &[u8]) -> Result<Attest, AzureError> {
    let mut r = Reader::new("TPMS_ATTEST", bytes);
    let magic = r.u32_be("magic")?;
    if magic != TPM_GENERATED_VALUE {
        return Err(r.invalid("magic", format!("{magic:#010x}"), "0xff544347 (TPM_GENERATED_VALUE)".into()));
    }
    let kind = r.u16_be("type")?;
    if kind != TPM_ST_ATTEST_QUOTE {
        return Err(r.invalid("type", format!("{kind:#06x}"), "0x8018 (TPM_ST_ATTEST_QUOTE)".into()));
    }
    let qualified_signer = r.tpm2b("qualifiedSigner", MAX_TPM2B_NAME)?.to_vec();
    let extra_data = r.tpm2b("extraData", MAX_TPM2B_NAME)?.to_vec();
    let clock = r.u64_be("clockInfo.clock")?;
    let reset_count = r.u32_be("clockInfo.resetCount")?;
    let restart_count = r.u32_be("clockInfo.restartCount")?;
    let safe = match r.u8("clockInfo.safe")? {
        0 => false,
        1 => true,
        other => return Err(r.invalid("clockInfo.safe", other.to_string(), "0 or 1".into())),
    };
    let firmware_version = r.u64_be("firmwareVersion")?;
    let count = r.u32_be("pcrSelect.count")?;
    if count > MAX_PCR_SELECTIONS {
        return Err(r.invalid("pcrSelect.count", count.to_string(), format!("at most {MAX_PCR_SELECTIONS}")));
    }
    let mut selections = Vec::new();
    for _ in 0..count {
        let hash = r.u16_be("pcrSelections.hash")?;
        let size = usize::from(r.u8("pcrSelections.sizeofSelect")?);
        if size > MAX_PCR_SELECT {
            return Err(r.invalid("pcrSelections.sizeofSelect", size.to_string(), format!("at most {MAX_PCR_SELECT}")));
        }
        let select = r.take("pcrSelections.pcrSelect", size)?.to_vec();
        selections.push(PcrSelection { hash, select });
    }
    let pcr_digest = r.tpm2b("pcrDigest", MAX_TPM2B_DIGEST)?.to_vec();
    r.finish()?;
    Ok(Attest {
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        safe,
        firmware_version,
        selections,
        pcr_digest,
    })
}

/// A marshalled TPMT_SIGNATURE with an RSA scheme, or else a bare RSA
/// signature, which az-cvm-vtpm takes from an RSASSA-SHA256 TPMT_SIGNATURE.
fn parse_signature(bytes: &[u8]) -> Result<QuoteSignature, AzureError> {
    const S: &str = "TPM quote signature";
    let marshalled = || -> Result<QuoteSignature, AzureError> {
        let mut r = Reader::new(S, bytes);
        let sig_alg = r.u16_be("sigAlg")?;
        if sig_alg != TPM_ALG_RSASSA && sig_alg != TPM_ALG_RSAPSS {
            return Err(r.invalid("sigAlg", format!("{sig_alg:#06x}"), "0x0014 (RSASSA) or 0x0016 (RSAPSS)".into()));
        }
        let hash_alg = r.u16_be("hash")?;
        let sig = r.tpm2b("sig", MAX_RSA_BYTES)?.to_vec();
        r.finish()?;
        Ok(QuoteSignature { sig_alg, hash_alg, bare: false, bytes: sig })
    };
    match marshalled() {
        Ok(sig) => Ok(sig),
        Err(_) if (MIN_RSA_BYTES..=MAX_RSA_BYTES).contains(&bytes.len()) => {
            Ok(QuoteSignature { sig_alg: TPM_ALG_RSASSA, hash_alg: TPM_ALG_SHA256, bare: true, bytes: bytes.to_vec() })
        }
        Err(e) => Err(e),
    }
}

fn report_type_name(value: u32) -> String {
    let name = match value {
        0 => "invalid",
        1 => "VBS",
        2 => "SNP",
        3 => "TVM",
        4 => "TDX",
        _ => "unknown",
    };
    format!("{value} ({name})")
}

fn request_type_name(value: u32) -> String {
    let name = match value {
        0 => "invalid",
        1 => "key release request",
        2 => "AK certificate request",
        3 => "wrapped key request",
        _ => "unknown",
    };
    format!("{value} ({name})")
}

fn tpm_alg_name(alg: u16) -> &'static str {
    match alg {
        0x0004 => "SHA-1",
        TPM_ALG_SHA256 => "SHA-256",
        0x000c => "SHA-384",
        0x000d => "SHA-512",
        0x0012 => "SM3-256",
        TPM_ALG_RSASSA => "RSASSA-PKCS1-v1_5",
        TPM_ALG_RSAPSS => "RSASSA-PSS",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------
// Description
// ---------------------------------------------------------------------------

/// Every field, human readable, without verifying (for `capsa evidence show`).
///
/// Names are dotted paths: `hcl.*` (header), `snp.*` (the SNP report, SPLs
/// decoded for the VCEK's product when a VCEK is present), `igvm.*` (the
/// request data), `runtime.*` (the runtime claims, objects flattened, keys
/// summarised by kid), `tpm.*` (the quote, its signature and the PCR values)
/// and `vcek.*`. Nothing here has been verified.
pub fn describe(evidence: &AzureEvidence) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut push = |k: &str, v: String| out.push((k.to_owned(), v));
    let hcl = &evidence.hcl;
    let vcek = evidence.vcek.as_deref().and_then(|der| snp::AmdCert::from_der("VCEK", der).ok());
    let product = vcek.as_ref().and_then(|c| c.issuer_common_name()).and_then(|issuer| {
        let name = issuer.strip_prefix("SEV-VLEK-").or_else(|| issuer.strip_prefix("SEV-"))?;
        Product::from_name(name)
    });

    push("hcl.signature", "HCLA".into());
    push("hcl.version", hcl.version.to_string());
    push("hcl.report_size", hcl.report_size.to_string());
    push("hcl.request_type", request_type_name(hcl.request_type));
    push("hcl.status", format!("{:#x}", hcl.status));
    match Report::parse(&hcl.snp) {
        Ok(report) => {
            for (k, v) in report.describe(product) {
                push(&format!("snp.{k}"), v);
            }
        }
        Err(e) => push("snp", format!("unreadable: {e}")),
    }
    push("igvm.data_size", hcl.data_size.to_string());
    push("igvm.version", hcl.request_data_version.to_string());
    push("igvm.report_type", report_type_name(hcl.report_type));
    push("igvm.report_data_hash_type", format!("{} ({})", hcl.hash.wire(), hcl.hash));
    push("igvm.variable_data_size", hcl.runtime_data.len().to_string());
    push(
        "runtime.digest",
        format!("{} ({})", hex::encode(digest::digest(hcl.hash.algorithm(), &hcl.runtime_data)), hcl.hash),
    );
    describe_json(&mut push, "runtime", &hcl.runtime_claims);

    match &evidence.quote {
        None => push("tpm", "no TPM quote".into()),
        Some(q) => describe_quote(&mut push, q),
    }
    match (&evidence.vcek, &vcek) {
        (None, _) => push("vcek", "not included".into()),
        (Some(_), None) => push("vcek", "included, but not a readable X.509 certificate".into()),
        (Some(_), Some(cert)) => {
            let (not_before, not_after) = cert.validity();
            push("vcek.subject", cert.subject_string());
            push("vcek.issuer", cert.issuer_common_name().unwrap_or_default());
            push("vcek.validity", format!("{not_before} to {not_after}"));
        }
    }
    out
}

fn describe_quote(push: &mut impl FnMut(&str, String), q: &TpmQuote) {
    let a = &q.attest;
    push("tpm.magic", format!("{TPM_GENERATED_VALUE:#010x} (TPM_GENERATED_VALUE)"));
    push("tpm.type", format!("{TPM_ST_ATTEST_QUOTE:#06x} (TPM_ST_ATTEST_QUOTE)"));
    push("tpm.qualified_signer", hex::encode(&a.qualified_signer));
    let nonce = match std::str::from_utf8(&a.extra_data) {
        Ok(text) if !text.is_empty() && text.chars().all(|c| c.is_ascii_graphic() || c == ' ') => {
            format!("{} ({text:?})", hex::encode(&a.extra_data))
        }
        _ => hex::encode(&a.extra_data),
    };
    push("tpm.extra_data", nonce);
    push("tpm.clock", a.clock.to_string());
    push("tpm.reset_count", a.reset_count.to_string());
    push("tpm.restart_count", a.restart_count.to_string());
    push("tpm.safe", a.safe.to_string());
    push("tpm.firmware_version", format!("{:#018x}", a.firmware_version));
    for (i, sel) in a.selections.iter().enumerate() {
        let indices: Vec<String> = sel
            .select
            .iter()
            .enumerate()
            .flat_map(|(byte, bits)| {
                (0..8).filter(move |bit| bits & (1 << bit) != 0).map(move |bit| (byte * 8 + bit).to_string())
            })
            .collect();
        push(
            &format!("tpm.pcr_select[{i}]"),
            format!("{:#06x} ({}): {}", sel.hash, tpm_alg_name(sel.hash), indices.join(",")),
        );
    }
    push("tpm.pcr_digest", hex::encode(&a.pcr_digest));
    let scheme = format!(
        "{} with {}{}",
        tpm_alg_name(q.signature.sig_alg),
        tpm_alg_name(q.signature.hash_alg),
        if q.signature.bare { " (bare signature, no TPMT_SIGNATURE)" } else { "" }
    );
    push("tpm.signature.scheme", scheme);
    push("tpm.signature", hex::encode(&q.signature.bytes));
    // Name values by index when the selection says which is which.
    match selected_pcrs(&a.selections) {
        Ok(indices) if indices.len() == q.pcr_values.len() => {
            for (index, value) in indices.iter().zip(&q.pcr_values) {
                push(&format!("tpm.pcr[{index}]"), hex::encode(value));
            }
        }
        _ => {
            for (position, value) in q.pcr_values.iter().enumerate() {
                push(&format!("tpm.pcrs[{position}]"), hex::encode(value));
            }
        }
    }
}

/// Flattens a JSON value into dotted rows; the JWK array is summarised.
fn describe_json(push: &mut impl FnMut(&str, String), path: &str, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let sub = format!("{path}.{k}");
                if path == "runtime" && k == "keys" {
                    describe_jwks(push, &sub, v);
                } else {
                    describe_json(push, &sub, v);
                }
            }
        }
        Value::String(s) => push(path, s.clone()),
        other => push(path, other.to_string()),
    }
}

fn describe_jwks(push: &mut impl FnMut(&str, String), path: &str, keys: &serde_json::Value) {
    let Some(keys) = keys.as_array() else {
        push(path, keys.to_string());
        return;
    };
    for (i, key) in keys.iter().enumerate() {
        let field = |name: &str| key.get(name).and_then(serde_json::Value::as_str);
        let kid = field("kid").map_or_else(|| i.to_string(), str::to_owned);
        let bits =
            field("n").and_then(|n| BASE64URL.decode(n).ok()).map(|n| n.iter().skip_while(|&&b| b == 0).count() * 8);
        let e = field("e")
            .and_then(|e| BASE64URL.decode(e).ok())
            .map(|e| e.iter().fold(0u128, |acc, &b| acc.checked_mul(256).map_or(u128::MAX, |v| v | u128::from(b))));
        let ops = key.get("key_ops").map(serde_json::Value::to_string).unwrap_or_default();
        let summary = match (field("kty"), bits, e) {
            (Some("RSA"), Some(bits), Some(e)) => format!("RSA-{bits}, e={e}, key_ops={ops}"),
            _ => key.to_string(),
        };
        push(&format!("{path}.{kid}"), summary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HCL: &[u8] = include_bytes!("../../../../shared/testdata/evidence/az-snp-vtpm/hcl-report.bin");

    #[test]
    fn parses_the_sample_hcl_report() {
        let ev = AzureEvidence::from_hcl_report(HCL).unwrap();
        assert_eq!(ev.snp_report().len(), REPORT_LEN);
        assert_eq!(ev.hcl.hash, RuntimeClaimsHash::Sha256);
        assert_eq!(ev.hcl.runtime_data.len(), 1110);
        assert!(attestation_key(ev.runtime_claims()).is_ok());
        assert!(!ev.has_tpm_quote());
    }

    #[test]
    fn every_truncation_is_malformed() {
        for len in 0..2346 {
            let err = AzureEvidence::from_hcl_report(&HCL[..len]).unwrap_err();
            assert!(err.is_malformed(), "{len}: {err}");
        }
    }

    #[test]
    fn binding_needs_digest_then_zeros() {
        let data = b"{}";
        let mut rd = [0u8; 64];
        rd[..32].copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
        check_binding(RuntimeClaimsHash::Sha256, data, &rd).unwrap();
        rd[40] = 1;
        assert_eq!(
            check_binding(RuntimeClaimsHash::Sha256, data, &rd),
            Err(AzureError::ReportDataPadding { hash: RuntimeClaimsHash::Sha256, offset: 40 })
        );
        let mut rd = [0u8; 64];
        rd.copy_from_slice(digest::digest(&digest::SHA512, data).as_ref());
        check_binding(RuntimeClaimsHash::Sha512, data, &rd).unwrap();
        assert!(check_binding(RuntimeClaimsHash::Sha256, data, &rd).is_err());
    }

    #[test]
    fn pcr_selection_order_and_duplicates() {
        let sel = |select: Vec<u8>| PcrSelection { hash: TPM_ALG_SHA256, select };
        assert_eq!(selected_pcrs(&[sel(vec![0b1000_0001, 0, 0b1])]).unwrap(), vec![0, 7, 16]);
        assert!(selected_pcrs(&[sel(vec![1]), sel(vec![1])]).is_err());
        assert!(selected_pcrs(&[PcrSelection { hash: 0x0004, select: vec![1] }]).is_err());
    }

    #[test]
    fn marshalled_signature_is_recognised() {
        let mut bytes = vec![0x00, 0x16, 0x00, 0x0b, 0x01, 0x00];
        bytes.extend([0xAB; 256]);
        let sig = parse_signature(&bytes).unwrap();
        assert_eq!(
            (sig.sig_alg, sig.hash_alg, sig.bare, sig.bytes.len()),
            (TPM_ALG_RSAPSS, TPM_ALG_SHA256, false, 256)
        );
        let sig = parse_signature(&[0x5A; 256]).unwrap();
        assert!(sig.bare);
        assert!(parse_signature(&[0x00, 0x14, 0x00]).unwrap_err().is_malformed());
    }
}
