//! Writing a corpus as CloudTrail lays it out in S3: one gzipped file per account,
//! region and five minutes, hourly digests, the S3 event notification and CloudTrail's
//! SNS form for each file, and `truth.json`.

use crate::json::J;
use crate::time::{day_path, iso, iso_millis, stamp};
use crate::world::ORG_ID;
use crate::{arr, obj, Gen, Summary};
use std::io::Write;
use std::path::Path;

pub const BUCKET: &str = "org-cloudtrail-logs";
const TAIL_CHARS: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

impl Gen {
    pub(crate) fn write(&mut self) -> std::io::Result<Summary> {
        let mut notes = Vec::new();
        let mut sns = Vec::new();
        let mut sum = Summary {
            incidents: self.truth.len(),
            ..Summary::default()
        };
        let buckets = std::mem::take(&mut self.buckets);
        for ((account, region, w), mut recs) in buckets {
            recs.sort_by_key(|(t, _)| *t);
            let key = self.log_key(&account, &region, w);
            let mut data = Vec::with_capacity(recs.len() * 1500 + 16);
            data.extend_from_slice(b"{\"Records\":[");
            for (i, (_, r)) in recs.iter().enumerate() {
                if i > 0 {
                    data.push(b',');
                }
                r.write_compact(&mut data);
                sum.kms_events += u64::from(
                    r.get("eventSource").and_then(J::as_str) == Some("kms.amazonaws.com"),
                );
            }
            data.extend_from_slice(b"]}");
            let blob = gzip(&data);
            put(&self.out.join(&key), &blob)?;
            sum.files += 1;
            sum.events += recs.len() as u64;
            sum.json_bytes += data.len() as u64;
            sum.gzip_bytes += blob.len() as u64;
            notes.push(s3_event(BUCKET, &key, blob.len() as u64, &region, w + 300));
            sns.push(obj! {"s3Bucket" => BUCKET, "s3ObjectKey" => arr![key.as_str()]});
            if self.opts.digests && w % 3600 == 0 {
                let dkey = format!(
                    "{}/CloudTrail-Digest/{region}/{}/{account}_CloudTrail-Digest_{region}_org-trail_{region}_{}.json.gz",
                    self.prefix(&account),
                    day_path(w),
                    stamp(w)
                );
                let digest = obj! {
                    "awsAccountId" => account.as_str(), "digestStartTime" => iso(w - 3600), "digestEndTime" => iso(w),
                    "digestS3Bucket" => BUCKET, "digestS3Object" => dkey.as_str(),
                    "digestPublicKeyFingerprint" => "a".repeat(32),
                    "digestSignatureAlgorithm" => "SHA256withRSA", "logFiles" => arr![],
                };
                put(&self.out.join(&dkey), &gzip(&digest.python()))?;
                notes.push(s3_event(BUCKET, &dkey, 100, &region, w));
            }
        }
        jsonl(&self.out.join("notifications.jsonl"), &notes)?;
        jsonl(&self.out.join("sns-notifications.jsonl"), &sns)?;
        put(
            &self.out.join("truth.json"),
            J::Arr(std::mem::take(&mut self.truth))
                .indented()
                .as_bytes(),
        )?;
        Ok(sum)
    }

    pub(crate) fn prefix(&self, account: &str) -> String {
        if self.opts.org_trail {
            format!("AWSLogs/{ORG_ID}/{account}")
        } else {
            format!("AWSLogs/{account}")
        }
    }

    /// A log file's key: `PREFIX/CloudTrail/REGION/YYYY/MM/DD/ACCOUNT_CloudTrail_REGION_STAMP_TAIL.json.gz`.
    pub(crate) fn log_key(&mut self, account: &str, region: &str, w: i64) -> String {
        let tail = self.rng.string(TAIL_CHARS, 16);
        format!(
            "{}/CloudTrail/{region}/{}/{account}_CloudTrail_{region}_{}_{tail}.json.gz",
            self.prefix(account),
            day_path(w),
            stamp(w)
        )
    }
}

/// Gzip (level 6, no name, mtime 0) of a whole buffer.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(6).expect("level 6"));
    let mut out = vec![0; c.gzip_compress_bound(data.len())];
    let n = c
        .gzip_compress(data, &mut out)
        .expect("the bound is large enough");
    out.truncate(n);
    out
}

/// A streaming gzip writer for files too large to hold.
pub fn gzip_writer(
    path: &Path,
) -> std::io::Result<flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    Ok(flate2::GzBuilder::new()
        .mtime(0)
        .write(f, flate2::Compression::new(6)))
}

pub fn put(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, data)
}

fn jsonl(path: &Path, lines: &[J]) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for l in lines {
        f.write_all(&l.python())?;
        f.write_all(b"\n")?;
    }
    f.flush()
}

/// The S3 event notification for a new object (what SQS delivers), its key
/// form-urlencoded as S3 does.
pub fn s3_event(bucket: &str, key: &str, size: u64, region: &str, t: i64) -> J {
    let etag = format!(
        "{:016x}{:016x}",
        crate::rng::fnv(key),
        crate::rng::fnv(&format!("etag:{key}"))
    );
    let sequencer = format!("{:016X}", crate::rng::fnv(&format!("seq:{key}")));
    obj! {"Records" => arr![obj! {
        "eventVersion" => "2.1", "eventSource" => "aws:s3", "awsRegion" => region,
        "eventTime" => iso_millis(t), "eventName" => "ObjectCreated:Put",
        "userIdentity" => obj!{"principalId" => "AWS:AROAEXAMPLE:regionalDeliverySession"},
        "requestParameters" => obj!{"sourceIPAddress" => "10.0.0.1"},
        "responseElements" => obj!{"x-amz-request-id" => "C3D13FE58DE4C810", "x-amz-id-2" => "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3" => obj! {
            "s3SchemaVersion" => "1.0", "configurationId" => "cloudtrail-new-files",
            "bucket" => obj!{"name" => bucket, "ownerIdentity" => obj!{"principalId" => "A3NL1KOZZKExample"}, "arn" => format!("arn:aws:s3:::{bucket}")},
            "object" => obj!{"key" => quote_plus(key), "size" => size as i64, "eTag" => etag, "sequencer" => sequencer},
        },
    }]}
}

/// Python's `urllib.parse.quote_plus(key, safe="/")`: how S3 encodes keys in events.
pub fn quote_plus(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' | b'/' => {
                out.push(char::from(b))
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_encoded_as_s3_does() {
        assert_eq!(quote_plus("a b+c/ü.json.gz"), "a+b%2Bc/%C3%BC.json.gz");
    }

    #[test]
    fn gzip_round_trips() {
        let data = b"{\"Records\":[]}".repeat(100);
        let packed = gzip(&data);
        let mut d = flate2::read::GzDecoder::new(&packed[..]);
        let mut back = Vec::new();
        std::io::Read::read_to_end(&mut d, &mut back).unwrap();
        assert_eq!(back, data);
    }
}
