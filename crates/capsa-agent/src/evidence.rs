//! The guest's own evidence: where it comes from, and the launch-time
//! values in it that the agent relies on.
//!
//! On SEV-SNP the security processor answers through `/dev/sev-guest`; on
//! TDX the kernel's configfs-tsm interface returns a quote. On a sim host
//! there is no security processor, so the launcher serves the sim platform
//! on a second virtio-serial port ([`protocol::SIM_PORT`]) with
//! MEASUREMENT and HOST_DATA fixed when it launched the sandbox, as
//! hardware would fix them.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use capsa_tee::attest::{AttestError, Attester, ConfigFsTsmAttester, Evidence, EvidenceKind, SnpGuestAttester};

use crate::protocol::{self, Frame, SimRequest, SimResponse};

/// The launch-time values the evidence reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchValues {
    /// SEV-SNP HOST_DATA, or TDX MRCONFIGID (its first 32 bytes must carry
    /// the digest; the rest must be zero).
    pub host_data: Vec<u8>,
    /// MEASUREMENT (SNP) or MRTD (TDX).
    pub measurement: Vec<u8>,
    /// REPORT_DATA as reported.
    pub report_data: [u8; 64],
}

/// Reads HOST_DATA, MEASUREMENT and REPORT_DATA out of evidence.
pub fn launch_values(evidence: &Evidence) -> Result<LaunchValues, AttestError> {
    let bad = |reason: String| AttestError::Response { what: "evidence", reason };
    match evidence.kind {
        EvidenceKind::Snp | EvidenceKind::Sim => {
            let report = capsa_tee::snp::Report::parse(&evidence.bytes).map_err(|e| bad(e.to_string()))?;
            Ok(LaunchValues {
                host_data: report.host_data.to_vec(),
                measurement: report.measurement.to_vec(),
                report_data: report.report_data,
            })
        }
        EvidenceKind::Tdx => {
            let quote = dcap_qvl::quote::Quote::parse(&evidence.bytes).map_err(|e| bad(format!("{e:#}")))?;
            let (mr_config_id, mr_td, report_data) = match &quote.report {
                dcap_qvl::quote::Report::TD10(r) => (r.mr_config_id, r.mr_td, r.report_data),
                dcap_qvl::quote::Report::TD15(r) => (r.base.mr_config_id, r.base.mr_td, r.base.report_data),
                dcap_qvl::quote::Report::TD15Ex(r) => {
                    (r.base.base.mr_config_id, r.base.base.mr_td, r.base.base.report_data)
                }
                dcap_qvl::quote::Report::SgxEnclave(_) => return Err(bad("an SGX quote, not a TD quote".into())),
            };
            Ok(LaunchValues { host_data: mr_config_id.to_vec(), measurement: mr_td.to_vec(), report_data })
        }
    }
}

/// The attester for this guest: the SNP guest device, configfs-tsm, or the
/// sim port, in that order; `None` when the guest has none of them.
pub fn guest_attester() -> Option<Box<dyn GuestAttester>> {
    if Path::new("/dev/sev-guest").exists() {
        return Some(Box::new(SnpGuestAttester::default()));
    }
    if Path::new("/sys/kernel/config/tsm/report").exists() {
        return Some(Box::new(ConfigFsTsmAttester::default()));
    }
    let port = crate::init::port_device(protocol::SIM_PORT)?;
    Some(Box::new(SimPortAttester::new(port)))
}

/// Asks the launcher's sim platform service for reports.
pub struct SimPortAttester {
    path: PathBuf,
    port: Mutex<Option<File>>,
    chain: Mutex<Option<String>>,
}

impl SimPortAttester {
    /// An attester talking to the port device at `path`.
    pub fn new(path: PathBuf) -> Self {
        Self { path, port: Mutex::new(None), chain: Mutex::new(None) }
    }
}

/// Evidence and what a verifier needs beside it.
pub trait GuestAttester: Attester + Send + Sync {
    /// The VCEK and its chain (PEM) that endorse the last report, when this
    /// attester has them; `None` leaves it to the verifier's certificate
    /// cache.
    fn vcek_chain_pem(&self) -> Option<String> {
        None
    }
}

impl GuestAttester for SnpGuestAttester {}
impl GuestAttester for ConfigFsTsmAttester {}

impl GuestAttester for SimPortAttester {
    fn vcek_chain_pem(&self) -> Option<String> {
        self.chain.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl Attester for SimPortAttester {
    fn kind(&self) -> EvidenceKind {
        EvidenceKind::Sim
    }

    fn evidence(&self, report_data: &[u8; 64]) -> Result<Evidence, AttestError> {
        let unavailable = |reason: String| AttestError::Unavailable {
            what: "sim platform port",
            path: self.path.display().to_string(),
            reason,
        };
        let mut guard = self.port.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if guard.is_none() {
            let file =
                OpenOptions::new().read(true).write(true).open(&self.path).map_err(|e| unavailable(e.to_string()))?;
            *guard = Some(file);
        }
        let Some(port) = guard.as_mut() else { return Err(unavailable("not open".into())) };
        let request = SimRequest { report_data: hex::encode(report_data) };
        let result = protocol::write_frame(port, &request, &[])
            .and_then(|()| protocol::read_frame::<SimResponse>(port))
            .map_err(|e| unavailable(e.to_string()));
        let Frame { header, payload } = match result {
            Ok(frame) => frame,
            Err(e) => {
                // A half-read frame leaves the stream unusable: reopen next time.
                *guard = None;
                return Err(e);
            }
        };
        if let Some(reason) = header.error {
            return Err(AttestError::Firmware { what: "sim platform service", reason });
        }
        if let Some(chain) = header.vcek_chain_pem {
            *self.chain.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(chain);
        }
        let report = capsa_tee::snp::Report::parse(&payload)
            .map_err(|e| AttestError::Response { what: "sim platform service", reason: e.to_string() })?;
        if report.report_data != *report_data {
            return Err(AttestError::Response {
                what: "sim platform service",
                reason: "REPORT_DATA differs from the requested value".into(),
            });
        }
        Ok(Evidence { kind: EvidenceKind::Sim, bytes: payload })
    }
}
