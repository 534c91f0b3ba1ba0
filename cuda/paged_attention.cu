// paged_attention.cu - decode attention over the paged KV cache, with optional split-K
// ("flash-decoding") over the context.
//
// One query token per sequence. For sequence s, q head h, kv head kh = h / G (G = num_q_heads /
// num_kv_heads, 1..8) and cached positions j < L = context_lens[s]:
//   out[s, h, :] = sum_j softmax_j(scale * q[s, h, :] . K[j, kh, :]) * V[j, kh, :]
// where token j of sequence s lives in physical block block_tables[s, j / block_size] at offset
// j % block_size. Softmax is computed online in f32 (running max / sum, rescaled accumulator).
//
// Shapes: q head h of seq s at q + s*q_token_stride + h*head_dim; out T [num_seqs, num_q_heads,
//   head_dim]; k_cache, v_cache T [num_blocks, num_kv_heads, block_size, head_dim];
//   block_tables i32 [num_seqs, max_blocks_per_seq]; context_lens i32 [num_seqs].
// Entry points (PatPagedAttentionParams), HD = 64 / 128 / 256 is the largest head_dim served:
//   paged_attention_{bf16,f16,f32}_hd{64,128,256}   main kernel
//   paged_attention_reduce_{bf16,f16,f32}          split-K combine
//   Use the smallest HD >= head_dim; head_dim == HD takes the vectorised path, a smaller head_dim
//   (e.g. 80, 96) is correct but uses scalar loads.
// Launch (main): grid (num_kv_heads, num_seqs, max_partitions), block (PAT_PAGED_ATTN_THREADS =
//   128), static shared memory only (4 * 8 * HD * 4 bytes + small), no dynamic shared memory.
//   A CTA handles all G q heads of one kv head for one partition of partition_size tokens, so each
//   K/V row is read once per kv head. Its 4 warps take the partition's cache blocks round-robin;
//   within a warp each lane owns HD/32 consecutive dims, dot products are warp-shuffle sums, and
//   4 (HD <= 128) or 2 (HD = 256) tokens are loaded per step for memory-level parallelism. Warps
//   are merged through shared memory at the end.
//   No split: partition_size <= 0 and max_partitions = 1 -> the main kernel writes `out`; tmp_*
//   may be 0 and the reduce kernel is not launched.
//   Split: partition_size = P (multiple of block_size, e.g. 512), max_partitions = ceil(max L / P)
//   (<= PAT_MAX_PARTITIONS). Partitions past a sequence's length exit at once. A sequence with a
//   single partition is written to `out` directly; the others write un-normalised partial outputs
//   with their max and sum to tmp_*, and the reduce kernel - grid (num_q_heads, num_seqs), block
//   (PAT_PAGED_ATTN_REDUCE_THREADS = 128), 4 KiB static shared memory - combines them. Split when
//   num_seqs * num_kv_heads is small relative to the SM count and contexts are long.
//   A sequence with L = 0 gets zeros.
// Caller checks: num_q_heads % num_kv_heads == 0, G <= PAT_MAX_GQA, head_dim <= HD,
//   partition_size % block_size == 0, max_partitions <= PAT_MAX_PARTITIONS, every block table entry
//   below L / block_size valid.
// Test: against the CPU backend's paged attention (f32 oracle) on random caches with shuffled
//   block tables: G in {1, 4, 5, 8}, head_dim in {64, 96, 128, 256}, L in {1, 15, 16, 17, 1000,
//   5000}, with and without split (P = 512 and P = 16); tolerance abs+rel 2e-5 (f32), 2e-2 (bf16),
//   3e-3 (f16). Bench: `pat bench attention --num-seqs 1,16,64 --context 2048,8192` (KV bytes
//   read / time vs the measured device copy bandwidth).
#include "common.cuh"

namespace {

constexpr int NW = PAT_PAGED_ATTN_THREADS / 32;
constexpr int GQA = PAT_MAX_GQA;

template <typename T, int HD> __device__ void paged_attention(const PatPagedAttentionParams& p) {
    constexpr int E = HD / 32;             // dims per lane
    constexpr int U = HD <= 128 ? 4 : 2;   // tokens per step
    __shared__ float red_acc[NW][GQA][HD]; // per-warp partial outputs
    __shared__ float red_m[NW][GQA], red_l[NW][GQA];

    const int kvh = blockIdx.x, seq = blockIdx.y, part = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int G = p.num_q_heads / p.num_kv_heads;
    const int hd = p.head_dim;
    const int L = pat::ptr<const int32_t>(p.context_lens)[seq];
    const bool split = p.partition_size > 0;
    const int P = split ? p.partition_size : L;
    const int start = part * P;
    const int num_parts = split ? (L + P - 1) / P : 1;
    const int64_t out_row = (int64_t)seq * p.num_q_heads + (int64_t)kvh * G; // first q head row
    T* out = pat::ptr<T>(p.out) + out_row * hd;

    if (L <= 0) { // nothing to attend to: zeros (written once, by partition 0)
        if (part == 0)
            for (int i = threadIdx.x; i < G * hd; i += blockDim.x) out[i] = pat::from_f32<T>(0.0f);
        return;
    }
    if (start >= L) return; // partition past this sequence's end
    const int end = min(L, start + P);

    // This lane's slice of the G query vectors, pre-multiplied by scale.
    const int d0 = lane * E;
    const int nv = max(0, min(E, hd - d0));
    const bool full = hd == HD;
    constexpr int ALIGN_ELEMS = alignof(pat::LaneVec<T, E>) / sizeof(T);
    const T* qbase = pat::ptr<const T>(p.q) + (int64_t)seq * p.q_token_stride + (int64_t)kvh * G * hd;
    const bool q_fast = full && pat::aligned16(pat::ptr<const T>(p.q)) && p.q_token_stride % ALIGN_ELEMS == 0;
    float q[GQA][E];
#pragma unroll
    for (int g = 0; g < GQA; ++g) {
        if (g < G) {
            pat::load_lane<T, E>(qbase + g * hd + d0, q_fast, nv, q[g]);
#pragma unroll
            for (int e = 0; e < E; ++e) q[g][e] *= p.scale;
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) q[g][e] = 0.0f;
        }
    }

    float m[GQA], l[GQA], acc[GQA][E];
#pragma unroll
    for (int g = 0; g < GQA; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[g][e] = 0.0f;
    }

    const int bs = p.block_size;
    const int32_t* table = pat::ptr<const int32_t>(p.block_tables) + (int64_t)seq * p.max_blocks_per_seq;
    const T* k_cache = pat::ptr<const T>(p.k_cache);
    const T* v_cache = pat::ptr<const T>(p.v_cache);
    const bool kv_fast = full && pat::aligned16(k_cache) && pat::aligned16(v_cache);

    for (int b = start / bs + warp; b * bs < end; b += NW) {
        const int64_t head_off = ((int64_t)table[b] * p.num_kv_heads + kvh) * bs * hd;
        const T* kb = k_cache + head_off + d0;
        const T* vb = v_cache + head_off + d0;
        const int tok0 = b * bs;
        const int hi = min(tok0 + bs, end);
        for (int t = tok0; t < hi; t += U) {
            float kk[U][E], vv[U][E];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const bool ok = t + u < hi;
                const int64_t off = (int64_t)(t + u - tok0) * hd;
                pat::load_lane<T, E>(kb + off, kv_fast && ok, ok ? nv : 0, kk[u]);
                pat::load_lane<T, E>(vb + off, kv_fast && ok, ok ? nv : 0, vv[u]);
            }
#pragma unroll
            for (int g = 0; g < GQA; ++g) {
                if (g >= G) break;
                float s[U];
                float mx = m[g];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    float d = 0.0f;
#pragma unroll
                    for (int e = 0; e < E; ++e) d += q[g][e] * kk[u][e];
                    d = pat::warp_sum(d);
                    s[u] = t + u < hi ? d : -INFINITY;
                    mx = fmaxf(mx, s[u]);
                }
                const float alpha = __expf(m[g] - mx); // m = -inf on the first step -> 0
                m[g] = mx;
                l[g] *= alpha;
#pragma unroll
                for (int e = 0; e < E; ++e) acc[g][e] *= alpha;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const float pu = __expf(s[u] - mx);
                    l[g] += pu;
#pragma unroll
                    for (int e = 0; e < E; ++e) acc[g][e] += pu * vv[u][e];
                }
            }
        }
    }

    // Merge the warps: each warp publishes (m, l, acc), then threads combine per (g, d).
#pragma unroll
    for (int g = 0; g < GQA; ++g) {
        if (g >= G) break;
        if (lane == 0) {
            red_m[warp][g] = m[g];
            red_l[warp][g] = l[g];
        }
#pragma unroll
        for (int e = 0; e < E; ++e) red_acc[warp][g][d0 + e] = acc[g][e];
    }
    __syncthreads();

    const bool direct = num_parts == 1;
    const int64_t tmp_row = (out_row * p.max_partitions + part); // (seq, head, part) of head g=0
    for (int i = threadIdx.x; i < G * hd; i += blockDim.x) {
        const int g = i / hd, d = i - g * hd;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; ++w) M = fmaxf(M, red_m[w][g]);
        float sum = 0.0f, o = 0.0f;
#pragma unroll
        for (int w = 0; w < NW; ++w) {
            const float f = red_m[w][g] == -INFINITY ? 0.0f : __expf(red_m[w][g] - M);
            sum += f * red_l[w][g];
            o += f * red_acc[w][g][d];
        }
        if (direct) {
            out[(int64_t)g * hd + d] = pat::from_f32<T>(o / sum);
        } else {
            const int64_t r = tmp_row + (int64_t)g * p.max_partitions;
            pat::ptr<float>(p.tmp_out)[r * hd + d] = o;
            if (d == 0) {
                pat::ptr<float>(p.tmp_max)[r] = M;
                pat::ptr<float>(p.tmp_sum)[r] = sum;
            }
        }
    }
}

// Combine the partitions of one (seq, q head): out = sum_i e^(m_i - M) o_i / sum_i e^(m_i - M) l_i.
template <typename T> __device__ void paged_attention_reduce(const PatPagedAttentionParams& p) {
    __shared__ float weight[PAT_MAX_PARTITIONS];
    const int head = blockIdx.x, seq = blockIdx.y;
    const int L = pat::ptr<const int32_t>(p.context_lens)[seq];
    if (p.partition_size <= 0) return;
    const int n = (L + p.partition_size - 1) / p.partition_size;
    if (n <= 1) return; // written directly by the main kernel
    const int64_t row = ((int64_t)seq * p.num_q_heads + head) * p.max_partitions;
    const float* mx = pat::ptr<const float>(p.tmp_max) + row;
    const float* sm = pat::ptr<const float>(p.tmp_sum) + row;
    const float* po = pat::ptr<const float>(p.tmp_out) + row * p.head_dim;

    float M = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) M = fmaxf(M, mx[i]);
    M = pat::block_max(M);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        weight[i] = __expf(mx[i] - M);
        sum += weight[i] * sm[i];
    }
    const float inv = 1.0f / pat::block_sum(sum); // block_sum's barriers publish weight[]
    T* out = pat::ptr<T>(p.out) + ((int64_t)seq * p.num_q_heads + head) * p.head_dim;
    for (int d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int i = 0; i < n; ++i) o += weight[i] * po[(int64_t)i * p.head_dim + d];
        out[d] = pat::from_f32<T>(o * inv);
    }
}

} // namespace

#define PAT_EXPORT_PAGED(DT, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(PAT_PAGED_ATTN_THREADS)                           \
        paged_attention_##DT##_hd64(PatPagedAttentionParams p) { paged_attention<T, 64>(p); }     \
    extern "C" __global__ void __launch_bounds__(PAT_PAGED_ATTN_THREADS)                           \
        paged_attention_##DT##_hd128(PatPagedAttentionParams p) { paged_attention<T, 128>(p); }   \
    extern "C" __global__ void __launch_bounds__(PAT_PAGED_ATTN_THREADS)                           \
        paged_attention_##DT##_hd256(PatPagedAttentionParams p) { paged_attention<T, 256>(p); }

PAT_EXPORT_PAGED(bf16, pat::bf16)
PAT_EXPORT_PAGED(f16, pat::f16)
PAT_EXPORT_PAGED(f32, float)
PAT_EXPORT_DTYPES(paged_attention_reduce, paged_attention_reduce, PatPagedAttentionParams,
                  PAT_PAGED_ATTN_REDUCE_THREADS)
