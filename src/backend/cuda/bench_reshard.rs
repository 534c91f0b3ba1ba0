//! `pat bench reshard`: the switch kernels of cuda/reshard.cu alone, at the shapes a live TP
//! switch gives them, against the device's measured copy bandwidth.
//!
//! - `strided_copy` compaction: a weight shard keeps half of every row when tp doubles (rows of
//!   `row_bytes` out of rows twice as long), out of place (an in-place compaction is a sequence of
//!   such launches, each over non-overlapping spans).
//! - `kv_gather` / `kv_scatter`: one kv head of a shuffled list of cache blocks to and from a
//!   contiguous staging buffer (what a KV migration sends and receives: one batch, one layer);
//!   `kv_copy`: the same head into another cache's blocks in one pass (KV staying on its rank).
//!
//! Bytes counted: every byte read plus every byte written, as [`super::bench::copy_bandwidth`]
//! counts a copy, so `gbps / copy` is the fraction of the copy limit.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::bench::{fill_random, median_ms, SEED};
use super::buffer::{DBuf, DType};
use super::device::CudaDev;
use super::ops::{self, KvCacheView, Strided};
use super::testing::shuffle;
use crate::error::{Error, Result};

/// One measurement.
#[derive(Clone, Debug)]
pub struct ReshardBench {
    /// `strided_copy`, `kv_gather`, `kv_scatter` or `kv_copy`.
    pub kernel: &'static str,
    /// The geometry, for people.
    pub shape: String,
    /// Bytes read plus bytes written by one call.
    pub bytes: usize,
    pub median_ms: f64,
    /// `bytes` / `median_ms`, in GB/s (10^9 bytes per second).
    pub gbps: f64,
}

/// Row of a LLaMA-3.1-8B weight in bf16 (hidden 4096): what a compaction keeps half of.
const ROW_BYTES: usize = 4096 * 2;
/// KV geometry of LLaMA-3.1-8B at tp 1: 8 kv heads of 128, blocks of 16 tokens.
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK: usize = 16;

fn result(kernel: &'static str, shape: String, bytes: usize, ms: f64) -> ReshardBench {
    ReshardBench {
        kernel,
        shape,
        bytes,
        median_ms: ms,
        gbps: bytes as f64 / (ms * 1e-3) / 1e9,
    }
}

/// Times the four switch kernels, each reading `mib` MiB per call (and writing as much), `dtype`
/// KV, one warm-up and the median of `iters` calls. Errors (nothing launched) on a zero or oversized
/// request or a non-float dtype.
pub fn reshard_bench(
    dev: &CudaDev,
    dtype: DType,
    mib: usize,
    iters: usize,
) -> Result<Vec<ReshardBench>> {
    const W: &str = "reshard bench";
    if !dtype.is_float() {
        return Err(Error::Device(format!(
            "{W}: {} is not a float dtype",
            dtype.name()
        )));
    }
    if mib == 0 || mib > 64 << 10 {
        return Err(Error::Device(format!(
            "{W}: size {mib} MiB outside 1..=65536"
        )));
    }
    let bytes = mib << 20;
    let (free, _) = dev.mem_info()?;
    // The KV case holds the most: a cache of KV_HEADS heads of which one is read, staging (or
    // the one-head destination cache) and the destination of kv_copy.
    let need = (KV_HEADS + 2) * bytes;
    if need > free - free / 16 {
        return Err(Error::Device(format!(
            "{W}: {mib} MiB per case needs about {} MiB free, {} MiB are",
            need >> 20,
            free >> 20
        )));
    }
    let mut r = ChaCha8Rng::seed_from_u64(SEED);
    let mut out = Vec::new();

    // strided_copy: `rows` rows of 2 x ROW_BYTES, keep (read) the first half of each.
    let rows = (bytes / ROW_BYTES).max(1);
    let src = DBuf::filled(dev, DType::U8, rows * 2 * ROW_BYTES, 0x5A)?;
    let dst = DBuf::filled(dev, DType::U8, rows * ROW_BYTES, 0xA5)?;
    let s = Strided {
        rows,
        row_bytes: ROW_BYTES,
        dst_stride: ROW_BYTES,
        src_stride: 2 * ROW_BYTES,
    };
    let ms = median_ms(dev, iters, || {
        ops::strided_copy(dev, dst.view(), src.view(), s)
    })?;
    out.push(result(
        "strided_copy",
        format!("{rows} rows: keep {ROW_BYTES} of {} bytes", 2 * ROW_BYTES),
        2 * rows * ROW_BYTES,
        ms,
    ));
    drop((src, dst));

    // kv_gather / kv_scatter / kv_copy: one kv head of every block of an `nb`-block cache,
    // listed in shuffled order: the shape a switch gives them (a KV batch is one head of many
    // sequences' blocks, `reshard::kv::batch`). kv_copy moves it into another cache's head 0.
    let es = dtype.size();
    let head = KV_HEADS / 2;
    let chunk = 2 * BLOCK * HEAD_DIM * es; // K and V of one block's head
    let nb = (bytes / chunk).max(1);
    let elems = nb * KV_HEADS * BLOCK * HEAD_DIM;
    let k = DBuf::zeros(dev, dtype, elems)?;
    let v = DBuf::zeros(dev, dtype, elems)?;
    fill_random(dev, &k, &mut r)?;
    fill_random(dev, &v, &mut r)?;
    let staging = DBuf::zeros(dev, dtype, nb * chunk / es)?;
    let mut ids: Vec<i32> = (0..nb as i32).collect();
    shuffle(&mut r, &mut ids);
    let ids = DBuf::from_slice(dev, &ids)?;
    let cache = KvCacheView {
        k: k.view(),
        v: v.view(),
        num_blocks: nb,
        num_kv_heads: KV_HEADS,
        block_size: BLOCK,
        head_dim: HEAD_DIM,
    };
    let shape = format!(
        "{nb} blocks (shuffled), head {head} of {KV_HEADS} x {HEAD_DIM}, {BLOCK} tokens, {}",
        dtype.name()
    );
    let moved = 2 * nb * chunk; // read + written
    let ms = median_ms(dev, iters, || {
        ops::kv_gather(dev, &cache, staging.view(), ids.view(), head, 1)
    })?;
    out.push(result("kv_gather", shape.clone(), moved, ms));
    let ms = median_ms(dev, iters, || {
        ops::kv_scatter(dev, &cache, staging.view(), ids.view(), head, 1)
    })?;
    out.push(result("kv_scatter", shape.clone(), moved, ms));
    drop(staging);
    // The destination: a one-head cache (a rank's pool at tp = kv heads), its blocks in the
    // reverse of the source's shuffled order.
    let (k2, v2) = (
        DBuf::zeros(dev, dtype, nb * BLOCK * HEAD_DIM)?,
        DBuf::zeros(dev, dtype, nb * BLOCK * HEAD_DIM)?,
    );
    let ids2: Vec<i32> = (0..nb as i32).rev().collect();
    let ids2 = DBuf::from_slice(dev, &ids2)?;
    let dst = KvCacheView {
        k: k2.view(),
        v: v2.view(),
        num_kv_heads: 1,
        ..cache
    };
    let ms = median_ms(dev, iters, || {
        ops::kv_copy(dev, &cache, ids.view(), head, &dst, ids2.view(), 0, 1)
    })?;
    out.push(result("kv_copy", shape, moved, ms));
    Ok(out)
}
