//! What the events of a replay say about keys, carried forward: the tags of `CreateKey`,
//! `TagResource` and `UntagResource`, the aliases of `CreateAlias`, `UpdateAlias` and
//! `DeleteAlias`. Offline (no key inventory), a finding's key conditions (`tag:`,
//! `key:alias`) are decided with what earlier events of the same replay said about its
//! key (`Tracker`), not only with its own event. Bounded: at most `MAX_KEYS` keys,
//! `MAX_PER_KEY` tags and aliases each, values cut to `MAX_TEXT` characters.

use crate::analyze::finding::Finding;
use crate::event::{Event, Value};
use std::collections::{BTreeMap, HashMap};

/// Keys whose facts are tracked at most; later keys are not tracked.
pub const MAX_KEYS: usize = 100_000;
/// Tags and aliases per key at most (KMS allows 50 tags per key).
pub const MAX_PER_KEY: usize = 64;
/// Longest tag key, tag value or alias kept (KMS: tag values up to 256 characters).
pub const MAX_TEXT: usize = 256;

/// What one event changes about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Tags set (CreateKey, TagResource).
    Tag(Vec<(String, String)>),
    /// Tag keys removed (UntagResource).
    Untag(Vec<String>),
    /// The alias now names this key (CreateAlias, UpdateAlias).
    Alias(String),
    /// The alias is gone (DeleteAlias).
    Unalias(String),
}

/// A change to a key's facts, with its event's time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactEvent {
    pub time: String,
    /// The key ARN (for `Unalias`, possibly empty: the alias's owner decides).
    pub key: String,
    pub change: Change,
}

fn text(s: &str) -> String {
    s.chars().take(MAX_TEXT).collect()
}

/// The change a successful KMS event makes to what is known of its key, if any.
pub fn observe(ev: &Event<'_>) -> Option<FactEvent> {
    if ev.event_source() != Some(crate::event::KMS_SOURCE) || ev.error_code().is_some() {
        return None;
    }
    let name = ev.event_name()?;
    if !matches!(
        name,
        "CreateKey"
            | "TagResource"
            | "UntagResource"
            | "CreateAlias"
            | "UpdateAlias"
            | "DeleteAlias"
    ) {
        return None;
    }
    let time = ev.event_time().unwrap_or("").to_string();
    // CreateAlias/UpdateAlias name their key as targetKeyId; the others as keyId (or in
    // responseElements for CreateKey), which `key_arns` reads.
    let target = ev
        .str(&["requestParameters", "targetKeyId"])
        .and_then(|id| ev.key_arn_for(id));
    let key = || ev.key_arns().into_iter().next();
    let alias = || ev.str(&["requestParameters", "aliasName"]).map(text);
    let (key, change) = match name {
        "CreateKey" | "TagResource" => {
            let mut tags = Vec::new();
            if let Some(list) = ev.get(&["requestParameters", "tags"]) {
                for t in list.items().take(MAX_PER_KEY) {
                    let s = |k: &str| t.get(k).and_then(Value::as_str).map(text);
                    if let (Some(k), Some(v)) = (s("tagKey"), s("tagValue")) {
                        tags.push((k, v));
                    }
                }
            }
            if tags.is_empty() {
                return None;
            }
            (key()?, Change::Tag(tags))
        }
        "UntagResource" => {
            let list = ev.get(&["requestParameters", "tagKeys"])?;
            let keys: Vec<String> = list
                .items()
                .take(MAX_PER_KEY)
                .filter_map(|v| v.as_str().map(text))
                .collect();
            (key()?, Change::Untag(keys))
        }
        "CreateAlias" | "UpdateAlias" => (target.or_else(key)?, Change::Alias(alias()?)),
        _ => (key().unwrap_or_default(), Change::Unalias(alias()?)),
    };
    Some(FactEvent { time, key, change })
}

/// One key's facts as the events so far said them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    pub tags: BTreeMap<String, String>,
    pub aliases: Vec<String>,
}

/// Key facts over a replay, applied in input (time) order.
#[derive(Debug, Default)]
pub struct Tracker {
    keys: HashMap<String, Facts>,
    /// Which key each alias names now.
    owner: HashMap<String, String>,
}

impl Tracker {
    fn facts(&mut self, key: &str) -> Option<&mut Facts> {
        if !self.keys.contains_key(key) {
            if self.keys.len() >= MAX_KEYS || key.is_empty() {
                return None;
            }
            self.keys.insert(key.to_string(), Facts::default());
        }
        self.keys.get_mut(key)
    }

    pub fn apply(&mut self, e: &FactEvent) {
        match &e.change {
            Change::Tag(tags) => {
                if let Some(f) = self.facts(&e.key) {
                    for (k, v) in tags {
                        if f.tags.len() < MAX_PER_KEY || f.tags.contains_key(k) {
                            f.tags.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            Change::Untag(keys) => {
                if let Some(f) = self.keys.get_mut(&e.key) {
                    for k in keys {
                        f.tags.remove(k);
                    }
                }
            }
            Change::Alias(alias) => {
                self.unalias(alias);
                let Some(f) = self.facts(&e.key) else { return };
                if f.aliases.len() < MAX_PER_KEY {
                    f.aliases.push(alias.clone());
                    f.aliases.sort();
                    self.owner.insert(alias.clone(), e.key.clone());
                }
            }
            Change::Unalias(alias) => self.unalias(alias),
        }
    }

    fn unalias(&mut self, alias: &str) {
        if let Some(old) = self.owner.remove(alias) {
            if let Some(f) = self.keys.get_mut(&old) {
                f.aliases.retain(|a| a != alias);
            }
        }
    }

    /// What the events so far said about the first of the finding's keys that they named.
    pub fn for_finding(&self, f: &Finding) -> Option<&Facts> {
        f.keys.iter().find_map(|k| self.keys.get(k))
    }

    /// Carries the facts known at each finding's time into its pending key conditions:
    /// `events` (one input's, in input order) are applied up to each finding's time, the
    /// rest after. Findings without key conditions are left alone.
    pub fn carry(&mut self, events: &[FactEvent], findings: &mut [Finding]) {
        let mut order: Vec<usize> = (0..findings.len())
            .filter(|&i| !findings[i].pending.is_empty())
            .collect();
        order.sort_by(|&a, &b| findings[a].time.cmp(&findings[b].time));
        let mut next = 0;
        for i in order {
            while next < events.len() && events[next].time <= findings[i].time {
                self.apply(&events[next]);
                next += 1;
            }
            let f = &mut findings[i];
            if let Some(facts) = f.keys.iter().find_map(|k| self.keys.get(k)) {
                let (tags, aliases) = (facts.tags.clone(), facts.aliases.clone());
                f.pending.carry(&tags, &aliases);
            }
        }
        for e in &events[next..] {
            self.apply(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fact(json: &str) -> Option<FactEvent> {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let v = crate::json::Value::root(&tape.0).unwrap();
        observe(&Event::new(v))
    }

    fn rec(name: &str, params: &str) -> String {
        format!(
            r#"{{"eventSource":"kms.amazonaws.com","eventName":"{name}","eventTime":"2026-01-01T00:00:00Z","awsRegion":"us-east-1","recipientAccountId":"111122223333","requestParameters":{{{params}}}}}"#
        )
    }

    const K1: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";
    const K2: &str = "arn:aws:kms:us-east-1:111122223333:key/k2";

    #[test]
    fn tags_and_aliases_follow_the_events() {
        let mut t = Tracker::default();
        for json in [
            rec(
                "TagResource",
                r#""keyId":"k1","tags":[{"tagKey":"env","tagValue":"prod"},{"tagKey":"team","tagValue":"a"}]"#,
            ),
            rec("UntagResource", r#""keyId":"k1","tagKeys":["team"]"#),
            rec(
                "CreateAlias",
                r#""aliasName":"alias/pay","targetKeyId":"k1""#,
            ),
            rec(
                "CreateAlias",
                r#""aliasName":"alias/moving","targetKeyId":"k1""#,
            ),
            rec(
                "UpdateAlias",
                r#""aliasName":"alias/moving","targetKeyId":"k2""#,
            ),
            rec(
                "CreateAlias",
                r#""aliasName":"alias/gone","targetKeyId":"k2""#,
            ),
            rec("DeleteAlias", r#""aliasName":"alias/gone""#),
        ] {
            t.apply(&fact(&json).unwrap_or_else(|| panic!("a fact: {json}")));
        }
        let k1 = &t.keys[K1];
        assert_eq!(k1.tags, BTreeMap::from([("env".into(), "prod".into())]));
        assert_eq!(k1.aliases, ["alias/pay"]);
        assert_eq!(t.keys[K2].aliases, ["alias/moving"]);
        // Failed calls and other events say nothing.
        let failed = rec(
            "TagResource",
            r#""keyId":"k1","tags":[{"tagKey":"x","tagValue":"y"}]"#,
        )
        .replace(
            r#""requestParameters""#,
            r#""errorCode":"AccessDenied","requestParameters""#,
        );
        assert_eq!(fact(&failed), None);
        assert_eq!(fact(&rec("Decrypt", r#""keyId":"k1""#)), None);
    }

    #[test]
    fn bounded_per_key_and_in_keys() {
        let mut t = Tracker::default();
        let many: Vec<(String, String)> = (0..200)
            .map(|i| (format!("t{i}"), "x".repeat(1000)))
            .collect();
        t.apply(&FactEvent {
            time: String::new(),
            key: K1.into(),
            change: Change::Tag(many),
        });
        let k1 = &t.keys[K1];
        assert_eq!(k1.tags.len(), MAX_PER_KEY);
        for i in 0..MAX_KEYS + 10 {
            t.apply(&FactEvent {
                time: String::new(),
                key: format!("{K2}{i}"),
                change: Change::Alias(format!("alias/a{i}")),
            });
        }
        assert_eq!(t.keys.len(), MAX_KEYS);
        assert!(t.owner.len() < MAX_KEYS);
        let long = rec(
            "TagResource",
            &format!(
                r#""keyId":"k1","tags":[{{"tagKey":"k","tagValue":"{}"}}]"#,
                "v".repeat(1000)
            ),
        );
        match fact(&long).unwrap().change {
            Change::Tag(tags) => assert_eq!(tags[0].1.len(), MAX_TEXT),
            c => panic!("{c:?}"),
        }
    }
}
