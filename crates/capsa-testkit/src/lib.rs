//! Test support shared by capsa's crates: images built by the tests
//! themselves from real files (Debian's static busybox), written as OCI
//! layouts, pushed with skopeo to a real registry (Debian's docker-registry)
//! on 127.0.0.1.
//!
//! Nothing is downloaded: the only network traffic is to the loopback
//! registry. A dev-dependency only; panics are how it reports a broken
//! test environment.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_lc_rs::digest::{SHA256, digest};
use serde_json::{Value, json};

pub mod azurite;
pub use azurite::Azurite;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(digest(&SHA256, bytes).as_ref()))
}

/// Whether an external tool is installed; tests that need it skip (loudly)
/// without it, unless CAPSA_REQUIRE_TOOLS is set, when they fail.
pub fn have(tool: &str) -> bool {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    if !found {
        if std::env::var_os("CAPSA_REQUIRE_TOOLS").is_some() {
            panic!("{tool} is required (CAPSA_REQUIRE_TOOLS is set) but not installed");
        }
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

/// An artifact the test suite builds outside cargo (the static agent,
/// capsa-unseal), named by the environment variable `var`; `how` says how
/// to build it. Missing: skips (loudly), or fails under CAPSA_REQUIRE_TOOLS,
/// as [`have`] does for tools.
pub fn built(var: &str, how: &str) -> Option<PathBuf> {
    let found = std::env::var_os(var).map(PathBuf::from);
    if found.is_none() {
        if std::env::var_os("CAPSA_REQUIRE_TOOLS").is_some() {
            panic!("{var} is required (CAPSA_REQUIRE_TOOLS is set) but not set: {how}");
        }
        eprintln!("SKIPPED: {var} is not set: {how}");
    }
    found
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "capsa-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }

    /// The path of `p` inside, as a command-line argument.
    pub fn arg(&self, p: &str) -> String {
        self.0.join(p).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A deterministic tar: fixed owner and times, entries in the given order.
pub struct TarBuilder(tar::Builder<Vec<u8>>);

impl Default for TarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl TarBuilder {
    pub fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(size);
        h
    }

    pub fn dir(mut self, path: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Directory, 0o755, 0);
        self.0.append_data(&mut h, path, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, path: &str, mode: u32, data: &[u8]) -> Self {
        let mut h = Self::header(tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Comp {
    Gzip,
    Zstd,
    None,
}

/// A blob and its descriptor fields.
#[derive(Clone, Debug)]
pub struct Blob {
    pub bytes: Vec<u8>,
    pub digest: String,
    pub media_type: String,
}

impl Blob {
    pub fn new(bytes: Vec<u8>, media_type: &str) -> Self {
        Self { digest: sha256(&bytes), bytes, media_type: media_type.to_owned() }
    }

    pub fn descriptor(&self) -> Value {
        json!({"mediaType": self.media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// A layer: its stored blob and the digest of its tar.
#[derive(Clone, Debug)]
pub struct BuiltLayer {
    pub blob: Blob,
    pub diff_id: String,
}

pub fn layer(tar: Vec<u8>, comp: Comp) -> BuiltLayer {
    let diff_id = sha256(&tar);
    let blob = match comp {
        Comp::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&tar).unwrap();
            Blob::new(e.finish().unwrap(), LAYER_GZIP)
        }
        Comp::Zstd => Blob::new(zstd::encode_all(&tar[..], 3).unwrap(), LAYER_ZSTD),
        Comp::None => Blob::new(tar, LAYER_TAR),
    };
    BuiltLayer { blob, diff_id }
}

/// The busybox rootfs: Debian's static busybox and its applet links.
pub fn busybox_rootfs() -> Vec<u8> {
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox-static is installed at /usr/bin/busybox");
    let mut t = TarBuilder::new().dir("bin/").file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "ls", "cat", "echo", "env", "id"] {
        t = t.symlink(&format!("bin/{applet}"), "busybox");
    }
    t.dir("etc/")
        .file("etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
        .file("etc/group", 0o644, b"root:x:0:\nuser:x:1000:\n")
        .file("etc/removeme", 0o644, b"deleted by the next layer\n")
        .dir("data/")
        .file("data/a", 0o644, b"a\n")
        .file("data/b", 0o644, b"b\n")
        .finish()
}

/// A layer deleting a file (whiteout) and replacing a directory's contents
/// (opaque whiteout).
pub fn whiteout_layer() -> Vec<u8> {
    TarBuilder::new()
        .dir("etc/")
        .file("etc/.wh.removeme", 0o644, b"")
        .dir("data/")
        .file("data/.wh..wh..opq", 0o644, b"")
        .file("data/c", 0o644, b"c\n")
        .finish()
}

pub fn text_layer(name: &str, text: &str) -> Vec<u8> {
    TarBuilder::new().file(name, 0o644, text.as_bytes()).finish()
}

/// The standard test image's layers for an architecture, all gzip.
pub fn busybox_layers(arch: &str) -> Vec<BuiltLayer> {
    vec![
        layer(busybox_rootfs(), Comp::Gzip),
        layer(whiteout_layer(), Comp::Gzip),
        layer(text_layer("hello.txt", &format!("hello from capsa on {arch}\n")), Comp::Gzip),
    ]
}

/// An image: manifest, config and layers.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest: Blob,
    pub config: Blob,
    pub layers: Vec<BuiltLayer>,
}

impl Image {
    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.diff_id.clone()).collect()
    }

    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.blob.digest.clone()).collect()
    }

    pub fn blobs(&self) -> Vec<&Blob> {
        let mut v = vec![&self.manifest, &self.config];
        v.extend(self.layers.iter().map(|l| &l.blob));
        v
    }
}

/// Builds an image for `arch` from `layers`; `diff_ids` overrides the
/// config's rootfs.diff_ids (to build a lying config).
pub fn build_image(layers: Vec<BuiltLayer>, arch: &str, diff_ids: Option<Vec<String>>) -> Image {
    let process = json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["cat /hello.txt"],
        "Env": ["PATH=/bin", "GREETING=hello"],
        "WorkingDir": "/data",
        "User": "1000:1000"
    });
    build_image_with(layers, arch, diff_ids, process)
}

/// Builds an image with the given process config (`Entrypoint`, `Cmd`,
/// `Env`, `WorkingDir`, `User`).
pub fn build_image_with(layers: Vec<BuiltLayer>, arch: &str, diff_ids: Option<Vec<String>>, process: Value) -> Image {
    let diff_ids = diff_ids.unwrap_or_else(|| layers.iter().map(|l| l.diff_id.clone()).collect());
    let mut config = json!({
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": process,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if arch == "arm64" {
        config["variant"] = json!("v8");
    }
    let config = Blob::new(serde_json::to_vec(&config).unwrap(), OCI_CONFIG);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": layers.iter().map(|l| l.blob.descriptor()).collect::<Vec<_>>(),
    });
    let manifest = Blob::new(serde_json::to_vec(&manifest).unwrap(), OCI_MANIFEST);
    Image { manifest, config, layers }
}

/// An index over images, each with its architecture.
pub fn build_index(images: &[(&Image, &str)]) -> Blob {
    let manifests: Vec<Value> = images
        .iter()
        .map(|(img, arch)| {
            let mut d = img.manifest.descriptor();
            d["platform"] = if *arch == "arm64" {
                json!({"architecture": arch, "os": "linux", "variant": "v8"})
            } else {
                json!({"architecture": arch, "os": "linux"})
            };
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    Blob::new(serde_json::to_vec(&index).unwrap(), OCI_INDEX)
}

/// Writes an OCI layout at `dir` holding `blobs`, with `refs` (name, top
/// blob) in index.json.
pub fn write_layout(dir: &Path, blobs: &[&Blob], refs: &[(&str, &Blob)]) {
    let blob_dir = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).unwrap();
    for b in blobs.iter().copied().chain(refs.iter().map(|(_, b)| *b)) {
        std::fs::write(blob_dir.join(b.digest.strip_prefix("sha256:").unwrap()), &b.bytes).unwrap();
    }
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let manifests: Vec<Value> = refs
        .iter()
        .map(|(name, b)| {
            let mut d = b.descriptor();
            d["annotations"] = json!({"org.opencontainers.image.ref.name": name});
            d
        })
        .collect();
    let index = json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
}

/// The path of a blob in a layout.
pub fn blob_file(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap())
}

/// Runs skopeo with a permissive signature policy (the images are our own).
pub fn skopeo(args: &[&str]) {
    let out =
        Command::new("skopeo").arg("--insecure-policy").args(args).stdin(Stdio::null()).output().expect("skopeo runs");
    assert!(
        out.status.success(),
        "skopeo {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Debian's docker-registry on 127.0.0.1 with a random free port and its
/// own storage; killed when dropped.
pub struct Registry {
    child: Option<Child>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: TempDir,
}

impl Registry {
    pub fn start() -> Self {
        for _ in 0..3 {
            let dir = TempDir::new("registry");
            // Pick a free port; the registry binds it a moment later.
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let addr = format!("127.0.0.1:{port}");
            let config = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("storage").display()
            );
            std::fs::write(dir.join("config.yml"), config).unwrap();
            let log = std::fs::File::create(dir.join("registry.log")).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(dir.join("config.yml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("docker-registry starts");
            let mut reg = Self { child: Some(child), addr, dir };
            if reg.wait_ready() {
                return reg;
            }
            eprintln!("registry did not come up:\n{}", reg.log());
            reg.stop();
        }
        panic!("docker-registry did not start");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            if let Ok(mut s) = TcpStream::connect(&self.addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let req = format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.addr);
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut resp = String::new();
                    let _ = s.read_to_string(&mut resp);
                    if resp.starts_with("HTTP/1.1 200") {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }

    /// How many blob GETs the registry has served so far (from its access
    /// log).
    pub fn blob_gets(&self) -> usize {
        self.log().lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:")).count()
    }

    /// Kills the registry and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}
