"""tfk: Triton and CUDA kernels for the Transformer attention family and
Mixture-of-Experts dispatch, each checked against a reference.

    import tfk
    out = tfk.scaled_dot_product_attention(q, k, v, is_causal=True)
    out = tfk.attention(q, k, v, tfk.patterns.sliding_window(256) | tfk.patterns.global_tokens(4))
"""
from . import patterns  # noqa: F401
from .backends import BackendUnavailable, FallbackWarning, backend_names  # noqa: F401
from .ops.attention import attention, scaled_dot_product_attention  # noqa: F401
from .patch import patch_torch  # noqa: F401
from .plan import get_plan  # noqa: F401

from .integrations.transformers import register_when_imported as _register_when_imported

_register_when_imported()  # attn_implementation="tfk", without importing transformers

__version__ = "0.1.0"

__all__ = ["attention", "scaled_dot_product_attention", "patterns", "patch_torch", "backend_names",
           "BackendUnavailable", "FallbackWarning", "get_plan"]
