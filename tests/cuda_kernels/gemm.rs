//! cuBLAS GEMMs against the CPU matmuls, and the wrappers' refusals of bad shapes.

use super::*;

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
