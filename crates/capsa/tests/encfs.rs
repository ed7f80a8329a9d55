//! Encrypted filesystems end to end: an image made with `capsa encfs create`
//! in Azurite (blob storage on loopback), its key in the trust service with a
//! release policy, a pod whose CSI volume `capsa policy gen` pinned, run in a
//! sim sandbox under TCG: the workload reads the files; a sandbox of another
//! policy gets 403 and mounts nothing; a sandbox killed in a write burst
//! leaves an image that opens with every fsynced file intact; and a LUKS2
//! image made with Azure's recipe mounts read-only in a sandbox.
//!
//! Needs QEMU, Azurite (`azurite-blob`, npm), root with /dev/fuse and loop
//! devices (to read the image back on the host), a guest kernel and the
//! static agent (`scripts/build-agent`; `CAPSA_AGENT`). Skipped when one is
//! missing; failed instead under `CAPSA_REQUIRE_TOOLS=1`, as CI runs.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;
use common::trust::Trust;
use common::{capsa, run};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use capsa_testkit::{Azurite, TempDir, build_image_with, write_layout};
use serde_json::json;

struct Setup {
    home: TempDir,
    guest: PathBuf,
    layout: PathBuf,
    measurement: String,
    trust: Trust,
    azurite: Azurite,
}

fn setup() -> Option<Setup> {
    let qemu = capsa_testkit::have("qemu-system-x86_64");
    let agent = capsa_testkit::built("CAPSA_AGENT", "run scripts/build-agent")?;
    let fuse = std::path::Path::new("/dev/fuse").exists() && std::path::Path::new("/dev/loop-control").exists();
    if !fuse {
        assert!(std::env::var_os("CAPSA_REQUIRE_TOOLS").is_none(), "/dev/fuse and /dev/loop-control are required");
        eprintln!("SKIPPED: no /dev/fuse or /dev/loop-control");
        return None;
    }
    if !qemu {
        return None;
    }
    let azurite = Azurite::start()?;
    azurite.create_container("images");
    let home = TempDir::new("encfs");
    let (guest, measurement) = common::guest(home.path(), &agent);
    let image = build_image_with(
        vec![common::busybox_layer(&["sh", "cat", "echo", "sha256sum", "dd", "ls", "sleep"])],
        "amd64",
        None,
        json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "User": "0:0"}),
    );
    let layout = home.join("layout");
    write_layout(&layout, &image.blobs(), &[("app:1", &image.manifest)]);
    let trust = Trust::start(home.path());
    Some(Setup { home, guest, layout, measurement, trust, azurite })
}

impl Setup {
    fn image_url(&self, name: &str) -> String {
        self.azurite.url("images", name)
    }

    /// A pod with an encfs CSI volume mounted at /data, annotated by
    /// `capsa policy gen`; returns it and its HOST_DATA.
    fn pod(&self, name: &str, volume_url: &str, read_only: bool, script: &str) -> (PathBuf, String) {
        let pod = format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n  - name: app\n    image: app:1\n    command: [\"/bin/sh\", \"-c\", {script}]\n    volumeMounts:\n    - name: data\n      mountPath: /data\n  volumes:\n  - name: data\n    csi:\n      driver: encfs.capsa.dev\n      readOnly: {read_only}\n      volumeAttributes:\n        url: {volume_url}\n        key: {name}-key\n",
            script = serde_json::Value::from(script)
        );
        let path = self.home.join(&format!("{name}.yaml"));
        std::fs::write(&path, pod).unwrap();
        let annotated = self.home.join(&format!("{name}.annotated.yaml"));
        let host_data = common::policy_gen(
            self.home.path(),
            &[
                path.to_str().unwrap(),
                "--oci-layout",
                self.layout.to_str().unwrap(),
                "--trust",
                &format!("http://localhost:{}", self.trust.port),
                "--out",
                annotated.to_str().unwrap(),
            ],
        );
        (annotated, host_data)
    }

    fn run_args<'a>(&'a self, pod: &'a Path) -> Vec<&'a str> {
        vec![
            "run",
            "--pod",
            pod.to_str().unwrap(),
            "--oci-layout",
            self.layout.to_str().unwrap(),
            "--guest",
            self.guest.to_str().unwrap(),
        ]
    }

    fn release_policy_file(&self, name: &str, host_data: &str) -> PathBuf {
        let path = self.home.join(&format!("{name}.release.json"));
        std::fs::write(&path, self.trust.release_policy(host_data, &self.measurement).to_string()).unwrap();
        path
    }
}

/// Deterministic bytes, so the test knows what the workload must read.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes))
}

#[test]
fn a_sandbox_reads_its_encrypted_volume_and_another_policy_gets_nothing() {
    let Some(s) = setup() else { return };
    let source = s.home.join("tree");
    std::fs::create_dir_all(source.join("nested")).unwrap();
    std::fs::write(source.join("hello.txt"), "hello from an encrypted filesystem\n").unwrap();
    let data = pattern(300 << 10, 7);
    std::fs::write(source.join("nested/data.bin"), &data).unwrap();

    let url = s.image_url("data");
    let (pod, host_data) =
        s.pod("data", &url, true, "cat /data/hello.txt; sha256sum /data/nested/data.bin; ls /data/nested");
    // The key is generated by `capsa encfs create` and leaves it only to the
    // trust service, bound to this pod's HOST_DATA.
    let policy = s.release_policy_file("data", &host_data);
    let out = run(
        s.home.path(),
        &[
            "encfs",
            "create",
            source.to_str().unwrap(),
            "--out",
            &url,
            "--key-name",
            "data-key",
            "--release-policy",
            policy.to_str().unwrap(),
            "--trust",
            &s.trust.url,
            "--admin-token-file",
            s.trust.admin_token.to_str().unwrap(),
            "--work-dir",
            s.home.join("run").to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert!(!s.home.join("data-key").exists());

    let out = run(s.home.path(), &s.run_args(&pod));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("hello from an encrypted filesystem"), "{stdout}");
    assert!(stdout.contains(&format!("{}  /data/nested/data.bin", sha256_hex(&data))), "{stdout}");

    // Another policy (another command) has another HOST_DATA: the broker
    // refuses the key, create_sandbox fails naming the volume, and the
    // workload never runs.
    let (other, _) = s.pod("data", &url, true, "echo SHOULD-NOT-RUN; cat /data/hello.txt");
    let out = run(s.home.path(), &s.run_args(&other));
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stdout.contains("SHOULD-NOT-RUN") && !stdout.contains("hello from"), "{stdout}");
    assert!(stderr.contains("encfs volume data") && stderr.contains("403"), "{stderr}");
    assert!(stderr.contains("release policy"), "the refusal names the failing clause: {stderr}");
}

/// Reads lines of `child`'s stdout until `done` says so or the deadline.
fn read_until(child: &mut Child, deadline: Duration, mut done: impl FnMut(&str) -> bool) -> Vec<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    let mut lines = Vec::new();
    while start.elapsed() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let stop = done(&line);
                lines.push(line);
                if stop {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break,
        }
    }
    lines
}

#[test]
fn a_sandbox_killed_in_a_write_burst_leaves_every_fsynced_file() {
    let Some(s) = setup() else { return };
    let empty = s.home.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let key_file = s.home.join("burst.key");
    std::fs::write(&key_file, pattern(32, 99)).unwrap();
    let url = s.image_url("burst");
    // 64 KiB files, each fsynced by dd before its hash is printed: a printed
    // hash is a file the image must keep.
    let script = "i=0; while [ $i -lt 400 ]; do i=$((i+1)); \
                  dd if=/dev/urandom of=/data/f$i bs=4096 count=16 conv=fsync 2>/dev/null || exit 1; \
                  sha256sum /data/f$i; done; echo burst-finished";
    let (pod, host_data) = s.pod("burst", &url, false, script);
    let out = run(
        s.home.path(),
        &[
            "encfs",
            "create",
            empty.to_str().unwrap(),
            "--out",
            &url,
            "--size",
            "256M",
            "--key-file",
            key_file.to_str().unwrap(),
            "--work-dir",
            s.home.join("run").to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    s.trust.create_key(s.home.path(), "burst-key", &std::fs::read(&key_file).unwrap(), &host_data, &s.measurement);

    let mut child = capsa(s.home.path()).args(s.run_args(&pod)).stdout(Stdio::piped()).spawn().unwrap();
    let mut synced = 0;
    let lines = read_until(&mut child, Duration::from_secs(240), |line| {
        if line.contains("/data/f") {
            synced += 1;
        }
        synced >= 12 || line.contains("burst-finished")
    });
    // SIGKILL: capsa run dies at once, and QEMU with it (its parent-death
    // signal): no unmount, no last commit.
    child.kill().unwrap();
    child.wait().unwrap();
    let fsynced: Vec<(String, String)> = lines
        .iter()
        .filter_map(|l| {
            let (hash, path) = l.split_once("  /data/")?;
            Some((hash.to_owned(), path.to_owned()))
        })
        .collect();
    assert!(fsynced.len() >= 12, "the workload wrote too little before the kill: {lines:?}");
    assert!(!lines.iter().any(|l| l.contains("burst-finished")), "the burst ended before the kill: {lines:?}");

    // The image opens and checks whole, and every fsynced file is there
    // (mounted read-write: ext4 replays its journal, as after a power cut).
    let out = run(s.home.path(), &["encfs", "check", &url, "--key-file", key_file.to_str().unwrap()]);
    assert!(out.status.success());
    let mount = s.home.join("mnt");
    std::fs::create_dir_all(&mount).unwrap();
    let mut mounted = capsa(s.home.path())
        .args(["encfs", "mount", &url, mount.to_str().unwrap()])
        .args(["--key-file", key_file.to_str().unwrap(), "--work-dir", s.home.join("run").to_str().unwrap()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !mount.join("lost+found").exists() {
        assert!(Instant::now() < deadline, "the image did not mount");
        if mounted.try_wait().unwrap().is_some() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut mounted.stderr.take().unwrap(), &mut stderr).unwrap();
            panic!("capsa encfs mount exited: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let checked: Vec<Result<(), String>> = fsynced
        .iter()
        .map(|(hash, name)| match std::fs::read(mount.join(name)) {
            Ok(bytes) if sha256_hex(&bytes) == *hash => Ok(()),
            Ok(bytes) => Err(format!("{name}: {} bytes of other content", bytes.len())),
            Err(e) => Err(format!("{name}: {e}")),
        })
        .collect();
    let _ = std::process::Command::new("umount").arg(&mount).status();
    let _ = mounted.wait();
    let failures: Vec<_> = checked.into_iter().filter_map(Result::err).collect();
    assert!(failures.is_empty(), "fsynced files lost or damaged: {failures:?}");
}

/// The LUKS2 image crates/capsa-encfs/tests/fixtures/PROVENANCE.md says how
/// it was made (cryptsetup and dm-crypt in a guest, Azure's recipe).
const LUKS_FIXTURE: &[u8] = include_bytes!("../../capsa-encfs/tests/fixtures/luks2-azure.img.zst");
const LUKS_KEY: &[u8] = include_bytes!("../../capsa-encfs/tests/fixtures/luks2-azure.key");

#[test]
fn an_azure_luks2_image_mounts_read_only_in_a_sandbox() {
    let Some(s) = setup() else { return };
    let image = zstd::decode_all(LUKS_FIXTURE).unwrap();
    let config = capsa_encfs::remote::Config::from_vars(s.azurite.env());
    let container = config.open(&s.image_url("")).unwrap();
    container.put("azure.img", &image).unwrap();
    let url = s.image_url("azure.img");
    let (pod, host_data) =
        s.pod("luks", &url, true, "cat /data/test.txt /data/nested/deeper/note.txt; sha256sum /data/random.bin");
    s.trust.create_key(s.home.path(), "luks-key", LUKS_KEY, &host_data, &s.measurement);
    let out = run(s.home.path(), &s.run_args(&pod));
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Hello from a LUKS2 image made the Azure encfs way."), "{stdout}");
    assert!(stdout.contains("a file two directories down"), "{stdout}");
    assert!(
        stdout.contains("fbdc4126f077f26aee6f38a74d89fe4dd59b142279794f7a0eb60d2326cab28a  /data/random.bin"),
        "{stdout}"
    );
}
