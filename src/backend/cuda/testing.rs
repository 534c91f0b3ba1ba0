//! Helpers for GPU tests and checks: open a device or skip visibly, seeded random inputs, dtype
//! rounding on the host, tolerance comparisons that name the first bad element, a random paged
//! cache with its `KvPool` oracle, and host references for argmax and the sampler.

use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::buffer::{DBuf, DType};
use super::device::CudaDev;
use super::ops::KvCacheView;
use crate::error::{Error, Result};
use crate::kv::{blocks_for, KvPool};

/// True when `PAT_REQUIRE_GPU=1`: a missing GPU is then a failure, not a skip.
pub fn gpu_required() -> bool {
    std::env::var("PAT_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

/// Opens device 0 for test `test`. Without a usable GPU: prints `SKIP: <test>: <reason>` and
/// returns `Ok(None)`, or returns the error when `PAT_REQUIRE_GPU=1` (so a GPU run cannot pass by
/// skipping).
pub fn device_or_skip(test: &str) -> Result<Option<CudaDev>> {
    match CudaDev::new(0) {
        Ok(d) => Ok(Some(d)),
        Err(e) if gpu_required() => Err(Error::Device(format!(
            "{test}: PAT_REQUIRE_GPU=1 but no usable GPU: {e}"
        ))),
        Err(e) => {
            skip_notice(test, &e.to_string());
            Ok(None)
        }
    }
}

/// Prints `SKIP: <test>: <reason>` straight to the process's stderr. Not `eprintln!`: the test
/// harness captures that and shows it only for failing tests, and a skip must be visible.
pub fn skip_notice(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIP: {test}: {reason}");
}

/// `v` rounded to `dtype` and widened back (what the device sees after an f32 upload).
pub fn round_to(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::Bf16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        DType::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        _ => v.to_vec(),
    }
}

/// Elementwise `|got - want| <= tol * (1 + |want|)` (abs + rel); NaN or a length mismatch fails.
/// The error names the first bad index, both values and the worst error seen.
pub fn check_close(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: f32,
) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut first = None;
    let mut worst = 0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / (1.0 + w.abs());
        let within = err <= tol || g == w; // NaN is never within
        if !within && first.is_none() {
            first = Some((i, g, w));
        }
        if err.is_finite() {
            worst = worst.max(err);
        }
    }
    match first {
        None => Ok(()),
        Some((i, g, w)) => Err(format!(
            "{what}: element {i} is {g}, expected {w} (tolerance {tol:e}, worst error {worst:e})"
        )),
    }
}

/// Bitwise equality of two f32 slices (NaN payloads included), naming the first difference.
pub fn check_bitwise(what: &str, got: &[f32], want: &[f32]) -> std::result::Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    match got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
    {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: element {i} is {}, expected {} (bitwise)",
            got[i], want[i]
        )),
    }
}

/// A seeded RNG for a test: `PAT_SEED` if set, else the clock; prints the seed so a failure can
/// be replayed with `PAT_SEED=<seed>`.
pub fn seeded_rng(test: &str) -> ChaCha8Rng {
    let seed = std::env::var("PAT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (PAT_SEED={seed} replays it)");
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` uniform values in (-scale, scale).
pub fn rand_vec(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

/// Fisher-Yates shuffle.
pub fn shuffle<T>(r: &mut ChaCha8Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, r.random_range(0..=i));
    }
}

/// Picks the tolerance for `dt` from (f32, bf16, f16).
pub fn tol_for(dt: DType, t: (f32, f32, f32)) -> f32 {
    match dt {
        DType::F32 => t.0,
        DType::Bf16 => t.1,
        _ => t.2,
    }
}

/// Uploads `v` as `dt`; returns the buffer and the values the device holds (rounded).
pub fn upload(dev: &CudaDev, v: &[f32], dt: DType) -> Result<(DBuf, Vec<f32>)> {
    Ok((DBuf::from_f32(dev, v, dt)?, round_to(v, dt)))
}

/// A random one-layer paged cache (device copy and the host `KvPool` oracle holding the same
/// rounded values) with shuffled block tables for sequences of the given context lengths.
pub struct RandomCache {
    pub pool: KvPool,
    pub k: DBuf,
    pub v: DBuf,
    pub tables: Vec<Vec<u32>>,
}

impl RandomCache {
    /// Blocks for every context plus 3 spare, ids shuffled, values uniform in (-1, 1).
    pub fn new(
        dev: &CudaDev,
        r: &mut ChaCha8Rng,
        dt: DType,
        (kv_heads, head_dim, block_size): (usize, usize, usize),
        contexts: &[usize],
    ) -> Result<Self> {
        let nb = contexts
            .iter()
            .map(|&c| blocks_for(c, block_size))
            .sum::<usize>()
            + 3;
        let mut ids: Vec<u32> = (0..nb as u32).collect();
        shuffle(r, &mut ids);
        let mut next = ids.into_iter();
        let tables = contexts
            .iter()
            .map(|&c| next.by_ref().take(blocks_for(c, block_size)).collect())
            .collect();
        let mut pool = KvPool::new(1, nb, block_size, kv_heads, head_dim)?;
        let n = nb * kv_heads * block_size * head_dim;
        let (k, kv) = upload(dev, &rand_vec(r, n, 1.0), dt)?;
        let (v, vv) = upload(dev, &rand_vec(r, n, 1.0), dt)?;
        (pool.k[0], pool.v[0]) = (kv, vv);
        Ok(RandomCache { pool, k, v, tables })
    }

    pub fn view(&self) -> KvCacheView<'_> {
        KvCacheView {
            k: self.k.view(),
            v: self.v.view(),
            num_blocks: self.pool.num_blocks,
            num_kv_heads: self.pool.kv_heads,
            block_size: self.pool.block_size,
            head_dim: self.pool.head_dim,
        }
    }

    /// The block tables as the kernels take them: i32 [sequences, max blocks] (zero padded) on
    /// the device, and the max blocks per sequence.
    pub fn device_tables(&self, dev: &CudaDev) -> Result<(DBuf, usize)> {
        let mb = self.tables.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut t = vec![0i32; self.tables.len() * mb];
        for (s, tab) in self.tables.iter().enumerate() {
            for (j, &b) in tab.iter().enumerate() {
                t[s * mb + j] = b as i32;
            }
        }
        Ok((DBuf::from_slice(dev, &t)?, mb))
    }
}

/// Host argmax as the kernels define it: NaN counts as -inf, ties go to the lowest index.
/// Returns (index, value).
pub fn host_argmax(row: &[f32]) -> (u32, f32) {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
        if v > best.1 {
            best = (i as u32, v);
        }
    }
    best
}

/// The distribution `sample_<dt>` draws from, in f64: softmax(x / temperature); keep the values
/// at least as large as the top_k-th largest (ties kept); then keep the fewest largest values
/// whose mass reaches top_p of what is left (ties kept); renormalise. `top_k` 0 and `top_p` of 1
/// or more disable the cuts.
pub fn host_sample_probs(x: &[f32], temperature: f32, top_k: usize, top_p: f32) -> Vec<f64> {
    let mx = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = x
        .iter()
        .map(|&v| (((v - mx) / temperature) as f64).exp())
        .collect();
    let mut sorted: Vec<f32> = x.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut floor = f32::NEG_INFINITY;
    if top_k > 0 && top_k < x.len() {
        floor = sorted[top_k - 1];
    }
    let mass = |pred: &dyn Fn(f32) -> bool| -> f64 {
        x.iter()
            .zip(&w)
            .filter(|(v, _)| pred(**v))
            .map(|(_, w)| w)
            .sum()
    };
    if top_p < 1.0 {
        let z = mass(&|v| v >= floor);
        let (mut acc, mut prev) = (0.0, None);
        for &s in sorted.iter().filter(|&&s| s >= floor) {
            if prev == Some(s) {
                continue;
            }
            prev = Some(s);
            acc += mass(&|v| v == s);
            if acc >= top_p as f64 * z {
                floor = floor.max(s);
                break;
            }
        }
    }
    let z = mass(&|v| v >= floor);
    x.iter()
        .zip(&w)
        .map(|(&v, &w)| if v >= floor { w / z } else { 0.0 })
        .collect()
}
