//! LUKS2 images, read-only: what Azure's confidential-containers
//! encrypted-filesystem sidecar mounts (its `generatefs.sh` runs
//! `cryptsetup luksFormat --type luks2 --sector-size 4096 --cipher
//! aes-xts-plain64 --pbkdf pbkdf2`, then `mkfs.ext4` on the opened device),
//! served through the same FUSE device and loop device as capsa's own images,
//! with no device-mapper.
//!
//! What is read, and where it is specified (the LUKS2 On-Disk Format
//! Specification, and cryptsetup's `lib/luks2` where the specification is
//! silent):
//!
//! - Two binary headers, at 0 and at `hdr_size`, each followed by its JSON
//!   area; each is checked against its SHA-256 checksum (computed over the
//!   binary header with the checksum field zeroed, then the whole JSON area).
//!   As cryptsetup does, the valid copy with the higher `seqid` wins, and a
//!   damaged primary is found again through the secondary's known offsets.
//! - The JSON metadata, parsed into typed structs. Only what capsa reads
//!   fully is accepted: one `crypt` segment in `aes-xts-plain64` without
//!   integrity, PBKDF2 keyslots of the `luks1` anti-forensic type, a `pbkdf2`
//!   digest. Anything else is refused with what to do instead.
//! - A keyslot opens with PBKDF2 of the passphrase (the key file's bytes,
//!   exactly), which decrypts the keyslot's area (AES-XTS, 512-byte sectors
//!   numbered from the area's start), then the anti-forensic merge of its
//!   4000 stripes with the keyslot's hash as diffuser gives a candidate volume
//!   key, and the digest (PBKDF2 of that key) says whether it is the one.
//! - The data segment is AES-XTS in `sector_size` units whose tweak counts
//!   **512-byte** sectors: cryptsetup never sets dm-crypt's
//!   `iv_large_sectors` flag for LUKS2 (only for plain and BitLocker
//!   devices), so 4096-byte sector `n` of the segment has the tweak
//!   `8 n + iv_tweak`. The fixture in `tests/fixtures`, written by the kernel's
//!   dm-crypt, checks that.
//!
//! # No integrity protection
//!
//! LUKS2 with AES-XTS encrypts but does not authenticate: whoever can write
//! the image can replace any 4 KiB sector with an older copy of itself, or
//! with random bytes that decrypt to garbage, and nothing here notices; ext4
//! then reads what it is given. capsa's own format ([`crate::format`])
//! detects both. Mount LUKS2 images for compatibility with images that
//! already exist, and read-only: capsa does not write them.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::ops::Range;
use std::sync::Arc;

use aes::cipher::KeyInit;
use aes::{Aes128, Aes256};
use aws_lc_rs::{digest, pbkdf2};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use xts_mode::Xts128;
use zeroize::Zeroizing;

use crate::store::{Store, StoreError};
use crate::{Error, Volume};

/// The first six bytes of a LUKS image (LUKS1 and LUKS2 alike).
pub const MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The secondary LUKS2 header's magic.
const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// The binary header's length; its JSON area follows it.
const BIN_HEADER_LEN: u64 = 4096;
/// The smallest and largest `hdr_size` (binary header and JSON area).
const MIN_HDR_SIZE: u64 = 0x4000;
const MAX_HDR_SIZE: u64 = 0x40_0000;
/// Where cryptsetup looks for a secondary header when the primary is damaged
/// (`LUKS2_HDR2_OFFSETS`): one per valid header size.
const SECONDARY_OFFSETS: [u64; 9] =
    [0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000];
/// Anti-forensic stripes: cryptsetup writes and accepts only 4000.
const AF_STRIPES: usize = 4000;
/// Salts of keyslots and digests.
const SALT_LEN: usize = 32;
/// The keyslot area's encryption unit.
const AREA_SECTOR: u64 = 512;
/// LUKS2 has at most 32 keyslots.
const MAX_KEYSLOTS: u32 = 32;
/// The most PBKDF2 iterations a keyslot or digest may ask for: a header is
/// untrusted input, and 2^32 iterations would hold a mount for an hour.
/// cryptsetup's own benchmark gives a few million for its 2 s default.
pub const MAX_PBKDF2_ITERATIONS: u32 = 100_000_000;
/// The one cipher capsa reads.
const CIPHER: &str = "aes-xts-plain64";
/// What `check` reads at a time.
const CHECK_CHUNK: usize = 1 << 20;

/// Why a LUKS2 image could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LuksError {
    /// No LUKS magic where a header should be.
    #[error("not a LUKS image: no LUKS header at byte 0 nor at any secondary header offset")]
    NotLuks,
    /// A LUKS1 image.
    #[error(
        "a LUKS1 image: capsa reads LUKS2 only; convert a copy with `cryptsetup convert --type luks2 IMAGE`, or re-create it with `luksFormat --type luks2`"
    )]
    Luks1,
    /// A LUKS version other than 1 and 2.
    #[error("LUKS version {0}: capsa reads LUKS2 only")]
    Version(u16),
    /// Neither header copy is valid.
    #[error("no valid LUKS2 header: primary: {primary}; secondary: {secondary}")]
    Header {
        /// Why the primary failed.
        primary: String,
        /// Why the secondary failed.
        secondary: String,
    },
    /// The metadata is valid JSON with a valid checksum but not valid LUKS2.
    #[error("invalid LUKS2 metadata: {0}")]
    Metadata(String),
    /// Valid LUKS2 that capsa does not read.
    #[error("unsupported LUKS2 image: {what}; {hint}")]
    Unsupported {
        /// What is not supported.
        what: String,
        /// What to do instead.
        hint: String,
    },
    /// A keyslot or digest asks for more PBKDF2 iterations than allowed.
    #[error(
        "{what} asks for {iterations} PBKDF2 iterations, over capsa's limit of {MAX_PBKDF2_ITERATIONS}: re-create the keyslot with fewer (`--pbkdf-force-iterations`)"
    )]
    Iterations {
        /// The keyslot or digest.
        what: String,
        /// How many it asks for.
        iterations: u32,
    },
    /// The passphrase opens no keyslot.
    #[error(
        "no keyslot opens with this key ({tried} tried{skipped}): check that the key file is this image's; its bytes, a trailing newline included, are the passphrase",
        skipped = if *.skipped > 0 { format!(", {} with an unsupported KDF skipped", .skipped) } else { String::new() }
    )]
    WrongKey {
        /// Keyslots tried.
        tried: usize,
        /// Keyslots not tried (Argon2).
        skipped: usize,
    },
    /// The image ends before something the header says is there.
    #[error("{location}: {object} ends before the LUKS2 {what} (bytes {start}..{end}): the image is truncated")]
    Truncated {
        /// The store.
        location: String,
        /// The object.
        object: String,
        /// What is cut off.
        what: &'static str,
        /// Its first byte.
        start: u64,
        /// One past its last.
        end: u64,
    },
    /// The store failed.
    #[error("{location}: {object}: {source}")]
    Store {
        /// The store.
        location: String,
        /// The object.
        object: String,
        /// What the store said.
        #[source]
        source: StoreError,
    },
    /// The crypto library failed (not the data).
    #[error("{0}")]
    Crypto(&'static str),
}

fn unsupported(what: impl Into<String>, hint: impl Into<String>) -> LuksError {
    LuksError::Unsupported { what: what.into(), hint: hint.into() }
}

fn metadata(reason: impl Into<String>) -> LuksError {
    LuksError::Metadata(reason.into())
}

/// Whether `prefix` (an image's first bytes) starts with the LUKS magic.
pub fn is_luks(prefix: &[u8]) -> bool {
    prefix.starts_with(&MAGIC)
}

/// A hash LUKS2 names: for the header checksum, PBKDF2, the AF diffuser.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "sha1" => Some(Self::Sha1),
            "sha256" => Some(Self::Sha256),
            "sha384" => Some(Self::Sha384),
            "sha512" => Some(Self::Sha512),
            _ => None,
        }
    }

    fn parse(name: &str, what: &str) -> Result<Self, LuksError> {
        Self::from_name(name).ok_or_else(|| {
            unsupported(format!("{what} uses the hash {name:?}"), "capsa reads sha1, sha256, sha384 and sha512")
        })
    }

    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Self::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Self::Sha256 => &digest::SHA256,
            Self::Sha384 => &digest::SHA384,
            Self::Sha512 => &digest::SHA512,
        }
    }

    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            Self::Sha1 => pbkdf2::PBKDF2_HMAC_SHA1,
            Self::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Self::Sha384 => pbkdf2::PBKDF2_HMAC_SHA384,
            Self::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    fn len(self) -> usize {
        self.digest().output_len()
    }
}

// ---------------------------------------------------------------------------
// The JSON metadata, as the specification lays it out. Unknown fields are
// ignored (tokens, and fields later versions add); fields that change how
// data is read (`integrity`, segment `flags`, `requirements`) are parsed so
// that they can be refused.

/// A `u64` that LUKS2 writes as a decimal string (JSON numbers lose
/// precision past 2^53).
fn string_u64<'de, D: serde::Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    let text = String::deserialize(de)?;
    parse_u64(&text).ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not a decimal u64")))
}

fn parse_u64(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[derive(Debug, Deserialize)]
struct JsonMetadata {
    keyslots: BTreeMap<String, JsonKeyslot>,
    segments: BTreeMap<String, JsonSegment>,
    digests: BTreeMap<String, JsonDigest>,
    config: JsonConfig,
}

#[derive(Debug, Deserialize)]
struct JsonKeyslot {
    #[serde(rename = "type")]
    kind: String,
    key_size: u32,
    #[serde(default)]
    priority: Option<u8>,
    #[serde(default)]
    af: Option<JsonAf>,
    area: JsonArea,
    #[serde(default)]
    kdf: Option<JsonKdf>,
}

#[derive(Debug, Deserialize)]
struct JsonAf {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    stripes: Option<u32>,
    #[serde(default)]
    hash: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JsonArea {
    #[serde(rename = "type")]
    kind: String,
    #[serde(deserialize_with = "string_u64")]
    offset: u64,
    #[serde(deserialize_with = "string_u64")]
    size: u64,
    #[serde(default)]
    encryption: Option<String>,
    #[serde(default)]
    key_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct JsonKdf {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    hash: Option<String>,
    #[serde(default)]
    iterations: Option<u32>,
    #[serde(default)]
    salt: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JsonSegment {
    #[serde(rename = "type")]
    kind: String,
    #[serde(deserialize_with = "string_u64")]
    offset: u64,
    /// A decimal string, or `dynamic`: to the end of the device.
    size: String,
    #[serde(default)]
    iv_tweak: Option<String>,
    #[serde(default)]
    encryption: Option<String>,
    #[serde(default)]
    sector_size: Option<u32>,
    #[serde(default)]
    integrity: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    flags: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct JsonDigest {
    #[serde(rename = "type")]
    kind: String,
    keyslots: Vec<String>,
    segments: Vec<String>,
    #[serde(default)]
    hash: Option<String>,
    #[serde(default)]
    iterations: Option<u32>,
    #[serde(default)]
    salt: Option<String>,
    #[serde(default)]
    digest: Option<String>,
}

#[derive(Debug, Deserialize)]
struct JsonConfig {
    #[serde(deserialize_with = "string_u64")]
    json_size: u64,
    #[serde(deserialize_with = "string_u64")]
    keyslots_size: u64,
    #[serde(default)]
    requirements: Option<JsonRequirements>,
}

#[derive(Debug, Deserialize)]
struct JsonRequirements {
    #[serde(default)]
    mandatory: Vec<String>,
}

// ---------------------------------------------------------------------------
// The validated header.

/// A keyslot's key derivation.
#[derive(Debug, Clone)]
enum Kdf {
    Pbkdf2 {
        hash: Hash,
        iterations: NonZeroU32,
        salt: [u8; SALT_LEN],
    },
    /// Argon2i or Argon2id: parsed, not opened.
    Unsupported(String),
}

#[derive(Debug, Clone)]
struct Keyslot {
    id: u32,
    /// 2 is tried first, then 1; 0 ("ignore") only when named, so never here.
    priority: u8,
    /// The volume key's size.
    key_size: usize,
    af_hash: Hash,
    area_offset: u64,
    /// The area's encryption key size (AES-XTS: 32 or 64).
    area_key_size: usize,
    kdf: Kdf,
}

impl Keyslot {
    /// The anti-forensic material's length on disk: the stripes, padded to
    /// whole 512-byte sectors.
    fn material_len(&self) -> u64 {
        ((self.key_size * AF_STRIPES) as u64).div_ceil(AREA_SECTOR) * AREA_SECTOR
    }
}

#[derive(Debug, Clone)]
struct DigestCheck {
    hash: Hash,
    iterations: NonZeroU32,
    salt: [u8; SALT_LEN],
    digest: Vec<u8>,
    /// The keyslots it covers.
    keyslots: Vec<u32>,
}

/// A LUKS2 header whose checksum matched and whose metadata describes an
/// image capsa reads: one AES-XTS data segment, PBKDF2 keyslots.
#[derive(Debug, Clone)]
pub struct LuksHeader {
    seqid: u64,
    hdr_size: u64,
    uuid: String,
    label: String,
    from_secondary: bool,
    keyslots: Vec<Keyslot>,
    digest: DigestCheck,
    /// The data segment's first byte.
    data_offset: u64,
    /// Its length, or `None` for `dynamic` (to the end of the image).
    data_size: Option<u64>,
    sector_size: u32,
    /// Added to the 512-byte sector number to make the XTS tweak.
    iv_tweak: u64,
    key_size: usize,
}

/// One header copy that passed its checks, not yet validated as a whole.
struct Candidate {
    seqid: u64,
    hdr_size: u64,
    uuid: String,
    label: String,
    secondary: bool,
    metadata: JsonMetadata,
}

fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// A NUL-terminated string field of the binary header.
fn c_string(bytes: &[u8], range: Range<usize>) -> String {
    let field = bytes.get(range).unwrap_or_default();
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(field.get(..end).unwrap_or_default()).into_owned()
}

/// What [`LuksHeader::read_with`] reads: `len` bytes at `offset`, fewer at
/// the end of the image.
type ReadFn<'a> = dyn FnMut(u64, u64) -> Result<Vec<u8>, LuksError> + 'a;

/// Checks the binary header in `bin` (read at `offset`) and returns its
/// `hdr_size`.
fn sane_binary_header(bin: &[u8], offset: u64, secondary: bool) -> Result<u64, String> {
    if bin.len() < BIN_HEADER_LEN as usize {
        return Err(format!("the image ends inside the header at byte {offset}"));
    }
    let magic = if secondary { MAGIC_SECONDARY } else { MAGIC };
    if !bin.starts_with(&magic) {
        return Err(format!("no header magic at byte {offset}"));
    }
    let version = be_u16(bin, 6).unwrap_or(0);
    if version != 2 {
        return Err(format!("version {version} at byte {offset}, not 2"));
    }
    let hdr_size = be_u64(bin, 8).unwrap_or(0);
    let hdr_offset = be_u64(bin, 256).unwrap_or(u64::MAX);
    if hdr_offset != offset {
        return Err(format!("the header at byte {offset} says it is at byte {hdr_offset}"));
    }
    if !(MIN_HDR_SIZE..=MAX_HDR_SIZE).contains(&hdr_size) || hdr_size % BIN_HEADER_LEN != 0 {
        return Err(format!("bogus header size {hdr_size}"));
    }
    if secondary && hdr_size != offset {
        return Err(format!("the secondary header at byte {offset} gives the header size {hdr_size}"));
    }
    Ok(hdr_size)
}

/// Checks one header copy: `area` is its binary header and JSON area,
/// read at `offset`.
fn check_copy(area: &[u8], offset: u64, secondary: bool) -> Result<Candidate, String> {
    let hdr_size = sane_binary_header(area, offset, secondary)?;
    let area = area.get(..hdr_size as usize).ok_or_else(|| format!("the image ends inside the header at {offset}"))?;
    let (bin, json_area) = area.split_at(BIN_HEADER_LEN as usize);
    let alg_name = c_string(bin, 72..104);
    let hash = Hash::from_name(&alg_name).ok_or_else(|| format!("unknown checksum algorithm {alg_name:?}"))?;
    let mut zeroed = bin.to_vec();
    if let Some(csum) = zeroed.get_mut(448..512) {
        csum.fill(0);
    }
    let mut ctx = digest::Context::new(hash.digest());
    ctx.update(&zeroed);
    ctx.update(json_area);
    let computed = ctx.finish();
    let stored = bin.get(448..448 + hash.len()).unwrap_or_default();
    if computed.as_ref() != stored {
        return Err(format!("checksum mismatch in the header at byte {offset}"));
    }
    // The JSON text, then only NULs (cryptsetup's validate_json_area).
    let end = json_area.iter().position(|&b| b == 0).ok_or("the JSON area has no terminating NUL")?;
    let (text, rest) = json_area.split_at(end);
    if text.first() != Some(&b'{') || rest.iter().any(|&b| b != 0) {
        return Err("the JSON area holds more than one NUL-terminated object".into());
    }
    let metadata: JsonMetadata = serde_json::from_slice(text).map_err(|e| format!("JSON metadata: {e}"))?;
    Ok(Candidate {
        seqid: be_u64(bin, 16).unwrap_or(0),
        hdr_size,
        uuid: c_string(bin, 168..208),
        label: c_string(bin, 24..72),
        secondary,
        metadata,
    })
}

impl LuksHeader {
    /// Parses the header at the start of `image` (its first bytes: at
    /// least both header copies; the whole image works too).
    pub fn parse(image: &[u8]) -> Result<Self, LuksError> {
        Self::read_with(&mut |offset, len| Ok(slice_range(image, offset, len).to_vec()))
    }

    /// Reads the header of the image in `object` of `store`.
    pub fn read(store: &dyn Store, object: &str) -> Result<Self, LuksError> {
        Self::read_with(&mut |offset, len| {
            store.get_range(object, offset..offset.saturating_add(len)).map_err(|source| LuksError::Store {
                location: store.describe(),
                object: object.to_string(),
                source,
            })
        })
    }

    fn read_with(read: &mut ReadFn<'_>) -> Result<Self, LuksError> {
        let first = read(0, BIN_HEADER_LEN)?;
        if first.starts_with(&MAGIC) {
            match be_u16(&first, 6) {
                Some(1) => return Err(LuksError::Luks1),
                Some(2) => {}
                Some(v) => return Err(LuksError::Version(v)),
                None => {}
            }
        }
        let (primary, secondary) = match sane_binary_header(&first, 0, false) {
            Ok(hdr_size) => {
                // Both copies in one read.
                let both = read(0, 2 * hdr_size)?;
                let primary = check_copy(&both, 0, false);
                let secondary = check_copy(slice_range(&both, hdr_size, hdr_size), hdr_size, true);
                (primary, secondary)
            }
            Err(e) => {
                let mut secondary = Err("no secondary header at any known offset".to_string());
                for offset in SECONDARY_OFFSETS {
                    let bin = read(offset, BIN_HEADER_LEN)?;
                    let Ok(hdr_size) = sane_binary_header(&bin, offset, true) else { continue };
                    secondary = check_copy(&read(offset, hdr_size)?, offset, true);
                    if secondary.is_ok() {
                        break;
                    }
                }
                (Err(e), secondary)
            }
        };
        let chosen = match (primary, secondary) {
            (Ok(p), Ok(s)) => {
                if s.seqid > p.seqid {
                    s
                } else {
                    p
                }
            }
            (Ok(p), Err(_)) => p,
            (Err(_), Ok(s)) => s,
            (Err(primary), Err(secondary)) => {
                if !first.starts_with(&MAGIC) && secondary.starts_with("no secondary header") {
                    return Err(LuksError::NotLuks);
                }
                return Err(LuksError::Header { primary, secondary });
            }
        };
        Self::validate(chosen)
    }

    fn validate(c: Candidate) -> Result<Self, LuksError> {
        let m = c.metadata;
        if let Some(req) = &m.config.requirements {
            if !req.mandatory.is_empty() {
                return Err(unsupported(
                    format!("it requires {}", req.mandatory.join(", ")),
                    "finish the operation with cryptsetup first (e.g. `cryptsetup reencrypt --resume-only`)",
                ));
            }
        }
        if m.config.json_size != c.hdr_size - BIN_HEADER_LEN {
            return Err(metadata(format!(
                "config.json_size {} does not match the header size {}",
                m.config.json_size, c.hdr_size
            )));
        }
        let areas_start = 2 * c.hdr_size;
        let areas_end = areas_start
            .checked_add(m.config.keyslots_size)
            .ok_or_else(|| metadata("config.keyslots_size overflows"))?;

        // The data segment.
        if m.segments.len() != 1 {
            return Err(unsupported(
                format!("{} data segments", m.segments.len()),
                "capsa reads images with exactly one segment (a reencryption may be in progress: finish it with cryptsetup)",
            ));
        }
        let segment = m.segments.get("0").ok_or_else(|| metadata("the one segment is not segment 0"))?;
        if segment.kind != "crypt" {
            return Err(unsupported(format!("a {:?} segment", segment.kind), "capsa reads encrypted (crypt) segments"));
        }
        if segment.integrity.is_some() {
            return Err(unsupported(
                "a segment with dm-integrity (authenticated encryption)",
                "capsa reads LUKS2 without --integrity; use capsa's own image format for integrity",
            ));
        }
        if !segment.flags.is_empty() {
            return Err(unsupported(
                format!("segment flags {}", segment.flags.join(", ")),
                "finish the reencryption with cryptsetup first",
            ));
        }
        let encryption = segment.encryption.as_deref().unwrap_or("");
        if encryption != CIPHER {
            return Err(unsupported(
                format!("the data cipher {encryption:?}"),
                "capsa reads aes-xts-plain64, as the Azure recipe makes (`--cipher aes-xts-plain64`)",
            ));
        }
        let sector_size = segment.sector_size.ok_or_else(|| metadata("segment 0 has no sector_size"))?;
        if !matches!(sector_size, 512 | 1024 | 2048 | 4096) {
            return Err(metadata(format!("segment 0 has sector size {sector_size}")));
        }
        let iv_tweak = match &segment.iv_tweak {
            Some(text) => parse_u64(text).ok_or_else(|| metadata(format!("segment 0 has iv_tweak {text:?}")))?,
            None => return Err(metadata("segment 0 has no iv_tweak")),
        };
        let data_size = match segment.size.as_str() {
            "dynamic" => None,
            text => {
                let size = parse_u64(text).ok_or_else(|| metadata(format!("segment 0 has size {text:?}")))?;
                if size == 0 || size % u64::from(sector_size) != 0 {
                    return Err(metadata(format!("segment 0's size {size} is not whole {sector_size}-byte sectors")));
                }
                Some(size)
            }
        };
        if segment.offset % AREA_SECTOR != 0 {
            return Err(metadata(format!("segment 0's offset {} is not whole 512-byte sectors", segment.offset)));
        }
        if segment.offset < areas_end {
            return Err(unsupported(
                format!(
                    "the data segment starts at byte {}, inside the header and keyslots (bytes 0..{areas_end})",
                    segment.offset
                ),
                "a detached header (`luksFormat --header`) is not supported: capsa needs the header and the data in one image",
            ));
        }
        if let Some(size) = data_size {
            segment.offset.checked_add(size).ok_or_else(|| metadata("segment 0's end overflows"))?;
        }

        // The digest of segment 0's key.
        let mut bound = m.digests.iter().filter(|(_, d)| d.segments.iter().any(|s| s == "0"));
        let (digest_id, digest) = bound.next().ok_or_else(|| metadata("no digest covers segment 0"))?;
        if bound.next().is_some() {
            return Err(metadata("more than one digest covers segment 0"));
        }
        if digest.kind != "pbkdf2" {
            return Err(unsupported(format!("a {:?} digest", digest.kind), "LUKS2 defines pbkdf2 digests only"));
        }
        let what = format!("digest {digest_id}");
        let hash = Hash::parse(digest.hash.as_deref().unwrap_or(""), &what)?;
        let iterations = parse_iterations(digest.iterations, &what)?;
        let salt = parse_salt(digest.salt.as_deref(), &what)?;
        let value = STANDARD
            .decode(digest.digest.as_deref().unwrap_or(""))
            .map_err(|e| metadata(format!("{what}: the digest is not base64: {e}")))?;
        // As cryptsetup: 20 bytes (LUKS1's SHA-1 length) or the hash's.
        if value.len() != 20 && value.len() != hash.len() {
            return Err(metadata(format!("{what}: a {}-byte digest", value.len())));
        }
        let mut digest_keyslots = Vec::new();
        for id in &digest.keyslots {
            digest_keyslots.push(
                id.parse::<u32>()
                    .ok()
                    .filter(|&n| n < MAX_KEYSLOTS && id == &n.to_string())
                    .ok_or_else(|| metadata(format!("{what} names the keyslot {id:?}")))?,
            );
        }
        let digest = DigestCheck { hash, iterations, salt, digest: value, keyslots: digest_keyslots };

        // The keyslots.
        let mut keyslots = Vec::new();
        for (id_text, slot) in &m.keyslots {
            let id = id_text
                .parse::<u32>()
                .ok()
                .filter(|&n| n < MAX_KEYSLOTS && id_text == &n.to_string())
                .ok_or_else(|| metadata(format!("a keyslot is named {id_text:?}")))?;
            let what = format!("keyslot {id}");
            if slot.kind != "luks2" {
                return Err(unsupported(
                    format!("{what} has the type {:?}", slot.kind),
                    "capsa reads luks2 keyslots (a reencryption may be in progress: finish it with cryptsetup)",
                ));
            }
            let area = &slot.area;
            if area.kind != "raw" {
                return Err(metadata(format!("{what} has an area of type {:?}", area.kind)));
            }
            let area_cipher = area.encryption.as_deref().unwrap_or("");
            if area_cipher != CIPHER {
                return Err(unsupported(
                    format!("{what}'s area is encrypted with {area_cipher:?}"),
                    "capsa reads keyslots encrypted with aes-xts-plain64 (cryptsetup's default)",
                ));
            }
            let area_key_size = area.key_size.unwrap_or(0) as usize;
            if !matches!(area_key_size, 32 | 64) {
                return Err(metadata(format!("{what}'s area key is {area_key_size} bytes, not 32 or 64")));
            }
            let af = slot.af.as_ref().ok_or_else(|| metadata(format!("{what} has no af")))?;
            if af.kind != "luks1" || af.stripes != Some(AF_STRIPES as u32) {
                return Err(metadata(format!("{what} has the AF {:?} with {:?} stripes", af.kind, af.stripes)));
            }
            let af_hash = Hash::parse(af.hash.as_deref().unwrap_or(""), &format!("{what}'s AF"))?;
            let kdf_json = slot.kdf.as_ref().ok_or_else(|| metadata(format!("{what} has no kdf")))?;
            let kdf = match kdf_json.kind.as_str() {
                "pbkdf2" => Kdf::Pbkdf2 {
                    hash: Hash::parse(kdf_json.hash.as_deref().unwrap_or(""), &what)?,
                    iterations: parse_iterations(kdf_json.iterations, &what)?,
                    salt: parse_salt(kdf_json.salt.as_deref(), &what)?,
                },
                "argon2i" | "argon2id" => Kdf::Unsupported(kdf_json.kind.clone()),
                other => return Err(metadata(format!("{what} has the KDF {other:?}"))),
            };
            let slot_key_size = slot.key_size as usize;
            if !(1..=512).contains(&slot_key_size) {
                return Err(metadata(format!("{what} holds a {slot_key_size}-byte key")));
            }
            let keyslot = Keyslot {
                id,
                priority: slot.priority.unwrap_or(1),
                key_size: slot_key_size,
                af_hash,
                area_offset: area.offset,
                area_key_size,
                kdf,
            };
            let area_end =
                area.offset.checked_add(area.size).ok_or_else(|| metadata(format!("{what}'s area overflows")))?;
            if area.offset < areas_start || area_end > areas_end || area.offset % AREA_SECTOR != 0 {
                return Err(metadata(format!(
                    "{what}'s area (bytes {}..{area_end}) is not inside the keyslots area (bytes {areas_start}..{areas_end})",
                    area.offset
                )));
            }
            if keyslot.material_len() > area.size {
                return Err(metadata(format!("{what}'s area is too small for its key material")));
            }
            keyslots.push(keyslot);
        }
        // Areas must not overlap (cryptsetup's hdr_validate_areas).
        let mut areas: Vec<(u64, u64)> =
            m.keyslots.values().map(|k| (k.area.offset, k.area.offset.saturating_add(k.area.size))).collect();
        areas.sort_unstable();
        if areas.windows(2).any(|w| matches!(w, [a, b] if a.1 > b.0)) {
            return Err(metadata("keyslot areas overlap"));
        }
        keyslots.retain(|k| digest.keyslots.contains(&k.id) && k.priority > 0);
        // Highest priority first, then by number (cryptsetup's order).
        keyslots.sort_by_key(|k| (std::cmp::Reverse(k.priority), k.id));
        let key_size = keyslots
            .first()
            .map(|k| k.key_size)
            .ok_or_else(|| metadata("no keyslot (of a priority other than ignore) holds segment 0's key"))?;
        if keyslots.iter().any(|k| k.key_size != key_size) {
            return Err(metadata("the keyslots of segment 0 hold keys of different sizes"));
        }
        if !matches!(key_size, 32 | 64) {
            return Err(unsupported(
                format!("a {}-bit aes-xts-plain64 key", key_size * 8),
                "capsa reads 256- and 512-bit keys (`--key-size 512` is cryptsetup's default)",
            ));
        }

        Ok(Self {
            seqid: c.seqid,
            hdr_size: c.hdr_size,
            uuid: c.uuid,
            label: c.label,
            from_secondary: c.secondary,
            keyslots,
            digest,
            data_offset: segment.offset,
            data_size,
            sector_size,
            iv_tweak,
            key_size,
        })
    }

    /// The image's UUID.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// Its label (often empty).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The header's sequence number (each metadata update adds one).
    pub fn seqid(&self) -> u64 {
        self.seqid
    }

    /// The size of each header copy (binary header and JSON area).
    pub fn header_size(&self) -> u64 {
        self.hdr_size
    }

    /// Whether the secondary copy was used (the primary was damaged or older).
    pub fn from_secondary(&self) -> bool {
        self.from_secondary
    }

    /// Where the encrypted data starts.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The data's length, or `None` when it runs to the end of the image.
    pub fn data_size(&self) -> Option<u64> {
        self.data_size
    }

    /// The encryption sector size: 512 to 4096 bytes.
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }

    /// The data cipher (always `aes-xts-plain64` here).
    pub fn cipher(&self) -> &'static str {
        CIPHER
    }

    /// The volume key's size in bits.
    pub fn key_bits(&self) -> usize {
        self.key_size * 8
    }

    /// The keyslots that hold the data's key, in the order they are tried.
    pub fn keyslots(&self) -> Vec<u32> {
        self.keyslots.iter().map(|k| k.id).collect()
    }

    /// Opens a keyslot of the image in `object` of `store` with
    /// `passphrase` and returns the volume key.
    pub fn unlock(&self, store: &dyn Store, object: &str, passphrase: &[u8]) -> Result<VolumeKey, LuksError> {
        let names = (store.describe(), object.to_string());
        self.unlock_with(passphrase, names, &mut |offset, len| {
            store.get_range(object, offset..offset.saturating_add(len)).map_err(|source| LuksError::Store {
                location: store.describe(),
                object: object.to_string(),
                source,
            })
        })
    }

    /// [`unlock`](Self::unlock) for an image in memory (its first bytes, up
    /// to the end of its keyslot areas).
    pub fn unlock_bytes(&self, image: &[u8], passphrase: &[u8]) -> Result<VolumeKey, LuksError> {
        let names = ("memory".to_string(), "image".to_string());
        self.unlock_with(passphrase, names, &mut |offset, len| Ok(slice_range(image, offset, len).to_vec()))
    }

    /// `names` are the store's and the object's, for messages.
    fn unlock_with(
        &self,
        passphrase: &[u8],
        names: (String, String),
        read: &mut ReadFn<'_>,
    ) -> Result<VolumeKey, LuksError> {
        let mut tried = 0;
        let mut skipped = Vec::new();
        for slot in &self.keyslots {
            let (hash, iterations, salt) = match &slot.kdf {
                Kdf::Pbkdf2 { hash, iterations, salt } => (hash, iterations, salt),
                Kdf::Unsupported(kind) => {
                    skipped.push(kind.as_str());
                    continue;
                }
            };
            tried += 1;
            let mut area_key = Zeroizing::new(vec![0u8; slot.area_key_size]);
            pbkdf2::derive(hash.pbkdf2(), *iterations, salt, passphrase, &mut area_key);
            let len = slot.material_len();
            let mut material = Zeroizing::new(read(slot.area_offset, len)?);
            if (material.len() as u64) < len {
                return Err(LuksError::Truncated {
                    location: names.0,
                    object: names.1,
                    what: "keyslot area",
                    start: slot.area_offset,
                    end: slot.area_offset + len,
                });
            }
            let xts = Xts::new(&area_key)?;
            for (index, sector) in material.chunks_exact_mut(AREA_SECTOR as usize).enumerate() {
                xts.decrypt(sector, index as u64);
            }
            let candidate = af_merge(&material, slot.key_size, slot.af_hash);
            if self.digest_matches(&candidate) {
                return Ok(VolumeKey { key: candidate, keyslot: slot.id });
            }
        }
        if tried == 0 {
            skipped.dedup();
            return Err(unsupported(
                format!("every keyslot uses {}", skipped.join(" or ")),
                "capsa opens PBKDF2 keyslots only: re-create the image with `--pbkdf pbkdf2` as the Azure recipe does, or add one with `cryptsetup luksAddKey --pbkdf pbkdf2 IMAGE`",
            ));
        }
        Err(LuksError::WrongKey { tried, skipped: skipped.len() })
    }

    fn digest_matches(&self, key: &[u8]) -> bool {
        let d = &self.digest;
        let mut computed = Zeroizing::new(vec![0u8; d.digest.len()]);
        pbkdf2::derive(d.hash.pbkdf2(), d.iterations, &d.salt, key, &mut computed);
        bool::from(computed.as_slice().ct_eq(&d.digest))
    }
}

fn parse_iterations(value: Option<u32>, what: &str) -> Result<NonZeroU32, LuksError> {
    let n = value.unwrap_or(0);
    if n > MAX_PBKDF2_ITERATIONS {
        return Err(LuksError::Iterations { what: what.to_string(), iterations: n });
    }
    NonZeroU32::new(n).ok_or_else(|| metadata(format!("{what} has no PBKDF2 iteration count")))
}

fn parse_salt(value: Option<&str>, what: &str) -> Result<[u8; SALT_LEN], LuksError> {
    let bytes =
        STANDARD.decode(value.unwrap_or("")).map_err(|e| metadata(format!("{what}: the salt is not base64: {e}")))?;
    bytes.try_into().map_err(|b: Vec<u8>| metadata(format!("{what}: a {}-byte salt, not {SALT_LEN}", b.len())))
}

/// `len` bytes of `bytes` at `offset`, fewer past its end.
fn slice_range(bytes: &[u8], offset: u64, len: u64) -> &[u8] {
    let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
    let end = usize::try_from(offset.saturating_add(len)).unwrap_or(usize::MAX).min(bytes.len());
    bytes.get(start..end).unwrap_or_default()
}

/// The anti-forensic merge (cryptsetup's `AF_merge`): XOR each stripe but
/// the last into a buffer, diffusing after each; the key is the buffer XOR
/// the last stripe.
fn af_merge(material: &[u8], key_size: usize, hash: Hash) -> Zeroizing<Vec<u8>> {
    let mut buf = Zeroizing::new(vec![0u8; key_size]);
    let mut stripes = material.chunks_exact(key_size).take(AF_STRIPES);
    for stripe in stripes.by_ref().take(AF_STRIPES - 1) {
        xor_into(&mut buf, stripe);
        diffuse(&mut buf, hash);
    }
    if let Some(last) = stripes.next() {
        xor_into(&mut buf, last);
    }
    buf
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Each digest-sized block `i` of `buf` (the last may be shorter) becomes
/// `H(be32(i) || block)`, cut to the block's length.
fn diffuse(buf: &mut [u8], hash: Hash) {
    for (i, block) in buf.chunks_mut(hash.len()).enumerate() {
        let mut ctx = digest::Context::new(hash.digest());
        ctx.update(&(i as u32).to_be_bytes());
        ctx.update(block);
        let out = ctx.finish();
        for (b, o) in block.iter_mut().zip(out.as_ref()) {
            *b = *o;
        }
    }
}

/// AES-XTS with a 256- or 512-bit key (AES-128 or AES-256), decrypting
/// whole sectors with the tweak `le128(n)`.
enum Xts {
    Aes128(Box<Xts128<Aes128>>),
    Aes256(Box<Xts128<Aes256>>),
}

impl Xts {
    fn new(key: &[u8]) -> Result<Self, LuksError> {
        let bad = |_| LuksError::Crypto("AES-XTS rejected its key");
        let (k1, k2) = key.split_at(key.len() / 2);
        match key.len() {
            32 => Ok(Self::Aes128(Box::new(Xts128::new(
                Aes128::new_from_slice(k1).map_err(bad)?,
                Aes128::new_from_slice(k2).map_err(bad)?,
            )))),
            64 => Ok(Self::Aes256(Box::new(Xts128::new(
                Aes256::new_from_slice(k1).map_err(bad)?,
                Aes256::new_from_slice(k2).map_err(bad)?,
            )))),
            _ => Err(LuksError::Crypto("AES-XTS takes a 32- or 64-byte key")),
        }
    }

    /// Decrypts one sector (at least 16 bytes, a multiple of 16: the
    /// callers pass 512 to 4096) in place.
    fn decrypt(&self, sector: &mut [u8], tweak: u64) {
        let tweak = u128::from(tweak).to_le_bytes();
        match self {
            Self::Aes128(x) => x.decrypt_sector(sector, tweak),
            Self::Aes256(x) => x.decrypt_sector(sector, tweak),
        }
    }
}

/// A LUKS2 volume key, wiped when dropped. Its bytes never leave this
/// module.
pub struct VolumeKey {
    key: Zeroizing<Vec<u8>>,
    keyslot: u32,
}

impl VolumeKey {
    /// The keyslot that opened.
    pub fn keyslot(&self) -> u32 {
        self.keyslot
    }
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeKey").field("bits", &(self.key.len() * 8)).field("keyslot", &self.keyslot).finish()
    }
}

/// The size of `object` in `store` (a HEAD for an object store); callers
/// that know it (a local file's metadata) should pass it instead.
pub fn object_size(store: &dyn Store, object: &str) -> Result<u64, LuksError> {
    store.size(object).map_err(|source| LuksError::Store {
        location: store.describe(),
        object: object.to_string(),
        source,
    })
}

/// A LUKS2 image opened read-only: the decrypted data segment, as a
/// [`Volume`] for the FUSE device. Each read is one ranged read of the
/// whole sectors it touches, decrypted sector by sector.
///
/// Nothing checks the data's integrity (see the module docs).
pub struct LuksVolume {
    store: Arc<dyn Store>,
    object: String,
    header: LuksHeader,
    keyslot: u32,
    xts: Xts,
    size: u64,
}

impl LuksVolume {
    /// Reads the header of `object` in `store`, opens a keyslot with
    /// `passphrase` (the key file's bytes) and checks the key against the
    /// header's digest. `object_size` is the object's size if known; when
    /// the data segment runs to the end of the image and it is not given,
    /// it is found with [`object_size`].
    pub fn open(
        store: Arc<dyn Store>,
        object: &str,
        passphrase: &[u8],
        object_size: Option<u64>,
    ) -> Result<Self, LuksError> {
        let header = LuksHeader::read(&*store, object)?;
        let key = header.unlock(&*store, object, passphrase)?;
        let sector = u64::from(header.sector_size);
        let truncated = |end| LuksError::Truncated {
            location: store.describe(),
            object: object.to_string(),
            what: "data segment",
            start: header.data_offset,
            end,
        };
        let size = match header.data_size {
            Some(size) => {
                let end = header.data_offset + size;
                if object_size.is_some_and(|total| total < end) {
                    return Err(truncated(end));
                }
                size
            }
            None => {
                let total = match object_size {
                    Some(total) => total,
                    None => self::object_size(&*store, object)?,
                };
                // Whole sectors only: cryptsetup refuses to open an image
                // whose data is not, and a partial sector cannot be read.
                let data = total.checked_sub(header.data_offset).ok_or_else(|| truncated(header.data_offset))?;
                data / sector * sector
            }
        };
        let xts = Xts::new(&key.key)?;
        Ok(Self { store, object: object.to_string(), keyslot: key.keyslot, header, xts, size })
    }

    /// The header it was opened with.
    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    /// The keyslot that opened.
    pub fn keyslot(&self) -> u32 {
        self.keyslot
    }

    /// Reads (and so decrypts) the whole data segment once, returning the
    /// bytes read: that the store serves every sector. It cannot say whether
    /// any sector holds what its owner wrote (see the module docs).
    pub fn check(&self) -> Result<u64, Error> {
        let mut buf = vec![0u8; CHECK_CHUNK];
        let mut offset = 0;
        while offset < self.size {
            let n = self.read_at(offset, &mut buf)?;
            if n == 0 {
                break;
            }
            offset += n as u64;
        }
        Ok(offset)
    }

    fn store_error(&self, source: StoreError) -> Error {
        Error::Store { location: self.store.describe(), object: self.object.clone(), source }
    }
}

impl Volume for LuksVolume {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.size - offset);
        let sector = u64::from(self.header.sector_size);
        let first = offset / sector;
        let end = (offset + len).div_ceil(sector);
        let start_byte = self.header.data_offset + first * sector;
        let end_byte = self.header.data_offset + end * sector;
        let mut data = self.store.get_range(&self.object, start_byte..end_byte).map_err(|e| self.store_error(e))?;
        if (data.len() as u64) < end_byte - start_byte {
            return Err(self.store_error(StoreError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "the image ends at byte {}, inside its LUKS2 data segment (which the header says ends at {})",
                    start_byte + data.len() as u64,
                    self.header.data_offset + self.size
                ),
            ))));
        }
        let per_sector = sector / AREA_SECTOR;
        for (i, chunk) in data.chunks_exact_mut(sector as usize).enumerate() {
            // plain64 counts 512-byte sectors for LUKS2 (no iv_large_sectors),
            // modulo 2^64 as dm-crypt's.
            let tweak = ((first + i as u64) * per_sector).wrapping_add(self.header.iv_tweak);
            self.xts.decrypt(chunk, tweak);
        }
        let skip = (offset - first * sector) as usize;
        let len = len as usize;
        let src = data.get(skip..skip + len).ok_or(Error::Crypto("a LUKS2 read went out of its buffer"))?;
        let dst = buf.get_mut(..len).ok_or(Error::Crypto("a LUKS2 read went out of its buffer"))?;
        dst.copy_from_slice(src);
        Ok(len)
    }

    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<(), Error> {
        Err(Error::ReadOnly)
    }

    fn commit(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// A LUKS2 image named by a location that is one file or one blob.
pub struct LuksLocation {
    /// The store holding it (the file's directory, the blob's container and
    /// prefix).
    pub store: Arc<dyn Store>,
    /// Its name in the store.
    pub object: String,
    /// Its size, when known without a request (local files).
    pub size: Option<u64>,
}

impl LuksLocation {
    /// If `location` names a single file or blob that starts with the LUKS
    /// magic, where it is; `None` for anything else (a capsa image's
    /// directory or prefix, or a file that is not LUKS). A location that
    /// cannot be read is `None` too: the caller's own open says why.
    pub fn detect(location: &str) -> Option<Self> {
        let local = location.strip_prefix("file://").unwrap_or(location);
        if !location.contains("://") || location.starts_with("file://") {
            let path = std::path::Path::new(local);
            let meta = std::fs::metadata(path).ok()?;
            if !meta.is_file() {
                return None;
            }
            let mut prefix = [0u8; 6];
            let mut file = std::fs::File::open(path).ok()?;
            std::io::Read::read_exact(&mut file, &mut prefix).ok()?;
            if !is_luks(&prefix) {
                return None;
            }
            let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let object = path.file_name()?.to_str()?.to_string();
            return Some(Self { store: Arc::new(crate::store::LocalStore::open(dir)), object, size: Some(meta.len()) });
        }
        let (parent, object) = split_blob_url(location)?;
        let store = crate::remote::open(&parent).ok()?;
        let prefix = store.get_range(&object, 0..MAGIC.len() as u64).ok()?;
        is_luks(&prefix).then_some(Self { store, object, size: None })
    }
}

/// `scheme://container/dir/name?query` → (`scheme://container/dir?query`,
/// `name`), if the URL has a path with a last segment.
fn split_blob_url(location: &str) -> Option<(String, String)> {
    let (base, query) = match location.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (location, None),
    };
    let (scheme, rest) = base.split_once("://")?;
    let (parent, name) = rest.trim_end_matches('/').rsplit_once('/')?;
    if name.is_empty() || parent.is_empty() {
        return None;
    }
    let parent = match query {
        Some(query) => format!("{scheme}://{parent}?{query}"),
        None => format!("{scheme}://{parent}"),
    };
    Some((parent, name.to_string()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::Command;
    use std::sync::OnceLock;

    use serde_json::{Value, json};

    use super::*;
    use crate::LocalStore;

    /// The image the Azure recipe made in a QEMU guest (tests/fixtures/PROVENANCE.md).
    const FIXTURE_ZST: &[u8] = include_bytes!("../tests/fixtures/luks2-azure.img.zst");
    const FIXTURE_KEY: &[u8] = include_bytes!("../tests/fixtures/luks2-azure.key");
    /// As `cryptsetup luksDump` printed them for the fixture.
    const FIXTURE_UUID: &str = "da1ff866-d2b7-4497-a9ac-bdc783bccb5a";
    const FIXTURE_EPOCH: u64 = 4;
    /// As `dumpe2fs -h` printed it in the guest.
    const FIXTURE_FS_UUID: &str = "abe9529f-cda0-4f53-9a2a-b0f65b620b28";

    fn fixture() -> &'static [u8] {
        static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
        IMAGE.get_or_init(|| zstd::decode_all(FIXTURE_ZST).unwrap())
    }

    /// The fixture (or `image`) as a file in a fresh directory, and a store over it.
    fn stored(image: &[u8]) -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("encfs.img"), image).unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()));
        (dir, store)
    }

    /// Rewrites both header copies' JSON with `edit` and fixes their checksums.
    fn edit_json(image: &[u8], edit: impl Fn(&mut Value)) -> Vec<u8> {
        let mut image = image.to_vec();
        let hdr_size = be_u64(&image, 8).unwrap() as usize;
        let json_area = &image[4096..hdr_size];
        let end = json_area.iter().position(|&b| b == 0).unwrap();
        let mut value: Value = serde_json::from_slice(&json_area[..end]).unwrap();
        edit(&mut value);
        let text = serde_json::to_vec(&value).unwrap();
        for offset in [0, hdr_size] {
            let area = &mut image[offset + 4096..offset + hdr_size];
            area.fill(0);
            area[..text.len()].copy_from_slice(&text);
            fix_checksum(&mut image, offset, hdr_size);
        }
        image
    }

    fn fix_checksum(image: &mut [u8], offset: usize, hdr_size: usize) {
        image[offset + 448..offset + 512].fill(0);
        let sum = digest::digest(&digest::SHA256, &image[offset..offset + hdr_size]);
        image[offset + 448..offset + 480].copy_from_slice(sum.as_ref());
    }

    #[test]
    fn the_fixture_header_is_the_azure_recipe() {
        let header = LuksHeader::parse(fixture()).unwrap();
        assert_eq!(header.uuid(), FIXTURE_UUID);
        assert_eq!(header.seqid(), FIXTURE_EPOCH);
        assert_eq!(header.header_size(), 16384);
        assert!(!header.from_secondary());
        assert_eq!(header.data_offset(), 16 << 20);
        assert_eq!(header.data_size(), None, "size: dynamic");
        assert_eq!(header.sector_size(), 4096);
        assert_eq!(header.cipher(), "aes-xts-plain64");
        assert_eq!(header.key_bits(), 512);
        assert_eq!(header.keyslots(), vec![0]);
        assert_eq!(header.label(), "");
    }

    #[test]
    fn the_fixture_opens_with_its_key_file_and_not_another() {
        let header = LuksHeader::parse(fixture()).unwrap();
        let key = header.unlock_bytes(fixture(), FIXTURE_KEY).unwrap();
        assert_eq!(key.keyslot(), 0);
        assert_eq!(key.key.len(), 64);
        assert_eq!(format!("{key:?}"), "VolumeKey { bits: 512, keyslot: 0 }", "no key bytes in Debug");
        let mut wrong = FIXTURE_KEY.to_vec();
        wrong[31] ^= 1;
        let err = header.unlock_bytes(fixture(), &wrong).unwrap_err();
        assert!(matches!(err, LuksError::WrongKey { tried: 1, skipped: 0 }), "{err}");
        assert!(err.to_string().contains("no keyslot opens with this key"), "{err}");
        // A newline is part of the passphrase, as for cryptsetup --key-file.
        let mut newline = FIXTURE_KEY.to_vec();
        newline.push(b'\n');
        assert!(header.unlock_bytes(fixture(), &newline).is_err());
    }

    /// The data segment's tweak counts 512-byte sectors: 4 KiB sector n has
    /// the tweak 8n. mkfs.ext4 zeroed the journal through dm-crypt, so its
    /// blocks decrypt to zeros with the right tweak and to noise with the
    /// "large sectors" one (n).
    #[test]
    fn the_data_tweak_counts_512_byte_sectors_as_dm_crypt_wrote_them() {
        let (_dir, store) = stored(fixture());
        let volume = LuksVolume::open(store, "encfs.img", FIXTURE_KEY, None).unwrap();
        assert_eq!(volume.size(), (64 << 20) - (16 << 20));
        let mut superblock = [0u8; 1024];
        assert_eq!(volume.read_at(1024, &mut superblock).unwrap(), 1024);
        assert_eq!(&superblock[56..58], &[0x53, 0xef], "the ext4 magic");
        assert_eq!(hex::encode(&superblock[104..120]), FIXTURE_FS_UUID.replace('-', ""));

        let image = fixture();
        let mut zero_blocks = Vec::new();
        let mut block = vec![0u8; 4096];
        for n in 0..volume.size() / 4096 {
            volume.read_at(n * 4096, &mut block).unwrap();
            if block.iter().all(|&b| b == 0) {
                let raw = &image[(16 << 20) + n as usize * 4096..][..4096];
                if raw.iter().any(|&b| b != 0) {
                    zero_blocks.push(n);
                }
            }
        }
        assert!(zero_blocks.len() >= 1000, "the zeroed journal: {} blocks", zero_blocks.len());
        for &n in zero_blocks.iter().filter(|&&n| n > 0).take(16) {
            let mut raw = image[(16 << 20) + n as usize * 4096..][..4096].to_vec();
            volume.xts.decrypt(&mut raw, n);
            assert!(raw.iter().any(|&b| b != 0), "block {n} must not decrypt with the large-sector tweak");
        }
    }

    #[test]
    fn reads_span_sectors_and_stop_at_the_end() {
        let (_dir, store) = stored(fixture());
        let volume = LuksVolume::open(store, "encfs.img", FIXTURE_KEY, Some(64 << 20)).unwrap();
        let mut whole = vec![0u8; 3 * 4096];
        assert_eq!(volume.read_at(0, &mut whole).unwrap(), whole.len());
        let mut part = vec![0u8; 5000];
        assert_eq!(volume.read_at(1000, &mut part).unwrap(), 5000);
        assert_eq!(part, whole[1000..6000]);
        let size = volume.size();
        assert_eq!(volume.read_at(size - 10, &mut part).unwrap(), 10);
        assert_eq!(volume.read_at(size, &mut part).unwrap(), 0);
        assert!(matches!(volume.write_at(0, b"x"), Err(Error::ReadOnly)));
        volume.commit().unwrap();
        assert!(volume.read_only());
        assert_eq!(volume.check().unwrap(), size);
    }

    #[test]
    fn a_truncated_image_is_an_error_not_garbage() {
        let image = &fixture()[..(20 << 20) + 100];
        let (_dir, store) = stored(image);
        // Told a larger size than the object has: reads past the end fail.
        let volume = LuksVolume::open(store.clone(), "encfs.img", FIXTURE_KEY, Some(64 << 20)).unwrap();
        let mut buf = vec![0u8; 8192];
        assert!(volume.read_at(0, &mut buf).is_ok());
        let err = volume.read_at(5 << 20, &mut buf).unwrap_err();
        assert!(err.to_string().contains("inside its LUKS2 data segment"), "{err}");
        // Found from the object: whole sectors only.
        let volume = LuksVolume::open(store, "encfs.img", FIXTURE_KEY, None).unwrap();
        assert_eq!(volume.size(), 4 << 20);
        // Cut inside the keyslot area: a clear error.
        let (_dir, store) = stored(&fixture()[..100_000]);
        let err = LuksVolume::open(store, "encfs.img", FIXTURE_KEY, None).err().unwrap();
        assert!(matches!(err, LuksError::Truncated { what: "keyslot area", .. }), "{err}");
    }

    #[test]
    fn a_damaged_primary_falls_back_to_the_secondary_and_two_fail_clearly() {
        let mut image = fixture()[..1 << 20].to_vec();
        image[5000] ^= 0x20; // in the primary's JSON area
        let header = LuksHeader::parse(&image).unwrap();
        assert!(header.from_secondary());
        assert!(header.unlock_bytes(&image, FIXTURE_KEY).is_ok());
        image[16384 + 5000] ^= 0x20;
        let err = LuksHeader::parse(&image).unwrap_err();
        assert!(matches!(err, LuksError::Header { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        // A wiped primary: found again at the secondary's offset.
        let mut image = fixture()[..1 << 20].to_vec();
        image[..4096].fill(0);
        assert!(LuksHeader::parse(&image).unwrap().from_secondary());
        // The newer copy wins.
        let mut image = fixture()[..1 << 20].to_vec();
        image[16384 + 16..16384 + 24].copy_from_slice(&(FIXTURE_EPOCH + 1).to_be_bytes());
        fix_checksum(&mut image, 16384, 16384);
        let header = LuksHeader::parse(&image).unwrap();
        assert!(header.from_secondary());
        assert_eq!(header.seqid(), FIXTURE_EPOCH + 1);
    }

    #[test]
    fn not_luks_luks1_and_garbage_are_told_apart() {
        assert!(matches!(LuksHeader::parse(&[0u8; 8192]), Err(LuksError::NotLuks)));
        assert!(matches!(LuksHeader::parse(b""), Err(LuksError::NotLuks)));
        let mut luks1 = vec![0u8; 4096];
        luks1[..6].copy_from_slice(&MAGIC);
        luks1[7] = 1;
        let err = LuksHeader::parse(&luks1).unwrap_err();
        assert!(matches!(err, LuksError::Luks1), "{err}");
        assert!(err.to_string().contains("cryptsetup convert"), "{err}");
        // Prefixes of the image: an error until the primary copy is whole,
        // then the primary alone; never a panic.
        let image = &fixture()[..40_000];
        for len in (0..image.len()).step_by(997).chain([6, 8, 4095, 4096, 16383, 16384, 32767, 32768]) {
            let parsed = LuksHeader::parse(&image[..len]);
            assert_eq!(parsed.is_ok(), len >= 16384, "{len}");
            if len >= 16384 {
                let err = parsed.unwrap().unlock_bytes(&image[..len], FIXTURE_KEY).unwrap_err();
                assert!(matches!(err, LuksError::Truncated { what: "keyslot area", .. }), "{err}");
            }
        }
        // Garbage after the checksum: the JSON parser's error, in words.
        let broken = edit_json(fixture(), |v| *v = json!({"keyslots": {}}));
        let err = LuksHeader::parse(&broken).unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
    }

    #[test]
    fn what_capsa_does_not_read_is_refused_with_a_reason() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit, &str)> = vec![
            ("cbc", Box::new(|v| v["segments"]["0"]["encryption"] = json!("aes-cbc-essiv:sha256")), "data cipher"),
            (
                "integrity",
                Box::new(|v| v["segments"]["0"]["integrity"] = json!({"type": "hmac(sha256)"})),
                "dm-integrity",
            ),
            ("two segments", Box::new(|v| v["segments"]["1"] = v["segments"]["0"].clone()), "2 data segments"),
            ("detached", Box::new(|v| v["segments"]["0"]["offset"] = json!("0")), "detached header"),
            (
                "reencryption",
                Box::new(|v| v["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]})),
                "online-reencrypt-v2",
            ),
            ("segment flags", Box::new(|v| v["segments"]["0"]["flags"] = json!(["backup-final"])), "segment flags"),
            (
                "iterations",
                Box::new(|v| v["keyslots"]["0"]["kdf"]["iterations"] = json!(4_000_000_000u32)),
                "PBKDF2 iterations",
            ),
            ("bad offset", Box::new(|v| v["segments"]["0"]["offset"] = json!("-1")), "decimal u64"),
            (
                "area outside",
                Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = json!("16777216")),
                "not inside the keyslots area",
            ),
            ("stripes", Box::new(|v| v["keyslots"]["0"]["af"]["stripes"] = json!(1)), "stripes"),
            ("salt", Box::new(|v| v["digests"]["0"]["salt"] = json!("AAAA")), "3-byte salt"),
            ("json_size", Box::new(|v| v["config"]["json_size"] = json!("4096")), "json_size"),
            ("key size", Box::new(|v| v["keyslots"]["0"]["key_size"] = json!(48)), "384-bit"),
        ];
        for (name, edit, expected) in cases {
            let image = edit_json(fixture(), edit);
            let err = LuksHeader::parse(&image).unwrap_err().to_string();
            assert!(err.contains(expected), "{name}: {err}");
        }
        // Argon2: parsed, then refused at unlock with what to do.
        let image = edit_json(fixture(), |v| {
            v["keyslots"]["0"]["kdf"] = json!({"type": "argon2id", "time": 4, "memory": 1048576, "cpus": 4,
                "salt": v["keyslots"]["0"]["kdf"]["salt"].clone()})
        });
        let err = LuksHeader::parse(&image).unwrap().unlock_bytes(&image, FIXTURE_KEY).unwrap_err().to_string();
        assert!(err.contains("argon2id") && err.contains("--pbkdf pbkdf2"), "{err}");
    }

    /// Runs cryptsetup, which must succeed.
    fn cryptsetup(args: &[&str]) -> String {
        let out = Command::new("cryptsetup").args(args).output().unwrap();
        assert!(out.status.success(), "cryptsetup {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// The volume key as `luksDump --dump-volume-key` prints it (hex pairs
    /// after `MK dump:`, over several lines).
    fn dumped_key(image: &Path, key_file: &Path) -> Vec<u8> {
        let out = cryptsetup(&[
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
            key_file.to_str().unwrap(),
            image.to_str().unwrap(),
        ]);
        let dump = out.split("MK dump:").nth(1).expect("MK dump in luksDump's output");
        let hex: String =
            dump.lines().take_while(|l| l.starts_with('\t') || l.is_empty() || l.starts_with(' ')).collect();
        hex::decode(hex.split_whitespace().collect::<String>()).unwrap()
    }

    #[test]
    fn volume_keys_equal_what_cryptsetup_dumps() {
        if !capsa_testkit::have("cryptsetup") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image");
        let key_file = dir.path().join("key");
        let other_key = dir.path().join("other");
        std::fs::write(&key_file, b"a passphrase from a key file\n").unwrap();
        std::fs::write(&other_key, [7u8; 32]).unwrap();
        let formats: &[&[&str]] = &[
            // Azure's recipe.
            &["--cipher", "aes-xts-plain64", "--key-size", "512", "--sector-size", "4096", "--pbkdf", "pbkdf2"],
            // Another hash, a 256-bit key, 512-byte sectors, a larger header.
            &[
                "--cipher",
                "aes-xts-plain64",
                "--key-size",
                "256",
                "--sector-size",
                "512",
                "--pbkdf",
                "pbkdf2",
                "--hash",
                "sha512",
                "--luks2-metadata-size",
                "65536",
                "--luks2-keyslots-size",
                "4194304",
            ],
        ];
        for format in formats {
            std::fs::write(&image, []).unwrap();
            std::fs::File::options().write(true).open(&image).unwrap().set_len(24 << 20).unwrap();
            let mut args = vec!["luksFormat", "--type", "luks2", "--batch-mode", "--pbkdf-force-iterations", "1000"];
            args.extend_from_slice(format);
            args.extend([image.to_str().unwrap(), key_file.to_str().unwrap()]);
            cryptsetup(&args);
            // A second keyslot with another key.
            cryptsetup(&[
                "luksAddKey",
                "--batch-mode",
                "--pbkdf",
                "pbkdf2",
                "--pbkdf-force-iterations",
                "1000",
                "--key-file",
                key_file.to_str().unwrap(),
                image.to_str().unwrap(),
                other_key.to_str().unwrap(),
            ]);
            let expected = dumped_key(&image, &key_file);
            let bytes = std::fs::read(&image).unwrap();
            let header = LuksHeader::parse(&bytes).unwrap();
            assert_eq!(header.keyslots(), vec![0, 1]);
            let key = header.unlock_bytes(&bytes, &std::fs::read(&key_file).unwrap()).unwrap();
            assert_eq!((key.keyslot(), key.key.as_slice()), (0, expected.as_slice()), "{format:?}");
            let key = header.unlock_bytes(&bytes, &[7u8; 32]).unwrap();
            assert_eq!((key.keyslot(), key.key.as_slice()), (1, expected.as_slice()), "{format:?}");
            assert!(matches!(header.unlock_bytes(&bytes, b"nope"), Err(LuksError::WrongKey { tried: 2, .. })));
        }

        // cryptsetup's own default KDF (Argon2id): parsed, refused at unlock.
        std::fs::File::create(&image).unwrap().set_len(24 << 20).unwrap();
        cryptsetup(&[
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--pbkdf-memory",
            "32768",
            "--pbkdf-force-iterations",
            "4",
            image.to_str().unwrap(),
            key_file.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&image).unwrap();
        let err = LuksHeader::parse(&bytes).unwrap().unlock_bytes(&bytes, b"x").unwrap_err();
        assert!(matches!(err, LuksError::Unsupported { .. }), "{err}");

        // LUKS1.
        std::fs::File::create(&image).unwrap().set_len(24 << 20).unwrap();
        cryptsetup(&[
            "luksFormat",
            "--type",
            "luks1",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            image.to_str().unwrap(),
            key_file.to_str().unwrap(),
        ]);
        assert!(matches!(LuksHeader::parse(&std::fs::read(&image).unwrap()), Err(LuksError::Luks1)));

        // A detached header: the header file says the data starts at 0.
        let header_file = dir.path().join("header");
        std::fs::File::create(&header_file).unwrap().set_len(16 << 20).unwrap();
        cryptsetup(&[
            "luksFormat",
            "--type",
            "luks2",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--header",
            header_file.to_str().unwrap(),
            image.to_str().unwrap(),
            key_file.to_str().unwrap(),
        ]);
        let err = LuksHeader::parse(&std::fs::read(&header_file).unwrap()).unwrap_err().to_string();
        assert!(err.contains("detached header"), "{err}");
    }

    #[test]
    fn object_sizes_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path());
        for size in [0u64, 1, 4095, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 17, 9 << 20] {
            std::fs::File::create(dir.path().join("blob")).unwrap().set_len(size).unwrap();
            assert_eq!(object_size(&store, "blob").unwrap(), size);
        }
        assert!(matches!(object_size(&store, "missing"), Err(LuksError::Store { source: StoreError::NotFound, .. })));
    }

    #[test]
    fn blob_urls_split_into_a_store_and_a_name() {
        assert_eq!(
            split_blob_url("https://acct.blob.core.windows.net/c/dir/encfs.img?sv=1&sig=x"),
            Some(("https://acct.blob.core.windows.net/c/dir?sv=1&sig=x".into(), "encfs.img".into()))
        );
        assert_eq!(split_blob_url("az://container/encfs.img"), Some(("az://container".into(), "encfs.img".into())));
        assert_eq!(split_blob_url("s3://bucket"), None);
        assert_eq!(split_blob_url("no-scheme/x"), None);
    }

    #[test]
    fn local_files_are_detected_by_their_magic() {
        let dir = tempfile::tempdir().unwrap();
        let luks = dir.path().join("encfs.img");
        std::fs::write(&luks, &fixture()[..65536]).unwrap();
        let found = LuksLocation::detect(luks.to_str().unwrap()).unwrap();
        assert_eq!((found.object.as_str(), found.size), ("encfs.img", Some(65536)));
        assert!(LuksLocation::detect(&format!("file://{}", luks.display())).is_some());
        std::fs::write(dir.path().join("other"), b"not luks at all").unwrap();
        assert!(LuksLocation::detect(dir.path().join("other").to_str().unwrap()).is_none());
        assert!(LuksLocation::detect(dir.path().to_str().unwrap()).is_none(), "a directory is a capsa image");
    }
}
