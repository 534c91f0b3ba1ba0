//! TP switches from the command line: `--reconfigure STEP:TP` parsing and checking,
//! and `pat bench switch`.

use std::path::PathBuf;
use std::str::FromStr;

use clap::Args;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::common::{open_model, plural, plural_with, MIB};
use pat::engine::sequence::prefill_rate;
use pat::engine::{check_lengths, Engine, EngineOptions, Request, STEP_CAP};
use pat::error::{Error, Result};
use pat::kv::blocks_for;
use pat::model::sampling::random_ids;
use pat::model::ModelDir;
use pat::parallel::layout::check_tp_for_model;
use pat::parallel::Layout;
use pat::reshard::cost::{CostModel, KvPolicy};
use pat::stats::median;

/// A planned switch: after `step` decode steps, go to `tp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SwitchAt {
    pub step: usize,
    pub tp: usize,
}

impl FromStr for SwitchAt {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (a, b) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: expected STEP:TP, e.g. 40:4"))?;
        let step = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: STEP `{a}` is not a whole number"))?;
        let tp: usize = b
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: TP `{b}` is not a whole number"))?;
        if tp == 0 {
            return Err(format!("`{s}`: TP must be at least 1"));
        }
        Ok(SwitchAt { step, tp })
    }
}

/// Checks every planned tp against the world and the model before any work starts; `flag`
/// names a switch as the user gave it (`--reconfigure 8:4`, `--to 4`).
pub fn check_switches(
    switches: &[SwitchAt],
    world: usize,
    model: &ModelDir,
    flag: impl Fn(&SwitchAt) -> String,
) -> Result<()> {
    Layout::new(world, 1)?;
    for s in switches {
        Layout::new(world, s.tp)
            .and_then(|_| check_tp_for_model(s.tp, &model.cfg))
            .map_err(|e| Error::Invalid(format!("{}: {e}", flag(s))))?;
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct BenchSwitchArgs {
    /// Model directory (config.json + safetensors; `pat init-model` makes one).
    #[arg(long)]
    pub model: PathBuf,
    /// Ranks (CPU threads, or GPU ranks with --backend cuda).
    #[arg(long, default_value_t = 4, value_parser = super::common::ranks)]
    pub world: usize,
    /// TP degree before the switch.
    #[arg(long, value_parser = super::common::count)]
    pub from: usize,
    /// TP degree(s) after; a list (e.g. 2,4) runs a ladder, one record per switch.
    #[arg(long, value_delimiter = ',', required = true, value_parser = super::common::count)]
    pub to: Vec<usize>,
    /// Sequences in flight at the switch.
    #[arg(long, default_value_t = 8, value_parser = super::common::count)]
    pub batch: usize,
    /// Context (prompt tokens) of each sequence.
    #[arg(long, default_value_t = 256, value_parser = super::common::count)]
    pub context: usize,
    /// How the in-flight sequences' KV reaches the new layout: migrate (the default here: the
    /// bench times the KV reshard), recompute, or auto (the cost model picks per sequence, as
    /// `generate` does by default).
    #[arg(long, default_value = "migrate")]
    pub kv_transfer: KvPolicy,
    /// Weight (and, on cuda, activation and KV) dtype.
    #[arg(long, default_value = "f32", value_name = "f32|bf16|f16")]
    pub dtype: pat::Dtype,
    #[command(flatten)]
    pub backend: super::BackendArgs,
    /// KV memory per rank in MiB at the starting layout (the switch re-divides it, plus the
    /// weight bytes it frees); raised to what the batch needs (0: just that).
    #[arg(long, default_value_t = 256, value_parser = super::common::count)]
    pub kv_mib: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn bench_switch(a: BenchSwitchArgs) -> Result<()> {
    let m = open_model(&a.model)?;
    if a.batch == 0 || a.context == 0 {
        return Err(Error::Invalid(
            "--batch and --context must be at least 1".into(),
        ));
    }
    let mut tps = vec![a.from];
    tps.extend(&a.to);
    for w in tps.windows(2) {
        if w[0] == w[1] {
            return Err(Error::Invalid(format!(
                "switch from tp {} to tp {}: nothing changes",
                w[0], w[1]
            )));
        }
    }
    Layout::new(a.world, a.from)
        .and_then(|_| check_tp_for_model(a.from, &m.cfg))
        .map_err(|e| Error::Invalid(format!("--from {}: {e}", a.from)))?;
    let switches: Vec<SwitchAt> = a.to.iter().map(|&tp| SwitchAt { step: 0, tp }).collect();
    check_switches(&switches, a.world, &m, |s| format!("--to {}", s.tp))?;
    let cfg = &m.cfg;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let steps_after = 3;
    let per_switch = 1 + steps_after;
    let max_new = 2 + per_switch * a.to.len() + 1;
    // Lengths first: nothing is built for a context the model cannot hold.
    if check_lengths(cfg, a.context, max_new).is_err() {
        let most = cfg.max_position_embeddings.saturating_sub(max_new);
        return Err(Error::Invalid(format!(
            "--context {}: the model holds {} positions, and the bench decodes {max_new} tokens \
             past the context (2, then {} per --to switch, then 1): at most {most}",
            a.context, cfg.max_position_embeddings, per_switch
        )));
    }
    // The scheduler spreads equal requests evenly over the replicas: each rank's pool holds its
    // replica's share.
    let per_replica = a.batch.div_ceil(a.world / a.from);
    let needed = blocks_for(a.context + max_new, pat::engine::DEFAULT_BLOCK_SIZE)
        .checked_mul(per_replica)
        .filter(|&n| n <= u32::MAX as usize)
        .ok_or_else(|| Error::Invalid("--batch x --context is too large".into()))?;
    let backend = a.backend.backend()?;
    let mut opts = EngineOptions::for_memory_budget(
        cfg,
        &backend,
        a.world,
        a.from,
        a.dtype,
        (a.kv_mib as u64)
            .checked_mul(1 << 20)
            .ok_or_else(|| Error::Invalid(format!("--kv-mib {} is too large", a.kv_mib)))?,
    )?;
    opts.kv_blocks = opts.kv_blocks.max(needed);
    let mut engine =
        Engine::with_backend(cfg.clone(), &m.ck, opts, &backend).map_err(|e| match e {
            Error::KvExhausted(msg) => Error::KvExhausted(format!(
                "--batch {} x --context {} (--kv-mib {}): {}",
                a.batch,
                a.context,
                a.kv_mib,
                msg.replace("`kv_blocks`", "blocks")
            )),
            // The library names its own parameter; here the blocks come from --kv-mib.
            Error::Invalid(m) if m.contains("`kv_blocks`") => Error::Invalid(format!(
                "--kv-mib {}: {}",
                a.kv_mib,
                m.replace("`kv_blocks`", "the count of KV blocks per rank it gives")
            )),
            e => e,
        })?;
    // The pool holds every prompt's KV, far more than the prompts' ids: these fit too.
    let reqs: Vec<Request> = (0..a.batch)
        .map(|_| Request {
            input_ids: random_ids(&mut rng, a.context, cfg.vocab_size),
            max_new_tokens: max_new,
            ignore_eos: true,
        })
        .collect();
    engine.add_requests(&reqs)?;
    let mut steps = vec![engine.step()?];
    let prefill = prefill_rate(&steps).unwrap_or(1.0);
    let cost = CostModel::measured_cpu(prefill);
    let crossover = match cost.crossover_tokens(a.to[0], cfg.kv_bytes_per_token(4) as f64) {
        0.0 => "migrating beats recomputing at any length".to_string(),
        n if n.is_infinite() => "recomputing beats migrating at any length".to_string(),
        n => format!(
            "migrating beats recomputing above {}",
            plural(n.round() as u64, "token")
        ),
    };
    errln!(
        "first step prefilled {} of {} x {} prompt tokens in {:.0} ms ({:.0} tok/s); KV transfer {:.2} GB/s measured; cost model at tp {}: {crossover}",
        steps[0].prefill_tokens,
        a.batch,
        a.context,
        steps[0].elapsed_ms,
        prefill,
        cost.transfer_bytes_per_s / 1e9,
        a.to[0],
    );
    for _ in 0..2 {
        steps.push(engine.step()?);
    }
    let mut before = median(&mut steps[1..].iter().map(|s| s.elapsed_ms).collect::<Vec<_>>());
    for &to in &a.to {
        let r = engine.reconfigure(to, a.kv_transfer, &cost)?;
        let mut after: Vec<f64> = (0..steps_after)
            .map(|_| engine.step().map(|s| s.elapsed_ms))
            .collect::<Result<_>>()?;
        let post = median(&mut after);
        let mut rec = serde_json::to_value(&r).map_err(|e| Error::Invalid(e.to_string()))?;
        rec["post_switch_step_latency_ms"] = post.into();
        rec["pre_switch_step_latency_ms"] = before.into();
        rec["world"] = a.world.into();
        rec["batch"] = a.batch.into();
        rec["context"] = a.context.into();
        rec["backend"] = engine.backend().into();
        if engine.backend() == "cuda" {
            rec["gpu_switch"] = a.backend.gpu_switch_name().into();
        }
        // The switch's memory traffic over its whole time, where the ranks count it.
        let gbps = r
            .memory_bytes
            .map(|b| b as f64 / (r.total_ms * 1e-3).max(1e-9) / 1e9);
        rec["memory_gbps"] = gbps.into();
        outln!("{rec}")?;
        errln!(
            "tp {} -> {}: {} in flight, {}, {}: total {:.1} ms (weights {:.1}, KV {:.1} [predicted migrate {:.1} / recompute {:.1}], pool alloc {:.1}, commit {:.1}, groups {:.3}); {:.2} MiB across ranks, {:.2} MiB in place; peak extra {:.1} MiB; step {:.1} -> {:.1} ms",
            r.from_tp, r.to_tp, r.n_inflight, plural(r.kv_tokens, "KV token"), r.kv_policy, r.total_ms, r.weight_reshard_ms, r.kv_ms, r.predicted_migrate_ms, r.predicted_recompute_ms, r.kv_alloc_ms, r.commit_ms, r.comm_group_ms,
            r.bytes_moved_cross_rank as f64 / MIB, r.bytes_moved_in_place as f64 / MIB, r.peak_extra_bytes as f64 / MIB, before, post
        );
        if let (Some(b), Some(g)) = (r.memory_bytes, gbps) {
            errln!(
                "  device memory: {:.2} GB read + written by the switch's copies, {g:.0} GB/s over its {:.1} ms (compare the device copy bandwidth: `pat bench reshard`)",
                b as f64 / 1e9,
                r.total_ms
            );
        }
        if r.kv_recompute_passes > 1 {
            errln!(
                "  KV recompute: {} in {} (their activations outgrow what one step may hold: {STEP_CAP})",
                plural(r.n_recomputed, "sequence"),
                plural_with(r.kv_recompute_passes, "pass", "passes")
            );
        }
        if r.kv_blocks_per_rank_goal > r.kv_blocks_per_rank_after {
            errln!(
                "  KV pool: {} per rank now (the devices could not hold more next to the old layout); the first step that needs more grows it toward {} (the old pool plus the freed shard bytes)",
                plural(r.kv_blocks_per_rank_after, "block"), r.kv_blocks_per_rank_goal
            );
        }
        before = post;
    }
    Ok(())
}
