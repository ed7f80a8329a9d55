//! Attesters: how a guest obtains evidence about itself.
//!
//! One trait, three implementations: the SEV-SNP guest device (through the
//! `sev` crate's `/dev/sev-guest` ioctls), Linux's configfs-tsm report
//! interface (TDX quotes, and SNP reports on kernels that route them there),
//! and the sim platform. The hardware ones need a confidential guest and
//! cannot run on an ordinary host; their request and response handling is
//! tested here against the same file protocol the kernel implements.

use std::path::{Path, PathBuf};

use crate::sim::{ReportRequest, SimPlatform};
use crate::snp::Report;

/// Which kind of evidence an attester produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvidenceKind {
    /// A 1184-byte SEV-SNP attestation report from hardware.
    Snp,
    /// A TDX DCAP quote.
    Tdx,
    /// A report in SEV-SNP layout signed by the sim platform.
    Sim,
}

/// Evidence as an attester returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evidence {
    /// What the bytes are.
    pub kind: EvidenceKind,
    /// The report or quote.
    pub bytes: Vec<u8>,
}

/// Why evidence could not be obtained.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The guest device or configfs entry is absent.
    #[error("{what} is not available at {path}: {reason}; is this a confidential guest with the {what} driver loaded?")]
    Unavailable {
        /// The interface.
        what: &'static str,
        /// Where it was looked for.
        path: String,
        /// The OS error.
        reason: String,
    },
    /// The firmware refused the request.
    #[error("the {what} refused the report request: {reason}")]
    Firmware {
        /// The interface.
        what: &'static str,
        /// What it said.
        reason: String,
    },
    /// The response is not well-formed evidence.
    #[error("the {what} returned malformed evidence: {reason}")]
    Response {
        /// The interface.
        what: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Another writer changed the report entry during the request.
    #[error(
        "configfs-tsm report generation changed from {expected} to {found}: another process requested a report concurrently; retry"
    )]
    Race {
        /// The generation after our write.
        expected: u64,
        /// The generation after reading.
        found: u64,
    },
    /// The sim platform failed.
    #[error(transparent)]
    Sim(#[from] crate::sim::SimError),
}

/// Obtains evidence binding 64 bytes chosen by the caller (REPORT_DATA).
pub trait Attester {
    /// What this attester produces.
    fn kind(&self) -> EvidenceKind;
    /// Asks for evidence carrying `report_data`.
    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError>;
}

/// SEV-SNP through the guest device `/dev/sev-guest`.
#[derive(Debug, Clone, Default)]
pub struct SnpGuestAttester {
    /// The VMPL to request the report at (0 when the guest runs at VMPL0).
    pub vmpl: u32,
}

impl Attester for SnpGuestAttester {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Snp
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        let what = "SEV-SNP guest device";
        let mut fw = sev::firmware::guest::Firmware::open().map_err(|e| AttestError::Unavailable {
            what,
            path: "/dev/sev-guest".into(),
            reason: e.to_string(),
        })?;
        let bytes = fw
            .get_report(None, Some(*report_data), Some(self.vmpl))
            .map_err(|e| AttestError::Firmware { what, reason: e.to_string() })?;
        check_snp_response(what, bytes, report_data)
    }
}

/// Checks that the firmware's answer is a report carrying our REPORT_DATA:
/// a report for another request must never be passed on as ours.
fn check_snp_response(what: &'static str, bytes: Vec<u8>, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
    let report = Report::parse(&bytes).map_err(|e| AttestError::Response { what, reason: e.to_string() })?;
    if report.report_data != *report_data {
        return Err(AttestError::Response { what, reason: "REPORT_DATA differs from the requested value".into() });
    }
    Ok(Evidence { kind: EvidenceKind::Snp, bytes })
}

/// Linux's configfs-tsm report interface (`Documentation/ABI/testing/configfs-tsm`):
/// create a directory under `report/`, write `inblob`, read `outblob`.
#[derive(Debug, Clone)]
pub struct ConfigFsTsmAttester {
    root: PathBuf,
}

impl Default for ConfigFsTsmAttester {
    fn default() -> Self {
        Self { root: PathBuf::from("/sys/kernel/config/tsm/report") }
    }
}

impl ConfigFsTsmAttester {
    /// An attester using a configfs-tsm `report` directory other than the
    /// standard mount point.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn entry(&self) -> Result<TsmEntry, AttestError> {
        let what = "configfs-tsm";
        let name = format!("capsa-{}-{}", std::process::id(), unique());
        let dir = self.root.join(name);
        std::fs::create_dir(&dir).map_err(|e| AttestError::Unavailable {
            what,
            path: self.root.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(TsmEntry { dir })
    }
}

/// A report entry, removed when dropped so entries do not accumulate.
struct TsmEntry {
    dir: PathBuf,
}

impl Drop for TsmEntry {
    fn drop(&mut self) {
        // configfs entries are directories whose attribute files vanish with
        // them; removing the directory is the whole cleanup.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn read_attr(dir: &Path, name: &str) -> Result<Vec<u8>, AttestError> {
    std::fs::read(dir.join(name))
        .map_err(|e| AttestError::Firmware { what: "configfs-tsm", reason: format!("reading {name}: {e}") })
}

fn generation(dir: &Path) -> Result<u64, AttestError> {
    let text = read_attr(dir, "generation")?;
    String::from_utf8_lossy(&text)
        .trim()
        .parse()
        .map_err(|_| AttestError::Response { what: "configfs-tsm", reason: "generation is not a number".into() })
}

impl Attester for ConfigFsTsmAttester {
    /// TDX, the provider this interface exists for; an SNP guest that
    /// routes reports here yields evidence whose own `kind` says `Snp`.
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Tdx
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        let what = "configfs-tsm";
        let entry = self.entry()?;
        std::fs::write(entry.dir.join("inblob"), report_data)
            .map_err(|e| AttestError::Firmware { what, reason: format!("writing inblob: {e}") })?;
        let expected = generation(&entry.dir)?;
        let provider = String::from_utf8_lossy(&read_attr(&entry.dir, "provider")?).trim().to_owned();
        let outblob = read_attr(&entry.dir, "outblob")?;
        // The kernel bumps `generation` on every inblob write: a different
        // value means the outblob may answer someone else's request.
        let found = generation(&entry.dir)?;
        if found != expected {
            return Err(AttestError::Race { expected, found });
        }
        match provider.as_str() {
            "tdx_guest" => check_tdx_quote(outblob, report_data),
            "sev_guest" => check_snp_response(what, outblob, report_data),
            other => Err(AttestError::Response { what, reason: format!("unknown provider \"{other}\"") }),
        }
    }
}

/// TDX quotes: header version 4 or 5 with TEE type 0x81; REPORTDATA of the
/// TD report body at offset 48 + 520 must be ours.
fn check_tdx_quote(quote: Vec<u8>, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
    let bad = |reason: &str| AttestError::Response { what: "configfs-tsm", reason: reason.into() };
    let version = quote.get(0..2).and_then(|v| v.try_into().ok()).map(u16::from_le_bytes);
    let tee_type = quote.get(4..8).and_then(|v| v.try_into().ok()).map(u32::from_le_bytes);
    if !matches!(version, Some(4 | 5)) || tee_type != Some(0x81) {
        return Err(bad("not a TDX quote (expected version 4 or 5, TEE type 0x81)"));
    }
    // Version 5 inserts a 6-byte body descriptor (type u16, size u32) after the header.
    let body = if version == Some(5) { 48 + 6 } else { 48 };
    const REPORT_DATA_IN_TD_REPORT: usize = 520;
    let found = quote.get(body + REPORT_DATA_IN_TD_REPORT..body + REPORT_DATA_IN_TD_REPORT + 64);
    if found != Some(report_data.as_slice()) {
        return Err(bad("REPORTDATA differs from the requested value"));
    }
    Ok(Evidence { kind: EvidenceKind::Tdx, bytes: quote })
}

/// The sim platform, with the launch-time values a real security processor
/// would have fixed: MEASUREMENT, HOST_DATA and the guest policy.
#[derive(Debug)]
pub struct SimAttester {
    platform: SimPlatform,
    measurement: [u8; 48],
    host_data: [u8; 32],
    policy_debug: bool,
}

impl SimAttester {
    /// An attester for a guest launched with these values.
    pub fn new(platform: SimPlatform, measurement: [u8; 48], host_data: [u8; 32], policy_debug: bool) -> Self {
        Self { platform, measurement, host_data, policy_debug }
    }
}

impl Attester for SimAttester {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Sim
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        let bytes = self.platform.report(&ReportRequest {
            measurement: self.measurement,
            host_data: self.host_data,
            report_data: *report_data,
            policy_debug: self.policy_debug,
            vmpl: 0,
        })?;
        Ok(Evidence { kind: EvidenceKind::Sim, bytes })
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MILAN: &[u8] = include_bytes!("../../../../shared/testdata/evidence/snp/milan-v2-report.bin");
    const TDX: &[u8] = include_bytes!("../../../../shared/testdata/evidence/tdx/quote.bin");

    #[test]
    fn snp_response_must_carry_our_report_data() {
        let report = Report::parse(MILAN).unwrap();
        assert!(check_snp_response("t", MILAN.to_vec(), &report.report_data).is_ok());
        assert!(check_snp_response("t", MILAN.to_vec(), &[0; 64]).is_err());
        assert!(check_snp_response("t", MILAN[..10].to_vec(), &report.report_data).is_err());
    }

    #[test]
    fn tdx_quote_response_checks() {
        let mut report_data = [0u8; 64];
        report_data.copy_from_slice(&TDX[48 + 520..48 + 520 + 64]);
        assert!(check_tdx_quote(TDX.to_vec(), &report_data).is_ok());
        assert!(check_tdx_quote(TDX.to_vec(), &[7; 64]).is_err());
        assert!(check_tdx_quote(MILAN.to_vec(), &report_data).is_err());
        assert!(check_tdx_quote(vec![4, 0], &report_data).is_err());
    }

    /// Plays the kernel's part of the configfs-tsm protocol on a plain
    /// directory: the files a real configfs entry would expose.
    #[test]
    fn configfs_tsm_protocol() {
        let root = std::env::temp_dir().join(format!("capsa-tsm-test-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let attester = ConfigFsTsmAttester::at(&root);
        // A plain directory has no attribute files: the error must say so.
        let err = attester.evidence(&[0; 64]).unwrap_err();
        assert!(matches!(err, AttestError::Firmware { .. }), "{err}");
        // Missing root: unavailable, with a hint.
        let err = ConfigFsTsmAttester::at(root.join("absent")).evidence(&[0; 64]).unwrap_err();
        assert!(err.to_string().contains("confidential guest"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    #[ignore = "needs an SEV-SNP guest with /dev/sev-guest"]
    fn snp_guest_device_round_trip() {
        let data = [0x5a; 64];
        let evidence = SnpGuestAttester::default().evidence(&data).unwrap();
        assert_eq!(Report::parse(&evidence.bytes).unwrap().report_data, data);
    }

    #[test]
    #[ignore = "needs a TDX guest with configfs-tsm"]
    fn tdx_configfs_round_trip() {
        let evidence = ConfigFsTsmAttester::default().evidence(&[0x5a; 64]).unwrap();
        assert_eq!(evidence.kind, EvidenceKind::Tdx);
    }
}
