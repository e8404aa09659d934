"""Which implementation an op runs: the Triton kernels or the plain-PyTorch reference.

``auto`` (the default) sends CUDA tensors to the kernels and everything else to
``prefixkern.reference``. ``PREFIXKERN_BACKEND=triton`` forces the kernels for every op,
CPU tensors included (with ``TRITON_INTERPRET=1`` this runs the real kernels in Triton's
interpreter, which is how CI checks kernel code); ``reference`` forces the oracle.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
_override: str | None = None


def get_backend() -> str:
    """The backend in force: a ``use_backend`` override, else ``PREFIXKERN_BACKEND``, else ``auto``."""
    name = _override if _override is not None else os.environ.get("PREFIXKERN_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PREFIXKERN_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with ``name`` as the backend of every op (tests, benchmarks)."""
    global _override
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


@contextlib.contextmanager
def override_global(namespace: dict, name: str, value) -> Iterator[None]:
    """Run the block with the module global ``name`` of ``namespace`` (a module's ``globals()``)
    set to ``value``, restored after: the switches the benchmarks flip to time both paths."""
    previous, namespace[name] = namespace[name], value
    try:
        yield
    finally:
        namespace[name] = previous


_INTERPRET: bool | None = None


def triton_interpret() -> bool:
    """Whether Triton runs kernels in its interpreter. Read once, at the first call (Triton itself
    decides when the kernels are defined; the launchers ask on every call, and an environment
    lookup costs 1.3 us). A module global rather than functools.cache, which torch.compile warns
    about when it traces a caller."""
    global _INTERPRET
    if _INTERPRET is None:
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        # Kept only outside a torch.compile trace: a global set while dynamo traces is a side
        # effect it replays, and a trace that restarts after a graph break elsewhere would find
        # it set and take another path (dynamo stops on the divergence).
        if torch.compiler.is_compiling():
            return interpret
        _INTERPRET = interpret
    return _INTERPRET


def use_triton(device: torch.device) -> bool:
    """True when an op on tensors of ``device`` should launch the Triton kernels."""
    backend = get_backend()
    if backend == "reference":
        return False
    if backend == "triton":
        if device.type != "cuda" and not triton_interpret():
            raise RuntimeError(
                "PREFIXKERN_BACKEND=triton with CPU tensors needs TRITON_INTERPRET=1 "
                "(set before triton is imported)"
            )
        return True
    return device.type == "cuda"


def lazy_modules(**modules: str):
    """A function returning ``types.SimpleNamespace(name=module, ...)`` of the modules named by
    their full import paths, imported at its first call: ``import prefixkern`` does not import
    Triton. The ops look the modules up per call (tests replace their functions); an import
    statement per call cost the host 0.6-1.4 us each on this repo's CPU machine, several per layer.
    Only for code torch.compile does not trace (the launchers behind the custom ops): the first call
    imports through importlib, which dynamo will not trace."""
    loaded = []

    def load():
        if not loaded:
            import importlib
            import types

            loaded.append(types.SimpleNamespace(**{name: importlib.import_module(path)
                                                   for name, path in modules.items()}))
        return loaded[0]

    return load


def eager_function(name: str, forward_launch, setup_context, backward, backward_launch):
    """The autograd.Function an op runs eagerly (see ``launch_directly``): the same launchers,
    context and backward as its custom op's registration, without the dispatcher round trip.
    ``backward(ctx, *grads, launch=backward_launch)`` is the op's registered backward."""

    def forward(ctx, *inputs):
        output = forward_launch(*inputs)
        setup_context(ctx, inputs, output)
        return output

    def eager_backward(ctx, *grads):
        return backward(ctx, *grads, launch=backward_launch)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"{name}: the custom op's launchers for eager calls (same results bit for bit).",
        "forward": staticmethod(forward), "backward": staticmethod(eager_backward)})


def launch_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may launch its kernels from an autograd.Function, skipping its custom op's
    dispatch and autograd wrapper (tens of microseconds per call on the host, per layer): eager
    calls on plain tensors. torch.compile and tensor subclasses (fake tensors, DTensor) take the
    custom op, which they understand."""
    return not torch.compiler.is_compiling() and all(
        t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
