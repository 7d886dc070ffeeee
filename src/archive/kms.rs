//! The KMS side of envelope encryption: one `GenerateDataKey` per segment, and unwrapping
//! `aws-kms` encrypted data keys with `Decrypt`, multi-Region-key aware (a replica in
//! another region opens what its primary wrapped). Plaintext data keys leave this module
//! only as [`DataKey`], which is zeroized on drop; KMS calls are counted.

use super::message::{DataKey, EncryptedDataKey, EncryptionContext, PROVIDER_AWS_KMS};
use super::ArchiveError;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use zeroize::Zeroizing;

/// Parts of a KMS key ARN: `arn:PARTITION:kms:REGION:ACCOUNT:key/ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyArn<'a> {
    pub region: &'a str,
    pub account: &'a str,
    pub key_id: &'a str,
}

impl<'a> KeyArn<'a> {
    pub fn parse(arn: &'a str) -> Option<KeyArn<'a>> {
        let mut it = arn.splitn(6, ':');
        let (arn_, _partition, service, region, account, resource) = (
            it.next()?,
            it.next()?,
            it.next()?,
            it.next()?,
            it.next()?,
            it.next()?,
        );
        let key_id = resource.strip_prefix("key/")?;
        (arn_ == "arn" && service == "kms" && !region.is_empty() && !key_id.is_empty()).then_some(
            KeyArn {
                region,
                account,
                key_id,
            },
        )
    }

    fn is_mrk(&self) -> bool {
        self.key_id.starts_with("mrk-")
    }
}

/// Whether a data key wrapped under `wrapped_by` can be opened with `key`: the same ARN,
/// or the same multi-Region key (same account and `mrk-` id) in another region.
pub fn key_matches(key: &str, wrapped_by: &str) -> bool {
    if key == wrapped_by {
        return true;
    }
    match (KeyArn::parse(key), KeyArn::parse(wrapped_by)) {
        (Some(a), Some(b)) => a.is_mrk() && a.key_id == b.key_id && a.account == b.account,
        _ => false,
    }
}

/// KMS clients per region, and a count of the calls made.
pub struct Keyring {
    sdk: aws_config::SdkConfig,
    clients: Mutex<HashMap<String, aws_sdk_kms::Client>>,
    calls: AtomicU64,
}

fn kms_error(op: &'static str, key: &str, e: impl std::error::Error) -> ArchiveError {
    ArchiveError::Kms {
        op,
        key: key.to_string(),
        message: aws_sdk_kms::error::DisplayErrorContext(e).to_string(),
    }
}

impl Keyring {
    pub fn new(sdk: aws_config::SdkConfig) -> Keyring {
        Keyring {
            sdk,
            clients: Mutex::new(HashMap::new()),
            calls: AtomicU64::new(0),
        }
    }

    /// KMS API calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn client(&self, region: Option<&str>) -> aws_sdk_kms::Client {
        let name = region.unwrap_or("").to_string();
        let mut map = match self.clients.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(name)
            .or_insert_with(|| crate::aws::kms_client(&self.sdk, region))
            .clone()
    }

    /// A fresh 256-bit data key from `GenerateDataKey` under `key` (ARN, key id or alias),
    /// bound to `context`; the encrypted copy names the key by the ARN KMS returns.
    pub async fn generate(
        &self,
        key: &str,
        context: &EncryptionContext,
    ) -> Result<(DataKey, EncryptedDataKey), ArchiveError> {
        let region = KeyArn::parse(key).map(|a| a.region);
        self.calls.fetch_add(1, Ordering::Relaxed);
        let out = self
            .client(region)
            .generate_data_key()
            .key_id(key)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(context.clone().into_iter().collect()))
            .send()
            .await
            .map_err(|e| kms_error("GenerateDataKey", key, e))?;
        let arn = out.key_id.clone().unwrap_or_default();
        let wrapped = out.ciphertext_blob.clone().map(Blob::into_inner);
        let plain = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        let (Some(wrapped), true) = (wrapped, KeyArn::parse(&arn).is_some()) else {
            return Err(ArchiveError::Kms {
                op: "GenerateDataKey",
                key: key.to_string(),
                message: "the response lacks the key ARN or the encrypted data key".into(),
            });
        };
        let data_key = to_data_key(&plain, "GenerateDataKey", key)?;
        Ok((
            data_key,
            EncryptedDataKey {
                provider_id: PROVIDER_AWS_KMS.into(),
                provider_info: arn.into_bytes(),
                ciphertext: wrapped,
            },
        ))
    }

    /// Unwraps the first `aws-kms` data key that `key` can open (or, without `key`, any:
    /// each under the key that wrapped it, in that key's region). Errors name `what`.
    pub async fn unwrap(
        &self,
        what: &str,
        data_keys: &[EncryptedDataKey],
        context: &EncryptionContext,
        key: Option<&str>,
    ) -> Result<DataKey, ArchiveError> {
        let mut tried = Vec::new();
        let mut last_err = None;
        for edk in data_keys {
            if edk.provider_id != PROVIDER_AWS_KMS {
                continue;
            }
            let Ok(wrapped_by) = std::str::from_utf8(&edk.provider_info) else {
                continue;
            };
            tried.push(wrapped_by.to_string());
            let use_key = match key {
                Some(k) if key_matches(k, wrapped_by) => k,
                Some(_) => continue,
                None => wrapped_by,
            };
            let region = KeyArn::parse(use_key).map(|a| a.region);
            self.calls.fetch_add(1, Ordering::Relaxed);
            let res = self
                .client(region)
                .decrypt()
                .key_id(use_key)
                .ciphertext_blob(Blob::new(edk.ciphertext.clone()))
                .set_encryption_context(Some(context.clone().into_iter().collect()))
                .send()
                .await;
            match res {
                Ok(out) => {
                    // KMS must say it used the key we asked for (the SDK's rule too).
                    let used = out.key_id.clone().unwrap_or_default();
                    let plain =
                        Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
                    if KeyArn::parse(use_key).is_some() && used != use_key {
                        last_err = Some(format!("KMS answered with key {used}"));
                        continue;
                    }
                    return to_data_key(&plain, "Decrypt", use_key);
                }
                Err(e) => last_err = Some(kms_error("Decrypt", use_key, e).to_string()),
            }
        }
        Err(ArchiveError::NoUsableKey {
            segment: what.to_string(),
            wrapped_by: tried.join(", "),
            key: key.map(str::to_string),
            last_error: last_err,
        })
    }
}

fn to_data_key(plain: &[u8], op: &'static str, key: &str) -> Result<DataKey, ArchiveError> {
    let mut dk = Zeroizing::new([0u8; 32]);
    if plain.len() != 32 {
        return Err(ArchiveError::Kms {
            op,
            key: key.to_string(),
            message: format!("data key of {} bytes, expected 32", plain.len()),
        });
    }
    dk.copy_from_slice(plain);
    Ok(dk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_region_replicas_match_and_others_do_not() {
        let p = "arn:aws:kms:us-east-1:111122223333:key/mrk-1234";
        let r = "arn:aws:kms:eu-west-1:111122223333:key/mrk-1234";
        let other_acct = "arn:aws:kms:eu-west-1:999999999999:key/mrk-1234";
        let single = "arn:aws:kms:us-east-1:111122223333:key/1234";
        let single_r = "arn:aws:kms:eu-west-1:111122223333:key/1234";
        assert!(key_matches(r, p));
        assert!(key_matches(p, p));
        assert!(!key_matches(other_acct, p));
        assert!(!key_matches(single_r, single));
        assert!(!key_matches("alias/x", p));
        assert_eq!(KeyArn::parse(r).map(|a| a.region), Some("eu-west-1"));
        assert_eq!(KeyArn::parse("arn:aws:s3:::b"), None);
    }
}
