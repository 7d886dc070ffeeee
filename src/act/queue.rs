//! The daemon's durable alert queue: alerts made by the routers (see `sink`) wait here,
//! one entry per (channel, alert), keyed `CHANNEL/SEQUENCE` so each channel sees its
//! alerts in the order they were made. One task per channel (`run_channel`) delivers its
//! entries oldest first and removes an entry only after the channel accepted it (SMTP
//! 250, HTTP 2xx). A transient failure reschedules the entry with capped exponential
//! backoff and jitter, stored in the entry, so the schedule survives a restart. An alert
//! that failed for `park_after` since it was queued (or failed permanently) is moved to
//! the parked tree, and a `health` finding saying so is committed to the outbox in the
//! same transaction, so it reaches the other sinks. `retry` moves parked alerts back;
//! `pending` lists both trees (for `kmsguard alerts pending`).

use super::dispatch::Jitter;
use super::{backoff, clock, synthetic, Alert, Channel, DeliveryError};
use crate::analyze::finding::{Finding, Severity};
use crate::outbox::{self, Sink};
use crate::store::{decode, encode, Commit, StateWrite, Store, StoreError};
use crate::telemetry::Metrics;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

/// Alerts waiting for delivery, `CHANNEL/SEQUENCE` -> `QueuedAlert`.
pub const QUEUE_TREE: &str = "alert-queue";
/// Alerts given up on until `kmsguard alerts retry`, same keys.
pub const PARKED_TREE: &str = "alert-parked";
/// The rule id of the health finding that reports parked alerts.
pub const PARKED_RULE: &str = "health-alerts-parked";
/// First retry after 0.5 s, doubling up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
const BACKOFF_BASE: Duration = Duration::from_millis(500);

/// One alert in the queue (or parked), with its delivery history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedAlert {
    pub alert: Alert,
    /// Unix ms when it was queued; `park_after` counts from here (`retry` resets it).
    pub queued_ms: u64,
    /// Unix ms when its (first) finding was committed, when this process saw the commit
    /// (for the latency figure; absent after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub committed_ms: Option<u64>,
    #[serde(default)]
    pub attempts: u32,
    /// Unix ms before which it is not tried again.
    #[serde(default)]
    pub next_attempt_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parked_ms: Option<u64>,
}

pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The queue key of a new alert for `channel`.
pub fn queue_key(store: &Store, channel: &str) -> Result<String, StoreError> {
    Ok(format!("{channel}/{:020}", store.next_id()?))
}

fn channel_of(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(c, _)| c)
}

fn entries(
    store: &Store,
    tree: &'static str,
    prefix: &str,
) -> Result<Vec<(String, QueuedAlert)>, StoreError> {
    let mut out = Vec::new();
    for r in store.tree(tree)?.scan_prefix(prefix.as_bytes()) {
        let (k, v) = r?;
        let key = String::from_utf8_lossy(&k).into_owned();
        let q: QueuedAlert = decode(tree, &key, &v)?;
        out.push((key, q));
    }
    Ok(out)
}

/// One line of `kmsguard alerts pending`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PendingAlert {
    pub channel: String,
    /// `queued` or `parked`.
    pub state: String,
    pub key: String,
    pub alert_id: String,
    pub kind: String,
    pub severity: Severity,
    pub rule: String,
    pub title: String,
    pub count: u64,
    pub queued_at: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

fn rfc3339_ms(ms: u64) -> String {
    clock::format_rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))
}

/// Everything queued and parked, by channel then age.
pub fn pending(store: &Store) -> Result<Vec<PendingAlert>, StoreError> {
    let mut out = Vec::new();
    for (tree, state) in [(QUEUE_TREE, "queued"), (PARKED_TREE, "parked")] {
        for (key, q) in entries(store, tree, "")? {
            out.push(PendingAlert {
                channel: channel_of(&key).to_string(),
                state: state.to_string(),
                alert_id: q.alert.id.clone(),
                kind: q.alert.kind.as_str().to_string(),
                severity: q.alert.severity(),
                rule: q.alert.finding.rule.clone(),
                title: q.alert.finding.title.clone(),
                count: q.alert.group.count,
                queued_at: rfc3339_ms(q.queued_ms),
                attempts: q.attempts,
                next_attempt_at: (state == "queued" && q.next_attempt_ms > 0)
                    .then(|| rfc3339_ms(q.next_attempt_ms)),
                parked_at: q.parked_ms.map(rfc3339_ms),
                last_error: q.last_error.clone(),
                key,
            });
        }
    }
    out.sort_by(|a, b| a.channel.cmp(&b.channel).then(a.key.cmp(&b.key)));
    Ok(out)
}

/// Moves parked alerts (of `channel`, or all) back into the queue, to be tried at once
/// with a fresh `park_after`. They keep their keys, so they go before newer alerts.
/// Returns how many moved.
pub fn retry(store: &Store, channel: Option<&str>, now: SystemTime) -> Result<usize, StoreError> {
    let prefix = channel.map(|c| format!("{c}/")).unwrap_or_default();
    let parked = entries(store, PARKED_TREE, &prefix)?;
    let mut state = Vec::new();
    for (key, mut q) in parked.iter().cloned() {
        q.queued_ms = unix_ms(now);
        q.next_attempt_ms = 0;
        q.attempts = 0;
        q.parked_ms = None;
        state.push(StateWrite::delete(PARKED_TREE, key.clone()));
        state.push(StateWrite::put(QUEUE_TREE, key, encode(&q)));
    }
    store.commit(&Commit {
        state,
        ..Commit::default()
    })?;
    // The operator is told they are re-queued: make it so before answering.
    store.flush()?;
    Ok(parked.len())
}

/// Queued and parked alerts per channel and the age of the oldest queued one (ms).
pub fn depths(store: &Store, channel: &str) -> Result<(usize, usize, Option<u64>), StoreError> {
    let prefix = format!("{channel}/");
    let queue = store.tree(QUEUE_TREE)?;
    let oldest = match queue.scan_prefix(prefix.as_bytes()).next() {
        Some(r) => {
            let (k, v) = r?;
            let q: QueuedAlert = decode(QUEUE_TREE, &String::from_utf8_lossy(&k), &v)?;
            Some(q.queued_ms)
        }
        None => None,
    };
    let queued = queue.scan_prefix(prefix.as_bytes()).count();
    let parked = store
        .tree(PARKED_TREE)?
        .scan_prefix(prefix.as_bytes())
        .count();
    Ok((queued, parked, oldest))
}

/// Channels with queued or parked alerts that are not in `configured` (renamed or
/// removed from the config): their alerts wait until the channel is configured again.
pub fn orphans(store: &Store, configured: &[String]) -> Result<Vec<(String, usize)>, StoreError> {
    let mut out: Vec<(String, usize)> = Vec::new();
    for p in pending(store)? {
        if configured.contains(&p.channel) {
            continue;
        }
        match out.last_mut() {
            Some((c, n)) if *c == p.channel => *n += 1,
            _ => out.push((p.channel, 1)),
        }
    }
    Ok(out)
}

/// What a channel's delivery task needs.
pub struct ChannelTask {
    pub store: Store,
    pub channel: Channel,
    pub park_after: Duration,
    pub metrics: Arc<Metrics>,
    /// Woken after commits that may have queued alerts (and by `retry`); also signalled
    /// by this task after it parks alerts, so the outbox's sinks see the health finding.
    pub wake: Arc<Notify>,
    /// Every sink, to enqueue the health finding about parked alerts.
    pub sinks: Arc<Vec<Sink>>,
}

/// Delivers one channel's queue until `shutdown`; then goes on while the head of the
/// queue is due (the caller bounds this with the grace period) and returns when it is
/// empty or waiting for a retry: what is left stays queued for the next start.
pub async fn run_channel(task: ChannelTask, mut shutdown: watch::Receiver<bool>) {
    let name = task.channel.name().to_string();
    let prefix = format!("{name}/");
    let mut jitter = Jitter::from_clock();
    let mut gauges_at: Option<tokio::time::Instant> = None;
    loop {
        let stopping = *shutdown.borrow();
        let notified = task.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Counting the queue is a scan: at most once a second, not once per alert.
        if gauges_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            task.update_gauges(&name);
            gauges_at = Some(tokio::time::Instant::now());
        }
        let head = match task.store.tree(QUEUE_TREE).and_then(|t| {
            t.scan_prefix(prefix.as_bytes())
                .next()
                .transpose()
                .map_err(StoreError::from)
        }) {
            Ok(h) => h,
            Err(e) => {
                warn!(channel = name, error = %e, "cannot read the alert queue");
                task.metrics.error("alert-queue");
                None
            }
        };
        let Some((k, v)) = head else {
            if stopping {
                return;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        };
        let key = String::from_utf8_lossy(&k).into_owned();
        let mut q: QueuedAlert = match decode(QUEUE_TREE, &key, &v) {
            Ok(q) => q,
            Err(e) => {
                // Never block the channel on an entry that cannot be sent (logged).
                warn!(channel = name, key, error = %e, "unreadable alert queue entry; removing it");
                task.metrics.error("alert-queue");
                let _ = task
                    .store
                    .tree(QUEUE_TREE)
                    .and_then(|t| t.remove(key.as_bytes()).map(|_| ()).map_err(Into::into));
                continue;
            }
        };
        let now = unix_ms(SystemTime::now());
        if q.next_attempt_ms > now {
            if stopping {
                return;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_millis(q.next_attempt_ms - now)) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        if q.attempts > 0 {
            task.metrics.alert(&name, |s| s.retried += 1);
        }
        let result = task.channel.deliver(&q.alert).await;
        let done = unix_ms(SystemTime::now());
        match result {
            Ok(d) => {
                // Flushed at once: a kill -9 in sled's 500 ms write-back window would
                // otherwise bring back (and send again) alerts already accepted.
                if let Err(e) = task
                    .store
                    .tree(QUEUE_TREE)
                    .and_then(|t| t.remove(key.as_bytes()).map(|_| ()).map_err(Into::into))
                    .and_then(|()| task.store.flush())
                {
                    warn!(channel = name, error = %e, "delivered, but cannot remove it from the queue: it may be sent again (same id)");
                    task.metrics.error("alert-queue");
                }
                task.metrics.alert(&name, |s| s.sent += 1);
                let from = q.committed_ms.unwrap_or(q.queued_ms);
                info!(
                    channel = name,
                    alert_id = q.alert.id,
                    kind = q.alert.kind.as_str(),
                    rule = q.alert.finding.rule,
                    finding_id = q.alert.finding.id,
                    count = q.alert.group.count,
                    attempts = q.attempts + 1,
                    latency_ms = done.saturating_sub(from),
                    response = d.response,
                    "alert delivered"
                );
            }
            Err(e) => {
                task.metrics.alert(&name, |s| s.failed += 1);
                q.attempts += 1;
                q.last_error = Some(e.to_string());
                let expired = done >= q.queued_ms + task.park_after.as_millis() as u64;
                let permanent = matches!(e, DeliveryError::Permanent(_));
                if permanent || expired {
                    if let Err(err) = task.park(&name, key, q, permanent, done) {
                        warn!(channel = name, error = %err, "cannot park alerts; they stay queued");
                        task.metrics.error("alert-queue");
                        sleep_or_stop(&mut shutdown, Duration::from_secs(5)).await;
                    }
                } else {
                    let wait = backoff(q.attempts, BACKOFF_BASE, BACKOFF_CAP, jitter.factor());
                    q.next_attempt_ms = done + wait.as_millis() as u64;
                    warn!(channel = name, alert_id = q.alert.id, attempt = q.attempts, error = %e, retry_in_ms = wait.as_millis() as u64, "alert not delivered; will retry");
                    if let Err(err) = task.store.tree(QUEUE_TREE).and_then(|t| {
                        t.insert(key.as_bytes(), encode(&q))
                            .map(|_| ())
                            .map_err(Into::into)
                    }) {
                        warn!(channel = name, error = %err, "cannot record the failed attempt");
                        task.metrics.error("alert-queue");
                        sleep_or_stop(&mut shutdown, wait).await;
                    }
                }
            }
        }
    }
}

async fn sleep_or_stop(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}

impl ChannelTask {
    fn update_gauges(&self, name: &str) {
        if let Ok((queued, parked, oldest)) = depths(&self.store, name) {
            self.metrics.alert(name, |s| {
                s.queued = queued as i64;
                s.parked_now = parked as i64;
                s.oldest_ms = oldest.unwrap_or(0);
            });
        }
    }

    /// Parks `q` (and, after a transient failure, every later alert of the channel whose
    /// own `park_after` is over: the channel just failed, trying each would only delay
    /// the notice) and commits a health finding, in one transaction.
    fn park(
        &self,
        name: &str,
        key: String,
        mut q: QueuedAlert,
        permanent: bool,
        now: u64,
    ) -> Result<(), StoreError> {
        let error = q.last_error.clone().unwrap_or_default();
        q.parked_ms = Some(now);
        let mut parked = vec![(key, q)];
        if !permanent {
            let limit = self.park_after.as_millis() as u64;
            for (k, mut later) in entries(&self.store, QUEUE_TREE, &format!("{name}/"))? {
                if k == parked[0].0 || now < later.queued_ms + limit {
                    continue;
                }
                later.parked_ms = Some(now);
                later.last_error = Some(format!("not tried: the alert before it failed ({error})"));
                parked.push((k, later));
            }
        }
        let n = parked.len();
        let worst = parked
            .iter()
            .map(|(_, q)| q.alert.severity())
            .max()
            .unwrap_or(Severity::Info);
        let why = if permanent {
            "was refused by the channel (retrying cannot help)".to_string()
        } else {
            format!("could not be delivered for {}s", self.park_after.as_secs())
        };
        let summary = format!(
            "{n} alert(s) on channel {name} (the worst {worst}, e.g. \"{}\") {why}: {error}. They are parked: `kmsguard alerts pending --config FILE` lists them, `kmsguard alerts retry --config FILE {name}` sends them again.",
            parked[0].1.alert.finding.title
        );
        let finding = parked_finding(name, &summary, now);
        let mut state = Vec::new();
        for (k, q) in &parked {
            state.push(StateWrite::delete(QUEUE_TREE, k.clone()));
            state.push(StateWrite::put(PARKED_TREE, k.clone(), encode(q)));
        }
        let outbox = outbox::entries_for(&self.store, &self.sinks, &[finding])?;
        self.store.commit(&Commit {
            outbox,
            state,
            ..Commit::default()
        })?;
        self.store.flush()?;
        warn!(
            channel = name,
            alerts = n,
            error,
            "alerts parked; a health finding reports it"
        );
        self.metrics.alert(name, |s| s.parked += n as u64);
        self.metrics.outbox_depth.store(
            self.store.outbox_len() as i64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.wake.notify_waiters();
        Ok(())
    }
}

/// The health finding about alerts parked on `channel`. Its `file` names the channel,
/// so the router does not send it to the channel that cannot deliver.
pub fn parked_finding(channel: &str, summary: &str, now_ms: u64) -> Finding {
    let time = rfc3339_ms(now_ms);
    let mut f = synthetic(
        PARKED_RULE,
        Severity::High,
        &format!("Alerts on channel {channel} are parked"),
        summary,
        &format!("{time}/{now_ms}"),
    );
    f.time = time;
    f.file = parked_subject(channel);
    f
}

/// The `file` of a parked-alerts health finding about `channel`.
pub fn parked_subject(channel: &str) -> String {
    format!("alert-channel:{channel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(channel: &str, ms: u64) -> QueuedAlert {
        let f = parked_finding("other", "s", ms);
        QueuedAlert {
            alert: Alert::single(channel, f),
            queued_ms: ms,
            committed_ms: None,
            attempts: 2,
            next_attempt_ms: ms + 10,
            last_error: Some("transient: refused".into()),
            parked_ms: Some(ms + 5),
        }
    }

    #[test]
    fn retry_moves_parked_alerts_back_in_order() {
        let store = Store::temporary().unwrap();
        let mut state = Vec::new();
        for (ch, i) in [("mail", 1u64), ("mail", 2), ("hook", 3)] {
            let key = queue_key(&store, ch).unwrap();
            state.push(StateWrite::put(PARKED_TREE, key, encode(&queued(ch, i))));
        }
        store
            .commit(&Commit {
                state,
                ..Commit::default()
            })
            .unwrap();
        let p = pending(&store).unwrap();
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|a| a.state == "parked"));
        assert_eq!(p[0].channel, "hook");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        assert_eq!(retry(&store, Some("mail"), now).unwrap(), 2);
        assert_eq!(
            depths(&store, "mail").unwrap(),
            (2, 0, Some(1_790_000_000_000))
        );
        assert_eq!(depths(&store, "hook").unwrap().1, 1);
        let q = entries(&store, QUEUE_TREE, "mail/").unwrap();
        assert!(q[0].0 < q[1].0);
        assert_eq!(
            (q[0].1.attempts, q[0].1.next_attempt_ms, q[0].1.parked_ms),
            (0, 0, None)
        );
        assert_eq!(retry(&store, None, now).unwrap(), 1);
        assert!(pending(&store).unwrap().iter().all(|a| a.state == "queued"));
    }

    #[test]
    fn parked_findings_name_their_channel_and_differ() {
        let a = parked_finding("mail", "x", 1000);
        let b = parked_finding("mail", "x", 2000);
        assert_ne!(a.id, b.id);
        assert_eq!(a.file, "alert-channel:mail");
        assert_eq!(a.rule, PARKED_RULE);
        assert_eq!(a.kind, crate::analyze::finding::Kind::Health);
    }
}
