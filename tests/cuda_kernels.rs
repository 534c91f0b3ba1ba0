//! Every CUDA kernel against the CPU oracle (src/backend/cpu.rs, kv::KvPool) or a plain host
//! reference: fresh random inputs (the seed is printed; PAT_SEED=<n> replays it), ragged shapes,
//! outputs poisoned with NaN before each launch, tolerances by dtype. Without a GPU every test
//! prints `SKIP: ...` and passes, unless PAT_REQUIRE_GPU=1 (then it fails).
#![cfg(feature = "cuda")]

use pat::backend::cpu::{self, AttnSeq};
use pat::backend::cuda::ops::{self, Heads, KvCacheView, Rows, SampleCfg, SeqMeta, Strided};
use pat::backend::cuda::testing::{
    check_bitwise, check_close, device_or_skip, gpu_required, host_argmax, host_sample_probs,
    rand_vec, round_to, seeded_rng, shuffle, skip_notice, tol_for, upload, RandomCache,
};
use pat::backend::cuda::{kernel_files, probe, CudaDev, DBuf, DType};
use pat::kv::KvPool;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const FLOATS: [DType; 3] = [DType::F32, DType::Bf16, DType::F16];
/// Tolerances (abs + rel) for (f32, bf16, f16), from the kernel headers.
const ELEMENTWISE: (f32, f32, f32) = (1e-5, 1e-2, 2e-3);
const ATTENTION: (f32, f32, f32) = (2e-5, 2e-2, 3e-3);
const GEMM: (f32, f32, f32) = (1e-4, 2e-2, 4e-3);

macro_rules! gpu {
    ($test:expr) => {
        match device_or_skip($test).unwrap_or_else(|e| panic!("{e}")) {
            Some(d) => d,
            None => return,
        }
    };
}

fn rng(test: &str) -> ChaCha8Rng {
    seeded_rng(test)
}

fn tol(dt: DType, t: (f32, f32, f32)) -> f32 {
    tol_for(dt, t)
}

/// Uploads `v` as `dt`; returns the buffer and the values the device holds.
fn up(d: &CudaDev, v: &[f32], dt: DType) -> (DBuf, Vec<f32>) {
    upload(d, v, dt).unwrap()
}

/// `n` elements of 0xFF bytes: NaN in every float dtype.
fn poisoned(d: &CudaDev, dt: DType, n: usize) -> DBuf {
    DBuf::filled(d, dt, n, 0xFF).unwrap()
}

fn host(d: &CudaDev, b: &DBuf) -> Vec<f32> {
    b.to_f32(d).unwrap()
}

fn ok(r: Result<(), String>) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

fn heads(b: &DBuf, offset: usize, heads: usize, head_dim: usize, stride: usize) -> Heads<'_> {
    Heads {
        data: b.view().at(offset).unwrap(),
        heads,
        head_dim,
        token_stride: stride,
    }
}

#[test]
fn probe_returns_a_value_never_panics() {
    match probe() {
        Ok(n) => assert!(n >= 1),
        Err(e) => {
            let msg = e.to_string();
            let known = ["no CUDA driver found", "no CUDA device", "cuBLAS", "cuInit"];
            assert!(known.iter().any(|k| msg.contains(k)), "{msg}");
            assert!(!gpu_required(), "PAT_REQUIRE_GPU=1 but {msg}");
            skip_notice("probe", &msg);
        }
    }
}

#[test]
fn every_kernel_symbol_resolves() {
    let d = gpu!("every_kernel_symbol_resolves");
    eprintln!(
        "device: {} ({} SMs), kernels: {:?}",
        d.name(),
        d.num_sms(),
        kernel_files()
    );
    for s in ["f32", "bf16", "f16"] {
        for f in [
            "embedding",
            "rmsnorm",
            "fused_add_rmsnorm",
            "qk_norm",
            "rope",
            "silu_and_mul",
            "kv_append",
            "paged_attention_reduce",
            "argmax",
            "sample",
            "all_reduce_sum",
        ] {
            d.check_kernel(&format!("{f}_{s}")).unwrap();
        }
        for hd in [64, 128, 256] {
            d.check_kernel(&format!("paged_attention_{s}_hd{hd}"))
                .unwrap();
            d.check_kernel(&format!("prefill_attention_{s}_hd{hd}"))
                .unwrap();
        }
    }
    for f in ["strided_copy", "kv_gather", "kv_scatter"] {
        d.check_kernel(f).unwrap();
    }
    assert!(d.check_kernel("no_such_kernel").is_err());
}

#[test]
fn embedding_copies_the_shard_rows_and_zeros_the_rest() {
    let d = gpu!("embedding");
    let mut r = rng("embedding");
    let (vl, start) = (37usize, 50usize);
    for dt in FLOATS {
        for hidden in [64, 100, 4096] {
            let (table, tv) = up(&d, &rand_vec(&mut r, vl * hidden, 1.0), dt);
            let mut ids: Vec<u32> = vec![0, 49, 50, 86, 87, 1000];
            ids.extend((0..17).map(|_| r.random_range(0..150u32)));
            let idb = DBuf::from_slice(&d, &ids).unwrap();
            let out = poisoned(&d, dt, ids.len() * hidden);
            ops::embedding(&d, out.view(), idb.view(), table.view(), hidden, start).unwrap();
            let mut want = vec![0f32; ids.len() * hidden];
            for (t, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if (start..start + vl).contains(&id) {
                    let row = &tv[(id - start) * hidden..][..hidden];
                    want[t * hidden..][..hidden].copy_from_slice(row);
                }
            }
            ok(check_bitwise(
                &format!("embedding {dt:?} h{hidden}"),
                &host(&d, &out),
                &want,
            ));
        }
    }
}

#[test]
fn rmsnorm_and_fused_add_match_the_oracle() {
    let d = gpu!("rmsnorm");
    let mut r = rng("rmsnorm");
    let eps = 1e-5;
    for dt in FLOATS {
        let t = tol(dt, ELEMENTWISE);
        for (rows, dim) in [(1, 64), (7, 128), (64, 4096), (7, 4100), (3, 100)] {
            let what = format!("{dt:?} {rows}x{dim}");
            let (x, xv) = up(&d, &rand_vec(&mut r, rows * dim, 2.0), dt);
            let wv: Vec<f32> = rand_vec(&mut r, dim, 0.2).iter().map(|v| 1.0 + v).collect();
            let (w, wv) = up(&d, &wv, dt);
            let out = poisoned(&d, dt, rows * dim);
            ops::rmsnorm(&d, out.view(), x.view(), w.view(), rows, eps).unwrap();
            let mut want = vec![0f32; rows * dim];
            cpu::rmsnorm(&mut want, &xv, &wv, eps);
            ok(check_close(
                &format!("rmsnorm {what}"),
                &host(&d, &out),
                &want,
                t,
            ));

            let (res, rv) = up(&d, &rand_vec(&mut r, rows * dim, 2.0), dt);
            let out = poisoned(&d, dt, rows * dim);
            ops::fused_add_rmsnorm(&d, out.view(), x.view(), res.view(), w.view(), rows, eps)
                .unwrap();
            let sum: Vec<f32> = xv.iter().zip(&rv).map(|(a, b)| a + b).collect();
            let sum = round_to(&sum, dt);
            ok(check_bitwise(
                &format!("fused residual {what}"),
                &host(&d, &res),
                &sum,
            ));
            cpu::rmsnorm(&mut want, &sum, &wv, eps);
            ok(check_close(
                &format!("fused out {what}"),
                &host(&d, &out),
                &want,
                t,
            ));

            ops::rmsnorm(&d, x.view(), x.view(), w.view(), rows, eps).unwrap(); // in place
            cpu::rmsnorm(&mut want, &xv, &wv, eps);
            ok(check_close(
                &format!("rmsnorm in place {what}"),
                &host(&d, &x),
                &want,
                t,
            ));
        }
    }
}

/// Random fused [q | k | v] rows: (buffer, device values, token stride).
fn fused_qkv(
    d: &CudaDev,
    r: &mut ChaCha8Rng,
    n: usize,
    hq: usize,
    hkv: usize,
    hd: usize,
    dt: DType,
) -> (DBuf, Vec<f32>, usize) {
    let stride = (hq + 2 * hkv) * hd;
    let (b, v) = up(d, &rand_vec(r, n * stride, 2.0), dt);
    (b, v, stride)
}

#[test]
fn qk_norm_normalises_q_and_k_heads_in_place() {
    let d = gpu!("qk_norm");
    let mut r = rng("qk_norm");
    let (n, eps) = (5, 1e-6);
    for dt in FLOATS {
        for (hq, hkv, hd) in [(1, 1, 64), (8, 2, 128), (4, 4, 256), (6, 3, 80), (8, 1, 16)] {
            let (qkv, vals, stride) = fused_qkv(&d, &mut r, n, hq, hkv, hd, dt);
            let (qw, qwv) = up(&d, &rand_vec(&mut r, hd, 1.5), dt);
            let (kw, kwv) = up(&d, &rand_vec(&mut r, hd, 1.5), dt);
            let (q, k) = (
                heads(&qkv, 0, hq, hd, stride),
                heads(&qkv, hq * hd, hkv, hd, stride),
            );
            ops::qk_norm(&d, q, k, qw.view(), kw.view(), n, eps).unwrap();
            let mut want = vals.clone();
            for row in want.chunks_exact_mut(stride) {
                cpu::rmsnorm_inplace(&mut row[..hq * hd], &qwv, eps);
                cpu::rmsnorm_inplace(&mut row[hq * hd..(hq + hkv) * hd], &kwv, eps);
            }
            let what = format!("qk_norm {dt:?} {hq}/{hkv}x{hd}");
            ok(check_close(
                &what,
                &host(&d, &qkv),
                &want,
                tol(dt, ELEMENTWISE),
            ));
        }
    }
}

#[test]
fn rope_matches_the_oracle_at_large_positions() {
    let d = gpu!("rope");
    let mut r = rng("rope");
    let pos = [0usize, 1, 17, 8191, 32767, 5];
    let pos_i32: Vec<i32> = pos.iter().map(|&p| p as i32).collect();
    let pb = DBuf::from_slice(&d, &pos_i32).unwrap();
    let n = pos.len();
    for dt in FLOATS {
        for (hq, hkv, hd) in [(2, 1, 64), (8, 2, 128), (1, 1, 8), (4, 2, 256)] {
            for scaled in [false, true] {
                let inv: Vec<f32> = (0..hd / 2)
                    .map(|i| {
                        let f = 1.0 / 1e6f64.powf(2.0 * i as f64 / hd as f64);
                        (if scaled && i >= hd / 4 { f / 8.0 } else { f }) as f32
                    })
                    .collect();
                let ib = DBuf::from_slice(&d, &inv).unwrap();
                let (qkv, vals, stride) = fused_qkv(&d, &mut r, n, hq, hkv, hd, dt);
                let (q, k) = (
                    heads(&qkv, 0, hq, hd, stride),
                    heads(&qkv, hq * hd, hkv, hd, stride),
                );
                ops::rope(&d, q, k, pb.view(), ib.view(), n).unwrap();
                let mut want = vals.clone();
                for (lo, h) in [(0, hq), (hq * hd, hkv)] {
                    let mut x: Vec<f32> = vals
                        .chunks_exact(stride)
                        .flat_map(|row| row[lo..lo + h * hd].to_vec())
                        .collect();
                    cpu::rope(&mut x, h, &pos, &inv);
                    for (t, row) in want.chunks_exact_mut(stride).enumerate() {
                        row[lo..lo + h * hd].copy_from_slice(&x[t * h * hd..][..h * hd]);
                    }
                }
                let what = format!("rope {dt:?} {hq}/{hkv}x{hd} scaled={scaled}");
                ok(check_close(
                    &what,
                    &host(&d, &qkv),
                    &want,
                    tol(dt, ELEMENTWISE),
                ));
            }
        }
    }
}

#[test]
fn silu_mul_matches_the_oracle() {
    let d = gpu!("silu_mul");
    let mut r = rng("silu_mul");
    for dt in FLOATS {
        for (rows, inter) in [(1, 8), (5, 1792), (128, 1793), (3, 7)] {
            let mut v = rand_vec(&mut r, rows * 2 * inter, 4.0);
            for i in (0..v.len()).step_by(97) {
                v[i] = if i % 2 == 0 { 25.0 } else { -25.0 };
            }
            let (input, iv) = up(&d, &v, dt);
            let out = poisoned(&d, dt, rows * inter);
            ops::silu_mul(&d, out.view(), input.view(), rows, inter).unwrap();
            let mut want = vec![0f32; rows * inter];
            cpu::silu_mul(&mut want, &iv, inter);
            let what = format!("silu_mul {dt:?} {rows}x{inter}");
            ok(check_close(
                &what,
                &host(&d, &out),
                &round_to(&want, dt),
                tol(dt, ELEMENTWISE),
            ));
        }
    }
}

#[test]
fn kv_append_scatters_like_the_cpu_pool() {
    let d = gpu!("kv_append");
    let mut r = rng("kv_append");
    let (nb, n) = (16usize, 11usize); // bs = 1 still leaves more slots than tokens
    for dt in FLOATS {
        for (hkv, hd, bs) in [(1, 64, 16), (4, 128, 16), (2, 80, 8), (3, 256, 1)] {
            let cache_len = nb * hkv * bs * hd;
            let (kc, kcv) = up(&d, &rand_vec(&mut r, cache_len, 1.0), dt);
            let (vc, vcv) = up(&d, &rand_vec(&mut r, cache_len, 1.0), dt);
            // Token rows [pad | k | v] so k and v are strided views.
            let stride = 3 * hkv * hd;
            let (rows, rv) = up(&d, &rand_vec(&mut r, n * stride, 1.0), dt);
            let mut all: Vec<i64> = (0..(nb * bs) as i64).collect();
            shuffle(&mut r, &mut all);
            let mut slots: Vec<i64> = all[..n].to_vec();
            slots[3] = -1;
            slots[n - 1] = -1;
            let sb = DBuf::from_slice(&d, &slots).unwrap();
            let cache = KvCacheView {
                k: kc.view(),
                v: vc.view(),
                num_blocks: nb,
                num_kv_heads: hkv,
                block_size: bs,
                head_dim: hd,
            };
            let (k, v) = (
                heads(&rows, hkv * hd, hkv, hd, stride),
                heads(&rows, 2 * hkv * hd, hkv, hd, stride),
            );
            ops::kv_append(&d, &cache, k, v, sb.view(), n).unwrap();
            let mut pool = KvPool::new(1, nb, bs, hkv, hd).unwrap();
            pool.k[0] = kcv;
            pool.v[0] = vcv;
            let (mut ks, mut vs, mut ss) = (Vec::new(), Vec::new(), Vec::new());
            for (t, &s) in slots.iter().enumerate().filter(|(_, &s)| s >= 0) {
                ks.extend_from_slice(&rv[t * stride + hkv * hd..][..hkv * hd]);
                vs.extend_from_slice(&rv[t * stride + 2 * hkv * hd..][..hkv * hd]);
                ss.push(s as usize);
            }
            pool.append(0, &ks, &vs, &ss);
            let what = format!("kv_append {dt:?} {hkv}x{hd} bs{bs}");
            ok(check_bitwise(
                &format!("{what} k"),
                &host(&d, &kc),
                &pool.k[0],
            ));
            ok(check_bitwise(
                &format!("{what} v"),
                &host(&d, &vc),
                &pool.v[0],
            ));
        }
    }
}

fn random_cache(
    d: &CudaDev,
    r: &mut ChaCha8Rng,
    dt: DType,
    (hkv, hd, bs): (usize, usize, usize),
    ctxs: &[usize],
) -> RandomCache {
    RandomCache::new(d, r, dt, (hkv, hd, bs), ctxs).unwrap()
}

#[test]
fn paged_attention_matches_the_oracle_with_and_without_split() {
    let d = gpu!("paged_attention");
    let mut r = rng("paged_attention");
    let ctxs = [1usize, 15, 16, 17, 1000, 4096, 0];
    let ns = ctxs.len();
    let ctx_i32: Vec<i32> = ctxs.iter().map(|&c| c as i32).collect();
    let cb = DBuf::from_slice(&d, &ctx_i32).unwrap();
    for dt in FLOATS {
        for (group, hd, bs) in [
            (1, 64, 16),
            (4, 96, 8),
            (5, 128, 16),
            (8, 256, 16),
            (8, 64, 16),
            (1, 256, 16),
            (4, 128, 32),
        ] {
            let hkv = 2;
            let hq = group * hkv;
            let c = random_cache(&d, &mut r, dt, (hkv, hd, bs), &ctxs);
            let (tables, mb) = c.device_tables(&d).unwrap();
            let stride = (hq + 2 * hkv) * hd;
            let (q, qv) = up(&d, &rand_vec(&mut r, ns * stride, 1.0), dt);
            let qc: Vec<f32> = qv
                .chunks_exact(stride)
                .flat_map(|row| row[..hq * hd].to_vec())
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let seqs: Vec<AttnSeq> = (0..ns)
                .filter(|&s| ctxs[s] > 0)
                .map(|s| AttnSeq {
                    row: s,
                    len: 1,
                    start_pos: ctxs[s] - 1,
                    table: &c.tables[s],
                })
                .collect();
            let mut want = vec![0f32; ns * hq * hd]; // the empty sequence attends to nothing: zeros
            cpu::paged_attention(&mut want, &qc, &c.pool, 0, &seqs, hq, scale);
            let meta = SeqMeta {
                num_seqs: ns,
                block_tables: tables.view(),
                max_blocks_per_seq: mb,
                context_lens: cb.view(),
                max_context: 4096,
                cu_seqlens_q: None,
                total_q: ns,
                max_q_len: 1,
            };
            let auto = ops::auto_partition(&d, ns, hkv, 4096, bs);
            for split in [None, Some(512), Some(bs * 2), auto] {
                let out = poisoned(&d, dt, ns * hq * hd);
                let qh = heads(&q, 0, hq, hd, stride);
                ops::paged_attention(&d, out.view(), qh, &c.view(), &meta, scale, split).unwrap();
                let what = format!("paged {dt:?} G{group} hd{hd} bs{bs} split {split:?}");
                ok(check_close(
                    &what,
                    &host(&d, &out),
                    &want,
                    tol(dt, ATTENTION),
                ));
            }
        }
    }
}

#[test]
fn prefill_attention_matches_the_oracle_on_ragged_chunks() {
    let d = gpu!("prefill_attention");
    let mut r = rng("prefill_attention");
    // (new tokens, prior context) per sequence.
    let chunks = [
        (1usize, 0usize),
        (15, 5),
        (16, 64),
        (17, 0),
        (100, 5),
        (300, 64),
    ];
    let ctxs: Vec<usize> = chunks.iter().map(|&(q, c)| q + c).collect();
    let mut cu = vec![0i32];
    for &(q, _) in &chunks {
        cu.push(cu.last().unwrap() + q as i32);
    }
    let total = *cu.last().unwrap() as usize;
    let ctx_i32: Vec<i32> = ctxs.iter().map(|&c| c as i32).collect();
    let (cb, cub) = (
        DBuf::from_slice(&d, &ctx_i32).unwrap(),
        DBuf::from_slice(&d, &cu).unwrap(),
    );
    for dt in FLOATS {
        for (group, hd) in [(1, 64), (4, 96), (8, 128), (4, 256), (1, 16)] {
            let (hkv, bs) = (2, 16);
            let hq = group * hkv;
            let c = random_cache(&d, &mut r, dt, (hkv, hd, bs), &ctxs);
            let (tables, mb) = c.device_tables(&d).unwrap();
            let stride = (hq + 2 * hkv) * hd;
            let (q, qv) = up(&d, &rand_vec(&mut r, total * stride, 1.0), dt);
            let qc: Vec<f32> = qv
                .chunks_exact(stride)
                .flat_map(|row| row[..hq * hd].to_vec())
                .collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let seqs: Vec<AttnSeq> = chunks
                .iter()
                .enumerate()
                .map(|(s, &(len, prior))| AttnSeq {
                    row: cu[s] as usize,
                    len,
                    start_pos: prior,
                    table: &c.tables[s],
                })
                .collect();
            let mut want = vec![0f32; total * hq * hd];
            cpu::paged_attention(&mut want, &qc, &c.pool, 0, &seqs, hq, scale);
            let meta = SeqMeta {
                num_seqs: chunks.len(),
                block_tables: tables.view(),
                max_blocks_per_seq: mb,
                context_lens: cb.view(),
                max_context: *ctxs.iter().max().unwrap(),
                cu_seqlens_q: Some(cub.view()),
                total_q: total,
                max_q_len: 300,
            };
            let out = poisoned(&d, dt, total * hq * hd);
            ops::prefill_attention(
                &d,
                out.view(),
                heads(&q, 0, hq, hd, stride),
                &c.view(),
                &meta,
                scale,
            )
            .unwrap();
            let what = format!("prefill {dt:?} G{group} hd{hd}");
            ok(check_close(
                &what,
                &host(&d, &out),
                &want,
                tol(dt, ATTENTION),
            ));
        }
    }
}

#[test]
fn argmax_handles_ties_nan_and_padding() {
    let d = gpu!("argmax");
    let mut r = rng("argmax");
    let (vocab, stride, rows) = (1001usize, 1008usize, 6usize);
    for dt in FLOATS {
        let mut v = rand_vec(&mut r, rows * stride, 3.0);
        let row = |i: usize| i * stride..i * stride + vocab;
        v[row(1).start + 10] = 7.5;
        v[row(1).start + 500] = 7.5;
        for i in (0..vocab).step_by(13) {
            v[row(2).start + i] = f32::NAN;
        }
        v[row(3)].fill(f32::NEG_INFINITY);
        v[row(4)].fill(f32::NAN);
        v[row(5).start + vocab - 1] = 9.0;
        for i in 0..rows {
            v[i * stride + vocab..(i + 1) * stride].fill(100.0); // padding must be ignored
        }
        let (lb, lv) = up(&d, &v, dt);
        let idx = DBuf::filled(&d, DType::U32, rows, 0xFF).unwrap();
        let val = poisoned(&d, DType::F32, rows);
        let rs = Rows {
            n_rows: rows,
            vocab,
            row_stride: stride,
        };
        ops::argmax(&d, lb.view(), idx.view(), Some(val.view()), rs, 1000).unwrap();
        let (gi, gv) = (idx.to_vec::<u32>(&d).unwrap(), host(&d, &val));
        for i in 0..rows {
            let (wi, wv) = host_argmax(&lv[row(i)]);
            assert_eq!(gi[i], wi + 1000, "argmax {dt:?} row {i}");
            assert_eq!(gv[i].to_bits(), wv.to_bits(), "argmax value {dt:?} row {i}");
        }
    }
}

#[test]
fn sample_follows_the_filtered_distribution() {
    let d = gpu!("sample");
    let mut r = rng("sample");
    let (vocab, n) = (50usize, 8192usize);
    let uni: Vec<f32> = (0..n).map(|i| (i as f32 + 0.5) / n as f32).collect();
    let ub = DBuf::from_slice(&d, &uni).unwrap();
    for dt in FLOATS {
        let mut x = rand_vec(&mut r, vocab, 3.0);
        let top = host_argmax(&x).0 as usize;
        x[top] += 0.5; // a unique maximum, so greedy cuts keep exactly one token
        let x = round_to(&x, dt);
        let (lb, _) = up(&d, &x.repeat(n), dt);
        let rs = Rows {
            n_rows: n,
            vocab,
            row_stride: vocab,
        };
        let am = host_argmax(&x).0;
        let cfg = |temperature, top_k, top_p| SampleCfg {
            temperature,
            top_k,
            top_p,
        };
        for c in [
            cfg(1.0, 0, 1.0),
            cfg(0.7, 10, 1.0),
            cfg(1.3, 0, 0.8),
            cfg(1.0, 5, 0.5),
        ] {
            let out = DBuf::filled(&d, DType::U32, n, 0xFF).unwrap();
            ops::sample(&d, lb.view(), out.view(), ub.view(), rs, c).unwrap();
            let mut count = vec![0usize; vocab];
            for i in out.to_vec::<u32>(&d).unwrap() {
                count[i as usize] += 1;
            }
            for (j, p) in host_sample_probs(&x, c.temperature, c.top_k, c.top_p)
                .iter()
                .enumerate()
            {
                let exp = p * n as f64;
                assert!(
                    (count[j] as f64 - exp).abs() <= 3.0,
                    "sample {dt:?} {c:?}: token {j} drawn {} times, expected {exp:.1}",
                    count[j]
                );
            }
        }
        for c in [cfg(0.0, 0, 1.0), cfg(1.0, 1, 1.0), cfg(1.0, 0, 1e-6)] {
            let out = DBuf::filled(&d, DType::U32, n, 0xFF).unwrap();
            ops::sample(&d, lb.view(), out.view(), ub.view(), rs, c).unwrap();
            assert!(
                out.to_vec::<u32>(&d).unwrap().iter().all(|&i| i == am),
                "sample {dt:?} {c:?} is not greedy"
            );
        }
    }
}

#[test]
fn all_reduce_sums_in_rank_order_bitwise() {
    let d = gpu!("all_reduce");
    let mut r = rng("all_reduce");
    for dt in FLOATS {
        for k in [1usize, 2, 3, 8, 16] {
            for n in [1usize, 7, 4096, 1_000_000] {
                if n == 1_000_000 && k > 3 {
                    continue;
                }
                let ins: Vec<(DBuf, Vec<f32>)> = (0..k)
                    .map(|_| up(&d, &rand_vec(&mut r, n, 1.0), dt))
                    .collect();
                let mut want = vec![0f32; n];
                for (_, v) in &ins {
                    want.iter_mut().zip(v).for_each(|(a, b)| *a += b);
                }
                let want = round_to(&want, dt);
                let outs: Vec<DBuf> = (0..2).map(|_| poisoned(&d, dt, n)).collect();
                let iv: Vec<_> = ins.iter().map(|(b, _)| b.view()).collect();
                let ov: Vec<_> = outs.iter().map(DBuf::view).collect();
                ops::all_reduce_sum(&d, &iv, &ov, n).unwrap();
                for o in &outs {
                    ok(check_bitwise(
                        &format!("all_reduce {dt:?} k{k} n{n}"),
                        &host(&d, o),
                        &want,
                    ));
                }
                ops::all_reduce_sum(&d, &iv, &iv, n).unwrap(); // in place
                for (b, _) in &ins {
                    ok(check_bitwise(
                        &format!("in-place all_reduce {dt:?} k{k} n{n}"),
                        &host(&d, b),
                        &want,
                    ));
                }
            }
        }
    }
}

#[test]
fn reshard_copies_match_host_copies() {
    let d = gpu!("reshard");
    let mut r = rng("reshard");
    let bytes: Vec<u8> = (0..10_000).map(|_| r.random::<u8>()).collect();
    let src = DBuf::from_slice(&d, &bytes).unwrap();
    for (rows, row_bytes, ds, ss, doff, soff) in [
        (1, 4096, 0, 0, 0, 0),
        (1, 1001, 0, 0, 3, 5),
        (37, 33, 40, 100, 1, 7),
        (200, 16, 16, 48, 0, 16),
        (5, 1000, 1024, 1000, 8, 0),
    ] {
        let dst = DBuf::filled(&d, DType::U8, 10_000, 0xAB).unwrap();
        let s = Strided {
            rows,
            row_bytes,
            dst_stride: ds,
            src_stride: ss,
        };
        ops::strided_copy(
            &d,
            dst.view().at(doff).unwrap(),
            src.view().at(soff).unwrap(),
            s,
        )
        .unwrap();
        let mut want = vec![0xABu8; 10_000];
        for row in 0..rows {
            want[doff + row * ds..][..row_bytes]
                .copy_from_slice(&bytes[soff + row * ss..][..row_bytes]);
        }
        assert!(dst.to_vec::<u8>(&d).unwrap() == want, "strided_copy {s:?}");
    }
    let one = |len| Strided {
        rows: 1,
        row_bytes: len,
        dst_stride: 0,
        src_stride: 0,
    };
    let overlapping = ops::strided_copy(&d, src.view(), src.view().at(10).unwrap(), one(1000));
    assert!(
        overlapping.is_err(),
        "an overlapping in-place move must be refused"
    );
    ops::strided_copy(&d, src.view(), src.view().at(2000).unwrap(), one(1000)).unwrap();
    let moved = src.to_vec::<u8>(&d).unwrap();
    assert_eq!(&moved[..1000], &bytes[2000..3000]);

    for dt in [DType::F32, DType::Bf16] {
        let (nb, heads_n, bs, hd) = (10, 4, 16, 80);
        let c = random_cache(&d, &mut r, dt, (heads_n, hd, bs), &[nb * bs - 3 * bs]);
        let list = [7i32, 2, 9];
        let lb = DBuf::from_slice(&d, &list).unwrap();
        let staging = poisoned(&d, dt, 2 * list.len() * 2 * bs * hd);
        ops::kv_gather(&d, &c.view(), staging.view(), lb.view(), 1, 2).unwrap();
        let mut want = Vec::new();
        for cache in [&c.pool.k[0], &c.pool.v[0]] {
            for &b in &list {
                let o = c.pool.offset(b as usize, 1, 0);
                want.extend_from_slice(&cache[o..o + 2 * bs * hd]);
            }
        }
        ok(check_bitwise(
            &format!("kv_gather {dt:?}"),
            &host(&d, &staging),
            &want,
        ));
        let fresh = random_cache(&d, &mut r, dt, (heads_n, hd, bs), &[nb * bs - 3 * bs]);
        let dst_list = DBuf::from_slice(&d, &[0i32, 5, 3]).unwrap();
        ops::kv_scatter(&d, &fresh.view(), staging.view(), dst_list.view(), 2, 2).unwrap();
        let mut pool = fresh.pool;
        for (kv, cache) in [&mut pool.k[0], &mut pool.v[0]].into_iter().enumerate() {
            for (i, b) in [0usize, 5, 3].into_iter().enumerate() {
                let o = ((b * heads_n) + 2) * bs * hd;
                let chunk = 2 * bs * hd;
                cache[o..o + chunk].copy_from_slice(&want[(kv * 3 + i) * chunk..][..chunk]);
            }
        }
        ok(check_bitwise(
            &format!("kv_scatter k {dt:?}"),
            &host(&d, &fresh.k),
            &pool.k[0],
        ));
        ok(check_bitwise(
            &format!("kv_scatter v {dt:?}"),
            &host(&d, &fresh.v),
            &pool.v[0],
        ));
    }
}

#[test]
fn gemms_match_the_cpu_matmuls() {
    let d = gpu!("gemm");
    let mut r = rng("gemm");
    for dt in FLOATS {
        for (n, k, m) in [
            (1, 64, 64),
            (7, 100, 33),
            (64, 1024, 384),
            (3, 1, 5),
            (5, 0, 3),
            (301, 64, 17),
        ] {
            let (x, xv) = up(&d, &rand_vec(&mut r, n * k, 1.0), dt);
            let (w, wv) = up(&d, &rand_vec(&mut r, m * k, 1.0), dt);
            let mut want = vec![0f32; n * m];
            let out = poisoned(&d, dt, n * m);
            ops::gemm_nt(&d, out.view(), x.view(), w.view(), n, k, m).unwrap();
            cpu::matmul_nt(&mut want, &xv, &wv, n, k, m);
            ok(check_close(
                &format!("gemm_nt {dt:?} {n}x{k}x{m}"),
                &host(&d, &out),
                &want,
                tol(dt, GEMM),
            ));
            let out = poisoned(&d, dt, n * m);
            ops::gemm_nn(&d, out.view(), x.view(), w.view(), n, k, m).unwrap();
            cpu::matmul_nn(&mut want, &xv, &wv, n, k, m);
            ok(check_close(
                &format!("gemm_nn {dt:?} {n}x{k}x{m}"),
                &host(&d, &out),
                &want,
                tol(dt, GEMM),
            ));
        }
    }
}

#[test]
fn wrappers_refuse_bad_shapes_instead_of_launching() {
    let d = gpu!("bad_shapes");
    let f = |n| DBuf::zeros(&d, DType::F32, n).unwrap();
    let (small, table, ids) = (f(10), f(100), DBuf::from_slice(&d, &[0u32; 4]).unwrap());
    assert!(ops::embedding(&d, small.view(), ids.view(), table.view(), 10, 0).is_err());
    let bf = DBuf::zeros(&d, DType::Bf16, 100).unwrap();
    assert!(ops::rmsnorm(&d, table.view(), bf.view(), small.view(), 10, 1e-5).is_err());
    let views: Vec<_> = (0..17).map(|_| small.view()).collect();
    assert!(ops::all_reduce_sum(&d, &views, &views[..1], 10).is_err());
    let q = Heads {
        data: table.view(),
        heads: 9,
        head_dim: 8,
        token_stride: 72,
    };
    let cache = KvCacheView {
        k: table.view(),
        v: table.view(),
        num_blocks: 1,
        num_kv_heads: 1,
        block_size: 4,
        head_dim: 8,
    };
    let (ctx, table) = (
        DBuf::from_slice(&d, &[1i32]).unwrap(),
        DBuf::from_slice(&d, &[0i32]).unwrap(),
    );
    let meta = SeqMeta {
        num_seqs: 1,
        block_tables: table.view(),
        max_blocks_per_seq: 1,
        context_lens: ctx.view(),
        max_context: 1,
        cu_seqlens_q: None,
        total_q: 1,
        max_q_len: 1,
    };
    let out = f(200);
    let e = ops::paged_attention(&d, out.view(), q, &cache, &meta, 1.0, None).unwrap_err();
    assert!(e.to_string().contains("PAT_MAX_GQA"), "{e}");
    let q = Heads { heads: 2, ..q };
    assert!(ops::paged_attention(&d, out.view(), q, &cache, &meta, 1.0, Some(3)).is_err());
    ops::paged_attention(&d, out.view(), q, &cache, &meta, 1.0, None).unwrap();
    d.synchronize().unwrap();
}
