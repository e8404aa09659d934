"""Where the time of one prefixkern call goes, on a GPU: wall time per iteration against the device
time of each kernel it launched (torch.profiler), so host overhead (wall minus device-busy) and the
slowest kernel can be read off one table; then the host side alone, split into the forward op, the
backward op called directly on the main thread, and forward+backward through autograd (whose
backward runs on autograd's device thread), with a cProfile of the two direct calls.

    python benchmarks/profile_ops.py attention:seed-qwen mlp:llama3-8b [--pass fwd_bwd] [--tf32]
    python benchmarks/profile_ops.py mlp_p_rows:llama3-8b   # the MLP suite's PyTorch-on-P-rows row, its kernels
    python benchmarks/profile_ops.py launch     # what one launch costs the host, piece by piece
    python benchmarks/profile_ops.py e2e:qwen2.5-0.5b   # a training step, patched and stock PEFT + sdpa
    python benchmarks/profile_ops.py generate:qwen2.5-0.5b   # generate(), 16 tokens, patched and stock
    python benchmarks/profile_ops.py generate_static:qwen2.5-0.5b   # the same, cache_implementation="static"

A case is SUITE:SHAPE with a shape of that suite (prefixkern/bench/attention.py, mlp.py, also for
mlp_p_rows; e2e: a
model of prefixkern/bench/e2e.py, one step at S=256, B=8; generate: the same models, B=8, a
512-token prompt, 16 new tokens; generate_static: the same with a static cache, whose decoding
steps transformers compiles, the compilation paid in an untimed first call). This is a
diagnostic for kernel work, not a benchmark: the figures to quote come from ``prefixkern-bench``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from prefixkern import prefix_attention  # noqa: E402
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
    return mlp_bench.fused_step(mlp_bench.SHAPES[shape_name], "cuda", dtype, backward=pass_ == "fwd_bwd")


def _mlp_p_rows_step(shape_name: str, pass_: str, dtype):
    """The MLP suite's ``torch_p_rows`` row (PyTorch on P rows): its kernels beside ours."""
    return mlp_bench.fused_step(mlp_bench.SHAPES[shape_name], "cuda", dtype, backward=pass_ == "fwd_bwd", p_rows=True)


def _suite_model(model_name: str, impl: str, dtype, device: torch.device, **build_kwargs):
    """``(model, config)``: the e2e suite's model for ``impl`` (prefixkern, prefixkern_raw_launch,
    peft_sdpa, floor_no_prefix), built as the suite builds it."""
    from prefixkern.bench import e2e
    from prefixkern.bench.common import Options

    opts = Options(device, dtype, quick=True, baselines=None, shapes=None, on_gpu=device.type == "cuda")
    config = e2e.model_config(model_name)
    torch.manual_seed(0)
    with device:
        base_state = e2e.model_class(model_name).from_config(config, torch_dtype=dtype).state_dict()
    return e2e.build_model(model_name, impl, opts, base_state, **build_kwargs), config


def _e2e_step(model_name: str, impl: str, dtype, seq_len: int = 256, batch: int = 8, device: str = "cuda"):
    """One training step of the e2e suite's model, at the suite's S=256 batch."""
    from prefixkern.bench import e2e

    device = torch.device(device)
    model, config = _suite_model(model_name, impl, dtype, device)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (batch, seq_len), generator=gen).to(device)
    return e2e._step_fn(model, impl, input_ids, torch.ones_like(input_ids), e2e.labels_for(model_name, input_ids))


def _generate_call(model_name: str, impl: str, dtype, batch: int = 8, prompt: int = 512, new_tokens: int = 16,
                   device: str = "cuda", cache: str = "dynamic"):
    """Greedy generate() as the decode suite runs it (P = 30, one left-padded row), fewer tokens;
    ``cache="static"`` asks for a static cache."""
    from prefixkern.bench import decode

    device = torch.device(device)
    model, config = _suite_model(model_name, impl, dtype, device, num_virtual_tokens=decode.GEN_P)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : prompt // 4] = 0

    cache_kwargs = {} if cache == "dynamic" else {"cache_implementation": cache}

    def call():
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, **cache_kwargs)
    if cache != "dynamic":
        call()                      # the compilation, outside the profile
    return call


def _attention_ops(shape_name: str, dtype):
    """The custom ops' forward and backward as direct calls (no autograd)."""
    fwd_args, bwd_args = attention_bench.op_args(attention_bench.SHAPES[shape_name], "cuda", dtype)
    return (lambda: torch.ops.prefixkern.prefix_attention_fwd(*fwd_args),
            lambda: torch.ops.prefixkern.prefix_attention_bwd(*bwd_args))


def _mlp_ops(shape_name: str, dtype):
    shape = mlp_bench.SHAPES[shape_name]
    params = [p.detach() for p in mlp_bench.parameters(shape, "cuda")]
    sizes = (shape.L, shape.Hkv, shape.D)
    compute = params[0].dtype      # float32 parameters, no autocast: float32 products
    out, hidden = torch.ops.prefixkern.prefix_mlp_fwd(*params, *sizes, dtype, compute, 0.0, None)
    grad = torch.randn_like(out)
    return (lambda: torch.ops.prefixkern.prefix_mlp_fwd(*params, *sizes, dtype, compute, 0.0, None),
            lambda: torch.ops.prefixkern.prefix_mlp_bwd(grad, *params, hidden, *sizes, compute, 0.0, None))


def _wall_us(fn, iters: int) -> float:
    for _ in range(5):                     # compile and autotune outside the window
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e6


def _cprofile_call(name: str, fn, iters: int, top: int = 20, by_package: bool = True) -> None:
    """cProfile of ``iters`` calls (already warmed up): the ``top`` functions with the most own
    time and, with ``by_package``, this package's and PEFT's functions by cumulative time. The
    main thread only: on a GPU, autograd runs the backward's Python (the ops' launchers) on its
    device thread, which ``host_split`` times on its own for the single ops."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profiler.disable()
    views = [("tottime", top, "by own time")]
    if by_package:
        views.append(("cumtime", r"prefixkern|peft", "prefixkern's and PEFT's functions by cumulative time"))
    for order, limit, title in views:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats(order)
        stats.print_stats(limit) if isinstance(limit, int) else stats.print_stats(limit, 25)
        lines = [line[:160] for line in out.getvalue().splitlines() if line.strip()]
        print(f"  cProfile of {name}, {iters} calls, {title}:")
        print("\n".join(lines[3:]))


def host_split(case: str, dtype, iters: int) -> None:
    """Wall time of the forward op, of the backward op called on the main thread, and of forward +
    backward through autograd; then cProfile's view of the two direct calls (main thread only)."""
    suite, shape_name = case.split(":", 1)
    fwd, bwd = {"attention": _attention_ops, "mlp": _mlp_ops}[suite](shape_name, dtype)
    step = {"attention": _attention_step, "mlp": _mlp_step}[suite](shape_name, "fwd_bwd", dtype)
    walls = {"forward op": _wall_us(fwd, iters), "backward op, direct": _wall_us(bwd, iters),
             "forward + backward through autograd": _wall_us(step, iters)}
    print(f"\n== host split, {case}: " + ", ".join(f"{name} {us:.1f} us" for name, us in walls.items()))
    for name, fn in (("the forward op", fwd), ("the backward op, direct", bwd)):
        _cprofile_call(name, fn, iters, top=12, by_package=False)


def profile(case: str, pass_: str, dtype, iters: int) -> None:
    suite, shape_name = case.split(":", 1)
    if suite in ("e2e", "generate", "generate_static"):
        # A whole training step or generate() call, patched and stock side by side: how much of it
        # is kernels, and which host work the patched model adds or removes.
        cache = "static" if suite == "generate_static" else "dynamic"
        for impl in ("prefixkern", "peft_sdpa"):
            try:
                step = _e2e_step(shape_name, impl, dtype) if suite == "e2e" else \
                    _generate_call(shape_name, impl, dtype, cache=cache)
            except Exception as exc:   # stock PEFT's static cache fails on transformers 5.24, say
                print(f"\n== {case} {impl}: could not run ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
                continue
            _profile_step(f"{case} {impl}", "step" if suite == "e2e" else "generate", dtype, min(iters, 3), step)
            if impl == "prefixkern":
                # Where the patched call's host time goes, in Python terms (the profiler above
                # names aten ops only); before the stock row, so a step cut short keeps it.
                _cprofile_call(f"{case} {impl}", step, min(iters, 3))
            del step
        return
    step = {"attention": _attention_step, "mlp": _mlp_step, "mlp_p_rows": _mlp_p_rows_step}[suite](shape_name, pass_,
                                                                                                  dtype)
    _profile_step(case, pass_, dtype, iters, step)


def _profile_step(case: str, pass_: str, dtype, iters: int, step) -> None:
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
    ours = {name: value for name, value in kernels.items() if name.startswith("prefix")}
    if ours and len(ours) < len(kernels):
        print(f"  prefixkern's kernels: {sum(us for us, _ in ours.values()):.1f} us/iter in "
              f"{sum(count for _, count in ours.values())} launches; the rest: "
              f"{busy_us - sum(us for us, _ in ours.values()):.1f} us in "
              f"{sum(count for name, (_, count) in kernels.items() if name not in ours)} kernels")
    cpu_ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    print("  host, self time per iter:")
    for event in cpu_ops:
        print(f"  {event.self_cpu_time_total / iters:9.1f} us  x{event.count // iters:<3d} {event.key[:100]}")


# --------------------------------------------------------------------------------------------
# Launch overheads: what one launch costs the host on this machine, piece by piece
# --------------------------------------------------------------------------------------------

def _pointer_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def touch_1_pointer_kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def touch_12_pointers_kernel(p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(p0 + offs, mask=offs < n) + tl.load(p1 + offs, mask=offs < n) + tl.load(p2 + offs, mask=offs < n)
        x += tl.load(p3 + offs, mask=offs < n) + tl.load(p4 + offs, mask=offs < n) + tl.load(p5 + offs, mask=offs < n)
        x += tl.load(p6 + offs, mask=offs < n) + tl.load(p7 + offs, mask=offs < n) + tl.load(p8 + offs, mask=offs < n)
        x += tl.load(p9 + offs, mask=offs < n) + tl.load(p10 + offs, mask=offs < n)
        tl.store(p11 + offs, x, mask=offs < n)

    @triton.jit
    def touch_12_pointers_48_ints_kernel(
            p0, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11,
            i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15,
            i16, i17, i18, i19, i20, i21, i22, i23, i24, i25, i26, i27, i28, i29, i30, i31,
            i32, i33, i34, i35, i36, i37, i38, i39, i40, i41, i42, i43, i44, i45, i46, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(p0 + offs, mask=offs < n) + tl.load(p1 + offs, mask=offs < n) + tl.load(p2 + offs, mask=offs < n)
        x += tl.load(p3 + offs, mask=offs < n) + tl.load(p4 + offs, mask=offs < n) + tl.load(p5 + offs, mask=offs < n)
        x += tl.load(p6 + offs, mask=offs < n) + tl.load(p7 + offs, mask=offs < n) + tl.load(p8 + offs, mask=offs < n)
        x += tl.load(p9 + offs, mask=offs < n) + tl.load(p10 + offs, mask=offs < n)
        s = i0 + i1 + i2 + i3 + i4 + i5 + i6 + i7 + i8 + i9 + i10 + i11 + i12 + i13 + i14 + i15
        s += i16 + i17 + i18 + i19 + i20 + i21 + i22 + i23 + i24 + i25 + i26 + i27 + i28 + i29 + i30 + i31
        s += i32 + i33 + i34 + i35 + i36 + i37 + i38 + i39 + i40 + i41 + i42 + i43 + i44 + i45 + i46
        tl.store(p11 + offs, x + s, mask=offs < n)

    return touch_1_pointer_kernel, touch_12_pointers_kernel, touch_12_pointers_48_ints_kernel


def _host_us(fn, iters: int = 2000) -> float:
    """Host microseconds per call of ``fn`` (no synchronisation inside the window: launches queue)."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / iters * 1e6


def _cu_pointer_get_attribute_us(ptr: int, iters: int = 2000) -> float | None:
    """Host microseconds of one ``cuPointerGetAttribute`` (Triton's launcher calls it once per
    tensor argument), or None where libcuda cannot be loaded through ctypes."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    fn = libcuda.cuPointerGetAttribute
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    out = ctypes.c_uint64()
    device_pointer_attribute = 2       # CU_POINTER_ATTRIBUTE_DEVICE_POINTER
    if fn(ctypes.byref(out), device_pointer_attribute, ptr) != 0:
        return None
    start = time.perf_counter()
    for _ in range(iters):
        fn(ctypes.byref(out), device_pointer_attribute, ptr)
    return (time.perf_counter() - start) / iters * 1e6


class _Rows:
    """``launch_overheads``' table, each row printed once timed: a row that fails (this path has
    not run on every GPU stack) prints its error and the next rows still run."""

    def time(self, name: str, fn, iters: int = 2000) -> None:
        """Time ``fn`` (``_host_us``) as row ``name``."""
        try:
            self.record(name, _host_us(fn, iters))
        except Exception as exc:
            print(f"  {'failed':>12s}  {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)

    def record(self, name: str, us) -> None:
        print(f"  {us:9.2f} us  {name}" if us is not None else f"  {'-':>12s}  {name}", flush=True)


def launch_overheads() -> None:
    """Host cost of launches on this machine: an aten op, Triton kernels with 1 and 12 tensor
    arguments and with 48 integers more, the same launch through the compiled kernel's own runner
    (Triton's argument binding skipped), one cuPointerGetAttribute, the CUDA runtime queries and
    allocation every launch path makes (current device and stream, a device guard, a small
    torch.empty), the prefixkern ops called
    directly, through their custom ops and on a second Python thread (autograd's backward runs on
    its own), and a pure-Python loop (to compare this host's interpreter speed with others)."""
    import threading

    from prefixkern.ops.prefix_attention import _backward_launch, _forward_launch

    one_pointer, twelve_pointers, with_ints = _pointer_kernels()
    x = [torch.zeros(64, device="cuda") for _ in range(12)]
    ints = list(range(16, 16 + 47))
    rows = _Rows()
    print("\n== launch overheads (host microseconds per call)", flush=True)
    rows.time("aten add (out=)", lambda: torch.add(x[0], x[1], out=x[2]))
    rows.time("triton, 1 tensor", lambda: one_pointer[(1,)](x[0], 64, BLOCK=64))
    rows.time("triton, 12 tensors", lambda: twelve_pointers[(1,)](*x, 64, BLOCK=64))
    rows.time("triton, 12 tensors + 48 ints", lambda: with_ints[(1,)](*x, *ints, 64, BLOCK=64))
    compiled = with_ints[(1,)](*x, *ints, 64, BLOCK=64)
    # The pieces of a launch: Triton's argument binding and cache lookup alone (warmup: no
    # launch), the compiled kernel's own runner (no binding), and its C launcher given raw
    # pointers (ints: no data_ptr() call and no cuPointerGetAttribute per tensor).
    rows.time("  binding + cache lookup only (warmup)",
              lambda: with_ints.warmup(*x, *ints, 64, BLOCK=64, grid=(1,)))
    try:
        runner = compiled[(1, 1, 1)]
        rows.time("  compiled kernel's runner", lambda: runner(*x, *ints, 64, 64))
        stream = torch.cuda.current_stream().cuda_stream
        raw = [t.data_ptr() for t in x]
        launcher = compiled.run
        rows.time("  its C launcher, raw pointers",
                  lambda: launcher(1, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None,
                                   *raw, *ints, 64, 64))
    except Exception as exc:     # the calling convention differs between Triton versions
        print(f"  (compiled runner not timed: {type(exc).__name__}: {exc})")
    pointer_us = _cu_pointer_get_attribute_us(x[0].data_ptr())
    if pointer_us is not None:
        rows.record("cuPointerGetAttribute (ctypes)", pointer_us)
    # What every launch path also asks the CUDA runtime (Triton: device and stream; prefixkern's
    # launchers: the device guard and their output allocations).
    rows.time("torch.cuda.current_device()", torch.cuda.current_device)
    rows.time("torch.cuda.current_stream()", torch.cuda.current_stream)

    def device_guard():
        with torch.cuda.device(x[0].device):
            pass
    rows.time("with torch.cuda.device(x.device): pass", device_guard)
    rows.time("torch.empty(64, device='cuda')", lambda: torch.empty(64, device="cuda"))

    from prefixkern.kernels._launch import raw_pointer_launches

    fwd_args, bwd_args = attention_bench.op_args(attention_bench.SHAPES["seed-qwen"], "cuda", torch.bfloat16)
    with raw_pointer_launches(False):     # the plain launch, whatever this Triton's default
        rows.time("seed-qwen fwd launcher, direct", lambda: _forward_launch(*fwd_args), 300)
        rows.time("seed-qwen fwd, custom op", lambda: torch.ops.prefixkern.prefix_attention_fwd(*fwd_args), 300)
        rows.time("seed-qwen bwd launcher, direct", lambda: _backward_launch(*bwd_args), 300)
        rows.time("seed-qwen bwd, custom op", lambda: torch.ops.prefixkern.prefix_attention_bwd(*bwd_args), 300)
    with raw_pointer_launches():      # PREFIXKERN_RAW_LAUNCH=1
        rows.time("seed-qwen fwd launcher, raw pointers", lambda: _forward_launch(*fwd_args), 300)
        rows.time("seed-qwen bwd launcher, raw pointers", lambda: _backward_launch(*bwd_args), 300)
    timing = {}

    def on_thread():
        try:
            timing["us"] = _host_us(lambda: _backward_launch(*bwd_args), 300)
        except Exception as exc:
            print(f"  (second thread failed: {type(exc).__name__}: {exc})", flush=True)
    worker = threading.Thread(target=on_thread)
    worker.start()
    worker.join()
    rows.record("seed-qwen bwd launcher, second thread", timing.get("us"))

    start = time.perf_counter()
    for _ in range(20):
        sum(i * i for i in range(10_000))
    rows.record("pure Python: sum of 10k squares", (time.perf_counter() - start) / 20 * 1e6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+",
                        help="SUITE:SHAPE, e.g. attention:seed-qwen mlp:llama3-8b e2e:qwen2.5-0.5b generate:qwen2.5-0.5b "
                             "generate_static:qwen2.5-0.5b; "
                             "or 'launch' (launch overheads)")
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
        if case == "launch":
            launch_overheads()
            continue
        profile(case, args.pass_, getattr(torch, args.dtype), args.iters)
        if not args.no_host_split and not case.startswith(("e2e:", "generate:", "generate_static:", "mlp_p_rows:")):
            host_split(case, getattr(torch, args.dtype), args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())
