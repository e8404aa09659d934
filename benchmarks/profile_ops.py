"""Where the time of one prefixkern call goes, on a GPU: wall time per iteration against the device
time of each kernel it launched (torch.profiler), so host overhead (wall minus device-busy) and the
slowest kernel can be read off one table; then the host side alone, split into the forward op, the
backward op called directly on the main thread, and forward+backward through autograd (whose
backward runs on autograd's device thread), with a cProfile of the two direct calls.

    python benchmarks/profile_ops.py attention:seed-qwen mlp:llama3-8b [--pass fwd_bwd] [--tf32]

A case is SUITE:SHAPE with a shape of that suite (prefixkern/bench/attention.py, mlp.py). This is a
diagnostic for kernel work, not a benchmark: the figures to quote come from ``prefixkern-bench``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from prefixkern import fused_prefix_mlp, prefix_attention  # noqa: E402
from prefixkern.bench import attention as attention_bench  # noqa: E402
from prefixkern.bench import mlp as mlp_bench  # noqa: E402


def _attention_step(shape_name: str, pass_: str, dtype):
    shape = attention_bench.SHAPES[shape_name]
    leaves, dout = attention_bench.make_inputs(shape, "cuda", dtype, requires_grad=pass_ == "fwd_bwd")

    def step():
        for t in leaves:
            t.grad = None
        out = prefix_attention(*leaves, causal=True)
        if pass_ == "fwd_bwd":
            out.backward(dout)
    return step


def _mlp_step(shape_name: str, pass_: str, dtype):
    shape = mlp_bench.SHAPES[shape_name]
    params = mlp_bench._params(shape, "cuda")
    kw = dict(num_layers=shape.L, num_kv_heads=shape.Hkv, head_dim=shape.D, out_dtype=dtype)
    grad = torch.randn(shape.L, 2, shape.Hkv, shape.P, shape.D, device="cuda", dtype=dtype)

    def step():
        for p in params:
            p.grad = None
        out = fused_prefix_mlp(*params, **kw)
        if pass_ == "fwd_bwd":
            out.backward(grad)
    return step


def _attention_ops(shape_name: str, dtype):
    """The custom ops' forward and backward as direct calls (no autograd)."""
    shape = attention_bench.SHAPES[shape_name]
    (q, k, v, pk, pv), dout = attention_bench.make_inputs(shape, "cuda", dtype, requires_grad=False)
    scale = shape.D ** -0.5
    options = (True, scale, 0.0, None, None)
    fwd_args = (q, k, v, pk, pv, None, None, None, None, *options, None, None, 0, 0)
    out, lse = torch.ops.prefixkern.prefix_attention_fwd(*fwd_args)
    bwd_args = (dout, q, k, v, pk, pv, out, lse, None, None, None, None, *options, None, None, 0, 0)
    return (lambda: torch.ops.prefixkern.prefix_attention_fwd(*fwd_args),
            lambda: torch.ops.prefixkern.prefix_attention_bwd(*bwd_args))


def _mlp_ops(shape_name: str, dtype):
    shape = mlp_bench.SHAPES[shape_name]
    params = [p.detach() for p in mlp_bench._params(shape, "cuda")]
    sizes = (shape.L, shape.Hkv, shape.D)
    out, hidden = torch.ops.prefixkern.prefix_mlp_fwd(*params, *sizes, dtype, 0.0, None)
    grad = torch.randn_like(out)
    return (lambda: torch.ops.prefixkern.prefix_mlp_fwd(*params, *sizes, dtype, 0.0, None),
            lambda: torch.ops.prefixkern.prefix_mlp_bwd(grad, *params, hidden, *sizes, 0.0, None))


def _wall_us(fn, iters: int) -> float:
    for _ in range(5):                     # compile and autotune outside the window
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def host_split(case: str, dtype, iters: int) -> None:
    """Wall time of the forward op, of the backward op called on the main thread, and of forward +
    backward through autograd; then cProfile's view of the two direct calls (main thread only)."""
    import cProfile
    import pstats

    suite, shape_name = case.split(":", 1)
    fwd, bwd = {"attention": _attention_ops, "mlp": _mlp_ops}[suite](shape_name, dtype)
    step = {"attention": _attention_step, "mlp": _mlp_step}[suite](shape_name, "fwd_bwd", dtype)
    walls = {"forward op": _wall_us(fwd, iters), "backward op, direct": _wall_us(bwd, iters),
             "forward + backward through autograd": _wall_us(step, iters)}
    print(f"\n== host split, {case}: " + ", ".join(f"{name} {us:.1f} us" for name, us in walls.items()))
    for name, fn in (("forward op", fwd), ("backward op, direct", bwd)):
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(iters):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        print(f"  cProfile of the {name}, {iters} calls, by own time:")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)


def profile(case: str, pass_: str, dtype, iters: int) -> None:
    suite, shape_name = case.split(":", 1)
    step = {"attention": _attention_step, "mlp": _mlp_step}[suite](shape_name, pass_, dtype)
    wall_us = _wall_us(step, iters)

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        # Device-side events only (kernels, memcpy/memset): an op's own entry repeats its kernels' time.
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        device_us = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if device_us > 0:
            kernels[event.key] = (device_us / iters, max(1, event.count // iters))
    busy_us = sum(us for us, _ in kernels.values())
    print(f"\n== {case} {pass_} {str(dtype).removeprefix('torch.')}: wall {wall_us:.1f} us/iter, "
          f"device busy {busy_us:.1f} us/iter, host-bound gap {wall_us - busy_us:.1f} us")
    for name, (us, count) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"  {us:9.1f} us  x{count:<3d} {name[:100]}")
    cpu_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    print("  host, self time per iter:")
    for event in cpu_ops:
        print(f"  {event.self_cpu_time_total / iters:9.1f} us  x{event.count // iters:<3d} {event.key[:100]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="SUITE:SHAPE, e.g. attention:seed-qwen mlp:llama3-8b")
    parser.add_argument("--pass", dest="pass_", choices=("fwd", "fwd_bwd"), default="fwd_bwd")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (torch.backends.cuda.matmul)")
    parser.add_argument("--no-host-split", action="store_true", help="skip the host-time split and cProfile")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    for case in args.cases:
        profile(case, args.pass_, getattr(torch, args.dtype), args.iters)
        if not args.no_host_split:
            host_split(case, getattr(torch, args.dtype), args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
