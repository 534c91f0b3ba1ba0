// emu_driver.h - shared state of the emulated CUDA stack (driver.cpp, blas.cpp, nccl.cpp).
//
// The emulated stack is one shared library, installed under three names (libcuda.so,
// libcublas.so, libnccl.so) so that cudarc's dynamic loading opens it in place of NVIDIA's
// libraries. "Device" memory is host memory; every stream is synchronous (work runs when it is
// enqueued); kernels are the real cuda/*.cu sources compiled for the CPU emulator (emu.h), looked
// up by name; cuBLAS GEMMs are plain loops with f32 accumulation; NCCL communicators are groups of
// threads of this process. It exists to run the GPU code paths of the Rust host code (buffers,
// launches, workers, switches, communicators) without a GPU. It says nothing about GPU timing or
// about behaviour that needs real concurrency; see scripts/check-gpu-emu.sh.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace emud {

// Number of emulated devices (PAT_EMU_GPUS, default 2) and bytes of memory each
// (PAT_EMU_GPU_MEM_MIB, default 4096).
int device_count();
uint64_t device_total_bytes();

// The device of the calling thread's current context, or -1.
int current_device();

// Whether [ptr, ptr + n) lies inside one live device allocation; when not, prints a message naming
// `what` to stderr. n = 0 is always fine.
bool check_device_range(uint64_t ptr, size_t n, const char* what);

// Writes "pat-emu: <message>" to stderr (one line).
void say(const std::string& message);

// Seconds a blocked NCCL call waits for its peers before failing (PAT_EMU_NCCL_TIMEOUT_S,
// default 120): on a GPU it would hang.
double nccl_timeout_s();

// Streams are in-order queues. An operation runs at once when nothing is queued ahead of it on its
// stream; an NCCL receive or collective whose peers have not delivered yet stays queued, and so
// does everything submitted after it, until a synchronize (or a stream waiting on one of its
// events) drains the queue. This keeps the host asynchronous where a GPU's would be: a rank that
// enqueues a receive and goes on to a host-side rendezvous does not block where a GPU would not.
//
// With PAT_EMU_DEFER=1 every operation is queued until a synchronize (stream, event, context,
// a synchronous copy, cuMemFree, stream destroy), as late as a GPU may run it: host code that
// reads a result (or reuses a buffer) before synchronizing sees stale data.
//
// An operation is called with block = false when it may be deferred (return kWouldBlock to stay
// queued) and with block = true from a drain (it must finish, or fail after nccl_timeout_s()).
// It returns 0 or a CUresult error code. `owner` tags it for drop_owned (ncclCommAbort).
constexpr int kWouldBlock = -1;
using Op = std::function<int(bool block)>;

// Runs or queues `op` on stream `s` (null: the current device's default stream). Returns 0, the
// op's error if it ran and failed, or an error for a bad stream.
int submit(void* s, Op op, const void* owner = nullptr);

// Runs every queued operation of `s` (null: the current device's default stream); returns the
// first error (later operations stay queued) or 0.
int drain(void* s);

// Removes the queued operations tagged with `owner` from every stream (an aborted communicator's
// work never runs, as ncclCommAbort kills its kernels).
void drop_owned(const void* owner);

} // namespace emud
