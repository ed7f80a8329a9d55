//! The initramfs the builder makes boots Debian's kernel under QEMU (a
//! microVM under TCG, as CI runs guests) and runs its `/init`.
//!
//! Needs `qemu-system-x86_64`, busybox-static and a kernel: the one in
//! `CAPSA_GUEST_KERNEL`, or the newest `/boot/vmlinuz-*`. Skipped (and
//! failed under `CAPSA_REQUIRE_TOOLS=1`) when one is missing.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use capsa_runtime::initramfs::Initramfs;

fn kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("CAPSA_GUEST_KERNEL") {
        return Some(PathBuf::from(k));
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .collect();
    found.sort();
    let kernel = found.pop();
    if kernel.is_none() {
        assert!(std::env::var_os("CAPSA_REQUIRE_TOOLS").is_none(), "no kernel in /boot (CAPSA_REQUIRE_TOOLS is set)");
        eprintln!("SKIPPED: no guest kernel (install linux-image-amd64 or set CAPSA_GUEST_KERNEL)");
    }
    kernel
}

#[test]
fn a_built_initramfs_boots_and_runs_init() {
    if !capsa_testkit::have("qemu-system-x86_64") || !capsa_testkit::have("busybox") {
        return;
    }
    let Some(kernel) = kernel() else { return };
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut image = Initramfs::new();
    image
        .file("bin/busybox", busybox, true)
        .unwrap()
        .symlink("bin/sh", "busybox")
        .unwrap()
        .char_device("dev/console", 5, 1)
        .unwrap()
        .directory("proc")
        .unwrap()
        .file(
            "init",
            b"#!/bin/sh\n/bin/busybox mount -t proc proc /proc\necho \"capsa-guest: init ran on $(/bin/busybox uname -r)\"\n/bin/busybox poweroff -f\n".to_vec(),
            true,
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd.gz");
    std::fs::write(&initrd, image.to_gzip().unwrap()).unwrap();

    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,accel=tcg", "-cpu", "max", "-m", "256M", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 tsc_early_khz=2000000 panic=-1 quiet"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A guest that hangs must not hang the test.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the guest did not power off within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    eprintln!("guest ran in {:.1?}", start.elapsed());
    assert!(
        console.contains("capsa-guest: init ran on "),
        "console:\n{console}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
