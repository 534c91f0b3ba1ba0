//! `pat profile`: offline profile of the real engine on synthetic batches — decode step latency
//! over (tp, batch, context), prefill tokens/s per tp, KV transfer bandwidth and measured switch
//! components — written as the profile JSON the predictor and the decision rule read.
//!
//! Each decode sample is one tp-replica alone (world = tp), so the grid measures what one replica
//! costs; the predictor and the simulator combine replicas.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::bench::memory_bandwidths;
use super::generate::{progress, Model};
use crate::engine::{Backend, Engine, EngineOptions, Request};
use crate::error::{Error, Result};
use crate::model::decoder::WeightDtype;
use crate::model::sampling::SamplingParams;
use crate::parallel::layout::check_tp_for_model;
use crate::policy::predictor::validate;
use crate::policy::profile::{DecodeSample, PrefillSample, SwitchProfile, PROFILE_VERSION};
use crate::policy::{ModelDims, Profile};
use crate::reshard::cost::{CostModel, KvPolicy};
use crate::stats::median;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// Ranks of the node the profile describes; tp degrees are its divisors that split the model.
    #[arg(long)]
    pub world: usize,
    /// Output profile JSON.
    #[arg(long)]
    pub out: PathBuf,
    /// Live batch sizes of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub batches: Vec<usize>,
    /// Context lengths (cached tokens per sequence) of the decode grid.
    #[arg(long, value_delimiter = ',', default_value = "32,128,512")]
    pub contexts: Vec<usize>,
    /// Decode steps timed per grid point (the median is kept).
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// After profiling, report the predictor's mean absolute % error on held-out grid points.
    #[arg(long)]
    pub validate: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the ranks run. On cuda every tp degree's ranks use --devices (default: one GPU per
    /// rank when there are enough, else all on GPU 0 — ranks sharing a GPU share its bandwidth,
    /// so such a profile describes one GPU, not a node). The switch is measured on the CPU only;
    /// on cuda it is modeled from the measured device copy bandwidth.
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// Weight dtype (cuda: also activations and KV).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: super::DtypeArg,
}

/// Profiles the engine on `world` ranks over the decode grid (see the module docs), on the CPU
/// in f32.
pub fn measure(
    m: &Model,
    world: usize,
    batches: &[usize],
    contexts: &[usize],
    steps: usize,
    seed: u64,
) -> Result<Profile> {
    let grid = Grid {
        world,
        batches,
        contexts,
        steps,
        seed,
    };
    measure_on(m, &grid, &Backend::Cpu, WeightDtype::F32)
}

/// [`measure`] on any backend and dtype.
fn measure_on(m: &Model, a: &Grid, backend: &Backend, dtype: WeightDtype) -> Result<Profile> {
    let cpu = *backend == Backend::Cpu;
    if a.batches.is_empty()
        || a.contexts.is_empty()
        || a.batches.contains(&0)
        || a.contexts.contains(&0)
        || a.steps == 0
    {
        return Err(Error::Usage(
            "--batches, --contexts and --steps must be positive".into(),
        ));
    }
    let tps: Vec<usize> = (1..=a.world)
        .filter(|t| a.world % t == 0 && check_tp_for_model(*t, &m.cfg).is_ok())
        .collect();
    if tps.is_empty() {
        return Err(Error::Usage(format!(
            "no tp degree divides world {} and the model",
            a.world
        )));
    }
    let (max_b, max_c) = (
        *a.batches.iter().max().unwrap_or(&1),
        *a.contexts.iter().max().unwrap_or(&1),
    );
    let prefill_tokens: usize =
        a.batches.iter().sum::<usize>() * a.contexts.iter().sum::<usize>() * tps.len();
    if cpu {
        eprintln!(
            "profiling tp {:?} x batch {:?} x context {:?}, {} decode steps each ({} prefill tokens in all; on this CPU backend at ~500 tok/s that is ~{:.0} s)",
            tps, a.batches, a.contexts, a.steps, prefill_tokens, prefill_tokens as f64 / 500.0
        );
    } else {
        eprintln!(
            "profiling tp {:?} x batch {:?} x context {:?} on {}, {} decode steps each ({} prefill tokens in all)",
            tps, a.batches, a.contexts, backend.name(), a.steps, prefill_tokens
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let vocab = m.cfg.vocab_size as u32;
    let (mut device, mut copy_bw) = (String::new(), 0.0);
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    let pb = progress(
        (tps.len() * a.batches.len() * a.contexts.len()) as u64,
        "profile",
    );
    for &tp in &tps {
        let kv_blocks = max_b * (max_c + a.steps + 2).div_ceil(16) + 8;
        let opts = EngineOptions {
            world: tp,
            tp,
            block_size: 16,
            kv_blocks,
            dtype,
            sampling: SamplingParams::default(),
        };
        let backend = match backend {
            // world = tp here: each degree gets the first tp of the listed devices.
            Backend::Cuda { devices: Some(d) } => Backend::Cuda {
                devices: Some(d.iter().copied().take(tp).collect()),
            },
            other => other.clone(),
        };
        let mut engine = Engine::with_backend(m.cfg.clone(), &m.ck, opts, &backend)?;
        if tp == tps[0] {
            device = engine.describe_ranks();
            // The first rank's memory: host memory copied by one thread, or its GPU.
            copy_bw = memory_bandwidths(&engine, 1)?[0].1;
        }
        let (mut pre_tok, mut pre_ms) = (0usize, 0f64);
        for &b in a.batches {
            for &c in a.contexts {
                let reqs: Vec<Request> = (0..b)
                    .map(|_| Request {
                        input_ids: (0..c).map(|_| rng.random_range(3..vocab)).collect(),
                        max_new_tokens: a.steps + 1,
                        ignore_eos: true,
                    })
                    .collect();
                engine.add_requests(&reqs)?;
                let first = engine.step()?;
                pre_tok += first.tokens_in;
                pre_ms += first.elapsed_ms;
                let mut times = Vec::new();
                while engine.live() > 0 {
                    times.push(engine.step()?.elapsed_ms);
                }
                decode.push(DecodeSample {
                    tp,
                    batch: b,
                    context: c + a.steps / 2,
                    step_ms: median(&mut times),
                });
                pb.inc(1);
            }
        }
        prefill.push(PrefillSample {
            tp,
            tokens_per_s: pre_tok as f64 / (pre_ms / 1e3),
        });
    }
    pb.finish_and_clear();
    // Bytes of KV moved per second: a copy reads and writes each byte, so half the copy traffic;
    // on the CPU a quarter, since the executor gathers into staging and scatters again.
    let transfer = if cpu { copy_bw / 4.0 } else { copy_bw / 2.0 };
    let switch = if cpu {
        measure_switch(a, m, &tps, transfer, &prefill)?
    } else {
        (modeled_switch(transfer), false)
    };
    let mut dims = ModelDims::from_config(&m.cfg);
    dims.dtype_bytes = match (cpu, dtype) {
        (true, _) | (false, WeightDtype::F32) => 4,
        (false, WeightDtype::Bf16 | WeightDtype::F16) => 2,
    };
    let measured: BTreeMap<String, bool> = [
        ("decode", true),
        ("prefill", true),
        ("transfer", true),
        ("switch", switch.1),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), *v))
    .collect();
    let profile = Profile {
        version: PROFILE_VERSION,
        model: dims,
        world: a.world,
        backend: backend.name().into(),
        device: if cpu {
            format!(
                "CPU reference backend, {} cores",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            )
        } else {
            device
        },
        decode,
        prefill,
        transfer_bytes_per_s: transfer,
        switch: switch.0,
        measured,
        source: PathBuf::from("<profile>"),
    };
    profile.validate()?;
    Ok(profile)
}

/// Switch components modeled as copies at `transfer` bytes/s with no fixed cost.
fn modeled_switch(transfer: f64) -> SwitchProfile {
    SwitchProfile {
        fixed_ms: 0.0,
        weight_bytes_per_s: transfer,
        kv_bytes_per_s: transfer,
    }
}

struct Grid<'a> {
    world: usize,
    batches: &'a [usize],
    contexts: &'a [usize],
    steps: usize,
    seed: u64,
}

pub fn run(a: ProfileArgs) -> Result<()> {
    let backend = a.backend.backend()?;
    let m = Model::open(&a.model)?;
    let t0 = Instant::now();
    let grid = Grid {
        world: a.world,
        batches: &a.batches,
        contexts: &a.contexts,
        steps: a.steps,
        seed: a.seed,
    };
    let mut profile = measure_on(&m, &grid, &backend, a.dtype.into())?;
    profile.source = a.out.clone();
    profile.validate()?;
    profile.save(&a.out)?;
    eprintln!(
        "wrote {} in {:.1} s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    eprintln!(
        "{:>4} {:>6} {:>8} {:>10}",
        "tp", "batch", "context", "step ms"
    );
    for s in &profile.decode {
        eprintln!(
            "{:>4} {:>6} {:>8} {:>10.2}",
            s.tp, s.batch, s.context, s.step_ms
        );
    }
    for p in &profile.prefill {
        eprintln!("prefill tp {}: {:.0} tokens/s", p.tp, p.tokens_per_s);
    }
    if a.validate {
        let r = validate(&profile, 0.25, a.seed)?;
        println!("{}", serde_json::to_string(&r).unwrap_or_default());
        eprintln!(
            "predictor: mean absolute error {:.1}% on {} held-out points ({} fitted)",
            r.overall_mape, r.n_test, r.n_train
        );
    }
    Ok(())
}

/// Switch components from one real switch (largest tp -> smallest, which moves weights and KV);
/// `(profile, measured)`, modeled from the copy rate when only one tp exists.
fn measure_switch(
    a: &Grid,
    m: &Model,
    tps: &[usize],
    transfer: f64,
    prefill: &[PrefillSample],
) -> Result<(SwitchProfile, bool)> {
    let (lo, hi) = (tps[0], tps[tps.len() - 1]);
    if lo == hi {
        return Ok((modeled_switch(transfer), false));
    }
    let opts = EngineOptions {
        world: a.world,
        tp: hi,
        block_size: 16,
        kv_blocks: 2048,
        dtype: WeightDtype::F32,
        sampling: SamplingParams::default(),
    };
    let mut engine = Engine::new(m.cfg.clone(), &m.ck, opts)?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 1);
    let reqs: Vec<Request> = (0..4)
        .map(|_| Request {
            input_ids: (0..64)
                .map(|_| rng.random_range(3..m.cfg.vocab_size as u32))
                .collect(),
            max_new_tokens: 4,
            ignore_eos: true,
        })
        .collect();
    engine.add_requests(&reqs)?;
    engine.step()?;
    let cost = CostModel {
        transfer_bytes_per_s: transfer,
        fixed_transfer_s: 0.0,
        prefill_tokens_per_s: prefill.iter().map(|p| (p.tp, p.tokens_per_s)).collect(),
        fixed_prefill_s: 0.0,
    };
    let r = engine.reconfigure(lo, KvPolicy::Migrate, &cost)?;
    let kv_bytes = (r.kv_tokens * m.cfg.kv_bytes_per_token(4)) as f64;
    let fixed = (r.total_ms - r.weight_reshard_ms - r.kv_ms - r.kv_alloc_ms).max(0.0);
    Ok((
        SwitchProfile {
            fixed_ms: fixed,
            weight_bytes_per_s: r.weight_bytes_cross_rank as f64
                / (r.weight_reshard_ms / 1e3).max(1e-9),
            kv_bytes_per_s: kv_bytes / (r.kv_ms / 1e3).max(1e-9),
        },
        true,
    ))
}
