#!/usr/bin/env bash
# The GPU code paths without a GPU: every GPU test and a CLI switch ladder, run on the emulated
# CUDA stack (cuda/test/driver: the real cuda/*.cu kernels under the CPU emulator, cuBLAS GEMMs as
# loops, NCCL over threads of the process, host memory as device memory, 4 "GPUs" by default).
#
# What this checks: the Rust host code of the `cuda` feature end to end - device buffers and
# their bounds (a copy outside a live allocation is an error here, and fresh allocations read as
# NaN), kernel launches and their params structs, stream order, the GPU workers, same-device and
# NCCL groups (one rank per GPU), live switches on the devices and through the host, failed
# switches, the KV pool. What it cannot check: anything about GPU timing (every number a bench
# prints here is the emulator's), real concurrency on the device, the memory model, driver or
# NCCL behaviour beyond what cuda/test/driver/*.cpp emulates. scripts/gpu-check.sh on a GPU does.
#
# Usage: scripts/check-gpu-emu.sh [--release]
#   Builds the stack (scripts/check-kernels-cpu.sh --driver), then:
#   1. cargo test --features cuda --lib --test cuda_kernels --test cuda_model with
#      PAT_REQUIRE_GPU=1 (a skip for want of a GPU is a failure), twice: stream work run as soon
#      as nothing is queued ahead of it, then with PAT_EMU_DEFER=1 (all of it deferred to the
#      next synchronize: a missing synchronize shows as stale data), the second time with a
#      switch's KV exchanged one layer per round (PAT_SWITCH_ROUND_BYTES=1, so message buffers
#      are reused across rounds). Two statistical kernel tests are left out: each runs ~10^5
#      blocks of up to 1024 emulated threads (hours here); their kernels are checked directly
#      by scripts/check-kernels-cpu.sh.
#   2. `pat generate` through a ladder of live switches (tp 1 -> 2 -> 4 -> 1 -> 2, migrate,
#      recompute and auto) on the llama fixture: one rank per GPU and all ranks on GPU 0, on the
#      devices and through the host; every run's tokens must equal the CPU backend's.
#   3. `pat rollout --policy adaptive` on a straggler batch with a profile that makes tp 1 -> 4
#      pay (auto, migrate, recompute; one rank per GPU and all on GPU 0): every step's and
#      switch's untimed fields must equal the CPU backend's, with at least one switch.
# Environment: PAT_EMU_GPUS (default 4), PAT_EMU_GPU_MEM_MIB (default 4096),
#   PAT_EMU_NCCL_TIMEOUT_S (default 60: a blocked NCCL call fails after it, where a GPU would hang).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"
die() { echo "check-gpu-emu: error: $*" >&2; exit 1; }
info() { echo "check-gpu-emu: $*" >&2; }

profile=()
case "${1:-}" in
    "") ;;
    --release) profile=(--release) ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

scripts/check-kernels-cpu.sh --driver
export LD_LIBRARY_PATH="$repo_root/target/kernels-cpu/driver${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PAT_REQUIRE_GPU=1 RUST_BACKTRACE=1
export PAT_EMU_GPUS="${PAT_EMU_GPUS:-4}" PAT_EMU_NCCL_TIMEOUT_S="${PAT_EMU_NCCL_TIMEOUT_S:-60}"

# The nvcc-built fatbins are embedded as usual (build.rs); the emulated driver ignores them and
# runs the same sources compiled for the CPU.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for defer in 0 1; do
    # PAT_EMU_DEFER=1: every stream operation waits for a synchronize (as late as a GPU may run
    # it), so host code that reads a result or reuses a buffer before synchronizing fails.
    # The deferred pass also exchanges a switch's KV one layer per round
    # (PAT_SWITCH_ROUND_BYTES=1): on these small models the default round is every layer.
    rounds=$((defer == 1 ? 1 : 0))
    info "1. the GPU tests on $PAT_EMU_GPUS emulated GPUs, PAT_EMU_DEFER=$defer, one layer per switch round: $defer"
    set +e
    PAT_SWITCH_ROUND_BYTES=$rounds PAT_EMU_DEFER=$defer cargo test "${profile[@]}" --features cuda --lib --test cuda_kernels \
        --test cuda_model -- \
        --skip sample_follows_the_filtered_distribution \
        --skip paged_attention_matches_the_oracle_with_and_without_split 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    [[ $status -eq 0 ]] || die "GPU tests failed on the emulated stack (PAT_EMU_DEFER=$defer)"
    if grep -q '^SKIP:' "$log"; then
        grep '^SKIP:' "$log" >&2
        die "GPU tests skipped on the emulated stack"
    fi
    if grep -q 'pat-emu: ' "$log"; then
        info "note: the emulated stack reported (above) what a GPU might do silently"
    fi
done

info "2. pat generate through a ladder of live switches, CPU vs emulated GPUs"
cargo build "${profile[@]}" --features cuda --bin pat
dir=debug
[[ ${#profile[@]} -gt 0 ]] && dir=release
pat="${CARGO_TARGET_DIR:-$repo_root/target}/$dir/pat"
[[ -x "$pat" ]] || die "no pat binary at $pat"
model="$repo_root/tests/data/golden/llama"
ladder=(--reconfigure 3:2 --reconfigure 6:4 --reconfigure 9:1 --reconfigure 11:2)
ids() { # backend-args... : the output ids of one greedy request, or the error
    "$pat" generate --model "$model" --world 4 --tp 1 --prompt-ids 1,5,9,22,7 --max-new-tokens 14 \
        --ignore-eos "${ladder[@]}" "$@" 2>"$log.err" | grep -o '"output_ids":\[[^]]*\]' ||
        { cat "$log.err" >&2; echo "FAILED"; }
}
want="$(ids --backend cpu --kv-transfer auto)"
[[ "$want" == *output_ids* ]] || die "the CPU run failed"
info "cpu: $want"
failed=0
for devices in 0,1,2,3 0,0,0,0; do
    for how in device host; do
        for kv in migrate recompute auto; do
            got="$(ids --backend cuda --devices "$devices" --gpu-switch "$how" --kv-transfer "$kv")"
            if [[ "$got" == "$want" ]]; then
                info "cuda devices $devices, switching on the $how, $kv: same tokens"
            else
                info "cuda devices $devices, switching on the $how, $kv: $got (expected the CPU's)"
                failed=1
            fi
        done
    done
done
rm -f "$log.err"
[[ $failed -eq 0 ]] || die "the emulated GPU runs differ from the CPU run"

info "3. pat rollout --policy adaptive: the same steps and switches on the emulated GPUs as on the CPU"
scripts/rollout-schedule.sh "$pat" 0,1,2,3 0,0,0,0 || die "the emulated GPU rollouts differ from the CPU's"
info "passed (emulated: no GPU ran; timings printed above are the emulator's)"
