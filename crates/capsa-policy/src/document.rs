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

    /// The initdata TOML carrying this document.
    pub fn initdata(&self) -> Result<Initdata, DocumentError> {
        let file = InitdataFile {
            version: INITDATA_VERSION.to_owned(),
            algorithm: INITDATA_ALGORITHM.to_owned(),
            data: BTreeMap::from([(POLICY_KEY.to_owned(), self.rego.clone())]),
        };
        let toml = toml::to_string(&file).map_err(|e| DocumentError::Serialise(e.to_string()))?;
        Ok(Initdata { toml })
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
        let mut file: InitdataFile = toml::from_str(&self.toml).map_err(|e| DocumentError::Initdata(e.to_string()))?;
        if file.algorithm != INITDATA_ALGORITHM {
            return Err(DocumentError::Algorithm(file.algorithm));
        }
        file.data.remove(POLICY_KEY).map(PolicyDocument::from_rego).ok_or(DocumentError::NoPolicy)
    }
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

    #[test]
    fn initdata_errors_say_what_is_wrong() {
        assert!(matches!(Initdata::from_toml("nope".into()).policy(), Err(DocumentError::Initdata(_))));
        let other = "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = \"x\"\n";
        assert!(matches!(Initdata::from_toml(other.into()).policy(), Err(DocumentError::Algorithm(_))));
        let none = "version = \"0.1.0\"\nalgorithm = \"sha256\"\n[data]\n";
        assert!(matches!(Initdata::from_toml(none.into()).policy(), Err(DocumentError::NoPolicy)));
    }
}
