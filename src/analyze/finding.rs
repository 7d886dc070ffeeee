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
    pub event_ids: Vec<String>,
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
