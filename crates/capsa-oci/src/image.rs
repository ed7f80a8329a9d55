//! Resolve an image reference to digests: the manifest, the config and, for
//! every layer, its compressed digest and its `diff_id` (the SHA-256 of the
//! uncompressed tar), which is what execution policies pin.
//!
//! Images come from a registry (the default), a local OCI layout directory,
//! an oci-archive (a tar of such a layout) or a docker-archive (`docker save`
//! format); see [`ImageSource`]. Multi-platform indexes (OCI image indexes and
//! Docker manifest lists) are narrowed to one platform, `linux/amd64` unless
//! [`ResolveOptions::platform`] says otherwise.
//!
//! # Trust
//!
//! Every byte is checked before it is believed: manifests and configs against
//! the digest that named them, layers against their compressed digest while
//! they stream in, and each layer's `diff_id` against the config's
//! `rootfs.diff_ids`. A mismatch is an error naming the layer and both values.
//!
//! Registries are reached over HTTPS, except loopback registries (`localhost`,
//! `127.0.0.0/8`, `::1`) and those listed in
//! [`ResolveOptions::insecure_registries`], which use plain HTTP; see
//! [`registry_transport`]. Credentials come from the Docker client's
//! `config.json` (`auths` entries; credential helpers are not run).
//!
//! # Cache
//!
//! Hashing a layer means downloading and decompressing it, so results are
//! cached under [`ResolveOptions::cache_dir`] (default
//! `$XDG_CACHE_HOME/capsa/layers`, else `~/.cache/capsa/layers`):
//!
//! ```text
//! <cache>/sha256/<hex>.json        one layer, keyed by its compressed digest:
//!                                  {"diff_id", "size", "media_type"}
//! <cache>/blobs/sha256/<hex>       manifests, indexes and configs, and the
//!                                  layer blobs [`layer_blob`] fetched or
//!                                  extracted: content-addressed, re-verified
//!                                  on every read
//! <cache>/refs/<sha256(ref)>.json  the last digest a reference resolved to
//! ```
//!
//! Every file is written atomically (temporary file, fsync, rename). A second
//! resolution of an image downloads no layer. A reference pinned by digest
//! (`name@sha256:...`) whose manifest, config and layers are cached is served
//! without contacting the registry at all; a tag is looked up in the registry
//! and, when the registry cannot be reached (or with
//! [`ResolveOptions::offline`]), served from its last cached resolution with a
//! warning. [`ResolvedImage::origin`] says which happened.
//!
//! # Layer blobs
//!
//! Resolution streams layers past a hasher and keeps none of them. A
//! sandbox needs the blobs themselves: [`layer_blob`] gives the path of a
//! local file holding exactly one layer's stored (compressed) bytes, checked
//! against its digest (see there for where each source's files come from).
//!
//! # Example
//!
//! ```no_run
//! use capsa_oci::image::{resolve_blocking, ImageSource, ResolveOptions};
//!
//! let image = resolve_blocking("busybox:latest", &ImageSource::Registry, &ResolveOptions::default())?;
//! for layer in &image.layers {
//!     println!("{} {}", layer.digest, layer.diff_id);
//! }
//! # Ok::<(), capsa_oci::image::ImageError>(())
//! ```

mod archive;
mod auth;
mod blob;
mod cache;
mod hash;
mod layout;
mod manifest;
mod registry;
mod resolve;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use registry::{Transport, registry_transport};

/// Where to look for an image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageSource {
    /// A registry, named by the reference itself (`docker.io` when it names
    /// none).
    #[default]
    Registry,
    /// A local OCI image layout directory (`oci-layout`, `index.json`,
    /// `blobs/`); the image is found by its `org.opencontainers.image.ref.name`
    /// annotation, which may hold a full reference or a tag alone.
    OciLayout(PathBuf),
    /// A tar archive of an OCI image layout (`skopeo copy ... oci-archive:`).
    OciArchive(PathBuf),
    /// A `docker save` archive (`manifest.json` with `Config`, `RepoTags`,
    /// `Layers`), or a directory holding one unpacked. Such archives carry no
    /// registry manifest: [`ResolvedImage::manifest_digest`] is then the digest
    /// of a Docker v2 manifest synthesized from the archive's config and layers.
    DockerArchive(PathBuf),
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Registry => f.write_str("registry"),
            Self::OciLayout(p) => write!(f, "OCI layout {}", p.display()),
            Self::OciArchive(p) => write!(f, "oci-archive {}", p.display()),
            Self::DockerArchive(p) => write!(f, "docker-archive {}", p.display()),
        }
    }
}

/// An image platform: operating system, CPU architecture and optional variant,
/// spelled as in OCI indexes (`linux/amd64`, `linux/arm64/v8`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// The operating system, e.g. `linux`.
    pub os: String,
    /// The CPU architecture in Go's spelling, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// The CPU variant, e.g. `v8` for `arm64` or `v7` for `arm`.
    pub variant: Option<String>,
}

impl Platform {
    /// `linux/amd64`, the platform of the confidential VMs capsa launches.
    pub fn linux_amd64() -> Self {
        Self { os: "linux".into(), architecture: "amd64".into(), variant: None }
    }
}

impl Default for Platform {
    fn default() -> Self {
        Self::linux_amd64()
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = ImageError;

    /// Parses `os/architecture[/variant]`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ImageError::InvalidPlatform { platform: s.to_owned() };
        let mut parts = s.split('/');
        let os = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let architecture = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let variant = match parts.next() {
            Some("") => return Err(bad()),
            v => v.map(str::to_owned),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self { os: os.to_owned(), architecture: architecture.to_owned(), variant })
    }
}

/// How to resolve: platform, registry access, cache and progress display.
#[derive(Debug, Clone, Default)]
pub struct ResolveOptions {
    /// The platform to select from multi-platform indexes (`linux/amd64` by
    /// default).
    pub platform: Platform,
    /// Registries (`host` or `host:port`) that may be reached over plain HTTP.
    /// Loopback registries always may; every other registry needs HTTPS.
    pub insecure_registries: Vec<String>,
    /// The Docker client configuration holding registry credentials; `None`
    /// means `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// The cache directory; `None` means [`default_cache_dir`].
    pub cache_dir: Option<PathBuf>,
    /// Show progress bars for downloads and hashing (only when stderr is a
    /// terminal).
    pub progress: bool,
    /// Never contact a registry: resolve registry references from the cache
    /// only.
    pub offline: bool,
}

/// The default cache directory: `$XDG_CACHE_HOME/capsa/layers`, else
/// `$HOME/.cache/capsa/layers`; `None` when neither variable is set.
pub fn default_cache_dir() -> Option<PathBuf> {
    let xdg = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).filter(|p| p.is_absolute());
    let base = match xdg {
        Some(p) => p,
        None => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(".cache"),
    };
    Some(base.join("capsa").join("layers"))
}

/// The process-level settings of an image config (`config` in the OCI image
/// config; `Config` in Docker's), as a policy needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    /// `Entrypoint`; empty when unset.
    pub entrypoint: Vec<String>,
    /// `Cmd`; empty when unset.
    pub cmd: Vec<String>,
    /// `Env`, `NAME=value` strings in config order.
    pub env: Vec<String>,
    /// `WorkingDir`; empty when unset.
    pub working_dir: String,
    /// `User` exactly as written in the config (`name`, `uid`, `uid:gid`, ...);
    /// empty when unset.
    pub user: String,
}

/// One layer of a resolved image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The digest of the blob as stored (compressed), `sha256:<hex>`.
    pub digest: String,
    /// The digest of the uncompressed tar, `sha256:<hex>`, checked against the
    /// config's `rootfs.diff_ids`.
    pub diff_id: String,
    /// The size of the stored (compressed) blob in bytes.
    pub size: u64,
    /// The layer's media type, e.g. `application/vnd.oci.image.layer.v1.tar+gzip`.
    pub media_type: String,
}

/// Why a registry image was resolved from the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheReason {
    /// [`ResolveOptions::offline`] was set.
    Offline,
    /// The reference names a digest, and everything it needs was cached.
    PinnedDigest,
    /// The registry could not be reached; the reference's last cached
    /// resolution was used.
    RegistryUnreachable {
        /// What went wrong reaching the registry.
        detail: String,
    },
}

/// Where a [`ResolvedImage`]'s manifest came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ManifestOrigin {
    /// Fetched from the registry just now.
    Registry,
    /// Read from the cache instead of the registry.
    Cache(CacheReason),
    /// Read from a local OCI layout or oci-archive.
    Layout,
    /// Synthesized from a docker-archive, which has no manifest of its own.
    DockerArchive,
}

/// What a resolution did: where the manifest came from and how much work the
/// layers took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveReport {
    /// Where the manifest came from.
    pub origin: ManifestOrigin,
    /// Layer blobs downloaded from a registry.
    pub layers_downloaded: usize,
    /// Layers decompressed and hashed to compute their `diff_id`.
    pub layers_hashed: usize,
    /// Layers whose `diff_id` came from the cache.
    pub layers_from_cache: usize,
    /// Bytes downloaded from the registry (manifests, config and layers).
    pub bytes_downloaded: u64,
}

/// An image resolved to digests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedImage {
    /// The reference as given.
    pub reference: String,
    /// The digest of the selected image manifest: for a multi-platform index,
    /// the platform manifest's digest (the index's is in `index_digest`).
    pub manifest_digest: String,
    /// The manifest's media type.
    pub manifest_media_type: String,
    /// The digest of the index (or manifest list) the manifest was selected
    /// from, if any.
    pub index_digest: Option<String>,
    /// The digest of the image config blob.
    pub config_digest: String,
    /// The platform the config declares.
    pub platform: Platform,
    /// The config's process settings.
    pub config: ImageConfig,
    /// The layers, bottom first.
    pub layers: Vec<Layer>,
    /// What the resolution did.
    pub report: ResolveReport,
}

/// Why an image could not be resolved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it does not parse.
        reason: String,
    },
    /// A platform string does not parse.
    #[error("invalid platform {platform:?}: expected os/architecture[/variant], e.g. linux/amd64")]
    InvalidPlatform {
        /// The platform as given.
        platform: String,
    },
    /// The registry could not be reached and nothing usable was cached.
    #[error("registry {registry} {detail}: is it running and reachable? ({note})")]
    RegistryUnreachable {
        /// The registry host.
        registry: String,
        /// The reference being resolved.
        reference: String,
        /// What happened, e.g. "refused the connection".
        detail: String,
        /// Context: that no cached resolution could stand in, or what was
        /// being fetched when the registry went away.
        note: String,
    },
    /// The registry refused access.
    #[error(
        "registry {registry} denied access to {reference}: {detail}: log in (docker login {registry}) or check the name"
    )]
    RegistryDenied {
        /// The registry host.
        registry: String,
        /// The reference being resolved.
        reference: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry does not have the manifest or blob.
    #[error("registry {registry} has no {what} for {reference}: {detail}: check the name and tag")]
    RegistryNotFound {
        /// The registry host.
        registry: String,
        /// The reference being resolved.
        reference: String,
        /// What was asked for (manifest, config, layer ...).
        what: String,
        /// What the registry said.
        detail: String,
    },
    /// Any other registry failure.
    #[error("registry {registry} failed to serve {what} of {reference}: {detail}")]
    Registry {
        /// The registry host.
        registry: String,
        /// The reference being resolved.
        reference: String,
        /// What was asked for.
        what: String,
        /// What went wrong.
        detail: String,
    },
    /// Offline (or with the registry unreachable), and the cache does not
    /// hold what is needed.
    #[error(
        "{reference} cannot be resolved from the cache in {}: {what} is not cached; resolve it once with the registry reachable", .cache.display()
    )]
    NotCached {
        /// The reference being resolved.
        reference: String,
        /// The cache directory.
        cache: PathBuf,
        /// What is missing.
        what: String,
    },
    /// No cache directory is configured or derivable while one is needed.
    #[error("{reference} cannot be resolved offline: no cache directory (set XDG_CACHE_HOME or HOME, or give one)")]
    NoCache {
        /// The reference being resolved.
        reference: String,
    },
    /// A multi-platform index has no manifest for the requested platform.
    #[error("{reference} has no image for {platform}; it has {}: choose one of those", .available.join(", "))]
    PlatformNotFound {
        /// The reference being resolved.
        reference: String,
        /// The requested platform.
        platform: String,
        /// The platforms the index offers.
        available: Vec<String>,
    },
    /// Content does not hash to the digest that names it.
    #[error(
        "{what} of {reference} does not match its digest: expected {expected}, got {actual}: the image is corrupt or was tampered with"
    )]
    DigestMismatch {
        /// The reference being resolved.
        reference: String,
        /// Which object (e.g. "layer 2", "config", "manifest").
        what: String,
        /// The digest it should have.
        expected: String,
        /// The digest it has.
        actual: String,
    },
    /// Content has another size than its descriptor says.
    #[error(
        "{what} of {reference} is {actual} bytes but its descriptor says {expected}: the image is corrupt or was tampered with"
    )]
    SizeMismatch {
        /// The reference being resolved.
        reference: String,
        /// Which object.
        what: String,
        /// The size the descriptor gives.
        expected: u64,
        /// The size found (or at least found, when it is too long).
        actual: u64,
    },
    /// A layer's uncompressed digest differs from the config's `diff_ids`.
    #[error(
        "layer {index} ({digest}) of {reference} has diff_id {actual} but the image config says {expected}: the layer or the config was tampered with"
    )]
    DiffIdMismatch {
        /// The reference being resolved.
        reference: String,
        /// The layer's index, bottom layer 0.
        index: usize,
        /// The layer's compressed digest.
        digest: String,
        /// The `diff_id` in the config.
        expected: String,
        /// The `diff_id` computed from the layer.
        actual: String,
    },
    /// The manifest and the config disagree on the number of layers.
    #[error("{reference}: the manifest has {layers} layers but the config's rootfs.diff_ids has {diff_ids}")]
    LayerCountMismatch {
        /// The reference being resolved.
        reference: String,
        /// Layers in the manifest.
        layers: usize,
        /// Entries in `rootfs.diff_ids`.
        diff_ids: usize,
    },
    /// A layer does not decompress.
    #[error("layer {index} ({digest}) of {reference} does not decompress as {media_type}: {reason}")]
    LayerDecode {
        /// The reference being resolved.
        reference: String,
        /// The layer's index, bottom layer 0.
        index: usize,
        /// The layer's compressed digest.
        digest: String,
        /// The media type it was decoded as.
        media_type: String,
        /// The decoder's complaint.
        reason: String,
    },
    /// A manifest, index, config or archive index is malformed.
    #[error("invalid {what} in {reference}: {reason}")]
    Malformed {
        /// The reference being resolved.
        reference: String,
        /// Which document.
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Something valid but not supported (a media type, a digest algorithm,
    /// Docker schema 1 ...).
    #[error("unsupported {what} in {reference}: {value}")]
    Unsupported {
        /// The reference being resolved.
        reference: String,
        /// What kind of thing.
        what: String,
        /// The value found.
        value: String,
    },
    /// A document exceeds its size limit.
    #[error("{what} of {reference} exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The reference being resolved.
        reference: String,
        /// Which document.
        what: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// A local layout or archive does not hold the image.
    #[error("{reference} is not in {source_desc}; it has {}", if .available.is_empty() { "no named images".to_owned() } else { .available.join(", ") })]
    NotInLocalSource {
        /// The reference being resolved.
        reference: String,
        /// The layout or archive.
        source_desc: String,
        /// The names it does hold.
        available: Vec<String>,
    },
    /// A local layout or archive is malformed or lacks a file.
    #[error("{source_desc} is not a valid {kind}: {reason}")]
    InvalidLocalSource {
        /// The layout or archive.
        source_desc: String,
        /// What it should be ("OCI layout", "docker-archive").
        kind: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading a file failed.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        #[source]
        source: std::io::Error,
    },
    /// The Docker client configuration is unreadable or malformed.
    #[error("docker config {}: {reason}; fix it or point docker_config elsewhere", .path.display())]
    DockerConfig {
        /// The configuration file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Offline, and a layer blob is not in the cache.
    #[error(
        "layer blob {digest} of {reference} is not available offline: {detail} (cache {}); fetch it once with the registry reachable", .cache.display()
    )]
    BlobNotCached {
        /// The reference the layer belongs to.
        reference: String,
        /// The layer's (compressed) digest.
        digest: String,
        /// The cache directory.
        cache: PathBuf,
        /// Why it is not there: never fetched, or the cached copy is wrong.
        detail: String,
    },
    /// A layer blob must be stored in the cache, and there is none.
    #[error(
        "no cache directory to store layer blob {digest} of {reference} in: set XDG_CACHE_HOME or HOME, or give a cache directory"
    )]
    NoBlobCache {
        /// The reference the layer belongs to.
        reference: String,
        /// The layer's (compressed) digest.
        digest: String,
    },
    /// The image in a docker-archive has no layer with the diff_id asked for.
    #[error(
        "{reference} in {source_desc} has no layer {digest} (diff_id {diff_id}): resolve the image again and use one of its layers"
    )]
    LayerNotInImage {
        /// The reference being resolved.
        reference: String,
        /// The archive.
        source_desc: String,
        /// The layer's (compressed) digest.
        digest: String,
        /// The layer's diff_id.
        diff_id: String,
    },
    /// The tokio runtime for [`resolve_blocking`] or [`layer_blob_blocking`]
    /// could not be built.
    #[error("cannot start an async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// A bug in capsa-oci.
    #[error("internal error in capsa-oci (a bug): {0}")]
    Internal(String),
}

/// Resolves `reference` from `source`: selects the platform manifest, checks
/// every digest, computes every layer's `diff_id` (or takes it from the
/// cache) and checks it against the config.
///
/// For [`ImageSource::Registry`] the reference names the registry; for local
/// sources it selects the image inside the layout or archive (a full
/// reference, a tag alone, or `name@sha256:...`).
pub async fn resolve(
    reference: &str,
    source: &ImageSource,
    opts: &ResolveOptions,
) -> Result<ResolvedImage, ImageError> {
    match source {
        ImageSource::Registry => resolve::resolve_registry(reference, opts).await,
        local => {
            // Local sources do synchronous file I/O and decompression: keep
            // it off tokio's async worker threads when there are some.
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                return resolve::resolve_local(reference, local, opts).await;
            };
            let (reference, local, opts) = (reference.to_owned(), local.clone(), opts.clone());
            tokio::task::spawn_blocking(move || handle.block_on(resolve::resolve_local(&reference, &local, &opts)))
                .await
                .map_err(|e| ImageError::Internal(format!("local resolution task failed: {e}")))?
        }
    }
}

/// [`resolve`] for callers without an async runtime: builds a current-thread
/// tokio runtime and blocks on it. Must not be called from within a runtime.
pub fn resolve_blocking(
    reference: &str,
    source: &ImageSource,
    opts: &ResolveOptions,
) -> Result<ResolvedImage, ImageError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ImageError::Runtime)?;
    runtime.block_on(resolve(reference, source, opts))
}

/// The path of a local file holding exactly the stored (compressed) bytes
/// of `layer`, a layer [`resolve`] returned for `reference` from `source`:
/// the file's size is `layer.size` and its SHA-256 is `layer.digest`,
/// checked by this call.
///
/// - [`ImageSource::Registry`]: `<cache>/blobs/sha256/<hex>`. A cached copy
///   is re-hashed and used; otherwise the blob is downloaded from the
///   reference's repository, hashed while it streams to a temporary file in
///   the cache, and renamed into place only once it matches (fsynced
///   first). A wrong cached copy is fetched again, and replaced. With
///   [`ResolveOptions::offline`] only the cache is used, and a missing blob
///   is [`ImageError::BlobNotCached`].
/// - [`ImageSource::OciLayout`] and a docker-archive unpacked in a
///   directory: the blob file in the directory itself, after checking its
///   size and digest. Nothing is copied; a change to the file after this
///   check is caught in the sandbox, which checks every layer's diff_id
///   against the policy as it unpacks.
/// - [`ImageSource::OciArchive`] and a docker-archive tar: extracted, checked
///   on the way, into `<cache>/blobs/sha256/<hex>`, as for a registry.
///
/// Nothing partial is ever left at a returned path or in the cache: a failed
/// or cancelled copy removes its temporary file. `reference` names the
/// repository for a registry and the image for a docker-archive (which names
/// layers by path: the layer is found by its diff_id), and appears in errors.
pub async fn layer_blob(
    reference: &str,
    source: &ImageSource,
    opts: &ResolveOptions,
    layer: &Layer,
) -> Result<PathBuf, ImageError> {
    blob::layer_blob(reference, source, opts, layer).await
}

/// [`layer_blob`] for callers without an async runtime: builds a
/// current-thread tokio runtime and blocks on it. Must not be called from
/// within a runtime.
pub fn layer_blob_blocking(
    reference: &str,
    source: &ImageSource,
    opts: &ResolveOptions,
    layer: &Layer,
) -> Result<PathBuf, ImageError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ImageError::Runtime)?;
    runtime.block_on(layer_blob(reference, source, opts, layer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_parses_and_prints() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.os, "linux");
        assert_eq!(p.architecture, "arm64");
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        for bad in ["", "linux", "linux/", "/amd64", "linux/amd64/", "a/b/c/d"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    /// The futures can be spawned on a multi-threaded runtime.
    #[test]
    fn futures_are_send() {
        fn send<T: Send>(_: T) {}
        let (source, opts) = (ImageSource::Registry, ResolveOptions::default());
        let layer = Layer { digest: String::new(), diff_id: String::new(), size: 0, media_type: String::new() };
        send(resolve("r", &source, &opts));
        send(layer_blob("r", &source, &opts, &layer));
    }

    #[test]
    fn default_cache_dir_follows_xdg() {
        // Only checks the shape: the environment belongs to the test runner.
        if let Some(dir) = default_cache_dir() {
            assert!(dir.ends_with("capsa/layers"));
        }
    }
}
