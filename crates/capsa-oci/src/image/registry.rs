//! Registry access through `oci-client`: which transport a registry may use,
//! fetching manifests and streaming blobs, and turning the client's errors
//! into ones a user can act on.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::manifest::{ACCEPTED_MANIFESTS, Digest, MAX_MANIFEST_BYTES};
use super::{ImageError, ResolveOptions, auth};

/// How a registry is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS, with the system's web PKI roots. Every registry by default.
    Https,
    /// Plain HTTP: only loopback registries and those the user listed as
    /// insecure.
    PlainHttp,
}

/// The host part of `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_of(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match registry.matches(':').count() {
        0 => registry,
        1 => registry.split(':').next().unwrap_or(registry),
        // An unbracketed IPv6 literal.
        _ => registry,
    }
}

/// Whether `host` is this machine: `localhost`, `127.0.0.0/8` or `::1`
/// (also IPv4-mapped). Traffic to it never leaves the machine, so TLS adds
/// nothing there; everything else needs TLS unless the user says otherwise.
fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Decides how `registry` (`host` or `host:port`, as a reference names it)
/// is reached: plain HTTP for loopback registries and for those in
/// `insecure_registries` (matched as `host:port`, or as `host` for any port),
/// HTTPS for every other.
pub fn registry_transport(registry: &str, insecure_registries: &[String]) -> Transport {
    let registry_lc = registry.trim().to_ascii_lowercase();
    let host = host_of(&registry_lc);
    if is_loopback_host(host) {
        return Transport::PlainHttp;
    }
    let listed = insecure_registries.iter().any(|entry| {
        let e = entry.trim().to_ascii_lowercase();
        let e = e.strip_prefix("http://").or_else(|| e.strip_prefix("https://")).unwrap_or(&e);
        let e = e.trim_end_matches('/');
        !e.is_empty() && (e == registry_lc || e == host)
    });
    if listed { Transport::PlainHttp } else { Transport::Https }
}

/// What kind of registry failure happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// Could not connect, timed out, or the registry is down (5xx).
    Unreachable,
    /// 401/403 or a failed token exchange.
    Denied,
    /// No such manifest, blob or repository.
    NotFound,
    /// Content did not match its digest.
    DigestMismatch {
        /// The expected digest.
        expected: String,
        /// The digest of what arrived.
        actual: String,
    },
    /// Anything else.
    Other,
}

/// A failed registry request.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// The kind.
    pub(crate) kind: FailureKind,
    /// A short description for the user.
    pub(crate) detail: String,
}

impl Failure {
    /// Whether a cached resolution may stand in.
    pub(crate) fn is_unreachable(&self) -> bool {
        self.kind == FailureKind::Unreachable
    }

    /// The user-facing error for a failure while fetching `what`.
    pub(crate) fn into_error(self, registry: &str, reference: &str, what: &str) -> ImageError {
        let (registry, reference, what) = (registry.to_owned(), reference.to_owned(), what.to_owned());
        match self.kind {
            FailureKind::Unreachable => ImageError::RegistryUnreachable {
                note: format!("it failed while serving {what} of {reference}"),
                registry,
                reference,
                detail: self.detail,
            },
            FailureKind::Denied => ImageError::RegistryDenied { registry, reference, detail: self.detail },
            FailureKind::NotFound => ImageError::RegistryNotFound { registry, reference, what, detail: self.detail },
            FailureKind::DigestMismatch { expected, actual } => {
                ImageError::DigestMismatch { reference, what, expected, actual }
            }
            FailureKind::Other => ImageError::Registry { registry, reference, what, detail: self.detail },
        }
    }
}

/// Recognizes connection-level failures anywhere in an error's source chain.
fn connectivity(err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut text = String::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return Some("refused the connection"),
                io::ErrorKind::TimedOut => return Some("did not answer in time"),
                io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => {
                    return Some("dropped the connection");
                }
                io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                    return Some("is unreachable from here");
                }
                _ => {}
            }
        }
        text.push_str(&e.to_string().to_ascii_lowercase());
        text.push('\n');
        cur = e.source();
    }
    if text.contains("connection refused") {
        Some("refused the connection")
    } else if text.contains("dns error") || text.contains("failed to lookup address") {
        Some("could not be found (DNS lookup failed)")
    } else if text.contains("timed out") {
        Some("did not answer in time")
    } else if text.contains("tcp connect error") || text.contains("error trying to connect") {
        Some("could not be connected to")
    } else {
        None
    }
}

/// The error and its sources, joined.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if parts.last() != Some(&s) {
            parts.push(s);
        }
        cur = e.source();
    }
    parts.join(": ")
}

fn classify(err: &OciDistributionError, transport: Transport, registry: &str) -> Failure {
    let failure = |kind, detail: String| Failure { kind, detail };
    match err {
        OciDistributionError::UnauthorizedError { .. } | OciDistributionError::AuthenticationFailure(_) => {
            failure(FailureKind::Denied, chain(err))
        }
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let kind = if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestBlobUnknown
                )
            }) {
                FailureKind::NotFound
            } else if codes.iter().any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied)) {
                FailureKind::Denied
            } else {
                FailureKind::Other
            };
            let messages: Vec<String> = envelope
                .errors
                .iter()
                .map(|e| if e.message.is_empty() { format!("{:?}", e.code) } else { e.message.clone() })
                .collect();
            failure(kind, messages.join("; "))
        }
        OciDistributionError::ServerError { code, message, .. } => {
            let kind = match code {
                401 | 403 => FailureKind::Denied,
                404 => FailureKind::NotFound,
                500..=599 => FailureKind::Unreachable,
                _ => FailureKind::Other,
            };
            let message: String = message.chars().take(200).collect();
            let detail = if kind == FailureKind::Unreachable {
                format!("is unavailable (HTTP {code})")
            } else {
                format!("HTTP {code}: {message}")
            };
            failure(kind, detail)
        }
        OciDistributionError::DigestError(DigestError::VerificationError { expected, actual }) => {
            failure(FailureKind::DigestMismatch { expected: expected.clone(), actual: actual.clone() }, chain(err))
        }
        OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => match connectivity(err) {
            Some(what) => failure(FailureKind::Unreachable, what.to_owned()),
            None if transport == Transport::Https => failure(
                FailureKind::Other,
                format!("{}; if {registry} serves plain HTTP, list it in the insecure registries", chain(err)),
            ),
            None => failure(FailureKind::Other, chain(err)),
        },
        _ => failure(FailureKind::Other, chain(err)),
    }
}

/// A client for one registry, with its credentials.
pub(crate) struct RegistryClient {
    client: Client,
    auth: RegistryAuth,
    transport: Transport,
    /// The registry as the reference names it.
    pub(crate) registry: String,
}

impl RegistryClient {
    /// A client for the registry of `reference`.
    pub(crate) fn new(reference: &Reference, opts: &ResolveOptions) -> Result<Self, ImageError> {
        let registry = reference.registry().to_owned();
        let transport = registry_transport(reference.resolve_registry(), &opts.insecure_registries);
        let auth = auth::credentials_for(opts.docker_config.as_deref(), &registry)?;
        let config = ClientConfig {
            protocol: match transport {
                Transport::Https => ClientProtocol::Https,
                Transport::PlainHttp => ClientProtocol::Http,
            },
            // capsa selects platforms itself, and reports what exists.
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(15)),
            read_timeout: Some(Duration::from_secs(120)),
            user_agent: concat!("capsa/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        // `Client::new` would silently fall back to a default configuration
        // on error; `try_from` does not.
        let client = Client::try_from(config).map_err(|e| ImageError::Registry {
            registry: registry.clone(),
            reference: reference.whole(),
            what: "a client".into(),
            detail: chain(&e),
        })?;
        tracing::debug!(%registry, ?transport, "registry client");
        Ok(Self { client, auth, transport, registry })
    }

    fn classify(&self, err: &OciDistributionError) -> Failure {
        classify(err, self.transport, &self.registry)
    }

    /// Fetches the manifest (or index) `reference` names, by tag or digest;
    /// returns its bytes and their digest, checked against the reference's
    /// digest if it has one.
    pub(crate) async fn manifest(&self, reference: &Reference) -> Result<(Vec<u8>, Digest), Failure> {
        let (body, _) = self
            .client
            .pull_manifest_raw(reference, &self.auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(|e| self.classify(&e))?;
        if body.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(Failure {
                kind: FailureKind::Other,
                detail: format!("the manifest exceeds {MAX_MANIFEST_BYTES} bytes"),
            });
        }
        let digest = Digest::of(&body);
        if let Some(want) = reference.digest() {
            if want != digest.as_str() {
                return Err(Failure {
                    kind: FailureKind::DigestMismatch { expected: want.to_owned(), actual: digest.to_string() },
                    detail: "manifest digest mismatch".into(),
                });
            }
        }
        Ok((body.to_vec(), digest))
    }

    /// Streams the blob `digest` of `reference`'s repository into `out`;
    /// `oci-client` checks the digest at the end of the stream (and the
    /// caller checks it again).
    pub(crate) async fn blob<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        reference: &Reference,
        digest: &Digest,
        out: &mut W,
    ) -> Result<(), Failure> {
        self.client.store_auth_if_needed(reference.resolve_registry(), &self.auth).await;
        self.client.pull_blob(reference, digest.as_str(), out).await.map_err(|e| self.classify(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_may_use_plain_http() {
        for r in [
            "127.0.0.1:5000",
            "127.0.0.1",
            "127.1.2.3:80",
            "localhost",
            "LOCALHOST:5000",
            "[::1]:5000",
            "[::1]",
            "::1",
            "[::ffff:127.0.0.1]:5000",
        ] {
            assert_eq!(registry_transport(r, &[]), Transport::PlainHttp, "{r}");
        }
    }

    #[test]
    fn everything_else_needs_https_unless_listed() {
        let none: Vec<String> = vec![];
        for r in [
            "docker.io",
            "index.docker.io",
            "ghcr.io",
            "10.0.0.5:5000",
            "192.168.1.10:5000",
            "128.0.0.1:5000",
            "localhost.example.com:5000",
            "127.0.0.1.nip.io:5000",
            "[::2]:5000",
            "0.0.0.0:5000",
        ] {
            assert_eq!(registry_transport(r, &none), Transport::Https, "{r}");
        }
        let listed = vec!["registry.internal:5000".to_owned(), "http://plain.example/".to_owned()];
        assert_eq!(registry_transport("registry.internal:5000", &listed), Transport::PlainHttp);
        // A host:port entry does not open other ports of that host.
        assert_eq!(registry_transport("registry.internal:6000", &listed), Transport::Https);
        // A bare host entry opens every port.
        assert_eq!(registry_transport("plain.example:1234", &listed), Transport::PlainHttp);
        assert_eq!(registry_transport("plain.example", &listed), Transport::PlainHttp);
        assert_eq!(registry_transport("other.example", &listed), Transport::Https);
        assert_eq!(registry_transport("docker.io", &[String::new()]), Transport::Https);
    }

    #[test]
    fn connection_refused_is_unreachable() {
        let err = OciDistributionError::IoError(io::Error::from(io::ErrorKind::ConnectionRefused));
        let f = classify(&err, Transport::PlainHttp, "127.0.0.1:1");
        assert!(f.is_unreachable());
        assert_eq!(f.detail, "refused the connection");
        let err = OciDistributionError::ServerError { code: 503, url: "u".into(), message: "m".into() };
        assert!(classify(&err, Transport::Https, "r").is_unreachable());
        let err = OciDistributionError::ServerError { code: 404, url: "u".into(), message: "m".into() };
        assert_eq!(classify(&err, Transport::Https, "r").kind, FailureKind::NotFound);
        let err = OciDistributionError::UnauthorizedError { url: "u".into() };
        assert_eq!(classify(&err, Transport::Https, "r").kind, FailureKind::Denied);
    }
}
