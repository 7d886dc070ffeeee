//! Local files and folders, walked in time order without holding every path: the
//! `AWSLogs/<account>/CloudTrail/<region>/YYYY/MM/DD/` layout (organization trails'
//! `AWSLogs/o-…/<account>/…` alike) is walked day by day, each day's folders of every
//! account and region listed and merged by the time stamp in the file names, so memory
//! holds one day's names, not the tree's. Files outside day folders (and files named
//! on the command line) are sorted by their stamp among the days.
//!
//! Keeps `*.json.gz`, `*.json` and `*.gz`; skips CloudTrail digest files. A folder that
//! cannot be listed, a file that cannot be read and anything that is not a regular file
//! (FIFO, socket, device) is yielded as a `Walked::Problem`: reported once and counted
//! bad by the replay, which goes on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: no such file or folder (give a CloudTrail log file or a folder of them)")]
    Missing { path: String },
}

/// One log file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFile {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, seconds since the epoch (part of the ledger key).
    pub mtime: u64,
    /// The folder's canonical path (resolved once per folder), for the ledger key.
    pub dir: Arc<Path>,
}

impl LogFile {
    /// A file named on its own: its metadata and folder are read now.
    pub fn from_path(path: &Path, meta: &std::fs::Metadata) -> LogFile {
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
        let dir = parent
            .and_then(|p| std::fs::canonicalize(p).ok())
            .or_else(|| std::env::current_dir().ok())
            .unwrap_or_default();
        LogFile {
            path: path.to_path_buf(),
            size: meta.len(),
            mtime: mtime_secs(meta),
            dir: dir.into(),
        }
    }
}

fn mtime_secs(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// What the walk yields, in time order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Walked {
    File(LogFile),
    /// Something that could not be read as a log file (named, with why).
    Problem {
        path: String,
        why: String,
    },
}

/// True for CloudTrail digest files, which carry hashes, not events.
pub fn is_digest(path: &str) -> bool {
    path.contains("CloudTrail-Digest")
}

fn is_log_name(name: &str) -> bool {
    name.ends_with(".json.gz") || name.ends_with(".json") || name.ends_with(".gz")
}

/// The `YYYYMMDDTHHMMZ` stamp in a CloudTrail file name.
pub fn time_stamp(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    stamp_of(name).map(str::to_string)
}

fn stamp_of(name: &str) -> Option<&str> {
    name.split('_').find(|part| {
        part.len() == 14
            && part.as_bytes()[8] == b'T'
            && part.ends_with('Z')
            && part[..8].bytes().all(|b| b.is_ascii_digit())
    })
}

/// The ledger key of a local file: canonical path, size and modification time.
pub fn ledger_key(f: &LogFile) -> String {
    let name = f.path.file_name().map(|n| n.to_string_lossy());
    match name {
        Some(n) => format!("file:{}/{n}:{}:{}", f.dir.display(), f.size, f.mtime),
        None => format!("file:{}:{}:{}", f.path.display(), f.size, f.mtime),
    }
}

/// `YYYY/MM/DD` of a folder path ending in three such components, as `YYYYMMDD`.
fn day_of_dir(dir: &Path) -> Option<String> {
    let mut parts = dir
        .components()
        .rev()
        .take(3)
        .map(|c| c.as_os_str().to_str());
    let d = parts.next()??;
    let m = parts.next()??;
    let y = parts.next()??;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    (digits(y, 4) && digits(m, 2) && digits(d, 2)).then(|| format!("{y}{m}{d}"))
}

/// A walk over PATHs in time order (see the module documentation).
pub struct Walk {
    /// Day (`YYYYMMDD`, "" for files without a stamp) -> folders of that day, and loose
    /// files dated by their name.
    days: BTreeMap<String, Day>,
    /// The current day's files, in order, reversed (popped from the end).
    ready: Vec<Walked>,
    /// Digest files skipped so far.
    digests: Arc<AtomicU64>,
}

#[derive(Default)]
struct Day {
    dirs: Vec<PathBuf>,
    loose: Vec<Walked>,
}

/// Starts a walk; fails only when a PATH does not exist (a bad argument).
pub fn walk(paths: &[PathBuf]) -> Result<Walk, SourceError> {
    let mut w = Walk {
        days: BTreeMap::new(),
        ready: Vec::new(),
        digests: Arc::new(AtomicU64::new(0)),
    };
    for p in paths {
        // Named on the command line: follow symlinks.
        let meta = std::fs::metadata(p).map_err(|_| SourceError::Missing {
            path: p.display().to_string(),
        })?;
        if meta.is_dir() {
            w.discover(p);
        } else if is_digest(&p.to_string_lossy()) {
            w.skipped_digest(1);
        } else if meta.is_file() {
            let day = day_key(p);
            w.days
                .entry(day)
                .or_default()
                .loose
                .push(Walked::File(LogFile::from_path(p, &meta)));
        } else {
            let day = day_key(p);
            w.days.entry(day).or_default().loose.push(Walked::Problem {
                path: p.display().to_string(),
                why: format!(
                    "not a regular file ({}): nothing was read",
                    kind_of(&meta.file_type())
                ),
            });
        }
    }
    Ok(w)
}

fn day_key(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .and_then(stamp_of)
        .map(|s| s[..8].to_string())
        .unwrap_or_default()
}

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else if ft.is_symlink() {
        "a symbolic link to something that is not a file"
    } else {
        "not a file"
    }
}

impl Walk {
    /// Digest files skipped so far.
    pub fn digests(&self) -> u64 {
        self.digests.load(Ordering::Relaxed)
    }

    /// Counts skipped digests into `counter` from now on (with those counted so far),
    /// so the count can be read while the walk is consumed elsewhere.
    pub fn counting_digests(mut self, counter: Arc<AtomicU64>) -> Walk {
        counter.fetch_add(self.digests(), Ordering::Relaxed);
        self.digests = counter;
        self
    }

    fn skipped_digest(&self, n: u64) {
        self.digests.fetch_add(n, Ordering::Relaxed);
    }

    /// Finds the day folders under `dir` (without listing them) and the loose files.
    fn discover(&mut self, dir: &Path) {
        if let Some(day) = day_of_dir(dir) {
            self.days
                .entry(day)
                .or_default()
                .dirs
                .push(dir.to_path_buf());
            return;
        }
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => return self.problem_folder(dir, &e),
        };
        let mut sub = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => return self.problem_folder(dir, &e),
            };
            let path = entry.path();
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                if path.file_name().is_some_and(|n| n == "CloudTrail-Digest") {
                    self.skipped_digest(count_files(&path));
                } else {
                    sub.push(path);
                }
            } else if let Some(item) = self.consider(&path, &ft, None) {
                let day = day_key(&path);
                self.days.entry(day).or_default().loose.push(item);
            }
        }
        sub.sort();
        for s in sub {
            self.discover(&s);
        }
    }

    fn problem_folder(&mut self, dir: &Path, e: &std::io::Error) {
        let day = day_of_dir(dir).unwrap_or_default();
        self.days
            .entry(day)
            .or_default()
            .loose
            .push(Walked::Problem {
                path: dir.display().to_string(),
                why: format!(
                    "cannot list folder: {e}; its files were not read (check its permissions)"
                ),
            });
    }

    /// A directory entry as a log file, a problem, or nothing (not a log name, digest).
    fn consider(
        &mut self,
        path: &Path,
        ft: &std::fs::FileType,
        dir: Option<&Arc<Path>>,
    ) -> Option<Walked> {
        let name = path.file_name()?.to_string_lossy();
        if is_digest(&name) {
            self.skipped_digest(1);
            return None;
        }
        if !is_log_name(&name) {
            return None;
        }
        // A symlink is read when it leads to a regular file.
        let meta = if ft.is_symlink() {
            std::fs::metadata(path)
        } else {
            std::fs::symlink_metadata(path)
        };
        let meta = match meta {
            Ok(m) => m,
            Err(e) => {
                return Some(Walked::Problem {
                    path: path.display().to_string(),
                    why: format!("cannot read its metadata: {e}"),
                })
            }
        };
        if !meta.is_file() {
            return Some(Walked::Problem {
                path: path.display().to_string(),
                why: format!(
                    "not a regular file ({}): nothing was read",
                    kind_of(&meta.file_type())
                ),
            });
        }
        Some(Walked::File(match dir {
            Some(d) => LogFile {
                path: path.to_path_buf(),
                size: meta.len(),
                mtime: mtime_secs(&meta),
                dir: d.clone(),
            },
            None => LogFile::from_path(path, &meta),
        }))
    }

    /// Lists the next day's folders and orders its files.
    fn next_day(&mut self) -> bool {
        let Some((_, day)) = self.days.pop_first() else {
            return false;
        };
        let mut items = day.loose;
        for d in day.dirs {
            let canonical: Arc<Path> = std::fs::canonicalize(&d)
                .unwrap_or_else(|_| d.clone())
                .into();
            let entries = match std::fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) => {
                    items.push(Walked::Problem {
                        path: d.display().to_string(),
                        why: format!("cannot list folder: {e}; its files were not read (check its permissions)"),
                    });
                    continue;
                }
            };
            for entry in entries {
                let entry = match entry {
                    Ok(e) => e,
                    Err(e) => {
                        items.push(Walked::Problem {
                            path: d.display().to_string(),
                            why: format!(
                                "cannot list folder: {e}; some of its files were not read"
                            ),
                        });
                        break;
                    }
                };
                let path = entry.path();
                let Ok(ft) = entry.file_type() else { continue };
                if ft.is_dir() {
                    // Below a day folder: not the CloudTrail layout, walked as it comes.
                    let mut inner = Walk {
                        days: BTreeMap::new(),
                        ready: Vec::new(),
                        digests: self.digests.clone(),
                    };
                    inner.discover(&path);
                    items.extend(inner);
                } else if let Some(item) = self.consider(&path, &ft, Some(&canonical)) {
                    items.push(item);
                }
            }
        }
        items.sort_by_cached_key(|w| {
            let path = match w {
                Walked::File(f) => f.path.clone(),
                Walked::Problem { path, .. } => PathBuf::from(path),
            };
            (time_stamp(&path).unwrap_or_default(), path)
        });
        items.dedup();
        items.reverse();
        self.ready = items;
        true
    }
}

impl Iterator for Walk {
    type Item = Walked;

    fn next(&mut self) -> Option<Walked> {
        loop {
            if let Some(w) = self.ready.pop() {
                return Some(w);
            }
            if !self.next_day() {
                return None;
            }
        }
    }
}

/// Every log file under `paths`, in time order (for the few callers that want them all
/// at once, e.g. `bench-inflate`); problems are left out.
pub fn collect_files(paths: &[PathBuf]) -> Result<(Vec<LogFile>, u64), SourceError> {
    let mut w = walk(paths)?;
    let files: Vec<LogFile> = w
        .by_ref()
        .filter_map(|x| match x {
            Walked::File(f) => Some(f),
            Walked::Problem { .. } => None,
        })
        .collect();
    Ok((files, w.digests()))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(p: &Path) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, b"{}").unwrap();
    }

    #[test]
    fn days_are_merged_across_accounts_and_regions_in_time_order() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("AWSLogs");
        let f = |acct: &str, region: &str, day: &str, stamp: &str| {
            root.join(format!(
                "{acct}/CloudTrail/{region}/2026/10/{day}/{acct}_CloudTrail_{region}_{stamp}_x.json.gz"
            ))
        };
        let files = [
            f("2", "eu-west-1", "02", "20261002T0005Z"),
            f("1", "us-east-1", "01", "20261001T2355Z"),
            f("1", "us-east-1", "02", "20261002T0000Z"),
            f("2", "us-east-1", "01", "20261001T0005Z"),
        ];
        for p in &files {
            touch(p);
        }
        touch(&root.join("1/CloudTrail-Digest/us-east-1/2026/10/01/d.json.gz"));
        touch(&t.path().join("loose_20261001T1200Z_y.json"));
        let mut w = walk(&[t.path().to_path_buf()]).unwrap();
        let got: Vec<String> = w
            .by_ref()
            .map(|x| match x {
                Walked::File(f) => time_stamp(&f.path).unwrap(),
                Walked::Problem { path, .. } => panic!("problem {path}"),
            })
            .collect();
        assert_eq!(
            got,
            [
                "20261001T0005Z",
                "20261001T1200Z",
                "20261001T2355Z",
                "20261002T0000Z",
                "20261002T0005Z"
            ]
        );
        assert_eq!(w.digests(), 1);
    }

    #[test]
    fn fifos_and_unreadable_folders_are_problems_not_stops() {
        let t = tempfile::tempdir().unwrap();
        touch(&t.path().join("a/x_20261001T0000Z_1.json.gz"));
        let fifo = t.path().join("b/pipe.json.gz");
        std::fs::create_dir_all(fifo.parent().unwrap()).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        let mut w = walk(&[t.path().to_path_buf()]).unwrap();
        let items: Vec<Walked> = w.by_ref().collect();
        assert!(items.iter().any(|i| matches!(i, Walked::File(_))));
        if made.is_ok_and(|s| s.success()) {
            assert!(
                items
                    .iter()
                    .any(|i| matches!(i, Walked::Problem { why, .. } if why.contains("FIFO"))),
                "{items:?}"
            );
        }
    }
}
