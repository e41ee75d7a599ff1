"""Shared test set-up: NaN-poisoned outputs, the long tier, helpers."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.
# It must be set before any @triton.jit function is defined (before tfk).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tfk import backends  # noqa: E402

# One intra-op thread: the test shapes are small, and on a 2-core machine
# shared with other work an OpenMP region waits for a descheduled thread
# (measured: a (33, 24) index_add took 118 ms on 2 threads under load, 13 us
# on one). TFK_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TFK_TEST_THREADS", "1")))

LONG = os.environ.get("TFK_LONG_TESTS") == "1"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # Every backend output starts as NaN: an unwritten element fails.
    monkeypatch.setattr(backends, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def _backend_exists(request):
    # A test parametrised by backend skips only where that backend cannot
    # exist on this machine, and fails where it should exist but does not.
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and "backend" in callspec.params:
        from helpers import require_backend
        require_backend(callspec.params["backend"])


def pytest_collection_modifyitems(config, items):
    # The long tier is deselected, not skipped, unless TFK_LONG_TESTS=1.
    if LONG:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("slow") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
