"""Device suite: what the GPU itself does, measured in the same run, so the issues' relative
targets (attention at 55% of the GPU's bf16 matmul TFLOP/s, the prefix MLP and the decode kernel
reading at 70% of its memory bandwidth) can be read off the results file.

- ``matmul-8192``: ``torch.matmul`` of two 8192 x 8192 matrices in the run's dtype (cuBLAS),
  ``tflops = 2 * 8192**3 / time``.
- ``copy-512MiB``: a device-to-device ``copy_`` of 512 MiB, ``gbps = 2 * bytes / time`` (each
  byte read once and written once).
- ``read-512MiB``: a ``sum`` over 512 MiB of float32, ``gbps = bytes / time``: the rate of a call
  that only reads, as the decode kernels and the prefix MLP's forward (W2) mostly do. The issues'
  bandwidth targets take the higher of the two probes.
- ``read-128MiB``: the same read at a decode step's size, timed after each L2 flush the suites can
  use (``torch_read_flush``, ``torch_zero_flush``; ``prefixkern-bench --l2-flush``): how much of a
  memory-bound row's time do_bench's flush, which leaves the L2 dirty, adds on this GPU.

On a CPU there is nothing to measure: the suite records a skip with the reason.
"""
from __future__ import annotations

import torch

from .common import Options, Record, Skip, dtype_name, scaled_err, time_ms

MATMUL_N = 8192
COPY_BYTES = 512 * 2**20
READ_BYTES = 512 * 2**20
FLUSH_PROBE_BYTES = 128 * 2**20


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    if not opts.on_gpu:
        return [], [Skip("device", "matmul-8192, copy-512MiB, read-512MiB, read-128MiB", "torch",
                         "device probes (bf16 matmul TFLOP/s, copy and read bandwidth) measure a GPU; none here")]
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
    del src, dst

    progress("device read-512MiB")
    records.append(_read_probe(opts, READ_BYTES, "torch", None,
                               "sum over float32, GB/s counting each byte read: the rate of a read-only call"))
    for flush in ("read", "zero"):
        progress(f"device read-128MiB after a {flush} flush")
        records.append(_read_probe(opts, FLUSH_PROBE_BYTES, f"torch_{flush}_flush", flush,
                                   f"the read-512MiB probe at 128 MiB, the L2 flushed by a {flush} before each "
                                   "timed call"))
    return records, []


def _read_probe(opts: Options, nbytes: int, impl: str, flush: str | None, note: str) -> Record:
    """A ``sum`` over ``nbytes`` of float32 timed (after the run's L2 flush, or ``flush``): GB/s read."""
    data = torch.empty(nbytes // 4, device=opts.device, dtype=torch.float32).uniform_(-1, 1)
    record = Record("device", f"read-{nbytes // 2**20}MiB", impl, "fwd", "float32", note=note)
    record.ms = time_ms(lambda: data.sum(), on_gpu=True, quick=opts.quick, flush=flush)
    record.gbps = nbytes / (record.ms * 1e-3) / 1e9
    # Against a float64 sum, relative to the sum of magnitudes (float32 partial sums round).
    expected = data.sum(dtype=torch.float64).item()
    record.max_err = abs(data.sum().item() - expected) / max(1.0, data.abs().sum(dtype=torch.float64).item())
    record.ok = bool(record.max_err <= 1e-5)
    return record
