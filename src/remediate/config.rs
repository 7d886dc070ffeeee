//! The `[remediation]` section of the daemon's config: `RawRemediation` as written
//! (unknown keys rejected) and `RemediationConfig`, validated with problems that name the
//! key and the fix. Modes, scope, roles per account, rate limit, breaker, retries, age,
//! and confirmation by later events (tag, principals, grace).

use crate::inventory::{self, Backoff};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// The `[remediation]` section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRemediation {
    /// `off`, `dry-run` (default) or `enforce`.
    pub mode: Option<String>,
    /// Per-rule modes: rule id -> mode (overrides `mode` for that rule).
    #[serde(default)]
    pub rules: BTreeMap<String, String>,
    /// Accounts whose keys may be remediated (required).
    #[serde(default)]
    pub accounts: Vec<String>,
    /// Only keys with this tag, `KEY=VALUE` (e.g. `kmsguard:protect=true`) ...
    pub require_tag: Option<String>,
    /// ... or listed here (full key ARNs). With neither, every key of `accounts`.
    #[serde(default)]
    pub key_arns: Vec<String>,
    /// Role to assume per account (for keys outside the daemon's own account).
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    /// Changing actions per account per rolling hour (default 10).
    pub max_actions_per_hour: Option<u32>,
    /// Consecutive failed actions that open the circuit breaker (default 3).
    pub breaker_failures: Option<u32>,
    /// How long the open breaker refuses actions, seconds (default 900).
    pub breaker_cooldown_secs: Option<u64>,
    /// Retries of a failed call (default 3), with backoff from `retry_base_ms` (200).
    pub retries: Option<u32>,
    pub retry_base_ms: Option<u64>,
    /// Events older than this are never remediated, seconds (default 86400).
    pub max_event_age_secs: Option<u64>,
    /// A key policy to restore when no known-good one was observed; `{account}` is
    /// replaced by the key's account.
    pub safe_policy_file: Option<std::path::PathBuf>,
    /// The tag whose setting (TagResource, after the change) confirms a change so it is
    /// not remediated (default `kmsguard:confirmed`; `""` turns confirmation off).
    pub confirm_tag: Option<String>,
    /// Only these principals (ARNs of the caller or its role) may confirm; empty: anyone.
    #[serde(default)]
    pub confirm_principals: Vec<String>,
    /// How long the daemon holds an action back for later events, seconds (default 0).
    pub confirm_grace_secs: Option<u64>,
}

/// Whether and how remediation acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    DryRun,
    Enforce,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::DryRun => "dry-run",
            Mode::Enforce => "enforce",
        }
    }

    fn parse(s: &str) -> Option<Mode> {
        match s {
            "off" => Some(Mode::Off),
            "dry-run" => Some(Mode::DryRun),
            "enforce" => Some(Mode::Enforce),
            _ => None,
        }
    }
}

/// Which keys remediation may touch.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    pub accounts: Vec<String>,
    pub require_tag: Option<(String, String)>,
    pub key_arns: Vec<String>,
}

/// The validated `[remediation]` section.
#[derive(Debug, Clone)]
pub struct RemediationConfig {
    pub mode: Mode,
    pub rule_modes: BTreeMap<String, Mode>,
    pub scope: Scope,
    pub roles: crate::aws::Roles,
    pub max_actions_per_hour: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    pub backoff: Backoff,
    pub max_event_age_secs: u64,
    pub safe_policy: Option<String>,
    /// None: confirmation by tag is off.
    pub confirm_tag: Option<String>,
    pub confirm_principals: Vec<String>,
    pub confirm_grace: Duration,
}

fn is_account(s: &str) -> bool {
    s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit())
}

impl RemediationConfig {
    /// Validates the raw section; every problem is pushed to `problems` naming the key
    /// and the fix.
    pub fn from_raw(raw: &RawRemediation, problems: &mut Vec<String>) -> RemediationConfig {
        let mode_of = |key: &str, v: &str, problems: &mut Vec<String>| {
            Mode::parse(v).unwrap_or_else(|| {
                problems.push(format!(
                    "[remediation] {key} = \"{v}\": use \"off\", \"dry-run\" or \"enforce\""
                ));
                // Validated as the default, so the scope is checked too.
                Mode::DryRun
            })
        };
        let mode = match raw.mode.as_deref() {
            None => Mode::DryRun,
            Some(v) => mode_of("mode", v, problems),
        };
        let rule_modes = raw
            .rules
            .iter()
            .map(|(r, v)| (r.clone(), mode_of(&format!("rules.{r}"), v, problems)))
            .collect::<BTreeMap<_, _>>();
        let acting = mode != Mode::Off || rule_modes.values().any(|m| *m != Mode::Off);
        if acting && raw.accounts.is_empty() {
            problems.push("[remediation] accounts is empty: list the 12-digit accounts whose keys may be remediated, e.g. accounts = [\"111122223333\"] (or set mode = \"off\")".into());
        }
        for a in &raw.accounts {
            if !is_account(a) {
                problems.push(format!(
                    "[remediation] accounts: \"{a}\" is not a 12-digit account id"
                ));
            }
        }
        let require_tag = raw.require_tag.as_deref().and_then(|t| match t.split_once('=') {
            Some((k, v)) if !k.is_empty() => Some((k.to_string(), v.to_string())),
            _ => {
                problems.push(format!(
                    "[remediation] require_tag = \"{t}\": use KEY=VALUE, e.g. \"kmsguard:protect=true\""
                ));
                None
            }
        });
        for k in &raw.key_arns {
            if inventory::region_of_arn(k).is_none() {
                problems.push(format!(
                    "[remediation] key_arns: \"{k}\" is not a key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"
                ));
            }
        }
        crate::aws::validate_roles("remediation", &raw.roles, problems);
        let max_actions_per_hour = raw.max_actions_per_hour.unwrap_or(10);
        if max_actions_per_hour == 0 {
            problems.push("[remediation] max_actions_per_hour = 0: use at least 1 (or mode = \"off\" to stop acting)".into());
        }
        let breaker_failures = raw.breaker_failures.unwrap_or(3).max(1);
        let safe_policy =
            raw.safe_policy_file
                .as_ref()
                .and_then(|p| match std::fs::read_to_string(p) {
                    Ok(t)
                        if serde_json::from_str::<serde_json::Value>(
                            &t.replace("{account}", "111122223333"),
                        )
                        .is_ok() =>
                    {
                        Some(t)
                    }
                    Ok(_) => {
                        problems.push(format!(
                            "[remediation] safe_policy_file = \"{}\": not a JSON key policy",
                            p.display()
                        ));
                        None
                    }
                    Err(e) => {
                        problems.push(format!(
                            "[remediation] safe_policy_file = \"{}\": cannot read it: {e}",
                            p.display()
                        ));
                        None
                    }
                });
        let confirm_grace_secs = raw.confirm_grace_secs.unwrap_or(0);
        if confirm_grace_secs > 3600 {
            problems.push(format!("[remediation] confirm_grace_secs = {confirm_grace_secs}: use at most 3600 (an hour); every action waits this long"));
        }
        for p in &raw.confirm_principals {
            if !(p.starts_with("arn:")
                && (p.contains(":role/")
                    || p.contains(":user/")
                    || p.contains(":assumed-role/")
                    || p.ends_with(":root")))
            {
                problems.push(format!("[remediation] confirm_principals: \"{p}\" is not an IAM principal ARN (arn:aws:iam::ACCOUNT:role/NAME, ...:user/NAME or an assumed-role session ARN)"));
            }
        }
        RemediationConfig {
            mode,
            rule_modes,
            scope: Scope {
                accounts: raw.accounts.clone(),
                require_tag,
                key_arns: raw.key_arns.clone(),
            },
            roles: raw.roles.clone(),
            max_actions_per_hour: max_actions_per_hour.max(1),
            breaker_failures,
            breaker_cooldown: Duration::from_secs(raw.breaker_cooldown_secs.unwrap_or(900)),
            backoff: Backoff {
                base: Duration::from_millis(raw.retry_base_ms.unwrap_or(200)),
                cap: Duration::from_secs(10),
                max_attempts: raw.retries.unwrap_or(3) + 1,
            },
            max_event_age_secs: raw.max_event_age_secs.unwrap_or(86_400),
            safe_policy,
            confirm_tag: match raw.confirm_tag.as_deref() {
                None => Some("kmsguard:confirmed".to_string()),
                Some("") => None,
                Some(t) => Some(t.to_string()),
            },
            confirm_principals: raw.confirm_principals.clone(),
            confirm_grace: Duration::from_secs(confirm_grace_secs),
        }
    }

    /// The mode for findings of `rule`.
    pub fn mode_for(&self, rule: &str) -> Mode {
        self.rule_modes.get(rule).copied().unwrap_or(self.mode)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::remediate) fn cfg(text: &str) -> Result<RemediationConfig, Vec<String>> {
        let raw: RawRemediation = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut problems = Vec::new();
        let c = RemediationConfig::from_raw(&raw, &mut problems);
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(problems)
        }
    }

    #[test]
    fn config_problems_name_the_key_and_the_fix() {
        let e = cfg("mode = \"yolo\"\nconfirm_grace_secs = 7200\nconfirm_principals = [\"alice\"]\nrequire_tag = \"notag\"\nmax_actions_per_hour = 0\n[rules]\nkms-key-disabled = \"maybe\"\n[roles]\n\"123\" = \"role\"\n")
            .unwrap_err()
            .join("\n");
        for must in [
            "[remediation] mode = \"yolo\": use \"off\", \"dry-run\" or \"enforce\"",
            "[remediation] rules.kms-key-disabled = \"maybe\"",
            "[remediation] accounts is empty",
            "require_tag = \"notag\": use KEY=VALUE",
            "max_actions_per_hour = 0",
            "[remediation.roles] \"123\": the key must be a 12-digit account id",
            "confirm_grace_secs = 7200: use at most 3600",
            "confirm_principals: \"alice\" is not an IAM principal ARN",
        ] {
            assert!(e.contains(must), "missing {must} in\n{e}");
        }
        let c = cfg("accounts = [\"111122223333\"]\n").unwrap();
        assert_eq!(c.mode, Mode::DryRun, "dry-run is the default");
        assert!(cfg("mode = \"off\"\n").is_ok(), "off needs no scope");
    }

    #[test]
    fn the_daemon_config_reports_remediation_problems() {
        let text = "[state]\ndir = \"/tmp/x\"\n[[sources.sqs]]\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/111122223333/q\"\n[[sinks.file]]\npath = \"/tmp/f.jsonl\"\n[remediation]\nmode = \"enforce\"\n";
        let e = crate::config::Config::parse(text, std::path::Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[remediation] accounts is empty"), "{e}");
        let ok = text.replace("mode = \"enforce\"", "accounts = [\"111122223333\"]");
        let c = crate::config::Config::parse(&ok, std::path::Path::new("k.toml")).unwrap();
        assert_eq!(c.remediation.map(|r| r.mode), Some(Mode::DryRun));
        let none = crate::config::Config::parse(
            &text.replace("[remediation]\nmode = \"enforce\"\n", ""),
            std::path::Path::new("k.toml"),
        )
        .unwrap();
        assert!(none.remediation.is_none(), "no section, no remediation");
    }
}
