"""Block-level reasoning: what is known of a whole tile of (query, key) pairs
from a few numbers per block, without evaluating a mask pair by pair.

A block of a token layout is described by its positions' least and greatest
values ``lo`` and ``hi``, the gcd ``step`` of their differences (0 for one
position) and their ``count``. Every position of the block is then
``lo + n * step <= hi``, and ``lo`` and ``hi`` are positions of the block.

A pattern reasons over a tile (a query block against a key block) and states
four facts, each True only when it is sure:

- ``full``: every pair is allowed;     ``none``: no pair is allowed;
- ``some``: some pair is allowed;      ``notall``: some pair is not allowed.

Facts compose exactly as sets do (``&``, ``|``, ``~``), so unions,
intersections and the disjoint pieces of a union reason as their parts.
``tfk.plan`` refines tiles from coarse blocks to fine ones by these facts,
and evaluates the token mask only on tiles that stay undecided.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# An unbounded end of a diagonal band.
UNBOUNDED = 1 << 60


@dataclass(frozen=True)
class Blocks:
    """Blocks of positions, one entry per tile being reasoned about: int64
    tensors of the same shape."""
    lo: torch.Tensor
    hi: torch.Tensor
    step: torch.Tensor
    count: torch.Tensor
    # Optional, for positions that are row-major indices of a grid of shape
    # ``grid``: each block's least and greatest coordinate per dimension, int64
    # (n, dims). Every position's coordinates lie in the box [box_lo, box_hi];
    # the box holds exactly the block's positions when count equals its volume.
    grid: tuple | None = None
    box_lo: torch.Tensor | None = None
    box_hi: torch.Tensor | None = None

    @property
    def contiguous(self):
        """Every integer from lo to hi is a position of the block."""
        return self.hi - self.lo + 1 == self.count

    def take(self, index):
        # (index_select: several times faster than indexing with a tensor)
        box = ()
        if self.box_lo is not None:
            box = (self.grid, self.box_lo.index_select(0, index), self.box_hi.index_select(0, index))
        return Blocks(*(t.index_select(0, index) for t in (self.lo, self.hi, self.step, self.count)), *box)


def grid_coords(x, grid):
    """Coordinates (..., dims) of row-major positions ``x`` on a grid of shape ``grid``."""
    cols, rest = [], x
    for n in reversed(grid):
        cols.append(rest % n)
        rest = rest // n
    return torch.stack(cols[::-1], -1)


def describe(positions, block, grid=None):
    """Blocks of ``block`` consecutive entries of ``positions`` (a layout's
    positions in layout order; the last block may be short). With ``grid`` (a
    shape whose row-major indices the positions are) each block also gets its
    coordinates' bounding box."""
    n = positions.numel()
    nb = -(-n // block)
    x = positions.to(torch.int64)
    # padding repeats the last position: it changes neither lo, hi nor the gcd
    x = torch.cat([x, x[-1:].expand(nb * block - n)]).view(nb, block)
    lo, hi = x.amin(1), x.amax(1)
    count = torch.full((nb,), block, dtype=torch.int64, device=x.device)
    count[-1] = n - (nb - 1) * block
    g = x - lo.view(-1, 1)
    while g.shape[1] > 1:
        if g.shape[1] % 2:
            g = torch.cat([g, g.new_zeros(nb, 1)], 1)
        half = g.shape[1] // 2
        g = torch.gcd(g[:, :half], g[:, half:])
    if grid is None:
        return Blocks(lo, hi, g.view(-1), count)
    grid = tuple(int(s) for s in grid)
    c = grid_coords(x, grid)   # (nb, block, dims)
    return Blocks(lo, hi, g.view(-1), count, grid, c.amin(1), c.amax(1))


def coarser(b):
    """Blocks of two consecutive blocks of ``b`` (an odd last one alone)."""
    has_box = b.box_lo is not None
    if b.lo.numel() % 2:
        box = (b.grid, *(torch.cat([t, t[-1:]]) for t in (b.box_lo, b.box_hi))) if has_box else ()
        b = Blocks(*(torch.cat([t, t[-1:]]) for t in (b.lo, b.hi, b.step)),
                   torch.cat([b.count, b.count.new_zeros(1)]), *box)
    lo0, lo1 = b.lo[0::2], b.lo[1::2]
    step = torch.gcd(torch.gcd(b.step[0::2], b.step[1::2]), (lo1 - lo0).abs())
    box = ()
    if has_box:
        box = (b.grid, torch.minimum(b.box_lo[0::2], b.box_lo[1::2]), torch.maximum(b.box_hi[0::2], b.box_hi[1::2]))
    return Blocks(torch.minimum(lo0, lo1), torch.maximum(b.hi[0::2], b.hi[1::2]), step,
                  b.count[0::2] + b.count[1::2], *box)


@dataclass(frozen=True)
class TileFacts:
    full: torch.Tensor
    none: torch.Tensor
    some: torch.Tensor
    notall: torch.Tensor

    def __and__(self, o):
        return TileFacts(self.full & o.full, self.none | o.none,
                         (self.full & o.some) | (self.some & o.full), self.notall | o.notall)

    def __or__(self, o):
        return TileFacts(self.full | o.full, self.none & o.none,
                         self.some | o.some, (self.none & o.notall) | (self.notall & o.none))

    def __invert__(self):
        return TileFacts(self.none, self.full, self.notall, self.some)


def one_side(blocks, full, none, at_lo, at_hi):
    """Facts of a predicate of one side's position only (the query's or the
    key's), from its verdicts on the bounding interval (``full``, ``none``:
    every or no integer from lo to hi passes) and on the two ends."""
    whole = blocks.contiguous
    return TileFacts(full, none, at_lo | at_hi | (whole & ~none), ~at_lo | ~at_hi | (whole & ~full))


def diagonals(q, k, lo=-UNBOUNDED, hi=UNBOUNDED, modulus=1):
    """Facts of ``lo <= i - j <= hi and (i - j) % modulus == 0``."""
    dmin, dmax = q.lo - k.hi, q.hi - k.lo   # both reached by a pair of the tile
    band_full = (dmin >= lo) & (dmax <= hi)
    band_none = (dmax < lo) | (dmin > hi)
    whole = q.contiguous & k.contiguous     # then i - j takes every value in [dmin, dmax]
    end_inside = ((dmin >= lo) & (dmin <= hi)) | ((dmax >= lo) & (dmax <= hi))
    band_some = end_inside | (whole & ~band_none)
    if modulus == 1:
        return TileFacts(band_full, band_none, band_some, ~band_full)
    # one residue per block: i - j has one residue over the tile
    uniform = (q.step % modulus == 0) & (k.step % modulus == 0)
    same = uniform & ((q.lo - k.lo) % modulus == 0)
    a, b = dmin.clamp(min=lo), dmax.clamp(max=hi)
    has_multiple = torch.div(b, modulus, rounding_mode="floor") * modulus >= a
    return TileFacts(
        full=band_full & same,
        none=band_none | (uniform & ~same) | (whole & ~has_multiple),
        some=(same & band_some) | (whole & has_multiple),
        notall=~band_full | (uniform & ~same) | (whole & (dmax > dmin)),
    )


def block_ids(lo_a, hi_a, lo_b, hi_b, before):
    """Facts (full, none, some, notall) of ``ia < ib`` (``before``) or
    ``ia == ib`` over the ids ``ia`` of one side's positions, from lo_a to
    hi_a, and ``ib`` of the other's, from lo_b to hi_b; the end ids belong to
    positions of the tile."""
    if before:
        full, none = hi_a < lo_b, lo_a >= hi_b
        return full, none, ~none, ~full      # (hi_a .. lo_b) and (lo_a .. hi_b) are pairs of the tile
    full = (lo_a == hi_a) & (lo_b == hi_b) & (lo_a == lo_b)
    none = (hi_a < lo_b) | (hi_b < lo_a)
    ends = (lo_a == lo_b) | (lo_a == hi_b) | (hi_a == lo_b) | (hi_a == hi_b)
    return full, none, ends, ~full


def layout_facts(prefix, layout, h, rows, cols, whole):
    """Facts of ``layout[h, r, c]`` over r in rows=(r0, r1), c in cols=(c0, c1),
    inclusive. ``layout`` is contiguous, (heads, R, C); ``prefix[r, h, c]``
    (contiguous, (R + 1, heads, C + 1)) counts the True entries of
    ``layout[h, :r, :c]``; ``whole``: every (r, c) of the rectangle is met by
    a pair of the tile (its four corners always are)."""
    (r0, r1), (c0, c1) = rows, cols
    if bool(((r0 == r1) & (c0 == c1)).all()):   # single entries (as plan blocks on the layout's): read them
        cell = r0 * layout.shape[2] + c0
        if layout.shape[0] > 1:
            cell += h * layout[0].numel()
        full = layout.view(-1).index_select(0, cell)
        return TileFacts(full, ~full, full, ~full)
    heads, width = prefix.shape[1], prefix.shape[2]
    flat = prefix.view(-1)
    top, bottom = r0, r1 + 1
    if heads > 1:
        top, bottom = top * heads + h, bottom * heads + h
    top, bottom = top * width, bottom * width

    def at(i):
        return flat.index_select(0, i)
    count = at(bottom + (c1 + 1)) - at(top + (c1 + 1)) - at(bottom + c0) + at(top + c0)
    full = count == (r1 - r0 + 1) * (c1 - c0 + 1)
    none = count == 0
    if bool(whole.all()):   # then the count says all: a corner adds nothing
        return TileFacts(full, none, ~none, ~full)
    ends = [layout[h, r, c] for r in (r0, r1) for c in (c0, c1)]
    some = ends[0] | ends[1] | ends[2] | ends[3] | (whole & ~none)
    notall = ~(ends[0] & ends[1] & ends[2] & ends[3]) | (whole & ~full)
    return TileFacts(full, none, some, notall)
