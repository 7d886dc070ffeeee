//! The key inventory: what each KMS key *is* (aliases, tags, state, spec, origin,
//! multi-Region layout, rotation, policy, grants), read through the KMS API per account
//! and region and cached in the state store's `inventory` tree with the time it was read.
//! CloudTrail says what happened to a key; this says what the key is, so findings can
//! carry the key's alias and tags (`enrich`) and `posture` can audit keys.
//!
//! Tree layout (values are JSON, see `store::encode`):
//! - `key/<key ARN>` -> `KeyRecord` (dropped by `invalidate` when an event changes the key)
//! - `seen/<key ARN>` -> `Seen` (last time CloudTrail showed the key, and last crypto use;
//!   kept apart so a refresh or an invalidation never forgets it)
//! - `coverage` -> `Coverage` (the span of CloudTrail time the `seen` entries cover)
//!
//! API use per full inventory of a region: `ListKeys` and `ListAliases` once per page, then
//! per customer-managed key `DescribeKey`, `ListResourceTags`, `GetKeyPolicy`, `ListGrants`
//! (one page each for most keys) and `GetKeyRotationStatus` (symmetric `AWS_KMS` keys only,
//! the only ones that rotate automatically); AWS-managed keys get `DescribeKey` only.
//! Every call goes through `retry`: capped exponential backoff with full jitter on
//! throttling, and is counted in `ApiCalls`.

use crate::analyze::finding::Finding;
use crate::decode::{DecodeLimits, Decoder};
use crate::event::Event;
use crate::source::LogFile;
use crate::store::{self, Store, StoreError};
use aws_config::SdkConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The store tree the inventory lives in.
pub const TREE: &str = "inventory";

/// CloudTrail events that change what the inventory knows about a key: seeing one newer
/// than a cached record drops that record, so the next read goes to the API.
pub const INVALIDATING_EVENTS: [&str; 16] = [
    "TagResource",
    "UntagResource",
    "PutKeyPolicy",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "ReplicateKey",
    "UpdatePrimaryRegion",
    "DisableKey",
    "EnableKey",
    "CreateGrant",
    "RevokeGrant",
];

/// Whether an event of this name changes a key's inventory record.
pub fn invalidates(event_name: &str) -> bool {
    INVALIDATING_EVENTS.contains(&event_name)
}

/// Cryptographic operations: what "the key is in use" means for posture (a scanner's
/// `DescribeKey` every hour must not make an abandoned key look used).
pub const USE_EVENTS: [&str; 12] = [
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "Sign",
    "Verify",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
];

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

/// API calls made, per operation (every attempt counts, retries included).
#[derive(Debug, Default)]
pub struct ApiCalls {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    throttled: AtomicU64,
}

impl ApiCalls {
    fn count(&self, op: &'static str) {
        if let Ok(mut m) = self.counts.lock() {
            *m.entry(op).or_default() += 1;
        }
    }

    pub fn by_operation(&self) -> BTreeMap<&'static str, u64> {
        self.counts.lock().map(|m| m.clone()).unwrap_or_default()
    }

    pub fn total(&self) -> u64 {
        self.by_operation().values().sum()
    }

    /// Attempts that were throttled and retried.
    pub fn throttled(&self) -> u64 {
        self.throttled.load(Ordering::Relaxed)
    }
}

/// Capped exponential backoff with full jitter: attempt n sleeps a random time in
/// `[0, min(cap, base * 2^n))`, so many callers throttled together spread out.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(20),
            max_attempts: 8,
        }
    }
}

impl Backoff {
    /// The sleep before retry number `retry` (0-based), with `jitter` in [0, 1).
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(30)).unwrap_or(u32::MAX))
            .min(self.cap);
        ceiling.mul_f64(jitter.clamp(0.0, 1.0))
    }
}

/// A number in [0, 1) for jitter: xorshift over a per-process counter and the clock (no
/// cryptographic quality needed, only callers that do not move in lockstep).
fn jitter() -> f64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = STATE
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(nanos)
        | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs `call` until it succeeds, fails with an error `retryable` rejects, or
/// `backoff.max_attempts` are spent; sleeps between attempts as `Backoff` says.
pub async fn retry<T, E, F, Fut>(
    backoff: &Backoff,
    retryable: impl Fn(&E) -> bool,
    mut on_attempt: impl FnMut(u32),
    mut call: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        on_attempt(attempt);
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt + 1 < backoff.max_attempts && retryable(&e) => {
                tokio::time::sleep(backoff.delay(attempt, jitter())).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Error codes KMS (and the SDK) use for "slow down" or a passing server-side problem.
const RETRYABLE_CODES: [&str; 6] = [
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "KMSInternalException",
    "DependencyTimeoutException",
];

/// Throttling, a passing server-side error, or a timeout. A refused connection or missing
/// credentials is not retried: it will not get better in a few seconds, and callers
/// degrade on it at once.
fn sdk_retryable<E: ProvideErrorMetadata>(
    e: &SdkError<E, aws_sdk_kms::config::http::HttpResponse>,
) -> bool {
    match e {
        SdkError::ServiceError(s) => {
            e.code().is_some_and(|c| RETRYABLE_CODES.contains(&c))
                || s.raw().status().is_server_error()
        }
        SdkError::TimeoutError(_) => true,
        SdkError::DispatchFailure(d) => d.is_timeout(),
        _ => false,
    }
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
}

/// The key inventory over a state store and (when online) the KMS API.
pub struct Inventory {
    store: Store,
    sdk: Option<SdkConfig>,
    opts: InventoryOptions,
    clients: Mutex<HashMap<String, aws_sdk_kms::Client>>,
    calls: Arc<ApiCalls>,
}

impl Inventory {
    /// An inventory over `store`; `sdk` None means offline (only the cache is read).
    pub fn new(store: Store, sdk: Option<SdkConfig>, opts: InventoryOptions) -> Inventory {
        Inventory {
            store,
            sdk,
            opts,
            clients: Mutex::new(HashMap::new()),
            calls: Arc::new(ApiCalls::default()),
        }
    }

    pub fn calls(&self) -> &ApiCalls {
        &self.calls
    }

    fn client(&self, region: &str) -> Result<aws_sdk_kms::Client, InventoryError> {
        let sdk = self.sdk.as_ref().ok_or(InventoryError::Offline)?;
        let mut clients = self.clients.lock().map_err(|_| InventoryError::Offline)?;
        Ok(clients
            .entry(region.to_string())
            .or_insert_with(|| {
                // `retry` is the one retry layer: the SDK's own would hide throttling
                // from the backoff and from the call counts.
                let client = crate::aws::kms_client(sdk, Some(region));
                let conf = client
                    .config()
                    .to_builder()
                    .retry_config(aws_sdk_kms::config::retry::RetryConfig::disabled())
                    .build();
                aws_sdk_kms::Client::from_conf(conf)
            })
            .clone())
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

    pub fn put(&self, rec: &KeyRecord) -> Result<(), StoreError> {
        self.put_json(&format!("key/{}", rec.arn), rec)
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
        let k = format!("seen/{key_arn}");
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
            .get_json(&format!("seen/{key_arn}"))?
            .unwrap_or_default())
    }

    pub fn coverage(&self) -> Result<Coverage, StoreError> {
        Ok(self.get_json("coverage")?.unwrap_or_default())
    }

    /// Applies what a scan of CloudTrail saw: last-seen times, coverage, and the
    /// invalidation of records older than an event that changed their key. Returns how
    /// many records were invalidated.
    pub fn apply_activity(&self, activity: &Activity) -> Result<usize, StoreError> {
        let mut invalidated = 0;
        for (arn, a) in &activity.keys {
            if let Some(t) = &a.last_seen {
                self.record_seen(arn, t)?;
            }
            if let Some(t) = &a.last_used {
                self.record_used(arn, t)?;
            }
            if let Some(changed) = &a.last_change {
                // A record read after the change already shows it; only older ones go.
                let stale = self
                    .cached(arn)?
                    .is_some_and(|r| r.refreshed_at.as_str() <= changed.as_str());
                if stale && self.invalidate(arn)? {
                    invalidated += 1;
                }
            }
        }
        if let (Some(from), Some(until)) = (&activity.from, &activity.until) {
            let mut c = self.coverage()?;
            if c.from.as_deref().is_none_or(|f| from.as_str() < f) {
                c.from = Some(from.clone());
            }
            if c.until.as_deref().is_none_or(|u| until.as_str() > u) {
                c.until = Some(until.clone());
            }
            self.put_json("coverage", &c)?;
        }
        Ok(invalidated)
    }

    /// A key's record: from the cache when younger than `max_age`, else from the API
    /// (and then cached).
    pub async fn key(&self, key_arn: &str) -> Result<KeyRecord, InventoryError> {
        if let Some(rec) = self.cached(key_arn)? {
            if is_fresh(&rec, self.opts.max_age, now_secs()) {
                return Ok(rec);
            }
        }
        let region = region_of_arn(key_arn).ok_or_else(|| InventoryError::Api {
            op: "DescribeKey",
            region: "?".into(),
            code: Some("InvalidArn".into()),
            message: format!("`{key_arn}` is not a KMS key ARN"),
        })?;
        let client = self.client(region)?;
        let aliases = list_aliases(
            &client,
            region,
            &self.calls,
            &self.opts.backoff,
            Some(key_arn),
        )
        .await?
        .remove(key_id_of_arn(key_arn))
        .unwrap_or_default();
        let rec = read_key(
            &client,
            region,
            key_arn,
            aliases,
            &self.calls,
            &self.opts.backoff,
        )
        .await?;
        self.put(&rec)?;
        Ok(rec)
    }

    /// Reads every key of `region` (pages of ListKeys and ListAliases, then each key,
    /// `concurrency` at a time), caching what it reads. Keys that fail are listed in
    /// `failures`; a failure to list at all is an error.
    pub async fn refresh_region(&self, region: &str) -> Result<RegionInventory, InventoryError> {
        let client = self.client(region)?;
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

/// Copies a key record's alias and tags into a finding.
pub fn apply(f: &mut Finding, rec: &KeyRecord) {
    f.key_alias = rec.aliases.first().cloned();
    f.key_tags = rec.tags.clone();
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

/// The key id at the end of a key ARN (the ARN itself when it has no `key/`).
pub fn key_id_of_arn(arn: &str) -> &str {
    arn.rsplit_once(":key/").map_or(arn, |(_, id)| id)
}

fn api_err<E, R>(op: &'static str, region: &str, e: &SdkError<E, R>) -> InventoryError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
    SdkError<E, R>: std::error::Error,
{
    let code = match e {
        SdkError::ServiceError(_) => Some(e.code().unwrap_or("Unknown").to_string()),
        _ => None,
    };
    let message = match e {
        SdkError::ServiceError(_) => e.message().unwrap_or("").to_string(),
        _ => {
            // The error and its sources, without the Debug dump DisplayErrorContext adds.
            let mut parts = vec![e.to_string()];
            let mut src = std::error::Error::source(e);
            while let Some(s) = src {
                let text = s.to_string();
                if !parts.iter().any(|p| p.contains(&text)) {
                    parts.push(text);
                }
                src = s.source();
            }
            parts.join(": ")
        }
    };
    InventoryError::Api {
        op,
        region: region.to_string(),
        code,
        message,
    }
}

/// Calls one KMS operation with counting and backoff.
async fn call<T, E, F, Fut>(
    op: &'static str,
    region: &str,
    calls: &ApiCalls,
    backoff: &Backoff,
    f: F,
) -> Result<T, InventoryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, SdkError<E, aws_sdk_kms::config::http::HttpResponse>>>,
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    retry(
        backoff,
        |e: &SdkError<E, _>| {
            let r = sdk_retryable(e);
            if r {
                calls.throttled.fetch_add(1, Ordering::Relaxed);
            }
            r
        },
        |_| calls.count(op),
        f,
    )
    .await
    .map_err(|e| api_err(op, region, &e))
}

async fn list_keys(
    client: &aws_sdk_kms::Client,
    region: &str,
    calls: &ApiCalls,
    backoff: &Backoff,
) -> Result<Vec<String>, InventoryError> {
    let mut arns = Vec::new();
    let mut marker: Option<String> = None;
    loop {
        let m = marker.clone();
        let page = call("ListKeys", region, calls, backoff, || {
            client.list_keys().limit(1000).set_marker(m.clone()).send()
        })
        .await?;
        arns.extend(
            page.keys()
                .iter()
                .filter_map(|k| k.key_arn().map(str::to_string)),
        );
        match (page.truncated(), page.next_marker()) {
            (true, Some(next)) if Some(next) != marker.as_deref() => {
                marker = Some(next.to_string())
            }
            _ => break,
        }
    }
    Ok(arns)
}

/// Alias names by target key id, sorted; for one key when `key` is given.
async fn list_aliases(
    client: &aws_sdk_kms::Client,
    region: &str,
    calls: &ApiCalls,
    backoff: &Backoff,
    key: Option<&str>,
) -> Result<HashMap<String, Vec<String>>, InventoryError> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut marker: Option<String> = None;
    loop {
        let m = marker.clone();
        let page = call("ListAliases", region, calls, backoff, || {
            client
                .list_aliases()
                .limit(100)
                .set_key_id(key.map(str::to_string))
                .set_marker(m.clone())
                .send()
        })
        .await?;
        for a in page.aliases() {
            if let (Some(name), Some(target)) = (a.alias_name(), a.target_key_id()) {
                out.entry(target.to_string())
                    .or_default()
                    .push(name.to_string());
            }
        }
        match (page.truncated(), page.next_marker()) {
            (true, Some(next)) if Some(next) != marker.as_deref() => {
                marker = Some(next.to_string())
            }
            _ => break,
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    Ok(out)
}

/// Reads one key through the API. DescribeKey failing is an error; the other parts are
/// recorded in `errors` and left empty, so one denied call does not hide the key.
async fn read_key(
    client: &aws_sdk_kms::Client,
    region: &str,
    arn: &str,
    aliases: Vec<String>,
    calls: &ApiCalls,
    backoff: &Backoff,
) -> Result<KeyRecord, InventoryError> {
    let d = call("DescribeKey", region, calls, backoff, || {
        client.describe_key().key_id(arn).send()
    })
    .await?;
    let Some(m) = d.key_metadata() else {
        return Err(InventoryError::Api {
            op: "DescribeKey",
            region: region.to_string(),
            code: Some("EmptyResponse".into()),
            message: format!("no key metadata for {arn}"),
        });
    };
    let arn = m.arn().unwrap_or(arn).to_string();
    let mut rec = KeyRecord {
        key_id: m.key_id().to_string(),
        account: m.aws_account_id().unwrap_or("").to_string(),
        region: region.to_string(),
        aliases,
        state: m
            .key_state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        manager: m
            .key_manager()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        spec: m
            .key_spec()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        usage: m
            .key_usage()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        origin: m
            .origin()
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        custom_key_store_id: m.custom_key_store_id().map(str::to_string),
        creation_date: m.creation_date().map(|d| format_time(d.secs())),
        deletion_date: m.deletion_date().map(|d| format_time(d.secs())),
        refreshed_at: format_time(now_secs()),
        ..Default::default()
    };
    if let Some(mr) = m.multi_region_configuration() {
        let primary = mr.primary_key();
        let primary_arn = primary.and_then(|p| p.arn()).map(str::to_string);
        let mut replica_regions: Vec<String> = mr
            .replica_keys()
            .iter()
            .filter_map(|r| r.region().map(str::to_string))
            .collect();
        replica_regions.sort();
        replica_regions.dedup();
        rec.multi_region = Some(MultiRegion {
            // Compare ARNs rather than trust MultiRegionKeyType (moto reports it wrong
            // for a primary once a replica has been described).
            is_primary: primary_arn.as_deref() == Some(arn.as_str()),
            primary_arn,
            primary_region: primary.and_then(|p| p.region()).map(str::to_string),
            replica_regions,
        });
    }
    rec.arn = arn;
    if !rec.is_customer_managed() {
        return Ok(rec);
    }
    let arn = rec.arn.as_str();

    // Tags (paginated: up to 50 per page).
    let mut marker: Option<String> = None;
    loop {
        let m = marker.clone();
        match call("ListResourceTags", region, calls, backoff, || {
            client
                .list_resource_tags()
                .key_id(arn)
                .limit(50)
                .set_marker(m.clone())
                .send()
        })
        .await
        {
            Ok(page) => {
                for t in page.tags() {
                    rec.tags
                        .insert(t.tag_key().to_string(), t.tag_value().to_string());
                }
                match (page.truncated(), page.next_marker()) {
                    (true, Some(next)) if Some(next) != marker.as_deref() => {
                        marker = Some(next.to_string())
                    }
                    _ => break,
                }
            }
            Err(e) => {
                rec.errors.push(e.to_string());
                break;
            }
        }
    }

    // Automatic rotation exists only for symmetric keys with KMS-made material.
    if rec.spec == "SYMMETRIC_DEFAULT" && rec.origin == "AWS_KMS" {
        match call("GetKeyRotationStatus", region, calls, backoff, || {
            client.get_key_rotation_status().key_id(arn).send()
        })
        .await
        {
            Ok(r) => {
                rec.rotation_enabled = Some(r.key_rotation_enabled());
                rec.rotation_period_days = r.rotation_period_in_days();
            }
            Err(e) => rec.errors.push(e.to_string()),
        }
    }

    match call("GetKeyPolicy", region, calls, backoff, || {
        client
            .get_key_policy()
            .key_id(arn)
            .policy_name("default")
            .send()
    })
    .await
    {
        Ok(p) => rec.policy = p.policy().map(str::to_string),
        Err(e) => rec.errors.push(e.to_string()),
    }

    let mut grants = Vec::new();
    let mut grants_ok = true;
    let mut marker: Option<String> = None;
    loop {
        let m = marker.clone();
        match call("ListGrants", region, calls, backoff, || {
            client
                .list_grants()
                .key_id(arn)
                .limit(100)
                .set_marker(m.clone())
                .send()
        })
        .await
        {
            Ok(page) => {
                for g in page.grants() {
                    grants.push(GrantRecord {
                        grant_id: g.grant_id().unwrap_or("").to_string(),
                        grantee: g.grantee_principal().map(str::to_string),
                        retiring: g.retiring_principal().map(str::to_string),
                        operations: g
                            .operations()
                            .iter()
                            .map(|o| o.as_str().to_string())
                            .collect(),
                    });
                }
                match (page.truncated(), page.next_marker()) {
                    (true, Some(next)) if Some(next) != marker.as_deref() => {
                        marker = Some(next.to_string())
                    }
                    _ => break,
                }
            }
            Err(e) => {
                rec.errors.push(e.to_string());
                grants_ok = false;
                break;
            }
        }
    }
    rec.grants = grants_ok.then_some(grants);
    Ok(rec)
}

/// What a scan of CloudTrail saw about one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyActivity {
    pub last_seen: Option<String>,
    pub last_used: Option<String>,
    /// Time of the latest event that changes the key (`INVALIDATING_EVENTS`).
    pub last_change: Option<String>,
}

/// Key activity over a set of CloudTrail files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    pub keys: HashMap<String, KeyActivity>,
    /// Earliest and latest event time scanned.
    pub from: Option<String>,
    pub until: Option<String>,
}

fn max_into(slot: &mut Option<String>, t: &str) {
    if slot.as_deref().is_none_or(|o| o < t) {
        *slot = Some(t.to_string());
    }
}

fn min_into(slot: &mut Option<String>, t: &str) {
    if slot.as_deref().is_none_or(|o| o > t) {
        *slot = Some(t.to_string());
    }
}

impl Activity {
    /// Takes one event into account.
    pub fn observe(&mut self, ev: &Event<'_>) {
        let Some(time) = ev.event_time().filter(|t| parse_time(t).is_some()) else {
            return;
        };
        min_into(&mut self.from, time);
        max_into(&mut self.until, time);
        if ev.event_source() != Some(crate::event::KMS_SOURCE) {
            return;
        }
        let name = ev.event_name().unwrap_or("");
        let mut keys = ev.key_arns();
        // CreateAlias/UpdateAlias name their key as targetKeyId.
        if let (Some(id), Some(region), Some(account)) = (
            ev.str(&["requestParameters", "targetKeyId"]),
            ev.region(),
            ev.account(),
        ) {
            if id.starts_with("arn:") && id.contains(":key/") {
                keys.push(id.to_string());
            } else if !id.is_empty() && !id.starts_with("alias/") && id.len() <= 128 {
                keys.push(format!("arn:aws:kms:{region}:{account}:key/{id}"));
            }
        }
        let used = USE_EVENTS.contains(&name) && ev.error_code().is_none();
        let changes = invalidates(name) && ev.error_code().is_none();
        for k in keys {
            let a = self.keys.entry(k).or_default();
            max_into(&mut a.last_seen, time);
            if used {
                max_into(&mut a.last_used, time);
            }
            if changes {
                max_into(&mut a.last_change, time);
            }
        }
    }

    fn merge(&mut self, other: Activity) {
        for (k, o) in other.keys {
            let a = self.keys.entry(k).or_default();
            for (slot, v) in [
                (&mut a.last_seen, o.last_seen),
                (&mut a.last_used, o.last_used),
                (&mut a.last_change, o.last_change),
            ] {
                if let Some(v) = v {
                    max_into(slot, &v);
                }
            }
        }
        if let Some(f) = other.from {
            min_into(&mut self.from, &f);
        }
        if let Some(u) = other.until {
            max_into(&mut self.until, &u);
        }
    }
}

/// Scans CloudTrail files for key activity on `jobs` threads (the decode stage only: no
/// rules). A second pass over the files, so `replay` pays it only with `--state`.
pub fn scan_activity(files: &[LogFile], limits: DecodeLimits, jobs: usize) -> Activity {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let jobs = jobs.clamp(1, files.len().max(1));
    let mut total = Activity::default();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..jobs)
            .map(|_| {
                let next = &next;
                scope.spawn(move || {
                    let mut decoder = Decoder::new(limits);
                    let mut act = Activity::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(file) = files.get(i) else { break };
                        decoder.decode_file(&file.path, &mut |ev| act.observe(ev));
                    }
                    act
                })
            })
            .collect();
        for h in handles {
            if let Ok(a) = h.join() {
                total.merge(a);
            }
        }
    });
    total
}

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses CloudTrail's `YYYY-MM-DDTHH:MM:SS[.fff]Z` into Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    if !s.ends_with('Z') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    Some(days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + sec)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (the form CloudTrail uses, so stored
/// times compare as strings).
pub fn format_time(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // civil_from_days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
        assert_eq!(parse_time("2026-11-29T03:15:27+01:00"), None);
    }

    #[test]
    fn arns() {
        let arn = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234";
        assert_eq!(region_of_arn(arn), Some("eu-west-1"));
        assert_eq!(key_id_of_arn(arn), "mrk-1234");
        assert_eq!(
            region_of_arn("arn:aws:kms:eu-west-1:111122223333:alias/x"),
            None
        );
        assert_eq!(region_of_arn("1234"), None);
    }

    #[test]
    fn invalidating_events() {
        assert!(invalidates("TagResource"));
        assert!(invalidates("RevokeGrant"));
        assert!(!invalidates("Decrypt"));
        assert!(!invalidates("DescribeKey"));
    }

    #[test]
    fn backoff_is_capped_and_grows() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            max_attempts: 5,
        };
        assert_eq!(
            b.delay(0, 0.999_999),
            Duration::from_millis(100).mul_f64(0.999_999)
        );
        assert!(b.delay(3, 0.5) == Duration::from_millis(400));
        assert_eq!(b.delay(10, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay(40, 1.0), Duration::from_secs(2));
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[tokio::test]
    async fn retry_retries_only_retryable_errors_up_to_the_limit() {
        let b = Backoff {
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            max_attempts: 4,
        };
        let mut attempts = 0;
        let r: Result<u32, &str> = retry(
            &b,
            |e| *e == "throttled",
            |_| {},
            || {
                attempts += 1;
                let n = attempts;
                async move {
                    if n < 3 {
                        Err("throttled")
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Ok(3));
        let mut attempts = 0;
        let r: Result<u32, &str> = retry(
            &b,
            |e| *e == "throttled",
            |_| {},
            || {
                attempts += 1;
                async { Err("throttled") }
            },
        )
        .await;
        assert_eq!((r, attempts), (Err("throttled"), 4));
        let mut attempts = 0;
        let r: Result<u32, &str> = retry(
            &b,
            |e| *e == "throttled",
            |_| {},
            || {
                attempts += 1;
                async { Err("denied") }
            },
        )
        .await;
        assert_eq!((r, attempts), (Err("denied"), 1));
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
        assert!(!inv.invalidate(arn).unwrap());
        assert_eq!(
            inv.seen(arn).unwrap().last_seen.as_deref(),
            Some("2026-01-02T00:00:00Z")
        );
    }

    #[test]
    fn activity_from_events() {
        let rec = |name: &str, time: &str, extra: &str| {
            format!(
                r#"{{"eventSource":"kms.amazonaws.com","eventName":"{name}","eventTime":"{time}","awsRegion":"us-east-1","recipientAccountId":"111122223333","requestParameters":{{{extra}}}}}"#
            )
        };
        let mut act = Activity::default();
        for json in [
            rec(
                "Decrypt",
                "2026-01-01T00:00:00Z",
                r#""keyId":"arn:aws:kms:us-east-1:111122223333:key/k1""#,
            ),
            rec("TagResource", "2026-01-02T00:00:00Z", r#""keyId":"k1""#),
            rec("DescribeKey", "2026-01-03T00:00:00Z", r#""keyId":"k1""#),
            rec(
                "CreateAlias",
                "2026-01-04T00:00:00Z",
                r#""aliasName":"alias/x","targetKeyId":"k2""#,
            ),
        ] {
            let mut bytes = json.into_bytes();
            let v = simd_json::to_borrowed_value(&mut bytes).unwrap();
            act.observe(&Event::new(&v));
        }
        let k1 = &act.keys["arn:aws:kms:us-east-1:111122223333:key/k1"];
        assert_eq!(k1.last_seen.as_deref(), Some("2026-01-03T00:00:00Z"));
        assert_eq!(k1.last_used.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(k1.last_change.as_deref(), Some("2026-01-02T00:00:00Z"));
        let k2 = &act.keys["arn:aws:kms:us-east-1:111122223333:key/k2"];
        assert_eq!(k2.last_change.as_deref(), Some("2026-01-04T00:00:00Z"));
        assert_eq!(act.from.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(act.until.as_deref(), Some("2026-01-04T00:00:00Z"));
    }
}
