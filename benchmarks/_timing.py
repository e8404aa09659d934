"""Timing helper shared by the pytest-benchmark suites."""
import torch


def cuda_timed(benchmark, fn, rounds=30):
    """Benchmark ``fn`` with a CUDA synchronisation inside each round."""
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    fn()
    torch.cuda.synchronize()
    return benchmark.pedantic(run, rounds=rounds, warmup_rounds=3, iterations=1)
