//! The durable store: one redb database in the data directory holding the
//! keys, the token signing keys and the audit log, secrets sealed under the
//! master key ([`crate::seal`]).
//!
//! Writes go through one committer thread that groups whatever writes are
//! waiting into one transaction, commits it (redb's default durability: the
//! commit is on disk when `commit` returns), and only then answers each
//! caller. An acknowledged write therefore survives a crash, and under load
//! one disk flush serves many requests instead of one each.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::oneshot;

use crate::audit::{self, AuditError, Event};
use crate::seal::{MasterKey, SealError, Sealer};

/// Key name → sealed key record JSON.
pub(crate) const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
/// Name → sealed value: the signing key rings.
pub(crate) const SECRETS: TableDefinition<&str, &[u8]> = TableDefinition::new("secrets");
/// Name → plain metadata: the format version and a sealed check value.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const FORMAT: &[u8] = b"capsa-trust store v1";
/// The most writes one transaction groups.
const MAX_BATCH: usize = 256;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed.
    #[error("store: {0}")]
    Storage(String),
    /// Sealing or opening failed.
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The audit log failed.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The data directory could not be prepared.
    #[error("data directory {path}: {reason}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The database was written by something else.
    #[error("{path} is not a capsa trust store (format {found:?})")]
    Format {
        /// The database file.
        path: PathBuf,
        /// What its format record says.
        found: String,
    },
    /// The committer thread is gone (the server is shutting down).
    #[error("the store is shutting down")]
    Closed,
}

/// A request that the store refused before writing anything: the caller's
/// error, carried through the committer unchanged.
#[derive(Debug)]
pub struct Rejected(pub Box<dyn std::error::Error + Send + Sync>);

pub(crate) fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

type Value = Box<dyn Any + Send>;
type Apply = Box<dyn FnOnce(&Ctx<'_>) -> Result<Value, WriteError> + Send>;

/// What a write closure may fail with: refused before writing (the rest of
/// the batch commits), or a storage failure (the whole batch is abandoned).
#[derive(Debug)]
pub enum WriteError {
    /// Nothing was written; the caller gets this error.
    Rejected(Rejected),
    /// Something may have been written: the transaction is abandoned.
    Store(StoreError),
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl From<AuditError> for WriteError {
    fn from(e: AuditError) -> Self {
        Self::Store(e.into())
    }
}

impl From<SealError> for WriteError {
    fn from(e: SealError) -> Self {
        Self::Store(e.into())
    }
}

/// What a write closure sees: the transaction, the sealer and the audit log.
pub struct Ctx<'a> {
    /// The batch's transaction.
    pub txn: &'a WriteTransaction,
    /// Seals values for the tables.
    pub sealer: &'a Sealer,
    audit_key: &'a hmac::Key,
}

impl Ctx<'_> {
    /// Appends an audit entry in this transaction.
    pub fn audit(&self, event: Event) -> Result<u64, WriteError> {
        Ok(audit::append(self.txn, self.audit_key, event, now_rfc3339())?)
    }
}

struct Op {
    apply: Apply,
    reply: oneshot::Sender<Result<Value, StoreOpError>>,
}

/// A failed write as its caller sees it.
#[derive(Debug)]
pub enum StoreOpError {
    /// Refused by the write itself.
    Rejected(Rejected),
    /// The store failed.
    Store(StoreError),
}

/// The opened store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<redb::Database>,
    sealer: Arc<Sealer>,
    audit_key: Arc<hmac::Key>,
    ops: std::sync::Mutex<Option<mpsc::Sender<Op>>>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating when new) the store in `dir` under `master`.
    pub fn open(dir: &Path, master: &MasterKey) -> Result<Self, StoreError> {
        let data_dir = |reason: String| StoreError::DataDir { path: dir.to_owned(), reason };
        std::fs::create_dir_all(dir).map_err(|e| data_dir(e.to_string()))?;
        let path = dir.join("trust.redb");
        let db = redb::Database::create(&path).map_err(storage)?;
        let (sealer, audit_key) = master.derive()?;
        check_format(&db, &sealer, &path)?;
        let db = Arc::new(db);
        let sealer = Arc::new(sealer);
        let audit_key = Arc::new(audit_key);
        let (tx, rx) = mpsc::channel::<Op>();
        {
            let (db, sealer, audit_key) = (Arc::clone(&db), Arc::clone(&sealer), Arc::clone(&audit_key));
            std::thread::Builder::new()
                .name("capsa-trust-committer".into())
                .spawn(move || committer(&db, &sealer, &audit_key, &rx))
                .map_err(|e| data_dir(format!("cannot start the committer thread: {e}")))?;
        }
        Ok(Self { inner: Arc::new(Inner { db, sealer, audit_key, ops: std::sync::Mutex::new(Some(tx)), path }) })
    }

    /// The database, for reads.
    pub fn db(&self) -> &redb::Database {
        &self.inner.db
    }

    /// The sealer, to open what reads return.
    pub fn sealer(&self) -> &Sealer {
        &self.inner.sealer
    }

    /// The audit MAC key, for [`audit::verify`].
    pub fn audit_key(&self) -> &hmac::Key {
        &self.inner.audit_key
    }

    /// Runs `apply` in the next committed transaction and returns its value
    /// once that transaction is durable.
    pub async fn write<T: Send + 'static>(
        &self,
        apply: impl FnOnce(&Ctx<'_>) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T, StoreOpError> {
        let (reply, answer) = oneshot::channel();
        let op = Op { apply: Box::new(move |ctx| apply(ctx).map(|v| Box::new(v) as Value)), reply };
        {
            let guard = self.inner.ops.lock().map_err(|_| StoreOpError::Store(StoreError::Closed))?;
            let sender = guard.as_ref().ok_or(StoreOpError::Store(StoreError::Closed))?;
            sender.send(op).map_err(|_| StoreOpError::Store(StoreError::Closed))?;
        }
        let value = answer.await.map_err(|_| StoreOpError::Store(StoreError::Closed))??;
        value.downcast::<T>().map(|b| *b).map_err(|_| StoreOpError::Store(storage("write returned another type")))
    }

    /// Reads the sealed value `name` of the secrets table.
    pub fn secret(&self, what: &'static str, name: &str) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, StoreError> {
        let txn = self.db().begin_read().map_err(storage)?;
        let table = match txn.open_table(SECRETS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        let Some(sealed) = table.get(name).map_err(storage)? else { return Ok(None) };
        Ok(Some(self.sealer().open(what, &format!("secrets/{name}"), sealed.value())?))
    }

    /// Stops the committer after the writes already queued.
    pub fn close(&self) {
        if let Ok(mut guard) = self.inner.ops.lock() {
            guard.take();
        }
    }
}

/// Seals `value` into the secrets table as `name` (inside a write).
pub(crate) fn put_secret(ctx: &Ctx<'_>, name: &str, value: &[u8]) -> Result<(), WriteError> {
    let sealed = ctx.sealer.seal(&format!("secrets/{name}"), value)?;
    ctx.txn.open_table(SECRETS).map_err(storage)?.insert(name, sealed.as_slice()).map_err(storage)?;
    Ok(())
}

fn check_format(db: &redb::Database, sealer: &Sealer, path: &Path) -> Result<(), StoreError> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let format = meta.get("format").map_err(storage)?.map(|v| v.value().to_vec());
        match format {
            None => {
                meta.insert("format", FORMAT).map_err(storage)?;
                let check = sealer.seal("meta/check", FORMAT)?;
                meta.insert("check", check.as_slice()).map_err(storage)?;
            }
            Some(f) if f == FORMAT => {
                let check = meta.get("check").map_err(storage)?.map(|v| v.value().to_vec()).unwrap_or_default();
                sealer.open("master key check", "meta/check", &check)?;
            }
            Some(f) => {
                return Err(StoreError::Format {
                    path: path.to_owned(),
                    found: String::from_utf8_lossy(&f).into_owned(),
                });
            }
        }
        txn.open_table(KEYS).map_err(storage)?;
        txn.open_table(SECRETS).map_err(storage)?;
        txn.open_table(audit::AUDIT).map_err(storage)?;
        txn.open_table(audit::AUDIT_HEAD).map_err(storage)?;
    }
    txn.commit().map_err(storage)
}

/// How long a busy committer waits for more writes before committing.
const LINGER: Duration = Duration::from_millis(1);
/// A committer that committed less than this long ago counts as busy.
const BUSY: Duration = Duration::from_millis(5);

fn committer(db: &redb::Database, sealer: &Sealer, audit_key: &hmac::Key, ops: &mpsc::Receiver<Op>) {
    let mut last_commit: Option<Instant> = None;
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        // Under load, wait a moment for more writes: a commit costs a
        // flush and a few hundred microseconds of CPU whatever its size,
        // so fewer, larger commits leave the CPU to the requests. An idle
        // store commits at once.
        let busy = last_commit.is_some_and(|t| t.elapsed() < BUSY);
        let deadline = Instant::now() + if busy { LINGER } else { Duration::ZERO };
        while batch.len() < MAX_BATCH {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = if left.is_zero() { ops.try_recv().ok() } else { ops.recv_timeout(left).ok() };
            match next {
                Some(op) => batch.push(op),
                None => break,
            }
        }
        run_batch(db, sealer, audit_key, batch);
        last_commit = Some(Instant::now());
    }
}

fn run_batch(db: &redb::Database, sealer: &Sealer, audit_key: &hmac::Key, batch: Vec<Op>) {
    let txn = match db.begin_write() {
        Ok(txn) => txn,
        Err(e) => {
            let message = e.to_string();
            for op in batch {
                let _ = op.reply.send(Err(StoreOpError::Store(StoreError::Storage(message.clone()))));
            }
            return;
        }
    };
    let ctx = Ctx { txn: &txn, sealer, audit_key };
    let mut results = Vec::with_capacity(batch.len());
    let mut failed: Option<String> = None;
    for op in batch {
        if failed.is_some() {
            results.push((op.reply, Err(None)));
            continue;
        }
        match (op.apply)(&ctx) {
            Ok(v) => results.push((op.reply, Ok(v))),
            Err(WriteError::Rejected(r)) => results.push((op.reply, Err(Some(r)))),
            Err(WriteError::Store(e)) => {
                failed = Some(e.to_string());
                results.push((op.reply, Err(None)));
            }
        }
    }
    let outcome = match failed {
        Some(reason) => Err(reason),
        None => txn.commit().map_err(|e| e.to_string()),
    };
    for (reply, result) in results {
        let answer = match result {
            Err(Some(rejected)) => Err(StoreOpError::Rejected(rejected)),
            Ok(v) if outcome.is_ok() => Ok(v),
            _ => Err(StoreOpError::Store(StoreError::Storage(match &outcome {
                Err(reason) => reason.clone(),
                Ok(()) => "the batch was abandoned".to_owned(),
            }))),
        };
        let _ = reply.send(answer);
    }
}

/// Now, RFC 3339 UTC.
pub(crate) fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Now, seconds since the epoch.
pub(crate) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(byte: u8) -> MasterKey {
        MasterKey::from_hex(&hex::encode([byte; 32]), "test").unwrap()
    }

    #[derive(Debug)]
    struct Nope;
    impl std::fmt::Display for Nope {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("nope")
        }
    }
    impl std::error::Error for Nope {}

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_commit_and_a_rejection_spares_the_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), &master(1)).unwrap();
        let mut tasks = Vec::new();
        for i in 0..50u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .write(move |ctx| {
                        if i == 7 {
                            return Err(WriteError::Rejected(Rejected(Box::new(Nope))));
                        }
                        put_secret(ctx, &format!("s{i}"), &i.to_be_bytes())?;
                        ctx.audit(Event {
                            actor: "t".into(),
                            action: "test",
                            subject: i.to_string(),
                            outcome: "done",
                            detail: serde_json::Value::Null,
                        })
                    })
                    .await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreOpError::Rejected(r)) => assert_eq!(r.0.to_string(), "nope"),
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(ok, 49);
        assert_eq!(store.secret("t", "s3").unwrap().unwrap().as_slice(), 3u32.to_be_bytes());
        assert!(store.secret("t", "s7").unwrap().is_none());
        assert_eq!(audit::verify(store.db(), store.audit_key()).unwrap().entries, 49);
    }

    #[test]
    fn another_master_key_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), &master(1)).unwrap());
        // redb allows one open database per file in a process; the first
        // is dropped (its committer exits when the sender is dropped).
        std::thread::sleep(std::time::Duration::from_millis(50));
        let err = Store::open(dir.path(), &master(2)).unwrap_err().to_string();
        assert!(err.contains("another master key"), "{err}");
    }
}
