//! CPU reference kernels: clear, exact, f32 accumulation. GEMMs go through `matrixmultiply`.
//! [`CpuOps`] puts them behind the backend interface the decoder runs on.

mod ops;

pub use ops::{CpuBatch, CpuOps};

use std::time::Instant;

use crate::kv::KvPool;

/// Up to this many rows of `x`, the GEMMs stream each weight row once (decode of a small live
/// batch: the long tail); above it, `matrixmultiply`'s packed GEMM is faster on this machine
/// (measured 2026-12-01, see benches/RESULTS.md).
pub const STREAM_MAX_ROWS: usize = 4;

/// `LANES` partial sums over `k`, then combined pairwise in a fixed order; the tail last. The
/// order depends on nothing but `k`, so results do not depend on threads or call sites.
const LANES: usize = 8;

#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Four dot products of `w` with rows `x0..x3` at once (each `w` chunk is loaded once).
#[inline(always)]
fn dot4(xs: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let mut acc = [[0f32; LANES]; 4];
    let k = w.len() - w.len() % LANES;
    for c in (0..k).step_by(LANES) {
        let wc = &w[c..c + LANES];
        for (a, x) in acc.iter_mut().zip(&xs) {
            let xc = &x[c..c + LANES];
            for l in 0..LANES {
                a[l] += xc[l] * wc[l];
            }
        }
    }
    let mut out = [0f32; 4];
    for ((o, a), x) in out.iter_mut().zip(&acc).zip(&xs) {
        *o = reduce(a);
        for t in k..w.len() {
            *o += x[t] * w[t];
        }
    }
    out
}

/// `out[n, m] = x[n, k] · w[m, k]ᵀ` for few rows: each weight row is read once, from memory, and
/// dotted with every row of `x` (which stays in cache), four rows at a time, then one by one.
#[inline(always)]
fn stream_nt_body(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    let row = |i: usize| &x[i * k..(i + 1) * k];
    for (j, wr) in w[..m * k].chunks_exact(k).enumerate() {
        let mut i = 0;
        while i + 4 <= n {
            let d = dot4([row(i), row(i + 1), row(i + 2), row(i + 3)], wr);
            for (t, v) in d.iter().enumerate() {
                out[(i + t) * m + j] = *v;
            }
            i += 4;
        }
        for i in i..n {
            out[i * m + j] = dot(row(i), wr);
        }
    }
}

/// One dot product, in the same order as each of [`dot4`]'s.
#[inline(always)]
fn dot(x: &[f32], w: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let k = w.len() - w.len() % LANES;
    for c in (0..k).step_by(LANES) {
        let (xc, wc) = (&x[c..c + LANES], &w[c..c + LANES]);
        for l in 0..LANES {
            acc[l] += xc[l] * wc[l];
        }
    }
    let mut o = reduce(&acc);
    for t in k..w.len() {
        o += x[t] * w[t];
    }
    o
}

/// `out[n, m] = x[n, k] · w[k, m]` for few rows: weight row `kk` is read once and added, scaled
/// by `x[i, kk]`, into every output row (which stay in cache). Each output sums over `kk` in order.
#[inline(always)]
fn stream_nn_body(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    out[..n * m].fill(0.0);
    for (kk, wr) in w[..k * m].chunks_exact(m).enumerate() {
        for i in 0..n {
            let a = x[i * k + kk];
            for (o, b) in out[i * m..(i + 1) * m].iter_mut().zip(wr) {
                *o += a * b;
            }
        }
    }
}

/// [`stream_nt_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 (checked by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_nt_avx2(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    stream_nt_body(out, x, w, n, k, m)
}

/// [`stream_nn_body`] compiled for AVX2.
///
/// # Safety
/// The CPU must support AVX2 (checked by the caller).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_nn_avx2(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    stream_nn_body(out, x, w, n, k, m)
}

fn stream_nt(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { stream_nt_avx2(out, x, w, n, k, m) };
    }
    stream_nt_body(out, x, w, n, k, m)
}

fn stream_nn(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is present (checked just above).
        return unsafe { stream_nn_avx2(out, x, w, n, k, m) };
    }
    stream_nn_body(out, x, w, n, k, m)
}

/// out[n, m] = x[n, k] · w[m, k]ᵀ (weights stored [out, in]).
pub fn matmul_nt(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        return out[..n * m].fill(0.0);
    }
    if n <= STREAM_MAX_ROWS {
        return stream_nt(out, x, w, n, k, m);
    }
    // SAFETY: the asserts above bound every index the strides reach: A is n×k row-major, B = wᵀ is
    // k×m read with row stride 1 and column stride k, C is n×m row-major; the slices do not alias.
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            m,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            m as isize,
            1,
        );
    }
}

/// out[n, m] = x[n, k] · w[k, m] (row-parallel weights stored [in, out]).
pub fn matmul_nn(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    assert!(x.len() >= n * k && w.len() >= k * m && out.len() >= n * m);
    if n == 0 || m == 0 {
        return;
    }
    if k == 0 {
        return out[..n * m].fill(0.0);
    }
    if n <= STREAM_MAX_ROWS {
        return stream_nn(out, x, w, n, k, m);
    }
    // SAFETY: as in `matmul_nt`, with B = w read row-major (row stride m, column stride 1).
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            m,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            m as isize,
            1,
            0.0,
            out.as_mut_ptr(),
            m as isize,
            1,
        );
    }
}

/// Row-wise RMSNorm: out = x / sqrt(mean(x²) + eps) * w, rows of length w.len().
pub fn rmsnorm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let d = w.len();
    for (o, r) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(r).zip(w) {
            *o = v * inv * w;
        }
    }
}

/// In-place RMSNorm of each head_dim-long row (Qwen3 per-head q/k norm).
pub fn rmsnorm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for r in x.chunks_exact_mut(d) {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, w) in r.iter_mut().zip(w) {
            *v = *v * inv * w;
        }
    }
}

/// RoPE with the half-rotation convention on x[n, heads, head_dim] at `positions[n]`.
pub fn rope(x: &mut [f32], heads: usize, positions: &[usize], inv_freq: &[f32]) {
    let half = inv_freq.len();
    let hd = 2 * half;
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let row = &mut x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
            for (i, f) in inv_freq.iter().enumerate() {
                let a = p as f32 * f;
                let (sin, cos) = a.sin_cos();
                let (x1, x2) = (row[i], row[i + half]);
                row[i] = x1 * cos - x2 * sin;
                row[i + half] = x2 * cos + x1 * sin;
            }
        }
    }
}

/// out[n, i] = silu(gu[n, i]) * gu[n, inter + i], gu rows laid out [gate | up].
pub fn silu_mul(out: &mut [f32], gu: &[f32], inter: usize) {
    for (o, r) in out.chunks_exact_mut(inter).zip(gu.chunks_exact(2 * inter)) {
        let (g, u) = r.split_at(inter);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// One sequence's share of an attention call.
pub struct AttnSeq<'a> {
    /// First row of this sequence in q/out.
    pub row: usize,
    /// New tokens (rows) of this sequence.
    pub len: usize,
    /// Position of the first new token; tokens before it are already in the cache.
    pub start_pos: usize,
    pub table: &'a [u32],
}

/// Causal attention over the paged cache (prefill and decode alike): token i of a sequence at
/// position p attends to cached positions 0..=p. q/out: [n, q_heads, head_dim]; GQA by head groups.
pub fn paged_attention(
    out: &mut [f32],
    q: &[f32],
    pool: &KvPool,
    layer: usize,
    seqs: &[AttnSeq],
    q_heads: usize,
    scale: f32,
) {
    let (hd, bs) = (pool.head_dim, pool.block_size);
    let group = q_heads / pool.kv_heads;
    let (kc, vc) = (&pool.k[layer], &pool.v[layer]);
    let mut scores = Vec::new();
    for s in seqs {
        for i in 0..s.len {
            let ctx = s.start_pos + i + 1;
            for h in 0..q_heads {
                let kvh = h / group;
                let qr = &q[((s.row + i) * q_heads + h) * hd..][..hd];
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for p in 0..ctx {
                    let o = pool.offset(s.table[p / bs] as usize, kvh, p % bs);
                    let dot: f32 = qr
                        .iter()
                        .zip(&kc[o..o + hd])
                        .map(|(a, b)| a * b)
                        .sum::<f32>()
                        * scale;
                    max = max.max(dot);
                    scores.push(dot);
                }
                let mut denom = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    denom += *sc;
                }
                let or = &mut out[((s.row + i) * q_heads + h) * hd..][..hd];
                or.fill(0.0);
                for (p, sc) in scores.iter().enumerate() {
                    let o = pool.offset(s.table[p / bs] as usize, kvh, p % bs);
                    let wgt = sc / denom;
                    for (a, b) in or.iter_mut().zip(&vc[o..o + hd]) {
                        *a += wgt * b;
                    }
                }
            }
        }
    }
}

/// Measured host-memory copy bandwidth in bytes/s (read + written), with `threads` threads
/// copying 64 MiB each at once (far beyond any cache): the roofline's and the cost model's limit.
pub fn copy_bandwidth(threads: usize) -> f64 {
    let n = 16 << 20; // 64 MiB of f32 per thread: far beyond any cache
    let t = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.max(1))
            .map(|_| {
                s.spawn(move || {
                    let src = vec![1f32; n];
                    let mut dst = vec![0f32; n];
                    dst.copy_from_slice(&src); // first touch
                    let t0 = Instant::now();
                    for _ in 0..3 {
                        dst.copy_from_slice(&src);
                        std::hint::black_box(&mut dst);
                    }
                    t0.elapsed().as_secs_f64() / 3.0
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    });
    (threads.max(1) * n * 4 * 2) as f64 / t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemms_match_naive_loops() {
        let (n, k, m) = (3, 5, 4);
        let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut a = vec![0.0; n * m];
        matmul_nt(&mut a, &x, &w, n, k, m);
        let mut b = vec![0.0; n * m];
        let wt: Vec<f32> = (0..k * m).map(|i| w[(i % m) * k + i / m]).collect(); // [k, m]
        matmul_nn(&mut b, &x, &wt, n, k, m);
        for i in 0..n {
            for j in 0..m {
                let r: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                assert!((a[i * m + j] - r).abs() < 1e-5 && (b[i * m + j] - r).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn streaming_and_packed_gemms_match_an_f64_reference() {
        // Row counts on both sides of STREAM_MAX_ROWS; k and m not multiples of the 8 lanes.
        for (n, k, m) in [
            (1, 37, 19),
            (7, 64, 33),
            (32, 13, 5),
            (33, 29, 11),
            (48, 8, 3),
            (2, 0, 4),
        ] {
            let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
            let wt: Vec<f32> = (0..k * m).map(|i| w[(i % m) * k + i / m]).collect();
            let (mut a, mut b) = (vec![f32::NAN; n * m], vec![f32::NAN; n * m]);
            matmul_nt(&mut a, &x, &w, n, k, m);
            matmul_nn(&mut b, &x, &wt, n, k, m);
            for i in 0..n {
                for j in 0..m {
                    let r: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    let (ea, eb) = (
                        (a[i * m + j] as f64 - r).abs(),
                        (b[i * m + j] as f64 - r).abs(),
                    );
                    assert!(
                        ea < 1e-4 && eb < 1e-4,
                        "{n}x{k}x{m} at ({i},{j}): {ea} {eb}"
                    );
                }
            }
        }
    }

    #[test]
    fn rope_rotates_pairs_by_position() {
        let mut x = vec![1.0, 0.0, 0.0, 1.0]; // one head, head_dim 4: pairs (0,2) and (1,3)
        rope(&mut x, 1, &[2], &[0.5, 0.25]);
        let (a, b) = (1.0f32, 0.5f32);
        assert!((x[0] - a.cos()).abs() < 1e-6 && (x[2] - a.sin()).abs() < 1e-6);
        assert!((x[1] + b.sin()).abs() < 1e-6 && (x[3] - b.cos()).abs() < 1e-6);
    }

    #[test]
    fn attention_with_one_position_returns_its_value() {
        let mut pool = KvPool::new(1, 1, 4, 1, 2).unwrap();
        pool.append(0, &[1.0, 2.0], &[5.0, -3.0], &[0]);
        let q = vec![0.3, 0.1, -2.0, 4.0]; // two q heads sharing one kv head
        let mut out = vec![0.0; 4];
        let s = [AttnSeq {
            row: 0,
            len: 1,
            start_pos: 0,
            table: &[0],
        }];
        paged_attention(&mut out, &q, &pool, 0, &s, 2, 0.7);
        assert_eq!(out, vec![5.0, -3.0, 5.0, -3.0]);
    }
}
