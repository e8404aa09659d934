"""Test set-up shared by every suite.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable
must be set before triton is first imported, hence here at import time.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances per dtype, in one place: (atol, rtol) for values and for gradients.
TOLERANCES = {
    torch.float32: {"out": (2e-4, 2e-4), "grad": (1e-3, 1e-3)},
    torch.float16: {"out": (2e-3, 2e-3), "grad": (1e-2, 1e-2)},
    torch.bfloat16: {"out": (1.6e-2, 1.6e-2), "grad": (5e-2, 5e-2)},
}


def assert_same_values_and_gradients(out, other, leaves, other_leaves):
    """``out`` and ``other`` equal bit for bit, and so are their leaves' gradients once one dense
    random dO is backpropagated through each (dense: ``sum()``'s dO is a stride-0 expand, which
    AOT autograd makes contiguous and eager does not, so Triton would compile another variant)."""
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    other.backward(grad_out)
    assert torch.equal(out, other)
    for got, want in zip(leaves, other_leaves):
        assert torch.equal(got.grad, want.grad)


def strided_view(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a strided view: every other entry of its last dim in a tensor twice as wide, the
    entries between them 99 (out of range for any index the tests use). Differentiable: a gradient
    reaches ``t``."""
    return torch.stack([t, torch.full_like(t, 99)], -1)[..., 0]


def record_launches(monkeypatch, modules, entry=lambda kernel, meta: (kernel.fn.__name__, meta)) -> list:
    """``entry(kernel, constexprs and launch options)`` of every launch the op makes from now on
    through ``modules``' ``launch_kernel``, in launch order. The tuner's own launches (on a GPU it
    launches a candidate to compile it and read its spills before the op's launch, autotuning off
    or not) are not the op's: left out, so a count holds on the first call of a shape and later."""
    from prefixkern.kernels import _launch

    launched = []
    for module in modules:
        def recording(kernel, grid, *args, real=module.launch_kernel, **meta):
            if not _launch.tuning():
                launched.append(entry(kernel, meta))
            return real(kernel, grid, *args, **meta)
        monkeypatch.setattr(module, "launch_kernel", recording)
    return launched


def record_launch_arguments(monkeypatch, modules):
    """Record the launches of ``modules`` (launch_kernel stood in for; nothing runs): each as its
    kernel, grid, meta and arguments, a tensor argument given as its index among ``known`` (the
    caller's tensors, compared by identity) or as its shape, strides and dtype (one the launcher
    allocated)."""
    launches, known = [], []

    class Launched:
        n_spills = 0

    def record(kernel, grid, *args, **meta):
        def canon(a):
            if isinstance(a, torch.Tensor):
                for i, t in enumerate(known):
                    if a is t:
                        return ("input", i)
                return ("new", tuple(a.shape), a.stride(), a.dtype)
            return a
        launches.append((kernel.fn.__name__, tuple(grid), tuple(canon(a) for a in args), dict(meta)))
        return Launched()

    for module in modules:
        monkeypatch.setattr(module, "launch_kernel", record)
    return launches, known


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """Each test starts without kept launch plans: tests replace launcher helpers and tables
    (monkeypatch), which a plan's key does not see."""
    from prefixkern.kernels._launch import forget_plans

    forget_plans()
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_addoption(parser):
    parser.addoption("--shard", default=None, metavar="I/N",
                     help="run only the I-th of N interleaved shards of the collected tests (0-based), so a "
                          "long GPU suite fits in several time-limited calls")


def _keep_shard(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    index, count = (int(x) for x in shard.split("/"))
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard must be I/N with 0 <= I < N, got {shard}")
    config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
    items[:] = [item for i, item in enumerate(items) if i % count == index]


def pytest_collection_modifyitems(config, items):
    _keep_shard(config, items)
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
