"""The call the KV-cache backends take (family "kvcache"), and what they share:
the key band a pattern reads at absolute positions and the split-KV count."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...backends import Backend
from ...patterns import Causal, Dense, Pattern, SlidingWindow

# Split-KV kernels take at most this many query rows per sequence (Lq).
SPLIT_KV_MAX_LQ = 16


@dataclass
class KVCacheCall:
    """A validated ``tfk.attention_with_kvcache`` call, after the in-place append.

    q: (B, H, Lq, D). k_cache, v_cache: contiguous (B, Hkv, Lmax, D / Dv), or
    paged (num_blocks, Hkv, page, D / Dv) with ``block_table`` int32
    (B, max_pages): cache position j of sequence b is row j % page of block
    block_table[b, j // page]. cache_seqlens: int32 (B,) on q's device.
    Sequence b's query t is at absolute position cache_seqlens[b] + t, and it
    reads cache positions j < cache_seqlens[b] + Lq allowed by ``pattern`` at
    absolute positions: pattern.mask(h, cache_seqlens[b] + t, j, n, n) with
    n = cache_seqlens[b] + Lq (causal when the caller passed None).
    ``band``: when the pattern is a band of diagonals, (left, right) with
    None for an unbounded side: key j is allowed for a query at p when
    p - left <= j <= p + right (and j < n); else None.
    ``max_seqlen``: int(cache_seqlens.max()), read once on the host while the
    call was validated (0 for B = 0): backends size their launches by it
    without another device sync.
    """
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor
    block_table: torch.Tensor | None
    pattern: Pattern
    band: tuple | None
    scale: float
    return_lse: bool
    max_seqlen: int = 0

    @property
    def paged(self):
        return self.block_table is not None


class KVCacheBackend(Backend):
    """A backend of the "kvcache" family: ``run(call)`` returns (out (B, H, Lq,
    Dv) in q's dtype, lse (B, H, Lq) float32, float64 for float64 inputs).
    Forward only."""
    family = "kvcache"

    def reasons(self, call: KVCacheCall) -> list[str]:
        return []

    def run(self, call: KVCacheCall):
        raise NotImplementedError


def band_of(pattern: Pattern):
    """(left, right) of a pattern that is one band of diagonals at absolute
    positions (None for an unbounded side), or None for any other pattern."""
    if isinstance(pattern, Causal):      # at absolute positions both alignments are j <= p
        return (None, 0)
    if isinstance(pattern, Dense):
        return (None, None)
    if isinstance(pattern, SlidingWindow) and pattern.dilation == 1:
        return (pattern.left, pattern.right)
    return None


def key_range(seqlen, lq, band):
    """[lo, hi): the cache positions any of a sequence's ``lq`` queries may
    read, with ``seqlen`` keys before them (ints, or int tensors of seqlens).
    hi is always seqlen + lq: no key past the last query is written."""
    left = band[0]
    hi = seqlen + lq
    if left is None:
        return seqlen * 0, hi
    lo = seqlen - left
    return (lo.clamp(min=0) if isinstance(lo, torch.Tensor) else max(lo, 0)), hi


def num_splits(batch_heads, max_keys, block_n, programs=264):
    """How many programs split one (batch, key head)'s cache: enough programs
    to fill ``programs`` (2 per SM of an H100), no split under 4 key blocks."""
    if batch_heads >= programs:
        return 1
    most = max(1, math.ceil(max_keys / (4 * block_n)))
    return max(1, min(most, math.ceil(programs / max(batch_heads, 1))))
