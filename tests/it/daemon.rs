//! `kmsguard run` against moto: a trail bucket whose S3 notifications go to an SQS queue
//! with a dead-letter queue, CloudTrail files uploaded from ctgen, and the real binary.

use crate::support::*;
use aws_sdk_s3::primitives::ByteStream;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub struct Trail {
    pub moto: Moto,
    pub s3: aws_sdk_s3::Client,
    pub sqs: aws_sdk_sqs::Client,
    pub bucket: String,
    pub queue: String,
    pub dlq: String,
}

impl Trail {
    pub async fn new() -> Trail {
        Trail::new_with(&[]).await
    }

    /// `new` over a moto started with extra environment (`Moto::start_with`).
    pub async fn new_with(env: &[(&str, &str)]) -> Trail {
        let moto = Moto::start_with(env);
        let sdk = moto.sdk("us-east-1").await;
        let s3 = kmsguard::aws::s3_client(
            &sdk,
            &kmsguard::aws::AwsSettings {
                s3_force_path_style: true,
                ..Default::default()
            },
        );
        let sqs = kmsguard::aws::sqs_client(&sdk, None);
        let dlq = sqs
            .create_queue()
            .queue_name("trail-files-dlq")
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let dlq_arn = sqs
            .get_queue_attributes()
            .queue_url(&dlq)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        let redrive =
            serde_json::json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "2"}).to_string();
        let queue = sqs
            .create_queue()
            .queue_name("trail-files")
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::RedrivePolicy,
                redrive,
            )
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap();
        let queue_arn = sqs
            .get_queue_attributes()
            .queue_url(&queue)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
            .clone();
        let bucket = "org-cloudtrail-logs".to_string();
        s3.create_bucket().bucket(&bucket).send().await.unwrap();
        let qc = aws_sdk_s3::types::QueueConfiguration::builder()
            .queue_arn(queue_arn)
            .events(aws_sdk_s3::types::Event::S3ObjectCreated)
            .build()
            .unwrap();
        s3.put_bucket_notification_configuration()
            .bucket(&bucket)
            .notification_configuration(
                aws_sdk_s3::types::NotificationConfiguration::builder()
                    .queue_configurations(qc)
                    .build(),
            )
            .send()
            .await
            .unwrap();
        Trail {
            moto,
            s3,
            sqs,
            bucket,
            queue,
            dlq,
        }
    }

    /// Uploads every file under `dir` (keys relative to it), oldest first.
    pub async fn upload_dir(&self, dir: &Path) -> usize {
        let mut files = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        files.sort_by_key(|p| {
            (
                kmsguard::source::files::time_stamp(p).unwrap_or_default(),
                p.clone(),
            )
        });
        let base = dir.parent().unwrap();
        for chunk in files.chunks(16) {
            let puts = chunk.iter().map(|p| {
                let key = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
                self.put(key, std::fs::read(p).unwrap())
            });
            futures_join(puts).await;
        }
        files.len()
    }

    pub async fn put(&self, key: String, body: Vec<u8>) {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap();
    }

    pub async fn send_raw(&self, body: &str) {
        self.sqs
            .send_message()
            .queue_url(&self.queue)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// Messages visible plus in flight.
    pub async fn depth(&self, queue: &str) -> u64 {
        let a = self
            .sqs
            .get_queue_attributes()
            .queue_url(queue)
            .attribute_names(aws_sdk_sqs::types::QueueAttributeName::All)
            .send()
            .await
            .unwrap()
            .attributes
            .unwrap();
        let get = |k| {
            a.get(&k)
                .and_then(|v: &String| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        get(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
            + get(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
    }

    /// Waits until the queue is empty (everything deleted or dead-lettered).
    pub async fn wait_drained(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.depth(&self.queue).await == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "queue not drained in {timeout:?}: {} left",
                self.depth(&self.queue).await
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub fn config(&self, dir: &Path, extra: &str) -> PathBuf {
        let path = dir.join("kmsguard.toml");
        std::fs::write(
            &path,
            format!(
                "[aws]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\n\n[state]\ndir = \"{}\"\n\n[[sources.sqs]]\nqueue_url = \"{}\"\n\n[[sinks.file]]\npath = \"{}\"\n\n[daemon]\nvisibility_timeout_secs = 30\nshutdown_grace_secs = 10\n{extra}\n",
                self.moto.endpoint(),
                dir.join("state").display(),
                self.queue,
                dir.join("findings.jsonl").display(),
            ),
        )
        .unwrap();
        path
    }

    pub fn start(&self, config: &Path, log: &Path) -> Proc {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Proc::spawn(
            bin()
                .args(["run", "--log-format", "json", "--config"])
                .arg(config)
                .envs(self.moto.env())
                .stdout(Stdio::null())
                .stderr(log),
        )
    }
}

async fn futures_join<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let handles: Vec<_> = futs.collect();
    for h in handles {
        h.await;
    }
}

/// Every line of the file sink, in order.
pub fn sink_lines(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("findings.jsonl"))
        .map(|t| jsonl(&t))
        .unwrap_or_default()
}

/// The file sink's findings, each in its latest state: the daemon delivers a folded
/// finding again, with the same id and a larger count, after each file that made it
/// grow (and after a crash a line may come twice). Checks that a repeated id never goes
/// back to a smaller count.
pub fn sink(dir: &Path) -> Vec<Value> {
    let mut order: Vec<String> = Vec::new();
    let mut latest: std::collections::HashMap<String, Value> = Default::default();
    for f in sink_lines(dir) {
        let id = f["id"].as_str().unwrap().to_string();
        match latest.get(&id) {
            Some(old) => assert!(
                f["count"].as_u64() >= old["count"].as_u64(),
                "an update with a smaller count: {old} then {f}"
            ),
            None => order.push(id.clone()),
        }
        latest.insert(id, f);
    }
    order
        .into_iter()
        .filter_map(|id| latest.remove(&id))
        .collect()
}

/// Asserts that every repeated id in the sink's lines is an update: its count grew
/// (no finding delivered twice as it was).
pub fn assert_only_updates(lines: &[Value]) {
    let mut last: std::collections::HashMap<&str, u64> = Default::default();
    for f in lines {
        let id = f["id"].as_str().unwrap();
        let n = f["count"].as_u64().unwrap();
        if let Some(prev) = last.insert(id, n) {
            assert!(n > prev, "{id} delivered twice with count {n}: {f}");
        }
    }
}

pub fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

use std::process::Command;

/// Waits for the child to exit; returns its exit code and how long it took.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> (Option<i32>, Duration) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), start.elapsed());
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("kmsguard did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_finds_every_incident_through_s3_and_sqs() {
    let corpus = generate(&[
        "--hours",
        "72",
        "--events-per-hour",
        "1000",
        "--scenarios",
        "all",
        "--seed",
        "4",
        "--digests",
    ]);
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(work.path(), "files_in_flight = 4\n");
    let o = run(bin().args(["check-config"]).arg(&cfg));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    let started = Instant::now();
    let files = trail.upload_dir(&corpus.join("AWSLogs")).await;
    trail.wait_drained(Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigterm(&daemon);
    let (code, took) = wait_exit(&mut daemon, Duration::from_secs(15));
    assert_eq!(code, Some(0), "SIGTERM exits 0");
    eprintln!("daemon: {files} objects (incl. digests) through moto in {elapsed:?} ({:.0} files/s); stopped {took:?} after SIGTERM", files as f64 / elapsed.as_secs_f64());

    assert_only_updates(&sink_lines(work.path()));
    let findings = sink(work.path());
    // The daemon sees what a local replay of the same files sees.
    let (replayed, _, _) = replay_jsonl(&[&corpus.join("AWSLogs")], &[]);
    // Grouped anomalies (bursts, spikes) are compared by rule and principal: which events
    // of a burst come first depends on the order files are processed in, which the
    // daemon does not fix (several files in flight).
    let key_of = |f: &Value| -> (String, String) {
        let rule = f["rule"].as_str().unwrap().to_string();
        let what = if matches!(rule.as_str(), "anomaly-denied-burst" | "anomaly-rate-spike") {
            f["principal_role"]
                .as_str()
                .or(f["principal"].as_str())
                .unwrap_or("")
                .to_string()
        } else {
            strs(&f["event_ids"]).join(",")
        };
        (rule, what)
    };
    let got: HashSet<(String, String)> = findings
        .iter()
        .filter(|f| f["kind"] != "health")
        .map(key_of)
        .collect();
    let truth = truth(&corpus);
    let injected: HashSet<String> = truth.iter().flat_map(|t| strs(&t["eventIDs"])).collect();
    for f in &replayed {
        let events = strs(&f["event_ids"]);
        if events.iter().any(|e| injected.contains(e)) {
            let key = key_of(f);
            assert!(
                got.contains(&key),
                "incident finding of replay missing from the daemon's sink: {f}"
            );
        }
    }
    for t in &truth {
        let ids: HashSet<String> = strs(&t["eventIDs"]).into_iter().collect();
        assert!(
            findings
                .iter()
                .any(|f| strs(&f["event_ids"]).iter().any(|e| ids.contains(e))),
            "scenario {} reached the sink",
            t["scenario"]
        );
    }
    assert!(
        !findings.iter().any(|f| f["kind"] == "health"),
        "no health finding on a clean trail"
    );
    assert_eq!(trail.depth(&trail.dlq).await, 0);
}

/// A gzipped CloudTrail file with one successful DisableKey event.
pub fn disable_key_file(event_id: &str) -> Vec<u8> {
    let doc = serde_json::json!({"Records": [{
        "eventVersion": "1.09", "eventSource": "kms.amazonaws.com", "eventName": "DisableKey",
        "eventTime": "2026-10-01T12:00:00Z", "awsRegion": "us-east-1", "eventID": event_id,
        "recipientAccountId": "111122223333", "sourceIPAddress": "203.0.113.9", "userAgent": "aws-cli/2.17.0",
        "userIdentity": {"type": "AssumedRole", "arn": "arn:aws:sts::111122223333:assumed-role/admin/alice", "accountId": "111122223333",
            "sessionContext": {"sessionIssuer": {"type": "Role", "arn": "arn:aws:iam::111122223333:role/admin"}}},
        "requestParameters": {"keyId": "1234abcd-12ab-34cd-56ef-1234567890ab"},
        "resources": [{"type": "AWS::KMS::Key", "ARN": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"}]
    }]});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, doc.to_string().as_bytes()).unwrap();
    gz.finish().unwrap()
}

fn rules_for(findings: &[Value], event_id: &str) -> Vec<String> {
    findings
        .iter()
        .filter(|f| strs(&f["event_ids"]).iter().any(|e| e == event_id))
        .map(|f| f["rule"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_form_duplicates_and_failures_are_handled() {
    let trail = Trail::new().await;
    // A second bucket without notifications: its objects are announced by hand, in the
    // other forms.
    trail.s3.create_bucket().bucket("raw").send().await.unwrap();
    let odd = "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/odd name+plus ü.json.gz";
    for (key, id) in [
        (
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/sns.json.gz",
            "ev-sns",
        ),
        (
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/eventbridge.json.gz",
            "ev-eventbridge",
        ),
        (odd, "ev-odd-key"),
        (
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/sns-s3.json.gz",
            "ev-sns-s3",
        ),
    ] {
        trail
            .s3
            .put_object()
            .bucket("raw")
            .key(key)
            .body(ByteStream::from(disable_key_file(id)))
            .send()
            .await
            .unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(work.path(), "files_in_flight = 2\n");
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));

    // Through the bucket's own notifications: a good file, then the same notification
    // again (duplicate), a digest, and a damaged file.
    trail
        .put(
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/good.json.gz".into(),
            disable_key_file("ev-good"),
        )
        .await;
    let mal = malformed();
    trail
        .put(
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/truncated.json.gz".into(),
            std::fs::read(mal.join("truncated.json.gz")).unwrap(),
        )
        .await;
    trail.put("AWSLogs/111122223333/CloudTrail-Digest/us-east-1/2026/10/01/111122223333_CloudTrail-Digest_us-east-1_t_us-east-1_20261001T1200Z.json.gz".into(), b"{}".to_vec()).await;
    let s3_event = |bucket: &str, key: &str| {
        let encoded: String = url_form_encode(key);
        serde_json::json!({"Records": [{"eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-10-01T12:05:00.000Z",
            "eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": {"key": encoded, "size": 10, "eTag": "e-".to_string() + key}}}]})
        .to_string()
    };
    trail
        .send_raw(&s3_event(
            &trail.bucket,
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/good.json.gz",
        ))
        .await;
    // The other forms.
    let ct = serde_json::json!({"s3Bucket": "raw", "s3ObjectKey": ["AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/sns.json.gz"]}).to_string();
    trail.send_raw(&serde_json::json!({"Type": "Notification", "MessageId": "m1", "TopicArn": "arn:aws:sns:us-east-1:111122223333:trail", "Message": ct}).to_string()).await;
    trail.send_raw(&serde_json::json!({"Type": "Notification", "MessageId": "m2", "Message": s3_event("raw", "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/sns-s3.json.gz")}).to_string()).await;
    trail.send_raw(&serde_json::json!({"version": "0", "detail-type": "Object Created", "source": "aws.s3", "time": "2026-10-01T12:05:00Z",
        "detail": {"bucket": {"name": "raw"}, "object": {"key": "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/eventbridge.json.gz", "etag": "x"}}}).to_string()).await;
    trail.send_raw(&s3_event("raw", odd)).await;
    trail.send_raw(r#"{"Service":"Amazon S3","Event":"s3:TestEvent","Time":"2026-10-01T00:00:00.000Z","Bucket":"raw"}"#).await;
    trail.send_raw("this is not json").await;
    // Announced, but deleted before it is read.
    trail
        .send_raw(&s3_event(
            "raw",
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/gone.json.gz",
        ))
        .await;

    trail.wait_drained(Duration::from_secs(120)).await;
    // Give the outbox a moment to deliver what the last commit produced.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigterm(&daemon);
    let (code, _) = wait_exit(&mut daemon, Duration::from_secs(15));
    assert_eq!(code, Some(0));
    let findings = sink(work.path());
    let log = std::fs::read_to_string(work.path().join("daemon.log")).unwrap();
    for id in [
        "ev-good",
        "ev-sns",
        "ev-sns-s3",
        "ev-eventbridge",
        "ev-odd-key",
    ] {
        assert_eq!(
            rules_for(&findings, id),
            vec!["kms-key-disabled".to_string()],
            "{id} analyzed exactly once\n{log}"
        );
    }
    // The five DisableKeys of one key by one role in one hour are one folded finding:
    // each file counted once, the duplicate notification not at all.
    let disabled: Vec<&Value> = findings
        .iter()
        .filter(|f| f["rule"] == "kms-key-disabled")
        .collect();
    assert_eq!(disabled.len(), 1, "{disabled:?}");
    assert_eq!(disabled[0]["count"], 5, "{}", disabled[0]);
    let health: Vec<&str> = findings
        .iter()
        .filter(|f| f["kind"] == "health")
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    let mut sorted = health.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![
            "health-corrupt-file",
            "health-object-missing",
            "health-unknown-message"
        ],
        "each failure reported once\n{log}"
    );
    // The truncated file's good records were analyzed (the malformed corpus' record is
    // a plain Decrypt, which raises nothing, so check the metrics instead: see the
    // metrics test) and its message, the missing object's and the unknown body went to
    // the dead-letter queue after their redeliveries.
    assert_eq!(trail.depth(&trail.dlq).await, 3, "{log}");
    assert_only_updates(&sink_lines(work.path()));
}

/// S3 answers GetObject for one file with 503 SlowDown, 500 InternalError, then 503
/// again (tests/servers/s3_fault_proxy.py in front of moto; SQS goes through it
/// untouched). With `transient_retries = 1` the daemon retries once in place, releases
/// the message, and on redelivery retries once more and succeeds: the file is analyzed
/// and its finding delivered exactly once, and another file is not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_get_object_errors_are_retried_and_processed_once() {
    use crate::servers::FaultProxy;
    let trail = Trail::new().await;
    let flaky = "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/111122223333_CloudTrail_us-east-1_20261001T1205Z_flaky.json.gz";
    let steady = "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/111122223333_CloudTrail_us-east-1_20261001T1205Z_steady.json.gz";
    let proxy = FaultProxy::start(
        &trail.moto.endpoint(),
        &serde_json::json!({"get_errors": 3, "match": "_flaky."}),
    );
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(work.path(), "transient_retries = 1\n");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(&trail.moto.endpoint(), &proxy.endpoint());
    std::fs::write(&cfg, text).unwrap();
    let mut daemon = trail.start(&cfg, &work.path().join("daemon.log"));
    let started = Instant::now();
    trail.put(flaky.into(), disable_key_file("ev-flaky")).await;
    trail
        .put(steady.into(), disable_key_file("ev-steady"))
        .await;
    trail.wait_drained(Duration::from_secs(90)).await;
    let drained = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigterm(&daemon);
    let (code, _) = wait_exit(&mut daemon, Duration::from_secs(15));
    assert_eq!(code, Some(0));
    let log = std::fs::read_to_string(work.path().join("daemon.log")).unwrap();
    let st = proxy.stats();
    assert_eq!(st["get_errors"], 3, "{st}");
    assert_eq!(
        st["per_key"][flaky], 4,
        "2 attempts, released, 2 attempts: {st}"
    );
    assert_eq!(st["per_key"][steady], 1, "{st}");
    let findings = sink(work.path());
    assert_eq!(
        rules_for(&findings, "ev-flaky"),
        vec!["kms-key-disabled".to_string()],
        "analyzed exactly once\n{log}"
    );
    assert_eq!(
        rules_for(&findings, "ev-steady"),
        vec!["kms-key-disabled".to_string()]
    );
    assert!(
        !findings.iter().any(|f| f["kind"] == "health"),
        "a transient error is no health finding\n{log}"
    );
    assert_eq!(
        log.matches("transient S3 error; retrying").count(),
        2,
        "{log}"
    );
    assert_eq!(
        log.matches("releasing the message for redelivery").count(),
        1
    );
    assert!(log.contains("S3 answered 503 SlowDown: Please reduce your request rate."));
    assert_eq!(trail.depth(&trail.dlq).await, 0);
    eprintln!("FIGURES: a GetObject failing 3 times (503, 500, 503) was processed once, {drained:?} after upload (one release for redelivery)");
}

/// `application/x-www-form-urlencoded`, as S3 writes keys into event notifications.
fn url_form_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'*' | b'/' => {
                out.push(b as char)
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_no_finding() {
    let corpus = generate(&[
        "--hours",
        "24",
        "--events-per-hour",
        "3000",
        "--seed",
        "12",
        "--scenarios",
        "key_disabled,rotation_disabled,policy_public,root_kms_usage,cloudtrail_stopped",
        "--warmup",
        "0.3",
    ]);
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let cfg = trail.config(work.path(), "files_in_flight = 4\n");
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let trail = std::sync::Arc::new(trail);
    let uploader = {
        let trail = trail.clone();
        let dir = corpus.join("AWSLogs");
        tokio::spawn(async move { trail.upload_dir(&dir).await })
    };
    // Kill it hard while files are in flight and findings wait in the outbox.
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink(work.path()).is_empty() {
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    let files = uploader.await.unwrap();
    let before_restart = sink(work.path()).len();
    let mut daemon = trail.start(&cfg, &log);
    trail.wait_drained(Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(15)).0, Some(0));

    let findings = sink_lines(work.path());
    let mut seen = HashSet::new();
    let duplicates = findings
        .iter()
        .filter(|f| !seen.insert(f["id"].as_str().unwrap().to_string()))
        .count();
    // Every rule finding of a local replay of the same files reached the sink.
    let (replayed, _, _) = replay_jsonl(&[&corpus.join("AWSLogs")], &["--no-baselines"]);
    assert!(!replayed.is_empty());
    for f in &replayed {
        assert!(
            seen.contains(f["id"].as_str().unwrap()),
            "lost after kill -9: {f}"
        );
    }
    eprintln!(
        "kill -9 after {before_restart} findings delivered; {} files; {} findings in the sink, {duplicates} delivered twice (same id)",
        files,
        findings.len()
    );
    assert!(
        duplicates <= 1000,
        "duplicates are bounded by one outbox batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_metrics_healthz_and_sighup() {
    let trail = Trail::new().await;
    let work = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = trail.config(
        work.path(),
        &format!("files_in_flight = 4\n\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let log = work.path().join("daemon.log");
    let mut daemon = trail.start(&cfg, &log);
    let get = |path: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        std::io::Write::write_all(
            &mut s,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .ok()?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).ok()?;
        Some(out)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while get("/healthz").is_none() {
        assert!(Instant::now() < deadline, "metrics endpoint never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(get("/healthz").unwrap().starts_with("HTTP/1.1 200"));

    // End-to-end latency: PutObject returned -> the finding is in the sink.
    let mut latencies = Vec::new();
    for i in 0..30 {
        let id = format!("ev-latency-{i}");
        let key = format!("AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/lat-{i}.json.gz");
        trail.put(key, disable_key_file(&id)).await;
        let t0 = Instant::now();
        loop {
            if !rules_for(&sink(work.path()), &id).is_empty() {
                latencies.push(t0.elapsed());
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "finding {id} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    latencies.sort();
    let p = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    eprintln!(
        "PutObject -> finding in the sink: median {:?}, p99 {:?} (n = {})",
        p(0.5),
        p(0.99),
        latencies.len()
    );

    let lines = [
        "kmsguard_files_processed_total 30",
        "kmsguard_findings_total{rule=\"kms-key-disabled\",severity=\"high\"} 30",
        "kmsguard_findings_delivered_total 30",
        "kmsguard_outbox_depth 0",
    ];
    // The sink writes the finding before the delivery is recorded and counted: wait for
    // the counters to catch up (a race seen once under load, not a lost delivery).
    let t0 = Instant::now();
    let mut metrics = get("/metrics").unwrap();
    while !lines.iter().all(|l| metrics.contains(l)) && t0.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        metrics = get("/metrics").unwrap();
    }
    for line in lines {
        assert!(metrics.contains(line), "missing `{line}` in:\n{metrics}");
    }
    assert!(metrics.contains("kmsguard_lag_event_seconds "));

    // SIGHUP with broken rules keeps the old ones; with good rules, new ones apply.
    let rules = work.path().join("rules.toml");
    std::fs::write(&rules, "[[rule]]\nid = \"broken\"\n").unwrap();
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap().replace(
            "[state]",
            &format!("[rules]\npath = \"{}\"\n\n[state]", rules.display()),
        ),
    )
    .unwrap();
    let hup = || {
        Command::new("kill")
            .args(["-HUP", &daemon.id().to_string()])
            .status()
            .unwrap()
    };
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    trail
        .put(
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/after-bad-hup.json.gz".into(),
            disable_key_file("ev-after-bad-hup"),
        )
        .await;
    let wp = work.path().to_path_buf();
    let wait_for = |id: &'static str| {
        let wp = wp.clone();
        async move {
            let t0 = Instant::now();
            while rules_for(&sink(&wp), id).is_empty() {
                assert!(t0.elapsed() < Duration::from_secs(30), "{id} never arrived");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for("ev-after-bad-hup").await;
    assert_eq!(
        rules_for(&sink(work.path()), "ev-after-bad-hup"),
        vec!["kms-key-disabled"],
        "old rules kept"
    );
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("SIGHUP: the new rules are invalid; keeping the old ones"),
        "{log_text}"
    );

    std::fs::write(
        &rules,
        "[[rule]]\nid = \"any-disable\"\ntitle = \"t\"\nseverity = \"low\"\ndescription = \"reloaded\"\nevent_names = [\"DisableKey\"]\n",
    )
    .unwrap();
    hup();
    tokio::time::sleep(Duration::from_millis(500)).await;
    trail
        .put(
            "AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/after-good-hup.json.gz".into(),
            disable_key_file("ev-after-good-hup"),
        )
        .await;
    wait_for("ev-after-good-hup").await;
    assert_eq!(
        rules_for(&sink(work.path()), "ev-after-good-hup"),
        vec!["any-disable"],
        "new rules apply"
    );

    sigterm(&daemon);
    assert_eq!(wait_exit(&mut daemon, Duration::from_secs(15)).0, Some(0));
}

#[test]
fn systemd_unit_is_hardened() {
    let unit = repo().join("systemd/kmsguard.service");
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze runs (scripts/test installs systemd when it is missing)");
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("{text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("{line}");
    assert!(score <= 2.0, "{line}");
    let body = std::fs::read_to_string(&unit).unwrap();
    for must in [
        "Type=notify",
        "WatchdogSec=",
        "StateDirectory=kmsguard",
        "DynamicUser=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(body.contains(must), "{must}");
    }
}
