//! `pat demo`: the main job on a built-in default, no arguments needed. Makes a random `small`
//! model in a temp dir, profiles the engine on a small grid, then replays one long-tail rollout
//! batch (skewed response lengths, as in RL) under every static layout and under the adaptive
//! policy, and prints them side by side with the switch points.

use std::path::PathBuf;

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::common::open_model;
use super::profile::measure;
use super::rollout::{rollout, EstimatorArg, Outcome, PolicyArg, RolloutArgs};
use super::{ArchArg, PresetArg};
use pat::engine::profiler::ProfileGrid;
use pat::error::{Error, Result};
use pat::model::init::{init_model, InitOptions};
use pat::parallel::layout::check_tp_for_model;
use pat::policy::{Trace, TraceRequest};
use pat::reshard::cost::KvPolicy;
use pat::Dtype;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Use this model directory instead of making a random one.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Architecture of the random model.
    #[arg(long, value_enum, default_value = "llama")]
    pub arch: ArchArg,
    /// Size of the random model.
    #[arg(long, value_enum, default_value = "small")]
    pub preset: PresetArg,
    /// Ranks (threads); every tp dividing it is compared.
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Requests in the batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Longest response (the stragglers run to it).
    #[arg(long, default_value_t = 256)]
    pub max_response: usize,
    /// Decode steps between adaptive decisions.
    #[arg(long, default_value_t = 8)]
    pub check_every: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the comparison as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Skewed response lengths: most short, ~12% long, one at the cap (a DeepScaleR-like tail).
pub fn long_tail_trace(n: usize, cap: usize, vocab: usize, seed: u64) -> Trace {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let requests = (0..n)
        .map(|i| {
            let prompt_len = rng.random_range(8..=48);
            let response_len = if i == 0 {
                cap
            } else if rng.random_bool(0.12) {
                rng.random_range(cap / 2..=cap)
            } else {
                rng.random_range((cap / 16).max(1)..=(cap / 5).max(2))
            };
            let ids = (0..prompt_len)
                .map(|_| rng.random_range(3..vocab as u32))
                .collect();
            TraceRequest {
                prompt_len,
                response_len,
                input_ids: Some(ids),
                group: None,
            }
        })
        .collect();
    Trace { requests }
}

pub fn run(a: DemoArgs) -> Result<()> {
    if a.batch == 0 || a.max_response < 2 || a.world == 0 {
        return Err(Error::Invalid(
            "--batch and --world must be >= 1 and --max-response >= 2".into(),
        ));
    }
    let tmp = std::env::temp_dir().join(format!("pat-demo-{}", std::process::id()));
    let dir = match &a.model {
        Some(d) => d.clone(),
        None => {
            let opts = InitOptions {
                arch: a.arch.into(),
                preset: a.preset.into(),
                seed: a.seed,
                dtype: Dtype::F32,
                force: true,
            };
            eprintln!(
                "making a random {:?} {:?} model in {}",
                a.arch,
                a.preset,
                tmp.display()
            );
            init_model(&tmp, &opts)?;
            tmp.clone()
        }
    };
    let result = run_on(&a, &dir);
    if a.model.is_none() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn run_on(a: &DemoArgs, dir: &std::path::Path) -> Result<()> {
    let m = open_model(dir)?;
    let trace = long_tail_trace(a.batch, a.max_response, m.cfg.vocab_size, a.seed);
    let tps: Vec<usize> = (1..=a.world)
        .filter(|t| a.world % t == 0 && check_tp_for_model(*t, &m.cfg).is_ok())
        .collect();
    eprintln!(
        "profiling the engine on world {} (tp {:?}) for the adaptive policy...",
        a.world, tps
    );
    let profile = measure(
        &m,
        &ProfileGrid {
            world: a.world,
            batches: vec![1, 4, a.batch.clamp(1, 16)],
            contexts: vec![32, 128],
            steps: 3,
            seed: a.seed,
        },
    )?;
    let mut args = RolloutArgs {
        model: dir.to_path_buf(),
        trace: PathBuf::new(),
        world: a.world,
        policy: PolicyArg::Adaptive,
        profile: None,
        start_tp: None,
        check_every: a.check_every.max(1),
        margin: 0.1,
        min_gain_ms: 0.0,
        estimator: EstimatorArg::Empirical,
        kv_transfer: KvPolicy::Auto,
        seed: a.seed,
    };
    let mut runs: Vec<(String, Outcome)> = Vec::new();
    for &tp in &tps {
        args.policy = PolicyArg::Static(tp);
        runs.push((
            format!("static tp{tp} x dp{}", a.world / tp),
            rollout(&m, &trace, &args, None, false)?,
        ));
    }
    args.policy = PolicyArg::Adaptive;
    runs.push((
        "adaptive".into(),
        rollout(&m, &trace, &args, Some(&profile), false)?,
    ));

    let best = runs[..runs.len() - 1]
        .iter()
        .map(|(_, o)| o.gen_s)
        .fold(f64::INFINITY, f64::min);
    let lens = trace.response_lens();
    if a.json {
        let rows: Vec<_> = runs
            .iter()
            .map(|(name, o)| serde_json::json!({"policy": name, "gen_s": o.gen_s, "tokens": o.tokens, "steps": o.steps,
                "tokens_per_s": o.tokens as f64 / o.gen_s, "vs_best_static": o.gen_s / best - 1.0, "final_tp": o.final_tp,
                "switches": o.switches.iter().map(|s| serde_json::json!({"step": s.0, "from_tp": s.1, "to_tp": s.2, "ms": s.3})).collect::<Vec<_>>()}))
            .collect();
        outln!(
            "{}",
            serde_json::json!({"world": a.world, "batch": a.batch, "max_response": a.max_response, "runs": rows})
        )?;
        return Ok(());
    }
    outln!(
        "pat demo: {} requests, responses {}..{} tokens (mean {:.0}), world {} ({})",
        a.batch,
        lens.iter().min().unwrap_or(&0),
        lens.iter().max().unwrap_or(&0),
        lens.iter().sum::<usize>() as f64 / lens.len() as f64,
        a.world,
        profile.device
    )?;
    outln!(
        "{:<18} {:>9} {:>9} {:>14}  switches",
        "policy",
        "time s",
        "tok/s",
        "vs best static"
    )?;
    for (name, o) in &runs {
        let sw: Vec<String> = o
            .switches
            .iter()
            .map(|s| format!("step {}: tp{}->tp{} ({:.0} ms)", s.0, s.1, s.2, s.3))
            .collect();
        outln!(
            "{:<18} {:>9.2} {:>9.1} {:>13.1}%  {}",
            name,
            o.gen_s,
            o.tokens as f64 / o.gen_s,
            100.0 * (o.gen_s / best - 1.0),
            if sw.is_empty() {
                "-".to_string()
            } else {
                sw.join(", ")
            }
        )?;
    }
    if let Some((_, ad)) = runs.last().filter(|(_, o)| o.switches.is_empty()) {
        if let Some((name, st)) = runs
            .iter()
            .find(|(n, _)| n.starts_with(&format!("static tp{} ", ad.final_tp)))
        {
            outln!(
                "adaptive made no switch: it ran the same layout as `{name}`, so the {:+.1}% between them is run-to-run noise, not a gain.",
                100.0 * (ad.gen_s / st.gen_s - 1.0)
            )?;
        }
    }
    outln!("static layouts keep one tp for the whole batch; adaptive starts where the profile predicts the batch finishes first and switches only when the predicted gain beats the switch cost.")?;
    Ok(())
}
