//! `kmsguard rules list|test` and help texts.

use crate::support::*;

#[test]
fn rules_list_shows_every_builtin_rule() {
    let o = run(bin().args(["rules", "list"]));
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    let builtin = std::fs::read_to_string(repo().join("rules.toml")).unwrap();
    let ids: Vec<&str> = builtin
        .lines()
        .filter_map(|l| l.strip_prefix("id = \""))
        .map(|l| l.trim_end_matches('"'))
        .collect();
    assert!(ids.len() >= 20);
    for id in ids {
        assert!(
            text.lines().any(|l| l.starts_with(id)),
            "{id} missing:\n{text}"
        );
    }
    assert!(text.contains("critical  Key policy allows anyone"));
}

#[test]
fn rules_test_passes_on_builtin_and_reports_failures_by_rule() {
    let o = run(bin().args(["rules", "test"]));
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("23 rules passed, 0 rules failed"),
        "{}",
        stdout(&o)
    );

    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        f.path(),
        r#"
[[rule]]
id = "wrong-expectation"
title = "t"
severity = "low"
description = "d"
event_names = ["DisableKey"]
[[rule.tests]]
name = "claims EnableKey matches"
expect = "match"
event = '{"eventName": "EnableKey"}'
"#,
    )
    .unwrap();
    let o = run(bin().args(["rules", "test"]).arg(f.path()));
    assert_eq!(o.status.code(), Some(1));
    let text = stdout(&o);
    assert!(text.contains("FAIL  wrong-expectation (line 2)"), "{text}");
    assert!(
        text.contains("claims EnableKey matches: expected the rule to fire"),
        "{text}"
    );
}

#[test]
fn invalid_rules_name_rule_line_and_fix() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        f.path(),
        "[[rule]]\nid = \"a\"\ntitle = \"t\"\nseverity = \"low\"\ndescription = \"d\"\nmatch = { predicate = \"policy_pubic\" }\n\n[[rule]]\nid = \"b\"\ntitle = \"t\"\nseverity = \"low\"\ndescription = \"d\"\nmatch = { field = \"eventName\" }\n",
    )
    .unwrap();
    for args in [vec!["rules", "test"], vec!["rules", "list", "--rules"]] {
        let o = run(bin().args(&args).arg(f.path()));
        assert_eq!(o.status.code(), Some(2));
        let err = stderr(&o);
        assert!(err.contains("line 1: rule `a`: in `match`: unknown predicate `policy_pubic`; known: policy_public"), "{err}");
        assert!(
            err.contains(
                "line 8: rule `b`: in `match`: field `eventName` needs exactly one operator"
            ),
            "{err}"
        );
    }
    let o = run(bin().args(["replay", "--rules", "/nonexistent/rules.toml", "samples"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot read rules file /nonexistent/rules.toml"));
}

#[test]
fn help_texts_have_examples() {
    for args in [
        vec!["--help"],
        vec!["replay", "--help"],
        vec!["rules", "test", "--help"],
        vec!["rules", "list", "--help"],
    ] {
        let o = run(bin().args(&args));
        assert_eq!(o.status.code(), Some(0));
        assert!(stdout(&o).contains("Examples:"), "{args:?}");
    }
    let o = run(bin().args(["replay", "/no/such/dir"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("/no/such/dir: no such file or folder"));
}
