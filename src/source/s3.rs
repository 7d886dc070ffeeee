//! A CloudTrail trail bucket in S3 as a replay source. Listing touches only the day
//! prefixes of the requested window in CloudTrail's layout
//! (`PREFIX/AWSLogs/[o-…/]<account>/CloudTrail/<region>/YYYY/MM/DD/`), discovering
//! organization ids, accounts and regions with delimiter listings when they are not
//! given, so its cost grows with the window, not with the bucket. Objects are then read
//! by the pipeline's worker threads through `S3Reader` (a tokio handle, retries with
//! capped exponential backoff on transient errors).

use crate::inventory::Backoff;
use aws_sdk_s3::error::ProvideErrorMetadata;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{url}: not an S3 URL (write s3://BUCKET/PREFIX)")]
    BadUrl { url: String },
    #[error("cannot list s3://{bucket}/{prefix}: {message} (the role needs s3:ListBucket on the bucket; if S3 is failing, run the replay again later)")]
    List {
        bucket: String,
        prefix: String,
        message: String,
    },
}

/// Why one object could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Throttling, 5xx, timeouts, a cut connection: still failing after the retries.
    #[error("still failing after {attempts} attempt(s) (last: {message}); run the replay again later, or with fewer --jobs if S3 throttles")]
    Transient { attempts: u32, message: String },
    /// Gone, access denied, too large: retrying cannot help.
    #[error("{message}")]
    Permanent { message: String },
}

/// One log object to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Object {
    pub bucket: String,
    pub key: String,
    pub size: u64,
    pub etag: Option<String>,
}

impl S3Object {
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// The same ledger key as the daemon's (`s3:BUCKET/KEY:ETAG`), so a replay with the
    /// daemon's `--state` does not learn a file twice.
    pub fn ledger_key(&self) -> String {
        crate::source::notification::ObjectRef {
            bucket: self.bucket.clone(),
            key: self.key.clone(),
            etag: self.etag.clone(),
            size: Some(self.size),
            event_time: None,
        }
        .ledger_key()
    }

    /// The time stamp in the object's name, in seconds since the epoch.
    pub fn stamp_secs(&self) -> Option<i64> {
        stamp_secs(&self.key)
    }
}

/// Seconds since the epoch of the `YYYYMMDDTHHMMZ` stamp in a CloudTrail file name.
pub fn stamp_secs(name: &str) -> Option<i64> {
    let s = crate::source::files::time_stamp(std::path::Path::new(name))?;
    let iso = format!(
        "{}-{}-{}T{}:{}:00Z",
        &s[0..4],
        &s[4..6],
        &s[6..8],
        &s[9..11],
        &s[11..13]
    );
    crate::analyze::baseline::parse_time(&iso)
}

/// A time range, inclusive at both ends, in seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: i64,
    pub to: i64,
}

impl Window {
    pub fn contains(&self, t: i64) -> bool {
        self.from <= t && t <= self.to
    }

    /// The UTC days the window touches, as `YYYY/MM/DD`.
    pub fn days(&self) -> Vec<String> {
        let (first, last) = (self.from.div_euclid(86_400), self.to.div_euclid(86_400));
        (first..=last.max(first))
            .map(|d| crate::inventory::format_time(d * 86_400)[..10].replace('-', "/"))
            .collect()
    }
}

/// Parses `2026-10-01T12:00:00Z` (RFC 3339 in UTC), `2026-10-01T12:00Z` or `2026-10-01`
/// (midnight UTC).
pub fn parse_when(s: &str) -> Option<i64> {
    let s = s.trim();
    match s.len() {
        10 => crate::analyze::baseline::parse_time(&format!("{s}T00:00:00Z")),
        17 if s.ends_with('Z') => {
            crate::analyze::baseline::parse_time(&format!("{}:00Z", &s[..16]))
        }
        _ if s.ends_with('Z') || s.ends_with("+00:00") => crate::analyze::baseline::parse_time(s),
        _ => None,
    }
}

/// `s3://BUCKET/PREFIX` -> (bucket, prefix without leading or trailing slashes).
pub fn parse_url(url: &str) -> Result<(String, String), S3Error> {
    let bad = || S3Error::BadUrl {
        url: url.to_string(),
    };
    let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad());
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// What to list: the accounts and regions to read (all found when empty).
#[derive(Debug, Clone, Default)]
pub struct ListScope {
    pub accounts: Vec<String>,
    pub regions: Vec<String>,
}

/// The result of listing: objects in time order, and what it cost.
#[derive(Debug, Default)]
pub struct Listing {
    pub objects: Vec<S3Object>,
    /// ListObjectsV2 requests made (pages included).
    pub requests: u64,
    /// Digest files skipped.
    pub digests: u64,
}

/// Lists the log objects of `s3://bucket/prefix` whose name stamps fall in `window`,
/// sorted by (stamp, key) like local files.
pub async fn list_window(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    prefix: &str,
    window: Window,
    scope: &ListScope,
) -> Result<Listing, S3Error> {
    let requests = AtomicU64::new(0);
    let lister = Lister {
        client,
        bucket,
        requests: &requests,
    };
    // The AWSLogs folder: the trail's prefix may be given with or without it.
    let root = if prefix.is_empty() {
        "AWSLogs/".to_string()
    } else if prefix == "AWSLogs" || prefix.ends_with("/AWSLogs") {
        format!("{prefix}/")
    } else {
        format!("{prefix}/AWSLogs/")
    };
    // Account folders, under organization ids or not.
    let mut account_dirs = Vec::new();
    for child in lister.children(&root).await? {
        let name = child[root.len()..].trim_end_matches('/').to_string();
        if name.starts_with("o-") {
            if scope.accounts.is_empty() {
                for acct in lister.children(&child).await? {
                    if is_account(&acct[child.len()..]) {
                        account_dirs.push(acct);
                    }
                }
            } else {
                account_dirs.extend(scope.accounts.iter().map(|a| format!("{child}{a}/")));
            }
        } else if is_account(&name) && (scope.accounts.is_empty() || scope.accounts.contains(&name))
        {
            account_dirs.push(child);
        }
    }
    let mut region_dirs = Vec::new();
    for acct in &account_dirs {
        let base = format!("{acct}CloudTrail/");
        if scope.regions.is_empty() {
            region_dirs.extend(lister.children(&base).await?);
        } else {
            region_dirs.extend(scope.regions.iter().map(|r| format!("{base}{r}/")));
        }
    }
    let mut listing = Listing::default();
    let days = window.days();
    for dir in &region_dirs {
        for day in &days {
            for (key, size, etag) in lister.objects(&format!("{dir}{day}/")).await? {
                if crate::source::files::is_digest(&key) {
                    listing.digests += 1;
                    continue;
                }
                if stamp_secs(&key).is_some_and(|t| window.contains(t)) {
                    listing.objects.push(S3Object {
                        bucket: bucket.to_string(),
                        key,
                        size,
                        etag,
                    });
                }
            }
        }
    }
    listing
        .objects
        .sort_by_cached_key(|o| (o.stamp_secs().unwrap_or_default(), o.key.clone()));
    listing.requests = requests.load(Ordering::Relaxed);
    Ok(listing)
}

fn is_account(name: &str) -> bool {
    let name = name.trim_end_matches('/');
    name.len() == 12 && name.bytes().all(|b| b.is_ascii_digit())
}

struct Lister<'a> {
    client: &'a aws_sdk_s3::Client,
    bucket: &'a str,
    requests: &'a AtomicU64,
}

impl Lister<'_> {
    /// The "folders" directly under `prefix` (each ends with '/').
    async fn children(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .page(prefix, Some("/"), token.take())
                .await
                .map_err(|message| self.error(prefix, message))?;
            out.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix().map(str::to_string)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    /// Every object under `prefix`: (key, size, ETag).
    async fn objects(&self, prefix: &str) -> Result<Vec<(String, u64, Option<String>)>, S3Error> {
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = self
                .page(prefix, None, token.take())
                .await
                .map_err(|message| self.error(prefix, message))?;
            for o in page.contents() {
                if let Some(k) = o.key() {
                    out.push((
                        k.to_string(),
                        o.size().unwrap_or(0).max(0) as u64,
                        o.e_tag().map(|e| e.trim_matches('"').to_string()),
                    ));
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
    }

    /// One ListObjectsV2 page, retried on transient errors.
    async fn page(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
        token: Option<String>,
    ) -> Result<aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output, String> {
        let backoff = Backoff::default();
        let mut attempt = 0;
        loop {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let r = self
                .client
                .list_objects_v2()
                .bucket(self.bucket)
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_string))
                .set_continuation_token(token.clone())
                .send()
                .await;
            match r {
                Ok(p) => return Ok(p),
                Err(e) => {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    let code = e.code().unwrap_or("").to_string();
                    let text = error_text(&e);
                    attempt += 1;
                    if !is_transient(status, &code) || attempt >= backoff.max_attempts {
                        return Err(text);
                    }
                    tokio::time::sleep(backoff.delay(attempt - 1, jitter())).await;
                }
            }
        }
    }

    fn error(&self, prefix: &str, message: String) -> S3Error {
        S3Error::List {
            bucket: self.bucket.to_string(),
            prefix: prefix.to_string(),
            message,
        }
    }
}

/// Throttling, server errors and failures without a response are worth retrying.
/// Why a GetObject failed, as both replay and the daemon need to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GetFailure {
    /// 404 / NoSuchKey: deleted before it was read.
    Missing(String),
    /// 403 / AccessDenied: the role lacks s3:GetObject on the prefix.
    Denied(String),
    /// Throttling, 5xx, timeouts, no answer: worth another try.
    Transient(String),
    /// Any other refusal: retrying will not help.
    Other(String),
}

/// Classifies a GetObject error (the error code is kept in each message).
pub fn classify_get_error(
    e: &aws_sdk_s3::error::SdkError<aws_sdk_s3::operation::get_object::GetObjectError>,
) -> GetFailure {
    use aws_sdk_s3::error::ProvideErrorMetadata;
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().unwrap_or("").to_string();
    match (status, code.as_str()) {
        (_, "NoSuchKey") | (Some(404), _) => GetFailure::Missing(code),
        (_, "AccessDenied") | (Some(403), _) => GetFailure::Denied(code),
        _ if is_transient(status, &code) => GetFailure::Transient(error_text(e)),
        _ => GetFailure::Other(error_text(e)),
    }
}

/// An S3 error in one line: `S3 answered 503 SlowDown: Please reduce your request rate.`
/// when S3 answered, else the chain of causes (timeouts, refused or cut connections),
/// never the SDK's debug dump of the whole response.
pub fn error_text<E>(e: &aws_sdk_s3::error::SdkError<E>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let Some(r) = e.raw_response() {
        let status = r.status().as_u16();
        let code = e.code().unwrap_or("no error code");
        return match e.message() {
            Some(m) => format!(
                "S3 answered {status} {code}: {}",
                crate::analyze::rule::clean(m, 300).collect::<String>()
            ),
            None => format!("S3 answered {status} {code}"),
        };
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

fn is_transient(status: Option<u16>, code: &str) -> bool {
    match status {
        None => true,
        Some(s) if s >= 500 || s == 429 => true,
        _ => matches!(
            code,
            "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout"
        ),
    }
}

/// A number in [0, 1) for jitter, from the clock (callers only need not move together).
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

/// Reads S3 objects from the pipeline's worker threads (plain threads): each call blocks
/// on the given tokio runtime.
#[derive(Debug, Clone)]
pub struct S3Reader {
    pub client: aws_sdk_s3::Client,
    pub handle: tokio::runtime::Handle,
    pub backoff: Backoff,
    /// Objects larger than this are not read (like `--max-file-bytes` for local files).
    pub max_bytes: u64,
    /// GetObject attempts made, retries included.
    pub requests: Arc<AtomicU64>,
    /// Attempts that failed transiently and were tried again.
    pub retries: Arc<AtomicU64>,
}

impl S3Reader {
    pub fn new(client: aws_sdk_s3::Client, handle: tokio::runtime::Handle) -> Self {
        S3Reader {
            client,
            handle,
            backoff: Backoff {
                base: std::time::Duration::from_millis(200),
                cap: std::time::Duration::from_secs(10),
                max_attempts: 5,
            },
            max_bytes: 4 << 30,
            requests: Arc::default(),
            retries: Arc::default(),
        }
    }

    /// The object's bytes (whole: CloudTrail files are small), with retries.
    pub fn get(&self, obj: &S3Object) -> Result<Vec<u8>, FetchError> {
        if obj.size > self.max_bytes {
            return Err(FetchError::Permanent {
                message: format!("{} bytes is over the limit of {}", obj.size, self.max_bytes),
            });
        }
        self.handle.block_on(async {
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.get_once(obj).await {
                    Ok(b) => return Ok(b),
                    Err((true, _)) if attempt < self.backoff.max_attempts => {
                        self.retries.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(self.backoff.delay(attempt - 1, jitter())).await;
                    }
                    Err((true, message)) => {
                        return Err(FetchError::Transient {
                            attempts: attempt,
                            message,
                        })
                    }
                    Err((false, message)) => return Err(FetchError::Permanent { message }),
                }
            }
        })
    }

    /// One attempt; the error says whether it is worth retrying.
    async fn get_once(&self, obj: &S3Object) -> Result<Vec<u8>, (bool, String)> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .client
            .get_object()
            .bucket(&obj.bucket)
            .key(&obj.key)
            .send()
            .await;
        let out = match resp {
            Ok(o) => o,
            Err(e) => {
                return Err(match classify_get_error(&e) {
                    GetFailure::Missing(code) => (false, format!("the object is gone: {code}")),
                    GetFailure::Denied(code) => (
                        false,
                        format!(
                            "access denied (s3:GetObject on the trail prefix is needed): {code}"
                        ),
                    ),
                    GetFailure::Transient(text) => (true, text),
                    GetFailure::Other(text) => (false, text),
                });
            }
        };
        match out.body.collect().await {
            Ok(b) => Ok(b.into_bytes().to_vec()),
            Err(e) => Err((true, format!("download interrupted: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_times_and_days() {
        assert_eq!(
            parse_url("s3://b/x/AWSLogs/").unwrap(),
            ("b".to_string(), "x/AWSLogs".to_string())
        );
        assert_eq!(parse_url("s3://b").unwrap(), ("b".into(), String::new()));
        assert!(parse_url("s3:///x").is_err());
        assert!(parse_url("/tmp/x").is_err());
        let from = parse_when("2026-10-01").unwrap();
        assert_eq!(parse_when("2026-10-01T00:00:00Z"), Some(from));
        assert_eq!(parse_when("2026-10-01T00:00Z"), Some(from));
        assert_eq!(parse_when("yesterday"), None);
        let w = Window {
            from: from + 3600,
            to: from + 86_400 + 60,
        };
        assert_eq!(w.days(), vec!["2026/10/01", "2026/10/02"]);
        assert_eq!(
            stamp_secs("a/111122223333_CloudTrail_us-east-1_20261001T0105Z_abc.json.gz"),
            Some(from + 3900)
        );
    }
}
