//! The client of the workload API.
//!
//! Each call is one request on a fresh loopback connection, as the API
//! closes every connection after its answer. Failures keep apart what the
//! API refused or failed ([`ClientError::Api`], with the HTTP status and the
//! API's own `error` message, which names the failed step) from not
//! reaching the API at all.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use crate::http;
use crate::key::ReleasedKey;

/// The environment variable naming the API's `host:port`.
pub const ENV_VAR: &str = "CAPSA_WORKLOAD_API";
/// Where the API listens when [`ENV_VAR`] is unset: the Azure sidecar's
/// default, which the agent keeps.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
/// How long to wait for a connection; the API is on loopback.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for an answer: a key release reaches the trust service
/// and the key broker outside the sandbox.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed call to the workload API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No connection to the API.
    #[error(
        "cannot reach the workload api at {addr}: {source}; is this running in a capsa sandbox (or is {ENV_VAR} wrong)?"
    )]
    Connect {
        /// The address tried.
        addr: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The connection failed during the exchange.
    #[error("the exchange with the workload api at {addr} failed: {source}")]
    Io {
        /// The API's address.
        addr: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The API answered with an error.
    #[error("the workload api answered {status}: {message}")]
    Api {
        /// The HTTP status: 400 for a malformed request, 403 for a refusal
        /// by the execution policy or a release policy, 5xx for a failure.
        status: u16,
        /// The API's `error` message, `<step>: <what failed>`.
        message: String,
    },
    /// The answer is not what the API sends.
    #[error("the workload api's answer is malformed: {0}")]
    Answer(String),
}

impl ClientError {
    /// The HTTP status, when the API answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The API's `error` message, when it answered with an error.
    pub fn api_message(&self) -> Option<&str> {
        match self {
            Self::Api { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// A client of the workload API at one address.
#[derive(Debug, Clone)]
pub struct WorkloadClient {
    addr: String,
    timeout: Duration,
}

#[derive(Deserialize)]
struct StatusAnswer {
    message: String,
}

#[derive(Deserialize)]
struct ReportAnswer {
    report: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: String,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
}

impl WorkloadClient {
    /// A client of the API at `addr` (`host:port`).
    pub fn new(addr: impl Into<String>) -> Self {
        Self { addr: addr.into(), timeout: DEFAULT_TIMEOUT }
    }

    /// A client of the API at `$CAPSA_WORKLOAD_API`, or at
    /// [`DEFAULT_ADDR`] when it is unset or empty.
    pub fn from_env() -> Self {
        match std::env::var(ENV_VAR) {
            Ok(addr) if !addr.trim().is_empty() => Self::new(addr.trim()),
            _ => Self::new(DEFAULT_ADDR),
        }
    }

    /// Waits up to `timeout` for each answer instead of [`DEFAULT_TIMEOUT`].
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The API's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET /status`: the API's status message (`STATUS OK`).
    ///
    /// # Errors
    /// As every call: see [`ClientError`].
    pub fn status(&self) -> Result<String, ClientError> {
        let answer = self.call("GET", "/status", None)?;
        Ok(parse_json::<StatusAnswer>(answer.body())?.message)
    }

    /// `POST /attest/raw`: the guest's evidence (on SEV-SNP, the attestation
    /// report) whose report data binds `runtime_data`.
    ///
    /// # Errors
    /// As every call: see [`ClientError`].
    pub fn evidence(&self, runtime_data: &[u8]) -> Result<Vec<u8>, ClientError> {
        let body = serde_json::json!({ "runtime_data": STANDARD.encode(runtime_data) });
        let answer = self.call("POST", "/attest/raw", Some(&body))?;
        let report = parse_json::<ReportAnswer>(answer.body())?.report;
        hex::decode(report).map_err(|e| ClientError::Answer(format!("the report is not hex: {e}")))
    }

    /// `POST /attest/maa`: a token from the attestation service at
    /// `maa_endpoint` whose runtime claims bind `runtime_data`.
    ///
    /// # Errors
    /// As every call: see [`ClientError`].
    pub fn token(&self, maa_endpoint: &str, runtime_data: &[u8]) -> Result<String, ClientError> {
        let body = serde_json::json!({
            "maa_endpoint": maa_endpoint,
            "runtime_data": STANDARD.encode(runtime_data),
        });
        let answer = self.call("POST", "/attest/maa", Some(&body))?;
        Ok(parse_json::<TokenAnswer>(answer.body())?.token)
    }

    /// `POST /key/release`: the key `kid` from the key broker at
    /// `akv_endpoint`, released against a token from `maa_endpoint`.
    ///
    /// # Errors
    /// As every call: see [`ClientError`]. A release policy's refusal is
    /// [`ClientError::Api`] with status 403 and a message beginning
    /// `release policy:`.
    pub fn release_key(&self, maa_endpoint: &str, akv_endpoint: &str, kid: &str) -> Result<ReleasedKey, ClientError> {
        let body = serde_json::json!({ "maa_endpoint": maa_endpoint, "akv_endpoint": akv_endpoint, "kid": kid });
        let answer = self.call("POST", "/key/release", Some(&body))?;
        ReleasedKey::from_answer(answer.body())
    }

    /// One exchange; any status but 200 becomes [`ClientError::Api`].
    fn call(&self, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<http::Answer, ClientError> {
        let body = body.map(serde_json::Value::to_string);
        let answer = http::exchange(
            &self.addr,
            (CONNECT_TIMEOUT, self.timeout),
            method,
            path,
            body.as_deref().map(str::as_bytes),
        )?;
        if answer.status == 200 {
            return Ok(answer);
        }
        let message = match serde_json::from_slice::<ErrorAnswer>(answer.body()) {
            Ok(e) => e.error,
            // Not the API's error shape: show a little of what came, which
            // for an error is never key material.
            Err(_) => {
                let text = String::from_utf8_lossy(answer.body());
                let text: String = text.chars().take(200).collect();
                if text.trim().is_empty() { "(no error message)".to_owned() } else { text }
            }
        };
        Err(ClientError::Api { status: answer.status, message })
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Answer(e.to_string()))
}
