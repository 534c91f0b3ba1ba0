#!/usr/bin/env bash
# One GPU lease, one call: the GPU checks of the live-switch work (scripts/gpu-check.sh) and the
# simulator's calibration (scripts/gpu-calibrate.sh) inside a fixed time, results packed for
# the trip back.
#
#   scripts/gpu-check.sh build gpu-bin        # on the build machine (nvcc, no GPU needed)
#   scripts/gpu-lease.sh gpu-bin OUTDIR       # on the GPU machine, from the repo root
#
# With the `device` tool: carry ["gpu-bin"], timeout_s 490, command
# `scripts/gpu-lease.sh gpu-bin "$OUT"`. Device time is short (about 15 minutes a session, a
# machine's start included) and a lease sends back at most 8 files, so:
#   1. gpu-check.sh runs under PAT_LEASE_CHECK_SECONDS (330), each of its steps under
#      PAT_GPU_STEP_TIMEOUT (150): a hang costs one step, not the lease;
#   2. its 15 GiB bench model is deleted, then gpu-calibrate.sh runs on a reduced grid (batches
#      1,16,64,128, contexts 256,2048, 3 steps; attention 1,16,64 seqs x 1024,8192) in the time
#      left until PAT_LEASE_SECONDS (470) after the start, if at least 60 s are left;
#   3. OUTDIR gets gpu-check.log, logs.tgz (gpu-bin/logs: test logs, bench JSON lines, the
#      table), cal.log and cal.tgz ($PAT_CAL_DIR without its models, node.json included).
# The summary tables are printed. Exit status: gpu-check.sh's, or calibrate's if that failed.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin_dir="${1:-}"
out="${2:-}"
[[ -n "$bin_dir" && -n "$out" ]] || { echo "usage: scripts/gpu-lease.sh BIN_DIR OUTDIR" >&2; exit 2; }
[[ -d "$bin_dir" ]] || { echo "gpu-lease: error: $bin_dir does not exist (scripts/gpu-check.sh build $bin_dir)" >&2; exit 2; }
mkdir -p "$out" || exit 2
bin_dir="$(cd "$bin_dir" && pwd)"
out="$(cd "$out" && pwd)"
cd "$repo_root" || exit 2

export PAT_GPU_STEP_TIMEOUT="${PAT_GPU_STEP_TIMEOUT:-150}"
timeout -k 5 "${PAT_LEASE_CHECK_SECONDS:-330}" scripts/gpu-check.sh "$bin_dir" >"$out/gpu-check.log" 2>&1
rc=$?
echo "gpu-lease: gpu-check.sh exit $rc after ${SECONDS} s"
sed -n '/^gpu-check summary/,$p' "$out/gpu-check.log"
grep -E '^test .* FAILED$|panicked at|^gpu-check: error' "$out/gpu-check.log" | head -20
tar czf "$out/logs.tgz" -C "$bin_dir" logs 2>/dev/null
rm -rf "${PAT_BENCH_DIR:-/tmp/pat-bench}"

cal_dir="${PAT_CAL_DIR:-/tmp/pat-cal}"
left=$(( ${PAT_LEASE_SECONDS:-470} - SECONDS ))
if (( left >= 60 )); then
    echo "gpu-lease: gpu-calibrate.sh with ${left} s left"
    PAT_CAL_DIR="$cal_dir" \
    PAT_CAL_STEP_TIMEOUT="${PAT_CAL_STEP_TIMEOUT:-120}" \
    PAT_CAL_BATCHES="${PAT_CAL_BATCHES:-1,16,64,128}" \
    PAT_CAL_CONTEXTS="${PAT_CAL_CONTEXTS:-256,2048}" \
    PAT_CAL_STEPS="${PAT_CAL_STEPS:-3}" \
    PAT_CAL_ATT_SEQS="${PAT_CAL_ATT_SEQS:-1,16,64}" \
    PAT_CAL_ATT_CONTEXTS="${PAT_CAL_ATT_CONTEXTS:-1024,8192}" \
        timeout -k 5 "$left" scripts/gpu-calibrate.sh "$bin_dir" >"$out/cal.log" 2>&1
    cal=$?
    echo "gpu-lease: gpu-calibrate.sh exit $cal after ${SECONDS} s"
    tail -c 4000 "$out/cal.log"
    (( rc == 0 )) && rc=$cal
    tar czf "$out/cal.tgz" --exclude="$(basename "$cal_dir")/shard[0-9]" \
        --exclude="$(basename "$cal_dir")/tiny" -C "$(dirname "$cal_dir")" "$(basename "$cal_dir")" 2>/dev/null
else
    echo "gpu-lease: ${left} s left: calibration not run"
    rc=1
fi
exit "$rc"
