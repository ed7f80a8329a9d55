//! The workload API end to end: a trust service (`capsa trust serve`), a
//! pod whose policy `capsa policy gen` pinned and annotated, run in a sim
//! sandbox under TCG, whose containers ask the agent for their keys on
//! 127.0.0.1:8080 with curl, as they would ask Azure's SKR sidecar.
//!
//! Needs QEMU, curl, a guest kernel and the static agent and capsa-unseal
//! (`scripts/build-agent`; `CAPSA_AGENT`, `CAPSA_UNSEAL`). Skipped when one
//! is missing; failed instead under `CAPSA_REQUIRE_TOOLS=1`, as CI runs.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;
use common::run;
use common::trust::Trust;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_agent::protocol::{Call, Compression, ProcessRef, Reply, Stream};
use capsa_testkit::{BuiltLayer, Comp, TarBuilder, TempDir, build_image_with, layer, write_layout};
use serde_json::json;

struct Tools {
    agent: PathBuf,
    unseal: PathBuf,
}

fn tools() -> Option<Tools> {
    let tools = ["qemu-system-x86_64", "curl"].into_iter().all(capsa_testkit::have);
    let agent = capsa_testkit::built("CAPSA_AGENT", "run scripts/build-agent")?;
    let unseal =
        capsa_testkit::built("CAPSA_UNSEAL", "run scripts/build-agent; it builds capsa-unseal beside the agent")?;
    tools.then_some(Tools { agent, unseal })
}

/// A layer with busybox's shell and curl with every library it loads, as
/// the host has them: a stock curl, not one built for capsa.
fn curl_layer() -> BuiltLayer {
    let mut tar = TarBuilder::new().dir("bin/").file("bin/busybox", 0o755, &std::fs::read("/usr/bin/busybox").unwrap());
    for applet in ["sh", "cat", "echo", "sha256sum"] {
        tar = tar.symlink(&format!("bin/{applet}"), "busybox");
    }
    tar = tar.file("bin/curl", 0o755, &std::fs::read("/usr/bin/curl").unwrap());
    let ldd = Command::new("ldd").arg("/usr/bin/curl").output().unwrap();
    let mut dirs = std::collections::BTreeSet::new();
    let mut files = Vec::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let path = line.split_whitespace().find(|w| w.starts_with('/')).map(str::to_owned);
        if let Some(path) = path {
            let real = std::fs::canonicalize(&path).unwrap();
            let rel = path.trim_start_matches('/').to_owned();
            let mut dir = Path::new(&rel).parent();
            while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(format!("{}/", d.display()));
                dir = d.parent();
            }
            files.push((rel, std::fs::read(real).unwrap()));
        }
    }
    for dir in dirs {
        tar = tar.dir(&dir);
    }
    for (rel, bytes) in files {
        tar = tar.file(&rel, 0o755, &bytes);
    }
    layer(tar.dir("tmp/").finish(), Comp::Gzip)
}

struct Setup {
    home: TempDir,
    guest: PathBuf,
    layout: PathBuf,
    measurement: String,
    trust: Trust,
}

fn setup(tools: &Tools, extra: Vec<BuiltLayer>) -> Setup {
    setup_with(tools, extra, false).0
}

/// [`setup`], with the trust service on HTTPS when `tls` (its CA returned).
fn setup_with(tools: &Tools, extra: Vec<BuiltLayer>, tls: bool) -> (Setup, Option<String>) {
    let home = TempDir::new("workload-api");
    let (guest, measurement) = common::guest(home.path(), &tools.agent);
    let mut layers = vec![curl_layer()];
    layers.extend(extra);
    let image =
        build_image_with(layers, "amd64", None, json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "User": "0:0"}));
    let layout = home.join("layout");
    write_layout(&layout, &image.blobs(), &[("app:1", &image.manifest)]);
    let (trust, ca) = if tls {
        let (trust, ca) = Trust::start_tls(home.path());
        (trust, Some(ca))
    } else {
        (Trust::start(home.path()), None)
    };
    (Setup { home, guest, layout, measurement, trust }, ca)
}

/// Writes the pod, attaches its policy (`capsa policy gen --trust`), and
/// returns the annotated pod and its HOST_DATA.
fn annotated_pod(s: &Setup, name: &str, annotations: &str, script: &str) -> (PathBuf, String) {
    annotated_pod_with(s, name, annotations, script, None)
}

/// [`annotated_pod`], naming an HTTPS trust service and its CA when `ca`.
fn annotated_pod_with(s: &Setup, name: &str, annotations: &str, script: &str, ca: Option<&str>) -> (PathBuf, String) {
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  annotations: {{{annotations}}}\nspec:\n  containers:\n  - name: app\n    image: app:1\n    command: [\"/bin/sh\", \"-c\", {}]\n",
        serde_json::Value::from(script)
    );
    let path = s.home.join(&format!("{name}.yaml"));
    std::fs::write(&path, pod).unwrap();
    let annotated = s.home.join(&format!("{name}.annotated.yaml"));
    let scheme = if ca.is_some() { "https" } else { "http" };
    let trust_url = format!("{scheme}://localhost:{}", s.trust.port);
    let mut args = vec![
        path.display().to_string(),
        "--oci-layout".to_owned(),
        s.layout.display().to_string(),
        "--trust".to_owned(),
        trust_url.clone(),
        "--out".to_owned(),
        annotated.display().to_string(),
    ];
    if let Some(ca) = ca {
        let ca_file = s.home.join("trust-ca.pem");
        std::fs::write(&ca_file, ca).unwrap();
        args.extend(["--trust-ca".to_owned(), format!("{trust_url}={}", ca_file.display())]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (annotated, common::policy_gen(s.home.path(), &args))
}

fn release_call(port: u16, kid: &str) -> String {
    format!(
        "curl -s -w ' {kid} %{{http_code}}\\n' -X POST http://127.0.0.1:8080/key/release -d '{{\"maa_endpoint\":\"http://localhost:{port}\",\"akv_endpoint\":\"http://localhost:{port}\",\"kid\":\"{kid}\"}}'"
    )
}

#[test]
fn workloads_get_their_keys_through_the_workload_api_and_only_theirs() {
    let Some(tools) = tools() else { return };
    let s = setup(&tools, Vec::new());
    let port = s.trust.port;
    let script = format!(
        "echo status $(curl -s http://127.0.0.1:8080/status); \
         echo raw $(curl -s -X POST http://127.0.0.1:8080/attest/raw -d '{{\"runtime_data\":\"aGVsbG8=\"}}'); \
         echo maa $(curl -s -X POST http://127.0.0.1:8080/attest/maa -d '{{\"maa_endpoint\":\"http://localhost:{port}\",\"runtime_data\":\"aGVsbG8=\"}}'); \
         {}; {}",
        release_call(port, "db-key"),
        release_call(port, "other-key")
    );
    let (pod, host_data) = annotated_pod(&s, "keys", "", &script);
    let key = [0x5au8; 32];
    s.trust.create_key(s.home.path(), "db-key", &key, &host_data, &s.measurement);
    s.trust.create_key(s.home.path(), "other-key", &[7u8; 32], &"ab".repeat(32), &s.measurement);

    let out = run(
        s.home.path(),
        &[
            "run",
            "--pod",
            pod.to_str().unwrap(),
            "--oci-layout",
            s.layout.to_str().unwrap(),
            "--guest",
            s.guest.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("status {\"message\":\"STATUS OK\"}"), "{stdout}");
    // Raw evidence: an SNP-layout report whose REPORT_DATA is SHA-256("hello"), zero-padded.
    let raw = stdout.lines().find_map(|l| l.strip_prefix("raw ")).unwrap();
    let raw: serde_json::Value = serde_json::from_str(raw).unwrap_or_else(|e| panic!("{e}: {raw}"));
    let report = hex::decode(raw["report"].as_str().unwrap()).unwrap();
    let report = capsa_tee::snp::Report::parse(&report).unwrap();
    let hello = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b"hello");
    assert_eq!(&report.report_data[..32], hello.as_ref());
    assert_eq!(hex::encode(report.host_data), host_data);
    // A token from the trust service, whose runtime claim is the data.
    let maa = stdout.lines().find_map(|l| l.strip_prefix("maa ")).unwrap();
    let maa: serde_json::Value = serde_json::from_str(maa).unwrap_or_else(|e| panic!("{e}: {maa}"));
    let token = maa["token"].as_str().unwrap();
    let claims = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    assert_eq!(claims["x-ms-sevsnpvm-hostdata"], host_data.as_str(), "{claims}");
    // The released key, as Azure's sidecar returns it: a JWK in a string.
    let released = stdout.lines().find(|l| l.ends_with(" db-key 200")).unwrap_or_else(|| panic!("{stdout}"));
    let body: serde_json::Value = serde_json::from_str(released.trim_end_matches(" db-key 200")).unwrap();
    let jwk: serde_json::Value = serde_json::from_str(body["key"].as_str().unwrap()).unwrap();
    assert_eq!(jwk["kty"], "oct");
    assert_eq!(jwk["k"], URL_SAFE_NO_PAD.encode(key));
    // A key whose release policy pins another HOST_DATA: 403, and the clause.
    let other = stdout.lines().find(|l| l.ends_with(" other-key 403")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(other.contains("release policy") && other.contains("x-ms-sevsnpvm-hostdata"), "{other}");
    assert!(!other.contains(&URL_SAFE_NO_PAD.encode([7u8; 32])), "{other}");

    // A pod whose policy allows the workload API's status only.
    let script = format!("echo status $(curl -s http://127.0.0.1:8080/status); {}", release_call(port, "db-key"));
    let (pod, _) = annotated_pod(&s, "locked", "capsa.dev/workload-api: status", &script);
    let out = run(
        s.home.path(),
        &[
            "run",
            "--pod",
            pod.to_str().unwrap(),
            "--oci-layout",
            s.layout.to_str().unwrap(),
            "--guest",
            s.guest.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("STATUS OK"), "{stdout}");
    let refused = stdout.lines().find(|l| l.ends_with(" db-key 403")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(refused.contains("execution policy") && refused.contains("key/release"), "{refused}");
}

#[test]
fn the_host_relays_only_wrapped_bytes() {
    let Some(tools) = tools() else { return };
    let key = [0x3cu8; 32];
    let message = b"the secret the data owner sealed for this workload only\n";
    let sealed = {
        let dir = TempDir::new("seal");
        std::fs::write(dir.join("key"), key).unwrap();
        std::fs::write(dir.join("plain"), message).unwrap();
        let out = Command::new(&tools.unseal)
            .args(["seal", "--key-file", &dir.arg("key"), "--in", &dir.arg("plain"), "--out", &dir.arg("sealed")])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read(dir.join("sealed")).unwrap()
    };
    let unseal_layer = layer(
        TarBuilder::new()
            .file("bin/capsa-unseal", 0o755, &std::fs::read(&tools.unseal).unwrap())
            .file("sealed.bin", 0o644, &sealed)
            .finish(),
        Comp::Gzip,
    );
    // Over HTTPS: TLS ends in the guest, which trusts only the CA its
    // initdata names.
    let (s, ca) = setup_with(&tools, vec![unseal_layer], true);
    let ca = ca.unwrap();
    let port = s.trust.port;
    let script = format!(
        "capsa-unseal --maa https://localhost:{port} --akv https://localhost:{port} --kid tap-key /sealed.bin | sha256sum"
    );
    let (pod, host_data) = annotated_pod_with(&s, "tap", "", &script, Some(&ca));
    s.trust.create_key_tls(&ca, "tap-key", &key, &host_data, &s.measurement);

    // The launcher as `capsa run` drives it, with a tap on the forwarding port.
    let text = std::fs::read_to_string(&pod).unwrap();
    let (_, initdata) = capsa_runtime::pod::pod_initdata(&text).unwrap().unwrap();
    let data = initdata.policy().unwrap().data().unwrap();
    let id = format!("tap-{}", std::process::id());
    let request = capsa_runtime::pod::conforming_request(&id, &data.containers[0]).unwrap();
    let source = capsa_oci::image::ImageSource::OciLayout(s.layout.clone());
    let options = capsa_oci::image::ResolveOptions { cache_dir: Some(s.home.join("cache")), ..Default::default() };
    let image = capsa_oci::image::resolve_blocking("app:1", &source, &options).unwrap();
    let tap: capsa_runtime::forward::Tap = Arc::new(Mutex::new(Vec::new()));
    let platform = capsa_tee::sim::SimPlatform::init(&s.home.join("sim")).unwrap();
    let cmdline = std::fs::read_to_string(s.guest.join("cmdline")).unwrap();
    let mut sandbox = capsa_runtime::sandbox::Sandbox::launch(&capsa_runtime::sandbox::LaunchConfig {
        id,
        guest: capsa_runtime::sandbox::GuestFiles {
            kernel: s.guest.join("vmlinuz"),
            initrd: s.guest.join("initrd.img"),
            cmdline: cmdline.trim().to_owned(),
        },
        cpus: 1,
        memory_mib: 512,
        accel: capsa_runtime::sandbox::Accel::from_env(),
        host_data: initdata.digest(),
        sim: Some(Arc::new(platform)),
        echo_console: std::env::var_os("CAPSA_TEST_CONSOLE").is_some(),
        forward: vec![format!("localhost:{port}")],
        tap: Some(Arc::clone(&tap)),
    })
    .unwrap();
    let client = Arc::clone(sandbox.client());
    client.call(Call::CreateSandbox { initdata: initdata.toml().to_owned() }, &[]).unwrap();
    for l in &image.layers {
        let path = capsa_oci::image::layer_blob_blocking("app:1", &source, &options, l).unwrap();
        let compression = Compression::from_media_type(&l.media_type).unwrap();
        capsa_runtime::pod::push_layer(
            &client,
            &capsa_runtime::pod::LayerSource { diff_id: l.diff_id.clone(), compression, path },
        )
        .unwrap();
    }
    client.call(Call::CreateContainer(Box::new(request)), &[]).unwrap();
    client.call(Call::StartContainer { container: "app".into() }, &[]).unwrap();
    let process = ProcessRef { container: "app".into(), exec_id: None };
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    capsa_runtime::pod::stream_output(&client, &process, Stream::Stdout, &mut stdout).unwrap();
    capsa_runtime::pod::stream_output(&client, &process, Stream::Stderr, &mut stderr).unwrap();
    let (reply, _) = client.call(Call::WaitProcess { process }, &[]).unwrap();
    assert!(
        matches!(reply, Reply::ProcessExited { code: Some(0), .. }),
        "{reply:?}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    sandbox.stop(Duration::from_secs(20));

    // The workload unsealed the message: its digest came back...
    let digest = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message));
    assert!(String::from_utf8_lossy(&stdout).starts_with(&digest), "{}", String::from_utf8_lossy(&stdout));
    // ... while the host relayed a key release whose bytes hold neither the
    // key nor the message, in any encoding.
    let relayed = tap.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&relayed);
    assert!(relayed.len() > 4096, "the key release went through the forwarding port ({} bytes)", relayed.len());
    // TLS records (0x16 handshake, version 3.x), and no HTTP in clear.
    assert!(relayed.starts_with(&[0x16, 0x03]), "the guest opened with a TLS handshake");
    assert!(!text.contains("HTTP/1.1") && !text.contains("/keys/tap-key"), "no HTTP crossed in clear");
    let needle = |n: &[u8]| relayed.windows(n.len()).any(|w| w == n);
    for secret in [&key[..], &message[..]] {
        assert!(!needle(secret), "raw secret bytes crossed the host");
        for encoded in [
            hex::encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
            base64::engine::general_purpose::STANDARD.encode(secret),
        ] {
            assert!(!text.contains(&encoded), "an encoding of a secret crossed the host: {encoded}");
        }
    }
    assert!(!String::from_utf8_lossy(&stdout).contains("the secret"), "the workload printed only a digest");
}
