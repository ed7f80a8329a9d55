//! What the workload API does: evidence, tokens and keys for the pod's
//! containers, each call decided by the policy first.
//!
//! Key release is Azure's secure key release, done inside the guest: the
//! agent makes an RSA key pair, attests with its public half as runtime
//! data (bound into REPORT_DATA), gets a token from the trust service, asks
//! the key broker to release the key wrapped to that public key, checks the
//! broker's signature and unwraps. The private half never leaves guest
//! memory. Only the trust services the initdata names can be reached (the
//! launcher forwards nothing else), and TLS to them ends in the guest.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_policy::document::{SandboxSettings, TrustAddress, TrustEndpoint};
use capsa_policy::request::Request;
use capsa_tee::attest::EvidenceKind as TeeKind;
use capsa_trust::api::EvidenceKind;
use capsa_trust::client::{self, Client, ClientError, ClientOptions, RuntimeDataType, RuntimeKey};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::forward::Forwarder;
use crate::server::Agent;
use crate::workload::{ApiError, Jwk, Step, WorkloadBackend};

/// The workload API's backend in a sandbox.
pub struct WorkloadService {
    agent: Arc<Agent>,
    settings: SandboxSettings,
    forwarder: Forwarder,
}

impl WorkloadService {
    /// A backend for `agent`, reaching the trust services in `settings`
    /// through `forwarder`.
    pub fn new(agent: Arc<Agent>, settings: SandboxSettings, forwarder: Forwarder) -> Self {
        Self { agent, settings, forwarder }
    }

    /// The initdata's endpoint a workload names, by URL or by `host[:port]`
    /// (Azure's sidecar takes bare host names).
    fn endpoint(&self, named: &str) -> Result<(&TrustEndpoint, TrustAddress), ApiError> {
        let named = named.trim_end_matches('/');
        for endpoint in &self.settings.trust {
            let Ok(address) = endpoint.address() else { continue };
            let bare = named.split_once("://").map_or(named, |(_, rest)| rest);
            if endpoint.url.trim_end_matches('/') == named || address.endpoint() == bare || address.host == bare {
                return Ok((endpoint, address));
            }
        }
        let known: Vec<&str> = self.settings.trust.iter().map(|t| t.url.as_str()).collect();
        Err(ApiError::forbidden(
            Step::Request,
            format!(
                "{named} is not a trust service of this sandbox; its initdata names {}",
                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
            ),
        ))
    }

    fn client(&self, named: &str, step: Step) -> Result<Client, ApiError> {
        let (endpoint, address) = self.endpoint(named)?;
        let local = self.forwarder.local(&address.endpoint()).ok_or_else(|| {
            ApiError::failed(step, format!("no forwarded port for {}: the launcher did not open it", endpoint.url))
        })?;
        if address.tls && endpoint.ca.is_none() {
            return Err(ApiError::failed(
                step,
                format!(
                    "{} is HTTPS but the initdata gives no CA for it, and a guest has no system roots: generate the policy with --trust-ca {}=CA.pem",
                    endpoint.url, endpoint.url
                ),
            ));
        }
        // Only the initdata's CA is trusted (for plain HTTP, none is): the
        // guest has no system roots, and must not use any the host supplies.
        let ca_pem = Some(endpoint.ca.as_deref().map_or(&b""[..], str::as_bytes));
        // A name is resolved to the forwarded port, so that TLS is still
        // checked for it; plain HTTP to an address can go to the port itself.
        let is_address = address.host.parse::<std::net::IpAddr>().is_ok();
        let result = if is_address && !address.tls {
            Client::with_options(&format!("http://{local}"), ClientOptions { ca_pem, resolve: None })
        } else {
            Client::with_options(&endpoint.url, ClientOptions { ca_pem, resolve: Some((address.host, local)) })
        };
        result.map_err(|e| ApiError::failed(step, format!("cannot set up a client for {}: {e}", endpoint.url)))
    }

    /// Evidence carrying `report_data`, and the VCEK chain when the
    /// attester has it.
    fn evidence(&self, report_data: &[u8; 64]) -> Result<(TeeKind, Vec<u8>, Option<String>), ApiError> {
        let attester = self
            .agent
            .attester()
            .ok_or_else(|| ApiError::failed(Step::Attestation, "this guest has no source of evidence"))?;
        let evidence =
            attester.evidence(report_data).map_err(|e| ApiError::failed(Step::Attestation, e.to_string()))?;
        Ok((evidence.kind, evidence.bytes, attester.vcek_chain_pem()))
    }

    /// Attests `runtime_data` (`data_type` `JSON` or `Binary`) at
    /// `maa_endpoint`; returns the token.
    fn token(&self, maa_endpoint: &str, runtime_data: &[u8], data_type: RuntimeDataType) -> Result<String, ApiError> {
        let client = self.client(maa_endpoint, Step::Token)?;
        let report_data = bound_report_data(runtime_data)?;
        let (kind, report, chain) = self.evidence(&report_data)?;
        if kind == TeeKind::Tdx {
            return Err(ApiError::failed(
                Step::Attestation,
                "TDX guests attest through the trust service's TdxVm endpoint, which the workload API does not use yet",
            ));
        }
        let body = client::snp_attest_request_with(
            &report,
            chain.as_deref().map(str::as_bytes),
            runtime_data,
            data_type,
            None,
        );
        block_on(client.attest(EvidenceKind::SevSnpVm, None, &body), Step::Token)?.map_err(|e| refusal(Step::Token, &e))
    }
}

/// REPORT_DATA for runtime data: the trust service's binding rule without
/// a nonce (its SHA-256, zero-padded).
fn bound_report_data(runtime_data: &[u8]) -> Result<[u8; 64], ApiError> {
    client::report_data_for_bytes(runtime_data, None).map_err(|e| ApiError::failed(Step::Internal, e.to_string()))
}

fn block_on<T>(future: impl std::future::Future<Output = T>, step: Step) -> Result<T, ApiError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ApiError::failed(step, format!("cannot start an HTTP client runtime: {e}")))?;
    Ok(runtime.block_on(future))
}

/// A trust-service answer as an API error: its refusals are the workload's
/// 403, anything else a 500.
fn refusal(step: Step, error: &ClientError) -> ApiError {
    match error.status() {
        Some(status) if (400..500).contains(&status) => ApiError::forbidden(step, error.to_string()),
        _ => ApiError::failed(step, error.to_string()),
    }
}

/// `name`, `name/version`, or `<vault>/keys/name[/version]`.
fn key_name(kid: &str) -> Result<(String, Option<String>), ApiError> {
    let path = kid.rsplit_once("/keys/").map_or(kid, |(_, rest)| rest).trim_matches('/');
    let mut parts = path.split('/');
    let name = parts.next().filter(|n| !n.is_empty());
    let version = parts.next().map(str::to_owned);
    match (name, parts.next()) {
        (Some(name), None) => Ok((name.to_owned(), version)),
        _ => Err(ApiError::bad_request(format!("kid {kid:?} is not NAME, NAME/VERSION or VAULT/keys/NAME[/VERSION]"))),
    }
}

impl WorkloadBackend for WorkloadService {
    fn allowed(&self, endpoint: &str) -> Result<(), String> {
        self.agent.decide_request(&Request::WorkloadApi { endpoint: endpoint.to_owned() })
    }

    fn attest_raw(&self, runtime_data: &[u8]) -> Result<Vec<u8>, ApiError> {
        Ok(self.evidence(&bound_report_data(runtime_data)?)?.1)
    }

    fn attest_maa(&self, maa_endpoint: &str, runtime_data: &[u8]) -> Result<String, ApiError> {
        self.token(maa_endpoint, runtime_data, RuntimeDataType::Binary)
    }

    fn release_key(&self, maa_endpoint: &str, akv_endpoint: &str, kid: &str) -> Result<Jwk, ApiError> {
        let released = self.release(maa_endpoint, akv_endpoint, kid)?;
        match released.kty.as_str() {
            "oct" | "oct-HSM" | "secret" => Ok(Jwk::oct(Some(&released.kid), &released.material)),
            kty => {
                // RSA and EC keys come as PKCS#8; a JWK of their private
                // members would need a parser for each, so the DER travels
                // whole under a capsa member.
                let mut json = Zeroizing::new(String::with_capacity(released.material.len() * 2 + 128));
                json.push_str(&format!(
                    r#"{{"kty":{},"kid":{},"x-capsa-pkcs8":""#,
                    Value::from(kty.trim_end_matches("-HSM")),
                    Value::from(released.kid.as_str())
                ));
                URL_SAFE_NO_PAD.encode_string(&*released.material, &mut json);
                json.push_str(r#""}"#);
                Jwk::from_json(json)
            }
        }
    }
}

impl WorkloadService {
    /// Azure's secure key release of `kid`, as the workload API does it:
    /// attest at `maa_endpoint` with a fresh wrapping key as runtime data,
    /// have the broker at `akv_endpoint` release the key to it, unwrap. The
    /// agent uses it for the keys of encrypted filesystems too.
    pub fn release(&self, maa_endpoint: &str, akv_endpoint: &str, kid: &str) -> Result<client::ReleasedKey, ApiError> {
        let (name, version) = key_name(kid)?;
        let broker = self.client(akv_endpoint, Step::ReleasePolicy)?;
        let wrapping = RuntimeKey::generate().map_err(|e| ApiError::failed(Step::Internal, e.to_string()))?;
        let runtime = wrapping.runtime_data().map_err(|e| ApiError::failed(Step::Internal, e.to_string()))?;
        let token = self.token(maa_endpoint, runtime.to_string().as_bytes(), RuntimeDataType::Json)?;
        let (response, keys) = block_on(
            async {
                let response = broker.release(&name, version.as_deref(), &token).await?;
                let keys = broker.jwks(false).await?;
                Ok::<_, ClientError>((response, keys))
            },
            Step::ReleasePolicy,
        )?
        .map_err(|e| refusal(Step::ReleasePolicy, &e))?;
        client::open_release(&response, &keys, wrapping.private())
            .map_err(|e| ApiError::failed(Step::Unwrap, e.to_string()))
    }

    /// The guest-side address that reaches `endpoint` (`host:port`), if
    /// the launcher forwards it.
    pub fn forwarded(&self, endpoint: &str) -> Option<std::net::SocketAddr> {
        self.forwarder.local(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kids_name_keys_as_azure_does() {
        assert_eq!(key_name("db-key").unwrap(), ("db-key".into(), None));
        assert_eq!(key_name("db-key/3").unwrap(), ("db-key".into(), Some("3".into())));
        assert_eq!(key_name("https://vault.example/keys/db-key/3").unwrap(), ("db-key".into(), Some("3".into())));
        assert!(key_name("").is_err());
        assert!(key_name("a/b/c").is_err());
    }

    #[test]
    fn report_data_is_the_runtime_data_digest_zero_padded() {
        let rd = bound_report_data(b"abc").unwrap();
        assert_eq!(hex::encode(&rd[..32]), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(rd[32..].iter().all(|b| *b == 0));
    }
}
