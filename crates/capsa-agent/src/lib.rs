//! The agent inside a sandbox: the guest's PID 1 and the only door into it.
//!
//! The host is untrusted. Everything it may ask is a [`protocol::Call`] on a
//! virtio-serial port, and the agent decides each one with the policy whose
//! digest the hardware reports as HOST_DATA before it changes anything:
//!
//! - [`protocol`]: frames and messages on the host↔guest ports;
//! - [`layer`]: layers streamed in by the host, unpacked to staging while
//!   their diff_id is computed, committed only when it matches, with every
//!   tar entry that could escape the layer refused;
//! - [`container`]: containers on an overlay of their layers, in their own
//!   mount, PID, IPC and UTS namespaces, with the user, groups,
//!   capabilities, no_new_privileges, read-only root and mounts the policy
//!   allowed.
//!
//! The agent knows nothing of the host's launcher; it only answers the port.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod container;
pub mod encfs;
pub mod evidence;
pub mod forward;
pub mod init;
pub mod layer;
pub mod net;
pub mod protocol;
pub mod reaper;
pub mod server;
pub mod service;
pub mod workload;
