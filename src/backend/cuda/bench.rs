//! GPU micro-benchmarks for `pat bench`: device-to-device copy bandwidth and paged decode
//! attention at a given shape.
//!
//! Timing: CUDA events with timing enabled, made with the raw driver API
//! (`cuEventCreate(CU_EVENT_DEFAULT)`) because `CudaDev::new_event` makes timing-disabled events
//! for ordering. The timed operations are enqueued back to back with an event between each two,
//! so the GPU never idles waiting for the host inside a measured interval (unless the host
//! cannot keep up, which is then part of the honest cost); one warm-up run precedes them, and
//! the median interval is reported.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use cudarc::driver::result;
use cudarc::driver::sys::{CUevent, CUevent_flags};

use super::buffer::{DBuf, DType};
use super::dev_err;
use super::device::CudaDev;
use super::ops::{self, Heads, KvCacheView, SeqMeta};
use super::params::PAT_MAX_GQA;
use super::testing::{rand_vec, shuffle};
use crate::error::{Error, Result};
use crate::kv::blocks_for;
use crate::stats::median;

/// Bytes per buffer in [`copy_bandwidth`] (two buffers: source and destination).
const COPY_BYTES: usize = 1 << 30;
/// Timed copies in [`copy_bandwidth`].
const COPY_ITERS: usize = 10;
/// Buffers smaller than this do not measure bandwidth (launch overhead dominates).
const MIN_COPY_BYTES: usize = 16 << 20;
/// The most timed launches one benchmark takes (one event each).
const MAX_ITERS: usize = 100_000;
/// Host-generated random values per buffer; the rest of the buffer repeats them.
const RANDOM_TILE: usize = 1 << 20;
/// Fixed seed: the benchmark inputs are the same on every run.
pub(super) const SEED: u64 = 0x5EED_BE7C;

/// A CUDA event with timing enabled; destroyed on drop.
struct TimingEvent {
    raw: CUevent,
}

impl TimingEvent {
    fn new(dev: &CudaDev) -> Result<Self> {
        dev.bind()?;
        let raw = result::event::create(CUevent_flags::CU_EVENT_DEFAULT)
            .map_err(dev_err("creating a timing event"))?;
        Ok(TimingEvent { raw })
    }

    /// Records the event at the current end of `dev`'s stream.
    fn record(&self, dev: &CudaDev) -> Result<()> {
        dev.bind()?;
        // SAFETY: `raw` is a live event of this context (made by `new` with `dev` bound) and the
        // stream is `dev`'s live stream.
        unsafe { result::event::record(self.raw, dev.cu_stream()) }
            .map_err(dev_err("recording a timing event"))
    }

    /// Milliseconds from `self` to `end` (waits for `end`).
    fn elapsed_ms(&self, end: &TimingEvent) -> Result<f64> {
        // SAFETY: both events are live, timing-enabled, recorded on the same stream, and not
        // destroyed until their owners drop.
        let ms = unsafe {
            result::event::synchronize(end.raw).map_err(dev_err("waiting for a timing event"))?;
            result::event::elapsed(self.raw, end.raw)
        }
        .map_err(dev_err("reading a timing event"))?;
        Ok(f64::from(ms))
    }
}

impl Drop for TimingEvent {
    fn drop(&mut self) {
        // SAFETY: made by cuEventCreate and destroyed exactly once, here; destroying an event
        // still pending is allowed (its resources are released when it completes).
        let _ = unsafe { result::event::destroy(self.raw) };
    }
}

/// Runs `op` once as warm-up, then `iters` times back to back on `dev`'s stream with an event
/// between each two runs; returns the median interval in milliseconds.
pub(super) fn median_ms(
    dev: &CudaDev,
    iters: usize,
    mut op: impl FnMut() -> Result<()>,
) -> Result<f64> {
    if iters == 0 || iters > MAX_ITERS {
        return Err(Error::Device(format!(
            "benchmark iterations must be 1..={MAX_ITERS}, not {iters}"
        )));
    }
    op()?;
    dev.synchronize()?;
    let events = (0..=iters)
        .map(|_| TimingEvent::new(dev))
        .collect::<Result<Vec<_>>>()?;
    events[0].record(dev)?;
    for ev in &events[1..] {
        op()?;
        ev.record(dev)?;
    }
    dev.synchronize()?;
    let mut times = events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]))
        .collect::<Result<Vec<_>>>()?;
    let m = median(&mut times);
    if !(m.is_finite() && m > 0.0) {
        return Err(Error::Device(format!(
            "benchmark timing gave a median of {m} ms; the events did not measure the work"
        )));
    }
    Ok(m)
}

/// Device-to-device copy bandwidth of `dev` in bytes per second, counting the bytes read plus the
/// bytes written (2 x the copy size): one `cuMemcpyDtoDAsync` of a 1 GiB buffer (less when a
/// quarter of the free memory cannot hold both buffers), warmed up once, median of 10 copies.
pub fn copy_bandwidth(dev: &CudaDev) -> Result<f64> {
    let (free, _) = dev.mem_info()?;
    // Source and destination together take at most a quarter of the free memory.
    let bytes = COPY_BYTES.min(free / 8) / 4096 * 4096;
    if bytes < MIN_COPY_BYTES {
        return Err(Error::Device(format!(
            "copy bandwidth: not enough free device memory ({free} bytes free, needs {} for two \
             {} MiB buffers in a quarter of it)",
            8 * MIN_COPY_BYTES,
            MIN_COPY_BYTES >> 20
        )));
    }
    // Non-zero contents (the values do not matter to a copy, but never time zeros).
    let src = DBuf::filled(dev, DType::U8, bytes, 0x5A)?;
    let dst = DBuf::filled(dev, DType::U8, bytes, 0xA5)?;
    let (s, d) = (src.view().ptr(), dst.view().ptr());
    let ms = median_ms(dev, COPY_ITERS, || {
        // SAFETY: both buffers hold `bytes` bytes, are distinct allocations, and outlive every
        // copy (median_ms synchronizes before returning).
        unsafe { dev.dtod(d, s, bytes) }
    })?;
    Ok(2.0 * bytes as f64 / (ms * 1e-3))
}

/// One paged decode attention measurement (see [`paged_attention_bench`]).
#[derive(Clone, Debug)]
pub struct AttentionBench {
    /// Sequences in the batch (one query token each).
    pub num_seqs: usize,
    /// Cached tokens per sequence (all sequences equally long).
    pub context: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads (q_heads / kv_heads is the GQA group).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Element type of q, out and the cache.
    pub dtype: DType,
    /// Split-K partition in tokens chosen by `ops::auto_partition`, `None` for no split.
    pub partition: Option<usize>,
    /// Median time of one `ops::paged_attention` call (including its split-K scratch set-up).
    pub median_ms: f64,
    /// Bytes one call must move: K and V of every cached token read, plus q read and out
    /// written (block tables, context lengths and split-K scratch not counted).
    pub bytes: usize,
    /// `bytes` / `median_ms`, in GB/s (10^9 bytes per second).
    pub gbps: f64,
}

/// `a * b`, or an error naming `what`.
fn mul(a: usize, b: usize, what: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| Error::Device(format!("paged attention bench: {what} overflows")))
}

/// Fills a float buffer with finite random values: `RANDOM_TILE` values uniform in (-1, 1) made
/// on the host and uploaded, then repeated over the rest of the buffer by device copies that
/// double the filled prefix each time (fast for buffers of billions of elements; the values
/// do not matter for timing, only that they are finite and not all zero).
pub(super) fn fill_random(dev: &CudaDev, buf: &DBuf, r: &mut ChaCha8Rng) -> Result<()> {
    let n = buf.len();
    if n == 0 {
        return Ok(());
    }
    let first = n.min(RANDOM_TILE);
    buf.view().write_f32(dev, &rand_vec(r, first, 1.0))?;
    let es = buf.dtype().size();
    let base = buf.view().ptr();
    let mut done = first;
    while done < n {
        let k = done.min(n - done);
        // SAFETY: source [0, k) and destination [done, done + k) elements lie inside the buffer
        // (done + k <= n) and do not overlap (k <= done); stream ordered after the upload.
        unsafe { dev.dtod(base + (done * es) as u64, base, k * es)? };
        done += k;
    }
    Ok(())
}

/// Times `ops::paged_attention` (decode: one query token per sequence) on a random paged cache of
/// exactly `num_seqs x context` tokens (`num_seqs * ceil(context / block_size)` blocks, ids
/// shuffled over the sequences' block tables), with the split-K partition `ops::auto_partition`
/// picks: one warm-up call, then the median of `iters` calls (1..=100000).
///
/// Errors (nothing launched) on zero or overflowing sizes, a non-float dtype, q heads not a
/// multiple of kv heads, a GQA group above the kernel's limit, head_dim outside 1..=256, or a
/// cache that does not fit in the free device memory.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_bench(
    dev: &CudaDev,
    dtype: DType,
    num_seqs: usize,
    context: usize,
    q_heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    iters: usize,
) -> Result<AttentionBench> {
    const W: &str = "paged attention bench";
    if !dtype.is_float() {
        return Err(Error::Device(format!(
            "{W}: {} is not a float dtype",
            dtype.name()
        )));
    }
    for (name, v) in [
        ("num_seqs", num_seqs),
        ("context", context),
        ("q_heads", q_heads),
        ("kv_heads", kv_heads),
        ("head_dim", head_dim),
        ("block_size", block_size),
        ("iters", iters),
    ] {
        if v == 0 {
            return Err(Error::Device(format!("{W}: {name} must be positive")));
        }
    }
    if iters > MAX_ITERS {
        return Err(Error::Device(format!(
            "{W}: iters must be at most {MAX_ITERS}, not {iters}"
        )));
    }
    if !q_heads.is_multiple_of(kv_heads) {
        return Err(Error::Device(format!(
            "{W}: {q_heads} q heads are not a multiple of {kv_heads} kv heads"
        )));
    }
    if q_heads / kv_heads > PAT_MAX_GQA as usize {
        return Err(Error::Device(format!(
            "{W}: GQA group {} exceeds PAT_MAX_GQA = {PAT_MAX_GQA}",
            q_heads / kv_heads
        )));
    }
    if head_dim > 256 {
        return Err(Error::Device(format!(
            "{W}: head_dim {head_dim} outside 1..=256"
        )));
    }
    if i32::try_from(context).is_err() {
        return Err(Error::Device(format!(
            "{W}: context {context} does not fit in an i32"
        )));
    }

    // Shapes and sizes, all checked.
    let es = dtype.size();
    let mb = blocks_for(context, block_size);
    let nb = mul(num_seqs, mb, "the block count")?;
    if i32::try_from(nb).is_err() {
        return Err(Error::Device(format!(
            "{W}: {nb} blocks do not fit in i32 block ids"
        )));
    }
    let block_elems = mul(mul(kv_heads, block_size, "a block")?, head_dim, "a block")?;
    let cache_elems = mul(nb, block_elems, "the cache size")?;
    let q_elems = mul(mul(num_seqs, q_heads, "q")?, head_dim, "q")?;
    let partition = ops::auto_partition(dev, num_seqs, kv_heads, context, block_size);
    let scratch_bytes = match partition {
        Some(p) => {
            let rows = mul(num_seqs, q_heads, "the split-K scratch")?;
            let per = mul(context.div_ceil(p), head_dim + 2, "the split-K scratch")?;
            mul(
                mul(rows, per, "the split-K scratch")?,
                4,
                "the split-K scratch",
            )?
        }
        None => 0,
    };
    let need = [
        mul(mul(cache_elems, 2, "the cache size")?, es, "the cache size")?,
        mul(mul(q_elems, 2, "q and out")?, es, "q and out")?,
        mul(nb + num_seqs, 4, "the block tables")?, // tables and context lengths, i32
        scratch_bytes,
    ]
    .into_iter()
    .try_fold(0usize, |a, b| a.checked_add(b))
    .ok_or_else(|| Error::Device(format!("{W}: the total size overflows")))?;
    let (free, _) = dev.mem_info()?;
    // Leave a sixteenth of the free memory for the allocator and the driver.
    if need > free - free / 16 {
        return Err(Error::Device(format!(
            "{W}: {num_seqs} x {context} tokens of {kv_heads} x {head_dim} {} K/V need {:.2} GiB \
             of device memory, {:.2} GiB free",
            dtype.name(),
            need as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64
        )));
    }

    // Inputs: random K/V/q (finite, tiled), shuffled block ids, equal context lengths.
    let mut r = ChaCha8Rng::seed_from_u64(SEED);
    let k = DBuf::zeros(dev, dtype, cache_elems)?;
    let v = DBuf::zeros(dev, dtype, cache_elems)?;
    fill_random(dev, &k, &mut r)?;
    fill_random(dev, &v, &mut r)?;
    let q = DBuf::zeros(dev, dtype, q_elems)?;
    fill_random(dev, &q, &mut r)?;
    let out = DBuf::zeros(dev, dtype, q_elems)?;
    let mut ids: Vec<i32> = (0..nb as i32).collect();
    shuffle(&mut r, &mut ids);
    let tables = DBuf::from_slice(dev, &ids)?; // row s = blocks s*mb .. (s+1)*mb of the shuffle
    let ctx_i32 = i32::try_from(context).unwrap_or(i32::MAX); // checked above
    let lens = DBuf::from_slice(dev, &vec![ctx_i32; num_seqs])?;

    let cache = KvCacheView {
        k: k.view(),
        v: v.view(),
        num_blocks: nb,
        num_kv_heads: kv_heads,
        block_size,
        head_dim,
    };
    let meta = SeqMeta {
        num_seqs,
        block_tables: tables.view(),
        max_blocks_per_seq: mb,
        context_lens: lens.view(),
        max_context: context,
        cu_seqlens_q: None,
        total_q: num_seqs,
        max_q_len: 1,
    };
    let qh = Heads {
        data: q.view(),
        heads: q_heads,
        head_dim,
        token_stride: q_heads * head_dim,
    };
    let scale = 1.0 / (head_dim as f32).sqrt();
    let ms = median_ms(dev, iters, || {
        ops::paged_attention(dev, out.view(), qh, &cache, &meta, scale, partition)
    })?;
    if let Some(i) = out.to_f32(dev)?.iter().position(|x| !x.is_finite()) {
        return Err(Error::Device(format!(
            "{W}: output element {i} is not finite; the kernel or its inputs are broken"
        )));
    }

    let token_bytes = mul(mul(kv_heads, head_dim, "K/V bytes")?, es, "K/V bytes")?;
    let kv_bytes = mul(
        mul(
            mul(num_seqs, context, "K/V bytes")?,
            token_bytes,
            "K/V bytes",
        )?,
        2,
        "K/V bytes",
    )?;
    let bytes = kv_bytes
        .checked_add(2 * q_elems * es) // fits: q and out were allocated
        .ok_or_else(|| Error::Device(format!("{W}: the byte count overflows")))?;
    Ok(AttentionBench {
        num_seqs,
        context,
        q_heads,
        kv_heads,
        head_dim,
        block_size,
        dtype,
        partition,
        median_ms: ms,
        bytes,
        gbps: bytes as f64 / (ms * 1e-3) / 1e9,
    })
}
