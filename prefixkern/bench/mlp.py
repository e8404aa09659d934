"""MLP suite: the fused prefix MLP against PEFT's encoder on B*P rows and the same math in PyTorch
on P rows, forward and forward+backward, for the seeds' and Llama-3-8B's shapes; ``+autocast``
shapes run every implementation's forward inside ``torch.autocast`` in the run's dtype (a
``Trainer`` with ``bf16=True``: PEFT's float32 encoder computes its Linears in bf16)."""
from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass

import torch

from .. import reference
from ..ops.prefix_mlp import fused_prefix_mlp, launched_tiles, tf32x3_products
from .common import (LAUNCH_PATH_ROWS, Options, Record, Skip, dtype_name, held, launch_path_skip,
                     other_flush_note, peak_mem_mb, scaled_err, time_ms, with_raw_launch)


@dataclass(frozen=True)
class MlpShape:
    name: str
    L: int
    Hkv: int
    D: int
    P: int
    B: int = 8
    autocast: bool = False

    @property
    def token_dim(self) -> int:     # PEFT's token_dim (and its default encoder_hidden_size)
        return self.Hkv * self.D

    @property
    def num_cols(self) -> int:
        return 2 * self.L * self.Hkv * self.D


SHAPES = {s.name: s for s in (
    MlpShape("qwen2.5-0.5b", 24, 2, 64, 20),
    MlpShape("bloomz-560m", 24, 16, 64, 30),
    MlpShape("llama3-8b", 32, 8, 128, 64),
    MlpShape("qwen2.5-0.5b+autocast", 24, 2, 64, 20, autocast=True),
    MlpShape("llama3-8b+autocast", 32, 8, 128, 64, autocast=True),
)}
# --quick: every model issue 3 names (Qwen2.5-0.5B, bloomz-560m, Llama-3-8B), and Llama-3-8B under
# bf16 autocast (how a Trainer with bf16=True runs PEFT's float32 encoder), that one second: the
# seventh H200 run's step limit came before it, the last of the four.
QUICK = ("qwen2.5-0.5b", "llama3-8b+autocast", "llama3-8b", "bloomz-560m")
CPU_SHAPES = {s.name: s for s in (MlpShape("cpu-tiny", 2, 2, 12, 7, B=2),
                                   MlpShape("cpu-tiny+autocast", 2, 2, 12, 7, B=2, autocast=True))}


def parameters(shape: MlpShape, device):
    """The suite's parameters of ``shape`` (E, W1, b1, W2, b2: float32, seeded, requiring grad),
    drawn on the CPU and moved to ``device`` (the same values on any device)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    d, h, n = shape.token_dim, shape.token_dim, shape.num_cols
    tensors = [torch.randn(shape.P, d, generator=gen), torch.randn(h, d, generator=gen) / d**0.5,
               torch.randn(h, generator=gen) * 0.1, torch.randn(n, h, generator=gen) / h**0.5,
               torch.randn(n, generator=gen) * 0.1]
    return [t.to(device).requires_grad_() for t in tensors]


def autocast_of(shape: MlpShape, device, dtype: torch.dtype):
    """The context a forward of ``shape`` runs in: autocast to ``dtype`` for an ``+autocast`` shape."""
    if shape.autocast:
        return torch.autocast(torch.device(device).type, dtype=dtype)
    return contextlib.nullcontext()


def p_rows_compute_dtype(shape: MlpShape, dtype: torch.dtype) -> torch.dtype | None:
    """The product dtype of the suite's ``torch_p_rows`` row (the same math in PyTorch on P rows):
    under autocast, what autocast's Linear computes in; else None, the parameters' own."""
    return dtype if shape.autocast else None


def fused_step(shape: MlpShape, device, out_dtype: torch.dtype, backward: bool = True, p_rows: bool = False):
    """A call of the fused MLP at ``shape`` as the suite makes it (``autocast_of``): its forward and,
    with ``backward``, the backward of a fixed random gradient, the parameters' gradients cleared
    first. ``p_rows``: the suite's ``torch_p_rows`` row instead (the same math in PyTorch on P rows),
    so a profile can set its kernels beside ours. What the profiling scripts run; ``step.params``
    holds the parameters."""
    params = parameters(shape, device)
    kw = dict(num_layers=shape.L, num_kv_heads=shape.Hkv, head_dim=shape.D, out_dtype=out_dtype)
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(shape.L, 2, shape.Hkv, shape.P, shape.D, generator=gen).to(device, out_dtype)
    compute = p_rows_compute_dtype(shape, out_dtype)

    def step():
        for p in params:
            p.grad = None
        if p_rows:
            out = reference.prefix_mlp(*params, **kw, compute_dtype=compute)
        else:
            with autocast_of(shape, device, out_dtype):
                out = fused_prefix_mlp(*params, **kw)
        if backward:
            out.backward(grad)
        return out
    step.params = params        # (what a test reads the gradients from)
    return step


def _peft_encoder(shape: MlpShape, params, device):
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=shape.P, num_layers=shape.L,
                                token_dim=shape.token_dim, num_attention_heads=shape.Hkv,
                                encoder_hidden_size=shape.token_dim, prefix_projection=True)
    encoder = PrefixEncoder(config).to(device)
    with torch.no_grad():
        for mine, theirs in zip(params, (encoder.embedding.weight, encoder.transform[0].weight,
                                         encoder.transform[0].bias, encoder.transform[2].weight,
                                         encoder.transform[2].bias)):
            theirs.copy_(mine)
    return encoder


def _fma_skip(opts: Options, shape: MlpShape) -> str | None:
    """Why the ``prefixkern_fma`` row does not apply to ``shape`` (None: it does)."""
    if not opts.on_gpu:
        return "the choice of float32 products is a GPU kernel path (the CPU runs the reference)"
    if shape.autocast:
        return "under autocast the products are 16-bit, not exact float32"
    if torch.get_float32_matmul_precision() != "highest":
        return "PyTorch allows TF32 here: the kernels take TF32 products either way"
    return None


# Ours and the same math in PyTorch on P rows timed again in alternating rounds (``time_ms`` each, so
# with the L2 flushed), noted on the prefixkern row: the rows are timed one after another,
# and one row has read 0.754, 1.08 and 0.776 ms in three H200 runs (torch_p_rows, Llama-3-8B
# fwd_bwd), so issue 3's ratio is read side by side too. Drift reaches both alike.
INTERLEAVED_ROUNDS = 6


def interleaved_note(ours, theirs, rounds: int = INTERLEAVED_ROUNDS) -> str:
    """``ours`` and ``theirs`` (GPU calls) timed in ``rounds`` alternating rounds: the medians and
    theirs/ours, with the spread of the rounds' own ratios."""
    mine, other = [], []
    for _ in range(rounds):
        mine.append(time_ms(ours, on_gpu=True, quick=True))
        other.append(time_ms(theirs, on_gpu=True, quick=True))
    ratios = sorted(b / a for a, b in zip(mine, other))
    return (f"interleaved with torch_p_rows ({rounds} rounds): {statistics.median(mine):.3g} against "
            f"{statistics.median(other):.3g} ms, {statistics.median(other) / statistics.median(mine):.3g}x "
            f"(rounds {ratios[0]:.3g}-{ratios[-1]:.3g}x)")


def run(opts: Options, progress) -> tuple[list[Record], list[Skip]]:
    records, skips = [], []
    for name, shape in opts.select(SHAPES, CPU_SHAPES, QUICK):
        if shape.autocast and opts.dtype not in (torch.float16, torch.bfloat16):
            # torch.autocast takes 16-bit dtypes only (it warns and turns itself off otherwise).
            skips.append(Skip("mlp", name, "all", f"autocast computes in float16 or bfloat16, not {dtype_name(opts.dtype)}"))
            continue
        params = parameters(shape, opts.device)
        kw = dict(num_layers=shape.L, num_kv_heads=shape.Hkv, head_dim=shape.D)
        try:
            encoder = _peft_encoder(shape, params, opts.device)
        except Exception as exc:       # peft missing
            encoder = None
            skips.append(Skip("mlp", name, "peft_encoder", f"peft unavailable ({exc})"))
        tokens = torch.arange(shape.P, device=opts.device).unsqueeze(0).expand(shape.B, -1)

        def forward_context():
            return autocast_of(shape, opts.device, opts.dtype)

        def peft_rows():
            # PEFT's get_prompt: the encoder on B*P rows, cast, viewed and permuted per layer.
            with forward_context():
                rows = encoder(tokens).to(opts.dtype)
            return rows.view(shape.B, shape.P, 2 * shape.L, shape.Hkv, shape.D).permute(2, 0, 3, 1, 4)

        def ours():
            with forward_context():
                return fused_prefix_mlp(*params, **kw, out_dtype=opts.dtype)

        compute = p_rows_compute_dtype(shape, opts.dtype)
        impls = {"prefixkern": ours}
        # The same kernels on the other launch path, timed right after the prefixkern row: the raw
        # launch (PREFIXKERN_RAW_LAUNCH=1) where the plain one is the default, else the plain one.
        for row in LAUNCH_PATH_ROWS:
            reason = launch_path_skip(opts, row)
            if reason:
                skips.append(Skip("mlp", name, row, reason))
            elif opts.wants(row):
                impls[row] = ours
        impls["torch_p_rows"] = lambda: reference.prefix_mlp(*params, **kw, out_dtype=opts.dtype, compute_dtype=compute)
        impls["peft_encoder"] = peft_rows
        # The kernels with their exact float32 products on FMA units (PREFIXKERN_MLP_TF32X3=0)
        # rather than the default 3xTF32: where the products are exact float32 ones, on a GPU.
        reason = _fma_skip(opts, shape)
        if reason:
            skips.append(Skip("mlp", name, "prefixkern_fma", reason))
        elif opts.wants("prefixkern_fma"):
            impls["prefixkern_fma"] = ours
        expected = reference.prefix_mlp(*[p.detach().double() for p in params], **kw, out_dtype=torch.float64)
        grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(opts.device, opts.dtype)
        w2_bytes = shape.num_cols * shape.token_dim * 4
        for pass_ in ("fwd", "fwd_bwd"):
            timed = {}      # impl -> (record, call) of this pass's rows that were timed
            for impl, fn in impls.items():
                if not opts.wants(impl) or (impl == "peft_encoder" and encoder is None):
                    continue
                progress(f"mlp {name} {pass_} {impl}")
                record = Record("mlp", name, impl, pass_, dtype_name(opts.dtype))
                modules = [p for p in params] + (list(encoder.parameters()) if impl == "peft_encoder" else [])

                def call(fn=fn, impl=impl, pass_=pass_):
                    for p in modules:
                        p.grad = None
                    out = fn()
                    if pass_ == "fwd_bwd":
                        if impl == "peft_encoder":   # B copies of the prefix reach the layers
                            per_layer = grad_out.reshape(2 * shape.L, 1, shape.Hkv, shape.P, shape.D)
                            out.backward(per_layer.expand(-1, shape.B, -1, -1, -1) / shape.B)
                        else:
                            out.backward(grad_out)
                    return out

                # A row's setting holds for the backward too, which runs after fn returns.
                if impl == "prefixkern_fma":
                    call = held(call, lambda: tf32x3_products(False))
                elif impl in LAUNCH_PATH_ROWS:
                    call = with_raw_launch(call, enabled=LAUNCH_PATH_ROWS[impl])
                try:
                    launched_tiles()    # drops what the previous row's timing calls left behind
                    out = call()
                    if impl.startswith("prefixkern"):   # the tiles autotuning chose, to read beside the timing
                        record.note = "tiles " + " ".join(f"{k}:{v}" for k, v in launched_tiles().items())
                    got = out[:, 0].reshape(expected.shape) if impl == "peft_encoder" else out
                    record.max_err = scaled_err(got, expected)
                    record.ok = bool(record.max_err <= {torch.float32: 1e-4, torch.float16: 2e-3,
                                                        torch.bfloat16: 1.6e-2}[opts.dtype])
                    record.ms = time_ms(call, on_gpu=opts.on_gpu, quick=opts.quick)
                    record.peak_mem_mb = peak_mem_mb(call, on_gpu=opts.on_gpu)
                    if record.ms:
                        timed[impl] = (record, call)
                        # W2 is read once by the forward and once more by the backward.
                        record.gbps = w2_bytes * (2 if pass_ == "fwd_bwd" else 1) / (record.ms * 1e-3) / 1e9
                        # Issue 3's bandwidth target reads the forward (OTHER_FLUSH_IN_FULL_RUNS).
                        if pass_ == "fwd" and not opts.quick:
                            record.add_note(other_flush_note(time_ms, call, w2_bytes))
                except Exception as exc:       # a kernel failing
                    record.fail(exc)
                records.append(record)
            if "prefixkern" in timed and "torch_p_rows" in timed:
                progress(f"mlp {name} {pass_} prefixkern / torch_p_rows interleaved")
                record = timed["prefixkern"][0]
                record.note = "; ".join(filter(None, (record.note, interleaved_note(timed["prefixkern"][1],
                                                                                   timed["torch_p_rows"][1]))))
    return records, skips
