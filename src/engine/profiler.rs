//! Measuring a profile of this engine on synthetic batches: decode step latency over
//! (tp, batch, context), prefill tokens/s per tp, KV transfer bandwidth and the measured switch
//! components, as the profile the predictor and the decision rule read.
//!
//! Each decode sample is one tp-replica alone (world = tp), so the grid measures what one replica
//! costs; the predictor and the simulator combine replicas.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Backend, Engine, EngineOptions, Request, DEFAULT_BLOCK_SIZE};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::model::sampling::random_ids;
use crate::model::sampling::SamplingParams;
use crate::model::ModelDir;
use crate::parallel::layout::check_tp_for_model;
use crate::parallel::Layout;
use crate::policy::profile::{DecodeSample, PrefillSample, SwitchProfile, PROFILE_VERSION};
use crate::policy::{ModelDims, Profile};
use crate::reshard::cost::{CostModel, KvPolicy};
use crate::stats::median;

/// Half the interquartile range of sorted `v` (nearest rank), 0 for fewer than 4 values.
fn half_iqr(v: &[f64]) -> f64 {
    if v.len() < 4 {
        return 0.0;
    }
    let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (q(0.75) - q(0.25)) / 2.0
}

/// What to measure.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileGrid {
    /// Ranks of the node the profile describes; tp degrees are its divisors that split the model.
    pub world: usize,
    /// Live batch sizes of the decode grid.
    pub batches: Vec<usize>,
    /// Context lengths (cached tokens per sequence) of the decode grid.
    pub contexts: Vec<usize>,
    /// Decode steps timed per grid point (the median is kept).
    pub steps: usize,
    pub seed: u64,
}

impl ProfileGrid {
    /// Checks the grid; returns the tp degrees it will measure.
    pub fn tps(&self, model: &ModelDir) -> Result<Vec<usize>> {
        Layout::new(self.world, 1)?;
        for (name, values) in [("batches", &self.batches), ("contexts", &self.contexts)] {
            if values.is_empty() || values.contains(&0) {
                return Err(Error::Invalid(format!(
                    "profile grid: `{name}` must be one or more positive values, got {values:?}"
                )));
            }
        }
        if self.steps == 0 {
            return Err(Error::Invalid(
                "profile grid: `steps` (decode steps timed per point) must be positive, got 0"
                    .into(),
            ));
        }
        let most = self.longest_context(&model.cfg);
        if let Some(&c) = self.contexts.iter().find(|&&c| c > most) {
            return Err(Error::Invalid(format!(
                "profile grid: `contexts` value {c} is too long for this model: each point \
                 prefills it and decodes {} more tokens, and max_position_embeddings is {} \
                 (at most {most} here)",
                self.steps.saturating_add(1),
                model.cfg.max_position_embeddings
            )));
        }
        let tps: Vec<usize> = (1..=self.world)
            .filter(|t| self.world.is_multiple_of(*t) && check_tp_for_model(*t, &model.cfg).is_ok())
            .collect();
        if tps.is_empty() {
            return Err(Error::Invalid(format!(
                "no tp degree divides world {} and the model",
                self.world
            )));
        }
        Ok(tps)
    }

    /// The longest context a grid point of this model can hold: each point prefills its context
    /// and then decodes `steps + 1` tokens (a warm-up and the timed steps).
    pub fn longest_context(&self, cfg: &crate::model::config::ModelConfig) -> usize {
        cfg.max_position_embeddings
            .saturating_sub(self.steps.saturating_add(1))
    }

    /// Grid points (one per tp, batch, context), for progress reports.
    pub fn points(&self, tps: &[usize]) -> usize {
        tps.len() * self.batches.len() * self.contexts.len()
    }

    /// Prompt tokens the grid prefills in all (what dominates its run time on a CPU).
    pub fn prefill_tokens(&self, tps: &[usize]) -> usize {
        let b = self
            .batches
            .iter()
            .fold(0usize, |a, &x| a.saturating_add(x));
        let c = self
            .contexts
            .iter()
            .fold(0usize, |a, &x| a.saturating_add(x));
        b.saturating_mul(c).saturating_mul(tps.len())
    }
}

/// Profiles the engine on `backend` in `dtype` over `grid`; `on_point` is called after each grid
/// point with (points done, points in all).
pub fn measure_profile(
    model: &ModelDir,
    grid: &ProfileGrid,
    backend: &Backend,
    dtype: Dtype,
    mut on_point: impl FnMut(usize, usize),
) -> Result<Profile> {
    let cpu = *backend == Backend::Cpu;
    let tps = grid.tps(model)?;
    let total = grid.points(&tps);
    let (max_b, max_c) = (
        *grid.batches.iter().max().unwrap_or(&1),
        *grid.contexts.iter().max().unwrap_or(&1),
    );
    let mut rng = ChaCha8Rng::seed_from_u64(grid.seed);
    let vocab = model.cfg.vocab_size;
    // Every grid point's batch at once: an error, not a wrapped count, for absurd grids.
    let kv_blocks = (max_c + grid.steps + 2)
        .div_ceil(DEFAULT_BLOCK_SIZE)
        .checked_mul(max_b)
        .and_then(|n| n.checked_add(8))
        .ok_or_else(|| {
            Error::Invalid("profile grid: `batches` x `contexts` is too large".into())
        })?;
    let (mut device, mut copy_bw) = (String::new(), 0.0);
    let (mut decode, mut prefill, mut done) = (Vec::new(), Vec::new(), 0);
    for &tp in &tps {
        let opts = EngineOptions {
            world: tp,
            tp,
            block_size: DEFAULT_BLOCK_SIZE,
            kv_blocks,
            dtype,
            sampling: SamplingParams::default(),
        };
        let backend = match backend {
            // world = tp here: each degree gets the first tp of the listed devices.
            Backend::Cuda {
                devices: Some(d),
                switch,
            } => Backend::Cuda {
                devices: Some(d.iter().copied().take(tp).collect()),
                switch: *switch,
            },
            other => other.clone(),
        };
        let mut engine = Engine::with_backend(model.cfg.clone(), &model.ck, opts, &backend)
            .map_err(|e| match e {
                // The pools are sized by the grid, not by a `kv_blocks` the caller chose.
                Error::KvExhausted(m) => Error::KvExhausted(format!(
                    "profile grid: its largest point (`batches` {max_b} x `contexts` {max_c}, \
                     and room for its decode steps) needs {kv_blocks} KV blocks per rank at tp \
                     {tp}: {}",
                    m.replace("`kv_blocks` ", "")
                )),
                e => e,
            })?;
        if tp == tps[0] {
            device = engine.describe_ranks();
            // The first rank's memory: host memory copied by one thread, or its GPU.
            copy_bw = engine.memory_bandwidths(1)?[0].1;
        }
        let (mut pre_tok, mut pre_ms) = (0usize, 0f64);
        for &b in &grid.batches {
            for &c in &grid.contexts {
                let reqs: Vec<Request> = (0..b)
                    .map(|_| Request {
                        input_ids: random_ids(&mut rng, c, vocab),
                        max_new_tokens: grid.steps + 1,
                        ignore_eos: true,
                    })
                    .collect();
                engine.add_requests(&reqs)?;
                // The prefill: one step, or several where the prompts outgrow a step's cap
                // (`STEP_CAP`); the decode steps follow.
                pre_tok += b * c;
                while engine.unprefilled() > 0 {
                    pre_ms += engine.step()?.elapsed_ms;
                }
                // A decode sample is a step of the whole batch, one token each: after a prefill
                // of several steps the prompts started first finish first.
                let mut times = Vec::new();
                while engine.live() > 0 {
                    let r = engine.step()?;
                    if r.tokens_out == b && r.tokens_in == b {
                        times.push(r.elapsed_ms);
                    }
                }
                if times.is_empty() {
                    return Err(Error::Invalid(format!(
                        "profile point tp {tp}, batch {b}, context {c}: the prompts took more steps to prefill than the {} decode steps, so no step decoded the whole batch (a step prefills only what {} holds); profile smaller batches or contexts, or more steps",
                        grid.steps,
                        super::STEP_CAP
                    )));
                }
                let step_ms = median(&mut times);
                decode.push(DecodeSample {
                    tp,
                    batch: b,
                    context: c + grid.steps / 2,
                    step_ms,
                    spread_ms: half_iqr(&times),
                });
                done += 1;
                on_point(done, total);
            }
        }
        prefill.push(PrefillSample {
            tp,
            tokens_per_s: pre_tok as f64 / (pre_ms / 1e3),
        });
    }
    // Bytes of KV moved per second: a copy reads and writes each byte, so half the copy traffic;
    // on the CPU a quarter, since the executor gathers into staging and scatters again.
    let transfer = if cpu { copy_bw / 4.0 } else { copy_bw / 2.0 };
    let (switch, switch_measured) = if cpu {
        measure_switch(grid, model, &tps, transfer, &prefill)?
    } else {
        (modeled_switch(transfer), false)
    };
    let mut dims = ModelDims::from_config(&model.cfg);
    dims.dtype_bytes = backend.kv_elem_bytes(dtype);
    let measured: BTreeMap<String, bool> = [
        ("decode", true),
        ("prefill", true),
        ("transfer", true),
        ("switch", switch_measured),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), *v))
    .collect();
    let profile = Profile {
        version: PROFILE_VERSION,
        max_position_embeddings: Some(model.cfg.max_position_embeddings),
        model: dims,
        world: grid.world,
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
        switch,
        measured,
        kv_capacity_tokens: Default::default(),
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

/// Switch components from one real switch on the CPU (largest tp -> smallest, which moves weights
/// and KV); `(profile, measured)`, modeled from the copy rate when only one tp exists.
fn measure_switch(
    grid: &ProfileGrid,
    model: &ModelDir,
    tps: &[usize],
    transfer: f64,
    prefill: &[PrefillSample],
) -> Result<(SwitchProfile, bool)> {
    let (lo, hi) = (tps[0], tps[tps.len() - 1]);
    if lo == hi {
        return Ok((modeled_switch(transfer), false));
    }
    let opts = EngineOptions {
        world: grid.world,
        tp: hi,
        block_size: DEFAULT_BLOCK_SIZE,
        kv_blocks: 2048,
        dtype: Dtype::F32,
        sampling: SamplingParams::default(),
    };
    let mut engine = Engine::new(model.cfg.clone(), &model.ck, opts)?;
    let mut rng = ChaCha8Rng::seed_from_u64(grid.seed ^ 1);
    let reqs: Vec<Request> = (0..4)
        .map(|_| Request {
            input_ids: random_ids(&mut rng, 64, model.cfg.vocab_size),
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
    let kv_bytes = (r.kv_tokens * model.cfg.kv_bytes_per_token(4)) as f64;
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
