//! The host side of a sandbox: what the guest boots, and (as it grows) the
//! microVM launcher and the measurement of what it launches.
//!
//! - [`initramfs`]: a reproducible initramfs (newc cpio, gzip without a
//!   timestamp): the same inputs give the same bytes, so the guest image's
//!   measurement can be published as a reference value;
//! - [`modules`]: which kernel modules the guest needs, with their
//!   dependencies, in the order to load them, from the kernel's
//!   `modules.dep`.
//!
//! The crate knows nothing of trust-service internals; the guest agent is a
//! file it packs, not code it calls.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod initramfs;
pub mod modules;
