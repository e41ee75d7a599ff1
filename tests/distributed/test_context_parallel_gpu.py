"""context_parallel_attention on 2 GPUs over NCCL: each rank's shard of out,
lse and every gradient against the float64 oracle of the whole problem
(cp_cases.py). Skipped without 2 CUDA GPUs (none here: they run where there
are)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import cp_cases  # noqa: E402

from tfk.distributed import spawn  # noqa: E402
from test_context_parallel import _check  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def results():
    return spawn(cp_cases.run_cases, 2, cp_cases.gpu_cases(), timeout=300, backend="nccl")


@pytest.mark.parametrize("case", cp_cases.gpu_cases(), ids=cp_cases.case_id)
def test_gpu_two_ranks(results, case):
    _check(results, case)
