//! Real servers for tests, on free loopback ports and stopped on drop: aiosmtpd
//! (`Smtp`, via tests/servers/smtp_sink.py, which writes each accepted message to a JSON
//! file), an HTTP/1.1 receiver with scripted answers (`Receiver`) that checks the HMAC of
//! generic webhooks from docs/alerts.md independently of kmsguard's code, and a private
//! CA for TLS relays.

use crate::support::Proc;
use crate::support::{python, repo};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ------------------------------------------------------------------ SMTP server ---

pub struct Smtp {
    pub port: u16,
    dir: PathBuf,
    _child: Proc,
}

impl Smtp {
    pub fn start(port: u16, dir: &Path, tls: Option<(&Path, &Path)>) -> Smtp {
        let mut cmd = Command::new(python());
        cmd.args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "smtp_sink.FileSink"]);
        if let Some((cert, key)) = tls {
            cmd.arg("--tlscert").arg(cert).arg("--tlskey").arg(key);
        }
        cmd.arg(dir);
        Smtp::spawn(cmd, port, dir)
    }

    /// Implicit TLS (SMTPS) from the first byte.
    pub fn start_smtps(port: u16, dir: &Path, cert: &Path, key: &Path) -> Smtp {
        let mut cmd = Command::new(python());
        cmd.args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "smtp_sink.FileSink", "--smtpscert"])
            .arg(cert)
            .arg("--smtpskey")
            .arg(key)
            .arg(dir);
        Smtp::spawn(cmd, port, dir)
    }

    /// STARTTLS required, then AUTH as `user`/`password` (tests/servers/smtp_sink.py).
    pub fn start_auth(
        port: u16,
        dir: &Path,
        cert: &Path,
        key: &Path,
        user: &str,
        password: &str,
    ) -> Smtp {
        let mut cmd = Command::new(python());
        cmd.arg(repo().join("tests/servers/smtp_sink.py"))
            .arg(port.to_string())
            .arg(dir)
            .arg(cert)
            .arg(key)
            .args([user, password]);
        Smtp::spawn(cmd, port, dir)
    }

    fn spawn(mut cmd: Command, port: u16, dir: &Path) -> Smtp {
        let child = Proc::spawn(
            cmd.env("PYTHONPATH", repo().join("tests/servers"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "aiosmtpd did not start on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Smtp {
            port,
            dir: dir.to_path_buf(),
            _child: child,
        }
    }

    /// Accepted messages, oldest first.
    pub fn messages(&self) -> Vec<Value> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.retain(|p| p.extension().is_some_and(|e| e == "json"));
        names.sort();
        names
            .iter()
            .map(|p| serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }

    pub fn wait_for(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let m = self.messages();
            if m.len() >= n || Instant::now() > deadline {
                return m;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------- HTTP receiver ---

#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
    pub status: u16,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    /// The receiver's side of docs/alerts.md, written from the document, not from
    /// kmsguard's code: t within 5 minutes, v1 = hex HMAC-SHA256(secret, t + "." + body).
    pub fn signature_ok(&self, secret: &str) -> bool {
        let Some(h) = self.header("x-kmsguard-signature") else {
            return false;
        };
        let mut t = None;
        let mut v1 = None;
        for part in h.split(',') {
            match part.split_once('=') {
                Some(("t", x)) => t = x.parse::<u64>().ok(),
                Some(("v1", x)) => v1 = Some(x.to_string()),
                _ => {}
            }
        }
        let (Some(t), Some(v1)) = (t, v1) else {
            return false;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if now.abs_diff(t) > 300 {
            return false;
        }
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(&self.body);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        want == v1
    }
}

/// An HTTP/1.1 receiver on 127.0.0.1 that answers with scripted statuses (then 200).
pub struct Receiver {
    pub port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
    pub script: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    pub fn start(script: &[u16]) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(
            script.iter().copied().collect::<VecDeque<u16>>(),
        ));
        let (reqs, scr) = (requests.clone(), script.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (reqs, scr) = (reqs.clone(), scr.clone());
                std::thread::spawn(move || serve(stream, &reqs, &scr));
            }
        });
        Receiver {
            port,
            requests,
            script,
        }
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
    pub fn on(&self, path: &str) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }
}

fn serve(stream: TcpStream, reqs: &Mutex<Vec<Request>>, script: &Mutex<VecDeque<u16>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((n, v)) = h.trim_end().split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let at = Instant::now();
    let status = script.lock().unwrap().pop_front().unwrap_or(200);
    reqs.lock().unwrap().push(Request {
        path,
        headers,
        body,
        at,
        status,
    });
    let reason = if status < 300 { "OK" } else { "Scripted" };
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: 8\r\nConnection: close\r\n\r\nscripted"
    );
    let mut stream = reader.into_inner();
    let _ = stream.write_all(answer.as_bytes());
}

/// A private CA and a relay certificate for 127.0.0.1 it signed (rustls refuses a
/// self-signed CA certificate used as the server's own): (ca.pem, cert.pem, key.pem).
pub fn private_ca(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (cert, key) = (d.join("cert.pem"), d.join("key.pem"));
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n").unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let steps: [Vec<&str>; 3] = [
        [
            &["req", "-x509"][..],
            &ec,
            &[
                "-days",
                "1",
                "-subj",
                "/CN=kmsguard test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
        [
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=localhost",
                "-keyout",
                "key.pem",
                "-out",
                "leaf.csr",
            ],
        ]
        .concat(),
        vec![
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
    ];
    for args in steps {
        let out = Command::new("openssl")
            .args(&args)
            .current_dir(d)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ca = d.join("ca.pem");
    (ca, cert, key)
}

// ------------------------------------------------------------- S3 fault proxy ---

/// tests/servers/s3_fault_proxy.py in front of moto on a free port: 503 SlowDown and 500
/// InternalError for the first GetObject / ListObjectsV2 requests, bodies cut by a TCP
/// reset, poisoned keys (see the script's header); everything else forwarded. Killed on
/// drop.
pub struct FaultProxy {
    pub port: u16,
    _child: Proc,
}

impl FaultProxy {
    pub fn start(upstream: &str, config: &Value) -> FaultProxy {
        let port = crate::support::free_port();
        let child = Proc::spawn(
            Command::new(python())
                .arg(repo().join("tests/servers/s3_fault_proxy.py"))
                .arg(port.to_string())
                .arg(upstream)
                .arg(config.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let proxy = FaultProxy {
            port,
            _child: child,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "fault proxy did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        proxy
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for a kmsguard process whose AWS endpoint is this proxy.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// What the proxy saw and injected (GET /__faults/stats).
    pub fn stats(&self) -> Value {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.write_all(
            b"GET /__faults/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("proxy stats {body:?}: {e}"))
    }
}
