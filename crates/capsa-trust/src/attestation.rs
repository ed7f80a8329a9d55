//! Attestation: an Azure-attestation-shaped request in, the claims of a
//! token out, or a refusal that says which check failed.
//!
//! The evidence is verified by `capsa-tee` (pinned roots, endorsements from
//! the request or the configured certificate cache, never fetched), then:
//!
//! - **Runtime data binding.** REPORT_DATA is 64 bytes. Its first 32 bytes
//!   must be SHA-256 of the runtime data's bytes (the base64url-decoded
//!   `runtimeData.data`, exactly as sent), and its last 32 bytes SHA-256 of
//!   the nonce's bytes when the request carries a nonce, or zero when it
//!   does not. Without runtime data the first half must be zero too. One
//!   encoding is accepted, so a report made for one runtime key can never
//!   vouch for another.
//! - **Init-time data.** When `initTimeData` is sent, its SHA-256 must be
//!   HOST_DATA (capsa's initdata digest).
//! - **Reference values** of the named attestation policy: launch
//!   measurements, HOST_DATA values, minimum TCB, debug refused unless
//!   allowed, a server nonce when freshness is required (single use, five
//!   minutes).
//!
//! Azure vTPM evidence carries its own runtime claims, bound by the SNP
//! report to the vTPM; such requests take no `runtimeData`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_tee::claims::{AttestationType, Claims, TeeClaims};
use capsa_tee::evidence::{self, EvidenceError, Inputs, Tee};
use capsa_tee::snp::{Appraisal, RootStore, SimTrust, TcbVersion, VerifiedChain, Verifier};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{AttestationPolicy, Config};

// Defined in `api` so that the client builds without the server; re-exported
// so that this path keeps working.
pub use crate::api::EvidenceKind;

/// The largest request body accepted, in bytes.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// How long a server nonce stays usable.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(300);
const MAX_OUTSTANDING_NONCES: usize = 100_000;
const CHAIN_CACHE_TTL: Duration = Duration::from_secs(60);
const MAX_CACHED_CHAINS: usize = 4096;

/// The request body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AttestRequest {
    /// base64url: the evidence with its endorsements (see [`decode_report`]).
    pub report: String,
    /// Data the guest bound into REPORT_DATA, typically its runtime keys.
    pub runtime_data: Option<DataBlob>,
    /// Data whose digest the host fixed at launch (HOST_DATA).
    pub init_time_data: Option<DataBlob>,
    /// base64url: a nonce, bound into REPORT_DATA.
    pub nonce: Option<String>,
}

/// `runtimeData` / `initTimeData`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataBlob {
    /// base64url bytes.
    pub data: String,
    /// `JSON` (the bytes are a JSON document, which the token carries as
    /// such) or `Binary`.
    pub data_type: DataType,
}

/// How to read a [`DataBlob`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DataType {
    /// A JSON document.
    #[serde(rename = "JSON")]
    Json,
    /// Opaque bytes.
    Binary,
}

/// The `report` of an SevSnpVm request when it is JSON (Azure's layout).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SnpEnvelope {
    /// base64url of the 1184-byte report.
    #[serde(rename = "SnpReport")]
    snp_report: String,
    /// base64url of the VCEK (or VLEK) PEM, optionally followed by ASK and ARK.
    #[serde(rename = "VcekCertChain")]
    vcek_cert_chain: Option<String>,
}

/// The `report` of a TdxVm or SgxEnclave request when it is JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuoteEnvelope {
    /// base64url of the quote.
    #[serde(rename = "Quote")]
    quote: String,
    /// The PCS collateral, as dcap-qvl writes it.
    #[serde(rename = "Collateral")]
    collateral: Option<Value>,
}

/// Why attestation was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The request could not be read.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// No such attestation policy.
    #[error("no attestation policy named {0:?} is configured")]
    UnknownPolicy(String),
    /// The evidence could not be read or did not verify.
    #[error("evidence: {0}")]
    Evidence(#[from] EvidenceError),
    /// Sim evidence without `--allow-sim`.
    #[error(
        "the evidence comes from capsa's sim platform, which this server does not accept (start it with --allow-sim for development)"
    )]
    SimRefused,
    /// REPORT_DATA does not bind the request's data.
    #[error("REPORT_DATA does not bind the {what}: expected {expected}, the evidence has {found}")]
    NotBound {
        /// `runtime data` or `nonce`.
        what: &'static str,
        /// The expected half, hex.
        expected: String,
        /// The evidence's half, hex.
        found: String,
    },
    /// initTimeData does not hash to HOST_DATA.
    #[error("SHA-256 of initTimeData is {expected}, but the evidence's HOST_DATA is {found}")]
    InitTimeData {
        /// Its digest.
        expected: String,
        /// HOST_DATA.
        found: String,
    },
    /// A reference value refused the evidence.
    #[error("attestation policy {policy:?}: {reason}")]
    Refused {
        /// The policy.
        policy: String,
        /// Which value and why.
        reason: String,
    },
    /// Freshness required and the nonce missing or not usable.
    #[error(
        "attestation policy {policy:?} requires a fresh server nonce (GET /nonce, single use, five minutes): {reason}"
    )]
    Nonce {
        /// The policy.
        policy: String,
        /// What was wrong.
        reason: &'static str,
    },
}

impl AttestError {
    /// Whether the request itself could not be read (400), as opposed to
    /// read and refused (403).
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::Malformed(_) | Self::UnknownPolicy(_) => true,
            Self::Evidence(e) => e.is_malformed(),
            _ => false,
        }
    }
}

/// Verified evidence and what the token will say.
#[derive(Debug, Clone)]
pub struct Attested {
    /// The claims (without the standard JWT ones).
    pub claims: Map<String, Value>,
    /// Whether the evidence came from the sim platform.
    pub sim: bool,
    /// The attestation policy applied.
    pub policy: String,
}

/// Server nonces: issued, single use, short-lived. Kept in memory: after a
/// restart the outstanding ones are gone and clients ask again (fails closed).
#[derive(Debug, Default)]
pub struct Nonces {
    issued: Mutex<HashMap<[u8; 32], Instant>>,
}

impl Nonces {
    /// A new nonce, base64url.
    pub fn issue(&self) -> Result<String, AttestError> {
        let mut nonce = [0u8; 32];
        SystemRandom::new().fill(&mut nonce).map_err(|_| AttestError::Malformed("no randomness".into()))?;
        let mut issued = self.issued.lock().map_err(|_| AttestError::Malformed("nonce store poisoned".into()))?;
        let now = Instant::now();
        if issued.len() >= MAX_OUTSTANDING_NONCES {
            issued.retain(|_, at| now.duration_since(*at) < NONCE_LIFETIME);
        }
        if issued.len() >= MAX_OUTSTANDING_NONCES {
            return Err(AttestError::Malformed("too many outstanding nonces; try again later".into()));
        }
        issued.insert(nonce, now);
        Ok(URL_SAFE_NO_PAD.encode(nonce))
    }

    /// Consumes a nonce: true once per issued, unexpired nonce.
    fn consume(&self, nonce: &[u8]) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(nonce) else { return false };
        let Ok(mut issued) = self.issued.lock() else { return false };
        issued.remove(&key).is_some_and(|at| at.elapsed() < NONCE_LIFETIME)
    }
}

/// Verified chains by the SHA-256 of their endorsement bytes, with when
/// they were verified.
type ChainCache = HashMap<[u8; 32], (Arc<VerifiedChain>, Instant)>;

/// The attestation service.
pub struct Attestation {
    config: Arc<Config>,
    allow_sim: bool,
    verifier: Verifier,
    chains: Mutex<ChainCache>,
    /// Server nonces.
    pub nonces: Nonces,
}

impl std::fmt::Debug for Attestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestation").field("allow_sim", &self.allow_sim).finish_non_exhaustive()
    }
}

fn b64(what: &str, text: &str) -> Result<Vec<u8>, AttestError> {
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|e| AttestError::Malformed(format!("{what} is not base64url: {e}")))
}

impl Attestation {
    /// With the server's configuration; sim roots trusted only if `allow_sim`.
    pub fn new(config: Arc<Config>, allow_sim: bool) -> Self {
        let sim = if allow_sim { SimTrust::DangerAnySimRoot } else { SimTrust::Refuse };
        Self {
            config,
            allow_sim,
            verifier: Verifier::new(RootStore::amd().with_sim(sim)),
            chains: Mutex::new(HashMap::new()),
            nonces: Nonces::default(),
        }
    }

    /// Verifies a request under the named policy (`default` when none).
    pub fn attest(
        &self,
        kind: EvidenceKind,
        policy: Option<&str>,
        request: &AttestRequest,
    ) -> Result<Attested, AttestError> {
        let name = policy.unwrap_or("default");
        let policy =
            self.config.attestation_policies.get(name).ok_or_else(|| AttestError::UnknownPolicy(name.to_owned()))?;
        let report = b64("report", &request.report)?;
        let runtime = request.runtime_data.as_ref().map(|d| b64("runtimeData.data", &d.data)).transpose()?;
        let init_time = request.init_time_data.as_ref().map(|d| b64("initTimeData.data", &d.data)).transpose()?;
        let nonce = request.nonce.as_deref().map(|n| b64("nonce", n)).transpose()?;
        if kind == EvidenceKind::AzSnpVtpm && runtime.is_some() {
            return Err(AttestError::Malformed(
                "AzSnpVtpm evidence carries its own runtime claims: send no runtimeData".into(),
            ));
        }

        let claims = self.verify_evidence(kind, &report, policy)?;
        let sim = claims.attestation_type == AttestationType::Sim;
        if sim && !self.allow_sim {
            return Err(AttestError::SimRefused);
        }
        appraise(&claims, policy)?;

        if kind != EvidenceKind::AzSnpVtpm {
            let found =
                report_data(&claims).ok_or_else(|| AttestError::Malformed("the evidence has no REPORT_DATA".into()))?;
            let (first, second) = found.split_at(32);
            let want_first = runtime.as_ref().map(|r| sha256(r)).unwrap_or([0; 32]);
            let want_second = nonce.as_ref().map(|n| sha256(n)).unwrap_or([0; 32]);
            bound("runtime data", &want_first, first)?;
            bound("nonce", &want_second, second)?;
        }
        if let Some(init) = &init_time {
            let digest = sha256(init);
            let found = host_data(&claims);
            if !found.is_some_and(|h| constant_eq(&digest, &h)) {
                return Err(AttestError::InitTimeData {
                    expected: hex::encode(digest),
                    found: found.map_or_else(|| "none (this evidence carries no HOST_DATA)".to_owned(), hex::encode),
                });
            }
        }
        if policy.require_nonce {
            let refuse = |reason| AttestError::Nonce { policy: policy.name.clone(), reason };
            let nonce = nonce.as_ref().ok_or_else(|| refuse("the request has no nonce"))?;
            if !self.nonces.consume(nonce) {
                return Err(refuse("the nonce was not issued by this server, has expired, or was already used"));
            }
        }

        let mut out = match serde_json::to_value(&claims) {
            Ok(Value::Object(map)) => map,
            _ => return Err(AttestError::Malformed("claims did not serialize".into())),
        };
        if let (Some(bytes), Some(blob)) = (&runtime, &request.runtime_data) {
            insert_data(&mut out, "x-ms-runtime", "x-capsa-runtime-data", bytes, blob.data_type)?;
        }
        if let (Some(bytes), Some(blob)) = (&init_time, &request.init_time_data) {
            insert_data(&mut out, "x-ms-inittime", "x-capsa-inittime-data", bytes, blob.data_type)?;
        }
        if let Some(n) = &request.nonce {
            out.insert("nonce".into(), Value::String(n.clone()));
        }
        out.insert("x-ms-ver".into(), Value::String("1.0".into()));
        out.insert("x-capsa-attestation-policy".into(), Value::String(policy.name.clone()));
        Ok(Attested { claims: out, sim, policy: policy.name.clone() })
    }

    fn verify_evidence(
        &self,
        kind: EvidenceKind,
        report: &[u8],
        policy: &AttestationPolicy,
    ) -> Result<Claims, AttestError> {
        let at = time::OffsetDateTime::now_utc();
        let options = evidence::Policy { snp: snp_appraisal(policy), ..Default::default() };
        match kind {
            EvidenceKind::SevSnpVm => {
                let (report, endorsement) = if report.first() == Some(&b'{') {
                    let envelope: SnpEnvelope =
                        serde_json::from_slice(report).map_err(|e| AttestError::Malformed(format!("report: {e}")))?;
                    let bytes = b64("report.SnpReport", &envelope.snp_report)?;
                    let chain = envelope.vcek_cert_chain.map(|c| b64("report.VcekCertChain", &c)).transpose()?;
                    (bytes, chain)
                } else {
                    (report.to_vec(), None)
                };
                let endorsement = match endorsement {
                    Some(e) => e,
                    None => self.cached_endorsement(&report)?,
                };
                let chain = self.chain(&endorsement, at)?;
                Ok(chain.verify_report(&report, &options.snp).map_err(EvidenceError::from)?.into_claims())
            }
            EvidenceKind::AzSnpVtpm => Ok(evidence::verify(
                &Inputs {
                    tee: Tee::AzSnpVtpm,
                    evidence: report,
                    vcek: None,
                    chain: None,
                    collateral: None,
                    at,
                    allow_sim: self.allow_sim,
                },
                &options,
            )?),
            EvidenceKind::TdxVm | EvidenceKind::SgxEnclave => {
                let (quote, collateral) = if report.first() == Some(&b'{') {
                    let envelope: QuoteEnvelope =
                        serde_json::from_slice(report).map_err(|e| AttestError::Malformed(format!("report: {e}")))?;
                    let collateral = envelope.collateral.map(|c| c.to_string().into_bytes());
                    (b64("report.Quote", &envelope.quote)?, collateral)
                } else {
                    (report.to_vec(), None)
                };
                let collateral = collateral.or_else(|| self.config.dcap_collateral.clone());
                let tee = if kind == EvidenceKind::TdxVm { Tee::Tdx } else { Tee::Sgx };
                // capsa-tee reads evidence as raw bytes or hex; raw here.
                Ok(evidence::verify(
                    &Inputs {
                        tee,
                        evidence: &quote,
                        vcek: None,
                        chain: None,
                        collateral: collateral.as_deref(),
                        at,
                        allow_sim: false,
                    },
                    &options,
                )?)
            }
        }
    }

    /// The VCEK for a report sent without one, from the certificate cache:
    /// `<CHIP_ID hex>.pem` or `.der`.
    fn cached_endorsement(&self, report: &[u8]) -> Result<Vec<u8>, AttestError> {
        let missing = || {
            AttestError::Evidence(EvidenceError::MissingEndorsement(
                "the report came without VcekCertChain and the server's certificate cache has no VCEK for its CHIP_ID (configure certificate_cache)".into(),
            ))
        };
        let dir: &Path = self.config.certificate_cache.as_deref().ok_or_else(missing)?;
        let parsed = capsa_tee::snp::Report::parse(report)
            .map_err(|e| EvidenceError::from(capsa_tee::snp::SnpError::from(e)))?;
        let chip = hex::encode(parsed.chip_id);
        for ext in ["pem", "der"] {
            let path: PathBuf = dir.join(format!("{chip}.{ext}"));
            if let Ok(bytes) = std::fs::read(&path) {
                return Ok(bytes);
            }
        }
        Err(missing())
    }

    /// A verified chain, cached by the endorsement's bytes for a minute (the
    /// chain's certificates are valid for years; the minute bounds how long
    /// a certificate past its end could still be used).
    fn chain(&self, endorsement: &[u8], at: time::OffsetDateTime) -> Result<Arc<VerifiedChain>, AttestError> {
        let key = sha256(endorsement);
        let cached = self.chains.lock().ok().and_then(|cache| {
            cache.get(&key).filter(|(_, when)| when.elapsed() < CHAIN_CACHE_TTL).map(|(chain, _)| Arc::clone(chain))
        });
        if let Some(chain) = cached {
            return Ok(chain);
        }
        let parsed = capsa_tee::encoding::endorsement(endorsement).map_err(EvidenceError::from)?;
        let chain = Arc::new(
            self.verifier
                .verify_chain(&parsed.leaf_der, parsed.chain_pem.as_deref(), at)
                .map_err(EvidenceError::from)?,
        );
        if let Ok(mut cache) = self.chains.lock() {
            if cache.len() >= MAX_CACHED_CHAINS {
                cache.clear();
            }
            cache.insert(key, (Arc::clone(&chain), Instant::now()));
        }
        Ok(chain)
    }
}

fn snp_appraisal(policy: &AttestationPolicy) -> Appraisal {
    Appraisal {
        min_tcb: policy.min_tcb.map(|t| TcbVersion {
            fmc: None,
            bootloader: t.bootloader,
            tee: t.tee,
            snp: t.snp,
            microcode: t.microcode,
        }),
        refuse_debug: !policy.allow_debug,
        measurements: policy.launch_measurements.clone(),
        ..Appraisal::default()
    }
}

fn snp_claims(claims: &Claims) -> Option<&capsa_tee::claims::SnpClaims> {
    match &claims.tee {
        TeeClaims::SevSnp(s) => Some(s),
        TeeClaims::AzureVm(a) => Some(&a.isolation_tee.snp),
        _ => None,
    }
}

/// Reference values the SNP appraisal does not cover (and, for TDX/SGX,
/// those it does).
fn appraise(claims: &Claims, policy: &AttestationPolicy) -> Result<(), AttestError> {
    let refuse = |reason: String| AttestError::Refused { policy: policy.name.clone(), reason };
    match &claims.tee {
        TeeClaims::Tdx(t) => {
            if !policy.allow_debug && t.tdx_td_attributes_debug {
                return Err(refuse("the TD is debuggable, and debug guests are refused".into()));
            }
            if !policy.launch_measurements.is_empty()
                && !policy.launch_measurements.iter().any(|m| hex::encode(m) == t.tdx_mrtd)
            {
                return Err(refuse(format!("MRTD {} is not among the allowed launch measurements", t.tdx_mrtd)));
            }
        }
        TeeClaims::Sgx(s) => {
            if !policy.allow_debug && s.is_debuggable {
                return Err(refuse("the enclave is debuggable, and debug enclaves are refused".into()));
            }
        }
        TeeClaims::SevSnp(_) | TeeClaims::AzureVm(_) => {}
    }
    if !policy.host_data.is_empty() {
        // Evidence without HOST_DATA (SGX) never matches: it is not read as zeros.
        let found = host_data(claims).ok_or_else(|| {
            refuse("the evidence carries no HOST_DATA, and the policy allows only listed values".into())
        })?;
        if !policy.host_data.iter().any(|h| constant_eq(h, &found)) {
            return Err(refuse(format!("HOST_DATA {} is not among the allowed values", hex::encode(found))));
        }
    }
    Ok(())
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

fn report_data(claims: &Claims) -> Option<[u8; 64]> {
    match &claims.tee {
        TeeClaims::SevSnp(s) => hex_bytes(&s.report_data),
        TeeClaims::AzureVm(a) => hex_bytes(&a.isolation_tee.snp.report_data),
        TeeClaims::Tdx(t) => hex_bytes(&t.tdx_report_data),
        TeeClaims::Sgx(s) => hex_bytes(&s.report_data),
    }
}

fn host_data(claims: &Claims) -> Option<[u8; 32]> {
    match &claims.tee {
        TeeClaims::Tdx(t) => hex_bytes::<48>(&t.tdx_mrconfigid).and_then(|m| m.get(..32)?.try_into().ok()),
        _ => snp_claims(claims).and_then(|s| hex_bytes(&s.host_data)),
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

fn bound(what: &'static str, expected: &[u8], found: &[u8]) -> Result<(), AttestError> {
    if constant_eq(expected, found) {
        Ok(())
    } else {
        Err(AttestError::NotBound { what, expected: hex::encode(expected), found: hex::encode(found) })
    }
}

fn insert_data(
    out: &mut Map<String, Value>,
    json_claim: &str,
    binary_claim: &str,
    bytes: &[u8],
    data_type: DataType,
) -> Result<(), AttestError> {
    match data_type {
        DataType::Json => {
            let value: Value = serde_json::from_slice(bytes).map_err(|e| {
                AttestError::Malformed(format!("{json_claim}: dataType is JSON but the data is not: {e}"))
            })?;
            out.insert(json_claim.into(), value);
        }
        DataType::Binary => {
            out.insert(binary_claim.into(), Value::String(URL_SAFE_NO_PAD.encode(bytes)));
        }
    }
    Ok(())
}
