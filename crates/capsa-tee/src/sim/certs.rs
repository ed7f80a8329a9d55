//! The sim root of trust: ARK → ASK → VCEK certificates in the profile of
//! AMD's Key Distribution Service (KDS).
//!
//! Every encoding choice here copies what AMD's KDS emits for Genoa (checked
//! with `openssl asn1parse` against AMD's published `cert_chain` and real
//! VCEKs), including AMD's quirks, so that the SNP verifier takes exactly the
//! same path for sim evidence as for hardware evidence. Where strict DER or
//! RFC 5280 would encode something differently, the comment says so.

use std::time::{Duration, SystemTime};

use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PSS_SHA384};
use der::asn1::{BitString, GeneralizedTime, OctetString, SetOfVec, UtcTime};
use der::oid::ObjectIdentifier;
use der::{Any, DateTime, Decode, Encode, Tag};
use x509_cert::attr::AttributeTypeAndValue;
use x509_cert::certificate::{Certificate, TbsCertificate, Version};
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::{AuthorityKeyIdentifier, SubjectKeyIdentifier};
use x509_cert::name::{Name, RdnSequence, RelativeDistinguishedName};
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};
use x509_cert::time::{Time, Validity};

use super::{SIM_ORGANIZATION, SecretBytes, SimError, Tcb};

/// The processor line the sim imitates, as the VCEK's productName and the
/// CN suffix of ARK and ASK.
pub(crate) const PRODUCT_LINE: &str = "Genoa";
/// productName extension value: product line and stepping, as AMD writes it.
/// B1 matches CPUID stepping 1 in the reports.
const PRODUCT_NAME: &str = "Genoa-B1";

/// Lifetime of ARK and ASK, as AMD's (e.g. ARK-Genoa: 2022-01-26 to 2047-01-26).
const CA_YEARS: u16 = 25;
/// Lifetime of a VCEK, as AMD's KDS issues them.
const VCEK_YEARS: u16 = 7;
/// Backdating of notBefore, so that a verifier whose clock is a little behind
/// the machine that ran `capsa sim init` still accepts the chain.
const BACKDATE: Duration = Duration::from_secs(24 * 60 * 60);

const OID_RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");

/// RSASSA-PSS-params byte for byte as in AMD's certificates: hash SHA-384,
/// MGF1 with SHA-384, salt length 48, trailerField 1. trailerField 1 is the
/// ASN.1 DEFAULT, which strict DER would omit; AMD writes it out, so a
/// verifier that compares these parameters against AMD's bytes (rather than
/// parsing them) accepts the sim's too.
pub(crate) const PSS_SHA384_PARAMS: [u8; 59] = [
    0x30, 0x39, 0xa0, 0x0f, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00,
    0xa1, 0x1c, 0x30, 0x1a, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x08, 0x30, 0x0d, 0x06, 0x09,
    0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0xa2, 0x03, 0x02, 0x01, 0x30, 0xa3, 0x03, 0x02,
    0x01, 0x01,
];

// Name attribute types, in the order AMD's names list them.
const OID_OU: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.11");
const OID_C: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.6");
const OID_L: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.7");
const OID_ST: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.8");
const OID_O: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.10");
const OID_CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

const OID_SKI: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
const OID_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.15");
const OID_BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const OID_AKI: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.35");

// AMD's VCEK extensions (AMD publication 57230, "VCEK Certificate and KDS
// Interface Specification").
const OID_STRUCT_VERSION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.1");
const OID_PRODUCT_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.2");
const OID_BL_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.1");
const OID_TEE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.2");
const OID_SNP_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.3");
const OID_SPL_4: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.4");
const OID_SPL_5: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.5");
const OID_SPL_6: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.6");
const OID_SPL_7: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.7");
const OID_UCODE_SPL: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.3.8");
const OID_HW_ID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1.4");

/// structVersion of Milan and Genoa VCEKs (64-byte hwID, SPLs 1-8). Version
/// 1 is Turin's layout (8-byte hwID, an FMC SPL), which a Genoa VCEK must not
/// claim: verifiers such as go-sev-guest pick the hwID length by it.
const VCEK_STRUCT_VERSION: u8 = 0;

// keyUsage and basicConstraints values copied from AMD's ARK-Genoa and
// SEV-Genoa. The ASK's keyUsage (keyCertSign only) is `03 02 01 04`: one
// unused bit declared where DER's named-bit rule would declare two. It is
// kept as AMD has it so that the verifier meets the same bytes as on
// hardware.
const ARK_KEY_USAGE: [u8; 4] = [0x03, 0x02, 0x01, 0x06];
const ASK_KEY_USAGE: [u8; 4] = [0x03, 0x02, 0x01, 0x04];
const ARK_BASIC_CONSTRAINTS: [u8; 5] = [0x30, 0x03, 0x01, 0x01, 0xff];
const ASK_BASIC_CONSTRAINTS: [u8; 8] = [0x30, 0x06, 0x01, 0x01, 0xff, 0x02, 0x01, 0x00];

/// A freshly generated sim root of trust: DER certificates and PKCS#8 keys.
#[derive(Clone)]
pub(crate) struct RootOfTrust {
    pub(crate) ark_der: Vec<u8>,
    pub(crate) ask_der: Vec<u8>,
    pub(crate) vcek_der: Vec<u8>,
    pub(crate) ark_key: SecretBytes,
    pub(crate) ask_key: SecretBytes,
    pub(crate) vcek_key: SecretBytes,
}

/// Generates ARK, ASK and a VCEK for `chip_id` at `tcb`, valid from a day
/// before `now`.
pub(crate) fn generate(now: SystemTime, chip_id: &[u8; 64], tcb: Tcb) -> Result<RootOfTrust, SimError> {
    let ark_key = RsaKeyPair::generate(KeySize::Rsa4096).map_err(|_| SimError::Crypto("generating the ARK key"))?;
    let ask_key = RsaKeyPair::generate(KeySize::Rsa4096).map_err(|_| SimError::Crypto("generating the ASK key"))?;
    let vcek_key = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
        .map_err(|_| SimError::Crypto("generating the VCEK key"))?;

    let ark_name = amd_name(&format!("ARK-{PRODUCT_LINE}"))?;
    let ask_name = amd_name(&format!("SEV-{PRODUCT_LINE}"))?;
    let ark_ski = rsa_key_id(&ark_key);
    let ask_ski = rsa_key_id(&ask_key);

    let ark = TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: rsa_pss_sha384()?,
        issuer: ark_name.clone(),
        validity: validity(now, CA_YEARS)?,
        subject: ark_name.clone(),
        subject_public_key_info: rsa_spki(&ark_key)?,
        issuer_unique_id: None,
        subject_unique_id: None,
        // AMD's ARK order: keyUsage, SKI, basicConstraints (then a CRL
        // distribution point, left out: there is no sim CRL to point to).
        extensions: Some(vec![
            extension(OID_KEY_USAGE, true, ARK_KEY_USAGE.to_vec())?,
            extension(OID_SKI, false, SubjectKeyIdentifier(OctetString::new(ark_ski.clone())?).to_der()?)?,
            extension(OID_BASIC_CONSTRAINTS, true, ARK_BASIC_CONSTRAINTS.to_vec())?,
        ]),
    };
    let ark_der = sign(ark, &ark_key)?;

    let ask = TbsCertificate {
        version: Version::V3,
        serial_number: random_serial()?,
        signature: rsa_pss_sha384()?,
        issuer: ark_name,
        validity: validity(now, CA_YEARS)?,
        subject: ask_name.clone(),
        subject_public_key_info: rsa_spki(&ask_key)?,
        issuer_unique_id: None,
        subject_unique_id: None,
        // AMD's ASK order: SKI, AKI, basicConstraints (pathlen 0), keyUsage
        // (then the CRL distribution point, left out as for the ARK).
        extensions: Some(vec![
            extension(OID_SKI, false, SubjectKeyIdentifier(OctetString::new(ask_ski)?).to_der()?)?,
            extension(
                OID_AKI,
                false,
                AuthorityKeyIdentifier {
                    key_identifier: Some(OctetString::new(ark_ski)?),
                    authority_cert_issuer: None,
                    authority_cert_serial_number: None,
                }
                .to_der()?,
            )?,
            extension(OID_BASIC_CONSTRAINTS, true, ASK_BASIC_CONSTRAINTS.to_vec())?,
            extension(OID_KEY_USAGE, true, ASK_KEY_USAGE.to_vec())?,
        ]),
    };
    let ask_der = sign(ask, &ark_key)?;

    let vcek_spki_der = vcek_key.public_key().as_der().map_err(|_| SimError::Crypto("encoding the VCEK public key"))?;
    let vcek = TbsCertificate {
        version: Version::V3,
        // AMD issues every VCEK with serial number 0.
        serial_number: SerialNumber::new(&[0])?,
        signature: rsa_pss_sha384()?,
        issuer: ask_name,
        validity: validity(now, VCEK_YEARS)?,
        subject: amd_name("SEV-VCEK")?,
        subject_public_key_info: SubjectPublicKeyInfoOwned::from_der(vcek_spki_der.as_ref())?,
        issuer_unique_id: None,
        subject_unique_id: None,
        extensions: Some(vcek_extensions(chip_id, tcb)?),
    };
    let vcek_der = sign(vcek, &ask_key)?;

    Ok(RootOfTrust {
        ark_der,
        ask_der,
        vcek_der,
        ark_key: rsa_pkcs8(&ark_key, "encoding the ARK key")?,
        ask_key: rsa_pkcs8(&ask_key, "encoding the ASK key")?,
        vcek_key: SecretBytes::new(
            vcek_key.to_pkcs8v1().map_err(|_| SimError::Crypto("encoding the VCEK key"))?.as_ref().to_vec(),
        ),
    })
}

/// AMD's VCEK extensions for `chip_id` at `tcb`, in the order and encoding of
/// AMD's KDS: none critical; each extnValue the DER of the value (INTEGER,
/// IA5String, OCTET STRING), SPL INTEGERs minimal (a value of 128 or more gets
/// a leading zero byte, as AMD's `02 02 00 a9`).
///
/// hwID uses the encoding KDS has issued since mid-2023: extnValue holds a
/// DER OCTET STRING (`04 40` + 64 bytes). Older VCEKs put the 64 raw bytes
/// directly in extnValue; verifiers must accept both.
pub(crate) fn vcek_extensions(chip_id: &[u8; 64], tcb: Tcb) -> Result<Vec<Extension>, SimError> {
    let int = |oid, value: u8| -> Result<Extension, SimError> { extension(oid, false, value.to_der()?) };
    Ok(vec![
        int(OID_STRUCT_VERSION, VCEK_STRUCT_VERSION)?,
        extension(OID_PRODUCT_NAME, false, Any::new(Tag::Ia5String, PRODUCT_NAME.as_bytes())?.to_der()?)?,
        // AMD lists snpSPL after the reserved SPLs 4-7; kept in that order.
        int(OID_BL_SPL, tcb.bootloader)?,
        int(OID_TEE_SPL, tcb.tee)?,
        int(OID_SPL_4, 0)?,
        int(OID_SPL_5, 0)?,
        int(OID_SPL_6, 0)?,
        int(OID_SPL_7, 0)?,
        int(OID_SNP_SPL, tcb.snp)?,
        int(OID_UCODE_SPL, tcb.microcode)?,
        extension(OID_HW_ID, false, OctetString::new(chip_id.to_vec())?.to_der()?)?,
    ])
}

/// `OU=Engineering, C=US, L=Santa Clara, ST=CA, O=<sim>, CN=<cn>`: AMD's
/// attribute order and string types (PrintableString for C, UTF8String for
/// the rest), one attribute per RDN. Only O differs from AMD's, which is how
/// the verifier tells a sim root from AMD's.
fn amd_name(cn: &str) -> Result<Name, SimError> {
    let attributes = [
        (OID_OU, Tag::Utf8String, "Engineering"),
        (OID_C, Tag::PrintableString, "US"),
        (OID_L, Tag::Utf8String, "Santa Clara"),
        (OID_ST, Tag::Utf8String, "CA"),
        (OID_O, Tag::Utf8String, SIM_ORGANIZATION),
        (OID_CN, Tag::Utf8String, cn),
    ];
    let mut rdns = Vec::with_capacity(attributes.len());
    for (oid, tag, value) in attributes {
        let mut rdn = SetOfVec::new();
        rdn.insert(AttributeTypeAndValue { oid, value: Any::new(tag, value.as_bytes())? })?;
        rdns.push(RelativeDistinguishedName(rdn));
    }
    Ok(RdnSequence(rdns))
}

fn rsa_pss_sha384() -> Result<AlgorithmIdentifierOwned, SimError> {
    Ok(AlgorithmIdentifierOwned { oid: OID_RSASSA_PSS, parameters: Some(Any::from_der(&PSS_SHA384_PARAMS)?) })
}

fn extension(oid: ObjectIdentifier, critical: bool, value: Vec<u8>) -> Result<Extension, SimError> {
    Ok(Extension { extn_id: oid, critical, extn_value: OctetString::new(value)? })
}

/// Signs `tbs` with RSASSA-PSS/SHA-384, salt 48 (aws-lc's `RSA_PSS_SHA384`
/// uses the digest length, matching [`PSS_SHA384_PARAMS`]).
fn sign(tbs: TbsCertificate, key: &RsaKeyPair) -> Result<Vec<u8>, SimError> {
    let tbs_der = tbs.to_der()?;
    let mut signature = vec![0u8; key.public_modulus_len()];
    key.sign(&RSA_PSS_SHA384, &SystemRandom::new(), &tbs_der, &mut signature)
        .map_err(|_| SimError::Crypto("signing a certificate"))?;
    let certificate = Certificate {
        signature_algorithm: tbs.signature.clone(),
        tbs_certificate: tbs,
        signature: BitString::from_bytes(&signature)?,
    };
    Ok(certificate.to_der()?)
}

fn rsa_spki(key: &RsaKeyPair) -> Result<SubjectPublicKeyInfoOwned, SimError> {
    let der = key.public_key().as_der().map_err(|_| SimError::Crypto("encoding an RSA public key"))?;
    Ok(SubjectPublicKeyInfoOwned::from_der(der.as_ref())?)
}

/// Key identifier as AMD computes it (RFC 5280 method 1): SHA-1 of the
/// subjectPublicKey bits, i.e. of the RSAPublicKey DER.
fn rsa_key_id(key: &RsaKeyPair) -> Vec<u8> {
    digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, key.public_key().as_ref()).as_ref().to_vec()
}

fn rsa_pkcs8(key: &RsaKeyPair, what: &'static str) -> Result<SecretBytes, SimError> {
    let der: aws_lc_rs::encoding::Pkcs8V1Der<'static> = key.as_der().map_err(|_| SimError::Crypto(what))?;
    Ok(SecretBytes::new(der.as_ref().to_vec()))
}

/// A positive 64-bit random serial: each `capsa sim init` makes a new root
/// under the same name, so serials keep certificates from different sim
/// installations apart in caches and logs.
fn random_serial() -> Result<SerialNumber, SimError> {
    let mut bytes = [0u8; 8];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| SimError::Crypto("drawing a serial number"))?;
    if let Some(first) = bytes.first_mut() {
        *first = (*first & 0x7f) | 0x40;
    }
    Ok(SerialNumber::new(&bytes)?)
}

fn validity(now: SystemTime, years: u16) -> Result<Validity, SimError> {
    let to_date = |t: SystemTime| -> Result<DateTime, SimError> {
        let since_epoch = t.duration_since(SystemTime::UNIX_EPOCH).map_err(|_| SimError::Clock)?;
        Ok(DateTime::from_unix_duration(Duration::from_secs(since_epoch.as_secs()))?)
    };
    let start = to_date(now.checked_sub(BACKDATE).ok_or(SimError::Clock)?)?;
    let created = to_date(now)?;
    // Same calendar date `years` later, as AMD's certificates run; 29
    // February becomes 28 February in a non-leap year.
    let end_year = created.year().checked_add(years).ok_or(SimError::Clock)?;
    let end =
        DateTime::new(end_year, created.month(), created.day(), created.hour(), created.minutes(), created.seconds())
            .or_else(|_| {
            DateTime::new(end_year, created.month(), 28, created.hour(), created.minutes(), created.seconds())
        })?;
    Ok(Validity { not_before: x509_time(start)?, not_after: x509_time(end)? })
}

/// RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 on.
/// ARK and ASK created after 2024 expire after 2049, so their notAfter is a
/// GeneralizedTime where AMD's (created 2022) is a UTCTime.
fn x509_time(date: DateTime) -> Result<Time, SimError> {
    if date.year() < 2050 {
        Ok(Time::UtcTime(UtcTime::from_date_time(date)?))
    } else {
        Ok(Time::GeneralTime(GeneralizedTime::from_date_time(date)))
    }
}
