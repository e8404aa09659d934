"""Hugging Face + PEFT prefix tuning through prefixkern's kernels.

``patch(peft_model)`` changes three things and nothing else:

1. PEFT's ``get_prompt`` returns a :class:`PrefixKVCache` instead of a ``DynamicCache`` holding
   B copies of the prefix. The prefix is computed once per step by the fused MLP (or read from
   the baked embedding) and kept beside the cache, batch-shared; the cache stores sequence keys
   only, appended in place (:class:`PrefixKVLayer`; ``generate(cache_implementation="static")``
   gets fixed-size buffers instead, :class:`PrefixKVStaticCache`, whose decoding steps
   transformers compiles; both in :mod:`.hf_cache`). It reports the same lengths as PEFT's cache
   (P + cached tokens), so positions, masks and generation bookkeeping are exactly stock PEFT's
   (real tokens at positions P..P+T-1).
2. The base model's attention implementation becomes ``"prefixkern"``, registered with
   transformers' ``AttentionInterface``: attention over ``[prefix ; sequence]`` by
   ``prefixkern.prefix_attention`` (no concatenation, no repeat_kv). Its mask function, registered
   with ``AttentionMaskInterface``, hands the attention the 2-D padding mask (transformers builds
   no mask for an implementation it does not know).
3. A forward pre-hook on the base model passes the prefix to the attention layers through the
   model's ``**kwargs`` (``prefixkern_prefix``), which every attention-interface model forwards.

Because nothing is written into the cache during training, a recomputed layer (gradient
checkpointing) sees exactly what the first pass saw, which is why checkpointing works here while
stock PEFT refuses it.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import math
import types
import warnings
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..ops._checks import KERNEL_MAX_HEAD_DIM
from ..ops.decode_attention import MAX_QUERY_LEN, decode_step
from ..ops.prefix_attention import prefix_attention, prefix_attention_varlen
from ..ops.prefix_mlp import fused_prefix_mlp
from ..prefix_encoder import PrefixEncoder
from .hf_cache import (PREFIX_CACHES, PrefixKVCache, PrefixKVLayer, PrefixKVStaticCache,  # noqa: F401
                       PrefixKVStaticLayer, PrefixState)

__all__ = ["patch", "unpatch", "is_patched", "PrefixKVCache", "PrefixKVLayer", "PrefixKVStaticCache", "PrefixState",
           "prefix_per_row", "save_resumable", "load_resumable", "SUPPORTED_MODEL_TYPES"]

ATTN_NAME = "prefixkern"
KWARG = "prefixkern_prefix"

# Families the tests cover against stock PEFT (all but BLOOM through transformers' AttentionInterface).
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma", "gemma2",
                         "gemma3_text", "glm4", "phi", "phi3", "olmo", "olmo2", "granite", "smollm3", "cohere2",
                         "starcoder2", "gpt_neox", "gpt2", "bloom", "bart", "opt", "gpt_bigcode", "biogpt", "persimmon",
                         "olmoe", "granitemoe", "phimoe", "exaone4", "ernie4_5", "seed_oss", "arcee", "apertus", "bitnet",
                         "bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "data2vec-text",
                         "roberta-prelayernorm", "xlm-roberta-xl")
# Families whose attention goes through the interface but cannot get the prefix from it, and why.
REFUSED_MODEL_TYPES: dict[str, str] = {
    "stablelm": "its decoder layers call their attention without the forward's keyword arguments, so the prefix "
                "(passed to every attention layer that way) cannot reach it",
    "diffllama": "its differential attention subtracts two softmax maps; the kernels compute one softmax over "
                 "[prefix ; sequence] (let through, its logits differed from stock PEFT's by 0.48)",
}
ENCODER_DECODER_TYPES = ("bart",)
# Encoder-only families (P-Tuning v2's NLU models): every layer's self-attention, bidirectional,
# reads the prefix, as under stock PEFT (BART's encoder, by contrast, reads none).
ENCODER_ONLY_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert", "ernie", "data2vec-text",
                      "roberta-prelayernorm", "xlm-roberta-xl")
# Families that take packed batches (transformers' DataCollatorWithFlattening with
# return_flash_attn_kwargs=True): those with rotary positions (or none in some layers), so a packed
# sequence's attention is the same wherever it sits in the row (PEFT drops position_ids, so positions
# run on across sequences). GPT-2, OPT, GPT-BigCode, BioGPT, BART and the encoders learn absolute
# positions; BLOOM's ALiBi counts them.
PACKED_MODEL_TYPES = tuple(t for t in SUPPORTED_MODEL_TYPES
                           if t not in ("gpt2", "opt", "gpt_bigcode", "biogpt", "bloom", "bart", *ENCODER_ONLY_TYPES))
# The oldest transformers release the integration tests pass on against stock PEFT (checked on 5.5.0
# to 5.24.0). Older releases write these families' attention differently: on 5.0-5.4 GPT-2, BLOOM,
# BART, Phi, OLMo and Cohere 2 gave logits off stock PEFT's by up to 1.3, and 4.56/4.57 fail 57 of the
# comparisons. patch() refuses them instead of running them wrong.
MIN_TRANSFORMERS = "5.5.0"


# --------------------------------------------------------------------------------------------
# The attention function and its mask function
# --------------------------------------------------------------------------------------------

def _attention_without_prefix(query, key, value, key_padding_mask, scaling, dropout, causal, window, softcap):
    """A layer called with no prefix (adapter disabled): plain attention, same mask conventions."""
    from .. import reference

    if softcap is None and window is None:
        seq_q, seq_kv = query.shape[2], key.shape[2]
        group = query.shape[1] // key.shape[1]
        mask = torch.ones(seq_q, seq_kv, dtype=torch.bool, device=query.device)
        if causal:
            mask = torch.ones_like(mask).tril(seq_kv - seq_q)
        mask = mask[None, None]
        if key_padding_mask is not None:
            mask = mask & key_padding_mask.bool()[:, None, None, :]
        k = key.repeat_interleave(group, 1) if group > 1 else key
        v = value.repeat_interleave(group, 1) if group > 1 else value
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        # A query that sees nothing gives NaN in SDPA; HF's eager gives a finite row. Zero it.
        return torch.nan_to_num(out, nan=0.0)
    # Soft-capping or a window: the oracle with a zero-length prefix (the public op requires P > 0).
    empty = key.new_zeros(key.shape[1], 0, key.shape[3])
    return reference.prefix_attention(query, key, value, empty, empty, causal=causal, softmax_scale=scaling,
                                      key_padding_mask=key_padding_mask, softcap=softcap, window=window)


def _sequence_columns(attention_mask: torch.Tensor, prefix_len: int, seq_kv: int) -> torch.Tensor:
    """The columns of PEFT's 2-D mask ``[prefix ; sequence]`` that cover the ``seq_kv`` keys the
    layer attends to: its last ``seq_kv``, except under a static cache's fixed-size mask
    ``[prefix ; max_cache_len]`` while the layer hands over only the written part (an eager step),
    whose keys are the first ``seq_kv`` after the prefix."""
    if prefix_len and attention_mask.shape[1] > prefix_len + seq_kv:
        return attention_mask[:, prefix_len:prefix_len + seq_kv]
    return attention_mask[:, -seq_kv:]


def _decoding_step(num_queries: int) -> bool:
    """Whether a forward of ``num_queries`` query positions is a generation step: few enough for
    the decode kernels, and no autograd."""
    return num_queries <= MAX_QUERY_LEN and not torch.is_grad_enabled()


def prefixkern_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                         sliding_window=None, softcap=None, **kwargs):
    """transformers attention-interface function: ``query`` [B, Hq, S, D], ``key``/``value``
    [B, Hkv, S_kv, D] (sequence only), ``attention_mask`` the 2-D padding mask over
    ``[prefix ; sequence]`` from :func:`prefixkern_mask` (or None). Returns ``([B, S, Hq, D], None)``."""
    state: PrefixState | None = kwargs.get(KWARG)
    # Causal decoder self-attention reads the prefix, and an encoder-only model's self-attention;
    # an encoder-decoder's encoder and its decoder's cross-attention (BART) run plain, as under
    # stock PEFT.
    if not (getattr(module, "is_causal", True) and getattr(module, "is_decoder", True)) \
            and not (state is not None and state.bidirectional):
        state = None
    layer_prefix, prefix_index = (None, None) if state is None else state.layer_on(module.layer_idx, query.device)
    seq_kv = key.shape[2]
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                "prefixkern's attention takes a 2-D padding mask [B, P + S_kv]; got a "
                f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}. Pass a 2-D attention_mask."
            )
        key_padding_mask = _sequence_columns(attention_mask, layer_prefix[0].shape[-2] if layer_prefix else 0, seq_kv)
    causal = bool(getattr(module, "is_causal", True)) and kwargs.get("is_causal", True) is not False
    dropout_p = float(dropout) if module.training else 0.0
    window = int(sliding_window) if sliding_window else None
    softcap = float(softcap) if softcap else None
    if layer_prefix is None:
        out = _attention_without_prefix(query, key, value, key_padding_mask, scaling, dropout_p, causal, window,
                                        softcap)
        return out.transpose(1, 2).contiguous(), None
    prefix_k, prefix_v = layer_prefix
    packed = kwargs.get("cu_seq_lens_q") is not None
    # Under autocast the projections come out in the autocast dtype while rotary embeddings may
    # leave q/k in float32: compute in the dtype eager attention's matmuls would use.
    device_type = query.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    # (A dtype test first: a no-op .to() still costs a dispatcher round trip, five per layer.)
    if query.dtype != dtype or key.dtype != dtype or value.dtype != dtype:
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if prefix_k.dtype != dtype:
        prefix_k, prefix_v = prefix_k.to(dtype), prefix_v.to(dtype)
    if prefix_index is not None and not packed and prefix_index.shape[0] != query.shape[0]:
        raise ValueError(f"prefix_per_row names {prefix_index.shape[0]} rows but the batch has {query.shape[0]} "
                         "(only a packed batch, cu_seq_lens_q, may name one prefix per sequence)")
    if packed:
        return _packed_attention(query, key, value, prefix_k, prefix_v, key_padding_mask, prefix_index, scaling,
                                 causal, dropout_p, softcap, window, kwargs), None
    if (causal and dropout_p == 0.0 and _decoding_step(query.shape[2]) and softcap is None and window is None
            and query.is_cuda):
        # A generation step: the CUDA decode kernel (Triton when it cannot serve the call), without
        # the public op's argument checks (the model made these tensors; the CUDA op checks again).
        out = decode_step(query, key, value, prefix_k, prefix_v, softmax_scale=scaling,
                          key_padding_mask=key_padding_mask, prefix_index=prefix_index)
        return out.transpose(1, 2), None
    out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, softmax_scale=scaling,
                           key_padding_mask=key_padding_mask, prefix_index=prefix_index, dropout_p=dropout_p,
                           softcap=softcap, window=window)
    return out.transpose(1, 2), None


def _packed_attention(query, key, value, prefix_k, prefix_v, key_padding_mask, prefix_index, scaling, causal,
                      dropout_p, softcap, window, kwargs):
    """A packed row (``cu_seq_lens_q/k`` and ``max_length_q/k`` from the collator): each sequence
    attends to the prefix and to itself only, through ``prefix_attention_varlen``. Returns
    ``[1, total, Hq, D]``."""
    if query.shape[0] != 1 or key_padding_mask is not None:
        raise ValueError("packed sequences (cu_seq_lens_q) come as one row without padding; got a batch of "
                         f"{query.shape[0]} rows{' with a padding mask' if key_padding_mask is not None else ''}")
    cu_q, cu_k = kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"])
    num_seqs = cu_q.shape[0] - 1
    index = prefix_index
    if index is not None and index.shape[0] != num_seqs:
        if index.shape[0] != 1:
            raise ValueError(f"prefix_per_row names {index.shape[0]} prefixes for a packed row of {num_seqs} "
                             "sequences: name one per sequence, or one for the whole row")
        # One prefix for the whole row: pass it batch-shared. (An index expanded to the sequences
        # would be a new tensor in every layer, and each would have its values read: a device sync.)
        prefix_k, prefix_v = prefix_k.index_select(0, index)[0], prefix_v.index_select(0, index)[0]
        index = None
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
    out = prefix_attention_varlen(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                  prefix_k, prefix_v, cu_q, cu_k, max_q, max_k, causal=causal, softmax_scale=scaling,
                                  prefix_index=index, dropout_p=dropout_p, softcap=softcap, window=window)
    return out.unsqueeze(0)


def _bloom_alibi_slopes(num_heads: int, device) -> torch.Tensor:
    """BLOOM's ALiBi slopes (``build_alibi_tensor`` in transformers; its helper's name and place
    change between versions, so the formula is here)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32, device=device))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device=device)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32, device=device))
        slopes = torch.cat([slopes, extra])
    return slopes


def _bloom_attention_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                             output_attentions=False, **kwargs):
    """BLOOM's attention (hand-written, ALiBi) over ``[prefix ; sequence]`` by the kernels. ALiBi
    positions count the prefix as BLOOM does from PEFT's mask (prefix key j at j, a real sequence
    key at P + the number of real keys before it); the ``alibi`` tensor BLOOM built is not read."""
    if not isinstance(layer_past, PREFIX_CACHES):
        return self._prefixkern_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                        use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch_size, q_length, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))
    key, value = layer_past.update(key, value, self.layer_idx)
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError("prefixkern's BLOOM attention takes the 2-D padding mask; got a "
                             f"{attention_mask.dim()}-D mask")
        key_padding_mask = _sequence_columns(attention_mask, layer_past.prefix.length, key.shape[2])
    (prefix_k, prefix_v), prefix_index = layer_past.prefix.layer_on(self.layer_idx, query.device)
    dtype = query.dtype
    slopes = _bloom_alibi_slopes(self.num_heads, query.device)
    out = prefix_attention(query, key, value, prefix_k.to(dtype), prefix_v.to(dtype), causal=True,
                           softmax_scale=self.inv_norm_factor, key_padding_mask=key_padding_mask,
                           prefix_index=prefix_index,
                           dropout_p=self.attention_dropout.p if self.training else 0.0, alibi_slopes=slopes)
    context = out.transpose(1, 2).reshape(batch_size, q_length, self.num_heads * self.head_dim)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        slices = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            output = output + F.linear(context[:, :, int(i * slices): int((i + 1) * slices)],
                                       self.dense.weight[:, int(i * slices): int((i + 1) * slices)])
    else:
        output = self.dense(context)
    return residual + F.dropout(output, p=self.hidden_dropout, training=self.training), None


def _patch_bloom(base_model) -> list:
    from transformers.models.bloom.modeling_bloom import BloomAttention

    patched = []
    for module in base_model.modules():
        if isinstance(module, BloomAttention):
            _override_method(module, "forward", _bloom_attention_forward)
            patched.append(module)
    return patched


def prefixkern_mask(*args, attention_mask=None, q_length=None, **kwargs):
    """transformers mask-interface function: the 2-D boolean padding mask as given (PEFT prepends
    the prefix's ones), or None when nothing is padded, so the kernel skips the padding test.

    Asking whether anything is padded reads the mask on the host: a device sync. A decoding step
    (at most ``MAX_QUERY_LEN`` queries, no autograd) skips the question and hands the mask on:
    the decode kernels' padding test costs one byte per key against the 2*D*2 bytes of K/V they
    read, while a sync per generated token would stall the host for the GPU's queue (and undo
    transformers' deferred stopping checks)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        return attention_mask
    mask = attention_mask.to(torch.bool)
    if torch.compiler.is_compiling() or (q_length is not None and _decoding_step(q_length)):
        return mask
    return None if bool(mask.all()) else mask


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, prefixkern_attention)
    AttentionMaskInterface.register(ATTN_NAME, prefixkern_mask)
    _REGISTERED = True


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------

def _override_method(obj, name: str, function) -> None:
    """``obj.<name>`` becomes ``function`` bound to ``obj``; ``obj._prefixkern_<name>`` keeps what
    it replaced (an instance attribute another library set, or the class's method), both bound
    weakly so the override adds no reference cycle."""
    previous = obj.__dict__.get(name)
    setattr(obj, f"_prefixkern_{name}",
            previous if previous is not None else _WeakBoundMethod(getattr(type(obj), name), obj))
    setattr(obj, name, _WeakBoundMethod(function, obj))


def _restore_method(obj, name: str) -> None:
    """Undo :func:`_override_method`."""
    previous = obj.__dict__.pop(f"_prefixkern_{name}")
    if isinstance(previous, _WeakBoundMethod) and previous.__func__ is getattr(type(obj), name):
        del obj.__dict__[name]
    else:
        setattr(obj, name, previous)


class _WeakBoundMethod:
    """``types.MethodType(function, obj)`` that does not keep ``obj`` alive. A bound method stored
    on its own instance is a reference cycle, which only Python's cyclic collector frees: a
    patched model, and its GPU memory, would outlive ``del model`` until the next full
    collection (stock PEFT models are freed at once). ``copy.deepcopy`` binds the copy to the
    copied object, as it does for a bound method."""

    def __init__(self, function, obj):
        self.__func__ = function
        self._obj = weakref.ref(obj)

    @property
    def __self__(self):
        return self._obj()

    def __call__(self, *args, **kwargs):
        obj = self._obj()
        if obj is None:
            raise ReferenceError(f"{self.__func__.__name__} was called after the object it was patched on was freed")
        return self.__func__(obj, *args, **kwargs)

    def __deepcopy__(self, memo):
        return _WeakBoundMethod(self.__func__, copy.deepcopy(self._obj(), memo))

    def __reduce__(self):
        return _WeakBoundMethod, (self.__func__, self._obj())


@dataclasses.dataclass
class _PatchState:
    previous_attn: dict
    hook: object
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rows: tuple[str, ...] | None = None      # adapter name per batch row (prefix_per_row)
    encoder_decoder: bool = False
    encoder_only: bool = False
    layer_map: tuple[int | None, ...] | None = None
    patched_modules: list = dataclasses.field(default_factory=list)
    encoders: dict = dataclasses.field(default_factory=dict)
    generating: int = 0                      # generate() calls under way (see _patched_generate)
    generation_prefix: tuple | None = None   # (key, PrefixState) of the call under way
    generation_length: int | None = None     # sequence tokens the call under way ends with, when known
    static_cache: object | None = None       # the PrefixKVStaticCache of the call under way, if it asked for one
    kept_static_cache: object | None = None  # the last call's, for the next call of the same sizes
    task_cache_argument: str | None = None   # a task head's cache keyword (_task_cache_argument), at patch time


def _transformers_below(floor: str, installed: str | None = None) -> str | None:
    """The installed transformers release (or ``installed``) if it is older than ``floor``, else None."""
    from packaging.version import Version

    if installed is None:
        import transformers

        installed = transformers.__version__
    return installed if Version(installed) < Version(floor) else None


def _check_transformers_version(installed: str | None = None) -> None:
    installed = _transformers_below(MIN_TRANSFORMERS, installed)
    if installed is not None:
        raise RuntimeError(
            f"prefixkern.patch needs transformers>={MIN_TRANSFORMERS}, found {installed}: older releases write the "
            "families' attention differently and several gave wrong logits against stock PEFT; upgrade with "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS}'")


def _peft_prefix_config(model):
    from peft import PeftModel
    from peft.utils import PeftType

    if not isinstance(model, PeftModel):
        raise TypeError(f"patch expects a peft.PeftModel with a prefix-tuning adapter, got {type(model).__name__}")
    config = model.active_peft_config
    if config.peft_type != PeftType.PREFIX_TUNING:
        raise ValueError(f"patch serves PEFT prefix tuning (and P-Tuning v2); the active adapter is {config.peft_type}")
    return config


def _model_type(model) -> str:
    return getattr(model.get_base_model().config, "model_type", "")


def _attn_configs(base_model):
    """Every config object attention modules read ``_attn_implementation`` from."""
    seen, out = set(), []
    for module in base_model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "_attn_implementation"):
            seen.add(id(config))
            out.append(config)
    return out


def _set_attn(base_model, name) -> dict:
    previous = {}
    for config in _attn_configs(base_model):
        previous[id(config)] = (config, config._attn_implementation)
        config._attn_implementation = name
    return previous


def _encoder_for(model, adapter: str, sizes) -> PrefixEncoder | None:
    """Our encoder sharing PEFT's parameters (None in inference mode: the embedding is the prefix)."""
    config = model.peft_config[adapter]
    peft_encoder = model.prompt_encoder[adapter]
    if config.inference_mode or not getattr(peft_encoder, "prefix_projection", False):
        return None
    num_layers, num_kv_heads, head_dim = sizes
    return PrefixEncoder.from_peft(peft_encoder, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)


def _prefix_kv(model, adapter: str, state: _PatchState, dtype) -> torch.Tensor:
    """[L, 2, Hkv, P, D] for one adapter, computed once for the whole batch."""
    if adapter not in state.encoders:       # an adapter loaded after patch()
        _wrap_encoders(model, state)
    encoder = state.encoders[adapter]
    if encoder is not None:
        encoder.train(model.training)
        return encoder(dtype)
    weight = model.prompt_encoder[adapter].embedding.weight     # [P, 2*L*Hkv*D]: the prefix itself
    return fused_prefix_mlp(weight, num_layers=state.num_layers, num_kv_heads=state.num_kv_heads,
                            head_dim=state.head_dim, out_dtype=dtype)


def _bart_layer_map(num_layers: int, num_decoder_layers: int) -> tuple[int | None, ...]:
    """Which prefix layer each BART decoder layer reads under stock PEFT. PEFT doubles its
    ``[P, 2*L*H*D]`` rows into ``4L`` (key, value) rows, splits them in L groups of 4 as
    (self key, self value, cross key, cross value) and then empties the cross-attention cache: so
    decoder layer l's self-attention reads rows 4l and 4l + 1 modulo 2L, i.e. prefix layer
    2l mod L, and the cross-attention and the encoder read no prefix at all."""
    return tuple((2 * layer) % num_layers if layer < num_layers else None for layer in range(num_decoder_layers))


def _patched_generate(self, *args, **kwargs):
    """``generate()`` with the prefix computed once for the call. PEFT's
    ``prepare_inputs_for_generation`` asks for the prompt whenever it sees no cache in
    ``past_key_values``: under transformers 5.2x, which passes generate()'s cache as ``cache=``,
    that is every decoding step, and each token would rerun the prefix MLP. Within one call
    nothing can change the adapters' parameters, so the first prefix serves every step; the
    next call computes its own."""
    state: _PatchState = self._prefixkern
    base = self.get_base_model()
    _check_assisted_generation(kwargs, base)
    outermost = state.generating == 0
    if outermost and not state.encoder_decoder:
        state.generation_length = _generation_length(args, kwargs, base)
    static = outermost and _cache_request(kwargs, base) in STATIC_CACHE_REQUESTS \
        and _static_cache_refusal(self, state) is None
    if static:
        kwargs = _with_cache_request(kwargs, base, None)
        sizes = (base.config.get_text_config(decoder=True).num_hidden_layers, state.generation_length,
                 self.peft_config[self.active_adapter].num_virtual_tokens)
        kept = state.kept_static_cache
        if kept is not None and (len(kept.layers), kept.capacity, kept.prefix_length) == sizes:
            kept.restart()          # as transformers keeps its own StaticCache between calls
        else:
            state.kept_static_cache = kept = PrefixKVStaticCache(*sizes)
        state.static_cache = kept
        kwargs[_cache_argument(type(base)) or "past_key_values"] = state.static_cache
        self.prepare_inputs_for_generation = functools.partial(_static_prepare_inputs, state,
                                                               type(self).prepare_inputs_for_generation.__get__(self))
        base_prepare = self.base_model_prepare_inputs_for_generation
        self.base_model_prepare_inputs_for_generation = functools.partial(_one_padding_mask, base_prepare)
        if hasattr(type(base), "get_compiled_call"):
            base.get_compiled_call = functools.partial(_compiled_or_eager,
                                                       type(base).get_compiled_call.__get__(base), base)
    else:
        kwargs = _with_cache_request(kwargs, base, "dynamic")
    state.generating += 1
    try:
        return self._prefixkern_generate(*args, **kwargs)
    finally:
        state.generating -= 1
        if not state.generating:
            state.generation_prefix = None
            state.generation_length = None
            state.static_cache = None
            self.__dict__.pop("prepare_inputs_for_generation", None)
            base.__dict__.pop("get_compiled_call", None)
            if static:
                self.base_model_prepare_inputs_for_generation = base_prepare
            _drop_self_bound_method(base, "prepare_inputs_for_generation")


# generate() requests for a cache of fixed size that the patched model serves with its own
# PrefixKVStaticCache (decoding compiled by transformers, CUDA graphs on a GPU); other static
# kinds ("offloaded_static", ...) get the dynamic cache.
STATIC_CACHE_REQUESTS = ("static",)


def _static_cache_refusal(peft_model, state: _PatchState) -> str | None:
    """Why a static cache request gets the dynamic cache instead (None: it is served). A static
    cache's compiled steps attend over the whole fixed-size buffer, its unwritten slots masked:
    right for causal attention (and BLOOM's ALiBi, whose positions come from the mask), not for
    an encoder-decoder's caches, and it needs the call's final length. A sliding window is placed
    from the buffer's end there, which is right only while the window cannot bite: when the prefix
    and the call's final length fit in every layer's window."""
    base = peft_model.get_base_model()
    if state.encoder_decoder or state.encoder_only:
        return "an encoder-decoder or encoder-only model"
    if state.generation_length is None:
        return "the call's final length is unknown (no max_new_tokens or max_length)"
    config = base.config.get_text_config(decoder=True)
    windows = [getattr(module, "sliding_window", None) for module in base.modules()]
    if getattr(config, "use_sliding_window", True) is not False:
        windows.append(getattr(config, "sliding_window", None))
    windows = [window for window in windows if isinstance(window, int) and window > 0]
    span = peft_model.peft_config[peft_model.active_adapter].num_virtual_tokens + state.generation_length
    if windows and min(windows) < span:
        return (f"a sliding window ({min(windows)} tokens) shorter than the prefix and the call's final length "
                f"({span} tokens)")
    return None


def _compiled_or_eager(get_compiled_call, model, *args, **kwargs):
    """transformers' ``get_compiled_call`` under a static cache request: the compiled forward, but
    one whose compilation fails (tracing or the backend, before anything ran) warns once and
    decodes eagerly over the same cache (its eager steps read the written part), rather than
    failing the generate() call."""
    compiled = get_compiled_call(*args, **kwargs)
    failed = []

    def forward(*call_args, **call_kwargs):
        if not failed:
            try:
                return compiled(*call_args, **call_kwargs)
            except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported) as exc:
                failed.append(exc)
                warnings.warn(f"prefixkern: compiling the static cache's decoding steps failed ({type(exc).__name__}: "
                              f"{str(exc)[:300]}); this generate() call decodes eagerly", RuntimeWarning, stacklevel=2)
        return model(*call_args, **call_kwargs)

    return forward


def _one_padding_mask(prepare, *args, **kwargs):
    """The base model's ``prepare_inputs_for_generation`` under a static cache request, with one
    2-D padding mask. For a compileable cache transformers builds the masks ahead, one per kind of
    layer where a model mixes sliding and full ones (Gemma 2); PEFT takes one mask only and raises
    on two. The patched attention reads the 2-D padding mask whatever the layer's kind (it applies
    windows itself), so the mask given is the one handed on."""
    model_kwargs = prepare(*args, **kwargs)
    if isinstance(model_kwargs.get("attention_mask"), dict):
        model_kwargs["attention_mask"] = kwargs.get("attention_mask")    # (None where generate() gave none)
    return model_kwargs


def _static_prepare_inputs(state: _PatchState, prepare, *args, **kwargs):
    """PEFT's ``prepare_inputs_for_generation`` under a static cache request: then the host-side
    length the next forward's eager layers read (the tokens it writes), and the padding mask
    padded with zeros to its fixed size ``[prefix ; max_cache_len]``, so a compiled step sees the
    same shapes at every token (its unwritten slots masked)."""
    model_kwargs = prepare(*args, **kwargs)
    cache: PrefixKVStaticCache = state.static_cache
    tokens = model_kwargs.get("input_ids")
    if tokens is None:
        tokens = model_kwargs.get("inputs_embeds")
    cache.advance(tokens.shape[1])
    mask = model_kwargs.get("attention_mask")
    size = cache.prefix_length + cache.capacity
    if mask is None:
        # No padding given (transformers may drop an all-ones mask): the written slots are the real
        # keys, and the compiled steps need the rest masked all the same.
        written = cache.prefix_length + cache.layers[0].length
        mask = (torch.arange(size, device=tokens.device) < written).expand(tokens.shape[0], size)
        model_kwargs["attention_mask"] = mask
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] < size:
        model_kwargs["attention_mask"] = F.pad(mask, (0, size - mask.shape[1]))
    return model_kwargs


def _generation_length(args: tuple, kwargs: dict, base_model) -> int | None:
    """The sequence length a generate() call ends with at most (prompt + max_new_tokens, else
    max_length), as transformers reads its arguments and generation config; None when the prompt
    is not ``input_ids``/``inputs_embeds`` or no limit is set. Only a capacity hint for the cache
    (:class:`PrefixKVLayer`): a wrong value costs a reallocation or spare memory, not results."""
    prompt = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
    if prompt is None and isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
        prompt = kwargs["inputs_embeds"][..., 0]
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
        return None
    config = kwargs.get("generation_config") or getattr(base_model, "generation_config", None)
    max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if isinstance(max_new, int):
        return prompt.shape[1] + max_new
    max_length = kwargs.get("max_length", getattr(config, "max_length", None))
    return max_length if isinstance(max_length, int) else None


# Assisted generation (a draft model, prompt lookup, early exit) verifies several candidate tokens
# per step and crops the cache back. Before transformers 5.24 its positions come out P tokens off
# the prefix-length cache PEFT's lengths require (stock PEFT fails there too); from 5.24 the tokens
# equal greedy decoding's (tested).
ASSISTED_GENERATION_MIN_TRANSFORMERS = "5.24.0"
_ASSISTED_GENERATION_ARGS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")


def _check_assisted_generation(kwargs: dict, base_model, installed: str | None = None) -> None:
    config = kwargs.get("generation_config") or getattr(base_model, "generation_config", None)
    asked = [name for name in _ASSISTED_GENERATION_ARGS
             if kwargs.get(name) is not None or getattr(config, name, None) is not None]
    if not asked:
        return
    installed = _transformers_below(ASSISTED_GENERATION_MIN_TRANSFORMERS, installed)
    if installed is not None:
        raise ValueError(
            f"generate() with {', '.join(asked)} (assisted generation) on a prefix-tuned model needs transformers>="
            f"{ASSISTED_GENERATION_MIN_TRANSFORMERS}, found {installed}: before it, the candidate tokens' positions "
            "come out P tokens off the cache that holds the prefix's length (stock PEFT fails there too)")


def _cache_request(kwargs: dict, base_model) -> str | None:
    """The ``cache_implementation`` a generate() call asks for: given directly, in a
    ``generation_config``, or by the model's own generation config (Gemma 2 checkpoints ship
    "hybrid")."""
    if "cache_implementation" in kwargs:
        return kwargs["cache_implementation"]
    config = kwargs.get("generation_config")
    if config is None:
        config = getattr(base_model, "generation_config", None)
    return getattr(config, "cache_implementation", None)


def _with_cache_request(kwargs: dict, base_model, implementation: str | None) -> dict:
    """generate()'s keyword arguments with a static cache request (``cache_implementation`` of
    ``"static"``, ``"hybrid"``, ...) replaced by ``implementation``: "dynamic", or None where the
    call hands generate() the patched model's own static cache (transformers refuses a cache
    together with a request). The patched model keeps the sequence in its own cache whatever was
    asked (the prefix sits beside it, never in it), so the tokens are the same; but a static cache
    that generate() built first reaches PEFT's ``prepare_inputs_for_generation``, which raises: on
    transformers 5.21-5.23 it reads a ``max_cache_len`` StaticCache no longer has, and Gemma 2
    asked for "static" hands it two masks. The caller's GenerationConfig is copied, not changed."""
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS

    if _cache_request(kwargs, base_model) not in ALL_STATIC_CACHE_IMPLEMENTATIONS:
        return kwargs
    config = kwargs.get("generation_config")
    if "cache_implementation" in kwargs or config is None:
        return {**kwargs, "cache_implementation": implementation}
    config = copy.deepcopy(config)
    config.cache_implementation = implementation
    return {**kwargs, "generation_config": config}


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class) -> str | None:
    """The keyword ``model_class.forward`` takes a cache under: ``cache`` from transformers 5.24,
    ``past_key_values`` before it (None: neither). Per class, so a training step does not inspect
    signatures again."""
    parameters = inspect.signature(model_class.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in parameters), None)


def _task_cache_argument(peft_model) -> str | None:
    """The keyword a PEFT task model (sequence/token classification, QA) takes the prefix cache
    under: its own, else its backbone's, which it hands on through its keyword arguments (None:
    neither takes one)."""
    task_model = peft_model.base_model
    return _cache_argument(type(task_model)) or _cache_argument(
        type(task_model.get_submodule(peft_model.transformer_backbone_name)))


def _patched_prefix_tuning_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                                   output_attentions=None, output_hidden_states=None, return_dict=None, **kwargs):
    """PEFT's prefix-tuning forward of its sequence-classification, token-classification and
    question-answering models: the task model called with the prefix cache (the attention mask
    already holds the P prefix columns; ``labels`` or ``start_positions``/``end_positions`` come in
    ``kwargs``), under the name the task model takes it, else under its backbone's name through the
    keyword arguments the task model hands its backbone (``_task_cache_argument``).

    Stock PEFT 0.21 looks for ``past_key_values`` in the task model's signature, else calls the
    backbone itself and applies the head's layers: on transformers 5.24, which renamed the
    argument ``cache``, it raises "Model does not support past key values" for every model. The
    backbone call would also bypass the task model's forward, where the patch hands the attention
    layers their prefix (GPT-2's question-answering head takes no cache argument)."""
    name = self._prefixkern.task_cache_argument     # (looked up at patch time: torch.compile traces this)
    if name is None:
        raise ValueError(f"prefixkern.patch: neither {type(self.base_model).__name__} nor its backbone takes a "
                         "cache (past_key_values), which prefix tuning needs")
    batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
    kwargs[name] = self.get_prompt(batch_size)
    return self.base_model(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                           output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                           return_dict=return_dict, **kwargs)


def _drop_self_bound_method(obj, name: str) -> None:
    """Delete ``obj.<name>`` where it is only ``obj``'s own class method bound to ``obj``: the same
    behaviour, one reference cycle fewer. Stock PEFT's generate() leaves the base model's
    ``prepare_inputs_for_generation`` so, which kept the base model (and its GPU memory) alive
    after ``del model`` until Python's next cyclic collection."""
    bound = obj.__dict__.get(name)
    if (isinstance(bound, types.MethodType) and bound.__self__ is obj
            and bound.__func__ is getattr(type(obj), name, None)):
        del obj.__dict__[name]


def _prefix_dtype(model, state: _PatchState) -> torch.dtype:
    """The dtype the prefix is computed in: PEFT's (the base model's), except for a float32 model
    under autocast, where every layer's attention computes in the autocast dtype and would cast
    its prefix to it, two launches per layer forward and two backward: the MLP rounds its float32
    result to that dtype once instead (the same values, the same gradients; not where several
    layers read one prefix layer, BART's decoder, whose gradients would then add in 16 bits)."""
    weight = model.prompt_encoder[model.active_adapter].embedding.weight
    dtype = model.base_model_torch_dtype or weight.dtype
    device_type = weight.device.type
    if dtype == torch.float32 and state.layer_map is None and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return dtype


def _patched_get_prompt(self, batch_size: int, task_ids=None, max_cache_len=None):
    state: _PatchState = self._prefixkern
    dtype = _prefix_dtype(self, state)
    # Inside generate() (see _patched_generate), in eval mode with gradients off: the call's first
    # prefix, unless the adapters or the dtype asked for differ.
    reuse = state.generating > 0 and not self.training and not torch.is_grad_enabled()
    key = (state.rows or self.active_adapter, dtype, torch.is_inference_mode_enabled()) if reuse else None
    if reuse and state.generation_prefix is not None and state.generation_prefix[0] == key:
        prefix = state.generation_prefix[1]
    else:
        prefix = _prefix_state(self, state, batch_size, dtype)
        state.generation_prefix = (key, prefix) if reuse else None
    record = not (torch.is_grad_enabled() and self.training)
    if reuse and state.static_cache is not None:
        # generate() asked for a static cache: this call's own, its prefix set at the prefill.
        state.static_cache.prefix = prefix
        return state.static_cache
    if state.encoder_decoder:
        from transformers import DynamicCache, EncoderDecoderCache

        return EncoderDecoderCache(PrefixKVCache(prefix, record=record), DynamicCache())
    return PrefixKVCache(prefix, record=record, capacity_hint=state.generation_length if reuse else None)


def _prefix_state(model, state: _PatchState, batch_size: int, dtype) -> PrefixState:
    """Every layer's prefix for this batch: the active adapter's, or one per row (prefix_per_row)."""
    if state.rows is None:
        return PrefixState(_prefix_kv(model, model.active_adapter, state, dtype), layer_map=state.layer_map,
                           bidirectional=state.encoder_only)
    names = list(dict.fromkeys(state.rows))
    rows = state.rows
    if state.generating and batch_size % len(rows) == 0:
        # generate() repeats each row in place for beams and return sequences (repeat_interleave).
        rows = tuple(name for name in rows for _ in range(batch_size // len(rows)))
    # A packed batch is one row holding several sequences: it may name one prefix per sequence
    # (checked against cu_seq_lens in the attention).
    if len(rows) != batch_size and batch_size != 1:
        raise ValueError(f"prefix_per_row names {len(rows)} rows but the batch has {batch_size}")
    lengths = {model.peft_config[n].num_virtual_tokens for n in names}
    if len(lengths) != 1:
        raise ValueError(f"prefix_per_row needs adapters of one prefix length, got {sorted(lengths)}")
    kv = torch.stack([_prefix_kv(model, n, state, dtype) for n in names])
    index = torch.tensor([names.index(n) for n in rows], dtype=torch.int64, device=kv.device)
    return PrefixState(kv, index, layer_map=state.layer_map, bidirectional=state.encoder_only)


def _prefix_of(cache) -> PrefixState | None:
    """The prefix a cache carries: ours, or an encoder-decoder cache whose self-attention part is ours."""
    if isinstance(cache, PREFIX_CACHES):
        return cache.prefix
    inner = getattr(cache, "self_attention_cache", None)
    return inner.prefix if isinstance(inner, PREFIX_CACHES) else None


def _inject_prefix(module, args, kwargs, *, takes_cache: bool = False):
    """Forward pre-hook of the base model: hand the prefix to the attention layers (``**kwargs``)
    and make sure the cache the model records into is ours. ``takes_cache``: the model's forward
    names its cache argument ``cache`` (bound at patch time: torch.compile traces this hook)."""
    cache, legacy = kwargs.get("cache"), kwargs.get("past_key_values")
    cache_prefix, legacy_prefix = _prefix_of(cache), _prefix_of(legacy)
    if legacy_prefix is not None and cache is not None and cache_prefix is None:
        # transformers >= 5.2x passes generate()'s empty cache as `cache=` and would ignore the
        # one PEFT put in `past_key_values=` (stock PEFT then drops its prefix in generate()).
        if kwargs.get("use_cache") is False or cache.get_seq_length() == 0:
            kwargs["cache"] = kwargs.pop("past_key_values")
            cache, cache_prefix = kwargs["cache"], legacy_prefix
    elif legacy_prefix is not None and cache_prefix is not None:
        if kwargs.get("use_cache") is False:
            # generate(use_cache=False) hands back the previous step's cache while PEFT injects a
            # fresh prefix and the whole sequence is recomputed: the history must not be reused.
            kwargs["cache"] = kwargs.pop("past_key_values")
            cache_prefix = legacy_prefix
        else:
            kwargs.pop("past_key_values")       # PEFT re-injected a fresh prefix; ours has the history
    if takes_cache and legacy is not None and kwargs.get("cache") is None and "past_key_values" in kwargs:
        # transformers 5.24 renamed the argument `cache`: the old name, which stock PEFT 0.21 passes
        # the prefix under, warns on every call and goes in 5.40. Handed on under the new name.
        kwargs["cache"] = kwargs.pop("past_key_values")
    prefix = cache_prefix if cache_prefix is not None else legacy_prefix
    if prefix is None:
        return args, kwargs
    if kwargs.get("cu_seq_lens_q") is not None and module.config.model_type not in PACKED_MODEL_TYPES:
        raise ValueError(
            f"prefixkern serves packed sequences (cu_seq_lens_q) for {', '.join(PACKED_MODEL_TYPES)}, whose rotary "
            f"positions make a sequence's attention independent of where it sits in the row; model_type="
            f"{module.config.model_type!r} would see wrong positions (PEFT drops position_ids). Pad the batch instead.")
    kwargs[KWARG] = prefix
    if kwargs.get("use_cache") is False:
        # No cache wanted: record nothing, so the reported length stays P and PEFT's generate()
        # (which trims input_ids to the last token once the cache is longer) recomputes every step.
        used = kwargs.get("cache", kwargs.get("past_key_values"))
        own = getattr(used, "self_attention_cache", used)
        if isinstance(own, PREFIX_CACHES):
            own.record = False
    return args, kwargs


def is_patched(model) -> bool:
    return getattr(model, "_prefixkern", None) is not None


def patch(model):
    """Serve a PEFT prefix-tuning model through prefixkern's kernels; returns the model.

    ``model`` is a ``peft.PeftModel`` whose active adapter is prefix tuning (``prefix_projection``
    on: the fused MLP runs once per step on P rows; off, or an ``inference_mode`` adapter: the
    embedding is the prefix, used as a view). Results equal stock PEFT's with
    ``attn_implementation="eager"`` within dtype tolerance; training, ``generate()``,
    gradient checkpointing and ``torch.compile`` work. ``unpatch(model)`` undoes it.

    Supported families: Llama, Qwen2, Qwen3, Qwen3-MoE, Qwen2-MoE, OLMo, OLMo 2, Phi, Phi-3,
    Granite, SmolLM3, Gemma, Mixtral, StarCoder2, GPT-NeoX, Mistral (sliding window), Gemma 2
    (soft-capping, hybrid sliding window), Gemma 3 (text) and Cohere 2 (hybrid sliding window),
    GLM-4, GPT-2 (attention dropout), OPT, GPT-BigCode (multi-query), BioGPT, Persimmon, OLMoE,
    GraniteMoE, PhiMoE, EXAONE 4, ERNIE 4.5, Seed-OSS, Arcee, Apertus and BitNet through
    transformers' attention interface,
    and BLOOM (ALiBi) through a BLOOM attention forward; BART (seq2seq) as stock PEFT serves it: only
    the decoder self-attention reads a prefix (see ``_bart_layer_map``); the encoders BERT, RoBERTa,
    XLM-RoBERTa, ELECTRA, CamemBERT, ERNIE, Data2Vec-text, RoBERTa-PreLayerNorm and XLM-RoBERTa-XL,
    whose bidirectional self-attention reads it in every layer. Other models are refused.

    CUDA tensors run the Triton kernels; CPU tensors run the reference (or the kernels in Triton's
    interpreter with ``PREFIXKERN_BACKEND=triton TRITON_INTERPRET=1``).

    Task types: causal LM, seq2seq (BART), sequence classification, token classification,
    question answering and feature extraction.

    GPT-2: like stock PEFT, real tokens sit at positions P..P+T-1, so P + T must stay within
    ``n_positions`` (1024).
    """
    _check_transformers_version()
    config = _peft_prefix_config(model)
    if is_patched(model):
        return model
    model_type = _model_type(model)
    if model_type in REFUSED_MODEL_TYPES:
        raise ValueError(f"prefixkern.patch cannot serve model_type={model_type!r}: {REFUSED_MODEL_TYPES[model_type]}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"prefixkern.patch does not know model_type={model_type!r} (supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}); refusing rather than risking wrong results")
    encoder_decoder = config.num_transformer_submodules == 2
    if encoder_decoder and model_type not in ENCODER_DECODER_TYPES:
        raise ValueError(f"prefixkern.patch serves encoder-decoder prefix tuning for {ENCODER_DECODER_TYPES} only, "
                         f"got model_type={model_type!r} with num_transformer_submodules=2")
    head_dim = config.token_dim // config.num_attention_heads
    if head_dim > KERNEL_MAX_HEAD_DIM:
        raise ValueError(f"prefixkern.patch cannot serve a head dim of {head_dim}: the Triton attention kernels take "
                         f"up to {KERNEL_MAX_HEAD_DIM} (a tile holds a whole head)")
    _register()
    base_model = model.get_base_model()
    previous = _set_attn(base_model, ATTN_NAME)
    hook = base_model.register_forward_pre_hook(
        functools.partial(_inject_prefix, takes_cache=_cache_argument(type(base_model)) == "cache"), with_kwargs=True)
    model._prefixkern = _PatchState(previous, hook, config.num_layers, config.num_attention_heads, head_dim)
    if model_type == "bloom":
        model._prefixkern.patched_modules = _patch_bloom(base_model)
    model._prefixkern.encoder_only = model_type in ENCODER_ONLY_TYPES
    if encoder_decoder:
        decoder_layers = getattr(base_model.config, "decoder_layers", config.num_layers)
        model._prefixkern.encoder_decoder = True
        model._prefixkern.layer_map = _bart_layer_map(config.num_layers, decoder_layers)
    # Build the encoders now, outside any compiled region (constructing modules in forward is a
    # graph break for torch.compile); adapters loaded later are wrapped on first use.
    _wrap_encoders(model, model._prefixkern)
    _override_method(model, "get_prompt", _patched_get_prompt)
    _override_method(model, "generate", _patched_generate)
    if hasattr(type(model), "_prefix_tuning_forward"):     # sequence / token classification, QA
        model._prefixkern.task_cache_argument = _task_cache_argument(model)
        _override_method(model, "_prefix_tuning_forward", _patched_prefix_tuning_forward)
    return model


def _wrap_encoders(model, state: _PatchState) -> None:
    from peft.utils import PeftType

    sizes = (state.num_layers, state.num_kv_heads, state.head_dim)
    for adapter, config in model.peft_config.items():
        if config.peft_type == PeftType.PREFIX_TUNING and adapter not in state.encoders:
            state.encoders[adapter] = _encoder_for(model, adapter, sizes)


def unpatch(model):
    """Undo :func:`patch`; returns the model."""
    state: _PatchState | None = getattr(model, "_prefixkern", None)
    if state is None:
        return model
    for config, name in state.previous_attn.values():
        config._attn_implementation = name
    state.hook.remove()
    for module in state.patched_modules:
        _restore_method(module, "forward")
    _restore_method(model, "get_prompt")
    _restore_method(model, "generate")
    if "_prefixkern__prefix_tuning_forward" in model.__dict__:
        _restore_method(model, "_prefix_tuning_forward")
    model._prefixkern = None
    return model


@contextlib.contextmanager
def prefix_per_row(model, adapter_names: Sequence[str]) -> Iterator[None]:
    """Serve a batch whose rows belong to different trained prefixes in one forward (training or
    ``generate()``): row b reads adapter ``adapter_names[b]``. All adapters must have been loaded
    into ``model`` (``load_adapter``) and share the prefix length. Each distinct prefix is
    computed once; the kernel reads the right one per row (``prefix_index``). In ``generate()``
    the beams and return sequences of row b read row b's adapter. A packed batch
    (``DataCollatorWithFlattening``) names one adapter per packed sequence. Where PEFT keeps a task
    head per adapter (``modules_to_save``: sequence classification, say), each row runs its own
    adapter's head as well."""
    if not is_patched(model):
        raise ValueError("prefix_per_row needs a patched model: call prefixkern.patch(model) first")
    if isinstance(adapter_names, str):
        raise TypeError(f"adapter_names must be a sequence of adapter names, one per row, got the str "
                        f"{adapter_names!r} (for one row: [{adapter_names!r}])")
    unknown = [n for n in adapter_names if n not in model.peft_config]
    if unknown:
        raise ValueError(f"adapter_names holds adapters the model does not have: {sorted(set(unknown))}")
    state: _PatchState = model._prefixkern
    heads = _per_adapter_modules(model, set(adapter_names))
    for name, head in heads:
        missing = sorted(set(adapter_names) - set(head.modules_to_save))
        if missing:
            raise ValueError(f"prefix_per_row: {name} has no copy for adapters {missing} (PEFT's modules_to_save)")
    _wrap_encoders(model, state)
    previous, state.rows = state.rows, tuple(adapter_names)
    for _, head in heads:
        head._forward_wrapped = functools.partial(_per_row_head_forward, head, state.rows)
    try:
        yield
    finally:
        state.rows = previous
        for _, head in heads:
            del head._forward_wrapped


def _per_adapter_modules(model, adapters: set) -> list[tuple[str, object]]:
    """``(name, wrapper)`` of the modules PEFT keeps a copy of per adapter (``modules_to_save``: the
    classifier of a sequence-classification model, say), when more than one of ``adapters`` is asked."""
    from peft.utils import ModulesToSaveWrapper

    if len(adapters) < 2:
        return []
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ModulesToSaveWrapper)]


def _per_row_head_forward(head, rows: tuple[str, ...], x, *args, **kwargs):
    """A per-adapter head (PEFT's ``ModulesToSaveWrapper``) under ``prefix_per_row``: each row through
    its own adapter's copy (PEFT's own mixed batches take Linear, Embedding and Conv heads only)."""
    if x.shape[0] != len(rows):
        raise ValueError(f"prefix_per_row names {len(rows)} rows but {type(head.original_module).__name__} got "
                         f"{x.shape[0]}: per-adapter heads need one adapter per batch row")
    out = None
    for adapter in dict.fromkeys(rows):
        index = torch.tensor([b for b, name in enumerate(rows) if name == adapter], device=x.device)
        part = head.modules_to_save[adapter](x.index_select(0, index), *args, **kwargs)
        if out is None:   # every row is written by exactly one adapter's part
            out = part.new_empty((x.shape[0], *part.shape[1:]))
        out = out.index_copy(0, index, part)
    return out


# --------------------------------------------------------------------------------------------
# Resumable checkpoints
# --------------------------------------------------------------------------------------------

def _prefix_adapter(model, adapter_name: str | None) -> str:
    """``adapter_name`` (default: the active adapter), checked to be one of the model's
    prompt-learning adapters."""
    adapter = adapter_name or model.active_adapter
    encoders = getattr(model, "prompt_encoder", None) or {}
    if adapter not in encoders:
        raise ValueError(f"adapter_name={adapter!r} is not one of the model's prefix adapters "
                         f"({', '.join(sorted(encoders)) or 'none'})")
    return adapter


def save_resumable(model, path, adapter_name: str | None = None) -> None:
    """Save the adapter's trainable prefix parameters (embedding and MLP), which PEFT's own adapter
    file drops when ``prefix_projection=True`` (it bakes the MLP's output), so training can resume."""
    from safetensors.torch import save_file

    adapter = _prefix_adapter(model, adapter_name)
    state = {name: t.detach().contiguous().cpu() for name, t in model.prompt_encoder[adapter].state_dict().items()}
    save_file(state, str(path), metadata={"format": "prefixkern-prefix-encoder", "adapter": adapter})


def load_resumable(model, path, adapter_name: str | None = None) -> None:
    """Load what :func:`save_resumable` wrote into the adapter's prompt encoder."""
    from safetensors.torch import load_file

    adapter = _prefix_adapter(model, adapter_name)
    state = load_file(str(path))
    missing, unexpected = model.prompt_encoder[adapter].load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the adapter's encoder: missing {missing}, unexpected {unexpected}")
    state_obj = getattr(model, "_prefixkern", None)
    if state_obj is not None:
        state_obj.encoders.pop(adapter, None)

