//! The webhook channel: reqwest over rustls, one POST per alert, in one of three
//! formats: `generic` (the alert as JSON, signed with HMAC-SHA256 over
//! `timestamp + "." + body` in `X-Kmsguard-Signature: t=<unix>,v1=<hex>`; the scheme is
//! in docs/alerts.md and `verify` is its reference implementation), `slack`
//! (incoming-webhook blocks, values escaped for mrkdwn) and `pagerduty` (Events API v2
//! trigger, `dedup_key` from the grouping key, severity mapped).
//!
//! The URL may hold a token, so it never appears in errors or `Debug` output: reqwest
//! errors are stripped of it, and only the host is shown.

use super::clock::{format_rfc3339, parse_rfc3339, unix_secs};
use super::config::{check_url, ConfigError, UrlSource, WebhookConfig, WebhookFormat};
use super::render;
use super::secret::Secret;
use super::{hash_id, Alert, Delivered, DeliveryError};
use crate::analyze::finding::Severity;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::fmt;
use std::time::SystemTime;

/// The signature header of generic webhooks.
pub const SIGNATURE_HEADER: &str = "X-Kmsguard-Signature";
/// The alert id header (a receiver can drop a redelivered copy).
pub const ALERT_ID_HEADER: &str = "X-Kmsguard-Alert-Id";
/// How old a signed request may be before a receiver rejects it as a replay.
pub const REPLAY_TOLERANCE_SECS: u64 = 300;

/// A webhook channel ready to send.
pub struct WebhookChannel {
    name: String,
    format: WebhookFormat,
    client: reqwest::Client,
    url: Secret,
    host: String,
    secret: Option<Secret>,
    routing_key: Option<Secret>,
}

impl fmt::Debug for WebhookChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookChannel")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl WebhookChannel {
    /// Builds the channel, loading its URL, HMAC secret or routing key.
    pub fn new(cfg: &WebhookConfig) -> Result<WebhookChannel, ConfigError> {
        let key = |k: &str| format!("sinks.webhook `{}` {k}", cfg.name);
        let url = match &cfg.url {
            UrlSource::Inline(u) => u.clone(),
            UrlSource::Secret(r) => {
                let s = r.load(&key("url"))?;
                check_url(&key("url"), s.expose(), false)?;
                Secret::new(s.expose().trim().to_string())
            }
        };
        let host = reqwest::Url::parse(url.expose())
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .unwrap_or_default();
        let secret = cfg
            .secret
            .as_ref()
            .map(|r| r.load(&key("secret")))
            .transpose()?;
        let routing_key = cfg
            .routing_key
            .as_ref()
            .map(|r| r.load(&key("routing_key")))
            .transpose()?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .user_agent(concat!("kmsguard/", env!("CARGO_PKG_VERSION")))
            // A redirect could carry the signed body elsewhere: never follow one.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ConfigError::Invalid {
                key: key("url"),
                message: format!("cannot build the HTTP client: {}", e.without_url()),
            })?;
        Ok(WebhookChannel {
            name: cfg.name.clone(),
            format: cfg.format,
            client,
            url,
            host,
            secret,
            routing_key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One attempt: HTTP 2xx is success; 408, 429, 5xx and network trouble are
    /// transient; other statuses are permanent.
    pub async fn deliver(&self, alert: &Alert) -> Result<Delivered, DeliveryError> {
        let body = self.body(alert, SystemTime::now());
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| DeliveryError::Permanent(format!("cannot encode the alert: {e}")))?;
        let mut req = self
            .client
            .post(self.url.expose())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(ALERT_ID_HEADER, &alert.id);
        if let Some(secret) = &self.secret {
            let t = unix_secs(SystemTime::now());
            req = req.header(
                SIGNATURE_HEADER,
                sign(secret.expose().as_bytes(), t, &bytes),
            );
        }
        let resp = req.body(bytes).send().await.map_err(|e| {
            let builder = e.is_builder();
            let what = format!("POST to {}: {}", self.host, chain(&e.without_url()));
            if builder {
                DeliveryError::Permanent(what)
            } else {
                DeliveryError::Transient(what)
            }
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(Delivered {
                response: format!("HTTP {}", status.as_u16()),
            });
        }
        // Read at most 4 KiB of the error body: enough to explain, bounded if the
        // receiver answers with something huge.
        let mut resp = resp;
        let mut head = Vec::new();
        while head.len() < 4096 {
            match resp.chunk().await {
                Ok(Some(c)) => head.extend_from_slice(&c[..c.len().min(4096 - head.len())]),
                _ => break,
            }
        }
        let text = String::from_utf8_lossy(&head);
        let what = format!(
            "POST to {} answered HTTP {}: {}",
            self.host,
            status.as_u16(),
            render::header(&text, 200)
        );
        let code = status.as_u16();
        if code == 408 || code == 429 || status.is_server_error() {
            Err(DeliveryError::Transient(what))
        } else {
            Err(DeliveryError::Permanent(what))
        }
    }

    /// The JSON body for `alert` in this channel's format, as of `now`.
    pub fn body(&self, alert: &Alert, now: SystemTime) -> Value {
        match self.format {
            WebhookFormat::Generic => generic(alert, now),
            WebhookFormat::Slack => slack(alert),
            WebhookFormat::Pagerduty => pagerduty(
                alert,
                self.routing_key.as_ref().map(Secret::expose).unwrap_or(""),
                now,
            ),
        }
    }
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`.
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = mac(secret);
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={timestamp},v1={hex}")
}

fn mac(secret: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; this cannot fail.
    match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    }
}

/// Why a signature was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the signature header is malformed")]
    Malformed,
    #[error("the timestamp is more than {REPLAY_TOLERANCE_SECS} s from now (a replay?)")]
    Stale,
    #[error("no v1 signature matches")]
    Mismatch,
}

/// The receiver's check (reference implementation of docs/alerts.md): the header's
/// timestamp is within `REPLAY_TOLERANCE_SECS` of `now` and one `v1` matches, compared
/// in constant time.
pub fn verify(
    secret: &[u8],
    header: &str,
    body: &[u8],
    now: SystemTime,
) -> Result<(), VerifyError> {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<u64>().map_err(|_| VerifyError::Malformed)?),
            Some(("v1", v)) => sigs.push(v),
            _ => {}
        }
    }
    let t = t.ok_or(VerifyError::Malformed)?;
    if sigs.is_empty() {
        return Err(VerifyError::Malformed);
    }
    if unix_secs(now).abs_diff(t) > REPLAY_TOLERANCE_SECS {
        return Err(VerifyError::Stale);
    }
    for sig in sigs {
        let Some(bytes) = decode_hex(sig) else {
            continue;
        };
        let mut m = mac(secret);
        m.update(t.to_string().as_bytes());
        m.update(b".");
        m.update(body);
        if m.verify_slice(&bytes).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::Mismatch)
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The generic format: the whole alert, plus envelope fields.
pub fn generic(alert: &Alert, now: SystemTime) -> Value {
    json!({
        "type": "kmsguard.alert",
        "version": 1,
        "sent_at": format_rfc3339(now),
        "test": alert.is_test(),
        "alert": alert,
    })
}

/// Slack incoming-webhook blocks. Header text is plain; section text is mrkdwn with
/// every value escaped by `render::slack`.
pub fn slack(alert: &Alert) -> Value {
    let mut title = format!(
        "{} {}",
        alert.severity().as_str().to_uppercase(),
        render::title(alert)
    );
    if alert.is_test() {
        title.insert_str(0, "[TEST] ");
    }
    let header = render::header(&title, 150);
    let mut blocks = vec![
        json!({"type": "header", "text": {"type": "plain_text", "text": header}}),
        json!({"type": "section", "text": {"type": "mrkdwn", "text": render::slack(&alert.finding.summary, 2900)}}),
    ];
    let fields: Vec<Value> = render::fields(alert)
        .into_iter()
        .map(|f| json!({"type": "mrkdwn", "text": format!("*{}*\n{}", f.label, render::slack(&f.value, f.max.min(1900)))}))
        .collect();
    for chunk in fields.chunks(10) {
        blocks.push(json!({"type": "section", "fields": chunk}));
    }
    if !alert.digest.is_empty() {
        let lines: Vec<String> = alert
            .digest
            .iter()
            .take(20)
            .map(|e| {
                format!(
                    "• {} {} ×{}: {}",
                    e.severity.as_str().to_uppercase(),
                    render::slack(&e.rule, 100),
                    e.count,
                    render::slack(&e.summary, 100)
                )
            })
            .collect();
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": lines.join("\n").chars().take(2900).collect::<String>()}}));
    }
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn", "text": format!("kmsguard · channel {} · alert {} ({})", render::slack(&alert.channel, 100), alert.id, alert.kind.as_str())}]}));
    json!({"text": header, "blocks": blocks})
}

/// PagerDuty's severity for ours.
pub fn pagerduty_severity(s: Severity) -> &'static str {
    match s {
        Severity::Critical => "critical",
        Severity::High => "error",
        Severity::Medium => "warning",
        Severity::Low | Severity::Info => "info",
    }
}

/// A PagerDuty Events API v2 trigger. `dedup_key` is derived from the grouping key, so
/// the updates of a group, and the same group in a later window while the incident is
/// open, land on one incident instead of opening new ones.
pub fn pagerduty(alert: &Alert, routing_key: &str, now: SystemTime) -> Value {
    let f = &alert.finding;
    let mut summary = render::title(alert);
    if alert.is_test() {
        summary.insert_str(0, "[TEST] ");
    }
    let timestamp = if parse_rfc3339(&alert.group.last_time).is_some() {
        alert.group.last_time.clone()
    } else {
        format_rfc3339(now)
    };
    let mut details = serde_json::Map::new();
    for field in render::fields(alert) {
        details.insert(
            field.label.to_string(),
            Value::String(render::visible(&field.value, field.max)),
        );
    }
    details.insert("count".into(), json!(alert.group.count));
    details.insert("first_time".into(), json!(alert.group.first_time));
    details.insert("last_time".into(), json!(alert.group.last_time));
    details.insert("alert_id".into(), json!(alert.id));
    details.insert("kind".into(), json!(alert.kind.as_str()));
    json!({
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": format!("kmsguard-{}", hash_id(&[&alert.group.key])),
        "client": "kmsguard",
        "payload": {
            "summary": render::header(&summary, 1024),
            "source": render::header(f.principal_role.as_deref().or(f.principal.as_deref()).unwrap_or("kmsguard"), 255),
            "severity": pagerduty_severity(alert.severity()),
            "timestamp": timestamp,
            "component": render::header(f.keys.first().map(String::as_str).unwrap_or(""), 255),
            "group": f.account.clone().unwrap_or_default(),
            "class": f.rule,
            "custom_details": details,
        }
    })
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn signatures_verify_and_replays_are_rejected() {
        let body = br#"{"a":1}"#;
        let t = 1_790_000_000;
        let h = sign(b"k", t, body);
        assert!(h.starts_with("t=1790000000,v1="));
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(verify(b"k", &h, body, at(t + 10)), Ok(()));
        assert_eq!(verify(b"k", &h, body, at(t + 301)), Err(VerifyError::Stale));
        assert_eq!(
            verify(b"other", &h, body, at(t)),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"k", &h, b"{\"a\":2}", at(t)),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify(b"k", "v1=00", body, at(t)),
            Err(VerifyError::Malformed)
        );
        // A known vector (computed independently with Python's hmac module).
        assert_eq!(
            sign(b"secret", 1, b"x"),
            "t=1,v1=33270e99f50e3d3ec295e0d7185dc323a6231c2739f396d70e6b71ea6a435486"
        );
    }

    #[test]
    fn pagerduty_maps_severity_and_dedups_by_group() {
        let a = Alert::test("pd", UNIX_EPOCH);
        let v = pagerduty(&a, "rk", UNIX_EPOCH);
        assert_eq!(v["event_action"], "trigger");
        assert_eq!(v["payload"]["severity"], "info");
        assert!(v["payload"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("[TEST]"));
        assert_eq!(
            v["dedup_key"],
            format!("kmsguard-{}", hash_id(&[&a.group.key]))
        );
        assert_eq!(pagerduty_severity(Severity::High), "error");
    }

    #[test]
    fn slack_blocks_escape_log_values() {
        let mut a = Alert::test("chat", UNIX_EPOCH);
        a.kind = crate::act::AlertKind::Finding;
        a.finding.title = "Key\r\ndisabled".into();
        a.finding.summary = "<!channel> *now* `x`".into();
        a.finding.user_agent = Some("ua\u{0}<b>".into());
        let v = slack(&a);
        let header = v["blocks"][0]["text"]["text"].as_str().unwrap();
        assert_eq!(header, "INFO Key disabled");
        assert_eq!(v["text"], header);
        assert_eq!(v["blocks"][1]["text"]["text"], "&lt;!channel&gt; ∗now∗ 'x'");
        let fields = v["blocks"][2]["fields"].to_string();
        assert!(fields.contains("ua\\\\0&lt;b&gt;"), "{fields}");
    }
}
