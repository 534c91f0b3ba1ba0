//! `pat demo`: the main job on a built-in default. Makes a random `small` model in a temp dir,
//! runs a long-tail batch (skewed response lengths, as in RL rollouts) over several ranks, and
//! prints a per-step summary and the totals, including how much time the straggler tail takes.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::generate::{progress, Model};
use super::{ArchArg, PresetArg};
use crate::engine::{Engine, EngineOptions, Request, StepReport};
use crate::error::{Error, Result};
use crate::model::decoder::WeightDtype;
use crate::model::init::{init_model, InitDtype, InitOptions};
use crate::model::sampling::SamplingParams;

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
    #[arg(long, default_value_t = 4)]
    pub world: usize,
    #[arg(long, default_value_t = 2)]
    pub tp: usize,
    /// Requests in the batch.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Longest response (the stragglers run to it).
    #[arg(long, default_value_t = 256)]
    pub max_response: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the summary as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Skewed response lengths: most short, ~12% long, one at the cap (a DeepScaleR-like tail).
pub fn long_tail_requests(n: usize, cap: usize, vocab: usize, seed: u64) -> Vec<Request> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let prompt_len = rng.random_range(8..=48);
            let resp = if i == 0 {
                cap
            } else if rng.random_bool(0.12) {
                rng.random_range(cap / 2..=cap)
            } else {
                rng.random_range((cap / 16).max(1)..=(cap / 5).max(2))
            };
            Request {
                input_ids: (0..prompt_len)
                    .map(|_| rng.random_range(3..vocab as u32))
                    .collect(),
                max_new_tokens: resp,
                ignore_eos: true,
            }
        })
        .collect()
}

pub fn run(a: DemoArgs) -> Result<()> {
    if a.batch == 0 || a.max_response < 2 {
        return Err(Error::Usage(
            "--batch must be >= 1 and --max-response >= 2".into(),
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
                dtype: InitDtype::F32,
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
    let m = Model::open(dir)?;
    let reqs = long_tail_requests(a.batch, a.max_response, m.cfg.vocab_size, a.seed);
    let opts = EngineOptions {
        world: a.world,
        tp: a.tp,
        block_size: 16,
        kv_blocks: Engine::blocks_needed(&reqs, 16),
        dtype: WeightDtype::F32,
        sampling: SamplingParams::default(),
    };
    let mut engine = Engine::new(m.cfg.clone(), &m.ck, opts)?;
    engine.add_requests(&reqs)?;
    let budget: u64 = reqs.iter().map(|r| r.max_new_tokens as u64).sum();
    let pb = progress(budget, "decoding");
    let mut steps: Vec<StepReport> = Vec::new();
    let t0 = Instant::now();
    engine.run(|r| {
        pb.inc(r.tokens_out as u64);
        steps.push(r.clone());
    })?;
    pb.finish_and_clear();
    let wall = t0.elapsed().as_secs_f64();
    let summary = summarize(&steps, a.batch, wall);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "world": a.world, "tp": a.tp, "batch": a.batch, "max_response": a.max_response,
                "steps": steps.len(), "tokens": summary.tokens, "wall_s": wall,
                "tokens_per_s": summary.tokens as f64 / wall,
                "tail_steps": summary.tail_steps, "tail_time_s": summary.tail_ms / 1e3,
                "step_ms": steps.iter().map(|s| s.elapsed_ms).collect::<Vec<_>>(),
                "live": steps.iter().map(|s| s.live_per_replica.iter().sum::<usize>()).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!(
        "pat demo: {} requests, responses up to {} tokens, world {} = tp {} x dp {}",
        a.batch,
        a.max_response,
        a.world,
        a.tp,
        a.world / a.tp
    );
    println!(
        "{:>6} {:>16} {:>8} {:>9}",
        "step", "live per replica", "tokens", "step ms"
    );
    let stride = (steps.len() / 24).max(1);
    for (i, s) in steps.iter().enumerate() {
        if i % stride == 0 || i + 1 == steps.len() || s.finished > 0 && i < 4 {
            let live: Vec<String> = s.live_per_replica.iter().map(|n| n.to_string()).collect();
            println!(
                "{:>6} {:>16} {:>8} {:>9.2}",
                s.step,
                live.join("+"),
                s.tokens_in,
                s.elapsed_ms
            );
        }
    }
    println!(
        "total: {} steps, {} tokens in {:.2} s = {:.1} tokens/s ({:.1} per rank)",
        steps.len(),
        summary.tokens,
        wall,
        summary.tokens as f64 / wall,
        summary.tokens as f64 / wall / a.world as f64
    );
    println!(
        "tail: {} of {} steps ran with <= {} live sequences ({:.0}% of the batch) and took {:.0}% of the time",
        summary.tail_steps,
        steps.len(),
        summary.tail_live,
        100.0 * summary.tail_live as f64 / a.batch as f64,
        100.0 * summary.tail_ms / summary.total_ms.max(1e-9)
    );
    println!("every rank but the busiest replica's sits idle in the tail: that is the time adaptive TP wins back.");
    Ok(())
}

struct Summary {
    tokens: usize,
    tail_live: usize,
    tail_steps: usize,
    tail_ms: f64,
    total_ms: f64,
}

fn summarize(steps: &[StepReport], batch: usize, _wall: f64) -> Summary {
    let tail_live = (batch / 8).max(1);
    let tail: Vec<&StepReport> = steps
        .iter()
        .filter(|s| s.live_per_replica.iter().sum::<usize>() <= tail_live)
        .collect();
    Summary {
        tokens: steps.iter().map(|s| s.tokens_out).sum(),
        tail_live,
        tail_steps: tail.len(),
        tail_ms: tail.iter().map(|s| s.elapsed_ms).sum(),
        total_ms: steps.iter().map(|s| s.elapsed_ms).sum(),
    }
}
