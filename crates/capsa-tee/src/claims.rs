//! The one claims type every verifier produces.
//!
//! Claims exist only after a successful verification: verifiers return them,
//! nothing else constructs them from untrusted bytes. They serialise with
//! Microsoft Azure Attestation's claim names where MAA defines one, so that
//! release policies written for Azure Key Vault work unchanged; byte fields
//! are lower-case hex. Names MAA has no equivalent for are prefixed
//! `x-capsa-`.

use serde::{Deserialize, Serialize};

/// Which kind of evidence the claims came from, as MAA names it in
/// `x-ms-attestation-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttestationType {
    /// An SEV-SNP report from AMD hardware.
    #[serde(rename = "sevsnpvm")]
    SevSnpVm,
    /// An Azure confidential VM: SNP report plus vTPM quote (HCL evidence).
    #[serde(rename = "azurevm")]
    AzureVm,
    /// An Intel TDX quote.
    #[serde(rename = "tdxvm")]
    TdxVm,
    /// An Intel SGX DCAP quote.
    #[serde(rename = "sgx")]
    Sgx,
    /// An SNP-format report signed by capsa's sim platform: no hardware
    /// protection at all. Release policies should refuse it in production.
    #[serde(rename = "sim")]
    Sim,
}

impl AttestationType {
    /// The claim value, as it appears in `x-ms-attestation-type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SevSnpVm => "sevsnpvm",
            Self::AzureVm => "azurevm",
            Self::TdxVm => "tdxvm",
            Self::Sgx => "sgx",
            Self::Sim => "sim",
        }
    }

    /// Whether evidence of this type is backed by TEE hardware.
    pub fn is_hardware(self) -> bool {
        !matches!(self, Self::Sim)
    }
}

impl std::fmt::Display for AttestationType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Verified claims about a TEE, from any supported evidence type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The kind of evidence these claims were verified from.
    #[serde(rename = "x-ms-attestation-type")]
    pub attestation_type: AttestationType,
    /// The TEE-specific claims.
    #[serde(flatten)]
    pub tee: TeeClaims,
}

/// The claims particular to one kind of TEE.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TeeClaims {
    /// An SEV-SNP guest (real hardware or the sim platform).
    SevSnp(SnpClaims),
    /// An Azure confidential VM (SNP report plus vTPM).
    AzureVm(AzureVmClaims),
    /// An Intel TDX trust domain.
    Tdx(TdxClaims),
    /// An Intel SGX enclave.
    Sgx(SgxClaims),
}

/// Claims from a verified SEV-SNP attestation report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnpClaims {
    /// MEASUREMENT: the launch digest (48 bytes).
    #[serde(rename = "x-ms-sevsnpvm-launchmeasurement")]
    pub launch_measurement: String,
    /// HOST_DATA: 32 bytes fixed by the host at launch (capsa: the initdata digest).
    #[serde(rename = "x-ms-sevsnpvm-hostdata")]
    pub host_data: String,
    /// REPORT_DATA: 64 bytes chosen by the guest when it asked for the report.
    #[serde(rename = "x-ms-sevsnpvm-reportdata")]
    pub report_data: String,
    /// POLICY.DEBUG: whether the host may debug (read) the guest.
    #[serde(rename = "x-ms-sevsnpvm-is-debuggable")]
    pub is_debuggable: bool,
    /// POLICY.MIGRATE_MA: whether a migration agent may be associated.
    #[serde(rename = "x-ms-sevsnpvm-migration-allowed")]
    pub migration_allowed: bool,
    /// POLICY.SMT: whether SMT may be enabled on the host.
    #[serde(rename = "x-ms-sevsnpvm-smt-allowed")]
    pub smt_allowed: bool,
    /// The raw guest policy (64 bits).
    #[serde(rename = "x-ms-sevsnpvm-guest-policy")]
    pub guest_policy: u64,
    /// The VMPL the report was requested at.
    #[serde(rename = "x-ms-sevsnpvm-vmpl")]
    pub vmpl: u32,
    /// GUEST_SVN from the ID block.
    #[serde(rename = "x-ms-sevsnpvm-guestsvn")]
    pub guest_svn: u32,
    /// FAMILY_ID from the ID block (16 bytes).
    #[serde(rename = "x-ms-sevsnpvm-familyId")]
    pub family_id: String,
    /// IMAGE_ID from the ID block (16 bytes).
    #[serde(rename = "x-ms-sevsnpvm-imageId")]
    pub image_id: String,
    /// SHA-384 of the ID key that signed the ID block (48 bytes).
    #[serde(rename = "x-ms-sevsnpvm-idkeydigest")]
    pub id_key_digest: String,
    /// SHA-384 of the author key that certified the ID key (48 bytes).
    #[serde(rename = "x-ms-sevsnpvm-authorkeydigest")]
    pub author_key_digest: String,
    /// REPORT_ID of the guest (32 bytes).
    #[serde(rename = "x-ms-sevsnpvm-reportid")]
    pub report_id: String,
    /// REPORTED_TCB bootloader SPL.
    #[serde(rename = "x-ms-sevsnpvm-bootloader-svn")]
    pub bootloader_svn: u8,
    /// REPORTED_TCB TEE (PSP OS) SPL.
    #[serde(rename = "x-ms-sevsnpvm-tee-svn")]
    pub tee_svn: u8,
    /// REPORTED_TCB SNP firmware SPL.
    #[serde(rename = "x-ms-sevsnpvm-snpfw-svn")]
    pub snpfw_svn: u8,
    /// REPORTED_TCB microcode SPL.
    #[serde(rename = "x-ms-sevsnpvm-microcode-svn")]
    pub microcode_svn: u8,
    /// REPORTED_TCB FMC SPL (Turin and later only).
    #[serde(rename = "x-capsa-sevsnpvm-fmc-svn", default, skip_serializing_if = "Option::is_none")]
    pub fmc_svn: Option<u8>,
    /// The processor line whose key signed the report (Milan, Genoa, Turin).
    #[serde(rename = "x-capsa-sevsnpvm-product")]
    pub product: String,
    /// Which key signed the report: `vcek` or `vlek`.
    #[serde(rename = "x-capsa-sevsnpvm-signing-key")]
    pub signing_key: String,
    /// The attestation report version.
    #[serde(rename = "x-capsa-sevsnpvm-report-version")]
    pub report_version: u32,
}

/// Claims from verified Azure confidential VM (SNP + vTPM) evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AzureVmClaims {
    /// The claims of the SNP report embedded in the HCL report.
    #[serde(rename = "x-ms-isolation-tee")]
    pub isolation_tee: IsolationTee,
    /// The runtime claims (JSON) whose digest the SNP report's REPORT_DATA carries.
    #[serde(rename = "x-ms-runtime")]
    pub runtime: serde_json::Value,
    /// The PCR values the vTPM quote attested, by index, lower-case hex (SHA-256 bank).
    #[serde(rename = "x-ms-azurevm-pcrs")]
    pub pcrs: std::collections::BTreeMap<u8, String>,
}

/// The isolation TEE of an Azure confidential VM: its SNP claims, tagged as MAA does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationTee {
    /// Always `sevsnpvm` today.
    #[serde(rename = "x-ms-attestation-type")]
    pub attestation_type: AttestationType,
    /// The SNP claims.
    #[serde(flatten)]
    pub snp: SnpClaims,
}

/// Intel TCB appraisal outcome, surfaced rather than hidden: a verifier that
/// accepts an out-of-date platform still says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcbAppraisal {
    /// TCB status from the collateral's TCB info (`UpToDate`, `OutOfDate`, `SWHardeningNeeded`, ...).
    #[serde(rename = "x-capsa-tcb-status")]
    pub status: String,
    /// Intel security advisory IDs (`INTEL-SA-00xxx`) that apply.
    #[serde(rename = "x-capsa-advisory-ids")]
    pub advisory_ids: Vec<String>,
}

/// Claims from a verified TDX quote, named as MAA names TDX claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TdxClaims {
    /// MRTD: measurement of the initial TD contents (48 bytes).
    pub tdx_mrtd: String,
    /// MRCONFIGID: software-defined configuration ID (48 bytes; capsa: initdata digest).
    pub tdx_mrconfigid: String,
    /// MROWNER (48 bytes).
    pub tdx_mrowner: String,
    /// MROWNERCONFIG (48 bytes).
    pub tdx_mrownerconfig: String,
    /// RTMR0 (48 bytes).
    pub tdx_rtmr0: String,
    /// RTMR1 (48 bytes).
    pub tdx_rtmr1: String,
    /// RTMR2 (48 bytes).
    pub tdx_rtmr2: String,
    /// RTMR3 (48 bytes).
    pub tdx_rtmr3: String,
    /// REPORTDATA (64 bytes).
    pub tdx_report_data: String,
    /// MRSEAM: measurement of the TDX module (48 bytes).
    pub tdx_mrseam: String,
    /// MRSIGNERSEAM (48 bytes).
    pub tdx_mrsignerseam: String,
    /// SEAMATTRIBUTES (8 bytes).
    pub tdx_seam_attributes: String,
    /// TDATTRIBUTES (8 bytes).
    pub tdx_td_attributes: String,
    /// TDATTRIBUTES.DEBUG.
    pub tdx_td_attributes_debug: bool,
    /// XFAM (8 bytes).
    pub tdx_xfam: String,
    /// TEE_TCB_SVN (16 bytes).
    pub tdx_tee_tcb_svn: String,
    /// TCB status and advisories from the collateral.
    #[serde(flatten)]
    pub tcb: TcbAppraisal,
}

/// Claims from a verified SGX quote, named as MAA names SGX claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SgxClaims {
    /// MRENCLAVE (32 bytes).
    #[serde(rename = "x-ms-sgx-mrenclave")]
    pub mrenclave: String,
    /// MRSIGNER (32 bytes).
    #[serde(rename = "x-ms-sgx-mrsigner")]
    pub mrsigner: String,
    /// ISVPRODID.
    #[serde(rename = "x-ms-sgx-product-id")]
    pub product_id: u16,
    /// ISVSVN.
    #[serde(rename = "x-ms-sgx-svn")]
    pub svn: u16,
    /// ATTRIBUTES.DEBUG.
    #[serde(rename = "x-ms-sgx-is-debuggable")]
    pub is_debuggable: bool,
    /// REPORTDATA (64 bytes).
    #[serde(rename = "x-ms-sgx-report-data")]
    pub report_data: String,
    /// CPUSVN (16 bytes).
    #[serde(rename = "x-capsa-sgx-cpusvn")]
    pub cpu_svn: String,
    /// ATTRIBUTES (16 bytes).
    #[serde(rename = "x-capsa-sgx-attributes")]
    pub attributes: String,
    /// MISCSELECT.
    #[serde(rename = "x-capsa-sgx-miscselect")]
    pub misc_select: u32,
    /// TCB status and advisories from the collateral.
    #[serde(flatten)]
    pub tcb: TcbAppraisal,
}

impl Claims {
    /// The SNP claims, for SNP, sim and Azure vTPM evidence.
    pub fn snp(&self) -> Option<&SnpClaims> {
        match &self.tee {
            TeeClaims::SevSnp(snp) => Some(snp),
            TeeClaims::AzureVm(az) => Some(&az.isolation_tee.snp),
            TeeClaims::Tdx(_) | TeeClaims::Sgx(_) => None,
        }
    }
}
