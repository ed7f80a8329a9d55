//! The server's two token issuers and their signing keys.
//!
//! Tokens for hardware evidence are signed under the production issuer
//! (`iss` = the configured URL) and published at `/certs`. Tokens for sim
//! evidence are signed with a different key ring under `<issuer>/sim` and
//! published only at `/sim/certs`: a relying party (or a release policy
//! whose `authority` names the production issuer) that trusts the
//! production keys can never accept a sim token, whatever its claims say.
//!
//! Both rings live sealed in the store; rotation keeps a retired key
//! published until every token it signed has expired.

use std::sync::RwLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use crate::store::{self, Store, StoreError, StoreOpError, WriteError};
use crate::token::{self, Jwks, KeyRecord, KeyRing, SigningKey, TokenError};

/// Which of the two issuers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// Hardware evidence.
    Production,
    /// The sim platform's evidence.
    Sim,
}

impl Which {
    fn secret_name(self) -> &'static str {
        match self {
            Self::Production => "signing/production",
            Self::Sim => "signing/sim",
        }
    }
}

/// Why signing or key management failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssuerError {
    /// A token operation failed.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The stored ring is unreadable.
    #[error("the stored signing keys are unreadable: {0}")]
    Corrupt(String),
}

impl From<StoreOpError> for IssuerError {
    fn from(e: StoreOpError) -> Self {
        match e {
            StoreOpError::Store(e) => Self::Store(e),
            StoreOpError::Rejected(r) => Self::Corrupt(r.0.to_string()),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    record: KeyRecord,
    pkcs8: Zeroizing<String>,
}

/// The production and sim issuers.
#[derive(Debug)]
pub struct Issuers {
    url: String,
    lifetime: i64,
    production: RwLock<KeyRing>,
    sim: RwLock<KeyRing>,
    /// One rotation at a time: each persists a successor of the ring it
    /// read, which a concurrent rotation must not overtake.
    rotation: tokio::sync::Mutex<()>,
}

impl Issuers {
    /// Loads both rings, creating (and storing) a first key for a ring
    /// that does not exist yet.
    pub async fn load(store: &Store, url: String, lifetime: i64) -> Result<Self, IssuerError> {
        let production = load_ring(store, Which::Production).await?;
        let sim = load_ring(store, Which::Sim).await?;
        Ok(Self {
            url,
            lifetime,
            production: RwLock::new(production),
            sim: RwLock::new(sim),
            rotation: tokio::sync::Mutex::new(()),
        })
    }

    /// The `iss` of one issuer.
    pub fn url(&self, which: Which) -> String {
        match which {
            Which::Production => self.url.clone(),
            Which::Sim => format!("{}/sim", self.url),
        }
    }

    /// Token lifetime in seconds.
    pub fn lifetime(&self) -> i64 {
        self.lifetime
    }

    /// How long a retired key stays published: a token lifetime plus the
    /// clock skew relying parties allow past `exp`.
    fn published_for(&self) -> i64 {
        self.lifetime.max(0) + crate::broker::LEEWAY_SECS
    }

    fn ring(&self, which: Which) -> &RwLock<KeyRing> {
        match which {
            Which::Production => &self.production,
            Which::Sim => &self.sim,
        }
    }

    /// A token with the standard claims and `claims`.
    pub fn issue(&self, which: Which, claims: Map<String, Value>) -> Result<String, IssuerError> {
        let now = store::now_unix();
        let mut all = token::standard_claims(&self.url(which), now, self.lifetime)?;
        for (k, v) in claims {
            // The standard claims are the issuer's; evidence cannot set them.
            all.entry(k).or_insert(v);
        }
        let ring = self.ring(which).read().map_err(|_| IssuerError::Corrupt("lock poisoned".into()))?;
        Ok(token::sign(ring.active(), &all)?)
    }

    /// A compact JWS of `payload` signed by the production issuer's active
    /// key (release responses).
    pub fn sign_payload(&self, payload: &Value) -> Result<String, IssuerError> {
        let ring = self.production.read().map_err(|_| IssuerError::Corrupt("lock poisoned".into()))?;
        Ok(token::sign_payload_json(ring.active(), payload)?)
    }

    /// The keys to publish for one issuer.
    pub fn jwks(&self, which: Which) -> Jwks {
        match self.ring(which).read() {
            Ok(ring) => ring.jwks(store::now_unix(), self.published_for()),
            Err(_) => Jwks { keys: Vec::new() },
        }
    }

    /// Rotates one issuer's key: a new key signs from now on; the old one
    /// stays published for a token lifetime. Durable before it takes effect.
    pub async fn rotate(&self, store: &Store, which: Which, actor: String) -> Result<String, IssuerError> {
        let _one_at_a_time = self.rotation.lock().await;
        let now = store::now_unix();
        let new_key = SigningKey::generate(now)?;
        let kid = new_key.kid().to_owned();
        // The successor is the current ring rotated and pruned, stored
        // before it replaces the current one.
        let mut next = {
            let current = self.ring(which).read().map_err(|_| IssuerError::Corrupt("lock poisoned".into()))?;
            ring_from_bytes(&ring_to_bytes(&current)?)?
        };
        next.rotate(new_key, now)?;
        next.prune(now, self.published_for());
        let stored = ring_to_bytes(&next)?;
        let name = which.secret_name();
        let subject = self.url(which);
        let audit_kid = kid.clone();
        store
            .write(move |ctx| {
                store::put_secret(ctx, name, &stored)?;
                ctx.audit(crate::audit::Event {
                    actor,
                    action: "signing-key.rotate",
                    subject,
                    outcome: "done",
                    detail: serde_json::json!({ "kid": audit_kid }),
                })?;
                Ok::<(), WriteError>(())
            })
            .await?;
        *self.ring(which).write().map_err(|_| IssuerError::Corrupt("lock poisoned".into()))? = next;
        Ok(kid)
    }
}

/// A ring as stored: its records with their PKCS#8 keys, JSON.
fn ring_to_bytes(ring: &KeyRing) -> Result<Zeroizing<Vec<u8>>, IssuerError> {
    let stored = ring
        .records()
        .into_iter()
        .map(|record| {
            let key = ring.get(&record.kid).ok_or_else(|| IssuerError::Corrupt("a ring key vanished".into()))?;
            Ok(StoredKey { pkcs8: Zeroizing::new(URL_SAFE_NO_PAD.encode(key.pkcs8().as_slice())), record })
        })
        .collect::<Result<Vec<_>, IssuerError>>()?;
    Ok(Zeroizing::new(serde_json::to_vec(&stored).map_err(|e| IssuerError::Corrupt(e.to_string()))?))
}

fn ring_from_bytes(bytes: &[u8]) -> Result<KeyRing, IssuerError> {
    let stored: Vec<StoredKey> = serde_json::from_slice(bytes).map_err(|e| IssuerError::Corrupt(e.to_string()))?;
    let parts = stored
        .into_iter()
        .map(|k| {
            let der = URL_SAFE_NO_PAD.decode(k.pkcs8.as_bytes()).map_err(|e| IssuerError::Corrupt(e.to_string()))?;
            Ok((k.record, Zeroizing::new(der)))
        })
        .collect::<Result<Vec<_>, IssuerError>>()?;
    Ok(KeyRing::from_parts(parts)?)
}

async fn load_ring(store: &Store, which: Which) -> Result<KeyRing, IssuerError> {
    let name = which.secret_name();
    if let Some(bytes) = store.secret("signing keys", name)? {
        return ring_from_bytes(&bytes);
    }
    let ring = KeyRing::new(SigningKey::generate(store::now_unix())?);
    let bytes = ring_to_bytes(&ring)?;
    store
        .write(move |ctx| {
            store::put_secret(ctx, name, &bytes)?;
            Ok::<(), WriteError>(())
        })
        .await?;
    Ok(ring)
}
