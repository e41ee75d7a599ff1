"""LSH attention (Reformer): a float64 reference backend and a torch backend (the
CPU default) of the "lsh" family; the kernel backends will plug in there."""
from .api import (LshBackend, LshCall, default_n_buckets, dense_keep, draw_rotations, hash_buckets,  # noqa: F401
                  lsh_attention, sorted_order)
from .reference import lsh_attention_reference, window_counts  # noqa: F401

__all__ = ["lsh_attention"]
