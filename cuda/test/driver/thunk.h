// thunk.h - type-erased entry points for the emulated kernels, for the emulated CUDA driver.
//
// The build (scripts/check-kernels-cpu.sh) compiles each cuda/<name>.cu through a generated file
// that includes it and then, for every extern "C" kernel K found in it, writes EMU_THUNK(K):
//   emu_thunk_K(grid, block, params)  runs K under the emulator with the params struct at `params`;
//   emu_params_size_K()               is sizeof that struct (cuLaunchKernel copies it).
// Every kernel takes one params struct by value, so the struct type is deduced from K.
#pragma once

#include <cstddef>

namespace emu_thunk {
template <class P> void run(void (*k)(P), const unsigned* g, const unsigned* b, const void* p) {
    emu::launch(k, dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2]), *static_cast<const P*>(p));
}
template <class P> size_t size(void (*)(P)) { return sizeof(P); }
} // namespace emu_thunk

#define EMU_THUNK(k)                                                                               \
    extern "C" void emu_thunk_##k(const unsigned* g, const unsigned* b, const void* p) {           \
        emu_thunk::run(k, g, b, p);                                                                \
    }                                                                                              \
    extern "C" size_t emu_params_size_##k() { return emu_thunk::size(k); }
