//! rules.toml: parsing (every bad rule reported by id and line, not just the first),
//! compiling into `Rule`s indexed by event source and name, evaluating them on events,
//! and running each rule's inline tests. The format is documented in `docs/rules.md`.

use crate::analyze::finding::{finding_id, Finding, Kind, Severity};
use crate::analyze::fold::{FoldBy, FoldPolicy, Policies};
use crate::analyze::matcher::{KeyFacts, Matcher, RawCond};
use crate::event::{Event, Value, KMS_SOURCE};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The rules shipped in the repository, compiled into the binary.
pub const BUILTIN_RULES: &str = include_str!("../../rules.toml");

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error(
        "cannot read rules file {path}: {source} (check the path given to --rules or [rules] path)"
    )]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin} has {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        origin: String,
        problems: Vec<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    rule: Vec<toml::Spanned<toml::Value>>,
    #[serde(default)]
    suppress: Vec<toml::Spanned<toml::Value>>,
}

/// A file-level suppression: known-good activity that must not raise the listed rules.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSuppression {
    /// Rule ids, or `["*"]` for every rule.
    rules: Vec<String>,
    /// Why this is known-good (shown by `rules list`, required so suppressions stay
    /// reviewable).
    reason: String,
    #[serde(rename = "match")]
    match_: RawCond,
}

#[derive(Debug, Clone)]
pub struct Suppression {
    pub rules: Vec<String>,
    pub reason: String,
    pub line: usize,
    pub origin: String,
    matcher: Matcher,
}

impl Suppression {
    fn covers(&self, rule: &str) -> bool {
        self.rules.iter().any(|r| r == "*" || r == rule)
    }
}

/// A rule's severity raised when a condition holds (`escalate = [{ severity, when }]`).
#[derive(Debug, Clone)]
pub struct Escalation {
    pub severity: Severity,
    when: Matcher,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEscalation {
    severity: String,
    when: RawCond,
}

/// One key condition left for later (see `Finding::pending`).
#[derive(Debug, Clone)]
enum Deferred {
    /// The rule's `match`: the finding stands only if it holds.
    Require(Matcher),
    /// A rule `suppress` or a `[[suppress]]`: the finding is dropped if it holds.
    Suppress(Matcher),
    /// An `escalate` entry: the severity is raised if it holds.
    Escalate(Severity, Matcher),
}

/// The key conditions of a finding's rule that its event alone could not decide, with
/// what the event itself said about its key (tags of CreateKey and TagResource, the
/// alias of CreateAlias and UpdateAlias) and what earlier events of the replay said
/// (`carry`): the facts used when the finding was not enriched from the key inventory;
/// and, when it was, every alias of the key (`set_key_aliases`).
#[derive(Debug, Clone, Default)]
pub struct Pending {
    checks: Vec<Deferred>,
    event_tags: BTreeMap<String, String>,
    event_aliases: Vec<String>,
    /// Every alias of the key, from enrichment (`Finding::key_alias` shows one only), so
    /// `key:alias` matches any of them.
    key_aliases: Vec<String>,
}

impl PartialEq for Pending {
    /// Conditions are compared by count only (compiled regexes have no equality).
    fn eq(&self, other: &Pending) -> bool {
        self.checks.len() == other.checks.len()
            && self.event_tags == other.event_tags
            && self.event_aliases == other.event_aliases
            && self.key_aliases == other.key_aliases
    }
}

impl Pending {
    pub fn is_empty(&self) -> bool {
        self.checks.is_empty()
    }

    /// Records every alias of the finding's key, as enrichment read them, for `key:alias`.
    pub fn set_key_aliases(&mut self, aliases: &[String]) {
        if !self.checks.is_empty() {
            self.key_aliases = aliases.to_vec();
        }
    }

    /// Adds what earlier events of the same replay said about the key (tags and
    /// aliases it had then, `analyze::key_facts`) to what the event itself says, which
    /// wins for a tag both name.
    pub fn carry(&mut self, tags: &BTreeMap<String, String>, aliases: &[String]) {
        if self.checks.is_empty() {
            return;
        }
        for (k, v) in tags {
            self.event_tags
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        for a in aliases {
            if !self.event_aliases.contains(a) {
                self.event_aliases.push(a.clone());
            }
        }
    }
}

/// Decides a finding's pending key conditions with the key facts it carries: its
/// `key_tags` and `key_alias` when enrichment set them, else what its event said.
/// Returns false when the finding must be dropped (its `match` fails or a suppression
/// holds); raises its severity for each escalation that holds. Idempotent.
pub fn resolve(f: &mut Finding) -> bool {
    let p = std::mem::take(&mut f.pending);
    if p.checks.is_empty() {
        return true;
    }
    let enriched = !f.key_tags.is_empty() || f.key_alias.is_some();
    let aliases: Vec<String> = if p.key_aliases.is_empty() {
        f.key_alias.iter().cloned().collect()
    } else {
        p.key_aliases.clone()
    };
    let facts = if enriched {
        KeyFacts {
            aliases: &aliases,
            tags: &f.key_tags,
        }
    } else {
        KeyFacts {
            aliases: &p.event_aliases,
            tags: &p.event_tags,
        }
    };
    let mut severity = f.severity;
    for c in &p.checks {
        match c {
            Deferred::Require(m) if !m.resolve(&facts) => return false,
            Deferred::Suppress(m) if m.resolve(&facts) => return false,
            Deferred::Escalate(s, m) if m.resolve(&facts) => severity = severity.max(*s),
            _ => {}
        }
    }
    f.severity = severity;
    true
}

/// `resolve` over many findings, dropping those it rejects.
pub fn resolve_all(findings: &mut Vec<Finding>) {
    findings.retain_mut(resolve);
}

/// What the event itself says about its key: tags set by CreateKey or TagResource
/// (`requestParameters.tags[].tagKey/tagValue`) and the alias named by CreateAlias or
/// UpdateAlias.
fn event_key_facts(ev: &Event<'_>) -> (BTreeMap<String, String>, Vec<String>) {
    let mut tags = BTreeMap::new();
    let mut aliases = Vec::new();
    match ev.event_name() {
        Some("CreateKey" | "TagResource") => {
            if let Some(list) = ev.get(&["requestParameters", "tags"]) {
                for t in list.items() {
                    let text = |k: &str| t.get(k).and_then(Value::as_str).map(str::to_string);
                    if let (Some(k), Some(v)) = (text("tagKey"), text("tagValue")) {
                        tags.insert(k, v);
                    }
                }
            }
        }
        Some("CreateAlias" | "UpdateAlias") => {
            if let Some(a) = ev.str(&["requestParameters", "aliasName"]) {
                aliases.push(a.to_string());
            }
        }
        _ => {}
    }
    (tags, aliases)
}

/// The outcome of a condition on one event: decided, or a residual over key facts.
enum Decided {
    Const(bool),
    Residual(Matcher),
}

fn decide(m: &Matcher, ev: &Event<'_>) -> Decided {
    if !m.uses_key() {
        let none = BTreeMap::new();
        return Decided::Const(m.matches(
            ev,
            &KeyFacts {
                aliases: &[],
                tags: &none,
            },
        ));
    }
    let r = m.partial(ev);
    match r.as_const() {
        Some(b) => Decided::Const(b),
        None => Decided::Residual(r),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    id: String,
    title: String,
    severity: String,
    description: String,
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    event_source: Option<String>,
    #[serde(default)]
    event_names: Vec<String>,
    #[serde(rename = "match", default)]
    match_: Option<RawCond>,
    #[serde(default)]
    suppress: Vec<RawCond>,
    #[serde(default)]
    summary: Option<String>,
    #[serde(default)]
    remediation: Option<String>,
    /// Dotted paths into the event whose values are copied into the finding's `context`
    /// (what a remediation needs, e.g. `responseElements.grantId`).
    #[serde(default)]
    capture: Vec<String>,
    /// Severity raised when a condition holds (typically on key tags).
    #[serde(default)]
    escalate: Vec<RawEscalation>,
    /// What repeated findings fold by: `principal_and_keys` (default) or `principal`.
    #[serde(default)]
    fold_by: Option<String>,
    /// The fold window (`30m`, `1h`, ...; default 1h).
    #[serde(default)]
    fold_window: Option<String>,
    #[serde(default)]
    tests: Vec<RawTest>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTest {
    #[serde(default)]
    name: Option<String>,
    expect: String,
    event: toml::Value,
    /// The key's tags and alias as the inventory would give them (enrichment).
    #[serde(default)]
    key_tags: BTreeMap<String, String>,
    #[serde(default)]
    key_alias: Option<String>,
    /// The finding's expected severity (after escalations), when it matches.
    #[serde(default)]
    severity: Option<String>,
}

/// An inline test of a rule: an event (merged over a default KMS record) and whether the
/// rule must fire on it.
#[derive(Debug, Clone)]
pub struct RuleTest {
    pub name: String,
    pub expect_match: bool,
    pub event: serde_json::Value,
    pub key_tags: BTreeMap<String, String>,
    pub key_alias: Option<String>,
    pub severity: Option<Severity>,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: String,
    pub title: String,
    pub severity: Severity,
    pub description: String,
    pub event_source: String,
    pub event_names: Vec<String>,
    pub line: usize,
    matcher: Option<Matcher>,
    suppress: Vec<Matcher>,
    summary: Option<String>,
    pub remediation: Option<String>,
    /// Dotted paths captured into findings' `context`.
    pub capture: Vec<String>,
    pub escalate: Vec<Escalation>,
    /// How repeated findings of the rule fold into one (`analyze::fold`).
    pub fold: FoldPolicy,
    pub tests: Vec<RuleTest>,
}

impl Rule {
    fn selects(&self, ev: &Event<'_>) -> bool {
        ev.event_source() == Some(self.event_source.as_str())
            && (self.event_names.is_empty()
                || ev
                    .event_name()
                    .is_some_and(|n| self.event_names.iter().any(|x| x == n)))
    }

    /// The finding the rule makes of `ev`, if any, before suppressions of the file
    /// (`suppressions`) and key conditions: what the event decides is decided here; key
    /// conditions it cannot decide are left in `Finding::pending` for `resolve`.
    fn evaluate(
        &self,
        ev: &Event<'_>,
        file: &str,
        suppressions: &[&Suppression],
    ) -> Option<Finding> {
        if !self.selects(ev) {
            return None;
        }
        let mut checks = Vec::new();
        if let Some(m) = &self.matcher {
            match decide(m, ev) {
                Decided::Const(false) => return None,
                Decided::Const(true) => {}
                Decided::Residual(r) => checks.push(Deferred::Require(r)),
            }
        }
        let suppress = self
            .suppress
            .iter()
            .chain(suppressions.iter().map(|s| &s.matcher));
        for m in suppress {
            match decide(m, ev) {
                Decided::Const(true) => return None,
                Decided::Const(false) => {}
                Decided::Residual(r) => checks.push(Deferred::Suppress(r)),
            }
        }
        let mut f = self.finding(ev, file);
        for e in &self.escalate {
            match decide(&e.when, ev) {
                Decided::Const(true) => f.severity = f.severity.max(e.severity),
                Decided::Const(false) => {}
                Decided::Residual(r) => checks.push(Deferred::Escalate(e.severity, r)),
            }
        }
        if !checks.is_empty() {
            let (event_tags, event_aliases) = event_key_facts(ev);
            f.pending = Pending {
                checks,
                event_tags,
                event_aliases,
                key_aliases: Vec::new(),
            };
        }
        Some(f)
    }

    /// True when the rule fires on `ev` (source, name, match, and no suppression of its
    /// own), deciding key conditions with what the event says about its key.
    pub fn fires(&self, ev: &Event<'_>) -> bool {
        self.evaluate(ev, "", &[])
            .is_some_and(|mut f| resolve(&mut f))
    }

    fn finding(&self, ev: &Event<'_>, file: &str) -> Finding {
        let event_ids = vec![event_id_of(ev)];
        let keys = ev.key_arns();
        Finding {
            id: finding_id(&self.id, &event_ids),
            kind: Kind::Rule,
            rule: self.id.clone(),
            severity: self.severity,
            title: self.title.clone(),
            summary: render_summary(self.summary.as_deref(), &self.title, ev, &keys),
            event_ids,
            event_name: ev.event_name().unwrap_or("?").to_string(),
            event_source: ev.event_source().unwrap_or("?").to_string(),
            time: ev.event_time().unwrap_or("").to_string(),
            principal: ev.principal().map(str::to_string),
            principal_role: ev.principal_role().map(str::to_string),
            account: ev.account().map(str::to_string),
            region: ev.region().map(str::to_string),
            keys,
            source_ip: ev.source_ip().map(str::to_string),
            user_agent: ev.user_agent().map(str::to_string),
            error_code: ev.error_code().map(str::to_string),
            file: file.to_string(),
            remediation: self.remediation.clone(),
            key_alias: None,
            key_tags: Default::default(),
            context: self.captured(ev),
            action: None,
            pending: Default::default(),
            count: 1,
            first_time: ev.event_time().unwrap_or("").to_string(),
            last_time: ev.event_time().unwrap_or("").to_string(),
        }
    }
}

impl Rule {
    /// The values at the rule's `capture` paths: strings, numbers and booleans as text
    /// (cut to 256 characters, control characters dropped: they come from the record);
    /// missing paths and objects or arrays are left out.
    pub fn captured(&self, ev: &Event<'_>) -> std::collections::BTreeMap<String, String> {
        let mut out = std::collections::BTreeMap::new();
        for path in &self.capture {
            let segs: Vec<&str> = path.split('.').collect();
            let Some(value) = ev.get(&segs).and_then(|v| v.scalar_text()) else {
                continue;
            };
            out.insert(path.clone(), clean(&value, 256).collect());
        }
        out
    }
}

/// The event's `eventID`, or when a record lacks one a stand-in derived from what
/// identifies it, so that finding ids stay stable.
pub fn event_id_of(ev: &Event<'_>) -> String {
    match ev.event_id() {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            let parts = [
                ev.event_time().unwrap_or(""),
                ev.event_name().unwrap_or(""),
                ev.principal().unwrap_or(""),
                ev.str(&["requestID"]).unwrap_or(""),
            ];
            format!(
                "no-event-id:{}",
                &finding_id("event", &[parts.join("|")])[..16]
            )
        }
    }
}

/// Renders a summary template: `{principal}`, `{key}`, `{keys}`, `{account}`, `{region}`,
/// `{event_name}`, `{source_ip}`, `{user_agent}`, `{error_code}`, or any dotted path
/// into the record. Values from the record are cut to 200 characters and stripped of
/// control characters: they are attacker-controlled.
fn render_summary(template: Option<&str>, title: &str, ev: &Event<'_>, keys: &[String]) -> String {
    let default = "{title}: {event_name} by {principal} on {key}";
    let template = template.unwrap_or(default);
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let name = &after[..close];
        let value: String = match name {
            "title" => title.to_string(),
            "principal" => ev.principal().unwrap_or("an unknown principal").to_string(),
            "key" => keys.first().cloned().unwrap_or_else(|| "no key".into()),
            "keys" => {
                if keys.is_empty() {
                    "no key".into()
                } else {
                    keys.join(", ")
                }
            }
            "account" => ev.account().unwrap_or("?").to_string(),
            "region" => ev.region().unwrap_or("?").to_string(),
            "event_name" => ev.event_name().unwrap_or("?").to_string(),
            "source_ip" => ev.source_ip().unwrap_or("?").to_string(),
            "user_agent" => ev.user_agent().unwrap_or("?").to_string(),
            "error_code" => ev.error_code().unwrap_or("none").to_string(),
            path => {
                let segs: Vec<&str> = path.split('.').collect();
                match ev.get(&segs) {
                    Some(v) if v.is_null() => "null".into(),
                    Some(v) => v.scalar_text().unwrap_or_else(|| "(complex value)".into()),
                    None => "?".into(),
                }
            }
        };
        out.extend(clean(&value, 200));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    out
}

/// Drops control characters and cuts to `max` characters (with an ellipsis).
pub fn clean(s: &str, max: usize) -> impl Iterator<Item = char> + '_ {
    let long = s.chars().count() > max;
    s.chars()
        .filter(|c| !c.is_control())
        .take(max)
        .chain(long.then_some('…'))
}

/// All rules, indexed for evaluation.
#[derive(Debug, Clone)]
pub struct RuleSet {
    pub origin: String,
    rules: Vec<Rule>,
    suppressions: Vec<Suppression>,
    /// (event source, event name) -> rules; rules without names under name "".
    index: HashMap<String, HashMap<String, Vec<usize>>>,
    /// How each rule's (and detector's) findings fold.
    policies: Policies,
}

impl RuleSet {
    pub fn builtin() -> Result<RuleSet, RulesError> {
        RuleSet::parse(BUILTIN_RULES, "built-in rules.toml")
    }

    pub fn load(path: &Path) -> Result<RuleSet, RulesError> {
        let text = std::fs::read_to_string(path).map_err(|source| RulesError::Read {
            path: path.display().to_string(),
            source,
        })?;
        RuleSet::parse(&text, &path.display().to_string())
    }

    /// `--rules FILE` if given, else the built-in rules.
    pub fn load_or_builtin(path: Option<&Path>) -> Result<RuleSet, RulesError> {
        match path {
            Some(p) => RuleSet::load(p),
            None => RuleSet::builtin(),
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<RuleSet, RulesError> {
        let invalid = |problems: Vec<String>| RulesError::Invalid {
            origin: origin.to_string(),
            problems,
        };
        let file: RawFile = toml::from_str(text).map_err(|e| {
            invalid(vec![format!(
                "not valid rules TOML: {}",
                e.to_string().trim_end()
            )])
        })?;
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        for spanned in file.rule {
            let line = line_of(text, spanned.span().start);
            let value = spanned.into_inner();
            let id = value
                .get("id")
                .and_then(|v| v.as_str())
                .unwrap_or("(no id)")
                .to_string();
            match value.try_into::<RawRule>() {
                Err(e) => problems.push(format!(
                    "line {line}: rule `{id}`: {}",
                    e.to_string().trim_end()
                )),
                Ok(raw) => match compile(raw, line) {
                    Ok(rule) => rules.push(rule),
                    Err(errs) => problems.extend(
                        errs.into_iter()
                            .map(|e| format!("line {line}: rule `{id}`: {e}")),
                    ),
                },
            }
        }
        let mut suppressions = Vec::new();
        for spanned in file.suppress {
            let line = line_of(text, spanned.span().start);
            match spanned.into_inner().try_into::<RawSuppression>() {
                Err(e) => problems.push(format!(
                    "line {line}: [[suppress]]: {}",
                    e.to_string().trim_end()
                )),
                Ok(raw) => {
                    if raw.reason.trim().is_empty() {
                        problems.push(format!("line {line}: [[suppress]]: `reason` is empty: say why this activity is known-good"));
                    }
                    if raw.rules.is_empty() {
                        problems.push(format!(
                            "line {line}: [[suppress]]: `rules` is empty: list rule ids, or \"*\""
                        ));
                    }
                    match Matcher::compile(&raw.match_) {
                        Ok(matcher) => suppressions.push(Suppression {
                            rules: raw.rules,
                            reason: raw.reason,
                            line,
                            origin: origin.to_string(),
                            matcher,
                        }),
                        Err(e) => {
                            problems.push(format!("line {line}: [[suppress]]: in `match`: {e}"))
                        }
                    }
                }
            }
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for r in &rules {
            if let Some(first) = seen.insert(r.id.as_str(), r.line) {
                problems.push(format!(
                    "line {}: rule `{}`: duplicate id (first defined at line {first}); ids must be unique",
                    r.line, r.id
                ));
            }
        }
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        let mut set = RuleSet {
            origin: origin.to_string(),
            rules,
            suppressions,
            index: HashMap::new(),
            policies: Policies::default(),
        };
        set.reindex();
        Ok(set)
    }

    /// Adds the rules and suppressions of `other` (an `--extra-rules` file). Rule ids
    /// must stay unique.
    pub fn extend(&mut self, other: RuleSet) -> Result<(), RulesError> {
        let dups: Vec<String> = other
            .rules
            .iter()
            .filter(|r| self.rules.iter().any(|m| m.id == r.id))
            .map(|r| {
                format!(
                    "line {}: rule `{}`: already defined in {}; ids must be unique",
                    r.line, r.id, self.origin
                )
            })
            .collect();
        if !dups.is_empty() {
            return Err(RulesError::Invalid {
                origin: other.origin,
                problems: dups,
            });
        }
        let unknown: Vec<String> = other
            .suppressions
            .iter()
            .flat_map(|s| s.rules.iter().map(move |r| (s, r)))
            .filter(|(_, r)| {
                *r != "*"
                    && !self
                        .rules
                        .iter()
                        .chain(other.rules.iter())
                        .any(|m| &m.id == *r)
            })
            .map(|(s, r)| {
                format!(
                    "line {}: [[suppress]]: unknown rule `{r}` (see `kmsguard rules list`)",
                    s.line
                )
            })
            .collect();
        if !unknown.is_empty() {
            return Err(RulesError::Invalid {
                origin: other.origin,
                problems: unknown,
            });
        }
        self.origin = format!("{} + {}", self.origin, other.origin);
        self.rules.extend(other.rules);
        self.suppressions.extend(other.suppressions);
        self.reindex();
        Ok(())
    }

    pub fn suppressions(&self) -> &[Suppression] {
        &self.suppressions
    }

    fn reindex(&mut self) {
        self.policies = self.fold_policies();
        let mut index: HashMap<String, HashMap<String, Vec<usize>>> = HashMap::new();
        for (i, r) in self.rules.iter().enumerate() {
            let by_name = index.entry(r.event_source.clone()).or_default();
            if r.event_names.is_empty() {
                by_name.entry(String::new()).or_default().push(i);
            }
            for n in &r.event_names {
                by_name.entry(n.clone()).or_default().push(i);
            }
        }
        self.index = index;
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// How each rule's findings fold, and the baseline detectors' findings.
    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    fn fold_policies(&self) -> Policies {
        let mut p: BTreeMap<String, FoldPolicy> =
            self.rules.iter().map(|r| (r.id.clone(), r.fold)).collect();
        p.extend(crate::analyze::baseline::fold_policies());
        Policies(p)
    }

    /// Event sources some rule looks at (what the decoder must parse fully).
    pub fn sources(&self) -> Vec<&str> {
        self.index.keys().map(String::as_str).collect()
    }

    /// Appends a finding for every rule that fires on `ev`.
    pub fn evaluate(&self, ev: &Event<'_>, file: &str, out: &mut Vec<Finding>) {
        let Some(src) = ev.event_source() else { return };
        let Some(by_name) = self.index.get(src) else {
            return;
        };
        let name = ev.event_name().unwrap_or("");
        let named = by_name.get(name).into_iter().flatten();
        let any = by_name.get("").into_iter().flatten();
        for &i in named.chain(any) {
            let rule = &self.rules[i];
            let file_suppressions: Vec<&Suppression> = self
                .suppressions
                .iter()
                .filter(|s| s.covers(&rule.id))
                .collect();
            if let Some(f) = rule.evaluate(ev, file, &file_suppressions) {
                out.push(f);
            }
        }
    }

    /// Runs every rule's inline tests.
    pub fn run_tests(&self) -> Vec<TestOutcome> {
        let mut out = Vec::new();
        for rule in &self.rules {
            for t in &rule.tests {
                let mut event = base_event(rule);
                merge(&mut event, &t.event);
                let mut bytes = event.to_string().into_bytes();
                let parsed = crate::json::with_parsed(&mut bytes, |v| {
                    rule.evaluate(&Event::new(v), "test", &[])
                });
                let result = match parsed {
                    Ok(finding) => {
                        let finding = finding.and_then(|mut f| {
                            // The test's key facts stand for an enriched finding.
                            if !t.key_tags.is_empty() || t.key_alias.is_some() {
                                f.key_tags = t.key_tags.clone();
                                f.key_alias = t.key_alias.clone();
                            }
                            resolve(&mut f).then_some(f)
                        });
                        match (&finding, t.expect_match, t.severity) {
                            (Some(f), true, Some(want)) if f.severity != want => Err(format!(
                                "expected severity {}, the finding has {}",
                                want.as_str(),
                                f.severity.as_str()
                            )),
                            (Some(_), true, _) | (None, false, _) => Ok(()),
                            (None, true, _) => {
                                Err("expected the rule to fire, it did not".to_string())
                            }
                            (Some(_), false, _) => {
                                Err("expected no match, but the rule fired".to_string())
                            }
                        }
                    }
                    Err(e) => Err(format!("test event is not valid JSON: {e}")),
                };
                out.push(TestOutcome {
                    rule: rule.id.clone(),
                    test: t.name.clone(),
                    result,
                });
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
pub struct TestOutcome {
    pub rule: String,
    pub test: String,
    pub result: Result<(), String>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn compile(raw: RawRule, line: usize) -> Result<Rule, Vec<String>> {
    let mut errs = Vec::new();
    if raw.id.is_empty()
        || !raw
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        errs.push("`id` must be non-empty and use only letters, digits, `-` and `_`".to_string());
    }
    let severity = raw.severity.parse::<Severity>().unwrap_or_else(|e| {
        errs.push(e);
        Severity::Info
    });
    if raw.description.trim().is_empty() {
        errs.push("`description` is empty: say what the rule detects and why its severity".into());
    }
    let matcher = match raw.match_.as_ref().map(Matcher::compile).transpose() {
        Ok(m) => m,
        Err(e) => {
            errs.push(format!("in `match`: {e}"));
            None
        }
    };
    let mut suppress = Vec::new();
    for (i, s) in raw.suppress.iter().enumerate() {
        match Matcher::compile(s) {
            Ok(m) => suppress.push(m),
            Err(e) => errs.push(format!("in `suppress[{i}]`: {e}")),
        }
    }
    if raw.capture.len() > 16 {
        errs.push(format!(
            "`capture` lists {} paths: keep it to 16 or fewer (only what a remediation needs)",
            raw.capture.len()
        ));
    }
    for path in &raw.capture {
        let ok = !path.is_empty()
            && path.split('.').count() <= 8
            && path.split('.').all(|seg| {
                !seg.is_empty()
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            });
        if !ok {
            errs.push(format!(
                "`capture` path \"{path}\" is not a dotted field path: use names joined by dots, e.g. \"responseElements.grantId\""
            ));
        }
    }
    let mut fold = FoldPolicy::default();
    if let Some(by) = &raw.fold_by {
        match FoldBy::parse(by) {
            Some(FoldBy::Id) | None => errs.push(format!(
                "fold_by = \"{by}\": use \"principal_and_keys\" (the default) or \"principal\""
            )),
            Some(b) => fold.by = b,
        }
    }
    if let Some(w) = &raw.fold_window {
        match crate::clock::parse_duration(w) {
            Ok(d) if (60..=86_400).contains(&d.as_secs()) => fold.window_secs = d.as_secs() as i64,
            Ok(_) => errs.push(format!(
                "fold_window = \"{w}\": use a window between 1m and 1d"
            )),
            Err(e) => errs.push(format!("fold_window = \"{w}\": {e}")),
        }
    }
    let mut tests = Vec::new();
    for (i, t) in raw.tests.iter().enumerate() {
        let name = t.name.clone().unwrap_or_else(|| format!("test {}", i + 1));
        let expect_match = match t.expect.as_str() {
            "match" => true,
            "no-match" | "no_match" => false,
            other => {
                errs.push(format!(
                    "test `{name}`: expect = \"{other}\"; use \"match\" or \"no-match\""
                ));
                continue;
            }
        };
        let event = match &t.event {
            toml::Value::String(s) => match serde_json::from_str::<serde_json::Value>(s) {
                Ok(v) => v,
                Err(e) => {
                    errs.push(format!("test `{name}`: `event` is not valid JSON: {e}"));
                    continue;
                }
            },
            other => match serde_json::to_value(other) {
                Ok(v) => v,
                Err(e) => {
                    errs.push(format!("test `{name}`: `event` cannot be converted: {e}"));
                    continue;
                }
            },
        };
        if !event.is_object() {
            errs.push(format!("test `{name}`: `event` must be a JSON object"));
            continue;
        }
        let severity = match t.severity.as_deref().map(str::parse::<Severity>) {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                errs.push(format!("test `{name}`: {e}"));
                continue;
            }
        };
        tests.push(RuleTest {
            name,
            expect_match,
            event,
            key_tags: t.key_tags.clone(),
            key_alias: t.key_alias.clone(),
            severity,
        });
    }
    let mut escalate = Vec::new();
    for (i, e) in raw.escalate.iter().enumerate() {
        let sev = match e.severity.parse::<Severity>() {
            Ok(s) if s > severity => Some(s),
            Ok(s) => {
                errs.push(format!(
                    "in `escalate[{i}]`: severity \"{}\" is not above the rule's \"{}\": escalate only raises (suppress or another rule lowers)",
                    s.as_str(),
                    severity.as_str()
                ));
                None
            }
            Err(msg) => {
                errs.push(format!("in `escalate[{i}]`: {msg}"));
                None
            }
        };
        match Matcher::compile(&e.when) {
            Ok(when) => {
                if let Some(severity) = sev {
                    escalate.push(Escalation { severity, when });
                }
            }
            Err(msg) => errs.push(format!("in `escalate[{i}].when`: {msg}")),
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(Rule {
        id: raw.id,
        title: raw.title,
        severity,
        description: raw.description,
        event_source: raw.event_source.unwrap_or_else(|| KMS_SOURCE.to_string()),
        event_names: raw.event_names,
        line,
        matcher: if raw.enabled == Some(false) {
            Some(Matcher::Any(Vec::new()))
        } else {
            matcher
        },
        suppress,
        summary: raw.summary,
        remediation: raw.remediation,
        capture: raw.capture,
        escalate,
        fold,
        tests,
    })
}

/// The default record a rule test's partial event is merged over: a successful call of
/// the rule's first event name by an application role in account 111122223333.
fn base_event(rule: &Rule) -> serde_json::Value {
    serde_json::json!({
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "AssumedRole",
            "principalId": "AROAEXAMPLE:session",
            "arn": "arn:aws:sts::111122223333:assumed-role/app/session",
            "accountId": "111122223333",
            "sessionContext": {"sessionIssuer": {"type": "Role", "arn": "arn:aws:iam::111122223333:role/app", "accountId": "111122223333"}}
        },
        "eventTime": "2026-10-01T12:00:00Z",
        "eventSource": rule.event_source,
        "eventName": rule.event_names.first().cloned().unwrap_or_default(),
        "awsRegion": "us-east-1",
        "sourceIPAddress": "10.0.0.1",
        "userAgent": "aws-cli/2.17.0",
        "requestParameters": {"keyId": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"},
        "responseElements": null,
        "eventID": "00000000-0000-4000-8000-000000000001",
        "readOnly": false,
        "eventType": "AwsApiCall",
        "managementEvent": true,
        "recipientAccountId": "111122223333",
        "eventCategory": "Management",
        "resources": [{"accountId": "111122223333", "type": "AWS::KMS::Key", "ARN": "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"}]
    })
}

/// Deep-merges `patch` into `base` (objects merge, everything else replaces; JSON
/// `null` in the patch removes the field, so tests can express "no errorCode").
fn merge(base: &mut serde_json::Value, patch: &serde_json::Value) {
    match (base, patch) {
        (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else if let Some(slot) = b.get_mut(k) {
                    merge(slot, v);
                } else {
                    b.insert(k.clone(), v.clone());
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bad_rule_is_reported_with_id_and_line() {
        let text = r#"
[[rule]]
id = "good"
title = "t"
severity = "low"
description = "d"
event_names = ["DisableKey"]

[[rule]]
id = "bad-sev"
title = "t"
severity = "urgent"
description = "d"

[[rule]]
id = "bad-field"
title = "t"
severity = "low"
description = "d"
mtach = { field = "x", exists = true }

[[rule]]
id = "bad-regex"
title = "t"
severity = "low"
description = "d"
match = { field = "userAgent", regex = "(" }
"#;
        let err = RuleSet::parse(text, "test.toml").unwrap_err().to_string();
        assert!(
            err.contains("line 9: rule `bad-sev`: unknown severity `urgent`"),
            "{err}"
        );
        assert!(
            err.contains("line 15: rule `bad-field`") && err.contains("mtach"),
            "{err}"
        );
        assert!(
            err.contains("line 22: rule `bad-regex`: in `match`: bad regex"),
            "{err}"
        );
        assert!(!err.contains("`good`"), "{err}");
    }

    #[test]
    fn builtin_rules_load_and_pass_their_tests() {
        let rules = RuleSet::builtin().expect("built-in rules must be valid");
        let outcomes = rules.run_tests();
        assert!(
            outcomes.len() >= rules.rules().len(),
            "every rule has tests"
        );
        let failed: Vec<_> = outcomes.iter().filter(|o| o.result.is_err()).collect();
        assert!(failed.is_empty(), "{failed:#?}");
        for r in rules.rules() {
            assert!(
                r.tests.iter().any(|t| t.expect_match),
                "{} has no positive test",
                r.id
            );
            assert!(
                r.tests.iter().any(|t| !t.expect_match),
                "{} has no negative test",
                r.id
            );
        }
    }

    #[test]
    fn capture_copies_values_into_the_context_and_bad_paths_are_reported() {
        let text = r#"
[[rule]]
id = "grant"
title = "t"
severity = "high"
description = "d"
event_names = ["CreateGrant"]
remediation = "revoke-grant"
capture = ["responseElements.grantId", "requestParameters.limit", "requestParameters.missing", "requestParameters.constraints"]
"#;
        let rules = RuleSet::parse(text, "t.toml").unwrap();
        let mut bytes = br#"{"eventSource":"kms.amazonaws.com","eventName":"CreateGrant","eventID":"e1","responseElements":{"grantId":"g\u0007-1"},"requestParameters":{"limit":5,"constraints":{"a":1}}}"#.to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let v = crate::json::Value::root(&tape.0).unwrap();
        let mut out = Vec::new();
        rules.evaluate(&Event::new(v), "f", &mut out);
        let ctx = &out[0].context;
        assert_eq!(
            ctx.get("responseElements.grantId").map(String::as_str),
            Some("g-1")
        );
        assert_eq!(
            ctx.get("requestParameters.limit").map(String::as_str),
            Some("5")
        );
        assert_eq!(ctx.len(), 2, "{ctx:?}");
        let bad = text.replace("\"requestParameters.limit\"", "\"a..b\"");
        let e = RuleSet::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("rule `grant`: `capture` path \"a..b\""), "{e}");
    }

    #[test]
    fn summary_template_cleans_values() {
        let mut bytes = br#"{"userAgent":"evil\r\nBcc: x","eventName":"Decrypt"}"#.to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let v = crate::json::Value::root(&tape.0).unwrap();
        let s = render_summary(
            Some("{event_name} via {user_agent} {missing.path}"),
            "t",
            &Event::new(v),
            &[],
        );
        assert_eq!(s, "Decrypt via evilBcc: x ?");
    }

    const TAGGED: &str = r#"
[[rule]]
id = "key-disabled"
title = "t"
severity = "medium"
description = "d"
event_names = ["DisableKey", "CreateKey"]
escalate = [ { severity = "critical", when = { field = "tag:sensitivity", equals = "high" } } ]

[[rule.tests]]
name = "a sensitive key is critical"
expect = "match"
severity = "critical"
event = {}
key_tags = { sensitivity = "high" }

[[rule.tests]]
name = "another key keeps its severity"
expect = "match"
severity = "medium"
event = {}
key_tags = { sensitivity = "low" }

[[rule]]
id = "prod-only"
title = "t"
severity = "low"
description = "d"
event_names = ["Decrypt"]
match = { any = [ { field = "tag:env", equals = "prod" }, { field = "key:alias", starts_with = "alias/prod-" } ] }

[[rule.tests]]
name = "prod by tag"
expect = "match"
event = {}
key_tags = { env = "prod" }

[[rule.tests]]
name = "prod by alias"
expect = "match"
event = {}
key_alias = "alias/prod-payments"

[[rule.tests]]
name = "not prod, or not known"
expect = "no-match"
event = {}

[[suppress]]
rules = ["key-disabled"]
reason = "CI disables its dev keys"
match = { all = [ { field = "userIdentity.sessionContext.sessionIssuer.arn", ends_with = ":role/ci" }, { field = "tag:env", equals = "dev" } ] }
"#;

    fn eval(rules: &RuleSet, json: &str) -> Vec<Finding> {
        let mut bytes = json.as_bytes().to_vec();
        let tape = simd_json::to_tape(&mut bytes).unwrap();
        let v = crate::json::Value::root(&tape.0).unwrap();
        let mut out = Vec::new();
        rules.evaluate(&Event::new(v), "f", &mut out);
        out
    }

    #[test]
    fn key_conditions_escalate_suppress_and_are_decided_after_enrichment() {
        let rules = RuleSet::parse(TAGGED, "t.toml").unwrap();
        let failed: Vec<_> = rules
            .run_tests()
            .into_iter()
            .filter(|o| o.result.is_err())
            .collect();
        assert!(failed.is_empty(), "{failed:#?}");

        let ci = r#"{"eventSource":"kms.amazonaws.com","eventName":"DisableKey","eventID":"e1","userIdentity":{"sessionContext":{"sessionIssuer":{"arn":"arn:aws:iam::1:role/ci"}}}}"#;
        let app = ci.replace("role/ci", "role/app");
        // Undecided until the key's tags are known.
        let mut f = eval(&rules, ci).remove(0);
        assert!(!f.pending.is_empty());
        let mut dev = f.clone();
        dev.key_tags.insert("env".into(), "dev".into());
        assert!(!resolve(&mut dev), "the CI role on a dev key is suppressed");
        f.key_tags.insert("env".into(), "prod".into());
        f.key_tags.insert("sensitivity".into(), "high".into());
        assert!(resolve(&mut f));
        assert_eq!(f.severity, Severity::Critical);
        assert!(f.pending.is_empty() && resolve(&mut f), "idempotent");
        // The suppression is for the CI role only: decided false by the event at once.
        let mut g = eval(&rules, &app).remove(0);
        g.key_tags.insert("env".into(), "dev".into());
        assert!(resolve(&mut g));
        assert_eq!(g.severity, Severity::Medium);
        // Not enriched: nothing known, no key condition holds.
        let mut h = eval(&rules, ci).remove(0);
        assert!(resolve(&mut h));
        assert_eq!(h.severity, Severity::Medium);
        // Offline, the event's own tags count (CreateKey with tags).
        let create = r#"{"eventSource":"kms.amazonaws.com","eventName":"CreateKey","eventID":"e2","requestParameters":{"tags":[{"tagKey":"sensitivity","tagValue":"high"}]}}"#;
        let mut c = eval(&rules, create).remove(0);
        assert!(resolve(&mut c));
        assert_eq!(c.severity, Severity::Critical);
        // `key:alias` matches any alias of an enriched key, not only the first shown.
        let dec = r#"{"eventSource":"kms.amazonaws.com","eventName":"Decrypt","eventID":"e4"}"#;
        let rec = crate::inventory::KeyRecord {
            aliases: vec!["alias/a-first".into(), "alias/prod-payments".into()],
            ..Default::default()
        };
        let mut d = eval(&rules, dec)
            .into_iter()
            .find(|f| f.rule == "prod-only")
            .unwrap();
        crate::inventory::apply(&mut d, &rec);
        assert_eq!(d.key_alias.as_deref(), Some("alias/a-first"));
        assert!(resolve(&mut d), "the second alias is a prod alias");
        let mut d = eval(&rules, dec)
            .into_iter()
            .find(|f| f.rule == "prod-only")
            .unwrap();
        crate::inventory::apply(
            &mut d,
            &crate::inventory::KeyRecord {
                aliases: vec!["alias/a-first".into(), "alias/dev".into()],
                ..Default::default()
            },
        );
        assert!(!resolve(&mut d), "no prod alias");
        // A match on key facts only, undecided: dropped when it does not hold.
        let dec = r#"{"eventSource":"kms.amazonaws.com","eventName":"Decrypt","eventID":"e3"}"#;
        let mut all = eval(&rules, dec);
        resolve_all(&mut all);
        assert!(all.is_empty());
    }

    #[test]
    fn key_condition_mistakes_are_reported() {
        let bad = TAGGED
            .replace("severity = \"critical\", when", "severity = \"low\", when")
            .replace(
                "field = \"tag:env\", equals = \"dev\"",
                "field = \"key:arn\", equals = \"dev\"",
            )
            .replace(
                "field = \"tag:env\", equals = \"prod\"",
                "field = \"tag:\", equals = \"prod\"",
            );
        let e = RuleSet::parse(&bad, "t.toml").unwrap_err().to_string();
        for must in [
            "rule `key-disabled`: in `escalate[0]`: severity \"low\" is not above the rule's \"medium\"",
            "the key fields are `key:alias` and `tag:NAME`",
            "`field = \"tag:\"` needs a tag key",
        ] {
            assert!(e.contains(must), "missing {must} in\n{e}");
        }
        let wrong = TAGGED.replace(
            "severity = \"critical\"\nevent = {}",
            "severity = \"high\"\nevent = {}",
        );
        let rules = RuleSet::parse(&wrong, "t.toml").unwrap();
        let failed: Vec<_> = rules
            .run_tests()
            .into_iter()
            .filter_map(|o| o.result.err())
            .collect();
        assert_eq!(
            failed,
            vec!["expected severity high, the finding has critical".to_string()]
        );
    }
}
