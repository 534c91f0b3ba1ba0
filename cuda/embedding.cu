// embedding.cu - vocab-parallel embedding lookup.
//
// Computes, for each token t:  out[t, :] = table[ids[t] - vocab_start, :]  when
// vocab_start <= ids[t] < vocab_start + vocab_local, and zeros otherwise. Each TP rank holds one
// contiguous vocab shard; summing the ranks' outputs (all-reduce) completes the lookup.
//
// Shapes / layouts (row-major, contiguous):
//   ids   u32 [n_tokens]
//   table T   [vocab_local, hidden]   this rank's shard
//   out   T   [n_tokens, hidden]
// Entry points: embedding_bf16, embedding_f16, embedding_f32 (PatEmbeddingParams).
// Launch: grid (n_tokens, 1, 1), block (256, 1, 1) (any multiple of 32 up to 256 works), no dynamic
//   shared memory. Copies 16 bytes per thread-step when hidden*sizeof(T) is a multiple of 16 and the
//   pointers are 16-byte aligned, else element by element.
// Test: compared bitwise (it is a copy) against the CPU backend's embedding on random ids that fall
//   inside, below and above the shard range. Bench (none yet): bytes written / time vs measured copy bandwidth.
#include "common.cuh"

namespace {

template <typename T> __device__ void embedding(const PatEmbeddingParams& p) {
    const int t = blockIdx.x;
    if (t >= p.n_tokens) return;
    const int64_t local = (int64_t)pat::ptr<const uint32_t>(p.ids)[t] - p.vocab_start;
    const bool hit = local >= 0 && local < p.vocab_local;
    T* out = pat::ptr<T>(p.out) + (int64_t)t * p.hidden;
    const T* row = pat::ptr<const T>(p.table) + (hit ? local : 0) * p.hidden;

    constexpr int V = pat::VecWidth<T>::value;
    if (p.hidden % V == 0 && pat::aligned16(out) && pat::aligned16(row)) {
        pat::Vec16<T> zero;
#pragma unroll
        for (int j = 0; j < V; ++j) zero.v[j] = pat::from_f32<T>(0.0f);
        for (int i = threadIdx.x * V; i < p.hidden; i += blockDim.x * V)
            pat::store16(out + i, hit ? pat::load16(row + i) : zero);
    } else {
        for (int i = threadIdx.x; i < p.hidden; i += blockDim.x)
            out[i] = hit ? row[i] : pat::from_f32<T>(0.0f);
    }
}

} // namespace

PAT_EXPORT_DTYPES(embedding, embedding, PatEmbeddingParams, 256)
