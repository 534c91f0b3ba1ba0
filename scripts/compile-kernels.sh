#!/usr/bin/env bash
# Compile every cuda/*.cu into <out_dir>/<name>.fatbin with the flags in cuda/nvcc.flags (the same
# ones build.rs uses): SASS for sm_80/86/90 + compute_80 PTX, -O3, warnings are errors.
# Needs nvcc (and a host C++ compiler for preprocessing), not a GPU.
#
# Usage: scripts/compile-kernels.sh [out_dir]        (default: target/kernels)
# nvcc is taken from, in order: $NVCC, $CUDA_HOME/bin/nvcc, nvcc on PATH, the repo's
# .cuda-toolchain/ (made by scripts/install-cuda-toolchain.sh).
# Exits non-zero if nvcc is missing or any file fails to compile (all files are attempted).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out_dir="${1:-$repo_root/target/kernels}"
die() { echo "compile-kernels: error: $*" >&2; exit 1; }

find_nvcc() {
    if [[ -n "${NVCC:-}" ]]; then
        [[ -x "$NVCC" ]] || die "NVCC=$NVCC is not an executable file"
        echo "$NVCC"; return
    fi
    if [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then echo "$CUDA_HOME/bin/nvcc"; return; fi
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
    local c
    for c in "$repo_root"/.cuda-toolchain/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
        if [[ -x "$c" ]]; then echo "$c"; return; fi
    done
    die "nvcc not found (tried \$NVCC, \$CUDA_HOME/bin, PATH, .cuda-toolchain/); run scripts/install-cuda-toolchain.sh"
}

nvcc="$(find_nvcc)"
flags=()
while IFS= read -r line; do
    line="${line%%#*}"
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    [[ -n "$line" ]] && flags+=("$line")
done < "$repo_root/cuda/nvcc.flags"

shopt -s nullglob
sources=("$repo_root"/cuda/*.cu)
[[ ${#sources[@]} -gt 0 ]] || die "no .cu files in $repo_root/cuda"
mkdir -p "$out_dir"

echo "compile-kernels: $("$nvcc" --version | grep -o 'release [0-9.]*' || echo 'unknown version') ($nvcc) -> $out_dir"
failed=()
start=$SECONDS
for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    out="$out_dir/$name.fatbin"
    t0=$SECONDS
    if "$nvcc" "${flags[@]}" -I "$repo_root/cuda" -o "$out" "$src"; then
        printf '  %-22s %9d bytes  %3ds\n' "$name.fatbin" "$(wc -c < "$out")" "$((SECONDS - t0))"
    else
        echo "  $name.cu FAILED" >&2
        rm -f "$out"
        failed+=("$name.cu")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    die "${#failed[@]} of ${#sources[@]} kernel files failed: ${failed[*]}"
fi
echo "compile-kernels: ${#sources[@]} files ok in $((SECONDS - start))s"
