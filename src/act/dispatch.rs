//! Driving channels without the daemon: `send` reads findings (JSON Lines, e.g. from
//! `kmsguard replay --format jsonl`), routes them through each channel's `Router`, and
//! delivers the alerts with capped exponential backoff and jitter until a deadline;
//! `deliver_with_retry` is the one retry loop (also used by `kmsguard alerts test`).
//! Progress is reported through a callback as `DispatchEvent`s; nothing here prints.
//!
//! Each channel has its own delivery task and bounded queue (1024 alerts), so a slow or
//! dead channel does not delay the others until its queue is full; then reading pauses
//! rather than letting memory grow. An alert's retry budget counts from when it was
//! made, so a relay that stays down fails a queue in about `retry_for`, not once per
//! alert.

use super::route::Router;
use super::{backoff, Alert, Channel, Delivered, DeliveryError};
use crate::analyze::finding::Finding;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// How long and how often to retry transient failures.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Give up on an alert this long after its first attempt (0: one attempt).
    pub retry_for: Duration,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retry_for: Duration::from_secs(300),
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

/// The final word on one alert.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub channel: String,
    pub alert_id: String,
    pub kind: &'static str,
    pub severity: &'static str,
    pub rule: String,
    pub count: u64,
    /// `delivered` or `failed`.
    pub status: &'static str,
    pub attempts: u32,
    /// From reading the alert's (first) finding to the channel accepting it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What `send` and `deliver_with_retry` report as they go.
#[derive(Debug)]
pub enum DispatchEvent {
    /// An attempt failed; `retry_in` is `None` when no retry follows.
    AttemptFailed {
        channel: String,
        alert_id: String,
        attempt: u32,
        error: String,
        transient: bool,
        retry_in: Option<Duration>,
    },
    /// A line of input was not a finding.
    BadLine {
        line: u64,
        error: String,
    },
    Done(Outcome),
}

pub type Reporter = Arc<dyn Fn(DispatchEvent) + Send + Sync>;

/// A small xorshift generator for backoff jitter (no need for a crypto RNG).
#[derive(Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Jitter {
        Jitter(seed | 1)
    }
    pub fn from_clock() -> Jitter {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Jitter::new(nanos ^ (u64::from(std::process::id()) << 32))
    }
    /// A factor in [0.5, 1.0).
    pub fn factor(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        0.5 + (self.0 >> 11) as f64 / (1u64 << 53) as f64 / 2.0
    }
}

/// Delivers `alert`, retrying transient failures with backoff until `policy.retry_for`
/// has passed since `since` (when the alert was made: alerts queued behind a dead relay
/// do not each wait the full time again). At least one attempt is made. Returns the
/// result and the number of attempts.
pub async fn deliver_with_retry(
    channel: &Channel,
    alert: &Alert,
    since: Instant,
    policy: &RetryPolicy,
    jitter: &mut Jitter,
    report: &Reporter,
) -> (Result<Delivered, DeliveryError>, u32) {
    let started = since;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let err = match channel.deliver(alert).await {
            Ok(d) => return (Ok(d), attempt),
            Err(e) => e,
        };
        let wait = backoff(attempt, policy.base, policy.cap, jitter.factor());
        let retry = err.is_transient() && started.elapsed() + wait <= policy.retry_for;
        report(DispatchEvent::AttemptFailed {
            channel: channel.name().to_string(),
            alert_id: alert.id.clone(),
            attempt,
            error: err.to_string(),
            transient: err.is_transient(),
            retry_in: retry.then_some(wait),
        });
        if !retry {
            return (Err(err), attempt);
        }
        tokio::time::sleep(wait).await;
    }
}

/// Rule id -> description, to show "why this matters" in alerts.
pub type Descriptions = HashMap<String, String>;

/// What `send` did.
#[derive(Debug, Default)]
pub struct SendReport {
    pub findings: u64,
    pub bad_lines: u64,
    pub outcomes: Vec<Outcome>,
}

impl SendReport {
    pub fn failed(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|o| o.status != "delivered")
            .count()
    }
}

/// An alert, when its (first) finding was read, and when the alert was made.
type Queued = (Alert, Option<Instant>, Instant);

/// Routes every finding of `input` through every channel and delivers the alerts;
/// at the end of input, pending groups, digests and notices are flushed and sent.
pub async fn send<R: AsyncBufRead + Unpin>(
    channels: Vec<(Channel, Router)>,
    input: R,
    descriptions: Descriptions,
    policy: RetryPolicy,
    report: Reporter,
) -> SendReport {
    let mut routers = Vec::new();
    let mut queues: Vec<mpsc::Sender<Queued>> = Vec::new();
    let mut workers = Vec::new();
    for (i, (channel, router)) in channels.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel::<Queued>(1024);
        routers.push(router);
        queues.push(tx);
        let report = report.clone();
        let mut jitter = Jitter::from_clock();
        jitter.0 ^= (i as u64 + 1) << 48;
        workers.push(tokio::spawn(worker(channel, rx, policy, jitter, report)));
    }
    let mut out = SendReport::default();
    let mut read_at: HashMap<String, Instant> = HashMap::new();
    let mut lines = input.lines();
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let mut line_no = 0u64;
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let line = match line {
                    Ok(Some(l)) => l,
                    Ok(None) => break,
                    Err(e) => {
                        report(DispatchEvent::BadLine { line: line_no + 1, error: format!("cannot read input: {e}") });
                        out.bad_lines += 1;
                        break;
                    }
                };
                line_no += 1;
                if line.trim().is_empty() {
                    continue;
                }
                let finding: Finding = match serde_json::from_str(&line) {
                    Ok(f) => f,
                    Err(e) => {
                        out.bad_lines += 1;
                        report(DispatchEvent::BadLine { line: line_no, error: e.to_string() });
                        continue;
                    }
                };
                out.findings += 1;
                if read_at.len() < 100_000 {
                    read_at.entry(finding.id.clone()).or_insert_with(Instant::now);
                }
                let now = SystemTime::now();
                for (router, queue) in routers.iter_mut().zip(&queues) {
                    for alert in router.offer(&finding, now) {
                        enqueue(queue, alert, &descriptions, &read_at).await;
                    }
                }
            }
            _ = ticker.tick() => {
                let now = SystemTime::now();
                for (router, queue) in routers.iter_mut().zip(&queues) {
                    for alert in router.tick(now) {
                        enqueue(queue, alert, &descriptions, &read_at).await;
                    }
                }
            }
        }
    }
    let now = SystemTime::now();
    for (router, queue) in routers.iter_mut().zip(&queues) {
        for alert in router.flush(now) {
            enqueue(queue, alert, &descriptions, &read_at).await;
        }
    }
    drop(queues);
    for w in workers {
        if let Ok(mut outcomes) = w.await {
            out.outcomes.append(&mut outcomes);
        }
    }
    out
}

async fn enqueue(
    queue: &mpsc::Sender<Queued>,
    mut alert: Alert,
    descriptions: &Descriptions,
    read_at: &HashMap<String, Instant>,
) {
    if alert.description.is_none() {
        alert.description = descriptions.get(&alert.finding.rule).cloned();
    }
    let at = read_at.get(&alert.finding.id).copied();
    // The worker only stops after the queue is closed, so this cannot fail.
    let _ = queue.send((alert, at, Instant::now())).await;
}

async fn worker(
    channel: Channel,
    mut rx: mpsc::Receiver<Queued>,
    policy: RetryPolicy,
    mut jitter: Jitter,
    report: Reporter,
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    while let Some((alert, read_at, made)) = rx.recv().await {
        let (result, attempts) =
            deliver_with_retry(&channel, &alert, made, &policy, &mut jitter, &report).await;
        let outcome = outcome(channel.name(), &alert, result, attempts, read_at);
        report(DispatchEvent::Done(outcome.clone()));
        outcomes.push(outcome);
    }
    outcomes
}

/// The outcome record for one alert.
pub fn outcome(
    channel: &str,
    alert: &Alert,
    result: Result<Delivered, DeliveryError>,
    attempts: u32,
    read_at: Option<Instant>,
) -> Outcome {
    let (status, response, error, latency_ms) = match result {
        Ok(d) => (
            "delivered",
            Some(d.response),
            None,
            read_at.map(|t| t.elapsed().as_secs_f64() * 1000.0),
        ),
        Err(e) => ("failed", None, Some(e.to_string()), None),
    };
    Outcome {
        channel: channel.to_string(),
        alert_id: alert.id.clone(),
        kind: alert.kind.as_str(),
        severity: alert.severity().as_str(),
        rule: alert.finding.rule.clone(),
        count: alert.group.count,
        status,
        attempts,
        latency_ms,
        response,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_range() {
        let mut j = Jitter::new(42);
        for _ in 0..10_000 {
            let x = j.factor();
            assert!((0.5..1.0).contains(&x), "{x}");
        }
    }
}
