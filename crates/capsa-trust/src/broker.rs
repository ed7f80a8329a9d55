//! The key broker: keys and secrets, each with an Azure Key Vault release
//! policy, and their release wrapped to a key that only the attested
//! workload holds.
//!
//! A release takes a token (from this server, or from a configured
//! external issuer), checks its signature against that issuer's keys and
//! its time claims, evaluates the key's release policy over its claims,
//! and answers with the key material wrapped (`RSA_AES_KEY_WRAP_256`) to
//! the RSA key in the token's `x-ms-runtime.keys`, inside a response signed
//! by this server: the layout Azure Key Vault's release answers have. The
//! material is never returned any other way, and is sealed at rest.
//!
//! Every release, denial and key change is in the audit log, committed
//! before the answer: no audit entry, no key.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use crate::audit::Event;
use crate::config::ExternalIssuer;
use crate::issuer::{Issuers, Which};
use crate::release_policy::{ReleasePolicy, ReleasePolicyError};
use crate::store::{self, Ctx, KEYS, Rejected, Store, StoreError, StoreOpError, WriteError};
use crate::token::{self, Jwks, TokenError};
use crate::wrap;

// Defined in `api` so that the client builds without the server; re-exported
// so that this path keeps working.
pub use crate::api::{Curve, KeyInfo, KeyKind, ReleaseResponse, VersionInfo};

/// The largest secret accepted, in bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;
/// The largest release policy accepted, in bytes.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// Clock skew allowed on token time claims, in seconds.
pub const LEEWAY_SECS: i64 = 60;

impl KeyKind {
    fn azure_kty(self) -> &'static str {
        match self {
            Self::Oct { .. } => "oct-HSM",
            Self::Rsa { .. } => "RSA-HSM",
            Self::Ec { .. } => "EC-HSM",
            Self::Secret => "secret",
        }
    }
}

/// A request to create (generate or import) a key. Debug leaves out the
/// imported material.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// The key's name: 1-127 of `A-Z a-z 0-9 -`.
    pub name: String,
    /// `oct`, `RSA`, `EC` or `secret`.
    pub kty: String,
    /// Bits of an `oct` (128, 192, 256; default 256) or `RSA` key (2048,
    /// 3072, 4096; default 2048).
    pub bits: Option<u16>,
    /// The curve of an `EC` key (default P-256).
    pub crv: Option<Curve>,
    /// The release policy (Azure Key Vault grammar).
    pub release_policy: Value,
    /// Whether the policy can never be changed.
    #[serde(default)]
    pub immutable: bool,
    /// base64url material to import: raw bytes for `oct` and `secret`,
    /// PKCS#8 DER for `RSA` and `EC`. Generated when absent.
    pub value: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for CreateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateKey")
            .field("name", &self.name)
            .field("kty", &self.kty)
            .field("bits", &self.bits)
            .field("crv", &self.crv)
            .field("immutable", &self.immutable)
            .field("imported", &self.value.is_some())
            .finish_non_exhaustive()
    }
}

impl CreateKey {
    /// The kind the fields describe, or what is wrong with them.
    pub fn kind(&self) -> Result<KeyKind, BrokerError> {
        let unexpected = |field: &str| bad(format!("{field} does not apply to kty {}", self.kty));
        Ok(match self.kty.as_str() {
            "oct" if self.crv.is_some() => return Err(unexpected("crv")),
            "oct" => KeyKind::Oct { bits: self.bits.unwrap_or(256) },
            "RSA" if self.crv.is_some() => return Err(unexpected("crv")),
            "RSA" => KeyKind::Rsa { bits: self.bits.unwrap_or(2048) },
            "EC" if self.bits.is_some() => return Err(unexpected("bits")),
            "EC" => KeyKind::Ec { crv: self.crv.unwrap_or(Curve::P256) },
            "secret" if self.bits.is_some() || self.crv.is_some() => return Err(unexpected("bits and crv")),
            "secret" => KeyKind::Secret,
            other => return Err(bad(format!("kty {other:?}: expected oct, RSA, EC or secret"))),
        })
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    name: String,
    kind: KeyKind,
    created: i64,
    updated: i64,
    enabled: bool,
    immutable: bool,
    release_policy: Value,
    versions: Vec<VersionRecord>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionRecord {
    id: String,
    created: i64,
    enabled: bool,
    /// base64url of the material; the record is sealed as a whole.
    material: Zeroizing<String>,
}

/// Why a key operation or release failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The request is not acceptable.
    #[error("{0}")]
    BadRequest(String),
    /// The release policy is invalid.
    #[error("invalid release policy: {0}")]
    Policy(#[from] ReleasePolicyError),
    /// No such key or version.
    #[error("{0}")]
    NotFound(String),
    /// The key exists already.
    #[error("a key named {0:?} exists already; rotate it to add a version")]
    Exists(String),
    /// The policy is immutable.
    #[error("the release policy of {0:?} is immutable and cannot be changed")]
    Immutable(String),
    /// The key or version is disabled.
    #[error("{0} is disabled")]
    Disabled(String),
    /// The token was not accepted.
    #[error("token refused: {0}")]
    Token(String),
    /// The release policy did not allow the release.
    #[error("release policy of {key:?} denied the release: {reason}")]
    Denied {
        /// The key.
        key: String,
        /// Which clause failed, per authority.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sealed record did not open.
    #[error(transparent)]
    Seal(#[from] crate::seal::SealError),
    /// Cryptography failed.
    #[error("{0}")]
    Crypto(String),
}

impl From<StoreOpError> for BrokerError {
    fn from(e: StoreOpError) -> Self {
        match e {
            StoreOpError::Store(e) => Self::Store(e),
            StoreOpError::Rejected(r) => match r.0.downcast::<BrokerError>() {
                Ok(b) => *b,
                Err(other) => Self::BadRequest(other.to_string()),
            },
        }
    }
}

fn reject(e: BrokerError) -> WriteError {
    WriteError::Rejected(Rejected(Box::new(e)))
}

fn bad(message: impl Into<String>) -> BrokerError {
    BrokerError::BadRequest(message.into())
}

/// The key broker.
#[derive(Debug)]
pub struct Broker {
    store: Store,
    issuers: Arc<Issuers>,
    external: Vec<ExternalIssuer>,
    allow_sim: bool,
    cpu: Arc<tokio::sync::Semaphore>,
}

fn valid_name(name: &str) -> bool {
    (1..=127).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn new_version_id() -> Result<String, BrokerError> {
    let mut id = [0u8; 16];
    SystemRandom::new().fill(&mut id).map_err(|_| BrokerError::Crypto("no randomness".into()))?;
    Ok(hex::encode(id))
}

/// Generates or validates material for `kind`.
fn material(kind: KeyKind, value: Option<&str>) -> Result<Zeroizing<Vec<u8>>, BrokerError> {
    if let Some(value) = value {
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD.decode(value.trim_end_matches('=')).map_err(|_| bad("value must be base64url"))?,
        );
        match kind {
            KeyKind::Oct { bits } if ![128, 192, 256].contains(&bits) => {
                return Err(bad(format!("oct keys have 128, 192 or 256 bits, not {bits}")));
            }
            KeyKind::Oct { bits } if bytes.len() * 8 != usize::from(bits) => {
                return Err(bad(format!("an oct key of {bits} bits needs {} bytes, got {}", bits / 8, bytes.len())));
            }
            KeyKind::Secret if bytes.is_empty() || bytes.len() > MAX_SECRET_BYTES => {
                return Err(bad(format!("a secret must be 1 to {MAX_SECRET_BYTES} bytes")));
            }
            KeyKind::Rsa { bits } => {
                let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(&bytes)
                    .map_err(|_| bad("value must be an RSA private key, PKCS#8 DER"))?;
                if pair.public_modulus_len() * 8 != usize::from(bits) {
                    return Err(bad(format!("the RSA key has {} bits, not {bits}", pair.public_modulus_len() * 8)));
                }
            }
            KeyKind::Ec { crv } => {
                aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(ec_alg(crv), &bytes)
                    .map_err(|_| bad(format!("value must be a {} private key, PKCS#8 DER", curve_name(crv))))?;
            }
            _ => {}
        }
        return Ok(bytes);
    }
    let crypto = |what: &str| BrokerError::Crypto(format!("cannot generate {what}"));
    let random = |len: usize| {
        let mut out = Zeroizing::new(vec![0u8; len]);
        SystemRandom::new().fill(&mut out).map_err(|_| crypto("random bytes"))?;
        Ok::<_, BrokerError>(out)
    };
    Ok(match kind {
        KeyKind::Oct { bits } if [128, 192, 256].contains(&bits) => random(usize::from(bits / 8))?,
        KeyKind::Oct { bits } => return Err(bad(format!("oct keys have 128, 192 or 256 bits, not {bits}"))),
        KeyKind::Secret => random(32)?,
        KeyKind::Rsa { bits } => {
            let size = match bits {
                2048 => aws_lc_rs::rsa::KeySize::Rsa2048,
                3072 => aws_lc_rs::rsa::KeySize::Rsa3072,
                4096 => aws_lc_rs::rsa::KeySize::Rsa4096,
                _ => return Err(bad(format!("RSA keys have 2048, 3072 or 4096 bits, not {bits}"))),
            };
            let pair = aws_lc_rs::rsa::KeyPair::generate(size).map_err(|_| crypto("an RSA key"))?;
            Zeroizing::new(pair.as_der().map_err(|_| crypto("an RSA key"))?.as_ref().to_vec())
        }
        KeyKind::Ec { crv } => {
            let pair = aws_lc_rs::signature::EcdsaKeyPair::generate(ec_alg(crv)).map_err(|_| crypto("an EC key"))?;
            Zeroizing::new(pair.to_pkcs8v1().map_err(|_| crypto("an EC key"))?.as_ref().to_vec())
        }
    })
}

fn ec_alg(crv: Curve) -> &'static aws_lc_rs::signature::EcdsaSigningAlgorithm {
    match crv {
        Curve::P256 => &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        Curve::P384 => &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
    }
}

fn curve_name(crv: Curve) -> &'static str {
    match crv {
        Curve::P256 => "P-256",
        Curve::P384 => "P-384",
    }
}

/// The public half of RSA and EC material, as JWK fields.
fn public_jwk(kind: KeyKind, material: &[u8]) -> Option<Map<String, Value>> {
    match kind {
        KeyKind::Rsa { .. } => {
            let pair = aws_lc_rs::rsa::KeyPair::from_pkcs8(material).ok()?;
            let public = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
            let mut m = Map::new();
            m.insert("n".into(), Value::String(URL_SAFE_NO_PAD.encode(&public.n)));
            m.insert("e".into(), Value::String(URL_SAFE_NO_PAD.encode(&public.e)));
            Some(m)
        }
        KeyKind::Ec { crv } => {
            let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(ec_alg(crv), material).ok()?;
            let point = pair.public_key().as_ref();
            let coord = (point.len().checked_sub(1)?) / 2;
            let (x, y) = point.get(1..)?.split_at(coord);
            let mut m = Map::new();
            m.insert("crv".into(), Value::String(curve_name(crv).into()));
            m.insert("x".into(), Value::String(URL_SAFE_NO_PAD.encode(x)));
            m.insert("y".into(), Value::String(URL_SAFE_NO_PAD.encode(y)));
            Some(m)
        }
        _ => None,
    }
}

fn info(record: &KeyRecord) -> KeyInfo {
    KeyInfo {
        name: record.name.clone(),
        kind: record.kind,
        created: record.created,
        updated: record.updated,
        enabled: record.enabled,
        immutable: record.immutable,
        release_policy: record.release_policy.clone(),
        versions: record
            .versions
            .iter()
            .map(|v| VersionInfo {
                id: v.id.clone(),
                created: v.created,
                enabled: v.enabled,
                public_jwk: URL_SAFE_NO_PAD
                    .decode(v.material.as_bytes())
                    .ok()
                    .map(Zeroizing::new)
                    .and_then(|m| public_jwk(record.kind, &m))
                    .map(Value::Object),
            })
            .collect(),
    }
}

fn parse_policy(policy: &Value) -> Result<ReleasePolicy, BrokerError> {
    let bytes = serde_json::to_vec(policy).map_err(|e| bad(e.to_string()))?;
    if bytes.len() > MAX_POLICY_BYTES {
        return Err(bad(format!("the release policy is {} bytes; at most {MAX_POLICY_BYTES}", bytes.len())));
    }
    Ok(ReleasePolicy::parse(&bytes)?)
}

fn read_record(
    ctx_txn: &redb::WriteTransaction,
    sealer: &crate::seal::Sealer,
    name: &str,
) -> Result<Option<KeyRecord>, WriteError> {
    let table = ctx_txn.open_table(KEYS).map_err(store::storage)?;
    let Some(sealed) = table.get(name).map_err(store::storage)? else { return Ok(None) };
    Ok(Some(open_record(sealer, name, sealed.value())?))
}

/// A record as stored: sealed for the slot `keys/<name>`.
fn open_record(sealer: &crate::seal::Sealer, name: &str, sealed: &[u8]) -> Result<KeyRecord, StoreError> {
    let plain = sealer.open("key record", &format!("keys/{name}"), sealed)?;
    serde_json::from_slice(&plain).map_err(store::storage)
}

fn write_record(ctx: &Ctx<'_>, record: &KeyRecord) -> Result<(), WriteError> {
    let plain = Zeroizing::new(serde_json::to_vec(record).map_err(store::storage)?);
    let sealed = ctx.sealer.seal(&format!("keys/{}", record.name), &plain)?;
    ctx.txn
        .open_table(KEYS)
        .map_err(store::storage)?
        .insert(record.name.as_str(), sealed.as_slice())
        .map_err(store::storage)?;
    Ok(())
}

fn admin_event(actor: &str, action: &'static str, subject: String, detail: Value) -> Event {
    Event { actor: actor.to_owned(), action, subject, outcome: "done", detail }
}

impl Broker {
    /// Over `store`, signing release answers with `issuers`' production key.
    pub fn new(
        store: Store,
        issuers: Arc<Issuers>,
        external: Vec<ExternalIssuer>,
        allow_sim: bool,
        cpu: Arc<tokio::sync::Semaphore>,
    ) -> Self {
        Self { store, issuers, external, allow_sim, cpu }
    }

    /// Creates (generates or imports) a key.
    pub async fn create(&self, request: CreateKey, actor: String) -> Result<KeyInfo, BrokerError> {
        if !valid_name(&request.name) {
            return Err(bad("a key name is 1 to 127 characters of A-Z, a-z, 0-9 and -"));
        }
        let kind = request.kind()?;
        let policy = parse_policy(&request.release_policy)?;
        let material = material(kind, request.value.as_deref().map(String::as_str))?;
        let now = store::now_unix();
        let record = KeyRecord {
            name: request.name.clone(),
            kind,
            created: now,
            updated: now,
            enabled: true,
            immutable: request.immutable,
            release_policy: policy.to_json(),
            versions: vec![VersionRecord {
                id: new_version_id()?,
                created: now,
                enabled: true,
                material: Zeroizing::new(URL_SAFE_NO_PAD.encode(material.as_slice())),
            }],
        };
        let imported = request.value.is_some();
        Ok(self
            .store
            .write(move |ctx| {
                if read_record(ctx.txn, ctx.sealer, &record.name)?.is_some() {
                    return Err(reject(BrokerError::Exists(record.name.clone())));
                }
                write_record(ctx, &record)?;
                ctx.audit(admin_event(
                    &actor,
                    if imported { "key.import" } else { "key.create" },
                    record.name.clone(),
                    json!({"kind": record.kind, "version": record.versions.last().map(|v| v.id.clone()), "immutable": record.immutable}),
                ))?;
                Ok(info(&record))
            })
            .await?)
    }

    /// Adds a new version (generated, or imported from `value`).
    pub async fn rotate(
        &self,
        name: &str,
        value: Option<Zeroizing<String>>,
        actor: String,
    ) -> Result<KeyInfo, BrokerError> {
        let current = self.get_record(name)?;
        let material = material(current.kind, value.as_deref().map(String::as_str))?;
        let version = VersionRecord {
            id: new_version_id()?,
            created: store::now_unix(),
            enabled: true,
            material: Zeroizing::new(URL_SAFE_NO_PAD.encode(material.as_slice())),
        };
        let name = name.to_owned();
        let kind = current.kind;
        self.modify(name.clone(), actor, "key.rotate", move |record| {
            // The material was made for the kind read before this write; a
            // key deleted and created again in between may be another kind.
            if record.kind != kind {
                return Err(BrokerError::BadRequest(format!("key {name:?} changed while it was rotated; try again")));
            }
            let id = version.id.clone();
            record.versions.push(version);
            Ok(json!({"version": id}))
        })
        .await
    }

    /// Enables or disables a key, or one version.
    pub async fn set_enabled(
        &self,
        name: &str,
        version: Option<String>,
        enabled: bool,
        actor: String,
    ) -> Result<KeyInfo, BrokerError> {
        let key = name.to_owned();
        self.modify(key.clone(), actor, if enabled { "key.enable" } else { "key.disable" }, move |record| {
            match &version {
                None => record.enabled = enabled,
                Some(id) => {
                    let v = record
                        .versions
                        .iter_mut()
                        .find(|v| &v.id == id)
                        .ok_or_else(|| BrokerError::NotFound(format!("key {key:?} has no version {id}")))?;
                    v.enabled = enabled;
                }
            }
            Ok(json!({"version": version}))
        })
        .await
    }

    /// Replaces the release policy, unless it is immutable.
    pub async fn set_policy(
        &self,
        name: &str,
        policy: Value,
        immutable: Option<bool>,
        actor: String,
    ) -> Result<KeyInfo, BrokerError> {
        let canonical = parse_policy(&policy)?.to_json();
        let key = name.to_owned();
        self.modify(key.clone(), actor, "key.policy", move |record| {
            if record.immutable {
                return Err(BrokerError::Immutable(key.clone()));
            }
            record.release_policy = canonical.clone();
            if let Some(immutable) = immutable {
                record.immutable = immutable;
            }
            Ok(json!({"immutable": record.immutable}))
        })
        .await
    }

    async fn modify(
        &self,
        name: String,
        actor: String,
        action: &'static str,
        change: impl FnOnce(&mut KeyRecord) -> Result<Value, BrokerError> + Send + 'static,
    ) -> Result<KeyInfo, BrokerError> {
        Ok(self
            .store
            .write(move |ctx| {
                let mut record = read_record(ctx.txn, ctx.sealer, &name)?
                    .ok_or_else(|| reject(BrokerError::NotFound(format!("no key named {name:?}"))))?;
                let detail = change(&mut record).map_err(reject)?;
                record.updated = store::now_unix();
                write_record(ctx, &record)?;
                ctx.audit(admin_event(&actor, action, name.clone(), detail))?;
                Ok(info(&record))
            })
            .await?)
    }

    /// Deletes a key and every version.
    pub async fn delete(&self, name: &str, actor: String) -> Result<(), BrokerError> {
        let name = name.to_owned();
        Ok(self
            .store
            .write(move |ctx| {
                if read_record(ctx.txn, ctx.sealer, &name)?.is_none() {
                    return Err(reject(BrokerError::NotFound(format!("no key named {name:?}"))));
                }
                ctx.txn.open_table(KEYS).map_err(store::storage)?.remove(name.as_str()).map_err(store::storage)?;
                ctx.audit(admin_event(&actor, "key.delete", name.clone(), Value::Null))?;
                Ok(())
            })
            .await?)
    }

    fn get_record(&self, name: &str) -> Result<KeyRecord, BrokerError> {
        let txn = self.store.db().begin_read().map_err(store::storage)?;
        let table = txn.open_table(KEYS).map_err(store::storage)?;
        let sealed = table
            .get(name)
            .map_err(store::storage)?
            .ok_or_else(|| BrokerError::NotFound(format!("no key named {name:?}")))?;
        Ok(open_record(self.store.sealer(), name, sealed.value())?)
    }

    /// One key's metadata.
    pub fn get(&self, name: &str) -> Result<KeyInfo, BrokerError> {
        Ok(info(&self.get_record(name)?))
    }

    /// Every key's metadata, by name.
    pub fn list(&self) -> Result<Vec<KeyInfo>, BrokerError> {
        let txn = self.store.db().begin_read().map_err(store::storage)?;
        let table = txn.open_table(KEYS).map_err(store::storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(store::storage)? {
            let (k, v) = row.map_err(store::storage)?;
            out.push(info(&open_record(self.store.sealer(), k.value(), v.value())?));
        }
        Ok(out)
    }

    /// The keys of the issuer a token names, if this broker trusts it.
    fn issuer_keys(&self, iss: &str) -> Option<Jwks> {
        if iss == self.issuers.url(Which::Production) {
            return Some(self.issuers.jwks(Which::Production));
        }
        if self.allow_sim && iss == self.issuers.url(Which::Sim) {
            return Some(self.issuers.jwks(Which::Sim));
        }
        self.external
            .iter()
            .find(|e| e.issuer.trim_end_matches('/') == iss.trim_end_matches('/'))
            .map(|e| e.jwks.clone())
    }

    /// Releases key `name` (its current version, or `version`) to the
    /// workload that holds `target`, a token.
    pub async fn release(
        &self,
        name: &str,
        version: Option<&str>,
        target: &str,
        nonce: Option<&str>,
        actor: String,
    ) -> Result<ReleaseResponse, BrokerError> {
        let subject = match version {
            Some(v) => format!("{name}/{v}"),
            None => name.to_owned(),
        };
        let decided = {
            // Fair (FIFO) access to the CPU for the verify-and-sign work:
            // see `server::cpu_gate`.
            let _permit = self.cpu.acquire().await.map_err(|_| BrokerError::Store(StoreError::Closed))?;
            self.try_release(name, version, target, nonce)
        };
        let (outcome, detail) = match &decided {
            Ok((_, detail)) => ("allowed", detail.clone()),
            Err(e) => ("denied", json!({"reason": e.to_string()})),
        };
        // No audit entry, no key; and a denial whose entry failed reports
        // the failure, the more urgent news.
        self.store
            .write(move |ctx| {
                ctx.audit(Event { actor, action: "release", subject, outcome, detail })?;
                Ok(())
            })
            .await?;
        decided.map(|(response, _)| response)
    }

    fn try_release(
        &self,
        name: &str,
        version: Option<&str>,
        target: &str,
        nonce: Option<&str>,
    ) -> Result<(ReleaseResponse, Value), BrokerError> {
        let record = self.get_record(name)?;
        if !record.enabled {
            return Err(BrokerError::Disabled(format!("key {name:?}")));
        }
        let chosen = match version {
            Some(id) => record.versions.iter().find(|v| v.id == id),
            None => record.versions.last(),
        }
        .ok_or_else(|| BrokerError::NotFound(format!("key {name:?} has no version {}", version.unwrap_or("at all"))))?;
        if !chosen.enabled {
            return Err(BrokerError::Disabled(format!("version {} of key {name:?}", chosen.id)));
        }

        let iss = token::peek_issuer(target).map_err(|e| BrokerError::Token(e.to_string()))?;
        let jwks = self.issuer_keys(&iss).ok_or_else(|| {
            BrokerError::Token(format!(
                "the token's issuer {iss:?} is not one this server trusts (its own, or a configured external issuer)"
            ))
        })?;
        let verified = token::verify(target, &jwks, store::now_unix(), LEEWAY_SECS)
            .map_err(|e: TokenError| BrokerError::Token(e.to_string()))?;
        let claims = verified.claims();
        let policy_json = serde_json::to_vec(&record.release_policy).map_err(|e| bad(e.to_string()))?;
        let policy = ReleasePolicy::parse(&policy_json)?;
        let release = policy
            .evaluate(&iss, claims)
            .map_err(|denial| BrokerError::Denied { key: name.to_owned(), reason: denial.to_string() })?;

        let wrapping = runtime_rsa_key(claims)?;
        let material = Zeroizing::new(
            URL_SAFE_NO_PAD.decode(chosen.material.as_bytes()).map_err(|e| BrokerError::Store(store::storage(e)))?,
        );
        let target = wrap::WrappingKey::from_jwk(&wrapping.n, &wrapping.e)
            .map_err(|e| bad(format!("x-ms-runtime.keys: {e}")))?;
        let ciphertext = wrap::wrap_key(&target, &material).map_err(|e| BrokerError::Crypto(e.to_string()))?;
        let key_hsm = wrap::KeyHsm::new(wrapping.kid.clone(), ciphertext).to_key_hsm_string();

        let kid = format!("{}/keys/{}/{}", self.issuers.url(Which::Production), record.name, chosen.id);
        let mut key = Map::new();
        key.insert("kid".into(), Value::String(kid.clone()));
        key.insert("kty".into(), Value::String(record.kind.azure_kty().into()));
        key.insert("key_ops".into(), json!(key_ops(record.kind)));
        key.insert("key_hsm".into(), Value::String(key_hsm));
        if let Some(public) = public_jwk(record.kind, &material) {
            key.extend(public);
        }
        let payload = json!({
            // The caller's nonce, echoed under the service's signature, so
            // that a relying party can tell this answer is fresh.
            "request": {"api-version": "7.4", "enc": "CKM_RSA_AES_KEY_WRAP", "kid": kid, "nonce": nonce},
            "response": {"key": {
                "key": Value::Object(key),
                "attributes": {"enabled": true, "created": record.created, "updated": record.updated, "exportable": true, "recoveryLevel": "Purgeable"},
                "release_policy": {"contentType": "application/json; charset=utf-8", "data": URL_SAFE_NO_PAD.encode(policy_json), "immutable": record.immutable},
            }},
        });
        let value = self.issuers.sign_payload(&payload).map_err(|e| BrokerError::Crypto(e.to_string()))?;
        let detail = json!({
            "version": chosen.id,
            "issuer": iss,
            "authority": release.authority,
            "jti": claims.get("jti"),
            "claims": decided_claims(&record.release_policy, claims),
            "wrapping_kid": wrapping.kid,
        });
        Ok((ReleaseResponse { value }, detail))
    }
}

fn key_ops(kind: KeyKind) -> &'static [&'static str] {
    match kind {
        KeyKind::Oct { .. } => &["encrypt", "decrypt", "wrapKey", "unwrapKey"],
        KeyKind::Rsa { .. } => &["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"],
        KeyKind::Ec { .. } => &["sign", "verify"],
        KeyKind::Secret => &[],
    }
}

/// The claims the policy names, with the token's values: what decided.
fn decided_claims(policy: &Value, claims: &Map<String, Value>) -> BTreeMap<String, Value> {
    fn walk(node: &Value, names: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::String(claim)) = map.get("claim") {
                    names.push(claim.clone());
                }
                map.values().for_each(|v| walk(v, names));
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, names)),
            _ => {}
        }
    }
    let mut names = Vec::new();
    walk(policy, &mut names);
    names
        .into_iter()
        .map(|name| {
            let value = claims.get(&name).cloned().unwrap_or(Value::Null);
            (name, value)
        })
        .collect()
}

struct WrappingKey {
    kid: String,
    n: String,
    e: String,
}

/// The RSA key in `x-ms-runtime.keys` to wrap to: the one whose kid is
/// `TpmEphemeralEncryptionKey` (Azure's name), else the only RSA key.
fn runtime_rsa_key(claims: &Map<String, Value>) -> Result<WrappingKey, BrokerError> {
    let keys = claims
        .get("x-ms-runtime")
        .and_then(|r| r.get("keys"))
        .and_then(Value::as_array)
        .ok_or_else(|| bad("the token has no x-ms-runtime.keys: the workload must bind its wrapping key's JWK into the runtime data it attests"))?;
    let rsa: Vec<&Value> = keys.iter().filter(|k| k.get("kty").and_then(Value::as_str) == Some("RSA")).collect();
    let chosen = rsa
        .iter()
        .find(|k| k.get("kid").and_then(Value::as_str) == Some("TpmEphemeralEncryptionKey"))
        .or(if rsa.len() == 1 { rsa.first() } else { None })
        .ok_or_else(|| bad("x-ms-runtime.keys must hold one RSA key (or one with kid TpmEphemeralEncryptionKey) to wrap the key to"))?;
    let field = |f: &str| {
        chosen
            .get(f)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| bad(format!("the RSA key in x-ms-runtime.keys has no {f}")))
    };
    Ok(WrappingKey {
        kid: chosen.get("kid").and_then(Value::as_str).unwrap_or("").to_owned(),
        n: field("n")?,
        e: field("e")?,
    })
}
