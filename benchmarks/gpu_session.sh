#!/usr/bin/env bash
# The device calls of the next GPU session, as benchmarks/results/README.md's runbook plans them,
# so that a session runs `benchmarks/gpu_session.sh 1` (then 2, then ncu) instead of retyping it.
# Each call leaves one tarball in $OUT (only a few files come back from a call) and ends inside
# the timeout_s the runbook gives it:
#
#   call 1 (timeout_s 560): the tensor-core decode kernel's GPU cases beyond q_len 1 and a group of 4
#          (the default at every head dim since the seventh run) and the two-stage variant's; then
#          quick-device, quick-mlp, quick-decode (generate() in interleaved rounds, the two-stage
#          kernel's rows) and the MLP profile                                      -> $OUT/r.tgz
#   call 2 (timeout_s 280): the training step at S=2048 and on two more models (e2e-s2048) -> $OUT/r2.tgz
#   ncu    (timeout_s 80):  Nsight Compute on a decode step, ours and SDPA's   -> $OUT/r3.tgz
#
# Carry .whl (git-ignored) when the machine's image lacks a pure-Python wheel a step needs.
# Afterwards, here: merge the calls' step JSONs (prefixkern-bench --merge r/*/*.json --out-dir DIR),
# rename them to <date>_<HHMM>_<GPU>.*, and update this script for the session after.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT (the device machine sets it)}"
export PYTHONUNBUFFERED=1
R="$OUT/r"
mkdir -p "$R"

case "${1:-}" in
    1)
        # The tests first (SIGINT at the limit: pytest still prints its summary). The one-stage
        # tensor-core kernel (the default) at bf16, P=30, a 4096-key cache, every head dim, q_len
        # 1/3/8 x groups 1/4/7 but the 1 x 4 already run (the sixth and seventh runs): 21 cases; the
        # two-stage kernel's 24 (prefixkern_two_stage, new).
        timeout -s INT -k 10 110 env PYTHONPATH="$PWD" PREFIXKERN_AUTOTUNE=0 python3 -m pytest -n 8 -v --tb=short \
            -p no:cacheprovider tests/test_decode.py::test_gpu_cuda_kernel_against_reference \
            tests/test_decode.py::test_gpu_two_stage_kernel_against_reference \
            -k "(kernelmma and bfloat16 and P30 and L4096 and not (Sq1 and gqa4)) or two_stage" \
            > "$R/fixed.log" 2>&1
        tail -n 15 "$R/fixed.log"
        timeout 420 benchmarks/run_gpu.sh "$R" quick-device:20 quick-mlp:130 quick-decode:140 profile-mlp:90
        tar czf "$OUT/r.tgz" -C "$OUT" r
        ;;
    2)
        timeout 262 benchmarks/run_gpu.sh "$R" e2e-s2048:250
        tar czf "$OUT/r2.tgz" -C "$OUT" r
        ;;
    ncu)
        sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy
                  --section WarpStateStats --section SchedulerStats --section LaunchStats)
        # Why SDPA on the concatenated cache read 75% of the copy rate where ours read 50-54%
        # (P=30, cache 4096, B=8): both profiled the same way.
        for impl in prefixkern sdpa_concat; do
            PYTHONPATH="$PWD" timeout 32 ncu --clock-control none --profile-from-start off "${sections[@]}" \
                python3 benchmarks/ncu_ops.py decode --impl "$impl" > "$R/ncu_decode_$impl.txt" 2>&1
            tail -n 5 "$R/ncu_decode_$impl.txt"
        done
        tar czf "$OUT/r3.tgz" -C "$OUT" r
        ;;
    *)
        echo "usage: OUT=DIR benchmarks/gpu_session.sh 1|2|ncu (see benchmarks/results/README.md)" >&2
        exit 2
        ;;
esac
rm -rf "$R"
