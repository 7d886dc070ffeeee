//! The replay pipeline: files -> decode -> analyze -> findings, on `jobs` worker threads.
//! Workers each own a `Decoder` and pull the next file from a shared counter; results
//! flow back over a bounded channel to the collecting thread, which deduplicates findings
//! by their stable id (CloudTrail delivers some events twice) and reports progress.

use crate::analyze::baseline::{self, Baseline, BaselineConfig, Detector, Observation};
use crate::analyze::finding::Finding;
use crate::analyze::rule::RuleSet;
use crate::decode::{DecodeLimits, Decoder, FileReport};
use crate::inventory::activity::Activity;
use crate::source::files::ledger_key;
use crate::source::LogFile;
use crate::store::{self, Commit, Store, StoreError};
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
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            jobs: default_jobs(),
            limits: DecodeLimits::default(),
            baselines: Some(BaselineConfig::default()),
            learn_only: false,
            track_activity: false,
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
    pub file: &'a LogFile,
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
}

/// Decodes one input with `decode` (a `Decoder` method) and runs the rules on every
/// event; collects baseline observations too when `with_baselines`. The one analysis
/// path of replay and the daemon.
pub fn analyze(
    rules: &RuleSet,
    name: &str,
    with_baselines: bool,
    decode: impl FnOnce(&mut dyn FnMut(&crate::event::Event<'_>)) -> FileReport,
) -> Analysis {
    let mut findings = Vec::new();
    let mut observations = Vec::new();
    let file: std::sync::Arc<str> = name.into();
    let report = decode(&mut |ev| {
        rules.evaluate(ev, name, &mut findings);
        if with_baselines {
            observations.extend(baseline::observe(ev, &file));
        }
    });
    observations.sort_by_key(|o| o.time);
    Analysis {
        report,
        findings,
        observations,
    }
}

type WorkerResult = (usize, FileReport, Vec<Finding>, Vec<Observation>);

/// Replays `files` through `rules` and (when enabled) the baseline detectors, whose state
/// lives in `store`. Files are decoded in parallel and analyzed for baselines in order
/// (the order of `files`: time order for CloudTrail names). `on_file` is called on the
/// calling thread after each file (for progress and problem reports).
pub fn replay(
    files: &[LogFile],
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
    let bytes_total: u64 = files.iter().map(|f| f.size).sum();
    let mut stats = ReplayStats::default();
    let mut findings = Vec::new();
    let mut seen = HashSet::new();
    let mut detector = opts.baselines.clone().map(Detector::new);
    let with_baselines = detector.is_some();
    let mut failure: Option<StoreError> = None;
    let mut activity = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<WorkerResult>(jobs * 4);
        let track = opts.track_activity;
        let mut workers = Vec::new();
        for _ in 0..jobs {
            let tx = tx.clone();
            let dispatch = &dispatch;
            let limits = opts.limits;
            workers.push(scope.spawn(move || {
                let mut decoder = Decoder::new(limits);
                let mut act = Activity::default();
                while let Some(i) = dispatch.take(files.len()) {
                    let file = &files[i];
                    let name = file.path.display().to_string();
                    let a = analyze(rules, &name, with_baselines, |on_event| {
                        decoder.decode_file(&file.path, &mut |ev| {
                            if track {
                                act.observe(ev);
                            }
                            on_event(ev);
                        })
                    });
                    if tx.send((i, a.report, a.findings, a.observations)).is_err() {
                        break;
                    }
                }
                act
            }));
        }
        drop(tx);
        let mut pending: BTreeMap<usize, WorkerResult> = BTreeMap::new();
        let mut ledger: Vec<String> = Vec::new();
        let mut last_commit = Instant::now();
        let mut needed = 0;
        let mut bytes_done = 0;
        let mut emit = |f: Finding, stats: &mut ReplayStats, findings: &mut Vec<Finding>| {
            if seen.insert(f.id.clone()) {
                findings.push(f);
            } else {
                stats.duplicate_findings += 1;
            }
        };
        for result in rx {
            pending.insert(result.0, result);
            while let Some((i, report, found, observed)) = pending.remove(&needed) {
                needed += 1;
                dispatch.advance(needed);
                bytes_done += files[i].size;
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
                    let key = ledger_key(&files[i]);
                    let mut step = || -> Result<(), StoreError> {
                        match learn(det, store, &key, &observed, !opts.learn_only)? {
                            Some(anomalies) => {
                                ledger.push(key.clone());
                                for f in anomalies {
                                    emit(f, &mut stats, &mut findings);
                                }
                            }
                            None => stats.files_already_learned += 1,
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
        if track {
            let mut all = Activity::default();
            for w in workers {
                if let Ok(a) = w.join() {
                    all.merge(a);
                }
            }
            activity = Some(all);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    store.flush()?;
    findings.sort_by(|a, b| (&a.time, &a.rule, &a.id).cmp(&(&b.time, &b.rule, &b.id)));
    stats.findings = findings.len() as u64;
    stats.principals = store.baseline_count() as u64;
    stats.elapsed_secs = started.elapsed().as_secs_f64();
    stats.peak_rss_bytes = peak_rss_bytes();
    Ok(ReplayOutcome {
        findings,
        stats,
        activity,
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
    Ok(Some(out))
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
