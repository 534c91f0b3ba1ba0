//! Rollout length traces from what others write: VeRL's generation dumps and Mooncake traces.
//!
//! - **VeRL** (`trainer.rollout_data_dir`): one JSONL file per training step, a line per
//!   response with the decoded prompt `input`, the decoded response `output` (both with special
//!   tokens skipped) and the `step`; other keys (`score`, `gts`, reward extras) are ignored. The
//!   lengths are the text re-tokenized: the prompt with the tokenizer's own special tokens (what
//!   the engine would prefill, less the chat template's markers the dump dropped), the response
//!   without them plus one for the end-of-sequence token the dump dropped, at most the cap. The
//!   responses to one prompt text are one GRPO group wherever they stand (VeRL generates a
//!   prompt's `n` responses side by side, but its `balance_batch`, on by default, reorders the
//!   batch before the dump), or, given the group size, every that many of them (a prompt that
//!   stands in the batch twice). The trace lists the groups one after another, in the order
//!   their prompts first appear: the batch as VeRL placed it for generation, contiguous groups.
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
/// dumps; `progress(total)` is called once per response tokenized (from several threads), with
/// how many there are to tokenize.
pub fn import(
    path: &Path,
    text: &str,
    opts: &ImportOptions,
    tokenizer: Option<&Tokenizer>,
    progress: &(dyn Fn(usize) + Sync),
) -> Result<Imported> {
    if opts.cap == Some(0) || opts.group_size == Some(0) {
        return Err(Error::Invalid(
            "cap and group size must be at least 1".into(),
        ));
    }
    match opts.source {
        Source::Mooncake if opts.step.is_some() || opts.group_size.is_some() => Err(
            Error::Invalid("a Mooncake trace has no steps or prompt groups to choose by".into()),
        ),
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
    progress: &(dyn Fn(usize) + Sync),
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
    let groups = group_of(path, &kept, opts.group_size)?;
    let counted = kept
        .par_iter()
        .map(|l| {
            let prompt = tok.count(&l.input, true)?;
            let response = tok.count(&l.output, false)?;
            progress(kept.len());
            Ok((prompt, response))
        })
        .collect::<Vec<Result<_>>>()
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut requests = Vec::with_capacity(kept.len());
    let mut lines = Vec::with_capacity(kept.len());
    let mut cut = 0;
    for (g, members) in groups.iter().enumerate() {
        for &i in members {
            let (l, (prompt, response)) = (&kept[i], counted[i]);
            // Plus the end-of-sequence token the dump skipped; cut at the cap, where there is
            // none.
            let mut response_len = response.saturating_add(1);
            if let Some(c) = opts.cap.filter(|&c| response_len > c) {
                if response > c {
                    cut += 1;
                }
                response_len = c;
            }
            for (what, n) in [("input", prompt), ("output", response_len)] {
                if n > MAX_TRACE_LEN {
                    return Err(input_err(
                        path,
                        l.line,
                        format!(
                            "the {what} is {n} tokens, longer than any model's context (at most \
                             {MAX_TRACE_LEN})"
                        ),
                    ));
                }
            }
            requests.push(TraceRequest {
                prompt_len: prompt.max(1),
                response_len,
                input_ids: None,
                group: Some(g),
            });
            lines.push(l.line);
        }
    }
    Ok(Imported {
        trace: Trace { requests },
        steps,
        skipped,
        groups: groups.len(),
        cut,
        lines,
    })
}

/// The groups of the kept lines (indices, each group in file order), groups in the order their
/// prompt first appears: the responses to one prompt text wherever they stand (VeRL's
/// `balance_batch`, on by default, reorders the batch before it dumps it), split into groups of
/// `size` when given (a prompt that stands in the batch twice gives two groups), which must then
/// divide each prompt's count.
fn group_of(path: &Path, kept: &[VerlLine], size: Option<usize>) -> Result<Vec<Vec<usize>>> {
    let mut by_text: std::collections::HashMap<&str, usize> = Default::default();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, l) in kept.iter().enumerate() {
        let g = *by_text.entry(l.input.as_str()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    let Some(n) = size else {
        return Ok(groups);
    };
    let mut out = Vec::with_capacity(groups.len());
    for members in groups {
        if !members.len().is_multiple_of(n) {
            return Err(input_err(
                path,
                kept[members[0]].line,
                format!(
                    "this prompt has {} responses in the batch, not a multiple of the group size \
                     {n}",
                    members.len()
                ),
            ));
        }
        out.extend(members.chunks(n).map(<[usize]>::to_vec));
    }
    Ok(out)
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
