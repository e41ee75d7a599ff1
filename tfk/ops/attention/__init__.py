"""Attention: the public functions, the reference and the backends."""
from ...backends import _BACKENDS
from .api import SHIPPED_BACKENDS, attention, scaled_dot_product_attention, torch_sdpa  # noqa: F401
from .reference import attention_reference  # noqa: F401
from .varlen import attention_varlen  # noqa: F401
from . import cuda_backend, sdpa_backend, torch_blocks, triton_backend  # noqa: F401  (register the backends)

SHIPPED_BACKENDS.update(_BACKENDS)  # every built-in backend is registered by now
