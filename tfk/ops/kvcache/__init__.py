"""KV-cache decoding (``attention_with_kvcache``), family "kvcache": a float64
reference backend, a torch backend (the CPU default) and a Triton split-KV
kernel (the CUDA default), with a CUDA C++ backend where cuda_backend.py is
present."""
import importlib.util

from .api import attention_with_kvcache  # noqa: F401
from .call import SPLIT_KV_MAX_LQ, KVCacheBackend, KVCacheCall, band_of, key_range, num_splits  # noqa: F401
from .reference import kvcache_reference  # noqa: F401
from . import triton_backend  # noqa: F401,E402  (registers backend "triton")

# The CUDA C++ backend lives in its own module (another change): registered when present.
if importlib.util.find_spec(__name__ + ".cuda_backend") is not None:
    from . import cuda_backend  # noqa: F401

__all__ = ["attention_with_kvcache"]
