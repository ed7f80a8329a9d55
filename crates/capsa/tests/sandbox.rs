//! `capsa run` end to end, as a user runs it: a pod from a loopback
//! registry in a sim sandbox under TCG, its output and exit codes, the
//! evidence it was launched with, `capsa ps/exec/logs/stop`, and nothing
//! of a sandbox left behind after it stops, after its workload exits, or
//! after `capsa run` is killed with SIGKILL.
//!
//! Needs docker-registry, skopeo, QEMU, a guest kernel and the static agent
//! (`scripts/build-agent`, path in `CAPSA_AGENT`). Skipped when one is
//! missing; failed instead under `CAPSA_REQUIRE_TOOLS=1`, as CI runs.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

mod common;
use common::{capsa, run};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capsa_testkit::{Comp, Registry, TarBuilder, TempDir, build_image_with, layer, skopeo, write_layout};
use serde_json::json;

struct Env {
    home: TempDir,
    guest: PathBuf,
    registry: Registry,
}

fn tools() -> Option<PathBuf> {
    let tools = ["docker-registry", "skopeo", "qemu-system-x86_64"].into_iter().all(capsa_testkit::have);
    let agent = capsa_testkit::built("CAPSA_AGENT", "run scripts/build-agent")?;
    tools.then_some(agent)
}

fn setup(agent: &Path) -> Env {
    let home = TempDir::new("sandbox-cli");
    let registry = Registry::start();
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox-static");
    let mut rootfs = TarBuilder::new().dir("bin/").file("bin/busybox", 0o755, &busybox);
    for applet in ["sh", "cat", "echo", "sleep", "hostname", "id"] {
        rootfs = rootfs.symlink(&format!("bin/{applet}"), "busybox");
    }
    let image = build_image_with(
        vec![
            layer(rootfs.dir("tmp/").finish(), Comp::Gzip),
            layer(TarBuilder::new().file("hello.txt", 0o644, b"hello from a registry layer\n").finish(), Comp::Zstd),
        ],
        "amd64",
        None,
        json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"], "User": "0:0"}),
    );
    let layout = home.join("layout");
    write_layout(&layout, &image.blobs(), &[("app:1", &image.manifest)]);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:app:1", layout.display()),
        &format!("docker://{}/test/app:1", registry.addr),
    ]);
    let guest = home.join("guest");
    let out =
        run(home.path(), &["guest", "build", "--agent", agent.to_str().unwrap(), "--out", guest.to_str().unwrap()]);
    assert!(out.status.success());
    Env { home, guest, registry }
}

fn write_pod(env: &Env, name: &str, containers: &str) -> PathBuf {
    let path = env.home.join(&format!("{name}.yaml"));
    let pod = format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  containers:\n{containers}")
        .replace("IMAGE", &format!("{}/test/app:1", env.registry.addr));
    std::fs::write(&path, pod).unwrap();
    path
}

/// Everything of sandbox `id` the host can see: processes naming it, its
/// abstract sockets, mounts and temporary files.
fn leftovers(id: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(id) && !cmdline.contains("cargo") {
            found.push(format!("process {}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    for table in ["/proc/net/unix", "/proc/self/mountinfo"] {
        for line in std::fs::read_to_string(table).unwrap().lines().filter(|l| l.contains(id)) {
            found.push(format!("{table}: {line}"));
        }
    }
    for dir in [std::env::temp_dir(), PathBuf::from("/run"), PathBuf::from("/run/capsa")] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().contains(id) {
                found.push(format!("file {}", entry.path().display()));
            }
        }
    }
    found
}

fn assert_nothing_left(id: &str) {
    // QEMU is killed by the kernel and the guest powers off; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = leftovers(id);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "sandbox {id} left behind:\n{}", left.join("\n"));
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_listed(home: &Path, id: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let out = capsa(home).args(["ps"]).output().unwrap();
        if String::from_utf8_lossy(&out.stdout).contains(id) {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("capsa run exited ({status}) before its sandbox was listed");
        }
        assert!(Instant::now() < deadline, "sandbox {id} never appeared in capsa ps");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_pod_of_two_containers_runs_in_a_sim_sandbox() {
    let Some(agent) = tools() else { return };
    let env = setup(&agent);
    let pod = write_pod(
        &env,
        "two",
        r#"  - name: one
    image: IMAGE
    command: ["/bin/sh", "-c", "echo one says hi; cat /hello.txt; exit 3"]
  - name: two
    image: IMAGE
    command: ["/bin/sh", "-c", "echo two says hi from $(hostname)"]
"#,
    );
    let home = env.home.path();
    let gen_out = run(home, &["policy", "gen", pod.to_str().unwrap()]);
    assert!(gen_out.status.success());
    let gen_stderr = String::from_utf8_lossy(&gen_out.stderr);
    let host_data = gen_stderr.lines().find_map(|l| l.strip_prefix("Pod/two: HOST_DATA ")).unwrap().trim().to_owned();
    let cmdline = std::fs::read_to_string(env.guest.join("cmdline")).unwrap();
    let measure = run(
        home,
        &[
            "measure",
            "--kernel",
            env.guest.join("vmlinuz").to_str().unwrap(),
            "--initrd",
            env.guest.join("initrd.img").to_str().unwrap(),
            "--cmdline",
            cmdline.trim(),
        ],
    );
    assert!(measure.status.success());
    let measurement = String::from_utf8_lossy(&measure.stdout).split_whitespace().next().unwrap().to_owned();

    let id = format!("two-{}", std::process::id());
    let out =
        run(home, &["run", "--pod", pod.to_str().unwrap(), "--guest", env.guest.to_str().unwrap(), "--name", &id]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "the first failing container's code comes back");
    assert!(stdout.contains("[one] one says hi\n"), "{stdout}");
    assert!(stdout.contains("[one] hello from a registry layer\n"), "{stdout}");
    assert!(stdout.contains("[two] two says hi from two\n"), "{stdout}");
    assert!(stderr.contains("container one exited with 3"), "{stderr}");
    assert!(stderr.contains("container two exited with 0"), "{stderr}");
    // What the guest's own evidence carried.
    let evidence = stderr.lines().find(|l| l.contains("the sandbox's evidence carries")).unwrap();
    assert!(evidence.contains(&format!("MEASUREMENT {measurement}")), "{evidence} vs capsa measure {measurement}");
    assert!(evidence.contains(&format!("HOST_DATA {host_data}")), "{evidence} vs capsa policy gen {host_data}");
    assert_nothing_left(&id);
}

#[test]
fn ps_exec_logs_stop_and_sigkill_leave_nothing_behind() {
    let Some(agent) = tools() else { return };
    let env = setup(&agent);
    let pod = write_pod(
        &env,
        "long",
        r#"  - name: app
    image: IMAGE
    command: ["/bin/sh", "-c", "echo up and running; sleep 600"]
    readinessProbe:
      exec:
        command: ["cat", "/hello.txt"]
"#,
    );
    let home = env.home.path();
    let start = |id: &str| {
        capsa(home)
            .args(["run", "--pod", pod.to_str().unwrap(), "--guest", env.guest.to_str().unwrap(), "--name", id])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };

    // Stopped with `capsa stop`.
    let id = format!("stop-{}", std::process::id());
    let mut child = start(&id);
    wait_listed(home, &id, &mut child);
    let exec = run(home, &["exec", &id, "--", "cat", "/hello.txt"]);
    assert_eq!(exec.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "hello from a registry layer\n");
    let denied = run(home, &["exec", &id, "--", "/bin/sh", "-c", "id"]);
    assert_eq!(denied.status.code(), Some(1), "an exec the policy does not list is refused");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("exec_process"));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = run(home, &["logs", &id]);
        if String::from_utf8_lossy(&logs.stdout).contains("up and running") {
            break;
        }
        assert!(Instant::now() < deadline, "the container's output never reached capsa logs");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(run(home, &["stop", &id]).status.success());
    let status = child.wait().unwrap();
    assert!(!status.success(), "a stopped workload is not a success: {status}");
    assert_nothing_left(&id);

    // `capsa run` interrupted (Ctrl-C): it stops everything and says so.
    let id = format!("int-{}", std::process::id());
    let mut child = start(&id);
    wait_listed(home, &id, &mut child);
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert_nothing_left(&id);

    // `capsa run` killed with SIGKILL.
    let id = format!("kill-{}", std::process::id());
    let mut child = start(&id);
    wait_listed(home, &id, &mut child);
    child.kill().unwrap();
    child.wait().unwrap();
    assert_nothing_left(&id);
    assert!(!String::from_utf8_lossy(&run(home, &["ps"]).stdout).contains(&id));
}
