//! The CPU GEMMs: `out[n, m] = x[n, k] · W` with W stored [out, in] (`nt`, column-parallel and
//! vocab-parallel weights) or [in, out] (`nn`, row-parallel weights), the layouts the reshard
//! planner keeps contiguous per shard.
//!
//! Decode multiplies a few rows by every weight of the model, so the weights are what costs. Up
//! to [`STREAM_MAX_ROWS`] rows the kernels here read each weight once per call, in storage order,
//! with no packing, and keep the activations in cache:
//! - `nt`: register tiles of 4 activation rows x 2 weight rows (8 AVX2 accumulators over `k`);
//!   one row x 4 weight rows for the leftover activation rows.
//! - `nn`: blocks of 128 weight rows; within one, register tiles of 2 output rows x 4 vectors
//!   (4 x 4 with AVX-512) accumulate over the block (each output an FMA chain over `k` in order).
//!
//! Above it, prefill's GEMMs go to `matrixmultiply`, whose packing is paid back by the many rows.
//!
//! Every output element is summed in an order that depends only on `k` (and on whether the CPU
//! has AVX2+FMA), never on `n`, the tile it fell in, or how columns were split over threads; so
//! results are the same at every batch size and thread count.
//!
//! [`Gemm`] splits one call's output columns over the threads a rank may use (a rayon pool
//! shared by all ranks; the calling rank thread computes the first chunk itself).

use std::sync::OnceLock;

/// Up to this many rows of `x` the streaming kernels run; above it, `matrixmultiply`. Measured on
/// the 2-core Xeon VM (2026-12-01, `pat bench gemm`, benches/RESULTS.md): streaming is 1.1-1.4x
/// the packed GEMM at 16 and 32 rows on the SmolLM2-135M shape, and behind it at 48 on one thread.
pub const STREAM_MAX_ROWS: usize = 32;

/// `LANES` partial sums over `k`, then combined pairwise in a fixed order; the tail last.
const LANES: usize = 8;

/// Columns below which a call is not split over threads (the chunk would not pay the hand-off).
const MIN_PAR_WORK: usize = 1 << 16;

#[inline(always)]
fn reduce(acc: &[f32; LANES]) -> f32 {
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// A raw output pointer handed to the threads that fill disjoint columns of one output.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: `Out` is only used by `Gemm::run`, whose chunks write disjoint column ranges of one
// output that outlives the scope they run in.
unsafe impl Send for Out {}
// SAFETY: as for `Send`: no two threads write the same element, and nobody reads during the scope.
unsafe impl Sync for Out {}

// ---------------------------------------------------------------------------------------------
// Portable kernels (any CPU): the same loop structure, mul then add.

/// Columns `j0..j1` of `out[n, ldo] = x[n, k] · w[m, k]ᵀ`.
///
/// # Safety
/// `out` is valid for writes at `i * ldo + j` for `i < n`, `j0 <= j < j1`, and nobody else
/// touches those elements during the call; `x` holds `n * k` and `w` at least `j1 * k` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn nt_cols_portable(
    out: Out,
    ldo: usize,
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    j0: usize,
    j1: usize,
) {
    let kk = k - k % LANES;
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for i in 0..n {
            let xr = &x[i * k..(i + 1) * k];
            let mut acc = [0f32; LANES];
            for c in (0..kk).step_by(LANES) {
                for l in 0..LANES {
                    acc[l] += xr[c + l] * wr[c + l];
                }
            }
            let mut o = reduce(&acc);
            for t in kk..k {
                o += xr[t] * wr[t];
            }
            // SAFETY: in bounds and ours alone (the function's contract).
            unsafe { *out.0.add(i * ldo + j) = o };
        }
    }
}

/// Columns `j0..j1` of `out[n, ldo] = x[n, k] · w[k, ldw]`: out = Σ_kk x[·, kk] · w[kk, ·], kk in
/// order.
///
/// # Safety
/// As [`nt_cols_portable`]; `w` holds `k * ldw` elements with `j1 <= ldw`.
#[allow(clippy::too_many_arguments)]
unsafe fn nn_cols_portable(
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
    for i in 0..n {
        // SAFETY: in bounds and ours alone (the function's contract).
        let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(i * ldo + j0), j1 - j0) };
        o.fill(0.0);
        for kk in 0..k {
            let a = x[i * k + kk];
            for (o, b) in o.iter_mut().zip(&w[kk * ldw + j0..kk * ldw + j1]) {
                *o += a * b;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SIMD kernels (in `simd`): one body, instantiated for AVX2+FMA (8 lanes) and AVX-512 (16 lanes).

/// The instruction sets the streaming kernels come in, best last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    Portable,
    Avx2,
    Avx512,
}

/// The best [`Isa`] this CPU runs, capped by `PAT_CPU_ISA` (`portable`, `avx2`, `avx512`) for
/// benchmarks and for reproducing another machine's numerics.
pub(crate) fn isa() -> Isa {
    static I: OnceLock<Isa> = OnceLock::new();
    *I.get_or_init(|| {
        let cap = match std::env::var("PAT_CPU_ISA").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            _ => Isa::Avx512,
        };
        detect().min(cap)
    })
}

fn detect() -> Isa {
    {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx2") && has!("fma") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
use simd::{avx2, avx512};

// ---------------------------------------------------------------------------------------------
// Dispatch.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Nt,
    Nn,
}

/// Columns `j0..j1` of one call on the streaming kernels of `isa`.
///
/// # Safety
/// As [`chunk`]; the CPU runs `isa`.
#[allow(clippy::too_many_arguments)]
unsafe fn stream(
    isa: Isa,
    form: Form,
    out: Out,
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    m: usize,
    j0: usize,
    j1: usize,
) {
    // SAFETY: (every arm) the contract is passed on; the CPU runs `isa`.
    unsafe {
        match (isa, form) {
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, Form::Nt) => avx512::nt_cols(out, m, x, w, n, k, j0, j1),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx512, Form::Nn) => avx512::nn_cols(out, m, x, w, n, k, m, j0, j1),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Form::Nt) => avx2::nt_cols(out, m, x, w, n, k, j0, j1),
            #[cfg(target_arch = "x86_64")]
            (Isa::Avx2, Form::Nn) => avx2::nn_cols(out, m, x, w, n, k, m, j0, j1),
            (_, Form::Nt) => nt_cols_portable(out, m, x, w, n, k, j0, j1),
            (_, Form::Nn) => nn_cols_portable(out, m, x, w, n, k, m, j0, j1),
        }
    }
}

/// One chunk of columns `j0..j1` of one call, on whichever kernel fits `n`.
///
/// # Safety
/// `out` is valid for `n * m` elements (row stride `m`) and columns `j0..j1` are this chunk's
/// alone; `x` holds `n * k` and `w` `m * k` elements.
#[allow(clippy::too_many_arguments)]
unsafe fn chunk(
    g: Gemm,
    form: Form,
    out: Out,
    x: &[f32],
    w: &[f32],
    n: usize,
    k: usize,
    m: usize,
    j0: usize,
    j1: usize,
) {
    if n <= g.stream_max_rows {
        // SAFETY: the contract is passed on; `isa()` is what this CPU runs.
        return unsafe { stream(isa(), form, out, x, w, n, k, m, j0, j1) };
    }
    // B = W's columns j0..j1: for nt rows j0..j1 of w[m, k] read transposed (row stride 1,
    // column stride k); for nn columns j0..j1 of w[k, m] (row stride m, column stride 1).
    let (b, rsb, csb) = match form {
        Form::Nt => (w[j0 * k..].as_ptr(), 1, k as isize),
        Form::Nn => (w[j0..].as_ptr(), m as isize, 1),
    };
    // SAFETY: A is x (n×k row-major); B spans k×(j1-j0) elements within w by the strides above;
    // C is out's columns j0..j1 with row stride m, ours alone (the contract).
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            j1 - j0,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            b,
            rsb,
            csb,
            0.0,
            out.0.add(j0),
            m as isize,
            1,
        );
    }
}

/// The threads the CPU backend may use in all: the machine's cores, or fewer with `PAT_THREADS`.
pub fn cpu_threads() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::var("PAT_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&t| t > 0)
            .map_or(cores, |t| t.min(cores))
    })
}

/// Host bytes `matrixmultiply::sgemm` allocates on each call that packs its operands (above
/// [`STREAM_MAX_ROWS`] rows): panels of at most kc x (mc + nc) = 256 x (64 + 1024) f32, plus its
/// alignment.
const SGEMM_PACK_BYTES: u64 = 256 * (64 + 1024) * 4 + 64;

/// The most host bytes packed GEMMs hold at once while `ranks` rank threads compute: one
/// packing per rank thread and per helper of the shared pool.
pub fn pack_bytes_bound(ranks: usize) -> u64 {
    (ranks + cpu_threads().saturating_sub(1)) as u64 * SGEMM_PACK_BYTES
}

/// The shared helper pool: `cpu_threads() - 1` workers (rank threads compute a chunk themselves).
fn pool() -> Option<&'static rayon::ThreadPool> {
    static P: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    P.get_or_init(|| {
        let t = cpu_threads().saturating_sub(1);
        if t == 0 {
            return None;
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .thread_name(|i| format!("pat-gemm-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// How a rank runs its GEMMs: on `threads` threads (its own plus pool helpers), streaming up to
/// `stream_max_rows` rows ([`STREAM_MAX_ROWS`]; `pat bench gemm` sets 0 to time the packed path).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub threads: usize,
    pub stream_max_rows: usize,
}

impl Default for Gemm {
    fn default() -> Self {
        Gemm {
            threads: 1,
            stream_max_rows: STREAM_MAX_ROWS,
        }
    }
}

impl Gemm {
    /// A rank's share of the machine when `busy` ranks compute at once.
    pub fn share(busy: usize) -> Gemm {
        Gemm {
            threads: (cpu_threads() / busy.max(1)).max(1),
            ..Gemm::default()
        }
    }

    /// Runs `f` on every item, on this rank's threads: the first on the caller, the rest on the
    /// shared pool (all on the caller with one thread).
    pub fn each<T: Send>(self, items: Vec<T>, f: impl Fn(T) + Sync) {
        let pool = if items.len() > 1 && self.threads > 1 {
            pool()
        } else {
            None
        };
        let Some(pool) = pool else {
            return items.into_iter().for_each(f);
        };
        pool.in_place_scope(|s| {
            let mut it = items.into_iter();
            let first = it.next();
            for item in it {
                let f = &f;
                s.spawn(move |_| f(item));
            }
            if let Some(item) = first {
                f(item);
            }
        });
    }

    /// `out[n, m] = x[n, k] · w[m, k]ᵀ` (weights stored [out, in]).
    pub fn nt(self, out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
        self.run(Form::Nt, out, x, w, n, k, m)
    }

    /// `out[n, m] = x[n, k] · w[k, m]` (row-parallel weights stored [in, out]).
    pub fn nn(self, out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
        self.run(Form::Nn, out, x, w, n, k, m)
    }

    #[allow(clippy::too_many_arguments)]
    fn run(self, form: Form, out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
        assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
        if n == 0 || m == 0 {
            return;
        }
        if k == 0 {
            return out[..n * m].fill(0.0);
        }
        let o = Out(out.as_mut_ptr());
        // Chunks aligned to the kernels' tiles (4 weight rows, 16 lanes), at most one per thread.
        let parts = self.threads.min(m * k / MIN_PAR_WORK).max(1);
        let pool = if parts > 1 { pool() } else { None };
        let Some(pool) = pool else {
            // SAFETY: `out` holds n×m (asserted) and is borrowed mutably for the whole call.
            return unsafe { chunk(self, form, o, x, w, n, k, m, 0, m) };
        };
        let step = m.div_ceil(parts).div_ceil(16) * 16;
        pool.in_place_scope(|s| {
            for j0 in (step..m).step_by(step) {
                let j1 = (j0 + step).min(m);
                // SAFETY: columns j0..j1 are this chunk's alone (the ranges do not overlap);
                // `out` stays mutably borrowed until the scope has joined every chunk.
                s.spawn(move |_| unsafe { chunk(self, form, o, x, w, n, k, m, j0, j1) });
            }
            // SAFETY: as above, columns 0..step.
            unsafe { chunk(self, form, o, x, w, n, k, m, 0, step.min(m)) };
        });
    }
}

/// out[n, m] = x[n, k] · w[m, k]ᵀ (weights stored [out, in]), on the calling thread.
pub fn matmul_nt(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    Gemm::default().nt(out, x, w, n, k, m)
}

/// out[n, m] = x[n, k] · w[k, m] (row-parallel weights stored [in, out]), on the calling thread.
pub fn matmul_nn(out: &mut [f32], x: &[f32], w: &[f32], n: usize, k: usize, m: usize) {
    Gemm::default().nn(out, x, w, n, k, m)
}

#[cfg(test)]
mod tests;
