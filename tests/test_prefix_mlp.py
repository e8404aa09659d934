"""fused_prefix_mlp and PrefixEncoder against PEFT's own PrefixEncoder and the reference.

On CPU the Triton kernels run in the interpreter (``use_backend("triton")``) at small, odd
sizes (D, h, d not multiples of 16); ``-m gpu`` runs the real model sizes on CUDA.
"""
import os

import pytest
import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning.model import PrefixEncoder as PeftPrefixEncoder

import prefixkern
from prefixkern import reference
from prefixkern.ops.prefix_mlp import fused_prefix_mlp
from prefixkern.prefix_encoder import PrefixEncoder

from conftest import (HAS_CUDA, TOLERANCES, assert_same_values_and_gradients, record_launch_arguments,
                      record_launches, strided_view)

SMALL = dict(num_layers=2, num_kv_heads=2, head_dim=12)   # N = 96, token_dim d = 24
SMALL_HIDDEN = 20


def _tol(dtype, kind):
    atol, rtol = TOLERANCES[dtype][kind]
    return dict(atol=atol, rtol=rtol)


def _peft_encoder(P, num_layers, num_kv_heads, head_dim, projection, hidden_size=None, device="cpu"):
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, num_layers=num_layers, token_dim=num_kv_heads * head_dim,
        num_attention_heads=num_kv_heads, encoder_hidden_size=hidden_size or num_kv_heads * head_dim,
        prefix_projection=projection,
    )
    return PeftPrefixEncoder(config).to(device)


def _peft_prefix(peft_encoder, batch, P, num_layers, num_kv_heads, head_dim, dtype):
    """What PEFT's get_prompt builds: the encoder on B*P rows, cast, viewed and permuted.
    Returns [L, 2, B, Hkv, P, D]."""
    tokens = torch.arange(P, device=peft_encoder.embedding.weight.device).unsqueeze(0).expand(batch, -1)
    rows = peft_encoder(tokens).to(dtype)
    kv = rows.view(batch, P, 2 * num_layers, num_kv_heads, head_dim).permute(2, 0, 3, 1, 4)
    return kv.reshape(num_layers, 2, batch, num_kv_heads, P, head_dim)


def _ours_from_peft(peft_encoder, projection, P, device="cpu", **sizes):
    ours = PrefixEncoder(P, **sizes, projection=projection,
                         hidden_size=peft_encoder.transform[0].out_features if projection else None, device=device)
    ours.load_state_dict(peft_encoder.state_dict())
    return ours


def _grads(module):
    return {name: p.grad.clone() for name, p in module.named_parameters()}


# ----------------------------------------------------------------------------------------------
# Against PEFT's PrefixEncoder: values and every parameter gradient
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("P", [1, 10, 30, 128])
def test_matches_peft_encoder(projection, dtype, P, device):
    torch.manual_seed(P)
    peft = _peft_encoder(P, **SMALL, projection=projection, hidden_size=SMALL_HIDDEN, device=device)
    ours = _ours_from_peft(peft, projection, P, device=device, **SMALL)
    expected = _peft_prefix(peft, 1, P, **SMALL, dtype=dtype)[:, :, 0]
    grad = torch.randn(expected.shape, device=device).to(dtype)
    expected.backward(grad)

    with prefixkern.use_backend("triton"):
        kv = ours(dtype)
        kv.backward(grad)
    assert kv.shape == (SMALL["num_layers"], 2, SMALL["num_kv_heads"], P, SMALL["head_dim"]) and kv.dtype == dtype
    torch.testing.assert_close(kv, expected, **_tol(dtype, "out"))
    peft_grads, our_grads = _grads(peft), _grads(ours)
    assert peft_grads.keys() == our_grads.keys()
    for name in peft_grads:
        assert our_grads[name].dtype == torch.float32
        torch.testing.assert_close(our_grads[name], peft_grads[name], **_tol(torch.float32, "grad"), msg=name)


@pytest.mark.parametrize("sizes,hidden", [
    (dict(num_layers=3, num_kv_heads=1, head_dim=20), 36),   # D not a multiple of 16, h > d
    (dict(num_layers=1, num_kv_heads=3, head_dim=7), 5),     # tiny ragged everything
])
def test_odd_sizes_against_reference(sizes, hidden, device):
    torch.manual_seed(1)
    P = 13
    d = sizes["num_kv_heads"] * sizes["head_dim"] + 3          # d need not be Hkv*D for the op
    N = 2 * sizes["num_layers"] * sizes["num_kv_heads"] * sizes["head_dim"]
    params = [torch.randn(P, d), torch.randn(hidden, d) / d**0.5, torch.randn(hidden),
              torch.randn(N, hidden) / hidden**0.5, torch.randn(N)]
    params = [p.to(device).requires_grad_() for p in params]
    expected = reference.prefix_mlp(*params, **sizes, out_dtype=torch.float32)
    grad = torch.randn(expected.shape, device=device)
    expected_grads = torch.autograd.grad(expected, params, grad)
    with prefixkern.use_backend("triton"):
        kv = fused_prefix_mlp(*params, **sizes)
        grads = torch.autograd.grad(kv, params, grad)
    torch.testing.assert_close(kv, expected, **_tol(torch.float32, "out"))
    for name, ours, ref in zip(("embedding", "w1", "b1", "w2", "b2"), grads, expected_grads):
        torch.testing.assert_close(ours, ref, **_tol(torch.float32, "grad"), msg=name)


def test_no_bias(device):
    torch.manual_seed(2)
    P, d, h = 5, 24, 20
    N = 2 * 2 * 2 * 12
    e, w1, w2 = (torch.randn(P, d, device=device).requires_grad_(),
                 (torch.randn(h, d, device=device) / 5).requires_grad_(),
                 (torch.randn(N, h, device=device) / 5).requires_grad_())
    expected = reference.prefix_mlp(e, w1, None, w2, None, **SMALL)
    grad = torch.randn(expected.shape, device=device)
    expected_grads = torch.autograd.grad(expected, (e, w1, w2), grad)
    with prefixkern.use_backend("triton"):
        kv = fused_prefix_mlp(e, w1, None, w2, None, **SMALL)
        grads = torch.autograd.grad(kv, (e, w1, w2), grad)
    torch.testing.assert_close(kv, expected, **_tol(torch.float32, "out"))
    for ours, ref in zip(grads, expected_grads):
        torch.testing.assert_close(ours, ref, **_tol(torch.float32, "grad"))


def test_reference_backend_matches_peft():
    torch.manual_seed(3)
    P = 6
    peft = _peft_encoder(P, **SMALL, projection=True, hidden_size=SMALL_HIDDEN)
    ours = _ours_from_peft(peft, True, P, **SMALL)
    with prefixkern.use_backend("reference"):
        kv = ours(torch.bfloat16)
    torch.testing.assert_close(kv, _peft_prefix(peft, 1, P, **SMALL, dtype=torch.bfloat16)[:, :, 0], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Batch-shared result vs PEFT's B expanded copies
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [True, False])
def test_batch_shared_gradient_equals_peft_expanded(projection, device):
    torch.manual_seed(4)
    P, batch, dtype = 10, 3, torch.bfloat16
    peft = _peft_encoder(P, **SMALL, projection=projection, hidden_size=SMALL_HIDDEN, device=device)
    ours = _ours_from_peft(peft, projection, P, device=device, **SMALL)
    expanded = _peft_prefix(peft, batch, P, **SMALL, dtype=dtype)         # [L, 2, B, Hkv, P, D]
    grad = torch.randn(expanded.shape, device=device).to(dtype)
    expanded.backward(grad)
    with prefixkern.use_backend("triton"):
        kv = ours(dtype)
        # Every batch row reads the shared prefix, so its gradient is the sum over rows; the
        # summed tensor is transposed here so the kernel reads a non-contiguous gradient.
        summed = grad.float().sum(2).to(dtype).transpose(-1, -2).contiguous().transpose(-1, -2)
        kv.backward(summed)
    for b in range(batch):
        torch.testing.assert_close(kv, expanded[:, :, b], **_tol(dtype, "out"))
    peft_grads, our_grads = _grads(peft), _grads(ours)
    for name in peft_grads:
        # The bf16 sum over B rounds once more than PEFT's float32 accumulation.
        torch.testing.assert_close(our_grads[name], peft_grads[name], **_tol(dtype, "grad"), msg=name)


def test_matches_peft_get_prompt_on_gqa_llama(device):
    """The real thing: PEFT's get_prompt on a GQA Llama (token_dim = Hkv * D), bf16 base model."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)   # head_dim 12
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)
    P, batch = 7, 2
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P,
                                                          prefix_projection=True, encoder_hidden_size=20))
    pconf = peft_model.peft_config["default"]
    assert (pconf.token_dim, pconf.num_attention_heads) == (24, 2)
    peft_encoder = peft_model.prompt_encoder["default"]
    ours = PrefixEncoder.from_peft(peft_encoder, num_layers=pconf.num_layers, num_kv_heads=pconf.num_attention_heads,
                                   head_dim=pconf.token_dim // pconf.num_attention_heads)
    cache = peft_model.get_prompt(batch_size=batch)
    with prefixkern.use_backend("triton"):
        kv = ours(torch.bfloat16)
    for layer in range(2):
        keys, values = cache.layers[layer].keys, cache.layers[layer].values       # [B, Hkv, P, D]
        for b in range(batch):
            torch.testing.assert_close(kv[layer, 0], keys[b], **_tol(torch.bfloat16, "out"))
            torch.testing.assert_close(kv[layer, 1], values[b], **_tol(torch.bfloat16, "out"))


# ----------------------------------------------------------------------------------------------
# State dicts and parameter sharing
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [True, False])
def test_state_dict_round_trip_both_ways(projection):
    torch.manual_seed(6)
    P = 4
    peft = _peft_encoder(P, **SMALL, projection=projection, hidden_size=SMALL_HIDDEN)
    ours = PrefixEncoder(P, **SMALL, projection=projection, hidden_size=SMALL_HIDDEN)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in peft.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in ours.state_dict().values())
    ours.load_state_dict(peft.state_dict())             # PEFT -> prefixkern, strict
    for k, v in peft.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v)
    fresh_peft = _peft_encoder(P, **SMALL, projection=projection, hidden_size=SMALL_HIDDEN)
    fresh_peft.load_state_dict(ours.state_dict())       # prefixkern -> PEFT, strict
    with torch.no_grad():
        expected = _peft_prefix(fresh_peft, 1, P, **SMALL, dtype=torch.float32)[:, :, 0]
    torch.testing.assert_close(ours(), expected, **_tol(torch.float32, "out"))


def test_from_peft_shares_parameters(device):
    torch.manual_seed(7)
    P = 5
    peft = _peft_encoder(P, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, device=device)
    ours = PrefixEncoder.from_peft(peft, **SMALL)
    assert ours.embedding.weight is peft.embedding.weight
    assert ours.transform[2].weight is peft.transform[2].weight
    with prefixkern.use_backend("triton"):
        ours().sum().backward()
    assert peft.transform[0].weight.grad is not None and peft.embedding.weight.grad is not None
    with torch.no_grad():
        peft.transform[2].bias.add_(1.0)
    with prefixkern.use_backend("triton"), torch.no_grad():
        kv = ours()
    torch.testing.assert_close(kv, _peft_prefix(peft, 1, P, **SMALL, dtype=torch.float32)[:, :, 0],
                               **_tol(torch.float32, "out"))
    with pytest.raises(ValueError, match="embedding.weight"):
        PrefixEncoder.from_peft(peft, num_layers=3, num_kv_heads=2, head_dim=5)


def test_projection_false_is_a_view():
    P = 3
    enc = PrefixEncoder(P, **SMALL)
    for backend in ("triton", "reference", "auto"):
        with prefixkern.use_backend(backend):
            kv = enc()
        assert kv.data_ptr() == enc.embedding.weight.data_ptr()
        assert kv._base is enc.embedding.weight
    rows = enc.embedding.weight
    for layer in range(2):
        for t in range(2):
            for g in range(2):
                col = ((layer * 2 + t) * 2 + g) * 12
                torch.testing.assert_close(kv[layer, t, g], rows[:, col:col + 12], atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------
# Dropout (Philox in the kernel, regenerated in backward)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("projection", [True, False])
def test_dropout_mask_is_exact_and_reproducible(projection, device):
    torch.manual_seed(8)
    P, p = 30, 0.3
    peft = _peft_encoder(P, **SMALL, projection=projection, hidden_size=SMALL_HIDDEN, device=device)
    ours = _ours_from_peft(peft, projection, P, device=device, **SMALL)
    ours.dropout = p
    params = dict(ours.named_parameters())
    with prefixkern.use_backend("triton"):
        torch.manual_seed(123)
        kv = ours()
        torch.manual_seed(123)
        again = ours()
        torch.manual_seed(124)
        other = ours()
        grad = torch.randn(kv.shape, device=device)
        kv.backward(grad)
    assert torch.equal(kv, again), "same seed, different dropout mask"
    assert not torch.equal(kv != 0, other != 0), "different seeds gave the same mask"

    # The inputs are never exactly zero, so the zeros of the output are the dropped elements.
    keep_kv = kv != 0
    keep = keep_kv.permute(3, 0, 1, 2, 4).reshape(P, -1)                    # [P, N], column c as PEFT
    rate = 1.0 - keep.float().mean().item()
    assert abs(rate - p) < 0.05, f"dropout rate {rate:.3f} for p={p}"
    weights = [params.get(n) for n in ("transform.0.weight", "transform.0.bias", "transform.2.weight",
                                       "transform.2.bias")]
    leaves = [params["embedding.weight"].detach().requires_grad_()] + [
        w.detach().requires_grad_() if w is not None else None for w in weights]
    expected = reference.prefix_mlp(*leaves, **SMALL, dropout_p=p, dropout_keep=keep)
    torch.testing.assert_close(kv, expected, **_tol(torch.float32, "out"))
    present = [t for t in leaves if t is not None]
    expected_grads = torch.autograd.grad(expected, present, grad)
    names = ["embedding.weight"] + [n for n, w in zip(("transform.0.weight", "transform.0.bias",
                                                       "transform.2.weight", "transform.2.bias"), weights)
                                    if w is not None]
    for name, ref in zip(names, expected_grads):
        torch.testing.assert_close(params[name].grad, ref, **_tol(torch.float32, "grad"), msg=name)


def test_eager_launch_skips_the_dispatcher_and_equals_the_custom_op(device):
    """Eager calls launch through an autograd.Function; the custom op (torch.compile's path) gives
    the same values and gradients bit for bit."""
    torch.manual_seed(9)
    P, d, h, N = 6, 24, 20, 2 * 2 * 2 * 12
    params = [torch.randn(P, d), torch.randn(h, d) / 5, torch.randn(h), torch.randn(N, h) / 5, torch.randn(N)]
    ours = [p.to(device).requires_grad_() for p in params]
    via_op = [p.to(device).requires_grad_() for p in params]
    with prefixkern.use_backend("triton"):
        kv = fused_prefix_mlp(*ours, **SMALL, out_dtype=torch.bfloat16)
        assert type(kv.grad_fn).__name__ == "_PrefixMlpFunctionBackward"
        op_kv, _ = torch.ops.prefixkern.prefix_mlp_fwd(*via_op, 2, 2, 12, torch.bfloat16, torch.float32, 0.0,
                                                         None)
        assert_same_values_and_gradients(kv, op_kv, ours, via_op)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("projection", [True, False])
def test_raw_launch_equals_a_plain_launch(monkeypatch, projection, device):
    """PREFIXKERN_RAW_LAUNCH=1 gives the same prefix and parameter gradients bit for bit, with
    dropout (its seed tensor is a kernel argument too): its first launches (through launch_kernel)
    and its later ones (the compiled kernels the launch plans kept, given the tensors' addresses)."""
    from prefixkern.kernels import _launch
    from prefixkern.kernels import prefix_mlp as kernels

    def run(raw):
        monkeypatch.setattr(_launch, "RAW_POINTERS", raw)
        encoder = PrefixEncoder(30, num_layers=4, num_kv_heads=2, head_dim=64, projection=projection,
                                hidden_size=128 if projection else None, dropout=0.1, device=device)
        torch.manual_seed(5)
        for p in encoder.parameters():
            torch.nn.init.normal_(p, std=0.1)
        kv = encoder(torch.bfloat16)        # the same dropout seed both times (drawn after manual_seed)
        kv.backward(torch.randn(kv.shape, generator=torch.Generator().manual_seed(1)).to(kv))
        return [kv] + [p.grad for p in encoder.parameters()]

    want = run(False)
    first = run(True)
    steps = [*kernels._COPY_PLANS.values()]
    for chain in (*kernels._FWD_PLANS.values(), *kernels._BWD_PLANS.values()):
        for step in chain.steps:
            steps += getattr(step, "plans", [step])         # (a LaunchGroup's launches)
    assert steps and all(plan.raw is not None for plan in steps)
    again = run(True)
    for got_first, got_again, expected in zip(first, again, want):
        assert torch.equal(got_first, expected) and torch.equal(got_again, expected)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torch_compile_fullgraph(dropout, device):
    """The custom ops trace without a graph break; AOT autograd compiles the backward through
    prefix_mlp_bwd's fake. Same seed, same dropout mask as eager."""
    torch.manual_seed(10)
    P = 6
    enc = PrefixEncoder(P, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, dropout=dropout, device=device)
    grad = torch.randn(2, 2, 2, P, 12, device=device)

    def loss_fn(module):
        kv = module(torch.bfloat16)
        return (kv.float() * grad).sum(), kv

    with prefixkern.use_backend("triton"):
        torch.manual_seed(11)
        eager_loss, eager = loss_fn(enc)
        eager_loss.backward()
        eager_grads = _grads(enc)
        enc.zero_grad(set_to_none=True)
        torch._dynamo.reset()
        compiled_fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
        torch.manual_seed(11)
        loss, compiled = compiled_fn(enc)
        loss.backward()
    torch.testing.assert_close(compiled, eager, atol=0, rtol=0)
    if dropout:
        assert (compiled == 0).any()
    for name, g in _grads(enc).items():
        torch.testing.assert_close(g, eager_grads[name], atol=0, rtol=0, msg=name)


def test_torch_compile_traces_the_autocast_choice(device):
    """Under autocast the product dtype is read when the graph is traced and passed to the custom
    op: no graph break, the same bf16 values as eager."""
    torch.manual_seed(13)
    P = 6
    enc = PrefixEncoder(P, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, device=device)

    def forward(module):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return module()

    with prefixkern.use_backend("triton"):
        eager = forward(enc)
        torch._dynamo.reset()
        compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")(enc)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    assert torch.equal(compiled, eager)


def _force_candidate(monkeypatch, kernels, tile, tuned=("mlp-bwd",)) -> None:
    """The launches tuned under the names ``tuned`` (the backward's, by default) take ``tile`` (a
    BwdTile or LIBRARY_PRODUCTS; a matmul tile for "mlp-matmul" and "mlp-matmul-pair") whatever
    their candidates, and report it as a tuned choice (``launched_tiles``). The launch plans kept
    so far are dropped, and the tuner holds ``tile`` for each key forced from now on (undone with
    the test), so the plans made with it stay current (``LaunchPlan.current``)."""
    from prefixkern.kernels import _launch

    real_pick = kernels.pick_config
    _launch.forget_plans()

    def pick(key, candidates, launch):
        if key[0] not in tuned:
            return real_pick(key, candidates, launch)
        monkeypatch.setitem(_launch._TUNED, key, tile)
        _launch._LAST[key[0]] = tile
        return tile

    monkeypatch.setattr(kernels, "pick_config", pick)


@pytest.mark.parametrize("launches", [1, 2, "strips", "w2_lhs", "library"])
@pytest.mark.parametrize("P,hidden,layout,bias,D", [(17, 45, "contiguous", True, 20), (33, 20, "p_outer", True, 16),
                                                     (1, 45, "contiguous", False, 32), (12, 45, "p_outer", True, 20)])
def test_backward_writes_every_gradient_element(monkeypatch, P, hidden, layout, bias, D, launches, device):
    """Fresh buffers filled with NaN (torch's fill_uninitialized_memory): every gradient element is
    written by exactly the programs that own it, at ragged sizes (P, h, N not tile multiples) and
    with a gradient whose P axis is outermost; values against float64 autograd. With the dH and the
    dW2 programs in one launch, in a launch each (the tiles offered where W2 is large), and with
    the dW2 launch walking strips of tiles where one P tile covers every row (P <= 16 in the
    interpreter; beyond, the tile falls back to a program per dW2 tile): 8 tiles along N in
    strips of 3, the last one ragged; "w2_lhs": two launches, the dH programs computing dH^T =
    W2^T G^T. "library": the W2 products by torch.mm (LIBRARY_PRODUCTS), one dH partial summed by
    the hidden kernel. Head dims 16 and 32 read G's column tiles inside a head (a scalar base, no
    column mask: ``_kv_tile_pointers``), 20 by per-column offsets."""
    from prefixkern.kernels import prefix_mlp as kernels

    _fresh_tuner(monkeypatch, device)
    launched = _record_launches(monkeypatch)
    if launches == "library":
        _force_candidate(monkeypatch, kernels, kernels.LIBRARY_PRODUCTS)
    elif launches != 1:
        monkeypatch.setattr(kernels, "INTERPRETER_BWD_TILE", kernels.INTERPRETER_BWD_TILE._replace(
            dw_num_warps=4, dw_num_stages=1, dw_strips=launches == "strips", dh_w2_lhs=launches == "w2_lhs"))
    torch.manual_seed(15)
    L, Hkv, d = 3, 1, 24
    N = 2 * L * Hkv * D
    params = [torch.randn(P, d), torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden) if bias else None,
              torch.randn(N, hidden) / hidden ** 0.5, torch.randn(N) if bias else None]
    params = [None if t is None else t.to(device) for t in params]
    if layout == "p_outer":
        grad = torch.randn(P, L, 2, Hkv, D, device=device).permute(1, 2, 3, 0, 4)
    else:
        grad = torch.randn(L, 2, Hkv, P, D, device=device)
    sizes = dict(num_layers=L, num_kv_heads=Hkv, head_dim=D)
    deterministic, fill = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        _, hidden_act = kernels.prefix_mlp_forward(*params, **sizes, out_dtype=torch.float32,
                                                   compute_dtype=torch.float32, dropout_p=0.0, seed=None)
        grads = kernels.prefix_mlp_backward(grad, *params, hidden_act, **sizes, compute_dtype=torch.float32,
                                            dropout_p=0.0, seed=None)
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    leaves = [None if t is None else t.double().requires_grad_() for t in params]
    expected = reference.prefix_mlp(*leaves, **sizes, out_dtype=torch.float64)
    wanted = torch.autograd.grad(expected, [t for t in leaves if t is not None], grad.double())
    names = [name for name, t in zip(("dE", "dW1", "db1", "dW2", "db2"), params) if t is not None]
    got = [g for g, t in zip(grads, params) if t is not None]
    for name, ours, ref in zip(names, got, wanted):
        assert not torch.isnan(ours).any(), f"{name}: elements left unwritten"
        torch.testing.assert_close(ours.double(), ref, atol=1e-4, rtol=1e-4, msg=name)
    if device.type == "cpu":       # (on a GPU the first candidate of the table runs, whatever the test set)
        roles = [meta["ROLES"] for name, meta in launched if name == "prefix_mlp_bwd_kernel"]
        strips = launches == "strips" and P <= kernels.bwd_block_p(P, "ieee")
        expected = {1: ["both"], "library": []}.get(launches, ["dh", "dw2_strip" if strips else "dw2"])
        assert roles == expected


def test_strided_operands(device):
    """Every operand as a strided view (every other column or entry of a wider tensor; the biases
    were read at unit stride, as if contiguous, until 2026-11-28): the values and every gradient of
    the contiguous operands."""
    torch.manual_seed(3)
    P, d, h = 5, 24, SMALL_HIDDEN
    N = 2 * SMALL["num_layers"] * SMALL["num_kv_heads"] * SMALL["head_dim"]
    params = [torch.randn(P, d, device=device), torch.randn(h, d, device=device) / d ** 0.5,
              torch.randn(h, device=device), torch.randn(N, h, device=device) / h ** 0.5, torch.randn(N, device=device)]
    runs = []
    for view in (lambda t: t, strided_view):
        leaves = [t.clone().requires_grad_() for t in params]
        operands = [view(t) for t in leaves]
        assert all(o.is_contiguous() for o in operands) == (view is not strided_view)
        with prefixkern.use_backend("triton"):
            out = fused_prefix_mlp(*operands, **SMALL)
        out.backward(torch.ones_like(out))
        runs.append([out] + [t.grad for t in leaves])
    expected = reference.prefix_mlp(*params, **SMALL)
    torch.testing.assert_close(runs[0][0], expected, **_tol(torch.float32, "out"))
    for name, got, want in zip(("out", "dE", "dW1", "db1", "dW2", "db2"), *runs):
        torch.testing.assert_close(got, want, **_tol(torch.float32, "grad"), msg=name)


def _fresh_tuner(monkeypatch, device) -> None:
    """On the CPU, forget the tiles the tuner holds for the rest of the test: the interpreter's
    tables have one tile each, which a test replaces (``INTERPRETER_BWD_TILE``), and the tuner
    would otherwise keep the tile an earlier test of the same sizes got. (A GPU keeps its tuning:
    there the tables' own candidates run, whatever the test set.)"""
    from prefixkern.kernels import _launch

    if device.type == "cpu":
        monkeypatch.setattr(_launch, "_TUNED", {})


def _record_launches(monkeypatch) -> list:
    """``(kernel name, constexprs and launch options)`` of each prefix-MLP kernel launch from now
    on, in launch order."""
    from prefixkern.kernels import prefix_mlp as kernels

    return record_launches(monkeypatch, (kernels,))


def test_two_launch_backward_tiles_only_where_w2_is_large(monkeypatch):
    """The backward's tuning candidates (as on a GPU): the one-launch tiles always, first; the
    two-launch ones (dW2 programs in a launch of their own) beside them from
    BWD_TWO_LAUNCH_MIN_W2 elements of W2: Llama-3-8B's and bloomz-560m's, not Qwen2.5-0.5B's; of
    those, the strip ones only where one P tile holds every row."""
    from prefixkern.kernels import prefix_mlp as mlp

    monkeypatch.setattr(mlp, "triton_interpret", lambda: False)
    for precision in ("tf32x3", "ieee", "bf16", "tf32"):
        table = mlp.BWD_TILES[mlp._bwd_table(precision)]
        small = mlp.bwd_candidates(64, precision, 6144 * 128)            # Qwen2.5-0.5B: N x h
        large = mlp.bwd_candidates(64, precision, 65536 * 1024)          # Llama-3-8B
        assert small == list(table) and all(t.dw_num_warps == 0 for t in small)
        assert large[:len(table)] == list(table)
        assert large[len(table):] and all(t.dw_num_warps > 0 and t.dw_num_stages > 0 for t in large[len(table):])
        # dW2 strips where one P tile covers every row: P = 64 but under FMA products (32-row tiles).
        fits = precision != "ieee"
        assert any(t.dw_strips for t in large) == fits and not any(t.dw_strips for t in small)
        assert any(t.dw_strips for t in mlp.bwd_candidates(32, precision, 65536 * 1024))
        assert not any(t.dw_strips for t in mlp.bwd_candidates(65, precision, 65536 * 1024))
    # cuBLAS's products, last, only where asked (library_products_offered says where).
    assert mlp.bwd_candidates(64, "tf32x3", 65536 * 1024, library=True)[-1] is mlp.LIBRARY_PRODUCTS
    assert mlp.LIBRARY_PRODUCTS not in mlp.bwd_candidates(64, "tf32x3", 65536 * 1024)
    # A strip takes about four programs per SM of tiles: 16 of Llama-3-8B's 8192 64 x 64 tiles on an
    # H100's or H200's 132 SMs; a tile each where there are fewer tiles than that.
    monkeypatch.setattr(mlp, "num_sms", lambda index: 132)
    assert mlp.dw2_strip_tiles(8192, torch.device("cuda", 0)) == 16
    assert mlp.dw2_strip_tiles(300, torch.device("cuda", 0)) == 1


def test_library_products_offered_where_cublas_computes_what_the_kernels_would(monkeypatch):
    """cuBLAS takes the backward's W2 products only as a timed candidate on a GPU, for a large
    float32 W2 (and b2) under float32 products (exact or TF32): 16-bit products would need a copy
    of W2, and a small W2 is host-bound already (Qwen2.5-0.5B's 0.8M elements)."""
    from prefixkern.kernels import prefix_mlp as mlp

    class Meta:        # a tensor's device, dtype and size, all the rule reads
        def __init__(self, elements, dtype=torch.float32, device="cuda"):
            self.device, self.dtype, self.elements = torch.device(device), dtype, elements

        def numel(self):
            return self.elements

    llama, bias = Meta(65536 * 1024), Meta(65536)
    for precision in ("tf32x3", "ieee", "tf32"):
        assert mlp.library_products_offered(precision, llama, bias)
        assert mlp.library_products_offered(precision, llama, None)
    assert not mlp.library_products_offered("bf16", llama, bias)
    assert not mlp.library_products_offered("tf32x3", Meta(65536 * 1024, torch.bfloat16), None)
    assert not mlp.library_products_offered("tf32x3", llama, Meta(65536, torch.bfloat16))
    assert not mlp.library_products_offered("tf32x3", Meta(6144 * 128), bias)
    assert not mlp.library_products_offered("tf32x3", Meta(65536 * 1024, device="cpu"), bias)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_library_products_give_the_fused_backwards_gradients(monkeypatch, dropout_p, device):
    """The backward with its W2 products by torch.mm (LIBRARY_PRODUCTS, forced) against the fused
    kernels' tile: the same gradients of every parameter, dropout's regenerated mask included (the
    products then read the masked [P, N] rows), and the tile it ran with reported as such."""
    from prefixkern.kernels import prefix_mlp as kernels
    from prefixkern.ops.prefix_mlp import launched_tiles

    torch.manual_seed(4)
    enc = PrefixEncoder(9, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, dropout=dropout_p, device=device)
    grad = torch.randn(SMALL["num_layers"], 2, SMALL["num_kv_heads"], 9, SMALL["head_dim"], device=device)
    results = []
    for library in (False, True):
        if library:
            _force_candidate(monkeypatch, kernels, kernels.LIBRARY_PRODUCTS)
        enc.zero_grad(set_to_none=True)
        launched_tiles()
        torch.manual_seed(5)        # the same dropout seed both times
        with prefixkern.use_backend("triton"):
            enc(torch.float32).backward(grad)
        tiles = launched_tiles()
        assert tiles["bwd"].startswith("library=") == library, tiles
        results.append({name: p.grad.clone() for name, p in enc.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_launched_tiles_name_every_field(monkeypatch, device):
    """What the benchmarks record beside a timing: every tile field labelled, for each kernel."""
    from prefixkern.ops.prefix_mlp import launched_tiles

    from prefixkern.kernels import prefix_mlp as kernels

    enc = PrefixEncoder(5, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, device=device)
    launched_tiles()
    with prefixkern.use_backend("triton"):      # a small MLP: the one-launch forward, first Linear's backward
        enc(torch.bfloat16).float().sum().backward()
    fused = launched_tiles()
    assert set(fused) == {"fwd", "bwd", "bwd-first"} and fused["fwd"].endswith(",fused_hidden=True"), fused
    assert fused["bwd-first"].count("=") == 5, fused
    monkeypatch.setattr(kernels, "FUSED_MAX_W1", 0)
    with prefixkern.use_backend("triton"):
        enc(torch.bfloat16).float().sum().backward()
    tiles = launched_tiles()
    assert set(tiles) == {"fwd", "bwd", "gemm", "gemm-pair"}
    assert tiles["fwd"] == fused["fwd"].removesuffix(",fused_hidden=True"), (tiles, fused)
    assert tiles["bwd"].startswith("DH_BLOCK_N=") and tiles["bwd"].count("=") == 6, tiles["bwd"]
    if device.type == "cpu":       # the interpreter's one tile, made a two-launch one
        _fresh_tuner(monkeypatch, device)
        monkeypatch.setattr(kernels, "INTERPRETER_BWD_TILE", kernels.INTERPRETER_BWD_TILE._replace(
            dw_num_warps=4, dw_num_stages=1))
        with prefixkern.use_backend("triton"):
            enc(torch.bfloat16).float().sum().backward()
        assert launched_tiles()["bwd"].endswith(",warps=4,stages=1,dw_warps=4,dw_stages=1"), launched_tiles()
    assert tiles["fwd"].startswith("BLOCK_P=") and tiles["fwd"].count("=") == 5, tiles
    assert tiles["gemm"].count("=") == 5 and tiles["gemm-pair"].count("=") == 5, tiles
    assert launched_tiles() == {}


def _plan_case(P: int, bias: bool, dropout_p: float):
    """Parameters, seed, a gradient with P outermost and an H for ``kernels.prefix_mlp_forward`` and
    ``prefix_mlp_backward`` at SMALL's sizes (d = 24, h = SMALL_HIDDEN), for recorded launches."""
    N = 2 * SMALL["num_layers"] * SMALL["num_kv_heads"] * SMALL["head_dim"]
    params = [torch.randn(P, 24), torch.randn(SMALL_HIDDEN, 24), torch.randn(SMALL_HIDDEN) if bias else None,
              torch.randn(N, SMALL_HIDDEN), torch.randn(N) if bias else None]
    seed = torch.tensor([77]) if dropout_p else None
    grad = torch.randn(P, SMALL["num_layers"], 2, SMALL["num_kv_heads"], SMALL["head_dim"]).permute(1, 2, 3, 0, 4)
    return params, seed, grad, torch.zeros(P, SMALL_HIDDEN)


def _mlp_launches(kernels, launches, params, seed, grad, hidden, dropout_p):
    """The launches one forward and one backward make (recorded by ``record_launch_arguments``)."""
    launches.clear()
    kernels.prefix_mlp_forward(*params, **SMALL, out_dtype=torch.bfloat16, compute_dtype=torch.float32,
                               dropout_p=dropout_p, seed=seed)
    kernels.prefix_mlp_backward(grad, *params, hidden, **SMALL, compute_dtype=torch.float32, dropout_p=dropout_p,
                                seed=seed)
    return list(launches)


@pytest.mark.parametrize("P,bias,dropout_p,small,two_launch", [
    (5, True, 0.0, True, False), (5, True, 0.0, False, False), (17, False, 0.3, False, True),
    (9, True, 0.3, True, True)])
def test_launch_plans_replay_the_launches_they_were_made_from(monkeypatch, P, bias, dropout_p, small, two_launch):
    """A forward or backward whose layout has a kept launch plan launches exactly what the call
    that made the plan launched (kernel, grid, constexprs, every argument; its own tensors in the
    same places), and exactly what a call without plans launches: a small MLP's one-launch forward
    and first Linear's backward, the larger one's first GEMM, tanh kernel and GEMM pair, dropout's
    gradient rows (a plan of their own), the products in one launch and in two. Launches recorded,
    not run."""
    from prefixkern.kernels import _launch
    from prefixkern.kernels import prefix_mlp as kernels

    _fresh_tuner(monkeypatch, torch.device("cpu"))
    if not small:
        monkeypatch.setattr(kernels, "FUSED_MAX_W1", 0)
    if two_launch:
        monkeypatch.setattr(kernels, "INTERPRETER_BWD_TILE", kernels.INTERPRETER_BWD_TILE._replace(
            dw_num_warps=4, dw_num_stages=1))
    launches, known = record_launch_arguments(monkeypatch, (kernels,))
    torch.manual_seed(3)
    params, seed, grad, hidden = _plan_case(P, bias, dropout_p)
    known += [*params, seed, grad, hidden]
    with _launch.launch_plans(False):
        unplanned = _mlp_launches(kernels, launches, params, seed, grad, hidden, dropout_p)
    assert not kernels._FWD_PLANS and not kernels._BWD_PLANS and not kernels._COPY_PLANS
    made = _mlp_launches(kernels, launches, params, seed, grad, hidden, dropout_p)
    replayed = _mlp_launches(kernels, launches, params, seed, grad, hidden, dropout_p)
    assert len(kernels._FWD_PLANS) == len(kernels._BWD_PLANS) == 1
    assert len(kernels._COPY_PLANS) == (1 if dropout_p else 0)
    expected = (["prefix_mlp_fwd_kernel"] if small else ["prefix_mlp_matmul_kernel", "prefix_mlp_fwd_kernel"]) + (
        ["prefix_kv_copy_kernel"] if dropout_p else []) + ["prefix_mlp_bwd_kernel"] * (2 if two_launch else 1) + (
        ["prefix_mlp_bwd_first_kernel"] if small else ["prefix_mlp_bwd_hidden_kernel", "prefix_mlp_matmul_pair_kernel"])
    assert [name for name, *_ in unplanned] == expected
    assert made == unplanned
    assert replayed == unplanned


def test_mlp_launch_plans_follow_the_tile_and_the_switches(monkeypatch):
    """A kept plan is not taken once what made it changed: the one-launch forward's switch
    (``FUSED_MAX_W1``, in the plan's key), the tile the tuner holds for a launch (tests and
    benchmarks force tiles), or a backward whose products ran as ``torch.mm`` (no Triton launch:
    its chain is never taken again)."""
    from prefixkern.kernels import _launch
    from prefixkern.kernels import prefix_mlp as kernels

    _fresh_tuner(monkeypatch, torch.device("cpu"))
    launches, _ = record_launch_arguments(monkeypatch, (kernels,))
    torch.manual_seed(3)
    case = _plan_case(5, True, 0.0)

    def names():
        return [name for name, *_ in _mlp_launches(kernels, launches, *case, 0.0)]

    small = ["prefix_mlp_fwd_kernel", "prefix_mlp_bwd_kernel", "prefix_mlp_bwd_first_kernel"]
    assert names() == names() == small
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "FUSED_MAX_W1", 0)
        assert names() == ["prefix_mlp_matmul_kernel", "prefix_mlp_fwd_kernel", "prefix_mlp_bwd_kernel",
                           "prefix_mlp_bwd_hidden_kernel", "prefix_mlp_matmul_pair_kernel"]
    assert names() == small
    (key,) = [key for key in _launch._TUNED if key[0] == "mlp-bwd"]
    monkeypatch.setitem(_launch._TUNED, key, _launch._TUNED[key]._replace(dw_num_warps=4, dw_num_stages=1))
    two = ["prefix_mlp_fwd_kernel", "prefix_mlp_bwd_kernel", "prefix_mlp_bwd_kernel", "prefix_mlp_bwd_first_kernel"]
    assert names() == names() == two
    assert [meta["ROLES"] for name, _, _, meta in launches if name == "prefix_mlp_bwd_kernel"] == ["dh", "dw2"]
    _force_candidate(monkeypatch, kernels, kernels.LIBRARY_PRODUCTS)
    library = ["prefix_mlp_fwd_kernel", "prefix_kv_copy_kernel", "prefix_mlp_bwd_first_kernel"]
    assert names() == names() == library
    assert not kernels._BWD_PLANS       # (its step holds the call's gradient rows: no chain kept)


@pytest.mark.parametrize("out_dtype,autocast", [(torch.float32, False), (torch.bfloat16, False),
                                                 (torch.bfloat16, True)])
@pytest.mark.parametrize("P,bias,dropout_p", [(1, True, 0.0), (17, False, 0.0), (33, True, 0.3)])
def test_one_launch_forward_matches_two_launches(monkeypatch, P, bias, dropout_p, out_dtype, autocast, device):
    """A small MLP's forward computes H inside its one launch (small_mlp): the same output, the
    same H kept for the backward, hence the same gradients, as the first GEMM launched apart
    (FUSED_MAX_W1 = 0), under float32, 16-bit and autocast products, with and without biases and
    dropout (same seed: same mask); and it launches only the forward kernel."""
    from prefixkern.kernels import prefix_mlp as kernels

    torch.manual_seed(6)
    d, hidden = 40, 36                  # ragged against the tiles: d over two BLOCK_D steps
    params = [torch.randn(P, d), torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden) if bias else None,
              torch.randn(2 * SMALL["num_layers"] * SMALL["num_kv_heads"] * SMALL["head_dim"], hidden) / hidden ** 0.5,
              torch.randn(2 * SMALL["num_layers"] * SMALL["num_kv_heads"] * SMALL["head_dim"]) if bias else None]
    grad = torch.randn(SMALL["num_layers"], 2, SMALL["num_kv_heads"], P, SMALL["head_dim"], device=device)
    assert kernels.small_mlp(P, d, hidden, params[3].shape[0], "bf16")
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(kernels, "FUSED_MAX_W1", 0)
        leaves = [None if t is None else t.to(device).requires_grad_() for t in params]
        launched = _record_launches(monkeypatch)
        torch.manual_seed(7)
        with prefixkern.use_backend("triton"), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out = prefixkern.fused_prefix_mlp(*leaves, **SMALL, out_dtype=out_dtype, dropout_p=dropout_p)
        forward = [name for name, _ in launched]
        out.backward(grad.to(out.dtype))
        results.append([out.detach().float()] + [t.grad for t in leaves if t is not None])
        assert forward == (["prefix_mlp_fwd_kernel"] if fused else
                           ["prefix_mlp_matmul_kernel", "prefix_mlp_fwd_kernel"]), forward
    for number, (one, two) in enumerate(zip(*results)):
        torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5, msg=f"output and gradients, item {number}")


def test_one_launch_forward_only_for_small_mlps(monkeypatch):
    """small_mlp: Qwen2.5-0.5B's MLP (PEFT's default hidden size, token_dim 128) is small (one-launch
    forward, first Linear's backward in one launch, few dH partials); bloomz-560m's
    (1024 x 1024 W1) and Llama-3-8B's do not, nor a P beyond one forward tile (16 rows under FMA
    products)."""
    from prefixkern.kernels import prefix_mlp as kernels

    for precision in ("tf32x3", "bf16", "tf32", "ieee"):
        assert kernels.small_mlp(20, 128, 128, 6144, precision) == (precision != "ieee")
        assert not kernels.small_mlp(30, 1024, 1024, 49152, precision)
        assert not kernels.small_mlp(64, 1024, 1024, 65536, precision)
        assert not kernels.small_mlp(65, 128, 128, 6144, precision)
        assert not kernels.small_mlp(20, 128, 1024, 6144, precision)          # W2 of 6.3M elements
    # FMA products: wider P tiles with H's chunk spill, so P up to 16 (17: the first GEMM apart).
    assert kernels.small_mlp(64, 128, 128, 6144, "bf16") and kernels.small_mlp(16, 128, 128, 6144, "ieee")
    assert not kernels.small_mlp(17, 128, 128, 6144, "ieee")
    # A small MLP's backward takes few dH partials (each tile of its first Linear's backward sums
    # them): 8 at Qwen2.5-0.5B's size on a 132-SM GPU, where a large one's take up to a split per
    # 64 columns.
    monkeypatch.setattr(kernels, "num_sms", lambda index: 132)
    monkeypatch.setattr(kernels, "triton_interpret", lambda: False)        # (the GPU's tables)
    gpu = torch.device("cuda", 0)
    assert kernels._num_splits(6144, 128, gpu, kernels.SMALL_MLP_MAX_SPLITS)[0] == 8
    assert kernels._num_splits(6144, 128, gpu)[0] == 96


def test_forward_candidates_split_p_for_exact_float32_only(monkeypatch):
    """The forward's tuning candidates (as on a GPU): all P rows in one tile first; 32-row tiles
    beside them only for exact float32 products with P > 32, where a 64-row tile holds too many
    registers on FMA units; the transposed product's tiles (W2 the left operand) last, for
    tensor-core products only."""
    from prefixkern.kernels import prefix_mlp as mlp

    monkeypatch.setattr(mlp, "triton_interpret", lambda: False)
    ieee = mlp.fwd_configs(64, 65536, "ieee")
    assert ieee[0][0] == 64 and {c[0] for c in ieee} == {32, 64} and not any(c[5] for c in ieee)
    assert [c[1:5] for c in ieee if c[0] == 32] == list(mlp.IEEE_SPLIT_P_TILES)
    for precision in ("bf16", "tf32x3", "tf32"):
        configs = mlp.fwd_configs(64, 65536, precision)
        assert {c[0] for c in configs} == {64} and not configs[0][5]
        flags = [c[5] for c in configs]
        assert flags == sorted(flags) and [c[1:5] for c in configs if c[5]] == list(mlp.W2_LHS_FWD_TILES)
    assert {c[0] for c in mlp.fwd_configs(20, 65536, "ieee")} == {32}


def test_tf32x3_replaces_only_exact_float32_products(monkeypatch):
    """3xTF32 (the default; ``PREFIXKERN_MLP_TF32X3=0`` or ``tf32x3_products(False)`` turn it off)
    changes exact float32 products only: TF32 that PyTorch allows and 16-bit products stay, and
    GPUs without TF32 (before sm_80) keep FMA products; its tables are its own (spill-free, see
    tests/tools/kernel_resources.py) and its backward P tile the tensor-core one."""
    from prefixkern.kernels import prefix_mlp as mlp
    from prefixkern.ops.prefix_mlp import tf32x3_products

    assert mlp.TF32X3 == (os.environ.get("PREFIXKERN_MLP_TF32X3", "1") != "0")
    with tf32x3_products():
        monkeypatch.setattr(mlp, "_has_tf32_tensor_cores", lambda index: index != 7)
        monkeypatch.setattr(mlp, "device_index", lambda device: device.index)
        assert mlp.products(torch.float32, torch.device("cuda", 0)) == "tf32x3"
        assert mlp.products(torch.float32, torch.device("cuda", 7)) == "ieee"      # a pre-Ampere GPU
        assert mlp.products(torch.float32, torch.device("cpu")) == "tf32x3"        # the interpreter
        assert [mlp.products(d) for d in (torch.float32, torch.bfloat16, torch.float16)] == ["tf32x3", "bf16", "fp16"]
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            assert mlp.products(torch.float32) == "tf32"
        finally:
            torch.set_float32_matmul_precision(previous)
        with tf32x3_products(False):
            assert mlp.products(torch.float32) == "ieee"
    monkeypatch.setattr(mlp, "triton_interpret", lambda: False)
    assert {c[1:5] for c in mlp.fwd_configs(64, 65536, "tf32x3") if not c[5]} <= set(mlp.TF32X3_FWD_TILES)
    assert {c[0] for c in mlp.fwd_configs(64, 65536, "tf32x3")} == {64}
    assert mlp.bwd_candidates(64, "tf32x3") == list(mlp.BWD_TILES["tf32x3"])
    assert mlp.bwd_block_p(64, "tf32x3") == 64


@pytest.mark.parametrize("fused", [True, False])
def test_tf32x3_products_reach_every_kernel_and_match_the_reference(monkeypatch, fused, device):
    """With 3xTF32 on, every GEMM kernel of the forward and backward is launched with
    PRECISION="tf32x3", and values and gradients match float64 autograd; as a small MLP (this one:
    the one-launch forward, the first Linear's backward in one launch) and as a large one. (The interpreter computes
    every precision in float32; the GPU test bounds the real error.)"""
    from prefixkern.kernels import prefix_mlp as kernels
    from prefixkern.ops.prefix_mlp import tf32x3_products

    if not fused:
        monkeypatch.setattr(kernels, "FUSED_MAX_W1", 0)
    launches = _record_launches(monkeypatch)
    torch.manual_seed(3)
    P, hidden = 9, SMALL_HIDDEN
    d = SMALL["num_kv_heads"] * SMALL["head_dim"]
    N = 2 * SMALL["num_layers"] * d
    params = [t.to(device) for t in (torch.randn(P, d), torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden),
                                     torch.randn(N, hidden) / hidden ** 0.5, torch.randn(N))]
    leaves = [t.clone().requires_grad_() for t in params]
    exact = [t.double().requires_grad_() for t in params]
    grad = torch.randn(SMALL["num_layers"], 2, SMALL["num_kv_heads"], P, SMALL["head_dim"], device=device)
    with tf32x3_products(), prefixkern.use_backend("triton"):
        kv = fused_prefix_mlp(*leaves, **SMALL, out_dtype=torch.float32)
        kv.backward(grad)
    expected = reference.prefix_mlp(*exact, **SMALL, out_dtype=torch.float64)
    expected.backward(grad.double())
    launched = [(name, meta.get("PRECISION")) for name, meta in launches]
    gemms = {name: precision for name, precision in launched if precision is not None}
    assert set(gemms) == {"prefix_mlp_fwd_kernel", "prefix_mlp_bwd_kernel"} | (
        {"prefix_mlp_bwd_first_kernel"} if fused else {"prefix_mlp_matmul_kernel", "prefix_mlp_matmul_pair_kernel"}), \
        launched
    assert set(gemms.values()) == {"tf32x3"}, launched
    torch.testing.assert_close(kv.double(), expected, **_tol(torch.float32, "out"))
    for leaf, ref in zip(leaves, exact):
        torch.testing.assert_close(leaf.grad.double(), ref.grad, **_tol(torch.float32, "grad"))


# ----------------------------------------------------------------------------------------------
# Bad input: errors name the argument, before any launch
# ----------------------------------------------------------------------------------------------

def _valid():
    P, d, h, N = 4, 24, 20, 96
    return dict(embedding=torch.randn(P, d), w1=torch.randn(h, d), b1=torch.randn(h), w2=torch.randn(N, h),
                b2=torch.randn(N))


@pytest.mark.parametrize("change,error,pattern", [
    (dict(embedding=torch.randn(0, 24)), ValueError, "P > 0"),
    (dict(embedding=torch.randn(4, 24, 1)), ValueError, "embedding"),
    (dict(embedding=torch.randint(0, 3, (4, 24))), TypeError, "embedding"),
    (dict(w1=torch.randn(20, 25)), ValueError, "w1"),
    (dict(w2=torch.randn(95, 20)), ValueError, r"w2 .*2\*L\*Hkv\*D"),
    (dict(b1=torch.randn(21)), ValueError, "b1"),
    (dict(b2=torch.randn(95)), ValueError, "b2"),
    (dict(w2=torch.randn(96, 20, dtype=torch.float64)), TypeError, "w2"),
    (dict(b1=torch.randn(20, dtype=torch.bfloat16)), TypeError, "b1"),
    (dict(w2=None), ValueError, "w1 and w2"),
    (dict(w1=None, w2=None), ValueError, "b1"),
    (dict(w2=torch.randn(96, 20, device="meta")), ValueError, "w2 must be on"),
])
def test_bad_input(change, error, pattern):
    args = {**_valid(), **change}
    with prefixkern.use_backend("triton"), pytest.raises(error, match=pattern):
        fused_prefix_mlp(args.pop("embedding"), **args, **SMALL)


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(num_layers=0), ValueError, "num_layers"),
    (dict(num_kv_heads=2.0), TypeError, "num_kv_heads"),
    (dict(head_dim=True), TypeError, "head_dim"),
    (dict(out_dtype=torch.int8), TypeError, "out_dtype"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
])
def test_bad_options(kwargs, error, pattern):
    with prefixkern.use_backend("triton"), pytest.raises(error, match=pattern):
        fused_prefix_mlp(**_valid(), **{**SMALL, **kwargs})


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(num_virtual_tokens=4.0), "num_virtual_tokens must be a positive int"),
    (dict(head_dim=0), "head_dim must be a positive int"),
    (dict(projection=True, hidden_size=0), "hidden_size must be a positive int"),
    (dict(dropout=None), r"dropout must be a float in \[0, 1\)"),
    (dict(dropout="0.1"), r"dropout must be a float in \[0, 1\)"),
    (dict(dropout=1.0), r"dropout must be a float in \[0, 1\)"),
])
def test_prefix_encoder_bad_arguments_name_themselves(kwargs, pattern):
    """PrefixEncoder's constructor checks its sizes and dropout, naming the argument (a None or str
    dropout was a bare comparison TypeError)."""
    args = dict(num_virtual_tokens=4, num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(ValueError, match=pattern):
        PrefixEncoder(**{**args, **kwargs})


def test_bad_input_without_projection():
    with pytest.raises(ValueError, match=r"\[P, 2\*L\*Hkv\*D\]"):
        fused_prefix_mlp(torch.randn(4, 95), **SMALL)


# ----------------------------------------------------------------------------------------------
# Full size on a GPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_computes_what_peft_computes_under_autocast(autocast_dtype, backend, device):
    """Inside torch.autocast (a Trainer with bf16=True) PEFT's encoder runs its Linears and Tanh in
    the autocast dtype. fused_prefix_mlp does too, on either backend: same output dtype, and the
    same values bit for bit (exact float32 products would be an ulp off), gradients to the
    dtype's tolerance (PEFT rounds them to 16 bits at every op, the kernels accumulate in float32)."""
    torch.manual_seed(11)
    P = 10
    peft = _peft_encoder(P, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, device=device)
    ours = _ours_from_peft(peft, True, P, device=device, **SMALL)
    with torch.autocast(device.type, dtype=autocast_dtype):
        expected = _peft_prefix(peft, 1, P, **SMALL, dtype=autocast_dtype)[:, :, 0]
        with prefixkern.use_backend(backend):
            kv = ours()
    exact = ours().to(autocast_dtype)
    assert kv.dtype == autocast_dtype
    assert torch.equal(kv, expected)
    assert not torch.equal(exact, expected)   # the test can tell the two apart
    grad = torch.randn(expected.shape, device=device).to(autocast_dtype)
    expected.backward(grad)
    with prefixkern.use_backend(backend):
        kv.backward(grad)
    peft_grads, our_grads = _grads(peft), _grads(ours)
    for name in peft_grads:
        assert our_grads[name].dtype == torch.float32
        torch.testing.assert_close(our_grads[name], peft_grads[name], **_tol(autocast_dtype, "grad"), msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_parameters_compute_like_nn_linear(dtype, device):
    """A PrefixEncoder kept in a 16-bit dtype computes as PEFT's encoder in that dtype does (its
    Linears round their outputs), with gradients in that dtype."""
    torch.manual_seed(12)
    P = 7
    peft = _peft_encoder(P, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, device=device).to(dtype)
    ours = _ours_from_peft(peft, True, P, device=device, **SMALL).to(dtype)
    expected = _peft_prefix(peft, 1, P, **SMALL, dtype=dtype)[:, :, 0]
    with prefixkern.use_backend("triton"):
        kv = ours()
    assert kv.dtype == dtype
    torch.testing.assert_close(kv, expected, atol=0, rtol=2 ** -7)   # at most an ulp apart
    grad = torch.randn(expected.shape, device=device).to(dtype)
    expected.backward(grad)
    with prefixkern.use_backend("triton"):
        kv.backward(grad)
    peft_grads, our_grads = _grads(peft), _grads(ours)
    for name in peft_grads:
        assert our_grads[name].dtype == dtype
        torch.testing.assert_close(our_grads[name], peft_grads[name], **_tol(dtype, "grad"), msg=name)


def test_autocast_recasts_16bit_parameters_of_the_other_dtype(device):
    """Autocast casts every floating input but float64: float16 parameters inside bf16 autocast
    compute in bf16, as PEFT's encoder does there."""
    torch.manual_seed(14)
    P = 5
    peft = _peft_encoder(P, **SMALL, projection=True, hidden_size=SMALL_HIDDEN, device=device).to(torch.float16)
    ours = _ours_from_peft(peft, True, P, device=device, **SMALL).to(torch.float16)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        expected = _peft_prefix(peft, 1, P, **SMALL, dtype=torch.bfloat16)[:, :, 0]
        with prefixkern.use_backend("triton"):
            kv = ours()
    assert kv.dtype == torch.bfloat16
    assert torch.equal(kv, expected)


GPU_MODELS = {
    # name: (L, Hkv, D, encoder hidden size h); d = token_dim = Hkv * D as PEFT sets it for GQA
    "qwen2.5-0.5b": (24, 2, 64, 896),
    "bloomz-560m": (24, 16, 64, 1024),
    "llama-3-8b": (32, 8, 128, 4096),
}


PARAMETER_NAMES = ("embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight",
                   "transform.2.bias")


def _full_size_encoders(model, P):
    """``(sizes, ours, peft_parameters)``: PEFT's encoder at a real model's size on the GPU, ours
    sharing its parameters, and those parameters in PARAMETER_NAMES order."""
    num_layers, num_kv_heads, head_dim, hidden = GPU_MODELS[model]
    sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    torch.manual_seed(0)
    peft = _peft_encoder(P, **sizes, projection=True, hidden_size=hidden, device="cuda")
    named = dict(peft.named_parameters())
    return sizes, PrefixEncoder.from_peft(peft, **sizes), [named[name] for name in PARAMETER_NAMES]


def _assert_parameter_grads(module, expected_grads, tol):
    named = dict(module.named_parameters())
    for name, ref in zip(PARAMETER_NAMES, expected_grads):
        torch.testing.assert_close(named[name].grad, ref.float(), **tol, msg=lambda detail, name=name: f"{name}: {detail}")


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(GPU_MODELS))
@pytest.mark.parametrize("P", [1, 20, 64, 128, 256, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_full_size_against_reference(model, P, dtype):
    sizes, ours, peft_params = _full_size_encoders(model, P)
    params = [p.detach().double().requires_grad_() for p in peft_params]
    expected = reference.prefix_mlp(*params, **sizes, out_dtype=torch.float64)
    grad = torch.randn(expected.shape, device="cuda").to(dtype)
    expected_grads = torch.autograd.grad(expected, params, grad.double())
    kv = ours(dtype)
    kv.backward(grad)
    torch.testing.assert_close(kv, expected.to(dtype), **_tol(dtype, "out"))
    _assert_parameter_grads(ours, expected_grads, _tol(torch.float32, "grad"))


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("model", list(GPU_MODELS))
@pytest.mark.parametrize("P", [20, 128])
def test_gpu_autocast_against_reference(model, P):
    """Under bf16 autocast at the real sizes: the tensor-core path's output against the
    reference's autocast emulation (to an ulp, where the summation orders differ), and its
    gradients at least as close to the exact (float64) ones as PyTorch's own autocast backward.

    (Not gradients against the emulation's: that backward rounds every intermediate to bf16,
    ours keeps them in float32, and on the H200 the two differed by more than bf16 tolerance at
    dW1 where ours was the closer to exact, 0.097 against 0.155 at Qwen2.5-0.5B.)"""
    sizes, ours, peft_params = _full_size_encoders(model, P)
    params = [p.detach().clone().requires_grad_() for p in peft_params]
    exact_params = [p.detach().double().requires_grad_() for p in peft_params]
    expected = reference.prefix_mlp(*params, **sizes, out_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)
    grad = torch.randn(expected.shape, device="cuda").to(torch.bfloat16)
    autocast_grads = torch.autograd.grad(expected, params, grad)
    exact = reference.prefix_mlp(*exact_params, **sizes, out_dtype=torch.float64)
    exact_grads = torch.autograd.grad(exact, exact_params, grad.double())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        kv = ours()
    kv.backward(grad)
    assert kv.dtype == torch.bfloat16
    torch.testing.assert_close(kv, expected, **_tol(torch.bfloat16, "out"))
    named = dict(ours.named_parameters())
    for name, autocast_grad, exact_grad in zip(PARAMETER_NAMES, autocast_grads, exact_grads):
        ours_err = (named[name].grad.double() - exact_grad).abs().max().item()
        autocast_err = (autocast_grad.double() - exact_grad).abs().max().item()
        # A little slack for summation order; the floor keeps exact-in-float32 gradients (the
        # biases' sums) from being held to a bound of zero.
        bound = 1.25 * autocast_err + 1e-3 * exact_grad.abs().max().item()
        assert ours_err <= bound, f"{name}: error {ours_err:.3g} against exact, PyTorch autocast's {autocast_err:.3g}"


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("model", list(GPU_MODELS))
@pytest.mark.parametrize("P", [20, 64])
def test_gpu_tf32x3_is_as_accurate_as_exact_float32(model, P):
    """3xTF32 products (the default) at the real sizes, float32 parameters and output:
    the output and every parameter gradient within twice the error of the FMA ("ieee") kernels
    against float64, plus a floor of float32 resolution. (On the CPU the split's error was
    emulated at float32's: benchmarks/mlp_precision.py.)"""
    from prefixkern.ops.prefix_mlp import tf32x3_products

    sizes, ours, peft_params = _full_size_encoders(model, P)
    exact_params = [p.detach().double().requires_grad_() for p in peft_params]
    exact = reference.prefix_mlp(*exact_params, **sizes, out_dtype=torch.float64)
    grad = torch.randn(exact.shape, device="cuda")
    exact_grads = torch.autograd.grad(exact, exact_params, grad.double())
    errors = {}
    for tf32x3 in (False, True):
        ours.zero_grad(set_to_none=True)
        with tf32x3_products(tf32x3):
            kv = ours(torch.float32)
            kv.backward(grad)
        named = dict(ours.named_parameters())
        errors[tf32x3] = [(kv.double() - exact).abs().max().item()] + [
            (named[name].grad.double() - ref).abs().max().item() for name, ref in zip(PARAMETER_NAMES, exact_grads)]
    scales = [exact.abs().max().item()] + [ref.abs().max().item() for ref in exact_grads]
    for name, ieee, tf32x3, scale in zip(("out",) + PARAMETER_NAMES, errors[False], errors[True], scales):
        assert tf32x3 <= 2 * ieee + 2e-6 * scale, f"{name}: 3xTF32 error {tf32x3:.3g}, exact float32 {ieee:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "bf16"])
def test_gpu_every_backward_tile_agrees_with_the_first(monkeypatch, precision):
    """Every backward candidate the tuner may pick at the suite's Llama-3-8B shape (P=64, W2 65536
    x 1024), the two-launch ones and the cuBLAS products (float32 ones) included, forced in turn: the gradients of the table's first tile
    (the one the full-size grid checks against the reference, autotuning off there), up to
    summation order."""
    from prefixkern.kernels import prefix_mlp as kernels
    from prefixkern.ops.prefix_mlp import tf32x3_products

    num_layers, num_kv_heads, head_dim, _ = GPU_MODELS["llama-3-8b"]
    sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    P, d = 64, num_kv_heads * head_dim
    hidden, N = d, 2 * num_layers * d
    torch.manual_seed(0)
    params = [torch.randn(P, d, device="cuda"), torch.randn(hidden, d, device="cuda") / d ** 0.5,
              torch.randn(hidden, device="cuda"), torch.randn(N, hidden, device="cuda") / hidden ** 0.5,
              torch.randn(N, device="cuda")]
    grad = torch.randn(num_layers, 2, num_kv_heads, P, head_dim, device="cuda")
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    results, tiles = [], None
    with tf32x3_products(precision != "ieee"):
        assert kernels.products(compute_dtype, grad.device) == precision
        _, hidden_act = kernels.prefix_mlp_forward(*params, **sizes, out_dtype=torch.float32,
                                                   compute_dtype=compute_dtype, dropout_p=0.0, seed=None)
        library = kernels.library_products_offered(precision, params[3], params[4])
        assert library == (precision != "bf16")
        tiles = kernels.bwd_candidates(P, precision, N * hidden, library)
        assert any(getattr(tile, "dw_num_warps", 0) for tile in tiles), tiles
        assert (kernels.LIBRARY_PRODUCTS in tiles) == library
        for tile in tiles:
            _force_candidate(monkeypatch, kernels, tile)
            results.append(kernels.prefix_mlp_backward(grad, *params, hidden_act, **sizes, compute_dtype=compute_dtype,
                                                       dropout_p=0.0, seed=None))
    for tile, grads in zip(tiles[1:], results[1:]):
        for name, first, other in zip(("dE", "dW1", "db1", "dW2", "db2"), results[0], grads):
            scale = first.abs().max().item()
            torch.testing.assert_close(other, first, atol=1e-5 * scale, rtol=1e-4, msg=f"{tile} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "bf16"])
def test_gpu_every_forward_tile_agrees_with_the_first(monkeypatch, precision):
    """Every forward candidate the tuner may pick at the suite's Llama-3-8B shape (P=64, W2 65536 x
    1024), the transposed product's tiles (W2 the left operand) included, forced in turn: the output
    the table's first tile gives, up to summation order (and a bf16 rounding either way)."""
    from prefixkern.kernels import prefix_mlp as kernels
    from prefixkern.ops.prefix_mlp import tf32x3_products

    num_layers, num_kv_heads, head_dim, _ = GPU_MODELS["llama-3-8b"]
    sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    P, d = 64, num_kv_heads * head_dim
    N = 2 * num_layers * d
    torch.manual_seed(0)
    params = [torch.randn(P, d, device="cuda"), torch.randn(d, d, device="cuda") / d ** 0.5,
              torch.randn(d, device="cuda"), torch.randn(N, d, device="cuda") / d ** 0.5, torch.randn(N, device="cuda")]
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with tf32x3_products(precision != "ieee"):
        assert kernels.products(compute_dtype, params[0].device) == precision
        configs = kernels.fwd_configs(P, N, precision)
        assert any(c[5] for c in configs) == (precision != "ieee"), configs
        results = []
        for config in configs:
            _force_candidate(monkeypatch, kernels, config, tuned=("mlp-fwd",))
            out, _ = kernels.prefix_mlp_forward(*params, **sizes, out_dtype=torch.float32, compute_dtype=compute_dtype,
                                                dropout_p=0.0, seed=None)
            results.append(out)
    tol = 1e-2 if precision == "bf16" else 1e-4
    for config, out in zip(configs[1:], results[1:]):
        scale = results[0].abs().max().item()
        torch.testing.assert_close(out, results[0], atol=tol * scale, rtol=tol, msg=str(config))


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32x3", "ieee", "bf16"])
def test_gpu_every_matmul_tile_agrees_with_the_first(monkeypatch, precision):
    """Every tile the tuner may pick for the small GEMMs at Llama-3-8B's sizes (P=64, d = h = 1024),
    forced in turn: the forward's H = tanh(E W1^T + b1) (where the 16 x 32 tile makes 128 programs)
    and the backward's dE = dZ W1, dW1 = dZ^T E pair give what the table's first tile gives (the
    one the full-size grid checks against the reference, autotuning off there), up to summation
    order."""
    from prefixkern.kernels import prefix_mlp as kernels
    from prefixkern.ops.prefix_mlp import tf32x3_products

    P, d = 64, 1024
    torch.manual_seed(0)
    embedding, w1 = torch.randn(P, d, device="cuda"), torch.randn(d, d, device="cuda") / d ** 0.5
    b1, dz = torch.randn(d, device="cuda"), torch.randn(P, d, device="cuda")
    compute_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    with tf32x3_products(precision != "ieee"):
        assert kernels.products(compute_dtype, embedding.device) == precision
        for name, tiles in (("matmul", kernels.matmul_candidates(P)),
                            ("pair", kernels.matmul_candidates(d, kernels.MATMUL_PAIR_TILES))):
            assert len(tiles) > 1 and (name == "pair" or (16, 32, 64, 4, 3) in tiles), tiles
            results = []
            for tile in tiles:
                _force_candidate(monkeypatch, kernels, tile, tuned=("mlp-matmul", "mlp-matmul-pair"))
                if name == "matmul":
                    hidden = torch.empty(P, d, device="cuda")
                    kernels._matmul(embedding, w1.t(), hidden, precision, bias=b1, apply_tanh=True)
                    results.append((hidden,))
                else:
                    d_embedding, dw1 = torch.empty(P, d, device="cuda"), torch.empty(d, d, device="cuda")
                    kernels._matmul_pair(dz, w1, d_embedding, dz.t(), embedding, dw1, precision)
                    results.append((d_embedding, dw1))
            for tile, outs in zip(tiles[1:], results[1:]):
                for first, other in zip(results[0], outs):
                    scale = first.abs().max().item()
                    torch.testing.assert_close(other, first, atol=1e-5 * scale, rtol=1e-4, msg=f"{name} {tile}")


@pytest.mark.gpu
@pytest.mark.parametrize("model", list(GPU_MODELS))
def test_gpu_batch_expanded_peft_and_dropout(model):
    num_layers, num_kv_heads, head_dim, hidden = GPU_MODELS[model]
    sizes = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)
    torch.manual_seed(0)
    P, batch, dtype = 20, 4, torch.bfloat16
    peft = _peft_encoder(P, **sizes, projection=True, hidden_size=hidden, device="cuda")
    ours = _ours_from_peft(peft, True, P, device="cuda", **sizes)
    expanded = _peft_prefix(peft, batch, P, **sizes, dtype=dtype)
    # Eighths in [-1, 1): their sum over the batch is exact in bf16, so both sides see the same
    # gradient (a random one summed, then rounded to bf16, moved even the reference past the
    # tolerance: 17 of dW1's 114688 elements at Qwen2.5-0.5B size).
    grad = (torch.randint(-8, 8, expanded.shape, device="cuda") / 8).to(dtype)
    expanded.backward(grad)
    kv = ours(dtype)
    kv.backward(grad.float().sum(2).to(dtype))
    torch.testing.assert_close(kv, expanded[:, :, 0], **_tol(dtype, "out"))
    peft_grads, our_grads = _grads(peft), _grads(ours)
    for name in peft_grads:
        torch.testing.assert_close(our_grads[name], peft_grads[name], **_tol(dtype, "grad"), msg=name)

    ours.dropout = 0.1
    torch.manual_seed(1)
    dropped = ours(dtype)
    torch.manual_seed(1)
    assert torch.equal(dropped, ours(dtype))
    assert abs((dropped == 0).float().mean().item() - 0.1) < 0.01


@pytest.mark.parametrize("autocast,dropout_p,fused", [(False, 0.0, False), (True, 0.0, False), (True, 0.3, True),
                                                      (False, 0.3, True)])
def test_forward_with_w2_as_the_left_operand_matches(monkeypatch, autocast, dropout_p, fused, device):
    """The forward's transposed product (W2_LHS: ``out^T = W2 @ H^T``, W2's tile the left operand)
    against the plain one at the same tile: the same output (the same dropout mask, the same seed),
    the same H kept, the same gradients; ragged P and N, with and without the one-launch forward,
    float32 (3xTF32 in the interpreter) and bf16 autocast products."""
    from prefixkern.kernels import prefix_mlp as kernels

    torch.manual_seed(8)
    P, d, hidden = 19, 40, 36
    N = 2 * SMALL["num_layers"] * SMALL["num_kv_heads"] * SMALL["head_dim"]
    params = [torch.randn(P, d), torch.randn(hidden, d) / d ** 0.5, torch.randn(hidden), torch.randn(N, hidden) / hidden ** 0.5,
              torch.randn(N)]
    grad = torch.randn(SMALL["num_layers"], 2, SMALL["num_kv_heads"], P, SMALL["head_dim"], device=device)
    if not fused:
        monkeypatch.setattr(kernels, "FUSED_MAX_W1", 0)
    results = []
    for w2_lhs in (False, True):
        first = kernels.fwd_configs(P, N, kernels.products(torch.bfloat16 if autocast else torch.float32, device))[0]
        _force_candidate(monkeypatch, kernels, first[:5] + (w2_lhs,), tuned=("mlp-fwd", "mlp-fwd-fused"))
        launched = _record_launches(monkeypatch)
        leaves = [t.to(device).requires_grad_() for t in params]
        torch.manual_seed(9)
        with prefixkern.use_backend("triton"), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            out = prefixkern.fused_prefix_mlp(*leaves, **SMALL, out_dtype=torch.float32, dropout_p=dropout_p)
        out.backward(grad)
        assert [meta["W2_LHS"] for name, meta in launched if name == "prefix_mlp_fwd_kernel"] == [w2_lhs]
        results.append([out.detach()] + [t.grad for t in leaves])
    tol = 1e-2 if autocast else 1e-5      # (a bf16 rounding of the sum may fall the other way)
    for name, plain, transposed in zip(("out", "dE", "dW1", "db1", "dW2", "db2"), *results):
        torch.testing.assert_close(transposed, plain, atol=tol, rtol=tol, msg=name)


def test_hidden_kernel_narrows_its_chunk_to_fill_the_gpu(monkeypatch):
    """dZ's kernel takes 64 hidden columns a program, halved down to 16 while that leaves fewer
    programs than SMs: Llama-3-8B's 1024 columns on 132 SMs in 64 programs of 16, not 16 of 64; a
    wide hidden layer keeps 64. On the CPU the interpreter counts 16 SMs."""
    from prefixkern.kernels import prefix_mlp as kernels

    monkeypatch.setattr(kernels, "num_sms", lambda index: 132)
    monkeypatch.setattr(kernels, "device_index", lambda device: 0)
    gpu = torch.device("cuda", 0)
    assert [kernels.hidden_block_k(h, gpu) for h in (1024, 4096, 8320, 8448, 100)] == [16, 16, 32, 64, 16]
    assert kernels.hidden_block_k(1024, torch.device("cpu")) == 64
    assert kernels.hidden_block_k(512, torch.device("cpu")) == 32
