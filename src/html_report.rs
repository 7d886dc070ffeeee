//! `replay --report FILE.html`: one self-contained HTML page (inline CSS, JS and SVG; no
//! network) with a timeline of KMS activity per hour by operation, the findings marked on
//! it, per-principal, per-key and principal×key tables, and a filter by principal, key and
//! rule. Everything from the logs is attacker-controlled: it is embedded only as JSON in a
//! `<script type="application/json">` block with `<`, `>`, `&` and line separators
//! escaped, and the page's script puts it into the DOM with `textContent` and attributes,
//! never as markup.

use crate::analyze::finding::Finding;
use crate::pipeline::ReplayStats;
use crate::timeline::Timeline;
use serde_json::{json, Value};

/// Operations drawn as their own series; the rest are stacked as "other".
const SERIES: usize = 10;
/// Table rows embedded per table (most active first); the page says when more exist.
const MAX_ROWS: usize = 5_000;

/// The page for a replay's timeline, findings and stats.
pub fn render(
    title: &str,
    timeline: &Timeline,
    findings: &[Finding],
    stats: &ReplayStats,
) -> String {
    let data = data(title, timeline, findings, stats);
    let json = script_safe(&data.to_string());
    TEMPLATE
        .replace("{{TITLE}}", &html_escape(title))
        .replace("{{DATA}}", &json)
}

/// The data the page draws, as JSON.
pub fn data(title: &str, timeline: &Timeline, findings: &[Finding], stats: &ReplayStats) -> Value {
    // Hours: contiguous from the first to the last when that is not absurdly long (a
    // forged eventTime could stretch it), else only the hours seen.
    let seen: Vec<i64> = timeline.hours.keys().copied().collect();
    let hours: Vec<i64> = match (seen.first(), seen.last()) {
        (Some(&a), Some(&b)) if (b - a) / 3600 < crate::timeline::MAX_HOURS as i64 => {
            (0..=(b - a) / 3600).map(|i| a + i * 3600).collect()
        }
        _ => seen,
    };
    let mut totals: std::collections::BTreeMap<&str, u64> = Default::default();
    for ops in timeline.hours.values() {
        for (op, n) in ops {
            *totals.entry(op.as_str()).or_default() += n;
        }
    }
    let mut ops: Vec<(&str, u64)> = totals.into_iter().collect();
    ops.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let named: Vec<&str> = ops.iter().take(SERIES).map(|o| o.0).collect();
    let mut series = serde_json::Map::new();
    for op in &named {
        let counts: Vec<u64> = hours
            .iter()
            .map(|h| {
                timeline
                    .hours
                    .get(h)
                    .and_then(|m| m.get(*op))
                    .copied()
                    .unwrap_or(0)
            })
            .collect();
        series.insert((*op).to_string(), json!(counts));
    }
    if ops.len() > SERIES {
        let counts: Vec<u64> = hours
            .iter()
            .map(|h| {
                timeline.hours.get(h).map_or(0, |m| {
                    m.iter()
                        .filter(|(op, _)| !named.contains(&op.as_str()))
                        .map(|(_, n)| n)
                        .sum()
                })
            })
            .collect();
        series.insert("(other)".into(), json!(counts));
    }
    let mut principals: Vec<_> = timeline.principals.iter().collect();
    principals.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    let mut pairs: Vec<_> = timeline.pairs.iter().collect();
    pairs.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
    // Per key: uses, distinct principals, first and last, from the pairs.
    let mut keys: std::collections::BTreeMap<&str, (u64, u64, &str, &str)> = Default::default();
    for ((_, k), u) in &timeline.pairs {
        let e = keys.entry(k.as_str()).or_insert((0, 0, "", ""));
        e.0 += u.count;
        e.1 += 1;
        if e.2.is_empty() || u.first.as_str() < e.2 {
            e.2 = &u.first;
        }
        if u.last.as_str() > e.3 {
            e.3 = &u.last;
        }
    }
    let mut keys: Vec<_> = keys.into_iter().collect();
    keys.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
    let cells = cells(timeline, &hours);
    json!({
        "title": title,
        "stats": stats,
        "events": timeline.events,
        "dropped": {
            "hours": timeline.dropped_hours,
            "pairs": timeline.dropped_pairs,
            "cells": timeline.dropped_cells,
        },
        "hours": hours,
        "series": series,
        "cells": cells,
        "principals": {
            "total": principals.len(),
            "rows": principals.iter().take(MAX_ROWS).map(|(p, u)| json!({
                "principal": p, "count": u.count, "errors": u.errors,
                "keys": timeline.pairs.keys().filter(|(pp, k)| pp == *p && k != "-").count(),
                "first": u.first, "last": u.last,
            })).collect::<Vec<_>>(),
        },
        "keys": {
            "total": keys.len(),
            "rows": keys.iter().take(MAX_ROWS).map(|(k, (n, ps, first, last))| json!({
                "key": k, "count": n, "principals": ps, "first": first, "last": last,
            })).collect::<Vec<_>>(),
        },
        "pairs": {
            "total": pairs.len(),
            "rows": pairs.iter().take(MAX_ROWS).map(|((p, k), u)| json!({
                "principal": p, "key": k, "count": u.count, "errors": u.errors,
                "first": u.first, "last": u.last,
                "sources": u.sources, "user_agents": u.user_agents, "operations": u.operations,
            })).collect::<Vec<_>>(),
        },
        "findings": findings.iter().map(|f| json!({
            "id": f.id, "rule": f.rule, "severity": f.severity.as_str(), "time": f.time,
            "title": f.title, "summary": f.summary,
            "principal": f.principal_role.as_ref().or(f.principal.as_ref()),
            "keys": f.keys,
        })).collect::<Vec<_>>(),
    })
}

/// The timeline's cells for the page's filter: events per (hour, operation, principal,
/// key set) as a flat array of integer quintuples `[hour index, op, principal, key set,
/// events, ...]` over dictionaries of operations, principals, keys and key sets (arrays
/// of key indexes), so the page stays a few MB for a 90-day window.
fn cells(timeline: &Timeline, hours: &[i64]) -> Value {
    use std::collections::HashMap;
    fn intern<'a>(map: &mut HashMap<&'a str, usize>, list: &mut Vec<&'a str>, s: &'a str) -> usize {
        *map.entry(s).or_insert_with(|| {
            list.push(s);
            list.len() - 1
        })
    }
    let hour_index: HashMap<i64, usize> = hours.iter().enumerate().map(|(i, h)| (*h, i)).collect();
    let mut sorted: Vec<_> = timeline.cells.iter().collect();
    sorted.sort_unstable();
    let (mut ops, mut principals, mut keys) = (Vec::new(), Vec::new(), Vec::new());
    let (mut op_ids, mut principal_ids, mut key_ids) =
        (HashMap::new(), HashMap::new(), HashMap::new());
    let mut keysets: Vec<Vec<usize>> = Vec::new();
    let mut keyset_ids: HashMap<u32, usize> = HashMap::new();
    let mut data: Vec<u64> = Vec::with_capacity(sorted.len() * 5);
    for (&(hour, o, p, k), &n) in sorted {
        let Some(&h) = hour_index.get(&hour) else {
            continue;
        };
        let o = intern(&mut op_ids, &mut ops, timeline.names.get(o));
        let p = intern(&mut principal_ids, &mut principals, timeline.names.get(p));
        let ks = match keyset_ids.get(&k) {
            Some(&i) => i,
            None => {
                let set = timeline
                    .names
                    .get(k)
                    .split('\n')
                    .map(|key| intern(&mut key_ids, &mut keys, key))
                    .collect();
                keysets.push(set);
                keyset_ids.insert(k, keysets.len() - 1);
                keysets.len() - 1
            }
        };
        data.extend([h as u64, o as u64, p as u64, ks as u64, n]);
    }
    json!({
        "ops": ops, "principals": principals, "keys": keys, "keysets": keysets, "data": data,
    })
}

/// JSON that cannot end a `<script>` element or open a comment: `<`, `>` and `&` (which
/// only occur inside JSON strings) and U+2028/U+2029 become escapes.
pub fn script_safe(json: &str) -> String {
    let mut out = String::with_capacity(json.len() + 64);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const TEMPLATE: &str = include_str!("html/report.html");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_strings_stay_inert() {
        let s = script_safe(
            &json!({"p": "</script><img src=x onerror=alert(1)>&\u{2028}"}).to_string(),
        );
        assert!(!s.contains('<') && !s.contains('>') && !s.contains('&'));
        let back: Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back["p"], "</script><img src=x onerror=alert(1)>&\u{2028}");
        assert_eq!(
            html_escape("<a href='x'>&"),
            "&lt;a href=&#39;x&#39;&gt;&amp;"
        );
        let page = render("<t>", &Timeline::default(), &[], &ReplayStats::default());
        assert!(page.contains("&lt;t&gt;") && !page.contains("{{DATA}}"));
        for remote in [
            "<link",
            " src=",
            "@import",
            "url(",
            "fetch(",
            "XMLHttpRequest",
        ] {
            assert!(!page.contains(remote), "no network: {remote}");
        }
    }
}
