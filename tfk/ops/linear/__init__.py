"""Linear attention (causal chunked, non-causal, Efficient Attention's softmax
maps), with state carry-over: a float64 reference backend and a torch backend
(the CPU default); the kernel backends plug into the "linear" family."""
from .api import LinearBackend, LinearCall, linear_attention  # noqa: F401
from .reference import feature_maps_reference, linear_attention_reference  # noqa: F401
from .module import LinearAttention  # noqa: F401
from . import kernel_backends  # noqa: F401 (registers backend "triton")
from . import cuda_backend  # noqa: F401 (registers backends "cuda" and "cuda-sim")

__all__ = ["linear_attention", "LinearAttention"]
