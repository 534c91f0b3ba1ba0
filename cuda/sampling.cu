// sampling.cu - greedy argmax and temperature / top-k / top-p sampling over logits rows.
//
// argmax_<dt>: out_idx[r] = index_offset + argmax_i logits[r, i] over i < vocab; ties go to the
//   lowest index; NaN counts as -inf (an all-NaN or all -inf row gives index 0). out_val[r]
//   (optional) gets the max as f32, so ranks holding vocab shards can finish a distributed argmax
//   (largest value, then lowest global index).
// sample_<dt>: for each row, with u = uniforms[r] in [0, 1) drawn on the host:
//   1. temperature <= 0 -> argmax (as above, offset 0).
//   2. weights w_i = exp((x_i - max x) / temperature) in f32, stored as fixed point
//      q_i = floor(w_i * 2^32) (u64), so every sum below is exact and the result is deterministic.
//   3. top-k (0 < top_k < vocab): keep x_i >= the k-th largest value (radix select on the
//      order-preserving integer image of the float; ties at the threshold are all kept).
//   4. top-p (top_p < 1): among the kept, keep the fewest largest values whose mass reaches
//      ceil(top_p * Z) (radix select on mass; ties at the threshold are all kept). This is HF's
//      order: temperature, then top-k, then top-p renormalised over the top-k survivors.
//   5. draw: the smallest index i (in vocab order) whose running kept mass exceeds
//      floor(u * Z_kept) (inverse CDF in index order).
//   The CPU oracle implements the same fixed-point steps; expf differs between CPU and GPU by an
//   ulp, so tests pick u away from bucket boundaries or compare frequencies.
//
// Shapes: logits T [n_rows, row_stride] (first `vocab` columns used), out_idx u32 [n_rows],
//   out_val f32 [n_rows] (nullable), uniforms f32 [n_rows].
// Entry points: argmax_{bf16,f16,f32} (PatArgmaxParams), sample_{bf16,f16,f32} (PatSampleParams).
// Launch: grid (n_rows), block (PAT_SAMPLE_THREADS = 1024), static shared memory (~2.5 KiB), no
//   dynamic shared memory. One block per row; each pass reads the row from global memory (L2).
// Cost: argmax is one pass. sample is 2 passes + 5 with top-k + 5 with top-p; histogram atomics
//   contend when logits share exponents. Correctness first; a faster sampler can replace it.
// Test: argmax against the CPU oracle bitwise (ties, NaN, -inf rows, vocab not a multiple of 8,
//   row_stride > vocab). sample: exact index match against the oracle for u in a grid away from
//   boundaries; top_k = 1 equals argmax; top_p -> 0 equals argmax; frequencies over 10^5 draws
//   within 4 sigma of the filtered softmax. Bench (none yet): rows/s at vocab 151936 for batch {1, 64}.
#include "common.cuh"

namespace {

constexpr int THREADS = PAT_SAMPLE_THREADS;
constexpr int NWARPS = THREADS / 32;

template <typename T> __device__ __forceinline__ float logit(const T* row, int i) {
    const float x = pat::to_f32(row[i]);
    return isnan(x) ? -INFINITY : x;
}

// Order-preserving map float -> u32 (a > b  <=>  key(a) > key(b) for non-NaN floats).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Is (v, i) better than (bv, bi)? Larger value, then lower index.
__device__ __forceinline__ bool better(float v, uint32_t i, float bv, uint32_t bi) {
    return v > bv || (v == bv && i < bi);
}

// Block-wide argmax of one row; every thread gets (value, index).
template <typename T> __device__ void row_argmax(const T* row, int vocab, float& out_v, uint32_t& out_i) {
    __shared__ float sv[NWARPS];
    __shared__ uint32_t si[NWARPS];
    float bv = -INFINITY;
    uint32_t bi = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += THREADS) {
        const float v = logit(row, i);
        if (better(v, (uint32_t)i, bv, bi)) { bv = v; bi = (uint32_t)i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, bv, o);
        const uint32_t i = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads(); // protect sv/si from a previous call
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    bv = sv[0];
    bi = si[0];
    for (int w = 1; w < NWARPS; ++w)
        if (better(sv[w], si[w], bv, bi)) { bv = sv[w]; bi = si[w]; }
    out_v = bv;
    out_i = bi == 0xffffffffu ? 0u : bi; // vocab == 0
}

template <typename T> __device__ void argmax(const PatArgmaxParams& p) {
    const int r = blockIdx.x;
    if (r >= p.n_rows) return;
    float v;
    uint32_t i;
    row_argmax(pat::ptr<const T>(p.logits) + (int64_t)r * p.row_stride, p.vocab, v, i);
    if (threadIdx.x == 0) {
        pat::ptr<uint32_t>(p.out_idx)[r] = i + (uint32_t)p.index_offset;
        if (p.out_val) pat::ptr<float>(p.out_val)[r] = v;
    }
}

__device__ uint64_t block_sum_u64(uint64_t v) {
    __shared__ uint64_t partial[NWARPS];
    __shared__ uint64_t total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint64_t s = 0;
        for (int w = 0; w < NWARPS; ++w) s += partial[w];
        total = s;
    }
    __syncthreads();
    return total;
}

// Exclusive prefix sum over threads in threadIdx order.
__device__ uint64_t block_exclusive_scan_u64(uint64_t v) {
    __shared__ uint64_t warp_tot[NWARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint64_t incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const uint64_t n = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += n;
    }
    __syncthreads();
    if (lane == 31) warp_tot[warp] = incl;
    __syncthreads();
    uint64_t base = 0;
    for (int w = 0; w < warp; ++w) base += warp_tot[w];
    return base + incl - v;
}

// Fixed-point weight of logit x: floor(exp((x - mx) * inv_t) * 2^32). The maximum weighs exactly
// 2^32 even when it is +inf (inf - inf would be NaN -> weight 0 -> nothing kept, nothing drawn).
__device__ __forceinline__ uint64_t weight_q(float x, float mx, float inv_t) {
    return x == mx ? 4294967296ull : __float2ull_rz(expf((x - mx) * inv_t) * 4294967296.0f);
}

// Radix select, most significant byte first. BY_MASS = false: the key of the `need`-th largest
// element (counting). BY_MASS = true: the largest key tau with mass(key >= tau) >= need. Only
// elements with key >= floor_key take part.
template <typename T, bool BY_MASS>
__device__ uint32_t radix_select(const T* row, int vocab, uint32_t floor_key, uint64_t need, float mx,
                                 float inv_t) {
    __shared__ unsigned long long hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ uint64_t s_need;
    uint32_t prefix = 0, mask = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = threadIdx.x; b < 256; b += THREADS) hist[b] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < vocab; i += THREADS) {
            const float x = logit(row, i);
            const uint32_t key = order_key(x);
            if (key >= floor_key && (key & mask) == prefix)
                atomicAdd(&hist[(key >> shift) & 255u], BY_MASS ? (unsigned long long)weight_q(x, mx, inv_t) : 1ull);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            uint64_t above = 0;
            int d = 255;
            for (; d > 0; --d) { // the bin where the running total (from the top) reaches need
                if (above + hist[d] >= need) break;
                above += hist[d];
            }
            s_prefix = prefix | ((uint32_t)d << shift);
            s_need = need - above;
        }
        __syncthreads();
        prefix = s_prefix;
        need = s_need;
        mask |= 255u << shift;
    }
    return prefix;
}

template <typename T> __device__ void sample(const PatSampleParams& p) {
    const int r = blockIdx.x;
    if (r >= p.n_rows) return;
    const T* row = pat::ptr<const T>(p.logits) + (int64_t)r * p.row_stride;
    const int vocab = p.vocab;
    uint32_t* out = pat::ptr<uint32_t>(p.out_idx) + r;

    if (!(p.temperature > 0.0f) || vocab <= 1) {
        float v;
        uint32_t i;
        row_argmax(row, vocab, v, i);
        if (threadIdx.x == 0) *out = i;
        return;
    }
    const float inv_t = 1.0f / p.temperature;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += THREADS) mx = fmaxf(mx, logit(row, i));
    mx = pat::block_max(mx);
    if (mx == -INFINITY) { // no finite logit: fall back to index 0
        if (threadIdx.x == 0) *out = 0;
        return;
    }

    uint32_t floor_key = 0;
    if (p.top_k > 0 && p.top_k < vocab)
        floor_key = radix_select<T, false>(row, vocab, 0, (uint64_t)p.top_k, mx, inv_t);
    if (p.top_p < 1.0f) {
        uint64_t z = 0;
        for (int i = threadIdx.x; i < vocab; i += THREADS) {
            const float x = logit(row, i);
            if (order_key(x) >= floor_key) z += weight_q(x, mx, inv_t);
        }
        z = block_sum_u64(z);
        double t = ceil((double)fmaxf(p.top_p, 0.0f) * (double)z);
        const uint64_t target = t < 1.0 ? 1ull : (uint64_t)t;
        const uint32_t tp = radix_select<T, true>(row, vocab, floor_key, target, mx, inv_t);
        floor_key = max(floor_key, tp);
    }

    // Inverse CDF in index order: thread t owns the contiguous chunk [t*chunk, (t+1)*chunk).
    const int chunk = (vocab + THREADS - 1) / THREADS;
    const int lo = min(vocab, (int)threadIdx.x * chunk), hi = min(vocab, lo + chunk);
    uint64_t mine = 0;
    for (int i = lo; i < hi; ++i) {
        const float x = logit(row, i);
        if (order_key(x) >= floor_key) mine += weight_q(x, mx, inv_t);
    }
    const uint64_t z_kept = block_sum_u64(mine); // >= 2^32: the max element is always kept
    const uint64_t before = block_exclusive_scan_u64(mine);
    const float u = fminf(fmaxf(pat::ptr<const float>(p.uniforms)[r], 0.0f), 1.0f);
    uint64_t target = (uint64_t)((double)u * (double)z_kept);
    if (target >= z_kept) target = z_kept - 1;
    if (target >= before && target < before + mine) {
        uint64_t run = before;
        for (int i = lo; i < hi; ++i) {
            const float x = logit(row, i);
            if (order_key(x) >= floor_key) {
                run += weight_q(x, mx, inv_t);
                if (run > target) { *out = (uint32_t)i; break; }
            }
        }
    }
}

} // namespace

PAT_EXPORT_DTYPES(argmax, argmax, PatArgmaxParams, THREADS)
PAT_EXPORT_DTYPES(sample, sample, PatSampleParams, THREADS)
