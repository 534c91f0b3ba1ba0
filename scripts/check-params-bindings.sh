#!/usr/bin/env bash
# Drift check for the committed Rust bindings of cuda/params.h.
#
# src/backend/cuda/params.rs is bindgen's output for cuda/params.h (kernel parameter structs and the
# PAT_* launch constants, with compile-time layout checks), committed so that building the `cuda`
# feature needs nvcc but no libclang. This script regenerates it in a temporary folder with
# bindgen-cli and compares: it exits 1 and prints a diff if the committed file differs.
# With --fix it writes the regenerated file instead (run it after editing cuda/params.h).
#
# The file's header records an FNV-1a hash of params.h; build.rs recomputes it and refuses to build
# with bindings generated from another params.h, so a stale params.rs never reaches the kernels.
#
# Needs (installed when missing, so it runs on a fresh Debian machine; idempotent):
#   - bindgen-cli $BINDGEN_VERSION: `bindgen` on PATH at that version, else
#     `cargo install bindgen-cli --locked --debug` into ${CARGO_TARGET_DIR:-target}/tools/;
#   - libclang: `apt-get install -y libclang-dev` (as root, or with passwordless sudo);
#   - rustfmt and python3 (for the hash).
#
# Usage: scripts/check-params-bindings.sh [--fix]
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
header="$repo_root/cuda/params.h"
committed="$repo_root/src/backend/cuda/params.rs"
BINDGEN_VERSION="0.72.1"
die() { echo "check-params-bindings: error: $*" >&2; exit 1; }
info() { echo "check-params-bindings: $*" >&2; }

fix=0
case "${1:-}" in
    "") ;;
    --fix) fix=1 ;;
    -h|--help) sed -n '2,20s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (usage: $0 [--fix])" ;;
esac

[[ -f "$header" ]] || die "$header not found"
command -v python3 >/dev/null 2>&1 || die "python3 not found"
command -v rustfmt >/dev/null 2>&1 || die "rustfmt not found (rustup component add rustfmt)"

# --- bindgen-cli at the pinned version ----------------------------------------------------------
tools="${CARGO_TARGET_DIR:-$repo_root/target}/tools"
bindgen_ok() { [[ -x "$1" ]] && [[ "$("$1" --version 2>/dev/null)" == "bindgen $BINDGEN_VERSION" ]]; }
bindgen=""
for cand in "$(command -v bindgen || true)" "$tools/bin/bindgen"; do
    if [[ -n "$cand" ]] && bindgen_ok "$cand"; then bindgen="$cand"; break; fi
done
if [[ -z "$bindgen" ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found (needed to install bindgen-cli)"
    # --debug: about 1 minute on 2 cores instead of 4; speed does not matter for one small header.
    info "installing bindgen-cli $BINDGEN_VERSION into $tools (cargo install --locked --debug)"
    cargo install --quiet --locked --debug --version "=$BINDGEN_VERSION" --root "$tools" bindgen-cli \
        || die "cargo install bindgen-cli failed (network? see messages above)"
    bindgen="$tools/bin/bindgen"
    bindgen_ok "$bindgen" || die "$bindgen does not report version $BINDGEN_VERSION"
fi

# --- libclang (bindgen loads it at run time) ----------------------------------------------------
# The names clang-sys (bindgen's loader) accepts; libclang-cpp is a different library.
is_libclang() {
    local f
    for f in "$@"; do
        [[ -e "$f" && "$(basename "$f")" != libclang-cpp* ]] && return 0
    done
    return 1
}
have_libclang() {
    local d=""
    if [[ -n "${LIBCLANG_PATH:-}" ]]; then
        is_libclang "$LIBCLANG_PATH"/libclang.so* "$LIBCLANG_PATH"/libclang-*.so* && return 0
    fi
    if command -v llvm-config >/dev/null 2>&1; then d="$(llvm-config --libdir 2>/dev/null || true)"; fi
    if [[ -n "$d" ]]; then is_libclang "$d"/libclang.so* "$d"/libclang-*.so* && return 0; fi
    is_libclang /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-*.so* \
        /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-*.so* \
        /usr/lib64/libclang.so* /usr/local/lib/libclang.so*
}
if ! have_libclang; then
    command -v apt-get >/dev/null 2>&1 || die "libclang not found and no apt-get; install libclang (or set LIBCLANG_PATH)"
    if [[ "$(id -u)" -eq 0 ]]; then sudo=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo=(sudo -n)
    else die "libclang not found; run: sudo apt-get install -y libclang-dev (or set LIBCLANG_PATH)"
    fi
    info "libclang not found; apt-get install -y libclang-dev"
    apt_install() { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends libclang-dev >/dev/null; }
    if ! apt_install; then
        "${sudo[@]}" apt-get update -qq >/dev/null || die "apt-get update failed"
        apt_install || die "apt-get install libclang-dev failed"
    fi
    have_libclang || die "libclang still not found after installing libclang-dev"
fi

# --- regenerate ---------------------------------------------------------------------------------
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

hash="$(python3 - "$header" <<'PY'
import sys
h = 0xcbf29ce484222325
for b in open(sys.argv[1], "rb").read().replace(b"\r", b""):
    h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
print(f"{h:016x}")
PY
)" || die "cannot hash $header"

# The options build.rs used to pass to the bindgen library, plus an explicit Rust target (the
# crate's rust-version) so the output does not depend on the bindgen default.
"$bindgen" "$header" \
    --rust-target 1.85 --rust-edition 2021 \
    --allowlist-type 'Pat.*' --allowlist-var 'PAT_.*' \
    --with-derive-default --no-doc-comments --formatter none \
    -o "$tmp/bindings.rs" || die "bindgen failed on $header"

{
    cat <<EOF
//! Kernel parameter structs and \`PAT_*\` launch constants: the Rust side of \`cuda/params.h\`,
//! which documents every field. The \`const _\` blocks check each struct's size, alignment and
//! field offsets at compile time.
//!
//! @generated by bindgen-cli $BINDGEN_VERSION from cuda/params.h; do not edit. After changing
//! params.h, regenerate with \`scripts/check-params-bindings.sh --fix\` (needs libclang, which the
//! script installs with apt-get when missing). CI runs the script without \`--fix\` to fail on drift,
//! and build.rs refuses to build when the hash below does not match params.h.

// cuda/params.h fnv1a64: $hash
EOF
    cat "$tmp/bindings.rs"
} > "$tmp/params.rs.raw"
# Format from the file's own folder so rustfmt uses the same configuration as `cargo fmt`.
(cd "$(dirname "$committed")" && rustfmt --edition 2021 --emit stdout < "$tmp/params.rs.raw") \
    > "$tmp/params.rs" || die "rustfmt failed on the generated bindings"

if [[ $fix -eq 1 ]]; then
    if [[ -f "$committed" ]] && cmp -s "$tmp/params.rs" "$committed"; then
        info "${committed#"$repo_root"/} is up to date"
    else
        cp "$tmp/params.rs" "$committed"
        info "wrote ${committed#"$repo_root"/}"
    fi
    exit 0
fi

[[ -f "$committed" ]] || die "${committed#"$repo_root"/} is missing; run $0 --fix"
if ! diff -u --label "committed ${committed#"$repo_root"/}" --label "regenerated from cuda/params.h" \
        "$committed" "$tmp/params.rs"; then
    echo >&2
    die "${committed#"$repo_root"/} is out of date with cuda/params.h (diff above); run scripts/check-params-bindings.sh --fix and commit the result"
fi
info "${committed#"$repo_root"/} matches cuda/params.h (bindgen $BINDGEN_VERSION)"
