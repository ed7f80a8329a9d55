//! dm-verity root hash throughput (issue 3): capsa's `root_hash_file` against
//! `veritysetup format` on the same 1 GiB file of pseudo-random data, in the
//! same run, alternating, so that both see the same machine state (page
//! cache warm, the same neighbours on the CPU). Prints each run, the medians
//! and their ratio, and checks both tools agree on the root hash.
//!
//! ```text
//! cargo bench -p capsa-oci --bench verity
//! CAPSA_VERITY_BENCH_MIB=1024 CAPSA_VERITY_BENCH_RUNS=7 CAPSA_VERITY_BENCH_DIR=/tmp cargo bench -p capsa-oci --bench verity
//! ```
//!
//! Results and how to read them: `docs/BENCHMARKS.md`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capsa_oci::verity::{VerityParams, root_hash_file};

const SALT: &str = "5f3a1c0e9b7d2468ace0fdb97531eca86420bdf13579ace02468bdf13579ace0";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|value| value.parse().ok()).unwrap_or(default)
}

/// xorshift64*: a GiB in a second or two, no crate needed.
fn write_random(path: &Path, len: u64) {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            word.copy_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
        }
        let n = left.min(chunk.len() as u64) as usize;
        out.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    out.flush().unwrap();
}

/// CPU seconds used so far by this process (`self`) and by its waited-for
/// children, from /proc/self/stat (utime + stime, cutime + cstime).
fn cpu_seconds() -> (f64, f64) {
    let stat = fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name, which may hold spaces.
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0.0))
        .collect();
    // USER_HZ is 100 on every Linux capsa runs on.
    let ticks = |from: usize| (fields.get(from).unwrap_or(&0.0) + fields.get(from + 1).unwrap_or(&0.0)) / 100.0;
    // utime is field 14 of the man page, the 12th after the command name.
    (ticks(11), ticks(13))
}

fn capsa(data: &Path, params: &VerityParams) -> (Duration, String) {
    let start = Instant::now();
    let root = root_hash_file(data, params).unwrap();
    (start.elapsed(), hex::encode(root))
}

fn veritysetup(data: &Path, hash: &Path) -> (Duration, String) {
    let _ = fs::remove_file(hash);
    let start = Instant::now();
    let out = Command::new("veritysetup")
        .args(["format", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096"])
        .args(["--format", "1", "--salt", SALT])
        .arg(data)
        .arg(hash)
        .output()
        .expect("veritysetup runs (apt-get install cryptsetup-bin)");
    let elapsed = start.elapsed();
    assert!(out.status.success(), "veritysetup failed: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let root = stdout.lines().find_map(|line| line.strip_prefix("Root hash:")).expect("a root hash").trim().to_owned();
    (elapsed, root)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` does not: then
    // only check that this builds.
    if !std::env::args().any(|arg| arg == "--bench") {
        return;
    }
    let mib: u64 = env_or("CAPSA_VERITY_BENCH_MIB", 1024);
    let runs: usize = env_or("CAPSA_VERITY_BENCH_RUNS", 7);
    let dir: PathBuf = env_or("CAPSA_VERITY_BENCH_DIR", std::env::temp_dir());
    let data = dir.join(format!("capsa-verity-bench-{}.img", std::process::id()));
    let hash = dir.join(format!("capsa-verity-bench-{}.hash", std::process::id()));
    let params = VerityParams { salt: hex::decode(SALT).unwrap() };

    let cpu = fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| {
        info.lines().find_map(|line| {
            line.strip_prefix("model name").map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
    });
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("cpu {}, {cores} cores, load average {}", cpu.as_deref().unwrap_or("unknown"), load.trim());
    eprintln!("writing {mib} MiB of pseudo-random data to {}", data.display());
    write_random(&data, mib * 1024 * 1024);
    // Warm up both (and the page cache), and check they agree.
    let (_, ours) = capsa(&data, &params);
    let (_, root) = veritysetup(&data, &hash);
    assert_eq!(ours, root, "capsa and veritysetup disagree on the root hash");

    let mut capsa_times = Vec::with_capacity(runs);
    let mut veritysetup_times = Vec::with_capacity(runs);
    for run in 1..=runs {
        let (own_before, children_before) = cpu_seconds();
        let (ours_time, ours) = capsa(&data, &params);
        let (own_after, _) = cpu_seconds();
        let (theirs_time, theirs) = veritysetup(&data, &hash);
        let (_, children_after) = cpu_seconds();
        assert!(ours == root && theirs == root, "root hashes changed between runs");
        println!(
            "run {run}: capsa {:.3} s ({:.2} s cpu), veritysetup {:.3} s ({:.2} s cpu)",
            ours_time.as_secs_f64(),
            own_after - own_before,
            theirs_time.as_secs_f64(),
            children_after - children_before
        );
        capsa_times.push(ours_time);
        veritysetup_times.push(theirs_time);
    }
    let _ = fs::remove_file(&data);
    let _ = fs::remove_file(&hash);
    println!("load average after {}", fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());

    let ours = median(capsa_times);
    let theirs = median(veritysetup_times);
    let gib_per_s = |time: Duration| mib as f64 / 1024.0 / time.as_secs_f64();
    println!("root hash {root} (both tools)");
    println!(
        "median of {runs}, {mib} MiB: capsa {:.3} s ({:.2} GiB/s), veritysetup {:.3} s ({:.2} GiB/s), ratio {:.2}x",
        ours.as_secs_f64(),
        gib_per_s(ours),
        theirs.as_secs_f64(),
        gib_per_s(theirs),
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
}
