//! The server's configuration file (TOML) and the validated settings made
//! from it. The file names reference values per attestation policy, the
//! external token issuers a release may trust, and the admins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::token::Jwks;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not valid TOML of this schema.
    #[error("config {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        reason: String,
    },
    /// A value is not acceptable.
    #[error("config: {field}: {reason}")]
    Invalid {
        /// Which setting.
        field: String,
        /// What is wrong and what to do.
        reason: String,
    },
}

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The issuer URL tokens carry in `iss` (default: `http://` + the
    /// listen address).
    pub issuer: Option<String>,
    /// Token lifetime in seconds (default 300).
    pub token_lifetime_secs: Option<i64>,
    /// A directory of VCEK/VLEK certificates (`<chip id hex>.pem` or
    /// `.der`, optionally with the chain), for evidence sent without them.
    pub certificate_cache: Option<PathBuf>,
    /// DCAP collateral JSON for TDX and SGX quotes sent without it.
    pub dcap_collateral: Option<PathBuf>,
    /// Named attestation policies; `default` applies when a request names
    /// none (and allows any measurement, refusing debug guests).
    #[serde(default)]
    pub attestation_policy: BTreeMap<String, AttestationPolicyFile>,
    /// External issuers whose tokens releases may accept.
    #[serde(default)]
    pub external_issuer: Vec<ExternalIssuerFile>,
    /// Admins of the key API.
    #[serde(default)]
    pub admin: Vec<AdminFile>,
}

/// Reference values for one attestation policy.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationPolicyFile {
    /// Allowed launch measurements (hex); any when empty.
    #[serde(default)]
    pub launch_measurements: Vec<String>,
    /// Allowed HOST_DATA / MRCONFIGID values (hex); any when empty.
    #[serde(default)]
    pub host_data: Vec<String>,
    /// Minimum SEV-SNP TCB: bootloader, tee, snp, microcode.
    pub min_tcb: Option<MinTcb>,
    /// Accept guests whose policy allows debugging (default false).
    #[serde(default)]
    pub allow_debug: bool,
    /// Require a server-issued nonce (`GET /nonce`), bound into REPORT_DATA.
    #[serde(default)]
    pub require_nonce: bool,
}

/// The minimum SEV-SNP TCB.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinTcb {
    /// Boot loader SPL.
    pub bootloader: u8,
    /// PSP OS SPL.
    pub tee: u8,
    /// SNP firmware SPL.
    pub snp: u8,
    /// Microcode SPL.
    pub microcode: u8,
}

/// An issuer outside this server whose tokens a release may accept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuerFile {
    /// Its `iss`.
    pub issuer: String,
    /// A file holding its JWKS (pinned; never fetched).
    pub jwks_file: PathBuf,
}

/// One admin credential.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    /// Who, as the audit log names them.
    pub name: String,
    /// SHA-256 (hex) of the bearer token; the token itself is never stored.
    pub token_sha256: String,
    /// `admin` (everything), `keys-write`, `keys-read`, `audit-read`.
    pub roles: Vec<String>,
}

/// A validated attestation policy.
#[derive(Debug, Clone, Default)]
pub struct AttestationPolicy {
    /// Its name.
    pub name: String,
    /// Allowed MEASUREMENT values.
    pub launch_measurements: Vec<[u8; 48]>,
    /// Allowed HOST_DATA values.
    pub host_data: Vec<[u8; 32]>,
    /// The minimum TCB.
    pub min_tcb: Option<MinTcb>,
    /// Whether debug guests are accepted.
    pub allow_debug: bool,
    /// Whether a server nonce is required.
    pub require_nonce: bool,
}

/// A role an admin holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Everything.
    Admin,
    /// Create, import, rotate, disable, delete keys and change policies.
    KeysWrite,
    /// List and read key metadata (never material).
    KeysRead,
    /// Read the audit log.
    AuditRead,
}

impl Role {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "admin" => Self::Admin,
            "keys-write" => Self::KeysWrite,
            "keys-read" => Self::KeysRead,
            "audit-read" => Self::AuditRead,
            _ => return None,
        })
    }
}

/// A validated admin.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Who.
    pub name: String,
    /// SHA-256 of the token.
    pub token_sha256: [u8; 32],
    /// What they may do.
    pub roles: Vec<Role>,
}

/// An external issuer with its keys loaded.
#[derive(Debug, Clone)]
pub struct ExternalIssuer {
    /// Its `iss`.
    pub issuer: String,
    /// Its keys, read once when the configuration is loaded.
    pub jwks: Jwks,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// See [`ConfigFile::issuer`]; resolved by the server when absent.
    pub issuer: Option<String>,
    /// Token lifetime.
    pub token_lifetime_secs: i64,
    /// See [`ConfigFile::certificate_cache`].
    pub certificate_cache: Option<PathBuf>,
    /// The collateral's bytes.
    pub dcap_collateral: Option<Vec<u8>>,
    /// By name; always has `default`.
    pub attestation_policies: BTreeMap<String, AttestationPolicy>,
    /// External issuers.
    pub external_issuers: Vec<ExternalIssuer>,
    /// Admins from the file (the server adds its bootstrap admin).
    pub admins: Vec<Admin>,
}

impl Default for Config {
    fn default() -> Self {
        let mut attestation_policies = BTreeMap::new();
        attestation_policies
            .insert("default".to_owned(), AttestationPolicy { name: "default".into(), ..Default::default() });
        Self {
            issuer: None,
            token_lifetime_secs: 300,
            certificate_cache: None,
            dcap_collateral: None,
            attestation_policies,
            external_issuers: Vec::new(),
            admins: Vec::new(),
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), reason: reason.into() }
}

fn hex_array<const N: usize>(field: &str, text: &str) -> Result<[u8; N], ConfigError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(text.trim(), &mut out)
        .map_err(|_| invalid(field, format!("must be {} hex digits ({N} bytes)", 2 * N)))?;
    Ok(out)
}

impl Config {
    /// Reads and validates a configuration file; relative paths in it are
    /// relative to the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let file: ConfigFile =
            toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.to_owned(), reason: e.to_string() })?;
        Self::from_file(file, path.parent().unwrap_or(Path::new(".")))
    }

    /// Validates a parsed file.
    pub fn from_file(file: ConfigFile, base: &Path) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(issuer) = file.issuer {
            if !(issuer.starts_with("https://") || issuer.starts_with("http://")) || issuer.ends_with('/') {
                return Err(invalid("issuer", "must be an http(s) URL without a trailing slash"));
            }
            config.issuer = Some(issuer);
        }
        if let Some(lifetime) = file.token_lifetime_secs {
            if !(10..=86_400).contains(&lifetime) {
                return Err(invalid("token_lifetime_secs", "must be between 10 and 86400"));
            }
            config.token_lifetime_secs = lifetime;
        }
        config.certificate_cache = file.certificate_cache.map(|p| base.join(p));
        if let Some(p) = file.dcap_collateral {
            let p = base.join(p);
            config.dcap_collateral = Some(std::fs::read(&p).map_err(|source| ConfigError::Read { path: p, source })?);
        }
        for (name, p) in file.attestation_policy {
            let field = |f: &str| format!("attestation_policy.{name}.{f}");
            let policy = AttestationPolicy {
                name: name.clone(),
                launch_measurements: p
                    .launch_measurements
                    .iter()
                    .map(|m| hex_array::<48>(&field("launch_measurements"), m))
                    .collect::<Result<_, _>>()?,
                host_data: p
                    .host_data
                    .iter()
                    .map(|h| hex_array::<32>(&field("host_data"), h))
                    .collect::<Result<_, _>>()?,
                min_tcb: p.min_tcb,
                allow_debug: p.allow_debug,
                require_nonce: p.require_nonce,
            };
            config.attestation_policies.insert(name, policy);
        }
        for (i, e) in file.external_issuer.into_iter().enumerate() {
            let path = base.join(&e.jwks_file);
            let bytes = std::fs::read(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
            let jwks: Jwks = serde_json::from_slice(&bytes).map_err(|err| {
                invalid(
                    format!("external_issuer[{i}].jwks_file"),
                    format!("must hold a JWKS ({{\"keys\": [...]}}): {err}"),
                )
            })?;
            if jwks.keys.is_empty() {
                return Err(invalid(format!("external_issuer[{i}].jwks_file"), "the JWKS has no keys"));
            }
            config.external_issuers.push(ExternalIssuer { issuer: e.issuer, jwks });
        }
        for (i, a) in file.admin.into_iter().enumerate() {
            let roles = a
                .roles
                .iter()
                .map(|r| {
                    Role::parse(r).ok_or_else(|| {
                        invalid(
                            format!("admin[{i}].roles"),
                            format!("unknown role {r:?} (expected admin, keys-write, keys-read, audit-read)"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            config.admins.push(Admin {
                name: a.name,
                token_sha256: hex_array::<32>(&format!("admin[{i}].token_sha256"), &a.token_sha256)?,
                roles,
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_validates_and_mistakes_are_named() {
        let file: ConfigFile = toml::from_str(
            r#"
            issuer = "https://trust.example"
            [attestation_policy.prod]
            launch_measurements = ["00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000a"]
            require_nonce = true
            min_tcb = { bootloader = 3, tee = 0, snp = 8, microcode = 115 }
            [[admin]]
            name = "ops"
            token_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
            roles = ["admin"]
            "#,
        )
        .unwrap();
        let c = Config::from_file(file, Path::new(".")).unwrap();
        assert!(c.attestation_policies["prod"].require_nonce);
        assert!(c.attestation_policies.contains_key("default"));
        let bad: ConfigFile = toml::from_str("[attestation_policy.x]\nlaunch_measurements = [\"ab\"]").unwrap();
        let err = Config::from_file(bad, Path::new(".")).unwrap_err().to_string();
        assert!(err.contains("attestation_policy.x.launch_measurements") && err.contains("96 hex digits"), "{err}");
        assert!(toml::from_str::<ConfigFile>("colour = 1").is_err());
    }
}
