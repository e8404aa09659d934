"""Device suite: what the GPU itself does, measured in the same run, so the issues' relative
targets (attention at 55% of the GPU's bf16 matmul TFLOP/s, the prefix MLP and the decode kernel
reading at 70% of its memory bandwidth) can be read off the results file.

- ``matmul-8192``: ``torch.matmul`` of two 8192 x 8192 matrices in the run's dtype (cuBLAS),
  ``tflops = 2 * 8192**3 / time``.
- ``copy-512MiB``: a device-to-device ``copy_`` of 512 MiB, ``gbps = 2 * bytes / time`` (each
  byte read once and written once).

On a CPU there is nothing to measure: the suite records a skip with the reason.
"""
from __future__ import annotations

import torch

from .common import Options, Record, Skip, dtype_name, scaled_err, time_ms

MATMUL_N = 8192
COPY_BYTES = 512 * 2**20


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    if not opts.on_gpu:
        return [], [Skip("device", "matmul-8192, copy-512MiB", "torch",
                         "device probes (bf16 matmul TFLOP/s, copy bandwidth) measure a GPU; none here")]
    records = []
    progress(f"device matmul-{MATMUL_N}")
    a = torch.randn(MATMUL_N, MATMUL_N, device=opts.device, dtype=opts.dtype)
    b = torch.randn(MATMUL_N, MATMUL_N, device=opts.device, dtype=opts.dtype)
    record = Record("device", f"matmul-{MATMUL_N}", "torch", "fwd", dtype_name(opts.dtype),
                    note="cuBLAS through torch.matmul: the GPU's dense matmul rate in this dtype")
    record.ms = time_ms(lambda: torch.matmul(a, b), on_gpu=True, quick=opts.quick)
    record.tflops = 2 * MATMUL_N**3 / (record.ms * 1e-3) / 1e12
    corner = torch.matmul(a, b)[:64, :64].float()
    record.max_err = scaled_err(corner, a[:64].float() @ b[:, :64].float())
    record.ok = bool(record.max_err <= 1e-2)
    records.append(record)
    del a, b

    progress("device copy-512MiB")
    src = torch.empty(COPY_BYTES, device=opts.device, dtype=torch.uint8).random_()
    dst = torch.empty_like(src)
    record = Record("device", "copy-512MiB", "torch", "fwd", "uint8",
                    note="device-to-device copy_, GB/s counting each byte read and written")
    record.ms = time_ms(lambda: dst.copy_(src), on_gpu=True, quick=opts.quick)
    record.gbps = 2 * COPY_BYTES / (record.ms * 1e-3) / 1e9
    record.ok = bool(torch.equal(dst[:4096], src[:4096]))
    records.append(record)
    return records, []
