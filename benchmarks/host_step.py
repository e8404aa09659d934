"""Host time of a training step on a CPU, the patched model's Triton kernels launched through
Triton's own launch path (no GPU needed): what the patch adds to a host-bound step, beside the
no-prefix floor and stock PEFT + sdpa.

    python benchmarks/host_step.py [--model qwen2|gpt2] [--dtype bfloat16|float32] [--layers 24] [--steps 15]
                                   [--profile]
    python benchmarks/host_step.py --generate [--layers 24]
    python benchmarks/host_step.py --ops

``--model gpt2`` runs a GPT-2-medium-shaped model (24 layers of 16 heads) training with GPT-2's
dropout, so the patched step draws a dropout seed and launches the dropout kernels in every layer.
``--dtype float32`` keeps the weights in float32: on a CPU without fast bfloat16 matmuls (this
repo's machine since 2026-11-28: 256 us for a 32 x 112 x 128 bf16 ``linear``, 22 us in float32)
the bf16 rows' arithmetic outweighs the host time they compare.

``--generate`` times greedy ``generate()`` instead (B=8, a 32-token prompt with one left-padded
row; 1 and 17 new tokens, so a decoding step's host time is their difference over 16), stock
PEFT + sdpa against the patched model. CPU tensors do not take the CUDA decode kernel: the
patched model's decoding attention launches the general Triton forward kernel here (the route a
GPU takes where the CUDA kernels cannot be built), whose launch costs the host more than the
CUDA op's (40.6 us a call on the H200, against SDPA's 19.9). Run it on transformers before 5.2x
(the GPU machines' 5.17): from 5.2x stock PEFT's generate() drops its prefix, so its row times
less work.

``--ops`` times the ops alone instead: the fused prefix MLP at Qwen2.5-0.5B's and bloomz-560m's sizes
(forward, and forward and backward) and the attention at the suite's seed-qwen shape (forward and
backward), host time per call through the same launch path (what the README's MLP and attention host
times quote); ``--rounds N`` reports the lowest of N medians, the rows timed in turns.

``host_cost.py`` stubs the launches out, so it times this repo's Python only. Here a launch does
everything but reach a GPU: Triton binds and specialises the arguments, looks the kernel up in
its cache (compiled for sm_90 on first use; Triton's compiler needs no GPU) and calls a launcher
that returns at once (a compile-only driver stands in for the CUDA one). The aten ops run for
real on the CPU at tiny widths (a 24-layer Qwen2-shaped model, 14/2 heads of 16, B=2, S=16, P=20),
standing in for the host side of the launches they make on a GPU. So the difference between the
rows is host time on this machine, not a GPU figure: what a GPU host spends in the C launcher
(a ``data_ptr()`` call and a driver query per tensor argument) and in CUDA's allocator is not here.
``--profile`` prints where the patched step's host time goes (cProfile). The
``prefixkern_raw_launch`` row is the patched step with ``PREFIXKERN_RAW_LAUNCH=1``: Triton binds a
launch's arguments once, then the compiled kernel's launcher (here the compile-only driver's, which
runs nothing) takes raw pointers; ``prefixkern_no_plans`` the patched step with
``PREFIXKERN_LAUNCH_PLANS=0`` (every call recomputes its launches); ``prefixkern_bare_attention`` the
patched step with the attention's launchers replaced by allocations of their outputs (the share of
the gap that is the attention's launches). The rows are timed in rounds, each row once per round.

The floor is timed twice: ``floor_no_prefix`` as it runs here, its SDPA computing on the CPU, and
``floor_sdpa_one_op`` with SDPA replaced by a stand-in whose host cost is one allocation forward
and three backward and no arithmetic, as a GPU host launches a fused attention kernel. The
ratios are to the latter: on a CPU the former's attention arithmetic costs more host time than
its launch does on a GPU, which hid the patch's own host time (the plain floor row put the patched
step at 0.97x, while the H200 measured 1.27x).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported: the kernels stay JIT functions

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from _host_model import IMPLS, MODELS, one_op_sdpa, qwen2_shaped, training_loss  # noqa: E402
from prefixkern._backend import override_global  # noqa: E402
from prefixkern.bench.common import held, with_raw_launch  # noqa: E402
from prefixkern.kernels._launch import launch_plans  # noqa: E402

# The floor with SDPA as one op (``OneOpAttention``): the row the others are compared with.
FLOOR_ONE_OP = "floor_sdpa_one_op"

ARCH = 90
SMS = 132
SMEM = 227 * 1024


class _CompileOnlyUtils:
    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 0, 0, 1024          # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": SMEM, "multiprocessor_count": SMS, "max_num_regs": 65536, "warpSize": 32}


class _NoLaunch:
    """The compiled kernel's launcher: takes the launch's arguments and runs nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args):
        pass


class CompileOnlyDriver:
    """Triton's active driver for this tool: an sm_90 target, device 0, stream 0, no launches."""
    utils = _CompileOnlyUtils()
    launcher_cls = _NoLaunch

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", ARCH, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise RuntimeError("host_step.py times no kernels")

    def map_python_to_cpp_type(self, ty):
        return ty


def use_compile_only_driver() -> None:
    """Route prefixkern's ops on CPU tensors to the Triton launchers, launching through the
    compile-only driver (without it, CPU tensors take the reference or Triton's interpreter)."""
    import prefixkern.kernels._launch as launch
    import prefixkern.ops.prefix_attention as attention_op
    import prefixkern.ops.prefix_mlp as mlp_op

    driver.set_active(CompileOnlyDriver())
    attention_op.use_triton = mlp_op.use_triton = lambda device: True
    launch.num_sms = lambda index: SMS
    launch.smem_bytes = lambda index: SMEM


def _with_one_op_sdpa(step):
    """``step`` with ``F.scaled_dot_product_attention`` as ``OneOpAttention`` (the
    ``floor_sdpa_one_op`` row): on a CPU, SDPA computes, so the plain floor row times its
    arithmetic too, where a GPU host only launches it."""
    return held(step, one_op_sdpa)


def _step(model, impl: str):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def step():
        model.zero_grad(set_to_none=True)
        training_loss(model, impl, ids, mask).backward()
    return step


def generate_host_times(layers: int, calls: int = 5) -> dict[str, tuple[float, float]]:
    """``{impl: (ms of a 1-token generate(), ms per decoding step)}`` for stock PEFT + sdpa and the
    patched model (medians of ``calls``)."""
    ids = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :8] = 0
    times = {}
    for impl in ("peft_sdpa", "prefixkern"):
        model = qwen2_shaped(impl, layers).eval()

        def generate(new_tokens, model=model):
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False)

        generate(2)
        medians = {}
        for new_tokens in (1, 17):
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                generate(new_tokens)
                samples.append(time.perf_counter() - start)
            medians[new_tokens] = statistics.median(samples) * 1e3
        times[impl] = (medians[1], (medians[17] - medians[1]) / 16)
    return times


def _median_us(fn, calls: int = 300) -> float:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def bindings_per_call(fn) -> int:
    """How many times one call of ``fn`` has Triton bind a launch's arguments (``JITFunction.run``:
    every plain launch, and a raw launch whose argument key is new). 0 where every launch is
    replayed raw from a launch plan, as a warmed-up call of a kept layout should be."""
    from triton.runtime.jit import JITFunction

    count = 0
    real = JITFunction.run

    def counting(self, *args, **kwargs):
        nonlocal count
        count += 1
        return real(self, *args, **kwargs)

    JITFunction.run = counting
    try:
        fn()
    finally:
        JITFunction.run = real
    return count


def op_host_times(rounds: int = 1) -> tuple[dict[str, float], dict[str, int]]:
    """``({row: host microseconds per call}, {row: Triton bindings per call})`` of the MLP and the
    attention op: the lowest of ``rounds`` medians of 300 calls, every row once per round (drift
    reaches each alike), and the bindings of one call after them (``bindings_per_call``)."""
    import prefixkern

    calls = {}
    gen = torch.Generator().manual_seed(0)
    # The MLP at Qwen2.5-0.5B's sizes (24 layers, 2 KV heads of 64; PEFT's default hidden size, the
    # token dim 128; a small MLP: one launch forward, two backward) and bloomz-560m's (24 layers, 16
    # heads of 64, hidden size 1024: two launches forward, three backward here, where the tuner takes
    # the products' one-launch tile; four on a GPU whose tuner picks a two-launch one), P = 20 and
    # 30, float32 parameters, bf16 output; the gradients dropped before each call (no accumulation).
    for name, (layers, kv_heads, head_dim, rows) in {"Qwen2.5-0.5B": (24, 2, 64, 20),
                                                      "bloomz-560m": (24, 16, 64, 30)}.items():
        width = kv_heads * head_dim
        params = [torch.randn(rows, width, generator=gen), torch.randn(width, width, generator=gen),
                  torch.randn(width, generator=gen), torch.randn(2 * layers * width, width, generator=gen),
                  torch.randn(2 * layers * width, generator=gen)]
        params = [t.requires_grad_() for t in params]
        grad = torch.ones(layers, 2, kv_heads, rows, head_dim, dtype=torch.bfloat16)

        def mlp(params=params, layers=layers, kv_heads=kv_heads, head_dim=head_dim):
            return prefixkern.fused_prefix_mlp(*params, num_layers=layers, num_kv_heads=kv_heads,
                                               head_dim=head_dim, out_dtype=torch.bfloat16)

        def mlp_fwd_bwd(params=params, grad=grad, mlp=mlp):
            for t in params:
                t.grad = None
            mlp().backward(grad)

        calls[f"prefix MLP forward, {name}"] = mlp
        calls[f"prefix MLP forward + backward, {name}"] = mlp_fwd_bwd
    # The attention: seed-qwen (B 4, 14 query heads over 2 KV heads of 64, S 256, P 20), bf16,
    # causal, HF's [B, S, H, D] memory.
    batch, heads, seq, prefix, kv_heads, head_dim = 4, 14, 256, 20, 2, 64
    q = torch.randn(batch, seq, heads, head_dim, generator=gen).to(torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(batch, seq, kv_heads, head_dim, generator=gen).to(torch.bfloat16).transpose(1, 2)
            for _ in range(2))
    pk, pv = (torch.randn(kv_heads, prefix, head_dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    leaves = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    dout = torch.ones(batch, heads, seq, head_dim, dtype=torch.bfloat16)

    def attention_fwd_bwd():
        for t in leaves:
            t.grad = None
        prefixkern.prefix_attention(*leaves, causal=True).backward(dout)

    calls["prefix_attention forward + backward, seed-qwen"] = attention_fwd_bwd
    medians = {row: [] for row in calls}
    for _ in range(rounds):
        for row, fn in calls.items():
            medians[row].append(_median_us(fn))
    return ({row: min(samples) for row, samples in medians.items()},
            {row: bindings_per_call(fn) for row, fn in calls.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="qwen2",
                        help="the training step's model: Qwen2-shaped, or GPT-2-medium-shaped with its dropout")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the base's weights: float32 where the CPU has no fast bfloat16 matmul (there the "
                             "rows' bf16 arithmetic outweighs the host time they compare)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--generate", action="store_true", help="time generate() instead of a training step")
    parser.add_argument("--ops", action="store_true", help="time the MLP and attention ops alone")
    parser.add_argument("--rounds", type=int, default=1, help="--ops: the lowest of this many medians")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    use_compile_only_driver()
    if args.ops:
        print("host time per call (CPU; Triton launches bound and looked up, not run), median of 300"
              + (f", the lowest of {args.rounds} rounds:" if args.rounds > 1 else ":"))
        times, bindings = op_host_times(args.rounds)
        for row, us in times.items():
            print(f"  {us:8.1f} us  {row}")
        print("Triton argument bindings per call after those (0: every launch replayed raw from its plan):")
        for row, count in bindings.items():
            print(f"  {count:3d} bindings  {row}")
        return 0
    if args.generate:
        print(f"host time of greedy generate(), {args.layers} layers, B=8, prompt 32 (CPU; launches not run):")
        for impl, (prefill_ms, step_ms) in generate_host_times(args.layers).items():
            print(f"  {impl:10s} 1 token {prefill_ms:7.2f} ms   per decoding step {step_ms:6.2f} ms")
        return 0
    model = MODELS[args.model]
    dtype = getattr(torch, args.dtype)
    steps = {impl: _step_of(impl, args.layers, model, dtype) for impl in STEP_ROWS}
    for step in steps.values():
        for _ in range(2):      # compiles the kernels (first step), then warms up
            step()
    # In rounds, every row once per round: drift of the machine over the run reaches each alike.
    samples = {impl: [] for impl in steps}
    for _ in range(args.steps):
        for impl, step in steps.items():
            start = time.perf_counter()
            step()
            samples[impl].append(time.perf_counter() - start)
    times = {impl: statistics.median(ms) * 1e3 for impl, ms in samples.items()}
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            steps["prefixkern"]()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    print(f"host time per training step, {args.model}-shaped, {args.dtype}, {args.layers} layers, median of "
          f"{args.steps} rounds (CPU; Triton launches bound and looked up, not run); ratios to {FLOOR_ONE_OP}, the "
          "floor as a GPU host runs it:")
    for impl, ms in times.items():
        print(f"  {ms:8.2f} ms  {impl}  ({ms / times[FLOOR_ONE_OP]:.2f}x)")
    return 0


# The rows of a training step, timed in turns (main).
STEP_ROWS = ("floor_no_prefix", FLOOR_ONE_OP) + IMPLS[1:] + ("prefixkern_raw_launch", "prefixkern_no_plans",
                                                             "prefixkern_bare_attention")


def _step_of(impl: str, layers: int, model=qwen2_shaped, dtype: torch.dtype = torch.bfloat16):
    """A row's training step: the floor, the floor with SDPA as one op, stock PEFT, the patched
    model, and the patched model with the raw launch, without launch plans, or with its attention
    launchers replaced by bare allocations of their outputs (what the attention's launches cost:
    the rest of the gap to the one-op floor)."""
    base_impl = "floor_no_prefix" if impl == FLOOR_ONE_OP else "prefixkern" if impl.startswith("prefixkern") \
        else impl
    step = _step(model(base_impl, layers, dtype), base_impl)
    if impl == FLOOR_ONE_OP:
        return _with_one_op_sdpa(step)
    if impl == "prefixkern_raw_launch":
        return with_raw_launch(step)
    if impl == "prefixkern_no_plans":
        return held(step, lambda: launch_plans(False))
    if impl == "prefixkern_bare_attention":
        return _with_bare_attention_launchers(step)
    return step


def _with_bare_attention_launchers(step):
    """``step`` with the attention's kernel launchers replaced by allocations of what they return."""
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd
    from prefixkern.kernels._attention_common import empty_in_layout_of

    def forward(q, k, v, prefix_k, prefix_v, **options):
        return empty_in_layout_of(q), torch.empty(q.shape[:3], dtype=torch.float32)

    def backward(dout, q, k, v, prefix_k, prefix_v, out, lse, **options):
        return (empty_in_layout_of(q), empty_in_layout_of(k), empty_in_layout_of(v), torch.empty_like(prefix_k),
                torch.empty_like(prefix_v))

    @contextlib.contextmanager
    def bare_launchers():
        with override_global(vars(fwd), "prefix_attention_forward", forward), \
                override_global(vars(bwd), "prefix_attention_backward", backward):
            yield
    return held(step, bare_launchers)


if __name__ == "__main__":
    sys.exit(main())
