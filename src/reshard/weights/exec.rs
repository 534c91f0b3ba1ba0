//! Executes a [`WeightPlan`] on the CPU ranks' buffers: validated against the model and the
//! shards, lowered to per-rank programs (`program`), and run one thread per rank (`reshard::cpu`).
//! Each rank compacts in place when its shard shrinks (tp grows: zero extra bytes), otherwise
//! builds each buffer fresh after receiving its missing rows.

use super::program::{programs, role_buffers, WeightProgram};
use super::{Op, RankOps, WeightPlan};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::decoder::RankWeights;
use crate::parallel::shard::Role;
use crate::reshard::cpu;

/// What executing a weight plan did (bytes at the plan's element size).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReshardStats {
    /// Rows staged out of another rank's buffer.
    pub bytes_cross_rank: u64,
    /// Rows kept from the rank's own buffer (moved or left in place).
    pub bytes_in_place: u64,
    /// Most extra memory one rank held at once: its received rows plus a fresh buffer being built.
    pub peak_extra_bytes: u64,
    /// Weight bytes released per physical rank (negative when the shard grew).
    pub freed_bytes_per_rank: Vec<i64>,
}

fn buffer(w: &RankWeights, role: Role, layer: usize) -> Option<&Vec<f32>> {
    role_buffers(w, role).get(layer).copied()
}

fn usage(msg: String) -> Error {
    Error::Invalid(format!("weight reshard: {msg}"))
}

/// Checks the plan against the model and the ranks' current buffers, so execution cannot fail.
fn validate(plan: &WeightPlan, cfg: &ModelConfig, ranks: &[RankWeights]) -> Result<()> {
    let (old, world) = (&plan.old, plan.old.world);
    if plan.new.world != world || ranks.len() != world {
        return Err(Error::Layout(format!(
            "plan is for world {world} -> {}, got {} ranks",
            plan.new.world,
            ranks.len()
        )));
    }
    if plan.hidden != cfg.hidden_size
        || plan.num_layers != cfg.num_layers
        || plan.tied != cfg.tie_word_embeddings
    {
        return Err(usage("the plan was made for a different model".into()));
    }
    for (p, w) in ranks.iter().enumerate() {
        let t = old.position(p).1;
        if w.tp != old.tp || w.tp_rank != t {
            return Err(Error::Layout(format!(
                "rank {p} holds tp-rank {} of {} but the plan starts from tp-rank {t} of {}",
                w.tp_rank, w.tp, old.tp
            )));
        }
        if w.layers.len() != cfg.num_layers {
            return Err(usage(format!(
                "rank {p} has {} layers, expected {}",
                w.layers.len(),
                cfg.num_layers
            )));
        }
    }
    let h = plan.hidden;
    let roles: Vec<(Role, usize)> = plan.ops.iter().map(|r| (r.role, r.repeats)).collect();
    if roles != super::roles(cfg) {
        return Err(usage(format!(
            "the plan covers {roles:?}, the model needs {:?}",
            super::roles(cfg)
        )));
    }
    for ro in &plan.ops {
        if ro.ranks.len() != world {
            return Err(usage(format!(
                "{:?} lists {} ranks, expected {world}",
                ro.role,
                ro.ranks.len()
            )));
        }
        for (p, rk) in ro.ranks.iter().enumerate() {
            check_rank_ops(rk, p, &ro.ranks, world)
                .map_err(|m| usage(format!("{:?} rank {p}: {m}", ro.role)))?;
            for l in 0..ro.repeats {
                let len = buffer(&ranks[p], ro.role, l).map(Vec::len);
                if len != Some(rk.old_rows * h) {
                    return Err(usage(format!(
                        "rank {p} {:?} layer {l} holds {len:?} elements, expected {} rows of {h}",
                        ro.role, rk.old_rows
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Ops must tile [0, new_rows) in order and read inside the source's old buffer.
fn check_rank_ops(
    rk: &RankOps,
    p: usize,
    all: &[RankOps],
    world: usize,
) -> std::result::Result<(), String> {
    if rk.rank != p {
        return Err(format!("listed as rank {}", rk.rank));
    }
    let mut next = 0;
    for op in &rk.ops {
        if op.dst_row() != next {
            return Err(format!("ops do not tile the buffer at row {next}"));
        }
        next += op.rows();
        if let Op::Copy {
            src_rank,
            src_row,
            rows,
            ..
        } = *op
        {
            if src_rank >= world || src_row + rows > all[src_rank].old_rows {
                return Err(format!(
                    "copy reads rows {src_row}+{rows} of rank {src_rank}"
                ));
            }
        }
    }
    if next != rk.new_rows {
        return Err(format!("ops cover {next} rows, expected {}", rk.new_rows));
    }
    Ok(())
}

/// Applies `plan` to `ranks` (index = physical rank), leaving each rank with its shard of the new
/// layout (`tp` and `tp_rank` updated). The plan and buffers are validated first; then the plan
/// runs as per-rank programs, one thread per rank over a CPU group of the whole world (see
/// `reshard::cpu`). An error leaves every rank untouched.
pub fn execute(
    plan: &WeightPlan,
    cfg: &ModelConfig,
    ranks: &mut [RankWeights],
) -> Result<ReshardStats> {
    validate(plan, cfg, ranks)?;
    let progs = programs(plan);
    let comms = cpu::world_group(plan.old.world);
    let staged = cpu::exchange_weights(&progs, ranks, &comms, None)?;
    let before: Vec<usize> = ranks.iter().map(|w| w.bytes()).collect();
    cpu::rebuild_weights(&progs, &plan.new, ranks, staged);
    Ok(stats(&progs, &before, ranks))
}

/// What running `progs` did, from the programs' counts and the shards' sizes before and after.
pub fn stats(progs: &[WeightProgram], before: &[usize], ranks: &[RankWeights]) -> ReshardStats {
    ReshardStats {
        bytes_cross_rank: progs.iter().map(|p| p.bytes_received).sum(),
        bytes_in_place: progs.iter().map(|p| p.bytes_in_place).sum(),
        peak_extra_bytes: progs.iter().map(|p| p.peak_extra_bytes).max().unwrap_or(0),
        freed_bytes_per_rank: before
            .iter()
            .zip(ranks)
            .map(|(&b, w)| b as i64 - w.bytes() as i64)
            .collect(),
    }
}
