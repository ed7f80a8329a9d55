//! Tar archives read in place (an index of entry offsets, nothing
//! extracted), and `docker save` archives: `manifest.json` listing each
//! image's `Config`, `RepoTags` and `Layers`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use oci_client::Reference;
use serde::{Deserialize, Serialize};

use super::ImageError;
use super::layout::{Tree, read_small};
use super::manifest::{DOCKER_CONFIG, DOCKER_MANIFEST, Digest};

/// More entries than any image archive has; a bound on the index's memory.
const MAX_ENTRIES: usize = 1_000_000;
/// Symbolic and hard links followed in a row before giving up.
const MAX_LINK_HOPS: usize = 16;
/// `manifest.json` of a docker archive.
const MAX_MANIFEST_JSON: u64 = 16 << 20;

#[derive(Debug, Clone)]
enum Node {
    File {
        offset: u64,
        size: u64,
    },
    /// A link, with its target as an archive path.
    Link(String),
}

/// Normalizes an archive path: no leading `/` or `./`, no `.` components,
/// `..` resolved; `None` if it climbs out of the archive.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in path.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// A tar archive, indexed once, read in place.
pub(crate) struct TarTree {
    path: PathBuf,
    desc: String,
    nodes: HashMap<String, Node>,
}

impl TarTree {
    /// Indexes the archive at `path`.
    pub(crate) fn open(path: &Path, desc: String) -> Result<Self, ImageError> {
        let io_err = |source: io::Error| ImageError::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io_err)?;
        let mut archive = tar::Archive::new(file);
        let mut nodes = HashMap::new();
        for entry in archive.entries_with_seek().map_err(io_err)? {
            let entry = entry.map_err(|e| ImageError::InvalidLocalSource {
                source_desc: desc.clone(),
                kind: "tar archive".into(),
                reason: e.to_string(),
            })?;
            if nodes.len() >= MAX_ENTRIES {
                return Err(ImageError::InvalidLocalSource {
                    source_desc: desc,
                    kind: "image archive".into(),
                    reason: format!("more than {MAX_ENTRIES} entries"),
                });
            }
            let Ok(name) = entry.path() else { continue };
            let Some(name) = name.to_str().and_then(normalize) else { continue };
            let kind = entry.header().entry_type();
            let node = if kind.is_file() || kind == tar::EntryType::Continuous {
                Node::File { offset: entry.raw_file_position(), size: entry.size() }
            } else if kind.is_symlink() || kind.is_hard_link() {
                let Ok(Some(target)) = entry.link_name() else { continue };
                let Some(target) = target.to_str() else { continue };
                // Symbolic links are relative to their directory; hard links
                // name an archive path.
                let joined = match (kind.is_symlink(), name.rsplit_once('/')) {
                    (true, Some((dir, _))) if !target.starts_with('/') => format!("{dir}/{target}"),
                    _ => target.to_owned(),
                };
                let Some(target) = normalize(&joined) else { continue };
                Node::Link(target)
            } else {
                continue;
            };
            nodes.insert(name, node);
        }
        Ok(Self { path: path.to_path_buf(), desc, nodes })
    }
}

impl Tree for TarTree {
    fn open(&self, path: &str) -> io::Result<Option<(Box<dyn Read + Send + '_>, u64)>> {
        let Some(mut name) = normalize(path) else { return Ok(None) };
        for _ in 0..MAX_LINK_HOPS {
            match self.nodes.get(&name) {
                None => return Ok(None),
                Some(Node::Link(target)) => name = target.clone(),
                Some(Node::File { offset, size }) => {
                    let mut f = File::open(&self.path)?;
                    f.seek(SeekFrom::Start(*offset))?;
                    return Ok(Some((Box::new(f.take(*size)), *size)));
                }
            }
        }
        Err(io::Error::other(format!("too many links resolving {path}")))
    }

    fn describe(&self) -> String {
        self.desc.clone()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// One image of a docker archive.
#[derive(Debug)]
pub(crate) struct DockerImage {
    /// The config file's path in the archive.
    pub(crate) config: String,
    /// The layer files' paths, bottom first.
    pub(crate) layers: Vec<String>,
}

/// Whether a `RepoTags` entry denotes `reference`.
fn tag_matches(tag: &str, reference: &str, parsed: Option<&Reference>) -> bool {
    tag == reference || parsed.is_some_and(|p| Reference::try_from(tag).is_ok_and(|t| t.whole() == p.whole()))
}

/// Finds `reference` among a docker archive's `RepoTags`.
pub(crate) fn find_docker(tree: &dyn Tree, reference: &str) -> Result<DockerImage, ImageError> {
    let invalid = |reason: String| ImageError::InvalidLocalSource {
        source_desc: tree.describe(),
        kind: "docker-archive".into(),
        reason,
    };
    let bytes = read_small(tree, "manifest.json", MAX_MANIFEST_JSON, reference)?
        .ok_or_else(|| invalid("it has no manifest.json".into()))?;
    let entries: Vec<DockerManifestEntry> =
        serde_json::from_slice(&bytes).map_err(|e| invalid(format!("manifest.json is not valid: {e}")))?;
    let parsed = Reference::try_from(reference).ok();
    let tags = |e: &DockerManifestEntry| e.repo_tags.clone().unwrap_or_default();
    let mut matched = entries.iter().filter(|e| tags(e).iter().any(|t| tag_matches(t, reference, parsed.as_ref())));
    let chosen = match (matched.next(), matched.next()) {
        (Some(one), None) => one,
        (Some(_), Some(_)) => return Err(invalid(format!("several images are tagged {reference:?}"))),
        (None, _) => match entries.as_slice() {
            [only] if tags(only).is_empty() => only,
            _ => {
                let mut available: Vec<String> = entries.iter().flat_map(tags).collect();
                available.sort();
                available.dedup();
                return Err(ImageError::NotInLocalSource {
                    reference: reference.to_owned(),
                    source_desc: tree.describe(),
                    available,
                });
            }
        },
    };
    Ok(DockerImage { config: chosen.config.clone(), layers: chosen.layers.clone() })
}

/// The config path's file stem, if it is a digest hex (`<hex>.json`,
/// `blobs/sha256/<hex>`): Docker names config files by their digest.
pub(crate) fn digest_named_by(path: &str) -> Option<Digest> {
    let file = path.rsplit('/').next()?;
    let stem = file.strip_suffix(".json").unwrap_or(file);
    Digest::parse(&format!("sha256:{stem}")).ok()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SynthDescriptor {
    media_type: String,
    size: u64,
    digest: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SynthManifest {
    schema_version: u32,
    media_type: &'static str,
    config: SynthDescriptor,
    layers: Vec<SynthDescriptor>,
}

/// A Docker v2 manifest for a docker archive's image, which has none of its
/// own: the config and the layers exactly as stored in the archive.
pub(crate) fn synthesize_manifest(
    config: (&Digest, u64),
    layers: &[(String, u64, String)],
) -> Result<(Vec<u8>, &'static str), ImageError> {
    let manifest = SynthManifest {
        schema_version: 2,
        media_type: DOCKER_MANIFEST,
        config: SynthDescriptor { media_type: DOCKER_CONFIG.into(), size: config.1, digest: config.0.to_string() },
        layers: layers
            .iter()
            .map(|(digest, size, media_type)| SynthDescriptor {
                media_type: media_type.clone(),
                size: *size,
                digest: digest.clone(),
            })
            .collect(),
    };
    let bytes = serde_json::to_vec(&manifest).map_err(|e| ImageError::Internal(e.to_string()))?;
    Ok((bytes, DOCKER_MANIFEST))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize("./blobs/sha256/ab").as_deref(), Some("blobs/sha256/ab"));
        assert_eq!(normalize("/a//b/./c").as_deref(), Some("a/b/c"));
        assert_eq!(normalize("a/../b").as_deref(), Some("b"));
        assert_eq!(normalize("../b"), None);
        assert_eq!(normalize("."), None);
    }

    #[test]
    fn reads_tar_entries_and_links_in_place() {
        let dir = std::env::temp_dir().join(format!("capsa-oci-tartree-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.tar");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "./dir/file", &b"hello"[..]).unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "other/link", "../dir/file").unwrap();
        let mut hl = tar::Header::new_gnu();
        hl.set_entry_type(tar::EntryType::Link);
        hl.set_size(0);
        b.append_link(&mut hl, "hard", "dir/file").unwrap();
        let mut esc = tar::Header::new_gnu();
        esc.set_entry_type(tar::EntryType::Symlink);
        esc.set_size(0);
        b.append_link(&mut esc, "escape", "../../etc/passwd").unwrap();
        std::fs::write(&path, b.into_inner().unwrap()).unwrap();

        let t = TarTree::open(&path, "test".into()).unwrap();
        for p in ["dir/file", "./dir/file", "other/link", "hard"] {
            let (mut r, size) = t.open(p).unwrap().unwrap();
            let mut s = String::new();
            r.read_to_string(&mut s).unwrap();
            assert_eq!((s.as_str(), size), ("hello", 5), "{p}");
        }
        assert!(t.open("escape").unwrap().is_none());
        assert!(t.open("missing").unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn config_names() {
        let hex = "a".repeat(64);
        assert!(digest_named_by(&format!("{hex}.json")).is_some());
        assert!(digest_named_by(&format!("blobs/sha256/{hex}")).is_some());
        assert!(digest_named_by("config.json").is_none());
    }
}
