// selftest_kernels.cu - tiny kernels that exercise the emulator (emu.h) itself; compiled exactly
// like cuda/*.cu (force-included emu.h, .bss moved to emu_shared) by scripts/check-kernels-cpu.sh
// and driven by the emu_selftest tests in kernels_test.cpp. Not part of the real kernel set.
#include <stdint.h>

#include "selftest_kernels.h"

namespace {

template <typename T> __device__ T* ptr(PatDevPtr p) { return reinterpret_cast<T*>(static_cast<uintptr_t>(p)); }

// Warp operations: out[t * 16 + k] for k < 16 (u32), see kernels_test.cpp for the expected values.
__device__ void warp_ops(const EmuSelftestParams& p) {
    const unsigned t = threadIdx.x, lane = t & 31;
    uint32_t* o = ptr<uint32_t>(p.out) + (size_t)t * 16;
    const unsigned v = t * 3 + 1;
    o[0] = __shfl_xor_sync(0xffffffffu, v, 1);
    o[1] = __shfl_xor_sync(0xffffffffu, v, 16);
    o[2] = __shfl_up_sync(0xffffffffu, v, 1);
    o[3] = __shfl_up_sync(0xffffffffu, v, 5);
    o[4] = __shfl_down_sync(0xffffffffu, v, 3);
    o[5] = __shfl_down_sync(0xffffffffu, v, 31);
    o[6] = __shfl_sync(0xffffffffu, v, 7);
    o[7] = __shfl_sync(0xffffffffu, v, (int)((lane + 5) & 31)); // per-lane source
    o[8] = __ballot_sync(0xffffffffu, lane % 3 == 0);
    o[9] = (uint32_t)__any_sync(0xffffffffu, lane == 17);
    o[10] = (uint32_t)__all_sync(0xffffffffu, lane < 32);
    o[11] = (uint32_t)__all_sync(0xffffffffu, lane < 31);
    const uint64_t big = ((uint64_t)v << 33) | 5u;
    const uint64_t r = __shfl_xor_sync(0xffffffffu, big, 2);
    o[12] = (uint32_t)(r >> 33);
    o[13] = (uint32_t)(r & 0xffffffffu);
    const float f = __shfl_down_sync(0xffffffffu, (float)v * 0.5f, 2);
    o[14] = __float_as_uint(f);
    __syncwarp();
    o[15] = __shfl_xor_sync(0xffffffffu, lane, 31) + 100u * (unsigned)warpSize;
}

// Shared memory and __syncthreads: two exchange rounds through shared memory.
__device__ void shared_rounds(const EmuSelftestParams& p) {
    __shared__ uint32_t buf[1024];
    const unsigned t = threadIdx.x, n = blockDim.x;
    uint32_t* o = ptr<uint32_t>(p.out) + (size_t)blockIdx.x * n * 2;
    buf[t] = t * 7 + blockIdx.x;
    __syncthreads();
    const uint32_t a = buf[(t + 1) % n];
    __syncthreads(); // everyone has read round 1 before it is overwritten
    buf[t] = a + 1;
    __syncthreads();
    o[t] = a;
    o[n + t] = buf[n - 1 - t];
}

// The same exchange without barriers: wrong under some thread orders (the emulator shuffles them).
__device__ void shared_racy(const EmuSelftestParams& p) {
    __shared__ uint32_t buf[1024];
    const unsigned t = threadIdx.x, n = blockDim.x;
    buf[t] = t * 7;
    ptr<uint32_t>(p.out)[t] = buf[n - 1 - t];
}

// Reads shared memory that this block never wrote: the emulator fills it with 0xff bytes.
__device__ void shared_unwritten(const EmuSelftestParams& p) {
    __shared__ float never_written[64];
    __shared__ uint32_t written[64];
    // (a store the compiler cannot rule out, or it would fold reads of the static to 0)
    if (p.mode == 12345) never_written[threadIdx.x & 63] = 1.0f;
    if (threadIdx.x < 64) written[threadIdx.x] = threadIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        ptr<uint32_t>(p.out)[0] = __float_as_uint(never_written[5]);
        ptr<uint32_t>(p.out)[1] = written[63];
    }
}

// Built-in index variables for 3-D grids and blocks: every (block, thread) writes its packed id
// once; aux[0] counts blocks in execution order into out[total + k].
__device__ void indices(const EmuSelftestParams& p) {
    const unsigned bl = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned th = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned nth = blockDim.x * blockDim.y * blockDim.z;
    const unsigned total = nth * gridDim.x * gridDim.y * gridDim.z;
    uint32_t* o = ptr<uint32_t>(p.out);
    o[bl * nth + th] = (blockIdx.x << 24) | (blockIdx.y << 20) | (blockIdx.z << 16) | (threadIdx.x << 8) |
                       (threadIdx.y << 4) | threadIdx.z;
    if (th == 0) o[total + atomicAdd(ptr<unsigned>(p.aux), 1u)] = bl;
}

// Atomics from every thread of every block: histogram of (global id % 7) and a 64-bit sum.
__device__ void atomics(const EmuSelftestParams& p) {
    const unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(ptr<unsigned>(p.out) + g % 7, 1u);
    atomicAdd(ptr<unsigned long long>(p.aux), (unsigned long long)g);
    atomicMax(ptr<unsigned>(p.out) + 7, g);
}

// Misuse that the emulator must reject (mode selects which).
__device__ void misuse(const EmuSelftestParams& p) {
    const unsigned t = threadIdx.x, lane = t & 31;
    switch (p.mode) {
    case 0: // __syncthreads inside a branch not taken by the whole block
        if (t < 16) __syncthreads();
        break;
    case 1: // different warp operations in one warp
        if (lane < 16) (void)__shfl_xor_sync(0xffffffffu, t, 1);
        else (void)__ballot_sync(0xffffffffu, 1);
        break;
    case 2: // early exit of some threads, then a block barrier
        if (t >= 32) return;
        __syncthreads();
        break;
    case 3: // a shuffle with a partial mask
        (void)__shfl_xor_sync(0x0000ffffu, t, 1);
        break;
    case 4: // a lane leaves while the others wait in a shuffle
        if (lane == 3) return;
        (void)__shfl_xor_sync(0xffffffffu, t, 1);
        break;
    default: break;
    }
    ptr<uint32_t>(p.out)[t] = 1;
}

} // namespace

extern "C" __global__ void emu_selftest_warp_ops(EmuSelftestParams p) { warp_ops(p); }
extern "C" __global__ void emu_selftest_shared_rounds(EmuSelftestParams p) { shared_rounds(p); }
extern "C" __global__ void emu_selftest_shared_racy(EmuSelftestParams p) { shared_racy(p); }
extern "C" __global__ void emu_selftest_shared_unwritten(EmuSelftestParams p) { shared_unwritten(p); }
extern "C" __global__ void emu_selftest_indices(EmuSelftestParams p) { indices(p); }
extern "C" __global__ void emu_selftest_atomics(EmuSelftestParams p) { atomics(p); }
extern "C" __global__ void emu_selftest_misuse(EmuSelftestParams p) { misuse(p); }
