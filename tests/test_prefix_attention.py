"""prefix_attention's Triton kernels against the plain-PyTorch oracle: output, log-sum-exp and all
five gradients.

On CPU the kernels run in Triton's interpreter (a representative subset, small shapes); on a GPU
(``pytest -m gpu``) the whole grid of the issue runs at full size.
"""
import itertools
import math
import random
import types
from dataclasses import dataclass, replace

import pytest

import torch

import prefixkern
from prefixkern import reference
from prefixkern._backend import lazy_modules, use_backend

from conftest import (HAS_CUDA, TOLERANCES, assert_same_values_and_gradients, record_launch_arguments, record_launches,
                      strided_view)


@dataclass(frozen=True)
class Case:
    B: int = 2
    Hq: int = 4
    Hkv: int = 2
    S: int = 17
    S_kv: int = 17
    P: int = 7
    D: int = 32
    dtype: torch.dtype = torch.float32
    causal: bool = True
    padding: str = "none"      # none | left | right | all (one row with every sequence key padded)
                               # | both (left and right) | holes (padding between real keys)
    prefix: str = "shared"     # shared | per_row | per_task
    alibi: bool = False
    softcap: float | None = None
    window: int | None = None

    def __str__(self):
        dt = str(self.dtype).replace("torch.", "")
        extras = [name for name, on in (("alibi", self.alibi), (f"cap{self.softcap}", self.softcap),
                                        (f"win{self.window}", self.window)) if on]
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-S{self.S}-Skv{self.S_kv}-P{self.P}-D{self.D}-{dt}-"
                f"{'causal' if self.causal else 'full'}-{self.padding}-{self.prefix}" + "".join("-" + e for e in extras))


def make_inputs(case: Case, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)

    q = randn(case.B, case.Hq, case.S, case.D)
    k = randn(case.B, case.Hkv, case.S_kv, case.D)
    v = randn(case.B, case.Hkv, case.S_kv, case.D)
    prefix_index = None
    if case.prefix == "shared":
        pk, pv = randn(case.Hkv, case.P, case.D), randn(case.Hkv, case.P, case.D)
    elif case.prefix == "per_row":
        pk, pv = randn(case.B, case.Hkv, case.P, case.D), randn(case.B, case.Hkv, case.P, case.D)
    else:
        tasks = 3
        pk, pv = randn(tasks, case.Hkv, case.P, case.D), randn(tasks, case.Hkv, case.P, case.D)
        prefix_index = (torch.arange(case.B) * 2 % tasks).to(device)
    mask = None
    if case.padding != "none":
        mask = torch.ones(case.B, case.S_kv, dtype=torch.bool)
        pad = max(1, case.S_kv // 3)
        if case.padding == "left":
            mask[0, :pad] = False
        elif case.padding == "right":
            mask[-1, case.S_kv - pad:] = False
        elif case.padding == "all":
            mask[0, :] = False
            mask[-1, :pad] = False
        elif case.padding == "both":          # a real range in the middle of the row
            mask[0, :pad] = False
            mask[0, case.S_kv - pad // 2:] = False
        elif case.padding == "holes":         # padding inside the real range: not contiguous
            mask[0, pad: case.S_kv: 3] = False
            mask[-1, case.S_kv // 2] = False
        mask = mask.to(device)
    slopes = None
    if case.alibi:
        slopes = torch.tensor([2 ** (-8 * (i + 1) / case.Hq) for i in range(case.Hq)], device=device)
    kwargs = dict(causal=case.causal, key_padding_mask=mask, prefix_index=prefix_index, alibi_slopes=slopes,
                  softcap=case.softcap, window=case.window)
    return (q, k, v, pk, pv), kwargs


def assert_close(actual, expected, dtype, kind, name):
    atol, rtol = TOLERANCES[dtype][kind]
    actual, expected = actual.float(), expected.float()
    if expected.numel() == 0:   # e.g. dK of an empty sequence
        assert actual.shape == expected.shape, name
        return
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    # Relative to the tensor's scale: gradients over long rows grow with S.
    err = (actual - expected).abs().max().item()
    bound = atol + rtol * expected.abs().max().item()
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def check_case(case: Case, device, grads=True):
    inputs, kwargs = make_inputs(case, device)
    leaves = [t.clone().requires_grad_(grads) for t in inputs]
    with use_backend("triton"):
        out, lse = prefixkern.prefix_attention(*leaves, return_lse=True, **kwargs)
    ref_leaves = [t.detach().clone().requires_grad_(grads) for t in inputs]
    ref_out, ref_lse = reference.prefix_attention(*ref_leaves, return_lse=True, **kwargs)
    exact_out = reference.prefix_attention(*[t.float() for t in inputs], **kwargs)
    assert_matches_oracle(out, lse, ref_out, ref_lse, leaves if grads else None, ref_leaves, case.dtype, exact_out)


def assert_matches_oracle(out, lse, ref_out, ref_lse, leaves, ref_leaves, dtype, exact_out=None):
    """Output and log-sum-exp within the dtype's tolerance (the same rows infinite); then, unless
    ``leaves`` is None, all five gradients of a random upstream gradient.

    ``exact_out``: the oracle's output before rounding to ``dtype`` (the reference on float32
    inputs). The kernels' backward takes each row's ``delta = rowsum(dO * O)`` from the output they
    stored, rounded to ``dtype``, as flash-attention does. Where a row's score gradients cancel
    (a row that sees one key, its output scaled off the dtype's grid by dropout's 1 / (1 - p))
    that rounding is all of the result. Given ``exact_out``, the oracle's gradients take the same
    delta (``delta_from_stored_output``) rather than the exact one."""
    assert out.shape == ref_out.shape and out.dtype == dtype and lse.shape == ref_lse.shape
    assert_close(out, ref_out, dtype, "out", "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert_close(lse[finite], ref_lse[finite], torch.float32 if dtype == torch.float32 else dtype, "out", "lse")
    if leaves is None:
        return
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=out.device, dtype=dtype)
    out.backward(dout)
    oracle_backward(ref_out, ref_lse, out, exact_out, dout)
    for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), leaves, ref_leaves):
        assert got.grad.shape == want.grad.shape and got.grad.dtype == want.grad.dtype, name
        assert_close(got.grad, want.grad, dtype, "grad", name)


def oracle_backward(ref_out, ref_lse, out, exact_out, dout):
    """The oracle's backward of ``dout``: in 16-bit with ``exact_out`` given, with each row's delta
    from the kernels' stored ``out`` (``delta_from_stored_output``); else the plain one."""
    if exact_out is not None and out.dtype != torch.float32:
        delta_from_stored_output(ref_out, ref_lse, out, exact_out, dout).backward()
    else:
        ref_out.backward(dout)


def delta_from_stored_output(ref_out, ref_lse, out, exact_out, dout):
    """A loss whose gradients are the oracle's with each row's delta taken from ``out`` (the
    kernels' stored output) instead of the exact output ``exact_out``: ``<dO, O_ref> - sum_i
    shift_i * lse_i`` with ``shift_i = rowsum(dO * (out - exact_out))`` held constant. The
    log-sum-exp's score gradient is the softmax, so the second term moves each score gradient
    dS_ij = P_ij (dP_ij - delta_i) by -P_ij shift_i: what delta_i + shift_i gives. (A row that
    sees no key has lse = -inf and shift 0; its masked scores pass no gradient on.)"""
    shift = ((out.detach().float() - exact_out.detach().float()) * dout.float()).sum(-1)
    if shift.shape != ref_lse.shape:        # packed rows: out [total, Hq, D], lse [Hq, total]
        shift = shift.transpose(0, 1)
    lse = torch.where(torch.isfinite(ref_lse), ref_lse, torch.zeros_like(ref_lse))
    return (ref_out.float() * dout.float()).sum() - (shift * lse).sum()


# --------------------------------------------------------------------------------------------
# The interpreter subset (CI): every feature once, on small shapes
# --------------------------------------------------------------------------------------------

BASE = Case()
CPU_CASES = [
    BASE,
    replace(BASE, causal=False),
    replace(BASE, S=1, S_kv=9, P=1),                       # a decoding step
    replace(BASE, S=5, S_kv=30, P=16),                      # chunked prefill, bottom-right causal
    replace(BASE, Hq=7, Hkv=1, P=18),                       # MQA, prefix across two blocks
    replace(BASE, Hq=4, Hkv=4, D=40),                       # MHA, head dim not a power of two
    replace(BASE, padding="left"),
    replace(BASE, padding="right", causal=False),
    replace(BASE, padding="all"),
    replace(BASE, prefix="per_row"),
    replace(BASE, prefix="per_task", B=3),
    replace(BASE, alibi=True, padding="left"),
    replace(BASE, softcap=5.0),
    replace(BASE, window=6),                                # the window moves past the prefix
    replace(BASE, window=12, S=8, S_kv=20),
    replace(BASE, dtype=torch.float16),
    replace(BASE, dtype=torch.bfloat16, padding="left", prefix="per_task"),
    replace(BASE, S=33, S_kv=40, P=2, causal=True, padding="right"),
    replace(BASE, S=40, S_kv=17, P=5, padding="left"),      # S > S_kv: early queries see only the prefix
    replace(BASE, S=5, S_kv=0, P=18, window=9),              # no sequence keys: the prefix alone
    # Padding over several key blocks: wholly padded blocks skipped, inner ones unmasked where the
    # real keys are contiguous, every block masked where they are not.
    replace(BASE, S=40, S_kv=50, P=5, padding="both"),
    replace(BASE, S=40, S_kv=50, padding="holes", causal=False, dtype=torch.bfloat16),
    replace(BASE, S=33, S_kv=33, padding="holes", window=9, prefix="per_row"),
]


# What rows of at most ONE_LAUNCH_MAX_QUERIES queries (every case here) do not take by default:
# the backward in two launches, dQ (storing delta = rowsum(dO * O)) then dK/dV (reading it).
TWO_LAUNCH_CPU_CASES = [
    BASE,
    replace(BASE, causal=False),
    replace(BASE, S=1, S_kv=9, P=1),
    replace(BASE, Hq=7, Hkv=1, P=18),
    replace(BASE, padding="all"),
    replace(BASE, prefix="per_task", B=3),
    replace(BASE, alibi=True, padding="left"),
    replace(BASE, softcap=5.0, window=6),
    replace(BASE, dtype=torch.bfloat16, padding="left", prefix="per_row"),
    replace(BASE, S=40, S_kv=17, P=5, padding="left"),
    replace(BASE, S=5, S_kv=0, P=18, window=9),
    replace(BASE, S=40, S_kv=50, padding="holes", causal=False, dtype=torch.float16),
]


@pytest.mark.parametrize("case", TWO_LAUNCH_CPU_CASES, ids=str)
def test_two_launch_backward_matches_reference(monkeypatch, case):
    """The two-launch backward (rows longer than ONE_LAUNCH_MAX_QUERIES take it): values and all
    five gradients against the oracle, and the launches it made."""
    from prefixkern.kernels import prefix_attention_bwd as bwd

    monkeypatch.setattr(bwd, "ONE_LAUNCH_MAX_QUERIES", 0)
    launched = _record_attention_launches(monkeypatch)
    check_case(case, torch.device("cuda" if HAS_CUDA else "cpu"))
    assert [name for name, _ in launched][-2:] == ["prefix_attention_bwd_dq_kernel", "prefix_attention_bwd_dkdv_kernel"]
    assert launched[-1][1]["WITH_DQ"] is False


def test_backward_in_one_launch_rule(monkeypatch):
    """One launch for the host-bound sizes (the seeds' training rows: Qwen2.5-0.5B, 4 rows of 256
    with P = 20), two for rows past ONE_LAUNCH_MAX_QUERIES or work past ONE_LAUNCH_MAX_WORK (Llama-3-8B
    heads at 2k tokens) and wherever PREFIXKERN_ONE_LAUNCH_BACKWARD=0 turned it off."""
    from prefixkern.kernels import prefix_attention_bwd as bwd

    def work(batch, heads, seq, prefix, head_dim):
        return batch * heads * seq * (prefix + seq) * head_dim

    bf16_d64, seed_qwen = (2, 64), work(4, 14, 256, 20, 64)
    assert bwd.backward_in_one_launch(256, seed_qwen, bf16_d64) and bwd.backward_in_one_launch(1, 64, bf16_d64)
    assert bwd.backward_in_one_launch(bwd.ONE_LAUNCH_MAX_QUERIES, work(1, 2, 512, 20, 64), bf16_d64)
    assert not bwd.backward_in_one_launch(bwd.ONE_LAUNCH_MAX_QUERIES + 1, work(1, 2, 513, 20, 64), bf16_d64)
    assert not bwd.backward_in_one_launch(256, work(8, 32, 256, 30, 128), (2, 128))      # 2.4e9
    assert not bwd.backward_in_one_launch(2048, work(1, 32, 2048, 30, 128), (2, 128))
    assert bwd.ONE_LAUNCH_MAX_QUERIES < bwd.DKDV_SPLIT_MIN_QUERIES    # (head splits are for longer rows)
    with bwd.one_launch_backward(False):
        assert not bwd.backward_in_one_launch(256, seed_qwen, bf16_d64)
    assert bwd.backward_in_one_launch(256, seed_qwen, bf16_d64)
    # Every 16-bit bucket and float32 up to D = 128 have spill-free tiles for it; float32 at 256 not.
    assert all(bwd.backward_in_one_launch(256, seed_qwen, (2, d)) for d in (64, 128, 256))
    assert not bwd.backward_in_one_launch(256, seed_qwen, (4, 256))


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_matches_reference(case):
    check_case(case, torch.device("cpu") if not HAS_CUDA else torch.device("cuda"))


def test_strided_inputs(device):
    """HF keeps q/k/v as [B, S, H, D] transposed views; the kernels read the strides as they are."""
    case = replace(BASE, padding="left")
    (q, k, v, pk, pv), kwargs = make_inputs(case, device)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_wide = torch.cat([v, v], -1)[..., : case.D]        # last-dim view with a row stride of 2D
    pk_t = pk.transpose(0, 1).contiguous().transpose(0, 1)
    assert not q_t.is_contiguous() and not v_wide.is_contiguous()
    with use_backend("triton"):
        out = prefixkern.prefix_attention(q_t, k_t, v_wide, pk_t, pv, **kwargs)
    ref = reference.prefix_attention(q, k, v, pk, pv, **kwargs)
    assert_close(out, ref, case.dtype, "out", "out")


def test_fully_padded_row_is_finite_and_sees_only_the_prefix(device):
    case = replace(BASE, padding="all")
    (q, k, v, pk, pv), kwargs = make_inputs(case, device)
    with use_backend("triton"):
        out = prefixkern.prefix_attention(q, k, v, pk, pv, **kwargs)
    prefix_only = reference.prefix_attention(q[:1], k[:1, :, :0], v[:1, :, :0], pk, pv, causal=False)
    assert torch.isfinite(out).all()
    assert_close(out[:1], prefix_only, case.dtype, "out", "row 0")


@pytest.mark.parametrize("causal", [True, False])
def test_key_blocks_wholly_in_padding_are_never_read(device, causal):
    """The kernels skip the key blocks outside each row's real keys, forward and backward: NaNs
    written there change nothing (a block that was read would turn them into NaN outputs and
    gradients, 0 * NaN being NaN), and the skipped keys get zero gradients. Padding on multiples
    of 128 keys, a whole block at every tile size of the tables."""
    case = replace(BASE, S=16, S_kv=384, P=5, causal=causal)
    (q, k, v, pk, pv), _ = make_inputs(case, device)
    mask = torch.ones(case.B, case.S_kv, dtype=torch.bool, device=device)
    mask[0, 256:] = False                   # right-padded row
    mask[1, :128] = False                   # left-padded row
    mask[1, 200] = False                    # and a hole between its real keys
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for t in (poisoned_k, poisoned_v):
        t[0, :, 256:] = float("nan")
        t[1, :, :128] = float("nan")
    leaves = [t.clone().requires_grad_() for t in (q, poisoned_k, poisoned_v, pk, pv)]
    with use_backend("triton"):
        out, lse = prefixkern.prefix_attention(*leaves, causal=causal, key_padding_mask=mask, return_lse=True)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    ref_out, ref_lse = reference.prefix_attention(*ref_leaves, causal=causal, key_padding_mask=mask,
                                                  return_lse=True)
    assert_matches_oracle(out, lse, ref_out, ref_lse, leaves, ref_leaves, case.dtype)
    assert not leaves[1].grad[~mask[:, None, :, None].expand_as(k)].any()


def test_no_visible_key_gives_zero_and_minus_inf_lse(device):
    """A window shorter than the distance to every key leaves nothing to attend to."""
    case = replace(BASE, S=4, S_kv=4, P=3, padding="none", window=1)
    (q, k, v, pk, pv), kwargs = make_inputs(case, device)
    kwargs["key_padding_mask"] = torch.zeros(case.B, case.S_kv, dtype=torch.bool, device=device)
    with use_backend("triton"):
        out, lse = prefixkern.prefix_attention(q, k, v, pk, pv, return_lse=True, **kwargs)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isinf(lse).all() and (lse < 0).all()


# --------------------------------------------------------------------------------------------
# Packed sequences (prefix_attention_varlen): every sequence against the oracle run on it alone
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PackedCase:
    lens_q: tuple[int, ...] = (5, 17, 1, 9)
    lens_kv: tuple[int, ...] | None = None     # None: self-attention, the queries' own lengths
    Hq: int = 4
    Hkv: int = 2
    P: int = 7
    D: int = 32
    dtype: torch.dtype = torch.float32
    causal: bool = True
    prefix: str = "shared"
    alibi: bool = False
    softcap: float | None = None
    window: int | None = None

    def __post_init__(self):
        if self.lens_kv is None:
            object.__setattr__(self, "lens_kv", self.lens_q)

    def __str__(self):
        dt = str(self.dtype).replace("torch.", "")
        extras = [name for name, on in (("alibi", self.alibi), (f"cap{self.softcap}", self.softcap),
                                        (f"win{self.window}", self.window)) if on]
        lens = "_".join(map(str, self.lens_q)) + ("" if self.lens_kv == self.lens_q else
                                                  "-kv" + "_".join(map(str, self.lens_kv)))
        return (f"packed{lens}-H{self.Hq}/{self.Hkv}-P{self.P}-D{self.D}-{dt}-{'causal' if self.causal else 'full'}-"
                f"{self.prefix}" + "".join("-" + e for e in extras))


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def make_packed_inputs(case: PackedCase, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)

    batch = len(case.lens_q)
    q = randn(sum(case.lens_q), case.Hq, case.D)
    k = randn(sum(case.lens_kv), case.Hkv, case.D)
    v = randn(sum(case.lens_kv), case.Hkv, case.D)
    prefix_index = None
    if case.prefix == "shared":
        pk, pv = randn(case.Hkv, case.P, case.D), randn(case.Hkv, case.P, case.D)
    elif case.prefix == "per_row":
        pk, pv = randn(batch, case.Hkv, case.P, case.D), randn(batch, case.Hkv, case.P, case.D)
    else:
        pk, pv = randn(3, case.Hkv, case.P, case.D), randn(3, case.Hkv, case.P, case.D)
        prefix_index = (torch.arange(batch) * 2 % 3).to(device)
    slopes = None
    if case.alibi:
        slopes = torch.tensor([2 ** (-8 * (i + 1) / case.Hq) for i in range(case.Hq)], device=device)
    kwargs = dict(causal=case.causal, prefix_index=prefix_index, alibi_slopes=slopes, softcap=case.softcap,
                  window=case.window)
    return (q, k, v, pk, pv), _cu_seqlens(case.lens_q, device), _cu_seqlens(case.lens_kv, device), kwargs


def check_packed_case(case: PackedCase, device, dropout_p: float = 0.0, dropout_keep: list | None = None,
                      strided_index: bool = False):
    """``prefix_attention_varlen`` against the oracle: values, LSE and five gradients. With
    ``dropout_p``, the oracle applies ``dropout_keep`` (one mask per sequence: the caller draws
    them for the seed the op will draw); ``strided_index``: the op gets cu_seqlens and prefix_index
    as strided views."""
    inputs, cu_q, cu_k, kwargs = make_packed_inputs(case, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    op_cu, op_kwargs = (cu_q, cu_k), kwargs
    if strided_index:
        op_cu = (strided_view(cu_q), strided_view(cu_k))
        op_kwargs = dict(kwargs, prefix_index=None if kwargs["prefix_index"] is None else
                         strided_view(kwargs["prefix_index"]))
    with use_backend("triton"):
        out, lse = prefixkern.prefix_attention_varlen(*leaves, *op_cu, max(case.lens_q), max(case.lens_kv),
                                                      return_lse=True, dropout_p=dropout_p, **op_kwargs)
    ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_out, ref_lse = reference.prefix_attention_varlen(*ref_leaves, cu_q, cu_k, return_lse=True, dropout_p=dropout_p,
                                                         dropout_keep=dropout_keep, **kwargs)
    exact_out = reference.prefix_attention_varlen(*[t.float() for t in inputs], cu_q, cu_k, dropout_p=dropout_p,
                                                  dropout_keep=dropout_keep, **kwargs)
    assert lse.shape == (case.Hq, sum(case.lens_q))
    assert_matches_oracle(out, lse, ref_out, ref_lse, leaves, ref_leaves, case.dtype, exact_out)


PACKED_BASE = PackedCase()
PACKED_CPU_CASES = [
    PACKED_BASE,
    replace(PACKED_BASE, causal=False, prefix="per_row"),
    replace(PACKED_BASE, lens_q=(3, 0, 20), lens_kv=(9, 4, 20)),        # an empty sequence; keys longer than queries
    replace(PACKED_BASE, lens_q=(6, 11), lens_kv=(2, 0), window=5),       # S > S_kv; a sequence with no keys
    replace(PACKED_BASE, prefix="per_task", alibi=True, Hq=6, Hkv=3),
    replace(PACKED_BASE, softcap=5.0, window=8, dtype=torch.bfloat16),
    replace(PACKED_BASE, Hq=7, Hkv=1, P=18, D=40, dtype=torch.float16),
]


@pytest.mark.parametrize("case", PACKED_CPU_CASES, ids=str)
def test_packed_matches_reference(case):
    check_packed_case(case, torch.device("cuda" if HAS_CUDA else "cpu"))


def _record_attention_launches(monkeypatch) -> list:
    """``(kernel name, constexprs)`` of every attention-kernel launch from now on."""
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd

    return record_launches(monkeypatch, (fwd, bwd))


# Heaviest first with the backward in one launch, launch order with two (one case count for both
# axes; the GPU grid and the fuzzer cross them).
@pytest.mark.parametrize("heavy_first,one_launch", [(True, True), (False, False)],
                         ids=["heavy_first-one_launch_backward", "launch_order-two_launch_backward"])
@pytest.mark.parametrize("case", [replace(BASE, B=3, Hq=6, Hkv=2, S=40, S_kv=50, P=5, padding="left"),
                                  replace(BASE, S=33, S_kv=40, prefix="per_row", dtype=torch.bfloat16),
                                  PackedCase(lens_q=(3, 0, 20), lens_kv=(9, 4, 20), Hq=6, Hkv=3)], ids=str)
def test_causal_programs_in_either_order(monkeypatch, case, heavy_first, one_launch, device):
    """Causal launches take their programs heaviest first (the last query blocks of every head and
    row for the forward and dQ, the first key blocks for dK/dV) or in launch order: either way every
    block has exactly one program. Several query and key blocks, GQA, padding, a per-row prefix,
    packed rows (one empty, whose programs return at once): values and gradients against the
    oracle, and every launch in the order asked. The backward in one launch (the dQ programs inside
    the dK/dV launch) and in two. (On a GPU the same shapes with 8x the tokens: it takes the order
    from MIN_HEAVY_FIRST_QUERIES queries on.)"""
    from prefixkern.kernels._attention_common import heavy_first_scheduling
    from prefixkern.kernels.prefix_attention_bwd import one_launch_backward

    if device.type == "cuda":
        if isinstance(case, PackedCase):
            case = replace(case, lens_q=tuple(8 * n for n in case.lens_q), lens_kv=tuple(8 * n for n in case.lens_kv))
        else:
            case = replace(case, S=8 * case.S, S_kv=8 * case.S_kv)
    launched = _record_attention_launches(monkeypatch)
    with heavy_first_scheduling(heavy_first), one_launch_backward(one_launch):
        if isinstance(case, PackedCase):
            check_packed_case(case, device)
        else:
            check_case(case, device)
    assert [name for name, _ in launched] == ["prefix_attention_fwd_kernel"] + (
        [] if one_launch else ["prefix_attention_bwd_dq_kernel"]) + ["prefix_attention_bwd_dkdv_kernel"]
    assert launched[-1][1]["WITH_DQ"] is one_launch
    assert all(meta["HEAVY_FIRST"] is heavy_first for _, meta in launched)


@pytest.mark.parametrize("splits", [2, 3, 6])
@pytest.mark.parametrize("case", [replace(BASE, B=2, Hq=6, Hkv=1, S=40, S_kv=50, P=5, padding="left"),
                                  replace(BASE, Hq=6, Hkv=2, prefix="per_task", B=3, window=9, alibi=True),
                                  PackedCase(lens_q=(3, 0, 20), lens_kv=(9, 4, 20), Hq=6, Hkv=1, softcap=5.0)],
                         ids=str)
def test_dkdv_head_splits(monkeypatch, case, splits, device):
    """The sequence dK/dV with the GQA group's heads shared out among 2, 3 or 6 programs (each a
    float32 partial, summed by the launcher): values and every gradient against the oracle, with
    padding, several key blocks, MQA, per-task prefixes, a window, ALiBi, soft-capping and packed
    rows (one empty). (Dropout with head splits: test_dropout_forward_and_backward_match_the_mask.)"""
    from prefixkern.kernels import prefix_attention_bwd as bwd

    if (case.Hq // case.Hkv) % splits:
        pytest.skip("the splits share a group's heads evenly: a divisor of the group only")
    monkeypatch.setattr(bwd, "dkdv_head_splits", lambda group, programs, seq_len_q, sms: splits)
    # The backward in one launch with 2 and 6 splits, in two (dQ first, as at the long rows where
    # the rule splits) with 3.
    monkeypatch.setattr(bwd, "ONE_LAUNCH_BACKWARD", splits != 3)
    launched = _record_attention_launches(monkeypatch)
    if isinstance(case, PackedCase):
        check_packed_case(case, device)
    else:
        check_case(case, device)
    assert [(meta["HEAD_SPLITS"], meta["WITH_DQ"]) for name, meta in launched
            if name == "prefix_attention_bwd_dkdv_kernel"] == [(splits, splits != 3)]


@pytest.mark.parametrize("case,splits,one_launch,dropout_p", [
    (replace(BASE, B=2, Hq=6, Hkv=1, S=24, S_kv=34, P=5, padding="left"), 3, True, 0.0),
    (replace(BASE, B=2, prefix="per_task", padding="holes", window=9), 1, False, 0.2),
    (PackedCase(lens_q=(3, 0, 20), lens_kv=(9, 4, 20), Hq=6, Hkv=1, softcap=5.0, prefix="per_row"), 2, True, 0.0),
], ids=lambda x: str(x) if isinstance(x, (Case, PackedCase)) else repr(x))
def test_backward_writes_what_it_reads_and_is_bitwise_deterministic(monkeypatch, case, splits, one_launch, dropout_p,
                                                                     device):
    """Under torch's deterministic mode with uninitialised memory filled (``torch.empty`` gives NaN),
    forward and backward twice: nothing NaN (every buffer the kernels read is written first: the
    prefix gradient's float32 partials, the dK/dV head splits' parts, dQ's delta, the output rows
    of padded queries) and the second run equal to the first bit for bit (no atomics: the result
    does not depend on the order the programs run in, which on a GPU varies from run to run).
    Shared, per-task and per-row prefixes, head splits, one launch and two, dropout, packed rows
    (one empty). On a GPU at 8x the tokens."""
    from prefixkern.kernels import prefix_attention_bwd as bwd

    if device.type == "cuda":
        case = (replace(case, lens_q=tuple(8 * n for n in case.lens_q), lens_kv=tuple(8 * n for n in case.lens_kv))
                if isinstance(case, PackedCase) else replace(case, S=8 * case.S, S_kv=8 * case.S_kv))
    monkeypatch.setattr(bwd, "dkdv_head_splits", lambda group, programs, seq_len_q, sms: splits)
    monkeypatch.setattr(bwd, "ONE_LAUNCH_BACKWARD", one_launch)
    if isinstance(case, PackedCase):
        inputs, cu_q, cu_k, kwargs = make_packed_inputs(case, device)

        def op(*leaves):
            return prefixkern.prefix_attention_varlen(*leaves, cu_q, cu_k, max(case.lens_q), max(case.lens_kv),
                                                      return_lse=True, dropout_p=dropout_p, **kwargs)
    else:
        inputs, kwargs = make_inputs(case, device)

        def op(*leaves):
            return prefixkern.prefix_attention(*leaves, return_lse=True, dropout_p=dropout_p, **kwargs)

    def run():
        leaves = [t.clone().requires_grad_() for t in inputs]
        torch.manual_seed(5)              # (the dropout seed: the same mask both times)
        with use_backend("triton"):
            out, lse = op(*leaves)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
        return [out, lse] + [t.grad for t in leaves]

    launched = _record_attention_launches(monkeypatch)
    deterministic, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    names = ("out", "lse", "dq", "dk", "dv", "dprefix_k", "dprefix_v")
    for name, a, b in zip(names, first, second):
        assert not torch.isnan(a).any(), f"{name}: NaN (an unwritten buffer read)"
        assert torch.equal(a, b), f"{name}: differs between two runs"
    dkdv = [meta for name, meta in launched if name == "prefix_attention_bwd_dkdv_kernel"]
    assert [(meta["HEAD_SPLITS"], meta["WITH_DQ"]) for meta in dkdv] == [(splits, one_launch)] * 2


@pytest.mark.gpu
def test_gpu_dkdv_head_splits_at_qwen_training_rows(monkeypatch):
    """Qwen2.5-0.5B's attention at issue 4's S = 2048 rows (batch 2, 14 query heads over 2 KV
    heads, head dim 64, bf16, causal, a shared prefix of 30): the dK/dV launch shares each group's
    7 heads out among programs (the rule, on this GPU) and every gradient matches the launch that
    keeps a group per program, up to the float32 partials' summation order."""
    from prefixkern.kernels import prefix_attention_bwd as bwd

    case = Case(B=2, Hq=14, Hkv=2, S=2048, S_kv=2048, P=30, D=64, dtype=torch.bfloat16)
    inputs, kwargs = make_inputs(case, "cuda")
    dout = torch.randn(case.B, case.Hq, case.S, case.D, device="cuda", dtype=case.dtype)
    grads = []
    for split in (True, False):
        if not split:
            monkeypatch.setattr(bwd, "DKDV_SPLIT_MIN_QUERIES", 1 << 30)
        launched = _record_attention_launches(monkeypatch)
        leaves = [t.clone().requires_grad_() for t in inputs]
        prefixkern.prefix_attention(*leaves, **kwargs).backward(dout)
        splits = [meta["HEAD_SPLITS"] for name, meta in launched if name == "prefix_attention_bwd_dkdv_kernel"]
        assert (splits[-1] > 1) == split, splits
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), *grads):
        assert_close(got, want, case.dtype, "grad", name)


def test_dkdv_head_splits_rule():
    """Splits only where the sequence programs leave SMs idle over long rows: the smallest divisor
    of the group that gives every SM a program (Qwen2.5-0.5B at S = 2048, batch 2, 128-key
    blocks: 64 programs, group 7 -> 7; Qwen2.5-7B's group of 7 over 4 KV heads: 128 -> 7 also,
    as 7 is prime; a group of 4 with 40 programs -> 4, with 100 -> 2); none for MHA, short rows or
    a full grid."""
    from prefixkern.kernels.prefix_attention_bwd import DKDV_SPLIT_MIN_QUERIES, dkdv_head_splits

    assert dkdv_head_splits(7, 64, 2048, 132) == 7
    assert dkdv_head_splits(7, 128, 2048, 132) == 7
    assert dkdv_head_splits(4, 40, 2048, 132) == 4 and dkdv_head_splits(4, 100, 2048, 132) == 2
    assert dkdv_head_splits(6, 50, 4096, 132) == 3
    assert dkdv_head_splits(1, 8, 2048, 132) == 1
    assert dkdv_head_splits(7, 64, DKDV_SPLIT_MIN_QUERIES - 1, 132) == 1      # seed shapes: host-bound
    assert dkdv_head_splits(4, 132, 8192, 132) == 1


def test_heavy_first_only_for_causal_launches_whose_kv_fit_the_l2(monkeypatch):
    """The rule: causal, the setting on, and on a GPU K and V within its L2 cache (beyond, the
    programs running at once would stream every head's K/V from memory); the interpreter always
    (the order does not change results)."""
    from types import SimpleNamespace

    from prefixkern.kernels import _attention_common as common

    monkeypatch.setattr(common, "l2_bytes", lambda index: 50 << 20)
    monkeypatch.setattr(common, "HEAVY_FIRST", True)

    def keys(elements, kind="cuda"):
        return SimpleNamespace(device=torch.device(kind, 0) if kind == "cuda" else torch.device(kind),
                               numel=lambda: elements, element_size=lambda: 2)

    llama8b_8k, long_32k = keys(8 * 8192 * 128), keys(8 * 32768 * 128)       # 16 and 64 MiB each of K, V
    assert common.heavy_first(True, llama8b_8k, 1, 8192) and not common.heavy_first(True, long_32k, 1, 32768)
    assert not common.heavy_first(False, llama8b_8k, 1, 8192)
    assert common.heavy_first(True, keys(1 << 40, "cpu"), 1, 8192)
    # One or two query blocks: nothing to balance (and the short-query tiles keep one compiled order).
    assert not common.heavy_first(True, llama8b_8k, 64, 64)
    # The heavy-first grid puts rows and query blocks on grid.y and grid.z (at most 65535 each).
    assert not common.heavy_first(True, keys(16, "cpu"), 70000, 1)
    assert not common.heavy_first(True, keys(16, "cpu"), 1, 16 * 65536)
    with common.heavy_first_scheduling(False):
        assert not common.heavy_first(True, llama8b_8k, 1, 8192)


def test_packed_equals_dense_rows(device):
    """Packing is only a layout: the same sequences, padded into [B, H, S, D] rows with a padding
    mask on the right, give the same outputs and gradients."""
    case = PACKED_BASE
    (q, k, v, pk, pv), cu_q, cu_k, _ = make_packed_inputs(case, device)
    longest = max(case.lens_q)
    dense_q = torch.zeros(len(case.lens_q), case.Hq, longest, case.D, device=device)
    dense_k = torch.zeros(len(case.lens_q), case.Hkv, longest, case.D, device=device)
    dense_v = torch.zeros_like(dense_k)
    mask = torch.zeros(len(case.lens_q), longest, dtype=torch.bool, device=device)
    for b, (lo, hi) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:])):
        dense_q[b, :, : hi - lo] = q[lo:hi].transpose(0, 1)
        dense_k[b, :, : hi - lo] = k[lo:hi].transpose(0, 1)
        dense_v[b, :, : hi - lo] = v[lo:hi].transpose(0, 1)
        mask[b, : hi - lo] = True
    with use_backend("triton"):
        # Right padding leaves every real query at its own position under bottom-right causality
        # only when the row is full; compare without causality, where position plays no part.
        packed = prefixkern.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, longest, longest, causal=False)
        dense = prefixkern.prefix_attention(dense_q, dense_k, dense_v, pk, pv, key_padding_mask=mask, causal=False)
    for b, (lo, hi) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:])):
        assert_close(packed[lo:hi], dense[b, :, : hi - lo].transpose(0, 1), case.dtype, "out", f"sequence {b}")


def test_packed_strided_inputs_and_int64_offsets(device):
    """Packed q/k/v as views into one fused [total, 3, H, D] QKV tensor (no copies), with int64
    cu_seqlens: the kernels read the strides and offsets as given."""
    case = replace(PACKED_BASE, Hq=4, Hkv=4)
    (q, k, v, pk, pv), cu_q, cu_k, kwargs = make_packed_inputs(case, device)
    qkv = torch.stack([q, k, v], dim=1)
    q_v, k_v, v_v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q_v.is_contiguous()
    longest = max(case.lens_q)
    with use_backend("triton"):
        out = prefixkern.prefix_attention_varlen(q_v, k_v, v_v, pk, pv, cu_q.long(), cu_k.long(), longest, longest,
                                                 **kwargs)
    ref = reference.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, **kwargs)
    assert_close(out, ref, case.dtype, "out", "out")


def test_strided_index_vectors(device):
    """prefix_index and cu_seqlens as strided views (every other entry of a wider tensor): the same
    values and gradients as contiguous ones (the kernels read them at unit stride, so strided ones
    read other rows' entries until 2026-11-28)."""
    case = replace(BASE, B=3, prefix="per_task", padding="left")
    inputs, kwargs = make_inputs(case, device)
    strided = {**kwargs, "prefix_index": strided_view(kwargs["prefix_index"])}
    assert not strided["prefix_index"].is_contiguous()
    packed_case = replace(PACKED_BASE, prefix="per_task")
    packed_inputs, cu_q, cu_k, packed_kwargs = make_packed_inputs(packed_case, device)
    packed_strided = {**packed_kwargs, "prefix_index": strided_view(packed_kwargs["prefix_index"])}
    longest = (max(packed_case.lens_q), max(packed_case.lens_kv))
    runs = []
    for dense_kwargs, packed_args in ((kwargs, (cu_q, cu_k, packed_kwargs)),
                                      (strided, (strided_view(cu_q), strided_view(cu_k), packed_strided))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        packed_leaves = [t.clone().requires_grad_() for t in packed_inputs]
        with use_backend("triton"):
            out = prefixkern.prefix_attention(*leaves, **dense_kwargs)
            packed_out = prefixkern.prefix_attention_varlen(*packed_leaves, *packed_args[:2], *longest, **packed_args[2])
        out.backward(torch.ones_like(out))
        packed_out.backward(torch.ones_like(packed_out))
        runs.append([out, packed_out] + [t.grad for t in leaves + packed_leaves])
    for got, want in zip(*runs):
        assert torch.equal(got, want)


def packed_dropout_keep(seed: torch.Tensor, case: PackedCase, p: float) -> list[torch.Tensor]:
    """The keep masks of a packed launch with dropout ``p`` under ``seed``, one ``[1, Hq, S_b, P +
    S_kv_b]`` per sequence: sequence b draws the mask a dense launch draws for batch row b with
    its own lengths."""
    from prefixkern.kernels._attention_common import dropout_keep_mask

    batch = len(case.lens_q)
    return [dropout_keep_mask(seed, batch, case.Hq, s, case.P, s_kv, p)[b:b + 1]
            for b, (s, s_kv) in enumerate(zip(case.lens_q, case.lens_kv))]


def test_packed_dropout_matches_the_mask(device):
    """Sequence b draws the mask a dense launch draws for batch row b with its own lengths."""
    case = replace(PACKED_BASE, lens_q=(5, 12, 3), lens_kv=(9, 12, 3))
    p = 0.3
    (q, k, v, pk, pv), cu_q, cu_k, kwargs = make_packed_inputs(case, device)
    seed = torch.tensor([12345], dtype=torch.int64, device=device)
    keep = packed_dropout_keep(seed, case, p)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    out, _ = torch.ops.prefixkern.prefix_attention_fwd(
        *leaves, None, None, None, seed, True, 1 / math.sqrt(case.D), p, None, None, cu_q, cu_k,
        max(case.lens_q), max(case.lens_kv))
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    ref = reference.prefix_attention_varlen(*ref_leaves, cu_q, cu_k, dropout_p=p, dropout_keep=keep, **kwargs)
    assert_close(out, ref, case.dtype, "out", "out")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout)
    for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), leaves, ref_leaves):
        assert_close(got.grad, want.grad, case.dtype, "grad", name)


def test_packed_reference_backend_for_cpu_tensors_by_default():
    (q, k, v, pk, pv), cu_q, cu_k, kwargs = make_packed_inputs(PACKED_BASE, torch.device("cpu"))
    longest = max(PACKED_BASE.lens_q)
    with use_backend("auto"):
        out = prefixkern.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, longest, longest, **kwargs)
    assert torch.equal(out, reference.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, **kwargs))


# --------------------------------------------------------------------------------------------
# Dropout: the kernels' Philox mask, checked element by element against the oracle
# --------------------------------------------------------------------------------------------

# A group per program with the backward in one launch (short rows), head splits with two (long
# rows, where the rule splits); the fuzzer crosses them.
@pytest.mark.parametrize("head_splits,one_launch", [(False, True), (True, False)],
                         ids=["group_per_program-one_launch_backward", "head_splits-two_launch_backward"])
@pytest.mark.parametrize("case", [replace(BASE, padding="left"), replace(BASE, prefix="per_task", B=3, Hq=6, Hkv=3),
                                  replace(BASE, dtype=torch.bfloat16, padding="right")], ids=str)
def test_dropout_forward_and_backward_match_the_mask(monkeypatch, case, head_splits, one_launch, device):
    """The kernels' dropout mask is the one dropout_keep_mask draws, forward and backward (with the
    dK/dV group's heads shared out between two programs too: each regenerates its heads' masks;
    the backward in one launch and in two)."""
    from prefixkern.kernels import prefix_attention_bwd as bwd

    if head_splits:
        monkeypatch.setattr(bwd, "dkdv_head_splits", lambda group, programs, seq_len_q, sms: 2)
    monkeypatch.setattr(bwd, "ONE_LAUNCH_BACKWARD", one_launch)

    check_dropout_case(case, device, p=0.3, seed=2**31 - 5)      # seed + bh crosses 2**31


def check_dropout_case(case: Case, device, p: float, seed: int):
    """prefixkern's output and five gradients with dropout, against the oracle under the keep mask
    ``dropout_keep_mask`` draws for ``seed``."""
    from prefixkern.kernels._attention_common import dropout_keep_mask

    inputs, kwargs = make_inputs(case, device)
    seed = torch.tensor([seed], dtype=torch.int64, device=device)
    keep = dropout_keep_mask(seed, case.B, case.Hq, case.S, case.P, case.S_kv, p)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.2
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, _ = torch.ops.prefixkern.prefix_attention_fwd(
        *leaves, kwargs["prefix_index"], kwargs["key_padding_mask"], None, seed, True, 1 / math.sqrt(case.D), p,
        None, None, None, None, 0, 0)
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    ref, ref_lse = reference.prefix_attention(*ref_leaves, dropout_p=p, dropout_keep=keep, return_lse=True, **kwargs)
    assert_close(out, ref, case.dtype, "out", "out")
    dout = torch.randn_like(out)
    out.backward(dout)
    exact = reference.prefix_attention(*[t.float() for t in inputs], dropout_p=p, dropout_keep=keep, **kwargs)
    oracle_backward(ref, ref_lse, out, exact, dout)
    for name, got, want in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), leaves, ref_leaves):
        assert_close(got.grad, want.grad, case.dtype, "grad", name)


def _philox4x32_10(counter: int, key: int) -> tuple[int, int, int, int]:
    """Philox4x32-10 of counter ``(counter, 0, 0, 0)`` under the 64-bit ``key``, in plain Python
    (Salmon et al. 2011, the constants Triton's ``tl.randint4x`` uses)."""
    mask = 0xFFFFFFFF
    c = [counter & mask, (counter >> 32) & mask, 0, 0]
    k0, k1 = key & mask, (key >> 32) & mask
    for _ in range(10):
        prod_a, prod_b = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(prod_b >> 32) ^ c[1] ^ k0, prod_b & mask, (prod_a >> 32) ^ c[3] ^ k1, prod_a & mask]
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return tuple(c)


@pytest.mark.parametrize("prefix_len", [3, 16])
def test_dropout_mask_is_the_documented_philox_layout(prefix_len, device):
    """Element by element, the mask the kernels draw is the one ``_attention_common``'s docstring
    states (so another backend, a CUDA kernel say, can reproduce it): one Philox4x32-10 draw per
    8 dropout columns, the prefix's and the sequence's columns each rounded up to whole groups,
    column c kept iff half c % 2 of word (c % 8) // 2 is at least round(p * 2**16). (On a GPU: the
    compiled kernel's join and reshape of the 8 masks, against the same plain-Python rule.)"""
    from prefixkern.kernels._attention_common import dropout_keep_mask

    batch, heads, seq_q, seq_kv, p = 2, 2, 3, 11, 0.3
    seed = 2**31 - 2                               # seed + bh crosses 2**31
    with use_backend("triton"):
        keep = dropout_keep_mask(torch.tensor([seed], dtype=torch.int64, device=device), batch, heads, seq_q,
                                 prefix_len, seq_kv, p).cpu()
    groups = -(-prefix_len // 8) + -(-seq_kv // 8)
    threshold = int(p * 65536 + 0.5)
    expected = torch.zeros_like(keep)
    for b, h, i in itertools.product(range(batch), range(heads), range(seq_q)):
        for key in range(prefix_len + seq_kv):
            col = key if key < prefix_len else -(-prefix_len // 8) * 8 + key - prefix_len
            words = _philox4x32_10(i * groups + col // 8, seed + b * heads + h)
            half = words[(col % 8) // 2] >> (16 * (col % 2)) & 0xFFFF
            expected[b, h, i, key] = half >= threshold
    assert torch.equal(keep, expected)


def test_dropout_mask_keeps_one_minus_p_of_the_weights(device):
    """Over 2**16 elements the kept share is 1 - p within five standard deviations, at a p that is
    not a multiple of 2**-16."""
    from prefixkern.kernels._attention_common import dropout_keep_mask

    p = 0.1234
    with use_backend("triton"):
        keep = dropout_keep_mask(torch.tensor([7], dtype=torch.int64, device=device), 1, 4, 64, 20, 236, p)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)


# Full size: GPT-2-medium's training attention (the e2e step's layer), Llama-3-8B's heads over a
# left-padded batch, an odd head dim over right padding with P across two key tiles, float32 with
# a cache longer than the queries.
GPU_DROPOUT_CASES = [
    Case(B=8, Hq=16, Hkv=16, S=256, S_kv=256, P=20, D=64, dtype=torch.bfloat16),
    Case(B=2, Hq=32, Hkv=8, S=1024, S_kv=1024, P=64, D=128, dtype=torch.bfloat16, padding="left"),
    Case(B=2, Hq=12, Hkv=4, S=300, S_kv=300, P=130, D=96, dtype=torch.float16, padding="right"),
    Case(B=1, Hq=4, Hkv=4, S=128, S_kv=640, P=7, D=64, dtype=torch.float32),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_DROPOUT_CASES, ids=str)
def test_gpu_dropout_full_size(case):
    """The dropout kernels at full size, forward and backward, against the oracle under their mask."""
    check_dropout_case(case, torch.device("cuda"), p=0.1, seed=20261128)


def test_dropout_is_reproducible_under_manual_seed(device):
    (q, k, v, pk, pv), kwargs = make_inputs(BASE, device)
    with use_backend("triton"):
        torch.manual_seed(3)
        a = prefixkern.prefix_attention(q, k, v, pk, pv, dropout_p=0.2, **kwargs)
        torch.manual_seed(3)
        b = prefixkern.prefix_attention(q, k, v, pk, pv, dropout_p=0.2, **kwargs)
        c = prefixkern.prefix_attention(q, k, v, pk, pv, dropout_p=0.2, **kwargs)
        plain = prefixkern.prefix_attention(q, k, v, pk, pv, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, plain)


# --------------------------------------------------------------------------------------------
# torch.compile and the custom-op contract
# --------------------------------------------------------------------------------------------

def test_torch_compile_fullgraph_forward_and_backward(device):
    case = replace(BASE, padding="left")
    inputs, kwargs = make_inputs(case, device)

    def step(q, k, v, pk, pv, mask):
        return prefixkern.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    with use_backend("triton"):
        out = compiled(*leaves, kwargs["key_padding_mask"])
        ref = step(*ref_leaves, kwargs["key_padding_mask"])
        assert_same_values_and_gradients(out, ref, leaves, ref_leaves)


def test_torch_compile_fullgraph_with_dropout(monkeypatch, device):
    """Attention dropout traces with fullgraph=True (the seed's draw and the counter check included)
    when the compiled call is the process's first (the kernel modules not yet loaded: their lazy
    loader's importlib call is one dynamo will not trace), and under one torch.manual_seed the
    compiled step draws the eager step's mask: the same values and gradients bit for bit."""
    from prefixkern.ops import prefix_attention as op

    monkeypatch.setattr(op, "_kernels", lazy_modules(**{name: module.__name__
                                                         for name, module in vars(op._kernels()).items()}))
    case = replace(BASE, padding="left")
    inputs, kwargs = make_inputs(case, device)

    def step(q, k, v, pk, pv, mask):
        return prefixkern.prefix_attention(q, k, v, pk, pv, key_padding_mask=mask, causal=True, dropout_p=0.25)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    with use_backend("triton"):
        torch.manual_seed(3)
        out = compiled(*leaves, kwargs["key_padding_mask"])
        torch.manual_seed(3)
        ref = step(*ref_leaves, kwargs["key_padding_mask"])
        assert not torch.equal(ref, step(*ref_leaves, kwargs["key_padding_mask"]))    # (dropout bites)
        assert_same_values_and_gradients(out, ref, leaves, ref_leaves)
    torch._dynamo.reset()


def test_eager_launch_skips_the_dispatcher_and_equals_the_custom_op(device):
    """Eager calls launch through an autograd.Function (no dispatcher round trip); the custom op,
    which torch.compile and tensor subclasses take, gives the same values and gradients bit for bit."""
    case = replace(BASE, padding="left")
    inputs, kwargs = make_inputs(case, device)
    leaves = [t.clone().requires_grad_() for t in inputs]
    op_leaves = [t.clone().requires_grad_() for t in inputs]
    scale = 1.0 / math.sqrt(inputs[0].shape[-1])
    with use_backend("triton"):
        out = prefixkern.prefix_attention(*leaves, key_padding_mask=kwargs["key_padding_mask"], causal=True)
        assert type(out.grad_fn).__name__ == "_PrefixAttentionFunctionBackward"
        op_out, _ = torch.ops.prefixkern.prefix_attention_fwd(
            *op_leaves, None, kwargs["key_padding_mask"], None, None, True, scale, 0.0, None, None, None, None, 0, 0)
        assert_same_values_and_gradients(out, op_out, leaves, op_leaves)


def _launched_kernels():
    """Every kernel the ops launch through launch_kernel."""
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd
    from prefixkern.kernels import prefix_mlp as mlp

    return [fwd.prefix_attention_fwd_kernel, bwd.prefix_attention_bwd_dq_kernel, bwd.prefix_attention_bwd_dkdv_kernel,
            mlp.prefix_mlp_matmul_kernel, mlp.prefix_mlp_matmul_pair_kernel, mlp.prefix_mlp_fwd_kernel,
            mlp.prefix_mlp_bwd_kernel, mlp.prefix_mlp_bwd_hidden_kernel, mlp.prefix_kv_copy_kernel]


def test_raw_launch_relies_on_constexprs_last_without_defaults():
    """launch_kernel's raw path takes the runtime arguments positionally and the constexprs, in
    signature order, from the keywords: every kernel it launches must declare its constexprs after
    its runtime arguments and give none a default."""
    import inspect

    for kernel in _launched_kernels():
        params = list(inspect.signature(kernel.fn).parameters.values())
        constexpr = ["constexpr" in str(p.annotation) for p in params]
        first = constexpr.index(True)
        assert all(constexpr[first:]), kernel.fn.__name__
        assert all(p.default is inspect.Parameter.empty for p in params), kernel.fn.__name__


def test_raw_launch_passes_pointers_and_constexprs_in_order(monkeypatch):
    """The raw path hands the compiled launcher each tensor's address, the other runtime
    arguments as given, then the constexprs in signature order (a stand-in kernel and driver). It
    binds once per argument key: a launch that differs only in its tensors' addresses (aligned)
    skips Triton's binding; another dtype, alignment, int or constexpr binds again."""
    import triton

    from prefixkern.kernels import _launch

    calls = {}

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *values):
            calls["run"] = values

    class Kernel:
        arg_names = ["x_ptr", "n", "scale", "BLOCK", "FLAG"]

        def run(self, *args, grid, warmup, **meta):
            assert warmup
            calls["warmup"] = (args, grid, meta)
            calls["bindings"] = calls.get("bindings", 0) + 1
            return Compiled()

        def __getitem__(self, grid):
            return lambda *args, **meta: calls.setdefault("plain", grid)

    class Driver:
        def get_current_device(self):
            return 3

        def get_current_stream(self, device):
            return 1000 + device

    monkeypatch.setattr(_launch, "RAW_POINTERS", True)
    monkeypatch.setattr(_launch, "triton_interpret", lambda: False)
    monkeypatch.setattr(_launch, "driver", types.SimpleNamespace(active=Driver()))
    monkeypatch.setattr(_launch, "_RAW_LAUNCHES", {})
    kernel = Kernel()
    x = torch.zeros(4)
    compiled = _launch.launch_kernel(kernel, (5, 2), x, 7, 0.5, FLAG=True, BLOCK=16, num_warps=4)
    assert isinstance(compiled, Compiled)
    assert calls["warmup"] == ((x, 7, 0.5), (5, 2), dict(FLAG=True, BLOCK=16, num_warps=4, enable_fp_fusion=True))
    assert calls["run"] == (5, 2, 1, 1003, "function", "metadata", None, None, None, x.data_ptr(), 7, 0.5, 16, True)
    assert "plain" not in calls
    # Another aligned tensor of the same dtype: the kept kernel, its launcher given the new address.
    y = torch.ones(8)
    assert _launch.launch_kernel(kernel, (6, 1), y, 7, 0.5, FLAG=True, BLOCK=16, num_warps=4) is compiled
    assert calls["bindings"] == 1
    assert calls["run"] == (6, 1, 1, 1003, "function", "metadata", None, None, None, y.data_ptr(), 7, 0.5, 16, True)
    # What Triton specialises on, or may: each binds again (and is kept in turn).
    for args, meta in [((y[1:], 7, 0.5), {}),                        # 4-byte aligned, not 16
                       ((y.double(), 7, 0.5), {}),                   # another dtype
                       ((y, 16, 0.5), {}),                           # another int (divisible by 16)
                       ((y, 7, 0.5), dict(BLOCK=32))]:               # another constexpr
        before = calls["bindings"]
        options = dict(FLAG=True, BLOCK=16, num_warps=4, **meta) if "BLOCK" not in meta else \
            dict(FLAG=True, num_warps=4, **meta)
        _launch.launch_kernel(kernel, (1,), *args, **options)
        _launch.launch_kernel(kernel, (1,), *args, **options)
        assert calls["bindings"] == before + 1, (args, meta)
    # A profiler's launch hook reads the real arguments: the plain launch serves it.
    hooks = triton.knobs.runtime.launch_enter_hook
    hook = lambda metadata: None  # noqa: E731
    if hasattr(hooks, "add"):       # Triton 3.6+: a HookChain
        hooks.add(hook)
    else:                           # Triton 3.4/3.5: the hook itself
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    try:
        _launch.launch_kernel(Kernel(), (5, 2), x, 7, 0.5, FLAG=True, BLOCK=16)
    finally:
        if hasattr(hooks, "remove"):
            hooks.remove(hook)
    assert calls["plain"] == (5, 2)


def test_raw_launch_of_a_plan_skips_the_argument_key(monkeypatch):
    """A launch plan under the raw path: its first launch goes through launch_kernel (which binds),
    and the plan keeps the compiled kernel; later launches hand the launcher the new tensors'
    addresses, the plan's other arguments and the constexprs directly, with no argument key built.
    A tensor that is not 16-byte aligned, or a launch hook, takes the general path again, and a
    launcher other than the package's (a test's recorder) gets every launch (a stand-in kernel and
    driver)."""
    import triton

    from prefixkern.kernels import _launch

    runs, general = [], []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *values):
            runs.append(values)

    class Kernel:
        arg_names = ["x_ptr", "y_ptr", "n", "BLOCK"]

        def run(self, *args, grid, warmup, **meta):
            return Compiled()

    class Driver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 77

    def counting_launch_kernel(kernel, grid, *args, **meta):
        general.append(args)
        return _launch.launch_kernel(kernel, grid, *args, **meta)

    monkeypatch.setattr(_launch, "RAW_POINTERS", True)
    monkeypatch.setattr(_launch, "triton_interpret", lambda: False)
    monkeypatch.setattr(_launch, "driver", types.SimpleNamespace(active=Driver()))
    monkeypatch.setattr(_launch, "_RAW_LAUNCHES", {})
    # The counting launcher stands for the package's own: a plan launched through any other (a
    # test's recorder) takes that launcher every time (the end of this test).
    monkeypatch.setattr(_launch, "_PACKAGE_LAUNCH_KERNEL", counting_launch_kernel)
    monkeypatch.setattr(_launch, "_raw_arguments", lambda args, real=_launch._raw_arguments: (
        counted.append(1), real(args))[1])
    counted = []
    plan = _launch.LaunchPlan(Kernel(), (3,), (9,), dict(BLOCK=16, num_warps=4))
    x, y = torch.zeros(8), torch.ones(8)
    plan.launch((x, None), counting_launch_kernel)
    assert len(general) == 1 and plan.raw is not None
    keys_built = len(counted)
    assert runs[-1] == (3, 1, 1, 77, "function", "metadata", None, None, None, x.data_ptr(), None, 9, 16)
    plan.launch((y, None), counting_launch_kernel)
    assert len(general) == 1 and len(counted) == keys_built
    assert runs[-1] == (3, 1, 1, 77, "function", "metadata", None, None, None, y.data_ptr(), None, 9, 16)
    plan.launch((y[1:], None), counting_launch_kernel)          # 4-byte aligned
    assert len(general) == 2
    hooks = triton.knobs.runtime.launch_enter_hook
    hook = lambda metadata: None  # noqa: E731
    if hasattr(hooks, "add"):
        hooks.add(hook)
    else:
        monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    plain = []
    monkeypatch.setattr(Kernel, "__getitem__", lambda self, grid: lambda *args, **meta: plain.append(grid),
                        raising=False)
    try:
        plan.launch((x, None), counting_launch_kernel)
    finally:
        if hasattr(hooks, "remove"):
            hooks.remove(hook)
    assert len(general) == 3 and plain == [(3,)]
    recorded = []
    launches = len(runs)
    plan.launch((x, None), lambda kernel, grid, *args, **meta: recorded.append(args))
    assert recorded == [(x, None, 9)] and len(runs) == launches and plan.raw is not None


def test_grids_stay_within_cuda_limits_for_many_rows_and_heads(monkeypatch):
    """CUDA caps grid.y and grid.z at 65535: 1100 rows of 64 heads (70400 row-heads) must still
    launch, so no launch puts rows times heads on one of those axes (launches recorded, not run)."""
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd

    launches, _ = record_launch_arguments(monkeypatch, (fwd, bwd))
    # The heavy-first grid and the launch order's; the backward in two launches and in one.
    for causal, one_launch in itertools.product((True, False), (True, False)):
        launches.clear()
        q = torch.zeros(1100, 64, 1, 16)
        k = v = torch.zeros(1100, 8, 1, 16)
        pk = pv = torch.zeros(8, 2, 16)
        options = dict(prefix_index=None, key_padding_mask=None, causal=causal, softmax_scale=0.25, dropout_p=0.0,
                       seed=None, alibi_slopes=None, softcap=None, window=None)
        out, lse = fwd.prefix_attention_forward(q, k, v, pk, pv, **options)
        with bwd.one_launch_backward(one_launch):
            bwd.prefix_attention_backward(out, q, k, v, pk, pv, out, lse, **options)
        grids = {name: grid for name, grid, _, _ in launches}
        assert set(grids) == {"prefix_attention_fwd_kernel", "prefix_attention_bwd_dkdv_kernel"} | (
            set() if one_launch else {"prefix_attention_bwd_dq_kernel"})
        for name, grid in grids.items():
            assert all(size <= 65535 for size in grid[1:]), (name, grid)
            assert math.prod(grid) >= 1100 * 8, (name, grid)


PLAN_CASES = [
    Case(), Case(prefix="per_row", padding="left"), Case(prefix="per_task", padding="holes", causal=False),
    Case(alibi=True, padding="right"), Case(softcap=20.0, window=6, dtype=torch.bfloat16),
    Case(Hq=6, Hkv=2, S=5, S_kv=40, P=3, D=24, dtype=torch.float16),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_launch_plans_replay_the_launch_they_were_made_from(monkeypatch, case, dropout_p):
    """A call whose layout has a kept launch plan launches exactly what the call that made the plan
    launched (kernel, grid, constexprs, every argument; its own tensors in the same places), and
    exactly what a call without plans launches. Launches recorded, not run."""
    from prefixkern.kernels import _launch
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd

    monkeypatch.setattr(fwd, "_PLANS", {})
    monkeypatch.setattr(bwd, "_PLANS", {})
    launches, known = record_launch_arguments(monkeypatch, (fwd, bwd))
    inputs, kwargs = make_inputs(case, "cpu")
    seed = torch.tensor([1234]) if dropout_p else None
    options = dict(kwargs, softmax_scale=0.3, dropout_p=dropout_p, seed=seed)
    lse = torch.zeros(case.B, case.Hq, case.S)
    known += [*inputs, lse, kwargs["prefix_index"], seed]

    def call(one_launch):
        launches.clear()
        with bwd.one_launch_backward(one_launch):
            fwd.prefix_attention_forward(*inputs, **options)
            # (q stands in for O and dO: a known tensor, so its places are compared.)
            bwd.prefix_attention_backward(inputs[0], *inputs, inputs[0], lse, **options)
        return list(launches)

    for one_launch in (True, False):
        fwd._PLANS.clear()
        bwd._PLANS.clear()
        with _launch.launch_plans(False):
            unplanned = call(one_launch)
        assert len(fwd._PLANS) == len(bwd._PLANS) == 0
        made = call(one_launch)
        replayed = call(one_launch)
        assert len(fwd._PLANS) == len(bwd._PLANS) == 1
        assert [name for name, *_ in unplanned] == ["prefix_attention_fwd_kernel"] + (
            [] if one_launch else ["prefix_attention_bwd_dq_kernel"]) + ["prefix_attention_bwd_dkdv_kernel"]
        assert made == unplanned
        assert replayed == unplanned


def test_launch_plans_follow_the_switches_and_the_tuner(monkeypatch):
    """A kept plan is not taken once what made it changed: a launcher switch (heavy-first order,
    one or two backward launches) or the tile the tuner holds for its key (tests and benchmarks
    force tiles)."""
    from prefixkern.kernels import _attention_common, _launch
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels import prefix_attention_fwd as fwd

    monkeypatch.setattr(fwd, "_PLANS", {})
    monkeypatch.setattr(bwd, "_PLANS", {})
    launches, _ = record_launch_arguments(monkeypatch, (fwd, bwd))
    inputs, kwargs = make_inputs(Case(), "cpu")
    options = dict(kwargs, softmax_scale=0.3, dropout_p=0.0, seed=None)
    lse = torch.zeros(2, 4, 17)

    def grids():
        launches.clear()
        fwd.prefix_attention_forward(*inputs, **options)
        bwd.prefix_attention_backward(inputs[0], *inputs, inputs[0], lse, **options)
        return [(name, grid, meta.get("HEAVY_FIRST"), meta.get("BLOCK_M")) for name, grid, _, meta in launches]

    first = grids()
    with _attention_common.heavy_first_scheduling(False):
        in_order = grids()
    assert [m[2] for m in first] == [True, True] and [m[2] for m in in_order] == [False, False]
    with bwd.one_launch_backward(False):
        assert len(grids()) == 3
    assert grids() == first
    # The tuner now holds another tile for the forward's key: the plan made with the old one is stale.
    fwd._PLANS.clear()
    assert grids() == first
    (fwd_plan,) = fwd._PLANS.values()
    assert _launch._TUNED[fwd_plan.tune_key] == fwd_plan.config == (16, 16, 1, 1)
    monkeypatch.setitem(_launch._TUNED, fwd_plan.tune_key, (32, 16, 1, 1))
    assert grids()[0][3] == 32
    assert _launch.take_launched_configs(["fwd"]) == {"fwd": (32, 16, 1, 1)}


@pytest.mark.gpu
@pytest.mark.smoke
def test_raw_launch_equals_a_plain_launch(monkeypatch, device):
    """PREFIXKERN_RAW_LAUNCH=1 gives the same values and gradients bit for bit, padded and with
    None for absent inputs: its first launches (through launch_kernel) and its later ones (the
    compiled kernel the launch plans kept, given the tensors' addresses)."""
    from prefixkern.kernels import _launch

    def run(raw):
        monkeypatch.setattr(_launch, "RAW_POINTERS", raw)
        inputs, kwargs = make_inputs(replace(BASE, padding="left", S=130, S_kv=130, P=16, dtype=torch.bfloat16),
                                     device)
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = prefixkern.prefix_attention(*leaves, key_padding_mask=kwargs["key_padding_mask"], causal=True)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out))
        plain = prefixkern.prefix_attention(*(t.detach() for t in inputs), causal=False)
        return [out, plain] + [t.grad for t in leaves]

    want = run(False)
    first = run(True)
    from prefixkern.kernels import prefix_attention_bwd, prefix_attention_fwd

    assert all(plan.raw is not None for plan in prefix_attention_fwd._PLANS.values())
    assert all(plan.dkdv.raw is not None for plan in prefix_attention_bwd._PLANS.values())
    again = run(True)
    for got_first, got_again, expected in zip(first, again, want):
        assert torch.equal(got_first, expected) and torch.equal(got_again, expected)


def test_output_and_gradients_keep_hf_layout(device):
    """q/k/v as HF holds them ([B, S, H, D] memory viewed [B, H, S, D]): the output and the
    gradients come back in that layout, so HF's transpose + reshape and the way back into the
    projections are views, not copies; other layouts get contiguous tensors."""
    torch.manual_seed(3)
    B, Hq, Hkv, S, D, P = 2, 4, 2, 9, 16, 5
    q = torch.randn(B, S, Hq, D, device=device).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, device=device).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D, device=device).transpose(1, 2).requires_grad_()
    pk, pv = (torch.randn(Hkv, P, D, device=device).requires_grad_() for _ in range(2))
    with use_backend("triton"):
        out = prefixkern.prefix_attention(q, k, v, pk, pv)
        assert out.stride() == q.stride() and out.transpose(1, 2).is_contiguous()
        out.backward(torch.randn_like(out))
        for t in (q, k, v):
            assert t.grad.stride() == t.stride()
        odd = torch.randn(B, Hq, D, S, device=device).transpose(2, 3)        # head dim not unit-stride
        assert prefixkern.prefix_attention(odd, k.detach(), v.detach(), pk.detach(), pv.detach()).is_contiguous()
        fake_args = (q, k, v, pk, pv, None, None, None, None, True, 0.25, 0.0, None, None, None, None, 0, 0)
        with torch._subclasses.FakeTensorMode() as mode:
            fake_out, _ = torch.ops.prefixkern.prefix_attention_fwd(*(mode.from_tensor(a) if isinstance(a, torch.Tensor)
                                                                     else a for a in fake_args))
        assert fake_out.stride() == out.stride()      # the fake matches the kernel's layout


def test_opcheck(device):
    (q, k, v, pk, pv), kwargs = make_inputs(replace(BASE, S=5, S_kv=9, padding="left"), device)
    args = (q, k, v, pk, pv, None, kwargs["key_padding_mask"], None, None, True, 0.25, 0.0, None, None, None, None,
            0, 0)
    torch.library.opcheck(torch.ops.prefixkern.prefix_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_packed(device):
    (q, k, v, pk, pv), cu_q, cu_k, _ = make_packed_inputs(PACKED_BASE, device)
    args = (q, k, v, pk, pv, None, None, None, None, True, 0.25, 0.0, None, None, cu_q, cu_k,
            max(PACKED_BASE.lens_q), max(PACKED_BASE.lens_kv))
    torch.library.opcheck(torch.ops.prefixkern.prefix_attention_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph_packed(device):
    (q, k, v, pk, pv), cu_q, cu_k, kwargs = make_packed_inputs(PACKED_BASE, device)
    max_q, max_k = max(PACKED_BASE.lens_q), max(PACKED_BASE.lens_kv)

    def step(q, k, v, pk, pv):
        return prefixkern.prefix_attention_varlen(q, k, v, pk, pv, cu_q, cu_k, max_q, max_k, causal=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v, pk, pv)]
    with use_backend("triton"):
        out = compiled(*leaves)
        ref = step(*ref_leaves)
        assert_same_values_and_gradients(out, ref, leaves, ref_leaves)


def test_reference_backend_for_cpu_tensors_by_default():
    (q, k, v, pk, pv), kwargs = make_inputs(BASE, torch.device("cpu"))
    with use_backend("auto"):
        out = prefixkern.prefix_attention(q, k, v, pk, pv, **kwargs)
    assert torch.equal(out, reference.prefix_attention(q, k, v, pk, pv, **kwargs))


# --------------------------------------------------------------------------------------------
# The full grid, on a GPU
# --------------------------------------------------------------------------------------------

def _gpu_grid():
    """Every axis of the issue's grid at every value (others at a base), plus a seeded sample of
    the full cross product."""
    axes = {
        "dtype": [torch.float16, torch.bfloat16, torch.float32],
        "D": [32, 40, 64, 80, 96, 128, 160, 192, 256],
        "P": [1, 7, 16, 64, 130],
        "S": [1, 17, 128, 300],
        "gqa": [1, 2, 7],
        "causal": [True, False],
        "padding": ["none", "left", "right", "all"],
        "prefix": ["shared", "per_row", "per_task"],
        "mods": ["none", "alibi", "softcap", "window"],
    }

    def build(dtype, D, P, S, gqa, causal, padding, prefix, mods):
        return Case(B=3, Hq=2 * gqa, Hkv=2, S=S, S_kv=S + 37, P=P, D=D, dtype=dtype, causal=causal,
                    padding=padding, prefix=prefix, alibi=mods == "alibi",
                    softcap=30.0 if mods == "softcap" else None, window=64 if mods == "window" else None)

    base = {name: values[0] for name, values in axes.items()}
    base.update(dtype=torch.bfloat16, D=128, P=16, S=128, gqa=2)
    cases = {build(**{**base, name: value}) for name, values in axes.items() for value in values}
    rng = random.Random(0)
    product = list(itertools.product(*axes.values()))
    cases.update(build(*combo) for combo in rng.sample(product, 300))
    return sorted(cases, key=str)


def gpu_grid_backward_modes():
    """``(case, one_launch)`` of the GPU grid: every other case (in the grid's order) with the
    one-launch backward switched off; the rest take it where the rule does (short rows, and all
    but the largest cases' work)."""
    return [(case, index % 2 == 0) for index, case in enumerate(_gpu_grid())]


@pytest.mark.gpu
@pytest.mark.parametrize("case,one_launch", gpu_grid_backward_modes(),
                         ids=[f"{case}-{'one' if one else 'two'}_launch" for case, one in gpu_grid_backward_modes()])
def test_gpu_grid(monkeypatch, case, one_launch):
    """The issue's grid at full size; every other case with the backward in two launches."""
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels._attention_common import config_bucket

    assert case.S <= bwd.ONE_LAUNCH_MAX_QUERIES
    monkeypatch.setattr(bwd, "ONE_LAUNCH_BACKWARD", one_launch)
    launched = _record_attention_launches(monkeypatch)
    check_case(case, torch.device("cuda"))
    bucket = config_bucket(max(16, 1 << (case.D - 1).bit_length()), case.dtype.itemsize)
    work = case.B * case.Hq * case.S * (case.P + case.S_kv) * case.D
    assert launched[-1][1]["WITH_DQ"] is bwd.backward_in_one_launch(case.S, work, bucket)


@pytest.mark.gpu
@pytest.mark.parametrize("S,S_kv,P", [(2048, 2048, 30), (4096, 4096, 128), (1, 8192, 64), (512, 128, 16)])
def test_gpu_long_sequences(S, S_kv, P):
    check_case(Case(B=2, Hq=32, Hkv=8, S=S, S_kv=S_kv, P=P, D=128, dtype=torch.bfloat16, padding="left"),
               torch.device("cuda"))


def _gpu_packed_grid():
    """Packed rows at full size: the dtypes and head dims of the dense grid, ragged lengths that
    leave tiles partly filled, GQA, every prefix kind and the score modifiers."""
    lens = (1, 300, 17, 128, 0, 77)
    cases = [PackedCase(lens_q=lens, Hq=4, Hkv=2, P=16, D=d, dtype=dt)
             for dt in (torch.float16, torch.bfloat16, torch.float32) for d in (32, 64, 80, 96, 128, 256)]
    base = PackedCase(lens_q=lens, Hq=14, Hkv=2, P=30, D=128, dtype=torch.bfloat16)
    cases += [replace(base, causal=False), replace(base, prefix="per_row"), replace(base, prefix="per_task"),
              replace(base, alibi=True), replace(base, softcap=30.0), replace(base, window=64),
              replace(base, P=130), replace(base, lens_kv=(40, 300, 90, 128, 12, 77))]
    return cases


@pytest.mark.gpu
@pytest.mark.parametrize("case", _gpu_packed_grid(), ids=str)
def test_gpu_packed_grid(case):
    check_packed_case(case, torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_packed_long():
    check_packed_case(PackedCase(lens_q=(2048, 513, 4096, 1), Hq=32, Hkv=8, P=64, D=128, dtype=torch.bfloat16),
                      torch.device("cuda"))
