"""Decode suite: the attention of one generation step (q_len 1) with a batch-shared prefix, against
SDPA on the concatenated cache (what HF holds under PEFT: the prefix sits in the cache already,
so the baseline pays no concatenation here), reported as time and KV bytes read per second (pass
``fwd``); the same step with its cache append, as generate() runs it (pass ``step``); and
``generate()`` end to end."""
from __future__ import annotations

import gc
import itertools
import warnings

import torch
import torch.nn.functional as F

from .. import reference
from .._backend import use_backend
from ..ops.decode_attention import (cuda_decode_supported, mma_stages, prefix_decode_attention, tensor_core_decoding,
                                    tensor_cores_by_default, triton_decode_everywhere)
from ..ops.prefix_attention import prefix_attention
from .common import (Options, Record, Skip, back_to_back_ms, dtype_name, other_flush_note, peak_mem_mb,
                     release_models, scaled_err, time_ms)

HQ, HKV, D = 32, 8, 128      # Llama-3-8B attention
PREFIXES = (30, 128)
CACHES = (512, 4096, 32768)
BATCHES = (1, 8, 64)
# --quick: the merge's two extremes besides the two points every run has timed (32k keys at batch 1:
# one split per SM, about 100 merged per row; batch 64: one split, no merge launch).
QUICK = [(30, 4096, 8), (128, 512, 1), (30, 32768, 1), (30, 512, 64)]
# One point at two other head layouts, in --quick runs too: Qwen2.5-0.5B's heads (14/2/64) and a
# head dim of 256 (8/4/256), where the seventh H200 run's rows of the other kernel made the
# tensor-core one the default (TENSOR_CORE_HEAD_DIMS); the CUDA-core rows keep that decision checked.
OTHER_HEADS = [("qwen-heads", 14, 2, 64, 30, 4096, 8), ("d256-heads", 8, 4, 256, 30, 4096, 8)]


def _cases(opts: Options):
    if not opts.on_gpu:
        return [("cpu-tiny", 4, 2, 32, 5, 40, 2)]
    grid = QUICK if opts.quick else list(itertools.product(PREFIXES, CACHES, BATCHES))
    return [(f"P{p}-L{cache}-B{batch}", HQ, HKV, D, p, cache, batch) for p, cache, batch in grid] + [
        (f"{layout}-P{p}-L{cache}-B{batch}", hq, hkv, d, p, cache, batch)
        for layout, hq, hkv, d, p, cache, batch in OTHER_HEADS]


CUDA_IMPLS = ("prefixkern", "prefixkern_tensor_cores", "prefixkern_cuda_cores", "prefixkern_one_stage",
              "prefixkern_two_stage", "prefixkern_prefix_gemm")
# The tensor-core kernel with its K/V stages forced (the default leaves them to the launcher's rule
# per call: plan_mma_decode in csrc/decode_common.cuh), timed beside the default.
FORCED_STAGES_ROWS = {"prefixkern_one_stage": 1, "prefixkern_two_stage": 2}
# The CUDA decode kernel the prefixkern row does not run, timed beside it (True: the tensor-core
# kernel, False: the CUDA-core one): the default depends on the head dim (tensor_cores_by_default).
OTHER_KERNEL_ROWS = {"prefixkern_tensor_cores": True, "prefixkern_cuda_cores": False}


def _cuda_available(*tensors) -> bool:
    if not cuda_decode_supported(*tensors):
        return False
    from .._cuda_build import cuda_ops

    return cuda_ops() is not None


# Opt-in decode variants that lost to the default kernel on the GPUs measured (the prefix GEMM: 0.568
# and 0.731 ms on the H100): a --quick run leaves them out unless --baselines names them.
OPT_IN_IMPLS = ("prefixkern_prefix_gemm",)


def _opt_in_skip(opts: Options, impl: str) -> str | None:
    """Why an opt-in variant is not timed in this run (None: it is)."""
    if impl in OPT_IN_IMPLS and opts.quick and not (opts.baselines and impl in opts.baselines):
        return "--quick leaves the opt-in decode variants out (slower than the default kernel so far): name them with --baselines"
    return None


def _other_kernel_skip(opts: Options, impl: str, head_dim: int) -> str | None:
    """Why an ``OTHER_KERNEL_ROWS`` row is not timed at ``head_dim`` (None: it is): no GPU, the
    prefixkern row runs that kernel already, or the tensor-core kernel cannot run here (then the
    prefixkern row runs the CUDA-core one)."""
    if not opts.on_gpu:
        return "the CUDA decode kernels run on a GPU (the CPU demo decodes with the reference)"
    tensor_cores = OTHER_KERNEL_ROWS[impl]
    if tensor_cores_by_default(head_dim) == tensor_cores:
        kernel = "tensor-core" if tensor_cores else "CUDA-core"
        return f"the prefixkern row runs the {kernel} decode kernel already (the default at head dim {head_dim})"
    return _tensor_cores_skip(opts)


def _tensor_cores_skip(opts: Options) -> str | None:
    """Why the tensor-core decode kernel cannot be timed on this GPU (None: it can)."""
    from .._cuda_build import tensor_cores_usable

    if not tensor_cores_usable(opts.device.index or 0):     # (False too where the CUDA ops are not built)
        return ("the tensor-core decode kernel cannot run here (no CUDA build, an older GPU than sm_80, or a "
                "failed self-check: see the warning)")
    return None


TOLERANCE = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _checked_and_timed(opts: Options, record: Record, fn, expected) -> Record:
    """``record`` of ``fn``: its error against ``expected``, its time and peak memory; a failed
    row if it raises (the suite goes on)."""
    try:
        record.max_err = scaled_err(fn(), expected)
        record.ok = bool(record.max_err <= TOLERANCE[opts.dtype])
        record.ms = time_ms(fn, on_gpu=opts.on_gpu, quick=opts.quick)
        record.peak_mem_mb = peak_mem_mb(fn, on_gpu=opts.on_gpu)
    except Exception as exc:       # a kernel failing
        record.fail(exc)
    return record


def case_tensors(randn, hq: int, hkv: int, d: int, p: int, cache: int, batch: int):
    """A case's tensors, drawn by ``randn(*size)``: ``q`` [B, Hq, 1, D], the cache's ``k``, ``v``
    [B, Hkv, cache, D], the batch-shared prefix ``pk``, ``pv`` [Hkv, P, D], and the baseline's cache as
    HF builds it under PEFT, ``[prefix ; sequence]`` per row (``cat_k``, ``cat_v``)."""
    q = randn(batch, hq, 1, d)
    k, v = randn(batch, hkv, cache, d), randn(batch, hkv, cache, d)
    pk, pv = randn(hkv, p, d), randn(hkv, p, d)
    cat_k = torch.cat([pk.expand(batch, -1, -1, -1), k], 2)
    cat_v = torch.cat([pv.expand(batch, -1, -1, -1), v], 2)
    return q, k, v, pk, pv, cat_k, cat_v


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    records, skips = [], []
    for name, hq, hkv, d, p, cache, batch in _cases(opts):
        if opts.shapes and name not in opts.shapes:
            continue
        if opts.on_gpu and batch * hkv * cache * d * 2 * opts.dtype.itemsize * 2 > 40e9:
            skips.append(Skip("decode", name, "all", "cache larger than 40 GB"))
            continue
        gen = torch.Generator().manual_seed(0)

        def randn(*size):
            return torch.randn(*size, generator=gen).to(opts.device, opts.dtype)

        q, k, v, pk, pv, cat_k, cat_v = case_tensors(randn, hq, hkv, d, p, cache, batch)
        expected = reference.prefix_attention(q, k, v, pk, pv, causal=True)
        kv_bytes = (batch * hkv * cache + hkv * p) * d * 2 * opts.dtype.itemsize
        def cuda_decode(prefix_gemm=False, tensor_cores=None):
            # The CUDA C++ kernel (the suite otherwise forces Triton).
            with use_backend("auto"):
                return prefix_decode_attention(q, k, v, pk, pv, prefix_gemm=prefix_gemm, tensor_cores=tensor_cores)

        def forced_stages_decode(stages):
            with mma_stages(stages):
                return cuda_decode(tensor_cores=True)

        def triton_decode():
            with use_backend("triton"), triton_decode_everywhere():
                return prefix_decode_attention(q, k, v, pk, pv)

        impls = {
            # prefixkern: what decoding runs: the CUDA C++ decode kernel of csrc/ (tensor cores at every
            # head dim, TENSOR_CORE_HEAD_DIMS), or the Triton decode kernel from
            # CUDA_DECODE_MAX_KV_BYTES of cache K/V on.
            "prefixkern": cuda_decode,
            # The same work on the other CUDA kernel (OTHER_KERNEL_ROWS): mma.sync, or CUDA-core FMAs.
            "prefixkern_tensor_cores": lambda: cuda_decode(tensor_cores=True),
            "prefixkern_cuda_cores": lambda: cuda_decode(tensor_cores=False),
            # The tensor-core kernel with one K/V stage (copy, wait, compute; PREFIXKERN_DECODE_STAGES=1)
            # and with two (the next tile's copies in flight during this one's products; =2), against
            # the default, the launcher's choice between them per call.
            "prefixkern_one_stage": lambda: forced_stages_decode(1),
            "prefixkern_two_stage": lambda: forced_stages_decode(2),
            # The prefix's part as one cuBLAS GEMM over all rows, merged with the kernel's cache part.
            "prefixkern_prefix_gemm": lambda: cuda_decode(prefix_gemm=True),
            # The Triton decode kernel: key chunks over the SMs, one program per GQA group (what
            # decoding runs where the CUDA kernels cannot be built); the general forward kernel.
            "prefixkern_triton_decode": triton_decode,
            "prefixkern_triton": lambda: prefix_attention(q, k, v, pk, pv, causal=True),
            "sdpa_concat": lambda: F.scaled_dot_product_attention(q, cat_k, cat_v, enable_gqa=hkv != hq),
        }
        for impl, fn in impls.items():
            if not opts.wants(impl):
                continue
            if _opt_in_skip(opts, impl):
                skips.append(Skip("decode", name, impl, _opt_in_skip(opts, impl)))
                continue
            if impl in CUDA_IMPLS and not _cuda_available(q, k, v, pk, pv):
                skips.append(Skip("decode", name, impl, "the CUDA decode kernel cannot run here (no GPU, no "
                                  "nvcc or a failed build: see the warning); prefixkern_triton_decode is the fallback"))
                continue
            reason = _other_kernel_skip(opts, impl, d) if impl in OTHER_KERNEL_ROWS else None
            if impl in FORCED_STAGES_ROWS:
                reason = _tensor_cores_skip(opts)
            if reason:
                skips.append(Skip("decode", name, impl, reason))
                continue
            progress(f"decode {name} {impl}")
            record = _checked_and_timed(opts, Record("decode", name, impl, "fwd", dtype_name(opts.dtype)), fn,
                                        expected)
            # The baseline reads the prefix once per row; the floor (and prefixkern) once in all.
            if record.ms:
                record.gbps = kv_bytes / (record.ms * 1e-3) / 1e9
                if not opts.quick:      # (OTHER_FLUSH_IN_FULL_RUNS)
                    record.add_note(other_flush_note(time_ms, fn, kv_bytes))
            records.append(record)
        got, skipped = _run_steps(opts, progress, name, q, k, v, pk, pv, cat_k, cat_v, randn)
        records += got
        skips += skipped
        del k, v, cat_k, cat_v
        release_models(opts.on_gpu)
    got, skipped = run_generate(opts, progress)
    return records + got, skips + skipped


# --------------------------------------------------------------------------------------------
# One decoding step of one layer: the cache append, then the attention
# --------------------------------------------------------------------------------------------

STEP_IMPLS = ("prefixkern", "hf_dynamic_cache_sdpa")


def _run_steps(opts: Options, progress, name, q, k, v, pk, pv, cat_k, cat_v, randn):
    """A decoding step of one layer as generate() runs it (pass ``step``): the new token's keys
    and values appended to the layer's cache, then its attention. Under stock PEFT, HF appends with
    ``DynamicLayer`` (``torch.cat``: the whole ``[prefix ; cache]`` copied at every token, K and V)
    and attends with SDPA; the patched model appends in place (``PrefixKVLayer``, the buffer sized
    by generate()'s final length) and attends with the decode kernel (CUDA where built)."""
    wanted = [impl for impl in STEP_IMPLS if opts.wants(impl)]
    if not wanted:
        return [], []
    try:
        from transformers.cache_utils import DynamicLayer

        from ..integrations.hf import PrefixKVLayer
    except Exception as exc:                       # transformers is the [hf] extra
        return [], [Skip("decode", name, impl, f"transformers unavailable ({exc})") for impl in wanted]
    from ..ops.decode_attention import decode_step

    batch, hkv, cache, d = k.shape
    new_k, new_v = randn(batch, hkv, 1, d), randn(batch, hkv, 1, d)
    expected = reference.prefix_attention(q, torch.cat([k, new_k], 2), torch.cat([v, new_v], 2), pk, pv, causal=True)
    records = []
    for impl in wanted:
        with torch.no_grad():
            if impl == "prefixkern":
                layer = PrefixKVLayer(capacity_hint=cache + 1)
                head = layer.update(k, v)          # the prefill, into a buffer with room for the step

                def fn(layer=layer, head=head):
                    with torch.no_grad(), use_backend("auto"):
                        # The previous call's token dropped by restoring the prefill's views (the
                        # HF row restores its tensors the same way); the append overwrites it. The
                        # views the layer last left, too: as generate()'s next step finds them, so
                        # the append takes its path (no check of the views' memory and layout).
                        layer.keys, layer.values = head
                        layer._key_view, layer._value_view = head
                        keys, values = layer.update(new_k, new_v)
                        return decode_step(q, keys, values, pk, pv, key_padding_mask=None, prefix_index=None,
                                           softmax_scale=None)
            else:
                layer = DynamicLayer()
                layer.update(cat_k[:, :, :0], cat_v[:, :, :0])    # initialised, empty

                def fn(layer=layer):
                    with torch.no_grad():
                        layer.keys, layer.values = cat_k, cat_v
                        keys, values = layer.update(new_k, new_v)
                        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=q.shape[1] != hkv)
            progress(f"decode {name} {impl} step")
            record = _checked_and_timed(opts, Record("decode", name, impl, "step", dtype_name(opts.dtype)), fn,
                                        expected)
            if record.ms:
                record.add_note(f"back to back: {back_to_back_ms(fn):.3g} ms a call (100 calls between two events, "
                                "no L2 flush: the host time of a host-bound step in full)")
            records.append(record)
        del layer, fn
    return records, []


# --------------------------------------------------------------------------------------------
# generate() end to end
# --------------------------------------------------------------------------------------------

GEN_MODELS = ("qwen2.5-0.5b", "llama3.2-1b")
# transformers' warning when a model gets both cache= and past_key_values= and drops the latter.
_PREFIX_DROPPED = "ignoring deprecated `past_key_values"
GEN_P, GEN_PROMPT, GEN_NEW = 30, 512, 256
GEN_BATCHES = (1, 8, 64)
# generate(cache_implementation=...): "static" gets the patched model's own PrefixKVStaticCache,
# whose decoding steps transformers compiles on a GPU (inductor, CUDA graphs; the untimed first
# call pays the compilation); stock PEFT pre-fills transformers' StaticCache with its prefix.
GEN_CACHES = ("dynamic", "static")


def _generate_cases(opts: Options):
    """(model, batch, prompt, new tokens, cache implementation) of the generate() rows."""
    if not opts.on_gpu:
        return [("cpu-tiny-llama", 2, 12, 4, "dynamic"), ("cpu-tiny-llama", 2, 12, 4, "static")]
    if opts.quick:
        return [("qwen2.5-0.5b", 8, GEN_PROMPT, 64, cache) for cache in GEN_CACHES]
    return [(model, batch, GEN_PROMPT, GEN_NEW, cache) for model in GEN_MODELS for batch in GEN_BATCHES
            for cache in GEN_CACHES]


def _time_generate_interleaved(timed, tokens: int, repeats: int) -> None:
    """Each row's ``ms`` (the best of ``repeats`` calls), ``tokens_per_s`` and peak memory, its
    calls in rounds that take every row's generate() in turn. One call is seconds of host-bound
    work, and the host's speed drifts: the sixth and seventh H200 runs, timing each row's calls one
    row after another, read the same patched path 16% faster and 27% slower than stock PEFT's
    (1.59 against 1.84 s, 2.18 against 1.72; Qwen2.5-0.5B, B=8), and a single sample once read
    1.8x slower than a profile of the same call. Rounds spread the drift over every row alike.
    The models stay loaded for the rounds, so a row's peak memory is its own model's weights and
    buffers plus the most one of its calls allocated above what was resident when it began. The
    rounds are the e2e suite's (``interleaved_times``: wall clock between two synchronisations)."""
    from .e2e import interleaved_times

    above = {}

    def measured(record, generate):
        def call():
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            generate()
            above[id(record)] = max(above.get(id(record), 0), torch.cuda.max_memory_allocated() - resident)
        return call

    gc.collect()
    times = interleaved_times({id(record): measured(record, generate) for record, generate, _ in timed}, repeats, 1)
    for record, _, model in timed:
        calls = times[id(record)]
        record.ms = min(calls)
        record.tokens_per_s = tokens / (record.ms * 1e-3)
        weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
        record.peak_mem_mb = (weights + above[id(record)]) / 2**20
        record.add_note(f"{repeats} calls in rounds with the case's other rows: "
                        + ", ".join(f"{t:.0f}" for t in calls) + " ms")


def run_generate(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    """Tokens/s of greedy ``generate()`` (dynamic or static cache requested) on a patched model
    against stock PEFT + ``sdpa``. ``ok`` checks the patched model's prefill logits against stock
    PEFT + ``eager``. A generate() that raises is a skip with its reason."""
    from . import e2e

    records, skips = [], []
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    except Exception as exc:
        return records, [Skip("decode", "generate", "all", f"transformers/peft unavailable ({exc})")]
    from transformers import AutoModelForCausalLM

    dynamic_tokens = {}      # (model, batch, prompt, new tokens, impl) -> what the dynamic cache generated
    for name, batch, prompt, new_tokens, cache in _generate_cases(opts):
        if opts.shapes and name not in opts.shapes:
            continue
        case = f"{name}-B{batch}-prompt{prompt}-new{new_tokens}" + ("" if cache == "dynamic" else f"-{cache}")
        cache_kwargs = {} if cache == "dynamic" else {"cache_implementation": cache}
        config = e2e.model_config(name)
        torch.manual_seed(0)
        with torch.device(opts.device):
            base_state = AutoModelForCausalLM.from_config(config, torch_dtype=opts.dtype).state_dict()
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, config.vocab_size, (batch, prompt), generator=gen).to(opts.device)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, : prompt // 4] = 0          # one left-padded row, as in batched serving
        reference_logits = None
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        timed = []               # (record, generate, model) of the rows whose generate() ran
        for impl in ("peft_eager", "peft_sdpa", "prefixkern", *OTHER_KERNEL_ROWS):
            if not opts.wants(impl):
                continue
            if impl in OTHER_KERNEL_ROWS:
                # The patched model decoding on the other CUDA kernel (PREFIXKERN_DECODE_TENSOR_CORES=1 / 0).
                reason = _other_kernel_skip(opts, impl, head_dim) or (
                    "--quick times generate() on the default kernel only (the kernel rows compare the two)"
                    if opts.quick and opts.on_gpu else None)
                if reason:
                    skips.append(Skip("decode", case, impl, reason))
                    continue
            progress(f"decode generate {case} {impl}")
            try:
                model = e2e.build_model(name, impl, opts, base_state, num_virtual_tokens=GEN_P).eval()
            except Exception as exc:
                skips.append(Skip("decode", case, impl, f"could not build: {type(exc).__name__}: {exc}"))
                continue
            record = Record("decode", case, impl, "generate", dtype_name(opts.dtype))
            with torch.no_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].float()
            if impl == "peft_eager":
                reference_logits = logits
                del model
                continue                 # the oracle of the check; its generate() is not timed
            if reference_logits is not None:
                real = attention_mask[:, -1].bool()
                record.max_err = scaled_err(logits[real], reference_logits[real])
                record.ok = bool(record.max_err <= {torch.float32: 1e-4, torch.float16: 1e-2,
                                                    torch.bfloat16: 5e-2}[opts.dtype])

            def generate(model=model, tensor_cores=OTHER_KERNEL_ROWS.get(impl)):
                with torch.no_grad(), tensor_core_decoding(tensor_cores):
                    return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                          **cache_kwargs)

            failed = None
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    out = generate()
                except Exception as exc:   # a baseline that cannot: stock PEFT, static cache, transformers 5.2x
                    failed = f"generate() failed: {type(exc).__name__}: {str(exc)[:500]}"
            if failed:                     # (outside the handler: its traceback no longer holds the model)
                if impl.startswith("prefixkern"):
                    # Ours failing is a result: a failed row in the table, and the suite goes on.
                    record.ok, record.note = False, failed
                    records.append(record)
                else:
                    skips.append(Skip("decode", case, impl, failed))
                del model, generate
                release_models(opts.on_gpu)
                continue
            assert out.shape == (batch, prompt + new_tokens)
            key = (name, batch, prompt, new_tokens, impl)
            if cache == "dynamic":
                dynamic_tokens[key] = out[:, prompt:]
            elif impl.startswith("prefixkern") and key in dynamic_tokens:
                # The static cache's compiled steps compute the rest of the step as inductor does
                # (their attention is the same kernel's where the CUDA one serves both): a bf16
                # near-tie may part them, so say how far they agree, not ok/not ok.
                same = (out[:, prompt:] == dynamic_tokens[key]).cumprod(1).sum(1).float().mean().item()
                record.note = f"the dynamic cache's tokens for the first {same:.1f} of {new_tokens} (mean over rows)"
            eager = [str(w.message) for w in caught if "decodes eagerly" in str(w.message)]
            if eager:                      # the static cache's compilation failed: say so beside the time
                record.add_note(eager[0][:300])
            if not impl.startswith("prefixkern") and any(_PREFIX_DROPPED in str(w.message) for w in caught):
                # Stock PEFT on transformers >= 5.2x: generate() passes its own cache as cache= and
                # the model drops the prefix PEFT put in past_key_values=. The timing is of a
                # generation without the prefix: say so rather than compare against it silently.
                record.ok = False
                record.note = "stock PEFT's generate() ran without its prefix (transformers ignored past_key_values)"
            records.append(record)
            timed.append((record, generate, model))
            del model, generate             # (timed holds them until the case's rounds are over)
        if opts.on_gpu and timed:
            _time_generate_interleaved(timed, batch * new_tokens, repeats=3 if opts.quick else 2)
        del timed
        release_models(opts.on_gpu)
    return records, skips
