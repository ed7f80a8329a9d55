//! Image resolution from local sources: OCI layouts, oci-archives and
//! docker-archives (the archives made by skopeo from layouts built here).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

mod support;

use capsa_oci::image::{
    ImageError, ImageSource, ManifestOrigin, Platform, layer_blob, layer_blob_blocking, resolve_blocking,
};
use support::*;

/// The busybox image written as a layout tagged `v1`.
fn busybox_layout(dir: &TempDir) -> (Image, std::path::PathBuf) {
    let image = build_image(busybox_layers("amd64"), "amd64", None);
    let layout = dir.join("layout");
    write_layout(&layout, &image.blobs(), &[("v1", &image.manifest)]);
    (image, layout)
}

#[test]
fn layout_oci_archive_and_docker_archive_agree() {
    let dir = TempDir::new("local");
    let (image, layout) = busybox_layout(&dir);
    let opts = options(&dir);

    let from_layout = resolve_blocking("v1", &ImageSource::OciLayout(layout.clone()), &opts).unwrap();
    assert_image(&from_layout, &image);
    assert_eq!(from_layout.manifest_digest, image.manifest.digest);
    assert_eq!(from_layout.config_digest, image.config.digest);
    assert_eq!(from_layout.digests(), image.layer_digests());
    assert_eq!(from_layout.index_digest, None);
    assert_eq!(from_layout.platform, Platform::linux_amd64());
    assert_eq!(from_layout.report.origin, ManifestOrigin::Layout);
    assert_eq!(from_layout.report.layers_hashed, 3);
    assert!(from_layout.layers.iter().all(|l| l.media_type == LAYER_GZIP));

    // The full reference finds the same image by its tag annotation.
    let full =
        resolve_blocking("127.0.0.1:5000/test/busybox:v1", &ImageSource::OciLayout(layout.clone()), &opts).unwrap();
    assert_eq!(full.manifest_digest, image.manifest.digest);
    // Second time round the diff_ids come from the cache, but the blobs are
    // still re-hashed (a local layout can change under us).
    assert_eq!(full.report.layers_from_cache, 3);
    assert_eq!(full.report.layers_hashed, 0);
    // So does a digest.
    let pinned = format!("test/busybox@{}", image.manifest.digest);
    let by_digest = resolve_blocking(&pinned, &ImageSource::OciLayout(layout.clone()), &opts).unwrap();
    assert_eq!(by_digest.diff_ids(), image.diff_ids());

    let err = resolve_blocking("v2", &ImageSource::OciLayout(layout.clone()), &opts).unwrap_err();
    assert!(matches!(err, ImageError::NotInLocalSource { ref available, .. } if available == &["v1"]), "{err}");

    if !have("skopeo") {
        return;
    }
    let oci_archive = dir.join("image.oci.tar");
    let docker_archive = dir.join("image.docker.tar");
    let src = format!("oci:{}:v1", layout.display());
    skopeo(&["copy", &src, &format!("oci-archive:{}:v1", oci_archive.display())]);
    skopeo(&["copy", &src, &format!("docker-archive:{}:test/busybox:v1", docker_archive.display())]);

    let from_oci_archive = resolve_blocking("v1", &ImageSource::OciArchive(oci_archive.clone()), &opts).unwrap();
    assert_image(&from_oci_archive, &image);
    assert_eq!(from_oci_archive.manifest_digest, image.manifest.digest);
    assert_eq!(from_oci_archive.digests(), image.layer_digests());

    // docker-archive: tags as `docker save` writes them, uncompressed layers,
    // the same diff_ids.
    for reference in ["test/busybox:v1", "docker.io/test/busybox:v1"] {
        let from_docker =
            resolve_blocking(reference, &ImageSource::DockerArchive(docker_archive.clone()), &opts).unwrap();
        assert_image(&from_docker, &image);
        assert_eq!(from_docker.report.origin, ManifestOrigin::DockerArchive);
        // Uncompressed layers: the stored digest is the diff_id.
        for l in &from_docker.layers {
            assert_eq!(l.digest, l.diff_id);
            assert_eq!(l.media_type, "application/vnd.docker.image.rootfs.diff.tar");
        }
    }
    let err = resolve_blocking("test/busybox:v2", &ImageSource::DockerArchive(docker_archive), &opts).unwrap_err();
    assert!(matches!(err, ImageError::NotInLocalSource { .. }), "{err}");
}

#[test]
fn multi_arch_layout_selects_the_platform() {
    let dir = TempDir::new("multi");
    let amd64 = build_image(busybox_layers("amd64"), "amd64", None);
    let arm64 =
        build_image(vec![layer(text_layer("hello.txt", "hello from capsa on arm64\n"), Comp::Gzip)], "arm64", None);
    let index = build_index(&[(&arm64, "arm64"), (&amd64, "amd64")]);
    let layout = dir.join("layout");
    let mut blobs = amd64.blobs();
    blobs.extend(arm64.blobs());
    write_layout(&layout, &blobs, &[("multi", &index)]);
    let src = ImageSource::OciLayout(layout.clone());
    let mut opts = options(&dir);

    let got = resolve_blocking("multi", &src, &opts).unwrap();
    assert_eq!(got.manifest_digest, amd64.manifest.digest);
    assert_eq!(got.index_digest.as_deref(), Some(index.digest.as_str()));
    assert_eq!(got.diff_ids(), amd64.diff_ids());

    opts.platform = "linux/arm64".parse().unwrap();
    let got = resolve_blocking("multi", &src, &opts).unwrap();
    assert_eq!(got.manifest_digest, arm64.manifest.digest);
    assert_eq!(got.diff_ids(), arm64.diff_ids());
    assert_eq!(got.platform.architecture, "arm64");

    opts.platform = "linux/s390x".parse().unwrap();
    let err = resolve_blocking("multi", &src, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ImageError::PlatformNotFound { .. }), "{msg}");
    assert!(msg.contains("linux/amd64") && msg.contains("linux/arm64/v8") && msg.contains("linux/s390x"), "{msg}");

    // The same index via an oci-archive.
    if have("skopeo") {
        let archive = dir.join("multi.oci.tar");
        skopeo(&[
            "copy",
            "--all",
            &format!("oci:{}:multi", layout.display()),
            &format!("oci-archive:{}:multi", archive.display()),
        ]);
        opts.platform = Platform::default();
        let got = resolve_blocking("multi", &ImageSource::OciArchive(archive), &opts).unwrap();
        assert_eq!(got.manifest_digest, amd64.manifest.digest);
        assert_eq!(got.index_digest.as_deref(), Some(index.digest.as_str()));
    }
}

#[test]
fn tampered_layout_blob_is_refused() {
    let dir = TempDir::new("tamper");
    let (image, layout) = busybox_layout(&dir);
    let opts = options(&dir);
    // Resolve once so that the cache knows the genuine layers: the cache
    // must not hide tampering.
    resolve_blocking("v1", &ImageSource::OciLayout(layout.clone()), &opts).unwrap();

    let victim = blob_file(&layout, &image.layers[1].blob.digest);
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 9; // inside the deflate stream, before the trailer
    bytes[last] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    let err = resolve_blocking("v1", &ImageSource::OciLayout(layout.clone()), &opts).unwrap_err();
    match &err {
        ImageError::DigestMismatch { what, expected, actual, .. } => {
            assert_eq!(what, "layer 1");
            assert_eq!(expected, &image.layers[1].blob.digest);
            assert_ne!(actual, expected);
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(err.to_string().contains("tampered"), "{err}");

    // A fresh cache: the same, through the decompressing path.
    let fresh = TempDir::new("tamper-fresh");
    let err = resolve_blocking("v1", &ImageSource::OciLayout(layout.clone()), &options(&fresh)).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. } | ImageError::LayerDecode { index: 1, .. }), "{err}");

    // A truncated blob is refused for its size.
    bytes.truncate(bytes.len() - 1);
    std::fs::write(&victim, &bytes).unwrap();
    let err = resolve_blocking("v1", &ImageSource::OciLayout(layout.clone()), &opts).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");

    // A tampered config is refused too.
    std::fs::write(blob_file(&layout, &image.layers[1].blob.digest), &image.layers[1].blob.bytes).unwrap();
    let config = blob_file(&layout, &image.config.digest);
    let text = String::from_utf8(std::fs::read(&config).unwrap()).unwrap();
    std::fs::write(&config, text.replace("1000:1000", "0000:0000")).unwrap();
    let err = resolve_blocking("v1", &ImageSource::OciLayout(layout), &opts).unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { ref what, .. } if what == "image config"), "{err}");
}

#[test]
fn config_with_other_diff_ids_is_refused() {
    let dir = TempDir::new("diffids");
    let layers = busybox_layers("amd64");
    let mut lying = layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>();
    let honest = lying[2].clone();
    lying[2] = sha256(b"some other tar");
    let image = build_image(layers, "amd64", Some(lying.clone()));
    let layout = dir.join("layout");
    write_layout(&layout, &image.blobs(), &[("v1", &image.manifest)]);

    let err = resolve_blocking("v1", &ImageSource::OciLayout(layout.clone()), &options(&dir)).unwrap_err();
    match &err {
        ImageError::DiffIdMismatch { index, expected, actual, digest, .. } => {
            assert_eq!(*index, 2);
            assert_eq!(expected, &lying[2]);
            assert_eq!(actual, &honest);
            assert_eq!(digest, &image.layers[2].blob.digest);
        }
        other => panic!("expected a diff_id mismatch, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("layer 2") && msg.contains(&lying[2]) && msg.contains(&honest), "{msg}");

    // The same with every layer's diff_id cached already: still refused.
    let good = build_image(busybox_layers("amd64"), "amd64", None);
    let good_layout = dir.join("good");
    write_layout(&good_layout, &good.blobs(), &[("v1", &good.manifest)]);
    resolve_blocking("v1", &ImageSource::OciLayout(good_layout), &options(&dir)).unwrap();
    let err = resolve_blocking("v1", &ImageSource::OciLayout(layout), &options(&dir)).unwrap_err();
    assert!(matches!(err, ImageError::DiffIdMismatch { index: 2, .. }), "{err}");

    // Fewer diff_ids than layers.
    let short = build_image(busybox_layers("amd64"), "amd64", Some(lying[..2].to_vec()));
    let short_layout = dir.join("short");
    write_layout(&short_layout, &short.blobs(), &[("v1", &short.manifest)]);
    let err = resolve_blocking("v1", &ImageSource::OciLayout(short_layout), &options(&dir)).unwrap_err();
    assert!(matches!(err, ImageError::LayerCountMismatch { layers: 3, diff_ids: 2, .. }), "{err}");
}

#[test]
fn zstd_and_uncompressed_layers() {
    let dir = TempDir::new("comp");
    let layers = vec![
        layer(busybox_rootfs(), Comp::Zstd),
        layer(whiteout_layer(), Comp::None),
        layer(text_layer("hello.txt", "zstd\n"), Comp::Gzip),
    ];
    let image = build_image(layers, "amd64", None);
    let layout = dir.join("layout");
    write_layout(&layout, &image.blobs(), &[("docker.io/library/mixed:1", &image.manifest)]);
    // A full-reference annotation, matched after normalization.
    let got = resolve_blocking("mixed:1", &ImageSource::OciLayout(layout), &options(&dir)).unwrap();
    assert_eq!(got.diff_ids(), image.diff_ids());
    let types: Vec<&str> = got.layers.iter().map(|l| l.media_type.as_str()).collect();
    assert_eq!(types, [LAYER_ZSTD, LAYER_TAR, LAYER_GZIP]);
    assert_eq!(got.layers[1].digest, got.layers[1].diff_id);
}

#[test]
fn not_a_layout() {
    let dir = TempDir::new("notlayout");
    let err = resolve_blocking("v1", &ImageSource::OciLayout(dir.path().to_path_buf()), &options(&dir)).unwrap_err();
    assert!(err.to_string().contains("oci-layout"), "{err}");
    let err = resolve_blocking("v1", &ImageSource::OciArchive(dir.join("missing.tar")), &options(&dir)).unwrap_err();
    assert!(matches!(err, ImageError::Io { .. }), "{err}");
}

/// SHA-256 of a file, as `sha256:<hex>`.
fn file_digest(path: &std::path::Path) -> String {
    sha256(&std::fs::read(path).unwrap())
}

/// The temporary files the cache's blob directory holds (there must be none).
fn temporaries(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn layer_blobs_from_a_layout_are_checked_in_place() {
    let dir = TempDir::new("blob-layout");
    let (image, layout) = busybox_layout(&dir);
    let opts = options(&dir);
    let source = ImageSource::OciLayout(layout.clone());
    let resolved = resolve_blocking("v1", &source, &opts).unwrap();
    for (l, built) in resolved.layers.iter().zip(&image.layers) {
        let path = layer_blob_blocking("v1", &source, &opts, l).unwrap();
        assert_eq!(path, blob_file(&layout, &l.digest), "the layout's own file, not a copy");
        assert_eq!(file_digest(&path), l.digest);
        assert_eq!(std::fs::read(&path).unwrap(), built.blob.bytes);
    }
    assert!(!dir.join("cache/blobs/sha256").join(resolved.layers[0].digest.strip_prefix("sha256:").unwrap()).exists());

    // Changed after resolution: refused, by digest or by size.
    let victim = blob_file(&layout, &resolved.layers[1].digest);
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[100] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();
    let err = layer_blob_blocking("v1", &source, &opts, &resolved.layers[1]).unwrap_err();
    assert!(
        matches!(err, ImageError::DigestMismatch { ref expected, .. } if expected == &resolved.layers[1].digest),
        "{err}"
    );
    bytes.pop();
    std::fs::write(&victim, &bytes).unwrap();
    let err = layer_blob_blocking("v1", &source, &opts, &resolved.layers[1]).unwrap_err();
    assert!(matches!(err, ImageError::SizeMismatch { .. }), "{err}");
    std::fs::remove_file(&victim).unwrap();
    let err = layer_blob_blocking("v1", &source, &opts, &resolved.layers[1]).unwrap_err();
    eprintln!("missing layout blob: {err}");
    assert!(matches!(err, ImageError::InvalidLocalSource { .. }) && err.to_string().contains("missing"), "{err}");

    // A digest that is not sha256 is refused before anything is read.
    let mut odd = resolved.layers[0].clone();
    odd.digest = "sha512:00".into();
    let err = layer_blob_blocking("v1", &source, &opts, &odd).unwrap_err();
    assert!(matches!(err, ImageError::Unsupported { .. }), "{err}");

    // The async API, from inside a runtime.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let path = rt.block_on(layer_blob("v1", &source, &opts, &resolved.layers[0])).unwrap();
    assert_eq!(file_digest(&path), resolved.layers[0].digest);
}

#[test]
fn layer_blobs_from_archives_are_extracted_to_the_cache() {
    if !have("skopeo") {
        return;
    }
    let dir = TempDir::new("blob-archive");
    let (image, layout) = busybox_layout(&dir);
    let opts = options(&dir);
    let blobs = dir.join("cache/blobs/sha256");
    let oci_archive = dir.join("image.oci.tar");
    let docker_archive = dir.join("image.docker.tar");
    let src = format!("oci:{}:v1", layout.display());
    skopeo(&["copy", &src, &format!("oci-archive:{}:v1", oci_archive.display())]);
    skopeo(&["copy", &src, &format!("docker-archive:{}:test/busybox:v1", docker_archive.display())]);

    let source = ImageSource::OciArchive(oci_archive);
    let resolved = resolve_blocking("v1", &source, &opts).unwrap();
    for (l, built) in resolved.layers.iter().zip(&image.layers) {
        let path = layer_blob_blocking("v1", &source, &opts, l).unwrap();
        assert_eq!(path, blobs.join(l.digest.strip_prefix("sha256:").unwrap()));
        assert_eq!(std::fs::read(&path).unwrap(), built.blob.bytes);
    }
    // A wrong cached copy is replaced from the archive.
    let first = blobs.join(resolved.layers[0].digest.strip_prefix("sha256:").unwrap());
    std::fs::write(&first, b"not the layer").unwrap();
    let path = layer_blob_blocking("v1", &source, &opts, &resolved.layers[0]).unwrap();
    assert_eq!(file_digest(&path), resolved.layers[0].digest);

    // docker-archive: uncompressed layers found by diff_id, as a tar and
    // unpacked in a directory (checked in place there).
    let source = ImageSource::DockerArchive(docker_archive.clone());
    let resolved = resolve_blocking("test/busybox:v1", &source, &opts).unwrap();
    for l in &resolved.layers {
        let path = layer_blob_blocking("test/busybox:v1", &source, &opts, l).unwrap();
        assert_eq!(path, blobs.join(l.digest.strip_prefix("sha256:").unwrap()));
        assert_eq!(file_digest(&path), l.digest);
    }
    let unpacked = dir.join("docker-dir");
    tar::Archive::new(std::fs::File::open(&docker_archive).unwrap()).unpack(&unpacked).unwrap();
    let source = ImageSource::DockerArchive(unpacked.clone());
    for l in &resolved.layers {
        let path = layer_blob_blocking("test/busybox:v1", &source, &opts, l).unwrap();
        assert!(path.starts_with(&unpacked), "{}", path.display());
        assert_eq!(file_digest(&path), l.digest);
    }
    // A layer the image does not have.
    let mut other = resolved.layers[0].clone();
    other.diff_id = sha256(b"another layer");
    other.digest = other.diff_id.clone();
    let err =
        layer_blob_blocking("test/busybox:v1", &ImageSource::DockerArchive(docker_archive), &opts, &other).unwrap_err();
    eprintln!("no such layer: {err}");
    assert!(matches!(err, ImageError::LayerNotInImage { .. }), "{err}");
    assert!(temporaries(&blobs).is_empty(), "{:?}", temporaries(&blobs));
}
