"""Bad input to prefix_attention becomes a ValueError/TypeError naming the argument, before any
kernel is launched (the checks run the same whichever backend is in force)."""
import pytest
import torch

import prefixkern


def _good():
    B, Hq, Hkv, S, P, D = 2, 4, 2, 5, 3, 16
    return dict(q=torch.randn(B, Hq, S, D), k=torch.randn(B, Hkv, S, D), v=torch.randn(B, Hkv, S, D),
                prefix_k=torch.randn(Hkv, P, D), prefix_v=torch.randn(Hkv, P, D))


def _call(**override):
    args = _good()
    tensors = {name: override.pop(name, args[name]) for name in args}
    return prefixkern.prefix_attention(tensors["q"], tensors["k"], tensors["v"], tensors["prefix_k"],
                                       tensors["prefix_v"], **override)


@pytest.mark.parametrize("override,error,pattern", [
    (dict(q=torch.randn(4, 5, 16)), ValueError, r"q must have shape \[B, Hq, S, D\]"),
    (dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.randint(0, 3, (2, 4, 5, 16))), TypeError, "q must be float16, bfloat16 or float32"),
    (dict(k=torch.randn(2, 2, 5, 16, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    (dict(v=torch.randn(2, 2, 6, 16)), ValueError, "k and v must have the same shape"),
    (dict(k=torch.randn(3, 2, 5, 16), v=torch.randn(3, 2, 5, 16)), ValueError, "k must have q's batch size"),
    (dict(k=torch.randn(2, 3, 5, 16), v=torch.randn(2, 3, 5, 16), prefix_k=torch.randn(3, 3, 16),
          prefix_v=torch.randn(3, 3, 16)), ValueError, "multiple of k's heads"),
    (dict(k=torch.randn(2, 2, 5, 8), v=torch.randn(2, 2, 5, 8)), ValueError, "k must have q's head dim"),
    (dict(prefix_k=torch.randn(2, 3, 8)), ValueError, "prefix_k and prefix_v must have the same shape"),
    (dict(prefix_k=torch.randn(3, 3, 16), prefix_v=torch.randn(3, 3, 16)), ValueError, "prefix_k must have Hkv=2"),
    (dict(prefix_k=torch.randn(2, 0, 16), prefix_v=torch.randn(2, 0, 16)), ValueError, "P > 0"),
    (dict(prefix_k=torch.randn(5, 2, 3, 16), prefix_v=torch.randn(5, 2, 3, 16)), ValueError, "per row"),
    (dict(prefix_index=torch.tensor([0, 1])), ValueError, "prefix_index needs per-task prefixes"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16), prefix_index=torch.tensor([0, 3])),
     ValueError, r"prefix_index values must lie in \[0, T=3\)"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16),
          prefix_index=torch.tensor([0.0, 1.0])), TypeError, "prefix_index must be int32 or int64"),
    (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape \[B, S_kv\]"),
    (dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be bool or integer"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(softmax_scale=-1.0), ValueError, "softmax_scale must be a positive finite float"),
    (dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be a positive finite float"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite float"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(dropout_p=True), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(window=2.0), ValueError, "window must be a positive int"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(softcap=0.0), ValueError, "softcap must be a positive finite float"),
    (dict(window=0), ValueError, "window must be a positive int"),
    (dict(window=True), ValueError, "window must be a positive int"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_names_the_argument(override, error, pattern, backend):
    with prefixkern.use_backend(backend), pytest.raises(error, match=pattern):
        _call(**override)


def _good_packed():
    Hq, Hkv, P, D = 4, 2, 3, 16
    return dict(q=torch.randn(9, Hq, D), k=torch.randn(11, Hkv, D), v=torch.randn(11, Hkv, D),
                prefix_k=torch.randn(Hkv, P, D), prefix_v=torch.randn(Hkv, P, D),
                cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 4, 11], dtype=torch.int32), max_seqlen_q=5, max_seqlen_k=7)


def _call_packed(**override):
    args = {**_good_packed(), **override}
    positional = [args.pop(name) for name in ("q", "k", "v", "prefix_k", "prefix_v", "cu_seqlens_q", "cu_seqlens_k",
                                              "max_seqlen_q", "max_seqlen_k")]
    return prefixkern.prefix_attention_varlen(*positional, **args)


@pytest.mark.parametrize("override,error,pattern", [
    (dict(q=torch.randn(1, 9, 4, 16)), ValueError, r"q must have shape \[total_q, Hq, D\]"),
    (dict(k=torch.randn(11, 3, 16), v=torch.randn(11, 3, 16)), ValueError, "multiple of k's heads"),
    (dict(q=torch.randn(0, 4, 16), cu_seqlens_q=torch.tensor([0, 0, 0], dtype=torch.int32), max_seqlen_q=0),
     ValueError, "at least one token"),
    (dict(cu_seqlens_q=torch.tensor([0.0, 4.0, 9.0])), TypeError, "cu_seqlens_q must be int32 or int64"),
    (dict(cu_seqlens_q=torch.tensor([9], dtype=torch.int32)), ValueError, r"cu_seqlens_q must have shape \[B \+ 1\]"),
    (dict(cu_seqlens_k=torch.tensor([0, 11], dtype=torch.int32)), ValueError, "cu_seqlens_k must have cu_seqlens_q's shape"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "cu_seqlens_q must rise from 0 to the token count 9"),
    (dict(cu_seqlens_k=torch.tensor([0, 12, 11], dtype=torch.int32)), ValueError, "cu_seqlens_k must rise from 0"),
    (dict(max_seqlen_q=4), ValueError, "max_seqlen_q=4 is shorter than the longest sequence"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be a non-negative int"),
    (dict(prefix_k=torch.randn(3, 2, 3, 16), prefix_v=torch.randn(3, 2, 3, 16)), ValueError, "per row"),
    (dict(alibi_slopes=torch.ones(3, 4)), ValueError, "alibi_slopes must have shape"),
    (dict(window=0), ValueError, "window must be a positive int"),
])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_packed_input_names_the_argument(override, error, pattern, backend):
    with prefixkern.use_backend(backend), pytest.raises(error, match=pattern):
        _call_packed(**override)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_numpy_scalars_are_taken_as_python_numbers(backend):
    """Options computed with numpy (a config's window, a scale from np.sqrt) give what the same Python
    numbers give: the checks take numpy's scalars and the kernels get Python ones."""
    import numpy as np

    tensors = _good().values()
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    with prefixkern.use_backend(backend):
        want = prefixkern.prefix_attention(*tensors, key_padding_mask=mask, window=3, softmax_scale=0.25, softcap=5.0)
        got = prefixkern.prefix_attention(*tensors, key_padding_mask=mask, window=np.int64(3),
                                          softmax_scale=np.float32(0.25), softcap=np.float16(5.0))
        plain = prefixkern.prefix_attention(*tensors, key_padding_mask=mask)
    assert torch.equal(got, want) and not torch.equal(got, plain)


@pytest.mark.parametrize("op", ["prefix_attention", "prefix_attention_varlen", "prefix_decode_attention"])
def test_head_dims_over_the_kernels_tiles_are_refused_on_the_triton_path(monkeypatch, op):
    """A head dim over 256 (the kernels' tiles hold a whole head; the tile tables stop there) is a
    ValueError naming it on the Triton path, before any launch (it was a KeyError from the tile
    table's lookup); 256 runs, and the reference backend computes any."""
    from conftest import record_launches
    from prefixkern.kernels import prefix_attention_fwd, prefix_decode

    def call(D):
        if op == "prefix_attention_varlen":
            args = _good_packed()
            args.update(q=torch.randn(9, 4, D), k=torch.randn(11, 2, D), v=torch.randn(11, 2, D),
                        prefix_k=torch.randn(2, 3, D), prefix_v=torch.randn(2, 3, D))
            return _call_packed(**args)
        q, k, v = torch.randn(1, 2, 1, D), torch.randn(1, 1, 3, D), torch.randn(1, 1, 3, D)
        return getattr(prefixkern, op)(q, k, v, torch.randn(1, 2, D), torch.randn(1, 2, D))

    launched = record_launches(monkeypatch, (prefix_attention_fwd, prefix_decode))
    with prefixkern.use_backend("triton"), pytest.raises(ValueError, match="q's head dim D=257 is over the 256"):
        call(257)
    assert launched == []
    with prefixkern.use_backend("reference"):
        assert torch.isfinite(call(320)).all()
    with prefixkern.use_backend("triton"):
        assert torch.isfinite(call(256)).all()
    assert launched            # (the recording sees the kernels' launches)


@pytest.mark.parametrize("args,error,pattern", [
    (dict(out_partial=torch.randn(32)), ValueError, r"out_partial must have shape \[N, ..., D\]"),
    (dict(lse_partial=torch.randn(2, 3, 1)), ValueError, "lse_partial must have out_partial's leading shape"),
    (dict(lse_partial=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "lse_partial must be floating point"),
    (dict(out_partial=torch.zeros(2, 3, 8, dtype=torch.int32)), TypeError, "out_partial must be floating point"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype must be torch.float16, torch.bfloat16, torch.float32"),
    (dict(lse_partial=torch.zeros(2, 3, device="meta")), ValueError, "lse_partial must be on out_partial's device"),
])
def test_merge_attention_states_bad_input_names_the_argument(args, error, pattern):
    """(An int out_dtype or int log-sum-exps were taken and merged into nonsense.)"""
    args = {"out_partial": torch.randn(2, 3, 8), "lse_partial": torch.randn(2, 3), **args}
    with pytest.raises(error, match=pattern):
        prefixkern.merge_attention_states(**args)


def test_backend_name_is_checked(monkeypatch):
    monkeypatch.setenv("PREFIXKERN_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PREFIXKERN_BACKEND must be one of"):
        prefixkern.get_backend()


# --------------------------------------------------------------------------------------------
# Tile selection (the logic runs on any machine; the timings here are stand-ins)
# --------------------------------------------------------------------------------------------

def test_interpreter_setting_is_not_kept_inside_a_compiled_trace(monkeypatch):
    """``triton_interpret`` reads TRITON_INTERPRET once and keeps it, but not while torch.compile
    traces: a global set during a trace is a side effect dynamo replays, and a trace that restarts
    after a graph break then takes another path (dynamo stops: "SpeculationLog diverged"), as a
    compiled GPT-2 training step did when its first prefixkern call was the traced one."""
    from prefixkern import _backend

    monkeypatch.setattr(_backend, "_INTERPRET", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def step(x):
        return x + 1 if _backend.triton_interpret() else x

    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(torch.zeros(2)), torch.ones(2))
    torch._dynamo.reset()
    assert _backend._INTERPRET is None
    assert _backend.triton_interpret() and _backend._INTERPRET is True


def test_launches_take_a_device_guard_only_off_the_current_gpu(monkeypatch):
    """Triton launches on the current GPU: a launcher on another GPU's tensors switches to it, and
    one on the current GPU's (the usual case) skips the guard's host time."""
    from prefixkern.kernels import _launch as common

    monkeypatch.setattr(common.torch.cuda, "current_device", lambda: 1)
    assert common.on_device(torch.device("cpu")) is common._NO_DEVICE_GUARD
    assert common.on_device(torch.device("cuda", 1)) is common._NO_DEVICE_GUARD
    assert common.on_device(torch.device("cuda")) is common._NO_DEVICE_GUARD     # (no index: the current one)
    guard = common.on_device(torch.device("cuda", 0))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 0


def test_pick_config_times_only_spill_free_candidates(monkeypatch):
    import types

    from prefixkern.kernels import _launch as common

    spills = {"a": 0, "b": 256, "c": 0, "d": None}
    times = {"a": 2.0, "b": 0.5, "c": 1.0}
    current = {}

    def launch(config):
        assert common.tuning()      # every candidate launch is the tuner's (test recorders skip them)
        if config == "d":
            raise RuntimeError("out of resources")   # a tile that does not fit: skipped
        current["config"] = config
        return types.SimpleNamespace(n_spills=spills[config])

    def do_bench(fn, **kwargs):
        fn()
        return times[current["config"]]

    monkeypatch.setattr(common.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(common.triton.testing, "do_bench", do_bench)
    monkeypatch.delenv("PREFIXKERN_AUTOTUNE", raising=False)
    # b is the fastest but spills on this GPU: the fastest spill-free candidate wins.
    assert common.pick_config(("test", 1), ["a", "b", "c", "d"], launch) == "c"
    # Only spilling candidates left: the fastest of them.
    spills.update(a=8, c=8)
    assert common.pick_config(("test", 2), ["a", "b", "c"], launch) == "b"
    # Cached per key; candidates given as a function are built only for a key not yet tuned.
    assert common.pick_config(("test", 1), ["a"], launch) == "c"
    built = []

    def candidates():
        built.append(1)
        return ["c", "a"]
    assert common.pick_config(("test", 4), candidates, launch) == "c"
    assert common.pick_config(("test", 4), candidates, launch) == "c"
    assert len(built) == 1
    # PREFIXKERN_AUTOTUNE=0: no timing; the first candidate that compiles without spills here,
    # launched in table order until one does not (the rest are not compiled).
    monkeypatch.setenv("PREFIXKERN_AUTOTUNE", "0")
    monkeypatch.setattr(common.triton.testing, "do_bench", None)
    launched = []

    def recorded(config):
        launched.append(config)
        return launch(config)
    spills.update(a=0, b=256, c=0)
    assert common.pick_config(("test", 3), ["a", "b"], recorded) == "a" and launched == ["a"]
    launched.clear()
    assert common.pick_config(("test", 5), ["d", "b", "c", "a"], recorded) == "c" and launched == ["d", "b", "c"]
    spills.update(c=8)
    assert common.pick_config(("test", 6), ["d", "b", "c"], recorded) == "b"     # every one spills: the first
    assert common.pick_config(("test", 7), ["d"], recorded) == "d"              # a single one is not launched
    assert not common.tuning()      # reset after the tuner's launches, a failed one's included

    def failing(config):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        common.pick_config(("test", 8), ["a", "b"], failing)
    assert not common.tuning()


def test_index_values_are_read_once_per_tensor_and_version(monkeypatch):
    """A model passes the same cu_seqlens / prefix_index to every layer; reading their values is a
    device sync, so each tensor is read once, and again only once it changes or is checked against
    other sizes."""
    from prefixkern.ops._checks import check_prefix_attention_varlen_args

    args = _good_packed()
    reads = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or original(self))
    options = dict(causal=True, softmax_scale=None, prefix_index=None, dropout_p=0.0, alibi_slopes=None,
                   softcap=None, window=None)
    for _ in range(4):
        check_prefix_attention_varlen_args(*args.values(), **options)
    assert len(reads) == 2                      # cu_seqlens_q and cu_seqlens_k, once each
    args["cu_seqlens_q"][1] = 5                 # in place: the version changes, so it is read again
    check_prefix_attention_varlen_args(*args.values(), **options)
    assert len(reads) == 3
    with pytest.raises(ValueError, match="max_seqlen_q=4 is shorter"):
        check_prefix_attention_varlen_args(*{**args, "max_seqlen_q": 4}.values(), **options)


def test_backward_fills_no_gradient_for_the_outputs_that_take_none():
    """The attention's lse and the MLP's hidden rows are outputs without gradients: autograd must not
    fill zero tensors for them (a memset launch per layer and step, 25 in a 24-layer step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroFills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("zeros", "zeros_like", "zero_", "fill_", "new_zeros"):
                self.calls.append(str(func))
            return func(*args, **(kwargs or {}))

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    q = torch.randn(1, 2, 5, 16, device=device, requires_grad=True)
    k, v = (torch.randn(1, 1, 5, 16, device=device, requires_grad=True) for _ in range(2))
    pk, pv = (torch.randn(1, 3, 16, device=device, requires_grad=True) for _ in range(2))
    params = [torch.randn(3, 8, device=device), torch.randn(8, 8, device=device), torch.randn(8, device=device),
              torch.randn(2 * 1 * 16 * 2, 8, device=device), torch.randn(64, device=device)]
    params = [p.requires_grad_() for p in params]
    with prefixkern.use_backend("triton"):
        out = prefixkern.prefix_attention(q, k, v, pk, pv, causal=True)
        kv = prefixkern.fused_prefix_mlp(*params, num_layers=2, num_kv_heads=1, head_dim=16)
        fills = ZeroFills()
        with fills:
            (out.sum() + kv.float().sum()).backward()
    assert fills.calls == [], fills.calls
    assert all(t.grad is not None for t in (q, k, v, pk, pv, *params))
