//! Paged KV cache: block allocator (one per replica) and per-rank, per-layer block pools.
//!
//! Pool layout per layer: [block, kv_head_local, block_size, head_dim], so one head's slice of a
//! block is contiguous. A replica's ranks share one block table per sequence.

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;

/// Free-list allocator of block ids, shared by the ranks of one replica.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        // Pop from the end, so hand out low ids first.
        BlockAllocator {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }
    pub fn total(&self) -> usize {
        self.total
    }
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }
    /// `n` blocks, or an error (and nothing taken) when fewer are free.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(Error::KvExhausted(format!(
                "need {n} more blocks, {} of {} free (raise `kv_blocks`)",
                self.free.len(),
                self.total
            )));
        }
        Ok(self
            .free
            .split_off(self.free.len() - n)
            .into_iter()
            .rev()
            .collect())
    }
    /// Returns blocks to the pool. Double frees and foreign ids are bugs, caught in debug builds.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            debug_assert!(
                (b as usize) < self.total && !self.free.contains(&b),
                "bad free of block {b}"
            );
            self.free.push(b);
        }
    }
    /// Grows the pool to `total` blocks (after a reshard freed memory). The new blocks are
    /// handed out first, lowest id first.
    pub fn grow_to(&mut self, total: usize) {
        self.free
            .extend((self.total..total).rev().map(|b| b as u32));
        self.total = self.total.max(total);
    }
}

/// Blocks needed to hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// The one bytes-per-block formula: bytes one KV block takes on one rank at degree `tp`: K and V for every layer and the rank's
/// `num_kv_heads / tp` heads, `block_size` tokens of `elem_bytes` per element.
pub fn kv_block_bytes(cfg: &ModelConfig, tp: usize, block_size: usize, elem_bytes: usize) -> u64 {
    (cfg.kv_bytes_per_token(elem_bytes) / tp.max(1)) as u64 * block_size as u64
}

/// A sequence's block table: position p lives in block `table[p / bs]` at offset `p % bs`.
pub fn slot(table: &[u32], pos: usize, block_size: usize) -> usize {
    table[pos / block_size] as usize * block_size + pos % block_size
}

/// One rank's K and V pools for every layer.
pub struct KvPool {
    pub num_blocks: usize,
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `k[layer]` and `v[layer]`: [num_blocks, kv_heads, block_size, head_dim].
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl KvPool {
    pub fn new(
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let per_layer = kv_heads
            .checked_mul(block_size)
            .and_then(|x| x.checked_mul(head_dim))
            .and_then(|x| x.checked_mul(num_blocks))
            .ok_or_else(|| Error::KvExhausted("pool size overflows".into()))?;
        let mut k = Vec::new();
        let mut v = Vec::new();
        for _ in 0..layers {
            k.push(try_zeroed(per_layer)?);
            v.push(try_zeroed(per_layer)?);
        }
        Ok(KvPool {
            num_blocks,
            block_size,
            kv_heads,
            head_dim,
            k,
            v,
        })
    }

    /// Element offset of (block, head, offset-in-block) in a layer's pool.
    #[inline]
    pub fn offset(&self, block: usize, head: usize, off: usize) -> usize {
        ((block * self.kv_heads + head) * self.block_size + off) * self.head_dim
    }

    /// Writes k/v rows [n, kv_heads * head_dim] of `layer` into the given slots.
    pub fn append(&mut self, layer: usize, k: &[f32], v: &[f32], slots: &[usize]) {
        let (hd, bs) = (self.head_dim, self.block_size);
        for (t, &s) in slots.iter().enumerate() {
            for h in 0..self.kv_heads {
                let dst = self.offset(s / bs, h, s % bs);
                let src = (t * self.kv_heads + h) * hd;
                self.k[layer][dst..dst + hd].copy_from_slice(&k[src..src + hd]);
                self.v[layer][dst..dst + hd].copy_from_slice(&v[src..src + hd]);
            }
        }
    }

    /// Grows every layer to `blocks` blocks, the blocks held kept and the new ones zeroed; an
    /// error (the host cannot allocate it) leaves the pool's blocks as they were.
    pub fn grow(&mut self, blocks: usize) -> Result<()> {
        if blocks <= self.num_blocks {
            return Ok(());
        }
        let n = blocks
            .checked_mul(self.kv_heads * self.block_size * self.head_dim)
            .ok_or_else(|| Error::KvExhausted("pool size overflows".into()))?;
        for buf in self.k.iter_mut().chain(self.v.iter_mut()) {
            buf.try_reserve_exact(n.saturating_sub(buf.len()))
                .map_err(|_| {
                    Error::KvExhausted(format!(
                        "cannot allocate {} MiB for the KV pool",
                        (n * 4) >> 20
                    ))
                })?;
            buf.resize(n, 0.0);
        }
        self.num_blocks = blocks;
        Ok(())
    }

    /// Bytes held by this pool (f32 elements).
    pub fn bytes(&self) -> usize {
        2 * self.k.len() * self.num_blocks * self.kv_heads * self.block_size * self.head_dim * 4
    }
}

/// A zeroed buffer of `n` f32, or an error when the allocation fails. Uses the allocator's
/// zeroed allocation, so large pools get lazily zeroed pages from the OS instead of being written.
fn try_zeroed(n: usize) -> Result<Vec<f32>> {
    let oom = || {
        Error::KvExhausted(format!(
            "cannot allocate {} MiB for the KV pool",
            n.saturating_mul(4) >> 20
        ))
    };
    if n == 0 {
        return Ok(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).map_err(|_| oom())?;
    // SAFETY: `layout` has non-zero size (n > 0). The pointer, when non-null, is an allocation of
    // exactly n f32 with f32's alignment from the global allocator, all bytes zero (a valid f32
    // 0.0), so it may become a Vec with length and capacity n that the global allocator frees.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut f32;
        if p.is_null() {
            return Err(oom());
        }
        Ok(Vec::from_raw_parts(p, n, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_free_exhaust() {
        let mut a = BlockAllocator::new(5);
        let x = a.alloc(3).unwrap();
        assert_eq!(x, vec![0, 1, 2]);
        let y = a.alloc(2).unwrap();
        assert_eq!(a.free_blocks(), 0);
        let e = a.alloc(1).unwrap_err();
        assert!(matches!(e, Error::KvExhausted(_)), "{e}");
        assert_eq!(a.free_blocks(), 0, "a failed alloc takes nothing");
        a.release(&x);
        assert_eq!(a.free_blocks(), 3);
        let z = a.alloc(3).unwrap();
        let mut all: Vec<u32> = y.iter().chain(&z).copied().collect();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4]);
        a.release(&[1]);
        a.grow_to(7);
        assert_eq!(a.total(), 7);
        assert_eq!(a.alloc(3).unwrap(), vec![5, 6, 1], "new blocks first");
    }

    #[test]
    fn slots_follow_the_block_table() {
        let table = [4, 1, 7];
        assert_eq!(slot(&table, 0, 16), 64);
        assert_eq!(slot(&table, 17, 16), 17);
        assert_eq!(slot(&table, 40, 16), 7 * 16 + 8);
        assert_eq!(blocks_for(33, 16), 3);
        assert_eq!(blocks_for(0, 16), 0);
    }

    #[test]
    fn append_places_each_head_contiguously() {
        let mut p = KvPool::new(1, 2, 4, 2, 3).unwrap();
        let k: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let v: Vec<f32> = (0..6).map(|x| -(x as f32)).collect();
        p.append(0, &k, &v, &[5]); // block 1, offset 1
        let o = p.offset(1, 1, 1);
        assert_eq!(&p.k[0][o..o + 3], &[3.0, 4.0, 5.0]);
        assert_eq!(
            &p.v[0][p.offset(1, 0, 1)..p.offset(1, 0, 1) + 3],
            &[0.0, -1.0, -2.0]
        );
    }
}
