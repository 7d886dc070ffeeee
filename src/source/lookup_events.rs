//! The CloudTrail API as a replay source (`cloudtrail://REGION`): LookupEvents filtered to
//! `EventSource = kms.amazonaws.com`. The window is cut into slices (an hour each) that the
//! pipeline's workers read like files: each slice is paginated (LookupEvents returns newest
//! first), reversed into time order and handed to the decoder as one `{"Records":[...]}`
//! document, so memory holds at most a window of slices. Requests to a region go one at a
//! time, paced to at most 2 per second (the API's limit per account and region), and back
//! off on ThrottlingException.

use crate::inventory::Backoff;
use aws_sdk_cloudtrail::error::ProvideErrorMetadata;
use aws_sdk_cloudtrail::types::{LookupAttribute, LookupAttributeKey};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Length of one slice of the window.
pub const SLICE_SECS: i64 = 3600;

/// LookupEvents' limit per account and region is 2 requests per second: the pause
/// between one response and the next request (see `Pace`), with a small margin.
pub const MIN_INTERVAL: Duration = Duration::from_millis(510);

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{url}: not a CloudTrail API source (write cloudtrail://REGION, e.g. cloudtrail://us-east-1)")]
    BadUrl { url: String },
    #[error("LookupEvents in {region}: still throttled or failing after {attempts} attempt(s): {message}")]
    Transient {
        region: String,
        attempts: u32,
        message: String,
    },
    #[error("LookupEvents in {region}: {message}")]
    Permanent { region: String, message: String },
    #[error("LookupEvents in {region}: more than {limit} events in one hour slice; read this period from the trail bucket (s3://) instead")]
    TooMany { region: String, limit: usize },
}

/// One slice of the window in one region, read by a pipeline worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiSlice {
    pub region: String,
    /// Inclusive start and exclusive end, seconds since the epoch.
    pub from: i64,
    pub to: i64,
}

impl ApiSlice {
    pub fn name(&self) -> String {
        format!(
            "cloudtrail://{}/{}",
            self.region,
            crate::inventory::format_time(self.from)
        )
    }

    pub fn ledger_key(&self) -> String {
        format!("lookup:{}:{}:{}", self.region, self.from, self.to)
    }
}

/// `cloudtrail://REGION` -> REGION.
pub fn parse_url(url: &str) -> Result<String, LookupError> {
    let region = url
        .strip_prefix("cloudtrail://")
        .map(|r| r.trim_matches('/'))
        .filter(|r| {
            !r.is_empty()
                && r.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        .ok_or_else(|| LookupError::BadUrl {
            url: url.to_string(),
        })?;
    Ok(region.to_string())
}

/// The slices of `[from, to]` (inclusive) in `region`, oldest first.
pub fn slices(region: &str, from: i64, to: i64) -> Vec<ApiSlice> {
    let mut out = Vec::new();
    let mut t = from;
    while t <= to {
        let end = (t - t.rem_euclid(SLICE_SECS) + SLICE_SECS).min(to + 1);
        out.push(ApiSlice {
            region: region.to_string(),
            from: t,
            to: end,
        });
        t = end;
    }
    out
}

/// Paces one region's requests: one in flight at a time, each sent at least `interval`
/// after the previous one's response. Since a request reaches the server between its
/// send and its response, any three arrivals are then more than two intervals (over one
/// second) apart, whatever the network adds: at most 2 requests in any second as the
/// server counts them.
#[derive(Debug)]
struct Pace {
    last_done: tokio::sync::Mutex<Option<tokio::time::Instant>>,
    interval: Duration,
}

/// Reads slices from the pipeline's worker threads (blocking on the given runtime).
#[derive(Debug, Clone)]
pub struct LookupReader {
    clients: Arc<HashMap<String, (aws_sdk_cloudtrail::Client, Pace)>>,
    handle: tokio::runtime::Handle,
    backoff: Backoff,
    /// Events per slice before it is abandoned (memory bound).
    pub max_events: usize,
    /// LookupEvents requests made, retries included.
    pub requests: Arc<AtomicU64>,
    /// Requests that were throttled and retried.
    pub throttled: Arc<AtomicU64>,
}

impl LookupReader {
    /// A reader for `regions` with clients from `sdk`.
    pub fn new(
        sdk: &aws_config::SdkConfig,
        regions: &[String],
        handle: tokio::runtime::Handle,
    ) -> Self {
        let clients = regions
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    (
                        crate::aws::cloudtrail_client(sdk, r),
                        Pace {
                            last_done: tokio::sync::Mutex::new(None),
                            interval: MIN_INTERVAL,
                        },
                    ),
                )
            })
            .collect();
        LookupReader {
            clients: Arc::new(clients),
            handle,
            backoff: Backoff {
                base: Duration::from_millis(500),
                cap: Duration::from_secs(20),
                max_attempts: 8,
            },
            max_events: 200_000,
            requests: Arc::default(),
            throttled: Arc::default(),
        }
    }

    /// The slice's KMS events as one `{"Records":[...]}` document in time order, and the
    /// number of `CloudTrailEvent` strings that were not JSON objects (skipped).
    pub fn fetch(&self, slice: &ApiSlice) -> Result<(Vec<u8>, u64), LookupError> {
        let (client, pace) =
            self.clients
                .get(&slice.region)
                .ok_or_else(|| LookupError::Permanent {
                    region: slice.region.clone(),
                    message: "no client for this region".into(),
                })?;
        let mut events: Vec<String> = Vec::new();
        let mut token: Option<String> = None;
        self.handle.block_on(async {
            loop {
                let page = self.page(client, pace, slice, token.take()).await?;
                for e in page.events() {
                    if let Some(json) = e.cloud_trail_event() {
                        events.push(json.to_string());
                    }
                }
                if events.len() > self.max_events {
                    return Err(LookupError::TooMany {
                        region: slice.region.clone(),
                        limit: self.max_events,
                    });
                }
                match page.next_token() {
                    Some(t) if !t.is_empty() => token = Some(t.to_string()),
                    _ => return Ok(()),
                }
            }
        })?;
        // Newest first from the API: reverse, then order by eventTime (stable, so events
        // of the same second keep the API's order).
        events.reverse();
        events.sort_by_cached_key(|e| event_time(e));
        let mut doc = Vec::with_capacity(events.iter().map(|e| e.len() + 1).sum::<usize>() + 16);
        doc.extend_from_slice(b"{\"Records\":[");
        let mut bad = 0;
        let mut first = true;
        for e in &events {
            // Only whole JSON objects go into the document, so one odd string cannot
            // shift the record boundaries of the others.
            let ok = e.trim_start().starts_with('{')
                && serde_json::from_str::<serde::de::IgnoredAny>(e).is_ok();
            if !ok {
                bad += 1;
                continue;
            }
            if !first {
                doc.push(b',');
            }
            first = false;
            doc.extend_from_slice(e.as_bytes());
        }
        doc.extend_from_slice(b"]}");
        Ok((doc, bad))
    }

    async fn page(
        &self,
        client: &aws_sdk_cloudtrail::Client,
        pace: &Pace,
        slice: &ApiSlice,
        token: Option<String>,
    ) -> Result<aws_sdk_cloudtrail::operation::lookup_events::LookupEventsOutput, LookupError> {
        let attr = LookupAttribute::builder()
            .attribute_key(LookupAttributeKey::EventSource)
            .attribute_value(crate::event::KMS_SOURCE)
            .build()
            .map_err(|e| LookupError::Permanent {
                region: slice.region.clone(),
                message: e.to_string(),
            })?;
        let mut attempt = 0;
        loop {
            let mut last_done = pace.last_done.lock().await;
            if let Some(t) = *last_done {
                tokio::time::sleep_until(t + pace.interval).await;
            }
            attempt += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let r = client
                .lookup_events()
                .lookup_attributes(attr.clone())
                .start_time(aws_sdk_cloudtrail::primitives::DateTime::from_secs(
                    slice.from,
                ))
                // EndTime is inclusive in the API; the slice's end is exclusive.
                .end_time(aws_sdk_cloudtrail::primitives::DateTime::from_secs(
                    slice.to - 1,
                ))
                .max_results(50)
                .set_next_token(token.clone())
                .send()
                .await;
            *last_done = Some(tokio::time::Instant::now());
            drop(last_done);
            match r {
                Ok(p) => return Ok(p),
                Err(e) => {
                    let status = e.raw_response().map(|r| r.status().as_u16());
                    let code = e.code().unwrap_or("").to_string();
                    let message = aws_sdk_cloudtrail::error::DisplayErrorContext(&e).to_string();
                    let throttled = code == "ThrottlingException" || status == Some(429);
                    let transient = throttled || status.is_none_or(|s| s >= 500);
                    if !transient {
                        return Err(LookupError::Permanent {
                            region: slice.region.clone(),
                            message,
                        });
                    }
                    if attempt >= self.backoff.max_attempts {
                        return Err(LookupError::Transient {
                            region: slice.region.clone(),
                            attempts: attempt,
                            message,
                        });
                    }
                    if throttled {
                        self.throttled.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(self.backoff.delay(attempt - 1, jitter())).await;
                }
            }
        }
    }
}

/// The `eventTime` of a CloudTrail event JSON string (ISO 8601 sorts as text).
fn event_time(e: &str) -> String {
    #[derive(serde::Deserialize)]
    struct T {
        #[serde(rename = "eventTime", default)]
        event_time: String,
    }
    serde_json::from_str::<T>(e)
        .map(|t| t.event_time)
        .unwrap_or_default()
}

fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_slices() {
        assert_eq!(parse_url("cloudtrail://us-east-1").unwrap(), "us-east-1");
        assert!(parse_url("cloudtrail://").is_err());
        assert!(parse_url("cloudtrail://US EAST").is_err());
        let s = slices("r", 1800, 3 * 3600 + 10);
        let bounds: Vec<(i64, i64)> = s.iter().map(|s| (s.from, s.to)).collect();
        assert_eq!(
            bounds,
            vec![(1800, 3600), (3600, 7200), (7200, 10800), (10800, 10811)]
        );
        assert_eq!(
            event_time(r#"{"eventTime":"2026-10-01T00:00:01Z","x":1}"#),
            "2026-10-01T00:00:01Z"
        );
    }
}
