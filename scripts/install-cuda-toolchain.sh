#!/usr/bin/env bash
# Install a self-contained nvcc 13.0 into .cuda-toolchain/ (a Python venv in the repo root) from
# NVIDIA's PyPI wheels, so the `cuda` feature builds on machines without a CUDA install.
#
# The five wheels must come from the same 13.0 release: a newer nvidia-nvvm or nvidia-cuda-crt
# pulled in by dependency resolution makes ptxas fail with "Unsupported .version ...".
# The versions must match each other exactly (a newer nvidia-nvvm or nvidia-cuda-crt makes ptxas
# fail with "Unsupported .version"). Idempotent: re-running with a working toolchain only prints the PATH line.
#
# Usage: scripts/install-cuda-toolchain.sh            (from anywhere inside the repo)
#        PYTHON=python3.12 scripts/install-cuda-toolchain.sh
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.cuda-toolchain"
python="${PYTHON:-python3}"
wheels=(
    "nvidia-cuda-nvcc==13.0.*"
    "nvidia-nvvm==13.0.*"
    "nvidia-cuda-crt==13.0.*"
    "nvidia-cuda-runtime==13.0.*"
    "nvidia-cuda-cccl==13.0.*"
)

die() { echo "install-cuda-toolchain: error: $*" >&2; exit 1; }
info() { echo "install-cuda-toolchain: $*" >&2; }

# Prints the nvidia/cu13 directory inside the venv (python version found dynamically).
find_cuda_home() {
    "$venv/bin/python" - <<'PY'
import pathlib, sysconfig
print(pathlib.Path(sysconfig.get_paths()["purelib"]) / "nvidia" / "cu13")
PY
}

if [[ ! -x "$venv/bin/python" ]]; then
    command -v "$python" >/dev/null 2>&1 || die "'$python' not found; install Python 3 (with venv) or set PYTHON"
    info "creating venv $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv" || die "'$python -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi

cuda_home="$(find_cuda_home)" || die "cannot query the venv's site-packages"
if [[ -x "$cuda_home/bin/nvcc" ]] && "$cuda_home/bin/nvcc" --version 2>/dev/null | grep -q "release 13\.0"; then
    info "nvcc 13.0 already installed in $cuda_home"
else
    info "installing ${wheels[*]}"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir --quiet "${wheels[@]}" \
        || die "pip install of the CUDA 13.0 wheels failed (network? see messages above)"
    [[ -x "$cuda_home/bin/nvcc" ]] || die "nvcc not found at $cuda_home/bin/nvcc after install"
fi

# Verify the versions actually installed agree (mismatched wheels are the failure mode above).
installed="$("$venv/bin/python" -m pip list --disable-pip-version-check --format=freeze 2>/dev/null)" \
    || die "cannot list the venv's packages"
for spec in "${wheels[@]}"; do
    name="${spec%%==*}"
    line="$(grep -i "^${name}==" <<<"$installed" || true)"
    [[ -n "$line" ]] || die "$name is not installed in $venv"
    ver="${line#*==}"
    [[ "$ver" == 13.0.* ]] || die "$name is $ver, expected 13.0.* (mismatched wheels break ptxas)"
done

"$cuda_home/bin/nvcc" --version | tail -n 2 >&2 || die "installed nvcc does not run"
[[ -f "$cuda_home/include/cuda_bf16.h" ]] || die "cuda_bf16.h missing under $cuda_home/include"

info "done. To use this nvcc in the current shell:"
echo "export CUDA_HOME=\"$cuda_home\" PATH=\"$cuda_home/bin:\$PATH\""
