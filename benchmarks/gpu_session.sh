#!/usr/bin/env bash
# The device calls of the next GPU session, as benchmarks/results/README.md's runbook plans them,
# so that a session runs `benchmarks/gpu_session.sh 1` (then 2, then ncu) instead of retyping it.
# Each call leaves one tarball in $OUT (only a few files come back from a call) and ends inside
# the timeout_s the runbook gives it:
#
#   call 1 (timeout_s 590): what the last run left open and what changed since, as GPU tests;
#          then quick-device, quick-mlp, attention-8k and quick-decode          -> $OUT/r.tgz
#   call 2 (timeout_s 280): the training step eager and compiled (e2e-compile)  -> $OUT/r2.tgz
#   ncu    (timeout_s 80):  Nsight Compute on the prefix MLP under autocast     -> $OUT/r3.tgz
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
        # The tests first (SIGINT at the limit: pytest still prints its summary).
        timeout -s INT -k 10 120 env PYTHONPATH="$PWD" PREFIXKERN_AUTOTUNE=0 python3 -m pytest -n 8 -v --tb=short \
            -p no:cacheprovider tests/test_prefix_attention.py::test_causal_programs_in_either_order \
            tests/test_prefix_mlp.py::test_gpu_every_backward_tile_agrees_with_the_first \
            tests/test_prefix_mlp.py::test_gpu_every_forward_tile_agrees_with_the_first \
            tests/test_decode.py::test_gpu_generate_uses_the_cuda_kernel \
            tests/test_decode.py::test_gpu_cuda_kernel_against_reference \
            -k "not test_gpu_cuda_kernel_against_reference or (kernelmma and Sq1 and gqa4 and (D64 or D256))" \
            > "$R/fixed.log" 2>&1
        tail -n 15 "$R/fixed.log"
        timeout 335 benchmarks/run_gpu.sh "$R" quick-device:30 quick-mlp:100 attention-8k:195
        timeout 100 benchmarks/run_gpu.sh "$R" quick-decode:90
        tar czf "$OUT/r.tgz" -C "$OUT" r
        ;;
    2)
        timeout 262 benchmarks/run_gpu.sh "$R" e2e-compile:250
        tar czf "$OUT/r2.tgz" -C "$OUT" r
        ;;
    ncu)
        sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy
                  --section WarpStateStats --section SchedulerStats --section LaunchStats)
        PYTHONPATH="$PWD" timeout 60 ncu --clock-control none --profile-from-start off "${sections[@]}" \
            python3 benchmarks/ncu_ops.py mlp > "$R/ncu_mlp.txt" 2>&1
        tail -n 5 "$R/ncu_mlp.txt"
        tar czf "$OUT/r3.tgz" -C "$OUT" r
        ;;
    *)
        echo "usage: OUT=DIR benchmarks/gpu_session.sh 1|2|ncu (see benchmarks/results/README.md)" >&2
        exit 2
        ;;
esac
rm -rf "$R"
