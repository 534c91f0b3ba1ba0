// nccl.cpp - the NCCL subset pat calls, for communicators whose ranks are threads of this process.
//
// ncclCommInitRank blocks until every rank of the id has joined, and fails, as NCCL does, when two
// ranks of one communicator are on the same device. Sends copy their bytes into the peer's mailbox
// (FIFO per pair) when they run on the sender's stream; receives take them when they run on the
// receiver's stream, and stay queued there until the bytes arrive (see emud::submit). A size
// mismatch between a send and its receive is an error (NCCL would corrupt or hang). AllReduce sums
// in rank order with f32 accumulation and one rounding (NCCL rounds at every hop: results agree to
// the dtype's tolerance); AllGather concatenates in rank order. A blocked call fails after
// PAT_EMU_NCCL_TIMEOUT_S seconds with a message saying a GPU would hang there. ncclCommAbort drops
// the communicator's queued work.
#include "emu_driver.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

enum : int { OK = 0, CUDA_ERR = 1, SYSTEM_ERR = 2, INTERNAL_ERR = 3, INVALID_ARG = 4, INVALID_USAGE = 5,
             REMOTE_ERR = 6 };
constexpr int kCudaLaunchFailed = 719; // what a failed queued NCCL operation reports at a sync

struct UniqueId {
    char internal[128];
};

using Bytes = std::vector<unsigned char>;

struct Collective {
    std::vector<std::shared_ptr<Bytes>> parts; // by rank
    int arrived = 0, taken = 0;
};

struct Group {
    int n = 0, joined = 0;
    bool failed = false;
    std::vector<int> devices;
    std::mutex m;
    std::condition_variable cv;
    std::map<std::pair<int, int>, std::deque<Bytes>> mail; // (from, to) -> messages
    std::map<uint64_t, Collective> colls;                   // by the ranks' collective counter
};

struct Comm {
    std::shared_ptr<Group> g;
    int rank = 0, device = 0;
    uint64_t colls = 0; // collectives this rank has called
    bool aborted = false;
    std::string last_error;
};

struct PendingOp {
    bool send;
    const void* send_buf;
    void* recv_buf;
    size_t bytes;
    int peer;
    Comm* comm;
    void* stream;
};

std::mutex g_ids_mutex;
std::map<std::string, std::shared_ptr<Group>> g_ids;
uint64_t g_next_id = 1;

thread_local int t_group_depth = 0;
thread_local std::vector<PendingOp> t_group;

size_t dtype_size(int t) {
    switch (t) {
    case 0: case 1: return 1;           // int8, uint8
    case 2: case 3: case 7: return 4;   // int32, uint32, float32
    case 4: case 5: case 8: return 8;   // int64, uint64, float64
    case 6: case 9: return 2;           // float16, bfloat16
    default: return 0;
    }
}

double as_f64(const unsigned char* p, int t) {
    switch (t) {
    case 0: return *(const int8_t*)p;
    case 1: return *(const uint8_t*)p;
    case 2: return *(const int32_t*)p;
    case 3: return *(const uint32_t*)p;
    case 4: return (double)*(const int64_t*)p;
    case 5: return (double)*(const uint64_t*)p;
    case 6: return __half2float(*(const __half*)p);
    case 7: return *(const float*)p;
    case 8: return *(const double*)p;
    default: return __bfloat162float(*(const __nv_bfloat16*)p);
    }
}

void from_f64(unsigned char* p, int t, double v) {
    switch (t) {
    case 0: *(int8_t*)p = (int8_t)v; break;
    case 1: *(uint8_t*)p = (uint8_t)v; break;
    case 2: *(int32_t*)p = (int32_t)v; break;
    case 3: *(uint32_t*)p = (uint32_t)v; break;
    case 4: *(int64_t*)p = (int64_t)v; break;
    case 5: *(uint64_t*)p = (uint64_t)v; break;
    case 6: *(__half*)p = __float2half_rn((float)v); break;
    case 7: *(float*)p = (float)v; break;
    case 8: *(double*)p = v; break;
    default: *(__nv_bfloat16*)p = __float2bfloat16_rn((float)v); break;
    }
}

int fail(Comm* c, int code, const std::string& msg) {
    if (c) c->last_error = msg;
    emud::say("nccl: " + msg);
    return code;
}

// Waits on the group's condition until `ready()`; false (with a message) on timeout or abort.
template <class F> bool wait_for(Comm* c, std::unique_lock<std::mutex>& l, F ready, const char* what) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(emud::nccl_timeout_s());
    while (!ready()) {
        if (c->aborted) {
            fail(c, SYSTEM_ERR, std::string(what) + ": communicator aborted while waiting");
            return false;
        }
        if (c->g->cv.wait_until(l, deadline) == std::cv_status::timeout && !ready()) {
            fail(c, SYSTEM_ERR, "rank " + std::to_string(c->rank) + ": " + what + " waited " +
                                    std::to_string((int)emud::nccl_timeout_s()) +
                                    " s for its peers; on a GPU this would hang");
            return false;
        }
    }
    return true;
}

// Queues on `stream`: a send posts its bytes to the peer's mailbox.
int enqueue_send(const PendingOp& op) {
    Comm* c = op.comm;
    return emud::submit(op.stream, [op, c](bool) {
        if (!emud::check_device_range((uint64_t)(uintptr_t)op.send_buf, op.bytes, "ncclSend"))
            return kCudaLaunchFailed;
        Bytes b((const unsigned char*)op.send_buf, (const unsigned char*)op.send_buf + op.bytes);
        std::lock_guard<std::mutex> l(c->g->m);
        c->g->mail[{c->rank, op.peer}].push_back(std::move(b));
        c->g->cv.notify_all();
        return 0;
    }, c);
}

// Queues on `stream`: a receive takes the next message from the peer (waiting when blocking).
int enqueue_recv(const PendingOp& op) {
    Comm* c = op.comm;
    return emud::submit(op.stream, [op, c](bool block) {
        std::unique_lock<std::mutex> l(c->g->m);
        auto& box = c->g->mail[{op.peer, c->rank}];
        if (box.empty()) {
            if (!block) return emud::kWouldBlock;
            if (!wait_for(c, l, [&] { return !box.empty(); }, "ncclRecv")) return kCudaLaunchFailed;
        }
        Bytes b = std::move(box.front());
        box.pop_front();
        l.unlock();
        if (b.size() != op.bytes) {
            fail(c, INVALID_USAGE, "rank " + std::to_string(c->rank) + " receives " + std::to_string(op.bytes) +
                                       " bytes from rank " + std::to_string(op.peer) + ", which sent " +
                                       std::to_string(b.size()));
            return kCudaLaunchFailed;
        }
        if (!emud::check_device_range((uint64_t)(uintptr_t)op.recv_buf, op.bytes, "ncclRecv"))
            return kCudaLaunchFailed;
        if (op.bytes) std::memcpy(op.recv_buf, b.data(), op.bytes);
        return 0;
    }, c);
}

// A collective: post this rank's part now (in stream order), then finish when every part is in.
// `finish(parts)` writes this rank's output from all parts.
int collective(Comm* c, const void* send, size_t send_bytes, void* stream,
               std::function<int(const std::vector<std::shared_ptr<Bytes>>&)> finish) {
    if (!c) return INVALID_ARG;
    if (t_group_depth > 0)
        return fail(c, INVALID_USAGE, "collective inside ncclGroupStart/End is not emulated");
    const uint64_t seq = c->colls++;
    int r = emud::submit(stream, [c, seq, send, send_bytes](bool) {
        if (!emud::check_device_range((uint64_t)(uintptr_t)send, send_bytes, "nccl collective send buffer"))
            return kCudaLaunchFailed;
        auto part = std::make_shared<Bytes>((const unsigned char*)send, (const unsigned char*)send + send_bytes);
        std::lock_guard<std::mutex> l(c->g->m);
        Collective& k = c->g->colls[seq];
        if (k.parts.empty()) k.parts.resize((size_t)c->g->n);
        k.parts[(size_t)c->rank] = part;
        ++k.arrived;
        c->g->cv.notify_all();
        return 0;
    }, c);
    if (r) return CUDA_ERR;
    r = emud::submit(stream, [c, seq, finish](bool block) {
        std::unique_lock<std::mutex> l(c->g->m);
        Collective& k = c->g->colls[seq];
        if (k.arrived < c->g->n) {
            if (!block) return emud::kWouldBlock;
            if (!wait_for(c, l, [&] { return k.arrived == c->g->n; }, "collective")) return kCudaLaunchFailed;
        }
        std::vector<std::shared_ptr<Bytes>> parts = k.parts;
        if (++k.taken == c->g->n) c->g->colls.erase(seq);
        l.unlock();
        for (auto& p : parts)
            if (p->size() != parts[0]->size()) {
                fail(c, INVALID_USAGE, "collective with different counts on different ranks");
                return kCudaLaunchFailed;
            }
        return finish(parts);
    }, c);
    return r ? CUDA_ERR : OK;
}

} // namespace

extern "C" {

int ncclGetVersion(int* v) {
    if (!v) return INVALID_ARG;
    *v = 22800; // the API of NCCL 2.28 (bf16, ncclGetLastError)
    return OK;
}

const char* ncclGetErrorString(int r) {
    switch (r) {
    case OK: return "no error";
    case CUDA_ERR: return "unhandled cuda error (emulated)";
    case SYSTEM_ERR: return "unhandled system error (emulated; see the pat-emu message)";
    case INTERNAL_ERR: return "internal error (emulated)";
    case INVALID_ARG: return "invalid argument (emulated)";
    case INVALID_USAGE: return "invalid usage (emulated; see the pat-emu message)";
    case REMOTE_ERR: return "remote process exited or there was a network error (emulated)";
    default: return "unknown result code (emulated)";
    }
}

const char* ncclGetLastError(void* comm) {
    return comm ? static_cast<Comm*>(comm)->last_error.c_str() : "";
}

int ncclGetUniqueId(UniqueId* id) {
    if (!id) return INVALID_ARG;
    std::memset(id->internal, 0, sizeof id->internal);
    std::lock_guard<std::mutex> l(g_ids_mutex);
    const uint64_t n = g_next_id++;
    std::memcpy(id->internal, "pat-emu-nccl-id:", 16);
    std::memcpy(id->internal + 16, &n, sizeof n);
    return OK;
}

int ncclCommInitRank(void** out, int nranks, UniqueId id, int rank) {
    if (!out || nranks < 1 || rank < 0 || rank >= nranks) return INVALID_ARG;
    const int dev = emud::current_device();
    if (dev < 0) return fail(nullptr, CUDA_ERR, "ncclCommInitRank without a current CUDA context");
    std::shared_ptr<Group> g;
    {
        std::lock_guard<std::mutex> l(g_ids_mutex);
        auto& slot = g_ids[std::string(id.internal, sizeof id.internal)];
        if (!slot) {
            slot = std::make_shared<Group>();
            slot->n = nranks;
            slot->devices.assign((size_t)nranks, -1);
        }
        g = slot;
    }
    auto* c = new Comm;
    c->g = g;
    c->rank = rank;
    c->device = dev;
    std::unique_lock<std::mutex> l(g->m);
    if (g->n != nranks) {
        delete c;
        return fail(nullptr, INVALID_USAGE, "ncclCommInitRank: ranks disagree on the communicator size");
    }
    if (g->devices[(size_t)rank] != -1) {
        delete c;
        return fail(nullptr, INVALID_USAGE, "ncclCommInitRank: rank " + std::to_string(rank) + " joined twice");
    }
    for (int d : g->devices)
        if (d == dev) g->failed = true; // NCCL: "Duplicate GPU detected"
    g->devices[(size_t)rank] = dev;
    ++g->joined;
    g->cv.notify_all();
    if (!wait_for(c, l, [&] { return g->joined == g->n; }, "ncclCommInitRank")) {
        l.unlock();
        delete c;
        return SYSTEM_ERR;
    }
    if (g->failed) {
        l.unlock();
        delete c;
        return fail(nullptr, INVALID_USAGE, "ncclCommInitRank: two ranks of one communicator on the same device");
    }
    *out = c;
    return OK;
}

int ncclCommCuDevice(void* comm, int* dev) {
    if (!comm || !dev) return INVALID_ARG;
    *dev = static_cast<Comm*>(comm)->device;
    return OK;
}

int ncclCommCount(void* comm, int* n) {
    if (!comm || !n) return INVALID_ARG;
    *n = static_cast<Comm*>(comm)->g->n;
    return OK;
}

int ncclCommUserRank(void* comm, int* r) {
    if (!comm || !r) return INVALID_ARG;
    *r = static_cast<Comm*>(comm)->rank;
    return OK;
}

int ncclCommGetAsyncError(void* comm, int* r) {
    if (!comm || !r) return INVALID_ARG;
    *r = OK;
    return OK;
}

int ncclCommAbort(void* comm) {
    if (!comm) return OK;
    Comm* c = static_cast<Comm*>(comm);
    {
        std::lock_guard<std::mutex> l(c->g->m);
        c->aborted = true;
        c->g->cv.notify_all();
    }
    emud::drop_owned(c);
    return OK; // the Comm is kept (leaked): a queued operation that is running may still use it
}

int ncclCommDestroy(void* comm) {
    if (!comm) return OK;
    Comm* c = static_cast<Comm*>(comm);
    emud::drop_owned(c); // NCCL requires the work to be done first; nothing of it may run later
    c->aborted = true;   // kept, as in ncclCommAbort
    return OK;
}

int ncclGroupStart() {
    ++t_group_depth;
    return OK;
}

int ncclGroupEnd() {
    if (t_group_depth == 0) return fail(nullptr, INVALID_USAGE, "ncclGroupEnd without ncclGroupStart");
    if (--t_group_depth > 0) return OK;
    std::vector<PendingOp> ops;
    ops.swap(t_group);
    // Sends first: within a group NCCL makes progress on all operations at once, so a rank's
    // receive never waits on its own send.
    for (const PendingOp& op : ops)
        if (op.send && enqueue_send(op)) return CUDA_ERR;
    for (const PendingOp& op : ops)
        if (!op.send && enqueue_recv(op)) return CUDA_ERR;
    return OK;
}

int ncclSend(const void* buf, size_t count, int dtype, int peer, void* comm, void* stream) {
    Comm* c = static_cast<Comm*>(comm);
    if (!c || !dtype_size(dtype) || peer < 0 || peer >= c->g->n) return INVALID_ARG;
    PendingOp op{true, buf, nullptr, count * dtype_size(dtype), peer, c, stream};
    if (t_group_depth > 0) {
        t_group.push_back(op);
        return OK;
    }
    return enqueue_send(op) ? CUDA_ERR : OK;
}

int ncclRecv(void* buf, size_t count, int dtype, int peer, void* comm, void* stream) {
    Comm* c = static_cast<Comm*>(comm);
    if (!c || !dtype_size(dtype) || peer < 0 || peer >= c->g->n) return INVALID_ARG;
    PendingOp op{false, nullptr, buf, count * dtype_size(dtype), peer, c, stream};
    if (t_group_depth > 0) {
        t_group.push_back(op);
        return OK;
    }
    return enqueue_recv(op) ? CUDA_ERR : OK;
}

int ncclAllReduce(const void* send, void* recv, size_t count, int dtype, int op, void* comm, void* stream) {
    Comm* c = static_cast<Comm*>(comm);
    const size_t es = dtype_size(dtype);
    if (!c || !es) return INVALID_ARG;
    if (op != 0) return fail(c, INVALID_ARG, "only ncclSum is emulated");
    const size_t bytes = count * es;
    return collective(c, send, bytes, stream, [recv, count, es, dtype, bytes](const std::vector<std::shared_ptr<Bytes>>& parts) {
        if (!emud::check_device_range((uint64_t)(uintptr_t)recv, bytes, "ncclAllReduce recv buffer"))
            return kCudaLaunchFailed;
        auto* out = static_cast<unsigned char*>(recv);
        const bool narrow = dtype == 6 || dtype == 9 || dtype == 7;
        for (size_t i = 0; i < count; ++i) {
            double acc = 0;
            float accf = 0;
            for (const auto& p : parts) {
                const double v = as_f64(p->data() + i * es, dtype);
                acc += v;
                accf += (float)v;
            }
            from_f64(out + i * es, dtype, narrow ? (double)accf : acc);
        }
        return 0;
    });
}

int ncclAllGather(const void* send, void* recv, size_t count, int dtype, void* comm, void* stream) {
    Comm* c = static_cast<Comm*>(comm);
    const size_t es = dtype_size(dtype);
    if (!c || !es) return INVALID_ARG;
    const size_t bytes = count * es;
    const int n = c->g->n;
    return collective(c, send, bytes, stream, [recv, bytes, n](const std::vector<std::shared_ptr<Bytes>>& parts) {
        if (!emud::check_device_range((uint64_t)(uintptr_t)recv, bytes * (size_t)n, "ncclAllGather recv buffer"))
            return kCudaLaunchFailed;
        for (size_t r = 0; r < parts.size(); ++r)
            if (bytes) std::memcpy(static_cast<unsigned char*>(recv) + r * bytes, parts[r]->data(), bytes);
        return 0;
    });
}

} // extern "C"
