// reshard.cu - byte movers for reconfiguration: strided block copy (in-place weight compaction,
//   KV pool compaction) and KV head-slice gather / scatter (KV migration). dtype-agnostic.
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
//
// Entry points: strided_copy (PatStridedCopyParams), kv_gather, kv_scatter (PatKvGatherParams).
// Launch: strided_copy: grid (clamp(ceil(row_bytes / 4096), 1, 1024), min(rows, 65535)), block
//   (256) - it grid-strides over both axes, so any grid is correct. kv_gather / kv_scatter: grid
//   (num_list_blocks, 2), block (256). No shared memory. Each thread moves 16, 8, 4 or 1 bytes per
//   step, the widest that every address, size and stride allows.
// Test: against the CPU backend's copies bitwise (random bytes, odd sizes/strides/alignment,
//   rows = 1 and many), gather-then-scatter round trips, and the in-place compaction recipes
//   above applied to layout A giving exactly layout B. Bench: `pat bench reshard --sizes-mib
//   16,128,1024` (LLaMA-8B shapes: bytes read + written / time vs the measured device copy
//   bandwidth, which counts read + write too); a whole switch on GPU ranks: `pat bench switch
//   --backend cuda`.
// Used by: a live switch on GPU ranks (src/backend/cuda/rank/switch.rs): kv_gather / kv_scatter
//   move each KV batch (one kv head of many sequences, one launch per layer) into a message or
//   the new pool; strided_copy builds each re-sharded weight buffer from the old one and the rows
//   received (rows = 1, separate buffers).
#include "common.cuh"

namespace {

// Copy n bytes with thread `t` of `nt` cooperating threads, using unit-sized accesses.
template <typename U>
__device__ __forceinline__ void copy_units(char* dst, const char* src, int64_t n, int64_t t, int64_t nt) {
    U* d = reinterpret_cast<U*>(dst);
    const U* s = reinterpret_cast<const U*>(src);
    for (int64_t i = t; i < n / (int64_t)sizeof(U); i += nt) d[i] = s[i];
}

// Widest access width (16/8/4/1 bytes) compatible with all bits set in `x`.
__device__ __forceinline__ int unit_for(uint64_t x) {
    return (x & 15u) == 0 ? 16 : (x & 7u) == 0 ? 8 : (x & 3u) == 0 ? 4 : 1;
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

// Move one (block, head range) chunk between the cache and staging, for K (y = 0) or V (y = 1).
__device__ __forceinline__ void kv_chunk(const PatKvGatherParams& p, bool to_staging) {
    const int i = blockIdx.x, kv = blockIdx.y;
    if (i >= p.num_list_blocks || kv > 1) return;
    const int64_t head_bytes = (int64_t)p.block_size * p.head_dim * p.elem_bytes;
    const int64_t chunk = head_bytes * p.num_heads;
    const int64_t block = pat::ptr<const int32_t>(p.block_ids)[i];
    char* cache = pat::ptr<char>(kv == 0 ? p.k_cache : p.v_cache) +
                  (block * p.cache_heads + p.head_start) * head_bytes;
    char* staging = pat::ptr<char>(p.staging) + ((int64_t)kv * p.num_list_blocks + i) * chunk;
    const int unit = unit_for((uint64_t)(uintptr_t)cache | (uint64_t)(uintptr_t)staging | (uint64_t)chunk);
    if (to_staging) copy_bytes(staging, cache, chunk, unit, threadIdx.x, blockDim.x);
    else copy_bytes(cache, staging, chunk, unit, threadIdx.x, blockDim.x);
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

extern "C" __global__ void __launch_bounds__(1024) kv_gather(PatKvGatherParams p) { kv_chunk(p, true); }
extern "C" __global__ void __launch_bounds__(1024) kv_scatter(PatKvGatherParams p) { kv_chunk(p, false); }
