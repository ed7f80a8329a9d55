//! Writing SEV-SNP ATTESTATION_REPORT structures, version 3, as the sim's
//! security processor.
//!
//! Layout from AMD's "SEV Secure Nested Paging Firmware ABI Specification"
//! (publication 56860), table "ATTESTATION_REPORT Structure"; all integers
//! little-endian. The parser in [`crate::snp`] owns the public layout; this
//! writer only needs to produce bytes that parser accepts from hardware.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::EcdsaKeyPair;

use super::{ReportRequest, SimError, Tcb};

/// Size of every SEV-SNP attestation report.
const REPORT_LEN: usize = 0x4A0;
/// The signature covers bytes `0..SIGNED_LEN`.
const SIGNED_LEN: usize = 0x2A0;
/// Version 3 is the oldest that carries CPUID identification, which tells a
/// verifier the processor line without guessing from the VCEK.
const REPORT_VERSION: u32 = 3;
/// SIGNATURE_ALGO: ECDSA P-384 with SHA-384.
const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

/// POLICY bit 16: SMT allowed.
const POLICY_SMT: u64 = 1 << 16;
/// POLICY bit 17: reserved, must be one.
const POLICY_RESERVED_1: u64 = 1 << 17;
/// POLICY bit 19: debugging allowed.
const POLICY_DEBUG: u64 = 1 << 19;

/// PLATFORM_INFO: SMT enabled (bit 0) and TSME enabled (bit 1), as on a
/// typical Genoa host.
const PLATFORM_INFO: u64 = 0b11;

/// CPUID family, model and stepping of a Genoa B1 (family 19h, model 11h).
const CPUID_FAMILY: u8 = 0x19;
const CPUID_MODEL: u8 = 0x11;
const CPUID_STEPPING: u8 = 0x01;

/// SNP firmware version reported as both current and committed: a Genoa
/// release contemporary with the TCB in [`Tcb::GENOA_DEFAULT`].
const FIRMWARE_MAJOR: u8 = 1;
const FIRMWARE_MINOR: u8 = 55;
const FIRMWARE_BUILD: u8 = 21;

/// Length of each signature component field; P-384 uses the low 48 bytes.
const SIG_COMPONENT: usize = 72;
const P384_SCALAR: usize = 48;

/// Appends fields at the offsets the specification gives, refusing any
/// field whose offset does not match what has been written so far: the
/// offsets in [`build`] are then checked against the field sizes, instead of
/// silently shifting everything after a mistake.
struct Writer(Vec<u8>);

impl Writer {
    fn put(&mut self, offset: usize, bytes: &[u8]) -> Result<(), SimError> {
        if self.0.len() != offset {
            return Err(SimError::Internal("report field offsets are inconsistent"));
        }
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Builds and signs a report for `req` on the chip `chip_id` at `tcb`.
pub(crate) fn build(
    req: &ReportRequest,
    chip_id: &[u8; 64],
    tcb: Tcb,
    vcek: &EcdsaKeyPair,
) -> Result<Vec<u8>, SimError> {
    if req.vmpl > 3 {
        return Err(SimError::InvalidVmpl { vmpl: req.vmpl });
    }
    let mut policy = POLICY_RESERVED_1 | POLICY_SMT;
    if req.policy_debug {
        policy |= POLICY_DEBUG;
    }
    // Real firmware keeps REPORT_ID for a guest's lifetime; the sim has no
    // guest lifecycle, so every report gets a fresh one.
    let mut report_id = [0u8; 32];
    aws_lc_rs::rand::fill(&mut report_id).map_err(|_| SimError::Crypto("drawing a report id"))?;
    let tcb = tcb.to_le_bytes();
    let firmware = [FIRMWARE_BUILD, FIRMWARE_MINOR, FIRMWARE_MAJOR, 0];

    let mut w = Writer(Vec::with_capacity(REPORT_LEN));
    w.put(0x000, &REPORT_VERSION.to_le_bytes())?;
    w.put(0x004, &0u32.to_le_bytes())?; // GUEST_SVN: no ID block
    w.put(0x008, &policy.to_le_bytes())?;
    w.put(0x010, &[0; 16])?; // FAMILY_ID
    w.put(0x020, &[0; 16])?; // IMAGE_ID
    w.put(0x030, &req.vmpl.to_le_bytes())?;
    w.put(0x034, &SIG_ALGO_ECDSA_P384_SHA384.to_le_bytes())?;
    w.put(0x038, &tcb)?; // CURRENT_TCB
    w.put(0x040, &PLATFORM_INFO.to_le_bytes())?;
    // KEY_INFO: no author key, chip key not masked, signed with the VCEK.
    w.put(0x048, &0u32.to_le_bytes())?;
    w.put(0x04C, &[0; 4])?;
    w.put(0x050, &req.report_data)?;
    w.put(0x090, &req.measurement)?;
    w.put(0x0C0, &req.host_data)?;
    w.put(0x0E0, &[0; 48])?; // ID_KEY_DIGEST: no ID block
    w.put(0x110, &[0; 48])?; // AUTHOR_KEY_DIGEST
    w.put(0x140, &report_id)?;
    w.put(0x160, &[0xFF; 32])?; // REPORT_ID_MA: no migration agent
    w.put(0x180, &tcb)?; // REPORTED_TCB
    w.put(0x188, &[CPUID_FAMILY, CPUID_MODEL, CPUID_STEPPING])?;
    w.put(0x18B, &[0; 0x1A0 - 0x18B])?;
    w.put(0x1A0, chip_id)?;
    w.put(0x1E0, &tcb)?; // COMMITTED_TCB
    w.put(0x1E8, &firmware)?; // CURRENT_BUILD/MINOR/MAJOR
    w.put(0x1EC, &firmware)?; // COMMITTED_BUILD/MINOR/MAJOR
    w.put(0x1F0, &tcb)?; // LAUNCH_TCB
    w.put(0x1F8, &[0; SIGNED_LEN - 0x1F8])?;

    let signature = vcek.sign(&SystemRandom::new(), &w.0).map_err(|_| SimError::Crypto("signing a report"))?;
    // The FIXED encoding is r || s, each 48 bytes big-endian; the report
    // wants each little-endian, zero-extended to 72 bytes.
    let (r, s) = signature
        .as_ref()
        .split_at_checked(P384_SCALAR)
        .filter(|(_, s)| s.len() == P384_SCALAR)
        .ok_or(SimError::Internal("ECDSA P-384 signature is not 96 bytes"))?;
    w.put(0x2A0, &little_endian_field(r))?;
    w.put(0x2E8, &little_endian_field(s))?;
    w.put(0x330, &[0; REPORT_LEN - 0x330])?;
    Ok(w.0)
}

fn little_endian_field(big_endian: &[u8]) -> [u8; SIG_COMPONENT] {
    let mut out = [0u8; SIG_COMPONENT];
    for (dst, src) in out.iter_mut().zip(big_endian.iter().rev()) {
        *dst = *src;
    }
    out
}
