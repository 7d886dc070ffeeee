//! Forensic replay from a trail bucket in moto's S3: a time window selects exactly the
//! files whose name stamps fall in it, the findings equal those of a local replay of the
//! same files, and listing a one-day window of a 30-day bucket takes few requests.

use crate::support::*;
use aws_sdk_s3::primitives::ByteStream;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

const BUCKET: &str = "org-cloudtrail-logs";

/// Every `.json.gz` under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".json.gz") {
                out.push(p);
            }
        }
    }
    out
}

/// The name stamp of a CloudTrail file as `YYYYMMDDTHHMMZ`, computed here independently
/// of kmsguard's own parser.
fn stamp(p: &Path) -> String {
    let name = p.file_name().unwrap().to_string_lossy().into_owned();
    name.split('_').nth(3).expect("stamp in name").to_string()
}

async fn s3_client(moto: &Moto) -> aws_sdk_s3::Client {
    let sdk = moto.sdk("us-east-1").await;
    kmsguard::aws::s3_client(
        &sdk,
        &kmsguard::aws::AwsSettings {
            s3_force_path_style: true,
            ..Default::default()
        },
    )
}

/// Uploads the ctgen corpus in `dir` under `prefix` (keys `PREFIX/AWSLogs/...`).
async fn upload(s3: &aws_sdk_s3::Client, dir: &Path, prefix: &str) -> usize {
    let files = files_under(dir);
    let mut set = tokio::task::JoinSet::new();
    for p in files.clone() {
        let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
        let key = if prefix.is_empty() {
            rel
        } else {
            format!("{prefix}/{rel}")
        };
        let s3 = s3.clone();
        set.spawn(async move {
            s3.put_object()
                .bucket(BUCKET)
                .key(key)
                .body(ByteStream::from(std::fs::read(&p).unwrap()))
                .send()
                .await
                .unwrap();
        });
        if set.len() >= 16 {
            set.join_next().await.unwrap().unwrap();
        }
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
    files.len()
}

/// Runs `kmsguard replay ARGS --format jsonl --summary json`; (findings, summary).
fn replay_summary(moto: Option<&Moto>, args: &[&str]) -> (Vec<Value>, Value, f64) {
    let mut cmd = bin();
    cmd.arg("replay")
        .args(args)
        .args(["--format", "jsonl", "--summary", "json", "--quiet"]);
    if let Some(m) = moto {
        cmd.envs(m.env());
    }
    let started = Instant::now();
    let o = run(&mut cmd);
    let wall = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "replay failed: {}", stderr(&o));
    let err = stderr(&o);
    let summary = err
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary on stderr: {err}"));
    (jsonl(&stdout(&o)), summary, wall)
}

fn ids(findings: &[Value]) -> BTreeSet<(String, String)> {
    findings
        .iter()
        .map(|f| {
            (
                f["rule"].as_str().unwrap_or("").to_string(),
                f["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_window_selects_exact_files_and_matches_local_replay() {
    let corpus = generate(&[
        "--org-trail",
        "--hours",
        "96",
        "--events-per-hour",
        "300",
        "--scenarios",
        "all",
        "--seed",
        "5",
    ]);
    let moto = Moto::start();
    let s3 = s3_client(&moto).await;
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();
    let started = Instant::now();
    let n = upload(&s3, &corpus, "trail").await;
    eprintln!(
        "uploaded {n} files in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The window: 2026-10-03T06:00Z to 2026-10-04T20:00Z, inclusive; it covers the
    // incidents after ctgen's warm-up (70% of 96 hours) and cuts days in the middle.
    let (from, to) = ("20261003T0600Z", "20261004T2000Z");
    let expected: Vec<PathBuf> = files_under(&corpus)
        .into_iter()
        .filter(|p| {
            let s = stamp(p);
            s.as_str() >= from && s.as_str() <= to
        })
        .collect();
    let expected_bytes: u64 = expected
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(expected.len() > 100 && expected.len() < n);

    let (remote, summary, remote_wall) = replay_summary(
        Some(&moto),
        &[
            "s3://org-cloudtrail-logs/trail",
            "--from",
            "2026-10-03T06:00:00Z",
            "--to",
            "2026-10-04T20:00:00Z",
        ],
    );
    let stats = &summary["stats"];
    assert_eq!(stats["files"], expected.len() as u64, "files read from S3");
    assert_eq!(
        stats["compressed_bytes"], expected_bytes,
        "bytes read from S3 = the selected files' sizes"
    );
    assert_eq!(stats["bad_files"], 0);
    let list_requests = stats["list_requests"].as_u64().unwrap();
    // root, the organization, 2 accounts' regions, then 2 accounts x 3 regions x 2 days.
    assert!(list_requests <= 1 + 1 + 2 + 12, "{list_requests} listings");
    assert!(remote.iter().all(|f| f["file"]
        .as_str()
        .unwrap()
        .starts_with("s3://org-cloudtrail-logs/trail/AWSLogs/")));

    // A local replay of exactly those files finds the same.
    let local_dir = tempfile::tempdir().unwrap();
    for p in &expected {
        let dest = local_dir.path().join(p.strip_prefix(&corpus).unwrap());
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(p, dest).unwrap();
    }
    let (local, local_summary, local_wall) =
        replay_summary(None, &[local_dir.path().to_str().unwrap()]);
    assert_eq!(local_summary["stats"]["files"], expected.len() as u64);
    assert!(!local.is_empty());
    assert_eq!(
        ids(&remote),
        ids(&local),
        "findings from S3 = local findings"
    );
    let mb = expected_bytes as f64 / 1e6;
    let json_mb = stats["json_bytes"].as_u64().unwrap() as f64 / 1e6;
    eprintln!(
        "FIGURES: {} files, {mb:.1} MB gzipped ({json_mb:.1} MB JSON); moto S3: {remote_wall:.2} s wall = {:.1} MB/s JSON, {list_requests} ListObjectsV2 requests; local disk: {local_wall:.2} s wall = {:.1} MB/s JSON; {} findings",
        expected.len(),
        json_mb / remote_wall,
        json_mb / local_wall,
        remote.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_one_day_of_a_30_day_bucket_lists_few_prefixes() {
    let corpus = generate(&[
        "--org-trail",
        "--hours",
        "720",
        "--events-per-hour",
        "12",
        "--seed",
        "3",
    ]);
    let moto = Moto::start();
    let s3 = s3_client(&moto).await;
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();
    upload(&s3, &corpus, "").await;
    let day = |p: &Path| stamp(p).starts_with("20261015");
    let all = files_under(&corpus);
    let expected = all.iter().filter(|p| day(p)).count();
    assert!(expected > 0);
    let (_, summary, _) = replay_summary(
        Some(&moto),
        &[
            "s3://org-cloudtrail-logs",
            "--from",
            "2026-10-15",
            "--to",
            "2026-10-15T23:59:59Z",
        ],
    );
    let stats = &summary["stats"];
    assert_eq!(stats["files"], expected as u64);
    let discovered = stats["list_requests"].as_u64().unwrap();
    // Root, organization, 2 accounts' region folders, 2 x 3 day prefixes.
    assert_eq!(discovered, 1 + 1 + 2 + 6, "listings with discovery");

    // Naming the account and region leaves one discovery listing (the organization id)
    // and one day prefix.
    let (_, summary, _) = replay_summary(
        Some(&moto),
        &[
            "s3://org-cloudtrail-logs/AWSLogs",
            "--from",
            "2026-10-15",
            "--to",
            "2026-10-15T23:59:59Z",
            "--account",
            "111122223333",
            "--region",
            "eu-west-1",
        ],
    );
    let stats = &summary["stats"];
    let one = all
        .iter()
        .filter(|p| {
            day(p)
                && p.to_string_lossy()
                    .contains("/111122223333/CloudTrail/eu-west-1/")
        })
        .count();
    assert_eq!(stats["files"], one as u64);
    let scoped = stats["list_requests"].as_u64().unwrap();
    assert_eq!(scoped, 2);
    eprintln!(
        "FIGURES: one-day window of a 30-day bucket ({} files in all, {expected} that day): {discovered} ListObjectsV2 requests with discovery, {scoped} with --account and --region",
        all.len()
    );
}

/// The LookupEvents stub (tests/servers/lookup_events_stub.py), killed on drop.
struct LookupStub {
    port: u16,
    _child: crate::support::Proc,
}

impl LookupStub {
    fn start(corpus: &Path, throttle_every: u32) -> LookupStub {
        let port = free_port();
        let child = crate::support::Proc::spawn(
            std::process::Command::new(python())
                .arg(repo().join("tests/servers/lookup_events_stub.py"))
                .arg(port.to_string())
                .arg(corpus)
                .arg(throttle_every.to_string())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let stub = LookupStub {
            port,
            _child: child,
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "stub did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        stub
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "AWS_ENDPOINT_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// GET /stats.
    fn stats(&self) -> Value {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(b"GET /stats HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap()
    }
}

/// Every record of the ctgen corpus in `dir`.
fn records(dir: &Path) -> Vec<Value> {
    use std::io::Read;
    let mut out = Vec::new();
    for p in files_under(dir) {
        let mut text = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&p).unwrap())
            .read_to_string(&mut text)
            .unwrap();
        let doc: Value = serde_json::from_str(&text).unwrap();
        out.extend(doc["Records"].as_array().unwrap().iter().cloned());
    }
    out
}

#[test]
fn lookup_events_path_finds_the_same_incidents() {
    let corpus = generate(&[
        "--hours",
        "6",
        "--events-per-hour",
        "600",
        "--scenarios",
        "key_deletion_scheduled,key_disabled,policy_public,grant_external,root_kms_usage,denied_decrypt_burst,reencrypt_to_external_key",
        "--warmup",
        "0.3",
        "--seed",
        "9",
    ]);
    let stub = LookupStub::start(&corpus, 4);
    let mut cmd = bin();
    cmd.args([
        "replay",
        "cloudtrail://us-east-1",
        "--from",
        "2026-10-01T00:00:00Z",
        "--to",
        "2026-10-01T05:59:59Z",
        "--format",
        "jsonl",
        "--summary",
        "json",
        "--quiet",
    ])
    .envs(stub.env());
    let started = Instant::now();
    let o = run(&mut cmd);
    let wall = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "replay failed: {}", stderr(&o));
    let api = jsonl(&stdout(&o));
    let summary: Value = stderr(&o)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("JSON summary");

    // What the API holds for that query: KMS events of us-east-1 in the window, replayed
    // locally as one file in time order.
    let mut served: Vec<Value> = records(&corpus)
        .into_iter()
        .filter(|r| {
            r["eventSource"] == "kms.amazonaws.com"
                && r["awsRegion"] == "us-east-1"
                && r["eventTime"].as_str().unwrap() <= "2026-10-01T05:59:59Z"
        })
        .collect();
    served.sort_by(|a, b| a["eventTime"].as_str().cmp(&b["eventTime"].as_str()));
    assert!(served.len() > 100, "{} events", served.len());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("served.json");
    std::fs::write(
        &file,
        serde_json::to_vec(&serde_json::json!({ "Records": served })).unwrap(),
    )
    .unwrap();
    let (local, _, code) = replay_jsonl(&[&file], &[]);
    assert_eq!(code, 0);
    assert_eq!(summary["stats"]["kms_records"], served.len() as u64);
    assert_eq!(
        ids(&api),
        ids(&local),
        "LookupEvents findings = local findings"
    );

    // Every injected incident whose events the API serves is found.
    let served_ids: BTreeSet<String> = served
        .iter()
        .map(|r| r["eventID"].as_str().unwrap().to_string())
        .collect();
    let found: BTreeSet<String> = api.iter().flat_map(|f| strs(&f["event_ids"])).collect();
    let mut checked = 0;
    for inc in truth(&corpus) {
        let evs = strs(&inc["eventIDs"]);
        if evs.iter().all(|e| served_ids.contains(e)) {
            checked += 1;
            assert!(
                evs.iter().any(|e| found.contains(e)),
                "incident {} not found through LookupEvents",
                inc["scenario"]
            );
        }
    }
    assert!(checked >= 3, "{checked} incidents checked");

    // Paced under 2 requests per second, throttling absorbed, every request counted.
    let st = stub.stats();
    assert_eq!(st["violations"], 0, "{st}");
    assert_eq!(st["bad_requests"], 0, "{st}");
    assert!(st["throttled"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(summary["stats"]["api_requests"], st["requests"]);
    assert_eq!(summary["stats"]["api_throttled"], st["throttled"]);
    assert!(st["pages"].as_u64().unwrap() > 6, "pagination used: {st}");
    eprintln!(
        "FIGURES: LookupEvents stub: {} events in {} pages, {} requests ({} throttled), {wall:.1} s, {checked} incidents checked, {} findings",
        served.len(),
        st["pages"],
        st["requests"],
        st["throttled"],
        api.len()
    );
}

/// The headless Chromium of the test machine ($KMSGUARD_CHROMIUM, else `chromium`;
/// scripts/test installs it when missing).
fn chromium(profile: &Path) -> std::process::Command {
    let bin = std::env::var_os("KMSGUARD_CHROMIUM").unwrap_or_else(|| "chromium".into());
    let mut c = std::process::Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// The principal kmsguard's tables use: the role of an assumed role, else the ARN, else
/// the calling service (computed here from the JSON, independently of kmsguard).
fn principal_of(r: &Value) -> String {
    let id = &r["userIdentity"];
    if id["type"] == "AssumedRole" {
        if let Some(a) = id["sessionContext"]["sessionIssuer"]["arn"].as_str() {
            return a.to_string();
        }
    }
    id["arn"]
        .as_str()
        .or(id["invokedBy"].as_str())
        .or(id["principalId"].as_str())
        .unwrap_or("-")
        .to_string()
}

/// The chart note's time span for these hours (`2026-10-01T00:00:00Z to ...T07:59:59Z`).
fn hours_note(per_hour: &std::collections::BTreeMap<String, u64>) -> String {
    let first = per_hour.keys().next().cloned().unwrap_or_default();
    let last = per_hour.keys().last().cloned().unwrap_or_default();
    format!("{first} to {}:59:59Z, UTC", &last[..13])
}

/// Undoes the entity escapes of an attribute value in serialized HTML.
fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

#[test]
fn html_report_renders_the_replay_in_chromium() {
    use std::collections::BTreeMap;
    use std::io::Write;
    let corpus = generate(&[
        "--hours",
        "8",
        "--events-per-hour",
        "400",
        "--scenarios",
        "key_deletion_scheduled,policy_public,root_kms_usage,denied_decrypt_burst",
        "--warmup",
        "0.3",
        "--seed",
        "21",
    ]);
    // A hostile record: markup in the principal and user agent must stay text.
    let hostile = serde_json::json!({"Records": [{
        "eventVersion": "1.09", "eventSource": "kms.amazonaws.com", "eventName": "Decrypt",
        "eventTime": "2026-10-01T03:10:00Z", "eventID": "hostile-1", "awsRegion": "us-east-1",
        "recipientAccountId": "111122223333", "sourceIPAddress": "203.0.113.9",
        "userAgent": "</script><script>document.body.setAttribute('data-pwned','1')</script>",
        "userIdentity": {"type": "IAMUser", "accountId": "111122223333",
            "arn": "arn:aws:iam::111122223333:user/<img src=x onerror=\"document.body.setAttribute('data-pwned','2')\">"},
        "resources": [{"type": "AWS::KMS::Key", "ARN": "arn:aws:kms:us-east-1:111122223333:key/hostile"}]
    }]});
    let hostile_path = corpus.join("AWSLogs/111122223333/CloudTrail/us-east-1/2026/10/01/111122223333_CloudTrail_us-east-1_20261001T0315Z_hostile0000000000.json.gz");
    std::fs::create_dir_all(hostile_path.parent().unwrap()).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(hostile.to_string().as_bytes()).unwrap();
    std::fs::write(&hostile_path, gz.finish().unwrap()).unwrap();

    let out = tempfile::Builder::new()
        .prefix("kmsguard-report-")
        .tempdir()
        .unwrap()
        .keep();
    let report = out.join("report.html");
    let (findings, _, code) = replay_jsonl(
        &[&corpus],
        &["--report", report.to_str().unwrap(), "--quiet"],
    );
    assert_eq!(code, 0);
    assert!(!findings.is_empty());

    // Independent counts from the records.
    let kms: Vec<Value> = records(&corpus)
        .into_iter()
        .filter(|r| r["eventSource"] == "kms.amazonaws.com")
        .collect();
    let mut per_hour: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_op: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_principal: BTreeMap<String, u64> = BTreeMap::new();
    for r in &kms {
        let t = r["eventTime"].as_str().unwrap();
        *per_hour.entry(format!("{}:00:00Z", &t[..13])).or_default() += 1;
        *per_op
            .entry(r["eventName"].as_str().unwrap().to_string())
            .or_default() += 1;
        *per_principal.entry(principal_of(r)).or_default() += 1;
    }

    let profile = tempfile::tempdir().unwrap();
    // The page as Chromium renders it, with the filter given in the URL fragment.
    let dump = |fragment: &str| -> String {
        let o = chromium(profile.path())
            .arg("--dump-dom")
            .arg(format!("file://{}{fragment}", report.display()))
            .output()
            .expect("chromium runs (scripts/test installs it; or set KMSGUARD_CHROMIUM)");
        assert!(o.status.success(), "chromium: {}", stderr(&o));
        let dom = stdout(&o);
        assert!(dom.contains("data-rendered=\"1\""), "the page's script ran");
        dom
    };
    let bar = regex::Regex::new(
        r#"<rect class="bar"[^>]*data-hour="([^"]*)" data-op="([^"]*)" data-count="(\d+)""#,
    )
    .unwrap();
    // The drawn bars: events per hour and per operation.
    let drawn = |dom: &str| {
        let mut per_hour: BTreeMap<String, u64> = BTreeMap::new();
        let mut per_op: BTreeMap<String, u64> = BTreeMap::new();
        for c in bar.captures_iter(dom) {
            let n: u64 = c[3].parse().unwrap();
            *per_hour.entry(c[1].to_string()).or_default() += n;
            *per_op.entry(unescape(&c[2])).or_default() += n;
        }
        (per_hour, per_op)
    };
    let legend = regex::Regex::new(r#"<span data-op="([^"]*)" data-count="(\d+)">"#).unwrap();
    let legend_total = |dom: &str| -> u64 {
        legend
            .captures_iter(dom)
            .map(|c| c[2].parse::<u64>().unwrap())
            .sum()
    };
    let dom = dump("");

    assert!(
        !dom.contains("data-pwned=\""),
        "markup from the logs was executed"
    );
    assert!(
        !dom.contains("<img"),
        "markup from the logs became an element"
    );

    // The chart: bars per hour and operation add up to the records'.
    let (drawn_hour, drawn_op) = drawn(&dom);
    assert_eq!(drawn_hour, per_hour, "events per hour in the chart");
    for (op, n) in &drawn_op {
        if op != "(other)" {
            assert_eq!(per_op.get(op), Some(n), "{op} in the chart");
        }
    }
    assert_eq!(drawn_op.values().sum::<u64>(), kms.len() as u64);
    assert_eq!(legend_total(&dom), kms.len() as u64, "legend counts");

    // The principal table.
    let row = regex::Regex::new(r#"<tr data-principal="([^"]*)" data-count="(\d+)">"#).unwrap();
    let mut table: BTreeMap<String, u64> = BTreeMap::new();
    for c in row.captures_iter(&dom) {
        table.insert(unescape(&c[1]), c[2].parse().unwrap());
    }
    assert_eq!(table, per_principal, "events per principal in the table");
    assert!(
        dom.contains("user/&lt;img src=x onerror="),
        "hostile ARN shown as text"
    );

    // Findings: one row each, and a marker for each on the chart.
    assert_eq!(dom.matches("<tr data-rule=").count(), findings.len());
    assert_eq!(dom.matches("class=\"marker ").count(), findings.len());

    // Filtered in the page (the URL fragment sets the filter): the bars are recomputed
    // from the embedded per-(hour, operation, principal, key) counts. Expected counts
    // come from the records: the busiest principal, given as a case-changed part of its
    // name, then that principal and its busiest key (by the key's id alone).
    let busiest = per_principal
        .iter()
        .filter(|(p, _)| !p.contains('<'))
        .max_by_key(|(p, n)| (**n, std::cmp::Reverse((*p).clone())))
        .map(|(p, _)| p.clone())
        .unwrap();
    let needle = busiest.rsplit('/').next().unwrap().to_string();
    let key_of = |r: &Value| -> Vec<String> {
        r["resources"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["type"] == "AWS::KMS::Key")
                    .filter_map(|x| x["ARN"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut busiest_keys: BTreeMap<String, u64> = BTreeMap::new();
    for r in kms.iter().filter(|r| principal_of(r) == busiest) {
        for k in key_of(r) {
            *busiest_keys.entry(k).or_default() += 1;
        }
    }
    let key_id = busiest_keys
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, _)| k.rsplit('/').next().unwrap().to_string())
        .expect("the busiest principal used a key");
    let other_key_uses = kms
        .iter()
        .filter(|r| {
            principal_of(r)
                .to_lowercase()
                .contains(&needle.to_lowercase())
        })
        .filter(|r| !key_of(r).iter().any(|k| k.contains(&key_id)))
        .count();
    // And the busiest key of all, alone.
    let mut all_keys: BTreeMap<String, u64> = BTreeMap::new();
    for r in &kms {
        for k in key_of(r) {
            *all_keys.entry(k).or_default() += 1;
        }
    }
    let top_key = all_keys
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(k, _)| k.rsplit('/').next().unwrap().to_string())
        .unwrap();
    for (fragment, principal, key) in [
        (
            format!("#principal={}", needle.to_uppercase()),
            Some(needle.as_str()),
            None,
        ),
        (format!("#key={top_key}"), None, Some(top_key.as_str())),
        (
            format!("#principal={needle}&key={}", key_id.to_uppercase()),
            Some(needle.as_str()),
            Some(key_id.as_str()),
        ),
    ] {
        let matching: Vec<&Value> = kms
            .iter()
            .filter(|r| {
                principal.is_none_or(|p| principal_of(r).to_lowercase().contains(&p.to_lowercase()))
            })
            .filter(|r| key.is_none_or(|k| key_of(r).iter().any(|a| a.contains(k))))
            .collect();
        let mut want_hour: BTreeMap<String, u64> = BTreeMap::new();
        let mut want_op: BTreeMap<String, u64> = BTreeMap::new();
        for r in &matching {
            let t = r["eventTime"].as_str().unwrap();
            *want_hour.entry(format!("{}:00:00Z", &t[..13])).or_default() += 1;
            *want_op
                .entry(r["eventName"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        assert!(
            !matching.is_empty() && matching.len() < kms.len(),
            "{fragment}"
        );
        let dom = dump(&fragment);
        let (got_hour, got_op) = drawn(&dom);
        assert_eq!(
            got_hour, want_hour,
            "{fragment}: events per hour in the chart"
        );
        for (op, n) in &got_op {
            if op != "(other)" {
                assert_eq!(want_op.get(op), Some(n), "{fragment}: {op} in the chart");
            }
        }
        assert_eq!(got_op.values().sum::<u64>(), matching.len() as u64);
        assert_eq!(
            legend_total(&dom),
            matching.len() as u64,
            "{fragment}: legend"
        );
        assert!(
            dom.contains(&format!(
                "data-shown=\"{}\">({}",
                matching.len(),
                hours_note(&per_hour)
            )),
            "{fragment}: the note says how many events match"
        );
        eprintln!(
            "FILTER {fragment}: {} of {} events",
            matching.len(),
            kms.len()
        );
    }
    assert!(other_key_uses > 0, "the key filter removes some events");

    // A rule filter hides findings and their markers, and leaves the bars alone.
    let rule = findings[0]["rule"].as_str().unwrap().to_string();
    let with_rule = findings.iter().filter(|f| f["rule"] == rule).count();
    let dom = dump(&format!("#rule={rule}"));
    assert_eq!(drawn(&dom).0, per_hour, "bars unchanged by a rule filter");
    let marker =
        regex::Regex::new(r#"<path class="marker [^"]*"[^>]*?( style="display: none;")?>"#)
            .unwrap();
    let shown = marker
        .captures_iter(&dom)
        .filter(|c| c.get(1).is_none())
        .count();
    assert_eq!(shown, with_rule, "markers of rule {rule}");

    let shot_filtered = out.join("report-filtered.png");
    let o = chromium(profile.path())
        .args(["--window-size=1300,1400"])
        .arg(format!("--screenshot={}", shot_filtered.display()))
        .arg(format!("file://{}#principal={needle}", report.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "chromium screenshot: {}", stderr(&o));
    assert!(std::fs::metadata(&shot_filtered).unwrap().len() > 10_000);

    let shot = out.join("report.png");
    let o = chromium(profile.path())
        .args(["--window-size=1300,1400"])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", report.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "chromium screenshot: {}", stderr(&o));
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    eprintln!(
        "ARTIFACT: report {} ({} bytes), screenshots {} and {} (filtered by {needle}); {} KMS events, {} principals, {} findings",
        report.display(),
        std::fs::metadata(&report).unwrap().len(),
        shot.display(),
        shot_filtered.display(),
        kms.len(),
        per_principal.len(),
        findings.len()
    );
}

#[test]
fn remote_sources_need_a_window_and_valid_urls() {
    for (args, says) in [
        (vec!["s3://bucket/prefix"], "need --from"),
        (vec!["cloudtrail://us-east-1"], "need --from"),
        (
            vec!["cloudtrail://", "--from", "2026-10-01"],
            "cloudtrail://REGION",
        ),
        (vec!["s3://", "--from", "2026-10-01"], "s3://BUCKET/PREFIX"),
        (
            vec!["s3://b", "--from", "yesterday"],
            "--from yesterday: not a time",
        ),
        (
            vec!["s3://b", "--from", "2026-10-02", "--to", "2026-10-01"],
            "--from is after --to",
        ),
    ] {
        let o = run(bin()
            .arg("replay")
            .args(&args)
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9"));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
    }
}

/// Runs `kmsguard replay ARGS --format jsonl --summary json` (not quiet, so warnings
/// show) with `env`; (findings, summary, stderr, exit code).
fn replay_with_env(
    args: &[&str],
    env: Vec<(&'static str, String)>,
) -> (Vec<Value>, Value, String, i32) {
    let o = run(bin()
        .arg("replay")
        .args(args)
        .args(["--format", "jsonl", "--summary", "json"])
        .envs(env));
    let err = stderr(&o);
    let summary = err
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary on stderr: {err}"));
    (
        jsonl(&stdout(&o)),
        summary,
        err,
        o.status.code().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_transient_errors_are_retried_and_persistent_ones_name_the_file() {
    use crate::servers::FaultProxy;
    let corpus = generate(&[
        "--hours",
        "6",
        "--events-per-hour",
        "300",
        "--scenarios",
        "key_deletion_scheduled,key_disabled,policy_public,root_kms_usage,denied_decrypt_burst",
        "--warmup",
        "0.3",
        "--seed",
        "33",
    ]);
    let moto = Moto::start();
    let s3 = s3_client(&moto).await;
    s3.create_bucket().bucket(BUCKET).send().await.unwrap();
    upload(&s3, &corpus, "trail").await;
    let args = [
        "s3://org-cloudtrail-logs/trail",
        "--from",
        "2026-10-01T00:00:00Z",
        "--to",
        "2026-10-01T05:59:59Z",
    ];

    // Without faults, straight to moto.
    let (clean, clean_summary, err, code) = replay_with_env(&args, moto.env());
    assert_eq!(code, 0, "{err}");
    let files = clean_summary["stats"]["files"].as_u64().unwrap();
    assert!(files > 50 && !clean.is_empty(), "{files} files");
    assert_eq!(clean_summary["stats"]["bad_files"], 0);
    assert_eq!(clean_summary["stats"]["get_requests"], files);

    // Through the proxy: 6 GetObject answered 503/500, then 3 bodies cut by a reset, and
    // 2 ListObjectsV2 answered 503/500. Every one is retried; the findings are the same.
    let proxy = FaultProxy::start(
        &moto.endpoint(),
        &serde_json::json!({"get_errors": 6, "get_resets": 3, "list_errors": 2}),
    );
    let started = Instant::now();
    let (faulty, summary, err, code) = replay_with_env(&args, proxy.env());
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{err}");
    let st = proxy.stats();
    assert_eq!(st["get_errors"], 6, "{st}");
    assert_eq!(st["resets"], 3, "{st}");
    assert_eq!(st["list_errors"], 2, "{st}");
    assert_eq!(
        faulty, clean,
        "findings with transient faults = findings without"
    );
    let stats = &summary["stats"];
    assert_eq!(stats["files"], files);
    assert_eq!(stats["bad_files"], 0, "{err}");
    // Each failure cost exactly one more request: no hidden second layer of retries.
    assert_eq!(st["get"].as_u64().unwrap(), files + 6 + 3, "{st}");
    assert_eq!(
        stats["get_requests"], st["get"],
        "every GetObject attempt counted"
    );
    assert_eq!(stats["get_retries"], 9);
    assert_eq!(
        stats["list_requests"].as_u64().unwrap(),
        clean_summary["stats"]["list_requests"].as_u64().unwrap() + 2
    );
    assert_eq!(stats["list_requests"], st["list"]);
    assert!(
        !err.contains("warning:"),
        "transient faults are not reported: {err}"
    );
    drop(proxy);

    // A file that fails past the retry budget: reported once by name, counted as bad,
    // and the replay goes on (exit 0, as for any bad file).
    let victim = clean
        .iter()
        .find(|f| f["kind"] == "rule")
        .map(|f| f["file"].as_str().unwrap().to_string())
        .unwrap();
    let key = victim
        .strip_prefix("s3://org-cloudtrail-logs/")
        .unwrap()
        .to_string();
    let proxy = FaultProxy::start(&moto.endpoint(), &serde_json::json!({"poison": [key]}));
    let started = Instant::now();
    let (partial, summary, err, code) = replay_with_env(&args, proxy.env());
    let poisoned_wall = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{err}");
    let st = proxy.stats();
    assert_eq!(st["per_key"][&key], 5, "5 attempts in all: {st}");
    assert_eq!(summary["stats"]["bad_files"], 1);
    assert_eq!(summary["stats"]["files"], files);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning:")).collect();
    assert_eq!(warnings.len(), 1, "reported once: {err}");
    assert!(
        warnings[0].starts_with(&format!("warning: {victim}: cannot read: ")),
        "{}",
        warnings[0]
    );
    for says in [
        "5 attempt(s)",
        "503",
        "SlowDown",
        "Please reduce your request rate",
    ] {
        assert!(warnings[0].contains(says), "{says}: {}", warnings[0]);
    }
    assert!(partial.iter().all(|f| f["file"] != victim.as_str()));
    for f in clean
        .iter()
        .filter(|f| f["kind"] == "rule" && f["file"] != victim.as_str())
    {
        assert!(partial.contains(f), "{} still found", f["rule"]);
    }
    drop(proxy);

    // A listing that fails past its 8 attempts stops the replay (the inputs would be
    // incomplete): exit 2, naming the prefix and S3's answer.
    let proxy = FaultProxy::start(&moto.endpoint(), &serde_json::json!({"list_errors": 100}));
    let o = run(bin().arg("replay").args(args).envs(proxy.env()));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("cannot read the trail bucket s3://org-cloudtrail-logs/trail: cannot list s3://org-cloudtrail-logs/trail/AWSLogs/: S3 answered 500 InternalError")
            && err.contains("run the replay again later"),
        "{err}"
    );
    assert_eq!(proxy.stats()["list"], 8, "8 attempts");
    eprintln!(
        "FIGURES: {files} S3 objects; with 6 GetObject 5xx, 3 reset bodies and 2 ListObjectsV2 5xx: {wall:.1} s, {} GetObject requests, findings identical ({}); one poisoned object: {poisoned_wall:.1} s, 5 attempts, reported as {}",
        files + 9,
        clean.len(),
        warnings[0]
    );
}
