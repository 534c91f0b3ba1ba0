//! Typed launch wrappers: one function per kernel family of `cuda/*.cu` plus the cuBLAS GEMMs.
//! This module tree is the only place raw launches happen.
//!
//! Every wrapper takes device views and shapes, checks what the kernel header lists under "caller
//! checks" and every buffer bound the shapes imply, fills the bindgen parameter struct, picks the
//! grid/block documented in the kernel header, and launches on the device's stream. Violations
//! come back as `Error::Device` and nothing is launched. What a wrapper cannot check is the
//! *contents* of index buffers (slot mappings, block tables, token ids): callers validate those on
//! the host before upload (`GpuRank::forward` does).
//!
//! Float dtype `T` of a kernel is the dtype of its float views; all of them must agree.

mod attention;
mod gemm;
mod misc;
mod norm;

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::driver::result;

pub use attention::{
    auto_partition, paged_attention, prefill_attention, split_scratch_bound, SeqMeta,
};
pub use gemm::{gemm_nn, gemm_nt};
pub use misc::{
    all_reduce_sum, argmax, kv_copy, kv_gather, kv_scatter, sample, strided_copy, Rows, SampleCfg,
    Strided,
};
pub use norm::{embedding, fused_add_rmsnorm, kv_append, qk_norm, rmsnorm, rope, silu_mul};

use super::buffer::{DType, DView};
use super::dev_err;
use super::device::CudaDev;
use crate::error::{Error, Result};

/// `heads` vectors of `head_dim` per token inside a token-major buffer: token t, head h starts at
/// element `t * token_stride + h * head_dim` of `data` (so q/k/v may be views into fused QKV).
#[derive(Clone, Copy, Debug)]
pub struct Heads<'a> {
    pub data: DView<'a>,
    pub heads: usize,
    pub head_dim: usize,
    pub token_stride: usize,
}

impl Heads<'_> {
    /// Checks that `n_tokens` tokens fit in `data`.
    fn check(&self, n_tokens: usize, what: &str) -> Result<()> {
        if n_tokens == 0 {
            return Ok(());
        }
        let span = self.heads * self.head_dim;
        if self.token_stride < span && n_tokens > 1 {
            return Err(Error::Device(format!(
                "{what}: token stride {} is smaller than heads x head_dim = {span}",
                self.token_stride
            )));
        }
        self.data
            .need((n_tokens - 1) * self.token_stride + span, what)
    }
}

/// One layer's paged K/V cache: `[num_blocks, num_kv_heads, block_size, head_dim]` each.
#[derive(Clone, Copy, Debug)]
pub struct KvCacheView<'a> {
    pub k: DView<'a>,
    pub v: DView<'a>,
    pub num_blocks: usize,
    pub num_kv_heads: usize,
    pub block_size: usize,
    pub head_dim: usize,
}

impl KvCacheView<'_> {
    fn check(&self, what: &str) -> Result<DType> {
        let n = self.num_blocks * self.num_kv_heads * self.block_size * self.head_dim;
        self.k.need(n, what)?;
        self.v.need(n, what)?;
        same_float(&[self.k, self.v], what)
    }
}

/// The common float dtype of `views`, or an error naming the mismatch.
pub(crate) fn same_float(views: &[DView<'_>], what: &str) -> Result<DType> {
    let dt = views
        .first()
        .map(|v| v.dtype())
        .ok_or_else(|| Error::Device(format!("{what}: no buffers")))?;
    if !dt.is_float() {
        return Err(Error::Device(format!(
            "{what}: {} is not a float dtype",
            dt.name()
        )));
    }
    if let Some(v) = views.iter().find(|v| v.dtype() != dt) {
        return Err(Error::Device(format!(
            "{what}: mixed dtypes {} and {}",
            dt.name(),
            v.dtype().name()
        )));
    }
    Ok(dt)
}

/// `value` as the i32 a parameter struct holds.
pub(crate) fn i32_of(value: usize, field: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| Error::Device(format!("{field} = {value} does not fit in an i32")))
}

/// Kernel-name suffix of a float dtype.
pub(crate) fn suffix(dt: DType) -> Result<&'static str> {
    match dt {
        DType::F32 | DType::Bf16 | DType::F16 => Ok(dt.name()),
        other => Err(Error::Device(format!(
            "no kernels for dtype {}",
            other.name()
        ))),
    }
}

/// Kernel launches and cuBLAS calls made by this process (every device, every thread).
static LAUNCHES: AtomicU64 = AtomicU64::new(0);

/// How many kernels and cuBLAS GEMMs this process has launched so far: the difference over a
/// decode step is its launch count, whose per-launch cost is the floor of a small shard's step.
pub fn launches() -> u64 {
    LAUNCHES.load(Ordering::Relaxed)
}

pub(crate) fn count_launch() {
    LAUNCHES.fetch_add(1, Ordering::Relaxed);
}

/// Blocks of a grid-stride launch: ceil(work / per_block), at least 1, at most `cap`.
pub(crate) fn stride_grid(work: usize, per_block: usize, cap: u32) -> u32 {
    work.div_ceil(per_block.max(1))
        .clamp(1, cap.max(1) as usize) as u32
}

/// Launches kernel `symbol` with `params` as its single by-value argument. A grid with a zero
/// dimension launches nothing.
///
/// # Safety
/// `P` must be exactly the parameter struct `symbol` takes, and every device pointer in `params`
/// must be valid for every access the kernel makes with the shapes in `params` (the typed wrappers
/// check this before calling).
pub(crate) unsafe fn launch<P>(
    dev: &CudaDev,
    symbol: &str,
    grid: (u32, u32, u32),
    block: u32,
    params: &P,
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    if grid.0 > i32::MAX as u32 || grid.1 > 65535 || grid.2 > 65535 {
        return Err(Error::Device(format!(
            "{symbol}: grid {grid:?} exceeds the CUDA limits (2^31-1, 65535, 65535)"
        )));
    }
    let f = dev.function(symbol)?;
    dev.bind()?;
    // cuLaunchKernel copies the argument bytes before returning, so a pointer to the borrowed
    // struct is enough.
    let mut args = [params as *const P as *mut c_void];
    count_launch();
    result::launch_kernel(f, grid, (block, 1, 1), 0, dev.cu_stream(), &mut args)
        .map_err(dev_err(format!("launching {symbol}")))
}
