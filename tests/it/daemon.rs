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
        let moto = Moto::start();
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

    pub fn start(&self, config: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        bin()
            .args(["run", "--log-format", "json", "--config"])
            .arg(config)
            .envs(self.moto.env())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }
}

async fn futures_join<F: std::future::Future<Output = ()>>(futs: impl Iterator<Item = F>) {
    let handles: Vec<_> = futs.collect();
    for h in handles {
        h.await;
    }
}

pub fn sink(dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(dir.join("findings.jsonl"))
        .map(|t| jsonl(&t))
        .unwrap_or_default()
}

fn sigterm(child: &Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

use std::process::Command;

/// Waits for the child to exit; returns its exit code and how long it took.
fn wait_exit(child: &mut Child, timeout: Duration) -> (Option<i32>, Duration) {
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

    let findings = sink(work.path());
    let ids: Vec<&str> = findings.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no finding delivered twice"
    );
    // The daemon sees what a local replay of the same files sees.
    let (replayed, _, _) = replay_jsonl(&[&corpus.join("AWSLogs")], &[]);
    let got: HashSet<(String, String)> = findings
        .iter()
        .filter(|f| f["kind"] != "health")
        .map(|f| {
            (
                f["rule"].as_str().unwrap().to_string(),
                strs(&f["event_ids"]).join(","),
            )
        })
        .collect();
    let truth = truth(&corpus);
    let injected: HashSet<String> = truth.iter().flat_map(|t| strs(&t["eventIDs"])).collect();
    for f in &replayed {
        let events = strs(&f["event_ids"]);
        if events.iter().any(|e| injected.contains(e)) {
            let key = (f["rule"].as_str().unwrap().to_string(), events.join(","));
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
fn disable_key_file(event_id: &str) -> Vec<u8> {
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
    let ids: Vec<&str> = findings.iter().map(|f| f["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>().len(),
        ids.len(),
        "no duplicates"
    );
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
