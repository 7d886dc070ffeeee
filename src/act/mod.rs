//! Alert channels: what leaves kmsguard to reach people. An `Alert` is a `Finding` plus
//! its grouping metadata (or a digest, a rate-limit notice, a test); a `Channel` is a
//! closed enum of the places it can go (email over SMTP, webhooks), built from
//! validated config. `Channel::deliver` makes one attempt and says whether a failure is
//! worth retrying (`DeliveryError::Transient`) or not (`Permanent`); retrying, with
//! `backoff`, is the caller's job (the daemon's outbox, or `dispatch` for the CLI).
//!
//! Routing (filters, grouping, digests, rate limits) is pure logic in `route`; rendering
//! of attacker-controlled text (headers, HTML, Slack markup) lives in `render`.
//!
//! In the daemon, `sink::AlertsSink` is the outbox sink of all channels: it routes
//! findings and answers with state writes (router state, `queue` entries) that the
//! outbox commits with the removal of what it consumed; `queue::run_channel` delivers
//! each channel's queue with backoff across restarts, parks what cannot be delivered
//! (with a `health` finding), and `control` lets `kmsguard alerts pending|retry` reach
//! a running daemon.

pub use crate::clock;
pub mod config;
pub mod control;
pub mod dispatch;
pub mod email;
pub mod queue;
pub mod render;
pub mod route;
pub mod secret;
pub mod sink;
pub mod webhook;

use crate::analyze::finding::{Finding, Kind, Severity};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime};

/// The rule id of the synthetic finding carried by a test alert.
pub const TEST_RULE: &str = "kmsguard-test-alert";
/// The rule id of the synthetic finding carried by a rate-limit notice.
pub const SUPPRESSED_RULE: &str = "kmsguard-alerts-suppressed";
/// The rule id of the synthetic finding carried by a digest.
pub const DIGEST_RULE: &str = "kmsguard-alert-digest";

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertKind {
    /// The first alert of a group of findings.
    Finding,
    /// More findings joined a group after its first alert: same group id, new count.
    Update,
    /// Low-severity groups collected over `digest_interval` (see `digest`).
    Digest,
    /// "N alerts suppressed": what a channel's rate limit held back (see `digest`).
    Suppressed,
    /// A clearly marked test sent by `kmsguard alerts test`; needs no action.
    Test,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Finding => "finding",
            AlertKind::Update => "update",
            AlertKind::Digest => "digest",
            AlertKind::Suppressed => "suppressed",
            AlertKind::Test => "test",
        }
    }
}

/// Grouping metadata: the findings of one rule for one principal (and key, by default)
/// within a window, counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Stable id of the group (hash of the group key and its first finding's id): the
    /// first alert and all its updates share it (email threading, PagerDuty dedup_key).
    pub id: String,
    /// The grouping key, e.g. `rule=kms-crypto-denied|principal=arn:...`.
    pub key: String,
    /// Findings in the group so far.
    pub count: u64,
    /// Event time of the earliest and latest finding (as recorded, RFC 3339).
    pub first_time: String,
    pub last_time: String,
    /// Distinct KMS keys over the group (at most `route::MAX_GROUP_KEYS`).
    pub keys: Vec<String>,
    /// Distinct keys beyond those listed.
    #[serde(default)]
    pub keys_omitted: u64,
}

/// One line of a digest or of a rate-limit notice: a group, summarized.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestEntry {
    pub rule: String,
    pub severity: Severity,
    pub title: String,
    pub principal: Option<String>,
    pub count: u64,
    pub first_time: String,
    pub last_time: String,
    pub summary: String,
}

/// What a channel delivers. Serializable, so the daemon's outbox can store it as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// Stable id of this alert (a receiver can drop a redelivered copy).
    pub id: String,
    pub kind: AlertKind,
    /// The channel it was routed to.
    pub channel: String,
    /// The (first) finding; for digests, notices and tests a synthetic `health` finding
    /// that says what the alert is.
    pub finding: Finding,
    pub group: GroupInfo,
    /// The entries of a digest or a rate-limit notice (empty otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digest: Vec<DigestEntry>,
    /// The rule's description, when the rule is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl Alert {
    /// The severity the alert is sent with.
    pub fn severity(&self) -> Severity {
        self.finding.severity
    }

    pub fn is_test(&self) -> bool {
        self.kind == AlertKind::Test
    }

    /// A clearly marked test alert for `channel`, made at `now`.
    pub fn test(channel: &str, now: SystemTime) -> Alert {
        let time = clock::format_rfc3339(now);
        let finding = synthetic(
            TEST_RULE,
            Severity::Info,
            "TEST alert from kmsguard (no action needed)",
            &format!(
                "This is a test alert sent by `kmsguard alerts test {channel}` at {time} to check that this channel reaches you. No action is needed."
            ),
            &time,
        );
        Alert::for_finding(AlertKind::Test, channel, finding, 1, Vec::new(), 0)
    }

    /// An alert for one finding with no grouping history (count 1).
    pub fn single(channel: &str, finding: Finding) -> Alert {
        let keys = finding.keys.clone();
        Alert::for_finding(AlertKind::Finding, channel, finding, 1, keys, 0)
    }

    fn for_finding(
        kind: AlertKind,
        channel: &str,
        finding: Finding,
        count: u64,
        keys: Vec<String>,
        keys_omitted: u64,
    ) -> Alert {
        let key = format!("rule={}|finding={}", finding.rule, finding.id);
        let group = GroupInfo {
            id: hash_id(&[&key, &finding.id]),
            key,
            count,
            first_time: finding.time.clone(),
            last_time: finding.time.clone(),
            keys,
            keys_omitted,
        };
        let mut alert = Alert {
            id: String::new(),
            kind,
            channel: channel.to_string(),
            finding,
            group,
            digest: Vec::new(),
            description: None,
        };
        alert.id = alert.compute_id();
        alert
    }

    /// The alert id: a pure function of what the alert says (kind, group, count,
    /// finding), so the same alert routed twice has the same id.
    pub(crate) fn compute_id(&self) -> String {
        hash_id(&[
            self.kind.as_str(),
            &self.channel,
            &self.group.id,
            &self.group.count.to_string(),
            &self.finding.id,
            &self.group.last_time,
        ])
    }
}

/// A `health` finding that describes an alert made by kmsguard itself.
pub(crate) fn synthetic(
    rule: &str,
    severity: Severity,
    title: &str,
    summary: &str,
    time: &str,
) -> Finding {
    Finding {
        id: hash_id(&[rule, summary, time]),
        kind: Kind::Health,
        rule: rule.to_string(),
        severity,
        title: title.to_string(),
        summary: summary.to_string(),
        time: time.to_string(),
        ..Finding::default()
    }
}

/// First 128 bits of SHA-256 over the parts (newline-separated), hex.
pub(crate) fn hash_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            h.update(b"\n");
        }
        h.update(p.as_bytes());
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A channel accepted the alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// What the receiver answered, e.g. `250 2.0.0 OK` or `HTTP 202`.
    pub response: String,
}

/// Why one delivery attempt failed. The caller branches on the variant: transient
/// failures are retried with backoff, permanent ones are parked (retrying cannot help).
/// Messages never contain secrets (webhook URLs are stripped from HTTP errors).
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Connection refused or reset, timeouts, TLS handshake failures, SMTP 4xx,
    /// HTTP 408/429/5xx: try again later.
    #[error("transient: {0}")]
    Transient(String),
    /// SMTP 5xx, HTTP 4xx other than 408/429, a message that cannot be built: the
    /// same attempt will fail again.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl DeliveryError {
    pub fn is_transient(&self) -> bool {
        matches!(self, DeliveryError::Transient(_))
    }
}

/// One alert channel, built from validated config with its secrets loaded.
#[derive(Debug)]
pub enum Channel {
    // Boxed: lettre's transport is large, and channels are few and long-lived.
    Email(Box<email::EmailChannel>),
    Webhook(webhook::WebhookChannel),
}

impl Channel {
    /// Builds a channel from validated config, loading its secrets.
    pub fn build(cfg: &config::ChannelConfig) -> Result<Channel, config::ConfigError> {
        Ok(match cfg {
            config::ChannelConfig::Email(c) => {
                Channel::Email(Box::new(email::EmailChannel::new(c)?))
            }
            config::ChannelConfig::Webhook(c) => Channel::Webhook(webhook::WebhookChannel::new(c)?),
        })
    }

    pub fn name(&self) -> &str {
        match self {
            Channel::Email(c) => c.name(),
            Channel::Webhook(c) => c.name(),
        }
    }

    /// One attempt to hand `alert` to the channel.
    pub async fn deliver(&self, alert: &Alert) -> Result<Delivered, DeliveryError> {
        match self {
            Channel::Email(c) => c.deliver(alert).await,
            Channel::Webhook(c) => c.deliver(alert).await,
        }
    }
}

/// Capped exponential backoff with jitter for attempt `attempt` (1 = after the first
/// failure): `base * 2^(attempt-1)`, capped at `cap`, then scaled by `jitter` in
/// [0.5, 1.0] so that many senders do not retry in step. Pure: the caller supplies the
/// jitter (`dispatch` uses a small PRNG; tests use fixed values).
pub fn backoff(attempt: u32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let raw = base.saturating_mul(1u32 << exp).min(cap);
    raw.mul_f64(jitter.clamp(0.5, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Duration::from_millis(500);
        let cap = Duration::from_secs(30);
        assert_eq!(backoff(1, b, cap, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(3, b, cap, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(20, b, cap, 1.0), cap);
        assert_eq!(backoff(3, b, cap, 0.5), Duration::from_secs(1));
        assert_eq!(backoff(3, b, cap, 0.0), Duration::from_secs(1), "clamped");
    }

    #[test]
    fn test_alert_is_marked_and_stable() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
        let a = Alert::test("oncall", t);
        assert!(a.is_test());
        assert_eq!(a.finding.rule, TEST_RULE);
        assert!(a.finding.title.starts_with("TEST"));
        assert_eq!(a.id, Alert::test("oncall", t).id);
        assert_ne!(a.id, Alert::test("other", t).id);
        let json = serde_json::to_string(&a).unwrap();
        let back: Alert = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
    }
}
