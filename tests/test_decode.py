"""prefix_decode_attention (CUDA C++ kernels of csrc/, Triton fallback) and merge_attention_states
against the reference. The CUDA kernels run under ``-m gpu``; CI compiles them (test_csrc_compile)."""
import contextlib
import itertools
import warnings
from pathlib import Path

import pytest
import torch

import prefixkern
from prefixkern import reference
from prefixkern._backend import triton_interpret
from prefixkern.ops import decode_attention

from conftest import HAS_CUDA, record_launches, strided_view


def _inputs(B, Hq, Hkv, Sq, L, P, D, dtype, device, prefix="shared", padding=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q = randn(B, Sq, Hq, D).transpose(1, 2)            # HF's layout: a transposed view
    k, v = randn(B, Hkv, L, D), randn(B, Hkv, L, D)
    index = None
    if prefix == "shared":
        pk, pv = randn(Hkv, P, D), randn(Hkv, P, D)
    elif prefix == "per_row":
        pk, pv = randn(B, Hkv, P, D), randn(B, Hkv, P, D)
    else:
        pk, pv = randn(3, Hkv, P, D), randn(3, Hkv, P, D)
        index = (torch.arange(B) % 3).to(device)
    mask = None
    if padding:
        mask = torch.ones(B, L, dtype=torch.bool, device=device)
        mask[0, : L // 2] = False                       # left padding of a generation batch
    return (q, k, v, pk, pv), dict(key_padding_mask=mask, prefix_index=index)


def test_falls_back_to_the_kernels_or_reference_on_cpu():
    inputs, kw = _inputs(2, 4, 2, 1, 13, 5, 32, torch.float32, "cpu", padding=True, prefix="per_task")
    expected = reference.prefix_attention(*inputs, causal=True, **kw)
    torch.testing.assert_close(prefixkern.prefix_decode_attention(*inputs, **kw), expected)
    if not triton_interpret():
        # A GPU machine runs Triton natively: CPU tensors under a forced triton backend are refused
        # with the way out named, not silently sent to the reference.
        with prefixkern.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            prefixkern.prefix_decode_attention(*inputs, **kw)
        return
    with prefixkern.use_backend("triton"):
        got, lse = prefixkern.prefix_decode_attention(*inputs, return_lse=True, **kw)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)
    assert lse.shape == (2, 4, 1)


# (dtype, D, Sq, GQA group, P, L, prefix, padding, splits): the Triton decode kernel in Triton's
# interpreter: float32 and both 16-bit types, a head dim that pads (80), 1-3 query positions, MHA
# and GQA 4 and 7 (up to 14 rows of a tile), one prefix key and one cache key, chunks that cut the
# prefix and the cache mid-block, every kind of prefix, padding with left-padded rows.
# The Triton decode kernel's output against the float32 reference, by input dtype.
TRITON_DECODE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
TRITON_DECODE_CASES = [
    (torch.float32, 32, 1, 1, 5, 13, "shared", True, 0),
    (torch.float32, 64, 3, 4, 7, 40, "per_task", True, 3),
    (torch.bfloat16, 64, 1, 4, 1, 1, "shared", False, 0),
    (torch.bfloat16, 32, 2, 7, 20, 33, "per_row", True, 2),
    (torch.float16, 80, 1, 2, 3, 50, "per_task", False, 1),
]


@pytest.mark.parametrize("case", TRITON_DECODE_CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_triton_decode_kernel_against_the_reference(case, monkeypatch):
    """Where the CUDA kernels cannot run (no nvcc, float32, the Triton backend forced), decoding takes
    the Triton decode kernel: key chunks over the GPU, one program per GQA group, merged by LSE."""
    if not triton_interpret() and not HAS_CUDA:
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    dtype, D, Sq, gqa, P, L, prefix, padding, splits = case
    device = "cpu" if triton_interpret() else "cuda"
    inputs, kw = _inputs(3, 2 * gqa, 2, Sq, L, P, D, dtype, device, prefix=prefix, padding=padding)
    want, want_lse = reference.prefix_attention(*[t.float() for t in inputs], causal=True, return_lse=True, **kw)
    chunks = []
    from prefixkern.kernels import prefix_decode

    launcher = prefix_decode.prefix_decode_partial
    monkeypatch.setattr(prefix_decode, "prefix_decode_partial",
                        lambda *a, **k: chunks.append(k["num_splits"]) or launcher(*a, **k))
    # (On a GPU small calls go to the general kernel, measured faster there: the decode kernel forced.)
    with prefixkern.use_backend("triton"), decode_attention.triton_decode_everywhere():
        got, lse = prefixkern.prefix_decode_attention(*inputs, num_splits=splits, return_lse=True, **kw)
        stepped = decode_attention.decode_step(*inputs, softmax_scale=None, **kw)
    assert chunks == [splits, 0]                  # both calls took the decode kernel
    tol = TRITON_DECODE_TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stepped, got, atol=tol, rtol=tol)


def test_strided_prefix_index_decodes_as_a_contiguous_one():
    """A per-task prefix_index given as a strided view (every other entry of a wider tensor), and an
    int64 padding mask: the same output as the contiguous index and the bool mask, through the
    Triton decode kernel on the CPU and the CUDA kernel on a GPU (both read the index at unit
    stride: strided, they read other rows' tasks until 2026-11-28; the CUDA op refused an int64
    mask)."""
    if not triton_interpret() and not HAS_CUDA:
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    device = "cpu" if triton_interpret() else "cuda"
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    inputs, kw = _inputs(3, 8, 2, 1, 40, 5, 64, dtype, device, prefix="per_task", padding=True)
    index = torch.tensor([2, 0, 1], device=device)
    backend = "triton" if device == "cpu" else "auto"
    with prefixkern.use_backend(backend), decode_attention.triton_decode_everywhere():
        want = prefixkern.prefix_decode_attention(*inputs, key_padding_mask=kw["key_padding_mask"], prefix_index=index)
        got = prefixkern.prefix_decode_attention(*inputs, key_padding_mask=kw["key_padding_mask"],
                                                 prefix_index=strided_view(index))
        # HF's int64 attention mask (the CUDA op reads bool or uint8: the launcher converts it)
        int_mask = prefixkern.prefix_decode_attention(*inputs, key_padding_mask=kw["key_padding_mask"].long(),
                                                      prefix_index=index)
    assert torch.equal(got, want) and torch.equal(int_mask, want)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_kernel_equals_the_torch_merge(out_dtype):
    """The Triton decode path's merge (one launch) against ``merge_attention_states``' torch ops:
    parts that saw nothing (LSE -inf) weigh nothing, a row no part saw gives 0 and -inf, and rows
    that do not fill the last program are masked."""
    if not triton_interpret() and not HAS_CUDA:
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    from prefixkern.kernels._launch import on_device
    from prefixkern.kernels.prefix_decode import prefix_decode_merge

    device = "cpu" if triton_interpret() else "cuda"
    torch.manual_seed(5)
    parts = torch.randn(3, 2, 3, 1, 40, device=device)          # [N, B, Hq, Sq, D]: 6 rows, D pads to 64
    lse = torch.randn(3, 2, 3, 1, device=device) * 3
    lse[1, 0, 1] = float("-inf")                                 # one part saw none of row (0, 1)
    lse[:, 1, 2] = float("-inf")                                 # no part saw row (1, 2)
    parts[:, 1, 2] = 0.0
    with prefixkern.use_backend("reference"):         # the torch ops
        want, want_lse = decode_attention.merge_attention_states(parts, lse, out_dtype)
    with on_device(parts.device):
        got, got_lse = prefix_decode_merge(parts, lse, out_dtype)
    assert got.dtype == out_dtype and got.shape == (2, 3, 1, 40) and got_lse.shape == (2, 3, 1)
    tol = 1e-6 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-6, rtol=1e-6)
    assert torch.equal(got[1, 2].float(), torch.zeros(1, 40, device=device)) and torch.isinf(got_lse[1, 2]).all()


def test_triton_decode_step_is_two_launches(monkeypatch):
    """A split decoding step on the Triton path: the partial kernel and the merge kernel, no torch
    merge (a dozen launches, which made the path slower than the general forward kernel)."""
    if not triton_interpret() and not HAS_CUDA:
        pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1")
    from prefixkern.kernels import prefix_decode

    device = "cpu" if triton_interpret() else "cuda"
    # Chunks are whole key tiles: on a GPU (64-key tiles and up) 40 keys were one chunk, merged by nothing.
    cache_len = 40 if triton_interpret() else 1000
    inputs, kw = _inputs(2, 4, 2, 1, cache_len, 7, 32, torch.float32, device, prefix="shared", padding=True)
    launched = record_launches(monkeypatch, (prefix_decode,), lambda kernel, meta: kernel.fn.__name__)
    from torch.utils._python_dispatch import TorchDispatchMode

    class TorchMerge(TorchDispatchMode):       # the torch merge's first op
        ran = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            TorchMerge.ran |= func.overloadpacket.__name__ == "logsumexp"
            return func(*args, **(kwargs or {}))

    with prefixkern.use_backend("triton"), decode_attention.triton_decode_everywhere(), TorchMerge():
        got = prefixkern.prefix_decode_attention(*inputs, num_splits=3, **kw)
    assert launched == ["prefix_decode_partial_kernel", "prefix_decode_merge_kernel"]
    assert not TorchMerge.ran, "the torch merge ran"
    torch.testing.assert_close(got, reference.prefix_attention(*inputs, causal=True, **kw), atol=1e-5, rtol=1e-5)


class _ReferenceCudaOps:
    """Stands in for ``torch.ops.prefixkern_cuda`` on the CPU: the same signatures, the partial
    computed by the reference as one chunk. Records what it was called with."""

    def __init__(self):
        self.calls = []

    def prefix_decode_partial(self, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, num_splits,
                              tensor_cores=False, stages=1):
        self.calls.append(dict(index=prefix_index, mask=key_padding_mask, scale=scale, num_splits=num_splits,
                               tensor_cores=tensor_cores, stages=stages))
        assert isinstance(scale, float) and isinstance(num_splits, int) and isinstance(tensor_cores, bool)
        assert stages in (0, 1, 2) and (stages == 1 or tensor_cores)
        # What csrc/prefix_decode.cu checks (TORCH_CHECK) before it launches.
        assert prefix_index is None or (prefix_index.dtype == torch.int64 and prefix_index.is_contiguous())
        assert key_padding_mask is None or key_padding_mask.dtype in (torch.bool, torch.uint8)
        out, lse = reference.prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, softmax_scale=scale,
                                              key_padding_mask=key_padding_mask, prefix_index=prefix_index,
                                              return_lse=True)
        return out.float().unsqueeze(0), lse.unsqueeze(0)

    def merge_attention_states(self, out_partial, lse_partial, out_dtype):
        return out_partial[0].to(out_dtype), lse_partial[0]

    def prefix_decode_attention(self, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, num_splits,
                                tensor_cores=False, stages=1):
        # As csrc/prefix_decode.cu composes it: the partial, then the merge.
        self.fused_calls = getattr(self, "fused_calls", 0) + 1
        out_partial, lse_partial = self.prefix_decode_partial(q, k, v, prefix_k, prefix_v, prefix_index,
                                                              key_padding_mask, scale, num_splits, tensor_cores, stages)
        return self.merge_attention_states(out_partial, lse_partial, q.dtype)


@pytest.mark.parametrize("prefix", ["shared", "per_task"])
def test_decode_step_hands_the_cuda_ops_what_the_checked_op_would(prefix, monkeypatch):
    """The HF integration's unchecked decode call (no Python argument checks), run through a
    stand-in for the CUDA ops on the CPU: same result as the reference, arguments in the op's order
    and types; where the kernel cannot serve, the checked public op takes over, checks included."""
    from prefixkern import _cuda_build

    ops = _ReferenceCudaOps()
    monkeypatch.setattr(_cuda_build, "cuda_ops", lambda: ops)
    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: True)
    # (head dim 64: the tensor-core kernel by default; the stand-in ops run the reference for either)
    monkeypatch.setattr(_cuda_build, "tensor_cores_usable", lambda index: True)
    inputs, kw = _inputs(3, 4, 2, 2, 9, 5, 64, torch.bfloat16, "cpu", prefix=prefix, padding=True)
    expected = reference.prefix_attention(*inputs, causal=True, softmax_scale=0.125, **kw)
    with prefixkern.use_backend("auto"):
        got = decode_attention.decode_step(*inputs, softmax_scale=0.125, **kw)
        unscaled = decode_attention.decode_step(*inputs, softmax_scale=None, **kw)
    torch.testing.assert_close(got, expected)
    assert len(ops.calls) == 2 and ops.calls[0]["num_splits"] == 0 and ops.calls[1]["scale"] == 64 ** -0.5
    assert ops.fused_calls == 2     # one op call per step: partial and merge together
    assert ops.calls[0]["mask"] is kw["key_padding_mask"]
    torch.testing.assert_close(unscaled, reference.prefix_attention(*inputs, causal=True, **kw))

    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: False)
    with prefixkern.use_backend("auto"):
        torch.testing.assert_close(decode_attention.decode_step(*inputs, softmax_scale=0.125, **kw), expected)
        with pytest.raises(ValueError, match="key_padding_mask"):
            decode_attention.decode_step(*inputs, softmax_scale=0.125, key_padding_mask=kw["key_padding_mask"][:, 1:],
                                         prefix_index=kw["prefix_index"])
    assert len(ops.calls) == 2


def test_public_decode_op_hands_the_cuda_ops_what_they_check(monkeypatch):
    """prefix_decode_attention takes an integer padding mask (HF's attention_mask is int64) and a
    strided prefix_index, as prefix_attention does; the CUDA op checks for a bool or uint8 mask and
    a contiguous int64 index (an int64 mask failed its check until 2026-11-28): the launcher
    converts them. Through the stand-in ops on the CPU, same result as the reference."""
    from prefixkern import _cuda_build

    ops = _ReferenceCudaOps()
    monkeypatch.setattr(_cuda_build, "cuda_ops", lambda: ops)
    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(_cuda_build, "tensor_cores_usable", lambda index: True)
    inputs, kw = _inputs(3, 4, 2, 1, 9, 5, 64, torch.float32, "cpu", prefix="per_task", padding=True)
    expected = reference.prefix_attention(*inputs, causal=True, **kw)
    index = strided_view(kw["prefix_index"].to(torch.int32))
    for mask in (kw["key_padding_mask"].long(), kw["key_padding_mask"].to(torch.int32)):
        with prefixkern.use_backend("auto"):
            got = prefixkern.prefix_decode_attention(*inputs, key_padding_mask=mask, prefix_index=index)
        torch.testing.assert_close(got, expected)
    assert len(ops.calls) == 2


def test_decode_step_traces_under_torch_compile_as_one_op(monkeypatch):
    """A compiled model's decoding step traces with no graph break (fullgraph) into one custom op,
    ``prefixkern::decode_step``: the CUDA kernel's eligibility reads tensor addresses and its first
    call builds the library, neither of which a trace can do, so the op asks when it runs, as an
    eager step does (here, CPU tensors: no CUDA kernel, the reference). Its output is contiguous
    whatever served it, as its fake says (q here a transposed view, as HF's projections give it)."""
    asked = []
    supported = decode_attention.cuda_decode_supported

    def recording(*args, **kwargs):
        asked.append(torch.compiler.is_compiling())
        return supported(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "cuda_decode_supported", recording)
    inputs, kw = _inputs(3, 4, 2, 1, 9, 5, 64, torch.float32, "cpu", prefix="per_task", padding=True)
    inputs = (inputs[0].transpose(1, 2).contiguous().transpose(1, 2),) + tuple(inputs[1:])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([node.target for node in gm.graph.nodes if node.op == "call_function"])
        return gm

    def step(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index):
        return decode_attention.decode_step(q, k, v, prefix_k, prefix_v, softmax_scale=0.125,
                                            key_padding_mask=key_padding_mask, prefix_index=prefix_index)

    torch._dynamo.reset()
    with prefixkern.use_backend("auto"), torch.no_grad():
        explained = torch._dynamo.explain(step)(*inputs, **kw)
        assert explained.graph_break_count == 0, [str(b.reason)[:300] for b in explained.break_reasons]
        torch._dynamo.reset()
        asked.clear()
        got = torch.compile(step, fullgraph=True, backend=backend)(*inputs, **kw)
        assert graphs and torch.ops.prefixkern.decode_step.default in graphs[-1], graphs
        assert asked == [False], asked              # asked once, when the op ran, not while tracing
        assert got.is_contiguous()
        torch.testing.assert_close(got, reference.prefix_attention(*inputs, causal=True, softmax_scale=0.125, **kw))
        torch.testing.assert_close(got, step(*inputs, **kw), atol=0, rtol=0)


def test_decode_step_with_a_library_built_before_the_fused_op(monkeypatch):
    """A CUDA library from before ``prefix_decode_attention`` existed (an ahead-of-time build) has
    only the partial and merge ops: decoding calls those two, with the same result."""
    from prefixkern import _cuda_build

    class OlderOps(_ReferenceCudaOps):
        prefix_decode_attention = None

    ops = OlderOps()
    monkeypatch.setattr(_cuda_build, "cuda_ops", lambda: ops)
    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: True)
    # (head dim 64: the tensor-core kernel by default; the stand-in ops run the reference for either)
    monkeypatch.setattr(_cuda_build, "tensor_cores_usable", lambda index: True)
    inputs, kw = _inputs(2, 4, 2, 1, 9, 5, 64, torch.bfloat16, "cpu", padding=True)
    with prefixkern.use_backend("auto"):
        got = decode_attention.decode_step(*inputs, softmax_scale=0.125, **kw)
    torch.testing.assert_close(got, reference.prefix_attention(*inputs, causal=True, softmax_scale=0.125, **kw))
    assert len(ops.calls) == 1 and not hasattr(ops, "fused_calls")


def test_build_self_check_covers_the_one_call_op():
    """The check a fresh CUDA build must pass before it serves decoding (run here with reference
    stand-ins on the CPU): it passes for correct ops, and fails when only the one-call op is wrong,
    at either query length it tries."""
    from prefixkern import _cuda_build

    _cuda_build.self_check(_ReferenceCudaOps(), device=torch.device("cpu"))

    class WrongForOneQuery(_ReferenceCudaOps):
        def prefix_decode_attention(self, q, *args, **kwargs):
            out, lse = super().prefix_decode_attention(q, *args, **kwargs)
            return (out * 0 if q.shape[2] == 1 else out), lse

    with pytest.raises(RuntimeError, match="one call, q_len 1"):
        _cuda_build.self_check(WrongForOneQuery(), device=torch.device("cpu"))


@pytest.mark.parametrize("setting, failure", [(None, "stages=0"), ("auto", "stages=0"), ("2", "stages=2"), ("1", None)])
def test_build_self_check_covers_the_stages_decoding_asks_for(setting, failure, monkeypatch):
    """The tensor-core self-check runs the kernel with the stages decoding will hand it (the
    launcher's choice by default, two where forced) besides one stage: a build wrong only there
    does not serve; with PREFIXKERN_DECODE_STAGES=1 that instance is never launched, nor checked."""
    from prefixkern import _cuda_build

    class WrongPastOneStage(_ReferenceCudaOps):
        def prefix_decode_partial(self, *args):
            out, lse = super().prefix_decode_partial(*args)
            stages = args[10] if len(args) > 10 else 1
            return (out * 0 if stages != 1 else out), lse

    if setting is None:
        monkeypatch.delenv("PREFIXKERN_DECODE_STAGES", raising=False)
    else:
        monkeypatch.setenv("PREFIXKERN_DECODE_STAGES", setting)
    _cuda_build.self_check(WrongPastOneStage(), device=torch.device("cpu"))     # the CUDA-core check: one stage
    if failure is None:
        _cuda_build.self_check(WrongPastOneStage(), tensor_cores=True, device=torch.device("cpu"))
    else:
        with pytest.raises(RuntimeError, match=failure):
            _cuda_build.self_check(WrongPastOneStage(), tensor_cores=True, device=torch.device("cpu"))


@pytest.mark.parametrize("P, L", [(1, 1), (30, 100)])
def test_cuda_path_python_side_against_the_reference(P, L, monkeypatch):
    """The Python around the CUDA kernels (prefix_gemm's float32 part, the partials' layout, the
    merge), with a reference stand-in for the kernels and the Python merge: the GPU test's cases
    and tolerances, so a host-side fault (a bf16 product rounding the prefix scores, LSE off by
    0.0077 at P = 1) fails here rather than only on a GPU."""
    from prefixkern import _cuda_build

    class MergingOps(_ReferenceCudaOps):
        def merge_attention_states(self, out_partial, lse_partial, out_dtype):
            return decode_attention.merge_attention_states(out_partial, lse_partial, out_dtype)

    monkeypatch.setattr(_cuda_build, "cuda_ops", MergingOps)
    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: True)
    # (head dim 64: the tensor-core kernel by default; the stand-in ops run the reference for either)
    monkeypatch.setattr(_cuda_build, "tensor_cores_usable", lambda index: True)
    for prefix, padding in (("shared", False), ("per_task", True), ("per_row", True)):
        inputs, kw = _inputs(3, 14, 2, 8, L, P, 64, torch.bfloat16, "cpu", prefix=prefix, padding=padding)
        expected, expected_lse = reference.prefix_attention(*inputs, causal=True, return_lse=True, **kw)
        for gemm in (False, True):
            with prefixkern.use_backend("auto"):
                out, lse = prefixkern.prefix_decode_attention(*inputs, prefix_gemm=gemm, return_lse=True, **kw)
            torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse, expected_lse, atol=1e-3, rtol=1e-3)


DECODE_GRID_RUN = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "2026-11-27_1223_NVIDIA-H200.json"


def test_decode_routing_takes_the_faster_kernel_at_every_point_of_the_h200_grid():
    """The routing constants against the run they were read from (the decode grid committed in
    benchmarks/results: Llama-3-8B heads, 2 prefixes x 3 caches x 3 batches): the Triton decode
    kernel or the general kernel where the CUDA kernels are not built, and the CUDA kernel or the
    Triton decode kernel where they are, whichever that run timed faster, at all 18 points."""
    import json

    from prefixkern.bench.decode import D, HKV

    times = {}
    for record in json.loads(DECODE_GRID_RUN.read_text())["records"]:
        if record["suite"] == "decode" and record["pass"] == "fwd":
            times.setdefault(record["case"], {})[record["impl"]] = record["ms"]
    assert len(times) == 18
    for case, ms in times.items():
        prefix, cache, batch = (int(part[1:]) for part in case.split("-"))
        k = torch.empty(batch, HKV, cache, D, dtype=torch.bfloat16, device="meta")
        decode_kernel = decode_attention.triton_decode_is_faster(batch * HKV, prefix + cache)
        assert decode_kernel == (ms["prefixkern_triton_decode"] < ms["prefixkern_triton"]), (case, ms)
        gives_way = decode_attention._cache_kv_bytes(k) >= decode_attention.CUDA_DECODE_MAX_KV_BYTES
        assert gives_way == (ms["prefixkern_triton_decode"] < ms["prefixkern"]), (case, ms)
        assert not gives_way or decode_kernel       # the CUDA kernel gives way to the decode kernel only


def test_cuda_kernel_gives_way_to_the_triton_decode_kernel_over_large_caches(monkeypatch):
    """From CUDA_DECODE_MAX_KV_BYTES of cache K/V the CUDA ops are not asked (the Triton decode
    kernel takes the call where it serves it), unless the call asked for a CUDA variant (the
    prefix GEMM, tensor cores); below, and in decode_step, the CUDA ops as before."""
    from prefixkern import _cuda_build

    ops = _ReferenceCudaOps()
    monkeypatch.setattr(_cuda_build, "cuda_ops", lambda: ops)
    monkeypatch.setattr(_cuda_build, "tensor_cores_usable", lambda index: True)
    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: True)
    serves = []
    monkeypatch.setattr(decode_attention, "_triton_decode_serves", lambda q, k, prefix_len: (
        serves.append(prefix_len), True)[1])
    inputs, kw = _inputs(2, 4, 2, 1, 9, 5, 64, torch.bfloat16, "cpu")
    q, k, v, pk, pv = inputs
    size = decode_attention._cache_kv_bytes(k)
    assert size == 2 * 2 * 2 * 9 * 64 * 2
    with prefixkern.use_backend("auto"):
        monkeypatch.setattr(decode_attention, "CUDA_DECODE_MAX_KV_BYTES", size + 1)
        assert decode_attention._cuda_ops_serving(*inputs) is ops and serves == []
        monkeypatch.setattr(decode_attention, "CUDA_DECODE_MAX_KV_BYTES", size)
        assert decode_attention._cuda_ops_serving(*inputs) is None and serves == [5]
        assert decode_attention._cuda_ops_serving(*inputs, may_give_way=False) is ops
        # The public op and decode_step: the large cache's call leaves the CUDA ops (the reference
        # stand-in records none), the variants' calls keep them.
        monkeypatch.setattr(decode_attention, "_without_cuda_ops", lambda *args: q.new_zeros(q.shape))
        prefixkern.prefix_decode_attention(*inputs, **kw)
        decode_attention.decode_step(*inputs, softmax_scale=None, **kw)
        assert ops.calls == []
        prefixkern.prefix_decode_attention(*inputs, prefix_gemm=True, **kw)
        prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, **kw)
        assert len(ops.calls) == 2


@pytest.mark.parametrize("setting", [None, False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_tensor_core_kernel_is_asked_for_by_the_flag_and_falls_back(setting, head_dim, monkeypatch):
    """Which CUDA kernel decode_step and the public op's default ask for: with
    PREFIXKERN_DECODE_TENSOR_CORES unset (TENSOR_CORES None) the tensor-core one at every head dim
    the CUDA ops serve (TENSOR_CORE_HEAD_DIMS), set (True / False) that kernel at every head dim; an explicit
    tensor_cores= wins; where tensor_cores_usable says no (an old GPU, a failed self-check), the
    CUDA-core kernel gets the call."""
    from prefixkern import _cuda_build

    ops = _ReferenceCudaOps()
    usable = [True]
    monkeypatch.setattr(_cuda_build, "cuda_ops", lambda: ops)
    monkeypatch.setattr(_cuda_build, "tensor_cores_usable", lambda index: usable[0])
    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(decode_attention, "TENSOR_CORES", setting)
    default = head_dim in (64, 128, 256) if setting is None else setting
    assert decode_attention.tensor_cores_by_default(head_dim) is default
    inputs, kw = _inputs(2, 4, 2, 1, 9, 5, head_dim, torch.bfloat16, "cpu")
    with prefixkern.use_backend("auto"):
        decode_attention.decode_step(*inputs, softmax_scale=None, **kw)
        prefixkern.prefix_decode_attention(*inputs, **kw)
        prefixkern.prefix_decode_attention(*inputs, tensor_cores=not default, **kw)
        usable[0] = False
        prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, **kw)
        prefixkern.prefix_decode_attention(*inputs, **kw)
        with pytest.raises(TypeError, match="tensor_cores"):
            prefixkern.prefix_decode_attention(*inputs, tensor_cores=1, **kw)
    assert [call["tensor_cores"] for call in ops.calls] == [default, default, not default, False, False]


def test_stages_setting_reaches_the_tensor_core_kernel_only(monkeypatch):
    """The tensor-core calls hand the op stages=0 by default (the launcher's choice per call),
    mma_stages(1) / mma_stages(2) (PREFIXKERN_DECODE_STAGES=1 / 2) force one or two stages, the fused
    op and the partial alike, "auto" is 0 again; CUDA-core calls leave the argument out (the
    schema's 1); a setting other than 1, 2 or auto is a ValueError naming the variable."""
    from prefixkern import _cuda_build

    ops = _ReferenceCudaOps()
    monkeypatch.setattr(_cuda_build, "cuda_ops", lambda: ops)
    monkeypatch.setattr(_cuda_build, "tensor_cores_usable", lambda index: True)
    monkeypatch.setattr(decode_attention, "cuda_decode_supported", lambda *args, **kwargs: True)
    inputs, kw = _inputs(2, 4, 2, 1, 9, 5, 128, torch.bfloat16, "cpu")
    expected = reference.prefix_attention(*inputs, causal=True, **kw)
    with prefixkern.use_backend("auto"):
        prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, **kw)
        with decode_attention.mma_stages(2):
            got = prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, **kw)
            prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, prefix_gemm=True, **kw)
            prefixkern.prefix_decode_attention(*inputs, tensor_cores=False, **kw)
        with decode_attention.mma_stages(1):
            prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, **kw)
        with decode_attention.mma_stages(" Auto"):
            prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, **kw)
        with decode_attention.mma_stages("3"), pytest.raises(ValueError, match="PREFIXKERN_DECODE_STAGES"):
            prefixkern.prefix_decode_attention(*inputs, tensor_cores=True, **kw)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)
    assert [(call["tensor_cores"], call["stages"]) for call in ops.calls] == [
        (True, 0), (True, 2), (True, 2), (False, 1), (True, 1), (True, 0)]


def test_tensor_core_kernel_refused_on_old_gpus_and_failed_self_checks(monkeypatch):
    from prefixkern import _cuda_build

    checks = []
    monkeypatch.setattr(_cuda_build, "cuda_ops", lambda: "ops")
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextlib.nullcontext())
    monkeypatch.setattr(_cuda_build, "self_check", lambda ops, tensor_cores: checks.append(tensor_cores))
    for capability, fails, usable, reason in (((7, 5), False, False, "sm_80 or newer GPU, this one is sm_75"),
                                              ((9, 0), True, False, "RuntimeError: disagrees"),
                                              ((9, 0), False, True, None)):
        _cuda_build.tensor_cores_usable.cache_clear()
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        if fails:
            monkeypatch.setattr(_cuda_build, "self_check",
                                lambda ops, tensor_cores: (_ for _ in ()).throw(RuntimeError("disagrees")))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _cuda_build.tensor_cores_usable(0) is usable
            assert _cuda_build.tensor_cores_usable(0) is usable          # cached: checked and warned once
        assert [str(w.message) for w in caught if reason and reason in str(w.message)] == \
            [str(w.message) for w in caught] and len(caught) == (0 if usable else 1)
        monkeypatch.setattr(_cuda_build, "self_check", lambda ops, tensor_cores: checks.append(tensor_cores))
    assert checks == [True]
    _cuda_build.tensor_cores_usable.cache_clear()


def test_alignment_test_of_the_cuda_path():
    x = torch.zeros(2, 3, 4, 64, dtype=torch.bfloat16)
    assert decode_attention._aligned(x) and decode_attention._aligned(x.transpose(1, 2))
    assert not decode_attention._aligned(x[..., 1:])                   # 2-byte offset, odd row stride
    assert not decode_attention._aligned(x.transpose(-1, -2))          # last dim not contiguous
    assert not decode_attention._aligned(torch.zeros(2, 3, 68, dtype=torch.bfloat16)[..., :64])   # row stride 68
    assert decode_attention._aligned(torch.zeros(1, 3, 68, dtype=torch.bfloat16)[:, :1, :64])     # size-1 dims
    flat = torch.zeros(2 * 64 + 8, dtype=torch.bfloat16)
    assert not decode_attention._aligned(flat[4:4 + 128].view(2, 64))  # data_ptr % 16 == 8


def test_merge_attention_states_equals_attention_over_the_union():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 16, dtype=torch.float64)
    empty = torch.zeros(2, 2, 0, 16, dtype=torch.float64)
    pk, pv = torch.randn(2, 2, 9, 16, dtype=torch.float64)
    whole = reference.prefix_attention(q, empty, empty, pk, pv, causal=False)
    parts = [reference.prefix_attention(q, empty, empty, pk[:, s], pv[:, s], causal=False, return_lse=True)
             for s in (slice(0, 4), slice(4, 9))]
    out, lse = prefixkern.merge_attention_states(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    torch.testing.assert_close(out, whole)
    # A part that saw nothing (lse = -inf) contributes nothing; all parts empty gives 0.
    blank = torch.stack([parts[0][0], torch.zeros_like(parts[0][0])])
    blank_lse = torch.stack([parts[0][1], torch.full_like(parts[0][1], float("-inf"))])
    torch.testing.assert_close(prefixkern.merge_attention_states(blank, blank_lse)[0], parts[0][0])
    none_out, none_lse = prefixkern.merge_attention_states(torch.zeros(2, 3, 4), torch.full((2, 3), float("-inf")))
    assert torch.equal(none_out, torch.zeros(3, 4)) and torch.isinf(none_lse).all()
    # No parts at all: the same (the GPU's kernels, which divide by the count, are not asked).
    none_out, none_lse = prefixkern.merge_attention_states(torch.zeros(0, 3, 4), torch.zeros(0, 3), torch.bfloat16)
    assert torch.equal(none_out, torch.zeros(3, 4, dtype=torch.bfloat16)) and torch.isinf(none_lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("P", [1, 5])
def test_prefix_part_by_gemm_is_attention_over_the_prefix_alone(dtype, P):
    """In float32 from 16-bit inputs, as the kernel computes: a bf16 product rounded the scores,
    and at P = 1 the LSE was off by 0.0077 (found on the H200 by the decode smoke cases)."""
    from prefixkern.ops.decode_attention import _prefix_part_by_gemm

    inputs, _ = _inputs(3, 8, 2, 2, 4, P, 64, dtype, "cpu")
    q, _, _, pk, pv = inputs
    empty = torch.zeros(3, 2, 0, 64, dtype=dtype)
    out, lse = _prefix_part_by_gemm(q, pk, pv, 0.125)
    want, want_lse = reference.prefix_attention(q, empty, empty, pk, pv, causal=False, softmax_scale=0.125,
                                                return_lse=True)
    assert out.dtype == lse.dtype == torch.float32
    torch.testing.assert_close(out, want.float(), atol=1e-5, rtol=1e-5) if dtype == torch.float32 else \
        torch.testing.assert_close(out.to(dtype), want)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused():
    inputs, _ = _inputs(1, 2, 2, 1, 4, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="num_splits"):
        prefixkern.prefix_decode_attention(*inputs, num_splits=-1)
    with pytest.raises(ValueError, match="lse_partial must have"):
        prefixkern.merge_attention_states(torch.zeros(2, 3, 4), torch.zeros(2, 4))


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    from prefixkern import _cuda_build

    _cuda_build.cuda_ops.cache_clear()
    monkeypatch.setattr(_cuda_build, "build_cuda", lambda: (_ for _ in ()).throw(RuntimeError("no nvcc here")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _cuda_build.cuda_ops() is None
        assert _cuda_build.cuda_ops() is None
    assert len([w for w in caught if "no nvcc here" in str(w.message)]) == 1
    _cuda_build.cuda_ops.cache_clear()


# --------------------------------------------------------------------------------------------
# The CUDA kernels, on a GPU
# --------------------------------------------------------------------------------------------

# kernel: "simt" (CUDA-core FMAs) or "mma" (tensor cores: the default at every head dim, TENSOR_CORE_HEAD_DIMS).
GPU_GRID = [dict(kernel=kernel, dtype=dtype, D=D, Sq=Sq, gqa=gqa, P=P, L=L)
            for kernel, dtype, D, Sq, gqa, P, L in itertools.product(
                ("simt", "mma"), (torch.bfloat16, torch.float16), (64, 128, 256), (1, 3, 8), (1, 4, 7), (1, 30, 128),
                (1, 100, 4096))
            if not (D == 256 and L == 4096 and gqa == 7)]


def _check_cuda_kernel(case):
    from prefixkern import _cuda_build

    assert decode_attention.cuda_decode_supported(*_inputs(1, 2, 2, 1, 4, 2, case["D"], case["dtype"], "cuda")[0])
    prefixkern.build_cuda()
    tensor_cores = case["kernel"] == "mma"
    if tensor_cores:   # its self-check passed (else decoding would quietly run the CUDA-core kernel)
        assert _cuda_build.tensor_cores_usable(torch.cuda.current_device())
    _check_against_reference(case, [dict(num_splits=splits, prefix_gemm=gemm, tensor_cores=tensor_cores)
                                    for splits, gemm in ((0, False), (1, False), (7, False), (0, True))])


def _check_against_reference(case, variants):
    """prefix_decode_attention on a GPU grid case, with a shared, a per-task and a per-row prefix
    (padding with the last two), called with each of ``variants`` (keyword arguments)."""
    for prefix, padding in (("shared", False), ("per_task", True), ("per_row", True)):
        inputs, kw = _inputs(3, 2 * case["gqa"], 2, case["Sq"], case["L"], case["P"], case["D"], case["dtype"], "cuda",
                             prefix=prefix, padding=padding)
        expected, expected_lse = reference.prefix_attention(*inputs, causal=True, return_lse=True, **kw)
        for variant in variants:
            out, lse = prefixkern.prefix_decode_attention(*inputs, return_lse=True, **variant, **kw)
            torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
            torch.testing.assert_close(lse, expected_lse, atol=1e-3, rtol=1e-3)


def _smoke(case) -> bool:
    """The cases a GPU session checks first (run_gpu.sh smoke), for both kernels: every dtype and head
    dim, one and eight query positions, MHA and GQA 7, the tile and split seams at P = 30, and one
    prefix key with one cache key (where a removed double-buffered variant got the LSE wrong)."""
    return case["Sq"] in (1, 8) and case["gqa"] in (1, 7) and (case["P"] == 30 or (case["P"], case["L"]) == (1, 1))


def merge_in_float64(out_partial: torch.Tensor, lse_partial: torch.Tensor):
    """The merge's oracle, ``(out [rows, D], lse [rows])`` float64 from [splits, rows, D] and [splits,
    rows] parts, in plain torch ops: a part with LSE -inf weighs nothing and its output is not read
    (it may hold anything); a row no part saw gives 0 and -inf."""
    lse64 = lse_partial.double()
    top = lse64.max(0).values
    weights = torch.where(lse64 == -torch.inf, 0.0, torch.exp(lse64 - top.nan_to_num(neginf=0.0)))
    total = weights.sum(0)
    parts = torch.where(weights[..., None] > 0, out_partial.double(), 0.0)
    out = torch.where(total[:, None] > 0, (weights[..., None] * parts).sum(0) / total[:, None], 0.0)
    return out, torch.where(total > 0, top + total.log(), -torch.inf)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("splits, rows, head_dim, offset", [(7, 256, 128, 0), (1100, 3, 64, 0), (130, 32, 256, 0),
                                                             (9, 5, 6, 0), (6, 4, 128, 1)])
def test_gpu_cuda_merge_against_float64(splits, rows, head_dim, offset):
    """The CUDA merge (merge_attention_states on a GPU, the CUDA op where built) at the splits a
    decoding step merges (11 x 256 rows at batch 8; about 100 x 32 at batch 1) and past its shared
    memory's 1024 weights, every head dim's path (float4 columns; 6: a thread per column; an
    unaligned view), with parts and a row that saw no key, against the merge in float64."""
    prefixkern.build_cuda()
    torch.manual_seed(splits)
    flat = torch.randn(offset + splits * rows * head_dim, device="cuda")
    out_partial = flat[offset:].view(splits, rows, head_dim)
    lse_partial = torch.randn(splits, rows, device="cuda") * 4
    lse_partial[1::3, 0] = -torch.inf
    lse_partial[:, -1] = -torch.inf
    out_partial[:, -1] = 0.0
    want, want_lse = merge_in_float64(out_partial, lse_partial)
    for dtype in (torch.bfloat16, torch.float16):
        out, lse = prefixkern.merge_attention_states(out_partial, lse_partial, dtype)
        torch.testing.assert_close(lse, want_lse.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.float(), want.float(), atol=1e-2, rtol=1e-2)
        assert (out[-1] == 0).all() and lse[-1] == -torch.inf
    # No parts at all: every row 0 and -inf, as on the CPU (the CUDA op refuses a count of 0).
    none_out, none_lse = prefixkern.merge_attention_states(out_partial[:0], lse_partial[:0], torch.bfloat16)
    assert torch.equal(none_out, torch.zeros_like(none_out)) and torch.isinf(none_lse).all()


@pytest.mark.gpu
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.smoke) if _smoke(case) else case
                                  for case in GPU_GRID], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gpu_cuda_kernel_against_reference(case):
    _check_cuda_kernel(case)


# The tensor-core kernel with two K/V stages (PREFIXKERN_DECODE_STAGES=2, the decode suite's
# prefixkern_two_stage): every head dim, one and eight query positions, MHA and a group of 4, one key
# of each kind and a 4096-key cache of several tiles per chunk.
TWO_STAGE_GPU_GRID = [dict(kernel="mma", dtype=torch.bfloat16, D=D, Sq=Sq, gqa=gqa, P=P, L=L)
                      for D, Sq, gqa, (P, L) in itertools.product((64, 128, 256), (1, 8), (1, 4), ((1, 1), (30, 4096)))]


@pytest.mark.gpu
@pytest.mark.parametrize("case", TWO_STAGE_GPU_GRID, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gpu_two_stage_kernel_against_reference(case):
    with decode_attention.mma_stages(2):
        _check_cuda_kernel(case)


TRITON_GPU_GRID = [dict(dtype=dtype, D=D, Sq=Sq, gqa=gqa, P=P, L=L)
                   for dtype, D, Sq, gqa, (P, L) in itertools.product(
                       (torch.bfloat16, torch.float16, torch.float32), (64, 80, 128, 256), (1, 8), (1, 4, 7),
                       ((1, 1), (30, 4096), (128, 100)))
                   if not (D == 256 and gqa == 7 and Sq == 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.smoke)
                                  if case["D"] == 128 and case["Sq"] == 1 and case["gqa"] == 4
                                  and case["dtype"] != torch.float16 else case for case in TRITON_GPU_GRID],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_gpu_triton_decode_kernel_against_reference(case, monkeypatch):
    """The Triton decode kernel at full size (what decoding runs without the CUDA kernels at long
    caches and wide batches; forced here at every size)."""
    monkeypatch.setattr(decode_attention, "_cuda_ops_serving", lambda *args, **kwargs: None)
    with decode_attention.triton_decode_everywhere():
        _check_against_reference(case, [dict(num_splits=splits) for splits in (0, 1, 7)])


@pytest.mark.gpu
@pytest.mark.smoke
def test_gpu_compiled_decode_step_has_no_graph_break(monkeypatch):
    """On CUDA tensors a decoding step compiles whole (fullgraph): the traced step's custom op runs
    the CUDA kernel, as the eager step does, with its result."""
    inputs, kw = _inputs(3, 8, 2, 1, 300, 7, 128, torch.bfloat16, "cuda", prefix="per_task", padding=True)
    calls = []
    cuda_decode = decode_attention._cuda_decode
    monkeypatch.setattr(decode_attention, "_cuda_decode", lambda *args: calls.append(1) or cuda_decode(*args))

    def step(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index):
        return decode_attention.decode_step(q, k, v, prefix_k, prefix_v, softmax_scale=None,
                                            key_padding_mask=key_padding_mask, prefix_index=prefix_index)

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(step, fullgraph=True)(*inputs, **kw)
        assert calls, "the compiled step did not run the CUDA kernel"
        torch.testing.assert_close(got, step(*inputs, **kw), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("tensor_cores", [False, True])
def test_gpu_generate_uses_the_cuda_kernel(tensor_cores, monkeypatch):
    """A patched model's decoding steps go through the CUDA kernels (decode_step, no Python
    checks), every layer at every step, and score the first decoded token as the Triton path does;
    with PREFIXKERN_DECODE_TENSOR_CORES=1 or 0 (TENSOR_CORES) through the tensor-core or CUDA-core kernel
    (at this model's head dim 64 the default is the tensor-core one)."""
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from prefixkern import _cuda_build

    assert _cuda_build.cuda_ops() is not None, "the CUDA decode kernels failed to build on this GPU"
    if tensor_cores:
        assert _cuda_build.tensor_cores_usable(torch.cuda.current_device())
    monkeypatch.setattr(decode_attention, "TENSOR_CORES", tensor_cores)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)          # head dim 64
    base = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to("cuda", torch.bfloat16)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7))
    prefixkern.patch(model.to("cuda").eval())
    ids = torch.randint(2, 64, (3, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0                                                               # a left-padded row
    calls = []
    cuda_decode = decode_attention._cuda_decode
    # _cuda_decode(ops, q, k, v, prefix_k, prefix_v, mask, index, scale, splits, prefix_gemm, tensor_cores, lse)
    monkeypatch.setattr(decode_attention, "_cuda_decode", lambda *args: calls.append(args[11]) or cuda_decode(*args))

    def scores():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True)
        return out.scores

    with_cuda = scores()
    assert calls == [tensor_cores] * config.num_hidden_layers * 3                # 3 decoding steps, every layer
    monkeypatch.setattr(decode_attention, "_cuda_ops_serving", lambda *args, **kwargs: None)
    with_triton = scores()
    assert len(calls) == config.num_hidden_layers * 3
    torch.testing.assert_close(with_cuda[0], with_triton[0])                   # the prefill: one path
    torch.testing.assert_close(with_cuda[1], with_triton[1], atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
def test_gpu_static_cache_generate_compiles_its_decoding_steps(monkeypatch):
    """generate(cache_implementation="static") on a GPU: transformers compiles the decoding steps
    (inductor, CUDA graphs) over the patched model's PrefixKVStaticCache, their attention the CUDA
    kernel through the decode_step op, with the scores of the dynamic cache's eager decoding."""
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from prefixkern.integrations import hf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    base = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").to("cuda", torch.bfloat16)
    model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7))
    prefixkern.patch(model.to("cuda").eval())
    ids = torch.randint(2, 64, (3, 11), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    compiled = []
    # On the class: the patched generate() wraps the class's method for the call (an instance
    # attribute set here would be replaced, and was, on the first GPU run of this test).
    base_class = type(model.get_base_model())
    get_compiled_call = base_class.get_compiled_call
    monkeypatch.setattr(base_class, "get_compiled_call",
                        lambda self, *args: compiled.append(1) or get_compiled_call(self, *args))

    def scores(**kwargs):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6,
                                 do_sample=False, output_scores=True, return_dict_in_generate=True, **kwargs)
        return out

    dynamic = scores()
    calls = []
    cuda_decode = decode_attention._cuda_decode
    monkeypatch.setattr(decode_attention, "_cuda_decode", lambda *args: calls.append(1) or cuda_decode(*args))
    static = scores(cache_implementation="static")
    assert compiled and isinstance(static.past_key_values, hf.PrefixKVStaticCache)
    # The compiled steps' op ran the CUDA kernel (CUDA graphs replay it without Python: a few calls).
    assert calls, "the compiled decoding steps did not take the CUDA kernel"
    # The prefill (eager, both) and the first compiled step (later steps may follow a bf16 near-tie
    # apart: both attend with the CUDA kernel, but inductor computes the rest of the step its way).
    for got, want in zip(static.scores[:2], dynamic.scores[:2]):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
