//! The Rust SDK for programs running in a capsa sandbox.
//!
//! Inside a sandbox the agent serves the workload API on the guest's
//! 127.0.0.1, in the shape of the Azure secure-key-release sidecar's REST
//! API. It is reachable by the pod's containers and by nothing else, so a
//! workload asks it for the guest's evidence, for a token from the trust
//! service, or for a key that the key broker releases only to a guest whose
//! token satisfies the key's release policy.
//!
//! - [`client`]: [`WorkloadClient`], a small synchronous client of that
//!   API, and [`ReleasedKey`], the key it returns, zeroized on drop;
//! - [`seal`]: the sealed-file format of `capsa-unseal` (a 12-byte nonce,
//!   then AES-256-GCM ciphertext and tag), for data owners and workloads.
//!
//! ```no_run
//! use capsa_sdk::WorkloadClient;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = WorkloadClient::from_env();
//! let key = client.release_key("https://trust.example", "https://kb.example", "data-key")?;
//! let sealed = std::fs::read("data.sealed")?;
//! let plain = capsa_sdk::seal::unseal(key.octets().ok_or("not a symmetric key")?, &sealed)?;
//! # let _ = plain;
//! # Ok(())
//! # }
//! ```
//!
//! The crate depends on no other capsa crate: it speaks only the API's HTTP,
//! so that it also works against the Azure sidecar.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod client;
mod http;
mod key;
pub mod seal;

pub use client::{ClientError, WorkloadClient};
pub use key::ReleasedKey;
