"""Which keys each rank needs of each other rank's shard, decided by the plan.

Rank rq's queries and rank rk's keys are each one or two runs of global
positions (``layout.runs``). For every (query run, key run) pair the plan of
the pattern on that window of the sequence (``patterns.Shifted``) lists the
tiles holding an allowed pair; the key rows those tiles touch are all rq
needs of that run. A pair with no tile needs nothing: its step is skipped and
nothing is sent, so a sliding window talks to its neighbours only, and only
the window's rows of them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..patterns import DENSE, Shifted
from ..plan import get_plan
from . import layout as lay

# The tiles of the plans that decide the schedule (every rank must decide the
# same, whatever backend it computes with).
SCHEDULE_BLOCK = 64


@dataclass(frozen=True)
class Piece:
    """Queries [q_local, q_local + q_len) of rq's shard (global q_global...)
    against keys [buf, buf + k_len) of the received rows (global k_global...)."""
    q_local: int
    q_len: int
    q_global: int
    buf: int
    k_len: int
    k_global: int


@dataclass(frozen=True)
class Link:
    """What rank rq needs of rank rk: ``ranges`` of rk's shard rows (sorted,
    disjoint; sent end to end) and the pieces computed on them."""
    ranges: tuple
    pieces: tuple

    @property
    def rows(self):
        return sum(hi - lo for lo, hi in self.ranges)


EMPTY = Link((), ())


def key_span(plan):
    """(lo, hi): the first and last key rows + 1 that some allowed pair of the
    plan's tiles reads (partial tiles by their masks), or None without tiles."""
    lo = hi = None
    bk = plan.block_k
    for sp in plan.subpasses:
        nb = sp.kv_blocks.shape[-1]
        used = torch.arange(nb, device=sp.kv_blocks.device) < sp.kv_count.unsqueeze(-1)
        blocks, partial = sp.kv_blocks[used].long(), sp.kv_partial[used].long()
        if blocks.numel() == 0:
            continue
        cols = torch.ones(blocks.numel(), bk, dtype=torch.bool, device=blocks.device)
        some = partial >= 0
        cols[some] = sp.partial_masks[partial[some]].any(1)
        rows = blocks.view(-1, 1) * bk + torch.arange(bk, device=blocks.device)
        rows = rows[cols & (rows < sp.lk)]
        if sp.kv_index is not None:
            rows = sp.kv_index.view(-1)[rows]
        if rows.numel() == 0:
            continue
        a, b = int(rows.min()), int(rows.max()) + 1
        lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
    return None if lo is None else (lo, hi)


@functools.lru_cache(maxsize=256)
def _spans(pattern, length, world, layout, n):
    """{(rq, rk): [(q run, k run, (lo, hi) within the k run), ...]} from the plans."""
    out = {}
    for rq in range(world):
        for rk in range(world):
            got = []
            for qg, ql, qn in lay.runs(layout, rq, world, n):
                for kg, kl, kn in lay.runs(layout, rk, world, n):
                    plan = get_plan(Shifted(pattern, qg, kg, length), qn, kn, SCHEDULE_BLOCK, SCHEDULE_BLOCK, "cpu")
                    span = key_span(plan)
                    if span is not None:
                        got.append(((qg, ql, qn), (kg, kl, kn), span))
            out[rq, rk] = tuple(got)
    return out


def _mask_span(mask, qg, qn, kg, lo, hi):
    """The part of [lo, hi) (rows of a key run at kg) where a bool ``mask``
    allows some query of [qg, qg + qn), or None."""
    cols = mask[..., qg:qg + qn, kg + lo:kg + hi].reshape(-1, hi - lo).any(0).nonzero()
    if cols.numel() == 0:
        return None
    return lo + int(cols[0]), lo + int(cols[-1]) + 1


def build(pattern, length, world, layout, n, mask=None):
    """links[rq][rk]: the Link of every (query rank, key rank) pair."""
    spans = _spans(pattern if pattern is not None else DENSE, length, world, layout, n)
    links = [[EMPTY] * world for _ in range(world)]
    for (rq, rk), got in spans.items():
        if mask is not None and mask.dtype == torch.bool:
            got = [(q, k, s) for q, k, span in got
                   if (s := _mask_span(mask, q[0], q[2], k[0], *span)) is not None]
        # one range of rows per key run: the union of the spans the query runs need
        ranges = {}
        for _, (kg, kl, _), (lo, hi) in got:
            a, b = ranges.get(kl, (kl + lo, kl + hi))
            ranges[kl] = (min(a, kl + lo), max(b, kl + hi))
        order = sorted(ranges.values())
        offset, at = {}, 0
        for a, b in order:
            offset[a] = at
            at += b - a
        pieces = []
        for (qg, ql, qn), (kg, kl, _), (lo, hi) in got:
            a = ranges[kl][0]
            pieces.append(Piece(ql, qn, qg, offset[a] + kl + lo - a, hi - lo, kg + lo))
        links[rq][rk] = Link(tuple(order), tuple(pieces))
    return links
