//! Execution policies: what the untrusted host may ask of a confidential
//! sandbox, fixed before launch and bound into the hardware evidence.
//!
//! - [`model`]: the per-workload policy data;
//! - [`request`]: host requests, as the rules see them;
//! - [`document`]: the Rego document (rules + data), initdata (with the
//!   sandbox settings it may carry beside the policy), and the
//!   digest HOST_DATA must carry;
//! - [`engine`]: the engine that decides each host request and explains
//!   every denial;
//! - [`diff`]: what changed between two policies, container by container;
//! - [`generate`]: policies from Kubernetes YAML, ARM templates and compose
//!   files.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod diff;
pub mod document;
pub mod engine;
pub mod generate;
pub mod model;
pub mod request;
