//! `pat rollout`: real generation of a rollout batch with response lengths forced from a trace,
//! under a static layout or the adaptive policy (the same `policy::decide` the simulator uses).
//! stdout: JSONL, one record per engine step, one per switch, one summary; stderr: progress and
//! a readable summary.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::common::{load_trace, open_model, plural, plural_with, progress, LoadedTrace};
use pat::engine::{check_lengths, Engine, EngineOptions, EngineSource, Request};
use pat::error::{Error, Result};
use pat::model::sampling::random_ids;
use pat::model::ModelDir;
use pat::parallel::layout::check_tp_for_model;
use pat::parallel::Layout;
use pat::policy::controller::{drive, Controller, ControllerConfig, Event};
use pat::policy::decide::SwitchCost;
use pat::policy::remaining::{LengthDist, Remaining};
use pat::policy::{ModelDims, Predictor, Profile};
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::sim::run::{fresh_batch, initial_placement, requests, Placement};
use pat::Dtype;

/// `static:K` or `adaptive`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyArg {
    Static(usize),
    Adaptive,
}

impl FromStr for PolicyArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "adaptive" {
            return Ok(PolicyArg::Adaptive);
        }
        let k = s
            .strip_prefix("static:")
            .ok_or_else(|| format!("`{s}`: expected static:K (e.g. static:2) or adaptive"))?;
        k.parse::<usize>()
            .ok()
            .filter(|&k| k > 0)
            .map(PolicyArg::Static)
            .ok_or_else(|| format!("`{s}`: K must be a positive tp degree"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EstimatorArg {
    /// Conditional mean residual life from the trace's length distribution.
    Empirical,
    /// The true remaining lengths (an upper bound for any estimator).
    Oracle,
}

#[derive(Args, Debug)]
pub struct RolloutArgs {
    /// Model directory (config.json + safetensors; `pat init-model` makes one).
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL trace: {"prompt_len":P,"response_len":R} per line (see `pat trace gen`), optionally
    /// "input_ids":[...] (the prompt's P token ids; random ids otherwise) and "group" (GRPO's
    /// prompt index); `-` reads it from stdin.
    #[arg(long)]
    pub trace: PathBuf,
    /// Ranks (CPU threads, or GPU ranks with --backend cuda).
    #[arg(long, value_parser = super::common::ranks)]
    pub world: usize,
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// Weight precision. The CPU reference computes in f32 and rounds the weights to bf16/f16;
    /// on cuda the weights, activations and KV cache are stored in it. A --profile is best
    /// measured on the same backend and dtype (the model and its KV bytes per token are
    /// checked; a profile from another backend gets a note).
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    pub dtype: Dtype,
    /// static:K (tp K x dp world/K throughout) or adaptive (switch when the profile says it pays).
    /// With static:K the flags only the adaptive rule reads (--profile, --start-tp,
    /// --check-every, --margin, --min-gain-ms, --estimator, --lengths-from, --kv-transfer) are
    /// refused.
    #[arg(long, default_value = "adaptive")]
    pub policy: PolicyArg,
    /// Profile JSON from `pat profile` (required by adaptive).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Starting tp for adaptive (default: where the best ladder the profile predicts for the
    /// whole batch starts: any number of switches, each paying the profile's switch cost).
    #[arg(long, value_parser = super::common::count)]
    pub start_tp: Option<usize>,
    /// Decode steps between decisions.
    #[arg(long, default_value_t = 8, value_parser = super::common::count)]
    pub check_every: usize,
    /// Relative predicted gain a switch must bring.
    #[arg(long, default_value_t = 0.1, value_parser = super::common::fraction_below_one)]
    pub margin: f64,
    /// Absolute predicted gain a switch must bring, ms.
    #[arg(long, default_value_t = 0.0, value_parser = super::common::millis)]
    pub min_gain_ms: f64,
    /// How the adaptive rule estimates each sequence's remaining length.
    #[arg(long, value_enum, default_value = "empirical")]
    pub estimator: EstimatorArg,
    /// Empirical: a trace of an earlier rollout (e.g. the previous training step, `pat trace
    /// import`) whose response lengths the estimator learns from, as an engine must (default:
    /// this batch's own lengths, known here because the trace forces them).
    #[arg(long, value_name = "TRACE")]
    pub lengths_from: Option<PathBuf>,
    /// How unfinished sequences' KV reaches the new layout at a switch: migrate, recompute, or
    /// auto (a cost model from the measured copy bandwidth and this run's prefill rate picks per
    /// sequence).
    #[arg(long, default_value = "auto")]
    pub kv_transfer: KvPolicy,
    /// The most prompt tokens one step prefills, decodes not counted (default: what the step's
    /// memory cap allows). A longer queue is prefilled over more steps and a longer prompt in
    /// chunks; a lower cap shortens the steps that keep running requests waiting on a prefill.
    #[arg(long, value_name = "N", value_parser = super::common::at_least_one)]
    pub prefill_tokens: Option<std::num::NonZeroUsize>,
    /// Seed of the random prompts made for the trace's lengths.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: RolloutArgs) -> Result<()> {
    super::common::check_backend_built(&a.backend.backend()?)?;
    let m = open_model(&a.model)?;
    let loaded = load_trace(&a.trace)?;
    let profile = a.profile.as_deref().map(Profile::load).transpose()?;
    let history = match &a.lengths_from {
        Some(_) if a.estimator == EstimatorArg::Oracle => {
            return Err(Error::Usage(
                "--lengths-from is for --estimator empirical; the oracle knows the true lengths"
                    .into(),
            ))
        }
        Some(p) if p.as_os_str() == "-" && a.trace.as_os_str() == "-" => {
            return Err(Error::Usage(
                "--trace - and --lengths-from - cannot both read standard input: give one a file"
                    .into(),
            ))
        }
        Some(p) => {
            let longest = loaded.trace.response_lens().into_iter().max().unwrap_or(1);
            Some(super::common::lengths_from(p, None, longest)?)
        }
        None => None,
    };
    rollout(&m, &loaded, &a, profile.as_ref(), history, true)
}

/// Runs one rollout of the trace `loaded` (the paths in `a` are not read) through the one
/// adaptive loop (`pat::policy::drive`); with `emit`, JSONL on stdout and a summary on stderr.
fn rollout(
    m: &ModelDir,
    loaded: &LoadedTrace,
    a: &RolloutArgs,
    profile: Option<&Profile>,
    history: Option<LengthDist>,
    emit: bool,
) -> Result<()> {
    let trace = &loaded.trace;
    Layout::new(a.world, 1)?;
    // Lengths first: a trace line the model cannot hold is refused before anything is built.
    for (i, r) in trace.requests.iter().enumerate() {
        if check_lengths(&m.cfg, r.prompt_len, r.response_len).is_err() {
            let msg = format!(
                "`prompt_len` {} + `response_len` {} exceeds the model's max_position_embeddings {}",
                r.prompt_len, r.response_len, m.cfg.max_position_embeddings
            );
            return Err(loaded.request_error(i, &msg));
        }
        let vocab = m.cfg.vocab_size;
        let ids = r.input_ids.as_deref().unwrap_or_default();
        if let Some((pos, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            let msg = format!(
                "`input_ids` holds token id {id} at position {pos}, out of the model's vocab_size {vocab}"
            );
            return Err(loaded.request_error(i, &msg));
        }
    }
    let tps: Vec<usize> = (1..=a.world)
        .filter(|t| a.world.is_multiple_of(*t) && check_tp_for_model(*t, &m.cfg).is_ok())
        .collect();
    if let (PolicyArg::Static(k), Some(s)) = (a.policy, a.start_tp) {
        return Err(Error::Usage(format!(
            "--start-tp {s} is for --policy adaptive; --policy static:{k} runs at tp {k} throughout"
        )));
    }
    // The adaptive policy's inputs, all checked before any work starts.
    let adaptive = match a.policy {
        PolicyArg::Static(_) => None,
        PolicyArg::Adaptive => {
            let profile = profile.ok_or_else(|| {
                Error::Usage(
                    "--policy adaptive needs --profile P.json (make one with `pat profile`)".into(),
                )
            })?;
            let mut dims = ModelDims::from_config(&m.cfg);
            dims.dtype_bytes = a.backend.backend()?.kv_elem_bytes(a.dtype);
            profile.check_matches(&dims, a.world)?;
            let predictor = Predictor::from_profile(profile)?;
            let lens = trace.response_lens();
            let est = match (a.estimator, history) {
                (EstimatorArg::Empirical, Some(d)) => Remaining::Empirical(d),
                (EstimatorArg::Empirical, None) => {
                    Remaining::Empirical(LengthDist::new(&lens, lens.iter().copied().max())?)
                }
                (EstimatorArg::Oracle, _) => Remaining::Oracle,
            };
            Some((SwitchCost::from_profile(profile), predictor, est))
        }
    };
    let candidates: Vec<usize> = match &adaptive {
        Some((_, predictor, _)) => tps
            .iter()
            .copied()
            .filter(|t| predictor.fit(*t).is_ok())
            .collect(),
        None => tps.clone(),
    };
    let ctrl_cfg = ControllerConfig {
        candidates: candidates.clone(),
        check_every: a.check_every,
        margin: a.margin,
        min_gain_ms: a.min_gain_ms,
        max_switches: None,
    };
    let ctrl = adaptive
        .as_ref()
        .map(|(sc, predictor, est)| Controller::new(ctrl_cfg, predictor, sc, est.clone()))
        .transpose()?;
    // Static: the given tp. Adaptive: --start-tp, else the start of the predicted ladder (any
    // number of switches) that finishes this batch first: the start is chosen for the whole run.
    let start = match (a.policy, &ctrl) {
        (PolicyArg::Static(k), _) => k,
        (PolicyArg::Adaptive, _) if a.start_tp.is_some() => a.start_tp.unwrap_or(1),
        (PolicyArg::Adaptive, Some(c)) => {
            let reqs = requests(trace);
            c.plan_start(a.world, |tp| {
                fresh_batch(
                    &reqs,
                    &[],
                    &initial_placement(&reqs, a.world / tp, Placement::Lpt),
                )
            })?
            .0
        }
        (PolicyArg::Adaptive, None) => tps.first().copied().unwrap_or(1),
    };
    Layout::new(a.world, start)
        .and_then(|_| check_tp_for_model(start, &m.cfg))
        .map_err(|e| e.context("--policy/--start-tp"))?;
    // A --start-tp the profile does not cover is refused now, not at the first decision.
    if let Some((_, predictor, _)) = &adaptive {
        predictor.fit(start).map_err(|e| e.context("--start-tp"))?;
    }
    // A pool that holds the batch and at least 64 MiB per rank, so a switch to a smaller tp still
    // finds room for the larger weight shards.
    let backend = a.backend.backend()?;
    let mut opts =
        EngineOptions::for_memory_budget(&m.cfg, &backend, a.world, start, a.dtype, 64 << 20)?;
    let needed = Engine::blocks_for_lengths(
        trace
            .requests
            .iter()
            .map(|r| (r.prompt_len, r.response_len)),
        opts.block_size,
    )
    .map_err(|e| e.context("--trace"))?;
    opts.kv_blocks = opts.kv_blocks.max(needed);
    let mut engine = Engine::with_backend(m.cfg.clone(), &m.ck, opts, &backend)?;
    let backend_name = engine.backend();
    if let Some(p) = profile.filter(|p| p.backend != backend_name) {
        errln!(
            "note: the profile was measured on {}, this rollout runs on {backend_name}: the \
             adaptive rule decides on the other backend's step times",
            p.backend
        );
    }
    engine.cap_step_tokens(a.prefill_tokens.map(|n| n.get()));
    // Prompts only now: the pool that holds their KV is allocated, so their ids fit too.
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let reqs: Vec<Request> = trace
        .requests
        .iter()
        .map(|r| Request {
            input_ids: r
                .input_ids
                .clone()
                .unwrap_or_else(|| random_ids(&mut rng, r.prompt_len, m.cfg.vocab_size)),
            max_new_tokens: r.response_len,
            ignore_eos: true,
        })
        .collect();
    engine.add_requests(&reqs)?;

    let total: u64 = reqs.iter().map(|r| r.max_new_tokens as u64).sum();
    let pb = progress(total, &format!("rollout {}", policy_name(a.policy)));
    // The profile's migrate-or-recompute model (a static run never switches: any model does).
    let cost = profile.map(Profile::cost_model).unwrap_or(CostModel {
        transfer_bytes_per_s: 1.0,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: Vec::new(),
        fixed_prefill_s: 0.0,
    });
    let mut src = EngineSource::new(&mut engine, a.kv_transfer, cost);
    let mut produced = 0u64;
    let mut switches: Vec<serde_json::Value> = Vec::new();
    // A write error (closed pipe, full disk) is kept and returned once the run ends.
    let mut out_err: Option<Error> = None;
    let run = drive(&mut src, ctrl.as_ref(), |ev| {
        match ev {
        Event::Step {
            step,
            tp,
            t_ms,
            done,
        } => {
            produced += done.tokens_out as u64;
            pb.set_position(produced);
            if emit {
                outln!(
                    "{}",
                    json!({
                        "step": step, "t_ms": t_ms, "tp": tp,
                        "running_reqs": done.running, "tokens_this_step": done.tokens_out,
                        "prefill_tokens": done.prefill_tokens,
                        "step_latency_ms": done.ms, "gen_throughput_tok_s": done.tokens_out as f64 / (done.ms / 1e3).max(1e-9),
                    })
                )
                .err()
                .map(|e| out_err.get_or_insert(e));
            }
        }
        Event::Switch {
            summary,
            decision,
            record,
        } => {
            let rec = json!({ "switch": record, "step": summary.step, "t_ms": summary.t_ms, "decision": decision });
            if emit {
                if let Err(e) = pb.suspend(|| outln!("{rec}")) {
                    out_err.get_or_insert(e);
                }
            }
            switches.push(rec);
        }
        Event::SwitchFailed {
            step,
            from,
            to,
            now,
            error,
        } => pb.suspend(|| {
            let done = if now == to { "applied, but" } else { "not applied:" };
            errln!("warning: switch tp {from} -> {to} before step {step} {done} {error}; decoding goes on at tp {now}")
        }),
    }
    })?;
    pb.finish_and_clear();
    if let Some(e) = out_err {
        return Err(e);
    }
    let gen_s = run.total_ms / 1e3;
    let lens = trace.response_lens();
    let summary = json!({
        "policy": policy_name(a.policy), "world": a.world, "backend": backend_name, "dtype": a.dtype.name(), "requests": reqs.len(),
        "timing_s/gen": gen_s, "steps": run.steps,
        "response_length/mean": lens.iter().sum::<usize>() as f64 / lens.len() as f64,
        "response_length/max": lens.iter().max(),
        "tokens": run.tokens, "tokens_per_s": run.tokens as f64 / gen_s, "tokens_per_s_per_rank": run.tokens as f64 / gen_s / a.world as f64,
        "switches": run.switches.len(), "failed_switches": run.failed_switches, "final_tp": run.final_tp,
    });
    if emit {
        outln!("{}", json!({ "summary": summary }))?;
        errln!(
            "{}: {}, {} in {:.2} s = {:.1} tok/s ({:.1} per rank), {}, final tp {}",
            policy_name(a.policy),
            plural(reqs.len(), "request"),
            plural(run.tokens, "token"),
            gen_s,
            run.tokens as f64 / gen_s,
            run.tokens as f64 / gen_s / a.world as f64,
            plural_with(run.switches.len(), "switch", "switches"),
            run.final_tp
        );
        for s in &run.switches {
            let then = match &s.error {
                Some(e) => format!(" (applied, then failed: {e})"),
                None => String::new(),
            };
            errln!(
                "  switch at step {}: tp {} -> {} in {:.1} ms{then}",
                s.step,
                s.from,
                s.to,
                s.ms
            );
        }
    }
    Ok(())
}

fn policy_name(p: PolicyArg) -> String {
    match p {
        PolicyArg::Static(k) => format!("static:{k}"),
        PolicyArg::Adaptive => "adaptive".into(),
    }
}
