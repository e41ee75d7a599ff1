"""LSH attention (Reformer): a float64 reference backend, a torch backend (the
CPU default) and the fused-attention engine's kernels (kernel_backends.py) of
the "lsh" family."""
from .api import (LshBackend, LshCall, default_n_buckets, dense_keep, draw_rotations, hash_buckets,  # noqa: F401
                  lsh_attention, sorted_order)
from .reference import lsh_attention_reference, window_counts  # noqa: F401
from . import kernel_backends  # noqa: F401,E402  (registers the kernel backends)

__all__ = ["lsh_attention"]
