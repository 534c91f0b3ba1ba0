// allreduce.cu - all-reduce (sum) for several TP ranks living on one GPU (the same-device Comm).
//
// For every element e < n_elems:  s = ((0 + in[0][e]) + in[1][e]) + ... + in[k-1][e]
// accumulated in f32 in rank order (so the result is deterministic and independent of the launch
// geometry), rounded to T once, and written to outputs[0..num_outputs). Writing to every rank's
// own buffer keeps "ranks own their memory"; num_outputs = 1 writes a single result buffer.
// The CPU Comm must sum the same way (f32, rank order, one rounding) for bitwise agreement.
//
// Shapes: inputs[r], outputs[j] T [n_elems], 1 <= num_inputs, num_outputs <= 16. An output may be
//   the same buffer as an input (each thread reads all inputs of its elements before writing
//   them), but buffers must not partially overlap.
// Entry points: all_reduce_sum_bf16, all_reduce_sum_f16, all_reduce_sum_f32 (PatAllReduceParams).
// Launch: grid-stride, any grid: grid (min(ceil(n_elems / (256 * V)), 4 * num_SMs)), block (256),
//   V = 16 / sizeof(T); no shared memory. 16-byte vector path when n_elems % V == 0 and every
//   pointer is 16-byte aligned, else element by element.
// Test: against the CPU Comm's all-reduce bitwise, k in {1, 2, 3, 8, 16}, n in {1, 7, 4096, 10^6},
//   including in-place (outputs == inputs). Bench (none yet): bytes (k reads + j writes) / time vs measured
//   copy bandwidth.
#include "common.cuh"

namespace {

template <typename T> __device__ void all_reduce_sum(const PatAllReduceParams& p) {
    constexpr int V = pat::VecWidth<T>::value;
    const int k = p.num_inputs, nout = p.num_outputs;
    bool vec = p.n_elems % V == 0;
    for (int r = 0; r < k; ++r) vec = vec && pat::aligned16(pat::ptr<const T>(p.inputs[r]));
    for (int j = 0; j < nout; ++j) vec = vec && pat::aligned16(pat::ptr<const T>(p.outputs[j]));
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;

    if (vec) {
        for (int64_t i = tid * V; i < p.n_elems; i += stride * V) {
            float acc[V];
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = 0.0f;
            for (int r = 0; r < k; ++r) {
                const pat::Vec16<T> x = pat::load16(pat::ptr<const T>(p.inputs[r]) + i);
#pragma unroll
                for (int e = 0; e < V; ++e) acc[e] += pat::to_f32(x.v[e]);
            }
            pat::Vec16<T> o;
#pragma unroll
            for (int e = 0; e < V; ++e) o.v[e] = pat::from_f32<T>(acc[e]);
            for (int j = 0; j < nout; ++j) pat::store16(pat::ptr<T>(p.outputs[j]) + i, o);
        }
    } else {
        for (int64_t i = tid; i < p.n_elems; i += stride) {
            float acc = 0.0f;
            for (int r = 0; r < k; ++r) acc += pat::to_f32(pat::ptr<const T>(p.inputs[r])[i]);
            const T o = pat::from_f32<T>(acc);
            for (int j = 0; j < nout; ++j) pat::ptr<T>(p.outputs[j])[i] = o;
        }
    }
}

} // namespace

PAT_EXPORT_DTYPES(all_reduce_sum, all_reduce_sum, PatAllReduceParams, 1024)
