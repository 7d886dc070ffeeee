//! `Archiver`: buffers alerts as JSON Lines, seals a segment when it reaches a size or an
//! age (one `GenerateDataKey` per segment, never per alert), chains it to the previous
//! segment by SHA-256, and writes it to every destination. A segment that could not be
//! written waits, encrypted, in memory and goes first on the next flush; alerts that could
//! not be sealed (KMS unreachable) stay in the buffer: never as plaintext files.

use super::kms::Keyring;
use super::message::{self, DEFAULT_FRAME_LEN};
use super::segment::{
    clean_host, parse_object_name, plausible_time, sha256_hex, SegmentInfo, GENESIS,
};
use super::store::Store;
use super::ArchiveError;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How segments are made.
#[derive(Debug, Clone)]
pub struct ArchiverConfig {
    /// KMS key (ARN, id or alias) that wraps each segment's data key.
    pub key: String,
    /// This writer's name in object names and in the chain; one chain per host.
    pub host: String,
    /// Seal a segment once its plaintext reaches this many bytes.
    pub max_segment_bytes: usize,
    /// Seal a segment this long after its first alert, at the next append or flush.
    pub max_segment_age: Duration,
    pub frame_len: u32,
}

impl ArchiverConfig {
    pub fn new(key: impl Into<String>, host: &str) -> ArchiverConfig {
        ArchiverConfig {
            key: key.into(),
            host: clean_host(host),
            max_segment_bytes: 8 << 20,
            max_segment_age: Duration::from_secs(300),
            frame_len: DEFAULT_FRAME_LEN,
        }
    }
}

/// A sealed segment, as written.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub name: String,
    pub info: SegmentInfo,
    pub bytes: usize,
}

/// Counters for throughput and cost reports.
#[derive(Debug, Clone, Default)]
pub struct ArchiverStats {
    pub alerts: u64,
    pub segments: u64,
    pub plaintext_bytes: u64,
    pub ciphertext_bytes: u64,
}

/// How many of the newest segments `open` copies to a destination that lacks them.
pub const CATCH_UP_SEGMENTS: u64 = 16;

/// A segment sealed by [`Archiver::seal_exact`] and not yet known to be written: its
/// caller keeps it (encrypted) until [`Archiver::write_sealed`] succeeds.
#[derive(Clone)]
pub struct SealedSegment {
    pub name: String,
    pub info: SegmentInfo,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for SealedSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedSegment")
            .field("name", &self.name)
            .field("info", &self.info)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

impl SealedSegment {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// JSON Lines of one segment in the making, and what its context will say about them.
#[derive(Default)]
struct Plain {
    buf: Vec<u8>,
    count: u64,
    first: Option<String>,
    last: Option<String>,
}

impl Plain {
    fn push(&mut self, alert: &Value) {
        let Ok(line) = serde_json::to_vec(alert) else {
            return; // a serde_json::Value always serializes
        };
        // Only a plausible RFC 3339 time goes into the encryption context (which is
        // capped at 64 KiB); anything else is dated now.
        let time = alert
            .get("time")
            .and_then(Value::as_str)
            .filter(|t| plausible_time(t))
            .map(str::to_string)
            .unwrap_or_else(now_rfc3339);
        if self.first.as_ref().is_none_or(|f| time < *f) {
            self.first = Some(time.clone());
        }
        if self.last.as_ref().is_none_or(|l| time > *l) {
            self.last = Some(time);
        }
        self.buf.extend_from_slice(&line);
        self.buf.push(b'\n');
        self.count += 1;
    }
}

struct Pending {
    name: String,
    bytes: Vec<u8>,
    /// Indexes of the stores that still need it.
    stores: Vec<usize>,
}

pub struct Archiver {
    cfg: ArchiverConfig,
    keyring: Arc<Keyring>,
    stores: Vec<Store>,
    open_segment: Plain,
    opened: Option<Instant>,
    next_seq: u64,
    prev: String,
    pending: Vec<Pending>,
    stats: ArchiverStats,
}

impl Archiver {
    /// Opens the archive for `cfg.host`: finds the host's last segment in the destinations
    /// and continues its chain from there.
    pub async fn open(
        cfg: ArchiverConfig,
        keyring: Arc<Keyring>,
        stores: Vec<Store>,
    ) -> Result<Archiver, ArchiveError> {
        if stores.is_empty() {
            return Err(ArchiveError::Config(
                "no archive destination: give a folder and/or s3://bucket/prefix".into(),
            ));
        }
        if cfg.frame_len == 0 || cfg.max_segment_bytes == 0 {
            return Err(ArchiveError::Config(
                "frame length and segment size must be above zero".into(),
            ));
        }
        // Each destination's segments of this host, in chain order.
        let mut chains = Vec::with_capacity(stores.len());
        for store in &stores {
            if let super::store::Location::Dir(d) = &store.location {
                if !d.exists() {
                    chains.push(Vec::new()); // a new archive: made on the first write
                    continue;
                }
            }
            let mut mine: Vec<(u64, String)> = store
                .list()
                .await?
                .into_iter()
                .filter_map(|n| parse_object_name(&n).map(|(h, s)| (h, s, n)))
                .filter(|(h, _, _)| *h == cfg.host)
                .map(|(_, s, n)| (s, n))
                .collect();
            mine.sort();
            chains.push(mine);
        }
        let head_of = |c: &Vec<(u64, String)>| c.last().map_or(0, |(s, _)| *s);
        let Some(lead) = (0..stores.len()).max_by_key(|&i| head_of(&chains[i])) else {
            return Err(ArchiveError::Config("no archive destination".into()));
        };
        let mut next_seq = 1;
        let mut prev = GENESIS.to_string();
        if let Some((seq, name)) = chains[lead].last().cloned() {
            let store = &stores[lead];
            let bytes = store.get(&name).await?;
            let header = message::parse_header(&bytes).map_err(|e| ArchiveError::Format {
                segment: store.display_name(&name),
                source: e,
            })?;
            let info =
                SegmentInfo::from_context(&header.context).map_err(|m| ArchiveError::Segment {
                    segment: store.display_name(&name),
                    message: m,
                })?;
            if info.seq != seq {
                return Err(ArchiveError::Segment {
                    segment: store.display_name(&name),
                    message: format!(
                        "its name says segment {seq} but its header says {}; run `kmsguard archive verify {}`",
                        info.seq, store.location
                    ),
                });
            }
            next_seq = seq + 1;
            prev = sha256_hex(&bytes);
            // A writer stopped between two destinations leaves one behind: bring a
            // destination up to date when it lacks a few of the newest segments (so its
            // chain has no gap). One that lacks more joined later, and starts mid-chain.
            for (i, chain) in chains.iter().enumerate() {
                let behind = seq - head_of(chain);
                if i == lead || behind == 0 || behind > CATCH_UP_SEGMENTS {
                    continue;
                }
                for (s, n) in chains[lead].iter().filter(|(s, _)| *s > head_of(chain)) {
                    let b = stores[lead].get(n).await?;
                    stores[i].put_or_same(n, &b).await?;
                    tracing::info!(segment = *s, to = %stores[i].display_name(n), "archive: copied a segment this destination lacked");
                }
            }
        }
        Ok(Archiver {
            cfg,
            keyring,
            stores,
            open_segment: Plain::default(),
            opened: None,
            next_seq,
            prev,
            pending: Vec::new(),
            stats: ArchiverStats::default(),
        })
    }

    pub fn stats(&self) -> &ArchiverStats {
        &self.stats
    }

    /// KMS calls made by this archiver's keyring (all callers of it).
    pub fn kms_calls(&self) -> u64 {
        self.keyring.calls()
    }

    /// The sequence number the next segment will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Buffers `alerts`; seals and writes segments that are full or old enough. Returns
    /// the segments written by this call. Every alert is taken even when this returns an
    /// error (KMS or S3 unreachable): it stays buffered, or sealed and pending, and goes
    /// out with a later call.
    pub async fn append(&mut self, alerts: &[Value]) -> Result<Vec<Sealed>, ArchiveError> {
        let mut sealed = Vec::new();
        let mut first_err = None;
        if self.due() {
            match self.seal_and_write().await {
                Ok(s) => sealed.extend(s),
                Err(e) => first_err = Some(e),
            }
        }
        for alert in alerts {
            if self.opened.is_none() {
                self.opened = Some(Instant::now());
            }
            self.open_segment.push(alert);
            if self.open_segment.buf.len() >= self.cfg.max_segment_bytes && first_err.is_none() {
                match self.seal_and_write().await {
                    Ok(s) => sealed.extend(s),
                    Err(e) => first_err = Some(e),
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(sealed),
        }
    }

    /// Whether the open segment is older than the configured age.
    pub fn due(&self) -> bool {
        self.opened
            .is_some_and(|t| t.elapsed() >= self.cfg.max_segment_age)
    }

    /// Seals what is buffered (if anything) and writes every pending segment.
    pub async fn flush(&mut self) -> Result<Vec<Sealed>, ArchiveError> {
        self.seal_and_write().await
    }

    async fn seal_and_write(&mut self) -> Result<Vec<Sealed>, ArchiveError> {
        let mut out = Vec::new();
        if self.open_segment.count > 0 {
            out.push(self.seal().await?);
        }
        self.write_pending().await?;
        Ok(out)
    }

    async fn seal(&mut self) -> Result<Sealed, ArchiveError> {
        let plain = std::mem::take(&mut self.open_segment);
        let segment = match self.encrypt(&plain).await {
            Ok(s) => s,
            Err(e) => {
                self.open_segment = plain; // the alerts wait for the next try
                return Err(e);
            }
        };
        self.opened = None;
        let sealed = Sealed {
            name: segment.name.clone(),
            info: segment.info,
            bytes: segment.bytes.len(),
        };
        self.pending.push(Pending {
            name: segment.name,
            bytes: segment.bytes,
            stores: (0..self.stores.len()).collect(),
        });
        Ok(sealed)
    }

    /// Seals exactly `alerts` into one segment (one `GenerateDataKey`) that continues the
    /// chain, without writing it and without buffering: the caller keeps the alerts (the
    /// daemon: in its outbox) until [`Archiver::write_sealed`] succeeded, and must write
    /// this segment before it seals the next. Not to be mixed with `append`.
    pub async fn seal_exact(&mut self, alerts: &[Value]) -> Result<SealedSegment, ArchiveError> {
        if self.open_segment.count > 0 || !self.pending.is_empty() {
            return Err(ArchiveError::Config(
                "seal_exact on an archiver with buffered alerts: use append/flush or seal_exact, not both".into(),
            ));
        }
        if alerts.is_empty() {
            return Err(ArchiveError::Config(
                "an archive segment needs at least one alert".into(),
            ));
        }
        let mut plain = Plain::default();
        for a in alerts {
            plain.push(a);
        }
        self.encrypt(&plain).await
    }

    /// Writes a segment from [`Archiver::seal_exact`] to every destination, skipping
    /// those that already hold it (so retrying after a partial failure is safe).
    pub async fn write_sealed(&self, segment: &SealedSegment) -> Result<(), ArchiveError> {
        let mut first_err = None;
        for store in &self.stores {
            if let Err(e) = store.put_or_same(&segment.name, &segment.bytes).await {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Encrypts `plain` as the next segment of the chain and advances the chain.
    async fn encrypt(&mut self, plain: &Plain) -> Result<SealedSegment, ArchiveError> {
        let info = SegmentInfo {
            host: self.cfg.host.clone(),
            seq: self.next_seq,
            prev_sha256: self.prev.clone(),
            first_alert: plain.first.clone().unwrap_or_default(),
            last_alert: plain.last.clone().unwrap_or_default(),
            alerts: plain.count,
        };
        let ctx = info.context();
        let name = info.object_name();
        let (data_key, edk) = self.keyring.generate(&self.cfg.key, &ctx).await?;
        let mut message_id = [0u8; 32];
        getrandom::fill(&mut message_id).map_err(|e| {
            ArchiveError::Config(format!("no randomness from the operating system: {e}"))
        })?;
        let bytes = message::encrypt(
            &data_key,
            message_id,
            &ctx,
            &[edk],
            self.cfg.frame_len,
            &plain.buf,
        )
        .map_err(|e| ArchiveError::Format {
            segment: name.clone(),
            source: e,
        })?;
        drop(data_key);
        self.stats.alerts += plain.count;
        self.stats.segments += 1;
        self.stats.plaintext_bytes += plain.buf.len() as u64;
        self.stats.ciphertext_bytes += bytes.len() as u64;
        self.prev = sha256_hex(&bytes);
        self.next_seq += 1;
        Ok(SealedSegment { name, info, bytes })
    }

    async fn write_pending(&mut self) -> Result<(), ArchiveError> {
        let mut first_err = None;
        for p in &mut self.pending {
            let mut left = Vec::new();
            for &i in &p.stores {
                if let Err(e) = self.stores[i].put(&p.name, &p.bytes).await {
                    first_err.get_or_insert(e);
                    left.push(i);
                }
            }
            p.stores = left;
            if !p.stores.is_empty() {
                // Keep chain order per destination: later segments wait for this one.
                break;
            }
        }
        self.pending.retain(|p| !p.stores.is_empty());
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Alerts buffered for the open segment (not yet encrypted).
    pub fn buffered(&self) -> u64 {
        self.open_segment.count
    }

    /// Segments sealed but not yet written everywhere.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ` (UTC), for alerts without a `time`.
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    rfc3339(secs)
}

/// Seconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(secs: u64) -> String {
    crate::clock::format_unix(secs as i64)
}

#[cfg(test)]
mod tests {
    /// The daemon spawns archiving on tokio: its futures must be `Send`.
    #[allow(dead_code)]
    fn archiver_futures_are_send(a: &mut super::Archiver) {
        fn send<T: Send>(_: T) {}
        send(a.append(&[]));
    }

    #[allow(dead_code)]
    fn archiver_flush_is_send(a: &mut super::Archiver) {
        fn send<T: Send>(_: T) {}
        send(a.flush());
    }

    #[allow(dead_code)]
    fn seal_exact_and_write_sealed_are_send(a: &mut super::Archiver, s: &super::SealedSegment) {
        fn send<T: Send>(_: T) {}
        send(a.seal_exact(&[]));
        let a: &super::Archiver = a;
        send(a.write_sealed(s));
    }

    #[test]
    fn formats_utc_times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339(1_790_000_000), "2026-09-21T14:13:20Z");
        assert_eq!(super::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
