//! CPU reference kernels: clear, exact, f32 accumulation. The GEMMs are in `gemm` (streaming
//! kernels for decode, `matrixmultiply` for prefill, columns split over a rank's threads).
//! [`CpuOps`] puts them behind the backend interface the decoder runs on.

mod gemm;
mod ops;

pub use gemm::{cpu_threads, matmul_nn, matmul_nt, pack_bytes_bound, Gemm, STREAM_MAX_ROWS};
pub use ops::{CpuBatch, CpuOps};

use std::time::Instant;

use crate::kv::KvPool;

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

/// `q · k` over 8 partial sums (vectorizable; no dependency chain through every element),
/// combined pairwise, the tail last.
#[inline(always)]
fn dot8(q: &[f32], k: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (qc, kc) = (q.chunks_exact(8), k.chunks_exact(8));
    let (qt, kt) = (qc.remainder(), kc.remainder());
    for (a, b) in qc.zip(kc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut o = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (a, b) in qt.iter().zip(kt) {
        o += a * b;
    }
    o
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
    attend(out, 0, q, pool, layer, seqs, q_heads, scale)
}

/// [`paged_attention`] with the sequences split over `gemm`'s threads (contiguous groups of
/// about equal work, each writing only its own rows of `out`). Each sequence's result is the same
/// as on one thread.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_on(
    gemm: Gemm,
    out: &mut [f32],
    q: &[f32],
    pool: &KvPool,
    layer: usize,
    seqs: &[AttnSeq],
    q_heads: usize,
    scale: f32,
) {
    let ordered = seqs.windows(2).all(|w| w[0].row + w[0].len <= w[1].row);
    let parts = gemm.threads.min(seqs.len());
    if parts < 2 || !ordered {
        return paged_attention(out, q, pool, layer, seqs, q_heads, scale);
    }
    let row_len = q_heads * pool.head_dim;
    let work: Vec<usize> = seqs.iter().map(|s| s.len * (s.start_pos + s.len)).collect();
    let total: usize = work.iter().sum();
    // Contiguous groups: a group ends once the work so far reaches its share of the total.
    let mut groups = Vec::with_capacity(parts);
    let (mut lo, mut acc) = (0, 0);
    for (i, w) in work.iter().enumerate() {
        acc += w;
        if acc * parts >= total * (groups.len() + 1) || i + 1 == seqs.len() {
            groups.push(&seqs[lo..=i]);
            lo = i + 1;
        }
    }
    let mut rest = out;
    let mut at = 0; // first row of `rest`
    let mut items = Vec::with_capacity(groups.len());
    for g in groups {
        let (first, last) = (g[0].row, g[g.len() - 1].row + g[g.len() - 1].len);
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((first - at) * row_len);
        let (mine, tail) = tail.split_at_mut((last - first) * row_len);
        items.push((mine, first, g));
        (rest, at) = (tail, last);
    }
    gemm.each(items, |(o, base, g)| {
        attend(o, base, q, pool, layer, g, q_heads, scale)
    });
}

/// The most host bytes the attention's scores hold at once while `ranks` rank threads compute:
/// one kv head's query group over the longest context the model holds, per rank thread and per
/// helper of the shared pool (each runs one `attend` at a time).
pub fn attention_scratch_bound(cfg: &crate::model::config::ModelConfig, ranks: usize) -> u64 {
    let group = (cfg.num_heads / cfg.num_kv_heads.max(1)) as u64;
    let per = 4 * group * cfg.max_position_embeddings as u64;
    (ranks + cpu_threads().saturating_sub(1)) as u64 * per
}

/// The attention of `seqs`, whose rows start at `base` in `out`.
#[allow(clippy::too_many_arguments)]
fn attend(
    out: &mut [f32],
    base: usize,
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
    // Per kv head, its `group` query heads together: each cached K and V row is read once for
    // all of them, block by block (a block's rows of one head are contiguous).
    let mut scores = Vec::new();
    for s in seqs {
        for i in 0..s.len {
            let ctx = s.start_pos + i + 1;
            let row = s.row + i;
            for kvh in 0..pool.kv_heads {
                let h0 = kvh * group;
                scores.clear();
                scores.resize(group * ctx, 0f32);
                for (b, &blk) in s.table[..ctx.div_ceil(bs)].iter().enumerate() {
                    let kbase = pool.offset(blk as usize, kvh, 0);
                    for off in 0..bs.min(ctx - b * bs) {
                        let kr = &kc[kbase + off * hd..][..hd];
                        for g in 0..group {
                            let qr = &q[(row * q_heads + h0 + g) * hd..][..hd];
                            scores[g * ctx + b * bs + off] = dot8(qr, kr) * scale;
                        }
                    }
                }
                for (g, sc) in scores.chunks_exact_mut(ctx).enumerate() {
                    let max = sc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let mut denom = 0.0;
                    for v in sc.iter_mut() {
                        *v = (*v - max).exp();
                        denom += *v;
                    }
                    for v in sc.iter_mut() {
                        *v /= denom;
                    }
                    out[((row - base) * q_heads + h0 + g) * hd..][..hd].fill(0.0);
                }
                for (b, &blk) in s.table[..ctx.div_ceil(bs)].iter().enumerate() {
                    let vbase = pool.offset(blk as usize, kvh, 0);
                    for off in 0..bs.min(ctx - b * bs) {
                        let vr = &vc[vbase + off * hd..][..hd];
                        for g in 0..group {
                            let wgt = scores[g * ctx + b * bs + off];
                            let or = &mut out[((row - base) * q_heads + h0 + g) * hd..][..hd];
                            for (a, v) in or.iter_mut().zip(vr) {
                                *a += wgt * v;
                            }
                        }
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

/// Measured host-memory read bandwidth in bytes/s: `threads` threads each summing their own
/// buffer at once (1 GiB in all, beyond any cache; at least 32 MiB each), the best of 3 passes. Decode streams weights, reading only,
/// so this is its limit; a copy's read side ([`copy_bandwidth`] / 2) is lower.
pub fn read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let n = ((256 << 20) / threads).max(8 << 20); // f32 elements per thread
    let t = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let src = vec![1f32; n];
                    (0..3)
                        .map(|_| {
                            let t0 = Instant::now();
                            let mut acc = [0f32; 16];
                            for c in src.chunks_exact(16) {
                                for (a, v) in acc.iter_mut().zip(c) {
                                    *a += v;
                                }
                            }
                            std::hint::black_box(acc);
                            t0.elapsed().as_secs_f64()
                        })
                        .fold(f64::INFINITY, f64::min)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or(f64::INFINITY))
            .fold(0.0, f64::max)
    });
    (threads * n * 4) as f64 / t
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

    #[test]
    fn attention_split_over_threads_equals_one_thread_and_an_f64_reference() {
        // 4 sequences of different lengths (decode rows and a 3-token prefill chunk), GQA 2:1,
        // block size 4, shuffled block tables.
        let (kvh, hd, bs, qh) = (2, 8, 4, 4);
        let mut pool = KvPool::new(1, 32, bs, kvh, hd).unwrap();
        let ctxs = [9usize, 3, 14, 6];
        let mut tables = Vec::new();
        let mut next = 31u32;
        for &c in &ctxs {
            let t: Vec<u32> = (0..c.div_ceil(bs))
                .map(|_| {
                    next -= 1;
                    next
                })
                .collect();
            for p in 0..c {
                let slot = t[p / bs] as usize * bs + p % bs;
                let kv: Vec<f32> = (0..kvh * hd)
                    .map(|e| ((p * 7 + e + c) as f32).sin())
                    .collect();
                let vv: Vec<f32> = (0..kvh * hd).map(|e| ((p * 3 + e) as f32).cos()).collect();
                pool.append(0, &kv, &vv, &[slot]);
            }
            tables.push(t);
        }
        // Sequence 1 prefills its last 3 tokens; the others decode their last one.
        let lens = [1usize, 3, 1, 1];
        let mut seqs = Vec::new();
        let mut row = 0;
        for (i, t) in tables.iter().enumerate() {
            seqs.push(AttnSeq {
                row,
                len: lens[i],
                start_pos: ctxs[i] - lens[i],
                table: t,
            });
            row += lens[i];
        }
        let q: Vec<f32> = (0..row * qh * hd)
            .map(|e| (e as f32 * 0.37).sin())
            .collect();
        let mut one = vec![f32::NAN; row * qh * hd];
        paged_attention(&mut one, &q, &pool, 0, &seqs, qh, 0.3);
        for threads in [2, 3, 4] {
            let mut split = vec![f32::NAN; row * qh * hd];
            let g = Gemm {
                threads,
                ..Gemm::default()
            };
            paged_attention_on(g, &mut split, &q, &pool, 0, &seqs, qh, 0.3);
            assert_eq!(split, one, "{threads} threads");
        }
        // f64 reference: softmax over positions 0..=p of q·k · scale, weights on v.
        for s in &seqs {
            for i in 0..s.len {
                let p = s.start_pos + i;
                for h in 0..qh {
                    let kv = h / (qh / kvh);
                    let qr = &q[((s.row + i) * qh + h) * hd..][..hd];
                    let at = |c: &Vec<f32>, pos: usize| {
                        let o = pool.offset(s.table[pos / bs] as usize, kv, pos % bs);
                        c[o..o + hd].to_vec()
                    };
                    let sc: Vec<f64> = (0..=p)
                        .map(|pos| {
                            let kr = at(&pool.k[0], pos);
                            qr.iter()
                                .zip(&kr)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                * 0.3
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let den: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                    for d in 0..hd {
                        let want: f64 = (0..=p)
                            .map(|pos| (sc[pos] - mx).exp() / den * at(&pool.v[0], pos)[d] as f64)
                            .sum();
                        let got = one[((s.row + i) * qh + h) * hd + d] as f64;
                        assert!(
                            (got - want).abs() < 1e-5,
                            "row {} head {h} dim {d}",
                            s.row + i
                        );
                    }
                }
            }
        }
    }
}
