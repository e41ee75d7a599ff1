"""Counter-based dropout: the keep decision for score (b, h, i, j) is a pure
function of (seed, b, h, i, j), so a backward pass regenerates exactly the
mask its forward used, and every backend draws the same mask.

The hash uses 32-bit words held in int64 with multipliers below 2**31, so no
intermediate product overflows int64; kernels compute the same bits with
wrapping uint32 arithmetic.
"""
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


def keep(seed, counter, p):
    """Bool tensor: True where an element with this int64 ``counter`` is kept
    under dropout probability ``p``."""
    bits = _mix32((counter & _M32) ^ _mix32((counter >> 32) ^ seed_key(seed)))
    return bits >= threshold(p)


def counter(b, h, i, j, H, Lq, Lk):
    """Linear index of score (b, h, i, j) in a (B, H, Lq, Lk) grid, int64."""
    return ((b * H + h) * Lq + i) * Lk + j


def dense_keep_mask(seed, B, H, Lq, Lk, p, device=None):
    """The (B, H, Lq, Lk) keep mask a call with this seed uses (for tests and
    the reference)."""
    ar = lambda n: torch.arange(n, device=device, dtype=torch.int64)
    c = counter(ar(B).view(-1, 1, 1, 1), ar(H).view(1, -1, 1, 1), ar(Lq).view(1, 1, -1, 1),
                ar(Lk).view(1, 1, 1, -1), H, Lq, Lk)
    return keep(seed, c, p)
