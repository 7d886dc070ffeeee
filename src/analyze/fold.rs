//! Folding: repeated findings of one rule for one principal (and, where the rule is
//! about them, one key set and one captured subject) inside a fixed window of event time
//! become one finding with a `count`, `first_time`, `last_time` and at most
//! `MAX_EVENT_IDS` event ids. A flood of identical denied calls costs one finding, not
//! one per record, and the same logs give the same folded ids whatever the file
//! boundaries or the number of workers: the id hashes the rule, the fold key and the
//! window, never where a record was read.
//!
//! `Folder` holds the open folds, bounded: at most `cap` of them; findings of a fold key
//! that finds no room join their rule's overflow finding for the window (counted in
//! `Folder::overflowed`, and the overflow finding says how many principals it stands
//! for). Windows close once the trail's event time is `CLOSE_SLACK_SECS` past their end.

use crate::analyze::finding::{finding_id, Finding, Kind};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Event ids a folded finding lists at most (the total is in `count`).
pub const MAX_EVENT_IDS: usize = 100;
/// Keys a folded finding lists at most (a principal probing more keys is one finding
/// listing the first 50, in key order).
pub const MAX_KEYS: usize = 50;
/// Event ids remembered per fold to recognise a record delivered twice.
const MAX_SEEN: usize = 1024;
/// The default fold window, in seconds of event time.
pub const DEFAULT_WINDOW_SECS: i64 = 3600;
/// How far the trail's newest event must be past a window's end before its folds close:
/// CloudTrail delivers accounts and regions with different lags.
pub const CLOSE_SLACK_SECS: i64 = 900;
/// Open folds a replay or the daemon holds at most.
pub const DEFAULT_CAP: usize = 10_000;

/// What findings of a rule fold by (besides the rule and the window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FoldBy {
    /// The stable principal, the key set and the captured values (`context`): a
    /// different key or grant is a different finding.
    #[default]
    PrincipalAndKeys,
    /// The stable principal only; the keys of the folded findings are collected (what a
    /// denied-call rule is about is the caller, not each key it tried).
    Principal,
    /// The finding's own id (detectors that group by themselves, health, posture):
    /// findings with the same id are one, the larger count wins.
    Id,
}

impl FoldBy {
    pub fn parse(s: &str) -> Option<FoldBy> {
        match s {
            "principal_and_keys" => Some(FoldBy::PrincipalAndKeys),
            "principal" => Some(FoldBy::Principal),
            "id" => Some(FoldBy::Id),
            _ => None,
        }
    }
}

/// How one rule's findings fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoldPolicy {
    pub by: FoldBy,
    pub window_secs: i64,
}

impl Default for FoldPolicy {
    fn default() -> Self {
        FoldPolicy {
            by: FoldBy::PrincipalAndKeys,
            window_secs: DEFAULT_WINDOW_SECS,
        }
    }
}

impl FoldPolicy {
    pub const BY_ID: FoldPolicy = FoldPolicy {
        by: FoldBy::Id,
        window_secs: DEFAULT_WINDOW_SECS,
    };
}

/// The principal a finding folds by: the role for assumed roles (stable across
/// sessions), else the caller.
pub fn stable_principal(f: &Finding) -> &str {
    f.principal_role
        .as_deref()
        .or(f.principal.as_deref())
        .unwrap_or("-")
}

fn event_secs(f: &Finding) -> i64 {
    crate::clock::parse_rfc3339(&f.time).unwrap_or(0)
}

/// The folded id and the window end of `f` under `policy`.
pub fn fold_key(f: &Finding, policy: FoldPolicy) -> (String, i64) {
    let w = policy.window_secs.max(1);
    let start = event_secs(f).div_euclid(w) * w;
    let end = start + w;
    if policy.by == FoldBy::Id || f.kind == Kind::Health || f.kind == Kind::Posture {
        return (f.id.clone(), end);
    }
    let mut parts = format!("fold\u{1f}{}\u{1f}{start}", stable_principal(f));
    if policy.by == FoldBy::PrincipalAndKeys {
        let mut keys: Vec<&str> = f.keys.iter().map(String::as_str).collect();
        keys.sort_unstable();
        keys.dedup();
        parts.push('\u{1f}');
        parts.push_str(&keys.join(","));
        for (k, v) in &f.context {
            parts.push_str(&format!("\u{1f}{k}={v}"));
        }
    }
    (finding_id(&f.rule, &[parts]), end)
}

fn overflow_key(f: &Finding, policy: FoldPolicy) -> (String, i64) {
    let w = policy.window_secs.max(1);
    let start = event_secs(f).div_euclid(w) * w;
    let parts = format!(
        "overflow\u{1f}{}\u{1f}{start}",
        f.account.as_deref().unwrap_or("-")
    );
    (finding_id(&f.rule, &[parts]), start + w)
}

fn id_hash(id: &str) -> u64 {
    // FNV-1a: cheap, and only used to recognise repeats within one fold.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[derive(Serialize, Deserialize)]
struct Entry {
    f: Finding,
    by: FoldBy,
    window_end: i64,
    seen: HashSet<u64>,
    /// Distinct principals of an overflow finding (counted, not listed), capped.
    principals: HashSet<u64>,
    overflow: bool,
    /// The count when this fold was last handed out (`Folder::take_changed`).
    sent: u64,
}

/// Event ids a stored fold keeps for recognising repeats (the daemon's folds).
const STORED_SEEN: usize = 128;

/// What `Folder::add` did with a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// A new fold was opened.
    New,
    /// An open fold grew.
    Grew,
    /// Every event of the finding was in its fold already (a record delivered twice).
    Duplicate,
    /// No room for a new fold: the finding joined its rule's overflow finding.
    Overflow,
}

/// The open folds.
pub struct Folder {
    entries: HashMap<String, Entry>,
    closing: BTreeSet<(i64, String)>,
    cap: usize,
    /// Findings that joined an overflow finding because the folder was full.
    pub overflowed: u64,
    /// Events not counted again because their fold had them already.
    pub duplicates: u64,
    /// Folds changed or closed since `take_writes` (for a folder kept in the store).
    touched: BTreeSet<String>,
}

impl Default for Folder {
    fn default() -> Self {
        Folder::new(DEFAULT_CAP)
    }
}

impl Folder {
    pub fn new(cap: usize) -> Folder {
        Folder {
            entries: HashMap::new(),
            closing: BTreeSet::new(),
            cap: cap.max(1),
            overflowed: 0,
            duplicates: 0,
            touched: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Folds `f` (a finding of one event, or a fold made elsewhere, e.g. by a worker)
    /// under `policy`.
    pub fn add(&mut self, mut f: Finding, policy: FoldPolicy) -> Added {
        f.settle_counts();
        let (mut id, mut end) = fold_key(&f, policy);
        let mut outcome = Added::Grew;
        if !self.entries.contains_key(&id) {
            if self.entries.len() >= self.cap && policy.by != FoldBy::Id {
                (id, end) = overflow_key(&f, policy);
                self.overflowed += f.count;
                outcome = Added::Overflow;
            } else {
                outcome = Added::New;
            }
        }
        self.touched.insert(id.clone());
        match self.entries.get_mut(&id) {
            Some(e) => {
                let merged = merge(e, f);
                if outcome == Added::Grew && !merged {
                    self.duplicates += 1;
                    return Added::Duplicate;
                }
            }
            None => {
                let overflow = outcome == Added::Overflow;
                let mut e = Entry {
                    seen: f
                        .event_ids
                        .iter()
                        .take(MAX_SEEN)
                        .map(|i| id_hash(i))
                        .collect(),
                    principals: HashSet::new(),
                    by: policy.by,
                    window_end: end,
                    overflow,
                    sent: 0,
                    f,
                };
                if e.by != FoldBy::Id {
                    e.f.id = id.clone();
                }
                if overflow {
                    e.principals.insert(id_hash(stable_principal(&e.f)));
                    e.f.principal = None;
                    e.f.principal_role = None;
                    e.f.source_ip = None;
                    e.f.user_agent = None;
                    e.f.context.clear();
                }
                self.closing.insert((end, id.clone()));
                self.entries.insert(id, e);
            }
        }
        outcome
    }

    /// Removes and returns the folds whose window ended `CLOSE_SLACK_SECS` or more before
    /// `watermark` (the newest event time seen), in window order.
    pub fn close_until(&mut self, watermark: i64) -> Vec<Finding> {
        let mut out = Vec::new();
        while let Some((end, _)) = self.closing.first() {
            if *end + CLOSE_SLACK_SECS > watermark {
                break;
            }
            if let Some((_, id)) = self.closing.pop_first() {
                if let Some(e) = self.entries.remove(&id) {
                    self.touched.insert(id);
                    out.push(finish(e));
                }
            }
        }
        out
    }

    /// What changed since the last call, as (fold id, stored fold or None when it
    /// closed): the daemon commits these with the input that changed them, so its folds
    /// survive a restart.
    pub fn take_writes(&mut self) -> Vec<(String, Option<Vec<u8>>)> {
        std::mem::take(&mut self.touched)
            .into_iter()
            .map(|id| {
                let stored = self.entries.get(&id).map(|e| {
                    let seen: HashSet<u64> = e.seen.iter().copied().take(STORED_SEEN).collect();
                    let keep = Entry {
                        f: e.f.clone(),
                        by: e.by,
                        window_end: e.window_end,
                        seen,
                        principals: e.principals.iter().copied().take(STORED_SEEN).collect(),
                        overflow: e.overflow,
                        sent: e.sent,
                    };
                    serde_json::to_vec(&keep).unwrap_or_default()
                });
                (id, stored)
            })
            .collect()
    }

    /// Puts back folds written by `take_writes` (at the daemon's start); values that do
    /// not parse are skipped and counted.
    pub fn restore(&mut self, stored: impl Iterator<Item = (String, Vec<u8>)>) -> usize {
        let mut bad = 0;
        for (id, bytes) in stored {
            match serde_json::from_slice::<Entry>(&bytes) {
                Ok(e) if self.entries.len() < self.cap || e.overflow => {
                    self.closing.insert((e.window_end, id.clone()));
                    self.entries.insert(id, e);
                }
                Ok(_) => bad += 1,
                Err(_) => bad += 1,
            }
        }
        bad
    }

    /// Removes and returns every fold (end of a replay).
    pub fn drain(&mut self) -> Vec<Finding> {
        self.closing.clear();
        let mut all: Vec<Entry> = self.entries.drain().map(|(_, e)| e).collect();
        all.sort_by(|a, b| (a.window_end, &a.f.id).cmp(&(b.window_end, &b.f.id)));
        all.into_iter().map(finish).collect()
    }

    /// The current state of every fold that grew since it was last handed out (the
    /// daemon delivers a fold when it opens and again when it has grown), without
    /// closing them. `min_growth` is the factor a count must have grown by to be handed
    /// out again (1.0: any growth).
    pub fn take_changed(&mut self, min_growth: f64) -> Vec<Finding> {
        // In event order (the outbox keeps it), ties by id.
        let mut ids: Vec<(&str, &str, &String)> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.sent == 0 || e.f.count as f64 >= e.sent as f64 * min_growth && e.f.count > e.sent
            })
            .map(|(id, e)| {
                (
                    e.f.first_time.as_str(),
                    e.f.event_ids.first().map_or("", String::as_str),
                    id,
                )
            })
            .collect();
        ids.sort();
        let ids: Vec<String> = ids.into_iter().map(|(_, _, id)| id.clone()).collect();
        let mut out = Vec::new();
        for id in ids {
            if let Some(e) = self.entries.get_mut(&id) {
                e.sent = e.f.count;
                out.push(snapshot(e));
                self.touched.insert(id);
            }
        }
        out
    }

    /// Removes the folds whose window closed (as `close_until`), returning those that
    /// grew since they were last handed out (the final update of a delivered fold).
    pub fn close_changed(&mut self, watermark: i64) -> Vec<Finding> {
        let mut out = Vec::new();
        while let Some((end, _)) = self.closing.first() {
            if *end + CLOSE_SLACK_SECS > watermark {
                break;
            }
            if let Some((_, id)) = self.closing.pop_first() {
                if let Some(e) = self.entries.remove(&id) {
                    self.touched.insert(id);
                    if e.f.count > e.sent {
                        out.push(finish(e));
                    }
                }
            }
        }
        out
    }
}

/// Merges `f` into the fold; false when it brought nothing new (all its events seen).
fn merge(e: &mut Entry, mut f: Finding) -> bool {
    if e.by == FoldBy::Id {
        // The same finding again (a spike judged at flush and at close, a redelivered
        // health problem): the larger count and the later time win.
        let grew = f.count > e.f.count;
        e.f.count = e.f.count.max(f.count);
        if f.last_time > e.f.last_time {
            e.f.last_time = f.last_time;
        }
        for id in f.event_ids {
            if e.f.event_ids.len() < MAX_EVENT_IDS && !e.f.event_ids.contains(&id) {
                e.f.event_ids.push(id);
            }
        }
        return grew;
    }
    // Events of `f` already in the fold are not counted again; only a fold that lists
    // all its events can be checked so (the rest of a large fold is counted as given).
    let complete = f.count as usize == f.event_ids.len();
    let mut fresh = Vec::with_capacity(f.event_ids.len());
    for id in std::mem::take(&mut f.event_ids) {
        let h = id_hash(&id);
        if e.seen.contains(&h) {
            continue;
        }
        if e.seen.len() < MAX_SEEN {
            e.seen.insert(h);
        }
        fresh.push(id);
    }
    let added = if complete {
        fresh.len() as u64
    } else {
        f.count
    };
    if added == 0 {
        return false;
    }
    if e.overflow && e.principals.len() < MAX_SEEN {
        e.principals.insert(id_hash(stable_principal(&f)));
    }
    e.f.count += added;
    // The earliest event's details describe the fold (ties: the smaller event id), so
    // the result does not depend on the order folds arrive in.
    let earlier = (f.first_time.as_str(), fresh.first().map(String::as_str))
        < (
            e.f.first_time.as_str(),
            e.f.event_ids.first().map(String::as_str),
        );
    if earlier && !e.overflow {
        let keep = (
            e.f.id.clone(),
            e.f.count,
            std::mem::take(&mut e.f.event_ids),
            std::mem::take(&mut e.f.keys),
            e.f.last_time.clone(),
        );
        e.f = Finding {
            event_ids: Vec::new(),
            ..f.clone()
        };
        (e.f.id, e.f.count, e.f.event_ids, e.f.keys, e.f.last_time) = keep;
        e.f.time = f.time.clone();
    }
    if f.first_time < e.f.first_time {
        e.f.first_time = f.first_time.clone();
        if e.overflow {
            e.f.time = f.time.clone();
        }
    }
    if f.last_time > e.f.last_time {
        e.f.last_time = f.last_time.clone();
    }
    e.f.event_ids.extend(fresh);
    e.f.event_ids.sort_unstable();
    e.f.event_ids.dedup();
    e.f.event_ids.truncate(MAX_EVENT_IDS);
    let mut keys: BTreeSet<String> = e.f.keys.drain(..).collect();
    keys.extend(f.keys);
    e.f.keys = keys.into_iter().take(MAX_KEYS).collect();
    true
}

fn snapshot(e: &Entry) -> Finding {
    let mut f = e.f.clone();
    describe(&mut f, e);
    f
}

fn finish(mut e: Entry) -> Finding {
    let mut f = std::mem::take(&mut e.f);
    describe(&mut f, &e);
    f
}

/// Says in the summary what the fold stands for.
fn describe(f: &mut Finding, e: &Entry) {
    if e.by == FoldBy::Id {
        return;
    }
    if e.overflow {
        f.summary = format!(
            "{} more `{}` findings in account {} ({} principal(s){}) between {} and {}: the folding cap of open findings was reached, so they are counted here, not listed",
            f.count,
            f.rule,
            f.account.as_deref().unwrap_or("?"),
            e.principals.len(),
            if e.principals.len() >= MAX_SEEN { " or more" } else { "" },
            f.first_time,
            f.last_time
        );
        return;
    }
    if f.count > 1 {
        let keys = if f.keys.len() > 1 {
            format!(" on {} keys", f.keys.len())
        } else {
            String::new()
        };
        f.summary = format!(
            "{} ({} such events{keys} from {} to {})",
            f.summary, f.count, f.first_time, f.last_time
        );
    }
}

/// Folds of one input, made where the input is decoded (a replay worker, the daemon's
/// file task) so that a flood of findings in one file is bounded before it reaches the
/// collector: the rules' findings, folded per rule policy.
pub struct FileFolds {
    folder: Folder,
}

impl FileFolds {
    pub fn len(&self) -> usize {
        self.folder.len()
    }

    pub fn is_empty(&self) -> bool {
        self.folder.is_empty()
    }

    pub fn new(cap: usize) -> FileFolds {
        FileFolds {
            folder: Folder::new(cap),
        }
    }

    pub fn add(&mut self, f: Finding, policy: FoldPolicy) {
        self.folder.add(f, policy);
    }

    /// The folds so far (emptied), for a chunk of a large input. Per-file folds keep
    /// their raw summaries: the run's folder describes a fold once it is complete.
    pub fn take(&mut self) -> Vec<Finding> {
        self.folder.closing.clear();
        self.folder.touched.clear();
        let mut all: Vec<Entry> = self.folder.entries.drain().map(|(_, e)| e).collect();
        all.sort_by(|a, b| (&a.f.first_time, &a.f.id).cmp(&(&b.f.first_time, &b.f.id)));
        all.into_iter().map(|e| e.f).collect()
    }

    /// The input's folds, and how many findings joined an overflow finding.
    pub fn finish(mut self) -> (Vec<Finding>, u64) {
        let folds = self.take();
        (folds, self.folder.overflowed)
    }
}

/// Fold policies per rule id (rules.toml's `fold_by`/`fold_window`, the detectors').
#[derive(Debug, Clone, Default)]
pub struct Policies(pub BTreeMap<String, FoldPolicy>);

impl Policies {
    pub fn of(&self, f: &Finding) -> FoldPolicy {
        match f.kind {
            Kind::Rule | Kind::Anomaly => self.0.get(&f.rule).copied().unwrap_or_default(),
            _ => FoldPolicy::BY_ID,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(i: usize, key: &str, t: &str) -> Finding {
        let ev = format!("e-{i:06}");
        Finding {
            id: finding_id("kms-crypto-denied", std::slice::from_ref(&ev)),
            rule: "kms-crypto-denied".into(),
            summary: format!("role was denied Decrypt on {key}"),
            event_ids: vec![ev],
            time: t.into(),
            principal: Some("arn:aws:sts::1:assumed-role/app/s1".into()),
            principal_role: Some("arn:aws:iam::1:role/app".into()),
            account: Some("111122223333".into()),
            keys: vec![key.into()],
            ..Finding::default()
        }
    }

    fn time(i: usize) -> String {
        crate::clock::format_unix(1_790_000_000 + i as i64 * 7)
    }

    const BY_PRINCIPAL: FoldPolicy = FoldPolicy {
        by: FoldBy::Principal,
        window_secs: 3600,
    };

    #[test]
    fn repeats_fold_into_one_finding_whatever_the_arrival_order_and_split() {
        let all: Vec<Finding> = (0..300)
            .map(|i| denied(i, &format!("k{}", i % 7), &time(i)))
            .collect();
        let mut one = Folder::default();
        for f in &all {
            one.add(f.clone(), BY_PRINCIPAL);
        }
        let a = one.drain();
        // The same findings split into three "files" folded first, in reverse order.
        let mut run = Folder::default();
        for chunk in all.chunks(100).rev() {
            let mut file = FileFolds::new(100);
            for f in chunk.iter().rev() {
                file.add(f.clone(), BY_PRINCIPAL);
            }
            for f in file.finish().0 {
                run.add(f, BY_PRINCIPAL);
            }
        }
        let b = run.drain();
        assert_eq!(a, b, "same folds whatever the split and order");
        let total: u64 = a.iter().map(|f| f.count).sum();
        assert_eq!(total, 300);
        for f in &a {
            assert!(f.event_ids.len() <= MAX_EVENT_IDS);
            assert!(f.keys.len() <= 7);
            assert!(f.first_time <= f.last_time);
            assert!(f.summary.contains("such events"), "{}", f.summary);
        }
        // The earliest event describes the fold.
        assert_eq!(a[0].time, time(0));
        assert_eq!(a[0].event_ids[0], "e-000000");
    }

    #[test]
    fn a_record_seen_twice_is_counted_once() {
        let mut folder = Folder::default();
        let f = denied(1, "k", &time(1));
        assert_eq!(folder.add(f.clone(), BY_PRINCIPAL), Added::New);
        assert_eq!(folder.add(f, BY_PRINCIPAL), Added::Duplicate);
        assert_eq!(
            folder.add(denied(2, "k", &time(2)), BY_PRINCIPAL),
            Added::Grew
        );
        let out = folder.drain();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].count, 2);
        assert_eq!(folder.duplicates, 1);
    }

    #[test]
    fn windows_close_behind_the_watermark_and_ids_follow_the_window() {
        let mut folder = Folder::default();
        folder.add(denied(1, "k", "2026-10-01T00:10:00Z"), BY_PRINCIPAL);
        folder.add(denied(2, "k", "2026-10-01T01:10:00Z"), BY_PRINCIPAL);
        let t = |s: &str| crate::clock::parse_rfc3339(s).unwrap();
        assert!(folder.close_until(t("2026-10-01T01:14:59Z")).is_empty());
        let first = folder.close_until(t("2026-10-01T01:15:00Z"));
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].time, "2026-10-01T00:10:00Z");
        let second = folder.drain();
        assert_ne!(first[0].id, second[0].id, "another window, another id");
        // Keys fold separately under the default policy.
        let mut keyed = Folder::default();
        keyed.add(
            denied(1, "k1", "2026-10-01T00:10:00Z"),
            FoldPolicy::default(),
        );
        keyed.add(
            denied(2, "k2", "2026-10-01T00:11:00Z"),
            FoldPolicy::default(),
        );
        keyed.add(
            denied(3, "k1", "2026-10-01T00:12:00Z"),
            FoldPolicy::default(),
        );
        let mut out = keyed.drain();
        out.sort_by_key(|f| f.count);
        assert_eq!(out.iter().map(|f| f.count).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_full_folder_counts_the_rest_in_an_overflow_finding() {
        let mut folder = Folder::new(3);
        for i in 0..50 {
            let mut f = denied(i, "k", &time(i));
            f.principal_role = Some(format!("arn:aws:iam::1:role/r{i}"));
            folder.add(f, BY_PRINCIPAL);
        }
        assert_eq!(folder.overflowed, 47);
        let out = folder.drain();
        assert_eq!(out.len(), 4);
        let over = out.iter().find(|f| f.principal_role.is_none()).unwrap();
        assert_eq!(over.count, 47);
        assert!(
            over.summary.contains("47 more") && over.summary.contains("47 principal(s)"),
            "{}",
            over.summary
        );
        assert_eq!(out.iter().map(|f| f.count).sum::<u64>(), 50);
    }

    #[test]
    fn stored_folds_come_back_with_their_counts() {
        let mut folder = Folder::default();
        folder.add(denied(1, "k", &time(1)), BY_PRINCIPAL);
        folder.take_changed(1.0);
        folder.add(denied(2, "k", &time(2)), BY_PRINCIPAL);
        let writes = folder.take_writes();
        assert_eq!(writes.len(), 1);
        let mut back = Folder::default();
        let bad = back.restore(writes.into_iter().filter_map(|(id, v)| v.map(|v| (id, v))));
        assert_eq!(bad, 0);
        // Its last delivery had 1 event; it has 2 now; the same event again is a repeat.
        assert_eq!(
            back.add(denied(2, "k", &time(2)), BY_PRINCIPAL),
            Added::Duplicate
        );
        let grown = back.take_changed(1.0);
        assert_eq!(grown.len(), 1);
        assert_eq!(grown[0].count, 2);
        let closed = back.close_until(i64::MAX);
        assert_eq!(closed.len(), 1);
        assert_eq!(back.take_writes(), vec![(closed[0].id.clone(), None)]);
    }

    #[test]
    fn the_daemon_sees_a_fold_when_it_opens_and_when_it_grew() {
        let mut folder = Folder::default();
        folder.add(denied(1, "k", &time(1)), BY_PRINCIPAL);
        let first = folder.take_changed(2.0);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].count, 1);
        folder.add(denied(2, "k", &time(2)), BY_PRINCIPAL);
        assert_eq!(folder.take_changed(2.0).len(), 1, "doubled");
        folder.add(denied(3, "k", &time(3)), BY_PRINCIPAL);
        assert!(folder.take_changed(2.0).is_empty(), "3 < 2 x 2");
        let last = folder.close_changed(i64::MAX);
        assert_eq!(last.len(), 1);
        assert_eq!(last[0].count, 3);
        assert_eq!(last[0].id, first[0].id);
    }
}
