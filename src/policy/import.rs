//! Rollout length traces from what others write: VeRL's generation dumps and Mooncake traces.
//!
//! - **VeRL** (`trainer.rollout_data_dir`): one JSONL file per training step, a line per
//!   response with the decoded prompt `input`, the decoded response `output` (both with special
//!   tokens skipped) and the `step`; other keys (`score`, `gts`, reward extras) are ignored. The
//!   lengths are the text re-tokenized: the prompt with the tokenizer's own special tokens (what
//!   the engine would prefill, less the chat template's markers the dump dropped), the response
//!   without them plus one for the end-of-sequence token the dump dropped, at most the cap. The
//!   `n` responses of a prompt sit together (VeRL repeats each prompt interleaved), so a run of
//!   equal `input` lines is one GRPO group, or, given a group size, every that many lines.
//! - **Mooncake** (SGLang's `bench_serving`, AIPerf, Dynamo): `input_length` and
//!   `output_length` per line (or `input_tokens` / `output_tokens`); timestamps and hash ids are
//!   ignored, the requests taken as one synchronous batch.
//!
//! Errors name the file and line; nothing is guessed: a line without the keys its format needs,
//! a dump mixing steps without one chosen, or a group size that does not divide the batch is an
//! error.

use std::collections::BTreeSet;
use std::path::Path;

use rayon::prelude::*;
use serde_json::{Map, Value};

use super::trace::{positive, Trace, TraceRequest, MAX_TRACE_LEN};
use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;

/// What wrote the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// VeRL's generation dump (decoded text; needs a tokenizer).
    Verl,
    /// A Mooncake trace (token counts).
    Mooncake,
}

/// How to read the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImportOptions {
    pub source: Source,
    /// VeRL: keep the lines of this training step only (needed when the file holds several).
    pub step: Option<u64>,
    /// Responses longer than this are cut to it (a capped generation has none longer).
    pub cap: Option<usize>,
    /// VeRL: every this many consecutive responses are one prompt's group (default: each run of
    /// equal prompts).
    pub group_size: Option<usize>,
}

/// An imported batch and what the import did.
#[derive(Clone, Debug, PartialEq)]
pub struct Imported {
    pub trace: Trace,
    /// The steps the file holds (VeRL; empty when its lines carry none).
    pub steps: Vec<u64>,
    /// Lines of other steps left out.
    pub skipped: usize,
    /// Prompt groups (0: the source has none).
    pub groups: usize,
    /// Responses cut to the cap.
    pub cut: usize,
    /// The file line of each request (1-based).
    pub lines: Vec<usize>,
}

/// One VeRL line: its file line, step and texts.
struct VerlLine {
    line: usize,
    step: Option<u64>,
    input: String,
    output: String,
}

fn input_err(path: &Path, line: usize, msg: String) -> Error {
    Error::Input {
        path: path.to_path_buf(),
        line,
        msg,
    }
}

/// The JSON objects of `text`, one per non-blank line, with their line numbers.
fn objects(path: &Path, text: &str) -> Result<Vec<(usize, Map<String, Value>)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = if i == 0 {
            crate::model::config::strip_bom(line)
        } else {
            line
        };
        if line.trim().is_empty() {
            continue;
        }
        let obj = crate::json::object(line, "each line must be a JSON object")
            .map_err(|m| input_err(path, i + 1, m))?;
        out.push((i + 1, obj));
    }
    if out.is_empty() {
        return Err(input_err(path, 0, "empty file: no lines to import".into()));
    }
    Ok(out)
}

/// Reads the batch in `text` (from `path`, named in messages). `tokenizer` is required for VeRL
/// dumps; `progress` is called once per response tokenized (from several threads).
pub fn import(
    path: &Path,
    text: &str,
    opts: &ImportOptions,
    tokenizer: Option<&Tokenizer>,
    progress: &(dyn Fn() + Sync),
) -> Result<Imported> {
    if opts.cap == Some(0) || opts.group_size == Some(0) {
        return Err(Error::Invalid(
            "cap and group size must be at least 1".into(),
        ));
    }
    match opts.source {
        Source::Mooncake => mooncake(path, text, opts),
        Source::Verl => {
            let tok = tokenizer.ok_or_else(|| {
                Error::Invalid("a VeRL dump holds text: it needs a tokenizer to count".into())
            })?;
            verl(path, text, opts, tok, progress)
        }
    }
}

fn mooncake(path: &Path, text: &str, opts: &ImportOptions) -> Result<Imported> {
    let mut requests = Vec::new();
    let (mut lines, mut cut) = (Vec::new(), 0);
    for (line, obj) in objects(path, text)? {
        let field = |names: [&str; 2]| -> Result<usize> {
            let (key, v) = names
                .iter()
                .find_map(|k| obj.get(*k).map(|v| (*k, v)))
                .ok_or_else(|| {
                    input_err(
                        path,
                        line,
                        format!("missing `{}` (or `{}`)", names[0], names[1]),
                    )
                })?;
            positive(v, key).map_err(|m| input_err(path, line, m))
        };
        let prompt_len = field(["input_length", "input_tokens"])?;
        let mut response_len = field(["output_length", "output_tokens"])?;
        if let Some(c) = opts.cap.filter(|&c| response_len > c) {
            response_len = c;
            cut += 1;
        }
        requests.push(TraceRequest {
            prompt_len,
            response_len,
            input_ids: None,
            group: None,
        });
        lines.push(line);
    }
    Ok(Imported {
        trace: Trace { requests },
        steps: Vec::new(),
        skipped: 0,
        groups: 0,
        cut,
        lines,
    })
}

fn verl_line(path: &Path, line: usize, obj: &Map<String, Value>) -> Result<VerlLine> {
    let text = |key: &str| -> Result<String> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(input_err(
                path,
                line,
                format!("`{key}` must be the decoded text, got {v}"),
            )),
            None => Err(input_err(
                path,
                line,
                format!("missing `{key}` (a VeRL generation dump has `input` and `output`)"),
            )),
        }
    };
    let step = match obj.get("step") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            input_err(
                path,
                line,
                format!("`step` must be a non-negative integer, got {v}"),
            )
        })?),
    };
    Ok(VerlLine {
        line,
        step,
        input: text("input")?,
        output: text("output")?,
    })
}

fn verl(
    path: &Path,
    text: &str,
    opts: &ImportOptions,
    tok: &Tokenizer,
    progress: &(dyn Fn() + Sync),
) -> Result<Imported> {
    let all = objects(path, text)?
        .iter()
        .map(|(line, obj)| verl_line(path, *line, obj))
        .collect::<Result<Vec<_>>>()?;
    let steps: BTreeSet<u64> = all.iter().filter_map(|l| l.step).collect();
    let steps: Vec<u64> = steps.into_iter().collect();
    let total = all.len();
    let kept: Vec<VerlLine> = match opts.step {
        Some(s) => {
            if let Some(l) = all.iter().find(|l| l.step.is_none()) {
                return Err(input_err(
                    path,
                    l.line,
                    format!("no `step` on this line, so it cannot be chosen by step {s}"),
                ));
            }
            let kept: Vec<VerlLine> = all.into_iter().filter(|l| l.step == Some(s)).collect();
            if kept.is_empty() {
                return Err(input_err(
                    path,
                    0,
                    format!(
                        "no line of step {s} (the file holds steps {})",
                        list(&steps)
                    ),
                ));
            }
            kept
        }
        None if steps.len() > 1 => {
            return Err(input_err(
                path,
                0,
                format!(
                    "the file holds steps {}: choose one (one synchronous batch) with a step",
                    list(&steps)
                ),
            ))
        }
        None => all,
    };
    let skipped = total - kept.len();
    let groups = group_ids(path, &kept, opts.group_size)?;
    let counted = kept
        .par_iter()
        .map(|l| {
            let prompt = tok.count(&l.input, true)?;
            let response = tok.count(&l.output, false)?;
            progress();
            Ok((prompt, response))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut requests = Vec::with_capacity(kept.len());
    let mut cut = 0;
    for ((l, (prompt, response)), group) in kept.iter().zip(counted).zip(&groups) {
        let too_long = |what: &str, n: usize| {
            input_err(
                path,
                l.line,
                format!("the {what} is {n} tokens, longer than any model's context (at most {MAX_TRACE_LEN})"),
            )
        };
        if prompt > MAX_TRACE_LEN {
            return Err(too_long("input", prompt));
        }
        if response > MAX_TRACE_LEN {
            return Err(too_long("output", response));
        }
        // Plus the end-of-sequence token the dump skipped; cut at the cap, where there is none.
        let mut response_len = response + 1;
        if let Some(c) = opts.cap.filter(|&c| response_len > c) {
            if response > c {
                cut += 1;
            }
            response_len = c;
        }
        requests.push(TraceRequest {
            prompt_len: prompt.max(1),
            response_len,
            input_ids: None,
            group: Some(*group),
        });
    }
    Ok(Imported {
        trace: Trace { requests },
        steps,
        skipped,
        groups: groups.last().map_or(0, |g| g + 1),
        cut,
        lines: kept.iter().map(|l| l.line).collect(),
    })
}

/// Each kept line's group: every `size` lines, or each run of equal prompts.
fn group_ids(path: &Path, kept: &[VerlLine], size: Option<usize>) -> Result<Vec<usize>> {
    match size {
        Some(n) if !kept.len().is_multiple_of(n) => Err(input_err(
            path,
            0,
            format!(
                "{} responses do not split into groups of {n} (left over: {})",
                kept.len(),
                kept.len() % n
            ),
        )),
        Some(n) => Ok((0..kept.len()).map(|i| i / n).collect()),
        None => {
            let mut ids = Vec::with_capacity(kept.len());
            for (i, l) in kept.iter().enumerate() {
                let g = match ids.last() {
                    None => 0,
                    Some(&g) if kept[i - 1].input == l.input => g,
                    Some(&g) => g + 1,
                };
                ids.push(g);
            }
            Ok(ids)
        }
    }
}

fn list(steps: &[u64]) -> String {
    let shown: Vec<String> = steps.iter().take(8).map(|s| s.to_string()).collect();
    match steps.len() {
        n if n > 8 => format!("{} .. ({n} in all)", shown.join(", ")),
        _ => shown.join(", "),
    }
}

#[cfg(test)]
mod tests;
