//! The replay pipeline: inputs -> decode -> analyze -> settle -> findings on disk, on
//! `jobs` worker threads, in bounded memory whatever the input's shape.
//!
//! A feeder thread pulls inputs from the source's iterator (the folder walk streams;
//! nothing holds every path) and hands them out in batches: many small files per batch
//! (an organization trail is mostly tiny files, so the cost per file must be small), a
//! large file alone. Workers decode, run the rules and fold their findings per file
//! (`analyze::fold`), and send results back; the collector (the calling thread) takes
//! them in input (= time) order, learns baselines, folds findings across files, and
//! spills finished folds to an on-disk spool (`store::Spool`) in output order.
//!
//! Bounds: batches in flight are at most a window ahead of the collector; a large file's
//! observations reach the collector in chunks of `OBSERVATION_CHUNK`, and a worker holds
//! a chunk only for the file the collector waits for (back-pressure), so chunk
//! boundaries are the same in every run; the detector's cache of baselines is an LRU
//! over the store, committed when it grows (with a ledger cursor for a partly learned
//! file, so a crash never counts a file twice); open folds are capped; findings live on
//! disk. What a cap drops is counted in `ReplayStats`.

use crate::analyze::baseline::{self, Baseline, BaselineConfig, Detector, Observation};
use crate::analyze::finding::Finding;
use crate::analyze::fold::{self, FileFolds, Folder, Policies};
use crate::analyze::key_facts::{self, FactEvent};
use crate::analyze::rule::RuleSet;
use crate::decode::{DecodeLimits, Decoder, FileReport};
use crate::inventory::activity::Activity;
use crate::remediate::history::{self, KeyEvent};
use crate::source::lookup_events::LookupReader;
use crate::source::s3::S3Reader;
use crate::source::LogInput;
use crate::store::{self, Commit, LedgerStatus, Spool, Store, StoreError};
use crate::timeline::Timeline;
use std::collections::{BTreeMap, VecDeque};
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
    /// Collect the key events remediation looks at (`remediate::history`), in input order.
    pub key_events: bool,
    /// Open folds at most (`analyze::fold`), per run; a file's own folds at most
    /// `fold_cap / 4`.
    pub fold_cap: usize,
    /// Baselines the detector caches at most (the rest stay in the store).
    pub cache_cap: usize,
    /// With a persistent store: ledger entries of files more than this many days older
    /// (by their name's stamp) than the newest file read are removed at the end.
    pub ledger_days: u32,
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
            key_events: false,
            fold_cap: fold::DEFAULT_CAP,
            cache_cap: CACHE_CAP,
            ledger_days: 30,
        }
    }
}

/// Baselines cached by default (each about 1-2 KB).
pub const CACHE_CAP: usize = 8192;
/// Changed baselines held before they are committed (mid-file for a large file).
const DIRTY_CAP: usize = 4096;
/// Observations per chunk of a large file.
pub const OBSERVATION_CHUNK: usize = 4096;
/// Inputs per batch at most, and compressed bytes per batch; an input this large or
/// larger is a batch of its own.
const BATCH_FILES: usize = 128;
const BATCH_BYTES: u64 = 1 << 20;

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
    /// Events not counted again because their finding had them already (CloudTrail
    /// delivers some events twice).
    pub duplicate_findings: u64,
    /// Findings that joined an overflow finding because the folding cap of open
    /// findings was reached (they are counted there, not listed).
    pub folded_overflow: u64,
    /// Baselines dropped from the detector's cache (kept in the store).
    pub baselines_evicted: u64,
    /// Commits made inside a large file (its baselines did not have to fit in memory).
    pub partial_commits: u64,
    /// Events of keys the key activity did not track (its cap was reached).
    pub activity_dropped: u64,
    /// Ledger entries removed at the end (older than `ledger_days`).
    pub ledger_pruned: u64,
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
    pub name: &'a str,
    pub report: &'a FileReport,
    pub files_done: usize,
    /// Inputs in all, when the source knows it up front.
    pub files_total: Option<usize>,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    pub started: Instant,
}

/// A replay's findings: on disk, in output order (event time, rule, id).
pub struct Findings {
    spool: Spool,
}

impl Findings {
    pub fn new(store: &Store) -> Result<Findings, StoreError> {
        Ok(Findings {
            spool: store.spool()?,
        })
    }

    /// Puts (or replaces, by id) a finding.
    pub fn put(&mut self, f: &Finding) -> Result<(), StoreError> {
        let mut f = f.clone();
        f.settle_counts();
        let order = format!("{}\u{0}{}", f.time, f.rule);
        self.spool.put(&f.id, &order, &store::encode(&f))?;
        Ok(())
    }

    pub fn remove(&mut self, id: &str) -> Result<(), StoreError> {
        self.spool.remove(id)
    }

    pub fn len(&self) -> usize {
        self.spool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spool.is_empty()
    }

    /// Every finding, in output order.
    pub fn iter(&self) -> impl Iterator<Item = Result<Finding, StoreError>> + '_ {
        self.spool
            .values()
            .map(|v| v.and_then(|b| store::decode("spool", "finding", &b)))
    }

    /// Every finding, in memory (tests and small runs).
    pub fn to_vec(&self) -> Result<Vec<Finding>, StoreError> {
        self.iter().collect()
    }
}

pub struct ReplayOutcome {
    pub findings: Findings,
    pub stats: ReplayStats,
    /// Key activity, when `track_activity` was set.
    pub activity: Option<Activity>,
    /// KMS activity per hour and per (principal, key), when `timeline` was set.
    pub timeline: Option<Timeline>,
    /// The key events of every input in input order, when `key_events` was set.
    pub key_events: Vec<KeyEvent>,
}

/// What decoding and rule evaluation make of one log file.
pub struct Analysis {
    pub report: FileReport,
    /// The rules' findings, folded per file (`analyze::fold`).
    pub findings: Vec<Finding>,
    /// Findings that joined an overflow finding (the file's folding cap).
    pub fold_overflowed: u64,
    pub observations: Vec<Observation>,
    /// Observation chunks handed to `flush` before the rest (in `observations`).
    pub chunks: u64,
    /// Events that can settle a pending remediation, and closed key policies, in file
    /// order (`remediate::history`).
    pub key_events: Vec<KeyEvent>,
    /// Changes to keys' tags and aliases, in file order (`analyze::key_facts`).
    pub key_facts: Vec<FactEvent>,
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
/// Key-fact changes one file contributes at most.
const MAX_FILE_FACTS: usize = 65_536;

/// Decodes one input with `decode` (a `Decoder` method) and runs the rules on every
/// event; collects baseline observations too when `collect.observations`. The one
/// analysis path of replay and the daemon.
pub fn analyze(
    rules: &RuleSet,
    name: &str,
    collect: Collect,
    decode: impl FnOnce(&mut dyn FnMut(&crate::event::Event<'_>)) -> FileReport,
) -> Analysis {
    analyze_streaming(rules, name, collect, usize::MAX, &mut |_| {}, decode)
}

/// What `analyze_streaming` hands out for each full chunk of a large input: its
/// observations (sorted by time), the rules' folds since the last chunk, and the key-fact
/// changes since then.
pub struct ChunkOut {
    pub observations: Vec<Observation>,
    pub findings: Vec<Finding>,
    pub key_facts: Vec<FactEvent>,
}

/// `analyze`, handing out the observations to `flush` in chunks of `chunk` as they fill
/// (with the findings and key facts since the last chunk), so a huge file's results need
/// not all be held at once; what follows the last full chunk is left in the `Analysis`.
pub fn analyze_streaming(
    rules: &RuleSet,
    name: &str,
    collect: Collect,
    chunk: usize,
    flush: &mut dyn FnMut(ChunkOut),
    decode: impl FnOnce(&mut dyn FnMut(&crate::event::Event<'_>)) -> FileReport,
) -> Analysis {
    let policies = rules.policies();
    let mut found = Vec::new();
    // A chunk goes out when its folds fill too (many distinct findings, baselines off).
    let mut folds = FileFolds::new(2 * chunk.clamp(1, fold::DEFAULT_CAP));
    let mut observations = Vec::new();
    let mut key_events = Vec::new();
    let mut key_facts = Vec::new();
    let mut chunks = 0;
    let file: std::sync::Arc<str> = name.into();
    let report = decode(&mut |ev| {
        rules.evaluate(ev, name, &mut found);
        for f in found.drain(..) {
            let p = policies.of(&f);
            folds.add(f, p);
        }
        if collect.key_events {
            key_events.extend(history::observe(ev));
            if key_events.len() > COMPACT_KEY_EVENTS {
                history::compact(&mut key_events);
            }
        }
        if key_facts.len() < MAX_FILE_FACTS {
            key_facts.extend(key_facts::observe(ev));
        }
        if collect.observations {
            observations.extend(baseline::observe(ev, &file));
        }
        if observations.len() >= chunk || folds.len() >= chunk {
            {
                let mut full = std::mem::take(&mut observations);
                full.sort_by_key(|o| o.time);
                chunks += 1;
                flush(ChunkOut {
                    observations: full,
                    findings: folds.take(),
                    key_facts: std::mem::take(&mut key_facts),
                });
            }
        }
    });
    observations.sort_by_key(|o| o.time);
    let (findings, fold_overflowed) = folds.finish();
    Analysis {
        report,
        findings,
        fold_overflowed,
        observations,
        chunks,
        key_events,
        key_facts,
    }
}

/// One batch of consecutive inputs.
struct Batch {
    /// Sequence number of the batch and of its first input.
    index: usize,
    first: usize,
    inputs: Vec<LogInput>,
}

/// Hands batches to workers at most `window` ahead of the collector, and tells workers
/// which input the collector waits for (a worker streams a large file's chunks only
/// when it is that one).
struct Dispatch {
    state: Mutex<DispatchState>,
    moved: Condvar,
    window: usize,
    queue_cap: usize,
}

#[derive(Default)]
struct DispatchState {
    queue: VecDeque<Batch>,
    fed: bool,
    stopped: bool,
    /// The batch and the input the collector needs next.
    needed_batch: usize,
    needed_input: usize,
}

impl Dispatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, DispatchState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeder: queues a batch, waiting while the queue is full; false once stopped.
    fn feed(&self, b: Batch) -> bool {
        let mut g = self.lock();
        while g.queue.len() >= self.queue_cap && !g.stopped {
            g = self.moved.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if g.stopped {
            return false;
        }
        g.queue.push_back(b);
        self.moved.notify_all();
        true
    }

    fn fed(&self) {
        self.lock().fed = true;
        self.moved.notify_all();
    }

    /// Worker: the next batch, when it is within the window.
    fn take(&self) -> Option<Batch> {
        let mut g = self.lock();
        loop {
            if g.stopped {
                return None;
            }
            if let Some(front) = g.queue.front() {
                if front.index < g.needed_batch + self.window {
                    let b = g.queue.pop_front();
                    self.moved.notify_all();
                    return b;
                }
            } else if g.fed {
                return None;
            }
            g = self.moved.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Worker: waits until the collector needs input `i`; false once stopped.
    fn wait_needed(&self, i: usize) -> bool {
        let mut g = self.lock();
        while g.needed_input != i && !g.stopped {
            g = self.moved.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        !g.stopped
    }

    fn advance(&self, batch: usize, input: usize) {
        let mut g = self.lock();
        g.needed_batch = batch;
        g.needed_input = input;
        self.moved.notify_all();
    }

    fn stop(&self) {
        self.lock().stopped = true;
        self.moved.notify_all();
    }
}

/// One input's result, as the collector settles it.
struct FileResult {
    seq: usize,
    batch: usize,
    last_of_batch: bool,
    name: String,
    size: u64,
    /// The ledger key, when the store keeps a ledger.
    ledger: Option<String>,
    /// The input's time (its name's stamp), for ledger expiry.
    stamp: Option<i64>,
    analysis: Analysis,
}

/// A chunk of the input the collector waits for.
struct Chunk {
    seq: usize,
    ledger: Option<String>,
    out: ChunkOut,
}

/// What workers send the collector.
enum WorkerMsg {
    Chunk(Chunk),
    /// Finished inputs, consecutive.
    Done(Vec<FileResult>),
}

/// Replays `inputs` (in time order) through `rules` and (when enabled) the baseline
/// detectors, whose state lives in `store`. `settle` is called on findings before they
/// are folded, with the key-fact changes (tags, aliases) of the file they came from
/// (enrichment from the key inventory, which those changes make stale); `on_file` after
/// each file (progress and problem reports); both on the calling thread. `total` is the number of inputs
/// and their bytes when the source knows them up front (for progress).
pub fn replay<I>(
    inputs: I,
    total: Option<(usize, u64)>,
    rules: &RuleSet,
    opts: &ReplayOptions,
    store: &Store,
    settle: &mut dyn FnMut(&mut Vec<Finding>, &[FactEvent]),
    on_file: &mut dyn FnMut(&FileDone<'_>),
) -> Result<ReplayOutcome, StoreError>
where
    I: IntoIterator<Item = LogInput>,
    I::IntoIter: Send,
{
    let started = Instant::now();
    let jobs = opts.jobs.max(1);
    let dispatch = Dispatch {
        state: Mutex::new(DispatchState::default()),
        moved: Condvar::new(),
        window: jobs * 4,
        queue_cap: jobs * 2,
    };
    // A temporary store starts empty: no ledger to ask or keep.
    let keep_ledger = !store.is_temporary();
    let mut c = Collector {
        store,
        opts,
        policies: rules.policies(),
        stats: ReplayStats::default(),
        findings: Findings::new(store)?,
        folder: Folder::new(opts.fold_cap),
        detector: opts.baselines.clone().map(Detector::new),
        facts: key_facts::Tracker::default(),
        ledger: Vec::new(),
        partial: None,
        learning: None,
        newest_stamp: None,
        watermark: i64::MIN,
        last_commit: Instant::now(),
        key_events: Vec::new(),
        compact_at: COMPACT_KEY_EVENTS,
        settle,
    };
    let with_baselines = c.detector.is_some();
    let mut failure: Option<StoreError> = None;
    let mut activity = None;
    let mut timeline = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<WorkerMsg>(jobs * 4);
        let dispatch = &dispatch;
        let inputs = inputs.into_iter();
        let feeder = scope.spawn(move || feed(inputs, dispatch));
        let mut workers = Vec::new();
        for _ in 0..jobs {
            let tx = tx.clone();
            workers.push(
                scope.spawn(move || work(rules, opts, dispatch, with_baselines, keep_ledger, tx)),
            );
        }
        drop(tx);
        // Results wait here until their turn; chunks are used at once.
        let mut pending: BTreeMap<usize, FileResult> = BTreeMap::new();
        let (mut needed, mut needed_batch, mut bytes_done) = (0usize, 0usize, 0u64);
        for msg in rx {
            if failure.is_some() {
                continue;
            }
            let mut step = match msg {
                WorkerMsg::Chunk(ch) => c.chunk(ch),
                WorkerMsg::Done(results) => {
                    for r in results {
                        pending.insert(r.seq, r);
                    }
                    Ok(())
                }
            };
            while step.is_ok() {
                let Some(r) = pending.remove(&needed) else {
                    break;
                };
                needed += 1;
                if r.last_of_batch {
                    needed_batch = r.batch + 1;
                }
                dispatch.advance(needed_batch, needed);
                bytes_done += r.size;
                let (name, report) = (r.name.clone(), r.analysis.report.clone());
                step = c.file(r);
                on_file(&FileDone {
                    name: &name,
                    report: &report,
                    files_done: needed,
                    files_total: total.map(|t| t.0),
                    bytes_done,
                    bytes_total: total.map(|t| t.1),
                    started,
                });
            }
            if step.is_ok()
                && (c.ledger.len() >= 4096 || c.last_commit.elapsed() >= Duration::from_secs(1))
            {
                step = c.commit();
            }
            if let Err(e) = step {
                failure = Some(e);
                dispatch.stop();
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
        let _ = feeder.join();
        if opts.track_activity {
            c.stats.activity_dropped = all.dropped;
            activity = Some(all);
        }
        if opts.timeline {
            timeline = Some(all_tl);
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    c.finish()?;
    let Collector {
        mut stats,
        findings,
        key_events,
        ..
    } = c;
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

/// The feeder: groups consecutive inputs into batches (small ones together, a large one
/// alone) and queues them.
fn feed(inputs: impl Iterator<Item = LogInput>, dispatch: &Dispatch) {
    let (mut index, mut seq) = (0usize, 0usize);
    let mut batch: Vec<LogInput> = Vec::new();
    let mut bytes = 0u64;
    let send = |batch: &mut Vec<LogInput>, index: &mut usize, seq: &mut usize| -> bool {
        if batch.is_empty() {
            return true;
        }
        let inputs = std::mem::take(batch);
        let n = inputs.len();
        let ok = dispatch.feed(Batch {
            index: *index,
            first: *seq,
            inputs,
        });
        *index += 1;
        *seq += n;
        ok
    };
    for input in inputs {
        // A remote input waits on the network: alone, so that workers fetch in parallel
        // (and one slow or failing object delays only itself).
        let remote = matches!(input, LogInput::S3(_) | LogInput::Api(_));
        let size = if remote { BATCH_BYTES } else { input.size() };
        if size >= BATCH_BYTES || bytes + size > BATCH_BYTES || batch.len() >= BATCH_FILES {
            if !send(&mut batch, &mut index, &mut seq) {
                return;
            }
            bytes = 0;
        }
        bytes += size;
        batch.push(input);
        if size >= BATCH_BYTES {
            if !send(&mut batch, &mut index, &mut seq) {
                return;
            }
            bytes = 0;
        }
    }
    send(&mut batch, &mut index, &mut seq);
    dispatch.fed();
}

/// A worker: decodes and analyzes batches until there are none.
fn work(
    rules: &RuleSet,
    opts: &ReplayOptions,
    dispatch: &Dispatch,
    with_baselines: bool,
    keep_ledger: bool,
    tx: mpsc::SyncSender<WorkerMsg>,
) -> (Activity, Timeline) {
    let mut decoder = Decoder::new(opts.limits);
    let mut act = Activity::default();
    let mut tl = Timeline::default();
    let collect = Collect {
        observations: with_baselines,
        key_events: opts.key_events,
    };
    while let Some(batch) = dispatch.take() {
        let n = batch.inputs.len();
        let mut done: Vec<FileResult> = Vec::with_capacity(n);
        for (j, input) in batch.inputs.into_iter().enumerate() {
            let seq = batch.first + j;
            let name = input.name();
            let ledger = keep_ledger.then(|| input.ledger_key());
            let mut flush = |out: ChunkOut| {
                // The collector must be at this input before its chunks go: results of
                // the batch's earlier inputs first, then wait for its turn.
                if !done.is_empty() {
                    let _ = tx.send(WorkerMsg::Done(std::mem::take(&mut done)));
                }
                if dispatch.wait_needed(seq) {
                    let _ = tx.send(WorkerMsg::Chunk(Chunk {
                        seq,
                        ledger: ledger.clone(),
                        out,
                    }));
                }
            };
            let a = analyze_streaming(
                rules,
                &name,
                collect,
                OBSERVATION_CHUNK,
                &mut flush,
                |on_event| {
                    let mut each = |ev: &crate::event::Event<'_>| {
                        if opts.track_activity {
                            act.observe(ev);
                        }
                        if opts.timeline {
                            tl.observe(ev);
                        }
                        on_event(ev);
                    };
                    decode_input(&mut decoder, &input, opts, &mut each)
                },
            );
            done.push(FileResult {
                seq,
                batch: batch.index,
                last_of_batch: j + 1 == n,
                size: input.size(),
                stamp: input.start_secs(),
                ledger,
                name,
                analysis: a,
            });
        }
        if tx.send(WorkerMsg::Done(done)).is_err() {
            break;
        }
    }
    (act, tl)
}

fn decode_input(
    decoder: &mut Decoder,
    input: &LogInput,
    opts: &ReplayOptions,
    each: &mut dyn FnMut(&crate::event::Event<'_>),
) -> FileReport {
    match input {
        LogInput::Local(f) => decoder.decode_file(&f.path, each),
        LogInput::S3(obj) => match opts.s3.as_ref().map(|r| r.get(obj)) {
            Some(Ok(bytes)) => decoder.decode_bytes(&bytes, obj.key.ends_with(".gz"), each),
            Some(Err(e)) => crate::decode::failure(e.to_string()),
            None => crate::decode::failure("no S3 client for this replay".to_string()),
        },
        LogInput::Api(slice) => match opts.lookup.as_ref().map(|r| r.fetch(slice)) {
            Some(Ok((doc, bad))) => {
                let mut report = decoder.decode_bytes(&doc, false, each);
                if bad > 0 {
                    report
                        .problems
                        .push(crate::decode::DecodeProblem::InvalidJson {
                            count: bad,
                            first: "a CloudTrailEvent that is not a JSON object".into(),
                        });
                }
                report
            }
            Some(Err(e)) => crate::decode::failure(e.to_string()),
            None => crate::decode::failure("no CloudTrail client for this replay".to_string()),
        },
        LogInput::Memory { bytes, .. } => decoder.decode_bytes(bytes, false, each),
        LogInput::Unreadable { why, .. } => crate::decode::failure(why.clone()),
    }
}

/// How the collector learns the input it waits for.
struct Learning {
    seq: usize,
    ledger: Option<String>,
    /// Chunks the ledger says were learned before (None: the whole input was).
    skip: Option<u64>,
    /// Chunks seen so far.
    seen: u64,
}

/// The collector's state: settles each input's results in order.
struct Collector<'a> {
    store: &'a Store,
    opts: &'a ReplayOptions,
    policies: &'a Policies,
    stats: ReplayStats,
    findings: Findings,
    folder: Folder,
    detector: Option<Detector>,
    facts: key_facts::Tracker,
    /// Ledger entries of files learned since the last commit.
    ledger: Vec<String>,
    /// The file being learned in parts: (ledger key, chunks learned), to commit.
    partial: Option<(String, u64)>,
    learning: Option<Learning>,
    newest_stamp: Option<i64>,
    /// The newest event time seen (folds behind it close).
    watermark: i64,
    last_commit: Instant,
    key_events: Vec<KeyEvent>,
    compact_at: usize,
    settle: &'a mut dyn FnMut(&mut Vec<Finding>, &[FactEvent]),
}

impl Collector<'_> {
    /// The learning state of input `seq`, asking the ledger at its first sight.
    fn learning_of(
        &mut self,
        seq: usize,
        ledger: Option<&str>,
    ) -> Result<&mut Learning, StoreError> {
        if self.learning.as_ref().is_none_or(|l| l.seq != seq) {
            let skip = match ledger {
                None => Some(0),
                Some(key) => match self.store.ledger_status(key)? {
                    Some(LedgerStatus::Done | LedgerStatus::Failed) => None,
                    Some(LedgerStatus::Partial(n)) => Some(n),
                    None => Some(0),
                },
            };
            self.learning = Some(Learning {
                seq,
                ledger: ledger.map(str::to_string),
                skip,
                seen: 0,
            });
        }
        Ok(self.learning.as_mut().expect("set above"))
    }

    /// A chunk of the input the collector waits for: its rule findings so far, then its
    /// observations (unless the ledger says they were learned before).
    fn chunk(&mut self, ch: Chunk) -> Result<(), StoreError> {
        let ChunkOut {
            observations,
            findings: mut found,
            key_facts,
        } = ch.out;
        self.facts.carry(&key_facts, &mut found);
        if self.detector.is_none() {
            return self.fold_all(found, &key_facts);
        }
        let l = self.learning_of(ch.seq, ch.ledger.as_deref())?;
        l.seen += 1;
        let (seen, learn) = (l.seen, l.skip.is_some_and(|n| l.seen > n));
        let ledger = l.ledger.clone();
        if !learn {
            return self.fold_all(found, &key_facts);
        }
        found.extend(self.observe(&observations)?);
        self.fold_all(found, &key_facts)?;
        let det = self.detector.as_ref().expect("checked above");
        if det.dirty_len() >= DIRTY_CAP || det.cache_len() > self.opts.cache_cap {
            // Mid-file: the baselines so far are committed with a cursor, so a crash
            // resumes after this chunk instead of counting it twice.
            self.partial = ledger.map(|k| (k, seen));
            self.stats.partial_commits += 1;
            self.commit()?;
        }
        Ok(())
    }

    /// Observations through the detectors, loading baselines from the store as needed.
    fn observe(&mut self, observed: &[Observation]) -> Result<Vec<Finding>, StoreError> {
        let Some(det) = self.detector.as_mut() else {
            return Ok(Vec::new());
        };
        let found = observe(det, self.store, observed, !self.opts.learn_only)?;
        self.watermark = self.watermark.max(det.watermark());
        Ok(found)
    }

    /// One input's results, in input order.
    fn file(&mut self, r: FileResult) -> Result<(), StoreError> {
        let a = r.analysis;
        let s = &a.report.stats;
        self.stats.files += 1;
        self.stats.bad_files += u64::from(a.report.is_bad());
        self.stats.records += s.records;
        self.stats.kms_records += s.kms_records;
        self.stats.parsed_records += s.parsed;
        self.stats.compressed_bytes += s.compressed_bytes;
        self.stats.json_bytes += s.json_bytes;
        self.stats.folded_overflow += a.fold_overflowed;
        if let Some(t) = r.stamp {
            self.newest_stamp = Some(self.newest_stamp.map_or(t, |n| n.max(t)));
            self.watermark = self.watermark.max(t);
        }
        let mut keyed = a.key_events;
        self.key_events.append(&mut keyed);
        if self.key_events.len() > self.compact_at {
            history::compact(&mut self.key_events);
            self.compact_at = (self.key_events.len() * 2).max(COMPACT_KEY_EVENTS);
        }
        // What earlier events (this file's up to each finding, and earlier files') said
        // about the findings' keys, for key conditions decided offline.
        let mut found = a.findings;
        self.facts.carry(&a.key_facts, &mut found);
        if self.detector.is_some() {
            // The rest of the input after its chunks: never within a ledger cursor,
            // which counts only chunks committed before.
            let learned_before = self.learning_of(r.seq, r.ledger.as_deref())?.skip.is_none();
            if learned_before {
                self.stats.files_already_learned += 1;
            } else {
                let anomalies = self.observe(&a.observations)?;
                found.extend(anomalies);
                if let Some(key) = r.ledger {
                    self.ledger.push(key);
                }
            }
            self.learning = None;
            self.partial = None;
        }
        if !self.opts.learn_only {
            for f in &found {
                if let Some(t) = crate::clock::parse_rfc3339(&f.last_time) {
                    self.watermark = self.watermark.max(t);
                }
            }
            self.fold_all(found, &a.key_facts)?;
        }
        for f in self.folder.close_until(self.watermark) {
            self.findings.put(&f)?;
        }
        Ok(())
    }

    /// Findings through the settle step (enrichment), key conditions, then folding.
    fn fold_all(&mut self, mut found: Vec<Finding>, facts: &[FactEvent]) -> Result<(), StoreError> {
        if (found.is_empty() && facts.is_empty()) || self.opts.learn_only {
            return Ok(());
        }
        (self.settle)(&mut found, facts);
        crate::analyze::rule::resolve_all(&mut found);
        for f in found {
            let p = self.policies.of(&f);
            self.folder.add(f, p);
        }
        Ok(())
    }

    /// Commits the ledger entries and changed baselines so far (and the cursor of a file
    /// learned in parts), then trims the detector's cache.
    fn commit(&mut self) -> Result<(), StoreError> {
        self.last_commit = Instant::now();
        let Some(det) = self.detector.as_mut() else {
            return Ok(());
        };
        let stamp = self.newest_stamp.unwrap_or_else(crate::inventory::now_secs);
        self.store.commit(&Commit {
            ledger: std::mem::take(&mut self.ledger),
            partial: self.partial.take().into_iter().collect(),
            baselines: encode_dirty(det),
            stamp,
            ..Commit::default()
        })?;
        det.trim_cache(self.opts.cache_cap);
        self.stats.baselines_evicted = det.evicted;
        Ok(())
    }

    /// End of input: open rate buckets are judged, every fold is put out, the ledger is
    /// committed and pruned.
    fn finish(&mut self) -> Result<(), StoreError> {
        if let Some(det) = self.detector.as_mut() {
            let spikes = det.flush(!self.opts.learn_only);
            self.fold_all(spikes, &[])?;
        }
        self.commit()?;
        for f in self.folder.drain() {
            self.findings.put(&f)?;
        }
        self.stats.folded_overflow += self.folder.overflowed;
        self.stats.duplicate_findings += self.folder.duplicates;
        if !self.store.is_temporary() {
            if let Some(newest) = self.newest_stamp {
                let cutoff = newest - i64::from(self.opts.ledger_days) * 86_400;
                self.stats.ledger_pruned = self.store.prune_ledger(cutoff, newest)?.removed;
            }
        }
        self.store.flush()?;
        Ok(())
    }
}

fn encode_dirty(det: &mut Detector) -> Vec<(String, Option<Vec<u8>>)> {
    det.take_dirty()
        .into_iter()
        .map(|(p, b)| (p, Some(store::encode(&b))))
        .collect()
}

/// Observations through the detectors, loading baselines from the store as needed
/// (the caller commits the baselines they changed, `dirty_baselines`).
pub fn observe(
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

/// A progress line: files, MB/s of compressed input and, when the total is known, an
/// ETA.
pub fn progress_line(d: &FileDone<'_>) -> String {
    let secs = d.started.elapsed().as_secs_f64().max(1e-3);
    let rate = d.bytes_done as f64 / secs;
    let mut line = match d.files_total {
        Some(n) => format!("{}/{n} files", d.files_done),
        None => format!("{} files", d.files_done),
    };
    line.push_str(&format!(
        ", {:.1} MB read, {:.1} MB/s (compressed)",
        d.bytes_done as f64 / 1e6,
        rate / 1e6
    ));
    if let Some(total) = d.bytes_total {
        let left = total.saturating_sub(d.bytes_done) as f64;
        let eta = if rate > 0.0 {
            Duration::from_secs_f64(left / rate).as_secs()
        } else {
            0
        };
        line.push_str(&format!(", ETA {}m{:02}s", eta / 60, eta % 60));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory batch goes through the same path as files: rules, ledger, timeline;
    /// an S3 input without a reader is reported as unreadable, not a panic.
    #[test]
    fn memory_batches_and_unreadable_inputs() {
        let rules = RuleSet::builtin().expect("built-in rules");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).expect("store");
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
        let out = replay(
            inputs,
            None,
            &rules,
            &opts,
            &store,
            &mut |_, _| {},
            &mut |d| names.push((d.name.to_string(), d.report.is_bad())),
        )
        .expect("replay");
        assert_eq!(
            names,
            vec![
                ("batch-1".to_string(), false),
                ("s3://b/k.json.gz".to_string(), true)
            ]
        );
        let findings = out.findings.to_vec().unwrap();
        assert!(findings
            .iter()
            .any(|f| f.rule == "kms-key-deletion-scheduled"
                && f.file == "batch-1"
                && f.count == 1));
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
