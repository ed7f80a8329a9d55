//! TEE evidence: what it says, and whether to believe it.
//!
//! `capsa-tee` owns every evidence format capsa understands and the code that
//! decides, offline, whether a piece of evidence is genuine:
//!
//! - [`snp`]: AMD SEV-SNP attestation reports (versions 2 to 5), the AMD
//!   certificate chains that endorse them (ARK → ASK → VCEK, ARK → ASVK →
//!   VLEK), and appraisal against reference values;
//! - [`dcap`]: Intel TDX and SGX DCAP quotes, verified against PCS collateral
//!   supplied by the caller (never fetched);
//! - [`azure`]: Azure confidential VM evidence, an SNP report bound to vTPM
//!   runtime claims and a TPM quote;
//! - [`sim`]: the sim platform, a software stand-in for the SNP security
//!   processor with its own root of trust, for machines without TEE hardware;
//! - [`attest`]: attesters that obtain evidence inside a guest;
//! - [`evidence`]: one entry point that decodes inputs and dispatches to the
//!   right verifier, shared by the CLI and the trust service.
//!
//! Every verifier returns [`claims::Claims`], which can only be had by
//! verifying. The crate knows nothing of HTTP, policies or containers.
//!
//! ```no_run
//! use capsa_tee::snp::{Appraisal, RootStore, Verifier};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let report = std::fs::read("report.bin")?;
//! let vcek = std::fs::read("vcek.der")?;
//! let verifier = Verifier::new(RootStore::amd());
//! let at = time::OffsetDateTime::now_utc();
//! let chain = verifier.verify_chain(&vcek, None, at)?;
//! let verified = chain.verify_report(&report, &Appraisal::default())?;
//! println!("{}", serde_json::to_string_pretty(verified.claims())?);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod attest;
pub mod azure;
pub mod claims;
pub mod dcap;
pub mod encoding;
pub mod evidence;
pub mod sim;
pub mod snp;

pub use claims::{AttestationType, Claims, TeeClaims};
