//! Local OCI image layouts (`oci-layout`, `index.json`, `blobs/sha256/...`),
//! whether a directory or a tar of one, and finding an image in them by its
//! `org.opencontainers.image.ref.name` annotation.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use oci_client::Reference;
use serde::Deserialize;

use super::ImageError;
use super::manifest::{Descriptor, Digest};

/// The annotation OCI layouts name images by (a tag, or a full reference).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// The annotation containerd and Docker add with the full reference.
const CONTAINERD_NAME: &str = "io.containerd.image.name";
/// `index.json` is small; one this big is hostile.
const MAX_INDEX_JSON: u64 = 16 << 20;

/// A read-only file tree: a directory, or a tar archive's entries.
pub(crate) trait Tree: Send + Sync {
    /// Opens the regular file at `path` (relative, `/`-separated); `None`
    /// when there is none. Returns a reader and the file's size.
    fn open(&self, path: &str) -> io::Result<Option<(Box<dyn Read + Send + '_>, u64)>>;

    /// How to name this tree to the user.
    fn describe(&self) -> String;
}

/// A directory on disk.
pub(crate) struct DirTree {
    root: PathBuf,
    desc: String,
}

impl DirTree {
    /// The directory `root`, described as `desc`.
    pub(crate) fn new(root: PathBuf, desc: String) -> Self {
        Self { root, desc }
    }
}

/// Whether a relative path stays inside its tree (no `..`, not absolute).
pub(crate) fn is_contained(path: &str) -> bool {
    !path.is_empty() && Path::new(path).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

impl Tree for DirTree {
    fn open(&self, path: &str) -> io::Result<Option<(Box<dyn Read + Send + '_>, u64)>> {
        if !is_contained(path) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("path {path:?} leaves the directory")));
        }
        let full = self.root.join(path);
        let f = match File::open(&full) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = f.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        Ok(Some((Box::new(f), meta.len())))
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }
}

/// Reads a whole small file of a tree, at most `limit` bytes.
pub(crate) fn read_small(
    tree: &dyn Tree,
    path: &str,
    limit: u64,
    reference: &str,
) -> Result<Option<Vec<u8>>, ImageError> {
    let io_err =
        |source: io::Error| ImageError::Io { path: PathBuf::from(format!("{}: {path}", tree.describe())), source };
    let Some((reader, size)) = tree.open(path).map_err(io_err)? else {
        return Ok(None);
    };
    if size > limit {
        return Err(ImageError::TooLarge { reference: reference.to_owned(), what: path.to_owned(), limit });
    }
    let mut bytes = Vec::new();
    reader.take(limit).read_to_end(&mut bytes).map_err(io_err)?;
    Ok(Some(bytes))
}

/// The path of a blob in a layout.
pub(crate) fn blob_path(digest: &Digest) -> String {
    format!("blobs/sha256/{}", digest.hex())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OciLayoutFile {
    image_layout_version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexJson {
    schema_version: u32,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// Where resolution starts in a layout.
#[derive(Debug)]
pub(crate) enum Start {
    /// A manifest or index blob.
    Blob(Digest, Option<u64>),
    /// Several `index.json` entries share the name: one per platform.
    Entries(Vec<Descriptor>),
}

fn names(d: &Descriptor) -> impl Iterator<Item = &str> {
    [REF_NAME, CONTAINERD_NAME].into_iter().filter_map(|k| d.annotation(k))
}

/// Whether a name in a layout denotes the reference as given. `given` may be
/// a full reference or a tag alone; so may the name.
fn name_matches(name: &str, given: &str, parsed: Option<&Reference>, explicit_tag: bool) -> bool {
    if name == given {
        return true;
    }
    let Some(parsed) = parsed else { return false };
    if name.contains(['/', ':', '@']) {
        // A full reference: compare normalized (docker.io/library/... etc.).
        Reference::try_from(name).is_ok_and(|n| n.whole() == parsed.whole())
    } else {
        // A tag alone, as `skopeo copy ... oci:DIR:tag` writes it.
        explicit_tag && parsed.tag() == Some(name)
    }
}

/// Finds the image `reference` in the OCI layout `tree`.
pub(crate) fn find(tree: &dyn Tree, reference: &str) -> Result<Start, ImageError> {
    let invalid = |reason: String| ImageError::InvalidLocalSource {
        source_desc: tree.describe(),
        kind: "OCI image layout".into(),
        reason,
    };
    let marker = read_small(tree, "oci-layout", 64 << 10, reference)?
        .ok_or_else(|| invalid("it has no oci-layout file".into()))?;
    let marker: OciLayoutFile =
        serde_json::from_slice(&marker).map_err(|e| invalid(format!("oci-layout is not valid: {e}")))?;
    if marker.image_layout_version != "1.0.0" {
        return Err(invalid(format!("unknown imageLayoutVersion {:?}", marker.image_layout_version)));
    }
    let index = read_small(tree, "index.json", MAX_INDEX_JSON, reference)?
        .ok_or_else(|| invalid("it has no index.json".into()))?;
    let index: IndexJson =
        serde_json::from_slice(&index).map_err(|e| invalid(format!("index.json is not valid: {e}")))?;
    if index.schema_version != 2 {
        return Err(invalid(format!("index.json has schemaVersion {}", index.schema_version)));
    }

    let parsed = Reference::try_from(reference).ok();
    // A digest names a blob directly, whether or not index.json lists it.
    if let Some(digest) = parsed.as_ref().and_then(Reference::digest) {
        let digest = Digest::parse_in(digest, reference, "the reference")?;
        return Ok(Start::Blob(digest, None));
    }
    let last = reference.rsplit('/').next().unwrap_or(reference);
    let explicit_tag = last.contains(':');

    let exact: Vec<&Descriptor> = index.manifests.iter().filter(|d| names(d).any(|n| n == reference)).collect();
    let matched = if exact.is_empty() {
        index
            .manifests
            .iter()
            .filter(|d| names(d).any(|n| name_matches(n, reference, parsed.as_ref(), explicit_tag)))
            .collect()
    } else {
        exact
    };
    let unnamed_single = index.manifests.len() == 1 && index.manifests.iter().all(|d| names(d).next().is_none());
    let matched: Vec<&Descriptor> =
        if matched.is_empty() && unnamed_single { index.manifests.iter().collect() } else { matched };
    match matched.as_slice() {
        [] => {
            let mut available: Vec<String> = index.manifests.iter().flat_map(names).map(str::to_owned).collect();
            available.sort();
            available.dedup();
            Err(ImageError::NotInLocalSource {
                reference: reference.to_owned(),
                source_desc: tree.describe(),
                available,
            })
        }
        [one] => Ok(Start::Blob(one.digest(reference, "index.json entry")?, Some(one.size))),
        many if many.iter().all(|d| d.digest == many.first().map(|f| f.digest.as_str()).unwrap_or_default()) => {
            let first = many.first().ok_or_else(|| ImageError::Internal("empty match list".into()))?;
            Ok(Start::Blob(first.digest(reference, "index.json entry")?, Some(first.size)))
        }
        many if many.iter().all(|d| d.platform.is_some()) => {
            Ok(Start::Entries(many.iter().map(|d| (*d).clone()).collect()))
        }
        _ => Err(invalid(format!("several different images are named {reference:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment() {
        assert!(is_contained("blobs/sha256/ab"));
        assert!(is_contained("./manifest.json"));
        assert!(!is_contained("../x"));
        assert!(!is_contained("a/../../x"));
        assert!(!is_contained("/etc/passwd"));
        assert!(!is_contained(""));
    }

    #[test]
    fn names_match_tags_and_references() {
        let r = |s: &str| Reference::try_from(s).ok();
        let given = "127.0.0.1:5000/test/busybox:v1";
        assert!(name_matches("v1", given, r(given).as_ref(), true));
        assert!(!name_matches("v2", given, r(given).as_ref(), true));
        assert!(name_matches("127.0.0.1:5000/test/busybox:v1", given, r(given).as_ref(), true));
        assert!(!name_matches("127.0.0.1:5000/test/other:v1", given, r(given).as_ref(), true));
        // docker.io normalization.
        assert!(name_matches("docker.io/library/busybox:latest", "busybox:latest", r("busybox:latest").as_ref(), true));
        // A bare name does not match the tag "latest" by accident.
        assert!(!name_matches("latest", "busybox", r("busybox").as_ref(), false));
    }
}
