//! Images in object stores: Azure Blob (and Azurite), S3 and plain HTTP,
//! through the `object_store` crate, behind the synchronous [`Store`] trait.
//!
//! A location is a local path, a `file://` URL, or a URL naming a container
//! or bucket and a prefix inside it:
//!
//! | location | store |
//! | --- | --- |
//! | `/var/lib/img`, `file:///var/lib/img` | [`LocalStore`] |
//! | `az://CONTAINER/PREFIX`, `azure://CONTAINER/PREFIX` | Azure Blob; the account from `AZURE_STORAGE_ACCOUNT_NAME` |
//! | `https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX[?SAS]` | Azure Blob |
//! | `http://127.0.0.1:PORT/ACCOUNT/CONTAINER/PREFIX` | Azure Blob, path-style (Azurite) |
//! | `s3://BUCKET/PREFIX` | S3, or any S3-compatible store named by `AWS_ENDPOINT` |
//! | any other `https://HOST/PREFIX` | plain HTTP (reads; writes need WebDAV) |
//!
//! A path-style URL is one whose first path segment is the account named by
//! `AZURE_STORAGE_ACCOUNT_NAME`, or Azurite's `devstoreaccount1`. With
//! `AZURE_STORAGE_USE_EMULATOR=true`, `az://` URLs go to Azurite at
//! `AZURITE_BLOB_STORAGE_URL` (default `http://127.0.0.1:10000`).
//!
//! Credentials and settings come from the environment as object_store's
//! `from_env()` builders read them (`AZURE_*`, `AWS_*`), or from the
//! variables given to [`Config::from_vars`]. Plain `http` is refused except
//! to loopback hosts: over it anyone on the path could read and replace every
//! request, and a shared key signs no body.
//!
//! The trait is synchronous and is called from FUSE threads and from threads
//! inside other tokio runtimes, where `block_on` panics, so each
//! [`RemoteStore`] owns a small runtime of its own, spawns every request on
//! it and waits on a channel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};

pub use object_store;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::http::HttpBuilder;
use object_store::path::Path;
use object_store::{
    ClientConfigKey, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use url::Url;

use crate::store::{LocalStore, Store, StoreError};

/// Azurite's account, built into the emulator.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's published account key (not a secret: every Azurite has it).
const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Where Azurite listens unless `AZURITE_BLOB_STORAGE_URL` says otherwise.
const AZURITE_DEFAULT_URL: &str = "http://127.0.0.1:10000";
/// A request that has not finished in this long is retried (object_store's
/// retry policy bounds the retries).
const REQUEST_TIMEOUT: &str = "30s";
/// Worker threads of each store's runtime: requests wait on the network, so
/// two are plenty.
const WORKERS: usize = 2;

/// Opens the store at `location` (see the module docs), with credentials from
/// the process environment. A local directory must exist.
pub fn open(location: &str) -> Result<Arc<dyn Store>, StoreError> {
    Config::from_env().open(location)
}

/// Like [`open`], but a local directory is created if missing (a remote
/// prefix needs no creating).
pub fn create(location: &str) -> Result<Arc<dyn Store>, StoreError> {
    Config::from_env().create(location)
}

/// The settings that stores are opened with: the `AZURE_*`, `AWS_*` and
/// Azurite variables of an environment.
#[derive(Clone, Default)]
pub struct Config {
    vars: HashMap<String, String>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: the values include keys.
        let mut names: Vec<&String> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Config").field("vars", &names).finish()
    }
}

impl Config {
    /// The process environment's settings.
    pub fn from_env() -> Self {
        Self::from_vars(std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))))
    }

    /// Exactly these variables (names as in the environment, such as
    /// `AZURE_STORAGE_ACCOUNT_KEY`), and nothing from the process's.
    pub fn from_vars<I, K, V>(vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .filter(|(k, _): &(String, String)| {
                k.starts_with("AZURE_")
                    || k.starts_with("AWS_")
                    || k == "AZURITE_BLOB_STORAGE_URL"
                    || k == "IDENTITY_ENDPOINT"
            })
            .collect();
        Self { vars }
    }

    /// Opens the store at `location`; a local directory must exist.
    pub fn open(&self, location: &str) -> Result<Arc<dyn Store>, StoreError> {
        self.open_store(location, false)
    }

    /// Opens the store at `location`, creating a local directory if missing.
    pub fn create(&self, location: &str) -> Result<Arc<dyn Store>, StoreError> {
        self.open_store(location, true)
    }

    fn open_store(&self, location: &str, create: bool) -> Result<Arc<dyn Store>, StoreError> {
        let target = Target::parse(location, self)?;
        let describe = describe(location);
        let secrets = self.secrets(location);
        let store: Arc<dyn ObjectStore> = match &target {
            Target::Local(path) if create => return Ok(Arc::new(LocalStore::create(path)?)),
            Target::Local(path) => return Ok(Arc::new(LocalStore::open(path))),
            Target::Azure(azure) => Arc::new(self.azure(azure).map_err(|e| build_error(&describe, &e, &secrets))?),
            Target::S3 { bucket, .. } => Arc::new(self.s3(bucket).map_err(|e| build_error(&describe, &e, &secrets))?),
            Target::Http { base, .. } => {
                let http = base.scheme() == "http";
                let options = ClientOptions::new()
                    .with_config(ClientConfigKey::Timeout, REQUEST_TIMEOUT)
                    .with_allow_http(http)
                    .with_no_system_certificates(http);
                let store = HttpBuilder::new()
                    .with_url(base.as_str())
                    .with_client_options(options)
                    .build()
                    .map_err(|e| build_error(&describe, &e, &secrets))?;
                Arc::new(store)
            }
        };
        let mut remote = RemoteStore::new(store, target.prefix(), describe)?;
        remote.secrets = secrets;
        Ok(Arc::new(remote))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn use_emulator(&self) -> bool {
        self.get("AZURE_STORAGE_USE_EMULATOR").is_some_and(truthy)
    }

    /// Every value that must not appear in a message.
    fn secrets(&self, location: &str) -> Vec<String> {
        let mut secrets: Vec<String> = self
            .vars
            .iter()
            .filter(|(k, v)| {
                let k = k.to_ascii_uppercase();
                v.len() >= 8 && ["KEY", "SECRET", "TOKEN", "SAS", "PASSWORD"].iter().any(|s| k.contains(s))
            })
            .map(|(_, v)| v.clone())
            .collect();
        if let Some((_, query)) = location.split_once('?') {
            secrets.push(query.to_string());
        }
        // A SAS's one secret is its signature; the rest (version, expiry,
        // permissions) is not worth hiding, and too short to hide safely.
        let signatures: Vec<String> = secrets
            .iter()
            .flat_map(|s| s.trim_start_matches('?').split('&'))
            .filter_map(|pair| pair.strip_prefix("sig="))
            .map(str::to_string)
            .collect();
        secrets.extend(signatures);
        secrets.retain(|s| s.len() >= 8);
        // Longest first, so that a secret containing another goes whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets
    }

    fn azure(&self, target: &AzureTarget) -> object_store::Result<object_store::azure::MicrosoftAzure> {
        let mut builder = MicrosoftAzureBuilder::new();
        for (key, value) in &self.vars {
            if key.starts_with("AZURE_") {
                if let Ok(key) = key.to_ascii_lowercase().parse::<AzureConfigKey>() {
                    builder = builder.with_config(key, value);
                }
            }
        }
        if let Some(endpoint) = self.get("IDENTITY_ENDPOINT") {
            builder = builder.with_msi_endpoint(endpoint);
        }
        if builder.get_config_value(&AzureConfigKey::Client(ClientConfigKey::Timeout)).is_none() {
            builder = builder.with_config(AzureConfigKey::Client(ClientConfigKey::Timeout), REQUEST_TIMEOUT);
        }
        builder = builder.with_container_name(&target.container).with_use_emulator(false);
        if let Some(account) = &target.account {
            builder = builder.with_account(account);
        }
        if let Some(sas) = &target.sas {
            builder = builder.with_config(AzureConfigKey::SasKey, sas);
        }
        // The endpoint was checked (https, or http to loopback) when parsing.
        let endpoint = target.endpoint.as_ref().map(|e| e.as_str().trim_end_matches('/').to_string());
        let http = endpoint.as_deref().is_some_and(|e| e.starts_with("http:"));
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        builder = builder.with_allow_http(http);
        if http {
            // No TLS, so no roots: and a guest has no system store to load
            // them from, which would fail the client's construction.
            builder = builder.with_config(AzureConfigKey::Client(ClientConfigKey::NoSystemCertificates), "true");
        }
        let account = builder.get_config_value(&AzureConfigKey::AccountName);
        let credentials = [AzureConfigKey::AccessKey, AzureConfigKey::SasKey, AzureConfigKey::Token]
            .iter()
            .any(|k| builder.get_config_value(k).is_some_and(|v| !v.is_empty()));
        if !credentials && account.as_deref() == Some(AZURITE_ACCOUNT) {
            builder = builder.with_access_key(AZURITE_KEY);
        }
        builder.build()
    }

    fn s3(&self, bucket: &str) -> object_store::Result<object_store::aws::AmazonS3> {
        let mut builder = AmazonS3Builder::new();
        for (key, value) in &self.vars {
            if key.starts_with("AWS_") {
                if let Ok(key) = key.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                    builder = builder.with_config(key, value);
                }
            }
        }
        if builder.get_config_value(&AmazonS3ConfigKey::Client(ClientConfigKey::Timeout)).is_none() {
            builder = builder.with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), REQUEST_TIMEOUT);
        }
        // The endpoint was checked (https, or http to loopback) when parsing.
        let http = builder.get_config_value(&AmazonS3ConfigKey::Endpoint).is_some_and(|e| e.starts_with("http:"));
        if http {
            builder = builder.with_config(AmazonS3ConfigKey::Client(ClientConfigKey::NoSystemCertificates), "true");
        }
        builder.with_bucket_name(bucket).with_allow_http(http).build()
    }
}

fn truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// The location as messages show it: no user, password, query (a SAS token)
/// or fragment.
fn describe(location: &str) -> String {
    if !location.contains("://") {
        return location.to_string();
    }
    match Url::parse(location) {
        Ok(mut url) => {
            url.set_query(None);
            url.set_fragment(None);
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.to_string()
        }
        Err(_) => {
            let end = location.find(['?', '#']).unwrap_or(location.len());
            let shown = location.get(..end).unwrap_or_default();
            match shown.split_once('@') {
                Some((scheme_user, host)) => {
                    format!("{}://{host}", scheme_user.split_once("://").map(|(s, _)| s).unwrap_or_default())
                }
                None => shown.to_string(),
            }
        }
    }
}

fn build_error(describe: &str, error: &object_store::Error, secrets: &[String]) -> StoreError {
    StoreError::Remote(redact(&format!("{describe}: cannot set up the object store: {error}"), secrets))
}

fn redact(text: &str, secrets: &[String]) -> String {
    let mut text = text.to_string();
    for secret in secrets {
        if !secret.is_empty() {
            text = text.replace(secret.as_str(), "<redacted>");
        }
    }
    // Signed URLs: drop every query string.
    let mut out = String::with_capacity(text.len());
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        match word.split_once("://").and_then(|_| word.split_once('?')) {
            Some((url, _)) => out.push_str(url),
            None => out.push_str(word),
        }
    }
    out
}

/// Which store a location names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Local(PathBuf),
    Azure(AzureTarget),
    S3 { bucket: String, prefix: String },
    Http { base: Url, prefix: String },
}

#[derive(Debug, PartialEq, Eq)]
struct AzureTarget {
    /// From the URL; otherwise the configuration's.
    account: Option<String>,
    container: String,
    prefix: String,
    /// The account's URL when it is not `https://ACCOUNT.blob.core.windows.net`.
    endpoint: Option<Url>,
    /// A SAS token from the URL's query.
    sas: Option<String>,
}

fn bad(location: &str, why: &str) -> StoreError {
    StoreError::Remote(format!("{}: {why}", describe(location)))
}

/// Whether a URL's host is this machine: 127.0.0.0/8, ::1 or localhost.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| IpAddr::V4(v4).is_loopback())
        }
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "localhost" || name.ends_with(".localhost")
        }
        None => false,
    }
}

/// Refuses `http` to anything but loopback; `what` names where the URL came
/// from.
fn check_transport(location: &str, url: &Url, what: &str) -> Result<(), StoreError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if is_loopback(url) => Ok(()),
        "http" => Err(bad(
            location,
            &format!(
                "{what} is plain http to {}, which is not this machine: plain http is allowed only to loopback \
                 (127.0.0.0/8, ::1, localhost), since anyone on the path could read or replace every object and \
                 request; use https",
                url.host_str().unwrap_or("?")
            ),
        )),
        other => Err(bad(location, &format!("{what} has scheme {other:?}; it must be https (or http to loopback)"))),
    }
}

/// The non-empty, percent-decoded segments of a URL's path.
fn segments(location: &str, url: &Url) -> Result<Vec<String>, StoreError> {
    let path = Path::from_url_path(url.path()).map_err(|e| bad(location, &format!("bad path: {e}")))?;
    Ok(path.as_ref().split('/').filter(|s| !s.is_empty()).map(str::to_string).collect())
}

fn join(segments: &[String]) -> String {
    segments.join("/")
}

impl Target {
    fn prefix(&self) -> &str {
        match self {
            Target::Local(_) => "",
            Target::Azure(azure) => &azure.prefix,
            Target::S3 { prefix, .. } | Target::Http { prefix, .. } => prefix,
        }
    }

    fn parse(location: &str, config: &Config) -> Result<Self, StoreError> {
        if !location.contains("://") {
            if location.is_empty() {
                return Err(bad(location, "empty location"));
            }
            return Ok(Target::Local(PathBuf::from(location)));
        }
        let url = Url::parse(location).map_err(|e| bad(location, &format!("not a valid URL: {e}")))?;
        let host = url.host_str().unwrap_or_default().to_string();
        match url.scheme() {
            "file" => {
                if !(host.is_empty() || host == "localhost") {
                    return Err(bad(location, "a file:// URL must name a path on this machine"));
                }
                let path = url.to_file_path().map_err(|()| bad(location, "not a local path"))?;
                Ok(Target::Local(path))
            }
            "az" | "azure" => {
                if host.is_empty() {
                    return Err(bad(location, "no container: write az://CONTAINER/PREFIX"));
                }
                if url.query().is_some() {
                    return Err(bad(
                        location,
                        "a query string is not supported here; put a SAS in AZURE_STORAGE_SAS_KEY",
                    ));
                }
                let prefix = join(&segments(location, &url)?);
                let (account, endpoint) = if config.use_emulator() {
                    let account = config.get("AZURE_STORAGE_ACCOUNT_NAME").unwrap_or(AZURITE_ACCOUNT).to_string();
                    let base = config.get("AZURITE_BLOB_STORAGE_URL").unwrap_or(AZURITE_DEFAULT_URL);
                    let base = Url::parse(base)
                        .map_err(|e| bad(location, &format!("AZURITE_BLOB_STORAGE_URL is not a valid URL: {e}")))?;
                    check_transport(location, &base, "AZURITE_BLOB_STORAGE_URL")?;
                    let endpoint = Url::parse(&format!("{}/{account}", base.as_str().trim_end_matches('/')))
                        .map_err(|e| bad(location, &format!("AZURITE_BLOB_STORAGE_URL: {e}")))?;
                    (Some(account), Some(endpoint))
                } else {
                    (None, Self::configured_endpoint(location, config, "AZURE_STORAGE_ENDPOINT")?)
                };
                Ok(Target::Azure(AzureTarget { account, container: host, prefix, endpoint, sas: None }))
            }
            "s3" => {
                if host.is_empty() {
                    return Err(bad(location, "no bucket: write s3://BUCKET/PREFIX"));
                }
                if url.query().is_some() {
                    return Err(bad(location, "a query string is not supported in an s3:// URL"));
                }
                Self::configured_endpoint(location, config, "AWS_ENDPOINT")?;
                Ok(Target::S3 { bucket: host, prefix: join(&segments(location, &url)?) })
            }
            "http" | "https" => {
                check_transport(location, &url, "the URL")?;
                if !url.username().is_empty() || url.password().is_some() {
                    return Err(bad(location, "credentials in the URL are not supported; use the environment"));
                }
                let segments = segments(location, &url)?;
                let lower = host.to_ascii_lowercase();
                if let Some(account) = lower.strip_suffix(".blob.core.windows.net") {
                    let (container, rest) = match segments.split_first() {
                        Some((container, rest)) => (container.clone(), rest),
                        None => {
                            return Err(bad(
                                location,
                                "no container: write https://ACCOUNT.blob.core.windows.net/CONTAINER/PREFIX",
                            ));
                        }
                    };
                    return Ok(Target::Azure(AzureTarget {
                        account: Some(account.to_string()),
                        container,
                        prefix: join(rest),
                        endpoint: None,
                        sas: url.query().filter(|q| !q.is_empty()).map(str::to_string),
                    }));
                }
                let path_style = segments.first().is_some_and(|first| {
                    first == AZURITE_ACCOUNT || config.get("AZURE_STORAGE_ACCOUNT_NAME") == Some(first.as_str())
                });
                if path_style {
                    let (account, container, rest) = match segments.as_slice() {
                        [account, container, rest @ ..] => (account, container, rest),
                        _ => {
                            return Err(bad(
                                location,
                                "no container: write http://HOST:PORT/ACCOUNT/CONTAINER/PREFIX for a path-style account",
                            ));
                        }
                    };
                    let endpoint = Url::parse(&format!("{}/{account}", url.origin().ascii_serialization()))
                        .map_err(|e| bad(location, &format!("bad endpoint: {e}")))?;
                    return Ok(Target::Azure(AzureTarget {
                        account: Some(account.clone()),
                        container: container.clone(),
                        prefix: join(rest),
                        endpoint: Some(endpoint),
                        sas: url.query().filter(|q| !q.is_empty()).map(str::to_string),
                    }));
                }
                if url.query().is_some() {
                    return Err(bad(location, "a query string is not supported for a plain HTTP store"));
                }
                let base = Url::parse(&url.origin().ascii_serialization())
                    .map_err(|e| bad(location, &format!("bad URL: {e}")))?;
                Ok(Target::Http { base, prefix: join(&segments) })
            }
            other => Err(bad(
                location,
                &format!(
                    "unsupported scheme {other:?}: use a path, file://, az://, azure://, s3://, https:// or http://127.0.0.1"
                ),
            )),
        }
    }

    /// An endpoint variable's URL, checked like the location's own.
    fn configured_endpoint(location: &str, config: &Config, var: &str) -> Result<Option<Url>, StoreError> {
        let Some(value) = config.get(var) else { return Ok(None) };
        let url = Url::parse(value).map_err(|e| bad(location, &format!("{var} is not a valid URL: {e}")))?;
        check_transport(location, &url, var)?;
        Ok(Some(url))
    }
}

/// A [`Store`] over any object store: names are kept under a prefix, and
/// every request runs on the store's own small tokio runtime.
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    /// `a/b` or empty; names are `a/b/NAME`.
    prefix: String,
    describe: String,
    /// Values scrubbed from messages.
    secrets: Vec<String>,
    handle: tokio::runtime::Handle,
    /// Shut down without waiting when dropped: it may be dropped inside
    /// another runtime, where a blocking shutdown panics.
    runtime: Option<tokio::runtime::Runtime>,
    /// The object a writer claimed (see [`Store::claim_writer`]).
    lease: Mutex<Option<Lease>>,
}

/// A writer's hold on the object it replaces to commit.
struct Lease {
    name: String,
    /// The version this writer last wrote or read; `None` while the object
    /// is still to be created.
    version: Option<UpdateVersion>,
    /// The store replaces objects on condition (Azure, S3; not plain HTTP).
    conditional: bool,
}

/// What a PUT came to.
enum Put {
    /// Written; the object's new version, if the store gives one.
    Done(Option<UpdateVersion>),
    /// The store cannot do this kind of PUT (a condition, over plain HTTP).
    Unsupported,
}

/// The version an object's e-tag and version id describe, if there is one.
fn version_of(e_tag: Option<String>, version: Option<String>) -> Option<UpdateVersion> {
    (e_tag.is_some() || version.is_some()).then_some(UpdateVersion { e_tag, version })
}

impl std::fmt::Debug for RemoteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteStore").field("location", &self.describe).finish_non_exhaustive()
    }
}

impl Drop for RemoteStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl RemoteStore {
    /// The objects under `prefix` (`a/b`, or empty for the whole store) in
    /// `store`; `describe` is the location as messages show it, so it must
    /// hold no credentials.
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, describe: impl Into<String>) -> Result<Self, StoreError> {
        let prefix = prefix.trim_matches('/').to_string();
        let describe = describe.into();
        if !prefix.is_empty() {
            Path::parse(&prefix).map_err(|e| StoreError::Remote(format!("{describe}: bad prefix {prefix:?}: {e}")))?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("capsa-encfs-remote")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        Ok(Self {
            store,
            prefix,
            describe,
            secrets: Vec::new(),
            handle,
            runtime: Some(runtime),
            lease: Mutex::new(None),
        })
    }

    fn path(&self, name: &str) -> Result<Path, StoreError> {
        crate::store::check_name(name)?;
        let full = if self.prefix.is_empty() { name.to_string() } else { format!("{}/{name}", self.prefix) };
        Path::parse(full).map_err(|e| StoreError::Remote(format!("{}: bad object name {name:?}: {e}", self.describe)))
    }

    /// Runs `future` on the store's runtime and waits for it, on any thread.
    fn run<T, F>(&self, future: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| StoreError::Remote(format!("{}: the request was abandoned", self.describe)))
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Option<Lease>> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A whole object and its version.
    fn get_versioned(&self, name: &str) -> Result<(Vec<u8>, Option<UpdateVersion>), StoreError> {
        let path = self.path(name)?;
        let store = self.store.clone();
        let got = self.run(async move {
            let result = store.get(&path).await?;
            let version = version_of(result.meta.e_tag.clone(), result.meta.version.clone());
            result.bytes().await.map(|bytes| (bytes.to_vec(), version))
        })?;
        got.map_err(|e| self.error("get", name, e))
    }

    /// One PUT: atomic, and durable once acknowledged. A failed condition
    /// is [`StoreError::WriterPresent`].
    fn put_with(&self, name: &str, bytes: &[u8], mode: PutMode) -> Result<Put, StoreError> {
        let path = self.path(name)?;
        let store = self.store.clone();
        let payload = PutPayload::from(bytes.to_vec());
        let options = PutOptions { mode, ..PutOptions::default() };
        let put = self.run(async move { store.put_opts(&path, payload, options).await })?;
        match put {
            Ok(result) => Ok(Put::Done(version_of(result.e_tag, result.version))),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => {
                Err(StoreError::WriterPresent)
            }
            Err(object_store::Error::NotFound { .. }) => Err(self.missing_container("put", name)),
            Err(object_store::Error::NotImplemented { .. }) => Ok(Put::Unsupported),
            Err(e) => Err(self.error("put", name, e)),
        }
    }

    fn warn_unconditional(&self) {
        tracing::warn!(
            location = %self.describe,
            "this store cannot replace objects on condition: nothing stops a second writer of this image"
        );
    }

    fn error(&self, op: &str, name: &str, error: object_store::Error) -> StoreError {
        match error {
            object_store::Error::NotFound { .. } => StoreError::NotFound,
            error => StoreError::Remote(redact(&format!("{}: {op} {name}: {error}", self.describe), &self.secrets)),
        }
    }

    /// A "not found" from a write or a listing is the container's (or
    /// bucket's): an object that does not exist yet is no error there.
    fn missing_container(&self, op: &str, name: &str) -> StoreError {
        StoreError::Remote(format!(
            "{}: {op} {name}: the container or bucket does not exist (create it first)",
            self.describe
        ))
    }
}

impl Store for RemoteStore {
    fn get(&self, name: &str) -> Result<Vec<u8>, StoreError> {
        let (bytes, version) = self.get_versioned(name)?;
        let lease = self.lease();
        if let Some(lease) = lease.as_ref().filter(|lease| lease.name == name && lease.conditional) {
            // What this writer reads of its lease must be what it last wrote.
            if lease.version.is_some() && version != lease.version {
                return Err(StoreError::WriterPresent);
            }
        }
        Ok(bytes)
    }

    fn get_range(&self, name: &str, range: Range<u64>) -> Result<Vec<u8>, StoreError> {
        let path = self.path(name)?;
        let store = self.store.clone();
        let got = self.run(async move {
            // object_store refuses an empty range and one that starts at or
            // past the end; the trait wants no bytes for both, so a failed
            // read asks the object's size before it gives up.
            if range.start < range.end {
                match store.get_range(&path, range.clone()).await {
                    Ok(bytes) => return Ok(bytes.to_vec()),
                    Err(e @ object_store::Error::NotFound { .. }) => return Err(e),
                    Err(e) => match store.head(&path).await {
                        Ok(meta) if meta.size <= range.start => return Ok(Vec::new()),
                        Err(head @ object_store::Error::NotFound { .. }) => return Err(head),
                        _ => return Err(e),
                    },
                }
            }
            store.head(&path).await.map(|_| Vec::new())
        })?;
        got.map_err(|e| self.error("get range of", name, e))
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let mut lease = self.lease();
        match lease.as_mut().filter(|lease| lease.name == name && lease.conditional) {
            Some(lease) => {
                let mode = match &lease.version {
                    Some(version) => PutMode::Update(version.clone()),
                    None => PutMode::Create,
                };
                match self.put_with(name, bytes, mode)? {
                    Put::Done(Some(version)) => lease.version = Some(version),
                    // Without a version there is nothing to write on
                    // condition of next time.
                    Put::Done(None) => {
                        lease.conditional = false;
                        self.warn_unconditional();
                    }
                    Put::Unsupported => {
                        lease.conditional = false;
                        self.warn_unconditional();
                        self.put_with(name, bytes, PutMode::Overwrite)?;
                    }
                }
                Ok(())
            }
            None => self.put_with(name, bytes, PutMode::Overwrite).map(drop),
        }
    }

    fn claim_writer(&self, lease: &str, creating: bool) -> Result<(), StoreError> {
        let mut claim = Lease { name: lease.to_string(), version: None, conditional: true };
        if !creating {
            // Rewrite the object unchanged, on condition that it is still
            // what was read: whoever held it before can no longer replace it.
            let (bytes, version) = self.get_versioned(lease)?;
            let rewritten = match version {
                Some(version) => self.put_with(lease, &bytes, PutMode::Update(version))?,
                // Nothing to make the rewrite conditional on.
                None => Put::Done(None),
            };
            match rewritten {
                Put::Done(Some(version)) => claim.version = Some(version),
                Put::Done(None) | Put::Unsupported => {
                    self.warn_unconditional();
                    claim.conditional = false;
                }
            }
        }
        *self.lease() = Some(claim);
        Ok(())
    }

    fn size(&self, name: &str) -> Result<u64, StoreError> {
        let path = self.path(name)?;
        let store = self.store.clone();
        let head = self.run(async move { store.head(&path).await })?;
        head.map(|meta| meta.size).map_err(|e| self.error("head", name, e))
    }

    fn delete(&self, name: &str) -> Result<(), StoreError> {
        let path = self.path(name)?;
        let store = self.store.clone();
        match self.run(async move { store.delete(&path).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("delete", name, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        // Like LocalStore: the objects directly in `prefix`'s directory whose
        // names start with it.
        let dir = prefix.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("");
        let full_dir = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, _) => dir.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}/{dir}", self.prefix),
        };
        let listed = if full_dir.is_empty() {
            None
        } else {
            let path = Path::parse(&full_dir)
                .map_err(|e| StoreError::Remote(format!("{}: bad prefix {prefix:?}: {e}", self.describe)))?;
            Some(path)
        };
        let store = self.store.clone();
        let listed = self.run(async move { store.list_with_delimiter(listed.as_ref()).await })?;
        let listed = match listed {
            Ok(listed) => listed,
            Err(object_store::Error::NotFound { .. }) => return Err(self.missing_container("list", prefix)),
            Err(e) => return Err(self.error("list", prefix, e)),
        };
        let strip = if self.prefix.is_empty() { String::new() } else { format!("{}/", self.prefix) };
        let mut names: Vec<String> = listed
            .objects
            .iter()
            .filter_map(|meta| meta.location.as_ref().strip_prefix(strip.as_str()).map(str::to_string))
            .filter(|name| name.starts_with(prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(location: &str, vars: &[(&str, &str)]) -> Result<Target, StoreError> {
        Target::parse(location, &Config::from_vars(vars.iter().copied()))
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn paths_and_file_urls_are_local() {
        assert_eq!(parse("/var/lib/img", &[]).unwrap(), Target::Local("/var/lib/img".into()));
        assert_eq!(parse("rel/img", &[]).unwrap(), Target::Local("rel/img".into()));
        assert_eq!(parse("file:///var/lib/img", &[]).unwrap(), Target::Local("/var/lib/img".into()));
        assert!(parse("file://elsewhere/x", &[]).is_err());
        assert!(parse("", &[]).is_err());
    }

    #[test]
    fn azure_urls() {
        let az = parse("az://data/images/one", &[]).unwrap();
        assert_eq!(
            az,
            Target::Azure(AzureTarget {
                account: None,
                container: "data".into(),
                prefix: "images/one".into(),
                endpoint: None,
                sas: None
            })
        );
        assert_eq!(parse("azure://data", &[]).unwrap().prefix(), "");
        let https = parse("https://acct.blob.core.windows.net/data/img/?sv=2024&sig=abc%2Bdef", &[]).unwrap();
        assert_eq!(
            https,
            Target::Azure(AzureTarget {
                account: Some("acct".into()),
                container: "data".into(),
                prefix: "img".into(),
                endpoint: None,
                sas: Some("sv=2024&sig=abc%2Bdef".into())
            })
        );
        assert!(parse("https://acct.blob.core.windows.net/", &[]).is_err());
        assert!(parse("az:///prefix", &[]).is_err());
    }

    #[test]
    fn azurite_path_style_and_emulator() {
        let t = parse("http://127.0.0.1:10005/devstoreaccount1/box/some/prefix", &[]).unwrap();
        assert_eq!(
            t,
            Target::Azure(AzureTarget {
                account: Some("devstoreaccount1".into()),
                container: "box".into(),
                prefix: "some/prefix".into(),
                endpoint: Some(url("http://127.0.0.1:10005/devstoreaccount1")),
                sas: None
            })
        );
        // Another account is path-style when the configuration names it.
        let other = parse("http://localhost:9/acct2/box", &[("AZURE_STORAGE_ACCOUNT_NAME", "acct2")]).unwrap();
        assert!(matches!(other, Target::Azure(AzureTarget { ref container, .. }) if container == "box"));
        assert!(parse("http://127.0.0.1:10005/devstoreaccount1", &[]).is_err(), "no container");
        // The emulator setting sends az:// to Azurite.
        let vars = [("AZURE_STORAGE_USE_EMULATOR", "true"), ("AZURITE_BLOB_STORAGE_URL", "http://127.0.0.1:12345/")];
        let t = parse("az://box/p", &vars).unwrap();
        assert_eq!(
            t,
            Target::Azure(AzureTarget {
                account: Some("devstoreaccount1".into()),
                container: "box".into(),
                prefix: "p".into(),
                endpoint: Some(url("http://127.0.0.1:12345/devstoreaccount1")),
                sas: None
            })
        );
        let default = parse("az://box/p", &[("AZURE_STORAGE_USE_EMULATOR", "1")]).unwrap();
        assert!(matches!(default, Target::Azure(AzureTarget { endpoint: Some(ref e), .. })
            if e.as_str() == "http://127.0.0.1:10000/devstoreaccount1"));
    }

    #[test]
    fn s3_and_http() {
        assert_eq!(
            parse("s3://bucket/a/b/", &[]).unwrap(),
            Target::S3 { bucket: "bucket".into(), prefix: "a/b".into() }
        );
        assert!(parse("s3:///a", &[]).is_err());
        assert_eq!(
            parse("https://images.example/x/y", &[]).unwrap(),
            Target::Http { base: url("https://images.example"), prefix: "x/y".into() }
        );
        assert_eq!(
            parse("http://[::1]:8080/x", &[]).unwrap(),
            Target::Http { base: url("http://[::1]:8080"), prefix: "x".into() }
        );
        assert!(parse("ftp://host/x", &[]).is_err());
        assert!(parse("https://user:pw@images.example/x", &[]).is_err());
    }

    #[test]
    fn plain_http_only_to_loopback() {
        for ok in ["http://127.0.0.1:1/x", "http://127.8.9.10/x", "http://localhost:80/x", "http://[::1]/x"] {
            assert!(parse(ok, &[]).is_ok(), "{ok}");
        }
        for refused in [
            "http://10.0.0.1/x",
            "http://192.168.1.2:10000/devstoreaccount1/c",
            "http://example.com/x",
            "http://[::2]/x",
            "http://127.0.0.1.example.com/x",
        ] {
            let err = parse(refused, &[]).unwrap_err().to_string();
            assert!(err.contains("loopback"), "{refused}: {err}");
        }
        // Endpoints from the configuration are held to the same rule.
        let err = parse("s3://b/p", &[("AWS_ENDPOINT", "http://10.1.2.3:9000")]).unwrap_err().to_string();
        assert!(err.contains("AWS_ENDPOINT") && err.contains("loopback"), "{err}");
        assert!(parse("s3://b/p", &[("AWS_ENDPOINT", "http://127.0.0.1:9000")]).is_ok());
        let vars = [("AZURE_STORAGE_USE_EMULATOR", "true"), ("AZURITE_BLOB_STORAGE_URL", "http://azurite:10000")];
        assert!(parse("az://box/p", &vars).unwrap_err().to_string().contains("loopback"));
        let err = parse("az://box/p", &[("AZURE_STORAGE_ENDPOINT", "http://10.0.0.9/acct")]).unwrap_err();
        assert!(err.to_string().contains("AZURE_STORAGE_ENDPOINT"));
    }

    #[test]
    fn descriptions_and_errors_hold_no_secrets() {
        assert_eq!(
            describe("https://acct.blob.core.windows.net/c/p?sv=1&sig=SECRETSIG"),
            "https://acct.blob.core.windows.net/c/p"
        );
        assert_eq!(describe("https://u:pw@h/p#frag"), "https://h/p");
        let config = Config::from_vars([("AZURE_STORAGE_ACCOUNT_KEY", "a-very-secret-key"), ("HOME", "/root")]);
        assert!(format!("{config:?}").contains("AZURE_STORAGE_ACCOUNT_KEY"));
        assert!(!format!("{config:?}").contains("a-very-secret-key"));
        assert!(!format!("{config:?}").contains("HOME"), "only the stores' variables are kept");
        let secrets = config.secrets("https://h/p?sig=SECRETSIG");
        let text = redact("failed https://h/p?sig=SECRETSIG with a-very-secret-key and SECRETSIG", &secrets);
        assert!(!text.contains("SECRETSIG") && !text.contains("a-very-secret-key"), "{text}");
        let config = Config::from_vars([("AZURE_STORAGE_SAS_KEY", "sv=2022-11-02&spr=https&sig=ANOTHERSIG")]);
        let text =
            redact("GET https://h/c/p?sv=2022-11-02&sig=ANOTHERSIG: sig ANOTHERSIG", &config.secrets("az://c/p"));
        assert_eq!(text, "GET https://h/c/p sig <redacted>");
    }

    fn memory() -> RemoteStore {
        RemoteStore::new(Arc::new(object_store::memory::InMemory::new()), "img/one", "memory://img/one").unwrap()
    }

    fn exercise(store: &RemoteStore) {
        store.put("manifest", b"hello").unwrap();
        store.put("manifest", b"hello world").unwrap();
        assert_eq!(store.get("manifest").unwrap(), b"hello world");
        store.put_new("chunks/0-1", &[1, 2, 3, 4]).unwrap();
        store.put_new("chunks/0-0", &[9]).unwrap();
        store.put_new("chunks/1-0", &[]).unwrap();
        assert_eq!(store.get_range("chunks/0-1", 1..3).unwrap(), vec![2, 3]);
        assert_eq!(store.get_range("chunks/0-1", 2..10).unwrap(), vec![3, 4]);
        assert_eq!(store.get_range("chunks/0-1", 4..10).unwrap(), Vec::<u8>::new());
        assert_eq!(store.get_range("chunks/0-1", 7..10).unwrap(), Vec::<u8>::new());
        assert_eq!(store.get_range("chunks/0-1", 2..2).unwrap(), Vec::<u8>::new());
        assert_eq!(store.get_range("chunks/1-0", 0..4096).unwrap(), Vec::<u8>::new());
        assert!(matches!(store.get_range("chunks/9-9", 0..1), Err(StoreError::NotFound)));
        assert!(matches!(store.get_range("chunks/9-9", 0..0), Err(StoreError::NotFound)));
        assert!(matches!(store.get("chunks/9-9"), Err(StoreError::NotFound)));
        assert_eq!(store.list("chunks/").unwrap(), vec!["chunks/0-0", "chunks/0-1", "chunks/1-0"]);
        assert_eq!(store.list("chunks/0-").unwrap(), vec!["chunks/0-0", "chunks/0-1"]);
        assert_eq!(store.list("").unwrap(), vec!["manifest"]);
        assert_eq!(store.list("nothing/").unwrap(), Vec::<String>::new());
        store.sync().unwrap();
        store.delete("chunks/0-1").unwrap();
        store.delete("chunks/0-1").unwrap();
        assert!(matches!(store.get_range("chunks/0-1", 0..1), Err(StoreError::NotFound)));
        assert!(store.get("../escape").is_err());
        assert!(store.put("a//b", b"").is_err());
    }

    #[test]
    fn semantics_over_an_in_memory_store() {
        let store = memory();
        exercise(&store);
        assert_eq!(store.describe(), "memory://img/one");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn works_from_inside_another_runtime() {
        let store = Arc::new(memory());
        let s = store.clone();
        tokio::task::spawn_blocking(move || exercise(&s)).await.unwrap();
        // Dropped inside the runtime: must not panic.
        drop(store);
    }

    #[tokio::test]
    async fn works_from_a_current_thread_runtime_blocking_task() {
        let store = memory();
        let store = tokio::task::spawn_blocking(move || {
            store.put("manifest", b"x").unwrap();
            store
        })
        .await
        .unwrap();
        drop(store);
    }
}
