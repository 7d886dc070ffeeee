//! Named predicates: detection logic that field matching cannot express, callable from
//! rules.toml as `{ predicate = "NAME" }`. Each one reads the event through `Event` and
//! never panics on odd input (policies arrive as JSON strings that may be truncated or
//! invalid; then the predicate is false and the rule's other conditions decide).

use crate::event::{Event, Kind, Value, KMS_SOURCE};
use serde_json::Value as Json;

/// The closed set of predicates. Adding one means adding a variant, its name, and a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predicate {
    /// `requestParameters.policy` allows `*` without a condition that restricts who.
    PolicyPublic,
    /// `requestParameters.policy` allows a principal of another account than the key's.
    PolicyCrossAccount,
    /// `requestParameters.granteePrincipal` (or retiringPrincipal) is in another account.
    GrantCrossAccount,
    /// `ReEncrypt`'s destination key is in another account than the event's.
    DestinationKeyForeign,
    /// A CloudTrail configuration change that stops recording KMS management events.
    TrailExcludesKms,
}

impl Predicate {
    pub const ALL: [(&'static str, Predicate); 5] = [
        ("policy_public", Predicate::PolicyPublic),
        ("policy_cross_account", Predicate::PolicyCrossAccount),
        ("grant_cross_account", Predicate::GrantCrossAccount),
        ("destination_key_foreign", Predicate::DestinationKeyForeign),
        ("trail_excludes_kms", Predicate::TrailExcludesKms),
    ];

    pub fn from_name(name: &str) -> Option<Predicate> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
    }

    pub fn names() -> String {
        Self::ALL
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn eval(self, ev: &Event<'_>) -> bool {
        match self {
            Predicate::PolicyPublic => policy(ev).is_some_and(|p| allows_public(&p)),
            Predicate::PolicyCrossAccount => match (policy(ev), key_account(ev)) {
                (Some(p), Some(acct)) => allows_foreign_account(&p, acct),
                _ => false,
            },
            Predicate::GrantCrossAccount => {
                let Some(acct) = key_account(ev) else {
                    return false;
                };
                ["granteePrincipal", "retiringPrincipal"].iter().any(|f| {
                    ev.str(&["requestParameters", f])
                        .and_then(account_of_principal)
                        .is_some_and(|a| a != acct)
                })
            }
            Predicate::DestinationKeyForeign => {
                let Some(acct) = ev.account() else {
                    return false;
                };
                ev.str(&["requestParameters", "destinationKeyId"])
                    .and_then(account_of_arn)
                    .is_some_and(|a| a != acct)
            }
            Predicate::TrailExcludesKms => trail_excludes_kms(ev),
        }
    }
}

/// The account that owns the key the event is about: from a key ARN when there is one,
/// else the account whose trail recorded it.
fn key_account<'v>(ev: &Event<'v>) -> Option<&'v str> {
    let from_request = ev
        .str(&["requestParameters", "keyId"])
        .and_then(account_of_arn);
    from_request.or_else(|| ev.account())
}

fn policy(ev: &Event<'_>) -> Option<Json> {
    let text = ev.str(&["requestParameters", "policy"])?;
    serde_json::from_str(text).ok()
}

/// The statements of a policy (`Statement` may be one object or an array).
pub fn statements(policy: &Json) -> Vec<&Json> {
    match policy.get("Statement") {
        Some(Json::Array(a)) => a.iter().collect(),
        Some(s @ Json::Object(_)) => vec![s],
        _ => Vec::new(),
    }
}

/// Whether a statement allows (rather than denies).
pub fn is_allow(stmt: &Json) -> bool {
    stmt.get("Effect").and_then(Json::as_str) == Some("Allow")
}

/// Every principal string of a statement (`"*"`, `{"AWS": ...}`, service principals).
pub fn principals(stmt: &Json) -> Vec<&str> {
    fn push<'a>(out: &mut Vec<&'a str>, v: &'a Json) {
        match v {
            Json::String(s) => out.push(s.as_str()),
            Json::Array(a) => out.extend(a.iter().filter_map(Json::as_str)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    match stmt.get("Principal") {
        Some(Json::Object(m)) => {
            for (kind, v) in m {
                if kind == "AWS" || kind == "CanonicalUser" || kind == "Federated" {
                    push(&mut out, v);
                }
            }
        }
        Some(v) => push(&mut out, v),
        None => {}
    }
    out
}

/// Condition keys that pin a wildcard principal to known callers.
const RESTRICTING_KEYS: [&str; 12] = [
    "kms:calleraccount",
    "aws:principalorgid",
    "aws:principalorgpaths",
    "aws:principalaccount",
    "aws:principalarn",
    "aws:sourceaccount",
    "aws:sourcearn",
    "aws:sourceowner",
    "aws:sourcevpc",
    "aws:sourcevpce",
    "aws:userid",
    "aws:username",
];

/// Whether a statement's condition pins its principal to known callers.
pub fn has_restricting_condition(stmt: &Json) -> bool {
    let Some(Json::Object(ops)) = stmt.get("Condition") else {
        return false;
    };
    ops.values().any(|keys| match keys {
        Json::Object(k) => k
            .keys()
            .any(|key| RESTRICTING_KEYS.contains(&key.to_ascii_lowercase().as_str())),
        _ => false,
    })
}

/// Whether a policy allows `*` without a condition that restricts who.
pub fn allows_public(policy: &Json) -> bool {
    statements(policy)
        .into_iter()
        .any(|s| is_allow(s) && principals(s).contains(&"*") && !has_restricting_condition(s))
}

fn allows_foreign_account(policy: &Json, own: &str) -> bool {
    statements(policy).into_iter().any(|s| {
        is_allow(s)
            && principals(s)
                .into_iter()
                .filter_map(account_of_principal)
                .any(|a| a != own)
    })
}

/// Whether a key policy (JSON text) allows anyone (`*` without a restricting condition)
/// or a principal of another account than `own_account`; None when it does not parse.
pub fn policy_text_is_open(text: &str, own_account: &str) -> Option<bool> {
    let p: Json = serde_json::from_str(text).ok()?;
    Some(allows_public(&p) || allows_foreign_account(&p, own_account))
}

/// The account of an IAM principal: `arn:aws:iam::ACCOUNT:...`, `arn:aws:sts::ACCOUNT:...`
/// or a bare 12-digit account id. Service principals have none.
pub fn account_of_principal(p: &str) -> Option<&str> {
    if p.len() == 12 && p.bytes().all(|b| b.is_ascii_digit()) {
        return Some(p);
    }
    account_of_arn(p)
}

/// The account field (the fifth) of an ARN, when it is a 12-digit id.
pub fn account_of_arn(arn: &str) -> Option<&str> {
    let mut parts = arn.splitn(6, ':');
    if parts.next()? != "arn" {
        return None;
    }
    let acct = parts.nth(3)?;
    (acct.len() == 12 && acct.bytes().all(|b| b.is_ascii_digit())).then_some(acct)
}

fn trail_excludes_kms(ev: &Event<'_>) -> bool {
    match ev.event_name() {
        Some("PutEventSelectors") => {
            let mut management_kept = false;
            let mut kms_excluded = false;
            let mut saw_selectors = false;
            if let Some(Kind::Array(sels)) = ev
                .get(&["requestParameters", "eventSelectors"])
                .map(Value::kind)
            {
                for s in sels {
                    saw_selectors = true;
                    let ev = Event::new(s);
                    let include = ev
                        .get(&["includeManagementEvents"])
                        .and_then(Value::as_bool)
                        != Some(false);
                    let excluded = ev.any_at(&["excludeManagementEventSources".into()], &mut |x| {
                        x.as_str() == Some(KMS_SOURCE)
                    });
                    kms_excluded |= include && excluded;
                    management_kept |= include && !excluded;
                }
            }
            if let Some(Kind::Array(sels)) = ev
                .get(&["requestParameters", "advancedEventSelectors"])
                .map(Value::kind)
            {
                for s in sels {
                    saw_selectors = true;
                    let sel = Event::new(s);
                    let mut management = false;
                    let mut excludes = false;
                    sel.any_at(&["fieldSelectors".into()], &mut |fs| {
                        let fs = Event::new(fs);
                        let field = fs.str(&["field"]).unwrap_or("");
                        let has = |op: &str, want: &str| {
                            fs.any_at(&[op.into()], &mut |x| x.as_str() == Some(want))
                        };
                        if field == "eventCategory" && has("equals", "Management") {
                            management = true;
                        }
                        if field == "eventSource" && has("notEquals", KMS_SOURCE) {
                            excludes = true;
                        }
                        false
                    });
                    kms_excluded |= management && excludes;
                    management_kept |= management && !excludes;
                }
            }
            saw_selectors && (kms_excluded || !management_kept)
        }
        Some("PutInsightSelectors") => matches!(
            ev.get(&["requestParameters", "insightSelectors"]).map(Value::kind),
            Some(Kind::Array(a)) if a.is_empty()
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(p: Predicate, json: &str) -> bool {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let v = crate::json::Value::root(&tape.0).unwrap();
        p.eval(&Event::new(v))
    }

    fn put_policy(policy: serde_json::Value) -> String {
        serde_json::json!({"eventName": "PutKeyPolicy", "recipientAccountId": "111122223333",
            "requestParameters": {"keyId": "k", "policy": policy.to_string()}})
        .to_string()
    }

    #[test]
    fn public_policy_needs_wildcard_without_restricting_condition() {
        let open = serde_json::json!({"Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "kms:Decrypt"}]});
        assert!(check(Predicate::PolicyPublic, &put_policy(open)));
        let pinned = serde_json::json!({"Statement": {"Effect": "Allow", "Principal": "*", "Action": "kms:*",
            "Condition": {"StringEquals": {"kms:CallerAccount": "111122223333"}}}});
        assert!(!check(Predicate::PolicyPublic, &put_policy(pinned)));
        let deny = serde_json::json!({"Statement": [{"Effect": "Deny", "Principal": "*", "Action": "kms:*"}]});
        assert!(!check(Predicate::PolicyPublic, &put_policy(deny)));
        assert!(!check(
            Predicate::PolicyPublic,
            r#"{"requestParameters":{"policy":"{not json"}}"#
        ));
    }

    #[test]
    fn cross_account_policy_and_grant() {
        let p = serde_json::json!({"Statement": [{"Effect": "Allow", "Principal": {"AWS": ["arn:aws:iam::111122223333:root", "999988887777"]}}]});
        assert!(check(Predicate::PolicyCrossAccount, &put_policy(p)));
        let own = serde_json::json!({"Statement": [{"Effect": "Allow", "Principal": {"AWS": "arn:aws:iam::111122223333:role/x", "Service": "logs.amazonaws.com"}}]});
        assert!(!check(Predicate::PolicyCrossAccount, &put_policy(own)));
        let grant = |grantee: &str| {
            format!(
                r#"{{"recipientAccountId":"111122223333","requestParameters":{{"keyId":"arn:aws:kms:us-east-1:111122223333:key/k","granteePrincipal":"{grantee}"}}}}"#
            )
        };
        assert!(check(
            Predicate::GrantCrossAccount,
            &grant("arn:aws:iam::999988887777:role/partner")
        ));
        assert!(!check(
            Predicate::GrantCrossAccount,
            &grant("arn:aws:iam::111122223333:role/ebs")
        ));
        assert!(!check(
            Predicate::GrantCrossAccount,
            &grant("s3.amazonaws.com")
        ));
    }

    #[test]
    fn reencrypt_destination() {
        let ev = |dest: &str| {
            format!(
                r#"{{"recipientAccountId":"111122223333","requestParameters":{{"destinationKeyId":"{dest}"}}}}"#
            )
        };
        assert!(check(
            Predicate::DestinationKeyForeign,
            &ev("arn:aws:kms:us-east-1:999988887777:key/x")
        ));
        assert!(!check(
            Predicate::DestinationKeyForeign,
            &ev("arn:aws:kms:us-east-1:111122223333:key/x")
        ));
        assert!(!check(Predicate::DestinationKeyForeign, &ev("alias/local")));
    }

    #[test]
    fn trail_selectors() {
        let sel = |body: &str| {
            format!(r#"{{"eventName":"PutEventSelectors","requestParameters":{body}}}"#)
        };
        assert!(check(
            Predicate::TrailExcludesKms,
            &sel(
                r#"{"eventSelectors":[{"includeManagementEvents":true,"excludeManagementEventSources":["kms.amazonaws.com"]}]}"#
            )
        ));
        assert!(check(
            Predicate::TrailExcludesKms,
            &sel(r#"{"eventSelectors":[{"includeManagementEvents":false}]}"#)
        ));
        assert!(!check(
            Predicate::TrailExcludesKms,
            &sel(
                r#"{"eventSelectors":[{"includeManagementEvents":true,"excludeManagementEventSources":[]}]}"#
            )
        ));
        assert!(check(
            Predicate::TrailExcludesKms,
            &sel(
                r#"{"advancedEventSelectors":[{"fieldSelectors":[{"field":"eventCategory","equals":["Management"]},{"field":"eventSource","notEquals":["kms.amazonaws.com"]}]}]}"#
            )
        ));
        assert!(!check(
            Predicate::TrailExcludesKms,
            &sel(
                r#"{"advancedEventSelectors":[{"fieldSelectors":[{"field":"eventCategory","equals":["Management"]}]}]}"#
            )
        ));
    }
}
