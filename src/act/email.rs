//! The email channel: lettre over SMTP (STARTTLS, implicit TLS, or plain for a local
//! relay; optional AUTH), one multipart text + HTML message per alert to every
//! recipient. The subject comes from the channel's template with each value passed
//! through `render::header`, so no CR, LF or NUL from a log record can reach a header;
//! bodies show values through `render::visible`/`render::html`.
//!
//! Updates of a group thread under the group's first message (`In-Reply-To` and
//! `References` to `<group-id@kmsguard>`). A new SMTP connection is made per alert, so
//! a relay that was down is simply tried again on the next attempt.

use super::config::{ConfigError, EmailConfig, SmtpTls};
use super::render::{self, MAX_FIELD_CHARS, MAX_SUBJECT_CHARS};
use super::{Alert, AlertKind, Delivered, DeliveryError};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{header::Header, Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::fmt::{self, Write};
use std::time::Duration;

/// An email channel ready to send.
pub struct EmailChannel {
    name: String,
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    subject: String,
    timeout: Duration,
    endpoint: String,
}

impl fmt::Debug for EmailChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The transport holds the SMTP credentials: never print it.
        f.debug_struct("EmailChannel")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint)
            .field("to", &self.to.len())
            .finish_non_exhaustive()
    }
}

impl EmailChannel {
    /// Builds the channel, loading its password and CA file.
    pub fn new(cfg: &EmailConfig) -> Result<EmailChannel, ConfigError> {
        let key = |k: &str| format!("sinks.email `{}` {k}", cfg.name);
        let bad = |k: &str, m: String| ConfigError::Invalid {
            key: key(k),
            message: m,
        };
        let tls_params = || -> Result<TlsParameters, ConfigError> {
            let mut b = TlsParameters::builder(cfg.host.clone());
            if let Some(path) = &cfg.ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| bad("ca_file", format!("cannot read {}: {e}", path.display())))?;
                let cert = Certificate::from_pem(&pem).map_err(|e| {
                    bad(
                        "ca_file",
                        format!("{} is not a PEM certificate: {e}", path.display()),
                    )
                })?;
                b = b.add_root_certificate(cert);
            }
            b.build_rustls()
                .map_err(|e| bad("tls", format!("cannot set up TLS: {e}")))
        };
        let tls = match cfg.tls {
            SmtpTls::Starttls => Tls::Required(tls_params()?),
            SmtpTls::Tls => Tls::Wrapper(tls_params()?),
            SmtpTls::None => Tls::None,
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(cfg.host.clone())
            .port(cfg.port)
            .tls(tls)
            .timeout(Some(cfg.timeout));
        if let (Some(user), Some(pw)) = (&cfg.username, &cfg.password) {
            let pw = pw.load(&key("password"))?;
            builder = builder.credentials(Credentials::new(user.clone(), pw.expose().to_string()));
        }
        let parse = |k: &str, a: &str| {
            a.parse::<Mailbox>()
                .map_err(|e| bad(k, format!("`{a}` is not an email address: {e}")))
        };
        Ok(EmailChannel {
            name: cfg.name.clone(),
            transport: builder.build(),
            from: parse("from", &cfg.from)?,
            to: cfg
                .to
                .iter()
                .map(|a| parse("to", a))
                .collect::<Result<_, _>>()?,
            subject: cfg.subject.clone(),
            timeout: cfg.timeout,
            endpoint: format!(
                "{}:{} ({})",
                cfg.host,
                cfg.port,
                match cfg.tls {
                    SmtpTls::Starttls => "starttls",
                    SmtpTls::Tls => "tls",
                    SmtpTls::None => "plain",
                }
            ),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// One attempt: SMTP 250 is success; 4xx and network trouble are transient, 5xx
    /// permanent.
    pub async fn deliver(&self, alert: &Alert) -> Result<Delivered, DeliveryError> {
        let message = self.message(alert)?;
        // lettre's timeout is per read/write; bound the whole exchange too.
        let sent = tokio::time::timeout(self.timeout * 3, self.transport.send(message)).await;
        match sent {
            Err(_) => Err(DeliveryError::Transient(format!(
                "SMTP {} did not finish within {:?}",
                self.endpoint,
                self.timeout * 3
            ))),
            Ok(Ok(resp)) => Ok(Delivered {
                response: format!(
                    "SMTP {} {}",
                    resp.code(),
                    resp.first_line().unwrap_or("").trim()
                ),
            }),
            Ok(Err(e)) => {
                let what = format!("SMTP {}: {}", self.endpoint, chain(&e));
                if e.is_permanent() || e.is_client() {
                    Err(DeliveryError::Permanent(what))
                } else {
                    Err(DeliveryError::Transient(what))
                }
            }
        }
    }

    /// The message for `alert` (public for tests and for previews).
    pub fn message(&self, alert: &Alert) -> Result<Message, DeliveryError> {
        let subject = subject(&self.subject, alert);
        let mut b = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .header(AlertHeader::of(alert));
        for to in &self.to {
            b = b.to(to.clone());
        }
        let group_msg = format!("<{}@kmsguard>", alert.group.id);
        b = match alert.kind {
            AlertKind::Finding => b.message_id(Some(group_msg)),
            AlertKind::Update => b
                .message_id(Some(format!("<{}@kmsguard>", alert.id)))
                .in_reply_to(group_msg.clone())
                .references(group_msg),
            _ => b.message_id(Some(format!("<{}@kmsguard>", alert.id))),
        };
        b.multipart(MultiPart::alternative_plain_html(
            text_body(alert),
            html_body(alert),
        ))
        .map_err(|e| DeliveryError::Permanent(format!("cannot build the message: {e}")))
    }
}

/// The subject: the channel's template with header-safe values, `[TEST]` first for
/// test alerts.
pub fn subject(template: &str, alert: &Alert) -> String {
    let f = &alert.finding;
    let value = |name: &str| -> String {
        match name {
            "severity" => f.severity.as_str().to_string(),
            "SEVERITY" => f.severity.as_str().to_uppercase(),
            "title" => render::title(alert),
            "rule" => f.rule.clone(),
            "principal" => f
                .principal_role
                .clone()
                .or_else(|| f.principal.clone())
                .unwrap_or_default(),
            "account" => f.account.clone().unwrap_or_default(),
            "region" => f.region.clone().unwrap_or_default(),
            "key" => f.keys.first().cloned().unwrap_or_default(),
            "count" => alert.group.count.to_string(),
            "channel" => alert.channel.clone(),
            "kind" => alert.kind.as_str().to_string(),
            _ => String::new(),
        }
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) => {
                out.push_str(&render::header(&value(&after[..close]), MAX_SUBJECT_CHARS));
                rest = &after[close + 1..];
            }
            None => {
                out.push_str(&rest[open..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    if alert.is_test() {
        out.insert_str(0, "[TEST] ");
    }
    render::header(&out, MAX_SUBJECT_CHARS)
}

fn severity_color(alert: &Alert) -> &'static str {
    use crate::analyze::finding::Severity::*;
    match alert.severity() {
        Critical => "#b00020",
        High => "#d9480f",
        Medium => "#b08800",
        Low => "#1c7ed6",
        Info => "#495057",
    }
}

const TEST_BANNER: &str = "THIS IS A TEST ALERT sent by `kmsguard alerts test` to check this channel. No action is needed.";

/// The plain-text part.
pub fn text_body(alert: &Alert) -> String {
    let v = |s: &str| render::visible(s, MAX_FIELD_CHARS);
    let mut t = String::new();
    if alert.is_test() {
        let _ = writeln!(t, "{TEST_BANNER}\n");
    }
    let _ = writeln!(t, "{}\n", v(&render::title(alert)));
    let _ = writeln!(t, "{}\n", v(&alert.finding.summary));
    for field in render::fields(alert) {
        let _ = writeln!(
            t,
            "{:<12} {}",
            format!("{}:", field.label),
            render::visible(&field.value, field.max)
        );
    }
    if !alert.digest.is_empty() {
        let _ = writeln!(t);
        for e in &alert.digest {
            let _ = writeln!(
                t,
                "- {} {} x{} ({} .. {}): {}",
                e.severity.as_str().to_uppercase(),
                v(&e.rule),
                e.count,
                v(&e.first_time),
                v(&e.last_time),
                v(&e.summary)
            );
        }
    }
    if let Some(d) = &alert.description {
        let _ = writeln!(
            t,
            "\nWhy this matters:\n{}",
            v(d.trim()).replace("\\n", "\n")
        );
    }
    let _ = writeln!(
        t,
        "\n-- \nkmsguard, channel {}, alert {} ({})",
        v(&alert.channel),
        alert.id,
        alert.kind.as_str()
    );
    t
}

/// The HTML part: every value escaped.
pub fn html_body(alert: &Alert) -> String {
    let h = |s: &str| render::html(s, MAX_FIELD_CHARS);
    let mut t = String::from("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"></head><body style=\"font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;font-size:14px;color:#212529\">\n");
    if alert.is_test() {
        let _ = writeln!(
            t,
            "<p style=\"background:#fff3bf;padding:8px;font-weight:bold\">{}</p>",
            h(TEST_BANNER)
        );
    }
    let _ = writeln!(
        t,
        "<h2 style=\"margin:0 0 8px 0\"><span style=\"color:#fff;background:{};padding:2px 6px;border-radius:3px\">{}</span> {}</h2>",
        severity_color(alert),
        alert.severity().as_str().to_uppercase(),
        h(&render::title(alert))
    );
    let _ = writeln!(t, "<p>{}</p>", h(&alert.finding.summary));
    t.push_str("<table cellpadding=\"4\" style=\"border-collapse:collapse\">\n");
    for field in render::fields(alert) {
        let _ = writeln!(
            t,
            "<tr><th align=\"left\" valign=\"top\" style=\"color:#495057\">{}</th><td style=\"font-family:monospace;word-break:break-all\">{}</td></tr>",
            h(field.label),
            render::html(&field.value, field.max)
        );
    }
    t.push_str("</table>\n");
    if !alert.digest.is_empty() {
        t.push_str("<table cellpadding=\"4\" border=\"1\" style=\"border-collapse:collapse;margin-top:12px\">\n<tr><th>Severity</th><th>Rule</th><th>Count</th><th>From</th><th>To</th><th>Summary</th></tr>\n");
        for e in &alert.digest {
            let _ = writeln!(
                t,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.severity.as_str().to_uppercase(),
                h(&e.rule),
                e.count,
                h(&e.first_time),
                h(&e.last_time),
                h(&e.summary)
            );
        }
        t.push_str("</table>\n");
    }
    if let Some(d) = &alert.description {
        let _ = writeln!(
            t,
            "<h3>Why this matters</h3>\n<p>{}</p>",
            h(d.trim()).replace("\\n", "<br>")
        );
    }
    let _ = writeln!(
        t,
        "<p style=\"color:#868e96;font-size:12px\">kmsguard, channel {}, alert {} ({})</p>\n</body></html>",
        h(&alert.channel),
        alert.id,
        alert.kind.as_str()
    );
    t
}

/// `X-Kmsguard-Alert: id=<hex>; kind=<kind>; severity=<severity>[; test=yes]`, for mail
/// filters. Built only from kmsguard's own ASCII values.
#[derive(Debug, Clone)]
struct AlertHeader(String);

impl AlertHeader {
    fn of(alert: &Alert) -> AlertHeader {
        let mut v = format!(
            "id={}; kind={}; severity={}",
            alert.id,
            alert.kind.as_str(),
            alert.severity().as_str()
        );
        if alert.is_test() {
            v.push_str("; test=yes");
        }
        AlertHeader(v)
    }
}

impl Header for AlertHeader {
    fn name() -> HeaderName {
        HeaderName::new_from_ascii_str("X-Kmsguard-Alert")
    }
    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(AlertHeader(s.to_string()))
    }
    fn display(&self) -> HeaderValue {
        HeaderValue::new(Self::name(), self.0.clone())
    }
}

/// An error and its sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let m = inner.to_string();
        if !s.contains(&m) {
            let _ = write!(s, ": {m}");
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analyze::finding::{Finding, Kind, Severity};

    fn evil_alert() -> Alert {
        let f = Finding {
            id: "0123".into(),
            kind: Kind::Rule,
            rule: "any-decrypt".into(),
            severity: Severity::High,
            title: "Decrypt\r\nBcc: x@example.com".into(),
            summary: "UA <b>bold</b>".into(),
            event_ids: vec!["e1".into()],
            event_name: "Decrypt".into(),
            event_source: "kms.amazonaws.com".into(),
            time: "2026-10-01T00:00:00Z".into(),
            principal: Some("arn:aws:sts::111122223333:assumed-role/app/x\r\nX-Evil: 1".into()),
            principal_role: None,
            account: Some("111122223333".into()),
            region: Some("us-east-1".into()),
            keys: vec!["arn:aws:kms:us-east-1:111122223333:key/k".into()],
            source_ip: Some("10.0.0.1".into()),
            user_agent: Some(
                "evil\r\nBcc: attacker@example.com\r\n<script>alert(1)</script>\u{0}".into(),
            ),
            error_code: None,
            file: "f.json.gz".into(),
            remediation: None,
            key_alias: None,
            key_tags: Default::default(),
            context: Default::default(),
            action: None,
            pending: Default::default(),
            count: 1,
            first_time: String::new(),
            last_time: String::new(),
        };
        Alert::single("mail", f)
    }

    #[test]
    fn subject_has_no_line_breaks_whatever_the_fields() {
        let a = evil_alert();
        let s = subject("[kmsguard {SEVERITY}] {title} {principal} {key}", &a);
        assert!(!s.contains(['\r', '\n', '\0']), "{s:?}");
        assert!(
            s.starts_with(
                "[kmsguard HIGH] Decrypt Bcc: x@example.com by assumed-role/app/x X-Evil: 1 arn:"
            ),
            "{s}"
        );
        assert!(s.chars().count() <= MAX_SUBJECT_CHARS);
        let t = subject(
            "{title}",
            &Alert::test("mail", std::time::SystemTime::UNIX_EPOCH),
        );
        assert!(t.starts_with("[TEST] TEST alert"), "{t}");
    }

    #[test]
    fn bodies_escape_markup_and_show_controls() {
        let a = evil_alert();
        let html = html_body(&a);
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;\\0"));
        assert!(html.contains("UA &lt;b&gt;bold&lt;/b&gt;"));
        let text = text_body(&a);
        assert!(
            text.contains("evil\\r\\nBcc: attacker@example.com\\r\\n<script>"),
            "{text}"
        );
        assert!(!text.contains('\0') && !text.contains("\r\nBcc"));
        assert!(text.contains("Next step:"));
    }

    fn channel() -> EmailChannel {
        let text = "[[sinks.email]]\nname = \"m\"\nhost = \"127.0.0.1\"\ntls = \"none\"\nfrom = \"k@example.com\"\nto = [\"a@example.com\"]\ngroup_wait = \"0s\"\ndigest_below = \"medium\"\n";
        let f: crate::act::config::AlertsFile = toml::from_str(text).unwrap();
        let cfgs = f.sinks.validate().unwrap();
        let crate::act::config::ChannelConfig::Email(c) = &cfgs[0] else {
            panic!("email")
        };
        EmailChannel::new(c).unwrap()
    }

    #[test]
    fn updates_thread_under_the_first_message_and_digests_list_groups() {
        use crate::act::route::Router;
        use std::time::{Duration, UNIX_EPOCH};
        let ch = channel();
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(1_790_000_000 + s);
        let mut r = Router::new(
            "m",
            crate::act::route::RouteConfig {
                group_wait: Duration::ZERO,
                digest_below: Some(Severity::Medium),
                ..Default::default()
            },
        );
        let mut f = evil_alert().finding;
        let first = r.offer(&f, at(0));
        f.id = "second".into();
        r.offer(&f, at(1));
        let update = r.tick(at(600));
        assert_eq!((first.len(), update.len()), (1, 1));
        let raw = String::from_utf8(ch.message(&update[0]).unwrap().formatted()).unwrap();
        let thread = format!("<{}@kmsguard>", first[0].group.id);
        assert!(raw.contains(&format!("In-Reply-To: {thread}")), "{raw}");
        assert!(raw.contains(&format!("References: {thread}")), "{raw}");
        let raw_first = String::from_utf8(ch.message(&first[0]).unwrap().formatted()).unwrap();
        assert!(
            raw_first.contains(&format!("Message-ID: {thread}")),
            "{raw_first}"
        );

        f.severity = Severity::Low;
        f.rule = "low-rule".into();
        r.offer(&f, at(700));
        let digest = r.flush(at(701));
        assert_eq!(digest.len(), 1);
        let text = text_body(&digest[0]);
        assert!(text.contains("- LOW low-rule x1"), "{text}");
        assert!(html_body(&digest[0]).contains("<td>low-rule</td>"));
    }
}
