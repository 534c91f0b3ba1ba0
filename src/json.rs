//! JSON objects read strictly: a key given twice is an error naming it. serde_json's `Value`
//! keeps the last of two values silently, and which one a file meant must not be a guess.
//! Used by the readers that take objects key by key (cost-model files, JSONL traces and
//! requests); typed readers (`#[derive(Deserialize)]`) refuse duplicates on their own.

use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

/// A JSON object whose keys are all distinct.
struct Unique(Map<String, Value>);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Unique;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
                let mut out = Map::new();
                while let Some((k, v)) = map.next_entry::<String, Value>()? {
                    if out.contains_key(&k) {
                        return Err(A::Error::custom(format!("key `{k}` is given twice")));
                    }
                    out.insert(k, v);
                }
                Ok(Unique(out))
            }
        }
        d.deserialize_map(Visit)
    }
}

/// `text` as one JSON object with distinct keys, or a message: "not valid JSON: ...", "key `k`
/// is given twice (...)", or `not_object` when it is valid JSON of another kind.
pub fn object(text: &str, not_object: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Unique>(text) {
        Ok(Unique(m)) => Ok(m),
        Err(e) if e.is_data() && e.to_string().contains("is given twice") => Err(e.to_string()),
        Err(e) if e.is_data() => Err(not_object.to_string()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::object;

    #[test]
    fn duplicates_syntax_and_other_kinds_are_told_apart() {
        let m = object(r#"{"a": 1, "b": [1, {"a": 2, "a": 3}]}"#, "not one").unwrap();
        assert_eq!(m.len(), 2, "only the top level is checked");
        let e = object(r#"{"a": 1, "b": 2, "a": 1}"#, "not one").unwrap_err();
        assert!(e.starts_with("key `a` is given twice"), "{e}");
        assert_eq!(object("[1]", "not one").unwrap_err(), "not one");
        assert_eq!(object("3", "not one").unwrap_err(), "not one");
        let e = object(r#"{"a": 1"#, "not one").unwrap_err();
        assert!(e.starts_with("not valid JSON"), "{e}");
        let e = object(r#"{"a": 1} x"#, "not one").unwrap_err();
        assert!(e.starts_with("not valid JSON"), "{e}");
    }
}
