#!/usr/bin/env bash
# The C ABI end to end (CI runs it after `cargo test` and reuses that build: dev profile, the same
# packages and features, so only libpat_ffi's .so and .a are linked here):
#   1. builds libpat_ffi (.so and .a) and the pat binary;
#   2. checks ffi/include/pat.h against a fresh cbindgen generation (the `header` test), that it
#      compiles alone as C99 and C++17 with warnings as errors, and that the shared library
#      exports only pat_* symbols;
#   3. compiles ffi/examples/generate.c against the static and the shared library (gcc), runs both
#      on the golden llama fixture (2 ranks, tp 1 -> 2 after 3 steps) and checks their tokens equal
#      `pat generate` with the same switch and transformers' tokens in golden.json;
#   4. runs ffi/examples/foreign_reshard.py (ctypes + numpy; numpy installed with pip if missing).
# Output goes to $CARGO_TARGET_DIR/ffi-check (default target/ffi-check).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

target="${CARGO_TARGET_DIR:-$PWD/target}"
lib="$target/debug"
out="$target/ffi-check"
fixture=tests/data/golden/llama
rm -rf "$out" && mkdir -p "$out"

echo "== build libpat_ffi (cdylib + staticlib) and pat"
# --tests: the feature set `cargo test` resolves (dev-dependencies on), so nothing is rebuilt.
cargo build --lib --bins --tests

echo "== header: drift against cbindgen, compiles alone, exports"
cargo test --test header
printf '#include "pat.h"\nint main(void) { return pat_abi_version() == PAT_ABI_VERSION ? 0 : 1; }\n' \
  > "$out/header_only.c"
gcc -std=c99 -pedantic -Wall -Wextra -Werror -I ffi/include -fsyntax-only "$out/header_only.c"
g++ -std=c++17 -pedantic -Wall -Wextra -Werror -I ffi/include -fsyntax-only -x c++ \
  "$out/header_only.c"
bad_syms=$(nm -D --defined-only "$lib/libpat_ffi.so" | awk '$2 == "T" && $3 !~ /^pat_/ { print $3 }')
if [ -n "$bad_syms" ]; then
  echo "libpat_ffi.so exports symbols without the pat_ prefix: $bad_syms" >&2
  exit 1
fi
echo "$(nm -D --defined-only "$lib/libpat_ffi.so" | awk '$2 == "T"' | wc -l) exported functions, all pat_*"

echo "== C example: static and shared"
cflags=(-std=c11 -Wall -Wextra -Werror -O1 -I ffi/include)
# The static library's system dependencies (rustc --print native-static-libs).
gcc "${cflags[@]}" ffi/examples/generate.c "$lib/libpat_ffi.a" \
  -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc -o "$out/generate_static"
# The shared library's SONAME is libpat_ffi.so.0: install it under that name (here: a link).
ln -sf "$lib/libpat_ffi.so" "$out/libpat_ffi.so.0"
gcc "${cflags[@]}" ffi/examples/generate.c -L "$lib" -lpat_ffi -Wl,-rpath,"$out" \
  -o "$out/generate_shared"
if ldd "$out/generate_static" | grep -q libpat_ffi; then
  echo "generate_static links libpat_ffi dynamically" >&2
  exit 1
fi

python3 - "$fixture/golden.json" "$out" <<'EOF'
import json, sys
g = json.load(open(sys.argv[1]))
with open(sys.argv[2] + "/prompts.txt", "w") as f:
    f.write(" ".join(",".join(map(str, p["input_ids"])) for p in g["prompts"]) + "\n")
with open(sys.argv[2] + "/requests.jsonl", "w") as f:
    for p in g["prompts"]:
        f.write(json.dumps({"input_ids": p["input_ids"]}) + "\n")
print(g["max_new_tokens"], file=open(sys.argv[2] + "/max_new.txt", "w"))
EOF
read -r -a prompts < "$out/prompts.txt"
max_new=$(cat "$out/max_new.txt")
"$out/generate_static" "$fixture" "$max_new" 3 "${prompts[@]}" > "$out/static.jsonl" 2> "$out/static.err"
"$out/generate_shared" "$fixture" "$max_new" 3 "${prompts[@]}" > "$out/shared.jsonl" 2> "$out/shared.err"
"$target/debug/pat" generate --model "$fixture" --world 2 --tp 1 --reconfigure 2:2 \
  --kv-transfer migrate --ignore-eos --max-new-tokens "$max_new" \
  --requests "$out/requests.jsonl" > "$out/pat.jsonl" 2> "$out/pat.err"
cat "$out/static.err"
python3 - "$fixture/golden.json" "$out" <<'EOF'
import json, sys
g = json.load(open(sys.argv[1]))
runs = {}
for name in ("static", "shared", "pat"):
    recs = [json.loads(line) for line in open(f"{sys.argv[2]}/{name}.jsonl")]
    runs[name] = [(r["index"], r["input_ids"], r["output_ids"], r["finish_reason"]) for r in recs]
assert runs["static"] == runs["shared"] == runs["pat"], "the C example differs from pat generate"
for (i, inp, outp, _), p in zip(runs["pat"], g["prompts"]):
    assert inp == p["input_ids"] and outp == p["output_ids"], f"request {i} differs from golden.json"
assert len(runs["pat"]) == len(g["prompts"])
print(f"generate.c (static and shared) == pat generate == transformers: "
      f"{len(g['prompts'])} requests x {g['max_new_tokens']} tokens through a tp 1 -> 2 switch")
EOF

echo "== Python example: ctypes + numpy"
py=python3
if ! "$py" -c 'import numpy' 2>/dev/null; then
  echo "numpy is missing: installing it with pip"
  if ! "$py" -m pip install --quiet 'numpy>=1.23,<3'; then
    # A Debian system Python refuses user installs (PEP 668): use a virtual environment.
    "$py" -m venv "$target/ffi-venv"
    py="$target/ffi-venv/bin/python"
    "$py" -m pip install --quiet 'numpy>=1.23,<3'
  fi
fi
"$py" ffi/examples/foreign_reshard.py "$lib/libpat_ffi.so" "$fixture"

echo "C ABI checks passed in $((SECONDS - start)) s"
