//! `kmsguard posture`: audits every customer-managed key of the inventory against KMS
//! best practice and reports `Kind::Posture` findings, one per check and key, with the
//! stable id `finding_id(check_id, [key ARN])`. The checks, their severities, rationales
//! and fixes are the table `CHECKS` (and docs/posture.md); `PostureConfig` is the
//! `[posture]` section of a TOML file. Evaluation (`evaluate`) is pure: the inventory
//! reads the API, this module only judges what it read. `audit` drives both over every
//! region and account (default credentials plus `[inventory] roles`), for `kmsguard
//! posture` and the daemon's scheduled refresh.

use crate::analyze::finding::{finding_id, Finding, Kind, Severity};
use crate::analyze::predicates::{
    account_of_principal, allows_public, has_restricting_condition, is_allow, principals,
    statements,
};
use crate::inventory::{self, Coverage, KeyRecord, Seen};
use serde::Deserialize;
use serde_json::Value as Json;
use std::collections::BTreeSet;
use std::path::Path;

/// One posture check.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub id: &'static str,
    pub severity: Severity,
    pub title: &'static str,
    pub rationale: &'static str,
    pub remediation: &'static str,
}

pub const ROTATION_DISABLED: Check = Check {
    id: "kms-posture-rotation-disabled",
    severity: Severity::Medium,
    title: "Automatic rotation is off on a symmetric KMS key",
    rationale: "Yearly (or shorter) automatic rotation limits how much data one key version protects and is required by CIS, PCI DSS and most internal standards; it costs nothing in availability.",
    remediation: "aws kms enable-key-rotation --key-id KEY [--rotation-period-in-days N]",
};

pub const UNUSABLE_KEY_IN_USE: Check = Check {
    id: "kms-posture-unusable-key-in-use",
    severity: Severity::High,
    title: "A disabled or pending-deletion key was used recently",
    rationale: "CloudTrail shows callers still using a key that is disabled or scheduled for deletion: their requests fail now, and once deleted the data it protects is lost for good (an outage in the making).",
    remediation: "aws kms cancel-key-deletion --key-id KEY && aws kms enable-key --key-id KEY, then move the callers to another key before retiring it",
};

pub const POLICY_PUBLIC: Check = Check {
    id: "kms-posture-policy-public",
    severity: Severity::Critical,
    title: "Key policy allows any principal without a restricting condition",
    rationale: "`Principal: *` without kms:CallerAccount, aws:PrincipalOrgID or a similar condition lets any AWS account use the key as far as the policy is concerned.",
    remediation: "Replace the `*` principal with the accounts or roles that need the key, or add a condition such as kms:CallerAccount or aws:PrincipalOrgID (aws kms put-key-policy)",
};

pub const POLICY_FOREIGN_ACCOUNT: Check = Check {
    id: "kms-posture-policy-foreign-account",
    severity: Severity::High,
    title: "Key policy trusts an account outside the allowlist",
    rationale: "A principal of another account that is not in `allowed_accounts` can use or manage the key; cross-account access should be deliberate and reviewed.",
    remediation: "Remove the foreign principal from the key policy, or add its account to [posture] allowed_accounts if the access is intended",
};

pub const POLICY_KMS_STAR: Check = Check {
    id: "kms-posture-policy-kms-star",
    severity: Severity::Medium,
    title: "Key policy grants kms:* to a non-admin principal",
    rationale: "`kms:*` includes ScheduleKeyDeletion, PutKeyPolicy and DisableKey: an application role with it can destroy the key or lock everyone else out. Least privilege separates key administrators from key users.",
    remediation: "Grant the principal only the operations it needs (e.g. kms:Decrypt, kms:GenerateDataKey), or list it in [posture] admin_principals if it is a key administrator",
};

pub const MISSING_TAGS: Check = Check {
    id: "kms-posture-missing-tags",
    severity: Severity::Low,
    title: "Key lacks required tags",
    rationale: "Tags (owner, environment, sensitivity) are how keys are categorised, attributed and scoped in policies and alerting; an untagged key has no owner to call.",
    remediation: "aws kms tag-resource --key-id KEY --tags TagKey=NAME,TagValue=VALUE",
};

pub const MRK_NO_DR_REPLICA: Check = Check {
    id: "kms-posture-mrk-no-dr-replica",
    severity: Severity::Medium,
    title: "Multi-Region primary key has no replica in the DR region",
    rationale: "Multi-Region keys exist so data encrypted in one region can be decrypted in another after a regional outage; without a replica in the disaster-recovery region that plan does not work.",
    remediation: "aws kms replicate-key --key-id KEY --replica-region DR_REGION",
};

pub const UNUSED_KEY: Check = Check {
    id: "kms-posture-unused-key",
    severity: Severity::Low,
    title: "Key not used for a long time",
    rationale: "An enabled key nobody uses costs $1 a month and is attack surface (its policy and grants still let principals in); CloudTrail shows no cryptographic use in the configured period.",
    remediation: "Confirm with the key's owner, then aws kms disable-key --key-id KEY (and later schedule-key-deletion with a waiting period)",
};

pub const GRANT_FOREIGN_ACCOUNT: Check = Check {
    id: "kms-posture-grant-foreign-account",
    severity: Severity::High,
    title: "Grant gives a foreign account use of the key",
    rationale: "Grants are invisible in the key policy; one to a principal of another account outside the allowlist lets that account use the key until it is revoked.",
    remediation: "aws kms list-grants --key-id KEY, then aws kms revoke-grant --key-id KEY --grant-id ID (or add the account to [posture] allowed_accounts)",
};

/// Every check, in report order.
pub const CHECKS: [Check; 9] = [
    ROTATION_DISABLED,
    UNUSABLE_KEY_IN_USE,
    POLICY_PUBLIC,
    POLICY_FOREIGN_ACCOUNT,
    POLICY_KMS_STAR,
    MISSING_TAGS,
    MRK_NO_DR_REPLICA,
    UNUSED_KEY,
    GRANT_FOREIGN_ACCOUNT,
];

pub fn check(id: &str) -> Option<&'static Check> {
    CHECKS.iter().find(|c| c.id == id)
}

fn default_unused_days() -> u32 {
    90
}

fn default_recent_use_days() -> u32 {
    30
}

/// The `[posture]` section of a config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostureConfig {
    /// Check ids to skip.
    #[serde(default)]
    pub disabled_checks: Vec<String>,
    /// Accounts (12 digits) trusted besides the key's own, in policies and grants.
    #[serde(default)]
    pub allowed_accounts: Vec<String>,
    /// Principal ARNs allowed `kms:*` (key administrators). The key account's root is
    /// always allowed: it is the default policy's delegation to IAM.
    #[serde(default)]
    pub admin_principals: Vec<String>,
    /// Tag keys every customer-managed key must have.
    #[serde(default)]
    pub required_tags: Vec<String>,
    /// The region multi-Region primaries must have a replica in.
    #[serde(default)]
    pub dr_region: Option<String>,
    /// A key with no cryptographic use for this many days is reported as unused.
    #[serde(default = "default_unused_days")]
    pub unused_days: u32,
    /// A disabled or pending-deletion key used within this many days is reported.
    #[serde(default = "default_recent_use_days")]
    pub recent_use_days: u32,
    /// Regions to audit when no --region is given.
    #[serde(default)]
    pub regions: Vec<String>,
}

impl Default for PostureConfig {
    fn default() -> Self {
        PostureConfig {
            disabled_checks: Vec::new(),
            allowed_accounts: Vec::new(),
            admin_principals: Vec::new(),
            required_tags: Vec::new(),
            dr_region: None,
            unused_days: default_unused_days(),
            recent_use_days: default_recent_use_days(),
            regions: Vec::new(),
        }
    }
}

/// The sections of a config file posture reads. The daemon's other sections (validated
/// by `check-config`, not here) are accepted and ignored, so its config file serves
/// `posture --config` too; any other top-level key is an error (a misspelt `[postur]`
/// must not pass silently).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the daemon's sections are read only to be accepted
struct RawFile {
    #[serde(default)]
    posture: Option<PostureConfig>,
    #[serde(default)]
    inventory: Option<crate::inventory::RawInventory>,
    aws: Option<toml::Value>,
    state: Option<toml::Value>,
    rules: Option<toml::Value>,
    sources: Option<toml::Value>,
    sinks: Option<toml::Value>,
    metrics: Option<toml::Value>,
    baseline: Option<toml::Value>,
    daemon: Option<toml::Value>,
    alerts: Option<toml::Value>,
    remediation: Option<toml::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum PostureError {
    #[error("cannot read posture config {path}: {source} (check the path given to --config)")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid posture config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl PostureConfig {
    /// Reads the `[posture]` section of a TOML file (defaults when it has none).
    pub fn load(path: &Path) -> Result<PostureConfig, PostureError> {
        Ok(Self::load_with_inventory(path)?.0)
    }

    /// Reads the `[posture]` and `[inventory]` sections of a TOML file.
    pub fn load_with_inventory(
        path: &Path,
    ) -> Result<(PostureConfig, crate::inventory::InventoryConfig), PostureError> {
        let text = std::fs::read_to_string(path).map_err(|source| PostureError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_with_inventory(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<PostureConfig, PostureError> {
        Ok(Self::parse_with_inventory(text, origin)?.0)
    }

    pub fn parse_with_inventory(
        text: &str,
        origin: &str,
    ) -> Result<(PostureConfig, crate::inventory::InventoryConfig), PostureError> {
        let invalid = |message: String| PostureError::Invalid {
            path: origin.to_string(),
            message,
        };
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            invalid(format!(
                "{}(the [posture] keys are: disabled_checks, allowed_accounts, admin_principals, required_tags, dr_region, unused_days, recent_use_days, regions; the [inventory] keys: roles, refresh)",
                e
            ))
        })?;
        let cfg = raw.posture.unwrap_or_default();
        cfg.validate().map_err(invalid)?;
        let mut problems = Vec::new();
        let inventory = crate::inventory::InventoryConfig::from_raw(
            &raw.inventory.unwrap_or_default(),
            &mut problems,
        );
        if !problems.is_empty() {
            return Err(invalid(problems.join("; ")));
        }
        Ok((cfg, inventory))
    }

    /// Cross-field checks; the message names the key and the fix.
    pub fn validate(&self) -> Result<(), String> {
        for id in &self.disabled_checks {
            if check(id).is_none() {
                return Err(format!(
                    "[posture] disabled_checks: unknown check `{id}`; use one of {}",
                    CHECKS.map(|c| c.id).join(", ")
                ));
            }
        }
        for a in &self.allowed_accounts {
            if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
                return Err(format!(
                    "[posture] allowed_accounts: `{a}` is not a 12-digit AWS account id"
                ));
            }
        }
        for p in &self.admin_principals {
            if !p.starts_with("arn:") {
                return Err(format!(
                    "[posture] admin_principals: `{p}` is not an ARN (write e.g. arn:aws:iam::111122223333:role/KeyAdmin)"
                ));
            }
        }
        if self.required_tags.iter().any(|t| t.trim().is_empty()) {
            return Err("[posture] required_tags: tag keys must not be empty".into());
        }
        if self
            .dr_region
            .as_deref()
            .is_some_and(|r| r.trim().is_empty())
        {
            return Err(
                "[posture] dr_region: must be a region name such as us-west-2, or be left out"
                    .into(),
            );
        }
        if self.regions.iter().any(|r| r.trim().is_empty()) {
            return Err("[posture] regions: region names must not be empty".into());
        }
        if self.unused_days == 0 || self.recent_use_days == 0 {
            return Err("[posture] unused_days and recent_use_days must be at least 1".into());
        }
        Ok(())
    }

    pub fn enabled(&self, id: &str) -> bool {
        !self.disabled_checks.iter().any(|d| d == id)
    }
}

/// What posture knows besides the key record: CloudTrail's view, and now.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub seen: &'a Seen,
    pub coverage: &'a Coverage,
    /// Unix seconds.
    pub now: i64,
}

fn finding(c: &Check, rec: &KeyRecord, summary: String) -> Finding {
    let mut f = Finding {
        id: finding_id(c.id, std::slice::from_ref(&rec.arn)),
        kind: Kind::Posture,
        rule: c.id.to_string(),
        severity: c.severity,
        title: c.title.to_string(),
        summary,
        event_ids: Vec::new(),
        event_name: String::new(),
        event_source: crate::event::KMS_SOURCE.to_string(),
        time: rec.refreshed_at.clone(),
        principal: None,
        principal_role: None,
        account: Some(rec.account.clone()).filter(|a| !a.is_empty()),
        region: Some(rec.region.clone()).filter(|r| !r.is_empty()),
        keys: vec![rec.arn.clone()],
        source_ip: None,
        user_agent: None,
        error_code: None,
        file: String::new(),
        remediation: Some(c.remediation.to_string()),
        key_alias: None,
        key_tags: Default::default(),
        context: Default::default(),
        action: None,
        pending: Default::default(),
        ..Finding::default()
    };
    f.settle_counts();
    inventory::apply(&mut f, rec);
    f
}

/// Actions of a statement, lower-cased.
fn actions(stmt: &Json) -> Vec<String> {
    match stmt.get("Action") {
        Some(Json::String(s)) => vec![s.to_ascii_lowercase()],
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(Json::as_str)
            .map(str::to_ascii_lowercase)
            .collect(),
        _ => Vec::new(),
    }
}

fn days_ago(t: Option<&str>, now: i64) -> Option<i64> {
    t.and_then(inventory::parse_time)
        .map(|t| now.saturating_sub(t) / 86_400)
}

/// The name a key goes by in a summary: its alias, else its id.
fn name(rec: &KeyRecord) -> String {
    match rec.aliases.first() {
        Some(a) => format!("{a} ({})", rec.key_id),
        None => rec.key_id.clone(),
    }
}

/// What `audit` found over every region and account.
#[derive(Debug, Default)]
pub struct Audit {
    /// Sorted by key, then check; one per (check, key).
    pub findings: Vec<Finding>,
    /// Keys read (each ARN once), and how many of them are customer-managed.
    pub keys: usize,
    pub customer: usize,
    /// Keys not audited or partly audited, with why (one line each, for warnings).
    pub warnings: Vec<String>,
    pub coverage: Coverage,
    /// Accounts of `[inventory] roles` not audited because their role could not be used
    /// (each has a `health-inventory-role` finding in `findings`).
    pub skipped_accounts: Vec<String>,
}

/// Reads the keys of every region, with the default credentials and through each role
/// of the inventory, and runs `evaluate` on each (each key ARN once, whoever listed it).
/// An account whose keys cannot be listed through its role is skipped with a
/// `health-inventory-role` finding (and a warning); a region the default credentials
/// cannot list is an error naming it.
pub async fn audit(
    inv: &inventory::Inventory,
    regions: &[String],
    cfg: &PostureConfig,
    now: i64,
) -> Result<Audit, AuditError> {
    let mut out = Audit {
        coverage: inv.coverage()?,
        ..Audit::default()
    };
    let accounts: Vec<Option<String>> = std::iter::once(None)
        .chain(inv.role_accounts().map(|a| Some(a.to_string())))
        .collect();
    let mut done = BTreeSet::new();
    'accounts: for account in &accounts {
        for region in regions {
            let ri = match (
                inv.refresh_region(account.as_deref(), region).await,
                account,
            ) {
                (Ok(ri), _) => ri,
                // A role that cannot be assumed (or whose account cannot be listed) costs
                // that account, not the audit: the others are still audited.
                (Err(e), Some(a)) => {
                    let role = inv.role_of(a).unwrap_or("?");
                    out.warnings.push(format!(
                        "account {a} not audited: cannot read its KMS keys in {region} through role {role}: {e}"
                    ));
                    out.findings.push(role_health(a, role, region, &e, now));
                    out.skipped_accounts.push(a.clone());
                    continue 'accounts;
                }
                (Err(source), None) => {
                    return Err(AuditError::List {
                        region: region.clone(),
                        via: "the default credentials".into(),
                        source,
                    })
                }
            };
            for (arn, e) in &ri.failures {
                out.warnings.push(format!("{arn}: not audited: {e}"));
            }
            for rec in &ri.keys {
                if !done.insert(rec.arn.clone()) {
                    continue;
                }
                out.keys += 1;
                out.customer += usize::from(rec.is_customer_managed());
                let seen = inv.seen(&rec.arn)?;
                let ctx = Context {
                    seen: &seen,
                    coverage: &out.coverage,
                    now,
                };
                out.findings.extend(evaluate(rec, cfg, &ctx));
                for part in &rec.errors {
                    out.warnings
                        .push(format!("{}: partly audited: {part}", rec.arn));
                }
            }
        }
    }
    out.findings
        .sort_by(|a, b| (&a.keys, &a.rule).cmp(&(&b.keys, &b.rule)));
    Ok(out)
}

/// The rule id of the health finding for an account whose role cannot be used.
pub const ROLE_HEALTH_RULE: &str = "health-inventory-role";

/// A `kind: "health"` finding: the keys of `account` could not be read through `role`
/// (the account was skipped). Its id depends on the role only, so a scheduled refresh
/// reports it once, and again only after it was fixed and broke again.
fn role_health(
    account: &str,
    role: &str,
    region: &str,
    e: &inventory::InventoryError,
    now: i64,
) -> Finding {
    let summary = format!(
        "Account {account} was not audited: its KMS keys in {region} cannot be read through role {role}: {e}. \
         Fix: the role's trust policy must allow this principal sts:AssumeRole, and the role needs \
         kms:ListKeys, kms:ListAliases, kms:DescribeKey, kms:ListResourceTags, kms:GetKeyRotationStatus, \
         kms:GetKeyPolicy and kms:ListGrants (docs/posture.md); or remove the account from [inventory] roles."
    );
    Finding {
        id: finding_id(ROLE_HEALTH_RULE, &[role.to_string()]),
        kind: Kind::Health,
        rule: ROLE_HEALTH_RULE.to_string(),
        severity: Severity::High,
        title: "kmsguard could not audit an account: its role cannot be used".into(),
        summary: crate::analyze::rule::clean(&summary, 1200).collect(),
        event_source: crate::event::KMS_SOURCE.to_string(),
        time: inventory::format_time(now),
        account: Some(account.to_string()),
        region: Some(region.to_string()),
        remediation: Some(format!(
            "let the daemon's principal assume {role} (trust policy) and grant it the read-only KMS permissions"
        )),
        ..Finding::default()
    }
}

/// What a scheduled refresh reports: of the findings of an audit, those whose ids are
/// not in `reported`, and the state writes that make `reported` the current set (new
/// ids added; ids of problems no longer found removed, so a problem that comes back is
/// reported again). Commit the writes with the findings.
pub fn news(
    reported: &BTreeSet<String>,
    findings: Vec<Finding>,
    now: &str,
) -> (Vec<Finding>, Vec<crate::store::StateWrite>) {
    use crate::store::StateWrite;
    let key = |id: &str| format!("{}{id}", inventory::REPORTED).into_bytes();
    let current: BTreeSet<&str> = findings.iter().map(|f| f.id.as_str()).collect();
    let mut writes: Vec<StateWrite> = reported
        .iter()
        .filter(|id| !current.contains(id.as_str()))
        .map(|id| StateWrite {
            tree: inventory::TREE,
            key: key(id),
            value: None,
        })
        .collect();
    let new: Vec<Finding> = findings
        .into_iter()
        .filter(|f| !reported.contains(&f.id))
        .collect();
    writes.extend(
        new.iter()
            .map(|f| StateWrite::put(inventory::TREE, key(&f.id), now.as_bytes().to_vec())),
    );
    (new, writes)
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot read the KMS keys of region {region} with {via}: {source}")]
    List {
        region: String,
        via: String,
        #[source]
        source: inventory::InventoryError,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Runs every enabled check on one key. AWS-managed keys are not audited.
pub fn evaluate(rec: &KeyRecord, cfg: &PostureConfig, ctx: &Context<'_>) -> Vec<Finding> {
    let mut out = Vec::new();
    if !rec.is_customer_managed() {
        return out;
    }
    let on = |id| cfg.enabled(id);
    let going_away = matches!(
        rec.state.as_str(),
        "PendingDeletion" | "PendingReplicaDeletion"
    );
    let is_replica = rec.multi_region.as_ref().is_some_and(|m| !m.is_primary);
    let trusted =
        |acct: &str| acct == rec.account || cfg.allowed_accounts.iter().any(|a| a == acct);

    if on(ROTATION_DISABLED.id)
        && rec.rotation_enabled == Some(false)
        && rec.spec == "SYMMETRIC_DEFAULT"
        && rec.origin == "AWS_KMS"
        && !going_away
        // A replica's rotation follows its primary: report the primary only.
        && !is_replica
    {
        out.push(finding(
            &ROTATION_DISABLED,
            rec,
            format!(
                "Automatic rotation is disabled on symmetric key {}.",
                name(rec)
            ),
        ));
    }

    if on(UNUSABLE_KEY_IN_USE.id) && (going_away || rec.state == "Disabled") {
        if let Some(days) = days_ago(ctx.seen.last_used.as_deref(), ctx.now) {
            if days < i64::from(cfg.recent_use_days) {
                let when = ctx.seen.last_used.as_deref().unwrap_or("?");
                let state = if going_away {
                    format!(
                        "scheduled for deletion{}",
                        rec.deletion_date
                            .as_deref()
                            .map(|d| format!(" on {d}"))
                            .unwrap_or_default()
                    )
                } else {
                    "disabled".to_string()
                };
                out.push(finding(
                    &UNUSABLE_KEY_IN_USE,
                    rec,
                    format!(
                        "Key {} is {state} but CloudTrail shows it used at {when} ({days} days ago).",
                        name(rec)
                    ),
                ));
            }
        }
    }

    let policy: Option<Json> = rec
        .policy
        .as_deref()
        .and_then(|p| serde_json::from_str(p).ok());
    if let Some(p) = &policy {
        if on(POLICY_PUBLIC.id) && allows_public(p) {
            out.push(finding(
                &POLICY_PUBLIC,
                rec,
                format!(
                    "The policy of key {} allows principal `*` without a condition that restricts who.",
                    name(rec)
                ),
            ));
        }
        if on(POLICY_FOREIGN_ACCOUNT.id) {
            let foreign: BTreeSet<&str> = statements(p)
                .into_iter()
                .filter(|s| is_allow(s))
                .flat_map(principals)
                .filter_map(account_of_principal)
                .filter(|a| !trusted(a))
                .collect();
            if !foreign.is_empty() {
                out.push(finding(
                    &POLICY_FOREIGN_ACCOUNT,
                    rec,
                    format!(
                        "The policy of key {} allows account(s) {} outside the allowlist.",
                        name(rec),
                        foreign.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        if on(POLICY_KMS_STAR.id) {
            let root = format!("arn:aws:iam::{}:root", rec.account);
            let mut who: BTreeSet<&str> = BTreeSet::new();
            for s in statements(p) {
                let acts = actions(s);
                if !is_allow(s) || !acts.iter().any(|a| a == "kms:*" || a == "*") {
                    continue;
                }
                for pr in principals(s) {
                    let admin = pr == root
                        || pr == rec.account
                        || cfg.admin_principals.iter().any(|a| a == pr);
                    // `*` pinned by a condition is judged by the public check's logic.
                    let pinned_star = pr == "*" && has_restricting_condition(s);
                    if !admin && !pinned_star {
                        who.insert(pr);
                    }
                }
            }
            if !who.is_empty() {
                out.push(finding(
                    &POLICY_KMS_STAR,
                    rec,
                    format!(
                        "The policy of key {} grants kms:* to {}, not listed as key administrator(s).",
                        name(rec),
                        who.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }

    if on(MISSING_TAGS.id) {
        let missing: Vec<&str> = cfg
            .required_tags
            .iter()
            .filter(|t| !rec.tags.contains_key(*t))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            out.push(finding(
                &MISSING_TAGS,
                rec,
                format!(
                    "Key {} lacks the required tag(s) {}.",
                    name(rec),
                    missing.join(", ")
                ),
            ));
        }
    }

    if on(MRK_NO_DR_REPLICA.id) && !going_away {
        if let (Some(dr), Some(mr)) = (&cfg.dr_region, &rec.multi_region) {
            if mr.is_primary && rec.region != *dr && !mr.replica_regions.contains(dr) {
                out.push(finding(
                    &MRK_NO_DR_REPLICA,
                    rec,
                    format!(
                        "Multi-Region primary key {} has no replica in DR region {dr} (replicas: {}).",
                        name(rec),
                        if mr.replica_regions.is_empty() {
                            "none".to_string()
                        } else {
                            mr.replica_regions.join(", ")
                        }
                    ),
                ));
            }
        }
    }

    if on(UNUSED_KEY.id) && rec.state == "Enabled" {
        let period = i64::from(cfg.unused_days);
        // Only as far as CloudTrail coverage lets us tell: the replays recorded into this
        // state must reach back over the whole period, and the key must be that old.
        let covered = days_ago(ctx.coverage.from.as_deref(), ctx.now).is_some_and(|d| d >= period);
        let old = days_ago(rec.creation_date.as_deref(), ctx.now).is_some_and(|d| d >= period);
        let idle = match days_ago(ctx.seen.last_used.as_deref(), ctx.now) {
            Some(d) => d >= period,
            None => true,
        };
        if covered && old && idle {
            out.push(finding(
                &UNUSED_KEY,
                rec,
                format!(
                    "Key {} has no cryptographic use in CloudTrail for {period} days or more (last use: {}).",
                    name(rec),
                    ctx.seen.last_used.as_deref().unwrap_or("never seen")
                ),
            ));
        }
    }

    if on(GRANT_FOREIGN_ACCOUNT.id) {
        if let Some(grants) = &rec.grants {
            let foreign: BTreeSet<&str> = grants
                .iter()
                .flat_map(|g| [g.grantee.as_deref(), g.retiring.as_deref()])
                .flatten()
                .filter_map(account_of_principal)
                .filter(|a| !trusted(a))
                .collect();
            if !foreign.is_empty() {
                out.push(finding(
                    &GRANT_FOREIGN_ACCOUNT,
                    rec,
                    format!(
                        "Key {} has grant(s) to account(s) {} outside the allowlist.",
                        name(rec),
                        foreign.into_iter().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::{GrantRecord, MultiRegion};

    const ACCT: &str = "111122223333";

    fn key(id: &str) -> KeyRecord {
        KeyRecord {
            arn: format!("arn:aws:kms:us-east-1:{ACCT}:key/{id}"),
            key_id: id.into(),
            account: ACCT.into(),
            region: "us-east-1".into(),
            state: "Enabled".into(),
            manager: "CUSTOMER".into(),
            spec: "SYMMETRIC_DEFAULT".into(),
            usage: "ENCRYPT_DECRYPT".into(),
            origin: "AWS_KMS".into(),
            rotation_enabled: Some(true),
            policy: Some(
                serde_json::json!({"Statement": [{"Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{ACCT}:root")}, "Action": "kms:*", "Resource": "*"}]})
                .to_string(),
            ),
            grants: Some(vec![]),
            creation_date: Some("2025-01-01T00:00:00Z".into()),
            refreshed_at: "2026-06-01T00:00:00Z".into(),
            tags: [("owner".to_string(), "team-a".to_string())].into(),
            ..Default::default()
        }
    }

    fn ids(rec: &KeyRecord, cfg: &PostureConfig, seen: &Seen, cov: &Coverage) -> Vec<String> {
        let now = inventory::parse_time("2026-06-01T00:00:00Z").unwrap();
        let mut v: Vec<String> = evaluate(
            rec,
            cfg,
            &Context {
                seen,
                coverage: cov,
                now,
            },
        )
        .into_iter()
        .map(|f| f.rule)
        .collect();
        v.sort();
        v
    }

    fn cfg() -> PostureConfig {
        PostureConfig {
            required_tags: vec!["owner".into()],
            dr_region: Some("us-west-2".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_well_configured_key_has_no_findings() {
        assert!(ids(&key("good"), &cfg(), &Seen::default(), &Coverage::default()).is_empty());
    }

    #[test]
    fn each_check_fires_on_its_case_only() {
        let none = (Seen::default(), Coverage::default());
        let mut k = key("k");
        k.rotation_enabled = Some(false);
        assert_eq!(ids(&k, &cfg(), &none.0, &none.1), [ROTATION_DISABLED.id]);
        k.spec = "RSA_2048".into();
        assert!(
            ids(&k, &cfg(), &none.0, &none.1).is_empty(),
            "asymmetric keys do not rotate"
        );

        let mut k = key("k");
        k.policy = Some(
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"kms:Decrypt"}]}"#.into(),
        );
        assert_eq!(ids(&k, &cfg(), &none.0, &none.1), [POLICY_PUBLIC.id]);

        let mut k = key("k");
        k.policy = Some(r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::999988887777:root"},"Action":"kms:Decrypt"}]}"#.into());
        assert_eq!(
            ids(&k, &cfg(), &none.0, &none.1),
            [POLICY_FOREIGN_ACCOUNT.id]
        );
        let allow = PostureConfig {
            allowed_accounts: vec!["999988887777".into()],
            ..cfg()
        };
        assert!(ids(&k, &allow, &none.0, &none.1).is_empty());

        let mut k = key("k");
        let app = format!("arn:aws:iam::{ACCT}:role/app");
        k.policy = Some(serde_json::json!({"Statement":[{"Effect":"Allow","Principal":{"AWS":[app]},"Action":["kms:*"]}]}).to_string());
        assert_eq!(ids(&k, &cfg(), &none.0, &none.1), [POLICY_KMS_STAR.id]);
        let admins = PostureConfig {
            admin_principals: vec![format!("arn:aws:iam::{ACCT}:role/app")],
            ..cfg()
        };
        assert!(ids(&k, &admins, &none.0, &none.1).is_empty());

        let mut k = key("k");
        k.tags.clear();
        assert_eq!(ids(&k, &cfg(), &none.0, &none.1), [MISSING_TAGS.id]);

        let mut k = key("mrk-1");
        k.multi_region = Some(MultiRegion {
            is_primary: true,
            primary_arn: Some(k.arn.clone()),
            primary_region: Some("us-east-1".into()),
            replica_regions: vec!["eu-west-1".into()],
        });
        assert_eq!(ids(&k, &cfg(), &none.0, &none.1), [MRK_NO_DR_REPLICA.id]);
        k.multi_region
            .as_mut()
            .unwrap()
            .replica_regions
            .push("us-west-2".into());
        assert!(ids(&k, &cfg(), &none.0, &none.1).is_empty());

        let mut k = key("k");
        k.grants = Some(vec![GrantRecord {
            grant_id: "g".into(),
            grantee: Some("arn:aws:iam::999988887777:role/partner".into()),
            retiring: None,
            operations: vec!["Decrypt".into()],
        }]);
        assert_eq!(
            ids(&k, &cfg(), &none.0, &none.1),
            [GRANT_FOREIGN_ACCOUNT.id]
        );
    }

    #[test]
    fn use_based_checks_need_cloudtrail_evidence() {
        let mut k = key("k");
        k.state = "PendingDeletion".into();
        k.rotation_enabled = Some(false);
        let recent = Seen {
            last_seen: Some("2026-05-30T00:00:00Z".into()),
            last_used: Some("2026-05-30T00:00:00Z".into()),
        };
        let cov = Coverage::default();
        assert_eq!(ids(&k, &cfg(), &recent, &cov), [UNUSABLE_KEY_IN_USE.id]);
        let old = Seen {
            last_used: Some("2026-01-01T00:00:00Z".into()),
            ..Default::default()
        };
        assert!(ids(&k, &cfg(), &old, &cov).is_empty());

        let k = key("k");
        let long = Coverage {
            from: Some("2025-06-01T00:00:00Z".into()),
            until: Some("2026-06-01T00:00:00Z".into()),
        };
        assert_eq!(ids(&k, &cfg(), &old, &long), [UNUSED_KEY.id]);
        assert_eq!(ids(&k, &cfg(), &Seen::default(), &long), [UNUSED_KEY.id]);
        assert!(ids(&k, &cfg(), &recent, &long).is_empty());
        let short = Coverage {
            from: Some("2026-05-01T00:00:00Z".into()),
            until: Some("2026-06-01T00:00:00Z".into()),
        };
        assert!(
            ids(&k, &cfg(), &old, &short).is_empty(),
            "30 days of trail cannot show 90 idle days"
        );
    }

    #[test]
    fn checks_can_be_disabled_and_ids_are_stable() {
        let mut k = key("k");
        k.tags.clear();
        let off = PostureConfig {
            disabled_checks: vec![MISSING_TAGS.id.into()],
            ..cfg()
        };
        let (s, c) = (Seen::default(), Coverage::default());
        assert!(ids(&k, &off, &s, &c).is_empty());
        let now = 0;
        let a = evaluate(
            &k,
            &cfg(),
            &Context {
                seen: &s,
                coverage: &c,
                now,
            },
        );
        let b = evaluate(
            &k,
            &cfg(),
            &Context {
                seen: &s,
                coverage: &c,
                now,
            },
        );
        assert_eq!(a[0].id, b[0].id);
        assert_eq!(a[0].id, finding_id(MISSING_TAGS.id, &[k.arn.clone()]));
    }

    #[test]
    fn a_refresh_reports_only_new_problems_and_again_after_a_fix() {
        let f = |id: &str| Finding {
            id: id.into(),
            ..Finding::default()
        };
        let (new, w) = news(&BTreeSet::new(), vec![f("a"), f("b")], "t1");
        assert_eq!(new.len(), 2);
        assert_eq!(w.len(), 2);
        let reported: BTreeSet<String> = ["a".to_string(), "b".to_string()].into();
        let (new, w) = news(&reported, vec![f("a"), f("b")], "t2");
        assert!(
            new.is_empty() && w.is_empty(),
            "nothing new, nothing to write"
        );
        let (new, w) = news(&reported, vec![f("b"), f("c")], "t3");
        assert_eq!(new.iter().map(|f| f.id.as_str()).collect::<Vec<_>>(), ["c"]);
        assert_eq!(
            w.iter()
                .map(|w| (
                    String::from_utf8_lossy(&w.key).into_owned(),
                    w.value.is_some()
                ))
                .collect::<Vec<_>>(),
            [
                ("reported/a".to_string(), false),
                ("reported/c".to_string(), true)
            ],
            "a was fixed: forgotten, so it is reported again if it comes back"
        );
    }

    #[test]
    fn config_errors_name_the_key_and_the_fix() {
        let e = PostureConfig::parse("[posture]\nunused_dayz = 3\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unused_dayz") && e.contains("unused_days"),
            "{e}"
        );
        let e = PostureConfig::parse("[posture]\ndisabled_checks = [\"nope\"]\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("disabled_checks") && e.contains(ROTATION_DISABLED.id),
            "{e}"
        );
        let e = PostureConfig::parse("[posture]\nallowed_accounts = [\"12\"]\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("allowed_accounts") && e.contains("12-digit"),
            "{e}"
        );
        let e = PostureConfig::parse("[postur]\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("postur"), "{e}");
        let c = PostureConfig::parse(
            "[posture]\nrequired_tags = [\"owner\"]\ndr_region = \"us-west-2\"\nregions = [\"us-east-1\"]\n",
            "c.toml",
        )
        .unwrap();
        assert_eq!(c.unused_days, 90);
        assert_eq!(c.dr_region.as_deref(), Some("us-west-2"));
        assert_eq!(
            PostureConfig::parse("", "c.toml").unwrap(),
            PostureConfig::default()
        );
    }
}
