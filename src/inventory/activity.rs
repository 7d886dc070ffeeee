//! What CloudTrail shows about keys: when each was last seen and last used, and the
//! latest event that changed it (so the inventory can drop a stale record). Filled by the
//! replay workers as they decode (`ReplayOptions::track_activity`), not by a second pass,
//! and by the daemon for each file it processes (recorded with the file's commit,
//! `Inventory::activity_writes`).

use super::parse_time;
use crate::event::Event;
use std::collections::HashMap;

/// CloudTrail events that change what the inventory knows about a key: seeing one newer
/// than a cached record drops that record, so the next read goes to the API.
pub const INVALIDATING_EVENTS: [&str; 16] = [
    "TagResource",
    "UntagResource",
    "PutKeyPolicy",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "ReplicateKey",
    "UpdatePrimaryRegion",
    "DisableKey",
    "EnableKey",
    "CreateGrant",
    "RevokeGrant",
];

/// Whether an event of this name changes a key's inventory record.
pub fn invalidates(event_name: &str) -> bool {
    INVALIDATING_EVENTS.contains(&event_name)
}

/// Cryptographic operations: what "the key is in use" means for posture (a scanner's
/// `DescribeKey` every hour must not make an abandoned key look used).
pub const USE_EVENTS: [&str; 12] = [
    "Encrypt",
    "Decrypt",
    "ReEncrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "Sign",
    "Verify",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
];

/// What a scan of CloudTrail saw about one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyActivity {
    pub last_seen: Option<String>,
    pub last_used: Option<String>,
    /// Time of the latest event that changes the key (`INVALIDATING_EVENTS`).
    pub last_change: Option<String>,
}

/// Key activity over a set of CloudTrail files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activity {
    pub keys: HashMap<String, KeyActivity>,
    /// Earliest and latest event time scanned.
    pub from: Option<String>,
    pub until: Option<String>,
    /// Events of keys not tracked because `MAX_KEYS` keys already were.
    pub dropped: u64,
}

/// Keys one scan tracks at most (the store records at most `inventory::MAX_SEEN_KEYS`).
pub const MAX_KEYS: usize = 100_000;

fn max_into(slot: &mut Option<String>, t: &str) {
    if slot.as_deref().is_none_or(|o| o < t) {
        *slot = Some(t.to_string());
    }
}

fn min_into(slot: &mut Option<String>, t: &str) {
    if slot.as_deref().is_none_or(|o| o > t) {
        *slot = Some(t.to_string());
    }
}

impl Activity {
    /// Takes one event into account.
    pub fn observe(&mut self, ev: &Event<'_>) {
        let Some(time) = ev.event_time().filter(|t| parse_time(t).is_some()) else {
            return;
        };
        min_into(&mut self.from, time);
        max_into(&mut self.until, time);
        if ev.event_source() != Some(crate::event::KMS_SOURCE) {
            return;
        }
        let name = ev.event_name().unwrap_or("");
        let mut keys = ev.key_arns();
        // CreateAlias/UpdateAlias name their key as targetKeyId.
        if let (Some(id), Some(region), Some(account)) = (
            ev.str(&["requestParameters", "targetKeyId"]),
            ev.region(),
            ev.account(),
        ) {
            if id.starts_with("arn:") && id.contains(":key/") {
                keys.push(id.to_string());
            } else if !id.is_empty() && !id.starts_with("alias/") && id.len() <= 128 {
                keys.push(format!("arn:aws:kms:{region}:{account}:key/{id}"));
            }
        }
        let used = USE_EVENTS.contains(&name) && ev.error_code().is_none();
        let changes = invalidates(name) && ev.error_code().is_none();
        for k in keys {
            if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(&k) {
                self.dropped += 1;
                continue;
            }
            let a = self.keys.entry(k).or_default();
            max_into(&mut a.last_seen, time);
            if used {
                max_into(&mut a.last_used, time);
            }
            if changes {
                max_into(&mut a.last_change, time);
            }
        }
    }

    /// Folds another scan's activity into this one.
    pub fn merge(&mut self, other: Activity) {
        self.dropped += other.dropped;
        for (k, o) in other.keys {
            if self.keys.len() >= MAX_KEYS && !self.keys.contains_key(&k) {
                self.dropped += 1;
                continue;
            }
            let a = self.keys.entry(k).or_default();
            for (slot, v) in [
                (&mut a.last_seen, o.last_seen),
                (&mut a.last_used, o.last_used),
                (&mut a.last_change, o.last_change),
            ] {
                if let Some(v) = v {
                    max_into(slot, &v);
                }
            }
        }
        if let Some(f) = other.from {
            min_into(&mut self.from, &f);
        }
        if let Some(u) = other.until {
            max_into(&mut self.until, &u);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidating_events() {
        assert!(invalidates("TagResource"));
        assert!(invalidates("RevokeGrant"));
        assert!(!invalidates("Decrypt"));
        assert!(!invalidates("DescribeKey"));
    }

    #[test]
    fn activity_from_events() {
        let rec = |name: &str, time: &str, extra: &str| {
            format!(
                r#"{{"eventSource":"kms.amazonaws.com","eventName":"{name}","eventTime":"{time}","awsRegion":"us-east-1","recipientAccountId":"111122223333","requestParameters":{{{extra}}}}}"#
            )
        };
        let mut act = Activity::default();
        for json in [
            rec(
                "Decrypt",
                "2026-01-01T00:00:00Z",
                r#""keyId":"arn:aws:kms:us-east-1:111122223333:key/k1""#,
            ),
            rec("TagResource", "2026-01-02T00:00:00Z", r#""keyId":"k1""#),
            rec("DescribeKey", "2026-01-03T00:00:00Z", r#""keyId":"k1""#),
            rec(
                "CreateAlias",
                "2026-01-04T00:00:00Z",
                r#""aliasName":"alias/x","targetKeyId":"k2""#,
            ),
        ] {
            let mut bytes = json.into_bytes();
            let tape = simd_json::to_tape(&mut bytes).unwrap();
            let v = crate::json::Value::root(&tape.0).unwrap();
            act.observe(&Event::new(v));
        }
        let k1 = &act.keys["arn:aws:kms:us-east-1:111122223333:key/k1"];
        assert_eq!(k1.last_seen.as_deref(), Some("2026-01-03T00:00:00Z"));
        assert_eq!(k1.last_used.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(k1.last_change.as_deref(), Some("2026-01-02T00:00:00Z"));
        let k2 = &act.keys["arn:aws:kms:us-east-1:111122223333:key/k2"];
        assert_eq!(k2.last_change.as_deref(), Some("2026-01-04T00:00:00Z"));
        assert_eq!(act.from.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(act.until.as_deref(), Some("2026-01-04T00:00:00Z"));
    }
}
