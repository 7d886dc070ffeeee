//! The condition language of rules.toml, compiled: a closed enum of matchers over
//! dotted field paths, combined with all/any/not, plus calls to named predicates.
//! Compilation checks everything up front (regexes, predicate names, one operator per
//! condition) so evaluation cannot fail.

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

#[derive(Debug, Clone)]
pub enum Matcher {
    All(Vec<Matcher>),
    Any(Vec<Matcher>),
    Not(Box<Matcher>),
    Field { path: Vec<String>, op: FieldOp },
    Predicate(Predicate),
}

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
        Ok(Matcher::Field {
            path: field.split('.').map(str::to_string).collect(),
            op,
        })
    }

    pub fn matches(&self, ev: &Event<'_>) -> bool {
        match self {
            Matcher::All(list) => list.iter().all(|m| m.matches(ev)),
            Matcher::Any(list) => list.iter().any(|m| m.matches(ev)),
            Matcher::Not(m) => !m.matches(ev),
            Matcher::Predicate(p) => p.eval(ev),
            Matcher::Field { path, op } => match op {
                FieldOp::Exists(want) => ev.any_at(path, &mut |v| !v.is_null()) == *want,
                _ => ev.any_at(path, &mut |v| op_matches(op, v)),
            },
        }
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
