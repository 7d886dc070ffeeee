//! The replay pipeline: files -> decode -> analyze -> findings, on `jobs` worker threads.
//! Workers each own a `Decoder` and pull the next file from a shared counter; results
//! flow back over a bounded channel to the collecting thread, which deduplicates findings
//! by their stable id (CloudTrail delivers some events twice) and reports progress.

use crate::analyze::baseline::{self, Baseline, BaselineConfig, Detector, Observation};
use crate::analyze::finding::Finding;
use crate::analyze::key_facts::{self, FactEvent};
use crate::analyze::rule::RuleSet;
use crate::decode::{DecodeLimits, Decoder, FileReport};
use crate::inventory::activity::Activity;
use crate::remediate::history::{self, KeyEvent};
use crate::source::lookup_events::LookupReader;
use crate::source::s3::S3Reader;
use crate::source::LogInput;
use crate::store::{self, Commit, Store, StoreError};
use crate::timeline::Timeline;
use std::collections::{BTreeMap, HashSet};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Worker threads (at least 1).
    pub jobs: usize,
    pub limits: DecodeLimits,
    /// Baseline detectors; None turns them off.
    pub baselines: Option<BaselineConfig>,
    /// Train baselines only: no findings are returned.
    pub learn_only: bool,
    /// Record when each key was last seen, used and changed (for the key inventory).
    pub track_activity: bool,
    /// Count KMS activity per hour and per (principal, key) for the HTML report.
    pub timeline: bool,
    /// How workers read `LogInput::S3` objects (None: such inputs fail as unreadable).
    pub s3: Option<S3Reader>,
    /// How workers read `LogInput::Api` slices (None: such inputs fail as unreadable).
    pub lookup: Option<LookupReader>,
    /// Leave rules' undecided key conditions (`tag:`, `key:alias`) in
    /// `Finding::pending` for the caller to decide after enrichment
    /// (`analyze::rule::resolve_all`); by default they are decided at the end of the
    /// replay with what the events say about their keys.
    pub defer_key_conditions: bool,
    /// Collect the key events remediation looks at (`remediate::history`), in input order.
    pub key_events: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            jobs: default_jobs(),
            limits: DecodeLimits::default(),
            baselines: Some(BaselineConfig::default()),
            learn_only: false,
            track_activity: false,
            timeline: false,
            s3: None,
            lookup: None,
            defer_key_conditions: false,
            key_events: false,
        }
    }
}

/// The number of cores, or 1 when it cannot be told.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Totals over a replay.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplayStats {
    pub files: u64,
    pub bad_files: u64,
    pub digests_skipped: u64,
    pub records: u64,
    pub kms_records: u64,
    pub parsed_records: u64,
    pub compressed_bytes: u64,
    pub json_bytes: u64,
    pub findings: u64,
    pub duplicate_findings: u64,
    /// Files whose baseline effects were already in the state store (not counted twice).
    pub files_already_learned: u64,
    pub principals: u64,
    /// S3 ListObjectsV2 requests made to find the inputs (s3:// sources), retries
    /// included.
    pub list_requests: u64,
    /// S3 GetObject requests made to read them, retries included.
    pub get_requests: u64,
    /// Of those, attempts that failed transiently (throttling, 5xx, a cut download) and
    /// were tried again.
    pub get_retries: u64,
    /// Requests to the CloudTrail API (cloudtrail:// sources).
    pub api_requests: u64,
    /// Of those, requests that were throttled and retried.
    pub api_throttled: u64,
    pub elapsed_secs: f64,
    /// Peak resident memory of the process, when the OS tells it.
    pub peak_rss_bytes: Option<u64>,
}

impl ReplayStats {
    pub fn json_mb_per_sec(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.json_bytes as f64 / 1e6 / self.elapsed_secs
        } else {
            0.0
        }
    }
}

/// One file finished: what the collector tells its caller after each file.
pub struct FileDone<'a> {
    pub file: &'a LogInput,
    pub report: &'a FileReport,
    pub files_done: usize,
    pub files_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub started: Instant,
}

pub struct ReplayOutcome {
    pub findings: Vec<Finding>,
    pub stats: ReplayStats,
    /// Key activity, when `track_activity` was set.
    pub activity: Option<Activity>,
    /// KMS activity per hour and per (principal, key), when `timeline` was set.
    pub timeline: Option<Timeline>,
    /// The key events of every input in input order, when `key_events` was set.
    pub key_events: Vec<KeyEvent>,
}

/// Hands out file indexes to workers, at most `window` ahead of the collector, so
/// results wait in a bounded reorder buffer.
struct Dispatch {
    state: Mutex<(usize, usize)>, // (next to hand out, next the collector needs)
    moved: Condvar,
    window: usize,
}

impl Dispatch {
    fn take(&self, total: usize) -> Option<usize> {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (next, needed) = *g;
            if next >= total {
                return None;
            }
            if next < needed + self.window {
                g.0 += 1;
                return Some(next);
            }
            g = self.moved.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn advance(&self, needed: usize) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.1 = needed;
        self.moved.notify_all();
    }

    /// The index of the file the collector waits for.
    fn needed(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1
    }

    fn stop(&self) {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = usize::MAX / 2;
        self.moved.notify_all();
    }
}

/// What decoding and rule evaluation make of one log file.
pub struct Analysis {
    pub report: FileReport,
    pub findings: Vec<Finding>,
    pub observations: Vec<Observation>,
    /// Events that can settle a pending remediation, and closed key policies, in file
    /// order (`remediate::history`).
    pub key_events: Vec<KeyEvent>,
    /// Changes to keys' tags and aliases, in file order (`analyze::key_facts`).
    pub key_facts: Vec<FactEvent>,
}

/// Decodes one input with `decode` (a `Decoder` method) and runs the rules on every
/// event; collects baseline observations too when `with_baselines`. The one analysis
/// path of replay and the daemon.
pub fn analyze(
    rules: &RuleSet,
    name: &str,
    collect: Collect,
    decode: impl FnOnce(&mut dyn FnMut(&crate::event::Event<'_>)) -> FileReport,
) -> Analysis {
    analyze_streaming(rules, name, collect, &mut |_| {}, decode)
}

/// What an analysis collects besides rule findings; each costs work per event, so only
/// what a caller uses is collected.
#[derive(Debug, Clone, Copy, Default)]
pub struct Collect {
    /// Baseline observations (`Analysis::observations`).
    pub observations: bool,
    /// The key events remediation looks at (`Analysis::key_events`).
    pub key_events: bool,
}

/// Key events a replay holds before it drops those `history::writes` would drop.
const COMPACT_KEY_EVENTS: usize = 65_536;

/// Observations collected before `analyze_streaming` offers them to `flush`.
const OBSERVATION_CHUNK: usize = 16_384;

/// `analyze`, offering the observations collected so far to `flush` every
/// `OBSERVATION_CHUNK` events; `flush` may take them (so a huge file's observations need
/// not all be held at once) or leave them in the vector.
pub fn analyze_streaming(
    rules: &RuleSet,
    name: &str,
    collect: Collect,
    flush: &mut dyn FnMut(&mut Vec<Observation>),
    decode: impl FnOnce(&mut dyn FnMut(&crate::event::Event<'_>)) -> FileReport,
) -> Analysis {
    let mut findings = Vec::new();
    let mut observations = Vec::new();
    let mut key_events = Vec::new();
    let mut key_facts = Vec::new();
    let file: std::sync::Arc<str> = name.into();
    let mut offered_at = OBSERVATION_CHUNK;
    let report = decode(&mut |ev| {
        rules.evaluate(ev, name, &mut findings);
        if collect.key_events {
            key_events.extend(history::observe(ev));
        }
        key_facts.extend(key_facts::observe(ev));
        if collect.observations {
            observations.extend(baseline::observe(ev, &file));
            if observations.len() >= offered_at {
                flush(&mut observations);
                offered_at = observations.len() + OBSERVATION_CHUNK;
            }
        }
    });
    observations.sort_by_key(|o| o.time);
    Analysis {
        report,
        findings,
        observations,
        key_events,
        key_facts,
    }
}

type WorkerResult = (
    usize,
    FileReport,
    Vec<Finding>,
    Vec<Observation>,
    Vec<KeyEvent>,
    Vec<FactEvent>,
);

/// What workers send the collector: a file's observations in advance (only for the file
/// the collector is waiting for, so they are used at once), then the file's result.
enum WorkerMsg {
    Chunk(usize, Vec<Observation>),
    Done(WorkerResult),
}

/// Replays `files` through `rules` and (when enabled) the baseline detectors, whose state
/// lives in `store`. Files are decoded in parallel and analyzed for baselines in order
/// (the order of `files`: time order for CloudTrail names). `on_file` is called on the
/// calling thread after each file (for progress and problem reports).
pub fn replay(
    files: &[LogInput],
    rules: &RuleSet,
    opts: &ReplayOptions,
    store: &Store,
    on_file: &mut dyn FnMut(&FileDone<'_>),
) -> Result<ReplayOutcome, StoreError> {
    let started = Instant::now();
    let jobs = opts.jobs.clamp(1, files.len().max(1));
    let dispatch = Dispatch {
        state: Mutex::new((0, 0)),
        moved: Condvar::new(),
        window: jobs * 4,
    };
    let bytes_total: u64 = files.iter().map(LogInput::size).sum();
    let mut stats = ReplayStats::default();
    let mut findings = Vec::new();
    let mut seen = HashSet::new();
    let mut detector = opts.baselines.clone().map(Detector::new);
    let with_baselines = detector.is_some();
    let mut failure: Option<StoreError> = None;
    let mut activity = None;
    let mut timeline = None;
    let mut key_events = Vec::new();
    let mut compact_at = COMPACT_KEY_EVENTS;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<WorkerMsg>(jobs * 4);
        let track = opts.track_activity;
        let mut workers = Vec::new();
        for _ in 0..jobs {
            let tx = tx.clone();
            let dispatch = &dispatch;
            let limits = opts.limits;
            workers.push(scope.spawn(move || {
                let mut decoder = Decoder::new(limits);
                let mut act = Activity::default();
                let mut tl = Timeline::default();
                let with_timeline = opts.timeline;
                while let Some(i) = dispatch.take(files.len()) {
                    let file = &files[i];
                    let name = file.name();
                    let s3 = opts.s3.as_ref();
                    let lookup = opts.lookup.as_ref();
                    let chunk_tx = tx.clone();
                    let mut flush = |obs: &mut Vec<Observation>| {
                        if dispatch.needed() == i {
                            obs.sort_by_key(|o| o.time);
                            let _ = chunk_tx.send(WorkerMsg::Chunk(i, std::mem::take(obs)));
                        }
                    };
                    let collect = Collect {
                        observations: with_baselines,
                        key_events: opts.key_events,
                    };
                    let a = analyze_streaming(rules, &name, collect, &mut flush, |on_event| {
                        let mut each = |ev: &crate::event::Event<'_>| {
                            if track {
                                act.observe(ev);
                            }
                            if with_timeline {
                                tl.observe(ev);
                            }
                            on_event(ev);
                        };
                        match file {
                            LogInput::Local(f) => decoder.decode_file(&f.path, &mut each),
                            LogInput::S3(obj) => match s3.map(|r| r.get(obj)) {
                                Some(Ok(bytes)) => decoder.decode_bytes(
                                    &bytes,
                                    obj.key.ends_with(".gz"),
                                    &mut each,
                                ),
                                Some(Err(e)) => crate::decode::failure(e.to_string()),
                                None => crate::decode::failure(
                                    "no S3 client for this replay".to_string(),
                                ),
                            },
                            LogInput::Api(slice) => match lookup.map(|r| r.fetch(slice)) {
                                Some(Ok((doc, bad))) => {
                                    let mut report = decoder.decode_bytes(&doc, false, &mut each);
                                    if bad > 0 {
                                        report.problems.push(
                                            crate::decode::DecodeProblem::InvalidJson {
                                                count: bad,
                                                first:
                                                    "a CloudTrailEvent that is not a JSON object"
                                                        .into(),
                                            },
                                        );
                                    }
                                    report
                                }
                                Some(Err(e)) => crate::decode::failure(e.to_string()),
                                None => crate::decode::failure(
                                    "no CloudTrail client for this replay".to_string(),
                                ),
                            },
                            LogInput::Memory { bytes, .. } => {
                                decoder.decode_bytes(bytes, false, &mut each)
                            }
                        }
                    });
                    if tx
                        .send(WorkerMsg::Done((
                            i,
                            a.report,
                            a.findings,
                            a.observations,
                            a.key_events,
                            a.key_facts,
                        )))
                        .is_err()
                    {
                        break;
                    }
                }
                (act, tl)
            }));
        }
        drop(tx);
        let mut pending: BTreeMap<usize, WorkerResult> = BTreeMap::new();
        let mut chunks: BTreeMap<usize, Vec<Vec<Observation>>> = BTreeMap::new();
        // The file whose observations are being learned, and whether the ledger says it
        // was learned before (then its observations are skipped).
        let mut learning: Option<(usize, bool)> = None;
        let mut ledger: Vec<String> = Vec::new();
        let mut last_commit = Instant::now();
        let mut needed = 0;
        let mut bytes_done = 0;
        let mut facts_so_far = key_facts::Tracker::default();
        let mut emit = |f: Finding, stats: &mut ReplayStats, findings: &mut Vec<Finding>| {
            if seen.insert(f.id.clone()) {
                findings.push(f);
            } else {
                stats.duplicate_findings += 1;
            }
        };
        for msg in rx {
            match msg {
                WorkerMsg::Chunk(i, obs) => chunks.entry(i).or_default().push(obs),
                WorkerMsg::Done(result) => {
                    pending.insert(result.0, result);
                }
            }
            // Observations sent ahead for the file being waited for.
            if let (Some(list), Some(det), None) =
                (chunks.get_mut(&needed), detector.as_mut(), failure.as_ref())
            {
                for obs in std::mem::take(list) {
                    let mut step = || -> Result<(), StoreError> {
                        // The ledger is asked once per file, at its first chunk.
                        let skip = match learning {
                            Some((f, skip)) if f == needed => skip,
                            _ => store.ledger_contains(&files[needed].ledger_key())?,
                        };
                        learning = Some((needed, skip));
                        if !skip {
                            for f in observe_batch(det, store, &obs, !opts.learn_only)? {
                                emit(f, &mut stats, &mut findings);
                            }
                        }
                        Ok(())
                    };
                    if let Err(e) = step() {
                        failure = Some(e);
                        dispatch.stop();
                    }
                }
            }
            while let Some((i, report, mut found, mut observed, mut keyed, facts)) =
                pending.remove(&needed)
            {
                key_events.append(&mut keyed);
                if key_events.len() > compact_at {
                    history::compact(&mut key_events);
                    compact_at = (key_events.len() * 2).max(COMPACT_KEY_EVENTS);
                }
                // What earlier events (this file's up to each finding, and earlier files')
                // said about the findings' keys, for key conditions decided offline.
                facts_so_far.carry(&facts, &mut found);
                // Chunks are used as they arrive; any still here precede the rest.
                if let Some(list) = chunks.remove(&i) {
                    let mut early: Vec<Observation> = list.into_iter().flatten().collect();
                    early.append(&mut observed);
                    observed = early;
                }
                needed += 1;
                dispatch.advance(needed);
                bytes_done += files[i].size();
                let s = &report.stats;
                stats.files += 1;
                stats.bad_files += u64::from(report.is_bad());
                stats.records += s.records;
                stats.kms_records += s.kms_records;
                stats.parsed_records += s.parsed;
                stats.compressed_bytes += s.compressed_bytes;
                stats.json_bytes += s.json_bytes;
                if !opts.learn_only {
                    for f in found {
                        emit(f, &mut stats, &mut findings);
                    }
                }
                if let (Some(det), None) = (detector.as_mut(), failure.as_ref()) {
                    let key = files[i].ledger_key();
                    let mut step = || -> Result<(), StoreError> {
                        let skip = match learning.take() {
                            Some((f, skip)) if f == i => skip,
                            _ => store.ledger_contains(&key)?,
                        };
                        if skip {
                            stats.files_already_learned += 1;
                        } else {
                            for f in observe_batch(det, store, &observed, !opts.learn_only)? {
                                emit(f, &mut stats, &mut findings);
                            }
                            ledger.push(key.clone());
                        }
                        // Commit every second (or 4096 files): a batch's ledger entries
                        // and the baselines its files changed land together or not at
                        // all; a crash costs at most the uncommitted second of work.
                        if ledger.len() >= 4096 || last_commit.elapsed() >= Duration::from_secs(1) {
                            commit_batch(det, store, &mut ledger)?;
                            last_commit = Instant::now();
                        }
                        Ok(())
                    };
                    if let Err(e) = step() {
                        failure = Some(e);
                        dispatch.stop();
                    }
                }
                on_file(&FileDone {
                    file: &files[i],
                    report: &report,
                    files_done: needed,
                    files_total: files.len(),
                    bytes_done,
                    bytes_total,
                    started,
                });
            }
        }
        if let (Some(det), None) = (detector.as_mut(), failure.as_ref()) {
            let spikes = det.flush(!opts.learn_only);
            match commit_batch(det, store, &mut ledger) {
                Ok(()) => {
                    for f in spikes {
                        emit(f, &mut stats, &mut findings);
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        let mut all = Activity::default();
        let mut all_tl = Timeline::default();
        for w in workers {
            if let Ok((a, t)) = w.join() {
                all.merge(a);
                all_tl.merge(t);
            }
        }
        if track {
            activity = Some(all);
        }
        if opts.timeline {
            timeline = Some(all_tl);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    store.flush()?;
    if !opts.defer_key_conditions {
        crate::analyze::rule::resolve_all(&mut findings);
    }
    findings.sort_by(|a, b| (&a.time, &a.rule, &a.id).cmp(&(&b.time, &b.rule, &b.id)));
    stats.findings = findings.len() as u64;
    stats.principals = store.baseline_count() as u64;
    stats.elapsed_secs = started.elapsed().as_secs_f64();
    stats.peak_rss_bytes = peak_rss_bytes();
    Ok(ReplayOutcome {
        findings,
        stats,
        activity,
        timeline,
        key_events,
    })
}

fn encode_dirty(det: &mut Detector) -> Vec<(String, Option<Vec<u8>>)> {
    det.take_dirty()
        .into_iter()
        .map(|(p, b)| (p, Some(store::encode(&b))))
        .collect()
}

fn commit_batch(
    det: &mut Detector,
    store: &Store,
    ledger: &mut Vec<String>,
) -> Result<(), StoreError> {
    store.commit(&Commit {
        ledger: std::mem::take(ledger),
        baselines: encode_dirty(det),
        ..Commit::default()
    })?;
    det.trim_cache(100_000);
    Ok(())
}

/// Runs one input's observations through the detectors (the caller commits them with
/// `ledger_key`). None when the ledger says the input was learned before.
pub fn learn(
    det: &mut Detector,
    store: &Store,
    ledger_key: &str,
    observed: &[Observation],
    report: bool,
) -> Result<Option<Vec<Finding>>, StoreError> {
    if store.ledger_contains(ledger_key)? {
        return Ok(None);
    }
    observe_batch(det, store, observed, report).map(Some)
}

/// Observations through the detectors, loading baselines from the store as needed.
fn observe_batch(
    det: &mut Detector,
    store: &Store,
    observed: &[Observation],
    report: bool,
) -> Result<Vec<Finding>, StoreError> {
    let mut out = Vec::new();
    for o in observed {
        if !det.is_cached(o.principal()) {
            if let Some(raw) = store.baseline_raw(o.principal())? {
                let b: Baseline = store::decode("baselines", o.principal(), &raw)?;
                det.load(o.principal().to_string(), b);
            }
        }
        out.extend(det.observe(o, report));
    }
    // Buckets the trail has moved past are judged now, not at the principal's next call.
    out.extend(det.close_elapsed(report));
    Ok(out)
}

/// The dirty baselines of `det`, serialized for a `Commit`.
pub fn dirty_baselines(det: &mut Detector) -> Vec<(String, Option<Vec<u8>>)> {
    encode_dirty(det)
}

/// VmHWM from /proc/self/status (Linux); None elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A progress line: files, MB/s of compressed input and an ETA.
pub fn progress_line(d: &FileDone<'_>) -> String {
    let secs = d.started.elapsed().as_secs_f64().max(1e-3);
    let rate = d.bytes_done as f64 / secs;
    let left = d.bytes_total.saturating_sub(d.bytes_done) as f64;
    let eta = if rate > 0.0 {
        Duration::from_secs_f64(left / rate).as_secs()
    } else {
        0
    };
    format!(
        "{}/{} files, {:.1} MB read, {:.1} MB/s (compressed), ETA {}m{:02}s",
        d.files_done,
        d.files_total,
        d.bytes_done as f64 / 1e6,
        rate / 1e6,
        eta / 60,
        eta % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory batch goes through the same path as files: rules, ledger, timeline;
    /// an S3 input without a reader is reported as unreadable, not a panic.
    #[test]
    fn memory_batches_and_unreadable_inputs() {
        let rules = RuleSet::builtin().expect("built-in rules");
        let store = Store::temporary().expect("temporary store");
        let doc = br#"{"Records":[{"eventVersion":"1.09","eventSource":"kms.amazonaws.com","eventName":"ScheduleKeyDeletion","eventTime":"2026-10-01T10:00:00Z","eventID":"e-1","awsRegion":"us-east-1","recipientAccountId":"111122223333","userIdentity":{"type":"IAMUser","arn":"arn:aws:iam::111122223333:user/alice","accountId":"111122223333"},"requestParameters":{"keyId":"arn:aws:kms:us-east-1:111122223333:key/k1","pendingWindowInDays":7},"resources":[{"type":"AWS::KMS::Key","ARN":"arn:aws:kms:us-east-1:111122223333:key/k1"}]}]}"#;
        let inputs = vec![
            LogInput::Memory {
                name: "batch-1".into(),
                ledger: "mem:batch-1".into(),
                bytes: doc.to_vec(),
            },
            LogInput::S3(crate::source::S3Object {
                bucket: "b".into(),
                key: "k.json.gz".into(),
                size: 10,
                etag: None,
            }),
        ];
        let opts = ReplayOptions {
            jobs: 2,
            timeline: true,
            ..ReplayOptions::default()
        };
        let mut names = Vec::new();
        let out = replay(&inputs, &rules, &opts, &store, &mut |d| {
            names.push((d.file.name(), d.report.is_bad()))
        })
        .expect("replay");
        assert_eq!(
            names,
            vec![
                ("batch-1".to_string(), false),
                ("s3://b/k.json.gz".to_string(), true)
            ]
        );
        assert!(out
            .findings
            .iter()
            .any(|f| f.rule == "kms-key-deletion-scheduled" && f.file == "batch-1"));
        assert_eq!(out.stats.bad_files, 1);
        assert!(store.ledger_contains("mem:batch-1").expect("ledger"));
        let tl = out.timeline.expect("timeline");
        assert_eq!(tl.events, 1);
        assert_eq!(
            tl.principals["arn:aws:iam::111122223333:user/alice"].count,
            1
        );
    }
}
