//! Signed tokens of the trust service: JWTs as compact JWS (RFC 7515, RFC 7519)
//! and the keys that sign and verify them (JWK and JWK Set, RFC 7517, RFC 7518).
//!
//! This module owns three things:
//! - the issuer side: an ES384 [`SigningKey`], [`sign`] and [`sign_payload_json`],
//!   a [`KeyRing`] that rotates signing keys and publishes the [`Jwks`] relying
//!   parties fetch, and the OpenID discovery document ([`openid_configuration`]);
//! - the verifier side: [`verify`] checks a token from this service or from
//!   another attestation service (Microsoft Azure Attestation signs RS256)
//!   against a [`Jwks`] and returns a [`VerifiedToken`], the only way to get at
//!   claims that passed the signature and time checks;
//! - key identifiers: the RFC 7638 JWK thumbprint ([`thumbprint`]).
//!
//! Why hand-written: a compact JWS is about a hundred lines over aws-lc-rs,
//! which capsa already uses, while the `jsonwebtoken` crate would pull a second
//! crypto stack into the trust service's dependency tree and its audit.
//!
//! The verifier is strict because tokens are untrusted input: the size is
//! bounded, base64url must be unpadded and canonical, header and claims must be
//! JSON objects without duplicate members, `alg` comes from a closed allow-list
//! (never `none` or an HMAC, which with a public key as the secret is the
//! classic forgery, see RFC 8725 section 2.1), `crit` is refused, and the
//! algorithm must fit the selected key's type and curve so that a key can
//! never be used with an algorithm it was not made for (RFC 8725 section 3.1).

use std::fmt;

use aws_lc_rs::digest;
use aws_lc_rs::rand::{self, SystemRandom};
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, KeyPair as _, RsaParameters, RsaPublicKeyComponents, UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// Largest token [`verify`] accepts, in bytes. Attestation tokens carrying
/// evidence run to a few KiB; anything past this is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// How many characters of an attacker-chosen string (`alg`, `kid`) an error keeps.
const ERROR_EXCERPT_CHARS: usize = 64;

/// Length of one P-384 coordinate in bytes.
const P384_COORD_LEN: usize = 48;

/// Length of one P-256 coordinate in bytes.
const P256_COORD_LEN: usize = 32;

/// Smallest RSA modulus accepted, in bytes (2048 bits, RFC 7518 section 3.3).
const MIN_RSA_MODULUS_LEN: usize = 256;

/// Largest RSA modulus accepted, in bytes (8192 bits, aws-lc-rs' upper bound).
const MAX_RSA_MODULUS_LEN: usize = 1024;

/// Why a token could not be signed or verified, or a key not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token is not a well-formed compact JWS or JWT.
    #[error("malformed token: {0}; the issuer must send a compact JWS (RFC 7515) of at most 64 KiB")]
    Malformed(&'static str),
    /// A claim the verifier checks has the wrong type or is missing.
    #[error("invalid `{claim}` claim: {reason}; the issuer must send it as a NumericDate (RFC 7519 section 2)")]
    InvalidClaim {
        /// The claim name.
        claim: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The header's `alg` is not on the allow-list (this includes `none` and every HMAC).
    #[error("token algorithm `{0}` is not accepted; the issuer must sign with ES256, ES384, RS256, RS384 or PS256")]
    UnsupportedAlgorithm(String),
    /// The header uses a feature this verifier refuses (such as `crit`).
    #[error("token header uses {0}, which this verifier refuses; the issuer must not use it")]
    UnsupportedHeader(&'static str),
    /// No key in the key set has the token's `kid`.
    #[error("no key with kid `{0}` in the key set; refresh the issuer's JWKS or check which issuer signed the token")]
    UnknownKey(String),
    /// The key to verify with cannot be chosen unambiguously.
    #[error(
        "{candidates} keys in the key set could verify this token ({}); the issuer must set a unique `kid`",
        kid.as_deref().map_or_else(|| "the token has no kid".to_owned(), |kid| format!("kid `{kid}`"))
    )]
    AmbiguousKey {
        /// The token's `kid`, if it had one (shortened).
        kid: Option<String>,
        /// How many keys were candidates.
        candidates: usize,
    },
    /// The token's algorithm does not fit the selected key.
    #[error(
        "token algorithm `{alg}` does not fit key `{kid}` (its type, curve, `alg` or `use`); \
         refused to prevent algorithm confusion"
    )]
    AlgorithmMismatch {
        /// The algorithm the token names.
        alg: &'static str,
        /// The token's `kid` (shortened).
        kid: String,
    },
    /// The signature does not verify under the selected key.
    #[error("token signature does not verify; the token was altered or signed by a different key")]
    BadSignature,
    /// `exp` has passed, even with the leeway.
    #[error("token expired at {exp} (now {now}); request a new token")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// The verifier's time.
        now: i64,
    },
    /// `nbf` is in the future, even with the leeway.
    #[error("token is not valid before {nbf} (now {now}); check the clocks of issuer and verifier")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
        /// The verifier's time.
        now: i64,
    },
    /// `iat` is in the future, even with the leeway.
    #[error("token claims to be issued at {iat}, after now ({now}); check the clocks of issuer and verifier")]
    IssuedInFuture {
        /// The token's `iat`.
        iat: i64,
        /// The verifier's time.
        now: i64,
    },
    /// A JWK cannot be turned into a verification key or thumbprint.
    #[error("invalid JWK: {0}; fix the key set the issuer publishes")]
    InvalidJwk(&'static str),
    /// Stored signing-key bytes are not a usable P-384 PKCS#8 key.
    #[error("invalid signing key: {0}; restore the key from storage or rotate to a new one")]
    InvalidSigningKey(&'static str),
    /// A key ring cannot be restored or changed as asked.
    #[error("invalid key ring: {0}; check the stored key records against the stored keys")]
    InvalidKeyRing(&'static str),
    /// The crypto library failed where it should not; a bug, not bad input.
    #[error("internal error while {0}; this is a bug in capsa or its crypto library, not bad input")]
    Internal(&'static str),
}

/// Keeps an attacker-chosen string short and printable before it goes into an error.
fn excerpt(value: &str) -> String {
    let mut out: String = value.chars().take(ERROR_EXCERPT_CHARS).flat_map(char::escape_debug).collect();
    if value.chars().nth(ERROR_EXCERPT_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

/// A JWS algorithm this module can verify. Everything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Algorithm {
    /// ECDSA on P-256 with SHA-256, signature `r || s` (64 bytes).
    Es256,
    /// ECDSA on P-384 with SHA-384, signature `r || s` (96 bytes). What [`sign`] uses.
    Es384,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (Microsoft Azure Attestation).
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PSS with SHA-256 and MGF1-SHA-256.
    Ps256,
}

impl Algorithm {
    /// The `alg` header value (RFC 7518 section 3.1).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Ps256 => "PS256",
        }
    }

    /// The algorithm for an `alg` value, or `None` if it is not on the allow-list.
    /// Matching is exact: JOSE names are case-sensitive.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "ES256" => Some(Self::Es256),
            "ES384" => Some(Self::Es384),
            "RS256" => Some(Self::Rs256),
            "RS384" => Some(Self::Rs384),
            "PS256" => Some(Self::Ps256),
            _ => None,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A JSON Web Key (RFC 7517 section 4, RFC 7518 section 6), public parts only.
///
/// Unknown members (`x5c`, `key_ops`, ...) are ignored when parsing; private
/// members (`d`, `p`, ...) are never read or written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type: `EC` or `RSA` are usable here.
    pub kty: String,
    /// Curve of an EC key: `P-256` or `P-384`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate, base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus, base64url big-endian.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA public exponent, base64url big-endian.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
    /// Key identifier, matched against a token's `kid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// The one algorithm this key may be used with, if the publisher says so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Intended use: `sig` for signature keys; a key marked otherwise is never used to verify.
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub key_use: Option<String>,
}

/// A JSON Web Key Set (RFC 7517 section 5), as served at `<issuer>/certs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwks {
    /// The keys, in the publisher's order.
    pub keys: Vec<Jwk>,
}

/// Computes the RFC 7638 JWK thumbprint: base64url of the SHA-256 of the
/// key's required members, sorted, without whitespace. EC and RSA keys only.
///
/// # Errors
/// [`TokenError::InvalidJwk`] if the key type is unsupported or a required member is missing.
pub fn thumbprint(jwk: &Jwk) -> Result<String, TokenError> {
    // serde_json::Value::String serializes with JSON escaping; members are
    // written in lexicographic order as RFC 7638 section 3.2 requires.
    let quoted = |value: &str| Value::String(value.to_owned()).to_string();
    let canonical = match jwk.kty.as_str() {
        "EC" => {
            let crv = jwk.crv.as_deref().ok_or(TokenError::InvalidJwk("EC key without `crv`"))?;
            let x = jwk.x.as_deref().ok_or(TokenError::InvalidJwk("EC key without `x`"))?;
            let y = jwk.y.as_deref().ok_or(TokenError::InvalidJwk("EC key without `y`"))?;
            format!(r#"{{"crv":{},"kty":"EC","x":{},"y":{}}}"#, quoted(crv), quoted(x), quoted(y))
        }
        "RSA" => {
            let e = jwk.e.as_deref().ok_or(TokenError::InvalidJwk("RSA key without `e`"))?;
            let n = jwk.n.as_deref().ok_or(TokenError::InvalidJwk("RSA key without `n`"))?;
            format!(r#"{{"e":{},"kty":"RSA","n":{}}}"#, quoted(e), quoted(n))
        }
        _ => return Err(TokenError::InvalidJwk("key type is neither `EC` nor `RSA`")),
    };
    Ok(URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, canonical.as_bytes())))
}

/// The issuer's ES384 signing key (P-384), identified by its RFC 7638 thumbprint.
///
/// The PKCS#8 bytes are kept (zeroized on drop) so the caller can store the key
/// encrypted; `Debug` prints only the `kid` and creation time.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    public: Jwk,
    kid: String,
    created_at: i64,
}

impl SigningKey {
    /// Generates a fresh key, created at `now` (unix seconds).
    ///
    /// # Errors
    /// [`TokenError::Internal`] if the crypto library cannot generate a key.
    pub fn generate(now: i64) -> Result<Self, TokenError> {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P384_SHA384_FIXED_SIGNING)
            .map_err(|_| TokenError::Internal("generating a P-384 key"))?;
        let document = pair.to_pkcs8v1().map_err(|_| TokenError::Internal("encoding a P-384 key as PKCS#8"))?;
        Self::from_pkcs8(document.as_ref(), now)
    }

    /// Loads a key from unencrypted PKCS#8 v1 DER, as returned by [`SigningKey::pkcs8`].
    ///
    /// # Errors
    /// [`TokenError::InvalidSigningKey`] if the bytes are not a valid P-384 key.
    pub fn from_pkcs8(pkcs8_der: &[u8], created_at: i64) -> Result<Self, TokenError> {
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8_der)
            .map_err(|_| TokenError::InvalidSigningKey("bytes are not a PKCS#8 P-384 ECDSA key"))?;
        let mut public = p384_public_jwk(&pair)?;
        let kid = thumbprint(&public)?;
        public.kid = Some(kid.clone());
        Ok(Self { pair, pkcs8: Zeroizing::new(pkcs8_der.to_vec()), public, kid, created_at })
    }

    /// The private key as PKCS#8 v1 DER, for the caller to store encrypted.
    pub fn pkcs8(&self) -> Zeroizing<Vec<u8>> {
        self.pkcs8.clone()
    }

    /// The key identifier: the RFC 7638 thumbprint of the public key.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// When the key was created, in unix seconds.
    pub fn created_at(&self) -> i64 {
        self.created_at
    }

    /// The public key as a JWK: `kty` EC, `crv` P-384, `alg` ES384, `use` sig, with `kid`.
    pub fn public_jwk(&self) -> Jwk {
        self.public.clone()
    }

    fn sign_bytes(&self, message: &[u8]) -> Result<Vec<u8>, TokenError> {
        let sig = self.pair.sign(&SystemRandom::new(), message).map_err(|_| TokenError::Internal("signing a token"))?;
        Ok(sig.as_ref().to_vec())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("alg", &"ES384")
            .field("kid", &self.kid)
            .field("created_at", &self.created_at)
            .finish_non_exhaustive()
    }
}

/// The public JWK of a P-384 key pair, without `kid`.
fn p384_public_jwk(pair: &EcdsaKeyPair) -> Result<Jwk, TokenError> {
    // aws-lc-rs gives the uncompressed point: 0x04 || x || y.
    let point = pair.public_key().as_ref();
    let Some((4, coords)) = point.split_first() else {
        return Err(TokenError::Internal("reading a P-384 public key"));
    };
    if coords.len() != 2 * P384_COORD_LEN {
        return Err(TokenError::Internal("reading a P-384 public key"));
    }
    let (x, y) = coords.split_at(P384_COORD_LEN);
    Ok(Jwk {
        kty: "EC".to_owned(),
        crv: Some("P-384".to_owned()),
        x: Some(URL_SAFE_NO_PAD.encode(x)),
        y: Some(URL_SAFE_NO_PAD.encode(y)),
        n: None,
        e: None,
        kid: None,
        alg: Some(Algorithm::Es384.as_str().to_owned()),
        key_use: Some("sig".to_owned()),
    })
}

/// Signs a JWT claims set with `key`: header `{"alg":"ES384","kid":..,"typ":"JWT"}`.
///
/// # Errors
/// [`TokenError::Internal`] if serializing or signing fails.
pub fn sign(key: &SigningKey, claims: &Map<String, Value>) -> Result<String, TokenError> {
    let payload = serde_json::to_vec(claims).map_err(|_| TokenError::Internal("serializing token claims"))?;
    sign_raw(key, &payload, Some("JWT"))
}

/// Signs an arbitrary JSON payload as a compact JWS with header
/// `{"alg":"ES384","kid":..}` (no `typ`: the payload need not be a JWT
/// claims set). [`verify`] accepts the result only if the payload is an object
/// with `exp`.
///
/// # Errors
/// [`TokenError::Internal`] if serializing or signing fails.
pub fn sign_payload_json(key: &SigningKey, payload: &Value) -> Result<String, TokenError> {
    let payload = serde_json::to_vec(payload).map_err(|_| TokenError::Internal("serializing a JWS payload"))?;
    sign_raw(key, &payload, None)
}

fn sign_raw(key: &SigningKey, payload: &[u8], typ: Option<&str>) -> Result<String, TokenError> {
    let mut header = Map::new();
    header.insert("alg".to_owned(), Value::from(Algorithm::Es384.as_str()));
    header.insert("kid".to_owned(), Value::from(key.kid()));
    if let Some(typ) = typ {
        header.insert("typ".to_owned(), Value::from(typ));
    }
    let header = serde_json::to_vec(&header).map_err(|_| TokenError::Internal("serializing a JWS header"))?;
    let signing_input = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let sig = key.sign_bytes(signing_input.as_bytes())?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

/// A token whose signature and time claims checked out. Only [`verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    header: Map<String, Value>,
    claims: Map<String, Value>,
    kid: Option<String>,
    alg: Algorithm,
}

impl VerifiedToken {
    /// The JOSE header.
    pub fn header(&self) -> &Map<String, Value> {
        &self.header
    }

    /// The verified claims set.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// One verified claim.
    pub fn claim(&self, name: &str) -> Option<&Value> {
        self.claims.get(name)
    }

    /// The verified claims set, by value.
    pub fn into_claims(self) -> Map<String, Value> {
        self.claims
    }

    /// The `kid` of the JWK that verified the token, if that JWK has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The algorithm the token was verified with.
    pub fn algorithm(&self) -> Algorithm {
        self.alg
    }
}

/// Verifies a compact JWS token against `jwks` at time `now` (unix seconds).
///
/// Checks, in order: size and shape, header, key selection by `kid` (a token
/// without `kid` is accepted only if exactly one key fits its algorithm),
/// algorithm against the key, signature over the exact signing input, then
/// `exp` (required, must be after `now - leeway_secs`), `nbf` and `iat` (if
/// present, not after `now + leeway_secs`). A negative leeway counts as zero.
/// Keys come only from `jwks`: header members that carry or point at a key
/// (`jwk`, `jku`, `x5u`, `x5c`) are ignored (RFC 8725 section 3.10).
///
/// # Errors
/// A [`TokenError`] naming the first check that failed.
pub fn verify(token: &str, jwks: &Jwks, now: i64, leeway_secs: i64) -> Result<VerifiedToken, TokenError> {
    let (header, payload, kid, alg) = verify_signature(token, jwks)?;
    let claims = parse_object(&payload, "claims are not a JSON object with unique member names")?;
    check_times(&claims, now, leeway_secs.max(0))?;
    Ok(VerifiedToken { header, claims, kid, alg })
}

/// Verifies a compact JWS's signature against `jwks`, as [`verify`] does, and
/// returns its payload: for signed documents that are not tokens and carry
/// no time claims, such as a release answer. Never use it for tokens.
pub fn verify_signed_payload(jws: &str, jwks: &Jwks) -> Result<Vec<u8>, TokenError> {
    Ok(verify_signature(jws, jwks)?.1)
}

type Verified = (Map<String, Value>, Vec<u8>, Option<String>, Algorithm);

fn verify_signature(token: &str, jwks: &Jwks) -> Result<Verified, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("token is larger than 64 KiB"));
    }
    let (signing_input, sig_b64) =
        token.rsplit_once('.').ok_or(TokenError::Malformed("token does not have three `.`-separated segments"))?;
    let (header_b64, payload_b64) = signing_input
        .split_once('.')
        .ok_or(TokenError::Malformed("token does not have three `.`-separated segments"))?;
    if payload_b64.contains('.') {
        return Err(TokenError::Malformed("token does not have three `.`-separated segments"));
    }
    let header = parse_object(
        &decode_segment(header_b64, "header is not unpadded base64url")?,
        "header is not a JSON object with unique member names",
    )?;
    let payload = decode_segment(payload_b64, "payload is not unpadded base64url")?;
    let sig = decode_segment(sig_b64, "signature is not unpadded base64url")?;

    let alg = match header.get("alg") {
        Some(Value::String(name)) => {
            Algorithm::from_name(name).ok_or_else(|| TokenError::UnsupportedAlgorithm(excerpt(name)))?
        }
        Some(_) => return Err(TokenError::Malformed("header `alg` is not a string")),
        None => return Err(TokenError::Malformed("header has no `alg`")),
    };
    // RFC 7515 section 4.1.11: a recipient that does not understand a critical
    // extension must reject the token; this verifier understands none.
    if header.contains_key("crit") {
        return Err(TokenError::UnsupportedHeader("`crit` (critical extensions)"));
    }
    let kid = match header.get("kid") {
        Some(Value::String(kid)) => Some(kid.as_str()),
        Some(_) => return Err(TokenError::Malformed("header `kid` is not a string")),
        None => None,
    };

    if sig.is_empty() {
        return Err(TokenError::Malformed("signature is empty"));
    }

    let jwk = select_key(jwks, kid, alg)?;
    verify_with_key(jwk, alg, signing_input.as_bytes(), &sig)?;
    Ok((header.clone(), payload, jwk.kid.clone(), alg))
}

/// The `iss` of a token, read WITHOUT verifying it: only to choose which
/// issuer's keys [`verify`] must then check it with. Nothing else may be
/// trusted from it.
pub fn peek_issuer(token: &str) -> Result<String, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed("token is longer than 64 KiB"));
    }
    let payload = token.split('.').nth(1).ok_or(TokenError::Malformed("token is not three base64url segments"))?;
    let claims = parse_object(
        &decode_segment(payload, "payload is not unpadded base64url")?,
        "claims are not a JSON object with unique member names",
    )?;
    match claims.get("iss") {
        Some(Value::String(iss)) => Ok(iss.clone()),
        _ => Err(TokenError::Malformed("the token has no `iss` claim naming its issuer")),
    }
}

fn decode_segment(segment: &str, what: &'static str) -> Result<Vec<u8>, TokenError> {
    // The engine refuses `=` padding and non-zero trailing bits, so each token
    // has exactly one encoding.
    URL_SAFE_NO_PAD.decode(segment).map_err(|_| TokenError::Malformed(what))
}

/// A JSON object whose top-level member names are unique (RFC 7515 section 5.2
/// lets a parser reject duplicates; accepting them lets two parsers disagree).
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<UniqueObject, A::Error> {
                let mut map = Map::new();
                while let Some(name) = access.next_key::<String>()? {
                    let value: Value = access.next_value()?;
                    if map.insert(name, value).is_some() {
                        return Err(serde::de::Error::custom("duplicate member"));
                    }
                }
                Ok(UniqueObject(map))
            }
        }
        deserializer.deserialize_map(Visitor)
    }
}

fn parse_object(bytes: &[u8], error: &'static str) -> Result<Map<String, Value>, TokenError> {
    serde_json::from_slice::<UniqueObject>(bytes).map(|object| object.0).map_err(|_| TokenError::Malformed(error))
}

/// Whether `jwk` may verify `alg`: type and curve fit, and its own `alg` and `use` agree.
fn key_fits(jwk: &Jwk, alg: Algorithm) -> bool {
    let by_type = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("EC", Some("P-256")) => alg == Algorithm::Es256,
        ("EC", Some("P-384")) => alg == Algorithm::Es384,
        ("RSA", _) => matches!(alg, Algorithm::Rs256 | Algorithm::Rs384 | Algorithm::Ps256),
        _ => false,
    };
    by_type
        && jwk.alg.as_deref().is_none_or(|key_alg| key_alg == alg.as_str())
        && jwk.key_use.as_deref().is_none_or(|key_use| key_use == "sig")
}

fn select_key<'a>(jwks: &'a Jwks, kid: Option<&str>, alg: Algorithm) -> Result<&'a Jwk, TokenError> {
    match kid {
        Some(kid) => {
            let mut named = jwks.keys.iter().filter(|jwk| jwk.kid.as_deref() == Some(kid));
            let first = named.next().ok_or_else(|| TokenError::UnknownKey(excerpt(kid)))?;
            let others = named.count();
            if others > 0 {
                return Err(TokenError::AmbiguousKey { kid: Some(excerpt(kid)), candidates: others + 1 });
            }
            if !key_fits(first, alg) {
                return Err(TokenError::AlgorithmMismatch { alg: alg.as_str(), kid: excerpt(kid) });
            }
            Ok(first)
        }
        None => {
            let mut fitting = jwks.keys.iter().filter(|jwk| key_fits(jwk, alg));
            match (fitting.next(), fitting.count()) {
                (Some(only), 0) => Ok(only),
                (first, others) => {
                    Err(TokenError::AmbiguousKey { kid: None, candidates: usize::from(first.is_some()) + others })
                }
            }
        }
    }
}

fn decode_member(value: Option<&str>, missing: &'static str, bad: &'static str) -> Result<Vec<u8>, TokenError> {
    URL_SAFE_NO_PAD.decode(value.ok_or(TokenError::InvalidJwk(missing))?).map_err(|_| TokenError::InvalidJwk(bad))
}

fn verify_with_key(jwk: &Jwk, alg: Algorithm, message: &[u8], sig: &[u8]) -> Result<(), TokenError> {
    match alg {
        Algorithm::Es256 => verify_ec(jwk, P256_COORD_LEN, &signature::ECDSA_P256_SHA256_FIXED, message, sig),
        Algorithm::Es384 => verify_ec(jwk, P384_COORD_LEN, &signature::ECDSA_P384_SHA384_FIXED, message, sig),
        Algorithm::Rs256 => verify_rsa(jwk, &signature::RSA_PKCS1_2048_8192_SHA256, message, sig),
        Algorithm::Rs384 => verify_rsa(jwk, &signature::RSA_PKCS1_2048_8192_SHA384, message, sig),
        Algorithm::Ps256 => verify_rsa(jwk, &signature::RSA_PSS_2048_8192_SHA256, message, sig),
    }
}

fn verify_ec(
    jwk: &Jwk,
    coord_len: usize,
    verification: &'static signature::EcdsaVerificationAlgorithm,
    message: &[u8],
    sig: &[u8],
) -> Result<(), TokenError> {
    let x = decode_member(jwk.x.as_deref(), "EC key without `x`", "EC `x` is not base64url")?;
    let y = decode_member(jwk.y.as_deref(), "EC key without `y`", "EC `y` is not base64url")?;
    if x.len() != coord_len || y.len() != coord_len {
        return Err(TokenError::InvalidJwk("EC coordinate length does not match the curve"));
    }
    let mut point = Vec::with_capacity(1 + 2 * coord_len);
    point.push(4); // uncompressed (SEC 1 section 2.3.3)
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    // aws-lc-rs checks that the point is on the curve while parsing; the
    // fixed-width verifier refuses a signature that is not exactly r || s.
    UnparsedPublicKey::new(verification, point).verify(message, sig).map_err(|_| TokenError::BadSignature)
}

fn verify_rsa(jwk: &Jwk, params: &'static RsaParameters, message: &[u8], sig: &[u8]) -> Result<(), TokenError> {
    let n = decode_member(jwk.n.as_deref(), "RSA key without `n`", "RSA `n` is not base64url")?;
    let e = decode_member(jwk.e.as_deref(), "RSA key without `e`", "RSA `e` is not base64url")?;
    // RFC 7518 section 6.3.1 wants minimal encodings, but some publishers keep
    // a leading zero octet; it does not change the number.
    let n = strip_leading_zeros(&n);
    let e = strip_leading_zeros(&e);
    if n.len() < MIN_RSA_MODULUS_LEN || n.len() > MAX_RSA_MODULUS_LEN {
        return Err(TokenError::InvalidJwk("RSA modulus is not between 2048 and 8192 bits"));
    }
    if e.is_empty() {
        return Err(TokenError::InvalidJwk("RSA exponent is zero"));
    }
    RsaPublicKeyComponents { n, e }.verify(params, message, sig).map_err(|_| TokenError::BadSignature)
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

#[derive(Clone, Copy)]
enum Round {
    /// For `exp`: rounding down never extends a token's life.
    Down,
    /// For `nbf` and `iat`: rounding up never starts a token early.
    Up,
}

/// Reads a NumericDate (RFC 7519 section 2): a JSON number of seconds, integer or not.
fn numeric_date(claims: &Map<String, Value>, name: &'static str, round: Round) -> Result<Option<i64>, TokenError> {
    // Beyond 2^53 an f64 is no longer exact; no real time is that large.
    const LIMIT: f64 = 9_007_199_254_740_992.0;
    let Some(value) = claims.get(name) else { return Ok(None) };
    let Value::Number(number) = value else {
        return Err(TokenError::InvalidClaim { claim: name, reason: "not a number" });
    };
    if let Some(seconds) = number.as_i64() {
        return Ok(Some(seconds));
    }
    match number.as_f64() {
        Some(seconds) if seconds.is_finite() && seconds.abs() < LIMIT => {
            let rounded = match round {
                Round::Down => seconds.floor(),
                Round::Up => seconds.ceil(),
            };
            // In range by the check above, so the cast is exact.
            Ok(Some(rounded as i64))
        }
        _ => Err(TokenError::InvalidClaim { claim: name, reason: "number out of range" }),
    }
}

fn check_times(claims: &Map<String, Value>, now: i64, leeway: i64) -> Result<(), TokenError> {
    let exp = numeric_date(claims, "exp", Round::Down)?
        .ok_or(TokenError::InvalidClaim { claim: "exp", reason: "missing; tokens without expiry are refused" })?;
    if exp <= now.saturating_sub(leeway) {
        return Err(TokenError::Expired { exp, now });
    }
    // No let-chains: the workspace's rust-version (1.85) predates them.
    if let Some(nbf) = numeric_date(claims, "nbf", Round::Up)?.filter(|&nbf| nbf > now.saturating_add(leeway)) {
        return Err(TokenError::NotYetValid { nbf, now });
    }
    if let Some(iat) = numeric_date(claims, "iat", Round::Up)?.filter(|&iat| iat > now.saturating_add(leeway)) {
        return Err(TokenError::IssuedInFuture { iat, now });
    }
    Ok(())
}

/// Registered claims for a new token: `iss`, `iat` and `nbf` (= `now`), `exp`
/// (= `now + lifetime_secs`) and a random 128-bit `jti` in base64url.
///
/// # Errors
/// [`TokenError::Internal`] if the system random generator fails.
pub fn standard_claims(iss: &str, now: i64, lifetime_secs: i64) -> Result<Map<String, Value>, TokenError> {
    let mut jti = [0_u8; 16];
    rand::fill(&mut jti).map_err(|_| TokenError::Internal("drawing a random token id"))?;
    let mut claims = Map::new();
    claims.insert("iss".to_owned(), Value::from(iss));
    claims.insert("iat".to_owned(), Value::from(now));
    claims.insert("nbf".to_owned(), Value::from(now));
    claims.insert("exp".to_owned(), Value::from(now.saturating_add(lifetime_secs)));
    claims.insert("jti".to_owned(), Value::from(URL_SAFE_NO_PAD.encode(jti)));
    Ok(claims)
}

/// The OpenID discovery document served at `<issuer>/.well-known/openid-configuration`,
/// shaped like the one Microsoft Azure Attestation publishes so the same
/// relying-party code can read either.
pub fn openid_configuration(issuer_url: &str) -> Value {
    serde_json::json!({
        "issuer": issuer_url,
        "jwks_uri": format!("{}/certs", issuer_url.trim_end_matches('/')),
        "id_token_signing_alg_values_supported": [Algorithm::Es384.as_str()],
        "response_types_supported": ["token"],
        "claims_supported": ["iss", "iat", "nbf", "exp", "jti"],
    })
}

/// Non-secret metadata for one key of a [`KeyRing`]. The caller stores these
/// records beside the PKCS#8 bytes, which it encrypts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// The key's RFC 7638 thumbprint, checked against the key on restore.
    pub kid: String,
    /// When the key was created, in unix seconds.
    pub created_at: i64,
    /// When the key stopped signing, in unix seconds; `None` for the active key.
    pub retired_at: Option<i64>,
}

/// A retired key: it no longer signs, but its public key stays published
/// while tokens it signed may still be valid.
#[derive(Debug)]
struct RetiredKey {
    key: SigningKey,
    retired_at: i64,
}

/// The issuer's signing keys over time. Exactly one key is active and signs;
/// retired keys are kept, oldest first, until every token they signed has expired.
#[derive(Debug)]
pub struct KeyRing {
    active: SigningKey,
    retired: Vec<RetiredKey>,
}

impl KeyRing {
    /// A ring whose only key is `active`.
    pub fn new(active: SigningKey) -> Self {
        Self { active, retired: Vec::new() }
    }

    /// The key that signs new tokens: the newest, never retired.
    pub fn active(&self) -> &SigningKey {
        &self.active
    }

    /// Makes `new_key` active and retires the current active key at `now`.
    ///
    /// # Errors
    /// [`TokenError::InvalidKeyRing`] if `new_key` is already in the ring.
    pub fn rotate(&mut self, new_key: SigningKey, now: i64) -> Result<(), TokenError> {
        if self.get(new_key.kid()).is_some() {
            return Err(TokenError::InvalidKeyRing("the new key is already in the ring"));
        }
        let old = std::mem::replace(&mut self.active, new_key);
        self.retired.push(RetiredKey { key: old, retired_at: now });
        Ok(())
    }

    /// The key set to publish: the active key, then (newest first) every retired
    /// key retired less than `max_token_lifetime` seconds before `now`, since
    /// tokens it signed may still be valid.
    pub fn jwks(&self, now: i64, max_token_lifetime: i64) -> Jwks {
        let retired = self
            .retired
            .iter()
            .rev()
            .filter(|retired| still_needed(retired.retired_at, now, max_token_lifetime))
            .map(|retired| retired.key.public_jwk());
        Jwks { keys: std::iter::once(self.active.public_jwk()).chain(retired).collect() }
    }

    /// Drops retired keys no token can need any more and returns their `kid`s,
    /// so the caller can delete their stored secrets.
    pub fn prune(&mut self, now: i64, max_token_lifetime: i64) -> Vec<String> {
        let mut dropped = Vec::new();
        self.retired.retain(|retired| {
            let keep = still_needed(retired.retired_at, now, max_token_lifetime);
            if !keep {
                dropped.push(retired.key.kid().to_owned());
            }
            keep
        });
        dropped
    }

    /// A key of the ring by `kid`, active or retired (to store its PKCS#8).
    pub fn get(&self, kid: &str) -> Option<&SigningKey> {
        std::iter::once(&self.active)
            .chain(self.retired.iter().map(|retired| &retired.key))
            .find(|key| key.kid() == kid)
    }

    /// Metadata of every key, oldest retired first and the active key last.
    pub fn records(&self) -> Vec<KeyRecord> {
        self.retired
            .iter()
            .map(|retired| KeyRecord {
                kid: retired.key.kid().to_owned(),
                created_at: retired.key.created_at(),
                retired_at: Some(retired.retired_at),
            })
            .chain(std::iter::once(KeyRecord {
                kid: self.active.kid().to_owned(),
                created_at: self.active.created_at(),
                retired_at: None,
            }))
            .collect()
    }

    /// Rebuilds a ring from stored records and their PKCS#8 keys.
    ///
    /// # Errors
    /// [`TokenError::InvalidSigningKey`] if a key does not load;
    /// [`TokenError::InvalidKeyRing`] if a record's `kid` does not match its key,
    /// a `kid` repeats, or there is not exactly one active record.
    pub fn from_parts(parts: Vec<(KeyRecord, Zeroizing<Vec<u8>>)>) -> Result<Self, TokenError> {
        let mut active = None;
        let mut retired = Vec::new();
        for (record, pkcs8) in parts {
            let key = SigningKey::from_pkcs8(&pkcs8, record.created_at)?;
            if key.kid() != record.kid {
                return Err(TokenError::InvalidKeyRing("a record's kid does not match its stored key"));
            }
            match record.retired_at {
                None if active.is_some() => return Err(TokenError::InvalidKeyRing("more than one key is active")),
                None => active = Some(key),
                Some(retired_at) => retired.push(RetiredKey { key, retired_at }),
            }
        }
        let active = active.ok_or(TokenError::InvalidKeyRing("no key is active"))?;
        retired.sort_by_key(|retired| retired.retired_at);
        let ring = Self { active, retired };
        let mut kids: Vec<&str> = ring.kids().collect();
        kids.sort_unstable();
        if kids.windows(2).any(|pair| pair.first() == pair.get(1)) {
            return Err(TokenError::InvalidKeyRing("a key appears twice"));
        }
        Ok(ring)
    }

    fn kids(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.active.kid()).chain(self.retired.iter().map(|retired| retired.key.kid()))
    }
}

/// Whether a key retired at `retired_at` may have signed a token still valid at `now`.
fn still_needed(retired_at: i64, now: i64, max_token_lifetime: i64) -> bool {
    retired_at.saturating_add(max_token_lifetime) > now
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::RsaEncoding;
    use serde_json::json;

    use super::*;

    const NOW: i64 = 1_700_000_000;

    fn claims(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => panic!("test claims must be an object"),
        }
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn key_and_jwks() -> (SigningKey, Jwks) {
        let key = SigningKey::generate(NOW).unwrap();
        let jwks = Jwks { keys: vec![key.public_jwk()] };
        (key, jwks)
    }

    fn valid_claims() -> Map<String, Value> {
        standard_claims("https://trust.example", NOW, 300).unwrap()
    }

    /// Splits a token into its three decoded-or-raw segments.
    fn segments(token: &str) -> (String, String, String) {
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        (parts[0].to_owned(), parts[1].to_owned(), parts[2].to_owned())
    }

    fn decode_json(segment: &str) -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(segment).unwrap()).unwrap()
    }

    /// A token with the given header and claims and a signature from nobody.
    fn unsigned(header: &Value, claims: &Value, sig: &[u8]) -> String {
        format!("{}.{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()), b64(sig))
    }

    fn rsa_jwk(pair: &aws_lc_rs::rsa::KeyPair, kid: &str, alg: Option<&str>) -> Jwk {
        let components = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
        Jwk {
            kty: "RSA".to_owned(),
            crv: None,
            x: None,
            y: None,
            n: Some(b64(&components.n)),
            e: Some(b64(&components.e)),
            kid: Some(kid.to_owned()),
            alg: alg.map(str::to_owned),
            key_use: Some("sig".to_owned()),
        }
    }

    fn rsa_token(
        pair: &aws_lc_rs::rsa::KeyPair,
        encoding: &'static dyn RsaEncoding,
        alg: &str,
        kid: &str,
        claims: &Value,
    ) -> String {
        let header = json!({"alg": alg, "kid": kid, "typ": "JWT"});
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let mut sig = vec![0; pair.public_modulus_len()];
        pair.sign(encoding, &SystemRandom::new(), input.as_bytes(), &mut sig).unwrap();
        format!("{input}.{}", b64(&sig))
    }

    #[test]
    fn sign_verify_round_trip() {
        let (key, jwks) = key_and_jwks();
        let claims = valid_claims();
        let token = sign(&key, &claims).unwrap();

        let (header, _, sig) = segments(&token);
        assert_eq!(decode_json(&header), json!({"alg": "ES384", "kid": key.kid(), "typ": "JWT"}));
        assert_eq!(URL_SAFE_NO_PAD.decode(sig).unwrap().len(), 96);

        let verified = verify(&token, &jwks, NOW, 0).unwrap();
        assert_eq!(verified.claims(), &claims);
        assert_eq!(verified.kid(), Some(key.kid()));
        assert_eq!(verified.algorithm(), Algorithm::Es384);
        assert_eq!(verified.header().get("typ"), Some(&json!("JWT")));
        assert_eq!(verified.claim("iss"), Some(&json!("https://trust.example")));
    }

    #[test]
    fn sign_payload_json_has_no_typ_and_verifies() {
        let (key, jwks) = key_and_jwks();
        let payload = json!({"exp": NOW + 60, "secret": {"name": "db", "value": "c2VjcmV0"}});
        let token = sign_payload_json(&key, &payload).unwrap();
        let (header, _, _) = segments(&token);
        assert_eq!(decode_json(&header), json!({"alg": "ES384", "kid": key.kid()}));
        let verified = verify(&token, &jwks, NOW, 0).unwrap();
        assert_eq!(Value::Object(verified.into_claims()), payload);
    }

    #[test]
    fn edited_payload_is_bad_signature() {
        let (key, jwks) = key_and_jwks();
        let token = sign(&key, &valid_claims()).unwrap();
        let (header, payload, sig) = segments(&token);
        let mut edited = decode_json(&payload);
        edited["iss"] = json!("https://evil.example");
        let forged = format!("{header}.{}.{sig}", b64(edited.to_string().as_bytes()));
        assert!(matches!(verify(&forged, &jwks, NOW, 0), Err(TokenError::BadSignature)));
    }

    #[test]
    fn flipped_signature_bit_is_bad_signature() {
        let (key, jwks) = key_and_jwks();
        let token = sign(&key, &valid_claims()).unwrap();
        let (header, payload, sig) = segments(&token);
        let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        sig[10] ^= 1;
        let forged = format!("{header}.{payload}.{}", b64(&sig));
        assert!(matches!(verify(&forged, &jwks, NOW, 0), Err(TokenError::BadSignature)));
    }

    #[test]
    fn edited_header_alg_is_refused() {
        let (key, jwks) = key_and_jwks();
        let token = sign(&key, &valid_claims()).unwrap();
        let (_, payload, sig) = segments(&token);
        for alg in ["ES256", "RS256", "PS256"] {
            let header = json!({"alg": alg, "kid": key.kid(), "typ": "JWT"});
            let forged = format!("{}.{payload}.{sig}", b64(header.to_string().as_bytes()));
            assert!(
                matches!(verify(&forged, &jwks, NOW, 0), Err(TokenError::AlgorithmMismatch { .. })),
                "{alg} must not verify against a P-384 key"
            );
        }
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let (key, jwks) = key_and_jwks();
        let claims = json!({"exp": NOW + 60});
        for alg in ["none", "None", "HS256", "HS384", "HS512", "es384", "EdDSA"] {
            for sig in [&b""[..], b"anything"] {
                let token = unsigned(&json!({"alg": alg, "kid": key.kid()}), &claims, sig);
                let result = verify(&token, &jwks, NOW, 0);
                assert!(matches!(result, Err(TokenError::UnsupportedAlgorithm(_))), "{alg}: {result:?}");
            }
        }
        // The classic forgery: HS256 with the published public key as the secret.
        let secret = serde_json::to_vec(&key.public_jwk()).unwrap();
        let input = format!(
            "{}.{}",
            b64(json!({"alg": "HS256", "kid": key.kid()}).to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let tag =
            aws_lc_rs::hmac::sign(&aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret), input.as_bytes());
        let token = format!("{input}.{}", b64(tag.as_ref()));
        assert!(matches!(verify(&token, &jwks, NOW, 0), Err(TokenError::UnsupportedAlgorithm(alg)) if alg == "HS256"));
        // Also for a token without any signature segment content.
        let token = format!("{input}.");
        assert!(verify(&token, &jwks, NOW, 0).is_err());
    }

    #[test]
    fn crit_header_is_refused() {
        let (key, jwks) = key_and_jwks();
        let token =
            unsigned(&json!({"alg": "ES384", "kid": key.kid(), "crit": ["b64"], "b64": false}), &json!({}), b"x");
        assert!(matches!(verify(&token, &jwks, NOW, 0), Err(TokenError::UnsupportedHeader(_))));
    }

    #[test]
    fn unknown_kid_is_unknown_key() {
        let (_, jwks) = key_and_jwks();
        let other = SigningKey::generate(NOW).unwrap();
        let token = sign(&other, &valid_claims()).unwrap();
        match verify(&token, &jwks, NOW, 0) {
            Err(TokenError::UnknownKey(kid)) => assert_eq!(kid, other.kid()),
            result => panic!("expected UnknownKey, got {result:?}"),
        }
    }

    #[test]
    fn missing_kid_uses_the_only_fitting_key() {
        let (key, jwks) = key_and_jwks();
        let input = format!("{}.{}", b64(br#"{"alg":"ES384"}"#), b64(json!({"exp": NOW + 60}).to_string().as_bytes()));
        let no_kid = format!("{input}.{}", b64(&key.sign_bytes(input.as_bytes()).unwrap()));
        assert!(verify(&no_kid, &jwks, NOW, 0).is_ok());

        // A second ES384 key makes the choice ambiguous; an RSA key would not.
        let mut two = jwks.clone();
        two.keys.push(SigningKey::generate(NOW).unwrap().public_jwk());
        assert!(matches!(verify(&no_kid, &two, NOW, 0), Err(TokenError::AmbiguousKey { kid: None, candidates: 2 })));
        assert!(matches!(
            verify(&no_kid, &Jwks::default(), NOW, 0),
            Err(TokenError::AmbiguousKey { kid: None, candidates: 0 })
        ));
    }

    #[test]
    fn duplicate_kid_in_jwks_is_ambiguous() {
        let (key, mut jwks) = key_and_jwks();
        jwks.keys.push(key.public_jwk());
        let token = sign(&key, &valid_claims()).unwrap();
        assert!(matches!(verify(&token, &jwks, NOW, 0), Err(TokenError::AmbiguousKey { candidates: 2, .. })));
    }

    #[test]
    fn jwk_alg_and_use_restrict_the_key() {
        let (key, jwks) = key_and_jwks();
        let token = sign(&key, &valid_claims()).unwrap();

        let mut enc = jwks.clone();
        enc.keys[0].key_use = Some("enc".to_owned());
        assert!(matches!(verify(&token, &enc, NOW, 0), Err(TokenError::AlgorithmMismatch { .. })));

        let mut other_alg = jwks.clone();
        other_alg.keys[0].alg = Some("ES256".to_owned());
        assert!(matches!(verify(&token, &other_alg, NOW, 0), Err(TokenError::AlgorithmMismatch { .. })));

        let mut no_alg = jwks;
        no_alg.keys[0].alg = None;
        no_alg.keys[0].key_use = None;
        assert!(verify(&token, &no_alg, NOW, 0).is_ok());
    }

    #[test]
    fn expiry_edges_with_leeway() {
        let (key, jwks) = key_and_jwks();
        let leeway = 30;
        let at = |exp: i64| sign(&key, &claims(json!({"exp": exp}))).unwrap();

        // Valid while exp > now - leeway.
        assert!(verify(&at(NOW - leeway + 1), &jwks, NOW, leeway).is_ok());
        assert!(matches!(
            verify(&at(NOW - leeway), &jwks, NOW, leeway),
            Err(TokenError::Expired { exp, now: NOW }) if exp == NOW - leeway
        ));
        // Without leeway, exp == now has expired.
        assert!(matches!(verify(&at(NOW), &jwks, NOW, 0), Err(TokenError::Expired { .. })));
        assert!(verify(&at(NOW + 1), &jwks, NOW, 0).is_ok());
        // A negative leeway counts as zero.
        assert!(verify(&at(NOW + 1), &jwks, NOW, -100).is_ok());
    }

    #[test]
    fn not_before_and_issued_at_edges_with_leeway() {
        let (key, jwks) = key_and_jwks();
        let leeway = 30;
        let token = |claim: &str, at: i64| {
            let mut claims = claims(json!({"exp": NOW + 600}));
            claims.insert(claim.to_owned(), json!(at));
            sign(&key, &claims).unwrap()
        };

        assert!(verify(&token("nbf", NOW + leeway), &jwks, NOW, leeway).is_ok());
        assert!(matches!(
            verify(&token("nbf", NOW + leeway + 1), &jwks, NOW, leeway),
            Err(TokenError::NotYetValid { nbf, now: NOW }) if nbf == NOW + leeway + 1
        ));
        assert!(verify(&token("iat", NOW + leeway), &jwks, NOW, leeway).is_ok());
        assert!(matches!(
            verify(&token("iat", NOW + leeway + 1), &jwks, NOW, leeway),
            Err(TokenError::IssuedInFuture { .. })
        ));
    }

    #[test]
    fn numeric_dates_may_be_floats_but_must_be_numbers() {
        let (key, jwks) = key_and_jwks();
        let verify_claims = |value: Value| verify(&sign(&key, &claims(value)).unwrap(), &jwks, NOW, 0);

        assert!(verify_claims(json!({"exp": NOW as f64 + 1.5})).is_ok());
        // Rounded down: 0.5 s after now counts as now, which has expired.
        assert!(matches!(verify_claims(json!({"exp": NOW as f64 + 0.5})), Err(TokenError::Expired { .. })));
        // nbf rounded up.
        assert!(matches!(
            verify_claims(json!({"exp": NOW + 60, "nbf": NOW as f64 + 0.5})),
            Err(TokenError::NotYetValid { .. })
        ));
        assert!(matches!(verify_claims(json!({"iat": NOW})), Err(TokenError::InvalidClaim { claim: "exp", .. })));
        assert!(matches!(
            verify_claims(json!({"exp": (NOW + 60).to_string()})),
            Err(TokenError::InvalidClaim { claim: "exp", .. })
        ));
        assert!(matches!(verify_claims(json!({"exp": 1e300})), Err(TokenError::InvalidClaim { .. })));
        assert!(matches!(verify_claims(json!({"exp": u64::MAX})), Err(TokenError::InvalidClaim { .. })));
        assert!(matches!(
            verify_claims(json!({"exp": NOW + 60, "nbf": null})),
            Err(TokenError::InvalidClaim { claim: "nbf", .. })
        ));
    }

    #[test]
    fn rotation_keeps_retired_key_for_max_lifetime() {
        let lifetime = 3600;
        let first = SigningKey::generate(NOW).unwrap();
        let first_kid = first.kid().to_owned();
        let mut ring = KeyRing::new(first);
        let old_token = sign(ring.active(), &standard_claims("iss", NOW, lifetime).unwrap()).unwrap();

        let rotated_at = NOW + 100;
        ring.rotate(SigningKey::generate(rotated_at).unwrap(), rotated_at).unwrap();
        assert_ne!(ring.active().kid(), first_kid);
        let new_token = sign(ring.active(), &standard_claims("iss", rotated_at, lifetime).unwrap()).unwrap();

        // Both verify while the retired key is published.
        let later = rotated_at + 10;
        let jwks = ring.jwks(later, lifetime);
        assert_eq!(jwks.keys.len(), 2);
        assert_eq!(jwks.keys[0].kid.as_deref(), Some(ring.active().kid()));
        assert!(verify(&old_token, &jwks, later, 0).is_ok());
        assert!(verify(&new_token, &jwks, later, 0).is_ok());
        assert!(ring.prune(later, lifetime).is_empty());

        // After the max lifetime the retired key is gone from the JWKS and the ring.
        let gone = rotated_at + lifetime;
        let jwks = ring.jwks(gone, lifetime);
        assert_eq!(jwks.keys.len(), 1);
        assert!(matches!(verify(&old_token, &jwks, NOW, 0), Err(TokenError::UnknownKey(_))));
        assert_eq!(ring.prune(gone, lifetime), vec![first_kid.clone()]);
        assert!(ring.get(&first_kid).is_none());
        assert_eq!(ring.records().len(), 1);
    }

    #[test]
    fn rotate_refuses_a_key_already_in_the_ring() {
        let key = SigningKey::generate(NOW).unwrap();
        let copy = SigningKey::from_pkcs8(&key.pkcs8(), NOW).unwrap();
        let mut ring = KeyRing::new(key);
        assert!(matches!(ring.rotate(copy, NOW + 1), Err(TokenError::InvalidKeyRing(_))));
    }

    #[test]
    fn key_ring_records_and_parts_round_trip() {
        let mut ring = KeyRing::new(SigningKey::generate(NOW).unwrap());
        ring.rotate(SigningKey::generate(NOW + 10).unwrap(), NOW + 10).unwrap();
        ring.rotate(SigningKey::generate(NOW + 20).unwrap(), NOW + 20).unwrap();
        let records = ring.records();
        assert_eq!(records.len(), 3);
        assert_eq!(records[2].retired_at, None);
        assert_eq!(records[0].retired_at, Some(NOW + 10));

        // Records serialize without secrets; keys come back by kid.
        let stored = serde_json::to_string(&records).unwrap();
        let parsed: Vec<KeyRecord> = serde_json::from_str(&stored).unwrap();
        let parts: Vec<_> =
            parsed.into_iter().rev().map(|record| (record.clone(), ring.get(&record.kid).unwrap().pkcs8())).collect();
        let restored = KeyRing::from_parts(parts).unwrap();
        assert_eq!(restored.records(), records);
        assert_eq!(restored.jwks(NOW + 30, 3600), ring.jwks(NOW + 30, 3600));

        // A record naming another key is refused.
        let mut wrong = records[0].clone();
        wrong.kid = records[1].kid.clone();
        let parts = vec![(wrong, ring.get(&records[0].kid).unwrap().pkcs8())];
        assert!(matches!(KeyRing::from_parts(parts), Err(TokenError::InvalidKeyRing(_))));
        // No active key is refused.
        let parts = vec![(records[0].clone(), ring.get(&records[0].kid).unwrap().pkcs8())];
        assert!(matches!(KeyRing::from_parts(parts), Err(TokenError::InvalidKeyRing(_))));
        // The same key twice is refused.
        let active = &records[2];
        let pkcs8 = ring.get(&active.kid).unwrap().pkcs8();
        let mut retired_copy = active.clone();
        retired_copy.retired_at = Some(NOW);
        let parts = vec![(active.clone(), pkcs8.clone()), (retired_copy, pkcs8)];
        assert!(matches!(KeyRing::from_parts(parts), Err(TokenError::InvalidKeyRing(_))));
    }

    #[test]
    fn rs256_rs384_ps256_verify_against_rsa_jwk() {
        let pair = aws_lc_rs::rsa::KeyPair::generate(KeySize::Rsa2048).unwrap();
        let claims = json!({"exp": NOW + 60, "x-ms-ver": "1.0"});
        let cases: [(&'static dyn RsaEncoding, &str); 3] = [
            (&signature::RSA_PKCS1_SHA256, "RS256"),
            (&signature::RSA_PKCS1_SHA384, "RS384"),
            (&signature::RSA_PSS_SHA256, "PS256"),
        ];
        for (encoding, alg) in cases {
            let jwks = Jwks { keys: vec![rsa_jwk(&pair, "maa-1", None)] };
            let token = rsa_token(&pair, encoding, alg, "maa-1", &claims);
            let verified = verify(&token, &jwks, NOW, 0).unwrap();
            assert_eq!(verified.algorithm().as_str(), alg);
            assert_eq!(verified.claim("x-ms-ver"), Some(&json!("1.0")));
        }
        // A JWK pinned to RS256 refuses PS256, and an RS256 token does not verify as PS256.
        let pinned = Jwks { keys: vec![rsa_jwk(&pair, "maa-1", Some("RS256"))] };
        let ps = rsa_token(&pair, &signature::RSA_PSS_SHA256, "PS256", "maa-1", &claims);
        assert!(matches!(verify(&ps, &pinned, NOW, 0), Err(TokenError::AlgorithmMismatch { .. })));
        let rs = rsa_token(&pair, &signature::RSA_PKCS1_SHA256, "RS256", "maa-1", &claims);
        let (_, payload, sig) = segments(&rs);
        let relabeled = format!("{}.{payload}.{sig}", b64(br#"{"alg":"PS256","kid":"maa-1"}"#));
        let open = Jwks { keys: vec![rsa_jwk(&pair, "maa-1", None)] };
        assert!(matches!(verify(&relabeled, &open, NOW, 0), Err(TokenError::BadSignature)));
        // A leading zero on n is tolerated.
        let mut padded = rsa_jwk(&pair, "maa-1", None);
        let mut n = vec![0];
        n.extend(URL_SAFE_NO_PAD.decode(padded.n.as_deref().unwrap()).unwrap());
        padded.n = Some(b64(&n));
        assert!(verify(&rs, &Jwks { keys: vec![padded] }, NOW, 0).is_ok());
        // An RSA token against the EC signing key's JWKS is an algorithm mismatch.
        let (key, mut ec) = key_and_jwks();
        ec.keys[0].kid = Some("maa-1".to_owned());
        assert!(matches!(verify(&rs, &ec, NOW, 0), Err(TokenError::AlgorithmMismatch { .. })));
        drop(key);
    }

    #[test]
    fn short_rsa_modulus_is_refused() {
        let jwk = Jwk {
            kty: "RSA".to_owned(),
            crv: None,
            x: None,
            y: None,
            n: Some(b64(&[0xc5; 128])),
            e: Some("AQAB".to_owned()),
            kid: Some("short".to_owned()),
            alg: None,
            key_use: None,
        };
        let token = unsigned(&json!({"alg": "RS256", "kid": "short"}), &json!({"exp": NOW + 60}), &[1; 128]);
        assert!(matches!(verify(&token, &Jwks { keys: vec![jwk] }, NOW, 0), Err(TokenError::InvalidJwk(_))));
    }

    #[test]
    fn es256_verifies_against_p256_jwk() {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let point = pair.public_key().as_ref();
        assert_eq!(point.len(), 65);
        let jwk = Jwk {
            kty: "EC".to_owned(),
            crv: Some("P-256".to_owned()),
            x: Some(b64(&point[1..33])),
            y: Some(b64(&point[33..65])),
            n: None,
            e: None,
            kid: Some("p256".to_owned()),
            alg: Some("ES256".to_owned()),
            key_use: Some("sig".to_owned()),
        };
        let input = format!(
            "{}.{}",
            b64(br#"{"alg":"ES256","kid":"p256"}"#),
            b64(json!({"exp": NOW + 60}).to_string().as_bytes())
        );
        let sig = pair.sign(&SystemRandom::new(), input.as_bytes()).unwrap();
        assert_eq!(sig.as_ref().len(), 64);
        let token = format!("{input}.{}", b64(sig.as_ref()));
        let jwks = Jwks { keys: vec![jwk.clone()] };
        assert_eq!(verify(&token, &jwks, NOW, 0).unwrap().algorithm(), Algorithm::Es256);

        // The same JWK mislabeled as P-384 is refused, not misparsed.
        let mut wrong_curve = jwk;
        wrong_curve.crv = Some("P-384".to_owned());
        wrong_curve.alg = None;
        assert!(verify(&token, &Jwks { keys: vec![wrong_curve] }, NOW, 0).is_err());
    }

    #[test]
    fn malformed_tokens_are_refused_without_panic() {
        let (key, jwks) = key_and_jwks();
        let token = sign(&key, &valid_claims()).unwrap();
        let (header, payload, sig) = segments(&token);
        let malformed = |t: &str| matches!(verify(t, &jwks, NOW, 0), Err(TokenError::Malformed(_)));

        assert!(malformed(""));
        assert!(malformed("."));
        assert!(malformed(".."));
        assert!(malformed(&format!("{header}.{payload}")));
        assert!(malformed(&format!("{header}.{payload}.{sig}.{sig}")));
        assert!(malformed(&format!("{header}=.{payload}.{sig}")));
        assert!(malformed(&format!("{header}.{payload}.{sig}==")));
        assert!(malformed(&format!("{header}.{payload}.{}", URL_SAFE_NO_PAD.encode([0; 96]).replace('A', "+"))));
        assert!(malformed(&format!(" {header}.{payload}.{sig}")));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(b"not json"))));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(b"[\"ES384\"]"))));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(br#"{"alg":"ES384"} x"#))));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(br#"{"alg":"ES384","alg":"none"}"#))));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(br#"{"kid":"x"}"#))));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(br#"{"alg":384}"#))));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(&[0xff, 0xfe]))));
        assert!(malformed(&format!("{}.{payload}.{sig}", b64(&"[".repeat(10_000).into_bytes()))));
        // Non-canonical trailing bits: "AB" decodes like "AA" but is refused.
        assert!(malformed(&format!("{header}.{payload}.AB")));

        let huge = format!("{header}.{}.{sig}", "A".repeat(MAX_TOKEN_LEN));
        match verify(&huge, &jwks, NOW, 0) {
            Err(error @ TokenError::Malformed(_)) => assert!(error.to_string().len() < 200),
            result => panic!("expected Malformed, got {result:?}"),
        }

        // A validly signed payload that is not an object is refused after the signature.
        let array = sign_payload_json(&key, &json!([1, 2, 3])).unwrap();
        assert!(malformed(&array));
    }

    #[test]
    fn errors_keep_attacker_strings_short() {
        let (_, jwks) = key_and_jwks();
        let long = "k".repeat(10_000);
        let token = unsigned(&json!({"alg": "ES384", "kid": long}), &json!({"exp": NOW + 60}), b"x");
        let error = verify(&token, &jwks, NOW, 0).unwrap_err();
        assert!(matches!(error, TokenError::UnknownKey(_)));
        assert!(error.to_string().len() < 300, "{error}");
        let token = unsigned(&json!({"alg": "none\n\u{1b}[31m"}), &json!({}), b"x");
        let error = verify(&token, &jwks, NOW, 0).unwrap_err();
        assert!(!error.to_string().contains('\n'));
    }

    #[test]
    fn pkcs8_round_trip() {
        let key = SigningKey::generate(NOW).unwrap();
        let restored = SigningKey::from_pkcs8(&key.pkcs8(), NOW).unwrap();
        assert_eq!(restored.kid(), key.kid());
        assert_eq!(restored.public_jwk(), key.public_jwk());
        assert_eq!(restored.created_at(), NOW);
        let token = sign(&restored, &valid_claims()).unwrap();
        assert!(verify(&token, &Jwks { keys: vec![key.public_jwk()] }, NOW, 0).is_ok());

        assert!(matches!(SigningKey::from_pkcs8(b"garbage", NOW), Err(TokenError::InvalidSigningKey(_))));
        let p256 = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap().to_pkcs8v1().unwrap();
        assert!(matches!(SigningKey::from_pkcs8(p256.as_ref(), NOW), Err(TokenError::InvalidSigningKey(_))));
    }

    #[test]
    fn signing_key_debug_shows_no_key_bytes() {
        let key = SigningKey::generate(NOW).unwrap();
        let debug = format!("{key:?} {:?}", KeyRing::new(SigningKey::from_pkcs8(&key.pkcs8(), NOW).unwrap()));
        assert!(debug.contains(key.kid()));
        let jwk = key.public_jwk();
        let pkcs8 = key.pkcs8();
        for secret_ish in [b64(&pkcs8), jwk.x.unwrap(), jwk.y.unwrap(), format!("{:?}", &pkcs8[..8])] {
            assert!(!debug.contains(&secret_ish), "{debug}");
        }
        assert!(!debug.contains("pkcs8"));
    }

    #[test]
    fn public_jwk_is_es384_with_thumbprint_kid() {
        let key = SigningKey::generate(NOW).unwrap();
        let jwk = key.public_jwk();
        assert_eq!(jwk.kty, "EC");
        assert_eq!(jwk.crv.as_deref(), Some("P-384"));
        assert_eq!(jwk.alg.as_deref(), Some("ES384"));
        assert_eq!(jwk.key_use.as_deref(), Some("sig"));
        assert_eq!(URL_SAFE_NO_PAD.decode(jwk.x.as_deref().unwrap()).unwrap().len(), 48);
        assert_eq!(jwk.kid.as_deref(), Some(key.kid()));
        assert_eq!(thumbprint(&jwk).unwrap(), key.kid());
        assert_eq!(key.kid().len(), 43);
        let text = serde_json::to_value(&jwk).unwrap();
        assert_eq!(text["use"], json!("sig"));
        assert!(text.get("n").is_none());
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 section 3.1, with its extra members (alg, kid) and an unknown one.
        let jwk: Jwk = serde_json::from_value(json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29",
            "x5c": ["ignored"]
        }))
        .unwrap();
        assert_eq!(thumbprint(&jwk).unwrap(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");

        let mut missing = jwk;
        missing.e = None;
        assert!(matches!(thumbprint(&missing), Err(TokenError::InvalidJwk(_))));
    }

    #[test]
    fn standard_claims_are_complete_and_unique() {
        let a = standard_claims("https://trust.example", NOW, 300).unwrap();
        let b = standard_claims("https://trust.example", NOW, 300).unwrap();
        assert_eq!(a["iss"], json!("https://trust.example"));
        assert_eq!(a["iat"], json!(NOW));
        assert_eq!(a["nbf"], json!(NOW));
        assert_eq!(a["exp"], json!(NOW + 300));
        let jti = a["jti"].as_str().unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(jti).unwrap().len(), 16);
        assert_ne!(a["jti"], b["jti"]);
    }

    #[test]
    fn openid_configuration_points_at_certs() {
        let config = openid_configuration("https://trust.example/");
        assert_eq!(config["issuer"], json!("https://trust.example/"));
        assert_eq!(config["jwks_uri"], json!("https://trust.example/certs"));
        assert_eq!(config["id_token_signing_alg_values_supported"], json!(["ES384"]));
        assert_eq!(config["response_types_supported"], json!(["token"]));
        assert!(config["claims_supported"].as_array().unwrap().contains(&json!("exp")));
    }

    #[test]
    fn jwks_ignores_unknown_members_and_round_trips() {
        let jwks: Jwks = serde_json::from_value(json!({
            "keys": [{"kty": "RSA", "kid": "k", "x5c": ["MIIB"], "x5t": "abc", "n": "AQAB", "e": "AQAB"}],
            "extra": true
        }))
        .unwrap();
        assert_eq!(jwks.keys[0].kid.as_deref(), Some("k"));
        let back: Jwks = serde_json::from_value(serde_json::to_value(&jwks).unwrap()).unwrap();
        assert_eq!(back, jwks);
        assert!(serde_json::from_value::<Jwk>(json!({"kid": "no kty"})).is_err());
    }
}
