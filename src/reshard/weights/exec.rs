//! Executes a [`WeightPlan`] on the CPU ranks' buffers, one (layer, role) at a time.
//!
//! For each (layer, role): first every rank's cross-rank rows are staged out of the source ranks'
//! *old* buffers (that staging is the transfer), then each rank builds its new buffer: compacted in
//! place when it is not larger (tp grows), otherwise built fresh and the old one dropped. Peak extra
//! memory is therefore about one layer's shard per rank.

use super::{Op, RankOps, WeightPlan};
use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::decoder::RankWeights;
use crate::parallel::shard::Role;

const F32_BYTES: u64 = 4;

/// What executing a weight plan did (bytes of the f32 buffers actually touched).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReshardStats {
    /// Rows staged out of another rank's buffer.
    pub bytes_cross_rank: u64,
    /// Rows kept from the rank's own buffer (moved or left in place).
    pub bytes_in_place: u64,
    /// Most extra memory held at once over all ranks: staged rows plus a fresh buffer being built.
    pub peak_extra_bytes: u64,
    /// Weight bytes released per physical rank (negative when the shard grew).
    pub freed_bytes_per_rank: Vec<i64>,
}

fn buffer(w: &RankWeights, role: Role, layer: usize) -> Option<&Vec<f32>> {
    match role {
        Role::Embed => Some(&w.embed),
        Role::LmHead => w.lm_head.as_ref(),
        _ => w.layers.get(layer).map(|l| match role {
            Role::Qkv => &l.qkv,
            Role::O => &l.o,
            Role::GateUp => &l.gate_up,
            _ => &l.down,
        }),
    }
}

fn buffer_mut(w: &mut RankWeights, role: Role, layer: usize) -> Option<&mut Vec<f32>> {
    match role {
        Role::Embed => Some(&mut w.embed),
        Role::LmHead => w.lm_head.as_mut(),
        _ => w.layers.get_mut(layer).map(|l| match role {
            Role::Qkv => &mut l.qkv,
            Role::O => &mut l.o,
            Role::GateUp => &mut l.gate_up,
            _ => &mut l.down,
        }),
    }
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

/// Builds rank `rk.rank`'s new buffer from its old one (`buf`) and its staged rows. Returns the
/// extra bytes of a fresh buffer when one was needed (0 when compacted in place).
fn rebuild(buf: &mut Vec<f32>, rk: &RankOps, staged: &[f32], h: usize) -> u64 {
    let new_len = rk.new_rows * h;
    // Own copies as (src_row, dst_row, rows), in dst_row order.
    let own: Vec<(usize, usize, usize)> = rk
        .ops
        .iter()
        .filter_map(|op| match *op {
            Op::Copy {
                src_rank,
                src_row,
                dst_row,
                rows,
            } if src_rank == rk.rank => Some((src_row, dst_row, rows)),
            _ => None,
        })
        .collect();
    // In place is safe when the buffer does not grow and every own copy moves rows down (src_row >=
    // dst_row). Proof: own copies run in increasing dst_row order and their destinations are
    // disjoint (ops tile the buffer). When copy i runs, every earlier copy j wrote only rows
    // < d_j + n_j <= d_i <= s_i, so the rows copy i reads are untouched; `copy_within` is a memmove,
    // so a copy overlapping its own source is fine. Staged rows and zeros are written after all own
    // copies, into rows no own copy writes, so they clobber nothing still needed. With nested
    // growth every own copy moves down: each new segment is a sub-range of the matching old segment,
    // and the segments before it in the new buffer are no longer than those in the old one.
    let moves_down = own.iter().all(|&(src, dst, _)| src >= dst);
    if new_len <= buf.len() && moves_down {
        for &(src, dst, n) in own.iter().filter(|c| c.0 != c.1) {
            buf.copy_within(src * h..(src + n) * h, dst * h);
        }
        fill_remote(buf, rk, staged, h);
        buf.truncate(new_len);
        buf.shrink_to_fit();
        0
    } else {
        let mut out = vec![0f32; new_len];
        for &(src, dst, n) in &own {
            out[dst * h..(dst + n) * h].copy_from_slice(&buf[src * h..(src + n) * h]);
        }
        fill_remote(&mut out, rk, staged, h);
        *buf = out;
        new_len as u64 * F32_BYTES
    }
}

/// Writes the staged cross-rank rows (in op order) and the zero rows.
fn fill_remote(buf: &mut [f32], rk: &RankOps, staged: &[f32], h: usize) {
    let mut at = 0;
    for op in &rk.ops {
        match *op {
            Op::Copy {
                src_rank,
                dst_row,
                rows,
                ..
            } if src_rank != rk.rank => {
                buf[dst_row * h..(dst_row + rows) * h].copy_from_slice(&staged[at..at + rows * h]);
                at += rows * h;
            }
            Op::Zero { dst_row, rows } => buf[dst_row * h..(dst_row + rows) * h].fill(0.0),
            Op::Copy { .. } => {}
        }
    }
}

/// Applies `plan` to `ranks` (index = physical rank), leaving each rank with its shard of the new
/// layout (`tp` and `tp_rank` updated). The plan and buffers are validated first; an error leaves
/// every rank untouched.
pub fn execute(
    plan: &WeightPlan,
    cfg: &ModelConfig,
    ranks: &mut [RankWeights],
) -> Result<ReshardStats> {
    validate(plan, cfg, ranks)?;
    let (h, world) = (plan.hidden, plan.old.world);
    let mut stats = ReshardStats {
        freed_bytes_per_rank: vec![0; world],
        ..Default::default()
    };
    for ro in &plan.ops {
        for layer in 0..ro.repeats {
            // Stage every rank's remote rows before anyone changes its buffer.
            let staged: Vec<Vec<f32>> = ro
                .ranks
                .iter()
                .map(|rk| {
                    let mut s = Vec::new();
                    for op in &rk.ops {
                        if let Op::Copy {
                            src_rank,
                            src_row,
                            rows,
                            ..
                        } = *op
                        {
                            if src_rank != rk.rank {
                                let src = buffer(&ranks[src_rank], ro.role, layer)
                                    .map_or(&[][..], |b| &b[..]);
                                s.extend_from_slice(&src[src_row * h..(src_row + rows) * h]);
                            }
                        }
                    }
                    s
                })
                .collect();
            let mut extra: u64 = staged.iter().map(|s| s.len() as u64 * F32_BYTES).sum();
            stats.bytes_cross_rank += extra;
            stats.peak_extra_bytes = stats.peak_extra_bytes.max(extra);
            for (rk, s) in ro.ranks.iter().zip(&staged) {
                let Some(buf) = buffer_mut(&mut ranks[rk.rank], ro.role, layer) else {
                    continue;
                };
                let old_len = buf.len();
                let fresh = rebuild(buf, rk, s, h);
                stats.peak_extra_bytes = stats.peak_extra_bytes.max(extra + fresh);
                extra -= s.len() as u64 * F32_BYTES;
                stats.bytes_in_place += (rk.new_rows * h) as u64 * F32_BYTES
                    - s.len() as u64 * F32_BYTES
                    - zero_bytes(rk, h);
                stats.freed_bytes_per_rank[rk.rank] +=
                    (old_len as i64 - buf.len() as i64) * F32_BYTES as i64;
            }
        }
    }
    for (p, w) in ranks.iter_mut().enumerate() {
        let (_, t) = plan.new.position(p);
        w.tp = plan.new.tp;
        w.tp_rank = t;
    }
    Ok(stats)
}

fn zero_bytes(rk: &RankOps, h: usize) -> u64 {
    rk.ops
        .iter()
        .filter(|o| matches!(o, Op::Zero { .. }))
        .map(|o| (o.rows() * h) as u64 * F32_BYTES)
        .sum()
}
