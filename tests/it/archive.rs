//! The encrypted alert archive against moto's KMS and S3 and the real `aws-encryption-cli`:
//! interoperability both ways, tamper detection by `archive verify`, multi-Region replicas,
//! the Archiver's rolling and chain continuation, and the KMS cost per alert.

use crate::support::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const REGION: &str = "us-east-1";

const RULES: [&str; 3] = [
    "kms-key-deletion-scheduled",
    "kms-key-policy-public",
    "kms-grant-cross-account",
];

/// `n` alerts shaped like findings, times increasing, rules and principals varied.
fn alerts(n: usize, start: usize) -> Vec<Value> {
    (start..start + n)
        .map(|i| {
            let rule = RULES[i % 3];
            json!({
                "id": format!("{i:032x}"),
                "kind": "rule",
                "rule": rule,
                "severity": "high",
                "time": format!("2026-10-01T{:02}:{:02}:{:02}Z", (i / 3600) % 24, (i / 60) % 60, i % 60),
                "principal": format!("arn:aws:iam::111122223333:role/app-{}", i % 4),
                "summary": format!("alert number {i} with some text to give it a realistic size ............................................"),
                "keys": ["arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"],
            })
        })
        .collect()
}

fn to_jsonl(alerts: &[Value]) -> String {
    alerts.iter().map(|a| format!("{a}\n")).collect()
}

fn temp() -> PathBuf {
    tempfile::Builder::new()
        .prefix("kmsguard-archive-")
        .tempdir()
        .expect("temp dir")
        .keep()
}

pub async fn create_key(moto: &Moto, multi_region: bool) -> String {
    let kms = kmsguard::aws::kms_client(&moto.sdk(REGION).await, None);
    let k = kms
        .create_key()
        .multi_region(multi_region)
        .send()
        .await
        .expect("create key");
    k.key_metadata().unwrap().arn().unwrap().to_string()
}

pub async fn create_bucket(moto: &Moto, bucket: &str) {
    let s3 = kmsguard::aws::s3_client(
        &moto.sdk(REGION).await,
        &kmsguard::aws::AwsSettings {
            s3_force_path_style: true,
            ..Default::default()
        },
    );
    s3.create_bucket()
        .bucket(bucket)
        .send()
        .await
        .expect("create bucket");
}

fn kmsguard(moto: &Moto, args: &[&str]) -> Output {
    run(bin().envs(moto.env()).args(args))
}

/// Archives `jsonl` with `archive write` and extra args; asserts success.
fn write(moto: &Moto, key: &str, dest: &[&str], extra: &[&str], jsonl: &str) -> Output {
    let input = temp().join("alerts.jsonl");
    std::fs::write(&input, jsonl).unwrap();
    let mut args = vec!["archive", "write", "--key", key, "--host", "test-host"];
    args.extend_from_slice(dest);
    args.extend_from_slice(extra);
    args.push(input.to_str().unwrap());
    let o = kmsguard(moto, &args);
    assert!(o.status.success(), "archive write failed: {}", stderr(&o));
    o
}

/// Segment files under `dir`, in chain order.
pub fn segments(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out)
            } else if p.extension().is_some_and(|e| e == "kga") {
                out.push(p)
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, &mut v);
    v.sort();
    v
}

/// The real aws-encryption-cli, talking to moto only.
pub fn esdk_cli(moto: &Moto, region: &str) -> Command {
    let venv_bin = python().parent().map(Path::to_path_buf).unwrap_or_default();
    let exe = venv_bin.join("aws-encryption-cli");
    let mut c = Command::new(if exe.exists() {
        exe
    } else {
        PathBuf::from("aws-encryption-cli")
    });
    c.env("AWS_ENDPOINT_URL", moto.endpoint())
        .env("AWS_ENDPOINT_URL_KMS", moto.endpoint())
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_DEFAULT_REGION", region)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn segments_decrypt_with_aws_encryption_cli_to_exactly_the_archived_jsonl() {
    let moto = Moto::start();
    let key = create_key(&moto, false).await;
    create_bucket(&moto, "audit").await;
    let dir = temp().join("archive");
    let input = alerts(400, 0);
    let jsonl = to_jsonl(&input);
    write(
        &moto,
        &key,
        &["--dir", dir.to_str().unwrap(), "--s3", "s3://audit/archive"],
        &["--max-segment-bytes", "30000"],
        &jsonl,
    );
    let segs = segments(&dir);
    assert!(segs.len() >= 4, "expected several segments, got {segs:?}");

    let out = temp();
    let mut recovered = String::new();
    for (i, seg) in segs.iter().enumerate() {
        let dest = out.join(format!("{i}.jsonl"));
        let o = esdk_cli(&moto, REGION)
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
                "kmsguard:host=test-host",
            ])
            .args(["--max-encrypted-data-keys", "1", "-S"])
            .output()
            .expect("aws-encryption-cli runs");
        // It exits 0 even when the context does not match: the output file is the proof.
        assert!(
            dest.exists(),
            "aws-encryption-cli wrote nothing for {}: {}",
            seg.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        recovered.push_str(&std::fs::read_to_string(&dest).unwrap());
    }
    assert_eq!(recovered, jsonl, "aws-encryption-cli recovered other bytes");

    // A wrong context requirement must not produce plaintext.
    let dest = out.join("wrong.jsonl");
    esdk_cli(&moto, REGION)
        .args(["--decrypt", "--input"])
        .arg(&segs[0])
        .arg("--output")
        .arg(&dest)
        .args(["--wrapping-keys", &format!("key={key}")])
        .args(["--encryption-context", "kmsguard:segment=2", "-S"])
        .output()
        .expect("aws-encryption-cli runs");
    assert!(!dest.exists() || std::fs::read(&dest).unwrap().is_empty());

    // kmsguard's own decrypt keeps the layout: one .jsonl file per segment, in order.
    let plain = temp().join("plain");
    let o = kmsguard(
        &moto,
        &[
            "archive",
            "decrypt",
            dir.to_str().unwrap(),
            "--out",
            plain.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "decrypt: {}", stderr(&o));
    let files: Vec<&str> = stdout(&o).leak().lines().collect();
    assert_eq!(files.len(), segs.len());
    let all: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert_eq!(all, jsonl);

    // A segment whose plaintext is exactly two frames (the final frame full-size) opens too.
    let mut pad = json!({"time": "2026-10-02T00:00:00Z", "pad": ""});
    let base = format!("{pad}\n").len();
    pad["pad"] = json!("x".repeat(8192 - base));
    let exact = format!("{pad}\n");
    assert_eq!(exact.len(), 8192);
    let dir2 = temp().join("exact");
    write(&moto, &key, &["--dir", dir2.to_str().unwrap()], &[], &exact);
    let seg = &segments(&dir2)[0];
    let dest = out.join("exact.jsonl");
    let o = esdk_cli(&moto, REGION)
        .args(["--decrypt", "--input"])
        .arg(seg)
        .arg("--output")
        .arg(&dest)
        .args(["--wrapping-keys", &format!("key={key}")])
        .args([
            "--encryption-context",
            "purpose=kmsguard-alert-archive",
            "-S",
        ])
        .output()
        .expect("aws-encryption-cli runs");
    assert!(dest.exists(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), exact);

    // The S3 copy verifies and prints the same alerts, in order.
    let o = kmsguard(&moto, &["archive", "verify", "s3://audit/archive"]);
    assert!(o.status.success(), "verify s3: {}", stderr(&o));
    assert!(stdout(&o).contains(&format!("{} segments, 400 alerts", segs.len())));
    let o = kmsguard(&moto, &["archive", "cat", "s3://audit/archive"]);
    assert!(o.status.success(), "cat: {}", stderr(&o));
    assert_eq!(stdout(&o), jsonl);

    // Filters: one rule, one principal, a time window.
    let o = kmsguard(
        &moto,
        &[
            "archive",
            "cat",
            dir.to_str().unwrap(),
            "--rule",
            "kms-key-policy-public",
            "--principal",
            "arn:aws:iam::111122223333:role/app-1",
            "--since",
            "2026-10-01T00:01:00Z",
            "--until",
            "2026-10-01T00:03:59Z",
        ],
    );
    let got = crate::support::jsonl(&stdout(&o));
    let want: Vec<_> = input
        .iter()
        .filter(|a| {
            a["rule"] == "kms-key-policy-public"
                && a["principal"] == "arn:aws:iam::111122223333:role/app-1"
                && a["time"].as_str().unwrap() >= "2026-10-01T00:01:00Z"
                && a["time"].as_str().unwrap() <= "2026-10-01T00:03:59Z"
        })
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // list shows every segment with its counts, from headers alone.
    let o = kmsguard(&moto, &["archive", "list", dir.to_str().unwrap()]);
    let text = stdout(&o);
    assert_eq!(text.lines().count(), segs.len() + 1, "{text}");
    assert!(text.contains("2026/10/01/test-host/0000000001.kga"));
    let counted: u64 = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(4).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 400);
}

#[tokio::test(flavor = "multi_thread")]
async fn kmsguard_decrypts_messages_written_by_aws_encryption_cli() {
    let moto = Moto::start();
    let key = create_key(&moto, false).await;
    let work = temp();
    // Several frames, an exact multiple of the frame length, and an empty message.
    for (name, len, frame) in [
        ("multi", 10_000, "4096"),
        ("exact", 8192, "1024"),
        ("empty", 0, "4096"),
    ] {
        let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let pt = work.join(name);
        std::fs::write(&pt, &plain).unwrap();
        let ct = work.join(format!("{name}.encrypted"));
        let o = esdk_cli(&moto, REGION)
            .args(["--encrypt", "--input"])
            .arg(&pt)
            .arg("--output")
            .arg(&ct)
            .args(["--wrapping-keys", &format!("key={key}")])
            .args(["--algorithm", "AES_256_GCM_HKDF_SHA512_COMMIT_KEY"])
            .args(["--commitment-policy", "require-encrypt-require-decrypt"])
            .args(["--frame-length", frame])
            .args(["--encryption-context", "team=security", "case=42", "-S"])
            .output()
            .expect("aws-encryption-cli runs");
        assert!(
            ct.exists() && o.status.success(),
            "aws-encryption-cli --encrypt failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let bytes = std::fs::read(&ct).unwrap();
        assert_eq!(
            &bytes[..3],
            &[0x02, 0x04, 0x78],
            "not the committing v2 suite"
        );
        let out = work.join(format!("{name}-out"));
        let o = kmsguard(
            &moto,
            &[
                "archive",
                "decrypt",
                ct.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(o.status.success(), "decrypt {name}: {}", stderr(&o));
        let got = std::fs::read(out.join(format!("{name}.encrypted.decrypted"))).unwrap();
        assert_eq!(got, plain, "{name}");

        // A flipped bit in the body is refused, naming the file.
        let mut bad = bytes.clone();
        let at = bad.len() - 20;
        bad[at] ^= 1;
        let badf = work.join(format!("{name}-bad.encrypted"));
        std::fs::write(&badf, &bad).unwrap();
        let o = kmsguard(
            &moto,
            &[
                "archive",
                "decrypt",
                badf.to_str().unwrap(),
                "--out",
                work.join("x").to_str().unwrap(),
            ],
        );
        assert_eq!(o.status.code(), Some(2));
        assert!(
            stderr(&o).contains(&format!("{name}-bad.encrypted")),
            "{}",
            stderr(&o)
        );
    }
}

/// Copies a folder tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest)
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_detects_a_flipped_bit_a_removed_segment_and_a_swapped_segment() {
    let moto = Moto::start();
    let key = create_key(&moto, false).await;
    let good = temp().join("archive");
    let jsonl = to_jsonl(&alerts(300, 0));
    write(
        &moto,
        &key,
        &["--dir", good.to_str().unwrap()],
        &["--max-segment-bytes", "15000"],
        &jsonl,
    );
    let segs = segments(&good);
    assert!(segs.len() >= 5, "{segs:?}");
    let o = kmsguard(&moto, &["archive", "verify", good.to_str().unwrap()]);
    assert!(o.status.success(), "intact archive: {}", stderr(&o));
    assert!(stdout(&o).contains("head test-host: segment"));

    let rel = |p: &Path| p.strip_prefix(&good).unwrap().to_path_buf();
    let verify_fails = |dir: &Path, needle: &str| {
        let o = kmsguard(&moto, &["archive", "verify", dir.to_str().unwrap()]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "tampering in {} not detected: {}",
            dir.display(),
            stdout(&o)
        );
        assert!(
            stderr(&o).contains(needle),
            "expected {needle:?} in: {}",
            stderr(&o)
        );
    };

    // A flipped bit in the middle of segment 3.
    let flipped = temp().join("flipped");
    copy_dir(&good, &flipped);
    let f = flipped.join(rel(&segs[2]));
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x10;
    std::fs::write(&f, b).unwrap();
    verify_fails(&flipped, "0000000003.kga");

    // Segment 2 removed.
    let removed = temp().join("removed");
    copy_dir(&good, &removed);
    std::fs::remove_file(removed.join(rel(&segs[1]))).unwrap();
    verify_fails(&removed, "segment 2 is missing");

    // Segments 2 and 4 swapped.
    let swapped = temp().join("swapped");
    copy_dir(&good, &swapped);
    let (a, c) = (swapped.join(rel(&segs[1])), swapped.join(rel(&segs[3])));
    let (ba, bc) = (std::fs::read(&a).unwrap(), std::fs::read(&c).unwrap());
    std::fs::write(&a, bc).unwrap();
    std::fs::write(&c, ba).unwrap();
    verify_fails(&swapped, "0000000002.kga");

    // A segment replaced by one from another archive of the same host (valid on its own).
    let other = temp().join("other");
    write(
        &moto,
        &key,
        &["--dir", other.to_str().unwrap()],
        &["--max-segment-bytes", "15000"],
        &to_jsonl(&alerts(300, 5)),
    );
    let replaced = temp().join("replaced");
    copy_dir(&good, &replaced);
    std::fs::copy(other.join(rel(&segs[1])), replaced.join(rel(&segs[1]))).unwrap();
    verify_fails(
        &replaced,
        "0000000003.kga: records previous-segment SHA-256",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_region_replica_decrypts_the_archive_in_another_region() {
    let moto = Moto::start();
    let primary = create_key(&moto, true).await;
    assert!(primary.contains(":key/mrk-"));
    let kms_east = kmsguard::aws::kms_client(&moto.sdk(REGION).await, None);
    let key_id = primary.rsplit('/').next().unwrap();
    let rep = kms_east
        .replicate_key()
        .key_id(key_id)
        .replica_region("us-west-2")
        .send()
        .await
        .expect("replicate key");
    let replica = rep
        .replica_key_metadata()
        .unwrap()
        .arn()
        .unwrap()
        .to_string();
    assert!(replica.contains(":us-west-2:"), "{replica}");

    let dir = temp().join("archive");
    let jsonl = to_jsonl(&alerts(120, 0));
    write(
        &moto,
        &primary,
        &["--dir", dir.to_str().unwrap()],
        &["--max-segment-bytes", "20000"],
        &jsonl,
    );
    let west: Vec<_> = moto
        .env()
        .into_iter()
        .map(|(k, v)| {
            if k == "AWS_REGION" {
                (k, "us-west-2".to_string())
            } else {
                (k, v)
            }
        })
        .collect();
    let o = run(bin().envs(west.clone()).args([
        "archive",
        "cat",
        "--key",
        &replica,
        dir.to_str().unwrap(),
    ]));
    assert!(
        o.status.success(),
        "cat through the replica: {}",
        stderr(&o)
    );
    assert_eq!(stdout(&o), jsonl);
    let o = run(bin().envs(west).args([
        "archive",
        "verify",
        "--key",
        &replica,
        dir.to_str().unwrap(),
    ]));
    assert!(
        o.status.success(),
        "verify through the replica: {}",
        stderr(&o)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn archiver_rolls_by_age_and_a_reopened_archiver_continues_the_chain() {
    use kmsguard::archive::{Archiver, ArchiverConfig, Keyring, Store};
    use std::sync::Arc;
    let moto = Moto::start();
    let key = create_key(&moto, false).await;
    let dir = temp().join("archive");
    let keyring = Arc::new(Keyring::new(moto.sdk(REGION).await));
    let mut cfg = ArchiverConfig::new(&key, "daemon-1");
    cfg.max_segment_age = std::time::Duration::from_millis(200);
    let mut a = Archiver::open(cfg.clone(), keyring.clone(), vec![Store::dir(&dir)])
        .await
        .unwrap();
    assert!(
        a.append(&alerts(10, 0)).await.unwrap().is_empty(),
        "sealed too early"
    );
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    assert!(a.due());
    let sealed = a.append(&alerts(5, 10)).await.unwrap();
    assert_eq!(sealed.len(), 1);
    assert_eq!(sealed[0].info.alerts, 10);
    a.flush().await.unwrap();
    assert_eq!(a.stats().segments, 2);
    assert_eq!(keyring.calls(), 2, "one GenerateDataKey per segment");
    drop(a);

    let mut b = Archiver::open(cfg, keyring.clone(), vec![Store::dir(&dir)])
        .await
        .unwrap();
    assert_eq!(b.next_seq(), 3);
    b.append(&alerts(1, 15)).await.unwrap();
    b.flush().await.unwrap();
    let o = kmsguard(&moto, &["archive", "verify", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("3 segments, 16 alerts"),
        "{}",
        stdout(&o)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn archive_costs_one_kms_call_per_segment_and_reports_throughput() {
    let moto = Moto::start();
    let key = create_key(&moto, false).await;
    create_bucket(&moto, "audit").await;
    let n = 20_000;
    let jsonl = to_jsonl(&alerts(n, 0));
    for dest in [
        vec!["--dir".to_string(), temp().join("a").display().to_string()],
        vec!["--s3".into(), "s3://audit/perf".into()],
    ] {
        let dest: Vec<&str> = dest.iter().map(String::as_str).collect();
        let o = write(
            &moto,
            &key,
            &dest,
            &["--max-segment-bytes", "1048576", "--stats"],
            &jsonl,
        );
        let stats: Value = serde_json::from_str(stderr(&o).trim()).expect("stats JSON");
        assert_eq!(stats["alerts"], n);
        let segments = stats["segments"].as_u64().unwrap();
        assert_eq!(
            stats["kms_calls"].as_u64().unwrap(),
            segments,
            "one KMS call per segment"
        );
        assert!((2..20).contains(&segments), "{stats}");
        eprintln!(
            "archive throughput to {}: {:.0} alerts/s, {:.2} KMS calls per 1,000 alerts ({stats})",
            dest[1],
            stats["alerts_per_second"].as_f64().unwrap(),
            segments as f64 * 1000.0 / n as f64
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sealed_segments_wait_while_s3_is_unreachable_and_alerts_wait_while_kms_is() {
    use kmsguard::archive::{Archiver, ArchiverConfig, Keyring, Location, Store};
    use std::sync::Arc;
    let moto = Moto::start();
    let key = create_key(&moto, false).await;
    let sdk = moto.sdk(REGION).await;
    let s3 = kmsguard::aws::s3_client(
        &sdk,
        &kmsguard::aws::AwsSettings {
            s3_force_path_style: true,
            ..Default::default()
        },
    );
    let keyring = Arc::new(Keyring::new(sdk));
    let store = || {
        let mut s = Store::new(
            Location::S3 {
                bucket: "late".into(),
                prefix: "archive".into(),
            },
            Some(s3.clone()),
        );
        s.attempts = 2;
        s
    };
    let cfg = ArchiverConfig::new(&key, "daemon-2");
    create_bucket(&moto, "late").await;
    let mut a = Archiver::open(cfg, keyring.clone(), vec![store()])
        .await
        .unwrap();
    // The bucket goes away after the archiver started: uploads fail.
    s3.delete_bucket()
        .bucket("late")
        .send()
        .await
        .expect("delete bucket");
    let dir = temp().join("plain-check");
    a.append(&alerts(50, 0)).await.unwrap();
    let err = a
        .flush()
        .await
        .expect_err("the upload cannot succeed without the bucket");
    assert!(
        err.to_string()
            .contains("s3://late/archive/2026/10/01/daemon-2/0000000001.kga"),
        "{err}"
    );
    assert_eq!(a.pending(), 1, "the sealed segment must wait");
    assert_eq!(a.buffered(), 0);
    a.append(&alerts(10, 50)).await.unwrap();
    create_bucket(&moto, "late").await;
    let written = a.flush().await.unwrap();
    assert_eq!(written.len(), 1);
    assert_eq!(a.pending(), 0);
    let o = kmsguard(&moto, &["archive", "verify", "s3://late/archive"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("2 segments, 60 alerts"),
        "{}",
        stdout(&o)
    );

    // KMS refuses (no such key): the alerts stay buffered in memory, nothing is written.
    let missing = key
        .rsplit_once('/')
        .map(|(p, _)| format!("{p}/00000000-0000-0000-0000-000000000000"))
        .unwrap();
    let mut b = Archiver::open(
        ArchiverConfig::new(&missing, "daemon-3"),
        keyring,
        vec![Store::dir(&dir)],
    )
    .await
    .unwrap();
    b.append(&alerts(5, 0)).await.unwrap();
    let err = b
        .flush()
        .await
        .expect_err("no data key without the KMS key");
    assert!(err.to_string().contains("GenerateDataKey"), "{err}");
    assert_eq!(b.buffered(), 5);
    assert_eq!(b.pending(), 0);
    assert!(
        !dir.exists() || segments(&dir).is_empty(),
        "a segment was written without encryption"
    );
}

#[test]
fn archive_help_texts_have_examples() {
    for sub in ["write", "list", "cat", "verify", "decrypt"] {
        let o = run(bin().args(["archive", sub, "--help"]));
        assert_eq!(o.status.code(), Some(0));
        assert!(stdout(&o).contains("Examples:"), "archive {sub}");
    }
    let o = run(bin().args(["archive", "list", "/no/such/archive"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("/no/such/archive: no such archive folder"),
        "{}",
        stderr(&o)
    );
}
