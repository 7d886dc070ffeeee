//! Test support: the binary under test, ctgen corpora made once per run, and helpers to
//! run commands and read JSON Lines.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kmsguard"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The corpus generator: $KMSGUARD_CTGEN, else ../shared/ctgen/ctgen.py beside the repo.
pub fn ctgen() -> PathBuf {
    let p = std::env::var_os("KMSGUARD_CTGEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/ctgen/ctgen.py"));
    assert!(
        p.exists(),
        "ctgen not found at {}: set KMSGUARD_CTGEN to the path of ctgen.py",
        p.display()
    );
    p
}

/// Runs ctgen with `args` into a fresh folder kept for the whole test run.
pub fn generate(args: &[&str]) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("kmsguard-it-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let out = Command::new("python3")
        .arg(ctgen())
        .args(args)
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "ctgen failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// 72 hours of traffic with every scenario injected (shared by several tests).
pub fn scenario_corpus() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        generate(&[
            "--hours",
            "72",
            "--events-per-hour",
            "600",
            "--scenarios",
            "all",
            "--seed",
            "11",
        ])
    })
}

/// ctgen's malformed inputs.
pub fn malformed() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("kmsguard-mal-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let out = Command::new("python3")
            .arg(ctgen())
            .arg("--malformed")
            .arg(&dir)
            .output()
            .expect("python3 runs");
        assert!(out.status.success(), "ctgen --malformed failed");
        dir
    })
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("kmsguard runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn jsonl(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Replays `paths` with extra `args` as JSON Lines; returns (findings, stderr, exit code).
pub fn replay_jsonl(paths: &[&Path], args: &[&str]) -> (Vec<Value>, String, i32) {
    let o = run(bin()
        .arg("replay")
        .args(args)
        .args(["--format", "jsonl"])
        .args(paths));
    (
        jsonl(&stdout(&o)),
        stderr(&o),
        o.status.code().unwrap_or(-1),
    )
}

pub fn truth(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("truth.json")).expect("truth.json");
    serde_json::from_str(&text).expect("truth.json parses")
}

pub fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}
