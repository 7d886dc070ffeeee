//! Configuration of alert channels: `[[sinks.email]]` and `[[sinks.webhook]]` tables
//! (serde, `deny_unknown_fields`), validated into `ChannelConfig`s with errors that
//! name the key and the fix. Secrets (SMTP password, webhook URL with its token, HMAC
//! key, PagerDuty routing key) come only from environment variables or files (systemd
//! `LoadCredential=`), never inline; they are held in `Secret`, whose `Debug` is
//! redacted, and loaded only when a channel is built (see `secret`).
//!
//! The daemon's config embeds `EmailSink` and `WebhookSink` lists in its own `[sinks]`
//! table; `AlertsFile` is the stand-alone form read by `kmsguard alerts`.

use super::clock::parse_duration;
use super::route::{GroupField, RateLimit, RouteConfig};
use super::secret::{reject_inline, secret_ref, Redacted, Secret, SecretRef};
use crate::analyze::finding::Severity;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default subject template of email channels.
pub const DEFAULT_SUBJECT: &str = "[kmsguard {SEVERITY}] {title}";
/// Placeholders a subject template may use.
pub const SUBJECT_PLACEHOLDERS: &[&str] = &[
    "severity",
    "SEVERITY",
    "title",
    "rule",
    "principal",
    "account",
    "region",
    "key",
    "count",
    "channel",
    "kind",
];

/// A config problem: the key it is about and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// The file read by `kmsguard alerts ... --config FILE`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsFile {
    #[serde(default)]
    pub sinks: AlertSinks,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertSinks {
    #[serde(default)]
    pub email: Vec<EmailSink>,
    #[serde(default)]
    pub webhook: Vec<WebhookSink>,
}

/// How an SMTP connection is secured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS, which is required (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No encryption: only for a relay on this host or a trusted network (port 25).
    None,
}

/// `rate_limit = { max = 20, per = "1h" }`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub max: u32,
    pub per: String,
}

/// One `[[sinks.email]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailSink {
    pub name: String,
    pub host: String,
    pub port: Option<u16>,
    #[serde(default)]
    pub tls: SmtpTls,
    /// Extra CA certificate (PEM) to trust, e.g. a private relay's.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Present only to reject it with a helpful message.
    #[serde(default)]
    password: Option<Redacted<toml::Value>>,
    pub from: String,
    #[serde(default)]
    pub to: Vec<String>,
    pub subject: Option<String>,
    pub timeout: Option<String>,
    // Routing (same keys as webhooks).
    pub min_severity: Option<Severity>,
    #[serde(default)]
    pub include_rules: Vec<String>,
    #[serde(default)]
    pub exclude_rules: Vec<String>,
    #[serde(default)]
    pub accounts: Vec<String>,
    #[serde(default)]
    pub exclude_accounts: Vec<String>,
    pub group_by: Option<Vec<GroupField>>,
    pub group_window: Option<String>,
    pub group_wait: Option<String>,
    pub digest_below: Option<Severity>,
    pub digest_interval: Option<String>,
    pub rate_limit: Option<RawRateLimit>,
}

/// What a webhook sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// The alert as JSON, signed with HMAC-SHA256 (docs/alerts.md).
    #[default]
    Generic,
    /// Slack incoming-webhook blocks.
    Slack,
    /// PagerDuty Events API v2 trigger.
    Pagerduty,
}

/// One `[[sinks.webhook]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSink {
    pub name: String,
    #[serde(default)]
    pub format: WebhookFormat,
    /// Only for URLs without a token (no query, no user info) and not for Slack.
    pub url: Option<Redacted<String>>,
    pub url_env: Option<String>,
    pub url_file: Option<PathBuf>,
    pub secret_env: Option<String>,
    pub secret_file: Option<PathBuf>,
    #[serde(default)]
    secret: Option<Redacted<toml::Value>>,
    pub routing_key_env: Option<String>,
    pub routing_key_file: Option<PathBuf>,
    #[serde(default)]
    routing_key: Option<Redacted<toml::Value>>,
    pub timeout: Option<String>,
    // Routing (same keys as email).
    pub min_severity: Option<Severity>,
    #[serde(default)]
    pub include_rules: Vec<String>,
    #[serde(default)]
    pub exclude_rules: Vec<String>,
    #[serde(default)]
    pub accounts: Vec<String>,
    #[serde(default)]
    pub exclude_accounts: Vec<String>,
    pub group_by: Option<Vec<GroupField>>,
    pub group_window: Option<String>,
    pub group_wait: Option<String>,
    pub digest_below: Option<Severity>,
    pub digest_interval: Option<String>,
    pub rate_limit: Option<RawRateLimit>,
}

/// A validated email channel (secrets not loaded yet).
#[derive(Debug, Clone)]
pub struct EmailConfig {
    pub name: String,
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<SecretRef>,
    pub from: String,
    pub to: Vec<String>,
    pub subject: String,
    pub timeout: Duration,
    pub route: RouteConfig,
}

/// Where a webhook's URL comes from.
#[derive(Debug, Clone)]
pub enum UrlSource {
    Inline(Secret),
    Secret(SecretRef),
}

/// A validated webhook channel (secrets not loaded yet).
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub name: String,
    pub format: WebhookFormat,
    pub url: UrlSource,
    pub secret: Option<SecretRef>,
    pub routing_key: Option<SecretRef>,
    pub timeout: Duration,
    pub route: RouteConfig,
}

/// One validated channel.
#[derive(Debug, Clone)]
pub enum ChannelConfig {
    Email(EmailConfig),
    Webhook(WebhookConfig),
}

impl ChannelConfig {
    pub fn name(&self) -> &str {
        match self {
            ChannelConfig::Email(c) => &c.name,
            ChannelConfig::Webhook(c) => &c.name,
        }
    }
    pub fn route(&self) -> &RouteConfig {
        match self {
            ChannelConfig::Email(c) => &c.route,
            ChannelConfig::Webhook(c) => &c.route,
        }
    }
}

impl AlertsFile {
    /// Reads and validates `path`; every problem is reported, not just the first.
    pub fn load(path: &Path) -> Result<Vec<ChannelConfig>, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file: AlertsFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        file.sinks.validate()
    }
}

impl AlertSinks {
    /// Validates every channel; names must be unique across email and webhooks.
    pub fn validate(&self) -> Result<Vec<ChannelConfig>, ConfigError> {
        let mut errors = Vec::new();
        let mut out = Vec::new();
        let mut names = HashSet::new();
        let mut check_name = |key: String, name: &str, errors: &mut Vec<ConfigError>| {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                errors.push(invalid(
                    format!("{key}.name"),
                    format!("`{name}` is not a channel name: use letters, digits, - and _, e.g. name = \"oncall-mail\""),
                ));
            } else if !names.insert(name.to_string()) {
                errors.push(invalid(
                    format!("{key}.name"),
                    format!(
                        "`{name}` is already the name of another channel; names must be unique"
                    ),
                ));
            }
        };
        for (i, e) in self.email.iter().enumerate() {
            let key = format!("sinks.email[{i}]");
            check_name(key.clone(), &e.name, &mut errors);
            match e.validate(&key) {
                Ok(c) => out.push(ChannelConfig::Email(c)),
                Err(err) => errors.push(err),
            }
        }
        for (i, w) in self.webhook.iter().enumerate() {
            let key = format!("sinks.webhook[{i}]");
            check_name(key.clone(), &w.name, &mut errors);
            match w.validate(&key) {
                Ok(c) => out.push(ChannelConfig::Webhook(c)),
                Err(err) => errors.push(err),
            }
        }
        match errors.len() {
            0 => Ok(out),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }
}

/// The routing keys shared by both sink kinds.
struct RawRoute<'a> {
    min_severity: Option<Severity>,
    include_rules: &'a [String],
    exclude_rules: &'a [String],
    accounts: &'a [String],
    exclude_accounts: &'a [String],
    group_by: &'a Option<Vec<GroupField>>,
    group_window: &'a Option<String>,
    group_wait: &'a Option<String>,
    digest_below: Option<Severity>,
    digest_interval: &'a Option<String>,
    rate_limit: &'a Option<RawRateLimit>,
}

fn duration(
    key: String,
    value: &Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => parse_duration(v).map_err(|m| invalid(key, m)),
    }
}

impl RawRoute<'_> {
    fn build(&self, key: &str) -> Result<RouteConfig, ConfigError> {
        let d = RouteConfig::default();
        let group_window = duration(
            format!("{key}.group_window"),
            self.group_window,
            d.group_window,
        )?;
        let group_wait = duration(format!("{key}.group_wait"), self.group_wait, d.group_wait)?;
        if group_window.is_zero() {
            return Err(invalid(
                format!("{key}.group_window"),
                "must be longer than 0; to alert on every finding, group_by = [\"rule\", \"principal\", \"key\"] with a short window such as \"1m\"",
            ));
        }
        if group_wait > group_window {
            return Err(invalid(
                format!("{key}.group_wait"),
                "is longer than group_window; make it shorter (e.g. group_wait = \"30s\", group_window = \"10m\")",
            ));
        }
        let digest_interval = duration(
            format!("{key}.digest_interval"),
            self.digest_interval,
            d.digest_interval,
        )?;
        if digest_interval < Duration::from_secs(1) {
            return Err(invalid(
                format!("{key}.digest_interval"),
                "must be at least 1s, e.g. \"1h\"",
            ));
        }
        let rate_limit = match self.rate_limit {
            None => None,
            Some(rl) => {
                let per = parse_duration(&rl.per)
                    .map_err(|m| invalid(format!("{key}.rate_limit.per"), m))?;
                if rl.max == 0 || per.is_zero() {
                    return Err(invalid(
                        format!("{key}.rate_limit"),
                        "max and per must be above 0, e.g. rate_limit = { max = 20, per = \"1h\" }; remove rate_limit for no limit",
                    ));
                }
                Some(RateLimit { max: rl.max, per })
            }
        };
        let group_by = match self.group_by {
            Some(g) if g.is_empty() || !g.contains(&GroupField::Rule) => {
                return Err(invalid(
                    format!("{key}.group_by"),
                    "must include \"rule\", e.g. group_by = [\"rule\", \"principal\", \"key\"]",
                ))
            }
            Some(g) => g.clone(),
            None => d.group_by,
        };
        for (what, list) in [
            ("include_rules", self.include_rules),
            ("exclude_rules", self.exclude_rules),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|r| r.is_empty() || r.strip_suffix('*').unwrap_or(r).contains('*'))
            {
                return Err(invalid(
                    format!("{key}.{what}"),
                    format!("`{bad}` is not a rule id or prefix: write an id from `kmsguard rules list`, or a prefix ending in *, e.g. \"cloudtrail-*\""),
                ));
            }
        }
        for (what, list) in [
            ("accounts", self.accounts),
            ("exclude_accounts", self.exclude_accounts),
        ] {
            if let Some(bad) = list
                .iter()
                .find(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
            {
                return Err(invalid(
                    format!("{key}.{what}"),
                    format!(
                        "`{bad}` is not an AWS account id: write 12 digits, e.g. \"111122223333\""
                    ),
                ));
            }
        }
        Ok(RouteConfig {
            min_severity: self.min_severity.unwrap_or(d.min_severity),
            include_rules: self.include_rules.to_vec(),
            exclude_rules: self.exclude_rules.to_vec(),
            accounts: self.accounts.to_vec(),
            exclude_accounts: self.exclude_accounts.to_vec(),
            group_by,
            group_window,
            group_wait,
            digest_below: self.digest_below,
            digest_interval,
            rate_limit,
        })
    }
}

fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    h.eq_ignore_ascii_case("localhost")
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl EmailSink {
    fn validate(&self, key: &str) -> Result<EmailConfig, ConfigError> {
        reject_inline(&format!("{key}.password"), &self.password)?;
        let route = RawRoute {
            min_severity: self.min_severity,
            include_rules: &self.include_rules,
            exclude_rules: &self.exclude_rules,
            accounts: &self.accounts,
            exclude_accounts: &self.exclude_accounts,
            group_by: &self.group_by,
            group_window: &self.group_window,
            group_wait: &self.group_wait,
            digest_below: self.digest_below,
            digest_interval: &self.digest_interval,
            rate_limit: &self.rate_limit,
        }
        .build(key)?;
        if self.host.trim().is_empty() {
            return Err(invalid(
                format!("{key}.host"),
                "is empty; name the SMTP relay, e.g. host = \"smtp.example.com\"",
            ));
        }
        if self.to.is_empty() {
            return Err(invalid(
                format!("{key}.to"),
                "names no recipient; add to = [\"oncall@example.com\"]",
            ));
        }
        for (i, addr) in self.to.iter().enumerate() {
            if addr.parse::<lettre::message::Mailbox>().is_err() {
                return Err(invalid(
                    format!("{key}.to[{i}]"),
                    format!("`{addr}` is not an email address; write e.g. \"oncall@example.com\" or \"On-call <oncall@example.com>\""),
                ));
            }
        }
        if self.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(invalid(
                format!("{key}.from"),
                format!(
                    "`{}` is not an email address; write e.g. \"kmsguard <kmsguard@example.com>\"",
                    self.from
                ),
            ));
        }
        let password = secret_ref(
            &format!("{key}.password"),
            &self.password_env,
            &self.password_file,
        )?;
        match (&self.username, &password) {
            (Some(_), None) => {
                return Err(invalid(
                    format!("{key}.username"),
                    "is set without a password; add password_env = \"VARIABLE\" or password_file = \"/run/credentials/kmsguard/smtp\"",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(format!("{key}.username"), "is missing: a password needs a username"))
            }
            _ => {}
        }
        if self.tls == SmtpTls::None && password.is_some() && !is_loopback_host(&self.host) {
            return Err(invalid(
                format!("{key}.tls"),
                "is \"none\" with a password to a host that is not this machine: the password would cross the network in clear; use tls = \"starttls\" or \"tls\"",
            ));
        }
        let subject = self
            .subject
            .clone()
            .unwrap_or_else(|| DEFAULT_SUBJECT.to_string());
        check_template(&format!("{key}.subject"), &subject)?;
        let timeout = duration(
            format!("{key}.timeout"),
            &self.timeout,
            Duration::from_secs(10),
        )?;
        let port = self.port.unwrap_or(match self.tls {
            SmtpTls::Starttls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        });
        Ok(EmailConfig {
            name: self.name.clone(),
            host: self.host.trim().to_string(),
            port,
            tls: self.tls,
            ca_file: self.ca_file.clone(),
            username: self.username.clone(),
            password,
            from: self.from.clone(),
            to: self.to.clone(),
            subject,
            timeout,
            route,
        })
    }
}

/// Checks that `{...}` placeholders in a subject template are known.
fn check_template(key: &str, template: &str) -> Result<(), ConfigError> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(invalid(key, "has a `{` without `}`"));
        };
        let name = &after[..close];
        if !SUBJECT_PLACEHOLDERS.contains(&name) {
            return Err(invalid(
                key,
                format!(
                    "unknown placeholder {{{name}}}; use one of {}",
                    SUBJECT_PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Checks a webhook URL: https, or http to this machine only; `inline` URLs must not
/// look like they carry a token. Errors never repeat the URL (it may be secret).
pub fn check_url(key: &str, url: &str, inline: bool) -> Result<(), ConfigError> {
    let parsed = reqwest::Url::parse(url.trim()).map_err(|e| {
        invalid(
            key,
            format!("is not a URL ({e}); write e.g. https://hooks.example.com/kmsguard"),
        )
    })?;
    let host = parsed.host_str().unwrap_or("");
    match parsed.scheme() {
        "https" => {}
        "http" if is_loopback_host(host) => {}
        _ => {
            return Err(invalid(
                key,
                "must be an https:// URL (http:// only to 127.0.0.1, ::1 or localhost)",
            ))
        }
    }
    if inline
        && (parsed.query().is_some()
            || !parsed.username().is_empty()
            || parsed.password().is_some())
    {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        return Err(invalid(
            key,
            format!("looks like it carries a token (a query or user info): move it out of the config file with {leaf}_env = \"VARIABLE\" or {leaf}_file = \"/run/credentials/kmsguard/{leaf}\""),
        ));
    }
    Ok(())
}

impl WebhookSink {
    fn validate(&self, key: &str) -> Result<WebhookConfig, ConfigError> {
        reject_inline(&format!("{key}.secret"), &self.secret)?;
        reject_inline(&format!("{key}.routing_key"), &self.routing_key)?;
        let route = RawRoute {
            min_severity: self.min_severity,
            include_rules: &self.include_rules,
            exclude_rules: &self.exclude_rules,
            accounts: &self.accounts,
            exclude_accounts: &self.exclude_accounts,
            group_by: &self.group_by,
            group_window: &self.group_window,
            group_wait: &self.group_wait,
            digest_below: self.digest_below,
            digest_interval: &self.digest_interval,
            rate_limit: &self.rate_limit,
        }
        .build(key)?;
        let url_ref = secret_ref(&format!("{key}.url"), &self.url_env, &self.url_file)?;
        let url = match (&self.url, url_ref) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!("{key}.url"), "is set together with url_env or url_file; keep one"))
            }
            (None, None) => {
                return Err(invalid(
                    format!("{key}.url"),
                    "is missing; add url_env = \"VARIABLE\" or url_file = \"/run/credentials/kmsguard/webhook-url\" (or url = \"https://...\" when it holds no token)",
                ))
            }
            (Some(u), None) => {
                if self.format == WebhookFormat::Slack {
                    return Err(invalid(
                        format!("{key}.url"),
                        "a Slack webhook URL is a secret: use url_env = \"VARIABLE\" or url_file = \"/run/credentials/kmsguard/slack-url\"",
                    ));
                }
                check_url(&format!("{key}.url"), &u.0, true)?;
                UrlSource::Inline(Secret::new(u.0.trim().to_string()))
            }
            (None, Some(r)) => UrlSource::Secret(r),
        };
        let secret = secret_ref(
            &format!("{key}.secret"),
            &self.secret_env,
            &self.secret_file,
        )?;
        let routing_key = secret_ref(
            &format!("{key}.routing_key"),
            &self.routing_key_env,
            &self.routing_key_file,
        )?;
        match self.format {
            WebhookFormat::Generic if secret.is_none() => {
                return Err(invalid(
                    format!("{key}.secret"),
                    "is missing: generic webhooks are signed; add secret_env = \"VARIABLE\" or secret_file = \"/run/credentials/kmsguard/webhook-secret\" (see docs/alerts.md)",
                ))
            }
            WebhookFormat::Pagerduty if routing_key.is_none() => {
                return Err(invalid(
                    format!("{key}.routing_key"),
                    "is missing: PagerDuty needs the integration's routing key; add routing_key_env = \"VARIABLE\" or routing_key_file = \"...\"",
                ))
            }
            WebhookFormat::Slack | WebhookFormat::Pagerduty if secret.is_some() => {
                return Err(invalid(format!("{key}.secret"), "is only used by format = \"generic\"; remove it"))
            }
            WebhookFormat::Generic | WebhookFormat::Slack if routing_key.is_some() => {
                return Err(invalid(format!("{key}.routing_key"), "is only used by format = \"pagerduty\"; remove it"))
            }
            _ => {}
        }
        let timeout = duration(
            format!("{key}.timeout"),
            &self.timeout,
            Duration::from_secs(10),
        )?;
        Ok(WebhookConfig {
            name: self.name.clone(),
            format: self.format,
            url,
            secret,
            routing_key,
            timeout,
            route,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ChannelConfig>, String> {
        let f: AlertsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        f.sinks.validate().map_err(|e| e.to_string())
    }

    const MAIL: &str = "[[sinks.email]]\nname = \"m\"\nhost = \"127.0.0.1\"\nfrom = \"k@example.com\"\nto = [\"a@example.com\"]\n";

    #[test]
    fn a_minimal_email_channel_gets_defaults() {
        let c = parse(MAIL).unwrap();
        let ChannelConfig::Email(e) = &c[0] else {
            panic!("email")
        };
        assert_eq!(e.port, 587);
        assert_eq!(e.tls, SmtpTls::Starttls);
        assert_eq!(e.subject, DEFAULT_SUBJECT);
        assert_eq!(e.route, RouteConfig::default());
    }

    #[test]
    fn errors_name_the_key_and_the_fix() {
        let cases = [
            (
                format!("{MAIL}password = \"hunter2\"\n"),
                "sinks.email[0].password: secrets are not accepted",
                "password_env",
            ),
            (
                format!("{MAIL}bogus = 1\n"),
                "unknown field `bogus`",
                "name",
            ),
            (
                MAIL.replace("[\"a@example.com\"]", "[]"),
                "sinks.email[0].to: names no recipient",
                "to = [",
            ),
            (
                MAIL.replace("a@example.com", "not an address"),
                "sinks.email[0].to[0]",
                "e.g.",
            ),
            (
                format!("{MAIL}username = \"u\"\n"),
                "sinks.email[0].username",
                "password_env",
            ),
            (
                format!("{MAIL}subject = \"{{oops}}\"\n"),
                "sinks.email[0].subject: unknown placeholder {oops}",
                "{title}",
            ),
            (
                format!("{MAIL}group_wait = \"20m\"\n"),
                "sinks.email[0].group_wait",
                "shorter",
            ),
            (
                format!("{MAIL}group_window = \"soon\"\n"),
                "sinks.email[0].group_window",
                "e.g.",
            ),
            (
                format!("{MAIL}rate_limit = {{ max = 0, per = \"1h\" }}\n"),
                "sinks.email[0].rate_limit",
                "remove",
            ),
            (
                format!("{MAIL}accounts = [\"prod\"]\n"),
                "sinks.email[0].accounts",
                "12 digits",
            ),
            (
                format!("{MAIL}group_by = [\"principal\"]\n"),
                "sinks.email[0].group_by",
                "\"rule\"",
            ),
            (
                format!("{MAIL}min_severity = \"urgent\"\n"),
                "unknown variant `urgent`",
                "critical",
            ),
            (
                MAIL.replace("127.0.0.1", "smtp.example.com")
                    + "tls = \"none\"\nusername = \"u\"\npassword_env = \"P\"\n",
                "sinks.email[0].tls",
                "starttls",
            ),
            (
                format!("{MAIL}{}", MAIL),
                "sinks.email[1].name: `m` is already",
                "unique",
            ),
        ];
        for (text, want, fix) in cases {
            let err = parse(&text).unwrap_err();
            assert!(err.contains(want), "{want:?} not in {err}");
            assert!(err.contains(fix), "{fix:?} not in {err}");
        }
    }

    #[test]
    fn webhook_urls_and_secrets() {
        let hook = |extra: &str| parse(&format!("[[sinks.webhook]]\nname = \"w\"\n{extra}"));
        let err = |extra: &str| hook(extra).unwrap_err();
        assert!(err("url = \"https://h.example.com/x\"\n").contains("generic webhooks are signed"));
        assert!(err("url = \"https://h.example.com/x\"\nsecret = \"k\"\n").contains("secret_env"));
        assert!(err("url = \"http://h.example.com/x\"\nsecret_env = \"S\"\n").contains("https://"));
        let tok = err("url = \"https://h.example.com/x?token=abc\"\nsecret_env = \"S\"\n");
        assert!(tok.contains("url_env") && !tok.contains("abc"), "{tok}");
        assert!(
            err("format = \"slack\"\nurl = \"https://hooks.slack.com/services/T/B/X\"\n")
                .contains("url_env")
        );
        assert!(
            err("format = \"pagerduty\"\nurl = \"https://events.pagerduty.com/v2/enqueue\"\n")
                .contains("routing_key")
        );
        assert!(err("secret_env = \"S\"\n").contains("url_env"));
        assert!(hook("url = \"http://127.0.0.1:9/x\"\nsecret_env = \"S\"\n").is_ok());
        assert!(hook("format = \"slack\"\nurl_env = \"U\"\n").is_ok());
        assert!(hook("format = \"pagerduty\"\nurl = \"https://events.pagerduty.com/v2/enqueue\"\nrouting_key_file = \"/k\"\n").is_ok());
    }

    #[test]
    fn printing_a_parsed_config_shows_no_secret() {
        let text = format!("{MAIL}password = \"hunter2\"\n[[sinks.webhook]]\nname = \"w\"\nurl = \"https://h.example.com/services/T0/B0/tok3n\"\n");
        let f: AlertsFile = toml::from_str(&text).unwrap();
        let shown = format!("{f:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok3n"),
            "{shown}"
        );
    }
}
