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

const LEDGER_OK: &[u8] = b"ok";
const LEDGER_FAILED: &[u8] = b"failed";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedgerStatus {
    Done,
    Failed,
}

/// Everything one processed input changes, committed atomically.
#[derive(Debug, Default)]
pub struct Commit {
    /// Ledger entries to record (e.g. `file:/path:size:mtime` or `s3:bucket/key:etag`).
    pub ledger: Vec<String>,
    /// Ledger entries of inputs that failed for good (corrupt, gone): redeliveries of
    /// them are not analyzed again.
    pub failed: Vec<String>,
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
        Self::open_inner(dir, None)
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
        Self::open_inner(&base, Some(temp))
    }

    fn open_inner(dir: &Path, temp: Option<std::sync::Arc<TempDir>>) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            dir: dir.display().to_string(),
            source,
        };
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(32 << 20)
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

    pub fn ledger_contains(&self, key: &str) -> Result<bool, StoreError> {
        Ok(self.ledger.contains_key(key)?)
    }

    /// Whether an input was processed, and how it ended.
    pub fn ledger_status(&self, key: &str) -> Result<Option<LedgerStatus>, StoreError> {
        Ok(self.ledger.get(key)?.map(|v| {
            if v.as_ref() == LEDGER_FAILED {
                LedgerStatus::Failed
            } else {
                LedgerStatus::Done
            }
        }))
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
            for k in &c.ledger {
                ledger.insert(k.as_bytes(), LEDGER_OK)?;
            }
            for k in &c.failed {
                ledger.insert(k.as_bytes(), LEDGER_FAILED)?;
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
        assert!(s.next_id().unwrap() < s.next_id().unwrap());
        assert_eq!(s.baseline_raw("p").unwrap().unwrap(), b"{}");
        assert_eq!(s.outbox_len(), 1);
        assert_eq!(
            s.tree("mine").unwrap().get("k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
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
