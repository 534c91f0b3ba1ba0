//! Wrappers for paged decode attention (with split-K) and causal prefill attention over the paged
//! cache (cuda/paged_attention.cu, cuda/prefill_attention.cu).

use super::super::buffer::{DBuf, DType, DView};
use super::super::device::CudaDev;
use super::super::params::{
    PatPagedAttentionParams, PatPrefillAttentionParams, PAT_MAX_GQA, PAT_MAX_PARTITIONS,
    PAT_PAGED_ATTN_REDUCE_THREADS, PAT_PAGED_ATTN_THREADS, PAT_PREFILL_ATTN_THREADS,
    PAT_PREFILL_BQ_HD128, PAT_PREFILL_BQ_HD256, PAT_PREFILL_BQ_HD64,
};
use super::{i32_of, launch, same_float, suffix, Heads, KvCacheView};
use crate::error::{Error, Result};

/// Per-sequence metadata of an attention call, already on the device, plus the host-known
/// maxima that size the grid.
#[derive(Clone, Copy, Debug)]
pub struct SeqMeta<'a> {
    pub num_seqs: usize,
    /// i32 [num_seqs, max_blocks_per_seq]; entries below ceil(context / block_size) must be valid
    /// block ids of the cache (the caller checks on the host).
    pub block_tables: DView<'a>,
    pub max_blocks_per_seq: usize,
    /// i32 `[num_seqs]`: cached tokens including this step's.
    pub context_lens: DView<'a>,
    /// The largest entry of `context_lens` (sizes split-K).
    pub max_context: usize,
    /// Prefill only: i32 [num_seqs + 1] prefix sums of query tokens.
    pub cu_seqlens_q: Option<DView<'a>>,
    /// Query rows in q/out (num_seqs for decode).
    pub total_q: usize,
    /// The longest query chunk (1 for decode).
    pub max_q_len: usize,
}

impl SeqMeta<'_> {
    fn check(&self, block_size: usize, what: &str) -> Result<()> {
        self.block_tables.check_dtype(DType::I32, what)?;
        self.context_lens.check_dtype(DType::I32, what)?;
        self.block_tables
            .need(self.num_seqs * self.max_blocks_per_seq, what)?;
        self.context_lens.need(self.num_seqs, what)?;
        if self.max_blocks_per_seq * block_size < self.max_context {
            return Err(Error::Device(format!(
                "{what}: block tables of {} blocks x {block_size} cannot cover a context of {}",
                self.max_blocks_per_seq, self.max_context
            )));
        }
        i32_of(self.max_context, "max_context")?;
        Ok(())
    }
}

/// The kernels' head-dim variant for `head_dim`: the smallest of 64/128/256 that holds it.
fn hd_variant(head_dim: usize, what: &str) -> Result<usize> {
    [64, 128, 256]
        .into_iter()
        .find(|&v| head_dim >= 1 && head_dim <= v)
        .ok_or_else(|| Error::Device(format!("{what}: head_dim {head_dim} outside 1..=256")))
}

/// Checks q/out/cache agreement shared by both kernels; returns (dtype, GQA group).
fn check_common(
    out: DView<'_>,
    q: &Heads<'_>,
    cache: &KvCacheView<'_>,
    rows: usize,
    what: &str,
) -> Result<(DType, usize)> {
    let dt = cache.check(what)?;
    same_float(&[out, q.data, cache.k], what)?;
    if cache.num_kv_heads == 0 || !q.heads.is_multiple_of(cache.num_kv_heads) {
        return Err(Error::Device(format!(
            "{what}: {} q heads are not a multiple of {} kv heads",
            q.heads, cache.num_kv_heads
        )));
    }
    if q.head_dim != cache.head_dim {
        return Err(Error::Device(format!(
            "{what}: q head_dim {} != cache head_dim {}",
            q.head_dim, cache.head_dim
        )));
    }
    q.check(rows, what)?;
    out.need(rows * q.heads * q.head_dim, what)?;
    Ok((dt, q.heads / cache.num_kv_heads))
}

/// Split-K partition size for paged attention, or `None` for no split: split when contexts are
/// longer than one partition (512 tokens, rounded up to whole blocks) and there are too few
/// (sequence, kv head) CTAs to fill the GPU twice over. Keeps partitions <= PAT_MAX_PARTITIONS.
pub fn auto_partition(
    dev: &CudaDev,
    num_seqs: usize,
    num_kv_heads: usize,
    max_context: usize,
    block_size: usize,
) -> Option<usize> {
    partition_for(
        dev.num_sms(),
        num_seqs,
        num_kv_heads,
        max_context,
        block_size,
    )
}

/// [`auto_partition`] on a GPU of `num_sms` SMs.
fn partition_for(
    num_sms: u32,
    num_seqs: usize,
    num_kv_heads: usize,
    max_context: usize,
    block_size: usize,
) -> Option<usize> {
    let bs = block_size.max(1);
    let p = min_partition(bs);
    if max_context <= p || num_seqs * num_kv_heads >= 2 * num_sms as usize {
        return None;
    }
    let min_p = max_context
        .div_ceil(PAT_MAX_PARTITIONS as usize)
        .div_ceil(bs)
        * bs;
    Some(p.max(min_p))
}

/// The smallest split-K partition: 512 tokens, rounded up to whole blocks.
fn min_partition(block_size: usize) -> usize {
    512usize.div_ceil(block_size) * block_size
}

/// The most bytes [`paged_attention`] allocates for its split-K scratch (partial outputs, maxima
/// and sums in f32) on a GPU of `num_sms` SMs, whatever the batch, for contexts of at most
/// `max_context` tokens in blocks of `block_size`: [`auto_partition`] splits only batches of
/// fewer than `2 * num_sms / kv_heads` sequences, into at most `ceil(max_context / p)`
/// partitions of at least `p` tokens (512 rounded up to whole blocks), and at most
/// PAT_MAX_PARTITIONS.
pub fn split_scratch_bound(
    num_sms: u32,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    max_context: usize,
    block_size: usize,
) -> u64 {
    let p = min_partition(block_size.max(1));
    let seqs = (2 * num_sms as usize).saturating_sub(1) / kv_heads.max(1);
    if max_context <= p || seqs == 0 {
        return 0;
    }
    let parts = max_context.div_ceil(p).min(PAT_MAX_PARTITIONS as usize);
    (seqs * q_heads * parts * (head_dim + 2) * 4) as u64
}

/// Decode attention: one query token per sequence (row s of q/out), over the paged cache.
/// `partition`: split-K partition size in tokens (multiple of block_size), or `None`.
pub fn paged_attention(
    dev: &CudaDev,
    out: DView<'_>,
    q: Heads<'_>,
    cache: &KvCacheView<'_>,
    seqs: &SeqMeta<'_>,
    scale: f32,
    partition: Option<usize>,
) -> Result<()> {
    const W: &str = "paged_attention";
    let ns = seqs.num_seqs;
    let (dt, group) = check_common(out, &q, cache, ns, W)?;
    if group > PAT_MAX_GQA as usize {
        return Err(Error::Device(format!(
            "{W}: GQA group {group} exceeds PAT_MAX_GQA = {PAT_MAX_GQA}"
        )));
    }
    let hd_v = hd_variant(q.head_dim, W)?;
    seqs.check(cache.block_size, W)?;
    let (psize, maxp) = match partition {
        Some(p) if p == 0 || p % cache.block_size != 0 => {
            return Err(Error::Device(format!(
                "{W}: partition size {p} is not a positive multiple of block_size {}",
                cache.block_size
            )))
        }
        Some(p) => (p, seqs.max_context.div_ceil(p)),
        None => (0, 1),
    };
    if maxp > PAT_MAX_PARTITIONS as usize {
        return Err(Error::Device(format!(
            "{W}: {maxp} partitions exceed PAT_MAX_PARTITIONS = {PAT_MAX_PARTITIONS}"
        )));
    }
    // A single partition needs no combine step.
    let (psize, maxp) = if maxp <= 1 { (0, 1) } else { (psize, maxp) };
    let rows = ns * q.heads;
    // Left unset: the main kernel writes every partition of a sequence that holds a token
    // (partitions past a sequence's end are neither written nor read by the reduce), so
    // zeroing them would cost three memsets per layer per step for nothing. (The emulated
    // driver fills fresh allocations with NaN: a read of an unwritten partition fails the
    // tests there.)
    let tmp = if maxp > 1 {
        Some((
            DBuf::uninit(dev, DType::F32, rows * maxp * q.head_dim)?,
            DBuf::uninit(dev, DType::F32, rows * maxp)?,
            DBuf::uninit(dev, DType::F32, rows * maxp)?,
        ))
    } else {
        None
    };
    let tp = |i: usize| {
        tmp.as_ref().map_or(0, |t| match i {
            0 => t.0.view().ptr(),
            1 => t.1.view().ptr(),
            _ => t.2.view().ptr(),
        })
    };
    let p = PatPagedAttentionParams {
        out: out.ptr(),
        q: q.data.ptr(),
        k_cache: cache.k.ptr(),
        v_cache: cache.v.ptr(),
        block_tables: seqs.block_tables.ptr(),
        context_lens: seqs.context_lens.ptr(),
        tmp_out: tp(0),
        tmp_max: tp(1),
        tmp_sum: tp(2),
        scale,
        num_seqs: i32_of(ns, "num_seqs")?,
        num_q_heads: i32_of(q.heads, "num_q_heads")?,
        num_kv_heads: i32_of(cache.num_kv_heads, "num_kv_heads")?,
        head_dim: i32_of(q.head_dim, "head_dim")?,
        block_size: i32_of(cache.block_size, "block_size")?,
        max_blocks_per_seq: i32_of(seqs.max_blocks_per_seq, "max_blocks_per_seq")?,
        q_token_stride: i32_of(q.token_stride, "q_token_stride")?,
        partition_size: i32_of(psize, "partition_size")?,
        max_partitions: i32_of(maxp, "max_partitions")?,
        ..Default::default()
    };
    let sfx = suffix(dt)?;
    let grid = (cache.num_kv_heads as u32, ns as u32, maxp as u32);
    // SAFETY: check_common/SeqMeta::check bounded q, out, the cache and the metadata; the tmp
    // buffers hold rows x max_partitions (x head_dim) f32 and live until after both launches are
    // ordered on the stream (they are freed in stream order when dropped).
    unsafe {
        launch(
            dev,
            &format!("{W}_{sfx}_hd{hd_v}"),
            grid,
            PAT_PAGED_ATTN_THREADS,
            &p,
        )?;
        if maxp > 1 {
            launch(
                dev,
                &format!("{W}_reduce_{sfx}"),
                (q.heads as u32, ns as u32, 1),
                PAT_PAGED_ATTN_REDUCE_THREADS,
                &p,
            )?;
        }
    }
    drop(tmp);
    Ok(())
}

/// Causal varlen attention for query chunks whose K/V are already appended to the cache: sequence
/// s has rows `cu_seqlens_q[s] ..` of q/out and attends to positions `<= context - q_len + i`.
pub fn prefill_attention(
    dev: &CudaDev,
    out: DView<'_>,
    q: Heads<'_>,
    cache: &KvCacheView<'_>,
    seqs: &SeqMeta<'_>,
    scale: f32,
) -> Result<()> {
    const W: &str = "prefill_attention";
    let (dt, _) = check_common(out, &q, cache, seqs.total_q, W)?;
    let hd_v = hd_variant(q.head_dim, W)?;
    seqs.check(cache.block_size, W)?;
    let cu = seqs
        .cu_seqlens_q
        .ok_or_else(|| Error::Device(format!("{W}: cu_seqlens_q is required")))?;
    cu.check_dtype(DType::I32, W)?;
    cu.need(seqs.num_seqs + 1, W)?;
    if seqs.max_q_len > seqs.max_context {
        return Err(Error::Device(format!(
            "{W}: a query chunk of {} exceeds the largest context {}",
            seqs.max_q_len, seqs.max_context
        )));
    }
    let bq = match hd_v {
        64 => PAT_PREFILL_BQ_HD64,
        128 => PAT_PREFILL_BQ_HD128,
        _ => PAT_PREFILL_BQ_HD256,
    } as usize;
    let p = PatPrefillAttentionParams {
        out: out.ptr(),
        q: q.data.ptr(),
        k_cache: cache.k.ptr(),
        v_cache: cache.v.ptr(),
        block_tables: seqs.block_tables.ptr(),
        cu_seqlens_q: cu.ptr(),
        context_lens: seqs.context_lens.ptr(),
        scale,
        num_seqs: i32_of(seqs.num_seqs, "num_seqs")?,
        num_q_heads: i32_of(q.heads, "num_q_heads")?,
        num_kv_heads: i32_of(cache.num_kv_heads, "num_kv_heads")?,
        head_dim: i32_of(q.head_dim, "head_dim")?,
        block_size: i32_of(cache.block_size, "block_size")?,
        max_blocks_per_seq: i32_of(seqs.max_blocks_per_seq, "max_blocks_per_seq")?,
        q_token_stride: i32_of(q.token_stride, "q_token_stride")?,
    };
    let grid = (
        seqs.max_q_len.div_ceil(bq) as u32,
        q.heads as u32,
        seqs.num_seqs as u32,
    );
    let name = format!("{W}_{}_hd{hd_v}", suffix(dt)?);
    // SAFETY: q/out checked for total_q rows, the cache and metadata for their shapes; that each
    // chunk fits its context and the tables cover it is the caller's (host-checked) contract.
    unsafe { launch(dev, &name, grid, PAT_PREFILL_ATTN_THREADS, &p) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split scratch `paged_attention` allocates for a batch: `rows` query heads times the
    /// partitions `auto_partition` chose (none below two) of f32 outputs, maxima and sums.
    fn scratch(
        sms: u32,
        seqs: usize,
        q: usize,
        kv: usize,
        hd: usize,
        ctx: usize,
        bs: usize,
    ) -> u64 {
        match partition_for(sms, seqs, kv, ctx, bs) {
            Some(p) if ctx.div_ceil(p) > 1 => (seqs * q * ctx.div_ceil(p) * (hd + 2) * 4) as u64,
            _ => 0,
        }
    }

    #[test]
    fn the_split_scratch_bound_holds_every_batch_and_is_reached() {
        for (sms, q, kv, hd, max_pos, bs) in [
            (4, 8, 4, 8, 2048, 16),
            (132, 32, 8, 128, 131072, 16),
            (132, 4, 1, 128, 131072, 32),
            (108, 16, 2, 64, 1 << 20, 16),
            (132, 8, 8, 128, 512, 16),
        ] {
            let bound = split_scratch_bound(sms, q, kv, hd, max_pos, bs);
            let mut most = 0;
            let ctxs = [
                1,
                511,
                512,
                513,
                1000,
                4097,
                max_pos / 3,
                max_pos - 1,
                max_pos,
            ];
            for seqs in 1..=2 * sms as usize {
                for &ctx in ctxs.iter().filter(|&&c| c >= 1 && c <= max_pos) {
                    let got = scratch(sms, seqs, q, kv, hd, ctx, bs);
                    assert!(
                        got <= bound,
                        "sms {sms} seqs {seqs} ctx {ctx}: {got} > {bound}"
                    );
                    most = most.max(got);
                }
            }
            assert_eq!(
                most, bound,
                "sms {sms} kv {kv} max_pos {max_pos}: the bound is reached"
            );
        }
    }
}
