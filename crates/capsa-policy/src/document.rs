//! The policy document and the initdata that carries it into the sandbox.
//!
//! A policy document is one Rego file: the fixed rules of this capsa
//! version followed by `policy_data := <JSON>`. Rendering is deterministic
//! (fields in declaration order, maps sorted, no timestamps), so the same
//! inputs give the same bytes and the same digest on every machine.
//!
//! The document travels in Confidential Containers' initdata, a TOML file
//! `{version, algorithm, data}` whose `data."policy.rego"` holds it. The
//! SHA-256 of the initdata bytes is what the host must place in HOST_DATA
//! (SEV-SNP; MRCONFIGID on TDX, zero-extended to 48 bytes): the agent
//! refuses any initdata whose digest differs from what the hardware reports.
//!
//! Beside the policy, initdata may carry the sandbox's settings
//! ([`SandboxSettings`]) as TOML in `data."capsa.toml"`:
//!
//! ```toml
//! workload_api_port = 8080                 # default 8080
//! [[trust]]                                # trust-service endpoints the sandbox may reach
//! url = "https://trust.example:8443"       # http or https, a host, a port or the scheme's
//! ca = "-----BEGIN CERTIFICATE-----\n..."  # optional PEM the guest trusts for this endpoint's TLS
//! [[encfs]]                                # encrypted filesystems the agent mounts (capsa-encfs)
//! name = "data"                            # mounted at /run/capsa/encfs/data
//! url = "http://127.0.0.1:10000/devstoreaccount1/images/data"  # the image's prefix
//! key = "data-key"                         # its key in the first trust service's key broker
//! read_only = true                         # default false
//! ```
//!
//! The settings are inside the digested bytes, so they are measured exactly
//! as the policy is: a host that changes the workload API's port, adds a
//! trust endpoint or swaps a CA changes HOST_DATA, and the relying party's
//! check of the evidence fails. The entry is left out when the settings are
//! the defaults, so initdata of default settings is byte for byte what it
//! was before settings existed, and so is its digest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::PolicyData;

pub use crate::engine::RULES;

/// The initdata format version capsa writes.
pub const INITDATA_VERSION: &str = "0.1.0";
/// The initdata digest algorithm capsa writes.
pub const INITDATA_ALGORITHM: &str = "sha256";
/// The key of the policy inside initdata's `data` table.
pub const POLICY_KEY: &str = "policy.rego";
/// The key of the sandbox settings inside initdata's `data` table.
pub const SETTINGS_KEY: &str = "capsa.toml";
/// The workload API's port on 127.0.0.1 in the guest when the settings name none.
pub const DEFAULT_WORKLOAD_API_PORT: u16 = 8080;

/// Why a document or initdata could not be built or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DocumentError {
    /// The policy data could not be serialised (a capsa bug).
    #[error("cannot serialise the policy data: {0}")]
    Serialise(String),
    /// The initdata is not valid TOML of the expected shape.
    #[error(
        "initdata is not valid: {0}; expected TOML with version, algorithm and a [data] table holding \"policy.rego\""
    )]
    Initdata(String),
    /// The initdata uses an algorithm capsa does not support.
    #[error("initdata algorithm \"{0}\" is not supported (capsa writes and reads sha256)")]
    Algorithm(String),
    /// The document has no `policy_data := ` line.
    #[error("the policy document has no \"policy_data := {{...}}\" at its end: is it a capsa policy?")]
    NoData,
    /// The policy data is not valid.
    #[error("the policy data is not valid for this capsa version: {0}")]
    Data(String),
    /// The initdata carries no policy.
    #[error("initdata has no data.\"policy.rego\" entry")]
    NoPolicy,
    /// The settings entry is not TOML of the settings' shape.
    #[error(
        "initdata's data.\"capsa.toml\" is not valid sandbox settings: {0}; expected TOML with an optional workload_api_port = <1-65535> and [[trust]] tables of url and an optional ca"
    )]
    SettingsToml(String),
    /// A sandbox setting has a value capsa cannot use.
    #[error("sandbox setting {field} is not valid: {reason}")]
    Settings {
        /// Which setting, e.g. `trust[1].url`.
        field: String,
        /// What is wrong and what to write instead.
        reason: String,
    },
}

/// A rendered policy document with its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDocument {
    rego: String,
}

impl PolicyDocument {
    /// Renders the rules and the data into one document.
    pub fn render(data: &PolicyData) -> Result<Self, DocumentError> {
        let json = serde_json::to_string_pretty(data).map_err(|e| DocumentError::Serialise(e.to_string()))?;
        let mut rego = String::with_capacity(RULES.len() + json.len() + 32);
        rego.push_str(RULES.trim_end());
        rego.push_str("\n\npolicy_data := ");
        rego.push_str(&json);
        rego.push('\n');
        Ok(Self { rego })
    }

    /// A document as received (e.g. from initdata), not re-rendered.
    pub fn from_rego(rego: String) -> Self {
        Self { rego }
    }

    /// The Rego text.
    pub fn rego(&self) -> &str {
        &self.rego
    }

    /// The policy data the document carries: the JSON after its last
    /// `policy_data := `. For tools (diff, display); the engine evaluates
    /// the whole document instead.
    pub fn data(&self) -> Result<PolicyData, DocumentError> {
        let marker = "\npolicy_data := ";
        let start = self.rego.rfind(marker).ok_or(DocumentError::NoData)?;
        let json = self.rego.get(start + marker.len()..).ok_or(DocumentError::NoData)?;
        serde_json::from_str(json).map_err(|e| DocumentError::Data(e.to_string()))
    }

    /// Reads a document from a file's text: a Rego document as is, or
    /// initdata TOML carrying one.
    pub fn from_text(text: &str) -> Result<Self, DocumentError> {
        if text.contains("policy_data := ") && !text.trim_start().starts_with("version") {
            Ok(Self::from_rego(text.to_owned()))
        } else {
            Initdata::from_toml(text.to_owned()).policy()
        }
    }

    /// SHA-256 of the document itself.
    pub fn sha256(&self) -> [u8; 32] {
        sha256(self.rego.as_bytes())
    }

    /// The initdata TOML carrying this document, with the default sandbox
    /// settings (so without a `capsa.toml` entry).
    pub fn initdata(&self) -> Result<Initdata, DocumentError> {
        self.initdata_with(&SandboxSettings::default())
    }

    /// The initdata TOML carrying this document and `settings`, which are
    /// validated first. Default settings are left out (see the module
    /// documentation), so this equals [`PolicyDocument::initdata`] for them.
    pub fn initdata_with(&self, settings: &SandboxSettings) -> Result<Initdata, DocumentError> {
        settings.validate()?;
        let mut data = BTreeMap::from([(POLICY_KEY.to_owned(), self.rego.clone())]);
        if *settings != SandboxSettings::default() {
            let toml = toml::to_string(settings).map_err(|e| DocumentError::Serialise(e.to_string()))?;
            data.insert(SETTINGS_KEY.to_owned(), toml);
        }
        let file =
            InitdataFile { version: INITDATA_VERSION.to_owned(), algorithm: INITDATA_ALGORITHM.to_owned(), data };
        let toml = toml::to_string(&file).map_err(|e| DocumentError::Serialise(e.to_string()))?;
        Ok(Initdata { toml })
    }
}

/// The sandbox's settings, carried in initdata beside the policy (and so
/// measured with it): what the guest serves and whom it may reach. Written
/// as TOML in `data."capsa.toml"`; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxSettings {
    /// The port of the workload API on 127.0.0.1 inside the guest (1 to
    /// 65535; [`DEFAULT_WORKLOAD_API_PORT`] when absent).
    #[serde(default = "default_workload_api_port")]
    pub workload_api_port: u16,
    /// The trust-service endpoints the sandbox may reach; the launcher
    /// forwards only these. None by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust: Vec<TrustEndpoint>,
    /// Encrypted filesystems the agent mounts once the policy is in force,
    /// with keys released by the first trust service. None by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub encfs: Vec<EncfsVolume>,
}

/// Where the agent mounts encrypted filesystems: `<root>/<name>`, the
/// source containers' mounts of the volume name.
pub const ENCFS_MOUNT_ROOT: &str = "/run/capsa/encfs";

/// An encrypted filesystem (a capsa-encfs image) the sandbox mounts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncfsVolume {
    /// The volume's name, 1-63 of `a-z 0-9 -`: it is mounted at
    /// `/run/capsa/encfs/<name>`.
    pub name: String,
    /// The image's location, an `http://` or `https://` URL of its prefix
    /// in an object store (Azure Blob, S3, or any server of its objects).
    /// No credentials, query or fragment: initdata is public.
    pub url: String,
    /// The name of the image's key in the key broker, 1-127 of
    /// `A-Z a-z 0-9 -`.
    pub key: String,
    /// Mounted read-only (the image is never written).
    #[serde(default)]
    pub read_only: bool,
}

impl EncfsVolume {
    /// Where the agent mounts it in the guest.
    pub fn mount_point(&self) -> String {
        format!("{ENCFS_MOUNT_ROOT}/{}", self.name)
    }

    /// The scheme, host and port of its URL: what the launcher forwards.
    pub fn address(&self) -> Result<TrustAddress, String> {
        TrustEndpoint { url: self.url.clone(), ca: None }.address()
    }
}

/// One trust-service endpoint the sandbox may reach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustEndpoint {
    /// `http://` or `https://`, a host (a DNS name, an IPv4 address or a
    /// bracketed IPv6 address) and optionally a port and a path, e.g.
    /// `https://trust.example:8443`. No user, query or fragment.
    pub url: String,
    /// PEM certificate(s) the guest trusts for this endpoint's TLS, instead
    /// of its built-in roots; only for `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

/// Where a [`TrustEndpoint`] is, as the launcher forwards it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustAddress {
    /// Whether the endpoint speaks TLS (`https`).
    pub tls: bool,
    /// The host, without brackets for IPv6.
    pub host: String,
    /// The port: the URL's, or 80 for `http` and 443 for `https`.
    pub port: u16,
}

impl TrustAddress {
    /// `host:port` (IPv6 hosts in brackets): how the guest names the
    /// endpoint to the launcher, and what the launcher connects to.
    pub fn endpoint(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn default_workload_api_port() -> u16 {
    DEFAULT_WORKLOAD_API_PORT
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self { workload_api_port: DEFAULT_WORKLOAD_API_PORT, trust: Vec::new(), encfs: Vec::new() }
    }
}

impl SandboxSettings {
    /// Reads settings from their TOML text, as `data."capsa.toml"` holds
    /// them, and validates them.
    pub fn from_toml(text: &str) -> Result<Self, DocumentError> {
        let settings: Self = toml::from_str(text).map_err(|e| DocumentError::SettingsToml(one_line(&e.to_string())))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every setting: the port is not 0, every trust URL is usable
    /// (see [`TrustEndpoint::address`]) and named once, and a CA is PEM and
    /// given only for `https`.
    pub fn validate(&self) -> Result<(), DocumentError> {
        if self.workload_api_port == 0 {
            return Err(DocumentError::Settings {
                field: "workload_api_port".into(),
                reason: "0 is not a port the workload API can listen on; choose one from 1 to 65535".into(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, endpoint) in self.trust.iter().enumerate() {
            let address = endpoint.address().map_err(|reason| DocumentError::Settings {
                field: format!("trust[{i}].url"),
                reason: format!("{:?} {reason}", endpoint.url),
            })?;
            if !seen.insert(endpoint.url.as_str()) {
                return Err(DocumentError::Settings {
                    field: format!("trust[{i}].url"),
                    reason: format!("{:?} is listed twice; list each endpoint once", endpoint.url),
                });
            }
            if let Some(ca) = &endpoint.ca {
                let field = format!("trust[{i}].ca");
                check_ca(&field, &address, ca, &endpoint.url)?;
            }
        }
        self.validate_encfs()
    }

    fn validate_encfs(&self) -> Result<(), DocumentError> {
        let mut names = std::collections::BTreeSet::new();
        for (i, volume) in self.encfs.iter().enumerate() {
            let invalid =
                |field: &str, reason: String| DocumentError::Settings { field: format!("encfs[{i}].{field}"), reason };
            let name_ok = (1..=63).contains(&volume.name.len())
                && volume.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !volume.name.starts_with('-');
            if !name_ok {
                return Err(invalid("name", format!("{:?} is not 1-63 of a-z, 0-9 and - (not first)", volume.name)));
            }
            if !names.insert(volume.name.as_str()) {
                return Err(invalid("name", format!("{:?} is listed twice; name each volume once", volume.name)));
            }
            volume.address().map_err(|reason| invalid("url", format!("{:?} {reason}", volume.url)))?;
            let key_ok = (1..=127).contains(&volume.key.len())
                && volume.key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !key_ok {
                return Err(invalid(
                    "key",
                    format!("{:?} is not a key name (1-127 of A-Z, a-z, 0-9 and -)", volume.key),
                ));
            }
        }
        if !self.encfs.is_empty() && self.trust.is_empty() {
            return Err(DocumentError::Settings {
                field: "encfs".into(),
                reason: "encrypted filesystems need a trust service to release their keys; add a [[trust]] endpoint"
                    .into(),
            });
        }
        Ok(())
    }
}

/// A trust endpoint's CA: only for https, and PEM.
fn check_ca(field: &str, address: &TrustAddress, ca: &str, url: &str) -> Result<(), DocumentError> {
    if !address.tls {
        return Err(DocumentError::Settings {
            field: field.to_owned(),
            reason: format!("{url:?} is plain http, so a CA has no use; use https or drop the ca"),
        });
    }
    if !ca.contains("-----BEGIN CERTIFICATE-----") || !ca.contains("-----END CERTIFICATE-----") {
        return Err(DocumentError::Settings {
            field: field.to_owned(),
            reason: "is not a PEM certificate (-----BEGIN CERTIFICATE----- ... -----END CERTIFICATE-----)".into(),
        });
    }
    Ok(())
}

impl TrustEndpoint {
    /// The scheme, host and port of [`TrustEndpoint::url`], or why it is not
    /// usable (a phrase to follow the URL in a message).
    pub fn address(&self) -> Result<TrustAddress, String> {
        let usage = "write http://HOST[:PORT] or https://HOST[:PORT]";
        let (tls, rest) = if let Some(rest) = self.url.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = self.url.strip_prefix("http://") {
            (false, rest)
        } else {
            return Err(format!("is not an http or https URL; {usage}"));
        };
        if let Some(c) = self.url.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("contains {c:?}; {usage}"));
        }
        if rest.contains(['?', '#']) {
            return Err(format!("has a query or fragment, which a trust endpoint cannot use; {usage}"));
        }
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            return Err(format!("names a user: initdata is public, so no credentials belong in it; {usage}"));
        }
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (ip, after) = bracketed.split_once(']').ok_or_else(|| format!("has an unclosed [; {usage}"))?;
            ip.parse::<std::net::Ipv6Addr>().map_err(|_| format!("has [{ip}], which is not an IPv6 address"))?;
            match after {
                "" => (ip, None),
                _ => (ip, Some(after.strip_prefix(':').ok_or_else(|| format!("has {after:?} after [{ip}]; {usage}"))?)),
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("has no host; {usage}"));
        }
        let dns_name = |h: &str| {
            h.split('.').all(|label| {
                !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                    && !label.starts_with('-')
            })
        };
        if !authority.starts_with('[') && !dns_name(host) {
            return Err(format!("has host {host:?}, which is not a DNS name or an IPv4 address; {usage}"));
        }
        let port = match port {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            // Only the canonical digits: u16's parser also takes `+80`.
            Some(text) => match text.parse::<u16>() {
                Ok(port) if port != 0 && port.to_string() == text => port,
                _ => return Err(format!("has port {text:?}; a port is a number from 1 to 65535")),
            },
        };
        Ok(TrustAddress { tls, host: host.to_owned(), port })
    }
}

/// Confidential Containers' initdata file.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InitdataFile {
    version: String,
    algorithm: String,
    data: BTreeMap<String, String>,
}

/// Initdata bytes, as placed in the pod annotation and digested into HOST_DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initdata {
    toml: String,
}

impl Initdata {
    /// Initdata as received; checked by [`Initdata::policy`].
    pub fn from_toml(toml: String) -> Self {
        Self { toml }
    }

    /// The TOML text.
    pub fn toml(&self) -> &str {
        &self.toml
    }

    /// The digest HOST_DATA must carry: SHA-256 of the initdata bytes.
    pub fn digest(&self) -> [u8; 32] {
        sha256(self.toml.as_bytes())
    }

    /// The policy document inside.
    pub fn policy(&self) -> Result<PolicyDocument, DocumentError> {
        self.file()?.data.remove(POLICY_KEY).map(PolicyDocument::from_rego).ok_or(DocumentError::NoPolicy)
    }

    /// The sandbox settings inside, validated; the defaults when initdata
    /// has no `capsa.toml` entry.
    pub fn settings(&self) -> Result<SandboxSettings, DocumentError> {
        match self.file()?.data.remove(SETTINGS_KEY) {
            Some(text) => SandboxSettings::from_toml(&text),
            None => Ok(SandboxSettings::default()),
        }
    }

    fn file(&self) -> Result<InitdataFile, DocumentError> {
        let file: InitdataFile = toml::from_str(&self.toml).map_err(|e| DocumentError::Initdata(e.to_string()))?;
        if file.algorithm != INITDATA_ALGORITHM {
            return Err(DocumentError::Algorithm(file.algorithm));
        }
        Ok(file)
    }
}

/// toml's messages span lines (they quote the input); a reason is one line.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{SCHEMA_VERSION, SandboxPolicy};

    fn data() -> PolicyData {
        PolicyData { version: SCHEMA_VERSION, containers: Vec::new(), sandbox: SandboxPolicy::default() }
    }

    #[test]
    fn rendering_is_deterministic_and_round_trips_through_initdata() {
        let a = PolicyDocument::render(&data()).unwrap();
        let b = PolicyDocument::render(&data()).unwrap();
        assert_eq!(a, b);
        assert!(a.rego().contains("package capsa.policy"));
        assert!(a.rego().contains("policy_data := {"));
        let initdata = a.initdata().unwrap();
        assert_eq!(initdata.digest(), b.initdata().unwrap().digest());
        assert_eq!(Initdata::from_toml(initdata.toml().to_owned()).policy().unwrap(), a);
    }

    #[test]
    fn initdata_with_awkward_strings_round_trips() {
        let doc = PolicyDocument::from_rego("x := \"'''\\\"\"\"\"\n".to_owned());
        let initdata = doc.initdata().unwrap();
        assert_eq!(Initdata::from_toml(initdata.toml().to_owned()).policy().unwrap(), doc);
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn endpoint(url: &str, ca: Option<&str>) -> TrustEndpoint {
        TrustEndpoint { url: url.into(), ca: ca.map(str::to_owned) }
    }

    /// Default settings add nothing: initdata is the bytes it was before
    /// settings existed, so no digest changed.
    #[test]
    fn default_settings_leave_initdata_as_it_was() {
        let doc = PolicyDocument::from_rego("x := 1\n".to_owned());
        let initdata = doc.initdata().unwrap();
        let expected =
            "version = \"0.1.0\"\nalgorithm = \"sha256\"\n\n[data]\n\"policy.rego\" = \"\"\"\nx := 1\n\"\"\"\n";
        assert_eq!(initdata.toml(), expected);
        assert_eq!(doc.initdata_with(&SandboxSettings::default()).unwrap(), initdata);
        assert_eq!(initdata.settings().unwrap(), SandboxSettings::default());
        assert_eq!(initdata.settings().unwrap().workload_api_port, 8080);
    }

    #[test]
    fn encfs_volumes_are_checked() {
        let volume = |name: &str, url: &str, key: &str| EncfsVolume {
            name: name.into(),
            url: url.into(),
            key: key.into(),
            read_only: false,
        };
        let with = |encfs: Vec<EncfsVolume>| SandboxSettings {
            trust: vec![endpoint("http://127.0.0.1:8443", None)],
            encfs,
            ..SandboxSettings::default()
        };
        let good = volume("data", "http://127.0.0.1:10000/acct/c/p", "data-key");
        assert!(with(vec![good.clone()]).validate().is_ok());
        assert_eq!(good.mount_point(), "/run/capsa/encfs/data");
        assert_eq!(good.address().unwrap().endpoint(), "127.0.0.1:10000");
        let cases = [
            (vec![volume("Data", "http://h/p", "k")], "encfs[0].name"),
            (vec![volume("../x", "http://h/p", "k")], "encfs[0].name"),
            (vec![good.clone(), good.clone()], "encfs[1].name"),
            (vec![volume("d", "az://c/p", "k")], "encfs[0].url"),
            (vec![volume("d", "http://h/p?sig=secret", "k")], "encfs[0].url"),
            (vec![volume("d", "http://user:pw@h/p", "k")], "encfs[0].url"),
            (vec![volume("d", "http://h/p", "a/b")], "encfs[0].key"),
        ];
        for (encfs, field) in cases {
            match with(encfs.clone()).validate() {
                Err(DocumentError::Settings { field: f, .. }) => assert_eq!(f, field, "{encfs:?}"),
                other => panic!("{encfs:?}: expected a complaint about {field}, got {other:?}"),
            }
        }
        let no_trust = SandboxSettings { encfs: vec![good], ..SandboxSettings::default() };
        assert!(matches!(no_trust.validate(), Err(DocumentError::Settings { field, .. }) if field == "encfs"));
    }

    #[test]
    fn settings_travel_in_initdata_and_change_its_digest() {
        let doc = PolicyDocument::render(&data()).unwrap();
        let settings = SandboxSettings {
            workload_api_port: 9000,
            trust: vec![endpoint("https://trust.example:8443", Some(CA)), endpoint("http://10.0.0.1", None)],
            encfs: vec![EncfsVolume {
                name: "data".into(),
                url: "http://127.0.0.1:10000/devstoreaccount1/images/data".into(),
                key: "data-key".into(),
                read_only: true,
            }],
        };
        let initdata = doc.initdata_with(&settings).unwrap();
        assert!(initdata.toml().contains("\"capsa.toml\""), "{}", initdata.toml());
        assert_ne!(initdata.digest(), doc.initdata().unwrap().digest());
        let read = Initdata::from_toml(initdata.toml().to_owned());
        assert_eq!(read.settings().unwrap(), settings);
        assert_eq!(read.policy().unwrap(), doc);
        // Only the port differs from the defaults: still written, still measured.
        let port_only = SandboxSettings { workload_api_port: 8081, ..SandboxSettings::default() };
        let initdata = doc.initdata_with(&port_only).unwrap();
        assert_eq!(initdata.settings().unwrap(), port_only);
        assert_ne!(initdata.digest(), doc.initdata().unwrap().digest());
    }

    #[test]
    fn settings_toml_reads_with_defaults() {
        let settings = SandboxSettings::from_toml("[[trust]]\nurl = \"https://kbs.example\"\n").unwrap();
        assert_eq!(settings.workload_api_port, DEFAULT_WORKLOAD_API_PORT);
        assert_eq!(settings.trust, [endpoint("https://kbs.example", None)]);
        assert_eq!(SandboxSettings::from_toml("").unwrap(), SandboxSettings::default());
    }

    #[test]
    fn bad_settings_say_which_and_why() {
        let field = |result: Result<SandboxSettings, DocumentError>| match result {
            Err(DocumentError::Settings { field, reason }) => format!("{field}: {reason}"),
            other => panic!("expected a settings error, got {other:?}"),
        };
        assert!(field(SandboxSettings::from_toml("workload_api_port = 0")).starts_with("workload_api_port: 0 is not"));
        for text in ["workload_api_port = 70000", "workload_api_port = \"80\"", "port = 80", "[[trust]]\nca = \"x\""] {
            let error = SandboxSettings::from_toml(text).unwrap_err();
            assert!(matches!(error, DocumentError::SettingsToml(_)), "{text}: {error}");
            assert!(!error.to_string().contains('\n'), "{error}");
        }
        let with = |trust: Vec<TrustEndpoint>| {
            let settings = SandboxSettings { trust, ..SandboxSettings::default() };
            let initdata = PolicyDocument::from_rego("x".into()).initdata_with(&settings);
            assert!(matches!(initdata, Err(DocumentError::Settings { .. })), "{initdata:?}");
            field(SandboxSettings::from_toml(&toml::to_string(&settings).unwrap()))
        };
        for (url, expected) in [
            ("trust.example:8443", "not an http or https URL"),
            ("ftp://trust.example", "not an http or https URL"),
            ("https://", "no host"),
            ("https://:8443", "no host"),
            ("https://user:pw@trust.example", "names a user"),
            ("https://trust.example:0", "port \"0\""),
            ("https://trust.example:65536", "port \"65536\""),
            ("https://trust.example:+80", "port \"+80\""),
            ("https://trust.example:", "port \"\""),
            ("https://trust.example/?a=1", "query or fragment"),
            ("https://trust example", "contains ' '"),
            ("https://trust_example", "not a DNS name"),
            ("https://[::1", "unclosed ["),
            ("https://[nope]:1", "not an IPv6 address"),
        ] {
            let message = with(vec![endpoint(url, None)]);
            assert!(message.starts_with("trust[0].url: ") && message.contains(expected), "{url}: {message}");
        }
        let message = with(vec![endpoint("http://a.example", None), endpoint("http://a.example", None)]);
        assert!(message.starts_with("trust[1].url") && message.contains("twice"), "{message}");
        let message = with(vec![endpoint("http://a.example", Some(CA))]);
        assert!(message.starts_with("trust[0].ca") && message.contains("plain http"), "{message}");
        let message = with(vec![endpoint("https://a.example", Some("not pem"))]);
        assert!(message.starts_with("trust[0].ca") && message.contains("PEM"), "{message}");
    }

    #[test]
    fn trust_addresses_are_what_the_launcher_forwards() {
        let address = |url: &str| endpoint(url, None).address().unwrap();
        assert_eq!(
            address("https://trust.example"),
            TrustAddress { tls: true, host: "trust.example".into(), port: 443 }
        );
        assert_eq!(
            address("http://trust.example/"),
            TrustAddress { tls: false, host: "trust.example".into(), port: 80 }
        );
        assert_eq!(
            address("http://127.0.0.1:8443/base"),
            TrustAddress { tls: false, host: "127.0.0.1".into(), port: 8443 }
        );
        assert_eq!(address("https://[fd00::1]:9443"), TrustAddress { tls: true, host: "fd00::1".into(), port: 9443 });
        assert_eq!(address("https://[::1]").port, 443);
    }

    #[test]
    fn initdata_errors_say_what_is_wrong() {
        assert!(matches!(Initdata::from_toml("nope".into()).policy(), Err(DocumentError::Initdata(_))));
        let other = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"x\"\n";
        assert!(matches!(Initdata::from_toml(other.into()).policy(), Err(DocumentError::Algorithm(_))));
        let none = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n";
        assert!(matches!(Initdata::from_toml(none.into()).policy(), Err(DocumentError::NoPolicy)));
        assert!(matches!(Initdata::from_toml(other.into()).settings(), Err(DocumentError::Algorithm(_))));
        let bad = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n\"capsa.toml\" = \"workload_api_port = 0\"\n";
        assert!(matches!(Initdata::from_toml(bad.into()).settings(), Err(DocumentError::Settings { .. })));
    }
}
