//! The SEV-SNP attestation report: its byte layout, versions 2 to 5.
//!
//! Layout from AMD's "SEV Secure Nested Paging Firmware ABI Specification"
//! (publication 56860), table "ATTESTATION_REPORT Structure". Every report
//! is 1184 bytes whatever its version; later versions only give meaning to
//! bytes that earlier ones reserved (CPUID identification in v3, mitigation
//! vectors in v5). Parsing is a fixed-offset read over a length-checked
//! array, so it cannot panic on any input.
//!
//! Bytes after the signature are reserved and are never signed. The parser
//! requires them, and the unused high bytes of R and S, to be zero: a report
//! then has exactly one accepted byte representation, so a verifier cannot be
//! fooled into treating two different byte strings as the same evidence.

use sev::firmware::guest::{GuestPolicy, KeyInfo, PlatformInfo};
use sev::firmware::host::TcbVersion;
use sev::parser::ByteParser;

use super::Product;

/// Size of every SEV-SNP attestation report, in bytes.
pub const REPORT_LEN: usize = 0x4A0;
/// End of the signed region: the signature covers bytes `0..SIGNED_LEN`.
pub const SIGNED_LEN: usize = 0x2A0;
/// Oldest report version this parser understands.
pub const MIN_VERSION: u32 = 2;
/// Newest report version this parser understands.
pub const MAX_VERSION: u32 = 5;
/// SIGNATURE_ALGO value for ECDSA P-384 with SHA-384, the only one defined.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;

const SIG_R: usize = 0x2A0;
const SIG_S: usize = 0x2E8;
/// R and S are little-endian in 72-byte fields; P-384 uses the low 48.
const SIG_COMPONENT_FIELD: usize = 72;
const P384_SCALAR: usize = 48;

/// Why report bytes are not a well-formed SEV-SNP attestation report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The input has the wrong length.
    #[error(
        "an SEV-SNP report is {REPORT_LEN} bytes, this input has {found}: pass the raw report (binary or hex), not a wrapper around it"
    )]
    Length {
        /// The length found.
        found: usize,
    },
    /// The version field is outside what this parser knows.
    #[error("report version {found} is not supported (capsa understands versions {MIN_VERSION} to {MAX_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The signature algorithm is not ECDSA P-384 with SHA-384.
    #[error("report signature algorithm {found} is not supported (expected 1, ECDSA P-384 with SHA-384)")]
    SignatureAlgorithm {
        /// The algorithm found.
        found: u32,
    },
    /// A byte outside the signed region that must be zero is not.
    #[error("report byte 0x{offset:03x} lies outside the signed region and must be zero: the report was altered")]
    NonZeroUnsigned {
        /// Offset of the first offending byte.
        offset: usize,
    },
}

/// Which key signed a report, from KEY_INFO.SIGNING_KEY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningKey {
    /// The chip's versioned chip endorsement key.
    Vcek,
    /// A cloud provider's versioned loaded endorsement key.
    Vlek,
    /// The report is not signed (SIGNING_KEY = 7).
    None,
    /// A value the specification reserves.
    Reserved(u32),
}

impl SigningKey {
    fn from_bits(bits: u32) -> Self {
        match bits {
            0 => Self::Vcek,
            1 => Self::Vlek,
            7 => Self::None,
            other => Self::Reserved(other),
        }
    }

    /// Lower-case name as used in claims.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vcek => "vcek",
            Self::Vlek => "vlek",
            Self::None => "none",
            Self::Reserved(_) => "reserved",
        }
    }
}

/// A TCB version exactly as the report encodes it; how its eight bytes map to
/// SPLs depends on the processor generation (see [`RawTcb::decode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawTcb(pub [u8; 8]);

impl RawTcb {
    /// Decodes the TCB for a processor line: Milan and Genoa put the
    /// bootloader, TEE, SNP and microcode SPLs in bytes 0, 1, 6, 7; Turin
    /// adds the FMC SPL and packs them as bytes 0 (FMC), 1, 2, 3, 7.
    pub fn decode(self, product: Product) -> TcbVersion {
        let [b0, b1, b2, b3, _, _, b6, b7] = self.0;
        match product {
            Product::Milan | Product::Genoa => TcbVersion::new(None, b0, b1, b6, b7),
            Product::Turin => TcbVersion::new(Some(b0), b1, b2, b3, b7),
        }
    }

    /// The value as the little-endian u64 the firmware writes.
    pub fn as_u64(self) -> u64 {
        u64::from_le_bytes(self.0)
    }
}

/// Firmware version triple (CURRENT_* / COMMITTED_* fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FirmwareVersion {
    /// Major version.
    pub major: u8,
    /// Minor version.
    pub minor: u8,
    /// Build number.
    pub build: u8,
}

impl std::fmt::Display for FirmwareVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.build)
    }
}

/// CPUID identification of the processor, reported from version 3 on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuId {
    /// Combined extended family and family.
    pub family: u8,
    /// Combined extended model and model.
    pub model: u8,
    /// Stepping.
    pub stepping: u8,
}

impl CpuId {
    /// The processor line this CPUID names, if capsa knows it.
    pub fn product(self) -> Option<Product> {
        match (self.family, self.model) {
            (0x19, 0x00..=0x0F) => Some(Product::Milan),
            (0x19, 0x10..=0x1F | 0xA0..=0xAF) => Some(Product::Genoa),
            (0x1A, 0x00..=0x11) => Some(Product::Turin),
            _ => None,
        }
    }
}

/// A parsed SEV-SNP attestation report. Parsing checks only the framing;
/// nothing here is trustworthy until [`super::VerifiedChain::verify_report`]
/// has checked the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// VERSION (2 to 5).
    pub version: u32,
    /// GUEST_SVN from the ID block.
    pub guest_svn: u32,
    /// POLICY: the guest policy fixed at launch.
    pub policy: GuestPolicy,
    /// POLICY as the raw 64 bits (sev's conversion to u64 forces reserved bit 17).
    pub policy_raw: u64,
    /// FAMILY_ID from the ID block.
    pub family_id: [u8; 16],
    /// IMAGE_ID from the ID block.
    pub image_id: [u8; 16],
    /// VMPL the report was requested at.
    pub vmpl: u32,
    /// SIGNATURE_ALGO.
    pub signature_algo: u32,
    /// CURRENT_TCB.
    pub current_tcb: RawTcb,
    /// PLATFORM_INFO.
    pub platform_info: PlatformInfo,
    /// KEY_INFO (author key, chip-key masking, signing key).
    pub key_info: KeyInfo,
    /// REPORT_DATA supplied by the guest.
    pub report_data: [u8; 64],
    /// MEASUREMENT: the launch digest.
    pub measurement: [u8; 48],
    /// HOST_DATA supplied by the host at launch.
    pub host_data: [u8; 32],
    /// ID_KEY_DIGEST.
    pub id_key_digest: [u8; 48],
    /// AUTHOR_KEY_DIGEST.
    pub author_key_digest: [u8; 48],
    /// REPORT_ID.
    pub report_id: [u8; 32],
    /// REPORT_ID_MA: the migration agent's report ID, all ones when none.
    pub report_id_ma: [u8; 32],
    /// REPORTED_TCB: the TCB the signing key was derived from.
    pub reported_tcb: RawTcb,
    /// CPUID_FAM_ID, CPUID_MOD_ID, CPUID_STEP (version 3 and later).
    pub cpuid: Option<CpuId>,
    /// CHIP_ID, all zero when masked.
    pub chip_id: [u8; 64],
    /// COMMITTED_TCB.
    pub committed_tcb: RawTcb,
    /// CURRENT_BUILD / CURRENT_MINOR / CURRENT_MAJOR.
    pub current_version: FirmwareVersion,
    /// COMMITTED_BUILD / COMMITTED_MINOR / COMMITTED_MAJOR.
    pub committed_version: FirmwareVersion,
    /// LAUNCH_TCB.
    pub launch_tcb: RawTcb,
    /// LAUNCH_MIT_VECTOR (version 5 and later).
    pub launch_mit_vector: Option<u64>,
    /// CURRENT_MIT_VECTOR (version 5 and later).
    pub current_mit_vector: Option<u64>,
    /// Signature R, big-endian.
    pub signature_r: [u8; 48],
    /// Signature S, big-endian.
    pub signature_s: [u8; 48],
}

/// Reads fixed-size fields at fixed offsets of a report already known to be
/// [`REPORT_LEN`] bytes long.
struct Fields<'a>(&'a [u8; REPORT_LEN]);

impl Fields<'_> {
    fn array<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.0.get(offset..offset + N) {
            out.copy_from_slice(src);
        }
        out
    }
    fn u8(&self, offset: usize) -> u8 {
        self.0.get(offset).copied().unwrap_or(0)
    }
    fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.array(offset))
    }
    fn u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.array(offset))
    }
    fn tcb(&self, offset: usize) -> RawTcb {
        RawTcb(self.array(offset))
    }
    fn version(&self, offset: usize) -> FirmwareVersion {
        FirmwareVersion { build: self.u8(offset), minor: self.u8(offset + 1), major: self.u8(offset + 2) }
    }
    /// A little-endian signature component, as a big-endian P-384 scalar.
    fn scalar(&self, offset: usize) -> [u8; P384_SCALAR] {
        let mut out: [u8; P384_SCALAR] = self.array(offset);
        out.reverse();
        out
    }
}

impl Report {
    /// Parses report bytes. Checks length, version, signature algorithm and
    /// that unsigned bytes are zero; checks nothing cryptographic.
    pub fn parse(bytes: &[u8]) -> Result<Self, ReportError> {
        let raw: &[u8; REPORT_LEN] = bytes.try_into().map_err(|_| ReportError::Length { found: bytes.len() })?;
        let f = Fields(raw);
        let version = f.u32(0x00);
        if !(MIN_VERSION..=MAX_VERSION).contains(&version) {
            return Err(ReportError::UnsupportedVersion { found: version });
        }
        let signature_algo = f.u32(0x34);
        if signature_algo != SIG_ALGO_ECDSA_P384_SHA384 {
            return Err(ReportError::SignatureAlgorithm { found: signature_algo });
        }
        for (start, end) in [
            (SIG_R + P384_SCALAR, SIG_R + SIG_COMPONENT_FIELD),
            (SIG_S + P384_SCALAR, SIG_S + SIG_COMPONENT_FIELD),
            (SIG_S + SIG_COMPONENT_FIELD, REPORT_LEN),
        ] {
            if let Some(pos) = raw.get(start..end).and_then(|s| s.iter().position(|&b| b != 0)) {
                return Err(ReportError::NonZeroUnsigned { offset: start + pos });
            }
        }
        let (cpuid, launch_mit_vector, current_mit_vector) = match version {
            2 => (None, None, None),
            3 | 4 => (Some(cpuid(&f)), None, None),
            _ => (Some(cpuid(&f)), Some(f.u64(0x1F8)), Some(f.u64(0x200))),
        };
        Ok(Self {
            version,
            guest_svn: f.u32(0x04),
            policy: bitfield(f.array::<8>(0x08)),
            policy_raw: f.u64(0x08),
            family_id: f.array(0x10),
            image_id: f.array(0x20),
            vmpl: f.u32(0x30),
            signature_algo,
            current_tcb: f.tcb(0x38),
            platform_info: bitfield(f.array::<8>(0x40)),
            key_info: bitfield(f.array::<4>(0x48)),
            report_data: f.array(0x50),
            measurement: f.array(0x90),
            host_data: f.array(0xC0),
            id_key_digest: f.array(0xE0),
            author_key_digest: f.array(0x110),
            report_id: f.array(0x140),
            report_id_ma: f.array(0x160),
            reported_tcb: f.tcb(0x180),
            cpuid,
            chip_id: f.array(0x1A0),
            committed_tcb: f.tcb(0x1E0),
            current_version: f.version(0x1E8),
            committed_version: f.version(0x1EC),
            launch_tcb: f.tcb(0x1F0),
            launch_mit_vector,
            current_mit_vector,
            signature_r: f.scalar(SIG_R),
            signature_s: f.scalar(SIG_S),
        })
    }

    /// KEY_INFO.SIGNING_KEY.
    pub fn signing_key(&self) -> SigningKey {
        SigningKey::from_bits(self.key_info.signing_key())
    }

    /// Whether CHIP_ID was masked (all zero) by the MaskChipId setting.
    pub fn chip_id_masked(&self) -> bool {
        self.chip_id.iter().all(|&b| b == 0)
    }

    /// Whether a migration agent is bound to this guest.
    pub fn has_migration_agent(&self) -> bool {
        self.report_id_ma.iter().any(|&b| b != 0xFF)
    }
}

impl Report {
    /// Every field as (name, value) text, in report order, for display. SPLs
    /// are decoded for `product` when known (from CPUID in v3+ reports).
    pub fn describe(&self, product: Option<Product>) -> Vec<(String, String)> {
        let product = product.or(self.cpuid.and_then(CpuId::product));
        let tcb = |t: RawTcb| match product {
            Some(p) => {
                let v = t.decode(p);
                let fmc = v.fmc.map(|f| format!(" fmc={f}")).unwrap_or_default();
                format!(
                    "{:016x} (bootloader={} tee={} snp={} microcode={}{fmc})",
                    t.as_u64(),
                    v.bootloader,
                    v.tee,
                    v.snp,
                    v.microcode
                )
            }
            None => format!("{:016x} (product unknown: pass a VCEK to decode)", t.as_u64()),
        };
        let p = &self.policy;
        let mut rows = vec![
            ("version", self.version.to_string()),
            ("guest_svn", self.guest_svn.to_string()),
            (
                "policy",
                format!(
                    "{:#x} (abi {}.{}, smt_allowed={}, migrate_ma={}, debug={}, single_socket={}, cxl={}, mem_aes_256_xts={}, rapl_dis={}, ciphertext_hiding={}, page_swap_disabled={})",
                    self.policy_raw,
                    p.abi_major(),
                    p.abi_minor(),
                    p.smt_allowed(),
                    p.migrate_ma_allowed(),
                    p.debug_allowed(),
                    p.single_socket_required(),
                    p.cxl_allowed(),
                    p.mem_aes_256_xts(),
                    p.rapl_dis(),
                    p.ciphertext_hiding(),
                    p.page_swap_disabled()
                ),
            ),
            ("family_id", hex::encode(self.family_id)),
            ("image_id", hex::encode(self.image_id)),
            ("vmpl", self.vmpl.to_string()),
            ("signature_algo", format!("{} (ECDSA P-384 with SHA-384)", self.signature_algo)),
            ("current_tcb", tcb(self.current_tcb)),
            (
                "platform_info",
                format!(
                    "{:#x} (smt={}, tsme={}, ecc={}, rapl_disabled={}, ciphertext_hiding={}, alias_check_complete={}, tio={})",
                    u64::from(self.platform_info),
                    self.platform_info.smt_enabled(),
                    self.platform_info.tsme_enabled(),
                    self.platform_info.ecc_enabled(),
                    self.platform_info.rapl_disabled(),
                    self.platform_info.ciphertext_hiding_enabled(),
                    self.platform_info.alias_check_complete(),
                    self.platform_info.tio_enabled()
                ),
            ),
            (
                "key_info",
                format!(
                    "{:#x} (author_key_en={}, mask_chip_key={}, signing_key={})",
                    u32::from(self.key_info),
                    self.key_info.author_key_en(),
                    self.key_info.mask_chip_key(),
                    self.signing_key().as_str()
                ),
            ),
            ("report_data", hex::encode(self.report_data)),
            ("measurement", hex::encode(self.measurement)),
            ("host_data", hex::encode(self.host_data)),
            ("id_key_digest", hex::encode(self.id_key_digest)),
            ("author_key_digest", hex::encode(self.author_key_digest)),
            ("report_id", hex::encode(self.report_id)),
            ("report_id_ma", hex::encode(self.report_id_ma)),
            ("reported_tcb", tcb(self.reported_tcb)),
        ];
        if let Some(c) = self.cpuid {
            let name = c.product().map_or("unknown", Product::name);
            rows.push((
                "cpuid",
                format!("family {:#x} model {:#x} stepping {:#x} ({name})", c.family, c.model, c.stepping),
            ));
        }
        let chip_id = if self.chip_id_masked() { "masked (all zero)".to_owned() } else { hex::encode(self.chip_id) };
        rows.extend([
            ("chip_id", chip_id),
            ("committed_tcb", tcb(self.committed_tcb)),
            ("current_version", self.current_version.to_string()),
            ("committed_version", self.committed_version.to_string()),
            ("launch_tcb", tcb(self.launch_tcb)),
        ]);
        if let (Some(l), Some(c)) = (self.launch_mit_vector, self.current_mit_vector) {
            rows.push(("launch_mit_vector", format!("{l:#x}")));
            rows.push(("current_mit_vector", format!("{c:#x}")));
        }
        rows.push(("signature_r", hex::encode(self.signature_r)));
        rows.push(("signature_s", hex::encode(self.signature_s)));
        rows.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

fn cpuid(f: &Fields<'_>) -> CpuId {
    CpuId { family: f.u8(0x188), model: f.u8(0x189), stepping: f.u8(0x18A) }
}

/// Decodes one of sev's bitfield newtypes from its little-endian bytes. Its
/// decoder reads exactly the array it is given, so it cannot fail here; the
/// default is unreachable and merely avoids a panic path.
fn bitfield<T: ByteParser<()> + sev::parser::Decoder<()> + Default>(bytes: T::Bytes) -> T {
    T::from_bytes(bytes.as_ref()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MILAN: &[u8] = include_bytes!("../../../../../shared/testdata/evidence/snp/milan-v2-report.bin");
    const VLEK: &[u8] = include_bytes!("../../../../../shared/testdata/evidence/snp/vlek-v3-report.bin");

    #[test]
    fn parses_milan_v2() {
        let r = Report::parse(MILAN).unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(r.signature_algo, 1);
        assert_eq!(r.vmpl, 0);
        assert_eq!(r.cpuid, None);
        assert_eq!(r.signing_key(), SigningKey::Vcek);
        let tcb = r.reported_tcb.decode(Product::Milan);
        assert_eq!((tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode), (3, 0, 8, 0x73));
        assert!(!r.policy.debug_allowed());
        assert!(!r.chip_id_masked());
        assert_eq!(r.current_version, FirmwareVersion { major: 1, minor: 0x34, build: 4 });
    }

    #[test]
    fn parses_vlek_v3_with_cpuid() {
        let r = Report::parse(VLEK).unwrap();
        assert_eq!(r.version, 3);
        assert_eq!(r.signing_key(), SigningKey::Vlek);
        assert_eq!(r.cpuid.and_then(CpuId::product), Some(Product::Milan));
    }

    #[test]
    fn rejects_wrong_length_version_algo_and_unsigned_bytes() {
        assert_eq!(Report::parse(&MILAN[..100]), Err(ReportError::Length { found: 100 }));
        let mut bad = MILAN.to_vec();
        bad[0] = 6;
        assert_eq!(Report::parse(&bad), Err(ReportError::UnsupportedVersion { found: 6 }));
        let mut bad = MILAN.to_vec();
        bad[0x34] = 2;
        assert_eq!(Report::parse(&bad), Err(ReportError::SignatureAlgorithm { found: 2 }));
        for offset in [SIG_R + 48, SIG_S + 71, REPORT_LEN - 1] {
            let mut bad = MILAN.to_vec();
            bad[offset] = 1;
            assert_eq!(Report::parse(&bad), Err(ReportError::NonZeroUnsigned { offset }));
        }
    }

    #[test]
    fn turin_tcb_layout_has_fmc() {
        let tcb = RawTcb([1, 2, 3, 4, 0, 0, 0, 9]).decode(Product::Turin);
        assert_eq!((tcb.fmc, tcb.bootloader, tcb.tee, tcb.snp, tcb.microcode), (Some(1), 2, 3, 4, 9));
    }
}
