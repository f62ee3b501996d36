//! Values that travel between Rust, the controller and the kernels.
//!
//! JSON-compatible values travel as JSON values (carried inside MessagePack frames). A Python
//! value with no faithful JSON form — a tuple, a set, a NumPy array, a float NaN, an int wider
//! than 64 bits — travels as pickle bytes together with its `repr`, so a Rust client can show it
//! and a Python client can use it.

use std::fmt::Write as _;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// A JSON value; the Python kernel sends it as the matching Python object.
    Json(serde_json::Value),
    /// A Python object with no JSON form (boxed: a value is as small as a JSON one, which
    /// matters with a million items queued).
    Pickle(Box<Pickled>),
    /// A Python object that could be neither JSON-encoded nor pickled (a module, an open
    /// file): only its `repr` came back.
    Opaque { repr: String },
}

/// A pickled Python object: its pickle (protocol 5), the buffers pickled out of band (a NumPy
/// array's data travels as one, never copied into the pickle), and its `repr`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pickled {
    pub repr: String,
    #[serde(with = "super::conn::shared_bytes")]
    pub bytes: Bytes,
    #[serde(with = "super::conn::shared_buffers")]
    pub buffers: Vec<Bytes>,
    /// The value as JSON with its tuples as lists, when that makes it JSON (`(1, 'a')`): what
    /// `--output json` shows for it. Never sent back to a kernel, where it would lose its
    /// tuples.
    pub json: Option<serde_json::Value>,
}

impl Value {
    /// The JSON form, if the value has one.
    pub fn as_json(&self) -> Option<&serde_json::Value> {
        match self {
            Value::Json(v) => Some(v),
            Value::Pickle(_) | Value::Opaque { .. } => None,
        }
    }

    /// The value as a Python programmer would see it: `repr` for pickled values, Python
    /// literal syntax for JSON ones (`None`, `True`, `'text'`).
    pub fn to_python_repr(&self) -> String {
        match self {
            Value::Pickle(p) => p.repr.clone(),
            Value::Opaque { repr } => repr.clone(),
            Value::Json(v) => python_repr(v),
        }
    }

    /// A pickled value with no out-of-band buffers.
    pub fn pickle(repr: impl Into<String>, bytes: impl Into<Bytes>) -> Self {
        Value::Pickle(Box::new(Pickled {
            repr: repr.into(),
            bytes: bytes.into(),
            buffers: Vec::new(),
            json: None,
        }))
    }

    /// The value as one JSON value, for a value nested inside another (a load-balanced apply's
    /// argument list): pickles become `{"__starling_pickle__": [pickle, buffer, …]}` in base64,
    /// which the kernel unpickles where it finds them.
    pub fn nested_json(&self) -> serde_json::Value {
        use base64::Engine as _;
        let b64 = |b: &Bytes| base64::engine::general_purpose::STANDARD.encode(b);
        match self {
            Value::Json(v) => v.clone(),
            Value::Pickle(p) => serde_json::json!({
                "__starling_pickle__": std::iter::once(&p.bytes).chain(&p.buffers).map(b64).collect::<Vec<_>>()
            }),
            Value::Opaque { repr } => serde_json::json!({ "__starling_opaque__": repr }),
        }
    }

    /// How many bytes the value's pickle and buffers hold (0 for JSON values).
    /// About how many bytes the value holds in memory: what bounds by bytes count.
    pub fn approx_bytes(&self) -> usize {
        fn json(v: &serde_json::Value) -> usize {
            match v {
                serde_json::Value::String(s) => 24 + s.len(),
                serde_json::Value::Array(a) => 24 + a.iter().map(json).sum::<usize>(),
                serde_json::Value::Object(o) => {
                    48 + o.iter().map(|(k, v)| 24 + k.len() + json(v)).sum::<usize>()
                }
                _ => 16,
            }
        }
        match self {
            Value::Json(v) => json(v),
            Value::Pickle(p) => {
                96 + p.repr.len() + self.pickled_len() + p.json.as_ref().map_or(0, json)
            }
            Value::Opaque { repr } => 24 + repr.len(),
        }
    }

    pub fn pickled_len(&self) -> usize {
        match self {
            Value::Pickle(p) => p.bytes.len() + p.buffers.iter().map(Bytes::len).sum::<usize>(),
            Value::Json(_) | Value::Opaque { .. } => 0,
        }
    }
}

impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        Value::Json(v)
    }
}

macro_rules! from_json_scalar {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Json(serde_json::Value::from(v))
            }
        }
    )*};
}

from_json_scalar!(bool, i32, i64, u32, u64, f64, &str, String);

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_python_repr())
    }
}

fn python_repr(v: &serde_json::Value) -> String {
    use serde_json::Value as J;
    match v {
        J::Null => "None".into(),
        J::Bool(true) => "True".into(),
        J::Bool(false) => "False".into(),
        J::Number(n) => {
            if n.is_f64() {
                let x = n.as_f64().unwrap_or(f64::NAN);
                // Rust's `{:?}` and Python's `repr` agree on digits and on when to switch to an
                // exponent; Python writes the exponent signed and with at least two digits.
                let s = format!("{x:?}");
                match s.split_once('e') {
                    Some((mantissa, exp)) => {
                        let e: i32 = exp.parse().unwrap_or(0);
                        let sign = if e < 0 { '-' } else { '+' };
                        format!("{mantissa}e{sign}{:02}", e.abs())
                    }
                    None => s,
                }
            } else {
                n.to_string()
            }
        }
        J::String(s) => python_str(s),
        J::Array(items) => {
            let inner: Vec<String> = items.iter().map(python_repr).collect();
            format!("[{}]", inner.join(", "))
        }
        J::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", python_str(k), python_repr(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
    }
}

fn python_str(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_values_print_as_python_would() {
        let cases = [
            (json!(null), "None"),
            (json!(true), "True"),
            (json!(5050), "5050"),
            (json!(0.5), "0.5"),
            (json!(1.0), "1.0"),
            (json!(1e300), "1e+300"),
            (json!(1e-5), "1e-05"),
            (json!(1.5e16), "1.5e+16"),
            (json!(0.0001), "0.0001"),
            (json!("it's"), "\"it's\""),
            (json!("a\nb"), "'a\\nb'"),
            (json!([1, "x", null]), "[1, 'x', None]"),
            (json!({"a": [1, 2]}), "{'a': [1, 2]}"),
        ];
        for (v, want) in cases {
            assert_eq!(Value::Json(v).to_python_repr(), want);
        }
    }

    #[test]
    fn pickled_values_show_their_repr() {
        let v = Value::pickle("(1, 2)", vec![1, 2, 3]);
        assert_eq!(v.to_string(), "(1, 2)");
        assert!(v.as_json().is_none());
    }
}
