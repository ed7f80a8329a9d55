//! The host side of a sandbox: what the guest boots, and (as it grows) the
//! microVM launcher and the measurement of what it launches.
//!
//! - [`initramfs`]: a reproducible initramfs (newc cpio, gzip without a
//!   timestamp): the same inputs give the same bytes, so the guest image's
//!   measurement can be published as a reference value;
//! - [`modules`]: which kernel modules the guest needs, with their
//!   dependencies, in the order to load them, from the kernel's
//!   `modules.dep`;
//! - [`guest`]: the guest image `capsa guest build` writes (kernel,
//!   initramfs with the agent as `/init` and its modules, command line) and
//!   the initramfs layout the agent relies on;
//! - [`measure`]: the launch digest of a kernel, initrd and command line, as
//!   SEV-SNP measured direct boot computes it minus the firmware: what
//!   `capsa measure` prints and the sim platform signs as MEASUREMENT.
//!
//! The crate knows nothing of trust-service internals; the guest agent is a
//! file it packs, not code it calls.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod client;
pub mod control;
pub mod forward;
pub mod guest;
pub mod initramfs;
pub mod measure;
pub mod modules;
pub mod pod;
pub mod sandbox;
