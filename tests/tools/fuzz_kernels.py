"""Randomized differential checks of the kernels against the plain-PyTorch oracle.

    python tests/tools/fuzz_kernels.py attention --cases 200 --seed 1
    python tests/tools/fuzz_kernels.py varlen --cases 100
    python tests/tools/fuzz_kernels.py attention --dropout --cases 50     # every case with dropout
    python tests/tools/fuzz_kernels.py triton-decode --cases 100
    python tests/tools/fuzz_kernels.py cuda-decode --cases 300     # the CUDA sources under tests/csrc_emu
    python tests/tools/fuzz_kernels.py mlp --cases 100              # the fused prefix MLP

Each case draws its shapes and options at random (``--seed`` and the case number fix them, so a
failure is re-run by its seed and number: ``--seed S --first K --cases 1``) and checks outputs,
log-sum-exps and, where the op is differentiable, every gradient with the tolerances of the test
suite (its helpers do the checking). Without a GPU the Triton kernels run in Triton's interpreter
(a few seconds per attention case on two cores), so CI runs a handful of cases
(tests/test_fuzz_tool.py) and longer campaigns are run by hand; on a GPU the same cases run on
the device. Prints one line per failure and a summary; exits 1 if any case failed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported

import prefixkern  # noqa: E402
from prefixkern import reference  # noqa: E402
from prefixkern._backend import use_backend  # noqa: E402
from prefixkern.kernels._attention_common import heavy_first_scheduling  # noqa: E402
from prefixkern.kernels.prefix_attention_bwd import one_launch_backward  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def _head_splits(enabled: bool):
    """With ``enabled``, every dK/dV launch shares a GQA group's heads out among programs (the
    group's smallest divisor above 1), whatever the grid and row length. (The rule is replaced
    outside the launch plans' keys: the kept plans are dropped on the way in and out.)"""
    from prefixkern.kernels import prefix_attention_bwd as bwd
    from prefixkern.kernels._launch import forget_plans

    rule = bwd.dkdv_head_splits
    if enabled:
        bwd.dkdv_head_splits = lambda group, programs, seq_len_q, sms: next(
            (d for d in range(2, group + 1) if group % d == 0), 1)
    forget_plans()
    try:
        yield
    finally:
        bwd.dkdv_head_splits = rule
        forget_plans()


# Attention dropout in a quarter of the attention and packed cases (since 2026-11-28: one Philox
# draw per query row and 8 key columns), at a small, a middling and a large rate.
DROPOUT_PS = (0.0,) * 9 + (0.1, 0.3, 0.75)


@contextlib.contextmanager
def _drawing_seed(seed: int):
    """``torch.manual_seed(seed)`` for the block, the generator's state restored after it: the
    dropout seed the op draws inside is the one ``_oracle_seed`` draws for the oracle."""
    with torch.random.fork_rng(devices=[_device()] if _device().type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _oracle_seed(seed: int) -> torch.Tensor:
    """The dropout seed the op draws under ``_drawing_seed(seed)`` (as prefix_attention's
    ``_dropout_seed`` draws it), for the oracle's keep masks."""
    with _drawing_seed(seed):
        return torch.randint(0, 2**31 - 1, (1,), device=_device(), dtype=torch.int64)


def attention_case(rng: random.Random, seed: int, notes: list) -> None:
    """``prefix_attention`` on a random dense case: values, LSE and all five gradients."""
    from conftest import strided_view
    from test_prefix_attention import Case, assert_matches_oracle, make_inputs

    kv_heads = rng.choice([1, 2, 3])
    seq_q = rng.choice([1, 2, 5, 16, 17, 33, 70])
    seq_kv = rng.choice([0, seq_q, seq_q + rng.randint(1, 40), max(1, seq_q - rng.randint(0, seq_q))])
    case = Case(B=rng.choice([1, 2, 3]), Hq=kv_heads * rng.choice([1, 2, 3, 7]), Hkv=kv_heads, S=seq_q,
                S_kv=seq_kv, P=rng.choice([1, 3, 7, 16, 17, 40, 65]), D=rng.choice([16, 24, 32, 40, 64, 80]),
                dtype=rng.choice(DTYPES), causal=rng.random() < 0.7,
                padding=rng.choice(["none", "left", "right", "all", "both", "holes"]) if seq_kv else "none",
                prefix=rng.choice(["shared", "per_row", "per_task"]), alibi=rng.random() < 0.2,
                softcap=rng.choice([None, None, 3.0]), window=rng.choice([None, None, None, 1, 5, 20]))
    if case.prefix == "per_task" and case.B < 2:
        case = replace(case, B=2)
    strided = rng.random() < 0.4
    scale = rng.choice([None, None, 0.3])
    heavy_first = seed % 2 == 0     # causal programs heaviest first in even cases (no draw: a seed keeps its cases)
    head_splits = seed % 3 == 0     # dK/dV with the GQA group shared out in every third case
    one_launch = seed % 5 != 0      # the backward in two launches (dQ, then dK/dV) in every fifth
    # (drawn last: the other draws, and so the cases of seeds run before, stay as they were)
    dropout_p = rng.choice(DROPOUT_PS)
    strided_index = rng.random() < 0.25       # (since 2026-11-28: a strided view of prefix_index)
    notes.append(f"{case} strided={strided} scale={scale} heavy_first={heavy_first} head_splits={head_splits} "
                 f"one_launch={one_launch} dropout_p={dropout_p} strided_index={strided_index}")
    inputs, kwargs = make_inputs(case, _device(), seed=seed)
    if scale is not None:
        kwargs["softmax_scale"] = scale
    if strided_index and kwargs["prefix_index"] is not None:
        kwargs["prefix_index"] = strided_view(kwargs["prefix_index"])
    keep = None
    if dropout_p:
        from prefixkern.kernels._attention_common import dropout_keep_mask

        keep = dropout_keep_mask(_oracle_seed(seed), case.B, case.Hq, case.S, case.P, case.S_kv, dropout_p)
    leaves = [t.clone().requires_grad_() for t in inputs]
    call = leaves
    if strided:      # HF's [B, S, H, D] memory seen as [B, H, S, D]
        call = [t.transpose(-3, -2).contiguous().transpose(-3, -2) if t.dim() == 4 else t for t in leaves]
    # (the backward runs in assert_matches_oracle)
    with heavy_first_scheduling(heavy_first), _head_splits(head_splits), one_launch_backward(one_launch):
        with use_backend("triton"), _drawing_seed(seed):
            out, lse = prefixkern.prefix_attention(*call, return_lse=True, dropout_p=dropout_p, **kwargs)
        ref_leaves = [t.detach().clone().requires_grad_() for t in inputs]
        keep_kwargs = dict(kwargs, dropout_p=dropout_p, dropout_keep=keep)
        ref_out, ref_lse = reference.prefix_attention(*ref_leaves, return_lse=True, **keep_kwargs)
        exact_out = reference.prefix_attention(*[t.float() for t in inputs], **keep_kwargs)
        assert_matches_oracle(out, lse, ref_out, ref_lse, leaves, ref_leaves, case.dtype, exact_out)
        # The same call again takes the launch plans the first one kept: the same results bit for bit.
        grads = [t.grad for t in leaves]
        for t in leaves:
            t.grad = None
        with use_backend("triton"), _drawing_seed(seed):
            again, again_lse = prefixkern.prefix_attention(*call, return_lse=True, dropout_p=dropout_p, **kwargs)
        again.backward(torch.randn(again.shape, generator=torch.Generator().manual_seed(1)).to(again))
        assert torch.equal(again, out) and torch.equal(again_lse, lse), "replayed forward differs"
        assert all(torch.equal(t.grad, g) for t, g in zip(leaves, grads)), "replayed backward differs"


def varlen_case(rng: random.Random, seed: int, notes: list) -> None:
    """``prefix_attention_varlen`` on random packed sequences (empty ones included): values, LSE, gradients."""
    from test_prefix_attention import PackedCase, check_packed_case, packed_dropout_keep

    count = rng.randint(1, 4)
    lens_q = tuple(rng.choice([0, 1, 3, 9, 17, 40]) for _ in range(count))
    if sum(lens_q) == 0:
        lens_q = (5,) + lens_q[1:]
    lens_kv = lens_q if rng.random() < 0.6 else tuple(rng.choice([0, 1, 5, 20, 33]) for _ in range(count))
    kv_heads = rng.choice([1, 2])
    case = PackedCase(lens_q=lens_q, lens_kv=lens_kv, Hq=kv_heads * rng.choice([1, 2, 3]), Hkv=kv_heads,
                      P=rng.choice([1, 7, 18, 33]), D=rng.choice([16, 32, 40, 64]), dtype=rng.choice(DTYPES),
                      causal=rng.random() < 0.7, prefix=rng.choice(["shared", "per_row", "per_task"]),
                      alibi=rng.random() < 0.2, softcap=rng.choice([None, None, 4.0]),
                      window=rng.choice([None, None, 2, 7]))
    heavy_first, head_splits, one_launch = seed % 2 == 0, seed % 3 == 0, seed % 5 != 0
    dropout_p = rng.choice(DROPOUT_PS)      # (drawn last, as in attention_case)
    strided_index = rng.random() < 0.25     # cu_seqlens and prefix_index as strided views (after dropout)
    notes.append(f"{case} heavy_first={heavy_first} head_splits={head_splits} one_launch={one_launch} "
                 f"dropout_p={dropout_p} strided_index={strided_index}")
    keep = packed_dropout_keep(_oracle_seed(seed), case, dropout_p) if dropout_p else None
    with heavy_first_scheduling(heavy_first), _head_splits(head_splits), one_launch_backward(one_launch), \
            _drawing_seed(seed):
        check_packed_case(case, _device(), dropout_p=dropout_p, dropout_keep=keep, strided_index=strided_index)


def triton_decode_case(rng: random.Random, seed: int, notes: list) -> None:
    """``prefix_decode_attention`` on the Triton backend (the decode kernel, forced at every size on
    a GPU too, or the forward kernel for larger groups): values and LSE of a random decoding step."""
    from prefixkern.ops.decode_attention import triton_decode_everywhere
    from test_decode import TRITON_DECODE_TOLERANCE, _inputs
    from conftest import strided_view

    head_dim = rng.choice([16, 32, 64, 80, 128])
    seq_q = rng.choice([1, 1, 2, 4, 8])
    group = rng.choice([1, 2, 4, 7])
    prefix = rng.choice(["shared", "per_row", "per_task"])
    args = dict(B=3 if prefix == "per_task" else rng.choice([1, 2, 3]), Hq=2 * group, Hkv=2, Sq=seq_q,
                L=rng.choice([1, 2, 16, 37, 70]), P=rng.choice([1, 5, 20, 33]), D=head_dim, dtype=rng.choice(DTYPES))
    padding, splits = rng.random() < 0.5, rng.choice([0, 1, 2, 5])
    strided_index = rng.random() < 0.25     # (drawn last: a strided view of prefix_index)
    notes.append(f"decode {args} {prefix} padding={padding} splits={splits} strided_index={strided_index}")
    inputs, kwargs = _inputs(**args, device=_device(), prefix=prefix, padding=padding, seed=seed)
    want, want_lse = reference.prefix_attention(*[t.float() for t in inputs], causal=True, return_lse=True, **kwargs)
    if strided_index and kwargs["prefix_index"] is not None:
        kwargs["prefix_index"] = strided_view(kwargs["prefix_index"])
    with use_backend("triton"), triton_decode_everywhere():
        got, lse = prefixkern.prefix_decode_attention(*inputs, num_splits=splits, return_lse=True, **kwargs)
    tol = TRITON_DECODE_TOLERANCE[args["dtype"]]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse)), "rows that see no key differ"
    torch.testing.assert_close(lse[finite], want_lse[finite], atol=1e-5, rtol=1e-5)


def mlp_case(rng: random.Random, seed: int, notes: list) -> None:
    """``fused_prefix_mlp`` on random sizes (P 1-130, ragged d, h and N), with or without the
    projection and its biases, three output dtypes: values and every parameter gradient. In the
    interpreter, half the cases run the backward's dH and dW2 programs in a launch each (the
    two-launch tiles a GPU's tuner times where W2 is large), and half of those walk dW2 by strips
    of tiles (where one P tile holds every row: P <= 16 in the interpreter); an eighth leave the W2
    products to torch.mm (LIBRARY_PRODUCTS, the cuBLAS candidate)."""
    from conftest import TOLERANCES, strided_view

    from prefixkern.kernels import prefix_mlp as kernels

    sizes = dict(num_layers=rng.randint(1, 3), num_kv_heads=rng.choice([1, 2, 3]), head_dim=rng.choice([7, 12, 16, 20]))
    num_rows = rng.choice([1, 2, 7, 13, 30, 33, 64, 130])
    num_cols = 2 * sizes["num_layers"] * sizes["num_kv_heads"] * sizes["head_dim"]
    projection, bias = rng.random() < 0.75, rng.random() < 0.8
    token_dim, hidden = rng.choice([5, 24, 40, 64]), rng.choice([5, 20, 36, 64, 100])
    out_dtype = rng.choice(DTYPES)
    launch_draw = rng.random()        # (one draw, as before strips: a seed's cases stay the same)
    two_launches, strips, library = launch_draw < 0.5, launch_draw < 0.25, 0.5 <= launch_draw < 0.625
    # (drawn last: the cases of a seed drawn before the transposed products existed keep their sizes)
    transposed = rng.random() < 0.5 and not library
    strided = rng.random() < 0.25       # (drawn last, 2026-11-28: every operand a strided view)
    notes.append(f"mlp P{num_rows} {sizes} projection={projection} bias={bias} d{token_dim} h{hidden} {out_dtype}"
                 f"{' bwd in two launches' if two_launches else ''}{', dW2 by strips' if strips else ''}"
                 f"{', W2 products by torch.mm' if library else ''}"
                 f"{', products with W2 the left operand' if transposed else ''}{', strided operands' if strided else ''}")
    gen = torch.Generator().manual_seed(seed)
    if projection:
        params = [torch.randn(num_rows, token_dim, generator=gen), torch.randn(hidden, token_dim, generator=gen) /
                  token_dim ** 0.5, torch.randn(hidden, generator=gen) if bias else None,
                  torch.randn(num_cols, hidden, generator=gen) / hidden ** 0.5,
                  torch.randn(num_cols, generator=gen) if bias else None]
    else:
        params = [torch.randn(num_rows, num_cols, generator=gen), None, None, None, None]
    params = [p.to(_device()).requires_grad_() if p is not None else None for p in params]
    leaves = [p for p in params if p is not None]
    expected = reference.prefix_mlp(*params, **sizes, out_dtype=out_dtype)
    grad = torch.randn(expected.shape, generator=gen).to(_device(), out_dtype)
    expected_grads = torch.autograd.grad(expected, leaves, grad)
    one_launch_tile, pick_config = kernels.INTERPRETER_BWD_TILE, kernels.pick_config
    if two_launches:
        kernels.INTERPRETER_BWD_TILE = one_launch_tile._replace(dw_num_warps=4, dw_num_stages=1, dw_strips=strips)
    if transposed:      # dH^T = W2^T G^T in the backward, out^T = W2 H^T in the forward
        kernels.INTERPRETER_BWD_TILE = kernels.INTERPRETER_BWD_TILE._replace(dh_w2_lhs=True)
        kernels.pick_config = lambda key, candidates, launch: (
            candidates()[0][:5] + (True,) if key[0] in ("mlp-fwd", "mlp-fwd-fused") else pick_config(key, candidates,
                                                                                                      launch))
    if library:
        kernels.pick_config = lambda key, candidates, launch: (
            kernels.LIBRARY_PRODUCTS if key[0] == "mlp-bwd" else pick_config(key, candidates, launch))
    operands = [p if p is None or not strided else strided_view(p) for p in params]
    try:
        with use_backend("triton"):
            got = prefixkern.fused_prefix_mlp(*operands, **sizes, out_dtype=out_dtype)
            grads = torch.autograd.grad(got, leaves, grad)
    finally:
        kernels.INTERPRETER_BWD_TILE, kernels.pick_config = one_launch_tile, pick_config
    atol, rtol = TOLERANCES[out_dtype]["out"]
    torch.testing.assert_close(got, expected, atol=atol, rtol=rtol)
    atol, rtol = TOLERANCES[torch.float32]["grad"]
    for number, (ours, want) in enumerate(zip(grads, expected_grads)):
        torch.testing.assert_close(ours, want, atol=atol, rtol=rtol, msg=f"gradient of parameter {number}")


_EMULATOR: dict[str, Path] = {}


def _emulator() -> Path:
    """The CUDA decode kernels compiled with the CPU emulator of tests/csrc_emu (once per run)."""
    import test_decode_emulated as emulated

    if "binary" not in _EMULATOR:
        binary = emulated.build_emulator(Path(tempfile.mkdtemp()))
        if binary is None:
            raise SystemExit("cuda-decode needs g++ and the CUDA headers (cuda_bf16.h)")
        _EMULATOR["binary"] = binary
    return _EMULATOR["binary"]


def cuda_decode_case(rng: random.Random, seed: int, notes: list) -> None:
    """The CUDA decode kernels' own source (CUDA-core or tensor-core, at random) under the emulator:
    the partial results merged in Python, and the CUDA merge, against the reference."""
    import test_decode_emulated as emulated

    head_dim = rng.choice([64, 128, 256])
    kv_heads = rng.choice([1, 2, 3])
    seq_q = rng.choice([1, 1, 1, 2, 3, 5, 8])
    group = rng.choice([1, 2, 3, 4, 5, 7, 8])
    while group * seq_q > 32:
        group = max(1, group // 2)
    batch = rng.choice([1, 2, 3])
    cache_len = rng.choice([1, 2, 17, 63, 64, 65, 130, 257])
    prefix_len = rng.choice([0, 1, 5, 30, 64, 129])
    prefix = rng.choice(["shared", "per_row", "per_task"]) if prefix_len else "shared"
    if prefix == "per_task":
        batch = max(batch, 2)
    padding, dtype = rng.random() < 0.5, rng.choice([torch.float16, torch.bfloat16])
    splits = rng.choice([0, 1, 2, 3, 7])
    wave = rng.choice([0, 8, 132]) if splits == 0 else 0
    tensor_cores = rng.random() < 0.5
    # (drawn last: the earlier draws, and so the cases of seeds run before, stay as they were)
    # (0: the launcher's choice, with `wave` standing in for both stages' waves; drawn since the
    # choice became the default, so seeds before it drew 1 or 2)
    stages = rng.choice([0, 1, 2]) if tensor_cores else 1
    notes.append(f"{'mma' if tensor_cores else 'simt'}{({0: ' auto stages', 1: '', 2: ' 2 stages'})[stages]} {dtype} D{head_dim} "
                 f"B{batch} Hq{kv_heads * group} "
                   f"Hkv{kv_heads} Sq{seq_q} L{cache_len} P{prefix_len} {prefix} padding={padding} "
                   f"splits={splits} wave={wave}")
    (q, k, v, pk, pv), index, mask = emulated._inputs(batch, kv_heads * group, kv_heads, seq_q, cache_len,
                                                      max(prefix_len, 1), head_dim, dtype, prefix, padding)
    if prefix_len == 0:     # no prefix keys: what prefix_gemm=True hands the kernel
        pk, pv = pk[:, :0].contiguous(), pv[:, :0].contiguous()
    scale = head_dim ** -0.5
    with tempfile.TemporaryDirectory() as workdir:
        out_partial, lse_partial, _, merged, merged_lse = emulated.run_emulated(
            _emulator(), Path(workdir), q, k, v, pk, pv, index, mask, scale, splits, tensor_cores, wave, stages)
    emulated.assert_emulated_matches_reference(q, k, v, pk, pv, index, mask, scale, tensor_cores, out_partial,
                                               lse_partial, merged, merged_lse)


KINDS = {"attention": attention_case, "varlen": varlen_case, "triton-decode": triton_decode_case,
         "cuda-decode": cuda_decode_case, "mlp": mlp_case}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="number of the first case (re-run one by its number)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="start no case after this many seconds (a device call's budget); the summary counts "
                             "the cases that ran")
    parser.add_argument("--dropout", action="store_true",
                        help="attention, varlen: every case with attention dropout (its other draws unchanged)")
    args = parser.parse_args(argv)
    if args.dropout:
        global DROPOUT_PS
        DROPOUT_PS = tuple(p for p in DROPOUT_PS if p > 0)
    check = KINDS[args.kind]
    failures = ran = 0
    started = time.monotonic()
    for number in range(args.first, args.first + args.cases):
        if args.seconds is not None and time.monotonic() - started > args.seconds:
            break
        ran += 1
        rng = random.Random(f"{args.kind}-{args.seed}-{number}")
        notes: list[str] = []
        try:
            check(rng, number, notes)
        except Exception as exc:      # any failure of a case is reported, and the run goes on
            failures += 1
            print(f"FAIL {args.kind} seed {args.seed} case {number} ({'; '.join(notes)}): "
                  f"{type(exc).__name__}: {str(exc)[:400]}", flush=True)
    print(f"{args.kind}: {ran} cases (seed {args.seed}, from {args.first}), {failures} failed"
          + (f" (of {args.cases}: --seconds {args.seconds:g} ran out)" if ran < args.cases else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
