"""How far 3xTF32 products ("tf32x3", PREFIXKERN_MLP_TF32X3=1) land from exact float32 ones,
emulated on the CPU at the prefix MLP's real shapes (no GPU needed).

Triton computes a float32 ``tl.dot(a, b, input_precision="tf32x3")`` as
``a_small @ b_big + a_big @ b_small + a_big @ b_big`` on TF32 tensor cores, with ``x_big`` = x
rounded to TF32 (10 mantissa bits, ``cvt.rna.tf32.f32``) and ``x_small = x - x_big``, of which
the tensor core reads the TF32 bits only (truncated here: the worse case). This script does the
same splits in PyTorch, multiplies with float32 accumulation, and prints each GEMM's largest
error against float64, relative to the largest exact value, beside that of a float32 matmul
("ieee": exact products, float32 sums) and of plain TF32.

    python benchmarks/mlp_precision.py [--seed 0]

The forward's two GEMMs and the backward's four, at the MLP suite's model sizes (P rows, d = h =
token_dim, N = 2 * L * Hkv * D); dH's reduction runs over all of N here, longer than any split
of it the backward kernel sums.
"""
from __future__ import annotations

import argparse

import torch

# name: (L, Hkv, D, P, encoder hidden h); d = token_dim = Hkv * D.
MODELS = {
    "qwen2.5-0.5b": (24, 2, 64, 20, 896),
    "bloomz-560m": (24, 16, 64, 30, 1024),
    "llama3-8b": (32, 8, 128, 64, 4096),
}


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """Round float32 to TF32 (nearest, ties away from zero), kept in float32."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def tf32x3_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a_big, b_big = tf32_round(a), tf32_round(b)
    a_small, b_small = tf32_truncate(a - a_big), tf32_truncate(b - b_big)
    return (a_small @ b_big + a_big @ b_small) + a_big @ b_big


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


def gemms(L: int, Hkv: int, D: int, P: int, h: int, gen: torch.Generator):
    """(name, a, b) of every GEMM of the MLP's forward and backward, on random operands of the
    magnitudes they have there (tanh activations, 1/sqrt(fan-in) weights, unit gradients)."""
    d, N = Hkv * D, 2 * L * Hkv * D
    emb = torch.randn(P, d, generator=gen)
    w1 = torch.randn(h, d, generator=gen) / d ** 0.5
    w2 = torch.randn(N, h, generator=gen) / h ** 0.5
    hidden = torch.tanh(emb @ w1.t())
    grad = torch.randn(P, N, generator=gen)
    dz = (grad @ w2) * (1 - hidden * hidden)
    return [("fwd H = E W1^T", emb, w1.t()), ("fwd out = H W2^T", hidden, w2.t()),
            ("bwd dH = G W2", grad, w2), ("bwd dW2 = G^T H", grad.t(), hidden),
            ("bwd dE = dZ W1", dz, w1), ("bwd dW1 = dZ^T E", dz.t(), emb)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(args.seed)
    print("| model | GEMM | K | ieee (float32) | tf32x3 | tf32 |\n| --- | --- | --- | --- | --- | --- |")
    for model, sizes in MODELS.items():
        for name, a, b in gemms(*sizes, gen):
            exact = a.double() @ b.double()
            errors = [relative_error(f(a, b), exact)
                      for f in (torch.matmul, tf32x3_matmul, lambda x, y: tf32_round(x) @ tf32_round(y))]
            print(f"| {model} | {name} | {a.shape[1]} | " + " | ".join(f"{e:.2e}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
