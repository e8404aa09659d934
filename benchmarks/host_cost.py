"""Host-side cost of the kernels' launch path, measured on a CPU with the Triton launches stubbed
out (no GPU needed): what the README's launch counts and launcher times come from.

    python benchmarks/host_cost.py count     # ops per training step: patched model vs stock PEFT
    python benchmarks/host_cost.py count --autocast   # the same with float32 weights under bf16 autocast
    python benchmarks/host_cost.py count --model gpt2 # GPT-2-medium-shaped, training with its dropout
    python benchmarks/host_cost.py launchers # host time of the attention launchers and the op

``count`` builds a 24-layer Qwen2-shaped (or GPT-2-shaped) model (tiny widths, random weights) with
no prefix (the floor, its SDPA stood in by an op that counts nothing), under stock PEFT prefix
tuning with ``sdpa``, and patched, runs one bf16 training step of each and counts the aten
ops that are not views (each launches at least one kernel on a GPU) and the Triton launches,
forward and backward. ``launchers`` times the attention forward/backward launchers (ours: the
Python around the kernels) at the seed-qwen shape. Launches are stubbed, so these are host costs
of this repo's Python only; what a launch costs a GPU host is ``profile_ops.py launch``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"      # before triton is imported: kernels become stubbable objects

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import prefixkern  # noqa: E402
from _host_model import MODELS, one_op_sdpa, training_loss  # noqa: E402

TRITON_LAUNCHES: collections.Counter = collections.Counter()


class _StubLaunch:
    """What ``kernel[grid]`` returns while stubbed: counts the launch, runs nothing."""
    n_spills = 0

    def __init__(self, kernel):
        self.name = kernel.fn.__name__

    def __call__(self, *args, **kwargs):
        TRITON_LAUNCHES[self.name] += 1
        return self


def stub_triton_launches() -> None:
    InterpretedFunction.__getitem__ = lambda self, grid: _StubLaunch(self)


# Ops that only make a view or metadata (no kernel on a GPU).
VIEW_OPS = {"view", "_unsafe_view", "transpose", "t", "permute", "expand", "select", "slice", "unsqueeze", "squeeze",
            "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "narrow", "reshape",
            "_reshape_alias", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "chunk",
            "lift_fresh", "diagonal", "is_same_size", "_has_compatible_shallow_copy_type", "resize_", "set_"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _training_step(impl: str, autocast: bool = False, model_name: str = "qwen2"):
    """The model and its training forward: bf16 weights, or float32 ones under bf16 autocast (a
    ``Trainer`` with ``bf16=True`` over a model loaded without ``torch_dtype``)."""
    model = MODELS[model_name](impl, dtype=torch.float32 if autocast else torch.bfloat16)
    ids = torch.randint(0, 256, (2, 32))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return training_loss(model, impl, ids, torch.ones_like(ids))
    return model, forward


def count(autocast: bool = False, model_name: str = "qwen2") -> None:
    for impl in ("floor_no_prefix", "peft_sdpa", "prefixkern"):
        model, forward = _training_step(impl, autocast, model_name)
        backend = prefixkern.use_backend("triton" if impl == "prefixkern" else "auto")
        # The floor's SDPA as one op whose outputs are bare allocations, so no op of it is counted.
        uncounted = one_op_sdpa() if impl == "floor_no_prefix" else contextlib.nullcontext()
        with backend, uncounted:
            forward().backward()                 # first step: tune and build outside the count
            model.zero_grad(set_to_none=True)
            TRITON_LAUNCHES.clear()
            counter = _CountOps()
            with counter:
                loss = forward()
                forward_ops, forward_triton = sum(counter.ops.values()), sum(TRITON_LAUNCHES.values())
                loss.backward()
        total_ops, total_triton = sum(counter.ops.values()), sum(TRITON_LAUNCHES.values())
        print(f"{impl:15s} forward: {forward_ops:5d} aten ops + {forward_triton:3d} Triton launches; "
              f"backward: {total_ops - forward_ops:5d} aten ops + {total_triton - forward_triton:3d} Triton launches"
              + ("  (its attention not counted)" if impl == "floor_no_prefix" else ""))
        if impl == "prefixkern":
            print("  Triton launches per step:", dict(TRITON_LAUNCHES))


def _host_us(fn, iters: int) -> float:
    for _ in range(20):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e6


def launchers() -> None:
    from prefixkern.bench import attention as attention_bench
    from prefixkern.ops.prefix_attention import _backward_launch, _forward_launch

    shape = attention_bench.SHAPES["seed-qwen"]
    fwd_args, bwd_args = attention_bench.op_args(shape, "cpu", torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in fwd_args[:5]]
    rows = {"attention forward launcher": _host_us(lambda: _forward_launch(*fwd_args), 2000),
            "attention backward launcher": _host_us(lambda: _backward_launch(*bwd_args), 2000)}
    with prefixkern.use_backend("triton"):
        rows["prefix_attention with autograd, forward"] = _host_us(
            lambda: prefixkern.prefix_attention(*leaves, causal=True), 2000)
    print(f"host time per call, seed-qwen shape ({shape}), Triton launches stubbed:")
    for name, us in rows.items():
        print(f"  {us:7.1f} us  {name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("count", "launchers"))
    parser.add_argument("--autocast", action="store_true",
                        help="count: float32 weights under bf16 autocast instead of bf16 weights")
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2",
                        help="count: the Qwen2-shaped model, or the GPT-2-medium-shaped one with its dropout")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    stub_triton_launches()
    if args.what == "count":
        count(args.autocast, args.model)
    else:
        launchers()
    return 0


if __name__ == "__main__":
    sys.exit(main())
