//! Report verification against a verified chain, and appraisal against
//! reference values.
//!
//! Order matters: nothing from the report is believed before its signature
//! verifies, and the signature is only meaningful once the report's claimed
//! TCB and chip are shown to be the ones the signing key was issued for.

use subtle::ConstantTimeEq;

use super::chain::{ChainError, EndorsementKind, VerifiedChain};
use super::report::{Report, ReportError, SIGNED_LEN, SigningKey};
use super::{Product, TcbVersion};
use crate::claims::{Claims, SnpClaims, TeeClaims};

/// Why a report is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnpError {
    /// The report bytes are malformed.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// The endorsement chain is not trusted.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The report says a different key signed it than the one supplied.
    #[error("the report says it was signed by the {report} but the certificate given is a {chain}")]
    SigningKeyMismatch {
        /// KEY_INFO.SIGNING_KEY.
        report: &'static str,
        /// The certificate's kind.
        chain: EndorsementKind,
    },
    /// The ECDSA signature is wrong.
    #[error("report signature does not verify with the {0}")]
    Signature(EndorsementKind),
    /// The report's CPUID names another processor line than the chain.
    #[error(
        "the report's CPUID (family {family:#x}, model {model:#x}) is not a {chain} processor, but a {chain} key signed it"
    )]
    ProductMismatch {
        /// CPUID family.
        family: u8,
        /// CPUID model.
        model: u8,
        /// The chain's product.
        chain: Product,
    },
    /// An SPL of REPORTED_TCB differs from the one the key certifies.
    #[error("{kind} TCB {component}={certified} differs from REPORTED_TCB {component}={reported}")]
    TcbMismatch {
        /// VCEK or VLEK.
        kind: EndorsementKind,
        /// bootloader, tee, snp, microcode or fmc.
        component: &'static str,
        /// The certificate's SPL.
        certified: u8,
        /// The report's SPL.
        reported: u8,
    },
    /// The report's CHIP_ID is not the VCEK's hwID.
    #[error("the report's CHIP_ID differs from the VCEK's hwID: this VCEK belongs to another chip")]
    ChipIdMismatch,
    /// The report failed an appraisal rule.
    #[error(transparent)]
    Appraisal(#[from] AppraisalError),
}

impl SnpError {
    /// Whether the input could not be read at all (exit 2 in the CLI), as
    /// opposed to read and refused (exit 1).
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::Report(ReportError::Length { .. }) => true,
            Self::Chain(c) => c.is_malformed(),
            _ => false,
        }
    }
}

/// Reference values a genuine report must also satisfy. The default accepts
/// any genuine report.
#[derive(Debug, Clone, Default)]
pub struct Appraisal {
    /// Every SPL of REPORTED_TCB must be at least this.
    pub min_tcb: Option<TcbVersion>,
    /// Refuse guests whose policy allows debugging.
    pub refuse_debug: bool,
    /// Refuse guests that allow or have a migration agent.
    pub refuse_migration_agent: bool,
    /// The report must have been requested at this VMPL.
    pub required_vmpl: Option<u32>,
    /// GUEST_SVN must be at least this.
    pub min_guest_svn: Option<u32>,
    /// MEASUREMENT must be one of these (any, when empty).
    pub measurements: Vec<[u8; 48]>,
    /// HOST_DATA must equal this.
    pub host_data: Option<[u8; 32]>,
    /// REPORT_DATA must equal this.
    pub report_data: Option<[u8; 64]>,
}

/// A genuine report that failed an appraisal rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AppraisalError {
    /// An SPL is below the minimum.
    #[error("REPORTED_TCB {component}={reported} is below the required minimum {minimum}")]
    TcbTooOld {
        /// Which SPL.
        component: &'static str,
        /// The report's value.
        reported: u8,
        /// The minimum.
        minimum: u8,
    },
    /// Debugging is allowed and refused.
    #[error("the guest policy allows debugging (the host can read guest memory), and debug guests are refused")]
    Debug,
    /// A migration agent is allowed or bound, and refused.
    #[error("the guest allows or has a migration agent, and migration agents are refused")]
    MigrationAgent,
    /// Wrong VMPL.
    #[error("the report was requested at VMPL {found}, VMPL {required} is required")]
    Vmpl {
        /// Required.
        required: u32,
        /// Found.
        found: u32,
    },
    /// GUEST_SVN too low.
    #[error("GUEST_SVN {found} is below the required minimum {minimum}")]
    GuestSvn {
        /// Minimum.
        minimum: u32,
        /// Found.
        found: u32,
    },
    /// MEASUREMENT not among the expected.
    #[error("MEASUREMENT {found} is not among the {count} expected launch measurement(s)")]
    Measurement {
        /// The measurement found, hex.
        found: String,
        /// How many were allowed.
        count: usize,
    },
    /// HOST_DATA differs.
    #[error("HOST_DATA {found} differs from the expected {expected}")]
    HostData {
        /// Expected, hex.
        expected: String,
        /// Found, hex.
        found: String,
    },
    /// REPORT_DATA differs.
    #[error("REPORT_DATA differs from the expected value")]
    ReportData,
}

/// A report whose signature, chain binding and appraisal all passed.
#[derive(Debug, Clone)]
pub struct VerifiedReport {
    report: Report,
    claims: Claims,
}

impl VerifiedReport {
    /// The verified report's fields.
    pub fn report(&self) -> &Report {
        &self.report
    }
    /// The claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }
    /// The claims, by value.
    pub fn into_claims(self) -> Claims {
        self.claims
    }
}

impl VerifiedChain {
    /// Verifies a report signed by this chain's key and appraises it.
    pub fn verify_report(&self, bytes: &[u8], appraisal: &Appraisal) -> Result<VerifiedReport, SnpError> {
        let report = Report::parse(bytes)?;
        let expected_key = match self.kind {
            EndorsementKind::Vcek => SigningKey::Vcek,
            EndorsementKind::Vlek => SigningKey::Vlek,
        };
        if report.signing_key() != expected_key {
            return Err(SnpError::SigningKeyMismatch { report: report.signing_key().as_str(), chain: self.kind });
        }
        let mut signature = [0u8; 96];
        let (r, s) = signature.split_at_mut(48);
        r.copy_from_slice(&report.signature_r);
        s.copy_from_slice(&report.signature_s);
        let signed = bytes.get(..SIGNED_LEN).ok_or(ReportError::Length { found: bytes.len() })?;
        self.key.verify_sig(signed, &signature).map_err(|_| SnpError::Signature(self.kind))?;

        if let Some(cpuid) = report.cpuid {
            if cpuid.product() != Some(self.product) {
                return Err(SnpError::ProductMismatch {
                    family: cpuid.family,
                    model: cpuid.model,
                    chain: self.product,
                });
            }
        }
        let reported = report.reported_tcb.decode(self.product);
        self.check_tcb(&reported)?;
        if self.kind == EndorsementKind::Vcek && !report.chip_id_masked() {
            let hw_id = self.extensions.hw_id.as_deref().unwrap_or_default();
            // Turin hwIDs are the 8-byte CHIP_ID prefix; earlier lines use all 64.
            let reported_id = report.chip_id.get(..hw_id.len()).unwrap_or_default();
            if hw_id.is_empty() || !bool::from(hw_id.ct_eq(reported_id)) {
                return Err(SnpError::ChipIdMismatch);
            }
        }
        appraise(&report, &reported, appraisal)?;
        let claims = Claims {
            attestation_type: self.attestation_type,
            tee: TeeClaims::SevSnp(snp_claims(&report, &reported, self)),
        };
        Ok(VerifiedReport { report, claims })
    }

    fn check_tcb(&self, reported: &TcbVersion) -> Result<(), SnpError> {
        let pairs = tcb_components(&self.extensions.tcb, reported);
        for (component, certified, reported) in pairs {
            if certified != reported {
                return Err(SnpError::TcbMismatch { kind: self.kind, component, certified, reported });
            }
        }
        Ok(())
    }
}

fn appraise(report: &Report, tcb: &TcbVersion, a: &Appraisal) -> Result<(), AppraisalError> {
    if let Some(min) = &a.min_tcb {
        let pairs = tcb_components(tcb, min);
        for (component, reported, minimum) in pairs {
            if reported < minimum {
                return Err(AppraisalError::TcbTooOld { component, reported, minimum });
            }
        }
    }
    if a.refuse_debug && report.policy.debug_allowed() {
        return Err(AppraisalError::Debug);
    }
    if a.refuse_migration_agent && (report.policy.migrate_ma_allowed() || report.has_migration_agent()) {
        return Err(AppraisalError::MigrationAgent);
    }
    if let Some(required) = a.required_vmpl {
        if report.vmpl != required {
            return Err(AppraisalError::Vmpl { required, found: report.vmpl });
        }
    }
    if let Some(minimum) = a.min_guest_svn {
        if report.guest_svn < minimum {
            return Err(AppraisalError::GuestSvn { minimum, found: report.guest_svn });
        }
    }
    if !a.measurements.is_empty() {
        // Fold over every candidate so timing does not reveal which one matched.
        let matched = a.measurements.iter().fold(subtle::Choice::from(0), |acc, m| acc | m.ct_eq(&report.measurement));
        if !bool::from(matched) {
            return Err(AppraisalError::Measurement {
                found: hex::encode(report.measurement),
                count: a.measurements.len(),
            });
        }
    }
    if let Some(expected) = &a.host_data {
        if !bool::from(expected.ct_eq(&report.host_data)) {
            return Err(AppraisalError::HostData {
                expected: hex::encode(expected),
                found: hex::encode(report.host_data),
            });
        }
    }
    if let Some(expected) = &a.report_data {
        if !bool::from(expected.ct_eq(&report.report_data)) {
            return Err(AppraisalError::ReportData);
        }
    }
    Ok(())
}

/// The SPLs of two TCB versions side by side, named as in messages. FMC
/// exists only on Turin; elsewhere both sides read 0.
fn tcb_components(a: &TcbVersion, b: &TcbVersion) -> [(&'static str, u8, u8); 5] {
    [
        ("bootloader", a.bootloader, b.bootloader),
        ("tee", a.tee, b.tee),
        ("snp", a.snp, b.snp),
        ("microcode", a.microcode, b.microcode),
        ("fmc", a.fmc.unwrap_or(0), b.fmc.unwrap_or(0)),
    ]
}

fn snp_claims(report: &Report, tcb: &TcbVersion, chain: &VerifiedChain) -> SnpClaims {
    SnpClaims {
        launch_measurement: hex::encode(report.measurement),
        host_data: hex::encode(report.host_data),
        report_data: hex::encode(report.report_data),
        is_debuggable: report.policy.debug_allowed(),
        migration_allowed: report.policy.migrate_ma_allowed(),
        smt_allowed: report.policy.smt_allowed(),
        guest_policy: report.policy_raw,
        vmpl: report.vmpl,
        guest_svn: report.guest_svn,
        family_id: hex::encode(report.family_id),
        image_id: hex::encode(report.image_id),
        id_key_digest: hex::encode(report.id_key_digest),
        author_key_digest: hex::encode(report.author_key_digest),
        report_id: hex::encode(report.report_id),
        bootloader_svn: tcb.bootloader,
        tee_svn: tcb.tee,
        snpfw_svn: tcb.snp,
        microcode_svn: tcb.microcode,
        fmc_svn: tcb.fmc,
        product: chain.product.name().to_owned(),
        signing_key: report.signing_key().as_str().to_owned(),
        report_version: report.version,
    }
}
