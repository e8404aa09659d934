"""Attention dropout, part of the attention suite: attention as GPT-2 trains it (``attn_pdrop`` =
0.1, the attention of the e2e suite's gpt2-medium step), forward and forward + backward, against
the baselines with their own dropout, and prefixkern with dropout off beside it (what the mask
costs: the kernels draw it in the forward and regenerate it in the backward).

prefixkern's result is checked against the oracle under the same keep mask (``dropout_keep_mask``
of the seed the op draws). The baselines draw their masks from torch's generator or their own
Philox, which the oracle cannot reproduce: each is checked with dropout off (the same call at
p = 0) and timed with it on, and its record's note says so.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.prefix_attention import prefix_attention
from .attention import Shape, _bool_mask, _concat, _repeat_kv, make_inputs
from .common import Options, Record, Skip

DROPOUT_P = 0.1     # GPT-2's attn_pdrop
# The e2e suite's gpt2-medium step (B=8, S=256, P=20), one layer's attention.
SHAPES = {"gpt2-medium-dropout": Shape("gpt2-medium-dropout", 16, 16, 64, 8, 256, 20)}
QUICK = ("gpt2-medium-dropout",)
CPU_SHAPES = {"cpu-tiny-dropout": Shape("cpu-tiny-dropout", 2, 2, 16, 2, 20, 7)}
# Seeds torch's generator before the checked call, so the oracle can draw the op's seed again.
CHECK_SEED = 20261128


# ---- implementations: (q, k, v, pk, pv, p) -> out ----

def prefixkern_dropout(q, k, v, pk, pv, p):
    return prefix_attention(q, k, v, pk, pv, causal=True, dropout_p=p)


def prefixkern_no_dropout(q, k, v, pk, pv, p):
    """The same op with dropout off, whatever ``p``: the row that prices the mask."""
    return prefix_attention(q, k, v, pk, pv, causal=True)


def eager(q, k, v, pk, pv, p):
    """HF GPT-2 ``eager`` under a PEFT prefix: concat, masked fp32 softmax, ``F.dropout``."""
    S, P, group = q.shape[2], pk.shape[1], q.shape[1] // k.shape[1]
    keys, values = _concat(k, v, pk, pv)
    keys, values = _repeat_kv(keys, group), _repeat_kv(values, group)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~_bool_mask(S, P, q.device), torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(F.dropout(probs, p=p, training=True), values)


def sdpa_mask(q, k, v, pk, pv, p):
    """HF ``sdpa`` under a PEFT prefix while training: an explicit mask and SDPA's dropout."""
    S, P, group = q.shape[2], pk.shape[1], q.shape[1] // k.shape[1]
    keys, values = _concat(k, v, pk, pv)
    return F.scaled_dot_product_attention(q, _repeat_kv(keys, group), _repeat_kv(values, group),
                                          attn_mask=_bool_mask(S, P, q.device), dropout_p=p)


def sdpa_lower_right(q, k, v, pk, pv, p):
    """SDPA's flash path with its dropout over the concatenated keys (bottom-right causal)."""
    from torch.nn.attention.bias import causal_lower_right

    S, P, group = q.shape[2], pk.shape[1], q.shape[1] // k.shape[1]
    keys, values = _concat(k, v, pk, pv)
    return F.scaled_dot_product_attention(q, _repeat_kv(keys, group), _repeat_kv(values, group),
                                          attn_mask=causal_lower_right(S, P + S), dropout_p=p)


def flash_attn(q, k, v, pk, pv, p):
    from flash_attn import flash_attn_func

    keys, values = _concat(k, v, pk, pv)
    out = flash_attn_func(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), dropout_p=p, causal=True)
    return out.transpose(1, 2)


IMPLS: dict[str, Callable] = {"prefixkern": prefixkern_dropout, "prefixkern_no_dropout": prefixkern_no_dropout,
                              "eager": eager, "sdpa_mask": sdpa_mask, "sdpa_lower_right": sdpa_lower_right,
                              "flash_attn": flash_attn}


def unavailable_here(impl: str, opts: Options, case: str | None = None) -> str | None:
    """Why ``impl`` cannot run here: the attention suite's reasons (flash-attn needs its package and
    a GPU); prefixkern_no_dropout runs wherever prefixkern does."""
    from .attention import unavailable

    return None if impl == "prefixkern_no_dropout" else unavailable(impl, opts, case)


def _drawn_seed(device) -> torch.Tensor:
    """The dropout seed ``prefix_attention`` draws right after ``torch.manual_seed(CHECK_SEED)``."""
    torch.manual_seed(CHECK_SEED)
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def oracle(shape: Shape, leaves, dout, p: float, with_grads: bool):
    """``(out, grads)`` of the float32 oracle under the keep mask prefixkern draws after
    ``torch.manual_seed(CHECK_SEED)`` (``p`` > 0), or without dropout (``p`` = 0)."""
    from ..kernels._attention_common import dropout_keep_mask

    keep = None
    if p > 0:
        keep = dropout_keep_mask(_drawn_seed(leaves[0].device), shape.B, shape.Hq, shape.S, shape.P, shape.S, p)
    ref_leaves = [leaf.detach().float().requires_grad_(with_grads) for leaf in leaves]
    with torch.set_grad_enabled(with_grads):
        out = reference.prefix_attention(*ref_leaves, causal=True, dropout_p=p, dropout_keep=keep)
    grads = None
    if with_grads:
        out.backward(dout.float())
        grads = [leaf.grad for leaf in ref_leaves]
    return out.detach(), grads


def checked_and_timed(impl: str, fn):
    """``(checked, timed, under_mask)`` for an implementation ``fn(*tensors, dropout_p)``: the call
    to check, the call to time (dropout on), and whether the check is against the oracle under
    prefixkern's own mask (``oracle(..., DROPOUT_P, ...)``) or without dropout (p = 0). prefixkern
    is checked with dropout, its seed drawn after ``torch.manual_seed(CHECK_SEED)``; the others'
    masks come from other generators, so they are checked with dropout off."""
    def timed(*tensors):
        return fn(*tensors, DROPOUT_P)

    if impl == "prefixkern":
        def checked(*tensors):
            torch.manual_seed(CHECK_SEED)
            return fn(*tensors, DROPOUT_P)
        return checked, timed, True
    return (lambda *tensors: fn(*tensors, 0.0)), timed, False


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    """The dropout cases, timed, checked and skipped as the attention suite does its own: prefixkern
    against the oracle under its own mask, prefixkern_no_dropout and the baselines at p = 0."""
    from .attention import attention_flops, measure, run_impls

    records, skips = [], []
    for name, shape in opts.select(SHAPES, CPU_SHAPES, QUICK):
        for pass_ in ("fwd", "fwd_bwd"):
            with_grads = pass_ == "fwd_bwd"
            leaves, dout = make_inputs(shape, opts.device, opts.dtype, with_grads)
            with_mask = oracle(shape, leaves, dout, DROPOUT_P, with_grads)
            without = oracle(shape, leaves, dout, 0.0, with_grads)
            flops = attention_flops(shape) * (3.5 if with_grads else 1.0)

            def measure_impl(impl, fn, shape=shape, pass_=pass_, leaves=leaves, dout=dout, with_mask=with_mask,
                             without=without, flops=flops):
                checked, timed, under_mask = checked_and_timed(impl, fn)
                ref_out, ref_grads = with_mask if under_mask else without
                if under_mask:
                    note = f"dropout_p={DROPOUT_P}, checked under its own mask"
                else:
                    note = ("dropout off, checked at p=0" if impl == "prefixkern_no_dropout"
                            else f"dropout_p={DROPOUT_P}, its own mask: checked at p=0")
                record = measure(opts, shape, pass_, impl, checked, leaves, dout, ref_out, ref_grads, flops,
                                 timed=timed)
                record.add_note(note)
                return record

            run_impls(opts, progress, name, pass_, IMPLS, unavailable_here, records, skips, measure_impl)
    return records, skips
