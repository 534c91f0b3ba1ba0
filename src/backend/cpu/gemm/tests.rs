//! The GEMM kernels against an f64 reference, and the invariants the module promises: results
//! that do not depend on the batch rows, the tiles or the thread split.

use super::*;

fn data(len: usize, seed: f32) -> Vec<f32> {
    (0..len)
        .map(|i| ((i as f32 + seed) * 0.731).sin())
        .collect()
}

/// `out[i, j] = Σ_t x[i, t] · W(t, j)` in f64, W read as the form stores it.
fn reference(nt: bool, x: &[f32], w: &[f32], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k)
                .map(|t| {
                    let wv = if nt { w[j * k + t] } else { w[t * m + j] };
                    x[i * k + t] as f64 * wv as f64
                })
                .sum();
        }
    }
    out
}

fn isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512]
        .into_iter()
        .filter(|&i| i <= detect())
        .collect()
}

/// Shapes around every edge: rows below, at and past the 4-row tiles; `k` shorter than a vector,
/// with 8- and 16-lane tails, and past the 128-row `nn` block; `m` with column tails.
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 5, 3),
    (1, 300, 70),
    (2, 64, 33),
    (3, 17, 9),
    (4, 300, 64),
    (5, 129, 47),
    (7, 8, 16),
    (13, 260, 100),
    (16, 576, 40),
];

#[test]
fn every_kernel_matches_an_f64_reference_whole_and_split() {
    for isa in isas() {
        for form in [Form::Nt, Form::Nn] {
            for (n, k, m) in SHAPES {
                let (x, w) = (data(n * k, 1.0), data(m * k, 2.0));
                let want = reference(form == Form::Nt, &x, &w, n, k, m);
                // Whole, and in two column chunks split at a multiple of 16 (as threads split).
                let split = (m / 2).div_ceil(16) * 16;
                for cuts in [vec![0, m], vec![0, split.min(m), m]] {
                    let mut out = vec![f32::NAN; n * m];
                    let o = Out(out.as_mut_ptr());
                    for c in cuts.windows(2) {
                        // SAFETY: `out` holds n×m; the chunks are disjoint; this CPU runs `isa`.
                        unsafe { stream(isa, form, o, &x, &w, n, k, m, c[0], c[1]) };
                    }
                    for (idx, (&got, &r)) in out.iter().zip(&want).enumerate() {
                        let tol = 1e-6 * (k as f64 + 1.0);
                        assert!(
                            (got as f64 - r).abs() <= tol,
                            "{isa:?} {} {n}x{k}x{m} cuts {cuts:?} at {idx}: {got} vs {r}",
                            if form == Form::Nt { "nt" } else { "nn" }
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn results_do_not_depend_on_rows_tiles_or_threads() {
    let (n, k, m) = (13, 300, 1000); // m·k is several parallel chunks
    let (x, w) = (data(n * k, 3.0), data(m * k, 4.0));
    for nt in [true, false] {
        let run = |g: Gemm, rows: usize, x: &[f32]| {
            let mut out = vec![f32::NAN; rows * m];
            if nt {
                g.nt(&mut out, x, &w, rows, k, m);
            } else {
                g.nn(&mut out, x, &w, rows, k, m);
            }
            out
        };
        let one = Gemm::default();
        let all = run(one, n, &x);
        for threads in [2, 3, 8] {
            let g = Gemm { threads, ..one };
            assert_eq!(run(g, n, &x), all, "nt {nt}: {threads} threads");
        }
        for i in 0..n {
            let row = run(one, 1, &x[i * k..(i + 1) * k]);
            assert_eq!(row, all[i * m..(i + 1) * m], "nt {nt}: row {i} alone");
        }
    }
}

#[test]
fn the_packed_path_split_over_threads_matches_the_reference() {
    let (n, k, m) = (STREAM_MAX_ROWS + 3, 70, 2000);
    let (x, w) = (data(n * k, 5.0), data(m * k, 6.0));
    for nt in [true, false] {
        let want = reference(nt, &x, &w, n, k, m);
        for threads in [1, 3] {
            let g = Gemm {
                threads,
                ..Gemm::default()
            };
            let mut out = vec![f32::NAN; n * m];
            if nt {
                g.nt(&mut out, &x, &w, n, k, m);
            } else {
                g.nn(&mut out, &x, &w, n, k, m);
            }
            for (idx, (&got, &r)) in out.iter().zip(&want).enumerate() {
                assert!((got as f64 - r).abs() < 1e-4, "nt {nt} {threads}: {idx}");
            }
        }
    }
}
