"""pytest-benchmark suites (``pytest benchmarks --benchmark-only``): each benchmark first checks what
it times against the reference. They need a GPU; on a CPU they are skipped with that reason."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="benchmarks time GPU kernels; run them on a GPU (benchmarks/run_gpu.sh)")
    here = str(__import__("pathlib").Path(__file__).parent)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(skip)

