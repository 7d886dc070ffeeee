//! What a replay saw of KMS, for the `--report` timeline: events per hour per operation,
//! and per (principal, key) pair who used which key, how often, from where, first and last
//! seen. Each worker fills its own `Timeline` while it decodes (no second pass); the
//! replay merges them. Memory is bounded whatever the logs say: operation names, hours,
//! pairs, and the sources and user agents kept per pair are capped, strings are
//! truncated, and what did not fit is counted.

use crate::event::Event;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Distinct operation names kept; others are counted as `Other`.
pub const MAX_OPERATIONS: usize = 48;
/// Distinct hours kept (400 days); events of other hours are counted as dropped.
pub const MAX_HOURS: usize = 24 * 400;
/// (principal, key) pairs kept; events of other pairs are counted as dropped.
pub const MAX_PAIRS: usize = 20_000;
/// Source addresses and user agents kept per pair.
pub const MAX_SOURCES: usize = 8;
/// (hour, operation, principal, key set) cells kept for the report's filtered chart:
/// about 20 bytes each in the page, so at most a few MB whatever the window.
pub const MAX_CELLS: usize = 250_000;
/// Distinct strings (operations, principals, key sets) the cells may name.
pub const MAX_CELL_NAMES: usize = 20_000;
const MAX_TEXT: usize = 300;

/// One principal's use of one key (`-` for operations on no key).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PairUse {
    pub count: u64,
    pub errors: u64,
    pub first: String,
    pub last: String,
    pub sources: BTreeSet<String>,
    pub user_agents: BTreeSet<String>,
    pub operations: BTreeMap<String, u64>,
}

impl PairUse {
    fn merge(&mut self, o: PairUse) {
        self.count += o.count;
        self.errors += o.errors;
        if self.first.is_empty() || (!o.first.is_empty() && o.first < self.first) {
            self.first = o.first;
        }
        if o.last > self.last {
            self.last = o.last;
        }
        for s in o.sources {
            insert_capped(&mut self.sources, s);
        }
        for u in o.user_agents {
            insert_capped(&mut self.user_agents, u);
        }
        for (op, n) in o.operations {
            if self.operations.len() < MAX_OPERATIONS || self.operations.contains_key(&op) {
                *self.operations.entry(op).or_default() += n;
            }
        }
    }
}

fn insert_capped(set: &mut BTreeSet<String>, v: String) {
    if set.len() < MAX_SOURCES || set.contains(&v) {
        set.insert(v);
    }
}

fn text(s: &str) -> String {
    crate::analyze::rule::clean(s, MAX_TEXT).collect()
}

/// One principal's KMS events.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrincipalUse {
    pub count: u64,
    pub errors: u64,
    pub first: String,
    pub last: String,
}

impl PrincipalUse {
    fn merge(&mut self, o: PrincipalUse) {
        self.count += o.count;
        self.errors += o.errors;
        if self.first.is_empty() || (!o.first.is_empty() && o.first < self.first) {
            self.first = o.first;
        }
        if o.last > self.last {
            self.last = o.last;
        }
    }
}

/// KMS activity over a replay.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Hour start (seconds since the epoch) -> operation -> events.
    pub hours: BTreeMap<i64, BTreeMap<String, u64>>,
    pub pairs: HashMap<(String, String), PairUse>,
    /// Events per principal (the stable identity: role ARN for assumed roles, as for
    /// baselines), capped at `MAX_PAIRS` principals.
    pub principals: HashMap<String, PrincipalUse>,
    /// KMS events counted.
    pub events: u64,
    /// Events left out of `hours` (no or odd time, or beyond `MAX_HOURS`).
    pub dropped_hours: u64,
    /// Events left out of `pairs` (beyond `MAX_PAIRS`).
    pub dropped_pairs: u64,
    /// Events per (hour, operation, principal, key set), so the report can redraw the
    /// chart for a filter: the same events as `hours`, split further. Key sets are the
    /// event's keys (at most 4, as for `pairs`; `-` for none) joined with newlines, so an
    /// event naming two keys is one event here. Capped at `MAX_CELLS`.
    pub cells: HashMap<Cell, u64>,
    /// Events of `hours` left out of `cells` (beyond `MAX_CELLS`).
    pub dropped_cells: u64,
    /// The strings cells refer to (operations, principals, key sets), by index.
    pub names: Names,
    operations: BTreeSet<String>,
}

/// A cell of the filtered chart: hour start, then indexes into `Timeline::names` of the
/// operation, the principal and the key set.
pub type Cell = (i64, u32, u32, u32);

/// Interned strings: each distinct one stored once, referred to by index.
#[derive(Debug, Clone, Default)]
pub struct Names {
    list: Vec<String>,
    index: HashMap<String, u32>,
}

impl Names {
    /// The index of `s`, adding it when `add` (else None when it is new).
    fn id(&mut self, s: &str, add: bool) -> Option<u32> {
        if let Some(&i) = self.index.get(s) {
            return Some(i);
        }
        if !add {
            return None;
        }
        let i = u32::try_from(self.list.len()).ok()?;
        self.list.push(s.to_string());
        self.index.insert(s.to_string(), i);
        Some(i)
    }

    pub fn get(&self, i: u32) -> &str {
        self.list.get(i as usize).map_or("", String::as_str)
    }
}

impl Timeline {
    /// Counts one event (KMS events only; others are ignored).
    pub fn observe(&mut self, ev: &Event<'_>) {
        if ev.event_source() != Some(crate::event::KMS_SOURCE) {
            return;
        }
        self.events += 1;
        let op = self.operation(ev.event_name().unwrap_or("-"));
        let time = ev.event_time().unwrap_or("");
        let principal = text(
            ev.principal_role()
                .or_else(|| ev.principal())
                .or_else(|| ev.invoked_by())
                .unwrap_or("-"),
        );
        let mut keys: Vec<String> = ev.key_arns().iter().take(4).map(|k| text(k)).collect();
        if keys.is_empty() {
            keys.push("-".into());
        }
        match crate::analyze::baseline::parse_time(time) {
            Some(t) => {
                let hour = t - t.rem_euclid(3600);
                if self.hours.len() < MAX_HOURS || self.hours.contains_key(&hour) {
                    *self
                        .hours
                        .entry(hour)
                        .or_default()
                        .entry(op.clone())
                        .or_default() += 1;
                    self.add_cell(hour, &op, &principal, &keys.join("\n"), 1);
                } else {
                    self.dropped_hours += 1;
                }
            }
            None => self.dropped_hours += 1,
        }
        let time = text(time);
        if self.principals.len() < MAX_PAIRS || self.principals.contains_key(&principal) {
            self.principals
                .entry(principal.clone())
                .or_default()
                .merge(PrincipalUse {
                    count: 1,
                    errors: u64::from(ev.error_code().is_some()),
                    first: time.clone(),
                    last: time.clone(),
                });
        } else {
            self.dropped_pairs += 1;
        }
        let source = ev.source_ip().map(text);
        let agent = ev.user_agent().map(text);
        let failed = ev.error_code().is_some();
        for key in keys {
            let id = (principal.clone(), key);
            if self.pairs.len() >= MAX_PAIRS && !self.pairs.contains_key(&id) {
                self.dropped_pairs += 1;
                continue;
            }
            let mut one = PairUse {
                count: 1,
                errors: u64::from(failed),
                first: time.clone(),
                last: time.clone(),
                ..PairUse::default()
            };
            one.sources.extend(source.clone());
            one.user_agents.extend(agent.clone());
            one.operations.insert(op.clone(), 1);
            self.pairs.entry(id).or_default().merge(one);
        }
    }

    /// Adds `n` events to a cell, or counts them as dropped when the cells are full.
    fn add_cell(&mut self, hour: i64, op: &str, principal: &str, keys: &str, n: u64) {
        let add = self.cells.len() < MAX_CELLS && self.names.list.len() + 3 <= MAX_CELL_NAMES;
        let ids = (
            self.names.id(op, add),
            self.names.id(principal, add),
            self.names.id(keys, add),
        );
        let cell = match ids {
            (Some(o), Some(p), Some(k)) => (hour, o, p, k),
            _ => {
                self.dropped_cells += n;
                return;
            }
        };
        if add || self.cells.contains_key(&cell) {
            *self.cells.entry(cell).or_default() += n;
        } else {
            self.dropped_cells += n;
        }
    }

    fn operation(&mut self, name: &str) -> String {
        let name = text(name);
        if self.operations.contains(&name) {
            return name;
        }
        if self.operations.len() < MAX_OPERATIONS {
            self.operations.insert(name.clone());
            return name;
        }
        "Other".into()
    }

    /// Adds another worker's timeline (the caps still hold).
    pub fn merge(&mut self, other: Timeline) {
        self.events += other.events;
        self.dropped_hours += other.dropped_hours;
        self.dropped_pairs += other.dropped_pairs;
        self.dropped_cells += other.dropped_cells;
        let mut kept_hours = std::collections::HashSet::new();
        for (hour, ops) in other.hours {
            if self.hours.len() >= MAX_HOURS && !self.hours.contains_key(&hour) {
                self.dropped_hours += ops.values().sum::<u64>();
                continue;
            }
            kept_hours.insert(hour);
            let ops: Vec<(String, u64)> = ops
                .into_iter()
                .map(|(op, n)| (self.operations_merge(op), n))
                .collect();
            let mine = self.hours.entry(hour).or_default();
            for (op, n) in ops {
                *mine.entry(op).or_default() += n;
            }
        }
        // Cells in a stable order, so which ones a full table keeps does not depend on
        // hash order.
        let mut cells: Vec<(Cell, u64)> = other.cells.into_iter().collect();
        cells.sort_unstable();
        for ((hour, o, p, k), n) in cells {
            if !kept_hours.contains(&hour) {
                continue; // counted in dropped_hours above
            }
            let op = self.operations_merge(other.names.get(o).to_string());
            self.add_cell(hour, &op, other.names.get(p), other.names.get(k), n);
        }
        for (p, u) in other.principals {
            if self.principals.len() >= MAX_PAIRS && !self.principals.contains_key(&p) {
                self.dropped_pairs += u.count;
                continue;
            }
            self.principals.entry(p).or_default().merge(u);
        }
        for (id, u) in other.pairs {
            if self.pairs.len() >= MAX_PAIRS && !self.pairs.contains_key(&id) {
                self.dropped_pairs += u.count;
                continue;
            }
            self.pairs.entry(id).or_default().merge(u);
        }
    }

    fn operations_merge(&mut self, op: String) -> String {
        if self.operations.contains(&op) || op == "Other" {
            return op;
        }
        if self.operations.len() < MAX_OPERATIONS {
            self.operations.insert(op.clone());
            return op;
        }
        "Other".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(json: &str, t: &mut Timeline) {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let v = crate::json::Value::root(&tape.0).unwrap();
        t.observe(&Event::new(v));
    }

    #[test]
    fn counts_hours_pairs_and_caps() {
        let mut t = Timeline::default();
        let rec = |i: usize, name: &str, hour: u32| {
            format!(
                r#"{{"eventSource":"kms.amazonaws.com","eventName":"{name}","eventTime":"2026-10-01T{hour:02}:10:00Z","userIdentity":{{"type":"IAMUser","arn":"arn:aws:iam::111122223333:user/u{i}"}},"sourceIPAddress":"10.0.0.{}","resources":[{{"ARN":"arn:aws:kms:us-east-1:111122223333:key/k"}}]}}"#,
                i % 20
            )
        };
        ev(&rec(1, "Decrypt", 1), &mut t);
        ev(&rec(1, "Decrypt", 2), &mut t);
        ev(&rec(1, "Encrypt", 2), &mut t);
        ev(
            r#"{"eventSource":"s3.amazonaws.com","eventName":"GetObject"}"#,
            &mut t,
        );
        assert_eq!(t.events, 3);
        assert_eq!(t.hours.len(), 2);
        assert_eq!(t.cells.len(), 3, "(hour, op) x one principal and key");
        // An event naming two keys is one event in the cells, a use of each in pairs.
        ev(
            r#"{"eventSource":"kms.amazonaws.com","eventName":"ReEncrypt","eventTime":"2026-10-01T02:20:00Z","userIdentity":{"type":"IAMUser","arn":"arn:aws:iam::111122223333:user/u1"},"resources":[{"ARN":"arn:aws:kms:us-east-1:111122223333:key/a"},{"ARN":"arn:aws:kms:us-east-1:111122223333:key/b"}]}"#,
            &mut t,
        );
        assert_eq!(t.cells.values().sum::<u64>(), 4);
        let two = t
            .cells
            .keys()
            .find(|c| t.names.get(c.1) == "ReEncrypt")
            .unwrap();
        assert_eq!(
            t.names.get(two.3),
            "arn:aws:kms:us-east-1:111122223333:key/a\narn:aws:kms:us-east-1:111122223333:key/b"
        );
        assert_eq!(t.pairs.len(), 3);
        let mut other = t.clone();
        other.merge(t.clone());
        assert_eq!(other.cells.values().sum::<u64>(), 8);
        assert_eq!(other.cells.len(), t.cells.len());
        let pair = &t.pairs[&(
            "arn:aws:iam::111122223333:user/u1".to_string(),
            "arn:aws:kms:us-east-1:111122223333:key/k".to_string(),
        )];
        assert_eq!(pair.count, 3);
        assert_eq!(pair.first, "2026-10-01T01:10:00Z");
        assert_eq!(pair.last, "2026-10-01T02:10:00Z");
        for i in 0..MAX_PAIRS + 10 {
            ev(&rec(i + 100, &format!("Op{}", i % 100), 3), &mut t);
        }
        assert_eq!(t.pairs.len(), MAX_PAIRS);
        assert!(t.dropped_pairs >= 10);
        let ops: BTreeSet<&String> = t.hours.values().flat_map(|m| m.keys()).collect();
        assert!(ops.len() <= MAX_OPERATIONS + 1);
        assert!(t.pairs.values().all(|p| p.sources.len() <= MAX_SOURCES));
        // Every event with an hour is in a cell (none dropped at this size).
        let in_hours: u64 = t.hours.values().flat_map(|m| m.values()).sum();
        assert_eq!(t.cells.values().sum::<u64>() + t.dropped_cells, in_hours);
    }

    #[test]
    fn cells_are_capped() {
        let rec = |secs: i64, who: usize| {
            format!(
                r#"{{"eventSource":"kms.amazonaws.com","eventName":"Decrypt","eventTime":"{}","userIdentity":{{"type":"IAMUser","arn":"arn:aws:iam::111122223333:user/u{who}"}}}}"#,
                crate::inventory::format_time(secs)
            )
        };
        // Many distinct principals: the names run out before the cells.
        let mut t = Timeline::default();
        let n = MAX_CELL_NAMES + 5;
        for i in 0..n {
            ev(&rec(1_790_816_400, i), &mut t);
        }
        assert!(t.names.list.len() <= MAX_CELL_NAMES);
        assert!(t.cells.len() > MAX_CELL_NAMES - 10);
        assert_eq!(t.cells.len() as u64 + t.dropped_cells, n as u64);
        // A cell of known names is still counted.
        ev(&rec(1_790_816_400 + 60, 0), &mut t);
        assert_eq!(t.cells.values().max(), Some(&2));
        // Few principals over many hours: the cells run out.
        let mut t = Timeline::default();
        let mut events = 0u64;
        const { assert!(MAX_HOURS * 27 > MAX_CELLS) };
        for h in 0..MAX_HOURS as i64 {
            for who in 0..27 {
                ev(&rec(1_790_816_400 + h * 3600, who), &mut t);
                events += 1;
            }
        }
        assert_eq!(t.cells.len(), MAX_CELLS);
        assert_eq!(t.dropped_cells, events - MAX_CELLS as u64);
        let in_hours: u64 = t.hours.values().flat_map(|m| m.values()).sum();
        assert_eq!(
            in_hours, events,
            "the unfiltered chart still has every event"
        );
    }
}
