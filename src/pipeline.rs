//! The replay pipeline: files -> decode -> analyze -> findings, on `jobs` worker threads.
//! Workers each own a `Decoder` and pull the next file from a shared counter; results
//! flow back over a bounded channel to the collecting thread, which deduplicates findings
//! by their stable id (CloudTrail delivers some events twice) and reports progress.

use crate::analyze::finding::Finding;
use crate::analyze::rule::RuleSet;
use crate::decode::{DecodeLimits, Decoder, FileReport};
use crate::source::LogFile;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct ReplayOptions {
    /// Worker threads (at least 1).
    pub jobs: usize,
    pub limits: DecodeLimits,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            jobs: default_jobs(),
            limits: DecodeLimits::default(),
        }
    }
}

/// The number of cores, or 1 when it cannot be told.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Totals over a replay.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplayStats {
    pub files: u64,
    pub bad_files: u64,
    pub digests_skipped: u64,
    pub records: u64,
    pub kms_records: u64,
    pub parsed_records: u64,
    pub compressed_bytes: u64,
    pub json_bytes: u64,
    pub findings: u64,
    pub duplicate_findings: u64,
    pub elapsed_secs: f64,
    /// Peak resident memory of the process, when the OS tells it.
    pub peak_rss_bytes: Option<u64>,
}

impl ReplayStats {
    pub fn json_mb_per_sec(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.json_bytes as f64 / 1e6 / self.elapsed_secs
        } else {
            0.0
        }
    }
}

/// One file finished: what the collector tells its caller after each file.
pub struct FileDone<'a> {
    pub file: &'a LogFile,
    pub report: &'a FileReport,
    pub files_done: usize,
    pub files_total: usize,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub started: Instant,
}

pub struct ReplayOutcome {
    pub findings: Vec<Finding>,
    pub stats: ReplayStats,
}

/// Replays `files` through `rules`. `on_file` is called on the calling thread after each
/// file (for progress and problem reports).
pub fn replay(
    files: &[LogFile],
    rules: &RuleSet,
    opts: &ReplayOptions,
    on_file: &mut dyn FnMut(&FileDone<'_>),
) -> ReplayOutcome {
    let started = Instant::now();
    let jobs = opts.jobs.clamp(1, files.len().max(1));
    let next = AtomicUsize::new(0);
    let bytes_total: u64 = files.iter().map(|f| f.size).sum();
    let mut stats = ReplayStats::default();
    let mut findings = Vec::new();
    let mut seen = HashSet::new();
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<(usize, FileReport, Vec<Finding>)>(jobs * 2);
        for _ in 0..jobs {
            let tx = tx.clone();
            let next = &next;
            let limits = opts.limits;
            scope.spawn(move || {
                let mut decoder = Decoder::new(limits);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(file) = files.get(i) else { break };
                    let name = file.path.display().to_string();
                    let mut found = Vec::new();
                    let report = decoder.decode_file(&file.path, &mut |ev| {
                        rules.evaluate(ev, &name, &mut found);
                    });
                    if tx.send((i, report, found)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut bytes_done = 0;
        for (n, (i, report, found)) in rx.into_iter().enumerate() {
            let done = n + 1;
            bytes_done += files[i].size;
            let s = &report.stats;
            stats.files += 1;
            stats.bad_files += u64::from(report.is_bad());
            stats.records += s.records;
            stats.kms_records += s.kms_records;
            stats.parsed_records += s.parsed;
            stats.compressed_bytes += s.compressed_bytes;
            stats.json_bytes += s.json_bytes;
            for f in found {
                if seen.insert(f.id.clone()) {
                    findings.push(f);
                } else {
                    stats.duplicate_findings += 1;
                }
            }
            on_file(&FileDone {
                file: &files[i],
                report: &report,
                files_done: done,
                files_total: files.len(),
                bytes_done,
                bytes_total,
                started,
            });
        }
    });
    findings.sort_by(|a, b| (&a.time, &a.rule, &a.id).cmp(&(&b.time, &b.rule, &b.id)));
    stats.findings = findings.len() as u64;
    stats.elapsed_secs = started.elapsed().as_secs_f64();
    stats.peak_rss_bytes = peak_rss_bytes();
    ReplayOutcome { findings, stats }
}

/// VmHWM from /proc/self/status (Linux); None elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A progress line: files, MB/s of compressed input and an ETA.
pub fn progress_line(d: &FileDone<'_>) -> String {
    let secs = d.started.elapsed().as_secs_f64().max(1e-3);
    let rate = d.bytes_done as f64 / secs;
    let left = d.bytes_total.saturating_sub(d.bytes_done) as f64;
    let eta = if rate > 0.0 {
        Duration::from_secs_f64(left / rate).as_secs()
    } else {
        0
    };
    format!(
        "{}/{} files, {:.1} MB read, {:.1} MB/s (compressed), ETA {}m{:02}s",
        d.files_done,
        d.files_total,
        d.bytes_done as f64 / 1e6,
        rate / 1e6,
        eta / 60,
        eta % 60
    )
}
