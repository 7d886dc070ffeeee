//! What later CloudTrail events say about a pending remediation, and the key policies
//! seen in events. `observe` (pure, called on every decoded event by
//! `pipeline::analyze`) picks the successful KMS events that can revert, confirm or
//! supersede a change (`KeyEvent`), and the closed policies of PutKeyPolicy and CreateKey
//! (`PolicySnapshot`). `writes` turns them into writes to the store tree `remediation`
//! (`events/<key ARN>`: the newest `EVENTS_PER_KEY` events of a key in the order they
//! were processed; `policy/<key ARN>`: the newest closed policy), committed with the file
//! they came from. `resolution` decides, for a plan and the trigger's event, whether a
//! later event already settled it.

use super::{Action, RemediationConfig};
use crate::analyze::predicates::policy_text_is_open;
use crate::event::{Event, Value, KMS_SOURCE};
use crate::store::StateWrite;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Events kept per key (the newest).
pub const EVENTS_PER_KEY: usize = 32;
/// The largest key policy KMS accepts (bytes); longer texts are not snapshots.
const MAX_POLICY: usize = 32 * 1024;

/// The events `observe` keeps: the changes remediation undoes, their reverts, and tags.
const KEPT: [&str; 12] = [
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "DisableKey",
    "EnableKey",
    "DisableKeyRotation",
    "EnableKeyRotation",
    "CreateGrant",
    "RevokeGrant",
    "RetireGrant",
    "PutKeyPolicy",
    "TagResource",
    "CreateKey",
];

/// A successful KMS event on one key that may settle a pending remediation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvent {
    pub key: String,
    pub event_id: String,
    pub event_name: String,
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// TagResource: the tags set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<(String, String)>,
    /// CreateGrant, RevokeGrant, RetireGrant: the grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// PutKeyPolicy, CreateKey: whether the policy is public or cross-account (None: no
    /// policy in the event, or it does not parse).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_open: Option<bool>,
    /// The policy text, when closed (a snapshot); not stored in the event list.
    #[serde(default, skip_serializing)]
    pub policy: Option<String>,
    /// The key state the event leaves: `Enabled` after CreateKey (its
    /// `responseElements.keyMetadata.keyState` when given) and EnableKey, `Disabled`
    /// after DisableKey and CancelKeyDeletion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_after: Option<String>,
    /// EnableKeyRotation: `requestParameters.rotationPeriodInDays`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation_period_days: Option<i32>,
}

/// A closed key policy seen in an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySnapshot {
    pub time: String,
    pub event_id: String,
    pub event_name: String,
    pub policy: String,
}

/// The `KeyEvent` of one decoded event, when it is one that matters.
pub fn observe(ev: &Event<'_>) -> Option<KeyEvent> {
    if ev.event_source() != Some(KMS_SOURCE) {
        return None;
    }
    let name = ev.event_name().filter(|n| KEPT.contains(n))?;
    if ev.error_code().is_some() {
        return None;
    }
    let key = ev.key_arns().into_iter().next()?;
    let request = |field: &str| ev.str(&["requestParameters", field]);
    let mut k = KeyEvent {
        event_id: ev.event_id()?.to_string(),
        event_name: name.to_string(),
        time: ev.event_time()?.to_string(),
        principal: ev.principal().map(str::to_string),
        role: ev.principal_role().map(str::to_string),
        tags: Vec::new(),
        grant_id: None,
        policy_open: None,
        policy: None,
        state_after: None,
        rotation_period_days: None,
        key,
    };
    match name {
        "EnableKey" => k.state_after = Some("Enabled".into()),
        "DisableKey" | "CancelKeyDeletion" => k.state_after = Some("Disabled".into()),
        "EnableKeyRotation" => {
            k.rotation_period_days = ev
                .get(&["requestParameters", "rotationPeriodInDays"])
                .and_then(Value::scalar_text)
                .and_then(|t| t.parse().ok())
        }
        "CreateKey" => {
            k.state_after = Some(
                ev.str(&["responseElements", "keyMetadata", "keyState"])
                    .unwrap_or("Enabled")
                    .to_string(),
            )
        }
        _ => {}
    }
    match name {
        "TagResource" => {
            if let Some(tags) = ev.get(&["requestParameters", "tags"]) {
                for t in tags.items().take(50) {
                    let get = |f| t.get(f).and_then(Value::as_str).unwrap_or("");
                    k.tags
                        .push((get("tagKey").to_string(), get("tagValue").to_string()));
                }
            }
        }
        "CreateGrant" => k.grant_id = ev.str(&["responseElements", "grantId"]).map(Into::into),
        "RevokeGrant" | "RetireGrant" => k.grant_id = request("grantId").map(Into::into),
        "PutKeyPolicy" | "CreateKey" => {
            let account = k.key.split(':').nth(4).unwrap_or("");
            if let Some(text) = request("policy").filter(|t| t.len() <= MAX_POLICY) {
                k.policy_open = policy_text_is_open(text, account);
                if k.policy_open == Some(false) {
                    k.policy = Some(text.to_string());
                }
            }
        }
        _ => {}
    }
    Some(k)
}

/// Keys with recorded events kept at most (about 10 KB each at the cap of events).
pub const MAX_KEYS: usize = 100_000;
/// Where the number of keys with recorded events is kept.
const COUNT_KEY: &str = "meta/event-keys";
static FULL_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn key_count(tree: &sled::Tree) -> usize {
    tree.get(COUNT_KEY)
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or(0)
}

fn events_key(key: &str) -> String {
    format!("events/{key}")
}

fn policy_key(key: &str) -> String {
    format!("policy/{key}")
}

/// The events recorded for `key`, oldest first.
pub fn load(tree: &sled::Tree, key: &str) -> Vec<KeyEvent> {
    tree.get(events_key(key))
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or_default()
}

/// The newest closed policy of `key` seen in events.
pub fn snapshot(tree: &sled::Tree, key: &str) -> Option<PolicySnapshot> {
    tree.get(policy_key(key))
        .ok()
        .flatten()
        .and_then(|v| serde_json::from_slice(&v).ok())
}

/// Drops from `events` (in processing order) what `writes` would drop anyway: all but the
/// newest `EVENTS_PER_KEY` events of each key, except the event whose closed policy
/// `writes` would keep as the key's snapshot. So a replay's key events stay bounded by
/// its keys, not by its length.
pub fn compact(events: &mut Vec<KeyEvent>) {
    // The snapshot `writes` keeps: the newest policy by time, the later one on ties.
    let mut snapshot: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        if e.policy.is_some() {
            let slot = snapshot.entry(e.key.as_str()).or_insert(i);
            if events[*slot].time <= e.time {
                *slot = i;
            }
        }
    }
    let snapshots: std::collections::HashSet<usize> = snapshot.into_values().collect();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut keep = vec![false; events.len()];
    for (i, e) in events.iter().enumerate().rev() {
        let n = seen.entry(e.key.clone()).or_default();
        keep[i] = *n < EVENTS_PER_KEY || snapshots.contains(&i);
        *n += 1;
    }
    let mut i = 0;
    events.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// The writes to tree `remediation` (`super::TREE`) that record `events` (in processing
/// order) after what `tree` holds: each key's list grows by them and keeps the newest
/// `EVENTS_PER_KEY`; a closed policy replaces the snapshot unless that one is newer.
pub fn writes(tree: &sled::Tree, events: &[KeyEvent]) -> Vec<StateWrite> {
    writes_capped(tree, events, MAX_KEYS)
}

fn writes_capped(tree: &sled::Tree, events: &[KeyEvent], max_keys: usize) -> Vec<StateWrite> {
    let mut lists: BTreeMap<&str, Vec<KeyEvent>> = BTreeMap::new();
    let mut snaps: BTreeMap<&str, Option<PolicySnapshot>> = BTreeMap::new();
    for e in events {
        let list = lists
            .entry(e.key.as_str())
            .or_insert_with(|| load(tree, &e.key));
        if !list.iter().any(|o| o.event_id == e.event_id) {
            list.push(e.clone());
        }
        if let Some(policy) = &e.policy {
            let slot = snaps
                .entry(e.key.as_str())
                .or_insert_with(|| snapshot(tree, &e.key));
            if slot.as_ref().is_none_or(|s| s.time <= e.time) {
                *slot = Some(PolicySnapshot {
                    time: e.time.clone(),
                    event_id: e.event_id.clone(),
                    event_name: e.event_name.clone(),
                    policy: policy.clone(),
                });
            }
        }
    }
    // A bound on the keys recorded: past it, keys already recorded keep updating and
    // new ones are left out (their changes are still remediated, without history).
    let mut count = key_count(tree);
    let counted = count;
    lists.retain(|key, _| {
        if tree.contains_key(events_key(key)).unwrap_or(true) {
            true
        } else if count < max_keys {
            count += 1;
            true
        } else {
            if !FULL_LOGGED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    max = max_keys,
                    "remediation history holds the most keys it keeps; new keys are not recorded"
                );
            }
            false
        }
    });
    snaps.retain(|key, _| lists.contains_key(key));
    let mut out = Vec::new();
    if count != counted {
        out.push(StateWrite::put(
            super::TREE,
            COUNT_KEY.to_string(),
            crate::store::encode(&count),
        ));
    }
    for (key, mut list) in lists {
        let extra = list.len().saturating_sub(EVENTS_PER_KEY);
        list.drain(..extra);
        out.push(StateWrite::put(
            super::TREE,
            events_key(key),
            crate::store::encode(&list),
        ));
    }
    for (key, snap) in snaps {
        if let Some(s) = snap {
            out.push(StateWrite::put(
                super::TREE,
                policy_key(key),
                crate::store::encode(&s),
            ));
        }
    }
    out
}

/// How a later event settled a pending remediation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// A person already undid the change (the revert call is in CloudTrail).
    Reverted,
    /// A person confirmed the change with the confirmation tag.
    Confirmed,
    /// The change was made again later; that event's own remediation handles it.
    Superseded,
}

impl Settled {
    /// The skip reason, naming the event.
    pub fn reason(self, e: &KeyEvent, cfg: &RemediationConfig) -> String {
        let who = e.principal.as_deref().unwrap_or("an unknown principal");
        match self {
            Settled::Reverted => format!(
                "already reverted: later event {} ({} by {who} at {}) undid the change",
                e.event_id, e.event_name, e.time
            ),
            Settled::Confirmed => format!(
                "confirmed: later event {} (TagResource {} by {who} at {}) confirms the change",
                e.event_id,
                cfg.confirm_tag.as_deref().unwrap_or(""),
                e.time
            ),
            Settled::Superseded => format!(
                "superseded: later event {} ({} by {who} at {}) made the change again; the remediation of that event handles it",
                e.event_id, e.event_name, e.time
            ),
        }
    }
}

/// The first event of `history` after the trigger (`trigger_id` at `trigger_time`) that
/// settles `action`: later means a later time, or the same time and recorded after the
/// trigger (CloudTrail times are to the second; files are processed in order).
pub fn resolution<'h>(
    cfg: &RemediationConfig,
    action: &Action,
    trigger_id: &str,
    trigger_time: &str,
    history: &'h [KeyEvent],
) -> Option<(Settled, &'h KeyEvent)> {
    let at = history.iter().position(|e| e.event_id == trigger_id);
    history
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            e.event_id != trigger_id
                && (e.time.as_str() > trigger_time
                    || (e.time == trigger_time && at.is_some_and(|a| *i > a)))
        })
        .find_map(|(_, e)| settles(cfg, action, e).map(|s| (s, e)))
}

/// The events of `history` before the trigger (`trigger_id` at `trigger_time`), newest
/// first: an earlier time, or the same time and recorded before the trigger.
fn earlier<'h>(
    trigger_id: &str,
    trigger_time: &str,
    history: &'h [KeyEvent],
) -> impl Iterator<Item = &'h KeyEvent> {
    let at = history
        .iter()
        .position(|e| e.event_id == trigger_id)
        .unwrap_or(history.len());
    let (trigger_id, trigger_time) = (trigger_id.to_string(), trigger_time.to_string());
    history
        .iter()
        .enumerate()
        .rev()
        .filter(move |(i, e)| {
            e.event_id != trigger_id
                && (e.time < trigger_time || (e.time == trigger_time && *i < at))
        })
        .map(|(_, e)| e)
}

/// The newest event before the trigger that says which state it left the key in
/// (CreateKey, EnableKey, DisableKey, CancelKeyDeletion): the key's state before the
/// trigger, as far as CloudTrail recorded it.
pub fn state_before<'h>(
    trigger_id: &str,
    trigger_time: &str,
    history: &'h [KeyEvent],
) -> Option<&'h KeyEvent> {
    earlier(trigger_id, trigger_time, history).find(|e| e.state_after.is_some())
}

/// The newest EnableKeyRotation before the trigger that set a rotation period.
pub fn rotation_period_before<'h>(
    trigger_id: &str,
    trigger_time: &str,
    history: &'h [KeyEvent],
) -> Option<&'h KeyEvent> {
    earlier(trigger_id, trigger_time, history)
        .find(|e| e.event_name == "EnableKeyRotation" && e.rotation_period_days.is_some())
}

fn settles(cfg: &RemediationConfig, action: &Action, e: &KeyEvent) -> Option<Settled> {
    if e.event_name == "TagResource" {
        let tag = cfg.confirm_tag.as_deref()?;
        let tagged = e
            .tags
            .iter()
            .any(|(k, v)| k == tag && !v.eq_ignore_ascii_case("false"));
        let allowed = cfg.confirm_principals.is_empty()
            || cfg.confirm_principals.iter().any(|p| {
                Some(p.as_str()) == e.principal.as_deref() || Some(p.as_str()) == e.role.as_deref()
            });
        return (tagged && allowed).then_some(Settled::Confirmed);
    }
    let name = e.event_name.as_str();
    match action {
        Action::CancelKeyDeletion => match name {
            "CancelKeyDeletion" => Some(Settled::Reverted),
            "ScheduleKeyDeletion" => Some(Settled::Superseded),
            _ => None,
        },
        Action::EnableKey => match name {
            "EnableKey" => Some(Settled::Reverted),
            "DisableKey" => Some(Settled::Superseded),
            _ => None,
        },
        Action::EnableKeyRotation { .. } => match name {
            "EnableKeyRotation" => Some(Settled::Reverted),
            "DisableKeyRotation" => Some(Settled::Superseded),
            _ => None,
        },
        Action::RevokeGrant { grant_id } => (matches!(name, "RevokeGrant" | "RetireGrant")
            && e.grant_id.as_deref() == Some(grant_id.as_str()))
        .then_some(Settled::Reverted),
        Action::RestoreKeyPolicy => match (name, e.policy_open) {
            ("PutKeyPolicy", Some(false)) => Some(Settled::Reverted),
            ("PutKeyPolicy", Some(true)) => Some(Settled::Superseded),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";

    fn event(json: &str) -> Option<KeyEvent> {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        observe(&Event::new(Value::root(&tape.0).unwrap()))
    }

    fn raw(id: &str, name: &str, params: &str) -> String {
        format!(
            r#"{{"eventID":"{id}","eventName":"{name}","eventSource":"kms.amazonaws.com","eventTime":"2026-01-01T00:00:00Z","awsRegion":"us-east-1","recipientAccountId":"111122223333","userIdentity":{{"type":"AssumedRole","arn":"arn:aws:sts::111122223333:assumed-role/sec/alice","sessionContext":{{"sessionIssuer":{{"arn":"arn:aws:iam::111122223333:role/sec"}}}}}},"requestParameters":{params},"resources":[{{"type":"AWS::KMS::Key","ARN":"{KEY}"}}]}}"#
        )
    }

    fn cfg(extra: &str) -> RemediationConfig {
        super::super::config::tests::cfg(&format!("accounts = [\"111122223333\"]\n{extra}"))
            .unwrap()
    }

    #[test]
    fn observe_keeps_tags_grants_and_closed_policies_only() {
        let t = event(&raw(
            "t",
            "TagResource",
            r#"{"keyId":"k1","tags":[{"tagKey":"kmsguard:confirmed","tagValue":"yes"}]}"#,
        ))
        .unwrap();
        assert_eq!(t.key, KEY);
        assert_eq!(t.tags, vec![("kmsguard:confirmed".into(), "yes".into())]);
        assert_eq!(
            t.role.as_deref(),
            Some("arn:aws:iam::111122223333:role/sec")
        );
        let closed = r#"{\"Statement\":[{\"Effect\":\"Allow\",\"Principal\":{\"AWS\":\"arn:aws:iam::111122223333:root\"},\"Action\":\"kms:*\",\"Resource\":\"*\"}]}"#;
        let p = event(&raw(
            "p",
            "PutKeyPolicy",
            &format!(r#"{{"keyId":"k1","policy":"{closed}"}}"#),
        ))
        .unwrap();
        assert_eq!(p.policy_open, Some(false));
        assert!(p.policy.as_deref().unwrap().contains("111122223333:root"));
        let open = closed.replace("arn:aws:iam::111122223333:root", "*");
        let o = event(&raw(
            "o",
            "PutKeyPolicy",
            &format!(r#"{{"keyId":"k1","policy":"{open}"}}"#),
        ))
        .unwrap();
        assert_eq!((o.policy_open, o.policy), (Some(true), None));
        assert!(event(&raw("d", "Decrypt", r#"{"keyId":"k1"}"#)).is_none());
        let failed = raw("f", "EnableKey", r#"{"keyId":"k1"}"#)
            .replace(r#""eventID""#, r#""errorCode":"AccessDenied","eventID""#);
        assert!(event(&failed).is_none(), "failed calls change nothing");
    }

    fn ke(id: &str, name: &str, time: &str) -> KeyEvent {
        KeyEvent {
            key: KEY.into(),
            event_id: id.into(),
            event_name: name.into(),
            time: time.into(),
            principal: Some("arn:aws:sts::111122223333:assumed-role/sec/alice".into()),
            role: Some("arn:aws:iam::111122223333:role/sec".into()),
            tags: Vec::new(),
            grant_id: None,
            policy_open: None,
            policy: None,
            state_after: None,
            rotation_period_days: None,
        }
    }

    #[test]
    fn later_reverts_confirmations_and_repeats_settle_a_plan() {
        let c = cfg("");
        let t0 = "2026-01-01T00:00:00Z";
        let t1 = "2026-01-01T00:00:05Z";
        let mut tag = ke("tag", "TagResource", t1);
        tag.tags = vec![("kmsguard:confirmed".into(), "ticket-42".into())];
        let h = vec![
            ke("cancel-before", "CancelKeyDeletion", t0),
            ke("trigger", "ScheduleKeyDeletion", t0),
            tag.clone(),
        ];
        let (s, e) = resolution(&c, &Action::CancelKeyDeletion, "trigger", t0, &h).unwrap();
        assert_eq!((s, e.event_id.as_str()), (Settled::Confirmed, "tag"));
        assert!(s.reason(e, &c).contains("later event tag"));
        // Same second, recorded after the trigger: later. Recorded before: not.
        let h = vec![
            ke("trigger", "DisableKey", t0),
            ke("revert", "EnableKey", t0),
        ];
        assert_eq!(
            resolution(&c, &Action::EnableKey, "trigger", t0, &h).map(|r| r.0),
            Some(Settled::Reverted)
        );
        let h = vec![
            ke("revert", "EnableKey", t0),
            ke("trigger", "DisableKey", t0),
        ];
        assert!(resolution(&c, &Action::EnableKey, "trigger", t0, &h).is_none());
        // A grant revert must name the same grant.
        let mut rev = ke("rev", "RevokeGrant", t1);
        rev.grant_id = Some("other".into());
        let g = Action::RevokeGrant {
            grant_id: "g1".into(),
        };
        assert!(resolution(&c, &g, "trigger", t0, std::slice::from_ref(&rev)).is_none());
        rev.grant_id = Some("g1".into());
        assert!(resolution(&c, &g, "trigger", t0, &[rev]).is_some());
        // Policies: a later closed one reverts, a later open one supersedes.
        let mut p = ke("p", "PutKeyPolicy", t1);
        p.policy_open = Some(true);
        assert_eq!(
            resolution(&c, &Action::RestoreKeyPolicy, "trigger", t0, &[p]).map(|r| r.0),
            Some(Settled::Superseded)
        );
        // Only listed principals may confirm, when a list is given; "false" confirms
        // nothing; no tag configured, no confirmation.
        let only_bob = cfg("confirm_principals = [\"arn:aws:iam::111122223333:role/bob\"]\n");
        assert!(resolution(
            &only_bob,
            &Action::EnableKey,
            "trigger",
            t0,
            std::slice::from_ref(&tag)
        )
        .is_none());
        let by_role = cfg("confirm_principals = [\"arn:aws:iam::111122223333:role/sec\"]\n");
        assert!(resolution(
            &by_role,
            &Action::EnableKey,
            "trigger",
            t0,
            std::slice::from_ref(&tag)
        )
        .is_some());
        let mut no = tag.clone();
        no.tags = vec![("kmsguard:confirmed".into(), "false".into())];
        assert!(resolution(&c, &Action::EnableKey, "trigger", t0, &[no]).is_none());
        let off = cfg("confirm_tag = \"\"\n");
        assert!(resolution(&off, &Action::EnableKey, "trigger", t0, &[tag]).is_none());
    }

    #[test]
    fn earlier_events_give_the_state_and_rotation_period_before_the_trigger() {
        let en = event(&raw("c", "CreateKey", r#"{"description":"x"}"#)).unwrap();
        assert_eq!(en.state_after.as_deref(), Some("Enabled"));
        let rot = event(&raw(
            "r",
            "EnableKeyRotation",
            r#"{"keyId":"k1","rotationPeriodInDays":180}"#,
        ))
        .unwrap();
        assert_eq!(rot.rotation_period_days, Some(180));
        assert_eq!(
            event(&raw("d", "DisableKey", r#"{"keyId":"k1"}"#))
                .unwrap()
                .state_after
                .as_deref(),
            Some("Disabled")
        );
        let t0 = "2026-01-01T00:00:00Z";
        let t1 = "2026-01-01T00:00:05Z";
        let mut r90 = ke("r90", "EnableKeyRotation", t0);
        r90.rotation_period_days = Some(90);
        let mut dis = ke("dis", "DisableKey", t0);
        dis.state_after = Some("Disabled".into());
        let mut en = ke("en", "EnableKey", t1);
        en.state_after = Some("Enabled".into());
        let h = vec![
            r90,
            ke("r-default", "EnableKeyRotation", t0),
            dis,
            ke("trigger", "ScheduleKeyDeletion", t0),
            en,
        ];
        // The newest earlier event that says; later ones (after the trigger) do not count.
        assert_eq!(
            state_before("trigger", t0, &h).map(|e| e.event_id.as_str()),
            Some("dis")
        );
        assert_eq!(
            rotation_period_before("trigger", t0, &h).map(|e| e.event_id.as_str()),
            Some("r90")
        );
        // The same second but recorded after the trigger: not before it.
        assert!(state_before("trigger", t0, &h[3..]).is_none());
        assert!(state_before("trigger", t0, &[]).is_none());
    }

    #[test]
    fn writes_cap_the_list_and_keep_the_newest_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let tree = store.tree(super::super::TREE).unwrap();
        let mut evs: Vec<KeyEvent> = (0..40)
            .map(|i| ke(&format!("e{i}"), "EnableKey", "2026-01-01T00:00:00Z"))
            .collect();
        let mut newer = ke("new", "PutKeyPolicy", "2026-01-02T00:00:00Z");
        newer.policy = Some("NEW".into());
        let mut older = ke("old", "PutKeyPolicy", "2026-01-01T00:00:00Z");
        older.policy = Some("OLD".into());
        evs.push(newer);
        evs.push(older);
        store
            .commit(&crate::store::Commit {
                state: writes(&tree, &evs),
                ..Default::default()
            })
            .unwrap();
        let list = load(&tree, KEY);
        assert_eq!(list.len(), EVENTS_PER_KEY);
        assert_eq!(list.last().unwrap().event_id, "old");
        assert!(
            list.iter().all(|e| e.policy.is_none()),
            "texts only in snapshots"
        );
        assert_eq!(snapshot(&tree, KEY).unwrap().policy, "NEW");
        // Again: nothing is recorded twice.
        store
            .commit(&crate::store::Commit {
                state: writes(&tree, &evs[30..]),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(load(&tree, KEY).len(), EVENTS_PER_KEY);
    }

    #[test]
    fn past_the_key_cap_new_keys_are_left_out_and_known_ones_still_update() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let tree = store.tree(super::super::TREE).unwrap();
        let on = |k: &str, id: &str| {
            let mut e = ke(id, "EnableKey", "2026-01-01T00:00:00Z");
            e.key = format!("arn:aws:kms:us-east-1:111122223333:key/{k}");
            e
        };
        let commit = |evs: &[KeyEvent]| {
            store
                .commit(&crate::store::Commit {
                    state: writes_capped(&tree, evs, 2),
                    ..Default::default()
                })
                .unwrap()
        };
        commit(&[on("a", "1"), on("b", "2")]);
        commit(&[on("c", "3"), on("a", "4")]);
        let key = |k: &str| format!("arn:aws:kms:us-east-1:111122223333:key/{k}");
        assert_eq!(load(&tree, &key("a")).len(), 2, "a known key still updates");
        assert_eq!(load(&tree, &key("b")).len(), 1);
        assert!(load(&tree, &key("c")).is_empty(), "a third key is left out");
        assert_eq!(key_count(&tree), 2);
    }

    #[test]
    fn compact_keeps_what_writes_would_keep() {
        let mut newer = ke("new", "PutKeyPolicy", "2026-01-02T00:00:00Z");
        newer.policy = Some("NEW".into());
        let mut evs = vec![newer];
        evs.extend((0..40).map(|i| ke(&format!("e{i}"), "EnableKey", "2026-01-01T00:00:00Z")));
        let mut older = ke("old", "PutKeyPolicy", "2026-01-01T00:00:00Z");
        older.policy = Some("OLD".into());
        evs.push(older);
        let mut other = ke("other", "EnableKey", "2026-01-01T00:00:00Z");
        other.key = "arn:aws:kms:us-east-1:111122223333:key/k2".into();
        evs.push(other);
        let all = evs.clone();
        compact(&mut evs);
        // The newest 32 of the key, in order, plus the event of its snapshot; the other
        // key untouched.
        let ids: Vec<&str> = evs.iter().map(|e| e.event_id.as_str()).collect();
        assert_eq!(ids.len(), EVENTS_PER_KEY + 2, "{ids:?}");
        assert_eq!(ids[0], "new");
        assert_eq!(ids[1], "e9");
        assert_eq!(&ids[ids.len() - 2..], ["old", "other"]);
        // And the store ends the same either way.
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let tree = store.tree(super::super::TREE).unwrap();
        let a = writes(&tree, &all);
        let b = writes(&tree, &evs);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }
}
