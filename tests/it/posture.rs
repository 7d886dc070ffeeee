//! The key inventory and `kmsguard posture` against moto's KMS in two regions, through
//! the real binary: exactly the expected checks per key, `replay --enrich` adding aliases
//! and tags, a TagResource event invalidating cached tags, graceful degradation without
//! API access, and the API calls a full inventory costs.

use crate::support::*;
use aws_sdk_kms::types::Tag;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// moto's default account.
const ACCT: &str = "123456789012";
const FOREIGN: &str = "999988887777";
const EAST: &str = "us-east-1";
const WEST: &str = "eu-west-1";

fn tag(k: &str, v: &str) -> Tag {
    Tag::builder().tag_key(k).tag_value(v).build().unwrap()
}

fn policy(extra: Value) -> String {
    let mut stmts = vec![json!({"Sid": "root", "Effect": "Allow",
        "Principal": {"AWS": format!("arn:aws:iam::{ACCT}:root")}, "Action": "kms:*", "Resource": "*"})];
    if !extra.is_null() {
        stmts.push(extra);
    }
    json!({"Version": "2012-10-17", "Statement": stmts}).to_string()
}

/// What a key is made with.
#[derive(Default)]
struct Spec {
    rotation: bool,
    tags: Vec<(&'static str, &'static str)>,
    policy: Option<String>,
    multi_region: bool,
}

async fn make_key(kms: &aws_sdk_kms::Client, alias: &str, spec: Spec) -> String {
    let mut req = kms.create_key().multi_region(spec.multi_region);
    for (k, v) in &spec.tags {
        req = req.tags(tag(k, v));
    }
    if let Some(p) = spec.policy {
        req = req.policy(p);
    }
    let key = req.send().await.expect("create key");
    let meta = key.key_metadata().unwrap();
    let (id, arn) = (meta.key_id().to_string(), meta.arn().unwrap().to_string());
    if spec.rotation {
        kms.enable_key_rotation()
            .key_id(&id)
            .send()
            .await
            .expect("enable rotation");
    }
    kms.create_alias()
        .alias_name(alias)
        .target_key_id(&id)
        .send()
        .await
        .expect("create alias");
    arn
}

/// moto wants bare key ids (not ARNs) in some mutating calls.
fn id(arn: &str) -> &str {
    kmsguard::inventory::key_id_of_arn(arn)
}

fn good() -> Spec {
    Spec {
        rotation: true,
        tags: vec![("owner", "team-a")],
        ..Default::default()
    }
}

fn ts(offset_secs: i64) -> String {
    kmsguard::inventory::format_time(kmsguard::inventory::now_secs() + offset_secs)
}

/// A CloudTrail record shaped as ctgen (and CloudTrail) writes them.
fn record(name: &str, key_arn: &str, time: &str, params: Value) -> Value {
    let region = kmsguard::inventory::region_of_arn(key_arn).unwrap_or(EAST);
    let mut rp = json!({"keyId": key_arn});
    if let (Some(o), Value::Object(extra)) = (rp.as_object_mut(), params) {
        o.extend(extra);
    }
    json!({
        "eventVersion": "1.09",
        "userIdentity": {"type": "AssumedRole", "principalId": "AROAEXAMPLE:ops",
            "arn": format!("arn:aws:sts::{ACCT}:assumed-role/ops/alice"), "accountId": ACCT,
            "sessionContext": {"sessionIssuer": {"type": "Role", "principalId": "AROAEXAMPLE",
                "arn": format!("arn:aws:iam::{ACCT}:role/ops"), "accountId": ACCT, "userName": "ops"}}},
        "eventTime": time,
        "eventSource": "kms.amazonaws.com",
        "eventName": name,
        "awsRegion": region,
        "sourceIPAddress": "10.1.2.3",
        "userAgent": "aws-cli/2.15.0",
        "requestParameters": rp,
        "responseElements": null,
        "requestID": format!("req-{name}-{time}"),
        "eventID": format!("evt-{name}-{}-{time}", kmsguard::inventory::key_id_of_arn(key_arn)),
        "readOnly": false,
        "eventType": "AwsApiCall",
        "managementEvent": true,
        "recipientAccountId": ACCT,
        "eventCategory": "Management",
        "resources": [{"accountId": ACCT, "type": "AWS::KMS::Key", "ARN": key_arn}]
    })
}

/// Writes records as one CloudTrail file in the AWSLogs layout; returns its path.
fn write_trail(dir: &Path, stamp: &str, records: &[Value]) -> PathBuf {
    let folder = dir.join(format!("AWSLogs/{ACCT}/CloudTrail/{EAST}/2026/11/29"));
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join(format!("{ACCT}_CloudTrail_{EAST}_{stamp}_test.json"));
    std::fs::write(&path, json!({"Records": records}).to_string()).unwrap();
    path
}

fn kmsguard(moto: &Moto, args: &[&str]) -> (Vec<Value>, String, i32) {
    let o = run(bin()
        .envs(moto.env())
        .args(args)
        .args(["--format", "jsonl"]));
    (
        jsonl(&stdout(&o)),
        stderr(&o),
        o.status.code().unwrap_or(-1),
    )
}

/// Check ids per key ARN.
fn by_key(findings: &[Value]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in findings {
        assert_eq!(f["kind"], "posture", "{f}");
        let key = strs(&f["keys"])
            .pop()
            .expect("a posture finding names its key");
        m.entry(key)
            .or_default()
            .insert(f["rule"].as_str().unwrap().to_string());
    }
    m
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn posture_reports_exactly_the_expected_checks_per_key_in_two_regions() {
    let moto = Moto::start();
    let east = kmsguard::aws::kms_client(&moto.sdk(EAST).await, None);
    let west = kmsguard::aws::kms_client(&moto.sdk(WEST).await, None);

    let mut expect: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let good_key = make_key(&east, "alias/good", good()).await;
    expect.insert(good_key.clone(), set(&[]));
    let norot = make_key(
        &east,
        "alias/no-rotation",
        Spec {
            rotation: false,
            ..good()
        },
    )
    .await;
    expect.insert(norot.clone(), set(&["kms-posture-rotation-disabled"]));
    let public = make_key(
        &east,
        "alias/public",
        Spec {
            policy: Some(policy(
                json!({"Sid": "open", "Effect": "Allow", "Principal": {"AWS": "*"},
                "Action": ["kms:Decrypt"], "Resource": "*"}),
            )),
            ..good()
        },
    )
    .await;
    expect.insert(public.clone(), set(&["kms-posture-policy-public"]));
    let cross = make_key(
        &east,
        "alias/cross-account",
        Spec {
            policy: Some(policy(json!({"Sid": "partner", "Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{FOREIGN}:root")},
                "Action": ["kms:Decrypt", "kms:DescribeKey"], "Resource": "*"}))),
            ..good()
        },
    )
    .await;
    expect.insert(cross.clone(), set(&["kms-posture-policy-foreign-account"]));
    let star = make_key(
        &east,
        "alias/app-admin",
        Spec {
            policy: Some(policy(json!({"Sid": "app", "Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{ACCT}:role/app")},
                "Action": "kms:*", "Resource": "*"}))),
            ..good()
        },
    )
    .await;
    expect.insert(star.clone(), set(&["kms-posture-policy-kms-star"]));
    let untagged = make_key(
        &east,
        "alias/untagged",
        Spec {
            tags: vec![],
            ..good()
        },
    )
    .await;
    expect.insert(untagged.clone(), set(&["kms-posture-missing-tags"]));
    let granted = make_key(&east, "alias/granted", good()).await;
    east.create_grant()
        .key_id(id(&granted))
        .grantee_principal(format!("arn:aws:iam::{FOREIGN}:role/partner"))
        .operations(aws_sdk_kms::types::GrantOperation::Decrypt)
        .send()
        .await
        .expect("create grant");
    expect.insert(granted.clone(), set(&["kms-posture-grant-foreign-account"]));
    let pending = make_key(&east, "alias/pending", good()).await;
    east.schedule_key_deletion()
        .key_id(id(&pending))
        .pending_window_in_days(7)
        .send()
        .await
        .expect("schedule deletion");
    // Nothing yet: no CloudTrail history says it is in use.
    expect.insert(pending.clone(), set(&[]));

    // Multi-Region: one primary replicated into the DR region, one not.
    let mrk_ok = make_key(
        &east,
        "alias/mrk-replicated",
        Spec {
            multi_region: true,
            ..good()
        },
    )
    .await;
    let replica = east
        .replicate_key()
        .key_id(id(&mrk_ok))
        .replica_region(WEST)
        .send()
        .await
        .expect("replicate key");
    let replica_arn = replica
        .replica_key_metadata()
        .and_then(|m| m.arn())
        .unwrap()
        .to_string();
    assert!(replica_arn.contains(WEST));
    // Replicas do not share tags: tag it in its own region.
    west.tag_resource()
        .key_id(&replica_arn)
        .tags(tag("owner", "team-a"))
        .send()
        .await
        .expect("tag replica");
    expect.insert(mrk_ok.clone(), set(&[]));
    expect.insert(replica_arn.clone(), set(&[]));
    let mrk_lonely = make_key(
        &east,
        "alias/mrk-lonely",
        Spec {
            multi_region: true,
            ..good()
        },
    )
    .await;
    expect.insert(mrk_lonely.clone(), set(&["kms-posture-mrk-no-dr-replica"]));

    // The second region has keys of its own.
    let west_good = make_key(&west, "alias/west-good", good()).await;
    expect.insert(west_good.clone(), set(&[]));
    let west_bad = make_key(
        &west,
        "alias/west-bad",
        Spec {
            rotation: false,
            tags: vec![],
            ..good()
        },
    )
    .await;
    expect.insert(
        west_bad.clone(),
        set(&["kms-posture-missing-tags", "kms-posture-rotation-disabled"]),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kmsguard.toml");
    std::fs::write(
        &config,
        format!(
            "[posture]\nrequired_tags = [\"owner\"]\ndr_region = \"{WEST}\"\nregions = [\"{EAST}\", \"{WEST}\"]\nadmin_principals = [\"arn:aws:iam::{ACCT}:role/KeyAdmin\"]\n"
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let cfg = config.to_str().unwrap();
    let st = state.to_str().unwrap();

    let (findings, err, code) = kmsguard(&moto, &["posture", "--config", cfg, "--state", st]);
    assert_eq!(code, 0, "{err}");
    let mut got = by_key(&findings);
    for k in expect.keys() {
        got.entry(k.clone()).or_default();
    }
    assert_eq!(got, expect, "stderr: {err}");
    // Findings carry the key's alias and tags, and their ids are stable.
    let f = findings
        .iter()
        .find(|f| strs(&f["keys"]) == [norot.clone()])
        .unwrap();
    assert_eq!(f["key_alias"], "alias/no-rotation");
    assert_eq!(f["key_tags"]["owner"], "team-a");
    assert!(f["remediation"]
        .as_str()
        .unwrap()
        .contains("enable-key-rotation"));
    assert!(err.contains("in 2 region(s)"), "{err}");
    let (again, _, _) = kmsguard(&moto, &["posture", "--config", cfg, "--state", st]);
    let ids = |v: &[Value]| -> BTreeSet<String> {
        v.iter()
            .map(|f| f["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(ids(&findings), ids(&again));

    // CloudTrail shows the pending-deletion key decrypting yesterday: an outage in the
    // making. replay --state records it; posture --state reports it.
    let trail = tempfile::tempdir().unwrap();
    write_trail(
        trail.path(),
        "20261129T0000Z",
        &[record("Decrypt", &pending, &ts(-86_400), json!({}))],
    );
    let (_, err, code) = replay_jsonl(&[trail.path()], &["--state", st]);
    assert_eq!(code, 0, "{err}");
    let (findings, err, code) = kmsguard(
        &moto,
        &[
            "posture",
            "--config",
            cfg,
            "--state",
            st,
            "--fail-on",
            "high",
        ],
    );
    assert_eq!(code, 1, "a high finding with --fail-on high: {err}");
    let got = by_key(&findings);
    assert_eq!(
        got.get(&pending),
        Some(&set(&["kms-posture-unusable-key-in-use"])),
        "{err}"
    );
    assert_eq!(
        got.len(),
        9,
        "the same eight keys as before plus the pending one"
    );

    // A check disabled in the config is not run; a bad config names the key and the fix.
    std::fs::write(
        &config,
        "[posture]\nrequired_tags = [\"owner\"]\ndisabled_checks = [\"kms-posture-missing-tags\"]\n",
    )
    .unwrap();
    let (findings, err, code) = kmsguard(&moto, &["posture", "--config", cfg, "--region", WEST]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        by_key(&findings),
        BTreeMap::from([(west_bad.clone(), set(&["kms-posture-rotation-disabled"]))])
    );
    std::fs::write(&config, "[posture]\nrequired_tag = [\"owner\"]\n").unwrap();
    let (_, err, code) = kmsguard(&moto, &["posture", "--config", cfg, "--region", WEST]);
    assert_eq!(code, 2);
    assert!(
        err.contains("required_tag") && err.contains("required_tags"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_enrich_shows_aliases_and_tags_and_tag_resource_invalidates_the_cache() {
    let moto = Moto::start();
    let kms = kmsguard::aws::kms_client(&moto.sdk(EAST).await, None);
    let key = make_key(
        &kms,
        "alias/payments",
        Spec {
            tags: vec![("env", "prod"), ("sensitivity", "high")],
            ..good()
        },
    )
    .await;
    let trail = tempfile::tempdir().unwrap();
    let first = write_trail(
        trail.path(),
        "20261129T0000Z",
        &[record(
            "ScheduleKeyDeletion",
            &key,
            &ts(-3600),
            json!({"pendingWindowInDays": 7}),
        )],
    );
    let state = tempfile::tempdir().unwrap();
    let st = state.path().to_str().unwrap();

    // Offline replay is unchanged: no alias, no tags.
    let (plain, err, code) = replay_jsonl(&[&first], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(plain[0]["rule"], "kms-key-deletion-scheduled");
    assert!(plain[0].get("key_alias").is_none() && plain[0].get("key_tags").is_none());

    let enrich = |paths: &[&Path]| {
        let o = run(bin()
            .envs(moto.env())
            .args(["replay", "--enrich", "--state", st, "--format", "jsonl"])
            .args(paths));
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        (jsonl(&stdout(&o)), stderr(&o))
    };
    let (rich, err) = enrich(&[&first]);
    assert_eq!(rich.len(), 1);
    assert_eq!(rich[0]["key_alias"], "alias/payments", "{err}");
    assert_eq!(
        rich[0]["key_tags"],
        json!({"env": "prod", "sensitivity": "high"})
    );
    // The shipped rule escalates on the `sensitivity = high` tag once it is known.
    assert_eq!(plain[0]["severity"], "high");
    assert_eq!(rich[0]["severity"], "critical");
    // Everything else is as offline.
    let mut stripped = rich[0].clone();
    let o = stripped.as_object_mut().unwrap();
    o.remove("key_alias");
    o.remove("key_tags");
    o.insert("severity".into(), json!("high"));
    assert_eq!(stripped, plain[0]);

    // The key is retagged. The cached record (younger than an hour) still says prod ...
    kms.tag_resource()
        .key_id(&key)
        .tags(tag("env", "staging"))
        .send()
        .await
        .expect("retag");
    let (cached, _) = enrich(&[&first]);
    assert_eq!(
        cached[0]["key_tags"]["env"], "prod",
        "served from the cache"
    );
    // ... until CloudTrail shows the TagResource: that invalidates the record. The
    // replay goes in time order: the deletion scheduled before the retag shows the key
    // as it was then (the cached record), a change after it the key as it became (read
    // again from the API).
    let second = write_trail(
        trail.path(),
        "20261129T0100Z",
        &[
            record(
                "TagResource",
                &key,
                &ts(0),
                json!({"tags": [{"tagKey": "env", "tagValue": "staging"}]}),
            ),
            record("DisableKey", &key, &ts(1), json!({})),
        ],
    );
    let (fresh, err) = enrich(&[&first, &second]);
    let invalidated: usize = err
        .split("; ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        invalidated >= 1 && err.contains("cached inventory record(s) invalidated"),
        "{err}"
    );
    let before = fresh
        .iter()
        .find(|f| f["rule"] == "kms-key-deletion-scheduled")
        .unwrap();
    assert_eq!(before["key_tags"]["env"], "prod", "{err}");
    let after = fresh
        .iter()
        .find(|f| f["rule"] == "kms-key-disabled")
        .unwrap();
    assert_eq!(after["key_tags"]["env"], "staging", "{err}");
    assert_eq!(after["key_alias"], "alias/payments");
}

#[test]
fn replay_enrich_without_api_access_warns_and_keeps_findings() {
    let trail = tempfile::tempdir().unwrap();
    let key = format!("arn:aws:kms:{EAST}:{ACCT}:key/1234abcd-12ab-34cd-56ef-1234567890ab");
    let file = write_trail(
        trail.path(),
        "20261129T0000Z",
        &[record(
            "ScheduleKeyDeletion",
            &key,
            &ts(-60),
            json!({"pendingWindowInDays": 7}),
        )],
    );
    let (plain, _, _) = replay_jsonl(&[&file], &[]);
    // Nothing listens on this port: the KMS API is unreachable.
    let o = run(bin()
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", EAST)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args(["replay", "--enrich", "--format", "jsonl"])
        .arg(&file));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: --enrich"), "{}", stderr(&o));
    assert_eq!(jsonl(&stdout(&o)), plain);
}

/// API calls per key for a full inventory: ListKeys and ListAliases once per region
/// (one page each here), then 5 calls per customer-managed symmetric key.
#[tokio::test(flavor = "multi_thread")]
async fn full_inventory_costs_five_api_calls_per_key() {
    let moto = Moto::start();
    let kms = kmsguard::aws::kms_client(&moto.sdk(EAST).await, None);
    let n = 40;
    for i in 0..n {
        make_key(&kms, &format!("alias/k{i}"), good()).await;
    }
    let (findings, err, code) = kmsguard(&moto, &["posture", "--region", EAST]);
    assert_eq!(code, 0, "{err}");
    assert!(findings.is_empty(), "{findings:?}");
    let want = format!(
        "{n} key(s) ({n} customer-managed) in 1 region(s), 0 finding(s); {} KMS API call(s)",
        2 + 5 * n
    );
    assert!(err.contains(&want), "want {want:?} in {err}");
    eprintln!("measured: {}", err.trim());
}

/// A fake KMS endpoint on 127.0.0.1: throttles the first `throttle` requests, then answers
/// ListKeys and ListAliases with one empty page. Returns its URL and a request counter.
fn throttling_kms(throttle: usize) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let counter = counter.clone();
            std::thread::spawn(move || serve_kms(conn, &counter, throttle));
        }
    });
    (url, count)
}

fn serve_kms(mut conn: TcpStream, count: &AtomicUsize, throttle: usize) {
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let (mut target, mut len) = (String::new(), 0usize);
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
            if let Some(v) = lower.strip_prefix("x-amz-target:") {
                target = v.trim().to_string();
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        let (status, reply) = if n <= throttle {
            (
                "400 Bad Request",
                r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#,
            )
        } else if target.ends_with(".listkeys") {
            ("200 OK", r#"{"Keys":[],"Truncated":false}"#)
        } else {
            ("200 OK", r#"{"Aliases":[],"Truncated":false}"#)
        };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if conn.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A role that cannot be assumed costs its account only. moto's STS lets anyone assume
/// any role, so the fault proxy in front of moto answers AssumeRole of one role with
/// STS's 403 AccessDenied (as for a trust policy that does not allow the caller). With
/// two roles, `posture` audits the default credentials' keys in both regions and the
/// good role's account, reports one `kind: "health"` finding naming the refused account,
/// its role ARN and the fix, and exits 0, or 1 only when `--fail-on` is at or below the
/// finding's severity (high).
#[tokio::test(flavor = "multi_thread")]
async fn posture_skips_an_account_whose_role_cannot_be_assumed_and_reports_it() {
    const REFUSED: &str = "777788889999";
    let moto = Moto::start();
    let sdk = moto.sdk(EAST).await;
    let own = kmsguard::aws::kms_client(&sdk, None);
    let west = kmsguard::aws::kms_client(&moto.sdk(WEST).await, None);
    let good_role = format!("arn:aws:iam::{OTHER}:role/kmsguard-audit");
    let bad_role = format!("arn:aws:iam::{REFUSED}:role/kmsguard-audit");
    let other = kmsguard::aws::kms_client_as(&sdk, EAST, Some(&good_role), "setup").await;
    let norot = || Spec {
        rotation: false,
        ..good()
    };
    let east_key = make_key(&own, "alias/own-east", norot()).await;
    let west_key = make_key(&west, "alias/own-west", norot()).await;
    let other_key = make_key(&other, "alias/other", norot()).await;
    let proxy = crate::servers::FaultProxy::start(
        &moto.endpoint(),
        &json!({"deny_assume_roles": [bad_role]}),
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kmsguard.toml");
    std::fs::write(
        &config,
        format!("[posture]\nregions = [\"{EAST}\", \"{WEST}\"]\n[inventory]\nroles = {{ \"{REFUSED}\" = \"{bad_role}\", \"{OTHER}\" = \"{good_role}\" }}\n"),
    )
    .unwrap();
    let posture = |extra: &[&str]| {
        let o = run(bin()
            .envs(proxy.env())
            .args(["posture", "--format", "jsonl", "--config"])
            .arg(&config)
            .args(extra));
        (
            jsonl(&stdout(&o)),
            stderr(&o),
            o.status.code().unwrap_or(-1),
        )
    };
    let (findings, err, code) = posture(&[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        proxy.stats()["assume_denied"].as_u64().unwrap_or(0) > 0,
        "the proxy refused the role: {}",
        proxy.stats()
    );
    let (health, keyed): (Vec<Value>, Vec<Value>) =
        findings.into_iter().partition(|f| f["kind"] == "health");
    assert_eq!(
        by_key(&keyed),
        BTreeMap::from([
            (east_key.clone(), set(&["kms-posture-rotation-disabled"])),
            (west_key.clone(), set(&["kms-posture-rotation-disabled"])),
            (other_key.clone(), set(&["kms-posture-rotation-disabled"])),
        ]),
        "the own account in both regions and the good role's account are audited: {err}"
    );
    assert_eq!(health.len(), 1, "one finding for the account: {health:?}");
    let h = &health[0];
    assert_eq!(h["rule"], "health-inventory-role");
    assert_eq!(h["severity"], "high");
    assert_eq!(h["account"], REFUSED);
    let summary = h["summary"].as_str().unwrap();
    for part in [REFUSED, bad_role.as_str(), "sts:AssumeRole", "AccessDenied"] {
        assert!(summary.contains(part), "{part} in: {summary}");
    }
    assert!(err.contains(&format!("1 not audited: {REFUSED}")), "{err}");
    assert!(
        err.contains(&format!("warning: account {REFUSED} not audited")),
        "{err}"
    );

    let (_, err, code) = posture(&["--fail-on", "critical"]);
    assert_eq!(code, 0, "{err}");
    let (_, err, code) = posture(&["--fail-on", "high"]);
    assert_eq!(code, 1, "the health finding is high: {err}");
}

async fn sdk_for(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(EAST))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_kms::config::Credentials::new(
            "testing", "testing", None, None, "tests",
        ))
        .load()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn throttled_calls_back_off_with_jitter_then_succeed_or_give_up() {
    use kmsguard::inventory::{Backoff, Inventory, InventoryError, InventoryOptions};
    let opts = InventoryOptions {
        backoff: Backoff {
            base: Duration::from_millis(20),
            cap: Duration::from_millis(200),
            max_attempts: 5,
        },
        ..InventoryOptions::default()
    };
    let (url, requests) = throttling_kms(3);
    let store = kmsguard::store::Store::temporary().unwrap();
    let inv = Inventory::new(store, Some(sdk_for(&url).await), opts);
    let ri = inv
        .refresh_region(None, EAST)
        .await
        .expect("succeeds after backoff");
    assert!(ri.keys.is_empty());
    let calls = inv.calls().by_operation();
    assert_eq!(calls.get("ListKeys"), Some(&4), "{calls:?}");
    assert_eq!(calls.get("ListAliases"), Some(&1), "{calls:?}");
    assert_eq!(inv.calls().throttled(), 3);
    // Every attempt reached the server once: the SDK's own retries are off, so the
    // counts are real.
    assert_eq!(requests.load(Ordering::SeqCst), 5);

    let (url, requests) = throttling_kms(usize::MAX);
    let store = kmsguard::store::Store::temporary().unwrap();
    let inv = Inventory::new(store, Some(sdk_for(&url).await), opts);
    let started = Instant::now();
    match inv.refresh_region(None, EAST).await {
        Err(InventoryError::Api { op, code, .. }) => {
            assert_eq!(op, "ListKeys");
            assert_eq!(code.as_deref(), Some("ThrottlingException"));
        }
        other => panic!("expected a throttling error, got {other:?}"),
    }
    assert_eq!(requests.load(Ordering::SeqCst), 5, "max_attempts in all");
    // Four sleeps, each below its cap: 20 + 40 + 80 + 160 ms at most.
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// A second account, reached through `[inventory] roles` (moto keeps separate state per
/// account and maps credentials from STS AssumeRole to the role's account).
const OTHER: &str = "444455556666";

/// Cross-account inventory: keys made in two accounts; posture with a role for the
/// second account reports both accounts' keys with the right account, replay --enrich
/// enriches a finding on the other account's key; without the role, that account's keys
/// are not seen at all.
#[tokio::test(flavor = "multi_thread")]
async fn posture_and_enrich_reach_another_account_through_its_role() {
    let moto = Moto::start();
    let sdk = moto.sdk(EAST).await;
    let own = kmsguard::aws::kms_client(&sdk, None);
    let role = format!("arn:aws:iam::{OTHER}:role/kmsguard-audit");
    let other = kmsguard::aws::kms_client_as(&sdk, EAST, Some(&role), "kmsguard-tests-setup").await;
    let norot = || Spec {
        rotation: false,
        ..good()
    };
    let own_key = make_key(&own, "alias/own-norot", norot()).await;
    let other_key = make_key(
        &other,
        "alias/other-norot",
        Spec {
            tags: vec![("owner", "team-b"), ("sensitivity", "high")],
            ..norot()
        },
    )
    .await;
    assert!(own_key.contains(&format!(":{ACCT}:key/")), "{own_key}");
    assert!(
        other_key.contains(&format!(":{OTHER}:key/")),
        "moto made the key in the role's account: {other_key}"
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kmsguard.toml");
    let cfg = config.to_str().unwrap();
    std::fs::write(
        &config,
        format!("[posture]\nregions = [\"{EAST}\"]\n[inventory]\nroles = {{ \"{OTHER}\" = \"{role}\" }}\n"),
    )
    .unwrap();
    let (findings, err, code) = kmsguard(&moto, &["posture", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    let accounts: BTreeMap<String, String> = findings
        .iter()
        .map(|f| {
            (
                strs(&f["keys"]).pop().unwrap(),
                f["account"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    assert_eq!(
        accounts,
        BTreeMap::from([
            (own_key.clone(), ACCT.to_string()),
            (other_key.clone(), OTHER.to_string())
        ]),
        "{err}"
    );
    let f = findings
        .iter()
        .find(|f| strs(&f["keys"]) == [other_key.clone()])
        .unwrap();
    assert_eq!(f["rule"], "kms-posture-rotation-disabled");
    assert_eq!(
        f["key_alias"], "alias/other-norot",
        "aliases of the other account"
    );
    assert_eq!(f["key_tags"]["owner"], "team-b");
    assert!(err.contains("(also through 1 account role(s))"), "{err}");

    // Without the role, the other account's keys are invisible.
    std::fs::write(&config, format!("[posture]\nregions = [\"{EAST}\"]\n")).unwrap();
    let (findings, err, code) = kmsguard(&moto, &["posture", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        findings
            .iter()
            .flat_map(|f| strs(&f["keys"]))
            .collect::<Vec<_>>(),
        vec![own_key.clone()]
    );

    // replay --enrich: an event on the other account's key is enriched through the role.
    std::fs::write(
        &config,
        format!("[inventory]\nroles = {{ \"{OTHER}\" = \"{role}\" }}\n"),
    )
    .unwrap();
    let trail = tempfile::tempdir().unwrap();
    let file = write_trail(
        trail.path(),
        "20261129T0000Z",
        &[record(
            "ScheduleKeyDeletion",
            &other_key,
            &ts(-60),
            json!({"pendingWindowInDays": 7}),
        )],
    );
    let o = run(bin()
        .envs(moto.env())
        .args(["replay", "--enrich", "--config", cfg, "--format", "jsonl"])
        .arg(&file));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let found = jsonl(&stdout(&o));
    let f = found
        .iter()
        .find(|f| f["rule"] == "kms-key-deletion-scheduled")
        .expect("the deletion finding");
    assert_eq!(f["key_alias"], "alias/other-norot", "{}", stderr(&o));
    assert_eq!(f["key_tags"]["sensitivity"], "high");
}

/// The same record made by another role of the account.
fn by_role(mut r: Value, role: &str) -> Value {
    r["userIdentity"]["arn"] = json!(format!("arn:aws:sts::{ACCT}:assumed-role/{role}/s"));
    r["userIdentity"]["sessionContext"]["sessionIssuer"]["arn"] =
        json!(format!("arn:aws:iam::{ACCT}:role/{role}"));
    r["eventID"] = json!(format!("{}-{role}", r["eventID"].as_str().unwrap()));
    r
}

/// Rules matching key tags, through the binary against moto: the shipped
/// `kms-key-deletion-scheduled` escalates to critical on a `sensitivity = high` key once
/// replay --enrich knows the tags; a `[[suppress]]` on `tag:env = dev` for the CI role
/// drops the CI role's finding on the dev key and nothing else. Offline (no --enrich)
/// the tags are unknown: no escalation, no suppression.
#[tokio::test(flavor = "multi_thread")]
async fn rules_match_key_tags_after_enrichment() {
    let moto = Moto::start();
    let kms = kmsguard::aws::kms_client(&moto.sdk(EAST).await, None);
    let secret = make_key(
        &kms,
        "alias/secrets",
        Spec {
            tags: vec![("sensitivity", "high"), ("env", "prod")],
            ..good()
        },
    )
    .await;
    let dev = make_key(
        &kms,
        "alias/dev-scratch",
        Spec {
            tags: vec![("sensitivity", "low"), ("env", "dev")],
            ..good()
        },
    )
    .await;
    let trail = tempfile::tempdir().unwrap();
    let t = ts(-300);
    let file = write_trail(
        trail.path(),
        "20261129T0000Z",
        &[
            record(
                "ScheduleKeyDeletion",
                &secret,
                &t,
                json!({"pendingWindowInDays": 7}),
            ),
            by_role(record("DisableKey", &dev, &t, json!({})), "ci"),
            record("DisableKey", &dev, &t, json!({})),
            by_role(record("DisableKey", &secret, &t, json!({})), "ci"),
        ],
    );
    let rules = trail.path().join("suppress.toml");
    std::fs::write(
        &rules,
        "[[suppress]]\nrules = [\"kms-key-disabled\"]\nreason = \"CI disables its dev keys\"\nmatch = { all = [\n  { field = \"userIdentity.sessionContext.sessionIssuer.arn\", ends_with = \":role/ci\" },\n  { field = \"tag:env\", equals = \"dev\" },\n] }\n",
    )
    .unwrap();
    // (rule, key, role) -> severity
    let summary = |found: &[Value]| -> BTreeSet<(String, String, String, String)> {
        found
            .iter()
            .filter(|f| f["kind"] == "rule")
            .map(|f| {
                (
                    f["rule"].as_str().unwrap().to_string(),
                    strs(&f["keys"]).pop().unwrap(),
                    f["principal_role"]
                        .as_str()
                        .unwrap_or("?")
                        .rsplit('/')
                        .next()
                        .unwrap()
                        .to_string(),
                    f["severity"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let row = |r: &str, k: &str, role: &str, s: &str| {
        (
            r.to_string(),
            k.to_string(),
            role.to_string(),
            s.to_string(),
        )
    };
    let o = run(bin()
        .envs(moto.env())
        .args(["replay", "--enrich", "--no-baselines", "--format", "jsonl"])
        .arg("--extra-rules")
        .arg(&rules)
        .arg(&file));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        summary(&jsonl(&stdout(&o))),
        BTreeSet::from([
            row("kms-key-deletion-scheduled", &secret, "ops", "critical"),
            row("kms-key-disabled", &dev, "ops", "high"),
            row("kms-key-disabled", &secret, "ci", "critical"),
        ]),
        "{}",
        stderr(&o)
    );
    // Offline: what the events say, which is no tags: nothing escalated or suppressed.
    let o = run(bin()
        .args(["replay", "--no-baselines", "--format", "jsonl"])
        .arg("--extra-rules")
        .arg(&rules)
        .arg(&file));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        summary(&jsonl(&stdout(&o))),
        BTreeSet::from([
            row("kms-key-deletion-scheduled", &secret, "ops", "high"),
            row("kms-key-disabled", &dev, "ci", "high"),
            row("kms-key-disabled", &dev, "ops", "high"),
            row("kms-key-disabled", &secret, "ci", "high"),
        ])
    );
}

/// Offline (no --enrich), a replay carries what earlier events said about a key to later
/// findings' key conditions, through the binary: a TagResource `sensitivity = high` in
/// one file escalates a ScheduleKeyDeletion of the key in a later file to critical (the
/// shipped rule), but not one that came before the tag, nor one after an UntagResource
/// of it, nor one on another key; a CreateAlias `alias/scratch-*` lets a `key:alias`
/// suppression drop a later DisableKey of that key, until UpdateAlias moves the alias to
/// another key.
#[test]
fn offline_replay_carries_earlier_events_key_facts_to_later_findings() {
    let key = |k: &str| format!("arn:aws:kms:{EAST}:{ACCT}:key/{k}");
    let (tagged, untagged, other, scratch) = (
        key("k-tagged"),
        key("k-untagged"),
        key("k-other"),
        key("k-scratch"),
    );
    let at = |h: u32| format!("2026-11-29T{h:02}:00:00Z");
    let del = |k: &str, h: u32| {
        record(
            "ScheduleKeyDeletion",
            k,
            &at(h),
            json!({"pendingWindowInDays": 7}),
        )
    };
    let tag_high = |k: &str, h: u32| {
        record(
            "TagResource",
            k,
            &at(h),
            json!({"tags": [{"tagKey": "sensitivity", "tagValue": "high"}]}),
        )
    };
    let alias = |name: &str, k: &str, alias: &str, h: u32| {
        let mut r = record(
            name,
            k,
            &at(h),
            json!({"aliasName": alias, "targetKeyId": id(k)}),
        );
        r["requestParameters"]
            .as_object_mut()
            .unwrap()
            .remove("keyId");
        r
    };
    let trail = tempfile::tempdir().unwrap();
    // Two files, in time order; the facts of the first reach the findings of the second.
    write_trail(
        trail.path(),
        "20261129T0000Z",
        &[
            del(&tagged, 0),
            tag_high(&tagged, 1),
            tag_high(&untagged, 1),
            alias("CreateAlias", &scratch, "alias/scratch-1", 1),
        ],
    );
    let later = vec![
        del(&tagged, 3),
        record(
            "UntagResource",
            &untagged,
            &at(2),
            json!({"tagKeys": ["sensitivity"]}),
        ),
        del(&untagged, 3),
        del(&other, 3),
        record("DisableKey", &scratch, &at(3), json!({})),
        alias("UpdateAlias", &other, "alias/scratch-1", 4),
        record("DisableKey", &scratch, &at(5), json!({})),
    ];
    write_trail(trail.path(), "20261129T0200Z", &later);
    let rules = trail.path().join("scratch.toml");
    std::fs::write(
        &rules,
        "[[suppress]]\nrules = [\"kms-key-disabled\"]\nreason = \"scratch keys come and go\"\nmatch = { field = \"key:alias\", starts_with = \"alias/scratch-\" }\n",
    )
    .unwrap();
    let rules_arg = rules.to_str().unwrap().to_string();
    let (found, err, code) = replay_jsonl(
        &[trail.path()],
        &["--no-baselines", "--extra-rules", &rules_arg],
    );
    assert_eq!(code, 0, "{err}");
    let got: BTreeSet<(String, String, String, String)> = found
        .iter()
        .filter(|f| f["rule"] == "kms-key-deletion-scheduled" || f["rule"] == "kms-key-disabled")
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_string(),
                strs(&f["keys"]).pop().unwrap(),
                f["time"].as_str().unwrap().to_string(),
                f["severity"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let row =
        |r: &str, k: &str, h: u32, s: &str| (r.to_string(), k.to_string(), at(h), s.to_string());
    assert_eq!(
        got,
        BTreeSet::from([
            row("kms-key-deletion-scheduled", &tagged, 0, "high"),
            row("kms-key-deletion-scheduled", &tagged, 3, "critical"),
            row("kms-key-deletion-scheduled", &untagged, 3, "high"),
            row("kms-key-deletion-scheduled", &other, 3, "high"),
            row("kms-key-disabled", &scratch, 5, "high"),
        ]),
        "{err}"
    );
    // The facts decide conditions only: offline, findings show no key tags or alias.
    assert!(
        !found
            .iter()
            .any(|f| f["key_tags"].is_object() || f["key_alias"].is_string()),
        "offline: nothing enriched"
    );
}

/// Lines of the daemon's JSON log whose message is `msg`.
/// Waits up to a minute for `cond`, failing with the daemon's log when it never holds.
fn wait_for_daemon(log: &Path, what: &str, cond: &dyn Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn log_lines(log: &Path, msg: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == msg)
        .collect()
}

/// `[inventory] refresh` in the daemon: against moto, a key whose rotation is disabled
/// through the SDK while the daemon runs is reported by the next refresh through the
/// file sink, exactly once over the following refreshes; a CloudTrail file processed
/// meanwhile still gets through, with its key's alias and tags from the inventory's
/// cache, and escalated by the shipped rule for a `sensitivity = high` key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_refreshes_the_inventory_and_reports_posture_once() {
    use crate::daemon::{sigterm, sink, wait_exit, Trail};
    let trail = Trail::new().await;
    let kms = kmsguard::aws::kms_client(&trail.moto.sdk(EAST).await, None);
    let key = make_key(
        &kms,
        "alias/ledger",
        Spec {
            tags: vec![("owner", "team-a"), ("sensitivity", "high")],
            ..good()
        },
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(
        work.path(),
        "\n[inventory]\nrefresh = \"2s\"\n\n[posture]\nrequired_tags = [\"owner\"]\n",
    );
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let refreshes = || log_lines(&log, "inventory refreshed");
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| wait_for_daemon(&log, what, cond);
    wait_for("a first refresh", &|| !refreshes().is_empty());
    let first = refreshes().remove(0);
    assert_eq!(first["keys"], 1, "{first}");
    assert_eq!(first["new"], 0, "a good key: {first}");
    let posture = |rule: &str| -> Vec<Value> {
        sink(work.path())
            .into_iter()
            .filter(|f| f["kind"] == "posture" && f["rule"] == rule)
            .collect()
    };
    assert!(posture("kms-posture-rotation-disabled").is_empty());

    kms.disable_key_rotation()
        .key_id(id(&key))
        .send()
        .await
        .expect("disable rotation");
    let seen = refreshes().len();
    wait_for("the posture finding in the sink", &|| {
        !posture("kms-posture-rotation-disabled").is_empty()
    });
    // Two more refreshes see the same problem: nothing new reaches the sink.
    wait_for("two more refreshes", &|| refreshes().len() >= seen + 3);
    let found = posture("kms-posture-rotation-disabled");
    assert_eq!(found.len(), 1, "exactly once: {found:?}");
    assert_eq!(strs(&found[0]["keys"]), std::slice::from_ref(&key));
    assert_eq!(found[0]["key_alias"], "alias/ledger");
    let news: Vec<i64> = refreshes()
        .iter()
        .map(|r| r["new"].as_i64().unwrap())
        .collect();
    assert_eq!(news.iter().sum::<i64>(), 1, "refreshes: {news:?}");

    // Event processing goes on, and rule findings carry the cached alias and tags.
    let event = json!({"Records": [record("DisableKey", &key, &ts(-60), json!({}))]});
    trail
        .put(
            format!("AWSLogs/{ACCT}/CloudTrail/{EAST}/2026/11/29/{ACCT}_CloudTrail_{EAST}_20261129T0000Z_x.json"),
            event.to_string().into_bytes(),
        )
        .await;
    wait_for("the rule finding", &|| {
        sink(work.path())
            .iter()
            .any(|f| f["rule"] == "kms-key-disabled")
    });
    let f = sink(work.path())
        .into_iter()
        .find(|f| f["rule"] == "kms-key-disabled")
        .unwrap();
    assert_eq!(f["key_alias"], "alias/ledger", "{f}");
    assert_eq!(f["key_tags"]["sensitivity"], "high");
    assert_eq!(f["severity"], "critical", "escalated by the key's tag");

    sigterm(&daemon);
    let (code, _) = wait_exit(&mut daemon, Duration::from_secs(30));
    assert_eq!(code, Some(0));
}

/// The daemon re-reads a key a CloudTrail file shows changed, without waiting for its
/// scheduled refresh (`refresh = "6h"`: after the one at start, only the targeted re-read
/// can explain a new record). A key is tagged `sensitivity = high` through the SDK after
/// the first refresh; the TagResource record's file makes the daemon re-read that key
/// (logged, with the API calls); a later file's DisableKey finding on the key then carries
/// the new tag, and the shipped rule's `tag:sensitivity` escalation makes it critical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_rereads_a_key_an_event_changed_so_findings_carry_its_new_tags() {
    use crate::daemon::{sigterm, sink, wait_exit, Trail};
    let trail = Trail::new().await;
    let kms = kmsguard::aws::kms_client(&trail.moto.sdk(EAST).await, None);
    let key = make_key(&kms, "alias/ledger", good()).await;
    let other = make_key(&kms, "alias/other", good()).await;
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(work.path(), "\n[inventory]\nrefresh = \"6h\"\n");
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let refreshes = || log_lines(&log, "inventory refreshed");
    let rereads = || log_lines(&log, "inventory key re-read");
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| wait_for_daemon(&log, what, cond);
    wait_for("the refresh at start", &|| !refreshes().is_empty());
    assert!(rereads().is_empty(), "nothing changed yet");

    kms.tag_resource()
        .key_id(id(&key))
        .tags(tag("sensitivity", "high"))
        .send()
        .await
        .expect("tag the key");
    // A burst: the same key tagged twice in one file and again in the next, and another
    // key only described (which changes nothing): one read of the tagged key.
    let at = |d: i64| kmsguard::inventory::format_time(kmsguard::inventory::now_secs() + d);
    let (t1, t2, t) = (at(-2), at(-1), at(0));
    let put = |name: &str, records: Vec<Value>| {
        let trail = &trail;
        let name = name.to_string();
        async move {
            trail
                .put(
                    format!("AWSLogs/{ACCT}/CloudTrail/{EAST}/2026/11/29/{ACCT}_CloudTrail_{EAST}_20261129T0000Z_{name}.json"),
                    json!({ "Records": records }).to_string().into_bytes(),
                )
                .await
        }
    };
    let tag_params = json!({"tags": [{"tagKey": "sensitivity", "tagValue": "high"}]});
    let uploaded = Instant::now();
    put(
        "tag1",
        vec![
            record("TagResource", &key, &t1, tag_params.clone()),
            record("TagResource", &key, &t2, tag_params.clone()),
            record("DescribeKey", &other, &t, json!({})),
        ],
    )
    .await;
    put("tag2", vec![record("TagResource", &key, &t, tag_params)]).await;
    wait_for("the re-read of the tagged key", &|| !rereads().is_empty());
    let latency = uploaded.elapsed();
    // Both files arrive within the debounce: a second read would come right after.
    std::thread::sleep(Duration::from_secs(4));
    let done = rereads();
    assert_eq!(done.len(), 1, "one read for the burst: {done:?}");
    assert_eq!(done[0]["key"], key.as_str(), "{:?}", done[0]);
    assert_eq!(
        done[0]["changed_at"],
        t.as_str(),
        "the latest change of the burst"
    );
    assert!(done[0]["refreshed_at"].as_str().unwrap() >= t.as_str());
    let calls = done[0]["api_calls"].as_u64().unwrap();
    assert_eq!(refreshes().len(), 1, "no scheduled refresh since the start");

    let uploaded_disable = Instant::now();
    put(
        "disable",
        vec![record("DisableKey", &key, &ts(0), json!({}))],
    )
    .await;
    wait_for("the rule finding", &|| {
        sink(work.path())
            .iter()
            .any(|f| f["rule"] == "kms-key-disabled")
    });
    let to_finding = uploaded_disable.elapsed();
    let f = sink(work.path())
        .into_iter()
        .find(|f| f["rule"] == "kms-key-disabled")
        .unwrap();
    assert_eq!(f["key_alias"], "alias/ledger", "{f}");
    assert_eq!(f["key_tags"]["sensitivity"], "high", "the re-read tag: {f}");
    assert_eq!(f["key_tags"]["owner"], "team-a", "{f}");
    assert_eq!(
        f["severity"], "critical",
        "escalated by the key's new tag: {f}"
    );

    sigterm(&daemon);
    let (code, _) = wait_exit(&mut daemon, Duration::from_secs(30));
    assert_eq!(code, Some(0));
    eprintln!(
        "targeted re-read: TagResource file uploaded -> record re-read (logged) in {} ms ({calls} KMS calls); DisableKey file uploaded -> enriched finding in {} ms",
        latency.as_millis(),
        to_finding.as_millis()
    );
}

/// The daemon records, with each processed CloudTrail file, when it showed each key, so
/// its scheduled refresh runs the use-based checks. Against moto with keys 200 days old:
/// before any file, neither check is evaluated (no history); a file with a Decrypt on
/// `busy` an hour ago and a DescribeKey on it 40 days ago (the history reaches back over
/// `unused_days = 30`) makes the next refresh report `idle`, never in CloudTrail, as
/// unused (and not `busy`); disabling `busy` through the SDK makes a later refresh report
/// it disabled while in use. Each exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_records_key_use_and_its_refresh_reports_unused_and_disabled_in_use_keys() {
    use crate::daemon::{sigterm, sink, wait_exit, Trail};
    let age = (200 * 86_400).to_string();
    let trail = Trail::new_with(&[("KMSGUARD_MOTO_KEY_AGE_SECS", &age)]).await;
    let kms = kmsguard::aws::kms_client(&trail.moto.sdk(EAST).await, None);
    let busy = make_key(&kms, "alias/busy", good()).await;
    let idle = make_key(&kms, "alias/idle", good()).await;
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(
        work.path(),
        "\n[inventory]\nrefresh = \"2s\"\n\n[posture]\nrequired_tags = [\"owner\"]\nunused_days = 30\nrecent_use_days = 30\n",
    );
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let refreshes = || log_lines(&log, "inventory refreshed");
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| wait_for_daemon(&log, what, cond);
    let posture = || {
        by_key(
            &sink(work.path())
                .into_iter()
                .filter(|f| f["kind"] == "posture")
                .collect::<Vec<_>>(),
        )
    };
    wait_for("two refreshes", &|| refreshes().len() >= 2);
    assert_eq!(
        posture(),
        BTreeMap::new(),
        "no CloudTrail history yet: nothing to say"
    );

    let records = json!({"Records": [
        record("DescribeKey", &busy, &ts(-40 * 86_400), json!({})),
        record("Decrypt", &busy, &ts(-3600), json!({})),
    ]});
    trail
        .put(
            format!("AWSLogs/{ACCT}/CloudTrail/{EAST}/2026/11/29/{ACCT}_CloudTrail_{EAST}_20261129T0000Z_u.json"),
            records.to_string().into_bytes(),
        )
        .await;
    wait_for("the unused-key finding", &|| !posture().is_empty());
    assert_eq!(
        posture(),
        BTreeMap::from([(idle.clone(), set(&["kms-posture-unused-key"]))]),
        "only the key CloudTrail never showed is unused"
    );

    kms.disable_key()
        .key_id(id(&busy))
        .send()
        .await
        .expect("disable key");
    wait_for("the disabled-in-use finding", &|| {
        posture().contains_key(&busy)
    });
    let seen = refreshes().len();
    wait_for("two more refreshes", &|| refreshes().len() >= seen + 2);
    assert_eq!(
        posture(),
        BTreeMap::from([
            (idle.clone(), set(&["kms-posture-unused-key"])),
            (busy.clone(), set(&["kms-posture-unusable-key-in-use"])),
        ])
    );
    let found: Vec<Value> = sink(work.path())
        .into_iter()
        .filter(|f| f["kind"] == "posture")
        .collect();
    assert_eq!(found.len(), 2, "each exactly once: {found:?}");
    let f = found
        .iter()
        .find(|f| f["rule"] == "kms-posture-unusable-key-in-use")
        .unwrap();
    assert_eq!(f["severity"], "high");
    assert_eq!(f["key_alias"], "alias/busy");
    assert!(
        f["summary"]
            .as_str()
            .unwrap()
            .contains("is disabled but CloudTrail shows it used"),
        "{f}"
    );

    sigterm(&daemon);
    let (code, _) = wait_exit(&mut daemon, Duration::from_secs(30));
    assert_eq!(code, Some(0));
}

/// `kms-posture-unused-key` through the binary: keys 200 days old (moto stamps their
/// creation date back), a CloudTrail history recorded by `replay --state` that reaches
/// back 40 days with a DescribeKey (not a use) on the idle key and a Decrypt two days
/// ago on the busy one. With `unused_days = 30`, only the idle key is reported; before
/// any history is recorded, the check is not evaluated at all.
#[tokio::test(flavor = "multi_thread")]
async fn posture_reports_unused_keys_from_recorded_cloudtrail_history() {
    let moto = Moto::start_with(&[("KMSGUARD_MOTO_KEY_AGE_SECS", &(200 * 86_400).to_string())]);
    let kms = kmsguard::aws::kms_client(&moto.sdk(EAST).await, None);
    let idle = make_key(&kms, "alias/idle", good()).await;
    let busy = make_key(&kms, "alias/busy", good()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kmsguard.toml");
    std::fs::write(&config, "[posture]\nunused_days = 30\n").unwrap();
    let (cfg, st) = (
        config.to_str().unwrap(),
        dir.path().join("state").to_str().unwrap().to_string(),
    );
    let posture_run = || {
        kmsguard(
            &moto,
            &["posture", "--config", cfg, "--state", &st, "--region", EAST],
        )
    };

    let (findings, err, code) = posture_run();
    assert_eq!(code, 0, "{err}");
    assert!(
        findings.is_empty(),
        "no history, not evaluated: {findings:?}"
    );
    assert!(err.contains("no CloudTrail history in the state"), "{err}");

    let trail = tempfile::tempdir().unwrap();
    write_trail(
        trail.path(),
        "20261129T0000Z",
        &[
            record("DescribeKey", &idle, &ts(-40 * 86_400), json!({})),
            record("Decrypt", &busy, &ts(-2 * 86_400), json!({})),
        ],
    );
    let (_, err, code) = replay_jsonl(&[trail.path()], &["--state", &st]);
    assert_eq!(code, 0, "{err}");
    let (findings, err, code) = posture_run();
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        by_key(&findings),
        BTreeMap::from([(idle.clone(), set(&["kms-posture-unused-key"]))]),
        "{err}"
    );
    let f = &findings[0];
    assert_eq!(f["severity"], "low");
    assert!(
        f["summary"]
            .as_str()
            .unwrap()
            .contains("last use: never seen"),
        "{f}"
    );
    assert!(!strs(&f["keys"]).contains(&busy));
}
