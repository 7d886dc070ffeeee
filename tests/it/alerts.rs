//! `kmsguard alerts test|send` through the real binary against real servers (see
//! `servers`): aiosmtpd, and an HTTP receiver that checks the HMAC signature of generic
//! webhooks independently of kmsguard's code.

use crate::servers::{private_ca, Receiver, Smtp};
use crate::support::{
    bin, free_port, generate, jsonl, malformed, replay_jsonl, repo, run, stderr, stdout, Proc,
};
use serde_json::{json, Value};
use std::collections::{BTreeSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "test-hmac-secret-0123456789";

// ---------------------------------------------------------------------- helpers ---

fn finding(rule: &str, severity: &str, principal: &str, key: &str, time: &str) -> Value {
    json!({
        "id": format!("{:032x}", fnv(&[rule, severity, principal, key, time])),
        "kind": "rule",
        "rule": rule,
        "severity": severity,
        "title": format!("Title of {rule}"),
        "summary": format!("{principal} did something to {key}"),
        "event_ids": [format!("ev-{rule}-{time}")],
        "event_name": "DisableKey",
        "event_source": "kms.amazonaws.com",
        "time": time,
        "principal": principal,
        "account": "111122223333",
        "region": "us-east-1",
        "keys": [key],
        "source_ip": "198.51.100.7",
        "user_agent": "aws-cli/2.15.0",
        "file": "test.json.gz",
    })
}

fn fnv(parts: &[&str]) -> u128 {
    let mut h: u128 = 0xcbf29ce484222325;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h = (h ^ u128::from(b)).wrapping_mul(0x100000001b3);
        }
    }
    h
}

fn write_jsonl(dir: &Path, name: &str, findings: &[Value]) -> PathBuf {
    let p = dir.join(name);
    let text: String = findings.iter().map(|f| format!("{f}\n")).collect();
    std::fs::write(&p, text).unwrap();
    p
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn email_sink(name: &str, port: u16, extra: &str) -> String {
    format!(
        "[[sinks.email]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\nfrom = \"kmsguard <kmsguard@example.com>\"\nto = [\"oncall@example.com\", \"Security <sec@example.com>\"]\n{extra}\n"
    )
}

fn send(config: &Path, findings: &Path, envs: &[(&str, &str)], retry_for: &str) -> Output {
    let mut cmd = bin();
    cmd.args(["alerts", "send", "--retry-for", retry_for, "--config"])
        .arg(config)
        .arg(findings);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("kmsguard runs")
}

fn outcomes(o: &Output) -> Vec<Value> {
    crate::support::jsonl(&stdout(o))
}

fn delivered(outs: &[Value], channel: &str) -> usize {
    outs.iter()
        .filter(|o| o["channel"] == channel && o["status"] == "delivered")
        .count()
}

fn header_block(raw: &str) -> &str {
    let end = raw
        .find("\r\n\r\n")
        .or_else(|| raw.find("\n\n"))
        .unwrap_or(raw.len());
    &raw[..end]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

// ------------------------------------------------------------------------ tests ---

#[test]
fn each_severity_reaches_the_right_channels() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(free_port(), &dir.path().join("mail"), None);
    let hooks = Receiver::start(&[]);
    let secret = write(dir.path(), "hmac", &format!("{SECRET}\n"));
    let config = format!(
        "{}\n[[sinks.webhook]]\nname = \"everything\"\nurl = \"{}\"\nsecret_file = \"{}\"\nmin_severity = \"info\"\ngroup_wait = \"0s\"\n\n[[sinks.webhook]]\nname = \"pager\"\nformat = \"pagerduty\"\nurl = \"{}\"\nrouting_key_env = \"KMSGUARD_TEST_PD_KEY\"\nmin_severity = \"critical\"\n\n[[sinks.webhook]]\nname = \"chat\"\nformat = \"slack\"\nurl_env = \"KMSGUARD_TEST_SLACK_URL\"\nmin_severity = \"medium\"\nexclude_accounts = [\"444455556666\"]\n",
        email_sink("oncall-mail", smtp.port, "min_severity = \"high\"\ngroup_wait = \"0s\""),
        hooks.url("/generic"),
        secret.display(),
        hooks.url("/pd"),
    );
    let cfg = write(dir.path(), "alerts.toml", &config);
    let sevs = ["info", "low", "medium", "high", "critical"];
    let mut findings: Vec<Value> = sevs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            finding(
                &format!("rule-{s}"),
                s,
                &format!("arn:aws:iam::111122223333:user/u{i}"),
                "arn:aws:kms:us-east-1:111122223333:key/k1",
                &format!("2026-10-01T00:0{i}:00Z"),
            )
        })
        .collect();
    // A medium finding in an excluded account reaches the generic hook only.
    let mut other = finding(
        "rule-medium-other",
        "medium",
        "arn:aws:iam::444455556666:user/x",
        "k",
        "2026-10-01T00:09:00Z",
    );
    other["account"] = json!("444455556666");
    findings.push(other);
    let input = write_jsonl(dir.path(), "findings.jsonl", &findings);
    let slack_url = hooks.url("/slack/T000/B000/secret-token");
    let o = send(
        &cfg,
        &input,
        &[
            ("KMSGUARD_TEST_PD_KEY", "pd-routing-key"),
            ("KMSGUARD_TEST_SLACK_URL", &slack_url),
        ],
        "20s",
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let outs = outcomes(&o);
    assert_eq!(delivered(&outs, "oncall-mail"), 2, "{outs:?}");
    assert_eq!(delivered(&outs, "everything"), 6);
    assert_eq!(delivered(&outs, "pager"), 1);
    assert_eq!(delivered(&outs, "chat"), 3);
    assert_eq!(outs.len(), 12, "nothing else was sent: {outs:?}");
    assert!(
        !err.contains("secret-token"),
        "the Slack URL never shows: {err}"
    );

    let mails = smtp.wait_for(2, Duration::from_secs(5));
    assert_eq!(mails.len(), 2);
    let subjects: BTreeSet<String> = mails
        .iter()
        .map(|m| m["subject"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        subjects,
        BTreeSet::from([
            "[kmsguard CRITICAL] Title of rule-critical by user/u4".to_string(),
            "[kmsguard HIGH] Title of rule-high by user/u3".to_string(),
        ])
    );
    for m in &mails {
        assert_eq!(
            m["rcpt_tos"],
            json!(["oncall@example.com", "sec@example.com"])
        );
        let text = m["text"].as_str().unwrap();
        for label in [
            "Severity:",
            "Principal:",
            "Keys:",
            "Source IP:",
            "User agent:",
            "Event time:",
            "Next step:",
        ] {
            assert!(text.contains(label), "{label} missing in {text}");
        }
        assert!(m["html"].as_str().unwrap().contains("<table"), "HTML part");
        assert!(m["message_id"].as_str().unwrap().ends_with("@kmsguard>"));
    }

    let generic = hooks.on("/generic");
    assert_eq!(generic.len(), 6);
    let mut got = BTreeSet::new();
    for r in &generic {
        assert!(
            r.signature_ok(SECRET),
            "signature of {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.signature_ok("wrong secret"));
        let v = r.json();
        assert_eq!(v["type"], "kmsguard.alert");
        assert_eq!(v["test"], false);
        assert_eq!(r.header("x-kmsguard-alert-id").unwrap(), v["alert"]["id"]);
        got.insert(
            v["alert"]["finding"]["severity"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(got.len(), 5, "every severity: {got:?}");

    let pd = hooks.on("/pd");
    assert_eq!(pd.len(), 1);
    let v = pd[0].json();
    assert_eq!(v["routing_key"], "pd-routing-key");
    assert_eq!(v["event_action"], "trigger");
    assert_eq!(v["payload"]["severity"], "critical");
    assert_eq!(v["payload"]["class"], "rule-critical");
    assert!(v["dedup_key"].as_str().unwrap().starts_with("kmsguard-"));
    assert!(
        pd[0].header("x-kmsguard-signature").is_none(),
        "only generic hooks are signed"
    );

    let slack = hooks.on("/slack/T000/B000/secret-token");
    assert_eq!(slack.len(), 3);
    let heads: BTreeSet<String> = slack
        .iter()
        .map(|r| {
            r.json()["blocks"][0]["text"]["text"]
                .as_str()
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        heads,
        BTreeSet::from(["CRITICAL".into(), "HIGH".into(), "MEDIUM".into()])
    );

    let mut lat: Vec<f64> = outs
        .iter()
        .filter_map(|o| o["latency_ms"].as_f64())
        .collect();
    assert_eq!(lat.len(), 12);
    eprintln!(
        "latency finding read -> accepted over {} alerts (batch of 6 findings, 4 channels): median {:.1} ms, max {:.1} ms",
        lat.len(),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 1.0)
    );
}

#[test]
fn a_denied_decrypt_burst_becomes_one_alert_with_a_count() {
    let corpus = generate(&[
        "--hours",
        "2",
        "--events-per-hour",
        "300",
        "--scenarios",
        "denied_decrypt_burst",
        "--seed",
        "3",
        "--warmup",
        "0.1",
    ]);
    let (findings, _, code) = replay_jsonl(&[&corpus.join("AWSLogs")], &[]);
    assert_eq!(code, 0);
    let truth = crate::support::truth(&corpus);
    let role = truth[0]["principal"].as_str().unwrap().to_string();
    // The replay folds the burst already: one finding per caller and hour, counting the
    // events and listing the keys it tried.
    let burst: Vec<&Value> = findings
        .iter()
        .filter(|f| f["rule"] == "kms-crypto-denied" && f["principal"] == role.as_str())
        .collect();
    let events: u64 = burst.iter().map(|f| f["count"].as_u64().unwrap()).sum();
    assert_eq!(events, 35, "ctgen's burst is 35 denied Decrypts");
    assert!(burst.len() <= 2, "folded: {} findings", burst.len());
    let distinct_keys: BTreeSet<String> = burst
        .iter()
        .flat_map(|f| crate::support::strs(&f["keys"]))
        .collect();
    assert!(distinct_keys.len() > 1, "the burst probes several keys");
    let burst_findings: Vec<Value> = burst.iter().map(|f| (*f).clone()).collect();

    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(free_port(), &dir.path().join("mail"), None);
    let hooks = Receiver::start(&[]);
    let secret = write(dir.path(), "hmac", SECRET);
    let config = format!(
        "{}\n[[sinks.webhook]]\nname = \"per-key\"\nurl = \"{}\"\nsecret_file = \"{}\"\ninclude_rules = [\"kms-crypto-*\"]\n",
        email_sink("mail", smtp.port, "include_rules = [\"kms-crypto-denied\"]\ngroup_by = [\"rule\", \"principal\"]\ngroup_wait = \"1m\""),
        hooks.url("/h"),
        secret.display()
    );
    let cfg = write(dir.path(), "alerts.toml", &config);
    let input = write_jsonl(dir.path(), "f.jsonl", &burst_findings);
    let o = send(&cfg, &input, &[], "20s");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let mails = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(mails.len(), 1, "one alert for the whole burst: {mails:#?}");
    let subject = mails[0]["subject"].as_str().unwrap();
    assert!(
        subject.contains("Cryptographic operation denied by role/svc-")
            && subject.ends_with("(35 events)"),
        "{subject}"
    );
    let text = mails[0]["text"].as_str().unwrap();
    let first = burst
        .iter()
        .map(|f| f["first_time"].as_str().unwrap())
        .min()
        .unwrap();
    let last = burst
        .iter()
        .map(|f| f["last_time"].as_str().unwrap())
        .max()
        .unwrap();
    assert!(
        text.contains(&format!("35 events from {first} to {last}")),
        "{text}"
    );
    if distinct_keys.len() > 20 {
        let more = format!(" and {} more", distinct_keys.len() - 20);
        assert!(text.contains(&more), "keys beyond 20 are counted: {text}");
    }
    assert!(
        text.contains("Why this matters:") && text.contains("probing keys"),
        "rule description shown"
    );

    // With the default group_by (rule, principal, key), one alert per folded finding
    // (the key set of the fold is its key), counting its events.
    let per_key = hooks.on("/h");
    assert_eq!(per_key.len(), burst.len());
    let total: u64 = per_key
        .iter()
        .map(|r| r.json()["alert"]["group"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 35);
}

#[test]
fn smtp_down_then_up_delivers_once() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write(
        dir.path(),
        "alerts.toml",
        &email_sink("mail", port, "group_wait = \"0s\""),
    );
    let input = write_jsonl(
        dir.path(),
        "f.jsonl",
        &[finding(
            "kms-key-disabled",
            "high",
            "arn:aws:iam::111122223333:user/a",
            "k",
            "2026-10-01T00:00:00Z",
        )],
    );
    let child = Proc::spawn(
        bin()
            .args(["alerts", "send", "--retry-for", "60s", "--config"])
            .arg(&cfg)
            .arg(&input)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let smtp = Smtp::start(port, &dir.path().join("mail"), None);
    let o = child.wait_with_output();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("attempt 1 failed: transient: SMTP 127.0.0.1"),
        "{err}"
    );
    assert!(err.contains("retrying in"), "{err}");
    let outs = outcomes(&o);
    assert_eq!(outs.len(), 1);
    assert!(outs[0]["attempts"].as_u64().unwrap() >= 2, "{outs:?}");
    assert!(
        outs[0]["response"]
            .as_str()
            .unwrap()
            .starts_with("SMTP 250"),
        "{outs:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(smtp.messages().len(), 1, "delivered exactly once");
}

#[test]
fn a_webhook_answering_500_then_200_is_retried_and_400_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Receiver::start(&[500, 503, 200]);
    let secret = write(dir.path(), "hmac", SECRET);
    let hook = |name: &str, path: &str| {
        format!("[[sinks.webhook]]\nname = \"{name}\"\nurl = \"{}\"\nsecret_file = \"{}\"\ngroup_wait = \"0s\"\n", hooks.url(path), secret.display())
    };
    let cfg = write(dir.path(), "a.toml", &hook("flaky", "/flaky"));
    let input = write_jsonl(
        dir.path(),
        "f.jsonl",
        &[finding(
            "kms-key-disabled",
            "high",
            "arn:aws:iam::111122223333:user/a",
            "k",
            "2026-10-01T00:00:00Z",
        )],
    );
    let o = send(&cfg, &input, &[], "30s");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("transient: POST to 127.0.0.1 answered HTTP 500"),
        "{err}"
    );
    assert!(err.contains("HTTP 503"), "{err}");
    let reqs = hooks.on("/flaky");
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![500, 503, 200]
    );
    let ids: BTreeSet<&str> = reqs
        .iter()
        .map(|r| r.header("x-kmsguard-alert-id").unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "retries carry the same alert id");
    assert!(
        reqs.iter().all(|r| r.signature_ok(SECRET)),
        "every attempt is signed afresh"
    );
    let outs = outcomes(&o);
    assert_eq!(outs[0]["attempts"], 3);
    assert_eq!(outs[0]["response"], "HTTP 200");

    // 400 is permanent: one attempt, reported, exit 1.
    *hooks.script.lock().unwrap() = VecDeque::from([400]);
    let cfg = write(dir.path(), "b.toml", &hook("broken", "/broken"));
    let o = send(&cfg, &input, &[], "30s");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("permanent: POST to 127.0.0.1 answered HTTP 400") && err.contains("giving up"),
        "{err}"
    );
    assert_eq!(hooks.on("/broken").len(), 1);
    assert_eq!(outcomes(&o)[0]["status"], "failed");
}

#[test]
fn control_characters_make_a_safe_email() {
    let dir = tempfile::tempdir().unwrap();
    let rules = write(
        dir.path(),
        "rules.toml",
        "[[rule]]\nid = \"any-decrypt\"\ntitle = \"Any Decrypt\"\nseverity = \"high\"\ndescription = \"d\"\nevent_names = [\"Decrypt\"]\nsummary = \"UA {user_agent}\"\n[[rule.tests]]\nexpect = \"match\"\nevent = '{}'\n",
    );
    let (mut findings, _, _) = replay_jsonl(
        &[&malformed().join("control-chars.json.gz")],
        &["--rules", rules.to_str().unwrap()],
    );
    assert_eq!(findings.len(), 1);
    assert!(
        findings[0]["user_agent"]
            .as_str()
            .unwrap()
            .contains("\r\nBcc:"),
        "the raw value reaches alerts"
    );
    // A hostile findings file may carry anything in any field, including the subject's.
    let mut forged = finding(
        "any-decrypt",
        "critical",
        "arn:aws:iam::1:user/x\r\nBcc: forged@example.com\r\n",
        "k\n\nbody-injection",
        "2026-10-01T00:00:00Z",
    );
    forged["title"] = json!("Title\r\nX-Injected: 1\u{0}");
    findings.push(forged);
    let smtp = Smtp::start(free_port(), &dir.path().join("mail"), None);
    let cfg = write(
        dir.path(),
        "alerts.toml",
        &email_sink("mail", smtp.port, "min_severity = \"info\"\ngroup_wait = \"0s\"\nsubject = \"[kmsguard {SEVERITY}] {title} {principal} {key}\""),
    );
    let input = write_jsonl(dir.path(), "f.jsonl", &findings);
    let o = bin()
        .args(["alerts", "send", "--retry-for", "10s", "--rules"])
        .arg(&rules)
        .arg("--config")
        .arg(&cfg)
        .arg(&input)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mails = smtp.wait_for(2, Duration::from_secs(5));
    assert_eq!(mails.len(), 2);
    let expected: BTreeSet<&str> = [
        "From",
        "To",
        "Subject",
        "X-Kmsguard-Alert",
        "Message-ID",
        "MIME-Version",
        "Date",
        "Content-Type",
    ]
    .into();
    for m in &mails {
        assert_eq!(m["tls"], false, "plain relay");
        let names: BTreeSet<&str> = m["header_names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(names, expected, "no extra headers");
        assert_eq!(
            m["rcpt_tos"],
            json!(["oncall@example.com", "sec@example.com"]),
            "no extra recipients"
        );
        let raw = m["raw"].as_str().unwrap();
        let head = header_block(raw);
        for line in head.lines() {
            let l = line.to_ascii_lowercase();
            assert!(
                !l.starts_with("bcc") && !l.starts_with("x-injected"),
                "injected header line {line:?}"
            );
        }
        let subject = m["subject"].as_str().unwrap();
        assert!(!subject.contains(['\r', '\n', '\0']), "{subject:?}");
        let html = m["html"].as_str().unwrap();
        assert!(!html.contains("<script>") && !html.contains('\0'), "{html}");
        let text = m["text"].as_str().unwrap();
        assert!(!text.contains('\0') && !text.contains("\r\nBcc"), "{text}");
    }
    let ua = mails
        .iter()
        .find(|m| {
            m["subject"]
                .as_str()
                .unwrap()
                .starts_with("[kmsguard HIGH] Any Decrypt")
        })
        .expect("the ctgen case");
    assert!(
        ua["html"].as_str().unwrap().contains(
            "evil\\r\\nBcc: attacker@example.com\\r\\n&lt;script&gt;alert(1)&lt;/script&gt;\\0"
        ),
        "{}",
        ua["html"]
    );
    assert!(ua["text"]
        .as_str()
        .unwrap()
        .contains("evil\\r\\nBcc: attacker@example.com\\r\\n<script>alert(1)</script>\\0"));
    let forged = mails
        .iter()
        .find(|m| {
            m["subject"]
                .as_str()
                .unwrap()
                .starts_with("[kmsguard CRITICAL]")
        })
        .unwrap();
    assert_eq!(
        forged["subject"],
        "[kmsguard CRITICAL] Title X-Injected: 1 by user/x Bcc: forged@example.com arn:aws:iam::1:user/x Bcc: forged@example.com k body-injection"
    );
}

#[test]
fn alerts_test_sends_a_marked_alert_and_classifies_failures() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(free_port(), &dir.path().join("mail"), None);
    let cfg = write(
        dir.path(),
        "alerts.toml",
        &format!(
            "{}{}{}",
            email_sink("oncall", smtp.port, ""),
            email_sink("later", smtp.port, "").replace(
                "\"oncall@example.com\", \"Security <sec@example.com>\"",
                "\"tempfail@example.com\""
            ),
            email_sink("gone", smtp.port, "").replace(
                "\"oncall@example.com\", \"Security <sec@example.com>\"",
                "\"reject@example.com\""
            ),
        ),
    );
    let test = |ch: &str| {
        bin()
            .args(["alerts", "test", ch, "--config"])
            .arg(&cfg)
            .output()
            .unwrap()
    };
    let o = test("oncall");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let m = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(m.len(), 1);
    assert!(
        m[0]["subject"]
            .as_str()
            .unwrap()
            .starts_with("[TEST] [kmsguard INFO] TEST alert"),
        "{}",
        m[0]["subject"]
    );
    assert!(m[0]["x_kmsguard_alert"]
        .as_str()
        .unwrap()
        .ends_with("test=yes"));
    assert!(m[0]["text"]
        .as_str()
        .unwrap()
        .starts_with("THIS IS A TEST ALERT"));
    assert_eq!(outcomes(&o)[0]["kind"], "test");

    let o = test("later");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("transient: SMTP") && stderr(&o).contains("451"),
        "{}",
        stderr(&o)
    );
    let o = test("gone");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("permanent: SMTP") && stderr(&o).contains("550"),
        "{}",
        stderr(&o)
    );
    let o = test("nope");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no channel named `nope`; the channels are: oncall, later, gone"),
        "{}",
        stderr(&o)
    );
    assert_eq!(smtp.messages().len(), 1, "failures sent nothing");
}

#[test]
fn secrets_stay_out_of_config_files_and_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "a.toml",
        &format!(
            "{}password = \"hunter2\"\nusername = \"u\"\n",
            email_sink("m", 25, "")
        ),
    );
    let o = bin()
        .args(["alerts", "test", "m", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(
        err.contains("sinks.email[0].password: secrets are not accepted")
            && err.contains("password_env"),
        "{err}"
    );
    assert!(!err.contains("hunter2"));

    // A webhook URL with a token, from the environment, to a closed port.
    let port = free_port();
    let cfg = write(dir.path(), "b.toml", "[[sinks.webhook]]\nname = \"w\"\nurl_env = \"KMSGUARD_TEST_URL\"\nsecret_env = \"KMSGUARD_TEST_SECRET\"\n");
    let url = format!("http://127.0.0.1:{port}/hook?token=tok-5ecret");
    let o = bin()
        .args(["alerts", "test", "w", "--config"])
        .arg(&cfg)
        .env("KMSGUARD_TEST_URL", &url)
        .env("KMSGUARD_TEST_SECRET", "s")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(all.contains("transient: POST to 127.0.0.1"), "{all}");
    assert!(!all.contains("tok-5ecret"), "{all}");
    let o = bin()
        .args(["alerts", "test", "w", "--config"])
        .arg(&cfg)
        .env_remove("KMSGUARD_TEST_URL")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("url_env: environment variable KMSGUARD_TEST_URL is not set"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn starttls_and_implicit_tls_to_a_relay_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let smtp = Smtp::start(free_port(), &dir.path().join("mail"), Some((&cert, &key)));
    let base = email_sink("tls", smtp.port, "").replace("tls = \"none\"\n", "tls = \"starttls\"\n");
    let trusted = write(
        dir.path(),
        "a.toml",
        &format!("{base}ca_file = \"{}\"\n", ca.display()),
    );
    let o = bin()
        .args(["alerts", "test", "tls", "--config"])
        .arg(&trusted)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let m = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["tls"], true, "the message went over TLS");
    // Without the CA the certificate is refused: nothing is sent in clear instead.
    let untrusted = write(dir.path(), "b.toml", &base);
    let o = bin()
        .args(["alerts", "test", "tls", "--config"])
        .arg(&untrusted)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).to_lowercase().contains("tls"), "{}", stderr(&o));
    assert_eq!(smtp.messages().len(), 1);

    // Implicit TLS (tls = "tls") to an SMTPS relay.
    let smtps = Smtp::start_smtps(free_port(), &dir.path().join("smtps"), &cert, &key);
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "{}ca_file = \"{}\"\n",
            email_sink("smtps", smtps.port, "").replace("tls = \"none\"\n", "tls = \"tls\"\n"),
            ca.display()
        ),
    );
    let o = bin()
        .args(["alerts", "test", "smtps", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let m = smtps.wait_for(1, Duration::from_secs(5));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["tls"], true);
}

#[test]
fn alert_latency_from_finding_to_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(free_port(), &dir.path().join("mail"), None);
    let hooks = Receiver::start(&[]);
    let secret = write(dir.path(), "hmac", SECRET);
    let cfg = write(
        dir.path(),
        "alerts.toml",
        &format!(
            "{}[[sinks.webhook]]\nname = \"hook\"\nurl = \"{}\"\nsecret_file = \"{}\"\ngroup_wait = \"0s\"\n",
            email_sink("mail", smtp.port, "group_wait = \"0s\""),
            hooks.url("/h"),
            secret.display()
        ),
    );
    let mut child = Proc::spawn(
        bin()
            .args(["alerts", "send", "--retry-for", "10s", "--config"])
            .arg(&cfg)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let n = 20;
    let (mut mail_ms, mut hook_ms) = (Vec::new(), Vec::new());
    for i in 0..n {
        let f = finding(
            "kms-key-disabled",
            "high",
            &format!("arn:aws:iam::111122223333:user/u{i}"),
            "k",
            "2026-10-01T00:00:00Z",
        );
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let t0 = Instant::now();
        writeln!(stdin, "{f}").unwrap();
        stdin.flush().unwrap();
        let mails = smtp.wait_for(i + 1, Duration::from_secs(10));
        assert_eq!(mails.len(), i + 1, "mail {i} arrived");
        mail_ms.push((mails[i]["accepted_at"].as_f64().unwrap() - wall) * 1000.0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while hooks.requests().len() <= i && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let r = hooks.requests();
        assert_eq!(r.len(), i + 1, "hook {i} arrived");
        hook_ms.push(r[i].at.duration_since(t0).as_secs_f64() * 1000.0);
    }
    drop(stdin);
    let o = child.wait_with_output();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(outcomes(&o).len(), 2 * n);
    let (m50, m99) = (
        percentile(&mut mail_ms, 0.5),
        percentile(&mut mail_ms, 0.99),
    );
    let (h50, h99) = (
        percentile(&mut hook_ms, 0.5),
        percentile(&mut hook_ms, 0.99),
    );
    eprintln!("alert latency, finding written to `alerts send` -> accepted, {n} findings one at a time (group_wait 0s):");
    eprintln!("  SMTP 250 (aiosmtpd): median {m50:.1} ms, p99 {m99:.1} ms");
    eprintln!("  HTTP 200 (generic webhook, signed): median {h50:.1} ms, p99 {h99:.1} ms");
    // Generous bounds for a shared 2-core machine; the point is milliseconds, not seconds.
    assert!(
        m50 < 1000.0 && h50 < 1000.0,
        "median latency {m50} / {h50} ms"
    );
}

#[test]
fn smtp_auth_over_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = private_ca(dir.path());
    let smtp = Smtp::start_auth(
        free_port(),
        &dir.path().join("mail"),
        &cert,
        &key,
        "kmsguard",
        "pa ss:wörd",
    );
    let pw = write(dir.path(), "smtp-password", "pa ss:wörd\n");
    let base =
        email_sink("auth", smtp.port, "").replace("tls = \"none\"\n", "tls = \"starttls\"\n");
    let cfg = write(
        dir.path(),
        "a.toml",
        &format!(
            "{base}ca_file = \"{}\"\nusername = \"kmsguard\"\npassword_file = \"{}\"\n",
            ca.display(),
            pw.display()
        ),
    );
    let o = bin()
        .args(["alerts", "test", "auth", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let m = smtp.wait_for(1, Duration::from_secs(5));
    assert_eq!(m.len(), 1);
    assert_eq!(m[0]["authenticated"], true);
    assert_eq!(m[0]["login"], "kmsguard");
    assert_eq!(m[0]["tls"], true);

    // A wrong password is permanent (535) and never printed.
    std::fs::write(&pw, "wrong-pw-value").unwrap();
    let o = bin()
        .args(["alerts", "test", "auth", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{all}");
    assert!(
        all.contains("permanent: SMTP") && all.contains("535"),
        "{all}"
    );
    assert!(
        !all.contains("wrong-pw-value") && !all.contains("pa ss"),
        "{all}"
    );
    // Without credentials the relay refuses the message.
    let anon = write(
        dir.path(),
        "b.toml",
        &format!("{base}ca_file = \"{}\"\n", ca.display()),
    );
    let o = bin()
        .args(["alerts", "test", "auth", "--config"])
        .arg(&anon)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(smtp.messages().len(), 1);
}

#[test]
fn alerts_help_texts_have_examples() {
    for args in [["alerts", "test", "--help"], ["alerts", "send", "--help"]] {
        let o = bin().args(args).output().unwrap();
        assert_eq!(o.status.code(), Some(0));
        let text = stdout(&o);
        assert!(
            text.contains("Examples:") && text.contains("Exit codes"),
            "{args:?}: {text}"
        );
    }
}

#[test]
fn a_dead_relay_fails_a_queue_within_the_retry_budget() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "alerts.toml",
        &email_sink("mail", free_port(), "group_wait = \"0s\""),
    );
    let findings: Vec<Value> = (0..5)
        .map(|i| {
            finding(
                "kms-key-disabled",
                "high",
                &format!("arn:aws:iam::111122223333:user/u{i}"),
                "k",
                "2026-10-01T00:00:00Z",
            )
        })
        .collect();
    let input = write_jsonl(dir.path(), "f.jsonl", &findings);
    let started = Instant::now();
    let o = send(&cfg, &input, &[], "3s");
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let outs = outcomes(&o);
    assert_eq!(outs.len(), 5);
    assert!(outs.iter().all(|o| o["status"] == "failed"), "{outs:?}");
    // The budget counts from when each alert was made, not from its first attempt:
    // five queued alerts behind a dead relay take about 3 s in all, not 5 x 3 s.
    assert!(took < Duration::from_secs(9), "took {took:?}");
    assert!(
        stderr(&o).contains("5 alerts: 0 delivered, 5 not delivered"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn replay_sends_alerts_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = Receiver::start(&[]);
    let secret = write(dir.path(), "hmac", SECRET);
    let cfg = write(
        dir.path(),
        "alerts.toml",
        &format!(
            "[[sinks.webhook]]\nname = \"public-keys\"\nurl = \"{}\"\nsecret_file = \"{}\"\ninclude_rules = [\"kms-policy-public\"]\n",
            hooks.url("/h"),
            secret.display()
        ),
    );
    let samples = repo().join("samples");
    let o = run(bin().args(["replay", "--format", "jsonl"]).arg(&samples));
    assert_eq!(o.status.code(), Some(0));
    assert!(hooks.requests().is_empty(), "no --alerts, no alert");
    let public = jsonl(&stdout(&o))
        .into_iter()
        .filter(|f| f["rule"] == "kms-policy-public")
        .count();
    assert_eq!(public, 1, "the samples hold one public key policy");

    let o = run(bin()
        .args(["replay", "--format", "jsonl", "--alerts"])
        .arg(&cfg)
        .arg(&samples));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let got = hooks.on("/h");
    assert_eq!(
        got.len(),
        1,
        "one alert for the one public policy: {}",
        stderr(&o)
    );
    assert!(got[0].signature_ok(SECRET));
    assert_eq!(
        got[0].json()["alert"]["finding"]["rule"],
        "kms-policy-public",
        "{}",
        got[0].json()
    );
}
