//! The condition language of rules.toml, compiled: a closed enum of matchers over
//! dotted field paths, combined with all/any/not, plus calls to named predicates.
//! Compilation checks everything up front (regexes, predicate names, one operator per
//! condition) so evaluation cannot fail.
//!
//! Besides the record, a condition can test what the key *is*: `field = "tag:NAME"` (a
//! tag of the event's key) and `field = "key:alias"` (one of its aliases). Those facts
//! come from the key inventory after enrichment, which happens after analysis; so a
//! condition that uses them is evaluated in two steps: `partial` decides everything the
//! record decides and leaves a residual over key facts only (or a constant), and
//! `resolve` decides the residual once the facts are known (`KeyFacts`).

use crate::analyze::predicates::Predicate;
use crate::event::{as_f64, Event, Kind, Value};
use regex::Regex;
use serde::Deserialize;

/// A condition as written in rules.toml, before validation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCond {
    pub all: Option<Vec<RawCond>>,
    pub any: Option<Vec<RawCond>>,
    pub not: Option<Box<RawCond>>,
    pub field: Option<String>,
    pub equals: Option<toml::Value>,
    #[serde(rename = "in")]
    pub in_: Option<Vec<toml::Value>>,
    pub contains: Option<String>,
    pub starts_with: Option<String>,
    pub ends_with: Option<String>,
    pub regex: Option<String>,
    pub exists: Option<bool>,
    pub gt: Option<f64>,
    pub lt: Option<f64>,
    pub predicate: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Str(String),
    Num(f64),
    Bool(bool),
}

#[derive(Debug, Clone)]
pub enum FieldOp {
    Exists(bool),
    Equals(Scalar),
    In(Vec<Scalar>),
    Contains(String),
    StartsWith(String),
    EndsWith(String),
    Regex(Regex),
    Gt(f64),
    Lt(f64),
}

/// A fact about the event's key rather than the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyAttr {
    /// `tag:NAME`: the value of tag NAME.
    Tag(String),
    /// `key:alias`: an alias name (`alias/...`).
    Alias,
}

/// What is known about a key when key conditions are decided: from the inventory after
/// enrichment, else only what the events themselves said (CreateKey, TagResource).
#[derive(Debug, Clone, Copy)]
pub struct KeyFacts<'a> {
    pub aliases: &'a [String],
    pub tags: &'a std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub enum Matcher {
    All(Vec<Matcher>),
    Any(Vec<Matcher>),
    Not(Box<Matcher>),
    Field { path: Vec<String>, op: FieldOp },
    Key { attr: KeyAttr, op: FieldOp },
    Predicate(Predicate),
}

/// The constant true (an empty `all`).
const TRUE: fn() -> Matcher = || Matcher::All(Vec::new());
/// The constant false (an empty `any`).
const FALSE: fn() -> Matcher = || Matcher::Any(Vec::new());

fn scalar(v: &toml::Value) -> Result<Scalar, String> {
    match v {
        toml::Value::String(s) => Ok(Scalar::Str(s.clone())),
        toml::Value::Integer(i) => Ok(Scalar::Num(*i as f64)),
        toml::Value::Float(f) => Ok(Scalar::Num(*f)),
        toml::Value::Boolean(b) => Ok(Scalar::Bool(*b)),
        other => Err(format!(
            "`equals`/`in` take strings, numbers or booleans, not {}",
            other.type_str()
        )),
    }
}

impl Matcher {
    /// Validates and compiles a raw condition.
    pub fn compile(raw: &RawCond) -> Result<Matcher, String> {
        let combinators = [raw.all.is_some(), raw.any.is_some(), raw.not.is_some()];
        let ops: Vec<&str> = [
            ("equals", raw.equals.is_some()),
            ("in", raw.in_.is_some()),
            ("contains", raw.contains.is_some()),
            ("starts_with", raw.starts_with.is_some()),
            ("ends_with", raw.ends_with.is_some()),
            ("regex", raw.regex.is_some()),
            ("exists", raw.exists.is_some()),
            ("gt", raw.gt.is_some()),
            ("lt", raw.lt.is_some()),
        ]
        .iter()
        .filter(|(_, set)| *set)
        .map(|(n, _)| *n)
        .collect();
        let kinds = combinators.iter().filter(|x| **x).count()
            + usize::from(raw.field.is_some())
            + usize::from(raw.predicate.is_some());
        if kinds != 1 {
            return Err(
                "a condition needs exactly one of `all`, `any`, `not`, `field` or `predicate`"
                    .into(),
            );
        }
        if raw.field.is_none() && !ops.is_empty() {
            return Err(format!("`{}` needs a `field`", ops[0]));
        }
        if let Some(list) = &raw.all {
            return Ok(Matcher::All(compile_list(list, "all")?));
        }
        if let Some(list) = &raw.any {
            return Ok(Matcher::Any(compile_list(list, "any")?));
        }
        if let Some(inner) = &raw.not {
            return Ok(Matcher::Not(Box::new(Matcher::compile(inner)?)));
        }
        if let Some(name) = &raw.predicate {
            return Predicate::from_name(name)
                .map(Matcher::Predicate)
                .ok_or_else(|| {
                    format!("unknown predicate `{name}`; known: {}", Predicate::names())
                });
        }
        let field = raw.field.as_deref().unwrap_or_default();
        if field.is_empty() || field.split('.').any(str::is_empty) {
            return Err(format!(
                "`field = \"{field}\"` is not a dotted path such as `requestParameters.keyId`"
            ));
        }
        let key_attr = if let Some(name) = field.strip_prefix("tag:") {
            if name.is_empty() {
                return Err("`field = \"tag:\"` needs a tag key, e.g. `tag:sensitivity`".into());
            }
            Some(KeyAttr::Tag(name.to_string()))
        } else if field == "key:alias" {
            Some(KeyAttr::Alias)
        } else if field.starts_with("key:") {
            return Err(format!(
                "`field = \"{field}\"`: the key fields are `key:alias` and `tag:NAME`"
            ));
        } else {
            None
        };
        if ops.len() != 1 {
            return Err(format!(
                "field `{field}` needs exactly one operator (equals, in, contains, starts_with, ends_with, regex, exists, gt, lt), found {}",
                if ops.is_empty() { "none".to_string() } else { ops.join(", ") }
            ));
        }
        let op = if let Some(v) = &raw.equals {
            FieldOp::Equals(scalar(v)?)
        } else if let Some(list) = &raw.in_ {
            FieldOp::In(list.iter().map(scalar).collect::<Result<_, _>>()?)
        } else if let Some(s) = &raw.contains {
            FieldOp::Contains(s.clone())
        } else if let Some(s) = &raw.starts_with {
            FieldOp::StartsWith(s.clone())
        } else if let Some(s) = &raw.ends_with {
            FieldOp::EndsWith(s.clone())
        } else if let Some(r) = &raw.regex {
            FieldOp::Regex(Regex::new(r).map_err(|e| format!("bad regex for `{field}`: {e}"))?)
        } else if let Some(b) = raw.exists {
            FieldOp::Exists(b)
        } else if let Some(x) = raw.gt {
            FieldOp::Gt(x)
        } else if let Some(x) = raw.lt {
            FieldOp::Lt(x)
        } else {
            unreachable!("one operator was counted above")
        };
        if let Some(attr) = key_attr {
            return Ok(Matcher::Key { attr, op });
        }
        Ok(Matcher::Field {
            path: field.split('.').map(str::to_string).collect(),
            op,
        })
    }

    /// Whether the condition tests key facts (`tag:`, `key:alias`) anywhere.
    pub fn uses_key(&self) -> bool {
        match self {
            Matcher::All(l) | Matcher::Any(l) => l.iter().any(Matcher::uses_key),
            Matcher::Not(m) => m.uses_key(),
            Matcher::Key { .. } => true,
            Matcher::Field { .. } | Matcher::Predicate(_) => false,
        }
    }

    /// Evaluates on the record with the key facts known now.
    pub fn matches(&self, ev: &Event<'_>, key: &KeyFacts<'_>) -> bool {
        match self {
            Matcher::All(list) => list.iter().all(|m| m.matches(ev, key)),
            Matcher::Any(list) => list.iter().any(|m| m.matches(ev, key)),
            Matcher::Not(m) => !m.matches(ev, key),
            Matcher::Predicate(p) => p.eval(ev),
            Matcher::Field { path, op } => match op {
                FieldOp::Exists(want) => ev.any_at(path, &mut |v| !v.is_null()) == *want,
                _ => ev.any_at(path, &mut |v| op_matches(op, v)),
            },
            Matcher::Key { attr, op } => key_matches(attr, op, key),
        }
    }

    /// Decides what the record decides: the result is a constant (`as_const`) or a
    /// residual condition over key facts only, for `resolve`.
    pub fn partial(&self, ev: &Event<'_>) -> Matcher {
        let constant = |b: bool| if b { TRUE() } else { FALSE() };
        match self {
            Matcher::Field { .. } | Matcher::Predicate(_) => {
                let none = std::collections::BTreeMap::new();
                constant(self.matches(
                    ev,
                    &KeyFacts {
                        aliases: &[],
                        tags: &none,
                    },
                ))
            }
            Matcher::Key { .. } => self.clone(),
            Matcher::Not(m) => match m.partial(ev) {
                r if r.as_const().is_some() => constant(r.as_const() == Some(false)),
                r => Matcher::Not(Box::new(r)),
            },
            Matcher::All(list) => {
                let mut rest = Vec::new();
                for m in list {
                    match m.partial(ev) {
                        r if r.as_const() == Some(false) => return FALSE(),
                        r if r.as_const() == Some(true) => {}
                        r => rest.push(r),
                    }
                }
                if rest.len() == 1 {
                    rest.remove(0)
                } else {
                    Matcher::All(rest)
                }
            }
            Matcher::Any(list) => {
                let mut rest = Vec::new();
                for m in list {
                    match m.partial(ev) {
                        r if r.as_const() == Some(true) => return TRUE(),
                        r if r.as_const() == Some(false) => {}
                        r => rest.push(r),
                    }
                }
                if rest.len() == 1 {
                    rest.remove(0)
                } else {
                    Matcher::Any(rest)
                }
            }
        }
    }

    /// Some(b) when the condition is the constant b (an empty `all` or `any`).
    pub fn as_const(&self) -> Option<bool> {
        match self {
            Matcher::All(l) if l.is_empty() => Some(true),
            Matcher::Any(l) if l.is_empty() => Some(false),
            _ => None,
        }
    }

    /// Decides a residual of `partial` with the key facts. Record conditions cannot be
    /// in a residual; should one be, it does not match.
    pub fn resolve(&self, key: &KeyFacts<'_>) -> bool {
        match self {
            Matcher::All(list) => list.iter().all(|m| m.resolve(key)),
            Matcher::Any(list) => list.iter().any(|m| m.resolve(key)),
            Matcher::Not(m) => !m.resolve(key),
            Matcher::Key { attr, op } => key_matches(attr, op, key),
            Matcher::Field { .. } | Matcher::Predicate(_) => false,
        }
    }
}

/// A key condition: a tag's value or any alias, tested like a record string (numbers
/// compare numerically); `exists` tests presence.
fn key_matches(attr: &KeyAttr, op: &FieldOp, key: &KeyFacts<'_>) -> bool {
    let values: Vec<&str> = match attr {
        KeyAttr::Tag(name) => key.tags.get(name).map(String::as_str).into_iter().collect(),
        KeyAttr::Alias => key.aliases.iter().map(String::as_str).collect(),
    };
    match op {
        FieldOp::Exists(want) => values.is_empty() != *want,
        _ => values
            .into_iter()
            .any(|v| crate::json::with_str(v, |v| op_matches(op, v))),
    }
}

fn compile_list(list: &[RawCond], what: &str) -> Result<Vec<Matcher>, String> {
    if list.is_empty() {
        return Err(format!("`{what}` needs at least one condition"));
    }
    list.iter().map(Matcher::compile).collect()
}

fn eq(s: &Scalar, v: Value<'_>) -> bool {
    match (s, v.kind()) {
        (Scalar::Str(a), Kind::Str(b)) => a == b,
        (Scalar::Num(a), _) => as_f64(v).is_some_and(|b| b == *a),
        (Scalar::Bool(a), Kind::Bool(b)) => *a == b,
        (Scalar::Bool(a), Kind::Str(b)) => b == if *a { "true" } else { "false" },
        _ => false,
    }
}

fn op_matches(op: &FieldOp, v: Value<'_>) -> bool {
    let text = v.as_str();
    match op {
        FieldOp::Exists(_) => true,
        FieldOp::Equals(s) => eq(s, v),
        FieldOp::In(list) => list.iter().any(|s| eq(s, v)),
        FieldOp::Contains(s) => text.is_some_and(|t| t.contains(s.as_str())),
        FieldOp::StartsWith(s) => text.is_some_and(|t| t.starts_with(s.as_str())),
        FieldOp::EndsWith(s) => text.is_some_and(|t| t.ends_with(s.as_str())),
        FieldOp::Regex(r) => text.is_some_and(|t| r.is_match(t)),
        FieldOp::Gt(x) => as_f64(v).is_some_and(|n| n > *x),
        FieldOp::Lt(x) => as_f64(v).is_some_and(|n| n < *x),
    }
}
