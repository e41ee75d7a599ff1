"""Attention patterns: which keys each query may attend to.

A pattern has a token-level meaning, ``mask(h, i, j, lq, lk) -> bool``: query
``i`` of head ``h`` may attend to key ``j``. ``dense_mask`` materialises it and
is the oracle every test compares with.

For speed a pattern also describes *regions*: disjoint pieces whose union is
the pattern, each with a token layout (a permutation or subset of positions)
in which the piece is dense in blocks. ``tfk.plan`` turns regions into block
schedules; sub-passes over regions merge exactly by log-sum-exp. Built-in
patterns also reason about whole tiles (``tile_facts``, see
``tfk.tile_facts``), so plans are built in time and memory proportional to
their tiles rather than to Lq * Lk.

Patterns are immutable and compose with ``|`` (union) and ``&``
(intersection).
"""
from __future__ import annotations

import collections.abc
import hashlib
import math
import random
from dataclasses import dataclass
from typing import Callable

import torch

from . import tile_facts as tf

__all__ = [
    "Pattern", "causal", "sliding_window", "global_tokens", "strided", "fixed",
    "bigbird", "block_layout", "axial", "neighborhood", "local_blocks", "GridTiled",
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
    pattern: "Pattern"  # the piece, on original positions; it only has to be right on the layouts' positions


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
    shift_invariant = False  # True: mask depends on i - j only (given lq, lk)

    def mask(self, h, i, j, lq, lk):
        """Bool tensor, broadcast over int64 tensors ``h``, ``i``, ``j``."""
        raise NotImplementedError

    @property
    def key(self):
        """Hashable identity used to cache plans."""
        raise NotImplementedError

    def tile_facts(self, h, q, k, lq, lk):
        """What is sure of each tile of query blocks ``q`` against key blocks
        ``k`` (``tfk.tile_facts.Blocks`` of original positions; ``h`` the
        tiles' heads): a ``TileFacts``, or None when the pattern cannot reason
        about blocks (plans then evaluate its mask on every pair)."""
        return None

    def tile_kind(self, h, q, k, lq, lk):
        """Columns (int64 tensors over the tiles) such that tiles whose blocks
        have the same shapes (positions less lo, in order) and whose columns
        agree have the same mask. Plans evaluate one tile of each kind. None:
        every tile is its own kind."""
        return [q.lo - k.lo] if self.shift_invariant else None

    def regions(self):
        return [Region(IDENTITY, IDENTITY, self)]

    def plan(self, lq, lk, block_q, block_k, device):
        """The plan of a pattern that builds its own (packed sequences), or
        None: ``tfk.plan.compile_plan`` compiles it."""
        return None

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

    def tile_facts(self, h, q, k, lq, lk):
        return _compose(self.a.tile_facts(h, q, k, lq, lk), self.b.tile_facts(h, q, k, lq, lk), "|")

    def tile_kind(self, h, q, k, lq, lk):
        return _composed_kind((self.a, self.b), h, q, k, lq, lk)

    def regions(self):
        # b's regions lose what a already covers, so the pieces stay disjoint.
        return self.a.regions() + [
            Region(r.q_layout, r.kv_layout, Intersection(r.pattern, _Not(self.a))) for r in self.b.regions()
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

    def tile_facts(self, h, q, k, lq, lk):
        return _compose(self.a.tile_facts(h, q, k, lq, lk), self.b.tile_facts(h, q, k, lq, lk), "&")

    def tile_kind(self, h, q, k, lq, lk):
        return _composed_kind((self.a, self.b), h, q, k, lq, lk)

    def regions(self):
        return [Region(r.q_layout, r.kv_layout, Intersection(r.pattern, self.b)) for r in self.a.regions()]

    def __repr__(self):
        return f"({self.a!r} & {self.b!r})"


def _compose(fa, fb, op):
    if fa is None or fb is None:
        return None
    return fa | fb if op == "|" else fa & fb


def _composed_kind(parts, h, q, k, lq, lk):
    cols = []
    for part in parts:
        facts, kind = part.tile_facts(h, q, k, lq, lk), part.tile_kind(h, q, k, lq, lk)
        if facts is None or kind is None:
            return None
        # a part sure to be full or empty on a tile is alike on all such tiles
        state = facts.full.long() + 2 * facts.none.long()
        cols += [state] + [c * (state == 0) for c in kind]
    return cols


class _Not(Pattern):
    """The pairs a pattern does not allow: the pieces of a union use it."""

    def __init__(self, a):
        self.a = a
        self.heads = a.heads

    def mask(self, h, i, j, lq, lk):
        return ~self.a.mask(h, i, j, lq, lk)

    def tile_facts(self, h, q, k, lq, lk):
        f = self.a.tile_facts(h, q, k, lq, lk)
        return None if f is None else ~f

    def tile_kind(self, h, q, k, lq, lk):
        return self.a.tile_kind(h, q, k, lq, lk)

    @property
    def key(self):
        return ("not", self.a.key)


class _Diagonals(Pattern):
    """lo <= i - j <= hi (None: unbounded) and (i - j) % modulus == 0: the
    pieces of strided and fixed attention."""
    shift_invariant = True

    def __init__(self, lo=None, hi=None, modulus=1):
        self.lo, self.hi, self.modulus = lo, hi, modulus

    def mask(self, h, i, j, lq, lk):
        d = i - j
        m = torch.ones((), dtype=torch.bool, device=d.device)
        if self.lo is not None:
            m = m & (d >= self.lo)
        if self.hi is not None:
            m = m & (d <= self.hi)
        return m & (d % self.modulus == 0) if self.modulus > 1 else m

    def tile_facts(self, h, q, k, lq, lk):
        lo = -tf.UNBOUNDED if self.lo is None else self.lo
        hi = tf.UNBOUNDED if self.hi is None else self.hi
        return tf.diagonals(q, k, lo, hi, self.modulus)

    @property
    def key(self):
        return ("diagonals", self.lo, self.hi, self.modulus)


# ----------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------

class Dense(Pattern):
    """Every key for every query: what ``pattern=None`` means."""
    shift_invariant = True

    def mask(self, h, i, j, lq, lk):
        return torch.ones((), dtype=torch.bool, device=j.device)

    def tile_facts(self, h, q, k, lq, lk):
        yes = torch.ones_like(q.lo, dtype=torch.bool)
        return tf.TileFacts(yes, ~yes, yes, ~yes)

    def tile_kind(self, h, q, k, lq, lk):
        return []

    @property
    def key(self):
        return ("dense",)

    def __repr__(self):
        return "dense"


DENSE = Dense()


class Causal(Pattern):
    shift_invariant = True

    def __init__(self, bottom_right=False):
        self.bottom_right = bool(bottom_right)

    def mask(self, h, i, j, lq, lk):
        shift = lk - lq if self.bottom_right else 0
        return j <= i + shift

    def tile_facts(self, h, q, k, lq, lk):
        return tf.diagonals(q, k, lo=-(lk - lq if self.bottom_right else 0))

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
    shift_invariant = True

    def __init__(self, left, right, dilation):
        self.left = _check_int("sliding_window: left", left, 0)
        self.right = _check_int("sliding_window: right", right, 0)
        self.dilation = _check_int("sliding_window: dilation", dilation, 1)

    def mask(self, h, i, j, lq, lk):
        d = i - j
        m = (d <= self.left) & (d >= -self.right)
        return m & (d % self.dilation == 0) if self.dilation > 1 else m

    def tile_facts(self, h, q, k, lq, lk):
        return tf.diagonals(q, k, -self.right, self.left, self.dilation)

    @property
    def key(self):
        return ("window", self.left, self.right, self.dilation)

    def regions(self):
        if self.dilation == 1:
            return super().regions()
        layout = ResidueMajor(self.dilation)
        return [Region(layout, layout, self)]

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
        self._prefix = {}

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

    def member_facts(self, blocks):
        """Facts of member(position) over ``blocks``."""
        lo, hi = blocks.lo, blocks.hi
        if self.table is None:
            return tf.one_side(blocks, hi < self.count, lo >= self.count, lo < self.count, hi < self.count)
        prefix = self._prefix.get(lo.device)
        if prefix is None:
            prefix = self._prefix[lo.device] = torch.cat(
                [torch.zeros(1, dtype=torch.int64), self.table.cumsum(0)]).to(lo.device)
        n = self.table.numel()
        inside = prefix[(hi + 1).clamp(max=n)] - prefix[lo.clamp(max=n)]
        return tf.one_side(blocks, inside == hi - lo + 1, inside == 0, self.member(lo), self.member(hi))

    def tile_facts(self, h, q, k, lq, lk):
        return self.member_facts(q) | self.member_facts(k)

    def side_kind(self, blocks):
        """Alike for blocks of no or only global tokens; else the block itself."""
        f = self.member_facts(blocks)
        return torch.where(f.full, -2, torch.where(f.none, -1, blocks.lo))

    def tile_kind(self, h, q, k, lq, lk):
        return [self.side_kind(q), self.side_kind(k)]

    @property
    def key(self):
        return ("global", self.count if self.table is None else _tensor_key(self.table))

    def regions(self):
        glob = Subset(self.member, ("global", self.key))
        return [
            # every query sees the global keys ...
            Region(IDENTITY, glob, DENSE),
            # ... and global queries see every other key.
            Region(glob, IDENTITY, _Not(_GlobalKey(self))),
        ]

    def __repr__(self):
        n = self.count if self.table is None else int(self.table.sum())
        return f"global_tokens({n} tokens)"


class _GlobalKey(Pattern):
    """The key is a global token."""

    def __init__(self, glob):
        self.glob = glob

    def mask(self, h, i, j, lq, lk):
        return self.glob.member(j)

    def tile_facts(self, h, q, k, lq, lk):
        return self.glob.member_facts(k)

    def tile_kind(self, h, q, k, lq, lk):
        return [self.glob.side_kind(k)]

    @property
    def key(self):
        return ("global key", self.glob.key)


def global_tokens(indices):
    """Global tokens as in Longformer, symmetric: global queries see every
    key and every query sees the global keys. ``indices`` is a 1-D index
    tensor, or an int n meaning the first n positions. Positions past a
    sequence's length do not occur in it."""
    return GlobalTokens(indices)


class Strided(Pattern):
    shift_invariant = True

    def __init__(self, stride):
        self.stride = _check_int("strided: stride", stride, 1)

    def mask(self, h, i, j, lq, lk):
        d = i - j
        return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))

    def tile_facts(self, h, q, k, lq, lk):
        s = self.stride
        return tf.diagonals(q, k, lo=0) & (tf.diagonals(q, k, hi=s - 1) | tf.diagonals(q, k, modulus=s))

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
            Region(IDENTITY, IDENTITY, _Diagonals(0, s - 1)),
            # the strided columns: contiguous when grouped by residue
            Region(layout, layout, _Diagonals(s, None, s)),
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

    def tile_facts(self, h, q, k, lq, lk):
        return tf.diagonals(q, k, lo=0) & (self._same_block(q, k) | self._summary(k))

    def tile_kind(self, h, q, k, lq, lk):
        # i - j and i's place in its block settle j's block and residue
        return [q.lo - k.lo, q.lo % self.block]

    def _same_block(self, q, k):
        b = self.block
        return tf.TileFacts(*tf.block_ids(q.lo // b, q.hi // b, k.lo // b, k.hi // b, before=False))

    def _before(self, q, k):
        """Facts of j // block < i // block."""
        b = self.block
        return tf.TileFacts(*tf.block_ids(k.lo // b, k.hi // b, q.lo // b, q.hi // b, before=True))

    def _summary(self, k):
        """Facts of is_summary(j) over key blocks ``k``."""
        b, cut = self.block, self.block - self.summary
        r_lo, r_hi = k.lo % b, k.hi % b
        if self.summary == b:
            yes = torch.ones_like(r_lo, dtype=torch.bool)
            return tf.one_side(k, yes, ~yes, yes, yes)
        # the residues of lo..hi: [r_lo, r_hi], or all of them past a multiple of b
        wraps = (k.hi - k.lo >= b) | (r_lo > r_hi)
        one = k.step % b == 0   # every position of the block has residue r_lo
        full = (r_lo >= cut) & (one | ~wraps)
        none = torch.where(one, r_lo < cut, ~wraps & (r_hi < cut))
        return tf.one_side(k, full, none, r_lo >= cut, r_hi >= cut)

    @property
    def key(self):
        return ("fixed", self.block, self.summary)

    def regions(self):
        b = self.block
        summary_cols = Subset(self.is_summary, ("fixed-summary", b, self.summary))
        return [
            Region(IDENTITY, IDENTITY, _FixedPiece(self, "own block")),
            # summary columns of earlier blocks, gathered next to each other
            Region(IDENTITY, summary_cols, _FixedPiece(self, "summaries before")),
        ]

    def __repr__(self):
        return f"fixed({self.block}, {self.summary})"


class _FixedPiece(Pattern):
    """One of fixed attention's two pieces: the query's own block up to the
    query, or the summary keys of earlier blocks."""

    def __init__(self, fixed, piece):
        self.fixed, self.piece = fixed, piece

    def mask(self, h, i, j, lq, lk):
        b = self.fixed.block
        if self.piece == "own block":
            return (j <= i) & (j // b == i // b)
        return j // b < i // b    # its keys are summaries

    def tile_facts(self, h, q, k, lq, lk):
        f = self.fixed
        if self.piece == "own block":
            return tf.diagonals(q, k, lo=0) & f._same_block(q, k)
        return f._before(q, k)

    def tile_kind(self, h, q, k, lq, lk):
        return self.fixed.tile_kind(h, q, k, lq, lk)

    @property
    def key(self):
        return ("fixed piece", self.piece, self.fixed.key)


def fixed(block, summary):
    """Fixed attention (Child et al. 2019): key j is allowed for query i when
    j <= i and (j // block == i // block or j % block >= block - summary)."""
    return Fixed(block, summary)


def _prefix_counts(layout):
    """``prefix[r, h, c]``: the True entries of ``layout[h, :r, :c]`` (a bool
    (heads, R, C) layout), as (R + 1, heads, C + 1), contiguous."""
    heads, rows, cols = layout.shape
    dtype = torch.int32 if rows * cols < 2 ** 31 else torch.int64
    prefix = torch.zeros(rows + 1, heads, cols + 1, dtype=dtype)
    torch.cumsum(layout.transpose(0, 1), 2, dtype=dtype, out=prefix[1:, :, 1:])
    rows_ = prefix.unbind(0)
    for r in range(1, rows + 1):   # row by row: a running sum across rows is far slower in torch
        rows_[r].add_(rows_[r - 1])
    return prefix


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

    def tile_facts(self, h, q, k, lq, lk):
        layout = self.block_layout(lq, lk)
        cached = getattr(self, "_prefix", None)
        if cached is None or cached[0] != (lq, lk, q.lo.device):
            cached = self._prefix = ((lq, lk, q.lo.device), _prefix_counts(layout).to(q.lo.device),
                                     layout.to(q.lo.device).contiguous())
        _, prefix, layout = cached
        h = h if layout.shape[0] > 1 else torch.zeros_like(h)

        def ids(x):   # the block of each position (positions are >= 0)
            b = self.block
            return x >> (b.bit_length() - 1) if b & (b - 1) == 0 else x // b
        return tf.layout_facts(prefix, layout, h, (ids(q.lo), ids(q.hi)), (ids(k.lo), ids(k.hi)),
                               q.contiguous & k.contiguous)

    def tile_kind(self, h, q, k, lq, lk):
        return [h, q.lo, k.lo]


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


class _Blocks(collections.abc.Sequence):
    """Block ids [start, cut) then [resume, end), ascending, without building
    the list (a row's candidates for BigBird's random blocks)."""

    def __init__(self, start, cut, resume, end):
        self.start, self.first, self.resume = start, cut - start, resume
        self.n = self.first + end - resume

    def __len__(self):
        return self.n

    def __getitem__(self, x):
        if not 0 <= x < self.n:
            raise IndexError(x)
        return self.start + x if x < self.first else self.resume + x - self.first


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
        half, g = self.window_blocks // 2, self.global_blocks
        layout = torch.zeros(nq, nk, dtype=torch.bool)
        if self.window_blocks:
            for d in range(-half, half + 1):
                layout.diagonal(d).fill_(True)
        layout[:g] = True
        layout[:, :g] = True
        # Python's RNG, not torch's: the layout may first be built inside a
        # traced or vmapped mask function, where torch's random ops are refused.
        rng = random.Random(self.seed)
        rows, cols = [], []
        for row in range(g, nq):
            # random key blocks among those the window and globals leave out
            lo, hi = (row - half, row + half + 1) if self.window_blocks else (nk, nk)
            start = min(g, nk)
            free = _Blocks(start, min(max(lo, start), nk), max(min(hi, nk), start), nk)
            picked = rng.sample(free, min(self.random_blocks, len(free)))
            rows += [row] * len(picked)
            cols += picked
        layout[rows, cols] = True
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


class Shifted(Pattern):
    """``pattern`` on a window of a ``length`` x ``length`` square: query i is
    position ``q_start + i`` and key j position ``k_start + j`` of the whole
    sequence. What one device computes of a sequence split across devices
    (``tfk.distributed``): its plan lists only the window's tiles."""

    def __init__(self, pattern, q_start: int, k_start: int, length: int):
        self.pattern = pattern if pattern is not None else DENSE
        self.q_start, self.k_start, self.length = int(q_start), int(k_start), int(length)
        self.heads = self.pattern.heads
        self.shift_invariant = self.pattern.shift_invariant  # i - j + (q_start - k_start)

    @property
    def key(self):
        return ("shifted", self.pattern.key, self.q_start, self.k_start, self.length)

    def __repr__(self):
        return f"shifted({self.pattern!r}, q_start={self.q_start}, k_start={self.k_start}, length={self.length})"

    def check_lengths(self, lq, lk):
        if self.q_start + lq > self.length or self.k_start + lk > self.length:
            raise ValueError(f"a window of {lq} queries at {self.q_start} and {lk} keys at {self.k_start} "
                             f"does not fit in {self.length} positions")
        self.pattern.check_lengths(self.length, self.length)

    def mask(self, h, i, j, lq, lk):
        return self.pattern.mask(h, i + self.q_start, j + self.k_start, self.length, self.length)

    def _shift(self, b, by):
        return tf.Blocks(b.lo + by, b.hi + by, b.step, b.count)

    def tile_facts(self, h, q, k, lq, lk):
        return self.pattern.tile_facts(h, self._shift(q, self.q_start), self._shift(k, self.k_start),
                                       self.length, self.length)

    def tile_kind(self, h, q, k, lq, lk):
        return self.pattern.tile_kind(h, self._shift(q, self.q_start), self._shift(k, self.k_start),
                                      self.length, self.length)


# Grid patterns (images, video) live in their own module.
from .grid_patterns import GridTiled, axial, local_blocks, neighborhood  # noqa: E402
