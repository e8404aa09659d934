"""Test set-up shared by every suite.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; the variable
must be set before triton is first imported, hence here at import time.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerances per dtype, in one place: (atol, rtol) for values and for gradients.
TOLERANCES = {
    torch.float32: {"out": (2e-4, 2e-4), "grad": (1e-3, 1e-3)},
    torch.float16: {"out": (2e-3, 2e-3), "grad": (1e-2, 1e-2)},
    torch.bfloat16: {"out": (1.6e-2, 1.6e-2), "grad": (5e-2, 5e-2)},
}


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
