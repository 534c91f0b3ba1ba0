//! KV append, paged decode attention (with and without split-K) and prefill attention against the CPU oracle.

use super::*;

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
