//! An ordered JSON value for building records field by field, written compactly (as
//! CloudTrail writes its files) or the way Python's `json.dumps` does (`", "`, `": "`),
//! which some malformed cases copy byte for byte.

#[derive(Clone, Debug, PartialEq)]
pub enum J {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub fn obj<K: Into<String>>(fields: Vec<(K, J)>) -> J {
        J::Obj(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    pub fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(f) => f.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut J> {
        match self {
            J::Obj(f) => f.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Sets `key` (in place when present, else appended).
    pub fn set(&mut self, key: &str, value: J) {
        if let Some(v) = self.get_mut(key) {
            *v = value;
        } else if let J::Obj(f) = self {
            f.push((key.to_string(), value));
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<J> {
        match self {
            J::Obj(f) => {
                let i = f.iter().position(|(k, _)| k == key)?;
                Some(f.remove(i).1)
            }
            _ => None,
        }
    }

    pub fn push(&mut self, value: J) {
        if let J::Arr(a) = self {
            a.push(value);
        }
    }

    pub fn compact(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        self.write(&mut out, Style::Compact, 0);
        out
    }

    pub fn write_compact(&self, out: &mut Vec<u8>) {
        self.write(out, Style::Compact, 0);
    }

    /// Python's `json.dumps(value)` (`ensure_ascii` aside).
    pub fn python(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out, Style::Python, 0);
        out
    }

    /// Python's `json.dumps(value, indent=2)`: how key policies arrive in records.
    pub fn indented(&self) -> String {
        let mut out = Vec::new();
        self.write(&mut out, Style::Indent, 0);
        String::from_utf8(out).expect("JSON text is UTF-8")
    }

    fn write(&self, out: &mut Vec<u8>, style: Style, depth: usize) {
        match self {
            J::Null => out.extend_from_slice(b"null"),
            J::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            J::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
            J::Str(s) => string(out, s),
            J::Arr(items) => {
                out.push(b'[');
                for (i, v) in items.iter().enumerate() {
                    style.between(out, i, depth + 1);
                    v.write(out, style, depth + 1);
                }
                style.close(out, items.is_empty(), depth);
                out.push(b']');
            }
            J::Obj(fields) => {
                out.push(b'{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    style.between(out, i, depth + 1);
                    string(out, k);
                    out.extend_from_slice(if style == Style::Compact { b":" } else { b": " });
                    v.write(out, style, depth + 1);
                }
                style.close(out, fields.is_empty(), depth);
                out.push(b'}');
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Style {
    Compact,
    Python,
    Indent,
}

impl Style {
    fn between(self, out: &mut Vec<u8>, i: usize, depth: usize) {
        match self {
            Style::Compact if i > 0 => out.push(b','),
            Style::Python if i > 0 => out.extend_from_slice(b", "),
            Style::Indent => {
                if i > 0 {
                    out.push(b',');
                }
                out.push(b'\n');
                out.extend(std::iter::repeat_n(b' ', depth * 2));
            }
            _ => {}
        }
    }

    fn close(self, out: &mut Vec<u8>, empty: bool, depth: usize) {
        if self == Style::Indent && !empty {
            out.push(b'\n');
            out.extend(std::iter::repeat_n(b' ', depth * 2));
        }
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

impl From<&str> for J {
    fn from(s: &str) -> J {
        J::Str(s.to_string())
    }
}

impl From<String> for J {
    fn from(s: String) -> J {
        J::Str(s)
    }
}

impl From<&String> for J {
    fn from(s: &String) -> J {
        J::Str(s.clone())
    }
}

impl From<bool> for J {
    fn from(b: bool) -> J {
        J::Bool(b)
    }
}

impl From<i64> for J {
    fn from(i: i64) -> J {
        J::Int(i)
    }
}

/// `J::Obj` from `key => value` pairs, in order.
#[macro_export]
macro_rules! obj {
    ($($k:expr => $v:expr),* $(,)?) => {
        $crate::json::J::Obj(vec![$(($k.to_string(), $crate::json::J::from($v))),*])
    };
}

/// `J::Arr` from values.
#[macro_export]
macro_rules! arr {
    ($($v:expr),* $(,)?) => {
        $crate::json::J::Arr(vec![$($crate::json::J::from($v)),*])
    };
}

impl From<Vec<J>> for J {
    fn from(v: Vec<J>) -> J {
        J::Arr(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_match_python_and_compact_forms() {
        let v = obj! {"a" => 1i64, "b" => arr!["x", J::Null], "c" => obj!{}};
        assert_eq!(v.compact(), br#"{"a":1,"b":["x",null],"c":{}}"#);
        assert_eq!(v.python(), br#"{"a": 1, "b": ["x", null], "c": {}}"#);
        assert_eq!(
            v.indented(),
            "{\n  \"a\": 1,\n  \"b\": [\n    \"x\",\n    null\n  ],\n  \"c\": {}\n}"
        );
        let parsed: serde_json::Value =
            serde_json::from_slice(&obj! {"s" => "q\"\n\u{1}"}.compact()).unwrap();
        assert_eq!(parsed["s"], "q\"\n\u{1}");
    }
}
