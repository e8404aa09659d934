"""prefix_decode_attention: one generation step's attention over ``[prefix ; cache]``, by the CUDA
C++ kernels of ``csrc/`` where they apply, else by the Triton kernels (or the reference on CPU)."""
from __future__ import annotations

import os

import torch

# (the module, its functions looked up per call: tests replace them; an import statement in a
# decoding step's functions cost the host 1.4 us on this repo's CPU machine, per layer per token)
from .. import _cuda_build
from .._backend import get_backend, override_global, triton_interpret, use_triton
from ._checks import check_kernel_head_dim, check_out_dtype, check_prefix_attention_args, check_tensor
from .prefix_attention import prefix_attention, resolve_softmax_scale

__all__ = ["prefix_decode_attention", "merge_attention_states", "cuda_decode_supported"]

CUDA_HEAD_DIMS = (64, 128, 256)
MAX_QUERY_LEN = 8
# Which CUDA decode kernel serves a call: the tensor-core one (mma.sync, sm_80+) at the head dims in
# TENSOR_CORE_HEAD_DIMS, the CUDA-core one at the others. Head dim 128 since the sixth H200 run
# (2026-11-27 15:45): there the tensor-core kernel, its fragments read by ldmatrix since the H100
# had timed it slower, passed its 18 GPU cases (fp16/bf16, Llama-3-8B's group of 4, prefixes of
# 1-128, caches of 1-4096) and beat the CUDA-core kernel at all four points of the decode suite's
# --quick grid (0.057 against 0.0632 ms, 0.0134 / 0.0142, 0.0623 / 0.0678, 0.0536 / 0.0596).
# Head dims 64 and 256 since the seventh (19:14): its 36 GPU cases there passed (the same grid),
# and the kernel beat the CUDA-core one at Qwen2.5-0.5B's heads (14/2/64: 0.0214 against 0.0246 ms
# at P=30, cache 4096, B=8) and at 8/4/256 (0.0516 against 0.0645), as it did again at head dim 128
# at three of the four --quick points (0.0132 / 0.014, 0.0548 / 0.063, 0.0499 / 0.057; 0.064
# against 0.0591 at P=30, cache 4096, B=8). Every head dim the CUDA ops serve takes it, then; the
# CUDA-core kernel serves GPUs before sm_80 and a failed tensor-core self-check.
# PREFIXKERN_DECODE_TENSOR_CORES=1 or 0 forces one kernel for every call (TENSOR_CORES: None
# when unset, the per-head-dim default).
TENSOR_CORE_HEAD_DIMS = (64, 128, 256)
_TENSOR_CORES_SETTING = os.environ.get("PREFIXKERN_DECODE_TENSOR_CORES")
TENSOR_CORES: bool | None = None if _TENSOR_CORES_SETTING is None else _TENSOR_CORES_SETTING == "1"


# K/V stages of the tensor-core kernel: 1 (a tile copied, waited for, then its products), 2 (the
# next tile's copies in flight while the block computes on this one; twice the shared memory, so
# fewer resident blocks), or 0, the default: the launcher picks per call (plan_mma_decode in
# csrc/decode_common.cuh: two stages where their plan fits one wave and gives each block two K/V
# tiles or more). The eighth run (H100) timed two stages at 0.905-0.959x the one-stage time at the
# points that rule picks them, and 1.06-1.19x at the two it does not. PREFIXKERN_DECODE_STAGES=1, 2
# or auto (0) sets it for every tensor-core call; the decode suite times both apart
# (prefixkern_one_stage, prefixkern_two_stage). (The setting parsed once here; a bad one is kept as
# given, for the error at the first call.)
MMA_STAGES: int | str = _cuda_build.decode_stages_setting()


def mma_stages(stages: int | str):
    """Run the block with the tensor-core decode kernel's K/V stages set to ``stages``: 1, 2, or 0
    (``"auto"``, the default) for the launcher's choice per call."""
    return override_global(globals(), "MMA_STAGES", stages)


def _mma_stages() -> int:
    """``MMA_STAGES`` as 0 (the launcher's choice), 1 or 2; a ValueError naming the setting
    otherwise. Every tensor-core decoding call asks: an int, the usual case, is returned without
    parsing."""
    stages = MMA_STAGES
    if stages == 0 or stages == 1 or stages == 2:
        return stages
    parsed = _cuda_build.decode_stages_setting(stages) if isinstance(stages, str) else None
    if isinstance(parsed, int):
        return parsed
    raise ValueError(f"PREFIXKERN_DECODE_STAGES (the tensor-core decode kernel's K/V stages) must be 1, 2 or "
                     f"auto, got {MMA_STAGES!r}")


def tensor_core_decoding(enabled: bool | None = True):
    """Run the block with ``TENSOR_CORES`` set to ``enabled`` (True / False: that kernel for every
    call; None: the per-head-dim default). The benchmarks time generate() each way."""
    return override_global(globals(), "TENSOR_CORES", enabled)


def tensor_cores_by_default(head_dim: int) -> bool:
    """Whether a decode call at ``head_dim`` that names no kernel asks for the tensor-core one
    (``TENSOR_CORES``, else ``TENSOR_CORE_HEAD_DIMS``); it runs where ``tensor_cores_usable`` allows."""
    return head_dim in TENSOR_CORE_HEAD_DIMS if TENSOR_CORES is None else TENSOR_CORES


def _aligned(t: torch.Tensor) -> bool:
    """16-byte rows: what the kernel's vector copies need (it checks again, and raises)."""
    strides = t.stride()
    if strides[-1] != 1 or t.data_ptr() % 16:
        return False
    shape = t.shape
    # A plain loop: this runs for five tensors in every decoding layer (a generator expression
    # over zip took twice as long).
    for i in range(len(strides) - 1):
        if strides[i] % 8 and shape[i] != 1:
            return False
    return True


def cuda_decode_supported(q, k, v, prefix_k, prefix_v, *, softcap=None, window=None, alibi_slopes=None,
                          dropout_p=0.0) -> bool:
    """Whether the CUDA decode kernel serves this call (it does q_len 1..8, fp16/bf16, head dims
    64/128/256, GQA, shared/per-row/per-task prefixes and padding; nothing else)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in CUDA_HEAD_DIMS
            and q.shape[2] <= MAX_QUERY_LEN and softcap is None and window is None and alibi_slopes is None
            and dropout_p == 0.0 and all(_aligned(t) for t in (q, k, v, prefix_k, prefix_v)))


def prefix_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    prefix_index: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    num_splits: int = 0,
    prefix_gemm: bool = False,
    tensor_cores: bool | None = None,
    return_lse: bool = False,
):
    """Causal attention of a decoding step's queries over ``[prefix ; cache]``.

    Same contract as ``prefix_attention(..., causal=True)`` (bottom-right aligned: query i of S
    sees cache key j iff ``j <= i + L - S``), for the inference-time call: not differentiable.

    On a GPU, fp16/bf16 with head dim 64/128/256 and S <= 8, the CUDA C++ kernel runs: the key
    axis is split over the SMs (flash-decoding), each block reads its KV chunk once for all query
    heads of a GQA group, and the chunks are merged by log-sum-exp. The kernel is built on first
    use (``prefixkern.build_cuda()``); where it cannot be built, or for float32, the call goes to
    the Triton decode kernel (the same split; ``kernels/prefix_decode.py``) for long caches and
    wide batches, to the general forward kernel for the rest and for groups of more than 32 query
    rows (CPU tensors: the reference), with one warning for a failed build. From 512 MiB of cache
    K/V (``CUDA_DECODE_MAX_KV_BYTES``) the Triton decode kernel takes the call from the CUDA one,
    faster there on the H200 (module comments). ``prefix_gemm`` and ``tensor_cores`` concern the
    CUDA kernels only, and keep them at any cache size.

    ``prefix_gemm=True`` (a batch-shared prefix only) computes the prefix's part separately as one
    batched matrix product per KV head over every row's queries (cuBLAS, tensor cores, the prefix
    read once for the whole batch) and merges it with the kernel's cache part by log-sum-exp; the
    default reads the prefix inside the kernel, in the same pass as the cache (one launch fewer).
    Which is faster depends on P, the batch and the cache length: the decode benchmark times both.

    ``tensor_cores=True`` runs the kernel whose products are mma.sync instructions (sm_80+; the
    keys and head dim on the M side, up to 8 query rows on N), ``False`` the one of CUDA-core FMAs;
    None takes ``PREFIXKERN_DECODE_TENSOR_CORES`` if set, else the tensor-core kernel (measured
    faster at head dims 64, 128 and 256 on the H200, ``TENSOR_CORE_HEAD_DIMS``). Where the
    tensor-core kernel cannot run (an older GPU, a failed self-check) the CUDA-core kernel does,
    with one warning.

    Args: as ``prefix_attention``; ``num_splits`` fixes the number of key chunks (0 = pick for the GPU).
    Returns: ``out`` ``[B, Hq, S, D]`` (and the float32 ``lse`` ``[B, Hq, S]`` if asked).
    """
    check_prefix_attention_args(q, k, v, prefix_k, prefix_v, causal=True, softmax_scale=softmax_scale,
                                key_padding_mask=key_padding_mask, prefix_index=prefix_index, dropout_p=0.0,
                                alibi_slopes=None, softcap=None, window=None)
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be a non-negative int (0 = automatic), got {num_splits!r}")
    if tensor_cores is not None and not isinstance(tensor_cores, bool):
        raise TypeError(f"tensor_cores must be a bool or None, got {type(tensor_cores).__name__}")
    if use_triton(q.device):
        check_kernel_head_dim(q.shape[-1])
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    # (A call that asks for one of the CUDA kernels' variants keeps them at any cache size.)
    ops = _cuda_ops_serving(q, k, v, prefix_k, prefix_v, may_give_way=not (prefix_gemm or tensor_cores))
    if ops is None:
        return _without_cuda_ops(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale, num_splits,
                                 return_lse)
    return _cuda_decode(ops, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale, num_splits,
                        prefix_gemm, tensor_cores_by_default(q.shape[-1]) if tensor_cores is None else tensor_cores,
                        return_lse)


def decode_step(q, k, v, prefix_k, prefix_v, *, key_padding_mask, prefix_index, softmax_scale: float | None):
    """``prefix_decode_attention`` for a caller whose arguments are valid by construction: the HF
    integration's decoding steps (shapes from the model, the prefix and its index its own).

    No Python argument checks (about half the host time of a decode call on the H200 machines
    measured, where the whole call took 40.6 us against SDPA's 19.9); the CUDA op still checks
    what memory safety needs (dims, dtypes, devices, strides, alignment) and raises. Where the
    CUDA kernel cannot serve the call, it goes where ``prefix_decode_attention`` would send it (the
    Triton decode kernel, or ``prefix_attention`` with its checks), without asking again whether
    the kernel serves it.

    Under torch.compile the call is the custom op ``prefixkern::decode_step``, opaque to the
    trace: whether the CUDA kernel serves a call depends on its tensors' addresses (16-byte
    alignment), which a traced tensor does not have, so the op decides when it runs, as an eager
    call does. A compiled decoding step (a static cache's, CUDA graphs included: the captured
    graph replays the launches of the addresses it was recorded with) so takes the CUDA kernel
    too, with no graph break."""
    scale = resolve_softmax_scale(softmax_scale, q.shape[-1])
    if torch.compiler.is_compiling():
        return decode_step_op(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale)
    return _decode_step(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale)


def _decode_step(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale: float):
    ops = _cuda_ops_serving(q, k, v, prefix_k, prefix_v)
    if ops is None:
        return _without_cuda_ops(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale, 0, False)
    return _cuda_decode(ops, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale, 0, False,
                        tensor_cores_by_default(q.shape[-1]), False)


@torch.library.custom_op("prefixkern::decode_step", mutates_args=())
def decode_step_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                   prefix_v: torch.Tensor, key_padding_mask: torch.Tensor | None, prefix_index: torch.Tensor | None,
                   softmax_scale: float) -> torch.Tensor:
    """``decode_step`` as one op for torch.compile: ``out [B, Hq, S, D]`` contiguous, whichever
    kernel served the call (the general kernel leaves q's layout: copied then, a decode step's few
    rows)."""
    with torch.no_grad():
        return _decode_step(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, softmax_scale).contiguous()


@decode_step_op.register_fake
def _(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, softmax_scale):
    return q.new_empty(q.shape)


# Routing measured on the H200 (2026-11-27's decode grid: Llama-3-8B's 32 query and 8 KV heads,
# head dim 128, bf16, a shared prefix of 30 or 128, caches of 512 / 4k / 32k keys, batch 1 / 8 / 64).
#
# The CUDA kernel gives way to the Triton decode kernel where the cache K/V a call reads reach
# CUDA_DECODE_MAX_KV_BYTES: at 1 GiB and more the Triton kernel ran at SDPA's speed (4096 keys x
# batch 64: 0.262 against 0.343 ms; 32k x 8: 0.264 against 0.332; 32k x 64: 1.90 against 2.63), at
# 128 MiB the CUDA kernel won everywhere (32k x 1: 0.086 against 0.115; 4096 x 8: 0.066 against
# 0.305; 512 x 64: 0.065 against 0.146). Nsight Compute on the CUDA kernel (4096 x 8): 55% of DRAM
# bandwidth, a grid of 0.89 waves at 37.5% theoretical occupancy (registers and shared memory). These
# rows were timed with the plain Triton launch (the raw launch, the default since, makes the Triton
# paths' two launches cheaper on the host; the small-cache points are host-bound).
CUDA_DECODE_MAX_KV_BYTES = 512 << 20
# Without the CUDA kernel, the Triton decode kernel (key chunks over the SMs, a GQA group per
# program, then a merge launch) serves long caches and wide batches, the general forward kernel
# (one launch, a program per query head) the rest. Decode kernel against general kernel: 32k keys
# 0.115 against 0.708 ms (batch 1), 0.264 against 0.796 (batch 8); batch 64 (512 row-heads) 0.146
# against 0.199 (512 keys), 0.262 against 0.563 (4096); at batch 1 and 8 up to 4k keys the general
# kernel won (4096 x 1: 0.237 against 0.303, 0.099 against 0.144 with P = 128; 4096 x 8: 0.257
# against 0.305; 512 x 8: 0.189 against 0.281).
TRITON_DECODE_MIN_KEYS = 16384
TRITON_DECODE_MIN_ROW_HEADS = 256


def _cache_kv_bytes(k: torch.Tensor) -> int:
    """Bytes of cache K and V a decoding call reads (the prefix left out: at most P keys a head)."""
    batch, heads, keys, dim = k.shape
    return 2 * batch * heads * keys * dim * k.element_size()


def _cuda_ops_serving(q, k, v, prefix_k, prefix_v, may_give_way: bool = True):
    """The built CUDA ops (``torch.ops.prefixkern_cuda``) when they serve this call, else None.
    None while torch.compile traces (``decode_step`` then hands the call to its custom op, which
    asks again when it runs), and, ``may_give_way``, where the Triton decode kernel takes the call
    (a cache of CUDA_DECODE_MAX_KV_BYTES and more); the first call builds and self-checks the library."""
    if get_backend() != "auto" or k.shape[2] == 0 or torch.compiler.is_compiling() \
            or not cuda_decode_supported(q, k, v, prefix_k, prefix_v):
        return None
    if may_give_way and _cache_kv_bytes(k) >= CUDA_DECODE_MAX_KV_BYTES \
            and _triton_decode_serves(q, k, prefix_k.shape[-2]):
        return None
    return _cuda_build.cuda_ops()


def _cuda_decode(ops, q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale: float, num_splits: int,
                 prefix_gemm: bool, tensor_cores: bool, return_lse: bool):
    """The CUDA kernels' launch: partial attention per key chunk, then their log-sum-exp merge."""
    # (int64 at unit stride, as the kernel reads it; the op checks both)
    index = prefix_index.long().contiguous() if prefix_index is not None else None
    # The op reads a bool or uint8 mask; the public op takes any integer one (1 = real token).
    if key_padding_mask is not None and key_padding_mask.dtype not in (torch.bool, torch.uint8):
        key_padding_mask = key_padding_mask != 0
    if tensor_cores:
        tensor_cores = _cuda_build.tensor_cores_usable(max(q.get_device(), 0))   # (CPU stand-ins in tests: -1)
    # The op's `stages` argument, given only where it is not the schema's default of 1.
    stages = _mma_stages() if tensor_cores else 1
    stages = (stages,) if stages != 1 else ()
    if prefix_gemm and prefix_k.dim() == 3:
        empty = prefix_k[:, :0]
        out_partial, lse_partial = ops.prefix_decode_partial(q, k, v, empty, empty, None, key_padding_mask, scale,
                                                             num_splits, tensor_cores, *stages)
        prefix_out, prefix_lse = _prefix_part_by_gemm(q, prefix_k, prefix_v, scale)
        out_partial = torch.cat([prefix_out.unsqueeze(0), out_partial])
        lse_partial = torch.cat([prefix_lse.unsqueeze(0), lse_partial])
    else:
        # Partial kernel and merge in one op call (one dispatcher round trip; a library built
        # before the op existed has only the two).
        fused = getattr(ops, "prefix_decode_attention", None)
        if fused is not None:
            out, lse = fused(q, k, v, prefix_k, prefix_v, index, key_padding_mask, scale, num_splits, tensor_cores,
                             *stages)
            return (out, lse) if return_lse else out
        out_partial, lse_partial = ops.prefix_decode_partial(q, k, v, prefix_k, prefix_v, index, key_padding_mask,
                                                             scale, num_splits, tensor_cores, *stages)
    out, lse = ops.merge_attention_states(out_partial, lse_partial, q.dtype)
    return (out, lse) if return_lse else out


def _without_cuda_ops(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale: float, num_splits: int,
                      return_lse: bool):
    """A decode call the CUDA kernels do not take: the Triton decode kernel where it serves, else
    ``prefix_attention`` (the general forward kernel, or the reference on CPU)."""
    if _triton_decode_serves(q, k, prefix_k.shape[-2]):
        return _triton_decode(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale, num_splits,
                              return_lse)
    with torch.no_grad():
        return prefix_attention(q, k, v, prefix_k, prefix_v, causal=True, softmax_scale=scale,
                                key_padding_mask=key_padding_mask, prefix_index=prefix_index, return_lse=return_lse)


def _triton_decode_serves(q: torch.Tensor, k: torch.Tensor, prefix_len: int) -> bool:
    """Whether the Triton decode kernel takes a call the CUDA kernels do not: the Triton backend in
    force for q's device, a GQA group of at most MAX_GROUP_ROWS query rows, an eager call
    (torch.compile traces the forward kernel's custom op instead; this launcher is no op), and on
    a GPU a call it was measured to serve faster than the general kernel: TRITON_DECODE_MIN_KEYS
    keys or TRITON_DECODE_MIN_ROW_HEADS rows x KV heads (the interpreter takes every call, so CI
    runs the kernel)."""
    from ..kernels.prefix_decode import MAX_GROUP_ROWS

    if not (q.shape[2] <= MAX_QUERY_LEN and q.shape[1] // k.shape[1] * q.shape[2] <= MAX_GROUP_ROWS
            and k.shape[2] > 0 and not torch.compiler.is_compiling() and use_triton(q.device)):
        return False
    return not q.is_cuda or triton_decode_is_faster(k.shape[0] * k.shape[1], k.shape[2] + prefix_len)


def triton_decode_is_faster(row_heads: int, keys: int) -> bool:
    """Whether the Triton decode kernel beats the general forward kernel at a decoding call of
    ``row_heads`` (batch x KV heads) over ``keys`` (prefix and cache): the H200's rule above."""
    return keys >= TRITON_DECODE_MIN_KEYS or row_heads >= TRITON_DECODE_MIN_ROW_HEADS


def triton_decode_everywhere():
    """Run the block with the Triton decode kernel taking every call it can, measured faster or
    not (the decode suite's prefixkern_triton_decode rows time it where the rule sends calls to
    the general kernel)."""
    return override_global(globals(), "TRITON_DECODE_MIN_ROW_HEADS", 0)


def _triton_decode(q, k, v, prefix_k, prefix_v, key_padding_mask, prefix_index, scale: float, num_splits: int,
                   return_lse: bool):
    """The Triton decode kernel's partial attention per key chunk, then their log-sum-exp merge
    (the Triton merge kernel: two launches in all)."""
    from ..kernels._launch import on_device
    from ..kernels.prefix_decode import prefix_decode_partial

    with torch.no_grad(), on_device(q.device):
        out_partial, lse_partial = prefix_decode_partial(q, k, v, prefix_k, prefix_v, prefix_index=prefix_index,
                                                         key_padding_mask=key_padding_mask, softmax_scale=scale,
                                                         num_splits=num_splits)
        if out_partial.shape[0] == 1:       # one chunk: nothing to merge
            out, lse = out_partial[0].to(q.dtype), lse_partial[0]
        else:
            out, lse = _merge(out_partial, lse_partial, q.dtype)
    return (out, lse) if return_lse else out


def _prefix_part_by_gemm(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor, scale: float):
    """Attention of every row's queries over a batch-shared prefix alone, as one batched GEMM per
    KV head: ``(out float32 [B, Hq, S, D], lse float32 [B, Hq, S])``."""
    batch, num_heads, seq_q, head_dim = q.shape
    num_kv_heads = prefix_k.shape[0]
    group = num_heads // num_kv_heads
    # [Hkv, B * group * S, D]: all queries that read KV head g, from every row.
    rows = q.reshape(batch, num_kv_heads, group, seq_q, head_dim).permute(1, 0, 2, 3, 4)
    rows = rows.reshape(num_kv_heads, batch * group * seq_q, head_dim)
    # Float32 products: a 16-bit bmm rounds its output, and with a short prefix a score's rounding
    # (2^-9 of the raw dot product) is the LSE's error (0.0077 at P = 1; float32 products: 1e-6).
    scores = torch.bmm(rows.float(), prefix_k.transpose(1, 2).float()) * scale  # [Hkv, rows, P]
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    out = torch.bmm(probs, prefix_v.float())                                     # [Hkv, rows, D]
    out = out.reshape(num_kv_heads, batch, group, seq_q, head_dim).permute(1, 0, 2, 3, 4)
    lse = lse.reshape(num_kv_heads, batch, group, seq_q).permute(1, 0, 2, 3)
    return out.reshape(batch, num_heads, seq_q, head_dim), lse.reshape(batch, num_heads, seq_q)


def merge_attention_states(out_partial: torch.Tensor, lse_partial: torch.Tensor,
                           out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention computed over disjoint key sets: ``out_partial`` ``[N, ..., D]`` (each part
    normalised over its keys), ``lse_partial`` ``[N, ...]`` float32 natural-log log-sum-exps.
    Returns ``(out [..., D], lse [...])``; a row no part saw gives 0 and -inf."""
    check_tensor("out_partial", out_partial, tuple(range(2, 9)), "[N, ..., D]")
    check_tensor("lse_partial", lse_partial, tuple(range(1, 8)), "[N, ...]")
    if tuple(out_partial.shape[:-1]) != tuple(lse_partial.shape):
        raise ValueError(f"lse_partial must have out_partial's leading shape {tuple(out_partial.shape[:-1])}, "
                         f"got {tuple(lse_partial.shape)}")
    for name, t in (("out_partial", out_partial), ("lse_partial", lse_partial)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if lse_partial.device != out_partial.device:
        raise ValueError(f"lse_partial must be on out_partial's device {out_partial.device}, got {lse_partial.device}")
    check_out_dtype(out_dtype)
    return _merge(out_partial, lse_partial, out_dtype or out_partial.dtype)


def _merge(out_partial: torch.Tensor, lse_partial: torch.Tensor, out_dtype: torch.dtype):
    """``merge_attention_states`` on arguments valid by construction: the CUDA kernel where it is
    built and applies, else the Triton merge kernel where the Triton kernels run (one launch where
    the torch ops below take about a dozen), else torch ops."""
    # The kernels take float32 parts, at least one (no parts: the torch ops below give every row 0
    # and -inf; the kernels divide by the count).
    kernel_parts = out_partial.dtype == torch.float32 and lse_partial.dtype == torch.float32 \
        and out_partial.shape[0] > 0
    if kernel_parts and out_partial.is_cuda and out_dtype in (torch.float16, torch.bfloat16) \
            and get_backend() == "auto":
        from .._cuda_build import cuda_ops

        ops = cuda_ops()
        if ops is not None:
            return ops.merge_attention_states(out_partial, lse_partial, out_dtype)
    if (kernel_parts and out_dtype in (torch.float16, torch.bfloat16, torch.float32)
            and out_partial.is_contiguous() and lse_partial.is_contiguous() and not torch.compiler.is_compiling()
            and (out_partial.is_cuda or triton_interpret()) and use_triton(out_partial.device)):
        from ..kernels._launch import on_device
        from ..kernels.prefix_decode import prefix_decode_merge

        with on_device(out_partial.device):
            return prefix_decode_merge(out_partial, lse_partial, out_dtype)
    acc = torch.promote_types(out_partial.dtype, torch.float32)
    lse_partial = lse_partial.to(acc)
    lse = torch.logsumexp(lse_partial, dim=0)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lse_partial - safe)                       # 0 for parts that saw nothing
    out = (weights.unsqueeze(-1) * out_partial.to(acc)).sum(0)
    return out.to(out_dtype), lse
