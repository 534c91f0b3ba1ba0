// kv_append.cu - write the new tokens' k and v into the paged KV cache.
//
// For each token t with slot = slot_mapping[t] >= 0 (slot = block * block_size + offset):
//   k_cache[block, h, offset, :] = k[t, h, :]   and   v_cache[block, h, offset, :] = v[t, h, :]
// for every local kv head h. slot -1 means "skip" (padding tokens). A pure copy: bitwise exact.
//
// Shapes: k/v head h of token t at k + t*k_token_stride + h*head_dim (so they may be views into a
//   fused QKV buffer); slot_mapping i64 [n_tokens];
//   k_cache, v_cache T [num_blocks, num_kv_heads, block_size, head_dim] (one head's slice of a
//   block is contiguous, which is what KV migration gathers).
// Entry points: kv_append_bf16, kv_append_f16, kv_append_f32 (PatKvAppendParams).
// Launch: grid (n_tokens), block (128) (any multiple of 32 up to 1024), no shared memory. 16-byte
//   vector path when head_dim and both token strides are multiples of V = 16/sizeof(T) and the
//   pointers are 16-byte aligned. Slots must be distinct among non-skipped tokens (caller's
//   allocator guarantees it); the kernel does not check slot < num_blocks * block_size.
// Test: against the CPU backend's kv_append on a random cache with random distinct slots and some
//   -1 entries; compared bitwise, including untouched slots. Bench (none yet): bytes written / time.
#include "common.cuh"

namespace {

template <typename T> __device__ void kv_append(const PatKvAppendParams& p) {
    const int t = blockIdx.x;
    if (t >= p.n_tokens) return;
    const int64_t slot = pat::ptr<const int64_t>(p.slot_mapping)[t];
    if (slot < 0) return;
    const int64_t block = slot / p.block_size, offset = slot % p.block_size;
    const T* k = pat::ptr<const T>(p.k) + (int64_t)t * p.k_token_stride;
    const T* v = pat::ptr<const T>(p.v) + (int64_t)t * p.v_token_stride;
    // Element (h, d) of this token goes to dst + h * head_stride + d.
    const int64_t head_stride = (int64_t)p.block_size * p.head_dim;
    const int64_t base = (block * p.num_kv_heads * p.block_size + offset) * p.head_dim;
    T* kc = pat::ptr<T>(p.k_cache) + base;
    T* vc = pat::ptr<T>(p.v_cache) + base;

    constexpr int V = pat::VecWidth<T>::value;
    if (p.head_dim % V == 0 && p.k_token_stride % V == 0 && p.v_token_stride % V == 0 &&
        pat::aligned16(k) && pat::aligned16(v) && pat::aligned16(kc) && pat::aligned16(vc)) {
        const int per_head = p.head_dim / V;
        for (int i = threadIdx.x; i < p.num_kv_heads * per_head; i += blockDim.x) {
            const int h = i / per_head, d = (i - h * per_head) * V;
            const int64_t src = (int64_t)h * p.head_dim + d, dst = h * head_stride + d;
            pat::store16(kc + dst, pat::load16(k + src));
            pat::store16(vc + dst, pat::load16(v + src));
        }
    } else {
        for (int i = threadIdx.x; i < p.num_kv_heads * p.head_dim; i += blockDim.x) {
            const int h = i / p.head_dim, d = i - h * p.head_dim;
            kc[h * head_stride + d] = k[i];
            vc[h * head_stride + d] = v[i];
        }
    }
}

} // namespace

PAT_EXPORT_DTYPES(kv_append, kv_append, PatKvAppendParams, 1024)
