//! AMD SEV-SNP: attestation reports, AMD's certificate chains, and the
//! verification that turns a report into [`crate::Claims`].
//!
//! Verification happens in two steps so that the expensive, rarely-changing
//! part is done once: [`Verifier::verify_chain`] checks a VCEK or VLEK
//! against pinned roots (RSA-4096 signatures, validity, AMD's extensions) and
//! yields a [`VerifiedChain`]; [`VerifiedChain::verify_report`] then checks
//! any number of reports signed by that key (one P-384 signature each) and
//! appraises them against reference values.

mod certs;
mod chain;
mod report;
mod verify;

pub use certs::{AmdCert, CertError, KeyExtensions, parse_pem_certs};
pub use chain::{ChainError, EndorsementKind, RootStore, SIM_ORGANIZATION, SimTrust, VerifiedChain, Verifier};
pub use report::{CpuId, FirmwareVersion, REPORT_LEN, RawTcb, Report, ReportError, SIGNED_LEN, SigningKey};
pub use sev::firmware::host::TcbVersion;
pub use verify::{Appraisal, AppraisalError, SnpError, VerifiedReport};

/// An AMD EPYC processor line with SEV-SNP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Product {
    /// 3rd generation EPYC (Zen 3).
    Milan,
    /// 4th generation EPYC (Zen 4).
    Genoa,
    /// 5th generation EPYC (Zen 5); its TCB adds an FMC SPL.
    Turin,
}

impl Product {
    /// Every product capsa knows.
    pub const ALL: [Product; 3] = [Product::Milan, Product::Genoa, Product::Turin];

    /// AMD's name for the line, as in certificate names and KDS URLs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Milan => "Milan",
            Self::Genoa => "Genoa",
            Self::Turin => "Turin",
        }
    }

    /// Parses AMD's name for the line.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Product {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
