//! Mounting a 10 GiB image from blob storage (Azurite on loopback): how
//! long until the filesystem is there, how long to read one file, and how
//! much of the image that fetched (issue 7's "a 10 GiB image mounts in
//! about a second and reads only what is touched").
//!
//!   cargo bench -p capsa-encfs --bench remote_mount [-- ROUNDS]
//!
//! Needs root, /dev/fuse, loop devices, mkfs.ext4 and azurite-blob.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use capsa_encfs::mount::{Device, Mounted, format_ext4};
use capsa_encfs::{Image, MasterKey, OpenOptions};

fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5);
    let Some(azurite) = capsa_testkit::Azurite::start() else {
        eprintln!("remote_mount: azurite-blob is not installed (npm install -g azurite)");
        return;
    };
    azurite.create_container("bench");
    let config = capsa_encfs::remote::Config::from_vars(azurite.env());
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("models")).unwrap();
    let weights: Vec<u8> = (0..(8 << 20)).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(tree.join("models/weights.bin"), &weights).unwrap();
    std::fs::write(tree.join("README"), b"a 10 GiB image holding 8 MiB\n").unwrap();

    let key = MasterKey::from_bytes(&[0x5c; 32]).unwrap();
    let url = azurite.url("bench", "ten-gib");
    let created = Instant::now();
    let image =
        Arc::new(Image::create(config.open(&url).unwrap(), &key, 10 << 30, 256, OpenOptions::default()).unwrap());
    let device = Device::serve(image.clone(), &work.path().join("run")).unwrap();
    format_ext4(&device, &tree, "bench").unwrap();
    device.close().unwrap();
    let stored = image.check().unwrap();
    println!(
        "created a 10 GiB image in Azurite in {:.1} s: {} of {} blocks stored ({} MiB)",
        created.elapsed().as_secs_f64(),
        stored,
        image.geometry().block_count,
        (stored * 4096) >> 20
    );
    drop(image);

    let target = work.path().join("mnt");
    std::fs::create_dir_all(&target).unwrap();
    let mut mounts = Vec::new();
    let mut reads = Vec::new();
    let mut fetched = Vec::new();
    for _ in 0..rounds {
        let start = Instant::now();
        let options = OpenOptions { read_only: true, ..OpenOptions::default() };
        let image = Arc::new(Image::open(config.open(&url).unwrap(), &key, options).unwrap());
        let mounted = Mounted::mount(image.clone(), &target, &work.path().join("run")).unwrap();
        let mount_time = start.elapsed();
        let start = Instant::now();
        let read = std::fs::read(target.join("models/weights.bin")).unwrap();
        let read_time = start.elapsed();
        assert!(read == weights, "the file reads back");
        fetched.push(image.fetched_bytes());
        mounted.unmount().unwrap();
        mounts.push(mount_time);
        reads.push(read_time);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    fetched.sort_unstable();
    println!(
        "mount (open the manifest, FUSE, loop, ext4): median {:.0} ms of {rounds}; read the 8 MiB file: median {:.0} ms; \
         fetched {:.1} MiB of the image's 10240 MiB (median)",
        median(&mut mounts).as_secs_f64() * 1000.0,
        median(&mut reads).as_secs_f64() * 1000.0,
        fetched[fetched.len() / 2] as f64 / f64::from(1 << 20)
    );
}
