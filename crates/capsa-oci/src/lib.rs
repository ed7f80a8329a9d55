//! OCI images, as capsa needs them: resolve a reference to a manifest
//! digest and its layers (registry, local OCI layout, oci-archive or
//! docker-archive), hash each layer (compressed digest and diff_id), and
//! compute dm-verity root hashes of image files. It knows nothing of
//! policies: `capsa-policy` takes the hashes it produces.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

/// dm-verity root hashes and hash trees, bit-identical to `veritysetup format`.
pub mod verity;

/// Image resolution: a reference (registry, OCI layout, oci-archive or
/// docker-archive) to its manifest digest, config and layer diff_ids.
pub mod image;
