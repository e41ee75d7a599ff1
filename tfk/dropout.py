"""Counter-based dropout: the keep decision for score (b, h, i, j) is a pure
function of (seed, b, h, i, j), so a backward pass regenerates exactly the
mask its forward used, and every backend draws the same mask.

The bits are a 32-bit hash chain: a per-row word from (seed, b * H + h, i),
then one mix per element with j, which keeps the per-element cost in a
kernel to a handful of uint32 operations. Words are held in int64 here with
multipliers below 2**31, so no product overflows; kernels compute the same
bits with wrapping uint32 arithmetic.
"""
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF
_C1 = 0x7FEB352D
_C2 = 0x2C1B3C6D


def _mix32(x):
    """A 32-bit integer finaliser; works on Python ints and int64 tensors."""
    x = x ^ (x >> 16)
    x = (x * _C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _C2) & _M32
    return x ^ (x >> 16)


def draw_seed(generator=None):
    """A fresh 63-bit seed from torch's (CPU) generator, so ``torch.manual_seed``
    makes dropout reproducible."""
    return int(torch.randint(0, 2**62, (), generator=generator))


def seed_key(seed):
    """The 32-bit hash key of a 64-bit seed (kernels take it precomputed)."""
    return _mix32((seed & _M32) ^ _mix32(seed >> 32))


def threshold(p):
    """Bits below this are dropped: P(drop) = p."""
    return int(p * 2**32)


def kernel_args(seed, p):
    """(key, threshold, scale): what the kernels take for dropout probability
    ``p`` with this seed; threshold 0 means no dropout."""
    return seed_key(seed), threshold(p), 1.0 / (1.0 - p)


@dataclass(frozen=True)
class Window:
    """Where a call's scores sit in a larger call's score grid, so that the
    call draws that call's keep mask: its head h is head ``head_offset + h``
    of ``heads`` (None: the call's own H), its query i and key j are
    positions ``q_offset + i`` and ``k_offset + j``. Context parallelism
    computes one call in pieces on several devices; each piece draws its
    part of the one mask."""
    head_offset: int = 0
    heads: int | None = None
    q_offset: int = 0
    k_offset: int = 0


WHOLE = Window()


def keep(seed, b, h, i, j, H, p, window=WHOLE):
    """Bool tensor, broadcast over int64 tensors b, h, i, j (positions in a
    (B, H, Lq, Lk) score grid, or in ``window`` of a larger one): True where
    the score is kept under dropout probability ``p``."""
    if window is not WHOLE:
        h, i, j = h + window.head_offset, i + window.q_offset, j + window.k_offset
        H = window.heads or H
    row = _mix32(i ^ _mix32((b * H + h) ^ seed_key(seed)))
    return _mix32(j ^ row) >= threshold(p)


def dense_keep_mask(seed, B, H, Lq, Lk, p, device=None):
    """The (B, H, Lq, Lk) keep mask a call with this seed uses (for tests and
    the reference)."""
    ar = lambda n: torch.arange(n, device=device, dtype=torch.int64)
    return keep(seed, ar(B).view(-1, 1, 1, 1), ar(H).view(1, -1, 1, 1), ar(Lq).view(1, 1, -1, 1),
                ar(Lk).view(1, 1, 1, -1), H, p)
