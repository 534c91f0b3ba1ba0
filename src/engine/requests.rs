//! Request files: JSONL, one `{"input_ids":[...]}` or `{"prompt":"..."}` per line.

use std::path::Path;

use serde_json::Value;

use crate::engine::Request;
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

/// Parses a JSONL request file. Blank lines are skipped; every other line must be an object with
/// `input_ids` (list of token ids) or `prompt` (text, needs a tokenizer), and optionally
/// `max_new_tokens` and `ignore_eos` (defaults given).
pub fn parse_requests_jsonl(
    path: &Path,
    text: &str,
    tok: Option<&Tokenizer>,
    default_max_new: usize,
    default_ignore_eos: bool,
) -> Result<Vec<Request>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |msg: String| Error::Input {
            path: path.to_path_buf(),
            line: line_no,
            msg,
        };
        if line.trim().is_empty() {
            continue;
        }
        let line = if i == 0 {
            crate::model::config::strip_bom(line)
        } else {
            line
        };
        let obj = crate::json::object(line, "each line must be a JSON object").map_err(err)?;
        for key in obj.keys() {
            if !["input_ids", "prompt", "max_new_tokens", "ignore_eos"].contains(&key.as_str()) {
                return Err(err(format!(
                    "unknown key `{key}` (expected input_ids, prompt, max_new_tokens, ignore_eos)"
                )));
            }
        }
        let input_ids = match (obj.get("input_ids"), obj.get("prompt")) {
            (Some(ids), None) => ids
                .as_array()
                .ok_or_else(|| err("`input_ids` must be a list of token ids".into()))?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| err(format!("`input_ids` holds {x}, not a token id")))
                })
                .collect::<Result<Vec<u32>>>()?,
            (None, Some(p)) => {
                let p = p
                    .as_str()
                    .ok_or_else(|| err("`prompt` must be a string".into()))?;
                let tok = tok.ok_or_else(|| err("`prompt` needs a tokenizer.json in the model directory; give input_ids instead".into()))?;
                tok.encode(p)?
            }
            (Some(_), Some(_)) => return Err(err("give `input_ids` or `prompt`, not both".into())),
            (None, None) => return Err(err("missing `input_ids` or `prompt`".into())),
        };
        let max_new_tokens = match obj.get("max_new_tokens") {
            None => default_max_new,
            Some(x) => x
                .as_u64()
                .filter(|&n| n > 0)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    err(format!(
                        "`max_new_tokens` must be a positive integer, got {x}"
                    ))
                })?,
        };
        let ignore_eos = match obj.get("ignore_eos") {
            None => default_ignore_eos,
            Some(Value::Bool(b)) => *b,
            Some(x) => return Err(err(format!("`ignore_eos` must be true or false, got {x}"))),
        };
        out.push(Request {
            input_ids,
            max_new_tokens,
            ignore_eos,
        });
    }
    if out.is_empty() {
        return Err(Error::Input {
            path: path.to_path_buf(),
            line: 0,
            msg: "no requests in file".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Request>> {
        parse_requests_jsonl(Path::new("r.jsonl"), text, None, 8, false)
    }

    #[test]
    fn good_lines_with_defaults_and_overrides() {
        let r = parse("{\"input_ids\":[1,2,3]}\n\n{\"input_ids\":[4],\"max_new_tokens\":2,\"ignore_eos\":true}\n").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].max_new_tokens, r[0].ignore_eos), (8, false));
        assert_eq!(
            (r[1].input_ids.clone(), r[1].max_new_tokens, r[1].ignore_eos),
            (vec![4], 2, true)
        );
    }

    #[test]
    fn bad_lines_name_the_line() {
        for (text, needle) in [
            ("{\"input_ids\":[1]}\n{oops", "r.jsonl:2: not valid JSON"),
            ("[1,2]", ":1: each line must be a JSON object"),
            ("{\"input_ids\":[1,-2]}", "not a token id"),
            ("{\"prompt\":\"hi\"}", "needs a tokenizer"),
            (
                "{\"input_ids\":[1],\"max_new_tokens\":0}",
                "positive integer",
            ),
            ("{\"input_ids\":[1],\"temp\":1}", "unknown key `temp`"),
            ("{}", "missing `input_ids`"),
            ("\n\n", "no requests"),
        ] {
            let msg = parse(text).unwrap_err().to_string();
            assert!(msg.contains(needle), "{text:?}: {msg}");
        }
    }
}
