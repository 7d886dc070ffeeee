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
    // Time order across accounts and regions (baselines depend on it): CloudTrail names
    // files `..._CloudTrail_<region>_YYYYMMDDTHHMMZ_<id>.json.gz`.
    out.sort_by_cached_key(|f| (time_stamp(&f.path).unwrap_or_default(), f.path.clone()));
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

/// The `YYYYMMDDTHHMMZ` stamp in a CloudTrail file name.
pub fn time_stamp(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.split('_')
        .find(|part| {
            part.len() == 14
                && part.as_bytes()[8] == b'T'
                && part.ends_with('Z')
                && part[..8].bytes().all(|b| b.is_ascii_digit())
        })
        .map(str::to_string)
}

/// The ledger key of a local file: path, size and modification time.
pub fn ledger_key(f: &LogFile) -> String {
    let mtime = std::fs::metadata(&f.path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let path = std::fs::canonicalize(&f.path).unwrap_or_else(|_| f.path.clone());
    format!("file:{}:{}:{mtime}", path.display(), f.size)
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
