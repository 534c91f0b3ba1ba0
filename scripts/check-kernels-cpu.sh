#!/usr/bin/env bash
# Check the logic of every CUDA kernel on the CPU, without a GPU or nvcc: compile each cuda/*.cu
# with the host g++ against the emulator cuda/test/emu.h, link cuda/test/kernels_test.cpp (straight
# C++ references and comparisons for every kernel family), run it. Exits non-zero if the build
# fails or any test fails. Build output goes to target/kernels-cpu/ (incremental).
#
# Usage: scripts/check-kernels-cpu.sh [kernels_test options]
#   -j N            parallel test processes (default: number of CPUs)
#   --filter S      only tests whose name contains S (repeatable)
#   --list          list the tests and exit
#   -v              print the captured output of failing tests
#   --seed N        base seed of data and thread schedules (default 1)
#   --driver        build the emulated CUDA stack instead of running the tests: the same kernel
#                   objects, cuda/test/driver/*.cpp and the emulator linked into
#                   target/kernels-cpu/driver/libcuda.so (also named libcublas.so and libnccl.so),
#                   which cudarc opens in place of NVIDIA's libraries (scripts/check-gpu-emu.sh)
# Environment: CXX (default g++), PAT_CUDA_INCLUDE (directory holding cuda_bf16.h), JOBS (default:
#   number of CPUs), PAT_EMU_CXXFLAGS (extra compiler flags, e.g. "-O0 -g" to debug, or
#   -DEMU_UCONTEXT to use the portable, slower fiber switch).
#
# The kernels include <cuda_bf16.h> / <cuda_fp16.h>; their host code paths are used as they are,
# so bf16/f16 rounding is NVIDIA's own. They are taken from, in order: $PAT_CUDA_INCLUDE, the
# pinned nvcc wheels in .cuda-toolchain/ (installed by scripts/install-cuda-toolchain.sh when
# missing, which needs network once), $CUDA_HOME/include.
#
# Kernel objects are built with UBSan (alignment, array bounds, integer overflow, shifts, float
# casts; aborting), so a misaligned vector access - a fault on the GPU - fails the test. Their .bss
# sections (the kernels' __shared__ variables) are renamed to `emu_shared` so the emulator can
# poison shared memory before every block; the script checks that only function-local statics
# land there.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
driver=0
test_args=()
for arg in "$@"; do
    if [[ "$arg" == --driver ]]; then driver=1; else test_args+=("$arg"); fi
done
build="$repo_root/target/kernels-cpu"
cxx="${CXX:-g++}"
die() { echo "check-kernels-cpu: error: $*" >&2; exit 1; }
info() { echo "check-kernels-cpu: $*" >&2; }

command -v "$cxx" >/dev/null 2>&1 || die "C++ compiler '$cxx' not found (set CXX)"
for tool in objcopy objdump readelf; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (binutils)"
done

find_cuda_include() {
    local c
    if [[ -n "${PAT_CUDA_INCLUDE:-}" ]]; then
        [[ -f "$PAT_CUDA_INCLUDE/cuda_bf16.h" ]] || die "PAT_CUDA_INCLUDE=$PAT_CUDA_INCLUDE has no cuda_bf16.h"
        echo "$PAT_CUDA_INCLUDE"; return 0
    fi
    for c in "$repo_root"/.cuda-toolchain/lib/python3*/site-packages/nvidia/cu13/include; do
        if [[ -f "$c/cuda_bf16.h" ]]; then echo "$c"; return 0; fi
    done
    return 1
}
cuda_inc="$(find_cuda_include)" || {
    info "no CUDA headers in .cuda-toolchain/; running scripts/install-cuda-toolchain.sh"
    if "$repo_root/scripts/install-cuda-toolchain.sh" >/dev/null; then
        cuda_inc="$(find_cuda_include)" || die "install-cuda-toolchain.sh succeeded but cuda_bf16.h is missing"
    elif [[ -n "${CUDA_HOME:-}" && -f "$CUDA_HOME/include/cuda_bf16.h" ]]; then
        cuda_inc="$CUDA_HOME/include"
        info "install failed; using \$CUDA_HOME/include"
    else
        die "no cuda_bf16.h: install the toolchain (scripts/install-cuda-toolchain.sh) or set PAT_CUDA_INCLUDE"
    fi
}

jobs="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
mkdir -p "$build/obj" "$build/gen" "$build/driver"
t_start=$SECONDS

base_flags=(-O2 -std=c++17 -pthread -g0 -fPIC -fno-strict-aliasing -Wall -Wextra -Wno-unknown-pragmas
            -I "$repo_root/cuda" -I "$repo_root/cuda/test" -I "$cuda_inc")
if [[ -n "${PAT_EMU_CXXFLAGS:-}" ]]; then
    read -r -a extra_flags <<< "$PAT_EMU_CXXFLAGS"
    base_flags+=("${extra_flags[@]}")
fi

# UBSan for the kernel objects: with its runtime (messages) if it links, else trapping (SIGILL).
ubsan_checks="alignment,bounds,shift,integer-divide-by-zero,signed-integer-overflow,float-cast-overflow"
probe_dir="$(mktemp -d)"
trap 'rm -rf "$probe_dir"' EXIT
echo 'int main(int c, char**) { int a[4] = {0}; return a[c & 3]; }' > "$probe_dir/p.cpp"
san_flags=()
for cand in "-fsanitize=$ubsan_checks -fno-sanitize-recover=all" \
            "-fsanitize=$ubsan_checks -fsanitize-trap=all"; do
    # shellcheck disable=SC2086
    if "$cxx" $cand "$probe_dir/p.cpp" -o "$probe_dir/p" >/dev/null 2>&1 && "$probe_dir/p"; then
        read -r -a san_flags <<< "$cand"
        break
    fi
done
[[ ${#san_flags[@]} -gt 0 ]] || info "warning: UBSan unavailable; misaligned vector accesses will not be caught"
emu_flags=()
if "$cxx" -fcf-protection=none -c -x c++ /dev/null -o "$probe_dir/n.o" >/dev/null 2>&1; then
    emu_flags=(-fcf-protection=none) # emu.cpp switches stacks with `ret`; keep shadow stacks off
fi

# Rebuild everything when the compiler, flags or header location change.
stamp="$("$cxx" --version | head -n 1) | ${base_flags[*]} | ${san_flags[*]} | ${emu_flags[*]}"
if [[ ! -f "$build/stamp" || "$(cat "$build/stamp")" != "$stamp" ]]; then
    rm -f "$build"/obj/*.o "$build/kernels_test"
    printf '%s' "$stamp" > "$build/stamp"
fi

# Headers every kernel object depends on.
kernel_deps=("$repo_root"/cuda/*.h "$repo_root"/cuda/*.cuh "$repo_root"/cuda/test/*.h
             "$repo_root"/cuda/test/driver/*.h)

stale() { # stale OBJ DEP... : OBJ missing or older than a dependency
    local obj="$1" d
    shift
    [[ -f "$obj" ]] || return 0
    for d in "$@"; do [[ "$d" -nt "$obj" ]] && return 0; done
    return 1
}

# The extern "C" kernel names of a .cu file (from its preprocessed text, so macro-made ones count).
kernel_names() {
    "$cxx" -E "${base_flags[@]}" -x c++ -include "$repo_root/cuda/test/emu.h" "$1" |
        grep -oE 'extern +"C" +void +[A-Za-z_][A-Za-z0-9_]* *\(' | sed -E 's/.* ([A-Za-z0-9_]+) *\(/\1/'
}

# Compile one kernel file (through a generated file that adds the driver's thunks, see
# cuda/test/driver/thunk.h) and move its .bss sections into emu_shared.
build_kernel() {
    local src="$1" obj="$2" secs s bad gen names
    gen="$build/gen/$(basename "$src" .cu).cpp"
    names="$(kernel_names "$src")" || return 1
    [[ -n "$names" ]] || { echo "$src: no extern \"C\" kernel found" >&2; return 1; }
    { printf '#include "%s"\n#include "driver/thunk.h"\n' "$src"
      printf 'EMU_THUNK(%s)\n' $names; } > "$gen"
    printf '%s\n' $names > "$gen.names"
    "$cxx" "${base_flags[@]}" "${san_flags[@]}" -x c++ -include "$repo_root/cuda/test/emu.h" \
        -c "$gen" -o "$obj.tmp" || return 1
    secs=()
    while read -r s; do secs+=(--rename-section "$s=emu_shared"); done \
        < <(readelf -SW "$obj.tmp" | sed -n 's/^ *\[ *[0-9]*\] \(\.bss[^ ]*\) .*/\1/p')
    if [[ ${#secs[@]} -gt 0 ]]; then objcopy "${secs[@]}" "$obj.tmp" || return 1; fi
    # Only function-local statics (mangled _ZZ...: the __shared__ variables) may be poisoned.
    bad="$(objdump -t "$obj.tmp" | awk '$0 ~ /[ \t]emu_shared[ \t]/ && $NF != "emu_shared" && $NF !~ /^_ZZ/ {print $NF}')"
    if [[ -n "$bad" ]]; then
        echo "$src: non-__shared__ data in .bss would be poisoned by the emulator: $bad" >&2
        return 1
    fi
    mv "$obj.tmp" "$obj"
}

build_host() {
    local src="$1" obj="$2"
    shift 2
    "$cxx" "${base_flags[@]}" "$@" -c "$src" -o "$obj.tmp" && mv "$obj.tmp" "$obj"
}

shopt -s nullglob
kernel_srcs=("$repo_root"/cuda/*.cu "$repo_root"/cuda/test/*.cu)
objs=()
pending=0
failed=0
reap() { if ! wait -n; then failed=1; fi; pending=$((pending - 1)); }
for src in "${kernel_srcs[@]}"; do
    obj="$build/obj/$(basename "$src" .cu).o"
    objs+=("$obj")
    if stale "$obj" "$src" "${kernel_deps[@]}" "$0"; then
        build_kernel "$src" "$obj" &
        pending=$((pending + 1))
        if (( pending >= jobs )); then reap; fi
    fi
done
for src in "$repo_root/cuda/test/emu.cpp" "$repo_root/cuda/test/kernels_test.cpp"; do
    obj="$build/obj/$(basename "$src" .cpp).o"
    objs+=("$obj")
    if stale "$obj" "$src" "${kernel_deps[@]}" "$0"; then
        if [[ "$src" == */emu.cpp ]]; then build_host "$src" "$obj" "${emu_flags[@]}" &
        else build_host "$src" "$obj" & fi
        pending=$((pending + 1))
        if (( pending >= jobs )); then reap; fi
    fi
done
while (( pending > 0 )); do reap; done
(( failed == 0 )) || die "compilation failed"

kernel_objs=()
for o in "${objs[@]}"; do [[ "$o" == */kernels_test.o ]] || kernel_objs+=("$o"); done

if (( driver )); then
    lib="$build/driver/libcuda.so"
    cat "$build"/gen/*.cpp.names | sort -u | sed 's/.*/EMU_KERNEL(&)/' > "$build/gen/registry.inc.tmp"
    if ! cmp -s "$build/gen/registry.inc.tmp" "$build/gen/registry.inc"; then
        mv "$build/gen/registry.inc.tmp" "$build/gen/registry.inc"
    fi
    drv_objs=()
    for src in "$repo_root"/cuda/test/driver/*.cpp; do
        obj="$build/obj/driver_$(basename "$src" .cpp).o"
        drv_objs+=("$obj")
        if stale "$obj" "$src" "$build/gen/registry.inc" "${kernel_deps[@]}" "$0"; then
            build_host "$src" "$obj" -I "$build/gen" || die "compiling $src failed"
        fi
    done
    if stale "$lib" "${kernel_objs[@]}" "${drv_objs[@]}"; then
        "$cxx" -shared "${base_flags[@]}" "${san_flags[@]}" "${kernel_objs[@]}" "${drv_objs[@]}" \
            -Wl,-soname,libcuda.so.1 -Wl,--no-undefined -o "$lib.tmp" || die "linking the driver failed"
        mv "$lib.tmp" "$lib"
    fi
    for name in libcuda.so.1 libcublas.so libnccl.so; do ln -sf libcuda.so "$build/driver/$name"; done
    info "emulated CUDA stack: $lib ($(wc -l < "$build/gen/registry.inc") kernels; UBSan: ${san_flags[*]:-off})"
    exit 0
fi

if stale "$build/kernels_test" "${objs[@]}"; then
    "$cxx" "${base_flags[@]}" "${san_flags[@]}" "${objs[@]}" -o "$build/kernels_test" || die "link failed"
fi
info "built in $((SECONDS - t_start))s (CUDA headers: $cuda_inc; UBSan: ${san_flags[*]:-off})"

rm -rf "$probe_dir"
trap - EXIT
# The test binary's last line is "N passed, M failed"; its exit status is the script's.
exec "$build/kernels_test" -j "$jobs" "${test_args[@]}"
