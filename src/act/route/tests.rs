//! Unit tests of `route`: filters, grouping, updates, digests, rate limits and saved
//! state, each driven by an explicit clock.

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
        key_alias: None,
        key_tags: Default::default(),
        context: Default::default(),
        action: None,
        pending: Default::default(),
        count: 1,
        first_time: String::new(),
        last_time: String::new(),
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
