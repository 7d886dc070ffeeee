//! The way out: findings committed to the outbox (one entry per finding and sink that
//! wants it, keyed `SINK/SEQUENCE` so each sink sees them in commit order) are delivered
//! by sink, and an entry is removed only after its sink accepted it. A sink may answer
//! with follow-up findings (e.g. what a remediation did); those are committed to the
//! outbox for the other sinks in the same transaction that removes the delivered entries,
//! and so are writes to the sink's own state (`Delivery::state`, e.g. the alert routers
//! and the alert queue).

use crate::analyze::finding::Finding;
use crate::config::FileSinkConfig;
use crate::store::{Commit, StateWrite, Store, StoreError};
use std::io::Write;
use std::sync::Arc;

/// Why a delivery failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliveryError {
    /// Try again later (the receiver is down, busy, or timed out).
    #[error("{0} (will retry)")]
    Transient(String),
    /// Retrying will not help (rejected as malformed, unauthorized).
    #[error("{0} (will not retry)")]
    Permanent(String),
}

/// What a sink did with a batch.
#[derive(Debug, Default)]
pub struct Delivery {
    /// How many findings from the start of the batch it accepted (they leave the
    /// outbox). Fewer than the batch, even 0, is allowed: a sink that collects findings
    /// into larger units (an archive segment, a digest) takes them when it is ready.
    pub accepted: usize,
    /// Findings to enqueue for the other sinks (e.g. what a remediation did).
    pub follow_ups: Vec<Finding>,
    /// Writes to the sink's own trees, committed with the removal of the accepted
    /// entries (so a crash cannot separate "consumed" from what consuming changed).
    pub state: Vec<StateWrite>,
}

/// A consumer of the outbox. A closed set: add a variant to add a kind of sink.
pub enum Sink {
    /// Appends JSON Lines to a file and fsyncs.
    File(FileSinkConfig),
    /// Seals findings into envelope-encrypted archive segments (docs/archive.md); takes
    /// them only once a whole segment is written.
    Archive(Box<crate::archive::ArchiveSink>),
    /// Email and webhook channels: routes findings into the durable alert queue
    /// (`act::sink`), from which `act::queue::run_channel` tasks deliver.
    Alerts(Arc<crate::act::sink::AlertsSink>),
    /// Runs automatic remediation (`src/remediate.rs`) on findings whose rule has a
    /// remediation hint; answers with the `kind: "remediation"` findings as follow-ups.
    Remediate(Arc<crate::remediate::Engine>),
}

impl Sink {
    pub fn name(&self) -> String {
        match self {
            Sink::File(f) => format!("file:{}", f.path.display()),
            Sink::Archive(a) => a.name(),
            Sink::Alerts(a) => format!("alerts:{}", a.channel_names().join(",")),
            Sink::Remediate(_) => "remediate".into(),
        }
    }

    /// The prefix of this sink's outbox keys: a hash of what identifies the sink (a file
    /// sink's path, an archive's destinations, ...), not its position in the config, so
    /// adding or removing another sink never sends waiting entries to the wrong one.
    pub fn key_prefix(&self) -> String {
        use sha2::Digest;
        let id = match self {
            // The alert sink feeds its channels' own durable queues.
            Sink::Alerts(_) => "alerts".to_string(),
            other => other.name(),
        };
        let digest = sha2::Sha256::digest(id.as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The most entries one `deliver` call is given.
    pub fn batch_limit(&self) -> usize {
        match self {
            Sink::Archive(a) => a.batch_limit(),
            _ => 500,
        }
    }

    /// Whether this sink wants the finding at all (decided when the finding is
    /// committed).
    pub fn accepts(&self, f: &Finding) -> bool {
        match self {
            Sink::File(c) => f.severity >= c.min_severity,
            Sink::Archive(a) => a.accepts(f),
            Sink::Alerts(a) => a.accepts(f),
            Sink::Remediate(e) => e.accepts(f),
        }
    }

    /// Whether the sink wants `deliver` called with an empty batch at `now` (timed
    /// output, e.g. a group whose wait is over).
    pub fn tick_due(&self, now: std::time::SystemTime) -> bool {
        match self {
            Sink::File(_) | Sink::Archive(_) | Sink::Remediate(_) => false,
            Sink::Alerts(a) => a.tick_due(now),
        }
    }

    /// Told after findings were committed to the outbox (before any delivery).
    pub fn note_committed(&self, findings: &[Finding]) {
        if let Sink::Alerts(a) = self {
            a.note_committed(findings);
        }
    }

    /// Delivers (a prefix of) a batch, oldest first. The batch is every pending entry of
    /// this sink up to a limit, so a sink sees what it left last time again.
    pub async fn deliver(&self, batch: &[Finding]) -> Result<Delivery, DeliveryError> {
        match self {
            Sink::File(c) => {
                let path = c.path.clone();
                let mut buf = Vec::new();
                for f in batch {
                    serde_json::to_writer(&mut buf, f)
                        .map_err(|e| DeliveryError::Permanent(e.to_string()))?;
                    buf.push(b'\n');
                }
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)?;
                    file.write_all(&buf)?;
                    file.sync_data()
                })
                .await
                .map_err(|e| DeliveryError::Transient(e.to_string()))?
                .map_err(|e| {
                    DeliveryError::Transient(format!("file sink {}: {e}", c.path.display()))
                })?;
                Ok(Delivery {
                    accepted: batch.len(),
                    ..Delivery::default()
                })
            }
            Sink::Archive(a) => a.deliver(batch).await,
            Sink::Alerts(a) => a.deliver(batch, std::time::SystemTime::now()),
            // Never an error: a failed remediation is reported as a finding, and
            // retrying the batch would act twice (the engine reads state first anyway).
            // A finding waits `confirm_grace_secs` first (later events may settle it);
            // the batch is in commit order, so the waiting ones are a suffix.
            Sink::Remediate(engine) => {
                let mut follow_ups = Vec::new();
                // Every finding's wait starts when the sink first sees it.
                let due: Vec<bool> = batch.iter().map(|f| engine.due(f)).collect();
                let accepted = due.iter().take_while(|d| **d).count();
                for f in &batch[..accepted] {
                    follow_ups.extend(engine.handle(f).await);
                }
                Ok(Delivery {
                    accepted,
                    follow_ups,
                    ..Delivery::default()
                })
            }
        }
    }
}

/// Outbox entries for `findings`: one per (sink that accepts it, finding).
pub fn entries_for(
    store: &Store,
    sinks: &[Sink],
    findings: &[Finding],
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut out = Vec::new();
    for f in findings {
        let bytes = serde_json::to_vec(f).unwrap_or_default();
        for sink in sinks {
            if sink.accepts(f) {
                let seq = store.next_id()?;
                out.push((format!("{}/{seq:020}", sink.key_prefix()), bytes.clone()));
            }
        }
    }
    Ok(out)
}

/// Outbox entries that belong to no configured sink (one removed or changed since they
/// were committed): they stay in the outbox, and the daemon says so at start.
pub fn orphaned(store: &Store, sinks: &[Sink]) -> Result<usize, StoreError> {
    let known: Vec<String> = sinks
        .iter()
        .map(|s| format!("{}/", s.key_prefix()))
        .collect();
    let mut n = 0;
    for entry in store.outbox_entries() {
        let (k, _) = entry?;
        if !known.iter().any(|p| k.starts_with(p)) {
            n += 1;
        }
    }
    Ok(n)
}

/// The next batch of one sink's entries (at most `max`), oldest first.
pub fn pending(
    store: &Store,
    sink: &Sink,
    max: usize,
) -> Result<Vec<(String, Finding)>, StoreError> {
    let mut out = Vec::new();
    for entry in store
        .outbox_prefix(&format!("{}/", sink.key_prefix()))
        .take(max)
    {
        let (k, v) = entry?;
        let f: Finding = crate::store::decode("outbox", &k, &v)?;
        out.push((k, f));
    }
    Ok(out)
}

/// Records a delivered batch: removes its entries, enqueues follow-ups and applies the
/// sink's state writes, atomically.
pub fn delivered(
    store: &Store,
    sinks: &[Sink],
    keys: Vec<String>,
    follow_ups: &[Finding],
    state: Vec<StateWrite>,
) -> Result<(), StoreError> {
    let outbox = entries_for(store, sinks, follow_ups)?;
    store.commit(&Commit {
        delivered: keys,
        outbox,
        state,
        ..Commit::default()
    })
}
