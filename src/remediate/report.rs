//! The accountability side of remediation: the `kind: "remediation"` finding that
//! reports a planned, performed, skipped or failed action about its trigger, and
//! `find_in_jsonl`, which finds a daemon's finding by id for `kmsguard remediate`.

use crate::analyze::finding::{finding_id, ActionOutcome, ActionReport, Finding, Kind, Severity};
use crate::inventory::{format_time, now_secs};
use std::collections::BTreeMap;

/// The `kind: "remediation"` finding for a report about trigger `f`.
pub(super) fn remediation_finding(f: &Finding, report: ActionReport) -> Finding {
    let severity = match report.outcome {
        ActionOutcome::Planned => Severity::Info,
        ActionOutcome::Skipped => Severity::Low,
        ActionOutcome::Performed => Severity::Medium,
        ActionOutcome::Failed => Severity::High,
    };
    let outcome = report.outcome.as_str();
    let key = f.keys.first().map_or("no key", String::as_str);
    let calls: Vec<&str> = report.calls.iter().map(|c| c.operation.as_str()).collect();
    let summary = format!(
        "{outcome} {} on {key} for {} ({}){}",
        report.action,
        f.rule,
        if calls.is_empty() {
            "no calls".to_string()
        } else {
            calls.join(" + ")
        },
        report
            .reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    let rule = format!(
        "remediation-{}",
        if report.action.is_empty() {
            "none"
        } else {
            &report.action
        }
    );
    let mut out = Finding {
        id: finding_id(&rule, std::slice::from_ref(&f.id)),
        kind: Kind::Remediation,
        rule,
        severity,
        title: format!("Automatic remediation {outcome}"),
        summary: crate::analyze::rule::clean(&summary, 600).collect(),
        event_ids: f.event_ids.clone(),
        event_name: f.event_name.clone(),
        event_source: f.event_source.clone(),
        time: format_time(now_secs()),
        principal: f.principal.clone(),
        principal_role: f.principal_role.clone(),
        account: f.account.clone(),
        region: f.region.clone(),
        keys: f.keys.clone(),
        source_ip: f.source_ip.clone(),
        user_agent: f.user_agent.clone(),
        error_code: None,
        file: f.file.clone(),
        remediation: None,
        key_alias: f.key_alias.clone(),
        key_tags: f.key_tags.clone(),
        pending: Default::default(),
        context: BTreeMap::from([("trigger".to_string(), f.id.clone())]),
        action: Some(report),
        ..Finding::default()
    };
    out.settle_counts();
    out
}

/// Finds the newest finding with `id` in JSON Lines files (the daemon's file sinks).
pub fn find_in_jsonl(paths: &[std::path::PathBuf], id: &str) -> std::io::Result<Option<Finding>> {
    use std::io::BufRead;
    let mut found = None;
    for p in paths {
        let file = match std::fs::File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in std::io::BufReader::new(file).lines() {
            let line = line?;
            if !line.contains(id) {
                continue;
            }
            if let Ok(f) = serde_json::from_str::<Finding>(&line) {
                if f.id == id {
                    found = Some(f);
                }
            }
        }
    }
    Ok(found)
}
