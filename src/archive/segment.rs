//! What a segment says about itself: the encryption context that binds it to its purpose
//! and place in the chain (purpose, host, sequence number, SHA-256 of the previous
//! segment's ciphertext, first/last alert time, alert count), and its object name.
//! Keeping this in the encryption context (not in a private header) means the header
//! authentication covers it and `aws-encryption-cli` still opens the file.

use super::message::EncryptionContext;
use sha2::{Digest, Sha256};

pub const PURPOSE: &str = "kmsguard-alert-archive";
pub const K_PURPOSE: &str = "purpose";
pub const K_HOST: &str = "kmsguard:host";
pub const K_SEQ: &str = "kmsguard:segment";
pub const K_PREV: &str = "kmsguard:prev-sha256";
pub const K_FIRST: &str = "kmsguard:first-alert";
pub const K_LAST: &str = "kmsguard:last-alert";
pub const K_COUNT: &str = "kmsguard:alerts";
pub const K_FORMAT: &str = "kmsguard:format";
pub const FORMAT_JSONL: &str = "jsonl-v1";
/// The previous-hash of a host's first segment.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The chain-relevant facts of one segment, from (or for) its encryption context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub host: String,
    pub seq: u64,
    pub prev_sha256: String,
    pub first_alert: String,
    pub last_alert: String,
    pub alerts: u64,
}

impl SegmentInfo {
    pub fn context(&self) -> EncryptionContext {
        [
            (K_PURPOSE, PURPOSE.to_string()),
            (K_FORMAT, FORMAT_JSONL.to_string()),
            (K_HOST, self.host.clone()),
            (K_SEQ, self.seq.to_string()),
            (K_PREV, self.prev_sha256.clone()),
            (K_FIRST, self.first_alert.clone()),
            (K_LAST, self.last_alert.clone()),
            (K_COUNT, self.alerts.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Reads a kmsguard segment's context; Err says what is missing or wrong.
    pub fn from_context(ctx: &EncryptionContext) -> Result<SegmentInfo, String> {
        let get = |k: &str| {
            ctx.get(k).cloned().ok_or_else(|| {
                format!("encryption context lacks {k:?}: not a kmsguard archive segment")
            })
        };
        let purpose = get(K_PURPOSE)?;
        if purpose != PURPOSE {
            return Err(format!(
                "encryption context purpose is {purpose:?}, not {PURPOSE:?}"
            ));
        }
        let num = |k: &str| -> Result<u64, String> {
            get(k)?
                .parse()
                .map_err(|_| format!("encryption context {k:?} is not a number"))
        };
        let prev = get(K_PREV)?;
        if prev.len() != 64 || !prev.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("encryption context {K_PREV:?} is not a SHA-256"));
        }
        Ok(SegmentInfo {
            host: get(K_HOST)?,
            seq: num(K_SEQ)?,
            prev_sha256: prev,
            first_alert: get(K_FIRST)?,
            last_alert: get(K_LAST)?,
            alerts: num(K_COUNT)?,
        })
    }

    /// Object name relative to the archive root: `YYYY/MM/DD/<host>/<seq>.kga`, dated by
    /// the first alert (or `undated` when its time is not RFC 3339), the sequence number
    /// zero-padded so names sort in chain order.
    pub fn object_name(&self) -> String {
        let t = self.first_alert.as_bytes();
        let dated = t.len() >= 10
            && t[4] == b'-'
            && t[7] == b'-'
            && [0, 1, 2, 3, 5, 6, 8, 9]
                .iter()
                .all(|&i| t[i].is_ascii_digit());
        let day = if dated {
            format!(
                "{}/{}/{}",
                &self.first_alert[..4],
                &self.first_alert[5..7],
                &self.first_alert[8..10]
            )
        } else {
            "undated".to_string()
        };
        format!(
            "{day}/{}/{:010}.{}",
            self.host,
            self.seq,
            super::store::SEGMENT_EXT
        )
    }
}

/// Whether an alert's `time` is used as such: `YYYY-MM-DDTHH:MM:SS...` in at most 40
/// ASCII characters (fractions and offsets kept). Others are dated when archived, and
/// not range-checked when read.
pub fn plausible_time(t: &str) -> bool {
    let b = t.as_bytes();
    (20..=40).contains(&b.len())
        && b.iter().all(|c| c.is_ascii_graphic())
        && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
            .iter()
            .all(|&i| b[i].is_ascii_digit())
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
}

/// Sequence number and host from an object name made by [`SegmentInfo::object_name`].
pub fn parse_object_name(rel: &str) -> Option<(String, u64)> {
    let mut parts = rel.rsplit('/');
    let file = parts.next()?;
    let host = parts.next()?;
    let seq = file.strip_suffix(".kga")?.parse().ok()?;
    Some((host.to_string(), seq))
}

/// Hex SHA-256 of a segment's bytes (what the next segment records).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A host name usable in object names: letters, digits, `.`, `-`, `_`; others become `_`.
pub fn clean_host(host: &str) -> String {
    let h: String = host
        .trim()
        .chars()
        .take(100)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if h.is_empty() || h.chars().all(|c| c == '.') {
        "unknown-host".into()
    } else {
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SegmentInfo {
        SegmentInfo {
            host: "ip-10-0-0-1".into(),
            seq: 42,
            prev_sha256: GENESIS.into(),
            first_alert: "2026-10-01T12:00:00Z".into(),
            last_alert: "2026-10-01T12:05:00Z".into(),
            alerts: 3,
        }
    }

    #[test]
    fn context_round_trips_and_names_sort_by_sequence() {
        let i = info();
        assert_eq!(SegmentInfo::from_context(&i.context()), Ok(i.clone()));
        assert_eq!(i.object_name(), "2026/10/01/ip-10-0-0-1/0000000042.kga");
        assert_eq!(
            parse_object_name(&i.object_name()),
            Some(("ip-10-0-0-1".into(), 42))
        );
        let mut bad = i.context();
        bad.insert(K_PURPOSE.into(), "other".into());
        assert!(SegmentInfo::from_context(&bad).is_err());
    }

    #[test]
    fn only_plausible_times_reach_the_context() {
        assert!(plausible_time("2026-10-01T12:00:00Z"));
        assert!(plausible_time("2026-10-01T12:00:00.123+02:00"));
        assert!(!plausible_time("2026-10-01"));
        assert!(!plausible_time(&format!(
            "2026-10-01T12:00:00Z{}",
            "x".repeat(70000)
        )));
        assert!(!plausible_time("2026-10-01T12:00:00 Z"));
    }

    #[test]
    fn hosts_are_cleaned_for_object_names() {
        assert_eq!(clean_host("a/../b c"), "a_.._b_c");
        assert_eq!(clean_host(".."), "unknown-host");
        assert_eq!(sha256_hex(b"").len(), 64);
    }
}
