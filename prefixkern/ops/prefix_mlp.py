"""fused_prefix_mlp: PEFT's prefix reparameterisation MLP, run once on P rows, written straight
into the ``[L, 2, Hkv, P, D]`` layout the attention kernel reads."""
from __future__ import annotations

import torch

from .. import reference
from .._backend import eager_function, launch_directly, lazy_modules, use_triton
from ._checks import check_float, check_out_dtype, check_tensor

__all__ = ["fused_prefix_mlp", "check_prefix_mlp_args", "tf32x3_products"]


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def check_prefix_mlp_args(embedding, w1, b1, w2, b2, *, num_layers, num_kv_heads, head_dim, out_dtype,
                          dropout_p) -> tuple[int, int, int]:
    """Validate ``fused_prefix_mlp``'s arguments; return ``(P, h, N)`` (h = 0 without projection)."""
    _check_positive_int("num_layers", num_layers)
    _check_positive_int("num_kv_heads", num_kv_heads)
    _check_positive_int("head_dim", head_dim)
    num_cols = 2 * num_layers * num_kv_heads * head_dim
    projection = w1 is not None or w2 is not None
    check_tensor("embedding", embedding, 2, "[P, d]" if projection else f"[P, 2*L*Hkv*D]=[P, {num_cols}]")
    check_float("embedding", embedding)
    num_rows = embedding.shape[0]
    if num_rows == 0:
        raise ValueError("embedding must hold at least one virtual token (P > 0), got P=0")
    check_out_dtype(out_dtype)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if dropout_p > 0.0 and num_rows * num_cols >= 2**31:
        raise ValueError(f"dropout needs P * 2*L*Hkv*D < 2**31 (Philox counters), got {num_rows} * {num_cols}")

    if not projection:
        for name, t in (("b1", b1), ("b2", b2)):
            if t is not None:
                raise ValueError(f"{name} needs w1 and w2 (projection); without them the embedding is the prefix")
        if embedding.shape[1] != num_cols:
            raise ValueError(
                f"without projection embedding must have shape [P, 2*L*Hkv*D]=[{num_rows}, {num_cols}] "
                f"(L={num_layers}, Hkv={num_kv_heads}, D={head_dim}), got {tuple(embedding.shape)}"
            )
        return num_rows, 0, num_cols

    if w1 is None or w2 is None:
        raise ValueError("w1 and w2 must both be given (projection) or both be None (P-Tuning v2)")
    token_dim = embedding.shape[1]
    check_tensor("w1", w1, 2, "[h, d]")
    hidden_size = w1.shape[0]
    check_tensor("w2", w2, 2, f"[2*L*Hkv*D, h]=[{num_cols}, h]")
    expected = {
        "w1": (w1, (hidden_size, token_dim), "[h, d]"),
        "w2": (w2, (num_cols, hidden_size), "[2*L*Hkv*D, h]"),
        "b1": (b1, (hidden_size,), "[h]"),
        "b2": (b2, (num_cols,), "[2*L*Hkv*D]"),
    }
    for name, (t, shape, doc) in expected.items():
        if t is None:
            continue
        check_tensor(name, t, len(shape), doc)
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {doc}={list(shape)} (P={num_rows}, d={token_dim}, h={hidden_size}, "
                f"L={num_layers}, Hkv={num_kv_heads}, D={head_dim}), got {tuple(t.shape)}"
            )
        if t.dtype != embedding.dtype:
            raise TypeError(f"{name} must have embedding's dtype {embedding.dtype}, got {t.dtype}")
        if t.device != embedding.device:
            raise ValueError(f"{name} must be on embedding's device {embedding.device}, got {t.device}")
    if hidden_size == 0 or token_dim == 0:
        raise ValueError(f"w1 must have shape [h, d] with h, d > 0, got {tuple(w1.shape)}")
    return num_rows, hidden_size, num_cols


# --------------------------------------------------------------------------------------------
# Custom ops: opaque to torch.compile, which traces them through their fake implementations.
# --------------------------------------------------------------------------------------------

def _absent(like: torch.Tensor) -> torch.Tensor:
    """The float32 [0] tensor an op returns in place of an absent tensor (the forward's hidden rows
    without projection, an absent parameter's gradient), on ``like``'s device: a new one each time,
    since a custom op's outputs may not alias each other."""
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("prefixkern::prefix_mlp_fwd", mutates_args=())
def prefix_mlp_fwd(
    embedding: torch.Tensor, w1: torch.Tensor | None, b1: torch.Tensor | None, w2: torch.Tensor | None,
    b2: torch.Tensor | None, num_layers: int, num_kv_heads: int, head_dim: int, out_dtype: torch.dtype,
    compute_dtype: torch.dtype, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel forward: ``(out [L, 2, Hkv, P, D], hidden [P, h] float32 or [0] without projection)``."""
    return _forward_launch(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, out_dtype, compute_dtype,
                           dropout_p, seed)


# The kernel modules, imported at the first call (lazy_modules).
_kernels = lazy_modules(mlp="prefixkern.kernels.prefix_mlp", launch="prefixkern.kernels._launch")


def _forward_launch(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, out_dtype, compute_dtype,
                    dropout_p, seed):
    modules = _kernels()
    kernels = modules.mlp
    with modules.launch.on_device(embedding.device):
        if w1 is None:
            out = kernels.prefix_rows_forward(embedding, num_layers=num_layers, num_kv_heads=num_kv_heads,
                                              head_dim=head_dim, out_dtype=out_dtype, dropout_p=dropout_p, seed=seed)
            return out, _absent(embedding)
        return kernels.prefix_mlp_forward(embedding, w1, b1, w2, b2, num_layers=num_layers,
                                          num_kv_heads=num_kv_heads, head_dim=head_dim, out_dtype=out_dtype,
                                          compute_dtype=compute_dtype, dropout_p=dropout_p, seed=seed)


@prefix_mlp_fwd.register_fake
def _(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, out_dtype, compute_dtype, dropout_p, seed):
    num_rows = embedding.shape[0]
    out = embedding.new_empty((num_layers, 2, num_kv_heads, num_rows, head_dim), dtype=out_dtype)
    if w1 is None:
        return out, _absent(embedding)
    return out, embedding.new_empty((num_rows, w1.shape[0]), dtype=torch.float32)


@torch.library.custom_op("prefixkern::prefix_mlp_bwd", mutates_args=())
def prefix_mlp_bwd(
    grad_out: torch.Tensor, embedding: torch.Tensor, w1: torch.Tensor | None, b1: torch.Tensor | None,
    w2: torch.Tensor | None, b2: torch.Tensor | None, hidden: torch.Tensor, num_layers: int, num_kv_heads: int,
    head_dim: int, compute_dtype: torch.dtype, dropout_p: float, seed: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel backward: ``(dE, dW1, db1, dW2, db2)``; an absent parameter's gradient is a [0] tensor."""
    return _backward_launch(grad_out, embedding, w1, b1, w2, b2, hidden, num_layers, num_kv_heads, head_dim,
                            compute_dtype, dropout_p, seed)


def _backward_launch(grad_out, embedding, w1, b1, w2, b2, hidden, num_layers, num_kv_heads, head_dim, compute_dtype,
                     dropout_p, seed):
    modules = _kernels()
    kernels = modules.mlp
    with modules.launch.on_device(embedding.device):
        if w1 is None:
            d_embedding = kernels.prefix_rows_backward(grad_out, embedding, num_kv_heads=num_kv_heads,
                                                       head_dim=head_dim, dropout_p=dropout_p, seed=seed)
            return d_embedding, _absent(embedding), _absent(embedding), _absent(embedding), _absent(embedding)
        grads = kernels.prefix_mlp_backward(grad_out, embedding, w1, b1, w2, b2, hidden, num_layers=num_layers,
                                            num_kv_heads=num_kv_heads, head_dim=head_dim,
                                            compute_dtype=compute_dtype, dropout_p=dropout_p, seed=seed)
    d_embedding, dw1, db1, dw2, db2 = grads
    return (d_embedding, dw1, db1 if db1 is not None else _absent(embedding), dw2,
            db2 if db2 is not None else _absent(embedding))


@prefix_mlp_bwd.register_fake
def _(grad_out, embedding, w1, b1, w2, b2, hidden, num_layers, num_kv_heads, head_dim, compute_dtype, dropout_p, seed):
    def like(t):
        return _absent(embedding) if t is None else t.new_empty(t.shape)

    return like(embedding), like(w1), like(b1), like(w2), like(b2)


def _setup_context(ctx, inputs, output):
    embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, _out_dtype, compute_dtype, dropout_p, seed = inputs
    _out, hidden = output
    ctx.save_for_backward(embedding, w1, b1, w2, b2, hidden, seed)
    ctx.sizes = (num_layers, num_kv_heads, head_dim)
    ctx.compute_dtype = compute_dtype
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(hidden)
    # hidden gets no gradient: without this autograd would fill a zero tensor for it (a memset
    # launch) in every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_hidden, launch=prefix_mlp_bwd):
    if grad_out is None:        # (the output is the only differentiable one: not reached in practice)
        return (None,) * 12
    embedding, w1, b1, w2, b2, hidden, seed = ctx.saved_tensors
    num_layers, num_kv_heads, head_dim = ctx.sizes
    d_embedding, dw1, db1, dw2, db2 = launch(grad_out, embedding, w1, b1, w2, b2, hidden, num_layers, num_kv_heads,
                                             head_dim, ctx.compute_dtype, ctx.dropout_p, seed)
    return (
        d_embedding,
        dw1 if w1 is not None else None,
        db1 if b1 is not None else None,
        dw2 if w2 is not None else None,
        db2 if b2 is not None else None,
        None, None, None, None, None, None, None,
    )


prefix_mlp_fwd.register_autograd(_backward, setup_context=_setup_context)


_PrefixMlpFunction = eager_function("_PrefixMlpFunction", _forward_launch, _setup_context, _backward, _backward_launch)


def _mlp_fwd(*inputs):
    if launch_directly(*inputs[:5], inputs[-1]):     # the five parameters and the dropout seed
        return _PrefixMlpFunction.apply(*inputs)
    return prefix_mlp_fwd(*inputs)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------

def fused_prefix_mlp(
    embedding: torch.Tensor,
    w1: torch.Tensor | None = None,
    b1: torch.Tensor | None = None,
    w2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    out_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The prefix keys and values of every layer from PEFT's ``PrefixEncoder`` parameters, computed
    once on the P virtual tokens (not on B*P expanded rows) and shared by the whole batch.

    With projection (PEFT ``prefix_projection=True``, ``w1`` and ``w2`` given)::

        rows = tanh(embedding @ w1^T + b1) @ w2^T + b2        # [P, N], N = 2 * L * Hkv * D
        kv[l, t, g, p, d] = dropout(rows)[p, ((l * 2 + t) * Hkv + g) * D + d]

    which is exactly how PEFT's ``get_prompt`` views and permutes the encoder output: layer l's
    keys are ``kv[l, 0]`` and its values ``kv[l, 1]``, each ``[Hkv, P, D]``. Without projection
    (P-Tuning v2, ``w1 = b1 = w2 = b2 = None``) ``rows`` is the embedding itself.

    Args:
        embedding: ``[P, d]`` with projection (PEFT's ``embedding.weight``, d = its ``token_dim``,
            which for GQA models PEFT sets to ``Hkv * D``), or ``[P, N]`` without. float32,
            float16 or bfloat16, any strides; P >= 1.
        w1, b1: ``[h, d]`` and ``[h]``: PEFT's ``transform.0.weight`` / ``.bias``
            (h = ``encoder_hidden_size``). ``b1`` may be None.
        w2, b2: ``[N, h]`` and ``[N]``: PEFT's ``transform.2.weight`` / ``.bias``. ``b2`` may be None.
            All parameters share the embedding's dtype and device.
        num_layers, num_kv_heads, head_dim: L, Hkv, D of the model; ``N = 2 * L * Hkv * D``.
        out_dtype: dtype of the result (the model's dtype, e.g. torch.bfloat16); default the
            dtype the encoder's ``nn.Linear`` would return (the parameters', or the autocast dtype).
        Products: what PEFT's encoder computes with these parameters. float32 parameters give
            float32 products, exact by default, TF32 when ``torch.get_float32_matmul_precision()``
            allows it; inside ``torch.autocast`` (a ``Trainer`` with ``bf16=True``) they are
            computed as autocast's ``nn.Linear`` does: operands rounded to the autocast dtype,
            float32 accumulation, each Linear's output and the tanh rounded to it. 16-bit
            parameters compute likewise in their own dtype. The kernels read W2 as stored (no
            cast copy) and the gradients keep float32 accumulation.
        dropout_p: dropout on ``rows`` (P-Tuning v2's prefix dropout); pass 0.0 in evaluation.
            The keep mask comes from Philox in the kernel, seeded from torch's default generator
            (so ``torch.manual_seed`` makes it reproducible), and is regenerated in backward.

    Returns:
        ``kv``: ``[L, 2, Hkv, P, D]`` in ``out_dtype``, differentiable in every parameter
        (gradients in the parameters' dtype, float32 for PEFT's float32 parameters). With
        projection or dropout it is contiguous. Without either it keeps the embedding's row
        layout (strides ``(2*Hkv*D, Hkv*D, D, N, 1)`` for a contiguous embedding): a view of
        ``embedding`` with no copy when no dtype cast is asked for, else a cast copy. To use it for a batch, pass ``kv[l, 0]``
        / ``kv[l, 1]`` as a batch-shared prefix; the gradient reaching it is then the sum over
        the batch, which equals PEFT's gradient through B expanded copies.

    Backends: CUDA tensors run the Triton kernels (registered as the torch custom ops
    ``prefixkern::prefix_mlp_fwd`` / ``prefix_mlp_bwd``, so ``torch.compile(fullgraph=True)``
    traces through them; eager calls launch them without the dispatcher); CPU tensors run
    ``prefixkern.reference.prefix_mlp`` unless ``PREFIXKERN_BACKEND=triton`` (with
    ``TRITON_INTERPRET=1``) forces the kernels.

    Raises:
        ValueError / TypeError naming the argument and the expected shape (wrong ranks or
        shapes, ``N != 2*L*Hkv*D``, P = 0, mixed dtypes or devices, a non-float tensor), before
        any kernel is launched.

    Example::

        >>> # Llama-3-8B: L=32, Hkv=8, D=128; PEFT's token_dim = Hkv*D = 1024
        >>> P, d, h, N = 20, 1024, 1024, 2 * 32 * 8 * 128
        >>> E = torch.randn(P, d, device="cuda", requires_grad=True)
        >>> w1, b1 = torch.randn(h, d, device="cuda"), torch.randn(h, device="cuda")
        >>> w2, b2 = torch.randn(N, h, device="cuda"), torch.randn(N, device="cuda")
        >>> kv = fused_prefix_mlp(E, w1, b1, w2, b2, num_layers=32, num_kv_heads=8, head_dim=128,
        ...                       out_dtype=torch.bfloat16)
        >>> kv.shape            # [L, 2, Hkv, P, D]
        torch.Size([32, 2, 8, 20, 128])
        >>> prefix_k, prefix_v = kv[3]   # layer 3, each [Hkv, P, D]
    """
    check_prefix_mlp_args(embedding, w1, b1, w2, b2, num_layers=num_layers, num_kv_heads=num_kv_heads,
                          head_dim=head_dim, out_dtype=out_dtype, dropout_p=dropout_p)
    # No projection: no product, and an embedding's output keeps its dtype under autocast too.
    compute_dtype = linear_compute_dtype(embedding) if w1 is not None else embedding.dtype
    out_dtype = out_dtype if out_dtype is not None else compute_dtype
    dropout_p = float(dropout_p)
    if w1 is None and dropout_p == 0.0:
        # P-Tuning v2: the embedding is the prefix. Splitting one dim is always a view.
        kv = embedding.unflatten(1, (num_layers, 2, num_kv_heads, head_dim)).permute(1, 2, 3, 0, 4)
        return kv if out_dtype == embedding.dtype else kv.to(out_dtype)
    if not use_triton(embedding.device):
        return reference.prefix_mlp(embedding, w1, b1, w2, b2, num_layers=num_layers, num_kv_heads=num_kv_heads,
                                    head_dim=head_dim, out_dtype=out_dtype, compute_dtype=compute_dtype,
                                    dropout_p=dropout_p)
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**31 - 1, (1,), device=embedding.device, dtype=torch.int64)
    out, _hidden = _mlp_fwd(embedding, w1, b1, w2, b2, num_layers, num_kv_heads, head_dim, out_dtype,
                            compute_dtype, dropout_p, seed)
    return out


def linear_compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` computes in for parameters like ``weight`` at this point: inside
    ``torch.autocast`` on their device the autocast dtype (autocast casts every floating input but
    float64, 16-bit ones of the other 16-bit dtype included), else their own."""
    device_type = weight.device.type
    if weight.dtype != torch.float64 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


def tf32x3_products(enabled: bool = True):
    """Run the block with the prefix MLP's exact float32 products computed as three TF32
    tensor-core products each (``PREFIXKERN_MLP_TF32X3=1``; see ``kernels/prefix_mlp.py``), or,
    with ``enabled=False``, on FMA units. Float32 parameters outside autocast only: TF32 allowed by
    PyTorch, autocast and 16-bit parameters keep their own products."""
    from ..kernels import prefix_mlp as kernels

    return kernels.tf32x3_products(enabled)


def launched_tiles() -> dict[str, str]:
    """Diagnostics: the tiles the prefix-MLP kernels launched with since the previous call, as
    autotuning chose them (``fwd``: the second GEMM into [L, 2, Hkv, P, D], ``fused_hidden=True``
    where it computed H itself and the first GEMM had no launch; ``bwd``: the dH and the
    dW2/db2 programs' tiles, with ``dw_warps`` and ``dw_stages`` where the dW2 programs had a launch
    of their own, ``dw_strips=True`` where it walked strips of tiles and ``dh_w2_lhs=True`` where the
    dH programs took the product transposed, or ``library=torch.mm`` where cuBLAS took both W2
    products; ``w2_lhs=True`` on ``fwd`` likewise; ``gemm``: the forward's first GEMM; ``gemm-pair``: the
    backward's dE and dW1 in one launch; ``bwd-first``: a small MLP's dZ, dE, dW1 and db1 in one
    launch, in place of the hidden kernel and the pair), as
    ``"BLOCK_P=..,BLOCK_N=..,warps=..,stages=.."``. The benchmarks record it."""
    from ..kernels._launch import take_launched_configs
    from ..kernels.prefix_mlp import LibraryProducts

    # (each config's fields in order; the optional ones, last, are named only where set)
    fwd = ("BLOCK_P", "BLOCK_N", "BLOCK_K", "warps", "stages", "w2_lhs")
    gemm = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "warps", "stages")
    fields = {"mlp-fwd": ("fwd", fwd), "mlp-fwd-fused": ("fwd", fwd),
              "mlp-bwd": ("bwd", ("DH_BLOCK_N", "DH_BLOCK_K", "DW_BLOCK_N", "DW_BLOCK_K", "warps", "stages",
                                  "dw_warps", "dw_stages", "dw_strips", "dh_w2_lhs")),
              "mlp-matmul": ("gemm", gemm), "mlp-matmul-pair": ("gemm-pair", gemm), "mlp-bwd-first": ("bwd-first", gemm)}
    optional = ("dw_warps", "dw_stages", "dw_strips", "dh_w2_lhs", "w2_lhs")
    tiles = {}
    for kernel, config in take_launched_configs(tuple(fields)).items():
        name, labels = fields[kernel]
        if isinstance(config, LibraryProducts):
            tiles[name] = f"library={config.library}"
            continue
        tiles[name] = ",".join(f"{label}={value}" for label, value in zip(labels, config)
                               if value or label not in optional)
        if kernel == "mlp-fwd-fused":
            tiles[name] += ",fused_hidden=True"
    return tiles
