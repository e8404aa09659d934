"""Decode suite: the attention of one generation step (q_len 1) with a batch-shared prefix, against
SDPA on the concatenated cache (what HF holds under PEFT: the prefix sits in the cache already,
so the baseline pays no concatenation here), reported as time and KV bytes read per second."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .. import reference
from .._backend import use_backend
from ..ops.decode_attention import cuda_decode_supported, prefix_decode_attention
from ..ops.prefix_attention import prefix_attention
from .common import Options, Record, Skip, dtype_name, peak_mem_mb, scaled_err, time_ms

HQ, HKV, D = 32, 8, 128      # Llama-3-8B attention
PREFIXES = (30, 128)
CACHES = (512, 4096, 32768)
BATCHES = (1, 8, 64)
QUICK = [(30, 4096, 8), (128, 512, 1)]


def _cases(opts: Options):
    if not opts.on_gpu:
        return [("cpu-tiny", 4, 2, 32, 5, 40, 2)]
    grid = QUICK if opts.quick else list(itertools.product(PREFIXES, CACHES, BATCHES))
    return [(f"P{p}-L{cache}-B{batch}", HQ, HKV, D, p, cache, batch) for p, cache, batch in grid]


def _cuda_available(*tensors) -> bool:
    if not cuda_decode_supported(*tensors):
        return False
    from .._cuda_build import cuda_ops

    return cuda_ops() is not None


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

        q = randn(batch, hq, 1, d)
        k, v = randn(batch, hkv, cache, d), randn(batch, hkv, cache, d)
        pk, pv = randn(hkv, p, d), randn(hkv, p, d)
        # The baseline's cache, as HF builds it under PEFT: [prefix ; sequence] per row.
        cat_k = torch.cat([pk.expand(batch, -1, -1, -1), k], 2)
        cat_v = torch.cat([pv.expand(batch, -1, -1, -1), v], 2)
        expected = reference.prefix_attention(q, k, v, pk, pv, causal=True)
        kv_bytes = (batch * hkv * cache + hkv * p) * d * 2 * opts.dtype.itemsize
        def cuda_decode():
            with use_backend("auto"):      # the CUDA C++ kernel (the suite otherwise forces Triton)
                return prefix_decode_attention(q, k, v, pk, pv)

        impls = {
            # prefixkern: the CUDA C++ decode kernel of csrc/; prefixkern_triton: the Triton kernel.
            "prefixkern": cuda_decode,
            "prefixkern_triton": lambda: prefix_attention(q, k, v, pk, pv, causal=True),
            "sdpa_concat": lambda: F.scaled_dot_product_attention(q, cat_k, cat_v, enable_gqa=hkv != hq),
        }
        for impl, fn in impls.items():
            if not opts.wants(impl):
                continue
            if impl == "prefixkern" and not _cuda_available(q, k, v, pk, pv):
                skips.append(Skip("decode", name, impl, "the CUDA decode kernel cannot run here (no GPU, no "
                                  "nvcc or a failed build: see the warning); prefixkern_triton is the fallback"))
                continue
            progress(f"decode {name} {impl}")
            record = Record("decode", name, impl, "fwd", dtype_name(opts.dtype))
            record.max_err = scaled_err(fn(), expected)
            record.ok = bool(record.max_err <= {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[opts.dtype])
            record.ms = time_ms(fn, on_gpu=opts.on_gpu, quick=opts.quick)
            record.peak_mem_mb = peak_mem_mb(fn, on_gpu=opts.on_gpu)
            # The baseline reads the prefix once per row; the floor (and prefixkern) once in all.
            if record.ms:
                record.gbps = kv_bytes / (record.ms * 1e-3) / 1e9
            records.append(record)
    return records, skips
