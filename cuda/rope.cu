// rope.cu - rotary position embedding, HF "rotate_half" convention, in place on q and k.
//
// For token t at position pos = positions[t], every head vector x of q and k, and i < head_dim/2:
//   a = pos * inv_freq[i]  (f32),  c = cos(a), s = sin(a)
//   x'[i]          = x[i] * c - x[i + head_dim/2] * s
//   x'[i + hd/2]   = x[i + head_dim/2] * c + x[i] * s
// i.e. rotated pairs are (i, i + head_dim/2), as in HF LLaMA / Qwen. inv_freq [head_dim/2] (f32) is
// computed on the host, so default RoPE and llama3 frequency scaling are both just different tables.
// Math is f32 with accurate sincosf (positions reach tens of thousands of radians); the result is
// rounded to T once. (HF rounds cos/sin to T first; the difference is within the bf16 tolerance.)
// Qwen3's q/k norm is qk_norm_<dt> in rmsnorm.cu; apply it before this kernel.
//
// Shapes: q head h of token t at q + t*q_token_stride + h*head_dim (k likewise, with num_kv_heads),
//   so q/k may be views into a fused QKV buffer; positions i32 [n_tokens]; head_dim even, <= 256.
// Entry points: rope_bf16, rope_f16, rope_f32 (PatRopeParams).
// Launch: grid (n_tokens), block (256) (any multiple of 32 up to 1024), no dynamic shared memory
//   (1 KiB static for the token's cos/sin table).
// Test: against the CPU backend's rope on random q/k, positions in {0, 1, 17, 8191, 32767}, both
//   default and llama3-scaled inv_freq tables; tolerance abs+rel 1e-5 (f32), 1e-2 (bf16),
//   2e-3 (f16). Bench (none yet): bytes read + written / time (it is memory bound).
#include "common.cuh"

namespace {

template <typename T> __device__ void rope(const PatRopeParams& p) {
    __shared__ float cs[PAT_MAX_HEAD_DIM / 2], sn[PAT_MAX_HEAD_DIM / 2];
    const int t = blockIdx.x;
    if (t >= p.n_tokens) return; // uniform across the block
    const int half = p.head_dim / 2;
    const float pos = (float)pat::ptr<const int32_t>(p.positions)[t];
    const float* inv_freq = pat::ptr<const float>(p.inv_freq);
    for (int i = threadIdx.x; i < half; i += blockDim.x) sincosf(pos * inv_freq[i], &sn[i], &cs[i]);
    __syncthreads();

    T* q = pat::ptr<T>(p.q) + (int64_t)t * p.q_token_stride;
    T* k = pat::ptr<T>(p.k) + (int64_t)t * p.k_token_stride;
    const int pairs = (p.num_q_heads + p.num_kv_heads) * half;
    for (int idx = threadIdx.x; idx < pairs; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        T* x = h < p.num_q_heads ? q + h * p.head_dim : k + (h - p.num_q_heads) * p.head_dim;
        const float x0 = pat::to_f32(x[i]), x1 = pat::to_f32(x[i + half]);
        x[i] = pat::from_f32<T>(x0 * cs[i] - x1 * sn[i]);
        x[i + half] = pat::from_f32<T>(x1 * cs[i] + x0 * sn[i]);
    }
}

} // namespace

PAT_EXPORT_DTYPES(rope, rope, PatRopeParams, 1024)
