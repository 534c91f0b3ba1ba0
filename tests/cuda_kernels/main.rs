//! Every CUDA kernel against the CPU oracle (src/backend/cpu/, kv::KvPool) or a plain host
//! reference: fresh random inputs (the seed is printed; PAT_SEED=<n> replays it), ragged shapes,
//! outputs poisoned with NaN before each launch, tolerances by dtype. Without a GPU every test
//! prints `SKIP: ...` and passes, unless PAT_REQUIRE_GPU=1 (then it fails). One file per kernel
//! family; the shared harness (tolerances, upload and poison helpers) is here.
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

fn random_cache(
    d: &CudaDev,
    r: &mut ChaCha8Rng,
    dt: DType,
    (hkv, hd, bs): (usize, usize, usize),
    ctxs: &[usize],
) -> RandomCache {
    RandomCache::new(d, r, dt, (hkv, hd, bs), ctxs).unwrap()
}

mod attention;
mod collectives;
mod gemm;
mod norm;
mod sampling;
mod setup;
