//! Platform settings: what the runtime and Kubernetes add to every
//! container beyond the pod spec and the image. capsa ships defaults
//! (`settings.toml`); users extend them with their own file.

use serde::Deserialize;

use crate::model::{MountPolicy, SourceMatch};

/// The settings capsa ships.
pub const DEFAULT_SETTINGS: &str = include_str!("settings.toml");

/// Why a settings file is unusable.
#[derive(Debug, thiserror::Error)]
#[error("settings {origin} are not valid: {reason}")]
pub struct SettingsError {
    origin: String,
    reason: String,
}

/// The settings file format. Every list is additive when files are merged.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    /// Signals the host may send to any container.
    #[serde(default)]
    signals: Vec<u32>,
    /// Capabilities of a non-privileged container by default.
    #[serde(default)]
    default_capabilities: Vec<String>,
    /// Platform environment variables.
    #[serde(default)]
    env: EnvSettings,
    /// Mounts the runtime gives every container.
    #[serde(default)]
    mounts: Vec<MountSetting>,
    /// Mounts the kubelet gives a Kubernetes pod's containers.
    #[serde(default)]
    kubernetes_mounts: Vec<MountSetting>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnvSettings {
    #[serde(default)]
    patterns: Vec<String>,
    #[serde(default)]
    exact: Vec<String>,
    #[serde(default)]
    required: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct MountSetting {
    destination: String,
    #[serde(rename = "type")]
    fs_type: String,
    source: SourceSetting,
    #[serde(default)]
    options: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum SourceSetting {
    Exact(String),
    Pattern(String),
}

/// Validated platform settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Signals allowed for every container.
    pub signals: Vec<u32>,
    /// Default capabilities of a non-privileged container.
    pub default_capabilities: Vec<String>,
    /// Platform env patterns (anchored by the rules).
    pub env_patterns: Vec<String>,
    /// Platform env entries allowed exactly.
    pub env_exact: Vec<String>,
    /// Env names that must be present.
    pub env_required: Vec<String>,
    /// Mounts every container may have.
    pub mounts: Vec<MountPolicy>,
    /// Extra mounts for Kubernetes pods.
    pub kubernetes_mounts: Vec<MountPolicy>,
}

impl Settings {
    /// capsa's shipped settings.
    pub fn shipped() -> Result<Self, SettingsError> {
        Self::from_files(&[("shipped with capsa", DEFAULT_SETTINGS)])
    }

    /// The shipped settings extended by each `(origin, toml)` in turn.
    pub fn shipped_and(extra: &[(&str, &str)]) -> Result<Self, SettingsError> {
        let mut files = vec![("shipped with capsa", DEFAULT_SETTINGS)];
        files.extend_from_slice(extra);
        Self::from_files(&files)
    }

    fn from_files(files: &[(&str, &str)]) -> Result<Self, SettingsError> {
        let mut merged = SettingsFile::default();
        for (origin, text) in files {
            let file: SettingsFile = toml::from_str(text)
                .map_err(|e| SettingsError { origin: (*origin).to_owned(), reason: e.to_string() })?;
            for pattern in &file.env.patterns {
                regex_check(pattern).map_err(|reason| SettingsError { origin: (*origin).to_owned(), reason })?;
            }
            for m in file.mounts.iter().chain(&file.kubernetes_mounts) {
                if let SourceSetting::Pattern(p) = &m.source {
                    regex_check(p).map_err(|reason| SettingsError { origin: (*origin).to_owned(), reason })?;
                }
            }
            merged.signals.extend(file.signals);
            merged.default_capabilities.extend(file.default_capabilities);
            merged.env.patterns.extend(file.env.patterns);
            merged.env.exact.extend(file.env.exact);
            merged.env.required.extend(file.env.required);
            merged.mounts.extend(file.mounts);
            merged.kubernetes_mounts.extend(file.kubernetes_mounts);
        }
        let mounts = |ms: Vec<MountSetting>| ms.into_iter().map(MountSetting::into_policy).collect();
        Ok(Self {
            signals: sorted_unique(merged.signals),
            default_capabilities: sorted_unique(merged.default_capabilities),
            env_patterns: merged.env.patterns,
            env_exact: merged.env.exact,
            env_required: merged.env.required,
            mounts: mounts(merged.mounts),
            kubernetes_mounts: mounts(merged.kubernetes_mounts),
        })
    }
}

impl MountSetting {
    fn into_policy(self) -> MountPolicy {
        MountPolicy {
            destination: self.destination,
            fs_type: self.fs_type,
            source: match self.source {
                SourceSetting::Exact(s) => SourceMatch::Exact(s),
                SourceSetting::Pattern(p) => SourceMatch::Pattern(p),
            },
            options: self.options,
        }
    }
}

/// Patterns are matched by the engine with Rust's `regex`, anchored; reject
/// what would not compile rather than produce a policy that denies everything.
pub(crate) fn regex_check(pattern: &str) -> Result<(), String> {
    regex::Regex::new(&format!("^(?:{pattern})$")).map(|_| ()).map_err(|e| format!("pattern {pattern:?}: {e}"))
}

fn sorted_unique<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_settings_parse() {
        let s = Settings::shipped().unwrap();
        assert_eq!(s.signals, vec![9, 15]);
        assert!(s.default_capabilities.contains(&"CAP_CHOWN".to_owned()));
        assert!(s.mounts.iter().any(|m| m.destination == "/proc"));
        assert!(s.kubernetes_mounts.iter().any(|m| m.destination == "/etc/resolv.conf"));
    }

    #[test]
    fn user_settings_extend_and_bad_ones_say_where() {
        let extra = "signals = [1]\n[env]\nexact = [\"TZ=UTC\"]\n";
        let s = Settings::shipped_and(&[("my.toml", extra)]).unwrap();
        assert_eq!(s.signals, vec![1, 9, 15]);
        assert!(s.env_exact.contains(&"TZ=UTC".to_owned()));
        let err = Settings::shipped_and(&[("bad.toml", "colour = 1\n")]).unwrap_err();
        assert!(err.to_string().starts_with("settings bad.toml are not valid"), "{err}");
        let err = Settings::shipped_and(&[("re.toml", "[env]\npatterns = [\"(\"]\n")]).unwrap_err();
        assert!(err.to_string().contains("pattern"), "{err}");
    }
}
