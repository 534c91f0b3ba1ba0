//! Wrappers for the per-token kernels: embedding, rmsnorm / fused_add_rmsnorm / qk_norm, rope,
//! silu_and_mul and kv_append (cuda/{embedding,rmsnorm,rope,activation,kv_append}.cu).

use super::super::buffer::{DType, DView};
use super::super::device::CudaDev;
use super::super::params::{
    PatEmbeddingParams, PatKvAppendParams, PatQkNormParams, PatRmsNormParams, PatRopeParams,
    PatSiluMulParams, PAT_MAX_HEAD_DIM,
};
use super::{i32_of, launch, same_float, stride_grid, suffix, Heads, KvCacheView};
use crate::error::{Error, Result};

/// Vocab-parallel lookup: `out[t] = table[ids[t] - vocab_start]` when the id falls in this shard
/// (`table` holds `table.len() / hidden` rows), else zeros. Also a row gather: with
/// `vocab_start = 0` and `table` = any `[rows, hidden]` buffer, `out[t] = table[ids[t]]`.
pub fn embedding(
    dev: &CudaDev,
    out: DView<'_>,
    ids: DView<'_>,
    table: DView<'_>,
    hidden: usize,
    vocab_start: usize,
) -> Result<()> {
    const W: &str = "embedding";
    ids.check_dtype(DType::U32, W)?;
    let dt = same_float(&[out, table], W)?;
    if hidden == 0 || !table.len().is_multiple_of(hidden) {
        return Err(Error::Device(format!(
            "{W}: table of {} elements is not a whole number of rows of {hidden}",
            table.len()
        )));
    }
    let n = ids.len();
    out.need(n * hidden, W)?;
    let p = PatEmbeddingParams {
        out: out.ptr(),
        ids: ids.ptr(),
        table: table.ptr(),
        n_tokens: i32_of(n, "n_tokens")?,
        hidden: i32_of(hidden, "hidden")?,
        vocab_start: i32_of(vocab_start, "vocab_start")?,
        vocab_local: i32_of(table.len() / hidden, "vocab_local")?,
    };
    // SAFETY: out holds n*hidden elements, ids n, table vocab_local*hidden; the kernel reads a
    // table row only for ids inside the shard.
    unsafe {
        launch(
            dev,
            &format!("{W}_{}", suffix(dt)?),
            (n as u32, 1, 1),
            256,
            &p,
        )
    }
}

fn norm_params(
    out: DView<'_>,
    x: DView<'_>,
    residual: Option<DView<'_>>,
    weight: DView<'_>,
    n_rows: usize,
    eps: f32,
    what: &str,
) -> Result<(PatRmsNormParams, DType)> {
    let mut views = vec![out, x, weight];
    views.extend(residual);
    let dt = same_float(&views, what)?;
    let dim = weight.len();
    if dim == 0 {
        return Err(Error::Device(format!("{what}: empty weight")));
    }
    for v in [out, x].iter().chain(residual.iter()) {
        v.need(n_rows * dim, what)?;
    }
    let p = PatRmsNormParams {
        out: out.ptr(),
        x: x.ptr(),
        residual: residual.map_or(0, |r| r.ptr()),
        weight: weight.ptr(),
        n_rows: i32_of(n_rows, "n_rows")?,
        dim: i32_of(dim, "dim")?,
        eps,
        ..Default::default()
    };
    Ok((p, dt))
}

/// `out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight` for `n_rows` rows of `weight.len()`.
/// `out` may be `x`.
pub fn rmsnorm(
    dev: &CudaDev,
    out: DView<'_>,
    x: DView<'_>,
    weight: DView<'_>,
    n_rows: usize,
    eps: f32,
) -> Result<()> {
    let (p, dt) = norm_params(out, x, None, weight, n_rows, eps, "rmsnorm")?;
    // SAFETY: norm_params checked out/x for n_rows*dim elements and weight for dim.
    unsafe {
        launch(
            dev,
            &format!("rmsnorm_{}", suffix(dt)?),
            (n_rows as u32, 1, 1),
            256,
            &p,
        )
    }
}

/// `residual = x + residual` (rounded to T), then `out = rmsnorm(residual) * weight`.
pub fn fused_add_rmsnorm(
    dev: &CudaDev,
    out: DView<'_>,
    x: DView<'_>,
    residual: DView<'_>,
    weight: DView<'_>,
    n_rows: usize,
    eps: f32,
) -> Result<()> {
    let (p, dt) = norm_params(
        out,
        x,
        Some(residual),
        weight,
        n_rows,
        eps,
        "fused_add_rmsnorm",
    )?;
    let name = format!("fused_add_rmsnorm_{}", suffix(dt)?);
    // SAFETY: as in `rmsnorm`, with residual also checked for n_rows*dim elements.
    unsafe { launch(dev, &name, (n_rows as u32, 1, 1), 256, &p) }
}

fn check_head_dim(hd: usize, what: &str) -> Result<()> {
    if hd == 0 || hd > PAT_MAX_HEAD_DIM as usize {
        return Err(Error::Device(format!(
            "{what}: head_dim {hd} outside 1..={PAT_MAX_HEAD_DIM}"
        )));
    }
    Ok(())
}

/// Qwen3 per-head RMSNorm over head_dim, in place on every q and k head of `n_tokens` tokens.
pub fn qk_norm(
    dev: &CudaDev,
    q: Heads<'_>,
    k: Heads<'_>,
    q_weight: DView<'_>,
    k_weight: DView<'_>,
    n_tokens: usize,
    eps: f32,
) -> Result<()> {
    const W: &str = "qk_norm";
    let dt = same_float(&[q.data, k.data, q_weight, k_weight], W)?;
    let hd = q.head_dim;
    if k.head_dim != hd {
        return Err(Error::Device(format!(
            "{W}: q head_dim {hd} != k head_dim {}",
            k.head_dim
        )));
    }
    check_head_dim(hd, W)?;
    q.check(n_tokens, W)?;
    k.check(n_tokens, W)?;
    q_weight.need(hd, W)?;
    k_weight.need(hd, W)?;
    let p = PatQkNormParams {
        q: q.data.ptr(),
        k: k.data.ptr(),
        q_weight: q_weight.ptr(),
        k_weight: k_weight.ptr(),
        n_tokens: i32_of(n_tokens, "n_tokens")?,
        num_q_heads: i32_of(q.heads, "num_q_heads")?,
        num_kv_heads: i32_of(k.heads, "num_kv_heads")?,
        head_dim: i32_of(hd, "head_dim")?,
        q_token_stride: i32_of(q.token_stride, "q_token_stride")?,
        k_token_stride: i32_of(k.token_stride, "k_token_stride")?,
        eps,
        ..Default::default()
    };
    let rows = n_tokens * (q.heads + k.heads);
    i32_of(rows, "n_tokens * heads")?;
    // One warp per head vector, 8 per 256-thread block.
    let grid = rows.div_ceil(8) as u32;
    // SAFETY: q and k were checked for n_tokens tokens of their heads; weights for head_dim.
    unsafe { launch(dev, &format!("{W}_{}", suffix(dt)?), (grid, 1, 1), 256, &p) }
}

/// HF rotate-half RoPE in place on q and k at `positions` (i32 `[n_tokens]`) with the host-computed
/// `inv_freq` (f32 [head_dim / 2]).
pub fn rope(
    dev: &CudaDev,
    q: Heads<'_>,
    k: Heads<'_>,
    positions: DView<'_>,
    inv_freq: DView<'_>,
    n_tokens: usize,
) -> Result<()> {
    const W: &str = "rope";
    let dt = same_float(&[q.data, k.data], W)?;
    positions.check_dtype(DType::I32, W)?;
    inv_freq.check_dtype(DType::F32, W)?;
    let hd = q.head_dim;
    if k.head_dim != hd || !hd.is_multiple_of(2) {
        return Err(Error::Device(format!(
            "{W}: head_dim must be even and equal for q and k (got {hd}, {})",
            k.head_dim
        )));
    }
    check_head_dim(hd, W)?;
    q.check(n_tokens, W)?;
    k.check(n_tokens, W)?;
    positions.need(n_tokens, W)?;
    inv_freq.need(hd / 2, W)?;
    let p = PatRopeParams {
        q: q.data.ptr(),
        k: k.data.ptr(),
        positions: positions.ptr(),
        inv_freq: inv_freq.ptr(),
        n_tokens: i32_of(n_tokens, "n_tokens")?,
        num_q_heads: i32_of(q.heads, "num_q_heads")?,
        num_kv_heads: i32_of(k.heads, "num_kv_heads")?,
        head_dim: i32_of(hd, "head_dim")?,
        q_token_stride: i32_of(q.token_stride, "q_token_stride")?,
        k_token_stride: i32_of(k.token_stride, "k_token_stride")?,
    };
    // SAFETY: all buffers checked for n_tokens tokens / head_dim/2 frequencies.
    unsafe {
        launch(
            dev,
            &format!("{W}_{}", suffix(dt)?),
            (n_tokens as u32, 1, 1),
            256,
            &p,
        )
    }
}

/// `out[r, i] = silu(input[r, i]) * input[r, inter + i]` for `n_rows` rows of `[gate | up]`.
pub fn silu_mul(
    dev: &CudaDev,
    out: DView<'_>,
    input: DView<'_>,
    n_rows: usize,
    inter: usize,
) -> Result<()> {
    const W: &str = "silu_and_mul";
    let dt = same_float(&[out, input], W)?;
    out.need(n_rows * inter, W)?;
    input.need(n_rows * 2 * inter, W)?;
    let p = PatSiluMulParams {
        out: out.ptr(),
        input: input.ptr(),
        n_rows: i32_of(n_rows, "n_rows")?,
        inter: i32_of(inter, "inter")?,
    };
    if n_rows == 0 || inter == 0 {
        return Ok(());
    }
    let v = 16 / dt.size();
    let grid = stride_grid(n_rows * inter, 256 * v, 8 * dev.num_sms());
    // SAFETY: out holds n_rows*inter and input n_rows*2*inter elements.
    unsafe { launch(dev, &format!("{W}_{}", suffix(dt)?), (grid, 1, 1), 256, &p) }
}

/// Scatters the new tokens' k and v heads into the paged cache at `slot_mapping` (i64 `[n_tokens]`,
/// `block * block_size + offset`, or -1 to skip). Slots must be distinct and inside the cache
/// (the caller's allocator guarantees it; the kernel does not check).
pub fn kv_append(
    dev: &CudaDev,
    cache: &KvCacheView<'_>,
    k: Heads<'_>,
    v: Heads<'_>,
    slot_mapping: DView<'_>,
    n_tokens: usize,
) -> Result<()> {
    const W: &str = "kv_append";
    let dt = cache.check(W)?;
    same_float(&[cache.k, k.data, v.data], W)?;
    slot_mapping.check_dtype(DType::I64, W)?;
    for h in [&k, &v] {
        if h.heads != cache.num_kv_heads || h.head_dim != cache.head_dim {
            return Err(Error::Device(format!(
                "{W}: {} heads of {} do not match the cache's {} heads of {}",
                h.heads, h.head_dim, cache.num_kv_heads, cache.head_dim
            )));
        }
        h.check(n_tokens, W)?;
    }
    slot_mapping.need(n_tokens, W)?;
    i32_of(cache.num_blocks * cache.block_size, "cache slots")?;
    let p = PatKvAppendParams {
        k_cache: cache.k.ptr(),
        v_cache: cache.v.ptr(),
        k: k.data.ptr(),
        v: v.data.ptr(),
        slot_mapping: slot_mapping.ptr(),
        n_tokens: i32_of(n_tokens, "n_tokens")?,
        num_kv_heads: i32_of(cache.num_kv_heads, "num_kv_heads")?,
        head_dim: i32_of(cache.head_dim, "head_dim")?,
        block_size: i32_of(cache.block_size, "block_size")?,
        k_token_stride: i32_of(k.token_stride, "k_token_stride")?,
        v_token_stride: i32_of(v.token_stride, "v_token_stride")?,
    };
    // SAFETY: k/v checked for n_tokens tokens, the cache for num_blocks blocks; slot contents are
    // the caller's contract (documented above).
    unsafe {
        launch(
            dev,
            &format!("{W}_{}", suffix(dt)?),
            (n_tokens as u32, 1, 1),
            128,
            &p,
        )
    }
}
