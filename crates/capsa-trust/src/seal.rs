//! The master key and what it protects: every secret the store keeps (key
//! material, token signing keys) is sealed with AES-256-GCM under a key
//! derived from it, and the audit log is chained with an HMAC under
//! another.
//!
//! The master key never enters the database. It comes from a file readable
//! by its owner alone, or from the environment, so that a copy of the data
//! directory's database alone reveals no key, and an edited record (or one
//! moved to another slot: the slot is the associated data) fails to open.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hkdf::{HKDF_SHA256, Salt};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// The environment variable that may hold the master key (64 hex digits).
pub const MASTER_KEY_ENV: &str = "CAPSA_TRUST_MASTER_KEY";

/// Why the master key could not be had, or a sealed value not opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The key file could not be read or created.
    #[error("master key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The key file may be read by others.
    #[error(
        "master key file {path} has mode {mode:o}: it must be readable by its owner alone (chmod 600 {path})",
        path = path.display()
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key is not 32 bytes of hex.
    #[error("the master key from {source_name} must be 64 hex digits (32 bytes)")]
    Format {
        /// The file or variable it came from.
        source_name: String,
    },
    /// A sealed value did not open: wrong master key, or the value was edited.
    #[error("a sealed {what} did not open: the store was written under another master key, or the record was altered")]
    Open {
        /// What was being opened.
        what: &'static str,
    },
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// The 32-byte master key. Debug never shows it.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// From the environment variable when it is set, otherwise from `path`,
    /// which is created (0600, written and synced before use) when absent.
    pub fn load_or_create(path: &Path) -> Result<Self, SealError> {
        if let Ok(text) = std::env::var(MASTER_KEY_ENV) {
            return Self::from_hex(text.trim(), MASTER_KEY_ENV);
        }
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(SealError::Permissions { path: path.to_owned(), mode });
                }
                let text = Zeroizing::new(
                    std::fs::read_to_string(path).map_err(|source| SealError::Io { path: path.to_owned(), source })?,
                );
                Self::from_hex(text.trim(), &path.display().to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(SealError::Io { path: path.to_owned(), source }),
        }
    }

    /// From the environment variable when it is set, otherwise from `path`,
    /// which must exist: for tools that open an existing store.
    pub fn load(path: &Path) -> Result<Self, SealError> {
        if std::env::var_os(MASTER_KEY_ENV).is_none() && !path.exists() {
            return Err(SealError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no master key (and {MASTER_KEY_ENV} is not set)"),
                ),
            });
        }
        Self::load_or_create(path)
    }

    fn create(path: &Path) -> Result<Self, SealError> {
        let mut key = Zeroizing::new([0u8; 32]);
        SystemRandom::new().fill(key.as_mut()).map_err(|_| SealError::Random)?;
        let text = Zeroizing::new(format!("{}\n", hex::encode(key.as_ref())));
        write_private(path, text.as_bytes()).map_err(|source| SealError::Io { path: path.to_owned(), source })?;
        Ok(Self(key))
    }

    /// From 64 hex digits.
    pub fn from_hex(text: &str, source_name: &str) -> Result<Self, SealError> {
        let mut key = Zeroizing::new([0u8; 32]);
        hex::decode_to_slice(text, key.as_mut())
            .map_err(|_| SealError::Format { source_name: source_name.to_owned() })?;
        Ok(Self(key))
    }

    /// The sealer and the audit MAC key, each derived with HKDF-SHA-256 for
    /// its one purpose.
    pub fn derive(&self) -> Result<(Sealer, hmac::Key), SealError> {
        let prk = Salt::new(HKDF_SHA256, b"capsa-trust master key v1").extract(self.0.as_ref());
        let mut seal = Zeroizing::new([0u8; 32]);
        let mut mac = Zeroizing::new([0u8; 32]);
        prk.expand(&[b"seal"], HKDF_SHA256).and_then(|okm| okm.fill(seal.as_mut())).map_err(|_| SealError::Random)?;
        prk.expand(&[b"audit-mac"], HKDF_SHA256)
            .and_then(|okm| okm.fill(mac.as_mut()))
            .map_err(|_| SealError::Random)?;
        let key = UnboundKey::new(&AES_256_GCM, seal.as_ref()).map_err(|_| SealError::Random)?;
        Ok((
            Sealer { key: LessSafeKey::new(key), random: SystemRandom::new() },
            hmac::Key::new(hmac::HMAC_SHA256, mac.as_ref()),
        ))
    }
}

/// Writes `bytes` to `path` readable by its owner alone (0600), atomically
/// and durably: under a temporary name, synced, renamed, and the directory
/// synced, so a crash never leaves a truncated key or token behind.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the path has no file name"))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all()).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => std::fs::File::open(".")?.sync_all(),
    }
}

/// Seals and opens values with AES-256-GCM; the associated data names the
/// slot a value belongs in.
pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// nonce || ciphertext || tag.
    pub fn seal(&self, slot: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + 16);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(slot.as_bytes()), &mut body)
            .map_err(|_| SealError::Random)?;
        out.extend_from_slice(&body);
        body.fill(0);
        Ok(out)
    }

    /// The plaintext of a value sealed for `slot`.
    pub fn open(&self, what: &'static str, slot: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let (nonce, body) = sealed.split_at_checked(NONCE_LEN).ok_or(SealError::Open { what })?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open { what })?;
        let mut body = Zeroizing::new(body.to_vec());
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(slot.as_bytes()), body.as_mut_slice())
            .map_err(|_| SealError::Open { what })?;
        Ok(Zeroizing::new(plain.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer(byte: u8) -> Sealer {
        MasterKey::from_hex(&hex::encode([byte; 32]), "test").unwrap().derive().unwrap().0
    }

    #[test]
    fn sealed_values_open_only_in_their_slot_under_their_key() {
        let s = sealer(1);
        let sealed = s.seal("keys/a", b"secret").unwrap();
        assert_eq!(s.open("key", "keys/a", &sealed).unwrap().as_slice(), b"secret");
        assert!(s.open("key", "keys/b", &sealed).is_err());
        assert!(sealer(2).open("key", "keys/a", &sealed).is_err());
        let mut edited = sealed.clone();
        edited[20] ^= 1;
        assert!(s.open("key", "keys/a", &edited).is_err());
        assert!(s.open("key", "keys/a", &sealed[..5]).is_err());
    }

    #[test]
    fn the_key_file_is_created_private_and_refused_when_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let first = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let again = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(first.0.as_ref(), again.0.as_ref());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = MasterKey::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!format!("{first:?}").contains(&hex::encode(first.0.as_ref())));
    }
}
