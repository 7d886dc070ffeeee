//! Routing for one channel, as pure logic over an explicit clock: which findings the
//! channel wants (minimum severity, rule include/exclude, accounts), grouping (the same
//! rule for the same principal and key within a window becomes one alert with a count
//! and first/last times, then at most one update when the window closes), a digest for
//! low severities, and a rate limit that, when it bites, yields one "N alerts
//! suppressed" notice instead of silence.
//!
//! A `Router` never reads the clock and does no I/O: callers pass `now` to `offer`,
//! `tick` and `flush`, and deliver the `Alert`s they return. Memory is bounded: at most
//! `MAX_OPEN_GROUPS` groups, `MAX_DIGEST_ENTRIES` digest lines and `MAX_GROUP_KEYS`
//! listed keys per group.

use super::clock::{format_rfc3339, parse_rfc3339};
use super::{
    hash_id, synthetic, Alert, AlertKind, DigestEntry, GroupInfo, DIGEST_RULE, SUPPRESSED_RULE,
};
use crate::analyze::finding::{Finding, Severity};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

/// Keys listed in one group alert (the rest are counted).
pub const MAX_GROUP_KEYS: usize = 20;
/// Groups open at once; past this the oldest is closed (its alert sent) early.
pub const MAX_OPEN_GROUPS: usize = 10_000;
/// Lines kept in one digest; past this groups are only counted.
pub const MAX_DIGEST_ENTRIES: usize = 500;
/// Lines listed in a rate-limit notice.
pub const MAX_SUPPRESSED_ENTRIES: usize = 20;
/// Distinct keys remembered per group (to count, not list, the rest).
const MAX_KEYS_TRACKED: usize = 1000;

/// What findings are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupField {
    Rule,
    /// The role ARN for assumed roles (stable across sessions), else the caller ARN.
    Principal,
    /// The KMS key ARNs of the finding.
    Key,
    Account,
    Region,
    SourceIp,
}

impl GroupField {
    fn name(self) -> &'static str {
        match self {
            GroupField::Rule => "rule",
            GroupField::Principal => "principal",
            GroupField::Key => "key",
            GroupField::Account => "account",
            GroupField::Region => "region",
            GroupField::SourceIp => "source_ip",
        }
    }
}

/// At most `max` alerts per `per`; beyond that, one notice per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub max: u32,
    pub per: Duration,
}

/// The routing settings of one channel (validated; see `config`).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub min_severity: Severity,
    /// Rule ids (a trailing `*` matches a prefix); empty = every rule.
    pub include_rules: Vec<String>,
    pub exclude_rules: Vec<String>,
    /// `recipientAccountId`s; empty = every account.
    pub accounts: Vec<String>,
    pub exclude_accounts: Vec<String>,
    pub group_by: Vec<GroupField>,
    /// How long a group stays open after its first finding.
    pub group_window: Duration,
    /// How long the first alert of a group waits for more findings to join it.
    pub group_wait: Duration,
    /// Severities below this go to a digest instead of alerting one by one.
    pub digest_below: Option<Severity>,
    pub digest_interval: Duration,
    pub rate_limit: Option<RateLimit>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            min_severity: Severity::Low,
            include_rules: Vec::new(),
            exclude_rules: Vec::new(),
            accounts: Vec::new(),
            exclude_accounts: Vec::new(),
            group_by: vec![GroupField::Rule, GroupField::Principal, GroupField::Key],
            group_window: Duration::from_secs(600),
            group_wait: Duration::from_secs(30),
            digest_below: None,
            digest_interval: Duration::from_secs(3600),
            rate_limit: None,
        }
    }
}

impl RouteConfig {
    /// Whether this channel wants `f` at all.
    pub fn accepts(&self, f: &Finding) -> bool {
        if f.severity < self.min_severity {
            return false;
        }
        let rule_matches = |pat: &String| match pat.strip_suffix('*') {
            Some(prefix) => f.rule.starts_with(prefix),
            None => *pat == f.rule,
        };
        if !self.include_rules.is_empty() && !self.include_rules.iter().any(rule_matches) {
            return false;
        }
        if self.exclude_rules.iter().any(rule_matches) {
            return false;
        }
        let account = f.account.as_deref().unwrap_or("");
        if !self.accounts.is_empty() && !self.accounts.iter().any(|a| a == account) {
            return false;
        }
        !self.exclude_accounts.iter().any(|a| a == account)
    }

    /// The grouping key of `f`, e.g. `rule=kms-crypto-denied|principal=arn:...`.
    pub fn group_key(&self, f: &Finding) -> String {
        let mut parts = Vec::with_capacity(self.group_by.len());
        for field in &self.group_by {
            let value = match field {
                GroupField::Rule => f.rule.clone(),
                GroupField::Principal => f
                    .principal_role
                    .clone()
                    .or_else(|| f.principal.clone())
                    .unwrap_or_default(),
                GroupField::Key => {
                    let mut keys = f.keys.clone();
                    keys.sort();
                    keys.join(",")
                }
                GroupField::Account => f.account.clone().unwrap_or_default(),
                GroupField::Region => f.region.clone().unwrap_or_default(),
                GroupField::SourceIp => f.source_ip.clone().unwrap_or_default(),
            };
            parts.push(format!("{}={value}", field.name()));
        }
        parts.join("|")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Group {
    id: String,
    key: String,
    finding: Finding,
    count: u64,
    first_time: String,
    last_time: String,
    first_secs: Option<i64>,
    last_secs: Option<i64>,
    keys: BTreeSet<String>,
    keys_overflow: u64,
    opened: SystemTime,
    /// The count at the last alert sent for the group (0: none yet).
    sent: u64,
    /// Events counted per finding id: a folded finding that comes again with a larger
    /// count (the daemon's update of a growing fold) adds only what is new. Bounded by
    /// `MAX_MEMBERS`; past it, findings add their whole count.
    #[serde(default)]
    members: BTreeMap<String, u64>,
}

/// Finding ids a group remembers at most (to count a growing fold once).
const MAX_MEMBERS: usize = 1000;

impl Group {
    fn open(key: String, f: &Finding, now: SystemTime) -> Group {
        let secs = parse_rfc3339(&f.time);
        let mut g = Group {
            id: hash_id(&[&key, &f.id]),
            key,
            finding: f.clone(),
            count: 0,
            first_time: if f.first_time.is_empty() {
                f.time.clone()
            } else {
                f.first_time.clone()
            },
            last_time: if f.first_time.is_empty() {
                f.time.clone()
            } else {
                f.first_time.clone()
            },
            first_secs: parse_rfc3339(&f.first_time).or(secs),
            last_secs: parse_rfc3339(&f.first_time).or(secs),
            keys: BTreeSet::new(),
            keys_overflow: 0,
            opened: now,
            sent: 0,
            members: BTreeMap::new(),
        };
        g.add(f, secs);
        g
    }

    fn add(&mut self, f: &Finding, secs: Option<i64>) {
        // A folded finding stands for `count` events, from `first_time` to `last_time`.
        let events = f.count.max(1);
        let before = self.members.get(&f.id).copied();
        self.count += events.saturating_sub(before.unwrap_or(0));
        if before.is_some() || self.members.len() < MAX_MEMBERS {
            let seen = self.members.entry(f.id.clone()).or_default();
            *seen = (*seen).max(events);
        }
        let first = if f.first_time.is_empty() {
            &f.time
        } else {
            &f.first_time
        };
        let last = if f.last_time.is_empty() {
            &f.time
        } else {
            &f.last_time
        };
        let (first_secs, last_secs) = match secs {
            Some(_) => (parse_rfc3339(first).or(secs), parse_rfc3339(last).or(secs)),
            None => (None, None),
        };
        match (first_secs, last_secs, self.first_secs, self.last_secs) {
            (Some(s0), Some(s1), Some(first_g), Some(last_g)) => {
                if s0 < first_g {
                    self.first_secs = Some(s0);
                    self.first_time = first.clone();
                }
                if s1 > last_g {
                    self.last_secs = Some(s1);
                    self.last_time = last.clone();
                }
            }
            // Unparseable times: keep arrival order.
            _ => self.last_time = last.clone(),
        }
        for k in &f.keys {
            if self.keys.len() < MAX_KEYS_TRACKED {
                self.keys.insert(k.clone());
            } else if !self.keys.contains(k) {
                self.keys_overflow += 1;
            }
        }
    }

    /// Whether a finding with event time `secs` belongs to this group's session (its
    /// event time within `window` of the group's): replaying months of logs must not
    /// fold a January event and a March event into one alert.
    fn near(&self, secs: Option<i64>, window: Duration) -> bool {
        let w = window.as_secs() as i64;
        match (secs, self.first_secs, self.last_secs) {
            (Some(s), Some(first), Some(last)) => s <= last + w && s + w >= first,
            _ => true,
        }
    }

    fn alert(&self, kind: AlertKind, channel: &str) -> Alert {
        let listed: Vec<String> = self.keys.iter().take(MAX_GROUP_KEYS).cloned().collect();
        let omitted = (self.keys.len() - listed.len()) as u64 + self.keys_overflow;
        let mut a = Alert {
            id: String::new(),
            kind,
            channel: channel.to_string(),
            finding: self.finding.clone(),
            group: GroupInfo {
                id: self.id.clone(),
                key: self.key.clone(),
                count: self.count,
                first_time: self.first_time.clone(),
                last_time: self.last_time.clone(),
                keys: listed,
                keys_omitted: omitted,
            },
            digest: Vec::new(),
            description: None,
        };
        a.id = a.compute_id();
        a
    }

    fn entry(&self) -> DigestEntry {
        DigestEntry {
            rule: self.finding.rule.clone(),
            severity: self.finding.severity,
            title: self.finding.title.clone(),
            principal: self
                .finding
                .principal_role
                .clone()
                .or_else(|| self.finding.principal.clone()),
            count: self.count,
            first_time: self.first_time.clone(),
            last_time: self.last_time.clone(),
            summary: self.finding.summary.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DigestBuffer {
    started: SystemTime,
    /// By group id, so a group's update replaces its line instead of repeating it.
    entries: BTreeMap<String, DigestEntry>,
    overflow: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LimitWindow {
    started: Option<SystemTime>,
    sent: u32,
    suppressed: u64,
    max_severity: Option<Severity>,
    entries: Vec<DigestEntry>,
    first: Option<SystemTime>,
    last: Option<SystemTime>,
}

/// What a `Router` holds between calls: open groups, the digest being collected, the
/// rate-limit window. Serializable, so the daemon can store it with its outbox and a
/// restart neither loses a group still waiting for its first alert nor repeats one.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RouterState {
    groups: Vec<Group>,
    digest: Option<DigestBuffer>,
    limit: LimitWindow,
}

impl RouterState {
    /// Findings held and not yet sent in any alert (waiting groups, group updates,
    /// digest lines, suppressed alerts are not counted: they were decided).
    pub fn waiting(&self) -> u64 {
        self.groups.iter().map(|g| g.count - g.sent).sum()
    }
}

/// Routing state of one channel.
#[derive(Debug)]
pub struct Router {
    channel: String,
    cfg: RouteConfig,
    groups: BTreeMap<String, Group>,
    digest: Option<DigestBuffer>,
    limit: LimitWindow,
    /// Alerts held back by the rate limit since this router was made (for metrics).
    suppressed_total: u64,
}

impl Router {
    pub fn new(channel: &str, cfg: RouteConfig) -> Router {
        Router {
            channel: channel.to_string(),
            cfg,
            groups: BTreeMap::new(),
            digest: None,
            limit: LimitWindow::default(),
            suppressed_total: 0,
        }
    }

    /// A router that goes on from `state` (saved by `state()` before a restart).
    pub fn with_state(channel: &str, cfg: RouteConfig, state: RouterState) -> Router {
        Router {
            channel: channel.to_string(),
            cfg,
            groups: state
                .groups
                .into_iter()
                .map(|g| (g.key.clone(), g))
                .collect(),
            digest: state.digest,
            limit: state.limit,
            suppressed_total: 0,
        }
    }

    /// Alerts the rate limit held back since this router was made (not persisted).
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total
    }

    /// A copy of the state, to persist.
    pub fn state(&self) -> RouterState {
        RouterState {
            groups: self.groups.values().cloned().collect(),
            digest: self.digest.clone(),
            limit: self.limit.clone(),
        }
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    pub fn config(&self) -> &RouteConfig {
        &self.cfg
    }

    /// Takes one finding seen at `now`; returns the alerts due now (possibly none).
    pub fn offer(&mut self, f: &Finding, now: SystemTime) -> Vec<Alert> {
        let mut out = self.tick(now);
        if !self.cfg.accepts(f) {
            return out;
        }
        let key = self.cfg.group_key(f);
        let secs = parse_rfc3339(&f.time);
        if let Some(g) = self.groups.get_mut(&key) {
            if now < g.opened + self.cfg.group_window && g.near(secs, self.cfg.group_window) {
                g.add(f, secs);
                return out;
            }
            if let Some(old) = self.groups.remove(&key) {
                self.close(old, now, &mut out);
            }
        }
        if self.groups.len() >= MAX_OPEN_GROUPS {
            let oldest = self
                .groups
                .iter()
                .min_by_key(|(_, g)| g.opened)
                .map(|(k, _)| k.clone());
            if let Some(old) = oldest.and_then(|k| self.groups.remove(&k)) {
                self.close(old, now, &mut out);
            }
        }
        self.groups.insert(key.clone(), Group::open(key, f, now));
        out.extend(self.tick(now));
        out
    }

    /// Sends what is due at `now`: first alerts whose wait is over, updates of closed
    /// groups, a digest whose interval is over, a rate-limit notice at the end of its
    /// window.
    pub fn tick(&mut self, now: SystemTime) -> Vec<Alert> {
        let mut out = Vec::new();
        let keys: Vec<String> = self.groups.keys().cloned().collect();
        for k in keys {
            let Some(g) = self.groups.get(&k) else {
                continue;
            };
            if now >= g.opened + self.cfg.group_window {
                if let Some(g) = self.groups.remove(&k) {
                    self.close(g, now, &mut out);
                }
            } else if g.sent == 0 && now >= g.opened + self.cfg.group_wait {
                let alert = g.alert(AlertKind::Finding, &self.channel);
                let (count, entry) = (g.count, g.entry());
                if let Some(g) = self.groups.get_mut(&k) {
                    g.sent = count;
                }
                self.emit(alert, entry, now, &mut out);
            }
        }
        if let Some(d) = &self.digest {
            if now >= d.started + self.cfg.digest_interval {
                self.emit_digest(now, &mut out);
            }
        }
        self.roll_limit(now, &mut out);
        out
    }

    /// Sends everything pending now (end of input, shutdown): open groups, the digest,
    /// a rate-limit notice.
    pub fn flush(&mut self, now: SystemTime) -> Vec<Alert> {
        let mut out = Vec::new();
        let groups = std::mem::take(&mut self.groups);
        for (_, g) in groups {
            self.close(g, now, &mut out);
        }
        self.emit_digest(now, &mut out);
        self.emit_suppressed(now, &mut out);
        self.limit = LimitWindow::default();
        out
    }

    /// The earliest time at which `tick` may have something to send.
    pub fn next_deadline(&self) -> Option<SystemTime> {
        let groups = self.groups.values().map(|g| {
            if g.sent == 0 {
                g.opened + self.cfg.group_wait.min(self.cfg.group_window)
            } else {
                g.opened + self.cfg.group_window
            }
        });
        let digest = self
            .digest
            .as_ref()
            .map(|d| d.started + self.cfg.digest_interval);
        let limit = match (self.limit.started, self.cfg.rate_limit) {
            (Some(s), Some(rl)) if self.limit.suppressed > 0 => Some(s + rl.per),
            _ => None,
        };
        groups.chain(digest).chain(limit).min()
    }

    fn close(&mut self, g: Group, now: SystemTime, out: &mut Vec<Alert>) {
        if g.count > g.sent {
            let kind = if g.sent == 0 {
                AlertKind::Finding
            } else {
                AlertKind::Update
            };
            self.emit(g.alert(kind, &self.channel), g.entry(), now, out);
        }
    }

    /// The digest and the rate limit sit after grouping: they see group alerts.
    fn emit(&mut self, alert: Alert, entry: DigestEntry, now: SystemTime, out: &mut Vec<Alert>) {
        if self.cfg.digest_below.is_some_and(|d| alert.severity() < d) {
            let d = self.digest.get_or_insert_with(|| DigestBuffer {
                started: now,
                entries: BTreeMap::new(),
                overflow: 0,
            });
            if d.entries.len() < MAX_DIGEST_ENTRIES || d.entries.contains_key(&alert.group.id) {
                d.entries.insert(alert.group.id.clone(), entry);
            } else {
                d.overflow += 1;
            }
            return;
        }
        let Some(rl) = self.cfg.rate_limit else {
            out.push(alert);
            return;
        };
        self.roll_limit(now, out);
        let w = &mut self.limit;
        w.started.get_or_insert(now);
        if w.sent < rl.max {
            w.sent += 1;
            out.push(alert);
        } else {
            self.suppressed_total += 1;
            w.suppressed += 1;
            w.max_severity = w.max_severity.max(Some(alert.severity()));
            w.first.get_or_insert(now);
            w.last = Some(now);
            if w.entries.len() < MAX_SUPPRESSED_ENTRIES {
                w.entries.push(entry);
            }
        }
    }

    fn roll_limit(&mut self, now: SystemTime, out: &mut Vec<Alert>) {
        if let (Some(started), Some(rl)) = (self.limit.started, self.cfg.rate_limit) {
            if now >= started + rl.per {
                self.emit_suppressed(now, out);
                self.limit = LimitWindow::default();
            }
        }
    }

    fn emit_digest(&mut self, now: SystemTime, out: &mut Vec<Alert>) {
        let Some(d) = self.digest.take() else { return };
        let mut entries: Vec<DigestEntry> = d.entries.into_values().collect();
        entries.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(b.count.cmp(&a.count))
                .then(a.first_time.cmp(&b.first_time))
        });
        let findings: u64 = entries.iter().map(|e| e.count).sum();
        let severity = entries
            .iter()
            .map(|e| e.severity)
            .max()
            .unwrap_or(Severity::Info);
        let first = entries
            .iter()
            .map(|e| e.first_time.clone())
            .min()
            .unwrap_or_default();
        let last = entries
            .iter()
            .map(|e| e.last_time.clone())
            .max()
            .unwrap_or_default();
        let groups = entries.len() as u64 + d.overflow;
        let time = format_rfc3339(now);
        let title = format!("Digest: {groups} low-severity alerts ({findings} findings)");
        let mut summary = format!(
            "{groups} groups of findings below {} on channel {} since {}",
            self.cfg.digest_below.unwrap_or(Severity::Info),
            self.channel,
            format_rfc3339(d.started)
        );
        if d.overflow > 0 {
            summary.push_str(&format!(
                "; {} groups beyond the first {MAX_DIGEST_ENTRIES} are not listed",
                d.overflow
            ));
        }
        let finding = synthetic(DIGEST_RULE, severity, &title, &summary, &time);
        out.push(self.aggregate(AlertKind::Digest, finding, entries, findings, first, last));
    }

    fn emit_suppressed(&mut self, now: SystemTime, out: &mut Vec<Alert>) {
        let w = std::mem::take(&mut self.limit);
        let (Some(rl), true) = (self.cfg.rate_limit, w.suppressed > 0) else {
            self.limit = w;
            return;
        };
        let from = w.first.map(format_rfc3339).unwrap_or_default();
        let to = w.last.map(format_rfc3339).unwrap_or_default();
        let title = format!(
            "{} alerts suppressed by the rate limit of channel {}",
            w.suppressed, self.channel
        );
        let summary = format!(
            "Channel {} reached its rate limit of {} alerts per {}s; {} alerts between {from} and {to} were not sent (the first {} are listed).",
            self.channel,
            rl.max,
            rl.per.as_secs(),
            w.suppressed,
            w.entries.len()
        );
        let severity = w.max_severity.unwrap_or(Severity::Info);
        let finding = synthetic(
            SUPPRESSED_RULE,
            severity,
            &title,
            &summary,
            &format_rfc3339(now),
        );
        let findings = w.entries.iter().map(|e| e.count).sum();
        out.push(self.aggregate(
            AlertKind::Suppressed,
            finding,
            w.entries,
            findings,
            from,
            to,
        ));
    }

    fn aggregate(
        &self,
        kind: AlertKind,
        finding: Finding,
        entries: Vec<DigestEntry>,
        count: u64,
        first_time: String,
        last_time: String,
    ) -> Alert {
        let key = format!("{}|channel={}", kind.as_str(), self.channel);
        let mut a = Alert {
            id: String::new(),
            kind,
            channel: self.channel.clone(),
            group: GroupInfo {
                id: hash_id(&[&key, &finding.id]),
                key,
                count,
                first_time,
                last_time,
                keys: Vec::new(),
                keys_omitted: 0,
            },
            finding,
            digest: entries,
            description: None,
        };
        a.id = a.compute_id();
        a
    }
}

#[cfg(test)]
mod tests;
