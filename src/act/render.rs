//! Turning an `Alert` into text a person reads, safely. Every value that comes from a
//! log record is attacker-controlled (a user agent can carry CR/LF, NUL, `<script>`,
//! bidi overrides), so each output has its own escaper: `header` for mail headers (no
//! control characters at all, bounded length), `visible` for text bodies (control and
//! invisible characters shown as escapes, so an analyst sees what was really sent),
//! `html` on top of `visible`, and `slack` for Slack mrkdwn. The `fields` list is the
//! one place that decides what an alert shows, so email and Slack cannot drift.

use super::{Alert, AlertKind};
use crate::analyze::finding::Severity;
use std::fmt::Write;

/// Longest value shown for one field in a body (user agents can be 50 MB).
pub const MAX_FIELD_CHARS: usize = 1000;
/// Longest list shown for one field (20 key ARNs and a count of the rest).
pub const MAX_LIST_CHARS: usize = 6000;
/// Longest mail subject, in characters.
pub const MAX_SUBJECT_CHARS: usize = 200;

/// A value safe for a mail header: every control character (CR, LF, NUL, TAB, DEL,
/// C1, U+2028/2029, bidi controls) becomes a space, runs of spaces collapse, and the
/// result is cut at `max` characters. A header built from this cannot be split.
pub fn header(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    let mut last_space = true;
    let mut n = 0;
    for c in s.chars() {
        let c = if unsafe_char(c) || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' {
            if last_space {
                continue;
            }
            last_space = true;
        } else {
            last_space = false;
        }
        if n == max {
            out.pop();
            out.push('…');
            break;
        }
        out.push(c);
        n += 1;
    }
    out.trim_end().to_string()
}

/// A value safe to show in a text body: control and invisible characters become
/// visible escapes (`\r`, `\n`, `\0`, `\u{202e}`), cut at `max` characters.
pub fn visible(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            let _ = write!(out, "… ({} more characters)", s.chars().count() - max);
            break;
        }
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            c if unsafe_char(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// `visible`, then HTML-escaped (`& < > " '`), for element content and attributes.
pub fn html(s: &str, max: usize) -> String {
    let v = visible(s, max);
    let mut out = String::with_capacity(v.len() + 16);
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `visible`, then escaped for Slack mrkdwn: `& < >` as Slack documents, and the
/// formatting characters (`* _ ~ ``) neutralised so a value cannot restyle the message
/// or break out of a code span.
pub fn slack(s: &str, max: usize) -> String {
    let v = visible(s, max);
    let mut out = String::with_capacity(v.len() + 16);
    for c in v.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '`' => out.push('\''),
            '*' => out.push('∗'),
            '_' => out.push('＿'),
            '~' => out.push('∼'),
            c => out.push(c),
        }
    }
    out
}

/// Characters that must never reach a header and are shown escaped in bodies: control
/// characters, line/paragraph separators, zero-width and bidi formatting characters.
fn unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// One labelled line of an alert body. Values are raw (escape them for the output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub label: &'static str,
    pub value: String,
    /// Longest value shown, in characters (key lists get more room than one value).
    pub max: usize,
}

/// What an alert shows, in order: the fields an on-call engineer needs to act.
pub fn fields(alert: &Alert) -> Vec<Field> {
    let f = &alert.finding;
    let g = &alert.group;
    let mut out = Vec::new();
    let mut push = |label: &'static str, value: Option<String>| {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            let max = if label == "Keys" || label == "Event ids" {
                MAX_LIST_CHARS
            } else {
                MAX_FIELD_CHARS
            };
            out.push(Field {
                label,
                value: v,
                max,
            });
        }
    };
    push("Severity", Some(f.severity.as_str().to_uppercase()));
    if alert.kind == AlertKind::Test {
        return out;
    }
    push("Rule", Some(format!("{} ({})", f.rule, f.title)));
    push("Principal", f.principal.clone());
    push("Role", f.principal_role.clone());
    push(
        "Account",
        match (&f.account, &f.region) {
            (Some(a), Some(r)) => Some(format!("{a} in {r}")),
            (Some(a), None) => Some(a.clone()),
            (None, Some(r)) => Some(r.clone()),
            (None, None) => None,
        },
    );
    let mut keys = if g.keys.is_empty() {
        f.keys.join(", ")
    } else {
        g.keys.join(", ")
    };
    if g.keys_omitted > 0 {
        let _ = write!(keys, " and {} more", g.keys_omitted);
    }
    push("Keys", Some(keys));
    push("Source IP", f.source_ip.clone());
    push("User agent", f.user_agent.clone());
    push(
        "Event",
        (!f.event_name.is_empty()).then(|| match &f.error_code {
            Some(e) => format!("{} ({}) failed with {e}", f.event_name, f.event_source),
            None => format!("{} ({})", f.event_name, f.event_source),
        }),
    );
    push(
        "Event time",
        Some(if g.count > 1 {
            format!(
                "{} events from {} to {}",
                g.count, g.first_time, g.last_time
            )
        } else {
            f.time.clone()
        }),
    );
    push("Remediation", f.remediation.clone());
    push("Next step", Some(next_step(alert)));
    push("Finding id", Some(f.id.clone()));
    push(
        "Event ids",
        (!f.event_ids.is_empty()).then(|| f.event_ids.join(", ")),
    );
    push("Log file", Some(f.file.clone()));
    out
}

/// The one-line title of an alert (used by subjects, Slack headers, PagerDuty).
pub fn title(alert: &Alert) -> String {
    let f = &alert.finding;
    match alert.kind {
        AlertKind::Test | AlertKind::Digest | AlertKind::Suppressed => f.title.clone(),
        AlertKind::Finding | AlertKind::Update => {
            let who = f.principal_role.as_deref().or(f.principal.as_deref());
            let mut t = f.title.clone();
            if let Some(who) = who {
                let _ = write!(t, " by {}", short_arn(who));
            }
            if alert.group.count > 1 {
                let _ = write!(t, " ({} events)", alert.group.count);
            }
            if alert.kind == AlertKind::Update {
                t.insert_str(0, "Update: ");
            }
            t
        }
    }
}

/// The resource part of an ARN (`role/ci-deployer`, `user/bob`, `root`), which is what
/// a person recognises in a subject line; the full ARN is in the body. Not an ARN: as is.
pub fn short_arn(arn: &str) -> &str {
    match arn.strip_prefix("arn:") {
        Some(rest) => rest
            .splitn(5, ':')
            .nth(4)
            .filter(|r| !r.is_empty())
            .unwrap_or(arn),
        None => arn,
    }
}

/// A suggested next step, from the remediation the rule names or the severity.
pub fn next_step(alert: &Alert) -> String {
    let f = &alert.finding;
    let key = f.keys.first().map(String::as_str).unwrap_or("<key>");
    let who = f
        .principal_role
        .as_deref()
        .or(f.principal.as_deref())
        .unwrap_or("the principal");
    let specific = match f.remediation.as_deref() {
        Some("cancel-key-deletion") => Some(format!(
            "If the deletion was not planned, cancel it before the waiting period ends: aws kms cancel-key-deletion --key-id {key}"
        )),
        Some("enable-key") => Some(format!(
            "If the key should be in use, re-enable it: aws kms enable-key --key-id {key}"
        )),
        Some("enable-key-rotation") => Some(format!(
            "Turn rotation back on: aws kms enable-key-rotation --key-id {key}"
        )),
        Some("restore-key-policy") => Some(format!(
            "Compare the key policy with the last approved one (aws kms get-key-policy --key-id {key} --policy-name default) and restore it"
        )),
        Some("revoke-grant") => Some(format!(
            "List the key's grants (aws kms list-grants --key-id {key}) and revoke the unexpected one"
        )),
        _ => None,
    };
    if let Some(s) = specific {
        return format!("{s}; then confirm with the owner of {who} that the change was intended.");
    }
    match (alert.kind, f.severity) {
        (AlertKind::Test, _) => "None: this is a test.".into(),
        (AlertKind::Suppressed, _) => {
            "Look at the findings output or the daemon's logs for the alerts listed here; raise the channel's rate limit if they all matter.".into()
        }
        (AlertKind::Digest, _) => "Skim the groups below; none was urgent on its own.".into(),
        (_, Severity::Critical | Severity::High) => format!(
            "Confirm with the owner of {who} now whether this was intended; if not, disable the credentials and review every KMS call they made since {}.",
            alert.group.first_time
        ),
        (_, Severity::Medium) => format!(
            "Check with the owner of {who} whether this was intended, and review the key's policy and grants."
        ),
        _ => format!("No action is needed unless this repeats; check whether {who} is expected to use these keys."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVIL: &str = "evil\r\nBcc: attacker@example.com\r\n<script>alert(1)</script>\u{0}";

    #[test]
    fn header_values_cannot_split_a_header() {
        let h = header(EVIL, 200);
        assert!(!h.contains(['\r', '\n', '\0']));
        assert_eq!(
            h,
            "evil Bcc: attacker@example.com <script>alert(1)</script>"
        );
        assert!(
            !header("a\u{2028}b\u{85}c\u{202e}d", 200).contains(['\u{2028}', '\u{85}', '\u{202e}'])
        );
        assert_eq!(header("  a \t\t b  ", 200), "a b");
        let long = header(&"x".repeat(500), 10);
        assert_eq!(long.chars().count(), 10);
        assert!(long.ends_with('…'));
    }

    #[test]
    fn html_is_escaped_and_controls_are_visible() {
        let h = html(EVIL, 1000);
        assert_eq!(
            h,
            "evil\\r\\nBcc: attacker@example.com\\r\\n&lt;script&gt;alert(1)&lt;/script&gt;\\0"
        );
        assert_eq!(html("\"'&", 10), "&quot;&#39;&amp;");
        assert_eq!(visible("a\u{202e}b", 10), "a\\u{202e}b");
        assert!(visible(&"y".repeat(2000), 1000).ends_with("(1000 more characters)"));
    }

    #[test]
    fn short_arns_keep_the_resource() {
        assert_eq!(short_arn("arn:aws:iam::111122223333:role/ci"), "role/ci");
        assert_eq!(short_arn("arn:aws:iam::111122223333:root"), "root");
        assert_eq!(
            short_arn("arn:aws:sts::1:assumed-role/app/i-1:x"),
            "assumed-role/app/i-1:x"
        );
        assert_eq!(short_arn("kms.amazonaws.com"), "kms.amazonaws.com");
        assert_eq!(short_arn("arn:aws:iam::1:"), "arn:aws:iam::1:");
    }

    #[test]
    fn slack_markup_is_neutralised() {
        let s = slack("<!channel> *bold* `code` _i_ ~s~ &", 100);
        assert_eq!(s, "&lt;!channel&gt; ∗bold∗ 'code' ＿i＿ ∼s∼ &amp;");
    }
}
