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
//!
//! # Features
//!
//! - `server` (default): the service itself (every module but those below)
//!   and the dependencies only it needs: axum, redb, prometheus-client, the
//!   TLS listener, TOML configuration, `capsa-tee`. Without it the crate is
//!   what a guest needs: [`client`] and what it shares with the server,
//!   [`api`] (the API's JSON types), [`token`], [`wrap`] and [`seal`].
// Without `server` the modules it builds are absent, and the overview above
// names them: a client-only build's docs keep the names, unlinked.
#![cfg_attr(not(feature = "server"), allow(rustdoc::broken_intra_doc_links))]
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, clippy::panic))]

pub mod api;
pub mod client;
pub mod seal;
pub mod token;
pub mod wrap;

#[cfg(feature = "server")]
pub mod attestation;
#[cfg(feature = "server")]
pub mod audit;
#[cfg(feature = "server")]
pub mod broker;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod issuer;
#[cfg(feature = "server")]
pub mod release_policy;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tls;
