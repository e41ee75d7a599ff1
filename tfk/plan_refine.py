"""Block schedules from block-level reasoning, in time and memory that follow
the plan's tiles rather than Lq * Lk.

A region's tiles are found from the coarsest blocks down: a tile of 2^l x 2^l
plan blocks is judged by ``Pattern.tile_facts``; one sure to be empty is
dropped, one sure to be full is kept whole, and only an undecided one is
split in four. What stays undecided at the plan's blocks (the edges of a band,
a diagonal) has its token mask evaluated, once per kind of tile
(``Pattern.tile_kind``: e.g. the same i - j offset for a window). Schedules
are then written from the kept rectangles cut into runs of columns, one per
row: every tile's column is a running sum over the runs, and the tiles fill
their rows' first slots in order, or, where a schedule is mostly padding (a
few long rows), are written at their slots one by one.
"""
from __future__ import annotations

import torch

from . import tile_facts as tf

# Tile-mask elements evaluated at once.
TILE_CHUNK = 1 << 22


class Layouts:
    """A region's query and key layouts in blocks: positions (padded with -1
    to whole blocks), and block descriptions at every level (level 0: the
    plan's blocks; each next level pairs up the blocks of the one before,
    until one block holds each whole layout)."""

    def __init__(self, region, lq, lk, bq, bk, device):
        # the same layout on both sides (self-attention): describe it once
        same = region.q_layout == region.kv_layout and (lq, bq) == (lk, bk)
        self.q_index = region.q_layout.indices(lq, device)
        self.kv_index = self.q_index if same else region.kv_layout.indices(lk, device)
        self.lq, self.lk = self.q_index.numel(), self.kv_index.numel()
        self.bq, self.bk = bq, bk
        self.nqb, self.nkb = -(-self.lq // bq), -(-self.lk // bk)
        self.empty = self.lq == 0 or self.lk == 0
        if self.empty:
            return
        depth = max(self.nqb - 1, self.nkb - 1, 0).bit_length()
        # grid layouts (tfk.grid_patterns.GridTiled) give blocks coordinate boxes
        self.q_levels = [tf.describe(self.q_index, bq, getattr(region.q_layout, "grid", None))]
        for _ in range(depth):
            self.q_levels.append(tf.coarser(self.q_levels[-1]))
        self.q_shape = _shapes(self.q_index, self.q_levels[0], bq)
        if same:
            self.k_levels, self.k_shape = self.q_levels, self.q_shape
            return
        self.k_levels = [tf.describe(self.kv_index, bk, getattr(region.kv_layout, "grid", None))]
        for _ in range(depth):
            self.k_levels.append(tf.coarser(self.k_levels[-1]))
        self.k_shape = _shapes(self.kv_index, self.k_levels[0], bk)

    def padded(self, index, nb, block):
        out = torch.full((nb * block,), -1, dtype=torch.int64, device=index.device)
        out[:index.numel()] = index
        return out


def _shapes(index, blocks, block):
    """Per level-0 block, an id of its shape: its positions less lo, in
    order. Blocks of one shape are translates of each other."""
    nb = blocks.lo.numel()
    x = torch.cat([index, index.new_full((nb * block - index.numel(),), -1)]).view(nb, block)
    offsets = torch.where(x >= 0, x - blocks.lo.view(-1, 1), -1)
    ar = torch.arange(block, device=index.device)
    # most blocks are lo, lo + step, ... in order: their shape is (step, count)
    regular = ((offsets == ar * blocks.step.view(-1, 1)) | (offsets < 0)).all(1)
    shape = blocks.step * (block + 1) + blocks.count
    if not bool(regular.all()):
        other = torch.unique(offsets[~regular], dim=0, return_inverse=True)[1]
        shape[~regular] = -1 - other
    return shape


def _span(nodes, level, n):
    """The level-0 blocks [first, end) under nodes of ``level`` (of n)."""
    return nodes << level, ((nodes + 1) << level).clamp(max=n)


# Undecided tiles split at once while counting, so a count can stop early.
COUNT_CHUNK = 1 << 14


def _select(mask, *tensors):
    """The entries of ``tensors`` where ``mask`` holds (one nonzero for all:
    indexing each with the mask would find them again every time)."""
    index = torch.nonzero(mask).flatten()
    return tuple(t.index_select(0, index) for t in tensors)


def _refine(pattern, heads, lay, lq, lk, bound=None):
    """The region's tiles: rectangles sure to be full, as (h, a, b, level)
    nodes, and the level-0 tiles left undecided, as (h, a, b, some). None when
    the pattern cannot reason about blocks.

    With ``bound`` (counting), undecided tiles are split a chunk at a time, and
    as soon as the tiles sure to hold an allowed pair reach ``bound`` their
    number (an int) is returned instead.
    """
    device = lay.q_index.device
    hp = heads or 1
    h = torch.arange(hp, device=device)
    a = torch.zeros(hp, dtype=torch.int64, device=device)
    b = torch.zeros_like(a)
    some = torch.zeros(hp, dtype=torch.bool, device=device)
    rects, counted = [], 0
    quad_a = torch.tensor([0, 0, 1, 1], device=device)
    quad_b = torch.tensor([0, 1, 0, 1], device=device)
    top = len(lay.q_levels) - 1
    for level in range(top, -1, -1):
        q_level, k_level = lay.q_levels[level], lay.k_levels[level]
        nq, nk = q_level.lo.numel(), k_level.lo.numel()
        parents = (h, a, b, some)
        step = max(h.numel(), 1) if bound is None else COUNT_CHUNK
        kept = []
        for c0 in range(0, max(h.numel(), 1), step):
            h, a, b = (t[c0:c0 + step] for t in parents[:3])
            if level < top:   # split every undecided tile of the level above in four
                a = (2 * a.view(-1, 1) + quad_a).flatten()
                b = (2 * b.view(-1, 1) + quad_b).flatten()
                h = h.repeat_interleave(4)
                if nq % 2 or nk % 2:   # an odd level's last block has no second half
                    h, a, b = _select((a < nq) & (b < nk), h, a, b)
            facts = pattern.tile_facts(h, q_level.take(a), k_level.take(b), lq, lk)
            if facts is None:
                return None
            full = _select(facts.full, h, a, b)
            rects.append((*full, level))
            kept.append(_select(~facts.full & ~facts.none, h, a, b, facts.some))
            if bound is not None:
                # sure so far: full tiles, undecided ones known to hold a
                # pair, and the tiles above not split yet that hold one
                q0, q1 = _span(full[1], level, lay.nqb)
                k0, k1 = _span(full[2], level, lay.nkb)
                counted += int(((q1 - q0) * (k1 - k0)).sum())
                sure = counted + sum(int(k[3].sum()) for k in kept) + int(parents[3][c0 + step:].sum())
                if sure >= bound:
                    return sure
        h, a, b, some = (torch.cat(t) for t in zip(*kept))
    return rects, (h, a, b, some)


def _tile_masks(pattern, heads, lay, h, a, b, lq, lk):
    """Allowed pairs of the listed level-0 tiles, False outside the layout:
    (masks (K, bq, bk), kind (N,)), tile n's mask being masks[kind[n]]."""
    device = lay.q_index.device
    bq, bk = lay.bq, lay.bk
    n = h.numel()
    q, k = lay.q_levels[0].take(a), lay.k_levels[0].take(b)
    cols = pattern.tile_kind(h, q, k, lq, lk) if n else None
    if cols is None:
        first, kind = torch.arange(n, device=device), torch.arange(n, device=device)
    else:
        cols = [c.expand(n) for c in cols] + [h, lay.q_shape[a], lay.k_shape[b]]
        kinds, kind = torch.unique(torch.stack(cols, 1), dim=0, return_inverse=True)
        first = torch.full((kinds.shape[0],), n, dtype=torch.int64, device=device).scatter_reduce_(
            0, kind, torch.arange(n, device=device), "amin")
    qpad, kpad = lay.padded(lay.q_index, lay.nqb, bq), lay.padded(lay.kv_index, lay.nkb, bk)
    ar_q, ar_k = torch.arange(bq, device=device), torch.arange(bk, device=device)
    out = torch.empty(first.numel(), bq, bk, dtype=torch.bool, device=device)
    step = max(1, TILE_CHUNK // (bq * bk))
    for c0 in range(0, first.numel(), step):
        t = first[c0:c0 + step]
        i = qpad[a[t].view(-1, 1) * bq + ar_q].unsqueeze(2)
        j = kpad[b[t].view(-1, 1) * bk + ar_k].unsqueeze(1)
        hh = h[t].view(-1, 1, 1) if heads else 0
        # int32 positions, as the exhaustive compiler evaluates them
        m = pattern.mask(hh, i.clamp(min=0).int(), j.clamp(min=0).int(), lq, lk)
        out[c0:c0 + step] = m & ((i >= 0) & (j >= 0))
    return out, kind


def _pieces(rects, h, a, b, lay):
    """Full rectangles (from ``_refine``) and single tiles (h, a, b) as
    (h, first row, end row, first column, end column) in level-0 blocks."""
    spans = [(r[0], *_span(r[1], r[3], lay.nqb), *_span(r[2], r[3], lay.nkb)) for r in rects]
    spans.append((h, a, a + 1, b, b + 1))
    return [torch.cat(part) for part in zip(*spans)]


def _runs(h, r0, r1, c0, c1, hp, rows, cols):
    """Rectangles of tiles cut into runs, one per (rectangle, row), in (row,
    first column) order: (rectangle of each run, its head * rows + row), and
    the tiles of every row."""
    device = h.device
    height = r1 - r0
    piece = torch.repeat_interleave(torch.arange(h.numel(), device=device), height)
    row = r0[piece] + torch.arange(piece.numel(), device=device) - (height.cumsum(0) - height)[piece]
    row = h[piece] * rows + row
    order = torch.argsort(row * cols + c0[piece])
    piece, row = piece[order], row[order]
    count = torch.zeros(hp * rows, dtype=torch.int64, device=device).index_add_(0, row, (c1 - c0)[piece])
    return piece, row, count


def _row_tiles(h, r0, r1, c0, c1, hp, rows):
    """Tiles in each (head, row) of disjoint rectangles (rows [r0, r1) x
    columns [c0, c1) of head h): each one's width, summed from its first row
    to its end."""
    width = c1 - c0
    step = torch.zeros(hp * rows + 1, dtype=torch.int64, device=h.device)
    step.index_add_(0, h * rows + r0, width).index_add_(0, h * rows + r1, -width)
    return step.cumsum(0)[:-1]


def count_tiles(pattern, heads, lay, lq, lk, bound):
    """(tiles, schedule slots) the region needs, exact when it needs fewer
    than ``bound`` tiles, else (some number >= bound, None); None when the
    pattern cannot reason about blocks."""
    found = _refine(pattern, heads, lay, lq, lk, bound=bound)
    if found is None or isinstance(found, int):
        return found if found is None else (found, None)
    rects, (h, a, b, some) = found
    held = some.clone()
    masks, kind = _tile_masks(pattern, heads, lay, h[~some], a[~some], b[~some], lq, lk)
    held[~some] = masks.flatten(1).any(1)[kind]
    ph, q0, q1, k0, k1 = _pieces(rects, *_select(held, h, a, b), lay)
    hp = heads or 1
    per_row = _row_tiles(ph, q0, q1, k0, k1, hp, lay.nqb)
    per_col = _row_tiles(ph, k0, k1, q0, q1, hp, lay.nkb)
    slots = hp * (lay.nqb * max(int(per_row.max()), 1) + lay.nkb * max(int(per_col.max()), 1))
    return int(per_row.sum()), slots


def schedules(pattern, heads, lay, lq, lk):
    """The region's schedule tensors (``SubPass`` fields), or None when the
    pattern cannot reason about blocks."""
    found = _refine(pattern, heads, lay, lq, lk)
    if found is None:
        return None
    rects, (h, a, b, _) = found
    device = lay.q_index.device
    # undecided tiles in (head, query block, key block) order: partial ids follow it
    order = torch.argsort((h * lay.nqb + a) * lay.nkb + b)
    h, a, b = h[order], a[order], b[order]
    masks, kind = _tile_masks(pattern, heads, lay, h, a, b, lq, lk)
    allowed = masks.sum(dim=(1, 2), dtype=torch.int64)[kind]
    in_range = (lay.lq - a * lay.bq).clamp(max=lay.bq) * (lay.lk - b * lay.bk).clamp(max=lay.bk)
    partial = (allowed > 0) & (allowed < in_range)
    pid = torch.full_like(a, -1)
    pid[partial] = torch.arange(int(partial.sum()), device=device)
    keep = allowed > 0
    # pieces: the full rectangles, and the single tiles that hold a pair
    ph, q0, q1, k0, k1 = _pieces(rects, h[keep], a[keep], b[keep], lay)
    pid = torch.cat([torch.full((ph.numel() - int(keep.sum()),), -1, device=device), pid[keep]])
    hp = heads or 1
    kv = _schedule(ph, q0, q1, k0, k1, pid, hp, lay.nqb, lay.nkb)
    qs = _schedule(ph, k0, k1, q0, q1, pid, hp, lay.nkb, lay.nqb)
    return dict(kv_count=kv[0], kv_blocks=kv[1], kv_partial=kv[2], q_count=qs[0], q_blocks=qs[1], q_partial=qs[2],
                partial_masks=masks[kind[partial]])


# A schedule with more than this many slots a tile has its tiles written one
# by one; a denser one row by row (where per-tile indices would cost more).
SPARSE_SCHEDULE = 4


def _schedule(h, r0, r1, c0, c1, pid, hp, rows, cols):
    """(count, blocks, partial) per row, as ``tfk.plan._schedule`` writes
    them, from disjoint rectangles of tiles (rows [r0, r1) x columns [c0, c1),
    of head h; partial id ``pid``, -1 for full ones)."""
    device = h.device
    piece, row, count = _runs(h, r0, r1, c0, c1, hp, rows, cols)
    start, width = c0.index_select(0, piece), (c1 - c0).index_select(0, piece)
    n, nb, tiles = hp * rows, max(int(count.max()), 1), int(count.sum())
    # Every tile's column, in (row, column) order: a running sum of steps, 1
    # inside a run and the jump from the tile before where a run starts.
    first = width.cumsum(0) - width                 # each run's first tile
    jump = start.clone()
    jump[1:] -= (start + width - 1)[:-1]
    steps = torch.ones(tiles, dtype=torch.int32, device=device)
    steps[first] = jump.to(torch.int32)
    column = steps.cumsum_(0)   # (in int32: torch's default, int64, is far slower)
    # Each row's tiles fill its first slots; the padding repeats its last
    # block (0 in a row that visits none).
    ends = count.cumsum(0)
    last = torch.where(count > 0, column[(ends - 1).clamp(min=0)] if tiles else 0, 0).to(torch.int32)
    flat0 = row * nb + first - (ends - count)[row]    # a run's first slot, in the flat schedule
    blocks = last.view(-1, 1).expand(n, nb).contiguous()
    if SPARSE_SCHEDULE * tiles < n * nb:   # mostly padding: write the tiles at their slots
        slot = torch.repeat_interleave(flat0 - first, width, output_size=tiles)
        blocks.view(-1).index_copy_(0, slot.add_(torch.arange(tiles, device=device)), column)
    else:   # each row's first count[row] slots, in order
        ar = torch.arange(nb, dtype=torch.int32, device=device)
        blocks.masked_scatter_(ar < count.to(torch.int32).view(-1, 1), column)
    part = torch.full((n * nb,), -1, dtype=torch.int32, device=device)
    single = pid.index_select(0, piece) >= 0   # partial tiles come one per run
    part[flat0[single]] = pid.index_select(0, piece)[single].to(torch.int32)
    return count.to(torch.int32).view(hp, rows), blocks.view(hp, rows, nb), part.view(hp, rows, nb)
