//! A read-only view over one parsed JSON document, as simd-json's tape holds it.
//!
//! simd-json validates a record and lays it out as a flat tape of nodes (strings point
//! into the input buffer, already unescaped; objects and arrays carry their node count).
//! Looking a field up walks the tape and skips whole sub-trees by their count, so a
//! record is used without building a tree of hash maps: no allocation per object, which
//! is what made the DOM the costliest step of a replay. This module is the only place
//! that knows the tape's layout; everything else uses [`Value`] and [`Kind`].

use simd_json::{Node, StaticNode};

/// One value inside a parsed document. Cheap to copy: a slice of the tape.
#[derive(Clone, Copy, Debug)]
pub struct Value<'v>(&'v [Node<'v>]);

/// What a [`Value`] holds, for `match`.
#[derive(Clone, Copy, Debug)]
pub enum Kind<'v> {
    Null,
    Bool(bool),
    /// Any JSON number (integers beyond 2^53 lose precision, as in JavaScript).
    Num(f64),
    Str(&'v str),
    Array(Items<'v>),
    Object(Fields<'v>),
}

/// Number of tape nodes a value occupies, its header included.
fn span(n: &Node<'_>) -> usize {
    match n {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

impl<'v> Value<'v> {
    /// The whole document of a tape (None for an empty tape).
    pub fn root(tape: &'v [Node<'v>]) -> Option<Self> {
        let first = tape.first()?;
        Some(Value(&tape[..span(first).min(tape.len())]))
    }

    pub fn kind(self) -> Kind<'v> {
        match self.0.first() {
            Some(Node::String(s)) => Kind::Str(s),
            Some(Node::Object { len, .. }) => Kind::Object(Fields {
                nodes: &self.0[1..],
                left: *len,
            }),
            Some(Node::Array { len, .. }) => Kind::Array(Items {
                nodes: &self.0[1..],
                left: *len,
            }),
            Some(Node::Static(s)) => match s {
                StaticNode::Null => Kind::Null,
                StaticNode::Bool(b) => Kind::Bool(*b),
                StaticNode::I64(i) => Kind::Num(*i as f64),
                StaticNode::U64(u) => Kind::Num(*u as f64),
                StaticNode::F64(f) => Kind::Num(*f),
            },
            None => Kind::Null,
        }
    }

    pub fn as_str(self) -> Option<&'v str> {
        match self.0.first() {
            Some(Node::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(self) -> Option<bool> {
        match self.kind() {
            Kind::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn is_null(self) -> bool {
        matches!(self.kind(), Kind::Null)
    }

    pub fn is_array(self) -> bool {
        matches!(self.0.first(), Some(Node::Array { .. }))
    }

    /// The fields of an object; empty for anything else.
    pub fn fields(self) -> Fields<'v> {
        match self.kind() {
            Kind::Object(f) => f,
            _ => Fields {
                nodes: &[],
                left: 0,
            },
        }
    }

    /// The elements of an array; empty for anything else.
    pub fn items(self) -> Items<'v> {
        match self.kind() {
            Kind::Array(i) => i,
            _ => Items {
                nodes: &[],
                left: 0,
            },
        }
    }

    /// A field of an object (the first one when the key repeats); None for non-objects.
    pub fn get(self, key: &str) -> Option<Value<'v>> {
        self.fields().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// A field of an object, the last one when the key repeats.
    pub fn get_last(self, key: &str) -> Option<Value<'v>> {
        self.fields()
            .filter(|(k, _)| *k == key)
            .last()
            .map(|(_, v)| v)
    }

    /// The value as JSON text (strings quoted and escaped), for display and export.
    pub fn to_json(self) -> serde_json::Value {
        match self.kind() {
            Kind::Null => serde_json::Value::Null,
            Kind::Bool(b) => serde_json::Value::Bool(b),
            Kind::Num(_) => match self.0.first() {
                Some(Node::Static(StaticNode::I64(i))) => (*i).into(),
                Some(Node::Static(StaticNode::U64(u))) => (*u).into(),
                Some(Node::Static(StaticNode::F64(f))) => serde_json::Number::from_f64(*f)
                    .map_or(serde_json::Value::Null, serde_json::Value::Number),
                _ => serde_json::Value::Null,
            },
            Kind::Str(s) => serde_json::Value::String(s.to_string()),
            Kind::Array(items) => items.map(Value::to_json).collect(),
            Kind::Object(fields) => {
                let mut m = serde_json::Map::new();
                for (k, v) in fields {
                    m.insert(k.to_string(), v.to_json());
                }
                serde_json::Value::Object(m)
            }
        }
    }

    /// A scalar as display text: strings as they are, numbers and booleans as JSON
    /// writes them, None for null, arrays and objects.
    pub fn scalar_text(self) -> Option<String> {
        match self.0.first()? {
            Node::String(s) => Some(s.to_string()),
            Node::Static(StaticNode::Null) => None,
            Node::Static(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Iterator over an object's `(key, value)` pairs, in document order.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'v> {
    nodes: &'v [Node<'v>],
    left: usize,
}

impl<'v> Iterator for Fields<'v> {
    type Item = (&'v str, Value<'v>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let (Node::String(k), rest) = self.nodes.split_first()? else {
            return None;
        };
        let n = span(rest.first()?).min(rest.len());
        let (v, tail) = rest.split_at(n);
        self.nodes = tail;
        self.left -= 1;
        Some((k, Value(v)))
    }
}

/// Iterator over an array's elements.
#[derive(Clone, Copy, Debug)]
pub struct Items<'v> {
    nodes: &'v [Node<'v>],
    left: usize,
}

impl Items<'_> {
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }
}

impl<'v> Iterator for Items<'v> {
    type Item = Value<'v>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let n = span(self.nodes.first()?).min(self.nodes.len());
        let (v, tail) = self.nodes.split_at(n);
        self.nodes = tail;
        self.left -= 1;
        Some(Value(v))
    }
}

/// Calls `f` with a JSON string value holding `s`, for testing text that does not come
/// from a record (a key's tag or alias) with the same operators.
pub fn with_str<R>(s: &str, f: impl FnOnce(Value<'_>) -> R) -> R {
    let node = [Node::String(s)];
    f(Value(&node))
}

/// Parses `json` (in place: simd-json unescapes strings into the buffer) and calls `f`
/// with the document. For tests, inline rule tests and other one-off parses; the decoder
/// keeps its own reusable buffers.
pub fn with_parsed<R>(
    json: &mut [u8],
    f: impl FnOnce(Value<'_>) -> R,
) -> Result<R, simd_json::Error> {
    let tape = simd_json::to_tape(json)?;
    let root = Value::root(&tape.0).unwrap_or(Value(&[Node::Static(StaticNode::Null)]));
    Ok(f(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_nested_objects_and_arrays_and_skips_subtrees() {
        let mut doc = br#"{"a":{"x":[1,{"y":2}],"z":"s"},"b":[true,null,"t",-1.5],"a":7}"#.to_vec();
        with_parsed(&mut doc, |v| {
            assert_eq!(
                v.get("a").and_then(|a| a.get("z")).and_then(Value::as_str),
                Some("s")
            );
            let b: Vec<String> = v
                .get("b")
                .unwrap()
                .items()
                .map(|x| format!("{:?}", x.kind()))
                .collect();
            assert_eq!(b.len(), 4);
            assert!(matches!(v.get_last("a").unwrap().kind(), Kind::Num(n) if n == 7.0));
            assert!(v.get("a").unwrap().get("x").unwrap().is_array());
            assert_eq!(v.fields().count(), 3);
            assert_eq!(
                v.to_json(),
                serde_json::json!({"a": 7, "b": [true, null, "t", -1.5]})
            );
        })
        .unwrap();
    }

    #[test]
    fn escaped_strings_come_back_unescaped() {
        let mut doc = br#"{"p":"{\"Statement\":[\"\u00e9\\\"]}"}"#.to_vec();
        with_parsed(&mut doc, |v| {
            assert_eq!(
                v.get("p").and_then(Value::as_str),
                Some("{\"Statement\":[\"é\\\"]}")
            );
        })
        .unwrap();
    }
}
