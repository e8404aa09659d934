"""Attention suite: prefix attention against every baseline of BENCHMARKS.md, forward and
forward+backward, each result checked against the reference in the same run; packed sequences
(``attention_packed``) against padding them; attention dropout as GPT-2 trains (``attention_dropout``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.prefix_attention import launched_tiles, prefix_attention
from . import attention_packed
from .common import (LAUNCH_PATH_ROWS, Options, Record, Skip, dtype_name, held, launch_path_skip, peak_mem_mb,
                     scaled_err, time_ms, with_raw_launch)


@dataclass(frozen=True)
class Shape:
    name: str
    Hq: int
    Hkv: int
    D: int
    B: int
    S: int
    P: int


SHAPES = {s.name: s for s in (
    Shape("seed-qwen", 14, 2, 64, 4, 256, 20),
    Shape("qwen-2k", 14, 2, 64, 2, 2048, 20),           # issue 4's Qwen2.5-0.5B rows at S = 2048
    Shape("seed-bloom", 16, 16, 64, 8, 256, 30),
    Shape("paper-gpt2", 16, 16, 64, 8, 512, 10),
    Shape("llama8b-2k", 32, 8, 128, 4, 2048, 64),
    Shape("llama8b-8k", 32, 8, 128, 1, 8192, 128),
    Shape("long-32k", 32, 8, 128, 1, 32768, 64),
)}
# Sweeps for the plots of BENCHMARKS.md: Llama-3-8B attention against sequence length (P = 64)
# and against prefix length (S = 2048).
SWEEP_S = {f"sweep-S{s}": Shape(f"sweep-S{s}", 32, 8, 128, max(1, 8192 // s), s, 64) for s in (512, 1024, 2048, 4096, 8192)}
SWEEP_P = {f"sweep-P{p}": Shape(f"sweep-P{p}", 32, 8, 128, 2, 2048, p) for p in (1, 16, 64, 128, 256)}
SHAPES.update(SWEEP_S)
SHAPES.update(SWEEP_P)
QUICK = ("seed-qwen", "llama8b-2k")
CPU_SHAPES = {s.name: s for s in (Shape("cpu-tiny-gqa", 4, 2, 32, 2, 24, 5), Shape("cpu-tiny-mha", 2, 2, 16, 1, 40, 18))}
BASELINES = ("eager", "sdpa_mask", "sdpa_lower_right", "sdpa_lower_right_gqa", "flex", "flash_attn")


def attention_flops(shape: Shape, causal: bool = True) -> float:
    """Forward FLOPs the mask lets through: 4 * B * Hq * D * (S * P + visible sequence pairs)."""
    pairs = shape.S * (shape.S + 1) // 2 if causal else shape.S * shape.S
    return 4.0 * shape.B * shape.Hq * shape.D * (shape.S * shape.P + pairs)


def make_inputs(shape: Shape, device, dtype, requires_grad: bool):
    """q/k/v as HF holds them ([B, S, H, D] transposed to [B, H, S, D] views); a batch-shared prefix."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    q = randn(shape.B, shape.S, shape.Hq, shape.D).transpose(1, 2)
    k = randn(shape.B, shape.S, shape.Hkv, shape.D).transpose(1, 2)
    v = randn(shape.B, shape.S, shape.Hkv, shape.D).transpose(1, 2)
    pk, pv = randn(shape.Hkv, shape.P, shape.D), randn(shape.Hkv, shape.P, shape.D)
    leaves = [t.requires_grad_(requires_grad) for t in (q, k, v, pk, pv)]
    dout = randn(shape.B, shape.Hq, shape.S, shape.D)
    return leaves, dout


def op_args(shape: Shape, device, dtype):
    """``(forward args, backward args)`` of the attention custom ops (and of their launchers) at
    ``shape``: causal, nothing optional. The diagnostics in benchmarks/ time the host side with them."""
    from ..ops.prefix_attention import _forward_launch

    (q, k, v, pk, pv), dout = make_inputs(shape, device, dtype, requires_grad=False)
    options = (True, shape.D ** -0.5, 0.0, None, None)
    forward = (q, k, v, pk, pv, None, None, None, None, *options, None, None, 0, 0)
    out, lse = _forward_launch(*forward)
    return forward, (dout, q, k, v, pk, pv, out, lse, None, None, None, None, *options, None, None, 0, 0)


# ---- baselines: each pays for the concatenation it needs ----

def _concat(k, v, pk, pv):
    batch = k.shape[0]
    return (torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), k], 2),
            torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), v], 2))


def _repeat_kv(x, group):
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _bool_mask(S, P, device):
    i = torch.arange(S, device=device)[:, None]
    j = torch.arange(P + S, device=device)[None, :]
    return (j < P) | (j - P <= i)


def eager(q, k, v, pk, pv):
    """What HF ``eager`` does under a PEFT prefix: concat, repeat_kv, additive mask, fp32 softmax."""
    S, P, group = q.shape[2], pk.shape[1], q.shape[1] // k.shape[1]
    keys, values = _concat(k, v, pk, pv)
    keys, values = _repeat_kv(keys, group), _repeat_kv(values, group)
    scores = torch.matmul(q, keys.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~_bool_mask(S, P, q.device), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, values)


def sdpa_mask(q, k, v, pk, pv):
    """What HF ``sdpa`` does under a PEFT prefix: an explicit mask, so no flash kernel."""
    S, P, group = q.shape[2], pk.shape[1], q.shape[1] // k.shape[1]
    keys, values = _concat(k, v, pk, pv)
    return F.scaled_dot_product_attention(q, _repeat_kv(keys, group), _repeat_kv(values, group),
                                          attn_mask=_bool_mask(S, P, q.device))


def sdpa_lower_right(q, k, v, pk, pv):
    from torch.nn.attention.bias import causal_lower_right

    S, P, group = q.shape[2], pk.shape[1], q.shape[1] // k.shape[1]
    keys, values = _concat(k, v, pk, pv)
    return F.scaled_dot_product_attention(q, _repeat_kv(keys, group), _repeat_kv(values, group),
                                          attn_mask=causal_lower_right(S, P + S))


def sdpa_lower_right_gqa(q, k, v, pk, pv):
    """The same with SDPA's own GQA (``enable_gqa``, torch >= 2.5) instead of repeat_kv copies;
    which of the two is faster depends on the backend SDPA can pick, so both are timed."""
    from torch.nn.attention.bias import causal_lower_right

    S, P = q.shape[2], pk.shape[1]
    keys, values = _concat(k, v, pk, pv)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=causal_lower_right(S, P + S),
                                          enable_gqa=q.shape[1] != k.shape[1])


_FLEX_CACHE: dict = {}


def flex(q, k, v, pk, pv):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, Hq, S, _ = q.shape
    P = pk.shape[1]
    key = (B, Hq, S, P, q.device)
    if key not in _FLEX_CACHE:
        def prefix_causal(b, h, q_idx, kv_idx):
            return (kv_idx < P) | (kv_idx - P <= q_idx)

        _FLEX_CACHE[key] = (create_block_mask(prefix_causal, None, None, S, P + S, device=q.device),
                            torch.compile(flex_attention, dynamic=False))
    block_mask, compiled = _FLEX_CACHE[key]
    keys, values = _concat(k, v, pk, pv)
    return compiled(q, keys, values, block_mask=block_mask, enable_gqa=k.shape[1] != Hq)


def flash_attn(q, k, v, pk, pv):
    from flash_attn import flash_attn_func

    keys, values = _concat(k, v, pk, pv)
    # flash-attn's causal mask is bottom-right aligned: the prefix is visible to every query.
    out = flash_attn_func(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), causal=True)
    return out.transpose(1, 2)


def prefixkern_impl(q, k, v, pk, pv):
    return prefix_attention(q, k, v, pk, pv, causal=True)


class SwitchedOffRow(NamedTuple):
    """A row of the same op with one of its kernel switches off, timed beside prefixkern at the
    shapes where the switch bites (at the tiles prefixkern's tuning chose)."""
    shapes: tuple[str, ...]
    gpu_only: str           # why the row is skipped without a GPU
    where: str              # what the shapes have in common
    setting: Callable[[], object]   # the context manager that turns the switch off


def _in_launch_order():
    from ..kernels._attention_common import heavy_first_scheduling

    return heavy_first_scheduling(False)


def _group_per_program():
    from ..kernels.prefix_attention_bwd import dkdv_head_splitting

    return dkdv_head_splitting(False)


def _two_launch_backward():
    from ..kernels.prefix_attention_bwd import one_launch_backward

    return one_launch_backward(False)


# prefixkern_in_order: causal programs in launch order (PREFIXKERN_HEAVY_FIRST=0): what launching the
# heaviest programs first gains, where the order is taken (K/V within the L2) and the grid is a few
# waves. prefixkern_group_per_program: each GQA group's heads in one dK/dV program
# (PREFIXKERN_DKDV_HEAD_SPLITS=0): what sharing the heads out gains where the dK/dV grid is too
# small for the GPU over long rows (Qwen2.5's two KV heads at S = 2048). prefixkern_two_launch_bwd:
# the backward as two launches, dQ then dK/dV (PREFIXKERN_ONE_LAUNCH_BACKWARD=0), at the seeds'
# host-bound rows of 256, where prefixkern's backward is one launch.
SWITCHED_OFF_ROWS = {
    "prefixkern_in_order": SwitchedOffRow(
        ("llama8b-2k", "llama8b-8k"), "the launch order is timed on a GPU (it changes nothing but speed)",
        "where the order is taken in a few waves", _in_launch_order),
    "prefixkern_group_per_program": SwitchedOffRow(
        ("qwen-2k",), "the dK/dV head splits are timed on a GPU (they change nothing but speed)",
        "where the dK/dV grid is small over long rows", _group_per_program),
    "prefixkern_two_launch_bwd": SwitchedOffRow(
        ("seed-qwen",), "the one-launch backward is timed on a GPU (it changes nothing but speed)",
        "where the backward is host-bound", _two_launch_backward),
}
# prefixkern_raw_launch / prefixkern_plain_launch: the same op on the launch path that is not the
# default here (PREFIXKERN_RAW_LAUNCH=1 or 0), its backward included: beside prefixkern, what the
# launch path costs one op (benchmarks/results/README.md).
IMPLS: dict[str, Callable] = {"prefixkern": prefixkern_impl, **{impl: prefixkern_impl for impl in LAUNCH_PATH_ROWS},
                              **{impl: prefixkern_impl for impl in SWITCHED_OFF_ROWS},
                              "eager": eager, "sdpa_mask": sdpa_mask,
                              "sdpa_lower_right": sdpa_lower_right, "sdpa_lower_right_gqa": sdpa_lower_right_gqa,
                              "flex": flex, "flash_attn": flash_attn}


def unavailable(impl: str, opts: Options, case: str | None = None) -> str | None:
    """Why a baseline cannot run here (for ``case``), or None."""
    if impl in LAUNCH_PATH_ROWS:
        return launch_path_skip(opts, impl)
    if impl in SWITCHED_OFF_ROWS:
        row = SWITCHED_OFF_ROWS[impl]
        if not opts.on_gpu:
            return row.gpu_only
        if case not in row.shapes:
            return f"timed at {' and '.join(row.shapes)} only, {row.where}"
    if impl == "sdpa_lower_right_gqa" and tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
        return f"torch {torch.__version__}'s SDPA has no enable_gqa (2.5+)"
    if impl == "flash_attn":
        try:
            import flash_attn  # noqa: F401
        except Exception as exc:
            return f"flash-attn not installed ({type(exc).__name__})"
        if not opts.on_gpu:
            return "flash-attn needs a GPU"
    if impl == "flex":
        if not opts.on_gpu:
            return "FlexAttention is compiled for the GPU; the CPU demo skips it"
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
        except Exception as exc:
            return f"torch {torch.__version__} has no FlexAttention ({exc})"
    return None


def reference_chunked(q, k, v, pk, pv, dout, with_grads: bool, budget_bytes: float = 4e9):
    """The oracle in float32, over chunks of query rows so long sequences fit in memory: rows
    [i0, i1) see the keys [0, i1) (bottom-right causal alignment keeps the mask right)."""
    B, Hq, S, D = q.shape
    P = pk.shape[1]
    rows = max(1, int(budget_bytes // (4 * 4 * B * Hq * (P + S))))
    qf, kf, vf, pkf, pvf = (t.detach().float() for t in (q, k, v, pk, pv))
    out = torch.empty_like(qf)
    grads = [torch.zeros_like(t) for t in (qf, kf, vf, pkf, pvf)] if with_grads else None
    for i0 in range(0, S, rows):
        i1 = min(S, i0 + rows)
        leaves = [qf[:, :, i0:i1].clone(), kf[:, :, :i1].clone(), vf[:, :, :i1].clone(), pkf.clone(), pvf.clone()]
        for leaf in leaves:
            leaf.requires_grad_(with_grads)
        with torch.set_grad_enabled(with_grads):
            chunk = reference.prefix_attention(*leaves, causal=True)
        out[:, :, i0:i1] = chunk.detach()
        if with_grads:
            chunk.backward(dout[:, :, i0:i1].float())
            grads[0][:, :, i0:i1] += leaves[0].grad
            grads[1][:, :, :i1] += leaves[1].grad
            grads[2][:, :, :i1] += leaves[2].grad
            grads[3] += leaves[3].grad
            grads[4] += leaves[4].grad
    return out, grads


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    records, skips = [], []
    for name, shape in opts.select(SHAPES, CPU_SHAPES, QUICK):
        for pass_ in ("fwd", "fwd_bwd"):
            with_grads = pass_ == "fwd_bwd"
            leaves, dout = make_inputs(shape, opts.device, opts.dtype, with_grads)
            ref_out, ref_grads = reference_chunked(*leaves, dout, with_grads)
            flops = attention_flops(shape) * (3.5 if with_grads else 1.0)
            run_impls(opts, progress, name, pass_, IMPLS, lambda impl, o, case=name: unavailable(impl, o, case),
                      records, skips,
                      lambda impl, fn: measure(opts, shape, pass_, impl, fn, leaves, dout, ref_out, ref_grads, flops))
    for part in (attention_packed, attention_dropout):
        part_records, part_skips = part.run(opts, progress)
        records += part_records
        skips += part_skips
    return records, skips


def run_impls(opts: Options, progress, name: str, pass_: str, impls: dict[str, Callable], unavailable,
              records: list[Record], skips: list[Skip], measure) -> None:
    """Measure each implementation the options want (``measure(impl, fn)`` -> Record); one that
    cannot run here is listed with its reason, once per case."""
    for impl, fn in impls.items():
        if not opts.wants(impl):
            continue
        progress(f"attention {name} {pass_} {impl}")
        reason = unavailable(impl, opts)
        if reason:
            if pass_ == "fwd":
                skips.append(Skip("attention", name, impl, reason))
            continue
        records.append(measure(impl, fn))


def measure(opts, shape, pass_, impl, fn, leaves, dout, ref_out, ref_grads, flops, timed=None) -> Record:
    """Time ``fn(*leaves)`` (with its backward for ``fwd_bwd``), check it against the oracle's
    ``ref_out``/``ref_grads`` and record it with the tiles autotuning chose. With ``timed``, the
    check calls ``fn`` and the timing and peak memory ``timed`` (the dropout cases: checked with
    a seeded mask or none, timed as they train)."""
    record = Record("attention", shape.name, impl, pass_, dtype_name(opts.dtype))
    with_grads = ref_grads is not None

    def calling(op):
        def call():
            for leaf in leaves:
                leaf.grad = None
            out = op(*leaves)
            if with_grads:
                out.backward(dout)
            return out
        if impl in LAUNCH_PATH_ROWS:     # (held through the backward too)
            return with_raw_launch(call, enabled=LAUNCH_PATH_ROWS[impl])
        if impl in SWITCHED_OFF_ROWS:
            return held(call, SWITCHED_OFF_ROWS[impl].setting)
        return call

    checked_call = calling(fn)
    call = checked_call if timed is None else calling(timed)
    try:
        launched_tiles()
        out = checked_call()
        tiles = launched_tiles()
        if tiles:   # the tiles autotuning chose, to read beside the timing
            record.note = "tiles " + " ".join(f"{name}={','.join(map(str, config))}" for name, config in tiles.items())
        record.max_err = scaled_err(out, ref_out)
        if with_grads:
            record.max_err = max(record.max_err, scaled_err([leaf.grad for leaf in leaves], ref_grads))
        record.ok = bool(record.max_err <= tolerance(opts.dtype))
        del out
        record.ms = time_ms(call, on_gpu=opts.on_gpu, quick=opts.quick)
        record.peak_mem_mb = peak_mem_mb(call, on_gpu=opts.on_gpu)
        if record.ms:
            record.tflops = flops / (record.ms * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        record.note = "out of memory"
        record.ok = None
        torch.cuda.empty_cache()
    except Exception as exc:       # a kernel or compiler failing
        record.fail(exc)
    return record


# Last: the dropout cases build on this module's shapes, inputs and baselines' pieces.
from . import attention_dropout  # noqa: E402
