//! The streaming kernels' SIMD bodies: one macro, instantiated for AVX2+FMA (8 lanes, 16
//! registers) and AVX-512 (16 lanes, 32 registers, so larger tiles).

use super::Out;

/// Generates a module of streaming kernels for one vector width.
macro_rules! simd_kernels {
    (
        $module:ident, $features:literal, $V:ty, $lanes:expr,
        nt_tile: $CB:literal, nn_tile: $NRR:literal x $NV:literal, nn_block: $KC:literal,
        zero: $zero:path, load: $load:path, store: $store:path, fmadd: $fmadd:path,
        set1: $set1:path, to256: |$v:ident| $to256:expr
    ) => {
        pub(super) mod $module {
            use super::Out;
            #[allow(unused_imports)]
            use std::arch::x86_64::*;

            const W: usize = $lanes;
            /// Weight rows per `nt` register tile (4 activation rows each).
            const NT_CB: usize = $CB;
            /// Rows and vectors per row of an `nn` register tile, and weight rows per block.
            const NN_R: usize = $NRR;
            const NN_CV: usize = $NV;
            const NN_KC: usize = $KC;

            /// Folds a vector to 8 lanes (lane i plus lane i+8 for 16 lanes).
            #[inline(always)]
            unsafe fn to256($v: $V) -> __m256 {
                $to256
            }

            /// Four accumulators reduced at once: each folded to 8 lanes (lane i plus lane i+8
            /// for 16 lanes), then `((l0+l4)+(l1+l5)) + ((l2+l6)+(l3+l7))`, as `reduce`.
            #[inline(always)]
            unsafe fn hsum4(v: [$V; 4]) -> [f32; 4] {
                let mut s = [_mm_setzero_ps(); 4];
                for (s, v) in s.iter_mut().zip(v) {
                    let v = to256(v);
                    *s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                }
                let h = _mm_hadd_ps(_mm_hadd_ps(s[0], s[1]), _mm_hadd_ps(s[2], s[3]));
                let mut out = [0f32; 4];
                _mm_storeu_ps(out.as_mut_ptr(), h);
                out
            }

            /// R activation rows (from `x`, stride `k`) times C weight rows (from `w`, stride
            /// `k`): R·C dot products over `k`, W lanes each, reduced by [`hsum4`], tail last.
            /// With `PF`, the C weight rows after the block of 4 are prefetched as these are read
            /// (so the next block streams in while this one computes).
            #[inline(always)]
            unsafe fn tile<const R: usize, const C: usize, const PF: bool>(
                x: *const f32,
                w: *const f32,
                k: usize,
            ) -> [[f32; C]; R] {
                let kk = k - k % W;
                let mut acc = [[$zero(); C]; R];
                let mut c = 0;
                while c < kk {
                    let mut wv = [$zero(); C];
                    for (b, v) in wv.iter_mut().enumerate() {
                        *v = $load(w.add(b * k + c));
                        if PF {
                            _mm_prefetch::<_MM_HINT_T0>(w.add((b + 4) * k + c) as *const i8);
                        }
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xv = $load(x.add(r * k + c));
                        for (b, a) in a.iter_mut().enumerate() {
                            *a = $fmadd(xv, wv[b], *a);
                        }
                    }
                    c += W;
                }
                let mut res = [[0f32; C]; R];
                let mut flat = [$zero(); 4];
                let mut q = 0;
                for r in 0..R {
                    for b in 0..C {
                        flat[q % 4] = acc[r][b];
                        q += 1;
                        if q % 4 == 0 || q == R * C {
                            let s = hsum4(flat);
                            let first = (q - 1) / 4 * 4;
                            for (t, v) in s.iter().enumerate().take(q - first) {
                                res[(first + t) / C][(first + t) % C] = *v;
                            }
                            flat = [$zero(); 4];
                        }
                    }
                }
                if kk < k {
                    for (r, row) in res.iter_mut().enumerate() {
                        for (b, o) in row.iter_mut().enumerate() {
                            for t in kk..k {
                                *o += *x.add(r * k + t) * *w.add(b * k + t);
                            }
                        }
                    }
                }
                res
            }

            #[inline(always)]
            unsafe fn put<const R: usize, const C: usize>(
                out: Out,
                ldo: usize,
                i: usize,
                j: usize,
                v: [[f32; C]; R],
            ) {
                for (r, row) in v.iter().enumerate() {
                    for (b, o) in row.iter().enumerate() {
                        *out.0.add((i + r) * ldo + j + b) = *o;
                    }
                }
            }

            /// `nt_cols_portable` with register tiles: blocks of 4 weight rows, each dotted
            /// with 4 activation rows at a time (two 4x2 tiles), leftover rows 1x4.
            ///
            /// # Safety
            /// As `nt_cols_portable`; the CPU has these target features.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn nt_cols(
                out: Out,
                ldo: usize,
                x: &[f32],
                w: &[f32],
                n: usize,
                k: usize,
                j0: usize,
                j1: usize,
            ) {
                debug_assert!(x.len() >= n * k && w.len() >= j1 * k);
                let (xp, wp) = (x.as_ptr(), w.as_ptr());
                let mut j = j0;
                while j < j1 {
                    let jn = (j1 - j).min(4);
                    let wj = wp.add(j * k);
                    let mut i = 0;
                    if jn == 4 {
                        // The first tiles of a block prefetch the next block (if any).
                        let pf = j + 8 <= j1;
                        while i + 4 <= n {
                            let xi = xp.add(i * k);
                            for b in (0..4).step_by(NT_CB) {
                                let wb = wj.add(b * k);
                                if i == 0 && pf {
                                    put(out, ldo, i, j + b, tile::<4, NT_CB, true>(xi, wb, k));
                                } else {
                                    put(out, ldo, i, j + b, tile::<4, NT_CB, false>(xi, wb, k));
                                }
                            }
                            i += 4;
                        }
                        for i in i..n {
                            let xi = xp.add(i * k);
                            if i == 0 && pf {
                                put(out, ldo, i, j, tile::<1, 4, true>(xi, wj, k));
                            } else {
                                put(out, ldo, i, j, tile::<1, 4, false>(xi, wj, k));
                            }
                        }
                    } else {
                        for jj in j..j + jn {
                            let wj = wp.add(jj * k);
                            let mut i = 0;
                            while i + 4 <= n {
                                put(out, ldo, i, jj, tile::<4, 1, false>(xp.add(i * k), wj, k));
                                i += 4;
                            }
                            for i in i..n {
                                put(out, ldo, i, jj, tile::<1, 1, false>(xp.add(i * k), wj, k));
                            }
                        }
                    }
                    j += jn;
                }
            }

            /// Output rows `0..R` x vectors `0..CV` (starting at `o`, row stride `ldo`) +=
            /// `x[rows, 0..kb] · w[0..kb, cols]` (`xi` row stride `k`, `wq` row stride `ldw`):
            /// R·CV accumulators held in registers over the `kb` weight rows, each weight vector
            /// loaded once for the R rows; every output takes its fused multiply-adds in order.
            /// The same columns of the first `pf` rows of the next block (`NN_KC` rows on) are
            /// prefetched into L2 meanwhile, so the next block streams in during this one.
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            unsafe fn nn_tile<const R: usize, const CV: usize>(
                o: *mut f32,
                ldo: usize,
                xi: *const f32,
                k: usize,
                wq: *const f32,
                ldw: usize,
                kb: usize,
                pf: usize,
            ) {
                let mut acc = [[$zero(); CV]; R];
                for (r, a) in acc.iter_mut().enumerate() {
                    for (v, a) in a.iter_mut().enumerate() {
                        *a = $load(o.add(r * ldo + v * W));
                    }
                }
                for q in 0..kb {
                    if q < pf {
                        let next = wq.add((NN_KC + q) * ldw);
                        for line in (0..CV * W).step_by(16) {
                            _mm_prefetch::<_MM_HINT_T1>(next.add(line) as *const i8);
                        }
                    }
                    let mut wv = [$zero(); CV];
                    for (v, wv) in wv.iter_mut().enumerate() {
                        *wv = $load(wq.add(q * ldw + v * W));
                    }
                    for (r, a) in acc.iter_mut().enumerate() {
                        let xb = $set1(*xi.add(r * k + q));
                        for (v, a) in a.iter_mut().enumerate() {
                            *a = $fmadd(xb, wv[v], *a);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    for (v, a) in a.iter().enumerate() {
                        $store(o.add(r * ldo + v * W), *a);
                    }
                }
            }

            /// `nn_cols_portable` with fused multiply-adds, every output an FMA chain over `k`
            /// in order: blocks of `NN_KC` weight rows; within one, register tiles of `NN_R`
            /// output rows x `NN_CV` vectors accumulate over the whole block (the block's column strip
            /// stays in cache for the next rows).
            ///
            /// # Safety
            /// As `nn_cols_portable`; the CPU has these target features.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            pub(in super::super) unsafe fn nn_cols(
                out: Out,
                ldo: usize,
                x: &[f32],
                w: &[f32],
                n: usize,
                k: usize,
                ldw: usize,
                j0: usize,
                j1: usize,
            ) {
                debug_assert!(x.len() >= n * k && w.len() >= k * ldw && j1 <= ldw);
                const R: usize = NN_R;
                const CV: usize = NN_CV;
                let (xp, wp) = (x.as_ptr(), w.as_ptr());
                let width = j1 - j0;
                let wide = width - width % W;
                let tiles = wide - wide % (CV * W);
                for i in 0..n {
                    std::ptr::write_bytes(out.0.add(i * ldo + j0), 0, width);
                }
                let mut kk = 0;
                while kk < k {
                    let kb = (k - kk).min(NN_KC);
                    // Rows of the next block the first row group prefetches.
                    let pf_rows = (k - kk - kb).min(kb);
                    let mut c = 0;
                    while c < wide {
                        let wq = wp.add(kk * ldw + j0 + c);
                        let full = c < tiles;
                        let mut i = 0;
                        while i + R <= n {
                            let (o, xi) = (out.0.add(i * ldo + j0 + c), xp.add(i * k + kk));
                            let pf = if i == 0 { pf_rows } else { 0 };
                            if full {
                                nn_tile::<R, CV>(o, ldo, xi, k, wq, ldw, kb, pf);
                            } else {
                                nn_tile::<R, 1>(o, ldo, xi, k, wq, ldw, kb, pf);
                            }
                            i += R;
                        }
                        for i in i..n {
                            let (o, xi) = (out.0.add(i * ldo + j0 + c), xp.add(i * k + kk));
                            let pf = if i == 0 { pf_rows } else { 0 };
                            if full {
                                nn_tile::<1, CV>(o, ldo, xi, k, wq, ldw, kb, pf);
                            } else {
                                nn_tile::<1, 1>(o, ldo, xi, k, wq, ldw, kb, pf);
                            }
                        }
                        c += if full { CV * W } else { W };
                    }
                    for i in 0..n {
                        let o = out.0.add(i * ldo + j0);
                        let xi = xp.add(i * k + kk);
                        let wb = wp.add(kk * ldw + j0);
                        for c in wide..width {
                            let mut v = *o.add(c);
                            for q in 0..kb {
                                v = (*xi.add(q)).mul_add(*wb.add(q * ldw + c), v);
                            }
                            *o.add(c) = v;
                        }
                    }
                    kk += kb;
                }
            }
        }
    };
}

simd_kernels!(avx2, "avx2,fma", __m256, 8, nt_tile: 2, nn_tile: 2 x 4, nn_block: 128,
    zero: _mm256_setzero_ps, load: _mm256_loadu_ps, store: _mm256_storeu_ps,
    fmadd: _mm256_fmadd_ps, set1: _mm256_set1_ps, to256: |v| v);

simd_kernels!(avx512, "avx512f,avx2,fma", __m512, 16, nt_tile: 4, nn_tile: 4 x 4, nn_block: 128,
zero: _mm512_setzero_ps, load: _mm512_loadu_ps, store: _mm512_storeu_ps,
fmadd: _mm512_fmadd_ps, set1: _mm512_set1_ps,
to256: |v| _mm256_add_ps(
    _mm512_castps512_ps256(v),
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))),
));
