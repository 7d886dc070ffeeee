//! `kmsguard replay` on ctgen corpora, the shipped samples and malformed inputs.

use crate::support::*;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Which rule must catch each scenario that is bad by definition. The behavioural
/// scenarios (decrypt_spike, new_*, off_hours_admin) are for the baseline detectors.
const SCENARIO_RULES: [(&str, &str); 15] = [
    ("key_deletion_scheduled", "kms-key-deletion-scheduled"),
    ("key_disabled", "kms-key-disabled"),
    ("rotation_disabled", "kms-rotation-disabled"),
    ("policy_public", "kms-policy-public"),
    ("policy_cross_account", "kms-policy-cross-account"),
    ("grant_external", "kms-grant-cross-account"),
    ("denied_decrypt_burst", "kms-crypto-denied"),
    ("root_kms_usage", "kms-root-usage"),
    (
        "import_key_material_deleted",
        "kms-imported-key-material-deleted",
    ),
    ("mrk_primary_moved", "kms-mrk-primary-region-updated"),
    ("mrk_replicated_to_new_region", "kms-mrk-replicated"),
    ("cloudtrail_stopped", "cloudtrail-logging-stopped"),
    ("kms_events_excluded", "cloudtrail-kms-events-excluded"),
    (
        "custom_key_store_changed",
        "kms-custom-key-store-disconnected",
    ),
    ("reencrypt_to_external_key", "kms-reencrypt-to-foreign-key"),
];

const CI_ROLE: &str = "arn:aws:iam::444455556666:role/ci-deployer";

fn check_scenarios(findings: &[Value], truth: &[Value]) {
    let by_event: HashMap<String, Vec<&Value>> =
        findings.iter().fold(HashMap::new(), |mut m, f| {
            for e in strs(&f["event_ids"]) {
                m.entry(e).or_default().push(f);
            }
            m
        });
    let mut checked = 0;
    for t in truth {
        let scenario = t["scenario"].as_str().unwrap();
        let Some((_, rule)) = SCENARIO_RULES.iter().find(|(s, _)| *s == scenario) else {
            continue;
        };
        checked += 1;
        let mut keys_seen = HashSet::new();
        for e in strs(&t["eventIDs"]) {
            let hits = by_event.get(&e).map(Vec::as_slice).unwrap_or_default();
            assert!(
                hits.iter().any(|f| f["rule"] == *rule),
                "scenario {scenario}: event {e} not raised by {rule}; got {:?}",
                hits.iter().map(|f| &f["rule"]).collect::<Vec<_>>()
            );
            let f = hits.iter().find(|f| f["rule"] == *rule).unwrap();
            let principal = t["principal"].as_str().unwrap();
            assert_eq!(f["principal"], principal, "scenario {scenario}: principal");
            keys_seen.extend(strs(&f["keys"]));
        }
        for k in strs(&t["keyArns"]) {
            // ReEncrypt's truth lists the foreign destination key too: all must show.
            assert!(
                keys_seen.contains(&k),
                "scenario {scenario}: key {k} missing in {keys_seen:?}"
            );
        }
    }
    assert_eq!(
        checked,
        SCENARIO_RULES.len(),
        "every rule scenario was injected"
    );
}

/// Findings that match no injected incident must be what a rule truly describes.
fn check_benign(findings: &[Value], truth: &[Value]) -> usize {
    let injected: HashSet<String> = truth.iter().flat_map(|t| strs(&t["eventIDs"])).collect();
    let mut benign = 0;
    for f in findings {
        if strs(&f["event_ids"]).iter().any(|e| injected.contains(e)) {
            continue;
        }
        benign += 1;
        let rule = f["rule"].as_str().unwrap();
        let ok = match rule {
            // ctgen's apps get the odd AccessDenied: a denied Decrypt is what the rule says.
            "kms-crypto-denied" => f["error_code"]
                .as_str()
                .is_some_and(|c| c.starts_with("AccessDenied")),
            // ctgen's CI role really schedules dev keys for deletion.
            "kms-key-deletion-scheduled" => {
                f["principal_role"] == CI_ROLE && f["account"] == "444455556666"
            }
            // Admins turn rotation on during working hours: context, not an alert.
            "kms-rotation-enabled" => f["severity"] == "info",
            _ => false,
        };
        assert!(ok, "unexpected finding on benign traffic: {f}");
    }
    benign
}

#[test]
fn every_rule_scenario_is_found_and_benign_traffic_raises_only_what_rules_describe() {
    let dir = scenario_corpus();
    let (findings, err, code) = replay_jsonl(&[&dir.join("AWSLogs")], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "no warnings on a clean corpus: {err}");
    let truth = truth(dir);
    check_scenarios(&findings, &truth);
    let benign = check_benign(&findings, &truth);
    assert!(benign > 0, "the corpus has CI deletions and benign denials");
}

#[test]
fn suppressions_silence_known_good_activity_only() {
    let dir = scenario_corpus();
    let extra = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        extra.path(),
        format!(
            "[[suppress]]\nrules = [\"kms-key-deletion-scheduled\"]\nreason = \"CI tears down dev keys\"\nmatch = {{ field = \"userIdentity.sessionContext.sessionIssuer.arn\", equals = \"{CI_ROLE}\" }}\n"
        ),
    )
    .unwrap();
    let (all, _, _) = replay_jsonl(&[&dir.join("AWSLogs")], &[]);
    let (quiet, err, code) = replay_jsonl(
        &[&dir.join("AWSLogs")],
        &["--extra-rules", extra.path().to_str().unwrap()],
    );
    assert_eq!(code, 0, "{err}");
    let ci = |fs: &[Value]| fs.iter().filter(|f| f["principal_role"] == CI_ROLE).count();
    assert!(ci(&all) > 0);
    assert_eq!(ci(&quiet), 0);
    assert_eq!(
        all.len() - ci(&all),
        quiet.len(),
        "nothing else was suppressed"
    );
    check_scenarios(&quiet, &truth(dir));

    // A suppression naming an unknown rule is an error that names it.
    std::fs::write(extra.path(), "[[suppress]]\nrules = [\"no-such-rule\"]\nreason = \"x\"\nmatch = { field = \"a\", exists = true }\n").unwrap();
    let (_, err, code) = replay_jsonl(
        &[&dir.join("AWSLogs")],
        &["--extra-rules", extra.path().to_str().unwrap()],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown rule `no-such-rule`") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn findings_carry_the_contract_fields_and_stable_ids() {
    let dir = scenario_corpus();
    let (one, _, _) = replay_jsonl(&[&dir.join("AWSLogs")], &["--jobs", "1"]);
    let (two, _, _) = replay_jsonl(&[&dir.join("AWSLogs")], &["--jobs", "2"]);
    assert_eq!(
        one, two,
        "the same input gives the same output whatever --jobs"
    );
    let f = one
        .iter()
        .find(|f| f["rule"] == "kms-key-deletion-scheduled" && f["principal_role"] != CI_ROLE)
        .expect("the injected deletion");
    for field in [
        "id",
        "rule",
        "kind",
        "severity",
        "summary",
        "event_ids",
        "event_name",
        "time",
        "principal",
        "principal_role",
        "account",
        "region",
        "keys",
        "source_ip",
        "user_agent",
        "file",
    ] {
        assert!(!f[field].is_null(), "field {field} missing in {f}");
    }
    assert_eq!(f["kind"], "rule");
    assert_eq!(f["event_name"], "ScheduleKeyDeletion");
    assert!(f["principal_role"]
        .as_str()
        .unwrap()
        .starts_with("arn:aws:iam::111122223333:role/"));
    assert!(
        f["summary"]
            .as_str()
            .unwrap()
            .contains("for deletion in 7 days"),
        "{}",
        f["summary"]
    );
    assert!(Path::new(f["file"].as_str().unwrap()).exists());
    assert_eq!(f["id"].as_str().unwrap().len(), 32);
    let ids: HashSet<&str> = one.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), one.len(), "ids are unique");
}

#[test]
fn output_file_table_summary_and_fail_on() {
    let samples = repo().join("samples");
    let out = tempfile::NamedTempFile::new().unwrap();
    let o = run(bin()
        .args(["replay", "--output"])
        .arg(out.path())
        .arg(&samples));
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).is_empty(), "findings went to the file");
    let from_file = jsonl(&std::fs::read_to_string(out.path()).unwrap());
    assert!(
        from_file.len() >= 15,
        "samples raise every rule scenario: {}",
        from_file.len()
    );

    let o = run(bin().args(["replay", "--format", "table"]).arg(&samples));
    let table = stdout(&o);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SEVERITY"), "{table}");
    assert!(
        lines[1].starts_with("CRITICAL"),
        "most severe first: {table}"
    );
    assert!(
        table.contains("files: 229 (0 bad, 0 digest files skipped)"),
        "{table}"
    );
    assert!(table.contains("MB/s of JSON"), "{table}");
    let rank = ["CRITICAL", "HIGH", "MEDIUM", "LOW", "INFO"];
    let sev: Vec<usize> = lines[1..]
        .iter()
        .take_while(|l| !l.is_empty())
        .map(|l| rank.iter().position(|r| l.starts_with(r)).unwrap())
        .collect();
    assert!(sev.windows(2).all(|w| w[0] <= w[1]), "sorted by severity");
    assert_eq!(sev.len(), from_file.len());

    let code = |sev: &str, path: &Path| {
        run(bin()
            .args(["replay", "--fail-on", sev, "--format", "jsonl"])
            .arg(path))
        .status
        .code()
    };
    assert_eq!(code("critical", &samples), Some(1));
    // The plain KMS-free malformed control-chars file has a Decrypt only: nothing fires.
    let calm = malformed().join("control-chars.json.gz");
    assert_eq!(code("info", &calm), Some(0));
    let bad = run(bin().args(["replay", "--fail-on", "urgent"]).arg(&samples));
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("critical"),
        "error lists the valid severities"
    );
}

#[test]
fn org_trail_layout_digests_and_plain_json() {
    let dir = generate(&[
        "--hours",
        "2",
        "--events-per-hour",
        "2000",
        "--org-trail",
        "--digests",
        "--seed",
        "5",
        "--scenarios",
        "key_disabled",
        "--warmup",
        "0.1",
    ]);
    let logs = dir.join("AWSLogs");
    let o = run(bin()
        .args(["replay", "--format", "jsonl", "--summary", "json"])
        .arg(&logs));
    let err = stderr(&o);
    let summary: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    assert!(
        summary["stats"]["digests_skipped"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert_eq!(summary["stats"]["bad_files"], 0, "{err}");
    let findings = jsonl(&stdout(&o));
    let disabled: Vec<&Value> = findings
        .iter()
        .filter(|f| f["rule"] == "kms-key-disabled")
        .collect();
    assert_eq!(disabled.len(), 1);
    assert!(disabled[0]["file"]
        .as_str()
        .unwrap()
        .contains("/AWSLogs/o-a1b2c3d4e5/111122223333/CloudTrail/"));

    // The same file as plain JSON gives the same finding id.
    let gz = Path::new(disabled[0]["file"].as_str().unwrap());
    let mut json = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(gz).unwrap()),
        &mut json,
    )
    .unwrap();
    let plain = dir.join("plain.json");
    std::fs::write(&plain, json).unwrap();
    let (again, err, _) = replay_jsonl(&[&plain], &[]);
    assert!(err.is_empty(), "{err}");
    assert_eq!(
        again
            .iter()
            .find(|f| f["rule"] == "kms-key-disabled")
            .unwrap()["id"],
        disabled[0]["id"]
    );
}

/// (file, what must be said about it, whether records before the damage are counted)
const MALFORMED: [(&str, &str); 14] = [
    ("truncated.json.gz", "gzip stream is corrupt or truncated"),
    ("not-gzip.json.gz", "named .gz but not gzip"),
    (
        "gzip-of-text.json.gz",
        "not a CloudTrail JSON document: expected '{' at byte 0, found 'h'",
    ),
    ("no-records.json.gz", "no \"Records\" array"),
    ("records-not-array.json.gz", "\"Records\" is not an array"),
    (
        "missing-event-source.json.gz",
        "1 record(s) have no eventSource",
    ),
    (
        "deep-nesting.json.gz",
        "Records[0] nests deeper than the depth cap",
    ),
    (
        "huge-string.json.gz",
        "Records[0] is 50000050 bytes, over the per-record cap",
    ),
    ("gzip-bomb.json.gz", "treated as a gzip bomb"),
    ("invalid-utf8.json.gz", "1 record(s) contain invalid UTF-8"),
    (
        "duplicate-keys.json.gz",
        "1 record(s) repeat a key (eventName)",
    ),
    (
        "wrong-types.json.gz",
        "fields of the wrong type (first: `eventName`)",
    ),
    ("empty.json.gz", "empty: no JSON document"),
    ("control-chars.json.gz", ""),
];

#[test]
fn every_malformed_input_is_reported_once_and_never_stops_the_run() {
    let dir = malformed();
    let manifest: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let logs: Vec<&str> = manifest
        .iter()
        .filter(|m| m["kind"] == "log-file")
        .map(|m| m["file"].as_str().unwrap())
        .collect();
    assert_eq!(
        logs.len(),
        MALFORMED.len(),
        "a case for every malformed log file ctgen writes"
    );
    for (file, said) in MALFORMED {
        let path = dir.join(file);
        let o = run(bin()
            .args([
                "replay",
                "--format",
                "jsonl",
                "--summary",
                "json",
                "--max-record-bytes",
                "1048576",
            ])
            .arg(&path));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(0), "{file}: {err}");
        let reports: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with("warning:") || l.starts_with("note:"))
            .collect();
        if said.is_empty() {
            assert!(reports.is_empty(), "{file}: {err}");
        } else {
            assert_eq!(reports.len(), 1, "{file}: reported once: {err}");
            assert!(
                reports[0].contains(file) && reports[0].contains(said),
                "{file}: {err}"
            );
        }
        let summary: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
        let rss = summary["stats"]["peak_rss_bytes"].as_u64().unwrap();
        assert!(rss < 64 << 20, "{file}: peak RSS {rss}");
    }
    // Good records before the damage are analyzed; the duplicated-key record is analyzed
    // under both readings, so the hidden ScheduleKeyDeletion still raises its rule.
    let (f, _, _) = replay_jsonl(&[&dir.join("duplicate-keys.json.gz")], &[]);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0]["rule"], "kms-key-deletion-scheduled");
    let o = run(bin()
        .args(["replay", "--format", "jsonl", "--summary", "json"])
        .arg(dir.join("truncated.json.gz")));
    let summary: Value = serde_json::from_str(stderr(&o).lines().last().unwrap()).unwrap();
    assert!(
        summary["stats"]["kms_records"].as_u64().unwrap() >= 10,
        "{summary}"
    );

    // All of them in one run: every bad file counted, the run completes.
    let o = run(bin()
        .args(["replay", "--format", "jsonl", "--summary", "json"])
        .arg(dir));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0));
    let summary: Value = serde_json::from_str(err.lines().last().unwrap()).unwrap();
    // 12 bad log files (not-gzip is a note, control-chars is fine) plus the 6 SQS message
    // bodies ctgen writes beside them, which are not CloudTrail files either.
    assert!(
        summary["stats"]["bad_files"].as_u64().unwrap() >= 12,
        "{summary}"
    );
}

#[test]
fn control_characters_never_reach_the_terminal() {
    let dir = malformed();
    let extra = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        extra.path(),
        "[[rule]]\nid = \"any-decrypt\"\ntitle = \"t\"\nseverity = \"low\"\ndescription = \"d\"\nevent_names = [\"Decrypt\"]\nsummary = \"UA {user_agent}\"\n[[rule.tests]]\nexpect = \"match\"\nevent = '{}'\n",
    )
    .unwrap();
    let o = run(bin()
        .args(["replay", "--format", "table", "--rules"])
        .arg(extra.path())
        .arg(dir.join("control-chars.json.gz")));
    let table = stdout(&o);
    assert!(
        table.contains("UA evilBcc: attacker@example.com<script>"),
        "{table}"
    );
    assert!(!table.contains('\r') && !table.contains('\0'));
    let (f, _, _) = replay_jsonl(
        &[&dir.join("control-chars.json.gz")],
        &["--rules", extra.path().to_str().unwrap()],
    );
    assert_eq!(
        f[0]["user_agent"], "evil\r\nBcc: attacker@example.com\r\n<script>alert(1)</script>\u{0}",
        "JSON keeps the raw value, escaped"
    );
}

#[test]
fn the_readme_suppression_example_works_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let start = readme
        .find("# ci-suppressions.toml\n")
        .expect("README shows ci-suppressions.toml");
    let snippet = &readme[start..];
    let snippet = &snippet[..snippet.find("```").unwrap()];
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), snippet).unwrap();
    let dir = scenario_corpus();
    let (all, _, _) = replay_jsonl(&[&dir.join("AWSLogs")], &["--no-baselines"]);
    let (quiet, err, code) = replay_jsonl(
        &[&dir.join("AWSLogs")],
        &[
            "--no-baselines",
            "--extra-rules",
            file.path().to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let ci = |fs: &[Value]| fs.iter().filter(|f| f["principal_role"] == CI_ROLE).count();
    assert!(ci(&all) > 0);
    assert_eq!(
        ci(&quiet),
        0,
        "the README's suppression silences the CI role"
    );
    check_scenarios(&quiet, &truth(dir));
}
