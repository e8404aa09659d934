#!/usr/bin/env bash
# The device calls of the next GPU session, as benchmarks/results/README.md's runbook plans them,
# so that a session runs `benchmarks/gpu_session.sh 1` (then 2, ncu, fuzz) instead of retyping it.
# Each call leaves one tarball in $OUT (only a few files come back from a call) and ends inside
# the timeout_s the runbook gives it:
#
#   call 1 (timeout_s 560): the tensor-core decode kernel's GPU cases with the stages the launcher
#          now picks per call (two at the 4096-key cases), generate() and the compiled decode step
#          through it, the prefix MLP's launch plans (raw launches, full size), attention dropout's
#          Philox groups (mask tests, full size); then quick-device, quick-decode (the default beside
#          one and two forced stages), quick-attention (now with gpt2-medium-dropout) and
#          quick-mlp                                                               -> $OUT/r.tgz
#   call 2 (timeout_s 280): the training step eager and compiled (e2e-compile), issue 4's
#          compiled pair last timed on the H200                                    -> $OUT/r2.tgz
#   ncu    (timeout_s 80):  Nsight Compute on a decode step with the default (two-stage) kernel -> $OUT/r3.tgz
#   fuzz   (timeout_s 170, if time is left): random attention and packed cases with attention
#          dropout on the GPU (tests/tools/fuzz_kernels.py --dropout: the compiled Philox groups
#          at shapes the tests do not name), and a few cases of every other kind      -> $OUT/r4.tgz
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
        # The tests first (SIGINT at the limit: pytest still prints its summary). The tensor-core
        # kernel with the launcher's stages (the default since the eighth run), bf16, P=30, a
        # 4096-key cache, every head dim, q_len 1/3/8 x groups 1/4/7: 27 cases; generate() and the
        # compiled decoding step through the CUDA kernel (3); the prefix MLP's launch plans (new
        # since the eighth run): raw launches replayed from them bit-equal to plain ones (2), and
        # the full-size grid at bloomz-560m P=20 and Qwen2.5-0.5B P=128, three dtypes (6); the
        # attention dropout with one Philox draw per 8 columns (2026-11-28, interpreter-checked only):
        # the mask tests on the GPU (9: the documented layout, rebuilt in plain Python, among them),
        # the full-size dropout cases (4) and dropout under torch.compile (1). The attention backward
        # run twice under deterministic mode with torch.empty filled with NaN (3, new 2026-11-28):
        # nothing unwritten read, and bit-equal runs with the programs scheduled concurrently.
        # Strided prefix_index and cu_seqlens, and the MLP's strided biases (3, new 2026-11-28: the
        # kernels read them at unit stride and now get contiguous copies; the CUDA op checks).
        timeout -s INT -k 10 110 env PYTHONPATH="$PWD" PREFIXKERN_AUTOTUNE=0 python3 -m pytest -n 8 -v --tb=short \
            -p no:cacheprovider tests/test_decode.py::test_gpu_cuda_kernel_against_reference \
            tests/test_decode.py::test_gpu_generate_uses_the_cuda_kernel \
            tests/test_decode.py::test_gpu_compiled_decode_step_has_no_graph_break \
            tests/test_prefix_mlp.py::test_raw_launch_equals_a_plain_launch \
            tests/test_prefix_mlp.py::test_gpu_full_size_against_reference \
            tests/test_prefix_attention.py::test_dropout_forward_and_backward_match_the_mask \
            tests/test_prefix_attention.py::test_packed_dropout_matches_the_mask \
            tests/test_prefix_attention.py::test_dropout_is_reproducible_under_manual_seed \
            tests/test_prefix_attention.py::test_dropout_mask_is_the_documented_philox_layout \
            tests/test_prefix_attention.py::test_dropout_mask_keeps_one_minus_p_of_the_weights \
            tests/test_prefix_attention.py::test_gpu_dropout_full_size \
            tests/test_prefix_attention.py::test_torch_compile_fullgraph_with_dropout \
            tests/test_prefix_attention.py::test_backward_writes_what_it_reads_and_is_bitwise_deterministic \
            tests/test_prefix_attention.py::test_strided_index_vectors \
            tests/test_decode.py::test_strided_prefix_index_decodes_as_a_contiguous_one \
            tests/test_prefix_mlp.py::test_strided_operands \
            -k "(kernelmma and bfloat16 and P30 and L4096) or generate or graph_break or raw_launch or (full_size and (20-bloomz or 128-qwen)) or dropout or bitwise or strided" \
            > "$R/fixed.log" 2>&1
        tail -n 15 "$R/fixed.log"
        timeout 420 benchmarks/run_gpu.sh "$R" quick-device:20 quick-decode:150 quick-attention:110 quick-mlp:120
        tar czf "$OUT/r.tgz" -C "$OUT" r
        ;;
    2)
        timeout 262 benchmarks/run_gpu.sh "$R" e2e-compile:250
        tar czf "$OUT/r2.tgz" -C "$OUT" r
        ;;
    ncu)
        sections=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy
                  --section WarpStateStats --section SchedulerStats --section LaunchStats)
        # The default kernel at P=30, cache 4096, B=8 now runs two K/V stages (the launcher's rule):
        # where its time goes beside the one-stage kernel's profile in the eighth run's _smoke.md.
        PYTHONPATH="$PWD" timeout 40 ncu --clock-control none --profile-from-start off "${sections[@]}" \
            python3 benchmarks/ncu_ops.py decode --impl prefixkern > "$R/ncu_decode_prefixkern.txt" 2>&1
        tail -n 5 "$R/ncu_decode_prefixkern.txt"
        tar czf "$OUT/r3.tgz" -C "$OUT" r
        ;;
    fuzz)
        # Each kind starts no case after its seconds (--seconds; the summary counts what ran) and
        # is killed 30 s later; a failure prints its case, re-run with --seed S --first K --cases 1.
        for run in "attention --dropout --cases 200 --seed 7001:30" "varlen --dropout --cases 200 --seed 7101:15" \
                   "attention --cases 100 --seed 7201:10" "triton-decode --cases 100 --seed 7301:5" \
                   "mlp --cases 100 --seed 7401:5"; do
            PYTHONPATH="$PWD" timeout $(( ${run##*:} + 30 )) python3 tests/tools/fuzz_kernels.py ${run%:*} \
                --seconds "${run##*:}" >> "$R/fuzz.log" 2>&1 || echo "fuzz ${run%:*}: exit $?" >> "$R/fuzz.log"
        done
        grep -E "^(FAIL|[a-z-]+: [0-9]+ cases|fuzz )" "$R/fuzz.log"
        tar czf "$OUT/r4.tgz" -C "$OUT" r
        ;;
    *)
        echo "usage: OUT=DIR benchmarks/gpu_session.sh 1|2|ncu|fuzz (see benchmarks/results/README.md)" >&2
        exit 2
        ;;
esac
rm -rf "$R"
