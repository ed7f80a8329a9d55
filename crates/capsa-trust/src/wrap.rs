//! `RSA_AES_KEY_WRAP_256` (PKCS#11 `CKM_RSA_AES_KEY_WRAP`), the scheme Azure
//! Key Vault secure key release wraps a released key with, and the `key_hsm`
//! envelope Azure returns it in.
//!
//! The workload proves who it is with attestation and names an RSA public
//! key bound to that attestation; the key is released wrapped to it, so only
//! the attested guest, which holds the private half, can read it. Azure's
//! scheme is used unchanged so that a workload written for Azure Key Vault
//! unwraps keys from the capsa trust service with the same code:
//!
//! 1. a fresh random 32-byte AES key is encrypted with RSA-OAEP (SHA-256,
//!    MGF1-SHA-256, empty label) to the target key;
//! 2. the key material is wrapped under that AES key with AES key wrap with
//!    padding (RFC 5649);
//! 3. the ciphertext is the RSA ciphertext (exactly the modulus length)
//!    followed by the key wrap output.
//!
//! Both layers are authenticated (OAEP by its padding check, RFC 5649 by its
//! integrity check value), so an altered ciphertext fails to unwrap rather
//! than yielding other key material. The ephemeral AES key and every
//! plaintext buffer are zeroized, and no error carries key bytes.
//!
//! Target keys are RSA with 2048- to 4096-bit moduli and an odd public
//! exponent from 3 to 2^32; smaller keys are too weak to protect a released
//! key, larger ones are refused to bound the work an unauthenticated request
//! can cause.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::key_wrap::{AES_256, AesKek, KeyWrapPadded};
use aws_lc_rs::rsa::{
    KeySize, OAEP_SHA256_MGF1SHA256, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, PublicKeyComponents,
};
use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use zeroize::Zeroizing;

/// The length of the ephemeral AES key: AES-256.
pub const AES_KEY_LEN: usize = 32;

/// The smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// The largest RSA modulus accepted, in bits.
pub const MAX_RSA_BITS: usize = 4096;

/// The longest key material wrapped or unwrapped. An RSA-4096 PKCS#8 key
/// is about 2.4 KiB; the limit leaves room without letting a request make
/// the service encrypt megabytes.
pub const MAX_KEY_MATERIAL_LEN: usize = 16 * 1024;

/// The longest `key_hsm` string parsed.
pub const MAX_KEY_HSM_LEN: usize = 64 * 1024;

/// The `enc` of a `key_hsm` envelope.
pub const KEY_HSM_ENC: &str = "CKM_RSA_AES_KEY_WRAP";

/// RFC 5649 output is the input padded to 8 bytes plus an 8-byte integrity
/// block.
const KWP_OVERHEAD: usize = 8;

/// Base64url as JWK and Azure write it (no padding), decoding padded input
/// too since some producers pad.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_encode_padding(false).with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a key could not be wrapped or unwrapped, or an envelope not read.
/// No variant carries key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WrapError {
    /// A JWK member is not base64url.
    #[error("jwk {field:?} is not base64url; encode it as RFC 7518 says (base64url, no padding)")]
    JwkEncoding {
        /// `n` or `e`.
        field: &'static str,
    },
    /// The RSA modulus has a size outside the accepted range.
    #[error("rsa modulus has {bits} bits; use a key of {MIN_RSA_BITS} to {MAX_RSA_BITS} bits")]
    ModulusSize {
        /// Its size.
        bits: usize,
    },
    /// The modulus is even, so not an RSA modulus.
    #[error("jwk \"n\" is even, so it is not an rsa modulus; check the key")]
    EvenModulus,
    /// The public exponent is not supported.
    #[error("rsa public exponent {exponent} is not supported; use an odd exponent from 3 to 2^32 (65537 is usual)")]
    Exponent {
        /// The exponent, in decimal, or a description when it is too large to print.
        exponent: String,
    },
    /// aws-lc refused the public key.
    #[error("the rsa public key was refused; check the jwk \"n\" and \"e\"")]
    PublicKeyRejected,
    /// A key size that cannot be generated.
    #[error("cannot generate a {bits}-bit rsa wrapping key; use 2048, 3072 or 4096")]
    KeySize {
        /// The size asked for.
        bits: usize,
    },
    /// RSA key generation failed.
    #[error("rsa key generation failed (internal error)")]
    KeyGeneration,
    /// The public key could not be encoded.
    #[error("the rsa public key could not be encoded (internal error)")]
    PublicKeyEncoding,
    /// There is nothing to wrap.
    #[error("key material is empty; there is nothing to wrap")]
    EmptyKeyMaterial,
    /// The key material is too long.
    #[error("key material is {len} bytes, above the {limit}-byte limit")]
    KeyMaterialTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The random number generator failed.
    #[error("the system random number generator failed")]
    Random,
    /// RSA-OAEP encryption failed.
    #[error("rsa-oaep encryption failed (internal error)")]
    RsaEncrypt,
    /// AES key wrap failed.
    #[error("aes key wrap failed (internal error)")]
    KeyWrap,
    /// The wrapped key has an impossible length for the unwrapping key.
    #[error(
        "wrapped key is {len} bytes; for a {modulus_len}-byte rsa modulus it must be {modulus_len} bytes \
         plus a multiple of 8 of at least 16: it was truncated, or wrapped to another key"
    )]
    CiphertextLength {
        /// Its length.
        len: usize,
        /// The unwrapping key's modulus length in bytes.
        modulus_len: usize,
    },
    /// RSA-OAEP decryption failed.
    #[error("rsa-oaep decryption failed: the key was wrapped to another rsa key, or the ciphertext was altered")]
    RsaDecrypt,
    /// The RSA layer did not hold an AES-256 key.
    #[error("the rsa layer holds {found} bytes, not a 32-byte aes key: the sender did not use rsa_aes_key_wrap_256")]
    AesKeyLength {
        /// The length found.
        found: usize,
    },
    /// AES key unwrap failed its integrity check.
    #[error("aes key unwrap failed its integrity check: the ciphertext was altered")]
    KeyUnwrap,
    /// The `key_hsm` string is too long.
    #[error("key_hsm is {len} bytes, above the {limit}-byte limit")]
    KeyHsmTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A `key_hsm` layer is not base64url.
    #[error("key_hsm {field} is not base64url")]
    KeyHsmEncoding {
        /// Which layer: `key_hsm` itself or its `ciphertext`.
        field: &'static str,
    },
    /// The `key_hsm` JSON does not have the envelope's shape.
    #[error("key_hsm is not a CKM_RSA_AES_KEY_WRAP envelope ({0})")]
    KeyHsmJson(serde_json::Error),
    /// A `key_hsm` field has a value this scheme does not use.
    #[error("key_hsm {field} is {found:?}, expected {expected}")]
    KeyHsmField {
        /// The field.
        field: &'static str,
        /// The value wanted.
        expected: &'static str,
        /// The value present, truncated.
        found: String,
    },
}

/// An RSA public key as the base64url `n` and `e` members of a JWK.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RsaPublicJwk {
    /// The modulus, big-endian without leading zeros, base64url.
    pub n: String,
    /// The public exponent, big-endian without leading zeros, base64url.
    pub e: String,
}

/// The JWK members of an RSA public key, for a workload to publish the key
/// it wants keys wrapped to.
///
/// # Errors
/// [`WrapError::PublicKeyEncoding`] if aws-lc cannot encode the key.
pub fn rsa_public_jwk(key: &PublicEncryptingKey) -> Result<RsaPublicJwk, WrapError> {
    let spki = key.as_der().map_err(|_| WrapError::PublicKeyEncoding)?;
    let public = aws_lc_rs::rsa::PublicKey::from_der(spki.as_ref()).map_err(|_| WrapError::PublicKeyEncoding)?;
    Ok(RsaPublicJwk {
        n: B64URL.encode(public.modulus().big_endian_without_leading_zero()),
        e: B64URL.encode(public.exponent().big_endian_without_leading_zero()),
    })
}

/// Generates an RSA key to receive wrapped keys (exponent 65537).
///
/// # Errors
/// [`WrapError::KeySize`] unless `bits` is 2048, 3072 or 4096;
/// [`WrapError::KeyGeneration`] if aws-lc fails.
pub fn generate_rsa_wrapping_key(bits: usize) -> Result<PrivateDecryptingKey, WrapError> {
    let size = match bits {
        2048 => KeySize::Rsa2048,
        3072 => KeySize::Rsa3072,
        4096 => KeySize::Rsa4096,
        _ => return Err(WrapError::KeySize { bits }),
    };
    PrivateDecryptingKey::generate(size).map_err(|_| WrapError::KeyGeneration)
}

/// A validated RSA public key to wrap keys to. Only [`WrappingKey::from_jwk`]
/// makes one, so holding one means the size and exponent were checked.
#[derive(Debug)]
pub struct WrappingKey {
    oaep: OaepPublicEncryptingKey,
    modulus_len: usize,
}

impl WrappingKey {
    /// Reads and checks the base64url `n` and `e` of an RSA JWK.
    ///
    /// Leading zero bytes are tolerated (RFC 7518 forbids them, some
    /// producers emit them anyway, and the integer is the same).
    ///
    /// # Errors
    /// [`WrapError::JwkEncoding`], [`WrapError::ModulusSize`],
    /// [`WrapError::EvenModulus`], [`WrapError::Exponent`] or
    /// [`WrapError::PublicKeyRejected`].
    pub fn from_jwk(n: &str, e: &str) -> Result<Self, WrapError> {
        let n_bytes = B64URL.decode(n).map_err(|_| WrapError::JwkEncoding { field: "n" })?;
        let e_bytes = B64URL.decode(e).map_err(|_| WrapError::JwkEncoding { field: "e" })?;
        let n = without_leading_zeros(&n_bytes);
        let e = without_leading_zeros(&e_bytes);

        let bits = n.first().map_or(0, |top| n.len() * 8 - top.leading_zeros() as usize);
        if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
            return Err(WrapError::ModulusSize { bits });
        }
        if n.last().is_some_and(|low| low & 1 == 0) {
            return Err(WrapError::EvenModulus);
        }
        // At most 4 bytes once leading zeros are gone: 2^32 itself is even,
        // so "up to 2^32" and "below 2^32" accept the same odd exponents.
        let exponent = if e.len() <= 4 { e.iter().fold(0_u64, |acc, b| acc << 8 | u64::from(*b)) } else { u64::MAX };
        if exponent < 3 || exponent % 2 == 0 || exponent > 1 << 32 {
            let shown = if exponent == u64::MAX { format!("of {} bytes", e.len()) } else { exponent.to_string() };
            return Err(WrapError::Exponent { exponent: shown });
        }

        let public: PublicEncryptingKey =
            PublicKeyComponents { n, e }.try_into().map_err(|_| WrapError::PublicKeyRejected)?;
        let modulus_len = public.key_size_bytes();
        if modulus_len != n.len() {
            return Err(WrapError::PublicKeyRejected);
        }
        let oaep = OaepPublicEncryptingKey::new(public).map_err(|_| WrapError::PublicKeyRejected)?;
        Ok(Self { oaep, modulus_len })
    }

    /// Checks a public key held as an aws-lc key, as a workload holding its
    /// own key pair would.
    ///
    /// # Errors
    /// As [`WrappingKey::from_jwk`].
    pub fn from_public_key(key: &PublicEncryptingKey) -> Result<Self, WrapError> {
        let jwk = rsa_public_jwk(key)?;
        Self::from_jwk(&jwk.n, &jwk.e)
    }

    /// The modulus length in bytes: the length of the RSA part of a wrapped
    /// key.
    #[must_use]
    pub fn modulus_len(&self) -> usize {
        self.modulus_len
    }
}

fn without_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

/// Wraps key material to `target` with `RSA_AES_KEY_WRAP_256`.
///
/// # Errors
/// [`WrapError::EmptyKeyMaterial`] or [`WrapError::KeyMaterialTooLong`] for
/// bad input; [`WrapError::Random`], [`WrapError::RsaEncrypt`] or
/// [`WrapError::KeyWrap`] if aws-lc fails.
pub fn wrap_key(target: &WrappingKey, key_material: &[u8]) -> Result<Vec<u8>, WrapError> {
    if key_material.is_empty() {
        return Err(WrapError::EmptyKeyMaterial);
    }
    if key_material.len() > MAX_KEY_MATERIAL_LEN {
        return Err(WrapError::KeyMaterialTooLong { len: key_material.len(), limit: MAX_KEY_MATERIAL_LEN });
    }

    let mut aes_key = Zeroizing::new([0_u8; AES_KEY_LEN]);
    aws_lc_rs::rand::fill(aes_key.as_mut_slice()).map_err(|_| WrapError::Random)?;

    let mut out = vec![0_u8; target.oaep.ciphertext_size()];
    let rsa_len = target
        .oaep
        .encrypt(&OAEP_SHA256_MGF1SHA256, aes_key.as_slice(), &mut out, None)
        .map_err(|_| WrapError::RsaEncrypt)?
        .len();
    if rsa_len != target.modulus_len {
        return Err(WrapError::RsaEncrypt);
    }
    out.truncate(rsa_len);

    // The key encryption key copies the AES key and zeroizes its copy on drop.
    let kek = AesKek::new(&AES_256, aes_key.as_slice()).map_err(|_| WrapError::KeyWrap)?;
    let mut kwp = vec![0_u8; key_material.len() + 2 * KWP_OVERHEAD - 1];
    let kwp_len = kek.wrap_with_padding(key_material, &mut kwp).map_err(|_| WrapError::KeyWrap)?.len();
    kwp.truncate(kwp_len);
    out.extend_from_slice(&kwp);
    Ok(out)
}

/// Unwraps `RSA_AES_KEY_WRAP_256` ciphertext with the private key it was
/// wrapped to.
///
/// # Errors
/// [`WrapError::ModulusSize`] for a key outside the accepted sizes,
/// [`WrapError::CiphertextLength`] for a truncated or misrouted ciphertext,
/// [`WrapError::RsaDecrypt`], [`WrapError::AesKeyLength`] or
/// [`WrapError::KeyUnwrap`] when it does not decrypt.
pub fn unwrap_key(key: &PrivateDecryptingKey, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, WrapError> {
    let bits = key.key_size_bits();
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(WrapError::ModulusSize { bits });
    }
    let modulus_len = key.key_size_bytes();
    let length_error = WrapError::CiphertextLength { len: ciphertext.len(), modulus_len };
    let Some((rsa_part, kwp_part)) = ciphertext.split_at_checked(modulus_len) else {
        return Err(length_error);
    };
    // RFC 5649 output is at least two blocks of 8 bytes and a whole number of
    // them; checking here gives a clear error before any decryption.
    if kwp_part.len() < 2 * KWP_OVERHEAD
        || kwp_part.len() % KWP_OVERHEAD != 0
        || kwp_part.len() > MAX_KEY_MATERIAL_LEN + 2 * KWP_OVERHEAD
    {
        return Err(length_error);
    }

    let oaep = OaepPrivateDecryptingKey::new(key.clone()).map_err(|_| WrapError::RsaDecrypt)?;
    let mut aes_key = Zeroizing::new(vec![0_u8; oaep.min_output_size()]);
    let aes_len =
        oaep.decrypt(&OAEP_SHA256_MGF1SHA256, rsa_part, &mut aes_key, None).map_err(|_| WrapError::RsaDecrypt)?.len();
    let aes_key = match aes_key.get(..aes_len) {
        Some(k) if aes_len == AES_KEY_LEN => k,
        _ => return Err(WrapError::AesKeyLength { found: aes_len }),
    };

    let kek = AesKek::new(&AES_256, aes_key).map_err(|_| WrapError::KeyUnwrap)?;
    let mut plain = Zeroizing::new(vec![0_u8; kwp_part.len()]);
    let plain_len = kek.unwrap_with_padding(kwp_part, &mut plain).map_err(|_| WrapError::KeyUnwrap)?.len();
    plain.truncate(plain_len);
    Ok(plain)
}

/// A wrapped key in Azure's `key_hsm` envelope: the value of the `key_hsm`
/// member of the JWK that secure key release returns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyHsm {
    /// The identifier of the RSA key the key was wrapped to.
    pub kid: String,
    /// `RSA_AES_KEY_WRAP_256` ciphertext, as [`wrap_key`] makes it.
    pub ciphertext: Vec<u8>,
}

/// The envelope as Azure writes it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    schema_version: String,
    header: Header,
    ciphertext: String,
    /// Free text naming the producer; Azure writes its HSM's version here.
    #[serde(default)]
    #[allow(dead_code)]
    generator: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    kid: String,
    alg: String,
    enc: String,
}

impl KeyHsm {
    /// Bundles ciphertext with the identifier of the key it was wrapped to.
    #[must_use]
    pub fn new(kid: String, ciphertext: Vec<u8>) -> Self {
        Self { kid, ciphertext }
    }

    /// The `key_hsm` string: base64url of the JSON envelope.
    #[must_use]
    pub fn to_key_hsm_string(&self) -> String {
        let envelope = serde_json::json!({
            "schema_version": "1.0",
            "header": {"kid": self.kid, "alg": "dir", "enc": KEY_HSM_ENC},
            "ciphertext": B64URL.encode(&self.ciphertext),
            "generator": "capsa",
        });
        B64URL.encode(envelope.to_string())
    }

    /// Reads a `key_hsm` string. Strict: schema version `1.0`, `alg` `dir`,
    /// `enc` `CKM_RSA_AES_KEY_WRAP`, a non-empty `kid`, no unknown fields.
    ///
    /// # Errors
    /// [`WrapError::KeyHsmTooLong`], [`WrapError::KeyHsmEncoding`],
    /// [`WrapError::KeyHsmJson`] or [`WrapError::KeyHsmField`].
    pub fn parse(key_hsm: &str) -> Result<Self, WrapError> {
        if key_hsm.len() > MAX_KEY_HSM_LEN {
            return Err(WrapError::KeyHsmTooLong { len: key_hsm.len(), limit: MAX_KEY_HSM_LEN });
        }
        let json = B64URL.decode(key_hsm).map_err(|_| WrapError::KeyHsmEncoding { field: "key_hsm" })?;
        let envelope: Envelope = serde_json::from_slice(&json).map_err(WrapError::KeyHsmJson)?;
        let check = |field, value: &str, expected: &'static str| {
            if value == expected {
                Ok(())
            } else {
                Err(WrapError::KeyHsmField { field, expected, found: value.chars().take(64).collect() })
            }
        };
        check("schema_version", &envelope.schema_version, "1.0")?;
        check("header.alg", &envelope.header.alg, "dir")?;
        check("header.enc", &envelope.header.enc, KEY_HSM_ENC)?;
        if envelope.header.kid.is_empty() {
            return Err(WrapError::KeyHsmField {
                field: "header.kid",
                expected: "the wrapping key's identifier",
                found: String::new(),
            });
        }
        let ciphertext =
            B64URL.decode(&envelope.ciphertext).map_err(|_| WrapError::KeyHsmEncoding { field: "ciphertext" })?;
        Ok(Self { kid: envelope.header.kid, ciphertext })
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::cipher::{AES_192, AES_256 as CIPHER_AES_256, EncryptingKey, UnboundCipherKey};

    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut bytes = vec![0_u8; len];
        aws_lc_rs::rand::fill(&mut bytes).unwrap();
        bytes
    }

    fn target(key: &PrivateDecryptingKey) -> WrappingKey {
        let jwk = rsa_public_jwk(&key.public_key()).unwrap();
        WrappingKey::from_jwk(&jwk.n, &jwk.e).unwrap()
    }

    #[test]
    fn round_trip_for_every_size_and_payload() {
        for bits in [2048, 3072, 4096] {
            let key = generate_rsa_wrapping_key(bits).unwrap();
            let to = target(&key);
            assert_eq!(to.modulus_len(), bits / 8);
            for len in [1, 8, 32, 100, 1190] {
                let material = random(len);
                let wrapped = wrap_key(&to, &material).unwrap();
                assert_eq!(wrapped.len(), bits / 8 + len.div_ceil(8) * 8 + 8, "{bits}/{len}");
                assert_eq!(*unwrap_key(&key, &wrapped).unwrap(), material, "{bits}/{len}");
            }
        }
    }

    #[test]
    fn wraps_a_real_pkcs8_key() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let released = generate_rsa_wrapping_key(2048).unwrap();
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&released).unwrap();
        let wrapped = wrap_key(&target(&key), pkcs8.as_ref()).unwrap();
        let unwrapped = unwrap_key(&key, &wrapped).unwrap();
        assert_eq!(unwrapped.as_slice(), pkcs8.as_ref());
        assert!(PrivateDecryptingKey::from_pkcs8(&unwrapped).is_ok());
    }

    #[test]
    fn every_flipped_byte_fails() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let wrapped = wrap_key(&target(&key), &random(32)).unwrap();
        for i in 0..wrapped.len() {
            let mut bad = wrapped.clone();
            bad[i] ^= 0x01;
            let err = unwrap_key(&key, &bad).unwrap_err();
            let expected = if i < 256 { "RsaDecrypt" } else { "KeyUnwrap" };
            assert_eq!(format!("{err:?}"), expected, "byte {i}");
        }
    }

    #[test]
    fn wrong_private_key_fails() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let other = generate_rsa_wrapping_key(2048).unwrap();
        let wrapped = wrap_key(&target(&key), b"secret").unwrap();
        assert!(matches!(unwrap_key(&other, &wrapped), Err(WrapError::RsaDecrypt)));
        let bigger = generate_rsa_wrapping_key(3072).unwrap();
        assert!(matches!(unwrap_key(&bigger, &wrapped), Err(WrapError::CiphertextLength { .. })));
    }

    #[test]
    fn truncated_or_extended_ciphertext_fails() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let wrapped = wrap_key(&target(&key), &random(100)).unwrap();
        for len in [0, 1, 255, 256, 257, 256 + 8, 256 + 15, wrapped.len() - 1] {
            assert!(
                matches!(unwrap_key(&key, &wrapped[..len]), Err(WrapError::CiphertextLength { .. })),
                "length {len}"
            );
        }
        // Whole blocks dropped from the end keep the length valid but fail the integrity check.
        assert!(matches!(unwrap_key(&key, &wrapped[..wrapped.len() - 8]), Err(WrapError::KeyUnwrap)));
        assert!(matches!(unwrap_key(&key, &wrapped[..wrapped.len() - 16]), Err(WrapError::KeyUnwrap)));
        let mut longer = wrapped.clone();
        longer.extend_from_slice(&[0; 8]);
        assert!(matches!(unwrap_key(&key, &longer), Err(WrapError::KeyUnwrap)));
        longer.push(0);
        assert!(matches!(unwrap_key(&key, &longer), Err(WrapError::CiphertextLength { .. })));
    }

    #[test]
    fn rsa_layer_must_hold_a_32_byte_key() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let public = OaepPublicEncryptingKey::new(key.public_key()).unwrap();
        let mut ciphertext = vec![0; public.ciphertext_size()];
        public.encrypt(&OAEP_SHA256_MGF1SHA256, &[7; 16], &mut ciphertext, None).unwrap();
        ciphertext.extend_from_slice(&[0; 24]);
        assert!(matches!(unwrap_key(&key, &ciphertext), Err(WrapError::AesKeyLength { found: 16 })));
    }

    #[test]
    fn errors_do_not_leak_key_material() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let wrapped = wrap_key(&target(&key), &[0xAB; 40]).unwrap();
        let mut bad = wrapped.clone();
        *bad.last_mut().unwrap() ^= 1;
        let err = unwrap_key(&key, &bad).unwrap_err();
        let text = format!("{err} {err:?}").to_lowercase();
        assert!(!text.contains("ab, ") && !text.contains("abab") && !text.contains("171"), "{text}");
    }

    #[test]
    fn wrap_refuses_empty_and_oversized_material() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let to = target(&key);
        assert!(matches!(wrap_key(&to, &[]), Err(WrapError::EmptyKeyMaterial)));
        assert!(matches!(wrap_key(&to, &vec![0; MAX_KEY_MATERIAL_LEN + 1]), Err(WrapError::KeyMaterialTooLong { .. })));
        let max = vec![1; MAX_KEY_MATERIAL_LEN];
        assert_eq!(*unwrap_key(&key, &wrap_key(&to, &max).unwrap()).unwrap(), max);
    }

    #[test]
    fn jwk_checks() {
        let key = generate_rsa_wrapping_key(2048).unwrap();
        let jwk = rsa_public_jwk(&key.public_key()).unwrap();
        assert_eq!(jwk.e, "AQAB");
        assert_eq!(B64URL.decode(&jwk.n).unwrap().len(), 256);
        assert!(WrappingKey::from_public_key(&key.public_key()).is_ok());

        // A leading zero byte (some producers add one) is the same integer.
        let mut padded_n = vec![0];
        padded_n.extend(B64URL.decode(&jwk.n).unwrap());
        let padded = WrappingKey::from_jwk(&B64URL.encode(&padded_n), "AAEAAQ").unwrap();
        assert_eq!(*unwrap_key(&key, &wrap_key(&padded, b"k").unwrap()).unwrap(), b"k");

        let n = B64URL.decode(&jwk.n).unwrap();
        let n_b64 = B64URL.encode(&n);
        for e in [&[1_u8][..], &[2], &[0], &[], &[1, 0, 0, 0, 1], &[1, 0, 0]] {
            assert!(
                matches!(WrappingKey::from_jwk(&n_b64, &B64URL.encode(e)), Err(WrapError::Exponent { .. })),
                "{e:?}"
            );
        }
        for e in [&[3_u8][..], &[0xff, 0xff, 0xff, 0xff], &[1, 0, 1]] {
            assert!(WrappingKey::from_jwk(&n_b64, &B64URL.encode(e)).is_ok(), "{e:?}");
        }

        let mut even = n.clone();
        *even.last_mut().unwrap() &= 0xfe;
        assert!(matches!(WrappingKey::from_jwk(&B64URL.encode(&even), "AQAB"), Err(WrapError::EvenModulus)));
        let mut short = n[1..].to_vec();
        short[0] = 0xff;
        assert!(matches!(
            WrappingKey::from_jwk(&B64URL.encode(&short), "AQAB"),
            Err(WrapError::ModulusSize { bits: 2040 })
        ));
        let mut long = vec![0x80];
        long.extend(random(512));
        *long.last_mut().unwrap() |= 1;
        assert!(matches!(
            WrappingKey::from_jwk(&B64URL.encode(&long), "AQAB"),
            Err(WrapError::ModulusSize { bits: 4104 })
        ));
        assert!(matches!(WrappingKey::from_jwk("not base64!", "AQAB"), Err(WrapError::JwkEncoding { field: "n" })));
        assert!(matches!(WrappingKey::from_jwk(&n_b64, "AQ+B"), Err(WrapError::JwkEncoding { field: "e" })));
        assert!(matches!(WrappingKey::from_jwk("", "AQAB"), Err(WrapError::ModulusSize { bits: 0 })));
        assert!(matches!(generate_rsa_wrapping_key(1024), Err(WrapError::KeySize { bits: 1024 })));
    }

    #[test]
    fn key_hsm_round_trip_and_shape() {
        let hsm = KeyHsm::new("https://vault.example/keys/wrap/1".into(), random(300));
        let text = hsm.to_key_hsm_string();
        assert!(!text.contains('=') && !text.contains('+') && !text.contains('/'));
        assert_eq!(KeyHsm::parse(&text).unwrap(), hsm);
        let json: serde_json::Value = serde_json::from_slice(&B64URL.decode(&text).unwrap()).unwrap();
        assert_eq!(json["schema_version"], "1.0");
        assert_eq!(json["header"], serde_json::json!({"kid": hsm.kid, "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"}));
        assert_eq!(json["generator"], "capsa");
        assert_eq!(B64URL.decode(json["ciphertext"].as_str().unwrap()).unwrap(), hsm.ciphertext);
    }

    #[test]
    fn key_hsm_parse_is_strict() {
        let encode = |v: serde_json::Value| B64URL.encode(v.to_string());
        let good = serde_json::json!({"schema_version": "1.0",
            "header": {"kid": "k", "alg": "dir", "enc": "CKM_RSA_AES_KEY_WRAP"}, "ciphertext": "AAEC"});
        assert_eq!(KeyHsm::parse(&encode(good.clone())).unwrap().ciphertext, [0, 1, 2]);

        let with = |pointer: &str, value: serde_json::Value| {
            let mut v = good.clone();
            *v.pointer_mut(pointer).unwrap() = value;
            encode(v)
        };
        let field = |text: &str| match KeyHsm::parse(text) {
            Err(WrapError::KeyHsmField { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(&with("/schema_version", "2.0".into())), "schema_version");
        assert_eq!(field(&with("/header/alg", "RSA-OAEP".into())), "header.alg");
        assert_eq!(field(&with("/header/enc", "CKM_AES_KEY_WRAP".into())), "header.enc");
        assert_eq!(field(&with("/header/kid", "".into())), "header.kid");
        assert!(matches!(KeyHsm::parse(&with("/ciphertext", "***".into())), Err(WrapError::KeyHsmEncoding { .. })));
        assert!(matches!(KeyHsm::parse(&with("/header/kid", 5.into())), Err(WrapError::KeyHsmJson(_))));
        let mut extra = good.clone();
        extra["tag"] = "x".into();
        assert!(matches!(KeyHsm::parse(&encode(extra)), Err(WrapError::KeyHsmJson(_))));
        assert!(matches!(KeyHsm::parse("%%%"), Err(WrapError::KeyHsmEncoding { field: "key_hsm" })));
        assert!(matches!(KeyHsm::parse(&"A".repeat(MAX_KEY_HSM_LEN + 1)), Err(WrapError::KeyHsmTooLong { .. })));
        let message = KeyHsm::parse(&with("/header/enc", "x".into())).unwrap_err().to_string();
        assert_eq!(message, "key_hsm header.enc is \"x\", expected CKM_RSA_AES_KEY_WRAP");
    }

    #[test]
    fn key_hsm_carries_a_wrapped_key_end_to_end() {
        let key = generate_rsa_wrapping_key(3072).unwrap();
        let wrapped = wrap_key(&target(&key), b"data encryption key").unwrap();
        let text = KeyHsm::new("kid-1".into(), wrapped).to_key_hsm_string();
        let parsed = KeyHsm::parse(&text).unwrap();
        assert_eq!(*unwrap_key(&key, &parsed.ciphertext).unwrap(), b"data encryption key");
    }

    /// RFC 5649 written out from the RFC over single AES blocks, to check
    /// aws-lc-rs' key wrap with padding against the RFC's own vectors, which
    /// use a 192-bit KEK that `aws_lc_rs::key_wrap` does not offer.
    fn rfc5649_wrap(aes: &EncryptingKey, plaintext: &[u8]) -> Vec<u8> {
        let block = |input: [u8; 16]| {
            let mut b = input;
            aes.encrypt(&mut b).unwrap();
            b
        };
        let mut aiv = [0xA6, 0x59, 0x59, 0xA6, 0, 0, 0, 0];
        aiv[4..].copy_from_slice(&u32::try_from(plaintext.len()).unwrap().to_be_bytes());
        let mut padded = plaintext.to_vec();
        padded.resize(plaintext.len().div_ceil(8) * 8, 0);
        if padded.len() == 8 {
            let mut input = [0; 16];
            input[..8].copy_from_slice(&aiv);
            input[8..].copy_from_slice(&padded);
            return block(input).to_vec();
        }
        // RFC 3394 section 2.2.1 with the alternative initial value.
        let n = padded.len() / 8;
        let mut a = aiv;
        let mut r: Vec<[u8; 8]> = padded.chunks(8).map(|c| c.try_into().unwrap()).collect();
        for j in 0..6 {
            for (i, ri) in r.iter_mut().enumerate() {
                let mut input = [0; 16];
                input[..8].copy_from_slice(&a);
                input[8..].copy_from_slice(ri);
                let b = block(input);
                let t = (n * j + i + 1) as u64;
                a.copy_from_slice(&b[..8]);
                for (x, y) in a.iter_mut().zip(t.to_be_bytes()) {
                    *x ^= y;
                }
                ri.copy_from_slice(&b[8..]);
            }
        }
        let mut out = a.to_vec();
        for ri in r {
            out.extend_from_slice(&ri);
        }
        out
    }

    fn ecb(algorithm: &'static aws_lc_rs::cipher::Algorithm, key: &[u8]) -> EncryptingKey {
        EncryptingKey::ecb(UnboundCipherKey::new(algorithm, key).unwrap()).unwrap()
    }

    fn aws_lc_kwp(kek: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = vec![0; plaintext.len() + 15];
        AesKek::new(&AES_256, kek).unwrap().wrap_with_padding(plaintext, &mut out).unwrap().to_vec()
    }

    #[test]
    fn rfc5649_section_6_vectors() {
        let kek = hex("5840df6e29b02af1 ab493b705bf16ea1 ae8338f4dcc176a8");
        let aes = ecb(&AES_192, &kek);
        assert_eq!(
            rfc5649_wrap(&aes, &hex("c37b7e6492584340 bed1220780894115 5068f738")),
            hex("138bdeaa9b8fa7fc 61f97742e72248ee 5ae6ae5360d1ae6a 5f54f373fa543b6a")
        );
        assert_eq!(rfc5649_wrap(&aes, &hex("466f7250617369")), hex("afbeb0f07dfbf541 9200f2ccb50bb24f"));
    }

    #[test]
    fn aws_lc_key_wrap_with_padding_is_rfc5649() {
        // The NIST SP 800-38F KWP-AE AES-256 vector aws-lc-rs tests itself with (248-bit input).
        let kek = hex("e9bb7f44c7baafbf392ab912589a2f8db53268106eafb74689bb1833136e6113");
        let plain = hex("ffe952604834bff899e63658f34246815c91597eb40a21729e0a8a959b61f2");
        let wrapped = hex("15b9f06fbc765e5e3d55d6b824616f21921d2a6918ee7bf1406b524274e170b4a78333ca5ee92af5");
        assert_eq!(aws_lc_kwp(&kek, &plain), wrapped);
        assert_eq!(rfc5649_wrap(&ecb(&CIPHER_AES_256, &kek), &plain), wrapped);

        // And the RFC construction agrees with aws-lc-rs on random keys and every length class,
        // including the single-block case (at most 8 bytes).
        for len in [1, 7, 8, 9, 16, 20, 31, 32, 100, 1190] {
            let kek = random(32);
            let plain = random(len);
            assert_eq!(aws_lc_kwp(&kek, &plain), rfc5649_wrap(&ecb(&CIPHER_AES_256, &kek), &plain), "{len}");
            let mut out = vec![0; len + 16];
            let wrapped = aws_lc_kwp(&kek, &plain);
            let back = AesKek::new(&AES_256, &kek).unwrap().unwrap_with_padding(&wrapped, &mut out).unwrap();
            assert_eq!(back, plain.as_slice());
        }
    }
}
