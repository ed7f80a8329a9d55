//! The trust service: the party that owns the data never sees the TEE; it
//! sees a token from here and decides whether to release a key.
//!
//! `capsa-trust` is one server with one embedded store that does what a
//! cloud attestation service and a key vault's secure key release do
//! together:
//!
//! - [`attestation`]: evidence in the Azure attestation API's shape,
//!   verified by `capsa-tee`, bound to the runtime data, appraised against
//!   reference values;
//! - [`token`]: signed JWTs (ES384) with a JWKS and OpenID metadata, and a
//!   separate issuer for sim evidence;
//! - [`broker`]: keys and secrets with Azure Key Vault release policies
//!   ([`release_policy`]), released wrapped to the workload's key ([`wrap`]);
//! - [`store`] and [`audit`]: a redb database sealed under a master key
//!   ([`seal`]) and a hash-chained audit log;
//! - [`server`] (axum) and [`client`].
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod attestation;
pub mod audit;
pub mod broker;
pub mod client;
pub mod config;
pub mod issuer;
pub mod release_policy;
pub mod seal;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
pub mod wrap;
