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

/// Runs the project's corpus generator (the `ctgen` crate of this repository) in
/// process with `args` into a fresh folder kept for the whole test run.
pub fn generate(args: &[&str]) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix("kmsguard-it-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let mut argv: Vec<std::ffi::OsString> = args.iter().map(Into::into).collect();
    argv.push("--out".into());
    argv.push(dir.clone().into());
    let opts = ctgen::Options::from_args(argv).unwrap_or_else(|e| panic!("ctgen {args:?}: {e}"));
    ctgen::run(&opts).unwrap_or_else(|e| panic!("ctgen {args:?}: {e}"));
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
        let opts = ctgen::Options::from_args([
            std::ffi::OsString::from("--malformed"),
            dir.clone().into(),
        ])
        .expect("ctgen --malformed parses");
        ctgen::run(&opts).expect("ctgen --malformed writes");
        dir
    })
}

/// A child process a test started, killed (and reaped) when the guard is dropped: when
/// the test ends, returns early or panics. Every process a test spawns is held in one,
/// so a failed test leaves nothing running.
pub struct Proc(Option<std::process::Child>);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        Proc(Some(cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {:?}: {e}", cmd.get_program())
        })))
    }

    /// Waits for the child to exit on its own and collects its piped output.
    pub fn wait_with_output(mut self) -> Output {
        self.0
            .take()
            .expect("the child is held until the guard is consumed")
            .wait_with_output()
            .expect("wait for the child")
    }
}

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0
            .as_ref()
            .expect("the child is held until the guard is consumed")
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0
            .as_mut()
            .expect("the child is held until the guard is consumed")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
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

/// The Python of the test venv (made by scripts/test), or python3.
pub fn python() -> PathBuf {
    std::env::var_os("KMSGUARD_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// A moto server on 127.0.0.1 (tests/servers/moto_launcher.py), killed on drop.
pub struct Moto {
    pub port: u16,
    _child: Proc,
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_with(&[])
    }

    /// A moto server with extra environment (see tests/servers/moto_launcher.py, e.g.
    /// `KMSGUARD_MOTO_KEY_AGE_SECS`).
    pub fn start_with(env: &[(&str, &str)]) -> Moto {
        let port = free_port();
        let child = Proc::spawn(
            Command::new(python())
                .arg(repo().join("tests/servers/moto_launcher.py"))
                .arg(port.to_string())
                .envs(env.iter().copied())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let moto = Moto {
            port,
            _child: child,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto did not start on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for a kmsguard process that talks to this moto.
    #[allow(dead_code)] // used by the tests of the daemon and other AWS-backed modes
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// An SDK config for clients in tests (static test credentials, this endpoint).
    pub async fn sdk(&self, region: &str) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .endpoint_url(self.endpoint())
            .credentials_provider(aws_sdk_kms::config::Credentials::new(
                "testing",
                "testing",
                None,
                None,
                "kmsguard-tests",
            ))
            .load()
            .await
    }
}
