//! KV migration plans: where each unfinished sequence's cached K/V live before and after a switch,
//! per kv head, and the executor that gathers, transfers and scatters the head slices.
//!
//! Pools are laid out [block, kv_head_local, block_size, head_dim] per layer, so one head's slice of
//! a block is contiguous. Global kv head `h` lives on tp-rank `h / (kv_heads / tp)` of its replica,
//! as local head `h % (kv_heads / tp)`. A piece moves one head of one sequence, in every layer, K
//! and V: source blocks from the old table, destination blocks from the new one (allocated by the
//! engine from the new replica's allocator beforehand). The new pools have kv_heads / new_tp heads,
//! so even data that stays on its rank is re-laid out.

pub mod batch;
mod exec;
pub mod program;

use std::collections::HashSet;

pub use exec::{execute, KvStats};
pub use program::{KvProgram, KvStep};

use crate::error::{Error, Result};
use crate::kv::blocks_for;
use crate::model::config::ModelConfig;
use crate::parallel::layout::check_tp_for_model;
use crate::parallel::Layout;

/// One unfinished sequence to migrate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqKv {
    pub old_replica: usize,
    pub new_replica: usize,
    /// Tokens whose K/V are cached.
    pub len: usize,
    /// At least blocks_for(len) blocks each; only those are read / written.
    pub old_table: Vec<u32>,
    pub new_table: Vec<u32>,
}

/// One kv head of one sequence, in every layer, K and V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvPiece {
    /// Index into [`KvPlan::seqs`].
    pub seq: usize,
    /// Global kv head.
    pub head: usize,
    pub src_rank: usize,
    pub src_head: usize,
    pub dst_rank: usize,
    pub dst_head: usize,
    /// 2 (K, V) * layers * len * head_dim * elem_bytes.
    pub bytes: u64,
}

impl KvPiece {
    pub fn cross_rank(&self) -> bool {
        self.src_rank != self.dst_rank
    }
}

/// A complete KV migration from `old` to `new`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPlan {
    pub old: Layout,
    pub new: Layout,
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub elem_bytes: u64,
    pub seqs: Vec<SeqKv>,
    /// Ordered by sequence, then head.
    pub pieces: Vec<KvPiece>,
    pub bytes_cross_rank: u64,
    pub bytes_in_place: u64,
}

/// Physical rank and local head index of global kv head `h` in `replica` of layout `l`.
pub fn head_home(l: &Layout, kv_heads: usize, replica: usize, h: usize) -> (usize, usize) {
    let per = kv_heads / l.tp;
    (l.rank_of(replica, h / per), h % per)
}

fn check(
    cfg: &ModelConfig,
    old: &Layout,
    new: &Layout,
    old_replica: usize,
    new_replica: usize,
) -> Result<()> {
    if old.world != new.world {
        return Err(Error::Layout(format!(
            "KV migration keeps the ranks: world {} vs {}",
            old.world, new.world
        )));
    }
    check_tp_for_model(old.tp, cfg)?;
    check_tp_for_model(new.tp, cfg)?;
    if old_replica >= old.dp() || new_replica >= new.dp() {
        return Err(Error::Invalid(format!(
            "replica {old_replica} -> {new_replica} out of range ({} -> {} replicas)",
            old.dp(),
            new.dp()
        )));
    }
    Ok(())
}

/// Bytes of one piece (one kv head of a sequence of `len` tokens, every layer, K and V); an error
/// when the count does not fit a u64 (lengths and sizes from an untrusted caller).
fn piece_bytes(cfg: &ModelConfig, len: usize, elem_bytes: u64) -> Result<u64> {
    [
        cfg.num_layers as u64,
        len as u64,
        cfg.head_dim as u64,
        elem_bytes,
    ]
    .iter()
    .try_fold(2u64, |a, &x| a.checked_mul(x))
    .ok_or_else(|| {
        Error::Invalid(format!(
            "KV migration: a sequence of {len} tokens is more bytes than a u64 counts"
        ))
    })
}

/// Adds `b` to a byte total, or errors when the total no longer fits a u64.
fn add_bytes(total: &mut u64, b: u64) -> Result<()> {
    *total = total.checked_add(b).ok_or_else(|| {
        Error::Invalid("KV migration: the plan moves more bytes than a u64 counts".into())
    })?;
    Ok(())
}

/// (cross-rank, in-place) bytes of migrating one sequence of `len` cached tokens: the input to
/// the migrate/recompute decision, available before any block is allocated.
pub fn seq_bytes(
    cfg: &ModelConfig,
    old: &Layout,
    new: &Layout,
    old_replica: usize,
    new_replica: usize,
    len: usize,
    elem_bytes: u64,
) -> Result<(u64, u64)> {
    seq_walk(
        cfg,
        old,
        new,
        (old_replica, new_replica),
        len,
        elem_bytes,
        |_, _, _| Ok(()),
    )
}

/// [`seq_bytes`], also adding to `per_rank[r]` what physical rank `r` sends plus what it
/// receives for this sequence: the bytes its KV message buffers hold in a switch on the devices
/// (each rank's program's `bytes_sent + bytes_received`), known before any block is allocated.
pub fn seq_messages(
    cfg: &ModelConfig,
    old: &Layout,
    new: &Layout,
    (old_replica, new_replica): (usize, usize),
    len: usize,
    elem_bytes: u64,
    per_rank: &mut [u64],
) -> Result<(u64, u64)> {
    if per_rank.len() != old.world {
        return Err(Error::Internal(format!(
            "KV messages counted for {} ranks in a world of {}",
            per_rank.len(),
            old.world
        )));
    }
    seq_walk(
        cfg,
        old,
        new,
        (old_replica, new_replica),
        len,
        elem_bytes,
        |from, to, b| {
            add_bytes(&mut per_rank[from], b)?;
            add_bytes(&mut per_rank[to], b)
        },
    )
}

/// Walks one sequence's kv heads, calling `cross(from rank, to rank, bytes)` for each that
/// changes rank; returns (cross-rank, in-place) bytes.
fn seq_walk(
    cfg: &ModelConfig,
    old: &Layout,
    new: &Layout,
    (old_replica, new_replica): (usize, usize),
    len: usize,
    elem_bytes: u64,
    mut cross_piece: impl FnMut(usize, usize, u64) -> Result<()>,
) -> Result<(u64, u64)> {
    check(cfg, old, new, old_replica, new_replica)?;
    let per_head = piece_bytes(cfg, len, elem_bytes)?;
    let (mut cross, mut local) = (0, 0);
    for h in 0..cfg.num_kv_heads {
        let from = head_home(old, cfg.num_kv_heads, old_replica, h).0;
        let to = head_home(new, cfg.num_kv_heads, new_replica, h).0;
        if from == to {
            add_bytes(&mut local, per_head)?;
        } else {
            add_bytes(&mut cross, per_head)?;
            cross_piece(from, to, per_head)?;
        }
    }
    Ok((cross, local))
}

/// Plans the migration of `seqs` from `old` to `new`. Checks replicas, table lengths, and that no
/// two sequences of one new replica share a destination block.
pub fn plan(
    cfg: &ModelConfig,
    old: &Layout,
    new: &Layout,
    block_size: usize,
    seqs: &[SeqKv],
    elem_bytes: u64,
) -> Result<KvPlan> {
    if block_size == 0 {
        return Err(Error::Invalid(
            "KV migration: block size must be at least 1".into(),
        ));
    }
    crate::reshard::weights::check_elem_bytes(elem_bytes)?;
    let kv = cfg.num_kv_heads;
    let mut used = HashSet::new();
    // Grown as sequences pass their checks: nothing is reserved from untrusted counts.
    let mut pieces = Vec::new();
    let (mut cross, mut local) = (0, 0);
    for (i, s) in seqs.iter().enumerate() {
        check(cfg, old, new, s.old_replica, s.new_replica)?;
        let nb = blocks_for(s.len, block_size);
        if s.old_table.len() < nb || s.new_table.len() < nb {
            return Err(Error::Invalid(format!(
                "KV migration: sequence {i} caches {} tokens ({nb} blocks of {block_size}) but its tables have {} and {} blocks",
                s.len,
                s.old_table.len(),
                s.new_table.len()
            )));
        }
        for &b in &s.new_table[..nb] {
            if !used.insert((s.new_replica, b)) {
                return Err(Error::Invalid(format!(
                    "KV migration: block {b} of new replica {} is given to two sequences (sequence {i})",
                    s.new_replica
                )));
            }
        }
        if s.len == 0 {
            continue;
        }
        let bytes = piece_bytes(cfg, s.len, elem_bytes)?;
        for h in 0..kv {
            let (src_rank, src_head) = head_home(old, kv, s.old_replica, h);
            let (dst_rank, dst_head) = head_home(new, kv, s.new_replica, h);
            let p = KvPiece {
                seq: i,
                head: h,
                src_rank,
                src_head,
                dst_rank,
                dst_head,
                bytes,
            };
            if p.cross_rank() {
                add_bytes(&mut cross, bytes)?;
            } else {
                add_bytes(&mut local, bytes)?;
            }
            pieces.push(p);
        }
    }
    Ok(KvPlan {
        old: old.clone(),
        new: new.clone(),
        num_layers: cfg.num_layers,
        num_kv_heads: kv,
        head_dim: cfg.head_dim,
        block_size,
        elem_bytes,
        seqs: seqs.to_vec(),
        pieces,
        bytes_cross_rank: cross,
        bytes_in_place: local,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Arch;
    use crate::reshard::nested_layout;

    pub(super) fn cfg(kv: usize) -> ModelConfig {
        ModelConfig {
            arch: Arch::Qwen3,
            vocab_size: 16,
            hidden_size: 8,
            intermediate_size: 8,
            num_layers: 2,
            num_heads: 2 * kv,
            num_kv_heads: kv,
            head_dim: 2,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            rope_scaling: None,
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: vec![],
            dtype: None,
        }
    }

    #[test]
    fn heads_follow_the_new_placement() {
        let c = cfg(4);
        let a = Layout::new(4, 2).unwrap();
        let b = nested_layout(&a, 4).unwrap(); // [[0, 2, 1, 3]]
        let s = SeqKv {
            old_replica: 1,
            new_replica: 0,
            len: 5,
            old_table: vec![3, 0],
            new_table: vec![1, 2],
        };
        let p = plan(&c, &a, &b, 4, std::slice::from_ref(&s), 4).unwrap();
        // Old replica 1 = ranks [2, 3]: heads 0, 1 on rank 2, heads 2, 3 on rank 3.
        // New: head h on tp-rank h: ranks 0, 2, 1, 3. Heads 1 and 3 stay on their ranks.
        let homes: Vec<_> = p
            .pieces
            .iter()
            .map(|x| (x.src_rank, x.src_head, x.dst_rank, x.dst_head))
            .collect();
        assert_eq!(
            homes,
            vec![(2, 0, 0, 0), (2, 1, 2, 0), (3, 0, 1, 0), (3, 1, 3, 0)]
        );
        let per_head = 2 * 2 * 5 * 2 * 4;
        assert_eq!(
            (p.bytes_cross_rank, p.bytes_in_place),
            (2 * per_head, 2 * per_head)
        );
        assert_eq!(
            seq_bytes(&c, &a, &b, 1, 0, 5, 4).unwrap(),
            (2 * per_head, 2 * per_head)
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let c = cfg(4);
        let a = Layout::new(4, 2).unwrap();
        let b = nested_layout(&a, 4).unwrap();
        let s = SeqKv {
            old_replica: 0,
            new_replica: 0,
            len: 9,
            old_table: vec![0, 1, 2],
            new_table: vec![0, 1],
        };
        assert!(matches!(
            plan(&c, &a, &b, 4, std::slice::from_ref(&s), 4),
            Err(Error::Invalid(_))
        ));
        let bad_replica = SeqKv {
            new_replica: 1,
            new_table: vec![0, 1, 2],
            ..s.clone()
        };
        assert!(matches!(
            plan(&c, &a, &b, 4, &[bad_replica], 4),
            Err(Error::Invalid(_))
        ));
        let ok = SeqKv {
            new_table: vec![4, 5, 6],
            ..s.clone()
        };
        let twice = plan(&c, &a, &b, 4, &[ok.clone(), ok.clone()], 4).unwrap_err();
        assert!(twice.to_string().contains("two sequences"), "{twice}");
    }
}
