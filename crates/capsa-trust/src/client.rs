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

use crate::attestation::EvidenceKind;
use crate::broker::{KeyInfo, ReleaseResponse};
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

/// A client of one server.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
    admin_token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The admin token is a credential: never printed.
        f.debug_struct("Client").field("base", &self.base).field("admin", &self.admin_token.is_some()).finish()
    }
}

impl Client {
    /// For the server at `base` (`http://127.0.0.1:8443`).
    pub fn new(base: &str) -> Result<Self, ClientError> {
        Self::with_builder(base, reqwest::Client::builder())
    }

    /// For a server whose HTTPS certificate chains to `ca_pem` (PEM) rather
    /// than to a system root, such as a self-signed one.
    pub fn with_ca(base: &str, ca_pem: &[u8]) -> Result<Self, ClientError> {
        let certs = reqwest::Certificate::from_pem_bundle(ca_pem)
            .map_err(|e| ClientError::Unreachable { url: base.to_owned(), reason: format!("CA file: {e}") })?;
        Self::with_builder(base, reqwest::Client::builder().tls_certs_only(certs))
    }

    fn with_builder(base: &str, builder: reqwest::ClientBuilder) -> Result<Self, ClientError> {
        let http = builder
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .map_err(|e| ClientError::Unreachable { url: base.to_owned(), reason: e.to_string() })?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), http, admin_token: None })
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
        let response =
            request.send().await.map_err(|e| ClientError::Unreachable { url: url.clone(), reason: e.to_string() })?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(|e| ClientError::Unreachable { url, reason: e.to_string() })?;
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

/// Builds an SevSnpVm attest request body: the report and its VCEK chain
/// (PEM), the runtime data (JSON) and an optional nonce.
pub fn snp_attest_request(report: &[u8], vcek_chain_pem: &[u8], runtime: &Value, nonce: Option<&str>) -> Value {
    let envelope = json!({
        "SnpReport": URL_SAFE_NO_PAD.encode(report),
        "VcekCertChain": URL_SAFE_NO_PAD.encode(vcek_chain_pem),
    });
    let mut body = json!({
        "report": URL_SAFE_NO_PAD.encode(envelope.to_string()),
        "runtimeData": {"data": URL_SAFE_NO_PAD.encode(runtime.to_string()), "dataType": "JSON"},
    });
    if let (Some(n), Some(obj)) = (nonce, body.as_object_mut()) {
        obj.insert("nonce".into(), Value::String(n.to_owned()));
    }
    body
}

/// The REPORT_DATA a guest asks for to attest `runtime` (and `nonce`): see
/// [`crate::attestation`] for the rule.
pub fn report_data_for(runtime: &Value, nonce: Option<&str>) -> Result<[u8; 64], ClientError> {
    let mut out = [0u8; 64];
    let (first, second) = out.split_at_mut(32);
    first.copy_from_slice(
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, runtime.to_string().as_bytes()).as_ref(),
    );
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
