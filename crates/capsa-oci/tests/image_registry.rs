//! Image resolution from a real registry (Debian's docker-registry on
//! 127.0.0.1, a random port) holding images built here and pushed with
//! skopeo: diff_ids, the cache, the fallback when the registry is stopped,
//! multi-platform indexes. No traffic leaves the loopback interface.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod support;

use capsa_oci::image::{
    CacheReason, ImageError, ImageSource, ManifestOrigin, Platform, ResolveOptions, ResolvedImage, Transport,
    layer_blob, layer_blob_blocking, registry_transport, resolve, resolve_blocking,
};
use support::*;

fn have_tools() -> bool {
    have("docker-registry") && have("skopeo")
}

/// Pushes the layout's `tag` to the registry as `repo:tag`.
fn push(registry: &Registry, layout: &std::path::Path, tag: &str, repo: &str, all: bool) -> String {
    let dest = format!("{}/{repo}:{tag}", registry.addr);
    let src = format!("oci:{}:{tag}", layout.display());
    let dst = format!("docker://{dest}");
    let mut args = vec!["copy", "--dest-tls-verify=false"];
    if all {
        args.push("--all");
    }
    args.extend([src.as_str(), dst.as_str()]);
    skopeo(&args);
    dest
}

#[test]
fn registry_resolution_cache_and_fallback_when_stopped() {
    if !have_tools() {
        return;
    }
    let dir = TempDir::new("reg");
    let image = build_image(busybox_layers("amd64"), "amd64", None);
    let layout = dir.join("layout");
    write_layout(&layout, &image.blobs(), &[("v1", &image.manifest)]);
    let mut registry = Registry::start();
    let reference = push(&registry, &layout, "v1", "test/busybox", false);
    let opts = options(&dir);

    // First resolution: everything downloaded and hashed.
    let first = resolve_blocking(&reference, &ImageSource::Registry, &opts).unwrap();
    assert_image(&first, &image);
    assert_eq!(first.reference, reference);
    assert_eq!(first.manifest_digest, image.manifest.digest);
    assert_eq!(first.config_digest, image.config.digest);
    assert_eq!(first.digests(), image.layer_digests());
    assert_eq!(first.report.origin, ManifestOrigin::Registry);
    assert_eq!(first.report.layers_downloaded, 3);
    assert_eq!(first.report.layers_hashed, 3);
    for (l, built) in first.layers.iter().zip(&image.layers) {
        assert_eq!(l.size, built.blob.bytes.len() as u64);
        assert_eq!(l.media_type, LAYER_GZIP);
        // The cache record, as documented.
        let hex = l.digest.strip_prefix("sha256:").unwrap();
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cache/sha256").join(format!("{hex}.json"))).unwrap())
                .unwrap();
        assert_eq!(record["diff_id"], built.diff_id.as_str());
        assert_eq!(record["size"], built.blob.bytes.len() as u64);
        assert_eq!(record["media_type"], LAYER_GZIP);
    }
    let blob_gets = registry.blob_gets();
    assert!(blob_gets >= 4, "the registry served the config and 3 layers:\n{}", registry.log());

    // Second resolution: the manifest is fetched again (a tag can move), no
    // blob is.
    let second = resolve_blocking(&reference, &ImageSource::Registry, &opts).unwrap();
    assert_eq!(second, ResolvedImage { report: second.report.clone(), ..first.clone() });
    assert_eq!(second.report.origin, ManifestOrigin::Registry);
    assert_eq!(second.report.layers_downloaded, 0);
    assert_eq!(second.report.layers_from_cache, 3);
    assert_eq!(registry.blob_gets(), blob_gets, "no blob downloaded the second time");

    // A digest reference with everything cached never asks the registry.
    let pinned = format!("{}/test/busybox@{}", registry.addr, image.manifest.digest);
    let log_len = registry.log().len();
    let by_digest = resolve_blocking(&pinned, &ImageSource::Registry, &opts).unwrap();
    assert_eq!(by_digest.report.origin, ManifestOrigin::Cache(CacheReason::PinnedDigest));
    assert_eq!(by_digest.diff_ids(), image.diff_ids());
    assert_eq!(registry.log().len(), log_len, "the registry was not contacted");

    // The async API, from inside a runtime.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let via_async = rt.block_on(resolve(&reference, &ImageSource::Registry, &opts)).unwrap();
    assert_eq!(via_async.diff_ids(), image.diff_ids());

    // Registry stopped: the tag resolves from the cache, with a warning.
    registry.stop();
    let stopped = resolve_blocking(&reference, &ImageSource::Registry, &opts).unwrap();
    match &stopped.report.origin {
        ManifestOrigin::Cache(CacheReason::RegistryUnreachable { detail }) => {
            assert!(detail.contains("refused"), "{detail}");
        }
        other => panic!("expected the cached fallback, got {other:?}"),
    }
    assert_eq!(stopped.manifest_digest, first.manifest_digest);
    assert_eq!(stopped.diff_ids(), image.diff_ids());
    assert_eq!(stopped.config, first.config);
    assert_eq!(stopped.report.layers_downloaded, 0);
    assert_eq!(stopped.report.bytes_downloaded, 0);

    // Offline: the same, without trying.
    let offline =
        resolve_blocking(&reference, &ImageSource::Registry, &ResolveOptions { offline: true, ..opts.clone() })
            .unwrap();
    assert_eq!(offline.report.origin, ManifestOrigin::Cache(CacheReason::Offline));
    assert_eq!(offline.diff_ids(), image.diff_ids());

    // With an empty cache there is nothing to fall back on.
    let empty = TempDir::new("reg-empty");
    let err = resolve_blocking(&reference, &ImageSource::Registry, &options(&empty)).unwrap_err();
    let msg = err.to_string();
    eprintln!("registry stopped, empty cache: {msg}");
    assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{msg}");
    assert!(
        msg.contains(&registry.addr) && msg.contains("refused the connection") && msg.contains("no cached resolution"),
        "{msg}"
    );
    let err =
        resolve_blocking(&reference, &ImageSource::Registry, &ResolveOptions { offline: true, ..options(&empty) })
            .unwrap_err();
    eprintln!("offline, empty cache: {err}");
    assert!(matches!(err, ImageError::NotCached { .. }), "{err}");

    // Another tag of the same repository was never resolved: not served.
    let other = format!("{}/test/busybox:v2", registry.addr);
    let err = resolve_blocking(&other, &ImageSource::Registry, &opts).unwrap_err();
    assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{err}");
}

/// The names in the cache's blob directory that are temporary files.
fn temporaries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn layer_blobs_are_downloaded_checked_and_cached() {
    if !have_tools() {
        return;
    }
    let dir = TempDir::new("reg-blob");
    let image = build_image(busybox_layers("amd64"), "amd64", None);
    let layout = dir.join("layout");
    write_layout(&layout, &image.blobs(), &[("v1", &image.manifest)]);
    let mut registry = Registry::start();
    let reference = push(&registry, &layout, "v1", "test/blobs", false);
    let opts = options(&dir);
    let offline = ResolveOptions { offline: true, ..opts.clone() };
    let blobs = dir.join("cache/blobs/sha256");
    let resolved = resolve_blocking(&reference, &ImageSource::Registry, &opts).unwrap();
    let cached = |digest: &str| blobs.join(digest.strip_prefix("sha256:").unwrap());

    // Offline before any download: a clear refusal.
    let err = layer_blob_blocking(&reference, &ImageSource::Registry, &offline, &resolved.layers[0]).unwrap_err();
    eprintln!("offline, never fetched: {err}");
    assert!(matches!(err, ImageError::BlobNotCached { .. }) && err.to_string().contains("not cached"), "{err}");

    // Downloaded into the content-addressed cache, exactly the blob.
    let gets = registry.blob_gets();
    for (l, built) in resolved.layers.iter().zip(&image.layers) {
        let path = layer_blob_blocking(&reference, &ImageSource::Registry, &opts, l).unwrap();
        assert_eq!(path, cached(&l.digest));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(sha256(&bytes), l.digest);
        assert_eq!(bytes, built.blob.bytes);
    }
    assert_eq!(registry.blob_gets(), gets + 3, "one download per layer:\n{}", registry.log());

    // Again: from the cache, through the async API too.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    for l in &resolved.layers {
        let path = rt.block_on(layer_blob(&reference, &ImageSource::Registry, &opts, l)).unwrap();
        assert_eq!(path, cached(&l.digest));
    }
    assert_eq!(registry.blob_gets(), gets + 3, "nothing downloaded the second time");

    // A corrupt cached copy (one bit flipped, the size unchanged) is
    // detected and fetched again.
    let victim = cached(&resolved.layers[0].digest);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[10] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    let path = layer_blob_blocking(&reference, &ImageSource::Registry, &opts, &resolved.layers[0]).unwrap();
    assert_eq!(sha256(&std::fs::read(&path).unwrap()), resolved.layers[0].digest);
    assert_eq!(registry.blob_gets(), gets + 4, "the corrupt copy was fetched again");

    // A layer whose descriptor understates its size: refused while it
    // streams, and nothing is left in the cache.
    let other = build_image(vec![layer(text_layer("other.txt", "other\n"), Comp::Gzip)], "amd64", None);
    let other_layout = dir.join("other");
    write_layout(&other_layout, &other.blobs(), &[("v1", &other.manifest)]);
    let other_ref = push(&registry, &other_layout, "v1", "test/other", false);
    let mut short = resolve_blocking(&other_ref, &ImageSource::Registry, &opts).unwrap().layers.remove(0);
    short.size -= 1;
    let err = layer_blob_blocking(&other_ref, &ImageSource::Registry, &opts, &short).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
    assert!(!cached(&short.digest).exists());
    assert!(temporaries(&blobs).is_empty(), "{:?}", temporaries(&blobs));

    // Registry stopped: the cached files are served.
    registry.stop();
    for l in &resolved.layers {
        let path = layer_blob_blocking(&reference, &ImageSource::Registry, &opts, l).unwrap();
        assert_eq!(sha256(&std::fs::read(&path).unwrap()), l.digest);
    }
    // ... but a blob never fetched cannot be.
    short.size += 1;
    let err = layer_blob_blocking(&other_ref, &ImageSource::Registry, &opts, &short).unwrap_err();
    eprintln!("registry stopped, blob not cached: {err}");
    assert!(matches!(err, ImageError::RegistryUnreachable { .. }), "{err}");

    // Offline, a corrupt cached copy is refused.
    let victim = cached(&resolved.layers[1].digest);
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() - 1]).unwrap();
    let err = layer_blob_blocking(&reference, &ImageSource::Registry, &offline, &resolved.layers[1]).unwrap_err();
    eprintln!("offline, corrupt copy: {err}");
    assert!(matches!(err, ImageError::BlobNotCached { ref detail, .. } if detail.contains("bytes")), "{err}");
    assert!(temporaries(&blobs).is_empty(), "{:?}", temporaries(&blobs));
}

#[test]
fn registry_multi_arch_index() {
    if !have_tools() {
        return;
    }
    let dir = TempDir::new("reg-multi");
    let amd64 = build_image(busybox_layers("amd64"), "amd64", None);
    let arm64 =
        build_image(vec![layer(text_layer("hello.txt", "hello from capsa on arm64\n"), Comp::Gzip)], "arm64", None);
    let index = build_index(&[(&arm64, "arm64"), (&amd64, "amd64")]);
    let layout = dir.join("layout");
    let mut blobs = amd64.blobs();
    blobs.extend(arm64.blobs());
    write_layout(&layout, &blobs, &[("multi", &index)]);
    let registry = Registry::start();
    let reference = push(&registry, &layout, "multi", "test/multi", true);
    let mut opts = options(&dir);

    let got = resolve_blocking(&reference, &ImageSource::Registry, &opts).unwrap();
    assert_eq!(got.manifest_digest, amd64.manifest.digest);
    assert_eq!(got.index_digest.as_deref(), Some(index.digest.as_str()));
    assert_eq!(got.diff_ids(), amd64.diff_ids());
    assert_eq!(got.platform, Platform::linux_amd64());

    opts.platform = "linux/arm64".parse().unwrap();
    let got = resolve_blocking(&reference, &ImageSource::Registry, &opts).unwrap();
    assert_eq!(got.manifest_digest, arm64.manifest.digest);
    assert_eq!(got.index_digest.as_deref(), Some(index.digest.as_str()));
    assert_eq!(got.diff_ids(), arm64.diff_ids());

    opts.platform = "linux/riscv64".parse().unwrap();
    let err = resolve_blocking(&reference, &ImageSource::Registry, &opts).unwrap_err();
    let msg = err.to_string();
    eprintln!("no such platform: {msg}");
    assert!(matches!(err, ImageError::PlatformNotFound { .. }), "{msg}");
    assert!(msg.contains("linux/amd64") && msg.contains("linux/arm64/v8"), "{msg}");

    // The platform manifest pinned by digest works too.
    opts.platform = Platform::default();
    let pinned = format!("{}/test/multi@{}", registry.addr, arm64.manifest.digest);
    let got = resolve_blocking(&pinned, &ImageSource::Registry, &opts).unwrap();
    assert_eq!(got.diff_ids(), arm64.diff_ids());

    // A missing tag is a clear not-found, not a fallback.
    let missing = format!("{}/test/multi:nope", registry.addr);
    let err = resolve_blocking(&missing, &ImageSource::Registry, &opts).unwrap_err();
    eprintln!("missing tag: {err}");
    assert!(matches!(err, ImageError::RegistryNotFound { .. }), "{err}");
}

#[test]
fn tampered_registry_config_is_refused() {
    if !have_tools() {
        return;
    }
    // The registry holds an image whose config lies about a layer's diff_id.
    let dir = TempDir::new("reg-lie");
    let layers = busybox_layers("amd64");
    let mut diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.clone()).collect();
    diff_ids[0] = sha256(b"not the busybox layer");
    let image = build_image(layers, "amd64", Some(diff_ids.clone()));
    let layout = dir.join("layout");
    write_layout(&layout, &image.blobs(), &[("v1", &image.manifest)]);
    let registry = Registry::start();
    let reference = push(&registry, &layout, "v1", "test/lie", false);
    let err = resolve_blocking(&reference, &ImageSource::Registry, &options(&dir)).unwrap_err();
    eprintln!("lying config: {err}");
    assert!(
        matches!(err, ImageError::DiffIdMismatch { index: 0, ref expected, .. } if expected == &diff_ids[0]),
        "{err}"
    );
}

#[test]
fn plain_http_only_for_loopback_or_listed_registries() {
    // The decision alone; no network.
    assert_eq!(registry_transport("127.0.0.1:5000", &[]), Transport::PlainHttp);
    assert_eq!(registry_transport("localhost:5000", &[]), Transport::PlainHttp);
    assert_eq!(registry_transport("[::1]:5000", &[]), Transport::PlainHttp);
    assert_eq!(registry_transport("registry.example.com:5000", &[]), Transport::Https);
    assert_eq!(registry_transport("10.1.2.3:5000", &[]), Transport::Https);
    assert_eq!(registry_transport("docker.io", &[]), Transport::Https);
    let insecure = vec!["registry.example.com:5000".to_owned()];
    assert_eq!(registry_transport("registry.example.com:5000", &insecure), Transport::PlainHttp);
    assert_eq!(registry_transport("registry.example.com:5001", &insecure), Transport::Https);
}
