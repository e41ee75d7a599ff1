"""Attention patterns over tokens laid out on a grid (images, video).

Tokens are the row-major positions of a grid of shape ``shape`` (2-D
``(rows, cols)``, 3-D ``(frames, rows, cols)``, ...), and attention is
self-attention over the whole grid: Lq == Lk == prod(shape). Each pattern is
a product over dimensions: key j is allowed for query i when, in every
dimension d, the relation of that dimension holds between their coordinates
i_d and j_d.

- ``axial(shape, axis, causal=False)``: Axial Transformer (Ho et al. 2019).
- ``neighborhood(shape, kernel_size, dilation=1, causal=False)``: NATTEN's
  neighbourhood attention (Hassani et al. 2022, dilated: 2022, causal: 2024).
- ``local_blocks(shape, query_block, memory_margin)``: Image Transformer's
  local 2-D (or 3-D) attention (Parmar et al. 2018).

Their regions work in ``GridTiled`` order: positions tile by tile (64 tokens a
tile), so a neighbourhood is dense in plan blocks. Blocks of such a layout
carry coordinate bounding boxes (``tfk.tile_facts.describe(..., grid=...)``),
and the patterns reason about a tile per dimension on the boxes' intervals.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import tile_facts as tf
from .patterns import Pattern, Region

__all__ = ["GridTiled", "axial", "neighborhood", "local_blocks"]


def _default_tile(dims):
    """About 64 positions per tile: (64,), (8, 8), (4, 4, 4), ..."""
    return {1: (64,), 2: (8, 8), 3: (4, 4, 4)}.get(dims, (max(1, round(64 ** (1 / dims))),) * dims)


def _check_shape(name, shape):
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        shape = tuple(shape)
    except TypeError:
        raise ValueError(f"{name}: shape must be a tuple of ints >= 1, got {shape!r}") from None
    if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"{name}: shape must be a non-empty tuple of ints >= 1, got {shape!r}")
    return shape


@dataclass(frozen=True)
class GridTiled:
    """The positions of a row-major grid of shape ``shape``, tile by tile:
    tiles of ``tile`` coordinates per dimension (default about 64 positions:
    (8, 8), (4, 4, 4)), in row-major order over the grid of tiles, positions
    in row-major order inside a tile. ``offset`` (per dimension, default 0)
    moves the tiles' boundaries: tile t of dimension d covers coordinates
    [t * tile_d - offset_d, (t + 1) * tile_d - offset_d). Edge tiles may be
    partial. A key layout offset by half a window lines its tiles up with the
    windows of the query tiles.
    """
    shape: tuple
    tile: tuple = None
    offset: tuple = None

    def __post_init__(self):
        shape = tuple(int(n) for n in self.shape)
        object.__setattr__(self, "shape", shape)
        tile = _default_tile(len(shape)) if self.tile is None else tuple(int(t) for t in self.tile)
        offset = (0,) * len(shape) if self.offset is None else tuple(int(o) for o in self.offset)
        if len(tile) != len(shape) or min(tile) < 1 or len(offset) != len(shape) or min(offset) < 0:
            raise ValueError(f"GridTiled: tile {tile} and offset {offset} do not fit shape {shape}")
        object.__setattr__(self, "tile", tile)
        object.__setattr__(self, "offset", tuple(o % t for o, t in zip(offset, tile)))

    @property
    def grid(self):
        """The grid whose row-major indices the positions are (blocks of this
        layout get coordinate boxes)."""
        return self.shape

    def indices(self, length, device):
        if length != math.prod(self.shape):
            raise ValueError(f"GridTiled: a grid of shape {self.shape} has {math.prod(self.shape)} positions, "
                             f"not {length}")
        pos = torch.arange(length, device=device)
        c = tf.grid_coords(pos, self.shape)
        tile_id = torch.zeros_like(pos)
        inner = torch.zeros_like(pos)
        for d, (n, t, o) in enumerate(zip(self.shape, self.tile, self.offset)):
            x = c[:, d] + o
            tile_id = tile_id * -(-(n + o) // t) + x // t
            inner = inner * t + x % t
        return pos[torch.argsort(tile_id * math.prod(self.tile) + inner)]


# ----------------------------------------------------------------------------
# Per-dimension relations between a query coordinate x and a key coordinate y
# ----------------------------------------------------------------------------

class _Window:
    """y in [lo(x), hi(x)], with lo and hi nondecreasing, lo(x) <= hi(x) and
    lo(x + 1) <= hi(x) + 1: the windows of consecutive x overlap or touch, so
    over x in [a0, a1] they cover [lo(a0), hi(a1)] and share [lo(a1), hi(a0)].
    Facts on intervals are then exact."""

    def __init__(self, lo, hi, kind=None):
        self.lo, self.hi = lo, hi
        self._kind = kind

    def kind(self, a0, a1, r0, s0):
        """Columns that, with the coordinates of a tile's first query and key
        (r0, s0) inside the other dimensions known, settle the relation on the
        tile (x in [a0, a1]); see ``GridPattern.tile_kind``."""
        return [r0, s0] if self._kind is None else self._kind(a0, a1, r0, s0)

    def mask(self, x, y):
        return (y >= self.lo(x)) & (y <= self.hi(x))

    def facts(self, a0, a1, b0, b1):
        """(full, none, some, notall) over x in [a0, a1], y in [b0, b1]:
        full and none hold for every pair of the intervals (sound on
        supersets); some and notall need every coordinate of both present."""
        full = (self.lo(a1) <= b0) & (b1 <= self.hi(a0))
        none = (b1 < self.lo(a0)) | (b0 > self.hi(a1))
        return full, none, ~none, ~full


def _shift_kind(a0, a1, r0, s0):
    """A relation of y - x alone."""
    return [s0 - r0]


def _inside_kind(inside, r0, s0):
    """A relation of y - x alone where ``inside``, else the exact coordinates."""
    return [s0 - r0, torch.where(inside, -1, r0)]


class _DilatedNeighborhood:
    """NATTEN's dilated non-causal window along one dimension of size n."""

    def __init__(self, n, k, d):
        self.n, self.k, self.d = n, k, d

    def mask(self, x, y):
        n, k, d = self.n, self.k, self.d
        r = x % d
        n_r = (n - r + d - 1) // d
        start = torch.minimum((x // d - k // 2).clamp(min=0), n_r - k)
        yq = y // d
        return (y % d == r) & (yq >= start) & (yq <= start + (k - 1))

    def facts(self, a0, a1, b0, b1):
        n, k, d = self.n, self.k, self.d
        # every allowed key of x lies in [lb(x), ub(x)], both nondecreasing
        lb = (a0 - d * (k // 2)).clamp(max=n - k * d).clamp(min=0)
        ub = (a1 + d * (k // 2)).clamp(min=k * d - 1).clamp(max=n - 1)
        single = (a0 == a1) & (b0 == b1)
        m = self.mask(a0, b0)
        full = single & m
        none = (b1 < lb) | (b0 > ub) | (single & ~m)
        # a query attends to itself; two coordinates next to each other have
        # different residues (so not all pairs are allowed)
        some = ((a0 <= b1) & (b0 <= a1)) | full
        return full, none, some, ~full

    def kind(self, a0, a1, r0, s0):
        # away from the borders the window is x - d (k // 2) .. x + d (k // 2), step d
        n, k, d = self.n, self.k, self.d
        return _inside_kind((a0 >= d * (k // 2) + d - 1) & (a1 + d * (k // 2) <= n - d), r0, s0)


class _DilatedCausal:
    """x - y in {0, d, ..., (k - 1) d}: NATTEN's causal dilated window."""

    def __init__(self, k, d):
        self.k, self.d = k, d

    def mask(self, x, y):
        diff = x - y
        return (diff >= 0) & (diff <= (self.k - 1) * self.d) & (diff % self.d == 0)

    def facts(self, a0, a1, b0, b1):
        k, d = self.k, self.d
        dmin, dmax = a0 - b1, a1 - b0
        top = (k - 1) * d
        lo, hi = dmin.clamp(min=0), dmax.clamp(max=top)
        # the clipped range of differences holds a multiple of d
        has = torch.div(hi, d, rounding_mode="floor") * d >= lo
        single = (a0 == a1) & (b0 == b1)
        m = self.mask(a0, b0)
        full = single & m
        none = ~has | (single & ~m)   # differences over a superset include the real ones
        return full, none, has, ~full

    def kind(self, a0, a1, r0, s0):
        return [s0 - r0]


# ----------------------------------------------------------------------------
# Grid patterns
# ----------------------------------------------------------------------------

class GridPattern(Pattern):
    """A product over the dimensions of a grid of per-dimension relations
    (``self.dims``, one per dimension, set by subclasses)."""

    shape = ()
    dims = ()

    def _init_shape(self, name, shape):
        self.name = name
        self.shape = _check_shape(name, shape)
        self.strides = tuple(math.prod(self.shape[d + 1:]) for d in range(len(self.shape)))
        self.length = math.prod(self.shape)

    def _per_dim(self, what, value, check):
        """``value`` (one, or a tuple with one per dimension) as a tuple."""
        nd = len(self.shape)
        if isinstance(value, (tuple, list)):
            if len(value) != nd:
                raise ValueError(f"{self.name}: {what} must be one value or {nd} (one per dimension of "
                                 f"shape {self.shape}), got {value!r}")
            values = tuple(value)
        else:
            values = (value,) * nd
        for d, v in enumerate(values):
            check(d, v)
        return values

    def _int_at_least(self, what, minimum):
        """A check for ``_per_dim``: an int >= minimum, else a ValueError naming it and the dimension."""
        def check(d, v):
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{self.name}: {what} must be an int >= {minimum} (dimension {d}), got {v!r}")
        return check

    def coords(self, i):
        """Per-dimension coordinates of flat positions ``i``."""
        return [(i // s) % n for s, n in zip(self.strides, self.shape)]

    def check_lengths(self, lq, lk):
        if lq != self.length or lk != self.length:
            raise ValueError(f"{self.name}: a grid of shape {self.shape} has {self.length} tokens; it needs "
                             f"self-attention with Lq == Lk == {self.length}, got Lq={lq}, Lk={lk}")

    def mask(self, h, i, j, lq, lk):
        m = None
        for rel, x, y in zip(self.dims, self.coords(i), self.coords(j)):
            r = rel.mask(x, y)
            m = r if m is None else m & r
        return m

    def layouts(self):
        """(query layout, key layout): grid tiles by default."""
        layout = GridTiled(self.shape)
        return layout, layout

    def regions(self):
        return [Region(*self.layouts(), self)]

    def _box(self, b):
        """(lo, hi) per dimension: bounds of the block's coordinates, the
        block's own box where it has one, else from its positions' range."""
        if b.box_lo is not None and tuple(b.grid) == self.shape:
            return list(b.box_lo.unbind(1)), list(b.box_hi.unbind(1))
        # positions in [lo, hi] in row-major order: the leading coordinates
        # shared by lo and hi bound the next one; past them, anything
        clo, chi = self.coords(b.lo), self.coords(b.hi)
        same = torch.ones_like(b.lo, dtype=torch.bool)
        los, his = [], []
        for n, l, h in zip(self.shape, clo, chi):
            los.append(torch.where(same, l, 0))
            his.append(torch.where(same, h, n - 1))
            same = same & (l == h)
        return los, his

    def tile_facts(self, h, q, k, lq, lk):
        (qlo, qhi), (klo, khi) = self._box(q), self._box(k)
        full = none = some = notall = None
        for d, rel in enumerate(self.dims):
            f, n, s, na = rel.facts(qlo[d], qhi[d], klo[d], khi[d])
            full = f if full is None else full & f
            none = n if none is None else none | n
            some = s if some is None else some & s
            notall = na if notall is None else notall | na
        # the per-dimension claims of some and notall need every coordinate of
        # both boxes: distinct positions inside a box of count cells fill it
        qvol = torch.ones_like(q.count)
        kvol = torch.ones_like(k.count)
        for d in range(len(self.shape)):
            qvol = qvol * (qhi[d] - qlo[d] + 1)
            kvol = kvol * (khi[d] - klo[d] + 1)
        exact = (q.count == qvol) & (k.count == kvol)
        # lo and hi are positions of their blocks: their four pairs are pairs of the tile
        corners = [self.mask(None, a, b, lq, lk) for a in (q.lo, q.hi) for b in (k.lo, k.hi)]
        c_some = corners[0] | corners[1] | corners[2] | corners[3]
        c_all = corners[0] & corners[1] & corners[2] & corners[3]
        some = (exact & some) | c_some
        notall = (exact & notall) | ~c_all
        return tf.TileFacts(full, none, some & ~none, notall & ~full)

    def tile_kind(self, h, q, k, lq, lk):
        # A position lo + o of a block has coordinates that, less lo's leading
        # one, follow from o and lo % strides[0] (lo's other coordinates)
        # alone. Blocks of one shape with the same lo % strides[0] thus meet
        # the same coordinates in every other dimension, and leading ones
        # shifted by lo's: the leading relation's kind settles the rest.
        s = self.strides[0]
        r0, s0 = q.lo // s, k.lo // s
        qlo, qhi = self._box(q)
        return [q.lo % s, k.lo % s] + self.dims[0].kind(qlo[0], qhi[0], r0, s0)

    def __repr__(self):
        return self._repr


class Axial(GridPattern):
    def __init__(self, shape, axis, causal=False):
        self._init_shape("axial", shape)
        nd = len(self.shape)
        if isinstance(axis, bool) or not isinstance(axis, int) or not -nd <= axis < nd:
            raise ValueError(f"axial: axis must be an int in [{-nd}, {nd - 1}] for shape {self.shape}, "
                             f"got {axis!r}")
        self.axis = axis % nd
        self.causal = bool(causal)
        n_axis = self.shape[self.axis]
        same = _Window(lambda x: x, lambda x: x, _shift_kind)
        along = _Window(lambda x: torch.zeros_like(x), (lambda x: x) if self.causal
                        else (lambda x: torch.full_like(x, n_axis - 1)),
                        _shift_kind if self.causal else lambda a0, a1, r0, s0: [])
        self.dims = tuple(along if d == self.axis else same for d in range(nd))
        self._repr = f"axial({self.shape}, axis={self.axis}, causal={self.causal})"

    def layouts(self):
        # one line along the axis per tile: blocks hold whole lines, and a
        # line's queries see only their own line's keys
        layout = GridTiled(self.shape, tuple(n if d == self.axis else 1 for d, n in enumerate(self.shape)))
        return layout, layout

    @property
    def key(self):
        return ("axial", self.shape, self.axis, self.causal)


def axial(shape, axis, causal=False):
    """Axial attention (Ho et al. 2019) on a row-major grid of shape ``shape``
    (tokens: Lq == Lk == prod(shape)): key j is allowed for query i when their
    coordinates are equal in every dimension but ``axis`` (``axis=1`` on
    (rows, cols): the same row; ``axis=-1`` likewise); with ``causal``, also
    j's coordinate along ``axis`` <= i's."""
    return Axial(shape, axis, causal)


class Neighborhood(GridPattern):
    def __init__(self, shape, kernel_size, dilation=1, causal=False):
        self._init_shape("neighborhood", shape)
        causal = self._per_dim("causal", causal, lambda d, v: None)
        causal = tuple(bool(c) for c in causal)
        kernel = self._per_dim("kernel_size", kernel_size, self._int_at_least("kernel_size", 1))
        dil = self._per_dim("dilation", dilation, self._int_at_least("dilation", 1))
        dims = []
        for d, (n, k, dl, c) in enumerate(zip(self.shape, kernel, dil, causal)):
            if not c and k % 2 == 0:
                raise ValueError(f"neighborhood: kernel_size must be odd in a non-causal dimension "
                                 f"(dimension {d}: {k})")
            if k * dl > n:
                raise ValueError(f"neighborhood: kernel_size * dilation must be <= the grid's size in every "
                                 f"dimension (dimension {d}: kernel_size {k} * dilation {dl} > {n})")
            if dl > 1:
                dims.append(_DilatedCausal(k, dl) if c else _DilatedNeighborhood(n, k, dl))
            elif c:
                dims.append(_Window(lambda x, k=k: x - (k - 1), lambda x: x, _shift_kind))
            else:
                dims.append(_Window(lambda x, n=n, k=k: (x - k // 2).clamp(min=0).clamp(max=n - k),
                                    lambda x, n=n, k=k: (x - k // 2).clamp(min=0).clamp(max=n - k) + (k - 1),
                                    lambda a0, a1, r0, s0, n=n, k=k: _inside_kind(
                                        (a0 >= k // 2) & (a1 + k // 2 <= n - 1), r0, s0)))
        self.kernel_size, self.dilation, self.causal = kernel, dil, causal
        self.dims = tuple(dims)
        self._repr = (f"neighborhood({self.shape}, kernel_size={kernel}, dilation={dil}, causal={causal})")

    def layouts(self):
        # key tiles start where the windows of a query tile start: an 8-wide
        # query tile's keys span 8 + 2 (k // 2) coordinates, two key tiles for k <= 9
        q = GridTiled(self.shape)
        reach = [dl * (k - 1 if c else k // 2) for k, dl, c in zip(self.kernel_size, self.dilation, self.causal)]
        return q, GridTiled(self.shape, q.tile, tuple(reach))

    @property
    def key(self):
        return ("neighborhood", self.shape, self.kernel_size, self.dilation, self.causal)


def neighborhood(shape, kernel_size, dilation=1, causal=False):
    """Neighbourhood attention as NATTEN computes it, on a row-major grid of
    shape ``shape`` (Lq == Lk == prod(shape)). ``kernel_size``, ``dilation``
    and ``causal`` are one value or a tuple with one per dimension. Key j is
    allowed for query i when it is in i's window in every dimension d (size
    n, kernel k, dilation δ; coordinates i_d, j_d):

    - non-causal (k odd): positions split by residue r = i_d mod δ into
      n_r = ceil((n - r) / δ) positions; with i' = i_d // δ,
      start = clamp(i' - k // 2, 0, n_r - k); allowed when j_d mod δ == r and
      start <= j_d // δ <= start + k - 1 (the window shifts inward at the
      borders: every query sees exactly k keys in the dimension);
    - causal: j_d mod δ == r and 0 <= (i_d - j_d) / δ <= k - 1 (the first
      queries see fewer keys).

    Requires k * δ <= n in every dimension."""
    return Neighborhood(shape, kernel_size, dilation, causal)


class LocalBlocks(GridPattern):
    def __init__(self, shape, query_block, memory_margin):
        self._init_shape("local_blocks", shape)
        qb = self._per_dim("query_block", query_block, self._int_at_least("query_block", 1))
        margin = self._per_dim("memory_margin", memory_margin, self._int_at_least("memory_margin", 0))
        self.query_block, self.memory_margin = qb, margin
        # x's window depends on x // b: on x % b and the key's place past b (x // b)
        self.dims = tuple(_Window(lambda x, b=b, m=m: (x // b) * b - m, lambda x, b=b, m=m: (x // b) * b + (b - 1 + m),
                                  lambda a0, a1, r0, s0, b=b: [r0 % b, s0 - b * (r0 // b)])
                          for b, m in zip(qb, margin))
        self._repr = f"local_blocks({self.shape}, query_block={qb}, memory_margin={margin})"

    def layouts(self):
        q = GridTiled(self.shape)
        return q, GridTiled(self.shape, q.tile, self.memory_margin)

    @property
    def key(self):
        return ("local_blocks", self.shape, self.query_block, self.memory_margin)


def local_blocks(shape, query_block, memory_margin):
    """Image Transformer's local attention (Parmar et al. 2018) on a
    row-major grid of shape ``shape`` (Lq == Lk == prod(shape)):
    ``query_block`` (one value or one per dimension) partitions the grid
    into query blocks; query i, in block b_d = i_d // qb_d, attends to key j
    when qb_d b_d - margin_d <= j_d <= qb_d b_d + qb_d - 1 + margin_d in
    every dimension (its block grown by ``memory_margin`` on each side,
    clipped at the grid). ``local_blocks(...) & causal()`` is the
    raster-order masked variant."""
    return LocalBlocks(shape, query_block, memory_margin)
