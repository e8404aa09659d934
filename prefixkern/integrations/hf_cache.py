"""The caches of a patched PEFT model: every layer's prefix (:class:`PrefixState`) kept beside the
sequence's keys and values, never in them. :class:`PrefixKVCache` (dynamic, appended in place by
:class:`PrefixKVLayer`) serves training and ``generate()``; :class:`PrefixKVStaticCache`
(fixed-size buffers) serves ``generate(cache_implementation="static")``, whose decoding steps
transformers compiles. Both report PEFT's lengths (the prefix counted), so positions are stock
PEFT's. Used by :mod:`prefixkern.integrations.hf`."""
from __future__ import annotations

import dataclasses

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

__all__ = ["PrefixState", "PrefixKVLayer", "PrefixKVCache", "PrefixKVStaticLayer", "PrefixKVStaticCache"]


@dataclasses.dataclass
class PrefixState:
    """Every layer's prefix: ``kv`` ``[L, 2, Hkv, P, D]`` shared by the batch, or ``[T, L, 2, Hkv, P, D]``
    for T prefixes with ``index`` ``[B]`` naming the one each row reads."""
    kv: torch.Tensor
    index: torch.Tensor | None = None
    # Which of the L prefix layers model layer i reads (None: that layer gets no prefix). Identity
    # for decoder-only models; BART's decoder reads PEFT's rows in another order (see _bart_layer_map).
    layer_map: tuple[int | None, ...] | None = None
    # An encoder-only model's: its bidirectional self-attention reads the prefix (ENCODER_ONLY_TYPES).
    bidirectional: bool = False

    def __post_init__(self):
        # The 2L per-layer keys and values, split once (see _split). A plain attribute, not a
        # field: code that rebuilds the dataclass from its fields (FSDP2 swaps the tensors of a
        # forward's arguments through dataclasses.replace) gets a split of the new kv.
        self._layers = self._split(self.kv, self.index is not None)

    @staticmethod
    def _split(kv: torch.Tensor, per_task: bool) -> tuple[torch.Tensor, ...]:
        """Every layer's keys and values as views ``[Hkv, P, D]`` (per task: ``[T, Hkv, P, D]``),
        ordered (layer 0 keys, layer 0 values, layer 1 keys, ...). One ``unbind`` gives autograd
        one node whose backward stacks the 2L gradients in a single kernel; indexing each layer
        out of ``kv`` instead costs two select-backwards per tensor (a zero-filled copy of the
        whole prefix each), then 4L - 1 additions, in every training step."""
        if per_task:
            kv = kv.movedim(0, 2)          # [L, 2, T, Hkv, P, D], still a view
        return kv.flatten(0, 1).unbind(0)

    @property
    def length(self) -> int:
        return self.kv.shape[-2]

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.layer_map is not None:
            if layer_idx >= len(self.layer_map) or self.layer_map[layer_idx] is None:
                return None
            layer_idx = self.layer_map[layer_idx]
        return self._layers[2 * layer_idx], self._layers[2 * layer_idx + 1]

    def layer_on(self, layer_idx: int, device: torch.device):
        """``(layer(layer_idx), index)`` on ``device``. A model split over GPUs (``device_map="auto"``)
        runs each layer where its weights are, while the prefix is computed where the encoder is:
        copy it over (differentiably) rather than fail the op's same-device check. No copy when
        the devices agree."""
        kv, index = self.layer(layer_idx), self.index
        if kv is not None and kv[0].device != device:
            kv = kv[0].to(device), kv[1].to(device)
        if index is not None and index.device != device:
            index = index.to(device)
        return kv, index


def _has_head_of(view: torch.Tensor, buffer: torch.Tensor | None) -> bool:
    """Whether ``view`` is ``buffer[:, :, :n]`` for some n: the same memory, strides, rows, heads
    and head dim (what an append, a crop or nothing at all leaves; an index_select does not)."""
    return (buffer is not None and view.dim() == 4 and view.data_ptr() == buffer.data_ptr()
            and view.stride() == buffer.stride() and view.dtype == buffer.dtype and view.device == buffer.device
            and view.shape[:2] == buffer.shape[:2] and view.shape[3] == buffer.shape[3]
            and view.shape[2] <= buffer.shape[2])


class PrefixKVLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values are views ``buffer[:, :, :n]`` of buffers with room
    to grow, so that a decoding step writes its new keys in place.

    ``DynamicLayer`` appends by ``torch.cat``: every generated token copies the layer's whole cache
    (read and write, K and V), three times the bytes the step's attention reads. Here a step writes
    its own tokens only. A buffer is sized for ``capacity_hint`` (the call's final length, when
    generate() was told it), at most 25% (256 tokens at least) past what it holds; without a hint
    the first fill takes no spare room and a full buffer is reallocated with 25% to spare. Crops
    leave views of the buffer (the next append overwrites in place); an index_select (beam
    reordering, batch selection) leaves a compact tensor, which the next append moves into a new
    buffer. With gradients enabled, or while torch.compile traces, it appends by
    ``torch.cat`` as ``DynamicLayer`` does (autograd would see the writes into the buffer as
    in-place mutations of tensors it saved; generate() decodes without gradients)."""

    def __init__(self, capacity_hint: int | None = None):
        super().__init__()
        self.capacity_hint = capacity_hint
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        # The views the last append left in self.keys / self.values: while they are still there
        # (nothing cropped, reordered or replaced them), they are heads of the buffers by
        # construction, and a decoding step skips the check of their memory and layout.
        self._key_view: torch.Tensor | None = None
        self._value_view: torch.Tensor | None = None

    def _capacity(self, needed: int, length: int) -> int:
        """Tokens a new buffer holds: room for the call's final length (``capacity_hint``) where it
        is known, else none at the first fill (a one-shot forward keeps what DynamicCache keeps)
        and 25% (256 tokens at least) once appends come."""
        grown = needed + max(needed // 4, 256)
        hint = self.capacity_hint
        if hint is not None and hint >= needed:
            return min(grown, hint)
        return needed if length == 0 else grown

    def update(self, key_states, value_states, *args, **kwargs):
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or key_states.dim() != 4:
            self._key_buffer = self._value_buffer = self._key_view = self._value_view = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = self.keys, self.values
        length = keys.shape[2] if keys.dim() == 4 else 0         # (lazy_initialization leaves a 1-d empty tensor)
        needed = length + key_states.shape[2]
        batch, heads, _, head_dim = key_states.shape
        key_buffer = self._key_buffer
        fits = (key_buffer is not None and needed <= key_buffer.shape[2]
                and (length == 0 or (keys is self._key_view and values is self._value_view)
                     or (_has_head_of(keys, key_buffer) and _has_head_of(values, self._value_buffer)))
                and key_buffer.shape[:2] == (batch, heads) and key_buffer.dtype == key_states.dtype
                and key_buffer.device == key_states.device
                and self._value_buffer.shape[3] == value_states.shape[3]
                # (a buffer made under inference_mode cannot be written outside it: a new one then)
                and (not key_buffer.is_inference() or torch.is_inference_mode_enabled()))
        if not fits:
            capacity = self._capacity(needed, length)
            key_buffer = key_states.new_empty(batch, heads, capacity, head_dim)
            value_buffer = value_states.new_empty(batch, heads, capacity, value_states.shape[3])
            if length:
                key_buffer[:, :, :length].copy_(keys)
                value_buffer[:, :, :length].copy_(values)
            self._key_buffer, self._value_buffer = key_buffer, value_buffer
        # (narrow: the views slicing makes, at a fraction of the host time of tuple indexing)
        self._key_buffer.narrow(2, length, needed - length).copy_(key_states)
        self._value_buffer.narrow(2, length, needed - length).copy_(value_states)
        self.keys = self._key_view = self._key_buffer.narrow(2, 0, needed)
        self.values = self._value_view = self._value_buffer.narrow(2, 0, needed)
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = self._key_view = self._value_view = None
        super().reset()


class _PrefixBeside:
    """What both prefix caches share: the row index of ``prefix_per_row`` follows the batch through
    beam reordering (and, in the dynamic cache, batch repeats and selections)."""

    prefix: PrefixState | None

    def _index_op(self, fn):
        if self.prefix is not None and self.prefix.index is not None:
            self.prefix = dataclasses.replace(self.prefix, index=fn(self.prefix.index))

    def reorder_cache(self, beam_idx):
        super().reorder_cache(beam_idx)
        self._index_op(lambda idx: idx.index_select(0, beam_idx.to(idx.device)))


class PrefixKVCache(_PrefixBeside, DynamicCache):
    """A ``transformers.DynamicCache`` that keeps the prefix beside the sequence KV. Its lengths
    include the P prefix tokens, exactly like PEFT's cache, so HF computes the same positions.
    Every layer is a plain (non-sliding) layer: sliding windows are applied by the kernel, which
    knows where the prefix sits. Layers append in place (:class:`PrefixKVLayer`), within
    ``capacity_hint`` sequence tokens when the final length is known. ``record=False`` (training
    forwards) stores nothing, so a checkpointed layer's recomputation cannot append twice."""

    def __init__(self, prefix: PrefixState, record: bool = True, capacity_hint: int | None = None):
        super().__init__()
        self.layer_class_to_replicate = PrefixKVLayer
        self.prefix = prefix
        self.record = record
        self.capacity_hint = capacity_hint

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.record:
            return key_states, value_states
        while len(self.layers) <= layer_idx:
            self.layers.append(PrefixKVLayer(self.capacity_hint))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix.length + super().get_seq_length(layer_idx)

    def get_mask_sizes(self, *args, **kwargs):
        kv_length, kv_offset = super().get_mask_sizes(*args, **kwargs)
        return kv_length + self.prefix.length, kv_offset

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        self._index_op(lambda idx: idx.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self._index_op(lambda idx: idx[indices])


class PrefixKVStaticLayer(CacheLayerMixin):
    """A layer of :class:`PrefixKVStaticCache`: fixed buffers ``[B, Hkv, max_cache_len, D]`` (the
    sequence only), written in place at a device-side position counter, so a compiled decoding
    step has static shapes and addresses (CUDA graphs). Eager calls (the prefill) get the written
    part, ``buffer[:, :, :length]`` (``length`` kept on the host by the generate() loop); a traced
    call gets the whole buffers, their unwritten slots hidden by the fixed-size padding mask."""

    is_compileable = True
    is_sliding = False
    is_croppable = False

    def __init__(self, max_cache_len: int):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.length = 0                    # tokens written, on the host (advanced by the generate() loop)

    def lazy_initialization(self, key_states, value_states):
        batch, heads, _, head_dim = key_states.shape
        self.keys = key_states.new_zeros(batch, heads, self.max_cache_len, head_dim)
        self.values = value_states.new_zeros(batch, heads, self.max_cache_len, value_states.shape[3])
        self.written = torch.zeros((), dtype=torch.int64, device=key_states.device)
        if not torch.compiler.is_compiling():
            for tensor in (self.keys, self.values, self.written):
                torch._dynamo.mark_static_address(tensor)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized or self.keys.shape[:2] != key_states.shape[:2] \
                or self.keys.shape[3] != key_states.shape[3] or self.keys.dtype != key_states.dtype \
                or self.keys.device != key_states.device:
            # First use, or a kept cache (see restart) taking a call of another batch or dtype.
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[2]
        slots = torch.arange(new, device=self.written.device) + self.written
        self.written.add_(new)
        self.keys.index_copy_(2, slots, key_states)
        self.values.index_copy_(2, slots, value_states)
        if torch.compiler.is_compiling():
            return self.keys, self.values
        return self.keys[:, :, :self.length], self.values[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_max_cache_shape(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.written.zero_()
        self.length = 0

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        if self.is_initialized:        # in place: the compiled step holds these addresses
            index = beam_idx.to(self.keys.device)
            self.keys.copy_(self.keys.index_select(0, index))
            self.values.copy_(self.values.index_select(0, index))


class PrefixKVStaticCache(_PrefixBeside, Cache):
    """The static counterpart of :class:`PrefixKVCache`, for ``generate(cache_implementation=
    "static")``: the prefix beside fixed-size sequence buffers (:class:`PrefixKVStaticLayer`), so
    transformers compiles the decoding steps (CUDA graphs on a GPU) as it does for its own
    ``StaticCache``. Its length counts the prefix once anything is written (PEFT's positions), and
    0 before, so PEFT's generate() asks for the prompt at the prefill (the patched ``get_prompt``
    hands back this cache) rather than trimming a short prompt to its last token."""

    def __init__(self, num_layers: int, max_cache_len: int, prefix_length: int, prefix: PrefixState | None = None):
        super().__init__(layers=[PrefixKVStaticLayer(max_cache_len) for _ in range(num_layers)])
        self.prefix = prefix              # set at the prefill, by the patched get_prompt
        self.prefix_length = prefix_length
        self.record = True
        self.capacity = max_cache_len

    @property
    def max_cache_len(self) -> int:
        # (A read-only property of Cache before transformers 5.2x, absent from 5.21; PEFT reads it.)
        return self.capacity

    def get_seq_length(self, layer_idx: int = 0):
        layer = self.layers[layer_idx]
        if torch.compiler.is_compiling() and layer.is_initialized:
            # The device-side count: a host int read in a traced step would be a guard on its value,
            # a recompilation per token (transformers' own static layers return a tensor too).
            return layer.written + self.prefix_length
        return self.prefix_length + layer.length if layer.length else 0

    def get_mask_sizes(self, *args, **kwargs):
        return self.capacity + self.prefix_length, 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.record:
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def advance(self, new_tokens: int) -> None:
        """The next forward writes ``new_tokens`` tokens: the host-side length its eager layers read."""
        for layer in self.layers:
            layer.length += new_tokens

    def restart(self) -> None:
        """Empty for another generate() call, keeping the buffers: their addresses are the ones the
        compiled steps' CUDA graphs were recorded with (new buffers would be recorded again). The
        unwritten slots are never read unmasked, so the previous call's values stay in them."""
        self.prefix = None
        self.record = True
        for layer in self.layers:
            layer.length = 0
            if layer.is_initialized:
                layer.written.zero_()


# The caches a patched model's forward recognises as its own.
PREFIX_CACHES = (PrefixKVCache, PrefixKVStaticCache)
