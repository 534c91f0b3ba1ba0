#!/usr/bin/env bash
# One-GPU calibration for `pat simulate`: measures on one H100/H200 what decides a TP layout's
# decode step, and writes a node profile the simulator reads (`pat simulate --profile`).
#
#   scripts/gpu-check.sh build [gpu-bin]          # on the build machine: pat with --features cuda
#   scripts/gpu-calibrate.sh [gpu-bin]             # on the GPU machine, from the repo root
#
# What it measures (one GPU cannot measure NVLink: the collectives come from the component
# model's public all-reduce table for PAT_CAL_LINK, see src/sim/compose.rs):
#   1. device copy bandwidth and paged decode attention per rank: KV heads per rank (8, 4, 2, 1:
#      TP1..TP8 of the 8B shape) x sequences x context (`pat bench attention`);
#   2. per-rank decode steps of each TP-k shard (`pat init-model --shard k`, `pat profile --world
#      1`) over batch x context;
#   3. the host cost per step and per sequence: the same profile on the tiny preset, whose GPU
#      work is ~0, fitted as ms = a + b * batch;
#   4. kernels (and cuBLAS calls) per decode step and the time per launch (`pat bench one-batch`
#      on the tiny preset: the floor of a skinny shard's step);
#   5. `pat compose-profile`: the shard profiles + the link's collectives -> $PAT_CAL_DIR/node.json.
# Then a short table. Everything lands in $PAT_CAL_DIR (default /tmp/pat-cal); with the `device`
# tool copy it back: `scripts/gpu-calibrate.sh gpu-bin; rc=$?; cp -r /tmp/pat-cal "$OUT"/; exit $rc`
# (the shard models are large: they are deleted after profiling unless PAT_CAL_KEEP=1).
#
# Knobs (environment): PAT_CAL_PRESET (llama3-8b-shape; `small` for a quick run), PAT_CAL_ARCH
# (llama | qwen3), PAT_CAL_SHARDS ("1 2 4 8"), PAT_CAL_BATCHES (1,4,16,64,128), PAT_CAL_CONTEXTS
# (256,2048), PAT_CAL_STEPS (5), PAT_CAL_LINK (nvlink), PAT_CAL_WORLD (8), PAT_CAL_ATT_SEQS
# (1,4,16,64), PAT_CAL_ATT_CONTEXTS (1024,8192,24576), PAT_BACKEND (cuda; `cpu` rehearses the
# whole script without a GPU, e.g. PAT_BACKEND=cpu PAT_CAL_PRESET=small). With PAT_EMU_GPUS set
# and the emulated CUDA stack on LD_LIBRARY_PATH (scripts/check-gpu-emu.sh), the cuda path runs
# without a GPU too (no nvidia-smi check; tiny sizes, since its timings mean nothing).
# Budget: under 8 minutes on one H200 with the defaults (not yet run on a GPU: the CPU rehearsal
# is what CI-like checks run).
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "gpu-calibrate: error: $*" >&2; exit 1; }

bin_dir="${1:-$repo_root/gpu-bin}"
pat="$bin_dir/pat"
[[ -x "$pat" ]] || pat="$repo_root/target/release/pat"
[[ -x "$pat" ]] || die "no pat binary in $bin_dir or target/release (run scripts/gpu-check.sh build)"

backend="${PAT_BACKEND:-cuda}"
preset="${PAT_CAL_PRESET:-llama3-8b-shape}"
arch="${PAT_CAL_ARCH:-llama}"
shards="${PAT_CAL_SHARDS:-1 2 4 8}"
batches="${PAT_CAL_BATCHES:-1,4,16,64,128}"
contexts="${PAT_CAL_CONTEXTS:-256,2048}"
steps="${PAT_CAL_STEPS:-5}"
link="${PAT_CAL_LINK:-nvlink}"
world="${PAT_CAL_WORLD:-8}"
dir="${PAT_CAL_DIR:-/tmp/pat-cal}"
dtype=bf16
[[ "$backend" == cpu ]] && dtype=f32
[[ " $shards " == *" 1 "* ]] || die "PAT_CAL_SHARDS must include 1 (the full model: compose reads its config)"

if [[ "$backend" == cuda && -z "${PAT_EMU_GPUS:-}" ]]; then
    command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 \
        || die "no GPU visible (nvidia-smi -L failed); PAT_BACKEND=cpu rehearses the script without one"
    # The pip NVIDIA libraries (cuBLAS, NCCL) as gpu-check.sh finds them.
    libdirs="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(r + "/nvidia/*/lib/lib*.so*")})))
PY
)"
    export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# Kernels loaded with their module, not at first launch (as gpu-check.sh), so no timed step pays
# for loading one.
export CUDA_MODULE_LOADING="${CUDA_MODULE_LOADING:-EAGER}"
mkdir -p "$dir"
log="$dir/calibrate.log"
: >"$log"
ok=0
t_start=$(date +%s)
run() {  # run NAME CMD...: stdout to $dir/NAME.jsonl, stderr to the log; failures counted
    local name="$1"; shift
    echo "gpu-calibrate: $name" | tee -a "$log" >&2
    # Each step under a time limit (PAT_CAL_STEP_TIMEOUT seconds): a hang costs one step.
    if ! timeout --kill-after=10 "${PAT_CAL_STEP_TIMEOUT:-300}" "$@" >"$dir/$name.jsonl" 2>>"$log"; then
        echo "gpu-calibrate: $name FAILED (see $log)" >&2
        ok=1
        return 1
    fi
}

# 1. Copy bandwidth and paged attention per rank (GPU only: the CPU backend has no kernel bench).
if [[ "$backend" == cuda ]]; then
    : >"$dir/attention.jsonl"
    for kv in 8 4 2 1; do
        run "attention-kv$kv" "$pat" bench attention --kv-heads "$kv" --q-heads $((kv * 4)) \
            --num-seqs "${PAT_CAL_ATT_SEQS:-1,4,16,64}" \
            --context "${PAT_CAL_ATT_CONTEXTS:-1024,8192,24576}" --dtype bf16 --iters 10 \
            && cat "$dir/attention-kv$kv.jsonl" >>"$dir/attention.jsonl"
    done
fi

# 2. Per-rank decode steps of every TP-k shard.
compose_args=()
for k in $shards; do
    model="$dir/shard$k"
    run "init-shard$k" "$pat" init-model --arch "$arch" --preset "$preset" --shard "$k" \
        --dtype "$dtype" --out "$model" --force || continue
    if run "profile-shard$k" "$pat" profile --backend "$backend" --model "$model" --world 1 \
        --dtype "$dtype" --batches "$batches" --contexts "$contexts" --steps "$steps" \
        --out "$dir/shard$k.json"; then
        compose_args+=(--shard "$k=$dir/shard$k.json")
    fi
    [[ "$k" != 1 && "${PAT_CAL_KEEP:-0}" != 1 ]] && rm -rf "$model"
done

# 3. Host cost: the tiny preset, whose device work is negligible.
run init-tiny "$pat" init-model --arch "$arch" --preset tiny --dtype "$dtype" --out "$dir/tiny" --force
run profile-host "$pat" profile --backend "$backend" --model "$dir/tiny" --world 1 --dtype "$dtype" \
    --batches "$batches" --contexts 64 --steps "$steps" --out "$dir/host.json"

# 4. Launches per decode step on the tiny preset.
run launches "$pat" bench one-batch --backend "$backend" --model "$dir/tiny" --dtype "$dtype" \
    --batch-size 1,16 --input-len 64 --output-len 16

# 5. The node profile, with each replica's KV capacity from this GPU's memory (PAT_CAL_GPU:
# h100, h200 or a40; default: from nvidia-smi's name, else h100) at PAT_CAL_MEM_FRACTION (0.5).
gpu_kind="${PAT_CAL_GPU:-}"
if [[ -z "$gpu_kind" ]]; then
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
        *H200*) gpu_kind=h200 ;;
        *A40*) gpu_kind=a40 ;;
        *) gpu_kind=h100 ;;
    esac
fi
if [[ ${#compose_args[@]} -gt 0 ]]; then
    run compose "$pat" compose-profile "${compose_args[@]}" --model "$dir/shard1" \
        --world "$world" --link "$link" --gpu "$gpu_kind" \
        --mem-fraction "${PAT_CAL_MEM_FRACTION:-0.5}" --out "$dir/node.json"
else
    echo "gpu-calibrate: no shard profile: nothing to compose" >&2
    ok=1
fi
[[ "${PAT_CAL_KEEP:-0}" != 1 ]] && rm -rf "$dir/shard1"

# Summary table.
python3 - "$dir" "$backend" <<'PY' || ok=1
import json, os, sys
d, backend = sys.argv[1], sys.argv[2]
def jl(name):
    p = os.path.join(d, name)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
print(f"\ncalibration ({backend}) in {d}")
att = jl("attention.jsonl")
if att:
    print(f"copy bandwidth {att[0]['copy_bandwidth_gbps']:.0f} GB/s")
    print(f"{'kv/rank':>7} {'seqs':>5} {'ctx':>6} {'us':>9} {'GB/s':>7} {'of copy':>8}")
    for r in att:
        print(f"{r['kv_heads']:>7} {r['num_seqs']:>5} {r['context']:>6} {1e3*r['median_ms']:>9.1f} {r['gbps']:>7.0f} {100*r['fraction_of_copy_bandwidth']:>7.0f}%")
host = os.path.join(d, "host.json")
if os.path.exists(host):
    s = json.load(open(host))["decode"]
    xs, ys = [x["batch"] for x in s], [x["step_ms"] for x in s]
    n = len(xs); mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-12)
    print(f"host cost (tiny preset): {my - b * mx:.3f} ms per step + {1e3 * b:.1f} us per sequence")
for r in jl("launches.jsonl"):
    if (r.get("launches_per_decode_step") or 0) > 0:
        print(f"batch {r['batch_size']:>3}: {r['launches_per_decode_step']:.0f} launches per decode step, {1e3 * r['ms_per_launch']:.1f} us per launch ({r['median_decode_latency'] * 1e3:.2f} ms/step)")
node = os.path.join(d, "node.json")
if os.path.exists(node):
    p = json.load(open(node))
    tps = sorted({x["tp"] for x in p["decode"]})
    print(f"node profile {node}: tp {tps}, {len(p['decode'])} decode samples")
    print(f"{'tp':>3} {'batch':>6} {'ctx':>6} {'step ms':>9}")
    for x in sorted(p["decode"], key=lambda x: (x["tp"], x["batch"], x["context"])):
        print(f"{x['tp']:>3} {x['batch']:>6} {x['context']:>6} {x['step_ms']:>9.2f}")
    print(f"next: pat simulate --profile {node} --trace <trace.jsonl> --world {p['world']}")
PY
echo "gpu-calibrate: $(( $(date +%s) - t_start )) s, exit $ok" >&2
exit $ok
