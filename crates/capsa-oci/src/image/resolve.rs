//! The resolution itself, shared by every source: walk from the top-level
//! manifest (or index) to the platform manifest, fetch and parse the config,
//! hash the layers, check them against the config.

use std::io::{self, Read};
use std::path::PathBuf;

use oci_client::Reference;

use super::archive::{self, TarTree};
use super::cache::{Cache, LayerRecord};
use super::hash::{Compression, HashFailure, LayerHasher, LimitedBuf, Progress};
use super::layout::{self, DirTree, Start, Tree};
use super::manifest::{
    self, DOCKER_LAYER_GZIP, DOCKER_LAYER_TAR, Descriptor, Digest, MAX_CONFIG_BYTES, MAX_INDEX_DEPTH,
    MAX_MANIFEST_BYTES, OCI_LAYER_ZSTD, Parsed,
};
use super::registry::RegistryClient;
use super::{
    CacheReason, ImageError, ImageSource, Layer, ManifestOrigin, ResolveOptions, ResolveReport, ResolvedImage,
    default_cache_dir,
};

/// Where blobs come from.
enum Provider<'a> {
    /// A registry; `client: None` means from the cache only.
    Registry { client: Option<&'a RegistryClient>, reference: &'a Reference },
    /// A local layout.
    Layout { tree: &'a dyn Tree },
}

/// What is missing when a tag was never resolved with this cache.
const NO_RESOLUTION: &str = "its last resolution";

/// The kinds of small blobs, which registries serve from different endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Small {
    /// A manifest or index (`/v2/<name>/manifests/<digest>`).
    Manifest,
    /// A config (`/v2/<name>/blobs/<digest>`).
    Config,
}

/// One resolution in progress.
struct Run<'a> {
    reference: &'a str,
    opts: &'a ResolveOptions,
    cache: Option<Cache>,
    progress: Progress,
    report: ResolveReport,
    provider: Provider<'a>,
}

fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> ImageError {
    let path = path.into();
    move |source| ImageError::Io { path, source }
}

impl<'a> Run<'a> {
    fn new(reference: &'a str, opts: &'a ResolveOptions, provider: Provider<'a>, origin: ManifestOrigin) -> Self {
        let cache = opts.cache_dir.clone().or_else(default_cache_dir).map(Cache::new);
        Self {
            reference,
            opts,
            cache,
            progress: Progress::new(opts.progress),
            report: ResolveReport {
                origin,
                layers_downloaded: 0,
                layers_hashed: 0,
                layers_from_cache: 0,
                bytes_downloaded: 0,
            },
            provider,
        }
    }

    fn not_cached(&self, what: String) -> ImageError {
        match &self.cache {
            Some(c) => {
                ImageError::NotCached { reference: self.reference.to_owned(), cache: c.root().to_path_buf(), what }
            }
            None => ImageError::NoCache { reference: self.reference.to_owned() },
        }
    }

    fn check_size(&self, what: &str, expected: Option<u64>, actual: u64) -> Result<(), ImageError> {
        match expected {
            Some(expected) if expected != actual => Err(ImageError::SizeMismatch {
                reference: self.reference.to_owned(),
                what: what.to_owned(),
                expected,
                actual,
            }),
            _ => Ok(()),
        }
    }

    fn check_digest(&self, what: &str, expected: &Digest, actual: &Digest) -> Result<(), ImageError> {
        if expected == actual {
            Ok(())
        } else {
            Err(ImageError::DigestMismatch {
                reference: self.reference.to_owned(),
                what: what.to_owned(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            })
        }
    }

    /// A small blob (manifest, index, config) by digest, verified.
    async fn small_blob(
        &mut self,
        kind: Small,
        digest: &Digest,
        size: Option<u64>,
        what: &str,
    ) -> Result<Vec<u8>, ImageError> {
        let limit = match kind {
            Small::Manifest => MAX_MANIFEST_BYTES,
            Small::Config => MAX_CONFIG_BYTES,
        };
        if size.is_some_and(|s| s > limit) {
            return Err(ImageError::TooLarge { reference: self.reference.to_owned(), what: what.to_owned(), limit });
        }
        let bytes = match &self.provider {
            Provider::Layout { tree } => layout::read_small(*tree, &layout::blob_path(digest), limit, self.reference)?
                .ok_or_else(|| ImageError::InvalidLocalSource {
                    source_desc: tree.describe(),
                    kind: "OCI image layout".into(),
                    reason: format!("{what} {digest} is missing from blobs/"),
                })?,
            Provider::Registry { client, reference } => {
                if let Some(bytes) = self.cache.as_ref().and_then(|c| c.blob(digest, limit)) {
                    tracing::debug!(%digest, what, "from cache");
                    bytes
                } else {
                    let Some(client) = client else {
                        return Err(self.not_cached(format!("{what} {digest}")));
                    };
                    let bytes = if kind == Small::Manifest {
                        let r = reference.clone_with_digest(digest.to_string());
                        let (bytes, _) = client
                            .manifest(&r)
                            .await
                            .map_err(|f| f.into_error(&client.registry, self.reference, what))?;
                        bytes
                    } else {
                        let mut buf = LimitedBuf::new(limit);
                        if let Err(f) = client.blob(reference, digest, &mut buf).await {
                            if buf.overflowed {
                                return Err(ImageError::TooLarge {
                                    reference: self.reference.to_owned(),
                                    what: what.to_owned(),
                                    limit,
                                });
                            }
                            return Err(f.into_error(&client.registry, self.reference, what));
                        }
                        buf.bytes
                    };
                    self.report.bytes_downloaded = self.report.bytes_downloaded.saturating_add(bytes.len() as u64);
                    self.check_digest(what, digest, &Digest::of(&bytes))?;
                    if let Some(c) = &self.cache {
                        c.put_blob(digest, &bytes);
                    }
                    bytes
                }
            }
        };
        self.check_digest(what, digest, &Digest::of(&bytes))?;
        self.check_size(what, size, bytes.len() as u64)?;
        Ok(bytes)
    }

    /// The cached record of a layer, if it fits the descriptor.
    fn cached_layer(&self, digest: &Digest, desc: &Descriptor, compression: Compression) -> Option<LayerRecord> {
        let record = self.cache.as_ref()?.layer(digest)?;
        let same_decoding = Compression::from_media_type(&record.media_type) == Some(compression);
        (record.size == desc.size && same_decoding).then_some(record)
    }

    fn too_long(&self, failure: HashFailure, index: usize, digest: &Digest) -> ImageError {
        let HashFailure::TooLong { limit } = failure;
        ImageError::SizeMismatch {
            reference: self.reference.to_owned(),
            what: format!("layer {index} ({digest})"),
            expected: limit,
            actual: limit.saturating_add(1),
        }
    }

    /// Hashes one layer (or takes its diff_id from the cache) and checks it.
    async fn layer(&mut self, index: usize, desc: &Descriptor) -> Result<Layer, ImageError> {
        let what = format!("layer {index}");
        let digest = desc.digest(self.reference, &what)?;
        let compression = Compression::from_media_type(&desc.media_type).ok_or_else(|| ImageError::Unsupported {
            reference: self.reference.to_owned(),
            what: format!("media type of {what} ({digest})"),
            value: desc.media_type.clone(),
        })?;
        let cached = self.cached_layer(&digest, desc, compression);
        let label = format!("layer {index} {}", digest.hex().get(..12).unwrap_or_default());

        let digests = match &self.provider {
            Provider::Registry { client, reference } => {
                if let Some(record) = cached {
                    self.report.layers_from_cache += 1;
                    return Ok(Layer {
                        digest: digest.to_string(),
                        diff_id: record.diff_id,
                        size: desc.size,
                        media_type: desc.media_type.clone(),
                    });
                }
                let Some(client) = client else {
                    return Err(self.not_cached(format!("the diff_id of {what} ({digest})")));
                };
                let bar = self.progress.bar(desc.size, format!("downloading {label}"));
                let mut hasher = LayerHasher::new(Some(compression), desc.size, bar)
                    .map_err(|e| ImageError::Internal(e.to_string()))?;
                tracing::info!(%digest, size = desc.size, "downloading {what} of {}", self.reference);
                if let Err(f) = client.blob(reference, &digest, &mut hasher).await {
                    if let Some(failure) = hasher.failure().cloned() {
                        return Err(self.too_long(failure, index, &digest));
                    }
                    return Err(f.into_error(&client.registry, self.reference, &format!("{what} ({digest})")));
                }
                let digests = hasher.finish().map_err(|f| self.too_long(f, index, &digest))?;
                self.report.layers_downloaded += 1;
                self.report.layers_hashed += 1;
                self.report.bytes_downloaded = self.report.bytes_downloaded.saturating_add(digests.size);
                digests
            }
            Provider::Layout { tree } => {
                let path = layout::blob_path(&digest);
                let Some((mut reader, size)) =
                    tree.open(&path).map_err(io_error(format!("{}: {path}", tree.describe())))?
                else {
                    return Err(ImageError::InvalidLocalSource {
                        source_desc: tree.describe(),
                        kind: "OCI image layout".into(),
                        reason: format!("{what} {digest} is missing from blobs/"),
                    });
                };
                self.check_size(&format!("{what} ({digest})"), Some(desc.size), size)?;
                // The blob is always re-hashed (it is local, and could have
                // changed); only decompression is skipped when cached.
                let mode = if cached.is_some() { None } else { Some(compression) };
                let bar = self.progress.bar(size, format!("hashing {label}"));
                let mut hasher =
                    LayerHasher::new(mode, desc.size, bar).map_err(|e| ImageError::Internal(e.to_string()))?;
                if let Err(e) = io::copy(&mut reader, &mut hasher) {
                    if let Some(failure) = hasher.failure().cloned() {
                        return Err(self.too_long(failure, index, &digest));
                    }
                    return Err(io_error(format!("{}: {path}", tree.describe()))(e));
                }
                let digests = hasher.finish().map_err(|f| self.too_long(f, index, &digest))?;
                if cached.is_none() {
                    self.report.layers_hashed += 1;
                }
                digests
            }
        };
        self.check_digest(&what, &digest, &digests.digest)?;
        self.check_size(&format!("{what} ({digest})"), Some(desc.size), digests.size)?;
        if let Some(reason) = digests.decode_error {
            return Err(ImageError::LayerDecode {
                reference: self.reference.to_owned(),
                index,
                digest: digest.to_string(),
                media_type: desc.media_type.clone(),
                reason,
            });
        }
        let diff_id = match (digests.diff_id, cached) {
            (Some(d), _) => {
                if let Some(c) = &self.cache {
                    c.put_layer(
                        &digest,
                        &LayerRecord { diff_id: d.to_string(), size: desc.size, media_type: desc.media_type.clone() },
                    );
                }
                d.to_string()
            }
            (None, Some(record)) => {
                self.report.layers_from_cache += 1;
                record.diff_id
            }
            (None, None) => return Err(ImageError::Internal("layer hashed without a diff_id".into())),
        };
        Ok(Layer { digest: digest.to_string(), diff_id, size: desc.size, media_type: desc.media_type.clone() })
    }

    /// Resolves from the top-level manifest or index.
    async fn resolve_from(&mut self, top: Start, top_bytes: Option<Vec<u8>>) -> Result<ResolvedImage, ImageError> {
        let want = self.opts.platform.clone();
        let mut index_digest: Option<Digest> = None;
        let mut via_index = false;
        // Either a blob to read (or already read), or index entries to pick from.
        let mut next: Start = top;
        let mut prefetched = top_bytes;
        let mut depth = 0;
        let (manifest_digest, media_type, config_desc, layer_descs) = loop {
            depth += 1;
            if depth > MAX_INDEX_DEPTH + 1 {
                return Err(ImageError::Malformed {
                    reference: self.reference.to_owned(),
                    what: "index".into(),
                    reason: format!("indexes nest deeper than {MAX_INDEX_DEPTH}"),
                });
            }
            let (digest, size) = match next {
                Start::Entries(entries) => {
                    let chosen = manifest::select_platform(&entries, &want, self.reference)?;
                    via_index = true;
                    (chosen.digest(self.reference, "index entry")?, Some(chosen.size))
                }
                Start::Blob(digest, size) => (digest, size),
            };
            let what = if depth == 1 { "manifest" } else { "platform manifest" };
            let bytes = match prefetched.take() {
                Some(b) => b,
                None => self.small_blob(Small::Manifest, &digest, size, what).await?,
            };
            match manifest::parse_manifest(&bytes, self.reference, what)? {
                Parsed::Index { manifests } => {
                    index_digest.get_or_insert(digest);
                    next = Start::Entries(manifests);
                }
                Parsed::Image { media_type, config, layers } => break (digest, media_type, config, layers),
            }
        };

        let config_digest = config_desc.digest(self.reference, "config")?;
        let config_bytes =
            self.small_blob(Small::Config, &config_digest, Some(config_desc.size), "image config").await?;
        let config = manifest::parse_config(&config_bytes, self.reference)?;
        if config.diff_ids.len() != layer_descs.len() {
            return Err(ImageError::LayerCountMismatch {
                reference: self.reference.to_owned(),
                layers: layer_descs.len(),
                diff_ids: config.diff_ids.len(),
            });
        }
        if !via_index && !platform_fits(&config.platform, &want) {
            tracing::warn!(
                reference = self.reference,
                image = %config.platform,
                requested = %want,
                "the image is single-platform and not for the requested platform"
            );
        }
        let mut layers = Vec::with_capacity(layer_descs.len());
        for (index, (desc, expected)) in layer_descs.iter().zip(&config.diff_ids).enumerate() {
            let layer = self.layer(index, desc).await?;
            if layer.diff_id != expected.as_str() {
                return Err(ImageError::DiffIdMismatch {
                    reference: self.reference.to_owned(),
                    index,
                    digest: layer.digest,
                    expected: expected.to_string(),
                    actual: layer.diff_id,
                });
            }
            layers.push(layer);
        }
        Ok(ResolvedImage {
            reference: self.reference.to_owned(),
            manifest_digest: manifest_digest.to_string(),
            manifest_media_type: media_type,
            index_digest: index_digest.map(|d| d.to_string()),
            config_digest: config_digest.to_string(),
            platform: config.platform,
            config: config.config,
            layers,
            report: self.report.clone(),
        })
    }
}

fn platform_fits(have: &super::Platform, want: &super::Platform) -> bool {
    have.os == want.os
        && have.architecture == want.architecture
        && (want.variant.is_none() || have.variant.is_none() || have.variant == want.variant)
}

pub(crate) fn parse_reference(reference: &str) -> Result<Reference, ImageError> {
    Reference::try_from(reference)
        .map_err(|e| ImageError::InvalidReference { reference: reference.to_owned(), reason: e.to_string() })
}

/// Resolves a registry image, online or from the cache.
pub(crate) async fn resolve_registry(reference: &str, opts: &ResolveOptions) -> Result<ResolvedImage, ImageError> {
    let parsed = parse_reference(reference)?;
    let pinned = parsed.digest().map(|d| Digest::parse_in(d, reference, "the reference")).transpose()?;

    if opts.offline {
        return from_cache(reference, &parsed, pinned.as_ref(), opts, CacheReason::Offline).await;
    }
    if let Some(pinned) = &pinned {
        // Content-addressed: if everything is cached, the registry has
        // nothing to add.
        match from_cache(reference, &parsed, Some(pinned), opts, CacheReason::PinnedDigest).await {
            Ok(image) => {
                tracing::debug!(reference, "pinned digest served from the cache");
                return Ok(image);
            }
            Err(ImageError::NotCached { .. } | ImageError::NoCache { .. }) => {}
            Err(e) => return Err(e),
        }
    }

    let client = RegistryClient::new(&parsed, opts)?;
    let (top_bytes, top_digest) = match client.manifest(&parsed).await {
        Ok(top) => top,
        Err(failure) if failure.is_unreachable() => {
            let reason = CacheReason::RegistryUnreachable { detail: failure.detail.clone() };
            return match from_cache(reference, &parsed, pinned.as_ref(), opts, reason).await {
                Ok(image) => {
                    tracing::warn!(
                        registry = %client.registry,
                        reference,
                        "registry {} {}: using the cached resolution of {reference} ({})",
                        client.registry,
                        failure.detail,
                        image.manifest_digest,
                    );
                    Ok(image)
                }
                Err(ImageError::NotCached { what, .. }) => Err(ImageError::RegistryUnreachable {
                    registry: client.registry.clone(),
                    reference: reference.to_owned(),
                    detail: failure.detail,
                    note: if what == NO_RESOLUTION {
                        format!("no cached resolution of {reference} either")
                    } else {
                        format!("no complete cached resolution of {reference} either: {what} is not cached")
                    },
                }),
                Err(ImageError::NoCache { .. }) => Err(ImageError::RegistryUnreachable {
                    registry: client.registry.clone(),
                    reference: reference.to_owned(),
                    detail: failure.detail,
                    note: "no cache directory to fall back on either".into(),
                }),
                Err(e) => Err(e),
            };
        }
        Err(failure) => return Err(failure.into_error(&client.registry, reference, "manifest")),
    };
    tracing::debug!(reference, digest = %top_digest, "manifest fetched");

    let mut run = Run::new(
        reference,
        opts,
        Provider::Registry { client: Some(&client), reference: &parsed },
        ManifestOrigin::Registry,
    );
    run.report.bytes_downloaded = top_bytes.len() as u64;
    if let Some(c) = &run.cache {
        c.put_blob(&top_digest, &top_bytes);
    }
    let image = run.resolve_from(Start::Blob(top_digest.clone(), None), Some(top_bytes)).await?;
    if pinned.is_none() {
        if let Some(c) = &run.cache {
            c.put_reference(&parsed.whole(), &top_digest);
        }
    }
    Ok(image)
}

/// Resolves a registry image from the cache alone.
async fn from_cache(
    reference: &str,
    parsed: &Reference,
    pinned: Option<&Digest>,
    opts: &ResolveOptions,
    reason: CacheReason,
) -> Result<ResolvedImage, ImageError> {
    let mut run = Run::new(
        reference,
        opts,
        Provider::Registry { client: None, reference: parsed },
        ManifestOrigin::Cache(reason),
    );
    let top = match pinned {
        Some(d) => d.clone(),
        None => {
            let cache = run.cache.as_ref().ok_or_else(|| ImageError::NoCache { reference: reference.to_owned() })?;
            let record = cache.reference(&parsed.whole()).ok_or_else(|| run.not_cached(NO_RESOLUTION.to_owned()))?;
            Digest::parse_in(&record.digest, reference, "the cached reference")?
        }
    };
    run.resolve_from(Start::Blob(top, None), None).await
}

/// Resolves an image from a local layout or archive.
pub(crate) async fn resolve_local(
    reference: &str,
    source: &ImageSource,
    opts: &ResolveOptions,
) -> Result<ResolvedImage, ImageError> {
    match source {
        ImageSource::OciLayout(dir) => {
            let tree = DirTree::new(dir.clone(), source.to_string());
            if !dir.is_dir() {
                return Err(ImageError::InvalidLocalSource {
                    source_desc: tree.describe(),
                    kind: "OCI image layout".into(),
                    reason: "it is not a directory".into(),
                });
            }
            resolve_layout(reference, &tree, opts).await
        }
        ImageSource::OciArchive(file) => {
            let tree = TarTree::open(file, source.to_string())?;
            resolve_layout(reference, &tree, opts).await
        }
        ImageSource::DockerArchive(path) => {
            if path.is_dir() {
                resolve_docker(reference, &DirTree::new(path.clone(), source.to_string()), opts)
            } else {
                resolve_docker(reference, &TarTree::open(path, source.to_string())?, opts)
            }
        }
        ImageSource::Registry => Err(ImageError::Internal("registry source passed to resolve_local".into())),
    }
}

async fn resolve_layout(reference: &str, tree: &dyn Tree, opts: &ResolveOptions) -> Result<ResolvedImage, ImageError> {
    let start = layout::find(tree, reference)?;
    let mut run = Run::new(reference, opts, Provider::Layout { tree }, ManifestOrigin::Layout);
    run.resolve_from(start, None).await
}

/// Resolves an image of a docker archive: no manifest, uncompressed (or
/// sniffed) layers, and the config named by its digest.
fn resolve_docker(reference: &str, tree: &dyn Tree, opts: &ResolveOptions) -> Result<ResolvedImage, ImageError> {
    let image = archive::find_docker(tree, reference)?;
    let invalid = |reason: String| ImageError::InvalidLocalSource {
        source_desc: tree.describe(),
        kind: "docker-archive".into(),
        reason,
    };
    let config_bytes = layout::read_small(tree, &image.config, MAX_CONFIG_BYTES, reference)?
        .ok_or_else(|| invalid(format!("config {} is missing", image.config)))?;
    let config_digest = Digest::of(&config_bytes);
    if let Some(named) = archive::digest_named_by(&image.config) {
        if named != config_digest {
            return Err(ImageError::DigestMismatch {
                reference: reference.to_owned(),
                what: format!("config {}", image.config),
                expected: named.to_string(),
                actual: config_digest.to_string(),
            });
        }
    }
    let config = manifest::parse_config(&config_bytes, reference)?;
    if config.diff_ids.len() != image.layers.len() {
        return Err(ImageError::LayerCountMismatch {
            reference: reference.to_owned(),
            layers: image.layers.len(),
            diff_ids: config.diff_ids.len(),
        });
    }
    let progress = Progress::new(opts.progress);
    let mut layers = Vec::with_capacity(image.layers.len());
    let mut hashed = 0;
    for (index, (path, expected)) in image.layers.iter().zip(&config.diff_ids).enumerate() {
        let io_err = io_error(format!("{}: {path}", tree.describe()));
        let (mut reader, size) = tree
            .open(path)
            .map_err(io_error(format!("{}: {path}", tree.describe())))?
            .ok_or_else(|| invalid(format!("layer {index} ({path}) is missing")))?;
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < magic.len() {
            let rest = magic.get_mut(got..).unwrap_or_default();
            let n = reader.read(rest).map_err(io_error(format!("{}: {path}", tree.describe())))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        let head = magic.get(..got).unwrap_or_default();
        let compression = Compression::sniff(head);
        let media_type = match compression {
            Compression::None => DOCKER_LAYER_TAR,
            Compression::Gzip => DOCKER_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
        };
        let bar = progress.bar(size, format!("hashing layer {index} {path}"));
        let mut hasher =
            LayerHasher::new(Some(compression), size, bar).map_err(|e| ImageError::Internal(e.to_string()))?;
        let copied = io::copy(&mut head.chain(reader), &mut hasher);
        let too_long = |HashFailure::TooLong { limit }| ImageError::SizeMismatch {
            reference: reference.to_owned(),
            what: format!("layer {index} ({path})"),
            expected: limit,
            actual: limit.saturating_add(1),
        };
        if let Err(e) = copied {
            return Err(match hasher.failure().cloned() {
                Some(f) => too_long(f),
                None => io_err(e),
            });
        }
        let digests = hasher.finish().map_err(too_long)?;
        if let Some(reason) = digests.decode_error {
            return Err(ImageError::LayerDecode {
                reference: reference.to_owned(),
                index,
                digest: digests.digest.to_string(),
                media_type: media_type.to_owned(),
                reason,
            });
        }
        hashed += 1;
        let diff_id = digests.diff_id.ok_or_else(|| ImageError::Internal("no diff_id".into()))?;
        if diff_id != *expected {
            return Err(ImageError::DiffIdMismatch {
                reference: reference.to_owned(),
                index,
                digest: digests.digest.to_string(),
                expected: expected.to_string(),
                actual: diff_id.to_string(),
            });
        }
        layers.push(Layer {
            digest: digests.digest.to_string(),
            diff_id: diff_id.to_string(),
            size: digests.size,
            media_type: media_type.to_owned(),
        });
    }
    let synth: Vec<(String, u64, String)> =
        layers.iter().map(|l| (l.digest.clone(), l.size, l.media_type.clone())).collect();
    let (manifest_bytes, manifest_media_type) =
        archive::synthesize_manifest((&config_digest, config_bytes.len() as u64), &synth)?;
    Ok(ResolvedImage {
        reference: reference.to_owned(),
        manifest_digest: Digest::of(&manifest_bytes).to_string(),
        manifest_media_type: manifest_media_type.to_owned(),
        index_digest: None,
        config_digest: config_digest.to_string(),
        platform: config.platform,
        config: config.config,
        layers,
        report: ResolveReport {
            origin: ManifestOrigin::DockerArchive,
            layers_downloaded: 0,
            layers_hashed: hashed,
            layers_from_cache: 0,
            bytes_downloaded: 0,
        },
    })
}
