//! End-to-end acceptance tests of the trust service: a real server on
//! 127.0.0.1 per test, real sim evidence from `capsa_tee::sim`, and the
//! crate's own client, exactly as a workload, a relying party and an admin
//! would use them.

use std::net::SocketAddr;
use std::sync::OnceLock;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::PrivateDecryptingKey;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capsa_tee::sim::{ReportRequest, SimPlatform};
use capsa_trust::attestation::EvidenceKind;
use capsa_trust::broker::LEEWAY_SECS;
use capsa_trust::client::{self, Client, ClientError, ClientOptions};
use capsa_trust::config::Config;
use capsa_trust::server::{self, ServeOptions};
use capsa_trust::token::{self, SigningKey, TokenError};
use capsa_trust::wrap;
use reqwest::Method;
use serde_json::{Map, Value, json};
use tempfile::TempDir;
use tokio::sync::oneshot;

const HOST_DATA: [u8; 32] = [0x22; 32];
const OTHER_HOST_DATA: [u8; 32] = [0x33; 32];
const MEASUREMENT: [u8; 48] = [0x11; 48];

/// One sim platform for the whole file: creating one generates two RSA-4096
/// keys. Its state directory is removed once loaded (reports are signed
/// from memory).
fn sim() -> &'static SimPlatform {
    static SIM: OnceLock<SimPlatform> = OnceLock::new();
    SIM.get_or_init(|| {
        let dir = TempDir::new().unwrap();
        SimPlatform::init(&dir.path().join("sim")).unwrap()
    })
}

/// A self-signed certificate for 127.0.0.1, written as PEM files.
struct TlsFiles {
    ca_pem: Vec<u8>,
    chain: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl TlsFiles {
    fn write(dir: &std::path::Path) -> Self {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        let (chain, key) = (dir.join("tls.pem"), dir.join("tls.key"));
        std::fs::write(&chain, cert.cert.pem()).unwrap();
        std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
        Self { ca_pem: cert.cert.pem().into_bytes(), chain, key }
    }
}

/// A server on 127.0.0.1:0 with its own data directory; stops when dropped.
struct Harness {
    _dir: TempDir,
    /// The production issuer (`http://<addr>`); sim tokens are `<url>/sim`.
    url: String,
    /// No credentials: a workload or relying party.
    client: Client,
    /// The local admin (token from `admin.token`).
    admin: Client,
    _stop: oneshot::Sender<()>,
}

impl Harness {
    async fn sim() -> Self {
        Self::start(true, Config::default()).await
    }

    async fn start(allow_sim: bool, config: Config) -> Self {
        Self::start_in(TempDir::new().unwrap(), allow_sim, config).await
    }

    async fn start_in(dir: TempDir, allow_sim: bool, config: Config) -> Self {
        Self::start_with_tls(dir, allow_sim, config, None).await
    }

    /// With `tls` (the CA's PEM and the server's chain and key files), the
    /// server speaks HTTPS and the clients trust that CA alone.
    async fn start_with_tls(dir: TempDir, allow_sim: bool, config: Config, tls: Option<TlsFiles>) -> Self {
        let options = ServeOptions {
            data_dir: dir.path().join("data"),
            listen: "127.0.0.1:0".parse().unwrap(),
            allow_sim,
            tls: tls.as_ref().map(|t| (t.chain.clone(), t.key.clone())),
            config,
        };
        let (ready_tx, ready_rx) = oneshot::channel::<SocketAddr>();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::serve(
            options,
            move |addr| {
                let _ = ready_tx.send(addr);
            },
            async move {
                let _ = stopped.await;
            },
        ));
        let addr = match ready_rx.await {
            Ok(addr) => addr,
            Err(_) => panic!("the server did not start: {:?}", task.await),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{addr}");
        let token = std::fs::read_to_string(dir.path().join("data").join(server::LOCAL_ADMIN_TOKEN_FILE)).unwrap();
        let client = || match &tls {
            Some(t) => Client::with_ca(&url, &t.ca_pem).unwrap(),
            None => Client::new(&url).unwrap(),
        };
        Self { client: client(), admin: client().with_admin_token(token.trim()), url, _dir: dir, _stop: stop }
    }

    /// The address the server listens on.
    fn addr(&self) -> SocketAddr {
        self.url.split_once("://").unwrap().1.parse().unwrap()
    }

    fn sim_issuer(&self) -> String {
        format!("{}/sim", self.url)
    }

    /// Attests `guest` with sim evidence for `host_data`; the token.
    async fn token(&self, guest: &Guest, host_data: [u8; 32]) -> String {
        self.client.attest(EvidenceKind::SevSnpVm, None, &guest.request(host_data, false, None)).await.unwrap()
    }

    /// Creates key `name` of `kind` (e.g. `{"kty": "oct", "bits": 256}`)
    /// from `value` under `policy`.
    async fn import(&self, name: &str, kind: Value, value: &[u8], policy: Value) {
        let mut request = kind;
        let fields = request.as_object_mut().unwrap();
        fields.insert("name".into(), json!(name));
        fields.insert("value".into(), json!(URL_SAFE_NO_PAD.encode(value)));
        fields.insert("release_policy".into(), policy);
        self.admin.create_key(&request).await.unwrap();
    }

    async fn audit(&self) -> Vec<Value> {
        let answer = self.admin.admin(Method::GET, "/audit", None).await.unwrap();
        answer["entries"].as_array().unwrap().clone()
    }
}

/// A workload: its RSA wrapping key and the runtime data binding it.
struct Guest {
    key: PrivateDecryptingKey,
    runtime: Value,
}

impl Guest {
    fn new() -> Self {
        let key = wrap::generate_rsa_wrapping_key(2048).unwrap();
        let runtime = client::runtime_data_for(&key).unwrap();
        Self { key, runtime }
    }

    /// An SevSnpVm attest request: a sim report binding this guest's runtime
    /// data (and `nonce`), with `host_data` and the debug bit.
    fn request(&self, host_data: [u8; 32], debug: bool, nonce: Option<&str>) -> Value {
        let report_data = client::report_data_for(&self.runtime, nonce).unwrap();
        self.request_with(host_data, debug, report_data, nonce)
    }

    /// As [`Guest::request`], with REPORT_DATA as given.
    fn request_with(&self, host_data: [u8; 32], debug: bool, report_data: [u8; 64], nonce: Option<&str>) -> Value {
        let report = sim()
            .report(&ReportRequest { measurement: MEASUREMENT, host_data, report_data, policy_debug: debug, vmpl: 0 })
            .unwrap();
        let chain = sim().vcek_pem() + &sim().chain_pem();
        client::snp_attest_request(&report, chain.as_bytes(), &self.runtime, nonce)
    }
}

/// A release policy for sim tokens from `authority` with `host_data`, not debuggable.
fn policy(authority: &str, host_data: [u8; 32]) -> Value {
    json!({
        "version": "1.0.0",
        "anyOf": [{
            "authority": authority,
            "allOf": [
                {"claim": "x-ms-attestation-type", "equals": "sim"},
                {"claim": "x-ms-sevsnpvm-hostdata", "equals": hex::encode(host_data)},
                {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": false},
            ],
        }],
    })
}

fn oct() -> Value {
    json!({"kty": "oct", "bits": 256})
}

/// Asserts a refusal with `status` and `code` whose message contains every
/// one of `mentions`; returns the message.
#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, ClientError>, status: u16, code: &str, mentions: &[&str]) -> String {
    match result {
        Err(ClientError::Refused { status: s, code: c, message }) => {
            assert_eq!((s, c.as_str()), (status, code), "{message}");
            for m in mentions {
                assert!(message.contains(m), "{message:?} does not mention {m:?}");
            }
            message
        }
        other => panic!("expected {status} {code}, got {other:?}"),
    }
}

/// A compact JWS's payload as JSON.
fn payload(jws: &str) -> Map<String, Value> {
    let part = jws.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn header(jws: &str) -> Map<String, Value> {
    let part = jws.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_evidence_releases_imported_keys_of_every_kind() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    let token = h.token(&guest, HOST_DATA).await;
    assert_eq!(payload(&token)["iss"], json!(h.sim_issuer()));

    let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let rsa = rsa.as_der().unwrap().as_ref().to_vec();
    let ec =
        aws_lc_rs::signature::EcdsaKeyPair::generate(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let ec = ec.to_pkcs8v1().unwrap().as_ref().to_vec();
    let keys: [(&str, Value, Vec<u8>, &str); 4] = [
        ("aes", oct(), (0u8..32).collect(), "oct-HSM"),
        ("rsa", json!({"kty": "RSA", "bits": 2048}), rsa, "RSA-HSM"),
        ("ec", json!({"kty": "EC", "crv": "P-256"}), ec, "EC-HSM"),
        ("password", json!({"kty": "secret"}), b"correct horse battery staple".to_vec(), "secret"),
    ];
    let production = h.client.jwks(false).await.unwrap();
    let sim_keys = h.client.jwks(true).await.unwrap();
    for (name, kind, material, kty) in keys {
        h.import(name, kind, &material, policy(&h.sim_issuer(), HOST_DATA)).await;
        let answer = h.client.release(name, None, &token).await.unwrap();
        // The answer is signed by the production issuer, never the sim one.
        token::verify_signed_payload(&answer.value, &production).unwrap();
        assert!(token::verify_signed_payload(&answer.value, &sim_keys).is_err());
        let released = client::open_release(&answer, &production, &guest.key).unwrap();
        assert_eq!(released.material.as_slice(), material.as_slice(), "{name}");
        assert_eq!(released.kty, kty);
        assert!(released.kid.starts_with(&format!("{}/keys/{name}/", h.url)), "{}", released.kid);
        // Another workload's key cannot open it.
        assert!(client::open_release(&answer, &production, &Guest::new().key).is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_data_other_than_the_policys_is_denied_naming_the_clause() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    let token = h.token(&guest, OTHER_HOST_DATA).await;
    h.import("k", oct(), &[7; 32], policy(&h.sim_issuer(), HOST_DATA)).await;
    refused(
        h.client.release("k", None, &token).await,
        403,
        "AccessDenied",
        &["anyOf[0].allOf[1]", "x-ms-sevsnpvm-hostdata", &hex::encode(HOST_DATA), &hex::encode(OTHER_HOST_DATA)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_guests_are_refused_attestation_by_default() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    refused(
        h.client.attest(EvidenceKind::SevSnpVm, None, &guest.request(HOST_DATA, true, None)).await,
        403,
        "AttestationRefused",
        &["debug"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refused() {
    // Through the library: a real token, checked just inside and just past
    // its expiry plus the broker's leeway.
    let h = Harness::sim().await;
    let token = h.token(&Guest::new(), HOST_DATA).await;
    let exp = payload(&token)["exp"].as_i64().unwrap();
    let keys = h.client.jwks(true).await.unwrap();
    token::verify(&token, &keys, exp + LEEWAY_SECS - 1, LEEWAY_SECS).unwrap();
    assert!(matches!(token::verify(&token, &keys, exp + LEEWAY_SECS, LEEWAY_SECS), Err(TokenError::Expired { .. })));

    // Through the server: the validated `Config` (not the file, which only
    // accepts 10 s to a day) can make the server issue tokens already past
    // `exp` + leeway, which its own release path must then refuse.
    let config = Config { token_lifetime_secs: -(LEEWAY_SECS + 60), ..Config::default() };
    let h = Harness::start(true, config).await;
    let guest = Guest::new();
    let token = h.token(&guest, HOST_DATA).await;
    h.import("k", oct(), &[7; 32], policy(&h.sim_issuer(), HOST_DATA)).await;
    refused(h.client.release("k", None, &token).await, 401, "InvalidToken", &["expired"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_signed_by_an_unknown_key_is_refused() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    let real = h.token(&guest, HOST_DATA).await;
    h.import("k", oct(), &[7; 32], policy(&h.url, HOST_DATA)).await;
    // The real token's claims, claiming the production issuer, signed by a key of our own.
    let mut claims = payload(&real);
    claims.insert("iss".into(), json!(h.url));
    claims.insert("x-ms-attestation-type".into(), json!("sevsnpvm"));
    let forged = token::sign(&SigningKey::generate(0).unwrap(), &claims).unwrap();
    refused(h.client.release("k", None, &forged).await, 401, "InvalidToken", &["no key with kid"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_an_edited_payload_is_refused() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    let real = h.token(&guest, OTHER_HOST_DATA).await;
    h.import("k", oct(), &[7; 32], policy(&h.sim_issuer(), HOST_DATA)).await;
    let mut claims = payload(&real);
    claims.insert("x-ms-sevsnpvm-hostdata".into(), json!(hex::encode(HOST_DATA)));
    let mut parts: Vec<String> = real.split('.').map(str::to_owned).collect();
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    refused(h.client.release("k", None, &parts.join(".")).await, 401, "InvalidToken", &["signature"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sim_token_never_satisfies_the_production_authority() {
    let h = Harness::sim().await;
    let token = h.token(&Guest::new(), HOST_DATA).await;
    h.import("k", oct(), &[7; 32], policy(&h.url, HOST_DATA)).await;
    let issuer = format!("token issuer \"{}\" does not match", h.sim_issuer());
    refused(h.client.release("k", None, &token).await, 403, "AccessDenied", &[&issuer]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_data_not_bound_to_report_data_is_refused() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    // The report binds another workload's key; the request sends ours.
    let stolen = client::report_data_for(&Guest::new().runtime, None).unwrap();
    refused(
        h.client.attest(EvidenceKind::SevSnpVm, None, &guest.request_with(HOST_DATA, false, stolen, None)).await,
        403,
        "AttestationRefused",
        &["REPORT_DATA", "runtime data"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_policy_accepts_each_server_nonce_once() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("trust.toml");
    std::fs::write(&path, "[attestation_policy.fresh]\nrequire_nonce = true\n").unwrap();
    let h = Harness::start_in(dir, true, Config::load(&path).unwrap()).await;
    let guest = Guest::new();
    let nonce = h.client.nonce().await.unwrap();
    let request = guest.request(HOST_DATA, false, Some(&nonce));
    let token = h.client.attest(EvidenceKind::SevSnpVm, Some("fresh"), &request).await.unwrap();
    assert_eq!(payload(&token)["nonce"], json!(nonce));

    let reuse = h.client.attest(EvidenceKind::SevSnpVm, Some("fresh"), &request).await;
    refused(reuse, 403, "AttestationRefused", &["fresh", "already used"]);
    let made_up = URL_SAFE_NO_PAD.encode([9u8; 32]);
    let request = guest.request(HOST_DATA, false, Some(&made_up));
    refused(
        h.client.attest(EvidenceKind::SevSnpVm, Some("fresh"), &request).await,
        403,
        "AttestationRefused",
        &["not issued by this server"],
    );
    let request = guest.request(HOST_DATA, false, None);
    refused(
        h.client.attest(EvidenceKind::SevSnpVm, Some("fresh"), &request).await,
        403,
        "AttestationRefused",
        &["no nonce"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_an_admins_token() {
    let h = Harness::sim().await;
    h.import("k", oct(), &[7; 32], policy(&h.sim_issuer(), HOST_DATA)).await;
    let wrong = Client::new(&h.url).unwrap().with_admin_token("0".repeat(64));
    for client in [&h.client, &wrong] {
        let create = json!({"name": "x", "kty": "oct", "bits": 256, "release_policy": policy(&h.url, HOST_DATA)});
        refused(client.create_key(&create).await, 401, "Unauthorized", &["bearer token"]);
        refused(client.list_keys().await, 401, "Unauthorized", &["bearer token"]);
        refused(client.admin(Method::DELETE, "/keys/k", None).await, 401, "Unauthorized", &["bearer token"]);
    }
    let names: Vec<String> = h.admin.list_keys().await.unwrap().into_iter().map(|k| k.name).collect();
    assert_eq!(names, ["k"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_release_policy_is_refused_naming_its_path() {
    let h = Harness::sim().await;
    let mut bad = policy(&h.sim_issuer(), HOST_DATA);
    bad["anyOf"][0]["allOf"][2] = json!({"claim": "x-ms-sevsnpvm-is-debuggable", "equal": false});
    let create = json!({"name": "k", "kty": "oct", "bits": 256, "release_policy": bad});
    refused(h.admin.create_key(&create).await, 400, "BadParameter", &["anyOf[0].allOf[2]", "\"equal\""]);
    assert!(h.admin.list_keys().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immutable_policy_cannot_be_changed() {
    let h = Harness::sim().await;
    let create = json!({
        "name": "k", "kty": "oct", "bits": 256, "immutable": true,
        "release_policy": policy(&h.sim_issuer(), HOST_DATA),
    });
    let created = h.admin.create_key(&create).await.unwrap();
    refused(
        h.admin.set_policy("k", &policy(&h.sim_issuer(), OTHER_HOST_DATA)).await,
        409,
        "PolicyImmutable",
        &["immutable"],
    );
    let key = h.admin.admin(Method::GET, "/keys/k", None).await.unwrap();
    assert_eq!(key["release_policy"], created.release_policy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_allow_sim_sim_evidence_and_sim_keys_are_refused() {
    let h = Harness::start(false, Config::default()).await;
    let request = Guest::new().request(HOST_DATA, false, None);
    refused(
        h.client.attest(EvidenceKind::SevSnpVm, None, &request).await,
        403,
        "AttestationRefused",
        &["sim", "--allow-sim"],
    );
    assert_eq!(h.client.jwks(true).await.unwrap_err().status(), Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_records_attestations_releases_and_denials() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    let token = h.token(&guest, HOST_DATA).await;
    let material = [0x5a; 32];
    h.import("granted", oct(), &material, policy(&h.sim_issuer(), HOST_DATA)).await;
    h.import("withheld", oct(), &material, policy(&h.sim_issuer(), OTHER_HOST_DATA)).await;
    h.client.release("granted", None, &token).await.unwrap();
    refused(h.client.release("withheld", None, &token).await, 403, "AccessDenied", &[]);

    let entries = h.audit().await;
    let find = |action: &str, subject: &str, outcome: &str| {
        entries
            .iter()
            .find(|e| e["action"] == action && e["subject"] == subject && e["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {action} {subject} {outcome} in {entries:#?}"))
    };
    let attest = find("attest", "SevSnpVm", "allowed");
    assert_eq!(attest["detail"]["claims"]["x-ms-sevsnpvm-hostdata"], json!(hex::encode(HOST_DATA)));
    let release = find("release", "granted", "allowed");
    assert_eq!(release["detail"]["issuer"], json!(h.sim_issuer()));
    let denial = find("release", "withheld", "denied");
    assert!(denial["detail"]["reason"].as_str().unwrap().contains("x-ms-sevsnpvm-hostdata"), "{denial}");
    // Neither the material nor the token is ever logged.
    let log = serde_json::to_string(&entries).unwrap();
    assert!(!log.contains(&URL_SAFE_NO_PAD.encode(material)) && !log.contains(&token));

    let verdict = h.admin.admin(Method::GET, "/audit/verify", None).await.unwrap();
    assert_eq!(verdict["intact"], json!(true), "{verdict}");
    assert_eq!(verdict["entries"], json!(entries.len()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_issued_before_a_signing_key_rotation_still_release() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    let before = h.token(&guest, HOST_DATA).await;
    let material = [0x42; 32];
    h.import("k", oct(), &material, policy(&h.sim_issuer(), HOST_DATA)).await;

    for path in ["/signing-keys/rotate?issuer=sim", "/signing-keys/rotate"] {
        let rotated = h.admin.admin(Method::POST, path, None).await.unwrap();
        assert!(rotated["kid"].is_string(), "{rotated}");
    }
    let sim_keys = h.client.jwks(true).await.unwrap();
    let production = h.client.jwks(false).await.unwrap();
    assert_eq!((sim_keys.keys.len(), production.keys.len()), (2, 2));
    let old_kid = header(&before)["kid"].as_str().unwrap().to_owned();
    assert!(sim_keys.keys.iter().any(|k| k.kid.as_deref() == Some(old_kid.as_str())));

    let answer = h.client.release("k", None, &before).await.unwrap();
    assert_eq!(client::open_release(&answer, &production, &guest.key).unwrap().material.as_slice(), material);
    // The answer is signed by the new production key, the new token by the new sim key.
    assert_eq!(header(&answer.value)["kid"], json!(production.keys[0].kid));
    let after = h.token(&guest, HOST_DATA).await;
    assert_eq!(header(&after)["kid"], json!(sim_keys.keys[0].kid));
    assert_ne!(header(&after)["kid"], json!(old_kid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_the_whole_release_works_and_plain_http_is_not_answered() {
    let dir = TempDir::new().unwrap();
    let tls = TlsFiles::write(dir.path());
    let h = Harness::start_with_tls(dir, true, Config::default(), Some(tls)).await;
    assert!(h.url.starts_with("https://"), "{}", h.url);
    let guest = Guest::new();
    let host_data = [7u8; 32];
    let key = [0x5a_u8; 32];
    h.import("tls-key", oct(), &key, policy(&h.sim_issuer(), host_data)).await;
    let token = h.token(&guest, host_data).await;
    let released = h.client.release("tls-key", None, &token).await.unwrap();
    let opened = client::open_release(&released, &h.client.jwks(false).await.unwrap(), &guest.key).unwrap();
    assert_eq!(opened.material.as_slice(), key);
    let plain = Client::new(&h.url.replace("https://", "http://")).unwrap();
    assert!(plain.nonce().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_port_reaches_the_service_under_its_own_name() {
    // As a guest does through a port forwarded to its loopback: the URL keeps
    // the service's name and port, the connection goes to the forward.
    let h = Harness::sim().await;
    let via = |host: &str| ClientOptions { ca_pem: None, resolve: Some((host.to_owned(), h.addr())) };
    let forwarded = Client::with_options("http://trust.invalid:1", via("trust.invalid")).unwrap();
    assert!(!forwarded.nonce().await.unwrap().is_empty());
    // An override for a name the URL does not use would silently do nothing.
    let err = Client::with_options("http://trust.invalid:1", via("other.invalid")).unwrap_err();
    assert!(err.to_string().contains("resolve names other.invalid, but the URL's host is trust.invalid"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_forwarded_port_tls_is_verified_for_the_services_name() {
    let dir = TempDir::new().unwrap();
    let tls = TlsFiles::write(dir.path());
    let ca_pem = tls.ca_pem.clone();
    let h = Harness::start_with_tls(dir, true, Config::default(), Some(tls)).await;
    let via = |host: &str| ClientOptions { ca_pem: Some(&ca_pem), resolve: Some((host.to_owned(), h.addr())) };
    // The certificate names localhost: reached under that name, it verifies.
    let named = Client::with_options("https://localhost:1", via("localhost")).unwrap();
    assert!(!named.nonce().await.unwrap().is_empty());
    // The same connection under a name the certificate lacks is refused, and
    // the error says where it really went.
    let unnamed = Client::with_options("https://trust.invalid:1", via("trust.invalid")).unwrap();
    let err = unnamed.nonce().await.unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains(&format!("connecting to {}", h.addr())), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_external_issuer_can_authorize_a_release() {
    // Another attestation service (say, Azure's) whose keys are pinned in
    // a JWKS file: its tokens release keys whose policy names it, and only
    // those.
    let dir = TempDir::new().unwrap();
    let external = SigningKey::generate(0).unwrap();
    let jwks = dir.path().join("external-jwks.json");
    std::fs::write(&jwks, serde_json::to_vec(&json!({"keys": [external.public_jwk()]})).unwrap()).unwrap();
    let config_file = dir.path().join("trust.toml");
    let issuer = "https://attest.example.net";
    std::fs::write(
        &config_file,
        format!("[[external_issuer]]\nissuer = \"{issuer}\"\njwks_file = \"{}\"\n", jwks.display()),
    )
    .unwrap();
    let config = Config::load(&config_file).unwrap();
    let h = Harness::start_in(dir, true, config).await;

    let guest = Guest::new();
    let mut claims = token::standard_claims(issuer, now(), 300).unwrap();
    claims.insert("x-ms-attestation-type".into(), json!("sevsnpvm"));
    claims.insert("x-ms-sevsnpvm-hostdata".into(), json!(hex::encode(HOST_DATA)));
    claims.insert("x-ms-sevsnpvm-is-debuggable".into(), json!(false));
    claims.insert("x-ms-runtime".into(), guest.runtime.clone());
    let foreign = token::sign(&external, &claims).unwrap();

    let mut by_external = policy(issuer, HOST_DATA);
    by_external["anyOf"][0]["allOf"][0] = json!({"claim": "x-ms-attestation-type", "equals": "sevsnpvm"});
    h.import("external", oct(), &[3; 32], by_external).await;
    h.import("local", oct(), &[4; 32], policy(&h.url, HOST_DATA)).await;
    let released = h.client.release("external", None, &foreign).await.unwrap();
    let opened = client::open_release(&released, &h.client.jwks(false).await.unwrap(), &guest.key).unwrap();
    assert_eq!(opened.material.as_slice(), [3; 32]);
    refused(h.client.release("local", None, &foreign).await, 403, "AccessDenied", &[issuer]);
    // An issuer that is not configured is not trusted at all.
    claims.insert("iss".into(), json!("https://elsewhere.example.net"));
    let stranger = token::sign(&external, &claims).unwrap();
    refused(h.client.release("external", None, &stranger).await, 401, "InvalidToken", &["not one this server trusts"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_and_count() {
    let h = Harness::sim().await;
    let guest = Guest::new();
    h.token(&guest, HOST_DATA).await;
    let http = reqwest::Client::new();
    let health: Value = http.get(format!("{}/health", h.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(health, json!({"status": "ok"}));
    let metrics = http.get(format!("{}/metrics", h.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"capsa_trust_attestations_total{kind="SevSnpVm",outcome="allowed"} 1"#), "{metrics}");
    assert!(metrics.contains("capsa_trust_request_seconds"), "{metrics}");
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}
