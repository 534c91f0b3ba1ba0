//! Wrappers for argmax / sampling (cuda/sampling.cu), the same-device all-reduce
//! (cuda/allreduce.cu) and the reshard byte movers (cuda/reshard.cu).

use super::super::buffer::{DType, DView};
use super::super::device::CudaDev;
use super::super::params::{
    PatAllReduceParams, PatArgmaxParams, PatKvCopyParams, PatKvGatherParams, PatSampleParams,
    PatStridedCopyParams, PAT_MAX_ALLREDUCE_INPUTS, PAT_SAMPLE_THREADS,
};
use super::{i32_of, launch, same_float, stride_grid, suffix, KvCacheView};
use crate::error::{Error, Result};

/// `n_rows` rows of logits, `row_stride` apart, of which the first `vocab` columns count.
#[derive(Clone, Copy, Debug)]
pub struct Rows {
    pub n_rows: usize,
    pub vocab: usize,
    pub row_stride: usize,
}

impl Rows {
    fn check(&self, logits: DView<'_>, what: &str) -> Result<()> {
        if self.vocab > self.row_stride {
            return Err(Error::Device(format!(
                "{what}: vocab {} exceeds row_stride {}",
                self.vocab, self.row_stride
            )));
        }
        if self.n_rows > 0 {
            logits.need((self.n_rows - 1) * self.row_stride + self.vocab, what)?;
        }
        i32_of(self.n_rows, "n_rows")?;
        i32_of(self.row_stride, "row_stride")?;
        Ok(())
    }
}

/// Per row: `out_idx = index_offset + argmax` (ties to the lowest index, NaN as -inf) and, if
/// given, `out_val` = the max as f32.
pub fn argmax(
    dev: &CudaDev,
    logits: DView<'_>,
    out_idx: DView<'_>,
    out_val: Option<DView<'_>>,
    rows: Rows,
    index_offset: usize,
) -> Result<()> {
    const W: &str = "argmax";
    let dt = same_float(&[logits], W)?;
    rows.check(logits, W)?;
    out_idx.check_dtype(DType::U32, W)?;
    out_idx.need(rows.n_rows, W)?;
    if let Some(v) = out_val {
        v.check_dtype(DType::F32, W)?;
        v.need(rows.n_rows, W)?;
    }
    let p = PatArgmaxParams {
        logits: logits.ptr(),
        out_idx: out_idx.ptr(),
        out_val: out_val.map_or(0, |v| v.ptr()),
        n_rows: i32_of(rows.n_rows, "n_rows")?,
        vocab: i32_of(rows.vocab, "vocab")?,
        row_stride: i32_of(rows.row_stride, "row_stride")?,
        index_offset: i32_of(index_offset, "index_offset")?,
    };
    let grid = (rows.n_rows as u32, 1, 1);
    // SAFETY: Rows::check bounded the logits; outputs hold n_rows elements.
    unsafe {
        launch(
            dev,
            &format!("{W}_{}", suffix(dt)?),
            grid,
            PAT_SAMPLE_THREADS,
            &p,
        )
    }
}

/// Sampling settings of `sample` (HF order: temperature, top-k, top-p).
#[derive(Clone, Copy, Debug)]
pub struct SampleCfg {
    /// <= 0: greedy.
    pub temperature: f32,
    /// 0 or >= vocab: off.
    pub top_k: usize,
    /// >= 1: off.
    pub top_p: f32,
}

/// Per row, one draw with the host uniform `uniforms[r]` in [0, 1) (f32 `[n_rows]`).
pub fn sample(
    dev: &CudaDev,
    logits: DView<'_>,
    out_idx: DView<'_>,
    uniforms: DView<'_>,
    rows: Rows,
    cfg: SampleCfg,
) -> Result<()> {
    const W: &str = "sample";
    let dt = same_float(&[logits], W)?;
    rows.check(logits, W)?;
    out_idx.check_dtype(DType::U32, W)?;
    out_idx.need(rows.n_rows, W)?;
    uniforms.check_dtype(DType::F32, W)?;
    uniforms.need(rows.n_rows, W)?;
    let p = PatSampleParams {
        logits: logits.ptr(),
        out_idx: out_idx.ptr(),
        uniforms: uniforms.ptr(),
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        top_k: i32_of(cfg.top_k.min(i32::MAX as usize), "top_k")?,
        n_rows: i32_of(rows.n_rows, "n_rows")?,
        vocab: i32_of(rows.vocab, "vocab")?,
        row_stride: i32_of(rows.row_stride, "row_stride")?,
    };
    let grid = (rows.n_rows as u32, 1, 1);
    // SAFETY: Rows::check bounded the logits; out_idx and uniforms hold n_rows elements.
    unsafe {
        launch(
            dev,
            &format!("{W}_{}", suffix(dt)?),
            grid,
            PAT_SAMPLE_THREADS,
            &p,
        )
    }
}

/// Byte range [lo, hi) of a view.
fn byte_range(v: &DView<'_>, elems: usize) -> (u64, u64) {
    (v.ptr(), v.ptr() + (elems * v.dtype().size()) as u64)
}

/// `sum = inputs[0] + inputs[1] + ...` (f32, rank order, one rounding) over `n_elems` elements,
/// written to every output. 1..=16 inputs and outputs; an output may be an input but buffers must
/// not partially overlap. All views must be on one GPU (any rank's device may launch it).
pub fn all_reduce_sum(
    dev: &CudaDev,
    inputs: &[DView<'_>],
    outputs: &[DView<'_>],
    n_elems: usize,
) -> Result<()> {
    const W: &str = "all_reduce_sum";
    let max = PAT_MAX_ALLREDUCE_INPUTS as usize;
    if inputs.is_empty() || outputs.is_empty() || inputs.len() > max || outputs.len() > max {
        return Err(Error::Device(format!(
            "{W}: {} inputs and {} outputs; each must be 1..={max}",
            inputs.len(),
            outputs.len()
        )));
    }
    let all: Vec<DView<'_>> = inputs.iter().chain(outputs).copied().collect();
    let dt = same_float(&all, W)?;
    for v in &all {
        v.need(n_elems, W)?;
    }
    for (i, a) in all.iter().enumerate() {
        let (alo, ahi) = byte_range(a, n_elems);
        for b in &all[i + 1..] {
            let (blo, bhi) = byte_range(b, n_elems);
            if alo != blo && alo < bhi && blo < ahi {
                return Err(Error::Device(format!(
                    "{W}: buffers at {alo:#x} and {blo:#x} partially overlap"
                )));
            }
        }
    }
    let mut p = PatAllReduceParams {
        n_elems: n_elems as i64,
        num_inputs: inputs.len() as i32,
        num_outputs: outputs.len() as i32,
        ..Default::default()
    };
    for (slot, v) in p.inputs.iter_mut().zip(inputs) {
        *slot = v.ptr();
    }
    for (slot, v) in p.outputs.iter_mut().zip(outputs) {
        *slot = v.ptr();
    }
    if n_elems == 0 {
        return Ok(());
    }
    let grid = stride_grid(n_elems, 256 * (16 / dt.size()), 4 * dev.num_sms());
    // SAFETY: every input and output holds n_elems elements and none partially overlap.
    unsafe { launch(dev, &format!("{W}_{}", suffix(dt)?), (grid, 1, 1), 256, &p) }
}

/// Byte geometry of `strided_copy`.
#[derive(Clone, Copy, Debug)]
pub struct Strided {
    pub rows: usize,
    pub row_bytes: usize,
    pub dst_stride: usize,
    pub src_stride: usize,
}

/// `dst[r * dst_stride ..][..row_bytes] = src[r * src_stride ..][..row_bytes]` for every row
/// (bytes, any dtype). Within one launch no byte may be both read and written, except the no-op
/// dst == src with equal strides; compaction in place is a sequence of such launches (see
/// cuda/reshard.cu).
pub fn strided_copy(dev: &CudaDev, dst: DView<'_>, src: DView<'_>, s: Strided) -> Result<()> {
    const W: &str = "strided_copy";
    if s.rows == 0 || s.row_bytes == 0 {
        return Ok(());
    }
    let span = |stride: usize| (s.rows - 1) * stride + s.row_bytes;
    let (dspan, sspan) = (span(s.dst_stride), span(s.src_stride));
    for (v, need) in [(dst, dspan), (src, sspan)] {
        if v.len() * v.dtype().size() < need {
            return Err(Error::Device(format!(
                "{W}: buffer of {} bytes, the copy spans {need}",
                v.len() * v.dtype().size()
            )));
        }
    }
    let noop = dst.ptr() == src.ptr() && s.dst_stride == s.src_stride;
    let (d0, s0) = (dst.ptr(), src.ptr());
    if !noop && d0 < s0 + sspan as u64 && s0 < d0 + dspan as u64 {
        return Err(Error::Device(format!(
            "{W}: source and destination overlap within one launch (split it, see cuda/reshard.cu)"
        )));
    }
    let p = PatStridedCopyParams {
        dst: d0,
        src: s0,
        rows: s.rows as i64,
        row_bytes: s.row_bytes as i64,
        dst_stride: s.dst_stride as i64,
        src_stride: s.src_stride as i64,
    };
    // A CTA moves 256 threads x 4 units of up to 16 bytes per step (cuda/reshard.cu).
    let grid = (
        stride_grid(s.row_bytes, 16384, 1024),
        s.rows.min(65535) as u32,
        1,
    );
    // SAFETY: both spans were checked against their buffers and do not overlap (or are a no-op).
    unsafe { launch(dev, W, grid, 256, &p) }
}

fn kv_move(
    dev: &CudaDev,
    cache: &KvCacheView<'_>,
    staging: DView<'_>,
    block_ids: DView<'_>,
    head_start: usize,
    num_heads: usize,
    symbol: &str,
) -> Result<()> {
    let dt = cache.check(symbol)?;
    same_float(&[cache.k, staging], symbol)?;
    block_ids.check_dtype(DType::I32, symbol)?;
    if head_start + num_heads > cache.num_kv_heads {
        return Err(Error::Device(format!(
            "{symbol}: heads [{head_start}, {}) outside the cache's {}",
            head_start + num_heads,
            cache.num_kv_heads
        )));
    }
    let nb = block_ids.len();
    staging.need(
        2 * nb * num_heads * cache.block_size * cache.head_dim,
        symbol,
    )?;
    let p = PatKvGatherParams {
        k_cache: cache.k.ptr(),
        v_cache: cache.v.ptr(),
        staging: staging.ptr(),
        block_ids: block_ids.ptr(),
        num_list_blocks: i32_of(nb, "num_list_blocks")?,
        cache_heads: i32_of(cache.num_kv_heads, "cache_heads")?,
        head_start: i32_of(head_start, "head_start")?,
        num_heads: i32_of(num_heads, "num_heads")?,
        block_size: i32_of(cache.block_size, "block_size")?,
        head_dim: i32_of(cache.head_dim, "head_dim")?,
        elem_bytes: dt.size() as i32,
        ..Default::default()
    };
    // SAFETY: staging holds 2 x nb chunks, the head range lies inside the cache; block id
    // contents (< num_blocks) are the caller's contract.
    unsafe { launch(dev, symbol, kv_grid(nb), 256, &p) }
}

/// A KV kernel's grid: a CTA moves `KV_CHUNKS_PER_CTA` list blocks' chunks, of K (y = 0) or V.
fn kv_grid(list_blocks: usize) -> (u32, u32, u32) {
    const KV_CHUNKS_PER_CTA: usize = 4;
    let x = list_blocks
        .div_ceil(KV_CHUNKS_PER_CTA)
        .min(i32::MAX as usize);
    (x as u32, 2, 1)
}

/// Copies heads `[head_start, head_start + num_heads)` of the listed cache blocks (i32 ids) into
/// `staging` = [2 (K, V), blocks, num_heads, block_size, head_dim].
pub fn kv_gather(
    dev: &CudaDev,
    cache: &KvCacheView<'_>,
    staging: DView<'_>,
    block_ids: DView<'_>,
    head_start: usize,
    num_heads: usize,
) -> Result<()> {
    kv_move(
        dev,
        cache,
        staging,
        block_ids,
        head_start,
        num_heads,
        "kv_gather",
    )
}

/// The inverse of `kv_gather`: writes `staging` into heads `head_start ..` of the listed blocks.
pub fn kv_scatter(
    dev: &CudaDev,
    cache: &KvCacheView<'_>,
    staging: DView<'_>,
    block_ids: DView<'_>,
    head_start: usize,
    num_heads: usize,
) -> Result<()> {
    kv_move(
        dev,
        cache,
        staging,
        block_ids,
        head_start,
        num_heads,
        "kv_scatter",
    )
}

/// Heads `[src_head, src_head + num_heads)` of the blocks `src_ids` lists in `src` copied into
/// heads `[dst_head, ..)` of the blocks `dst_ids` lists in `dst`, K and V, in one pass (what
/// `kv_gather` into staging then `kv_scatter` out of it does, without the staging). The two
/// caches share block size, head dim and dtype and must not overlap.
#[allow(clippy::too_many_arguments)]
pub fn kv_copy(
    dev: &CudaDev,
    src: &KvCacheView<'_>,
    src_ids: DView<'_>,
    src_head: usize,
    dst: &KvCacheView<'_>,
    dst_ids: DView<'_>,
    dst_head: usize,
    num_heads: usize,
) -> Result<()> {
    const W: &str = "kv_copy";
    let dt = src.check(W)?;
    dst.check(W)?;
    same_float(&[src.k, dst.k], W)?;
    src_ids.check_dtype(DType::I32, W)?;
    dst_ids.check_dtype(DType::I32, W)?;
    if (src.block_size, src.head_dim) != (dst.block_size, dst.head_dim) {
        return Err(Error::Device(format!(
            "{W}: blocks of {} x {} (source) and {} x {} (destination) differ",
            src.block_size, src.head_dim, dst.block_size, dst.head_dim
        )));
    }
    for (c, h, side) in [(src, src_head, "source"), (dst, dst_head, "destination")] {
        if h + num_heads > c.num_kv_heads {
            return Err(Error::Device(format!(
                "{W}: {side} heads [{h}, {}) outside the cache's {}",
                h + num_heads,
                c.num_kv_heads
            )));
        }
    }
    let nb = src_ids.len();
    if dst_ids.len() != nb {
        return Err(Error::Device(format!(
            "{W}: {nb} source blocks listed, {} destination blocks",
            dst_ids.len()
        )));
    }
    let bytes = |c: &KvCacheView<'_>| {
        (c.num_blocks * c.num_kv_heads * c.block_size * c.head_dim * dt.size()) as u64
    };
    for (a, b) in [
        (src.k, dst.k),
        (src.k, dst.v),
        (src.v, dst.k),
        (src.v, dst.v),
    ] {
        if a.ptr() < b.ptr() + bytes(dst) && b.ptr() < a.ptr() + bytes(src) {
            return Err(Error::Device(format!(
                "{W}: the source and destination caches overlap"
            )));
        }
    }
    let p = PatKvCopyParams {
        src_k: src.k.ptr(),
        src_v: src.v.ptr(),
        dst_k: dst.k.ptr(),
        dst_v: dst.v.ptr(),
        src_ids: src_ids.ptr(),
        dst_ids: dst_ids.ptr(),
        num_list_blocks: i32_of(nb, "num_list_blocks")?,
        src_heads: i32_of(src.num_kv_heads, "src_heads")?,
        src_head_start: i32_of(src_head, "src_head_start")?,
        dst_heads: i32_of(dst.num_kv_heads, "dst_heads")?,
        dst_head_start: i32_of(dst_head, "dst_head_start")?,
        num_heads: i32_of(num_heads, "num_heads")?,
        block_size: i32_of(src.block_size, "block_size")?,
        head_dim: i32_of(src.head_dim, "head_dim")?,
        elem_bytes: dt.size() as i32,
        ..Default::default()
    };
    if nb == 0 || num_heads == 0 {
        return Ok(());
    }
    // SAFETY: both head ranges lie inside their caches, which do not overlap; block id contents
    // (< each cache's num_blocks) are the caller's contract.
    unsafe { launch(dev, W, kv_grid(nb), 256, &p) }
}
