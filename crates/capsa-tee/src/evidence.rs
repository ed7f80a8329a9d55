//! One entry point for every kind of evidence: decode the inputs, pick the
//! verifier, return [`Claims`]. The CLI and the trust service both call
//! this, so a piece of evidence is judged the same way wherever it arrives.

use time::OffsetDateTime;

use crate::azure::{AzureAppraisal, AzureError, AzureEvidence};
use crate::claims::Claims;
use crate::dcap::{Collateral, DcapAppraisal, DcapError, QuoteKind};
use crate::encoding::{EncodingError, endorsement, evidence_bytes};
use crate::snp::{Appraisal, ChainError, Report, RootStore, SimTrust, SnpError, Verifier};

/// The kinds of evidence capsa verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tee {
    /// An SEV-SNP attestation report (hardware or sim).
    Snp,
    /// An Intel TDX DCAP quote.
    Tdx,
    /// An Intel SGX DCAP quote.
    Sgx,
    /// Azure confidential VM evidence: HCL report and vTPM quote.
    AzSnpVtpm,
}

impl Tee {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snp => "snp",
            Self::Tdx => "tdx",
            Self::Sgx => "sgx",
            Self::AzSnpVtpm => "az-snp-vtpm",
        }
    }
}

impl std::str::FromStr for Tee {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Snp, Self::Tdx, Self::Sgx, Self::AzSnpVtpm]
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown TEE \"{s}\": expected snp, tdx, sgx or az-snp-vtpm"))
    }
}

/// Why evidence was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EvidenceError {
    /// An input could not be decoded.
    #[error(transparent)]
    Encoding(#[from] EncodingError),
    /// SEV-SNP verification failed.
    #[error(transparent)]
    Snp(#[from] SnpError),
    /// DCAP verification failed.
    #[error(transparent)]
    Dcap(#[from] DcapError),
    /// Azure vTPM verification failed.
    #[error(transparent)]
    Azure(#[from] AzureError),
    /// An endorsement the evidence needs was not supplied.
    #[error("{0}")]
    MissingEndorsement(String),
}

impl From<ChainError> for EvidenceError {
    fn from(e: ChainError) -> Self {
        Self::Snp(SnpError::Chain(e))
    }
}

impl EvidenceError {
    /// Whether an input could not be read at all (bad arguments or bytes),
    /// as opposed to read and refused.
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::Encoding(_) | Self::MissingEndorsement(_) => true,
            Self::Snp(e) => e.is_malformed(),
            Self::Dcap(e) => e.is_malformed(),
            Self::Azure(e) => e.is_malformed(),
        }
    }
}

/// Evidence and what endorses it, as raw inputs.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    /// Which kind of evidence.
    pub tee: Tee,
    /// The evidence, raw or hex.
    pub evidence: &'a [u8],
    /// VCEK/VLEK: DER, PEM (optionally with its chain) or Azure cache JSON.
    pub vcek: Option<&'a [u8]>,
    /// Intermediate and ARK, PEM; the pinned AMD roots when absent.
    pub chain: Option<&'a [u8]>,
    /// DCAP collateral JSON.
    pub collateral: Option<&'a [u8]>,
    /// The instant to verify at.
    pub at: OffsetDateTime,
    /// Whether sim roots are acceptable.
    pub allow_sim: bool,
}

/// Appraisal options for any evidence kind.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// SEV-SNP reference values (also applied to Azure's SNP report).
    pub snp: Appraisal,
    /// DCAP reference values.
    pub dcap: DcapAppraisal,
}

/// Verifies evidence and returns its claims.
pub fn verify(inputs: &Inputs<'_>, policy: &Policy) -> Result<Claims, EvidenceError> {
    let evidence = evidence_bytes(inputs.evidence)?;
    let sim = if inputs.allow_sim { SimTrust::DangerAnySimRoot } else { SimTrust::Refuse };
    let verifier = Verifier::new(RootStore::amd().with_sim(sim));
    match inputs.tee {
        Tee::Snp => {
            let vcek = inputs.vcek.ok_or_else(|| missing_vcek(&evidence))?;
            let endorsement = endorsement(vcek)?;
            let chain_pem = inputs.chain.or(endorsement.chain_pem.as_deref());
            let chain = verifier.verify_chain(&endorsement.leaf_der, chain_pem, inputs.at)?;
            Ok(chain.verify_report(&evidence, &policy.snp)?.into_claims())
        }
        Tee::AzSnpVtpm => {
            let az = azure_evidence(&evidence)?;
            let endorsement = match (inputs.vcek, az.vcek_der()) {
                (Some(given), _) => endorsement(given)?,
                (None, Some(der)) => endorsement(der)?,
                (None, None) => return Err(missing_vcek(az.snp_report())),
            };
            let chain_pem = inputs.chain.or(endorsement.chain_pem.as_deref());
            let chain = verifier.verify_chain(&endorsement.leaf_der, chain_pem, inputs.at)?;
            let appraisal = AzureAppraisal { snp: policy.snp.clone(), ..Default::default() };
            Ok(crate::azure::verify(&az, &chain, &appraisal)?)
        }
        Tee::Tdx | Tee::Sgx => {
            let kind = if inputs.tee == Tee::Tdx { QuoteKind::Tdx } else { QuoteKind::Sgx };
            let collateral = inputs.collateral.ok_or_else(|| {
                EvidenceError::MissingEndorsement(format!(
                    "{} quotes are verified against PCS collateral: pass --collateral FILE (JSON with tcb_info, qe_identity, CRLs and chains, as dcap-qvl's get_collateral writes it); capsa never fetches it",
                    kind.as_str()
                ))
            })?;
            let collateral = Collateral::from_json(collateral)?;
            Ok(crate::dcap::verify_quote(kind, &evidence, &collateral, inputs.at, &policy.dcap)?)
        }
    }
}

/// Lists every field of the evidence without verifying it.
pub fn describe(tee: Tee, evidence: &[u8]) -> Result<Vec<(String, String)>, EvidenceError> {
    let evidence = evidence_bytes(evidence)?;
    match tee {
        Tee::Snp => Ok(Report::parse(&evidence).map_err(SnpError::from)?.describe(None)),
        Tee::Tdx | Tee::Sgx => Ok(crate::dcap::describe_quote(&evidence)?),
        Tee::AzSnpVtpm => {
            let az = azure_evidence(&evidence)?;
            Ok(crate::azure::describe(&az))
        }
    }
}

/// Azure evidence arrives as the self-contained JSON or as a bare HCL report.
fn azure_evidence(bytes: &[u8]) -> Result<AzureEvidence, AzureError> {
    if bytes.trim_ascii_start().starts_with(b"{") {
        AzureEvidence::from_json(bytes)
    } else {
        AzureEvidence::from_hcl_report(bytes)
    }
}

/// The error for an SNP report given without its VCEK, with the KDS address
/// to fetch it from on a connected machine.
fn missing_vcek(report: &[u8]) -> EvidenceError {
    let hint = Report::parse(report).ok().filter(|r| !r.chip_id_masked()).map(|r| {
        let product = r.cpuid.and_then(crate::snp::CpuId::product);
        let tcb = r.reported_tcb.decode(product.unwrap_or(crate::snp::Product::Milan));
        // Turin's KDS keys VCEKs by the 8-byte hwID prefix and adds the FMC SPL.
        let (hw_id, fmc) = match product {
            Some(crate::snp::Product::Turin) => {
                (hex::encode(r.chip_id.get(..8).unwrap_or_default()), format!("&fmcSPL={}", tcb.fmc.unwrap_or(0)))
            }
            _ => (hex::encode(r.chip_id), String::new()),
        };
        let product = product.map_or("Milan|Genoa", crate::snp::Product::name);
        format!(
            "; fetch it on a connected machine from https://kdsintf.amd.com/vcek/v1/{product}/{hw_id}?blSPL={}&teeSPL={}&snpSPL={}&ucodeSPL={}{fmc}",
            tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode
        )
    });
    EvidenceError::MissingEndorsement(format!(
        "an SEV-SNP report is verified with the VCEK or VLEK that signed it: pass --vcek CERT{}",
        hint.unwrap_or_default()
    ))
}
