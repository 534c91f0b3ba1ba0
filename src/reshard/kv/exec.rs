//! Executes a [`KvPlan`] as per-rank programs (`program`); the gather / scatter of one head's
//! slices of a sequence's blocks, and the checks of pools and tables.

use super::program::programs;
use super::{KvPlan, SeqKv};
use crate::error::{Error, Result};
use crate::kv::{blocks_for, KvPool};
use crate::reshard::cpu;

/// What executing a KV plan did (f32 bytes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStats {
    pub bytes_cross_rank: u64,
    pub bytes_in_place: u64,
    /// Largest message or staging buffer (one head of one sequence: every layer, K and V).
    pub peak_staging_bytes: u64,
    pub pieces: usize,
}

/// Checks one side's pools against the plan's geometry: every rank's (`only` = None), or the one
/// pool of rank `only`.
pub(super) fn check_pools(
    plan: &KvPlan,
    pools: &[KvPool],
    tp: usize,
    side: &str,
    only: Option<usize>,
) -> Result<()> {
    if only.is_none() && pools.len() != plan.old.world {
        return Err(Error::Layout(format!(
            "KV migration: {} {side} pools for world {}",
            pools.len(),
            plan.old.world
        )));
    }
    let heads = plan.num_kv_heads / tp;
    for (i, pool) in pools.iter().enumerate() {
        let p = only.unwrap_or(i);
        let per_layer = pool.num_blocks * heads * plan.block_size * plan.head_dim;
        let shaped = pool.kv_heads == heads
            && pool.head_dim == plan.head_dim
            && pool.block_size == plan.block_size
            && pool.k.len() == plan.num_layers
            && pool.v.len() == plan.num_layers
            && pool.k.iter().chain(&pool.v).all(|b| b.len() == per_layer);
        if !shaped {
            return Err(Error::Invalid(format!(
                "KV migration: {side} pool of rank {p} is not [{} layers][blocks, {heads} heads, {}, {}]",
                plan.num_layers, plan.block_size, plan.head_dim
            )));
        }
    }
    Ok(())
}

pub(super) fn check_blocks(table: &[u32], blocks: usize, seq: usize, rank: usize) -> Result<()> {
    match table.iter().find(|&&b| b as usize >= blocks) {
        Some(b) => Err(Error::KvExhausted(format!(
            "sequence {seq}: block {b} is outside rank {rank}'s pool of {blocks} blocks"
        ))),
        None => Ok(()),
    }
}

/// Copies one head's first `len` tokens out of a layer buffer, block by block (last may be partial).
pub(super) fn gather(
    out: &mut Vec<f32>,
    buf: &[f32],
    pool: &KvPool,
    table: &[u32],
    head: usize,
    len: usize,
) {
    let (bs, hd) = (pool.block_size, pool.head_dim);
    out.clear();
    for (i, &b) in table.iter().enumerate() {
        let n = bs.min(len - i * bs);
        let o = pool.offset(b as usize, head, 0);
        out.extend_from_slice(&buf[o..o + n * hd]);
    }
}

/// Writes a staged head slice into a layer buffer of geometry (kv_heads, block_size, head_dim).
pub(super) fn scatter(
    buf: &mut [f32],
    geom: (usize, usize, usize),
    table: &[u32],
    head: usize,
    data: &[f32],
) {
    let (heads, bs, hd) = geom;
    for (i, &b) in table.iter().enumerate() {
        let n = bs.min(data.len() / hd - i * bs);
        let o = ((b as usize * heads + head) * bs) * hd;
        buf[o..o + n * hd].copy_from_slice(&data[i * bs * hd..(i * bs + n) * hd]);
    }
}

/// Executes `plan`: `old` pools (index = physical rank, old layout) are read, `new` pools (new
/// layout, kv_heads / new_tp heads) are written, as per-rank programs one thread per rank over a
/// CPU group of the whole world (`reshard::cpu`). Everything is validated before the first write.
pub fn execute(plan: &KvPlan, old: &[KvPool], new: &mut [KvPool]) -> Result<KvStats> {
    check_pools(plan, old, plan.old.tp, "old", None)?;
    check_pools(plan, new, plan.new.tp, "new", None)?;
    let nb = |s: &SeqKv| blocks_for(s.len, plan.block_size);
    for pc in &plan.pieces {
        let s = plan
            .seqs
            .get(pc.seq)
            .ok_or_else(|| Error::Invalid(format!("KV piece names sequence {}", pc.seq)))?;
        let ok = pc.src_rank < old.len()
            && pc.dst_rank < new.len()
            && pc.src_head < old[pc.src_rank].kv_heads
            && pc.dst_head < new[pc.dst_rank].kv_heads
            && s.old_table.len() >= nb(s)
            && s.new_table.len() >= nb(s);
        if !ok {
            return Err(Error::Invalid(format!(
                "KV piece {pc:?} does not fit the pools or tables"
            )));
        }
        check_blocks(
            &s.old_table[..nb(s)],
            old[pc.src_rank].num_blocks,
            pc.seq,
            pc.src_rank,
        )?;
        check_blocks(
            &s.new_table[..nb(s)],
            new[pc.dst_rank].num_blocks,
            pc.seq,
            pc.dst_rank,
        )?;
    }
    let progs = programs(plan);
    let comms = cpu::world_group(plan.old.world);
    cpu::migrate_kv(plan, &progs, old, new, &comms, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::Layout;
    use crate::reshard::kv::{plan, tests::cfg};
    use crate::reshard::nested_layout;

    #[test]
    fn bad_pools_are_errors() {
        let c = cfg(4);
        let a = Layout::new(4, 2).unwrap();
        let b = nested_layout(&a, 4).unwrap();
        let ok = SeqKv {
            old_replica: 0,
            new_replica: 0,
            len: 9,
            old_table: vec![0, 1, 2],
            new_table: vec![4, 5, 6],
        };
        let p = plan(&c, &a, &b, 4, &[ok], 4).unwrap();
        let old: Vec<KvPool> = (0..4)
            .map(|_| KvPool::new(2, 8, 4, 2, 2).unwrap())
            .collect();
        let mut small: Vec<KvPool> = (0..4)
            .map(|_| KvPool::new(2, 6, 4, 1, 2).unwrap())
            .collect();
        assert!(matches!(
            execute(&p, &old, &mut small),
            Err(Error::KvExhausted(_))
        ));
        let mut wrong_heads: Vec<KvPool> = (0..4)
            .map(|_| KvPool::new(2, 8, 4, 2, 2).unwrap())
            .collect();
        assert!(matches!(
            execute(&p, &old, &mut wrong_heads),
            Err(Error::Invalid(_))
        ));
        assert!(matches!(
            execute(&p, &old[..2], &mut small),
            Err(Error::Layout(_))
        ));
    }

    #[test]
    fn partial_last_block_round_trips() {
        let c = cfg(2);
        let a = Layout::new(2, 1).unwrap();
        let b = nested_layout(&a, 2).unwrap();
        let mut old: Vec<KvPool> = (0..2)
            .map(|_| KvPool::new(2, 4, 4, 2, 2).unwrap())
            .collect();
        for (i, x) in old[1].k[1].iter_mut().enumerate() {
            *x = i as f32;
        }
        let s = SeqKv {
            old_replica: 1,
            new_replica: 0,
            len: 6,
            old_table: vec![2, 0],
            new_table: vec![3, 1],
        };
        let p = plan(&c, &a, &b, 4, &[s], 4).unwrap();
        let mut new: Vec<KvPool> = (0..2)
            .map(|_| KvPool::new(2, 4, 4, 1, 2).unwrap())
            .collect();
        let st = execute(&p, &old, &mut new).unwrap();
        // One piece: 6 tokens x head_dim 2 x f32, K and V, in each of 2 layers.
        assert_eq!(st.peak_staging_bytes, 6 * 2 * 4 * 2 * 2);
        // Head 1, position 5 (block 1 of the table, offset 1): old block 0 head 1 offset 1.
        let (o, n) = (old[1].offset(0, 1, 1), new[1].offset(1, 0, 1));
        assert_eq!(&new[1].k[1][n..n + 2], &old[1].k[1][o..o + 2]);
        // Position 6 is not cached: left untouched (zero).
        let n6 = new[1].offset(1, 0, 2);
        assert_eq!(&new[1].k[1][n6..n6 + 2], &[0.0, 0.0]);
        assert_eq!(
            st.bytes_cross_rank + st.bytes_in_place,
            p.bytes_cross_rank + p.bytes_in_place
        );
    }
}
