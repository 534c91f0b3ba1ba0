//! Embedding, rmsnorm (plain and fused with the residual add), q/k norm, rope, silu_mul against the CPU oracle.

use super::*;

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
