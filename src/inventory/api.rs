//! The KMS calls that fill the inventory: pagination, one retry layer (capped exponential
//! backoff with full jitter on throttling, 5xx and timeouts) and per-operation call counts.

use super::{format_time, now_secs, GrantRecord, InventoryError, KeyRecord, MultiRegion};
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

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

pub(super) async fn list_keys(
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
pub(super) async fn list_aliases(
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
pub(super) async fn read_key(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
