//! `pat rollout`: real generation of a rollout batch with response lengths forced from a trace,
//! under a static layout or the adaptive policy (the same `policy::decide` the simulator uses).
//! stdout: JSONL, one record per engine step, one per switch, one summary; stderr: progress and
//! a readable summary.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::generate::{progress, Model};
use crate::engine::{Engine, EngineOptions, Request};
use crate::error::{Error, Result};
use crate::model::decoder::WeightDtype;
use crate::model::sampling::SamplingParams;
use crate::parallel::layout::check_tp_for_model;
use crate::parallel::Layout;
use crate::policy::decide::{decide, DecideInput, LiveSeq, SwitchCost};
use crate::policy::remaining::{LengthDist, Remaining, SeqView};
use crate::policy::{ModelDims, Predictor, Profile, Trace};
use crate::reshard::cost::{CostModel, KvPolicy};
use crate::sim::run::{simulate, PolicyKind, SimConfig, SimModel};

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
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL trace: {"prompt_len":P,"response_len":R} per line (see `pat trace gen`).
    #[arg(long)]
    pub trace: PathBuf,
    #[arg(long)]
    pub world: usize,
    /// static:K (tp K x dp world/K throughout) or adaptive (switch when the profile says it pays).
    #[arg(long, default_value = "adaptive")]
    pub policy: PolicyArg,
    /// Profile JSON from `pat profile` (required by adaptive).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Starting tp for adaptive (default: the static layout the profile predicts is fastest for
    /// the whole batch).
    #[arg(long)]
    pub start_tp: Option<usize>,
    /// Decode steps between decisions.
    #[arg(long, default_value_t = 8)]
    pub check_every: usize,
    /// Relative predicted gain a switch must bring.
    #[arg(long, default_value_t = 0.1)]
    pub margin: f64,
    /// Absolute predicted gain a switch must bring, ms.
    #[arg(long, default_value_t = 0.0)]
    pub min_gain_ms: f64,
    #[arg(long, value_enum, default_value = "empirical")]
    pub estimator: EstimatorArg,
    #[arg(long, default_value = "auto")]
    pub kv_transfer: KvPolicy,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: RolloutArgs) -> Result<()> {
    let m = Model::open(&a.model)?;
    let trace = Trace::load(&a.trace)?;
    let profile = a.profile.as_deref().map(Profile::load).transpose()?;
    rollout(&m, &trace, &a, profile.as_ref(), true).map(|_| ())
}

/// What one rollout did.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub gen_s: f64,
    pub tokens: u64,
    pub steps: usize,
    /// (decode step, from tp, to tp, switch ms)
    pub switches: Vec<(usize, usize, usize, f64)>,
    pub final_tp: usize,
}

/// Runs one rollout of `trace` (the paths in `a` are not read); with `emit`, JSONL on stdout and
/// a summary on stderr.
pub fn rollout(
    m: &Model,
    trace: &Trace,
    a: &RolloutArgs,
    profile: Option<&Profile>,
    emit: bool,
) -> Result<Outcome> {
    let tps: Vec<usize> = (1..=a.world)
        .filter(|t| a.world % t == 0 && check_tp_for_model(*t, &m.cfg).is_ok())
        .collect();
    if a.check_every == 0 {
        return Err(Error::Usage("--check-every must be at least 1".into()));
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
            dims.dtype_bytes = 4;
            profile.check_matches(&dims, a.world)?;
            let predictor = Predictor::from_profile(profile)?;
            let lens = trace.response_lens();
            let cap = lens.iter().copied().max();
            let est = match a.estimator {
                EstimatorArg::Empirical => Remaining::Empirical(LengthDist::new(&lens, cap)?),
                EstimatorArg::Oracle => Remaining::Oracle,
            };
            let cost = CostModel {
                transfer_bytes_per_s: profile.switch.kv_bytes_per_s,
                fixed_transfer_s: 0.0,
                prefill_tokens_per_s: profile
                    .prefill
                    .iter()
                    .map(|p| (p.tp, p.tokens_per_s))
                    .collect(),
                fixed_prefill_s: 0.0,
            };
            Some((SwitchCost::from_profile(profile), predictor, est, cost))
        }
    };
    // Static: the given tp. Adaptive: --start-tp, else the static layout the profile predicts
    // finishes this whole batch first (the simulator, same predictor), so a batch that never
    // needs a switch runs at the best static layout from its first step.
    let start = match (a.policy, &adaptive) {
        (PolicyArg::Static(k), _) => k,
        (PolicyArg::Adaptive, _) if a.start_tp.is_some() => a.start_tp.unwrap_or(1),
        (PolicyArg::Adaptive, Some((sc, predictor, _, _))) => {
            let prefill: Vec<(usize, f64)> = profile
                .map(|p| p.prefill.iter().map(|x| (x.tp, x.tokens_per_s)).collect())
                .unwrap_or_default();
            let model = SimModel {
                predictor,
                switch: sc,
                prefill: &prefill,
            };
            let cands: Vec<usize> = tps
                .iter()
                .copied()
                .filter(|t| predictor.fit(*t).is_ok())
                .collect();
            let cfg = SimConfig {
                world: a.world,
                candidates: cands.clone(),
                check_every: a.check_every.max(1),
                margin: a.margin,
                min_gain_ms: a.min_gain_ms,
                start_tp: None,
            };
            let mut best = (cands.first().copied().unwrap_or(1), f64::INFINITY);
            for &tp in &cands {
                let r = simulate(trace, &model, &cfg, PolicyKind::Static(tp), tp)?;
                if r.total_ms < best.1 {
                    best = (tp, r.total_ms);
                }
            }
            best.0
        }
        (PolicyArg::Adaptive, None) => tps.first().copied().unwrap_or(1),
    };
    Layout::new(a.world, start)
        .and_then(|_| check_tp_for_model(start, &m.cfg))
        .map_err(|e| Error::Usage(format!("--policy/--start-tp: {e}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let vocab = m.cfg.vocab_size as u32;
    let reqs: Vec<Request> = trace
        .requests
        .iter()
        .map(|r| Request {
            input_ids: r.input_ids.clone().unwrap_or_else(|| {
                (0..r.prompt_len)
                    .map(|_| rng.random_range(3..vocab))
                    .collect()
            }),
            max_new_tokens: r.response_len,
            ignore_eos: true,
        })
        .collect();
    let block_bytes = 2 * m.cfg.num_layers * (m.cfg.num_kv_heads / start) * 16 * m.cfg.head_dim * 4;
    let kv_blocks = Engine::blocks_needed(&reqs, 16).max((64 << 20) / block_bytes.max(1));
    let opts = EngineOptions {
        world: a.world,
        tp: start,
        block_size: 16,
        kv_blocks,
        dtype: WeightDtype::F32,
        sampling: SamplingParams::default(),
    };
    let mut engine = Engine::new(m.cfg.clone(), &m.ck, opts)?;
    engine.add_requests(&reqs)?;

    let total: u64 = reqs.iter().map(|r| r.max_new_tokens as u64).sum();
    let pb = progress(total, &format!("rollout {}", policy_name(a.policy)));
    let t0 = Instant::now();
    let (mut step, mut produced, mut switches) = (0usize, 0u64, Vec::new());
    while engine.live() > 0 {
        if let Some((sc, predictor, est, cost)) = &adaptive {
            if step > 0 && (step - 1) % a.check_every == 0 {
                let live = engine.live_seqs();
                let views: Vec<SeqView> = live
                    .iter()
                    .map(|s| SeqView {
                        generated: s.generated,
                        replica: s.replica,
                        true_len: Some(s.max_new_tokens),
                    })
                    .collect();
                let ests = est.estimate_set(&views)?;
                let lv: Vec<LiveSeq> = live
                    .iter()
                    .zip(&ests)
                    .map(|(s, &e)| LiveSeq {
                        replica: s.replica,
                        context: s.context,
                        generated: s.generated,
                        est_remaining: e,
                    })
                    .collect();
                let input = DecideInput {
                    world: a.world,
                    current_tp: engine.layout().tp,
                    candidates: &tps,
                    live: &lv,
                    predictor,
                    switch: sc,
                    margin: a.margin,
                    min_gain_ms: a.min_gain_ms,
                    lookahead_steps: a.check_every,
                };
                let d = decide(&input)?;
                if !d.stay {
                    let r = engine.reconfigure(d.to_tp, a.kv_transfer, cost)?;
                    let rec = json!({ "switch": r, "step": step, "t_ms": t0.elapsed().as_secs_f64() * 1e3, "decision": d });
                    if emit {
                        println!("{rec}");
                    }
                    switches.push(rec);
                }
            }
        }
        let tp = engine.layout().tp;
        let r = engine.step()?;
        produced += r.tokens_out as u64;
        pb.set_position(produced);
        if emit {
            println!(
                "{}",
                json!({
                    "step": step, "t_ms": t0.elapsed().as_secs_f64() * 1e3, "tp": tp,
                    "running_reqs": r.live_per_replica.iter().sum::<usize>(), "tokens_this_step": r.tokens_out,
                    "prefill_tokens": r.tokens_in - r.tokens_out.min(r.tokens_in),
                    "step_latency_ms": r.elapsed_ms, "gen_throughput_tok_s": r.tokens_out as f64 / (r.elapsed_ms / 1e3).max(1e-9),
                })
            );
        }
        step += 1;
    }
    pb.finish_and_clear();
    let gen_s = t0.elapsed().as_secs_f64();
    let lens = trace.response_lens();
    let summary = json!({
        "policy": policy_name(a.policy), "world": a.world, "requests": reqs.len(),
        "timing_s/gen": gen_s, "steps": step,
        "response_length/mean": lens.iter().sum::<usize>() as f64 / lens.len() as f64,
        "response_length/max": lens.iter().max(),
        "tokens": produced, "tokens_per_s": produced as f64 / gen_s, "tokens_per_s_per_rank": produced as f64 / gen_s / a.world as f64,
        "switches": switches.len(), "final_tp": engine.layout().tp,
    });
    if emit {
        println!("{}", json!({ "summary": summary }));
        eprintln!(
            "{}: {} requests, {} tokens in {:.2} s = {:.1} tok/s ({:.1} per rank), {} switch(es), final tp {}",
            policy_name(a.policy), reqs.len(), produced, gen_s, produced as f64 / gen_s, produced as f64 / gen_s / a.world as f64, switches.len(), engine.layout().tp
        );
        for s in &switches {
            eprintln!(
                "  switch at step {}: tp {} -> {} in {:.1} ms",
                s["step"],
                s["switch"]["from_tp"],
                s["switch"]["to_tp"],
                s["switch"]["total_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(Outcome {
        gen_s,
        tokens: produced,
        steps: step,
        switches: switches
            .iter()
            .map(|s| {
                let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as usize;
                (
                    u(&s["step"]),
                    u(&s["switch"]["from_tp"]),
                    u(&s["switch"]["to_tp"]),
                    s["switch"]["total_ms"].as_f64().unwrap_or(0.0),
                )
            })
            .collect(),
        final_tp: engine.layout().tp,
    })
}

fn policy_name(p: PolicyArg) -> String {
    match p {
        PolicyArg::Static(k) => format!("static:{k}"),
        PolicyArg::Adaptive => "adaptive".into(),
    }
}
