//! The repository stands alone: its corpus generator is its own and deterministic, the
//! shipped samples are what that generator makes, nothing in the code refers to a path
//! outside the clone, and a failing test leaves no process behind.

use crate::support::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every file under `dir` (relative path -> bytes).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

#[test]
fn the_generator_gives_the_same_bytes_for_the_same_seed() {
    let args = [
        "--hours",
        "3",
        "--events-per-hour",
        "400",
        "--scenarios",
        "all",
        "--warmup",
        "0.2",
        "--org-trail",
        "--digests",
    ];
    let with_seed = |seed: &str| {
        let mut a = args.to_vec();
        a.extend(["--seed", seed]);
        tree(&generate(&a))
    };
    let (a, b, c) = (with_seed("4"), with_seed("4"), with_seed("5"));
    assert!(a.len() > 50, "{} files", a.len());
    assert_eq!(a, b, "same seed, same files and bytes");
    assert_ne!(a, c, "another seed, another corpus");
    // Organization layout, digests and the announcements of every file.
    assert!(a
        .keys()
        .all(|p| !p.starts_with("AWSLogs") || p.starts_with("AWSLogs/o-a1b2c3d4e5")));
    assert!(a
        .keys()
        .any(|p| p.to_string_lossy().contains("/CloudTrail-Digest/")));
    let notes = String::from_utf8(a[Path::new("notifications.jsonl")].clone()).unwrap();
    let logs = a
        .keys()
        .filter(|p| p.extension().is_some_and(|e| e == "gz"))
        .count();
    assert_eq!(notes.lines().count(), logs, "one S3 event per file");
}

#[test]
fn the_generator_writes_aws_services_calling_kms_on_behalf_of_applications() {
    let dir = generate(&[
        "--hours",
        "2",
        "--events-per-hour",
        "3000",
        "--service-traffic",
        "--seed",
        "2",
    ]);
    let mut via: BTreeMap<String, usize> = BTreeMap::new();
    for (path, bytes) in tree(&dir.join("AWSLogs")) {
        if !path.to_string_lossy().ends_with(".json.gz") {
            continue;
        }
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut text)
            .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        for r in doc["Records"].as_array().unwrap() {
            if let Some(svc) = r["userIdentity"]["invokedBy"].as_str() {
                *via.entry(format!(
                    "{svc} from {}",
                    r["sourceIPAddress"].as_str().unwrap()
                ))
                .or_default() += 1;
            }
        }
    }
    for expect in [
        "s3.amazonaws.com from s3.amazonaws.com",
        "secretsmanager.amazonaws.com from secretsmanager.amazonaws.com",
        "ec2.amazonaws.com from AWS Internal",
    ] {
        assert!(
            via.get(expect).copied().unwrap_or(0) > 10,
            "{expect}: {via:?}"
        );
    }
}

#[test]
fn the_shipped_samples_are_what_the_generator_makes() {
    // scripts/samples regenerates samples/ and tests/data/samples-truth.json with these
    // arguments; a change of the generator that changes them must regenerate both.
    let script = std::fs::read_to_string(repo().join("scripts/samples")).unwrap();
    let line = script
        .lines()
        .find(|l| l.starts_with("args=("))
        .expect("scripts/samples names its generator arguments");
    let args: Vec<&str> = line["args=(".len()..line.len() - 1]
        .split_whitespace()
        .collect();
    let dir = generate(&args);
    let shipped = tree(&repo().join("samples"));
    let made = tree(&dir);
    let made_logs: BTreeMap<_, _> = made
        .iter()
        .filter(|(p, _)| p.starts_with("AWSLogs"))
        .map(|(p, b)| (p.clone(), b.clone()))
        .collect();
    assert_eq!(shipped.len(), made_logs.len(), "file count");
    assert!(
        shipped == made_logs,
        "samples/ differs from the generator's output: run scripts/samples"
    );
    let truth = std::fs::read(repo().join("tests/data/samples-truth.json")).unwrap();
    assert_eq!(
        truth,
        made[Path::new("truth.json")],
        "tests/data/samples-truth.json"
    );
}

#[test]
fn nothing_refers_to_a_path_outside_the_repository() {
    // The same check as .ci/run's grep, so it cannot come back unnoticed locally either.
    let mut offenders = Vec::new();
    let needles = [
        "../shared",
        "/work/shared",
        "/work/.library",
        "ctgen.py",
        "KMSGUARD_CTGEN",
    ];
    for top in ["src", "tests", "scripts", ".ci", "ctgen"] {
        for (path, bytes) in tree(&repo().join(top)) {
            let text = String::from_utf8_lossy(&bytes);
            for n in needles {
                // This file and .ci/run's grep name the needles; tests/data holds
                // generated data.
                let names_them = (top == "tests" && path == Path::new("it/standalone.rs"))
                    || (top == ".ci" && path == Path::new("run"));
                if names_them || top == "tests" && path.starts_with("data") {
                    continue;
                }
                if text.contains(n) {
                    offenders.push(format!("{top}/{}: {n}", path.display()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "paths outside the repository: {offenders:?}"
    );
}

#[test]
fn a_panicking_test_leaves_no_child_running() {
    let pid = std::sync::Arc::new(std::sync::Mutex::new(0u32));
    let seen = pid.clone();
    let panicked = std::thread::spawn(move || {
        let child = Proc::spawn(std::process::Command::new("sleep").arg("600"));
        *seen.lock().unwrap() = child.id();
        panic!("a test fails while its child runs");
    })
    .join();
    assert!(panicked.is_err());
    let pid = *pid.lock().unwrap();
    assert!(pid > 0);
    // Killed and reaped by the guard: the process is gone, not even a zombie.
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "sleep {pid} outlived the test that started it"
    );
}
