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
        serde_json::to_writer(&mut *out, f)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

fn cell(s: &str, max: usize) -> String {
    clean(s, max).collect()
}

/// Writes an aligned table, most severe first, then by time.
pub fn write_table(out: &mut dyn Write, findings: &[Finding]) -> io::Result<()> {
    if findings.is_empty() {
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
    Ok(())
}

/// Counts of findings per severity, most severe first.
pub fn by_severity(findings: &[Finding]) -> Vec<(Severity, usize)> {
    Severity::ALL
        .iter()
        .rev()
        .map(|s| (*s, findings.iter().filter(|f| f.severity == *s).count()))
        .collect()
}

/// The human summary of a run.
pub fn summary_text(stats: &ReplayStats, findings: &[Finding]) -> String {
    let sev: Vec<String> = by_severity(findings)
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
        findings.len(),
        if sev.is_empty() { String::new() } else { format!(" ({})", sev.join(", ")) },
        stats.elapsed_secs,
        stats.json_mb_per_sec(),
        stats.json_bytes as f64 / 1e6,
        stats.compressed_bytes as f64 / 1e6,
    );
    if let Some(rss) = stats.peak_rss_bytes {
        s.push_str(&format!(", peak RSS {:.1} MB", rss as f64 / 1e6));
    }
    s
}

/// The machine summary of a run (`--summary json`).
pub fn summary_json(stats: &ReplayStats, findings: &[Finding]) -> serde_json::Value {
    let mut by = serde_json::Map::new();
    for (s, n) in by_severity(findings) {
        by.insert(s.as_str().to_string(), n.into());
    }
    serde_json::json!({
        "stats": stats,
        "findings_by_severity": by,
        "json_mb_per_sec": stats.json_mb_per_sec(),
    })
}
