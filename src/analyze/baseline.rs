//! Per-principal behavioural baselines and the anomaly detectors built on them.
//!
//! Workers turn each KMS event into an `Observation` (a compact, owned summary); the
//! `Detector` consumes observations in eventTime order, keeps one `Baseline` per stable
//! principal (role ARN for assumed roles, never the session; `ROLE via SERVICE` for calls
//! an AWS service made on the principal's behalf, which behave differently), and raises
//! `anomaly` findings that say what was seen and what the baseline was. Pure logic over
//! a cache: loading and committing go through `store.rs` (see `Detector::take_commit`).
//!
//! Estimators: sets of keys, source IPs, VPC endpoints, user-agent families (name and
//! major version) and regions with last-seen times (expired after `ttl_days`, capped in
//! size so attacker-controlled input cannot grow state without bound); an hour-of-week
//! activity histogram; and per operation family, 5-minute call counts summarised by an
//! exponentially weighted mean and variance (alpha 0.02, about 4 hours of memory; idle
//! buckets count as zeros). Nothing is "new" until a principal has `learn_min_events`
//! events spread over at least `learn_hours`.

use crate::analyze::finding::{finding_id, Finding, Kind, Severity};
use crate::analyze::rule::event_id_of;
use crate::event::Event;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// Detector settings (`[baseline]` in the config file). Defaults are documented in
/// docs/baselines.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// Events a principal needs before anything it does counts as new.
    pub learn_min_events: u64,
    /// Hours between a principal's first event and its first anomaly.
    pub learn_hours: u64,
    /// Entries not seen for this long are forgotten.
    pub ttl_days: u64,
    pub max_keys: usize,
    pub max_sources: usize,
    pub max_user_agents: usize,
    pub max_regions: usize,
    /// Rate spike: a 5-minute count must be at least this...
    pub spike_min_count: u64,
    /// ...and this many times the usual mean...
    pub spike_ratio: f64,
    /// ...and this many standard deviations above it.
    pub spike_sigmas: f64,
    /// 5-minute buckets of history before rates are judged (288 = one day).
    pub spike_min_buckets: u64,
    /// Denied calls within `denied_window_secs` that make a burst.
    pub denied_burst: u64,
    pub denied_window_secs: i64,
    /// Management events of a principal before its hours are judged.
    pub off_hours_min_events: u64,
    /// Detectors to turn off, by id (e.g. "anomaly-new-user-agent").
    pub disabled: Vec<String>,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            learn_min_events: 50,
            learn_hours: 24,
            ttl_days: 30,
            max_keys: 256,
            max_sources: 64,
            max_user_agents: 32,
            max_regions: 32,
            spike_min_count: 100,
            spike_ratio: 5.0,
            spike_sigmas: 6.0,
            spike_min_buckets: 288,
            denied_burst: 10,
            denied_window_secs: 600,
            off_hours_min_events: 50,
            disabled: Vec::new(),
        }
    }
}

pub const DETECTORS: [(&str, Severity, &str); 8] = [
    (
        "anomaly-new-key",
        Severity::Medium,
        "first use of a key by a principal",
    ),
    (
        "anomaly-new-source-ip",
        Severity::Medium,
        "a source IP (or calling service) never seen for the principal",
    ),
    (
        "anomaly-new-vpc-endpoint",
        Severity::Low,
        "a VPC endpoint never seen for the principal",
    ),
    (
        "anomaly-new-user-agent",
        Severity::Low,
        "a user-agent family never seen for the principal",
    ),
    (
        "anomaly-new-region",
        Severity::Medium,
        "a region never seen for the principal",
    ),
    (
        "anomaly-rate-spike",
        Severity::High,
        "a Decrypt/GenerateDataKey/ReEncrypt/Encrypt rate far above the principal's usual",
    ),
    (
        "anomaly-denied-burst",
        Severity::High,
        "a burst of denied KMS calls (key enumeration)",
    ),
    (
        "anomaly-off-hours-management",
        Severity::Medium,
        "key management at hours the principal is never active",
    ),
];

/// How the detectors' findings fold: the spike and burst detectors group by their own
/// ids (one finding per episode); the first-seen detectors fold a principal's new keys,
/// sources, agents and regions of one window into one finding.
pub fn fold_policies() -> Vec<(String, crate::analyze::fold::FoldPolicy)> {
    use crate::analyze::fold::{FoldBy, FoldPolicy};
    DETECTORS
        .iter()
        .map(|(id, _, _)| {
            let by = match *id {
                "anomaly-rate-spike" | "anomaly-denied-burst" => FoldBy::Id,
                _ => FoldBy::Principal,
            };
            (
                id.to_string(),
                FoldPolicy {
                    by,
                    ..FoldPolicy::default()
                },
            )
        })
        .collect()
}

const BUCKET: i64 = 300;
const ALPHA: f64 = 0.02;
const MAX_IDS: usize = 50;

/// One KMS event as the baselines see it. Compact on purpose (baselines see every KMS
/// event): all text lives in one buffer addressed by spans, so building and dropping an
/// observation costs three allocations instead of fifteen.
#[derive(Debug, Clone)]
pub struct Observation {
    text: String,
    spans: [Span; F_COUNT],
    keys: Vec<Span>,
    pub time: i64,
    pub denied: bool,
    pub management_write: bool,
    /// Operation family for rates ("Decrypt", "GenerateDataKey", "ReEncrypt", "Encrypt").
    pub rate_family: Option<&'static str>,
    pub crypto: bool,
    pub file: Arc<str>,
}

/// A piece of `Observation::text`; `NONE` when the field was absent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span(u32, u32);

impl Span {
    const NONE: Span = Span(u32::MAX, 0);
}

const F_PRINCIPAL: usize = 0;
const F_PRINCIPAL_ARN: usize = 1;
const F_PRINCIPAL_ROLE: usize = 2;
const F_TIME: usize = 3;
const F_EVENT_ID: usize = 4;
const F_EVENT_NAME: usize = 5;
const F_ACCOUNT: usize = 6;
const F_REGION: usize = 7;
const F_SOURCE: usize = 8;
const F_SOURCE_IP: usize = 9;
const F_VPCE: usize = 10;
const F_USER_AGENT: usize = 11;
const F_UA_FAMILY: usize = 12;
const F_COUNT: usize = 13;

impl Observation {
    fn get(&self, s: Span) -> Option<&str> {
        if s == Span::NONE {
            return None;
        }
        self.text.get(s.0 as usize..(s.0 + s.1) as usize)
    }
    fn field(&self, f: usize) -> Option<&str> {
        self.get(self.spans[f])
    }
    /// The stable principal the baseline is kept for.
    pub fn principal(&self) -> &str {
        self.field(F_PRINCIPAL).unwrap_or("")
    }
    pub fn principal_arn(&self) -> Option<&str> {
        self.field(F_PRINCIPAL_ARN)
    }
    pub fn principal_role(&self) -> Option<&str> {
        self.field(F_PRINCIPAL_ROLE)
    }
    pub fn time_str(&self) -> &str {
        self.field(F_TIME).unwrap_or("")
    }
    pub fn event_id(&self) -> &str {
        self.field(F_EVENT_ID).unwrap_or("")
    }
    pub fn event_name(&self) -> &str {
        self.field(F_EVENT_NAME).unwrap_or("")
    }
    pub fn account(&self) -> Option<&str> {
        self.field(F_ACCOUNT)
    }
    pub fn region(&self) -> Option<&str> {
        self.field(F_REGION)
    }
    /// The source IP, or for calls an AWS service made on the principal's behalf, the
    /// service.
    pub fn source(&self) -> Option<&str> {
        self.field(F_SOURCE)
    }
    pub fn source_ip(&self) -> Option<&str> {
        self.field(F_SOURCE_IP)
    }
    pub fn vpc_endpoint(&self) -> Option<&str> {
        self.field(F_VPCE)
    }
    pub fn user_agent(&self) -> Option<&str> {
        self.field(F_USER_AGENT)
    }
    pub fn ua_family(&self) -> Option<&str> {
        self.field(F_UA_FAMILY)
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.keys.iter().filter_map(|s| self.get(*s))
    }
    pub fn keys_vec(&self) -> Vec<String> {
        self.keys().map(str::to_string).collect()
    }
}

/// Builds an `Observation` field by field.
struct ObservationBuilder {
    text: String,
    spans: [Span; F_COUNT],
    keys: Vec<Span>,
}

impl ObservationBuilder {
    fn new() -> Self {
        ObservationBuilder {
            text: String::with_capacity(512),
            spans: [Span::NONE; F_COUNT],
            keys: Vec::new(),
        }
    }
    fn push(&mut self, v: &str) -> Span {
        let start = self.text.len() as u32;
        self.text.push_str(v);
        Span(start, v.len() as u32)
    }
    fn set(&mut self, f: usize, v: Option<&str>) {
        if let Some(v) = v {
            self.spans[f] = self.push(v);
        }
    }
    fn key(&mut self, v: &str) {
        let s = self.push(v);
        self.keys.push(s);
    }
}

fn rate_family(name: &str) -> Option<&'static str> {
    Some(match name {
        "Decrypt" => "Decrypt",
        n if n.starts_with("GenerateDataKey") => "GenerateDataKey",
        n if n.starts_with("ReEncrypt") => "ReEncrypt",
        "Encrypt" => "Encrypt",
        _ => return None,
    })
}

const CRYPTO: [&str; 14] = [
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "ReEncrypt",
    "ReEncryptFrom",
    "ReEncryptTo",
    "Sign",
    "Verify",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
];

/// The stable identity a baseline is kept for.
pub fn stable_principal(ev: &Event<'_>) -> Option<String> {
    let base = match ev.identity_type() {
        Some("AssumedRole") | Some("FederatedUser") => ev
            .principal_role()
            .or_else(|| ev.str(&["userIdentity", "sessionContext", "sessionIssuer", "arn"]))
            .or_else(|| ev.str(&["userIdentity", "arn"])),
        Some("AWSService") => ev
            .invoked_by()
            .or_else(|| ev.str(&["userIdentity", "principalId"])),
        _ => ev
            .str(&["userIdentity", "arn"])
            .or_else(|| ev.str(&["userIdentity", "principalId"])),
    }?;
    Some(match ev.invoked_by() {
        Some(svc) if ev.identity_type() != Some("AWSService") => format!("{base} via {svc}"),
        _ => base.to_string(),
    })
}

/// Family and major version of a user agent: `aws-sdk-java/2.25.13 Linux/...` ->
/// `aws-sdk-java/2`; browsers -> `browser`; anything else: its first token, capped.
pub fn ua_family(ua: &str) -> String {
    if ua.starts_with("Mozilla/") {
        return "browser".into();
    }
    let first = ua.split_whitespace().next().unwrap_or("");
    let (name, version) = first.split_once('/').unwrap_or((first, ""));
    let major: String = version.chars().take_while(|c| c.is_ascii_digit()).collect();
    let mut fam: String = name.chars().filter(|c| !c.is_control()).take(48).collect();
    if !major.is_empty() {
        fam.push('/');
        fam.push_str(&major[..major.len().min(6)]);
    }
    fam
}

/// Parses CloudTrail's `eventTime` (`2026-10-01T12:34:56Z`, fractions allowed) into Unix
/// seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    crate::clock::parse_rfc3339(s)
}

/// Builds the observation of a KMS event, or None for events baselines ignore.
pub fn observe(ev: &Event<'_>, file: &Arc<str>) -> Option<Observation> {
    if ev.event_source() != Some(crate::event::KMS_SOURCE) {
        return None;
    }
    let time_str = ev.event_time()?;
    let time = parse_time(time_str)?;
    let name = ev.event_name()?;
    let read_only = ev.get(&["readOnly"]).and_then(crate::event::Value::as_bool) == Some(true)
        || name.starts_with("Describe")
        || name.starts_with("List")
        || name.starts_with("Get");
    let crypto = CRYPTO.contains(&name);
    let mut b = ObservationBuilder::new();
    b.set(F_PRINCIPAL, Some(&stable_principal(ev)?));
    b.set(F_PRINCIPAL_ARN, ev.principal());
    b.set(F_PRINCIPAL_ROLE, ev.principal_role());
    b.set(F_TIME, Some(time_str));
    match ev.event_id() {
        Some(id) if !id.is_empty() => b.set(F_EVENT_ID, Some(id)),
        _ => b.set(F_EVENT_ID, Some(&event_id_of(ev))),
    }
    b.set(F_EVENT_NAME, Some(name));
    b.set(F_ACCOUNT, ev.account());
    b.set(F_REGION, ev.region());
    b.set(
        F_SOURCE,
        ev.invoked_by().or(ev.source_ip()).map(|s| cap(s, 128)),
    );
    b.set(F_SOURCE_IP, ev.source_ip());
    b.set(F_VPCE, ev.vpc_endpoint().map(|s| cap(s, 64)));
    b.set(F_USER_AGENT, ev.user_agent());
    b.set(F_UA_FAMILY, ev.user_agent().map(ua_family).as_deref());
    for k in ev.key_arns() {
        b.key(&k);
    }
    Some(Observation {
        text: b.text,
        spans: b.spans,
        keys: b.keys,
        time,
        denied: ev
            .error_code()
            .is_some_and(|c| c.starts_with("AccessDenied")),
        management_write: !read_only && !crypto,
        rate_family: rate_family(name),
        crypto,
        file: file.clone(),
    })
}

/// The first `max` bytes of `s`, cut at a character boundary.
fn cap(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// 5-minute call counts of one operation family.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Rate {
    pub bucket_start: i64,
    pub count: u64,
    pub mean: f64,
    pub var: f64,
    /// Buckets folded into mean/var so far.
    pub buckets: u64,
    /// True while consecutive buckets are anomalous (one finding per episode).
    pub in_spike: bool,
    /// First event ids of the open bucket (for the finding).
    pub ids: Vec<String>,
    pub first_time: String,
}

/// The denied-call window of a principal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Denied {
    pub window_start: i64,
    pub last: i64,
    pub count: u64,
    pub alerted: bool,
    pub keys: Vec<String>,
    pub ids: Vec<String>,
}

/// What kmsguard believes is normal for one principal.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Baseline {
    pub first_seen: i64,
    pub last_seen: i64,
    pub events: u64,
    pub management_events: u64,
    pub keys: BTreeMap<String, i64>,
    pub sources: BTreeMap<String, i64>,
    pub vpc_endpoints: BTreeMap<String, i64>,
    pub user_agents: BTreeMap<String, i64>,
    pub regions: BTreeMap<String, i64>,
    /// Events per hour of the week (0 = Monday 00:00 UTC).
    pub hours: Vec<u32>,
    pub rates: BTreeMap<String, Rate>,
    pub denied: Denied,
    /// When the detector last used this baseline (its own counter, not stored): the
    /// cache evicts the least recently used.
    #[serde(skip)]
    pub last_used: u64,
}

impl Baseline {
    fn learned(&self, cfg: &BaselineConfig, now: i64) -> bool {
        self.events >= cfg.learn_min_events
            && now - self.first_seen >= cfg.learn_hours as i64 * 3600
    }
}

fn hour_of_week(t: i64) -> usize {
    // 1970-01-01 was a Thursday: shift so 0 is Monday.
    ((t.div_euclid(3600) + 72) % 168) as usize
}

/// Adds `value` to a capped, expiring set; returns true when it was not there.
fn remember(set: &mut BTreeMap<String, i64>, value: &str, now: i64, ttl: i64, cap: usize) -> bool {
    if let Some(seen) = set.get_mut(value) {
        *seen = (*seen).max(now);
        return false;
    }
    set.retain(|_, seen| now - *seen <= ttl);
    if set.len() >= cap {
        // Forget the stalest entry: the bound holds whatever the input.
        if let Some(oldest) = set.iter().min_by_key(|(_, t)| **t).map(|(k, _)| k.clone()) {
            set.remove(&oldest);
        }
    }
    set.insert(value.to_string(), now);
    true
}

/// The anomaly detectors over a cache of baselines.
pub struct Detector {
    cfg: BaselineConfig,
    cache: HashMap<String, Baseline>,
    dirty: HashSet<String>,
    disabled: HashSet<String>,
    /// The newest event time observed (the trail's event-time watermark).
    watermark: i64,
    /// The watermark's bucket at the last `close_elapsed` scan.
    scanned_bucket: i64,
    /// Counts observations, for the cache's least-recently-used order.
    clock: u64,
    /// Baselines dropped from the cache (they stay in the store and are loaded again
    /// when their principal calls).
    pub evicted: u64,
}

/// How far (event time) the watermark must be past a bucket's end before
/// `close_elapsed` closes it: CloudTrail delivers regions and accounts with different
/// lags, so events of a bucket can still come a few minutes after later ones.
pub const CLOSE_SLACK_SECS: i64 = 300;

impl Detector {
    pub fn new(cfg: BaselineConfig) -> Self {
        let disabled = cfg.disabled.iter().cloned().collect();
        Detector {
            cfg,
            cache: HashMap::new(),
            dirty: HashSet::new(),
            disabled,
            watermark: i64::MIN,
            scanned_bucket: i64::MIN,
            clock: 0,
            evicted: 0,
        }
    }

    pub fn config(&self) -> &BaselineConfig {
        &self.cfg
    }

    /// True when the principal's baseline is already cached.
    pub fn is_cached(&self, principal: &str) -> bool {
        self.cache.contains_key(principal)
    }

    /// Puts a baseline loaded from the store into the cache.
    pub fn load(&mut self, principal: String, b: Baseline) {
        self.cache.insert(principal, b);
    }

    /// Baselines changed since the last call, to commit; the cache keeps them.
    pub fn take_dirty(&mut self) -> Vec<(String, Baseline)> {
        let dirty: Vec<String> = self.dirty.drain().collect();
        dirty
            .into_iter()
            .filter_map(|p| self.cache.get(&p).map(|b| (p, b.clone())))
            .collect()
    }

    /// Baselines in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Baselines changed since the last `take_dirty`.
    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// The trail's newest event time seen.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Keeps the cache bounded: when it holds more than `max` baselines, drops clean
    /// ones (committed: the store has them) down to three quarters of `max`, least
    /// recently used first and those without an open rate bucket before those with one
    /// (an evicted open bucket is judged at its principal's next call, not by
    /// `close_elapsed`). Dirty baselines are never dropped: commit them first.
    pub fn trim_cache(&mut self, max: usize) {
        if self.cache.len() <= max {
            return;
        }
        let target = max * 3 / 4;
        let mut clean: Vec<(bool, u64, String)> = self
            .cache
            .iter()
            .filter(|(p, _)| !self.dirty.contains(*p))
            .map(|(p, b)| {
                let open = b.rates.values().any(|r| r.count > 0);
                (open, b.last_used, p.clone())
            })
            .collect();
        clean.sort_unstable();
        for (_, _, p) in clean {
            if self.cache.len() <= target {
                break;
            }
            self.cache.remove(&p);
            self.evicted += 1;
        }
    }

    fn enabled(&self, id: &str) -> bool {
        !self.disabled.contains(id)
    }

    /// Learns from one observation (in time order) and returns the anomalies it shows.
    /// With `report` false (learn-only) nothing is returned but state still changes.
    pub fn observe(&mut self, o: &Observation, report: bool) -> Vec<Finding> {
        let mut out = Vec::new();
        let cfg = &self.cfg;
        let ttl = cfg.ttl_days as i64 * 86400;
        if !self.dirty.contains(o.principal()) {
            self.dirty.insert(o.principal().to_string());
        }
        self.watermark = self.watermark.max(o.time);
        if !self.cache.contains_key(o.principal()) {
            let fresh = Baseline {
                first_seen: o.time,
                hours: vec![0; 168],
                ..Baseline::default()
            };
            self.cache.insert(o.principal().to_string(), fresh);
        }
        self.clock += 1;
        let Some(b) = self.cache.get_mut(o.principal()) else {
            return out;
        };
        b.last_used = self.clock;
        if b.hours.len() != 168 {
            b.hours = vec![0; 168];
        }
        let learned = b.learned(cfg, o.time);
        let mut anomalies: Vec<(&'static str, String, String)> = Vec::new();

        // Off-hours management, judged before this event joins the histogram.
        if o.management_write
            && learned
            && b.management_events + b.events >= cfg.off_hours_min_events
        {
            let hod = |h: usize| -> u32 { (0..7).map(|d| b.hours[d * 24 + h]).sum() };
            let h = hour_of_week(o.time) % 24;
            let near = [(h + 23) % 24, h, (h + 1) % 24];
            if near.iter().all(|x| hod(*x) == 0) {
                let active: Vec<usize> = (0..24).filter(|x| hod(*x) > 0).collect();
                let span = match (active.first(), active.last()) {
                    (Some(a), Some(z)) => format!("{a:02}:00-{:02}:59 UTC", z),
                    _ => "no hours".into(),
                };
                anomalies.push((
                    "anomaly-off-hours-management",
                    format!("{h:02}"),
                    format!(
                        "{} ran {} at {:02}:xx UTC, an hour it has never been active (usual activity {span}, {} events)",
                        o.principal(), o.event_name(), h, b.events
                    ),
                ));
            }
        }

        // Set features. A denied call teaches nothing about what is normal (and is the
        // denied-burst detector's business).
        if o.crypto && !o.denied {
            for k in o.keys() {
                let new = remember(&mut b.keys, k, o.time, ttl, cfg.max_keys);
                if new && learned {
                    let foreign = o.account().is_some_and(|a| !k.contains(&format!(":{a}:")));
                    anomalies.push((
                        "anomaly-new-key",
                        k.to_string(),
                        format!(
                            "{} used {} for the first time ({}){}; it used {} other key(s) in {} events",
                            o.principal(),
                            k,
                            o.event_name(),
                            if foreign { ", a key of another account" } else { "" },
                            b.keys.len().saturating_sub(1),
                            b.events
                        ),
                    ));
                }
            }
        }
        let feature = |id: &'static str,
                       set: &mut BTreeMap<String, i64>,
                       v: Option<&str>,
                       cap: usize,
                       what: &str,
                       anomalies: &mut Vec<(&'static str, String, String)>| {
            if let Some(v) = v {
                if remember(set, v, o.time, ttl, cap) && learned {
                    let known: Vec<&str> = set
                        .keys()
                        .filter(|k| k.as_str() != v)
                        .map(String::as_str)
                        .take(5)
                        .collect();
                    anomalies.push((
                        id,
                        v.to_string(),
                        format!(
                            "{} called {} from {what} {v}, never seen for it (known: {})",
                            o.principal(),
                            o.event_name(),
                            known.join(", ")
                        ),
                    ));
                }
            }
        };
        if !o.denied {
            feature(
                "anomaly-new-source-ip",
                &mut b.sources,
                o.source(),
                cfg.max_sources,
                "source",
                &mut anomalies,
            );
            feature(
                "anomaly-new-vpc-endpoint",
                &mut b.vpc_endpoints,
                o.vpc_endpoint(),
                cfg.max_sources,
                "VPC endpoint",
                &mut anomalies,
            );
            feature(
                "anomaly-new-user-agent",
                &mut b.user_agents,
                o.ua_family(),
                cfg.max_user_agents,
                "user agent",
                &mut anomalies,
            );
            feature(
                "anomaly-new-region",
                &mut b.regions,
                o.region(),
                cfg.max_regions,
                "region",
                &mut anomalies,
            );
        }

        // Rates: close the open bucket when this event starts a later one.
        let mut spike: Option<(String, Rate, f64, f64)> = None;
        if let Some(fam) = o.rate_family {
            let r = b.rates.entry(fam.to_string()).or_default();
            let bucket = o.time.div_euclid(BUCKET) * BUCKET;
            if r.buckets == 0 && r.count == 0 {
                r.bucket_start = bucket;
            }
            if bucket > r.bucket_start {
                if let Some(s) = close_bucket(r, cfg) {
                    spike = Some((fam.to_string(), s.0, s.1, s.2));
                }
                // Idle buckets in between count as zeros (capped: a day of them), and
                // end a spike episode: a burst after a quiet gap is a new one.
                let idle = ((bucket - r.bucket_start) / BUCKET - 1).clamp(0, 288);
                if idle > 0 {
                    r.in_spike = false;
                }
                for _ in 0..idle {
                    fold(r, 0.0);
                }
                r.bucket_start = bucket;
                r.count = 0;
                r.ids.clear();
                r.first_time.clear();
            }
            if bucket >= r.bucket_start {
                r.count += 1;
                if r.ids.len() < 10 {
                    r.ids.push(o.event_id().to_string());
                }
                if r.first_time.is_empty() {
                    r.first_time = o.time_str().to_string();
                }
            }
        }

        // Denied bursts, for any principal (no learning needed).
        let mut burst = None;
        if o.denied {
            let d = &mut b.denied;
            if o.time - d.last > cfg.denied_window_secs || d.count == 0 {
                *d = Denied {
                    window_start: o.time,
                    ..Denied::default()
                };
            }
            // Records of a file are not strictly in time order: the window spans the
            // earliest to the latest call seen.
            d.window_start = d.window_start.min(o.time);
            d.last = d.last.max(o.time);
            d.count += 1;
            if d.ids.len() < MAX_IDS {
                d.ids.push(o.event_id().to_string());
            }
            for k in o.keys() {
                if d.keys.len() < 20 && !d.keys.iter().any(|x| x == k) {
                    d.keys.push(k.to_string());
                }
            }
            if d.count >= cfg.denied_burst
                && !d.alerted
                && d.last - d.window_start <= cfg.denied_window_secs * 3
            {
                d.alerted = true;
                burst = Some(d.clone());
            }
        }

        b.events += 1;
        if o.management_write {
            b.management_events += 1;
        }
        b.last_seen = b.last_seen.max(o.time);
        let how = hour_of_week(o.time);
        b.hours[how] = b.hours[how].saturating_add(1);

        if !report {
            return out;
        }
        for (id, value, summary) in anomalies {
            if !self.enabled(id) {
                continue;
            }
            let _ = value;
            out.push(self.finding(
                id,
                o,
                vec![o.event_id().to_string()],
                o.keys_vec(),
                summary,
                None,
            ));
        }
        if let (Some((fam, r, mean, sd)), true) = (spike, self.enabled("anomaly-rate-spike")) {
            let summary = format!(
                "{} made {} {} calls in 5 minutes from {} vs. usual {:.0} ± {:.0} per 5 min over {} buckets",
                o.principal(), r.count, fam, r.first_time, mean, sd, r.buckets
            );
            let group = format!("{}|{}|{}", o.principal(), fam, r.bucket_start);
            let mut f = self.finding(
                "anomaly-rate-spike",
                o,
                r.ids.clone(),
                o.keys_vec(),
                summary,
                Some(group),
            );
            f.time = r.first_time.clone();
            f.first_time = r.first_time.clone();
            f.last_time = bucket_end(r.bucket_start);
            f.count = r.count;
            f.event_name = fam;
            out.push(f);
        }
        if let (Some(d), true) = (burst, self.enabled("anomaly-denied-burst")) {
            let summary = format!(
                "{} was denied {} KMS calls on {} key(s) within {} s (key enumeration?)",
                o.principal(),
                d.count,
                d.keys.len(),
                d.last - d.window_start
            );
            let group = format!("{}|{}", o.principal(), d.window_start);
            let mut f = self.finding(
                "anomaly-denied-burst",
                o,
                d.ids.clone(),
                d.keys.clone(),
                summary,
                Some(group),
            );
            f.count = d.count;
            f.first_time = crate::clock::format_unix(d.window_start);
            f.last_time = crate::clock::format_unix(d.last);
            out.push(f);
        }
        out
    }

    /// Closes every open rate bucket that ended `CLOSE_SLACK_SECS` or more before the
    /// newest event seen, as the principal's next call would, and reports the spikes.
    /// So a burst is reported once the trail has moved past it, not only when the same
    /// principal calls again (which, after an attack, may be never). Scans at most once
    /// per 5-minute bucket of event time; the finding ids are those the next call would
    /// give, so nothing is reported twice.
    pub fn close_elapsed(&mut self, report: bool) -> Vec<Finding> {
        let mut out = Vec::new();
        if self.watermark == i64::MIN {
            return out;
        }
        let now_bucket = self.watermark.div_euclid(BUCKET);
        if now_bucket <= self.scanned_bucket {
            return out;
        }
        self.scanned_bucket = now_bucket;
        let horizon = self.watermark - CLOSE_SLACK_SECS;
        let spikes_on = report && self.enabled("anomaly-rate-spike");
        for (p, b) in self.cache.iter_mut() {
            let mut touched = false;
            for (fam, r) in b.rates.iter_mut() {
                if r.count == 0 || r.bucket_start + BUCKET > horizon {
                    continue;
                }
                touched = true;
                if let Some((snap, mean, sd)) = close_bucket(r, &self.cfg) {
                    if spikes_on {
                        out.push(spike_finding(p, fam.clone(), &snap, mean, sd));
                    }
                }
                // An empty open bucket: the next call folds it as the idle bucket it is.
                r.bucket_start += BUCKET;
                r.count = 0;
                r.ids.clear();
                r.first_time.clear();
            }
            if touched && !self.dirty.contains(p) {
                self.dirty.insert(p.clone());
            }
        }
        out
    }

    /// Judges every open rate bucket as if it closed now (end of a replay) and reports
    /// spikes, without changing the baselines.
    pub fn flush(&mut self, report: bool) -> Vec<Finding> {
        let mut out = Vec::new();
        let cfg = self.cfg.clone();
        let principals: Vec<String> = self.cache.keys().cloned().collect();
        for p in principals {
            let Some(b) = self.cache.get_mut(&p) else {
                continue;
            };
            // Judge copies: the open buckets stay open in the stored baseline, since a
            // later replay (or the daemon) may continue them; a spike reported here and
            // again when its bucket really closes has the same finding id.
            let mut spikes = Vec::new();
            for (fam, r) in b.rates.iter() {
                if r.count == 0 {
                    continue;
                }
                let mut r = r.clone();
                if let Some((snap, mean, sd)) = close_bucket(&mut r, &cfg) {
                    spikes.push((fam.clone(), snap, mean, sd));
                }
            }
            if !report || !self.enabled("anomaly-rate-spike") {
                continue;
            }
            for (fam, r, mean, sd) in spikes {
                out.push(spike_finding(&p, fam, &r, mean, sd));
            }
        }
        out
    }

    fn finding(
        &self,
        id: &'static str,
        o: &Observation,
        event_ids: Vec<String>,
        keys: Vec<String>,
        summary: String,
        group: Option<String>,
    ) -> Finding {
        let (sev, title) = DETECTORS
            .iter()
            .find(|(d, _, _)| *d == id)
            .map(|(_, s, t)| (*s, *t))
            .unwrap_or((Severity::Medium, "anomaly"));
        let mut severity = sev;
        if id == "anomaly-new-key"
            && o.account()
                .is_some_and(|a| keys.iter().any(|k| !k.contains(&format!(":{a}:"))))
        {
            severity = Severity::High;
        }
        let fid = match group {
            Some(g) => finding_id(id, &[g]),
            None => finding_id(id, &event_ids),
        };
        let mut title = title.to_string();
        if let Some(first) = title.get_mut(0..1) {
            first.make_ascii_uppercase();
        }
        Finding {
            id: fid,
            kind: Kind::Anomaly,
            rule: id.to_string(),
            severity,
            title,
            summary: crate::analyze::rule::clean(&summary, 400).collect(),
            event_ids,
            event_name: o.event_name().to_string(),
            event_source: crate::event::KMS_SOURCE.into(),
            time: o.time_str().to_string(),
            principal: o.principal_arn().map(str::to_string),
            principal_role: o.principal_role().map(str::to_string),
            account: o.account().map(str::to_string),
            region: o.region().map(str::to_string),
            keys,
            source_ip: o.source_ip().map(str::to_string),
            user_agent: o.user_agent().map(str::to_string),
            error_code: None,
            file: o.file.to_string(),
            remediation: None,
            key_alias: None,
            key_tags: Default::default(),
            context: Default::default(),
            action: None,
            pending: Default::default(),
            count: 1,
            first_time: o.time_str().to_string(),
            last_time: o.time_str().to_string(),
        }
    }
}

/// Tag values that mark a key as sensitive (`sensitivity`, `classification` or
/// `data-classification` tags, case-insensitive).
const SENSITIVE: [&str; 5] = ["high", "critical", "restricted", "secret", "confidential"];

/// Raises a first-use-of-key anomaly by one level when the key is tagged sensitive (the
/// tags come from the key inventory, so this runs after enrichment).
pub fn escalate_for_tags(f: &mut Finding) {
    if f.rule != "anomaly-new-key" {
        return;
    }
    let sensitive = f.key_tags.iter().any(|(k, v)| {
        matches!(
            k.to_ascii_lowercase().as_str(),
            "sensitivity" | "classification" | "data-classification"
        ) && SENSITIVE.contains(&v.to_ascii_lowercase().as_str())
    });
    if sensitive {
        f.severity = match f.severity {
            Severity::Info => Severity::Low,
            Severity::Low => Severity::Medium,
            Severity::Medium => Severity::High,
            Severity::High | Severity::Critical => Severity::Critical,
        };
        f.summary.push_str(" The key is tagged sensitive.");
    }
}

fn fold(r: &mut Rate, x: f64) {
    if r.buckets == 0 {
        r.mean = x;
        r.var = 0.0;
    } else {
        let d = x - r.mean;
        r.mean += ALPHA * d;
        r.var = (1.0 - ALPHA) * (r.var + ALPHA * d * d);
    }
    r.buckets += 1;
}

/// Judges the open bucket; folds it into the estimate unless it is a spike (a spike must
/// not teach the baseline that spikes are normal). Returns (snapshot, mean, sd) of a
/// spike that starts an episode.
/// The finding for a spike in a bucket closed without a triggering call (`flush`,
/// `close_elapsed`); its id is the one `observe` gives the same bucket.
fn spike_finding(p: &str, fam: String, r: &Rate, mean: f64, sd: f64) -> Finding {
    let summary = format!(
        "{p} made {} {fam} calls in 5 minutes from {} vs. usual {mean:.0} ± {sd:.0} per 5 min over {} buckets",
        r.count, r.first_time, r.buckets
    );
    let id = finding_id(
        "anomaly-rate-spike",
        &[format!("{p}|{fam}|{}", r.bucket_start)],
    );
    // The stable principal is a role or user ARN (possibly "ROLE via SERVICE").
    let arn = p.split(" via ").next().unwrap_or(p);
    Finding {
        id,
        count: r.count,
        first_time: r.first_time.clone(),
        last_time: bucket_end(r.bucket_start),
        kind: Kind::Anomaly,
        rule: "anomaly-rate-spike".into(),
        severity: Severity::High,
        title: "Call rate spike".into(),
        summary,
        event_ids: r.ids.clone(),
        event_name: fam,
        event_source: crate::event::KMS_SOURCE.into(),
        time: r.first_time.clone(),
        principal: Some(p.to_string()),
        principal_role: arn.contains(":role/").then(|| arn.to_string()),
        account: arn
            .split(':')
            .nth(4)
            .filter(|a| a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_string),
        ..Finding::default()
    }
}

/// The last second of the 5-minute bucket starting at `start`.
fn bucket_end(start: i64) -> String {
    crate::clock::format_unix(start + BUCKET - 1)
}

fn close_bucket(r: &mut Rate, cfg: &BaselineConfig) -> Option<(Rate, f64, f64)> {
    let x = r.count as f64;
    let sd = r.var.sqrt();
    let is_spike = r.buckets >= cfg.spike_min_buckets
        && r.count >= cfg.spike_min_count
        && x >= cfg.spike_ratio * r.mean.max(1.0)
        && x >= r.mean + cfg.spike_sigmas * sd.max(1.0);
    if is_spike {
        let start = !r.in_spike;
        r.in_spike = true;
        return start.then(|| (r.clone(), r.mean, sd));
    }
    r.in_spike = false;
    fold(r, x);
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_keys_raise_first_use() {
        let mut f = Finding {
            rule: "anomaly-new-key".into(),
            severity: Severity::Medium,
            ..crate::analyze::finding::Finding::default()
        };
        escalate_for_tags(&mut f);
        assert_eq!(f.severity, Severity::Medium, "untagged: unchanged");
        f.key_tags.insert("Sensitivity".into(), "High".into());
        escalate_for_tags(&mut f);
        assert_eq!(f.severity, Severity::High);
        assert!(f.summary.ends_with("tagged sensitive."));
    }

    #[test]
    fn time_parsing() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2026-10-01T12:34:56Z"), Some(1790858096));
        assert_eq!(parse_time("2026-10-01T12:34:56.789Z"), Some(1790858096));
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_time("yesterday"), None);
        // 2026-10-05 is a Monday.
        assert_eq!(hour_of_week(parse_time("2026-10-05T00:30:00Z").unwrap()), 0);
        assert_eq!(
            hour_of_week(parse_time("2026-10-04T23:30:00Z").unwrap()),
            167
        );
    }

    #[test]
    fn user_agent_families_ignore_patch_versions() {
        assert_eq!(
            ua_family("aws-sdk-java/2.25.13 Linux/5.10"),
            "aws-sdk-java/2"
        );
        assert_eq!(ua_family("Boto3/1.34.2 md/Botocore#1.34.2"), "Boto3/1");
        assert_eq!(ua_family("Mozilla/5.0 (Macintosh)"), "browser");
        assert_eq!(ua_family("s3.amazonaws.com"), "s3.amazonaws.com");
    }

    #[test]
    fn sets_are_bounded_whatever_the_input() {
        let mut set = BTreeMap::new();
        for i in 0..10_000 {
            remember(
                &mut set,
                &format!("10.0.{}.{}", i / 256, i % 256),
                i,
                86400,
                64,
            );
        }
        assert_eq!(set.len(), 64);
        assert!(set.contains_key("10.0.39.15"), "the newest is kept");
    }

    fn obs(t: i64, name: &str, ip: &str, denied: bool) -> Observation {
        obs_as("arn:aws:iam::1:role/app", t, name, ip, denied)
    }

    fn obs_as(principal: &str, t: i64, name: &str, ip: &str, denied: bool) -> Observation {
        let mut b = ObservationBuilder::new();
        b.set(F_PRINCIPAL, Some(principal));
        b.set(F_TIME, Some(&format!("t{t}")));
        b.set(F_EVENT_ID, Some(&format!("e{t}-{ip}")));
        b.set(F_EVENT_NAME, Some(name));
        b.set(F_ACCOUNT, Some("111122223333"));
        b.set(F_REGION, Some("us-east-1"));
        b.set(F_SOURCE, Some(ip));
        b.set(F_SOURCE_IP, Some(ip));
        b.key("arn:aws:kms:us-east-1:111122223333:key/a");
        Observation {
            text: b.text,
            spans: b.spans,
            keys: b.keys,
            time: t,
            denied,
            management_write: false,
            rate_family: rate_family(name),
            crypto: true,
            file: Arc::from(""),
        }
    }

    #[test]
    fn nothing_is_new_while_learning_and_new_ips_are_reported_once_after() {
        let mut d = Detector::new(BaselineConfig::default());
        let mut found = Vec::new();
        for i in 0..100 {
            found.extend(d.observe(&obs(i * 1800, "Decrypt", "10.0.0.1", false), true));
        }
        assert!(found.is_empty(), "{found:?}");
        let late = 100 * 1800;
        let f = d.observe(&obs(late, "Decrypt", "185.220.1.1", false), true);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].rule, "anomaly-new-source-ip");
        assert!(
            f[0].summary.contains("185.220.1.1") && f[0].summary.contains("10.0.0.1"),
            "{}",
            f[0].summary
        );
        assert!(d
            .observe(&obs(late + 1, "Decrypt", "185.220.1.1", false), true)
            .is_empty());
    }

    #[test]
    fn a_spike_is_one_finding_and_does_not_become_normal() {
        let mut d = Detector::new(BaselineConfig::default());
        let mut t = 0;
        // Two days of 10 calls per 5 minutes.
        for _ in 0..576 {
            for j in 0..10 {
                assert!(d
                    .observe(&obs(t + j, "Decrypt", "10.0.0.1", false), true)
                    .is_empty());
            }
            t += 300;
        }
        // Three buckets of 400 calls.
        let mut found = Vec::new();
        for _ in 0..3 {
            for j in 0..400 {
                found.extend(d.observe(&obs(t + j % 300, "Decrypt", "10.0.0.1", false), true));
            }
            t += 300;
        }
        found.extend(d.observe(&obs(t, "Decrypt", "10.0.0.1", false), true));
        let spikes: Vec<_> = found
            .iter()
            .filter(|f| f.rule == "anomaly-rate-spike")
            .collect();
        assert_eq!(spikes.len(), 1, "{found:?}");
        assert!(
            spikes[0].summary.contains("400 Decrypt calls")
                && spikes[0].summary.contains("usual 10"),
            "{}",
            spikes[0].summary
        );
        let r = &d.cache["arn:aws:iam::1:role/app"].rates["Decrypt"];
        assert!(r.mean < 11.0, "spikes are not learned: {}", r.mean);
    }

    #[test]
    fn a_spike_is_judged_once_the_trail_moves_past_it_without_another_call() {
        // Two detectors see the same history and burst; in one the trail then moves on
        // through another principal's calls, in the other the bursting principal calls
        // again. Both report the burst once, with the same id.
        let app = "arn:aws:iam::111122223333:role/app";
        let other = "arn:aws:iam::111122223333:role/other";
        let mut by_trail = Detector::new(BaselineConfig::default());
        let mut by_call = Detector::new(BaselineConfig::default());
        let mut t = 0;
        let mut found = Vec::new();
        for _ in 0..576 {
            for j in 0..10 {
                let o = obs_as(app, t + j, "Decrypt", "10.0.0.1", false);
                found.extend(by_trail.observe(&o, true));
                found.extend(by_trail.close_elapsed(true));
                by_call.observe(&o, true);
            }
            t += 300;
        }
        for j in 0..400 {
            let o = obs_as(app, t + j % 300, "Decrypt", "10.0.0.1", false);
            found.extend(by_trail.observe(&o, true));
            found.extend(by_trail.close_elapsed(true));
            by_call.observe(&o, true);
        }
        assert!(
            found.is_empty(),
            "nothing before the bucket is over: {found:?}"
        );
        let burst_end = t + 300;
        // Another principal's calls up to the slack past the bucket: still open.
        let o = obs_as(
            other,
            burst_end + CLOSE_SLACK_SECS - 1,
            "Decrypt",
            "10.0.0.9",
            false,
        );
        by_trail.observe(&o, true);
        assert!(by_trail.close_elapsed(true).is_empty(), "within the slack");
        let o = obs_as(
            other,
            burst_end + CLOSE_SLACK_SECS + 301,
            "Decrypt",
            "10.0.0.9",
            false,
        );
        by_trail.observe(&o, true);
        let spikes = by_trail.close_elapsed(true);
        assert_eq!(spikes.len(), 1, "{spikes:?}");
        assert_eq!(spikes[0].principal.as_deref(), Some(app));
        assert_eq!(spikes[0].principal_role.as_deref(), Some(app));
        assert_eq!(spikes[0].account.as_deref(), Some("111122223333"));
        assert!(
            spikes[0].summary.contains("400 Decrypt calls"),
            "{}",
            spikes[0].summary
        );
        assert!(
            by_trail.take_dirty().iter().any(|(p, _)| p == app),
            "the close is committed"
        );
        // The same principal calling later adds nothing.
        let later = obs_as(app, burst_end + 3600, "Decrypt", "10.0.0.1", false);
        assert!(by_trail
            .observe(&later, true)
            .iter()
            .all(|f| f.rule != "anomaly-rate-spike"));
        // Without the trail moving on, the next call reports it: the same finding.
        let by_next_call: Vec<_> = by_call
            .observe(&later, true)
            .into_iter()
            .filter(|f| f.rule == "anomaly-rate-spike")
            .collect();
        assert_eq!(by_next_call.len(), 1);
        assert_eq!(by_next_call[0].id, spikes[0].id);
        // Both baselines learned the same thing from it.
        let (a, b) = (
            &by_trail.cache[app].rates["Decrypt"],
            &by_call.cache[app].rates["Decrypt"],
        );
        assert_eq!((a.buckets, a.mean.to_bits()), (b.buckets, b.mean.to_bits()));
    }

    #[test]
    fn a_burst_after_a_quiet_gap_is_a_new_episode() {
        let mut d = Detector::new(BaselineConfig::default());
        let mut t = 0;
        for _ in 0..576 {
            for j in 0..10 {
                d.observe(&obs(t + j, "Decrypt", "10.0.0.1", false), true);
            }
            t += 300;
        }
        let mut spikes = 0;
        for _ in 0..2 {
            // A burst, then an hour with no call at all.
            for j in 0..400 {
                spikes += d
                    .observe(&obs(t + j % 300, "Decrypt", "10.0.0.1", false), true)
                    .iter()
                    .filter(|f| f.rule == "anomaly-rate-spike")
                    .count();
            }
            t += 3600;
        }
        spikes += d
            .observe(&obs(t, "Decrypt", "10.0.0.1", false), true)
            .iter()
            .filter(|f| f.rule == "anomaly-rate-spike")
            .count();
        assert_eq!(spikes, 2, "each burst is its own finding");
    }

    #[test]
    fn a_denied_burst_is_found_without_history() {
        let mut d = Detector::new(BaselineConfig::default());
        let mut found = Vec::new();
        for i in 0..35 {
            found.extend(d.observe(&obs(i * 7, "Decrypt", "10.0.0.1", true), true));
        }
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].rule, "anomaly-denied-burst");
        assert_eq!(found[0].event_ids.len(), 10);
    }
}
