"""Attention: the public functions, the reference and the torch backend."""
from .api import attention, scaled_dot_product_attention, torch_sdpa  # noqa: F401
from .reference import attention_reference  # noqa: F401
from . import torch_blocks  # noqa: F401  (registers backend "torch")
