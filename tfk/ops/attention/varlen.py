"""Packed variable-length batches: ``attention_varlen`` (flash-attn's
``flash_attn_varlen_func`` layout) on the engine every backend runs.

Sequences lie end to end in (total, H, D) tensors, cut by cu_seqlens. A
varlen call is one attention call over the packed tokens under a pattern that
knows the cuts (``Packed``), whose plan is the concatenation of each
sequence's own plan: sequence b's sub-passes occupy whole blocks of their own,
so a tile never holds two sequences and the tiles visited are exactly the sum
over sequences of each one's plan. A sequence's last, short block is filled
with padding that points at one zero row appended to the packed tensors;
tiles with padding keys are partial tiles whose masks exclude them.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch
import torch.nn.functional as F

from ...backends import AttentionCall, select_backend
from ...patterns import DENSE, IDENTITY, Pattern, Region
from ...plan import Plan, _PlanCache
from ... import tile_facts as tf
from .api import _check_common, _check_shapes, _check_tensors
from .reference import attention_reference

# Plans of single sequences, by (pattern, lengths, tiles): documents repeat
# lengths from step to step.
_SEQUENCE_PLANS = _PlanCache(capacity=4096)


class Packed(Pattern):
    """``pattern`` within each of several sequences packed end to end, and
    nothing across them: query i of sequence b may attend to key j of the same
    sequence when ``pattern`` allows (i - start_q[b], j - start_k[b]) for that
    sequence's lengths. Positions past the last sequence (the padding row)
    attend to nothing. Plans are built per sequence (``plan``)."""

    def __init__(self, pattern: Pattern, seqlens_q, seqlens_k):
        self.pattern = pattern
        self.seqlens_q, self.seqlens_k = tuple(seqlens_q), tuple(seqlens_k)
        self.heads = pattern.heads

    @property
    def key(self):
        return ("packed", self.pattern.key, self.seqlens_q, self.seqlens_k)

    def __repr__(self):
        return f"packed({self.pattern!r}, {len(self.seqlens_q)} sequences)"

    def sequences(self):
        """(start_q, start_k, lq, lk) of each sequence."""
        sq = sk = 0
        for lq, lk in zip(self.seqlens_q, self.seqlens_k):
            yield sq, sk, lq, lk
            sq, sk = sq + lq, sk + lk

    def dense_mask(self, Lq, Lk, device=None):
        heads = () if self.heads is None else (self.heads,)
        out = torch.zeros(*heads, Lq, Lk, dtype=torch.bool, device=device)
        for sq, sk, lq, lk in self.sequences():
            if lq and lk:
                out[..., sq:sq + lq, sk:sk + lk] = self.pattern.dense_mask(lq, lk, device=device)
        return out

    def mask(self, h, i, j, lq, lk):
        m = self.dense_mask(lq, lk, device=j.device)
        return m[i, j] if self.heads is None else m[h, i, j]

    def plan(self, lq, lk, block_q, block_k, device):
        return packed_plan(self, lq, lk, block_q, block_k, device)


class AtEnd(Pattern):
    """``pattern`` with the queries at the end of the keys: query i of lq is at
    position i + lk - lq of an lk x lk square (KV-cache decoding's absolute
    positions, where the queries are the cache's last lk - lq .. lk - 1)."""

    def __init__(self, pattern: Pattern):
        self.pattern = pattern
        self.heads = pattern.heads
        self.shift_invariant = pattern.shift_invariant

    @property
    def key(self):
        return ("at_end", self.pattern.key)

    def __repr__(self):
        return f"at_end({self.pattern!r})"

    def check_lengths(self, lq, lk):
        if lq > lk:
            raise ValueError(f"{lq} queries at the end of {lk} keys")
        self.pattern.check_lengths(lk, lk)

    def mask(self, h, i, j, lq, lk):
        return self.pattern.mask(h, i + (lk - lq), j, lk, lk)

    def tile_facts(self, h, q, k, lq, lk):
        s = lk - lq
        return self.pattern.tile_facts(h, tf.Blocks(q.lo + s, q.hi + s, q.step, q.count), k, lk, lk)

    def tile_kind(self, h, q, k, lq, lk):
        s = lk - lq
        return self.pattern.tile_kind(h, tf.Blocks(q.lo + s, q.hi + s, q.step, q.count), k, lk, lk)

    def regions(self):
        return [Region(IDENTITY, IDENTITY, self)]


def _sealed(sp, bk):
    """``sp`` with every listed tile of its layout's last, short key block a
    partial tile: packed, the padding columns there are rows of the tensors
    (the padding row), which a full tile would read. Padding query rows need
    no mask: they read the zero padding row, their outputs land on it, and
    their output gradients (hence every gradient they add) are zero."""
    rk = sp.lk % bk
    if not rk:
        return sp
    nqb, nkb = sp.kv_count.shape[1], sp.q_count.shape[1]
    dev = sp.kv_blocks.device
    # listed full tiles of the last key block: in the kv schedule, slots; in the transposed one, a whole row
    used = torch.arange(sp.kv_blocks.shape[2], device=dev) < sp.kv_count.unsqueeze(-1)
    h, qb, s = (used & (sp.kv_blocks == nkb - 1) & (sp.kv_partial < 0)).nonzero(as_tuple=True)
    n = h.numel()
    if n == 0:
        return sp
    ids = torch.arange(sp.num_partial, sp.num_partial + n, dtype=torch.int32, device=dev)
    kv_partial = sp.kv_partial.clone()
    kv_partial[h, qb, s] = ids
    mask = torch.arange(bk, device=dev) < rk
    masks = mask.view(1, 1, bk).expand(n, sp.partial_masks.shape[1], bk)
    # the transposed schedule lists the same tiles (by query block, ascending): the same ids
    tile = h * nqb + qb    # ascending: nonzero's order
    used_q = torch.arange(sp.q_blocks.shape[2], device=dev) < sp.q_count[:, -1:]
    q_partial = sp.q_partial.clone()
    last = q_partial[:, -1]                     # (Hp, nbq) view: the last key block's row
    h2, s2 = (used_q & (last < 0)).nonzero(as_tuple=True)
    last[h2, s2] = ids[torch.searchsorted(tile, h2 * nqb + sp.q_blocks[h2, -1, s2].long())]
    return dataclasses.replace(sp, kv_partial=kv_partial, q_partial=q_partial,
                               partial_masks=torch.cat([sp.partial_masks, masks]))


def _widen(x, width, fill=None):
    """x (Hp, rows, w) to ``width`` columns: ``fill``, or the last column repeated."""
    extra = width - x.shape[2]
    if extra == 0:
        return x
    if fill is None:
        return torch.cat([x, x[:, :, -1:].expand(-1, -1, extra)], 2)
    return F.pad(x, (0, extra), value=fill)


def _positions(index, start, length, blocks, block, pad):
    """A sequence's layout positions in the packed tensors, padded to whole blocks with ``pad``."""
    pos = torch.full((blocks * block,), pad, dtype=torch.int64)
    pos[:length] = (torch.arange(length) if index is None else index.cpu()) + start
    return pos


def _concatenated(pieces, pad_q, pad_k, bq, bk, device):
    """One sub-pass of the packed tensors from sequences' sealed sub-passes
    ``pieces`` [(start_q, start_k, sub-pass)], each in whole blocks of its own."""
    nb = max(sp.kv_blocks.shape[2] for _, _, sp in pieces)
    nbq = max(sp.q_blocks.shape[2] for _, _, sp in pieces)
    q_pos, k_pos, kv, qs, masks = [], [], [], [], []
    q_off = k_off = p_off = 0
    for sq, sk, sp in pieces:
        nqb, nkb = sp.kv_count.shape[1], sp.q_count.shape[1]
        q_pos.append(_positions(sp.q_index, sq, sp.lq, nqb, bq, pad_q))
        k_pos.append(_positions(sp.kv_index, sk, sp.lk, nkb, bk, pad_k))
        kv.append((sp.kv_count, _widen(sp.kv_blocks + k_off, nb),
                   _widen(torch.where(sp.kv_partial >= 0, sp.kv_partial + p_off, -1), nb, -1)))
        qs.append((sp.q_count, _widen(sp.q_blocks + q_off, nbq),
                   _widen(torch.where(sp.q_partial >= 0, sp.q_partial + p_off, -1), nbq, -1)))
        masks.append(sp.partial_masks)
        q_off, k_off, p_off = q_off + nqb, k_off + nkb, p_off + sp.num_partial
    cat = lambda parts, i: torch.cat([p[i] for p in parts], 1).to(torch.int32)  # noqa: E731
    q_index, kv_index = torch.cat(q_pos).to(device), torch.cat(k_pos).to(device)
    return dataclasses.replace(
        pieces[0][2], q_index=q_index, kv_index=kv_index,
        kv_count=cat(kv, 0), kv_blocks=cat(kv, 1), kv_partial=cat(kv, 2),
        q_count=cat(qs, 0), q_blocks=cat(qs, 1), q_partial=cat(qs, 2),
        partial_masks=torch.cat(masks), lq=q_index.numel(), lk=kv_index.numel())


def packed_plan(packed: Packed, lq, lk, block_q, block_k, device) -> Plan:
    """The plan of a ``Packed`` pattern over the packed tokens plus the padding
    row (lq = total_q + 1, lk = total_k + 1): sub-pass s holds every
    sequence's sub-pass s, in sequence order."""
    device = torch.device(device)
    total_q, total_k = sum(packed.seqlens_q), sum(packed.seqlens_k)
    if (lq, lk) != (total_q + 1, total_k + 1):
        raise ValueError(f"a packed plan is for {total_q} + 1 queries and {total_k} + 1 keys, not {lq} and {lk}")
    slots = []
    for sq, sk, n_q, n_k in packed.sequences():
        if n_q == 0 or n_k == 0:
            continue
        plan = _SEQUENCE_PLANS.get(packed.pattern, n_q, n_k, block_q, block_k, device)
        for s, sp in enumerate(plan.subpasses):
            if s == len(slots):
                slots.append([])
            slots[s].append((sq, sk, _sealed(sp, block_k)))
    subpasses = tuple(_concatenated(pieces, total_q, total_k, block_q, block_k, device) for pieces in slots)
    return Plan(subpasses, lq, lk, block_q, block_k, packed.heads or 1)


# ------------------------------------------------------------------ the API

def _seqlens(name, cu, total, device):
    """The sequence lengths of ``cu`` (cu_seqlens), a host list; checked."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (as flash-attn's), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, expected query's device {device}")
    cu = cu.tolist()   # the plan is built on the host (one synchronisation per call)
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {cu[0]}")
    lens = [b - a for a, b in zip(cu, cu[1:])]
    for b, n in enumerate(lens):
        if n < 0:
            raise ValueError(f"{name} must be non-decreasing: entry {b + 1} ({cu[b + 1]}) < entry {b} ({cu[b]})")
    if cu[-1] != total:
        raise ValueError(f"{name} ends at {cu[-1]}, but the packed tensors hold {total} tokens")
    return lens


def _check_max(name, value, lens, which):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    longest = max(lens, default=0)
    if value < longest:
        raise ValueError(f"{name} is {value}, less than the longest {which} sequence ({longest})")


def packed_input(x):
    """(total, H, D) as the engine's (1, H, total + 1, D), contiguous (the
    layouts gather whole rows; the kernel backends take it as it is): one zero
    row appended, the padding row sequences' short blocks point at."""
    total, H, D = x.shape
    out = x.new_empty(1, H, total + 1, D)
    out[0, :, :total] = x.transpose(0, 1)
    out[0, :, total] = 0
    return out


def attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, pattern=None, *,
                     scale=None, dropout_p=0.0, backend="auto", return_lse=False):
    """Attention over sequences packed end to end (flash-attn's varlen layout).

    Args:
        query: (total_q, H, D); key: (total_k, Hkv, D); value: (total_k, Hkv, Dv),
            H a multiple of Hkv.
        cu_seqlens_q, cu_seqlens_k: int32 (B + 1,), cumulative sequence ends
            starting at 0: sequence b's queries are rows cu_seqlens_q[b] to
            cu_seqlens_q[b + 1] - 1, its keys likewise. Lengths may be 0.
        max_seqlen_q, max_seqlen_k: the longest sequences (ints; checked).
        pattern: a ``tfk.patterns`` pattern applied within each sequence, with
            positions counted from the sequence's start (``causal()`` is
            top-left aligned, ``causal(bottom_right=True)`` flash-attn's
            alignment); None: dense within each sequence. No query attends to
            another sequence's keys.
        scale, dropout_p, backend: as ``tfk.attention``.
        return_lse: also return lse (H, total_q) float32, natural log.
    Returns:
        out (total_q, H, Dv), or (out, lse). A query with no allowed key gets
        0 and lse -inf.

    The sequence lengths are read on the host (one synchronisation on a GPU)
    to build the plan, which is cached by the lengths. Every tile a kernel
    visits lies within one sequence.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total, heads, head_dim), got shape {tuple(t.shape)}")
    _check_tensors(query, key, value)
    q, k, v = (packed_input(t) for t in (query, key, value))
    _check_shapes(q, k, v, gqa=True)
    lens_q = _seqlens("cu_seqlens_q", cu_seqlens_q, query.shape[0], query.device)
    lens_k = _seqlens("cu_seqlens_k", cu_seqlens_k, key.shape[0], query.device)
    if len(lens_q) != len(lens_k):
        raise ValueError(f"cu_seqlens_q has {len(lens_q)} sequences and cu_seqlens_k {len(lens_k)}")
    _check_max("max_seqlen_q", max_seqlen_q, lens_q, "query")
    _check_max("max_seqlen_k", max_seqlen_k, lens_k, "key")
    pattern = DENSE if pattern is None else pattern
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a tfk.patterns pattern or None, got {type(pattern).__name__}")
    if pattern.heads not in (None, 1, query.shape[1]):
        raise ValueError(f"pattern has {pattern.heads} heads but query has {query.shape[1]}")
    for n_q, n_k in set(zip(lens_q, lens_k)):
        pattern.check_lengths(n_q, n_k)
    scale = _check_common(scale, dropout_p, query.shape[-1])
    call = AttentionCall(q, k, v, Packed(pattern, lens_q, lens_k), None, scale, float(dropout_p), bool(return_lse))
    out, lse = select_backend(backend, call).run(call)
    out = out[0, :, :query.shape[0]].transpose(0, 1).contiguous()
    return (out, lse[0, :, :query.shape[0]]) if return_lse else out


def varlen_reference(query, key, value, seqlens_q, seqlens_k, pattern=None, scale=None, keep=None, dropout_p=0.0):
    """The oracle: a loop over sequences of dense masked attention
    (``attention_reference``) in the inputs' dtype. Shapes as
    ``attention_varlen``'s; ``keep`` the (H, total_q, total_k) dropout keep
    mask. Returns out (total_q, H, Dv) and lse (H, total_q)."""
    H, Dv = query.shape[1], value.shape[-1]
    outs, lses = [], []
    sq = sk = 0
    for n_q, n_k in zip(seqlens_q, seqlens_k):
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (query[sq:sq + n_q], key[sk:sk + n_k],
                                                             value[sk:sk + n_k]))
        if n_q and n_k:
            allowed = None if pattern is None else pattern.dense_mask(n_q, n_k, device=query.device)
            kp = None if keep is None else keep[:, sq:sq + n_q, sk:sk + n_k].unsqueeze(0)
            o, lse = attention_reference(q, k, v, allowed, None, scale, dropout_p, kp)
        else:
            o = query.new_zeros(1, H, n_q, Dv)
            lse = torch.full((1, H, n_q), float("-inf"), dtype=query.dtype, device=query.device)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
        sq, sk = sq + n_q, sk + n_k
    return torch.cat(outs), torch.cat(lses, 1)
