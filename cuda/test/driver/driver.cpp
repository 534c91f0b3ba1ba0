// driver.cpp - the CUDA driver API subset cudarc and the pat host code call, on the CPU.
//
// Contexts: one primary context per emulated device, current per OS thread. Memory: page-aligned
// host allocations, recorded so that copies and frees are checked against live allocations (an
// out-of-range copy is CUDA_ERROR_INVALID_VALUE with a message, where a GPU might corrupt memory
// silently). Fresh allocations are filled with 0xff bytes (NaN in every float dtype), so code that
// reads memory it never wrote sees NaN, as it may see garbage on a GPU. Streams run work at once;
// events record the host clock. Kernels: cuModuleLoadData accepts any image; cuModuleGetFunction
// finds the kernel by name among the emulated cuda/*.cu kernels (registry.inc, made by
// scripts/build-emu-driver.sh); cuLaunchKernel runs it under the emulator, one launch at a time
// in the process.
#include "emu_driver.h"

#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;

namespace {

enum : int {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    NO_DEVICE = 100,
    INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    NOT_READY = 600,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

struct Ctx {
    int device;
};
struct Stream {
    int device = -1;
    std::mutex qm; // guards the fields below
    std::condition_variable cv; // signalled when an operation finishes
    std::deque<std::pair<emud::Op, const void*>> q;
    bool busy = false;          // an operation of this stream is running (on some thread)
    bool front_running = false; // ... and it is q.front()
    uint64_t submitted = 0, completed = 0; // operations, in order
};
struct EventState {
    Stream* stream = nullptr;
    uint64_t seq = 0; // complete when stream->completed >= seq
    double ms = 0;
};
// A CUevent: destroying it with a record still queued is allowed (as in CUDA), so the queued
// record holds the state too.
struct Event {
    std::shared_ptr<EventState> st = std::make_shared<EventState>();
};
struct Module {
    int device;
};
struct Pool {
    int device;
    uint64_t release_threshold = 0;
};
using Thunk = void (*)(const unsigned* grid, const unsigned* block, const void* params);
struct Function {
    const char* name;
    Thunk thunk;
    size_t (*params_size)();
};

// The emulated kernels: extern "C" thunks made per cuda/*.cu by the build script.
#define EMU_KERNEL(k)                                                                               \
    extern "C" void emu_thunk_##k(const unsigned*, const unsigned*, const void*);                  \
    extern "C" size_t emu_params_size_##k();
#include "registry.inc"
#undef EMU_KERNEL
Function g_functions[] = {
#define EMU_KERNEL(k) {#k, emu_thunk_##k, emu_params_size_##k},
#include "registry.inc"
#undef EMU_KERNEL
};

constexpr int kMaxDevices = 16;
Ctx g_ctx[kMaxDevices];
Pool g_pool[kMaxDevices];
bool g_init = false;
thread_local Ctx* t_ctx = nullptr;

struct Alloc {
    size_t bytes;
    int device;
};
std::mutex g_mem_mutex;
std::map<uint64_t, Alloc> g_allocs; // by base address
uint64_t g_used[kMaxDevices];
// The most in use on each device since its pool's high watermark was last reset.
uint64_t g_high[kMaxDevices];

std::mutex g_launch_mutex; // the emulator runs one launch at a time

std::mutex g_streams_mutex;
std::set<Stream*> g_streams; // every stream, the default ones included
Stream g_default[kMaxDevices];

// `s`, or the current device's default stream for null; null without a current context.
Stream* resolve(void* s) {
    if (s) return static_cast<Stream*>(s);
    return t_ctx ? &g_default[t_ctx->device] : nullptr;
}

bool reached(Stream* st, uint64_t seq) {
    std::lock_guard<std::mutex> g(st->qm);
    return st->completed >= seq;
}

// Runs queued operations of `st` until `seq` of them have completed (or the queue is empty). Any
// thread may help a stream along (a stream waiting on another's event runs that stream's work, as
// a GPU runs every stream), one operation at a time: no lock is held while an operation runs.
int drain_upto(Stream* st, uint64_t seq) {
    std::unique_lock<std::mutex> g(st->qm);
    for (;;) {
        if (st->completed >= seq) return 0;
        if (st->busy) {
            st->cv.wait(g);
            continue;
        }
        if (st->q.empty()) return 0;
        emud::Op op = st->q.front().first;
        st->busy = st->front_running = true;
        g.unlock();
        const int r = op(true);
        g.lock();
        st->busy = st->front_running = false;
        st->q.pop_front();
        ++st->completed;
        st->cv.notify_all();
        if (r != 0) return r;
    }
}

int drain_device(int device) {
    std::vector<Stream*> all;
    {
        std::lock_guard<std::mutex> g(g_streams_mutex);
        for (Stream* st : g_streams)
            if (st->device == device) all.push_back(st);
    }
    for (Stream* st : all)
        if (int r = drain_upto(st, UINT64_MAX)) return r;
    return 0;
}

int env_int(const char* name, int fallback, int lo, int hi) {
    const char* v = std::getenv(name);
    if (!v || !*v) return fallback;
    char* end = nullptr;
    long x = std::strtol(v, &end, 10);
    if (*end || x < lo || x > hi) {
        emud::say(std::string(name) + "=" + v + " is not an integer in [" + std::to_string(lo) + ", " +
                  std::to_string(hi) + "]; using " + std::to_string(fallback));
        return fallback;
    }
    return (int)x;
}

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

bool valid_device(int d) { return d >= 0 && d < emud::device_count(); }

CUresult alloc(CUdeviceptr* out, size_t bytes, int device) {
    if (!out) return INVALID_VALUE;
    if (!valid_device(device)) return INVALID_CONTEXT;
    if (bytes == 0) return INVALID_VALUE;
    const size_t rounded = (bytes + 4095) / 4096 * 4096;
    {
        std::lock_guard<std::mutex> g(g_mem_mutex);
        if (g_used[device] + rounded > emud::device_total_bytes()) return OUT_OF_MEMORY;
        g_used[device] += rounded;
        g_high[device] = std::max(g_high[device], g_used[device]);
    }
    void* p = mmap(nullptr, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        std::lock_guard<std::mutex> g(g_mem_mutex);
        g_used[device] -= rounded;
        return OUT_OF_MEMORY;
    }
    std::memset(p, 0xff, bytes);
    std::lock_guard<std::mutex> g(g_mem_mutex);
    g_allocs[(uint64_t)(uintptr_t)p] = Alloc{rounded, device};
    *out = (CUdeviceptr)(uintptr_t)p;
    return OK;
}

CUresult release(CUdeviceptr ptr, const char* what) {
    if (ptr == 0) return OK;
    size_t bytes;
    {
        std::lock_guard<std::mutex> g(g_mem_mutex);
        auto it = g_allocs.find(ptr);
        if (it == g_allocs.end()) {
            emud::say(std::string(what) + ": 0x" + std::to_string(ptr) +
                      " is not the base of a live device allocation (double free?)");
            return INVALID_VALUE;
        }
        bytes = it->second.bytes;
        g_used[it->second.device] -= bytes;
        g_allocs.erase(it);
    }
    munmap((void*)(uintptr_t)ptr, bytes); // a later use of the pointer faults, as on a GPU
    return OK;
}

CUresult copy(uint64_t dst, uint64_t src, size_t n, bool dst_dev, bool src_dev, const char* what) {
    if (n == 0) return OK;
    if ((dst_dev && !emud::check_device_range(dst, n, what)) ||
        (src_dev && !emud::check_device_range(src, n, what)))
        return INVALID_VALUE;
    if (!dst || !src) return INVALID_VALUE;
    std::memmove((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n);
    return OK;
}

} // namespace

namespace emud {

int device_count() {
    static const int n = env_int("PAT_EMU_GPUS", 2, 1, kMaxDevices);
    return n;
}

uint64_t device_total_bytes() {
    static const uint64_t b = (uint64_t)env_int("PAT_EMU_GPU_MEM_MIB", 4096, 64, 1 << 20) << 20;
    return b;
}

int current_device() { return t_ctx ? t_ctx->device : -1; }

bool check_device_range(uint64_t ptr, size_t n, const char* what) {
    if (n == 0) return true;
    std::lock_guard<std::mutex> g(g_mem_mutex);
    auto it = g_allocs.upper_bound(ptr);
    if (it != g_allocs.begin()) {
        --it;
        if (ptr >= it->first && ptr + n <= it->first + it->second.bytes) return true;
    }
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s: device range [0x%llx, +%zu) is not inside one live allocation",
                  what, (unsigned long long)ptr, n);
    say(buf);
    return false;
}

void say(const std::string& message) { std::fprintf(stderr, "pat-emu: %s\n", message.c_str()); }

double nccl_timeout_s() {
    static const int s = env_int("PAT_EMU_NCCL_TIMEOUT_S", 120, 1, 86400);
    return s;
}

bool defer_all() {
    static const bool d = env_int("PAT_EMU_DEFER", 0, 0, 1) == 1;
    return d;
}

int submit(void* s, Op op, const void* owner) {
    Stream* st = resolve(s);
    if (!st) return INVALID_CONTEXT;
    std::unique_lock<std::mutex> g(st->qm);
    ++st->submitted;
    if (!st->q.empty() || st->busy || defer_all()) {
        st->q.emplace_back(std::move(op), owner);
        return 0;
    }
    st->busy = true;
    g.unlock();
    const int r = op(false);
    g.lock();
    st->busy = false;
    if (r == kWouldBlock) {
        // Only the stream's owner submits, so nothing was queued meanwhile: this is the front.
        st->q.emplace_back(std::move(op), owner);
    } else {
        ++st->completed;
    }
    st->cv.notify_all();
    return r == kWouldBlock ? 0 : r;
}

int drain(void* s) {
    Stream* st = resolve(s);
    if (!st) return INVALID_CONTEXT;
    return drain_upto(st, UINT64_MAX);
}

void drop_owned(const void* owner) {
    std::lock_guard<std::mutex> g(g_streams_mutex);
    for (Stream* st : g_streams) {
        std::lock_guard<std::mutex> q(st->qm);
        for (size_t i = st->front_running ? 1 : 0; i < st->q.size();) {
            if (st->q[i].second == owner) {
                st->q.erase(st->q.begin() + (long)i);
                ++st->completed;
                st->cv.notify_all();
            } else {
                ++i;
            }
        }
    }
}

} // namespace emud

extern "C" {

// ---- initialisation, devices ----------------------------------------------------------------------
CUresult cuInit(unsigned flags) {
    if (flags != 0) return INVALID_VALUE;
    std::lock_guard<std::mutex> g(g_streams_mutex);
    for (int d = 0; d < kMaxDevices; ++d) {
        g_ctx[d].device = d;
        g_pool[d].device = d;
        g_default[d].device = d;
        g_streams.insert(&g_default[d]);
    }
    g_init = true;
    return OK;
}
CUresult cuDriverGetVersion(int* v) {
    if (!v) return INVALID_VALUE;
    *v = 13000;
    return OK;
}
CUresult cuDeviceGetCount(int* n) {
    if (!g_init) return NOT_INITIALIZED;
    if (!n) return INVALID_VALUE;
    *n = emud::device_count();
    return OK;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!g_init) return NOT_INITIALIZED;
    if (!d) return INVALID_VALUE;
    if (!valid_device(ordinal)) return INVALID_DEVICE;
    *d = ordinal;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    std::snprintf(name, (size_t)len, "pat emulated GPU %d (CPU)", d);
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    *bytes = emud::device_total_bytes();
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (!v) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    switch (attr) {
    case 1: *v = 1024; break;           // MAX_THREADS_PER_BLOCK
    case 10: *v = 32; break;            // WARP_SIZE
    case 16: *v = 4; break;             // MULTIPROCESSOR_COUNT
    case 38: *v = 4 << 20; break;       // L2_CACHE_SIZE
    case 41: *v = 1; break;             // UNIFIED_ADDRESSING
    case 75: *v = 9; break;             // COMPUTE_CAPABILITY_MAJOR
    case 76: *v = 0; break;             // COMPUTE_CAPABILITY_MINOR
    case 83: case 89: *v = 0; break;    // MANAGED_MEMORY, CONCURRENT_MANAGED_ACCESS
    case 115: *v = 1; break;            // MEMORY_POOLS_SUPPORTED
    default:
        emud::say("cuDeviceGetAttribute: attribute " + std::to_string(attr) + " is not emulated");
        return NOT_SUPPORTED;
    }
    return OK;
}
CUresult cuDeviceCanAccessPeer(int* can, CUdevice a, CUdevice b) {
    if (!can) return INVALID_VALUE;
    if (!valid_device(a) || !valid_device(b)) return INVALID_DEVICE;
    *can = 1;
    return OK;
}

// ---- contexts ---------------------------------------------------------------------------------------
CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice d) {
    if (!g_init) return NOT_INITIALIZED;
    if (!ctx) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    *ctx = &g_ctx[d];
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return valid_device(d) ? OK : INVALID_DEVICE; }
CUresult cuCtxSetCurrent(void* ctx) {
    t_ctx = static_cast<Ctx*>(ctx);
    return OK;
}
CUresult cuCtxGetCurrent(void** ctx) {
    if (!ctx) return INVALID_VALUE;
    *ctx = t_ctx;
    return OK;
}
CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return INVALID_VALUE;
    if (!t_ctx) return INVALID_CONTEXT;
    *d = t_ctx->device;
    return OK;
}
CUresult cuCtxGetDevice_v2(CUdevice* d, void* ctx) {
    if (!d) return INVALID_VALUE;
    Ctx* c = ctx ? static_cast<Ctx*>(ctx) : t_ctx;
    if (!c) return INVALID_CONTEXT;
    *d = c->device;
    return OK;
}
CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return OK;
}
CUresult cuCtxEnablePeerAccess(void*, unsigned) { return t_ctx ? OK : INVALID_CONTEXT; }

// ---- streams and events ------------------------------------------------------------------------------
CUresult cuStreamCreate(void** s, unsigned) {
    if (!s) return INVALID_VALUE;
    if (!t_ctx) return INVALID_CONTEXT;
    Stream* st = new Stream;
    st->device = t_ctx->device;
    std::lock_guard<std::mutex> g(g_streams_mutex);
    g_streams.insert(st);
    *s = st;
    return OK;
}
CUresult cuStreamCreateWithPriority(void** s, unsigned flags, int) { return cuStreamCreate(s, flags); }
CUresult cuStreamGetPriority(void*, int* p) {
    if (p) *p = 0;
    return OK;
}
CUresult cuStreamDestroy_v2(void* s) {
    if (!s) return INVALID_HANDLE;
    Stream* st = static_cast<Stream*>(s);
    const int r = drain_upto(st, UINT64_MAX); // destroy waits for the stream's work, as on a GPU
    std::lock_guard<std::mutex> g(g_streams_mutex);
    g_streams.erase(st);
    // Not deleted: another stream may still hold a wait on one of its events (allowed in CUDA),
    // and reads its completed count. A stream is a few dozen bytes; processes make few.
    return r;
}
CUresult cuStreamSynchronize(void* s) { return emud::drain(s); }
CUresult cuStreamQuery(void* s) {
    Stream* st = resolve(s);
    if (!st) return INVALID_CONTEXT;
    std::lock_guard<std::mutex> g(st->qm);
    return st->q.empty() ? OK : NOT_READY;
}
CUresult cuStreamWaitEvent(void* s, void* e, unsigned) {
    if (!e) return INVALID_HANDLE;
    Stream* st = resolve(s);
    if (!st) return INVALID_CONTEXT;
    const EventState& ev = *static_cast<Event*>(e)->st;
    Stream* src = ev.stream;
    const uint64_t seq = ev.seq;
    if (!src || src == st) return OK;
    return emud::submit(st, [src, seq](bool block) {
        if (reached(src, seq)) return 0;
        return block ? drain_upto(src, seq) : emud::kWouldBlock;
    });
}
CUresult cuEventCreate(void** e, unsigned) {
    if (!e) return INVALID_VALUE;
    *e = new Event;
    return OK;
}
CUresult cuEventDestroy_v2(void* e) {
    delete static_cast<Event*>(e);
    return OK;
}
CUresult cuEventRecord(void* e, void* s) {
    if (!e) return INVALID_HANDLE;
    Stream* st = resolve(s);
    if (!st) return INVALID_CONTEXT;
    // A new state for each record: a queued earlier record of this event writes the old one.
    auto ev = std::make_shared<EventState>();
    const int r = emud::submit(st, [ev](bool) {
        ev->ms = now_ms();
        return 0;
    });
    {
        std::lock_guard<std::mutex> g(st->qm);
        ev->stream = st;
        ev->seq = st->submitted;
    }
    static_cast<Event*>(e)->st = ev;
    return r;
}
CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
CUresult cuEventSynchronize(void* e) {
    if (!e) return INVALID_HANDLE;
    const EventState& ev = *static_cast<Event*>(e)->st;
    return ev.stream ? drain_upto(ev.stream, ev.seq) : OK;
}
CUresult cuEventQuery(void* e) {
    if (!e) return INVALID_HANDLE;
    const EventState& ev = *static_cast<Event*>(e)->st;
    return !ev.stream || reached(ev.stream, ev.seq) ? OK : NOT_READY;
}
CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    if (!ms) return INVALID_VALUE;
    if (!a || !b) return INVALID_HANDLE;
    for (void* e : {a, b}) { // as in CUDA: an event not yet complete is an error, not a wait
        const EventState& ev = *static_cast<Event*>(e)->st;
        if (!ev.stream) return INVALID_HANDLE;
        if (!reached(ev.stream, ev.seq)) return NOT_READY;
    }
    *ms = (float)(static_cast<Event*>(b)->st->ms - static_cast<Event*>(a)->st->ms);
    return OK;
}
CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }
CUresult cuCtxSynchronize() {
    if (!t_ctx) return INVALID_CONTEXT;
    return drain_device(t_ctx->device);
}
CUresult cuCtxSynchronize_v2(void* ctx) {
    Ctx* c = ctx ? static_cast<Ctx*>(ctx) : t_ctx;
    if (!c) return INVALID_CONTEXT;
    return drain_device(c->device);
}

// ---- memory -------------------------------------------------------------------------------------------
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    if (!t_ctx) return INVALID_CONTEXT;
    return alloc(p, bytes, t_ctx->device);
}
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* s) {
    Stream* st = resolve(s);
    if (!st) return INVALID_CONTEXT;
    return alloc(p, bytes, st->device);
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    if (!t_ctx) return INVALID_CONTEXT;
    if (int r = drain_device(t_ctx->device)) return r; // cuMemFree synchronizes the device
    return release(p, "cuMemFree");
}
CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    return emud::submit(s, [p](bool) { return release(p, "cuMemFreeAsync"); });
}
CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    if (!p) return INVALID_VALUE;
    *p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    return *p ? OK : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void* p) {
    std::free(p);
    return OK;
}
CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    if (!t_ctx) return INVALID_CONTEXT;
    std::lock_guard<std::mutex> g(g_mem_mutex);
    if (total) *total = emud::device_total_bytes();
    if (free_bytes) *free_bytes = emud::device_total_bytes() - g_used[t_ctx->device];
    return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void* s) {
    if (!h && n) return INVALID_VALUE;
    // The host bytes are taken now: the caller may reuse its buffer once the call returns when
    // the copy is staged (pageable memory), and a queued copy must not read it later.
    auto staged = std::make_shared<std::vector<unsigned char>>((const unsigned char*)h, (const unsigned char*)h + n);
    return emud::submit(s, [d, staged](bool) {
        return copy(d, (uint64_t)(uintptr_t)staged->data(), staged->size(), true, false, "cuMemcpyHtoDAsync");
    });
}
CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void* s) {
    return emud::submit(s, [h, d, n](bool) {
        return copy((uint64_t)(uintptr_t)h, d, n, false, true, "cuMemcpyDtoHAsync");
    });
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, void* s) {
    return emud::submit(s, [d, src, n](bool) { return copy(d, src, n, true, true, "cuMemcpyDtoDAsync"); });
}
CUresult cuMemcpyPeerAsync(CUdeviceptr d, void*, CUdeviceptr src, void*, size_t n, void* s) {
    return emud::submit(s, [d, src, n](bool) { return copy(d, src, n, true, true, "cuMemcpyPeerAsync"); });
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    if (int r = emud::drain(nullptr)) return r;
    return copy(d, (uint64_t)(uintptr_t)h, n, true, false, "cuMemcpyHtoD");
}
CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    if (int r = emud::drain(nullptr)) return r;
    return copy((uint64_t)(uintptr_t)h, d, n, false, true, "cuMemcpyDtoH");
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr src, size_t n) {
    if (int r = emud::drain(nullptr)) return r;
    return copy(d, src, n, true, true, "cuMemcpyDtoD");
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* s) {
    return emud::submit(s, [d, v, n](bool) {
        if (!emud::check_device_range(d, n, "cuMemsetD8")) return (int)INVALID_VALUE;
        std::memset((void*)(uintptr_t)d, v, n);
        return 0;
    });
}
CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    if (int r = cuMemsetD8Async(d, v, n, nullptr)) return r;
    return emud::drain(nullptr);
}
CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void* s) {
    return emud::submit(s, [d, v, n](bool) {
        if (!emud::check_device_range(d, n * 4, "cuMemsetD32Async")) return (int)INVALID_VALUE;
        auto* p = (unsigned*)(uintptr_t)d;
        for (size_t i = 0; i < n; ++i) p[i] = v;
        return 0;
    });
}
CUresult cuDeviceGetDefaultMemPool(void** pool, CUdevice d) {
    if (!pool) return INVALID_VALUE;
    if (!valid_device(d)) return INVALID_DEVICE;
    *pool = &g_pool[d];
    return OK;
}
CUresult cuMemPoolSetAttribute(void* pool, int attr, void* value) {
    if (!pool || !value) return INVALID_VALUE;
    Pool* p = static_cast<Pool*>(pool);
    switch (attr) {
    case 4: p->release_threshold = *static_cast<uint64_t*>(value); return OK;
    case 6: case 8: { // reserved / used high: only a reset to 0, which restarts at what is in use
        if (*static_cast<uint64_t*>(value) != 0) return INVALID_VALUE;
        std::lock_guard<std::mutex> g(g_mem_mutex);
        g_high[p->device] = g_used[p->device];
        return OK;
    }
    default: return OK;
    }
}
CUresult cuMemPoolTrimTo(void* pool, size_t) {
    // Freed memory goes back to the device at once here (reserved == used): nothing to trim.
    return pool ? OK : INVALID_VALUE;
}
CUresult cuMemPoolGetAttribute(void* pool, int attr, void* value) {
    if (!pool || !value) return INVALID_VALUE;
    Pool* p = static_cast<Pool*>(pool);
    std::lock_guard<std::mutex> g(g_mem_mutex);
    switch (attr) {
    case 4: *static_cast<uint64_t*>(value) = p->release_threshold; return OK;
    case 5: case 7: // reserved / used now: freed memory is returned at once, so they are equal
        *static_cast<uint64_t*>(value) = g_used[p->device];
        return OK;
    case 6: case 8: // reserved / used high watermark
        *static_cast<uint64_t*>(value) = g_high[p->device];
        return OK;
    default: return NOT_SUPPORTED;
    }
}

// ---- modules and launches ---------------------------------------------------------------------------
CUresult cuModuleLoadData(void** m, const void* image) {
    if (!m || !image) return INVALID_VALUE;
    if (!t_ctx) return INVALID_CONTEXT;
    *m = new Module{t_ctx->device};
    return OK;
}
CUresult cuModuleUnload(void* m) {
    delete static_cast<Module*>(m);
    return OK;
}
CUresult cuModuleGetFunction(void** f, void* m, const char* name) {
    if (!f || !m || !name) return INVALID_VALUE;
    for (Function& fn : g_functions)
        if (std::strcmp(fn.name, name) == 0) {
            *f = &fn;
            return OK;
        }
    return NOT_FOUND;
}
CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared_bytes, void* s, void** params, void** extra) {
    if (!f) return INVALID_HANDLE;
    const Function* fn = static_cast<const Function*>(f);
    if (extra || !params || !params[0]) {
        emud::say(std::string(fn->name) + ": launch without a params struct (kernelParams[0])");
        return INVALID_VALUE;
    }
    if (gx == 0 || gy == 0 || gz == 0 || bx == 0 || by == 0 || bz == 0 || bx * by * bz > 1024 ||
        gy > 65535 || gz > 65535 || gx > 0x7fffffffu) {
        emud::say(std::string(fn->name) + ": invalid launch configuration");
        return INVALID_VALUE;
    }
    if (shared_bytes != 0) {
        emud::say(std::string(fn->name) + ": dynamic shared memory is not emulated");
        return NOT_SUPPORTED;
    }
    // cuLaunchKernel copies the argument bytes before it returns.
    auto args = std::make_shared<std::vector<unsigned char>>(fn->params_size());
    std::memcpy(args->data(), params[0], args->size());
    return emud::submit(s, [fn, args, gx, gy, gz, bx, by, bz](bool) {
        const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
        std::lock_guard<std::mutex> g(g_launch_mutex);
        try {
            fn->thunk(grid, block, args->data());
        } catch (const std::exception& e) {
            emud::say(std::string(fn->name) + ": " + e.what());
            return (int)LAUNCH_FAILED;
        }
        return 0;
    });
}

// ---- errors -------------------------------------------------------------------------------------------
CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return INVALID_VALUE;
    switch (e) {
    case OK: *s = "CUDA_SUCCESS"; break;
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
    case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case NOT_INITIALIZED: *s = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case NO_DEVICE: *s = "CUDA_ERROR_NO_DEVICE"; break;
    case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
    case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; break;
    case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
    case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
    case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; break;
    case NOT_SUPPORTED: *s = "CUDA_ERROR_NOT_SUPPORTED"; break;
    default: *s = "CUDA_ERROR_UNKNOWN"; return INVALID_VALUE;
    }
    return OK;
}
CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

} // extern "C"
