//! The archive as a sink of the real daemon (`[[sinks.archive]]`) against moto: findings
//! from CloudTrail files uploaded through S3 and SQS end up in segments that `archive
//! verify` accepts and `aws-encryption-cli` opens to exactly those findings; `kill -9`
//! loses nothing and the chain continues; while S3 or KMS refuse, findings wait in the
//! outbox, still reach the file sink, and the archive catches up.

use crate::archive::{create_bucket, create_key, esdk_cli, segments};
use crate::daemon::{sigterm, sink, wait_exit, Trail};
use crate::support::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// A gzipped CloudTrail file with `n` successful DisableKey events (one finding each),
/// event ids `{prefix}-{i}`.
fn disable_keys_file(prefix: &str, n: usize) -> Vec<u8> {
    let records: Vec<Value> = (0..n)
        .map(|i| {
            json!({
                "eventVersion": "1.09", "eventSource": "kms.amazonaws.com", "eventName": "DisableKey",
                "eventTime": format!("2026-10-01T{:02}:{:02}:{:02}Z", 8 + i / 3600, (i / 60) % 60, i % 60),
                "awsRegion": "us-east-1", "eventID": format!("{prefix}-{i}"),
                "recipientAccountId": "111122223333", "sourceIPAddress": "203.0.113.9", "userAgent": "aws-cli/2.17.0",
                "userIdentity": {"type": "AssumedRole", "arn": "arn:aws:sts::111122223333:assumed-role/admin/alice", "accountId": "111122223333",
                    "sessionContext": {"sessionIssuer": {"type": "Role", "arn": "arn:aws:iam::111122223333:role/admin"}}},
                // A key each: one finding each (repeats on one key would fold into one).
                "requestParameters": {"keyId": format!("{prefix}-{i:06}")},
                "resources": [{"type": "AWS::KMS::Key", "ARN": format!("arn:aws:kms:us-east-1:111122223333:key/{prefix}-{i:06}")}]
            })
        })
        .collect();
    let doc = json!({ "Records": records });
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, doc.to_string().as_bytes()).unwrap();
    gz.finish().unwrap()
}

fn trail_key(name: &str) -> String {
    format!("AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/{name}.json.gz")
}

/// The daemon's "archive segment written" log lines of the sink whose name contains
/// `sink`, oldest first.
fn segment_logs(log: &Path, sink: &str) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"] == "archive segment written"
                && v["sink"].as_str().is_some_and(|s| s.contains(sink))
        })
        .collect()
}

/// Alerts per segment of an archive, from `archive list` (headers only, no KMS call).
fn listed_counts(moto: &Moto, location: &str) -> Vec<u64> {
    let o = run(bin().envs(moto.env()).args(["archive", "list", location]));
    if !o.status.success() {
        return Vec::new();
    }
    stdout(&o)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(4)?.parse().ok())
        .collect()
}

fn archived(moto: &Moto, location: &str) -> u64 {
    listed_counts(moto, location).iter().sum()
}

async fn wait_archived(moto: &Moto, location: &str, want: u64, timeout: Duration, log: &Path) {
    let t0 = Instant::now();
    loop {
        let n = archived(moto, location);
        if n >= want {
            assert_eq!(n, want, "more archived than delivered to the file sink");
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "{location}: {n} of {want} findings archived after {timeout:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `archive verify`: asserts success and returns (segments, alerts) from its summary.
fn verify(moto: &Moto, location: &str) -> (u64, u64) {
    let o = run(bin().envs(moto.env()).args(["archive", "verify", location]));
    assert!(
        o.status.success(),
        "verify {location}: {}{}",
        stdout(&o),
        stderr(&o)
    );
    let out = stdout(&o);
    let summary = out
        .lines()
        .find(|l| l.contains(" segments, "))
        .unwrap_or_else(|| panic!("{out}"));
    let nums: Vec<u64> = summary
        .split_whitespace()
        .filter_map(|w| w.trim_end_matches(',').parse().ok())
        .collect();
    (nums[0], nums[1])
}

/// Archived findings by `archive cat`, in archive order.
fn cat(moto: &Moto, location: &str) -> Vec<Value> {
    let o = run(bin().envs(moto.env()).args(["archive", "cat", location]));
    assert!(o.status.success(), "cat {location}: {}", stderr(&o));
    jsonl(&stdout(&o))
}

fn ids(findings: &[Value]) -> Vec<String> {
    findings
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

fn unique(ids: &[String]) -> HashSet<String> {
    let set: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(set.len(), ids.len(), "a finding archived twice");
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_archives_findings_that_verify_and_open_with_aws_encryption_cli() {
    let corpus = generate(&[
        "--hours",
        "24",
        "--events-per-hour",
        "600",
        "--scenarios",
        "all",
        "--seed",
        "5",
    ]);
    let trail = Trail::new().await;
    let key = create_key(&trail.moto, false).await;
    create_bucket(&trail.moto, "audit").await;
    let work = tempfile::tempdir().unwrap();
    let all = work.path().join("archive");
    let high = work.path().join("archive-high");
    let extra = format!(
        "files_in_flight = 4\n\n[[sinks.archive]]\nkey = \"{key}\"\ndir = \"{}\"\ns3 = \"s3://audit/kmsguard\"\nhost = \"daemon-test\"\nmax_segment_findings = 1000\nmax_segment_age_secs = 2\n\n[[sinks.archive]]\nkey = \"{key}\"\ndir = \"{}\"\nhost = \"daemon-high\"\nmin_severity = \"high\"\nmax_segment_age_secs = 2\n",
        all.display(),
        high.display()
    );
    let cfg = trail.config(work.path(), &extra);
    let o = run(bin().args(["check-config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let all_s = all.to_str().unwrap();

    // A burst: one file, 5,000 findings; the sink makes segments of 1,000.
    let burst = 5000;
    trail
        .put(trail_key("burst"), disable_keys_file("burst", burst))
        .await;
    let t0 = Instant::now();
    trail.wait_drained(Duration::from_secs(120)).await;
    let deadline = Duration::from_secs(120);
    loop {
        let logs = segment_logs(&log, "daemon-test");
        let done = logs
            .last()
            .and_then(|l| l["findings_total"].as_u64())
            .unwrap_or(0);
        if done >= burst as u64 {
            let secs = t0.elapsed().as_secs_f64();
            let kms = logs.last().unwrap()["kms_calls_total"].as_u64().unwrap();
            eprintln!(
                "daemon archive: {done} findings from one CloudTrail file into {} segments (dir + S3) in {secs:.2} s after PutObject: {:.0} findings/s end to end, {} KMS calls = {:.2} per 1,000 findings",
                logs.len(),
                done as f64 / secs,
                kms,
                kms as f64 * 1000.0 / done as f64
            );
            assert_eq!(kms, logs.len() as u64, "one GenerateDataKey per segment");
            assert!(
                logs.iter().all(|l| l["findings"].as_u64() <= Some(1000)),
                "a segment over max_segment_findings"
            );
            break;
        }
        assert!(t0.elapsed() < deadline, "burst not archived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Then a day of traffic with every scenario, and a message that is not a
    // notification (a health finding, archived like any finding).
    trail.upload_dir(&corpus.join("AWSLogs")).await;
    trail.send_raw("this is not a notification").await;
    trail.wait_drained(Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every line the file sink got, updates of growing folds included (each must be
    // one: its count grew); the archives get the same lines.
    let delivered = crate::daemon::sink_lines(work.path());
    crate::daemon::assert_only_updates(&delivered);
    wait_archived(
        &trail.moto,
        all_s,
        delivered.len() as u64,
        Duration::from_secs(60),
        &log,
    )
    .await;
    let high_delivered: Vec<&Value> = delivered
        .iter()
        .filter(|f| matches!(f["severity"].as_str(), Some("high" | "critical")))
        .collect();
    wait_archived(
        &trail.moto,
        high.to_str().unwrap(),
        high_delivered.len() as u64,
        Duration::from_secs(60),
        &log,
    )
    .await;
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));

    // Both destinations verify and hold every delivered line once.
    let (segs, n) = verify(&trail.moto, all_s);
    assert_eq!(n, delivered.len() as u64);
    assert_eq!(verify(&trail.moto, "s3://audit/kmsguard"), (segs, n));
    assert!(segs >= 6, "{segs} segments");
    assert!(
        delivered.iter().any(|f| f["kind"] == "health"),
        "the bad message made a health finding"
    );
    assert!(delivered
        .iter()
        .any(|f| f["severity"] == "medium" || f["severity"] == "low"));

    // aws-encryption-cli alone opens every segment to exactly those findings.
    let plain = tempfile::tempdir().unwrap();
    let mut opened = Vec::new();
    for (i, seg) in segments(&all).iter().enumerate() {
        let dest = plain.path().join(format!("{i}.jsonl"));
        let o = esdk_cli(&trail.moto, "us-east-1")
            .args(["--decrypt", "--input"])
            .arg(seg)
            .arg("--output")
            .arg(&dest)
            .args(["--wrapping-keys", &format!("key={key}")])
            .args(["--commitment-policy", "require-encrypt-require-decrypt"])
            .args([
                "--encryption-context",
                "purpose=kmsguard-alert-archive",
                &format!("kmsguard:segment={}", i + 1),
                "kmsguard:host=daemon-test",
            ])
            .args(["--max-encrypted-data-keys", "1", "-S"])
            .output()
            .expect("aws-encryption-cli runs");
        assert!(
            dest.exists(),
            "aws-encryption-cli wrote nothing for {}: {}",
            seg.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        opened.extend(jsonl(&std::fs::read_to_string(&dest).unwrap()));
    }
    assert_eq!(opened.len(), delivered.len());
    assert!(
        opened == delivered,
        "the archive holds exactly the lines the file sink got, in the same order"
    );
    // Commit order is kept: the burst's findings, in event order.
    let burst_ids: Vec<String> = opened
        .iter()
        .map(|f| strs(&f["event_ids"]).join(","))
        .filter(|e| e.starts_with("burst-"))
        .collect();
    let expect: Vec<String> = (0..burst).map(|i| format!("burst-{i}")).collect();
    assert_eq!(burst_ids, expect);

    // The min_severity archive holds exactly the high and critical findings.
    let (_, n_high) = verify(&trail.moto, high.to_str().unwrap());
    assert_eq!(n_high, high_delivered.len() as u64);
    let got = cat(&trail.moto, high.to_str().unwrap());
    let want: Vec<Value> = high_delivered.into_iter().cloned().collect();
    assert!(
        got == want,
        "the high archive holds the high lines, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_before_the_segment_is_written_loses_nothing_and_the_chain_continues() {
    let trail = Trail::new().await;
    let key = create_key(&trail.moto, false).await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("archive");
    let extra = format!(
        "files_in_flight = 2\n\n[[sinks.archive]]\nkey = \"{key}\"\ndir = \"{}\"\nhost = \"daemon-kill\"\nmax_segment_findings = 100\nmax_segment_age_secs = 5\n",
        dir.display()
    );
    let cfg = trail.config(work.path(), &extra);
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    // 250 findings: two full segments go out at once, 50 wait for the age limit.
    trail
        .put(trail_key("before"), disable_keys_file("before", 250))
        .await;
    let t0 = Instant::now();
    while segment_logs(&log, "daemon-kill").len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no segments");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for the outbox to record the two segments, well before the 50 roll.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(sink(work.path()).len() >= 250, "the file sink got them all");
    daemon.kill().unwrap(); // SIGKILL: 50 findings committed, delivered to the file, not archived
    daemon.wait().unwrap();
    assert_eq!(
        listed_counts(&trail.moto, dir.to_str().unwrap()),
        vec![100, 100]
    );

    // More findings arrive while it is down.
    trail
        .put(trail_key("while-down"), disable_keys_file("down", 30))
        .await;
    let mut daemon = trail.start(&cfg, &log);
    trail.wait_drained(Duration::from_secs(60)).await;
    let delivered: HashSet<String> = ids(&sink(work.path())).into_iter().collect();
    wait_archived(
        &trail.moto,
        dir.to_str().unwrap(),
        delivered.len() as u64,
        Duration::from_secs(60),
        &log,
    )
    .await;
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));

    // The 50 roll by age after the restart; the 30 join them or (when SQS hands their
    // message to the killed process's long poll first) follow in a segment of their own.
    let (segs, n) = verify(&trail.moto, dir.to_str().unwrap());
    let counts = listed_counts(&trail.moto, dir.to_str().unwrap());
    assert_eq!(n, 280, "{counts:?}");
    assert!(
        counts == [100, 100, 80] || counts == [100, 100, 50, 30],
        "segment 3 continues the chain: {counts:?}\n{}",
        std::fs::read_to_string(&log).unwrap()
    );
    assert_eq!(segs as usize, counts.len());
    let archived = unique(&ids(&cat(&trail.moto, dir.to_str().unwrap())));
    assert_eq!(archived, delivered, "every finding archived exactly once");
    let events: HashSet<String> = cat(&trail.moto, dir.to_str().unwrap())
        .iter()
        .flat_map(|f| strs(&f["event_ids"]))
        .collect();
    for i in 0..250 {
        assert!(events.contains(&format!("before-{i}")), "before-{i} lost");
    }
    for i in 0..30 {
        assert!(events.contains(&format!("down-{i}")), "down-{i} lost");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn findings_wait_in_the_outbox_while_s3_and_kms_refuse_and_the_archive_catches_up() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("archive");
    // Neither the bucket nor the key's alias exist yet.
    let extra = format!(
        "files_in_flight = 2\n\n[[sinks.archive]]\nkey = \"alias/kmsguard-archive\"\ndir = \"{}\"\ns3 = \"s3://late-audit/kmsguard\"\nhost = \"daemon-late\"\nmax_segment_age_secs = 1\n",
        dir.display()
    );
    let cfg = trail.config(work.path(), &extra);
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let wait_sink = |n: usize| {
        let wp = work.path().to_path_buf();
        async move {
            let t0 = Instant::now();
            while sink(&wp).len() < n {
                assert!(t0.elapsed() < Duration::from_secs(60), "file sink stalled");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // S3 refuses (no bucket): the file sink still gets the findings.
    trail.put(trail_key("a"), disable_keys_file("a", 10)).await;
    trail.send_raw("not a notification either").await;
    wait_sink(11).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("cannot open the archive"), "{text}");

    // The bucket appears; KMS refuses (no such alias).
    create_bucket(&trail.moto, "late-audit").await;
    trail.put(trail_key("b"), disable_keys_file("b", 10)).await;
    wait_sink(21).await;
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("GenerateDataKey")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "KMS never asked: {}",
            std::fs::read_to_string(&log).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(archived(&trail.moto, "s3://late-audit/kmsguard"), 0);
    assert!(
        !dir.exists() || walk_files(&dir).is_empty(),
        "nothing may be written before it can be encrypted: {:?}",
        walk_files(&dir)
    );

    // The key appears: the archive catches up without a restart.
    let kms = kmsguard::aws::kms_client(&trail.moto.sdk("us-east-1").await, None);
    let key = kms.create_key().send().await.unwrap();
    let key_id = key.key_metadata().unwrap().key_id().to_string();
    kms.create_alias()
        .alias_name("alias/kmsguard-archive")
        .target_key_id(&key_id)
        .send()
        .await
        .unwrap();
    let caught_up = Instant::now();
    let delivered = sink(work.path());
    assert_eq!(delivered.len(), 21);
    wait_archived(
        &trail.moto,
        "s3://late-audit/kmsguard",
        21,
        Duration::from_secs(90),
        &log,
    )
    .await;
    eprintln!(
        "archive caught up {:?} after the KMS key appeared",
        caught_up.elapsed()
    );
    wait_archived(
        &trail.moto,
        dir.to_str().unwrap(),
        21,
        Duration::from_secs(10),
        &log,
    )
    .await;
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(20)).0, Some(0));

    for loc in ["s3://late-audit/kmsguard", dir.to_str().unwrap()] {
        verify(&trail.moto, loc);
        let got = cat(&trail.moto, loc);
        assert_eq!(unique(&ids(&got)), ids(&delivered).into_iter().collect());
        assert!(got.iter().any(|f| f["kind"] == "health"), "health archived");
    }
    // Only encrypted segments were ever written to the archive folder.
    for f in walk_files(&dir) {
        assert!(f.extension().is_some_and(|e| e == "kga"), "{}", f.display());
    }
}

fn walk_files(d: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(d) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// The daemon's crash window between two destinations: a segment written to the folder
/// but not to S3. Reopening copies it to S3 (no gap there), writing a sealed segment
/// again is harmless, and a different segment of the same name is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_brings_a_destination_that_missed_a_segment_up_to_date() {
    use kmsguard::archive::{Archiver, ArchiverConfig, Keyring, Location, Store};
    use std::sync::Arc;
    let moto = Moto::start();
    let key = create_key(&moto, false).await;
    create_bucket(&moto, "audit").await;
    let sdk = moto.sdk("us-east-1").await;
    let s3 = kmsguard::aws::s3_client(
        &sdk,
        &kmsguard::aws::AwsSettings {
            s3_force_path_style: true,
            ..Default::default()
        },
    );
    let keyring = Arc::new(Keyring::new(sdk));
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("archive");
    let s3_store = || {
        Store::new(
            Location::S3 {
                bucket: "audit".into(),
                prefix: "a".into(),
            },
            Some(s3.clone()),
        )
    };
    let finding =
        |i: usize| json!({"id": format!("f{i}"), "time": "2026-10-01T12:00:00Z", "kind": "rule"});
    let cfg = ArchiverConfig::new(&key, "crashy");

    // Segment 1 reached only the folder.
    let mut a = Archiver::open(cfg.clone(), keyring.clone(), vec![Store::dir(&dir)])
        .await
        .unwrap();
    let one = a.seal_exact(&[finding(1), finding(2)]).await.unwrap();
    a.write_sealed(&one).await.unwrap();
    a.write_sealed(&one)
        .await
        .expect("writing the same segment again is a no-op");
    assert_eq!(archived(&moto, "s3://audit/a"), 0);

    let mut b = Archiver::open(
        cfg.clone(),
        keyring.clone(),
        vec![Store::dir(&dir), s3_store()],
    )
    .await
    .unwrap();
    assert_eq!(b.next_seq(), 2);
    assert_eq!(
        listed_counts(&moto, "s3://audit/a"),
        vec![2],
        "segment 1 copied to S3"
    );
    let two = b.seal_exact(&[finding(3)]).await.unwrap();
    b.write_sealed(&two).await.unwrap();
    for loc in [dir.to_str().unwrap(), "s3://audit/a"] {
        assert_eq!(verify(&moto, loc), (2, 3), "{loc}");
    }

    // Another writer with the same host name: its segment 3 differs from ours.
    let mut c = Archiver::open(cfg.clone(), keyring.clone(), vec![Store::dir(&dir)])
        .await
        .unwrap();
    let theirs = c.seal_exact(&[finding(4)]).await.unwrap();
    c.write_sealed(&theirs).await.unwrap();
    let mine = b.seal_exact(&[finding(5)]).await.unwrap();
    let err = b.write_sealed(&mine).await.unwrap_err().to_string();
    assert!(
        err.contains("a different segment of that name exists already"),
        "{err}"
    );
}
