//! Automatic remediation against moto's KMS: real keys are changed for the worse with the
//! SDK, a CloudTrail record of that change (ctgen-shaped, with the real key ARN and grant
//! id) goes through S3 and SQS to the real daemon, and the key must come back to its safe
//! state (checked with DescribeKey, GetKeyRotationStatus, ListGrants, GetKeyPolicy).

use crate::daemon::{sigterm, sink, wait_exit, Trail};
use crate::daemon_alerts::{get, metric};
use crate::support::*;
use aws_sdk_kms::types::GrantOperation;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

/// moto's default account.
const ACCOUNT: &str = "123456789012";

fn now_iso() -> String {
    kmsguard::inventory::format_time(kmsguard::inventory::now_secs())
}

/// One CloudTrail record shaped like ctgen's (an admin's assumed role changing a key).
fn record(
    event_id: &str,
    time: &str,
    name: &str,
    key_arn: &str,
    params: Value,
    response: Value,
) -> Value {
    json!({
        "eventVersion": "1.09",
        "userIdentity": {"type": "AssumedRole", "principalId": "AROAEXAMPLE:mallory",
            "arn": format!("arn:aws:sts::{ACCOUNT}:assumed-role/admin/mallory"), "accountId": ACCOUNT,
            "sessionContext": {"sessionIssuer": {"type": "Role", "arn": format!("arn:aws:iam::{ACCOUNT}:role/admin"), "accountId": ACCOUNT}}},
        "eventTime": time, "eventSource": "kms.amazonaws.com", "eventName": name,
        "awsRegion": "us-east-1", "sourceIPAddress": "203.0.113.66", "userAgent": "aws-cli/2.17.0",
        "requestParameters": params, "responseElements": response,
        "requestID": format!("req-{event_id}"), "eventID": event_id, "readOnly": false,
        "eventType": "AwsApiCall", "managementEvent": true, "recipientAccountId": ACCOUNT,
        "eventCategory": "Management",
        "resources": [{"accountId": ACCOUNT, "type": "AWS::KMS::Key", "ARN": key_arn}]
    })
}

fn gz_file(records: &[Value]) -> Vec<u8> {
    let doc = json!({ "Records": records });
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, doc.to_string().as_bytes()).unwrap();
    gz.finish().unwrap()
}

fn object_key(name: &str) -> String {
    format!("AWSLogs/{ACCOUNT}/CloudTrail/us-east-1/2026/11/29/{ACCOUNT}_CloudTrail_us-east-1_{name}.json.gz")
}

async fn kms(trail: &Trail) -> aws_sdk_kms::Client {
    kmsguard::aws::kms_client(&trail.moto.sdk("us-east-1").await, None)
}

/// A trail whose moto records every request it receives in `file` (moto's own request
/// recorder): what kmsguard really sent, whatever its reports say.
async fn recorded_trail(file: &Path) -> Trail {
    let path = file.to_str().unwrap();
    Trail::new_with(&[
        ("MOTO_ENABLE_RECORDING", "1"),
        ("MOTO_RECORDER_FILEPATH", path),
    ])
    .await
}

/// The KMS requests moto recorded, in the order received: (operation, JSON body).
fn kms_requests(file: &Path) -> Vec<(String, Value)> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| {
            let op = r["headers"]["X-Amz-Target"]
                .as_str()?
                .strip_prefix("TrentService.")?
                .to_string();
            let body = r["body"].as_str().unwrap_or("");
            let bytes = if r["body_encoded"] == true {
                base64_decode(body)
            } else {
                body.as_bytes().to_vec()
            };
            Some((op, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
        })
        .collect()
}

/// Standard base64 (moto's recorder encodes binary bodies so).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for v in text.bytes().filter_map(value) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// A new key, optionally tagged `kmsguard:protect=true`; returns (id, ARN).
async fn key(kms: &aws_sdk_kms::Client, protect: bool) -> (String, String) {
    let mut req = kms.create_key().description("kmsguard remediation test");
    if protect {
        req = req.tags(
            aws_sdk_kms::types::Tag::builder()
                .tag_key("kmsguard:protect")
                .tag_value("true")
                .build()
                .unwrap(),
        );
    }
    let m = req.send().await.unwrap().key_metadata.unwrap();
    (m.key_id, m.arn.unwrap())
}

async fn state(kms: &aws_sdk_kms::Client, id: &str) -> String {
    kms.describe_key()
        .key_id(id)
        .send()
        .await
        .unwrap()
        .key_metadata
        .unwrap()
        .key_state
        .unwrap()
        .as_str()
        .to_string()
}

async fn rotation(kms: &aws_sdk_kms::Client, id: &str) -> bool {
    kms.get_key_rotation_status()
        .key_id(id)
        .send()
        .await
        .unwrap()
        .key_rotation_enabled
}

async fn grant_ids(kms: &aws_sdk_kms::Client, id: &str) -> Vec<String> {
    kms.list_grants()
        .key_id(id)
        .send()
        .await
        .unwrap()
        .grants
        .unwrap_or_default()
        .into_iter()
        .filter_map(|g| g.grant_id)
        .collect()
}

async fn policy(kms: &aws_sdk_kms::Client, id: &str) -> String {
    kms.get_key_policy()
        .key_id(id)
        .policy_name("default")
        .send()
        .await
        .unwrap()
        .policy
        .unwrap_or_default()
}

/// Polls a condition (an expression with `.await`s) until it holds; gives how long it took.
macro_rules! until {
    ($what:expr, $cond:expr) => {{
        let t0 = Instant::now();
        while !$cond {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{} did not happen in 60 s",
                $what
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t0.elapsed()
    }};
}

fn remediations(findings: &[Value]) -> Vec<&Value> {
    findings
        .iter()
        .filter(|f| f["kind"] == "remediation")
        .collect()
}

fn remediation_for<'a>(findings: &'a [Value], event_id: &str) -> Option<&'a Value> {
    remediations(findings)
        .into_iter()
        .find(|f| strs(&f["event_ids"]).iter().any(|e| e == event_id))
}

async fn wait_remediation(dir: &Path, event_id: &str) -> Value {
    let t0 = Instant::now();
    loop {
        if let Some(f) = remediation_for(&sink(dir), event_id) {
            return f.clone();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no remediation finding for {event_id}: {:#?}",
            sink(dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const PUBLIC_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"root","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"kms:*","Resource":"*"},{"Sid":"anyone","Effect":"Allow","Principal":{"AWS":"*"},"Action":"kms:Decrypt","Resource":"*"}]}"#;

const SAFE_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"root","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::{account}:root"},"Action":"kms:*","Resource":"*"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_enforce_restores_every_key_and_leaves_out_of_scope_keys_alone() {
    let trail = Trail::new().await;
    let kms = kms(&trail).await;
    let work = tempfile::tempdir().unwrap();
    let safe = work.path().join("safe-policy.json");
    std::fs::write(&safe, SAFE_POLICY).unwrap();
    let cfg = trail.config(
        work.path(),
        &format!(
            "files_in_flight = 2\n\n[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\nrequire_tag = \"kmsguard:protect=true\"\nsafe_policy_file = \"{}\"\nretry_base_ms = 50\n",
            safe.display()
        ),
    );
    let o = run(bin().args(["check-config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));

    let (del, del_arn) = key(&kms, true).await;
    let (dis, dis_arn) = key(&kms, true).await;
    let (rot, rot_arn) = key(&kms, true).await;
    let (gr, gr_arn) = key(&kms, true).await;
    let (pol, pol_arn) = key(&kms, true).await;
    let (out, out_arn) = key(&kms, false).await;
    kms.enable_key_rotation().key_id(&rot).send().await.unwrap();

    // The bad changes, made for real.
    kms.schedule_key_deletion()
        .key_id(&del)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    kms.disable_key().key_id(&dis).send().await.unwrap();
    kms.disable_key_rotation()
        .key_id(&rot)
        .send()
        .await
        .unwrap();
    let grant = kms
        .create_grant()
        .key_id(&gr_arn)
        .grantee_principal("arn:aws:iam::999988887777:role/partner")
        .operations(GrantOperation::Decrypt)
        .send()
        .await
        .unwrap()
        .grant_id
        .unwrap();
    kms.put_key_policy()
        .key_id(&pol)
        .policy_name("default")
        .policy(PUBLIC_POLICY)
        .send()
        .await
        .unwrap();
    kms.disable_key().key_id(&out).send().await.unwrap();
    assert_eq!(state(&kms, &del).await, "PendingDeletion");

    let t = now_iso();
    let deletion = iso_in_days(7);
    let events = [
        (
            "ev-del",
            record(
                "ev-del",
                &t,
                "ScheduleKeyDeletion",
                &del_arn,
                json!({"keyId": del, "pendingWindowInDays": 7}),
                json!({"keyId": del_arn, "deletionDate": deletion, "keyState": "PendingDeletion", "pendingWindowInDays": 7}),
            ),
        ),
        (
            "ev-dis",
            record(
                "ev-dis",
                &t,
                "DisableKey",
                &dis_arn,
                json!({"keyId": dis}),
                Value::Null,
            ),
        ),
        (
            "ev-rot",
            record(
                "ev-rot",
                &t,
                "DisableKeyRotation",
                &rot_arn,
                json!({"keyId": rot_arn}),
                Value::Null,
            ),
        ),
        (
            "ev-grant",
            record(
                "ev-grant",
                &t,
                "CreateGrant",
                &gr_arn,
                json!({"keyId": gr_arn, "granteePrincipal": "arn:aws:iam::999988887777:role/partner", "operations": ["Decrypt"]}),
                json!({"grantId": grant, "keyId": gr_arn}),
            ),
        ),
        (
            "ev-pol",
            record(
                "ev-pol",
                &t,
                "PutKeyPolicy",
                &pol_arn,
                json!({"keyId": pol, "policyName": "default", "policy": PUBLIC_POLICY, "bypassPolicyLockoutSafetyCheck": false}),
                Value::Null,
            ),
        ),
        (
            "ev-out",
            record(
                "ev-out",
                &t,
                "DisableKey",
                &out_arn,
                json!({"keyId": out}),
                Value::Null,
            ),
        ),
    ];
    // One file per change, each timed from its upload (which sends the SQS message)
    // to the key being back.
    let mut latencies = Vec::new();
    for (id, rec) in &events {
        // The deleted key's CreateKey is in CloudTrail too: it shows the key was Enabled
        // before, so it is enabled again after the deletion is cancelled.
        let mut recs = vec![rec.clone()];
        if *id == "ev-del" {
            recs.insert(0, create_record("ev-del-create", &t, &del, &del_arn));
        }
        let t0 = Instant::now();
        trail.put(object_key(id), gz_file(&recs)).await;
        let took = match *id {
            "ev-del" => until!(id, state(&kms, &del).await == "Enabled"),
            "ev-dis" => until!(id, state(&kms, &dis).await == "Enabled"),
            "ev-rot" => until!(id, rotation(&kms, &rot).await),
            "ev-grant" => until!(id, grant_ids(&kms, &gr).await.is_empty()),
            "ev-pol" => until!(id, !policy(&kms, &pol).await.contains(r#""AWS":"*""#)),
            _ => {
                wait_remediation(work.path(), id).await;
                continue;
            }
        };
        latencies.push((id.to_string(), t0.elapsed().max(took)));
    }
    trail.wait_drained(Duration::from_secs(60)).await;
    for (id, _) in &events {
        wait_remediation(work.path(), id).await;
    }
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));

    // Safe states, read back from KMS.
    assert_eq!(
        state(&kms, &del).await,
        "Enabled",
        "deletion cancelled and key re-enabled"
    );
    assert_eq!(state(&kms, &dis).await, "Enabled");
    assert!(rotation(&kms, &rot).await);
    assert!(
        grant_ids(&kms, &gr).await.is_empty(),
        "the foreign grant is revoked"
    );
    let restored = policy(&kms, &pol).await;
    assert_eq!(
        restored,
        SAFE_POLICY.replace("{account}", ACCOUNT),
        "the safe policy is restored"
    );
    assert_eq!(
        state(&kms, &out).await,
        "Disabled",
        "out-of-scope key untouched"
    );

    let findings = sink(work.path());
    for (id, calls) in [
        ("ev-del", vec!["CancelKeyDeletion", "EnableKey"]),
        ("ev-dis", vec!["EnableKey"]),
        ("ev-rot", vec!["EnableKeyRotation"]),
        ("ev-grant", vec!["RevokeGrant"]),
        ("ev-pol", vec!["PutKeyPolicy"]),
    ] {
        let f = remediation_for(&findings, id).unwrap();
        let a = &f["action"];
        assert_eq!(a["outcome"], "performed", "{f}");
        assert_eq!(a["mode"], "enforce");
        let got: Vec<&str> = a["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["operation"].as_str().unwrap())
            .collect();
        assert_eq!(got, calls, "{f}");
        for c in a["calls"].as_array().unwrap() {
            assert_eq!(c["sent"], true);
            assert!(
                c["request_id"].as_str().is_some_and(|r| !r.is_empty()),
                "request id recorded: {f}"
            );
        }
        assert!(!a["before"].as_object().unwrap().is_empty(), "{f}");
        assert!(!a["after"].as_object().unwrap().is_empty(), "{f}");
        // It names its trigger: the rule finding of the same event.
        let trigger = findings
            .iter()
            .find(|t| {
                t["kind"] == "rule"
                    && strs(&t["event_ids"]) == vec![id.to_string()]
                    && t["remediation"].is_string()
            })
            .unwrap();
        assert_eq!(a["trigger"], trigger["id"]);
    }
    let grant_rem = &remediation_for(&findings, "ev-grant").unwrap()["action"];
    assert_eq!(grant_rem["calls"][0]["params"]["grantId"], grant.as_str());
    assert_eq!(grant_rem["before"]["grant_present"], "true");
    assert_eq!(grant_rem["after"]["grant_present"], "false");
    let del_rem = &remediation_for(&findings, "ev-del").unwrap()["action"];
    assert_eq!(del_rem["before"]["key_state"], "PendingDeletion");
    assert_eq!(del_rem["after"]["key_state"], "Enabled");
    assert_eq!(del_rem["before"]["state_before_event"], "Enabled");
    assert_eq!(
        del_rem["before"]["state_before_source"],
        format!("event CreateKey ev-del-create at {t}")
    );
    let out_rem = remediation_for(&findings, "ev-out").unwrap();
    assert_eq!(out_rem["action"]["outcome"], "skipped");
    assert!(
        out_rem["action"]["reason"]
            .as_str()
            .unwrap()
            .contains("out of scope"),
        "{out_rem}"
    );
    assert!(
        out_rem["action"]["calls"].as_array().unwrap().is_empty(),
        "nothing planned for an out-of-scope key"
    );
    latencies.sort_by_key(|(_, d)| *d);
    eprintln!(
        "remediation: upload (SQS message) -> key back to its safe state: {}",
        latencies
            .iter()
            .map(|(id, d)| format!("{id} {} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "remediation: engine time, first read to last change answered: {}",
        events
            .iter()
            .filter_map(|(id, _)| remediation_for(&findings, id).and_then(|f| {
                let a = &f["action"];
                let all: Vec<&Value> = a["reads"]
                    .as_array()?
                    .iter()
                    .chain(a["calls"].as_array()?.iter())
                    .collect();
                let attempts: u64 = all.iter().filter_map(|c| c["attempts"].as_u64()).sum();
                let errors: Vec<&str> = all.iter().filter_map(|c| c["error"].as_str()).collect();
                Some(format!(
                    "{id} {} ms ({} calls, {attempts} attempts{})",
                    a["elapsed_ms"].as_u64()?,
                    all.len(),
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(", errors: {errors:?}")
                    }
                ))
            }))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// `kmsguard replay --format jsonl --no-baselines --remediate --config CFG DIR` with the
/// AWS endpoint of `env`: it must succeed; its findings and its stderr.
fn replay_remediate(
    cfg: &Path,
    dir: &Path,
    env: Vec<(&'static str, String)>,
) -> (Vec<Value>, String) {
    let o = run(bin()
        .args([
            "replay",
            "--format",
            "jsonl",
            "--no-baselines",
            "--remediate",
            "--config",
        ])
        .arg(cfg)
        .arg(dir)
        .envs(env));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    (jsonl(&stdout(&o)), stderr(&o))
}

fn iso_in_days(days: i64) -> String {
    kmsguard::inventory::format_time(kmsguard::inventory::now_secs() + days * 86_400)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_dry_run_rate_limit_failures_and_the_remediate_command() {
    let work = tempfile::tempdir().unwrap();
    let recording = work.path().join("moto-requests.jsonl");
    let trail = recorded_trail(&recording).await;
    let kms = kms(&trail).await;
    let port = free_port();
    // Dry-run by default; DisableKey enforced with a budget of 2 actions an hour; one
    // failed action opens the breaker (for the default 900 s).
    let config_text = |cooldown: &str| {
        format!(
            "files_in_flight = 1\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[remediation]\naccounts = [\"{ACCOUNT}\"]\nmax_actions_per_hour = 2\nbreaker_failures = 1\nretries = 2\nretry_base_ms = 20\n{cooldown}\n[remediation.rules]\nkms-key-disabled = \"enforce\"\n"
        )
    };
    let cfg = trail.config(work.path(), &config_text(""));
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    let (del, del_arn) = key(&kms, false).await;
    kms.schedule_key_deletion()
        .key_id(&del)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    let mut disabled = Vec::new();
    for _ in 0..3 {
        let (id, arn) = key(&kms, false).await;
        kms.disable_key().key_id(&id).send().await.unwrap();
        disabled.push((id, arn));
    }
    let t = now_iso();
    let mut records = vec![record(
        "ev-dry-del",
        &t,
        "ScheduleKeyDeletion",
        &del_arn,
        json!({"keyId": del, "pendingWindowInDays": 7}),
        json!({"keyId": del_arn, "deletionDate": iso_in_days(7), "keyState": "PendingDeletion", "pendingWindowInDays": 7}),
    )];
    // A key that is fine already: skipped, and it takes no rate-limit slot.
    let (fine, fine_arn) = key(&kms, false).await;
    records.push(record(
        "ev-fine",
        &t,
        "DisableKey",
        &fine_arn,
        json!({"keyId": fine}),
        Value::Null,
    ));
    for (i, (id, arn)) in disabled.iter().enumerate() {
        records.push(record(
            &format!("ev-rl-{i}"),
            &t,
            "DisableKey",
            arn,
            json!({"keyId": id}),
            Value::Null,
        ));
    }
    trail.put(object_key("batch"), gz_file(&records)).await;
    for id in ["ev-dry-del", "ev-fine", "ev-rl-0", "ev-rl-1", "ev-rl-2"] {
        wait_remediation(work.path(), id).await;
    }

    // Dry-run: planned, nothing sent, the key still pending deletion.
    let findings = sink(work.path());
    let dry = &remediation_for(&findings, "ev-dry-del").unwrap()["action"];
    assert_eq!(dry["outcome"], "planned", "{dry}");
    assert_eq!(dry["mode"], "dry-run");
    let planned: Vec<(&str, bool)> = dry["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["operation"].as_str().unwrap(),
                c["sent"].as_bool().unwrap(),
            )
        })
        .collect();
    // Nothing says the key was Enabled before (no inventory, no earlier event): the
    // deletion is cancelled, the key left Disabled, and the report says why.
    assert_eq!(planned, vec![("CancelKeyDeletion", false)]);
    assert_eq!(dry["before"]["state_before_event"], "unknown", "{dry}");
    assert!(
        dry["before"]["state_before_source"]
            .as_str()
            .unwrap()
            .starts_with("none: "),
        "{dry}"
    );
    assert_eq!(
        state(&kms, &del).await,
        "PendingDeletion",
        "dry-run changed nothing"
    );

    let fine_rem = &remediation_for(&findings, "ev-fine").unwrap()["action"];
    assert_eq!(fine_rem["outcome"], "skipped");
    assert_eq!(fine_rem["reason"], "already fine: the key is enabled");
    assert!(fine_rem["calls"].as_array().unwrap().is_empty());

    // Rate limit: 2 of the 3 disabled keys re-enabled, the third skipped and left.
    let mut enabled = 0;
    for (id, _) in &disabled {
        enabled += usize::from(state(&kms, id).await == "Enabled");
    }
    assert_eq!(enabled, 2, "max_actions_per_hour = 2 holds");
    let outcomes: Vec<String> = (0..3)
        .map(|i| {
            let a = &remediation_for(&findings, &format!("ev-rl-{i}")).unwrap()["action"];
            format!(
                "{}: {}",
                a["outcome"].as_str().unwrap(),
                a["reason"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| o.starts_with("performed"))
            .count(),
        2,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| o.starts_with("skipped: rate limit")),
        "{outcomes:?}"
    );

    // A failing call: a key that does not exist. Retried, then reported as failed, and
    // (breaker_failures = 1) a health finding says remediation stopped.
    let ghost = format!("arn:aws:kms:us-east-1:{ACCOUNT}:key/00000000-0000-4000-8000-00000000dead");
    trail
        .put(
            object_key("ghost"),
            gz_file(&[record(
                "ev-ghost",
                &t,
                "DisableKey",
                &ghost,
                json!({"keyId": ghost}),
                Value::Null,
            )]),
        )
        .await;
    let f = wait_remediation(work.path(), "ev-ghost").await;
    let a = &f["action"];
    assert_eq!(a["outcome"], "failed", "{f}");
    assert_eq!(a["reads"][0]["operation"], "DescribeKey");
    assert_eq!(a["reads"][0]["attempts"], 3, "2 retries: {f}");
    assert!(
        a["reads"][0]["request_id"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "the last attempt's request id: {f}"
    );
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .starts_with("cannot read the key's state (DescribeKey failed after 3 attempt(s)): NotFoundException"),
        "{f}"
    );
    assert_eq!(
        a["reads"].as_array().unwrap().len(),
        1,
        "nothing after the failed read: {f}"
    );
    assert!(a["calls"].as_array().unwrap().is_empty(), "{f}");
    // moto saw exactly those three DescribeKey requests for the key, and no change.
    let ghost_id = ghost.rsplit('/').next().unwrap();
    let sent: Vec<String> = kms_requests(&recording)
        .into_iter()
        .filter(|(_, body)| {
            body["KeyId"]
                .as_str()
                .is_some_and(|k| k.ends_with(ghost_id))
        })
        .map(|(op, _)| op)
        .collect();
    assert_eq!(sent, vec!["DescribeKey"; 3], "requests moto received");
    assert!(
        a["reads"][0]["error"]
            .as_str()
            .unwrap()
            .contains("NotFound"),
        "{f}"
    );
    assert_eq!(f["severity"], "high");
    // breaker_failures = 1: that failure stopped remediation, and said so.
    let t0 = Instant::now();
    while !sink(work.path())
        .iter()
        .any(|f| f["rule"] == "health-remediation-breaker")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no breaker health finding"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let health = sink(work.path())
        .into_iter()
        .find(|f| f["rule"] == "health-remediation-breaker")
        .unwrap();
    assert_eq!(health["kind"], "health");
    assert!(
        health["summary"]
            .as_str()
            .unwrap()
            .contains("1 consecutive failed actions"),
        "{health}"
    );

    // The metrics count every outcome and show the open breaker.
    let t0 = Instant::now();
    let want = [
        (r#"{action="enable-key",outcome="performed"}"#, 2.0),
        (r#"{action="enable-key",outcome="skipped"}"#, 2.0),
        (r#"{action="enable-key",outcome="failed"}"#, 1.0),
        (r#"{action="cancel-key-deletion",outcome="planned"}"#, 1.0),
    ];
    let counts = || {
        want.iter()
            .map(|(l, _)| metric(port, &format!("kmsguard_remediation_actions_total{l}")))
            .collect::<Vec<f64>>()
    };
    while counts() != want.iter().map(|w| w.1).collect::<Vec<_>>() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "remediation metrics: {:?}\n{}",
            counts(),
            get(port, "/metrics").unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(port, "kmsguard_remediation_breaker_open"), 1.0);
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));

    // `kmsguard remediate --dry-run ID`: the plan for the deletion finding, from the sink.
    let findings = sink(work.path());
    let trigger = findings
        .iter()
        .find(|f| f["kind"] == "rule" && f["rule"] == "kms-key-deletion-scheduled")
        .unwrap();
    let o = run(bin()
        .args([
            "remediate",
            "--dry-run",
            trigger["id"].as_str().unwrap(),
            "--config",
        ])
        .arg(&cfg)
        .envs(trail.moto.env()));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let shown = jsonl(&stdout(&o));
    assert_eq!(shown.len(), 1, "{}", stdout(&o));
    assert_eq!(shown[0]["action"]["outcome"], "planned");
    assert_eq!(
        shown[0]["action"]["calls"][0]["operation"],
        "CancelKeyDeletion"
    );
    assert_eq!(state(&kms, &del).await, "PendingDeletion");
    let o = run(bin()
        .args(["remediate", "--dry-run", "no-such-id", "--config"])
        .arg(&cfg)
        .envs(trail.moto.env()));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no finding with id no-such-id"),
        "{}",
        stderr(&o)
    );

    // The open breaker survives a restart (kept in the state store) ...
    let (late, late_arn) = key(&kms, false).await;
    kms.disable_key().key_id(&late).send().await.unwrap();
    let late_file = |id: &str| {
        gz_file(&[record(
            id,
            &now_iso(),
            "DisableKey",
            &late_arn,
            json!({"keyId": late}),
            Value::Null,
        )])
    };
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    trail
        .put(object_key("after-restart"), late_file("ev-late"))
        .await;
    let f = wait_remediation(work.path(), "ev-late").await;
    assert_eq!(metric(port, "kmsguard_remediation_breaker_open"), 1.0);
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));
    assert_eq!(f["action"]["outcome"], "skipped", "{f}");
    assert!(
        f["action"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("circuit breaker open"),
        "{f}"
    );
    assert_eq!(state(&kms, &late).await, "Disabled");

    // ... and so does the hour's budget: with a 1 s cooldown (counted from when the
    // breaker opened, now over), the breaker is closed and the rate limit says no. Shown
    // by `replay --remediate` on the daemon's state directory (a third daemon start
    // would wait out the visibility timeout: moto hands the next message to the stopped
    // daemon's pending long poll).
    trail.config(work.path(), &config_text("breaker_cooldown_secs = 1\n"));
    let dir = work.path().join("replay");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("late.json.gz"), late_file("ev-late-2")).unwrap();
    let o = run(bin()
        .args(["replay", "--format", "jsonl", "--remediate", "--config"])
        .arg(&cfg)
        .arg("--state")
        .arg(work.path().join("state"))
        .arg(&dir)
        .envs(trail.moto.env()));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = jsonl(&stdout(&o));
    let f = remediation_for(&out, "ev-late-2").unwrap();
    assert_eq!(f["action"]["outcome"], "skipped", "{f}");
    assert!(
        f["action"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("rate limit"),
        "{f}"
    );
    assert_eq!(state(&kms, &late).await, "Disabled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_in_replay_needs_the_flag_and_skips_old_events() {
    let trail = Trail::new().await;
    let kms = kms(&trail).await;
    let work = tempfile::tempdir().unwrap();
    let (recent, recent_arn) = key(&kms, false).await;
    let (old, old_arn) = key(&kms, false).await;
    kms.disable_key().key_id(&recent).send().await.unwrap();
    kms.disable_key().key_id(&old).send().await.unwrap();
    let dir = work.path().join("AWSLogs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("f.json.gz"),
        gz_file(&[
            record(
                "ev-recent",
                &now_iso(),
                "DisableKey",
                &recent_arn,
                json!({"keyId": recent}),
                Value::Null,
            ),
            record(
                "ev-old",
                "2026-01-01T00:00:00Z",
                "DisableKey",
                &old_arn,
                json!({"keyId": old}),
                Value::Null,
            ),
        ]),
    )
    .unwrap();
    let cfg = work.path().join("replay.toml");
    std::fs::write(
        &cfg,
        format!("[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\nmax_event_age_secs = 3600\n"),
    )
    .unwrap();
    // Without --remediate: nothing changes.
    let o = run(bin()
        .args(["replay", "--format", "jsonl", "--no-baselines", "--config"])
        .arg(&cfg)
        .arg(&dir)
        .envs(trail.moto.env()));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(remediations(&jsonl(&stdout(&o))).is_empty());
    assert_eq!(state(&kms, &recent).await, "Disabled");
    // With it: the recent event is remediated, the old one left alone.
    let (findings, err) = replay_remediate(&cfg, &dir, trail.moto.env());
    let rem = remediations(&findings);
    assert_eq!(rem.len(), 1, "{rem:#?}");
    assert_eq!(strs(&rem[0]["event_ids"]), vec!["ev-recent"]);
    assert_eq!(rem[0]["action"]["outcome"], "performed");
    assert_eq!(state(&kms, &recent).await, "Enabled");
    assert_eq!(
        state(&kms, &old).await,
        "Disabled",
        "events over max_event_age_secs are left alone"
    );
    assert!(err.contains("1 finding(s) of events older than"), "{err}");

    // Through a role per account (STS AssumeRole): a role of another account sees other
    // keys, so the key is not found there and the failure is reported, not hidden.
    kms.disable_key().key_id(&recent).send().await.unwrap();
    std::fs::write(
        &cfg,
        format!("[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\nretries = 1\nretry_base_ms = 10\n\n[remediation.roles]\n\"{ACCOUNT}\" = \"arn:aws:iam::999999999999:role/kmsguard-remediate\"\n"),
    )
    .unwrap();
    let (findings, _) = replay_remediate(&cfg, &dir, trail.moto.env());
    let rem = remediations(&findings);
    assert_eq!(rem.len(), 1, "{rem:#?}");
    let a = &rem[0]["action"];
    assert_eq!(a["outcome"], "failed", "{a}");
    assert_eq!(
        a["before"]["via_role"],
        "arn:aws:iam::999999999999:role/kmsguard-remediate"
    );
    assert_eq!(a["reads"][0]["attempts"], 2, "{a}");
    assert_eq!(
        state(&kms, &recent).await,
        "Disabled",
        "nothing changed through the wrong role"
    );
}

/// A changing call that fails: KMS answers 500 KMSInternalException (injected by the
/// fault proxy in front of moto, which never fails on its own). Once: the call is retried
/// and the action performed, the finding counting both attempts. Every time: the action
/// is reported `failed` after `retries` + 1 attempts with KMS's error, and the key is left
/// as it was. The proxy's own counts say how many requests really reached it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_change_is_retried_and_then_reported() {
    use crate::servers::FaultProxy;
    let trail = Trail::new().await;
    let kms = kms(&trail).await;
    let work = tempfile::tempdir().unwrap();
    let (id, arn) = key(&kms, false).await;
    kms.disable_key().key_id(&id).send().await.unwrap();
    let dir = work.path().join("AWSLogs");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("f.json.gz"),
        gz_file(&[record(
            "ev-disable",
            &now_iso(),
            "DisableKey",
            &arn,
            json!({"keyId": id}),
            Value::Null,
        )]),
    )
    .unwrap();
    let cfg = work.path().join("replay.toml");
    std::fs::write(
        &cfg,
        format!("[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\nretries = 2\nretry_base_ms = 10\n"),
    )
    .unwrap();
    let remediate = |proxy: &FaultProxy| {
        let (findings, _) = replay_remediate(&cfg, &dir, proxy.env());
        let rem: Vec<Value> = remediations(&findings).into_iter().cloned().collect();
        assert_eq!(rem.len(), 1, "{rem:#?}");
        rem[0]["action"].clone()
    };
    let enable_call = |a: &Value| -> Value {
        a["calls"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["operation"] == "EnableKey"))
            .cloned()
            .unwrap_or_else(|| panic!("no EnableKey call: {a}"))
    };

    // A transient failure: retried, then done.
    let proxy = FaultProxy::start(
        &trail.moto.endpoint(),
        &json!({"kms_errors": {"EnableKey": 1}}),
    );
    let a = remediate(&proxy);
    assert_eq!(a["outcome"], "performed", "{a}");
    let call = enable_call(&a);
    assert_eq!(call["attempts"], 2, "{call}");
    assert!(
        call["request_id"].as_str().is_some_and(|r| !r.is_empty()),
        "{call}"
    );
    let stats = proxy.stats();
    assert_eq!(stats["kms_errors"]["EnableKey"], 1, "{stats}");
    assert_eq!(stats["kms"]["EnableKey"], 2, "{stats}");
    assert_eq!(state(&kms, &id).await, "Enabled");

    // A lasting failure: every attempt fails, the action is reported failed.
    kms.disable_key().key_id(&id).send().await.unwrap();
    let proxy = FaultProxy::start(
        &trail.moto.endpoint(),
        &json!({"kms_errors": {"EnableKey": 100}}),
    );
    let a = remediate(&proxy);
    assert_eq!(a["outcome"], "failed", "{a}");
    let call = enable_call(&a);
    assert_eq!(call["attempts"], 3, "retries = 2: {call}");
    assert!(
        call["error"]
            .as_str()
            .is_some_and(|e| e.contains("KMSInternalException")),
        "{call}"
    );
    let stats = proxy.stats();
    assert_eq!(stats["kms"]["EnableKey"], 3, "{stats}");
    assert_eq!(state(&kms, &id).await, "Disabled", "nothing changed");
}

const GOOD_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Sid":"root","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:root"},"Action":"kms:*","Resource":"*"},{"Sid":"app","Effect":"Allow","Principal":{"AWS":"arn:aws:iam::123456789012:role/app"},"Action":"kms:Decrypt","Resource":"*"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_uses_the_inventory_snapshot_of_policy_and_state() {
    let trail = Trail::new().await;
    let kms = kms(&trail).await;
    let work = tempfile::tempdir().unwrap();
    let (pol, pol_arn) = key(&kms, false).await;
    kms.put_key_policy()
        .key_id(&pol)
        .policy_name("default")
        .policy(GOOD_POLICY)
        .send()
        .await
        .unwrap();
    let (was_disabled, was_disabled_arn) = key(&kms, false).await;
    kms.disable_key()
        .key_id(&was_disabled)
        .send()
        .await
        .unwrap();
    // The key inventory, read into the daemon's state directory before it starts.
    let state_dir = work.path().join("state");
    let o = run(bin()
        .args([
            "posture",
            "--format",
            "jsonl",
            "--region",
            "us-east-1",
            "--state",
        ])
        .arg(&state_dir)
        .envs(trail.moto.env()));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // Then the bad changes: the policy opened to anyone, the disabled key scheduled for
    // deletion.
    kms.put_key_policy()
        .key_id(&pol)
        .policy_name("default")
        .policy(PUBLIC_POLICY)
        .send()
        .await
        .unwrap();
    kms.schedule_key_deletion()
        .key_id(&was_disabled)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    let cfg = trail.config(
        work.path(),
        &format!("\n[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\n"),
    );
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    let t = now_iso();
    trail
        .put(
            object_key("snapshot"),
            gz_file(&[
                record("ev-snap-pol", &t, "PutKeyPolicy", &pol_arn,
                    json!({"keyId": pol, "policyName": "default", "policy": PUBLIC_POLICY, "bypassPolicyLockoutSafetyCheck": false}), Value::Null),
                record("ev-snap-del", &t, "ScheduleKeyDeletion", &was_disabled_arn,
                    json!({"keyId": was_disabled, "pendingWindowInDays": 7}),
                    json!({"keyId": was_disabled_arn, "deletionDate": iso_in_days(7), "keyState": "PendingDeletion", "pendingWindowInDays": 7})),
            ]),
        )
        .await;
    let p = wait_remediation(work.path(), "ev-snap-pol").await;
    let d = wait_remediation(work.path(), "ev-snap-del").await;
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));

    assert_eq!(p["action"]["outcome"], "performed", "{p}");
    assert!(
        p["action"]["before"]["restore_from"]
            .as_str()
            .unwrap()
            .starts_with("inventory snapshot"),
        "{p}"
    );
    assert_eq!(p["action"]["after"]["policy_open"], "false", "{p}");
    assert_eq!(
        policy(&kms, &pol).await,
        GOOD_POLICY,
        "the observed policy is back"
    );

    assert_eq!(d["action"]["outcome"], "performed", "{d}");
    assert_eq!(
        d["action"]["before"]["state_before_event"], "Disabled",
        "{d}"
    );
    assert!(
        d["action"]["before"]["state_before_source"]
            .as_str()
            .unwrap()
            .starts_with("inventory record read "),
        "{d}"
    );
    assert_eq!(
        d["action"]["calls"].as_array().unwrap().len(),
        1,
        "cancel only: {d}"
    );
    assert_eq!(
        state(&kms, &was_disabled).await,
        "Disabled",
        "deletion cancelled; a key disabled before stays disabled"
    );
}

/// A TagResource record setting `kmsguard:confirmed`.
fn confirm_record(event_id: &str, time: &str, key_id: &str, key_arn: &str) -> Value {
    record(
        event_id,
        time,
        "TagResource",
        key_arn,
        json!({"keyId": key_id, "tags": [{"tagKey": "kmsguard:confirmed", "tagValue": "CHG-1234"}]}),
        Value::Null,
    )
}

async fn confirm_tag(kms: &aws_sdk_kms::Client, id: &str) {
    kms.tag_resource()
        .key_id(id)
        .tags(
            aws_sdk_kms::types::Tag::builder()
                .tag_key("kmsguard:confirmed")
                .tag_value("CHG-1234")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
}

async fn put_policy(kms: &aws_sdk_kms::Client, id: &str, text: &str) {
    kms.put_key_policy()
        .key_id(id)
        .policy_name("default")
        .policy(text)
        .send()
        .await
        .unwrap();
}

fn policy_record(event_id: &str, time: &str, key_id: &str, key_arn: &str, text: &str) -> Value {
    record(
        event_id,
        time,
        "PutKeyPolicy",
        key_arn,
        json!({"keyId": key_id, "policyName": "default", "policy": text, "bypassPolicyLockoutSafetyCheck": false}),
        Value::Null,
    )
}

fn deletion_record(event_id: &str, time: &str, key_id: &str, key_arn: &str) -> Value {
    record(
        event_id,
        time,
        "ScheduleKeyDeletion",
        key_arn,
        json!({"keyId": key_id, "pendingWindowInDays": 7}),
        json!({"keyId": key_arn, "deletionDate": iso_in_days(7), "keyState": "PendingDeletion", "pendingWindowInDays": 7}),
    )
}

/// A CreateKey record: it shows the key Enabled from then on.
fn create_record(event_id: &str, time: &str, key_id: &str, key_arn: &str) -> Value {
    record(
        event_id,
        time,
        "CreateKey",
        key_arn,
        json!({"description": "kmsguard remediation test", "keyUsage": "ENCRYPT_DECRYPT", "keySpec": "SYMMETRIC_DEFAULT", "origin": "AWS_KMS"}),
        json!({"keyMetadata": {"keyId": key_id, "arn": key_arn, "keyState": "Enabled", "enabled": true, "keyManager": "CUSTOMER"}}),
    )
}

fn assert_skipped_for(f: &Value, reason: &str, later: &str) {
    let a = &f["action"];
    assert_eq!(a["outcome"], "skipped", "{f}");
    assert!(
        a["reason"].as_str().unwrap().starts_with(reason),
        "{reason}: {f}"
    );
    assert_eq!(a["before"]["later_event"], later, "{f}");
    assert!(
        a["reads"].as_array().is_none_or(Vec::is_empty)
            && a["calls"].as_array().is_none_or(Vec::is_empty),
        "settled before any call: {f}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_honours_later_events_and_restores_policies_seen_in_events() {
    let trail = Trail::new().await;
    let kms = kms(&trail).await;
    let work = tempfile::tempdir().unwrap();
    // No inventory and no safe_policy_file: a policy to restore can only come from the
    // events. Every action waits 3 s for later events.
    let cfg = trail.config(
        work.path(),
        &format!("files_in_flight = 2\n\n[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\nconfirm_grace_secs = 3\n"),
    );
    let o = run(bin().args(["check-config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));

    // The changes, made for real: a deletion confirmed with the tag (a), a disable a
    // person reverted (b), a deletion confirmed in a later file (c), a good then a public
    // policy (d), and a deletion nobody settles (e).
    let (a, a_arn) = key(&kms, false).await;
    let (b, b_arn) = key(&kms, false).await;
    let (c, c_arn) = key(&kms, false).await;
    let (d, d_arn) = key(&kms, false).await;
    let (e, e_arn) = key(&kms, false).await;
    for k in [&a, &c, &e] {
        kms.schedule_key_deletion()
            .key_id(k)
            .pending_window_in_days(7)
            .send()
            .await
            .unwrap();
    }
    confirm_tag(&kms, &a).await;
    confirm_tag(&kms, &c).await;
    kms.disable_key().key_id(&b).send().await.unwrap();
    kms.enable_key().key_id(&b).send().await.unwrap();
    put_policy(&kms, &d, GOOD_POLICY).await;
    put_policy(&kms, &d, PUBLIC_POLICY).await;

    let now = kmsguard::inventory::now_secs();
    let t = kmsguard::inventory::format_time(now);
    let later = kmsguard::inventory::format_time(now + 1);
    let first = gz_file(&[
        deletion_record("ev-a-del", &t, &a, &a_arn),
        confirm_record("ev-a-tag", &t, &a, &a_arn),
        record(
            "ev-b-dis",
            &t,
            "DisableKey",
            &b_arn,
            json!({"keyId": b}),
            Value::Null,
        ),
        record(
            "ev-b-en",
            &t,
            "EnableKey",
            &b_arn,
            json!({"keyId": b}),
            Value::Null,
        ),
        deletion_record("ev-c-del", &t, &c, &c_arn),
        policy_record("ev-d-good", &t, &d, &d_arn, GOOD_POLICY),
        policy_record("ev-d-pub", &t, &d, &d_arn, PUBLIC_POLICY),
        create_record("ev-e-new", &t, &e, &e_arn),
        deletion_record("ev-e-del", &t, &e, &e_arn),
    ]);
    let t0 = Instant::now();
    trail.put(object_key("first"), first).await;
    trail
        .put(
            object_key("second"),
            gz_file(&[confirm_record("ev-c-tag", &later, &c, &c_arn)]),
        )
        .await;
    let took_e = until!("ev-e-del", state(&kms, &e).await == "Enabled");
    let _ = until!("ev-d-pub", !policy(&kms, &d).await.contains(r#""AWS":"*""#));
    for id in ["ev-a-del", "ev-b-dis", "ev-c-del", "ev-d-pub", "ev-e-del"] {
        wait_remediation(work.path(), id).await;
    }
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));
    assert!(
        took_e >= Duration::from_secs(3) && t0.elapsed() >= Duration::from_secs(3),
        "confirm_grace_secs = 3 held the action back: {took_e:?}"
    );

    let findings = sink(work.path());
    let rem = |id: &str| remediation_for(&findings, id).unwrap().clone();
    assert_skipped_for(
        &rem("ev-a-del"),
        "confirmed: later event ev-a-tag",
        "ev-a-tag",
    );
    assert_eq!(
        state(&kms, &a).await,
        "PendingDeletion",
        "a confirmed deletion stays"
    );
    assert_skipped_for(
        &rem("ev-b-dis"),
        "already reverted: later event ev-b-en",
        "ev-b-en",
    );
    assert_eq!(state(&kms, &b).await, "Enabled");
    assert_skipped_for(
        &rem("ev-c-del"),
        "confirmed: later event ev-c-tag",
        "ev-c-tag",
    );
    assert_eq!(
        state(&kms, &c).await,
        "PendingDeletion",
        "confirmed in the next file, within the grace"
    );
    let dr = rem("ev-d-pub");
    assert_eq!(dr["action"]["outcome"], "performed", "{dr}");
    assert_eq!(
        dr["action"]["before"]["restore_from"],
        format!("event snapshot: PutKeyPolicy ev-d-good at {t}"),
        "{dr}"
    );
    assert_eq!(dr["action"]["after"]["policy_open"], "false", "{dr}");
    assert_eq!(
        policy(&kms, &d).await,
        GOOD_POLICY,
        "the policy seen in the earlier event is back"
    );
    let er = rem("ev-e-del");
    assert_eq!(er["action"]["outcome"], "performed", "{er}");
    assert_eq!(state(&kms, &e).await, "Enabled");
    eprintln!(
        "remediation with confirm_grace_secs = 3: upload (SQS message) -> key back: ev-e-del {} ms",
        took_e.as_millis()
    );

    // replay --remediate honours the same later events, in the replayed files.
    let (f, f_arn) = key(&kms, false).await;
    let (g, g_arn) = key(&kms, false).await;
    kms.disable_key().key_id(&f).send().await.unwrap();
    confirm_tag(&kms, &f).await;
    put_policy(&kms, &g, GOOD_POLICY).await;
    put_policy(&kms, &g, PUBLIC_POLICY).await;
    let dir = work.path().join("replay");
    std::fs::create_dir_all(&dir).unwrap();
    let t = now_iso();
    std::fs::write(
        dir.join("f.json.gz"),
        gz_file(&[
            record(
                "ev-f-dis",
                &t,
                "DisableKey",
                &f_arn,
                json!({"keyId": f}),
                Value::Null,
            ),
            confirm_record("ev-f-tag", &t, &f, &f_arn),
            policy_record("ev-g-good", &t, &g, &g_arn, GOOD_POLICY),
            policy_record("ev-g-pub", &t, &g, &g_arn, PUBLIC_POLICY),
        ]),
    )
    .unwrap();
    let rcfg = work.path().join("replay.toml");
    std::fs::write(
        &rcfg,
        format!("[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\n"),
    )
    .unwrap();
    let (out, _) = replay_remediate(&rcfg, &dir, trail.moto.env());
    assert_skipped_for(
        remediation_for(&out, "ev-f-dis").unwrap(),
        "confirmed: later event ev-f-tag",
        "ev-f-tag",
    );
    assert_eq!(state(&kms, &f).await, "Disabled");
    let gr = remediation_for(&out, "ev-g-pub").unwrap();
    assert_eq!(gr["action"]["outcome"], "performed", "{gr}");
    assert_eq!(policy(&kms, &g).await, GOOD_POLICY);
}

/// Whether the daemon's JSON log has a line with this message.
fn logged(log: &Path, msg: &str) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .any(|v| v["message"] == msg)
}

/// The state before a change, in the daemon with `[inventory] refresh`: the daemon's own
/// refresh (at start) recorded a key as Enabled, so after its deletion is scheduled it
/// is cancelled and enabled again; a key with a custom rotation period (set with
/// EnableKeyRotation, whose CloudTrail record arrives too) gets rotation back with that
/// period, as moto's request log shows; keys the refresh never saw fall back to their
/// recorded events (DisableKey: left Disabled) or to nothing (left Disabled, said so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_in_the_daemon_uses_its_inventory_refresh_and_earlier_events() {
    let work = tempfile::tempdir().unwrap();
    let recording = work.path().join("moto-requests.jsonl");
    let trail = recorded_trail(&recording).await;
    let kms = kms(&trail).await;
    // Before the daemon starts, so its first refresh reads them.
    let (rot, rot_arn) = key(&kms, false).await;
    kms.enable_key_rotation()
        .key_id(&rot)
        .rotation_period_in_days(180)
        .send()
        .await
        .unwrap();
    let t_rot = now_iso();
    let (del, del_arn) = key(&kms, false).await;
    // DisableKey is recorded for the history, not remediated (its rule is off).
    let cfg = trail.config(
        work.path(),
        &format!("\n[inventory]\nrefresh = \"6h\"\n\n[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\n\n[remediation.rules]\nkms-key-disabled = \"off\"\n"),
    );
    let o = run(bin().args(["check-config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let _ = until!(
        "the first inventory refresh",
        logged(&log, "inventory refreshed")
    );
    // Keys the refresh has not seen.
    let (late_dis, late_dis_arn) = key(&kms, false).await;
    let (late_new, late_new_arn) = key(&kms, false).await;
    kms.disable_key().key_id(&late_dis).send().await.unwrap();

    // The CloudTrail records of the earlier changes arrive (CloudTrail delivers minutes
    // late): EnableKeyRotation with its period, DisableKey.
    let t = now_iso();
    trail
        .put(
            object_key("earlier"),
            gz_file(&[
                record(
                    "ev-h-rot",
                    &t_rot,
                    "EnableKeyRotation",
                    &rot_arn,
                    json!({"keyId": rot, "rotationPeriodInDays": 180}),
                    Value::Null,
                ),
                record(
                    "ev-h-dis",
                    &t,
                    "DisableKey",
                    &late_dis_arn,
                    json!({"keyId": late_dis}),
                    Value::Null,
                ),
            ]),
        )
        .await;
    let _ = until!(
        "the earlier file committed",
        sink(work.path())
            .iter()
            .any(|f| f["kind"] == "rule" && strs(&f["event_ids"]) == vec!["ev-h-dis"])
    );

    // The bad changes, made for real, each file timed from its upload to the key back.
    kms.disable_key_rotation()
        .key_id(&rot)
        .send()
        .await
        .unwrap();
    for k in [&del, &late_dis, &late_new] {
        kms.schedule_key_deletion()
            .key_id(k)
            .pending_window_in_days(7)
            .send()
            .await
            .unwrap();
    }
    let t = now_iso();
    let t0 = Instant::now();
    trail
        .put(
            object_key("rot"),
            gz_file(&[record(
                "ev-rot",
                &t,
                "DisableKeyRotation",
                &rot_arn,
                json!({"keyId": rot}),
                Value::Null,
            )]),
        )
        .await;
    let took_rot = until!("ev-rot", rotation(&kms, &rot).await).max(t0.elapsed());
    let t0 = Instant::now();
    trail
        .put(
            object_key("del"),
            gz_file(&[deletion_record("ev-del", &t, &del, &del_arn)]),
        )
        .await;
    let took_del = until!("ev-del", state(&kms, &del).await == "Enabled").max(t0.elapsed());
    trail
        .put(
            object_key("late"),
            gz_file(&[
                deletion_record("ev-late-dis", &t, &late_dis, &late_dis_arn),
                deletion_record("ev-late-new", &t, &late_new, &late_new_arn),
            ]),
        )
        .await;
    let late_dis_rem = wait_remediation(work.path(), "ev-late-dis").await;
    let late_new_rem = wait_remediation(work.path(), "ev-late-new").await;
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));
    let findings = sink(work.path());
    let ops = |a: &Value| -> Vec<String> {
        a["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["operation"].as_str().unwrap().to_string())
            .collect()
    };

    // Rotation: back on, with the period of the earlier EnableKeyRotation. moto's
    // GetKeyRotationStatus does not return a period (moto 5.2.5 ignores it), so what
    // KMS was asked is read from moto's request log.
    assert!(rotation(&kms, &rot).await);
    let r = &remediation_for(&findings, "ev-rot").unwrap()["action"];
    assert_eq!(r["outcome"], "performed", "{r}");
    assert_eq!(ops(r), vec!["EnableKeyRotation"], "{r}");
    assert_eq!(
        r["calls"][0]["params"]["rotationPeriodInDays"], "180",
        "{r}"
    );
    assert_eq!(r["before"]["rotation_period_before_event"], "180", "{r}");
    assert_eq!(
        r["before"]["rotation_period_source"],
        format!("event EnableKeyRotation ev-h-rot at {t_rot}"),
        "{r}"
    );
    let on_rot: Vec<(String, Value)> = kms_requests(&recording)
        .into_iter()
        .filter(|(op, body)| op.contains("KeyRotation") && body["KeyId"] == rot.as_str())
        .collect();
    let after_disable = on_rot
        .iter()
        .rposition(|(op, _)| op == "DisableKeyRotation")
        .expect("moto saw the DisableKeyRotation");
    let enables: Vec<&Value> = on_rot[after_disable..]
        .iter()
        .filter(|(op, _)| op == "EnableKeyRotation")
        .map(|(_, body)| body)
        .collect();
    assert_eq!(enables.len(), 1, "{on_rot:?}");
    assert_eq!(enables[0]["RotationPeriodInDays"], 180, "{on_rot:?}");

    // Deletion of a key the daemon's refresh recorded as Enabled: cancelled, enabled.
    assert_eq!(state(&kms, &del).await, "Enabled");
    let d = &remediation_for(&findings, "ev-del").unwrap()["action"];
    assert_eq!(d["outcome"], "performed", "{d}");
    assert_eq!(ops(d), vec!["CancelKeyDeletion", "EnableKey"], "{d}");
    assert_eq!(d["before"]["state_before_event"], "Enabled", "{d}");
    assert!(
        d["before"]["state_before_source"]
            .as_str()
            .unwrap()
            .starts_with("inventory record read "),
        "{d}"
    );

    // Keys the refresh never read: a recorded DisableKey says Disabled; nothing at all
    // says nothing. Both: cancelled, left Disabled, and the report says why.
    for (f, id, was, source) in [
        (
            &late_dis_rem,
            &late_dis,
            "Disabled",
            "event DisableKey ev-h-dis at ",
        ),
        (&late_new_rem, &late_new, "unknown", "none: "),
    ] {
        let a = &f["action"];
        assert_eq!(a["outcome"], "performed", "{f}");
        assert_eq!(ops(a), vec!["CancelKeyDeletion"], "{f}");
        assert_eq!(a["before"]["state_before_event"], was, "{f}");
        assert!(
            a["before"]["state_before_source"]
                .as_str()
                .unwrap()
                .starts_with(source),
            "{f}"
        );
        assert_eq!(state(&kms, id).await, "Disabled");
    }
    eprintln!(
        "remediation with [inventory] refresh: upload (SQS message) -> key back: ev-rot {} ms, ev-del {} ms",
        took_rot.as_millis(),
        took_del.as_millis()
    );
}

/// The state before a change when the daemon re-read the key after it: the refresh at
/// start read a key Enabled; its deletion is scheduled (and the key tagged) for real; the
/// TagResource file arrives first and the daemon re-reads the key (PendingDeletion, read
/// after the change), then the ScheduleKeyDeletion file, dated at the change, arrives.
/// The current record is newer than the event, so the record it replaced (`previous/`,
/// read at start) is what `before` uses: the key was Enabled, so the deletion is
/// cancelled and the key enabled again (without it: `unknown`, left Disabled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remediation_in_the_daemon_uses_the_record_a_reread_replaced() {
    let trail = Trail::new().await;
    let kms = kms(&trail).await;
    let (k, k_arn) = key(&kms, false).await;
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(
        work.path(),
        &format!("\n[inventory]\nrefresh = \"6h\"\n\n[remediation]\nmode = \"enforce\"\naccounts = [\"{ACCOUNT}\"]\n"),
    );
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let _ = until!(
        "the first inventory refresh",
        logged(&log, "inventory refreshed")
    );
    kms.tag_resource()
        .key_id(&k)
        .tags(
            aws_sdk_kms::types::Tag::builder()
                .tag_key("team")
                .tag_value("ledger")
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    kms.schedule_key_deletion()
        .key_id(&k)
        .pending_window_in_days(7)
        .send()
        .await
        .unwrap();
    let t = now_iso();
    trail
        .put(
            object_key("tag"),
            gz_file(&[record(
                "ev-tag",
                &t,
                "TagResource",
                &k_arn,
                json!({"keyId": k, "tags": [{"tagKey": "team", "tagValue": "ledger"}]}),
                Value::Null,
            )]),
        )
        .await;
    let reread = || -> Option<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["message"] == "inventory key re-read" && v["key"] == k_arn.as_str())
    };
    let _ = until!("the re-read of the key", reread().is_some());
    let reread_at = reread().unwrap()["refreshed_at"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reread_at > t,
        "re-read after the change: {reread_at} vs {t}"
    );

    trail
        .put(
            object_key("del"),
            gz_file(&[deletion_record("ev-del", &t, &k, &k_arn)]),
        )
        .await;
    let rem = wait_remediation(work.path(), "ev-del").await;
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));
    let a = &rem["action"];
    assert_eq!(a["outcome"], "performed", "{rem}");
    assert_eq!(a["before"]["state_before_event"], "Enabled", "{rem}");
    let source = a["before"]["state_before_source"].as_str().unwrap();
    let read_at = source
        .strip_prefix("inventory record read ")
        .unwrap_or_else(|| panic!("from the inventory: {rem}"));
    assert!(
        read_at <= t.as_str() && read_at < reread_at.as_str(),
        "the record read before the change, not the re-read one ({reread_at}): {rem}"
    );
    let ops: Vec<&str> = a["calls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["operation"].as_str())
        .collect();
    assert_eq!(ops, ["CancelKeyDeletion", "EnableKey"], "{rem}");
    assert_eq!(state(&kms, &k).await, "Enabled");
}
