//! Local files and folders: walks them recursively (the `AWSLogs/<account>/CloudTrail/
//! <region>/YYYY/MM/DD/` layout and organization trails alike), keeps `*.json.gz` and
//! `*.json`, skips CloudTrail digest files, and orders the result by name, which in the
//! CloudTrail layout is also time order within a region.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: no such file or folder (give a CloudTrail log file or a folder of them)")]
    Missing { path: String },
    #[error("{path}: cannot list folder: {source}")]
    List {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// One log file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    pub path: PathBuf,
    pub size: u64,
}

/// True for CloudTrail digest files, which carry hashes, not events.
pub fn is_digest(path: &str) -> bool {
    path.contains("CloudTrail-Digest")
}

fn is_log_name(name: &str) -> bool {
    name.ends_with(".json.gz") || name.ends_with(".json") || name.ends_with(".gz")
}

/// Expands the given paths into log files. Files named explicitly are always read
/// (whatever their name, except digests); folders contribute `*.json[.gz]` files.
pub fn collect_files(paths: &[PathBuf]) -> Result<(Vec<LogFile>, u64), SourceError> {
    let mut out = Vec::new();
    let mut digests = 0;
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|_| SourceError::Missing {
            path: p.display().to_string(),
        })?;
        if meta.is_dir() {
            walk(p, &mut out, &mut digests)?;
        } else if is_digest(&p.to_string_lossy()) {
            digests += 1;
        } else {
            out.push(LogFile {
                path: p.clone(),
                size: meta.len(),
            });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path);
    Ok((out, digests))
}

fn walk(dir: &Path, out: &mut Vec<LogFile>, digests: &mut u64) -> Result<(), SourceError> {
    let entries = std::fs::read_dir(dir).map_err(|source| SourceError::List {
        path: dir.display().to_string(),
        source,
    })?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            if path.file_name().is_some_and(|n| n == "CloudTrail-Digest") {
                *digests += count_files(&path);
                continue;
            }
            walk(&path, out, digests)?;
        } else if ft.is_file() || ft.is_symlink() {
            let name = path.to_string_lossy();
            if is_digest(&name) {
                *digests += 1;
            } else if is_log_name(&name) {
                let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                out.push(LogFile { path, size });
            }
        }
    }
    Ok(())
}

fn count_files(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}
