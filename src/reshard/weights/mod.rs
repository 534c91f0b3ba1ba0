//! Weight reshard plans: per role and destination rank, the row copies and zero fills that build the
//! rank's new shard out of the old shards.
//!
//! Every tp-split weight is a matrix of rows of length `hidden_size` and a rank's buffer is the
//! concatenation of its segments (`parallel::shard`). A plan names rows by their position in the old
//! and new buffers, so executing it is a handful of contiguous moves. Layer roles have the same row
//! structure in every layer, so one [`RoleOps`] serves all layers (`repeats` = num_layers); the
//! embedding and the untied head appear once. Norm weights are replicated and never move.

mod exec;
pub mod program;

use std::ops::Range;

pub use exec::{execute, ReshardStats};
pub use program::{RoleProgram, Step, WeightProgram};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::parallel::layout::check_tp_for_model;
use crate::parallel::shard::{self, Role, Segment, Source};
use crate::parallel::Layout;

/// One step building a destination buffer (rows of `hidden_size` elements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Rows [src_row, src_row + rows) of `src_rank`'s old buffer to [dst_row, ..) of the new one.
    /// `src_rank` equal to the destination is a move inside the rank's own memory.
    Copy {
        src_rank: usize,
        src_row: usize,
        dst_row: usize,
        rows: usize,
    },
    /// Zero rows (vocab padding, which changes with tp).
    Zero { dst_row: usize, rows: usize },
}

impl Op {
    pub fn dst_row(&self) -> usize {
        match *self {
            Op::Copy { dst_row, .. } | Op::Zero { dst_row, .. } => dst_row,
        }
    }
    pub fn rows(&self) -> usize {
        match *self {
            Op::Copy { rows, .. } | Op::Zero { rows, .. } => rows,
        }
    }
}

/// How one physical rank builds its new buffer for one role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RankOps {
    pub rank: usize,
    /// Rows of the rank's buffer before and after.
    pub old_rows: usize,
    pub new_rows: usize,
    /// Sorted by `dst_row`; they tile [0, new_rows) exactly once.
    pub ops: Vec<Op>,
}

/// The ops of one role for every rank (index = physical rank), applied `repeats` times (layers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleOps {
    pub role: Role,
    pub repeats: usize,
    pub ranks: Vec<RankOps>,
    pub bytes_cross_rank: u64,
    pub bytes_in_place: u64,
    pub bytes_zeroed: u64,
}

/// A complete weight reshard from `old` to `new` (same world).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightPlan {
    pub old: Layout,
    pub new: Layout,
    pub hidden: usize,
    pub num_layers: usize,
    pub tied: bool,
    /// Bytes per element used for the byte counts (4 for the f32 CPU reference).
    pub elem_bytes: u64,
    /// Qkv, O, GateUp, Down, Embed, then LmHead when untied.
    pub ops: Vec<RoleOps>,
    /// Rows read from another rank's old buffer.
    pub bytes_cross_rank: u64,
    /// Rows taken from the rank's own old buffer (moved or left where they are).
    pub bytes_in_place: u64,
    /// Padding rows written as zeros.
    pub bytes_zeroed: u64,
}

/// The roles a model reshards, with how many times each appears (layers, or once).
pub fn roles(cfg: &ModelConfig) -> Vec<(Role, usize)> {
    let mut v: Vec<(Role, usize)> = Role::LAYER.iter().map(|&r| (r, cfg.num_layers)).collect();
    v.push((Role::Embed, 1));
    if !cfg.tie_word_embeddings {
        v.push((Role::LmHead, 1));
    }
    v
}

/// Segments of a tp-rank with their row offset in the rank's buffer.
fn placed(cfg: &ModelConfig, role: Role, tp: usize, r: usize) -> Vec<(Segment, usize)> {
    let mut off = 0;
    shard::segments(cfg, role, 0, tp, r)
        .into_iter()
        .map(|s| {
            let o = off;
            off += s.rows.len();
            (s, o)
        })
        .collect()
}

fn intersect(a: &Range<usize>, b: &Range<usize>) -> Range<usize> {
    a.start.max(b.start)..a.end.min(b.end).max(a.start.max(b.start))
}

fn same_tensor(a: &Source, b: &Source) -> bool {
    matches!((a, b), (Source::Tensor { name: x, .. }, Source::Tensor { name: y, .. }) if x == y)
}

fn check_layouts(cfg: &ModelConfig, old: &Layout, new: &Layout) -> Result<()> {
    if old.world != new.world {
        return Err(Error::Layout(format!(
            "a reshard keeps the ranks: old world {} vs new world {}",
            old.world, new.world
        )));
    }
    check_tp_for_model(old.tp, cfg)?;
    check_tp_for_model(new.tp, cfg)
}

/// Which physical rank holding old tp-rank `u` serves destination `dst` (not itself a holder).
///
/// Deterministic: prefer a holder in the destination's new replica (those ranks talk anyway), then
/// the nearest rank id (same node / NVLink neighbourhood on usual numbering), then the lowest id.
fn pick_holder(old: &Layout, new: &Layout, u: usize, dst: usize) -> usize {
    let group = new.replica_ranks(new.position(dst).0);
    (0..old.dp())
        .map(|e| old.rank_of(e, u))
        .min_by_key(|&h| (!group.contains(&h), h.abs_diff(dst), h))
        .unwrap_or(dst)
}

/// Ops for one role and one destination rank, merged where contiguous.
fn rank_ops(cfg: &ModelConfig, role: Role, old: &Layout, new: &Layout, p: usize) -> RankOps {
    let own = old.position(p).1;
    let old_segs: Vec<Vec<(Segment, usize)>> =
        (0..old.tp).map(|u| placed(cfg, role, old.tp, u)).collect();
    let new_segs = placed(cfg, role, new.tp, new.position(p).1);
    let mut ops = Vec::new();
    for (seg, dst_off) in &new_segs {
        if seg.source == Source::Zeros {
            ops.push(Op::Zero {
                dst_row: *dst_off,
                rows: seg.rows.len(),
            });
            continue;
        }
        for (u, segs) in old_segs.iter().enumerate() {
            for (s, src_off) in segs
                .iter()
                .filter(|(s, _)| same_tensor(&s.source, &seg.source))
            {
                let i = intersect(&seg.rows, &s.rows);
                if i.is_empty() {
                    continue;
                }
                let src_rank = if u == own {
                    p
                } else {
                    pick_holder(old, new, u, p)
                };
                ops.push(Op::Copy {
                    src_rank,
                    src_row: src_off + (i.start - s.rows.start),
                    dst_row: dst_off + (i.start - seg.rows.start),
                    rows: i.len(),
                });
            }
        }
    }
    ops.sort_by_key(Op::dst_row);
    let mut merged: Vec<Op> = Vec::with_capacity(ops.len());
    for op in ops {
        match (merged.last_mut(), op) {
            (
                Some(Op::Copy {
                    src_rank: a,
                    src_row: s,
                    rows: n,
                    dst_row: d,
                }),
                Op::Copy {
                    src_rank,
                    src_row,
                    dst_row,
                    rows,
                },
            ) if *a == src_rank && *s + *n == src_row && *d + *n == dst_row => *n += rows,
            (
                Some(Op::Zero {
                    dst_row: d,
                    rows: n,
                }),
                Op::Zero { dst_row, rows },
            ) if *d + *n == dst_row => *n += rows,
            _ => merged.push(op),
        }
    }
    RankOps {
        rank: p,
        old_rows: shard::rows(cfg, role, old.tp),
        new_rows: shard::rows(cfg, role, new.tp),
        ops: merged,
    }
}

/// Bytes per element: 1 ..= 8 (fp8 to f64), so byte counts of any valid model fit a u64.
pub fn check_elem_bytes(elem_bytes: u64) -> Result<()> {
    if !(1..=8).contains(&elem_bytes) {
        return Err(Error::Invalid(format!(
            "`elem_bytes` is {elem_bytes}, expected 1 ..= 8"
        )));
    }
    Ok(())
}

/// Plans the reshard of every tp-split weight from `old` to `new`.
///
/// Rows the destination already holds come from its own old buffer; the rest from another holder
/// of that old tp-rank, chosen deterministically: one in the destination's new replica first, then
/// the nearest rank id, then the lowest. Padding rows are zeroed. Byte counts use `elem_bytes`.
pub fn plan(cfg: &ModelConfig, old: &Layout, new: &Layout, elem_bytes: u64) -> Result<WeightPlan> {
    check_layouts(cfg, old, new)?;
    check_elem_bytes(elem_bytes)?;
    let row_bytes = cfg.hidden_size as u64 * elem_bytes;
    let mut ops = Vec::new();
    for (role, repeats) in roles(cfg) {
        let ranks: Vec<RankOps> = (0..new.world)
            .map(|p| rank_ops(cfg, role, old, new, p))
            .collect();
        let (mut cross, mut in_place, mut zeroed) = (0u64, 0u64, 0u64);
        for ro in &ranks {
            for op in &ro.ops {
                let b = op.rows() as u64 * row_bytes * repeats as u64;
                match *op {
                    Op::Copy { src_rank, .. } if src_rank == ro.rank => in_place += b,
                    Op::Copy { .. } => cross += b,
                    Op::Zero { .. } => zeroed += b,
                }
            }
        }
        ops.push(RoleOps {
            role,
            repeats,
            ranks,
            bytes_cross_rank: cross,
            bytes_in_place: in_place,
            bytes_zeroed: zeroed,
        });
    }
    Ok(WeightPlan {
        old: old.clone(),
        new: new.clone(),
        hidden: cfg.hidden_size,
        num_layers: cfg.num_layers,
        tied: cfg.tie_word_embeddings,
        elem_bytes,
        bytes_cross_rank: ops.iter().map(|r| r.bytes_cross_rank).sum(),
        bytes_in_place: ops.iter().map(|r| r.bytes_in_place).sum(),
        bytes_zeroed: ops.iter().map(|r| r.bytes_zeroed).sum(),
        ops,
    })
}

/// The least any reshard from `old` to `new` must move between ranks: per physical rank, the rows of
/// its new shard (padding excluded) that its old shard does not hold, over all roles and layers.
///
/// Computed from the shard rules directly, independently of [`plan`]. Ranks missing from `old`
/// (a different world) count as holding nothing.
pub fn min_cross_rank_bytes(cfg: &ModelConfig, old: &Layout, new: &Layout, elem_bytes: u64) -> u64 {
    let mut rows = 0u64;
    for (role, repeats) in roles(cfg) {
        for p in 0..new.world {
            let mine: Vec<Segment> = if p < old.world {
                shard::segments(cfg, role, 0, old.tp, old.position(p).1)
            } else {
                Vec::new()
            };
            for want in shard::segments(cfg, role, 0, new.tp, new.position(p).1) {
                if want.source == Source::Zeros {
                    continue;
                }
                let have: usize = mine
                    .iter()
                    .filter(|s| s.source == want.source)
                    .map(|s| intersect(&want.rows, &s.rows).len())
                    .sum();
                rows += ((want.rows.len() - have) * repeats) as u64;
            }
        }
    }
    rows * cfg.hidden_size as u64 * elem_bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Arch;
    use crate::reshard::nested_layout;

    fn cfg(vocab: usize, tied: bool) -> ModelConfig {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size: vocab,
            hidden_size: 4,
            intermediate_size: 16,
            num_layers: 2,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 1e4,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: tied,
            bos_token_id: None,
            eos_token_ids: vec![],
            dtype: None,
        }
    }

    fn role(p: &WeightPlan, r: Role) -> &RoleOps {
        p.ops.iter().find(|o| o.role == r).unwrap()
    }

    #[test]
    fn growing_with_nesting_is_a_local_compaction() {
        let c = cfg(64, false);
        let a = Layout::new(4, 1).unwrap();
        let b = nested_layout(&a, 4).unwrap();
        let p = plan(&c, &a, &b, 4).unwrap();
        assert_eq!(p.bytes_cross_rank, 0);
        assert_eq!(min_cross_rank_bytes(&c, &a, &b, 4), 0);
        // Rank 2 (tp-rank 2 of 4) keeps q heads 4..6, k/v heads 2..3 of its full copy:
        // q rows 8..12 -> 0..4, k rows 16+4..16+6 -> 4..6, v rows 24+4..24+6 -> 6..8.
        let qkv = &role(&p, Role::Qkv).ranks[2];
        assert_eq!(
            qkv.ops,
            vec![
                Op::Copy {
                    src_rank: 2,
                    src_row: 8,
                    dst_row: 0,
                    rows: 4
                },
                Op::Copy {
                    src_rank: 2,
                    src_row: 20,
                    dst_row: 4,
                    rows: 2
                },
                Op::Copy {
                    src_rank: 2,
                    src_row: 28,
                    dst_row: 6,
                    rows: 2
                },
            ]
        );
    }

    #[test]
    fn shrinking_moves_exactly_the_missing_rows() {
        let c = cfg(64, false);
        let a = Layout::new(4, 4).unwrap();
        let b = nested_layout(&a, 2).unwrap();
        let p = plan(&c, &a, &b, 2).unwrap();
        assert_eq!(p.bytes_cross_rank, min_cross_rank_bytes(&c, &a, &b, 2));
        // Each rank gets the half of its new shard it lacks: per layer per rank q 4 + k 2 + v 2 +
        // o 4 + gate 4 + up 4 + down 4 = 24 rows, embed and head 16 rows each; 4 ranks, 2 layers.
        let rows = 4 * (2 * 24 + 16 + 16);
        assert_eq!(p.bytes_cross_rank, rows as u64 * 4 * 2);
        let total: u64 = (0..4).map(|_| (2 * 48 + 32 + 32) * 4 * 2).sum();
        assert_eq!(
            p.bytes_cross_rank + p.bytes_in_place + p.bytes_zeroed,
            total
        );
    }

    #[test]
    fn vocab_padding_nests_for_power_of_two_tp() {
        // vocab 301 pads to 320 at every power-of-two tp: 160 rows per rank at tp 2, 80 at tp 4,
        // so growing tp moves no vocab row across ranks.
        let c = cfg(301, true);
        let a = Layout::new(4, 2).unwrap();
        let b = nested_layout(&a, 4).unwrap();
        let p = plan(&c, &a, &b, 4).unwrap();
        assert!(
            p.ops.iter().all(|r| r.role != Role::LmHead),
            "tied: no separate head"
        );
        let e = role(&p, Role::Embed);
        assert_eq!(e.bytes_cross_rank, 0);
        assert_eq!(min_cross_rank_bytes(&c, &a, &b, 4), 0);
        // New tp-rank 3 = [240, 320): 61 real rows (kept from old tp-rank 1), then 19 zero rows.
        let r3 = b.rank_of(0, 3);
        assert_eq!(
            e.ranks[r3].ops.last(),
            Some(&Op::Zero {
                dst_row: 61,
                rows: 19
            })
        );
        assert_eq!(role(&p, Role::Qkv).bytes_cross_rank, 0);
        // tp 3 pads to a multiple of 192 (384 rows): shards no longer nest, and the plan moves
        // exactly the minimum.
        let c3 = ModelConfig {
            num_heads: 6,
            num_kv_heads: 6,
            intermediate_size: 12,
            ..cfg(301, false)
        };
        let a6 = Layout::new(6, 2).unwrap();
        let b6 = nested_layout(&a6, 3).unwrap();
        let p6 = plan(&c3, &a6, &b6, 4).unwrap();
        assert_eq!(p6.bytes_cross_rank, min_cross_rank_bytes(&c3, &a6, &b6, 4));
        assert!(role(&p6, Role::Embed).bytes_cross_rank > 0);
    }

    #[test]
    fn cross_rank_sources_prefer_the_new_group() {
        let c = cfg(64, false);
        let a = Layout::new(4, 2).unwrap();
        let b = nested_layout(&a, 1).unwrap();
        let p = plan(&c, &a, &b, 4).unwrap();
        // New replica 1 is rank 1 alone (old tp-rank 1); its missing tp-rank 0 rows come from rank 0
        // or 2: the nearer one, rank 0 (neither is in its new group).
        let ro = &role(&p, Role::O).ranks[1];
        assert_eq!(
            ro.ops[0],
            Op::Copy {
                src_rank: 0,
                src_row: 0,
                dst_row: 0,
                rows: 8
            }
        );
        assert!(plan(&c, &a, &Layout::new(2, 1).unwrap(), 4).is_err());
        assert!(plan(&c, &a, &Layout::new(4, 4).unwrap(), 4).is_ok());
        assert!(matches!(
            plan(&cfg(64, false), &a, &Layout::new(3, 3).unwrap(), 4),
            Err(Error::Layout(_))
        ));
    }
}
