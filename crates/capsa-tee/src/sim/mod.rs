//! The sim platform: a software stand-in for AMD's SEV-SNP security
//! processor, so that the whole capsa pipeline runs on machines without TEE
//! hardware.
//!
//! **The sim gives no confidentiality and no integrity against the host.**
//! Its private keys are ordinary files in the user's state directory, and
//! whoever can read them can sign any report. It exists for development, CI
//! and demos: every byte of the pipeline (launch measurement, HOST_DATA,
//! report, certificate chain, verifier, token, key release) is exercised
//! exactly as on hardware, but nothing it attests is protected.
//!
//! The module owns:
//!
//! - a root of trust (ARK → ASK → VCEK) in the same certificate profile as
//!   AMD's KDS: RSA-4096 ARK and ASK signing RSASSA-PSS/SHA-384, an ECDSA
//!   P-384 VCEK carrying AMD's TCB and hardware-ID extensions. The only
//!   difference is the organisation name, [`SIM_ORGANIZATION`], by which the
//!   verifier recognises a sim root and refuses it unless told to allow sim
//!   evidence;
//! - the state directory holding that root ([`SimPlatform::init`],
//!   [`SimPlatform::load`]);
//! - reports in the exact SEV-SNP ATTESTATION_REPORT layout (version 3,
//!   Genoa), signed with the VCEK ([`SimPlatform::report`]).
//!
//! Verification is not here: sim evidence goes through [`crate::snp`] like
//! hardware evidence, with the sim's ARK as the trusted root.
//!
//! ```no_run
//! use capsa_tee::sim::{ReportRequest, SimPlatform};
//! # fn main() -> Result<(), capsa_tee::sim::SimError> {
//! let sim = SimPlatform::init(&SimPlatform::default_dir()?)?;
//! let report = sim.report(&ReportRequest {
//!     measurement: [0x11; 48],
//!     host_data: [0x22; 32],
//!     report_data: [0x33; 64],
//!     policy_debug: false,
//!     vmpl: 0,
//! })?;
//! assert_eq!(report.len(), 1184);
//! let vcek_pem = sim.vcek_pem(); // goes with the report to the verifier
//! # let _ = vcek_pem;
//! # Ok(()) }
//! ```
//!
//! State directory layout (`capsa sim init`): `ark.key`, `ask.key`,
//! `vcek.key` (PKCS#8 DER, mode 0600), `ark.pem`, `ask.pem`, `vcek.pem`, and
//! `platform.json` (chip id and TCB), in a directory of mode 0700.

mod certs;
mod report;
mod store;

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use der::pem::LineEnding;
use der::{DecodePem, Encode, EncodePem};
use x509_cert::Certificate;
use zeroize::Zeroizing;

use store::{Created, NewFile, PlatformFile};

/// The O= attribute of every sim certificate, in place of AMD's
/// `Advanced Micro Devices`. A verifier recognises a sim root by it and must
/// refuse sim evidence unless the caller explicitly allows it.
pub const SIM_ORGANIZATION: &str = "capsa sim platform (no hardware protection)";

/// Environment variable that overrides the state directory.
const DIR_ENV: &str = "CAPSA_SIM_DIR";

/// Why the sim platform could not be created, loaded or asked for a report.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// No state directory is configured and none can be derived.
    #[error(
        "cannot choose a directory for the sim platform: none of CAPSA_SIM_DIR, XDG_STATE_HOME or HOME is set; set CAPSA_SIM_DIR"
    )]
    NoStateDir,
    /// The state directory does not exist (or is empty).
    #[error("no sim platform at {}: run `capsa sim init` to create one", dir.display())]
    NotInitialized {
        /// The directory looked in.
        dir: PathBuf,
    },
    /// The state directory lacks a file a complete platform has.
    #[error(
        "the sim platform at {} is incomplete ({missing} is missing): move the directory away and run `capsa sim init`",
        dir.display()
    )]
    Incomplete {
        /// The state directory.
        dir: PathBuf,
        /// The missing file's name.
        missing: &'static str,
    },
    /// The path given as state directory cannot be one.
    #[error("{} cannot hold a sim platform: it is not a directory path; point CAPSA_SIM_DIR at a directory", dir.display())]
    BadDirectory {
        /// The path given.
        dir: PathBuf,
    },
    /// A private key is accessible to group or others.
    #[error(
        "private key {} is accessible to group or others (mode {mode:03o}); run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A state file is larger than any the sim writes.
    #[error(
        "{} is larger than {limit} bytes, more than any sim platform file: move the directory away and run `capsa sim init`",
        path.display()
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The size limit for it.
        limit: usize,
    },
    /// A state file does not parse.
    #[error("{} is damaged ({reason}): move the directory away and run `capsa sim init`", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// State files parse but do not belong together.
    #[error(
        "the sim platform at {} is inconsistent ({reason}): move the directory away and run `capsa sim init`",
        dir.display()
    )]
    Inconsistent {
        /// The state directory.
        dir: PathBuf,
        /// What does not match.
        reason: &'static str,
    },
    /// A file system operation failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The request names a VMPL that does not exist.
    #[error("vmpl {vmpl} does not exist: SEV-SNP has vmpls 0 to 3")]
    InvalidVmpl {
        /// The VMPL requested.
        vmpl: u32,
    },
    /// The system clock is before 1970 or beyond what certificates express.
    #[error("the system clock is outside the range certificates can express: check the clock")]
    Clock,
    /// The cryptographic library failed (an internal error).
    #[error("internal error: the crypto library failed while {0}")]
    Crypto(&'static str),
    /// Encoding a certificate failed (an internal error).
    #[error("internal error: cannot encode a certificate: {0}")]
    Der(#[from] der::Error),
    /// An invariant of this module does not hold (a bug).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

/// Security patch levels of the sim chip, as Milan and Genoa encode a TCB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tcb {
    pub(crate) bootloader: u8,
    pub(crate) tee: u8,
    pub(crate) snp: u8,
    pub(crate) microcode: u8,
}

impl Tcb {
    /// Levels seen on Genoa hosts with 2024-era firmware.
    pub(crate) const GENOA_DEFAULT: Tcb = Tcb { bootloader: 10, tee: 0, snp: 23, microcode: 72 };

    /// TCB_VERSION bytes for Milan and Genoa: bootloader, TEE, four reserved,
    /// SNP, microcode.
    pub(crate) fn to_le_bytes(self) -> [u8; 8] {
        [self.bootloader, self.tee, 0, 0, 0, 0, self.snp, self.microcode]
    }
}

/// Private key bytes, zeroed when dropped and never shown by `Debug`.
#[derive(Clone)]
pub(crate) struct SecretBytes(Zeroizing<Vec<u8>>);

impl SecretBytes {
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    pub(crate) fn as_mut_vec(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl AsRef<[u8]> for SecretBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([redacted; {} bytes])", self.0.len())
    }
}

/// The chip a state directory imitates.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    chip_id: [u8; 64],
    tcb: Tcb,
}

/// What the guest and host put into a report; the sim fills in the rest as a
/// Genoa security processor would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRequest {
    /// MEASUREMENT: the launch digest of what the launcher started.
    pub measurement: [u8; 48],
    /// HOST_DATA: set by the host at launch (capsa puts the initdata digest here).
    pub host_data: [u8; 32],
    /// REPORT_DATA: chosen by the guest, typically binding a key or a nonce.
    pub report_data: [u8; 64],
    /// Whether the guest policy allows debugging (POLICY bit 19).
    pub policy_debug: bool,
    /// VMPL the report is requested at, 0 to 3.
    pub vmpl: u32,
}

impl Default for ReportRequest {
    fn default() -> Self {
        Self { measurement: [0; 48], host_data: [0; 32], report_data: [0; 64], policy_debug: false, vmpl: 0 }
    }
}

/// A loaded sim platform: its certificates, its chip identity and the VCEK
/// private key it signs reports with.
pub struct SimPlatform {
    dir: PathBuf,
    identity: Identity,
    ark_der: Vec<u8>,
    ask_der: Vec<u8>,
    vcek_der: Vec<u8>,
    vcek_pem: String,
    chain_pem: String,
    // aws-lc clears key material when it frees it, so the parsed key needs
    // no wrapper of its own; its Debug shows only the public key.
    vcek_key: EcdsaKeyPair,
}

impl fmt::Debug for SimPlatform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimPlatform")
            .field("dir", &self.dir)
            .field("chip_id", &hex::encode(self.identity.chip_id))
            .field("tcb", &self.identity.tcb)
            .finish_non_exhaustive()
    }
}

impl SimPlatform {
    /// The state directory to use: `$CAPSA_SIM_DIR` if set, else
    /// `$XDG_STATE_HOME/capsa/sim`, else `$HOME/.local/state/capsa/sim`.
    pub fn default_dir() -> Result<PathBuf, SimError> {
        state_dir_from(std::env::var_os(DIR_ENV), std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME"))
    }

    /// Creates a sim platform in `dir` (a new chip id, a new ARK, ASK and
    /// VCEK), or loads the one already there: running it twice changes
    /// nothing. `dir` may exist if it is empty.
    ///
    /// Generating two RSA-4096 keys takes a few seconds.
    pub fn init(dir: &Path) -> Result<SimPlatform, SimError> {
        Self::init_with(dir, || {
            let mut chip_id = [0u8; 64];
            aws_lc_rs::rand::fill(&mut chip_id).map_err(|_| SimError::Crypto("drawing a chip id"))?;
            let identity = Identity { chip_id, tcb: Tcb::GENOA_DEFAULT };
            let root = certs::generate(SystemTime::now(), &identity.chip_id, identity.tcb)?;
            Ok((identity, root))
        })
    }

    fn init_with(
        dir: &Path,
        generate: impl FnOnce() -> Result<(Identity, certs::RootOfTrust), SimError>,
    ) -> Result<SimPlatform, SimError> {
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(SimError::BadDirectory { dir: dir.to_path_buf() });
            }
            Ok(_) if dir.join(store::PLATFORM_JSON).exists() => return Self::load(dir),
            Ok(_) if !is_empty_dir(dir)? => {
                return Err(SimError::Incomplete { dir: dir.to_path_buf(), missing: store::PLATFORM_JSON });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SimError::Io { op: "inspect", path: dir.to_path_buf(), source });
            }
        }

        let (identity, root) = generate()?;
        let platform = serde_json::to_vec_pretty(&PlatformFile {
            format: store::PLATFORM_FORMAT,
            product: certs::PRODUCT_LINE.to_owned(),
            chip_id: hex::encode(identity.chip_id),
            tcb: identity.tcb.into(),
        })
        .map_err(|_| SimError::Internal("serialising platform.json"))?;
        let ark_pem = certificate_pem(&root.ark_der)?;
        let ask_pem = certificate_pem(&root.ask_der)?;
        let vcek_pem = certificate_pem(&root.vcek_der)?;
        let files = [
            NewFile { name: store::ARK_KEY, contents: root.ark_key.as_ref(), private: true },
            NewFile { name: store::ASK_KEY, contents: root.ask_key.as_ref(), private: true },
            NewFile { name: store::VCEK_KEY, contents: root.vcek_key.as_ref(), private: true },
            NewFile { name: store::ARK_PEM, contents: ark_pem.as_bytes(), private: false },
            NewFile { name: store::ASK_PEM, contents: ask_pem.as_bytes(), private: false },
            NewFile { name: store::VCEK_PEM, contents: vcek_pem.as_bytes(), private: false },
            NewFile { name: store::PLATFORM_JSON, contents: &platform, private: false },
        ];
        match store::create_dir_atomically(dir, &files)? {
            // Either way, load what is on disk: it is what later runs will see.
            Created::Ours | Created::Theirs => Self::load(dir),
        }
    }

    /// Loads the sim platform in `dir`, checking that its files belong
    /// together and that no private key is accessible to group or others.
    pub fn load(dir: &Path) -> Result<SimPlatform, SimError> {
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(SimError::BadDirectory { dir: dir.to_path_buf() });
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SimError::NotInitialized { dir: dir.to_path_buf() });
            }
            Err(source) => {
                return Err(SimError::Io { op: "inspect", path: dir.to_path_buf(), source });
            }
        }
        if is_empty_dir(dir)? {
            return Err(SimError::NotInitialized { dir: dir.to_path_buf() });
        }

        // Key permissions first: a leaked key is the most important thing
        // to report, whatever else may be wrong.
        let vcek_key = store::read_private(dir, store::VCEK_KEY)?;
        // ARK and ASK keys sign only at init; they stay on disk.
        store::check_private(dir, store::ARK_KEY)?;
        store::check_private(dir, store::ASK_KEY)?;

        let identity = read_identity(dir)?;
        let ark_der = read_certificate(dir, store::ARK_PEM)?;
        let ask_der = read_certificate(dir, store::ASK_PEM)?;
        let (vcek_der, vcek) = read_certificate_parsed(dir, store::VCEK_PEM)?;

        let vcek_key = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, vcek_key.as_ref()).map_err(|e| {
            SimError::Corrupt { path: dir.join(store::VCEK_KEY), reason: format!("not a PKCS#8 ECDSA P-384 key: {e}") }
        })?;
        let inconsistent = |reason| SimError::Inconsistent { dir: dir.to_path_buf(), reason };
        // Reports signed by a key the VCEK does not certify, or naming a chip
        // or TCB it does not certify, would fail verification far from here.
        if vcek.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes() != vcek_key.public_key().as_ref()
        {
            return Err(inconsistent("vcek.key is not the key vcek.pem certifies"));
        }
        let expected = certs::vcek_extensions(&identity.chip_id, identity.tcb)?;
        if vcek.tbs_certificate.extensions.as_ref() != Some(&expected) {
            return Err(inconsistent("vcek.pem certifies a different chip id or tcb from platform.json"));
        }

        let vcek_pem = certificate_pem(&vcek_der)?;
        let chain_pem = certificate_pem(&ask_der)? + &certificate_pem(&ark_der)?;
        Ok(SimPlatform { dir: dir.to_path_buf(), identity, ark_der, ask_der, vcek_der, vcek_pem, chain_pem, vcek_key })
    }

    /// The state directory this platform was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The VCEK certificate, PEM.
    pub fn vcek_pem(&self) -> String {
        self.vcek_pem.clone()
    }

    /// The ASK then the ARK, PEM, in the order of AMD's `cert_chain` files.
    pub fn chain_pem(&self) -> String {
        self.chain_pem.clone()
    }

    /// The ARK certificate, DER: the root a verifier must be told to trust
    /// for sim evidence.
    pub fn ark_der(&self) -> &[u8] {
        &self.ark_der
    }

    /// The ASK certificate, DER.
    pub fn ask_der(&self) -> &[u8] {
        &self.ask_der
    }

    /// The VCEK certificate, DER.
    pub fn vcek_der(&self) -> &[u8] {
        &self.vcek_der
    }

    /// CHIP_ID of this platform's reports, equal to the VCEK's hwID.
    pub fn chip_id(&self) -> &[u8; 64] {
        &self.identity.chip_id
    }

    /// The TCB in reports (CURRENT, REPORTED, COMMITTED and LAUNCH), as the
    /// little-endian u64 the report holds.
    pub fn tcb(&self) -> u64 {
        u64::from_le_bytes(self.identity.tcb.to_le_bytes())
    }

    /// A signed SEV-SNP attestation report (version 3, 1184 bytes) with the
    /// fields of `req`, signed by this platform's VCEK.
    pub fn report(&self, req: &ReportRequest) -> Result<Vec<u8>, SimError> {
        report::build(req, &self.identity.chip_id, self.identity.tcb, &self.vcek_key)
    }
}

fn state_dir_from(
    sim_dir: Option<OsString>,
    xdg_state_home: Option<OsString>,
    home: Option<OsString>,
) -> Result<PathBuf, SimError> {
    let non_empty = |v: Option<OsString>| v.filter(|s| !s.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty(sim_dir) {
        return Ok(dir);
    }
    // The XDG base directory specification says relative paths are invalid
    // and must be ignored.
    if let Some(state) = non_empty(xdg_state_home).filter(|p| p.is_absolute()) {
        return Ok(state.join("capsa").join("sim"));
    }
    if let Some(home) = non_empty(home) {
        return Ok(home.join(".local").join("state").join("capsa").join("sim"));
    }
    Err(SimError::NoStateDir)
}

fn is_empty_dir(dir: &Path) -> Result<bool, SimError> {
    let mut entries =
        fs::read_dir(dir).map_err(|source| SimError::Io { op: "list", path: dir.to_path_buf(), source })?;
    Ok(entries.next().is_none())
}

fn read_identity(dir: &Path) -> Result<Identity, SimError> {
    let path = dir.join(store::PLATFORM_JSON);
    let corrupt = |reason: String| SimError::Corrupt { path: path.clone(), reason };
    let bytes = store::read_public(dir, store::PLATFORM_JSON)?;
    let file: PlatformFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    if file.format != store::PLATFORM_FORMAT {
        return Err(corrupt(format!(
            "format {} is not {}, the only one this capsa knows",
            file.format,
            store::PLATFORM_FORMAT
        )));
    }
    if file.product != certs::PRODUCT_LINE {
        return Err(corrupt(format!("product {:?} is not {:?}", file.product, certs::PRODUCT_LINE)));
    }
    let mut chip_id = [0u8; 64];
    hex::decode_to_slice(&file.chip_id, &mut chip_id)
        .map_err(|e| corrupt(format!("chip_id is not 64 bytes of hex: {e}")))?;
    Ok(Identity { chip_id, tcb: (&file.tcb).into() })
}

fn read_certificate(dir: &Path, name: &'static str) -> Result<Vec<u8>, SimError> {
    read_certificate_parsed(dir, name).map(|(der, _)| der)
}

fn read_certificate_parsed(dir: &Path, name: &'static str) -> Result<(Vec<u8>, Certificate), SimError> {
    let bytes = store::read_public(dir, name)?;
    let corrupt =
        |e: der::Error| SimError::Corrupt { path: dir.join(name), reason: format!("not a PEM certificate: {e}") };
    let cert = Certificate::from_pem(&bytes).map_err(corrupt)?;
    let der = cert.to_der().map_err(corrupt)?;
    Ok((der, cert))
}

fn certificate_pem(der: &[u8]) -> Result<String, SimError> {
    use der::Decode;
    Ok(Certificate::from_der(der)?.to_pem(LineEnding::LF)?)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::sync::OnceLock;

    use aws_lc_rs::signature::{
        ECDSA_P384_SHA384_FIXED, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, RSA_PSS_2048_8192_SHA384,
        UnparsedPublicKey,
    };
    use der::Encode;
    use x509_cert::Certificate;
    use x509_cert::der::DecodePem;

    use super::*;

    /// Generating RSA-4096 keys takes seconds in a debug build: one root of
    /// trust serves every test, each writing it into its own directory.
    fn fixture() -> (Identity, certs::RootOfTrust) {
        static ROOT: OnceLock<(Identity, certs::RootOfTrust)> = OnceLock::new();
        ROOT.get_or_init(|| {
            let identity = Identity { chip_id: std::array::from_fn(|i| i as u8), tcb: Tcb::GENOA_DEFAULT };
            let root = certs::generate(SystemTime::now(), &identity.chip_id, identity.tcb).unwrap();
            (identity, root)
        })
        .clone()
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let mut suffix = [0u8; 8];
            aws_lc_rs::rand::fill(&mut suffix).unwrap();
            let path = std::env::temp_dir().join(format!("capsa-sim-test-{}", hex::encode(suffix)));
            fs::create_dir(&path).unwrap();
            Self(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn init_fixture(dir: &Path) -> SimPlatform {
        SimPlatform::init_with(dir, || Ok(fixture())).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn certificate(der: &[u8]) -> Certificate {
        use der::Decode;
        Certificate::from_der(der).unwrap()
    }

    /// Checks `cert`'s RSA-PSS signature with `issuer`'s public key, as the
    /// verifier does for AMD's chain.
    fn rsa_pss_verify(cert: &Certificate, issuer: &Certificate) -> Result<(), aws_lc_rs::error::Unspecified> {
        let key = issuer.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes();
        UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA384, key)
            .verify(&cert.tbs_certificate.to_der().unwrap(), cert.signature.raw_bytes())
    }

    fn request() -> ReportRequest {
        ReportRequest {
            measurement: [0x11; 48],
            host_data: [0x22; 32],
            report_data: [0x33; 64],
            policy_debug: false,
            vmpl: 0,
        }
    }

    #[test]
    fn init_creates_private_state() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("state").join("sim");
        init_fixture(&dir);
        assert_eq!(mode(&dir), 0o700);
        for key in [store::ARK_KEY, store::ASK_KEY, store::VCEK_KEY] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        for public in [store::ARK_PEM, store::ASK_PEM, store::VCEK_PEM, store::PLATFORM_JSON] {
            assert!(dir.join(public).is_file(), "{public}");
        }
        // Nothing left over from staging next to the state directory.
        let siblings: Vec<_> = fs::read_dir(tmp.0.join("state")).unwrap().collect();
        assert_eq!(siblings.len(), 1);
    }

    #[test]
    fn init_twice_loads_the_existing_platform() {
        let tmp = TempDir::new();
        let first = init_fixture(&tmp.0);
        let second = SimPlatform::init_with(&tmp.0, || panic!("init regenerated an existing platform")).unwrap();
        assert_eq!(first.vcek_der(), second.vcek_der());
        assert_eq!(first.chain_pem(), second.chain_pem());
        assert_eq!(first.chip_id(), second.chip_id());
    }

    #[test]
    fn init_takes_over_an_empty_directory_and_tightens_it() {
        let tmp = TempDir::new();
        fs::set_permissions(&tmp.0, fs::Permissions::from_mode(0o755)).unwrap();
        init_fixture(&tmp.0);
        assert_eq!(mode(&tmp.0), 0o700);
    }

    #[test]
    fn init_refuses_a_directory_with_other_files() {
        let tmp = TempDir::new();
        fs::write(tmp.0.join("notes.txt"), b"mine").unwrap();
        let err = SimPlatform::init_with(&tmp.0, || Ok(fixture())).unwrap_err();
        assert!(matches!(err, SimError::Incomplete { .. }), "{err}");
        assert_eq!(fs::read(tmp.0.join("notes.txt")).unwrap(), b"mine");
    }

    #[test]
    fn load_of_a_missing_directory_says_to_run_init() {
        let tmp = TempDir::new();
        let dir = tmp.0.join("absent");
        let err = SimPlatform::load(&dir).unwrap_err();
        assert!(matches!(err, SimError::NotInitialized { .. }));
        let message = err.to_string();
        assert!(message.contains("capsa sim init"), "{message}");
        assert!(message.contains(&dir.display().to_string()), "{message}");
    }

    #[test]
    fn load_refuses_a_group_readable_key() {
        let tmp = TempDir::new();
        init_fixture(&tmp.0);
        let key = tmp.0.join(store::ASK_KEY);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = SimPlatform::load(&tmp.0).unwrap_err();
        assert!(matches!(err, SimError::KeyPermissions { mode: 0o640, .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains(&format!("chmod 600 {}", key.display())), "{message}");
        // init on the same directory must not paper over it either.
        assert!(matches!(SimPlatform::init(&tmp.0).unwrap_err(), SimError::KeyPermissions { .. }));
    }

    #[test]
    fn load_refuses_a_vcek_key_the_certificate_does_not_certify() {
        let tmp = TempDir::new();
        init_fixture(&tmp.0);
        let other = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap();
        let key = tmp.0.join(store::VCEK_KEY);
        fs::write(&key, other.to_pkcs8v1().unwrap().as_ref()).unwrap();
        let err = SimPlatform::load(&tmp.0).unwrap_err();
        assert!(matches!(err, SimError::Inconsistent { .. }), "{err}");
    }

    #[test]
    fn load_refuses_a_platform_file_naming_another_chip() {
        let tmp = TempDir::new();
        init_fixture(&tmp.0);
        let path = tmp.0.join(store::PLATFORM_JSON);
        let json = fs::read_to_string(&path).unwrap().replace("000102", "ff0102");
        fs::write(&path, json).unwrap();
        let err = SimPlatform::load(&tmp.0).unwrap_err();
        assert!(matches!(err, SimError::Inconsistent { .. }), "{err}");
    }

    #[test]
    fn report_fields_sit_at_the_abi_offsets() {
        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let mut req = request();
        req.policy_debug = true;
        req.vmpl = 2;
        let r = sim.report(&req).unwrap();
        assert_eq!(r.len(), 1184);
        let u32_at = |o: usize| u32::from_le_bytes(r[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(r[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(0x00), 3, "VERSION");
        assert_eq!(u32_at(0x04), 0, "GUEST_SVN");
        assert_eq!(u64_at(0x08), (1 << 16) | (1 << 17) | (1 << 19), "POLICY");
        assert_eq!(&r[0x10..0x30], &[0; 32], "FAMILY_ID, IMAGE_ID");
        assert_eq!(u32_at(0x30), 2, "VMPL");
        assert_eq!(u32_at(0x34), 1, "SIGNATURE_ALGO");
        let tcb = 0x4817_0000_0000_000a_u64;
        assert_eq!(sim.tcb(), tcb);
        assert_eq!(u64_at(0x38), tcb, "CURRENT_TCB");
        assert_eq!(u64_at(0x40), 0b11, "PLATFORM_INFO");
        assert_eq!(u32_at(0x48), 0, "KEY_INFO");
        assert_eq!(&r[0x50..0x90], &[0x33; 64], "REPORT_DATA");
        assert_eq!(&r[0x90..0xC0], &[0x11; 48], "MEASUREMENT");
        assert_eq!(&r[0xC0..0xE0], &[0x22; 32], "HOST_DATA");
        assert_eq!(&r[0xE0..0x140], &[0; 96], "ID_KEY_DIGEST, AUTHOR_KEY_DIGEST");
        assert_ne!(&r[0x140..0x160], &[0; 32], "REPORT_ID");
        assert_eq!(&r[0x160..0x180], &[0xFF; 32], "REPORT_ID_MA");
        assert_eq!(u64_at(0x180), tcb, "REPORTED_TCB");
        assert_eq!(&r[0x188..0x18B], &[0x19, 0x11, 0x01], "CPUID");
        assert_eq!(&r[0x18B..0x1A0], &[0; 21]);
        assert_eq!(&r[0x1A0..0x1E0], sim.chip_id(), "CHIP_ID");
        assert_eq!(u64_at(0x1E0), tcb, "COMMITTED_TCB");
        assert_eq!(&r[0x1E8..0x1F0], &[21, 55, 1, 0, 21, 55, 1, 0], "CURRENT, COMMITTED");
        assert_eq!(u64_at(0x1F0), tcb, "LAUNCH_TCB");
        assert!(r[0x1F8..0x2A0].iter().all(|b| *b == 0));
        assert!(r[0x2A0 + 48..0x2E8].iter().all(|b| *b == 0), "R high bytes");
        assert!(r[0x2E8 + 48..].iter().all(|b| *b == 0), "S high bytes and tail");

        let plain = sim.report(&request()).unwrap();
        assert_eq!(u64_at(0x08) & !(1 << 19), u64::from_le_bytes(plain[8..16].try_into().unwrap()));
        assert_ne!(&plain[0x140..0x160], &r[0x140..0x160], "REPORT_ID is fresh per report");
    }

    #[test]
    fn report_refuses_a_vmpl_above_3() {
        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let req = ReportRequest { vmpl: 4, ..request() };
        assert!(matches!(sim.report(&req), Err(SimError::InvalidVmpl { vmpl: 4 })));
    }

    #[test]
    fn report_signature_verifies_with_the_vcek_from_pem() {
        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let report = sim.report(&request()).unwrap();
        let vcek = Certificate::from_pem(sim.vcek_pem().as_bytes()).unwrap();
        let key = vcek.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes();
        let mut signature = Vec::with_capacity(96);
        signature.extend(report[0x2A0..0x2A0 + 48].iter().rev());
        signature.extend(report[0x2E8..0x2E8 + 48].iter().rev());
        let verifier = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, key);
        verifier.verify(&report[..0x2A0], &signature).unwrap();

        let mut tampered = report.clone();
        tampered[0x90] ^= 1;
        assert!(verifier.verify(&tampered[..0x2A0], &signature).is_err());
    }

    #[test]
    fn chain_signatures_verify() {
        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let chain = Certificate::load_pem_chain(sim.chain_pem().as_bytes()).unwrap();
        let [ask, ark] = <[Certificate; 2]>::try_from(chain).unwrap();
        assert_eq!(ark.to_der().unwrap(), sim.ark_der());
        assert_eq!(ask.to_der().unwrap(), sim.ask_der());
        let vcek = certificate(sim.vcek_der());
        rsa_pss_verify(&vcek, &ask).unwrap();
        rsa_pss_verify(&ask, &ark).unwrap();
        rsa_pss_verify(&ark, &ark).unwrap();
        assert!(rsa_pss_verify(&vcek, &ark).is_err());
        assert_eq!(vcek.tbs_certificate.issuer, ask.tbs_certificate.subject);
        assert_eq!(ask.tbs_certificate.issuer, ark.tbs_certificate.subject);
    }

    /// The encodings a verifier written against AMD's certificates looks at,
    /// compared with bytes taken from AMD's (ARK-Genoa, SEV-Genoa and a
    /// Milan VCEK, via `openssl asn1parse`).
    #[test]
    fn certificates_follow_amds_profile() {
        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let ark = certificate(sim.ark_der());
        let ask = certificate(sim.ask_der());
        let vcek = certificate(sim.vcek_der());

        let pss = hex::decode(
            "300d06092a864886f70d01010a3039a00f300d06096086480165030402020500a11c301a06092a864886f70d\
             010108300d06096086480165030402020500a203020130a303020101",
        )
        .unwrap();
        for cert in [&ark, &ask, &vcek] {
            assert_eq!(cert.tbs_certificate.version, x509_cert::certificate::Version::V3);
            assert_eq!(cert.signature_algorithm.to_der().unwrap()[2..], pss[2..]);
            assert_eq!(cert.tbs_certificate.signature, cert.signature_algorithm);
        }

        let name = |cn: &str| format!("OU=Engineering,C=US,L=Santa Clara,ST=CA,O={SIM_ORGANIZATION},CN={cn}");
        // x509-cert prints RDNs last first, as RFC 4514 does.
        let rfc4514 = |cn: &str| name(cn).split(',').rev().collect::<Vec<_>>().join(",");
        assert_eq!(ark.tbs_certificate.subject.to_string(), rfc4514("ARK-Genoa"));
        assert_eq!(ask.tbs_certificate.subject.to_string(), rfc4514("SEV-Genoa"));
        assert_eq!(vcek.tbs_certificate.subject.to_string(), rfc4514("SEV-VCEK"));
        // C is a PrintableString, everything else UTF8String, as AMD's.
        let subject = vcek.tbs_certificate.subject.to_der().unwrap();
        assert!(hex::encode(&subject).contains("310b3009060355040613025553"));

        assert_eq!(vcek.tbs_certificate.serial_number.as_bytes(), &[0]);
        assert_eq!(vcek.tbs_certificate.serial_number.to_der().unwrap(), [0x02, 0x01, 0x00]);

        let extensions = |cert: &Certificate| -> Vec<(String, bool, String)> {
            cert.tbs_certificate
                .extensions
                .iter()
                .flatten()
                .map(|e| (e.extn_id.to_string(), e.critical, hex::encode(e.extn_value.as_bytes())))
                .collect()
        };
        let ark_exts = extensions(&ark);
        let ask_exts = extensions(&ask);
        let ark_ski = &ark_exts[1].2[4..];
        assert_eq!(
            ark_exts,
            [
                ("2.5.29.15".into(), true, "03020106".into()),
                ("2.5.29.14".into(), false, format!("0414{ark_ski}")),
                ("2.5.29.19".into(), true, "30030101ff".into()),
            ]
        );
        let ask_ski = &ask_exts[0].2[4..];
        assert_eq!(
            ask_exts,
            [
                ("2.5.29.14".into(), false, format!("0414{ask_ski}")),
                ("2.5.29.35".into(), false, format!("30168014{ark_ski}")),
                ("2.5.29.19".into(), true, "30060101ff020100".into()),
                ("2.5.29.15".into(), true, "03020104".into()),
            ]
        );
        let ark_rsa = ark.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes();
        assert_eq!(
            hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, ark_rsa)),
            *ark_ski
        );

        let amd = |suffix: &str| format!("1.3.6.1.4.1.3704.1.{suffix}");
        let chip = hex::encode(sim.chip_id());
        let expected: Vec<(String, bool, String)> = vec![
            (amd("1"), false, "020100".into()),
            (amd("2"), false, "160847656e6f612d4231".into()),
            (amd("3.1"), false, "02010a".into()),
            (amd("3.2"), false, "020100".into()),
            (amd("3.4"), false, "020100".into()),
            (amd("3.5"), false, "020100".into()),
            (amd("3.6"), false, "020100".into()),
            (amd("3.7"), false, "020100".into()),
            (amd("3.3"), false, "020117".into()),
            (amd("3.8"), false, "020148".into()),
            (amd("4"), false, format!("0440{chip}")),
        ];
        assert_eq!(extensions(&vcek), expected);

        let spki = vcek.tbs_certificate.subject_public_key_info.to_der().unwrap();
        // id-ecPublicKey with namedCurve secp384r1, uncompressed point.
        assert!(hex::encode(&spki).starts_with("3076301006072a8648ce3d020106052b8104002203620004"));
    }

    /// The point of the sim: its evidence passes the verifier hardware
    /// evidence goes through, once that verifier is told to trust the sim
    /// root, and is refused otherwise.
    #[test]
    fn evidence_passes_the_snp_verifier_only_when_sim_is_allowed() {
        use crate::snp::{Appraisal, RootStore, SimTrust, Verifier};

        // Two constants for one name would let the sim and the verifier drift apart.
        assert_eq!(SIM_ORGANIZATION, crate::snp::SIM_ORGANIZATION);
        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let req = request();
        let report = sim.report(&req).unwrap();
        let chain = sim.chain_pem();
        let now = time::OffsetDateTime::now_utc();

        let refused = Verifier::new(RootStore::amd()).verify_chain(sim.vcek_der(), Some(chain.as_bytes()), now);
        assert!(refused.is_err());

        let ark = crate::snp::AmdCert::from_der("ARK", sim.ark_der()).unwrap();
        let verifier = Verifier::new(RootStore::amd().with_sim(SimTrust::Pinned(vec![ark])));
        let verified = verifier.verify_chain(sim.vcek_pem().as_bytes(), Some(chain.as_bytes()), now).unwrap();
        assert_eq!(verified.attestation_type(), crate::AttestationType::Sim);
        let appraisal = Appraisal {
            measurements: vec![req.measurement],
            host_data: Some(req.host_data),
            report_data: Some(req.report_data),
            refuse_debug: true,
            required_vmpl: Some(0),
            ..Appraisal::default()
        };
        verified.verify_report(&report, &appraisal).unwrap();

        let mut tampered = report.clone();
        tampered[0xC0] ^= 1;
        assert!(verified.verify_report(&tampered, &Appraisal::default()).is_err());
    }

    /// Checks that only a validly signed report can reach: the report is
    /// altered, then signed again with the sim VCEK, so the signature holds
    /// and the binding checks must catch the change.
    #[test]
    fn resigned_reports_with_wrong_tcb_chip_or_product_are_refused() {
        use crate::snp::{Appraisal, RootStore, SimTrust, SnpError, Verifier};

        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let chain = sim.chain_pem();
        let verifier = Verifier::new(RootStore::amd().with_sim(SimTrust::DangerAnySimRoot));
        let verified =
            verifier.verify_chain(sim.vcek_der(), Some(chain.as_bytes()), time::OffsetDateTime::now_utc()).unwrap();
        let genuine = sim.report(&request()).unwrap();
        let resign = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = genuine.clone();
            edit(&mut bytes);
            let sig = sim.vcek_key.sign(&aws_lc_rs::rand::SystemRandom::new(), &bytes[..0x2A0]).unwrap();
            let (r, s) = sig.as_ref().split_at(48);
            let mut r = r.to_vec();
            let mut s = s.to_vec();
            r.reverse();
            s.reverse();
            bytes[0x2A0..0x2A0 + 48].copy_from_slice(&r);
            bytes[0x2E8..0x2E8 + 48].copy_from_slice(&s);
            verified.verify_report(&bytes, &Appraisal::default())
        };

        assert!(resign(&|_| {}).is_ok(), "re-signing an unaltered report must verify");
        let err = resign(&|b| b[0x180] += 1).unwrap_err();
        assert!(matches!(err, SnpError::TcbMismatch { component: "bootloader", .. }), "{err}");
        assert!(err.to_string().starts_with("VCEK TCB bootloader="), "{err}");
        let err = resign(&|b| b[0x187] += 1).unwrap_err();
        assert!(matches!(err, SnpError::TcbMismatch { component: "microcode", .. }), "{err}");
        let err = resign(&|b| b[0x1A0] ^= 1).unwrap_err();
        assert!(matches!(err, SnpError::ChipIdMismatch), "{err}");
        // A masked CHIP_ID (all zero) is not compared.
        assert!(resign(&|b| b[0x1A0..0x1E0].fill(0)).is_ok());
        let err = resign(&|b| b[0x189] = 0x01).unwrap_err();
        assert!(matches!(err, SnpError::ProductMismatch { model: 0x01, .. }), "{err}");
        let err = resign(&|b| b[0x48] = 1 << 2).unwrap_err();
        assert!(matches!(err, SnpError::SigningKeyMismatch { report: "vlek", .. }), "{err}");
    }

    #[test]
    fn spl_values_of_128_and_more_get_a_sign_byte_like_amds() {
        let tcb = Tcb { microcode: 0xa9, ..Tcb::GENOA_DEFAULT };
        let extensions = certs::vcek_extensions(&[0; 64], tcb).unwrap();
        let ucode = extensions.iter().find(|e| e.extn_id.to_string() == "1.3.6.1.4.1.3704.1.3.8").unwrap();
        assert_eq!(ucode.extn_value.as_bytes(), [0x02, 0x02, 0x00, 0xa9]);
    }

    #[test]
    fn validity_runs_from_a_day_before_creation() {
        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let now = SystemTime::now();
        let day = std::time::Duration::from_secs(86_400);
        let year = std::time::Duration::from_secs(31_557_600);
        for (der, years) in [(sim.ark_der(), 25), (sim.ask_der(), 25), (sim.vcek_der(), 7)] {
            let validity = certificate(der).tbs_certificate.validity;
            let start = validity.not_before.to_system_time();
            let end = validity.not_after.to_system_time();
            assert!(start <= now - day + std::time::Duration::from_secs(600) && start > now - day * 2);
            let span = end.duration_since(start).unwrap();
            assert!(span > year * years && span < year * years + day * 3, "{span:?}");
        }
    }

    #[test]
    fn private_key_bytes_never_show_in_debug() {
        let (_, root) = fixture();
        let shown = format!("{:?}", root.vcek_key);
        assert_eq!(shown, format!("SecretBytes([redacted; {} bytes])", root.vcek_key.as_ref().len()));

        let tmp = TempDir::new();
        let sim = init_fixture(&tmp.0);
        let shown = format!("{sim:?}");
        let key = fs::read(tmp.0.join(store::VCEK_KEY)).unwrap();
        // The PKCS#8 key holds the 48-byte private scalar; no 16-byte window
        // of the file may appear in the output.
        for window in key.windows(16) {
            assert!(!shown.contains(&hex::encode(window)));
        }
    }

    #[test]
    fn state_dir_precedence() {
        let s = |v: &str| Some(OsString::from(v));
        assert_eq!(state_dir_from(s("/sim"), s("/xdg"), s("/home/u")).unwrap(), PathBuf::from("/sim"));
        assert_eq!(state_dir_from(None, s("/xdg"), s("/home/u")).unwrap(), PathBuf::from("/xdg/capsa/sim"));
        assert_eq!(
            state_dir_from(s(""), s("relative"), s("/home/u")).unwrap(),
            PathBuf::from("/home/u/.local/state/capsa/sim")
        );
        assert!(matches!(state_dir_from(None, None, None), Err(SimError::NoStateDir)));
    }
}
