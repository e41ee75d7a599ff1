"""Execution plans: the one contract between the API and every backend.

A plan is a list of sub-passes. Each sub-pass works in a token layout (the
query and key positions it covers, in the order that makes its piece of the
pattern dense in blocks) and carries a block schedule in the manner of
FlexAttention's BlockMask: for every query block, the key blocks to visit,
each marked full (no mask needed) or partial (with its tile mask). Sub-passes
cover disjoint (query, key) pairs whose union is the pattern, so their
results merge exactly by log-sum-exp.

No backend visits a tile its plan does not list, and a plan lists only tiles
that hold at least one allowed pair: work follows the pattern's density.

``compile_plan`` builds a plan in time and memory proportional to its tiles:
it reasons about blocks (``Pattern.tile_facts``) from coarse to fine, and
evaluates the token mask only on tiles left undecided (the edges of a band).
``compile_plan_exhaustive`` evaluates the mask on every pair; it serves
patterns that cannot reason about blocks, and tests hold the fast plans
equal to it.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass

import torch

from . import plan_refine as refine
from .patterns import DENSE, IDENTITY, Pattern, Region

# Elements of mask evaluated at once while compiling a plan.
_EVAL_CHUNK = 1 << 24


@dataclass(frozen=True)
class SubPass:
    """One block schedule over one token layout.

    Shapes: ``Hp`` is 1, or the number of heads for a per-head pattern;
    ``nqb = ceil(len(q_index) / block_q)``, ``nkb`` likewise; ``nb`` is the
    largest number of key blocks any query block visits, ``nbq`` the largest
    number of query blocks visiting a key block.
    """
    # (Lq',) original query positions in layout order, or (B, H, Lq') for a
    # layout that differs per (batch, head) (LSH's sort); None = all, in order
    q_index: torch.Tensor | None
    kv_index: torch.Tensor | None  # (Lk',) or (B, Hkv, Lk') original key positions, likewise
    kv_count: torch.Tensor         # int32 (Hp, nqb): key blocks visited by each query block
    kv_blocks: torch.Tensor        # int32 (Hp, nqb, nb): their indices, ascending (an LSH band: in window
                                   # order, a block may repeat); padding repeats the last
    kv_partial: torch.Tensor       # int32 (Hp, nqb, nb): row of partial_masks, or -1 for a full tile
    q_count: torch.Tensor          # int32 (Hp, nkb): the transposed schedule, per key block
    q_blocks: torch.Tensor         # int32 (Hp, nkb, nbq): the query blocks visiting it
    q_partial: torch.Tensor        # int32 (Hp, nkb, nbq)
    partial_masks: torch.Tensor    # bool (n_partial, block_q, block_k); False outside the sequence
    lq: int                        # len(q_index)
    lk: int                        # len(kv_index)
    # In-kernel position predicates, in place of tile masks, for layouts made
    # from data (LSH): 0 none; 1 the query's own position gets the finite
    # logit -1e5 (Reformer's self mask, over any other mask); 2 that, and keys
    # past the query's original position masked (causal by position).
    predicates: int = 0
    # Dropout draws with head index h·rounds + round out of H·rounds heads:
    # sub-passes that are hash rounds of the same positions draw independently.
    round: int = 0
    rounds: int = 1

    @property
    def num_tiles(self):
        """Tiles visited, summed over the schedule's heads."""
        return int(self.kv_count.sum())

    @property
    def num_partial(self):
        return int(self.partial_masks.shape[0])

    @property
    def schedule_slots(self):
        """Entries of the two padded schedules."""
        return self.kv_blocks.numel() + self.q_blocks.numel()


@dataclass(frozen=True)
class Plan:
    subpasses: tuple
    lq: int
    lk: int
    block_q: int
    block_k: int
    heads: int          # Hp: 1, or the pattern's number of heads

    @property
    def num_tiles(self):
        return sum(s.num_tiles for s in self.subpasses)

    @property
    def dense_tiles(self):
        return self.heads * math.ceil(self.lq / self.block_q) * math.ceil(self.lk / self.block_k)

    @property
    def tile_density(self):
        return self.num_tiles / max(self.dense_tiles, 1)


def _flat_rows(index, length):
    """Rows of a (B·heads·length, ...) view for a per-(batch, head) index
    (B, heads, n): index_select / index_add_ on whole rows."""
    B, heads = index.shape[:2]
    base = torch.arange(0, B * heads * length, length, device=index.device).view(B, heads, 1)
    return (index + base).reshape(-1)


def to_layout(x, index):
    """x (B, heads, L, ...) in a sub-pass's layout: its rows ``index``
    ((n,), or (B, heads, n) per batch and head; None: all, in order)."""
    if index is None:
        return x
    if index.dim() == 1:
        return x.index_select(2, index)
    B, heads, L = x.shape[:3]
    rows = x.reshape(B * heads * L, *x.shape[3:]).index_select(0, _flat_rows(index, L))
    return rows.view(B, heads, index.shape[-1], *x.shape[3:])


def from_layout(x_l, index, length, fill):
    """Layout rows back at their original positions along dim 2 (of
    ``length``); positions outside the layout get ``fill``. A per-(batch,
    head) index must not repeat a position within a (batch, head)."""
    if index is None:
        return x_l
    B, heads = x_l.shape[:2]
    out = torch.full((B, heads, length) + x_l.shape[3:], fill, dtype=x_l.dtype, device=x_l.device)
    if index.dim() == 1:
        return out.index_copy_(2, index, x_l)
    flat = out.view(B * heads * length, *x_l.shape[3:])
    flat.index_copy_(0, _flat_rows(index, length), x_l.reshape(-1, *x_l.shape[3:]))
    return out


def add_from_layout(full, part, index):
    """full (B, heads, L, ...) += layout rows ``part`` at their original
    positions (repeated positions add up)."""
    if index is None:
        return full.add_(part)
    if index.dim() == 1:
        return full.index_add_(2, index, part)
    B, heads, L = full.shape[:3]
    full.view(B * heads * L, *full.shape[3:]).index_add_(0, _flat_rows(index, L), part.reshape(-1, *full.shape[3:]))
    return full


def _schedule(visit, partial_id):
    """CSR-like schedule from a (Hp, rows, cols) bool ``visit``: per row, the
    count, the visited column ids ascending (padding repeats the last, so loads
    stay in bounds) and their partial-mask ids (-1: full tile or padding)."""
    hp, rows, cols = visit.shape
    count = visit.sum(-1).to(torch.int32)
    nb = max(int(count.max()), 1)
    col = torch.arange(cols, device=visit.device).expand(hp, rows, cols)
    # visited columns first, ascending: the sort key puts unvisited ones last
    order = torch.argsort((~visit).to(torch.int64) * cols + col, dim=-1, stable=True)[..., :nb]
    blocks = col.gather(-1, order)
    part = partial_id.gather(-1, order)
    used = torch.arange(nb, device=visit.device).view(1, 1, -1) < count.unsqueeze(-1)
    last = blocks.gather(-1, (count.long() - 1).clamp(min=0).unsqueeze(-1))
    blocks = torch.where(used, blocks, last)
    part = torch.where(used, part, torch.full_like(part, -1))
    return count, blocks.to(torch.int32), part.to(torch.int32)


def _compile_region(region, heads, lq, lk, bq, bk, device):
    q_index = region.q_layout.indices(lq, device)
    kv_index = region.kv_layout.indices(lk, device)
    lq2, lk2 = q_index.numel(), kv_index.numel()
    if lq2 == 0 or lk2 == 0:
        return None
    nqb, nkb = math.ceil(lq2 / bq), math.ceil(lk2 / bk)
    # Padding positions get -1 and are never allowed.
    qpad = torch.full((nqb * bq,), -1, dtype=torch.int64, device=device)
    qpad[:lq2] = q_index
    kpad = torch.full((nkb * bk,), -1, dtype=torch.int64, device=device)
    kpad[:lk2] = kv_index
    hp = heads or 1
    h = torch.arange(hp, device=device).view(-1, 1, 1) if heads else 0
    kvalid = (kpad >= 0).view(1, 1, -1)
    kpos32 = kpad.clamp(min=0).int().view(1, 1, -1)
    # in-range pairs per tile: a tile is full when all of them are allowed
    rows_in = (lq2 - torch.arange(nqb, device=device) * bq).clamp(max=bq)
    cols_in = (lk2 - torch.arange(nkb, device=device) * bk).clamp(max=bk)
    in_range = (rows_in.view(-1, 1) * cols_in.view(1, -1)).to(torch.int32)
    rows_per_chunk = max(1, _EVAL_CHUNK // (hp * nkb * bk * bq))
    anys, fulls, partial_rows = [], [], []
    for c0 in range(0, nqb, rows_per_chunk):
        c1 = min(nqb, c0 + rows_per_chunk)
        i = qpad[c0 * bq:c1 * bq].view(1, -1, 1)
        # int32 positions halve the memory traffic of evaluating the mask
        m = region.pattern.mask(h, i.clamp(min=0).int(), kpos32, lq, lk)
        m = (m & (i >= 0) & kvalid).expand(hp, -1, -1).reshape(hp, c1 - c0, bq, nkb, bk)
        count = m.sum(dim=(2, 4), dtype=torch.int32)
        anys.append(count > 0)
        full = count == in_range[c0:c1]
        fulls.append(full)
        part = (count > 0) & ~full
        # tile masks of partial tiles, in (head, qblock, kblock) order
        partial_rows.append(m.permute(0, 1, 3, 2, 4)[part])
    any_ = torch.cat(anys, 1)
    if not bool(any_.any()):
        return None
    partial = any_ & ~torch.cat(fulls, 1)
    partial_masks = torch.cat(partial_rows, 0)
    # partial ids follow the (head, qblock, kblock) order of partial_masks
    partial_id = torch.full(partial.shape, -1, dtype=torch.int32, device=device)
    partial_id[partial] = torch.arange(int(partial.sum()), dtype=torch.int32, device=device)
    kv_count, kv_blocks, kv_partial = _schedule(any_, partial_id)
    # the transposed schedule (per key block, the query blocks) serves dK/dV kernels
    q_count, q_blocks, q_partial = _schedule(any_.transpose(1, 2), partial_id.transpose(1, 2))
    natural_q = region.q_layout == IDENTITY
    natural_k = region.kv_layout == IDENTITY
    return SubPass(
        q_index=None if natural_q else q_index,
        kv_index=None if natural_k else kv_index,
        kv_count=kv_count,
        kv_blocks=kv_blocks,
        kv_partial=kv_partial,
        q_count=q_count,
        q_blocks=q_blocks,
        q_partial=q_partial,
        partial_masks=partial_masks,
        lq=lq2,
        lk=lk2,
    )


def _choose(pattern, lq, lk, bq, bk, device, region_plan, plain_cost):
    """The sub-passes of ``pattern``'s regions or, when it needs fewer tiles
    and no larger schedules, of the whole pattern in natural order (layouts
    pay off at scale; on short sequences the natural order can need fewer
    tiles). ``plain_cost(plain, bound)``: the natural order's (tiles, slots),
    or (n >= bound, None)."""
    pattern.check_lengths(lq, lk)
    if lq == 0 or lk == 0:
        return ()
    subs = tuple(sp for sp in (region_plan(r) for r in pattern.regions()) if sp is not None)
    if len(subs) > 1 or any(sp.q_index is not None or sp.kv_index is not None for sp in subs):
        tiles = sum(sp.num_tiles for sp in subs)
        slots = sum(sp.schedule_slots for sp in subs)
        plain = Region(IDENTITY, IDENTITY, pattern)
        plain_tiles, plain_slots = plain_cost(plain, tiles)
        if plain_tiles < tiles and plain_slots <= slots:
            subs = tuple(sp for sp in [region_plan(plain)] if sp is not None)
    return subs


def compile_plan_exhaustive(pattern: Pattern | None, lq: int, lk: int, block_q: int, block_k: int,
                            device="cpu") -> Plan:
    """The plan of ``compile_plan``, built by evaluating the pattern's mask on
    every (query, key) pair: O(lq * lk)."""
    device = torch.device(device)
    pattern = DENSE if pattern is None else pattern

    def region_plan(r):
        return _compile_region(r, pattern.heads, lq, lk, block_q, block_k, device)

    def plain_cost(plain, _):
        sp = region_plan(plain)
        return (0, 0) if sp is None else (sp.num_tiles, sp.schedule_slots)

    subs = _choose(pattern, lq, lk, block_q, block_k, device, region_plan, plain_cost)
    return Plan(subs, lq, lk, block_q, block_k, pattern.heads or 1)


def compile_plan(pattern: Pattern | None, lq: int, lk: int, block_q: int, block_k: int, device="cpu") -> Plan:
    """Compile ``pattern`` (None = dense) for these lengths and tile sizes.

    Time and memory follow the plan's tiles for every built-in pattern and
    their compositions; a pattern without ``tile_facts`` has its mask
    evaluated on every pair. Plans are cached by ``get_plan``.
    """
    device = torch.device(device)
    pattern = DENSE if pattern is None else pattern
    own = pattern.plan(lq, lk, block_q, block_k, device)
    if own is not None:
        return own

    layouts = {}

    def layouts_of(r):
        key = (r.q_layout, r.kv_layout)
        if key not in layouts:
            layouts[key] = refine.Layouts(r, lq, lk, block_q, block_k, device)
        return layouts[key]

    def region_plan(r):
        lay = layouts_of(r)
        if lay.empty:
            return None
        found = refine.schedules(r.pattern, pattern.heads, lay, lq, lk)
        if found is None:   # no block-level reasoning: every pair
            return _compile_region(r, pattern.heads, lq, lk, block_q, block_k, device)
        if found["kv_count"].sum() == 0:
            return None
        return SubPass(q_index=None if r.q_layout == IDENTITY else lay.q_index,
                       kv_index=None if r.kv_layout == IDENTITY else lay.kv_index,
                       lq=lay.lq, lk=lay.lk, **found)

    def plain_cost(plain, bound):
        lay = layouts_of(plain)
        cost = (0, 0) if lay.empty else refine.count_tiles(plain.pattern, pattern.heads, lay, lq, lk, bound)
        if cost is None:
            sp = _compile_region(plain, pattern.heads, lq, lk, block_q, block_k, device)
            cost = (0, 0) if sp is None else (sp.num_tiles, sp.schedule_slots)
        return cost

    subs = _choose(pattern, lq, lk, block_q, block_k, device, region_plan, plain_cost)
    return Plan(subs, lq, lk, block_q, block_k, pattern.heads or 1)


def _plan_key(pattern, lq, lk, block_q, block_k, device):
    """What a plan depends on: the pattern's value (not the object), lengths,
    tiles and device."""
    return (None if pattern is None else pattern.key, lq, lk, block_q, block_k, str(device))


class _PlanCache:
    """Least-recently-used cache of plans keyed by (pattern, shapes, tiles, device)."""

    def __init__(self, capacity=64):
        self.capacity = capacity
        self.entries = OrderedDict()

    def get(self, pattern, lq, lk, block_q, block_k, device):
        device = torch.device(device)
        key = _plan_key(pattern, lq, lk, block_q, block_k, device)
        plan = self.entries.get(key)
        if plan is None:
            plan = compile_plan(pattern, lq, lk, block_q, block_k, device)
            self.entries[key] = plan
            if len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        return plan

    def clear(self):
        self.entries.clear()


_CACHE = _PlanCache()


def get_plan(pattern, lq, lk, block_q, block_k, device="cpu") -> Plan:
    """The cached plan for these arguments (see ``compile_plan``)."""
    return _CACHE.get(pattern, lq, lk, block_q, block_k, device)


def clear_plan_cache():
    _CACHE.clear()


# Plans reach custom ops as int ids (ops take tensors and scalars only): an id
# names get_plan's arguments, so the plan itself stays in its cache. The
# registry is bounded: it forgets the least recently used ids (and the patterns
# they hold) past PLAN_ID_CAPACITY, and never gives a forgotten id out again.
PLAN_ID_CAPACITY = 1024
_PLAN_IDS: OrderedDict = OrderedDict()   # key -> id, least recently used first
_PLAN_ARGS: dict = {}                    # id -> (key, get_plan's arguments)
_NEXT_ID = itertools.count()


@torch.compiler.assume_constant_result
def plan_id(pattern, lq, lk, block_q, block_k, device) -> int:
    """The id of ``get_plan(pattern, lq, lk, block_q, block_k, device)``; a
    constant to torch.compile."""
    args = (pattern, lq, lk, block_q, block_k, str(device))
    key = _plan_key(*args)
    ident = _PLAN_IDS.get(key)
    if ident is None:
        ident = _PLAN_IDS[key] = next(_NEXT_ID)
        _PLAN_ARGS[ident] = key, args
        while len(_PLAN_IDS) > PLAN_ID_CAPACITY:
            _, old = _PLAN_IDS.popitem(last=False)
            del _PLAN_ARGS[old]
    else:
        _PLAN_IDS.move_to_end(key)
    return ident


def plan_by_id(ident) -> Plan:
    entry = _PLAN_ARGS.get(ident)
    if entry is None:
        raise RuntimeError(f"plan id {ident} is no longer registered: more than tfk.plan.PLAN_ID_CAPACITY "
                           f"({PLAN_ID_CAPACITY}) other plans were used since it was made (raise the capacity "
                           "if one training step really uses that many patterns and lengths)")
    key, args = entry
    _PLAN_IDS.move_to_end(key)
    return get_plan(*args)
