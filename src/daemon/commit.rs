//! The daemon's analyzer thread: the only writer of baselines, folds and commits. Each
//! job is an input's results (a whole file, or a chunk of a large one); the analyzer
//! settles them (key facts, the inventory cache, key conditions, baselines, folding)
//! and commits the file's ledger entry, baseline changes, folds and outbox entries in
//! one transaction before the file task deletes the message.
//!
//! A large file arrives in chunks, each committed with a ledger cursor
//! (`LedgerStatus::Partial`) and its baselines and folds, so neither its baselines nor
//! its findings have to fit in memory and a crash resumes after the last committed
//! chunk. Folds (`analyze::fold`) are kept in the store's `folds` tree: a fold goes to
//! the outbox when it opens and again, with the same id and a larger count, after each
//! input that made it grow.

use super::Reread;
use crate::analyze::baseline::Detector;
use crate::analyze::finding::Finding;
use crate::analyze::fold::{Folder, Policies};
use crate::outbox::{self, Sink};
use crate::pipeline::{self, Analysis, ChunkOut};
use crate::store::{Commit, LedgerStatus, StateWrite, Store, StoreError};
use crate::telemetry::Metrics;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::warn;

/// The store tree of the daemon's open folds.
pub const FOLDS_TREE: &str = "folds";
/// Baselines the analyzer caches at most.
const CACHE_CAP: usize = pipeline::CACHE_CAP;

pub(super) type Reply = oneshot::Sender<Result<JobOutcome, StoreError>>;

/// A whole input's results (or the rest of a large one after its chunks), or the
/// findings of an inventory refresh.
pub(super) struct Input {
    /// The ledger entry of the file; None for the findings of an inventory refresh.
    pub key: Option<String>,
    /// Other state to commit with the findings (the refresh's reported set).
    pub state: Vec<StateWrite>,
    /// A second ledger entry to write (the object's key without ETag).
    pub alias: Option<String>,
    pub analysis: Option<Analysis>,
    /// When CloudTrail showed each key in the file (recorded with its commit).
    pub activity: Option<crate::inventory::Activity>,
    /// Findings that go to the outbox as they are (health, posture): not folded.
    pub health: Vec<Finding>,
    pub failed: bool,
    /// How the rules the file was analyzed with fold.
    pub policies: Policies,
    pub reply: Reply,
}

/// One full chunk of a large input.
pub(super) struct ChunkJob {
    pub key: String,
    /// 1 for the first chunk.
    pub index: u64,
    pub out: ChunkOut,
    pub policies: Policies,
    pub reply: Reply,
}

pub(super) enum Job {
    Input(Box<Input>),
    Chunk(ChunkJob),
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum JobOutcome {
    Committed,
    AlreadyDone,
    AlreadyFailed,
    /// A chunk committed before (a redelivery after a crash): not learned again.
    Skipped,
}

/// What the analyzer thread needs: the store, metrics, sinks and the outbox signal.
pub(super) struct Committer {
    pub store: Store,
    /// The key inventory's cache (offline: never calls the API).
    pub inventory: crate::inventory::Inventory,
    pub metrics: Arc<Metrics>,
    pub sinks: Arc<Vec<Sink>>,
    pub outbox: Arc<Notify>,
    /// The remediation tree, when remediation is on: each input's key events are
    /// recorded there (`remediate::history`) in its commit.
    pub remediation: Option<sled::Tree>,
    /// Keys with recorded CloudTrail activity (`inventory::SEEN`), against
    /// `inventory::MAX_SEEN_KEYS`; only the analyzer writes them.
    pub seen_keys: std::sync::atomic::AtomicUsize,
    /// Whether the cap was reported in the log already.
    pub seen_cap_logged: std::sync::atomic::AtomicBool,
    /// The re-reader's queue (with `[inventory] refresh`): keys a committed file showed
    /// changed. Never waited on: when it is full, the scheduled refresh catches up.
    pub rereads: Option<mpsc::Sender<Reread>>,
}

/// The analyzer's own state.
struct State {
    det: Detector,
    folds: Folder,
}

pub(super) fn analyzer_loop(mut jobs: mpsc::Receiver<Job>, shared: Committer, det: Detector) {
    let mut folds = Folder::default();
    match shared.store.tree_entries(FOLDS_TREE) {
        Ok(stored) => {
            let bad = folds.restore(stored.into_iter());
            if bad > 0 {
                warn!(
                    folds = bad,
                    "stored folds that could not be read were dropped"
                );
            }
        }
        Err(e) => warn!(error = %e, "cannot read the stored folds; starting without them"),
    }
    let mut st = State { det, folds };
    while let Some(job) = jobs.blocking_recv() {
        let (result, reply) = match job {
            Job::Input(mut i) => {
                let reply = std::mem::replace(&mut i.reply, oneshot::channel().0);
                (settle_input(&shared, &mut st, *i), reply)
            }
            Job::Chunk(mut c) => {
                let reply = std::mem::replace(&mut c.reply, oneshot::channel().0);
                (settle_chunk(&shared, &mut st, c), reply)
            }
        };
        if matches!(result, Ok(JobOutcome::Committed)) {
            shared.outbox.notify_waiters();
        }
        let _ = reply.send(result);
    }
}

/// Key facts, the inventory cache and key conditions: the findings as they will be
/// delivered (the analyzer never waits on the API).
fn settle_findings(
    shared: &Committer,
    mut found: Vec<Finding>,
    facts: &[crate::analyze::key_facts::FactEvent],
) -> Result<Vec<Finding>, StoreError> {
    // Without a cached record, key conditions see what earlier events of the file said
    // about the key (tags, aliases), not only the finding's own event.
    crate::analyze::key_facts::Tracker::default().carry(facts, &mut found);
    for f in found.iter_mut() {
        shared.inventory.enrich_cached(f)?;
    }
    crate::analyze::rule::resolve_all(&mut found);
    Ok(found)
}

/// Findings into the folds; the watermark closes old ones.
fn fold(st: &mut State, found: Vec<Finding>, policies: &Policies) {
    for f in found {
        let p = policies.of(&f);
        st.folds.add(f, p);
    }
}

/// The folds' changes as state writes of the `folds` tree.
fn fold_writes(st: &mut State) -> Vec<StateWrite> {
    st.folds
        .take_writes()
        .into_iter()
        .map(|(id, v)| match v {
            Some(v) => StateWrite::put(FOLDS_TREE, id, v),
            None => StateWrite::delete(FOLDS_TREE, id),
        })
        .collect()
}

fn settle_chunk(shared: &Committer, st: &mut State, c: ChunkJob) -> Result<JobOutcome, StoreError> {
    match shared.store.ledger_status(&c.key)? {
        Some(LedgerStatus::Done) => return Ok(JobOutcome::AlreadyDone),
        Some(LedgerStatus::Failed) => return Ok(JobOutcome::AlreadyFailed),
        Some(LedgerStatus::Partial(n)) if c.index <= n => return Ok(JobOutcome::Skipped),
        _ => {}
    }
    let ChunkOut {
        observations,
        findings,
        key_facts,
    } = c.out;
    let mut found = settle_findings(shared, findings, &key_facts)?;
    let anomalies = pipeline::observe(&mut st.det, &shared.store, &observations, true)?;
    found.extend(settle_findings(shared, anomalies, &[])?);
    fold(st, found, &c.policies);
    let commit = Commit {
        partial: vec![(c.key, c.index)],
        baselines: pipeline::dirty_baselines(&mut st.det),
        state: fold_writes(st),
        stamp: crate::inventory::now_secs(),
        ..Commit::default()
    };
    shared.store.commit(&commit)?;
    st.det.trim_cache(CACHE_CAP);
    if let Some(t) = observations.iter().map(|o| o.time).max() {
        shared
            .metrics
            .newest_event_time
            .fetch_max(t, Ordering::Relaxed);
    }
    Ok(JobOutcome::Committed)
}

fn settle_input(shared: &Committer, st: &mut State, job: Input) -> Result<JobOutcome, StoreError> {
    let Input {
        key,
        state,
        alias,
        analysis,
        activity,
        health,
        failed,
        policies,
        reply: _,
    } = job;
    if let Some(key) = &key {
        match shared.store.ledger_status(key)? {
            Some(LedgerStatus::Done) => return Ok(JobOutcome::AlreadyDone),
            Some(LedgerStatus::Failed) => return Ok(JobOutcome::AlreadyFailed),
            None | Some(LedgerStatus::Partial(_)) => {}
        }
    }
    let mut findings = health;
    if let Some(a) = &analysis {
        let mut found = settle_findings(shared, a.findings.clone(), &a.key_facts)?;
        if key.is_some() {
            let anomalies = pipeline::observe(&mut st.det, &shared.store, &a.observations, true)?;
            found.extend(settle_findings(shared, anomalies, &[])?);
        }
        fold(st, found, &policies);
    }
    // Folds that opened or grew since their last delivery go out now; folds whose window
    // the trail has left behind close (their last growth went out with it).
    findings.extend(st.folds.take_changed(1.0));
    let watermark = st.det.watermark();
    findings.extend(st.folds.close_changed(watermark));
    // One outbox entry per (sink, finding), ordered by a growing sequence number.
    let outbox = outbox::entries_for(&shared.store, &shared.sinks, &findings)?;
    let entries: Vec<String> = key.into_iter().chain(alias).collect();
    // What later events say about pending remediations lands with the findings, so the
    // remediation sink, which runs after this commit, sees the whole file.
    let mut state = state;
    if let (Some(tree), Some(a)) = (&shared.remediation, &analysis) {
        if !a.key_events.is_empty() {
            state.extend(crate::remediate::history::writes(tree, &a.key_events));
        }
    }
    // When CloudTrail showed each key, with the file: the refresh's use-based checks.
    // With `[inventory] refresh`, cached records of keys the file changed are not dropped:
    // the re-reader replaces them a few seconds after the commit, and until then
    // enrichment is better served by a slightly old record than by none. Without it
    // nothing would ever replace them, so they are dropped, as replay does.
    let mut new_seen = 0;
    if let Some(act) = &activity {
        let recorded = shared.seen_keys.load(Ordering::Relaxed);
        let room = crate::inventory::MAX_SEEN_KEYS.saturating_sub(recorded);
        let w = shared
            .inventory
            .activity_writes(act, shared.rereads.is_none(), room)?;
        if w.dropped > 0 && !shared.seen_cap_logged.swap(true, Ordering::Relaxed) {
            shared.metrics.error("inventory-seen-cap");
            warn!(
                keys = recorded,
                "the CloudTrail activity of {} keys is recorded already (the cap); activity of further keys is not recorded",
                crate::inventory::MAX_SEEN_KEYS
            );
        }
        new_seen = w.new_keys;
        state.extend(w.writes);
    }
    state.extend(fold_writes(st));
    let commit = Commit {
        ledger: if failed { Vec::new() } else { entries.clone() },
        failed: if failed { entries } else { Vec::new() },
        baselines: pipeline::dirty_baselines(&mut st.det),
        outbox,
        state,
        stamp: crate::inventory::now_secs(),
        ..Commit::default()
    };
    let n_outbox = commit.outbox.len() as i64;
    shared.store.commit(&commit)?;
    // Durable before the SQS message is deleted: sled writes its log to the file only
    // every 500 ms, and a kill -9 in between would lose a file whose message is gone.
    shared.store.flush()?;
    shared.seen_keys.fetch_add(new_seen, Ordering::Relaxed);
    // Keys the file showed changed: re-read soon, in the background (after the commit,
    // so a redelivered file that changes nothing here asks for nothing).
    if let (Some(tx), Some(act)) = (&shared.rereads, &activity) {
        let mut changed: Vec<(&String, &String)> = act
            .keys
            .iter()
            .filter(|(arn, _)| crate::inventory::region_of_arn(arn).is_some())
            .filter_map(|(arn, a)| a.last_change.as_ref().map(|t| (arn, t)))
            .collect();
        changed.sort();
        for (arn, t) in changed {
            let r = Reread {
                arn: arn.clone(),
                changed_at: t.clone(),
            };
            if tx.try_send(r).is_err() {
                shared.metrics.error("inventory-reread-dropped");
            }
        }
    }
    for sink in shared.sinks.iter() {
        sink.note_committed(&findings);
    }
    st.det.trim_cache(CACHE_CAP);
    let m = &shared.metrics;
    m.outbox_depth.fetch_add(n_outbox, Ordering::Relaxed);
    m.open_folds.store(st.folds.len() as i64, Ordering::Relaxed);
    for f in &findings {
        m.finding(&f.rule, f.severity.as_str());
    }
    if let Some(a) = &analysis {
        let s = &a.report.stats;
        if !failed {
            m.files_processed.fetch_add(1, Ordering::Relaxed);
        }
        m.records.fetch_add(s.records, Ordering::Relaxed);
        m.kms_records.fetch_add(s.kms_records, Ordering::Relaxed);
        m.json_bytes.fetch_add(s.json_bytes, Ordering::Relaxed);
        if let Some(t) = a.observations.iter().map(|o| o.time).max() {
            m.newest_event_time.fetch_max(t, Ordering::Relaxed);
        }
    }
    Ok(JobOutcome::Committed)
}
