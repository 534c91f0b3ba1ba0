// selftest_kernels.h - parameters and entry points of selftest_kernels.cu (emulator self-tests).
#pragma once
#include "params.h"

typedef struct EmuSelftestParams {
    PatDevPtr out; /* u32 or f32, layout per kernel */
    PatDevPtr aux; /* u32 / u64 scratch (counters) */
    int32_t n;
    int32_t mode;
} EmuSelftestParams;

extern "C" {
void emu_selftest_warp_ops(EmuSelftestParams p);
void emu_selftest_shared_rounds(EmuSelftestParams p);
void emu_selftest_shared_racy(EmuSelftestParams p);
void emu_selftest_shared_unwritten(EmuSelftestParams p);
void emu_selftest_indices(EmuSelftestParams p);
void emu_selftest_atomics(EmuSelftestParams p);
void emu_selftest_misuse(EmuSelftestParams p);
}
