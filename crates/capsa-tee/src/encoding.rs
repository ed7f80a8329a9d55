//! How evidence and endorsements arrive: raw or hex bytes, DER or PEM
//! certificates, and the certificate-cache JSON Azure's paravisor serves.

use serde::Deserialize;

use crate::snp::parse_pem_certs;

/// Why an input could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EncodingError {
    /// The input is empty.
    #[error("the {what} is empty")]
    Empty {
        /// What was being read.
        what: &'static str,
    },
    /// The certificate input is in no format capsa reads.
    #[error("the {what} is neither DER, PEM, nor Azure certificate-cache JSON (vcekCert, certificateChain): {reason}")]
    Certificate {
        /// What was being read.
        what: &'static str,
        /// Details.
        reason: String,
    },
}

/// Evidence bytes, accepting raw binary or hex text (whitespace ignored):
/// tools print reports both ways, and a hex dump is never valid binary
/// evidence since every format starts with non-ASCII version bytes.
pub fn evidence_bytes(input: &[u8]) -> Result<Vec<u8>, EncodingError> {
    let text: Vec<u8> = input.iter().copied().filter(|b| !b.is_ascii_whitespace()).collect();
    if text.is_empty() {
        return Err(EncodingError::Empty { what: "evidence" });
    }
    if text.len() % 2 == 0 && text.iter().all(u8::is_ascii_hexdigit) {
        if let Ok(bytes) = hex::decode(&text) {
            return Ok(bytes);
        }
    }
    Ok(input.to_vec())
}

/// An endorsement certificate and, when the input carried it, its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endorsement {
    /// The VCEK or VLEK, DER.
    pub leaf_der: Vec<u8>,
    /// The intermediate and root, as PEM, when the input included them.
    pub chain_pem: Option<Vec<u8>>,
}

/// Azure's certificate cache (THIM) answer for a VCEK.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AzureCertCache {
    vcek_cert: String,
    certificate_chain: Option<String>,
}

/// Reads a VCEK or VLEK given as DER, PEM (optionally followed by its chain,
/// as Azure's `vcek.pem` files are), or Azure certificate-cache JSON.
pub fn endorsement(input: &[u8]) -> Result<Endorsement, EncodingError> {
    let what = "endorsement certificate";
    let trimmed = input.trim_ascii_start();
    if trimmed.is_empty() {
        return Err(EncodingError::Empty { what });
    }
    let bad = |reason: String| EncodingError::Certificate { what, reason };
    if trimmed.starts_with(b"{") {
        let cache: AzureCertCache = serde_json::from_slice(trimmed).map_err(|e| bad(e.to_string()))?;
        let leaf = parse_pem_certs(cache.vcek_cert.as_bytes()).map_err(bad)?;
        let leaf_der = leaf.into_iter().next().ok_or_else(|| bad("vcekCert holds no certificate".into()))?;
        return Ok(Endorsement { leaf_der, chain_pem: cache.certificate_chain.map(String::into_bytes) });
    }
    if trimmed.starts_with(b"-----") {
        let mut certs = parse_pem_certs(trimmed).map_err(bad)?.into_iter();
        let leaf_der = certs.next().ok_or_else(|| bad("no CERTIFICATE block".into()))?;
        let rest: Vec<Vec<u8>> = certs.collect();
        let chain_pem =
            (!rest.is_empty()).then(|| rest.iter().map(|der| pem("CERTIFICATE", der)).collect::<String>().into_bytes());
        return Ok(Endorsement { leaf_der, chain_pem });
    }
    Ok(Endorsement { leaf_der: input.to_vec(), chain_pem: None })
}

/// Encodes DER as a PEM block.
pub fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Formats an instant as RFC 3339 for messages (the `Display` form if it
/// cannot be, which only happens for years outside 0..=9999).
pub(crate) fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// Parses a hex argument of an exact length, saying what is wrong.
pub fn hex_exact<const N: usize>(what: &str, text: &str) -> Result<[u8; N], String> {
    let bytes = hex::decode(text.trim()).map_err(|e| format!("{what} is not hex: {e}"))?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| format!("{what} must be {N} bytes ({} hex digits), got {len} bytes", N * 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCEK: &[u8] = include_bytes!("../../../../shared/testdata/evidence/snp/milan-v2-vcek.der");

    #[test]
    fn hex_and_binary_evidence() {
        assert_eq!(evidence_bytes(b"0a0B\n ff\n").unwrap(), vec![0x0a, 0x0b, 0xff]);
        assert_eq!(evidence_bytes(&[2, 0, 0, 0]).unwrap(), vec![2, 0, 0, 0]);
        assert_eq!(evidence_bytes(b"abc").unwrap(), b"abc".to_vec());
        assert!(evidence_bytes(b" \n").is_err());
    }

    #[test]
    fn endorsement_in_every_format() {
        let der = endorsement(VCEK).unwrap();
        assert_eq!(der.leaf_der, VCEK);
        let chain = include_str!("../roots/milan_ask_ark_asvk.pem");
        let pem_in = format!("{}{chain}", pem("CERTIFICATE", VCEK));
        let from_pem = endorsement(pem_in.as_bytes()).unwrap();
        assert_eq!(from_pem.leaf_der, VCEK);
        assert!(from_pem.chain_pem.is_some());
        let json = serde_json::json!({"vcekCert": pem("CERTIFICATE", VCEK), "certificateChain": chain, "tcbm": "7300000000000003"});
        let from_json = endorsement(json.to_string().as_bytes()).unwrap();
        assert_eq!(from_json.leaf_der, VCEK);
        assert_eq!(from_json.chain_pem.as_deref(), Some(chain.as_bytes()));
        assert!(endorsement(b"{\"nope\": 1}").is_err());
    }

    #[test]
    fn hex_arguments_are_length_checked() {
        assert_eq!(hex_exact::<2>("x", "0a0b").unwrap(), [10, 11]);
        assert!(hex_exact::<2>("x", "0a").unwrap_err().contains("must be 2 bytes"));
        assert!(hex_exact::<2>("x", "zz").unwrap_err().contains("not hex"));
    }
}
