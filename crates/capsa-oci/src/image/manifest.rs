//! The documents of an image: digests, descriptors, manifests, indexes and
//! configs (OCI image spec v1 and Docker's schema 2, which share a shape),
//! parsed from untrusted bytes, and platform selection from an index.

use std::collections::BTreeMap;
use std::fmt;

use aws_lc_rs::digest::{Context, SHA256};
use serde::Deserialize;

use super::{ImageConfig, ImageError, Platform};

/// OCI image manifest.
pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker image manifest, schema 2.
pub(crate) const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub(crate) const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config.
pub(crate) const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker uncompressed layer.
pub(crate) const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
/// Docker gzip layer.
pub(crate) const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// OCI zstd layer.
pub(crate) const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Every manifest media type a registry is asked for.
pub(crate) const ACCEPTED_MANIFESTS: &[&str] = &[OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];

/// Registries may refuse manifests over 4 MiB (distribution spec); so do we.
pub(crate) const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Image configs are small JSON documents; anything bigger is hostile.
pub(crate) const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Indexes nest (an index may point at an index); real images nest at most
/// once.
pub(crate) const MAX_INDEX_DEPTH: usize = 4;

/// A `sha256:<64 lowercase hex>` digest, the only algorithm capsa accepts
/// (the one policies pin).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Digest(String);

/// Why a digest string was refused.
#[derive(Debug)]
pub(crate) enum DigestParseError {
    /// Another algorithm (sha512 ...).
    Unsupported(String),
    /// Not `algorithm:hex` at all.
    Malformed(String),
}

impl Digest {
    /// Parses and validates `sha256:<hex>`.
    pub(crate) fn parse(s: &str) -> Result<Self, DigestParseError> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestParseError::Malformed(s.to_owned()));
        };
        if alg != "sha256" {
            return Err(DigestParseError::Unsupported(s.to_owned()));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(DigestParseError::Malformed(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// Parses a digest found in an image document, mapping failures to
    /// [`ImageError`]s about `reference`.
    pub(crate) fn parse_in(s: &str, reference: &str, what: &str) -> Result<Self, ImageError> {
        Self::parse(s).map_err(|e| match e {
            DigestParseError::Unsupported(v) => ImageError::Unsupported {
                reference: reference.to_owned(),
                what: format!("digest algorithm of {what} (only sha256 is supported)"),
                value: v,
            },
            DigestParseError::Malformed(v) => ImageError::Malformed {
                reference: reference.to_owned(),
                what: what.to_owned(),
                reason: format!("bad digest {v:?}"),
            },
        })
    }

    /// The SHA-256 digest of `bytes`.
    pub(crate) fn of(bytes: &[u8]) -> Self {
        let mut ctx = Context::new(&SHA256);
        ctx.update(bytes);
        Self::finish(ctx)
    }

    /// The digest a running SHA-256 context ends in.
    pub(crate) fn finish(ctx: Context) -> Self {
        Self(format!("sha256:{}", hex::encode(ctx.finish().as_ref())))
    }

    /// The hex part.
    pub(crate) fn hex(&self) -> &str {
        self.0.strip_prefix("sha256:").unwrap_or(&self.0)
    }

    /// The whole `sha256:<hex>` string.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A content descriptor as it appears in manifests and indexes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    /// The media type of the target.
    #[serde(default)]
    pub(crate) media_type: String,
    /// The target's digest (validated by [`Descriptor::digest`]).
    pub(crate) digest: String,
    /// The target's size in bytes.
    pub(crate) size: u64,
    /// The platform, in index entries.
    #[serde(default)]
    pub(crate) platform: Option<PlatformJson>,
    /// Annotations, e.g. `org.opencontainers.image.ref.name` in layouts.
    #[serde(default)]
    pub(crate) annotations: Option<BTreeMap<String, String>>,
}

impl Descriptor {
    /// The validated digest.
    pub(crate) fn digest(&self, reference: &str, what: &str) -> Result<Digest, ImageError> {
        Digest::parse_in(&self.digest, reference, what)
    }

    /// An annotation's value.
    pub(crate) fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref()?.get(key).map(String::as_str)
    }
}

/// A platform as written in an index entry.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PlatformJson {
    /// CPU architecture.
    #[serde(default)]
    pub(crate) architecture: String,
    /// Operating system.
    #[serde(default)]
    pub(crate) os: String,
    /// CPU variant.
    #[serde(default)]
    pub(crate) variant: Option<String>,
}

impl PlatformJson {
    fn label(&self) -> String {
        match &self.variant {
            Some(v) if !v.is_empty() => format!("{}/{}/{v}", self.os, self.architecture),
            _ => format!("{}/{}", self.os, self.architecture),
        }
    }

    fn matches(&self, want: &Platform) -> bool {
        if self.os != want.os || self.architecture != want.architecture {
            return false;
        }
        match (want.variant.as_deref(), self.variant.as_deref().filter(|v| !v.is_empty())) {
            (None, _) => true,
            (Some(w), Some(have)) => w == have,
            // arm64 images rarely spell out their only variant.
            (Some("v8"), None) => self.architecture == "arm64",
            (Some(_), None) => false,
        }
    }
}

/// Any manifest-shaped JSON document, before we know which kind it is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// A parsed manifest document.
#[derive(Debug)]
pub(crate) enum Parsed {
    /// An OCI index or Docker manifest list.
    Index {
        /// Its entries.
        manifests: Vec<Descriptor>,
    },
    /// A single-platform image manifest.
    Image {
        /// Its media type (inferred as OCI when absent).
        media_type: String,
        /// The config descriptor.
        config: Descriptor,
        /// The layer descriptors, bottom first.
        layers: Vec<Descriptor>,
    },
}

/// Parses a manifest or index from untrusted bytes.
pub(crate) fn parse_manifest(bytes: &[u8], reference: &str, what: &str) -> Result<Parsed, ImageError> {
    let malformed =
        |reason: String| ImageError::Malformed { reference: reference.to_owned(), what: what.to_owned(), reason };
    let unsupported = |value: String| ImageError::Unsupported {
        reference: reference.to_owned(),
        what: format!("{what} kind"),
        value,
    };
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    match raw.schema_version {
        Some(2) => {}
        Some(1) => {
            return Err(unsupported(
                "Docker schema 1 manifest (deprecated): push the image again with a current client".into(),
            ));
        }
        Some(v) => return Err(unsupported(format!("schemaVersion {v}"))),
        None => return Err(malformed("no schemaVersion".into())),
    }
    let media_type = raw.media_type.filter(|m| !m.is_empty());
    match (media_type.as_deref(), raw.manifests, raw.config, raw.layers) {
        (None | Some(OCI_INDEX) | Some(DOCKER_LIST), Some(manifests), None, None) => Ok(Parsed::Index { manifests }),
        (None | Some(OCI_MANIFEST) | Some(DOCKER_MANIFEST), None, Some(config), Some(layers)) => {
            Ok(Parsed::Image { media_type: media_type.unwrap_or_else(|| OCI_MANIFEST.to_owned()), config, layers })
        }
        (Some(m), _, _, _) if ![OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].contains(&m) => {
            Err(unsupported(format!("media type {m}")))
        }
        _ => Err(malformed("neither an image manifest (config, layers) nor an index (manifests)".into())),
    }
}

/// Selects the entry of an index for `want`, or lists the platforms it has.
pub(crate) fn select_platform<'a>(
    entries: &'a [Descriptor],
    want: &Platform,
    reference: &str,
) -> Result<&'a Descriptor, ImageError> {
    let candidates = || entries.iter().filter(|d| d.platform.as_ref().is_some_and(|p| p.matches(want)));
    // Prefer an entry that spells the requested variant exactly.
    let exact =
        candidates().find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == want.variant.as_deref());
    if let Some(d) = exact.or_else(|| candidates().next()) {
        return Ok(d);
    }
    let mut available: Vec<String> = entries
        .iter()
        .filter_map(|d| d.platform.as_ref())
        // BuildKit's attestation manifests are not images.
        .filter(|p| p.os != "unknown")
        .map(PlatformJson::label)
        .collect();
    // Unique, in index order.
    let mut seen = std::collections::HashSet::new();
    available.retain(|p| seen.insert(p.clone()));
    if available.is_empty() {
        available.push("no platform-annotated entries".into());
    }
    Err(ImageError::PlatformNotFound { reference: reference.to_owned(), platform: want.to_string(), available })
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default)]
    config: Option<ContainerConfig>,
    rootfs: RootFs,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<String>,
}

/// The parts of an image config that resolution uses.
#[derive(Debug)]
pub(crate) struct ParsedConfig {
    /// The platform the config declares.
    pub(crate) platform: Platform,
    /// Process settings.
    pub(crate) config: ImageConfig,
    /// `rootfs.diff_ids`, validated.
    pub(crate) diff_ids: Vec<Digest>,
}

/// Parses an image config from untrusted bytes.
pub(crate) fn parse_config(bytes: &[u8], reference: &str) -> Result<ParsedConfig, ImageError> {
    let malformed =
        |reason: String| ImageError::Malformed { reference: reference.to_owned(), what: "image config".into(), reason };
    let file: ConfigFile = serde_json::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    if file.rootfs.kind != "layers" {
        return Err(malformed(format!("rootfs.type is {:?}, not \"layers\"", file.rootfs.kind)));
    }
    let diff_ids = file
        .rootfs
        .diff_ids
        .iter()
        .enumerate()
        .map(|(i, d)| Digest::parse_in(d, reference, &format!("image config rootfs.diff_ids[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let c = file.config.unwrap_or_default();
    Ok(ParsedConfig {
        platform: Platform {
            os: file.os,
            architecture: file.architecture,
            variant: file.variant.filter(|v| !v.is_empty()),
        },
        config: ImageConfig {
            entrypoint: c.entrypoint.unwrap_or_default(),
            cmd: c.cmd.unwrap_or_default(),
            env: c.env.unwrap_or_default(),
            working_dir: c.working_dir.unwrap_or_default(),
            user: c.user.unwrap_or_default(),
        },
        diff_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn digests_are_sha256_lowercase_hex() {
        assert!(Digest::parse(D).is_ok());
        assert!(matches!(Digest::parse(&D.replace("sha256", "sha512")), Err(DigestParseError::Unsupported(_))));
        assert!(Digest::parse(&D.to_uppercase().replace("SHA256", "sha256")).is_ok()); // digits only
        assert!(Digest::parse(&format!("{D}0")).is_err());
        assert!(Digest::parse("sha256:../../etc/passwd").is_err());
        assert!(Digest::parse(&D.replace('0', "A")).is_err());
        assert_eq!(Digest::of(b"").as_str(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    fn entry(platform: &str) -> String {
        let mut p = platform.split('/');
        let (os, arch, variant) = (p.next().unwrap(), p.next().unwrap(), p.next());
        let variant = variant.map(|v| format!(",\"variant\":\"{v}\"")).unwrap_or_default();
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":1,"platform":{{"os":"{os}","architecture":"{arch}"{variant}}}}}"#,
            D.replace("00", &format!("{:02x}", platform.len()))
        )
    }

    fn index(platforms: &[&str]) -> Vec<Descriptor> {
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
            platforms.iter().map(|p| entry(p)).collect::<Vec<_>>().join(",")
        );
        match parse_manifest(doc.as_bytes(), "r", "index").unwrap() {
            Parsed::Index { manifests } => manifests,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn selects_platforms() {
        let idx = index(&["linux/arm64/v8", "linux/amd64", "unknown/unknown", "linux/arm/v7"]);
        let pick =
            |p: &str| select_platform(&idx, &p.parse().unwrap(), "r").map(|d| d.platform.clone().unwrap().label());
        assert_eq!(pick("linux/amd64").unwrap(), "linux/amd64");
        assert_eq!(pick("linux/arm64").unwrap(), "linux/arm64/v8");
        assert_eq!(pick("linux/arm64/v8").unwrap(), "linux/arm64/v8");
        assert_eq!(pick("linux/arm/v7").unwrap(), "linux/arm/v7");
        let err = pick("linux/s390x").unwrap_err().to_string();
        assert!(err.contains("linux/amd64") && err.contains("linux/arm64/v8") && !err.contains("unknown"), "{err}");
        // arm64 without a variant matches a request for v8.
        let idx = index(&["linux/arm64"]);
        assert!(select_platform(&idx, &"linux/arm64/v8".parse().unwrap(), "r").is_ok());
        assert!(select_platform(&idx, &"linux/arm/v7".parse().unwrap(), "r").is_err());
    }

    #[test]
    fn manifest_kinds() {
        let image = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{DOCKER_CONFIG}","digest":"{D}","size":2}},"layers":[]}}"#
        );
        assert!(
            matches!(parse_manifest(image.as_bytes(), "r", "m").unwrap(), Parsed::Image { media_type, .. } if media_type == OCI_MANIFEST)
        );
        let err = parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#, "r", "m").unwrap_err();
        assert!(err.to_string().contains("schema 1"), "{err}");
        let err = parse_manifest(br#"{"schemaVersion":2,"mediaType":"application/x-nope","layers":[]}"#, "r", "m")
            .unwrap_err();
        assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");
        assert!(parse_manifest(b"{", "r", "m").is_err());
        assert!(parse_manifest(br#"{"schemaVersion":2}"#, "r", "m").is_err());
        // An index that also claims layers is refused rather than guessed at.
        let both = format!(r#"{{"schemaVersion":2,"manifests":[],"layers":[],"config":{{"digest":"{D}","size":1}}}}"#);
        assert!(parse_manifest(both.as_bytes(), "r", "m").is_err());
        // Negative sizes are not sizes.
        let neg = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{D}","size":-1}}]}}"#);
        assert!(parse_manifest(neg.as_bytes(), "r", "m").is_err());
    }

    #[test]
    fn config_fields() {
        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Entrypoint":["/bin/sh"],"Cmd":null,"Env":["A=1"],"WorkingDir":"/w","User":"1000:1000"}},"rootfs":{{"type":"layers","diff_ids":["{D}"]}}}}"#
        );
        let p = parse_config(cfg.as_bytes(), "r").unwrap();
        assert_eq!(p.config.entrypoint, ["/bin/sh"]);
        assert!(p.config.cmd.is_empty());
        assert_eq!(p.config.user, "1000:1000");
        assert_eq!(p.config.working_dir, "/w");
        assert_eq!(p.platform, Platform::linux_amd64());
        assert_eq!(p.diff_ids.len(), 1);
        assert!(parse_config(br#"{"rootfs":{"type":"layers","diff_ids":["md5:00"]}}"#, "r").is_err());
        assert!(parse_config(br#"{"rootfs":{"type":"other","diff_ids":[]}}"#, "r").is_err());
        assert!(parse_config(br#"{}"#, "r").is_err());
    }
}
