//! JSON read strictly: a key given twice, in any object at any depth, is an error naming it.
//! serde_json keeps the last of two values silently (in a `Value`, a map, or a map field of a
//! typed struct), and which one a file meant must not be a guess. Used by the readers that take
//! objects key by key (cost-model files, JSONL traces and requests, [`object`]) and, before their
//! typed parse, by the readers of the project's own files (profiles, [`check_unique`]).

use serde::de::{Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A JSON value whose objects all have distinct keys.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Visit)
    }
}

struct Visit;

impl<'de> Visitor<'de> for Visit {
    type Value = Strict;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::String(v.to_owned())))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::String(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_none<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Strict, D::Error> {
        Strict::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Strict(Value::Array(out)))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(A::Error::custom(format!("key `{k}` is given twice")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Strict(Value::Object(out)))
    }
}

/// serde_json's message with its position as the reader of `text` would say it: "column C" for
/// a one-line text (a JSONL line: the caller names the file line), "line L column C" otherwise.
fn message(e: &serde_json::Error, text: &str) -> String {
    let full = e.to_string();
    let what = full.rsplit_once(" at line ").map_or(full.as_str(), |p| p.0);
    match (e.line(), text.contains('\n')) {
        (0, _) => what.to_string(),
        (_, false) => format!("{what} at column {}", e.column()),
        (l, true) => format!("{what} at line {l} column {}", e.column()),
    }
}

/// `text` as one JSON object whose objects (at every depth) have distinct keys, or a message:
/// "not valid JSON: ...", "key `k` is given twice at ...", or `not_object` when it is valid JSON
/// of another kind.
pub fn object(text: &str, not_object: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Strict>(text) {
        Ok(Strict(Value::Object(m))) => Ok(m),
        Ok(_) => Err(not_object.to_string()),
        Err(e) if e.is_data() => Err(message(&e, text)),
        Err(e) => Err(format!("not valid JSON: {}", message(&e, text))),
    }
}

/// Refuses JSON `text` with a key given twice in any object; other problems are left to the
/// typed parse that follows (`Ok` here). The error carries serde_json's line and column.
pub fn check_unique(text: &str) -> Result<(), serde_json::Error> {
    match serde_json::from_str::<Strict>(text) {
        Err(e) if e.is_data() => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::{check_unique, object};

    #[test]
    fn duplicates_at_any_depth_syntax_and_other_kinds_are_told_apart() {
        let m = object(
            r#"{"a": 1, "b": [1, {"a": 2, "c": null}], "d": -1.5e300}"#,
            "no",
        )
        .unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m["d"], -1.5e300);
        let e = object(r#"{"a": 1, "b": 2, "a": 1}"#, "no").unwrap_err();
        assert_eq!(e, "key `a` is given twice at column 20");
        let e = object("{\"t\": [{\"tp\": 2,\n \"tp\": 4}]}", "no").unwrap_err();
        assert_eq!(e, "key `tp` is given twice at line 2 column 5");
        assert_eq!(object("[1]", "no").unwrap_err(), "no");
        assert_eq!(object("3", "no").unwrap_err(), "no");
        let e = object(r#"{"a": 1"#, "no").unwrap_err();
        assert!(e.starts_with("not valid JSON: EOF"), "{e}");
        let e = object(r#"{"a": 1} x"#, "no").unwrap_err();
        assert!(
            e.starts_with("not valid JSON: trailing characters at column"),
            "{e}"
        );
        assert!(check_unique(r#"{"m": {"1": 5, "1": 6}}"#).is_err());
        assert!(check_unique(r#"{"m": {"1": 5, "2": 6}}"#).is_ok());
        assert!(
            check_unique("{").is_ok(),
            "syntax is left to the typed parse"
        );
    }
}
