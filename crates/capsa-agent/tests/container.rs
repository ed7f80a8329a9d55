//! Containers run for real: the stages of the `capsa-agent` binary cargo
//! built, on an overlay of a busybox layer, in fresh namespaces.
//!
//! These need root, overlayfs and a static busybox at `/bin/busybox`; on a
//! machine without them each test says why and passes without running.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use capsa_agent::container::{self, Bundle, ContainerSpec, ExecSpec, Started};
use capsa_agent::protocol::{Mount, User};

const STAGE_EXE: &str = env!("CARGO_BIN_EXE_capsa-agent");
const APPLETS: [&str; 10] = ["sh", "id", "hostname", "cat", "touch", "tr", "sleep", "grep", "ls", "echo"];

/// Why these tests cannot run here, if they cannot.
fn unsupported() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("not running as root".into());
    }
    let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
    if !filesystems.lines().any(|l| l.split_whitespace().last() == Some("overlay")) {
        return Some("overlayfs is not available".into());
    }
    if !Path::new("/bin/busybox").is_file() {
        return Some("/bin/busybox is missing".into());
    }
    None
}

macro_rules! require_support {
    () => {
        if let Some(why) = unsupported() {
            eprintln!("skipping: {why}");
            return;
        }
    };
}

/// A layer holding busybox and its applets, as a committed layer looks.
fn busybox_layer(dir: &Path) -> PathBuf {
    let layer = dir.join("layer");
    fs::create_dir_all(layer.join("bin")).unwrap();
    fs::copy("/bin/busybox", layer.join("bin/busybox")).unwrap();
    for applet in APPLETS {
        symlink("busybox", layer.join("bin").join(applet)).unwrap();
    }
    fs::set_permissions(&layer, fs::Permissions::from_mode(0o755)).unwrap();
    layer
}

fn mount(source: &str, destination: &str, fs_type: &str, options: &[&str]) -> Mount {
    Mount {
        source: source.into(),
        destination: destination.into(),
        fs_type: fs_type.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
    }
}

fn spec(name: &str, layer: PathBuf, args: &[&str]) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        hostname: format!("{name}-host"),
        layers: vec![layer],
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec!["PATH=/bin".into(), "GREETING=hello".into()],
        working_dir: "/work".into(),
        user: User { uid: 0, gid: 0, groups: vec![] },
        capabilities: vec![],
        no_new_privileges: true,
        privileged: false,
        read_only_rootfs: false,
        mounts: vec![
            mount("proc", "/proc", "proc", &["nosuid", "noexec", "nodev"]),
            mount("tmpfs", "/dev", "tmpfs", &["nosuid", "mode=755"]),
            mount("devpts", "/dev/pts", "devpts", &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]),
            mount("shm", "/dev/shm", "tmpfs", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            mount("mqueue", "/dev/mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
            mount("sysfs", "/sys", "sysfs", &["nosuid", "noexec", "nodev"]),
            mount("tmpfs", "/tmp", "tmpfs", &["nosuid", "nodev"]),
        ],
        sysctls: BTreeMap::new(),
    }
}

fn run(started: Started) -> (Output, i32) {
    let output = started.child.wait_with_output().unwrap();
    let code = output.status.code().unwrap_or(-1);
    (output, code)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn mounts_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

#[test]
fn container_runs_as_pid1_with_its_user_hostname_and_read_only_root() {
    require_support!();
    let dir = tempfile::tempdir().unwrap();
    let layer = busybox_layer(dir.path());
    let shared = dir.path().join("shared");
    fs::create_dir(&shared).unwrap();
    fs::write(shared.join("note"), "from the guest\n").unwrap();
    let script = "id -u; id -G; hostname; cat /proc/1/cmdline | tr '\\0' ' '; echo; \
                  if touch /written 2>/dev/null; then echo root-writable; else echo root-read-only; fi; \
                  touch /tmp/ok && echo tmp-writable; cat /data/note; \
                  if touch /data/x 2>/dev/null; then echo data-writable; else echo data-read-only; fi; \
                  grep -E '^Cap(Eff|Bnd)' /proc/self/status; pwd; echo $GREETING; \
                  if echo 1 > /proc/sys/kernel/domainname 2>/dev/null; then echo sys-writable; else echo sys-read-only; fi; \
                  ls /dev; exit 42";
    let mut spec = spec("first", layer, &["sh", "-c", script]);
    spec.user = User { uid: 1000, gid: 1000, groups: vec![2000, 3000] };
    spec.capabilities = vec!["CAP_NET_BIND_SERVICE".into()];
    spec.read_only_rootfs = true;
    spec.mounts.push(mount(shared.to_str().unwrap(), "/data", "bind", &["rbind", "ro"]));
    let bundle = Bundle::create(&dir.path().join("containers"), &spec).unwrap();

    let started =
        container::start_with(Path::new(STAGE_EXE), &bundle, Stdio::null(), Stdio::piped(), Stdio::piped()).unwrap();
    assert!(started.pid > 1);
    let (output, code) = run(started);
    let out = stdout(&output);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(code, 42, "stdout:\n{out}\nstderr:\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "1000");
    assert_eq!(lines[1], "1000 2000 3000");
    assert_eq!(lines[2], "first-host");
    assert!(lines[3].starts_with("sh -c id -u;"), "PID 1 is the workload: {}", lines[3]);
    assert_eq!(lines[4], "root-read-only");
    assert_eq!(lines[5], "tmp-writable");
    assert_eq!(lines[6], "from the guest");
    assert_eq!(lines[7], "data-read-only");
    assert_eq!(lines[8].split_whitespace().collect::<Vec<_>>(), ["CapEff:", "0000000000000400"]);
    assert_eq!(lines[9].split_whitespace().collect::<Vec<_>>(), ["CapBnd:", "0000000000000400"]);
    assert_eq!(lines[10], "/work");
    assert_eq!(lines[11], "hello");
    assert_eq!(lines[12], "sys-read-only");
    for device in ["null", "zero", "urandom", "pts", "shm", "mqueue", "fd", "ptmx"] {
        assert!(lines[13..].contains(&device), "/dev lacks {device}: {:?}", &lines[13..]);
    }
    assert!(!shared.join("x").exists());

    // The mounts lived in the container's mount namespace only.
    assert!(mounts_mentioning(bundle.dir()).is_empty());
    let path = bundle.dir().to_path_buf();
    bundle.remove().unwrap();
    assert!(!path.exists());
}

#[test]
fn root_container_without_capabilities_has_none() {
    require_support!();
    let dir = tempfile::tempdir().unwrap();
    let layer = busybox_layer(dir.path());
    let spec = spec("bare", layer, &["sh", "-c", "id -u; grep -E '^Cap(Eff|Prm|Bnd)' /proc/self/status"]);
    let bundle = Bundle::create(&dir.path().join("containers"), &spec).unwrap();
    let started =
        container::start_with(Path::new(STAGE_EXE), &bundle, Stdio::null(), Stdio::piped(), Stdio::piped()).unwrap();
    let (output, code) = run(started);
    let out = stdout(&output);
    assert_eq!(code, 0, "{out}{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0");
    for line in &lines[1..4] {
        assert!(line.ends_with("0000000000000000"), "{line}");
    }
}

#[test]
fn missing_program_exits_127_with_a_clear_line() {
    require_support!();
    let dir = tempfile::tempdir().unwrap();
    let layer = busybox_layer(dir.path());
    let spec = spec("missing", layer, &["no-such-program"]);
    let bundle = Bundle::create(&dir.path().join("containers"), &spec).unwrap();
    let started =
        container::start_with(Path::new(STAGE_EXE), &bundle, Stdio::null(), Stdio::piped(), Stdio::piped()).unwrap();
    let (output, code) = run(started);
    assert_eq!(code, i32::from(container::EXIT_NOT_FOUND));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("capsa container init: cannot find \"no-such-program\""), "{err}");
}

#[test]
fn exec_joins_a_running_container() {
    require_support!();
    let dir = tempfile::tempdir().unwrap();
    let layer = busybox_layer(dir.path());
    let spec = spec("sleeper", layer, &["sleep", "60"]);
    let bundle = Bundle::create(&dir.path().join("containers"), &spec).unwrap();
    let main =
        container::start_with(Path::new(STAGE_EXE), &bundle, Stdio::null(), Stdio::piped(), Stdio::piped()).unwrap();

    let process = ExecSpec {
        args: vec!["sh".into(), "-c".into(), "hostname; id -u; cat /proc/1/cmdline | tr '\\0' ' '; echo; pwd".into()],
        env: vec!["PATH=/bin".into()],
        working_dir: "/tmp".into(),
        user: User { uid: 1000, gid: 1000, groups: vec![] },
        capabilities: vec![],
        no_new_privileges: true,
    };
    let exec = container::exec_with(
        Path::new(STAGE_EXE),
        &bundle,
        main.pid,
        &process,
        Stdio::null(),
        Stdio::piped(),
        Stdio::piped(),
    )
    .unwrap();
    assert!(exec.pid > 1 && exec.pid != main.pid);
    let (output, code) = run(exec);
    let out = stdout(&output);
    assert_eq!(code, 0, "{out}{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["sleeper-host", "1000", "sleep 60 ", "/tmp"]);
    // No exec bookkeeping is left in the bundle.
    assert!(
        fs::read_dir(bundle.dir()).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with("exec-"))
    );

    let pid = rustix::process::Pid::from_raw(main.pid as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).unwrap();
    let (_, code) = run(main);
    assert_eq!(code, 128 + 9);
    assert!(mounts_mentioning(bundle.dir()).is_empty());
    bundle.remove().unwrap();
}

#[test]
fn exec_into_a_stopped_container_fails_cleanly() {
    require_support!();
    let dir = tempfile::tempdir().unwrap();
    let layer = busybox_layer(dir.path());
    let spec = spec("gone", layer, &["sh", "-c", "exit 3"]);
    let bundle = Bundle::create(&dir.path().join("containers"), &spec).unwrap();
    let main =
        container::start_with(Path::new(STAGE_EXE), &bundle, Stdio::null(), Stdio::null(), Stdio::null()).unwrap();
    let pid = main.pid;
    let (_, code) = run(main);
    assert_eq!(code, 3);
    let started = Instant::now();
    let process = ExecSpec {
        args: vec!["hostname".into()],
        env: vec![],
        working_dir: String::new(),
        user: User::default(),
        capabilities: vec![],
        no_new_privileges: false,
    };
    let err =
        container::exec_with(Path::new(STAGE_EXE), &bundle, pid, &process, Stdio::null(), Stdio::null(), Stdio::null())
            .unwrap_err();
    assert!(err.to_string().contains("exec stage ended"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
}
