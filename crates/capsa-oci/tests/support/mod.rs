//! capsa-oci's test support: the shared kit, plus what only the image
//! tests need.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use capsa_oci::image::{ResolveOptions, ResolvedImage};
pub use capsa_testkit::*;

/// Options for tests: a private cache, no user docker config, no progress.
pub fn options(cache: &TempDir) -> ResolveOptions {
    ResolveOptions {
        cache_dir: Some(cache.join("cache")),
        docker_config: Some(cache.join("no-docker-config.json")),
        ..ResolveOptions::default()
    }
}

/// Asserts that a resolution found exactly the image the test built.
pub fn assert_image(got: &ResolvedImage, want: &Image) {
    assert_eq!(got.diff_ids(), want.diff_ids(), "diff_ids");
    assert_eq!(got.config.entrypoint, ["/bin/sh", "-c"]);
    assert_eq!(got.config.cmd, ["cat /hello.txt"]);
    assert_eq!(got.config.env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(got.config.working_dir, "/data");
    assert_eq!(got.config.user, "1000:1000");
}

/// Convenience on results.
pub trait DiffIds {
    fn diff_ids(&self) -> Vec<String>;
    fn digests(&self) -> Vec<String>;
}

impl DiffIds for ResolvedImage {
    fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.diff_id.clone()).collect()
    }

    fn digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| l.digest.clone()).collect()
    }
}
