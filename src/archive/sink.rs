//! The daemon's archive sink (`[[sinks.archive]]`): findings wait in the outbox, not in
//! memory, until there are enough of them for a segment (`max_segment_findings` or
//! `max_segment_bytes`) or the oldest has waited `max_segment_age`; then exactly those
//! are sealed into ONE segment (one `GenerateDataKey`), written to every destination,
//! and only then accepted, so they leave the outbox. While KMS or S3 cannot be reached
//! the findings stay in the outbox (nothing is written as plaintext) and the sink's own
//! delivery task retries; other sinks are not held up.
//!
//! At most one sealed segment is held in memory, between sealing and a successful
//! write. A restart continues the chain from the destinations (`Archiver::open`, which
//! also copies a segment that one destination got and another missed). A crash after a
//! segment was written but before the outbox recorded it archives those findings once
//! more, in the next segment (same ids), like the file sink's at-least-once.

use super::kms::Keyring;
use super::store::{Location, Store};
use super::writer::{Archiver, ArchiverConfig, SealedSegment};
use crate::analyze::finding::Finding;
use crate::config::ArchiveSinkConfig;
use crate::outbox::{Delivery, DeliveryError};
use std::sync::Arc;
use tokio::time::Instant;
use tracing::{info, warn};

/// What the sink has done, for logs and throughput reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveSinkStats {
    pub segments: u64,
    pub findings: u64,
    pub kms_calls: u64,
}

pub struct ArchiveSink {
    cfg: ArchiveSinkConfig,
    keyring: Arc<Keyring>,
    s3: aws_sdk_s3::Client,
    /// One delivery task per sink calls `deliver`, so this lock is never contended; it
    /// makes the sink `Sync` while a call awaits KMS or S3.
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Opened on first use, so a daemon starts even while S3 is unreachable.
    archiver: Option<Archiver>,
    /// Sealed but not yet written everywhere, with the ids of the findings it holds (the
    /// first entries of the outbox).
    sealed: Option<(SealedSegment, Vec<String>)>,
    /// The id of the oldest pending finding and when this sink first saw it.
    oldest: Option<(String, Instant)>,
    stats: ArchiveSinkStats,
}

fn transient(what: &str, e: impl std::fmt::Display) -> DeliveryError {
    DeliveryError::Transient(format!("{what}: {e}"))
}

impl ArchiveSink {
    pub fn new(
        cfg: ArchiveSinkConfig,
        sdk: &aws_config::SdkConfig,
        aws: &crate::aws::AwsSettings,
    ) -> ArchiveSink {
        ArchiveSink {
            cfg,
            keyring: Arc::new(Keyring::new(sdk.clone())),
            s3: crate::aws::s3_client(sdk, aws),
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    pub fn name(&self) -> String {
        let to: Vec<String> = self
            .cfg
            .destinations
            .iter()
            .map(ToString::to_string)
            .collect();
        format!("archive:{}@{}", self.cfg.host, to.join("+"))
    }

    pub fn accepts(&self, f: &Finding) -> bool {
        f.severity >= self.cfg.min_severity
    }

    /// The most findings one call sees: one segment's worth.
    pub fn batch_limit(&self) -> usize {
        self.cfg.max_segment_findings
    }

    pub async fn stats(&self) -> ArchiveSinkStats {
        self.state.lock().await.stats.clone()
    }

    fn stores(&self) -> Vec<Store> {
        self.cfg
            .destinations
            .iter()
            .map(|l| match l {
                Location::Dir(_) => Store::new(l.clone(), None),
                Location::S3 { .. } => Store::new(l.clone(), Some(self.s3.clone())),
            })
            .collect()
    }

    /// Takes a prefix of `batch` (oldest first) once it makes a segment, or nothing yet.
    pub async fn deliver(&self, batch: &[Finding]) -> Result<Delivery, DeliveryError> {
        let mut guard = self.state.lock().await;
        let st = &mut *guard;
        let Some(head) = batch.first() else {
            return Ok(Delivery::default());
        };
        if st.archiver.is_none() {
            let mut acfg = ArchiverConfig::new(self.cfg.key.clone(), &self.cfg.host);
            acfg.max_segment_bytes = self.cfg.max_segment_bytes;
            acfg.max_segment_age = self.cfg.max_segment_age;
            let a = Archiver::open(acfg, self.keyring.clone(), self.stores())
                .await
                .map_err(|e| transient("cannot open the archive", e))?;
            info!(
                sink = self.name(),
                next_segment = a.next_seq(),
                "archive opened"
            );
            st.archiver = Some(a);
        }
        let Some(archiver) = st.archiver.as_mut() else {
            return Ok(Delivery::default());
        };

        // A segment sealed by an earlier call goes out before anything else.
        if let Some((segment, ids)) = &st.sealed {
            let same = batch.len() >= ids.len() && batch.iter().zip(ids).all(|(f, id)| f.id == *id);
            if !same {
                // Only the outbox removes entries, and only what this sink accepted: a
                // different head means the store lost track. Write the segment anyway (the
                // chain needs it) and accept nothing for it.
                warn!(
                    segment = segment.name,
                    "archive: the outbox no longer starts with the sealed segment's findings"
                );
            }
            archiver
                .write_sealed(segment)
                .await
                .map_err(|e| transient("cannot write the archive segment (kept, retried)", e))?;
            let n = if same { ids.len() } else { 0 };
            self.written(st, n);
            return Ok(Delivery {
                accepted: n,
                ..Delivery::default()
            });
        }

        // Enough for a segment yet?
        let now = Instant::now();
        let since = match &st.oldest {
            Some((id, t)) if *id == head.id => *t,
            _ => {
                st.oldest = Some((head.id.clone(), now));
                now
            }
        };
        let mut values = Vec::with_capacity(batch.len());
        let mut lens = Vec::with_capacity(batch.len());
        let mut bytes = 0usize;
        for f in batch.iter().take(self.cfg.max_segment_findings) {
            let v = serde_json::to_value(f)
                .map_err(|e| DeliveryError::Permanent(format!("finding {}: {e}", f.id)))?;
            let len = serde_json::to_vec(&v).map_or(0, |b| b.len()) + 1;
            values.push(v);
            lens.push(len);
            bytes += len;
            if bytes > self.cfg.max_segment_bytes {
                break; // enough to decide
            }
        }
        let Some(n) = segment_len(
            &lens,
            self.cfg.max_segment_findings,
            self.cfg.max_segment_bytes,
            now.duration_since(since) >= self.cfg.max_segment_age,
        ) else {
            return Ok(Delivery::default());
        };
        values.truncate(n);

        let calls = self.keyring.calls();
        let sealed = archiver.seal_exact(&values).await;
        // Failed attempts count too: they are KMS requests all the same.
        st.stats.kms_calls += self.keyring.calls() - calls;
        let segment = sealed.map_err(|e| {
            transient(
                "cannot seal an archive segment (the findings wait in the outbox)",
                e,
            )
        })?;
        let ids: Vec<String> = batch[..values.len()].iter().map(|f| f.id.clone()).collect();
        let result = archiver.write_sealed(&segment).await;
        st.sealed = Some((segment, ids));
        result.map_err(|e| transient("cannot write the archive segment (kept, retried)", e))?;
        let n = values.len();
        self.written(st, n);
        Ok(Delivery {
            accepted: n,
            ..Delivery::default()
        })
    }

    /// Records that the sealed segment is written and holds `n` findings.
    fn written(&self, st: &mut State, n: usize) {
        if let Some((segment, _)) = st.sealed.take() {
            st.stats.segments += 1;
            st.stats.findings += n as u64;
            st.oldest = None;
            info!(
                sink = self.name(),
                segment = segment.name,
                seq = segment.info.seq,
                findings = n,
                bytes = segment.len(),
                segments_total = st.stats.segments,
                findings_total = st.stats.findings,
                kms_calls_total = st.stats.kms_calls,
                "archive segment written"
            );
        }
    }
}

/// How many of the pending findings (their JSON line lengths, oldest first) go into the
/// next segment, or None when it is not time yet. A segment is due when the findings
/// reach `max_findings` or `max_bytes`, or when the oldest is `old` enough; it never goes
/// over either limit, except that one finding larger than `max_bytes` makes a segment
/// of its own.
pub fn segment_len(
    line_lens: &[usize],
    max_findings: usize,
    max_bytes: usize,
    old: bool,
) -> Option<usize> {
    let mut bytes = 0usize;
    let mut n = 0;
    for &len in line_lens.iter().take(max_findings) {
        if n > 0 && bytes + len > max_bytes {
            return Some(n); // the next one would not fit: full
        }
        bytes += len;
        n += 1;
    }
    let full = n >= max_findings.max(1) || bytes >= max_bytes;
    (n > 0 && (full || old)).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::segment_len;

    #[test]
    fn a_segment_is_due_at_its_size_count_or_age_and_never_over_a_limit() {
        // Not yet: below every limit and young.
        assert_eq!(segment_len(&[100; 5], 10, 1000, false), None);
        assert_eq!(segment_len(&[], 10, 1000, true), None);
        // Old enough: whatever is there.
        assert_eq!(segment_len(&[100; 5], 10, 1000, true), Some(5));
        // By count: exactly the limit, even when more wait.
        assert_eq!(segment_len(&[100; 10], 10, 10_000, false), Some(10));
        assert_eq!(segment_len(&[100; 25], 10, 10_000, false), Some(10));
        // By bytes: exactly full, or as many as fit when the next would not.
        assert_eq!(segment_len(&[100; 10], 100, 1000, false), Some(10));
        assert_eq!(segment_len(&[300; 4], 100, 1000, false), Some(3));
        assert_eq!(segment_len(&[300, 300, 300], 100, 1000, false), None);
        // One finding over the byte limit goes alone rather than blocking the rest.
        assert_eq!(segment_len(&[5000, 10], 100, 1000, false), Some(1));
    }
}
