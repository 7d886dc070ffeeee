//! How findings are shown: JSON Lines (one finding per line, the scripting contract),
//! an aligned table for people (most severe first) and the run summary. Every value from
//! a log record is stripped of control characters before it reaches a terminal.

use crate::analyze::finding::{Finding, Severity};
use crate::analyze::rule::clean;
use crate::pipeline::ReplayStats;
use std::io::{self, Write};

/// Writes one JSON object per finding per line.
pub fn write_jsonl(out: &mut dyn Write, findings: &[Finding]) -> io::Result<()> {
    for f in findings {
        write_jsonl_one(out, f)?;
    }
    Ok(())
}

/// Writes one finding as one JSON line.
pub fn write_jsonl_one(out: &mut dyn Write, f: &Finding) -> io::Result<()> {
    let mut f = std::borrow::Cow::Borrowed(f);
    if f.count == 0 || f.first_time.is_empty() || f.last_time.is_empty() {
        f.to_mut().settle_counts();
    }
    serde_json::to_writer(&mut *out, f.as_ref())?;
    out.write_all(b"\n")
}

/// Findings counted by severity as they pass (the summary of a run whose findings are
/// not held in memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    pub total: u64,
    /// Per severity, `Severity::ALL` order.
    pub by: [u64; 5],
    /// The most severe finding seen.
    pub max: Option<Severity>,
}

impl Tally {
    pub fn add(&mut self, f: &Finding) {
        self.total += 1;
        if let Some(i) = Severity::ALL.iter().position(|s| *s == f.severity) {
            self.by[i] += 1;
        }
        self.max = self.max.max(Some(f.severity));
    }

    pub fn of(findings: &[Finding]) -> Tally {
        let mut t = Tally::default();
        for f in findings {
            t.add(f);
        }
        t
    }

    /// Counts per severity, most severe first.
    pub fn by_severity(&self) -> Vec<(Severity, u64)> {
        Severity::ALL
            .iter()
            .enumerate()
            .rev()
            .map(|(i, s)| (*s, self.by[i]))
            .collect()
    }
}

fn cell(s: &str, max: usize) -> String {
    clean(s, max).collect()
}

/// Rows a table shows at most (the rest are counted in a last line).
pub const MAX_TABLE_ROWS: usize = 5000;

/// Writes an aligned table, most severe first, then by time; `more` findings that were
/// not kept for it are counted in a last line.
pub fn write_table(out: &mut dyn Write, findings: &[Finding], more: u64) -> io::Result<()> {
    if findings.is_empty() && more == 0 {
        return writeln!(out, "No findings.");
    }
    let mut rows: Vec<&Finding> = findings.iter().collect();
    rows.sort_by(|a, b| b.severity.cmp(&a.severity).then(a.time.cmp(&b.time)));
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|f| {
            [
                f.severity.as_str().to_uppercase(),
                cell(&f.time, 20),
                cell(&f.rule, 40),
                cell(
                    f.principal_role
                        .as_deref()
                        .or(f.principal.as_deref())
                        .unwrap_or("-"),
                    60,
                ),
                cell(&f.summary, 160),
            ]
        })
        .collect();
    let head = ["SEVERITY", "TIME", "RULE", "PRINCIPAL", "SUMMARY"];
    let mut w = head.map(|h| h.chars().count());
    for c in &cells {
        for (i, v) in c.iter().enumerate() {
            w[i] = w[i].max(v.chars().count());
        }
    }
    let line = |out: &mut dyn Write, c: [&str; 5]| -> io::Result<()> {
        writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        )
    };
    line(out, head)?;
    for c in &cells {
        line(out, [&c[0], &c[1], &c[2], &c[3], &c[4]])?;
    }
    if more > 0 {
        writeln!(
            out,
            "... and {more} more finding(s), less severe or later: use --format jsonl for all"
        )?;
    }
    Ok(())
}

/// The rows a table shows, kept from a stream of findings: the `MAX_TABLE_ROWS` most
/// severe (then earliest); the rest are counted.
#[derive(Default)]
pub struct TableRows {
    rows: std::collections::BTreeMap<(std::cmp::Reverse<Severity>, String, String), Finding>,
    pub more: u64,
}

impl TableRows {
    pub fn add(&mut self, f: Finding) {
        let key = (std::cmp::Reverse(f.severity), f.time.clone(), f.id.clone());
        self.rows.insert(key, f);
        if self.rows.len() > MAX_TABLE_ROWS {
            self.rows.pop_last();
            self.more += 1;
        }
    }

    pub fn rows(&self) -> Vec<Finding> {
        self.rows.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// The human summary of a run.
pub fn summary_text(stats: &ReplayStats, tally: &Tally) -> String {
    let sev: Vec<String> = tally
        .by_severity()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    let mut s = format!(
        "files: {} ({} bad, {} digest files skipped)\nrecords: {} ({} KMS)\nfindings: {}{}\nelapsed: {:.2} s, {:.1} MB/s of JSON ({:.1} MB JSON from {:.1} MB on disk)",
        stats.files,
        stats.bad_files,
        stats.digests_skipped,
        stats.records,
        stats.kms_records,
        tally.total,
        if sev.is_empty() { String::new() } else { format!(" ({})", sev.join(", ")) },
        stats.elapsed_secs,
        stats.json_mb_per_sec(),
        stats.json_bytes as f64 / 1e6,
        stats.compressed_bytes as f64 / 1e6,
    );
    if let Some(rss) = stats.peak_rss_bytes {
        s.push_str(&format!(", peak RSS {:.1} MB", rss as f64 / 1e6));
    }
    // What the bounds did, when they did anything: never silently.
    let mut bounded = Vec::new();
    if stats.folded_overflow > 0 {
        bounded.push(format!(
            "{} finding(s) counted in overflow findings (the folding cap of open findings was reached)",
            stats.folded_overflow
        ));
    }
    if stats.activity_dropped > 0 {
        bounded.push(format!(
            "{} event(s) of keys beyond the key-activity cap not recorded",
            stats.activity_dropped
        ));
    }
    if stats.partial_commits > 0 {
        bounded.push(format!(
            "{} commit(s) inside large files, {} baseline(s) evicted from memory",
            stats.partial_commits, stats.baselines_evicted
        ));
    }
    if !bounded.is_empty() {
        s.push_str(&format!("\nbounds: {}", bounded.join("; ")));
    }
    s
}

/// The machine summary of a run (`--summary json`).
pub fn summary_json(stats: &ReplayStats, tally: &Tally) -> serde_json::Value {
    let mut by = serde_json::Map::new();
    for (s, n) in tally.by_severity() {
        by.insert(s.as_str().to_string(), n.into());
    }
    serde_json::json!({
        "stats": stats,
        "findings_by_severity": by,
        "json_mb_per_sec": stats.json_mb_per_sec(),
    })
}
