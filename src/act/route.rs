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
}

impl Group {
    fn open(key: String, f: &Finding, now: SystemTime) -> Group {
        let secs = parse_rfc3339(&f.time);
        let mut g = Group {
            id: hash_id(&[&key, &f.id]),
            key,
            finding: f.clone(),
            count: 0,
            first_time: f.time.clone(),
            last_time: f.time.clone(),
            first_secs: secs,
            last_secs: secs,
            keys: BTreeSet::new(),
            keys_overflow: 0,
            opened: now,
            sent: 0,
        };
        g.add(f, secs);
        g
    }

    fn add(&mut self, f: &Finding, secs: Option<i64>) {
        self.count += 1;
        match (secs, self.first_secs, self.last_secs) {
            (Some(s), Some(first), Some(last)) => {
                if s < first {
                    self.first_secs = Some(s);
                    self.first_time = f.time.clone();
                }
                if s > last {
                    self.last_secs = Some(s);
                    self.last_time = f.time.clone();
                }
            }
            // Unparseable times: keep arrival order.
            _ => self.last_time = f.time.clone(),
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
}

impl Router {
    pub fn new(channel: &str, cfg: RouteConfig) -> Router {
        Router {
            channel: channel.to_string(),
            cfg,
            groups: BTreeMap::new(),
            digest: None,
            limit: LimitWindow::default(),
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
        }
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
mod tests {
    use super::*;
    use crate::analyze::finding::Kind;
    use std::time::UNIX_EPOCH;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_790_000_000 + secs)
    }

    fn finding(rule: &str, sev: Severity, principal: &str, key: &str, time: &str) -> Finding {
        Finding {
            id: hash_id(&[rule, principal, key, time]),
            kind: Kind::Rule,
            rule: rule.into(),
            severity: sev,
            title: format!("title of {rule}"),
            summary: "s".into(),
            event_ids: vec!["e".into()],
            event_name: "Decrypt".into(),
            event_source: "kms.amazonaws.com".into(),
            time: time.into(),
            principal: Some(principal.into()),
            principal_role: None,
            account: Some("111122223333".into()),
            region: Some("us-east-1".into()),
            keys: vec![key.into()],
            source_ip: None,
            user_agent: None,
            error_code: None,
            file: "f".into(),
            remediation: None,
        }
    }

    fn t(min: u32, sec: u32) -> String {
        format!("2026-10-01T00:{min:02}:{sec:02}Z")
    }

    fn cfg() -> RouteConfig {
        RouteConfig {
            min_severity: Severity::Info,
            ..RouteConfig::default()
        }
    }

    #[test]
    fn filters_by_severity_rules_and_accounts() {
        let mut c = cfg();
        c.min_severity = Severity::Medium;
        c.include_rules = vec!["kms-*".into(), "cloudtrail-logging-stopped".into()];
        c.exclude_rules = vec!["kms-rotation-disabled".into()];
        c.exclude_accounts = vec!["444455556666".into()];
        let f = |rule: &str, sev| finding(rule, sev, "p", "k", &t(0, 0));
        assert!(c.accepts(&f("kms-key-disabled", Severity::High)));
        assert!(
            !c.accepts(&f("kms-key-disabled", Severity::Low)),
            "below minimum"
        );
        assert!(c.accepts(&f("cloudtrail-logging-stopped", Severity::Critical)));
        assert!(
            !c.accepts(&f("cloudtrail-trail-updated", Severity::Medium)),
            "not included"
        );
        assert!(
            !c.accepts(&f("kms-rotation-disabled", Severity::Medium)),
            "excluded"
        );
        let mut other = f("kms-key-disabled", Severity::High);
        other.account = Some("444455556666".into());
        assert!(!c.accepts(&other), "excluded account");
        c.accounts = vec!["999999999999".into()];
        assert!(
            !c.accepts(&f("kms-key-disabled", Severity::High)),
            "not a listed account"
        );
        other.account = None;
        assert!(!c.accepts(&other), "no account while accounts are listed");
    }

    #[test]
    fn a_burst_waits_then_becomes_one_alert_with_a_count() {
        let mut c = cfg();
        c.group_by = vec![GroupField::Rule, GroupField::Principal];
        let mut r = Router::new("mail", c);
        let mut sent = Vec::new();
        for i in 0..35u32 {
            let f = finding(
                "kms-crypto-denied",
                Severity::Low,
                "p",
                &format!("key{}", i % 25),
                &t(i / 8, (i * 7) % 60),
            );
            sent.extend(r.offer(&f, at(u64::from(i) / 10)));
        }
        assert!(sent.is_empty(), "nothing before group_wait: {sent:?}");
        assert!(r.tick(at(29)).is_empty());
        assert_eq!(r.next_deadline(), Some(at(30)));
        let out = r.tick(at(30));
        assert_eq!(out.len(), 1);
        let a = &out[0];
        assert_eq!(a.kind, AlertKind::Finding);
        assert_eq!(a.group.count, 35);
        assert_eq!(a.group.keys.len(), MAX_GROUP_KEYS);
        assert_eq!(a.group.keys_omitted, 5);
        assert_eq!(a.group.first_time, t(0, 0));
        assert_eq!(a.group.last_time, t(4, 58));
        assert_eq!(a.group.key, "rule=kms-crypto-denied|principal=p");
        // Nothing more arrived: the window closes without an update.
        assert!(r.tick(at(600)).is_empty());
        assert!(r.flush(at(700)).is_empty());
    }

    #[test]
    fn later_findings_update_the_alert_instead_of_repeating_it() {
        let mut c = cfg();
        c.group_wait = Duration::ZERO;
        let mut r = Router::new("pd", c);
        let first = r.offer(&finding("r", Severity::High, "p", "k", &t(0, 0)), at(0));
        assert_eq!(first.len(), 1, "no wait: sent at once");
        assert_eq!(first[0].group.count, 1);
        for i in 1..5 {
            assert!(r
                .offer(
                    &finding("r", Severity::High, "p", "k", &t(0, i)),
                    at(u64::from(i))
                )
                .is_empty());
        }
        // Another key is another group.
        let other = r.offer(&finding("r", Severity::High, "p", "k2", &t(0, 9)), at(9));
        assert_eq!(other.len(), 1);
        assert_ne!(other[0].group.id, first[0].group.id);
        let upd = r.tick(at(600));
        assert_eq!(upd.len(), 1, "one update, for the group that grew: {upd:?}");
        assert_eq!(upd[0].kind, AlertKind::Update);
        assert_eq!(upd[0].group.id, first[0].group.id);
        assert_eq!(upd[0].group.count, 5);
        assert_ne!(upd[0].id, first[0].id);
        // After the window, the same finding starts a new group.
        let again = r.offer(&finding("r", Severity::High, "p", "k", &t(11, 0)), at(660));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].kind, AlertKind::Finding);
    }

    #[test]
    fn replayed_findings_far_apart_in_event_time_are_separate_groups() {
        let mut r = Router::new("mail", cfg());
        assert!(r
            .offer(
                &finding("r", Severity::High, "p", "k", "2026-01-05T10:00:00Z"),
                at(0)
            )
            .is_empty());
        let out = r.offer(
            &finding("r", Severity::High, "p", "k", "2026-03-05T10:00:00Z"),
            at(0),
        );
        assert_eq!(out.len(), 1, "the January group closes when March arrives");
        assert_eq!(out[0].group.last_time, "2026-01-05T10:00:00Z");
        let rest = r.flush(at(1));
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].group.first_time, "2026-03-05T10:00:00Z");
    }

    #[test]
    fn low_severities_go_to_one_digest() {
        let mut c = cfg();
        c.group_wait = Duration::ZERO;
        c.digest_below = Some(Severity::Medium);
        let mut r = Router::new("mail", c);
        let mut out = Vec::new();
        for i in 0..6 {
            out.extend(r.offer(
                &finding(&format!("low{}", i % 3), Severity::Low, "p", "k", &t(0, i)),
                at(u64::from(i)),
            ));
        }
        out.extend(r.offer(&finding("hi", Severity::High, "p", "k", &t(0, 7)), at(7)));
        assert_eq!(out.len(), 1, "only the high finding goes out at once");
        assert_eq!(out[0].finding.rule, "hi");
        assert!(r.tick(at(3599)).iter().all(|a| a.kind != AlertKind::Digest));
        let d: Vec<Alert> = r
            .tick(at(3600))
            .into_iter()
            .filter(|a| a.kind == AlertKind::Digest)
            .collect();
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].digest.len(),
            3,
            "three groups, each listed once although updated"
        );
        assert_eq!(d[0].group.count, 6);
        assert_eq!(d[0].finding.rule, DIGEST_RULE);
        assert_eq!(d[0].severity(), Severity::Low);
        assert!(r.flush(at(3601)).is_empty());
    }

    #[test]
    fn rate_limit_yields_one_suppressed_notice() {
        let mut c = cfg();
        c.group_wait = Duration::ZERO;
        c.rate_limit = Some(RateLimit {
            max: 3,
            per: Duration::from_secs(3600),
        });
        let mut r = Router::new("mail", c);
        let mut out = Vec::new();
        for i in 0..10u32 {
            let sev = if i == 8 {
                Severity::Critical
            } else {
                Severity::High
            };
            out.extend(r.offer(
                &finding("r", sev, &format!("p{i}"), "k", &t(0, i)),
                at(u64::from(i)),
            ));
        }
        assert_eq!(out.len(), 3);
        assert_eq!(r.next_deadline(), Some(at(600)), "group windows first");
        let mid = r.tick(at(1800));
        assert!(mid.is_empty(), "{mid:?}");
        let notice = r.tick(at(3600));
        assert_eq!(notice.len(), 1);
        let n = &notice[0];
        assert_eq!(n.kind, AlertKind::Suppressed);
        assert_eq!(n.finding.rule, SUPPRESSED_RULE);
        assert_eq!(
            n.severity(),
            Severity::Critical,
            "as severe as the worst it held back"
        );
        assert!(
            n.finding.title.starts_with("7 alerts suppressed"),
            "{}",
            n.finding.title
        );
        assert_eq!(n.digest.len(), 7);
        // A new window sends again.
        let next = r.offer(&finding("r", Severity::High, "q", "k", &t(50, 0)), at(3700));
        assert_eq!(next.len(), 1);
    }

    #[test]
    fn flush_sends_what_waits() {
        let mut c = cfg();
        c.rate_limit = Some(RateLimit {
            max: 1,
            per: Duration::from_secs(60),
        });
        let mut r = Router::new("mail", c);
        assert!(r
            .offer(&finding("a", Severity::High, "p", "k", &t(0, 0)), at(0))
            .is_empty());
        assert!(r
            .offer(&finding("b", Severity::High, "p", "k", &t(0, 1)), at(0))
            .is_empty());
        let out = r.flush(at(1));
        let kinds: Vec<AlertKind> = out.iter().map(|a| a.kind).collect();
        assert_eq!(kinds, vec![AlertKind::Finding, AlertKind::Suppressed]);
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn state_survives_a_restart() {
        let mut c = cfg();
        c.rate_limit = Some(RateLimit {
            max: 5,
            per: Duration::from_secs(3600),
        });
        c.digest_below = Some(Severity::Medium);
        let mut before = Router::new("mail", c.clone());
        for i in 0..3 {
            before.offer(
                &finding("r", Severity::High, "p", "k", &t(0, i)),
                at(u64::from(i)),
            );
        }
        before.offer(&finding("low", Severity::Low, "p", "k", &t(0, 5)), at(5));
        let saved = serde_json::to_string(&before.state()).unwrap();
        let state: RouterState = serde_json::from_str(&saved).unwrap();
        assert_eq!(state.waiting(), 4);
        let mut after = Router::with_state("mail", c, state);
        let first = before.tick(at(30));
        assert_eq!(first.len(), 1, "the waiting group is sent");
        assert_eq!(first[0].group.count, 3);
        assert_eq!(after.tick(at(30)), first);
        assert_eq!(after.tick(at(3600)), before.tick(at(3600)));
        assert_eq!(after.flush(at(3601)), before.flush(at(3601)));
    }

    #[test]
    fn ids_are_stable_for_the_same_input() {
        let run = || {
            let mut r = Router::new("mail", cfg());
            r.offer(&finding("r", Severity::High, "p", "k", &t(0, 0)), at(0));
            r.flush(at(5))
        };
        assert_eq!(run(), run());
    }
}
