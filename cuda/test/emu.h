// emu.h - run the CUDA kernels of cuda/*.cu on the CPU, to test their logic without a GPU.
//
// How it is used (scripts/check-kernels-cpu.sh does all of this):
//   Every cuda/<name>.cu is compiled by the host g++ as C++17 with this header force-included
//   (g++ -x c++ -include emu.h -I cuda -I <CUDA include dir>), so the kernel source is compiled
//   unchanged. The `extern "C" __global__` entry points become ordinary functions taking the params
//   struct by value; the test (kernels_test.cpp) starts them with emu::launch(kernel, grid, block,
//   params), which runs every CUDA thread of every block. Device pointers are host pointers.
//   cuda_bf16.h / cuda_fp16.h / vector_types.h are the real headers of the pinned nvcc wheels
//   (their host code paths), so bf16/f16 conversions are NVIDIA's own.
//
// What is emulated:
//   - grid / block indices: threadIdx, blockIdx, blockDim, gridDim (1-3 dimensional).
//   - CUDA threads as cooperative fibers (own stack each, one OS thread, switched by a few lines
//     of assembly on x86-64, ucontext elsewhere or with -DEMU_UCONTEXT): a thread runs until it
//     reaches a barrier or a warp operation, then the next thread runs. Blocks run one at a time,
//     in a shuffled order; threads within a block run in a shuffled order that is re-drawn at every
//     __syncthreads, so a missing barrier or a dependence on block order tends to show up as a
//     wrong result. The order is a pure function of emu::set_seed, so runs are reproducible.
//   - __syncthreads (counting barrier; error if some threads of the block already exited, as that
//     is barrier divergence), __syncwarp, and the full-mask warp operations __shfl_sync,
//     __shfl_xor_sync, __shfl_up_sync, __shfl_down_sync (width 32, values up to 16 bytes),
//     __ballot_sync, __any_sync, __all_sync. Lanes of a warp must all arrive at the same kind of
//     warp operation; otherwise, and on any deadlock, emu::launch throws emu::Error.
//   - __shared__ memory: one static instance per variable, shared by the threads of the running
//     block; before every block it is filled with 0xff bytes (NaN for floats) so reads of shared
//     memory the block did not write show up. (Needs the build step that moves the kernels' .bss
//     into the `emu_shared` section; see scripts/check-kernels-cpu.sh.)
//   - atomics (atomicAdd/Sub/Max/Min/Exch/CAS on the usual integer types, atomicAdd on float):
//     trivially atomic, as only one fiber runs at a time.
//   - the math and bit intrinsics the kernels use (list below). __expf is computed as
//     exp2f(x * log2(e)) like the GPU's ex2.approx path; expf, sincosf, rsqrtf use the host libm.
//
// What is NOT emulated (a pass here says nothing about these):
//   - timing, occupancy, register or shared-memory limits, __launch_bounds__ (ignored), bank
//     conflicts, coalescing.
//   - the memory model: nothing runs concurrently and every write is seen at once, so a race shows
//     up only if it changes the result under one of the shuffled orders (a missing __syncthreads
//     between a shared write and another thread's read usually does: emu_selftest and the
//     mutation checks). Missing __threadfence / volatile, stale reads of another block's writes
//     and lanes racing inside a warp between two warp operations are not caught.
//   - shared memory poisoning misses a __shared__ variable that the code never writes at all (the
//     compiler may fold its reads to 0) and anything static outside the kernels' .bss.
//   - exact GPU floating point: the GPU fuses a*b+c into FMA, its __expf / rsqrtf / sincosf differ
//     from the host libm by a few ulp, and denormal handling of the approximate intrinsics differs.
//     Compare against references with tolerances, never bitwise, where a kernel does float math.
//   - partial-mask warp operations and widths other than 32 (emu::Error if used).
//   - misaligned vector accesses fault on the GPU but not on x86; the check script compiles the
//     kernels with -fsanitize=alignment, which turns such an access into a test failure instead.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

// ---- CUDA keywords -----------------------------------------------------------------------------
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__ // (libstdc++ uses __attribute__((__noinline__)); leave it undefined)
#undef __shared__
#undef __constant__
#undef __align__
#undef __launch_bounds__
#undef __restrict__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __constant__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__ __restrict

// ---- the emulator's interface --------------------------------------------------------------------
namespace emu {

// A kernel misused a primitive (divergent barrier, mismatched warp operation, ...) or deadlocked.
struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Per-CUDA-thread state, read through threadIdx & co. Internal.
struct ThreadState {
    dim3 idx;
    unsigned linear; // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    unsigned lane, warp;
};
extern ThreadState* g_cur;
extern dim3 g_block_idx, g_block_dim, g_grid_dim;

// Barriers and warp exchange, called through the CUDA-named wrappers below. Internal.
void syncthreads();
enum class WarpOp : unsigned { Sync, Shfl, ShflXor, ShflUp, ShflDown, Ballot, Any, All };
// Every lane of the calling warp passes n <= 16 bytes; returns all 32 lanes' bytes, valid until the
// calling lane's next warp operation.
const unsigned char (*warp_exchange(const void* in, unsigned n, unsigned mask, WarpOp op))[16];
[[noreturn]] void device_error(const std::string& msg); // from kernel code: abandon the launch

// Runs fn(ctx) as the body of every thread of grid x block. Throws emu::Error on misuse.
void launch_raw(dim3 grid, dim3 block, void (*fn)(const void*), const void* ctx);

// Launch `kernel` (an extern "C" entry point) with its params struct, like kernel<<<grid, block>>>(p).
// Synchronous: returns when every block has finished.
template <class P> void launch(void (*kernel)(P), dim3 grid, dim3 block, const P& params) {
    struct Ctx {
        void (*kernel)(P);
        const P* params;
    } ctx{kernel, &params};
    launch_raw(grid, block, [](const void* c) {
        const Ctx* x = static_cast<const Ctx*>(c);
        x->kernel(*x->params); // each thread gets its own copy of the params, as on the GPU
    }, &ctx);
}

// Seed of the block and thread orders of the following launches (default 1).
void set_seed(uint64_t seed);
// Whether __shared__ variables are poisoned before each block (false if the build step that
// collects them into the emu_shared section was not run) and how many bytes they span.
bool shared_poisoning(size_t* bytes = nullptr);

struct Stats {
    uint64_t launches, blocks, threads, switches;
};
Stats stats();

} // namespace emu

// ---- built-in variables --------------------------------------------------------------------------
#define threadIdx (static_cast<const dim3&>(emu::g_cur->idx))
#define blockIdx (static_cast<const dim3&>(emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(emu::g_grid_dim))
#define warpSize 32

// ---- barriers and warp operations ----------------------------------------------------------------
inline void __syncthreads() { emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu::warp_exchange(nullptr, 0, mask, emu::WarpOp::Sync); }

namespace emu {
template <class T> inline T shuffle(unsigned mask, T v, int width, WarpOp op, int arg) {
    static_assert(sizeof(T) <= 16, "warp shuffle of a value larger than 16 bytes");
    if (width != 32) device_error("warp shuffle with width != 32 is not emulated");
    const auto slots = warp_exchange(&v, sizeof(T), mask, op);
    const int lane = (int)g_cur->lane;
    int src = lane;
    switch (op) {
    case WarpOp::Shfl: src = arg & 31; break;
    case WarpOp::ShflXor: src = (lane ^ arg) < 32 ? lane ^ arg : lane; break;
    case WarpOp::ShflUp: src = lane - arg >= 0 ? lane - arg : lane; break;
    case WarpOp::ShflDown: src = lane + arg < 32 ? lane + arg : lane; break;
    default: break;
    }
    T r;
    std::memcpy(&r, slots[src], sizeof(T));
    return r;
}
inline unsigned vote(unsigned mask, int pred, WarpOp op) {
    const unsigned char b = pred != 0;
    const auto slots = warp_exchange(&b, 1, mask, op);
    unsigned bits = 0;
    for (int l = 0; l < 32; ++l) bits |= (unsigned)slots[l][0] << l;
    return bits;
}
} // namespace emu

template <class T> inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    return emu::shuffle(mask, v, width, emu::WarpOp::Shfl, src_lane);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    return emu::shuffle(mask, v, width, emu::WarpOp::ShflXor, lane_mask);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shuffle(mask, v, width, emu::WarpOp::ShflUp, (int)delta);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    return emu::shuffle(mask, v, width, emu::WarpOp::ShflDown, (int)delta);
}
inline unsigned __ballot_sync(unsigned mask, int pred) { return emu::vote(mask, pred, emu::WarpOp::Ballot); }
inline int __any_sync(unsigned mask, int pred) { return emu::vote(mask, pred, emu::WarpOp::Any) != 0; }
inline int __all_sync(unsigned mask, int pred) { return emu::vote(mask, pred, emu::WarpOp::All) == 0xffffffffu; }

// ---- atomics (only one fiber runs at a time, so plain read-modify-write is atomic) ---------------
#define EMU_ATOMIC_INT(T)                                                                          \
    inline T atomicAdd(T* a, T v) { T o = *a; *a = o + v; return o; }                              \
    inline T atomicSub(T* a, T v) { T o = *a; *a = o - v; return o; }                              \
    inline T atomicMax(T* a, T v) { T o = *a; *a = o > v ? o : v; return o; }                      \
    inline T atomicMin(T* a, T v) { T o = *a; *a = o < v ? o : v; return o; }                      \
    inline T atomicExch(T* a, T v) { T o = *a; *a = v; return o; }                                 \
    inline T atomicCAS(T* a, T cmp, T v) { T o = *a; if (o == cmp) *a = v; return o; }
EMU_ATOMIC_INT(int)
EMU_ATOMIC_INT(unsigned int)
EMU_ATOMIC_INT(unsigned long long)
#undef EMU_ATOMIC_INT
inline float atomicAdd(float* a, float v) { float o = *a; *a = o + v; return o; }
inline float atomicExch(float* a, float v) { float o = *a; *a = v; return o; }

// ---- math and bit intrinsics ----------------------------------------------------------------------
using std::isinf;
using std::isnan;
inline float __expf(float x) { return exp2f(x * 1.44269504088896341f); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x != x ? 0.0f : x < 0.0f ? 0.0f : x > 1.0f ? 1.0f : x; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline float __uint_as_float(unsigned u) { float x; std::memcpy(&x, &u, 4); return x; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
// f32 -> u64 rounding toward zero, saturating like cvt.rzi.u64.f32 (NaN -> 0).
inline unsigned long long __float2ull_rz(float x) {
    if (!(x > 0.0f)) return 0ull;
    if (x >= 18446744073709551616.0f) return ~0ull;
    return (unsigned long long)x;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(unsigned x) { return x ? __builtin_clz(x) : 32; }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
