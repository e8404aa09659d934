"""One decode-suite shape's attention, called a few times and nothing else, for Nsight Compute: where
the CUDA decode kernel's time goes (DRAM throughput against issue slots, stalls, occupancy), which
the suite's timings alone cannot say. Needs a GPU and the built CUDA ops (the decode suite or
``prefixkern.build_cuda()`` builds them first, outside ncu):

    ncu --clock-control none --nvtx --nvtx-include "ncu_decode/" --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        --section SchedulerStats --section LaunchStats \\
        python3 benchmarks/ncu_decode.py --impl prefixkern --prefix 30 --cache 4096 --batch 8

``--impl``: ``prefixkern`` (the CUDA-core kernel, the default of generate()), ``tensor_cores`` (the
mma.sync kernel) or ``sdpa_concat`` (SDPA on the concatenated cache, the suite's baseline), on
Llama-3-8B heads (32/8/128) in bf16, as the decode suite builds them. The warm calls (and the CUDA
ops' self-check, whose launches are other shapes) run outside the NVTX range ``ncu_decode``; the
last call runs inside it, so ``--nvtx-include "ncu_decode/"`` profiles its kernels only: the partial
kernel and the merge, or SDPA's.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from prefixkern._backend import use_backend  # noqa: E402
from prefixkern.bench.decode import HKV, HQ, D  # noqa: E402
from prefixkern.ops.decode_attention import cuda_decode_supported, prefix_decode_attention  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("prefixkern", "tensor_cores", "sdpa_concat"), default="prefixkern")
    parser.add_argument("--prefix", type=int, default=30)
    parser.add_argument("--cache", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3, help="calls in all, the last one profiled")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("ncu_decode.py profiles GPU kernels: no CUDA GPU here", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen).to("cuda", torch.bfloat16)

    q = randn(args.batch, HQ, 1, D)
    k, v = randn(args.batch, HKV, args.cache, D), randn(args.batch, HKV, args.cache, D)
    pk, pv = randn(HKV, args.prefix, D), randn(HKV, args.prefix, D)
    if args.impl == "sdpa_concat":
        cat_k = torch.cat([pk.expand(args.batch, -1, -1, -1), k], 2)
        cat_v = torch.cat([pv.expand(args.batch, -1, -1, -1), v], 2)

        def call():
            return F.scaled_dot_product_attention(q, cat_k, cat_v, enable_gqa=True)
    else:
        if not cuda_decode_supported(q, k, v, pk, pv):
            print("the CUDA decode kernel does not serve this call", file=sys.stderr)
            return 2
        from prefixkern._cuda_build import cuda_ops

        if cuda_ops() is None:
            print("the CUDA ops are not built (see the warning above)", file=sys.stderr)
            return 2

        def call():
            with use_backend("auto"):
                return prefix_decode_attention(q, k, v, pk, pv, tensor_cores=args.impl == "tensor_cores")
    for _ in range(args.calls - 1):
        call()
    torch.cuda.synchronize()
    with torch.cuda.nvtx.range("ncu_decode"):
        call()
    torch.cuda.synchronize()
    kv_bytes = (args.batch * HKV * args.cache + HKV * args.prefix) * D * 2 * 2
    print(f"{args.impl}: {args.calls} calls, P={args.prefix} cache={args.cache} B={args.batch}, "
          f"{kv_bytes / 2**20:.1f} MiB of K/V per call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
