"""pytest-benchmark: prefix attention, the prefix MLP and decode attention against their main
baselines; every benchmark asserts the correctness of the call it times."""
import pytest
import torch

from prefixkern import reference
from prefixkern.bench import attention as attn_suite
from prefixkern.bench import attention_dropout as dropout_suite
from prefixkern.bench import attention_packed as packed_suite
from prefixkern.bench import mlp as mlp_suite
from prefixkern.ops.decode_attention import prefix_decode_attention
from prefixkern.ops.prefix_attention import prefix_attention
from prefixkern.ops.prefix_mlp import fused_prefix_mlp

from _timing import cuda_timed

ATTN_SHAPES = ["seed-qwen", "paper-gpt2", "llama8b-2k"]
ATTN_IMPLS = ["prefixkern", "sdpa_mask", "sdpa_lower_right", "sdpa_lower_right_gqa"]


@pytest.mark.parametrize("impl", ATTN_IMPLS)
@pytest.mark.parametrize("shape", ATTN_SHAPES)
def test_attention_fwd_bwd(benchmark, shape, impl):
    spec = attn_suite.SHAPES[shape]
    leaves, dout = attn_suite.make_inputs(spec, "cuda", torch.bfloat16, requires_grad=True)
    fn = attn_suite.IMPLS[impl]
    expected, _ = attn_suite.reference_chunked(*leaves, dout, with_grads=False)
    assert attn_suite.scaled_err(fn(*leaves), expected) <= attn_suite.tolerance(torch.bfloat16)

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves).backward(dout)

    cuda_timed(benchmark, step)


@pytest.mark.parametrize("impl", ["prefixkern", "prefixkern_padded", "sdpa_mask"])
@pytest.mark.parametrize("shape", list(packed_suite.SHAPES))
def test_packed_attention_fwd_bwd(benchmark, shape, impl):
    """Ragged sequences packed (cu_seqlens) against padding them into rows."""
    spec = packed_suite.SHAPES[shape]
    leaves, dout, cu = packed_suite.make_inputs(spec, "cuda", torch.bfloat16, requires_grad=True)
    fn = packed_suite.IMPLS[impl]
    expected = reference.prefix_attention_varlen(*[t.detach().float() for t in leaves], cu, cu)
    assert attn_suite.scaled_err(fn(*leaves, cu), expected) <= attn_suite.tolerance(torch.bfloat16)

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*leaves, cu).backward(dout)

    cuda_timed(benchmark, step)


@pytest.mark.parametrize("impl", ["prefixkern", "prefixkern_no_dropout", "sdpa_mask", "sdpa_lower_right"])
@pytest.mark.parametrize("shape", list(dropout_suite.SHAPES))
def test_attention_dropout_fwd_bwd(benchmark, shape, impl):
    """GPT-2's training attention (dropout 0.1). prefixkern is checked under the mask its seed draws;
    the others with dropout off (their masks come from other generators), then timed with it on."""
    spec = dropout_suite.SHAPES[shape]
    leaves, dout = attn_suite.make_inputs(spec, "cuda", torch.bfloat16, requires_grad=True)
    checked, timed, under_mask = dropout_suite.checked_and_timed(impl, dropout_suite.IMPLS[impl])
    expected, _ = dropout_suite.oracle(spec, leaves, dout, dropout_suite.DROPOUT_P if under_mask else 0.0,
                                       with_grads=False)
    assert attn_suite.scaled_err(checked(*leaves), expected) <= attn_suite.tolerance(torch.bfloat16)

    def step():
        for leaf in leaves:
            leaf.grad = None
        timed(*leaves).backward(dout)

    cuda_timed(benchmark, step)


@pytest.mark.parametrize("impl", ["prefixkern", "torch_p_rows"])
@pytest.mark.parametrize("shape", list(mlp_suite.SHAPES))
def test_prefix_mlp_fwd_bwd(benchmark, shape, impl):
    spec = mlp_suite.SHAPES[shape]
    params = mlp_suite.parameters(spec, "cuda")
    kw = dict(num_layers=spec.L, num_kv_heads=spec.Hkv, head_dim=spec.D, out_dtype=torch.bfloat16)

    def fn():
        if impl == "torch_p_rows":   # under autocast: what autocast's Linear computes
            return reference.prefix_mlp(*params, **kw, compute_dtype=torch.bfloat16 if spec.autocast else None)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=spec.autocast):
            return fused_prefix_mlp(*params, **kw)

    expected = reference.prefix_mlp(*[p.detach().double() for p in params], **{**kw, "out_dtype": torch.float64})
    assert mlp_suite.scaled_err(fn(), expected) <= 1.6e-2
    grad = torch.randn(expected.shape, device="cuda", dtype=torch.bfloat16)

    def step():
        for p in params:
            p.grad = None
        fn().backward(grad)

    cuda_timed(benchmark, step)


@pytest.mark.parametrize("impl", ["prefixkern", "prefixkern_tensor_cores", "prefixkern_cuda_cores", "prefixkern_triton",
                                  "sdpa_concat"])
@pytest.mark.parametrize("batch,cache", [(1, 4096), (8, 4096), (64, 512)])
def test_decode_step(benchmark, batch, cache, impl):
    """One decoding step's attention: the decode path generate() takes (the csrc/ kernel; Triton
    where it cannot be built; at this head dim, 128, the tensor-core kernel), each CUDA kernel by
    name, the Triton kernel alone, and SDPA on the concatenated cache."""
    hq, hkv, d, p = 32, 8, 128, 30
    q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(2, batch, hkv, cache, d, device="cuda", dtype=torch.bfloat16)
    pk, pv = torch.randn(2, hkv, p, d, device="cuda", dtype=torch.bfloat16)
    cat_k = torch.cat([pk.expand(batch, -1, -1, -1), k], 2)
    cat_v = torch.cat([pv.expand(batch, -1, -1, -1), v], 2)
    if impl == "prefixkern":
        fn = lambda: prefix_decode_attention(q, k, v, pk, pv)  # noqa: E731
    elif impl in ("prefixkern_tensor_cores", "prefixkern_cuda_cores"):
        fn = lambda: prefix_decode_attention(q, k, v, pk, pv, tensor_cores=impl.endswith("tensor_cores"))  # noqa: E731
    elif impl == "prefixkern_triton":
        fn = lambda: prefix_attention(q, k, v, pk, pv)  # noqa: E731
    else:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(q, cat_k, cat_v, enable_gqa=True)  # noqa: E731
    expected = reference.prefix_attention(q, k, v, pk, pv)
    assert attn_suite.scaled_err(fn(), expected) <= 1.6e-2
    cuda_timed(benchmark, fn, rounds=100)
