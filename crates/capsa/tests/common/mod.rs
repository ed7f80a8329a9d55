//! What the sandbox and workload tests share: the `capsa` binary run with
//! its state (caches, sim platform) under a test's own home directory, and
//! the trust service.
#![allow(dead_code)]

pub mod trust;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use capsa_testkit::{BuiltLayer, Comp, TarBuilder, layer};

/// `capsa` with HOME, its caches and the sim platform under `home`.
pub fn capsa(home: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_capsa"));
    command
        .env("HOME", home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("CAPSA_SIM_DIR", home.join("sim"))
        .env_remove("XDG_STATE_HOME")
        .env_remove("CAPSA_TRUST_URL")
        .env("NO_COLOR", "1");
    command
}

/// Runs `capsa args` to the end, echoing the command and its output for a
/// failing test's log.
pub fn run(home: &Path, args: &[&str]) -> Output {
    let out = capsa(home).args(args).output().unwrap();
    eprintln!(
        "$ capsa {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Builds the guest image with `agent` under `home` (`capsa guest build`)
/// and returns it with its launch measurement (`capsa measure`).
pub fn guest(home: &Path, agent: &Path) -> (PathBuf, String) {
    let guest = home.join("guest");
    let out = run(home, &["guest", "build", "--agent", agent.to_str().unwrap(), "--out", guest.to_str().unwrap()]);
    assert!(out.status.success());
    let cmdline = std::fs::read_to_string(guest.join("cmdline")).unwrap();
    let out = run(
        home,
        &[
            "measure",
            "--kernel",
            guest.join("vmlinuz").to_str().unwrap(),
            "--initrd",
            guest.join("initrd.img").to_str().unwrap(),
            "--cmdline",
            cmdline.trim(),
        ],
    );
    assert!(out.status.success());
    let measurement = String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned();
    (guest, measurement)
}

/// A layer with the host's static busybox as `/bin/busybox` and `applets`
/// linked to it, and an empty `/tmp`.
pub fn busybox_layer(applets: &[&str]) -> BuiltLayer {
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox-static");
    let mut tar = TarBuilder::new().dir("bin/").file("bin/busybox", 0o755, &busybox);
    for applet in applets {
        tar = tar.symlink(&format!("bin/{applet}"), "busybox");
    }
    layer(tar.dir("tmp/").finish(), Comp::Gzip)
}

/// Runs `capsa policy gen ARGS`, which must succeed, and returns the
/// HOST_DATA it printed.
pub fn policy_gen(home: &Path, args: &[&str]) -> String {
    let args = [&["policy", "gen"][..], args].concat();
    let out = run(home, &args);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr.lines().find_map(|l| l.split_once("HOST_DATA ").map(|(_, h)| h.trim().to_owned())).unwrap()
}
