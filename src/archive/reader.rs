//! Reading an archive back: list segments from their headers (no KMS call), open one
//! (unwrap its data key, decrypt, check its context against its name), print alerts with
//! filters, decrypt to files, and verify every segment and each host's hash chain.

use super::kms::Keyring;
use super::message;
use super::segment::{parse_object_name, plausible_time, sha256_hex, SegmentInfo, GENESIS};
use super::store::Store;
use super::ArchiveError;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

/// One line of `archive list`.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: String,
    pub size: usize,
    pub info: Result<SegmentInfo, String>,
    /// KMS key ARNs that wrap its data key.
    pub keys: Vec<String>,
}

/// Bytes read for a header; larger headers (many data keys) are read whole.
const HEADER_PROBE: usize = 16 << 10;

/// Lists segments from their headers alone (a ranged read of each).
pub async fn list(store: &Store) -> Result<Vec<Listed>, ArchiveError> {
    let mut out = Vec::new();
    for name in store.list().await? {
        let (mut bytes, size) = store.get_range(&name, Some(HEADER_PROBE)).await?;
        if bytes.len() < size && message::parse_header(&bytes).is_err() {
            bytes = store.get(&name).await?;
        }
        let (info, keys) = match message::parse_header(&bytes) {
            Ok(h) => (
                SegmentInfo::from_context(&h.context),
                h.data_keys
                    .iter()
                    .map(|k| String::from_utf8_lossy(&k.provider_info).into_owned())
                    .collect(),
            ),
            Err(e) => (Err(e.to_string()), Vec::new()),
        };
        out.push(Listed {
            size,
            name,
            info,
            keys,
        });
    }
    Ok(out)
}

/// Decrypts any AWS Encryption SDK message of the supported suite (also ones written by
/// `aws-encryption-cli`); returns its encryption context and plaintext.
pub async fn decrypt_message(
    what: &str,
    bytes: &[u8],
    keyring: &Keyring,
    key: Option<&str>,
) -> Result<(message::EncryptionContext, Vec<u8>), ArchiveError> {
    let fmt = |e| ArchiveError::Format {
        segment: what.to_string(),
        source: e,
    };
    let header = message::parse_header(bytes).map_err(fmt)?;
    let data_key = keyring
        .unwrap(what, &header.data_keys, &header.context, key)
        .await?;
    let (header, plain) = message::decrypt(data_key.as_ref(), bytes).map_err(fmt)?;
    Ok((header.context, plain))
}

/// An opened segment: its facts, its plaintext, and the SHA-256 of its ciphertext.
pub struct Opened {
    pub info: SegmentInfo,
    pub plaintext: Vec<u8>,
    pub sha256: String,
}

/// Reads, decrypts and checks one segment: kmsguard context, name matching the context,
/// alert count matching the lines, every alert JSON and inside the header's time range.
pub async fn open(
    store: &Store,
    name: &str,
    keyring: &Keyring,
    key: Option<&str>,
) -> Result<Opened, ArchiveError> {
    let shown = store.display_name(name);
    let bytes = store.get(name).await?;
    let sha256 = sha256_hex(&bytes);
    let (ctx, plaintext) = decrypt_message(&shown, &bytes, keyring, key).await?;
    let bad = |message: String| ArchiveError::Segment {
        segment: shown.clone(),
        message,
    };
    let info = SegmentInfo::from_context(&ctx).map_err(&bad)?;
    if let Some((host, seq)) = parse_object_name(name) {
        if host != info.host || seq != info.seq {
            return Err(bad(format!(
                "its name says host {host} segment {seq}, its authenticated header says host {} segment {}: the file was renamed, moved or swapped",
                info.host, info.seq
            )));
        }
    }
    let mut lines = 0u64;
    for line in plaintext.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        lines += 1;
        let alert: Value = serde_json::from_slice(line)
            .map_err(|e| bad(format!("alert {lines} is not JSON: {e}")))?;
        if let Some(t) = alert
            .get("time")
            .and_then(Value::as_str)
            .filter(|t| plausible_time(t))
        {
            if t < info.first_alert.as_str() || t > info.last_alert.as_str() {
                return Err(bad(format!(
                    "alert {lines} has time {t}, outside the header's range {} to {}",
                    info.first_alert, info.last_alert
                )));
            }
        }
    }
    if lines != info.alerts {
        return Err(bad(format!(
            "holds {lines} alerts, its header says {}",
            info.alerts
        )));
    }
    Ok(Opened {
        info,
        plaintext,
        sha256,
    })
}

/// What `archive verify` found.
#[derive(Debug, Default)]
pub struct VerifyReport {
    pub segments: usize,
    pub alerts: u64,
    /// One sentence per problem, each naming the segment.
    pub problems: Vec<String>,
    /// Per host: the last segment's number and SHA-256, to compare with a record kept
    /// elsewhere (a chain cannot show that its own newest segments were removed).
    pub heads: Vec<(String, u64, String)>,
}

/// One segment in a chain: (shown name, recorded previous SHA-256, own SHA-256).
type Link = (String, String, String);

/// Verifies every segment (decrypts it fully) and each host's chain: numbers 1..n without
/// gaps or repeats, each segment recording the SHA-256 of the one before.
pub async fn verify(
    store: &Store,
    keyring: &Keyring,
    key: Option<&str>,
    host: Option<&str>,
) -> Result<VerifyReport, ArchiveError> {
    let mut report = VerifyReport::default();
    let mut chains = Chains::new();
    let mut failed = BTreeSet::new();
    for name in store.list().await? {
        if let (Some(h), Some((nh, _))) = (host, parse_object_name(&name)) {
            if h != nh {
                continue;
            }
        }
        report.segments += 1;
        match open(store, &name, keyring, key).await {
            Ok(o) => {
                report.alerts += o.info.alerts;
                chains
                    .entry(o.info.host.clone())
                    .or_default()
                    .entry(o.info.seq)
                    .or_default()
                    .push((store.display_name(&name), o.info.prev_sha256, o.sha256));
            }
            Err(e @ ArchiveError::Store { .. }) => return Err(e),
            Err(e) => {
                if let Some(hs) = parse_object_name(&name) {
                    failed.insert(hs);
                }
                report.problems.push(e.to_string());
            }
        }
    }
    let (problems, heads) = check_chains(&chains, &failed);
    report.problems.extend(problems);
    report.heads = heads;
    Ok(report)
}

/// Links per host and sequence number (several when a number repeats).
type Chains = BTreeMap<String, BTreeMap<u64, Vec<Link>>>;

/// The chain rules, over what the segments' authenticated headers say: per host, numbers
/// 1..n without gaps or repeats, segment 1 recording the genesis hash, every other one the
/// SHA-256 of its predecessor. `failed` holds (host, seq) of segments that could not be
/// opened (already reported), so they are not reported again as missing. Returns the
/// problems and each host's head (last number, its SHA-256).
fn check_chains(
    chains: &Chains,
    failed: &BTreeSet<(String, u64)>,
) -> (Vec<String>, Vec<(String, u64, String)>) {
    let mut problems = Vec::new();
    let mut heads = Vec::new();
    for (h, segs) in chains {
        let mut expected = 1u64;
        let mut prev: Option<(String, String)> = None; // (name, sha)
        for (&seq, copies) in segs {
            let Some((name, prev_sha, sha)) = copies.first() else {
                continue;
            };
            if copies.len() > 1 {
                let names: Vec<_> = copies.iter().map(|c| c.0.as_str()).collect();
                problems.push(format!(
                    "host {h}: segment {seq} appears {} times: {}",
                    copies.len(),
                    names.join(", ")
                ));
            }
            if seq != expected {
                let missing: Vec<u64> = (expected..seq)
                    .filter(|s| !failed.contains(&(h.clone(), *s)))
                    .collect();
                let text = match missing.as_slice() {
                    [] => None,
                    [one] => Some(format!("segment {one} is")),
                    [first, .., last] if last - first + 1 == missing.len() as u64 => {
                        Some(format!("segments {first} to {last} are"))
                    }
                    many => Some(format!(
                        "segments {} are",
                        many.iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                };
                if let Some(text) = text {
                    problems.push(format!(
                        "host {h}: {text} missing before {name} (removed, or never written)"
                    ));
                }
            }
            match &prev {
                Some((pname, psha)) if seq == expected && prev_sha != psha => {
                    problems.push(format!(
                        "{name}: records previous-segment SHA-256 {prev_sha}, but {pname} hashes to {psha}: a segment was altered, replaced or reordered"
                    ));
                }
                None if seq == 1 && prev_sha != GENESIS => {
                    problems.push(format!(
                        "{name}: is segment 1 but records a previous segment ({prev_sha})"
                    ));
                }
                _ => {}
            }
            prev = Some((name.clone(), sha.clone()));
            expected = seq + 1;
        }
        if let Some((last_seq, copies)) = segs.iter().next_back() {
            if let Some(c) = copies.first() {
                heads.push((h.clone(), *last_seq, c.2.clone()));
            }
        }
    }
    (problems, heads)
}

/// Filters for `archive cat`. Times compare as RFC 3339 strings (UTC, `Z`).
#[derive(Debug, Clone, Default)]
pub struct AlertFilter {
    pub since: Option<String>,
    pub until: Option<String>,
    pub rule: Option<String>,
    pub principal: Option<String>,
    pub host: Option<String>,
}

impl AlertFilter {
    fn segment_may_match(&self, info: &SegmentInfo) -> bool {
        self.host.as_ref().is_none_or(|h| *h == info.host)
            && self.since.as_ref().is_none_or(|s| info.last_alert >= *s)
            && self.until.as_ref().is_none_or(|u| info.first_alert <= *u)
    }

    fn matches(&self, alert: &Value) -> bool {
        let s = |k: &str| alert.get(k).and_then(Value::as_str);
        let time = s("time");
        self.since
            .as_ref()
            .is_none_or(|x| time.is_some_and(|t| t >= x.as_str()))
            && self
                .until
                .as_ref()
                .is_none_or(|x| time.is_some_and(|t| t <= x.as_str()))
            && self.rule.as_ref().is_none_or(|r| s("rule") == Some(r))
            && self
                .principal
                .as_ref()
                .is_none_or(|p| s("principal") == Some(p) || s("principal_role") == Some(p))
    }
}

/// Prints the alerts that match `filter`, as JSON Lines; segments whose time range cannot
/// match are skipped from their header alone (no KMS call). Returns alerts printed.
pub async fn cat(
    store: &Store,
    keyring: &Keyring,
    key: Option<&str>,
    filter: &AlertFilter,
    out: &mut dyn Write,
) -> Result<u64, ArchiveError> {
    let mut printed = 0;
    for l in list(store).await? {
        let Ok(info) = &l.info else { continue };
        if !filter.segment_may_match(info) {
            continue;
        }
        let o = open(store, &l.name, keyring, key).await?;
        for line in o.plaintext.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let v: Value = serde_json::from_slice(line).map_err(|e| ArchiveError::Segment {
                segment: store.display_name(&l.name),
                message: format!("an alert is not JSON: {e}"),
            })?;
            if filter.matches(&v) {
                out.write_all(line)
                    .and_then(|_| out.write_all(b"\n"))
                    .map_err(|e| ArchiveError::Io {
                        path: "standard output".into(),
                        source: e,
                    })?;
                printed += 1;
            }
        }
    }
    Ok(printed)
}

/// Decrypts every segment to `out_dir/<name>.jsonl` (the archive's layout kept). Returns
/// the files written.
pub async fn decrypt_all(
    store: &Store,
    keyring: &Keyring,
    key: Option<&str>,
    out_dir: &Path,
) -> Result<Vec<std::path::PathBuf>, ArchiveError> {
    let mut written = Vec::new();
    for name in store.list().await? {
        let o = open(store, &name, keyring, key).await?;
        let dest = out_dir.join(format!(
            "{}.jsonl",
            name.strip_suffix(".kga").unwrap_or(&name)
        ));
        write_file(&dest, &o.plaintext)?;
        written.push(dest);
    }
    Ok(written)
}

/// Writes `bytes` to `path`, making its folder; refuses to replace an existing file.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ArchiveError> {
    let io = |e| ArchiveError::Io {
        path: path.display().to_string(),
        source: e,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(n: u64) -> String {
        format!("{n:064x}")
    }

    /// A chain of host "h" with segments `seqs`; segment n hashes to sha(n) and records
    /// sha(n - 1) (genesis for 1), unless `bad_prev` names it.
    fn chain(seqs: &[u64], bad_prev: Option<u64>) -> Chains {
        let mut c = Chains::new();
        for &s in seqs {
            let prev = if s == 1 {
                GENESIS.to_string()
            } else {
                sha(s - 1)
            };
            let prev = if bad_prev == Some(s) { sha(999) } else { prev };
            c.entry("h".into())
                .or_default()
                .entry(s)
                .or_default()
                .push((format!("{s}.kga"), prev, sha(s)));
        }
        c
    }

    #[test]
    fn an_intact_chain_has_no_problems_and_reports_its_head() {
        let (p, heads) = check_chains(&chain(&[1, 2, 3], None), &BTreeSet::new());
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(heads, vec![("h".to_string(), 3, sha(3))]);
    }

    #[test]
    fn gaps_repeats_and_wrong_links_are_each_named() {
        let (p, _) = check_chains(&chain(&[1, 2, 5, 6], None), &BTreeSet::new());
        assert_eq!(
            p,
            vec!["host h: segments 3 to 4 are missing before 5.kga (removed, or never written)"]
        );
        let (p, _) = check_chains(&chain(&[2, 3], None), &BTreeSet::new());
        assert_eq!(
            p,
            vec!["host h: segment 1 is missing before 2.kga (removed, or never written)"]
        );
        let (p, _) = check_chains(&chain(&[1, 2, 3], Some(3)), &BTreeSet::new());
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("3.kga: records previous-segment SHA-256"),
            "{p:?}"
        );
        let (p, _) = check_chains(&chain(&[1, 2], Some(1)), &BTreeSet::new());
        assert!(p[0].starts_with("1.kga: is segment 1 but records"), "{p:?}");
        let mut c = chain(&[1, 2], None);
        c.get_mut("h")
            .unwrap()
            .get_mut(&2)
            .unwrap()
            .push(("copy.kga".into(), sha(1), sha(2)));
        let (p, _) = check_chains(&c, &BTreeSet::new());
        assert_eq!(
            p,
            vec!["host h: segment 2 appears 2 times: 2.kga, copy.kga"]
        );
    }

    #[test]
    fn segments_that_failed_to_open_are_not_also_called_missing() {
        let failed: BTreeSet<_> = [("h".to_string(), 2)].into_iter().collect();
        let (p, _) = check_chains(&chain(&[1, 3], None), &failed);
        assert!(p.is_empty(), "{p:?}");
    }
}
