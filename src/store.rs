//! The state store: the only module that touches sled. One database per state directory
//! with named trees: `ledger` (files already processed), `baselines` (per-principal
//! behaviour), `outbox` (findings waiting for delivery), `meta` (schema version), and
//! trees other modules ask for by name (`tree`). A file's effects (its ledger entry, the
//! baselines it changed, the findings it produced) are committed in one transaction, so
//! a crash never leaves half-applied state and a redelivered file is never counted twice.
//! A `Commit` may also write other modules' trees (`StateWrite`), so a sink's own state
//! changes in the transaction that removes what it consumed from the outbox.

use serde::{de::DeserializeOwned, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;
use std::path::{Path, PathBuf};

/// Bumped when the layout of stored values changes incompatibly.
pub const SCHEMA_VERSION: u32 = 1;

/// sled's page cache for the daemon's store (it counts against the unit's memory).
pub const DAEMON_CACHE_BYTES: u64 = 16 << 20;
/// sled's page cache for a replay's store (temporary or `--state`).
pub const REPLAY_CACHE_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state store in {dir}: {source} (is another kmsguard using it? check the path and its permissions)")]
    Open {
        dir: String,
        #[source]
        source: sled::Error,
    },
    #[error("the state store in {dir} has schema version {found}, this kmsguard needs {SCHEMA_VERSION}: move the folder away to start afresh, or use a matching kmsguard")]
    Schema { dir: String, found: u32 },
    #[error("state store error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt value in tree `{tree}` at key `{key}`: {error}")]
    Corrupt {
        tree: &'static str,
        key: String,
        error: String,
    },
    #[error("cannot create a temporary state directory: {0}")]
    Temp(std::io::Error),
}

// Ledger values: a status byte, then (since the ledger expires) the time the entry
// counts from, 8 bytes big-endian, and for a partly learned input the number of its
// observation chunks already committed. Older stores hold the bare words "ok" and
// "failed"; `prune_ledger` stamps them when it first sees them.
const LEDGER_OK: &[u8] = b"ok";
const LEDGER_FAILED: &[u8] = b"failed";
const TAG_DONE: u8 = b'D';
const TAG_FAILED: u8 = b'F';
const TAG_PARTIAL: u8 = b'P';

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerStatus {
    Done,
    Failed,
    /// The input's first `n` observation chunks are learned and committed (a large
    /// input is committed in parts, so its baselines never have to fit in memory).
    Partial(u64),
}

fn ledger_value(tag: u8, stamp: i64, chunks: Option<u64>) -> Vec<u8> {
    let mut v = Vec::with_capacity(17);
    v.push(tag);
    v.extend_from_slice(&stamp.to_be_bytes());
    if let Some(n) = chunks {
        v.extend_from_slice(&n.to_be_bytes());
    }
    v
}

fn parse_ledger(v: &[u8]) -> (LedgerStatus, Option<i64>) {
    let stamp = v
        .get(1..9)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_be_bytes);
    match v.first() {
        _ if v == LEDGER_FAILED => (LedgerStatus::Failed, None),
        _ if v == LEDGER_OK => (LedgerStatus::Done, None),
        Some(&TAG_FAILED) => (LedgerStatus::Failed, stamp),
        Some(&TAG_PARTIAL) => {
            let n = v
                .get(9..17)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u64::from_be_bytes);
            (LedgerStatus::Partial(n), stamp)
        }
        _ => (LedgerStatus::Done, stamp),
    }
}

/// What `Store::prune_ledger` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Pruned {
    /// Entries removed (older than the cutoff).
    pub removed: u64,
    /// Entries kept.
    pub kept: u64,
    /// Entries of an older kmsguard without a time, stamped with the cutoff's "now".
    pub stamped: u64,
}

/// Everything one processed input changes, committed atomically.
#[derive(Debug, Default)]
pub struct Commit {
    /// Ledger entries to record (e.g. `file:/path:size:mtime` or `s3:bucket/key:etag`).
    pub ledger: Vec<String>,
    /// Ledger entries of inputs that failed for good (corrupt, gone): redeliveries of
    /// them are not analyzed again.
    pub failed: Vec<String>,
    /// Inputs learned in part: (ledger key, observation chunks committed so far).
    pub partial: Vec<(String, u64)>,
    /// The time the ledger entries of this commit count from for expiry (seconds since
    /// the epoch: the daemon's clock, or a replayed file's own stamp).
    pub stamp: i64,
    /// Baselines to write (principal -> serialized baseline), `None` to delete.
    pub baselines: Vec<(String, Option<Vec<u8>>)>,
    /// Outbox entries (id -> serialized record).
    pub outbox: Vec<(String, Vec<u8>)>,
    /// Outbox entries delivered, removed in the same transaction.
    pub delivered: Vec<String>,
    /// Writes to other modules' trees (`Store::tree`), in the same transaction: e.g. a
    /// sink's own state that must change together with the removal of what it consumed.
    pub state: Vec<StateWrite>,
}

/// One write to a named tree inside a `Commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateWrite {
    pub tree: &'static str,
    pub key: Vec<u8>,
    /// `None` deletes the key.
    pub value: Option<Vec<u8>>,
}

impl StateWrite {
    pub fn put(tree: &'static str, key: impl Into<Vec<u8>>, value: Vec<u8>) -> StateWrite {
        StateWrite {
            tree,
            key: key.into(),
            value: Some(value),
        }
    }

    pub fn delete(tree: &'static str, key: impl Into<Vec<u8>>) -> StateWrite {
        StateWrite {
            tree,
            key: key.into(),
            value: None,
        }
    }
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.ledger.is_empty()
            && self.failed.is_empty()
            && self.partial.is_empty()
            && self.baselines.is_empty()
            && self.outbox.is_empty()
            && self.delivered.is_empty()
            && self.state.is_empty()
    }
}

/// An open state store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    dir: PathBuf,
    ledger: sled::Tree,
    baselines: sled::Tree,
    outbox: sled::Tree,
    /// Keeps a temporary directory alive as long as the store.
    _temp: Option<std::sync::Arc<TempDir>>,
}

/// A directory removed on drop (for replay without `--state`).
pub struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Self::open_inner(dir, None, DAEMON_CACHE_BYTES)
    }

    /// A store with a page cache of `cache_bytes` (sled's cache counts against the
    /// process's memory: size it for the job).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        Self::open_inner(dir, None, cache_bytes)
    }

    /// A throwaway store in a fresh temporary directory.
    pub fn temporary() -> Result<Store, StoreError> {
        let base = std::env::temp_dir().join(format!(
            "kmsguard-state-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&base).map_err(StoreError::Temp)?;
        let temp = std::sync::Arc::new(TempDir(base.clone()));
        Self::open_inner(&base, Some(temp), REPLAY_CACHE_BYTES)
    }

    /// True for a store made by `temporary` (it starts empty: nothing was learned before).
    pub fn is_temporary(&self) -> bool {
        self._temp.is_some()
    }

    fn open_inner(
        dir: &Path,
        temp: Option<std::sync::Arc<TempDir>>,
        cache_bytes: u64,
    ) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            dir: dir.display().to_string(),
            source,
        };
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_bytes)
            .open()
            .map_err(open_err)?;
        let meta = db.open_tree("meta").map_err(open_err)?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
            }
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        dir: dir.display().to_string(),
                        found,
                    });
                }
            }
        }
        Ok(Store {
            ledger: db.open_tree("ledger")?,
            baselines: db.open_tree("baselines")?,
            outbox: db.open_tree("outbox")?,
            db,
            dir: dir.to_path_buf(),
            _temp: temp,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Another named tree, for modules with state of their own (e.g. the key inventory).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Every entry of a named tree (keys as text), in key order.
    pub fn tree_entries(&self, name: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.db
            .open_tree(name)?
            .iter()
            .map(|r| {
                let (k, v) = r?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    /// Whether the input was processed to the end (done or failed; not partly).
    pub fn ledger_contains(&self, key: &str) -> Result<bool, StoreError> {
        Ok(matches!(
            self.ledger_status(key)?,
            Some(LedgerStatus::Done | LedgerStatus::Failed)
        ))
    }

    /// Whether an input was processed, and how it ended.
    pub fn ledger_status(&self, key: &str) -> Result<Option<LedgerStatus>, StoreError> {
        Ok(self.ledger.get(key)?.map(|v| parse_ledger(&v).0))
    }

    pub fn ledger_len(&self) -> usize {
        self.ledger.len()
    }

    /// Removes ledger entries whose time is before `cutoff` (seconds since the epoch).
    /// Entries without a time (written by an older kmsguard) are stamped `now`, so they
    /// expire one retention after they were first seen. A removed entry can matter only
    /// if its input comes again after the retention: the daemon's retention is longer
    /// than SQS keeps a message, replay's longer than baselines remember.
    pub fn prune_ledger(&self, cutoff: i64, now: i64) -> Result<Pruned, StoreError> {
        let mut out = Pruned::default();
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for r in self.ledger.iter() {
            let (k, v) = r?;
            match parse_ledger(&v) {
                (status, None) => {
                    let tag = match status {
                        LedgerStatus::Failed => TAG_FAILED,
                        _ => TAG_DONE,
                    };
                    batch.insert(k, ledger_value(tag, now, None));
                    out.stamped += 1;
                    out.kept += 1;
                }
                (_, Some(t)) if t < cutoff => {
                    batch.remove(k);
                    out.removed += 1;
                }
                _ => out.kept += 1,
            }
            pending += 1;
            if pending >= 10_000 {
                self.ledger.apply_batch(std::mem::take(&mut batch))?;
                pending = 0;
            }
        }
        self.ledger.apply_batch(batch)?;
        Ok(out)
    }

    /// A number that grows with every call, across restarts (orders outbox entries).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()?)
    }

    pub fn baseline_raw(&self, principal: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.baselines.get(principal)?.map(|v| v.to_vec()))
    }

    /// Every stored baseline, in principal order.
    pub fn baselines_raw(
        &self,
    ) -> impl Iterator<Item = Result<(String, Vec<u8>), StoreError>> + '_ {
        self.baselines.iter().map(|r| {
            let (k, v) = r?;
            Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
        })
    }

    /// Deletes a principal's baseline; true when there was one.
    pub fn forget_baseline(&self, principal: &str) -> Result<bool, StoreError> {
        Ok(self.baselines.remove(principal)?.is_some())
    }

    pub fn baseline_count(&self) -> usize {
        self.baselines.len()
    }

    /// Applies a commit in one transaction over the ledger, baselines and outbox.
    pub fn commit(&self, c: &Commit) -> Result<(), StoreError> {
        if c.is_empty() {
            return Ok(());
        }
        // The three fixed trees, then each other tree named by a state write.
        let mut names: Vec<&'static str> = Vec::new();
        for w in &c.state {
            if !names.contains(&w.tree) {
                names.push(w.tree);
            }
        }
        let extra: Vec<sled::Tree> = names
            .iter()
            .map(|n| self.db.open_tree(n))
            .collect::<Result<_, _>>()?;
        let mut trees: Vec<&sled::Tree> = vec![&self.ledger, &self.baselines, &self.outbox];
        trees.extend(extra.iter());
        let result: Result<(), TransactionError<()>> = trees.as_slice().transaction(|t| {
            let (ledger, baselines, outbox) = (&t[0], &t[1], &t[2]);
            for (k, n) in &c.partial {
                ledger.insert(k.as_bytes(), ledger_value(TAG_PARTIAL, c.stamp, Some(*n)))?;
            }
            for k in &c.ledger {
                ledger.insert(k.as_bytes(), ledger_value(TAG_DONE, c.stamp, None))?;
            }
            for k in &c.failed {
                ledger.insert(k.as_bytes(), ledger_value(TAG_FAILED, c.stamp, None))?;
            }
            for (k, v) in &c.baselines {
                match v {
                    Some(v) => baselines.insert(k.as_bytes(), v.as_slice())?,
                    None => baselines.remove(k.as_bytes())?,
                };
            }
            for k in &c.delivered {
                outbox.remove(k.as_bytes())?;
            }
            for (k, v) in &c.outbox {
                outbox.insert(k.as_bytes(), v.as_slice())?;
            }
            for w in &c.state {
                let i = 3 + names.iter().position(|n| *n == w.tree).unwrap_or(0);
                match &w.value {
                    Some(v) => t[i].insert(w.key.as_slice(), v.as_slice())?,
                    None => t[i].remove(w.key.as_slice())?,
                };
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
            Err(TransactionError::Abort(())) => Err(StoreError::Sled(sled::Error::ReportableBug(
                "transaction aborted".into(),
            ))),
        }
    }

    /// Outbox entries in key order (keys sort by creation time).
    pub fn outbox_entries(
        &self,
    ) -> impl Iterator<Item = Result<(String, Vec<u8>), StoreError>> + '_ {
        self.outbox.iter().map(|r| {
            let (k, v) = r?;
            Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
        })
    }

    /// Outbox entries whose key starts with `prefix` (one sink's), in key order.
    pub fn outbox_prefix(
        &self,
        prefix: &str,
    ) -> impl Iterator<Item = Result<(String, Vec<u8>), StoreError>> + '_ {
        self.outbox.scan_prefix(prefix).map(|r| {
            let (k, v) = r?;
            Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
        })
    }

    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

/// A replay's findings on disk, in output order (the order key a caller gives, e.g.
/// time, rule and id), replaced by id: a long replay's findings never have to fit in
/// memory. Its trees are emptied when it is opened and dropped with it.
pub struct Spool {
    db: sled::Db,
    order: sled::Tree,
    ids: sled::Tree,
    len: usize,
}

const SPOOL_ORDER: &str = "spool-order";
const SPOOL_IDS: &str = "spool-ids";

impl Store {
    pub fn spool(&self) -> Result<Spool, StoreError> {
        let _ = self.db.drop_tree(SPOOL_ORDER)?;
        let _ = self.db.drop_tree(SPOOL_IDS)?;
        Ok(Spool {
            order: self.db.open_tree(SPOOL_ORDER)?,
            ids: self.db.open_tree(SPOOL_IDS)?,
            db: self.db.clone(),
            len: 0,
        })
    }
}

impl Spool {
    /// Puts `value` under `id` at `order`, replacing what `id` had; true when `id` is new.
    pub fn put(&mut self, id: &str, order: &str, value: &[u8]) -> Result<bool, StoreError> {
        let mut key = order.as_bytes().to_vec();
        key.push(0);
        key.extend_from_slice(id.as_bytes());
        let old = self.ids.insert(id.as_bytes(), key.as_slice())?;
        if let Some(old) = &old {
            if old.as_ref() != key.as_slice() {
                self.order.remove(old)?;
            }
        } else {
            self.len += 1;
        }
        self.order.insert(key, value)?;
        Ok(old.is_none())
    }

    /// The value stored under `id`.
    pub fn get(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self.ids.get(id.as_bytes())? {
            Some(key) => Ok(self.order.get(key)?.map(|v| v.to_vec())),
            None => Ok(None),
        }
    }

    pub fn remove(&mut self, id: &str) -> Result<(), StoreError> {
        if let Some(key) = self.ids.remove(id.as_bytes())? {
            self.order.remove(key)?;
            self.len -= 1;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Values in order.
    pub fn values(&self) -> impl Iterator<Item = Result<Vec<u8>, StoreError>> + '_ {
        self.order.iter().values().map(|r| Ok(r?.to_vec()))
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = self.db.drop_tree(SPOOL_ORDER);
        let _ = self.db.drop_tree(SPOOL_IDS);
    }
}

/// Serializes a stored value (JSON: readable with `baseline export`, stable across builds).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_string(),
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_is_atomic_across_trees_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.commit(&Commit {
                ledger: vec!["file:a".into()],
                failed: vec!["file:b".into()],
                partial: vec![("file:c".into(), 3)],
                stamp: 1_000,
                baselines: vec![("p".into(), Some(b"{}".to_vec()))],
                outbox: vec![("0001".into(), b"x".to_vec())],
                delivered: Vec::new(),
                state: vec![StateWrite::put("mine", "k", b"v".to_vec())],
            })
            .unwrap();
            s.flush().unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert!(s.ledger_contains("file:a").unwrap());
        assert_eq!(
            s.ledger_status("file:b").unwrap(),
            Some(LedgerStatus::Failed)
        );
        assert_eq!(s.ledger_status("file:a").unwrap(), Some(LedgerStatus::Done));
        assert_eq!(
            s.ledger_status("file:c").unwrap(),
            Some(LedgerStatus::Partial(3))
        );
        assert!(
            !s.ledger_contains("file:c").unwrap(),
            "a partly learned file is not done"
        );
        assert!(s.next_id().unwrap() < s.next_id().unwrap());
        assert_eq!(s.baseline_raw("p").unwrap().unwrap(), b"{}");
        assert_eq!(s.outbox_len(), 1);
        assert_eq!(
            s.tree("mine").unwrap().get("k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }

    #[test]
    fn the_ledger_expires_by_its_entries_time_and_stamps_old_entries() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (k, t) in [("old", 100), ("new", 5_000)] {
            s.commit(&Commit {
                ledger: vec![k.into()],
                stamp: t,
                ..Commit::default()
            })
            .unwrap();
        }
        s.ledger.insert("legacy", LEDGER_OK).unwrap();
        let p = s.prune_ledger(1_000, 9_000).unwrap();
        assert_eq!((p.removed, p.kept, p.stamped), (1, 2, 1));
        assert!(!s.ledger_contains("old").unwrap());
        assert!(s.ledger_contains("new").unwrap() && s.ledger_contains("legacy").unwrap());
        // The legacy entry now counts from 9,000.
        let p = s.prune_ledger(9_001, 20_000).unwrap();
        assert_eq!((p.removed, p.kept), (2, 0));
    }

    #[test]
    fn the_spool_keeps_order_and_replaces_by_id() {
        let s = Store::temporary().unwrap();
        let mut sp = s.spool().unwrap();
        assert!(sp.put("b", "2026-10-01T00:00:02Z", b"B").unwrap());
        assert!(sp.put("a", "2026-10-01T00:00:01Z", b"A").unwrap());
        assert!(!sp.put("b", "2026-10-01T00:00:00Z", b"B2").unwrap());
        assert_eq!(sp.len(), 2);
        let all: Vec<Vec<u8>> = sp.values().map(Result::unwrap).collect();
        assert_eq!(all, vec![b"B2".to_vec(), b"A".to_vec()]);
        assert_eq!(sp.get("a").unwrap().as_deref(), Some(&b"A"[..]));
        sp.remove("a").unwrap();
        assert_eq!(sp.len(), 1);
    }

    #[test]
    fn temporary_store_is_removed() {
        let dir;
        {
            let s = Store::temporary().unwrap();
            dir = s.dir().to_path_buf();
            assert!(dir.exists());
        }
        assert!(!dir.exists());
    }
}
