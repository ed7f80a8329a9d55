//! Intel TDX and SGX DCAP quotes: their layout, their verification against
//! PCS collateral, and the claims they yield.
//!
//! This module owns everything capsa knows about DCAP evidence. The
//! cryptography and Intel's appraisal rules (certificate chains up to Intel's
//! SGX root CA, CRLs, TCB info, QE identity, TCB level matching, TD attribute
//! checks) are those of [`dcap_qvl`], a pure-Rust port of Intel's QVL; this
//! module puts capsa's rules around it:
//!
//! - collateral is always supplied by the caller, as the JSON file dcap-qvl's
//!   [`QuoteCollateralV3`] serialises to, and nothing is ever fetched, so that
//!   verification is offline and reproducible;
//! - verification happens "as of" an instant the caller passes in, never the
//!   wall clock, and the collateral must be valid at that instant;
//! - untrusted bytes are bounded and their framing checked here, before
//!   dcap-qvl sees them, so that a malformed quote is reported as such
//!   (CLI exit code 2) rather than as a failed verification (exit code 1);
//! - the TCB status is never hidden: every status dcap-qvl does not itself
//!   reject is surfaced in the claims, and [`DcapAppraisal`] decides which are
//!   accepted;
//! - the result is a [`Claims`] value, which exists only after verification.
//!
//! [`describe_quote`] lists a quote's fields without verifying anything, for
//! `capsa evidence show`.

use dcap_qvl::QuoteCollateralV3;
use dcap_qvl::quote::{AuthData, EnclaveReport, Quote, Report, TDAttributes, TDReport10};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::claims::{AttestationType, Claims, SgxClaims, TcbAppraisal, TdxClaims, TeeClaims};
use crate::encoding::rfc3339;

/// Which DCAP evidence a caller expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteKind {
    /// An Intel TDX quote (version 4 or 5) over a TD report.
    Tdx,
    /// An Intel SGX quote (version 3) over an enclave report.
    Sgx,
}

impl QuoteKind {
    /// The name users know the TEE by: `TDX` or `SGX`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tdx => "TDX",
            Self::Sgx => "SGX",
        }
    }

    fn with_article(self) -> &'static str {
        match self {
            Self::Tdx => "a TDX",
            Self::Sgx => "an SGX",
        }
    }

    /// What the claims call the thing this kind of quote measures.
    fn subject(self) -> &'static str {
        match self {
            Self::Tdx => "TD",
            Self::Sgx => "enclave",
        }
    }
}

impl std::fmt::Display for QuoteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a DCAP quote, its collateral or the appraisal options were refused.
///
/// Variants split in two groups, told apart by [`DcapError::is_malformed`]:
/// input that cannot be read (or options that make no sense for it), and
/// well-formed evidence that failed verification or appraisal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DcapError {
    /// The quote is larger than any DCAP quote can be.
    #[error("quote is {len} bytes, more than the {max} bytes a DCAP quote can take (is this a quote file?)")]
    QuoteTooLarge {
        /// Length of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The quote ends before a part its framing announces.
    #[error("quote is truncated: its {part} needs {needed} bytes but only {found} were given (pass the whole quote)")]
    QuoteTruncated {
        /// The part that does not fit.
        part: &'static str,
        /// Bytes needed up to the end of that part.
        needed: usize,
        /// Bytes given.
        found: usize,
    },
    /// The quote header names a version this verifier does not know.
    #[error("quote version {version} is not supported for {tee} quotes (expected {expected})")]
    UnsupportedVersion {
        /// The version in the header.
        version: u16,
        /// The TEE type in the header.
        tee: QuoteKind,
        /// The versions accepted for that TEE type.
        expected: &'static str,
    },
    /// The quote header names a TEE other than SGX or TDX.
    #[error("quote TEE type {tee_type:#x} is not supported (expected 0x0 for SGX or 0x81 for TDX)")]
    UnsupportedTeeType {
        /// The TEE type in the header.
        tee_type: u32,
    },
    /// The quote is signed with a key type other than ECDSA P-256.
    #[error("quote attestation key type {key_type} is not supported (expected 2, ECDSA-256 with P-256)")]
    UnsupportedKeyType {
        /// The attestation key type in the header.
        key_type: u16,
    },
    /// A version 5 quote announces a body type this verifier does not know.
    #[error("quote body type {body_type} is not supported (expected 1 to 4)")]
    UnsupportedBodyType {
        /// The body type in the body descriptor.
        body_type: u16,
    },
    /// The quote's structure is inconsistent.
    #[error("quote is malformed: {reason}")]
    QuoteMalformed {
        /// What is wrong, as the parser saw it.
        reason: String,
    },
    /// Non-zero bytes follow the end of the quote.
    #[error(
        "quote has non-zero bytes after its end at offset {offset} (pass the quote alone; only zero padding may follow it)"
    )]
    TrailingBytes {
        /// Where the quote ends.
        offset: usize,
    },
    /// The quote is of another TEE than the caller expects.
    #[error("quote is {} quote but {} quote was expected (check --tee)", found.with_article(), expected.with_article())]
    WrongKind {
        /// What the caller asked for.
        expected: QuoteKind,
        /// What the quote header says.
        found: QuoteKind,
    },
    /// The collateral file is larger than any PCS collateral.
    #[error("collateral is {len} bytes, more than the {max} bytes allowed (is this a collateral file?)")]
    CollateralTooLarge {
        /// Length of the input.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The collateral is not JSON of the expected shape.
    #[error("collateral JSON is not valid: {source} (expected dcap-qvl's QuoteCollateralV3 format)")]
    CollateralJson {
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A collateral field cannot be read.
    #[error("collateral field {field} is not valid: {reason} (expected dcap-qvl's QuoteCollateralV3 format)")]
    CollateralField {
        /// The field, as named in the JSON.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The verification instant cannot be expressed as seconds since 1970.
    #[error("verification instant {at} is before 1970-01-01 (pass the instant to verify as of)")]
    InstantOutOfRange {
        /// The instant, RFC 3339.
        at: String,
    },
    /// An accepted TCB status in the appraisal options is not a status
    /// dcap-qvl can report.
    #[error("accepted TCB status {status} is not known (expected one of {})", ACCEPTABLE_TCB_STATUSES.join(", "))]
    UnknownTcbStatus {
        /// The unknown status.
        status: String,
    },
    /// A reference value was given that this kind of quote does not carry.
    #[error("expected {field} values were given but {kind} quotes carry no {field} (drop them or check --tee)")]
    InapplicableReference {
        /// The reference value.
        field: &'static str,
        /// The kind of quote being verified.
        kind: QuoteKind,
    },
    /// The collateral does not cover the verification instant.
    #[error(
        "collateral is not valid at {at}: it covers {not_before} to {not_after} (fetch fresh collateral, or verify as of an instant inside that window)"
    )]
    CollateralNotValidAt {
        /// The verification instant, RFC 3339.
        at: String,
        /// The latest issue date of the TCB info, QE identity and CRLs.
        not_before: String,
        /// The earliest next-update date of the TCB info, QE identity and CRLs.
        not_after: String,
    },
    /// dcap-qvl refused the quote: a signature, certificate, CRL, identity
    /// or TCB check failed.
    #[error("quote verification failed: {reason}")]
    VerificationFailed {
        /// dcap-qvl's reason, with its context chain.
        reason: String,
    },
    /// The platform's TCB is older than every level the collateral's TCB
    /// info lists: Intel's algorithm then assigns no status at all ("TCB
    /// level not supported"), and the platform is out of date by any measure.
    #[error(
        "TCB status OutOfDate: the platform's TCB is below every TCB level in the collateral's TCB info (Intel: TCB level not supported); update the platform's firmware and microcode"
    )]
    PlatformBelowAllTcbLevels,
    /// The platform's TCB status is not among the accepted ones.
    #[error(
        "TCB status {status} is not accepted (advisories: {}); update the platform or accept the status explicitly",
        advisory_list(advisory_ids)
    )]
    TcbStatusNotAccepted {
        /// The TCB status.
        status: String,
        /// The advisories that apply.
        advisory_ids: Vec<String>,
    },
    /// The TD or enclave can be debugged and the appraisal refuses that.
    #[error("{subject} is debuggable and debug is refused")]
    DebugRefused {
        /// `TD` or `enclave`.
        subject: &'static str,
    },
    /// REPORTDATA is not what the caller expected.
    #[error("REPORTDATA {found} does not match the expected {expected}")]
    ReportDataMismatch {
        /// The expected value, hex.
        expected: String,
        /// The quote's value, hex.
        found: String,
    },
    /// A measurement is not among the caller's reference values.
    #[error("{field} {found} is not among the expected values")]
    MeasurementNotExpected {
        /// The measurement: `MRTD`, `MRCONFIGID`, `MRENCLAVE` or `MRSIGNER`.
        field: &'static str,
        /// The quote's value, hex.
        found: String,
    },
    /// The enclave's ISVPRODID is not the expected one.
    #[error("ISVPRODID {found} is not the expected {expected}")]
    ProductIdMismatch {
        /// The expected product ID.
        expected: u16,
        /// The quote's product ID.
        found: u16,
    },
    /// The enclave's ISVSVN is below the minimum.
    #[error("ISVSVN {found} is below the minimum {min}")]
    SvnTooLow {
        /// The minimum accepted.
        min: u16,
        /// The quote's ISVSVN.
        found: u16,
    },
}

impl DcapError {
    /// Whether the input could not be read or the options make no sense for
    /// it (CLI exit code 2), as opposed to well-formed evidence that failed
    /// verification or appraisal (exit code 1).
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::QuoteTooLarge { .. }
            | Self::QuoteTruncated { .. }
            | Self::UnsupportedVersion { .. }
            | Self::UnsupportedTeeType { .. }
            | Self::UnsupportedKeyType { .. }
            | Self::UnsupportedBodyType { .. }
            | Self::QuoteMalformed { .. }
            | Self::TrailingBytes { .. }
            | Self::WrongKind { .. }
            | Self::CollateralTooLarge { .. }
            | Self::CollateralJson { .. }
            | Self::CollateralField { .. }
            | Self::InstantOutOfRange { .. }
            | Self::UnknownTcbStatus { .. }
            | Self::InapplicableReference { .. } => true,
            Self::CollateralNotValidAt { .. }
            | Self::VerificationFailed { .. }
            | Self::PlatformBelowAllTcbLevels
            | Self::TcbStatusNotAccepted { .. }
            | Self::DebugRefused { .. }
            | Self::ReportDataMismatch { .. }
            | Self::MeasurementNotExpected { .. }
            | Self::ProductIdMismatch { .. }
            | Self::SvnTooLow { .. } => false,
        }
    }
}

fn advisory_list(ids: &[String]) -> String {
    if ids.is_empty() { "none".to_owned() } else { ids.join(", ") }
}

/// PCS collateral for one quote: TCB info, QE identity, CRLs and the chains
/// that sign them, parsed from the JSON file dcap-qvl's `QuoteCollateralV3`
/// serialises to (byte fields as hex strings).
#[derive(Debug, Clone)]
pub struct Collateral(QuoteCollateralV3);

/// Real collateral is tens of kilobytes, most of it the PCK CRL; the bound
/// only keeps a wrong file from being parsed at length.
const MAX_COLLATERAL_LEN: usize = 4 << 20;

impl Collateral {
    /// Parses collateral JSON and checks that the TCB info, QE identity and
    /// CRLs inside it can be read and are dated. Nothing is verified yet:
    /// signatures and chains are checked by [`verify_quote`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, DcapError> {
        if bytes.len() > MAX_COLLATERAL_LEN {
            return Err(DcapError::CollateralTooLarge { len: bytes.len(), max: MAX_COLLATERAL_LEN });
        }
        let inner: QuoteCollateralV3 =
            serde_json::from_slice(bytes).map_err(|source| DcapError::CollateralJson { source })?;
        let collateral = Self(inner);
        // Reading the embedded documents now reports a broken file as
        // malformed input, instead of as a failed verification later.
        collateral.valid_between()?;
        Ok(collateral)
    }

    /// The window in which every dated part of the collateral is current:
    /// from the latest issue date (included) to the earliest next-update
    /// date (excluded) of the TCB info, the QE identity, the root CA CRL and
    /// the PCK CRL. Quotes can be verified with this collateral only as of
    /// an instant inside it.
    pub fn valid_between(&self) -> Result<(OffsetDateTime, OffsetDateTime), DcapError> {
        let c = &self.0;
        let tcb_info: dcap_qvl::TcbInfo = serde_json::from_str(&c.tcb_info)
            .map_err(|e| DcapError::CollateralField { field: "tcb_info", reason: e.to_string() })?;
        let qe_identity: dcap_qvl::QeIdentity = serde_json::from_str(&c.qe_identity)
            .map_err(|e| DcapError::CollateralField { field: "qe_identity", reason: e.to_string() })?;
        let mut not_before = parse_date("tcb_info", "issueDate", &tcb_info.issue_date)?.max(parse_date(
            "qe_identity",
            "issueDate",
            &qe_identity.issue_date,
        )?);
        let mut not_after = parse_date("tcb_info", "nextUpdate", &tcb_info.next_update)?.min(parse_date(
            "qe_identity",
            "nextUpdate",
            &qe_identity.next_update,
        )?);
        for (this_update, next_update) in
            [crl_window("root_ca_crl", &c.root_ca_crl)?, crl_window("pck_crl", &c.pck_crl)?]
        {
            not_before = not_before.max(this_update);
            // A CRL without nextUpdate bounds nothing.
            if let Some(next) = next_update {
                not_after = not_after.min(next);
            }
        }
        Ok((not_before, not_after))
    }
}

fn parse_date(field: &'static str, name: &str, value: &str) -> Result<OffsetDateTime, DcapError> {
    OffsetDateTime::parse(value, &Rfc3339).map_err(|e| DcapError::CollateralField {
        field,
        reason: format!("{name} {value:?} is not an RFC 3339 date: {e}"),
    })
}

fn crl_window(field: &'static str, der_bytes: &[u8]) -> Result<(OffsetDateTime, Option<OffsetDateTime>), DcapError> {
    use der::Decode as _;
    let crl = x509_cert::crl::CertificateList::from_der(der_bytes)
        .map_err(|e| DcapError::CollateralField { field, reason: format!("not a DER CRL: {e}") })?;
    let to_time = |t: x509_cert::time::Time| {
        i64::try_from(t.to_unix_duration().as_secs())
            .ok()
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or_else(|| DcapError::CollateralField { field, reason: "CRL date is out of range".to_owned() })
    };
    let tbs = crl.tbs_cert_list;
    Ok((to_time(tbs.this_update)?, tbs.next_update.map(to_time).transpose()?))
}

/// Appraisal options: what, beyond a valid signature chain, a quote must
/// show to be accepted. The default accepts every genuine quote dcap-qvl
/// accepts and leaves the decision to whoever reads the claims.
#[derive(Debug, Default, Clone)]
pub struct DcapAppraisal {
    /// TCB statuses accepted besides `UpToDate`: any of `SWHardeningNeeded`,
    /// `ConfigurationNeeded`, `ConfigurationAndSWHardeningNeeded`,
    /// `OutOfDate`, `OutOfDateConfigurationNeeded`, `TDRelaunchAdvised`,
    /// `TDRelaunchAdvisedConfigurationNeeded`. `None` accepts every status
    /// dcap-qvl does not itself reject (it always rejects `Revoked`); the
    /// status is surfaced in the claims either way.
    pub accepted_tcb_statuses: Option<Vec<String>>,
    /// Refuse a debuggable TD or enclave. For TDX this refuses any "TD under
    /// debug" attribute bit (DEBUG and the profiling bits), not only DEBUG.
    pub refuse_debug: bool,
    /// REPORTDATA the quote must carry, e.g. a nonce or a key hash.
    pub expected_report_data: Option<[u8; 64]>,
    /// TDX only: MRTD values accepted. `Some(vec![])` accepts none.
    pub expected_mrtd: Option<Vec<[u8; 48]>>,
    /// TDX only: MRCONFIGID values accepted (capsa puts the initdata digest
    /// there).
    pub expected_mrconfigid: Option<Vec<[u8; 48]>>,
    /// SGX only: MRENCLAVE values accepted.
    pub expected_mrenclave: Option<Vec<[u8; 32]>>,
    /// SGX only: MRSIGNER values accepted. Pair it with
    /// `expected_isv_prod_id` and `min_isv_svn`, since one signer may sign
    /// many products and versions.
    pub expected_mrsigner: Option<Vec<[u8; 32]>>,
    /// SGX only: the ISVPRODID the enclave must have.
    pub expected_isv_prod_id: Option<u16>,
    /// SGX only: the lowest ISVSVN accepted.
    pub min_isv_svn: Option<u16>,
}

/// Statuses a caller may accept besides `UpToDate`, as dcap-qvl names them.
const ACCEPTABLE_TCB_STATUSES: &[&str] = &[
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
    "TDRelaunchAdvised",
    "TDRelaunchAdvisedConfigurationNeeded",
];

impl DcapAppraisal {
    /// Rejects options that cannot apply, so that a reference value is never
    /// silently ignored.
    fn check(&self, kind: QuoteKind) -> Result<(), DcapError> {
        if let Some(unknown) = self
            .accepted_tcb_statuses
            .iter()
            .flatten()
            .find(|s| s.as_str() != "UpToDate" && !ACCEPTABLE_TCB_STATUSES.contains(&s.as_str()))
        {
            return Err(DcapError::UnknownTcbStatus { status: unknown.clone() });
        }
        let inapplicable = match kind {
            QuoteKind::Tdx => [
                ("MRENCLAVE", self.expected_mrenclave.is_some()),
                ("MRSIGNER", self.expected_mrsigner.is_some()),
                ("ISVPRODID", self.expected_isv_prod_id.is_some()),
                ("ISVSVN", self.min_isv_svn.is_some()),
            ]
            .into_iter()
            .find(|(_, set)| *set),
            QuoteKind::Sgx => {
                [("MRTD", self.expected_mrtd.is_some()), ("MRCONFIGID", self.expected_mrconfigid.is_some())]
                    .into_iter()
                    .find(|(_, set)| *set)
            }
        };
        match inapplicable {
            Some((field, _)) => Err(DcapError::InapplicableReference { field, kind }),
            None => Ok(()),
        }
    }

    fn tcb_accepted(&self, status: &str) -> bool {
        status == "UpToDate"
            || self.accepted_tcb_statuses.as_ref().is_none_or(|accepted| accepted.iter().any(|s| s == status))
    }
}

/// Verifies a DCAP quote against caller-supplied collateral as of `at`, then
/// appraises it, and returns its claims.
///
/// The quote must be of `kind`; the collateral must be current at `at` (see
/// [`Collateral::valid_between`]). dcap-qvl checks the chain from Intel's SGX
/// root CA to the PCK certificate, the CRLs, the TCB info and QE identity
/// signatures, the QE report, the quote signature, the TCB level, and rejects
/// `Revoked` platforms, migratable TDs, TDs without SEPT_VE_DISABLE and TDs
/// bound to service TDs. `appraisal` then decides on the TCB status, debug,
/// REPORTDATA and measurements.
pub fn verify_quote(
    kind: QuoteKind,
    quote: &[u8],
    collateral: &Collateral,
    at: OffsetDateTime,
    appraisal: &DcapAppraisal,
) -> Result<Claims, DcapError> {
    let parsed = parse_quote(quote)?;
    let found = parsed.kind;
    if found != kind {
        return Err(DcapError::WrongKind { expected: kind, found });
    }
    let expected_versions: &[u16] = match kind {
        QuoteKind::Tdx => &[4, 5],
        QuoteKind::Sgx => &[3],
    };
    if !expected_versions.contains(&parsed.quote.header.version) {
        return Err(DcapError::UnsupportedVersion {
            version: parsed.quote.header.version,
            tee: kind,
            expected: match kind {
                QuoteKind::Tdx => "4 or 5",
                QuoteKind::Sgx => "3",
            },
        });
    }
    appraisal.check(kind)?;

    let now_secs = u64::try_from(at.unix_timestamp()).map_err(|_| DcapError::InstantOutOfRange { at: rfc3339(at) })?;
    // dcap-qvl would refuse stale collateral too, but only with a bare
    // "expired" or a certificate-path error; checking first tells the user
    // which window the collateral covers. The end is excluded because
    // webpki treats a CRL as expired at its nextUpdate instant.
    let (not_before, not_after) = collateral.valid_between()?;
    if at < not_before || at >= not_after {
        return Err(DcapError::CollateralNotValidAt {
            at: rfc3339(at),
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
        });
    }

    // Debug is let through dcap-qvl and judged below, so that a debuggable
    // TD is either accepted with its claim set or refused with an error that
    // says so. Service-TD bindings stay refused: capsa's claims cannot
    // express them.
    let verified = dcap_qvl::verify::QuoteVerifier::new_prod()
        .allow_debug(true)
        .verify(parsed.signed, &collateral.0, now_secs)
        .map_err(|e| {
            let reason = format!("{e:#}");
            // dcap-qvl reports this case only as text; the fixture test
            // `outdated_tdx_quote_is_reported_out_of_date` pins the wording.
            if reason.contains("No matching TCB level found") {
                DcapError::PlatformBelowAllTcbLevels
            } else {
                DcapError::VerificationFailed { reason }
            }
        })?;
    tracing::debug!(
        tee = kind.as_str(),
        tcb_status = %verified.status,
        advisories = ?verified.advisory_ids,
        "DCAP quote signature chain verified"
    );
    appraise(kind, verified, appraisal)
}

/// capsa's appraisal of what dcap-qvl verified: TCB status, debug,
/// REPORTDATA and reference values, then the claims.
fn appraise(
    kind: QuoteKind,
    verified: dcap_qvl::verify::VerifiedReport,
    appraisal: &DcapAppraisal,
) -> Result<Claims, DcapError> {
    let tcb = TcbAppraisal { status: verified.status, advisory_ids: verified.advisory_ids };
    if !appraisal.tcb_accepted(&tcb.status) {
        return Err(DcapError::TcbStatusNotAccepted { status: tcb.status, advisory_ids: tcb.advisory_ids });
    }
    match (&verified.report, kind) {
        (Report::SgxEnclave(report), QuoteKind::Sgx) => appraise_sgx(report, tcb, appraisal),
        (Report::TD10(report), QuoteKind::Tdx) => appraise_tdx(report, tcb, appraisal),
        (Report::TD15(report), QuoteKind::Tdx) => appraise_tdx(&report.base, tcb, appraisal),
        (Report::TD15Ex(report), QuoteKind::Tdx) => appraise_tdx(&report.base.base, tcb, appraisal),
        (report, _) => {
            // The header said `kind` and dcap-qvl decoded the same bytes, so
            // this cannot happen; refuse rather than trust either.
            Err(DcapError::WrongKind {
                expected: kind,
                found: if report.is_sgx() { QuoteKind::Sgx } else { QuoteKind::Tdx },
            })
        }
    }
}

fn check_report_data(appraisal: &DcapAppraisal, found: &[u8; 64]) -> Result<(), DcapError> {
    match &appraisal.expected_report_data {
        Some(expected) if expected != found => {
            Err(DcapError::ReportDataMismatch { expected: hex::encode(expected), found: hex::encode(found) })
        }
        _ => Ok(()),
    }
}

fn check_measurement<const N: usize>(
    field: &'static str,
    expected: Option<&Vec<[u8; N]>>,
    found: &[u8; N],
) -> Result<(), DcapError> {
    match expected {
        Some(values) if !values.contains(found) => {
            Err(DcapError::MeasurementNotExpected { field, found: hex::encode(found) })
        }
        _ => Ok(()),
    }
}

fn appraise_tdx(report: &TDReport10, tcb: TcbAppraisal, appraisal: &DcapAppraisal) -> Result<Claims, DcapError> {
    // TDATTRIBUTES bits 7:0 are the "TD under debug" group: Intel's TDX ABI
    // says a TD with any of them set is untrusted, and besides DEBUG they
    // include the profiling bits that let the host observe the TD. Reporting
    // DEBUG alone would let a profiled TD pass a policy that checks this
    // claim.
    let under_debug = report.td_attributes.first().is_some_and(|tud| *tud != 0);
    if appraisal.refuse_debug && under_debug {
        return Err(DcapError::DebugRefused { subject: QuoteKind::Tdx.subject() });
    }
    check_report_data(appraisal, &report.report_data)?;
    check_measurement("MRTD", appraisal.expected_mrtd.as_ref(), &report.mr_td)?;
    check_measurement("MRCONFIGID", appraisal.expected_mrconfigid.as_ref(), &report.mr_config_id)?;
    Ok(Claims {
        attestation_type: AttestationType::TdxVm,
        tee: TeeClaims::Tdx(TdxClaims {
            tdx_mrtd: hex::encode(report.mr_td),
            tdx_mrconfigid: hex::encode(report.mr_config_id),
            tdx_mrowner: hex::encode(report.mr_owner),
            tdx_mrownerconfig: hex::encode(report.mr_owner_config),
            tdx_rtmr0: hex::encode(report.rt_mr0),
            tdx_rtmr1: hex::encode(report.rt_mr1),
            tdx_rtmr2: hex::encode(report.rt_mr2),
            tdx_rtmr3: hex::encode(report.rt_mr3),
            tdx_report_data: hex::encode(report.report_data),
            tdx_mrseam: hex::encode(report.mr_seam),
            tdx_mrsignerseam: hex::encode(report.mr_signer_seam),
            tdx_seam_attributes: hex::encode(report.seam_attributes),
            tdx_td_attributes: hex::encode(report.td_attributes),
            tdx_td_attributes_debug: under_debug,
            tdx_xfam: hex::encode(report.xfam),
            tdx_tee_tcb_svn: hex::encode(report.tee_tcb_svn),
            tcb,
        }),
    })
}

/// ATTRIBUTES.DEBUG, bit 1 of the enclave's ATTRIBUTES (Intel SDM, SECS).
fn sgx_debug(report: &EnclaveReport) -> bool {
    report.attributes.first().is_some_and(|a| a & 0x02 != 0)
}

fn appraise_sgx(report: &EnclaveReport, tcb: TcbAppraisal, appraisal: &DcapAppraisal) -> Result<Claims, DcapError> {
    let is_debuggable = sgx_debug(report);
    if appraisal.refuse_debug && is_debuggable {
        return Err(DcapError::DebugRefused { subject: QuoteKind::Sgx.subject() });
    }
    check_report_data(appraisal, &report.report_data)?;
    check_measurement("MRENCLAVE", appraisal.expected_mrenclave.as_ref(), &report.mr_enclave)?;
    check_measurement("MRSIGNER", appraisal.expected_mrsigner.as_ref(), &report.mr_signer)?;
    if let Some(expected) = appraisal.expected_isv_prod_id.filter(|e| *e != report.isv_prod_id) {
        return Err(DcapError::ProductIdMismatch { expected, found: report.isv_prod_id });
    }
    if let Some(min) = appraisal.min_isv_svn.filter(|min| report.isv_svn < *min) {
        return Err(DcapError::SvnTooLow { min, found: report.isv_svn });
    }
    Ok(Claims {
        attestation_type: AttestationType::Sgx,
        tee: TeeClaims::Sgx(SgxClaims {
            mrenclave: hex::encode(report.mr_enclave),
            mrsigner: hex::encode(report.mr_signer),
            product_id: report.isv_prod_id,
            svn: report.isv_svn,
            is_debuggable,
            report_data: hex::encode(report.report_data),
            cpu_svn: hex::encode(report.cpu_svn),
            attributes: hex::encode(report.attributes),
            misc_select: report.misc_select,
            tcb,
        }),
    })
}

// ---------------------------------------------------------------------------
// Quote framing
// ---------------------------------------------------------------------------

/// Header: version, key type, TEE type, QE SVN, PCE SVN, QE vendor ID, user data.
const HEADER_LEN: usize = 48;
/// Quote v5 body descriptor: body type (u16) and body size (u32).
const BODY_DESCRIPTOR_LEN: usize = 6;
const SGX_REPORT_LEN: usize = 384;
const TD10_REPORT_LEN: usize = 584;
const TD15_REPORT_LEN: usize = 648;
const TD15_EX_REPORT_LEN: usize = 885;
/// dcap-qvl caps each variable-length part at 1 MiB; a quote needs a few
/// kilobytes. The bound keeps a wrong file from being parsed at length.
const MAX_QUOTE_LEN: usize = 1 << 20;
const TEE_TYPE_SGX: u32 = 0x0000_0000;
const TEE_TYPE_TDX: u32 = 0x0000_0081;
const ECDSA_P256_KEY_TYPE: u16 = 2;
/// Certification data type 5: a PEM PCK certificate chain.
const CERT_TYPE_PCK_CHAIN: u16 = 5;

/// A quote whose framing has been checked and which dcap-qvl has decoded.
struct ParsedQuote<'a> {
    kind: QuoteKind,
    /// The quote without trailing padding: what dcap-qvl verifies.
    signed: &'a [u8],
    /// Zero bytes that followed the quote.
    padding: usize,
    quote: Quote,
}

fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let b: [u8; 2] = bytes.get(offset..offset.checked_add(2)?)?.try_into().ok()?;
    Some(u16::from_le_bytes(b))
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(offset..offset.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

fn truncated(part: &'static str, needed: usize, found: usize) -> DcapError {
    DcapError::QuoteTruncated { part, needed, found }
}

/// Checks a quote's framing with a bounded reader, then lets dcap-qvl decode
/// exactly the framed bytes. dcap-qvl's own decoder is panic-free on short
/// input, but checking here first names what is missing, and bounds the
/// quote before any allocation sized by its length fields.
fn parse_quote(bytes: &[u8]) -> Result<ParsedQuote<'_>, DcapError> {
    let len = bytes.len();
    if len > MAX_QUOTE_LEN {
        return Err(DcapError::QuoteTooLarge { len, max: MAX_QUOTE_LEN });
    }
    if len < HEADER_LEN {
        return Err(truncated("header", HEADER_LEN, len));
    }
    let short_header = || truncated("header", HEADER_LEN, len);
    let version = read_u16(bytes, 0).ok_or_else(short_header)?;
    let key_type = read_u16(bytes, 2).ok_or_else(short_header)?;
    let tee_type = read_u32(bytes, 4).ok_or_else(short_header)?;
    let kind = match tee_type {
        TEE_TYPE_SGX => QuoteKind::Sgx,
        TEE_TYPE_TDX => QuoteKind::Tdx,
        other => return Err(DcapError::UnsupportedTeeType { tee_type: other }),
    };
    if key_type != ECDSA_P256_KEY_TYPE {
        return Err(DcapError::UnsupportedKeyType { key_type });
    }

    let (body_start, body_len) = match (version, kind) {
        (3, QuoteKind::Sgx) | (4, QuoteKind::Sgx) => (HEADER_LEN, SGX_REPORT_LEN),
        (4, QuoteKind::Tdx) => (HEADER_LEN, TD10_REPORT_LEN),
        (5, _) => {
            let descriptor_end = HEADER_LEN + BODY_DESCRIPTOR_LEN;
            let body_type =
                read_u16(bytes, HEADER_LEN).ok_or_else(|| truncated("body descriptor", descriptor_end, len))?;
            let body_size =
                read_u32(bytes, HEADER_LEN + 2).ok_or_else(|| truncated("body descriptor", descriptor_end, len))?;
            let body_len = match (body_type, kind) {
                (1, QuoteKind::Sgx) => SGX_REPORT_LEN,
                (2, QuoteKind::Tdx) => TD10_REPORT_LEN,
                (3, QuoteKind::Tdx) => TD15_REPORT_LEN,
                (4, QuoteKind::Tdx) => TD15_EX_REPORT_LEN,
                (1..=4, _) => {
                    return Err(DcapError::QuoteMalformed {
                        reason: format!("body type {body_type} does not belong in a {kind} quote"),
                    });
                }
                _ => return Err(DcapError::UnsupportedBodyType { body_type }),
            };
            if usize::try_from(body_size).ok() != Some(body_len) {
                return Err(DcapError::QuoteMalformed {
                    reason: format!("body type {body_type} is {body_len} bytes but the descriptor says {body_size}"),
                });
            }
            (descriptor_end, body_len)
        }
        _ => {
            return Err(DcapError::UnsupportedVersion {
                version,
                tee: kind,
                expected: match kind {
                    QuoteKind::Tdx => "4 or 5",
                    QuoteKind::Sgx => "3",
                },
            });
        }
    };
    let body_end = body_start + body_len;
    if len < body_end {
        return Err(truncated("report body", body_end, len));
    }
    let auth_len_end = body_end + 4;
    let auth_len = read_u32(bytes, body_end).ok_or_else(|| truncated("signature data length", auth_len_end, len))?;
    let end = usize::try_from(auth_len)
        .ok()
        .and_then(|n| auth_len_end.checked_add(n))
        .ok_or_else(|| truncated("signature data", usize::MAX, len))?;
    let signed = bytes.get(..end).ok_or_else(|| truncated("signature data", end, len))?;
    let rest = bytes.get(end..).unwrap_or_default();
    // Quotes read from a fixed-size buffer (TDX's configfs-tsm, Intel's
    // libraries) arrive zero-padded; anything else is not part of the quote
    // and must not ride along unsigned.
    if rest.iter().any(|b| *b != 0) {
        return Err(DcapError::TrailingBytes { offset: end });
    }
    let quote = Quote::parse(signed).map_err(|e| DcapError::QuoteMalformed { reason: format!("{e:#}") })?;
    Ok(ParsedQuote { kind, signed, padding: rest.len(), quote })
}

// ---------------------------------------------------------------------------
// Description
// ---------------------------------------------------------------------------

/// Lists every field of a DCAP quote, without verifying anything, for
/// `capsa evidence show`.
///
/// Each entry is `(name, value)`, in quote order. Names are dotted paths:
/// `header.*`, `body.*` (the enclave or TD report; `body.type` and
/// `body.size` only for version 5), `signature.*` (the signature data:
/// quote signature, attestation key, QE report, certification data) and
/// `padding` when zero bytes follow the quote. Byte fields are lower-case
/// hex, numbers decimal, TEE type and attribute words hex with a
/// reading in parentheses. Reserved fields are left out. The framing is
/// checked as for [`verify_quote`], so a malformed quote gives an error.
pub fn describe_quote(quote: &[u8]) -> Result<Vec<(String, String)>, DcapError> {
    let parsed = parse_quote(quote)?;
    let q = &parsed.quote;
    let h = &q.header;
    let mut out = Fields::default();

    out.push("header.version", h.version);
    out.push("header.attestation_key_type", format!("{} (ECDSA-256 with P-256)", h.attestation_key_type));
    out.push("header.tee_type", format!("{:#010x} ({})", h.tee_type, parsed.kind));
    out.push("header.qe_svn", h.qe_svn);
    out.push("header.pce_svn", h.pce_svn);
    out.push(
        "header.qe_vendor_id",
        if h.qe_vendor_id == dcap_qvl::INTEL_QE_VENDOR_ID {
            format!("{} (Intel)", hex::encode(h.qe_vendor_id))
        } else {
            hex::encode(h.qe_vendor_id)
        },
    );
    out.push("header.user_data", hex::encode(h.user_data));

    if h.version == 5 {
        let (body_type, size, name) = match &q.report {
            Report::SgxEnclave(_) => (1, SGX_REPORT_LEN, "SGX enclave report"),
            Report::TD10(_) => (2, TD10_REPORT_LEN, "TD report 1.0"),
            Report::TD15(_) => (3, TD15_REPORT_LEN, "TD report 1.5"),
            Report::TD15Ex(_) => (4, TD15_EX_REPORT_LEN, "TD report 1.5 extended"),
        };
        out.push("body.type", format!("{body_type} ({name})"));
        out.push("body.size", size);
    }
    match &q.report {
        Report::SgxEnclave(r) => describe_enclave_report(&mut out, "body", r),
        Report::TD10(r) => describe_td10(&mut out, r),
        Report::TD15(r) => {
            describe_td10(&mut out, &r.base);
            out.push("body.tee_tcb_svn2", hex::encode(r.tee_tcb_svn2));
            out.push("body.mr_service_td", hex::encode(r.mr_service_td));
        }
        Report::TD15Ex(r) => {
            describe_td10(&mut out, &r.base.base);
            out.push("body.tee_tcb_svn2", hex::encode(r.base.tee_tcb_svn2));
            out.push("body.mr_service_td", hex::encode(r.base.mr_service_td));
            out.push("body.vmid", r.vmid);
            out.push("body.td_id", hex::encode(r.td_id));
            out.push("body.dev_info", hex::encode(r.dev_info));
            out.push("body.init_service_td_hash", hex::encode(r.init_service_td_hash));
            out.push("body.init_service_td_attributes", hex::encode(r.init_service_td_attributes));
            out.push("body.init_cpu_svn", hex::encode(r.init_cpu_svn));
            out.push("body.init_tee_tcb_svn", hex::encode(r.init_tee_tcb_svn));
            out.push("body.init_tee_fmspc", hex::encode(r.init_tee_fmspc));
            out.push("body.cur_service_td_hash", hex::encode(r.cur_service_td_hash));
            out.push("body.cur_service_td_attributes", hex::encode(r.cur_service_td_attributes));
        }
    }

    match &q.auth_data {
        AuthData::V3(a) => {
            out.push("signature.ecdsa_signature", hex::encode(a.ecdsa_signature));
            out.push("signature.attestation_key", hex::encode(a.ecdsa_attestation_key));
            describe_qe_report(&mut out, &a.qe_report);
            out.push("signature.qe_report_signature", hex::encode(a.qe_report_signature));
            out.push("signature.qe_auth_data", hex::encode(&a.qe_auth_data.data));
            describe_cert_data(
                &mut out,
                "signature.certification_data",
                a.certification_data.cert_type,
                &a.certification_data.body.data,
            );
        }
        AuthData::V4(a) => {
            out.push("signature.ecdsa_signature", hex::encode(a.ecdsa_signature));
            out.push("signature.attestation_key", hex::encode(a.ecdsa_attestation_key));
            out.push("signature.certification_data.type", cert_type_name(a.certification_data.cert_type));
            out.push("signature.certification_data.size", a.certification_data.body.data.len());
            let inner = &a.qe_report_data;
            describe_qe_report(&mut out, &inner.qe_report);
            out.push("signature.qe_report_signature", hex::encode(inner.qe_report_signature));
            out.push("signature.qe_auth_data", hex::encode(&inner.qe_auth_data.data));
            describe_cert_data(
                &mut out,
                "signature.qe_certification_data",
                inner.certification_data.cert_type,
                &inner.certification_data.body.data,
            );
        }
    }
    if parsed.padding > 0 {
        out.push("padding", format!("{} zero bytes", parsed.padding));
    }
    Ok(out.0)
}

/// The list [`describe_quote`] builds.
#[derive(Default)]
struct Fields(Vec<(String, String)>);

impl Fields {
    fn push(&mut self, name: &str, value: impl ToString) {
        self.0.push((name.to_owned(), value.to_string()));
    }
}

fn describe_td10(out: &mut Fields, r: &TDReport10) {
    out.push("body.tee_tcb_svn", hex::encode(r.tee_tcb_svn));
    out.push("body.mr_seam", hex::encode(r.mr_seam));
    out.push("body.mr_signer_seam", hex::encode(r.mr_signer_seam));
    out.push("body.seam_attributes", hex::encode(r.seam_attributes));
    out.push(
        "body.td_attributes",
        format!("{} ({})", hex::encode(r.td_attributes), td_attribute_names(r.td_attributes)),
    );
    out.push("body.xfam", hex::encode(r.xfam));
    out.push("body.mr_td", hex::encode(r.mr_td));
    out.push("body.mr_config_id", hex::encode(r.mr_config_id));
    out.push("body.mr_owner", hex::encode(r.mr_owner));
    out.push("body.mr_owner_config", hex::encode(r.mr_owner_config));
    out.push("body.rtmr0", hex::encode(r.rt_mr0));
    out.push("body.rtmr1", hex::encode(r.rt_mr1));
    out.push("body.rtmr2", hex::encode(r.rt_mr2));
    out.push("body.rtmr3", hex::encode(r.rt_mr3));
    out.push("body.report_data", hex::encode(r.report_data));
}

/// Names the TDATTRIBUTES bits that are set, per Intel's TDX module ABI.
fn td_attribute_names(raw: [u8; 8]) -> String {
    let Ok(a) = TDAttributes::parse(raw) else {
        return "unreadable".to_owned();
    };
    let mut names = Vec::new();
    if a.tud & 0x01 != 0 {
        names.push("DEBUG");
    }
    if a.tud & 0x70 != 0 {
        names.push("PROFILING");
    }
    for (set, name) in [
        (a.sec.icssd, "ICSSD"),
        (a.sec.servtd_ext, "SERVTD_EXT"),
        (a.sec.lass, "LASS"),
        (a.sec.sept_ve_disable, "SEPT_VE_DISABLE"),
        (a.sec.migratable, "MIGRATABLE"),
        (a.sec.pks, "PKS"),
        (a.sec.kl, "KL"),
        (a.other.tpa, "TPA"),
        (a.other.perfmon, "PERFMON"),
        (a.reserved != 0, "RESERVED"),
    ] {
        if set {
            names.push(name);
        }
    }
    if names.is_empty() { "none".to_owned() } else { names.join(" ") }
}

fn describe_enclave_report(out: &mut Fields, prefix: &str, r: &EnclaveReport) {
    let name = |field: &str| format!("{prefix}.{field}");
    out.push(&name("cpu_svn"), hex::encode(r.cpu_svn));
    out.push(&name("misc_select"), format!("{:#010x}", r.misc_select));
    out.push(
        &name("attributes"),
        format!("{} ({})", hex::encode(r.attributes), if sgx_debug(r) { "DEBUG" } else { "not debug" }),
    );
    out.push(&name("mr_enclave"), hex::encode(r.mr_enclave));
    out.push(&name("mr_signer"), hex::encode(r.mr_signer));
    out.push(&name("isv_prod_id"), r.isv_prod_id);
    out.push(&name("isv_svn"), r.isv_svn);
    out.push(&name("report_data"), hex::encode(r.report_data));
}

/// The QE report is an SGX enclave report; dcap-qvl keeps it as raw bytes,
/// so its fields are read here at their fixed offsets (Intel SDM,
/// REPORTBODY).
fn describe_qe_report(out: &mut Fields, raw: &[u8; SGX_REPORT_LEN]) {
    fn field<const N: usize>(raw: &[u8], offset: usize) -> [u8; N] {
        raw.get(offset..offset + N).and_then(|s| s.try_into().ok()).unwrap_or([0; N])
    }
    let report = EnclaveReport {
        cpu_svn: field(raw, 0),
        misc_select: u32::from_le_bytes(field(raw, 16)),
        reserved1: field(raw, 20),
        attributes: field(raw, 48),
        mr_enclave: field(raw, 64),
        reserved2: field(raw, 96),
        mr_signer: field(raw, 128),
        reserved3: field(raw, 160),
        isv_prod_id: u16::from_le_bytes(field(raw, 256)),
        isv_svn: u16::from_le_bytes(field(raw, 258)),
        reserved4: field(raw, 260),
        report_data: field(raw, 320),
    };
    describe_enclave_report(out, "signature.qe_report", &report);
}

fn cert_type_name(cert_type: u16) -> String {
    let name = match cert_type {
        1 => "PPID in clear",
        2 => "PPID encrypted with RSA-2048-OAEP",
        3 => "PPID encrypted with RSA-3072-OAEP",
        4 => "PCK certificate",
        5 => "PCK certificate chain",
        6 => "QE report certification data",
        7 => "platform manifest",
        _ => "unknown",
    };
    format!("{cert_type} ({name})")
}

fn describe_cert_data(out: &mut Fields, prefix: &str, cert_type: u16, data: &[u8]) {
    out.push(&format!("{prefix}.type"), cert_type_name(cert_type));
    out.push(&format!("{prefix}.size"), data.len());
    if cert_type == CERT_TYPE_PCK_CHAIN {
        let marker = b"-----BEGIN CERTIFICATE-----";
        let count = data.windows(marker.len()).filter(|w| *w == marker).count();
        out.push(&format!("{prefix}.certificates"), count);
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const TDX_QUOTE: &[u8] = include_bytes!("../../../../shared/testdata/evidence/tdx/quote.bin");
    const TDX_COLLATERAL: &[u8] = include_bytes!("../../../../shared/testdata/evidence/tdx/collateral.json");
    const TDX_OUTDATED_QUOTE: &[u8] = include_bytes!("../../../../shared/testdata/evidence/tdx/quote-outdated.bin");
    const TDX_OUTDATED_COLLATERAL: &[u8] =
        include_bytes!("../../../../shared/testdata/evidence/tdx/collateral-outdated.json");
    const SGX_QUOTE: &[u8] = include_bytes!("../../../../shared/testdata/evidence/sgx/quote.bin");
    const SGX_COLLATERAL: &[u8] = include_bytes!("../../../../shared/testdata/evidence/sgx/collateral.json");

    // Instants inside each collateral's window. tdx/collateral.json covers
    // 2025-06-19T10:32:27Z (QE identity issued) to 2025-07-19T10:00:35Z (PCK
    // CRL next update); tdx/collateral-outdated.json 2026-02-18T10:58:51Z to
    // 2026-03-20T10:41:15Z; sgx/collateral.json 2025-06-19T10:56:11Z to
    // 2025-07-19T10:01:18Z.
    const TDX_AT: OffsetDateTime = datetime!(2025-07-01 00:00 UTC);
    const TDX_OUTDATED_AT: OffsetDateTime = datetime!(2026-03-01 00:00 UTC);
    const SGX_AT: OffsetDateTime = datetime!(2025-07-01 00:00 UTC);

    fn collateral(json: &[u8]) -> Collateral {
        Collateral::from_json(json).unwrap()
    }

    /// What dcap-qvl verified for a genuine fixture, before capsa's appraisal.
    fn verified(quote: &[u8], collateral_json: &[u8], at: OffsetDateTime) -> dcap_qvl::verify::VerifiedReport {
        let now_secs = u64::try_from(at.unix_timestamp()).unwrap();
        dcap_qvl::verify::QuoteVerifier::new_prod()
            .allow_debug(true)
            .verify(quote, &collateral(collateral_json).0, now_secs)
            .unwrap()
    }

    fn verify_tdx(quote: &[u8], appraisal: &DcapAppraisal) -> Result<Claims, DcapError> {
        verify_quote(QuoteKind::Tdx, quote, &collateral(TDX_COLLATERAL), TDX_AT, appraisal)
    }

    fn tdx_claims(claims: &Claims) -> &TdxClaims {
        match &claims.tee {
            TeeClaims::Tdx(tdx) => tdx,
            other => panic!("expected TDX claims, got {other:?}"),
        }
    }

    fn sgx_claims(claims: &Claims) -> &SgxClaims {
        match &claims.tee {
            TeeClaims::Sgx(sgx) => sgx,
            other => panic!("expected SGX claims, got {other:?}"),
        }
    }

    /// Offset of the quote's ECDSA signature: right after the body and the
    /// signature data length.
    fn signature_offset(quote: &[u8]) -> usize {
        let version = read_u16(quote, 0).unwrap();
        let body_end = match version {
            3 => HEADER_LEN + SGX_REPORT_LEN,
            4 => HEADER_LEN + TD10_REPORT_LEN,
            other => panic!("fixture has version {other}"),
        };
        body_end + 4
    }

    fn field<'a>(fields: &'a [(String, String)], name: &str) -> &'a str {
        fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no field {name}"))
    }

    #[test]
    fn collateral_windows_are_as_documented() {
        let (from, to) = collateral(TDX_COLLATERAL).valid_between().unwrap();
        assert_eq!((from, to), (datetime!(2025-06-19 10:32:27 UTC), datetime!(2025-07-19 10:00:35 UTC)));
        let (from, to) = collateral(TDX_OUTDATED_COLLATERAL).valid_between().unwrap();
        assert_eq!((from, to), (datetime!(2026-02-18 10:58:51 UTC), datetime!(2026-03-20 10:41:15 UTC)));
        let (from, to) = collateral(SGX_COLLATERAL).valid_between().unwrap();
        assert_eq!((from, to), (datetime!(2025-06-19 10:56:11 UTC), datetime!(2025-07-19 10:01:18 UTC)));
    }

    #[test]
    fn tdx_quote_verifies_and_surfaces_its_tcb_status() {
        let claims = verify_tdx(TDX_QUOTE, &DcapAppraisal::default()).unwrap();
        assert_eq!(claims.attestation_type, AttestationType::TdxVm);
        let tdx = tdx_claims(&claims);
        assert_eq!(tdx.tcb.status, "UpToDate");
        assert!(tdx.tcb.advisory_ids.is_empty());
        assert!(!tdx.tdx_td_attributes_debug);
        for (name, value, bytes) in [
            ("mrtd", &tdx.tdx_mrtd, 48),
            ("mrconfigid", &tdx.tdx_mrconfigid, 48),
            ("mrowner", &tdx.tdx_mrowner, 48),
            ("mrownerconfig", &tdx.tdx_mrownerconfig, 48),
            ("rtmr0", &tdx.tdx_rtmr0, 48),
            ("rtmr1", &tdx.tdx_rtmr1, 48),
            ("rtmr2", &tdx.tdx_rtmr2, 48),
            ("rtmr3", &tdx.tdx_rtmr3, 48),
            ("report_data", &tdx.tdx_report_data, 64),
            ("mrseam", &tdx.tdx_mrseam, 48),
            ("mrsignerseam", &tdx.tdx_mrsignerseam, 48),
            ("seam_attributes", &tdx.tdx_seam_attributes, 8),
            ("td_attributes", &tdx.tdx_td_attributes, 8),
            ("xfam", &tdx.tdx_xfam, 8),
            ("tee_tcb_svn", &tdx.tdx_tee_tcb_svn, 16),
        ] {
            assert_eq!(value.len(), 2 * bytes, "{name}");
            assert_eq!(*value, value.to_lowercase(), "{name}");
        }
        // The claims serialise with the TCB status under capsa's names.
        let json = serde_json::to_value(&claims).unwrap();
        assert_eq!(json["x-ms-attestation-type"], "tdxvm");
        assert_eq!(json["x-capsa-tcb-status"], "UpToDate");
    }

    #[test]
    fn outdated_tdx_quote_is_reported_out_of_date() {
        // This genuine quote's PCK certificate reports SGX TCB component 7 at
        // SVN 3 while every level of its TCB info demands 5: the platform is
        // older than any level Intel lists, so no status applies (Intel's
        // QVL: TCB level not supported) and capsa reports it out of date.
        let err = verify_quote(
            QuoteKind::Tdx,
            TDX_OUTDATED_QUOTE,
            &collateral(TDX_OUTDATED_COLLATERAL),
            TDX_OUTDATED_AT,
            &DcapAppraisal::default(),
        )
        .unwrap_err();
        assert!(matches!(err, DcapError::PlatformBelowAllTcbLevels), "{err}");
        assert!(!err.is_malformed());
        assert!(err.to_string().starts_with("TCB status OutOfDate"), "{err}");
    }

    #[test]
    fn debug_is_surfaced_and_refusable() {
        // Setting a debug bit in a genuine quote breaks its signature, so
        // the bit is set in what dcap-qvl verified instead.
        let refuse = DcapAppraisal { refuse_debug: true, ..DcapAppraisal::default() };
        for (bit, name) in [(0x01, "DEBUG"), (0x10, "profiling")] {
            let mut debug = verified(TDX_QUOTE, TDX_COLLATERAL, TDX_AT);
            match &mut debug.report {
                Report::TD10(r) => r.td_attributes[0] |= bit,
                other => panic!("fixture is {other:?}"),
            }
            let claims = appraise(QuoteKind::Tdx, debug.clone(), &DcapAppraisal::default()).unwrap();
            assert!(tdx_claims(&claims).tdx_td_attributes_debug, "{name}");
            let err = appraise(QuoteKind::Tdx, debug, &refuse).unwrap_err();
            assert_eq!(err.to_string(), "TD is debuggable and debug is refused");
            assert!(!err.is_malformed());
        }

        let mut debug = verified(SGX_QUOTE, SGX_COLLATERAL, SGX_AT);
        match &mut debug.report {
            Report::SgxEnclave(r) => r.attributes[0] |= 0x02,
            other => panic!("fixture is {other:?}"),
        }
        let claims = appraise(QuoteKind::Sgx, debug.clone(), &DcapAppraisal::default()).unwrap();
        assert!(sgx_claims(&claims).is_debuggable);
        let err = appraise(QuoteKind::Sgx, debug, &refuse).unwrap_err();
        assert_eq!(err.to_string(), "enclave is debuggable and debug is refused");
    }

    #[test]
    fn out_of_date_status_is_surfaced_and_refusable() {
        // No genuine fixture is OutOfDate (see above), so take what dcap-qvl
        // verified for the TDX quote and give it the status and advisories
        // of the outdated collateral's OutOfDate level.
        let verified = verified(TDX_QUOTE, TDX_COLLATERAL, TDX_AT);
        let advisories = vec!["INTEL-SA-01036".to_owned(), "INTEL-SA-01099".to_owned()];
        let outdated = dcap_qvl::verify::VerifiedReport {
            status: "OutOfDate".to_owned(),
            advisory_ids: advisories.clone(),
            ..verified
        };

        let claims = appraise(QuoteKind::Tdx, outdated.clone(), &DcapAppraisal::default()).unwrap();
        let tdx = tdx_claims(&claims);
        assert_eq!(tdx.tcb.status, "OutOfDate");
        assert_eq!(tdx.tcb.advisory_ids, advisories);

        let strict = DcapAppraisal {
            accepted_tcb_statuses: Some(vec!["SWHardeningNeeded".to_owned()]),
            ..DcapAppraisal::default()
        };
        let err = appraise(QuoteKind::Tdx, outdated.clone(), &strict).unwrap_err();
        assert!(
            matches!(&err, DcapError::TcbStatusNotAccepted { status, advisory_ids }
                if status == "OutOfDate" && *advisory_ids == advisories),
            "{err}"
        );
        assert!(!err.is_malformed());
        assert_eq!(
            err.to_string(),
            "TCB status OutOfDate is not accepted (advisories: INTEL-SA-01036, INTEL-SA-01099); \
             update the platform or accept the status explicitly"
        );

        let lenient =
            DcapAppraisal { accepted_tcb_statuses: Some(vec!["OutOfDate".to_owned()]), ..DcapAppraisal::default() };
        assert_eq!(appraise(QuoteKind::Tdx, outdated, &lenient).unwrap(), claims);
    }

    #[test]
    fn sgx_quote_verifies() {
        let claims =
            verify_quote(QuoteKind::Sgx, SGX_QUOTE, &collateral(SGX_COLLATERAL), SGX_AT, &DcapAppraisal::default())
                .unwrap();
        assert_eq!(claims.attestation_type, AttestationType::Sgx);
        let sgx = sgx_claims(&claims);
        assert!(!sgx.tcb.status.is_empty());
        assert_eq!(sgx.mrenclave.len(), 64);
        assert_eq!(sgx.mrsigner.len(), 64);
        assert_eq!(sgx.report_data.len(), 128);
        assert_eq!(sgx.cpu_svn.len(), 32);
        assert_eq!(sgx.attributes.len(), 32);
        // Intel's TCB info for this platform says configuration and
        // software hardening are needed; verification surfaces that.
        assert_eq!(sgx.tcb.status, "ConfigurationAndSWHardeningNeeded");
        assert!(!sgx.tcb.advisory_ids.is_empty());

        let strict = DcapAppraisal {
            accepted_tcb_statuses: Some(vec!["SWHardeningNeeded".to_owned()]),
            ..DcapAppraisal::default()
        };
        let err = verify_quote(QuoteKind::Sgx, SGX_QUOTE, &collateral(SGX_COLLATERAL), SGX_AT, &strict).unwrap_err();
        assert!(
            matches!(&err, DcapError::TcbStatusNotAccepted { status, advisory_ids }
                if status == "ConfigurationAndSWHardeningNeeded"
                    && *advisory_ids == sgx.tcb.advisory_ids),
            "{err}"
        );
    }

    #[test]
    fn sgx_reference_values_are_checked() {
        let sgx_collateral = collateral(SGX_COLLATERAL);
        let verify =
            |appraisal: &DcapAppraisal| verify_quote(QuoteKind::Sgx, SGX_QUOTE, &sgx_collateral, SGX_AT, appraisal);
        let claims = verify(&DcapAppraisal::default()).unwrap();
        let sgx = sgx_claims(&claims).clone();
        let mrenclave: [u8; 32] = hex::decode(&sgx.mrenclave).unwrap().try_into().unwrap();
        let mrsigner: [u8; 32] = hex::decode(&sgx.mrsigner).unwrap().try_into().unwrap();
        let pinned = DcapAppraisal {
            expected_mrenclave: Some(vec![[0; 32], mrenclave]),
            expected_mrsigner: Some(vec![mrsigner]),
            expected_isv_prod_id: Some(sgx.product_id),
            min_isv_svn: Some(sgx.svn),
            ..DcapAppraisal::default()
        };
        verify(&pinned).unwrap();

        let err = verify(&DcapAppraisal { expected_mrenclave: Some(vec![[0; 32]]), ..pinned.clone() }).unwrap_err();
        assert!(matches!(err, DcapError::MeasurementNotExpected { field: "MRENCLAVE", .. }), "{err}");
        let err = verify(&DcapAppraisal { min_isv_svn: Some(sgx.svn.saturating_add(1)), ..pinned.clone() });
        if sgx.svn < u16::MAX {
            assert!(matches!(err, Err(DcapError::SvnTooLow { .. })));
        }
        let err =
            verify(&DcapAppraisal { expected_mrtd: Some(vec![[0; 48]]), ..DcapAppraisal::default() }).unwrap_err();
        assert!(matches!(err, DcapError::InapplicableReference { field: "MRTD", .. }), "{err}");
        assert!(err.is_malformed());
    }

    #[test]
    fn tdx_reference_values_are_checked() {
        let claims = verify_tdx(TDX_QUOTE, &DcapAppraisal::default()).unwrap();
        let tdx = tdx_claims(&claims);
        let mrtd: [u8; 48] = hex::decode(&tdx.tdx_mrtd).unwrap().try_into().unwrap();
        let mrconfigid: [u8; 48] = hex::decode(&tdx.tdx_mrconfigid).unwrap().try_into().unwrap();
        let report_data: [u8; 64] = hex::decode(&tdx.tdx_report_data).unwrap().try_into().unwrap();
        let pinned = DcapAppraisal {
            accepted_tcb_statuses: Some(vec![]),
            refuse_debug: true,
            expected_report_data: Some(report_data),
            expected_mrtd: Some(vec![mrtd]),
            expected_mrconfigid: Some(vec![mrconfigid]),
            ..DcapAppraisal::default()
        };
        assert_eq!(verify_tdx(TDX_QUOTE, &pinned).unwrap(), claims);

        let mut other = mrtd;
        other[0] ^= 1;
        let err =
            verify_tdx(TDX_QUOTE, &DcapAppraisal { expected_mrtd: Some(vec![other]), ..pinned.clone() }).unwrap_err();
        assert!(matches!(err, DcapError::MeasurementNotExpected { field: "MRTD", .. }), "{err}");
        assert!(!err.is_malformed());
        assert!(err.to_string().starts_with(&format!("MRTD {}", tdx.tdx_mrtd)), "{err}");

        let err = verify_tdx(TDX_QUOTE, &DcapAppraisal { expected_report_data: Some([0xaa; 64]), ..pinned.clone() })
            .unwrap_err();
        assert!(matches!(err, DcapError::ReportDataMismatch { .. }), "{err}");

        let err = verify_tdx(
            TDX_QUOTE,
            &DcapAppraisal { expected_mrenclave: Some(vec![[0; 32]]), ..DcapAppraisal::default() },
        )
        .unwrap_err();
        assert!(matches!(err, DcapError::InapplicableReference { field: "MRENCLAVE", .. }), "{err}");

        let err = verify_tdx(
            TDX_QUOTE,
            &DcapAppraisal { accepted_tcb_statuses: Some(vec!["OutofDate".to_owned()]), ..DcapAppraisal::default() },
        )
        .unwrap_err();
        assert!(matches!(err, DcapError::UnknownTcbStatus { .. }), "{err}");
    }

    #[test]
    fn quote_of_the_other_kind_is_refused() {
        let err =
            verify_quote(QuoteKind::Tdx, SGX_QUOTE, &collateral(SGX_COLLATERAL), SGX_AT, &DcapAppraisal::default())
                .unwrap_err();
        assert!(matches!(err, DcapError::WrongKind { expected: QuoteKind::Tdx, found: QuoteKind::Sgx }), "{err}");
        assert_eq!(err.to_string(), "quote is an SGX quote but a TDX quote was expected (check --tee)");
        assert!(err.is_malformed());

        let err =
            verify_quote(QuoteKind::Sgx, TDX_QUOTE, &collateral(TDX_COLLATERAL), TDX_AT, &DcapAppraisal::default())
                .unwrap_err();
        assert!(matches!(err, DcapError::WrongKind { expected: QuoteKind::Sgx, found: QuoteKind::Tdx }), "{err}");
    }

    #[test]
    fn collateral_for_another_platform_is_refused() {
        // Genuine collateral, but for the other TDX platform (another FMSPC).
        let err = verify_quote(
            QuoteKind::Tdx,
            TDX_QUOTE,
            &collateral(TDX_OUTDATED_COLLATERAL),
            TDX_OUTDATED_AT,
            &DcapAppraisal::default(),
        )
        .unwrap_err();
        assert!(matches!(err, DcapError::VerificationFailed { .. }), "{err}");
    }

    #[test]
    fn flipped_body_byte_is_refused() {
        // A byte of MRTD, inside the signed TD report.
        let mut quote = TDX_QUOTE.to_vec();
        quote[HEADER_LEN + 136] ^= 0x01;
        let err = verify_tdx(&quote, &DcapAppraisal::default()).unwrap_err();
        assert!(matches!(err, DcapError::VerificationFailed { .. }), "{err}");
        assert!(!err.is_malformed());

        let mut quote = SGX_QUOTE.to_vec();
        quote[HEADER_LEN + 64] ^= 0x80;
        let err = verify_quote(QuoteKind::Sgx, &quote, &collateral(SGX_COLLATERAL), SGX_AT, &DcapAppraisal::default())
            .unwrap_err();
        assert!(matches!(err, DcapError::VerificationFailed { .. }), "{err}");
    }

    #[test]
    fn flipped_signature_byte_is_refused() {
        let offset = signature_offset(TDX_QUOTE);
        for delta in [0, 40] {
            let mut quote = TDX_QUOTE.to_vec();
            quote[offset + delta] ^= 0x01;
            let err = verify_tdx(&quote, &DcapAppraisal::default()).unwrap_err();
            assert!(matches!(err, DcapError::VerificationFailed { .. }), "{err}");
        }
        let mut quote = SGX_QUOTE.to_vec();
        quote[signature_offset(SGX_QUOTE) + 10] ^= 0x01;
        let err = verify_quote(QuoteKind::Sgx, &quote, &collateral(SGX_COLLATERAL), SGX_AT, &DcapAppraisal::default())
            .unwrap_err();
        assert!(matches!(err, DcapError::VerificationFailed { .. }), "{err}");
    }

    #[test]
    fn flipped_collateral_signature_is_refused() {
        let mut json: serde_json::Value = serde_json::from_slice(TDX_COLLATERAL).unwrap();
        let sig = json["tcb_info_signature"].as_str().unwrap().to_owned();
        let flipped = format!("{}{}", if sig.starts_with('0') { "1" } else { "0" }, &sig[1..]);
        json["tcb_info_signature"] = flipped.into();
        let tampered = Collateral::from_json(&serde_json::to_vec(&json).unwrap()).unwrap();
        let err = verify_quote(QuoteKind::Tdx, TDX_QUOTE, &tampered, TDX_AT, &DcapAppraisal::default()).unwrap_err();
        assert!(matches!(err, DcapError::VerificationFailed { .. }), "{err}");
    }

    #[test]
    fn instant_outside_the_collateral_window_is_refused() {
        let tdx = collateral(TDX_COLLATERAL);
        for at in [
            datetime!(2025-07-19 10:00:36 UTC),
            datetime!(2025-08-01 00:00 UTC),
            datetime!(2026-03-01 00:00 UTC),
            datetime!(2025-06-19 10:32:26 UTC),
        ] {
            let err = verify_quote(QuoteKind::Tdx, TDX_QUOTE, &tdx, at, &DcapAppraisal::default()).unwrap_err();
            assert!(matches!(err, DcapError::CollateralNotValidAt { .. }), "{err}");
            assert!(!err.is_malformed());
        }
        let err =
            verify_quote(QuoteKind::Tdx, TDX_QUOTE, &tdx, datetime!(2025-08-01 00:00 UTC), &DcapAppraisal::default())
                .unwrap_err();
        assert!(err.to_string().contains("it covers 2025-06-19T10:32:27Z to 2025-07-19T10:00:35Z"), "{err}");
        // The window includes its start and excludes its end, as webpki
        // counts CRL validity.
        for at in [datetime!(2025-06-19 10:32:27 UTC), datetime!(2025-07-19 10:00:34 UTC)] {
            verify_quote(QuoteKind::Tdx, TDX_QUOTE, &tdx, at, &DcapAppraisal::default()).unwrap();
        }
        let err = verify_quote(
            QuoteKind::Tdx,
            TDX_QUOTE,
            &tdx,
            datetime!(2025-07-19 10:00:35 UTC),
            &DcapAppraisal::default(),
        )
        .unwrap_err();
        assert!(matches!(err, DcapError::CollateralNotValidAt { .. }), "{err}");
        let err = verify_quote(
            QuoteKind::Tdx,
            TDX_QUOTE,
            &tdx,
            datetime!(1969-12-31 23:59:59 UTC),
            &DcapAppraisal::default(),
        )
        .unwrap_err();
        assert!(matches!(err, DcapError::InstantOutOfRange { .. }), "{err}");
    }

    #[test]
    fn truncated_quotes_give_errors() {
        let tdx = collateral(TDX_COLLATERAL);
        let sgx = collateral(SGX_COLLATERAL);
        for (kind, quote, collateral, at) in [
            (QuoteKind::Tdx, TDX_QUOTE, &tdx, TDX_AT),
            (QuoteKind::Tdx, TDX_OUTDATED_QUOTE, &tdx, TDX_AT),
            (QuoteKind::Sgx, SGX_QUOTE, &sgx, SGX_AT),
        ] {
            let end = quote.len() - parse_quote(quote).unwrap().padding;
            for len in 0..end {
                let prefix = &quote[..len];
                let err = describe_quote(prefix).unwrap_err();
                assert!(err.is_malformed(), "{len}: {err}");
                let err = verify_quote(kind, prefix, collateral, at, &DcapAppraisal::default()).unwrap_err();
                assert!(err.is_malformed(), "{len}: {err}");
            }
        }
        assert!(matches!(
            describe_quote(&TDX_QUOTE[..100]),
            Err(DcapError::QuoteTruncated { part: "report body", needed: 632, found: 100 })
        ));
    }

    #[test]
    fn padding_is_accepted_and_trailing_data_refused() {
        let parsed = parse_quote(TDX_QUOTE).unwrap();
        let end = TDX_QUOTE.len() - parsed.padding;
        verify_tdx(&TDX_QUOTE[..end], &DcapAppraisal::default()).unwrap();

        let mut quote = SGX_QUOTE.to_vec();
        quote.extend_from_slice(&[0; 100]);
        quote.push(1);
        let err = describe_quote(&quote).unwrap_err();
        assert!(matches!(err, DcapError::TrailingBytes { offset } if offset == SGX_QUOTE.len()), "{err}");
        assert!(err.is_malformed());
    }

    #[test]
    fn malformed_headers_are_reported_as_such() {
        let mut quote = TDX_QUOTE.to_vec();
        quote[0] = 9;
        assert!(matches!(describe_quote(&quote), Err(DcapError::UnsupportedVersion { version: 9, .. })));
        let mut quote = TDX_QUOTE.to_vec();
        quote[4] = 0x7f;
        assert!(matches!(describe_quote(&quote), Err(DcapError::UnsupportedTeeType { tee_type: 0x7f })));
        let mut quote = TDX_QUOTE.to_vec();
        quote[2] = 3;
        assert!(matches!(describe_quote(&quote), Err(DcapError::UnsupportedKeyType { key_type: 3 })));
        let mut quote = TDX_QUOTE.to_vec();
        // A signature data length far beyond the input.
        let at = HEADER_LEN + TD10_REPORT_LEN;
        quote[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = describe_quote(&quote).unwrap_err();
        assert!(matches!(err, DcapError::QuoteTruncated { part: "signature data", .. }), "{err}");
        let err = describe_quote(&vec![0; MAX_QUOTE_LEN + 1]).unwrap_err();
        assert!(matches!(err, DcapError::QuoteTooLarge { .. }), "{err}");
    }

    #[test]
    fn no_single_byte_flip_panics() {
        // Every byte of every fixture, flipped, goes through the parser; a
        // sample of them through full verification.
        let tdx = collateral(TDX_COLLATERAL);
        for (kind, quote, collateral, at) in [
            (QuoteKind::Tdx, TDX_QUOTE, &tdx, TDX_AT),
            (QuoteKind::Sgx, SGX_QUOTE, &collateral(SGX_COLLATERAL), SGX_AT),
        ] {
            let end = quote.len() - parse_quote(quote).unwrap().padding;
            for i in 0..end {
                let mut tampered = quote.to_vec();
                tampered[i] ^= 0xff;
                let _ = describe_quote(&tampered);
                // The header, body, quote signature and attestation key are
                // all covered by signatures; some bytes of the PEM armour of
                // the certification data are not, and need not be.
                let signed = i < signature_offset(quote) + 128;
                if i % 61 == 0 && signed || i < HEADER_LEN + 8 {
                    assert!(
                        verify_quote(kind, &tampered, collateral, at, &DcapAppraisal::default()).is_err(),
                        "flip at {i} verified"
                    );
                }
            }
        }
    }

    #[test]
    fn garbage_collateral_is_malformed() {
        for json in [&b"not json"[..], b"{}", b"[1, 2, 3]", b"", &TDX_COLLATERAL[..TDX_COLLATERAL.len() / 2]] {
            let err = Collateral::from_json(json).unwrap_err();
            assert!(matches!(err, DcapError::CollateralJson { .. }), "{err}");
            assert!(err.is_malformed());
            assert!(err.to_string().contains("QuoteCollateralV3"), "{err}");
        }
        let mut json: serde_json::Value = serde_json::from_slice(TDX_COLLATERAL).unwrap();
        json["tcb_info"] = "{\"id\": \"TDX\"}".into();
        let err = Collateral::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(matches!(err, DcapError::CollateralField { field: "tcb_info", .. }), "{err}");
        let mut json: serde_json::Value = serde_json::from_slice(TDX_COLLATERAL).unwrap();
        json["pck_crl"] = "00".into();
        let err = Collateral::from_json(&serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(matches!(err, DcapError::CollateralField { field: "pck_crl", .. }), "{err}");
        assert!(err.is_malformed());
    }

    #[test]
    fn describe_lists_header_body_and_signature() {
        let fields = describe_quote(TDX_QUOTE).unwrap();
        let claims = verify_tdx(TDX_QUOTE, &DcapAppraisal::default()).unwrap();
        let tdx = tdx_claims(&claims);
        assert_eq!(field(&fields, "header.version"), "4");
        assert_eq!(field(&fields, "header.tee_type"), "0x00000081 (TDX)");
        assert!(field(&fields, "header.qe_vendor_id").ends_with("(Intel)"));
        assert_eq!(field(&fields, "body.mr_td"), tdx.tdx_mrtd);
        assert_eq!(field(&fields, "body.mr_config_id"), tdx.tdx_mrconfigid);
        assert_eq!(field(&fields, "body.rtmr3"), tdx.tdx_rtmr3);
        assert_eq!(field(&fields, "body.report_data"), tdx.tdx_report_data);
        assert!(field(&fields, "body.td_attributes").contains("SEPT_VE_DISABLE"));
        assert_eq!(field(&fields, "signature.qe_certification_data.type"), "5 (PCK certificate chain)");
        assert_eq!(field(&fields, "signature.qe_certification_data.certificates"), "3");
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.len(), names.iter().collect::<std::collections::BTreeSet<_>>().len());

        let fields = describe_quote(SGX_QUOTE).unwrap();
        let claims =
            verify_quote(QuoteKind::Sgx, SGX_QUOTE, &collateral(SGX_COLLATERAL), SGX_AT, &DcapAppraisal::default())
                .unwrap();
        let sgx = sgx_claims(&claims);
        assert_eq!(field(&fields, "header.version"), "3");
        assert_eq!(field(&fields, "header.tee_type"), "0x00000000 (SGX)");
        assert_eq!(field(&fields, "body.mr_enclave"), sgx.mrenclave);
        assert_eq!(field(&fields, "body.mr_signer"), sgx.mrsigner);
        assert_eq!(field(&fields, "body.isv_svn"), sgx.svn.to_string());
        assert_eq!(field(&fields, "signature.certification_data.type"), "5 (PCK certificate chain)");
        // The QE's MRSIGNER is Intel's.
        assert_eq!(
            field(&fields, "signature.qe_report.mr_signer"),
            "8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff"
        );

        let fields = describe_quote(TDX_OUTDATED_QUOTE).unwrap();
        assert_eq!(field(&fields, "header.version"), "5");
        assert_eq!(field(&fields, "body.type"), "3 (TD report 1.5)");
        assert_eq!(field(&fields, "body.tee_tcb_svn2"), "0d010300000000000000000000000000");
    }
}
