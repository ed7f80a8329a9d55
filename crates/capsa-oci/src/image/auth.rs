//! Registry credentials from the Docker client's `config.json`.
//!
//! Only `auths` entries are read: `auth` (base64 of `user:password`),
//! `username`/`password`, or `registrytoken` (a bearer token). Credential
//! helpers (`credsStore`, `credHelpers`) are external programs; capsa does not
//! run them and says so, falling back to anonymous access. Secrets never
//! reach a log line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

use super::ImageError;

/// The largest config.json we read.
const MAX_CONFIG_BYTES: u64 = 4 << 20;

#[derive(Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
pub(crate) fn default_docker_config() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(PathBuf::from(home).join(".docker").join("config.json"))
}

/// Reduces an `auths` key or a registry name to a comparable host: no
/// scheme, no path, lowercase, Docker Hub's aliases folded into `docker.io`.
fn normalize_registry(key: &str) -> String {
    let key = key.trim();
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_owned(),
        _ => host,
    }
}

/// The credentials for `registry` (as a reference names it, e.g. `docker.io`,
/// `ghcr.io`, `127.0.0.1:5000`) from the Docker config at `path` (or the
/// default one). A missing file means anonymous access.
pub(crate) fn credentials_for(path: Option<&Path>, registry: &str) -> Result<RegistryAuth, ImageError> {
    let Some(path) = path.map(Path::to_path_buf).or_else(default_docker_config) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let bytes = match std::fs::File::open(&path) {
        Ok(f) => {
            use std::io::Read as _;
            let mut bytes = Vec::new();
            f.take(MAX_CONFIG_BYTES)
                .read_to_end(&mut bytes)
                .map_err(|e| ImageError::DockerConfig { path: path.clone(), reason: e.to_string() })?;
            bytes
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(ImageError::DockerConfig { path, reason: e.to_string() }),
    };
    let config: DockerConfig = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::DockerConfig { path: path.clone(), reason: format!("not valid JSON: {e}") })?;
    credentials_in(&config, &path, registry)
}

fn credentials_in(config: &DockerConfig, path: &Path, registry: &str) -> Result<RegistryAuth, ImageError> {
    let want = normalize_registry(registry);
    let entry = config.auths.iter().find(|(k, _)| normalize_registry(k) == want).map(|(_, e)| e);
    let bad = |reason: String| ImageError::DockerConfig { path: path.to_path_buf(), reason };
    if let Some(e) = entry {
        if let Some(token) = e.registrytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(RegistryAuth::Bearer(token.to_owned()));
        }
        if let (Some(u), Some(p)) = (e.username.as_deref(), e.password.as_deref()) {
            if !u.is_empty() {
                return Ok(RegistryAuth::Basic(u.to_owned(), p.to_owned()));
            }
        }
        if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad(format!("auths entry for {registry}: `auth` is not base64")))?;
            let decoded = String::from_utf8(decoded)
                .map_err(|_| bad(format!("auths entry for {registry}: `auth` is not UTF-8")))?;
            let Some((user, password)) = decoded.split_once(':') else {
                return Err(bad(format!("auths entry for {registry}: `auth` is not user:password")));
            };
            return Ok(RegistryAuth::Basic(user.to_owned(), password.to_owned()));
        }
        if e.identitytoken.as_deref().is_some_and(|t| !t.is_empty()) {
            tracing::warn!(
                registry,
                "the docker config holds an identity token for this registry, which capsa cannot use; \
                 add username/password (or auth) to its auths entry; trying anonymous access"
            );
            return Ok(RegistryAuth::Anonymous);
        }
    }
    let helper = config
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_registry(k) == want)
        .map(|(_, h)| h.as_str())
        .or(config.creds_store.as_deref())
        .filter(|h| !h.is_empty());
    if let Some(helper) = helper {
        tracing::warn!(
            registry,
            helper = %format!("docker-credential-{helper}"),
            "registry credentials are kept by a credential helper, which capsa does not run; \
             put them in the auths section of the docker config to use them; trying anonymous access"
        );
    }
    Ok(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(json: &str, registry: &str) -> Result<RegistryAuth, ImageError> {
        let config: DockerConfig = serde_json::from_str(json).unwrap();
        credentials_in(&config, Path::new("/x/config.json"), registry)
    }

    fn basic(a: RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reads_auth_entries() {
        // base64("alice:s3cr:et")
        let j = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"YWxpY2U6czNjcjpldA=="},
                    "127.0.0.1:5000":{"username":"bob","password":"pw"},
                    "ghcr.io":{"registrytoken":"tok"}}}"#;
        assert_eq!(basic(creds(j, "docker.io").unwrap()), ("alice".into(), "s3cr:et".into()));
        assert_eq!(basic(creds(j, "127.0.0.1:5000").unwrap()), ("bob".into(), "pw".into()));
        assert!(matches!(creds(j, "ghcr.io").unwrap(), RegistryAuth::Bearer(t) if t == "tok"));
        assert!(matches!(creds(j, "quay.io").unwrap(), RegistryAuth::Anonymous));
        assert!(matches!(creds(j, "127.0.0.1:5001").unwrap(), RegistryAuth::Anonymous));
    }

    #[test]
    fn helpers_and_bad_entries() {
        let j = r#"{"auths":{"quay.io":{}},"credsStore":"desktop"}"#;
        assert!(matches!(creds(j, "quay.io").unwrap(), RegistryAuth::Anonymous));
        let err = creds(r#"{"auths":{"quay.io":{"auth":"!!!"}}}"#, "quay.io").unwrap_err();
        assert!(err.to_string().contains("not base64"), "{err}");
        let err = creds(r#"{"auths":{"quay.io":{"auth":"bm9jb2xvbg=="}}}"#, "quay.io").unwrap_err();
        assert!(err.to_string().contains("user:password"), "{err}");
        // The error never echoes the secret.
        assert!(!err.to_string().contains("nocolon"));
    }

    #[test]
    fn missing_file_is_anonymous() {
        let p = std::env::temp_dir().join("capsa-oci-no-such-docker-config.json");
        assert!(matches!(credentials_for(Some(&p), "docker.io").unwrap(), RegistryAuth::Anonymous));
    }

    #[test]
    fn normalizes_keys() {
        assert_eq!(normalize_registry("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_registry("http://LOCALHOST:5000"), "localhost:5000");
        assert_eq!(normalize_registry("ghcr.io"), "ghcr.io");
    }
}
