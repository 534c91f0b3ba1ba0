// reshard.cu - byte movers for reconfiguration: strided block copy (in-place weight compaction,
//   KV pool compaction), KV head-slice gather / scatter (KV migration) and pool-to-pool KV copy
//   (KV that stays on its rank). dtype-agnostic.
//
// strided_copy:  for r < rows:  dst[r*dst_stride .. + row_bytes) = src[r*src_stride .. + row_bytes)
//   (all in bytes). One contiguous move is rows = 1.
//   Precondition for in-place use (dst and src in the same buffer): within ONE launch no byte may
//   be both read and written, except the no-op dst == src with equal strides - CTAs run in any
//   order, so an overlapping launch races. Compaction towards lower addresses is done as a
//   sequence of launches on one stream, in ascending address order, each non-overlapping:
//     * contiguous move of n bytes down by `shift` bytes: if shift >= n, one launch; otherwise
//       launches of at most `shift` bytes each, lowest chunk first (stream order finishes each
//       launch before the next starts, and a chunk's destination only overlaps the sources of
//       earlier chunks).
//     * row compaction (dst_stride <= src_stride, dst <= src): rows [a, b) in one launch are safe
//       when the last written byte precedes the first read byte of the launch:
//       dst + (b-1)*dst_stride + row_bytes <= src + a*src_stride, with rows < a done by earlier
//       launches. A row already in place (its dst == its src) is skipped, e.g. keeping the first
//       half of the heads of every KV block: row 0 stays, then rows [1,2), [2,4), [4,8), ...
//   Nested TP growth (new shards lie inside old ones) gives shift >= size for every QKV /
//   gate_up / row-parallel block move, so weight compaction is one launch per block move.
// kv_gather:   for each listed block i (physical id block_ids[i]) and kv in {K, V}:
//   staging[kv, i, :, :, :] = cache_kv[block_ids[i], head_start .. head_start + num_heads, :, :]
//   i.e. staging is [2][num_list_blocks][num_heads][block_size][head_dim]; because the cache is
//   [num_blocks, cache_heads, block_size, head_dim], each (block, head range) is ONE contiguous
//   chunk of num_heads*block_size*head_dim*elem_bytes bytes.
// kv_scatter:  the inverse: cache_kv[block_ids[i], head_start .., :, :] = staging[kv, i, ...]
//   (block_ids are then the destination blocks, head_start the destination head offset).
// kv_copy:     gather and scatter in one pass, no staging: for each listed i and kv,
//   dst_kv[dst_ids[i], dst_head_start .. + num_heads] = src_kv[src_ids[i], src_head_start .. + num_heads]
//   (two caches of any head counts, same block_size / head_dim / dtype; they must not overlap).
//
// Entry points: strided_copy (PatStridedCopyParams), kv_gather, kv_scatter (PatKvGatherParams),
//   kv_copy (PatKvCopyParams).
// Launch: block (256), no shared memory; every kernel grid-strides, so any grid is correct.
//   strided_copy: grid (clamp(ceil(row_bytes / 16384), 1, 1024), min(rows, 65535)).
//   kv_gather / kv_scatter / kv_copy: grid (ceil(num_list_blocks / 4), 2): a CTA moves 4 list
//   blocks' chunks of K (y = 0) or V (y = 1) at once.
// Memory-level parallelism: each thread moves 16, 8, 4 or 1 bytes per access, the widest that
//   every address, size and stride allows, and loads 4 independent units (4 steps of a long row,
//   or the same offset of 4 chunks) before storing any of them.
// Test: against the CPU backend's copies bitwise (random bytes, odd sizes/strides/alignment,
//   rows = 1 and many, grids smaller and larger than the work), gather-then-scatter round trips,
//   kv_copy against gather + scatter, and the in-place compaction recipes above applied to layout
//   A giving exactly layout B. Bench: `pat bench reshard --sizes-mib 16,128,1024` (LLaMA-8B
//   shapes: bytes read + written / time vs the measured device copy bandwidth, which counts read
//   + write too); a whole switch on GPU ranks: `pat bench switch --backend cuda`.
// Used by: a live switch on GPU ranks (src/backend/cuda/rank/switch.rs): kv_gather / kv_scatter
//   move each KV batch sent or received (one kv head of many sequences, one launch per layer)
//   into a message or out of one into the new pool, kv_copy each batch that stays on its rank
//   from the old pool into the new one; strided_copy builds each re-sharded weight buffer from the
//   old one and the rows received (rows = 1, separate buffers).
#include "common.cuh"

namespace {

// Independent loads each thread has in flight before its first store: one 16-byte load per
// thread leaves too few bytes in flight to cover memory latency at full bandwidth.
constexpr int kIlp = 4;
// (block, K or V) chunks one kv_* CTA moves together, `kIlp` loads in flight across them: a
// switch's chunk is one head of one block (4 KiB for LLaMA-8B in bf16), one 16-byte unit per
// thread of a 256-thread CTA.
constexpr int kChunksPerCta = 4;

// Widest access width (16/8/4/1 bytes) compatible with all bits set in `x`.
__device__ __forceinline__ int unit_for(uint64_t x) {
    return (x & 15u) == 0 ? 16 : (x & 7u) == 0 ? 8 : (x & 3u) == 0 ? 4 : 1;
}

// Copy n bytes (a multiple of sizeof(U)) with thread `t` of `nt` cooperating threads, `kIlp`
// units loaded before any is stored.
template <typename U>
__device__ __forceinline__ void copy_units(char* dst, const char* src, int64_t n, int64_t t, int64_t nt) {
    U* __restrict__ d = reinterpret_cast<U*>(dst);
    const U* __restrict__ s = reinterpret_cast<const U*>(src);
    const int64_t m = n / (int64_t)sizeof(U);
    for (int64_t i = t; i < m; i += kIlp * nt) {
        U r[kIlp];
#pragma unroll
        for (int k = 0; k < kIlp; ++k)
            if (i + k * nt < m) r[k] = s[i + k * nt];
#pragma unroll
        for (int k = 0; k < kIlp; ++k)
            if (i + k * nt < m) d[i + k * nt] = r[k];
    }
}

__device__ __forceinline__ void copy_bytes(char* dst, const char* src, int64_t n, int unit, int64_t t,
                                           int64_t nt) {
    switch (unit) {
    case 16: copy_units<uint4>(dst, src, n, t, nt); break;
    case 8: copy_units<uint2>(dst, src, n, t, nt); break;
    case 4: copy_units<uint32_t>(dst, src, n, t, nt); break;
    default: copy_units<uint8_t>(dst, src, n, t, nt); break;
    }
}

// One side of a KV move: a cache (blocks listed by `ids`, heads from `head_start`) or, with
// `ids` null, a contiguous staging buffer [2 (K, V)][num_list_blocks][chunk].
struct KvSide {
    char* k;
    char* v;
    const int32_t* ids;
    int64_t heads;
    int64_t head_start;
};

// Address of list block i's chunk for K (kv = 0) or V (kv = 1).
__device__ __forceinline__ char* kv_at(const KvSide& s, int kv, int64_t i, int64_t n, int64_t head_bytes,
                                       int64_t chunk) {
    if (s.ids == nullptr) return s.k + ((int64_t)kv * n + i) * chunk;
    return (kv == 0 ? s.k : s.v) + ((int64_t)s.ids[i] * s.heads + s.head_start) * head_bytes;
}

// `cnt` (<= kChunksPerCta) chunks of n_units units: unit u of every chunk loaded before any is
// stored.
template <typename U>
__device__ __forceinline__ void copy_chunks(char* const (&dst)[kChunksPerCta], const char* const (&src)[kChunksPerCta],
                                            int cnt, int64_t n_units) {
    for (int64_t u = threadIdx.x; u < n_units; u += blockDim.x) {
        U r[kChunksPerCta];
#pragma unroll
        for (int j = 0; j < kChunksPerCta; ++j)
            if (j < cnt) r[j] = reinterpret_cast<const U*>(src[j])[u];
#pragma unroll
        for (int j = 0; j < kChunksPerCta; ++j)
            if (j < cnt) reinterpret_cast<U*>(dst[j])[u] = r[j];
    }
}

// Every listed block's chunk of `num_heads` heads from `src` to `dst`, K and V (blockIdx.y);
// CTAs take groups of kChunksPerCta list blocks, grid-striding, so any grid is correct.
__device__ __forceinline__ void kv_move(const KvSide& src, const KvSide& dst, int64_t n, int64_t num_heads,
                                        int64_t block_size, int64_t head_dim, int64_t elem_bytes) {
    const int kv = blockIdx.y;
    if (kv > 1) return;
    const int64_t head_bytes = block_size * head_dim * elem_bytes;
    const int64_t chunk = head_bytes * num_heads;
    // Every chunk address is its base plus a multiple of head_bytes (caches) or chunk (staging).
    const int unit = unit_for((uint64_t)(uintptr_t)src.k | (uint64_t)(uintptr_t)src.v | (uint64_t)(uintptr_t)dst.k |
                              (uint64_t)(uintptr_t)dst.v | (uint64_t)head_bytes | (uint64_t)chunk);
    for (int64_t g = (int64_t)blockIdx.x * kChunksPerCta; g < n; g += (int64_t)gridDim.x * kChunksPerCta) {
        const int cnt = (int)(n - g < kChunksPerCta ? n - g : kChunksPerCta);
        char* d[kChunksPerCta];
        const char* s[kChunksPerCta];
#pragma unroll
        for (int j = 0; j < kChunksPerCta; ++j) {
            const int64_t i = j < cnt ? g + j : g; // unused slots repeat the first (never copied)
            d[j] = kv_at(dst, kv, i, n, head_bytes, chunk);
            s[j] = kv_at(src, kv, i, n, head_bytes, chunk);
        }
        switch (unit) {
        case 16: copy_chunks<uint4>(d, s, cnt, chunk / 16); break;
        case 8: copy_chunks<uint2>(d, s, cnt, chunk / 8); break;
        case 4: copy_chunks<uint32_t>(d, s, cnt, chunk / 4); break;
        default: copy_chunks<uint8_t>(d, s, cnt, chunk); break;
        }
    }
}

__device__ __forceinline__ KvSide cache_side(PatDevPtr k, PatDevPtr v, PatDevPtr ids, int heads, int head_start) {
    return KvSide{pat::ptr<char>(k), pat::ptr<char>(v), pat::ptr<const int32_t>(ids), heads, head_start};
}

__device__ __forceinline__ KvSide staging_side(PatDevPtr staging) {
    return KvSide{pat::ptr<char>(staging), nullptr, nullptr, 0, 0};
}

} // namespace

extern "C" __global__ void __launch_bounds__(1024) strided_copy(PatStridedCopyParams p) {
    if (p.dst == p.src && p.dst_stride == p.src_stride) return; // no-op
    const int unit = unit_for(p.dst | p.src | (uint64_t)p.row_bytes | (uint64_t)p.dst_stride |
                              (uint64_t)p.src_stride);
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t nt = (int64_t)gridDim.x * blockDim.x;
    for (int64_t r = blockIdx.y; r < p.rows; r += gridDim.y)
        copy_bytes(pat::ptr<char>(p.dst) + r * p.dst_stride, pat::ptr<const char>(p.src) + r * p.src_stride,
                   p.row_bytes, unit, t, nt);
}

extern "C" __global__ void __launch_bounds__(1024) kv_gather(PatKvGatherParams p) {
    kv_move(cache_side(p.k_cache, p.v_cache, p.block_ids, p.cache_heads, p.head_start), staging_side(p.staging),
            p.num_list_blocks, p.num_heads, p.block_size, p.head_dim, p.elem_bytes);
}

extern "C" __global__ void __launch_bounds__(1024) kv_scatter(PatKvGatherParams p) {
    kv_move(staging_side(p.staging), cache_side(p.k_cache, p.v_cache, p.block_ids, p.cache_heads, p.head_start),
            p.num_list_blocks, p.num_heads, p.block_size, p.head_dim, p.elem_bytes);
}

extern "C" __global__ void __launch_bounds__(1024) kv_copy(PatKvCopyParams p) {
    kv_move(cache_side(p.src_k, p.src_v, p.src_ids, p.src_heads, p.src_head_start),
            cache_side(p.dst_k, p.dst_v, p.dst_ids, p.dst_heads, p.dst_head_start), p.num_list_blocks, p.num_heads,
            p.block_size, p.head_dim, p.elem_bytes);
}
