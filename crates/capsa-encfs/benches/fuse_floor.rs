//! The floor of a 4 KiB read through FUSE on this machine, beside
//! gocryptfs, in the same run: issue 7's random-read goal (1.5x gocryptfs)
//! against what a FUSE server that does nothing at all can reach.
//!
//! Three sources, each read by fio with one job, 4 KiB random O_DIRECT reads
//! for a fixed time, interleaved round by round:
//! - `zeros`: capsa-encfs' own FUSE device (the `disk` file `capsa encfs`
//!   mounts ext4 from) over a volume that only fills the buffer with zeros:
//!   no decryption, no storage, no ext4, no loop device;
//! - `gocryptfs`: a 512 MiB file in a gocryptfs mount whose backing files
//!   are in the page cache (read once before);
//! - `capsa`: the same 512 MiB of data in a capsa encfs image, read through
//!   its FUSE device directly (the image's blocks cached by the kernel, as
//!   gocryptfs' are), with the default options: a miss decrypts the 32 KiB
//!   around the block (`read_around` 8);
//! - `capsa, no read-around`: the same with `read_around` 1, only the block
//!   asked for.
//!
//!   cargo bench -p capsa-encfs --bench fuse_floor [-- ROUNDS SECONDS]
//!
//! Needs root, /dev/fuse, fio and gocryptfs.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use capsa_encfs::mount::Device;
use capsa_encfs::{Error, Image, MasterKey, OpenOptions, Volume};

const SIZE: u64 = 512 << 20;

/// A read-only volume of zeros: FUSE and nothing else.
struct Zeros;

impl Volume for Zeros {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize, Error> {
        let n = usize::try_from(SIZE.saturating_sub(offset)).unwrap_or(usize::MAX).min(buf.len());
        buf[..n].fill(0);
        Ok(n)
    }
    fn write_at(&self, _: u64, _: &[u8]) -> Result<(), Error> {
        Err(Error::ReadOnly)
    }
    fn commit(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// fio's IOPS and mean latency (µs) for 4 KiB random O_DIRECT reads of `file`.
fn fio(file: &Path, seconds: u32) -> (f64, f64) {
    let out = Command::new("fio")
        .args(["--name=floor", "--rw=randread", "--bs=4k", "--direct=1", "--ioengine=psync", "--time_based"])
        .arg(format!("--runtime={seconds}"))
        .arg(format!("--size={}", SIZE))
        .arg(format!("--filename={}", file.display()))
        .args(["--readonly", "--output-format=json"])
        .output()
        .expect("fio");
    assert!(out.status.success(), "fio: {}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio's JSON");
    let read = &json["jobs"][0]["read"];
    (read["iops"].as_f64().unwrap(), read["lat_ns"]["mean"].as_f64().unwrap() / 1000.0)
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(status.success(), "{program} {args:?}: {status}");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let seconds: u32 = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let work = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..SIZE as usize).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3]).collect();

    let zeros = Device::serve(Arc::new(Zeros), &work.path().join("zeros")).unwrap();

    let key = MasterKey::from_bytes(&[0x5c; 32]).unwrap();
    let image_dir = work.path().join("image");
    let store = capsa_encfs::store::LocalStore::create(&image_dir).unwrap();
    let image = Image::create(Arc::new(store), &key, SIZE, 256, OpenOptions::default()).unwrap();
    image.write_at(0, &data).unwrap();
    image.commit().unwrap();
    let capsa = Device::serve(Arc::new(image), &work.path().join("capsa")).unwrap();
    let single = OpenOptions { read_only: true, read_around: 1, ..OpenOptions::default() };
    let single = Image::open(Arc::new(capsa_encfs::store::LocalStore::open(&image_dir)), &key, single).unwrap();
    let capsa_single = Device::serve(Arc::new(single), &work.path().join("capsa-single")).unwrap();

    let cipher = work.path().join("gocryptfs-cipher");
    let plain = work.path().join("gocryptfs-plain");
    std::fs::create_dir_all(&cipher).unwrap();
    std::fs::create_dir_all(&plain).unwrap();
    let pass = work.path().join("gocryptfs.pass");
    std::fs::write(&pass, "fuse floor bench\n").unwrap();
    let pass = pass.to_str().unwrap();
    run("gocryptfs", &["-q", "-init", "-passfile", pass, cipher.to_str().unwrap()]);
    run("gocryptfs", &["-q", "-passfile", pass, cipher.to_str().unwrap(), plain.to_str().unwrap()]);
    let gocryptfs_file = plain.join("data");
    std::fs::write(&gocryptfs_file, &data).unwrap();

    // Warm both: every backing block read once into the page cache.
    for file in [gocryptfs_file.clone(), capsa.disk()] {
        std::io::copy(&mut std::fs::File::open(file).unwrap(), &mut std::io::sink()).unwrap();
    }

    let sources = [
        ("zeros", zeros.disk()),
        ("gocryptfs", gocryptfs_file.clone()),
        ("capsa", capsa.disk()),
        ("capsa, no read-around", capsa_single.disk()),
    ];
    let mut iops = vec![Vec::new(); sources.len()];
    let mut latency = vec![Vec::new(); sources.len()];
    for round in 0..rounds {
        for (i, (name, file)) in sources.iter().enumerate() {
            let (io, lat) = fio(file, seconds);
            println!("round {round} {name:<22} {io:>9.0} IOPS  mean {lat:>6.1} µs");
            iops[i].push(io);
            latency[i].push(lat);
        }
    }
    let goc = median(iops[1].clone());
    println!("\n| 4 KiB random O_DIRECT reads, {seconds} s, median of {rounds} | IOPS | mean latency | / gocryptfs |");
    println!("|---|---:|---:|---:|");
    for (i, (name, _)) in sources.iter().enumerate() {
        let io = median(iops[i].clone());
        println!("| {name} | {io:.0} | {:.1} µs | {:.2}x |", median(latency[i].clone()), io / goc);
    }

    run("fusermount3", &["-u", plain.to_str().unwrap()]);
    capsa_single.close().unwrap();
    capsa.close().unwrap();
    zeros.close().unwrap();
}
