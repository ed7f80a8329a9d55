//! A client for the trust service: what a workload, a relying party or an
//! admin calls. It also opens release answers: it checks the answer's
//! signature against the server's published keys and unwraps the key with
//! the workload's private RSA key.

use aws_lc_rs::rsa::PrivateDecryptingKey;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use zeroize::Zeroizing;

pub use reqwest::Method;

use crate::api::{EvidenceKind, KeyInfo, ReleaseResponse};
use crate::token::{self, Jwks};
use crate::wrap::{self, KeyHsm};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the trust service at {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The server refused.
    #[error("{status} {code}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// The error code.
        code: String,
        /// The server's explanation.
        message: String,
    },
    /// The answer could not be read or did not verify.
    #[error("the trust service's answer: {0}")]
    Answer(String),
}

impl ClientError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An error and its sources on one line: reqwest's own message ("builder
/// error", "error sending request") says little without them.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// How [`Client::with_options`] reaches and authenticates the server.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions<'a> {
    /// PEM certificates the server's HTTPS certificate must chain to, in
    /// place of the system roots (as [`Client::with_ca`]).
    pub ca_pem: Option<&'a [u8]>,
    /// Connect to this address whenever the URL names this host, such as a
    /// port forwarded to the service. TLS is still verified for the host
    /// name, and the address's port is used whatever port the URL has
    /// (port 0 keeps the URL's). The host must be the URL's.
    pub resolve: Option<(String, std::net::SocketAddr)>,
}

/// A client of one server.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    admin_token: Option<String>,
    /// Where connections really go when [`ClientOptions::resolve`] was set:
    /// said in errors, since the URL alone would mislead.
    via: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The admin token is a credential: never printed.
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("via", &self.via)
            .field("admin", &self.admin_token.is_some())
            .finish()
    }
}

impl Client {
    /// For the server at `base` (`http://127.0.0.1:8443`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_builder(base, reqwest::Client::builder(), None)
    }

    /// For a server whose HTTPS certificate chains to `ca_pem` (PEM) rather
    /// than to a system root, such as a self-signed one.
    pub fn with_ca(base: &str, ca_pem: &[u8]) -> Result<Self, ClientError> {
        Self::with_options(base, ClientOptions { ca_pem: Some(ca_pem), resolve: None })
    }

    /// For the server at `base`, reached and authenticated as `options` say:
    /// for a caller that reaches the service through a forwarded local port
    /// (`resolve`) while verifying TLS for its real name.
    pub fn with_options(base: &str, options: ClientOptions<'_>) -> Result<Self, ClientError> {
        let setup = |reason: String| ClientError::Unreachable { url: base.to_owned(), reason };
        let mut builder = reqwest::Client::builder();
        if let Some(ca_pem) = options.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(ca_pem).map_err(|e| setup(format!("CA file: {e}")))?;
            builder = builder.tls_certs_only(certs);
        }
        let Some((host, addr)) = options.resolve else {
            return Self::with_builder(base, builder, None);
        };
        let base = resolved_base(base, &host, addr).map_err(setup)?;
        Self::with_builder(&base, builder.resolve(&host, addr), Some(addr))
    }

    fn with_builder(
        base: &str,
        builder: reqwest::ClientBuilder,
        via: Option<std::net::SocketAddr>,
    ) -> Result<Self, ClientError> {
        let http = builder
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Unreachable { url: base.to_owned(), reason: error_chain(&e) })?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http, admin_token: None, via })
    }

    /// Sends this admin bearer token with admin calls.
    pub fn with_admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.admin_token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |url: String, e: reqwest::Error| ClientError::Unreachable {
            url,
            reason: match self.via {
                Some(addr) => format!("{} (connecting to {addr})", error_chain(&e)),
                None => error_chain(&e),
            },
        };
        let response = request.send().await.map_err(|e| unreachable(url.clone(), e))?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| unreachable(url, e))?;
        if status.is_success() {
            if bytes.is_empty() {
                return Ok(Value::Null);
            }
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::Answer(e.to_string()));
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let field = |f: &str| value.pointer(&format!("/error/{f}")).and_then(Value::as_str).unwrap_or("").to_owned();
        Err(ClientError::Refused { status: status.as_u16(), code: field("code"), message: field("message") })
    }

    /// A fresh server nonce (base64url).
    pub async fn nonce(&self) -> Result<String, ClientError> {
        let v = self.call(reqwest::Method::GET, "/nonce", None).await?;
        v.get("nonce").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| ClientError::Answer("no nonce".into()))
    }

    /// Attests; returns the token.
    pub async fn attest(
        &self,
        kind: EvidenceKind,
        policy: Option<&str>,
        request: &Value,
    ) -> Result<String, ClientError> {
        let mut path = format!("/attest/{}", kind.as_str());
        if let Some(policy) = policy {
            path.push_str(&format!("?policy={policy}"));
        }
        let v = self.call(reqwest::Method::POST, &path, Some(request)).await?;
        v.get("token").and_then(Value::as_str).map(str::to_owned).ok_or_else(|| ClientError::Answer("no token".into()))
    }

    /// The production issuer's keys (`sim` for the sim issuer's).
    pub async fn jwks(&self, sim: bool) -> Result<Jwks, ClientError> {
        let v = self.call(reqwest::Method::GET, if sim { "/sim/certs" } else { "/certs" }, None).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Answer(e.to_string()))
    }

    /// Creates a key (admin).
    pub async fn create_key(&self, request: &Value) -> Result<KeyInfo, ClientError> {
        let v = self.call(reqwest::Method::POST, "/keys", Some(request)).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Answer(e.to_string()))
    }

    /// Lists keys (admin).
    pub async fn list_keys(&self) -> Result<Vec<KeyInfo>, ClientError> {
        let v = self.call(reqwest::Method::GET, "/keys", None).await?;
        serde_json::from_value(v.get("keys").cloned().unwrap_or(Value::Null))
            .map_err(|e| ClientError::Answer(e.to_string()))
    }

    /// Replaces a key's release policy (admin).
    pub async fn set_policy(&self, name: &str, policy: &Value) -> Result<KeyInfo, ClientError> {
        let v = self
            .call(reqwest::Method::PUT, &format!("/keys/{name}/policy"), Some(&json!({"release_policy": policy})))
            .await?;
        serde_json::from_value(v).map_err(|e| ClientError::Answer(e.to_string()))
    }

    /// Any admin call: method, path, body; the answer's JSON.
    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.call(method, path, body).await
    }

    /// Asks for key `name` (`version`, or the current one) for the holder of `token`.
    pub async fn release(
        &self,
        name: &str,
        version: Option<&str>,
        token: &str,
    ) -> Result<ReleaseResponse, ClientError> {
        let path = match version {
            Some(v) => format!("/keys/{name}/{v}/release"),
            None => format!("/keys/{name}/release"),
        };
        let v = self.call(reqwest::Method::POST, &path, Some(&json!({"target": token}))).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Answer(e.to_string()))
    }
}

/// `base` with no port of its own when `resolve` gives one, so that
/// connections go to `addr`: reqwest (and hyper-util under it) let an
/// explicit port in the URL win over the port of an overridden or custom
/// resolution, whatever the resolver. Without a port the Host header names
/// the host alone, as it would for the scheme's default port.
fn resolved_base(base: &str, host: &str, addr: std::net::SocketAddr) -> Result<String, String> {
    let mut url = reqwest::Url::parse(base).map_err(|e| format!("URL: {e}"))?;
    // reqwest matches overrides against the URL's host name, lowercased; an
    // override for another name, or for an IP address that is never
    // resolved, would be silently ignored.
    match url.domain() {
        Some(domain) if domain.eq_ignore_ascii_case(host) => {}
        Some(domain) => return Err(format!("resolve names {host}, but the URL's host is {domain}")),
        None => return Err(format!("resolve needs a URL with a host name, not {base}")),
    }
    if addr.port() != 0 {
        url.set_port(None).map_err(|()| format!("cannot drop the port of {base}"))?;
    }
    Ok(url.as_str().to_owned())
}

/// A verified release answer's key material, unwrapped. Debug shows the
/// key's id and type, never the material.
pub struct ReleasedKey {
    /// The key's id (`<issuer>/keys/<name>/<version>`).
    pub kid: String,
    /// `oct-HSM`, `RSA-HSM`, `EC-HSM` or `secret`.
    pub kty: String,
    /// The material: raw bytes for oct and secrets, PKCS#8 DER for RSA and EC.
    pub material: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ReleasedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReleasedKey").field("kid", &self.kid).field("kty", &self.kty).finish_non_exhaustive()
    }
}

/// Checks a release answer's signature against `server_keys` (the
/// production issuer's JWKS) and unwraps its key with `wrapping_key`.
pub fn open_release(
    response: &ReleaseResponse,
    server_keys: &Jwks,
    wrapping_key: &PrivateDecryptingKey,
) -> Result<ReleasedKey, ClientError> {
    let payload = verify_jws(&response.value, server_keys)?;
    let key = payload.pointer("/response/key/key").ok_or_else(|| ClientError::Answer("no response.key.key".into()))?;
    let text = |f: &str| key.get(f).and_then(Value::as_str).map(str::to_owned);
    let key_hsm = text("key_hsm").ok_or_else(|| ClientError::Answer("no key_hsm".into()))?;
    let hsm = KeyHsm::parse(&key_hsm).map_err(|e| ClientError::Answer(e.to_string()))?;
    let material = wrap::unwrap_key(wrapping_key, &hsm.ciphertext).map_err(|e| ClientError::Answer(e.to_string()))?;
    Ok(ReleasedKey { kid: text("kid").unwrap_or_default(), kty: text("kty").unwrap_or_default(), material })
}

/// The payload of a compact JWS signed by one of `keys` (a release answer
/// carries no time claims: its signature is what matters).
fn verify_jws(jws: &str, keys: &Jwks) -> Result<Value, ClientError> {
    let bytes = token::verify_signed_payload(jws, keys).map_err(|e| ClientError::Answer(e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Answer(e.to_string()))
}

/// What a workload binds as runtime data: its wrapping key's public JWK in
/// `keys`, as Azure's SKR sidecar does.
pub fn runtime_data_for(wrapping_key: &PrivateDecryptingKey) -> Result<Value, ClientError> {
    let public = wrap::rsa_public_jwk(&wrapping_key.public_key()).map_err(|e| ClientError::Answer(e.to_string()))?;
    Ok(
        json!({"keys": [{"kid": "TpmEphemeralEncryptionKey", "kty": "RSA", "key_ops": ["encrypt"], "n": public.n, "e": public.e}]}),
    )
}

/// How an attest request declares its runtime data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeDataType {
    /// A JSON document, which the token carries as such.
    Json,
    /// Opaque bytes.
    Binary,
}

impl RuntimeDataType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Json => "JSON",
            Self::Binary => "Binary",
        }
    }
}

/// Builds an SevSnpVm attest request body: the report and its VCEK chain
/// (PEM), the runtime data (JSON) and an optional nonce.
pub fn snp_attest_request(report: &[u8], vcek_chain_pem: &[u8], runtime: &Value, nonce: Option<&str>) -> Value {
    snp_attest_request_with(report, Some(vcek_chain_pem), runtime.to_string().as_bytes(), RuntimeDataType::Json, nonce)
}

/// [`snp_attest_request`] for runtime data given as bytes, and without a
/// chain when the service is to take the VCEK from its certificate cache.
pub fn snp_attest_request_with(
    report: &[u8],
    vcek_chain_pem: Option<&[u8]>,
    runtime: &[u8],
    data_type: RuntimeDataType,
    nonce: Option<&str>,
) -> Value {
    let mut envelope = json!({"SnpReport": URL_SAFE_NO_PAD.encode(report)});
    if let (Some(chain), Some(obj)) = (vcek_chain_pem, envelope.as_object_mut()) {
        obj.insert("VcekCertChain".into(), Value::String(URL_SAFE_NO_PAD.encode(chain)));
    }
    let mut body = json!({
        "report": URL_SAFE_NO_PAD.encode(envelope.to_string()),
        "runtimeData": {"data": URL_SAFE_NO_PAD.encode(runtime), "dataType": data_type.as_str()},
    });
    if let (Some(n), Some(obj)) = (nonce, body.as_object_mut()) {
        obj.insert("nonce".into(), Value::String(n.to_owned()));
    }
    body
}

/// The REPORT_DATA a guest asks for to attest `runtime` (and `nonce`): the
/// SHA-256 of the runtime data's JSON, then the SHA-256 of the nonce's bytes
/// or zeros, the one layout the server's attestation accepts.
pub fn report_data_for(runtime: &Value, nonce: Option<&str>) -> Result<[u8; 64], ClientError> {
    report_data_for_bytes(runtime.to_string().as_bytes(), nonce)
}

/// [`report_data_for`] for runtime data given as the bytes the request
/// carries.
pub fn report_data_for_bytes(runtime: &[u8], nonce: Option<&str>) -> Result<[u8; 64], ClientError> {
    let mut out = [0u8; 64];
    let (first, second) = out.split_at_mut(32);
    first.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, runtime).as_ref());
    if let Some(n) = nonce {
        let bytes = URL_SAFE_NO_PAD.decode(n).map_err(|e| ClientError::Answer(format!("nonce: {e}")))?;
        second.copy_from_slice(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes).as_ref());
    }
    Ok(out)
}

/// The workload's key pair that released keys are wrapped to (RSA-2048),
/// kept as PKCS#8 in a file only its owner can read.
pub struct RuntimeKey(PrivateDecryptingKey);

impl std::fmt::Debug for RuntimeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuntimeKey(..)")
    }
}

impl RuntimeKey {
    /// A new key.
    pub fn generate() -> Result<Self, ClientError> {
        wrap::generate_rsa_wrapping_key(2048).map(Self).map_err(|e| ClientError::Answer(e.to_string()))
    }

    /// Writes the private key (PKCS#8 DER) to `path` with mode 0600,
    /// atomically.
    pub fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use aws_lc_rs::encoding::AsDer as _;
        let der = self.0.as_der().map_err(|_| std::io::Error::other("cannot encode the runtime key"))?;
        crate::seal::write_private(path, der.as_ref())
    }

    /// Reads a key written by [`RuntimeKey::save`].
    pub fn load(path: &std::path::Path) -> Result<Self, ClientError> {
        let der = Zeroizing::new(
            std::fs::read(path).map_err(|e| ClientError::Answer(format!("cannot read {}: {e}", path.display())))?,
        );
        PrivateDecryptingKey::from_pkcs8(&der)
            .map(Self)
            .map_err(|_| ClientError::Answer(format!("{} is not an RSA private key (PKCS#8 DER)", path.display())))
    }

    /// The private key.
    pub fn private(&self) -> &PrivateDecryptingKey {
        &self.0
    }

    /// The runtime data to attest: this key's public JWK in `keys`.
    pub fn runtime_data(&self) -> Result<Value, ClientError> {
        runtime_data_for(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;

    const FORWARD: &str = "127.0.0.1:4321";

    fn forward() -> SocketAddr {
        FORWARD.parse().unwrap()
    }

    #[test]
    fn a_resolved_url_loses_its_port_so_the_forwards_is_used() {
        assert_eq!(
            resolved_base("https://trust.example:8443", "trust.example", forward()).unwrap(),
            "https://trust.example/"
        );
        assert_eq!(
            resolved_base("https://Trust.Example:8443/prefix/", "trust.example", forward()).unwrap(),
            "https://trust.example/prefix/"
        );
    }

    #[test]
    fn a_forward_on_port_0_keeps_the_urls_port() {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            resolved_base("http://trust.example:8080", "trust.example", addr).unwrap(),
            "http://trust.example:8080/"
        );
    }

    #[test]
    fn a_resolve_that_would_never_apply_is_refused() {
        let err = resolved_base("https://trust.example", "other.example", forward()).unwrap_err();
        assert_eq!(err, "resolve names other.example, but the URL's host is trust.example");
        let err = resolved_base("https://10.0.0.1:8443", "10.0.0.1", forward()).unwrap_err();
        assert!(err.contains("host name"), "{err}");
        assert!(resolved_base("not a url", "trust.example", forward()).unwrap_err().starts_with("URL: "));
    }

    #[test]
    fn options_errors_name_the_url_and_what_failed() {
        // A PEM block that is not base64 (text with no block at all is an empty bundle).
        let pem = b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n";
        let options = ClientOptions { ca_pem: Some(pem), resolve: None };
        let err = Client::with_options("https://trust.example", options).unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { ref url, .. } if url == "https://trust.example"), "{err}");
        let options = ClientOptions { ca_pem: None, resolve: Some(("other.example".to_owned(), forward())) };
        let err = Client::with_options("https://trust.example", options).unwrap_err();
        assert!(err.to_string().contains("other.example"), "{err}");
    }
}
