//! The HTTP server: routes, admin authentication, metrics, and the one
//! function that maps every error to a status code. Handlers only
//! translate; the decisions live in [`crate::attestation`] and
//! [`crate::broker`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use aws_lc_rs::digest::{SHA256, digest};
use axum::Json;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::attestation::{AttestError, AttestRequest, Attestation, EvidenceKind, MAX_REQUEST_BYTES};
use crate::audit::{self, Event};
use crate::broker::{Broker, BrokerError, CreateKey, KeyInfo, ReleaseResponse};
use crate::config::{Admin, Config, Role};
use crate::issuer::{IssuerError, Issuers, Which};
use crate::seal::{MasterKey, SealError};
use crate::store::{Store, StoreError, StoreOpError};
use crate::tls::{Peer, TlsError, TlsListener};
use crate::token::{self, Jwks};

/// How the server starts.
#[derive(Debug)]
pub struct ServeOptions {
    /// The data directory: the database, and the master key and local admin
    /// token files unless configured otherwise.
    pub data_dir: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Accept sim evidence (issued under `<issuer>/sim`).
    pub allow_sim: bool,
    /// Serve HTTPS with this certificate chain and private key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The configuration.
    pub config: Config,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The master key.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The signing keys.
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    /// The TLS certificate or key.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listener or a file.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttestLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

struct Metrics {
    registry: Registry,
    attestations: Family<AttestLabels, Counter>,
    releases: Family<OutcomeLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("capsa_trust");
        let attestations = Family::<AttestLabels, Counter>::default();
        let releases = Family::<OutcomeLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0])
        });
        registry.register("attestations", "Attestation requests by evidence kind and outcome", attestations.clone());
        registry.register("releases", "Key release requests by outcome", releases.clone());
        registry.register("request_seconds", "Request handling time by route", latency.clone());
        Self { registry, attestations, releases, latency }
    }

    fn observe(&self, route: &str, start: Instant) {
        self.latency.get_or_create(&RouteLabels { route: route.to_owned() }).observe(start.elapsed().as_secs_f64());
    }
}

/// Everything the handlers share.
pub struct AppState {
    store: Store,
    attestation: Attestation,
    issuers: Arc<Issuers>,
    broker: Broker,
    admins: Vec<Admin>,
    allow_sim: bool,
    metrics: Metrics,
    cpu: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("allow_sim", &self.allow_sim).finish_non_exhaustive()
    }
}

/// The name of the local admin's token file in the data directory.
pub const LOCAL_ADMIN_TOKEN_FILE: &str = "admin.token";

/// The local admin (role `admin`) whose token the server keeps in
/// `admin.token` (0600) in the data directory when the configuration names
/// no admins, so that a fresh server can be administered at once.
fn local_admin(dir: &Path) -> Result<Admin, ServeError> {
    let path = dir.join(LOCAL_ADMIN_TOKEN_FILE);
    let io = |source| ServeError::Io { what: path.display().to_string(), source };
    let token = match std::fs::read_to_string(&path) {
        Ok(text) => zeroize::Zeroizing::new(text.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut raw = [0u8; 32];
            aws_lc_rs::rand::fill(&mut raw).map_err(|_| ServeError::Seal(SealError::Random))?;
            let token = zeroize::Zeroizing::new(hex::encode(raw));
            let line = zeroize::Zeroizing::new(format!("{}\n", token.as_str()));
            crate::seal::write_private(&path, line.as_bytes()).map_err(io)?;
            token
        }
        Err(e) => return Err(io(e)),
    };
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    Ok(Admin { name: "local-admin".into(), token_sha256: hash, roles: vec![Role::Admin] })
}

/// A gate with one permit per core for the CPU-bound part of attestations
/// and releases (verifying evidence or a token, signing). Requests wait
/// for a permit in arrival order (tokio's semaphore is fair), so under load
/// they are served first come, first served, instead of whichever task the
/// scheduler happens to pick: the same throughput with a much shorter tail.
fn cpu_gate() -> Arc<tokio::sync::Semaphore> {
    Arc::new(tokio::sync::Semaphore::new(std::thread::available_parallelism().map_or(2, std::num::NonZero::get)))
}

/// Opens the store and builds the shared state (without listening).
pub async fn state(options: &ServeOptions, issuer_url: String) -> Result<Arc<AppState>, ServeError> {
    std::fs::create_dir_all(&options.data_dir)
        .map_err(|source| ServeError::Io { what: options.data_dir.display().to_string(), source })?;
    let master = MasterKey::load_or_create(&options.data_dir.join("master.key"))?;
    let store = Store::open(&options.data_dir, &master)?;
    drop(master);
    let config = Arc::new(options.config.clone());
    let issuers = Arc::new(Issuers::load(&store, issuer_url, config.token_lifetime_secs).await?);
    let mut admins = config.admins.clone();
    if admins.is_empty() {
        admins.push(local_admin(&options.data_dir)?);
    }
    let cpu = cpu_gate();
    Ok(Arc::new(AppState {
        broker: Broker::new(
            store.clone(),
            Arc::clone(&issuers),
            config.external_issuers.clone(),
            options.allow_sim,
            Arc::clone(&cpu),
        ),
        cpu,
        attestation: Attestation::new(Arc::clone(&config), options.allow_sim),
        store,
        issuers,
        admins,
        allow_sim: options.allow_sim,
        metrics: Metrics::new(),
    }))
}

/// Binds, then serves until `shutdown` completes. `ready` receives the
/// bound address (useful with port 0).
pub async fn serve(
    options: ServeOptions,
    ready: impl FnOnce(SocketAddr) + Send,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Io { what: format!("cannot listen on {}", options.listen), source })?;
    let local = listener.local_addr().map_err(|source| ServeError::Io { what: "listener".into(), source })?;
    let scheme = if options.tls.is_some() { "https" } else { "http" };
    let issuer = options.config.issuer.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    let acceptor = options.tls.as_ref().map(|(cert, key)| crate::tls::acceptor(cert, key)).transpose()?;
    let state = state(&options, issuer).await?;
    ready(local);
    let store = state.store.clone();
    let app = router(state).into_make_service_with_connect_info::<Peer>();
    let io = |source| ServeError::Io { what: "server".into(), source };
    let result = match acceptor {
        Some(acceptor) => {
            let tls = TlsListener::new(listener, acceptor).map_err(io)?;
            axum::serve(tls, app).with_graceful_shutdown(shutdown).await.map_err(io)
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(io),
    };
    store.close();
    result
}

/// The routes.
pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/nonce", get(nonce))
        .route("/attest/{kind}", post(attest))
        .route("/certs", get(certs))
        .route("/.well-known/openid-configuration", get(openid))
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/{name}", get(get_key).patch(patch_key).delete(delete_key))
        .route("/keys/{name}/rotate", post(rotate_key))
        .route("/keys/{name}/policy", axum::routing::put(put_policy))
        .route("/keys/{name}/release", post(release))
        .route("/keys/{name}/{version}/release", post(release_version))
        .route("/signing-keys/rotate", post(rotate_signing_key))
        .route("/audit", get(audit_entries))
        .route("/audit/verify", get(audit_verify));
    if state.allow_sim {
        router =
            router.route("/sim/certs", get(sim_certs)).route("/sim/.well-known/openid-configuration", get(sim_openid));
    }
    router.layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES)).with_state(state)
}

/// An error answer: `{"error": {"code", "message"}}`, as Azure's APIs shape them.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": {"code": self.code, "message": self.message}}))).into_response()
    }
}

fn api(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { status, code, message: message.into() }
}

impl From<AttestError> for ApiError {
    fn from(e: AttestError) -> Self {
        if e.is_malformed() {
            api(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())
        } else {
            api(StatusCode::FORBIDDEN, "AttestationRefused", e.to_string())
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        let (status, code) = match &e {
            BrokerError::BadRequest(_) | BrokerError::Policy(_) => (StatusCode::BAD_REQUEST, "BadParameter"),
            BrokerError::NotFound(_) => (StatusCode::NOT_FOUND, "KeyNotFound"),
            BrokerError::Exists(_) => (StatusCode::CONFLICT, "Conflict"),
            BrokerError::Immutable(_) => (StatusCode::CONFLICT, "PolicyImmutable"),
            BrokerError::Disabled(_) => (StatusCode::FORBIDDEN, "Forbidden"),
            BrokerError::Token(_) => (StatusCode::UNAUTHORIZED, "InvalidToken"),
            BrokerError::Denied { .. } => (StatusCode::FORBIDDEN, "AccessDenied"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "InternalError"),
        };
        api(status, code, e.to_string())
    }
}

impl From<IssuerError> for ApiError {
    fn from(e: IssuerError) -> Self {
        api(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string())
    }
}

impl From<StoreOpError> for ApiError {
    fn from(e: StoreOpError) -> Self {
        match e {
            StoreOpError::Rejected(r) => api(StatusCode::BAD_REQUEST, "BadRequest", r.0.to_string()),
            StoreOpError::Store(e) => api(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()),
        }
    }
}

/// The admin a request's bearer token names, if they hold `role`.
fn authorize(state: &AppState, headers: &HeaderMap, role: Role) -> Result<String, ApiError> {
    let unauthorized = || {
        api(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "this call needs an admin's bearer token (Authorization: Bearer ...)",
        )
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(unauthorized)?;
    let hash = digest(&SHA256, token.trim().as_bytes());
    // Every admin's hash is compared, in constant time, so timing says
    // nothing about which (if any) matched.
    let mut found: Option<&Admin> = None;
    for admin in &state.admins {
        if aws_lc_rs::constant_time::verify_slices_are_equal(hash.as_ref(), &admin.token_sha256).is_ok() {
            found = Some(admin);
        }
    }
    let admin = found.ok_or_else(unauthorized)?;
    if admin.roles.contains(&Role::Admin) || admin.roles.contains(&role) {
        Ok(format!("admin {}", admin.name))
    } else {
        Err(api(StatusCode::FORBIDDEN, "Forbidden", format!("admin {} lacks the role this call needs", admin.name)))
    }
}

fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| api(StatusCode::BAD_REQUEST, "BadRequest", format!("request body: {e}")))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &state.metrics.registry)
        .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text).into_response())
}

async fn nonce(State(state): State<Arc<AppState>>) -> Result<Json<Value>, ApiError> {
    let nonce = state.attestation.nonces.issue()?;
    Ok(Json(json!({"nonce": nonce, "expiresInSeconds": crate::attestation::NONCE_LIFETIME.as_secs()})))
}

#[derive(Deserialize)]
struct AttestQuery {
    policy: Option<String>,
}

async fn attest(
    State(state): State<Arc<AppState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    UrlPath(kind): UrlPath<String>,
    Query(query): Query<AttestQuery>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let start = Instant::now();
    let kind = EvidenceKind::from_path(&kind).ok_or_else(|| {
        api(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no evidence kind {kind:?} (SevSnpVm, TdxVm, SgxEnclave, AzSnpVtpm)"),
        )
    })?;
    let request: AttestRequest = json_body(&body)?;
    // Verifying and signing take about half a millisecond of CPU and
    // nothing else: done on the async worker itself, since handing each
    // request to the blocking pool cost more in thread switches (and tail
    // latency) than it saved.
    let permit = state
        .cpu
        .acquire()
        .await
        .map_err(|_| api(StatusCode::SERVICE_UNAVAILABLE, "ShuttingDown", "the server is shutting down"))?;
    let outcome = (|| {
        let attested = state.attestation.attest(kind, query.policy.as_deref(), &request)?;
        let which = if attested.sim { Which::Sim } else { Which::Production };
        let summary = audit_summary(&attested.claims);
        let token = state.issuers.issue(which, attested.claims).map_err(ApiError::from)?;
        Ok::<_, ApiError>((token, summary, attested.policy))
    })();
    drop(permit);
    let (outcome_label, detail, result) = match outcome {
        Ok((token, summary, policy)) => ("allowed", json!({"policy": policy, "claims": summary}), Ok(token)),
        Err(e) => ("denied", json!({"reason": e.message}), Err(e)),
    };
    state
        .metrics
        .attestations
        .get_or_create(&AttestLabels { kind: kind.as_str().to_owned(), outcome: outcome_label.to_owned() })
        .inc();
    state
        .store
        .write(move |ctx| {
            ctx.audit(Event {
                actor: format!("attester {}", peer.ip()),
                action: "attest",
                subject: kind.as_str().to_owned(),
                outcome: outcome_label,
                detail,
            })
        })
        .await?;
    state.metrics.observe("attest", start);
    Ok(Json(json!({"token": result?})))
}

/// What the audit log keeps of an attestation: the claims release policies
/// typically decide on, not the whole token.
fn audit_summary(claims: &serde_json::Map<String, Value>) -> Value {
    let keep = [
        "x-ms-attestation-type",
        "x-ms-sevsnpvm-launchmeasurement",
        "x-ms-sevsnpvm-hostdata",
        "x-ms-sevsnpvm-is-debuggable",
        "tdx_mrtd",
        "x-ms-sgx-mrenclave",
        "nonce",
    ];
    Value::Object(keep.iter().filter_map(|k| claims.get(*k).map(|v| ((*k).to_owned(), v.clone()))).collect())
}

async fn certs(State(state): State<Arc<AppState>>) -> Json<Jwks> {
    Json(state.issuers.jwks(Which::Production))
}

async fn sim_certs(State(state): State<Arc<AppState>>) -> Json<Jwks> {
    Json(state.issuers.jwks(Which::Sim))
}

async fn openid(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(token::openid_configuration(&state.issuers.url(Which::Production)))
}

async fn sim_openid(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(token::openid_configuration(&state.issuers.url(Which::Sim)))
}

async fn create_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<KeyInfo>), ApiError> {
    let actor = authorize(&state, &headers, Role::KeysWrite)?;
    let request: CreateKey = json_body(&body)?;
    Ok((StatusCode::CREATED, Json(state.broker.create(request, actor).await?)))
}

async fn list_keys(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::KeysRead)?;
    Ok(Json(json!({"keys": state.broker.list()?})))
}

async fn get_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    authorize(&state, &headers, Role::KeysRead)?;
    Ok(Json(state.broker.get(&name)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchKey {
    enabled: bool,
    version: Option<String>,
}

async fn patch_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<KeyInfo>, ApiError> {
    let actor = authorize(&state, &headers, Role::KeysWrite)?;
    let patch: PatchKey = json_body(&body)?;
    Ok(Json(state.broker.set_enabled(&name, patch.version, patch.enabled, actor).await?))
}

async fn delete_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let actor = authorize(&state, &headers, Role::KeysWrite)?;
    state.broker.delete(&name, actor).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    value: Option<zeroize::Zeroizing<String>>,
}

async fn rotate_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<KeyInfo>, ApiError> {
    let actor = authorize(&state, &headers, Role::KeysWrite)?;
    let request: RotateKey = if body.is_empty() { RotateKey::default() } else { json_body(&body)? };
    Ok(Json(state.broker.rotate(&name, request.value, actor).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutPolicy {
    release_policy: Value,
    immutable: Option<bool>,
}

async fn put_policy(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<KeyInfo>, ApiError> {
    let actor = authorize(&state, &headers, Role::KeysWrite)?;
    let request: PutPolicy = json_body(&body)?;
    Ok(Json(state.broker.set_policy(&name, request.release_policy, request.immutable, actor).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseRequest {
    target: String,
    #[serde(default)]
    enc: Option<String>,
    #[serde(default)]
    nonce: Option<String>,
}

async fn do_release(
    state: Arc<AppState>,
    peer: SocketAddr,
    name: String,
    version: Option<String>,
    body: axum::body::Bytes,
) -> Result<Json<ReleaseResponse>, ApiError> {
    let start = Instant::now();
    let request: ReleaseRequest = json_body(&body)?;
    if let Some(enc) = request.enc.as_deref().filter(|e| !["CKM_RSA_AES_KEY_WRAP", "RSA_AES_KEY_WRAP_256"].contains(e))
    {
        return Err(api(
            StatusCode::BAD_REQUEST,
            "BadParameter",
            format!("enc {enc:?} is not supported; use CKM_RSA_AES_KEY_WRAP"),
        ));
    }
    let result = state
        .broker
        .release(
            &name,
            version.as_deref(),
            &request.target,
            request.nonce.as_deref(),
            format!("relying party {}", peer.ip()),
        )
        .await;
    let outcome = if result.is_ok() { "allowed" } else { "denied" };
    state.metrics.releases.get_or_create(&OutcomeLabels { outcome: outcome.to_owned() }).inc();
    state.metrics.observe("release", start);
    Ok(Json(result?))
}

async fn release(
    State(state): State<Arc<AppState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    UrlPath(name): UrlPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<ReleaseResponse>, ApiError> {
    do_release(state, peer, name, None, body).await
}

async fn release_version(
    State(state): State<Arc<AppState>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    UrlPath((name, version)): UrlPath<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<ReleaseResponse>, ApiError> {
    do_release(state, peer, name, Some(version), body).await
}

#[derive(Deserialize)]
struct RotateSigningQuery {
    issuer: Option<String>,
}

async fn rotate_signing_key(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<RotateSigningQuery>,
) -> Result<Json<Value>, ApiError> {
    let actor = authorize(&state, &headers, Role::Admin)?;
    let which = match query.issuer.as_deref() {
        None | Some("production") => Which::Production,
        Some("sim") => Which::Sim,
        Some(other) => {
            return Err(api(
                StatusCode::BAD_REQUEST,
                "BadParameter",
                format!("issuer {other:?}: expected production or sim"),
            ));
        }
    };
    let kid = state.issuers.rotate(&state.store, which, actor).await?;
    Ok(Json(json!({"kid": kid, "issuer": state.issuers.url(which)})))
}

#[derive(Deserialize)]
struct AuditQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

async fn audit_entries(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::AuditRead)?;
    let entries = audit::entries(state.store.db(), query.from.unwrap_or(1), query.limit.unwrap_or(100).min(1000))
        .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()))?;
    Ok(Json(json!({"entries": entries})))
}

async fn audit_verify(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers, Role::AuditRead)?;
    let store = state.store.clone();
    let verified = tokio::task::spawn_blocking(move || audit::verify(store.db(), store.audit_key()))
        .await
        .map_err(|e| api(StatusCode::INTERNAL_SERVER_ERROR, "InternalError", e.to_string()))?;
    match verified {
        Ok(v) => Ok(Json(json!({"intact": true, "entries": v.entries, "head": v.head}))),
        Err(e) => Ok(Json(json!({"intact": false, "problem": e.to_string()}))),
    }
}

/// Verifies the audit log of a stopped server's data directory with its
/// master key. The outer error: the store could not be opened; the inner:
/// what is wrong with the log.
pub fn verify_audit_offline(data_dir: &Path) -> Result<Result<audit::Verified, audit::AuditError>, ServeError> {
    if !data_dir.join("trust.redb").exists() {
        return Err(ServeError::Io {
            what: data_dir.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no trust store here (trust.redb)"),
        });
    }
    let master = MasterKey::load(&data_dir.join("master.key"))?;
    let store = Store::open(data_dir, &master)?;
    let result = audit::verify(store.db(), store.audit_key());
    store.close();
    Ok(result)
}
