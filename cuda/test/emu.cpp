// emu.cpp - the fiber scheduler behind emu.h (read emu.h for what is and is not emulated).
//
// One fiber per CUDA thread of the running block, all on the calling OS thread. The scheduler
// walks the block's threads in a shuffled order and resumes every ready one; a thread runs until
// it waits at __syncthreads (state AtSync) or in a warp operation (AtWarp), or returns (Done). The
// last arrival at a barrier makes the waiting threads ready again; a pass that finds nothing ready
// while threads are alive is a deadlock. Warp exchanges use two slot buffers alternating by
// generation, so a lane that has left exchange g can write exchange g+1 while slower lanes still
// read g (g+2 cannot start before every lane has arrived at g+1, i.e. has finished reading g).
#include "emu.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
#define EMU_ASM_SWITCH 1
#else
#define EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif

// Bounds of the kernels' __shared__ variables (the build step renames the kernel objects' .bss
// sections to emu_shared; the linker then defines these). Weak: absent when not done.
extern "C" unsigned char __start_emu_shared[] __attribute__((weak));
extern "C" unsigned char __stop_emu_shared[] __attribute__((weak));

#if EMU_ASM_SWITCH
// emu_switch(save, load): push the callee-saved registers (System V x86-64), store rsp in *save,
// switch to the stack `load` (made by emu_switch or by new_frame below), pop and return there.
extern "C" void emu_switch(void** save, void* load);
asm(R"(
    .text
    .p2align 4
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");
#endif

namespace emu {

ThreadState* g_cur;
dim3 g_block_idx, g_block_dim, g_grid_dim;

namespace {

constexpr size_t kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 * 1024; // per fiber; kernels use a few KiB
constexpr unsigned kFullMask = 0xffffffffu;

enum class St : unsigned char { Ready, AtSync, AtWarp, Done };

struct Fiber {
    ThreadState t;
    St st;
#if EMU_ASM_SWITCH
    void* sp;
#else
    ucontext_t uc;
#endif
    unsigned char* stack; // lowest usable byte; a PROT_NONE guard page lies below
};

struct Warp {
    unsigned live, arrived, gen;
    WarpOp op;
    alignas(16) unsigned char slot[2][32][16];
};

struct Runtime {
    std::vector<Fiber> fibers; // kMaxThreads entries, never reallocated
    std::vector<Warp> warps;
    std::vector<unsigned> order;
    unsigned n = 0, live = 0, exited = 0, at_sync = 0;
    bool reshuffle = false, failed = false;
    std::string error;
    void (*fn)(const void*) = nullptr;
    const void* ctx = nullptr;
    Fiber* cur = nullptr;
#if EMU_ASM_SWITCH
    void* sched_sp = nullptr;
#else
    ucontext_t sched_uc;
#endif
    uint64_t seed = 1, rng = 0;
    Stats stats{};
};
Runtime R;

uint64_t next_random() { // splitmix64
    uint64_t z = (R.rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

template <class T> void shuffle_vec(std::vector<T>& v, size_t n) {
    for (size_t i = n; i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
}

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

const char* op_name(WarpOp op) {
    switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Shfl: return "__shfl_sync";
    case WarpOp::ShflXor: return "__shfl_xor_sync";
    case WarpOp::ShflUp: return "__shfl_up_sync";
    case WarpOp::ShflDown: return "__shfl_down_sync";
    case WarpOp::Ballot: return "__ballot_sync";
    case WarpOp::Any: return "__any_sync";
    case WarpOp::All: return "__all_sync";
    }
    return "?";
}

void fail(const std::string& msg) {
    if (!R.failed) R.error = msg;
    R.failed = true;
}

void allocate_fibers() {
    if (!R.fibers.empty()) return;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t per = kStackBytes + page;
    void* mem = mmap(nullptr, per * kMaxThreads, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw Error("emu: cannot map fiber stacks");
    R.fibers.resize(kMaxThreads);
    for (size_t i = 0; i < kMaxThreads; ++i) {
        unsigned char* base = static_cast<unsigned char*>(mem) + i * per;
        if (mprotect(base, page, PROT_NONE) != 0) throw Error("emu: cannot protect a stack guard page");
        R.fibers[i].stack = base + page;
    }
    R.warps.resize(kMaxThreads / 32);
    R.order.resize(kMaxThreads);
}

// Scheduler -> fiber f, until f waits or finishes.
void resume(Fiber& f) {
    R.cur = &f;
    g_cur = &f.t;
    ++R.stats.switches;
#if EMU_ASM_SWITCH
    emu_switch(&R.sched_sp, f.sp);
#else
    swapcontext(&R.sched_uc, &f.uc);
#endif
}

// Running fiber -> scheduler; returns when the scheduler resumes this fiber.
void yield() {
    Fiber& f = *R.cur;
#if EMU_ASM_SWITCH
    emu_switch(&f.sp, R.sched_sp);
#else
    swapcontext(&f.uc, &R.sched_uc);
#endif
}

void thread_exit(Fiber& f) {
    f.st = St::Done;
    --R.live;
    ++R.exited;
    Warp& w = R.warps[f.t.warp];
    --w.live;
    if (w.arrived)
        fail(format("thread %u exited while %u lanes of its warp wait in %s (divergent warp operation)",
                    f.t.linear, w.arrived, op_name(w.op)));
    if (R.at_sync)
        fail(format("thread %u exited while %u threads wait at __syncthreads (barrier divergence)",
                    f.t.linear, R.at_sync));
}

[[noreturn]] void fiber_main() {
    Fiber& f = *R.cur;
    R.fn(R.ctx);
    thread_exit(f);
    yield(); // a Done fiber is never resumed
    std::abort();
}

void new_frame(Fiber& f) {
#if EMU_ASM_SWITCH
    // What emu_switch pops: six callee-saved registers, then the "return address" fiber_main.
    // Above it an empty slot, so fiber_main starts with rsp % 16 == 8 as after a call.
    uint64_t* sp = reinterpret_cast<uint64_t*>(reinterpret_cast<uintptr_t>(f.stack + kStackBytes) & ~uintptr_t(15));
    *--sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&fiber_main);
    for (int i = 0; i < 6; ++i) *--sp = 0;
    f.sp = sp;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
#endif
}

std::string deadlock_report() {
    unsigned at_warp = 0;
    std::string warps;
    for (unsigned w = 0; w * 32 < R.n; ++w)
        if (R.warps[w].arrived) {
            at_warp += R.warps[w].arrived;
            warps += format(" warp %u: %u/%u lanes in %s;", w, R.warps[w].arrived, R.warps[w].live,
                            op_name(R.warps[w].op));
        }
    return format("deadlock: %u threads alive, %u at __syncthreads, %u in warp operations (%s), %u exited",
                  R.live, R.at_sync, at_warp, warps.empty() ? "none" : warps.c_str() + 1, R.exited);
}

void run_block() {
    while (R.live > 0) {
        if (R.reshuffle) {
            shuffle_vec(R.order, R.n);
            R.reshuffle = false;
        }
        bool ran = false;
        for (unsigned k = 0; k < R.n; ++k) {
            Fiber& f = R.fibers[R.order[k]];
            if (f.st != St::Ready) continue;
            ran = true;
            resume(f);
            if (R.failed) return;
            if (R.reshuffle) break; // a __syncthreads completed: new phase, new order
        }
        if (!ran) {
            fail(deadlock_report());
            return;
        }
    }
}

} // namespace

[[noreturn]] void device_error(const std::string& msg) {
    fail(format("thread %u: ", R.cur ? R.cur->t.linear : 0u) + msg);
    yield(); // the launch is abandoned; this fiber is never resumed
    std::abort();
}

void syncthreads() {
    Fiber& f = *R.cur;
    if (R.exited)
        device_error(format("__syncthreads after %u threads of the block exited (barrier divergence)", R.exited));
    if (++R.at_sync == R.live) {
        R.at_sync = 0;
        for (unsigned i = 0; i < R.n; ++i)
            if (R.fibers[i].st == St::AtSync) R.fibers[i].st = St::Ready;
        R.reshuffle = true;
        f.st = St::Ready;
    } else {
        f.st = St::AtSync;
    }
    yield();
}

const unsigned char (*warp_exchange(const void* in, unsigned n, unsigned mask, WarpOp op))[16] {
    Fiber& f = *R.cur;
    Warp& w = R.warps[f.t.warp];
    if (mask != kFullMask)
        device_error(format("%s with mask 0x%08x: only full-warp masks are emulated", op_name(op), mask));
    if (w.live != 32)
        device_error(format("%s in warp %u with %u live lanes (lanes exited, or blockDim not a multiple of 32)",
                            op_name(op), f.t.warp, w.live));
    if (n > 16) device_error("warp exchange of more than 16 bytes");
    if (w.arrived == 0) {
        w.op = op;
    } else if (w.op != op) {
        device_error(format("lane %u is in %s while %u lanes of warp %u are in %s (divergent warp code)", f.t.lane,
                            op_name(op), w.arrived, f.t.warp, op_name(w.op)));
    }
    const unsigned buf = w.gen & 1;
    if (n) std::memcpy(w.slot[buf][f.t.lane], in, n);
    if (++w.arrived == 32) {
        w.arrived = 0;
        ++w.gen;
        for (unsigned l = 0; l < 32; ++l) {
            Fiber& g = R.fibers[f.t.warp * 32 + l];
            if (g.st == St::AtWarp) g.st = St::Ready;
        }
    } else {
        f.st = St::AtWarp;
        yield();
    }
    return w.slot[buf];
}

void launch_raw(dim3 grid, dim3 block, void (*fn)(const void*), const void* ctx) {
    const uint64_t n = (uint64_t)block.x * block.y * block.z;
    if (n == 0 || n > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
        throw Error(format("invalid launch: grid (%u,%u,%u) block (%u,%u,%u)", grid.x, grid.y, grid.z, block.x,
                           block.y, block.z));
    allocate_fibers();
    R.rng = R.seed * 0x2545f4914f6cdd1dull + R.stats.launches;
    ++R.stats.launches;
    R.fn = fn;
    R.ctx = ctx;
    R.n = (unsigned)n;
    g_grid_dim = grid;
    g_block_dim = block;

    const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    std::vector<uint64_t> blocks(nblocks);
    for (uint64_t b = 0; b < nblocks; ++b) blocks[b] = b;
    shuffle_vec(blocks, nblocks);
    for (unsigned i = 0; i < R.n; ++i) R.order[i] = i;

    size_t shared_bytes = 0;
    const bool poison = shared_poisoning(&shared_bytes);
    for (uint64_t b : blocks) {
        g_block_idx = dim3((unsigned)(b % grid.x), (unsigned)(b / grid.x % grid.y), (unsigned)(b / grid.x / grid.y));
        if (poison) std::memset(__start_emu_shared, 0xff, shared_bytes);
        for (unsigned i = 0; i < R.n; ++i) {
            Fiber& f = R.fibers[i];
            f.t.idx = dim3(i % block.x, i / block.x % block.y, i / block.x / block.y);
            f.t.linear = i;
            f.t.lane = i % 32;
            f.t.warp = i / 32;
            f.st = St::Ready;
            new_frame(f);
        }
        for (unsigned w = 0; w * 32 < R.n; ++w) {
            R.warps[w].live = std::min(32u, R.n - w * 32);
            R.warps[w].arrived = 0;
            R.warps[w].gen = 0;
        }
        R.live = R.n;
        R.exited = 0;
        R.at_sync = 0;
        R.reshuffle = true;
        R.failed = false;
        run_block();
        R.cur = nullptr;
        g_cur = nullptr;
        ++R.stats.blocks;
        R.stats.threads += R.n;
        if (R.failed) {
            R.failed = false;
            throw Error(format("block (%u,%u,%u) of grid (%u,%u,%u) x block (%u,%u,%u): ", g_block_idx.x,
                               g_block_idx.y, g_block_idx.z, grid.x, grid.y, grid.z, block.x, block.y, block.z) +
                        R.error);
        }
    }
}

void set_seed(uint64_t seed) { R.seed = seed; }

bool shared_poisoning(size_t* bytes) {
    const bool on = +__start_emu_shared != nullptr && +__stop_emu_shared > +__start_emu_shared;
    if (bytes) *bytes = on ? (size_t)(+__stop_emu_shared - +__start_emu_shared) : 0;
    return on;
}

Stats stats() { return R.stats; }

} // namespace emu
