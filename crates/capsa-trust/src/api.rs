//! The JSON shapes of the service's API that its server and its client
//! share: evidence kinds, key metadata and release answers. Always built,
//! so that a client compiled without the `server` feature reads the same
//! types the server writes.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The evidence kinds, named as the Azure attestation API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvidenceKind {
    /// An SEV-SNP report (or the sim platform's).
    SevSnpVm,
    /// A TDX quote.
    TdxVm,
    /// An SGX quote.
    SgxEnclave,
    /// Azure confidential VM evidence (HCL report and vTPM quote).
    AzSnpVtpm,
}

impl EvidenceKind {
    /// From the URL path segment.
    pub fn from_path(segment: &str) -> Option<Self> {
        Some(match segment {
            "SevSnpVm" => Self::SevSnpVm,
            "TdxVm" => Self::TdxVm,
            "SgxEnclave" => Self::SgxEnclave,
            "AzSnpVtpm" => Self::AzSnpVtpm,
            _ => return None,
        })
    }

    /// The path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SevSnpVm => "SevSnpVm",
            Self::TdxVm => "TdxVm",
            Self::SgxEnclave => "SgxEnclave",
            Self::AzSnpVtpm => "AzSnpVtpm",
        }
    }
}

/// What kind of material a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kty")]
pub enum KeyKind {
    /// An AES key of 128, 192 or 256 bits.
    #[serde(rename = "oct")]
    Oct {
        /// Bits.
        bits: u16,
    },
    /// An RSA key pair.
    #[serde(rename = "RSA")]
    Rsa {
        /// Modulus bits: 2048, 3072 or 4096.
        bits: u16,
    },
    /// An EC key pair.
    #[serde(rename = "EC")]
    Ec {
        /// `P-256` or `P-384`.
        crv: Curve,
    },
    /// Opaque bytes (a password, a connection string, a certificate).
    #[serde(rename = "secret")]
    Secret,
}

/// EC curves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Curve {
    /// NIST P-256.
    #[serde(rename = "P-256")]
    P256,
    /// NIST P-384.
    #[serde(rename = "P-384")]
    P384,
}

/// What the admin API shows of a key: never its material.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyInfo {
    /// Name.
    pub name: String,
    /// Kind.
    #[serde(flatten)]
    pub kind: KeyKind,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds.
    pub updated: i64,
    /// Whether it can be released.
    pub enabled: bool,
    /// Whether its policy is fixed.
    pub immutable: bool,
    /// The release policy, canonical.
    pub release_policy: Value,
    /// Versions, oldest first; the last is current.
    pub versions: Vec<VersionInfo>,
}

/// A key version's metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VersionInfo {
    /// 32 hex digits.
    pub id: String,
    /// Unix seconds.
    pub created: i64,
    /// Whether it can be released.
    pub enabled: bool,
    /// The public key of RSA and EC versions, as a JWK.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_jwk: Option<Value>,
}

/// A release answer, as Azure Key Vault returns it: `{"value": <JWS>}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// A compact JWS signed by the server; its payload holds the wrapped key.
    pub value: String,
}
