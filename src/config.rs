//! The daemon's configuration file: `RawConfig` (serde, unknown keys rejected) is
//! validated into `Config` with errors that name the key and the fix, before any task
//! starts (`kmsguard check-config FILE` runs exactly this).

use crate::analyze::baseline::BaselineConfig;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid { path: String, problems: Vec<String> },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub aws: RawAws,
    pub state: Option<RawState>,
    #[serde(default)]
    pub rules: RawRules,
    #[serde(default)]
    pub sources: RawSources,
    #[serde(default)]
    pub sinks: RawSinks,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub baseline: BaselineConfig,
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub alerts: RawAlerts,
    /// Automatic remediation (docs/remediation.md); absent: none.
    pub remediation: Option<crate::remediate::RawRemediation>,
    /// The posture checks run by the scheduled inventory refresh (docs/posture.md).
    pub posture: Option<crate::posture::PostureConfig>,
    /// Roles per account and the refresh interval of the key inventory.
    pub inventory: Option<crate::inventory::RawInventory>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAws {
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    /// Path-style S3 URLs (default: on when an endpoint is set).
    pub s3_force_path_style: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub dir: PathBuf,
    /// Days the ledger remembers a processed file (default 15: longer than SQS's 14-day
    /// maximum message retention, so a redelivered notification is always recognised).
    #[serde(default)]
    pub ledger_days: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRules {
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub extra: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSources {
    #[serde(default)]
    pub sqs: Vec<RawSqs>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSqs {
    pub queue_url: String,
    pub region: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSinks {
    #[serde(default)]
    pub file: Vec<RawFileSink>,
    #[serde(default)]
    pub archive: Vec<RawArchiveSink>,
    /// Alert channels (docs/alerts.md): the same tables as `kmsguard alerts --config`.
    #[serde(default)]
    pub email: Vec<crate::act::config::EmailSink>,
    #[serde(default)]
    pub webhook: Vec<crate::act::config::WebhookSink>,
}

/// `[alerts]`: how the daemon delivers to alert channels (docs/alerts.md, "The daemon").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// How long an alert is retried before it is parked (default "1h").
    pub park_after: Option<String>,
}

/// Validated `[alerts]` settings.
#[derive(Debug, Clone)]
pub struct AlertsSettings {
    pub park_after: std::time::Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFileSink {
    pub path: PathBuf,
    /// Lowest severity written (default: info, everything).
    pub min_severity: Option<String>,
}

/// `[[sinks.archive]]`: the envelope-encrypted alert archive (docs/archive.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawArchiveSink {
    /// KMS key that wraps each segment's data key: key ARN (multi-Region `mrk-` keys
    /// too), key id or `alias/NAME`.
    pub key: Option<String>,
    /// Local archive folder (absolute).
    pub dir: Option<PathBuf>,
    /// `s3://BUCKET/PREFIX`.
    pub s3: Option<String>,
    /// This writer's name in object names and in the chain (default: the machine's).
    pub host: Option<String>,
    /// Roll a segment at this much JSON (default 8 MiB).
    pub max_segment_bytes: Option<u64>,
    /// Roll a segment at this many findings (default 10000).
    pub max_segment_findings: Option<usize>,
    /// Roll a segment once its oldest finding waited this long (default 300).
    pub max_segment_age_secs: Option<u64>,
    /// Lowest severity archived (default: info, everything).
    pub min_severity: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    pub listen: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Objects downloaded and analyzed at once (default 4).
    pub files_in_flight: Option<usize>,
    /// SQS visibility timeout while a message is worked on, seconds (default 120);
    /// extended every third of it while a file is in progress.
    pub visibility_timeout_secs: Option<i32>,
    /// Seconds to finish in-flight work after SIGTERM (default 20).
    pub shutdown_grace_secs: Option<u64>,
    /// What to do with a message whose file failed permanently (object gone, access
    /// denied, corrupt): "dead-letter" (leave it for the queue's DLQ; default) or "delete".
    pub on_permanent_error: Option<String>,
    /// Largest object downloaded, bytes (default 1 GiB).
    pub max_object_bytes: Option<u64>,
    /// Tries of a transient error (throttling, 5xx, timeouts) before the message is
    /// released for SQS to redeliver (default 4).
    pub transient_retries: Option<u32>,
}

/// What to do with messages of permanently failed files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPermanent {
    DeadLetter,
    Delete,
}

#[derive(Debug, Clone)]
pub struct SqsSourceConfig {
    pub queue_url: String,
    pub region: Option<String>,
}

#[derive(Debug, Clone)]
pub struct FileSinkConfig {
    pub path: PathBuf,
    pub min_severity: crate::Severity,
}

/// A validated `[[sinks.archive]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchiveSinkConfig {
    pub key: String,
    /// Where segments go: a folder and/or an S3 prefix (at least one).
    pub destinations: Vec<crate::archive::Location>,
    /// Already checked to be usable in object names.
    pub host: String,
    pub max_segment_bytes: usize,
    pub max_segment_findings: usize,
    pub max_segment_age: std::time::Duration,
    pub min_severity: crate::Severity,
}

/// Segment size limits of `[[sinks.archive]]`: a segment is held in memory while it is
/// sealed and written.
const ARCHIVE_BYTES: std::ops::RangeInclusive<u64> = 1024..=(256 << 20);
const ARCHIVE_FINDINGS: std::ops::RangeInclusive<usize> = 1..=100_000;
const ARCHIVE_AGE: std::ops::RangeInclusive<u64> = 1..=86_400;

/// Whether `key` looks like something KMS takes as a key: a key or alias ARN, `alias/…`,
/// a key id (UUID) or a multi-Region key id (`mrk-` and 32 hex digits).
fn plausible_kms_key(key: &str) -> bool {
    let hex_or_dash = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    let key_id = |id: &str| {
        (id.len() == 36 && hex_or_dash(id))
            || id
                .strip_prefix("mrk-")
                .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let alias = |a: &str| {
        a.strip_prefix("alias/").is_some_and(|n| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-".contains(&b))
        })
    };
    if let Some(rest) = key.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        return parts.len() == 5
            && parts[0].starts_with("aws")
            && parts[1] == "kms"
            && !parts[2].is_empty()
            && parts[3].len() == 12
            && parts[3].bytes().all(|b| b.is_ascii_digit())
            && (parts[4].strip_prefix("key/").is_some_and(key_id) || alias(parts[4]));
    }
    key_id(key) || alias(key)
}

/// Validates one `[[sinks.archive]]` (number `n`, from 1), pushing problems.
fn archive_sink(n: usize, a: &RawArchiveSink, problems: &mut Vec<String>) -> ArchiveSinkConfig {
    let at = format!("[[sinks.archive]] #{n}");
    let key = a.key.clone().unwrap_or_default();
    if a.key.is_none() {
        problems.push(format!("{at}: key is missing: set the KMS key that protects the archive, e.g. key = \"arn:aws:kms:us-east-1:111122223333:key/mrk-…\""));
    } else if !plausible_kms_key(&key) {
        problems.push(format!("{at}: key = \"{key}\" is not a KMS key: use its ARN (arn:aws:kms:REGION:ACCOUNT:key/ID, multi-Region mrk- keys too), its key id or alias/NAME"));
    }
    let mut destinations = Vec::new();
    if let Some(d) = &a.dir {
        if d.is_absolute() {
            destinations.push(crate::archive::Location::Dir(d.clone()));
        } else {
            problems.push(format!("{at}: dir = \"{}\": use an absolute path (the daemon's working directory is not yours), e.g. \"/var/lib/kmsguard/archive\"", d.display()));
        }
    }
    if let Some(s) = &a.s3 {
        match crate::archive::Location::parse(s) {
            Ok(l @ crate::archive::Location::S3 { .. }) => destinations.push(l),
            _ => problems.push(format!(
                "{at}: s3 = \"{s}\": write s3://BUCKET/PREFIX, e.g. \"s3://audit-bucket/kmsguard\""
            )),
        }
    }
    if a.dir.is_none() && a.s3.is_none() {
        problems.push(format!("{at}: no destination: set dir = \"/var/lib/kmsguard/archive\" and/or s3 = \"s3://BUCKET/PREFIX\""));
    }
    let host = match &a.host {
        None => crate::archive::segment::clean_host(&crate::archive::commands::default_host()),
        Some(h) => {
            if crate::archive::segment::clean_host(h) != *h || h.len() > 100 {
                problems.push(format!("{at}: host = \"{h}\": use at most 100 letters, digits, '.', '-' and '_' (it names the chain and its objects)"));
            }
            h.clone()
        }
    };
    let bytes = a.max_segment_bytes.unwrap_or(8 << 20);
    if !ARCHIVE_BYTES.contains(&bytes) {
        problems.push(format!(
            "{at}: max_segment_bytes = {bytes}: use {} to {} (default 8388608)",
            ARCHIVE_BYTES.start(),
            ARCHIVE_BYTES.end()
        ));
    }
    let findings = a.max_segment_findings.unwrap_or(10_000);
    if !ARCHIVE_FINDINGS.contains(&findings) {
        problems.push(format!(
            "{at}: max_segment_findings = {findings}: use {} to {} (default 10000)",
            ARCHIVE_FINDINGS.start(),
            ARCHIVE_FINDINGS.end()
        ));
    }
    let age = a.max_segment_age_secs.unwrap_or(300);
    if !ARCHIVE_AGE.contains(&age) {
        problems.push(format!(
            "{at}: max_segment_age_secs = {age}: use {} to {} seconds (default 300)",
            ARCHIVE_AGE.start(),
            ARCHIVE_AGE.end()
        ));
    }
    let min_severity = match a.min_severity.as_deref().map(str::parse::<crate::Severity>) {
        None => crate::Severity::Info,
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            problems.push(format!("{at}: min_severity: {e}"));
            crate::Severity::Info
        }
    };
    ArchiveSinkConfig {
        key,
        destinations,
        host,
        max_segment_bytes: bytes as usize,
        max_segment_findings: findings,
        max_segment_age: std::time::Duration::from_secs(age),
        min_severity,
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub aws: crate::aws::AwsSettings,
    pub state_dir: PathBuf,
    /// Days the ledger remembers a processed file (`[state] ledger_days`).
    pub ledger_days: u32,
    pub rules_path: Option<PathBuf>,
    pub extra_rules: Vec<PathBuf>,
    pub sqs: Vec<SqsSourceConfig>,
    pub file_sinks: Vec<FileSinkConfig>,
    pub archive_sinks: Vec<ArchiveSinkConfig>,
    /// Alert channels (`[[sinks.email]]`, `[[sinks.webhook]]`), secrets not loaded yet.
    pub alert_channels: Vec<crate::act::config::ChannelConfig>,
    pub alerts: AlertsSettings,
    pub metrics_listen: Option<SocketAddr>,
    pub baseline: BaselineConfig,
    pub files_in_flight: usize,
    pub visibility_timeout_secs: i32,
    pub shutdown_grace_secs: u64,
    pub on_permanent_error: OnPermanent,
    pub max_object_bytes: u64,
    pub transient_retries: u32,
    /// `[remediation]`, when present.
    pub remediation: Option<crate::remediate::RemediationConfig>,
    /// `[posture]` (defaults when absent).
    pub posture: crate::posture::PostureConfig,
    /// `[inventory]` (no roles, no scheduled refresh when absent).
    pub inventory: crate::inventory::InventoryConfig,
}

/// The region in an SQS queue URL (`https://sqs.REGION.amazonaws.com/ACCOUNT/NAME`).
pub fn region_of_queue_url(url: &str) -> Option<String> {
    let host = url.split("://").nth(1)?.split('/').next()?;
    let mut parts = host.split('.');
    match (parts.next(), parts.next()) {
        (Some("sqs"), Some(region)) if region.contains('-') => Some(region.to_string()),
        _ => None,
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let mut problems = Vec::new();
        let endpoint = raw.aws.endpoint_url.clone().or_else(|| {
            std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .filter(|s| !s.is_empty())
        });
        if let Some(e) = &endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                problems.push(format!(
                    "[aws] endpoint_url = \"{e}\": use a URL such as http://127.0.0.1:5000"
                ));
            }
        }
        let ledger_days = raw.state.as_ref().and_then(|s| s.ledger_days).unwrap_or(15);
        if ledger_days < 15 {
            problems.push(format!("[state] ledger_days = {ledger_days}: use 15 or more (SQS keeps a message up to 14 days; a file forgotten sooner could be counted twice when its notification comes again)"));
        }
        let state_dir = match &raw.state {
            Some(s) => s.dir.clone(),
            None => {
                problems.push("[state] dir is missing: set it to a writable folder, e.g. dir = \"/var/lib/kmsguard\" (systemd's StateDirectory)".into());
                PathBuf::new()
            }
        };
        if raw.sources.sqs.is_empty() {
            problems.push("no [[sources.sqs]]: add at least one queue_url of the queue that receives the trail bucket's notifications".into());
        }
        let mut sqs = Vec::new();
        for (i, q) in raw.sources.sqs.iter().enumerate() {
            if !(q.queue_url.starts_with("http://") || q.queue_url.starts_with("https://")) {
                problems.push(format!(
                    "[[sources.sqs]] #{}: queue_url = \"{}\" is not a queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME)",
                    i + 1,
                    q.queue_url
                ));
            }
            sqs.push(SqsSourceConfig {
                queue_url: q.queue_url.clone(),
                region: q
                    .region
                    .clone()
                    .or_else(|| region_of_queue_url(&q.queue_url)),
            });
        }
        let mut file_sinks = Vec::new();
        for (i, f) in raw.sinks.file.iter().enumerate() {
            let min_severity = match f.min_severity.as_deref().map(str::parse::<crate::Severity>) {
                None => crate::Severity::Info,
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    problems.push(format!("[[sinks.file]] #{}: min_severity: {e}", i + 1));
                    crate::Severity::Info
                }
            };
            file_sinks.push(FileSinkConfig {
                path: f.path.clone(),
                min_severity,
            });
        }
        let mut archive_sinks: Vec<ArchiveSinkConfig> = Vec::new();
        for (i, a) in raw.sinks.archive.iter().enumerate() {
            let c = archive_sink(i + 1, a, &mut problems);
            // Two writers of one chain would fork it.
            if let Some(j) = archive_sinks.iter().position(|o| {
                o.host == c.host && o.destinations.iter().any(|d| c.destinations.contains(d))
            }) {
                problems.push(format!(
                    "[[sinks.archive]] #{}: writes to the same destination as #{} with the same host \"{}\": one chain needs one writer; give it another host or destination",
                    i + 1,
                    j + 1,
                    c.host
                ));
            }
            archive_sinks.push(c);
        }
        let channels = crate::act::config::AlertSinks {
            email: raw.sinks.email.clone(),
            webhook: raw.sinks.webhook.clone(),
        };
        let alert_channels = match channels.validate() {
            Ok(c) => c,
            Err(e) => {
                // Each line names its key, e.g. `sinks.email[0].to: names no recipient; ...`.
                problems.extend(e.to_string().lines().map(str::to_string));
                Vec::new()
            }
        };
        if file_sinks.is_empty()
            && archive_sinks.is_empty()
            && raw.sinks.email.is_empty()
            && raw.sinks.webhook.is_empty()
        {
            problems.push("no sink: add [[sinks.file]] path = \"/var/lib/kmsguard/findings.jsonl\" (or an alert channel, docs/alerts.md) so findings go somewhere".into());
        }
        let park_after = match raw.alerts.park_after.as_deref() {
            None => std::time::Duration::from_secs(3600),
            Some(s) => match crate::act::clock::parse_duration(s) {
                Ok(d) if !d.is_zero() => d,
                Ok(_) => {
                    problems.push(
                        "[alerts] park_after = \"0s\": use a time above 0, e.g. \"1h\"".into(),
                    );
                    std::time::Duration::from_secs(3600)
                }
                Err(m) => {
                    problems.push(format!("[alerts] park_after: {m}"));
                    std::time::Duration::from_secs(3600)
                }
            },
        };
        let metrics_listen = match raw.metrics.listen.as_deref() {
            None => None,
            Some(s) => match s.parse::<SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    problems.push(format!(
                        "[metrics] listen = \"{s}\": use IP:PORT, e.g. \"127.0.0.1:9464\""
                    ));
                    None
                }
            },
        };
        let d = &raw.daemon;
        let on_permanent_error = match d.on_permanent_error.as_deref() {
            None | Some("dead-letter") => OnPermanent::DeadLetter,
            Some("delete") => OnPermanent::Delete,
            Some(o) => {
                problems.push(format!(
                    "[daemon] on_permanent_error = \"{o}\": use \"dead-letter\" or \"delete\""
                ));
                OnPermanent::DeadLetter
            }
        };
        let visibility = d.visibility_timeout_secs.unwrap_or(120);
        if !(10..=43_200).contains(&visibility) {
            problems.push(format!(
                "[daemon] visibility_timeout_secs = {visibility}: use 10 to 43200 seconds"
            ));
        }
        let files_in_flight = d.files_in_flight.unwrap_or(4);
        if files_in_flight == 0 || files_in_flight > 256 {
            problems.push(format!(
                "[daemon] files_in_flight = {files_in_flight}: use 1 to 256"
            ));
        }
        let remediation = raw
            .remediation
            .as_ref()
            .map(|r| crate::remediate::RemediationConfig::from_raw(r, &mut problems));
        let posture = raw.posture.clone().unwrap_or_default();
        if let Err(m) = posture.validate() {
            problems.push(m);
        }
        let inventory = crate::inventory::InventoryConfig::from_raw(
            &raw.inventory.clone().unwrap_or_default(),
            &mut problems,
        );
        if !problems.is_empty() {
            return Err(ConfigError::Invalid { path: p, problems });
        }
        Ok(Config {
            path: path.to_path_buf(),
            aws: crate::aws::AwsSettings {
                region: raw.aws.region.clone(),
                s3_force_path_style: raw.aws.s3_force_path_style.unwrap_or(endpoint.is_some()),
                endpoint_url: endpoint,
            },
            state_dir,
            ledger_days,
            rules_path: raw.rules.path.clone(),
            extra_rules: raw.rules.extra.clone(),
            sqs,
            file_sinks,
            archive_sinks,
            alert_channels,
            alerts: AlertsSettings { park_after },
            metrics_listen,
            baseline: raw.baseline.clone(),
            files_in_flight,
            visibility_timeout_secs: visibility,
            shutdown_grace_secs: d.shutdown_grace_secs.unwrap_or(20),
            on_permanent_error,
            max_object_bytes: d.max_object_bytes.unwrap_or(1 << 30),
            transient_retries: d.transient_retries.unwrap_or(4),
            remediation,
            posture,
            inventory,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issue_example_is_valid() {
        let text = r#"
[aws]
region = "us-east-1"
[state]
dir = "/var/lib/kmsguard"
[rules]
path = "/etc/kmsguard/rules.toml"
[[sources.sqs]]
queue_url = "https://sqs.us-east-1.amazonaws.com/111122223333/cloudtrail-files"
[[sinks.file]]
path = "/var/lib/kmsguard/findings.jsonl"
[metrics]
listen = "127.0.0.1:9464"
"#;
        let c = Config::parse(text, Path::new("k.toml")).unwrap();
        assert_eq!(c.sqs[0].region.as_deref(), Some("us-east-1"));
        assert_eq!(c.metrics_listen.unwrap().port(), 9464);
        assert_eq!(c.on_permanent_error, OnPermanent::DeadLetter);
    }

    const BASE: &str = "[state]\ndir = \"/s\"\n[[sources.sqs]]\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/1/q\"\n";

    #[test]
    fn archive_sink_defaults_and_destinations() {
        let text = format!("{BASE}[[sinks.archive]]\nkey = \"arn:aws:kms:us-east-1:111122223333:key/mrk-0123456789abcdef0123456789abcdef\"\ndir = \"/var/lib/kmsguard/archive\"\ns3 = \"s3://audit/kmsguard\"\nhost = \"ip-10-0-0-1\"\n");
        let c = Config::parse(&text, Path::new("k.toml")).unwrap();
        let a = &c.archive_sinks[0];
        assert_eq!(a.destinations.len(), 2);
        assert_eq!(a.host, "ip-10-0-0-1");
        assert_eq!(a.max_segment_bytes, 8 << 20);
        assert_eq!(a.max_segment_findings, 10_000);
        assert_eq!(a.max_segment_age.as_secs(), 300);
        assert_eq!(a.min_severity, crate::Severity::Info);
        assert!(c.file_sinks.is_empty(), "an archive alone is a sink");
        for key in [
            "alias/kmsguard-archive",
            "1234abcd-12ab-34cd-56ef-1234567890ab",
            "arn:aws:kms:eu-west-1:111122223333:alias/a",
            "arn:aws-us-gov:kms:us-gov-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            assert!(plausible_kms_key(key), "{key}");
        }
        for key in [
            "",
            "my-key",
            "arn:aws:s3:::bucket",
            "alias/",
            "arn:aws:kms:us-east-1:1:key/x",
        ] {
            assert!(!plausible_kms_key(key), "{key}");
        }
    }

    #[test]
    fn archive_sink_problems_name_the_key_and_the_fix() {
        let text = format!("{BASE}[[sinks.archive]]\ns3 = \"audit/x\"\nhost = \"a b\"\nmax_segment_bytes = 10\nmax_segment_findings = 0\nmax_segment_age_secs = 0\nmin_severity = \"loud\"\n[[sinks.archive]]\nkey = \"my-key\"\ndir = \"relative\"\n[[sinks.archive]]\nkey = \"alias/a\"\n[[sinks.archive]]\nkey = \"alias/a\"\ndir = \"/a\"\nhost = \"h\"\n[[sinks.archive]]\nkey = \"alias/b\"\ndir = \"/a\"\nhost = \"h\"\n");
        let e = Config::parse(&text, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        for want in [
            "#1: key is missing: set the KMS key",
            "#1: s3 = \"audit/x\": write s3://BUCKET/PREFIX",
            "#1: host = \"a b\": use at most 100 letters",
            "#1: max_segment_bytes = 10: use 1024 to",
            "#1: max_segment_findings = 0: use 1 to 100000",
            "#1: max_segment_age_secs = 0: use 1 to 86400 seconds",
            "#1: min_severity: unknown severity `loud`",
            "#2: key = \"my-key\" is not a KMS key: use its ARN",
            "#2: dir = \"relative\": use an absolute path",
            "#3: no destination: set dir",
            "#5: writes to the same destination as #4 with the same host \"h\"",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let e = Config::parse(
            &format!("{BASE}[[sinks.archive]]\nkey = \"alias/a\"\ndir = \"/a\"\nbucket = \"b\"\n"),
            Path::new("k.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `bucket`"), "{e}");
    }

    #[test]
    fn every_problem_names_the_key_and_the_fix() {
        let text = "[metrics]\nlisten = \"everywhere\"\n[daemon]\non_permanent_error = \"shrug\"\n";
        let e = Config::parse(text, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[state] dir is missing"), "{e}");
        assert!(e.contains("no [[sources.sqs]]"), "{e}");
        assert!(
            e.contains("[metrics] listen = \"everywhere\": use IP:PORT"),
            "{e}"
        );
        assert!(e.contains("\"dead-letter\" or \"delete\""), "{e}");
        let e = Config::parse("[sate]\ndir = \"x\"\n", Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `sate`"), "{e}");
    }

    const ALERTS_BASE: &str = "[state]\ndir = \"/var/lib/kmsguard\"\n[[sources.sqs]]\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/111122223333/q\"\n";

    #[test]
    fn alert_channels_are_sinks_of_their_own() {
        let text = format!("{ALERTS_BASE}[alerts]\npark_after = \"30m\"\n[[sinks.email]]\nname = \"mail\"\nhost = \"127.0.0.1\"\nfrom = \"k@example.com\"\nto = [\"a@example.com\"]\n[[sinks.webhook]]\nname = \"pager\"\nformat = \"pagerduty\"\nurl = \"https://events.pagerduty.com/v2/enqueue\"\nrouting_key_env = \"PD\"\n");
        let c = Config::parse(&text, Path::new("k.toml")).unwrap();
        assert!(c.file_sinks.is_empty(), "channels alone are enough");
        let names: Vec<&str> = c.alert_channels.iter().map(|c| c.name()).collect();
        assert_eq!(names, ["mail", "pager"]);
        assert_eq!(c.alerts.park_after, std::time::Duration::from_secs(1800));
        let d = Config::parse(ALERTS_BASE, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(d.contains("no sink"), "{d}");
    }

    #[test]
    fn alert_channel_problems_name_the_key() {
        let text = format!("{ALERTS_BASE}[alerts]\npark_after = \"0s\"\n[[sinks.webhook]]\nname = \"w\"\nurl = \"https://h.example.com/x\"\nsecret = \"inline\"\n");
        let e = Config::parse(&text, Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[alerts] park_after = \"0s\""), "{e}");
        assert!(
            e.contains("sinks.webhook[0].secret: secrets are not accepted"),
            "{e}"
        );
        assert!(!e.contains("inline"), "the secret is not repeated: {e}");
        let e = Config::parse(
            &format!("{ALERTS_BASE}[alerts]\nretry = 1\n"),
            Path::new("k.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown field `retry`"), "{e}");
    }
}
