//! AWS clients, built one way for every part of kmsguard: the standard credential chain,
//! a default region, and an optional endpoint (local emulators such as moto;
//! `AWS_ENDPOINT_URL` works too). S3 against a local endpoint needs path-style
//! addressing, which the Rust SDK cannot take from the environment, so it is a setting.
//!
//! Keys of other accounts are reached through a role per account (`Roles`, the
//! `roles = { "ACCOUNT" = "ROLE ARN" }` tables of `[remediation]` and `[inventory]`):
//! `kms_client_as` builds a KMS client whose credentials come from STS AssumeRole.

use aws_config::{BehaviorVersion, Region, SdkConfig};

/// Where and how to reach AWS.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// Default region; the SDK's chain (AWS_REGION, profile) when None.
    pub region: Option<String>,
    /// Endpoint override for every service (e.g. `http://127.0.0.1:5000`).
    pub endpoint_url: Option<String>,
    /// Path-style S3 URLs (`http://host/bucket/key`); needed for local endpoints.
    pub s3_force_path_style: bool,
}

impl AwsSettings {
    /// Settings from the environment alone: path-style S3 when an endpoint is set.
    pub fn from_env() -> Self {
        let endpoint_url = std::env::var("AWS_ENDPOINT_URL")
            .ok()
            .filter(|s| !s.is_empty());
        AwsSettings {
            region: None,
            s3_force_path_style: endpoint_url.is_some(),
            endpoint_url,
        }
    }
}

/// Loads the shared SDK configuration.
pub async fn sdk_config(settings: &AwsSettings) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url.clone());
    }
    loader.load().await
}

/// An S3 client with the SDK's standard retries (archive writes and reads).
pub fn s3_client(config: &SdkConfig, settings: &AwsSettings) -> aws_sdk_s3::Client {
    s3_client_with(config, settings, true)
}

/// An S3 client without the SDK's own retries, for callers that retry themselves (the
/// replay's listing and downloads, the daemon's downloads): with both, every failure would
/// be retried up to 3 times inside each of the caller's attempts, unseen by its counters
/// and its budget.
pub fn s3_client_own_retries(config: &SdkConfig, settings: &AwsSettings) -> aws_sdk_s3::Client {
    s3_client_with(config, settings, false)
}

fn s3_client_with(
    config: &SdkConfig,
    settings: &AwsSettings,
    sdk_retries: bool,
) -> aws_sdk_s3::Client {
    let mut b =
        aws_sdk_s3::config::Builder::from(config).force_path_style(settings.s3_force_path_style);
    if !sdk_retries {
        b = b.retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled());
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

pub fn sqs_client(config: &SdkConfig, region: Option<&str>) -> aws_sdk_sqs::Client {
    let mut b = aws_sdk_sqs::config::Builder::from(config);
    if let Some(r) = region {
        b = b.region(Region::new(r.to_string()));
    }
    aws_sdk_sqs::Client::from_conf(b.build())
}

/// A KMS client, optionally for another region than the default (keys live in theirs).
pub fn kms_client(config: &SdkConfig, region: Option<&str>) -> aws_sdk_kms::Client {
    let mut b = aws_sdk_kms::config::Builder::from(config);
    if let Some(r) = region {
        b = b.region(Region::new(r.to_string()));
    }
    aws_sdk_kms::Client::from_conf(b.build())
}

/// Roles to assume per account: 12-digit account id -> role ARN.
pub type Roles = std::collections::BTreeMap<String, String>;

/// Checks a `roles` table of section `section` (`[remediation]`, `[inventory]`); each
/// problem names the entry and the fix.
pub fn validate_roles(section: &str, roles: &Roles, problems: &mut Vec<String>) {
    for (a, role) in roles {
        if !(a.len() == 12 && a.bytes().all(|b| b.is_ascii_digit())) {
            problems.push(format!(
                "[{section}.roles] \"{a}\": the key must be a 12-digit account id"
            ));
        }
        if !(role.starts_with("arn:") && role.contains(":role/")) {
            problems.push(format!(
                "[{section}.roles] \"{a}\" = \"{role}\": use a role ARN, arn:aws:iam::{a}:role/NAME"
            ));
        }
    }
}

/// A KMS client for one region, without the SDK's own retries (callers run their own
/// retry layer, so every attempt is seen and counted), and with credentials from STS
/// AssumeRole of `role` when given (refreshed by the SDK before they expire). The one
/// way remediation and the inventory reach keys of other accounts.
pub async fn kms_client_as(
    config: &SdkConfig,
    region: &str,
    role: Option<&str>,
    session_name: &str,
) -> aws_sdk_kms::Client {
    let mut b = aws_sdk_kms::config::Builder::from(config)
        .region(Region::new(region.to_string()))
        .retry_config(aws_sdk_kms::config::retry::RetryConfig::disabled());
    if let Some(role) = role {
        let provider = aws_config::sts::AssumeRoleProvider::builder(role.to_string())
            .session_name(session_name)
            .region(Region::new(region.to_string()))
            .configure(config)
            .build()
            .await;
        b = b.credentials_provider(provider);
    }
    aws_sdk_kms::Client::from_conf(b.build())
}

/// A CloudTrail client for one region, without the SDK's own retries: the caller paces
/// LookupEvents (2 requests per second) and backs off on throttling itself, so every
/// attempt is counted and paced.
pub fn cloudtrail_client(config: &SdkConfig, region: &str) -> aws_sdk_cloudtrail::Client {
    let b = aws_sdk_cloudtrail::config::Builder::from(config)
        .region(Region::new(region.to_string()))
        .retry_config(aws_sdk_cloudtrail::config::retry::RetryConfig::disabled());
    aws_sdk_cloudtrail::Client::from_conf(b.build())
}
