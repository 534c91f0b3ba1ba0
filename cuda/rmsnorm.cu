// rmsnorm.cu - RMSNorm, fused residual-add + RMSNorm, and Qwen3's per-head q/k norm.
//
// rmsnorm_<dt>            out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * weight
// fused_add_rmsnorm_<dt>  r = x + residual (rounded to T); residual = r; out = rmsnorm(r) * weight
// qk_norm_<dt>            Qwen3 q_norm / k_norm: the same RMSNorm over head_dim for every head of
//                         q and k, in place, with weights q_weight / k_weight [head_dim]. It lives
//                         here (not in rope.cu); run it before rope_<dt>.
// Numerics: x is widened to f32, the sum of squares is accumulated in f32, and the result
// x * inv_rms * w is rounded to T once (HF rounds x * inv_rms to T before multiplying by w, which
// differs by at most one rounding). The fused variant normalises the *rounded* sum r, as HF does
// when the residual stream is kept in T.
//
// Shapes (row-major): x, out, residual T [n_rows, dim], weight T [dim]; out may alias x.
//   qk_norm: q head h of token t at q + t*q_token_stride + h*head_dim (k likewise), so q/k may be
//   views into a fused QKV buffer.
// Launch:
//   rmsnorm_*, fused_add_rmsnorm_*: grid (n_rows), block (256) (any multiple of 32 up to 1024),
//     no dynamic shared memory. 16-byte vector path when dim*sizeof(T) % 16 == 0 and pointers are
//     16-byte aligned.
//   qk_norm_*: one warp per (token, head) row; block (256) = 8 rows, grid
//     (ceil(n_tokens * (num_q_heads + num_kv_heads) / 8)); head_dim <= 256 (caller checks).
// Test: against the CPU backend's rmsnorm / fused_add_rmsnorm / qk_norm on random inputs with
//   n_rows in {1, 7, 64}, dim in {64, 128, 4096, 4100 (scalar path)}; tolerance abs+rel 1e-5 (f32),
//   1e-2 (bf16), 2e-3 (f16); the fused variant's residual output must match the oracle's rounded sum.
// Bench (none yet): bytes read + written / time vs measured copy bandwidth.
#include "common.cuh"

namespace {

template <typename T, bool FUSED> __device__ void rmsnorm_rows(const PatRmsNormParams& p) {
    const int row = blockIdx.x;
    if (row >= p.n_rows) return; // uniform across the block
    const int64_t base = (int64_t)row * p.dim;
    const T* x = pat::ptr<const T>(p.x) + base;
    T* res = FUSED ? pat::ptr<T>(p.residual) + base : nullptr;
    T* out = pat::ptr<T>(p.out) + base;
    const T* w = pat::ptr<const T>(p.weight);

    constexpr int V = pat::VecWidth<T>::value;
    const bool vec = p.dim % V == 0 && pat::aligned16(x) && pat::aligned16(out) &&
                     pat::aligned16(w) && (!FUSED || pat::aligned16(res));

    // Pass 1: (fused: form and store r) and accumulate sum of squares.
    float ss = 0.0f;
    if (vec) {
        for (int i = threadIdx.x * V; i < p.dim; i += blockDim.x * V) {
            pat::Vec16<T> xv = pat::load16(x + i);
            if (FUSED) {
                pat::Vec16<T> rv = pat::load16(res + i);
#pragma unroll
                for (int j = 0; j < V; ++j)
                    xv.v[j] = pat::from_f32<T>(pat::to_f32(xv.v[j]) + pat::to_f32(rv.v[j]));
                pat::store16(res + i, xv);
            }
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const float f = pat::to_f32(xv.v[j]);
                ss += f * f;
            }
        }
    } else {
        for (int i = threadIdx.x; i < p.dim; i += blockDim.x) {
            T xi = x[i];
            if (FUSED) {
                xi = pat::from_f32<T>(pat::to_f32(xi) + pat::to_f32(res[i]));
                res[i] = xi;
            }
            const float f = pat::to_f32(xi);
            ss += f * f;
        }
    }
    const float inv = rsqrtf(pat::block_sum(ss) / (float)p.dim + p.eps);

    // Pass 2: each thread re-reads exactly the elements it handled in pass 1 (so out may alias x,
    // and the fused variant sees its own residual writes).
    const T* src = FUSED ? res : x;
    if (vec) {
        for (int i = threadIdx.x * V; i < p.dim; i += blockDim.x * V) {
            const pat::Vec16<T> xv = pat::load16(src + i), wv = pat::load16(w + i);
            pat::Vec16<T> o;
#pragma unroll
            for (int j = 0; j < V; ++j)
                o.v[j] = pat::from_f32<T>(pat::to_f32(xv.v[j]) * inv * pat::to_f32(wv.v[j]));
            pat::store16(out + i, o);
        }
    } else {
        for (int i = threadIdx.x; i < p.dim; i += blockDim.x)
            out[i] = pat::from_f32<T>(pat::to_f32(src[i]) * inv * pat::to_f32(w[i]));
    }
}

template <typename T> __device__ void rmsnorm(const PatRmsNormParams& p) { rmsnorm_rows<T, false>(p); }
template <typename T> __device__ void fused_add_rmsnorm(const PatRmsNormParams& p) {
    rmsnorm_rows<T, true>(p);
}

// One warp normalises one head vector of q or k; lane l holds elements l, l+32, ... (<= 8 each).
template <typename T> __device__ void qk_norm(const PatQkNormParams& p) {
    constexpr int MAX_PER_LANE = PAT_MAX_HEAD_DIM / 32;
    const int lane = threadIdx.x & 31;
    const int heads = p.num_q_heads + p.num_kv_heads;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= (int64_t)p.n_tokens * heads) return; // uniform across the warp
    const int64_t t = row / heads;
    const int h = (int)(row % heads);
    const bool is_q = h < p.num_q_heads;
    T* v = is_q ? pat::ptr<T>(p.q) + t * p.q_token_stride + (int64_t)h * p.head_dim
                : pat::ptr<T>(p.k) + t * p.k_token_stride + (int64_t)(h - p.num_q_heads) * p.head_dim;
    const T* w = pat::ptr<const T>(is_q ? p.q_weight : p.k_weight);

    float vals[MAX_PER_LANE];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        vals[j] = d < p.head_dim ? pat::to_f32(v[d]) : 0.0f;
        ss += vals[j] * vals[j];
    }
    const float inv = rsqrtf(pat::warp_sum(ss) / (float)p.head_dim + p.eps);
#pragma unroll
    for (int j = 0; j < MAX_PER_LANE; ++j) {
        const int d = lane + 32 * j;
        if (d < p.head_dim) v[d] = pat::from_f32<T>(vals[j] * inv * pat::to_f32(w[d]));
    }
}

} // namespace

PAT_EXPORT_DTYPES(rmsnorm, rmsnorm, PatRmsNormParams, 1024)
PAT_EXPORT_DTYPES(fused_add_rmsnorm, fused_add_rmsnorm, PatRmsNormParams, 1024)
PAT_EXPORT_DTYPES(qk_norm, qk_norm, PatQkNormParams, 256)
