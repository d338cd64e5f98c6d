"""Shared test fixtures: deterministic seeding and CUDA gating.

- Every test starts from ``torch.manual_seed(0)`` (autouse fixture).
- ``requires_cuda`` is a skip marker for tests that need a GPU; tests marked ``@pytest.mark.gpu``
  are skipped the same way when CUDA is unavailable (so CPU CI skips them cleanly).
"""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
