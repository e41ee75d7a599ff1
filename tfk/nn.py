"""``tfk.nn``: modules built on tfk's ops."""
from .ops.linear import LinearAttention  # noqa: F401

__all__ = ["LinearAttention"]
