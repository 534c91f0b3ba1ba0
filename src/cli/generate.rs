//! `pat generate`: run requests through the engine and print one JSON object per request.

use std::path::PathBuf;
use std::time::Instant;

use clap::{ArgGroup, Args};

use super::common::{open_model, plural, progress, record_lines};
use pat::engine::parse_requests_jsonl;
use pat::engine::sequence::prefill_rate;
use pat::engine::{check_lengths, check_request, Engine, EngineOptions, Output, Request};
use pat::error::{Error, Result};
use pat::model::sampling::SamplingParams;
use pat::model::tokenizer::Tokenizer;
use pat::reshard::cost::CostModel;

#[derive(Args, Debug)]
#[command(group(ArgGroup::new("input").required(true).args(["prompt", "prompt_ids", "requests"])))]
pub struct GenerateArgs {
    /// HF model directory (config.json, model.safetensors[.index.json], optional tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Number of ranks (threads on the CPU backend, GPU workers on cuda).
    #[arg(long, default_value_t = 1, value_parser = super::common::ranks)]
    pub world: usize,
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// Tensor-parallel degree; must divide --world, the heads, the KV heads and the intermediate size.
    #[arg(long, default_value_t = 1, value_parser = super::common::count)]
    pub tp: usize,
    /// Weight precision. The CPU reference computes in f32 and rounds the weights to bf16/f16;
    /// on cuda the weights, activations and KV cache are stored in it (f32 math in the kernels).
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    pub dtype: pat::Dtype,
    /// New tokens per request (a request file's `max_new_tokens` overrides it).
    #[arg(long, default_value_t = 32, value_parser = super::common::count)]
    pub max_new_tokens: usize,
    /// Do not stop at EOS tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = super::common::temperature)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0, value_parser = super::common::share_f32)]
    pub top_p: f32,
    /// Seed for sampling; each request draws from its own stream.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A text prompt (needs tokenizer.json); repeat it for a batch, one request per occurrence,
    /// numbered from 0 in order. The tokenizer adds its BOS token where it has one, so "" is BOS
    /// alone; a prompt that tokenizes to nothing is refused.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// A prompt as comma-separated token ids, e.g. 1,2,3; repeat it for a batch, one request per
    /// occurrence (`--prompt-ids 1,2 --prompt-ids 3` is two requests).
    #[arg(long, value_name = "IDS", value_parser = token_ids)]
    pub prompt_ids: Vec<TokenIds>,
    /// JSONL file, one request per line: {"input_ids":[...]} or {"prompt":"..."}, optional
    /// "max_new_tokens" and "ignore_eos"; `-` reads standard input.
    #[arg(long)]
    pub requests: Option<PathBuf>,
    /// Tokens per KV block.
    #[arg(long, default_value_t = 16, value_parser = super::common::count)]
    pub block_size: usize,
    /// KV blocks per rank (default: enough for every request at once, at least 64 MiB per rank,
    /// so that a switch to a smaller tp still finds room for the larger weight shards).
    #[arg(long, value_parser = super::common::count)]
    pub kv_blocks: Option<usize>,
    /// The most prompt tokens one step prefills, decodes not counted (default: what the step's
    /// memory cap allows). A longer queue is prefilled over more steps and a longer prompt in
    /// chunks; a lower cap shortens the steps that keep running requests waiting on a prefill.
    #[arg(long, value_name = "N", value_parser = super::common::at_least_one)]
    pub prefill_tokens: Option<std::num::NonZeroUsize>,
    /// Switch the TP degree live after STEP decode steps (repeatable, each at its own STEP), e.g.
    /// --reconfigure 8:4.
    /// Steps are counted after the first (the prefill; a queue whose activations outgrow what a
    /// step may hold, half the available memory on the CPU, each rank's share of its GPU's free
    /// memory on GPUs, or --prefill-tokens, is prefilled over several steps, a long prompt in
    /// chunks; they count too).
    /// Switch records go to stderr as JSON.
    #[arg(long, value_name = "STEP:TP")]
    pub reconfigure: Vec<super::switch::SwitchAt>,
    /// How unfinished sequences' KV reaches the new layout: migrate, recompute, or auto (a
    /// cost model from the measured copy bandwidth and this run's prefill rate picks per sequence).
    #[arg(long, default_value = "auto")]
    pub kv_transfer: pat::reshard::cost::KvPolicy,
}

/// One `--prompt-ids` occurrence: the token ids of one prompt.
#[derive(Clone, Debug)]
pub struct TokenIds(Vec<u32>);

/// Parses `1,2,3` (spaces around an id allowed) into token ids; an empty list is kept, for the
/// empty-prompt check to refuse with its own message.
fn token_ids(s: &str) -> std::result::Result<TokenIds, String> {
    if s.trim().is_empty() {
        return Ok(TokenIds(Vec::new()));
    }
    s.split(',')
        .map(|id| match id.trim() {
            "" => Err("an empty token id (a stray comma?)".to_string()),
            id => id
                .parse::<u32>()
                .map_err(|e| format!("token id {id:?}: {e}")),
        })
        .collect::<std::result::Result<_, _>>()
        .map(TokenIds)
}

/// Where the requests came from, for messages.
enum Source {
    /// `--prompt` or `--prompt-ids`: a request per occurrence, in order.
    Flag(&'static str),
    /// A request file (`<stdin>` for `-`) and its text, to name each request's line.
    File { path: PathBuf, text: String },
}

impl Source {
    /// Where request `i` came from, to prefix an error about it: the flag, or "FILE:LINE" (the
    /// file's lines counted again: for an error, once).
    fn at(&self, i: usize) -> String {
        match self {
            Source::Flag(flag) => flag.to_string(),
            Source::File { path, text } => {
                let line = record_lines(text).get(i).copied().unwrap_or(0);
                format!("{}:{line}", path.display())
            }
        }
    }
}

/// Collects the requests named by exactly one of --prompt, --prompt-ids, --requests.
fn requests(a: &GenerateArgs, tok: Option<&Tokenizer>) -> Result<(Vec<Request>, Source)> {
    if a.max_new_tokens == 0 {
        return Err(Error::Invalid("--max-new-tokens must be at least 1".into()));
    }
    let from_flag = |prompts: Vec<Vec<u32>>, flag| {
        let reqs = prompts
            .into_iter()
            .map(|input_ids| Request {
                input_ids,
                max_new_tokens: a.max_new_tokens,
                ignore_eos: a.ignore_eos,
            })
            .collect();
        Ok((reqs, Source::Flag(flag)))
    };
    if !a.prompt.is_empty() {
        let tok = tok.ok_or_else(|| {
            Error::Invalid(format!(
                "--prompt needs {}/tokenizer.json; use --prompt-ids",
                a.model.display()
            ))
        })?;
        let ids = a
            .prompt
            .iter()
            .map(|p| tok.encode(p))
            .collect::<Result<_>>()?;
        return from_flag(ids, "--prompt");
    }
    if !a.prompt_ids.is_empty() {
        let ids = a.prompt_ids.iter().map(|t| t.0.clone()).collect();
        return from_flag(ids, "--prompt-ids");
    }
    let path = a
        .requests
        .as_ref()
        .ok_or_else(|| Error::Invalid("give --prompt, --prompt-ids or --requests".into()))?;
    let (path, text) = super::common::read_input(path)?;
    let reqs = parse_requests_jsonl(&path, &text, tok, a.max_new_tokens, a.ignore_eos)?;
    Ok((reqs, Source::File { path, text }))
}

/// Why a request has no prompt tokens, as the user wrote it: an empty `input_ids`, or a text
/// prompt the tokenizer turned into nothing (it adds no BOS token). An empty text prompt is
/// BOS alone where the tokenizer adds one: a valid one-token prompt, never refused.
fn empty_prompt(text: Option<&str>, ids_key: &str, text_key: &str) -> String {
    match text {
        Some(t) => format!(
            "{text_key} {t:?} tokenizes to no tokens (the model's tokenizer adds no BOS token), \
             and a request needs at least one prompt token"
        ),
        None => {
            format!("empty prompt: {ids_key} holds no token ids, and a request needs at least one")
        }
    }
}

/// Checks every request against the model before any pool or engine is built; the message names
/// where the request came from: the flag, or the file and line (1-based), and the request
/// (0-based, as the library's errors and the outputs' `index` number them).
fn check_requests(
    a: &GenerateArgs,
    src: &Source,
    reqs: &[Request],
    cfg: &pat::model::config::ModelConfig,
) -> Result<()> {
    let lines = match src {
        Source::File { text, .. } => record_lines(text),
        Source::Flag(_) => Vec::new(),
    };
    for (i, r) in reqs.iter().enumerate() {
        match src {
            Source::Flag(flag) => {
                if r.input_ids.is_empty() {
                    let why = empty_prompt(a.prompt.get(i).map(String::as_str), flag, flag);
                    let hint = if !a.prompt.is_empty() {
                        "; give a non-empty --prompt, or --prompt-ids"
                    } else {
                        ""
                    };
                    // Named as the other checks name it (`check_request`'s "request I").
                    let which = if reqs.len() > 1 {
                        format!("{flag}: request {i}: ")
                    } else {
                        String::new()
                    };
                    return Err(Error::Request(format!("{which}{why}{hint}")));
                }
                let ctx = match check_lengths(cfg, r.input_ids.len(), r.max_new_tokens) {
                    Ok(()) => flag.to_string(),
                    Err(_) => format!("{flag} with --max-new-tokens"),
                };
                check_request(cfg, i, r).map_err(|e| e.context(ctx))?;
            }
            Source::File { path, text } => {
                let line = lines.get(i).copied().unwrap_or(0);
                let at = format!("{}:{line}", path.display());
                if r.input_ids.is_empty() {
                    let prompt = text
                        .lines()
                        .nth(line.saturating_sub(1))
                        .and_then(|l| {
                            serde_json::from_str::<serde_json::Value>(
                                l.trim_start_matches('\u{feff}'),
                            )
                            .ok()
                        })
                        .and_then(|v| v.get("prompt").and_then(|p| p.as_str()).map(String::from));
                    let why = empty_prompt(prompt.as_deref(), "`input_ids`", "`prompt`");
                    return Err(Error::Request(format!("{at}: request {i}: {why}")));
                }
                check_request(cfg, i, r).map_err(|e| e.context(at))?;
            }
        }
    }
    Ok(())
}

pub fn run(a: GenerateArgs) -> Result<()> {
    let backend = a.backend.backend()?;
    let m = open_model(&a.model)?;
    let (reqs, src) = requests(&a, m.tok.as_ref())?;
    check_requests(&a, &src, &reqs, &m.cfg)?;
    super::switch::check_switches(&a.reconfigure, a.world, &m, |s| {
        format!("--reconfigure {}:{}", s.step, s.tp)
    })?;
    let mut opts = EngineOptions {
        world: a.world,
        tp: a.tp,
        block_size: a.block_size,
        kv_blocks: 0,
        dtype: a.dtype,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            seed: a.seed,
        },
    };
    // Default pool: every request at once; with switches at least 64 MiB per rank, so a switch to
    // a smaller tp still finds room for the larger weight shards.
    opts.kv_blocks = match a.kv_blocks {
        Some(n) => n,
        None => {
            let floor = if a.reconfigure.is_empty() {
                0
            } else {
                opts.blocks_in(&m.cfg, &backend, 64 << 20)?
            };
            Engine::blocks_needed(&reqs, a.block_size)?.max(floor)
        }
    };
    let t0 = Instant::now();
    let mut engine = Engine::with_backend(m.cfg.clone(), &m.ck, opts, &backend)?;
    engine.cap_step_tokens(a.prefill_tokens.map(|n| n.get()));
    let load_s = t0.elapsed().as_secs_f64();
    // A request longer than a rank's whole pool (`--kv-blocks`) is named by its line.
    for (i, r) in reqs.iter().enumerate() {
        engine
            .validate_request(i, r)
            .map_err(|e| e.context(src.at(i)))?;
    }
    engine.add_requests(&reqs)?;
    let budget: u64 = reqs.iter().map(|r| r.max_new_tokens as u64).sum();
    // The copy bandwidth the switches' cost model prices migration at, measured before the
    // timed generation; the prefill rate comes from this run's first steps.
    let base_cost = (!a.reconfigure.is_empty()).then(|| CostModel::measured_cpu(1.0));
    let pb = progress(budget, "generating");
    let t1 = Instant::now();
    let mut produced = 0u64;
    let mut steps = Vec::new();
    let mut cost = None;
    let mut plan = a.reconfigure.clone();
    plan.sort_by_key(|s| s.step);
    let mut plan = plan.into_iter().peekable();
    // An error ends the loop, but the requests that finished before it are still printed.
    let mut failed = None;
    while engine.live() > 0 {
        // Engine step 0 is the prefill; after it, step k is the k-th decode step (checked: a
        // huge STEP never wraps around to before the prefill).
        while let Some(sw) = plan.next_if(|sw| sw.step.checked_add(1) == Some(steps.len())) {
            // Measured once, at the first switch, from this run's prefill.
            let cost = cost.get_or_insert_with(|| CostModel {
                prefill_tokens_per_s: vec![(1, prefill_rate(&steps).unwrap_or(1.0).max(1.0))],
                ..base_cost
                    .clone()
                    .unwrap_or_else(|| CostModel::measured_cpu(1.0))
            });
            let before = engine.layout().tp;
            match engine.reconfigure(sw.tp, a.kv_transfer, cost) {
                Ok(r) => pb.suspend(|| errln!("{}", serde_json::to_string(&r).unwrap_or_default())),
                Err(e) => pb.suspend(|| {
                    // A recompute that failed after the swap leaves the new layout live.
                    let now = engine.layout().tp;
                    let done = if now != before {
                        "applied, but"
                    } else {
                        "not applied:"
                    };
                    let msg = e.to_string();
                    let goes_on = if msg.contains(&format!("decoding at tp {now}")) {
                        String::new()
                    } else {
                        format!("; decoding goes on at tp {now}")
                    };
                    errln!(
                        "warning: --reconfigure {}:{} {done} {msg}{goes_on}",
                        sw.step,
                        sw.tp
                    )
                }),
            }
        }
        let r = match engine.step() {
            Ok(r) => r,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        if let Some(g) = &r.pool_growth {
            let line = serde_json::json!({ "step": r.step, "pool_growth": g });
            pb.suspend(|| errln!("{line}"));
        }
        produced += r.tokens_out as u64;
        pb.set_position(produced);
        steps.push(r);
    }
    for sw in plan.take_while(|_| failed.is_none()) {
        errln!(
            "warning: --reconfigure {}:{} not applied: every request finished first",
            sw.step,
            sw.tp
        );
    }
    pb.finish_and_clear();
    let gen_s = t1.elapsed().as_secs_f64();
    for o in engine.outputs() {
        outln!("{}", output_json(&o, m.tok.as_ref())?)?;
    }
    if let Some(e) = failed {
        let done = engine.outputs().len();
        return Err(e.context(format!(
            "{done} of {} finished (printed above) before this error",
            plural(reqs.len(), "request")
        )));
    }
    errln!(
        "{}, {} in {gen_s:.2} s ({:.1} tok/s) on world {}, tp {} at the end; load {load_s:.2} s",
        plural(reqs.len(), "request"),
        plural(produced, "token"),
        produced as f64 / gen_s.max(1e-9),
        a.world,
        engine.layout().tp
    );
    Ok(())
}

/// One output record; adds "text" when a tokenizer is present.
pub fn output_json(o: &Output, tok: Option<&Tokenizer>) -> Result<String> {
    let mut v = serde_json::to_value(o).map_err(|e| Error::Invalid(e.to_string()))?;
    if let Some(t) = tok {
        v["text"] = serde_json::Value::String(t.decode(&o.output_ids)?);
    }
    Ok(v.to_string())
}
