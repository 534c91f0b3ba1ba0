// prefill_attention.cu - causal attention for a batch of variable-length prompts (or prompt
// chunks) whose K/V are already in the paged cache (run kv_append first).
//
// Sequence s has q_len = cu_seqlens_q[s+1] - cu_seqlens_q[s] new tokens packed at rows
// cu_seqlens_q[s] .. of q/out, and L = context_lens[s] cached tokens in total, so the chunk starts
// at position c = L - q_len (c > 0 for chunked prefill or recompute on top of prior context).
// Query i (0-based in the chunk) of q head h attends to cached positions j <= c + i of kv head
// h / G (G = num_q_heads / num_kv_heads):
//   out[row, h, :] = sum_{j <= c+i} softmax_j(scale * q[row, h, :] . K[j]) * V[j]
// Online softmax in f32 (FlashAttention-2 order: running max and sum per row, rescaled output).
//
// Shapes: q token t head h at q + t*q_token_stride + h*head_dim (a view into fused QKV is fine);
//   out T [total_tokens, num_q_heads, head_dim]; k_cache, v_cache T [num_blocks, num_kv_heads,
//   block_size, head_dim]; block_tables i32 [num_seqs, max_blocks_per_seq]; cu_seqlens_q i32
//   [num_seqs + 1]; context_lens i32 [num_seqs].
// Entry points (PatPrefillAttentionParams): prefill_attention_{bf16,f16,f32}_hd{64,128,256}; use
//   the smallest HD >= head_dim (head_dim == HD takes the 16-byte load path).
// Launch: grid (ceil(max q_len / BQ), num_q_heads, num_seqs), block (PAT_PREFILL_ATTN_THREADS =
//   128), static shared memory only (< 48 KiB), where BQ = PAT_PREFILL_BQ_HD{64,128,256}
//   = 64 / 64 / 16. CTAs whose tile starts past their sequence's q_len exit at once.
// Design (deliberately plain; CUDA cores, no tensor cores): a CTA owns BQ queries of one head; it
//   stages the scaled Q tile in shared memory as f32, then walks the keys in tiles of 16: load the
//   K tile (f32, through the block table), each thread computes a small patch of scores (rows x
//   keys = 1x8 for HD 64, 2x4 for HD 128, 1x2 for HD 256), row max/sum via shuffles among the
//   threads sharing a row, P goes to shared memory, the V tile replaces K, and each thread updates
//   its rows x (HD/2, HD/4 or HD/8 dims) slice of the output in registers.
// Caller checks: G integral, head_dim <= HD, q_len <= context_lens[s], block tables cover L.
// Test: against the CPU backend's causal attention (f32 oracle) with random caches and shuffled
//   block tables: batches mixing q_len {1, 15, 16, 17, 100, 300} with prior context c {0, 5, 64},
//   G in {1, 4, 8}, head_dim {64, 96, 128, 256}; tolerance abs+rel 2e-5 (f32), 2e-2 (bf16),
//   3e-3 (f16). Also: a chunked prefill (two chunks) equals the one-shot prefill within tolerance.
// Bench (none yet): FLOP/s (4 * q_len * visible keys * head_dim per head) against the measured matrix rate,
//   and prefill tokens/s, which feeds the migrate-vs-recompute cost model.
#include "common.cuh"

namespace {

constexpr int THREADS = PAT_PREFILL_ATTN_THREADS;
constexpr int BK = 16; // keys per tile
constexpr int PAD = 4; // floats of row padding: keeps float4 alignment, spreads banks

template <typename T, int HD, int BQ> struct Tile {
    static constexpr int RPT = BQ * HD > 4096 ? 2 : 1; // query rows per thread
    static constexpr int NRG = BQ / RPT;               // row groups
    static constexpr int TPR = THREADS / NRG;          // threads sharing a row group (4 or 8)
    static constexpr int KPT = BK / TPR;               // keys per thread in the score patch
    static constexpr int CPT = HD / 4 / TPR;           // float4 output chunks per thread per row
    static_assert(NRG * TPR == THREADS && KPT * TPR == BK && CPT * TPR * 4 == HD, "tile shape");
};

// Load rows [0, BK) of a K or V tile (keys kt + j) as f32; keys >= kend and dims >= hd are zero.
template <typename T, int HD>
__device__ void load_kv_tile(float (*dst)[HD + PAD], const T* cache, const int32_t* table, int kt,
                             int kend, const PatPrefillAttentionParams& p, int kvh, bool fast) {
    constexpr int V = pat::VecWidth<T>::value;
    const int hd = p.head_dim, bs = p.block_size;
    if (fast) {
        constexpr int VPR = HD / V; // vectors per key row
        for (int idx = threadIdx.x; idx < BK * VPR; idx += THREADS) {
            const int j = idx / VPR, d = (idx - j * VPR) * V;
            float f[V];
            if (kt + j < kend) {
                const int key = kt + j;
                const int64_t row = ((int64_t)table[key / bs] * p.num_kv_heads + kvh) * bs + key % bs;
                const pat::Vec16<T> v = pat::load16(cache + row * hd + d);
#pragma unroll
                for (int e = 0; e < V; ++e) f[e] = pat::to_f32(v.v[e]);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) f[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < V; e += 4)
                *reinterpret_cast<float4*>(&dst[j][d + e]) = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
        }
    } else {
        for (int idx = threadIdx.x; idx < BK * HD; idx += THREADS) {
            const int j = idx / HD, d = idx - j * HD, key = kt + j;
            float f = 0.0f;
            if (key < kend && d < hd) {
                const int64_t row = ((int64_t)table[key / bs] * p.num_kv_heads + kvh) * bs + key % bs;
                f = pat::to_f32(cache[row * hd + d]);
            }
            dst[j][d] = f;
        }
    }
}

template <typename T, int HD, int BQ> __device__ void prefill_attention(const PatPrefillAttentionParams& p) {
    using S = Tile<T, HD, BQ>;
    constexpr int RPT = S::RPT, TPR = S::TPR, KPT = S::KPT, CPT = S::CPT;
    constexpr int V = pat::VecWidth<T>::value;
    __shared__ __align__(16) float Qs[BQ][HD + PAD];
    __shared__ __align__(16) float KVs[BK][HD + PAD];
    __shared__ float Ps[BQ][BK + 1];

    const int head = blockIdx.y, seq = blockIdx.z;
    const int32_t* cu = pat::ptr<const int32_t>(p.cu_seqlens_q);
    const int q_start = cu[seq], q_len = cu[seq + 1] - q_start;
    const int i0 = blockIdx.x * BQ;
    if (i0 >= q_len) return; // uniform across the block
    const int L = pat::ptr<const int32_t>(p.context_lens)[seq];
    const int c = L - q_len; // position of query 0
    const int kvh = head / (p.num_q_heads / p.num_kv_heads);
    const int hd = p.head_dim;
    const bool full = hd == HD;

    // Q tile -> shared memory, f32, pre-scaled; rows past q_len and dims past hd are zero.
    const T* q = pat::ptr<const T>(p.q) + (int64_t)head * hd;
    if (full && pat::aligned16(pat::ptr<const T>(p.q)) && p.q_token_stride % V == 0) {
        for (int idx = threadIdx.x; idx < BQ * (HD / V); idx += THREADS) {
            const int r = idx / (HD / V), d = (idx - r * (HD / V)) * V;
            float f[V];
            if (i0 + r < q_len) {
                const pat::Vec16<T> v = pat::load16(q + (int64_t)(q_start + i0 + r) * p.q_token_stride + d);
#pragma unroll
                for (int e = 0; e < V; ++e) f[e] = pat::to_f32(v.v[e]) * p.scale;
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) f[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < V; e += 4)
                *reinterpret_cast<float4*>(&Qs[r][d + e]) = make_float4(f[e], f[e + 1], f[e + 2], f[e + 3]);
        }
    } else {
        for (int idx = threadIdx.x; idx < BQ * HD; idx += THREADS) {
            const int r = idx / HD, d = idx - r * HD;
            Qs[r][d] = i0 + r < q_len && d < hd
                           ? pat::to_f32(q[(int64_t)(q_start + i0 + r) * p.q_token_stride + d]) * p.scale
                           : 0.0f;
        }
    }

    const int rg = threadIdx.x / TPR, cidx = threadIdx.x % TPR;
    int limit[RPT]; // last visible key per owned row (rows past q_len borrow the last real row's)
    float m[RPT], l[RPT], o[RPT][CPT * 4];
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        limit[r] = c + min(i0 + rg * RPT + r, q_len - 1);
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int i = 0; i < CPT * 4; ++i) o[r][i] = 0.0f;
    }

    const int32_t* table = pat::ptr<const int32_t>(p.block_tables) + (int64_t)seq * p.max_blocks_per_seq;
    const T* k_cache = pat::ptr<const T>(p.k_cache);
    const T* v_cache = pat::ptr<const T>(p.v_cache);
    const bool kv_fast = full && pat::aligned16(k_cache) && pat::aligned16(v_cache);
    const int kend = c + min(i0 + BQ, q_len); // keys [0, kend) are visible to some row of the tile

    for (int kt = 0; kt < kend; kt += BK) {
        load_kv_tile<T, HD>(KVs, k_cache, table, kt, kend, p, kvh, kv_fast);
        __syncthreads(); // K tile (and, first time, Q tile) ready

        // Scores for rows rg*RPT + r and keys kk*TPR + cidx (interleaved to avoid bank conflicts).
        float s[RPT][KPT];
#pragma unroll
        for (int r = 0; r < RPT; ++r)
#pragma unroll
            for (int kk = 0; kk < KPT; ++kk) s[r][kk] = 0.0f;
#pragma unroll 4
        for (int d = 0; d < HD; d += 4) {
            float4 qv[RPT], kv[KPT];
#pragma unroll
            for (int r = 0; r < RPT; ++r) qv[r] = *reinterpret_cast<const float4*>(&Qs[rg * RPT + r][d]);
#pragma unroll
            for (int kk = 0; kk < KPT; ++kk) kv[kk] = *reinterpret_cast<const float4*>(&KVs[kk * TPR + cidx][d]);
#pragma unroll
            for (int r = 0; r < RPT; ++r)
#pragma unroll
                for (int kk = 0; kk < KPT; ++kk)
                    s[r][kk] += qv[r].x * kv[kk].x + qv[r].y * kv[kk].y + qv[r].z * kv[kk].z + qv[r].w * kv[kk].w;
        }

        // Online softmax update per row; the TPR threads of a row group are adjacent lanes.
#pragma unroll
        for (int r = 0; r < RPT; ++r) {
            float mx = -INFINITY;
#pragma unroll
            for (int kk = 0; kk < KPT; ++kk) {
                if (kt + kk * TPR + cidx > limit[r]) s[r][kk] = -INFINITY;
                mx = fmaxf(mx, s[r][kk]);
            }
#pragma unroll
            for (int off = TPR / 2; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float m_new = fmaxf(m[r], mx); // finite: key 0 is visible to every row
            const float alpha = __expf(m[r] - m_new);
            float sum = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KPT; ++kk) {
                const float pr = __expf(s[r][kk] - m_new);
                sum += pr;
                Ps[rg * RPT + r][kk * TPR + cidx] = pr;
            }
#pragma unroll
            for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
            m[r] = m_new;
            l[r] = l[r] * alpha + sum;
#pragma unroll
            for (int i = 0; i < CPT * 4; ++i) o[r][i] *= alpha;
        }
        __syncthreads(); // everyone is done with K; P is visible

        load_kv_tile<T, HD>(KVs, v_cache, table, kt, kend, p, kvh, kv_fast);
        __syncthreads(); // V tile ready

#pragma unroll 4
        for (int j = 0; j < BK; ++j) {
            float pj[RPT];
#pragma unroll
            for (int r = 0; r < RPT; ++r) pj[r] = Ps[rg * RPT + r][j];
#pragma unroll
            for (int i = 0; i < CPT; ++i) {
                const float4 v = *reinterpret_cast<const float4*>(&KVs[j][(cidx + TPR * i) * 4]);
#pragma unroll
                for (int r = 0; r < RPT; ++r) {
                    o[r][4 * i + 0] += pj[r] * v.x;
                    o[r][4 * i + 1] += pj[r] * v.y;
                    o[r][4 * i + 2] += pj[r] * v.z;
                    o[r][4 * i + 3] += pj[r] * v.w;
                }
            }
        }
        __syncthreads(); // done with V and P before the next tile overwrites them
    }

    T* out = pat::ptr<T>(p.out);
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        const int i = i0 + rg * RPT + r;
        if (i >= q_len) continue;
        const float inv = 1.0f / l[r];
        T* orow = out + ((int64_t)(q_start + i) * p.num_q_heads + head) * hd;
#pragma unroll
        for (int ch = 0; ch < CPT; ++ch)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int d = (cidx + TPR * ch) * 4 + e;
                if (d < hd) orow[d] = pat::from_f32<T>(o[r][4 * ch + e] * inv);
            }
    }
}

} // namespace

#define PAT_EXPORT_PREFILL(DT, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS)                                          \
        prefill_attention_##DT##_hd64(PatPrefillAttentionParams p) {                               \
        prefill_attention<T, 64, PAT_PREFILL_BQ_HD64>(p);                                          \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                          \
        prefill_attention_##DT##_hd128(PatPrefillAttentionParams p) {                              \
        prefill_attention<T, 128, PAT_PREFILL_BQ_HD128>(p);                                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS)                                          \
        prefill_attention_##DT##_hd256(PatPrefillAttentionParams p) {                              \
        prefill_attention<T, 256, PAT_PREFILL_BQ_HD256>(p);                                        \
    }

PAT_EXPORT_PREFILL(bf16, pat::bf16)
PAT_EXPORT_PREFILL(f16, pat::f16)
PAT_EXPORT_PREFILL(f32, float)
