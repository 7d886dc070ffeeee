//! Where segments live: a local folder or an S3 bucket and prefix. Lists, reads and
//! writes whole segment objects by their relative name (`YYYY/MM/DD/<host>/<seq>.kga`);
//! writes never overwrite a segment (a chain must not fork), go through a temporary file
//! and a rename locally, and are retried with capped backoff on S3.

use super::ArchiveError;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// File name extension of archive segments.
pub const SEGMENT_EXT: &str = "kga";

/// Largest segment object read (kmsguard writes 8 MiB by default); larger objects are
/// refused rather than read into memory.
pub const MAX_SEGMENT_BYTES: usize = 1 << 30;

fn too_large(what: String, size: usize) -> ArchiveError {
    ArchiveError::Store {
        location: what,
        message: format!(
            "{size} bytes is larger than any segment ({MAX_SEGMENT_BYTES} at most); not an archive segment"
        ),
    }
}

/// A folder, or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Dir(PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Location {
    /// `s3://bucket[/prefix]` or a path.
    pub fn parse(s: &str) -> Result<Location, ArchiveError> {
        match s.strip_prefix("s3://") {
            Some(rest) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(ArchiveError::Config(format!(
                        "{s}: no bucket name; write s3://BUCKET/PREFIX"
                    )));
                }
                Ok(Location::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                })
            }
            None => Ok(Location::Dir(PathBuf::from(s))),
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Dir(p) => write!(f, "{}", p.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// A location with the client needed to reach it.
pub struct Store {
    pub location: Location,
    s3: Option<aws_sdk_s3::Client>,
    /// S3 attempts per write (first try included).
    pub attempts: u32,
}

impl Store {
    pub fn dir(path: impl Into<PathBuf>) -> Store {
        Store {
            location: Location::Dir(path.into()),
            s3: None,
            attempts: 1,
        }
    }

    pub fn new(location: Location, s3: Option<aws_sdk_s3::Client>) -> Store {
        Store {
            location,
            s3,
            attempts: 5,
        }
    }

    /// The full name of a segment, for messages (`path` or `s3://bucket/key`).
    pub fn display_name(&self, rel: &str) -> String {
        match &self.location {
            Location::Dir(p) => p.join(rel).display().to_string(),
            Location::S3 { bucket, .. } => format!("s3://{bucket}/{}", self.s3_key(rel)),
        }
    }

    fn s3_key(&self, rel: &str) -> String {
        match &self.location {
            Location::S3 { prefix, .. } if !prefix.is_empty() => format!("{prefix}/{rel}"),
            _ => rel.to_string(),
        }
    }

    fn s3(&self) -> Result<(&aws_sdk_s3::Client, &str), ArchiveError> {
        match (&self.location, &self.s3) {
            (Location::S3 { bucket, .. }, Some(c)) => Ok((c, bucket)),
            _ => Err(ArchiveError::Config(format!(
                "{}: no S3 client configured",
                self.location
            ))),
        }
    }

    /// Relative names of every segment (`*.kga`), sorted.
    pub async fn list(&self) -> Result<Vec<String>, ArchiveError> {
        let mut names = Vec::new();
        match &self.location {
            Location::Dir(root) => {
                if !root.exists() {
                    return Err(ArchiveError::Config(format!(
                        "{}: no such archive folder; give the folder that `archive write --dir` wrote to, or s3://bucket/prefix",
                        root.display()
                    )));
                }
                if root.is_file() {
                    return Err(ArchiveError::Config(format!(
                        "{}: is a file; archive commands take the archive folder or s3://bucket/prefix",
                        root.display()
                    )));
                }
                walk(root, root, &mut names).map_err(|e| ArchiveError::Store {
                    location: root.display().to_string(),
                    message: e.to_string(),
                })?;
            }
            Location::S3 { prefix, .. } => {
                let (client, bucket) = self.s3()?;
                let list_prefix = if prefix.is_empty() {
                    String::new()
                } else {
                    format!("{prefix}/")
                };
                let mut pages = client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&list_prefix)
                    .into_paginator()
                    .send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| store_error(&self.location, e))?;
                    for o in page.contents() {
                        if let Some(k) = o.key() {
                            if k.ends_with(&format!(".{SEGMENT_EXT}")) {
                                names.push(k[list_prefix.len()..].to_string());
                            }
                        }
                    }
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// The whole segment.
    pub async fn get(&self, rel: &str) -> Result<Vec<u8>, ArchiveError> {
        self.get_range(rel, None).await.map(|(b, _)| b)
    }

    /// The first `len` bytes (all when None) and the object's full size.
    pub async fn get_range(
        &self,
        rel: &str,
        len: Option<usize>,
    ) -> Result<(Vec<u8>, usize), ArchiveError> {
        match &self.location {
            Location::Dir(root) if len.is_some() => {
                use std::io::Read;
                let p = root.join(rel);
                let io = |e| ArchiveError::Io {
                    path: p.display().to_string(),
                    source: e,
                };
                let f = std::fs::File::open(&p).map_err(io)?;
                let size = f.metadata().map_err(io)?.len() as usize;
                let mut buf = Vec::new();
                f.take(len.unwrap_or(0) as u64)
                    .read_to_end(&mut buf)
                    .map_err(io)?;
                Ok((buf, size))
            }
            Location::Dir(root) => {
                let p = root.join(rel);
                let io = |e| ArchiveError::Io {
                    path: p.display().to_string(),
                    source: e,
                };
                let size = std::fs::metadata(&p).map_err(io)?.len() as usize;
                if size > MAX_SEGMENT_BYTES {
                    return Err(too_large(p.display().to_string(), size));
                }
                let b = std::fs::read(&p).map_err(io)?;
                let size = b.len();
                Ok((b, size))
            }
            Location::S3 { .. } => {
                let (client, bucket) = self.s3()?;
                let mut req = client.get_object().bucket(bucket).key(self.s3_key(rel));
                if let Some(n) = len.filter(|&n| n > 0) {
                    req = req.range(format!("bytes=0-{}", n - 1));
                }
                let out = req
                    .send()
                    .await
                    .map_err(|e| store_error(&self.display_name(rel), e))?;
                if len.is_none() && out.content_length().unwrap_or(0) > MAX_SEGMENT_BYTES as i64 {
                    return Err(too_large(
                        self.display_name(rel),
                        out.content_length().unwrap_or(0) as usize,
                    ));
                }
                // Content-Range: bytes 0-N/SIZE; without it the whole object came.
                let total = out
                    .content_range()
                    .and_then(|r| r.rsplit('/').next())
                    .and_then(|t| t.parse::<usize>().ok());
                let body = out
                    .body
                    .collect()
                    .await
                    .map_err(|e| store_error(&self.display_name(rel), e))?
                    .into_bytes()
                    .to_vec();
                let size = total.unwrap_or(body.len());
                Ok((body, size))
            }
        }
    }

    /// Writes a segment unless this destination already holds exactly these bytes (a
    /// retry after a partial or interrupted write); a different object of that name is an
    /// error, never replaced.
    pub async fn put_or_same(&self, rel: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
        if let Ok(existing) = self.get(rel).await {
            if existing == bytes {
                return Ok(());
            }
            return Err(ArchiveError::Store {
                location: self.display_name(rel),
                message: "a different segment of that name exists already; is another writer using this host name?".into(),
            });
        }
        self.put(rel, bytes).await
    }

    /// Writes a new segment; an existing one of that name is an error, never replaced.
    pub async fn put(&self, rel: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
        match &self.location {
            Location::Dir(root) => put_file(root, rel, bytes),
            Location::S3 { .. } => {
                let (client, bucket) = self.s3()?;
                let key = self.s3_key(rel);
                let mut delay = Duration::from_millis(200);
                let mut attempt = 1;
                loop {
                    let res = client
                        .put_object()
                        .bucket(bucket)
                        .key(&key)
                        .if_none_match("*")
                        .body(bytes.to_vec().into())
                        .send()
                        .await;
                    match res {
                        Ok(_) => return Ok(()),
                        Err(e) => {
                            let err = store_error(&self.display_name(rel), e);
                            if attempt >= self.attempts {
                                return Err(err);
                            }
                            tracing::warn!(%err, attempt, "archive upload failed; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(10));
                            attempt += 1;
                        }
                    }
                }
            }
        }
    }
}

fn store_error(what: &impl std::fmt::Display, e: impl std::error::Error) -> ArchiveError {
    ArchiveError::Store {
        location: what.to_string(),
        message: aws_sdk_s3::error::DisplayErrorContext(e).to_string(),
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        let p = entry.path();
        if ft.is_dir() {
            walk(root, &p, out)?;
        } else if ft.is_file() && p.extension().is_some_and(|e| e == SEGMENT_EXT) {
            if let Ok(rel) = p.strip_prefix(root) {
                let parts: Vec<_> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect();
                out.push(parts.join("/"));
            }
        }
    }
    Ok(())
}

fn put_file(root: &Path, rel: &str, bytes: &[u8]) -> Result<(), ArchiveError> {
    use std::io::Write;
    let path = root.join(rel);
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| ArchiveError::Io { path: p, source: e }
    };
    let dir = path.parent().unwrap_or(root);
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    if path.exists() {
        return Err(ArchiveError::Store {
            location: path.display().to_string(),
            message:
                "a segment of that name exists already; is another writer using this host name?"
                    .into(),
        });
    }
    let tmp = path.with_extension("kga.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_locations() {
        assert_eq!(
            Location::parse("s3://b/a/b/").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "a/b".into()
            }
        );
        assert_eq!(
            Location::parse("s3://b").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert!(Location::parse("s3:///x").is_err());
        assert_eq!(
            Location::parse("/tmp/a").unwrap(),
            Location::Dir("/tmp/a".into())
        );
    }
}
