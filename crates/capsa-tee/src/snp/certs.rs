//! AMD's SEV-SNP certificates: parsing, their signatures, and the
//! endorsement-key extensions that tie a VCEK or VLEK to a chip and a TCB.
//!
//! AMD's key distribution service issues X.509 certificates with a fixed
//! profile (AMD's "Versioned Chip Endorsement Key (VCEK) Certificate and KDS
//! Interface Specification", publication 57230): RSA-4096 ARK, ASK and ASVK
//! signed RSASSA-PSS/SHA-384 with a 48-byte salt, and P-384 VCEK/VLEK keys
//! carrying SPLs and the hardware ID in private extensions. This module
//! accepts exactly that profile and nothing looser.

use aws_lc_rs::signature::{self, ParsedPublicKey, UnparsedPublicKey};
use der::asn1::ObjectIdentifier;
use der::{Decode, Encode, Reader, SliceReader, Tag, Tagged};
use sev::firmware::host::TcbVersion;
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::name::Name;

use super::Product;
use crate::encoding::rfc3339;

/// Why a certificate cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The bytes are not a DER (or PEM) X.509 certificate.
    #[error("{role} certificate is not a valid X.509 certificate: {reason}")]
    Malformed {
        /// Which certificate (VCEK, ASK, ...).
        role: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// The certificate is not signed the way AMD signs.
    #[error("{role} certificate is signed with {found}, expected RSASSA-PSS with SHA-384 and a 48-byte salt")]
    SignatureAlgorithm {
        /// Which certificate.
        role: &'static str,
        /// The algorithm found.
        found: String,
    },
    /// The certificate's key is not of the expected type.
    #[error("{role} certificate has an unexpected public key: {reason}")]
    PublicKey {
        /// Which certificate.
        role: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The signature does not verify with the issuer's key.
    #[error("{role} certificate's signature does not verify with the {issuer_role} key")]
    Signature {
        /// Which certificate.
        role: &'static str,
        /// Which key was expected to have signed it.
        issuer_role: &'static str,
    },
    /// The issuer name does not match the issuer's subject.
    #[error("{role} certificate names issuer \"{found}\" but the {issuer_role} is \"{expected}\"")]
    IssuerName {
        /// Which certificate.
        role: &'static str,
        /// Which certificate should have issued it.
        issuer_role: &'static str,
        /// The issuer's subject.
        expected: String,
        /// The issuer the certificate names.
        found: String,
    },
    /// The instant of verification is outside the validity period.
    #[error("{role} certificate is not valid at {at}: valid from {not_before} to {not_after}")]
    Validity {
        /// Which certificate.
        role: &'static str,
        /// The instant checked.
        at: String,
        /// Start of validity.
        not_before: String,
        /// End of validity.
        not_after: String,
    },
    /// A required AMD extension is missing or malformed.
    #[error("{role} certificate extension {oid} ({name}) is {problem}")]
    Extension {
        /// Which certificate.
        role: &'static str,
        /// The extension OID.
        oid: String,
        /// The extension's name.
        name: &'static str,
        /// "missing" or what is wrong.
        problem: String,
    },
    /// The certificate's common name is not one AMD issues.
    #[error("{role} certificate's common name \"{found}\" is not an AMD SEV name ({expected})")]
    CommonName {
        /// Which certificate.
        role: &'static str,
        /// What was expected.
        expected: &'static str,
        /// The name found.
        found: String,
    },
}

/// OIDs of the VCEK/VLEK extensions (publication 57230, table "VCEK
/// certificate extensions").
mod oid {
    use der::asn1::ObjectIdentifier as Oid;
    pub const PRODUCT_NAME: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.2");
    pub const BL_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
    pub const TEE_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
    pub const SNP_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
    pub const UCODE_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
    pub const FMC_SPL: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.3.9");
    pub const HW_ID: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.4");
    pub const CSP_ID: Oid = Oid::new_unwrap("1.3.6.1.4.1.3704.1.5");
    pub const RSASSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
    pub const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    pub const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub const SECP384R1: Oid = Oid::new_unwrap("1.3.132.0.34");
    pub const COMMON_NAME: Oid = Oid::new_unwrap("2.5.4.3");
    pub const ORGANIZATION: Oid = Oid::new_unwrap("2.5.4.10");
}

/// RSASSA-PSS-params as AMD encodes them: SHA-384, MGF1 with SHA-384, salt
/// 48, with and without the (default) trailer field. Comparing encodings is
/// stricter than parsing them and rejects every parameter set aws-lc's
/// `RSA_PSS_*_SHA384` would not check itself.
const PSS_SHA384_PARAMS: [&[u8]; 2] = [
    &hex_literal::<59>(
        "3039a00f300d06096086480165030402020500a11c301a06092a864886f70d010108300d06096086480165030402020500a203020130a303020101",
    ),
    &hex_literal::<54>(
        "3034a00f300d06096086480165030402020500a11c301a06092a864886f70d010108300d06096086480165030402020500a203020130",
    ),
];

// Evaluated at compile time only: a bad digit fails the build, not a run.
#[allow(clippy::indexing_slicing, clippy::panic)]
const fn hex_literal<const N: usize>(s: &str) -> [u8; N] {
    let bytes = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = (nibble(bytes[2 * i]) << 4) | nibble(bytes[2 * i + 1]);
        i += 1;
    }
    out
}

#[allow(clippy::panic)]
const fn nibble(c: u8) -> u8 {
    match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        _ => panic!("not a lower-case hex digit"),
    }
}

/// A parsed certificate with the raw bytes its signature covers.
#[derive(Clone)]
pub struct AmdCert {
    role: &'static str,
    der: Vec<u8>,
    tbs_range: std::ops::Range<usize>,
    cert: Certificate,
}

impl std::fmt::Debug for AmdCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmdCert").field("role", &self.role).field("subject", &self.subject_string()).finish()
    }
}

impl AmdCert {
    /// Parses a DER certificate playing `role` in the chain ("VCEK", "ASK", ...).
    pub fn from_der(role: &'static str, der: &[u8]) -> Result<Self, CertError> {
        let malformed = |reason: String| CertError::Malformed { role, reason };
        let cert = Certificate::from_der(der).map_err(|e| malformed(e.to_string()))?;
        // The signature covers the TBS bytes as sent; take them from the input
        // rather than re-encoding the parsed structure.
        let tbs_range = (|| -> der::Result<std::ops::Range<usize>> {
            let outer = SliceReader::new(der)?;
            let header = outer.peek_header()?;
            let header_len = usize::try_from(header.encoded_len()?)?;
            let mut inner = SliceReader::new(der.get(header_len..).unwrap_or_default())?;
            let tbs_len = inner.tlv_bytes()?.len();
            Ok(header_len..header_len + tbs_len)
        })()
        .map_err(|e| malformed(e.to_string()))?;
        Ok(Self { role, der: der.to_vec(), tbs_range, cert })
    }

    /// Parses the first certificate of a PEM document.
    pub fn from_pem(role: &'static str, pem: &[u8]) -> Result<Self, CertError> {
        let docs = parse_pem_certs(pem).map_err(|reason| CertError::Malformed { role, reason })?;
        let first = docs
            .into_iter()
            .next()
            .ok_or_else(|| CertError::Malformed { role, reason: "no CERTIFICATE block in PEM input".into() })?;
        Self::from_der(role, &first)
    }

    /// The certificate's DER encoding.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// The role this certificate plays in the chain.
    pub fn role(&self) -> &'static str {
        self.role
    }

    fn tbs(&self) -> &[u8] {
        self.der.get(self.tbs_range.clone()).unwrap_or_default()
    }

    /// The subject's common name, if it has one.
    pub fn common_name(&self) -> Option<String> {
        name_attr(&self.cert.tbs_certificate.subject, &oid::COMMON_NAME)
    }

    /// The issuer's common name, if it has one.
    pub fn issuer_common_name(&self) -> Option<String> {
        name_attr(&self.cert.tbs_certificate.issuer, &oid::COMMON_NAME)
    }

    /// The subject's organisation, if it has one.
    pub fn organization(&self) -> Option<String> {
        name_attr(&self.cert.tbs_certificate.subject, &oid::ORGANIZATION)
    }

    /// The subject, as a readable string.
    pub fn subject_string(&self) -> String {
        self.cert.tbs_certificate.subject.to_string()
    }

    /// Start and end of the validity period.
    pub fn validity(&self) -> (OffsetDateTime, OffsetDateTime) {
        let v = &self.cert.tbs_certificate.validity;
        (to_datetime(v.not_before.to_unix_duration()), to_datetime(v.not_after.to_unix_duration()))
    }

    /// Checks the validity period at `at`.
    pub fn check_validity(&self, at: OffsetDateTime) -> Result<(), CertError> {
        let (not_before, not_after) = self.validity();
        if at < not_before || at > not_after {
            return Err(CertError::Validity {
                role: self.role,
                at: rfc3339(at),
                not_before: rfc3339(not_before),
                not_after: rfc3339(not_after),
            });
        }
        Ok(())
    }

    /// Whether the subject and SPKI of two certificates are identical: the
    /// same key under the same name, whatever else was re-issued.
    pub fn same_key_and_name(&self, other: &AmdCert) -> bool {
        let a = &self.cert.tbs_certificate;
        let b = &other.cert.tbs_certificate;
        a.subject == b.subject && a.subject_public_key_info == b.subject_public_key_info
    }

    fn spki_bits(&self) -> &[u8] {
        self.cert.tbs_certificate.subject_public_key_info.subject_public_key.raw_bytes()
    }

    /// The RSA public key (PKCS#1) of a CA certificate.
    fn rsa_public_key(&self) -> Result<&[u8], CertError> {
        let alg = &self.cert.tbs_certificate.subject_public_key_info.algorithm;
        if alg.oid != oid::RSA_ENCRYPTION && alg.oid != oid::RSASSA_PSS {
            return Err(CertError::PublicKey { role: self.role, reason: format!("algorithm {} is not RSA", alg.oid) });
        }
        Ok(self.spki_bits())
    }

    /// The P-384 public key of a VCEK or VLEK, ready for report verification.
    pub fn p384_public_key(&self) -> Result<ParsedPublicKey, CertError> {
        let spki = &self.cert.tbs_certificate.subject_public_key_info;
        let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        if spki.algorithm.oid != oid::EC_PUBLIC_KEY || curve != Some(oid::SECP384R1) {
            return Err(CertError::PublicKey {
                role: self.role,
                reason: format!("algorithm {} curve {curve:?} is not ECDSA P-384", spki.algorithm.oid),
            });
        }
        ParsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, self.spki_bits())
            .map_err(|e| CertError::PublicKey { role: self.role, reason: e.to_string() })
    }

    /// Checks that `issuer` signed this certificate, AMD's way.
    pub fn verify_issued_by(&self, issuer: &AmdCert) -> Result<(), CertError> {
        let alg = &self.cert.signature_algorithm;
        let params = alg.parameters.as_ref().and_then(|p| p.to_der().ok()).unwrap_or_default();
        if alg.oid != oid::RSASSA_PSS || !PSS_SHA384_PARAMS.contains(&params.as_slice()) {
            return Err(CertError::SignatureAlgorithm { role: self.role, found: alg.oid.to_string() });
        }
        // The outer algorithm is unsigned; the signed TBS copy must agree.
        if self.cert.tbs_certificate.signature != *alg {
            return Err(CertError::SignatureAlgorithm {
                role: self.role,
                found: "a TBS signature algorithm that differs from the outer one".into(),
            });
        }
        if self.cert.tbs_certificate.issuer != issuer.cert.tbs_certificate.subject {
            return Err(CertError::IssuerName {
                role: self.role,
                issuer_role: issuer.role,
                expected: issuer.subject_string(),
                found: self.cert.tbs_certificate.issuer.to_string(),
            });
        }
        let key = UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA384, issuer.rsa_public_key()?);
        let sig =
            self.cert.signature.as_bytes().ok_or(CertError::Signature { role: self.role, issuer_role: issuer.role })?;
        key.verify(self.tbs(), sig).map_err(|_| CertError::Signature { role: self.role, issuer_role: issuer.role })
    }

    fn extension(&self, id: &ObjectIdentifier) -> Option<&[u8]> {
        self.cert
            .tbs_certificate
            .extensions
            .as_ref()?
            .iter()
            .find(|e| e.extn_id == *id)
            .map(|e| e.extn_value.as_bytes())
    }

    /// Reads the endorsement-key extensions of a VCEK or VLEK.
    pub fn endorsement_extensions(&self, product: Product) -> Result<KeyExtensions, CertError> {
        let role = self.role;
        let missing = |id: ObjectIdentifier, name: &'static str| CertError::Extension {
            role,
            oid: id.to_string(),
            name,
            problem: "missing".into(),
        };
        let bad = |id: ObjectIdentifier, name: &'static str, problem: String| CertError::Extension {
            role,
            oid: id.to_string(),
            name,
            problem,
        };
        let spl = |id: ObjectIdentifier, name: &'static str| -> Result<u8, CertError> {
            let raw = self.extension(&id).ok_or_else(|| missing(id, name))?;
            decode_spl(raw).ok_or_else(|| bad(id, name, format!("not a DER INTEGER 0..=255 ({})", hex::encode(raw))))
        };
        let product_name =
            self.extension(&oid::PRODUCT_NAME).ok_or_else(|| missing(oid::PRODUCT_NAME, "productName"))?;
        let product_name = der::asn1::Ia5StringRef::from_der(product_name)
            .map(|s| s.as_str().to_owned())
            .map_err(|e| bad(oid::PRODUCT_NAME, "productName", e.to_string()))?;
        let fmc = match product {
            Product::Turin => Some(spl(oid::FMC_SPL, "fmcSPL")?),
            Product::Milan | Product::Genoa => None,
        };
        let tcb = TcbVersion::new(
            fmc,
            spl(oid::BL_SPL, "blSPL")?,
            spl(oid::TEE_SPL, "teeSPL")?,
            spl(oid::SNP_SPL, "snpSPL")?,
            spl(oid::UCODE_SPL, "ucodeSPL")?,
        );
        let hw_id = match self.extension(&oid::HW_ID) {
            None => None,
            Some(raw) => Some(decode_hw_id(raw).ok_or_else(|| {
                bad(oid::HW_ID, "hwID", format!("{} bytes, expected 8 or 64 (raw or as a DER OCTET STRING)", raw.len()))
            })?),
        };
        let csp_id = self
            .extension(&oid::CSP_ID)
            .map(|raw| der::asn1::Ia5StringRef::from_der(raw).map(|s| s.as_str().to_owned()))
            .transpose()
            .map_err(|e| bad(oid::CSP_ID, "cspID", e.to_string()))?;
        Ok(KeyExtensions { product_name, tcb, hw_id, csp_id })
    }
}

/// What a VCEK or VLEK certifies about the key it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyExtensions {
    /// productName, e.g. "Milan-B0" (VCEK) or "Milan" (VLEK).
    pub product_name: String,
    /// The TCB the key was derived for.
    pub tcb: TcbVersion,
    /// hwID: the chip ID (VCEK only; 64 bytes, 8 on Turin).
    pub hw_id: Option<Vec<u8>>,
    /// cspID: the cloud provider a VLEK was issued to.
    pub csp_id: Option<String>,
}

/// SPL extensions are DER INTEGERs of one byte's range.
fn decode_spl(raw: &[u8]) -> Option<u8> {
    let int = der::asn1::UintRef::from_der(raw).ok()?;
    match int.as_bytes() {
        [] => Some(0),
        [b] => Some(*b),
        _ => None,
    }
}

/// AMD's older VCEKs put the 64 raw hwID bytes in the extension; newer ones
/// (and Turin's 8-byte IDs) wrap them in a DER OCTET STRING. Accept both.
fn decode_hw_id(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.len() == 64 {
        return Some(raw.to_vec());
    }
    let inner = der::asn1::OctetStringRef::from_der(raw).ok()?;
    matches!(inner.as_bytes().len(), 8 | 64).then(|| inner.as_bytes().to_vec())
}

fn name_attr(name: &Name, id: &ObjectIdentifier) -> Option<String> {
    name.0.iter().flat_map(|rdn| rdn.0.iter()).find(|atv| atv.oid == *id).and_then(|atv| match atv.value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::TeletexString => {
            std::str::from_utf8(atv.value.value()).ok().map(str::to_owned)
        }
        _ => None,
    })
}

fn to_datetime(since_epoch: std::time::Duration) -> OffsetDateTime {
    i64::try_from(since_epoch.as_secs())
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Extracts the DER of every CERTIFICATE block of a PEM document.
pub fn parse_pem_certs(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine as _;
    let text = std::str::from_utf8(pem).map_err(|_| "PEM input is not UTF-8 text".to_string())?;
    let mut certs = Vec::new();
    let mut body: Option<String> = None;
    for line in text.lines().map(str::trim) {
        match (line, body.as_mut()) {
            ("-----BEGIN CERTIFICATE-----", None) => body = Some(String::new()),
            ("-----END CERTIFICATE-----", Some(b)) => {
                let der = base64::engine::general_purpose::STANDARD
                    .decode(b.as_bytes())
                    .map_err(|e| format!("PEM certificate body is not base64: {e}"))?;
                certs.push(der);
                body = None;
            }
            (l, Some(b)) if !l.starts_with("-----") => b.push_str(l),
            (l, Some(_)) => return Err(format!("unexpected \"{l}\" inside a PEM certificate")),
            _ => {}
        }
    }
    if body.is_some() {
        return Err("PEM certificate is not terminated by -----END CERTIFICATE-----".into());
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VCEK: &[u8] = include_bytes!("../../../../../shared/testdata/evidence/snp/milan-v2-vcek.der");
    const VLEK: &[u8] = include_bytes!("../../../../../shared/testdata/evidence/snp/vlek.der");
    const INVALID_NEW: &[u8] = include_bytes!("../../../../../shared/testdata/evidence/snp/vcek-invalid-new.der");

    #[test]
    fn reads_vcek_extensions() {
        let vcek = AmdCert::from_der("VCEK", VCEK).unwrap();
        let ext = vcek.endorsement_extensions(Product::Milan).unwrap();
        assert_eq!(ext.product_name, "Milan-B0");
        assert_eq!((ext.tcb.bootloader, ext.tcb.tee, ext.tcb.snp, ext.tcb.microcode), (3, 0, 8, 0x73));
        assert_eq!(ext.hw_id.as_ref().map(Vec::len), Some(64));
        assert_eq!(vcek.common_name().as_deref(), Some("SEV-VCEK"));
        vcek.p384_public_key().unwrap();
    }

    #[test]
    fn reads_vlek_extensions() {
        let vlek = AmdCert::from_der("VLEK", VLEK).unwrap();
        let ext = vlek.endorsement_extensions(Product::Milan).unwrap();
        assert_eq!(ext.product_name, "Milan");
        assert_eq!(ext.hw_id, None);
        assert_eq!(ext.csp_id.as_deref(), Some("CN=cc-us-east-2.amazonaws.com"));
    }

    #[test]
    fn wrapped_hw_id_is_understood() {
        let cert = AmdCert::from_der("VCEK", INVALID_NEW).unwrap();
        let ext = cert.endorsement_extensions(Product::Milan).unwrap();
        assert_eq!(ext.hw_id, Some((0u8..64).collect()));
    }

    #[test]
    fn spl_decoding_is_strict() {
        assert_eq!(decode_spl(&[2, 1, 5]), Some(5));
        assert_eq!(decode_spl(&[2, 2, 0, 0xA9]), Some(0xA9));
        assert_eq!(decode_spl(&[2, 2, 1, 0]), None);
        assert_eq!(decode_spl(&[4, 1, 5]), None);
        assert_eq!(decode_spl(&[]), None);
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(AmdCert::from_der("VCEK", b"nope"), Err(CertError::Malformed { .. })));
        assert!(matches!(AmdCert::from_pem("VCEK", b"nope"), Err(CertError::Malformed { .. })));
    }
}
