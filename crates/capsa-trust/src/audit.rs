//! The audit log: every attestation, release, denial and key change, in an
//! append-only chain that shows when an entry was deleted or edited.
//!
//! Each entry carries the MAC of the one before it and its own MAC, an
//! HMAC-SHA-256 under a key derived from the master key (never stored) over
//! the previous MAC and the entry's canonical JSON. Entries are numbered
//! from 1 without gaps, and the head (the last number and MAC) is kept
//! beside them. So [`verify`] finds an edited entry (its MAC fails), a
//! deleted one (a gap, or a broken link), and a deleted tail (the head no
//! longer matches). Whoever holds the master key could rewrite the whole
//! chain; against that, publish the head [`verify`] reports (an external
//! anchor), as for any hash chain.
//!
//! Entries are appended inside the write transaction of the change they
//! record, so a change and its entry commit together or not at all.

use aws_lc_rs::hmac;
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

/// Sequence number → entry JSON.
pub(crate) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// "head" → (last sequence number, its MAC).
pub(crate) const AUDIT_HEAD: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("audit_head");

/// One audited event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// When, RFC 3339 UTC.
    pub time: String,
    /// Who asked: an admin's name, or `attester`/`relying party` with the
    /// client's address.
    pub actor: String,
    /// What was asked: `attest`, `release`, `key.create`, ...
    pub action: String,
    /// What it was about: a key and version, or the TEE kind.
    pub subject: String,
    /// `allowed`, `denied` or `done`.
    pub outcome: String,
    /// What decided: the claims a release policy read, the reason for a
    /// denial. Never key material or a whole token.
    pub detail: serde_json::Value,
    /// The previous entry's MAC (hex), zeros for the first.
    pub prev: String,
    /// This entry's MAC (hex).
    pub mac: String,
}

/// An event to append; the log numbers and chains it.
#[derive(Debug, Clone)]
pub struct Event {
    /// See [`Entry::actor`].
    pub actor: String,
    /// See [`Entry::action`].
    pub action: &'static str,
    /// See [`Entry::subject`].
    pub subject: String,
    /// See [`Entry::outcome`].
    pub outcome: &'static str,
    /// See [`Entry::detail`].
    pub detail: serde_json::Value,
}

/// What is wrong with the log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The database failed.
    #[error("audit log storage: {0}")]
    Storage(String),
    /// An entry is not valid JSON of an entry.
    #[error("audit entry {seq} is not a valid entry ({reason}): it was altered")]
    Unreadable {
        /// Its key.
        seq: u64,
        /// The parse error.
        reason: String,
    },
    /// An entry's MAC does not match its content.
    #[error("audit entry {seq} was edited: its MAC does not match its content")]
    Edited {
        /// The entry.
        seq: u64,
    },
    /// Entries are missing.
    #[error("audit entries {from} to {to} were deleted")]
    Deleted {
        /// The first missing number.
        from: u64,
        /// The last missing number.
        to: u64,
    },
    /// An entry does not link to the one before it.
    #[error("audit entry {seq} does not follow entry {}: an entry between them was deleted or replaced", seq - 1)]
    BrokenLink {
        /// The entry.
        seq: u64,
    },
    /// The head does not match the last entry.
    #[error("the audit head names entry {head} but the log ends at entry {last}: entries at the end were deleted")]
    Truncated {
        /// The head's number.
        head: u64,
        /// The last entry present.
        last: u64,
    },
}

fn storage(e: impl std::fmt::Display) -> AuditError {
    AuditError::Storage(e.to_string())
}

const ZERO_MAC: [u8; 32] = [0; 32];

fn mac_of(key: &hmac::Key, entry: &Entry) -> Result<Vec<u8>, AuditError> {
    let mut unsigned = entry.clone();
    unsigned.mac = String::new();
    // serde_json writes struct fields in declaration order and maps sorted
    // (no preserve_order feature), so this encoding is canonical.
    let body = serde_json::to_vec(&unsigned).map_err(storage)?;
    let prev = hex::decode(&entry.prev).map_err(|_| AuditError::Edited { seq: entry.seq })?;
    let mut ctx = hmac::Context::with_key(key);
    ctx.update(&prev);
    ctx.update(&body);
    Ok(ctx.sign().as_ref().to_vec())
}

/// Appends `event` in `txn`; returns its sequence number.
pub(crate) fn append(txn: &WriteTransaction, key: &hmac::Key, event: Event, time: String) -> Result<u64, AuditError> {
    let mut head_table = txn.open_table(AUDIT_HEAD).map_err(storage)?;
    let (last, prev) = match head_table.get("head").map_err(storage)? {
        Some(guard) => {
            let (seq, mac) = guard.value();
            (seq, mac.to_vec())
        }
        None => (0, ZERO_MAC.to_vec()),
    };
    let mut entry = Entry {
        seq: last + 1,
        time,
        actor: event.actor,
        action: event.action.to_owned(),
        subject: event.subject,
        outcome: event.outcome.to_owned(),
        detail: event.detail,
        prev: hex::encode(&prev),
        mac: String::new(),
    };
    let mac = mac_of(key, &entry)?;
    entry.mac = hex::encode(&mac);
    let bytes = serde_json::to_vec(&entry).map_err(storage)?;
    txn.open_table(AUDIT).map_err(storage)?.insert(entry.seq, bytes.as_slice()).map_err(storage)?;
    head_table.insert("head", (entry.seq, mac.as_slice())).map_err(storage)?;
    Ok(entry.seq)
}

/// A log that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// How many entries.
    pub entries: u64,
    /// The last entry's MAC (hex): publish it to detect a rewritten chain.
    pub head: String,
}

/// Checks the whole chain.
pub fn verify(db: &redb::Database, key: &hmac::Key) -> Result<Verified, AuditError> {
    let txn = db.begin_read().map_err(storage)?;
    let head = match txn.open_table(AUDIT_HEAD) {
        Ok(table) => table.get("head").map_err(storage)?.map(|g| {
            let (seq, mac) = g.value();
            (seq, mac.to_vec())
        }),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(storage(e)),
    };
    let table = match txn.open_table(AUDIT) {
        Ok(table) => Some(table),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(storage(e)),
    };
    let mut expected_seq = 1u64;
    let mut prev = ZERO_MAC.to_vec();
    if let Some(table) = &table {
        for row in table.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let seq = k.value();
            let entry: Entry =
                serde_json::from_slice(v.value()).map_err(|e| AuditError::Unreadable { seq, reason: e.to_string() })?;
            if entry.seq != seq {
                return Err(AuditError::Edited { seq });
            }
            if seq != expected_seq {
                return Err(AuditError::Deleted { from: expected_seq, to: seq - 1 });
            }
            let mac = mac_of(key, &entry)?;
            let recorded = hex::decode(&entry.mac).map_err(|_| AuditError::Edited { seq })?;
            if aws_lc_rs::constant_time::verify_slices_are_equal(&mac, &recorded).is_err() {
                return Err(AuditError::Edited { seq });
            }
            if entry.prev != hex::encode(&prev) {
                return Err(AuditError::BrokenLink { seq });
            }
            prev = mac;
            expected_seq = seq + 1;
        }
    }
    let last = expected_seq - 1;
    match head {
        None if last == 0 => Ok(Verified { entries: 0, head: hex::encode(ZERO_MAC) }),
        None => Err(AuditError::Truncated { head: 0, last }),
        Some((seq, mac)) => {
            if seq > last {
                return Err(AuditError::Truncated { head: seq, last });
            }
            if seq != last || mac != prev {
                // The head is older than the log: the head itself was edited.
                return Err(AuditError::Edited { seq: last });
            }
            Ok(Verified { entries: last, head: hex::encode(prev) })
        }
    }
}

/// Entries from `from` (inclusive), at most `limit`.
pub fn entries(db: &redb::Database, from: u64, limit: usize) -> Result<Vec<Entry>, AuditError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = match txn.open_table(AUDIT) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
        Err(e) => return Err(storage(e)),
    };
    let mut out = Vec::new();
    for row in table.range(from..).map_err(storage)?.take(limit) {
        let (k, v) = row.map_err(storage)?;
        let seq = k.value();
        out.push(serde_json::from_slice(v.value()).map_err(|e| AuditError::Unreadable { seq, reason: e.to_string() })?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u32) -> Event {
        Event {
            actor: "test".into(),
            action: "release",
            subject: format!("key-{i}"),
            outcome: "allowed",
            detail: serde_json::json!({"i": i}),
        }
    }

    fn log(n: u32) -> (tempfile::TempDir, redb::Database, hmac::Key) {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("db")).unwrap();
        let key = hmac::Key::new(hmac::HMAC_SHA256, &[7; 32]);
        for i in 0..n {
            let txn = db.begin_write().unwrap();
            append(&txn, &key, event(i), "2026-11-23T00:00:00Z".into()).unwrap();
            txn.commit().unwrap();
        }
        (dir, db, key)
    }

    fn rewrite(db: &redb::Database, f: impl FnOnce(&mut redb::Table<u64, &[u8]>)) {
        let txn = db.begin_write().unwrap();
        f(&mut txn.open_table(AUDIT).unwrap());
        txn.commit().unwrap();
    }

    #[test]
    fn an_intact_log_verifies() {
        let (_d, db, key) = log(5);
        let v = verify(&db, &key).unwrap();
        assert_eq!(v.entries, 5);
        assert_eq!(entries(&db, 2, 2).unwrap().iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        let other = hmac::Key::new(hmac::HMAC_SHA256, &[8; 32]);
        assert!(matches!(verify(&db, &other), Err(AuditError::Edited { seq: 1 })));
    }

    #[test]
    fn an_edited_entry_is_found() {
        let (_d, db, key) = log(5);
        let mut e = entries(&db, 3, 1).unwrap().remove(0);
        e.outcome = "denied".into();
        let bytes = serde_json::to_vec(&e).unwrap();
        rewrite(&db, |t| {
            t.insert(3, bytes.as_slice()).unwrap();
        });
        assert!(matches!(verify(&db, &key), Err(AuditError::Edited { seq: 3 })), "{:?}", verify(&db, &key));
    }

    #[test]
    fn a_deleted_entry_is_found_in_the_middle_and_at_the_end() {
        let (_d, db, key) = log(5);
        rewrite(&db, |t| {
            t.remove(2).unwrap();
        });
        assert!(matches!(verify(&db, &key), Err(AuditError::Deleted { from: 2, to: 2 })));
        let (_d, db, key) = log(5);
        rewrite(&db, |t| {
            t.remove(5).unwrap();
        });
        assert!(matches!(verify(&db, &key), Err(AuditError::Truncated { head: 5, last: 4 })));
    }

    #[test]
    fn a_renumbered_log_breaks_its_links() {
        let (_d, db, key) = log(5);
        // Delete entry 3 and move 4 and 5 down, keeping their MACs.
        rewrite(&db, |t| {
            let four = t.get(4).unwrap().unwrap().value().to_vec();
            let five = t.get(5).unwrap().unwrap().value().to_vec();
            t.remove(5).unwrap();
            t.insert(3, four.as_slice()).unwrap();
            t.insert(4, five.as_slice()).unwrap();
        });
        assert!(verify(&db, &key).is_err());
    }
}
