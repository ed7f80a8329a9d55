//! A sim sandbox under TCG, driven by a dishonest host. Every refusal the
//! issue names is tried against one running sandbox, which must refuse each
//! with the policy's reason and still serve honest requests afterwards.
//!
//! Needs QEMU, a guest kernel and the static agent (`scripts/build-agent`;
//! its path in `CAPSA_AGENT`). Skipped when one is missing, and failed
//! instead under `CAPSA_REQUIRE_TOOLS=1`, as CI runs.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use capsa_agent::protocol::{Call, Compression, FailureKind, ProcessRef, Reply, Stream};
use capsa_policy::generate::{ImageFacts, ImageResolver, InputKind, Options, settings::Settings};
use capsa_runtime::client::{AgentClient, CallError};
use capsa_runtime::guest::{self, GuestInputs};
use capsa_runtime::pod::{self, LayerSource};
use capsa_runtime::sandbox::{Accel, GuestFiles, LaunchConfig, Sandbox};
use capsa_tee::sim::SimPlatform;
use capsa_testkit::{BuiltLayer, Comp, Image, TarBuilder, TempDir, build_image_with, layer};
use serde_json::json;

fn require<T>(what: &str) -> Option<T> {
    assert!(std::env::var_os("CAPSA_REQUIRE_TOOLS").is_none(), "{what} is missing (CAPSA_REQUIRE_TOOLS is set)");
    eprintln!("SKIPPED: {what} is missing");
    None
}

/// The guest image, built into `dir` from the static agent in `CAPSA_AGENT`.
pub fn guest_files(dir: &Path) -> Option<GuestFiles> {
    if !capsa_testkit::have("qemu-system-x86_64") {
        return None;
    }
    let agent = capsa_testkit::built("CAPSA_AGENT", "run scripts/build-agent")?;
    let Ok(kernel) = guest::locate_kernel(None, None) else { return require("a guest kernel in /boot") };
    let image = guest::build(&GuestInputs {
        kernel: kernel.kernel,
        modules_root: kernel.modules_root,
        agent,
        cmdline: guest::DEFAULT_CMDLINE.to_owned(),
    })
    .unwrap();
    image.write(dir).unwrap();
    Some(GuestFiles {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        cmdline: guest::DEFAULT_CMDLINE.to_owned(),
    })
}

/// Busybox with the applets the tests run.
pub fn busybox_layer() -> BuiltLayer {
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox-static is installed");
    let mut tar = TarBuilder::new().dir("bin/").file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "cat", "echo", "id", "sleep", "hostname", "ls", "touch", "true", "false"] {
        tar = tar.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer(tar.dir("tmp/").dir("etc/").file("etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\n").finish(), Comp::Gzip)
}

fn image(layers: Vec<BuiltLayer>) -> Image {
    build_image_with(layers, "amd64", None, json!({"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}))
}

/// A tar whose one entry climbs out of the layer.
fn escaping_tar() -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    let name = b"../escape";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(4);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, &b"evil"[..]).unwrap();
    builder.into_inner().unwrap()
}

struct Resolver(HashMap<String, Image>);

impl ImageResolver for Resolver {
    fn resolve(&mut self, reference: &str) -> Result<ImageFacts, String> {
        let image = self.0.get(reference).ok_or_else(|| format!("no image {reference}"))?;
        Ok(ImageFacts {
            manifest_digest: image.manifest.digest.clone(),
            diff_ids: image.diff_ids(),
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/bin".into()],
            working_dir: String::new(),
            user: "0:0".into(),
        })
    }
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: refusals
spec:
  containers:
  - name: app
    image: app:1
    command: ["/bin/sh", "-c", "echo started; cat /hello.txt; sleep 600"]
    readinessProbe:
      exec:
        command: ["cat", "/hello.txt"]
  - name: evil
    image: evil:1
"#;

fn layer_file(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[track_caller]
fn refused(result: Result<(Reply, Vec<u8>), CallError>, kind: FailureKind, says: &[&str]) -> String {
    let err = result.expect_err("the sandbox must refuse");
    let failure = err.failure().unwrap_or_else(|| panic!("a refusal, not a broken channel: {err}"));
    assert_eq!(failure.kind, kind, "{failure}");
    for s in says {
        assert!(failure.message.contains(s), "the refusal should say {s:?}:\n{}", failure.message);
    }
    failure.message.clone()
}

#[track_caller]
fn healthy(client: &AgentClient) {
    let (reply, _) = client.call(Call::GetMetrics, &[]).expect("the sandbox still answers");
    assert!(matches!(reply, Reply::Metrics(_)), "{reply:?}");
}

fn push(client: &AgentClient, diff_id: &str, compression: Compression, path: PathBuf) -> Result<u64, pod::PodError> {
    pod::push_layer(client, &LayerSource { diff_id: diff_id.to_owned(), compression, path })
}

fn expect_refused_push(result: Result<u64, pod::PodError>, kind: FailureKind, says: &[&str]) {
    match result {
        Err(pod::PodError::Call(e)) => {
            refused(Err(e), kind, says);
        }
        other => panic!("the layer must be refused, got {other:?}"),
    }
}

fn output(client: &AgentClient, process: &ProcessRef) -> String {
    let mut out = Vec::new();
    pod::stream_output(client, process, Stream::Stdout, &mut out).unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_dishonest_host_is_refused_and_the_sandbox_stays_healthy() {
    let dir = TempDir::new("sandbox-refusals");
    let Some(guest) = guest_files(&dir.join("guest")) else { return };

    let hello = layer(TarBuilder::new().file("hello.txt", 0o644, b"hello from the sandbox\n").finish(), Comp::Gzip);
    let app = image(vec![busybox_layer(), hello.clone()]);
    let other = image(vec![layer(TarBuilder::new().file("other.txt", 0o644, b"another image\n").finish(), Comp::Gzip)]);
    let evil_layer = layer(escaping_tar(), Comp::Gzip);
    let evil = image(vec![evil_layer.clone()]);
    let mut resolver = Resolver(HashMap::from([
        ("app:1".to_owned(), app.clone()),
        ("evil:1".to_owned(), evil.clone()),
        ("other:1".to_owned(), other.clone()),
    ]));
    let settings = Settings::shipped_and(&[]).unwrap();
    let generated = capsa_policy::generate::generate(
        InputKind::Kubernetes,
        "pod.yaml",
        POD,
        &mut resolver,
        &settings,
        &Options { allow_unsupported: false, ..Options::default() },
    )
    .unwrap();
    let workload = generated.workloads.into_iter().next().unwrap();

    let platform = Arc::new(SimPlatform::init(&dir.join("sim")).unwrap());
    let id = format!("refusals-{}", std::process::id());
    let mut sandbox = Sandbox::launch(&LaunchConfig {
        id: id.clone(),
        guest: guest.clone(),
        cpus: 1,
        memory_mib: 512,
        accel: Accel::from_env(),
        host_data: workload.host_data,
        sim: Some(platform),
        echo_console: std::env::var_os("CAPSA_TEST_CONSOLE").is_some(),
        forward: Vec::new(),
        tap: None,
    })
    .unwrap();
    let client = Arc::clone(sandbox.client());

    // Before any policy, nothing but create_sandbox is answered.
    refused(client.call(Call::GetMetrics, &[]), FailureKind::Invalid, &["create_sandbox"]);

    // Initdata whose digest is not the HOST_DATA the sandbox was launched with.
    let mut forged = workload.data.clone();
    forged.containers[0].exec.push(vec!["/bin/sh".into()]);
    let forged = capsa_policy::document::PolicyDocument::render(&forged).unwrap().initdata().unwrap();
    let message = refused(
        client.call(Call::CreateSandbox { initdata: forged.toml().to_owned() }, &[]),
        FailureKind::Denied,
        &["HOST_DATA", &hex::encode(workload.host_data)],
    );
    assert!(message.contains(&hex::encode(forged.digest())), "{message}");

    // The real initdata: the guest's own evidence carries what was launched.
    let (reply, _) = client
        .call(Call::CreateSandbox { initdata: workload.initdata.toml().to_owned() }, &[])
        .unwrap_or_else(|e| panic!("{e}\n{}", sandbox.console_tail()));
    let Reply::SandboxCreated { host_data, measurement, policy_sha256 } = reply else { panic!("{reply:?}") };
    assert_eq!(host_data, hex::encode(workload.host_data));
    let expected =
        capsa_runtime::measure::launch_digest_of_files(&guest.kernel, &guest.initrd, &guest.cmdline).unwrap();
    assert_eq!(measurement, hex::encode(expected));
    assert_eq!(policy_sha256, hex::encode(workload.document.sha256()));
    // Once only.
    refused(
        client.call(Call::CreateSandbox { initdata: workload.initdata.toml().to_owned() }, &[]),
        FailureKind::Invalid,
        &["once"],
    );

    let layers = TempDir::new("sandbox-layers");
    // A layer whose tar climbs out with `../`: its diff_id is in the
    // policy, so only the unpacker stands in the way.
    expect_refused_push(
        push(&client, &evil_layer.diff_id, Compression::Gzip, layer_file(&layers, "evil", &evil_layer.blob.bytes)),
        FailureKind::Integrity,
        &["../escape"],
    );
    healthy(&client);

    // The app's first layer with one byte changed on the way in.
    let busybox = busybox_layer();
    let mut tampered = flate2_decode(&busybox.blob.bytes);
    let at = tampered.len() / 2;
    tampered[at] ^= 1;
    expect_refused_push(
        push(&client, &app.layers[0].diff_id, Compression::None, layer_file(&layers, "tampered", &tampered)),
        FailureKind::Integrity,
        &[&app.layers[0].diff_id],
    );
    healthy(&client);

    // Another image's layer in place of the app's, under the app's diff_id...
    expect_refused_push(
        push(
            &client,
            &app.layers[1].diff_id,
            Compression::Gzip,
            layer_file(&layers, "swap", &other.layers[0].blob.bytes),
        ),
        FailureKind::Integrity,
        &[&other.layers[0].diff_id, &app.layers[1].diff_id],
    );
    // ... and under its own, which the policy does not list.
    expect_refused_push(
        push(
            &client,
            &other.layers[0].diff_id,
            Compression::Gzip,
            layer_file(&layers, "other", &other.layers[0].blob.bytes),
        ),
        FailureKind::Denied,
        &["add_layer", &other.layers[0].diff_id],
    );
    healthy(&client);

    // The honest layers.
    for l in &app.layers {
        push(&client, &l.diff_id, Compression::Gzip, layer_file(&layers, &l.diff_id, &l.blob.bytes)).unwrap();
    }
    let policy = workload.data.containers.iter().find(|c| c.name == "app").unwrap();
    let honest = pod::conforming_request(&id, policy).unwrap();

    // An environment variable the host added.
    let mut with_env = honest.clone();
    with_env.env.push("LD_PRELOAD=/tmp/evil.so".into());
    let message = refused(
        client.call(Call::CreateContainer(Box::new(with_env)), &[]),
        FailureKind::Denied,
        &["create_container.env", "LD_PRELOAD"],
    );
    assert!(!message.contains("/tmp/evil.so"), "environment values are never shown: {message}");
    // A command the host changed.
    let mut with_args = honest.clone();
    with_args.args = vec!["/bin/sh".into(), "-c".into(), "cat /etc/passwd".into()];
    refused(client.call(Call::CreateContainer(Box::new(with_args)), &[]), FailureKind::Denied, &["args"]);
    healthy(&client);

    client.call(Call::CreateContainer(Box::new(honest)), &[]).unwrap();
    client.call(Call::StartContainer { container: "app".into() }, &[]).unwrap();
    let main = ProcessRef { container: "app".into(), exec_id: None };
    let mut first = Vec::new();
    while !String::from_utf8_lossy(&first).contains("hello from the sandbox") {
        let (_, bytes) = client.call(Call::ReadStdio { process: main.clone(), stream: Stream::Stdout }, &[]).unwrap();
        first.extend(bytes);
    }
    assert!(String::from_utf8_lossy(&first).starts_with("started\n"), "{}", String::from_utf8_lossy(&first));

    // An exec the policy does not list, then one it does.
    refused(
        client.call(Call::ExecProcess { container: "app".into(), args: vec!["/bin/sh".into()] }, &[]),
        FailureKind::Denied,
        &["exec_process"],
    );
    let (reply, _) = client
        .call(Call::ExecProcess { container: "app".into(), args: vec!["cat".into(), "/hello.txt".into()] }, &[])
        .unwrap();
    let Reply::ProcessStarted { exec_id, .. } = reply else { panic!("{reply:?}") };
    let exec = ProcessRef { container: "app".into(), exec_id };
    assert_eq!(output(&client, &exec), "hello from the sandbox\n");
    assert_eq!(pod::wait(&client, &exec).unwrap().code, Some(0));

    let (reply, _) = client.call(Call::GetMetrics, &[]).unwrap();
    let Reply::Metrics(metrics) = reply else { panic!("{reply:?}") };
    assert!(metrics.containers.iter().any(|c| c.name == "app" && c.state == "running"), "{metrics:?}");

    // What a generated policy keeps from the host: files into the guest,
    // the workload's stdin, signals other than SIGTERM and SIGKILL.
    refused(
        client.call(Call::CopyFile { path: "/run/capsa/evil".into(), mode: 0o644, offset: 0, last: true }, b"x"),
        FailureKind::Denied,
        &["copy_file"],
    );
    refused(
        client.call(Call::WriteStdin { process: main.clone(), close: true }, b"rm -rf /\n"),
        FailureKind::Denied,
        &["write_stdin"],
    );
    refused(
        client.call(Call::SignalProcess { process: main.clone(), signal: 10 }, &[]),
        FailureKind::Denied,
        &["signal_process"],
    );
    healthy(&client);
    // SIGKILL is allowed. (SIGTERM is too, but the shell is PID 1 of its
    // namespace and, like any init without a handler, ignores it.)
    client.call(Call::SignalProcess { process: main.clone(), signal: 9 }, &[]).unwrap();
    let exit = pod::wait(&client, &main).unwrap();
    assert_eq!(exit.shell(), 128 + 9, "{exit:?}");
    let (_, logs) = client.call(Call::GetLogs { container: "app".into() }, &[]).unwrap();
    assert!(String::from_utf8_lossy(&logs).contains("hello from the sandbox"), "{}", String::from_utf8_lossy(&logs));
    client.call(Call::RemoveContainer { container: "app".into() }, &[]).unwrap();
    refused(client.call(Call::StartContainer { container: "app".into() }, &[]), FailureKind::NotFound, &["app"]);
    let (reply, _) = client.call(Call::GetMetrics, &[]).unwrap();
    let Reply::Metrics(metrics) = reply else { panic!("{reply:?}") };
    assert!(metrics.containers.is_empty(), "{metrics:?}");

    let status = sandbox.stop(Duration::from_secs(20));
    assert!(status.success() || status.code().is_some(), "QEMU ended: {status}");
    assert!(!sandbox.running());
}

fn flate2_decode(gz: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(gz).read_to_end(&mut out).unwrap();
    out
}
