//! A key released through the workload API, and how it is taken out of the
//! answer without leaving copies behind.
//!
//! The API answers `{"key": "<the JWK as a JSON string>"}`, as the Azure
//! sidecar does (a JWK object in place of the string is taken too). serde
//! would unescape that string through a scratch buffer that is never
//! zeroized, so it is unescaped here, straight into a zeroizing buffer, and
//! the JWK's members are then read in place.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Deserialize;
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use crate::client::ClientError;

/// Base64url as JWKs write it (RFC 7518: no padding), padded input taken too.
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A released key: its JWK (RFC 7517), zeroized on drop.
///
/// `Debug` shows `kty` and `kid` alone; there is no `Clone`.
pub struct ReleasedKey {
    jwk: Zeroizing<String>,
    kty: String,
    kid: Option<String>,
    octets: Option<Zeroizing<Vec<u8>>>,
}

#[derive(Deserialize)]
struct KeyAnswer<'a> {
    #[serde(borrow)]
    key: &'a RawValue,
}

/// The members read; the others are skipped without a copy.
#[derive(Deserialize)]
struct JwkMembers<'a> {
    #[serde(borrow)]
    kty: Cow<'a, str>,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    /// Base64url never needs an escape, so `k` is borrowed, never copied.
    #[serde(borrow, default)]
    k: Option<&'a str>,
}

impl ReleasedKey {
    /// Reads the `/key/release` answer.
    pub(crate) fn from_answer(body: &[u8]) -> Result<Self, ClientError> {
        let answer: KeyAnswer<'_> = serde_json::from_slice(body)
            .map_err(|e| ClientError::Answer(format!("the key release answer has no key: {e}")))?;
        let raw = answer.key.get();
        let jwk = if raw.starts_with('"') {
            unescape(raw).ok_or_else(|| ClientError::Answer("the key is not a valid json string".into()))?
        } else {
            Zeroizing::new(raw.to_owned())
        };
        Self::from_jwk(jwk)
    }

    /// Takes a JWK in JSON: an object with a string `kty` and, for `oct`
    /// keys, the key bytes in `k`.
    fn from_jwk(jwk: Zeroizing<String>) -> Result<Self, ClientError> {
        // serde_json's errors name a line and column, never the input.
        let members: JwkMembers<'_> = serde_json::from_str(&jwk)
            .map_err(|e| ClientError::Answer(format!("the released key is not a json web key: {e}")))?;
        let octets = match (members.kty.as_ref(), members.k) {
            ("oct", Some(k)) => Some(Zeroizing::new(
                B64URL.decode(k).map_err(|_| ClientError::Answer("the oct key's k is not base64url".into()))?,
            )),
            ("oct", None) => return Err(ClientError::Answer("the oct key has no k".into())),
            _ => None,
        };
        let (kty, kid) = (members.kty.into_owned(), members.kid.map(Cow::into_owned));
        Ok(Self { jwk, kty, kid, octets })
    }

    /// The key type: `oct`, `RSA` or `EC`.
    pub fn kty(&self) -> &str {
        &self.kty
    }

    /// The key identifier, if the JWK has one.
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The key bytes of an `oct` (symmetric) key; `None` for other types.
    pub fn octets(&self) -> Option<&[u8]> {
        self.octets.as_deref().map(Vec::as_slice)
    }

    /// The whole JWK as JSON, for the private members of `RSA` and `EC`
    /// keys. Copies of it are the caller's to zeroize.
    pub fn jwk_json(&self) -> &str {
        &self.jwk
    }
}

impl fmt::Debug for ReleasedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleasedKey").field("kty", &self.kty).field("kid", &self.kid).finish_non_exhaustive()
    }
}

/// Unescapes a JSON string literal (quotes included) into a zeroizing
/// string. Unescaping never lengthens text, so the buffer sized to the
/// literal never reallocates.
fn unescape(literal: &str) -> Option<Zeroizing<String>> {
    let inner = literal.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = Zeroizing::new(String::with_capacity(inner.len()));
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        let c = match c {
            '\\' => match chars.next()? {
                '"' => '"',
                '\\' => '\\',
                '/' => '/',
                'b' => '\u{8}',
                'f' => '\u{c}',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'u' => {
                    let unit = hex4(&mut chars)?;
                    if (0xD800..0xDC00).contains(&unit) {
                        // A high surrogate must be followed by `\u` and a low one.
                        if chars.next()? != '\\' || chars.next()? != 'u' {
                            return None;
                        }
                        let low = hex4(&mut chars)?;
                        char::decode_utf16([unit, low]).next()?.ok()?
                    } else {
                        char::from_u32(u32::from(unit))?
                    }
                }
                _ => return None,
            },
            '"' => return None,
            c if u32::from(c) < 0x20 => return None,
            c => c,
        };
        out.push(c);
    }
    Some(out)
}

fn hex4(chars: &mut std::str::Chars<'_>) -> Option<u16> {
    let mut unit = 0_u16;
    for _ in 0..4 {
        unit = unit << 4 | u16::try_from(chars.next()?.to_digit(16)?).ok()?;
    }
    Some(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_agrees_with_serde() {
        for text in
            ["", "plain", "q\"uote", "back\\slash", "tab\tnl\n", "\u{1}ctl", "é", "😀 emoji", "{\"kty\":\"oct\"}"]
        {
            let literal = serde_json::to_string(text).unwrap();
            assert_eq!(unescape(&literal).unwrap().as_str(), text, "{literal}");
        }
        assert_eq!(unescape(r#""\ud83d\ude00\u00e9\/""#).unwrap().as_str(), "😀é/");
        for bad in [r#""\x""#, r#""\ud83d""#, r#""\ude00""#, r#""\u12""#, "\"a\"b\"", "noquotes", "\"\u{1}\""] {
            assert!(unescape(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn answers_with_a_string_or_an_object_are_read() {
        let jwk = r#"{"kty":"oct","kid":"k1","k":"AAECAw"}"#;
        let as_string = serde_json::json!({ "key": jwk }).to_string();
        let as_object = format!(r#"{{"key": {jwk}}}"#);
        for answer in [as_string, as_object] {
            let key = ReleasedKey::from_answer(answer.as_bytes()).unwrap();
            assert_eq!((key.kty(), key.kid(), key.octets()), ("oct", Some("k1"), Some([0, 1, 2, 3].as_slice())));
            assert_eq!(key.jwk_json(), jwk);
        }
    }

    #[test]
    fn other_key_types_have_no_octets_and_bad_keys_are_refused() {
        let rsa = serde_json::json!({ "key": r#"{"kty":"RSA","n":"AQ","e":"AQAB","d":"c2VjcmV0"}"# }).to_string();
        let key = ReleasedKey::from_answer(rsa.as_bytes()).unwrap();
        assert_eq!((key.kty(), key.octets()), ("RSA", None));
        assert!(!format!("{key:?}").contains("c2VjcmV0"));
        for bad in [r#"{}"#, r#"{"key": 1}"#, r#"{"key": "{\"k\":\"AA\"}"}"#, r#"{"key": "{\"kty\":\"oct\"}"}"#] {
            assert!(matches!(ReleasedKey::from_answer(bad.as_bytes()), Err(ClientError::Answer(_))), "{bad}");
        }
        let bad_k = r#"{"key": "{\"kty\":\"oct\",\"k\":\"!!\"}"}"#;
        let e = ReleasedKey::from_answer(bad_k.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("not base64url"), "{e}");
    }
}
