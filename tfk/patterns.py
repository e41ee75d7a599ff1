"""Attention patterns: which keys each query may attend to.

A pattern has a token-level meaning, ``mask(h, i, j, lq, lk) -> bool``: query
``i`` of head ``h`` may attend to key ``j``. ``dense_mask`` materialises it and
is the oracle every test compares with.

For speed a pattern also describes *regions*: disjoint pieces whose union is
the pattern, each with a token layout (a permutation or subset of positions)
in which the piece is dense in blocks. ``tfk.plan`` turns regions into block
schedules; sub-passes over regions merge exactly by log-sum-exp.

Patterns are immutable and compose with ``|`` (union) and ``&``
(intersection).
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = [
    "Pattern", "causal", "sliding_window", "global_tokens", "strided", "fixed",
    "bigbird", "block_layout",
]


# ----------------------------------------------------------------------------
# Layouts: the order (and subset) of token positions a sub-pass works in.
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """Positions in their natural order."""

    def indices(self, length, device):
        return torch.arange(length, device=device)


@dataclass(frozen=True)
class ResidueMajor:
    """Positions grouped by residue mod ``d``: 0, d, 2d, ..., 1, d+1, ...

    Makes a dilated or strided pattern contiguous (as NATTEN does on Hopper).
    """
    d: int

    def indices(self, length, device):
        pos = torch.arange(length, device=device)
        return pos[torch.argsort(pos % self.d * length + pos)]


@dataclass(frozen=True)
class Subset:
    """A sorted subset of positions chosen by a membership predicate."""
    member: Callable = None  # member(pos) -> bool tensor
    key: tuple = ()

    def indices(self, length, device):
        pos = torch.arange(length, device=device)
        return pos[self.member(pos)]

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, Subset) and self.key == other.key


@dataclass(frozen=True)
class Region:
    """One disjoint piece of a pattern and the layouts it is dense in."""
    q_layout: object
    kv_layout: object
    mask: Callable  # mask(h, i, j, lq, lk) on original positions


IDENTITY = Identity()


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _tensor_key(t):
    return (tuple(t.shape), str(t.dtype), hashlib.sha1(t.cpu().numpy().tobytes()).hexdigest())


# ----------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------

class Pattern:
    """Base of every pattern. Subclasses define ``mask`` and ``key``;
    ``regions`` defaults to the whole pattern in natural order."""

    heads = None  # None: the same for every head; int: per-head pattern

    def mask(self, h, i, j, lq, lk):
        """Bool tensor, broadcast over int64 tensors ``h``, ``i``, ``j``."""
        raise NotImplementedError

    @property
    def key(self):
        """Hashable identity used to cache plans."""
        raise NotImplementedError

    def regions(self):
        return [Region(IDENTITY, IDENTITY, self.mask)]

    def dense_mask(self, Lq, Lk, device=None):
        """The bool mask this pattern means: (Lq, Lk), or (heads, Lq, Lk) for a
        per-head pattern. True where query i may attend to key j."""
        _check_int("Lq", Lq, 0)
        _check_int("Lk", Lk, 0)
        self.check_lengths(Lq, Lk)
        i = torch.arange(Lq, device=device).view(-1, 1)
        j = torch.arange(Lk, device=device).view(1, -1)
        if self.heads is None:
            return self.mask(0, i, j, Lq, Lk).expand(Lq, Lk).clone()
        h = torch.arange(self.heads, device=device).view(-1, 1, 1)
        return self.mask(h, i, j, Lq, Lk).expand(self.heads, Lq, Lk).clone()

    def check_lengths(self, lq, lk):
        """Raise ValueError when the pattern cannot apply to these lengths."""

    def __or__(self, other):
        return Union(self, _as_pattern(other))

    def __and__(self, other):
        return Intersection(self, _as_pattern(other))

    def __eq__(self, other):
        return isinstance(other, Pattern) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def _as_pattern(p):
    if not isinstance(p, Pattern):
        raise TypeError(f"patterns compose only with patterns, got {type(p).__name__}")
    return p


def _combine_heads(a, b):
    if a.heads is None or b.heads in (None, a.heads):
        return b.heads if a.heads is None else a.heads
    if a.heads == 1 or b.heads == 1:
        return max(a.heads, b.heads)
    raise ValueError(f"cannot compose per-head patterns with {a.heads} and {b.heads} heads")


class Union(Pattern):
    def __init__(self, a, b):
        self.a, self.b = a, b
        self.heads = _combine_heads(a, b)

    def mask(self, h, i, j, lq, lk):
        return self.a.mask(h, i, j, lq, lk) | self.b.mask(h, i, j, lq, lk)

    @property
    def key(self):
        return ("union", self.a.key, self.b.key)

    def check_lengths(self, lq, lk):
        self.a.check_lengths(lq, lk)
        self.b.check_lengths(lq, lk)

    def regions(self):
        # b's regions lose what a already covers, so the pieces stay disjoint.
        a_mask = self.a.mask
        return self.a.regions() + [
            Region(r.q_layout, r.kv_layout,
                   lambda h, i, j, lq, lk, m=r.mask: m(h, i, j, lq, lk) & ~a_mask(h, i, j, lq, lk))
            for r in self.b.regions()
        ]

    def __repr__(self):
        return f"({self.a!r} | {self.b!r})"


class Intersection(Pattern):
    def __init__(self, a, b):
        self.a, self.b = a, b
        self.heads = _combine_heads(a, b)

    def mask(self, h, i, j, lq, lk):
        return self.a.mask(h, i, j, lq, lk) & self.b.mask(h, i, j, lq, lk)

    @property
    def key(self):
        return ("intersection", self.a.key, self.b.key)

    def check_lengths(self, lq, lk):
        self.a.check_lengths(lq, lk)
        self.b.check_lengths(lq, lk)

    def regions(self):
        b_mask = self.b.mask
        return [
            Region(r.q_layout, r.kv_layout,
                   lambda h, i, j, lq, lk, m=r.mask: m(h, i, j, lq, lk) & b_mask(h, i, j, lq, lk))
            for r in self.a.regions()
        ]

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


# ----------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------

class Dense(Pattern):
    """Every key for every query: what ``pattern=None`` means."""

    def mask(self, h, i, j, lq, lk):
        return torch.ones((), dtype=torch.bool, device=j.device)

    @property
    def key(self):
        return ("dense",)

    def __repr__(self):
        return "dense"


DENSE = Dense()


class Causal(Pattern):
    def __init__(self, bottom_right=False):
        self.bottom_right = bool(bottom_right)

    def mask(self, h, i, j, lq, lk):
        shift = lk - lq if self.bottom_right else 0
        return j <= i + shift

    @property
    def key(self):
        return ("causal", self.bottom_right)

    def __repr__(self):
        return f"causal(bottom_right={self.bottom_right})"


def causal(bottom_right=False):
    """Query i attends to keys j <= i (top-left aligned, as torch SDPA's
    ``is_causal``). ``bottom_right=True`` aligns the last query with the last
    key instead (j <= i + Lk - Lq), as for decoding with a KV cache."""
    return Causal(bottom_right)


class SlidingWindow(Pattern):
    def __init__(self, left, right, dilation):
        self.left = _check_int("sliding_window: left", left, 0)
        self.right = _check_int("sliding_window: right", right, 0)
        self.dilation = _check_int("sliding_window: dilation", dilation, 1)

    def mask(self, h, i, j, lq, lk):
        d = i - j
        m = (d <= self.left) & (d >= -self.right)
        return m & (d % self.dilation == 0) if self.dilation > 1 else m

    @property
    def key(self):
        return ("window", self.left, self.right, self.dilation)

    def regions(self):
        if self.dilation == 1:
            return super().regions()
        layout = ResidueMajor(self.dilation)
        return [Region(layout, layout, self.mask)]

    def __repr__(self):
        return f"sliding_window({self.left}, {self.right}, dilation={self.dilation})"


def sliding_window(left, right=0, dilation=1):
    """Key j is allowed for query i when -right <= i - j <= left and
    (i - j) % dilation == 0. ``sliding_window(w)`` is a causal local window
    of w keys behind each query (plus the query's own position)."""
    return SlidingWindow(left, right, dilation)


class GlobalTokens(Pattern):
    def __init__(self, indices):
        if isinstance(indices, int) and not isinstance(indices, bool):
            _check_int("global_tokens: n", indices, 0)
            self.count, self.table = indices, None
        else:
            idx = torch.as_tensor(indices)
            if idx.dim() != 1 or idx.dtype in (torch.bool,) or idx.is_floating_point():
                raise ValueError("global_tokens: indices must be an int or a 1-D integer tensor, "
                                 f"got {idx.dtype} of shape {tuple(idx.shape)}")
            if idx.numel() and int(idx.min()) < 0:
                raise ValueError("global_tokens: indices must be >= 0")
            idx = idx.to(torch.int64).cpu()
            table = torch.zeros(int(idx.max()) + 1 if idx.numel() else 0, dtype=torch.bool)
            table[idx] = True
            self.count, self.table = None, table
        self._tables = {}

    def member(self, pos):
        """Bool tensor: is position ``pos`` a global token."""
        if self.table is None:
            return pos < self.count
        if self.table.numel() == 0:
            return torch.zeros_like(pos, dtype=torch.bool)
        table = self._tables.get(pos.device)
        if table is None:
            table = self._tables[pos.device] = self.table.to(pos.device)
        inside = pos < table.numel()
        return inside & table[pos.clamp(max=table.numel() - 1)]

    def mask(self, h, i, j, lq, lk):
        return self.member(i) | self.member(j)

    @property
    def key(self):
        return ("global", self.count if self.table is None else _tensor_key(self.table))

    def regions(self):
        glob = Subset(self.member, ("global", self.key))
        member = self.member
        return [
            # every query sees the global keys ...
            Region(IDENTITY, glob, lambda h, i, j, lq, lk: member(j)),
            # ... and global queries see every other key.
            Region(glob, IDENTITY, lambda h, i, j, lq, lk: member(i) & ~member(j)),
        ]

    def __repr__(self):
        n = self.count if self.table is None else int(self.table.sum())
        return f"global_tokens({n} tokens)"


def global_tokens(indices):
    """Global tokens as in Longformer, symmetric: global queries see every
    key and every query sees the global keys. ``indices`` is a 1-D index
    tensor, or an int n meaning the first n positions. Positions past a
    sequence's length do not occur in it."""
    return GlobalTokens(indices)


class Strided(Pattern):
    def __init__(self, stride):
        self.stride = _check_int("strided: stride", stride, 1)

    def mask(self, h, i, j, lq, lk):
        d = i - j
        return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))

    @property
    def key(self):
        return ("strided", self.stride)

    def regions(self):
        s = self.stride
        if s == 1:
            return super().regions()
        layout = ResidueMajor(s)
        return [
            # the local band: contiguous in natural order
            Region(IDENTITY, IDENTITY, lambda h, i, j, lq, lk: (i - j >= 0) & (i - j < s)),
            # the strided columns: contiguous when grouped by residue
            Region(layout, layout, lambda h, i, j, lq, lk: (i - j >= s) & ((i - j) % s == 0)),
        ]

    def __repr__(self):
        return f"strided({self.stride})"


def strided(stride):
    """Strided attention (Child et al. 2019): key j is allowed for query i when
    j <= i and (i - j < stride or (i - j) % stride == 0)."""
    return Strided(stride)


class Fixed(Pattern):
    def __init__(self, block, summary):
        self.block = _check_int("fixed: block", block, 1)
        self.summary = _check_int("fixed: summary", summary, 1)
        if summary > block:
            raise ValueError(f"fixed: summary ({summary}) must be <= block ({block})")

    def is_summary(self, j):
        return j % self.block >= self.block - self.summary

    def mask(self, h, i, j, lq, lk):
        b = self.block
        return (j <= i) & ((j // b == i // b) | self.is_summary(j))

    @property
    def key(self):
        return ("fixed", self.block, self.summary)

    def regions(self):
        b = self.block
        summary_cols = Subset(self.is_summary, ("fixed-summary", b, self.summary))
        return [
            Region(IDENTITY, IDENTITY, lambda h, i, j, lq, lk: (j <= i) & (j // b == i // b)),
            # summary columns of earlier blocks, gathered next to each other
            Region(IDENTITY, summary_cols, lambda h, i, j, lq, lk: (j // b < i // b) & self.is_summary(j)),
        ]

    def __repr__(self):
        return f"fixed({self.block}, {self.summary})"


def fixed(block, summary):
    """Fixed attention (Child et al. 2019): key j is allowed for query i when
    j <= i and (j // block == i // block or j % block >= block - summary)."""
    return Fixed(block, summary)


class BlockPattern(Pattern):
    """A pattern given by a bool block layout (heads or 1, nqb, nkb)."""
    block = None

    def block_layout(self, lq, lk):
        raise NotImplementedError

    def mask(self, h, i, j, lq, lk):
        layout = self.block_layout(lq, lk).to(i.device if torch.is_tensor(i) else "cpu")
        if not torch.is_tensor(h):
            h = torch.zeros((), dtype=torch.int64, device=layout.device)
        h = h if layout.shape[0] > 1 else torch.zeros_like(h)
        return layout[h, i // self.block, j // self.block]


class BlockLayout(BlockPattern):
    def __init__(self, layout, block):
        self.block = _check_int("block_layout: block", block, 1)
        layout = torch.as_tensor(layout)
        if layout.dtype != torch.bool:
            raise ValueError(f"block_layout: layout must be a bool tensor, got {layout.dtype}")
        if layout.dim() == 2:
            layout = layout.unsqueeze(0)
        if layout.dim() != 3:
            raise ValueError("block_layout: layout must be (heads or 1, ceil(Lq/block), ceil(Lk/block)), "
                             f"got shape {tuple(layout.shape)}")
        self.layout = layout.cpu()
        self.heads = layout.shape[0] if layout.shape[0] > 1 else None
        self._key = ("block_layout", self.block, _tensor_key(self.layout))

    def check_lengths(self, lq, lk):
        want = (math.ceil(lq / self.block), math.ceil(lk / self.block))
        if tuple(self.layout.shape[1:]) != want:
            raise ValueError(
                f"block_layout: layout has shape {tuple(self.layout.shape)}, expected "
                f"(heads or 1, ceil(Lq/block)={want[0]}, ceil(Lk/block)={want[1]}) "
                f"for Lq={lq}, Lk={lk}, block={self.block}")

    def block_layout(self, lq, lk):
        self.check_lengths(lq, lk)
        return self.layout

    @property
    def key(self):
        return self._key

    def __repr__(self):
        return f"block_layout({tuple(self.layout.shape)}, block={self.block})"


def block_layout(layout, block):
    """A user block layout: ``layout`` is a bool tensor shaped
    (heads or 1, ceil(Lq/block), ceil(Lk/block)); key j is allowed for query i
    of head h when ``layout[h, i // block, j // block]``."""
    return BlockLayout(layout, block)


class BigBird(BlockPattern):
    def __init__(self, block, window_blocks, global_blocks, random_blocks, seed=0):
        self.block = _check_int("bigbird: block", block, 1)
        self.window_blocks = _check_int("bigbird: window_blocks", window_blocks, 0)
        if window_blocks % 2 == 0 and window_blocks > 0:
            raise ValueError(f"bigbird: window_blocks must be odd (the query's block and as many "
                             f"on each side), got {window_blocks}")
        self.global_blocks = _check_int("bigbird: global_blocks", global_blocks, 0)
        self.random_blocks = _check_int("bigbird: random_blocks", random_blocks, 0)
        self.seed = int(seed)
        self._layouts = {}

    def block_layout(self, lq, lk):
        layout = self._layouts.get((lq, lk))
        if layout is None:
            layout = self._layouts[(lq, lk)] = self._make_layout(lq, lk)
        return layout

    def _make_layout(self, lq, lk):
        nq, nk = math.ceil(lq / self.block), math.ceil(lk / self.block)
        qb = torch.arange(nq).view(-1, 1)
        kb = torch.arange(nk).view(1, -1)
        half = self.window_blocks // 2
        fixed_part = ((qb - kb).abs() <= half) if self.window_blocks else torch.zeros(nq, nk, dtype=torch.bool)
        g = self.global_blocks
        fixed_part = fixed_part | (qb < g) | (kb < g)
        layout = fixed_part.clone()
        # Python's RNG, not torch's: the layout may first be built inside a
        # traced or vmapped mask function, where torch's random ops are refused.
        rng = random.Random(self.seed)
        for row in range(g, nq):
            # random key blocks among those the window and globals leave out
            free = (~fixed_part[row]).nonzero().flatten().tolist()
            layout[row, rng.sample(free, min(self.random_blocks, len(free)))] = True
        return layout.unsqueeze(0)

    @property
    def key(self):
        return ("bigbird", self.block, self.window_blocks, self.global_blocks, self.random_blocks, self.seed)

    def __repr__(self):
        return (f"bigbird(block={self.block}, window_blocks={self.window_blocks}, "
                f"global_blocks={self.global_blocks}, random_blocks={self.random_blocks}, seed={self.seed})")


def bigbird(block, window_blocks, global_blocks, random_blocks, seed=0):
    """BigBird (Zaheer et al. 2020) at block granularity: query block qb sees
    key block kb when |qb - kb| <= window_blocks // 2 (window_blocks odd), when
    either is among the first ``global_blocks`` blocks, or when kb is one of
    ``random_blocks`` blocks drawn for qb (from ``seed``, among the blocks the
    window and globals leave out; the same for every head)."""
    return BigBird(block, window_blocks, global_blocks, random_blocks, seed)
