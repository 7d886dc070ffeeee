//! Corpora of other shapes than a day of traffic: one very large file, an organization
//! trail of many tiny files, and hostile single files that anyone with credentials in an
//! account can cause (floods of denied calls, of distinct keys, of distinct principals).

use crate::json::J;
use crate::layout::{gzip, gzip_writer, put};
use crate::time::iso;
use crate::traffic::Call;
use crate::world::{Via, ACCT_PROD, REGIONS};
use crate::{obj, Gen, Summary};
use std::io::Write;

impl Gen {
    /// Takes the one record the last call filed.
    fn take_filed(&mut self) -> J {
        let buckets = std::mem::take(&mut self.buckets);
        buckets
            .into_values()
            .flatten()
            .map(|(_, r)| r)
            .next()
            .expect("a record was filed")
    }

    /// One file of about `--single-file-mb` MB of JSON: a third Decrypts, the rest other
    /// services, all in one hour.
    pub(crate) fn big_file(&mut self) -> std::io::Result<Summary> {
        let mb = self.opts.single_file_mb;
        let path = self.out.join("large").join(format!(
            "{ACCT_PROD}_CloudTrail_us-east-1_20261001T0000Z_LARGE{mb:011}.json.gz"
        ));
        let mut f = gzip_writer(&path)?;
        f.write_all(b"{\"Records\":[")?;
        let (mut written, mut n, mut kms) = (0u64, 0u64, 0u64);
        let mut buf = Vec::with_capacity(4096);
        while written < mb * 1_000_000 {
            let t = self.start + (n % 3600) as i64;
            let app = self.rng.pick(&self.w.apps).clone();
            if n % 3 == 0 {
                self.decrypt(t, &app, None, None, None);
                kms += 1;
            } else {
                self.other(t, ACCT_PROD, "us-east-1");
            }
            let rec = self.take_filed();
            buf.clear();
            if n > 0 {
                buf.push(b',');
            }
            rec.write_compact(&mut buf);
            f.write_all(&buf)?;
            written += buf.len() as u64;
            n += 1;
        }
        f.write_all(b"]}")?;
        let gz = f.finish()?.into_inner().map_err(|e| e.into_error())?;
        let gzip_bytes = gz.metadata()?.len();
        Ok(Summary {
            files: 1,
            events: n,
            kms_events: kms,
            json_bytes: written + 14,
            gzip_bytes,
            note: format!("wrote {}: {n} records", path.display()),
            ..Summary::default()
        })
    }

    /// An organization trail of `--tiny-files` files: every account of the organization
    /// and two regions write one file per five minutes, `--records-per-file` records
    /// each, in the `AWSLogs/o-…/ACCOUNT/…` layout.
    pub(crate) fn tiny_files(&mut self) -> std::io::Result<Summary> {
        let accounts: Vec<String> = (0..self.opts.accounts.max(1))
            .map(|i| {
                if i == 0 {
                    ACCT_PROD.to_string()
                } else {
                    format!("{:012}", 200_000_000_000 + i * 7_919_113)
                }
            })
            .collect();
        let regions = &REGIONS[..2];
        self.opts.org_trail = true;
        let mut sum = Summary::default();
        let mut t = self.start;
        let want = self.opts.tiny_files;
        let mut data = Vec::with_capacity(8192);
        'windows: loop {
            for account in &accounts {
                for region in regions {
                    if sum.files == want {
                        break 'windows;
                    }
                    data.clear();
                    data.extend_from_slice(b"{\"Records\":[");
                    for i in 0..self.opts.records_per_file {
                        let at = t + self.rng.below(300) as i64;
                        let local: Vec<usize> = (0..self.w.apps.len())
                            .filter(|&a| self.w.apps[a].region == *region)
                            .collect();
                        let app = self.w.apps[*self.rng.pick(&local)].clone();
                        let kms = self.rng.chance(self.opts.kms_share);
                        if kms {
                            self.decrypt(at, &app, None, None, None);
                        } else {
                            self.other(at, ACCT_PROD, region);
                        }
                        let rec = self.take_filed();
                        if i > 0 {
                            data.push(b',');
                        }
                        let mut one = Vec::with_capacity(1600);
                        rec.write_compact(&mut one);
                        // Every account has its own principals and keys.
                        let text = String::from_utf8(one).expect("JSON text is UTF-8");
                        data.extend_from_slice(text.replace(ACCT_PROD, account).as_bytes());
                        sum.events += 1;
                        sum.kms_events += u64::from(kms);
                    }
                    data.extend_from_slice(b"]}");
                    let blob = gzip(&data);
                    let key = self.log_key(account, region, t);
                    put(&self.out.join(&key), &blob)?;
                    sum.files += 1;
                    sum.json_bytes += data.len() as u64;
                    sum.gzip_bytes += blob.len() as u64;
                }
            }
            t += 300;
        }
        Ok(sum)
    }

    /// One hostile file of `--records` records (see `Options::hostile`).
    pub(crate) fn hostile(&mut self, kind: &str) -> std::io::Result<Summary> {
        let n = self.opts.records;
        let key_path = format!(
            "AWSLogs/{ACCT_PROD}/CloudTrail/us-east-1/2026/10/01/{ACCT_PROD}_CloudTrail_us-east-1_{}_HOSTILE{}.json.gz",
            crate::time::stamp(self.start),
            kind.replace('-', "")
        );
        let path = self.out.join(&key_path);
        let mut f = gzip_writer(&path)?;
        f.write_all(b"{\"Records\":[")?;
        let app = self
            .w
            .apps
            .iter()
            .find(|a| a.via == Via::Direct && a.region == REGIONS[0])
            .cloned()
            .expect("the world has a direct us-east-1 app");
        let target = self
            .w
            .key_indexes(|k| k.high && k.region == REGIONS[0])
            .first()
            .copied()
            .unwrap_or(0);
        let mut written = 0u64;
        let mut buf = Vec::with_capacity(4096);
        for i in 0..n {
            let t = self.start + (i * 300 / n.max(1)) as i64;
            let rec = match kind {
                "repeated-denied" => {
                    let message = format!("User: {} is not authorized to perform: kms:Decrypt on resource: {} because no resource-based policy allows the kms:Decrypt action", app.arn(), self.w.keys[target].arn);
                    self.decrypt(
                        t,
                        &app,
                        Some(target),
                        None,
                        Some(("AccessDeniedException", message)),
                    );
                    self.take_filed()
                }
                "distinct-denied" => {
                    let arn = format!(
                        "arn:aws:kms:us-east-1:{ACCT_PROD}:key/{}",
                        self.rng.uuid(true)
                    );
                    let message = format!("User: {} is not authorized to perform: kms:Decrypt on resource: {arn} because no resource-based policy allows the kms:Decrypt action", app.arn());
                    self.decrypt(
                        t,
                        &app,
                        Some(target),
                        None,
                        Some(("AccessDeniedException", message)),
                    );
                    let mut r = self.take_filed();
                    if let Some(p) = r.get_mut("requestParameters") {
                        p.set("keyId", arn.as_str().into());
                    }
                    r.set(
                        "resources",
                        crate::arr![
                            obj! {"accountId" => ACCT_PROD, "type" => "AWS::KMS::Key", "ARN" => arn}
                        ],
                    );
                    r
                }
                _ => {
                    let user = format!("u-{i:07}");
                    let ident = obj! {
                        "type" => "IAMUser",
                        "principalId" => format!("AIDA{:017X}", i),
                        "arn" => format!("arn:aws:iam::{ACCT_PROD}:user/{user}"),
                        "accountId" => ACCT_PROD,
                        "accessKeyId" => format!("AKIA{:016X}", crate::rng::fnv(&user)),
                        "userName" => user,
                    };
                    let k = *self.rng.pick(&app.keys);
                    let ip = format!(
                        "10.{}.{}.{}",
                        self.rng.below(256),
                        self.rng.below(256),
                        1 + self.rng.below(254)
                    );
                    let params = obj! {"encryptionAlgorithm" => "SYMMETRIC_DEFAULT", "keyId" => self.w.keys[k].arn.as_str()};
                    self.kms_record(t, ident, Call::new("Decrypt", k, &ip, &app.ua, params))
                }
            };
            buf.clear();
            if i > 0 {
                buf.push(b',');
            }
            rec.write_compact(&mut buf);
            f.write_all(&buf)?;
            written += buf.len() as u64;
        }
        f.write_all(b"]}")?;
        let gz = f.finish()?.into_inner().map_err(|e| e.into_error())?;
        Ok(Summary {
            files: 1,
            events: n,
            kms_events: n,
            json_bytes: written + 14,
            gzip_bytes: gz.metadata()?.len(),
            note: format!(
                "wrote {}: {n} {kind} records, ending {}",
                path.display(),
                iso(self.start + 300)
            ),
            ..Summary::default()
        })
    }
}
