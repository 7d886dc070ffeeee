//! What kmsguard reports: the `Finding` (one JSON object per line in `--format jsonl`,
//! a contract scripts rely on) and its `Severity`. A finding's `id` is stable: the hash
//! of the rule id and the sorted event ids, so redelivery or a second replay of the same
//! events never makes a new id.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    #[default]
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 5] = [
        Severity::Info,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown severity `{s}`: use one of info, low, medium, high, critical")
            })
    }
}

/// Where a finding comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A rule of rules.toml matched.
    #[default]
    Rule,
    /// A baseline detector saw something unusual.
    Anomaly,
    /// Something about kmsguard's own operation (a file that could not be read, ...).
    Health,
    /// `kmsguard posture` found a key configured against KMS best practice.
    Posture,
    /// What automatic remediation planned, did, skipped or failed to do about another
    /// finding (`src/remediate.rs`); the details are in `action`.
    Remediation,
}

/// One finding. Field names are a public contract (see README, "Finding format").
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub id: String,
    pub kind: Kind,
    pub rule: String,
    pub severity: Severity,
    pub title: String,
    pub summary: String,
    /// CloudTrail `eventID`s of the finding: at most `fold::MAX_EVENT_IDS` (the earliest;
    /// `count` has the total).
    pub event_ids: Vec<String>,
    /// How many events the finding stands for (repeats inside a fold window fold into
    /// one finding, `analyze::fold`).
    #[serde(default = "one")]
    pub count: u64,
    /// Event time of the earliest and latest of them.
    #[serde(default)]
    pub first_time: String,
    #[serde(default)]
    pub last_time: String,
    pub event_name: String,
    pub event_source: String,
    pub time: String,
    pub principal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub principal_role: Option<String>,
    pub account: Option<String>,
    pub region: Option<String>,
    pub keys: Vec<String>,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error_code: Option<String>,
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub remediation: Option<String>,
    /// The alias of the finding's key, from the key inventory (`replay --enrich`,
    /// `posture`); the alphabetically first when the key has several.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_alias: Option<String>,
    /// The tags of the finding's key, from the key inventory.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub key_tags: BTreeMap<String, String>,
    /// Values the rule captured from the event (its `capture` list of dotted paths, e.g.
    /// `responseElements.grantId`), so a remediation can be computed from the finding.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub context: BTreeMap<String, String>,
    /// For `kind: "remediation"`: what was planned or done, the API calls and the key's
    /// state before and after.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub action: Option<ActionReport>,
    /// The rule's key conditions (`tag:`, `key:alias`) the event alone could not decide,
    /// to be decided once the key's facts are known (`rule::resolve`). Never
    /// serialized: findings are resolved before they are output or committed.
    #[serde(skip)]
    pub pending: crate::analyze::rule::Pending,
}

fn one() -> u64 {
    1
}

impl Finding {
    /// Fills the fold fields of a finding of one event: a count of 1, first and last time
    /// its `time`.
    pub fn settle_counts(&mut self) {
        self.count = self.count.max(1);
        if self.first_time.is_empty() {
            self.first_time = self.time.clone();
        }
        if self.last_time.is_empty() {
            self.last_time = self.time.clone();
        }
    }
}

/// What happened to a remediation: a contract like the rest of the finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionOutcome {
    /// Dry-run: what enforce mode would do; nothing that changes state was called.
    Planned,
    /// Every call succeeded.
    Performed,
    /// Nothing done, for the `reason` given (already fine, out of scope, rate limit ...).
    Skipped,
    /// A call failed after its retries.
    Failed,
}

impl ActionOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ActionOutcome::Planned => "planned",
            ActionOutcome::Performed => "performed",
            ActionOutcome::Skipped => "skipped",
            ActionOutcome::Failed => "failed",
        }
    }
}

/// One KMS (or STS) call a remediation made or would make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiCallReport {
    /// The operation, e.g. `CancelKeyDeletion`.
    pub operation: String,
    /// The main parameters (key id, grant id, rotation period ...), as text.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// Whether it was sent (false in dry-run and for calls after a failure).
    pub sent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub attempts: u32,
}

/// The details of a `kind: "remediation"` finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionReport {
    /// The id of the finding that asked for the remediation.
    pub trigger: String,
    /// The rule of that finding.
    pub trigger_rule: String,
    /// The remediation hint (`enable-key`, `revoke-grant` ...).
    pub action: String,
    /// `off`, `dry-run` or `enforce`: the mode that applied.
    pub mode: String,
    pub outcome: ActionOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Changing calls, in order (reads are listed in `reads`).
    pub calls: Vec<ApiCallReport>,
    /// State reads made (DescribeKey, GetKeyRotationStatus, ListGrants ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reads: Vec<ApiCallReport>,
    /// The key's state before (`key_state`, `rotation_enabled`, `grant_present` ...).
    #[serde(default)]
    pub before: BTreeMap<String, String>,
    /// The key's state read again after the calls (enforce mode only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub after: BTreeMap<String, String>,
    /// Milliseconds from the start of the remediation to the last changing call's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
}

/// The stable id of a finding raised by `rule` on `event_ids`.
pub fn finding_id(rule: &str, event_ids: &[String]) -> String {
    let mut ids: Vec<&str> = event_ids.iter().map(String::as_str).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut h = Sha256::new();
    h.update(rule.as_bytes());
    for id in ids {
        h.update(b"\n");
        h.update(id.as_bytes());
    }
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_stable_and_order_free() {
        let a = finding_id("r", &["e2".into(), "e1".into()]);
        let b = finding_id("r", &["e1".into(), "e2".into(), "e1".into()]);
        assert_eq!(a, b);
        assert_eq!(a.len(), 32);
        assert_ne!(a, finding_id("other", &["e1".into(), "e2".into()]));
    }

    #[test]
    fn severity_parses_and_orders() {
        assert_eq!("HIGH".parse::<Severity>().unwrap(), Severity::High);
        assert!(Severity::Critical > Severity::Info);
        assert!("urgent"
            .parse::<Severity>()
            .unwrap_err()
            .contains("critical"));
    }
}
