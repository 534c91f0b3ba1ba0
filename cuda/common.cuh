// common.cuh - helpers shared by the kernels in cuda/*.cu (not a kernel file; not compiled alone).
//
// dtype conversion (bf16 / f16 / f32 <-> f32), 16-byte vector load/store, warp and block
// reductions, and the macro that exports one extern "C" entry point per dtype. All arithmetic in
// the kernels is f32; T is only the storage type.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "params.h"

namespace pat {

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(f16 x) { return __half2float(x); }

// Round-to-nearest-even conversion from f32 to the storage type.
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { return __float2half_rn(x); }

// Elements of T in one 16-byte vector.
template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

// 16 bytes of T, loaded/stored with one 128-bit instruction.
template <typename T> struct alignas(16) Vec16 {
    T v[16 / sizeof(T)];
};

template <typename T> __device__ __forceinline__ Vec16<T> load16(const T* p) {
    return *reinterpret_cast<const Vec16<T>*>(p);
}
template <typename T> __device__ __forceinline__ void store16(T* p, const Vec16<T>& v) {
    *reinterpret_cast<Vec16<T>*>(p) = v;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename T> __device__ __forceinline__ T* ptr(PatDevPtr p) {
    return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a multiple of 32.
// Uses 33 floats of shared memory; safe to call repeatedly (syncs before reuse).
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // previous call's readers are done with `total`/`partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// Max over the whole block; every thread gets the result. Same rules as block_sum.
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? partial[lane] : -INFINITY;
        s = warp_max(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// E consecutive elements of T owned by one lane, loaded with the widest aligned access.
template <typename T, int E> struct alignas(E * sizeof(T) >= 16 ? 16 : E * sizeof(T)) LaneVec {
    T v[E];
};

// out[e] = p[e] for e < n_valid, else 0. `fast` (all E valid and p aligned to the LaneVec's
// alignment) selects one vector load; it must be uniform across the warp for best code.
template <typename T, int E>
__device__ __forceinline__ void load_lane(const T* p, bool fast, int n_valid, float (&out)[E]) {
    if (fast) {
        const LaneVec<T, E> lv = *reinterpret_cast<const LaneVec<T, E>*>(p);
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = to_f32(lv.v[e]);
    } else {
#pragma unroll
        for (int e = 0; e < E; ++e) out[e] = e < n_valid ? to_f32(p[e]) : 0.0f;
    }
}

} // namespace pat

// Export `extern "C" __global__ void NAME_<dt>(PARAMS p)` for bf16, f16 and f32, each calling
// IMPL<T>(p). BOUNDS is the __launch_bounds__ max threads per block.
#define PAT_EXPORT_DTYPES(NAME, IMPL, PARAMS, BOUNDS)                                              \
    extern "C" __global__ void __launch_bounds__(BOUNDS) NAME##_bf16(PARAMS p) {                   \
        IMPL<pat::bf16>(p);                                                                        \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(BOUNDS) NAME##_f16(PARAMS p) {                    \
        IMPL<pat::f16>(p);                                                                         \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(BOUNDS) NAME##_f32(PARAMS p) { IMPL<float>(p); }
