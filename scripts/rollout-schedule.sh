#!/usr/bin/env bash
# An adaptive rollout on GPU ranks runs the CPU's schedule: `pat rollout --policy adaptive` on a
# straggler batch (the llama fixture, world 4), with a profile whose step times are set (on a
# measured profile's grid) so that tp 1 serves the batch and tp 4 the straggler. The rule decides
# on the profile alone, so every backend must run the same steps and make the same switch: each
# step's and switch's untimed fields are compared with the CPU backend's, for --kv-transfer auto,
# migrate and recompute, at least one switch each.
#
# Usage: scripts/rollout-schedule.sh PAT DEVICES...   e.g. target/debug/pat 0,1,2,3 0,0,0,0
#   PAT: a pat built with --features cuda; DEVICES: a --devices list of 4 ordinals per run.
# Used by scripts/check-gpu-emu.sh (emulated GPUs) and scripts/gpu-check.sh (a real one).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "rollout-schedule: error: $*" >&2; exit 1; }
info() { echo "rollout-schedule: $*" >&2; }
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { sed -n '2,11p' "$0"; exit 0; }
[[ $# -ge 2 ]] || die "usage: scripts/rollout-schedule.sh PAT DEVICES... (try --help)"
pat="$1"
shift
[[ -x "$pat" ]] || die "no pat binary at $pat"
model="$repo_root/tests/data/golden/llama"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for r in 6 6 6 6 6 6 6 120; do echo "{\"prompt_len\":5,\"response_len\":$r}"; done >"$tmp/trace.jsonl"
"$pat" profile --model "$model" --world 4 --batches 1,2,4 --contexts 8,16 --steps 1 \
    --out "$tmp/measured.json" 2>"$tmp/err" || { cat "$tmp/err" >&2; die "pat profile failed"; }
python3 - "$tmp/measured.json" "$tmp/profile.json" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
a, c = {1: 1.0, 2: 0.6, 4: 0.2}, {1: 0.1, 2: 0.2, 4: 0.3}  # ms, ms per sequence
for d in p["decode"]:
    d["step_ms"] = a[d["tp"]] + c[d["tp"]] * d["batch"] + 1e-4 * d["context"]
p["switch"] = {"fixed_ms": 0.5, "weight_bytes_per_s": 1e12, "kv_bytes_per_s": 1e12}
p["transfer_bytes_per_s"] = 1e12
for q in p["prefill"]:
    q["tokens_per_s"] = 1e6
json.dump(p, open(sys.argv[2], "w"))
PY
schedule() { # backend-args... : each step's and switch's untimed fields, or FAILED
    "$pat" rollout --model "$model" --trace "$tmp/trace.jsonl" --world 4 \
        --profile "$tmp/profile.json" "$@" 2>"$tmp/err" | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    if "switch" in r:
        s = r["switch"]
        print("switch", r["step"], s["from_tp"], s["to_tp"], s["n_migrated"], s["n_recomputed"],
              s["weight_bytes_cross_rank"])
    elif "step" in r:
        print("step", r["step"], r["tp"], r["running_reqs"], r["tokens_this_step"], r["prefill_tokens"])
    else:
        s = r["summary"]
        print("summary", s["switches"], s["failed_switches"], s["final_tp"], s["tokens"])
' || { cat "$tmp/err" >&2; echo "FAILED"; }
}
failed=0
for kv in auto migrate recompute; do
    want="$(schedule --backend cpu --kv-transfer "$kv")"
    [[ "$want" != *FAILED* ]] || die "the CPU rollout ($kv) failed"
    grep -q '^switch ' <<<"$want" || die "the CPU rollout ($kv) made no switch: $(tail -1 <<<"$want")"
    for devices in "$@"; do
        got="$(schedule --backend cuda --devices "$devices" --kv-transfer "$kv")"
        if [[ "$got" == "$want" ]]; then
            info "cuda devices $devices, $kv: the CPU's steps and switches ($(grep '^switch' <<<"$got" | tr '\n' ' '))"
        else
            info "cuda devices $devices, $kv: differs from the CPU's:"
            diff <(echo "$want") <(echo "$got") | head -5 >&2 || true
            failed=1
        fi
    done
done
[[ $failed -eq 0 ]] || die "the GPU rollouts differ from the CPU rollout"
info "passed"
