//! Alert channels fed by the daemon's outbox: the real `kmsguard run` against moto (S3 →
//! SQS), aiosmtpd and the HTTP receiver of `servers`, with CloudTrail files written here.
//! Covers routing by severity, grouping of a denied-decrypt burst, a relay that is down
//! then up, a webhook answering 500 then 200, `kill -9` with alerts pending, parking
//! with its health finding and `alerts retry`, and the latency from a finding's commit
//! to the channel accepting its alert.

use crate::daemon::{sigterm, sink, wait_exit, Trail};
use crate::servers::{Receiver, Smtp};
use crate::support::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

const SECRET: &str = "daemon-alerts-hmac-secret";
const ACCOUNT: &str = "111122223333";

/// One CloudTrail record by role `role` on key `key` (a key id).
fn record(id: &str, source: &str, name: &str, role: &str, key: &str, error: Option<&str>) -> Value {
    let key_arn = format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/{key}");
    let mut r = json!({
        "eventVersion": "1.09", "eventSource": source, "eventName": name,
        "eventTime": "2026-10-01T12:00:00Z", "awsRegion": "us-east-1", "eventID": id,
        "recipientAccountId": ACCOUNT, "sourceIPAddress": "203.0.113.9", "userAgent": "aws-cli/2.17.0",
        "userIdentity": {"type": "AssumedRole", "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/session"), "accountId": ACCOUNT,
            "sessionContext": {"sessionIssuer": {"type": "Role", "arn": format!("arn:aws:iam::{ACCOUNT}:role/{role}")}}},
        "requestParameters": {"keyId": key_arn.clone()},
        "resources": [{"type": "AWS::KMS::Key", "ARN": key_arn}]
    });
    if source == "cloudtrail.amazonaws.com" {
        r["requestParameters"] =
            json!({"name": format!("arn:aws:cloudtrail:us-east-1:{ACCOUNT}:trail/main")});
        r["resources"] = json!([]);
    }
    if let Some(code) = error {
        r["errorCode"] = json!(code);
        r["errorMessage"] = json!(format!("not authorized to perform kms:{name}"));
    }
    r
}

fn kms(id: &str, name: &str, role: &str, key: &str) -> Value {
    record(id, "kms.amazonaws.com", name, role, key, None)
}

fn gz(records: &[Value]) -> Vec<u8> {
    let doc = json!({ "Records": records });
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut e, doc.to_string().as_bytes()).unwrap();
    e.finish().unwrap()
}

async fn put(trail: &Trail, name: &str, records: &[Value]) {
    trail
        .put(
            format!("AWSLogs/{ACCOUNT}/CloudTrail/us-east-1/2026/10/01/{name}.json.gz"),
            gz(records),
        )
        .await;
}

fn email(name: &str, port: u16, extra: &str) -> String {
    format!(
        "\n[[sinks.email]]\nname = \"{name}\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\ntimeout = \"3s\"\nfrom = \"kmsguard <kmsguard@example.com>\"\nto = [\"oncall@example.com\"]\n{extra}\n"
    )
}

fn webhook(name: &str, url: &str, secret: &Path, extra: &str) -> String {
    format!(
        "\n[[sinks.webhook]]\nname = \"{name}\"\nurl = \"{url}\"\nsecret_file = \"{}\"\ntimeout = \"3s\"\n{extra}\n",
        secret.display()
    )
}

/// A daemon config with `channels` and metrics on `port`.
fn config(
    trail: &Trail,
    dir: &Path,
    port: u16,
    channels: &str,
    alerts: &str,
) -> std::path::PathBuf {
    std::fs::write(dir.join("hmac"), SECRET).unwrap();
    trail.config(
        dir,
        &format!("files_in_flight = 2\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[alerts]\n{alerts}\n{channels}"),
    )
}

pub fn get(port: u16, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    std::io::Write::write_all(
        &mut s,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).ok()?;
    Some(out)
}

/// The value of metric line `name` (with labels), or 0.
pub fn metric(port: u16, name: &str) -> f64 {
    get(port, "/metrics")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn log_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("daemon.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The daemon's own latency figure (commit -> accepted) of delivered alerts.
fn delivered_latencies(dir: &Path) -> Vec<(String, f64)> {
    log_lines(dir)
        .iter()
        .filter(|l| l["message"] == "alert delivered")
        .map(|l| {
            (
                l["channel"].as_str().unwrap_or("").to_string(),
                l["latency_ms"].as_f64().unwrap_or(-1.0),
            )
        })
        .collect()
}

fn stop(daemon: &mut Child) {
    sigterm(daemon);
    assert_eq!(
        wait_exit(daemon, Duration::from_secs(20)).0,
        Some(0),
        "SIGTERM exits 0"
    );
}

fn alert_id_of_mail(m: &Value) -> String {
    let h = m["x_kmsguard_alert"].as_str().unwrap_or("");
    h.split(';')
        .find_map(|p| p.trim().strip_prefix("id="))
        .unwrap_or("")
        .to_string()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn alerts_cmd(args: &[&str], cfg: &Path) -> std::process::Output {
    run(bin().arg("alerts").args(args).arg("--config").arg(cfg))
}

// ------------------------------------------------------------------------ tests ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_severity_reaches_its_channels_and_a_denied_burst_is_one_alert() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(free_port(), &work.path().join("mail"), None);
    let hooks = Receiver::start(&[]);
    let port = free_port();
    let secret = work.path().join("hmac");
    let channels = [
        email("mail", smtp.port, "min_severity = \"high\"\ngroup_wait = \"0s\""),
        webhook(
            "everything",
            &hooks.url("/all"),
            &secret,
            "min_severity = \"info\"\ngroup_by = [\"rule\", \"principal\"]\ngroup_wait = \"4s\"\nexclude_rules = [\"anomaly-*\"]",
        ),
        webhook(
            "limited",
            &hooks.url("/limited"),
            &secret,
            "min_severity = \"info\"\ngroup_wait = \"0s\"\nexclude_rules = [\"anomaly-*\"]\nrate_limit = { max = 2, per = \"1h\" }",
        ),
        format!(
            "\n[[sinks.webhook]]\nname = \"pager\"\nformat = \"pagerduty\"\nurl = \"{}\"\nrouting_key_env = \"KMSGUARD_TEST_PD_KEY\"\nmin_severity = \"critical\"\ngroup_wait = \"0s\"\n",
            hooks.url("/pd")
        ),
    ]
    .concat();
    let cfg = config(&trail, work.path(), port, &channels, "");
    let o = run(bin().arg("check-config").arg(&cfg));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("4 alert channel(s)"), "{}", stdout(&o));
    std::env::set_var("KMSGUARD_TEST_PD_KEY", "pd-routing-key");
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));

    // One finding of each severity, by five roles.
    put(
        &trail,
        "severities",
        &[
            kms("ev-info", "EnableKey", "r-info", "k-info"),
            record(
                "ev-low",
                "kms.amazonaws.com",
                "Decrypt",
                "r-low",
                "k-low",
                Some("AccessDeniedException"),
            ),
            kms("ev-medium", "DisableKeyRotation", "r-medium", "k-medium"),
            kms("ev-high", "DisableKey", "r-high", "k-high"),
            record(
                "ev-critical",
                "cloudtrail.amazonaws.com",
                "StopLogging",
                "r-critical",
                "-",
                None,
            ),
        ],
    )
    .await;
    // ctgen's denied-decrypt burst, in shape: 35 denied Decrypts by one role on 7 keys,
    // in two files.
    let burst: Vec<Value> = (0..35)
        .map(|i| {
            record(
                &format!("ev-burst-{i}"),
                "kms.amazonaws.com",
                "Decrypt",
                "svc-burst",
                &format!("k-burst-{}", i % 7),
                Some("AccessDeniedException"),
            )
        })
        .collect();
    put(&trail, "burst-1", &burst[..20]).await;
    put(&trail, "burst-2", &burst[20..]).await;

    let everything = || hooks.on("/all");
    wait_until("6 alerts on `everything`", Duration::from_secs(60), || {
        everything().len() >= 6
    })
    .await;
    let mails = smtp.wait_for(3, Duration::from_secs(30));
    wait_until("the page", Duration::from_secs(30), || {
        !hooks.on("/pd").is_empty()
    })
    .await;
    // Anything late would show up now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let suppressed = metric(
        port,
        "kmsguard_alerts_suppressed_total{channel=\"limited\"}",
    );
    let sent_limited = metric(port, "kmsguard_alerts_sent_total{channel=\"limited\"}");
    stop(&mut daemon);
    let log = std::fs::read_to_string(work.path().join("daemon.log")).unwrap();
    // 5 single findings and the burst, folded into one finding (by caller: it lists the
    // 7 keys it tried) and so one group: 6 alerts, 2 sent, 4 counted for the notice at
    // the end of the hour. The burst's second file is an update of the same finding,
    // not a new alert.
    assert_eq!(hooks.on("/limited").len(), 2);
    assert_eq!((sent_limited, suppressed), (2.0, 4.0));

    let rules_of = |reqs: &[crate::servers::Request]| -> BTreeMap<String, u64> {
        reqs.iter()
            .map(|r| {
                let a = &r.json()["alert"];
                (
                    a["finding"]["rule"].as_str().unwrap().to_string(),
                    a["group"]["count"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    let all = everything();
    assert!(all.iter().all(|r| r.signature_ok(SECRET)), "signed");
    assert_eq!(all.len(), 6, "{:?}\n{log}", rules_of(&all));
    let got = rules_of(&all);
    let want: BTreeMap<String, u64> = [
        ("kms-key-enabled", 1),
        ("kms-rotation-disabled", 1),
        ("kms-key-disabled", 1),
        ("cloudtrail-logging-stopped", 1),
    ]
    .into_iter()
    .map(|(r, n)| (r.to_string(), n))
    .collect();
    for (rule, n) in &want {
        assert_eq!(got.get(rule), Some(n), "{rule} on `everything`: {got:?}");
    }
    // kms-crypto-denied: the single low one (r-low) and the burst as one alert of 35.
    let denied: Vec<u64> = all
        .iter()
        .map(|r| r.json()["alert"].clone())
        .filter(|a| a["finding"]["rule"] == "kms-crypto-denied")
        .map(|a| a["group"]["count"].as_u64().unwrap())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(denied, vec![1, 35], "the burst is one alert with its count");

    // High and critical, plus the baseline detector's (high) burst anomaly: once.
    assert_eq!(mails.len(), 3, "{mails:#?}");
    let subjects: BTreeSet<&str> = mails
        .iter()
        .map(|m| m["subject"].as_str().unwrap())
        .collect();
    assert!(
        subjects
            .iter()
            .any(|s| s.starts_with("[kmsguard HIGH] A burst of denied KMS calls")),
        "{subjects:?}"
    );
    assert!(
        subjects
            .iter()
            .any(|s| s.starts_with("[kmsguard HIGH] KMS key disabled")),
        "{subjects:?}"
    );
    assert!(
        subjects
            .iter()
            .any(|s| s.starts_with("[kmsguard CRITICAL] CloudTrail logging stopped")),
        "{subjects:?}"
    );

    let pd = hooks.on("/pd");
    assert_eq!(pd.len(), 1);
    let page = pd[0].json();
    assert_eq!(page["routing_key"], "pd-routing-key");
    assert_eq!(page["payload"]["severity"], "critical");
    assert!(!log.contains("pd-routing-key"), "secrets stay out of logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_down_then_up_and_a_webhook_500_then_200_deliver_every_alert_once() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let smtp_port = free_port(); // nothing listens yet
    let hooks = Receiver::start(&[500, 500, 503]);
    let port = free_port();
    let channels = [
        email("mail", smtp_port, "group_wait = \"0s\""),
        webhook(
            "hook",
            &hooks.url("/h"),
            &work.path().join("hmac"),
            "group_wait = \"0s\"",
        ),
    ]
    .concat();
    let cfg = config(&trail, work.path(), port, &channels, "park_after = \"10m\"");
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    for i in 0..5 {
        put(
            &trail,
            &format!("f{i}"),
            &[kms(
                &format!("ev-{i}"),
                "DisableKey",
                "admin",
                &format!("key-{i}"),
            )],
        )
        .await;
    }
    wait_until("failed SMTP attempts", Duration::from_secs(60), || {
        metric(port, "kmsguard_alerts_failed_total{channel=\"mail\"}") >= 3.0
    })
    .await;
    wait_until("5 alerts queued for mail", Duration::from_secs(30), || {
        metric(port, "kmsguard_alerts_queued{channel=\"mail\"}") == 5.0
    })
    .await;
    assert!(metric(port, "kmsguard_alerts_outbox_age_seconds{channel=\"mail\"}") > 0.0);
    // The relay comes back.
    let smtp = Smtp::start(smtp_port, &work.path().join("mail"), None);
    let mails = smtp.wait_for(5, Duration::from_secs(60));
    wait_until("5 accepted webhooks", Duration::from_secs(60), || {
        hooks.on("/h").iter().filter(|r| r.status == 200).count() >= 5
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mails_after = smtp.messages();
    let sent_mail = metric(port, "kmsguard_alerts_sent_total{channel=\"mail\"}");
    let retried = metric(port, "kmsguard_alerts_retried_total{channel=\"mail\"}");
    stop(&mut daemon);

    assert_eq!(mails.len(), 5);
    assert_eq!(mails_after.len(), 5, "nothing delivered twice");
    let ids: BTreeSet<String> = mails_after.iter().map(alert_id_of_mail).collect();
    assert_eq!(ids.len(), 5, "five different alerts: {ids:?}");
    assert_eq!(sent_mail, 5.0);
    assert!(retried >= 1.0);

    let reqs = hooks.on("/h");
    assert_eq!(
        reqs.iter().filter(|r| r.status != 200).count(),
        3,
        "500, 500, 503"
    );
    let accepted: Vec<String> = reqs
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("x-kmsguard-alert-id").unwrap().to_string())
        .collect();
    let distinct: BTreeSet<&String> = accepted.iter().collect();
    assert_eq!(
        (accepted.len(), distinct.len()),
        (5, 5),
        "each alert accepted once"
    );
    // The refused alert was sent again with the same id (and signed afresh).
    let first = reqs[0].header("x-kmsguard-alert-id").unwrap().to_string();
    assert!(distinct.contains(&first));
    assert!(reqs.iter().all(|r| r.signature_ok(SECRET)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_with_alerts_pending_then_delivered_after_restart() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let smtp_port = free_port(); // down until after the restart
    let hooks = Receiver::start(&[]);
    let port = free_port();
    let channels = [
        email("mail", smtp_port, "group_wait = \"0s\""),
        // A group still waiting at the kill: its state must survive it.
        webhook(
            "slow",
            &hooks.url("/slow"),
            &work.path().join("hmac"),
            "group_by = [\"rule\"]\ngroup_wait = \"6s\"",
        ),
    ]
    .concat();
    let cfg = config(&trail, work.path(), port, &channels, "");
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    for i in 0..4 {
        put(
            &trail,
            &format!("f{i}"),
            &[kms(
                &format!("ev-{i}"),
                "DisableKey",
                "admin",
                &format!("key-{i}"),
            )],
        )
        .await;
    }
    // Wait for all four alerts queued for mail, asked through the control socket.
    let mut pending = Vec::new();
    let t0 = Instant::now();
    while pending
        .iter()
        .filter(|p: &&Value| p["channel"] == "mail")
        .count()
        < 4
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "alerts never queued: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let o = alerts_cmd(&["pending"], &cfg);
        pending = jsonl(&stdout(&o));
    }
    assert!(pending
        .iter()
        .all(|p| p["state"] == "queued" && p["severity"] == "high"));
    assert!(
        hooks.on("/slow").is_empty(),
        "the slow group is still waiting"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(hooks.on("/slow").is_empty(), "still waiting at the kill");
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();

    // With no daemon, `alerts pending` reads the state directory. (A routing commit made
    // in sled's 500 ms write-back window before a kill is rolled back whole: its
    // findings are back in the outbox and routed again after the restart. The kill came
    // later than that here, so all four are on disk.)
    let o = alerts_cmd(&["pending"], &cfg);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(jsonl(&stdout(&o)).len(), 4, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("mail: 4 queued, 0 parked"),
        "{}",
        stderr(&o)
    );

    let smtp = Smtp::start(smtp_port, &work.path().join("mail"), None);
    let mut daemon = trail.start(&cfg, &log);
    let mails = smtp.wait_for(4, Duration::from_secs(60));
    wait_until("the slow group's alert", Duration::from_secs(30), || {
        !hooks.on("/slow").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop(&mut daemon);
    assert_eq!(mails.len(), 4);
    let all = smtp.messages();
    let shown: Vec<(Value, Value)> = all
        .iter()
        .map(|m| (m["subject"].clone(), m["x_kmsguard_alert"].clone()))
        .collect();
    assert_eq!(all.len(), 4, "delivered once: {shown:#?}");
    let slow = hooks.on("/slow");
    assert_eq!(slow.len(), 1, "one alert for the group");
    assert_eq!(
        slow[0].json()["alert"]["group"]["count"],
        4,
        "all four joined it across the kill"
    );
    let o = alerts_cmd(&["pending"], &cfg);
    assert!(jsonl(&stdout(&o)).is_empty());
    // Everything also reached the file sink (which may repeat a finding written just
    // before the kill, with the same id).
    let ids: BTreeSet<String> = sink(work.path())
        .iter()
        .filter(|f| f["rule"] == "kms-key-disabled")
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_alerts_raise_a_health_finding_and_retry_requeues_them() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let smtp_port = free_port(); // down
    let hooks = Receiver::start(&[]);
    let port = free_port();
    let channels = [
        email("mail", smtp_port, "group_wait = \"0s\""),
        webhook(
            "hook",
            &hooks.url("/h"),
            &work.path().join("hmac"),
            "group_wait = \"0s\"\nexclude_rules = [\"kms-*\"]",
        ),
    ]
    .concat();
    let cfg = config(&trail, work.path(), port, &channels, "park_after = \"3s\"");
    // A bad [alerts] or channel table is refused with the key named.
    let bad = work.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("park_after = \"3s\"", "park_after = \"soon\"")
            .replace("to = [\"oncall@example.com\"]", "to = []"),
    )
    .unwrap();
    let o = run(bin().arg("check-config").arg(&bad));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("[alerts] park_after"), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("sinks.email[0].to: names no recipient"),
        "{}",
        stderr(&o)
    );

    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    put(
        &trail,
        "f",
        &[kms("ev-park", "DisableKey", "admin", "key-park")],
    )
    .await;
    wait_until("a parked alert", Duration::from_secs(60), || {
        metric(port, "kmsguard_alerts_parked{channel=\"mail\"}") == 1.0
    })
    .await;
    // The health finding reaches the file sink and the other channel, not the dead one.
    wait_until("the health finding", Duration::from_secs(30), || {
        sink(work.path())
            .iter()
            .any(|f| f["rule"] == "health-alerts-parked")
    })
    .await;
    let health: Vec<Value> = sink(work.path())
        .into_iter()
        .filter(|f| f["rule"] == "health-alerts-parked")
        .collect();
    assert_eq!(health.len(), 1);
    assert_eq!(health[0]["kind"], "health");
    assert_eq!(health[0]["severity"], "high");
    let summary = health[0]["summary"].as_str().unwrap();
    assert!(
        summary.contains("channel mail") && summary.contains("kmsguard alerts retry"),
        "{summary}"
    );
    wait_until(
        "the health alert on the webhook",
        Duration::from_secs(30),
        || !hooks.on("/h").is_empty(),
    )
    .await;
    assert_eq!(
        hooks.on("/h")[0].json()["alert"]["finding"]["rule"],
        "health-alerts-parked"
    );
    assert_eq!(
        metric(port, "kmsguard_alerts_parked_total{channel=\"mail\"}"),
        1.0
    );

    // `alerts pending` through the running daemon: one parked alert, exit 1.
    let o = alerts_cmd(&["pending"], &cfg);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let p = jsonl(&stdout(&o));
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0]["channel"].as_str(), p[0]["state"].as_str()),
        (Some("mail"), Some("parked"))
    );
    assert!(
        p[0]["last_error"].as_str().unwrap().contains("transient"),
        "{p:?}"
    );
    let o = alerts_cmd(&["retry", "nosuch"], &cfg);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no channel named `nosuch`"),
        "{}",
        stderr(&o)
    );

    // The relay is back; retry re-queues and the alert goes out.
    let smtp = Smtp::start(smtp_port, &work.path().join("mail"), None);
    let o = alerts_cmd(&["retry", "mail"], &cfg);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("1 parked alert(s) re-queued on mail"),
        "{}",
        stderr(&o)
    );
    let mails = smtp.wait_for(1, Duration::from_secs(30));
    assert_eq!(mails.len(), 1);
    assert!(mails[0]["subject"]
        .as_str()
        .unwrap()
        .contains("KMS key disabled"));
    // The entry leaves the queue just after the relay's 250.
    wait_until("an empty queue", Duration::from_secs(10), || {
        let o = alerts_cmd(&["pending"], &cfg);
        o.status.code() == Some(0) && jsonl(&stdout(&o)).is_empty()
    })
    .await;
    // `alerts test` takes the daemon's config too.
    let o = alerts_cmd(&["test", "mail"], &cfg);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(&mut daemon);
    assert_eq!(
        smtp.messages().len(),
        2,
        "the retried alert and the test alert"
    );
    assert_eq!(
        sink(work.path())
            .iter()
            .filter(|f| f["rule"] == "health-alerts-parked")
            .count(),
        1,
        "parked once, reported once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_latency_from_commit_to_accepted() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(free_port(), &work.path().join("mail"), None);
    let hooks = Receiver::start(&[]);
    let port = free_port();
    let channels = [
        email("mail", smtp.port, "group_wait = \"0s\""),
        webhook(
            "hook",
            &hooks.url("/h"),
            &work.path().join("hmac"),
            "group_wait = \"0s\"",
        ),
    ]
    .concat();
    let cfg = config(&trail, work.path(), port, &channels, "");
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    let n = 20;
    let mut put_to_mail = Vec::new();
    for i in 0..n {
        put(
            &trail,
            &format!("lat-{i}"),
            &[kms(
                &format!("ev-lat-{i}"),
                "DisableKey",
                "admin",
                &format!("key-lat-{i}"),
            )],
        )
        .await;
        let t0 = Instant::now();
        wait_until("the mail", Duration::from_secs(30), || {
            smtp.messages().len() > i
        })
        .await;
        put_to_mail.push(t0.elapsed().as_secs_f64() * 1000.0);
        wait_until("the webhook", Duration::from_secs(30), || {
            hooks.on("/h").len() > i
        })
        .await;
    }
    stop(&mut daemon);
    let lat = delivered_latencies(work.path());
    let mut mail: Vec<f64> = lat
        .iter()
        .filter(|(c, _)| c == "mail")
        .map(|(_, l)| *l)
        .collect();
    let mut hook: Vec<f64> = lat
        .iter()
        .filter(|(c, _)| c == "hook")
        .map(|(_, l)| *l)
        .collect();
    assert_eq!((mail.len(), hook.len()), (n, n));
    assert!(mail.iter().chain(&hook).all(|l| *l >= 0.0));
    eprintln!(
        "alert latency, finding committed -> accepted (n = {n}): SMTP 250 median {:.0} ms, p99 {:.0} ms; HTTP 2xx median {:.0} ms, p99 {:.0} ms; PutObject -> SMTP 250 median {:.0} ms, p99 {:.0} ms",
        percentile(&mut mail, 0.5),
        percentile(&mut mail, 0.99),
        percentile(&mut hook, 0.5),
        percentile(&mut hook, 0.99),
        percentile(&mut put_to_mail, 0.5),
        percentile(&mut put_to_mail, 0.99),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_a_log_make_a_safe_email() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let smtp = Smtp::start(free_port(), &work.path().join("mail"), None);
    let rules = work.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nid = \"any-decrypt\"\ntitle = \"Any Decrypt\"\nseverity = \"high\"\ndescription = \"d\"\nevent_names = [\"Decrypt\"]\nsummary = \"UA {user_agent}\"\n",
    )
    .unwrap();
    let channels = email(
        "mail",
        smtp.port,
        "group_wait = \"0s\"\nsubject = \"[kmsguard {SEVERITY}] {title} {principal} {key}\"",
    );
    let cfg = config(
        &trail,
        work.path(),
        free_port(),
        &format!("{channels}\n[rules]\npath = \"{}\"\n", rules.display()),
        "",
    );
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    trail
        .put(
            format!("AWSLogs/{ACCOUNT}/CloudTrail/us-east-1/2026/10/01/control-chars.json.gz"),
            std::fs::read(malformed().join("control-chars.json.gz")).unwrap(),
        )
        .await;
    let mails = smtp.wait_for(1, Duration::from_secs(60));
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop(&mut daemon);
    assert_eq!(mails.len(), 1);
    let m = &mails[0];
    let names: BTreeSet<&str> = m["header_names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
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
    assert_eq!(names, expected, "no extra headers");
    assert_eq!(
        m["rcpt_tos"],
        json!(["oncall@example.com"]),
        "no extra recipients"
    );
    let subject = m["subject"].as_str().unwrap();
    assert!(
        subject.starts_with("[kmsguard HIGH] Any Decrypt"),
        "{subject}"
    );
    assert!(!subject.contains(['\r', '\n', '\0']), "{subject:?}");
    let html = m["html"].as_str().unwrap();
    assert!(!html.contains("<script>") && !html.contains('\0'), "{html}");
    let text = m["text"].as_str().unwrap();
    assert!(!text.contains('\0') && !text.contains("\r\nBcc"), "{text}");
    assert!(text.contains("\\r\\nBcc"), "shown escaped: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_alert_is_parked_at_once_and_not_retried() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let strict = Receiver::start(&[400]);
    let ops = Receiver::start(&[]);
    let port = free_port();
    let secret = work.path().join("hmac");
    let channels = [
        webhook("strict", &strict.url("/s"), &secret, "group_wait = \"0s\""),
        webhook(
            "ops",
            &ops.url("/o"),
            &secret,
            "group_wait = \"0s\"\ninclude_rules = [\"health-*\"]",
        ),
    ]
    .concat();
    let cfg = config(&trail, work.path(), port, &channels, "park_after = \"1h\"");
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    put(
        &trail,
        "f",
        &[kms("ev-400", "DisableKey", "admin", "key-400")],
    )
    .await;
    wait_until("the health alert on ops", Duration::from_secs(60), || {
        !ops.on("/o").is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let parked = metric(port, "kmsguard_alerts_parked_total{channel=\"strict\"}");
    stop(&mut daemon);
    assert_eq!(strict.on("/s").len(), 1, "a 400 is not retried");
    assert_eq!(parked, 1.0);
    let health = ops.on("/o")[0].json();
    assert_eq!(health["alert"]["finding"]["rule"], "health-alerts-parked");
    let summary = health["alert"]["finding"]["summary"].as_str().unwrap();
    assert!(
        summary.contains("channel strict") && summary.contains("refused"),
        "{summary}"
    );
    let o = alerts_cmd(&["pending"], &cfg);
    assert_eq!(o.status.code(), Some(1));
    let p = jsonl(&stdout(&o));
    assert_eq!(p.len(), 1);
    assert!(
        p[0]["last_error"]
            .as_str()
            .unwrap()
            .starts_with("permanent"),
        "{p:?}"
    );
}
