//! The `kmsguard archive ...` commands as library functions over plain arguments, so the
//! binary only parses flags and prints: write JSON Lines into segments, list, cat,
//! decrypt (an archive or one message file) and verify.

use super::kms::Keyring;
use super::reader::{self, AlertFilter, Listed, VerifyReport};
use super::store::{Location, Store};
use super::writer::{Archiver, ArchiverConfig, ArchiverStats};
use super::ArchiveError;
use crate::aws::{self, AwsSettings};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// AWS clients for archive commands.
pub struct Clients {
    pub keyring: Arc<Keyring>,
    s3: aws_sdk_s3::Client,
}

impl Clients {
    pub async fn new(settings: &AwsSettings) -> Clients {
        let sdk = aws::sdk_config(settings).await;
        Clients {
            s3: aws::s3_client(&sdk, settings),
            keyring: Arc::new(Keyring::new(sdk)),
        }
    }

    pub fn store(&self, location: Location) -> Store {
        match location {
            Location::Dir(_) => Store::new(location, None),
            Location::S3 { .. } => Store::new(location, Some(self.s3.clone())),
        }
    }
}

/// What `archive write` did.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub stats: ArchiverStats,
    pub kms_calls: u64,
    pub seconds: f64,
    pub first_seq: u64,
    pub next_seq: u64,
}

impl WriteOutcome {
    pub fn alerts_per_second(&self) -> f64 {
        self.stats.alerts as f64 / self.seconds.max(1e-9)
    }

    /// One line for people.
    pub fn summary_text(&self) -> String {
        format!(
            "archived {} alerts in {} segments ({:.0} alerts/s, {} KMS calls)",
            self.stats.alerts,
            self.stats.segments,
            self.alerts_per_second(),
            self.kms_calls
        )
    }

    /// One JSON object for scripts and benchmarks.
    pub fn summary_json(&self) -> String {
        serde_json::json!({
            "alerts": self.stats.alerts,
            "segments": self.stats.segments,
            "plaintext_bytes": self.stats.plaintext_bytes,
            "ciphertext_bytes": self.stats.ciphertext_bytes,
            "kms_calls": self.kms_calls,
            "seconds": self.seconds,
            "alerts_per_second": self.alerts_per_second(),
            "first_segment": self.first_seq,
            "next_segment": self.next_seq,
        })
        .to_string()
    }
}

/// Archives the JSON Lines of `input` (one alert object per line; blank lines skipped).
pub async fn write(
    clients: &Clients,
    cfg: ArchiverConfig,
    destinations: Vec<Location>,
    input: &mut dyn BufRead,
    input_name: &str,
) -> Result<WriteOutcome, ArchiveError> {
    let stores = destinations.into_iter().map(|l| clients.store(l)).collect();
    let calls_before = clients.keyring.calls();
    let mut archiver = Archiver::open(cfg, clients.keyring.clone(), stores).await?;
    let first_seq = archiver.next_seq();
    let started = std::time::Instant::now();
    let mut batch = Vec::with_capacity(1024);
    let mut line = String::new();
    let mut n = 0u64;
    loop {
        line.clear();
        let read = input.read_line(&mut line).map_err(|e| ArchiveError::Io {
            path: input_name.to_string(),
            source: e,
        })?;
        if read == 0 {
            break;
        }
        n += 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| {
            ArchiveError::Config(format!(
                "{input_name}: line {n}: not a JSON alert ({e}); input must be JSON Lines"
            ))
        })?;
        if !v.is_object() {
            return Err(ArchiveError::Config(format!(
                "{input_name}: line {n}: an alert must be a JSON object"
            )));
        }
        batch.push(v);
        if batch.len() == 1024 {
            archiver.append(&batch).await?;
            batch.clear();
        }
    }
    archiver.append(&batch).await?;
    archiver.flush().await?;
    Ok(WriteOutcome {
        stats: archiver.stats().clone(),
        kms_calls: clients.keyring.calls() - calls_before,
        seconds: started.elapsed().as_secs_f64(),
        first_seq,
        next_seq: archiver.next_seq(),
    })
}

pub async fn list(clients: &Clients, location: Location) -> Result<Vec<Listed>, ArchiveError> {
    reader::list(&clients.store(location)).await
}

/// Writes the `archive list` table.
pub fn write_list(out: &mut dyn Write, listed: &[Listed]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<44} {:>6} {:<20} {:<20} {:>7} {:>9}  KEY",
        "SEGMENT", "SEQ", "FIRST ALERT", "LAST ALERT", "ALERTS", "BYTES"
    )?;
    for l in listed {
        match &l.info {
            Ok(i) => writeln!(
                out,
                "{:<44} {:>6} {:<20} {:<20} {:>7} {:>9}  {}",
                l.name,
                i.seq,
                i.first_alert,
                i.last_alert,
                i.alerts,
                l.size,
                l.keys.join(",")
            )?,
            Err(e) => writeln!(out, "{:<44} unreadable header: {e}", l.name)?,
        }
    }
    Ok(())
}

pub async fn cat(
    clients: &Clients,
    location: Location,
    key: Option<&str>,
    filter: &AlertFilter,
    out: &mut dyn Write,
) -> Result<u64, ArchiveError> {
    reader::cat(&clients.store(location), &clients.keyring, key, filter, out).await
}

pub async fn verify(
    clients: &Clients,
    location: Location,
    key: Option<&str>,
    host: Option<&str>,
) -> Result<VerifyReport, ArchiveError> {
    reader::verify(&clients.store(location), &clients.keyring, key, host).await
}

/// Prints problems (to `err`), each host's head and a summary (to `out`). Returns whether
/// the archive checked out: at least one segment and no problem.
pub fn print_verify_report(
    out: &mut dyn Write,
    err: &mut dyn Write,
    r: &VerifyReport,
    location: &str,
) -> std::io::Result<bool> {
    for p in &r.problems {
        writeln!(err, "problem: {p}")?;
    }
    if r.segments == 0 {
        writeln!(err, "problem: no segments found in {location}")?;
    }
    for (host, seq, sha) in &r.heads {
        writeln!(out, "head {host}: segment {seq} sha256 {sha}")?;
    }
    let verdict = if r.problems.is_empty() {
        "ok".to_string()
    } else {
        format!("{} problems", r.problems.len())
    };
    writeln!(
        out,
        "{} segments, {} alerts checked in {location}: {verdict}",
        r.segments, r.alerts
    )?;
    Ok(r.problems.is_empty() && r.segments > 0)
}

/// Decrypts an archive (folder or S3) to `out_dir`, keeping its layout, or one message
/// file (any AWS Encryption SDK message of the supported suite, e.g. from
/// `aws-encryption-cli`) to `out_dir/<name>.jsonl` / `<name>.decrypted`.
pub async fn decrypt(
    clients: &Clients,
    location: Location,
    key: Option<&str>,
    out_dir: &Path,
) -> Result<Vec<PathBuf>, ArchiveError> {
    if let Location::Dir(p) = &location {
        if p.is_file() {
            let bytes = std::fs::read(p).map_err(|e| ArchiveError::Io {
                path: p.display().to_string(),
                source: e,
            })?;
            let shown = p.display().to_string();
            let (_, plain) = reader::decrypt_message(&shown, &bytes, &clients.keyring, key).await?;
            let file = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "message".into());
            let name = match file.strip_suffix(".kga") {
                Some(stem) => format!("{stem}.jsonl"),
                None => format!("{file}.decrypted"),
            };
            let dest = out_dir.join(name);
            reader::write_file(&dest, &plain)?;
            return Ok(vec![dest]);
        }
    }
    reader::decrypt_all(&clients.store(location), &clients.keyring, key, out_dir).await
}

/// The host name for object names: $KMSGUARD_HOST, $HOSTNAME, /etc/hostname, or "localhost".
pub fn default_host() -> String {
    std::env::var("KMSGUARD_HOST")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}
