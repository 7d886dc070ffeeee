//! The key inventory: what each KMS key *is* (aliases, tags, state, spec, origin,
//! multi-Region layout, rotation, policy, grants), read through the KMS API per account
//! and region and cached in the state store's `inventory` tree with the time it was read.
//! CloudTrail says what happened to a key; this says what the key is, so findings can
//! carry the key's alias and tags (`enrich`) and `posture` can audit keys.
//!
//! Tree layout (values are JSON, see `store::encode`):
//! - `key/<key ARN>` -> `KeyRecord` (dropped by `invalidate` when an event changes the key)
//! - `previous/<key ARN>` -> `KeyRecord`: the record a later read replaced (one per key,
//!   see `put_after`), so remediation can still find a record read before a change once
//!   the daemon re-read the key after it
//! - `seen/<key ARN>` -> `Seen` (last time CloudTrail showed the key, and last crypto use;
//!   kept apart so a refresh or an invalidation never forgets it)
//! - `coverage` -> `Coverage` (the span of CloudTrail time the `seen` entries cover)
//! - `reported/<finding id>` -> time: posture findings the daemon's refresh has reported
//!   (so the next refresh does not report them again)
//!
//! API use per full inventory of a region: `ListKeys` and `ListAliases` once per page, then
//! per customer-managed key `DescribeKey`, `ListResourceTags`, `GetKeyPolicy`, `ListGrants`
//! (one page each for most keys) and `GetKeyRotationStatus` (symmetric `AWS_KMS` keys only,
//! the only ones that rotate automatically); AWS-managed keys get `DescribeKey` only.
//! Every call goes through `retry`: capped exponential backoff with full jitter on
//! throttling, and is counted in `ApiCalls`.
//!
//! Cross-account: keys of an account listed in `[inventory] roles` are read through that
//! role (STS AssumeRole, `aws::kms_client_as`); `refresh_region` takes the account to
//! list, `key` picks the role from the key ARN's account.
//!
//! Submodules: `api` (the KMS calls, backoff and call counts), `activity` (what CloudTrail
//! shows about keys: last seen and used, events that invalidate), `config` (`[inventory]`).

pub mod activity;
mod api;
pub mod config;

pub use activity::{invalidates, Activity, KeyActivity, INVALIDATING_EVENTS, USE_EVENTS};
pub use api::{retry, ApiCalls, Backoff};
pub use config::{InventoryConfig, RawInventory};

use crate::analyze::finding::Finding;
use crate::store::{self, StateWrite, Store, StoreError};
use api::{list_aliases, list_keys, read_key};
use aws_config::SdkConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// The store tree the inventory lives in.
pub const TREE: &str = "inventory";

/// Key prefix of the posture findings the daemon reported (value: when).
pub const REPORTED: &str = "reported/";

/// Key prefix of a key's current record.
pub const KEY: &str = "key/";

/// Key prefix of the record a later read of the key replaced (at most one per key).
pub const PREVIOUS: &str = "previous/";

/// Key prefix of the CloudTrail activity per key (`Seen`).
pub const SEEN: &str = "seen/";

/// At most this many keys have their CloudTrail activity recorded (`seen/`): events can
/// name any key id, and the store must not grow with them without bound. Keys already
/// recorded are still updated past the cap.
pub const MAX_SEEN_KEYS: usize = 100_000;

/// What `Inventory::activity_writes` makes of a scan.
#[derive(Debug, Default)]
pub struct ActivityWrites {
    pub writes: Vec<StateWrite>,
    /// Cached records dropped because an event newer than them changed their key.
    pub invalidated: usize,
    /// Keys recorded for the first time.
    pub new_keys: usize,
    /// Keys not recorded because `MAX_SEEN_KEYS` was reached.
    pub dropped: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("KMS {op} in {region} failed: {message}")]
    Api {
        op: &'static str,
        region: String,
        /// The AWS error code (`AccessDeniedException`, `NotFoundException` ...), when
        /// the service answered; None when it could not be reached.
        code: Option<String>,
        message: String,
    },
    #[error("no AWS access configured: the key inventory needs the KMS API")]
    Offline,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl InventoryError {
    /// The service never answered (no endpoint, no credentials, network): further calls
    /// would fail the same way, so callers stop trying.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, InventoryError::Offline)
            || matches!(self, InventoryError::Api { code: None, .. })
    }
}

/// A grant on a key (what posture needs of it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub grant_id: String,
    pub grantee: Option<String>,
    pub retiring: Option<String>,
    pub operations: Vec<String>,
}

/// A multi-Region key's layout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultiRegion {
    /// This key is the primary (its ARN is the primary's ARN).
    pub is_primary: bool,
    pub primary_arn: Option<String>,
    pub primary_region: Option<String>,
    pub replica_regions: Vec<String>,
}

/// What the KMS API says about one key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyRecord {
    pub arn: String,
    pub key_id: String,
    pub account: String,
    pub region: String,
    /// Alias names (`alias/...`), sorted.
    pub aliases: Vec<String>,
    pub tags: BTreeMap<String, String>,
    /// `Enabled`, `Disabled`, `PendingDeletion`, `PendingImport`, ...
    pub state: String,
    /// `CUSTOMER` or `AWS`.
    pub manager: String,
    pub spec: String,
    pub usage: String,
    /// `AWS_KMS`, `EXTERNAL`, `AWS_CLOUDHSM`, `EXTERNAL_KEY_STORE`.
    pub origin: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_key_store_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multi_region: Option<MultiRegion>,
    /// None when not applicable (asymmetric, HMAC, imported or custom-store keys) or unreadable.
    #[serde(default)]
    pub rotation_enabled: Option<bool>,
    #[serde(default)]
    pub rotation_period_days: Option<i32>,
    /// The `default` key policy as JSON text; None when it could not be read.
    #[serde(default)]
    pub policy: Option<String>,
    /// None when the grants could not be read.
    #[serde(default)]
    pub grants: Option<Vec<GrantRecord>>,
    #[serde(default)]
    pub creation_date: Option<String>,
    #[serde(default)]
    pub deletion_date: Option<String>,
    /// When this record was read from the API (UTC, `YYYY-MM-DDTHH:MM:SSZ`).
    pub refreshed_at: String,
    /// Parts that could not be read (`GetKeyPolicy: AccessDeniedException`, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

impl KeyRecord {
    pub fn is_customer_managed(&self) -> bool {
        self.manager == "CUSTOMER"
    }

    pub fn grants_count(&self) -> Option<usize> {
        self.grants.as_ref().map(Vec::len)
    }
}

/// When CloudTrail last showed a key (any event) and last showed it used (crypto ops).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub last_used: Option<String>,
}

/// The span of CloudTrail time recorded into `seen` (over every replay with this state).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub from: Option<String>,
    pub until: Option<String>,
}

/// Options of an inventory.
#[derive(Debug, Clone, Copy)]
pub struct InventoryOptions {
    /// Cached records younger than this are used without calling the API.
    pub max_age: Duration,
    pub backoff: Backoff,
    /// Keys read at once per region.
    pub concurrency: usize,
}

impl Default for InventoryOptions {
    fn default() -> Self {
        InventoryOptions {
            max_age: Duration::from_secs(3600),
            backoff: Backoff::default(),
            concurrency: 8,
        }
    }
}

/// What a full read of one region gave.
#[derive(Debug, Default)]
pub struct RegionInventory {
    pub region: String,
    pub keys: Vec<KeyRecord>,
    /// Keys listed but not described, with why.
    pub failures: Vec<(String, InventoryError)>,
    /// Records served from the cache instead of the API.
    pub from_cache: usize,
}

/// What `enrich_all` did.
#[derive(Debug, Default)]
pub struct EnrichReport {
    pub enriched: usize,
    pub keys_read: usize,
    /// The first problem, when some keys could not be read (for one warning).
    pub problem: Option<String>,
    /// The API could not be reached at all (enrichment stopped there).
    pub unreachable: bool,
}

/// The key inventory over a state store and (when online) the KMS API.
pub struct Inventory {
    store: Store,
    sdk: Option<SdkConfig>,
    opts: InventoryOptions,
    /// Clients per (account listed in `roles`, or "" for the default credentials; region).
    clients: tokio::sync::Mutex<HashMap<(String, String), aws_sdk_kms::Client>>,
    roles: crate::aws::Roles,
    calls: Arc<ApiCalls>,
}

impl Inventory {
    /// An inventory over `store`; `sdk` None means offline (only the cache is read).
    pub fn new(store: Store, sdk: Option<SdkConfig>, opts: InventoryOptions) -> Inventory {
        Inventory {
            store,
            sdk,
            opts,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            roles: Default::default(),
            calls: Arc::new(ApiCalls::default()),
        }
    }

    /// Reads the keys of the accounts in `roles` through their role.
    pub fn with_roles(mut self, roles: crate::aws::Roles) -> Inventory {
        self.roles = roles;
        self
    }

    /// The accounts reached through a role (the default credentials' own account aside).
    pub fn role_accounts(&self) -> impl Iterator<Item = &str> {
        self.roles.keys().map(String::as_str)
    }

    /// The role ARN through which `account`'s keys are read, if any.
    pub fn role_of(&self, account: &str) -> Option<&str> {
        self.roles.get(account).map(String::as_str)
    }

    pub fn calls(&self) -> &ApiCalls {
        &self.calls
    }

    /// The KMS client for `account`'s keys in `region`: through the account's role when
    /// `roles` lists it, else with the default credentials.
    async fn client(
        &self,
        account: Option<&str>,
        region: &str,
    ) -> Result<aws_sdk_kms::Client, InventoryError> {
        let sdk = self.sdk.as_ref().ok_or(InventoryError::Offline)?;
        let role = account.and_then(|a| self.roles.get_key_value(a));
        let slot = (
            role.map(|(a, _)| a.clone()).unwrap_or_default(),
            region.to_string(),
        );
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&slot) {
            return Ok(c.clone());
        }
        // `retry` is the one retry layer: the SDK's own would hide throttling from the
        // backoff and from the call counts (kms_client_as turns it off).
        let client = crate::aws::kms_client_as(
            sdk,
            region,
            role.map(|(_, r)| r.as_str()),
            "kmsguard-inventory",
        )
        .await;
        clients.insert(slot, client.clone());
        Ok(client)
    }

    fn get_json<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let tree = self.store.tree(TREE)?;
        match tree.get(key.as_bytes()).map_err(StoreError::from)? {
            Some(v) => Ok(Some(store::decode(TREE, key, &v)?)),
            None => Ok(None),
        }
    }

    fn put_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let tree = self.store.tree(TREE)?;
        tree.insert(key.as_bytes(), store::encode(value))
            .map_err(StoreError::from)?;
        Ok(())
    }

    /// The cached record of a key, whatever its age.
    pub fn cached(&self, key_arn: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.get_json(&format!("key/{key_arn}"))
    }

    /// The record read before the current one (`previous/`), whatever its age.
    pub fn previous(&self, key_arn: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.get_json(&format!("{PREVIOUS}{key_arn}"))
    }

    /// The key's current and previous records (those there are), newest first.
    pub fn records(&self, key_arn: &str) -> Result<Vec<KeyRecord>, StoreError> {
        let mut out: Vec<KeyRecord> = self
            .cached(key_arn)?
            .into_iter()
            .chain(self.previous(key_arn)?)
            .collect();
        out.sort_by(|a, b| b.refreshed_at.cmp(&a.refreshed_at));
        Ok(out)
    }

    /// Stores a key's record read from the API (`put_after` without a known change).
    pub fn put(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.put_after(rec, None)
    }

    /// Stores a key's record and keeps one record it replaces as `previous/`: the
    /// newest of the replaced record and the kept previous one that was read at or
    /// before `changed_at` (the change that made the caller re-read the key: that one
    /// still shows the key before it), else the replaced record. Atomic (one sled
    /// transaction), so a scheduled refresh and a re-read of the same key cannot lose
    /// a record between them.
    pub fn put_after(&self, rec: &KeyRecord, changed_at: Option<&str>) -> Result<(), StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        let tree = self.store.tree(TREE)?;
        let (kk, pk) = (
            format!("{KEY}{}", rec.arn),
            format!("{PREVIOUS}{}", rec.arn),
        );
        let value = store::encode(rec);
        let result: Result<(), TransactionError<()>> = tree.transaction(|t| {
            let read = |k: &str| -> Result<Option<KeyRecord>, ConflictableTransactionError<()>> {
                Ok(t.get(k.as_bytes())?
                    .and_then(|v| store::decode::<KeyRecord>(TREE, k, &v).ok()))
            };
            // Of two records, the one to keep as `previous/`: one read at or before the
            // change over one read after it, else the newer.
            let before_change =
                |r: &KeyRecord| changed_at.is_some_and(|c| r.refreshed_at.as_str() <= c);
            let choose = |a: KeyRecord, b: KeyRecord| match (before_change(&a), before_change(&b)) {
                (true, false) => a,
                (false, true) => b,
                _ if b.refreshed_at > a.refreshed_at => b,
                _ => a,
            };
            let Some(current) = read(&kk)? else {
                t.insert(kk.as_bytes(), value.clone())?;
                return Ok(());
            };
            let previous = read(&pk)?;
            if current.refreshed_at > rec.refreshed_at {
                // A newer read was stored first (a refresh and a re-read overlapping):
                // it stays current, and this older one may still be the record before.
                let keep = match previous {
                    Some(p) => choose(rec.clone(), p),
                    None => rec.clone(),
                };
                t.insert(pk.as_bytes(), store::encode(&keep))?;
                return Ok(());
            }
            let keep = match previous {
                Some(p) => choose(current, p),
                None => current,
            };
            t.insert(pk.as_bytes(), store::encode(&keep))?;
            t.insert(kk.as_bytes(), value.clone())?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
            Err(TransactionError::Abort(())) => Err(StoreError::Sled(sled::Error::ReportableBug(
                "transaction aborted".into(),
            ))),
        }
    }

    /// Drops a key's cached record (an event changed the key); true when there was one.
    pub fn invalidate(&self, key_arn: &str) -> Result<bool, StoreError> {
        let tree = self.store.tree(TREE)?;
        Ok(tree
            .remove(format!("key/{key_arn}").as_bytes())
            .map_err(StoreError::from)?
            .is_some())
    }

    /// Records that CloudTrail showed the key at `time` (kept: the latest).
    pub fn record_seen(&self, key_arn: &str, time: &str) -> Result<(), StoreError> {
        self.record(key_arn, time, false)
    }

    /// Records that CloudTrail showed the key used by a crypto operation at `time`.
    pub fn record_used(&self, key_arn: &str, time: &str) -> Result<(), StoreError> {
        self.record(key_arn, time, true)
    }

    fn record(&self, key_arn: &str, time: &str, used: bool) -> Result<(), StoreError> {
        let k = format!("{SEEN}{key_arn}");
        let mut seen: Seen = self.get_json(&k)?.unwrap_or_default();
        let later = |old: &Option<String>| old.as_deref().is_none_or(|o| o < time);
        let mut changed = false;
        if later(&seen.last_seen) {
            seen.last_seen = Some(time.to_string());
            changed = true;
        }
        if used && later(&seen.last_used) {
            seen.last_used = Some(time.to_string());
            changed = true;
        }
        if changed {
            self.put_json(&k, &seen)?;
        }
        Ok(())
    }

    pub fn seen(&self, key_arn: &str) -> Result<Seen, StoreError> {
        Ok(self
            .get_json(&format!("{SEEN}{key_arn}"))?
            .unwrap_or_default())
    }

    pub fn coverage(&self) -> Result<Coverage, StoreError> {
        Ok(self.get_json("coverage")?.unwrap_or_default())
    }

    /// How many keys have recorded CloudTrail activity (`seen/`); one scan of the prefix.
    pub fn seen_count(&self) -> Result<usize, StoreError> {
        let tree = self.store.tree(TREE)?;
        let mut n = 0;
        for kv in tree.scan_prefix(SEEN) {
            kv.map_err(StoreError::from)?;
            n += 1;
        }
        Ok(n)
    }

    /// The state writes that record what a scan of CloudTrail saw: last-seen and
    /// last-used times per key (a key the store has no entry for yet is added only while
    /// fewer than `room` were added, so the `seen/` entries stay at most
    /// `MAX_SEEN_KEYS`), the coverage, and, with `invalidate`, the removal of cached
    /// records older than an event that changed their key. Nothing is written: commit
    /// the writes (with a file's other effects, in the daemon).
    pub fn activity_writes(
        &self,
        activity: &Activity,
        invalidate: bool,
        room: usize,
    ) -> Result<ActivityWrites, StoreError> {
        let mut out = ActivityWrites::default();
        let mut arns: Vec<&String> = activity
            .keys
            .keys()
            .filter(|a| region_of_arn(a).is_some())
            .collect();
        arns.sort();
        for arn in arns {
            let a = &activity.keys[arn];
            let k = format!("{SEEN}{arn}");
            let stored: Option<Seen> = self.get_json(&k)?;
            let known = stored.is_some();
            let mut seen = stored.unwrap_or_default();
            let later = |old: &Option<String>, t: &Option<String>| match t {
                Some(t) if old.as_deref().is_none_or(|o| o < t.as_str()) => Some(t.clone()),
                _ => None,
            };
            let mut changed = false;
            if let Some(t) = later(&seen.last_seen, &a.last_seen) {
                seen.last_seen = Some(t);
                changed = true;
            }
            if let Some(t) = later(&seen.last_used, &a.last_used) {
                seen.last_used = Some(t);
                changed = true;
            }
            if changed {
                if !known && out.new_keys >= room {
                    out.dropped += 1;
                } else {
                    out.new_keys += usize::from(!known);
                    out.writes
                        .push(StateWrite::put(TREE, k, store::encode(&seen)));
                }
            }
            if let (true, Some(changed)) = (invalidate, &a.last_change) {
                // A record read after the change already shows it; only older ones go.
                // It stops serving enrichment but is kept as `previous/`: it is the key
                // before the change, which remediation's "state before" asks for.
                if let Some(r) = self
                    .cached(arn)?
                    .filter(|r| r.refreshed_at.as_str() <= changed.as_str())
                {
                    out.writes.push(StateWrite::put(
                        TREE,
                        format!("{PREVIOUS}{arn}"),
                        store::encode(&r),
                    ));
                    out.writes
                        .push(StateWrite::delete(TREE, format!("{KEY}{arn}")));
                    out.invalidated += 1;
                }
            }
        }
        if let (Some(from), Some(until)) = (&activity.from, &activity.until) {
            let mut c = self.coverage()?;
            let before = c.clone();
            if c.from.as_deref().is_none_or(|f| from.as_str() < f) {
                c.from = Some(from.clone());
            }
            if c.until.as_deref().is_none_or(|u| until.as_str() > u) {
                c.until = Some(until.clone());
            }
            if c != before {
                out.writes
                    .push(StateWrite::put(TREE, "coverage", store::encode(&c)));
            }
        }
        Ok(out)
    }

    /// Applies what a scan of CloudTrail saw (`activity_writes`, with invalidation), in
    /// one transaction. Returns how many records were invalidated.
    pub fn apply_activity(&self, activity: &Activity) -> Result<usize, StoreError> {
        let room = MAX_SEEN_KEYS.saturating_sub(self.seen_count()?);
        let w = self.activity_writes(activity, true, room)?;
        self.store.commit(&store::Commit {
            state: w.writes,
            ..Default::default()
        })?;
        Ok(w.invalidated)
    }

    /// A key's record: from the cache when younger than `max_age`, else from the API
    /// (and then cached).
    pub async fn key(&self, key_arn: &str) -> Result<KeyRecord, InventoryError> {
        if let Some(rec) = self.cached(key_arn)? {
            if is_fresh(&rec, self.opts.max_age, now_secs()) {
                return Ok(rec);
            }
        }
        let rec = self.read(key_arn).await?;
        self.put(&rec)?;
        Ok(rec)
    }

    /// Re-reads a key from the API whatever the cache holds, after a CloudTrail event
    /// at `changed_at` changed it (the daemon's targeted re-read), and stores the record
    /// (`put_after`: the record read before the change stays as `previous/`).
    pub async fn reread(
        &self,
        key_arn: &str,
        changed_at: &str,
    ) -> Result<KeyRecord, InventoryError> {
        let rec = self.read(key_arn).await?;
        self.put_after(&rec, Some(changed_at))?;
        Ok(rec)
    }

    /// Reads one key from the API (DescribeKey, tags, rotation, policy, grants, and its
    /// aliases), through its account's role when `roles` lists it. Stores nothing.
    async fn read(&self, key_arn: &str) -> Result<KeyRecord, InventoryError> {
        let region = region_of_arn(key_arn).ok_or_else(|| InventoryError::Api {
            op: "DescribeKey",
            region: "?".into(),
            code: Some("InvalidArn".into()),
            message: format!("`{key_arn}` is not a KMS key ARN"),
        })?;
        let client = self.client(account_of_arn(key_arn), region).await?;
        let mut rec = read_key(
            &client,
            region,
            key_arn,
            Vec::new(),
            &self.calls,
            &self.opts.backoff,
        )
        .await?;
        // ListAliases works only in the caller's own account: a key another account lets
        // us describe keeps its record, without aliases.
        match list_aliases(
            &client,
            region,
            &self.calls,
            &self.opts.backoff,
            Some(&rec.arn),
        )
        .await
        {
            Ok(mut by_key) => rec.aliases = by_key.remove(&rec.key_id).unwrap_or_default(),
            Err(e) if e.is_unreachable() => return Err(e),
            Err(e) => rec.errors.push(e.to_string()),
        }
        Ok(rec)
    }

    /// Reads every key of `region` (pages of ListKeys and ListAliases, then each key,
    /// `concurrency` at a time), caching what it reads: the keys of `account` through its
    /// role, or (None) those the default credentials list. Keys that fail are listed in
    /// `failures`; a failure to list at all is an error.
    pub async fn refresh_region(
        &self,
        account: Option<&str>,
        region: &str,
    ) -> Result<RegionInventory, InventoryError> {
        let client = self.client(account, region).await?;
        let backoff = self.opts.backoff;
        let arns = list_keys(&client, region, &self.calls, &backoff).await?;
        let mut aliases = list_aliases(&client, region, &self.calls, &backoff, None).await?;
        let now = now_secs();
        let mut out = RegionInventory {
            region: region.to_string(),
            ..Default::default()
        };
        let mut todo = Vec::new();
        for arn in arns {
            let key_aliases = aliases.remove(key_id_of_arn(&arn)).unwrap_or_default();
            match self.cached(&arn)? {
                Some(rec)
                    if is_fresh(&rec, self.opts.max_age, now) && rec.aliases == key_aliases =>
                {
                    out.from_cache += 1;
                    out.keys.push(rec);
                }
                _ => todo.push((arn, key_aliases)),
            }
        }
        let sem = Arc::new(tokio::sync::Semaphore::new(self.opts.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (arn, key_aliases) in todo {
            let (client, calls, sem, region) = (
                client.clone(),
                self.calls.clone(),
                sem.clone(),
                region.to_string(),
            );
            tasks.spawn(async move {
                let _permit = sem.acquire_owned().await;
                let r = read_key(&client, &region, &arn, key_aliases, &calls, &backoff).await;
                (arn, r)
            });
        }
        while let Some(joined) = tasks.join_next().await {
            let Ok((arn, r)) = joined else { continue };
            match r {
                Ok(rec) => {
                    self.put(&rec)?;
                    out.keys.push(rec);
                }
                Err(e) => out.failures.push((arn, e)),
            }
        }
        out.keys.sort_by(|a, b| a.arn.cmp(&b.arn));
        Ok(out)
    }

    /// Adds the alias and tags of the finding's first key with a cached record, whatever
    /// its age, without calling the API (the daemon's analyzer). Returns whether it did.
    pub fn enrich_cached(&self, f: &mut Finding) -> Result<bool, StoreError> {
        for arn in &f.keys {
            if region_of_arn(arn).is_none() {
                continue;
            }
            if let Some(rec) = self.cached(arn)? {
                apply(f, &rec);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Ids of the posture findings already reported by the daemon's scheduled refresh
    /// (`reported/<id>`; see `posture::news`).
    pub fn reported(&self) -> Result<std::collections::BTreeSet<String>, StoreError> {
        let tree = self.store.tree(TREE)?;
        let mut out = std::collections::BTreeSet::new();
        for kv in tree.scan_prefix(REPORTED) {
            let (k, _) = kv.map_err(StoreError::from)?;
            out.insert(String::from_utf8_lossy(&k[REPORTED.len()..]).into_owned());
        }
        Ok(out)
    }

    /// Adds the alias and tags of the finding's first key the inventory knows. Returns
    /// whether the finding changed.
    pub async fn enrich(&self, f: &mut Finding) -> Result<bool, InventoryError> {
        self.enrich_with(f, &mut std::collections::HashSet::new())
            .await
    }

    /// `enrich`, skipping keys in `failed` and adding those that fail (so a key that
    /// cannot be read costs one attempt per run, not one per finding).
    async fn enrich_with(
        &self,
        f: &mut Finding,
        failed: &mut std::collections::HashSet<String>,
    ) -> Result<bool, InventoryError> {
        let mut last_err = None;
        for arn in &f.keys {
            if region_of_arn(arn).is_none() || failed.contains(arn) {
                continue;
            }
            match self.key(arn).await {
                Ok(rec) => {
                    apply(f, &rec);
                    return Ok(true);
                }
                Err(e) if e.is_unreachable() => return Err(e),
                Err(e) => {
                    failed.insert(arn.clone());
                    last_err = Some(e);
                }
            }
        }
        match last_err {
            Some(e) => Err(e),
            None => Ok(false),
        }
    }

    /// Enriches every finding; stops calling the API at the first sign that it cannot be
    /// reached (the findings stay as they are, and the report says why).
    pub async fn enrich_all(&self, findings: &mut [Finding]) -> EnrichReport {
        let mut report = EnrichReport::default();
        let mut failed = std::collections::HashSet::new();
        for f in findings.iter_mut() {
            match self.enrich_with(f, &mut failed).await {
                Ok(true) => report.enriched += 1,
                Ok(false) => {}
                Err(e) => {
                    let unreachable = e.is_unreachable();
                    if report.problem.is_none() {
                        report.problem = Some(e.to_string());
                    }
                    if unreachable {
                        report.unreachable = true;
                        break;
                    }
                }
            }
        }
        report.keys_read = self
            .calls
            .by_operation()
            .get("DescribeKey")
            .copied()
            .unwrap_or(0) as usize;
        report
    }
}

/// Copies a key record's alias (the first; all of them for rules' `key:alias`) and tags
/// into a finding.
pub fn apply(f: &mut Finding, rec: &KeyRecord) {
    f.key_alias = rec.aliases.first().cloned();
    f.key_tags = rec.tags.clone();
    // Rules' `key:alias` sees every alias, not only the one shown.
    f.pending.set_key_aliases(&rec.aliases);
}

fn is_fresh(rec: &KeyRecord, max_age: Duration, now: i64) -> bool {
    parse_time(&rec.refreshed_at).is_some_and(|t| now.saturating_sub(t) < max_age.as_secs() as i64)
}

/// The region field of a KMS key ARN.
pub fn region_of_arn(arn: &str) -> Option<&str> {
    let mut parts = arn.split(':');
    (parts.next()? == "arn").then_some(())?;
    let _partition = parts.next()?;
    (parts.next()? == "kms").then_some(())?;
    let region = parts.next()?;
    let _account = parts.next()?;
    let resource = parts.next()?;
    (resource.starts_with("key/") && !region.is_empty()).then_some(region)
}

/// The account field of a KMS key ARN.
pub fn account_of_arn(arn: &str) -> Option<&str> {
    region_of_arn(arn)?;
    arn.split(':').nth(4).filter(|a| !a.is_empty())
}

/// The key id at the end of a key ARN (the ARN itself when it has no `key/`).
pub fn key_id_of_arn(arn: &str) -> &str {
    arn.rsplit_once(":key/").map_or(arn, |(_, id)| id)
}
/// Seconds since the Unix epoch, now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Unix seconds of a CloudTrail/RFC 3339 time (see `crate::clock`).
pub fn parse_time(s: &str) -> Option<i64> {
    crate::clock::parse_rfc3339(s)
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_time(secs: i64) -> String {
    crate::clock::format_unix(secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        for s in [
            "1970-01-01T00:00:00Z",
            "2026-11-29T03:15:27Z",
            "2000-02-29T23:59:59Z",
        ] {
            let t = parse_time(s).unwrap();
            assert_eq!(format_time(t), s);
        }
        assert_eq!(parse_time("2026-11-29T03:15:27Z"), Some(1_795_922_127));
        assert_eq!(
            parse_time("2026-11-29T03:15:27.123Z"),
            parse_time("2026-11-29T03:15:27Z")
        );
        assert_eq!(parse_time("2026-13-29T03:15:27Z"), None);
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(
            parse_time("2026-11-29T03:15:27+01:00"),
            Some(1_795_922_127 - 3600),
            "offsets are honoured"
        );
    }

    #[test]
    fn arns() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234";
        assert_eq!(region_of_arn(arn), Some("eu-west-1"));
        assert_eq!(account_of_arn(arn), Some("111122223333"));
        assert_eq!(account_of_arn("arn:aws:kms:eu-west-1::alias/x"), None);
        assert_eq!(key_id_of_arn(arn), "mrk-1234");
        assert_eq!(
            region_of_arn("arn:aws:kms:eu-west-1:111122223333:alias/x"),
            None
        );
        assert_eq!(region_of_arn("1234"), None);
    }

    #[test]
    fn seen_keeps_the_latest_and_invalidation_respects_refresh_time() {
        let store = Store::temporary().unwrap();
        let inv = Inventory::new(store, None, InventoryOptions::default());
        let arn = "arn:aws:kms:us-east-1:111122223333:key/k1";
        inv.record_seen(arn, "2026-01-02T00:00:00Z").unwrap();
        inv.record_used(arn, "2026-01-01T00:00:00Z").unwrap();
        inv.record_seen(arn, "2025-12-01T00:00:00Z").unwrap();
        let s = inv.seen(arn).unwrap();
        assert_eq!(s.last_seen.as_deref(), Some("2026-01-02T00:00:00Z"));
        assert_eq!(s.last_used.as_deref(), Some("2026-01-01T00:00:00Z"));

        let rec = KeyRecord {
            arn: arn.into(),
            refreshed_at: "2026-01-05T00:00:00Z".into(),
            ..Default::default()
        };
        inv.put(&rec).unwrap();
        let mut act = Activity::default();
        act.keys.insert(
            arn.into(),
            KeyActivity {
                last_change: Some("2026-01-04T00:00:00Z".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            inv.apply_activity(&act).unwrap(),
            0,
            "older change keeps the record"
        );
        act.keys.get_mut(arn).unwrap().last_change = Some("2026-01-06T00:00:00Z".into());
        assert_eq!(inv.apply_activity(&act).unwrap(), 1);
        assert!(inv.cached(arn).unwrap().is_none());
        assert_eq!(
            inv.previous(arn).unwrap().map(|r| r.refreshed_at),
            Some(rec.refreshed_at.clone()),
            "the record from before the change is kept for remediation"
        );
        assert!(!inv.invalidate(arn).unwrap());
        assert_eq!(
            inv.seen(arn).unwrap().last_seen.as_deref(),
            Some("2026-01-02T00:00:00Z")
        );
    }

    #[test]
    fn a_replaced_record_is_kept_as_previous_the_one_read_before_the_change_first() {
        let store = Store::temporary().unwrap();
        let inv = Inventory::new(store, None, InventoryOptions::default());
        let arn = "arn:aws:kms:us-east-1:111122223333:key/k1";
        let rec = |at: &str, state: &str| KeyRecord {
            arn: arn.into(),
            state: state.into(),
            refreshed_at: at.into(),
            ..Default::default()
        };
        let times = |inv: &Inventory| -> Vec<String> {
            inv.records(arn)
                .unwrap()
                .into_iter()
                .map(|r| r.refreshed_at)
                .collect()
        };
        // A first record has nothing to keep.
        inv.put(&rec("2026-01-01T00:00:00Z", "Enabled")).unwrap();
        assert!(inv.previous(arn).unwrap().is_none());
        // A scheduled read keeps the one it replaces.
        inv.put(&rec("2026-01-02T00:00:00Z", "Enabled")).unwrap();
        assert_eq!(
            times(&inv),
            ["2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z"]
        );
        // A re-read after a change at 01-03: the record it replaces was read before it.
        inv.put_after(
            &rec("2026-01-04T00:00:00Z", "Disabled"),
            Some("2026-01-03T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            times(&inv),
            ["2026-01-04T00:00:00Z", "2026-01-02T00:00:00Z"]
        );
        // Another re-read for the same change (a second file, or a file late after the
        // re-read): the current record already shows the change, the previous one is
        // still the last read before it, and stays.
        inv.put_after(
            &rec("2026-01-05T00:00:00Z", "Disabled"),
            Some("2026-01-03T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            times(&inv),
            ["2026-01-05T00:00:00Z", "2026-01-02T00:00:00Z"]
        );
        assert_eq!(inv.previous(arn).unwrap().unwrap().state, "Enabled");
        // A change after both: the current record was read before it and becomes previous.
        inv.put_after(
            &rec("2026-01-07T00:00:00Z", "Enabled"),
            Some("2026-01-06T00:00:00Z"),
        )
        .unwrap();
        assert_eq!(
            times(&inv),
            ["2026-01-07T00:00:00Z", "2026-01-05T00:00:00Z"]
        );
        assert_eq!(inv.cached(arn).unwrap().unwrap().state, "Enabled");
        // A scheduled refresh that read the key before that re-read but stores it after
        // (the two run side by side): the newer record stays current.
        inv.put(&rec("2026-01-06T12:00:00Z", "Disabled")).unwrap();
        assert_eq!(
            times(&inv),
            ["2026-01-07T00:00:00Z", "2026-01-06T12:00:00Z"]
        );
        assert_eq!(inv.cached(arn).unwrap().unwrap().state, "Enabled");
    }

    #[test]
    fn activity_writes_are_bounded_by_room_and_update_known_keys() {
        let store = Store::temporary().unwrap();
        let inv = Inventory::new(store.clone(), None, InventoryOptions::default());
        let arn = |k: &str| format!("arn:aws:kms:us-east-1:111122223333:key/{k}");
        let seen = |t: &str| KeyActivity {
            last_seen: Some(t.into()),
            last_used: Some(t.into()),
            ..Default::default()
        };
        let mut act = Activity::default();
        for k in ["a", "b", "c"] {
            act.keys.insert(arn(k), seen("2026-01-01T00:00:00Z"));
        }
        act.keys
            .insert("alias/not-a-key".into(), seen("2026-01-01T00:00:00Z"));
        act.from = Some("2026-01-01T00:00:00Z".into());
        act.until = act.from.clone();
        let w = inv.activity_writes(&act, false, 2).unwrap();
        assert_eq!((w.new_keys, w.dropped), (2, 1));
        store
            .commit(&store::Commit {
                state: w.writes,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(inv.seen_count().unwrap(), 2);
        assert!(inv.coverage().unwrap().from.is_some());
        // Past the cap, keys already recorded still move forward; new ones do not come in.
        for a in act.keys.values_mut() {
            *a = seen("2026-02-01T00:00:00Z");
        }
        let w = inv.activity_writes(&act, false, 0).unwrap();
        assert_eq!((w.new_keys, w.dropped), (0, 1));
        store
            .commit(&store::Commit {
                state: w.writes,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(inv.seen_count().unwrap(), 2);
        assert_eq!(
            inv.seen(&arn("a")).unwrap().last_used.as_deref(),
            Some("2026-02-01T00:00:00Z")
        );
        assert_eq!(inv.seen(&arn("c")).unwrap(), Seen::default());
        // Nothing new: nothing to write.
        assert!(inv
            .activity_writes(&act, false, 0)
            .unwrap()
            .writes
            .is_empty());
    }
}
