//! The `[inventory]` section, shared by `kmsguard posture --config FILE` and the daemon's
//! config: roles per account (cross-account inventory, the same table as
//! `[remediation] roles`) and the daemon's refresh interval. `RawInventory` is what is
//! written (unknown keys rejected); `InventoryConfig` is validated, every problem naming
//! the key and the fix.

use crate::aws::Roles;
use serde::Deserialize;
use std::time::Duration;

/// The `[inventory]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInventory {
    /// Role to assume per account: the inventory (and posture) reads that account's keys
    /// through it, besides the keys the default credentials see.
    #[serde(default)]
    pub roles: Roles,
    /// How often the daemon re-reads the inventory and runs the posture checks (e.g.
    /// "6h"); absent: never.
    pub refresh: Option<String>,
}

/// The validated `[inventory]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InventoryConfig {
    pub roles: Roles,
    /// None: no scheduled refresh.
    pub refresh: Option<Duration>,
}

impl InventoryConfig {
    /// Validates the raw section; every problem is pushed to `problems`.
    pub fn from_raw(raw: &RawInventory, problems: &mut Vec<String>) -> InventoryConfig {
        crate::aws::validate_roles("inventory", &raw.roles, problems);
        let refresh = raw
            .refresh
            .as_deref()
            .and_then(|s| match crate::clock::parse_duration(s) {
                Ok(d) if d >= Duration::from_secs(1) => Some(d),
                Ok(_) => {
                    problems.push(format!(
                        "[inventory] refresh = \"{s}\": use at least \"1s\" (e.g. \"6h\"), or leave it out for no scheduled refresh"
                    ));
                    None
                }
                Err(m) => {
                    problems.push(format!("[inventory] refresh: {m}"));
                    None
                }
            });
        InventoryConfig {
            roles: raw.roles.clone(),
            refresh,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Result<InventoryConfig, String> {
        let raw: RawInventory = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        let c = InventoryConfig::from_raw(&raw, &mut problems);
        if problems.is_empty() {
            Ok(c)
        } else {
            Err(problems.join("\n"))
        }
    }

    #[test]
    fn roles_and_refresh_are_validated_with_the_fix() {
        let c = cfg("refresh = \"6h\"\n[roles]\n\"444455556666\" = \"arn:aws:iam::444455556666:role/audit\"\n").unwrap();
        assert_eq!(c.refresh, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(c.roles.len(), 1);
        assert_eq!(cfg("").unwrap().refresh, None, "absent: off");
        let e = cfg("refresh = \"often\"\n[roles]\n\"4444\" = \"audit\"\n").unwrap_err();
        for must in [
            "[inventory] refresh: `often` is not a duration",
            "[inventory.roles] \"4444\": the key must be a 12-digit account id",
            "use a role ARN, arn:aws:iam::4444:role/NAME",
        ] {
            assert!(e.contains(must), "missing {must} in\n{e}");
        }
        assert!(cfg("refresh = \"0s\"\n").unwrap_err().contains("at least"));
        assert!(cfg("refrsh = \"1h\"\n").unwrap_err().contains("refresh"));
    }

    #[test]
    fn the_daemon_config_carries_inventory_and_posture() {
        let text = "[state]\ndir = \"/tmp/x\"\n[[sources.sqs]]\nqueue_url = \"https://sqs.us-east-1.amazonaws.com/111122223333/q\"\n[[sinks.file]]\npath = \"/tmp/f.jsonl\"\n[inventory]\nrefresh = \"6h\"\n[posture]\nrequired_tags = [\"owner\"]\n";
        let c = crate::config::Config::parse(text, std::path::Path::new("k.toml")).unwrap();
        assert_eq!(c.inventory.refresh, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(c.posture.required_tags, ["owner"]);
        let bad = text
            .replace("\"6h\"", "\"soon\"")
            .replace("required_tags = [\"owner\"]", "unused_days = 0");
        let e = crate::config::Config::parse(&bad, std::path::Path::new("k.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[inventory] refresh: `soon`"), "{e}");
        assert!(e.contains("[posture] unused_days"), "{e}");
        // The same file serves `kmsguard posture --config`.
        let (p, i) = crate::posture::PostureConfig::parse_with_inventory(text, "k.toml").unwrap();
        assert_eq!(p.required_tags, ["owner"]);
        assert_eq!(i.refresh, Some(Duration::from_secs(6 * 3600)));
    }
}
