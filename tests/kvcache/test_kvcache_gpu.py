"""KV-cache decoding on a GPU: backends "triton" and "cuda" (split-KV, and
the attention engine beyond it) against the float64 oracle in fp16 and bf16.
Skipped without a CUDA GPU (none here: they run where one is)."""
import pytest
import torch

from kvcache_cases import check_case
from test_kvcache_attention import BAND_CASES, TORCH_CASES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CASES = {**BAND_CASES, **TORCH_CASES}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("name", list(CASES))
def test_gpu_backend_matches_oracle(name, backend, dtype):
    check_case(CASES[name], dtype, backend, device="cuda")
