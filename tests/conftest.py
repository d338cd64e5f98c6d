"""Shared test fixtures: deterministic seeding and CUDA gating.

- Every test starts from ``torch.manual_seed(0)`` (autouse fixture).
- ``one_thread``: one intra-op thread for the test (tiny models on a shared 2-core machine are far
  faster single-threaded); a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
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


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="marked gpu: needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
