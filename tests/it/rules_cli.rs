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

/// The shipped example config passes `check-config` as it is; with every optional line
/// switched on (and its paths pointed at real files) it is still a valid config, so what
/// the example shows is what the daemon accepts. An error names its cause once.
#[test]
fn the_example_config_is_valid_as_shipped_and_with_every_option_on() {
    let example = repo().join("docs/kmsguard.example.toml");
    let o = bin().args(["check-config"]).arg(&example).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let text = std::fs::read_to_string(&example).unwrap();
    let mut full = String::new();
    for line in text.lines() {
        // `# [table]` and `# key = value` are options; other comments are prose.
        let opt = line.strip_prefix("# ").filter(|rest| {
            rest.starts_with('[')
                || rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| !k.is_empty() && !k.contains(' ') || k.starts_with('"'))
        });
        full.push_str(opt.unwrap_or(line));
        full.push('\n');
    }
    for f in [
        "rules.toml",
        "suppressions.toml",
        "smtp-password",
        "pd-routing-key",
        "safe.json",
    ] {
        std::fs::write(dir.path().join(f), "").unwrap();
    }
    std::fs::write(
        dir.path().join("rules.toml"),
        std::fs::read_to_string(repo().join("rules.toml")).unwrap(),
    )
    .unwrap();
    let full = full
        .replace("/etc/kmsguard/", &format!("{d}/"))
        .replace("/run/credentials/kmsguard.service/", &format!("{d}/"))
        .replace("/var/lib/kmsguard", &format!("{d}/state"));
    let cfg = dir.path().join("full.toml");
    std::fs::write(&cfg, &full).unwrap();
    let o = bin().args(["check-config"]).arg(&cfg).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}\n{full}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("1 file sink(s)") && out.contains("2 alert channel(s)"),
        "{out}"
    );

    // A missing file: named once with its cause, and the fix.
    let broken = full.replace(&format!("{d}/rules.toml"), &format!("{d}/missing.toml"));
    std::fs::write(&cfg, broken).unwrap();
    let o = bin().args(["check-config"]).arg(&cfg).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("missing.toml") && err.contains("[rules] path"),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
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
