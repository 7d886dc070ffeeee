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
