//! The same-device all-reduce and the reshard copies (strided_copy, kv_gather, kv_scatter,
//! kv_copy).

use super::*;

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

/// kv_copy against the host pools: heads [1, 3) of shuffled blocks of a 4-head cache into heads
/// [0, 2) of other blocks of a 2-head cache (a switch from tp 1 to tp 2); the rest untouched.
/// And its refusals, before anything is launched.
#[test]
fn kv_copy_moves_a_head_slice_between_pools_bitwise() {
    let d = gpu!("kv_copy");
    let mut r = rng("kv_copy");
    for dt in [DType::F32, DType::Bf16] {
        let (nb, bs, hd) = (10, 16, 64);
        let src = random_cache(&d, &mut r, dt, (4, hd, bs), &[nb * bs]);
        let dst = random_cache(&d, &mut r, dt, (2, hd, bs), &[nb * bs]);
        let (from, to) = ([7i32, 2, 9, 0, 5], [4i32, 0, 6, 9, 1]);
        let (fb, tb) = (
            DBuf::from_slice(&d, &from).unwrap(),
            DBuf::from_slice(&d, &to).unwrap(),
        );
        ops::kv_copy(&d, &src.view(), fb.view(), 1, &dst.view(), tb.view(), 0, 2).unwrap();
        let mut want = [dst.pool.k[0].clone(), dst.pool.v[0].clone()];
        let chunk = 2 * bs * hd;
        for (cache, out) in [&src.pool.k[0], &src.pool.v[0]].into_iter().zip(&mut want) {
            for (&a, &b) in from.iter().zip(&to) {
                let o = src.pool.offset(a as usize, 1, 0);
                let p = dst.pool.offset(b as usize, 0, 0);
                out[p..p + chunk].copy_from_slice(&cache[o..o + chunk]);
            }
        }
        ok(check_bitwise(
            &format!("kv_copy k {dt:?}"),
            &host(&d, &dst.k),
            &want[0],
        ));
        ok(check_bitwise(
            &format!("kv_copy v {dt:?}"),
            &host(&d, &dst.v),
            &want[1],
        ));

        let before = host(&d, &dst.k);
        let refused = [
            (
                "the same cache both ways",
                ops::kv_copy(&d, &src.view(), fb.view(), 0, &src.view(), tb.view(), 2, 2),
            ),
            (
                "source heads past the cache",
                ops::kv_copy(&d, &src.view(), fb.view(), 3, &dst.view(), tb.view(), 0, 2),
            ),
            (
                "destination heads past the cache",
                ops::kv_copy(&d, &src.view(), fb.view(), 0, &dst.view(), tb.view(), 1, 2),
            ),
            (
                "lists of different lengths",
                ops::kv_copy(
                    &d,
                    &src.view(),
                    fb.view(),
                    0,
                    &dst.view(),
                    tb.view().slice(0, 4).unwrap(),
                    0,
                    2,
                ),
            ),
        ];
        for (what, res) in refused {
            assert!(res.is_err(), "kv_copy must refuse {what}");
        }
        ok(check_bitwise(
            "kv_copy refused: untouched",
            &host(&d, &dst.k),
            &before,
        ));
    }
}
