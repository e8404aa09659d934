"""Host-side launch helpers every kernel file shares: which GPU to launch on, its SM count and
shared memory, the precision of float32 products, tile selection (``pick_config``) and the
launch itself (``launch_kernel``)."""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.testing
from triton.runtime import driver

from .._backend import override_global, triton_interpret


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints. ``triton.cdiv`` is a constexpr function whose host call
    costs about 1.5 us; the launchers make a dozen such calls per op."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """``triton.next_power_of_2`` for host ints (0 for 0), without its 1.5 us call overhead."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def smem_bytes(index: int) -> int:
    # Opt-in per-block shared memory (227 KiB on H100, 163 KiB on A100); older torch lacks the field.
    props = torch.cuda.get_device_properties(index)
    return getattr(props, "shared_memory_per_block_optin", 99 * 1024)


_NO_DEVICE_GUARD = contextlib.nullcontext()


def on_device(device: torch.device):
    """Launch on the tensors' GPU, not the current one (Triton launches on the current device).
    No guard where that GPU is current already, the usual case: entering and leaving
    ``torch.cuda.device`` cost 3.7 us of host time on the H200 machine, asking for the current
    device 0.6 us (``profile_ops.py launch``), and the attention takes a guard per forward and
    per backward in every layer."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NO_DEVICE_GUARD
    return torch.cuda.device(device)


def input_precision(dtype: torch.dtype = torch.float32) -> str:
    """Follow PyTorch's float32 matmul setting, so the kernels match what ``nn.Linear`` would do:
    exact float32 products by default, TF32 tensor cores when the user allowed them. Only float32
    operands have a choice; other dtypes get "ieee" so they compile one kernel variant."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


# --------------------------------------------------------------------------------------------
# Tile selection, shared by every kernel family
# --------------------------------------------------------------------------------------------

_TUNED: dict[tuple, tuple[int, ...]] = {}
# The config each kernel ran with since it was last taken (key[0] is the kernel's name): what the
# benchmarks record beside their timings.
_LAST: dict[str, tuple[int, ...]] = {}


def take_launched_configs(names) -> dict[str, tuple[int, ...]]:
    """``{kernel name: config}`` of the kernels ``names`` launched since they were last taken
    (each op family takes its own)."""
    return {name: _LAST.pop(name) for name in names if name in _LAST}


def spill_bytes(compiled) -> int:
    """Bytes of registers a launched kernel spills (0 when Triton does not say)."""
    return int(getattr(compiled, "n_spills", 0) or 0)


def pick_config(key, candidates, launch):
    """Time each candidate tile config (a tuple of block sizes, warps and stages) once per key,
    like ``triton.autotune`` but over a plain Python launch, so the kernel's argument list stays
    free of tuning-only keys. ``launch(config)`` returns what the Triton launch returns.
    ``candidates`` is a list, or a function returning one that is called only when ``key`` has
    not been tuned yet (filtering the tables for shared memory costs a few microseconds of host
    time per launch, every launch, otherwise).

    Candidates whose compiled kernel spills registers on this GPU are dropped before timing
    while a spill-free one remains: the tables are checked spill-free for sm_90 offline
    (tests/tools/kernel_resources.py), other architectures allocate registers differently.
    ``key[0]`` names the kernel."""
    config = _tune(key, candidates, launch)
    _LAST[key[0]] = config
    return config


# Whether the tuner is launching candidates now: a GPU launches each candidate it compiles or times
# on the op's own tensors before the op's launch (PREFIXKERN_AUTOTUNE=0 included, which launches the
# first candidate to read its spills), so code that counts an op's launches skips these.
_TUNING = False


def tuning() -> bool:
    """Whether the launch being made is the tuner's (a candidate compiled or timed), not the op's."""
    return _TUNING


def _tune(key, candidates, launch):
    if key in _TUNED:
        return _TUNED[key]
    if callable(candidates):
        candidates = candidates()
    if len(candidates) == 1 or not torch.cuda.is_available():
        _TUNED[key] = candidates[0]
        return candidates[0]
    global _TUNING
    outer, _TUNING = _TUNING, True
    try:
        _TUNED[key] = _tuned_config(candidates, launch)
    finally:
        _TUNING = outer
    return _TUNED[key]


def _tuned_config(candidates, launch):
    if os.environ.get("PREFIXKERN_AUTOTUNE", "1") == "0":
        # No timing (the GPU test grid, which would otherwise spend its time tuning hundreds of
        # one-off shapes): the first candidate that compiles without spills here.
        return _first_spill_free(candidates, launch)
    launched = list(_compiled(candidates, launch))
    timed = [config for config, spills in launched if spills == 0] or [config for config, _ in launched]
    best, best_ms = candidates[0], float("inf")
    for config in timed:
        ms = triton.testing.do_bench(lambda: launch(config), warmup=5, rep=20)
        if ms < best_ms:
            best, best_ms = config, ms
    return best


def _compiled(candidates, launch):
    """``(config, spill bytes)`` of each candidate in turn, launched (so compiled) as the generator
    is drawn; a candidate that fails to launch (out of resources for this tile) is left out."""
    for config in candidates:
        try:
            spills = spill_bytes(launch(config))
        except Exception:  # out of resources for this tile: try the next
            continue
        yield config, spills


def _first_spill_free(candidates, launch):
    """The first of ``candidates`` whose compiled kernel spills no registers on this GPU, launched in
    table order until one does not (usually the first: each table's first is checked spill-free for
    sm_90 on the Triton the tables are tuned on, but another Triton release or GPU may spill it, as
    Triton 3.8 does the padded 16-bit head-dim-256 forward's); else the first that compiled."""
    first_compiled = None
    for config, spills in _compiled(candidates, launch):
        if spills == 0:
            return config
        if first_compiled is None:
            first_compiled = config
    return first_compiled if first_compiled is not None else candidates[0]


# The raw-pointer launch: `launch_kernel` looks the compiled kernel up itself and hands Triton's
# C launcher raw pointers (see there). On by default on the Triton releases whose launcher it was
# checked against on a GPU (test_raw_launch_equals_a_plain_launch; the H200, 2026-11-27: the training
# step 83 against 90 ms, interleaved 0.935 of the plain launch's time), since it calls the launcher
# by the convention of Triton's own JITFunction.run, which a release may change.
# PREFIXKERN_RAW_LAUNCH=1 or 0 forces it either way.
RAW_LAUNCH_CHECKED_TRITON = ("3.6",)


def _raw_pointers_default() -> bool:
    setting = os.environ.get("PREFIXKERN_RAW_LAUNCH")
    if setting is not None:
        return setting == "1"
    return ".".join(triton.__version__.split(".")[:2]) in RAW_LAUNCH_CHECKED_TRITON


RAW_POINTERS = _raw_pointers_default()
# (kernel, device, constexprs, argument key) -> (compiled kernel, its constexpr values in signature order)
_RAW_LAUNCHES: dict[tuple, tuple] = {}
_RAW_LAUNCHES_MAX = 4096      # distinct shapes and layouts kept; past it the table starts over


def raw_pointer_launches(enabled: bool = True):
    """Run the block with ``RAW_POINTERS`` set to ``enabled`` (benchmarks time both paths)."""
    return override_global(globals(), "RAW_POINTERS", enabled)


def _hooked(hook) -> bool:
    """Whether a Triton launch hook would run: set, and not an empty HookChain (Triton 3.6+)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _raw_arguments(args) -> tuple[tuple, list]:
    """``(key, values)`` of a launch's runtime arguments: ``values`` what the C launcher takes (a
    tensor's device address as an int); ``key`` each tensor as its dtype and whether its address is
    16-byte aligned, every other argument as itself. Triton specialises a compiled kernel on a
    tensor's dtype and alignment and on an int's value class (1, a multiple of 16, 32 or 64 bits):
    arguments equal under this key get the same compiled kernel, so a hit may skip the binding."""
    key, values = [], []
    tensor = torch.Tensor
    for a in args:
        if isinstance(a, tensor):
            address = a.data_ptr()
            key.append(a.dtype)
            key.append(address % 16 == 0)
            values.append(address)
        else:
            key.append(a)
            values.append(a)
    return tuple(key), values


# Every launch asks for fused multiply-adds (``a * b + c`` as one FMA) rather than inheriting
# Triton's default: Triton 3.9 warns on first compile that the default turns fusion off from 3.10,
# and the kernels' speed (the softmax's scaled exp2 argument, the epilogues) and the tolerances of
# the GPU tests were measured with it on. A caller's own ``enable_fp_fusion`` wins.
FP_FUSION = True


def launch_kernel(kernel, grid: tuple[int, ...], *args, **meta):
    """``kernel[grid](*args, **meta)``: runtime arguments positional, constexprs and launch options
    by keyword, ``enable_fp_fusion=FP_FUSION`` added unless given. Returns the compiled kernel, as
    a Triton launch does.

    With ``RAW_POINTERS`` (on a GPU), Triton's argument binding runs once per argument key
    (``_raw_arguments``: the dtypes, alignments and every int's value): ``run(warmup=True)``
    specialises and compiles as a plain launch would and launches nothing, and the compiled kernel
    is kept under that key. Every launch then calls the compiled kernel's C launcher directly, each
    tensor given as its device address: no binding (about 30 of the 36-47 us a 50-70-argument
    attention launch costs on this repo's CPU machine), no ``data_ptr()`` call and no
    ``cuPointerGetAttribute`` driver query per tensor inside the launcher."""
    if "enable_fp_fusion" not in meta:
        meta["enable_fp_fusion"] = FP_FUSION
    if not RAW_POINTERS or not _raw_launch_allowed():
        return kernel[grid](*args, **meta)
    device = driver.active.get_current_device()
    compiled, constexprs, values = _raw_entry(kernel, device, grid, args, meta)
    _raw_run(compiled, device, grid, values, constexprs)
    return compiled


def _raw_launch_allowed() -> bool:
    """Whether a raw-pointer launch may replace Triton's: not in the interpreter, and no launch hook
    (a profiler's, which reads the arguments) set. Triton before 3.4 has no ``knobs`` and another
    launcher convention: the plain launch there."""
    knobs = getattr(triton, "knobs", None)
    return not (triton_interpret() or knobs is None or _hooked(knobs.runtime.launch_enter_hook)
                or _hooked(knobs.runtime.launch_exit_hook))


def _raw_entry(kernel, device: int, grid, args, meta):
    """``(compiled kernel, its constexpr values in signature order, the launch's runtime values)``,
    the compiled kernel bound and kept under the launch's argument key (on ``device``, the current
    one) on first use."""
    arg_key, values = _raw_arguments(args)
    key = (kernel, device, tuple(meta.items()), arg_key)
    entry = _RAW_LAUNCHES.get(key)
    if entry is None:
        # JITFunction.run(warmup=True) rather than .warmup(), which first maps every argument through
        # a dtype wrapper (a few microseconds per launch).
        compiled = kernel.run(*args, grid=grid, warmup=True, **meta)
        if hasattr(compiled, "result"):        # an asynchronous compile hands back a future
            compiled = compiled.result()
        compiled.run                           # loads the module on first use, which sets compiled.function
        # The constexprs, in signature order: the launcher takes every parameter.
        entry = (compiled, [meta[name] for name in kernel.arg_names[len(args):]])
        if len(_RAW_LAUNCHES) >= _RAW_LAUNCHES_MAX:
            _RAW_LAUNCHES.clear()
        _RAW_LAUNCHES[key] = entry
    return entry[0], entry[1], values


def _raw_run(compiled, device: int, grid, values, constexprs) -> None:
    stream = driver.active.get_current_stream(device)
    grid = tuple(grid) + (1, 1)
    compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *values, *constexprs)


# --------------------------------------------------------------------------------------------
# Launch plans: a launcher's host work kept per layout
# --------------------------------------------------------------------------------------------

# PREFIXKERN_LAUNCH_PLANS=0: every call recomputes its launch (strides, grid, tile lookup,
# constexprs) instead of taking it from the plan kept for its layout. A training step makes the
# same attention calls, layer after layer and step after step: a plan skips the launcher's own
# Python on each (a few microseconds) and, under RAW_POINTERS, Triton's argument binding without
# building an argument key, the larger part of a launch's host time (benchmarks/host_step.py).
PLANS = os.environ.get("PREFIXKERN_LAUNCH_PLANS", "1") != "0"
_PLANS_MAX = 4096           # layouts kept per launcher; past it its table starts over
_PLAN_TABLES: list[dict] = []


def plan_table() -> dict:
    """A launcher's table of plans, by key (``forget_plans`` empties them all)."""
    table: dict = {}
    _PLAN_TABLES.append(table)
    return table


def forget_plans() -> None:
    """Drop every kept plan. A plan's key holds what its launcher reads (layouts, options, the
    launchers' switches, the tuner's tile); code that replaces one of a launcher's helpers between
    two calls of one layout (a test's monkeypatch) drops the plans itself (the tests do before each
    test)."""
    for table in _PLAN_TABLES:
        table.clear()


def launch_plans(enabled: bool = True):
    """Run the block with ``PLANS`` set to ``enabled`` (tests and benchmarks take both paths)."""
    return override_global(globals(), "PLANS", enabled)


def tensor_layouts(tensors) -> tuple:
    """What a launch's plan depends on in its tensors: each one's shape, strides and dtype (None
    for an absent one). Addresses are not in it: they are the launch's, not the plan's."""
    return tuple([None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors])


_PACKAGE_LAUNCH_KERNEL = launch_kernel


class LaunchPlan:
    """One kernel launch with its tensors left out: ``launch(tensors, launch_kernel)`` is
    ``launch_kernel(kernel, grid, *tensors, *tail, **meta)``. ``tune_key`` and ``config`` name
    the tile ``pick_config`` chose for it: the plan is current while the tuner still holds that
    tile (``current``). Under ``RAW_POINTERS`` the plan keeps its compiled kernel after the first
    launch and later launches hand it the tensors' addresses directly (no argument key to build)."""

    __slots__ = ("kernel", "grid", "tail", "meta", "tune_key", "config", "raw")

    def __init__(self, kernel, grid, tail, meta, tune_key=None, config=None):
        self.kernel, self.grid, self.tail, self.meta = kernel, tuple(grid), tuple(tail), meta
        self.tune_key, self.config = tune_key, config
        self.raw = None

    def current(self) -> bool:
        """Whether the tuner still holds this plan's tile (tests and benchmarks reset or force
        tiles); if so, records it as launched, as ``pick_config`` does."""
        if self.tune_key is None:
            return True
        if _TUNED.get(self.tune_key) != self.config:
            return False
        _LAST[self.tune_key[0]] = self.config
        return True

    def launch(self, tensors, launch_kernel):
        """Launch on ``tensors`` (the kernel's leading arguments; None for an absent one) through
        ``launch_kernel`` (the caller's, so a test's stand-in sees plan launches too)."""
        raw = self.raw
        # Only under this module's launch_kernel: a stand-in (a test recording launches) sees every
        # launch, the plan's later ones too, not only the first (the GPU's 2026-11-27 run: a dQ plan
        # the tuner had launched went raw unseen).
        if raw is not None and launch_kernel is _PACKAGE_LAUNCH_KERNEL and RAW_POINTERS and _raw_launch_allowed():
            values = [None if t is None else t.data_ptr() for t in tensors]
            # The compiled kernel is specialised on 16-byte-aligned addresses: another alignment
            # takes the general path, which binds it.
            if not any(v & 15 for v in values if v is not None):
                _raw_run(raw[0], driver.active.get_current_device(), self.grid, values + list(self.tail), raw[1])
                return raw[0]
        compiled = launch_kernel(self.kernel, self.grid, *tensors, *self.tail, **self.meta)
        # (With PLANS off no plan is kept: its raw entry would be built for nothing, a second
        # argument key per launch.)
        if raw is None and PLANS and RAW_POINTERS and _raw_launch_allowed() and all(
                t is None or t.data_ptr() % 16 == 0 for t in tensors):
            meta = dict(self.meta)
            meta.setdefault("enable_fp_fusion", FP_FUSION)    # (as launch_kernel's: the same compiled kernel)
            entry = _raw_entry(self.kernel, driver.active.get_current_device(), self.grid, (*tensors, *self.tail),
                               meta)
            self.raw = (entry[0], entry[1])
        return compiled


def kept_plan(table: dict, key):
    """The plan ``table`` keeps under ``key`` while ``PLANS`` is on and it is current, else None."""
    if not PLANS:
        return None
    plan = table.get(key)
    return plan if plan is not None and plan.current() else None


def keep_plan(table: dict, key, plan) -> None:
    """Keep ``plan`` in ``table`` under ``key`` (while ``PLANS`` is on)."""
    if PLANS:
        if len(table) >= _PLANS_MAX:
            table.clear()
        table[key] = plan


class LaunchGroup:
    """Launches on the same tensors made as one step of a plan (the MLP backward's dH and dW2
    launches, where its tile gives each a launch). ``launch`` returns the compiled kernel that
    spills the most, the one the tuner checks."""

    __slots__ = ("plans",)

    def __init__(self, plans):
        self.plans = tuple(plans)

    def current(self) -> bool:
        return all(plan.current() for plan in self.plans)

    def launch(self, tensors, launch_kernel):
        compiled = [plan.launch(tensors, launch_kernel) for plan in self.plans]
        return max(compiled, key=spill_bytes)


class LaunchChain:
    """A launcher's launches for one layout, in launch order (each a ``LaunchPlan`` or
    ``LaunchGroup``), and the values it derived from the sizes on the way (``PlannedCall.value``)."""

    __slots__ = ("steps", "values")

    def __init__(self):
        self.steps, self.values = [], {}

    def current(self) -> bool:
        return all(step.current() for step in self.steps)


class PlannedCall:
    """One call of a launcher that makes several launches, each through ``launch(build, tensors,
    launch_kernel)``: from the chain ``table`` keeps under ``key`` when there is a current one; on a
    key's first call (or with ``PLANS`` off) ``build()`` makes each step's plan, its tile tuned on
    this call's tensors, and ``finish()`` keeps the chain. The steps are replayed in the order the
    first call made them, so everything that decides which launches a call makes must be in
    ``key`` or in a plan's tile (``LaunchPlan.current``). A step that cannot be replayed (one that
    is no Triton launch, and may hold the call's tensors) is never current: its chain is not kept."""

    __slots__ = ("table", "key", "chain", "building", "index")

    def __init__(self, table: dict, key):
        self.table, self.key = table, key
        self.chain = kept_plan(table, key)
        self.building = self.chain is None
        if self.building:
            self.chain = LaunchChain()
        self.index = 0

    def value(self, name: str, compute):
        """``compute()``, once per chain: a size-derived value the launches need (a buffer's shape)."""
        values = self.chain.values
        if name not in values:
            values[name] = compute()
        return values[name]

    def launch(self, build, tensors, launch_kernel):
        """Launch the next step on ``tensors`` (its kernel's leading arguments) through
        ``launch_kernel`` (the caller's); returns what the launch returns."""
        if self.building:
            step = build()
            self.chain.steps.append(step)
        else:
            step = self.chain.steps[self.index]
            self.index += 1
        return step.launch(tensors, launch_kernel)

    def finish(self) -> None:
        if self.building and self.chain.current():
            keep_plan(self.table, self.key, self.chain)
