//! Automatic remediation through the KMS API: from a finding whose rule carries a
//! remediation hint, a `Plan` (which `Action` on which key, in which mode), then its
//! execution: skip with a reason when a later event recorded for the key settled the
//! change (`history`), read the key's state, skip when it is already fine or out of
//! scope, respect the per-account rate limit and the circuit breaker (`guard`, both
//! persisted), call KMS (retried with capped backoff), read the state again, and report
//! every planned, performed, skipped and failed action as a `kind: "remediation"`
//! finding (`report`).
//!
//! Safety is layered: `[remediation] mode` (off | dry-run | enforce, default dry-run) and
//! a per-rule mode; a scope (accounts, then optionally a tag or listed key ARNs) checked
//! before anything is called; dry-run calls only reads. Keys of other accounts are
//! reached through a configured role per account (STS AssumeRole, in the key's region).
//! The daemon runs the engine as an outbox sink (`outbox::Sink::Remediate`); replay runs
//! it only with `--remediate`, for events newer than `max_event_age_secs`.

use crate::analyze::finding::{
    ActionOutcome, ActionReport, ApiCallReport, Finding, Kind, Severity,
};
use crate::analyze::predicates::policy_text_is_open;
use crate::inventory::{self, format_time, now_secs, parse_time, Inventory};
use crate::store::Store;
use aws_config::SdkConfig;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::operation::RequestId;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

mod config;
mod guard;
pub mod history;
mod report;

pub use config::{Mode, RawRemediation, RemediationConfig, Scope};
pub use report::find_in_jsonl;
use report::remediation_finding;

/// Why no plan could be made for a finding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("remediation is off for rule {0}")]
    Off(String),
    #[error("the finding has no remediation hint")]
    NoHint,
    #[error("unknown remediation hint `{0}`")]
    UnknownHint(String),
    #[error("the finding names no key ARN")]
    NoKey,
    #[error("key {key} is in account {account}, which is not in [remediation] accounts")]
    OutOfScope { key: String, account: String },
    #[error("the event is {age_secs} s old, over [remediation] max_event_age_secs = {max}")]
    TooOld { age_secs: i64, max: u64 },
    #[error("the finding lacks `{0}` in its context (the rule must capture it)")]
    MissingContext(&'static str),
}

/// What to do to a key. A closed set: one variant per remediation hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `cancel-key-deletion`: CancelKeyDeletion, then EnableKey unless the key is known
    /// to have been disabled before.
    CancelKeyDeletion,
    /// `enable-key`.
    EnableKey,
    /// `enable-key-rotation`, keeping a rotation period when one is known.
    EnableKeyRotation { period_days: Option<i32> },
    /// `revoke-grant` of exactly this grant.
    RevokeGrant { grant_id: String },
    /// `restore-key-policy`: the last known-good policy (inventory) or the safe policy.
    RestoreKeyPolicy,
}

impl Action {
    pub fn hint(&self) -> &'static str {
        match self {
            Action::CancelKeyDeletion => "cancel-key-deletion",
            Action::EnableKey => "enable-key",
            Action::EnableKeyRotation { .. } => "enable-key-rotation",
            Action::RevokeGrant { .. } => "revoke-grant",
            Action::RestoreKeyPolicy => "restore-key-policy",
        }
    }
}

/// A remediation decided from a finding, before any API call.
#[derive(Debug, Clone)]
pub struct Plan {
    pub action: Action,
    pub key_arn: String,
    pub account: String,
    pub region: String,
    pub mode: Mode,
}

/// Decides the plan for a finding: pure (no I/O), checks hint, mode, account scope and
/// event age. `now` is Unix seconds.
pub fn plan(cfg: &RemediationConfig, f: &Finding, now: i64) -> Result<Plan, PlanError> {
    let hint = f.remediation.as_deref().ok_or(PlanError::NoHint)?;
    let mode = cfg.mode_for(&f.rule);
    if mode == Mode::Off {
        return Err(PlanError::Off(f.rule.clone()));
    }
    let key_arn = f
        .keys
        .iter()
        .find(|k| inventory::region_of_arn(k).is_some())
        .ok_or(PlanError::NoKey)?
        .clone();
    let region = inventory::region_of_arn(&key_arn)
        .ok_or(PlanError::NoKey)?
        .to_string();
    let account = key_arn.split(':').nth(4).unwrap_or("").to_string();
    if !cfg.scope.accounts.contains(&account) {
        return Err(PlanError::OutOfScope {
            key: key_arn,
            account,
        });
    }
    if let Some(t) = parse_time(&f.time) {
        let age = now - t;
        if age > cfg.max_event_age_secs as i64 {
            return Err(PlanError::TooOld {
                age_secs: age,
                max: cfg.max_event_age_secs,
            });
        }
    }
    let action = match hint {
        "cancel-key-deletion" => Action::CancelKeyDeletion,
        "enable-key" => Action::EnableKey,
        "enable-key-rotation" => Action::EnableKeyRotation {
            period_days: f
                .context
                .get("requestParameters.rotationPeriodInDays")
                .and_then(|v| v.parse().ok()),
        },
        "revoke-grant" => Action::RevokeGrant {
            grant_id: f
                .context
                .get("responseElements.grantId")
                .filter(|g| !g.is_empty())
                .ok_or(PlanError::MissingContext("responseElements.grantId"))?
                .clone(),
        },
        "restore-key-policy" => Action::RestoreKeyPolicy,
        other => return Err(PlanError::UnknownHint(other.to_string())),
    };
    Ok(Plan {
        action,
        key_arn,
        account,
        region,
        mode,
    })
}

/// Runs plans against KMS. Shared by the daemon's sink, replay and `kmsguard remediate`.
pub struct Engine {
    cfg: RemediationConfig,
    sdk: SdkConfig,
    inventory: Option<Inventory>,
    clients: tokio::sync::Mutex<HashMap<(String, String), aws_sdk_kms::Client>>,
    /// Rate limit and circuit breaker, kept in the store tree `remediation`.
    guards: guard::Guards,
    /// The store tree `remediation`: also the key events and policy snapshots
    /// (`history`); None without a store.
    tree: Option<sled::Tree>,
    metrics: Option<Arc<crate::telemetry::Metrics>>,
    /// When the daemon's sink first saw each waiting finding (for `confirm_grace`).
    first_seen: Mutex<HashMap<String, Instant>>,
}

/// The store tree of remediation: rate limit, breaker, key events, policy snapshots.
pub const TREE: &str = "remediation";

/// What the reads say about a key.
type State = BTreeMap<String, String>;

/// What was known of a key before the triggering event, each fact with its source.
struct Prior {
    /// The key state (`Enabled`, `Disabled`, ...).
    state: Option<(String, String)>,
    /// The automatic rotation period in days.
    rotation_period: Option<(i32, String)>,
}

/// A failed call: the error text for the report.
#[derive(Debug)]
struct CallFailed(String);

impl Engine {
    /// An engine; `store` gives the key inventory's cached records (known-good policy,
    /// rotation period, state before a deletion was scheduled).
    pub fn new(cfg: RemediationConfig, sdk: SdkConfig, store: Option<Store>) -> Engine {
        let tree = store.as_ref().and_then(|s| s.tree(TREE).ok());
        Engine {
            cfg,
            inventory: store.map(|s| Inventory::new(s, None, Default::default())),
            sdk,
            clients: tokio::sync::Mutex::new(HashMap::new()),
            // Actions taken and a breaker opened before a restart still count.
            guards: guard::Guards::load(tree.clone()),
            tree,
            metrics: None,
            first_seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts outcomes and the breaker's state in the daemon's metrics.
    pub fn with_metrics(mut self, m: Arc<crate::telemetry::Metrics>) -> Engine {
        m.remediation_enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(until) = self.guards.breaker_until(self.cfg.breaker_cooldown) {
            m.remediation_breaker_until
                .store(until, std::sync::atomic::Ordering::Relaxed);
        }
        self.metrics = Some(m);
        self
    }

    /// Whether a finding has waited `confirm_grace` since the daemon's sink first saw it
    /// (later events may settle it meanwhile); the wait starts again after a restart.
    pub fn due(&self, f: &Finding) -> bool {
        if self.cfg.confirm_grace.is_zero() || !self.accepts(f) {
            return true;
        }
        let mut seen = self.first_seen.lock().unwrap_or_else(|e| e.into_inner());
        let first = *seen.entry(f.id.clone()).or_insert_with(Instant::now);
        first.elapsed() >= self.cfg.confirm_grace
    }

    pub fn config(&self) -> &RemediationConfig {
        &self.cfg
    }

    /// Whether the engine wants this finding: a rule finding with a remediation hint
    /// whose rule is not `off`.
    pub fn accepts(&self, f: &Finding) -> bool {
        f.kind == Kind::Rule && f.remediation.is_some() && self.cfg.mode_for(&f.rule) != Mode::Off
    }

    /// The KMS client for a key's account and region: through the account's role when
    /// one is configured (credentials from STS AssumeRole, refreshed by the SDK).
    async fn client(&self, account: &str, region: &str) -> aws_sdk_kms::Client {
        let mut clients = self.clients.lock().await;
        if let Some(c) = clients.get(&(account.to_string(), region.to_string())) {
            return c.clone();
        }
        let role = self.cfg.roles.get(account).map(String::as_str);
        let c = crate::aws::kms_client_as(&self.sdk, region, role, "kmsguard-remediate").await;
        clients.insert((account.to_string(), region.to_string()), c.clone());
        c
    }

    /// Runs one KMS call with retries, filling `report` (attempts, request id, error).
    async fn call<T, E, F, Fut>(&self, report: &mut ApiCallReport, f: F) -> Result<T, CallFailed>
    where
        T: RequestId,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, aws_sdk_kms::config::http::HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        report.sent = true;
        let mut attempts = 0;
        let r = inventory::retry(&self.cfg.backoff, |_| true, |_| attempts += 1, f).await;
        report.attempts = attempts;
        match r {
            Ok(out) => {
                report.request_id = out.request_id().map(str::to_string);
                Ok(out)
            }
            Err(e) => {
                report.request_id = e.request_id().map(str::to_string);
                let text = match (&e, e.code()) {
                    (SdkError::ServiceError(_), Some(code)) => {
                        format!("{code}: {}", e.message().unwrap_or(""))
                    }
                    _ => error_chain(&e),
                };
                report.error = Some(text.clone());
                Err(CallFailed(text))
            }
        }
    }

    /// Plans and (by mode) carries out the remediation of `f`; returns the remediation
    /// finding, and a health finding when this failure opened the circuit breaker.
    /// Findings the engine does not accept give nothing.
    pub async fn handle(&self, f: &Finding) -> Vec<Finding> {
        if !self.accepts(f) {
            return Vec::new();
        }
        self.handle_with_mode(f, None).await
    }

    /// `handle`, with the mode forced (e.g. dry-run for `kmsguard remediate --dry-run`).
    pub async fn handle_with_mode(&self, f: &Finding, force: Option<Mode>) -> Vec<Finding> {
        let out = self.run(f, force).await;
        self.first_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&f.id);
        if let (Some(m), Some(a)) = (&self.metrics, out.first().and_then(|r| r.action.as_ref())) {
            m.remediation(&a.action, a.outcome.as_str());
        }
        out
    }

    async fn run(&self, f: &Finding, force: Option<Mode>) -> Vec<Finding> {
        let hint = f.remediation.clone().unwrap_or_default();
        let mut report = ActionReport {
            trigger: f.id.clone(),
            trigger_rule: f.rule.clone(),
            action: hint,
            mode: force.unwrap_or(self.cfg.mode_for(&f.rule)).as_str().into(),
            outcome: ActionOutcome::Skipped,
            reason: None,
            calls: Vec::new(),
            reads: Vec::new(),
            before: State::new(),
            after: State::new(),
            elapsed_ms: None,
        };
        let mut p = match plan(&self.cfg, f, now_secs()) {
            Ok(p) => p,
            Err(e) => {
                report.reason = Some(e.to_string());
                return vec![remediation_finding(f, report)];
            }
        };
        if let Some(m) = force {
            p.mode = m;
        }
        let mut out = Vec::new();
        // A later event (a revert, the confirmation tag, the same change again) settles
        // it before anything is read or called.
        if let Some(reason) = self.settled(f, &p, &mut report) {
            report.reason = Some(reason);
            return vec![remediation_finding(f, report)];
        }
        let outcome = self.execute(f, &p, &mut report).await;
        let failed = outcome == ActionOutcome::Failed;
        report.outcome = outcome;
        // Enforce-mode actions that ran count for the breaker: a failure (of the reads
        // too: a role that cannot be assumed fails there) or a success that resets it.
        let counted = matches!(outcome, ActionOutcome::Failed | ActionOutcome::Performed);
        if p.mode == Mode::Enforce && counted {
            let opened = self
                .guards
                .record(failed, self.cfg.breaker_failures, now_secs());
            if opened {
                if let (Some(m), Some(until)) = (
                    &self.metrics,
                    self.guards.breaker_until(self.cfg.breaker_cooldown),
                ) {
                    m.remediation_breaker_until
                        .store(until, std::sync::atomic::Ordering::Relaxed);
                }
                out.push(crate::daemon::health(
                    "health-remediation-breaker",
                    Severity::High,
                    &format!("remediation-breaker/{}", format_time(now_secs())),
                    format!(
                        "automatic remediation stopped for {} s after {} consecutive failed actions (last: {} on {}: {}); check the daemon's KMS permissions and [remediation] roles",
                        self.cfg.breaker_cooldown.as_secs(),
                        self.cfg.breaker_failures,
                        p.action.hint(),
                        p.key_arn,
                        report.reason.as_deref().unwrap_or("?")
                    ),
                ));
            }
        }
        out.insert(0, remediation_finding(f, report));
        out
    }

    /// The skip reason when a later event recorded for the key settles the plan (see
    /// `history::resolution`); the event is named in `before` too.
    fn settled(&self, f: &Finding, p: &Plan, report: &mut ActionReport) -> Option<String> {
        let tree = self.tree.as_ref()?;
        let trigger = f.event_ids.first()?;
        let events = history::load(tree, &p.key_arn);
        let (how, e) = history::resolution(&self.cfg, &p.action, trigger, &f.time, &events)?;
        report
            .before
            .insert("later_event".into(), e.event_id.clone());
        report
            .before
            .insert("later_event_name".into(), e.event_name.clone());
        if let Some(who) = &e.principal {
            report
                .before
                .insert("later_event_principal".into(), who.clone());
        }
        Some(how.reason(e, &self.cfg))
    }

    /// Reads, decides, and in enforce mode acts; fills `report`.
    async fn execute(&self, f: &Finding, p: &Plan, report: &mut ActionReport) -> ActionOutcome {
        let started = Instant::now();
        let client = self.client(&p.account, &p.region).await;
        // The key id, not the ARN: key ids are unique, the client is in the key's account
        // and region, and some emulators (moto) accept only ids on the changing calls.
        let key = inventory::key_id_of_arn(&p.key_arn);
        let skip = |report: &mut ActionReport, why: String| {
            report.reason = Some(why);
            ActionOutcome::Skipped
        };
        let fail = |report: &mut ActionReport, why: String| {
            report.reason = Some(why);
            ActionOutcome::Failed
        };

        if let Some(role) = self.cfg.roles.get(&p.account) {
            report.before.insert("via_role".into(), role.clone());
        }
        // Read first: what the key is now.
        let before = match self.read_state(&client, p, &mut report.reads).await {
            Ok(s) => s,
            Err(e) => {
                let how = report
                    .reads
                    .last()
                    .map(|r| format!(" ({} failed after {} attempt(s))", r.operation, r.attempts))
                    .unwrap_or_default();
                return fail(report, format!("cannot read the key's state{how}: {}", e.0));
            }
        };
        report.before.extend(before.clone());
        if before.get("key_manager").map(String::as_str) == Some("AWS") {
            return skip(
                report,
                "an AWS-managed key: KMS manages it, kmsguard does not".into(),
            );
        }
        // Scope beyond the account: a listed ARN, or the required tag.
        let listed = self.cfg.scope.key_arns.contains(&p.key_arn);
        if !listed {
            if let Some((tk, tv)) = &self.cfg.scope.require_tag {
                let mut r = read_call("ListResourceTags", key);
                let tags = self
                    .call(&mut r, || {
                        client.list_resource_tags().key_id(key).limit(50).send()
                    })
                    .await;
                report.reads.push(r);
                match tags {
                    Ok(t) => {
                        if !t
                            .tags()
                            .iter()
                            .any(|t| t.tag_key() == tk && t.tag_value() == tv)
                        {
                            return skip(
                                report,
                                format!("out of scope: the key is not tagged {tk}={tv} nor listed in [remediation] key_arns"),
                            );
                        }
                    }
                    Err(e) => return fail(report, format!("cannot read the key's tags: {}", e.0)),
                }
            } else if !self.cfg.scope.key_arns.is_empty() {
                return skip(
                    report,
                    "out of scope: the key is not listed in [remediation] key_arns".into(),
                );
            }
        }
        // The key's current record and the one it replaced (newest first).
        let records = self
            .inventory
            .as_ref()
            .and_then(|i| i.records(&p.key_arn).ok())
            .unwrap_or_default();
        let state = before.get("key_state").cloned().unwrap_or_default();
        let prior = self.prior(f, p, &records);

        // Decide the calls.
        let mut calls: Vec<ApiCallReport> = Vec::new();
        let mut new_policy = None;
        match &p.action {
            Action::CancelKeyDeletion => {
                if state != "PendingDeletion" {
                    return skip(report, format!("already fine: the key is {state}, not pending deletion"));
                }
                calls.push(change_call("CancelKeyDeletion", key, &[]));
                // CancelKeyDeletion leaves the key Disabled; enable it only when it is
                // known to have been Enabled before the deletion was scheduled.
                let (was, source) = match prior.state {
                    Some((st, source)) => (st, source),
                    None => ("unknown".to_string(), "none: no inventory record read before the event and no earlier CreateKey, EnableKey, DisableKey or CancelKeyDeletion event recorded; the key is left Disabled (enable it with `aws kms enable-key` if it was in use)".to_string()),
                };
                report.before.insert("state_before_event".into(), was.clone());
                report.before.insert("state_before_source".into(), source);
                if was == "Enabled" {
                    calls.push(change_call("EnableKey", key, &[]));
                }
            }
            Action::EnableKey => match state.as_str() {
                "Disabled" => calls.push(change_call("EnableKey", key, &[])),
                "Enabled" => return skip(report, "already fine: the key is enabled".into()),
                other => {
                    return skip(report, format!("the key is {other}: EnableKey does not apply (a pending deletion is handled by cancel-key-deletion)"))
                }
            },
            Action::EnableKeyRotation { period_days } => {
                if before.get("rotation_enabled").map(String::as_str) == Some("true") {
                    return skip(report, "already fine: automatic rotation is enabled".into());
                }
                let period = match (period_days, prior.rotation_period) {
                    (Some(d), _) => Some((*d, "the event's requestParameters.rotationPeriodInDays".to_string())),
                    (None, known) => known,
                };
                let (period, source) = match period {
                    Some((d, source)) => (Some(d), source),
                    None => (None, "none: no inventory record read before the event shows a period and no earlier EnableKeyRotation event set one; KMS applies its default (365 days)".to_string()),
                };
                report.before.insert(
                    "rotation_period_before_event".into(),
                    period.map_or("unknown".into(), |d| d.to_string()),
                );
                report.before.insert("rotation_period_source".into(), source);
                let mut params = Vec::new();
                let text;
                if let Some(d) = period {
                    text = d.to_string();
                    params.push(("rotationPeriodInDays", text.as_str()));
                }
                calls.push(change_call("EnableKeyRotation", key, &params));
            }
            Action::RevokeGrant { grant_id } => {
                if before.get("grant_present").map(String::as_str) != Some("true") {
                    return skip(report, format!("already fine: grant {grant_id} no longer exists"));
                }
                calls.push(change_call("RevokeGrant", key, &[("grantId", grant_id)]));
            }
            Action::RestoreKeyPolicy => {
                if before.get("policy_open").map(String::as_str) == Some("false") {
                    return skip(report, "already fine: the current policy allows neither anyone nor another account".into());
                }
                // The newest closed policy seen: the inventory's (read through the API)
                // or one from a PutKeyPolicy/CreateKey event.
                let closed = |pol: &String| policy_text_is_open(pol, &p.account) == Some(false);
                let from_api = records
                    .iter()
                    .filter_map(|r| r.policy.clone().map(|pol| (r.refreshed_at.clone(), pol, format!("inventory snapshot of {}", r.refreshed_at))))
                    .find(|(_, pol, _)| closed(pol));
                let from_event = self
                    .tree
                    .as_ref()
                    .and_then(|t| history::snapshot(t, &p.key_arn))
                    .map(|s| (s.time.clone(), s.policy, format!("event snapshot: {} {} at {}", s.event_name, s.event_id, s.time)))
                    .filter(|(_, pol, _)| closed(pol));
                let known = match (from_api, from_event) {
                    (Some(a), Some(e)) => Some(if e.0 > a.0 { e } else { a }),
                    (a, e) => a.or(e),
                }
                .map(|(_, pol, source)| (pol, source));
                let safe = self
                    .cfg
                    .safe_policy
                    .as_ref()
                    .map(|t| (t.replace("{account}", &p.account), "[remediation] safe_policy_file".to_string()))
                    .filter(|(pol, _)| policy_text_is_open(pol, &p.account) == Some(false));
                let Some((policy, source)) = known.or(safe) else {
                    return skip(report, "no known-good policy: neither the inventory nor a PutKeyPolicy/CreateKey event gave a closed policy of this key, and no [remediation] safe_policy_file is set".into());
                };
                report.before.insert("restore_from".into(), source);
                calls.push(change_call("PutKeyPolicy", key, &[("policyName", "default"), ("bypassPolicyLockoutSafetyCheck", "false")]));
                new_policy = Some(policy);
            }
        }

        if p.mode != Mode::Enforce {
            report.calls = calls;
            report.reason = Some("dry-run: nothing that changes state was called".into());
            return ActionOutcome::Planned;
        }
        if self
            .guards
            .breaker_open(now_secs(), self.cfg.breaker_cooldown)
        {
            report.calls = calls;
            return skip(
                report,
                "circuit breaker open after repeated failures (see the health finding)".into(),
            );
        }
        if !self
            .guards
            .take_slot(&p.account, now_secs(), self.cfg.max_actions_per_hour)
        {
            report.calls = calls;
            return skip(
                report,
                format!("rate limit: {} actions in the last hour in account {} ([remediation] max_actions_per_hour)", self.cfg.max_actions_per_hour, p.account),
            );
        }

        // Act, in order; stop at the first failure.
        let mut failure = None;
        for c in calls.iter_mut() {
            if failure.is_some() {
                break;
            }
            let r = match c.operation.as_str() {
                "CancelKeyDeletion" => self
                    .call(c, || client.cancel_key_deletion().key_id(key).send())
                    .await
                    .map(drop),
                "EnableKey" => self
                    .call(c, || client.enable_key().key_id(key).send())
                    .await
                    .map(drop),
                "EnableKeyRotation" => {
                    let period = c
                        .params
                        .get("rotationPeriodInDays")
                        .and_then(|d| d.parse::<i32>().ok());
                    self.call(c, || {
                        client
                            .enable_key_rotation()
                            .key_id(key)
                            .set_rotation_period_in_days(period)
                            .send()
                    })
                    .await
                    .map(drop)
                }
                "RevokeGrant" => {
                    let g = c.params.get("grantId").cloned().unwrap_or_default();
                    self.call(c, || client.revoke_grant().key_id(key).grant_id(&g).send())
                        .await
                        .map(drop)
                }
                "PutKeyPolicy" => {
                    let pol = new_policy.clone().unwrap_or_default();
                    // bypassPolicyLockoutSafetyCheck stays false: KMS refuses a policy
                    // that would lock the caller out.
                    self.call(c, || {
                        client
                            .put_key_policy()
                            .key_id(key)
                            .policy_name("default")
                            .policy(&pol)
                            .bypass_policy_lockout_safety_check(false)
                            .send()
                    })
                    .await
                    .map(drop)
                }
                other => Err(CallFailed(format!("no such call {other}"))),
            };
            if let Err(e) = r {
                failure = Some(format!(
                    "{} failed after {} attempt(s): {}",
                    c.operation, c.attempts, e.0
                ));
            }
        }
        report.elapsed_ms = Some(started.elapsed().as_millis() as u64);
        report.calls = calls;
        // Read again: the state after.
        let mut reads = Vec::new();
        if let Ok(after) = self.read_state(&client, p, &mut reads).await {
            report.after = after;
        }
        report.reads.extend(reads);
        match failure {
            Some(why) => fail(report, why),
            None => ActionOutcome::Performed,
        }
    }

    /// What kmsguard knows of the key before the triggering event: the newer of the
    /// key inventory's newest record read at or before the event's time (of the current
    /// record and the one it replaced, `records`; in the daemon, what `[inventory]
    /// refresh` and its re-reads stored) and the newest earlier event recorded for the
    /// key (`history`). Each fact comes with a description of its source.
    fn prior(&self, f: &Finding, p: &Plan, records: &[inventory::KeyRecord]) -> Prior {
        let event_time = parse_time(&f.time);
        // A record read after the event shows the state after it, not before.
        let cached = records
            .iter()
            .filter(|r| {
                matches!((parse_time(&r.refreshed_at), event_time), (Some(r), Some(e)) if r <= e)
            })
            .max_by_key(|r| parse_time(&r.refreshed_at));
        let events = self
            .tree
            .as_ref()
            .map(|t| history::load(t, &p.key_arn))
            .unwrap_or_default();
        let trigger = f.event_ids.first().map(String::as_str).unwrap_or("");
        let from_record = |r: &inventory::KeyRecord| {
            (
                parse_time(&r.refreshed_at).unwrap_or(i64::MIN),
                format!("inventory record read {}", r.refreshed_at),
            )
        };
        let from_event = |e: &history::KeyEvent| {
            (
                parse_time(&e.time).unwrap_or(i64::MIN),
                format!("event {} {} at {}", e.event_name, e.event_id, e.time),
            )
        };
        // The newer of two dated facts; an event wins a tie (it is a recorded change).
        fn newer<T>(
            a: Option<(i64, T, String)>,
            b: Option<(i64, T, String)>,
        ) -> Option<(T, String)> {
            match (a, b) {
                (Some(a), Some(b)) => Some(if a.0 > b.0 { (a.1, a.2) } else { (b.1, b.2) }),
                (a, b) => a.or(b).map(|x| (x.1, x.2)),
            }
        }
        let state = newer(
            cached
                .filter(|r| !r.state.starts_with("Pending") && !r.state.is_empty())
                .map(|r| {
                    let (t, s) = from_record(r);
                    (t, r.state.clone(), s)
                }),
            history::state_before(trigger, &f.time, &events).and_then(|e| {
                let (t, s) = from_event(e);
                Some((t, e.state_after.clone()?, s))
            }),
        );
        let rotation_period = newer(
            cached
                .filter(|r| r.rotation_enabled == Some(true))
                .and_then(|r| {
                    let (t, s) = from_record(r);
                    Some((t, r.rotation_period_days?, s))
                }),
            history::rotation_period_before(trigger, &f.time, &events).and_then(|e| {
                let (t, s) = from_event(e);
                Some((t, e.rotation_period_days?, s))
            }),
        );
        Prior {
            state,
            rotation_period,
        }
    }

    /// DescribeKey plus what the action needs (rotation status, the grant, the policy).
    async fn read_state(
        &self,
        client: &aws_sdk_kms::Client,
        p: &Plan,
        reads: &mut Vec<ApiCallReport>,
    ) -> Result<State, CallFailed> {
        let key = inventory::key_id_of_arn(&p.key_arn);
        let mut s = State::new();
        let mut r = read_call("DescribeKey", key);
        let d = self
            .call(&mut r, || client.describe_key().key_id(key).send())
            .await;
        reads.push(r);
        let d = d?;
        if let Some(m) = d.key_metadata() {
            if let Some(st) = m.key_state() {
                s.insert("key_state".into(), st.as_str().into());
            }
            if let Some(km) = m.key_manager() {
                s.insert("key_manager".into(), km.as_str().into());
            }
            if let Some(dd) = m.deletion_date() {
                s.insert("deletion_date".into(), format_time(dd.secs()));
            }
        }
        match &p.action {
            Action::EnableKeyRotation { .. } => {
                let mut r = read_call("GetKeyRotationStatus", key);
                let g = self
                    .call(&mut r, || {
                        client.get_key_rotation_status().key_id(key).send()
                    })
                    .await;
                reads.push(r);
                let g = g?;
                s.insert(
                    "rotation_enabled".into(),
                    g.key_rotation_enabled().to_string(),
                );
                if let Some(d) = g.rotation_period_in_days() {
                    s.insert("rotation_period_days".into(), d.to_string());
                }
            }
            Action::RevokeGrant { grant_id } => {
                let mut present = false;
                let mut marker: Option<String> = None;
                loop {
                    let mut r = read_call("ListGrants", key);
                    let m = marker.clone();
                    let page = self
                        .call(&mut r, || {
                            client
                                .list_grants()
                                .key_id(key)
                                .limit(100)
                                .set_marker(m.clone())
                                .send()
                        })
                        .await;
                    reads.push(r);
                    let page = page?;
                    present |= page
                        .grants()
                        .iter()
                        .any(|g| g.grant_id() == Some(grant_id.as_str()));
                    match (page.truncated(), page.next_marker()) {
                        (true, Some(n)) if !present && Some(n) != marker.as_deref() => {
                            marker = Some(n.to_string())
                        }
                        _ => break,
                    }
                }
                s.insert("grant_present".into(), present.to_string());
            }
            Action::RestoreKeyPolicy => {
                let mut r = read_call("GetKeyPolicy", key);
                let g = self
                    .call(&mut r, || {
                        client
                            .get_key_policy()
                            .key_id(key)
                            .policy_name("default")
                            .send()
                    })
                    .await;
                reads.push(r);
                let g = g?;
                let open = g.policy().and_then(|t| policy_text_is_open(t, &p.account));
                s.insert(
                    "policy_open".into(),
                    open.map_or("unknown".into(), |o| o.to_string()),
                );
            }
            Action::CancelKeyDeletion | Action::EnableKey => {}
        }
        Ok(s)
    }
}

fn read_call(op: &str, key: &str) -> ApiCallReport {
    change_call(op, key, &[])
}

fn change_call(op: &str, key: &str, params: &[(&str, &str)]) -> ApiCallReport {
    let mut p: BTreeMap<String, String> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    p.insert("keyId".into(), key.to_string());
    ApiCallReport {
        operation: op.to_string(),
        params: p,
        sent: false,
        request_id: None,
        error: None,
        attempts: 0,
    }
}

/// An error and its sources, one line (for errors without an AWS error code).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        src = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    use super::config::tests::cfg;

    fn finding(rule: &str, hint: &str, key: &str) -> Finding {
        Finding {
            id: "f1".into(),
            kind: Kind::Rule,
            rule: rule.into(),
            severity: Severity::High,
            title: String::new(),
            summary: String::new(),
            event_ids: vec!["e1".into()],
            event_name: String::new(),
            event_source: String::new(),
            time: format_time(now_secs() - 60),
            principal: None,
            principal_role: None,
            account: None,
            region: None,
            keys: vec![key.into()],
            source_ip: None,
            user_agent: None,
            error_code: None,
            file: String::new(),
            remediation: Some(hint.into()),
            key_alias: None,
            key_tags: Default::default(),
            context: Default::default(),
            action: None,
            pending: Default::default(),
            count: 1,
            first_time: String::new(),
            last_time: String::new(),
        }
    }

    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";

    #[test]
    fn plans_respect_mode_scope_age_and_context() {
        let c = cfg("mode = \"enforce\"\naccounts = [\"111122223333\"]\n[rules]\nkms-rotation-disabled = \"off\"\n").unwrap();
        let now = now_secs();
        let p = plan(&c, &finding("kms-key-disabled", "enable-key", KEY), now).unwrap();
        assert_eq!(
            (p.action, p.mode, p.region.as_str()),
            (Action::EnableKey, Mode::Enforce, "us-east-1")
        );
        assert_eq!(
            plan(
                &c,
                &finding("kms-rotation-disabled", "enable-key-rotation", KEY),
                now
            )
            .unwrap_err(),
            PlanError::Off("kms-rotation-disabled".into())
        );
        let foreign = "arn:aws:kms:us-east-1:999988887777:key/k1";
        assert!(matches!(
            plan(&c, &finding("kms-key-disabled", "enable-key", foreign), now),
            Err(PlanError::OutOfScope { .. })
        ));
        let mut old = finding("kms-key-disabled", "enable-key", KEY);
        old.time = "2020-01-01T00:00:00Z".into();
        assert!(matches!(plan(&c, &old, now), Err(PlanError::TooOld { .. })));
        let mut g = finding("kms-grant-cross-account", "revoke-grant", KEY);
        assert_eq!(
            plan(&c, &g, now).unwrap_err(),
            PlanError::MissingContext("responseElements.grantId")
        );
        g.context
            .insert("responseElements.grantId".into(), "abc".into());
        assert_eq!(
            plan(&c, &g, now).unwrap().action,
            Action::RevokeGrant {
                grant_id: "abc".into()
            }
        );
    }
}
