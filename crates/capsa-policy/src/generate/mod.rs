//! `capsa policy gen`: from a pod spec (Kubernetes YAML, an Azure ARM
//! template, a compose file) to policy data, and back to the input with the
//! policy attached.
//!
//! Each input format is reduced to a [`spec::Workload`]; [`build::build`]
//! merges it with the images (through an [`ImageResolver`] the caller
//! provides, so this crate never fetches anything) and the platform
//! [`settings::Settings`]. Fields capsa does not understand are errors that
//! name their path, because silently ignoring one would produce a policy
//! that differs from what the runtime sends.

pub mod arm;
pub mod build;
pub mod compose;
pub mod k8s;
pub mod settings;
pub mod spec;

use crate::document::{DocumentError, EncfsVolume, Initdata, PolicyDocument, SandboxSettings};
use crate::model::PolicyData;

/// What a policy needs to know about an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageFacts {
    /// Manifest digest (`sha256:...`).
    pub manifest_digest: String,
    /// Layer diff_ids, bottom first.
    pub diff_ids: Vec<String>,
    /// Config `Entrypoint`.
    pub entrypoint: Vec<String>,
    /// Config `Cmd`.
    pub cmd: Vec<String>,
    /// Config `Env` (`NAME=value`).
    pub env: Vec<String>,
    /// Config `WorkingDir`.
    pub working_dir: String,
    /// Config `User`.
    pub user: String,
}

/// Resolves image references to their facts; implemented by the caller
/// (the CLI with `capsa-oci`).
pub trait ImageResolver {
    /// Resolves one reference; the error is a message for the user.
    fn resolve(&mut self, reference: &str) -> Result<ImageFacts, String>;
}

/// Why a policy could not be generated.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// The input is not parseable.
    #[error("{origin} cannot be parsed: {reason}")]
    Parse {
        /// Which input.
        origin: String,
        /// The parser's message.
        reason: String,
    },
    /// Fields capsa does not support (each path listed).
    #[error(
        "unsupported field(s) {}: capsa cannot pin what they do, so the policy would not match the runtime; remove them or pass --allow-unsupported",
        .paths.join(", ")
    )]
    Unsupported {
        /// The field paths.
        paths: Vec<String>,
    },
    /// A field has a value capsa cannot turn into a policy.
    #[error("{path}: {reason}")]
    Invalid {
        /// The field path.
        path: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// An image could not be resolved.
    #[error("image {image}: {reason}")]
    Image {
        /// The reference.
        image: String,
        /// The resolver's message.
        reason: String,
    },
    /// The input has no workload.
    #[error(
        "{0} holds no workload capsa can generate a policy for (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, an ARM containerGroup or compose services)"
    )]
    NoWorkload(String),
    /// The document could not be rendered.
    #[error(transparent)]
    Document(#[from] DocumentError),
    /// A workload mounts encrypted filesystems, but no trust service was
    /// given to release their keys.
    #[error(
        "{workload} mounts the encrypted filesystem(s) {}, whose keys a trust service releases to the sandbox: pass --trust URL naming the trust service whose key broker holds them (the first --trust releases every volume's key)",
        .volumes.join(", ")
    )]
    EncfsWithoutTrust {
        /// The workload, as the generated policies name it (`Pod/NAME`).
        workload: String,
        /// The names of its encrypted filesystem volumes.
        volumes: Vec<String>,
    },
}

/// Options that apply to every input format.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Ignore fields capsa does not support instead of failing.
    pub allow_unsupported: bool,
    /// The sandbox settings every generated workload's initdata carries
    /// beside its policy (and so its HOST_DATA measures); the defaults
    /// leave initdata as it was before settings existed.
    pub sandbox_settings: SandboxSettings,
}

/// The kinds of input `capsa policy gen` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// Kubernetes YAML (one or more documents).
    Kubernetes,
    /// An Azure Resource Manager template (JSON).
    Arm,
    /// A compose file (YAML with `services`).
    Compose,
}

impl InputKind {
    /// Guesses the kind from the content: JSON with `resources` is an ARM
    /// template, YAML with top-level `services` is compose, else Kubernetes.
    pub fn detect(text: &str) -> Self {
        let trimmed = text.trim_start();
        if trimmed.starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(trimmed) {
                if v.get("resources").is_some() {
                    return Self::Arm;
                }
            }
        }
        if let Ok(v) = serde_norway::from_str::<serde_json::Value>(text) {
            if v.get("services").is_some() && v.get("kind").is_none() {
                return Self::Compose;
            }
        }
        Self::Kubernetes
    }
}

/// A generated policy: per workload, the data, the document and initdata,
/// and the input rewritten with the policy attached.
#[derive(Debug, Clone)]
pub struct Generated {
    /// One entry per workload in the input.
    pub workloads: Vec<GeneratedWorkload>,
    /// The input with every workload's policy attached, in the input's format.
    pub annotated: String,
}

/// The policy of one workload.
#[derive(Debug, Clone)]
pub struct GeneratedWorkload {
    /// Pod, group or project name.
    pub name: String,
    /// The data.
    pub data: PolicyData,
    /// The Rego document.
    pub document: PolicyDocument,
    /// The initdata carrying it and [`GeneratedWorkload::settings`].
    pub initdata: Initdata,
    /// The sandbox settings its initdata carries: [`Options::sandbox_settings`]
    /// with the workload's own encrypted filesystems added.
    pub settings: SandboxSettings,
    /// What the sandbox's HOST_DATA must carry: the initdata digest, or for
    /// Azure Container Instances, which measure the policy itself, the
    /// document's SHA-256 (there the sandbox settings are not measured).
    pub host_data: [u8; 32],
}

impl GeneratedWorkload {
    /// Renders `data`, the policy of `workload`, into its document and
    /// initdata, whose settings are `options` with the workload's
    /// encrypted filesystems added.
    fn new(
        name: String,
        data: PolicyData,
        workload: &spec::Workload,
        options: &SandboxSettings,
    ) -> Result<Self, GenerateError> {
        let settings = workload_settings(&name, &workload.encfs, options)?;
        let document = PolicyDocument::render(&data)?;
        let initdata = document.initdata_with(&settings)?;
        let host_data = match workload.platform {
            spec::Platform::AzureContainerInstances => document.sha256(),
            spec::Platform::Kubernetes | spec::Platform::Compose => initdata.digest(),
        };
        Ok(Self { name, data, document, initdata, settings, host_data })
    }
}

/// The sandbox settings the initdata of workload `name` carries: `base`
/// (the options', shared by every workload of the input) with the
/// workload's encrypted filesystems `encfs` added, validated. A workload
/// without encrypted filesystems gets `base` unchanged, so its initdata is
/// what it was before they existed. Encrypted filesystems need a trust
/// service to release their keys: without one the error says to pass
/// `--trust`.
fn workload_settings(
    name: &str,
    encfs: &[EncfsVolume],
    base: &SandboxSettings,
) -> Result<SandboxSettings, GenerateError> {
    if encfs.is_empty() {
        return Ok(base.clone());
    }
    let mut settings = base.clone();
    settings.encfs.extend(encfs.iter().cloned());
    if settings.trust.is_empty() {
        return Err(GenerateError::EncfsWithoutTrust {
            workload: name.to_owned(),
            volumes: settings.encfs.iter().map(|v| v.name.clone()).collect(),
        });
    }
    settings.validate()?;
    Ok(settings)
}

/// Generates policies for every workload in `text` (named `origin` in messages).
pub fn generate(
    kind: InputKind,
    origin: &str,
    text: &str,
    resolver: &mut dyn ImageResolver,
    settings: &settings::Settings,
    options: &Options,
) -> Result<Generated, GenerateError> {
    match kind {
        InputKind::Kubernetes => k8s::generate(origin, text, resolver, settings, options),
        InputKind::Arm => arm::generate(origin, text, resolver, settings, options),
        InputKind::Compose => compose::generate(origin, text, resolver, settings, options),
    }
}

/// Walks JSON objects checking keys against what capsa understands,
/// collecting the paths of the others.
pub(crate) struct FieldCheck {
    unsupported: Vec<String>,
}

impl FieldCheck {
    pub(crate) fn new() -> Self {
        Self { unsupported: Vec::new() }
    }

    /// Records every key of `value` (an object) at `path` not in `known`.
    pub(crate) fn keys(&mut self, value: &serde_json::Value, path: &str, known: &[&str]) {
        if let Some(map) = value.as_object() {
            for key in map.keys() {
                if !known.contains(&key.as_str()) {
                    self.unsupported.push(format!("{path}.{key}"));
                }
            }
        }
    }

    /// Records one unsupported path.
    pub(crate) fn unsupported(&mut self, path: String) {
        self.unsupported.push(path);
    }

    /// Fails unless everything was understood or the caller allows otherwise.
    pub(crate) fn finish(self, options: &Options) -> Result<(), GenerateError> {
        if self.unsupported.is_empty() || options.allow_unsupported {
            if !self.unsupported.is_empty() {
                tracing::warn!(fields = ?self.unsupported, "ignoring unsupported fields (--allow-unsupported)");
            }
            Ok(())
        } else {
            Err(GenerateError::Unsupported { paths: self.unsupported })
        }
    }
}

/// A required string field, or an error naming its path.
pub(crate) fn required_str<'v>(value: &'v serde_json::Value, key: &str, path: &str) -> Result<&'v str, GenerateError> {
    value.get(key).and_then(serde_json::Value::as_str).ok_or_else(|| GenerateError::Invalid {
        path: format!("{path}.{key}"),
        reason: "missing (or not a string)".into(),
    })
}

/// A `{name, mountPath, readOnly}` volume mount (the shape Kubernetes and
/// Azure Container Instances share), its volume looked up by name.
pub(crate) fn volume_mount(
    path: &str,
    mount: &serde_json::Value,
    volumes: &std::collections::HashMap<String, spec::VolumeSource>,
    owner: &str,
) -> Result<spec::MountSpec, GenerateError> {
    let volume = required_str(mount, "name", path)?;
    let source = volumes.get(volume).cloned().ok_or_else(|| GenerateError::Invalid {
        path: format!("{path}.name"),
        reason: format!("no volume named \"{volume}\" in the {owner}"),
    })?;
    Ok(spec::MountSpec {
        destination: required_str(mount, "mountPath", path)?.to_owned(),
        source,
        read_only: mount.get("readOnly").and_then(serde_json::Value::as_bool).unwrap_or(false),
    })
}

/// Base64 (standard, padded) as annotations and ARM properties carry it.
pub(crate) fn base64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Reads a JSON string array field, naming the path on a wrong type.
pub(crate) fn string_list(value: Option<&serde_json::Value>, path: &str) -> Result<Option<Vec<String>>, GenerateError> {
    let Some(value) = value else { return Ok(None) };
    let list = value
        .as_array()
        .ok_or_else(|| GenerateError::Invalid { path: path.to_owned(), reason: "expected a list of strings".into() })?;
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_owned).ok_or_else(|| GenerateError::Invalid {
                path: format!("{path}[{i}]"),
                reason: format!("expected a string, found {v}"),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
