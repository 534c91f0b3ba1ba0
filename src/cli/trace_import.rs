//! `pat trace import`: a trace from another tool's output (VeRL generation dumps, Mooncake
//! traces), so the simulator and rollouts replay a real length distribution.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use pat::error::{Error, Result};
use pat::model::tokenizer::Tokenizer;
use pat::policy::import::{import, ImportOptions, Imported, Source};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ImportFormat {
    /// VeRL's generation dump (`trainer.rollout_data_dir=DIR` writes DIR/STEP.jsonl): decoded
    /// `input` and `output` text per response, re-tokenized with --tokenizer; the responses to
    /// one prompt are one GRPO group wherever they stand in the file (VeRL's balance_batch
    /// reorders them), listed together in the trace.
    Verl,
    /// A Mooncake trace: `input_length` and `output_length` (or `input_tokens` /
    /// `output_tokens`) per line; timestamps ignored, the requests taken as one batch.
    Mooncake,
}

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The file to convert (`-`: standard input).
    pub file: PathBuf,
    /// What wrote the file [default: told by the first line's keys].
    #[arg(long, value_enum)]
    pub format: Option<ImportFormat>,
    /// Verl: the policy model's tokenizer (tokenizer.json, or the model directory holding it).
    /// The dump's text is re-tokenized, so lengths can differ from the rollout's: prompts lack
    /// the chat template's markers the dump dropped, and sampled text may encode to a few
    /// tokens fewer than were generated (a response cut at the cap can come back just under it).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Verl: the training step to take (needed when the file holds several; one step is one
    /// synchronous batch).
    #[arg(long)]
    pub step: Option<u64>,
    /// Response cap (VeRL's `data.max_response_length`): longer responses are cut to it, and a
    /// response that reached it counts as at the cap (no end-of-sequence token).
    #[arg(long, value_parser = super::common::count)]
    pub cap: Option<usize>,
    /// Verl: responses per prompt (`rollout.n`): each prompt's responses are split into groups
    /// of this many (a prompt that stands in the batch twice makes two), and a prompt whose
    /// count it does not divide is an error [default: all responses to a prompt, one group].
    #[arg(long, value_parser = super::common::count)]
    pub group_size: Option<usize>,
    /// Write here instead of stdout (`-`: stdout).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The format the first non-blank line's keys say, or a message naming them.
fn detect(path: &Path, text: &str) -> Result<ImportFormat> {
    let Some((i, line)) = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            (
                i,
                if i == 0 {
                    l.trim_start_matches('\u{feff}')
                } else {
                    l
                },
            )
        })
        .find(|(_, l)| !l.trim().is_empty())
    else {
        return Err(Error::Input {
            path: path.to_path_buf(),
            line: 0,
            msg: "empty file: no lines to import".into(),
        });
    };
    let err = |msg: String| Error::Input {
        path: path.to_path_buf(),
        line: i + 1,
        msg,
    };
    let obj = pat::json::object(line, "each line must be a JSON object").map_err(err)?;
    let has = |k: &str| obj.contains_key(k);
    if has("input") && has("output") {
        Ok(ImportFormat::Verl)
    } else if has("input_length") || has("input_tokens") {
        Ok(ImportFormat::Mooncake)
    } else if has("prompt_len") && has("response_len") {
        Err(err(
            "this is already a pat trace (`prompt_len`, `response_len`): use it as it is".into(),
        ))
    } else {
        let keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
        Err(err(format!(
            "cannot tell what wrote this line (keys: {}); give --format (verl: `input` and \
             `output` text; mooncake: `input_length` and `output_length`)",
            keys.join(", ")
        )))
    }
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        Tokenizer::load_dir(path)?.ok_or_else(|| {
            Error::Usage(format!(
                "--tokenizer {}: the directory holds no tokenizer.json",
                path.display()
            ))
        })
    } else {
        Tokenizer::load(path)
    }
}

/// Reads the file and converts it, as `pat trace import` does.
pub fn convert(a: &ImportArgs) -> Result<(PathBuf, Imported)> {
    let (path, text) = super::common::read_input(&a.file)?;
    let format = match a.format {
        Some(f) => f,
        None => detect(&path, &text)?,
    };
    let tokenizer = match format {
        ImportFormat::Mooncake => {
            for (flag, given) in [
                ("--tokenizer", a.tokenizer.is_some()),
                ("--step", a.step.is_some()),
                ("--group-size", a.group_size.is_some()),
            ] {
                if given {
                    return Err(Error::Usage(format!(
                        "{flag} is for VeRL dumps; a Mooncake trace carries token counts and no \
                         steps or groups"
                    )));
                }
            }
            None
        }
        ImportFormat::Verl => Some(load_tokenizer(a.tokenizer.as_deref().ok_or_else(
            || {
                Error::Usage(
                    "a VeRL dump holds text: give --tokenizer (the policy model's tokenizer.json \
                     or its directory) to count its tokens"
                        .into(),
                )
            },
        )?)?),
    };
    let opts = ImportOptions {
        source: match format {
            ImportFormat::Verl => Source::Verl,
            ImportFormat::Mooncake => Source::Mooncake,
        },
        step: a.step,
        cap: a.cap,
        group_size: a.group_size,
    };
    let pb = match format {
        ImportFormat::Verl => super::common::progress(0, "tokenizing"),
        ImportFormat::Mooncake => indicatif::ProgressBar::hidden(),
    };
    let r = import(&path, &text, &opts, tokenizer.as_ref(), &|total| {
        pb.set_length(total as u64);
        pb.inc(1);
    });
    pb.finish_and_clear();
    let r = r.map_err(|e| match e {
        // The library's words for a step that must be chosen, as the flag.
        Error::Input { path, line, msg } => Error::Input {
            path,
            line,
            msg: msg.replace("with a step", "with --step"),
        },
        e => e,
    })?;
    Ok((path, r))
}

/// One line saying what was imported, for stderr.
pub fn summary(path: &Path, a: &ImportArgs, r: &Imported) -> String {
    let n = r.trace.requests.len();
    let mut s = format!("imported {n} responses from {}", path.display());
    if let Some(step) = a.step.or_else(|| r.steps.first().copied()) {
        s += &format!(" (step {step}");
        if r.skipped > 0 {
            s += &format!("; {} lines of other steps left out", r.skipped);
        }
        s += ")";
    }
    // The trace's own group counts (`Trace::stats`), as `pat trace stats` prints them.
    match r.trace.stats(None).groups {
        Some(g) if g.min_size == g.max_size => {
            s += &format!(", {} groups of {}", g.count, g.min_size)
        }
        Some(g) => {
            s += &format!(
                ", {} groups of {} to {} (give --group-size if a prompt stands in the batch more \
                 than once)",
                g.count, g.min_size, g.max_size
            )
        }
        None => {}
    }
    if let Some(cap) = a.cap {
        s += &format!(", {} cut to --cap {cap}", r.cut);
    }
    s
}
