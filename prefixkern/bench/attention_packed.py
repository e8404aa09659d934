"""Attention on packed sequences (cu_seqlens, no padding), part of the attention suite: what
packing buys over padding a batch of ragged sequences, for prefix attention.

Every implementation takes the packed tensors and returns the packed output, paying for any
layout it needs inside its timing: the padded ones scatter into ``[B, H, max_len, D]`` rows
and gather back (index copies, small next to the attention), flash-attn builds each
sequence's ``[prefix ; keys]``. TFLOP/s counts only the work of the real tokens (padding does
more). Each result is checked against the oracle in the same run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .. import reference
from ..ops.prefix_attention import prefix_attention, prefix_attention_varlen
from .common import Options, Record, Skip


@dataclass(frozen=True)
class PackedShape:
    name: str
    Hq: int
    Hkv: int
    D: int
    lengths: tuple[int, ...]
    P: int


def ragged_lengths(count: int, low: int, high: int, seed: int) -> tuple[int, ...]:
    """``count`` sequence lengths drawn uniformly from ``[low, high]`` (seeded: every run the same)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(int(x) for x in torch.randint(low, high + 1, (count,), generator=gen))


SHAPES = {s.name: s for s in (
    # The seeds' SFT recipe (max_length 256), 16 examples of 32-256 tokens packed.
    PackedShape("packed-qwen", 14, 2, 64, ragged_lengths(16, 32, 256, 0), 20),
    # Llama-3-8B attention, 8 documents of 256-2048 tokens.
    PackedShape("packed-llama8b", 32, 8, 128, ragged_lengths(8, 256, 2048, 1), 64),
)}
QUICK = ("packed-qwen",)
CPU_SHAPES = {"cpu-packed-tiny": PackedShape("cpu-packed-tiny", 4, 2, 32, (5, 17, 9), 5)}


def packed_flops(shape: PackedShape) -> float:
    """Forward FLOPs of the real tokens: per sequence 4 * Hq * D * (S * P + S (S + 1) / 2)."""
    return sum(4.0 * shape.Hq * shape.D * (s * shape.P + s * (s + 1) // 2) for s in shape.lengths)


def make_inputs(shape: PackedShape, device, dtype, requires_grad: bool):
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    total = sum(shape.lengths)
    q, k, v = randn(total, shape.Hq, shape.D), randn(total, shape.Hkv, shape.D), randn(total, shape.Hkv, shape.D)
    pk, pv = randn(shape.Hkv, shape.P, shape.D), randn(shape.Hkv, shape.P, shape.D)
    leaves = [t.requires_grad_(requires_grad) for t in (q, k, v, pk, pv)]
    cu = torch.tensor([0, *torch.tensor(shape.lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return leaves, randn(total, shape.Hq, shape.D), cu


class _Layout:
    """Index maps between the packed tokens and ``[B, max_len]`` padded rows (built once per shape)."""

    def __init__(self, cu: torch.Tensor):
        lengths = (cu[1:] - cu[:-1]).long()
        self.batch, self.max_len, self.total = lengths.numel(), int(lengths.max()), int(cu[-1])
        self.cu = cu
        seq = torch.repeat_interleave(torch.arange(self.batch, device=cu.device), lengths)
        pos = torch.arange(self.total, device=cu.device) - cu[:-1].long()[seq]
        self.slot = seq * self.max_len + pos          # packed token -> flat padded slot
        self.mask = torch.zeros(self.batch * self.max_len, dtype=torch.bool, device=cu.device)
        self.mask[self.slot] = True
        self.mask = self.mask.view(self.batch, self.max_len)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[total, H, D] -> [B, H, max_len, D] (zeros at padding)."""
        rows = x.new_zeros(self.batch * self.max_len, *x.shape[1:]).index_copy(0, self.slot, x)
        return rows.view(self.batch, self.max_len, *x.shape[1:]).transpose(1, 2)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, max_len, D] -> [total, H, D]."""
        return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[3]).index_select(0, self.slot)


_LAYOUTS: dict = {}


def _layout(cu: torch.Tensor) -> _Layout:
    key = (cu.device, tuple(cu.tolist()))
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _Layout(cu)
    return _LAYOUTS[key]


# ---- implementations: (q, k, v, pk, pv, cu) packed in, packed out ----

def prefixkern_varlen(q, k, v, pk, pv, cu):
    layout = _layout(cu)
    return prefix_attention_varlen(q, k, v, pk, pv, cu, cu, layout.max_len, layout.max_len, causal=True)


def prefixkern_padded(q, k, v, pk, pv, cu):
    """The same kernels on right-padded rows with a padding mask: what packing replaces."""
    layout = _layout(cu)
    out = prefix_attention(layout.pad(q), layout.pad(k), layout.pad(v), pk, pv, causal=True,
                           key_padding_mask=layout.mask)
    return layout.unpad(out)


def sdpa_mask(q, k, v, pk, pv, cu):
    """What HF ``sdpa`` does with a PEFT prefix on a padded batch: concatenated, repeated keys and an
    explicit mask (prefix visible, causal, padding hidden)."""
    layout = _layout(cu)
    qp, kp, vp = layout.pad(q), layout.pad(k), layout.pad(v)
    batch, group, P, S = layout.batch, q.shape[1] // k.shape[1], pk.shape[1], layout.max_len
    keys = torch.cat([pk.unsqueeze(0).expand(batch, -1, -1, -1), kp], 2).repeat_interleave(group, 1)
    values = torch.cat([pv.unsqueeze(0).expand(batch, -1, -1, -1), vp], 2).repeat_interleave(group, 1)
    i = torch.arange(S, device=q.device)[:, None]
    j = torch.arange(S, device=q.device)[None, :]
    seq_visible = (j <= i)[None] & layout.mask[:, None, :]
    visible = torch.cat([torch.ones(batch, S, P, dtype=torch.bool, device=q.device), seq_visible], -1)
    return layout.unpad(F.scaled_dot_product_attention(qp, keys, values, attn_mask=visible[:, None]))


def flash_attn_varlen(q, k, v, pk, pv, cu):
    """flash-attn's varlen kernel over each sequence's ``[prefix ; keys]`` (built here, per sequence)."""
    from flash_attn import flash_attn_varlen_func

    layout = _layout(cu)
    P, batch = pk.shape[1], layout.batch
    # Key slot of each packed token and of each sequence's prefix in the concatenated key tensor.
    seq = torch.repeat_interleave(torch.arange(batch, device=q.device), (cu[1:] - cu[:-1]).long())
    token_slot = torch.arange(layout.total, device=q.device) + (seq + 1) * P
    prefix_slot = (cu[:-1].long() + torch.arange(batch, device=q.device) * P)[:, None] + torch.arange(P, device=q.device)
    cu_k = (cu + torch.arange(batch + 1, device=q.device, dtype=cu.dtype) * P).to(torch.int32)

    def concat(x, prefix):
        out = x.new_empty(layout.total + batch * P, *x.shape[1:])
        out = out.index_copy(0, token_slot, x)
        return out.index_copy(0, prefix_slot.reshape(-1), prefix.transpose(0, 1).repeat(batch, 1, 1))

    return flash_attn_varlen_func(q, concat(k, pk), concat(v, pv), cu.to(torch.int32), cu_k, layout.max_len,
                                  layout.max_len + P, causal=True)


IMPLS: dict[str, Callable] = {"prefixkern": prefixkern_varlen, "prefixkern_padded": prefixkern_padded,
                              "sdpa_mask": sdpa_mask, "flash_attn": flash_attn_varlen}


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    """The packed cases, timed, checked and skipped (flash-attn) as the attention suite does its own."""
    from .attention import measure, run_impls, unavailable

    records, skips = [], []
    for name, shape in opts.select(SHAPES, CPU_SHAPES, QUICK):
        for pass_ in ("fwd", "fwd_bwd"):
            with_grads = pass_ == "fwd_bwd"
            leaves, dout, cu = make_inputs(shape, opts.device, opts.dtype, with_grads)
            ref_leaves = [leaf.detach().float().requires_grad_(with_grads) for leaf in leaves]
            with torch.set_grad_enabled(with_grads):
                ref_out = reference.prefix_attention_varlen(*ref_leaves, cu, cu, causal=True)
            ref_grads = None
            if with_grads:
                ref_out.backward(dout.float())
                ref_grads = [leaf.grad for leaf in ref_leaves]
            flops = packed_flops(shape) * (3.5 if with_grads else 1.0)
            run_impls(opts, progress, name, pass_, IMPLS, unavailable, records, skips,
                      lambda impl, fn: measure(opts, shape, pass_, impl, lambda *tensors: fn(*tensors, cu), leaves,
                                               dout, ref_out.detach(), ref_grads, flops))
    return records, skips
