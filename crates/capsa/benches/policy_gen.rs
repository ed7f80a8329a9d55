//! Policy generation, cold and warm, for an image of 10 layers totalling
//! over 500 MB, against a real registry on 127.0.0.1 (issue 3).
//!
//! ```text
//! cargo bench -p capsa --bench policy_gen
//! ```
//!
//! Cold: an empty layer cache, so every layer is downloaded, its digest
//! checked, decompressed and hashed. Warm: the same cache again, so only the
//! manifest is fetched. The peer run does the same work as the cold path
//! with stock tools: `skopeo copy` to a directory, then `gzip -dc | sha256sum`
//! per layer. Prints medians; results go in docs/BENCHMARKS.md.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use capsa_testkit::{Comp, Registry, TarBuilder, TempDir, build_image_with, layer, skopeo, write_layout};
use serde_json::json;

const LAYERS: usize = 10;
const LAYER_BYTES: usize = 52 << 20;

/// Incompressible bytes from a xorshift generator: real layers are mostly
/// compressed binaries, and random data keeps gzip from flattering anyone.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn run(cmd: &mut Command) {
    let out = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output().expect("command runs");
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    eprintln!("building a {LAYERS}-layer image of {} MB ...", (LAYERS * LAYER_BYTES) >> 20);
    let layers: Vec<_> = (0..LAYERS)
        .map(|i| {
            let tar =
                TarBuilder::new().file(&format!("data/blob{i}"), 0o644, &noise(i as u64 + 1, LAYER_BYTES)).finish();
            layer(tar, Comp::Gzip)
        })
        .collect();
    let total: usize = layers.iter().map(|l| l.blob.bytes.len()).sum();
    let image = build_image_with(layers, "amd64", None, json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}));
    let layout = TempDir::new("bench-layout");
    write_layout(layout.path(), &image.blobs(), &[("big:1", &image.manifest)]);
    let registry = Registry::start();
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:big:1", layout.path().display()),
        &format!("docker://{}/bench/big:1", registry.addr),
    ]);
    drop(layout);
    let work = TempDir::new("bench-work");
    let pod = work.join("pod.yaml");
    std::fs::write(
        &pod,
        format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: big}}\nspec:\n  containers:\n    - name: c\n      image: {}/bench/big:1\n", registry.addr),
    )
    .unwrap();
    let capsa = |cache: &TempDir| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_capsa"));
        c.args(["policy", "gen", pod.to_str().unwrap(), "--print"]).env("XDG_CACHE_HOME", cache.path());
        c
    };

    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut peer = Vec::new();
    for round in 0..3 {
        let cache = TempDir::new("bench-cache");
        cold.push(time(|| run(&mut capsa(&cache))));
        for _ in 0..3 {
            warm.push(time(|| run(&mut capsa(&cache))));
        }
        let dir = work.join(&format!("peer{round}"));
        peer.push(time(|| {
            run(Command::new("skopeo").args([
                "--insecure-policy",
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{}/bench/big:1", registry.addr),
                &format!("dir:{}", dir.display()),
            ]));
            for l in &image.layers {
                let blob = dir.join(l.blob.digest.strip_prefix("sha256:").unwrap());
                run(Command::new("sh").arg("-c").arg(format!("gzip -dc '{}' | sha256sum", blob.display())));
            }
        }));
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!(
            "round {round}: cold {:?}, warm {:?}, peer {:?}",
            cold.last().unwrap(),
            warm.last().unwrap(),
            peer.last().unwrap()
        );
    }
    let (cold, warm, peer) = (median(cold), median(warm), median(peer));
    let mut out = std::io::stdout();
    writeln!(
        out,
        "image: {LAYERS} layers, {} MB compressed, {} MB uncompressed",
        total >> 20,
        (LAYERS * LAYER_BYTES) >> 20
    )
    .unwrap();
    writeln!(out, "capsa policy gen, cold cache : median {:.2} s", cold.as_secs_f64()).unwrap();
    writeln!(out, "capsa policy gen, warm cache : median {:.3} s", warm.as_secs_f64()).unwrap();
    writeln!(out, "skopeo copy + gzip -dc | sha256sum : median {:.2} s", peer.as_secs_f64()).unwrap();
    writeln!(out, "cold capsa / peer: {:.2}x faster", peer.as_secs_f64() / cold.as_secs_f64()).unwrap();
    writeln!(out, "warm vs cold: {:.0}x faster", cold.as_secs_f64() / warm.as_secs_f64()).unwrap();
}
