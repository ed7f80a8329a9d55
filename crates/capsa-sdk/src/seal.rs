//! Sealed files: a 12-byte random nonce, then the AES-256-GCM ciphertext
//! and its 16-byte tag, with empty associated data.
//!
//! The data owner seals a file on their own machine with a 256-bit key that
//! they import into the key broker under a release policy; a workload in a
//! sandbox gets that key through the workload API and unseals the file. The
//! format is the plainest one common tools can produce, so that owners need
//! not use capsa to seal.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use zeroize::Zeroizing;

/// The key length: AES-256.
pub const KEY_LEN: usize = 32;
/// The nonce that begins a sealed file.
pub const NONCE_LENGTH: usize = NONCE_LEN;
/// The tag that ends a sealed file.
pub const TAG_LEN: usize = 16;

/// A failure to seal or unseal.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SealError {
    /// The key is not 32 bytes.
    #[error("the key is {len} bytes; AES-256-GCM takes {KEY_LEN}")]
    KeyLength {
        /// The length given.
        len: usize,
    },
    /// The sealed data is shorter than a nonce and a tag.
    #[error("the sealed data is {len} bytes, shorter than a nonce and a tag ({})", NONCE_LENGTH + TAG_LEN)]
    TooShort {
        /// The length given.
        len: usize,
    },
    /// The tag did not verify.
    #[error("the sealed data does not open with this key: the wrong key, or the data was altered")]
    Open,
    /// No random nonce could be drawn.
    #[error("cannot draw a random nonce")]
    Random,
    /// The cipher refused the input (longer than AES-GCM allows).
    #[error("cannot seal: the input is too long for AES-GCM")]
    Seal,
}

fn cipher(key: &[u8]) -> Result<LessSafeKey, SealError> {
    if key.len() != KEY_LEN {
        return Err(SealError::KeyLength { len: key.len() });
    }
    // aws-lc-rs copies the key into its own context, which it zeroizes on drop.
    let key = UnboundKey::new(&AES_256_GCM, key).map_err(|_| SealError::KeyLength { len: key.len() })?;
    Ok(LessSafeKey::new(key))
}

/// Seals `plaintext` under `key` with a fresh random nonce.
///
/// # Errors
/// [`SealError::KeyLength`], [`SealError::Random`] or [`SealError::Seal`].
pub fn seal(key: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let cipher = cipher(key)?;
    let mut nonce = [0_u8; NONCE_LENGTH];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| SealError::Random)?;
    let mut sealed = Vec::with_capacity(NONCE_LENGTH + plaintext.len() + TAG_LEN);
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(plaintext);
    let mut body = sealed.split_off(NONCE_LENGTH);
    cipher
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body)
        .map_err(|_| SealError::Seal)?;
    sealed.append(&mut body);
    Ok(sealed)
}

/// Opens data sealed under `key`, returning the plaintext, zeroized on drop.
///
/// # Errors
/// [`SealError::KeyLength`], [`SealError::TooShort`] or [`SealError::Open`].
pub fn unseal(key: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
    let cipher = cipher(key)?;
    if sealed.len() < NONCE_LENGTH + TAG_LEN {
        return Err(SealError::TooShort { len: sealed.len() });
    }
    let (nonce, body) = sealed.split_at(NONCE_LENGTH);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::TooShort { len: sealed.len() })?;
    let mut in_out = Zeroizing::new(body.to_vec());
    let plain_len = cipher.open_in_place(nonce, Aad::empty(), &mut in_out).map_err(|_| SealError::Open)?.len();
    in_out.truncate(plain_len);
    Ok(in_out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let key = [7_u8; KEY_LEN];
        let sealed = seal(&key, b"the plaintext").unwrap();
        assert_eq!(sealed.len(), NONCE_LENGTH + 13 + TAG_LEN);
        assert_eq!(unseal(&key, &sealed).unwrap().as_slice(), b"the plaintext");
        assert_ne!(seal(&key, b"the plaintext").unwrap(), sealed, "nonces must differ");
        assert_eq!(unseal(&key, &seal(&key, b"").unwrap()).unwrap().as_slice(), b"");
    }

    #[test]
    fn tampering_and_wrong_keys_fail() {
        let key = [7_u8; KEY_LEN];
        let sealed = seal(&key, b"data").unwrap();
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(unseal(&key, &bad), Err(SealError::Open), "byte {i}");
        }
        assert_eq!(unseal(&[8_u8; KEY_LEN], &sealed), Err(SealError::Open));
        assert_eq!(unseal(&key, &sealed[..27]), Err(SealError::TooShort { len: 27 }));
        assert_eq!(seal(&[0_u8; 16], b"x"), Err(SealError::KeyLength { len: 16 }));
    }
}
