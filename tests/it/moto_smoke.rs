//! The test servers themselves: moto starts on a free loopback port and serves S3 and KMS
//! (including decrypting under a multi-Region key, which needs the launcher's patch).

use crate::support::*;

#[tokio::test(flavor = "multi_thread")]
async fn moto_serves_s3_and_kms_with_multi_region_keys() {
    let moto = Moto::start();
    let sdk = moto.sdk("us-east-1").await;
    let s3 = kmsguard::aws::s3_client(
        &sdk,
        &kmsguard::aws::AwsSettings {
            s3_force_path_style: true,
            ..Default::default()
        },
    );
    s3.create_bucket()
        .bucket("smoke")
        .send()
        .await
        .expect("create bucket");
    let kms = kmsguard::aws::kms_client(&sdk, None);
    let key = kms
        .create_key()
        .multi_region(true)
        .send()
        .await
        .expect("create key");
    let key_id = key.key_metadata().unwrap().key_id().to_string();
    assert!(key_id.starts_with("mrk-"));
    let ct = kms
        .encrypt()
        .key_id(&key_id)
        .plaintext(aws_sdk_kms::primitives::Blob::new(b"hello".to_vec()))
        .send()
        .await
        .expect("encrypt");
    let pt = kms
        .decrypt()
        .ciphertext_blob(ct.ciphertext_blob().unwrap().clone())
        .send()
        .await
        .expect("decrypt under an mrk- key works with the launcher's patch");
    assert_eq!(pt.plaintext().unwrap().as_ref(), b"hello");
}
