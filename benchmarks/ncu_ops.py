"""One suite shape's op, called a few times and nothing else, for Nsight Compute: where a kernel's
time goes (DRAM throughput against issue slots, stalls, occupancy), which the suites' timings alone
cannot say. The warm calls (autotuning, the CUDA ops' build and self-check, whose launches are other
shapes) run before the profiler is started; the last call runs between ``cudaProfilerStart`` and
``cudaProfilerStop`` (and inside the NVTX range ``ncu_ops``), so ``--profile-from-start off``
profiles that call's kernels only. Not ``--nvtx-include "ncu_ops/"``: an NVTX range is the host
thread's, and autograd launches a backward's kernels from its own thread (the 2026-11-27 H200 run
profiled the MLP's forward kernels only that way). Needs a GPU:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        --section SchedulerStats --section LaunchStats python3 benchmarks/ncu_ops.py decode

``decode [--impl prefixkern|tensor_cores|cuda_cores|sdpa_concat] [--prefix 30 --cache 4096 --batch 8]``:
a decoding step's attention on Llama-3-8B heads (32/8/128) in bf16, as the decode suite builds it:
the default CUDA kernel (generate()'s: the tensor-core one, its partial kernel and the merge), one
of the two CUDA kernels by name (mma.sync, or CUDA-core FMAs), or SDPA on the concatenated cache
(the suite's baseline).

``mlp [--shape llama3-8b]``: the fused prefix MLP forward and backward of an MLP suite shape
(float32 parameters, bf16 output, the default 3xTF32 products), with the tiles the tuner picks.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from prefixkern._backend import use_backend  # noqa: E402
from prefixkern.bench import decode as decode_suite  # noqa: E402
from prefixkern.bench import mlp as mlp_suite  # noqa: E402
from prefixkern.ops.decode_attention import cuda_decode_supported, prefix_decode_attention  # noqa: E402


# --impl of the CUDA decode kernels: the default (tensor cores at every head dim since the seventh
# H200 run, TENSOR_CORE_HEAD_DIMS), or one of the two kernels by name.
KERNELS = {"prefixkern": None, "tensor_cores": True, "cuda_cores": False}


def decode_call(args, device):
    """``(label, call)`` of the decode target, or ``(why not, None)`` where it cannot run here."""
    hq, hkv, d = decode_suite.HQ, decode_suite.HKV, decode_suite.D
    gen = torch.Generator().manual_seed(0)
    q, k, v, pk, pv, cat_k, cat_v = decode_suite.case_tensors(
        lambda *size: torch.randn(*size, generator=gen).to(device, torch.bfloat16), hq, hkv, d, args.prefix,
        args.cache, args.batch)
    kv_mib = (args.batch * hkv * args.cache + hkv * args.prefix) * d * 2 * 2 / 2**20
    label = f"decode {args.impl} P={args.prefix} cache={args.cache} B={args.batch}, {kv_mib:.1f} MiB of K/V a call"
    if args.impl == "sdpa_concat":
        return label, lambda: F.scaled_dot_product_attention(q, cat_k, cat_v, enable_gqa=True)
    if not cuda_decode_supported(q, k, v, pk, pv):
        return "the CUDA decode kernel does not serve this call", None
    from prefixkern._cuda_build import cuda_ops

    if cuda_ops() is None:
        return "the CUDA ops are not built (see the warning above)", None

    def call():
        with use_backend("auto"):
            return prefix_decode_attention(q, k, v, pk, pv, tensor_cores=KERNELS[args.impl])
    return label, call


def mlp_call(args, device):
    """``(label, call)`` of the MLP target: forward and backward of the shape's fused prefix MLP."""
    shape = {**mlp_suite.SHAPES, **mlp_suite.CPU_SHAPES}[args.shape]
    w2_mib = shape.num_cols * shape.token_dim * 4 / 2**20
    return f"mlp {args.shape} fwd+bwd, W2 {w2_mib:.0f} MiB (float32)", mlp_suite.fused_step(shape, device, torch.bfloat16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3, help="calls in all, the last one profiled")
    targets = parser.add_subparsers(dest="target", required=True)
    decode = targets.add_parser("decode")
    decode.add_argument("--impl", choices=(*KERNELS, "sdpa_concat"), default="prefixkern")
    decode.add_argument("--prefix", type=int, default=30)
    decode.add_argument("--cache", type=int, default=4096)
    decode.add_argument("--batch", type=int, default=8)
    mlp = targets.add_parser("mlp")
    mlp.add_argument("--shape", choices=sorted(mlp_suite.SHAPES), default="llama3-8b")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_ops.py profiles GPU kernels: no CUDA GPU here", file=sys.stderr)
        return 2
    return run(args, "cuda")


def run(args, device: str) -> int:
    """The target's calls on ``device`` (the tests run the CPU's: no NVTX range there)."""
    label, call = (decode_call if args.target == "decode" else mlp_call)(args, device)
    if call is None:
        print(label, file=sys.stderr)
        return 2
    for _ in range(args.calls - 1):
        call()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        with torch.cuda.nvtx.range("ncu_ops"):
            call()
            torch.cuda.synchronize()        # (the backward's kernels, launched by autograd's thread)
        torch.cuda.profiler.stop()
    else:
        call()
    print(f"{label}: {args.calls} calls, the last between cudaProfilerStart and cudaProfilerStop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
